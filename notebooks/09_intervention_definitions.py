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
# # Beyond the paper (1): does the definition of the intervention change the verdict?
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - say how the released code's choices (sequence-wide removal, padding, its metric recipes, float16 records) differ
#   from the paper's definitions, and measure what each does to the audit's verdicts;
# - compare three ways of taking an expert out (subtraction, router masking with renormalisation, mean replacement)
#   on the same cells, and check that masking is exact;
# - tell a verdict that survives a change of definition from one that no definition could show.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # token positions per cell (the paper: 200); the same draw in every mode
seed = 42
modes = ["token", "sequence"]  # the paper's definition first, the released code's second
half_dtype = "bfloat16"  # precision compared against `dtype` in the noise-floor section
operator_positions = 40  # positions per cell in the operator comparison, drawn from the n_positions above
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
alpha = 0.05
n_boot = 2000  # bootstrap resamples for the confidence intervals of differences of d_z
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ and paper-released/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("09_intervention_definitions", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("09_intervention_definitions"))

# %% [markdown]
# An interventional audit is only as precise as the intervention it names. The paper defines
# its intervention at one token (Section 2, "Functional importance": the loss at position $t$ with
# the layer output at $t$ taken "with $E_i$ replaced by zero") and its four observational metrics over real tokens with softmax routing
# probabilities (Section 2) {cite}`engmann2026audit`. The authors' released code
# {cite}`engmann2026code` departs from both definitions in ways that are easy to make in any audit:
#
# * **The intervention.** The released code zeroes the expert at *every* position of the
#   sequence where it is routed, not only at $t$. Call this the *sequence-wide* ablation and
#   the paper's the *token-local* one. The loss at $t$ then also carries, through attention,
#   the effect of removing the expert at earlier positions.
# * **The metrics.** For OLMoE the released script records router *logits* (not probabilities)
#   over padded batches, so "utilization" becomes a mean logit, "mean routing weight when active"
#   a mean logit over a mask wider than the router's selection, and padding enters every
#   statistic; for DeepSeek the utilization counts padding positions; for Qwen "activation std"
#   is the spread of the first coordinates of the expert outputs rather than of their norms.
# * **The precision.** The released progressive ablation ran in float16.
#
# This chapter runs the same audit cells (same positions, same layers, same pairs of experts)
# under each choice and asks how far apart the measurements are and whether any verdict
# (significant or not) changes.
#
# **Conventions.** $\Delta$ is the change of the next-token loss $-\log p(x_{t+1}\mid x_{\le t})$
# in nats when one expert is removed; $D = \Delta_{\text{high}} - \Delta_{\text{low}}$ the paired
# difference between the highest- and lowest-ranked active expert at a position; $d_z = \bar D /
# s_D$ Cohen's effect size of a cell. A verdict is either the paper's dual rule (paired t-test
# *and* Wilcoxon below the Bonferroni level of the family, pointing the same way; a family is
# the metric cells of one model, or its control cells) or the looser "uncorrected $p_t$ below
# `alpha`".

# %%
import gc

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from matplotlib.patches import Patch, Rectangle
from myst_nb import glue

from moeaudit import engine, released, report, stats
from moeaudit.chapters import definitions
from moeaudit import paper
from moeaudit.report import fmt_signed, fmt_with_ci, join_words
from moeaudit.audit import paired_cells, prepare, progressive_records, single_expert_records
from moeaudit.metrics import METRIC_LABELS, METRICS, ROUTING_WEIGHT

# %% tags=["hide-input"]
report.use_book_style()
if len(modes) != 2 or len(set(modes)) != 2 or not set(modes) <= {"token", "sequence"}:
    raise ValueError(f"modes={modes!r} must name the two intervention definitions, e.g. ['token', 'sequence']")
if half_dtype == dtype:
    raise ValueError(f"half_dtype={half_dtype!r} must differ from dtype={dtype!r}: the noise floor compares two precisions")
MODE_A, MODE_B = modes
RANKINGS = [*METRICS, ROUTING_WEIGHT]
LABEL = {**METRIC_LABELS, ROUTING_WEIGHT: "Routing weight (control)"}
colors = report.model_colors(models)


def per_model(values: dict, f="{:.3g}") -> str:
    """'model-a 0.1, model-b 0.2' from {model: value}."""
    return ", ".join(f"{name} {f.format(v)}" for name, v in values.items())


glue_all = report.glue_values


def span(values, f="{:.2g}") -> str:
    return report.value_span(values, f)


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
# later layer, so the two definitions measure different things. At the **last** layer there is
# no attention left: the earlier columns change, but nothing reads them before the loss, so the
# two definitions give the same number. This holds at the last *decoder* layer; if a model ended
# with dense layers after its last MoE layer, the two would differ everywhere.

# %% tags=["hide-input"]
def changed_states(n_pos, n_layers, t, layer, routed, mode):
    """0 = unchanged, 1 = the expert is removed here, 2 = changed downstream (residual stream, attention)."""
    state = np.zeros((n_layers, n_pos), dtype=int)
    state[layer, [p for p in range(t + 1) if p == t or (mode == "sequence" and p in routed)]] = 1
    for ell in range(layer + 1, n_layers):  # position p keeps its change and reads every q <= p
        state[ell, : t + 1] = np.where(np.cumsum(state[ell - 1, : t + 1] > 0) > 0, 2, 0)
    return state


n_pos_d, n_lay_d, t_d, routed_d = 9, 6, 7, {1, 3, 4, 7}
shades = {0: "0.93", 1: sns.color_palette("colorblind")[3], 2: sns.color_palette("colorblind")[1]}
fig, axes = plt.subplots(2, 2, figsize=(report.COLUMN_INCHES, 6.0), sharex=True, sharey=True)
for row, (abl, where) in enumerate([(2, "middle layer"), (n_lay_d - 1, "last layer")]):
    for col, mode_d in enumerate(["token", "sequence"]):
        ax, grid = axes[row, col], changed_states(n_pos_d, n_lay_d, t_d, abl, routed_d, mode_d)
        for ell in range(n_lay_d):
            for p in range(n_pos_d):
                ax.add_patch(Rectangle((p - 0.45, ell - 0.45), 0.9, 0.9, edgecolor="0.75", linewidth=0.6,
                                       facecolor="white" if p > t_d else shades[grid[ell, p]], hatch="////" if p > t_d else None))
        for p in sorted(routed_d):
            ax.text(p, -0.95, "e", ha="center", va="center", fontsize=8, color="0.25")
        ax.axhline(abl, color="0.2", linewidth=0.8, linestyle=":")
        ax.plot([t_d], [n_lay_d - 0.2], marker="*", markersize=10, color="black")
        ax.set(xlim=(-0.6, n_pos_d - 0.4), ylim=(-1.3, n_lay_d + 0.1))
        ax.set_title(f"{mode_d}-{'local' if mode_d == 'token' else 'wide'}: ablated at {where}", fontsize=9, pad=5)
        ax.grid(False)
        ax.set_xticks(range(n_pos_d), [("t" if p == t_d else str(p)) for p in range(n_pos_d)], fontsize=8)
        ax.set_yticks(range(n_lay_d), [str(i) for i in range(n_lay_d)], fontsize=8)
fig.supxlabel("token position ('e': the expert is routed there at the ablated layer)", fontsize=9, y=0.14)
fig.supylabel("layer (hidden state after it)", fontsize=9)
fig.legend(handles=[Patch(facecolor=shades[1], label="changed: expert removed here"),
                    Patch(facecolor=shades[2], label="changed downstream (residual, attention)"),
                    Patch(facecolor=shades[0], edgecolor="0.75", label="unchanged"),
                    Patch(facecolor="white", edgecolor="0.75", hatch="////", label="after t: not part of the prefix"),
                    plt.Line2D([], [], marker="*", color="black", linestyle="", markersize=10, label="loss at t read here")],
           loc="lower center", ncol=2, fontsize=8, frameon=False)
fig.suptitle("Which hidden states an ablation changes, by definition and layer")
fig.tight_layout(rect=(0.01, 0.145, 1, 1));

# %% [markdown]
# ## 2. The same cells under both definitions
#
# For every model the positions are the audit chapter's seeded draw, and every active routed
# expert is ablated once on its own at each audited layer, in each mode. The token-local records
# are the audit chapter's records (read from the same cache); the sequence-wide records re-run
# the prefix $x_{\le t}$ with the expert removed at every position where it is routed. The metric
# values and the per-token routing weights come from one clean pass, so the pairs of experts
# compared at a position are identical in both modes: only the measured $\Delta$ differ.

# %%
contexts, records, audited_layers = {}, {}, {}
for name in models:
    ctx = contexts[name] = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                                   corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    lay = ctx.model.layout
    audited_layers[name] = list(layers) if layers is not None else ctx.model.audit_layers(5)
    for m in modes:
        records[name, m] = single_expert_records(ctx, layers=audited_layers[name], n_positions=n_positions,
                                                 seed=seed, mode=m, batch_size=batch_size)
    display(Markdown(f"**{name}** ({lay.family}): MoE layers {join_words(lay.moe_layers)} of {lay.n_layers} decoder "
                     f"layers, {lay.num_experts} routed experts, top-{lay.top_k}; audited layers "
                     f"{join_words(audited_layers[name])}; "
                     f"{len(records[name, MODE_A]):,} single-expert ablations per mode; over both modes "
                     f"{audit.premise_phrase(pd.concat([records[name, m] for m in modes]))}. "
                     + report.regime_text(audit.context_regime(ctx))))

# %% [markdown]
# ### The sequence-wide intervention, written out
# Inside one nnsight trace {cite}`fiottokaufman2025nnsight` of the prefix $x_{\le t}$, the router
# output of the ablated layer, `(logits, combine_weights, indices)` with one row per token, is
# read; the combine weight of expert $e$ is set to zero on **every** row where $e$ is routed,
# and the triple is written back. The token-local ablation differs in one place only: it zeroes
# row $t$ alone. The example below takes the first model, its first audited layer before the
# last, and the first drawn position (lowest text and token index), and removes the active expert
# with the largest routing weight there.

# %%
name_d, ctx_d, model_d = models[0], contexts[models[0]], contexts[models[0]].model
early = [L for L in audited_layers[name_d] if L != model_d.layout.n_layers - 1] or audited_layers[name_d]
rec_d = records[name_d, "sequence"]
first = rec_d[rec_d.layer == early[0]].sort_values(["seq_id", "t", "prob"], ascending=[True, True, False]).iloc[0]
L_d, e_d, seq_d, t_d = int(first.layer), int(first.expert), int(first.seq_id), int(first.t)
ids = torch.as_tensor(ctx_d.corpus.sequences[seq_d][: t_d + 2], dtype=torch.long)
prefix, target = ids[None, : t_d + 1].to(model_d.device), ids[t_d + 1: t_d + 2].to(model_d.device)

# %%
mlp = model_d.layers()[L_d].mlp
with torch.no_grad(), model_d.nn.trace(input_ids=prefix, remote=model_d.remote):
    router_logits, weights, indices = mlp.gate.output           # one row per token 0..t
    hit = indices == e_d                                          # every row where e is routed: sequence-wide
    mlp.gate.output = (router_logits, weights.masked_fill(hit, 0.0), indices)
    rows_hit = hit.any(dim=1).sum().save()                        # how many rows lost expert e
    ablated_logits = model_d.nn.output.logits[0, t_d].save()
with torch.no_grad(), model_d.nn.trace(input_ids=prefix, remote=model_d.remote):
    clean_logits = model_d.nn.output.logits[0, t_d].save()
delta_trace = float(F.cross_entropy(ablated_logits.float()[None], target) - F.cross_entropy(clean_logits.float()[None], target))

# %%
req = pd.DataFrame({"seq_id": [seq_d], "t": [t_d], "layer": [L_d], "removed": [[e_d]]})
delta_engine = {m: float(engine.run_ablations(model_d, ctx_d.corpus, ctx_d.clean, req, mode=m, progress=False).delta_loss.iloc[0])
                for m in modes}
delta_ref = engine.trace_ablation(model_d, ids.numpy(), layer=L_d, experts=[e_d], t=t_d, mode="sequence")["delta_loss"]
print(f"{name_d}, layer {L_d}, text {seq_d}, t = {t_d}, expert {e_d} removed at {int(rows_hit)} of {t_d + 1} rows\n"
      + pd.Series({"the trace above": delta_trace, "engine.trace_ablation(mode='sequence')": delta_ref,
                   "run_ablations(mode='sequence')": delta_engine["sequence"],
                   "run_ablations(mode='token'), for contrast": delta_engine["token"]}).to_string(float_format="{:+.6f} nats".format))
glue("demo_gap", abs(delta_trace - delta_engine["sequence"]), display=False)
glue("demo_mode_gap", abs(delta_engine["sequence"] - delta_engine["token"]), display=False)

# %% [markdown]
# The written-out trace and the batched engine agree to {glue:text}`demo_gap:.1e` nats; the
# token-local ablation of the same expert at the same position differs from the sequence-wide
# one by {glue:text}`demo_mode_gap:.2g` nats. The engine reaches the same number by another
# route: it batches many ablations into one forward pass, re-runs each prefix with the expert's
# combine weight zeroed on the same rows, and reads the clean loss from an un-ablated row of the
# same batch. `engine.trace_ablation` is the trace above packaged as a function, with
# `mode="token"` restricting the zeroed rows to row $t$. The test suite checks, on a tiny model of
# every supported family and in both modes, that it equals the plain-PyTorch hook reference that
# `run_ablations` is checked against, at a layer with later layers (where the modes differ).
#
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
agreement = pd.concat([definitions.ablation_agreement(records[n, MODE_A], records[n, MODE_B],
                                                   last_layer=contexts[n].model.layout.n_layers - 1).assign(model=n)
                       for n in models], ignore_index=True)

# %% tags=["remove-input"]
view = agreement.assign(layer=[f"{L} (last)" if last else str(L) for L, last in zip(agreement.layer, agreement["last"])])
sizes = agreement.groupby("model", sort=False).records.agg(lambda r: "–".join(dict.fromkeys(str(v) for v in r)))
_ = report.show_table(
    view[["model", "layer", "max_diff", "median_diff", "floor", "median_abs_a", "median_abs_b", "rho"]],
    labels={"max_diff": "max |Δ_tok − Δ_seq|", "median_diff": "median |Δ_tok − Δ_seq|", "floor": "rounding floor",
            "median_abs_a": f"median |Δ| {MODE_A}", "median_abs_b": f"median |Δ| {MODE_B}", "rho": "Spearman ρ"},
    formats={"max |Δ_tok − Δ_seq|": "{:.1e}", "median |Δ_tok − Δ_seq|": "{:.1e}", "rounding floor": "{:.1e}",
             f"median |Δ| {MODE_A}": "{:.1e}", f"median |Δ| {MODE_B}": "{:.1e}", "Spearman ρ": "{:+.3f}"},
    max_rows=None, caption="Token-local vs sequence-wide ablation of the same expert at the same position (Δ in nats; "
    "records per layer: " + per_model(sizes.to_dict(), "{}") + "; (last): the model's last decoder layer)")

# %% tags=["remove-input"]
last_rows, other_rows = agreement[agreement["last"]], agreement[~agreement["last"]]
parts = []
if len(last_rows):
    ratio_last = (last_rows.max_diff / last_rows.floor.clip(lower=1e-12)).max()
    parts.append(f"At the last decoder layer the largest difference over all records is {last_rows.max_diff.max():.1e} nats, "
                 f"at most {ratio_last:.1f} times the rounding floor of the same model (a Δ is the difference of two losses, "
                 f"each carrying rounding of that size): the two definitions agree up to float rounding"
                 + (", as the picture says they must." if ratio_last <= 4 else
                    ", though by more than a few rounding floors, which the picture does not predict."))
else:
    parts.append("No audited layer is the last decoder layer, so no layer is expected to agree.")
if len(other_rows):
    size = other_rows.median_abs_b / other_rows.median_abs_a
    parts.append(f"At the other audited layers the largest difference is {span(other_rows.max_diff)} nats (at least "
                 f"{(other_rows.max_diff / other_rows.floor.clip(lower=1e-12)).min():,.0f} times the rounding floor), the "
                 f"median difference {span(other_rows.median_diff)} nats, and the Spearman correlation between the two "
                 f"measurements of the same ablation {span(other_rows.rho, '{:+.3f}')}. Per layer, the median |Δ| of the "
                 f"{MODE_B}-mode ablation is {span(size, '{:.3f}')} times that of the {MODE_A}-mode one.")
display(Markdown(" ".join(parts)))

# %% [markdown]
# ### Cell by cell: effect sizes, their difference, and the verdicts
# Every cell of the audit (the four metrics at each audited layer) and of the routing-weight
# control (one per layer) is computed from each mode's records. Because the positions and the
# pairs of experts are the same, the two $d_z$ of a cell are paired: the confidence interval of
# their difference comes from a paired bootstrap over positions (bias-corrected and accelerated
# {cite}`efron1987better`). A verdict *flips* when a cell is significant in one mode and not in
# the other.
#
# How to read the tables: one row per cell (ranking, layer); the two $d_z$ columns carry ★ where
# the cell passes the dual rule and • where its uncorrected $p_t$ is below `alpha`; the
# *difference* column gives $d_z$ of the first variant minus $d_z$ of the second, with its interval
# and ◆ where the interval excludes zero; the last column names the rules under which the verdict
# changes. The same layout is used again for the metric definitions and for the precision.

# %%
def cells_for(rec, metrics_table, *, variant, rankings=RANKINGS):
    c = paired_cells(rec, metrics_table, rankings=rankings)
    return c.assign(set=np.where(c.ranking == ROUTING_WEIGHT, "control", "metrics"), variant=variant)


def table_for(cells):
    return stats.audit_table(cells, by=("model", "variant", "set", "ranking", "layer"), high_col="delta_loss_high",
                             low_col="delta_loss_low", family=("model", "variant", "set"), alpha=alpha)


cells_mode = pd.concat([cells_for(records[n, m], contexts[n].metrics, variant=m) for n in models for m in modes],
                       ignore_index=True)
table_mode = table_for(cells_mode)
cmp_mode = definitions.compare_audit_variants(cells_mode, table_mode, MODE_A, MODE_B, alpha=alpha, n_boot=n_boot, seed=seed)

# %% tags=["hide-input"]
def show_comparison(cmp, la, lb, what, n=n_positions):
    for name in models:
        t = cmp[cmp.model == name]
        mark = lambda dz, dual, p05: f"{fmt_signed(dz)}{' ★' if dual else ''}{' •' if p05 else ''}"  # noqa: E731
        view = pd.DataFrame({
            "ranking": [LABEL[r] for r in t.ranking], "layer": [f"L{L}" for L in t.layer],
            f"d_z {la}": [mark(*r) for r in zip(t.dz_a, t.dual_a, t.p05_a)],
            f"d_z {lb}": [mark(*r) for r in zip(t.dz_b, t.dual_b, t.p05_b)],
            "difference [95% CI]": [f"{fmt_with_ci(d, lo, hi)}{' ◆' if x else ''}"
                                    for d, lo, hi, x in zip(t.ddz, t.ddz_lo, t.ddz_hi, t.ci_excludes_0)],
            "verdict flips": [", ".join(s for s, f in (("dual rule", fd), ("uncorrected p_t", fp)) if f) or "–"
                              for fd, fp in zip(t.flip_dual, t.flip_p05)]})
        display(view.style.hide(axis="index").set_properties(**{"font-size": "0.88em"})
                .set_caption(f"{name}: Cohen's d_z per cell, {what}; n = {n} positions"))
    display(Markdown(f"★: significant under the dual rule. •: uncorrected p_t < {alpha:g}. *difference*: d_z({la}) − "
                     f"d_z({lb}) with its paired-bootstrap 95% CI; ◆ where it excludes zero and the difference is larger "
                     f"than {definitions.DDZ_TOLERANCE:g} (smaller ones are float rounding)."))


show_comparison(cmp_mode, MODE_A, MODE_B, f"{MODE_A}-mode vs {MODE_B}-mode ablation")

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(6.2, 5.2))
markers = dict(zip(RANKINGS, ["o", "s", "D", "^", "*"]))
for r in cmp_mode.itertuples():
    last = r.layer == contexts[r.model].model.layout.n_layers - 1
    ax.scatter(r.dz_a, r.dz_b, color=colors[r.model], marker=markers[r.ranking], s=70 if r.ranking == ROUTING_WEIGHT else 38,
               edgecolor="black" if last else "none", linewidth=1.0, alpha=0.9)
lim = float(np.nanmax(np.abs(cmp_mode[["dz_a", "dz_b"]].to_numpy()))) * 1.1 + 0.02
ax.plot([-lim, lim], [-lim, lim], color="0.4", linewidth=0.8)
ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel=f"Cohen's $d_z$, {MODE_A}-mode ablation",
       ylabel=f"Cohen's $d_z$, {MODE_B}-mode ablation", title="Same cells, two intervention definitions")
ax.legend(handles=[Patch(color=colors[m], label=m) for m in models]
          + [plt.Line2D([], [], marker=markers[r], color="0.3", linestyle="", label=LABEL[r]) for r in RANKINGS]
          + [plt.Line2D([], [], marker="o", mfc="white", mec="black", linestyle="", label="last decoder layer")],
          fontsize=7.5, loc="upper left")
fig.tight_layout()

# %% tags=["hide-input"]
def flip_text(cmp, la, lb) -> str:
    """Per model: the size of the d_z differences and the verdicts that change (from compare_audit_variants)."""
    out = []
    for s in definitions.variant_flip_summary(cmp).itertuples():
        fl = cmp[(cmp.model == s.model) & (cmp.flip_dual | cmp.flip_p05)]
        changes = "; ".join(f"{LABEL[r.ranking]} L{r.layer} (" + (
            f"dual rule at level {r.alpha_corrected:.3g}: p_t = {r.p_t_a:.3g} vs {r.p_t_b:.3g}, "
            f"p_W = {r.p_W_a:.3g} vs {r.p_W_b:.3g})" if r.flip_dual else
            f"uncorrected p_t: {r.p_t_a:.3g} vs {r.p_t_b:.3g})") for r in fl.itertuples())
        out.append(f"**{s.model}**: |d_z({la}) − d_z({lb})| up to {s.max_abs_ddz:.3f} (median {s.median_abs_ddz:.3f}) over "
                   f"{s.cells} cells; {s.ci_excluding_0} difference interval{' excludes' if s.ci_excluding_0 == 1 else 's exclude'} "
                   "zero. "
                   + (f"Verdicts that change: {changes}." if len(fl) else "No verdict changes, under either rule."))
    return "\n\n".join(out)


display(Markdown(flip_text(cmp_mode, MODE_A, MODE_B)))

# %% [markdown]
# ## 3. The paper's metric definitions and the released ones
#
# The released scripts compute the four metrics differently for each model (see the
# re-analysis chapter). Each departure is re-implemented in `moeaudit.released`, following the
# script written for the real model the book's model stands in for, and applied to the same clean
# texts:
#
# | recipe | utilization rate | mean routing weight when active | activation norm | activation std |
# | --- | --- | --- | --- | --- |
# | paper (Section 2) | share of real tokens selecting $i$ | mean softmax probability $g_i$ over those tokens | mean $\lVert E_i(x)\rVert$ over those tokens | std of $\lVert E_i(x)\rVert$ over those tokens |
# | OLMoE script | mean router **logit** of $i$ over all positions, **padding included** | mean router **logit** over the positions where $\text{logit}_i \ge \tau$, **padding included** (below) | as paper, padding included | as paper, padding included |
# | DeepSeek script | share of positions selecting $i$, **padding included** | as paper | as paper | as paper |
# | Qwen script | count / ($k$ · real tokens) | as paper | as paper, **first {glue:text}`qwen_texts` texts only** | std of the **first {glue:text}`qwen_coords` coordinates** of every output $E_i(x)$, pooled |
#
# **The released "mean routing weight when active".** For every expert the OLMoE script loops
# over all recorded positions $y$ (padding included), takes the $k$-th largest router logit of
# $y$, and ORs "$\text{logit}_i(x) \ge$ that value" into the mask of every position $x$. The
# union over $y$ is one condition: position $x$ is admitted for expert $i$ iff
# $\text{logit}_i(x) \ge \tau = \min_y c_k(y)$, where $c_k(y)$ is the $k$-th largest logit of $y$:
# one threshold per layer, the same for every expert. The metric is the mean logit over that mask
# (`paper.released_mean_routing_weight_when_active`). Because $\tau$ is the loosest top-$k$
# cut-off of any position, the mask admits every position's own top-$k$ experts and, besides them,
# every (position, expert) pair whose logit clears that loosest cut-off. Without the real checkpoints the released numeric values cannot be recomputed
# here; what follows is the recipe applied to the book's models.
#
# To include padding the texts are run right-padded to the longest text, as one batch would be,
# and the router logits, the routing decisions and the raw expert outputs are recorded at every
# position (`definitions.padded_router_pass`).

# %%
metric_defs, pad_share, recheck, mask_rows, sub_rows, next_ranked = {}, {}, {}, [], [], []
for name in models:
    ctx = contexts[name]
    padded = definitions.padded_router_pass(ctx.model, ctx.corpus, layers=audited_layers[name])
    next_ranked.append(definitions.next_ranked_table(  # for the operator section: the clean router's next expert
        padded, records[name, "token"][["seq_id", "t"]].drop_duplicates()).assign(model=name))
    metric_defs[name] = definitions.recipe_metric_tables(padded)
    pad_share[name] = padded.padding_share
    a = metric_defs[name][paper.PAPER_RECIPE].set_index(["layer", "expert"])[list(METRICS)]
    b = ctx.metrics.set_index(["layer", "expert"]).loc[a.index, list(METRICS)]
    recheck[name] = float(np.nanmax(np.abs(a.to_numpy() - b.to_numpy()) / np.maximum(np.abs(b.to_numpy()), 1e-12)))
    for L, arr in padded.layers.items():
        admitted = paper.released_active_mask(arr["logits"], top_k=padded.top_k).mean(axis=0)
        sel_logit = definitions.per_expert_aggregate(arr["idx"], np.take_along_axis(arr["logits"], arr["idx"], axis=1),
                                                  np.ones_like(padded.real), num_experts=padded.num_experts, how="mean")
        paper_L = metric_defs[name][paper.PAPER_RECIPE].query("layer == @L").mean_routing_weight
        rel_L = metric_defs[name]["OLMoE script"].query("layer == @L").mean_routing_weight
        sub_rows.append({"model": name, "layer": L, "rho": stats.spearman_defined(paper_L, sel_logit)[0],
                         "rho_released": stats.spearman_defined(rel_L, sel_logit)[0]})
        mask_rows.append({"model": name, "layer": L, "threshold": paper.released_active_threshold(arr["logits"], top_k=padded.top_k),
                          "selected_share": padded.top_k / padded.num_experts, "admitted_median": float(np.median(admitted)),
                          "admitted_min": float(admitted.min()), "admitted_max": float(admitted.max())})
    del padded
masks, substitute = pd.DataFrame(mask_rows), pd.DataFrame(sub_rows)

# %% tags=["remove-input"]
glue_all(qwen_texts=definitions.QWEN_NORM_TEXTS, qwen_coords=definitions.QWEN_STD_COORDS)
glue_all(pad_share=Markdown(per_model(pad_share, "{:.1%}")), released_pad=definitions.RELEASED_OLMOE_PADDING_SHARE,
         admitted_span=span(masks.admitted_median, "{:.0%}"),
         selected_span=span(masks.selected_share, "{:.1%}"),
         recheck=Markdown("exactly, for every model" if max(recheck.values()) == 0 else
                          "to a largest relative deviation of " + per_model(recheck, "{:.1e}")))
padded_models = [m for m, v in pad_share.items() if v > 0]
glue_all(leak_reading=Markdown(
    ": padding does not leak into real positions (causal attention, masked keys)."
    if len(padded_models) == len(pad_share) else
    ". This batch has no padding (its texts are equally long), so the agreement says nothing about padding; causal "
    "attention and masked keys keep it out of real positions by construction, which the test suite checks on texts of "
    "different lengths (`tests/test_released_recipes.py`)."
    if not padded_models else
    f": where the batch is padded ({join_words(padded_models)}), padding does not leak into real positions (causal "
    "attention, masked keys); the other models' batches have no padding, so there the agreement says nothing about it."))
view = pd.DataFrame({("model", ""): masks.model, ("layer", ""): masks.layer, ("τ (logit)", ""): masks.threshold,
                     ("selected by the router (k/E)", ""): masks.selected_share,
                     **{("admitted by the released mask", w): masks[f"admitted_{c}"]
                        for c, w in (("median", "median"), ("min", "minimum"), ("max", "maximum"))}})
display(view.style.format("{:.1%}", subset=[c for c in view.columns if c[0].startswith(("selected", "admitted"))])
        .format("{:+.3f}", subset=[("τ (logit)", "")]).hide(axis="index")
        .set_caption("The released OLMoE mask: the threshold τ (a router logit) and the share of all padded positions it "
                     "admits per expert (median, min, max over experts), against the share k/E the router selects"))

# %% [markdown]
# How to read the table: $\tau$ is set by a single position, the one whose $k$-th largest logit is
# the lowest of the whole padded corpus. Every expert is then judged against that one low bar at
# every position, so an expert whose logits run high is "active" at many positions, and one whose
# logits run low is admitted at few positions beyond those that select it. The spread between the
# minimum and the maximum column is that difference between experts; the metric then averages
# each expert's logits over its own admitted positions.
#
# Share of padding positions in the padded batch: {glue:md}`pad_share`, against about
# {glue:text}`released_pad:.0%` in the released OLMoE run, which padded all texts to the longest
# one. The paper's definitions
# recomputed from the real positions of this padded pass agree with the metrics of the audit's
# clean pass {glue:md}`recheck`{glue:md}`leak_reading` The recipes differ from the paper's
# definitions only by what they compute. The
# median over experts of the share of positions the released mask admits is
# {glue:text}`admitted_span` (range over layers and models), where the router selects
# {glue:text}`selected_span`. Both conclusions are drawn at this padding share: with the released
# run's much larger share, the padding-dependent recipes (every OLMoE-script metric, the DeepSeek
# utilization) average over many more padded positions, and their departures from the paper's
# definitions can be larger than measured here.
#
# ### How far apart are the definitions? Spearman correlation across experts
# For each audited layer, the vector of one metric over all routed experts under the paper's
# definition is rank-correlated with the same vector under each released recipe. A value of
# $+1$ means the recipe orders the experts exactly as the paper's definition does, which is all
# the audit uses, since it only ranks the active experts at a token. Experts never selected
# (undefined metric) are left out. Each model's own recipe (▶) is the one its real counterpart
# was audited with; the other two show how sensitive the ranking is to each departure.

# %%
rho_defs = pd.concat([definitions.recipe_rank_agreement(metric_defs[n]).assign(
    model=n, own=lambda d, n=n: d.recipe == paper.RECIPE_OF_FAMILY.get(contexts[n].model.layout.family))
    for n in models], ignore_index=True)
own_rho = rho_defs[rho_defs.own]

# %% tags=["hide-input"]
fig, axes = plt.subplots(len(models), 1, figsize=(report.COLUMN_INCHES, 3.9 * len(models)), squeeze=False)
for ax, name in zip(axes[:, 0], models):
    g = rho_defs[rho_defs.model == name]
    mat = g.pivot_table(index=["recipe", "metric"], columns="layer", values="rho", sort=False, dropna=False)
    own = paper.RECIPE_OF_FAMILY.get(contexts[name].model.layout.family)
    mat.index = [f"{'▶ ' if rcp == own else ''}{rcp}: {METRIC_LABELS[m]}" for rcp, m in mat.index]
    mat.columns = [f"L{L}" for L in mat.columns]
    sns.heatmap(mat, ax=ax, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt=".2f", annot_kws={"fontsize": 7.5},
                cbar_kws={"label": "Spearman ρ, paper vs recipe", "shrink": 0.9})
    ax.tick_params(axis="y", labelsize=8.5)
    ax.set(xlabel="audited MoE layer", ylabel="", title=f"{name} (▶: its own recipe)")
fig.suptitle("Rank agreement: the paper's and the released metric definitions")
fig.tight_layout()

# %% tags=["remove-input"]
mrw = rho_defs[(rho_defs.recipe == "OLMoE script") & (rho_defs.metric == "mean_routing_weight")]
RHO_SAME = 0.999  # a rank correlation at least this high counts as "the same order"
glue_all(mrw_rho=span(mrw.rho, "{:+.2f}"), n_vectors=len(own_rho), rho_same=RHO_SAME,
         n_reordered=int((own_rho.rho < RHO_SAME).sum()))
display(Markdown("Per model, the range over layers of ρ between the paper's definition and the model's own recipe: " + " ".join(
    f"**{n}** ({g.recipe.iloc[0]}): " + "; ".join(f"{METRIC_LABELS[m]} ρ {span(r.rho, '{:+.2f}')}"
                                                   for m, r in g.groupby("metric", sort=False)) + "."
    for n, g in own_rho.groupby("model", sort=False))))

# %% [markdown]
# A row of $+1$ in the heatmap means the recipe's departure is an order-preserving change of the
# paper's definition. The Qwen utilization, for example, is the paper's share divided by the
# constant $k$, so it cannot change which active expert ranks highest at a token, and the audit
# cannot see it. Rows below $+1$ change the ranking, and with it the pairs of experts compared.
#
# Of the {glue:text}`n_vectors` metric-by-layer vectors of the models' own recipes,
# {glue:text}`n_reordered` order the experts differently from the paper's definition ($\rho$
# below {glue:text}`rho_same`). The released "mean routing weight when active", applied to every model, correlates
# with the paper's mean routing probability at $\rho$ = {glue:text}`mrw_rho` across layers and
# models: a mean logit over a layer-wide mask is a different quantity from a mean probability
# over the router's selections.
#
# ### Do the released definitions change the audit?
# The records are the same; only the table that ranks the experts changes. Each model is
# re-audited with its own recipe, in the token-local mode (the definition question alone) and in
# the sequence-wide mode (the released pipeline as a whole: released metrics *and* released
# intervention). The control ranking uses the per-token probability in every variant, so only
# the four metric rows can change. The first comparison below isolates the definitions: the
# paper's against the released ones, both on the token-local records.

# %%
def_cells = pd.concat([cells_for(records[n, m], metric_defs[n][paper.RECIPE_OF_FAMILY.get(
    contexts[n].model.layout.family, "OLMoE script")], variant=f"released defs, {m}", rankings=list(METRICS))
    for n in models for m in modes], ignore_index=True)
paper_metric = lambda d: d[d.set == "metrics"].assign(variant="paper defs, " + d[d.set == "metrics"].variant)  # noqa: E731
cells_def = pd.concat([paper_metric(cells_mode), def_cells], ignore_index=True)
table_def = pd.concat([paper_metric(table_mode), table_for(def_cells)], ignore_index=True)
cmp_def = definitions.compare_audit_variants(cells_def, table_def, f"paper defs, {MODE_A}", f"released defs, {MODE_A}",
                                          alpha=alpha, n_boot=n_boot, seed=seed)
show_comparison(cmp_def, "paper defs", "released defs", f"paper's vs released metric definitions ({MODE_A}-mode records)")
display(Markdown(flip_text(cmp_def, "paper", "released")))

# %% [markdown]
# The second comparison is the released pipeline as a whole against the paper's: the paper's
# metric definitions with the token-local ablation on one side, each model's own released recipe
# with the sequence-wide ablation on the other. Positions, layers and the experts' routing are
# the same on both sides, so the pairs of experts differ only where the released recipe ranks
# them differently, and the measured $\Delta$ only where the sequence-wide ablation reaches the
# token through attention. The tables and the summary use the same machinery as above; the
# differences combine the two departures and need not be the sum of the two separate ones.

# %%
cmp_whole = definitions.compare_audit_variants(cells_def, table_def, "paper defs, token", "released defs, sequence",
                                            alpha=alpha, n_boot=n_boot, seed=seed)
show_comparison(cmp_whole, "paper pipeline", "released pipeline",
                "paper's definitions and token-local ablation vs released definitions and sequence-wide ablation")
display(Markdown(flip_text(cmp_whole, "paper pipeline", "released pipeline")))

# %% [markdown]
# ## 4. The noise floor of half precision
#
# bfloat16 keeps $8$ significant bits and float16 $11$, so every hidden state carries a relative
# rounding error of order $2^{-8}$ or $2^{-11}$. A single-expert ablation that changes the loss by
# less than the rounding noise of the whole forward pass cannot be measured in that precision.
# Here the same ablations are run with the model in the precision set by `half_dtype`. Its
# clean pass differs too (routing decisions can change at near-ties), so records are matched by
# (position, layer, expert) and only the ablations of an expert active in both precisions are
# compared. Both precisions compute the loss in float32 from their own logits.

# %%
half_recs, half_metrics, noise, noise_sum, spread = {}, {}, {}, {}, {}
for name in models:
    ctx_h = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=half_dtype, device=device, remote=remote,
                    corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    half_recs[name], rerun = (single_expert_records(ctx_h, layers=audited_layers[name], n_positions=n_positions,
                                                    seed=seed, mode="token", batch_size=batch_size, strategy=s)
                              for s in ("kv", "full"))
    spread[name] = engine.strategy_spread(half_recs[name], rerun)
    half_metrics[name] = ctx_h.metrics
    noise[name], noise_sum[name] = definitions.precision_noise(records[name, "token"], half_recs[name])
    del ctx_h
    gc.collect()
nt = pd.DataFrame(noise_sum).T
half_cells = pd.concat([cells_for(half_recs[n], half_metrics[n], variant=half_dtype) for n in models], ignore_index=True)
cells_half = pd.concat([cells_mode[cells_mode.variant == "token"].assign(variant=dtype), half_cells], ignore_index=True)
table_half = pd.concat([table_mode[table_mode.variant == "token"].assign(variant=dtype), table_for(half_cells)],
                       ignore_index=True)
cmp_half = definitions.compare_audit_variants(cells_half, table_half, dtype, half_dtype, alpha=alpha, n_boot=n_boot, seed=seed)

# %% tags=["remove-input"]
for key, col, f in (("noise_median", "median_err", "{:.1e}"), ("noise_p95", "p95_err", "{:.1e}"),
                    ("effect_median", "median_abs_full", "{:.1e}"), ("below_noise", "share_below_p95_err", "{:.0%}"),
                    ("sign_flips", "sign_flips", "{:.1%}")):
    glue(key, Markdown(per_model(nt[col].to_dict(), f)), display=False)
glue("strategy_spread", Markdown(report.strategy_spread_text(spread, half_dtype)), display=False)
NOISE_ROWS = {  # summary key: (row label, format)
    "matched": ("ablations matched", "{:,.0f}"), "share_matched": ("share of the full-precision ablations matched", "{:.1%}"),
    "median_clean_diff": ("median |clean loss half − full|", "{:.2g}"), "median_err": ("median |Δ_half − Δ_full|", "{:.2g}"),
    "p95_err": ("95th percentile of |Δ_half − Δ_full|", "{:.2g}"), "median_abs_full": ("median |Δ_full|", "{:.2g}"),
    "share_below_p95_err": ("share of |Δ_full| below that 95th percentile", "{:.1%}"),
    "sign_flips": ("share of ablations whose sign changes", "{:.1%}"),
    "top_raises_full": ("share where removing the top expert raises the loss, full", "{:.1%}"),
    "top_raises_half": ("the same, half", "{:.1%}")}
view = pd.DataFrame({m: [f.format(nt.loc[m, key]) for key, (_, f) in NOISE_ROWS.items()] for m in nt.index},
                    index=[label for label, _ in NOISE_ROWS.values()])
display(view.style.set_caption(f"Single-expert ablations in {dtype} ('full') and {half_dtype} ('half'), matched by "
                               "position, layer and expert; losses and their differences in nats"))

# %% [markdown]
# The median precision error of one ablation, $|\Delta_{\text{half}} - \Delta_{\text{full}}|$, is
# {glue:md}`noise_median` nats and its 95th percentile {glue:md}`noise_p95` nats, against a median
# effect $|\Delta_{\text{full}}|$ of {glue:md}`effect_median` nats. The share of full-precision
# effects smaller than that 95th percentile is {glue:md}`below_noise`; the share of ablations
# whose sign changes is {glue:md}`sign_flips`. The curves below compare the two distributions;
# the audit is then re-run from the half-precision records and metrics (the pairs of experts can
# differ where routing differs).
#
# The way the engine executes an ablation matters in half precision too. The same token-mode
# ablations were run a second time by re-running each prefix (`strategy="full"`) instead of
# adding packed rows to the cached clean prefix (`"kv"`, used everywhere else); in float32 the
# test suite holds the two to the same result. Here: {glue:md}`strategy_spread`. A premise
# fails where a near-tie of two router probabilities rounded the other way: either the forward
# that removed an expert did not route it there (its effect is then no effect at all), or the
# batch's un-ablated row routed differently from the clean pass (the pair of losses is then not
# the pair the audit asked for). Every record carries the check (`premise_ok`), and the counts
# above come from it.

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(7, 4.2))
for name in models:
    for col, ls, lab in (("err", "-", f"|Δ_{half_dtype} − Δ_{dtype}|"), ("abs_full", "--", f"|Δ_{dtype}|")):
        v = np.sort(noise[name][col].clip(lower=1e-9).to_numpy())
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), linestyle=ls, color=colors[name], label=f"{name}: {lab}")
ax.set(xscale="log", xlabel="nats (log scale; zeros drawn at 1e-9)", ylabel="cumulative share of records",
       title="Precision noise (solid) against effect size (dashed)")
ax.legend(fontsize=7)
fig.tight_layout()

# %% tags=["remove-input"]
display(Markdown(flip_text(cmp_half, dtype, half_dtype)))

# %% [markdown]
# ### The released progressive ablation in float16
# The authors' progressive-ablation summary (OLMoE, removing the $k$ highest-weight active
# experts at one position per text) was run in float16; the released code does not record in
# which precision its losses were computed from the logits. If they were float16 numbers, a loss
# near the released baseline losses is a multiple of one float16 step (`paper.float16_spacing`), so the difference of two losses is resolved only to that
# step. The table gives each released median and quartile in those steps. For comparison, the
# book's own progressive ablation (the progressive-ablation chapter's records, in float32, every
# MoE layer) gives the share of positions whose loss *falls* when all but one active expert is
# removed.
#
# How to read the table: *step* is the distance between neighbouring float16 numbers at the
# layer's mean baseline loss; *median steps*, *p25 steps* and *p75 steps* divide the absolute
# median and quartiles of the loss change by that step. A value at or below one step is within the
# error of a difference of two losses that were each rounded to the nearest float16 number; a
# value of many steps is not produced by that rounding. The forward pass itself also runs in
# float16 and adds noise of its own, which this table does not measure.

# %%
try:
    prog = released.progressive_ablation(data_dir=data_dir)
except released.ReleasedDataUnavailable:
    prog = None
    display(Markdown("*The authors' released result files were not found (set `data_dir` or `$MOEAUDIT_DATA_DIR` to a "
                     "folder with `paper-released/`); the released half of this comparison is skipped.*"))
rises = {}  # share of positions whose loss rises (ties count as not rising, as in the released share)
for name, ctx in contexts.items():  # every MoE layer, as in the progressive-ablation chapter (same cached records)
    prog_rec = progressive_records(ctx, layers=list(ctx.model.layout.moe_layers), n_positions=n_positions, seed=seed,
                                   mode="token", batch_size=batch_size)
    rises[name] = prog_rec[prog_rec.k == prog_rec.k.max()].groupby("layer").delta_loss.apply(lambda d: float((d > 0).mean()))
steps = None if prog is None else paper.progressive_in_float16_steps(prog)

# %% tags=["remove-input"]
glue("book_rises", Markdown(per_model({n: span(v, "{:.0%}") for n, v in rises.items()}, "{}")), display=False)
if prog is not None:
    glue_all(rel_step=Markdown(span(steps.step, "{:.3g}")), rel_grid=float(steps.n_on_2_16.sum() / (3 * len(steps))),
             rel_pos_k1=Markdown(span(steps[steps.k == 1].share_positive, "{:.1%}")),
             rel_pos_deep=Markdown(span(steps[steps.k == steps.k.max()].share_positive, "{:.1%}")))
    q_steps = steps[["p25_steps", "p75_steps"]].to_numpy()
    q_nats = np.abs(steps[["p25_delta", "p75_delta"]].to_numpy())
    glue_all(rel_q_nats=Markdown(span(q_nats.ravel(), "{:.3f}")), rel_q_steps=Markdown(span(q_steps.ravel(), "{:.0f}")))
    names = {"baseline_loss_mean": "mean baseline loss", "median_delta": "median ΔL", "median_steps": "median steps",
             "p25_steps": "p25 steps", "p75_steps": "p75 steps", "share_positive": "share positive"}
    _ = report.show_table(steps[["layer", "k", "baseline_loss_mean", "step", *list(names)[1:]]], labels=names,
                          formats={**{c: "{:.3g}" for c in ("mean baseline loss", "step", "median ΔL", "median steps",
                                                            "p25 steps", "p75 steps")}, "share positive": "{:.1%}"},
                          caption="Released OLMoE progressive ablation (float16), per layer and number k of removed "
                                  "experts: the float16 step at the layer's mean baseline loss and the median loss "
                                  "change (nats), the absolute median and quartiles of the loss change in those steps, "
                                  "and the share of positions whose loss rises")

# %% tags=["remove-input"]
if prog is not None:
    within = steps.median_steps <= 1  # a difference of two losses each rounded to half a step is off by at most one step
    q_min = float(q_steps.min())
    glue_all(n_med_within=int(within.sum()), n_med=len(steps),
             med_within_nats=float(steps.median_delta[within].abs().max()) if within.any() else 0.0)
    glue("verdict_median", Markdown(
        "None of them can be told apart from the rounding of the stored losses at that step" if within.all() else
        f"These cannot be told apart from the rounding of the stored losses at that step; the other {int((~within).sum())} "
        f"reach up to {steps.median_delta.abs().max():.4f} nats ({steps.median_steps.max():.1f} steps) and are resolved at "
        "that step"), display=False)
    glue("f16_caveat", Markdown("; ".join(f"above {r.loss:g} nats it is {r.step:.4f} nats, and {r.n_within} of the {r.n} "
                                          "medians lie within it" for r in definitions.float16_steps_caveat(
                                              steps.median_delta).itertuples())), display=False)
    glue("verdict_quartiles", Markdown(
        "The quartiles are many times that step, so the spread of the released loss changes is not the rounding of "
        "the stored losses" if q_min >= 5 else
        "Some quartiles are within a few steps of zero, so rounding of the stored losses can account for part of the spread"),
        display=False)

# %% [markdown]
# The released baseline losses put one float16 step at {glue:md}`rel_step` nats. Of the
# {glue:text}`n_med` released medians, {glue:text}`n_med_within` lie within one step of zero
# (at most {glue:text}`med_within_nats:.4f` nats). {glue:md}`verdict_median`. That step holds at
# the *mean* baseline loss; an individual position with a larger loss has a larger step
# (`definitions.float16_steps_caveat`): {glue:md}`f16_caveat`. The released summary stores no
# per-position losses, so each median cannot be measured against the step at its own losses, and
# the count above is a lower bound for positions with high losses. {glue:md}`verdict_quartiles`:
# the 25th and 75th percentiles lie {glue:md}`rel_q_nats` nats from zero, {glue:md}`rel_q_steps`
# steps; {glue:text}`rel_grid:.0%` of the released medians and quartiles are exact multiples of
# $2^{-16}$, as differences of float16 losses are. The released share of positions whose loss
# *rises* is {glue:md}`rel_pos_k1` when the top expert is removed and {glue:md}`rel_pos_deep` at
# the deepest removal. A share near one half does not by itself point to rounding: in the book's
# float32 runs, with no half-precision rounding at all, the loss *rises* at the deepest removal
# at {glue:md}`book_rises` of the positions (range over layers, per model; the same share as
# the released one, ties counted as not rising). What the float16
# noise of the whole forward pass of the seven-billion-parameter model adds to these numbers was
# not measured with the released table; this section bounds only the rounding of the stored losses.

# %% [markdown]
# ## 5. Does the verdict survive a change of operator?
#
# Every ablation so far removed an expert the paper's way: its weighted contribution
# $g_e(x_t)\,E_e(x_t)$ is subtracted from the layer output and the other active experts keep their
# combine weights (no renormalisation; `operator="remove"`). Two other operators are in use:
#
# * **mask**: the expert's router logit is set to $-\infty$ before the top-$k$, as studies that
#   run their models in vLLM {cite}`kwon2023vllm` do (for example the modularity study of the
#   Command A+ chapter {cite}`salomone2026modular`). The router then selects another expert in
#   its place, and the combine weights are formed anew from the masked logits, so a router that
#   normalises its top-$k$ renormalises them.
# * **mean**: the expert's output at the token is replaced by its mean output $\mu_e$ over clean
#   tokens routed to it, its combine weight kept (MoNE's "novices" {cite}`zhang2025mone`). Here
#   $\mu_e$ is averaged over every real token of the texts that hold the compared positions.
#
# The audit cells are computed from the records of each operator exactly as for the two definitions: same
# layers, same metric table, same pairs of experts, and positions drawn (seeded) from the
# chapter's positions, {glue:text}`operator_n` of them (`operator_positions`), because every operator re-runs every active
# expert at every audited layer. The "remove" records are the chapter's own token-local records at
# those positions. For the mask operator each record also says which expert entered the top-$k$
# (`replacement`), how much combine weight the masked expert kept (`leak`, which must be zero)
# and whether the masked router selected it anyway (`masked_selected`). The next-ranked expert
# is the one with the largest clean router logit outside the clean top-$k$
# (`definitions.next_ranked_expert`), read from the padded pass of the metric definitions above.

# %%
glue("operator_n", int(operator_positions), display=False)
others = [op for op in engine.OPERATORS if op != "remove"]
op_parts = {op: [] for op in engine.OPERATORS}
for name in models:
    ctx = contexts[name]
    sub = definitions.operator_subset(records[name, "token"], n_positions=operator_positions, seed=seed)
    means = engine.expert_mean_outputs(ctx.model, ctx.corpus, layers=audited_layers[name],
                                       seq_ids=sorted(sub.seq_id.unique().tolist()), progress=False)
    op_parts["remove"].append(sub.assign(operator="remove"))
    for op in others:
        op_parts[op].append(definitions.operator_records(ctx.model, ctx.corpus, ctx.clean, sub, operator=op,
                                                         means=means if op == "mean" else None,
                                                         batch_size=batch_size, seed=seed))
    del means
op_records = {op: pd.concat(v, ignore_index=True) for op, v in op_parts.items()}
definitions.check_mask_leak(op_records["mask"])  # refuses any combine weight left on a masked expert
replaced = definitions.replacement_summary(op_records["mask"], pd.concat(next_ranked, ignore_index=True))
cells_op = pd.concat([cells_for(op_records[op][op_records[op].model == n], contexts[n].metrics, variant=op)
                      for n in models for op in engine.OPERATORS], ignore_index=True)
table_op = table_for(cells_op)
cmp_op = {op: definitions.compare_audit_variants(cells_op, table_op, "remove", op, alpha=alpha, n_boot=n_boot, seed=seed)
          for op in others}
fam_op = int(table_op[(table_op.model == models[0]) & (table_op.set == "metrics")].family_size.iloc[0])
n_op = int(min(c.n.min() for c in cmp_op.values()))

# %% tags=["remove-input"]
glue_all(op_replaced=Markdown(definitions.replacement_text(replaced)), **{
    f"op_cmp_{op}": Markdown(definitions.operator_comparison_text(c, label_a="remove", label_b=op, n=n_op, family=fam_op,
                                                                  alpha=alpha)) for op, c in cmp_op.items()})
_ = report.show_table(replaced, labels={"max_leak": "largest leak", "masked_selected": "masked router still selected it",
                                        "one_replacement": "one new expert", "next_ranked": "new expert = next-ranked"},
                      formats={"largest leak": "{:.3g}", "one new expert": "{:.1%}", "new expert = next-ranked": "{:.1%}"},
                      caption="Router masking: records, largest leak (combine weight left on the masked expert), "
                              "records whose masked router still selected it, share with one new expert, share whose "
                              "new expert is the clean router's next-ranked one")

# %% [markdown]
# {glue:md}`op_replaced`
#
# The figure puts each cell's $d_z$ under the paper's operator against its $d_z$ under the other
# two; a cell on the diagonal has the same effect size under both.

# %% tags=["hide-input"]
fig, axes = report.panel_grid(len(others), height=5.0, sharex=True, sharey=True)
lim = float(np.nanmax([np.abs(c[["dz_a", "dz_b"]].to_numpy()).max() for c in cmp_op.values()])) * 1.1 + 0.02
for ax, (op, c) in zip(axes, cmp_op.items()):
    for r in c.itertuples():
        ax.scatter(r.dz_a, r.dz_b, color=colors[r.model], marker=markers[r.ranking],
                   s=70 if r.ranking == ROUTING_WEIGHT else 38, edgecolor="black" if r.flip_dual else "none", alpha=0.9)
    ax.plot([-lim, lim], [-lim, lim], color="0.4", linewidth=0.8)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="Cohen's $d_z$, remove (the paper's)",
           ylabel=f"Cohen's $d_z$, {op}", title=f"remove vs {op}")
fig.legend(handles=[Patch(color=colors[m], label=m) for m in models]
           + [plt.Line2D([], [], marker=markers[r], color="0.3", linestyle="", label=LABEL[r]) for r in RANKINGS]
           + [plt.Line2D([], [], marker="o", mfc="white", mec="black", linestyle="", label="verdict changes (dual rule)")],
           fontsize=8, loc="lower center", ncol=3, frameon=False)
fig.suptitle(f"Same cells under three operators\n(d_z of the paired loss difference D in nats; n = {operator_positions} positions)")
fig.tight_layout(rect=(0, 0.15, 1, 1))

# %% [markdown]
# {glue:md}`op_cmp_mask`
#
# {glue:md}`op_cmp_mean`
#
# Per model, the cells whose verdict changes:

# %% tags=["remove-input"]
display(Markdown("\n\n".join(flip_text(c, "remove", op) for op, c in cmp_op.items())))

# %% [markdown]
# ## What this shows, and what it does not

# %% tags=["remove-input"]
flips = lambda c: f"{int(c.flip_dual.sum())} of {len(c)} cell verdicts {'changes' if int(c.flip_dual.sum()) == 1 else 'change'} under the dual rule, {int(c.flip_p05.sum())} under uncorrected p_t below {alpha:g}"  # noqa: E731
glue_all(l_mode_text=Markdown(
    f"Token-local and sequence-wide ablation of the same expert differ by up to {other_rows.max_diff.max():.2g} nats per "
    f"record at the audited layers before the last (rank correlation over records {span(other_rows.rho, '{:+.3f}')})"
    if len(other_rows) else f"Only the last decoder layer was audited, where the two ablations differ by at most "
                            f"{agreement.max_diff.max():.1e} nats per record"), half_name=half_dtype,
         l_ddz_mode=float(cmp_mode.ddz.abs().max()), l_ddz_def=float(cmp_def.ddz.abs().max()),
         l_min_rho=float(own_rho.rho.min()), l_flips_mode=flips(cmp_mode), l_flips_def=flips(cmp_def),
         l_flips_half=flips(cmp_half), l_ddz_whole=float(cmp_whole.ddz.abs().max()), l_flips_whole=flips(cmp_whole),
         l_operator=Markdown("; ".join(f"against {op}, the cell effect sizes move by up to {c.ddz.abs().max():.3f} in "
                                       f"d_z and {flips(c)}" for op, c in cmp_op.items())),
         l_next_share=float((replaced.next_ranked * replaced.records).sum() / replaced.records.sum()))
passing = {what: (int((c.dual_a | c.dual_b).sum()), len(c)) for what, c in
           (("the two ablation modes", cmp_mode), ("the two metric definitions", cmp_def),
            (f"{dtype} and {half_dtype}", cmp_half), *((f"remove and {op}", c) for op, c in cmp_op.items()))}
glue_all(l_verdict_power=Markdown(
    "A cell passes the dual rule under either variant in " + join_words(f"{k} of {n} cells ({what})"
                                                                        for what, (k, n) in passing.items())
    + ": an unchanged verdict is mostly a cell significant under neither, so these counts say little about "
      "whether a variant could change a verdict; the moves of the effect sizes above say more."))

# %% [markdown]
# **Shows.** On the same positions and pairs of experts, how much the measured loss, the effect
# sizes and the verdicts of the audit depend on each implementation choice:
#
# 1. **Where the expert is removed.** {glue:md}`l_mode_text`, the cell effect sizes by up to
#    {glue:text}`l_ddz_mode:.3f` in $d_z$; {glue:text}`l_flips_mode`. The sequence-wide
#    intervention is a plain nnsight trace that differs from the paper's in one line, and it agrees
#    with the batched engine to {glue:text}`demo_gap:.1e` nats.
# 2. **How the metrics are computed.** The models' own released recipes order the experts of a
#    layer differently from the paper's definitions in {glue:text}`n_reordered` of
#    {glue:text}`n_vectors` vectors ($\rho$ down to {glue:text}`l_min_rho:+.2f`). The released
#    OLMoE "mean routing weight when active" is a mean logit over one layer-wide threshold; at the
#    median expert it admits {glue:text}`admitted_span` of the positions, where the router selects
#    {glue:text}`selected_span`. Cell effect sizes move by up to
#    {glue:text}`l_ddz_def:.3f` in $d_z$; {glue:text}`l_flips_def`. The released pipeline as a
#    whole (own recipe and sequence-wide ablation) moves them by up to
#    {glue:text}`l_ddz_whole:.3f` against the paper's; {glue:text}`l_flips_whole`.
# 3. **The precision.** In {glue:text}`half_name`, the share of single-expert effects smaller than the 95th
#    percentile of the model's rounding errors (over all its ablations) is {glue:md}`below_noise`;
#    {glue:text}`l_flips_half`. A median near zero means little without the noise of the
#    precision it was computed in; and the float32 runs of these models, free of half-precision
#    rounding, have the loss rise at the deepest removal at {glue:md}`book_rises` of the positions.
# 4. **The operator.** Router masking leaves no combine weight on the masked expert and, in
#    {glue:text}`l_next_share:.1%` of the records, hands its place to the clean router's next-ranked
#    expert; {glue:md}`l_operator`. These comparisons rest on {glue:text}`operator_n` positions per
#    cell, so a verdict that holds under every operator holds only as far as the power stated in
#    the operator section reaches.
#
# {glue:md}`l_verdict_power`
#
# **Does not show.** Which definition is "right": the token-local one answers the paper's
# question (does the metric predict the importance of an expert *at this token*), the
# sequence-wide one a different question (what is lost if the expert is absent from the whole
# context), closer to pruning. The sizes measured here belong to the book's small models; on the
# paper's checkpoints, with longer contexts and more padding, the gaps can be larger or smaller.
# The released metric values of the real checkpoints are not recomputed here (that needs the
# checkpoints' router logits), so how the released "mean routing weight when active" ranks the
# experts of the real OLMoE checkpoint is not known from this chapter: on the book's models its
# rank correlation with the paper's definition is {glue:text}`mrw_rho`, a number that depends on
# how each router's logits are distributed. Nor is the float16 noise of the checkpoints' forward
# passes measured; it can only be bounded on those models (re-run this chapter with `models` set
# to the checkpoint ids and `half_dtype="float16"` on a GPU).
#
# ## Exercises

# %% tags=["remove-input"]
last_cmp = cmp_mode[[r.layer == contexts[r.model].model.layout.n_layers - 1 for r in cmp_mode.itertuples()]]
fam = int(table_mode[(table_mode.model == models[0]) & (table_mode.set == "metrics")].family_size.iloc[0])
n_small, power = max(3, n_positions // 5), 0.8
glue("ex_last", Markdown(
    f"Only rounding. In this build the largest difference at the last decoder layer is {last_rows.max_diff.max():.1e} nats, "
    f"the largest difference of d_z between the two modes there {last_cmp.ddz.abs().max():.1e}, and "
    + (lambda k: f"{k} verdict changes" if k == 1 else f"{k} verdicts change")(int((last_cmp.flip_dual | last_cmp.flip_p05).sum()))
    + " there." if len(last_rows) and len(last_cmp) else
    "This build audited no last decoder layer, so it has no number to compare with; the picture of section 1 predicts "
    "differences at the rounding floor."), display=False)
ex3_params = f"-p n_positions {n_small}" + (f" -p operator_positions {n_small}" if operator_positions > n_small else "")
glue_all(ex3_cmd=Markdown(f"`make chapter NB=09_intervention_definitions PARAMS=\"{ex3_params}\"`"),
         ex_last_layer=contexts[models[0]].model.layout.n_layers - 1, ex_sub_rho=span(substitute.rho, "{:+.2f}"),
         ex_sub_rel_rho=span(substitute.rho_released, "{:+.2f}"), ex_family=fam, ex_power=power,
         ex_widen=float(np.sqrt(n_positions / n_small)),
         ex_mde_now=stats.min_detectable_dz(n_positions, alpha=alpha / fam, power=power),
         ex_mde_small=stats.min_detectable_dz(n_small, alpha=alpha / fam, power=power))

# %% [markdown]
# ````{exercise} 1. The last layer alone
# :label: 09_intervention_definitions-ex1
# :nonumber:
#
# Run `make chapter NB=09_intervention_definitions PARAMS="-p layers '[L]'"`
# with `L` the last decoder layer of the first model ({glue:text}`ex_last_layer` here). What is left
# of the difference between the two interventions, and of the difference between their effect sizes?
# ````
#
# ````{solution} 09_intervention_definitions-ex1
# :class: dropdown
#
# {glue:md}`ex_last`
# ````
#
# ````{exercise} 2. The router's own mask
# :label: 09_intervention_definitions-ex2
# :nonumber:
#
# In a copy of `paper.released_mean_routing_weight_when_active`,
# replace the layer-wide threshold $\tau$ by each position's own $k$-th largest logit, so that
# the mask is the router's selection, and recompute the OLMoE-script mean routing weight with it
# (mean logit over the selecting positions, padding included). Which share of positions does the
# mask admit now, and how well does the result rank the experts like the paper's definition?
# ````
#
# ````{solution} 09_intervention_definitions-ex2
# :class: dropdown
#
# The mask admits exactly the router's share $k/E$ of each position's experts
# ({glue:text}`selected_span`). The mean logit over the selecting positions correlates with the
# paper's mean routing probability at $\rho$ = {glue:text}`ex_sub_rho` across layers and models,
# against {glue:text}`mrw_rho` for the released layer-wide mask, and with the released recipe at
# $\rho$ = {glue:text}`ex_sub_rel_rho`.
# ````
#
# ````{exercise} 3. Fewer positions
# :label: 09_intervention_definitions-ex3
# :nonumber:
#
# Run {glue:md}`ex3_cmd` (a fifth of the positions of this build).
# How large must an effect be before the paired t-test, at the Bonferroni level of the family of
# metric cells, detects it with the stated power? (The dual rule also needs the Wilcoxon test, so it
# needs a little more.)
# Compute the smallest detectable $d_z$ with `moeaudit.stats.min_detectable_dz` and check it in the
# downloaded notebook with
# `check_09_intervention_definitions_3(answer, n_positions=n_positions, alpha=alpha, family=fam, power=power)`
# (`from moeaudit.chapters.definitions import check_09_intervention_definitions_3`).
# ````
#
# ````{solution} 09_intervention_definitions-ex3
# :class: dropdown
#
# With the family of {glue:text}`ex_family` metric cells of the first model, the minimum
# detectable $d_z$ (power {glue:text}`ex_power`, two-sided, at the Bonferroni level) rises from
# {glue:text}`ex_mde_now:.2f` to {glue:text}`ex_mde_small:.2f`, and the confidence intervals of
# the differences of $d_z$ widen by a factor of about {glue:text}`ex_widen:.1f` (the square root of
# the ratio of the numbers of positions).
# ````

# %% tags=["hide-input"]
ex4 = {n: definitions.mean_smaller_share(op_records["remove"], op_records["mean"], model=n) for n in models}
med_abs = {op: {n: float(r[r.model == n].delta_loss.abs().median()) for n in models} for op, r in op_records.items()}
glue_all(ex4_share=Markdown(per_model(ex4, "{:.1%}")), ex4_first=ex4[models[0]], ex4_model=models[0],
         ex4_median=Markdown("; ".join(f"{op}: {per_model(v, '{:.2e}')}" for op, v in med_abs.items())),
         ex4_reading=Markdown(
             ("The share is above one half for every model: putting back the expert's average output leaves the loss "
              "closer to its clean value than removing the expert does, in more than half of these records"
              if min(ex4.values()) > 0.5 else
              "The share is not above one half for every model: where it is not, putting back the expert's average "
              "output moves the loss at least as far from its clean value as removing the expert does, in at least "
              "half of these records")
             + " (a description, not a test: the records of one position share its context and are not independent)"))

# %% [markdown]
# ````{exercise} 4. What the mean puts back
# :label: 09_intervention_definitions-ex4
# :nonumber:
#
# Mean replacement removes the expert's output at the token and adds back its combine weight
# times the expert's average output. Before looking at the records, predict: is the loss change
# under mean replacement smaller in size than under removal for most single-expert ablations, or
# for about half of them? Then compute, for the first model ({glue:text}`ex4_model`), the share of
# the ablations in `op_records` (matched on position, layer and expert) with
# $|\Delta_{\text{mean}}| < |\Delta_{\text{remove}}|$, and check it with
# `check_09_intervention_definitions_4(answer, op_records, model=models[0])`
# (`from moeaudit.chapters.definitions import check_09_intervention_definitions_4`).
# ````
#
# ````{solution} 09_intervention_definitions-ex4
# :class: dropdown
#
# The share is {glue:text}`ex4_first:.1%` for {glue:text}`ex4_model` ({glue:md}`ex4_share`). The
# median $|\Delta|$ in nats per operator and model is {glue:md}`ex4_median`. {glue:md}`ex4_reading`.
# ````
