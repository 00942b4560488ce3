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
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - compare predictors closer to the intervention with corpus statistics of the router;
# - test a pruning criterion against random draws with an exact rank p-value;
# - read Bayes factors for null results, and how they depend on the prior.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers
n_positions = 200  # token positions per cell (the paper: 200)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence"; attribution always estimates "token"
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
prune_fractions = [0.125, 0.25, 0.5]  # share of routed experts removed from every MoE layer
n_random_draws = 20  # random pruning plans per setting (the rank p-value cannot go below 1/(n + 1))
ppl_texts = 40  # held-out texts (second half of the corpus) for perplexity
alpha = 0.05
n_boot = 400  # bootstrap resamples for the Spearman intervals (percentile method)
per_layer_sweep = True  # also prune one MoE layer at a time at the largest fraction (criteria and random draws)
n_random_draws_per_layer = 5  # random plans per layer in that sweep (it describes where pruning hurts; no test)
bf_prior_r = 0.707  # scale of the Cauchy prior on the standardised effect (JZS Bayes factor)
bf_prior_r_narrow = 0.354  # a second, narrower prior (expects smaller effects)
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("10_predictors_and_pruning", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("10_predictors_and_pruning"))

# %% [markdown]
# The paper {cite}`engmann2026audit` leaves three questions open (Sections 4–5):
#
# 1. **Is there a cheap predictor of causal expert importance?** The only signal the paper's
#    audit finds is the per-token routing weight $g_e(x_t)$, and the paper notes that it cannot
#    guide pruning: it needs the forward pass at that token, while a pruning decision is made
#    before inference. Two candidates are closer to the intervention than a corpus statistic: the
#    size of what the expert adds at the token, and a first-order (gradient) estimate of the
#    ablation itself, attribution patching {cite}`nanda2023attribution,syed2023attribution`. Like
#    the routing weight, both need the token's own forward pass (attribution a backward pass as
#    well), so neither can guide a pruning decision made before inference either; and attribution
#    is not much cheaper than ablating on these small models (it took {glue:md}`att_share` of the
#    ablation time in the timing below). Two criteria from the expert-pruning
#    literature summarise each expert over a calibration corpus: REAP averages the first of these,
#    the gap norm $g_e(x_t)\,\lVert E_e(x_t)\rVert$, over the tokens routed to the expert; the
#    frequency-weighted activation norm aggregates the output norm $\lVert E_e(x_t)\rVert$ alone,
#    without the combine weight.
# 2. **Does token-level validity predict deployed pruning?** The audit removes one expert at one
#    token; deployed expert pruning {cite}`lu2024notall,jaiswal2025fantastic` removes experts
#    from the router everywhere, at once, in every MoE layer. The paper argues that pruning
#    succeeds in high-redundancy models *because any selection is nearly harmless*, not because
#    the metric finds dispensable experts. That is testable: a criterion should then do no better
#    than pruning uniformly at random.
# 3. **Evidence for the null.** A non-significant test is not evidence that a metric is useless.
#    The paper suggests Bayes factors; this chapter computes one for every audit cell.
#
# ## The predictors
#
# All predictors rank the active routed experts $e$ at token $t$ of an MoE layer; higher means
# "predicted to matter more". $g_e(x_t)$ is the combine weight the model applies to expert $e$ at
# $t$, $E_e(x_t)$ its output, $S_e$ the calibration tokens that route to $e$ and $N$ the number of
# calibration tokens. The library functions that compute them are named in the last column of
# each table; they are in `moeaudit.metrics` unless another module is named.
#
# **Token-level predictors**: one value per token and active expert.
#
# | predictor | definition | source |
# |---|---|---|
# | per-token routing weight | $g_e(x_t)$ | the paper's control |
# | per-token gap norm | $g_e(x_t)\,\lVert E_e(x_t)\rVert$, the size of what an ablation removes | `token_gap_norm` |
# | attribution patching | $-\nabla_{y_t}\mathcal{L}_t \cdot g_e(x_t)E_e(x_t)$, first-order estimate of $\Delta\mathcal{L}_e^{(t)}$ | {cite}`syed2023attribution`; `attribution.attribution_estimates` |
#
# **Expert-level criteria**: one value per expert, from the calibration tokens.
#
# | criterion | definition | source |
# |---|---|---|
# | frequency-weighted activation norm | $\frac{1}{N}\sum_{s\in S_e}\lVert E_e(x_s)\rVert$ (mean norm × utilisation) | of the kind benchmarked in MC-Suite {cite}`jaiswal2025fantastic`; `pruning_criteria` |
# | REAP | $\frac{1}{\lvert S_e\rvert}\sum_{s\in S_e} p_e(x_s)\,\lVert E_e(x_s)\rVert$, with REAP's router weight $p_e$ (below) | router-weighted expert activation pruning {cite}`lasby2025reap`; same function |
# | the paper's four metrics | utilisation rate, activation norm, mean routing weight, activation std | the paper, Section 2; `expert_metrics_from_routing` |
#
# REAP weighs by its own router weight $p_e(x_s)$: the router's softmax probability over all
# experts, renormalised over the top-$k$ only where the model's config sets `norm_topk_prob`
# (`metrics.reap_router_weights`, REAP's rule), whatever combine weight $g_e$ the model applies.
# Both literature criteria score an expert never routed in the calibration texts zero.
#
# Utilisation rate *is* the frequency criterion of the pruning literature, so it doubles as the
# frequency-only baseline.
#
# **Calibration and evaluation.** The two literature criteria are computed, as in their papers,
# on a calibration set: the first half of the evaluation texts. They are audited only at the
# audit positions in the *other* half, so calibration and evaluation never share a text. The
# paper's four metrics are audited exactly as in the audit chapter (computed over the whole
# corpus), so their cells here are that chapter's cells. For pruning, every per-expert criterion,
# the paper's four included, is recomputed on the calibration half (`metrics.pruning_criteria`)
# and perplexity is measured on held-out texts of the second half.
#
# **Positions and records.** The audit uses the audit chapter's seeded positions and
# single-expert ablation records (same parameters, `min_context = 0` included, so the cached
# records are shared): every predictor is judged against the same measured loss changes.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from myst_nb import glue

from moeaudit import metrics, paper, pruning, report, stats
from moeaudit.attribution import attribution_estimates
from moeaudit.audit import audit_positions, paired_cells, prepare, pruned_perplexities, single_expert_records
from moeaudit.report import join_words
from moeaudit.corpus import TokenizedCorpus
from moeaudit.engine import run_ablations
from moeaudit.metrics import (CRITERION_LABELS as LABELS, LITERATURE_CRITERIA as LITERATURE, METRICS,
                              ROUTING_WEIGHT)

report.use_book_style()
NEW = metrics.TOKEN_PREDICTORS + LITERATURE  # the four predictors audited here
EXPERT_CRITERIA = (*METRICS, *LITERATURE)  # the per-expert criteria used for pruning
DEPTH_LABEL = "relative depth (0 = first, 1 = last)"
pct = lambda f: f"{f:.1%}".replace(".0%", "%")  # noqa: E731


# %% tags=["remove-input"]
def glue_all(**values):  # a str is glued as markdown ({glue:md}), a number as a value ({glue:text})
    report.glue_values(as_markdown=True, **values)


glue_all(over_models="Over all " + str(len(models)) + " models" if len(models) > 1 else f"For {models[0]}",
         alpha=alpha, n_random_draws=n_random_draws, ppl_texts=ppl_texts, r_wide=bf_prior_r, r_narrow=bf_prior_r_narrow,
         p_min=1 / (n_random_draws + 1), n_boot=n_boot, largest_fraction=pct(max(prune_fractions)))

# %% [markdown]
# ## Run: shared records, attribution, criteria
# For each model: the clean pass and the audit chapter's single-expert records (cached), the
# attribution estimate at the same positions (one forward and one backward per batch of
# positions), the per-token gap norm from the clean pass, and the criteria on the calibration
# half. A timing run ablates and attributes the same few positions afresh, so that the cost
# comparison below is like for like on this machine.

# %%
contexts, records, criteria, setup = {}, {}, {}, []
for name in models:
    ctx = contexts[name] = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                                   corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    display(Markdown(audit.regime_line(name, ctx)))
    lay = ctx.model.layout
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=0, batch_size=batch_size)
    pos = audit_positions(ctx, n_positions=n_positions, seed=seed, min_context=0)
    t0 = time.perf_counter()
    att = attribution_estimates(ctx.model, ctx.corpus, ctx.clean, pos, layers=audited, batch_size=batch_size)
    t_att = time.perf_counter() - t0
    half = len(ctx.corpus) // 2  # texts [0, half) calibrate, [half, end) evaluate
    crit = criteria[name] = metrics.pruning_criteria(ctx.clean, num_experts=lay.num_experts, seq_ids=range(half),
                                                     renormalize=metrics.reap_renormalizes(ctx.model))
    rec = rec.merge(att, on=["seq_id", "t", "layer", "expert"], how="left", validate="one_to_one")
    rec = rec.merge(crit[["layer", "expert", *LITERATURE]], on=["layer", "expert"], how="left")
    depth = dict(zip(audited, report.relative_depth(audited, lay.moe_layers)))
    records[name] = rec.assign(gap_pred=metrics.token_gap_norm(ctx.clean, rec), held_out=rec.seq_id >= half,
                               rel_depth=rec.layer.map(depth), half=half)
    few = pos.head(min(8, len(pos)))
    req = rec.merge(few[["seq_id", "t"]], on=["seq_id", "t"])[["seq_id", "t", "layer", "removed"]]
    t_abl_few = pruning.best_time(lambda: run_ablations(ctx.model, ctx.corpus, ctx.clean, req, mode=mode,
                                                        batch_size=batch_size, progress=False))
    t_att_few = pruning.best_time(lambda: attribution_estimates(ctx.model, ctx.corpus, ctx.clean, few, layers=audited,
                                                                batch_size=batch_size, progress=False))
    setup.append({"model": name, "family": lay.family, "MoE layers": len(lay.moe_layers), "routed experts":
                  lay.num_experts, "top-k": lay.top_k, "audited layers": join_words(audited), "positions": len(pos),
                  "held-out positions": int((pos.seq_id >= half).sum()), "ablations": len(rec), "premise failures":
                  int((~rec.premise_ok).sum()), "calibration texts": half, "calibration tokens":
                  int(ctx.clean.tokens.seq_id.lt(half).sum()), "attribution (s)": t_att,
                  "timed positions": len(few), "timed ablations": len(req), "ablations, timed (s)": t_abl_few,
                  "attribution, timed (s)": t_att_few})
setup = pd.DataFrame(setup).set_index("model")

# %% tags=["remove-input"]
display(setup.iloc[:, :11].T)

# %% [markdown]
# Two consistency checks. In `token` mode the ablation removes exactly $g_e(x_t)E_e(x_t)$ from the
# MoE output at $t$, so the gap norm *measured* inside the ablated forward pass must equal the
# per-token gap norm predicted from the clean pass; and `metrics.paired_by_value`, which pairs by
# any per-record value, must reproduce the audit's paired cells for the routing-weight control.
# The table above lists, per model, the layers audited, the positions and the single-expert
# ablations behind every cell, and the calibration half; the held-out positions are the audit
# positions in texts of the second half, the only ones at which the literature criteria are
# audited. Largest relative difference between predicted and measured gap norm:
# {glue:text}`gap_check:.1e`; the pairing reproduces the audit's control cells:
# {glue:md}`pairing_check`.

# %% tags=["hide-input"]
gap_err, same = [], []
for name, rec in records.items():
    ref = paired_cells(rec, contexts[name].metrics, rankings=[ROUTING_WEIGHT])
    mine = metrics.paired_by_value(rec, "prob", ranking=ROUTING_WEIGHT)
    same.append(len(ref) == len(mine) and np.array_equal(ref["diff"], mine["diff"])
                and np.array_equal(ref.expert_high, mine.expert_high))
    gap_err.append(float((np.abs(rec.gap_pred - rec.gap_norm) / rec.gap_norm.clip(lower=1e-12)).max()))
glue_all(gap_check=max(gap_err), pairing_check="yes, for every model" if all(same) else
         f"**no** for {', '.join(m for m, s in zip(records, same) if not s)}")

# %% [markdown]
# ## The token-level audit of the new predictors
# Each predictor picks its high and low expert at every position;
# $D = \Delta\mathcal{L}_{\text{high}} - \Delta\mathcal{L}_{\text{low}}$ as in the audit. The
# Bonferroni family is one model's cells of the four new predictors (predictors × audited layers):
# {glue:md}`family_new`, {glue:md}`family_compare` the paper's family of
# {glue:text}`paper_n_metrics` metrics × {glue:text}`paper_n_layers` layers =
# {glue:text}`paper_family` cells per model. The literature criteria are audited only at held-out
# positions, so their cells have about half the positions of the others.

# %%
frames = []
for name, rec in records.items():
    frames.append(paired_cells(rec, contexts[name].metrics, rankings=[*METRICS, ROUTING_WEIGHT]))
    frames += [metrics.paired_by_value(rec, "gap_pred", ranking="gap_norm"),
               metrics.paired_by_value(rec, "attribution", ranking="attribution")]
    frames += [metrics.paired_by_value(rec[rec.held_out], c, ranking=c) for c in LITERATURE]
cells = pd.concat([f[["model", "layer", "ranking", "seq_id", "t", "delta_loss_high", "delta_loss_low", "diff"]]
                   for f in frames], ignore_index=True)
depth = pd.concat([r[["model", "layer", "rel_depth"]].drop_duplicates() for r in records.values()])
audit = lambda which: stats.audit_table(  # noqa: E731 - one model's cells of ``which`` form a family
    cells[cells.ranking.isin(which)], by=("model", "ranking", "layer"), high_col="delta_loss_high",
    low_col="delta_loss_low", family=("model",), alpha=alpha).merge(depth, on=["model", "layer"])
new_table, paper_table, control_table = audit(NEW), audit(METRICS), audit([ROUTING_WEIGHT])

fam = new_table.groupby("model", sort=False).family_size.first()
(paper_fam,) = {len(paper.PAPER_METRIC_LABELS) * len(layers_) for layers_ in paper.LAYERS.values()}  # one size for all
relation = {"smaller than" if v < paper_fam else "larger than" if v > paper_fam else "the same size as" for v in fam}
glue_all(family_new=", ".join(f"{int(v)} cells for {m}" for m, v in fam.items()), paper_family=paper_fam,
         family_compare=relation.pop() if len(relation) == 1 else "not all of the same size as",
         paper_n_metrics=len(paper.PAPER_METRIC_LABELS), paper_n_layers=len(paper.LAYERS["olmoe"]))

# %% tags=["remove-input"]
for name in models:
    t = new_table[new_table.model == name].assign(ranking=lambda d: d.ranking.map(LABELS))
    display(Markdown(f"### {name}"))
    display(report.style_paper_layout(t, caption=f"{name}: Cohen's d_z [95% CI], p_t, p_W; n = "
                                      f"{int(t.n.min())}–{int(t.n.max())} positions per cell; Bonferroni "
                                      f"family of {int(t.family_size.iloc[0])}"))
    report.show_untested_note(t)  # cells that could not be tested, with the reason
display(Markdown(report.SIGNIFICANCE_NOTE))

# %% tags=["hide-input"]
fig, axes = report.model_panels(models, sharey=True)
shown = [ROUTING_WEIGHT, *NEW]
colors = dict(zip(shown, sns.color_palette("colorblind", 5)))
dodge = dict(zip(shown, np.linspace(-0.04, 0.04, len(shown))))  # side by side where points would coincide
for ax, name in zip(axes, models):
    for r in shown:
        src = control_table if r == ROUTING_WEIGHT else new_table
        cells_r = src[(src.model == name) & (src.ranking == r)]
        report.dz_by_depth(ax, cells_r.assign(rel_depth=cells_r.rel_depth + dodge[r]), label=LABELS[r],
                           color=colors[r], mark_reversals=True)
report.finish_panels(fig, axes, title="New predictors against the routing-weight control (* = Bonferroni-significant "
                     "t-test with d_z > 0; ▼ = the same with d_z < 0; series shifted sideways by up to 0.04 so that "
                     "they do not hide each other)", ylabel="Cohen's $d_z$ of D (95% CI)",
                     xlabel=DEPTH_LABEL, zero_line=True)

# %% [markdown]
# The routing-weight control is drawn for reference (its own family of one ranking × the
# layers, as in the routing-weight chapter). An asterisk marks a cell with $d_z > 0$ whose paired
# t-test is significant under Bonferroni in its family, a ▼ below a point a cell that is
# significant with $d_z < 0$ (a reversal: the predictor's top expert costs less to remove, which
# is evidence against the predictor); the ★ of the tables additionally requires the Wilcoxon test
# to agree (the paper's dual-test rule), which is the verdict used in the text.
#
# ## How well does each predictor track the measured loss change?
# The paired test asks only whether the predictor orders the extremes correctly. Spearman's
# $\rho$ between the predicted value and the measured $\Delta\mathcal{L}_e^{(t)}$ over *all*
# (position, active expert) pairs of a layer asks whether it orders everything. For the
# per-expert criteria every token routed to an expert gets the same value, so $\rho$ there
# measures how much of the token-level variation an expert-level summary can carry at all.
# Intervals: paired bootstrap over (position, expert) pairs, percentile method,
# {glue:text}`n_boot` resamples. It treats the pairs as independent, although the experts active
# at one position share it, so the intervals are narrower than they should be; no test here uses
# them.

# %%
VALUE_COL = {ROUTING_WEIGHT: "prob", "gap_norm": "gap_pred", "attribution": "attribution",
             **{m: m for m in METRICS}, **{c: c for c in LITERATURE}}
rho_rows = []
for name, rec in records.items():
    r_all = rec.merge(contexts[name].metrics[["layer", "expert", *METRICS]], on=["layer", "expert"], how="left")
    for pred, col in VALUE_COL.items():
        src = r_all[r_all.held_out] if pred in LITERATURE else r_all
        for L, g in src.dropna(subset=[col, "delta_loss"]).groupby("layer"):
            if g[col].nunique() > 1:
                s = stats.spearman(g[col], g.delta_loss, n_boot=n_boot, method="percentile", seed=seed)
                rho_rows.append({"model": name, "layer": L, "predictor": pred, **s.iloc[0].to_dict()})
rho = pd.DataFrame(rho_rows).merge(depth, on=["model", "layer"])
verdict = (new_table.groupby(["ranking", "model"], sort=False)
           .agg(significant=("sig_dual_bonf", "sum"), cells=("sig_dual_bonf", "size"),
                dz_min=("cohens_dz", "min"), dz_max=("cohens_dz", "max")).reset_index()
           .merge(rho.groupby(["predictor", "model"]).rho.agg(rho_min="min", rho_max="max"),
                  left_on=["ranking", "model"], right_index=True))

# %% tags=["remove-input"]
signed = lambda v: "+0.00" if round(v, 2) == 0 else f"{v:+.2f}"  # noqa: E731 - no "-0.00"
view = pd.DataFrame({
    "predictor": verdict.ranking.map(LABELS), "model": verdict.model,
    "significant cells": [f"{s} of {n}" for s, n in zip(verdict.significant, verdict.cells)],
    "d_z, range": [f"{signed(a)} to {signed(b)}" for a, b in zip(verdict.dz_min, verdict.dz_max)],
    "Spearman ρ, range": [f"{signed(a)} to {signed(b)}" for a, b in zip(verdict.rho_min, verdict.rho_max)]})
_ = report.show_table(view, labels={c: c for c in view.columns},
                      caption="Per predictor and model: cells significant under the dual test (Bonferroni), range of "
                              "d_z over the layers, range of Spearman ρ over the layers")

# %% tags=["hide-input"]
fig, axes = report.model_panels(models, sharey=True)
for ax, name in zip(axes, models):
    for p in [ROUTING_WEIGHT, *NEW]:
        s = rho[(rho.model == name) & (rho.predictor == p)].sort_values("rel_depth")
        ax.plot(s.rel_depth, s.rho, marker="o", color=colors[p], label=LABELS[p])
        ax.fill_between(s.rel_depth, s.ci_low, s.ci_high, color=colors[p], alpha=0.15, linewidth=0)
    ax.set_ylim(-1, 1)
report.finish_panels(fig, axes, title="Rank agreement between predictor and measured single-expert ablation effect",
                     ylabel="Spearman ρ with measured ΔL (95% CI)", xlabel=DEPTH_LABEL, zero_line=True)

# %% tags=["remove-input"]
by_pred = verdict.groupby("ranking").agg(sig=("significant", "sum"), cells=("cells", "sum"),
                                         rho_min=("rho_min", "min"), rho_max=("rho_max", "max"))
for p in NEW:
    glue_all(**{f"sig_{p}": int(by_pred.loc[p, "sig"]), f"cells_{p}": int(by_pred.loc[p, "cells"]),  # +0.0: no -0.00
                f"rho_min_{p}": round(by_pred.loc[p, "rho_min"], 2) + 0.0, f"rho_max_{p}": round(by_pred.loc[p, "rho_max"], 2) + 0.0})
valid = [LABELS[p] for p in NEW if by_pred.loc[p, "sig"] == by_pred.loc[p, "cells"]]
never = [LABELS[p] for p in NEW if by_pred.loc[p, "sig"] == 0]
and_ = join_words
glue_all(token_verdict=(f"{and_(valid)} {'passes' if len(valid) == 1 else 'pass'} the audit in every cell"
                        if valid else "No new predictor passes the audit in every cell")
         + (f"; {and_([n[0].lower() + n[1:] if n[1:2].islower() else n for n in never])} "
            f"{'is' if len(never) == 1 else 'are'} not shown valid in any cell ("
            + pruning.null_strength_text(new_table[new_table.ranking.isin([p for p in NEW if LABELS[p] in never])
                                                   & ~new_table.sig_dual_bonf])
            + ")" if never else ""))
gt = new_table[new_table.ranking == "gap_norm"]
t_only = gt[gt.sig_t_bonf & ~gt.sig_dual_bonf]
glue_all(token_reading=f"The size of an expert's contribution passes the dual test in {int(gt.sig_dual_bonf.sum())} of "
         f"{len(gt)} cells; " + ("in " + and_([f"{m} L{int(L)} (*p_t* = {p:.2g})" for m, L, p in zip(t_only.model,
         t_only.layer, t_only.p_t)]) + " its t test passes Bonferroni and only the Wilcoxon test blocks it" if len(t_only)
         else "its t test passes Bonferroni in none") + ". The first-order estimate, which also weighs the direction of the contribution against the loss gradient, "
         f"passes in {int(by_pred.loc['attribution', 'sig'])} of {int(by_pred.loc['attribution', 'cells'])}.")

# %% [markdown]
# **Reading the audit.** {glue:md}`token_verdict`. {glue:md}`over_models`, attribution patching is
# significant (dual test, Bonferroni) in {glue:text}`sig_attribution` of
# {glue:text}`cells_attribution` cells, with Spearman $\rho$ between
# {glue:text}`rho_min_attribution:+.2f` and {glue:text}`rho_max_attribution:+.2f`; the per-token
# gap norm in {glue:text}`sig_gap_norm` of {glue:text}`cells_gap_norm` ($\rho$ from
# {glue:text}`rho_min_gap_norm:+.2f` to {glue:text}`rho_max_gap_norm:+.2f`); the
# frequency-weighted norm in {glue:text}`sig_freq_weighted_norm` of
# {glue:text}`cells_freq_weighted_norm` and REAP in {glue:text}`sig_reap` of
# {glue:text}`cells_reap`. {glue:md}`token_reading` Of the per-token gap norm's cells,
# {glue:md}`bf_gap3_text` at least moderate evidence for an effect ($\mathrm{BF}_{10} \ge 3$, $r$ =
# {glue:text}`r_wide`; see the section on Bayes factors).
#
# ## What each predictor costs
# The cost of a predictor is the computation it needs beyond the model's ordinary forward pass:
# none at inference for the per-expert criteria (one clean pass over the calibration corpus,
# once), none for the per-token routing weight and gap norm (read off the token's own forward
# pass), one forward and one backward per batch of positions for attribution patching (all layers
# at once), and top-$k$ forward passes per position and layer for the measured ablations. The
# timings are wall-clock seconds on this machine for the same few positions, ablated one expert at
# a time and attributed once, each the best of three repetitions: ablating took {glue:md}`speed_range`
# times as long as attributing. These are fractions of a second, so the ratio is a rough guide to the
# cost on small models, not a benchmark.
# In the table, "attribution (s)" is the attribution pass over all audit positions of the model;
# the timed columns refer to the few positions of the like-for-like comparison. The measured
# ablations of the whole audit are not timed here: they are read from the cache.

# %% tags=["remove-input"]
speed = setup["ablations, timed (s)"] / setup["attribution, timed (s)"]
glue_all(speed_range="–".join(dict.fromkeys(f"{v:.1f}" for v in (speed.min(), speed.max()))),
         att_share="–".join(dict.fromkeys(f"{v:.0%}" for v in (1 / speed.max(), 1 / speed.min()))))
display(setup.iloc[:, 11:].assign(**{"ablation / attribution time": speed}).style.format(precision=2))

# %% [markdown]
# ## Deployment check: one-shot pruning
# Each per-expert criterion, computed on the calibration half, ranks the routed experts of every
# MoE layer; the lowest-ranked fraction $f$ of each layer is removed from its router, all MoE
# layers at once, as a deployed pruning pass would (`pruning.criterion_plan`). A removed expert's
# router logit is set to $-\infty$, so the router re-distributes probability and picks its top-$k$
# among the remaining experts, as a model built without that expert would. Experts never selected
# in the calibration texts go first under every criterion (they score zero, or have no value under the
# metrics that average over the routed tokens). No fine-tuning follows, so these
# numbers are the criterion's own contribution, before any recovery. Quality is perplexity on the
# first {glue:text}`ppl_texts` texts of the second half of the corpus.
#
# **The random baseline.** The reference is uniformly random pruning of the same number of
# experts per layer, {glue:text}`n_random_draws` independent draws per setting
# (`pruning.random_plan`). With $n$ draws, a criterion that is no better than a random choice
# beats every draw by chance with probability $1/(n+1)$: one in six with five draws, hence many
# draws. Each criterion's result is placed among the draws by its Monte-Carlo rank p-value
# (`pruning.random_rank_pvalue`; {cite}`davison1997bootstrap`, Section 4.2;
# {cite}`phipson2010permutation`)
#
# $$p = \frac{1 + \#\{\text{draws with perplexity} \le \text{the criterion's}\}}{1 + n},$$
#
# which is valid (uniform on its support) if the criterion's plan is exchangeable with a random
# one; its smallest value here is {glue:text}`p_min:.3f`. The perplexities are cached with the
# records, and a plan is evaluated once however many criteria choose it: criteria that agree on
# the experts to remove share one evaluation (the column "distinct plans" of the table below).

# %%
prune_rows, held_out_info = [], {}
for name, ctx in contexts.items():
    lay, half = ctx.model.layout, int(records[name].half.iloc[0])
    held = TokenizedCorpus.from_token_ids(
        [ctx.corpus.sequences[i] for i in range(half, min(len(ctx.corpus), half + ppl_texts))], source="held-out")
    plans, meta = pruning.pruning_plans(
        criteria[name], criteria_names=EXPERT_CRITERIA, fractions=prune_fractions, n_random=n_random_draws,
        moe_layers=lay.moe_layers, num_experts=lay.num_experts, seed=seed,
        per_layer_fraction=max(prune_fractions) if per_layer_sweep else None, n_random_per_layer=n_random_draws_per_layer)
    ppl = pruned_perplexities(ctx, plans, held)  # cached; identical plans are evaluated once
    held_out_info[name] = {"texts": len(held), "tokens": int(ppl.n_tokens[0]), "perplexity": ppl.perplexity[0],
                           "mean_loss": ppl.mean_loss[0], "distinct plans": ppl.plan_json.nunique()}
    prune_rows.append(meta.assign(model=name, mean_loss=ppl.mean_loss[1:].to_numpy(),
                                  delta_loss=ppl.mean_loss[1:].to_numpy() - ppl.mean_loss[0]))
pruning_df = pd.concat(prune_rows, ignore_index=True).assign(perplexity=lambda d: np.exp(d.mean_loss))
held_out_info = pd.DataFrame(held_out_info).T.rename_axis("model")
vs_random = pruning.compare_with_random(pruning_df, keys=("model", "scope", "fraction"))
glob, g = pruning_df[pruning_df.scope == "all"], vs_random[vs_random.scope == "all"]  # all layers pruned at once

# %% tags=["remove-input"]
display(held_out_info.rename(columns={"mean_loss": "mean loss (nats)"}).style.format("{:.0f}")
        .format("{:.2f}", subset=["perplexity", "mean loss (nats)"])
        .set_caption("Held-out texts and the unpruned model's perplexity"))

# %% tags=["hide-input"]
markers = dict(zip(EXPERT_CRITERIA, ["o", "s", "^", "v", "D", "P"]))
crit_colors = dict(zip(EXPERT_CRITERIA, sns.color_palette("colorblind", len(EXPERT_CRITERIA))))
fig, axes = report.model_panels(models, height=4.0)
for ax, name in zip(axes, models):
    base = held_out_info.loc[name, "perplexity"]
    r = glob[(glob.model == name) & (glob.criterion == "random")].groupby("fraction").perplexity
    xs = [0.0, *prune_fractions]
    ax.fill_between(xs, [base, *r.min()], [base, *r.max()], color="0.6", alpha=0.35, linewidth=0,
                    label=f"random ({n_random_draws} draws, min–max)")
    ax.plot(xs, [base, *r.median()], color="0.35", linestyle="--", label="random, median")
    for c in EXPERT_CRITERIA:
        s = glob[(glob.model == name) & (glob.criterion == c)].sort_values("fraction")
        ax.plot(xs, [base, *s.perplexity], marker=markers[c], color=crit_colors[c], label=LABELS[c], linewidth=1.2)
    ax.set_xticks(xs, ["0"] + [pct(f) for f in prune_fractions])
report.finish_panels(fig, axes, title="One-shot pruning of all MoE layers: criteria against random selection",
                     ylabel="held-out perplexity", xlabel="share of experts pruned per layer")

# %% [markdown]
# *Reading the figure.* Lower is better. The grey band spans the random draws, the dashed line is
# their median. The tables give, per model, each criterion's perplexity with its rank p-value
# among the random draws, and the random draws' minimum, median, mean and maximum. The rank p-value
# replaces a distance from the random mean in standard deviations: such a $z$ assumes the random
# perplexities are roughly normal and hides how many draws stand behind the standard deviation,
# while the rank needs no distributional assumption and its resolution, $1/(n+1)$, is explicit.
# The random draws are shared by all criteria of a setting, so the p-values of one setting are
# not independent of each other.

# %% tags=["remove-input"]
for name in models:
    t = g[g.model == name]
    wide = t.pivot(index="criterion", columns="fraction", values="perplexity").loc[list(EXPERT_CRITERIA)]
    pv = t.pivot(index="criterion", columns="fraction", values="p_rank").loc[list(EXPERT_CRITERIA)]
    cell = pd.DataFrame({pct(f): [f"{x:.2f} (p = {y:.3f})" for x, y in zip(wide[f], pv[f])] for f in wide},
                        index=[LABELS[c] for c in wide.index])
    rnd = t.groupby("fraction")[["random_min", "random_median", "random_mean", "random_max"]].first().T.map(
        lambda v: f"{v:.2f}")
    rnd.index, rnd.columns = ["random: min", "random: median", "random: mean", "random: max"], [pct(f) for f in rnd.columns]
    out = pd.concat([cell, rnd])
    display(Markdown(f"### {name}"))
    display(out.style.set_caption(f"{name}: held-out perplexity after pruning (unpruned "
                                  f"{held_out_info.loc[name, 'perplexity']:.2f}) and rank p-value among "
                                  f"{n_random_draws} random draws"))

# %% tags=["hide-input"]
n_set, n_draws = len(g), int(g.n_draws.min())
tok = pd.concat([paper_table, new_table[new_table.ranking.isin(LITERATURE)]]).groupby(["model", "ranking"]).sig_dual_bonf.sum()
link = pruning.rank_tests_by_criterion(g, alpha=alpha, token_cells=tok).set_index(["model", "criterion"])
link = link.rename(columns={"below random mean at every fraction": "beats_mean", "largest p": "p_max"})
failed = link[link.token_cells == 0]
glue_all(n_settings=n_set, n_beat_mean=int(g.beats_mean.sum()), n_beat_all=int(g.beats_all.sum()),
         n_p_alpha=int((g.p_rank <= alpha).sum()), n_lose_all=int(g.loses_to_all.sum()), n_chance=n_set / (n_draws + 1),
         per_model_beats=pruning.random_mean_counts_text(g, what="settings", value="perplexity"),
         n_failed=len(failed), n_failed_beat_mean=int(failed.beats_mean.sum()),
         n_failed_p_alpha=int((failed.p_max <= alpha).sum()),
         failed_phrase=(f"all {len(link)}" if len(failed) == len(link) else f"{len(failed)} of the {len(link)}")
         + " (model, criterion) pairs of per-expert criteria have no significant token-level cell")
by_crit = link.reset_index()
claims = pruning.corrected_rank_claims(by_crit, alpha=alpha, n_draws=n_draws)
short = claims[(claims.m > 0) & ~claims.attainable]
glue_all(resolution_note="enough to reach the level corrected for the criteria tested" if short.empty else
         f"not enough to reach the level corrected for the failing criteria tested per model, α/m = "
         f"{short.level.min():.3g}, which needs at least {int(short.draws_needed.max())} draws")
glue_all(per_model_rank="; ".join(pruning.rank_test_model_phrase(by_crit, m, alpha=alpha) for m in models),
         below_unpruned=pruning.below_unpruned_text(glob, held_out_info.perplexity.to_dict(), labels=LABELS),
         **pruning.validity_claim_texts(claims, alpha=alpha, n_draws=n_draws, labels=LABELS,
                                        beat_all=(int(g.beats_all.sum()), n_set)))

# %% tags=["remove-input"]
_ = report.show_table(pd.DataFrame({
    "model": by_crit.model, "criterion": by_crit.criterion.map(LABELS), "token-level cells passing": by_crit.token_cells,
    "below random mean at every fraction": by_crit.beats_mean.map({True: "yes", False: "no"}),
    "fractions with rank p ≤ α": [f"{k} of {n}" for k, n in zip(by_crit["fractions with p ≤ alpha"], by_crit.fractions)],
    "largest rank p": by_crit.p_max}), formats={"largest rank p": "{:.3f}"},
    caption=f"Per model and criterion: token-level audit cells passing (dual test, Bonferroni) and the rank tests "
            f"against {n_random_draws} random draws at the {len(prune_fractions)} fractions (all MoE layers pruned), "
            f"at α = {alpha:g}.")

# %% [markdown]
# **Against the random baseline.** Of the {glue:text}`n_settings` (model, criterion, fraction)
# settings, {glue:text}`n_beat_mean` prune to a lower perplexity than the mean of the random
# draws, {glue:text}`n_beat_all` beat every one of the draws (rank $p \le$
# {glue:text}`p_min:.3f`) and {glue:text}`n_lose_all` lose to every draw;
# {glue:text}`n_p_alpha` have $p \le$ {glue:text}`alpha` (each uncorrected). The pooled counts
# hide differences between models: {glue:md}`per_model_beats`. If no criterion were better than a
# random choice, about {glue:text}`n_chance:.1f` settings would beat every draw by chance; the
# settings of a model share their random draws and criteria that agree share their plans, so the
# count is not a valid test and no p-value is attached to it.
#
# {glue:md}`below_unpruned`
#
# **Token-level validity and pruning quality.** In the token-level audit (dual test, Bonferroni
# within the model's family; the cells of the paper's four metrics are those of the audit chapter,
# those of the literature criteria are above), {glue:md}`failed_phrase`; the table above gives the
# count per pair beside its rank tests. Of those {glue:text}`n_failed` pairs, the number that
# still prune better than the random mean at every fraction is {glue:text}`n_failed_beat_mean`,
# and the number that beat the random draws with rank $p \le$ {glue:text}`alpha` at every
# fraction is {glue:text}`n_failed_p_alpha`, uncorrected for the number of criteria tested.
# The paper concludes from its progressive ablation:
#
# > "The metric and the random baseline are doing the same thing." {cite}`engmann2026audit`
#
# The quote is about OLMoE's progressive ablation (removing most of a token's active experts at
# its early layers), while the pruning here removes experts from every MoE layer at once, the last
# included; it is tested model by model, tiny-olmoe being the stand-in for OLMoE. A criterion below the random mean
# may still sit inside the spread of the draws, so the verdict rests on the rank p-values, model by
# model (uncorrected): {glue:md}`per_model_rank`. {glue:md}`paper_claim_verdict`. The two experiments ask different questions: the audit asks
# which of the *active* experts at a token matters more, pruning asks which experts the model can
# afford to lose from its router everywhere, a question about experts that are selected,
# re-routed and compensated across many tokens.
#
# For the paper's metrics the token-level cells use the whole corpus (as in the audit chapter), the
# pruning plans the calibration half. The two versions rank a layer's experts alike: Spearman
# $\rho$ between them (`stats.spearman_defined`) has median {glue:text}`agree_median:.2f` (range
# {glue:text}`agree_min:.2f` to {glue:text}`agree_max:.2f`) over the {glue:text}`agree_n`
# (model, layer, metric) combinations.

# %% tags=["hide-input"]
agree = [stats.spearman_defined(ctx.metrics[ctx.metrics.layer == L].sort_values("expert")[m],
                                criteria[name][criteria[name].layer == L].sort_values("expert")[m])[0]
         for name, ctx in contexts.items() for L in ctx.model.layout.moe_layers for m in METRICS]
agree = np.array(agree)[np.isfinite(agree)]
glue_all(agree_median=np.median(agree), agree_min=agree.min(), agree_max=agree.max(), agree_n=len(agree))

# %% [markdown]
# ## Where does pruning hurt? One layer at a time
# The same criteria and random draws at the largest fraction ({glue:md}`largest_fraction`),
# applied to a single MoE layer with every other layer intact. The y-axis is the increase of the
# held-out mean loss in nats (the log of the perplexity ratio). This is the pruning counterpart of
# the progressive-ablation chapter's redundancy cliff: a layer whose token-level buffer is large
# should also tolerate losing experts from its router. {glue:md}`per_layer_summary`

# %% tags=["hide-input"]
per_layer = pruning_df[pruning_df.scope != "all"].assign(layer=lambda d: d.scope.astype(int))
per_layer["rel_depth"] = [report.relative_depth([L], contexts[m].model.layout.moe_layers)[0]
                          for m, L in zip(per_layer.model, per_layer.layer)]
if per_layer_sweep:
    pl = vs_random[vs_random.scope != "all"]
    rnd = per_layer[per_layer.criterion == "random"].groupby(["model", "layer"]).delta_loss.mean()
    worst = rnd.groupby(level="model").idxmax()
    display(pd.DataFrame({"layer hurt most by random pruning": worst.map(lambda k: k[1]),
                          "its random mean ΔL (nats)": rnd[worst].to_numpy(),
                          "layer hurt least": rnd.groupby(level="model").idxmin().map(lambda k: k[1]),
                          "(criterion, layer) settings below the random mean": pl.groupby("model").beats_mean
                          .agg(lambda b: f"{int(b.sum())} of {len(b)}")}).style.format(precision=3))
    over = f"Over all {len(models)} models," if len(models) > 1 else f"For {models[0]},"
    glue_all(per_layer_summary=f"This sweep uses {n_random_draws_per_layer} random draws per layer, so its rank p-value "
             f"cannot go below {1 / (n_random_draws_per_layer + 1):.3f}: it describes where pruning hurts, it does not test "
             f"the criteria. {over} {int(pl.beats_mean.sum())} of the {len(pl)} single-layer "
             "(criterion, layer) settings prune to a lower loss than the mean of the random draws ("
             + pruning.random_mean_counts_text(pl, what="settings", value="loss", sub=None, beat_all=False)
             + "); the table names, per model, the layers whose random pruning costs most and least.")
else:
    glue_all(per_layer_summary="The single-layer sweep was not run (`per_layer_sweep = False`).")

# %% tags=["hide-input"]
if per_layer_sweep:
    fig, axes = report.model_panels(models)
    for ax, name in zip(axes, models):
        s = per_layer[per_layer.model == name]
        rr = s[s.criterion == "random"].groupby("rel_depth").delta_loss.agg(["median", "min", "max"])
        ax.fill_between(rr.index, rr["min"], rr["max"], color="0.6", alpha=0.35, linewidth=0, label="random, min–max")
        ax.plot(rr.index, rr["median"], color="0.35", linestyle="--", label="random, median")
        for c in EXPERT_CRITERIA:
            q = s[s.criterion == c].sort_values("rel_depth")
            ax.plot(q.rel_depth, q.delta_loss, marker=markers[c], color=crit_colors[c], label=LABELS[c], linewidth=1)
    report.finish_panels(fig, axes, title=f"Pruning {pct(max(prune_fractions))} of the experts of a single MoE layer: "
                         "held-out loss", ylabel="mean loss increase (nats)", xlabel="relative depth of the pruned layer",
                         zero_line=True)

# %% [markdown]
# ## Bayes factors: evidence for the null, or just no evidence?
# For every audit cell (the paper's four metrics, the routing-weight control and the four new
# predictors), the JZS Bayes factor $\mathrm{BF}_{10}$ of the paired differences $D$
# {cite}`rouder2009bayesian` (`stats.jzs_bayes_factor`): the one-sample $t$ of $D$ against $0$, a
# Cauchy prior of scale $r$ on the standardised effect under $H_1$. $\mathrm{BF}_{10} > 1$ favours
# an effect, $< 1$ the null of no effect. The labels (`stats.jeffreys_label`) follow Jeffreys'
# scale {cite}`jeffreys1961theory` as tabulated by Lee and Wagenmakers {cite}`lee2013bayesian`.
# The default prior scale is $r$ = {glue:text}`r_wide`; because the audit's effects are small,
# the summary also reports $r$ = {glue:text}`r_narrow`, a prior that expects smaller effects and
# so is slower to declare the null.
#
# **Two-sided against a directional question.** This $\mathrm{BF}_{10}$ is *two-sided*: its
# alternative puts half its prior mass on effects of the wrong sign. Definition 2.1 is
# directional: a valid metric makes $D$ *positive*. The directional Bayes factor
# $\mathrm{BF}_{+0}$ (prior restricted to positive effects) equals $\mathrm{BF}_{10}$ times twice
# the posterior probability of a positive effect: up to twice $\mathrm{BF}_{10}$ when $D$ leans
# positive, and smaller when it leans negative. The counts below are two-sided throughout: a
# cell whose $D$ leans *negative* can give evidence for an effect, which for Definition 2.1 is
# evidence against validity. Read a large $\mathrm{BF}_{10}$ together with the sign of $d_z$.

# %%
bf = []
for (name, rk, L), grp in cells.groupby(["model", "ranking", "layer"], sort=False):
    d = grp["diff"].to_numpy(dtype=float)
    bf.append({"model": name, "ranking": rk, "layer": L, "n": len(d), "cohens_dz": stats.cohens_dz(d),
               "BF10": stats.jzs_bayes_factor(d, r=bf_prior_r), "BF10_narrow": stats.jzs_bayes_factor(d, r=bf_prior_r_narrow)})
bf = pd.DataFrame(bf).merge(depth, on=["model", "layer"])
bf["evidence"] = bf.BF10.map(stats.jeffreys_label)
RANK_ORDER = [*METRICS, ROUTING_WEIGHT, *NEW]

# %% [markdown]
# In the figure each dot is one audit cell, placed in its predictor's column and shifted from
# left to right by the depth of its layer (colour as well); the grey band between $1/3$ and $3$
# is the inconclusive zone, dots below it favour the null, dots above it an effect.

# %% tags=["hide-input"]
LOG_LO, LOG_HI = -1.5, 3.0  # log10 BF10 shown; cells beyond are drawn as triangles at the edge
fig, axes = report.model_panels(models, height=4.6, sharey=True)
for ax, name in zip(axes, models):
    t = bf[bf.model == name].assign(y=lambda d: np.log10(d.BF10), x=lambda d: d.ranking.map(
        {r: i for i, r in enumerate(RANK_ORDER)}) + (d.rel_depth - 0.5) * 0.5)
    ax.axhspan(np.log10(1 / 3), np.log10(3), color="0.85", zorder=0)
    for clip, marker in ((t.y.between(LOG_LO, LOG_HI), "o"), (t.y > LOG_HI, "^"), (t.y < LOG_LO, "v")):
        sc = ax.scatter(t.x[clip], t.y[clip].clip(LOG_LO, LOG_HI), c=t.rel_depth[clip], cmap="viridis", vmin=0, vmax=1,
                        marker=marker, s=32, edgecolor="0.2", linewidth=0.4, zorder=3)
    ax.set_ylim(LOG_LO - 0.2, LOG_HI + 0.2)
    ax.set_xticks(range(len(RANK_ORDER)), [LABELS[r] for r in RANK_ORDER], rotation=60, ha="right", fontsize=8)
    if ax.get_subplotspec().colspan.start == 0:
        ax.set_ylabel("log$_{10}$ BF$_{10}$ (below 0: favours the null)", fontsize=9)
fig.suptitle(f"Bayes factors for every audit cell (r = {bf_prior_r})\ngrey band: inconclusive; ▲ ▼: beyond the axis")
fig.tight_layout()
spare = [a for a in fig.axes if not a.get_visible()]
if spare:  # the colour bar in the grid's spare slot
    box = spare[0].get_position()
    cax = fig.add_axes((box.x0 + 0.1 * box.width, box.y0 + 0.6 * box.height, 0.8 * box.width, 0.04 * box.height))
    fig.colorbar(sc, cax=cax, orientation="horizontal", label="relative depth of the layer")
else:
    fig.colorbar(sc, ax=axes, label="relative depth of the layer", shrink=0.7, pad=0.02)
plt.show()

# %%
bf["predictors"] = bf.ranking.map({**{m: "paper's four metrics" for m in METRICS}, **{c: "literature criteria" for c
                                                                                      in LITERATURE}}).fillna(bf.ranking.map(LABELS))
summ = (bf.melt(id_vars=["model", "predictors"], value_vars=["BF10", "BF10_narrow"], var_name="Bayes factor")
        .assign(evidence=lambda d: pd.cut(d.value, [0, 1 / 3, 3, np.inf], right=False,
                                          labels=["for the null (< 1/3)", "inconclusive", "for an effect (≥ 3)"]))
        .pivot_table(index=["model", "predictors"], columns=["Bayes factor", "evidence"], values="value", aggfunc="size",
                     fill_value=0, observed=False, sort=False)
        .rename(columns={"BF10": f"BF10 (r = {bf_prior_r})", "BF10_narrow": f"BF10_narrow (r = {bf_prior_r_narrow})"},
                level=0))

# %% tags=["remove-input"]
display(summ.style.set_caption(f"Cells by direction of the evidence (BF10: r = {bf_prior_r}; BF10_narrow: r = "
                               f"{bf_prior_r_narrow})"))
paper_bf, strongest = bf[bf.ranking.isin(METRICS)], bf.loc[bf.BF10.idxmax()]
n_bf_gap3 = int((bf[bf.ranking == "gap_norm"].BF10 >= 3).sum())
glue("bf_gap3_text", Markdown(f"{n_bf_gap3} {'gives' if n_bf_gap3 == 1 else 'give'}"), display=False)
glue_all(bf_gap3=n_bf_gap3, bf_cells=len(paper_bf), bf_null=int((paper_bf.BF10 < 1 / 3).sum()), bf_effect=int((paper_bf.BF10 >= 3).sum()), bf_effect_neg=int(((paper_bf.BF10 >= 3) & (paper_bf.cohens_dz < 0)).sum()),
         bf_null_narrow=int((paper_bf.BF10_narrow < 1 / 3).sum()), bf_strong_value=strongest.BF10, bf_strong_dz=strongest.cohens_dz,
         bf_null_reading=pruning.bf_null_reading_text(bf, control_table, r=bf_prior_r, control=ROUTING_WEIGHT),
         bf_strong_cell=f"{LABELS[strongest.ranking]} at {strongest.model} L{int(strongest.layer)} ({strongest.evidence})")

# %% [markdown]
# Of the {glue:text}`bf_cells` cells of the paper's four metrics, {glue:text}`bf_null` give at
# least moderate evidence *for the null* ($\mathrm{BF}_{10} < 1/3$) at $r$ =
# {glue:text}`r_wide` and {glue:text}`bf_null_narrow` at $r$ = {glue:text}`r_narrow`;
# {glue:text}`bf_effect` give at least moderate evidence for an effect ($r$ =
# {glue:text}`r_wide`), {glue:text}`bf_effect_neg` of them for an effect with $d_z < 0$, that is
# against the metric's validity. {glue:md}`bf_null_reading` The strongest evidence for an effect among all cells is
# {glue:md}`bf_strong_cell`, $\mathrm{BF}_{10}$ = {glue:text}`bf_strong_value:.3g` with
# $d_z$ = {glue:text}`bf_strong_dz:+.3f`.

# %% [markdown]
# ## The tail: do pruning criteria find the experts whose removal hurts most?
# A pruning criterion is meant to keep the experts that matter. The test that asks most of it is
# the tail: per audited layer, the experts whose mean loss change $\Delta\mathcal{L}$ over the
# held-out audit positions where they are routed is in the top {glue:text}`tail_share:.0%` of the layer's measured
# experts (at least one). The criteria are the pruning choices of REAP's reference code
# {cite}`lasby2025reap`, each as that code computes it (`metrics.REAP_COMMIT` names the commit
# read): frequency, the norm of the expert's mean output over its routed tokens (`ean_ca`), the
# expert activation norm summed and averaged, weighted frequency, the weighted activation norm
# summed, REAP (the weighted norm averaged over the expert's routed tokens) and maximum
# activation (the largest output element, floored at zero). The code also lists L2 variants of
# the weighted sum and of REAP but computes neither (asking for one stops with an error), so they
# are left out. The weight is REAP's: the router's softmax probability over all experts,
# renormalised over the top-k only where the model's config sets `norm_topk_prob`, whatever
# combine weight the model applies; an expert never routed in the calibration half scores zero
# on every one of these criteria, as in REAP's code. A last criterion is our own super-expert
# score, the largest absolute element of the expert's down-projection output over its routed
# tokens: Su et al. {cite}`su2025superexperts` flag the few experts whose outliers pass a
# threshold, and the score ranks every expert by that magnitude. All are computed on the
# calibration half (`metrics.reap_criteria_from_routing`; the mean outputs and activation maxima
# from one clean pass over that half, `engine.expert_mean_outputs`). For each criterion: precision
# at the tail cut (its own top experts, as many as the tail) against the random expectation, and the rank of
# the single most damaging expert under the criterion, whose exact p-value under a random ranking
# is rank / number of experts ("ranked at least as high"); pooled over layers and models by the
# exact rank-sum test and Holm-corrected over the criteria (`chapters.predictors`).

# %%
from moeaudit.chapters.predictors import (TAIL_SHARE, pooled_tail_summary, smallest_rank_pvalue, tail_selection_sentence,
                                          tail_sentence, tail_table)
from moeaudit.engine import expert_mean_outputs

tail_records, tail_criteria = [], []
for name, rec in records.items():
    ctx, half = contexts[name], int(records[name].half.iloc[0])
    lay, tail_layers = ctx.model.layout, sorted(int(L) for L in rec.layer.unique())
    outs = expert_mean_outputs(ctx.model, ctx.corpus, layers=tail_layers, seq_ids=range(half), progress=False)
    cal = ctx.clean.tokens.seq_id.lt(half).to_numpy()
    for L in tail_layers:
        r = ctx.clean.layer_routing(L)
        c = metrics.reap_criteria_from_routing(r["indices"][cal], r["prob"][cal], r["norm"][cal], num_experts=lay.num_experts,
                                               renormalize=metrics.reap_renormalizes(ctx.model), means=outs.means[L])
        c["max_activations"] = metrics.max_activations(outs.indices[L], outs.slot_max[L], num_experts=lay.num_experts)
        c["super_expert"] = metrics.super_expert_score(outs.indices[L], outs.slot_max_abs[L], num_experts=lay.num_experts)
        tail_criteria.append(c.assign(model=name, layer=L))
    tail_records.append(rec[rec.held_out])
tail_tab = tail_table(pd.concat(tail_records), pd.concat(tail_criteria), criteria_names=metrics.REAP_CRITERIA)
tail_sum = pooled_tail_summary(tail_tab, alpha=alpha)

# %% tags=["remove-input"]
TAIL_COLUMNS = {"precision": ("precision at the tail cut", "{:.3f}"), "mean_rank": ("mean rank of the most damaging expert", "{:.2f}"),
                "p_pooled": ("rank-sum p, pooled", "{:.3g}"), "p_holm": ("Holm p", "{:.3g}"),
                "n_layers": ("layers", "{:.0f}"), "mean_n": ("measured experts per layer (mean)", "{:.1f}"),
                "random_precision": ("precision at random", "{:.3f}"),
                "critical_mean_rank_strict": ("largest mean rank Holm rejects at its first step", "{:.2f}"),
                "critical_mean_rank": ("largest mean rank any step can reject", "{:.2f}")}
same = [c for c in TAIL_COLUMNS if c not in ("precision", "mean_rank", "p_pooled", "p_holm") and tail_sum[c].nunique(dropna=False) == 1]
_ = report.show_table(
    tail_sum.assign(criterion=tail_sum.criterion.map(LABELS))[["criterion", *[c for c in TAIL_COLUMNS if c not in same]]],
    labels={c: label for c, (label, _) in TAIL_COLUMNS.items()},
    formats={label: f for label, f in TAIL_COLUMNS.values()},
    caption=f"Tail of each audited layer (top {TAIL_SHARE:.0%} by mean ΔL in nats, held-out positions): precision at "
            "the tail cut and rank of the most damaging expert (rank 1 = top)"
            + ("; the same for every criterion: " + "; ".join(
                f"{TAIL_COLUMNS[c][0]} " + ("–" if pd.isna(v := tail_sum[c].iloc[0]) else TAIL_COLUMNS[c][1].format(v))
                for c in same) if same else ""))
sizes = sorted(set(tail_tab.n_tail))
glue_all(tail_text=tail_sentence(tail_sum, alpha=alpha, labels=LABELS), tail_selection=tail_selection_sentence(tail_tab),
         tail_share=TAIL_SHARE, tail_n_layers=int(tail_sum.n_layers.max()),
         tail_sizes=str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}",
         tail_step=f"1/{sizes[-1]}" if len(sizes) == 1 else f"1/{sizes[-1]} to 1/{sizes[0]}",
         tail_min_obs=int(pd.concat(tail_records).groupby(["model", "layer", "expert"]).size().min()))

# %% [markdown]
# {glue:md}`tail_text` The tail holds {glue:md}`tail_sizes` experts per layer, so precision at the
# cut moves in steps of {glue:md}`tail_step`, and each layer contributes one rank:
# {glue:text}`tail_n_layers` layers in all. The mean $\Delta\mathcal{L}$ of an expert rests on
# the held-out positions where it is routed, as few as {glue:text}`tail_min_obs` for the most
# rarely routed expert, so the tail itself is measured with noise. {glue:md}`tail_selection` The
# rank-sum test asks whether a criterion ranks this measured tail above chance; it cannot tell a
# criterion that finds damaging experts from one that favours rarely measured ones.

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** On the default models, judged on exactly the records the paper's metrics were
# judged on: whether two cheap per-token quantities order the active experts by their measured
# causal effect, and what they cost relative to ablating. {glue:md}`token_verdict`. Whether any
# per-expert criterion makes a better one-shot pruning choice than a random one, against a random
# baseline that resolves a rank p-value of {glue:text}`p_min:.3f` ({glue:md}`resolution_note`): here
# {glue:text}`n_beat_mean` of {glue:text}`n_settings` settings beat the random mean and
# {glue:text}`n_beat_all` beat every draw, while {glue:md}`failed_phrase`. Per model,
# {glue:md}`per_model_beats`. {glue:md}`shows_verdict`. And, cell by
# cell, whether the token-level data favour the null or merely fail to reject it (two-sided).
#
# **Does not show.** That these rankings carry over to the paper's full-size checkpoints, whose
# redundancy (removing most active experts at most of OLMoE's layers barely changes the loss) is
# what the paper's argument rests on: the default models are small models trained for this book,
# with a short context. That a criterion better than random stays better after the fine-tuning
# that usually follows pruning. The rank p-values are per setting; only the verdict on the paper's
# claim corrects for the number of criteria tested (Bonferroni within a model), the counts of
# settings do not, and the settings share their random draws within a model. Where pruning lowers
# the perplexity below the unpruned model's, that is a property of these small models and this
# held-out text, from which nothing about the criteria follows. Perplexity on held-out text is one quality
# measure; downstream tasks can react differently to the same pruning. Attribution patching is a
# first-order estimate, exact in the limit of a small change of the expert's weight; its accuracy
# for a full removal is what the Spearman table measures. The Bayes factors depend on the prior
# scale; the summary shows how much. The single-layer sweep, with few random draws, describes
# where pruning hurts and tests nothing. The tail analysis rests on a handful of experts per layer,
# one rank per layer and few held-out observations per expert: a criterion that ranks this measured
# tail high is not thereby shown to keep, in a full-size model, the experts whose removal hurts most.
#
# ## Exercises
#
# ````{exercise} 1. A thin baseline
# :label: 10_predictors_and_pruning-ex1
# :nonumber:
#
# With only five random draws per setting, what is the smallest rank p-value a criterion can
# attain? Compute it from the definition of `moeaudit.pruning.random_rank_pvalue` and check it in the
# downloaded notebook with `check_10_predictors_and_pruning_1(answer)`
# (`from moeaudit.chapters.predictors import check_10_predictors_and_pruning_1`). Then re-run with
# five draws: `make chapter NB=10_predictors_and_pruning PARAMS="-p n_random_draws 5"`.
# ````
#
# ````{solution} 10_predictors_and_pruning-ex1
# :class: dropdown
#
# The smallest attainable rank p-value becomes {glue:text}`ex_pmin_thin:.3f`,
# {glue:md}`ex_thin_vs_alpha`, while a criterion no better than random would beat all five draws
# one time in six. The five draws are the first five of this run (a draw depends only on the
# seed, its number, the fraction and the layer), so the count of settings that beat every draw
# becomes {glue:text}`ex_beat_first5` (here, against {glue:text}`n_random_draws` draws:
# {glue:text}`n_beat_all`).
# ````
#
# ````{exercise} 2. A narrower prior
# :label: 10_predictors_and_pruning-ex2
# :nonumber:
#
# Predict whether more or fewer paper-metric cells show at least moderate evidence for the null
# under a prior that expects smaller effects, then re-run with {glue:md}`ex_prior_cmd`.
# ````
#
# ````{solution} 10_predictors_and_pruning-ex2
# :class: dropdown
#
# The count of paper-metric cells with at least moderate evidence for the null
# {glue:md}`ex_prior_change` (this run's narrow-prior column): a prior that expects small
# effects needs more data before it can tell a small effect from none.
# ````
#
# ````{exercise} 3. One model
# :label: 10_predictors_and_pruning-ex3
# :nonumber:
#
# Predict which numbers stay the same when only one model is audited, then re-run with
# `make chapter NB=10_predictors_and_pruning PARAMS="-p models '[\"tiny-olmoe\"]'"`.
# ````
#
# ````{solution} 10_predictors_and_pruning-ex3
# :class: dropdown
#
# The Bonferroni family and every tiny-olmoe statistic are unchanged (families, random draws and
# rank p-values are per model; only the timings vary); the aggregate counts shrink to that model's
# share, for example {glue:md}`ex_olmoe` settings beat the random mean.
# ````

# %% tags=["hide-input"]
first5 = pruning.compare_with_random(glob[(glob.criterion != "random") | (glob.draw < 5)], keys=("model", "scope", "fraction"))
olmoe = g[g.model == "tiny-olmoe"]
a, b = int((paper_bf.BF10 < 1 / 3).sum()), int((paper_bf.BF10_narrow < 1 / 3).sum())
p_thin = smallest_rank_pvalue(5)
glue_all(ex_prior_cmd=f'`make chapter NB=10_predictors_and_pruning PARAMS="-p bf_prior_r {bf_prior_r_narrow:g}"`',
         ex_pmin_thin=p_thin, ex_beat_first5=int(first5.beats_all.sum()),
         ex_thin_vs_alpha=f"above α = {alpha}, so no criterion can be called better than random at that level however "
         "well it prunes" if p_thin > alpha else f"not above α = {alpha}",
         ex_prior_change=f"falls from {a} to {b}" if b < a else f"rises from {a} to {b}" if b > a else f"stays at {a}",
         ex_olmoe=f"{int(olmoe.beats_mean.sum())} of {len(olmoe)}" if len(olmoe) else
         "(tiny-olmoe is not in this run, so no count can be given)")
