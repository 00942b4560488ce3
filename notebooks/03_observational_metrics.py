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
# # The observational metrics
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - compute the four observational metrics of an expert (utilisation, activation norm, mean routing weight, activation spread) from one clean pass;
# - read how the metrics relate to one another, and which experts are never used;
# - find where the released code's metrics differ from the paper's definitions.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # not used here (kept so every chapter accepts the same parameters)
seed = 42  # not used here
mode = "token"  # not used here: no ablation is run
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100
max_tokens = None
batch_size = 8
alpha = 0.05  # level for the significance threshold of Spearman correlations
released_pad_share = 0.62  # share of padding positions in the released statistics run (OLMoE)
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None
results_dir = None

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("03_observational_metrics", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("03_observational_metrics"))

# %% [markdown]
# Pruning methods rank experts by statistics observed on a corpus, before any expert is
# removed. The paper audits four of them (Section 2) {cite}`engmann2026audit`, drawn from the
# expert-pruning literature {cite}`lu2024notall,xie2024moepruner,muzio2024seer`. For expert $i$ at layer $L$, over the
# $N$ real tokens of the evaluation corpus and the set $S_i$ of tokens whose top-k selects $i$:
#
# | metric | definition | reads as |
# | --- | --- | --- |
# | utilization rate | $\lvert S_i\rvert / N$ | how often the router picks the expert |
# | mean routing weight | $\frac{1}{\lvert S_i\rvert}\sum_{t\in S_i} g_i(\mathbf{x}_t)$ | how confidently it is picked |
# | activation norm | $\frac{1}{\lvert S_i\rvert}\sum_{t\in S_i} \lVert E_i(\mathbf{x}_t)\rVert_2$ | how large its outputs are |
# | activation std | standard deviation of $\lVert E_i(\mathbf{x}_t)\rVert_2$ over $S_i$ | how variable its outputs are |
#
# Here $g_i(\mathbf{x}_t)$ is the softmax router probability (before any renormalisation of the
# top-k weights or scaling), and $E_i(\mathbf{x}_t)$ the expert's raw output (before it is
# multiplied by its weight). Each metric is **one number per expert and layer**: a population
# summary, the same at every token. That is what distinguishes them from the per-token routing
# weight $g_i(\mathbf{x}_t)$ of the control experiment (chapter 5).
#
# This chapter looks at the metrics themselves: how they are distributed across experts and
# depth, how far they measure different things, how evenly the router spreads the load,
# and how the released code's versions of them differ from these definitions.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.colors import TwoSlopeNorm
from myst_nb import glue

from moeaudit import metrics as M
from moeaudit import report
from moeaudit.audit import prepare
from moeaudit.metrics import METRIC_LABELS, METRICS
from moeaudit.stats import critical_spearman_rho

report.use_book_style()

# %%
contexts, audited = {}, {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    contexts[name] = ctx
    display(Markdown(audit.regime_line(name, ctx)))
    audited[name] = [int(L) for L in layers] if layers is not None else ctx.model.audit_layers(5)
    for L in audited[name]:
        ctx.model.layout.check_layer(L)
metrics = pd.concat([ctx.metrics.assign(model=name) for name, ctx in contexts.items()], ignore_index=True)

# %% tags=["remove-input"]
glue("n_metrics", len(METRICS), display=False)
glue("models_text", Markdown("; ".join(
    f"**{name}**: {ctx.model.layout.num_experts} routed experts × {len(ctx.model.layout.moe_layers)} MoE layers, "
    f"top-{ctx.model.layout.top_k}, metrics over {int(ctx.metrics.n_tokens.iloc[0]):,} real tokens"
    for name, ctx in contexts.items()) + "."), display=False)

# %% [markdown]
# The models and corpus of this run: {glue:md}`models_text`
#
# ## Distributions across experts and depth
#
# One figure per model. Each point is one expert at one MoE layer; the boxes show the median
# and quartiles over a layer's experts. The dashed line in the utilisation panel is the uniform
# share $k/N_E$ ($N_E$ routed experts, top-$k$) that a perfectly balanced router would give
# every expert.
# The two activation metrics are in the units of the hidden state (the L2 norm of the
# expert's raw output vector) and are drawn on a log scale: a few experts have outputs many
# times larger than the rest of their layer.

# %% tags=["hide-input"]
UNITS = {"utilization_rate": "share of tokens", "activation_norm": "mean ‖E(x)‖₂",
         "mean_routing_weight": "router probability g", "activation_std": "std of ‖E(x)‖₂"}
LOG_METRICS = ("activation_norm", "activation_std")  # positive, with a few very large values
pal = sns.color_palette(report.PALETTE)
for name in models:  # one figure per model: its four metrics in rows of two panels
    m, lay = metrics[metrics.model == name], contexts[name].model.layout
    many = len(lay.moe_layers) > 8
    fig, axes = report.panel_grid(len(METRICS), height=2.6)
    for c, (ax, metric) in enumerate(zip(axes, METRICS)):
        log = metric in LOG_METRICS
        d = m.dropna(subset=[metric])
        d = d[d[metric] > 0] if log else d
        sns.boxplot(data=d, x="layer", y=metric, ax=ax, color=pal[c], fliersize=0, width=0.6,
                    boxprops={"alpha": 0.35}, log_scale=log)
        sns.stripplot(data=d, x="layer", y=metric, ax=ax, color=pal[c], size=2.2 if many else 3, jitter=0.25,
                      log_scale=log)
        if metric == "utilization_rate":
            ax.axhline(lay.top_k / lay.num_experts, color="0.25", linestyle="--", linewidth=1)
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.set_xlabel("MoE layer", fontsize=9)
        ax.set_ylabel(UNITS[metric] + (" (log scale)" if log else ""), fontsize=9)
        for i, lab in enumerate(ax.get_xticklabels() if many else []):  # at most about 8 layer labels
            lab.set_visible(i % max(1, len(lay.moe_layers) // 8) == 0)
    fig.suptitle(f"{name}: the four metrics per expert, by MoE layer")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# The table gives, for each model and metric, the Spearman correlation between the MoE layer
# index and the median of the metric over that layer's experts
# (`metrics.metric_depth_trend`): $+1$ means the typical value rises monotonically with depth,
# $-1$ that it falls. It describes the layers of one model; with few MoE layers it is a
# description, not a test.

# %%
trend = pd.DataFrame({name: M.metric_depth_trend(metrics[metrics.model == name]) for name in models}).T
trend.columns = [METRIC_LABELS[c] for c in trend.columns]

# %% tags=["remove-input"]
display(trend.style.format("{:+.2f}", na_rep="—").background_gradient(cmap="vlag", vmin=-1, vmax=1, axis=None)
        .set_caption("Trend of each metric's per-layer median across depth"))

# %% [markdown]
# The scale of the activation metrics can change with depth, so a single global ranking of
# experts by activation norm would be dominated by the layers where it is largest. The audit
# ranks experts only *within* one layer and, there, only among the experts active at one
# token, so such shifts of scale between layers do not enter it.
#
# ## How the metrics relate to each other
#
# If the {glue:text}`n_metrics` metrics were near-copies of one another, the audit would be
# testing one quantity several times. The heat maps give the Spearman rank correlation between
# each pair of metrics across the experts of one layer (experts selected at least twice, so
# that all of them are defined; `metrics.metric_rank_correlations`), at each audited layer.
# The threshold $\lvert\rho\rvert$ must exceed to differ from zero at the uncorrected level
# $\alpha$ = {glue:text}`alpha_corr` is `stats.critical_spearman_rho`: {glue:md}`crit_text`.
# Correlations between experts of one layer are descriptive, not independent tests.

# %%
SHORT = ["util", "norm", "weight", "std"]
corr, pairs = {}, []
for name in models:
    for L in audited[name]:
        rho, n = M.metric_rank_correlations(metrics[(metrics.model == name) & (metrics.layer == L)])
        rho.index = rho.columns = SHORT
        corr[name, L] = (rho, n)
        pairs += [{"model": name, "layer": L, "pair": f"{SHORT[i]}–{SHORT[j]}", "rho": rho.iloc[i, j], "n": n,
                   "critical": critical_spearman_rho(n, alpha=alpha)}
                  for i in range(len(METRICS)) for j in range(i + 1, len(METRICS))]
pairs = pd.DataFrame(pairs)

# %% tags=["remove-input"]
crits = pairs.groupby("model", sort=False).critical.max()
glue("alpha_corr", alpha, display=False)
glue("crit_text", Markdown(", ".join(f"{report.finite_or(crits[m], '{:.2f}', 'undefined (fewer than 4 experts)')} "
                                     f"({m}, smallest n = {pairs[pairs.model == m].n.min()})" for m in models)),
     display=False)

# %% tags=["hide-input"]
def colorbar_beside(fig, axes, mappable, label, extend="neither"):
    """One colour bar for a panel_grid figure: in its spare slot if it has one, else to the right."""
    spare = [ax for ax in fig.axes if not ax.get_visible()]
    if spare:
        spare[0].set_visible(True)
        spare[0].axis("off")
        fig.colorbar(mappable, cax=spare[0].inset_axes([0.1, 0.55, 0.8, 0.09]), orientation="horizontal",
                     label=label, extend=extend)
    else:
        fig.colorbar(mappable, ax=axes, shrink=0.8, label=label, extend=extend)


PAIRS = [(i, j) for i in range(len(METRICS)) for j in range(i + 1, len(METRICS))]
fig, axes = report.panel_grid(len(models), height=3.0)
for ax, name in zip(axes, models):
    grid = pd.DataFrame({f"L{L}\nn = {corr[name, L][1]}": [corr[name, L][0].iloc[i, j] for i, j in PAIRS]
                         for L in audited[name]}, index=[f"{SHORT[i]}–{SHORT[j]}" for i, j in PAIRS])
    sns.heatmap(grid, ax=ax, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt="+.2f", annot_kws={"size": 8},
                cbar=False)
    ax.set_title(name, fontsize=10)
    ax.tick_params(labelsize=8, rotation=0)
fig.suptitle("Spearman ρ between the metrics across the experts of each audited layer")
fig.tight_layout()
colorbar_beside(fig, axes, axes[0].collections[0], "Spearman ρ across experts")
plt.show()

# %% [markdown]
# Rows: the pairs of metrics, **util** utilization rate, **norm** activation norm, **weight** mean
# routing weight, **std** activation std; columns: the audited layers, with n the number of experts
# of the layer that enter the correlation. {glue:md}`pairs_text`

# %%
summary = pairs.groupby("pair").agg(median_rho=("rho", "median"), min_rho=("rho", "min"),
                                    max_rho=("rho", "max")).sort_values("median_rho")

# %% tags=["remove-input"]
report.show_table(summary.reset_index(), labels={"median_rho": "median ρ", "min_rho": "smallest ρ", "max_rho": "largest ρ"},
                  formats={c: "{:+.2f}" for c in ("median ρ", "smallest ρ", "largest ρ")},
                  caption="Spearman ρ of each metric pair over all audited layers and models")
by_abs = summary.median_rho.abs().sort_values()
closest, farthest = by_abs.index[-1], by_abs.index[0]
glue("pairs_text", Markdown(
    f"Over the {pairs.groupby(['model', 'layer']).ngroups} audited (model, layer) pairs, the most closely related "
    f"metrics are **{closest}** (median ρ = {summary.loc[closest, 'median_rho']:+.2f}, range "
    f"{summary.loc[closest, 'min_rho']:+.2f} to {summary.loc[closest, 'max_rho']:+.2f}) and the least related "
    f"**{farthest}** (median ρ = {summary.loc[farthest, 'median_rho']:+.2f}). "
    + (f"Pairs with a median |ρ| of at least 0.8 ({', '.join(by_abs.index[by_abs >= 0.8])}) put nearly the same "
       "order on the experts, so their rows of the audit's tables are close to one test run twice; "
       if (by_abs >= 0.8).any() else "No pair reaches a median |ρ| of 0.8, so no two rows of the audit's tables "
       "repeat one test; ")
    + "pairs with |ρ| well below one rank the active experts differently."), display=False)

# %% [markdown]
# ## How evenly the router spreads the load
#
# MoE routers are trained with an auxiliary load-balancing loss that pushes every expert
# towards the same share of tokens {cite}`shazeer2017outrageously,fedus2022switch`; the paper
# notes that its coefficient differs by an order of magnitude between its three models. The
# better the balance, the less there is for utilisation to rank: if every expert had exactly
# the uniform share, the utilisation ranking of the active experts at a token would be decided
# by ties alone. How far from uniform the routers of these models are is therefore part of
# what the audit's utilisation row can detect.
#
# Utilisation per expert and layer, relative to the uniform share $k/N_E$, on a log₂ scale:
# $0$ (white) is exactly the uniform share, $+1$ twice it, $-1$ half of it; the scale is
# clipped at $\pm$ {glue:text}`heat_limit` ({glue:text}`heat_factor` times the uniform share, and
# {glue:text}`heat_fraction` of it). Experts the router never selected on the
# corpus are black. Expert ids are the model's own; expert $i$ of one layer is unrelated to
# expert $i$ of another.

# %% tags=["hide-input"]
HEAT_LIMIT = 3.0  # colour scale clipped at 2**-3 and 2**3 times the uniform share
glue("heat_limit", int(HEAT_LIMIT), display=False)
glue("heat_factor", int(2 ** HEAT_LIMIT), display=False)
glue("heat_fraction", f"1/{int(2 ** HEAT_LIMIT)}", display=False)
cmap = sns.color_palette("vlag", as_cmap=True).copy()
cmap.set_bad("black")
fig, axes = report.panel_grid(len(models), height=3.6)
for ax, name in zip(axes, models):
    lay = contexts[name].model.layout
    rel = (metrics[metrics.model == name].pivot(index="expert", columns="layer", values="utilization_rate")
           / (lay.top_k / lay.num_experts))
    with np.errstate(divide="ignore"):
        val = np.log2(rel.to_numpy(float))
    im = ax.imshow(np.ma.masked_invalid(np.where(np.isfinite(val), val, np.nan)), aspect="auto", cmap=cmap,
                   norm=TwoSlopeNorm(vcenter=0, vmin=-HEAT_LIMIT, vmax=HEAT_LIMIT), interpolation="nearest")
    ax.set_xticks(range(rel.shape[1]))
    ax.set_xticklabels(rel.columns, fontsize=8)
    for i, lab in enumerate(ax.get_xticklabels()):
        lab.set_visible(rel.shape[1] <= 8 or i % max(1, rel.shape[1] // 8) == 0)
    ax.set_xlabel("MoE layer", fontsize=9)
    ax.set_ylabel("expert id", fontsize=9)
    ax.set_title(name, fontsize=10)
    ax.grid(False)
fig.suptitle("Utilisation relative to the uniform share (black: never selected)")
fig.tight_layout()
colorbar_beside(fig, axes, im, "log₂(utilisation / uniform share)", extend="both")
plt.show()

# %% [markdown]
# The tables summarise each MoE layer, one table per model (`metrics.load_balance`). `never selected`: experts with no
# selection on the corpus; the three other metrics are undefined for them, so they drop out of
# every ranking (they are never active at an audited token either). `max / uniform`,
# `min / uniform`: the highest and lowest utilisation as a multiple of $k/N_E$. `CV`: standard
# deviation over mean of utilisation ($0$ = perfectly balanced). `top-10% share`: the share of
# all selections that goes to the tenth of experts selected most (a tenth when balanced).
# {glue:md}`never_text`

# %%
load = pd.DataFrame([{"model": name, "layer": L, "audited": "●" if L in audited[name] else "",
                      **M.load_balance(m.utilization_rate.to_numpy(), m.n_selected.to_numpy(),
                                       top_k=contexts[name].model.layout.top_k,
                                       num_experts=contexts[name].model.layout.num_experts)}
                     for name in models for L, m in metrics[metrics.model == name].groupby("layer")])
load = load.set_index(["model", "layer"]).rename(columns={
    "never": "never selected", "rare": "selected < 10 times", "max_rel": "max / uniform", "min_rel": "min / uniform",
    "cv": "CV", "top10_share": "top-10% share"})

# %% tags=["remove-input"]
for name in models:
    report.show_table(load.loc[name].reset_index(), caption=f"{name}: load balance per MoE layer", max_rows=None,
                      formats={"max / uniform": "{:.2f}", "min / uniform": "{:.2f}", "CV": "{:.2f}",
                               "top-10% share": "{:.1%}"})
never = load["never selected"].groupby(level="model", sort=False).sum()
glue("never_text", Markdown(
    f"In this run {int(never.sum())} (expert, layer) slots are never selected"
    + (": " + ", ".join(f"{m} ({int(v)})" for m, v in never.items() if v > 0) if never.sum() else "")
    + f"; the most-selected tenth of a layer's experts takes between {load['top-10% share'].min():.1%} and "
    f"{load['top-10% share'].max():.1%} of its selections."), display=False)

# %% [markdown]
# ## The released code's versions of the metrics
#
# The paper defines the metrics as above. The authors' released scripts {cite}`engmann2026code`
# compute them differently, and differently per model:
#
# * **OLMoE** {cite}`muennighoff2025olmoe`. The statistics hook records the gate module's output,
#   which in OLMoE is a linear layer: the recorded values are **router logits**, not
#   probabilities, and they are recorded at **every padded position**; padding made up about
#   $62\%$ of the positions of that run. "Utilization rate" is therefore the mean logit of the
#   expert over real and padding positions (a negative number), not a selection frequency.
#   "Mean routing weight when active" is a mean logit over a mask that is OR-accumulated over
#   all positions with the rule "logit of $e$ at least the $k$-th largest logit of that
#   position": it reduces to one threshold per layer, the smallest $k$-th largest logit over
#   all positions, and so admits every position at which the expert is selected and many at
#   which it is not (chapter 9 rebuilds it). "Activation norm" and "activation std" are the mean
#   and unbiased standard deviation of the norms of the expert's raw output over its routed
#   tokens, padding tokens included.
# * **DeepSeek-V2-Lite.** Utilization is the fraction of padded positions that select the
#   expert. Padding positions all route to the same few experts, which inflates those.
# * **Qwen1.5-MoE.** Utilization is count / ($k\cdot T$) over real tokens, which ranks experts as
#   the paper's definition does; activation norm comes from the first $30$ texts only; "activation
#   std" is the standard deviation of the first $32$ coordinates of every output, pooled over
#   tokens, a different quantity from the spread of output norms.
#
# The audit uses a metric only through the order it puts on the experts active at a token, so
# what matters is whether these versions *rank* experts as the paper's definitions do. The
# {glue:text}`n_variants` utilisation variants below can be re-created on the book's models
# (`metrics.released_utilisation_variants`):
#
# * **mean logit, real tokens**: the mean router logit over real tokens (logits in place of
#   selections, no padding);
# * **mean logit, padded**: the same with padding positions mixed in at the released run's
#   padding share;
# * **selection share, padded**: the paper's selection frequency, with padding positions
#   mixed in at that share.
#
# The book's texts are truncated to the models' context, so right-padding them to the longest
# one produces far less padding than the released run had. The corpus is therefore run once
# right-padded, the statistics are accumulated separately over real and padding positions
# inside one nnsight trace per batch (`metrics.router_sums_real_and_padding`), and the padded
# variants mix the two at the share `released_pad_share` (a parameter, here
# {glue:text}`pad_share:.0%`). {glue:md}`pad_method_tail`

# %%
RHO = "ρ with paper's utilisation"
rows, pad_stats = [], {}
for name, ctx in contexts.items():
    pad_stats[name] = st = M.router_sums_real_and_padding(ctx.model, ctx.corpus, batch_size=batch_size)
    for L in audited[name]:
        ours = ctx.metrics[ctx.metrics.layer == L].set_index("expert").sort_index().utilization_rate.to_numpy(float)
        idx, acc = ctx.clean.routing[L]["indices"], st["layers"][L]
        for share in (released_pad_share, 0.0):
            for label, score in M.released_utilisation_variants(ours, acc, pad_share=share).items():
                rows.append({"model": name, "layer": L, "variant": label, "pad_share": share,
                             **M.ranking_agreement(idx, ours, score)})
cmp_all = pd.DataFrame(rows).rename(columns={"rho": RHO, "same_high": "same high expert",
                                             "same_low": "same low expert"})
released_cmp = cmp_all[cmp_all.pad_share == released_pad_share].drop(columns="pad_share")

# %% tags=["remove-input"]
glue("n_variants", len(M.RELEASED_UTILISATION_VARIANTS), display=False)
glue("pad_share", released_pad_share, display=False)
one_variant = released_cmp.variant.nunique() == 1  # without padding only one variant exists: named in the caption
n_all = len(M.RELEASED_UTILISATION_VARIANTS)
glue("pad_method_tail", Markdown(
    "Where right-padding leaves padding positions, this re-creates the direction and rough size of the departure on "
    "these models, not the authors' numbers; where it leaves none (below), the padded variants cannot be formed."),
     display=False)
glue("variants_shown", Markdown(
    f"how much the released code's {n_all} utilisation variants would reorder the experts"
    if released_cmp.variant.nunique() == n_all else
    f"how much {report.plural(released_cmp.variant.nunique(), 'utilisation variant')} of the released code's {n_all} "
    "would reorder the experts (the padded ones need padding positions, which this corpus does not produce)"),
     display=False)
display(released_cmp.drop(columns=["variant"] if one_variant else []).style.hide(axis="index")
        .format({RHO: "{:+.2f}", "same high expert": "{:.0%}", "same low expert": "{:.0%}"})
        .background_gradient(subset=["same high expert", "same low expert"], cmap="Greys_r", vmin=0, vmax=1)
        .set_caption(f"Released-code utilisation variants vs the paper's definition, audited layers "
                     f"(padding share {released_pad_share:.0%})"
                     + (f"; variant: {released_cmp.variant.iloc[0]}" if one_variant else "")))

# %% [markdown]
# `ρ`: Spearman correlation across the layer's experts between the paper's utilisation
# (selection share over real tokens) and the variant. `same high expert` / `same low expert`:
# the share of real tokens at which the variant picks the same highest-ranked / lowest-ranked
# active expert as the paper's definition (`metrics.pick_active`), i.e. the share of the
# audit's pairs it would leave unchanged (darker: fewer). {glue:md}`variants_text`

# %% tags=["remove-input"]
pad = M.padding_summary(pad_stats, audited, top_k={n: c.model.layout.top_k for n, c in contexts.items()})
glue("variants_text", Markdown(report.utilisation_variants_text(
    released_cmp, rho_col=RHO, n_variants=len(M.RELEASED_UTILISATION_VARIANTS), padding=pad,
    balanced={n: c.model.layout.top_k / c.model.layout.num_experts for n, c in contexts.items()})), display=False)
zero = cmp_all[(cmp_all.pad_share == 0.0) & (cmp_all.variant == "selection share, padded")]
crit_001 = np.array([critical_spearman_rho(n, alpha=0.01) for n in pairs.n])
glue("ex_pad0", Markdown(
    f"picks the same high expert at every token (smallest share over the audited layers: "
    f"{zero['same high expert'].min():.0%})" if len(zero) else
    "would pick the same high expert at every token; this corpus has no padding, so the variant is not computed"),
     display=False)
glue("ex_crit", Markdown(report.finite_or(np.nanmax(crit_001) if np.isfinite(crit_001).any() else np.nan, "{:.2f}",
                                          "undefined (every layer has fewer than 4 experts)")), display=False)
for key, value in {"ex_n_above_001": int((pairs.rho.abs() > crit_001).sum()), "ex_n_pairs": len(pairs),
                   "n_above_alpha": int((pairs.rho.abs() > pairs.critical).sum())}.items():
    glue(key, value, display=False)

# %% [markdown]
# Where the agreement shares are well below one, a released "utilization" cell tests a
# different ranking from the one the paper describes; where they are close to one, the
# departure is immaterial for the audit even though the numbers differ. The per-token
# routing-weight control (chapter 5) ranks by the router probability of the token at hand,
# in the released code as in the paper, so it is unaffected.
#
# ## What this shows, and what it does not
#
# **Shows.** What the {glue:text}`n_metrics` metrics look like on each model: their spread
# across experts and depth, how strongly they co-vary ({glue:text}`n_above_alpha` of the
# {glue:text}`ex_n_pairs` layer-wise metric pairs have $\lvert\rho\rvert$ above the uncorrected
# threshold), how evenly the router uses its experts and how many it never uses, and
# {glue:md}`variants_shown`.
#
# **Does not show.** Whether any of the metrics predicts what removing an expert does; that
# is the audit (chapter 4). A metric with a wide spread across experts is not thereby a
# better predictor, and two metrics that agree can be equally uninformative about the
# intervention. The released-code comparison re-creates the utilisation variants on the
# book's models at a chosen padding share; it does not reproduce the authors' numbers, whose
# own records are examined in chapter 8.
#
# ## Exercises
#
# ````{exercise} 1. No padding
# :label: 03_observational_metrics-ex1
# :nonumber:
#
# Predict what becomes of the padded variants of the released metrics without padding, then run
# `make chapter NB=03_observational_metrics PARAMS="-p released_pad_share 0.0"`.
# ````
#
# ````{solution} 03_observational_metrics-ex1
# :class: dropdown
#
# The "selection share, padded" variant becomes the paper's utilisation itself and
# {glue:md}`ex_pad0`; "mean logit, padded" equals "mean logit, real tokens", whose disagreement is
# due to logits alone.
# ````
#
# ````{exercise} 2. A stricter level for the metric correlations
# :label: 03_observational_metrics-ex2
# :nonumber:
#
# Predict how the critical $\lvert\rho\rvert$ and the number of metric pairs above it change at a
# stricter level, then run `make chapter NB=03_observational_metrics PARAMS="-p alpha 0.01"`.
# ````
#
# ````{solution} 03_observational_metrics-ex2
# :class: dropdown
#
# The critical $\lvert\rho\rvert$ rises to at most {glue:md}`ex_crit`, and
# {glue:text}`ex_n_above_001` of the {glue:text}`ex_n_pairs` layer-wise metric pairs still exceed it.
# ````
