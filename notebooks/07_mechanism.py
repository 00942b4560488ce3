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
# # Mechanism: gap norms and the redistribution analysis
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - relate the size of an expert's removal (its gap norm) to the loss change it causes;
# - follow how later layers absorb or amplify a removal;
# - judge a correlation computed over few experts, and what filtering them changes.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: every MoE layer of each model; or a list used for every model
n_positions = 200  # token positions for the ablation (downstream) measure
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
min_activations = 5  # an expert enters a correlation only with at least this many activations
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("07_mechanism", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("07_mechanism"))

# %% [markdown]
# The paper does not claim to explain its one surviving signal (routing weight at the last OLMoE
# layer). It reports that the signal "coincides with a sharp scaling of the gap norm", that the
# comparable scaling in Qwen without a comparable late-layer effect "rules out gap-norm growth
# alone as sufficient", and that "three architectures are not enough data" to attribute the
# pattern to any single cause (Section 3 "Mechanism"; Appendix A.3, Table 7 and Figure 2 of
# {cite}`engmann2026audit`). Two observations go with that account:
#
# 1. **Gap-norm scaling.** Removing one active expert e at token t changes the MoE output by the
#    *gap* $\mathbf{g} = \mathbf{y}_t - \mathbf{y}_t^{(-e)} = w_e(\mathbf{x}_t)\,E_e(\mathbf{x}_t)$,
#    because nothing else in the block reacts (the other combine weights are not renormalised).
#    The paper reports that the mean gap norm grows from {glue:text}`olmoe_gap_first:.4f` at
#    layer {glue:text}`olmoe_first` to {glue:text}`olmoe_gap_last:.4f` at layer
#    {glue:text}`olmoe_last` of OLMoE-1B-7B-0924, a factor of {glue:text}`olmoe_ratio:.1f` in the
#    authors' released records, and by a factor of {glue:text}`qwen_ratio:.1f` in
#    Qwen1.5-MoE-A2.7B (its Table 7 prints {glue:text}`qwen_printed_first` and
#    {glue:text}`qwen_printed_last` for the first and last audited layers).
# 2. **Two correlation chains across experts**, at each layer: the Spearman correlation between an
#    expert's mean routing weight and its mean gap norm (*does the router track how much the
#    expert contributes?*), and between its mean gap norm and its mean "relative compensation"
#    (*does that contribution survive?*).
#
# This chapter recomputes both on the book's models and examines what the second chain measures.
# The released implementation {cite}`engmann2026code` defines, for each active (t, e),
#
# $$\text{rel. comp.} = \frac{\max(\langle \mathbf{g}, \mathbf{r}\rangle, 0)}{\lVert\mathbf{g}\rVert^2}
# = \max(\cos\theta, 0)\,\frac{\lVert\mathbf{r}\rVert}{\lVert\mathbf{g}\rVert},
# \qquad \mathbf{r} = \mathbf{y}_t - \mathbf{g} \;\text{(the other routed experts' weighted sum plus the shared experts)},$$
#
# with $\theta$ the angle between $\mathbf{g}$ and $\mathbf{r}$ (the released "compensation
# cosine"), averaged over the tokens that route to e. Nothing is re-routed or re-computed after
# the removal, so $\mathbf{r}$ is exactly what the other experts produced *before* the ablation:
# the quantity describes the static geometry of the remaining outputs relative to the removed
# one, not a response to the removal. Within a layer there is in fact nothing that could
# respond: the router has already chosen and the other weights stay as they are.
#
# A measure that *does* re-measure the computation after the ablation is the **downstream
# compensation**: ablate e at t inside the forward pass, re-read every later MoE layer's output at
# t, and project the change onto the removed contribution,
#
# $$c_{\text{down}} = \sum_{L' > L} \frac{\langle \mathbf{y}'_{L'} - \mathbf{y}_{L'},\, \mathbf{g}\rangle}{\lVert\mathbf{g}\rVert^2},$$
#
# where $\mathbf{y}'_{L'}$ is the ablated run's output. It is $1$ when later MoE layers put the
# removed contribution fully back, $0$ when they do not react along it, and negative when they
# push further away from it. By construction it is $0$ at the last MoE layer, where no later MoE
# layer exists. The chapter computes both measures side by side, in the spirit of the
# causal-mediation analyses of {cite}`vig2020causal` and {cite}`meng2022locating`.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moeaudit import paper, released, report
from moeaudit.chapters.mechanism import (block_geometry, chain_correlations, compensation_factors,
                                         cosine_against_chance, expert_means, gap_rounding_ratio,
                                         layer_gap_ratios, measure_agreement, released_expert_means,
                                         significant_signs_text, slope_sign_separation)
from moeaudit.audit import prepare, single_expert_records
from moeaudit.report import significance_stars as stars

report.use_book_style()


def span(v, fmt="+.2f") -> str:
    return report.value_span(v, fmt)


def count(mask, what) -> str:
    return f"{int(mask.sum())} of {len(mask)} {what}"


# %%
paper_layers = released.redistribution(data_dir=data_dir)  # the authors' per-layer records (files or embedded table)
paper_experts = released_expert_means(released.redistribution_experts(data_dir=data_dir))
paper_layers["label"] = paper_layers.model.map({"olmoe": "paper: OLMoE-1B-7B", "qwen": "paper: Qwen1.5-MoE-A2.7B"})
paper_layers["rel_depth"] = paper_layers.groupby("model").layer.transform(lambda s: s / s.max())
paper_ratios = layer_gap_ratios(paper_layers, gap="mean_gap_norm").set_index("model")

# %% tags=["remove-input"]
printed = paper.paper_printed_values().query("table == 7 and quantity == 'mean_gap_norm'").sort_values("layer")
for key, value in {"olmoe_gap_first": paper_ratios.loc["olmoe", "gap_first"], "olmoe_first": paper_ratios.loc["olmoe", "first_layer"],
                   "olmoe_gap_last": paper_ratios.loc["olmoe", "gap_last"], "olmoe_last": paper_ratios.loc["olmoe", "last_layer"],
                   "olmoe_ratio": paper_ratios.loc["olmoe", "ratio_last_first"],
                   "qwen_ratio": paper_ratios.loc["qwen", "ratio_last_first"], "qwen_printed_first": printed.printed.iloc[0],
                   "qwen_printed_last": printed.printed.iloc[-1], "min_activations": min_activations, "mode": mode,
                   "n_positions": n_positions}.items():
    glue(key, value.item() if hasattr(value, "item") else value, display=False)

# %% [markdown]
# ## Data
# For each model: the clean pass over the evaluation corpus (routing, combine weights, expert
# output norms), one more un-ablated forward that saves every MoE block's input and output (for
# the released measure, over **all** tokens of the corpus, as in the paper;
# `moeaudit.chapters.mechanism.block_geometry`), and single-expert ablations of every active expert at
# {glue:text}`n_positions` sampled positions and every MoE layer with the later MoE outputs
# re-measured (for the downstream measure). Ablation records are cached on disk under a key made
# of every parameter that produced them.

# %%
geo_all, rec_all, info, last_moe_layer = [], [], [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    ctx.model.hf.config.output_router_logits = False  # no auxiliary balancing loss during analysis forwards
    display(Markdown(audit.regime_line(name, ctx)))
    lay = ctx.model.layout
    moe = list(layers) if layers is not None else list(lay.moe_layers)
    depth = dict(zip(moe, report.relative_depth(moe, lay.moe_layers)))
    last_moe_layer[name] = lay.moe_layers[-1]
    geo = block_geometry(ctx, moe, batch_size=batch_size).assign(model=name)
    rec = single_expert_records(ctx, layers=moe, n_positions=n_positions, seed=seed, mode=mode,
                                batch_size=batch_size, downstream=True)
    rec["row"] = ctx.clean.row(rec.seq_id.to_numpy(), rec.t.to_numpy())
    rec["norm"] = [float(ctx.clean.routing[L]["norm"][r][ctx.clean.routing[L]["indices"][r] == e][0])
                   for L, r, e in zip(rec.layer, rec.row, rec.expert)]
    for df in (geo, rec):
        df["rel_depth"] = df.layer.map(depth)
    geo_all.append(geo)
    rec_all.append(rec)
    info.append({"model": name, "family": lay.family, "hidden size": ctx.model.hf.config.hidden_size,
                 "MoE layers": len(lay.moe_layers), "analysed layers": ", ".join(map(str, moe)),
                 "routed experts": lay.num_experts, "top-k": lay.top_k, "shared experts": lay.n_shared_experts,
                 "tokens": len(ctx.clean.tokens), "ablations (downstream)": len(rec),
                 "premise failures": int((~rec.premise_ok).sum())})
geo = pd.concat(geo_all, ignore_index=True)
rec = pd.concat(rec_all, ignore_index=True)
rec_geo = rec.merge(geo[["model", "layer", "row", "expert", "rel_comp", "cos", "r_norm"]],
                    on=["model", "layer", "row", "expert"], how="left")

# %% tags=["remove-input"]
_ = report.show_table(pd.DataFrame(info).set_index("model").T.map(lambda v: f"{v:,}" if isinstance(v, (int, np.integer)) else v),
                      index=True, max_rows=None, caption="The models and the data of this chapter, one column per model")

# %% [markdown]
# ### Check: the gap is the removed weighted expert output
# The gap norm can be computed for every active (t, e) without running an ablation, as
# $w_e(\mathbf{x}_t)\cdot\lVert E_e(\mathbf{x}_t)\rVert$ from the clean pass. The ablation records
# measure it directly as the difference of the MoE outputs of a clean and an ablated row of the
# same batch. The table gives the relative difference between the two (and between the expert
# norms recomputed here and those stored by the clean pass, which confirms that every token row is
# aligned). In token mode (the paper's definition) the ablation removes exactly
# $w_e E_e(\mathbf{x}_t)$ and nothing else at t, so the two can differ only by floating-point
# rounding. That rounding is not small relative to $\lVert\mathbf{g}\rVert$: the measured gap is
# the difference of two block outputs of norm about $\lVert\mathbf{r}\rVert + \lVert\mathbf{g}\rVert$,
# each rounded to a machine epsilon $\varepsilon$ of that norm, so a small gap beside a large rest
# loses digits to cancellation, and its relative error is of order
# $\varepsilon\,(\lVert\mathbf{r}\rVert + \lVert\mathbf{g}\rVert)/\lVert\mathbf{g}\rVert$. The
# last column of the table gives the largest disagreement in that unit
# (`moeaudit.chapters.mechanism.gap_rounding_ratio`): values of order one mean that the two computations agree
# as closely as float arithmetic allows, whatever the relative difference looks like; the
# cancellation costs the most digits for the smallest gaps. In sequence mode (`mode="sequence"`) the expert is also removed at earlier positions,
# which changes the MoE input at t, and the measured gap can differ from the clean-pass value.
# This run (`mode` = {glue:text}`mode`) finds a largest relative disagreement of
# {glue:text}`check_max:.1e` over {glue:text}`check_n` ablations. {glue:md}`check_verdict`

# %%
rel_diff = (rec.gap_norm - rec.weight * rec.norm).abs() / (rec.weight * rec.norm)
check = pd.DataFrame({
    "ablations": rec.groupby("model", sort=False).size(),
    "median |measured − w·‖E‖| / w·‖E‖": rel_diff.groupby(rec.model, sort=False).median(),
    "max |measured − w·‖E‖| / w·‖E‖": rel_diff.groupby(rec.model, sort=False).max(),
    "max |recomputed ‖E‖ − stored ‖E‖| / stored": geo.groupby("model", sort=False).norm_check.max(),
})
check["max in units of ε(‖r‖+‖g‖)/‖g‖"] = pd.Series(gap_rounding_ratio(
    rec_geo.gap_norm, rec_geo.weight * rec_geo.norm, rec_geo.r_norm, dtype=dtype)).groupby(rec_geo.model, sort=False).max()

# %% tags=["remove-input"]
_ = report.show_table(check.rename_axis("model").reset_index(), labels={c: c for c in check.columns},
                      formats={"ablations": "{:,}"} | {c: "{:.2e}" for c in check.columns if c != "ablations"})
glue("check_max", float(rel_diff.max()), display=False)
unit_max = float(check.iloc[:, -1].max())
glue("check_verdict", Markdown(f"In units of that cancellation error the largest disagreement is {unit_max:.1f}" + (
    (": the size of rounding, as expected." if unit_max <= 10 else ", more than rounding of the two outputs explains.")
    if mode == "token" else "; in sequence mode it also carries the effect of the earlier removals.")), display=False)
glue("check_n", f"{len(rec):,}", display=False)

# %% [markdown]
# ## Gap-norm scaling across depth
# Mean gap norm per layer, with the paper's convention (Table 7): the mean over experts of each
# expert's mean gap norm over the tokens that route to it (experts with at least
# `min_activations` = {glue:text}`min_activations` activations; `moeaudit.chapters.mechanism.expert_means`).
# The paper's values are read from the authors' released per-expert records
# ({glue:md}`paper_source`).

# %%
per_expert = expert_means(geo, min_activations=min_activations)
chains = chain_correlations(per_expert)
depths = geo[["model", "layer", "rel_depth"]].drop_duplicates().set_index(["model", "layer"]).rel_depth
chains["rel_depth"] = [depths[(m, L)] for m, L in zip(chains.model, chains.layer)]
ratios = pd.concat([layer_gap_ratios(chains),
                    layer_gap_ratios(paper_layers, label="label", gap="mean_gap_norm").rename(columns={"label": "model"})])

# %% tags=["remove-input"]
glue("paper_source", Markdown(released.released_source(data_dir).describe()), display=False)
glue("ratio_lines", Markdown("The mean gap norm changes from first to last analysed MoE layer by: " + "; ".join(
    f"**{r.model}** {r.ratio_last_first:.2f}× (layer {r.first_layer} to {r.last_layer})" for r in ratios.itertuples()) + "."),
    display=False)
_ = report.show_table(ratios, caption="Mean gap norm at the first and last analysed MoE layer, and its change across depth",
                      labels={"first_layer": "first layer", "last_layer": "last layer", "gap_first": "gap norm, first",
                              "gap_last": "gap norm, last", "ratio_last_first": "last / first",
                              "ratio_max_min": "largest / smallest layer"},
                      formats={"gap norm, first": "{:.3g}", "gap norm, last": "{:.3g}", "last / first": "{:.1f}×",
                               "largest / smallest layer": "{:.1f}×"})

# %% tags=["hide-input"]
colors = report.model_colors(models)
fig, ax = plt.subplots(figsize=(report.COLUMN_INCHES, 4.4))
for m in models:
    s = chains[chains.model == m]
    ax.plot(s.rel_depth, s.mean_gap, marker="o", color=colors[m], label=m)
for (lab, s), mk, shade in zip(paper_layers.groupby("label", sort=False), ("s", "D"), ("0.25", "0.55")):
    ax.plot(s.rel_depth, s.mean_gap_norm, marker=mk, ls="--", color=shade, ms=4, label=lab)
ax.set_yscale("log")
ax.set_xlabel("relative depth of the MoE layer (0 = first, 1 = last)")
ax.set_ylabel(r"mean gap norm $\|\mathbf{y}_t-\mathbf{y}_t^{(-e)}\|$ (log scale)")
ax.set_title("Gap norm under single-expert ablation across depth")
ax.legend(fontsize=8, loc="best")
fig.tight_layout()


# %% [markdown]
# {glue:md}`ratio_lines`
#
# The first-to-last ratio summarises the whole depth profile only when the profile is monotone;
# the last column of the table (largest over smallest layer) shows how far it moves in between.
# Absolute gap norms depend on each model's hidden size and residual-stream scale, so only ratios
# compare across models; on the log axis equal vertical distances are equal ratios.

# %% [markdown]
# ## The two correlation chains (the quantities of Table 7)
# For each model and layer, correlations are Spearman ρ across experts (each expert with at least
# `min_activations` activations; `moeaudit.chapters.mechanism.chain_correlations`), with the paper's markers:
# ${}^{*}p < 0.05$, ${}^{**}p < 0.01$, ${}^{***}p < 0.001$ (two-sided, uncorrected, as in the paper).
# One table per model, one row per layer; its columns:
#
# - **Mean gap norm**, as above (all tokens of the corpus).
# - **ρ(rw, gap norm)**: mean routing weight $g_e(\mathbf{x}_t)$ (the router's softmax probability,
#   averaged over the tokens that select e: the paper's definition) vs mean gap norm (all tokens).
# - **ρ(gap norm, rel. comp.), released measure**: mean gap norm vs the released "relative
#   compensation" (all tokens).
# - **ρ(gap norm, downstream comp.), re-measured**: mean measured gap norm vs mean downstream
#   compensation, over the single-expert ablations at the sampled positions.
# - **ρ(gap norm, rel. comp.), released, ablation sample**: the released measure restricted to
#   the very (t, e) pairs that were ablated, so that the two measures can be compared on the same
#   data and differences are not a matter of sample size.
#
# Read the last three columns together: the second and the third use the same ablations, so where
# they differ in sign or significance, the released measure and the re-measured one rank the
# experts differently on identical data; the first and the third differ only in how many tokens
# enter each expert's mean.

# %%
per_expert_abl = expert_means(rec_geo.drop(columns="prob"), min_activations=min_activations)
chains_abl = chain_correlations(per_expert_abl, pairs={"gap_down": ("mean_gap", "mean_down"),
                                                       "gap_comp_abl": ("mean_gap", "mean_rel_comp")})
chains = chains.merge(chains_abl.rename(columns={"n_experts": "n_experts_abl", "mean_gap": "mean_gap_abl",
                                                 "mean_rel_comp": "mean_rel_comp_abl"}), on=["model", "layer"], how="left")
chains["n_experts_abl"] = chains.n_experts_abl.fillna(0).astype(int)  # layers where no expert passes min_activations
ROWS = [("mean_gap", None, "Mean gap norm"), ("rho_rw_gap", "p_rw_gap", "ρ(rw, gap norm)"),
        ("rho_gap_comp", "p_gap_comp", "ρ(gap norm, rel. comp.), released measure"),
        ("rho_gap_down", "p_gap_down", "ρ(gap norm, downstream comp.), re-measured"),
        ("rho_gap_comp_abl", "p_gap_comp_abl", "ρ(gap norm, rel. comp.), released, ablation sample")]


# %% tags=["hide-input"]
def cell(r, key, pkey, last_layer) -> str:
    v = getattr(r, key, np.nan)
    if pkey is None:
        return f"{v:.3g}"
    if key == "rho_gap_down" and r.layer == last_layer:
        return "undefined"
    return "n/a" if not np.isfinite(v) else f"{v:+.3f}{stars(getattr(r, pkey))}"


shown = []
for m in models:
    c = chains[chains.model == m].sort_values("layer")
    table = pd.DataFrame([{"layer": r.layer, **{label: cell(r, key, pkey, last_moe_layer[m]) for key, pkey, label in ROWS}}
                          for r in c.itertuples()])
    shown += table.drop(columns="layer").to_numpy().ravel().tolist()
    display(Markdown(f"### {m}"))
    report.show_table(table, max_rows=None, caption=(
        f"{m}: correlations across experts (N = {span(c.n_experts, '.0f')} experts on all tokens; "
        f"{span(c.n_experts_abl, '.0f')} on the ablation sample of {n_positions} positions)"))
glue("na_note", Markdown("\"n/a\" (shown above) marks a correlation that is undefined: fewer than three experts pass "
                         "`min_activations`, or one column is constant." if "n/a" in shown else
                         "No other correlation in these tables is undefined."), display=False)

# %% [markdown]
# `undefined` at the last MoE layer: there the downstream compensation is exactly zero for every
# ablation (no later MoE layer exists), so no correlation with it exists. {glue:md}`na_note`
#
# For reference, the same columns as stored in the authors' released per-layer records (the paper's
# Table 7 is the Qwen part; the OLMoE values are its Figure 2). In the released implementation the
# router rows (flattened over batch × sequence, padding included) are paired with the masked
# expert-output rows, so after the first padded sequence the routing weights belong to other
# tokens; the stored ρ(rw, gap norm) is therefore not exactly the quantity it names.

# %% tags=["hide-input"]
for lab, s in paper_layers.sort_values("layer").groupby("label", sort=False):
    report.show_table(pd.DataFrame([{"layer": r.layer, "Mean gap norm": f"{r.mean_gap_norm:.3g}",
                                     "ρ(rw, gap norm)": f"{r.rho_rw_gap:+.3f}{stars(r.p_rw_gap)}",
                                     "ρ(gap norm, rel. comp.), released measure": f"{r.rho_gap_comp:+.3f}{stars(r.p_gap_comp)}"}
                                    for r in s.itertuples()]), caption=lab, max_rows=None)

# %% [markdown]
# ## Figure 2: both chains across depth
# Left: routing weight vs gap norm. Right: gap norm vs compensation, with the released measure
# (solid) and the re-measured downstream compensation (dashed; undefined at the last MoE layer).
# Markers above points: significance as in the tables. Grey: the paper's checkpoints from the
# released records (released measure).

# %% tags=["hide-input"]
fig, axes = report.panel_grid(2, height=4.6, sharey=True)


def chain_line(ax, s, rho, p, color, **kw):
    s = s.sort_values("rel_depth")
    ok = np.isfinite(s[rho])
    ax.plot(s.rel_depth[ok], s[rho][ok], color=color, **kw)
    for x, y, pv in zip(s.rel_depth[ok], s[rho][ok], s[p][ok]):
        ax.annotate(stars(pv), (x, y), textcoords="offset points", xytext=(0, 4), ha="center", color=color, fontsize=7)


for m in models:
    s = chains[chains.model == m]
    chain_line(axes[0], s, "rho_rw_gap", "p_rw_gap", colors[m], marker="o", label=m)
    chain_line(axes[1], s, "rho_gap_comp", "p_gap_comp", colors[m], marker="o", label=m)
    chain_line(axes[1], s, "rho_gap_down", "p_gap_down", colors[m], marker="s", ls="--", mfc="white",
               label=f"{m}, re-measured")
for (lab, s), mk, shade in zip(paper_layers.groupby("label", sort=False), ("s", "D"), ("0.25", "0.55")):
    chain_line(axes[0], s, "rho_rw_gap", "p_rw_gap", shade, marker=mk, ms=3, lw=1, ls=":", label=lab)
    chain_line(axes[1], s, "rho_gap_comp", "p_gap_comp", shade, marker=mk, ms=3, lw=1, ls=":", label=lab)
for ax, title in zip(axes, ("routing weight → gap norm", "gap norm → compensation\n(solid: released; dashed: re-measured)")):
    ax.set_title(title, fontsize=10)
    ax.set_ylim(-1.05, 1.1)
# the right panel first: finish_panels takes the legend from the first panel given, which here has every line
report.finish_panels(fig, axes[::-1], title="Redistribution analysis: the two correlation chains across depth",
                     ylabel="Spearman ρ across experts", xlabel="relative depth (0 = first MoE layer, 1 = last)",
                     zero_line=True)

# %% [markdown]
# ## What sets the sign of the second chain
# ```{glue:md} sign_contrast
# :format: myst
# ```
#
# The definition explains how that can happen. Per activation, the released relative compensation
# is the product of two factors, $\max(\cos\theta, 0)$ and $\lVert\mathbf{r}\rVert/\lVert\mathbf{g}\rVert$
# (the identity holds on this run's records to a largest relative deviation of
# {glue:text}`identity_dev:.1e`). The second factor tends to *fall* as the gap grows: the
# remaining output $\mathbf{r}$ is most of the block's output and does not shrink when one
# expert's share is small, so an expert whose contributions are small gets a large ratio whenever
# $\mathbf{r}$ is not orthogonal to $\mathbf{g}$. Where it falls, only the first factor can make
# the correlation positive: experts with larger gaps must also be markedly better *aligned* with
# the rest of the output. The sign of the second chain is decided by which factor moves faster
# with the gap norm across experts. The tables
# give, per model and layer, ρ of each factor with the gap norm, the median over experts of the mean
# cosine, and the log–log slopes against the gap norm (a slope $s$ means the quantity grows as
# $\lVert\mathbf{g}\rVert^{s}$; `moeaudit.chapters.mechanism.compensation_factors`). The released records
# store no $\lVert\mathbf{r}\rVert$, so that factor is "n/a" there.

# %%
book_factors = chains[["model", "layer", "n_experts", "rho_gap_comp", "rho_gap_cos", "rho_gap_rg"]].merge(
    compensation_factors(per_expert), on=["model", "layer", "n_experts"])
labelled = paper_experts.assign(model=paper_experts.model.map(dict(zip(paper_layers.model, paper_layers.label))))
paper_factors = chain_correlations(labelled)[["model", "layer", "n_experts", "rho_gap_comp", "p_gap_comp", "rho_gap_cos"]].merge(
    compensation_factors(labelled), on=["model", "layer", "n_experts"])
factors = pd.concat([book_factors, paper_factors], ignore_index=True)
identity = (geo.cos.clip(lower=0) * geo.r_norm / geo.gap_norm - geo.rel_comp).abs() / geo.rel_comp.where(geo.rel_comp > 0)
glue("identity_dev", float(identity.max()), display=False)

# %% tags=["hide-input"]
cols = {"rho_gap_comp": "ρ(gap, rel. comp.)", "rho_gap_cos": "ρ(gap, cos)", "rho_gap_rg": "ρ(gap, ‖r‖/‖g‖)",
        "median_cos": "median cos", "slope_cos": "slope of cos", "slope_r_over_g": "slope of ‖r‖/‖g‖",
        "slope_rel_comp": "slope of rel. comp."}
for m, f in factors.groupby("model", sort=False):
    display(f[["layer", *cols]].rename(columns=cols).style.hide(axis="index")
            .format("{:+.2f}", na_rep="n/a", subset=list(cols.values())).format("{:.3f}", subset=["median cos"], na_rep="n/a")
            .set_caption(f"{m}: chain 2 decomposed, correlation and log–log slope of each factor against the mean gap "
                         "norm, across experts, per layer"))


# %% tags=["remove-input"]
b, p_ol = book_factors, paper_factors[paper_factors.model == "paper: OLMoE-1B-7B"]
sig, pos = p_ol.p_gap_comp < paper.PAPER_ALPHA, b[b.rho_gap_comp > 0]
glue("sign_contrast", Markdown(
    f"On the book's models, ρ(gap norm, relative compensation) is negative at {count(b.rho_gap_comp < 0, 'layers')} "
    f"({span(b.rho_gap_comp[b.rho_gap_comp < 0])})" + ("" if pos.empty else "; it is positive at " + ", ".join(
        f"{r.model} layer {r.layer} ({r.rho_gap_comp:+.2f})" for r in pos.itertuples())) + f". In the released OLMoE records it is positive at {count(p_ol.rho_gap_comp > 0, 'layers')} "
    f"({span(p_ol.rho_gap_comp)}) and significant at p < {paper.PAPER_ALPHA:g} at {int(sig.sum())} of them"
    + (", although the paper's text says that in OLMoE this correlation \"strengthens only at Layer 15\"" if sig.sum() > 1 else "")
    + f" (its values at layers {', '.join(str(L) for L in (p_ol.layer.min(), int(p_ol.layer.median()), p_ol.layer.max()))}: "
    + ", ".join(f"{v:+.3f}" for v in p_ol.set_index('layer').rho_gap_comp.loc[[p_ol.layer.min(), int(p_ol.layer.median()), p_ol.layer.max()]])
    + ")."), display=False)
cos_book, cos_ol = b.slope_cos, p_ol.slope_cos

# %% tags=["remove-input"]
glue("factor_summary", Markdown(
    f"- **The ‖r‖/‖g‖ factor** falls with the gap norm at {count(b.rho_gap_rg < 0, 'layers')} of the book's models "
    f"(ρ {span(b.rho_gap_rg)}, slope {span(b.slope_r_over_g)}).\n"
    f"- **The cosine factor** rises with the gap norm at {count(b.rho_gap_cos > 0, 'layers')} of the book's models "
    f"(ρ {span(b.rho_gap_cos)}, slope {span(cos_book)}) and at {count(p_ol.rho_gap_cos > 0, 'layers')} of the released "
    f"OLMoE records (ρ {span(p_ol.rho_gap_cos)}, slope {span(cos_ol)}).\n"
    f"- **Typical alignment**: the median mean cosine is {span(b.median_cos, '.3f')} on the book's models "
    f"(hidden size {span(pd.DataFrame(info)['hidden size'], '.0f')}) and {span(p_ol.median_cos, '.3f')} in the released "
    f"OLMoE records."), display=False)
up = b[b.rho_gap_comp > 0].merge(chains[["model", "layer", "p_gap_comp"]])
exceptions = ("never makes up for the falling ‖r‖/‖g‖ factor: at every layer" if up.empty else
              "makes up for the falling ‖r‖/‖g‖ factor only at " + ", ".join(
                  f"{r.model} layer {r.layer} (ρ = {r.rho_gap_comp:+.3f}{stars(r.p_gap_comp)})" for r in up.itertuples())
              + "; at the other layers")
glue("factor_verdict", Markdown(
    (f"So the cosine rises more steeply with the gap norm in every released OLMoE layer (slope {span(cos_ol)}) than in "
     f"any layer of the book's models ({span(cos_book)}). On the book's models the rise {exceptions} experts with "
     f"*small* gaps tend to get the *largest* relative compensation. In the released OLMoE records the correlation is "
     f"positive at {count(p_ol.rho_gap_comp > 0, 'layers')}.")
    if cos_ol.min() > cos_book.max() else
    (f"The cosine slopes of the book's models ({span(cos_book)}) and of the released OLMoE records ({span(cos_ol)}) "
     "overlap on this run, so the slope of the cosine alone does not separate the two; compare the slope of the "
     "relative compensation itself in the tables.")), display=False)
glue("race_summary", Markdown(
    f"on this run the correlation is negative (the 1/‖g‖ factor wins) at {count(b.rho_gap_comp < 0, 'layers')} of the "
    f"book's models and positive (the alignment wins) at {count(p_ol.rho_gap_comp > 0, 'layers')} of the released "
    "OLMoE records."), display=False)
hidden = {**{r["model"]: r["hidden size"] for r in info}, **{lab: paper.CHECKPOINT_HIDDEN_SIZE[k]
                                                                 for k, lab in zip(paper_layers.model, paper_layers.label)}}
chance = cosine_against_chance(factors, hidden)
glue("cos_chance", Markdown("\n".join(
    f"- **{r.model}** ($d$ = {r.d}, $1/\\sqrt{{d}}$ = {r.chance:.3f}): {span([r.lo, r.hi], '.3f')}, that is "
    f"{span([r.ratio_lo, r.ratio_hi], '.1f')} times $1/\\sqrt{{d}}$, {r.relation.replace('across', 'on both sides of')} it"
    for r in chance.itertuples())), display=False)
far = chance[chance.relation == "above"].model.tolist()
glue("cos_chance_verdict", Markdown(
    (f"Every model's median cosine is positive. At {', '.join(far)} it lies above the spread of unrelated directions "
     "at every layer: the removed output and the rest of the block's output are systematically aligned there."
     if far else "Every model's median cosine is positive, but none lies above the spread of unrelated directions at "
     "every layer. ") if (chance.lo > 0).all() else "Some median cosines are not positive. "), display=False)

# %% tags=["remove-input"]
sep = slope_sign_separation(factors.slope_cos, factors.rho_gap_comp)
glue("slope_verdict", Markdown(
    "On this run every layer has the same sign, so there are no two groups to separate." if sep["separated"] is None else
    f"On this run they do: every layer with a negative correlation has a slope of at most {sep['max_slope_neg']:.2f}, "
    f"every layer with a positive one at least {sep['min_slope_pos']:.2f}." if sep["separated"] else
    f"On this run the groups {'barely ' if sep['max_slope_neg'] - sep['min_slope_pos'] < 0.05 else ''}overlap: layers "
    f"with a negative correlation reach slopes up to {sep['max_slope_neg']:.3f}, layers "
    f"with a positive one start at {sep['min_slope_pos']:.3f}, and {sep['n_overlap']} layers lie in that overlap"
    + ("; the slope of the cosine nearly decides the sign, with a boundary near "
       f"{(sep['max_slope_neg'] + sep['min_slope_pos']) / 2:.2f}." if sep['max_slope_neg'] - sep['min_slope_pos'] < 0.05
       else "; the slope of the cosine alone does not decide the sign.")), display=False)

# %% [markdown]
# ```{glue:md} factor_summary
# :format: myst
# ```
#
# {glue:md}`factor_verdict` Neither sign says anything about compensation: both are properties of
# the angle between one expert's output and the sum of the others, and of the ratio of their
# lengths, in the un-ablated forward pass.
#
# How large are the typical cosines? For two unrelated (independent, isotropic) directions in a
# hidden space of dimension $d$ the cosine has mean $0$ and spread (standard deviation)
# $1/\sqrt{d}$, so a median cosine well above $1/\sqrt{d}$ is systematic alignment, not chance.
# Per model, with $d$ from the model's configuration (for the paper's checkpoints,
# `paper.CHECKPOINT_HIDDEN_SIZE`), the range over layers of the median mean cosine is:
#
# ```{glue:md} cos_chance
# :format: myst
# ```
#
# The ratios to $1/\sqrt{d}$ put the book's narrow models and the paper's wide checkpoints on one
# scale, which the raw cosines do not.
#
# {glue:md}`cos_chance_verdict` The mean cosine of an expert averages over many tokens, so for
# unrelated directions it would scatter around $0$ even more tightly than $1/\sqrt{d}$; a
# positive median below $1/\sqrt{d}$ is therefore small alignment, not evidence of its absence.
#
# The figure places every layer (of the book's models and of both released checkpoints) by the
# log–log slope of its mean cosine against its mean gap norm and by its correlation between gap
# norm and relative compensation. If the slope of the cosine decided the sign on its own, the
# points would fall into two groups: negative correlations at small slopes, positive ones at
# large slopes. Points near the zero line are layers where the two factors nearly cancel; their
# sign is not informative, and the table's stars show which of them are significant at all.
# {glue:md}`slope_verdict`

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(report.COLUMN_INCHES, 4.2))
for m, s in factors.groupby("model", sort=False):
    style = dict(color=colors[m], marker="o") if m in colors else dict(color="0.35" if "OLMoE" in m else "0.65",
                                                                        marker="s" if "OLMoE" in m else "D")
    ax.scatter(s.slope_cos, s.rho_gap_comp, label=m, s=28, **style)
ax.axhline(0, color="0.3", lw=0.8)
ax.set_xlabel("log–log slope of the mean cosine against the mean gap norm")
ax.set_ylabel("ρ(gap norm, rel. comp.)")
ax.set_title("Gap norm → relative compensation against the growth of alignment")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## What the two measures say on average
# Beyond the rank correlations, the size of each measure matters. The tables give, per model and layer, the
# mean over the ablated (t, e) pairs of the released relative compensation and of the downstream
# compensation, the share of ablations after which later layers moved back along the removed
# vector, and the rank correlation between the two measures over the individual ablations (the
# same (t, e) pairs; `moeaudit.chapters.mechanism.measure_agreement`): if the released quantity tracked real
# compensation, the two would be positively related. At the last MoE layer the downstream measure
# is identically zero, so that correlation is "n/a".
#
# The two measures differ in scale as well as in meaning. The released quantity is a ratio of a
# projection to the squared gap and is unbounded above: a single activation with a tiny gap can
# dominate an expert's mean. The downstream compensation is also a ratio to the squared gap,
# but of a change that the ablation itself caused, so a value near zero means that later MoE
# layers did not move along the removed direction at all.

# %%
per_record = measure_agreement(rec_geo)

# %% tags=["remove-input"]
for m, t in per_record.groupby("model", sort=False):
    same = t.ablations.nunique() == 1  # stated once in the caption instead of per row
    display(t.drop(columns=["model", *(["ablations"] if same else [])]).rename(columns={
        "mean_rel_comp": "mean rel. comp. (released)", "mean_down": "mean downstream comp.",
        "share_down_positive": "share with downstream comp. > 0", "rho": "ρ(released, downstream)"})
        .style.hide(axis="index").format(
        {"mean rel. comp. (released)": "{:.3g}", "mean downstream comp.": "{:+.3g}", "share with downstream comp. > 0": "{:.0%}",
         "ρ(released, downstream)": "{:+.3f}", "p": "{:.2g}"}, na_rep="n/a")
        .set_caption(f"{m}: the two measures over the ablated (t, e) pairs, per layer"
                     + (f" ({int(t.ablations.iloc[0]):,} ablations per layer)" if same else "")))

# %% [markdown]
# The per-model summary below counts the layers at which each chain-2 correlation reaches the
# paper's level and gives the sign of those correlations. The sign matters as much as the count:
# a significant *negative* correlation is the opposite relation to the paper's positive one, not
# a weaker form of it, and where the significant layers of one model have opposite signs the
# correlation does not describe one stable relation in that model.


# %% tags=["remove-input"]
def summary_line(m: str) -> str:
    c = chains[chains.model == m]
    down = c[c.layer != last_moe_layer[m]].dropna(subset=["rho_gap_down"])
    pr = per_record[(per_record.model == m) & (per_record.layer != last_moe_layer[m])]
    if not len(pr):
        return f"- **{m}**: only the last MoE layer was analysed, so no downstream measure exists."
    comp = c.dropna(subset=["rho_gap_comp"])
    a = paper.PAPER_ALPHA
    return (f"- **{m}**: ρ(rw, gap) is positive at {count(c.rho_rw_gap.dropna() > 0, 'layers')} (p < {a:g} at "
            f"{int((c.p_rw_gap < a).sum())}); the released chain-2 correlation reaches p < {a:g} at "
            f"{significant_signs_text(comp.layer, comp.rho_gap_comp, comp.p_gap_comp, alpha=a)}; the re-measured one, over "
            f"the layers that have a later MoE layer, at "
            f"{significant_signs_text(down.layer, down.rho_gap_down, down.p_gap_down, alpha=a)}. Mean downstream "
            f"compensation before the last layer: {span(pr.mean_down, '+.3g')} (released relative compensation: "
            f"{span(pr.mean_rel_comp, '.3g')}); per ablation the two measures correlate with ρ from {span(pr.rho)}.")


zero_last = {m: bool((rec[(rec.model == m) & (rec.layer == L)].downstream_compensation == 0).all())
             for m, L in last_moe_layer.items() if L in set(rec[rec.model == m].layer)}
display(Markdown("\n".join(map(summary_line, models))
                 + f"\n\nIn the authors' released records of the paper's checkpoints the released chain-2 correlation "
                   f"is positive at {count(paper_layers.rho_gap_comp > 0, 'layers')}. Last MoE layer: downstream compensation is exactly zero for every ablation in "
                   f"{sum(zero_last.values())} of {len(zero_last)} models (as it must be)."))

# %% [markdown]
# ## What this shows, and what it does not
# **Gap-norm scaling.** The gap norm is a deterministic product, $w_e(\mathbf{x}_t)\,\lVert E_e(\mathbf{x}_t)\rVert$,
# available from an un-ablated forward pass; the ablations confirm it. {glue:md}`growth_summary`
# Growth with depth says that later experts write larger vectors into the residual stream. It is a
# statement about magnitude in hidden space, not about the loss: the paper itself notes that Qwen
# shows a comparable growth without OLMoE's late-layer concentration of functional importance, so
# growth alone cannot be sufficient.
#
# **The first chain (routing weight → gap norm)** is partly built in: the gap norm *is* the routing weight
# times the expert's output norm, so experts with larger weights have larger gaps unless their
# output norms move the other way. A positive correlation shows that the weight is not cancelled
# by the norm; it is not independent evidence that the router "tracks" contribution.
#
# **The second chain, released measure.** The released relative compensation compares the removed vector
# with the *unchanged* outputs of the other experts at the same token. It cannot show compensation
# at all: nothing was re-routed or re-computed, and within a layer nothing can react to the
# removal. Its sign across experts is set by a race between the alignment of the remaining output
# with the removed one and the factor $1/\lVert\mathbf{g}\rVert$ in its definition:
# {glue:md}`race_summary` Reading a
# significant ρ(gap norm, rel. comp.) as "contributions reach logit space" is not supported by
# what the quantity computes.
#
# **The second chain, re-measured.** The downstream compensation intervenes (the expert is removed at t
# inside the forward pass) and re-measures every later MoE layer at t, so it shows whether later
# layers restore the removed contribution along its own direction. It does not capture
# restoration by attention or along directions other than $\mathbf{g}$, it says nothing about the
# loss directly, and it is zero by construction at the last MoE layer (the layer where the paper
# locates its effect), so it cannot speak to the last layer at all. For the paper's checkpoints
# this measure has not been computed; re-run this chapter with `models` set to the real
# checkpoint ids (on a GPU) to obtain it.

# %% tags=["remove-input"]
grow = ratios[ratios.model.isin(models)]
glue("growth_summary", Markdown(
    f"On the book's models the mean gap norm changes from first to last analysed layer by a factor of "
    f"{span(grow.ratio_last_first, '.2f')}, against {paper_ratios.loc['olmoe', 'ratio_last_first']:.1f} "
    f"(OLMoE) and {paper_ratios.loc['qwen', 'ratio_last_first']:.1f} (Qwen) in the released records."), display=False)

# %% [markdown]
# ## Exercises
# Each exercise changes parameters only. Predict first, then run the command from the repository
# root and compare with the expected result.
#
# ````{exercise} 1. Which experts count?
# :label: 07_mechanism-ex1
# :nonumber:
#
# Experts with few activations have noisy means. Predict what happens
# when an expert needs `min_activations 20` to enter: how many experts per layer remain on all
# tokens and on the ablation sample, at how many layers ρ(gap norm, downstream comp.) is still
# defined, and whether it and the released measure on the same sample keep their range and sign.
# Then run
#
# ```bash
# make chapter NB=07_mechanism PARAMS="-p min_activations 20"
# ```
# ````

# %% [markdown]
# ````{solution} 07_mechanism-ex1
# :class: dropdown
#
# The records are reused (the threshold only filters experts). {glue:md}`ex1_outcome`
# ````

# %% [markdown]
# ````{exercise} 2. Fewer ablations, same geometry
# :label: 07_mechanism-ex2
# :nonumber:
#
# Predict which columns of the tiny-olmoe table change when the
# ablation sample shrinks, then run
#
# ```bash
# make chapter NB=07_mechanism PARAMS="-p models '[\"tiny-olmoe\"]' -p n_positions 20"
# ```
# ````

# %% [markdown]
# ````{solution} 07_mechanism-ex2
# :class: dropdown
#
# The first three columns (mean gap norm, ρ(rw, gap norm) and the released measure) are computed on
# all tokens of the corpus, so they do not change: {glue:md}`ex2_fixed` Only the ablation-sample
# columns change. {glue:md}`ex2_bound`
# ````

# %% tags=["remove-input"]
ex1 = chain_correlations(expert_means(geo, min_activations=20))
ex1_abl = chains[["model", "layer"]].merge(chain_correlations(expert_means(rec_geo.drop(columns="prob"), min_activations=20),
                                                              pairs={"gap_down": ("mean_gap", "mean_down"),
                                                                     "gap_comp_abl": ("mean_gap", "mean_rel_comp")}), how="left")
ex1_abl["n_experts"] = ex1_abl.n_experts.fillna(0)
moved = float((ex1.rho_gap_comp - chains.rho_gap_comp).abs().max())
glue("ex1_outcome", Markdown(
    f"On all tokens a layer keeps {span(ex1.n_experts, '.0f')} experts (this run: {span(chains.n_experts, '.0f')}), and "
    + ("ρ(gap norm, rel. comp.) does not change" if moved < 5e-4 else f"ρ(gap norm, rel. comp.) moves by at most {moved:.3f}")
    + f"; it is negative at {count(ex1.rho_gap_comp < 0, 'layers')}. "
    f"On the ablation sample a layer keeps {span(ex1_abl.n_experts, '.0f')} experts (this run: {span(chains.n_experts_abl, '.0f')}), "
    f"and ρ(gap norm, downstream comp.) is undefined at {int(ex1_abl.rho_gap_down.isna().sum())} of {len(ex1_abl)} layers "
    f"(this run: {int(chains.rho_gap_down.isna().sum())}; at the last MoE layer it always is). Where it is defined it ranges "
    f"{span(ex1_abl.rho_gap_down)} (this run: {span(chains.rho_gap_down)}) and reaches p < {paper.PAPER_ALPHA:g} at "
    f"{report.plural(int((ex1_abl.p_gap_down < paper.PAPER_ALPHA).sum()), 'layer')} "
    f"(this run: {int((chains.p_gap_down < paper.PAPER_ALPHA).sum())}); "
    f"the released measure on the same sample ranges {span(ex1_abl.rho_gap_comp_abl)} (this run: "
    f"{span(chains.rho_gap_comp_abl)})."), display=False)
olmoe = chains[chains.model == "tiny-olmoe"].sort_values("layer") if "tiny-olmoe" in models else None
glue("ex2_fixed", Markdown("; ".join(f"L{r.layer}: mean gap norm {r.mean_gap:.3g}, ρ(rw, gap) {r.rho_rw_gap:+.3f}, "
                                     f"ρ(gap, rel. comp.) {r.rho_gap_comp:+.3f}" for r in olmoe.itertuples()) + "."
                           if olmoe is not None else "(tiny-olmoe is not among this run's models)"), display=False)
top_k = {r["model"]: r["top-k"] for r in info}
n_abl = 20 * top_k.get("tiny-olmoe", 0)
glue("ex2_bound", Markdown(
    f"With 20 positions there are 20 × {top_k['tiny-olmoe']} = {n_abl} ablations per layer, so at most "
    f"{n_abl // min_activations} experts can reach `min_activations` = {min_activations} and enter those columns "
    f"(this run: {span(olmoe.n_experts_abl, '.0f')})." if olmoe is not None else ""), display=False)
