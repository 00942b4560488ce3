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
# # The audit: do observational metrics predict causal expert importance?
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - state the audit's question (Definition 2.1) as a paired test on the same positions;
# - read a cell's effect size, its p-values and (uncorrected) 95% confidence interval, and its verdict
#   under a named correction;
# - say what a non-significant cell does and does not show, from its minimum detectable effect.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # token positions per cell (the paper: 200)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
min_context = 0
batch_size = 64
alpha = 0.05  # family-wise level before correction
tost_bound_d = 0.2  # equivalence bound for TOST, in d_z units
power = 0.8  # power at which the minimum detectable effect is computed
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("04_audit", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("04_audit"))

# %% [markdown]
# This chapter reproduces the paper's central experiment (Section 3, Tables 1–3 of
# {cite}`engmann2026audit`). For each model and each audited MoE layer, it asks the question of
# Definition 2.1: *at a token position t, does the active expert that an observational metric
# ranks highest matter more for the next-token loss than the one it ranks lowest?*
#
# **Protocol.** Token positions are drawn once per model (seeded, without replacement, never
# the last token of a text). At every position and audited layer, each active routed expert is
# ablated on its own — its combine weight is set to zero {glue:md}`ablation_site`, inside the
# forward pass — and the change of the loss $-\log p(x_{t+1}\mid x_{\le t})$ is recorded. Each metric
# then picks its highest- and lowest-ranked active expert at t, giving paired effects
# $D = \Delta\mathcal{L}_{\text{high}} - \Delta\mathcal{L}_{\text{low}}$. Validity in the sense of
# Definition 2.1 means D is reliably positive. Every metric of a cell uses the *same* positions
# and the *same* ablation records, so differences between metrics are not sampling noise of
# different draws.
#
# **Tests** (each worked once on a toy example in the {ref}`statistics primer <stats-primer>` below).
# Per cell, the paired t-test with Cohen's $d_z$ {cite}`cohen1988power` as effect size
# (with an exact 95% CI) and the Wilcoxon signed-rank test {cite}`wilcoxon1945individual`. The
# family-wise error is controlled over all cells of a model with Bonferroni; a cell counts only if
# both tests pass with the same sign (the paper's dual-test rule). The paper's family has
# {glue:text}`paper_family` cells per model ({glue:text}`paper_metrics` metrics ×
# {glue:text}`paper_layers` layers, per-cell level $\alpha$ = {glue:text}`paper_alpha:.4g`); the
# families of this run are stated with the tables below. Holm {cite}`holm1979simple`, which also
# controls the family-wise error, and Benjamini–Hochberg {cite}`benjamini1995controlling`, which
# controls only the false-discovery rate (a weaker guarantee that never passes fewer cells, proved for
# independent or positively dependent p-values, while the cells here share positions), are shown
# beside Bonferroni; a verdict names the correction it holds under.

# %% tags=["hide-input"]
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moeaudit import paper, released, report, stats
from moeaudit.audit import paired_cells, prepare, single_expert_records
from moeaudit.chapters import exercises
from moeaudit.tooling import book
from moeaudit.metrics import METRICS
from moeaudit.zoo import ZOO_MODELS

report.use_book_style()
paper_counts = released.paper_family_verdicts(alpha=paper.PAPER_ALPHA)
report.glue_values(paper_family=int(paper_counts.cells.iloc[0]), paper_metrics=len(paper.PAPER_METRIC_LABELS),
                   paper_layers=len(paper.LAYERS["olmoe"]), paper_alpha=float(paper_counts.alpha_bonferroni.iloc[0]))
report.glue_values(as_markdown=True, ablation_site=report.ablation_site(mode))

# %% [markdown]
# (stats-primer)=
# ## A statistics primer, worked once
# Every statistic of the tables below, computed on a toy family of three cells (A, B, C) of
# {glue:text}`pr_n` positions each, generated with known effects so that the outcome can be
# checked against the truth: cell A's highest-ranked expert costs more loss than its lowest-ranked
# one, cell B's slightly more, cell C's nothing more. The calls are the ones the audit makes.

# %%
from moeaudit.chapters import primer

toy = primer.toy_cells(n=20, seed=seed)     # delta_loss_high, delta_loss_low (nats) and D per position
A = toy[toy.cell == "A"]
dz_by_hand = A.D.mean() / A.D.std(ddof=1)    # Cohen's d_z = mean(D) / sd(D)
family = primer.toy_family(toy, alpha=alpha, tost_bound_d=tost_bound_d, power=power)
assert abs(family.cohens_dz[0] - dz_by_hand) < 1e-12  # the library computes the same d_z

# %% tags=["remove-input"]
report.glue_values(**primer.primer_values(family, cell="A", small="B", alpha=alpha, n_audit=n_positions))
display(family.assign(
    dz=[f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, lo, hi in zip(family.cohens_dz, family.dz_ci_low, family.dz_ci_high)])
    [["cell", "dz", "p_t", "p_W", "sig_dual_bonf", "sig_dual_holm", "sig_dual_bh", "bf10"]]
    .rename(columns={"dz": "d_z [95% CI]", "sig_dual_bonf": "dual, Bonferroni", "sig_dual_holm": "dual, Holm",
                     "sig_dual_bh": "dual, BH", "bf10": "BF10"})
    .style.hide(axis="index").format({"p_t": "{:.2g}", "p_W": "{:.2g}", "BF10": "{:.3g}"})
    .set_caption("The toy family: effect size, both tests, the dual rule under three corrections, Bayes factor"))

# %% [markdown]
# **Effect size.** A cell's data are the paired differences
# $D_i = \Delta\mathcal{L}_{\text{high},i} - \Delta\mathcal{L}_{\text{low},i}$, one per position. In cell {glue:text}`pr_cell` their mean is
# {glue:text}`pr_mean` nats and their standard deviation {glue:text}`pr_sd` nats, so Cohen's
# $d_z = \bar D / s_D$ = {glue:text}`pr_dz`: the mean difference in units of its own spread, free of
# the loss's scale. Its 95% interval, {glue:text}`pr_dz_ci`, comes from the noncentral t
# distribution (exact when D is normal). It is not corrected for the family: a cell whose interval
# excludes zero can still fail the corrected test, whose interval would be wider.
#
# **Two tests.** The paired t-test uses $t = d_z\sqrt{n}$ = {glue:text}`pr_t` on $n-1$ =
# {glue:text}`pr_dof` degrees of freedom ($p_t$ = {glue:text}`pr_p_t`); it assumes that $\bar D$ is
# close to normally distributed (D itself normal, or n large). The Wilcoxon signed-rank test ranks
# $|D_i|$ and compares the rank sums of the positive and the negative differences ($W$ =
# {glue:text}`pr_W`, the smaller sum; $p_W$ = {glue:text}`pr_p_W`); it does not assume normality, and
# it asks a different question: whether D is centred at zero in the sense of its pseudo-median (the
# median of the pairwise means), not its mean. For skewed loss changes, where a few large
# differences carry the mean, the two can disagree: the t-test sees the few, Wilcoxon the many. The
# dual rule asks for both. Here the two tests {glue:text}`pr_same_sign`. Both tests take the
# positions as independent pairs; positions drawn from the same text are not quite that.
#
# **Family-wise error and the dual rule.** Testing many cells at level $\alpha$ each makes some
# false positive likely. Bonferroni tests each of the family's $m$ = {glue:text}`pr_m` cells at
# $\alpha/m$ = {glue:text}`pr_alpha`/{glue:text}`pr_m` = {glue:text}`pr_alpha_c`, so that the chance
# of *any* false positive in the family stays below $\alpha$. A cell counts only if both tests pass
# that level with the same sign (the paper's dual rule): cell {glue:text}`pr_cell`
# {glue:text}`pr_dual`. Cells passed in the table: {glue:text}`pr_n_bonf` under Bonferroni,
# {glue:text}`pr_n_holm` under Holm (a step-down procedure with the same guarantee and never fewer
# cells: {glue:text}`pr_holm_extra`) and {glue:text}`pr_n_bh` under Benjamini–Hochberg, which bounds
# only the expected share of false positives among the cells passed ({glue:text}`pr_bh_extra`).
#
# **Power, and what "not significant" means.** With {glue:text}`pr_n` pairs at level
# {glue:text}`pr_alpha_c`, the smallest $|d_z|$ the t-test detects with probability
# {glue:text}`pr_power` (the minimum detectable effect) is {glue:text}`pr_mde`. Cell
# {glue:text}`pr_small` has a real effect by construction, a true $d_z$ of
# {glue:text}`pr_small_true_dz`, {glue:text}`pr_small_below` that value: the test detects it with
# probability {glue:text}`pr_small_power` only, and {glue:text}`pr_small_found`.
#
# **Equivalence.** To *show* that an effect is negligible, the two one-sided tests (TOST) ask
# whether $|d_z|$ is demonstrably inside $\pm${glue:text}`pr_tost_bound`. For cell
# {glue:text}`pr_cell` $p_{\text{TOST}}$ = {glue:text}`pr_p_tost`; with {glue:text}`pr_n` pairs the
# smallest TOST p-value any data could give is {glue:text}`pr_tost_min_p`, so at level
# {glue:text}`pr_alpha_c` this design {glue:text}`pr_tost_possible`. With this run's
# {glue:text}`pr_n_audit` positions per cell that smallest p-value is
# {glue:text}`pr_tost_min_p_audit` (the audit's own level is stated with its families below).
#
# **Bayes factor.** The JZS Bayes factor $\text{BF}_{10}$ weighs the data's support for an effect
# against none (Cauchy prior on $d_z$, scale {glue:text}`pr_bf_r`): {glue:text}`pr_bf10` for cell
# {glue:text}`pr_cell`, "{glue:text}`pr_bf_label`" on Jeffreys' scale. Unlike a p-value it can also
# favour the null, and with few positions it can favour it wrongly: cell {glue:text}`pr_small`, whose
# effect is real by construction, has $\text{BF}_{10}$ = {glue:text}`pr_small_bf10`
# (“{glue:text}`pr_small_bf_label`”). Evidence for the null is evidence against effects as large as
# the prior expects, not against small ones.

# %% [markdown]
# ## Run the ablations
# Records are cached on disk under a key made of every parameter that produced them (model
# weights, corpus, positions, layers, mode, precision): re-running this page reuses them,
# an interrupted run resumes, and a changed parameter computes new records.

# %%
all_cells, contexts = [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    contexts[name] = ctx
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=min_context, batch_size=batch_size)
    cells = paired_cells(rec, ctx.metrics, rankings=METRICS)
    cells["rel_depth"] = cells.layer.map(dict(zip(audited, report.relative_depth(audited, ctx.model.layout.moe_layers))))
    all_cells.append(cells)
    display(Markdown(audit.model_summary(name, ctx, audited, rec)))
cells = pd.concat(all_cells, ignore_index=True)

# %% [markdown]
# ## Per-cell statistics
# One family of cells per model: {glue:md}`families`.

# %%
table = stats.audit_table(cells, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                          low_col="delta_loss_low", family=("model",), alpha=alpha, tost_bound_d=tost_bound_d,
                          power=power)
verdicts = stats.family_verdicts(table, alpha=alpha)

# %% tags=["remove-input"]
glue("families", Markdown("; ".join(
    f"{r.cells} cells for {r.model} ({len(METRICS)} metrics × {r.cells // len(METRICS)} layers, "
    f"Bonferroni level α = {alpha:g}/{r.cells} = {r.alpha_bonferroni:.4g})" for r in verdicts.itertuples())),
     display=False)
for name in models:
    t = table[table.model == name]
    display(Markdown(f"### {name}"))
    display(report.style_paper_layout(t, caption=f"{name}: Cohen's d_z [95% CI], p_t, p_W; n = {n_positions} per cell"))
    report.show_untested_note(t)  # cells that could not be tested, with the reason
display(Markdown(report.SIGNIFICANCE_NOTE))

# %% [markdown]
# ## Verdicts under each correction
# How many of each model's cells reach significance under Bonferroni (the paper), Holm, and
# Benjamini–Hochberg, for the t-test alone, the Wilcoxon test alone and the dual-test rule; how
# many cells are *demonstrably* small (TOST equivalence {cite}`lakens2017equivalence` at
# $|d_z|$ < {glue:text}`tost_bound`, tested at the family's Bonferroni level) and whether that
# test could pass at all at this level and sample size; and the smallest effect each family can
# detect.

# %% tags=["remove-input"]
def by_model(frame: pd.DataFrame, rows: list, caption: str) -> None:
    report.show_table(report.per_model_columns(frame, rows), index=True, caption=caption, max_rows=None)


COUNT = "{:d}"
by_model(verdicts, [
    ("cells", "cells", COUNT), ("untested", "untested", COUNT),
    ("alpha_bonferroni", "Bonferroni level per cell", "{:.4g}"),
    ("uncorrected_t", "t-test, uncorrected", COUNT), ("uncorrected_t_positive", "… of them with d_z > 0", COUNT),
    ("bonferroni_t", "t-test, Bonferroni", COUNT), ("bonferroni_W", "Wilcoxon, Bonferroni", COUNT),
    ("bonferroni_dual", "dual rule, Bonferroni", COUNT), ("holm_dual", "dual rule, Holm", COUNT),
    ("bh_dual", "dual rule, Benjamini–Hochberg", COUNT), ("equivalent", "equivalent", COUNT),
    ("tost_can_pass", "TOST can pass", "{}"), ("max_abs_dz", "largest |d_z|", "{:.3f}"),
    ("share_positive", "share of cells with d_z > 0", "{:.0%}"), ("min_detectable_dz", "min detectable d_z", "{:.3f}")],
    caption="Cells passing each test and correction, per model (counts of cells unless stated)")
glue("tost_bound", tost_bound_d, display=False)
glue("verdict_text", Markdown(report.family_verdict_text(verdicts, table)), display=False)
glue("power", power, display=False)
glue("n_pos", n_positions, display=False)

# %% [markdown]
# {glue:md}`verdict_text`
#
# `min detectable d_z` is the effect size the paired t-test detects with {glue:text}`power:.0%`
# power at n = {glue:text}`n_pos` positions and the family's Bonferroni level; effects below it can
# be missed, so "not significant" is not "no effect". The `equivalent` row counts the cells
# where the data positively support a small effect; `TOST can pass` says whether TOST at the bound
# and level could pass in any cell of the family for *any* data (its smallest attainable p-value,
# reached when the mean difference is exactly zero, must fall below the level). Where it is False,
# `equivalent` is zero by design, not because of the data.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt

fig, axes = report.model_panels(models, height=3.2, sharey=True)
colors = report.model_colors(list(METRICS))
for ax, name in zip(axes, models):
    t = table[table.model == name].merge(cells[["model", "layer", "rel_depth"]].drop_duplicates(), on=["model", "layer"])
    for metric in METRICS:
        report.dz_by_depth(ax, t[t.ranking == metric], label=metric.replace("_", " "), color=colors[metric])
report.finish_panels(fig, axes, title="Observational metrics: effect of ranking on the paired loss change",
                     ylabel="Cohen's $d_z$ (95% CI)", xlabel="relative depth of the MoE layer", zero_line=True)
display(Markdown(report.depth_marks_caption(table)))  # what a * means, and which cells carry one

# %% [markdown]
# ## The default models against the paper
# The paper's Tables 1–3 hold the same quantities for its three checkpoints. Counted from the
# statistics stored in the authors' released files (the values the printed tables round):

# %% tags=["remove-input"]
by_model(paper_counts, [
    ("cells", "cells", COUNT), ("alpha_bonferroni", "Bonferroni level per cell", "{:.4g}"),
    ("uncorrected_t", "t-test, uncorrected", COUNT), ("uncorrected_t_positive", "… of them with d > 0", COUNT),
    ("bonferroni_t", "t-test, Bonferroni", COUNT), ("bonferroni_W", "Wilcoxon, Bonferroni", COUNT),
    ("bonferroni_both", "both tests, Bonferroni", COUNT), ("holm_both", "both tests, Holm", COUNT),
    ("bh_both", "both tests, Benjamini–Hochberg", COUNT), ("max_abs_d", "largest |d|", "{:.3f}"),
    ("share_positive", "share of cells with d > 0", "{:.0%}")],
    caption="The paper's audit (Tables 1–3), per model: counts of cells, from the released statistics (both tests: "
            "t and Wilcoxon both below the corrected level; the files store no Wilcoxon sign)")
glue("comparison_text", Markdown(report.audit_comparison_text(verdicts, paper_counts, table, paper_names=paper.MODELS)),
     display=False)
glue("limits", Markdown(report.audit_limits_text(default_models=all(m in ZOO_MODELS for m in models),
                                                  paper_corpus=corpus_source.is_paper_corpus,
                                                  family_sizes=dict(zip(verdicts.model, verdicts.cells)),
                                                  paper_family=int(paper_counts.cells.iloc[0]), mode=mode)),
     display=False)

# %% [markdown]
# {glue:md}`comparison_text`
#
# {glue:md}`limits`

# %% [markdown]
# ## Traceability
# Every cell is a set of pairs of raw records.

# %%
first = table.iloc[0]
example = cells[(cells.model == first.model) & (cells.ranking == first.ranking) & (cells.layer == first.layer)]

# %% tags=["remove-input"]
display(Markdown(report.traceability_caption(first.model, first.ranking, first.layer)))
shown = {"seq_id": "{}", "t": "{}", "expert_high": "{}", "expert_low": "{}", "value_high": "{:.3g}",
         "value_low": "{:.3g}", "delta_loss_high": "{:+.3g}", "delta_loss_low": "{:+.3g}", "diff": "{:+.3g}"}
names = {c: c.replace("_", "_\u200b") for c in shown}  # the caption's names, allowed to wrap after "_"
_ = report.show_table(example[list(shown)].head(5), labels=names, formats={names[c]: f for c, f in shown.items()})

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** For each model, whether ranking the active experts at a token by a population-level
# statistic (computed over the whole corpus before any ablation) predicts which single-expert
# ablation hurts that token's prediction more *by enough to be detected* at this sample size and
# correction, with the uncertainty of each effect and the verdict under each multiple-comparison
# rule. {glue:md}`short_verdict`
#
# **Does not show.** That a metric is useless for pruning: the audit removes one expert at one
# token, while pruning removes experts everywhere (see the progressive-ablation chapter), and a
# null test is weak evidence for a null unless the equivalence test says the effect is small.
# {glue:md}`design_short`
# With the book's default small models, the numbers describe those models, not the paper's
# checkpoints; re-run this chapter with `models` set to the real checkpoint ids on a GPU for that.
#
# ## Exercises
#
# ````{exercise} 1. Fewer positions
# :label: 04_audit-ex1
# :nonumber:
#
# Before running {glue:md}`fewer_cmd` (a quarter of this run's positions), compute the smallest
# $\lvert d_z\rvert$ that the paired t-test would then detect with the run's power in the first
# model's family, at its Bonferroni level, with `moeaudit.stats.min_detectable_dz`. By what factor do
# the confidence intervals widen? Check your smallest detectable effect in the downloaded notebook with
# `exercises.check_04_audit_1(answer, verdicts, n_positions=n_positions, alpha=alpha, power=power)`
# (`from moeaudit.chapters import exercises`).
# ````
#
# ````{solution} 04_audit-ex1
# :class: dropdown
#
# The confidence intervals widen by about a factor of {glue:text}`ci_widen:.1f` (the square root of
# the ratio of sample sizes), and the smallest detectable effect of the first model's family rises
# from {glue:text}`mde_now:.3f` to {glue:text}`mde_fewer:.3f`, so a non-significant cell says even
# less.
# ````
#
# ````{exercise} 2. One layer
# :label: 04_audit-ex2
# :nonumber:
#
# Predict the family size, the Bonferroni level and which numbers of the table stay the same, then
# run {glue:md}`one_layer_cmd`.
# ````
#
# ````{solution} 04_audit-ex2
# :class: dropdown
#
# The family shrinks to {glue:text}`one_layer_family` cells with Bonferroni level
# {glue:text}`one_layer_alpha:.4g`; $d_z$, $p_t$ and $p_W$ of each metric at that layer equal those
# in the table above to the printed precision (same positions, same ablations); only the corrected
# verdicts can change.
# ````
#
# ````{exercise} 3. The other definition of the ablation
# :label: 04_audit-ex3
# :nonumber:
#
# Predict which cells cannot change when every ablation follows the other definition
# ({glue:md}`other_mode_words`), then run {glue:md}`other_mode_cmd`.
# ````
#
# ````{solution} 04_audit-ex3
# :class: dropdown
#
# The cells of each model's last decoder layer (where it is audited) are unchanged: at the last
# layer nothing later attends to the earlier positions, so removing the expert there as well cannot
# reach position t. Earlier layers change (the intervention-definitions chapter measures by how much).
# ````

# %% tags=["remove-input"]
lead = verdicts.iloc[0]
n_first = int(lead.cells)
glue("mde_now", float(lead.min_detectable_dz), display=False)
n_fewer = exercises.quarter_positions(n_positions)  # a quarter of this run's positions
run_defaults = book.notebook_parameters("04_audit")
run_now = {k: globals()[k] for k in run_defaults}
command = lambda changes: Markdown(f"`{report.chapter_command('04_audit', changes, current=run_now, defaults=run_defaults)}`")  # noqa: E731
glue("fewer_cmd", command({"n_positions": n_fewer}), display=False)
glue("mde_fewer", stats.min_detectable_dz(n_fewer, alpha=alpha / n_first, power=power), display=False)
glue("ci_widen", (n_positions / n_fewer) ** 0.5, display=False)
last_layer = int(max(table[table.model == lead.model].layer))
glue("one_layer_cmd", command({"models": [lead.model], "layers": [last_layer]}), display=False)
other = "sequence" if mode == "token" else "token"
glue("other_mode_cmd", command({"mode": other}), display=False)
glue("other_mode_words", Markdown("the expert removed at every position of the prefix where it is routed, as the released "
                                  "code does" if other == "sequence" else "the expert removed at the audited token only, "
                                  "as the paper defines it"), display=False)
glue("one_layer_family", len(METRICS), display=False)
glue("one_layer_alpha", alpha / len(METRICS), display=False)
glue("short_verdict", Markdown(report.family_verdict_text(verdicts, short=True)), display=False)
glue("design_short", Markdown(report.design_sensitivity_text(verdicts, table, short=True)
                              or "On this run no family has a defined effect to compare."), display=False)
