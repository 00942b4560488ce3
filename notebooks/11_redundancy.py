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
# # Beyond the paper (3): does redundancy explain the null?

# %% tags=["parameters", "hide-input"]
models = ["olmoe-e64-k2-s0", "olmoe-e64-k2-s1", "olmoe-e64-k4-s0", "olmoe-e64-k4-s1", "olmoe-e64-k8-s0",
          "olmoe-e64-k8-s1", "olmoe-e64-k16-s0", "olmoe-e64-k16-s1", "olmoe-e8-k2-s0", "olmoe-e8-k2-s1"]  # the redundancy family, or your own models that differ in routing
layers = None  # None: five depth-proportional MoE layers (every MoE layer of a 4-layer model); or a list used for every model
n_positions = 200  # token positions per cell (the paper: 200)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
min_context = 0
batch_size = 64
alpha = 0.05  # family-wise level of each model's audit and control; level of the trend and seed tests
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "released"  # "released": each text as the corpus serves it (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import params, report

params.validate("11_redundancy", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)

# %% [markdown]
# The paper explains its null result by redundancy. Removing all but one of the active experts
# at OLMoE's early layers leaves the loss almost unchanged, so at most tokens no single expert
# matters much, and "the metric and the random baseline are doing the same thing"
# {cite}`engmann2026audit`. It leaves open whether the observational metrics regain validity where
# redundancy is low, as in Switch-style or Mixtral-like routing with few active experts, and it
# calls for "controlled checkpoint variation" within one architecture. A few public checkpoints
# that differ in everything cannot answer that. This chapter uses a family of small models that
# differ in **one** factor.
#
# **The family.** Small `OlmoeForCausalLM` models trained from scratch on the same data, with the
# same tokenizer, width, depth, steps and seed policy. They differ only in routing:
# {glue:md}`family_settings`. Each setting is trained from {glue:md}`family_seeds`, so the spread
# between trainings of the same setting is measured beside the effect of the setting. Their
# recipes and quality gates are in appendix A1.
#
# **Protocol.** For every model, the book's machinery runs unchanged:
# - the audit of the observational metrics (chapter 4);
# - the routing-weight control (chapter 5);
# - progressive ablation (chapter 6).
#
# All three use the same positions policy: one seeded draw of {glue:text}`n_positions`
# positions per model, shared by all three. Each model is its own Bonferroni family, as in the
# paper: metrics × audited layers for the audit, one cell per layer for the control. Across
# models, the chapter asks:
# 1. Does any observational metric become valid as redundancy falls?
# 2. Does the control's signal grow as redundancy falls?
# 3. Is the spread between seeds smaller than the effect of the setting?
# 4. Where does the paper's explanation hold, and where not?

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.lines import Line2D
from myst_nb import glue

from moeaudit import redundancy, report, stats
from moeaudit.audit import paired_cells, prepare, progressive_records, progressive_summary, single_expert_records
from moeaudit.metrics import METRICS, ROUTING_WEIGHT

from moeaudit.zoo import REDUNDANCY_SEEDS, REDUNDANCY_SETTINGS

report.use_book_style()
glue("n_positions", n_positions, display=False)
ratio_names = {(64, 8): " (OLMoE's ratio)", (8, 2): " (Mixtral's ratio)"}
glue("family_settings", Markdown(report.join_words(f"{E} routed experts with top-{k}{ratio_names.get((E, k), '')}"
                                                   for E, k in REDUNDANCY_SETTINGS)), display=False)
glue("family_seeds", Markdown(f"{len(REDUNDANCY_SEEDS)} seeds ({report.join_words(REDUNDANCY_SEEDS)})"), display=False)

# %% [markdown]
# ## The records
# Every model gets single-expert ablations of every active expert at each position and audited
# layer; the four metrics and the control are read from them. It also gets progressive
# ablations, the k highest-weight active experts removed together, for every k from one expert
# to all but one.
# Records are cached under a key made of every parameter that produced them.

# %%
single, prog, observational_cells, control_cells, layouts, intros, contexts_hidden = [], [], [], [], {}, [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    lay = layouts[name] = ctx.model.layout
    contexts_hidden[name] = ctx.model.hf.config.hidden_size
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    depth = dict(zip(audited, report.relative_depth(audited, lay.moe_layers)))
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=min_context, batch_size=batch_size)
    single.append(rec)
    for rankings, sink in ((list(METRICS), observational_cells), ([ROUTING_WEIGHT], control_cells)):
        c = paired_cells(rec, ctx.metrics, rankings=rankings)
        sink.append(c.assign(rel_depth=c.layer.map(depth)))
    prog.append(progressive_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                    min_context=min_context, batch_size=batch_size).assign(rel_depth=lambda r: r.layer.map(depth)))
    intros.append(report.model_summary(name, ctx, audited, rec))
single, prog = pd.concat(single, ignore_index=True), pd.concat(prog, ignore_index=True)
members = redundancy.member_table(layouts)
shapes = sorted({(lay.n_layers, int(contexts_hidden[n])) for n, lay in layouts.items()})
glue("run_shape", Markdown(report.join_words(f"{L} decoder layers and hidden size {H}" for L, H in shapes)), display=False)
n_seeds = members.seed.nunique()
glue("n_seeds_run", Markdown(f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"), display=False)
glue("intros", Markdown("\n\n".join(intros)), display=False)
display(members.style.hide(axis="index").format({"k_over_E": "{:.3f}"})
        .set_caption("The models of this run: routed experts E, top-k, the active share k/E and the training seed"))

# %% [markdown]
# ````{admonition} The models and their records
# :class: dropdown
# {glue:md}`intros`
# ````

# %% [markdown]
# ## Per-cell statistics
# The same tests as chapters 4 and 5. Each cell gets a paired t-test with Cohen's $d_z$ and its
# exact 95% CI, plus the Wilcoxon signed-rank test. A cell is *valid* in the sense of the paper's
# Definition 2.1 when both tests pass at the model's Bonferroni level with the same, positive
# sign.

# %%
cells_obs = pd.concat(observational_cells, ignore_index=True)
cells_ctl = pd.concat(control_cells, ignore_index=True)
audit = stats.audit_table(cells_obs, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                          low_col="delta_loss_low", family=("model",), alpha=alpha)
control = stats.audit_table(cells_ctl, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                            low_col="delta_loss_low", family=("model",), alpha=alpha)
depths = cells_obs[["model", "layer", "rel_depth"]].drop_duplicates()
audit, control = audit.merge(depths, on=["model", "layer"]), control.merge(depths, on=["model", "layer"])
validity = redundancy.validity_by_model(audit)
prog_summary = progressive_summary(prog, alpha=alpha)
summary = redundancy.model_summary(members, audit=audit, control=control, single=single, progressive=prog)
display(summary.drop(columns=["k_over_E"]).style.hide(axis="index").format(precision=3)
        .set_caption("Per model: " + "; ".join(f"{k} = {v}" for k, v in redundancy.QUANTITIES.items())))
report.show_untested_note(audit)
_ = report.show_untested_note(control, what="layer")

# %% [markdown]
# ## Effect sizes against redundancy
# Each point is one cell, a (model, layer) pair, with its 95% CI. The x-axis is the active share
# k/E, on a log scale; the seeds of a setting sit side by side, and colour gives the layer's
# relative depth. Points above zero mean the ranking predicts correctly: the expert it ranks
# higher costs more to remove. The last panel is the routing-weight control.

# %% tags=["hide-input"]
def effect_panel(ax, t: pd.DataFrame, title: str) -> None:
    t = t.merge(members[["model", "k_over_E", "seed"]], on="model")
    seeds = sorted(members.seed.dropna().unique())
    cmap = plt.get_cmap("viridis")
    for r in t.itertuples():
        shift = 1.0 + 0.12 * ((seeds.index(r.seed) if r.seed in seeds else 0) - (len(seeds) - 1) / 2) + 0.03 * (r.rel_depth - 0.5)
        x = r.k_over_E * shift
        ax.errorbar(x, r.cohens_dz, yerr=[[r.cohens_dz - r.dz_ci_low], [r.dz_ci_high - r.cohens_dz]], fmt="o" if r.seed == seeds[0] else "s",
                    color=cmap(r.rel_depth), markersize=4, elinewidth=0.8, capsize=0)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks(sorted(members.k_over_E.unique()))
    ax.set_xticklabels([f"{v:.3g}" for v in sorted(members.k_over_E.unique())], rotation=45)
    ax.minorticks_off()
    ax.set_title(title)
    ax.set_xlabel("k / E (active share)")


panels = [(audit[audit.ranking == m], m.replace("_", " ")) for m in METRICS] + [(control, "control: routing weight")]
fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.9), sharey=True)
for ax, (t, title) in zip(axes, panels):
    effect_panel(ax, t, title)
axes[0].set_ylabel("Cohen's $d_z$ (95% CI)")
seeds = sorted(members.seed.dropna().unique())
handles = [Line2D([], [], marker="o" if s == seeds[0] else "s", linestyle="", color="0.3", label=f"seed {s}") for s in seeds]
handles += [Line2D([], [], marker="o", linestyle="", color=plt.get_cmap("viridis")(float(d)), label=f"relative depth {d:g}") for d in (0.0, 0.5, 1.0)]
fig.legend(handles=handles, loc="center right", fontsize=8)
fig.suptitle("Audit and control effect per cell against the active share of experts")
fig.tight_layout(rect=(0, 0, 0.9, 1))
plt.show()

# %% [markdown]
# ## Progressive ablation and the gap norm against redundancy
# Left: the mean loss change with all active experts but one removed, per audited layer, against
# top-k, with its confidence interval. At the smallest top-k that removes a single expert; at
# the largest it removes all but one of many. Right: the mean gap norm $\lVert y_t - y_t^{(-e)}\rVert$ of a single-expert ablation, by
# layer, relative to the model's first audited layer. This is the paper's measure of how an
# expert's contribution grows with depth.

# %% tags=["hide-input"]
deepest = prog_summary[prog_summary.k == prog_summary.groupby("model").k.transform("max")].merge(members, on="model")
growth = redundancy.gap_growth(single).merge(members, on="model")
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
settings = list(dict.fromkeys(members.sort_values(["n_experts", "top_k"]).setting))
colors = dict(zip(settings, sns.color_palette("colorblind", len(settings))))
for r in deepest.itertuples():
    marker = "o" if r.seed == seeds[0] else "s"
    x = r.top_k * (1 + 0.06 * (seeds.index(r.seed) if r.seed in seeds else 0)) * (1 + 0.02 * r.layer)
    left.errorbar(x, r.mean, yerr=[[r.mean - r.ci_low], [r.ci_high - r.mean]], fmt=marker, color=colors[r.setting],
                  markersize=4, elinewidth=0.8)
left.set_xscale("log", base=2)
left.set_xticks(sorted(members.top_k.unique()))
left.set_xticklabels(sorted(members.top_k.unique()))
left.minorticks_off()
left.axhline(0, color="0.3", linewidth=0.8)
left.set_xlabel("top-k (deepest removal: k − 1 experts)")
left.set_ylabel(f"mean ΔL (nats), {1 - alpha:.0%} CI")
left.set_title("Deepest removal")
for (model, setting, seed_), g in growth.groupby(["model", "setting", "seed"], sort=False):
    right.plot(g.layer, g.growth, marker="o" if seed_ == seeds[0] else "s", linestyle="-" if seed_ == seeds[0] else "--",
               color=colors[setting], label=f"{setting}, seed {seed_}")
right.set_yscale("log")
right.set_xlabel("decoder layer")
right.set_ylabel("mean gap norm / first audited layer's")
right.set_title("Gap-norm growth with depth")
right.legend(fontsize=7, ncol=2)
fig.suptitle("Redundancy and depth: what removing experts does, per routing setting")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Setting against seed
# For each per-model quantity, a one-way ANOVA with the routing setting as the factor and the
# seeds as replicates (`moeaudit.redundancy.setting_anova`). It asks whether the setting means
# differ by more than trainings of one setting do. Beside it: the standard deviation of the
# setting means and the pooled seed standard deviation.

# %%
anova = redundancy.setting_anova(summary)
display(anova.style.hide(axis="index").format(precision=3, na_rep="—"))

# %% [markdown]
# ## The explanation's predictions
# If redundancy hides single experts' effects, three things should happen as top-k grows at a
# fixed number of experts (the family's most common one):
# - a single-expert ablation should cost less;
# - the control's signal should weaken;
# - the observational metrics should lose whatever validity they have at small k.
#
# Each row is an ordinary least-squares trend of the per-model values on $\log_2 k$, with both
# seeds as points (`moeaudit.redundancy.explanation_checks`). `holds` says whether the observed
# direction at level α is the predicted one.

# %%
checks = redundancy.explanation_checks(summary, alpha=alpha)
display(checks.drop(columns=["quantity", "ks", "value"], errors="ignore").style.hide(axis="index").format(precision=3, na_rep="—"))
answers = redundancy.answer_text(summary, validity, anova, checks, alpha=alpha)
for key, text in answers.items():
    glue(f"answer_{key}", Markdown(text), display=False)

# %% [markdown]
# ## Answers
# **1. Does any observational metric become valid as redundancy falls?** {glue:md}`answer_validity`
#
# **2. Does the control's signal grow?** {glue:md}`answer_control`
#
# **3. Is the seed spread smaller than the effect of the setting?**
#
# ```{glue:md} answer_seeds
# :format: myst
# ```
#
# **4. Where does the paper's explanation hold?** Each prediction, tested as a trend of the
# per-model values against top-k at the family's most common number of experts:
#
# ```{glue:md} answer_explanation
# :format: myst
# ```

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** It shows how the book's audit, control and progressive ablation change when one
# factor, the number of active experts, changes and everything else is held fixed, and whether
# that change exceeds the difference between two trainings of the same setting. This is the
# controlled checkpoint variation the paper asks for, at a scale where it can be run on a laptop.
#
# **Does not show.** It does not show the behaviour of large models. The models of this run have
# {glue:md}`run_shape`, and they are trained for minutes. Redundancy in a trained 7B model may
# come from width and depth as much as from top-k. A few seeds give a spread, not a
# distribution: a setting effect that beats {glue:md}`n_seeds_run` could still lose against many. The family varies k at fixed
# expert width, so the active parameters per token grow with k; a design that keeps the active
# parameters fixed (finer experts at larger k) would separate the number of active experts from
# the active compute.
#
# ## Exercises
# **1. One seed.** Run the chapter on the seed-0 models only:
#
# ```bash
# make chapter NB=11_redundancy PARAMS="-p models '[\"olmoe-e64-k2-s0\", \"olmoe-e64-k4-s0\", \"olmoe-e64-k8-s0\", \"olmoe-e64-k16-s0\", \"olmoe-e8-k2-s0\"]'"
# ```

# %% [markdown]
# ````{admonition} Expected result
# :class: dropdown
# The records are reused from the cache. The ANOVA table shows no F and no p: with one model per
# setting there is no seed spread to compare with. The trends are fitted on
# {glue:text}`ex1_n` points instead of {glue:text}`ex1_n_all`. The control's slope becomes
# {glue:md}`ex1_slope`. A conclusion that rests on one seed per setting cannot tell a setting
# effect from a training accident.
# ````

# %% [markdown]
# **2. Fewer positions.** Run with `-p n_positions 50`:
#
# ```bash
# make chapter NB=11_redundancy PARAMS="-p n_positions 50"
# ```

# %% [markdown]
# ````{admonition} Expected result
# :class: dropdown
# A new, smaller draw of positions, so the records are computed afresh (about
# {glue:text}`ex2_work:.0%` of the work). Every confidence interval of the effect figure widens by
# about a factor of {glue:text}`ex2_widen:.1f` (the square root of the ratio of sample sizes), and
# the first model's smallest detectable $d_z$ at its Bonferroni level rises from
# {glue:text}`ex2_mde_now:.3f` to {glue:text}`ex2_mde_50:.3f`.
# ````

# %% tags=["hide-input"]
one_seed = summary[summary.seed == summary.seed.min()]
glue("ex1_n", int((one_seed.n_experts == one_seed.n_experts.mode().iloc[0]).sum()), display=False)
glue("ex1_n_all", int((summary.n_experts == summary.n_experts.mode().iloc[0]).sum()), display=False)
try:
    tr = redundancy.trend_against_k(one_seed, quantity="control_mean_dz")
    glue("ex1_slope", Markdown(f"{tr['slope']:+.3f} per doubling of k (p = {tr['p']:.2g}), against "
                               f"{checks.set_index('check').loc['control signal shrinks with k', 'slope']:+.3f} with both seeds"),
         display=False)
except ValueError as err:
    glue("ex1_slope", Markdown(f"undefined ({err})"), display=False)
fam = int(audit[audit.model == models[0]].family_size.iloc[0])
glue("ex2_mde_now", stats.min_detectable_dz(n_positions, alpha=alpha / fam), display=False)
glue("ex2_mde_50", stats.min_detectable_dz(50, alpha=alpha / fam), display=False)
glue("ex2_work", 50 / n_positions, display=False)
glue("ex2_widen", (n_positions / 50) ** 0.5, display=False)
