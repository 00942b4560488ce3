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
# # The observational metrics
#
# Pruning methods rank experts by statistics observed on a corpus, before any expert is
# removed. The paper audits four of them (Section 2). For expert $i$ at layer $L$, over the
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

# %% tags=["parameters"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # not used here (kept so every chapter accepts the same parameters)
seed = 42  # not used here
mode = "token"  # not used here: no ablation is run
dtype = "float32"
device = "cpu"
n_texts = 100
max_tokens = None
batch_size = 8
alpha = 0.05  # level for the significance threshold of Spearman correlations
released_pad_share = 0.62  # share of padding positions in the released statistics run (OLMoE)
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
data_dir = None
results_dir = None

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display
from matplotlib.colors import TwoSlopeNorm
from scipy import stats as sps

from moeaudit import report
from moeaudit.audit import prepare
from moeaudit.metrics import METRIC_LABELS, METRICS

report.use_book_style()
corpus_source = report.show_corpus(corpus, data_dir=data_dir)

# %%
contexts, audited = {}, {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    contexts[name] = ctx
    audited[name] = [int(L) for L in layers] if layers is not None else ctx.model.audit_layers(5)
    for L in audited[name]:
        ctx.model.layout.check_layer(L)
metrics = pd.concat([ctx.metrics.assign(model=name) for name, ctx in contexts.items()], ignore_index=True)
display(Markdown("; ".join(
    f"**{name}**: {ctx.model.layout.num_experts} routed experts × {len(ctx.model.layout.moe_layers)} MoE layers, "
    f"top-{ctx.model.layout.top_k}, metrics over {int(ctx.metrics.n_tokens.iloc[0]):,} real tokens"
    for name, ctx in contexts.items()) + "."))

# %% [markdown]
# ## Distributions across experts and depth
#
# Each point is one expert at one MoE layer; the boxes show the median and quartiles over a
# layer's experts. The dashed line in the utilisation column is the uniform share $k/N_E$
# ($N_E$ routed experts, top-$k$) that a perfectly balanced router would give every expert.
# The two activation metrics are in the units of the hidden state (the L2 norm of the
# expert's raw output vector) and are drawn on a log scale: a few rarely selected experts
# can have outputs many times larger than the rest.

# %%
UNITS = {"utilization_rate": "share of tokens", "activation_norm": "mean ‖E(x)‖₂",
         "mean_routing_weight": "router probability g", "activation_std": "std of ‖E(x)‖₂"}
LOG_METRICS = ("activation_norm", "activation_std")  # positive, with a few very large values
fig, axes = plt.subplots(len(models), len(METRICS), figsize=(3.6 * len(METRICS), 2.9 * len(models)), squeeze=False)
pal = sns.color_palette(report.PALETTE)
for r, name in enumerate(models):
    m = metrics[metrics.model == name]
    lay = contexts[name].model.layout
    many = len(lay.moe_layers) > 8
    for c, metric in enumerate(METRICS):
        ax = axes[r][c]
        d = m.dropna(subset=[metric])
        log = metric in LOG_METRICS
        if log:
            d = d[d[metric] > 0]
        sns.boxplot(data=d, x="layer", y=metric, ax=ax, color=pal[c], fliersize=0, width=0.6,
                    boxprops={"alpha": 0.35}, log_scale=log)
        sns.stripplot(data=d, x="layer", y=metric, ax=ax, color=pal[c], size=2.2 if many else 3, jitter=0.25,
                      log_scale=log)
        if metric == "utilization_rate":
            ax.axhline(lay.top_k / lay.num_experts, color="0.25", linestyle="--", linewidth=1)
        ax.set_xlabel("MoE layer" if r == len(models) - 1 else "")
        ax.set_ylabel(UNITS[metric] + (" (log scale)" if log else ""), fontsize=9)
        ax.set_title(f"{METRIC_LABELS[metric]}" if r == 0 else "")
        if many:
            for i, lab in enumerate(ax.get_xticklabels()):
                lab.set_visible(i % max(1, len(lay.moe_layers) // 8) == 0)
    axes[r][0].annotate(name, xy=(-0.42, 0.5), xycoords="axes fraction", rotation=90, va="center",
                        ha="center", fontweight="bold")
fig.tight_layout()
plt.show()

# %%
def spread(v):
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return np.nan if len(v) == 0 or np.mean(v) == 0 else np.std(v) / np.mean(v)


depth = (metrics.groupby(["model", "layer"])[list(METRICS)].median().reset_index())
trend = []
for name in models:
    d = depth[depth.model == name]
    row = {"model": name}
    for metric in METRICS:
        rho = sps.spearmanr(d.layer, d[metric]).statistic if len(d) > 2 else np.nan
        row[metric] = rho
    trend.append(row)
trend = pd.DataFrame(trend).set_index("model")
trend.columns = [METRIC_LABELS[c] for c in trend.columns]
display(trend.style.format("{:+.2f}", na_rep="—").background_gradient(cmap="vlag", vmin=-1, vmax=1, axis=None)
        .set_caption("Trend of each metric's per-layer median across depth"))
display(Markdown(
    "Each cell is the Spearman correlation between the MoE layer index and the median of the metric over "
    "that layer's experts: +1 means the typical value rises monotonically with depth, −1 that it falls. "
    "It describes the layers of one model; with few MoE layers it is a description, not a test."))

# %% [markdown]
# The scale of the activation metrics changes with depth, so a single global ranking of
# experts by activation norm would be dominated by the deep layers. The audit ranks experts
# only *within* one layer and, there, only among the experts active at one token, so such
# shifts of scale between layers do not enter it.
#
# ## How the metrics relate to each other
#
# If the four metrics were near-copies of one another, the audit would be testing one
# quantity four times. The heat maps give the Spearman rank correlation between each pair of
# metrics across the experts of one layer (experts selected at least twice, so that all four
# are defined), at each audited layer.

# %%
def corr_matrix(m: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    d = m[m.n_selected >= 2][list(METRICS)].dropna()
    rho = d.rank().corr(method="pearson")  # Pearson on ranks = Spearman
    rho.index = rho.columns = [METRIC_LABELS[c] for c in METRICS]
    return rho, len(d)


def critical_rho(n: int, level: float) -> float:
    """|rho| beyond which Spearman's rho is significant at ``level`` (two-sided, t approximation)."""
    if n < 4:
        return np.nan
    t = sps.t.ppf(1 - level / 2, n - 2)
    return float(t / np.sqrt(n - 2 + t ** 2))


ncols = max(len(v) for v in audited.values())
# no layout engine while drawing: seaborn draws the whole figure for every annotated heat map, and
# constrained layout would be recomputed each time; it is switched on once at the end
fig, axes = plt.subplots(len(models), ncols, figsize=(2.5 * ncols + 1.6, 2.7 * len(models)), squeeze=False)
pairs = []
short = ["util", "norm", "weight", "std"]
for r, name in enumerate(models):
    for c in range(ncols):
        ax = axes[r][c]
        if c >= len(audited[name]):
            ax.axis("off")
            continue
        L = audited[name][c]
        rho, n = corr_matrix(metrics[(metrics.model == name) & (metrics.layer == L)])
        crit = critical_rho(n, alpha)
        sns.heatmap(rho, ax=ax, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt="+.2f", annot_kws={"size": 7},
                    cbar=False, square=True, xticklabels=short, yticklabels=short if c == 0 else False)
        ax.set_title(f"layer {L} (n = {n})", fontsize=9)
        if c == 0:
            ax.set_ylabel(name, fontweight="bold", fontsize=9)
        ax.tick_params(labelsize=8)
        for i in range(len(METRICS)):
            for j in range(i + 1, len(METRICS)):
                pairs.append({"model": name, "layer": L, "pair": f"{short[i]}–{short[j]}",
                              "rho": rho.iloc[i, j], "n": n, "critical": crit})
fig.set_layout_engine("constrained")
fig.colorbar(axes[0][0].collections[0], ax=axes, shrink=0.6, label="Spearman ρ across experts")
plt.show()
pairs = pd.DataFrame(pairs)
crits = pairs.groupby("model").critical.max()
display(Markdown(
    "Rows and columns: **util** utilization rate, **norm** activation norm, **weight** mean routing "
    "weight, **std** activation std. n is the number of experts in the layer that enter the correlation. "
    "With these n, |ρ| must exceed about "
    + ", ".join(f"{crits[m]:.2f} ({m})" for m in models)
    + f" to differ from zero at the uncorrected {alpha:g} level; correlations between experts of one "
    "layer are descriptive, not independent tests."))

# %%
summary = pairs.groupby("pair").agg(median_rho=("rho", "median"), min_rho=("rho", "min"),
                                    max_rho=("rho", "max")).sort_values("median_rho")
strongest, weakest = summary.index[-1], summary.index[0]
display(summary.style.format("{:+.2f}").set_caption("Spearman ρ of each metric pair over all audited layers and models"))
display(Markdown(
    f"Over all {len(pairs) // max(1, len(summary))} audited (model, layer) pairs, the most closely related metrics are "
    f"**{strongest}** (median ρ = {summary.loc[strongest, 'median_rho']:+.2f}, range "
    f"{summary.loc[strongest, 'min_rho']:+.2f} to {summary.loc[strongest, 'max_rho']:+.2f}) and the least related "
    f"**{weakest}** (median ρ = {summary.loc[weakest, 'median_rho']:+.2f}). "
    "Pairs with |ρ| well below one rank the active experts at a token differently, so the four rows of "
    "the audit's tables are not four copies of one test; pairs close to ±1 are."))

# %% [markdown]
# ## How evenly the router spreads the load
#
# Utilisation per expert and layer, relative to the uniform share $k/N_E$, on a log₂ scale:
# 0 (white) is exactly the uniform share, +1 twice it, −1 half of it; the scale is clipped at
# ±3 (eight times and one eighth of the uniform share). Experts the router never selected on
# the corpus are black. Expert ids are the model's own; expert $i$ of one layer is
# unrelated to expert $i$ of another.

# %%
HEAT_LIMIT = 3.0  # colour scale clipped at 1/8 and 8 times the uniform share
fig, axes = plt.subplots(1, len(models), figsize=(4.4 * len(models), 4.6), squeeze=False)
for ax, name in zip(axes[0], models):
    lay = contexts[name].model.layout
    m = metrics[metrics.model == name]
    rel = m.pivot(index="expert", columns="layer", values="utilization_rate") / (lay.top_k / lay.num_experts)
    with np.errstate(divide="ignore"):
        val = np.log2(rel.to_numpy(float))
    val[~np.isfinite(val)] = np.nan
    lim = HEAT_LIMIT
    cmap = sns.color_palette("vlag", as_cmap=True).copy()
    cmap.set_bad("black")
    im = ax.imshow(np.ma.masked_invalid(val), aspect="auto", cmap=cmap,
                   norm=TwoSlopeNorm(vcenter=0, vmin=-lim, vmax=lim), interpolation="nearest")
    ax.set_xticks(range(rel.shape[1]))
    ax.set_xticklabels(rel.columns, fontsize=8)
    if rel.shape[1] > 8:
        for i, lab in enumerate(ax.get_xticklabels()):
            lab.set_visible(i % max(1, rel.shape[1] // 8) == 0)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert id")
    ax.set_title(name)
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="log₂(utilisation / uniform share)", shrink=0.85, extend="both")
fig.tight_layout()
plt.show()

# %%
rows = []
for name in models:
    lay = contexts[name].model.layout
    for L, m in metrics[metrics.model == name].groupby("layer"):
        u = m.utilization_rate.to_numpy()
        share = lay.top_k / lay.num_experts
        rows.append({"model": name, "layer": L, "audited": "●" if L in audited[name] else "",
                     "never selected": int((m.n_selected == 0).sum()),
                     "selected < 10 times": int(((m.n_selected > 0) & (m.n_selected < 10)).sum()),
                     "max / uniform": u.max() / share, "min / uniform": u.min() / share,
                     "CV of utilisation": u.std() / u.mean(),
                     "top-10% experts' share of selections": np.sort(u)[::-1][:max(1, len(u) // 10)].sum() / u.sum()})
load = pd.DataFrame(rows).set_index(["model", "layer"])
display(load.style.format({"max / uniform": "{:.2f}", "min / uniform": "{:.2f}", "CV of utilisation": "{:.2f}",
                           "top-10% experts' share of selections": "{:.1%}"})
        .background_gradient(subset=["never selected"], cmap="Greys", vmin=0)
        .set_caption("Load balance per MoE layer"))
never = load["never selected"]
display(Markdown(
    "`never selected`: experts with no selection on the corpus; the three other metrics are undefined for "
    "them, so they drop out of every ranking (they are never active at an audited token either). "
    "`max / uniform`, `min / uniform`: the highest and lowest utilisation as a multiple of $k/N_E$. "
    "`CV`: standard deviation over mean of utilisation (0 = perfectly balanced). `top-10% experts' share`: "
    "the share of all selections that goes to the tenth of experts selected most (10% = balanced). "
    f"In total {int(never.sum())} (expert, layer) slots are never selected"
    + (", in " + ", ".join(f"{m} ({int(v)})" for m, v in never.groupby(level='model').sum().items() if v > 0)
       if never.sum() else "") + "."))

# %% [markdown]
# ## The released code's versions of the metrics
#
# The paper defines the metrics as above. The authors' released scripts compute them
# differently, and differently per model:
#
# * **OLMoE.** The statistics hook records the gate module's output, which in OLMoE is a
#   linear layer: the recorded values are **router logits**, not probabilities, and they are
#   recorded at **every padded position**; padding made up about 62% of the positions.
#   "Utilization rate" is therefore the mean logit of the expert over real and padding
#   positions (a negative number), not a selection frequency; "mean routing weight when
#   active" is a mean logit over an incorrectly built mask. "Activation norm" and "activation
#   std" are the mean and unbiased standard deviation of the norms of the expert's raw output
#   over its routed tokens, padding tokens included.
# * **DeepSeek-V2-Lite.** Utilization is the fraction of padded positions that select the
#   expert. Padding positions all route to the same five or six experts, which inflates those.
# * **Qwen1.5-MoE.** Utilization is count / (k · T) over real tokens, which ranks experts as
#   the paper's definition does; activation norm comes from the first 30 texts only; "activation
#   std" is the standard deviation of the first 32 coordinates of every output, pooled over
#   tokens, a different quantity from the spread of output norms.
#
# The audit uses a metric only through the order it puts on the experts active at a token, so
# what matters is whether these versions *rank* experts as the paper's definitions do. Three
# variants of utilisation can be re-created on the book's models:
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
# right-padded, the statistics are accumulated separately over real and padding positions, and
# the padded variants mix the two at the share `released_pad_share` (a parameter; 0.62 is the
# share the released-code notes report for the OLMoE statistics run). This re-creates the
# direction and rough size of the departure on these models, not the authors' numbers.

# %%
@torch.no_grad()
def router_stats_real_and_padding(ctx, *, batch_size: int = 8) -> dict:
    """Per MoE layer: sums of router logits and selection counts over the real tokens and,
    separately, over the padding positions of the corpus right-padded to its longest text."""
    model, corpus = ctx.model, ctx.corpus
    E, moe = model.layout.num_experts, list(model.layout.moe_layers)
    width = int(corpus.lengths.max())
    acc = {L: {k: np.zeros(E) for k in ("logit_real", "logit_pad", "sel_real", "sel_pad")} for L in moe}
    n_real = n_pad = 0
    for b in range(0, len(corpus), batch_size):
        ids, mask = corpus.padded(list(range(b, min(b + batch_size, len(corpus)))), pad_id=model.pad_id, length=width)
        saved = {}
        with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), remote=model.remote):
            for L in moe:
                r_logits, _r_weight, r_idx = model.layers()[L].mlp.gate.output
                saved[L] = (r_logits.save(), r_idx.save())
        pad = (mask.reshape(-1) == 0).numpy()
        n_real += int((~pad).sum())
        n_pad += int(pad.sum())
        for L, (lg, ix) in saved.items():
            lg = lg.reshape(pad.size, -1).float().cpu().numpy()
            ix = ix.reshape(pad.size, -1).cpu().numpy()
            acc[L]["logit_real"] += lg[~pad].sum(0)
            acc[L]["logit_pad"] += lg[pad].sum(0)
            acc[L]["sel_real"] += np.bincount(ix[~pad].reshape(-1), minlength=E)
            acc[L]["sel_pad"] += np.bincount(ix[pad].reshape(-1), minlength=E)
    return {"layers": acc, "n_real": n_real, "n_pad": n_pad, "width": width}


def pick_active(idx: np.ndarray, score: np.ndarray, *, high: bool) -> np.ndarray:
    """At each token (row of ``idx``), the active expert ranked highest (or lowest) by the
    per-expert ``score``; ties broken by expert id as in the audit (lowest id wins 'high',
    highest id wins 'low')."""
    v = score[idx]
    key = np.where(np.isnan(v), -np.inf if high else np.inf, v)
    order = np.lexsort((idx if high else -idx, -key if high else key), axis=1)
    return idx[np.arange(len(idx)), order[:, 0]]


RHO = "ρ with paper's utilisation"
rows, pad_stats = [], {}
for name, ctx in contexts.items():
    st = router_stats_real_and_padding(ctx, batch_size=batch_size)
    pad_stats[name] = st
    k = ctx.model.layout.top_k
    p = released_pad_share
    for L in audited[name]:
        a = st["layers"][L]
        ours = ctx.metrics[ctx.metrics.layer == L].set_index("expert").sort_index().utilization_rate.to_numpy(float)
        logit_real = a["logit_real"] / max(st["n_real"], 1)
        variants = {"mean logit, real tokens": logit_real}
        if st["n_pad"]:
            variants["mean logit, padded"] = (1 - p) * logit_real + p * a["logit_pad"] / st["n_pad"]
            variants["selection share, padded"] = (1 - p) * ours + p * a["sel_pad"] / st["n_pad"]
        idx = ctx.clean.routing[L]["indices"]
        hi_ours, lo_ours = pick_active(idx, ours, high=True), pick_active(idx, ours, high=False)
        top_pad = np.sort(a["sel_pad"])[::-1]
        for label, score in variants.items():
            rows.append({"model": name, "layer": L, "variant": label,
                         RHO: sps.spearmanr(ours, score).statistic,
                         "same high expert": np.mean(pick_active(idx, score, high=True) == hi_ours),
                         "same low expert": np.mean(pick_active(idx, score, high=False) == lo_ours),
                         "pad_topk": top_pad[:k].sum() / top_pad.sum() if top_pad.sum() else np.nan})
released_cmp = pd.DataFrame(rows)
display(released_cmp.drop(columns="pad_topk").set_index(["model", "layer", "variant"]).style
        .format({RHO: "{:+.2f}", "same high expert": "{:.0%}", "same low expert": "{:.0%}"})
        .background_gradient(subset=["same high expert", "same low expert"], cmap="Greys_r", vmin=0, vmax=1)
        .set_caption(f"Released-code utilisation variants vs the paper's definition, audited layers "
                     f"(padding share {released_pad_share:.0%})"))

# %%
by_var = released_cmp.groupby("variant", sort=False)
pad_top = released_cmp.drop_duplicates(["model", "layer"]).pad_topk.dropna()
display(Markdown(
    "`ρ`: Spearman correlation across the layer's experts between the paper's utilisation (selection share "
    "over real tokens) and the variant. `same high expert` / `same low expert`: the share of real tokens at "
    "which the variant picks the same highest-ranked / lowest-ranked active expert as the paper's "
    "definition, i.e. the share of the audit's pairs it would leave unchanged (darker: fewer). "
    + " ".join(f"**{v}**: ρ from {g[RHO].min():+.2f} to {g[RHO].max():+.2f}, same high expert at "
               f"{g['same high expert'].min():.0%}–{g['same high expert'].max():.0%} of tokens."
               for v, g in by_var)
    + (f" At padding positions the router sends {pad_top.min():.0%}–{pad_top.max():.0%} of its selections "
       "to the same top-k experts of the layer (a balanced router would give them "
       + ", ".join(f"{c.model.layout.top_k / c.model.layout.num_experts:.0%} ({n})" for n, c in contexts.items())
       + "), which is why mixing in padding inflates a few experts."
       if len(pad_top) else "")
    + " Right-padding the book's corpus to its longest text gave "
    + ", ".join(f"{100 * s['n_pad'] / (s['n_pad'] + s['n_real']):.0f}% padding ({n})" for n, s in pad_stats.items())
    + "."))

# %% [markdown]
# Where the agreement shares are well below 100%, a released "utilization" cell tests a
# different ranking from the one the paper describes; where they are close to 100%, the
# departure is immaterial for the audit even though the numbers differ. The per-token
# routing-weight control (chapter 5) ranks by the router probability of the token at hand,
# in the released code as in the paper, so it is unaffected.
#
# ## What this shows, and what it does not
#
# **Shows.** What the four metrics look like on each model: their spread across experts and
# depth, how strongly they co-vary (and hence how many genuinely different rankings the
# audit tests), how evenly the router uses its experts and how many it never uses, and how
# much the released code's utilisation variants would reorder the experts.
#
# **Does not show.** Whether any of the metrics predicts what removing an expert does; that
# is the audit (chapter 4). A metric with a wide spread across experts is not thereby a
# better predictor, and two metrics that agree can be equally uninformative about the
# intervention. The released-code comparison re-creates two utilisation variants on the
# book's models; it does not reproduce the authors' numbers, whose own records are examined
# in chapter 8.
