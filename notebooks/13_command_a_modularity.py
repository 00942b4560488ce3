# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Beyond the paper (5): expert families in a frontier model, from a pre-registered study's released data
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - re-derive a pre-registered definition from released data, and say where and why it differs;
# - recompute a study's decision rules and tell which margins its published precision can resolve;
# - judge what a rank correlation over a handful of units can and cannot show, from its exact power.
# :::

# %% tags=["parameters", "hide-input"]
data_dir = None  # folder holding command-a-modularity/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # if set, figures are also saved there as PNG
alpha = 0.05  # level of the rank-correlation tests (Holm-corrected within a precision)
power = 0.8  # power for the smallest detectable rank correlation
n_sim = 20000  # Monte Carlo samples for the power of the exact rank test
seed = 0
models = ["tiny-olmoe"]  # the shipped model of the last section
layer = None  # its layer (null: the middle MoE layer)
n_positions = 64  # positions sampled for the shipped model's family ablations
n_null_draws = 3  # random expert sets of the family size (the null band)
batch_size = 256

# %% tags=["hide-input"]
from IPython.display import display

from moeaudit import report
from moeaudit.chapters import modularity as M
from moeaudit.tooling import params

params.validate("13_command_a_modularity", globals())  # refuses a bad value before any work
source = M.show_source(data_dir)
report.glue_values(reading_minutes=report.chapter_reading_minutes("13_command_a_modularity"))

# %% [markdown]
# Salomone, Gandhi and Asaria {cite}`salomone2026modular` asked whether the experts of Command A+ (a mixture of
# experts with {glue:text}`n_experts` routed experts in each of {glue:text}`n_layers` layers) form functional
# modules. Their protocol has two rungs. On the first, observational rung they recorded how much router weight
# each expert receives on probe text of {glue:text}`n_cat` categories (an *atlas*, recorded on the 4-bit W4A4
# build of the model), and froze families of experts before any intervention, {glue:text}`n_tested` of them
# tested: for capabilities (math, code, general) and for languages (Arabic, Spanish, Chinese). On the second,
# causal rung they masked each family in the router (its logits set to $-\infty$, the remaining combine weights
# renormalised) and measured the rise in per-token loss (nats) on the family's own axis and on the others,
# against random expert sets of the same size, on the W4A4 build and again on the unquantised BF16 model. They
# released the atlas, the frozen map and the verdict values (licence `CC-BY-4.0`), but not the per-item losses.
# This chapter recomputes from those numbers what can be recomputed: the pre-registration, both decision rules,
# and how far the first rung predicts the second. The same distinction between observing routing and
# intervening is the subject of this book's audit.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moeaudit import audit, corpus as corpus_lib, report, stats
from moeaudit.engine import OPERATORS, run_ablations

report.use_book_style()
put = report.glue_values

# %%
atlas, prereg = M.atlas_mass(data_dir=data_dir), M.prereg_families(data_dir=data_dir)
verdict, said = M.verdicts(data_dir=data_dir), M.study_statements(data_dir=data_dir)
categories, mass = M.mass_array(atlas)  # mass: (categories, layers, experts)
lift = M.expert_lift(mass)  # (categories, experts)
core, frozen, K = M.frozen_map(prereg)
derived = M.top_k_families(lift, categories, k=K, exclude=core)  # the stated rule
agreement_all = M.family_agreement(frozen, derived, lift, categories, exclude=core)
agreement = agreement_all.set_index("family").loc[list(M.TESTED_FAMILIES)].reset_index()
passed_over = M.passed_over_experts(agreement_all)
again = M.top_k_families(lift, categories, k=K, exclude=core + passed_over)
tested = {f: frozen[f] for f in M.TESTED_FAMILIES}
n_again = int(M.family_agreement(tested, again, lift, categories).n_agree.sum())
reproduced = M.lift_reproduced(agreement_all, prereg)  # stated mean lift matched at three decimals

# %% [markdown]
# ## Re-deriving the pre-registration from the atlas
#
# The atlas holds the router mass of {glue:text}`n_cat` categories at {glue:text}`n_layers` layers for
# {glue:text}`n_experts` experts. The frozen map states its rule as "top-K by lift excluding the shared core",
# with K = {glue:text}`K` and a shared core of {glue:text}`n_core` experts ({glue:text}`core_list`), and gives
# each family's mean lift, but not the formula of lift. The formula used here is an expert's share of a
# category's routing mass, pooled over layers, divided by its mean share over all categories. With it the
# stated mean lift is reproduced to the published three decimals for {glue:text}`n_lift_all` of the
# {glue:text}`n_fam_all` families; that agreement is the only evidence that this is the study's formula.
#
# {glue:md}`prereg_text`

# %% tags=["remove-input"]
put(n_tested=len(M.TESTED_FAMILIES), n_cat=len(categories), n_layers=mass.shape[1], n_experts=mass.shape[2], K=K,
    n_core=len(core), core_list=", ".join(map(str, core)), n_lift_all=int(reproduced.sum()), n_fam_all=len(frozen))
put(prereg_text=M.prereg_sentence(agreement, passed_over, n_again,
                                  n_lift_match=int(reproduced[list(M.TESTED_FAMILIES)].sum())),
    replacement_text=M.replacement_sentence(agreement_all, passed_over, k=K),
    overlap_text=M.overlap_sentence(frozen, derived, agreement, verdict, said), as_markdown=True)
_ = report.show_table(M.agreement_display(agreement), formats={"mean lift (frozen)": "{:.3f}", "mean lift (rule)": "{:.3f}"},
                     max_rows=None)

# %% [markdown]
# {glue:md}`replacement_text`
#
# {glue:md}`overlap_text`
#
# ## Both decision rules, recomputed
#
# A family is modular under the pre-registered **point rule** when its on-target effect exceeds the random
# null band ($m + 2s$, with $m$ and $s$ the mean and standard deviation of the on-target effects of
# {glue:text}`n_null_draws_study` random sets of {glue:text}`K` experts) and its worst within-domain off-target
# effect is at most a third of the on-target effect. The **conservative CI rule** asks the same of the
# bootstrap 95% intervals ({glue:text}`n_boot_study` resamples): the lower bound of the on-target effect above
# the null band, and the upper bound of the worst off-target effect at most a third of that lower bound. Each
# effect is a mean over the items of its axis ({glue:text}`n_items_min` to {glue:text}`n_items_max` per axis).
# The study published the W4A4 table to {glue:text}`dec_w4` decimals and the BF16 table to {glue:text}`dec_bf`
# (read from the released files as written; a table's numbers are taken to share its largest number of
# decimals), so a printed value stands for any value within half a unit of its last digit.
#
# {glue:md}`rules_text`

# %%
table = M.decision_table(verdict)
counts = M.rule_counts(table)

# %% tags=["remove-input"]
put(n_null_draws_study=int(said["n_random_null"]), n_boot_study=int(said["n_bootstrap"]),
    n_items_min=int(verdict.n_items.min()), n_items_max=int(verdict.n_items.max()),
    dec_w4=int(verdict[verdict.precision == "W4A4"].decimals.iloc[0]),
    dec_bf=int(verdict[verdict.precision == "BF16"].decimals.iloc[0]))
put(rules_text=M.rules_sentence(counts, said), precision_text=M.precision_sentence(table, said),
    ci_text=M.ci_rule_sentence(table), counts_text=M.counts_sentence(counts), as_markdown=True)
display(M.count_table(counts, said).style.hide(axis="index"))
shown = M.decision_display(table)
for c in ["on-target", "lower 95% bound", "null band", "worst off-target"]:  # as published: the row's decimals
    shown[c] = ["-" if pd.isna(v) else f"{v:.{d}f}" for v, d in zip(shown[c], table.decimals)]
_ = report.show_table(shown[["precision", "family", "on-target", "lower 95% bound", "null band", "worst off-target",
                             "on axis"]], max_rows=None,
                      caption="The released values (nats per token), at the precision each table was published with")
_ = report.show_table(shown[["precision", "family", "selectivity margin", "margin range", "point rule", "point rule (study)",
                             "CI rule", "CI rule (study)"]], formats={"selectivity margin": "{:+.4f}"}, max_rows=None,
                      caption="Both rules recomputed from those values, beside the study's verdicts")

# %% [markdown]
# The second table gives the released values in nats per token, the third the verdicts. The selectivity margin is the on-target effect
# divided by three minus the worst off-target effect, and its range covers all values that round to the
# published ones; "unsettled" marks a point verdict that the published digits do not decide, and "open" a
# CI-rule verdict that the released values cannot decide.
#
# {glue:md}`precision_text`
#
# {glue:md}`ci_text`
#
# {glue:md}`counts_text`
#
# ## Does the first rung predict the second?
#
# For each tested family, four observational statistics come from the atlas alone: its mean lift, its
# routing concentration (the share of its category's router mass that its experts carry; a uniform router
# gives {glue:text}`uniform_share:.3f`), its largest overlap (Jaccard) with another tested family, and the depth
# centroid of its excess routing (on a scale from $0$, the first layer, to $1$, the last). They are set against
# three causal measures: the on-target effect, the effect above the null band, and the off-target ratio (worst
# off-target over on-target; the point rule asks at most one third). The W4A4 table has no off-target value for
# `general`, so its ratio uses {glue:text}`n_ratio_w4` families. The atlas comes from the W4A4 build, so the BF16
# correlations pair it with effects measured on another build. Every test is an exact permutation test of
# Spearman's rho over all orderings, with Holm's correction over the {glue:text}`n_tests` tests of a precision.
#
# {glue:md}`rung_w4`
#
# {glue:md}`rung_bf`
#
# {glue:md}`power_text`

# %%
obs = M.family_observational(mass, categories, tested)
causal = M.causal_measures(verdict)
corr = M.rung_correlations(obs, causal, alpha=alpha)
n_tests = int(corr.groupby("precision").size().max())
pw = M.rank_power(sorted(corr.n.unique()), alpha=alpha, power=power, n_sim=n_sim, seed=seed, n_tests=n_tests)

# %% tags=["remove-input"]
put(uniform_share=K / mass.shape[2], n_tests=n_tests,
    n_ratio_w4=int(corr[(corr.precision == "W4A4") & (corr.causal == "off_ratio")].n.iloc[0]))
put(rung_w4=M.rung_sentence(corr, alpha=alpha, precision="W4A4"),
    rung_bf=M.rung_sentence(corr, alpha=alpha, precision="BF16"),
    power_text=M.power_sentence(pw, alpha=alpha, target=power), as_markdown=True)
both = obs.merge(causal[causal.precision == "W4A4"].drop(columns="precision"), on="family")
both["max_overlap"] = [f"{v:.3g} ({w})" for v, w in zip(both.max_overlap, both.overlap_with)]
_ = report.show_table(both.drop(columns="overlap_with"), labels=M.LABELS, max_rows=None,
                      formats={M.LABELS[c]: "{:.3g}" for c in M.OBSERVATIONAL + M.CAUSAL if c != "max_overlap"},
                      caption="Each tested family: the atlas's statistics and the W4A4 causal measures "
                              "(overlap: Jaccard, with the family it overlaps most)")
for prec, g in corr.groupby("precision", sort=False):
    _ = report.show_table(g.assign(observational=g.observational.map(M.LABELS), causal=g.causal.map(M.LABELS),
                                   significant=g.significant.map({True: "yes", False: "no"}))
                          .drop(columns=["precision", "n_permutations"]),
                          labels={"n": "families", "rho": "ρ", "p_exact": "exact p", "p_holm": "p (Holm)"},
                          formats={"ρ": "{:+.3f}", "exact p": "{:.4f}", "p (Holm)": "{:.3f}"}, max_rows=None,
                          caption=f"{prec}: Spearman's ρ of each observational statistic with each causal measure")

# %% tags=["hide-input"]
profile = M.family_depth_profile(mass, categories, tested)
fig, ax = plt.subplots(figsize=(report.COLUMN_INCHES, 3.6))
for fam, g in profile.groupby("family", sort=False):
    ax.plot(g.layer, g.layer_lift, marker=".", label=fam)
ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
ax.set(xlabel="layer of Command A+", ylabel="family lift at the layer (ratio)",
       title="Where each frozen family's routing preference sits (atlas of the study)")
ax.legend(ncol=3, fontsize=8)
fig.tight_layout()
if results_dir:
    fig.savefig(f"{results_dir}/13_depth_profile.png", dpi=150)
plt.show()

# %% [markdown]
# The figure shows, layer by layer, each tested family's share of its own category's routing mass over its
# mean share across categories (the dashed line, a ratio of one, is no preference); the depth centroid above
# summarises where the excess sits.
#
# ## The same analysis on a shipped model, under two operators
#
# The study ablated by router masking with renormalisation; the paper audited in this book removes an
# expert's weighted contribution without renormalising. Below, {glue:text}`ship_model` gets the study's
# treatment on the embedded corpus: its four paragraph groups play the categories, each group's family is
# the {glue:text}`ship_k` experts of highest lift at layer {glue:text}`ship_layer` (the same share of experts
# as {glue:text}`K` of {glue:text}`n_experts`), and each family and {glue:text}`ship_nulls` random sets of that
# size are ablated at {glue:text}`ship_n` sampled positions under both operators. The ablation acts on one token
# at one layer, while the study masked its families at every layer and for every token, so the sizes of the
# effects are not comparable with the study's.
#
# {glue:md}`ship_text`

# %%
model_name = models[0]
ctx = audit.prepare(model_name, corpus="embedded", n_texts=100, results_dir=results_dir, progress=False)
moe = ctx.model.layout.moe_layers
L = moe[len(moe) // 2] if layer is None else layer
E = ctx.model.layout.num_experts
route = ctx.clean.routing[L]
ship_atlas, ship_fams = M.topic_families(ctx.clean.tokens.seq_id.to_numpy(), route["indices"], route["weight"],
                                         layer=L, num_experts=E, share=K / mass.shape[2])
pos = corpus_lib.sample_positions(ctx.corpus, n=n_positions, seed=seed)
pos["topic"] = np.array(M.EMBEDDED_TOPICS)[M.embedded_topic(pos.seq_id.to_numpy())]
requests = M.family_requests(pos, ship_fams, layer=L, num_experts=E, n_null=n_null_draws, seed=seed)
operators = [op for op in ("remove", "mask") if op in OPERATORS]
records = pd.concat([run_ablations(ctx.model, ctx.corpus, ctx.clean, requests, operator=op, require_active=False,
                                   batch_size=batch_size, progress=False).assign(operator=op) for op in operators],
                    ignore_index=True)
effects = M.family_effects(records)

# %% tags=["remove-input"]
per_topic = pos.topic.value_counts().reindex(M.EMBEDDED_TOPICS).fillna(0).astype(int).to_dict()
put(ship_model=model_name, ship_k=len(next(iter(ship_fams.values()))), ship_layer=L, ship_nulls=n_null_draws,
    ship_n=len(pos))
put(ship_text=M.shipped_sentence(effects, model=model_name, layer=L, n_positions=per_topic, n_null=n_null_draws),
    shows_text=M.shows_sentences(agreement, passed_over, counts, said, corr, pw, effects, alpha=alpha, power=power,
                                 model=model_name, n_positions=per_topic), as_markdown=True)

# %% tags=["hide-input"]
fig, axes = report.panel_grid(len(operators), height=3.6, sharey=True)
for ax, (op, g) in zip(axes, effects.groupby("operator", sort=False)):
    x = np.arange(len(g))
    ax.bar(x - 0.2, g.on_target, 0.4, label="on-target")
    ax.bar(x + 0.2, g.worst_off, 0.4, label="worst off-target")
    ax.scatter(x, g.null_2sigma, marker="_", s=400, color="k", label="null band (mean + 2 sd)", zorder=3)
    ax.set_xticks(x, g.family)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_title(f"operator: {op}")
axes[0].set_ylabel("mean loss change (nats)")
axes[0].legend(fontsize=8)
fig.suptitle(f"Topic families of {model_name}, layer {L}, embedded corpus")
fig.tight_layout()
if results_dir:
    fig.savefig(f"{results_dir}/13_shipped_families.png", dpi=150)
plt.show()

# %% [markdown]
# ## What this shows, and what it does not
#
# ```{glue:md} shows_text
# :format: myst
# ```
#
# ## Exercises
#
# In the downloaded notebook `M` is this chapter's module, `moeaudit.chapters.modularity`
# (imported as `from moeaudit.chapters import modularity as M` in the cell after the parameters).
#
# ````{exercise} 1. Without the extra exclusions
# :label: 13_command_a_modularity-ex1
# :nonumber:
#
# Recompute the tested families with `M.top_k_families` excluding only the shared core, and ask
# whether the Spanish and Arabic families would still share experts. How many do they share? Check
# your count in the downloaded notebook with `M.check_13_command_a_modularity_1(answer, derived)`.
# ````
#
# ````{solution} 13_command_a_modularity-ex1
# :class: dropdown
#
# {glue:md}`ex1`.
# ````
#
# ````{exercise} 2. Two decimals are not enough
# :label: 13_command_a_modularity-ex2
# :nonumber:
#
# How many decimals would the W4A4 table need for the Spanish selectivity margin stated by the
# study to be resolved? Change `decimals` in `verdict` and rerun `M.decision_table`, or see
# `M.decimals_to_resolve`. Check your number in the downloaded notebook with
# `M.check_13_command_a_modularity_2(answer, verdict, said)`.
# ````
#
# ````{solution} 13_command_a_modularity-ex2
# :class: dropdown
#
# {glue:md}`ex2`.
# ````
#
# ````{exercise} 3. How many families would be enough?
# :label: 13_command_a_modularity-ex3
# :nonumber:
#
# Find the smallest number of families for which the exact test detects a true correlation of
# {glue:text}`ex3_rho` with {glue:text}`power_pct` power at level {glue:text}`alpha_txt` before any
# correction, using `moeaudit.stats.spearman_exact_power`. Its enumeration stops at
# {glue:text}`max_exact_n` families; if that is not enough, say how much power the exact test has
# there and estimate the number with `M.families_needed_approx`.
# ````
#
# ````{solution} 13_command_a_modularity-ex3
# :class: dropdown
#
# {glue:md}`ex3`.
# ````

# %% tags=["hide-input"]
ex3_rho = 0.8
put(**M.exercise_answers(derived, verdict, said, alpha=alpha, power=power, rho=ex3_rho, seed=seed), as_markdown=True)
put(ex3_rho=ex3_rho, power_pct=f"{power:.0%}", alpha_txt=f"{alpha:g}", max_exact_n=stats.MAX_EXACT_SPEARMAN_N)
