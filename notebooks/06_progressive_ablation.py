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
# The audit removes *one* active expert at a token and finds that, in most layers, it hardly
# matters which one. The paper reads this as a property of the regime, not of the metrics: if a
# layer's active experts are largely redundant, every choice of expert to remove looks harmless,
# and every selection criterion looks equally good. This chapter tests the premise directly
# (paper, Section 3 "Progressive ablation", Appendix C, Tables 8–9).
#
# **Protocol.** At each sampled token position and layer, the active routed experts are ordered
# by their combine weight at that token, and the $k$ highest-weighted ones are removed together,
# for $k = 1, \dots, \text{top-}k - 1$ (at least one routed expert always stays; shared experts
# are never touched). The recorded quantity is the *cumulative* loss change
# $\Delta\mathcal{L}(k) = \mathcal{L}_t^{(-\{e_1..e_k\})} - \mathcal{L}_t$ in nats, where
# $\mathcal{L}_t = -\log p(x_{t+1}\mid x_{\le t})$. Removal means that the experts' combine weights
# are set to zero at token $t$ inside the forward pass; the remaining weights are not
# renormalised, exactly as in the single-expert audit.
#
# Removing the *highest*-weight experts first is the hardest test of redundancy a routing-based
# order can set: if even these can go without a large loss change, the layer's output at that
# token is carried by many experts at once. A **redundancy cliff** is a removal depth $k$ at
# which the loss change jumps instead of growing slowly.
#
# **Positions.** The positions are the audit's: one seeded draw per model, shared with the
# single-expert audit and the routing-weight control. (The paper's released run drew one position
# per text with at least 32 tokens of context, from texts of up to 256 tokens; set `min_context`
# to 32 to exclude the shortest contexts here too.) The paper audited six OLMoE layers with
# n = 500 positions; by default this chapter audits every MoE layer of each model with 200.

# %% tags=["parameters"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: every MoE layer of each model (the paper, for OLMoE: [0, 1, 7, 8, 9, 15]); or a list used for every model
n_positions = 200  # token positions per (layer, k) cell (the paper: 500)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
min_context = 0
batch_size = 64
alpha = 0.05  # 1 - confidence level of the intervals on the mean
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)
cliff_threshold = 0.1  # mean loss increase (nats) that counts as a layer "breaking"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.lines import Line2D
from scipy import stats as sps

from moeaudit import report
from moeaudit.audit import prepare, progressive_records

report.use_book_style()
corpus_source = report.show_corpus(corpus, data_dir=data_dir)

# %% [markdown]
# ## Run the ablations
# One record per (position, layer, k). Records are cached under a key made of every parameter
# that produced them, so re-running the page reuses them.

# %%
all_records, layouts, audited_layers = [], {}, {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    lay = ctx.model.layout
    layouts[name] = lay
    audited = list(layers) if layers is not None else list(lay.moe_layers)
    audited_layers[name] = audited
    rec = progressive_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                              min_context=min_context, batch_size=batch_size)
    rec["rel_depth"] = rec.layer.map(dict(zip(audited, report.relative_depth(audited, lay.moe_layers))))
    all_records.append(rec)
    display(Markdown(f"**{name}** ({lay.family}): MoE layers {list(lay.moe_layers)} of {lay.n_layers}, "
                     f"{lay.num_experts} routed experts, top-{lay.top_k}, {lay.n_shared_experts} shared; "
                     f"audited layers {audited}, k = 1..{lay.top_k - 1}; {len(rec):,} ablation records."))
records = pd.concat(all_records, ignore_index=True)

# %% [markdown]
# ## Summary statistics per (layer, k)
# For every model, layer and removal depth: the mean cumulative loss change with a t-interval
# (confidence level 1 − `alpha`, 95% by default), the median, and the 5th and 95th percentiles
# (P5, P95).

# %%
def summarise(g: pd.DataFrame) -> pd.Series:
    x = g.delta_loss.to_numpy(dtype=float)
    n = x.size
    half = sps.t.ppf(1 - alpha / 2, n - 1) * x.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
    return pd.Series({"n": n, "mean": x.mean(), "ci_low": x.mean() - half, "ci_high": x.mean() + half,
                      "median": np.median(x), "p05": np.quantile(x, 0.05), "p95": np.quantile(x, 0.95),
                      "clean_loss": g.clean_loss.mean()})


summary = (records.groupby(["model", "layer", "k"], sort=False)[["delta_loss", "clean_loss"]]
           .apply(summarise).reset_index())
summary["n"] = summary["n"].astype(int)


def signed_table(values: pd.DataFrame, caption: str):
    return (values.style.format("{:+.3f}").background_gradient(cmap="Blues", axis=None)
            .set_caption(caption).set_properties(**{"text-align": "center"}))


# %% [markdown]
# ## Mean cumulative loss change (the paper's Table 8)
# Rows: number $k$ of highest-weight active experts removed; columns: layers. Values are mean
# $\Delta\mathcal{L}$ in nats over the positions; the shading runs from the smallest to the largest
# value within each table.

# %%
for name in models:
    s = summary[summary.model == name]
    tab = s.pivot(index="k", columns="layer", values="mean")
    tab.columns = [f"L{c}" for c in tab.columns]
    display(Markdown(f"### {name}"))
    display(signed_table(tab, f"{name}: mean cumulative ΔL (nats) under progressive ablation of the k "
                              f"highest-weight active experts; n = {int(s.n.min())} positions per cell."))

# %% [markdown]
# ## Median and P95 at the deepest removal (the paper's Table 9)
# At $k = \text{top-}k - 1$ (all active experts but one removed). A mean far above the median
# means the increase is carried by a minority of positions; the last two rows quantify that tail.

# %%
def tail_share(x: np.ndarray, q: float = 0.95) -> float:
    """Share of the summed positive loss increase that comes from the positions above quantile q."""
    pos = np.clip(x, 0, None)
    total = pos.sum()
    return float(pos[x > np.quantile(x, q)].sum() / total) if total > 0 else np.nan


deepest = []
for name in models:
    kmax = layouts[name].top_k - 1
    for L in audited_layers[name]:
        x = records[(records.model == name) & (records.layer == L) & (records.k == kmax)].delta_loss.to_numpy()
        deepest.append({"model": name, "layer": L, "k": kmax, "Mean": x.mean(), "Median": np.median(x),
                        "P5": np.quantile(x, 0.05), "P95": np.quantile(x, 0.95),
                        f"share above {cliff_threshold:g} nats": np.mean(x > cliff_threshold),
                        "share below 0 (loss fell)": np.mean(x < 0), "top-5% share of increase": tail_share(x)})
deepest = pd.DataFrame(deepest)

for name in models:
    d = deepest[deepest.model == name].set_index("layer")
    kmax = int(d.k.iloc[0])
    tab = d.drop(columns=["model", "k"]).T
    tab.columns = [f"L{c}" for c in tab.columns]
    display(Markdown(f"### {name} (k = {kmax})"))
    display(tab.style.format("{:+.3f}", subset=pd.IndexSlice[["Mean", "Median", "P5", "P95"], :])
            .format("{:.0%}", subset=pd.IndexSlice[[f"share above {cliff_threshold:g} nats", "share below 0 (loss fell)",
                                                      "top-5% share of increase"], :])
            .set_caption(f"{name}: cumulative ΔL (nats) at k = {kmax}, n = {n_positions} positions per layer")
            .set_properties(**{"text-align": "center"}))

# %% [markdown]
# *Conventions.* Mean, median, P5 and P95 (5th and 95th percentiles) are over positions, in nats;
# positive values mean the prediction got worse. The paper reports the median and P95 only; P5 and
# `share below 0` show the other tail, positions where removing the experts *lowered* the loss, which
# the mean nets against the increases. `share above x nats`: fraction of positions whose loss rose by
# more than the chapter's threshold. `top-5% share of increase`: of the summed positive loss increases, the
# fraction contributed by the 5% of positions with the largest ones (5% would mean a perfectly
# even spread; values near 100% mean a few positions carry everything).

# %% [markdown]
# ## The redundancy cliff
# Top row: mean cumulative loss change against $k$, one line per layer, with the confidence
# interval of the mean. Bottom row: the same positions summarised by their median (dashed), P95 (solid) and
# P5 (dash-dotted).
# A layer with a redundancy buffer stays flat as experts are removed; a cliff is a sharp rise.
# The dotted line is `cliff_threshold`.

# %%
n_models = len(models)
fig, axes = plt.subplots(2, n_models, figsize=(max(6.5, 4.3 * n_models), 7.2), squeeze=False, sharex="col")
for j, name in enumerate(models):
    s = summary[summary.model == name]
    layer_order = audited_layers[name]
    colors = dict(zip(layer_order, sns.color_palette("colorblind", len(layer_order))))
    top, bottom = axes[0][j], axes[1][j]
    for L in layer_order:
        g = s[s.layer == L].sort_values("k")
        top.plot(g.k, g["mean"], marker="o", color=colors[L], label=f"L{L}")
        top.fill_between(g.k, g.ci_low, g.ci_high, color=colors[L], alpha=0.18, linewidth=0)
        bottom.plot(g.k, g.p95, marker="o", color=colors[L])
        bottom.plot(g.k, g["median"], marker=".", linestyle="--", color=colors[L])
        bottom.plot(g.k, g.p05, marker="v", markersize=4, linestyle="-.", color=colors[L])
    for ax in (top, bottom):
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.axhline(cliff_threshold, color="0.3", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(1, layouts[name].top_k))
    top.set_title(name)
    bottom.set_xlabel("k = number of highest-weight experts removed")
    top.legend(fontsize=8, title="layer", title_fontsize=8)
    bottom.legend(handles=[Line2D([], [], color="0.3", marker="o", label="P95"),
                           Line2D([], [], color="0.3", marker=".", linestyle="--", label="median"),
                           Line2D([], [], color="0.3", marker="v", markersize=4, linestyle="-.", label="P5"),
                           Line2D([], [], color="0.3", linestyle=":", label="threshold")], fontsize=8)
axes[0][0].set_ylabel(f"mean ΔL (nats), {1 - alpha:.0%} CI")
axes[1][0].set_ylabel("P5, median and P95 of ΔL (nats)")
fig.suptitle("Progressive ablation: loss change as the top-weighted active experts are removed")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Where does a layer break?
# Three descriptions of each layer's trajectory: the first $k$ at which the mean loss change
# crosses `cliff_threshold` (none if it never does), the largest single step
# $\overline{\Delta\mathcal{L}}(k) - \overline{\Delta\mathcal{L}}(k-1)$ (with
# $\overline{\Delta\mathcal{L}}(0) = 0$) and where it occurs, and the mean at the deepest removal
# relative to the mean clean loss of the same positions.

# %%
rows = []
for (name, L), g in summary.groupby(["model", "layer"], sort=False):
    g = g.sort_values("k")
    means = g["mean"].to_numpy()
    steps = np.diff(np.concatenate([[0.0], means]))
    crossed = g.k[g["mean"] > cliff_threshold]
    rows.append({"model": name, "layer": L, "first k above threshold": int(crossed.iloc[0]) if len(crossed) else None,
                 "largest step (nats)": float(steps.max()), "at k": int(g.k.iloc[int(steps.argmax())]),
                 "mean ΔL at deepest k": float(means[-1]), "mean clean loss": float(g.clean_loss.iloc[-1]),
                 "ΔL / clean loss": float(means[-1] / g.clean_loss.iloc[-1])})
breaks = pd.DataFrame(rows)
display(breaks.style.format({"largest step (nats)": "{:+.3f}", "mean ΔL at deepest k": "{:+.3f}",
                             "mean clean loss": "{:.3f}", "ΔL / clean loss": "{:.1%}",
                             "first k above threshold": lambda v: "none" if pd.isna(v) else f"{int(v)}"})
        .hide(axis="index"))


# %%
def cliff_sentence(name: str) -> str:
    b = breaks[breaks.model == name]
    d = deepest[deepest.model == name]
    kmax = int(d.k.iloc[0])
    worst = b.loc[b["mean ΔL at deepest k"].idxmax()]
    mildest = b.loc[b["mean ΔL at deepest k"].idxmin()]
    broken = b[b["first k above threshold"].notna()]
    steepest = b.loc[b["largest step (nats)"].idxmax()]
    s = (f"**{name}.** Removing {kmax} of the {kmax + 1} active experts changes the loss by "
         f"{mildest['mean ΔL at deepest k']:+.3f} nats on average at layer {int(mildest.layer)} and by "
         f"{worst['mean ΔL at deepest k']:+.3f} nats at layer {int(worst.layer)} "
         f"({worst['ΔL / clean loss']:.1%} of the clean loss there). ")
    if len(broken):
        s += ("The mean crosses the threshold of "
              f"{cliff_threshold:g} nats at " + ", ".join(
                  f"layer {int(r.layer)} (k = {int(r['first k above threshold'])})" for _, r in broken.iterrows()) + "; ")
        rest = sorted(set(b.layer) - set(broken.layer))
        s += (f"layers {rest} stay below it at every k. " if rest else "no layer stays below it. ")
    else:
        s += f"No layer's mean crosses {cliff_threshold:g} nats at any k: a redundancy buffer everywhere. "
    s += (f"The largest single step of any layer is at layer {int(steepest.layer)}, k = {int(steepest['at k'])} "
          f"({steepest['largest step (nats)']:+.3f} nats). "
          f"At k = {kmax} the median stays between {d.Median.min():+.3f} and {d.Median.max():+.3f} nats "
          f"across layers while the P95 reaches {d.P95.max():+.3f} (layer {int(d.loc[d.P95.idxmax(), 'layer'])}); "
          f"there the 5% of positions with the largest increases contribute "
          f"{d.loc[d.P95.idxmax(), 'top-5% share of increase']:.0%} of the summed increase, while at "
          f"{d.loc[d.P95.idxmax(), 'share below 0 (loss fell)']:.0%} of positions the loss fell "
          f"(P5 {d.loc[d.P95.idxmax(), 'P5']:+.3f} nats).")
    return s


display(Markdown("\n\n".join(cliff_sentence(name) for name in models)))

# %% [markdown]
# ## Reading the result against the paper
# In the paper's OLMoE, layers 0 to 9 stay below +0.083 nats of mean loss change even with
# seven of eight active experts removed, while the last MoE layer breaks at $k = 2$ and reaches
# +0.431 nats; its median stays below +0.02 nats and its P95 reaches +2.6 nats, so the cliff is a
# heavy tail of positions rather than a uniform shift. The argument built on it is structural:
# where a layer has a redundancy buffer, *any* selection criterion removes experts at little
# cost, so the observational metrics cannot be told apart by pruning outcomes there, and any
# token-level signal can only show where the buffer ends. The tables above say whether the
# models audited here have such a buffer, at which layers it ends, and whether the break is a
# shift of the whole distribution (median rising with the mean) or a tail (median flat, P95
# rising).

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** How much of a layer's active computation at a token can be removed, highest-weight
# experts first, before the next-token loss changes appreciably; at which layers and removal
# depths that tolerance ends; and whether the damage is spread over positions or concentrated
# in a tail. This is the regime the paper uses to explain why observational pruning criteria
# "work" without identifying dispensable experts.
#
# **Does not show.** What pruning would do. The ablation here removes experts at *one* token
# and keeps the rest of the sequence intact; pruning removes an expert at every token, in every
# sequence, usually followed by fine-tuning. Removing the highest-weight experts first is also
# only one order: a low-weight-first order would show more redundancy, a random order something
# in between. And the means depend on the sampled positions; the intervals in the figure show
# how much. With the book's default small models, the numbers describe those models, not the
# paper's OLMoE checkpoint.

# %% [markdown]
# ## Exercises
# Each exercise changes parameters only. Predict first, then run the command from the repository
# root and compare with the expected result.
#
# **1. Where is the buffer?** Before running, predict for one model which layer breaks first
# and at which $k$. Then audit only its first and last MoE layers with more positions, so the
# intervals are narrow enough to compare them (layer 1 is the first MoE layer of all three
# shipped models, layer 3 the last):
#
# ```bash
# make chapter NB=06_progressive_ablation PARAMS="-p layers '[1, 3]' -p n_positions 500"
# ```

# %% [markdown]
# ````{admonition} Expected result
# :class: dropdown
# With 500 positions the intervals of the mean shrink by about $\sqrt{500/200} \approx 1.6$.
# The kind of result the paper reports is a flat early layer and a later layer that rises
# steeply from small $k$ on, with a median that stays near zero while the P95 climbs. In
# small models trained briefly the buffer may be thinner everywhere (every layer rises
# steadily) or the break may sit at a different depth; what the exercise tests is whether your
# prediction matched the *shape*, and whether the difference between the two layers exceeds
# the width of the intervals.
# ````

# %% [markdown]
# **2. What counts as a cliff?** The verdict "layer L breaks at k" depends on a threshold that the
# paper does not state. Predict how the table "Where does a layer break?" changes if the
# threshold is halved, then run
#
# ```bash
# make chapter NB=06_progressive_ablation PARAMS="-p cliff_threshold 0.05"
# ```

# %% [markdown]
# ````{admonition} Expected result
# :class: dropdown
# The records are reused from the cache (the threshold only changes the summary), so the run
# is quick. Layers whose mean rises slowly now "break" at some $k$, and layers that already
# broke do so at the same or a smaller $k$. The largest step and the median/P95 values do not
# change. A description of a redundancy cliff that depends on an arbitrary threshold is weaker
# than one that does not: the largest-step column and the median/P95 contrast are the
# threshold-free part of the evidence.
# ````

# %% [markdown]
# **3. Enough context?** The paper's progressive run used only positions with at least 32 tokens
# of context. Predict whether excluding short contexts raises or lowers the loss changes, then run
#
# ```bash
# make chapter NB=06_progressive_ablation PARAMS="-p min_context 32"
# ```

# %% [markdown]
# ````{admonition} Expected result
# :class: dropdown
# A new draw of positions is made, so all records are computed afresh. The mean clean loss of
# the drawn positions falls (more context, better predictions; see the "mean clean loss" column).
# The loss changes can move either way: a confident prediction has more to lose, but a long
# context also offers more routes to the same prediction. The typical outcome is a modest change
# in the means with the same ordering of layers. If the ordering of layers changes, the earlier
# conclusion depended on which positions were drawn.
# ````
