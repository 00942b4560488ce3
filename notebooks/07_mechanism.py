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
# The paper explains its one surviving signal (routing weight at the last OLMoE layer) with two
# observations (Section 3, "Mechanism"; Appendix A.3, Table 7 and Figure 2):
#
# 1. **Gap-norm scaling.** Removing one active expert e at token t changes the MoE output by the
#    *gap* $\mathbf{g} = \mathbf{y}_t - \mathbf{y}_t^{(-e)} = g_e(\mathbf{x}_t)\,E_e(\mathbf{x}_t)$,
#    because nothing else in the block reacts (the other combine weights are not renormalised).
#    The paper reports that the mean gap norm $\lVert\mathbf{g}\rVert$ grows about 41× from the
#    first to the last layer of OLMoE and about 38× in Qwen1.5-MoE.
# 2. **Two correlation chains across experts**, at each layer: the Spearman correlation between an
#    expert's mean routing weight and its mean gap norm (*does the router track how much the
#    expert contributes?*), and between its mean gap norm and its mean "relative compensation"
#    (*does that contribution survive?*).
#
# This chapter recomputes both on the book's models and examines what the second chain measures.
# The released implementation defines, for each active (t, e),
#
# $$\text{rel. comp.} = \frac{\max(\langle \mathbf{g}, \mathbf{r}\rangle, 0)}{\lVert\mathbf{g}\rVert^2},
# \qquad \mathbf{r} = \mathbf{y}_t - \mathbf{g} \;\text{(the other routed experts' weighted sum plus the shared experts)},$$
#
# averaged over the tokens that route to e. Nothing is re-routed or re-computed after the
# removal, so $\mathbf{r}$ is exactly what the other experts produced *before* the ablation: the
# quantity describes the static geometry of the remaining outputs relative to the removed one,
# not a response to the removal. Within a layer there is in fact nothing that could respond: the
# router has already chosen and the other weights stay as they are.
#
# A measure that *does* re-measure the computation after the ablation is the **downstream
# compensation**: ablate e at t inside the forward pass, re-read every later MoE layer's output at
# t, and project the change onto the removed contribution,
#
# $$c_{\text{down}} = \sum_{L' > L} \frac{\langle \mathbf{y}'_{L'} - \mathbf{y}_{L'},\, \mathbf{g}\rangle}{\lVert\mathbf{g}\rVert^2},$$
#
# where $\mathbf{y}'_{L'}$ is the ablated run's output. It is 1 when later MoE layers put the
# removed contribution fully back, 0 when they do not react along it, and negative when they
# amplify the loss. By construction it is 0 at the last MoE layer, where no later MoE layer
# exists. The chapter computes both measures side by side.

# %% tags=["parameters"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: every MoE layer of each model; or a list used for every model
n_positions = 200  # token positions for the ablation (downstream) measure
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
min_activations = 5  # an expert enters a correlation only with at least this many activations
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display
from scipy import stats as sps

from moeaudit import released, report
from moeaudit.audit import prepare, single_expert_records
from moeaudit.engine import expert_outputs

report.use_book_style()
corpus_source = report.show_corpus(corpus, data_dir=data_dir)


def stars(p) -> str:
    """The paper's significance markers."""
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def spearman_rho(x, y):
    """Spearman rho and two-sided p across experts; NaN when undefined (fewer than 3 experts or a
    constant column)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, int(len(x))
    res = sps.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue), int(len(x))


@torch.no_grad()
def block_geometry(ctx, moe_layers, *, batch_size: int) -> pd.DataFrame:
    """For every real token and active expert at each layer: the gap g = w_e E_e(x_t), its norm, and
    the released 'relative compensation' max(<g, r>, 0) / ||g||^2 with r = y_t - g.

    One un-ablated forward over the corpus saves the MoE input x_t and output y_t of each layer;
    expert outputs are recomputed from the fused weights at the clean pass's routing.
    ``norm_check`` is the relative difference between the recomputed ||E_e(x_t)|| and the clean
    pass's stored norm (it confirms that the rows are aligned)."""
    model, corpus, clean = ctx.model, ctx.corpus, ctx.clean
    parts = {L: [] for L in moe_layers}
    lengths = corpus.lengths
    for start in range(0, len(corpus), batch_size):
        seq_ids = list(range(start, min(start + batch_size, len(corpus))))
        ids, mask = corpus.padded(seq_ids, pad_id=model.pad_id)
        saved = {}
        with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)):
            for L in moe_layers:
                mlp = model.layers()[L].mlp
                saved[L] = (mlp.input.save(), mlp.output.save())
        real = mask.reshape(-1).bool().to(model.device)
        rows = clean.row(np.repeat(seq_ids, lengths[seq_ids]),
                         np.concatenate([np.arange(lengths[s]) for s in seq_ids]))
        for L in moe_layers:
            x, y = saved[L]
            x = x.reshape(-1, x.shape[-1])[real]
            y = y.reshape(-1, y.shape[-1])[real].float()
            route = clean.routing[L]
            idx = torch.from_numpy(route["indices"][rows]).to(x.device)
            w = torch.from_numpy(route["weight"][rows]).to(x.device, torch.float32)
            E = expert_outputs(model.hf.model.layers[L].mlp.experts, x, idx).float()
            g = w[..., None] * E
            gap = torch.linalg.vector_norm(g, dim=-1)
            r = y[:, None, :] - g
            rel = torch.clamp((g * r).sum(-1), min=0) / gap.pow(2)
            enorm = torch.linalg.vector_norm(E, dim=-1).cpu().numpy()
            k = idx.shape[1]
            parts[L].append(pd.DataFrame({
                "layer": L, "row": np.repeat(rows, k), "slot": np.tile(np.arange(k), len(rows)),
                "expert": route["indices"][rows].reshape(-1), "prob": route["prob"][rows].reshape(-1),
                "weight": route["weight"][rows].reshape(-1), "gap_norm": gap.cpu().numpy().reshape(-1),
                "rel_comp": rel.cpu().numpy().reshape(-1),
                "norm_check": (np.abs(enorm - route["norm"][rows]) / np.maximum(route["norm"][rows], 1e-30)).reshape(-1),
            }))
    return pd.concat([pd.concat(p, ignore_index=True) for p in parts.values()], ignore_index=True)


# %% [markdown]
# ## Data
# For each model: the clean pass over the evaluation corpus (routing, combine weights, expert
# output norms), one more un-ablated forward that saves every MoE block's input and output (for
# the released measure, over **all** tokens of the corpus, as in the paper), and single-expert
# ablations of every active expert at `n_positions` sampled positions and every MoE layer with
# the later MoE outputs re-measured (for the downstream measure). Ablation records are cached on
# disk under a key made of every parameter that produced them.

# %%
geo_all, rec_all, info, last_moe_layer = [], [], [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    ctx.model.hf.config.output_router_logits = False  # no auxiliary balancing loss during analysis forwards
    lay = ctx.model.layout
    moe = list(layers) if layers is not None else list(lay.moe_layers)
    depth = dict(zip(moe, report.relative_depth(moe, lay.moe_layers)))
    last_moe_layer[name] = lay.moe_layers[-1]
    geo = block_geometry(ctx, moe, batch_size=batch_size)
    geo.insert(0, "model", name)
    rec = single_expert_records(ctx, layers=moe, n_positions=n_positions, seed=seed, mode=mode,
                                batch_size=batch_size, downstream=True)
    rec["row"] = ctx.clean.row(rec.seq_id.to_numpy(), rec.t.to_numpy())
    rec["norm"] = [float(ctx.clean.routing[L]["norm"][r][ctx.clean.routing[L]["indices"][r] == e][0])
                   for L, r, e in zip(rec.layer, rec.row, rec.expert)]
    for df in (geo, rec):
        df["rel_depth"] = df.layer.map(depth)
    geo_all.append(geo)
    rec_all.append(rec)
    info.append({"model": name, "family": lay.family, "MoE layers": len(lay.moe_layers),
                 "analysed layers": ", ".join(map(str, moe)), "routed experts": lay.num_experts,
                 "top-k": lay.top_k, "shared experts": lay.n_shared_experts,
                 "tokens": len(ctx.clean.tokens), "active (t, e) pairs per layer": len(ctx.clean.tokens) * lay.top_k,
                 "ablations (downstream)": len(rec)})
geo = pd.concat(geo_all, ignore_index=True)
rec = pd.concat(rec_all, ignore_index=True)
display(pd.DataFrame(info).set_index("model").style.format(thousands=","))

# %% [markdown]
# ### Check: the gap is the removed weighted expert output
# The gap norm can be computed for every active (t, e) without running an ablation, as
# $w_e(\mathbf{x}_t)\cdot\lVert E_e(\mathbf{x}_t)\rVert$ from the clean pass. The ablation records
# measure it directly as the difference of the MoE outputs of a clean and an ablated row of the
# same batch. The table gives the relative difference between the two (and between the expert
# norms recomputed here and those stored by the clean pass, which confirms that every token row is
# aligned).

# %%
rec["gap_from_clean"] = rec.weight * rec.norm
rel_diff = (rec.gap_norm - rec.gap_from_clean).abs() / rec.gap_from_clean
check = pd.DataFrame({
    "ablations": rec.groupby("model", sort=False).size(),
    "median |measured − w·‖E‖| / w·‖E‖": rel_diff.groupby(rec.model, sort=False).median(),
    "max |measured − w·‖E‖| / w·‖E‖": rel_diff.groupby(rec.model, sort=False).max(),
    "max |recomputed ‖E‖ − stored ‖E‖| / stored": geo.groupby("model", sort=False).norm_check.max(),
})
display(check.style.format({c: "{:.2e}" for c in check.columns if c != "ablations"}))
worst = rel_diff.max()
display(Markdown(
    f"Largest relative disagreement over all {len(rec):,} ablations: {worst:.1e} "
    + ("(floating-point rounding: in token mode the ablation removes exactly $w_e E_e(\\mathbf{x}_t)$ "
       "and nothing else at t)." if mode == "token" else
       "(in sequence mode the expert is also removed at earlier positions, which changes the MoE input "
       "at t, so the measured gap can differ from the clean-pass value).")))

# %% [markdown]
# ## Gap-norm scaling across depth
# Mean gap norm per layer, with the paper's convention (Table 7): the mean over experts of each
# expert's mean gap norm over the tokens that route to it (experts with at least
# `min_activations` activations). The paper's values for its checkpoints are read from the
# authors' released per-expert records where they are available.

# %%
per_expert = (geo.groupby(["model", "layer", "rel_depth", "expert"], sort=False)
              .agg(n=("gap_norm", "size"), mean_rw=("prob", "mean"), mean_gap=("gap_norm", "mean"),
                   mean_rel_comp=("rel_comp", "mean"))
              .reset_index())
per_expert = per_expert[per_expert.n >= min_activations]
gap_depth = (per_expert.groupby(["model", "layer", "rel_depth"], sort=False)
             .agg(experts=("expert", "size"), mean_gap=("mean_gap", "mean")).reset_index())

try:
    paper = released.redistribution(data_dir=data_dir)
    paper_source = released.released_source(data_dir).describe()
    paper["rel_depth"] = paper.groupby("model").layer.transform(lambda s: s / s.max())
    paper["label"] = paper.model.map({"olmoe": "paper: OLMoE-1B-7B", "qwen": "paper: Qwen1.5-MoE-A2.7B"})
except released.ReleasedDataUnavailable:
    paper = None


def ratio_rows(df, label_col, gap_col):
    out = []
    for m, s in df.sort_values("layer").groupby(label_col, sort=False):
        first, last = s.iloc[0], s.iloc[-1]
        out.append({"model": m, "first layer": int(first.layer), "last layer": int(last.layer),
                    "mean gap norm, first": first[gap_col], "mean gap norm, last": last[gap_col],
                    "ratio last / first": last[gap_col] / first[gap_col],
                    "ratio largest / smallest layer": s[gap_col].max() / s[gap_col].min()})
    return out


ratios = pd.DataFrame(ratio_rows(gap_depth, "model", "mean_gap")
                      + (ratio_rows(paper, "label", "mean_gap_norm") if paper is not None else []))
display(ratios.set_index("model").style.format({"mean gap norm, first": "{:.3g}", "mean gap norm, last": "{:.3g}",
                                                 "ratio last / first": "{:.1f}×",
                                                 "ratio largest / smallest layer": "{:.1f}×"}))
if paper is not None:
    display(Markdown(f"*The paper's rows are read from {paper_source}.*"))

# %%
colors = report.model_colors(models)
fig, ax = plt.subplots(figsize=(7.5, 4.4))
for m in models:
    s = gap_depth[gap_depth.model == m].sort_values("rel_depth")
    ax.plot(s.rel_depth, s.mean_gap, marker="o", color=colors[m], label=m)
if paper is not None:
    for (lab, s), mk, shade in zip(paper.groupby("label", sort=False), ("s", "D"), ("0.25", "0.55")):
        s = s.sort_values("rel_depth")
        ax.plot(s.rel_depth, s.mean_gap_norm, marker=mk, ls="--", color=shade, ms=4, label=lab)
ax.set_yscale("log")
ax.set_xlabel("relative depth of the MoE layer (0 = first, 1 = last)")
ax.set_ylabel(r"mean gap norm $\|\mathbf{y}_t-\mathbf{y}_t^{(-e)}\|$ (log scale)")
ax.set_title("Gap norm under single-expert ablation across depth")
ax.legend(fontsize=8, loc="best")
fig.tight_layout()

# %%
lines = []
for _, r in ratios.iterrows():
    q = r["ratio last / first"]
    change = (f"it grows {q:.1f}×" if q >= 1.1 else f"it shrinks to {q:.2f} of its first value" if q <= 0.9
              else f"it stays about the same (ratio {q:.2f})")
    lines.append(f"- **{r.model}**: from {r['mean gap norm, first']:.3g} at layer {r['first layer']} to "
                 f"{r['mean gap norm, last']:.3g} at layer {r['last layer']}; {change}.")
display(Markdown("The mean gap norm, first to last analysed MoE layer:\n\n" + "\n".join(lines)
                 + "\n\nThe first-to-last ratio summarises the whole depth profile only when the profile is "
                   "monotone; the last column of the table (largest over smallest layer) shows how far it moves "
                   "in between. Absolute gap norms depend on each model's hidden size and "
                   "residual-stream scale, so only ratios compare across models; on the log axis equal vertical "
                   "distances are equal ratios."))

# %% [markdown]
# ## The two correlation chains (Table 7 layout)
# For each model and layer, correlations are Spearman ρ across experts (each expert with at least
# `min_activations` activations), with the paper's markers: \* p < 0.05, \*\* p < 0.01,
# \*\*\* p < 0.001 (two-sided, uncorrected, as in the paper). Rows:
#
# - **Mean gap norm** — as above (all tokens of the corpus).
# - **ρ(rw, gap norm)** — mean routing weight $g_e(\mathbf{x}_t)$ (the router's softmax probability,
#   averaged over the tokens that select e: the paper's definition) vs mean gap norm (all tokens).
# - **ρ(gap norm, rel. comp.) — released measure** — mean gap norm vs the released "relative
#   compensation" (all tokens).
# - **ρ(gap norm, downstream comp.) — re-measured** — mean measured gap norm vs mean downstream
#   compensation, over the single-expert ablations at the sampled positions.
# - **ρ(gap norm, rel. comp.) — released, ablation sample** — the released measure restricted to
#   the very (t, e) pairs that were ablated, so that the two measures can be compared on the same
#   data and differences are not a matter of sample size.

# %%
rec_geo = rec.merge(geo[["model", "layer", "row", "expert", "rel_comp"]], on=["model", "layer", "row", "expert"],
                    how="left")
per_expert_abl = (rec_geo.groupby(["model", "layer", "rel_depth", "expert"], sort=False)
                  .agg(n=("gap_norm", "size"), mean_gap=("gap_norm", "mean"),
                       mean_down=("downstream_compensation", "mean"), mean_rel_comp=("rel_comp", "mean"))
                  .reset_index())
per_expert_abl = per_expert_abl[per_expert_abl.n >= min_activations]

chain_rows = []
for (m, L, d), s in per_expert.groupby(["model", "layer", "rel_depth"], sort=False):
    a = per_expert_abl[(per_expert_abl.model == m) & (per_expert_abl.layer == L)]
    row = {"model": m, "layer": L, "rel_depth": d, "mean_gap": s.mean_gap.mean(), "n_experts": len(s),
           "n_experts_abl": len(a), "mean_rel_comp": s.mean_rel_comp.mean(),
           "mean_down": a.mean_down.mean() if len(a) else np.nan}
    for key, x, y in (("rw_gap", s.mean_rw, s.mean_gap), ("gap_comp", s.mean_gap, s.mean_rel_comp),
                      ("gap_down", a.mean_gap, a.mean_down), ("gap_comp_abl", a.mean_gap, a.mean_rel_comp)):
        row[f"rho_{key}"], row[f"p_{key}"], _ = spearman_rho(x, y)
    chain_rows.append(row)
chains = pd.DataFrame(chain_rows)
down_is_zero = {m: bool((rec[(rec.model == m) & (rec.layer == L)].downstream_compensation == 0).all())
                for m, L in last_moe_layer.items() if L in set(rec[rec.model == m].layer)}

ROWS = [("mean_gap", None, "Mean gap norm"),
        ("rho_rw_gap", "p_rw_gap", "ρ(rw, gap norm)"),
        ("rho_gap_comp", "p_gap_comp", "ρ(gap norm, rel. comp.) — released measure"),
        ("rho_gap_down", "p_gap_down", "ρ(gap norm, downstream comp.) — re-measured"),
        ("rho_gap_comp_abl", "p_gap_comp_abl", "ρ(gap norm, rel. comp.) — released, ablation sample")]


def table7(m):
    c = chains[chains.model == m].sort_values("layer")
    out = {}
    for r in c.itertuples():
        col = {}
        for key, pkey, label in ROWS:
            v = getattr(r, key)
            if pkey is None:
                col[label] = f"{v:.3g}"
            elif key == "rho_gap_down" and r.layer == last_moe_layer[m]:
                col[label] = "0 by construction"
            elif not np.isfinite(v):
                col[label] = "n/a"
            else:
                col[label] = f"{v:+.3f}{stars(getattr(r, pkey))}"
        out[f"L{r.layer}"] = col
    return pd.DataFrame(out)


for m in models:
    c = chains[chains.model == m]
    display(Markdown(f"### {m}"))
    display(table7(m).style.set_caption(
        f"{m}: correlations across experts (N = {c.n_experts.min()}–{c.n_experts.max()} experts on all tokens; "
        f"{c.n_experts_abl.min()}–{c.n_experts_abl.max()} on the ablation sample of {n_positions} positions)")
        .set_properties(**{"text-align": "center"}))

# %% [markdown]
# "n/a": the correlation is undefined (fewer than three experts pass `min_activations`, or one
# column is constant). At the last MoE layer the downstream compensation is exactly zero for every
# ablation, so no correlation with it exists.

# %%
if paper is not None:
    display(Markdown("For reference, the same rows as stored in the authors' released per-layer "
                     "records (the paper's Table 7 is the Qwen part; the OLMoE rows are its Figure 2). "
                     "In the released implementation the router rows (flattened over batch × sequence, "
                     "padding included) are paired with the masked expert-output rows, so after the first "
                     "padded sequence the routing weights belong to other tokens; the stored ρ(rw, gap norm) "
                     "is therefore not exactly the quantity it names."))
    ref = {}
    for lab, s in paper.sort_values("layer").groupby("label", sort=False):
        for r in s.itertuples():
            ref[(lab, f"L{r.layer}")] = {"Mean gap norm": f"{r.mean_gap_norm:.3g}",
                                        "ρ(rw, gap norm)": f"{r.rho_rw_gap:+.3f}{stars(r.p_rw_gap)}",
                                        "ρ(gap norm, rel. comp.) — released measure":
                                            f"{r.rho_gap_comp:+.3f}{stars(r.p_gap_comp)}"}
    ref = pd.DataFrame(ref)
    for lab in ref.columns.get_level_values(0).unique():
        display(ref[lab].style.set_caption(lab).set_properties(**{"text-align": "center"}))

# %% [markdown]
# ## Figure 2: both chains across depth
# Left: routing weight vs gap norm. Right: gap norm vs compensation, with the released measure
# (solid) and the re-measured downstream compensation (dashed; undefined at the last MoE layer).
# Markers above points: significance as in the tables. Grey: the paper's checkpoints from the
# released records (released measure).

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)


def chain_line(ax, s, rho, p, color, **kw):
    s = s.sort_values("rel_depth")
    ok = np.isfinite(s[rho])
    ax.plot(s.rel_depth[ok], s[rho][ok], color=color, **kw)
    for x, y, pv in zip(s.rel_depth[ok], s[rho][ok], s[p][ok]):
        if stars(pv):
            ax.annotate(stars(pv), (x, y), textcoords="offset points", xytext=(0, 4), ha="center",
                        color=color, fontsize=7)


for m in models:
    s = chains[chains.model == m]
    chain_line(axes[0], s, "rho_rw_gap", "p_rw_gap", colors[m], marker="o", label=m)
    chain_line(axes[1], s, "rho_gap_comp", "p_gap_comp", colors[m], marker="o", label=m)
    chain_line(axes[1], s, "rho_gap_down", "p_gap_down", colors[m], marker="s", ls="--", mfc="white",
               label=f"{m}: re-measured downstream comp.")
if paper is not None:
    for (lab, s), mk, shade in zip(paper.groupby("label", sort=False), ("s", "D"), ("0.25", "0.55")):
        chain_line(axes[0], s, "rho_rw_gap", "p_rw_gap", shade, marker=mk, ms=3, lw=1, ls=":", label=lab)
        chain_line(axes[1], s, "rho_gap_comp", "p_gap_comp", shade, marker=mk, ms=3, lw=1, ls=":", label=lab)
for ax, title in zip(axes, ("routing weight → gap norm", "gap norm → compensation\n(solid: released measure; dashed: re-measured)")):
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel("relative depth of the MoE layer (0 = first, 1 = last)")
    ax.set_title(title)
    ax.set_ylim(-1.05, 1.1)
axes[0].set_ylabel("Spearman ρ across experts")
handles, labels = axes[1].get_legend_handles_labels()
fig.suptitle("Redistribution analysis: the two correlation chains across depth")
fig.tight_layout()
_ = fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(3, len(labels)), fontsize=8,
           frameon=False)

# %% [markdown]
# ## What the two measures say on average
# Beyond the rank correlations, the size of each measure matters. The table gives, per layer, the
# mean over the ablated (t, e) pairs of the released relative compensation and of the downstream
# compensation, the share of ablations after which later layers moved back along the removed vector,
# and the rank correlation between the two measures over the individual ablations (the same
# (t, e) pairs): if the released quantity tracked real compensation, the two would be positively related. At the
# last MoE layer the downstream measure is identically zero, so that correlation is "n/a".

# %%
per_record = []
for (m, L), s in rec_geo.groupby(["model", "layer"], sort=False):
    rho, p, n = spearman_rho(s.rel_comp, s.downstream_compensation)
    per_record.append({"model": m, "layer": L, "ablations": n,
                       "mean rel. comp. (released)": s.rel_comp.mean(),
                       "mean downstream comp.": s.downstream_compensation.mean(),
                       "share of ablations with downstream comp. > 0": (s.downstream_compensation > 0).mean(),
                       "ρ(released, downstream) per ablation": rho, "p": p})
per_record = pd.DataFrame(per_record)
display(per_record.set_index(["model", "layer"]).style.format(
    {"mean rel. comp. (released)": "{:.3g}", "mean downstream comp.": "{:+.3g}",
     "share of ablations with downstream comp. > 0": "{:.0%}", "ρ(released, downstream) per ablation": "{:+.3f}",
     "p": "{:.2g}"}, na_rep="n/a"))

# %%
def span(v) -> str:
    v = np.asarray(v, float)
    return f"{np.nanmin(v):+.3g} to {np.nanmax(v):+.3g} across layers"


def summary_lines():
    out = []
    for m in models:
        c = chains[chains.model == m].sort_values("layer")
        rw = c.dropna(subset=["rho_rw_gap"])
        n_sig_rw = int((rw.p_rw_gap < 0.05).sum())
        comp = c.dropna(subset=["rho_gap_comp"])
        n_sig_comp = int((comp.p_gap_comp < 0.05).sum())
        down = c[(c.layer != last_moe_layer[m])].dropna(subset=["rho_gap_down"])
        n_sig_down = int((down.p_gap_down < 0.05).sum())
        pr = per_record[(per_record.model == m) & (per_record.layer != last_moe_layer[m])]
        out.append(
            f"- **{m}**: ρ(rw, gap) is positive at {int((rw.rho_rw_gap > 0).sum())} of {len(rw)} layers "
            f"(p < 0.05 at {n_sig_rw}); the released chain-2 correlation reaches p < 0.05 at {n_sig_comp} of "
            f"{len(comp)} layers, the re-measured one at {n_sig_down} of {len(down)} layers that have a later MoE "
            f"layer. Mean downstream compensation before the last layer: "
            f"{span(pr['mean downstream comp.'])} (released relative compensation: "
            f"{span(pr['mean rel. comp. (released)'])}); "
            f"per ablation the two measures correlate with ρ from "
            f"{pr['ρ(released, downstream) per ablation'].min():+.2f} to "
            f"{pr['ρ(released, downstream) per ablation'].max():+.2f}." if len(pr) else
            f"- **{m}**: only the last MoE layer was analysed, so no downstream measure exists.")
    return "\n".join(out)


display(Markdown(summary_lines()))
display(Markdown(f"Last MoE layer: downstream compensation is exactly zero for every ablation in "
                 f"{sum(down_is_zero.values())} of {len(down_is_zero)} models (as it must be)."))

# %% [markdown]
# ## What this shows, and what it does not
# **Gap-norm scaling.** The gap norm is a deterministic product, $w_e(\mathbf{x}_t)\,\lVert E_e(\mathbf{x}_t)\rVert$,
# available from an un-ablated forward pass; the ablations confirm it. Its growth with depth
# says that later experts write larger vectors into the residual stream. It is a statement about
# magnitude in hidden space, not about the loss: the paper itself notes that Qwen shows a
# comparable growth without OLMoE's late-layer concentration of functional importance, so growth
# alone cannot be sufficient. The same caution applies to the book's models, whose absolute gap
# norms depend on their hidden size and residual-stream scale.
#
# **Chain 1 (routing weight → gap norm)** is partly built in: the gap norm *is* the routing weight
# times the expert's output norm, so experts with larger weights have larger gaps unless their
# output norms move the other way. A positive correlation shows that the weight is not
# cancelled by the norm; it is not independent evidence that the router "tracks" contribution.
#
# **Chain 2, released measure.** The released relative compensation compares the removed vector
# with the *unchanged* outputs of the other experts at the same token. It cannot show compensation
# at all: nothing was re-routed or re-computed, and within a layer nothing can react to the
# removal. It describes how aligned the remaining MoE output is with the removed one. Its
# denominator is $\lVert\mathbf{g}\rVert^2$, so its correlation with the gap norm also mixes in the
# gap norm itself (for fixed remaining outputs, a larger gap lowers the ratio). Reading a
# significant ρ(gap norm, rel. comp.) as "contributions reach logit space" is not supported by
# what the quantity computes.
#
# **Chain 2, re-measured.** The downstream compensation intervenes (the expert is removed at t
# inside the forward pass) and re-measures every later MoE layer at t, so it shows whether later
# layers restore the removed contribution along its own direction. It does not capture
# restoration by attention or by directions other than $\mathbf{g}$, it says nothing about the loss
# directly, and it is zero by construction at the last MoE layer — the layer where the paper
# locates its effect — so it cannot speak to the last layer at all. For the paper's checkpoints
# this measure has not been computed; re-run this chapter with `models` set to the real checkpoint
# ids (on a GPU) to obtain it.
