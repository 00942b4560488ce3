"""Chapter 7 (the mechanism; the paper's Section 3 "Mechanism", Appendix A.3, Table 7 and Figure 2):
the block geometry of each ablation (gap, compensation cosine, relative compensation, as the released
redistribution scripts define them), the chain correlations, the compensation factors, and the
chapter's sentence builders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..audit import AuditContext
from ..engine import block_input_in_trace, block_output_in_trace, expert_outputs
from ..stats import spearman_defined


def relative_compensation(g: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The released redistribution quantities of removed contributions ``g`` within outputs ``y``.

    ``g`` (..., H) is the removed weighted expert output ``w_e E_e(x_t)`` (the gap), ``y`` (..., H)
    the MoE block output it is part of (broadcast against ``g``), so the remaining output is
    ``r = y - g``. Returns float32 tensors of shape ``g.shape[:-1]``:

    - ``gap_norm`` = ||g||,
    - ``r_norm`` = ||r||,
    - ``cos`` = <g, r> / (||g|| ||r||) (the released ``compensation_cosine``; NaN where a norm is 0),
    - ``rel_comp`` = max(<g, r>, 0) / ||g||^2 = max(cos, 0) · ||r|| / ||g|| (the released
      ``relative_compensation``; inf or NaN where ||g|| = 0).

    Nothing is re-computed after the removal: ``r`` is what the other experts (and any shared
    experts) produced in the clean pass, so these describe geometry, not a response.
    """
    g, y = g.float(), y.float()
    r = y - g
    dot = (g * r).sum(-1)
    gap = torch.linalg.vector_norm(g, dim=-1)
    rn = torch.linalg.vector_norm(r, dim=-1)
    return {"gap_norm": gap, "r_norm": rn, "cos": dot / (gap * rn),
            "rel_comp": torch.clamp(dot, min=0) / gap.pow(2)}


@torch.no_grad()
def block_geometry(ctx: AuditContext, layers, *, batch_size: int = 64) -> pd.DataFrame:
    """:func:`relative_compensation` for every real token and active routed expert at each of ``layers``.

    One un-ablated nnsight trace per batch saves each MoE block's input ``x_t`` and output ``y_t``;
    expert outputs ``E_e(x_t)`` are recomputed
    (:func:`moeaudit.engine.expert_outputs`, through the model's own experts module) at the clean pass's routing, and ``g = w_e E_e(x_t)``
    with the combine weight ``w_e``. One row per (layer, token row, slot): ``layer``, ``row`` (the
    clean pass's token row), ``slot``, ``expert``, ``prob`` (router probability), ``weight``,
    ``gap_norm``, ``r_norm``, ``cos``, ``rel_comp``, and ``norm_check`` = |recomputed ||E_e|| -
    stored ||E_e||| / stored ||E_e|| (small when every row is aligned with the clean pass).
    ``ValueError`` for a layer that is not a MoE layer.
    """

    for L in layers:
        ctx.model.layout.check_layer(L)
    model, corpus, clean = ctx.model, ctx.corpus, ctx.clean
    parts: dict[int, list[pd.DataFrame]] = {L: [] for L in layers}
    lengths = corpus.lengths
    for start in range(0, len(corpus), batch_size):
        seq_ids = list(range(start, min(start + batch_size, len(corpus))))
        ids, mask = corpus.padded(seq_ids, pad_id=model.pad_id)
        saved = {}
        with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)):
            for L in layers:
                saved[L] = (block_input_in_trace(model, L).save(), block_output_in_trace(model, L).save())
        real = mask.reshape(-1).bool().to(model.device)
        rows = clean.row(np.repeat(seq_ids, lengths[seq_ids]), np.concatenate([np.arange(lengths[s]) for s in seq_ids]))
        for L in layers:
            x, y = (v.reshape(-1, v.shape[-1])[real] for v in saved[L])
            route = clean.routing[L]
            idx = torch.from_numpy(route["indices"][rows]).to(x.device)
            w = torch.from_numpy(route["weight"][rows]).to(x.device, torch.float32)
            E = expert_outputs(model.hf_experts(L), x, idx, call=model.layout.spec.experts_call).float()
            q = {k: v.cpu().numpy().reshape(-1) for k, v in relative_compensation(w[..., None] * E, y[:, None, :]).items()}
            enorm = torch.linalg.vector_norm(E, dim=-1).cpu().numpy().reshape(-1)
            stored = route["norm"][rows].reshape(-1)
            k = idx.shape[1]
            parts[L].append(pd.DataFrame({
                "layer": L, "row": np.repeat(rows, k), "slot": np.tile(np.arange(k), len(rows)),
                "expert": route["indices"][rows].reshape(-1), "prob": route["prob"][rows].reshape(-1),
                "weight": route["weight"][rows].reshape(-1), **q,
                "norm_check": np.abs(enorm - stored) / np.maximum(stored, 1e-30)}))
    return pd.concat([pd.concat(p, ignore_index=True) for p in parts.values()], ignore_index=True)


#: per-expert means of :func:`block_geometry` rows (or ablation records) used by :func:`expert_means`
_EXPERT_MEANS = {"mean_rw": "prob", "mean_gap": "gap_norm", "mean_rel_comp": "rel_comp", "mean_cos": "cos",
                 "mean_r_over_g": "r_over_g", "mean_down": "downstream_compensation"}


def expert_means(rows: pd.DataFrame, *, min_activations: int, by=("model", "layer")) -> pd.DataFrame:
    """Per-expert means over the tokens that route to each expert (the paper's Table 7 convention).

    ``rows``: one row per active (token, expert), e.g. :func:`block_geometry` rows or ablation
    records, with ``expert`` and any of ``prob``, ``gap_norm``, ``rel_comp``, ``cos``,
    ``r_norm`` and ``downstream_compensation``. Returns one row per (``by``..., expert) with ``n``
    (activations) and, for each column present, ``mean_rw``, ``mean_gap``, ``mean_rel_comp``,
    ``mean_cos``, ``mean_r_over_g`` (mean of ||r|| / ||g||), ``mean_down``; experts with fewer
    than ``min_activations`` activations are dropped. ``ValueError`` if ``min_activations < 1``.
    """
    if min_activations < 1:
        raise ValueError(f"min_activations must be >= 1, got {min_activations}")
    rows = rows.copy()
    if "r_norm" in rows and "gap_norm" in rows:
        rows["r_over_g"] = rows.r_norm / rows.gap_norm
    keys = [*by, "expert"]
    agg = {"n": ("expert", "size"), **{k: ("_x_" + c, "mean") for k, c in _EXPERT_MEANS.items() if c in rows}}
    rows = rows.rename(columns={c: "_x_" + c for c in _EXPERT_MEANS.values() if c in rows})
    out = rows.groupby(keys, sort=False).agg(**agg).reset_index()
    return out[out.n >= min_activations].reset_index(drop=True)


def layer_gap_ratios(per_layer: pd.DataFrame, *, label: str = "model", gap: str = "mean_gap") -> pd.DataFrame:
    """First-to-last and largest-to-smallest ratios of a per-layer mean gap norm, one row per ``label``.

    ``per_layer`` has ``label``, ``layer`` and ``gap`` (one row per layer). Columns: ``label``,
    ``first_layer``, ``last_layer``, ``gap_first``, ``gap_last``, ``ratio_last_first``
    (``gap_last / gap_first``: the paper's "41×" for OLMoE, "38×" for Qwen), ``ratio_max_min``.
    """
    out = []
    for m, s in per_layer.sort_values("layer").groupby(label, sort=False):
        first, last = s.iloc[0], s.iloc[-1]
        out.append({label: m, "first_layer": int(first.layer), "last_layer": int(last.layer),
                    "gap_first": float(first[gap]), "gap_last": float(last[gap]),
                    "ratio_last_first": float(last[gap] / first[gap]),
                    "ratio_max_min": float(s[gap].max() / s[gap].min())})
    return pd.DataFrame(out)


#: the correlation pairs of the redistribution analysis: key -> (x column, y column) of :func:`expert_means`
CHAIN_PAIRS: dict[str, tuple[str, str]] = {
    "rw_gap": ("mean_rw", "mean_gap"),            # chain 1: routing weight -> gap norm
    "gap_comp": ("mean_gap", "mean_rel_comp"),    # chain 2, the released measure
    "gap_cos": ("mean_gap", "mean_cos"),          # its factor max(cos, 0) (released: compensation_cosine)
    "gap_rg": ("mean_gap", "mean_r_over_g"),      # its factor ||r|| / ||g||
    "gap_down": ("mean_gap", "mean_down"),        # chain 2, re-measured downstream
}


def chain_correlations(per_expert: pd.DataFrame, *, pairs=None, by=("model", "layer")) -> pd.DataFrame:
    """Spearman correlations across experts, per group ``by`` (the paper's Table 7 and Figure 2).

    ``per_expert``: one row per expert (an :func:`expert_means` result, or the released per-expert
    records renamed to its columns). ``pairs`` maps a key to an (x, y) column pair (default: every
    pair of :data:`CHAIN_PAIRS` whose columns are present). Returns one row per group with
    ``n_experts``, the group mean of ``mean_gap`` (and of ``mean_rel_comp`` and ``mean_down`` when
    present), and ``rho_<key>``, ``p_<key>`` (two-sided, uncorrected) from
    :func:`moeaudit.stats.spearman_defined`: NaN when fewer than 3 experts or a constant column.
    An empty ``per_expert`` (no expert passed ``min_activations``) gives an empty frame with these columns.
    """

    if pairs is None:
        pairs = {k: v for k, v in CHAIN_PAIRS.items() if set(v) <= set(per_expert.columns)}
    rows = []
    for key, s in per_expert.groupby(list(by), sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), n_experts=len(s))
        for col in ("mean_gap", "mean_rel_comp", "mean_down"):
            if col in s:
                row[col] = float(s[col].mean())
        for name, (x, y) in pairs.items():
            row[f"rho_{name}"], row[f"p_{name}"], _ = spearman_defined(s[x], s[y])
        rows.append(row)
    columns = [*by, "n_experts", *(c for c in ("mean_gap", "mean_rel_comp", "mean_down") if c in per_expert),
               *(f"{q}_{name}" for name in pairs for q in ("rho", "p"))]
    out = pd.DataFrame(rows, columns=columns)  # the columns also when no expert is left
    numeric = columns[len(by) + 1:]
    out[numeric] = out[numeric].astype(np.float64)
    return out.astype({"n_experts": np.int64})


def released_expert_means(experts: pd.DataFrame) -> pd.DataFrame:
    """The released per-expert redistribution records (:func:`moeaudit.released.redistribution_experts`)
    in the columns of :func:`expert_means`: ``mean_rw`` (``mean_routing_weight``), ``mean_gap``
    (``mean_gap_norm``), ``mean_rel_comp`` (``relative_compensation``), ``mean_cos``
    (``compensation_cosine``), ``n`` (``n_active_tokens``); ``model`` and ``layer`` kept."""
    return experts.rename(columns={"mean_routing_weight": "mean_rw", "mean_gap_norm": "mean_gap",
                                   "relative_compensation": "mean_rel_comp", "compensation_cosine": "mean_cos",
                                   "n_active_tokens": "n"})[["model", "layer", "expert", "n", "mean_rw", "mean_gap",
                                                             "mean_rel_comp", "mean_cos"]]


def measure_agreement(records: pd.DataFrame, *, by=("model", "layer")) -> pd.DataFrame:
    """Per group, the released relative compensation against the re-measured downstream compensation
    over the same single-expert ablations.

    ``records``: one row per ablation with ``rel_comp`` (:func:`relative_compensation` at the
    ablated (t, e)) and ``downstream_compensation`` (:func:`moeaudit.engine.run_ablations` with
    ``downstream=True``). Columns: ``ablations`` (finite pairs), ``mean_rel_comp``, ``mean_down``,
    ``share_down_positive`` (fraction with downstream compensation > 0), ``rho``/``p`` (Spearman
    across ablations, :func:`moeaudit.stats.spearman_defined`; NaN where the downstream measure is
    constant, as at the last MoE layer where it is 0 by construction).
    """

    rows = []
    for key, s in records.groupby(list(by), sort=False):
        rho, p, n = spearman_defined(s.rel_comp, s.downstream_compensation)
        rows.append({**dict(zip(by, key)), "ablations": n, "mean_rel_comp": float(s.rel_comp.mean()),
                     "mean_down": float(s.downstream_compensation.mean()),
                     "share_down_positive": float((s.downstream_compensation > 0).mean()), "rho": rho, "p": p})
    return pd.DataFrame(rows)


def log_log_slope(x, y) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over the pairs where both are finite and
    positive (the elasticity of y with respect to x: y ∝ x^slope). NaN for fewer than 3 such
    pairs or a constant x. ``ValueError`` if the lengths differ."""
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    lx, ly = np.log(xa[ok]), np.log(ya[ok])
    if lx.size < 3 or np.ptp(lx) == 0:
        return float("nan")
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def compensation_factors(per_expert: pd.DataFrame, *, by=("model", "layer")) -> pd.DataFrame:
    """How the two factors of the released relative compensation move with the gap norm across experts.

    Per activation, ``rel_comp = max(cos, 0) · ||r|| / ||g||`` (:func:`relative_compensation`), so
    across experts the mean relative compensation rises with the mean gap norm only if the
    alignment ``cos`` rises fast enough to outweigh the falling ``||r|| / ||g||``. ``per_expert``:
    an :func:`expert_means` result (or :func:`released_expert_means`). One row per group with
    ``n_experts``, ``median_cos`` (median over experts of the mean cosine), and the
    :func:`log_log_slope` against ``mean_gap`` of ``mean_cos`` (``slope_cos``), of
    ``mean_r_over_g`` (``slope_r_over_g``; NaN when the column is absent, as in the released
    records, which store no ||r||) and of ``mean_rel_comp`` (``slope_rel_comp``).
    """
    rows = []
    for key, s in per_expert.groupby(list(by), sort=False):
        rows.append({**dict(zip(by, key)), "n_experts": len(s), "median_cos": float(s.mean_cos.median()),
                     "slope_cos": log_log_slope(s.mean_gap, s.mean_cos),
                     "slope_r_over_g": (log_log_slope(s.mean_gap, s.mean_r_over_g) if "mean_r_over_g" in s
                                        else float("nan")),
                     "slope_rel_comp": log_log_slope(s.mean_gap, s.mean_rel_comp)})
    return pd.DataFrame(rows)


def gap_rounding_ratio(measured, clean, r_norm, *, dtype: str = "float32") -> np.ndarray:
    """How far a measured gap norm departs from its clean-pass value, in units of the rounding that
    the subtraction ``g = y - y'`` can produce.

    ``measured``: ``||y - y'||`` from an ablation (nats-free, hidden-space units); ``clean``:
    ``w_e · ||E_e(x)||`` from the clean pass; ``r_norm``: ``||r||``, the norm of the rest of the
    block's output. Each of ``y`` and ``y'`` is rounded to about ``eps · ||y||`` (``eps`` = machine
    epsilon of ``dtype``), so their difference carries an absolute error of order
    ``eps · (||r|| + ||g||)`` and a relative error of order ``eps · (||r|| + ||g||) / ||g||``
    (cancellation: small gaps beside a large rest lose the most digits). Returns, elementwise,
    ``(|measured - clean| / clean) / (eps · (r_norm + clean) / clean)``; values of order one mean
    the disagreement is that rounding. Raises ValueError for arrays of different lengths.
    """
    m, c, r = (np.asarray(v, dtype=np.float64) for v in (measured, clean, r_norm))
    if not (m.shape == c.shape == r.shape):
        raise ValueError(f"measured, clean and r_norm must have one shape, got {m.shape}, {c.shape}, {r.shape}")
    eps = float(torch.finfo(getattr(torch, dtype)).eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.abs(m - c) / c) / (eps * (r + c) / c)


def cosine_against_chance(median_cos: pd.DataFrame, hidden_size: dict) -> pd.DataFrame:
    """Per model: the median (over experts) mean cosine between the removed and the remaining output,
    set against the spread of the cosine of two unrelated directions.

    For two independent isotropic directions in ``d`` dimensions the cosine has mean 0 and standard
    deviation ``1/sqrt(d)`` (exactly ``1/sqrt(d)``, since ``E[cos^2] = 1/d``). ``median_cos``: rows
    with ``model`` and ``median_cos`` (one per layer, :func:`compensation_factors`);
    ``hidden_size``: {model: d}. Returns one row per model (in order of appearance) with ``d``,
    ``chance`` = ``1/sqrt(d)``, ``lo``/``hi`` (range over layers of the median cosine),
    ``ratio_lo``/``ratio_hi`` (the same in units of ``chance``) and ``relation``: ``"above"`` when
    every layer lies above ``chance``, ``"below"`` when every layer lies below it, else ``"across"``.
    Raises KeyError for a model without a hidden size.
    """
    rows = []
    for model, s in median_cos.groupby("model", sort=False):
        d = int(hidden_size[model])
        chance = 1.0 / float(np.sqrt(d))
        lo, hi = float(s.median_cos.min()), float(s.median_cos.max())
        rows.append({"model": model, "d": d, "chance": chance, "lo": lo, "hi": hi, "ratio_lo": lo / chance,
                     "ratio_hi": hi / chance,
                     "relation": "above" if lo > chance else "below" if hi < chance else "across"})
    return pd.DataFrame(rows)


def slope_sign_separation(slope, rho) -> dict:
    """Do layers with a negative and with a positive correlation fall into two groups by slope?

    ``slope``, ``rho``: one value per layer (e.g. the log–log slope of the cosine against the gap norm
    and ρ(gap norm, rel. comp.)); NaNs are dropped pairwise. Returns ``n_neg``, ``n_pos``,
    ``max_slope_neg`` (largest slope among layers with ρ < 0), ``min_slope_pos`` (smallest among
    ρ > 0), ``separated`` (True when ``max_slope_neg < min_slope_pos``, i.e. a single slope threshold
    splits the signs; None when one group is empty) and ``n_overlap`` (layers whose slope lies in the
    overlap ``[min_slope_pos, max_slope_neg]``).
    """
    s, r = np.asarray(slope, dtype=float), np.asarray(rho, dtype=float)
    ok = np.isfinite(s) & np.isfinite(r)
    s, r = s[ok], r[ok]
    neg, pos = s[r < 0], s[r > 0]
    out = {"n_neg": int(neg.size), "n_pos": int(pos.size),
           "max_slope_neg": float(neg.max()) if neg.size else float("nan"),
           "min_slope_pos": float(pos.min()) if pos.size else float("nan")}
    if not (neg.size and pos.size):
        return {**out, "separated": None, "n_overlap": 0}
    lo, hi = out["min_slope_pos"], out["max_slope_neg"]
    return {**out, "separated": bool(hi < lo), "n_overlap": int(((s >= lo) & (s <= hi)).sum()) if hi >= lo else 0}


def significant_signs_text(layers, rho, p, *, alpha: float = 0.05) -> str:
    """'k of n layers' at which ``p < alpha``, with the sign of those correlations.

    ``layers``, ``rho``, ``p``: one value per layer (NaN ρ or p: the layer is left out of n). Returns
    e.g. ``"3 of 4 layers, all negative (-0.43 to -0.33)"``, ``"2 of 3 layers, of opposite signs
    (L0 -0.42, L1 +0.41)"``, ``"1 of 4 layers (positive, +0.31)"`` or ``"0 of 4 layers"``.
    """
    L, r, pv = (np.asarray(v) for v in (layers, rho, p))
    ok = np.isfinite(r.astype(float)) & np.isfinite(pv.astype(float))
    L, r, pv = L[ok], r[ok].astype(float), pv[ok].astype(float)
    sig = pv < alpha
    head = f"{int(sig.sum())} of {len(r)} layer{'' if len(r) == 1 else 's'}"
    if not sig.any():
        return head
    rs, Ls = r[sig], L[sig]
    fmt = lambda v: f"{0.0 if round(v, 2) == 0 else v:+.2f}"  # noqa: E731
    if sig.sum() == 1:
        return f"{head} ({'positive' if rs[0] > 0 else 'negative'}, {fmt(rs[0])})"
    if (rs > 0).all() or (rs < 0).all():
        word = "positive" if rs[0] > 0 else "negative"
        rng = fmt(rs.min()) if fmt(rs.min()) == fmt(rs.max()) else f"{fmt(rs.min())} to {fmt(rs.max())}"
        return f"{head}, all {word} ({rng})"
    return f"{head}, of opposite signs (" + ", ".join(f"L{a} {fmt(b)}" for a, b in zip(Ls, rs)) + ")"
