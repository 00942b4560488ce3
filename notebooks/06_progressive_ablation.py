# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Progressive ablation: how much redundancy does a layer have?
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - measure a layer's redundancy by removing its highest-weight experts together;
# - read where a layer breaks, and how that depends on a threshold the paper does not state;
# - separate the threshold-free part of the evidence from the threshold-dependent one.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: every MoE layer of each model (the paper, for OLMoE: [0, 1, 7, 8, 9, 15]); or a list used for every model
n_positions = 200  # token positions per (layer, k) cell (the paper: 500)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
min_context = 0
batch_size = 64
alpha = 0.05  # 1 - confidence level of the intervals on the mean
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)
cliff_threshold = 0.1  # mean loss increase (nats) that counts as a layer "breaking"

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("06_progressive_ablation", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("06_progressive_ablation"))

# %% [markdown]
# The audit removes *one* active expert at a token and does not detect that the population-level
# rankings predict which of the active experts costs more to remove (at its Bonferroni level and
# {glue:text}`n_positions` positions per cell, the paired t-test misses an effect below
# |$d_z$| ≈ {glue:md}`audit_mde` more often than one time in five), although at some tokens the two experts' costs differ considerably. The paper reads this as a property of
# the regime, not of the metrics: if a layer's active experts are largely redundant, removing
# any few of them costs little on average, and every selection criterion looks equally good. This chapter tests the premise directly
# (Section 3 "Progressive ablation", Appendix C and Tables 8–9 of {cite}`engmann2026audit`).
#
# **Protocol.** At each sampled token position and layer, the active routed experts are ordered
# by their combine weight at that token, and the $k$ highest-weighted ones are removed together,
# for $k = 1, \dots, \text{top-}k - 1$ (at least one routed expert always stays; shared experts
# are never touched). The recorded quantity is the *cumulative* loss change
# $\Delta\mathcal{L}(k) = \mathcal{L}_t^{(-\{e_1..e_k\})} - \mathcal{L}_t$ in nats, where
# $\mathcal{L}_t = -\log p(x_{t+1}\mid x_{\le t})$. Removal means that the experts' combine weights
# are set to zero at token $t$ inside the forward pass (the same nnsight intervention as the
# single-expert audit, {cite}`fiottokaufman2025nnsight`); the remaining weights are not
# renormalised.
#
# The paper removes the experts with the *highest* combine weight at the token first: the model
# weighs their outputs most (which is not necessarily the largest removed output: an expert's
# output vector can be larger than that of an expert with a higher weight), so if even these can go without
# a large loss change, the layer's output at that token does not rest on them alone. A **redundancy cliff** is a removal
# depth $k$ at which the loss change jumps instead of growing slowly.
#
# **Positions.** The positions are the audit's: one seeded draw per model, shared with the
# single-expert audit and the routing-weight control; this run uses {glue:text}`n_positions`
# positions per (layer, $k$) cell, against the paper's {glue:text}`paper_n` on
# {glue:text}`paper_n_layers` OLMoE layers.
# The paper's released run drew one position per text and required some context before it; set
# `min_context=32`, the released minimum, to exclude short contexts here as well (this run:
# `min_context` = {glue:text}`min_context`).

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.lines import Line2D
from myst_nb import glue

from moeaudit import released, report, stats
from moeaudit.chapters.progressive import (buffer_readings, cliff_comparison_text, cliff_text,
                                           deepest_removal_summary, interval_widening, paper_progressive_table,
                                           paper_share_positive_text, progressive_overview_text,
                                           redundancy_breaks, removal_direction, threshold_calls)
from moeaudit.report import fmt_signed
from moeaudit.audit import prepare, progressive_records, progressive_summary
from moeaudit.corpus import valid_positions
from moeaudit.metrics import METRICS

report.use_book_style()
paper = paper_progressive_table()
for key, value in {"n_positions": n_positions, "paper_n": int(paper.n.iloc[0]), "min_context": min_context,
                   "paper_n_layers": int(paper.layer.nunique()),
                   "alpha_pct": f"{1 - alpha:.0%}", "threshold": cliff_threshold}.items():
    glue(key, value, display=False)

# %% [markdown]
# ## Run the ablations
# One record per (position, layer, $k$). Records are cached under a key made of every parameter
# that produced them, so re-running the page reuses them.

# %%
all_records, layouts, audited_layers, eligible, audit_family = [], {}, {}, {}, {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    lay = layouts[name] = ctx.model.layout
    audited = audited_layers[name] = list(layers) if layers is not None else list(lay.moe_layers)
    # the single-expert audit's family (chapter 4 at its defaults): its audited layers x the four metrics
    audit_family[name] = len(ctx.model.audit_layers()) * len(METRICS)
    eligible[name] = {c: len(valid_positions(ctx.corpus, min_context=c)) for c in (min_context, 32)}
    rec = progressive_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                              min_context=min_context, batch_size=batch_size)
    all_records.append(rec)
    display(Markdown(audit.model_summary(name, ctx, audited, rec,
                                          what=f"ablation records (k = 1 to {lay.top_k - 1} experts removed)")))
records = pd.concat(all_records, ignore_index=True)

# %% tags=["remove-input"]
# the single-expert audit's family per model (chapter 4's layers, not this chapter's) at this run's n_positions
_mde = [stats.min_detectable_dz(n_positions, alpha=alpha / audit_family[m]) for m in models]
glue("audit_mde", Markdown(f"{min(_mde):.2f}" if f"{min(_mde):.2f}" == f"{max(_mde):.2f}"
                           else f"{min(_mde):.2f}–{max(_mde):.2f}"), display=False)

# %% [markdown]
# ## Summary statistics per (layer, k)
# For every model, layer and removal depth (the first rows are shown; `summary` holds them all):
# the mean cumulative loss change with a Student-t
# interval at confidence level {glue:text}`alpha_pct` (parameter `alpha`), the median, and the
# 5th and 95th percentiles (P5, P95), all over positions and in nats
# (`moeaudit.audit.progressive_summary`).

# %%
summary = progressive_summary(records, alpha=alpha)

# %% tags=["remove-input"]
head = summary.head().assign(ci=lambda d: [f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(d.ci_low, d.ci_high)],
                             clean=lambda d: [f"{v:.3f}" for v in d.clean_loss])
labels = {"mean": "mean ΔL", "ci": f"{1 - alpha:.0%} CI of the mean", "p05": "P5", "p95": "P95", "clean": "mean clean loss"}
same = [c for c in ("model", "layer", "n", "clean") if head[c].nunique() == 1]  # named once, in the caption
_ = report.show_table(
    head[[c for c in ("model", "layer", "k", "n", "mean", "ci", "median", "p05", "p95", "clean") if c not in same]],
    labels=labels, formats={c: "{:+.3f}" for c in ("mean ΔL", "median", "P5", "P95")},
    caption="The first rows of summary: " + ", ".join({"model": "{}", "layer": "layer {}", "n": "n = {}",
                                                       "clean": "mean clean loss {}"}[c].format(head[c].iloc[0])
                                                      for c in same) + " (ΔL and losses in nats)")

# %% [markdown]
# ## Mean cumulative loss change (the paper's Table 8)
# Rows: number $k$ of highest-weight active experts removed; columns: layers. Values are mean
# $\Delta\mathcal{L}$ in nats over the positions; the shading runs from the smallest to the largest
# value within each table.

# %% tags=["hide-input"]
for name in models:
    s = summary[summary.model == name]
    tab = s.pivot(index="k", columns="layer", values="mean").rename(columns=lambda c: f"L{c}")
    display(Markdown(f"### {name}"))
    display(tab.style.format(fmt_signed).background_gradient(cmap="Blues", axis=None)
            .set_caption(f"{name}: mean cumulative ΔL (nats) under progressive ablation of the k highest-weight "
                         f"active experts; n = {int(s.n.min())} positions per cell.")
            .set_properties(**{"text-align": "center"}))

# %% [markdown]
# ## The distribution at the deepest removal (the paper's Table 9)
# At $k = \text{top-}k - 1$ (all active experts but one removed), per layer
# (`moeaudit.chapters.progressive.deepest_removal_summary`). A mean far above the median means the increase is
# carried by a minority of positions; the last rows quantify that tail. The sign-test row asks
# whether the removal pushes the loss one way at more than half of the positions
# (`moeaudit.chapters.progressive.removal_direction`: a two-sided sign test of the positions where the loss rose
# against those where it fell, `moeaudit.stats.sign_test`, at the Bonferroni level `alpha` divided
# by the model's number of layers): a test of the median shift. Where it is not significant, the
# share of positions where the loss fell is not distinguishable from one half; the mean can still
# be raised by a minority of positions with large increases, which the interval of the mean (at
# the same Bonferroni level) shows.

# %%
deepest = removal_direction(deepest_removal_summary(records, threshold=cliff_threshold), alpha=alpha)
share_cols = {"share_above": f"share above {cliff_threshold:g} nats", "share_below_zero": "share below 0 (loss fell)",
              "p_sign": "sign test p (rose vs fell)", "top5_share": "top-5% share of increase"}

# %% tags=["hide-input"]
for name in models:
    d = deepest[deepest.model == name].set_index("layer")
    tab = d[["mean", "median", "p05", "p95", *share_cols]].rename(columns={**share_cols, "mean": "Mean",
                                                                          "median": "Median", "p05": "P5", "p95": "P95"}).T
    tab.columns = [f"L{c}" for c in tab.columns]
    display(Markdown(f"### {name} (k = {int(d.k.iloc[0])})"))
    display(tab.style.format(fmt_signed, subset=pd.IndexSlice[["Mean", "Median", "P5", "P95"], :])
            .format("{:.0%}", subset=pd.IndexSlice[[v for c, v in share_cols.items() if c != "p_sign"], :])
            .format("{:.2g}", subset=pd.IndexSlice[[share_cols["p_sign"]], :])
            .set_caption(f"{name}: cumulative ΔL (nats) at k = {int(d.k.iloc[0])}, n = {int(d.n.min())} positions per "
                         f"layer; sign test at the Bonferroni level {alpha:g}/{len(d)} = {alpha / len(d):.3g}")
            .set_properties(**{"text-align": "center"}))

# %% [markdown]
# *Conventions.* Positive values mean the prediction got worse. The paper reports the median and
# P95 only; P5 and the share below zero show the other tail, positions where removing the experts
# *lowered* the loss, which the mean nets against the increases. "Share above": fraction of
# positions whose loss rose by more than `cliff_threshold` ({glue:text}`threshold` nats). "Top-5%
# share of increase": of the summed positive loss increases, the fraction contributed by the
# positions above the 95th percentile (`moeaudit.chapters.progressive.tail_share`). If every position whose loss
# rose had risen by the same amount, it would be about a twentieth divided by the share of positions
# that rose (a tenth when half of them rose); values near one mean that a few positions carry
# everything.

# %% [markdown]
# ## The redundancy cliff
# First figure: mean cumulative loss change against $k$, one line per layer, with the confidence
# interval of the mean. Second figure: the same positions summarised by their median (dashed), P95
# (solid) and P5 (dash-dotted). A layer with a redundancy buffer stays low as experts are
# removed while the removals still raise the mean loss; a cliff is a sharp rise. A line that
# stays near zero does not by itself show a buffer: removals whose mean effect is not
# distinguishable from zero stay near zero too (the interval of the mean at the Bonferroni level,
# used for the buffer reading below, tells the two apart). The dotted line is `cliff_threshold`.

# %% tags=["hide-input"]
all_layers = sorted({L for v in audited_layers.values() for L in v})  # one colour per layer index, in both figures
layer_colors = dict(zip(all_layers, sns.color_palette("colorblind", len(all_layers))))
K_LABEL = "k = number of highest-weight experts removed"


def layer_legend(ax, styles=()):
    """Legend entries on the first panel (finish_panels draws its legend): layers, then line styles."""
    for L in all_layers:
        ax.plot([], [], color=layer_colors[L], marker="o", label=f"L{L}")
    for label, kw in styles:
        ax.plot([], [], color="0.3", label=label, **kw)


fig, axes = report.model_panels(models, height=3.2 if len(models) % 2 else 4.2)  # taller when the legend goes below
for ax, name in zip(axes, models):
    s = summary[summary.model == name]
    for L in audited_layers[name]:
        g = s[s.layer == L].sort_values("k")
        ax.plot(g.k, g["mean"], marker="o", color=layer_colors[L])
        ax.fill_between(g.k, g.ci_low, g.ci_high, color=layer_colors[L], alpha=0.18, linewidth=0)
    ax.axhline(cliff_threshold, color="0.3", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(1, layouts[name].top_k))
layer_legend(axes[0])
report.finish_panels(fig, axes, title="Progressive ablation: mean loss change as the top-weighted active experts are removed",
                     ylabel=f"mean ΔL (nats), {1 - alpha:.0%} CI", xlabel=K_LABEL, zero_line=True)

# %% tags=["hide-input"]
fig, axes = report.model_panels(models, height=3.2 if len(models) % 2 else 4.2)  # taller when the legend goes below
for ax, name in zip(axes, models):
    s = summary[summary.model == name]
    for L in audited_layers[name]:
        g = s[s.layer == L].sort_values("k")
        ax.plot(g.k, g.p95, marker="o", color=layer_colors[L])
        ax.plot(g.k, g["median"], marker=".", linestyle="--", color=layer_colors[L])
        ax.plot(g.k, g.p05, marker="v", markersize=4, linestyle="-.", color=layer_colors[L])
    ax.axhline(cliff_threshold, color="0.3", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(1, layouts[name].top_k))
layer_legend(axes[0], styles=[("P95", dict(marker="o")), ("median", dict(marker=".", linestyle="--")),
                              ("P5", dict(marker="v", markersize=4, linestyle="-.")), ("threshold", dict(linestyle=":"))])
report.finish_panels(fig, axes, title="Progressive ablation: P5, median and P95 of the loss change",
                     ylabel="P5, median and P95 of ΔL (nats)", xlabel=K_LABEL, zero_line=True)

# %% [markdown]
# ## Where does a layer break?
# Three descriptions of each layer's trajectory (`moeaudit.chapters.progressive.redundancy_breaks`): the first
# $k$ at which the mean loss change crosses `cliff_threshold` (none if it never does), the
# largest single step $\overline{\Delta\mathcal{L}}(k) - \overline{\Delta\mathcal{L}}(k-1)$ (with
# $\overline{\Delta\mathcal{L}}(0) = 0$) and where it occurs, and the mean at the deepest removal
# relative to the mean clean loss of the same positions.

# %%
breaks = redundancy_breaks(summary, threshold=cliff_threshold)
calls = threshold_calls(summary, threshold=cliff_threshold)

# %% tags=["remove-input"]
for name in models:
    b = breaks[breaks.model == name].drop(columns="model")
    b["first_k_above"] = ["none" if pd.isna(v) else f"{int(v)}" for v in b.first_k_above]
    report.show_table(b, caption=f"{name}: where each layer breaks "
                      f"(threshold {cliff_threshold:g} nats; ΔL and losses in nats)", max_rows=None,
                      labels={"first_k_above": "first k above", "largest_step": "largest step", "largest_step_k": "at k",
                              "mean_deepest": "mean ΔL at the deepest k", "clean_loss": "mean clean loss",
                              "ratio_to_clean": "deepest mean / clean loss"},
                      formats={"largest step": fmt_signed, "mean ΔL at the deepest k": fmt_signed,
                               "mean clean loss": "{:.3f}", "deepest mean / clean loss": "{:.1%}"})


# %% tags=["remove-input"]
display(Markdown("\n\n".join(cliff_text(*(t[t.model == name] for t in (breaks, deepest, calls)),
                                         threshold=cliff_threshold, alpha=alpha) for name in models)))

# %% [markdown]
# ## Reading the result against the paper
# In the paper's OLMoE ({glue:text}`paper_n` positions per cell), every audited layer but the
# last has a mean loss change of at most {glue:text}`paper_early_max:+.3f` nats at
# $k$ = {glue:text}`paper_kmax`, with {glue:text}`paper_kmax` of {glue:text}`paper_topk` active experts removed, while layer
# {glue:text}`paper_last` {glue:md}`paper_last_break` and reaches
# {glue:text}`paper_last_deep:+.3f` nats. At $k$ = {glue:text}`paper_kmax` (its Table 9) the
# median stays at or below {glue:text}`paper_median_max:+.3f` nats at every audited layer while its P95 reaches
# {glue:text}`paper_last_p95:+.3f` nats (against at most {glue:text}`paper_early_p95:+.3f`
# elsewhere): the cliff is a heavy tail of positions rather than a uniform shift (the paper
# prints no lower percentile, so whether positions whose loss fell form a comparable tail
# cannot be read from its tables). The released summary behind these tables also gives, per
# layer, the share of positions whose loss *rose* at $k$ = {glue:text}`paper_kmax`:
# {glue:md}`paper_share_positive`
#
# The argument built on it is structural: where a layer has a redundancy buffer (removing its
# experts raises the loss, but little), *any* selection criterion removes experts at little
# cost, so the observational metrics cannot be told apart by pruning outcomes there, and a
# token-level signal can only show where the buffer ends. For the
# models audited here, with the same threshold applied to the paper's Table 8:
#
# ```{glue:md} comparison
# :format: myst
# ```

# %% tags=["remove-input"]
paper_breaks = redundancy_breaks(paper, threshold=cliff_threshold).set_index("layer")
paper_last, kmax_paper = int(paper.layer.max()), int(paper.k.max())
p_last, p_deep = paper_breaks.loc[paper_last], paper[paper.k == kmax_paper].set_index("layer")
first = p_last.first_k_above
glue("paper_kmax", kmax_paper, display=False)
glue("paper_topk", kmax_paper + 1, display=False)
glue("paper_last", paper_last, display=False)
glue("paper_early_max", float(paper_breaks.drop(index=paper_last).mean_deepest.max()), display=False)
glue("paper_last_break", Markdown(f"crosses {cliff_threshold:g} nats at k = {first} (mean "
                                  f"{paper.set_index(['layer', 'k']).loc[(paper_last, first), 'mean']:+.3f})"
                                  if pd.notna(first) else f"never crosses {cliff_threshold:g} nats"), display=False)
glue("paper_last_deep", float(p_last.mean_deepest), display=False)
glue("paper_median_max", float(p_deep["median"].max()), display=False)
glue("paper_last_p95", float(p_deep.loc[paper_last, "p95"]), display=False)
glue("paper_early_p95", float(p_deep.drop(index=paper_last).p95.max()), display=False)
rel = released.progressive_ablation(data_dir=data_dir)
rel = rel[rel.k == kmax_paper]
glue("paper_share_positive", Markdown(paper_share_positive_text(rel, alpha=alpha)), display=False)


# %% tags=["remove-input"]
glue("comparison", Markdown("\n".join(cliff_comparison_text(
    *(t[t.model == name] for t in (breaks, deepest, calls)), paper_breaks.reset_index(),
    last=audited_layers[name][-1], threshold=cliff_threshold, alpha=alpha) for name in models)), display=False)

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** How much of a layer's active computation at a token can be removed, highest-weight
# experts first, before the next-token loss changes appreciably; at which layers and removal
# depths that tolerance ends; and whether the damage is spread over positions or concentrated in
# a tail. On the models of this run, {glue:md}`shows_summary`
#
# **Does not show.** What pruning would do. The ablation here removes experts at *one* token and
# keeps the rest of the sequence intact; pruning removes an expert at every token, in every
# sequence, usually followed by fine-tuning. Removing the highest-weight experts first is also
# only one order: a low-weight-first order would remove less combine weight at each $k$ (not
# necessarily less of the layer's output), a random order something in between. A mean that stays small does not mean that no position
# is hurt: the P95 and the share of positions whose loss *fell* show that small means net large
# changes of both signs. The means depend on the sampled positions (the intervals of the mean in the
# redundancy-cliff figure show how much), and whether a layer "breaks" depends on `cliff_threshold`, which the paper does
# not state. With the book's small models, the numbers describe those models, not the paper's
# OLMoE checkpoint.

# %% tags=["remove-input"]
glue("shows_summary", Markdown(progressive_overview_text(buffer_readings(breaks, deepest, calls, threshold=cliff_threshold), breaks,
                                                         threshold=cliff_threshold)), display=False)

# %% [markdown]
# ## Exercises
# Each exercise changes parameters only. Predict first, then run the command from the repository
# root and compare with the expected result.
#
# ````{exercise} 1. What counts as a cliff?
# :label: 06_progressive_ablation-ex1
# :nonumber:
#
# The verdict "layer L breaks at k" depends on a threshold that the
# paper does not state. Predict how the tables of "Where does a layer break?" change with
# `cliff_threshold 0.05`, then run
#
# ```bash
# make chapter NB=06_progressive_ablation PARAMS="-p cliff_threshold 0.05"
# ```
# ````

# %% [markdown]
# ````{solution} 06_progressive_ablation-ex1
# :class: dropdown
#
# The records are reused from the cache (the threshold only changes the summaries), so the run is
# quick. The largest-step column and the medians and percentiles do not change. The first $k$
# above the threshold becomes, per layer: {glue:md}`ex1_breaks` A description of a redundancy
# cliff that depends on an arbitrary threshold is weaker than one that does not: the largest step
# and the median/P95 contrast are the threshold-free part of the evidence.
# ````

# %% [markdown]
# ````{exercise} 2. How wide are the intervals?
# :label: 06_progressive_ablation-ex2
# :nonumber:
#
# Predict how the confidence bands of the first figure of the
# redundancy cliff change with `alpha 0.01` (a higher confidence level): compute the factor by which every
# interval's half-width is multiplied (the intervals are Student-t intervals of a mean over the
# run's positions) and check it in the downloaded notebook with
# `check_06_progressive_ablation_2(answer, n_positions=n_positions, alpha=alpha)`
# (`from moeaudit.chapters.progressive import check_06_progressive_ablation_2`). Then run
#
# ```bash
# make chapter NB=06_progressive_ablation PARAMS="-p alpha 0.01"
# ```
# ````

# %% [markdown]
# ````{solution} 06_progressive_ablation-ex2
# :class: dropdown
#
# The records are reused and the means do not move. Every interval's half-width is multiplied by
# the ratio of Student-t quantiles, {glue:text}`ex2_factor:.2f` at this run's
# {glue:text}`n_positions` positions; the widest half-width, now {glue:text}`ex2_now:.3f` nats,
# becomes {glue:text}`ex2_then:.3f`. {glue:md}`ex2_zero`
# ````

# %% [markdown]
# ````{exercise} 3. Enough context?
# :label: 06_progressive_ablation-ex3
# :nonumber:
#
# The paper's released progressive run used only positions with some context
# before them (`min_context=32`). Predict whether excluding short contexts raises or lowers the loss changes, then run
#
# ```bash
# make chapter NB=06_progressive_ablation PARAMS="-p min_context 32"
# ```
# ````

# %% [markdown]
# ````{solution} 06_progressive_ablation-ex3
# :class: dropdown
#
# A new draw of positions is made from a smaller pool ({glue:md}`ex3_pool`), so all records are
# computed afresh. The "mean clean loss" column of the break tables tells whether the positions
# with more context are predicted better than this run's (this run: {glue:md}`ex3_clean`). The loss changes
# can move either way: a confident prediction has more to lose, but a long context also offers
# more routes to the same prediction. If the ordering of layers by their deepest-removal mean
# changes, the earlier conclusion depended on which positions were drawn.
# ````

# %% tags=["remove-input"]
ex1 = redundancy_breaks(summary, threshold=0.05)
glue("ex1_breaks", Markdown("; ".join(
    f"{m}: " + ", ".join(f"L{r.layer} {'none' if pd.isna(r.first_k_above) else f'k = {r.first_k_above}'}"
                         for r in g.itertuples()) for m, g in ex1.groupby("model", sort=False)) + "."), display=False)
widest = float((summary.ci_high - summary["mean"]).max())
factor = interval_widening(n_positions, alpha=alpha, new_alpha=0.01)
glue("ex2_factor", factor, display=False)
glue("ex2_now", widest, display=False)
glue("ex2_then", widest * factor, display=False)
straddle = lambda lo, hi: int(((lo < 0) & (hi > 0)).sum())  # noqa: E731
half = (summary.ci_high - summary["mean"]) * factor
deepest_then = removal_direction(deepest_removal_summary(records, threshold=cliff_threshold), alpha=0.01)
n_up = lambda d: int((d.direction == "raises").sum())  # noqa: E731
glue("ex2_zero", Markdown(f"Intervals that contain zero: {straddle(summary.ci_low, summary.ci_high)} of {len(summary)} "
                          f"now, {straddle(summary['mean'] - half, summary['mean'] + half)} then. The sign tests at the "
                          f"deepest removal move to the new Bonferroni level as well: the loss rises at more than half of "
                          f"the positions at {n_up(deepest)} of {len(deepest)} layers now, {n_up(deepest_then)} then."),
     display=False)
pools = {(e[32], e[min_context]) for e in eligible.values()}
glue("ex3_pool", Markdown("; ".join(f"{m}: {e[32]:,} eligible positions instead of {e[min_context]:,}"
                                    for m, e in eligible.items()) if len(pools) > 1 else
                          "{:,} eligible positions instead of {:,} for every model".format(*pools.pop())), display=False)
glue("ex3_clean", Markdown("; ".join(f"{m} {g.clean_loss.mean():.3f} nats" for m, g in breaks.groupby("model", sort=False))),
     display=False)
