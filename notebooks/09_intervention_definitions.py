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
# # Beyond the paper (1): does the definition of the intervention change the verdict?
#
# An interventional audit is only as precise as the intervention it names. The paper defines
# its intervention at one token (Definition 2.1: the loss at position $t$ "with $E_i$ replaced by
# zero" at $t$) and defines its four observational metrics over real tokens with softmax routing
# probabilities (Section 2). The authors' released code departs from both definitions in ways
# that are easy to make in any audit:
#
# * **The intervention.** The released code zeroes the expert at *every* position of the
#   sequence where it is routed, not only at $t$. Call this the *sequence-wide* ablation and
#   the paper's the *token-local* one. The loss at $t$ then also carries, through attention,
#   the effect of removing the expert at earlier positions.
# * **The metrics.** For OLMoE the released script records router *logits* (not probabilities)
#   over padded batches, so "utilization" becomes a mean logit and padding enters every
#   statistic; for DeepSeek the utilization counts padding positions; for Qwen "activation std"
#   is the spread of the first 32 coordinates of the expert outputs rather than of their norms.
# * **The precision.** The released progressive ablation ran in float16.
#
# This chapter runs the same audit cells — same positions, same layers, same pairs of
# experts — under each choice and asks three questions: how far apart are the measurements,
# and does any verdict (significant or not) change? It ends with a short list of lessons for
# anyone designing such an audit, and exercises.
#
# **Conventions.** $\Delta$ is the change of the next-token loss
# $-\log p(x_{t+1}\mid x_{\le t})$ in nats when one expert is removed; $D = \Delta_{\text{high}} -
# \Delta_{\text{low}}$ the paired difference between the highest- and lowest-ranked active
# expert at a position; $d_z = \bar D / s_D$ Cohen's effect size of a cell. A verdict is either
# the paper's dual rule (paired t-test *and* Wilcoxon below the Bonferroni level of the family,
# pointing the same way; families as in the audit and control chapters: the 4 metrics × layers of
# a model, and the control layers of a model) or the looser "uncorrected $p_t < 0.05$".

# %% tags=["parameters"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # token positions per cell (the paper: 200); the same draw in every mode
seed = 42
modes = ["token", "sequence"]  # the paper's definition first, the released code's second
half_dtype = "bfloat16"  # precision compared against `dtype` in the noise-floor section
dtype = "float32"
device = "cpu"
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
alpha = 0.05
n_boot = 2000  # bootstrap resamples for the confidence intervals of differences of d_z
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
data_dir = None  # folder with wikitext-2/ and paper-released/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %%
import gc
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display
from matplotlib.patches import Patch, Rectangle
from scipy import stats as sps

from moeaudit import released, report, stats
from moeaudit.audit import paired_cells, prepare, single_expert_records
from moeaudit.engine import expert_outputs
from moeaudit.metrics import METRIC_LABELS, METRICS, ROUTING_WEIGHT

report.use_book_style()
corpus_source = report.show_corpus(corpus, data_dir=data_dir)
if len(modes) != 2 or len(set(modes)) != 2 or not set(modes) <= {"token", "sequence"}:
    raise ValueError(f"modes={modes!r} must name the two intervention definitions, e.g. ['token', 'sequence']")
if half_dtype == dtype:
    raise ValueError(f"half_dtype={half_dtype!r} must differ from dtype={dtype!r}: the noise floor compares two precisions")
MODE_A, MODE_B = modes
RANKINGS = [*METRICS, ROUTING_WEIGHT]
LABEL = {**METRIC_LABELS, ROUTING_WEIGHT: "Routing weight (control)"}


def fmt_list(values, f="{:.3g}"):
    return ", ".join(f.format(v) for v in values)


def per_model(series, f="{:.3g}"):
    """'model-a 0.1, model-b 0.2' from a Series indexed by model name."""
    return ", ".join(f"{name} {f.format(v)}" for name, v in series.items())


# %% [markdown]
# ## 1. Two interventions, one picture
#
# Each square below is the hidden state (residual stream) of one position after one layer.
# An expert $e$ is routed at some earlier positions and at the audited token $t$; the loss at $t$
# is read from the top square of column $t$ (★). Removing $e$ changes the MoE output of the
# ablated layer at the positions where it is removed (dark); from the next layer on, attention
# carries every change to all later positions (light). Under the token-local definition only
# column $t$ ever changes, whatever the layer. Under the sequence-wide definition, ablating at a
# middle layer changes earlier columns, whose keys and values the token $t$ reads at every
# later layer — so the two definitions measure different things. At the **last** layer there is
# no attention left: the earlier columns change, but nothing reads them before the loss, so the
# two definitions give the same number. This holds at the last *decoder* layer; if a model ended
# with dense layers after its last MoE layer, the two would differ everywhere.

# %%
def changed_states(n_pos, n_layers, t, layer, routed, mode):
    """0 = unchanged, 1 = the expert is removed here, 2 = changed downstream (residual stream, attention)."""
    state = np.zeros((n_layers, n_pos), dtype=int)
    direct = [p for p in range(t + 1) if p == t or (mode == "sequence" and p in routed)]
    state[layer, direct] = 1
    for ell in range(layer + 1, n_layers):
        # position p keeps its own change and reads every earlier position q <= p through attention
        reach = np.cumsum(state[ell - 1, : t + 1] > 0) > 0
        state[ell, : t + 1] = np.where(reach, 2, 0)
    return state


n_pos_demo, n_layers_demo, t_demo, routed_demo = 9, 6, 7, {1, 3, 4, 7}
shades = {0: "0.93", 1: sns.color_palette("colorblind")[3], 2: sns.color_palette("colorblind")[1]}
fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.4), sharex=True, sharey=True)
for row, (abl_layer, where) in enumerate([(2, "a middle layer"), (n_layers_demo - 1, "the last layer")]):
    for col, mode_demo in enumerate(["token", "sequence"]):
        ax = axes[row, col]
        grid = changed_states(n_pos_demo, n_layers_demo, t_demo, abl_layer, routed_demo, mode_demo)
        for ell in range(n_layers_demo):
            for p in range(n_pos_demo):
                faded = p > t_demo
                ax.add_patch(Rectangle((p - 0.45, ell - 0.45), 0.9, 0.9, facecolor="white" if faded else shades[grid[ell, p]],
                                       edgecolor="0.75", hatch="////" if faded else None, linewidth=0.6))
        for p in sorted(routed_demo):
            ax.text(p, -0.95, "e", ha="center", va="center", fontsize=9, color="0.25")
        ax.axhline(abl_layer, color="0.2", linewidth=0.8, linestyle=":")
        ax.plot([t_demo], [n_layers_demo - 0.2], marker="*", markersize=12, color="black")
        ax.set_xlim(-0.6, n_pos_demo - 0.4)
        ax.set_ylim(-1.3, n_layers_demo + 0.1)
        ax.set_title(f"{mode_demo}-{'local' if mode_demo == 'token' else 'wide'}, ablated at {where}", fontsize=10, pad=6)
        ax.grid(False)
        ax.set_xticks(range(n_pos_demo), [("t" if p == t_demo else str(p)) for p in range(n_pos_demo)])
        ax.set_yticks(range(n_layers_demo), [str(i) for i in range(n_layers_demo)])
fig.supxlabel("token position (letters 'e': positions where the expert is routed at the ablated layer)", fontsize=10, y=0.135)
fig.supylabel("layer (hidden state after it)", fontsize=10)
fig.legend(handles=[Patch(facecolor=shades[1], label="changed: expert removed here"),
                    Patch(facecolor=shades[2], label="changed downstream (residual, attention)"),
                    Patch(facecolor=shades[0], edgecolor="0.75", label="unchanged"),
                    Patch(facecolor="white", edgecolor="0.75", hatch="////", label="after t: not part of the prefix"),
                    plt.Line2D([], [], marker="*", color="black", linestyle="", markersize=11, label="loss at t read here")],
           loc="lower center", ncol=3, fontsize=8.5, frameon=False)
fig.suptitle("Which hidden states an ablation changes, by definition and layer")
fig.tight_layout(rect=(0.01, 0.155, 1, 1))

# %% [markdown]
# ## 2. The same cells under both definitions
#
# For every model the positions are the audit chapter's seeded draw and every active routed
# expert is ablated once on its own at each audited layer, in each mode. The token-local records
# are the audit chapter's records (read from the same cache); the sequence-wide records re-run
# the prefix $x_{\le t}$ with the expert removed at every position where it is routed. The
# metric values and the per-token routing weights come from one clean pass, so the pairs of
# experts compared at a position are identical in both modes: only the measured $\Delta$ differ.

# %%
contexts, records, audited_layers = {}, {}, {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    contexts[name] = ctx
    lay = ctx.model.layout
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    audited_layers[name] = audited
    for m in modes:
        records[name, m] = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=m,
                                                 batch_size=batch_size)
    display(Markdown(f"**{name}** ({lay.family}): MoE layers {list(lay.moe_layers)} of {lay.n_layers} decoder "
                     f"layers, {lay.num_experts} routed experts, top-{lay.top_k}; audited layers {audited}; "
                     f"{len(records[name, MODE_A]):,} single-expert ablations per mode."))

# %% [markdown]
# ### Where the two definitions agree: layer by layer
# Each record of one mode has a twin in the other (same position, layer and expert). The table
# gives, per audited layer, the largest and the median absolute difference
# $|\Delta_{\text{token}} - \Delta_{\text{sequence}}|$ over all records, the median $|\Delta|$ of
# each mode for scale, and the Spearman correlation of the two across records. The two modes
# are computed along different code paths (a single-token step on a cached prefix, and a full
# prefix forward), so even identical quantities differ by float rounding: the *rounding floor*
# column is the largest difference between the un-ablated losses the two paths compute at the
# same positions.

# %%
twin_rows, twins = [], {}
for name in models:
    a, b = records[name, MODE_A], records[name, MODE_B]
    key = ["seq_id", "t", "layer", "expert"]
    tw = a[key + ["delta_loss", "clean_loss"]].merge(b[key + ["delta_loss", "clean_loss"]], on=key,
                                                      suffixes=(f"_{MODE_A}", f"_{MODE_B}"))
    tw["abs_diff"] = (tw[f"delta_loss_{MODE_A}"] - tw[f"delta_loss_{MODE_B}"]).abs()
    twins[name] = tw
    lay = contexts[name].model.layout
    floor = float((tw[f"clean_loss_{MODE_A}"] - tw[f"clean_loss_{MODE_B}"]).abs().max())
    for L, g in tw.groupby("layer"):
        twin_rows.append({
            "model": name, "layer": L, "last decoder layer": L == lay.n_layers - 1,
            "max |Δ_tok − Δ_seq|": g.abs_diff.max(), "median |Δ_tok − Δ_seq|": g.abs_diff.median(),
            "rounding floor": floor,
            f"median |Δ| {MODE_A}": g[f"delta_loss_{MODE_A}"].abs().median(),
            f"median |Δ| {MODE_B}": g[f"delta_loss_{MODE_B}"].abs().median(),
            "Spearman ρ": sps.spearmanr(g[f"delta_loss_{MODE_A}"], g[f"delta_loss_{MODE_B}"]).statistic,
            "records": len(g),
        })
agreement = pd.DataFrame(twin_rows)
display(agreement.style.format({c: "{:.2e}" for c in agreement.columns if "|" in c or c == "rounding floor"}
                               | {"Spearman ρ": "{:+.3f}"}).hide(axis="index")
        .set_caption("Token-local vs sequence-wide ablation of the same expert at the same position (Δ in nats)"))

# %%
fig, axes = plt.subplots(1, len(models), figsize=(4.3 * len(models), 3.7), sharey=True, squeeze=False)
pal = sns.color_palette("colorblind")
tiny = 1e-12  # exact zeros are drawn at this height on the log axis
for ax, name in zip(axes[0], models):
    g = agreement[agreement.model == name]
    x = np.arange(len(g))
    ax.plot(x, g["max |Δ_tok − Δ_seq|"].clip(lower=tiny), marker="o", color=pal[0], label="max |Δ_tok − Δ_seq|")
    ax.plot(x, g["median |Δ_tok − Δ_seq|"].clip(lower=tiny), marker="s", color=pal[2], label="median |Δ_tok − Δ_seq|")
    ax.plot(x, g[f"median |Δ| {MODE_A}"].clip(lower=tiny), marker="^", linestyle="--", color="0.45",
            label="median |Δ| (token-local), for scale")
    ax.axhline(max(g["rounding floor"].iloc[0], tiny), color=pal[3], linestyle=":", label="rounding floor")
    for xi, v in zip(x, g["median |Δ_tok − Δ_seq|"]):
        if v == 0:
            ax.annotate("exactly 0", (xi, tiny), textcoords="offset points", xytext=(-4, 7), ha="right", fontsize=8, color=pal[2])
    ax.set_yscale("log")
    ax.set_xticks(x, [f"L{L}" + ("\n(last)" if last else "") for L, last in zip(g.layer, g["last decoder layer"])])
    ax.set_xlabel("audited MoE layer")
    ax.set_title(name)
axes[0][0].set_ylabel("loss change (nats, log scale;\nexact zeros drawn at 1e-12)")
axes[0][-1].legend(fontsize=7.5, loc="lower left")
fig.suptitle("Token-local and sequence-wide ablations coincide only at the last layer")
fig.tight_layout()

# %%
last_rows = agreement[agreement["last decoder layer"]]
other_rows = agreement[~agreement["last decoder layer"]]
lines = []
if len(last_rows):
    worst_last = last_rows.loc[last_rows["max |Δ_tok − Δ_seq|"].idxmax()]
    last_ratio = (last_rows["max |Δ_tok − Δ_seq|"] / last_rows["rounding floor"].clip(lower=1e-12)).max()
    lines.append(f"At the last decoder layer the largest difference over all records of all models is "
                 f"{worst_last['max |Δ_tok − Δ_seq|']:.1e} nats, at most {last_ratio:.1f} times the rounding floor of the "
                 f"same model (a Δ is the difference of two losses, each carrying rounding of that size), and the median "
                 f"difference is {fmt_list(last_rows['median |Δ_tok − Δ_seq|'], '{:.1e}')} nats: the two definitions agree "
                 f"up to float rounding, as the picture says they must.")
else:
    lines.append("No audited layer is the last decoder layer, so no layer is expected to agree.")
if len(other_rows):
    ratio = (other_rows["max |Δ_tok − Δ_seq|"] / other_rows["rounding floor"].clip(lower=1e-12))
    size_ratio = other_rows[f"median |Δ| {MODE_B}"] / other_rows[f"median |Δ| {MODE_A}"]
    lines.append(f"At every other audited layer the largest difference is between "
                 f"{other_rows['max |Δ_tok − Δ_seq|'].min():.2g} and {other_rows['max |Δ_tok − Δ_seq|'].max():.2g} nats "
                 f"(at least {ratio.min():,.0f} times the rounding floor), the median difference between "
                 f"{other_rows['median |Δ_tok − Δ_seq|'].min():.2g} and {other_rows['median |Δ_tok − Δ_seq|'].max():.2g} nats, "
                 f"and the Spearman correlation between the two measurements of the same ablation between "
                 f"{other_rows['Spearman ρ'].min():+.3f} and {other_rows['Spearman ρ'].max():+.3f}. Per layer, the median |Δ| "
                 f"of the {MODE_B}-mode ablation is {size_ratio.min():.2f}–{size_ratio.max():.2f} times that of the {MODE_A}-mode "
                 f"one (largest at layer {int(other_rows.loc[size_ratio.idxmax(), 'layer'])} of {other_rows.loc[size_ratio.idxmax(), 'model']}).")
display(Markdown(" ".join(lines)))

# %% [markdown]
# ### Cell by cell: effect sizes, their difference, and the verdicts
# Every cell of the audit (four metrics × layers) and of the routing-weight control (one per
# layer) is computed from each mode's records. Because the positions and the pairs of experts
# are the same, the two $d_z$ of a cell are paired: the confidence interval of their difference
# comes from a paired bootstrap over positions (positions resampled with both of their $D$
# values; bias-corrected and accelerated, `scipy.stats.bootstrap`). A verdict *flips* when a
# cell is significant in one mode and not in the other.

# %%
def dz_vec(a, axis=-1):
    return np.mean(a, axis=axis) / np.std(a, axis=axis, ddof=1)


def dz_difference_ci(d1, d2, *, rng_seed):
    """95% paired-bootstrap CI of d_z(d1) - d_z(d2) (positions resampled together)."""
    d1, d2 = np.asarray(d1, float), np.asarray(d2, float)
    if np.array_equal(d1, d2):
        return 0.0, 0.0
    kw = dict(paired=True, vectorized=True, n_resamples=n_boot, confidence_level=0.95)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sps.DegenerateDataWarning)
        try:
            res = sps.bootstrap((d1, d2), lambda a, b, axis: dz_vec(a, axis) - dz_vec(b, axis), method="BCa",
                                rng=np.random.default_rng(rng_seed), **kw)
        except sps.DegenerateDataWarning:
            res = sps.bootstrap((d1, d2), lambda a, b, axis: dz_vec(a, axis) - dz_vec(b, axis), method="percentile",
                                rng=np.random.default_rng(rng_seed), **kw)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def cells_for(rec, metrics_table, *, variant):
    c = paired_cells(rec, metrics_table, rankings=RANKINGS)
    c["set"] = np.where(c.ranking == ROUTING_WEIGHT, "control", "metrics")
    c["variant"] = variant
    return c


def table_for(cells):
    return stats.audit_table(cells, by=("model", "variant", "set", "ranking", "layer"), high_col="delta_loss_high",
                             low_col="delta_loss_low", family=("model", "variant", "set"), alpha=alpha)


def compare_variants(cells, table, va, vb):
    """One row per cell: d_z under variants va and vb, bootstrap CI of the difference, verdicts."""
    key = ["model", "set", "ranking", "layer"]
    ta, tb = (table[table.variant == v].set_index(key) for v in (va, vb))
    groups = {v: dict(list(cells[cells.variant == v].groupby(["model", "ranking", "layer"], sort=False)))
              for v in (va, vb)}
    rows = []
    for i, (k, ra) in enumerate(ta.iterrows()):
        if k not in tb.index:
            continue
        rb = tb.loc[k]
        ca, cb = groups[va][k[0], k[2], k[3]], groups[vb][k[0], k[2], k[3]]
        both = ca[["seq_id", "t", "diff"]].merge(cb[["seq_id", "t", "diff"]], on=["seq_id", "t"], suffixes=("_a", "_b"))
        lo, hi = dz_difference_ci(both.diff_a, both.diff_b, rng_seed=seed + i)
        rows.append({**dict(zip(key, k)), "n": len(both), "dz_a": ra.cohens_dz, "dz_b": rb.cohens_dz,
                     "ddz": dz_vec(both.diff_a.to_numpy()) - dz_vec(both.diff_b.to_numpy()), "ddz_lo": lo, "ddz_hi": hi,
                     "dual_a": bool(ra.sig_dual_bonf), "dual_b": bool(rb.sig_dual_bonf),
                     "p05_a": bool(ra.p_t < alpha), "p05_b": bool(rb.p_t < alpha),
                     "p_t_a": ra.p_t, "p_t_b": rb.p_t})
    out = pd.DataFrame(rows)
    out["flip_dual"] = out.dual_a != out.dual_b
    out["flip_p05"] = out.p05_a != out.p05_b
    return out


def styled_comparison(cmp, name, la, lb, caption):
    t = cmp[cmp.model == name].copy()

    def mark(dz, dual, p05):
        return f"{dz:+.3f}{' ★' if dual else ''}{' •' if p05 else ''}"

    view = pd.DataFrame({
        "ranking": [LABEL[r] for r in t.ranking], "layer": [f"L{L}" for L in t.layer],
        f"d_z {la}": [mark(*r) for r in zip(t.dz_a, t.dual_a, t.p05_a)],
        f"d_z {lb}": [mark(*r) for r in zip(t.dz_b, t.dual_b, t.p05_b)],
        "difference [95% CI]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(t.ddz, t.ddz_lo, t.ddz_hi)],
        "verdict flips": [", ".join(s for s, f in (("dual rule", fd), ("uncorrected p_t", fp)) if f) or "–"
                          for fd, fp in zip(t.flip_dual, t.flip_p05)],
    })
    excl = ~((t.ddz_lo <= 0) & (t.ddz_hi >= 0)).to_numpy()
    flip = (t.flip_dual | t.flip_p05).to_numpy()

    def css(df):
        out = pd.DataFrame("", index=df.index, columns=df.columns)
        out.loc[excl, "difference [95% CI]"] = "font-weight: bold"
        out.loc[flip, "verdict flips"] = "background-color: #fde0c5"
        return out

    return (view.style.apply(css, axis=None).hide(axis="index").set_caption(caption)
            .set_properties(**{"text-align": "center", "font-size": "0.88em"}))


cells_mode = pd.concat([cells_for(records[name, m], contexts[name].metrics, variant=m) for name in models for m in modes],
                       ignore_index=True)
table_mode = table_for(cells_mode)
cmp_mode = compare_variants(cells_mode, table_mode, MODE_A, MODE_B)
for name in models:
    display(Markdown(f"#### {name}"))
    display(styled_comparison(cmp_mode, name, MODE_A, MODE_B,
                              f"{name}: Cohen's d_z per cell, {MODE_A}-mode vs {MODE_B}-mode ablation; n = {n_positions} positions"))
display(Markdown(
    "★: significant under the dual rule (Bonferroni within the model's family of cells, t-test and Wilcoxon agreeing). "
    "•: uncorrected p_t < 0.05. *difference*: d_z(first mode) − d_z(second mode) with its paired-bootstrap 95% CI; "
    "**bold** where the interval excludes zero. Shaded: a verdict that changes between the modes."))

# %%
fig, ax = plt.subplots(figsize=(6.2, 5.2))
colors = report.model_colors(models)
markers = dict(zip(RANKINGS, ["o", "s", "D", "^", "*"]))
for r in cmp_mode.itertuples():
    last = r.layer == contexts[r.model].model.layout.n_layers - 1
    ax.scatter(r.dz_a, r.dz_b, color=colors[r.model], marker=markers[r.ranking], s=70 if r.ranking == ROUTING_WEIGHT else 38,
               edgecolor="black" if last else "none", linewidth=1.0, alpha=0.9)
lim = float(np.nanmax(np.abs(cmp_mode[["dz_a", "dz_b"]].to_numpy()))) * 1.1 + 0.02
ax.plot([-lim, lim], [-lim, lim], color="0.4", linewidth=0.8)
ax.axhline(0, color="0.8", linewidth=0.6)
ax.axvline(0, color="0.8", linewidth=0.6)
ax.set_xlim(-lim, lim)
ax.set_ylim(-lim, lim)
ax.set_xlabel(f"Cohen's $d_z$, {MODE_A}-mode ablation")
ax.set_ylabel(f"Cohen's $d_z$, {MODE_B}-mode ablation")
handles = [Patch(color=colors[m], label=m) for m in models]
handles += [plt.Line2D([], [], marker=markers[r], color="0.3", linestyle="", label=LABEL[r]) for r in RANKINGS]
handles += [plt.Line2D([], [], marker="o", markerfacecolor="white", markeredgecolor="black", linestyle="",
                       label="last decoder layer")]
ax.legend(handles=handles, fontsize=7.5, loc="upper left")
ax.set_title("Same cells, two intervention definitions")
fig.tight_layout()

# %%
def flip_summary(cmp, la, lb):
    parts = []
    for name in models:
        t = cmp[cmp.model == name]
        fl = t[t.flip_dual | t.flip_p05]
        excl = t[~((t.ddz_lo <= 0) & (t.ddz_hi >= 0))]
        s = (f"**{name}**: |d_z({la}) − d_z({lb})| up to {t.ddz.abs().max():.3f} (median {t.ddz.abs().median():.3f}) over "
             f"{len(t)} cells; {len(excl)} difference interval(s) exclude zero. ")
        if len(fl):
            s += "Verdicts that change: " + "; ".join(
                f"{LABEL[r.ranking]} L{r.layer} ({'dual rule' if r.flip_dual else ''}{' and ' if r.flip_dual and r.flip_p05 else ''}"
                f"{'p_t < .05' if r.flip_p05 else ''}: p_t = {r.p_t_a:.3g} vs {r.p_t_b:.3g})" for r in fl.itertuples()) + "."
        else:
            s += "No verdict changes, under either rule."
        parts.append(s)
    return "\n\n".join(parts)


display(Markdown(flip_summary(cmp_mode, MODE_A, MODE_B)))

# %% [markdown]
# ## 3. The paper's metric definitions and the released ones
#
# The released scripts compute the four metrics differently for each model (see the
# re-analysis chapter). Here each departure is re-implemented on the book's models, following
# the script written for the real model the book's model stands in for, and applied to the
# same clean texts:
#
# | recipe | utilization rate | mean routing weight when active | activation norm | activation std |
# | --- | --- | --- | --- | --- |
# | paper (Section 2) | share of real tokens selecting $i$ | mean softmax probability $g_i$ over those tokens | mean $\lVert E_i(x)\rVert$ over those tokens | std of $\lVert E_i(x)\rVert$ over those tokens |
# | OLMoE script | mean router **logit** of $i$ over all positions, **padding included** | mean router **logit** over padded positions selecting $i$ ¹ | as paper, padding included | as paper, padding included |
# | DeepSeek script | share of positions selecting $i$, **padding included** | as paper | as paper | as paper |
# | Qwen script | count / ($k$ · real tokens) | as paper | as paper, **first 30 texts only** | std of the **first 32 coordinates** of every output $E_i(x)$, pooled |
#
# ¹ The released OLMoE script averages logits over a mask that is built incorrectly; the mean
# over the positions that select the expert is the closest well-defined reading, so the
# distance measured here is, if anything, a lower bound for that metric.
#
# To include padding the texts are run right-padded to the longest text, as one batch would be,
# and the router logits, the routing decisions and the raw expert outputs are recorded at every
# position. The same pass also recomputes the paper's definitions on the real positions, which
# checks the code path against the clean pass of the audit.

# %%
FAMILY_RECIPE = {"olmoe": "OLMoE script", "mixtral": "OLMoE script", "deepseek_v2": "DeepSeek script",
                 "qwen2_moe": "Qwen script", "qwen3_moe": "Qwen script"}
RECIPES = ["OLMoE script", "DeepSeek script", "Qwen script"]
N_COORDS, N_TEXTS_NORM = 32, 30  # the Qwen script's choices


@torch.no_grad()
def padded_pass(ctx, layers_, *, texts_per_batch=8):
    """Router logits, routing decisions, expert output norms and first coordinates at every position
    of the corpus right-padded to its longest text (padding included)."""
    model, corpus = ctx.model, ctx.corpus
    width = int(corpus.lengths.max())
    out = {L: {k: [] for k in ("logits", "idx", "prob", "norm", "coords")} for L in layers_}
    real_all, seq_all = [], []
    for start in range(0, len(corpus), texts_per_batch):
        chunk = list(range(start, min(start + texts_per_batch, len(corpus))))
        ids, mask = corpus.padded(chunk, pad_id=model.pad_id, length=width)
        saved = {}
        with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), remote=model.remote):
            for L in layers_:
                mlp = model.layers()[L].mlp
                x = mlp.input.save()  # nnsight needs the accesses in execution order: input, then router
                r_logits, _, r_idx = mlp.gate.output
                saved[L] = (x, r_logits.save(), r_idx.save())
        real_all.append(mask.reshape(-1).bool().numpy())
        seq_all.append(np.repeat(np.array(chunk), width))
        for L in layers_:
            x, lg, idx = saved[L]
            x = x.reshape(-1, x.shape[-1])
            idx = idx.reshape(x.shape[0], -1)
            lg = lg.reshape(x.shape[0], -1).float()
            y = expert_outputs(model.hf.model.layers[L].mlp.experts, x, idx.to(x.device)).float()
            out[L]["logits"].append(lg.cpu().numpy().astype(np.float64))
            out[L]["idx"].append(idx.cpu().numpy().astype(np.int64))
            out[L]["prob"].append(torch.softmax(lg, -1).gather(1, idx.to(lg.device)).cpu().numpy().astype(np.float64))
            out[L]["norm"].append(torch.linalg.vector_norm(y, dim=-1).cpu().numpy().astype(np.float64))
            out[L]["coords"].append(y[..., :N_COORDS].cpu().numpy().astype(np.float32))
    arrays = {L: {k: np.concatenate(v) for k, v in d.items()} for L, d in out.items()}
    return arrays, np.concatenate(real_all), np.concatenate(seq_all)


def per_expert(idx, values, rows, num_experts, how):
    """Aggregate ``values`` (N, k) over the (row, slot) pairs that select each expert, rows restricted."""
    e = idx[rows].reshape(-1)
    v = values[rows].reshape(-1) if values.ndim == 2 else values[rows].reshape(-1, values.shape[-1])
    out = np.full(num_experts, np.nan)
    for j in np.unique(e):
        sel = v[e == j]
        if how == "mean":
            out[j] = sel.mean()
        elif how == "std":
            out[j] = sel.std(ddof=1) if sel.size > 1 else np.nan
        elif how == "pooled_std":
            out[j] = sel.reshape(-1).std(ddof=1) if sel.size > 1 else np.nan
    return out


def metric_tables(ctx, arrays, real, seq_ids):
    E, k = ctx.model.layout.num_experts, ctx.model.layout.top_k
    everything = np.ones_like(real)
    tables = {}
    for recipe in ["paper (re-computed)", *RECIPES]:
        frames = []
        for L, a in arrays.items():
            idx = a["idx"]
            paper = {
                "utilization_rate": np.bincount(idx[real].reshape(-1), minlength=E) / real.sum(),
                "mean_routing_weight": per_expert(idx, a["prob"], real, E, "mean"),
                "activation_norm": per_expert(idx, a["norm"], real, E, "mean"),
                "activation_std": per_expert(idx, a["norm"], real, E, "std"),
            }
            m = dict(paper)
            if recipe == "OLMoE script":
                lg_sel = np.take_along_axis(a["logits"], idx, axis=1)
                m["utilization_rate"] = a["logits"].mean(axis=0)
                m["mean_routing_weight"] = per_expert(idx, lg_sel, everything, E, "mean")
                m["activation_norm"] = per_expert(idx, a["norm"], everything, E, "mean")
                m["activation_std"] = per_expert(idx, a["norm"], everything, E, "std")
            elif recipe == "DeepSeek script":
                m["utilization_rate"] = np.bincount(idx.reshape(-1), minlength=E) / len(idx)
            elif recipe == "Qwen script":
                m["utilization_rate"] = np.bincount(idx[real].reshape(-1), minlength=E) / (k * real.sum())
                m["activation_norm"] = per_expert(idx, a["norm"], real & (seq_ids < N_TEXTS_NORM), E, "mean")
                m["activation_std"] = per_expert(idx, a["coords"], real, E, "pooled_std")
            df = pd.DataFrame({"layer": L, "expert": np.arange(E), **m})
            frames.append(df)
        tables[recipe] = pd.concat(frames, ignore_index=True)
    return tables


metric_defs, pad_share, recheck = {}, {}, {}
for name in models:
    ctx = contexts[name]
    arrays, real, seq_ids = padded_pass(ctx, audited_layers[name])
    metric_defs[name] = metric_tables(ctx, arrays, real, seq_ids)
    pad_share[name] = 1 - real.mean()
    a = metric_defs[name]["paper (re-computed)"].set_index(["layer", "expert"])[list(METRICS)]
    b = ctx.metrics.set_index(["layer", "expert"]).loc[a.index, list(METRICS)]
    recheck[name] = float(np.nanmax(np.abs(a.to_numpy() - b.to_numpy()) / np.maximum(np.abs(b.to_numpy()), 1e-12)))
    del arrays
display(Markdown(
    "Share of padding positions in the padded batch: " + "; ".join(f"{n}: {pad_share[n]:.1%}" for n in models)
    + " (the authors' OLMoE run: about 62%). The paper's definitions recomputed from the real positions of this padded "
    "pass agree with the metrics of the audit's clean pass "
    + ("exactly, for every model" if max(recheck.values()) == 0 else
       "to a largest relative deviation of " + "; ".join(f"{n}: {recheck[n]:.1e}" for n in models))
    + ": padding does not leak into real positions (causal attention, masked keys), so the recipes below differ from "
    "the paper's definitions only by what they compute, not by the pass they compute it from."))

# %% [markdown]
# ### How far apart are the definitions? Spearman correlation across experts
# For each audited layer, the vector of one metric over all routed experts under the paper's
# definition is rank-correlated with the same vector under each released recipe. A value of
# +1 means the recipe orders the experts exactly as the paper's definition does — which is all
# the audit uses, since it only ranks the active experts at a token. Experts never selected
# (undefined metric) are left out. Each model's own recipe is the one its real counterpart was
# audited with; the other two show how sensitive the ranking is to each departure.

# %%
rho_rows = []
for name in models:
    paper = metric_defs[name]["paper (re-computed)"]
    for recipe in RECIPES:
        rel = metric_defs[name][recipe]
        for L in audited_layers[name]:
            p, r = paper[paper.layer == L], rel[rel.layer == L]
            for metric in METRICS:
                ok = p[metric].notna().to_numpy() & r[metric].notna().to_numpy()
                x, y = p[metric].to_numpy()[ok], r[metric].to_numpy()[ok]
                rho = np.nan if ok.sum() < 3 or np.ptp(x) == 0 or np.ptp(y) == 0 else sps.spearmanr(x, y).statistic
                rho_rows.append({"model": name, "recipe": recipe, "own": FAMILY_RECIPE.get(contexts[name].model.layout.family) == recipe,
                                 "layer": L, "metric": metric, "rho": rho, "experts": int(ok.sum())})
rho_defs = pd.DataFrame(rho_rows)

fig, axes = plt.subplots(len(models), 1, figsize=(7.5, 4.3 * len(models)), squeeze=False)
for ax, name in zip(axes[:, 0], models):
    g = rho_defs[rho_defs.model == name]
    mat = g.pivot_table(index=["recipe", "metric"], columns="layer", values="rho", sort=False, dropna=False)
    own = FAMILY_RECIPE.get(contexts[name].model.layout.family)
    mat.index = [f"{'▶ ' if rcp == own else ''}{rcp}: {METRIC_LABELS[m]}" for rcp, m in mat.index]
    mat.columns = [f"L{L}" for L in mat.columns]
    sns.heatmap(mat, ax=ax, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt=".2f", annot_kws={"fontsize": 7.5},
                cbar_kws={"label": "Spearman ρ, paper vs recipe"})
    ax.set_xlabel("audited MoE layer")
    ax.set_ylabel("")
    ax.set_title(f"{name} (▶: its own recipe)")
fig.suptitle("Rank agreement between the paper's and the released metric definitions")
fig.tight_layout()

# %%
own_rho = rho_defs[rho_defs.own]
changed = own_rho[own_rho.rho < 0.999]
parts = []
for name in models:
    g = own_rho[own_rho.model == name]
    if not len(g):
        parts.append(f"**{name}**: no released recipe corresponds to its family.")
        continue
    by_metric = g.groupby("metric", sort=False).rho.agg(["min", "max"])
    parts.append(f"**{name}** ({g.recipe.iloc[0]}): " + "; ".join(
        f"{METRIC_LABELS[m]} ρ ∈ [{r['min']:+.2f}, {r['max']:+.2f}]" for m, r in by_metric.iterrows()) + ".")
display(Markdown("Per model, the range over layers of ρ between the paper's definition and the model's own released "
                 "recipe: " + " ".join(parts) + f" Of the {len(own_rho)} metric-layer vectors, {len(changed)} are ordered "
                 "differently from the paper's definition (ρ < 0.999)."))

# %% [markdown]
# ### Do the released definitions change the audit?
# The records are the same; only the table that ranks the experts changes. Each model is
# re-audited with its own recipe, in the token-local mode (the definition question alone) and in
# the sequence-wide mode (the released pipeline as a whole: released metrics *and* released
# intervention). The control ranking uses the per-token probability in every variant, so only
# the four metric rows can change.

# %%
def_cells = []
for name in models:
    own = FAMILY_RECIPE.get(contexts[name].model.layout.family, "OLMoE script")
    rel = metric_defs[name][own]
    for m in modes:
        c = paired_cells(records[name, m], rel, rankings=list(METRICS))
        c["set"], c["variant"] = "metrics", f"released defs, {m}"
        def_cells.append(c)
def_cells = pd.concat(def_cells, ignore_index=True)
cells_def = pd.concat([cells_mode[cells_mode.set == "metrics"].assign(variant=lambda d: "paper defs, " + d.variant),
                       def_cells], ignore_index=True)
# the paper-definition cells were already tested above, in the same families (a model's metric cells per mode)
table_def = pd.concat([table_mode[table_mode.set == "metrics"].assign(variant=lambda d: "paper defs, " + d.variant),
                       table_for(def_cells)], ignore_index=True)
cmp_def = compare_variants(cells_def, table_def, f"paper defs, {MODE_A}", f"released defs, {MODE_A}")
for name in models:
    display(Markdown(f"#### {name}"))
    display(styled_comparison(cmp_def, name, "paper defs", "released defs",
                              f"{name}: Cohen's d_z per metric cell, paper's vs released metric definitions "
                              f"({MODE_A}-mode records); n = {n_positions} positions"))
display(Markdown("Conventions as in the previous tables. Where a recipe does not change a metric's order of the "
                 "experts, the two columns are identical by construction."))
display(Markdown(flip_summary(cmp_def, "paper", "released")))

# %%
variants = [f"paper defs, {MODE_A}", f"paper defs, {MODE_B}", f"released defs, {MODE_A}", f"released defs, {MODE_B}"]
grid = table_def.groupby(["model", "variant"], sort=False).agg(
    cells=("p_t", "size"), dual_bonferroni=("sig_dual_bonf", "sum"),
    uncorrected_p_t=("p_t", lambda p: int((p < alpha).sum())),
    max_abs_dz=("cohens_dz", lambda d: float(d.abs().max()))).reset_index()
grid["variant"] = pd.Categorical(grid.variant, variants, ordered=True)
grid["model"] = pd.Categorical(grid.model, models, ordered=True)
grid = grid.sort_values(["model", "variant"])
display(grid.style.format({"max_abs_dz": "{:.3f}"}).hide(axis="index").set_caption(
    "The four metric rows of the audit under each combination of metric definition and intervention: "
    "number of cells significant under the dual rule, with uncorrected p_t below 0.05, and the largest |d_z|"))

# %% [markdown]
# ## 4. The noise floor of half precision
#
# Half-precision formats keep 8 (bfloat16) or 11 (float16) significant bits, so every hidden
# state carries a relative rounding error of order $2^{-8}$ or $2^{-11}$. A single-expert
# ablation that changes the loss by less than the rounding noise of the whole forward pass cannot
# be measured in that precision. Here the same ablations are run with the model in the half
# precision set by `half_dtype`. Its clean pass differs too (routing decisions can change at
# near-ties), so records are matched by (position, layer, expert) and only the ablations of an
# expert that is active in both precisions are compared. Both precisions compute the loss in
# float32 from their own logits.

# %%
half_recs, half_ctx_metrics = {}, {}
for name in models:
    ctx_h = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=half_dtype, device=device,
                    corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    half_recs[name] = single_expert_records(ctx_h, layers=audited_layers[name], n_positions=n_positions, seed=seed,
                                            mode="token", batch_size=batch_size)
    half_ctx_metrics[name] = ctx_h.metrics
    del ctx_h
    gc.collect()

def top_expert_hurts(rec):
    """Share of (position, layer) where removing the active expert with the largest router probability raises the loss."""
    top = rec.sort_values(["seq_id", "t", "layer", "prob"], ascending=[True, True, True, False])
    top = top.groupby(["seq_id", "t", "layer"], sort=False).head(1)
    return float((top.delta_loss > 0).mean())


noise_rows, noise = [], {}
key = ["seq_id", "t", "layer", "expert"]
for name in models:
    full = records[name, "token"]
    half = half_recs[name]
    m = full[key + ["delta_loss", "clean_loss"]].merge(half[key + ["delta_loss", "clean_loss"]], on=key, suffixes=("_full", "_half"))
    m["model"] = name
    m["abs_full"] = m.delta_loss_full.abs()
    m["err"] = (m.delta_loss_half - m.delta_loss_full).abs()
    noise[name] = m
    nz = (m.delta_loss_full != 0) & (m.delta_loss_half != 0)
    p95 = float(m.err.quantile(0.95))
    noise_rows.append({
        "model": name, "matched": len(m), "share of fp records matched": len(m) / len(full),
        "median |clean loss diff|": float((m.clean_loss_half - m.clean_loss_full).abs().median()),
        "median |Δ_half − Δ_full|": float(m.err.median()), "95th pct |Δ_half − Δ_full|": p95,
        "median |Δ_full|": float(m.abs_full.median()),
        "share |Δ_full| below 95th pct noise": float((m.abs_full < p95).mean()),
        "sign flips": float((np.sign(m.delta_loss_full[nz]) != np.sign(m.delta_loss_half[nz])).mean()),
        "exact zeros, full": float((m.delta_loss_full == 0).mean()), "exact zeros, half": float((m.delta_loss_half == 0).mean()),
        "top expert Δ above 0, full": top_expert_hurts(full), "top expert Δ above 0, half": top_expert_hurts(half),
    })
noise_tab = pd.DataFrame(noise_rows)
pct_cols = ["share of fp records matched", "share |Δ_full| below 95th pct noise", "sign flips", "exact zeros, full",
            "exact zeros, half", "top expert Δ above 0, full", "top expert Δ above 0, half"]
display(noise_tab.style.format({c: "{:.1%}" for c in pct_cols}
                               | {c: "{:.2e}" for c in noise_tab.columns if "|" in c and c not in pct_cols})
        .hide(axis="index")
        .set_caption(f"Single-expert ablations in {dtype} ('full') and {half_dtype} ('half'), matched by position, layer "
                     "and expert (loss changes in nats)"))

# %%
allnoise = pd.concat(noise.values(), ignore_index=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
floor_plot = 1e-9
for name in models:
    g = allnoise[allnoise.model == name]
    for col, ls, lab in (("err", "-", f"|Δ_{half_dtype} − Δ_{dtype}|"), ("abs_full", "--", f"|Δ_{dtype}|")):
        v = np.sort(g[col].clip(lower=floor_plot).to_numpy())
        axes[0].plot(v, np.arange(1, len(v) + 1) / len(v), linestyle=ls, color=colors[name], label=f"{name}: {lab}")
axes[0].set_xscale("log")
axes[0].set_xlabel("nats (log scale)")
axes[0].set_ylabel("cumulative share of records")
axes[0].set_title("Precision noise (solid) against effect size (dashed)")
axes[0].legend(fontsize=7)
sub = pd.concat([g.sample(min(len(g), 4000), random_state=seed) for _, g in allnoise.groupby("model", sort=False)])
flip = np.sign(sub.delta_loss_full) != np.sign(sub.delta_loss_half)
for name in models:
    s = sub[sub.model == name]
    axes[1].scatter(s.abs_full.clip(lower=floor_plot), s.err.clip(lower=floor_plot), s=5, alpha=0.35, color=colors[name], label=name)
axes[1].scatter(sub.abs_full[flip].clip(lower=floor_plot), sub.err[flip].clip(lower=floor_plot), s=12, facecolor="none",
                edgecolor="black", linewidth=0.5, label="sign flip")
lo = floor_plot
hi = float(max(allnoise.abs_full.max(), allnoise.err.max())) * 1.5
axes[1].plot([lo, hi], [lo, hi], color="0.3", linewidth=0.8, label="noise = effect")
axes[1].set_xscale("log")
axes[1].set_yscale("log")
axes[1].set_xlabel(f"|Δ_{dtype}| (nats, log scale)")
axes[1].set_ylabel(f"|Δ_{half_dtype} − Δ_{dtype}| (nats, log scale)")
axes[1].set_title("Per record (up to 4000 per model)")
axes[1].legend(fontsize=7, markerscale=2)
fig.tight_layout()

# %% [markdown]
# Above the diagonal of the right panel the precision error is larger than the effect being
# measured; a sign flip there means the half-precision run reports the opposite direction.
# Does half precision change the audit's verdicts? The whole audit is re-run from the
# half-precision records and metrics (the pairs of experts can differ where routing differs).

# %%
half_cells = pd.concat([cells_for(half_recs[n], half_ctx_metrics[n], variant=half_dtype) for n in models], ignore_index=True)
cells_half = pd.concat([cells_mode[cells_mode.variant == "token"].assign(variant=dtype), half_cells], ignore_index=True)
table_half = pd.concat([table_mode[table_mode.variant == "token"].assign(variant=dtype), table_for(half_cells)],
                       ignore_index=True)
cmp_half = compare_variants(cells_half, table_half, dtype, half_dtype)
display(Markdown(flip_summary(cmp_half, dtype, half_dtype)))

nt = noise_tab.set_index("model")
display(Markdown(
    f"Median precision error of one ablation (nats): {per_model(nt['median |Δ_half − Δ_full|'], '{:.1e}')}; its 95th "
    f"percentile: {per_model(nt['95th pct |Δ_half − Δ_full|'], '{:.1e}')}; median effect in {dtype}: "
    f"{per_model(nt['median |Δ_full|'], '{:.1e}')}. Share of the {dtype} effects smaller than that 95th percentile: "
    f"{per_model(nt['share |Δ_full| below 95th pct noise'], '{:.0%}')}; share of ablations whose sign changes: "
    f"{per_model(nt['sign flips'], '{:.1%}')}. The table's last two columns give the share of positions where removing "
    "the highest-probability active expert raises the loss, in each precision."))

# %% [markdown]
# ### The released progressive ablation in float16
# The authors' progressive-ablation summary (OLMoE, removing the $k$ highest-weight active
# experts) was produced in float16. Two features of the released numbers are what rounding
# noise looks like. First, the medians of the loss change are within a few thousandths of a
# nat of zero and the share of positions whose loss *improves* when experts are removed is close
# to one half, with quartiles on both sides of zero. Second, most quartiles are short binary
# fractions (multiples of $2^{-16}$) — numbers a computation that keeps 11 significant bits lands
# on, and a float32 computation of a continuous quantity almost never does.

# %%
try:
    prog = released.progressive_ablation(data_dir=data_dir)
    display(Markdown(f"*The released progressive-ablation summary is read from {released.released_source(data_dir).describe()}.*"))
except released.ReleasedDataUnavailable:
    prog = None
    display(Markdown("*The authors' released result files were not found (set `data_dir` or `$MOEAUDIT_DATA_DIR` to a "
                     "folder with `paper-released/`); this comparison is skipped.*"))
if prog is not None:
    q = prog[["p25_delta", "median_delta", "p75_delta"]].to_numpy().reshape(-1)
    on_grid = float(np.mean(np.abs(q * 2 ** 16 - np.round(q * 2 ** 16)) < 1e-6))
    k1 = prog[prog.k == 1]
    view = k1[["layer", "median_delta", "p25_delta", "p75_delta", "share_positive", "n"]].rename(columns={
        "median_delta": "median Δ (nats)", "p25_delta": "25th pct", "p75_delta": "75th pct",
        "share_positive": "share Δ > 0"})
    display(view.style.format({"median Δ (nats)": "{:+.4f}", "25th pct": "{:+.4f}", "75th pct": "{:+.4f}",
                               "share Δ > 0": "{:.1%}"}).hide(axis="index")
            .set_caption("Released OLMoE progressive ablation, k = 1 (the highest-weight active expert removed), float16"))
    zero_medians = int((prog.median_delta == 0).sum())
    display(Markdown(
        f"Over all {len(prog)} released (layer, k) rows, {on_grid:.0%} of the quartiles and medians are exact multiples "
        f"of 2⁻¹⁶ and {zero_medians} median(s) are exactly 0. At k = 1 the share of positions with a positive loss change "
        f"is {k1.share_positive.min():.1%}–{k1.share_positive.max():.1%}. On the book's models, removing the "
        f"highest-probability expert raises the loss at {per_model(nt['top expert Δ above 0, full'], '{:.0%}')} of the "
        f"(position, layer) pairs in {dtype}, and {half_dtype} rounding alone moves single-expert effects by a median of "
        f"{per_model(nt['median |Δ_half − Δ_full|'], '{:.1e}')} nats and flips {per_model(nt['sign flips'], '{:.1%}')} of "
        "their signs. The float16 noise of the 7-billion-parameter model was not measured alongside the released table; "
        "without such a measurement its medians of a few thousandths of a nat cannot be told apart from rounding noise, "
        "and the means, carried by the large upper tail, are the more robust summary of that experiment."))

# %% [markdown]
# ## 5. Lessons for your own audit

# %%
mode_non_last = other_rows if len(other_rows) else agreement


def flips(cmp):
    """'a of N cell verdicts change under the dual rule and b under uncorrected p_t < .05'."""
    return (f"{int(cmp.flip_dual.sum())} of {len(cmp)} cell verdicts change under the dual rule and "
            f"{int(cmp.flip_p05.sum())} under uncorrected p_t < .05")


def span(values, f="{:.0%}"):
    lo, hi = min(values), max(values)
    return f.format(lo) if f.format(lo) == f.format(hi) else f"{f.format(lo)}–{f.format(hi)}"


n_flip_def = int((cmp_def.flip_dual | cmp_def.flip_p05).sum())
lessons = [
    f"**Name the intervention, and state where it acts.** Token-local and sequence-wide ablation of the same expert "
    f"differ by up to {mode_non_last['max |Δ_tok − Δ_seq|'].max():.2g} nats per record at layers before the last "
    f"(their rank correlation over records is {mode_non_last['Spearman ρ'].min():+.3f} to {mode_non_last['Spearman ρ'].max():+.3f}), "
    f"the cell effect sizes by up to {cmp_mode.ddz.abs().max():.3f} in d_z, and {flips(cmp_mode)}. The two coincide "
    "only at the last decoder layer, which is the one place where a result does not depend on the choice.",
    f"**Implement the metric you define, on the tokens you define it on.** The released recipes order the experts of a "
    f"layer differently from the paper's definitions (ρ down to {own_rho.rho.min():+.2f} for the models' own recipes, "
    f"{rho_defs.rho.min():+.2f} over all recipes); padding was {span(pad_share.values())} of "
    f"the positions here and 62% in the authors' OLMoE run. On these models {flips(cmp_def)}"
    + (" — the verdicts survive here, but a verdict obtained with another definition is evidence about that other "
       "quantity, not about the metric as defined." if n_flip_def == 0 else
       ": for cells near a threshold, the definition alone decides the verdict."),
    f"**Measure your precision floor before reading small effects.** In {half_dtype}, the share of single-expert "
    f"effects smaller than the 95th percentile of their own rounding error is "
    f"{per_model(nt['share |Δ_full| below 95th pct noise'], '{:.0%}')}, the share that change sign "
    f"{per_model(nt['sign flips'], '{:.1%}')}; {flips(cmp_half)}. "
    "Report a median near zero only together with the noise of the precision it was computed in.",
    "**Keep the clean baseline inside the same computation.** Every comparison here pairs an ablated and an un-ablated "
    f"row of the same batch; the rounding floor between two code paths for the *same* un-ablated loss was up to "
    f"{agreement['rounding floor'].max():.1e} nats in {dtype}, and in half precision the clean losses of the two "
    f"precisions differ by a median of {per_model(nt['median |clean loss diff|'], '{:.1e}')} nats — a baseline computed "
    "elsewhere adds this to every Δ.",
]
display(Markdown("\n".join(f"{i}. {s}" for i, s in enumerate(lessons, 1))))

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** On the same positions and pairs of experts, how much the measured loss changes,
# the effect sizes and the verdicts of the audit depend on three implementation choices: where
# the expert is removed (at the token or along the whole sequence), how the observational
# metrics are computed (the paper's definitions or the released scripts'), and the numerical
# precision. The token-local and sequence-wide definitions agree at the last decoder layer, up
# to float rounding, and nowhere else, which the records confirm.
#
# **Does not show.** Which definition is "right": the token-local one answers the paper's
# question (does the metric predict the importance of an expert *at this token*), the
# sequence-wide one a different question (what is lost if the expert is absent from the whole
# context), closer to pruning. The sizes measured here belong to the book's small models; on the
# paper's checkpoints, with longer contexts and more padding, the gap between the two
# interventions and between the metric definitions can be larger or smaller, and float16 noise
# can only be bounded by measuring it on those models (re-run this chapter with `models` set to
# the checkpoint ids and `half_dtype="float16"` on a GPU).
#
# ## Exercises
#
# **1. Shorter contexts.** Set `max_tokens = 32`. What happens to the gap between the
# token-local and the sequence-wide measurements at the early layers, and to the share of
# padding in the released-style metrics?

# %% [markdown]
# :::{admonition} Expected result
# :class: dropdown
# With at most 32 tokens of context, an expert is removed at fewer earlier positions in the
# sequence-wide mode, so the median and largest $|\Delta_{\text{token}} - \Delta_{\text{sequence}}|$
# at the early and middle layers shrink (they stay at the rounding floor at the last layer), and
# the two columns of effect sizes move closer together. Almost every text is longer than 32
# tokens, so the padded batch has almost no padding: the DeepSeek-style utilization becomes
# rank-identical to the paper's, the OLMoE-style norms nearly so, while the OLMoE-style
# utilization and mean routing weight still differ because they average router logits instead
# of probabilities — that departure does not depend on padding at all.
# :::

# %% [markdown]
# **2. float16 instead of bfloat16.** Set `half_dtype = "float16"` (on a GPU, or on a CPU whose
# PyTorch build supports it). How do the noise floor and the share of sign flips change?

# %% [markdown]
# :::{admonition} Expected result
# :class: dropdown
# float16 keeps three more significant bits than bfloat16, so the rounding error of each
# operation is about eight times smaller: the median and 95th percentile of
# $|\Delta_{\text{half}} - \Delta_{\text{full}}|$ drop by roughly that factor, fewer effects fall
# below the noise, and the share of sign flips falls. It does not vanish: the smallest
# single-expert effects (the left tail of the dashed curves) remain below the float16 floor,
# which is the regime of the released progressive-ablation medians.
# :::

# %% [markdown]
# **3. A different draw of positions.** Set `seed = 7` (and keep everything else). Which
# conclusions of this chapter survive a new sample of 200 positions?

# %% [markdown]
# :::{admonition} Expected result
# :class: dropdown
# The structural results do not depend on the sample: the two modes still agree at the last
# layer up to rounding and nowhere else, the Spearman correlations between metric definitions
# are unchanged (they do not use positions at all), and the precision noise has the same size.
# Which individual cells change verdict between modes, definitions or precisions does change:
# those flips happen in cells whose $p$-values sit near a threshold, and a new draw moves
# $p$-values around by about as much as the definitions do. The confidence intervals of the
# differences of $d_z$ are the honest summary of how much the choice matters.
# :::
