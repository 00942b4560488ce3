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
# # Beyond the paper (2): better predictors, and whether token-level validity predicts one-shot pruning
#
# The paper leaves three questions open (Sections 4–5):
#
# 1. **Is there a cheap predictor of causal expert importance?** The only signal the paper's
#    audit finds is the per-token routing weight $g_e(x_t)$ at one layer of one model, and the
#    paper notes that it cannot guide pruning: it needs the forward pass at that token, while a
#    pruning decision is made before inference. Two natural
#    candidates are cheaper than an ablation and closer to the intervention than a corpus
#    statistic: the size of what the expert actually adds at the token, and a first-order
#    (gradient) estimate of the ablation itself. Two criteria from the recent expert-pruning
#    literature aggregate the first of these over a calibration corpus.
# 2. **Does token-level validity predict deployed pruning?** The audit removes one expert at one
#    token; deployed pruning removes experts from the router everywhere, at once, in every MoE
#    layer. The paper argues that pruning succeeds in high-redundancy models *because any
#    selection is nearly harmless*, not because the metric finds dispensable experts. That is a
#    testable claim: a criterion should then do no better than pruning uniformly at random.
# 3. **Evidence for the null.** A non-significant test is not evidence that a metric is
#    useless. The paper suggests Bayes factors; this chapter computes one for every audit cell.
#
# ## The predictors
#
# All predictors rank the active routed experts $e$ at token $t$ of an MoE layer; higher means
# "predicted to matter more". $g_e(x_t)$ is the combine weight the model applies to expert $e$ at
# $t$, $E_e(x_t)$ its raw output, $S_e$ the calibration tokens that route to $e$ and $N$ the
# number of calibration tokens.
#
# | predictor | definition | granularity | source |
# |---|---|---|---|
# | per-token routing weight | $g_e(x_t)$ | token | the paper's control |
# | per-token gap norm | $g_e(x_t)\,\lVert E_e(x_t)\rVert$ = the size of the contribution an ablation removes | token | this chapter |
# | attribution patching | $-\nabla_{y_t}\mathcal{L}_t \cdot g_e(x_t)E_e(x_t)$, the first-order Taylor estimate of $\Delta\mathcal{L}_e^{(t)}$ | token | Syed et al. (2023) |
# | frequency-weighted activation norm | $\frac{1}{N}\sum_{s\in S_e}\lVert E_e(x_s)\rVert$ = mean norm over the tokens routed to $e$ × utilization | expert | an activation-norm criterion weighted by routing frequency, of the kind benchmarked in MC-Suite (Jaiswal et al. 2025, "Finding Fantastic Experts in MoEs") |
# | REAP | $\frac{1}{\lvert S_e\rvert}\sum_{s\in S_e} g_e(x_s)\,\lVert E_e(x_s)\rVert$ = the per-token gap norm averaged over the tokens routed to $e$ | expert | Router-weighted Expert Activation Pruning (Lasby et al. 2025, "REAP the Experts") |
# | the paper's four metrics | utilization rate, activation norm, mean routing weight, activation std | expert | the paper, Section 2 |
#
# Utilization rate *is* the frequency criterion of the pruning literature (count of tokens
# routed to the expert, divided by a constant), so it doubles as the frequency-only baseline.
#
# **Calibration and evaluation.** The two literature criteria are computed, as in their papers,
# on a calibration set: the first half of the evaluation texts. They are audited only at the
# audit positions that fall in the *other* half, so calibration and evaluation never share a
# text. The paper's four metrics are audited exactly as in the audit chapter (computed over the
# whole corpus, all positions), so their cells here are that chapter's cells. For pruning, every
# per-expert criterion — the paper's four metrics included — is recomputed on the calibration half
# and perplexity is measured on held-out texts of the second half.
#
# **Positions and records.** The audit uses the same seeded positions and the same single-expert
# ablation records as the audit chapter (same parameters, so the cached records are shared):
# every predictor is judged against the same measured loss changes.

# %% tags=["parameters"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers
n_positions = 200  # token positions per cell (the paper: 200)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence"; attribution always estimates "token"
dtype = "float32"
device = "cpu"
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
prune_fractions = [0.125, 0.25, 0.5]  # share of routed experts removed from every MoE layer
n_random_seeds = 5  # random pruning draws per fraction
ppl_texts = 40  # held-out texts (second half of the corpus) for perplexity
alpha = 0.05
n_boot = 400  # bootstrap resamples for the Spearman intervals (percentile method)
per_layer_sweep = True  # also prune one MoE layer at a time at the largest fraction (criteria and random draws)
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from scipy import stats as sps

from moeaudit import report, stats
from moeaudit.attribution import attribution_estimates
from moeaudit.audit import audit_positions, paired_cells, prepare, pruned_perplexities, single_expert_records
from moeaudit.corpus import TokenizedCorpus
from moeaudit.engine import run_ablations
from moeaudit.metrics import METRIC_LABELS, METRICS, ROUTING_WEIGHT, expert_metrics_from_routing
from moeaudit.pruning import lowest_ranked

report.use_book_style()
corpus_source = report.show_corpus(corpus, data_dir=data_dir)

TOKEN_PREDICTORS = ("gap_norm", "attribution")
LITERATURE = ("freq_weighted_norm", "reap")
NEW = TOKEN_PREDICTORS + LITERATURE
LABELS = {**METRIC_LABELS, "gap_norm": "Per-token gap norm", "attribution": "Attribution patching",
          "freq_weighted_norm": "Freq.-weighted act. norm", "reap": "REAP"}
EXPERT_CRITERIA = (*METRICS, *LITERATURE)  # per-expert criteria used for pruning
MIN_CONTEXT = 0  # the audit chapter's default, so that the cached records are shared


def pct(f: float) -> str:
    return f"{f:.1%}".replace(".0%", "%")


# %% [markdown]
# ## Per-expert criteria and per-token predictors
# The helper below turns any value attached to a single-expert record into the paper's paired
# cells: at every (layer, position) the active expert with the highest value ("high") and the one
# with the lowest ("low"), ties broken by expert id, experts without a value left out — the same
# rule as the audit chapter. The notebook checks that it reproduces the audit's own cells for the
# routing-weight control exactly.

# %%
def paired_by(records: pd.DataFrame, value_col: str, ranking: str) -> pd.DataFrame:
    """High/low pairs per (layer, position) by ``value_col``; the audit's tie-breaking rule."""
    df = records.assign(value=records[value_col]).dropna(subset=["value"])
    keys = ["layer", "seq_id", "t"]
    high = (df.sort_values([*keys, "value", "expert"], ascending=[True, True, True, False, True])
            .groupby(keys, sort=False).head(1).set_index(keys))
    low = (df.sort_values([*keys, "value", "expert"], ascending=[True, True, True, True, False])
           .groupby(keys, sort=False).head(1).set_index(keys))
    cols = ["expert", "value", "delta_loss"]
    pair = high[["model", "family", "mode", *cols]].merge(low[cols], left_index=True, right_index=True,
                                                          suffixes=("_high", "_low"))
    pair = pair[pair.expert_high != pair.expert_low].reset_index()
    pair.insert(3, "ranking", ranking)
    pair["diff"] = pair.delta_loss_high - pair.delta_loss_low
    return pair.sort_values(["layer", "seq_id", "t"]).reset_index(drop=True)


def clean_norms(ctx, rec: pd.DataFrame) -> np.ndarray:
    """||E_e(x_t)|| of every record's expert, read from the clean pass."""
    out = np.full(len(rec), np.nan)
    rows = ctx.clean.row(rec.seq_id.to_numpy(), rec.t.to_numpy())
    for L in rec.layer.unique():
        m = (rec.layer == L).to_numpy()
        idx, norm = ctx.clean.routing[int(L)]["indices"][rows[m]], ctx.clean.routing[int(L)]["norm"][rows[m]]
        hit = idx == rec.expert.to_numpy()[m][:, None]
        out[m] = (norm * hit).sum(1)
    return out


def expert_criteria(ctx, seq_ids) -> pd.DataFrame:
    """Every per-expert criterion, from the clean-pass routing of the texts ``seq_ids``."""
    keep = ctx.clean.tokens.seq_id.isin(list(seq_ids)).to_numpy()
    frames = []
    for L, r in ctx.clean.routing.items():
        idx, w, norm = r["indices"][keep], r["weight"][keep], r["norm"][keep]
        df = expert_metrics_from_routing(idx, r["prob"][keep], norm, num_experts=ctx.model.layout.num_experts)
        flat = pd.DataFrame({"expert": idx.reshape(-1), "gap": (w * norm).reshape(-1), "norm": norm.reshape(-1)})
        g = flat.groupby("expert")
        df["reap"] = g.gap.mean().reindex(df.expert).to_numpy()  # NaN for an expert never selected
        df["freq_weighted_norm"] = (g.norm.sum().reindex(df.expert).fillna(0.0) / keep.sum()).to_numpy()
        df.insert(0, "layer", L)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# %% [markdown]
# ## Run: shared records, attribution, criteria
# For each model: the clean pass and the audit chapter's single-expert records (cached), the
# attribution estimate at the same positions (one forward and one backward per batch of
# positions), the per-token gap norm from the clean pass, and the criteria on the calibration
# half. A small timing run ablates and attributes the same few positions afresh, so the cost
# comparison below is like for like on this machine.

# %%
contexts, records, criteria, audited_layers, timings, splits = {}, {}, {}, {}, [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    contexts[name] = ctx
    lay = ctx.model.layout
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    audited_layers[name] = audited
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=MIN_CONTEXT, batch_size=batch_size)
    pos = audit_positions(ctx, n_positions=n_positions, seed=seed, min_context=MIN_CONTEXT)
    t0 = time.perf_counter()
    att = attribution_estimates(ctx.model, ctx.corpus, ctx.clean, pos, layers=audited, batch_size=batch_size)
    t_att = time.perf_counter() - t0
    rec = rec.merge(att, on=["seq_id", "t", "layer", "expert"], how="left", validate="one_to_one")
    rec["gap_pred"] = rec.weight * clean_norms(ctx, rec)  # predicted; ``gap_norm`` is the measured one
    half = len(ctx.corpus) // 2
    splits[name] = half
    crit = expert_criteria(ctx, range(half))
    criteria[name] = crit
    rec = rec.merge(crit[["layer", "expert", *LITERATURE]], on=["layer", "expert"], how="left")
    rec["held_out"] = rec.seq_id >= half
    rec["rel_depth"] = rec.layer.map(dict(zip(audited, report.relative_depth(audited, lay.moe_layers))))
    records[name] = rec

    # like-for-like timing on the first few positions: every single-expert ablation vs one attribution pass
    few = pos.head(min(8, len(pos)))
    req = rec.merge(few[["seq_id", "t"]], on=["seq_id", "t"])[["seq_id", "t", "layer", "removed"]]
    t0 = time.perf_counter()
    run_ablations(ctx.model, ctx.corpus, ctx.clean, req, mode=mode, batch_size=batch_size, progress=False)
    t_abl_few = time.perf_counter() - t0
    t0 = time.perf_counter()
    attribution_estimates(ctx.model, ctx.corpus, ctx.clean, few, layers=audited, batch_size=batch_size, progress=False)
    t_att_few = time.perf_counter() - t0
    timings.append({"model": name, "positions": len(pos), "layers": len(audited), "top_k": lay.top_k,
                    "ablations": len(rec), "attribution_s": t_att, "few": len(few), "few_ablations": len(req),
                    "few_ablation_s": t_abl_few, "few_attribution_s": t_att_few})
    display(Markdown(
        f"**{name}** ({lay.family}): {len(lay.moe_layers)} MoE layers, {lay.num_experts} routed experts, "
        f"top-{lay.top_k}; audited layers {audited}; {len(rec):,} single-expert ablations at "
        f"{len(pos)} positions ({int(rec.drop_duplicates(['seq_id', 't']).held_out.sum())} of them in the "
        f"held-out half, texts {half}–{len(ctx.corpus) - 1}); calibration: texts 0–{half - 1} "
        f"({int(ctx.clean.tokens.seq_id.lt(half).sum()):,} tokens)."))
timings = pd.DataFrame(timings)

# %% [markdown]
# Two consistency checks. In `token` mode the ablation removes exactly $g_e(x_t)E_e(x_t)$ from the
# MoE output at $t$, so the gap norm *measured* inside the ablated forward pass must equal the
# per-token gap norm predicted from the clean pass; and the local pairing helper must reproduce
# the audit's paired cells for the routing-weight control.

# %%
checks = []
for name, rec in records.items():
    ref = paired_cells(rec, contexts[name].metrics, rankings=[ROUTING_WEIGHT])
    mine = paired_by(rec, "prob", ROUTING_WEIGHT)
    same = (len(ref) == len(mine) and np.array_equal(ref["diff"].to_numpy(), mine["diff"].to_numpy())
            and np.array_equal(ref.expert_high.to_numpy(), mine.expert_high.to_numpy()))
    rel = np.abs(rec.gap_pred - rec.gap_norm) / rec.gap_norm.clip(lower=1e-12)
    checks.append({"model": name, "max relative |predicted − measured| gap norm": float(rel.max()),
                   "pairing reproduces the audit's routing-weight cells": bool(same)})
checks = pd.DataFrame(checks)
display(checks.style.format({"max relative |predicted − measured| gap norm": "{:.1e}"}).hide(axis="index"))

# %% [markdown]
# ## The token-level audit of the new predictors
# Each predictor picks its high and low expert at every position; $D = \Delta\mathcal{L}_{\text{high}}
# - \Delta\mathcal{L}_{\text{low}}$ as in the audit. The family for Bonferroni is the model's cells of
# the four new predictors (4 predictors × the audited layers), the same size as the paper's family
# of four metrics × five layers. The literature criteria are audited only at held-out positions, so
# their cells have about half the positions of the others.

# %%
cell_frames = []
for name, rec in records.items():
    cell_frames.append(paired_cells(rec, contexts[name].metrics, rankings=[*METRICS, ROUTING_WEIGHT]))
    cell_frames.append(paired_by(rec, "gap_pred", "gap_norm"))
    cell_frames.append(paired_by(rec, "attribution", "attribution"))
    for crit in LITERATURE:
        cell_frames.append(paired_by(rec[rec.held_out], crit, crit))
keep = ["model", "family", "mode", "layer", "ranking", "seq_id", "t", "expert_high", "expert_low",
        "delta_loss_high", "delta_loss_low", "diff"]
cells = pd.concat([c[keep] for c in cell_frames], ignore_index=True)
depth = pd.concat([r[["model", "layer", "rel_depth"]].drop_duplicates() for r in records.values()])
cells = cells.merge(depth, on=["model", "layer"])

new_table = stats.audit_table(cells[cells.ranking.isin(NEW)], by=("model", "ranking", "layer"),
                              high_col="delta_loss_high", low_col="delta_loss_low", family=("model",), alpha=alpha)
new_table = new_table.merge(depth, on=["model", "layer"])
for name in models:
    t = new_table[new_table.model == name].assign(ranking=lambda d: d.ranking.map(LABELS))
    n_range = f"{int(t.n.min())}–{int(t.n.max())}" if t.n.min() != t.n.max() else f"{int(t.n.min())}"
    display(Markdown(f"### {name}"))
    display(report.style_paper_layout(t, caption=f"{name}: Cohen's d_z [95% CI], p_t, p_W; n = {n_range} "
                                                  f"positions per cell; Bonferroni family of "
                                                  f"{int(t.family_size.iloc[0])}"))
display(Markdown(report.SIGNIFICANCE_NOTE))

# %%
fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models) + 2.2, 3.9), sharey=True, squeeze=False)
colors = dict(zip([ROUTING_WEIGHT, *NEW], sns.color_palette("colorblind", 5)))
control_table = stats.audit_table(cells[cells.ranking == ROUTING_WEIGHT], by=("model", "ranking", "layer"),
                                  high_col="delta_loss_high", low_col="delta_loss_low", family=("model",),
                                  alpha=alpha).merge(depth, on=["model", "layer"])
for ax, name in zip(axes[0], models):
    for r in [ROUTING_WEIGHT, *NEW]:
        src = control_table if r == ROUTING_WEIGHT else new_table
        report.dz_by_depth(ax, src[(src.model == name) & (src.ranking == r)], label=LABELS[r], color=colors[r])
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_title(name)
    ax.set_xlabel("relative depth (0 = first, 1 = last)", fontsize=9)
axes[0][0].set_ylabel("Cohen's $d_z$ of D (95% CI)")
fig.suptitle("New predictors against the routing-weight control (* = Bonferroni-significant t-test)")
fig.tight_layout(rect=(0, 0, 0.8, 1))
fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="center right")
plt.show()

# %% [markdown]
# The routing-weight control is drawn for reference (its own family of one ranking × the layers,
# as in the routing-weight chapter). An asterisk marks a cell whose paired t-test is significant
# under Bonferroni in its family; the ★ of the tables additionally requires the Wilcoxon test to
# agree (the paper's dual-test rule), which is the verdict used in the text.
#
# ## How well does each predictor track the measured loss change?
# The paired test asks only whether the predictor orders the extremes correctly. Spearman's
# $\rho$ between the predicted value and the measured $\Delta\mathcal{L}_e^{(t)}$ over *all*
# (position, active expert) pairs of a layer asks whether it orders everything. For the per-expert
# criteria every token routed to an expert gets the same value, so $\rho$ there measures how much of
# the token-level variation an expert-level summary can carry at all. Intervals: paired bootstrap
# over (position, expert) pairs, percentile method.

# %%
VALUE_COL = {ROUTING_WEIGHT: "prob", "gap_norm": "gap_pred", "attribution": "attribution",
             **{m: m for m in METRICS}, **{c: c for c in LITERATURE}}
rho_rows = []
for name, rec in records.items():
    r_all = rec.merge(contexts[name].metrics[["layer", "expert", *METRICS]], on=["layer", "expert"], how="left")
    for pred, col in VALUE_COL.items():
        src = r_all[r_all.held_out] if pred in LITERATURE else r_all
        for L, g in src.groupby("layer"):
            g = g.dropna(subset=[col, "delta_loss"])
            if g[col].nunique() < 2:
                continue
            s = stats.spearman(g[col], g.delta_loss, n_boot=n_boot, method="percentile", seed=seed)
            rho_rows.append({"model": name, "layer": L, "predictor": pred, **s.iloc[0].to_dict()})
rho = pd.DataFrame(rho_rows).merge(depth, on=["model", "layer"])

for name in models:
    t = rho[rho.model == name].assign(predictor=lambda d: d.predictor.map(LABELS),
                                      cell=lambda d: [f"{r:+.2f} [{lo:+.2f}, {hi:+.2f}]" for r, lo, hi in
                                                      zip(d.rho, d.ci_low, d.ci_high)])
    tab = t.pivot(index="predictor", columns="layer", values="cell")
    val = t.pivot(index="predictor", columns="layer", values="rho")
    order = [LABELS[p] for p in VALUE_COL if LABELS[p] in tab.index]
    tab, val = tab.loc[order], val.loc[order]
    tab.columns = val.columns = [f"L{c}" for c in tab.columns]
    display(Markdown(f"### {name}"))
    display(tab.style.background_gradient(cmap="PuOr_r", axis=None, gmap=val.to_numpy(), vmin=-1, vmax=1)
            .set_caption(f"{name}: Spearman ρ [95% CI] between predictor and measured ΔL over all (position, "
                         f"active expert) pairs; n = {int(t.n.min())}–{int(t.n.max())} pairs per cell")
            .set_properties(**{"text-align": "center", "font-size": "0.85em"}))

# %%
fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models) + 2.2, 3.9), sharey=True, squeeze=False)
for ax, name in zip(axes[0], models):
    for p in [ROUTING_WEIGHT, *NEW]:
        s = rho[(rho.model == name) & (rho.predictor == p)].sort_values("rel_depth")
        ax.plot(s.rel_depth, s.rho, marker="o", color=colors[p], label=LABELS[p])
        ax.fill_between(s.rel_depth, s.ci_low, s.ci_high, color=colors[p], alpha=0.15, linewidth=0)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_title(name)
    ax.set_xlabel("relative depth (0 = first, 1 = last)", fontsize=9)
    ax.set_ylim(-1, 1)
axes[0][0].set_ylabel("Spearman ρ with measured ΔL (95% CI)")
fig.suptitle("Rank agreement between predictor and measured single-expert ablation effect")
fig.tight_layout(rect=(0, 0, 0.8, 1))
fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="center right")
plt.show()

# %%
def token_verdict(name: str) -> str:
    t = new_table[new_table.model == name]
    parts = []
    for p in NEW:
        s = t[t.ranking == p].sort_values("rel_depth")
        sig = s[s.sig_dual_bonf]
        where = ", ".join(f"L{int(L)}" for L in sig.layer) if len(sig) else "no layer"
        r = rho[(rho.model == name) & (rho.predictor == p)]
        parts.append(f"{LABELS[p]} — significant at {where} ({len(sig)}/{len(s)}), d_z "
                     f"{s.cohens_dz.min():+.2f} to {s.cohens_dz.max():+.2f}, "
                     f"ρ {r.rho.min():+.2f} to {r.rho.max():+.2f}")
    return f"**{name}**: " + "; ".join(parts) + "."


display(Markdown("\n\n".join(token_verdict(n) for n in models)))

# %% [markdown]
# ## What each predictor costs
# The cost of a predictor is the computation it needs beyond the model's ordinary forward pass.
# Counts are for this audit (positions × audited layers); the timings are wall-clock seconds on
# this machine for the same few positions, ablated one expert at a time and attributed once.

# %%
cost_rows = []
for r in timings.itertuples():
    ab = f"{r.top_k} forwards per position and layer ({r.ablations:,} here)"
    cost_rows += [
        {"model": r.model, "predictor": "paper's metrics, freq.-weighted norm, REAP",
         "extra passes": "none at inference: one clean forward over the calibration corpus, once"},
        {"model": r.model, "predictor": "per-token routing weight, gap norm",
         "extra passes": "none: read off the token's own forward pass"},
        {"model": r.model, "predictor": "attribution patching",
         "extra passes": f"1 forward + 1 backward per batch of ≤ {batch_size} positions, all layers at once "
                         f"({r.positions} positions here, {r.attribution_s:.1f} s)"},
        {"model": r.model, "predictor": "measured ablation (ground truth)", "extra passes": ab},
    ]
cost = pd.DataFrame(cost_rows)
display(cost.style.hide(axis="index").set_properties(**{"text-align": "left"}))
speed = timings.assign(ratio=timings.few_ablation_s / timings.few_attribution_s)
display(speed[["model", "few", "few_ablations", "few_ablation_s", "few_attribution_s", "ratio"]]
        .rename(columns={"few": "positions", "few_ablations": "single-expert ablations",
                         "few_ablation_s": "ablations (s)", "few_attribution_s": "attribution (s)",
                         "ratio": "ablation / attribution time"})
        .style.format({"ablations (s)": "{:.2f}", "attribution (s)": "{:.2f}",
                       "ablation / attribution time": "{:.1f}×"})
        .hide(axis="index"))

# %% [markdown]
# ## Deployment check: one-shot pruning
# Each per-expert criterion, computed on the calibration half, ranks the routed experts of every
# MoE layer; the lowest-ranked fraction $f$ of each layer is removed from its router — all MoE
# layers at once, as a deployed pruning pass would. A removed expert's router logit is set to
# $-\infty$, so the router re-distributes probability and picks its top-$k$ among the remaining
# experts, exactly as a model built without that expert would. Experts never selected in the
# calibration texts have no REAP score and go first. The reference is *random* pruning of the same
# number of experts per layer, repeated over seeds. The quality measure is perplexity on held-out
# texts (the first `ppl_texts` texts of the second half of the corpus). No fine-tuning follows the
# pruning here, so these numbers are the criterion's own contribution, before any recovery.

# %%
def ppl_corpus(ctx, half: int) -> TokenizedCorpus:
    ids = list(range(half, min(len(ctx.corpus), half + ppl_texts)))
    return TokenizedCorpus.from_token_ids([ctx.corpus.sequences[i] for i in ids], source="held-out")


def criterion_plan(crit: pd.DataFrame, name: str, fraction: float, moe_layers) -> dict:
    return {L: lowest_ranked(crit[crit.layer == L].sort_values("expert")[name].to_numpy(dtype=float), fraction)
            for L in moe_layers}


def random_plan(n_experts: int, fraction: float, moe_layers, draw: int) -> dict:
    n = len(lowest_ranked(np.zeros(n_experts), fraction))
    rng = np.random.default_rng([seed, draw, int(round(fraction * 1000))])
    return {L: sorted(rng.choice(n_experts, size=n, replace=False).tolist()) for L in moe_layers}


prune_rows, held_out_info = [], {}
for name, ctx in contexts.items():
    lay = ctx.model.layout
    held = ppl_corpus(ctx, splits[name])
    crit = criteria[name]
    plans, meta = [{}], [None]  # plan 0: the unpruned model
    for f in prune_fractions:
        for c in EXPERT_CRITERIA:
            plans.append(criterion_plan(crit, c, f, lay.moe_layers))
            meta.append({"scope": "all", "fraction": f, "criterion": c, "draw": 0})
        for d in range(n_random_seeds):
            plans.append(random_plan(lay.num_experts, f, lay.moe_layers, d))
            meta.append({"scope": "all", "fraction": f, "criterion": "random", "draw": d})
    # one layer at a time, at the largest fraction: where does the model break?
    f = max(prune_fractions)
    for L in (lay.moe_layers if per_layer_sweep else []):
        for c in EXPERT_CRITERIA:
            plans.append(criterion_plan(crit, c, f, [L]))
            meta.append({"scope": L, "fraction": f, "criterion": c, "draw": 0})
        for d in range(n_random_seeds):
            plans.append(random_plan(lay.num_experts, f, [L], d))
            meta.append({"scope": L, "fraction": f, "criterion": "random", "draw": d})
    # cached with the records: criteria often agree on the experts to remove, and each distinct
    # plan is evaluated once
    ppl = pruned_perplexities(ctx, plans, held)
    base = ppl.iloc[0]
    held_out_info[name] = {"texts": len(held), "tokens": int(base.n_tokens), "perplexity": float(base.perplexity),
                           "mean_loss": float(base.mean_loss)}
    prune_rows += [{"model": name, **m, "mean_loss": float(loss)} for m, loss in zip(meta[1:], ppl.mean_loss[1:])]
pruning = pd.DataFrame(prune_rows)
pruning["perplexity"] = np.exp(pruning.mean_loss)
pruning["delta_loss"] = pruning.mean_loss - pruning.model.map({m: v["mean_loss"] for m, v in held_out_info.items()})
display(pd.DataFrame(held_out_info).T.rename_axis("model").style
        .format({"texts": "{:.0f}", "tokens": "{:,.0f}", "perplexity": "{:.2f}", "mean_loss": "{:.4f}"})
        .set_caption("Held-out evaluation texts and the unpruned model's perplexity"))

# %%
glob = pruning[pruning.scope == "all"]
rand = glob[glob.criterion == "random"].groupby(["model", "fraction"]).perplexity.agg(["mean", "min", "max", "std"])
glob_rand_loss = glob[glob.criterion == "random"].groupby(["model", "fraction"]).delta_loss.mean()
markers = dict(zip(EXPERT_CRITERIA, ["o", "s", "^", "v", "D", "P"]))
crit_colors = dict(zip(EXPERT_CRITERIA, sns.color_palette("colorblind", len(EXPERT_CRITERIA))))
fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models) + 2.2, 4.0), squeeze=False)
for ax, name in zip(axes[0], models):
    base = held_out_info[name]["perplexity"]
    r = rand.loc[name]
    xs = [0.0, *r.index]
    ax.fill_between(xs, [base, *r["min"]], [base, *r["max"]], color="0.6", alpha=0.35, linewidth=0,
                    label=f"random ({n_random_seeds} draws, min–max)")
    ax.plot(xs, [base, *r["mean"]], color="0.35", linestyle="--", label="random, mean")
    for c in EXPERT_CRITERIA:
        s = glob[(glob.model == name) & (glob.criterion == c)].sort_values("fraction")
        ax.plot([0.0, *s.fraction], [base, *s.perplexity], marker=markers[c], color=crit_colors[c], label=LABELS[c],
                linewidth=1.2)
    ax.set_xticks([0.0, *prune_fractions])
    ax.set_xticklabels(["0"] + [pct(f) for f in prune_fractions])
    ax.set_xlabel("share of experts pruned per layer", fontsize=9)
    ax.set_title(name)
axes[0][0].set_ylabel("held-out perplexity")
handles, labels_ = axes[0][0].get_legend_handles_labels()
fig.suptitle("One-shot pruning of all MoE layers: criteria against random selection")
fig.tight_layout(rect=(0, 0, 0.8, 1))
fig.legend(handles, labels_, fontsize=8, loc="center right")
plt.show()

# %% [markdown]
# *Reading the figure.* Lower is better. The grey band spans the random draws; a criterion
# below the band beat every random draw, one above it lost to every random draw. The table gives
# each criterion's perplexity, its ratio to the unpruned model, and its distance from the random
# mean in units of the random draws' standard deviation ($z < 0$: better than random).

# %%
tab = glob[glob.criterion != "random"].merge(rand.reset_index(), on=["model", "fraction"])
tab["ratio"] = tab.perplexity / tab.model.map({m: v["perplexity"] for m, v in held_out_info.items()})
tab["z_vs_random"] = (tab.perplexity - tab["mean"]) / tab["std"]
tab["vs_random"] = np.select([tab.perplexity < tab["min"], tab.perplexity > tab["max"]],
                             ["better than all", "worse than all"], "inside band")
for name in models:
    t = tab[tab.model == name].assign(criterion=lambda d: d.criterion.map(LABELS))
    wide = t.pivot(index="criterion", columns="fraction", values=["perplexity", "z_vs_random", "vs_random"])
    wide = wide.reindex([LABELS[c] for c in EXPERT_CRITERIA])
    r = rand.loc[name]
    wide.loc["random (mean ± sd)", "perplexity"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(r["mean"], r["std"])]
    wide.columns = [f"{k} @ {pct(f)}" for k, f in wide.columns]
    fmt = {c: (lambda v: v if isinstance(v, str) else f"{v:.2f}") for c in wide.columns if c.startswith("perplexity")}
    fmt.update({c: (lambda v: v if isinstance(v, str) else f"{v:+.1f}") for c in wide.columns if c.startswith("z_vs")})
    display(Markdown(f"### {name}"))
    display(wide.style.format(fmt, na_rep="").set_caption(
        f"{name}: held-out perplexity after pruning (unpruned {held_out_info[name]['perplexity']:.2f}); "
        f"z = (criterion − random mean) / random sd"))


# %%
def pruning_sentence(name: str) -> str:
    t = tab[tab.model == name]
    base = held_out_info[name]["perplexity"]
    r = rand.loc[name]
    parts = []
    for f in prune_fractions:
        s = t[t.fraction == f]
        better = [LABELS[c] for c in s[s.vs_random == "better than all"].criterion]
        worse = [LABELS[c] for c in s[s.vs_random == "worse than all"].criterion]
        best = s.loc[s.perplexity.idxmin()]
        parts.append(f"at {pct(f)} random pruning raises perplexity from {base:.2f} to {r.loc[f, 'mean']:.2f} "
                     f"(draws {r.loc[f, 'min']:.2f}–{r.loc[f, 'max']:.2f}); best criterion "
                     f"{LABELS[best.criterion]} ({best.perplexity:.2f}); better than every random draw: "
                     f"{', '.join(better) or 'none'}; worse than every draw: {', '.join(worse) or 'none'}")
    return f"**{name}**: " + "; ".join(parts) + "."


display(Markdown("\n\n".join(pruning_sentence(n) for n in models)))

# %% [markdown]
# ## Where does pruning hurt? One layer at a time
# The same criteria and random draws at the largest fraction, applied to a single MoE layer with
# every other layer intact. The y-axis is the increase of the held-out mean loss in nats
# (the log of the perplexity ratio). This is the pruning counterpart of the progressive-ablation
# chapter's redundancy cliff: a layer whose token-level buffer is large should also tolerate
# losing experts from its router.

# %%
per_layer = pruning[pruning.scope != "all"].copy()
per_layer["layer"] = per_layer.scope.astype(int)
per_layer["rel_depth"] = [report.relative_depth([L], contexts[m].model.layout.moe_layers)[0]
                          for m, L in zip(per_layer.model, per_layer.layer)]
if not per_layer_sweep:
    display(Markdown("The single-layer sweep was not run (`per_layer_sweep = False`)."))
else:
    fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models) + 2.2, 3.9), squeeze=False)
    for ax, name in zip(axes[0], models):
        s = per_layer[per_layer.model == name]
        rr = s[s.criterion == "random"].groupby("rel_depth").delta_loss.agg(["mean", "min", "max"])
        ax.fill_between(rr.index, rr["min"], rr["max"], color="0.6", alpha=0.35, linewidth=0, label="random, min–max")
        ax.plot(rr.index, rr["mean"], color="0.35", linestyle="--", label="random, mean")
        for c in EXPERT_CRITERIA:
            g = s[s.criterion == c].sort_values("rel_depth")
            ax.plot(g.rel_depth, g.delta_loss, marker=markers[c], color=crit_colors[c], label=LABELS[c], linewidth=1)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("relative depth of the pruned layer", fontsize=9)
    axes[0][0].set_ylabel("mean loss increase (nats)")
    handles, labels_ = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"Pruning {max(prune_fractions):.0%} of the experts of a single MoE layer: held-out loss across depth")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.legend(handles, labels_, fontsize=8, loc="center right")
    plt.show()


# %%
def depth_sentence(name: str) -> str:
    p = per_layer[per_layer.model == name]
    rnd = p[p.criterion == "random"].groupby("layer").delta_loss.agg(["mean", "min"])
    crit = p[p.criterion != "random"].merge(rnd, left_on="layer", right_index=True)
    beat = crit[crit.delta_loss < crit["min"]].groupby("layer").size().reindex(rnd.index, fill_value=0)
    m = rnd["mean"]
    return (f"**{name}**: pruning {max(prune_fractions):.0%} of one layer's experts at random costs "
            + ", ".join(f"L{L}: {v:+.3f}" for L, v in m.items())
            + f" nats (most at L{int(m.idxmax())}, least at L{int(m.idxmin())}); all layers at once: "
            + f"{glob_rand_loss.loc[(name, max(prune_fractions))]:+.3f} nats on average. Criteria that beat every "
            + "random draw at that layer: "
            + ", ".join(f"L{L}: {n} of {len(EXPERT_CRITERIA)}" for L, n in beat.items()) + ".")


if per_layer_sweep:
    display(Markdown("\n\n".join(depth_sentence(n) for n in models)))

# %% [markdown]
# ## Does token-level validity predict pruning quality?
# One row per per-expert criterion and model: how it fared in the token-level audit (number of
# Bonferroni-significant cells, range of $d_z$) beside how it fared in one-shot pruning (its
# distance from the random mean, $z$, at each fraction). If token-level validity were what made a
# criterion good for pruning, the criteria with positive, significant $d_z$ would be the ones with
# negative $z$.

# %%
paper_table = stats.audit_table(cells[cells.ranking.isin(METRICS)], by=("model", "ranking", "layer"),
                                high_col="delta_loss_high", low_col="delta_loss_low", family=("model",), alpha=alpha)
crit_table = pd.concat([paper_table, new_table[new_table.ranking.isin(LITERATURE)]], ignore_index=True)
link = (crit_table.groupby(["model", "ranking"], sort=False)
        .agg(significant_cells=("sig_dual_bonf", "sum"), cells=("sig_dual_bonf", "size"),
             dz_min=("cohens_dz", "min"), dz_max=("cohens_dz", "max")).reset_index()
        .rename(columns={"ranking": "criterion"}))
zwide = tab.pivot_table(index=["model", "criterion"], columns="fraction", values="z_vs_random").reset_index()
zwide.columns = ["model", "criterion", *[f"pruning z @ {pct(f)}" for f in prune_fractions]]
link = link.merge(zwide, on=["model", "criterion"])
link["criterion"] = link.criterion.map(LABELS)
link["token-level cells"] = [f"{s}/{c}" for s, c in zip(link.significant_cells, link.cells)]
zcols = [c for c in link.columns if c.startswith("pruning z")]
display(link[["model", "criterion", "token-level cells", "dz_min", "dz_max", *zcols]]
        .style.format({"dz_min": "{:+.3f}", "dz_max": "{:+.3f}", **{c: "{:+.1f}" for c in zcols}})
        .background_gradient(cmap="PuOr", subset=zcols, vmin=-4, vmax=4).hide(axis="index")
        .set_caption("Token-level audit (dual-test Bonferroni cells, d_z range) beside pruning z vs random "
                     "(negative = better than random)"))

# %%
agree = []
for name, ctx in contexts.items():
    calib = criteria[name]
    for L in ctx.model.layout.moe_layers:
        a = ctx.metrics[ctx.metrics.layer == L].sort_values("expert")
        b = calib[calib.layer == L].sort_values("expert")
        for m in METRICS:
            ok = a[m].notna().to_numpy() & b[m].notna().to_numpy()
            agree.append(float(sps.spearmanr(a[m].to_numpy()[ok], b[m].to_numpy()[ok]).statistic))
display(Markdown(
    f"For the paper's metrics the token-level cells use the whole corpus (as in the audit chapter), the pruning "
    f"plans the calibration half. The two versions rank a layer's experts alike: Spearman ρ between them has "
    f"median {np.median(agree):.2f} (range {np.min(agree):.2f} to {np.max(agree):.2f}) over the "
    f"{len(agree)} (model, layer, metric) combinations."))

# %% [markdown]
# ## Bayes factors: evidence for the null, or just no evidence?
# For every audit cell — the paper's four metrics, the routing-weight control and the four new
# predictors — the JZS Bayes factor $\mathrm{BF}_{10}$ of the paired differences $D$ (Rouder et
# al. 2009): the one-sample $t$ of $D$ against 0, a Cauchy prior of scale $r$ on the standardised
# effect under $H_1$, two-sided. $\mathrm{BF}_{10} > 1$ favours an effect, $< 1$ the null of no
# effect. The labels follow Jeffreys' scale as adapted by Lee & Wagenmakers (2013):
# 1–3 anecdotal, 3–10 moderate, 10–30 strong, 30–100 very strong, above 100 extreme, and the same
# bands below 1 for the null (1/3–1 anecdotal, 1/10–1/3 moderate, ...). The default prior scale is
# $r = 0.707$. Because the audit's effects are small, the answer depends on what "an effect" is
# taken to mean; the summary also reports $r = 0.354$, a prior that expects smaller effects and so
# is slower to declare the null.

# %%
JEFFREYS = [(100, "extreme H1"), (30, "very strong H1"), (10, "strong H1"), (3, "moderate H1"), (1, "anecdotal H1"),
            (1 / 3, "anecdotal H0"), (1 / 10, "moderate H0"), (1 / 30, "strong H0"), (1 / 100, "very strong H0"),
            (0, "extreme H0")]


def jeffreys(bf: float) -> str:
    return next(label for bound, label in JEFFREYS if bf > bound or bound == 0)


R_NARROW = 0.354
bf_rows = []
for (name, rk, L), g in cells.groupby(["model", "ranking", "layer"], sort=False):
    d = g["diff"].to_numpy(dtype=float)
    bf_rows.append({"model": name, "ranking": rk, "layer": L, "n": len(d), "mean_d": d.mean(),
                    "cohens_dz": d.mean() / d.std(ddof=1), "BF10": stats.jzs_bayes_factor(d),
                    "BF10_narrow": stats.jzs_bayes_factor(d, r=R_NARROW)})
bf = pd.DataFrame(bf_rows).merge(depth, on=["model", "layer"])
bf["evidence"] = bf.BF10.map(jeffreys)
RANK_ORDER = [*METRICS, ROUTING_WEIGHT, *NEW]

for name in models:
    t = bf[bf.model == name]
    txt = t.assign(cell=[f"{b:.3g}\n{e}" for b, e in zip(t.BF10, t.evidence)]).pivot(index="ranking", columns="layer",
                                                                                      values="cell")
    val = t.pivot(index="ranking", columns="layer", values="BF10")
    order = [r for r in RANK_ORDER if r in txt.index]
    txt, val = txt.loc[order], np.log10(val.loc[order])
    txt.index = [LABELS[r] for r in txt.index]
    txt.columns = [f"L{c}" for c in txt.columns]
    display(Markdown(f"### {name}"))
    display(txt.style.background_gradient(cmap="PuOr", axis=None, gmap=val.to_numpy(), vmin=-2, vmax=2)
            .set_properties(**{"white-space": "pre-wrap", "text-align": "center", "font-size": "0.85em"})
            .set_caption(f"{name}: JZS BF10 (r = 0.707) and Jeffreys' label per cell; orange = evidence for the "
                         "null, purple = evidence for an effect"))

# %%
LOG_LO, LOG_HI = -1.5, 3.0  # log10 BF10 shown; cells beyond are drawn as triangles at the edge
fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models) + 1.5, 5.0), sharey=True, squeeze=False)
for ax, name in zip(axes[0], models):
    t = bf[bf.model == name].copy()
    t["x"] = t.ranking.map({r: i for i, r in enumerate(RANK_ORDER)}) + (t.rel_depth - 0.5) * 0.5
    t["y"] = np.log10(t.BF10)
    ax.axhspan(np.log10(1 / 3), np.log10(3), color="0.85", zorder=0)
    for clip, marker in ((t.y.between(LOG_LO, LOG_HI), "o"), (t.y > LOG_HI, "^"), (t.y < LOG_LO, "v")):
        g = t[clip]
        sc = ax.scatter(g.x, g.y.clip(LOG_LO, LOG_HI), c=g.rel_depth, cmap="viridis", vmin=0, vmax=1, marker=marker,
                        s=32, edgecolor="0.2", linewidth=0.4, zorder=3)
    ax.set_ylim(LOG_LO - 0.2, LOG_HI + 0.2)
    ax.set_xticks(range(len(RANK_ORDER)))
    ax.set_xticklabels([LABELS[r] for r in RANK_ORDER], rotation=60, ha="right", fontsize=8)
    ax.set_title(name)
axes[0][0].set_ylabel("log$_{10}$ BF$_{10}$  (below 0: favours the null)")
fig.suptitle("Bayes factors for every audit cell (r = 0.707); grey band: inconclusive; ▲ ▼: beyond the axis")
fig.tight_layout(rect=(0, 0, 0.88, 1))
fig.colorbar(sc, ax=axes[0].tolist(), label="relative depth of the layer", shrink=0.7, pad=0.02)
plt.show()

# %%
def counts(frame: pd.DataFrame, col: str) -> pd.Series:
    b = frame[col]
    return pd.Series({"cells": len(b), "for the null (BF10 under 1/3)": int((b < 1 / 3).sum()),
                      "inconclusive": int(((b >= 1 / 3) & (b <= 3)).sum()),
                      "for an effect (BF10 over 3)": int((b > 3).sum())})


groups = {"paper's four metrics": list(METRICS), "routing-weight control": [ROUTING_WEIGHT],
          "per-token gap norm": ["gap_norm"], "attribution patching": ["attribution"],
          "literature criteria": list(LITERATURE)}
summ = []
for name in models:
    for gname, ranks in groups.items():
        f = bf[(bf.model == name) & bf.ranking.isin(ranks)]
        for col, r in (("BF10", 0.707), ("BF10_narrow", R_NARROW)):
            summ.append({"model": name, "predictors": gname, "prior r": r, **counts(f, col).to_dict()})
summ = pd.DataFrame(summ)
display(summ.style.format({"prior r": "{:.3f}"}).hide(axis="index")
        .set_caption("Cells by direction of the evidence, under two prior scales"))

# %%
paper_bf = bf[bf.ranking.isin(METRICS)]
n_null, n_eff = int((paper_bf.BF10 < 1 / 3).sum()), int((paper_bf.BF10 > 3).sum())
narrow_null = int((paper_bf.BF10_narrow < 1 / 3).sum())
strongest = bf.loc[bf.BF10.idxmax()]
display(Markdown(
    f"Of the {len(paper_bf)} cells of the paper's four metrics, {n_null} give at least moderate evidence "
    f"*for the null* (BF10 < 1/3) at r = 0.707 and {narrow_null} at r = {R_NARROW}; {n_eff} "
    f"{'gives' if n_eff == 1 else 'give'} at least moderate evidence for an effect (r = 0.707). The strongest "
    f"evidence for an effect among all cells is "
    f"{LABELS[strongest.ranking]} at {strongest.model} L{int(strongest.layer)} "
    f"(BF10 = {strongest.BF10:.3g}, d_z = {strongest.cohens_dz:+.3f}, {strongest.evidence})."))

# %% [markdown]
# ## Answers, from this run

# %%
def answers() -> str:
    lines = []
    sig = new_table[new_table.sig_dual_bonf]
    for p in NEW:
        s = sig[sig.ranking == p]
        where = "; ".join(f"in {m} at relative depth {', '.join(f'{d:.2f}' for d in g.rel_depth)}"
                          for m, g in s.groupby("model", sort=False)) or "nowhere"
        lines.append(f"- **{LABELS[p]}** is valid at the token level (dual-test Bonferroni) {where} "
                     f"({len(s)} of {int((new_table.ranking == p).sum())} cells).")
    n_better = int((tab.vs_random == "better than all").sum())
    n_worse = int((tab.vs_random == "worse than all").sum())
    lines.append(f"- In one-shot pruning, {n_better} of {len(tab)} (criterion, model, fraction) settings beat every "
                 f"random draw and {n_worse} lost to every random draw; the rest fell inside the random band.")
    failed = link[link.significant_cells == 0]
    beat = failed[(failed[zcols] < 0).all(axis=1)]
    lines.append(f"- Of the {len(failed)} (model, criterion) pairs with no significant token-level cell, "
                 f"{len(beat)} still did better than the random mean at every fraction"
                 + (f" ({'; '.join(f'{r.criterion}, {r.model}' for r in beat.itertuples())})." if len(beat) else "."))
    for name in models:
        r = glob_rand_loss.loc[name]
        where = ""
        if per_layer_sweep:
            p = per_layer[(per_layer.model == name) & (per_layer.criterion == "random")]
            m = p.groupby("rel_depth").delta_loss.mean()
            where = f"; pruned alone, the layer at relative depth {m.idxmax():.2f} hurts most ({m.max():+.3f} nats)"
        lines.append(f"- {name}: random pruning of all layers costs "
                     + ", ".join(f"{v:+.3f} nats at {pct(f)}" for f, v in r.items()) + where + ".")
    return "\n".join(lines)


display(Markdown(answers()))

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** Whether two cheap per-token quantities — the size of an expert's contribution at the
# token and the gradient-based estimate of its ablation — order the active experts by their
# measured causal effect, judged on exactly the records the paper's metrics were judged on, and how
# their cost compares with ablating. Whether two expert-level criteria from the pruning literature,
# calibrated on separate texts, do better than the paper's four metrics at the token level. Whether
# any per-expert criterion makes a better one-shot pruning choice than chance, and which layers a
# model can least afford to prune. And, cell by cell, whether the token-level data favour the null
# or merely fail to reject it.
#
# **Does not show.** That a predictor which is valid at the token level would survive fine-tuning
# after pruning, or that these rankings carry over to the paper's full-size checkpoints: the
# default models are small models trained for this book, with a short context. Attribution
# patching is a first-order estimate; it is exact in the limit of a small change of the expert's
# weight (the test suite checks this), and its accuracy for a full removal is what the Spearman
# table measures. Perplexity on held-out text is one quality measure; downstream tasks can react
# differently to the same pruning. The Bayes factors depend on the prior scale; the summary shows
# how much. Re-run the chapter with `models` set to the real checkpoint ids on a GPU for the
# paper's models.
