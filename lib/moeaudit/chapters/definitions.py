"""Chapter 9 (the intervention's definitions): the released scripts' recipes applied to the book's
models (a padded router pass, per-expert aggregates, the metric tables of each recipe), their rank
agreement with the paper's definitions, the audit under each variant and the float16 precision of
the released records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..engine import block_input_in_trace, expert_outputs, routing_in_trace
from ..metrics import METRICS as BOOK_METRICS
from ..paper import PAPER_RECIPE, RELEASED_RECIPES, float16_spacing, released_mean_routing_weight_when_active
from ..report import AnswerCheck, check_answer
from ..stats import MIN_PAIRS, cohens_dz, dz_difference_ci, min_detectable_dz, spearman_defined

#: the Qwen script's choices: activation norm over the first texts only, std over the first coordinates
QWEN_NORM_TEXTS, QWEN_STD_COORDS = 30, 32


@dataclass
class PaddedPass:
    """Router and expert quantities at every position of a right-padded corpus (see :func:`padded_router_pass`).

    ``layers[L]`` holds (N = texts x width rows, k = top-k): ``logits`` (N, E) router logits,
    ``idx`` (N, k) selected experts, ``prob`` (N, k) their softmax probabilities, ``norm`` (N, k)
    L2 norms of their raw outputs ``E_i(x)``, ``coords`` (N, k, c) the first c coordinates of those
    outputs. ``real`` (N,) is True at real tokens, False at padding; ``seq_ids`` (N,) the text of
    each row. ``num_experts``, ``top_k``: the layout.
    """

    layers: dict
    real: np.ndarray
    seq_ids: np.ndarray
    num_experts: int
    top_k: int

    @property
    def padding_share(self) -> float:
        return float(1.0 - self.real.mean())


def padded_router_pass(model, corpus, *, layers, texts_per_batch: int = 8,
                       n_coords: int = QWEN_STD_COORDS) -> PaddedPass:
    """Run ``corpus`` right-padded to its longest text (as one released batch would be) and record,
    at every position of ``layers`` (padding included), what the released recipes read.

    ``model``: a :class:`moeaudit.models.AuditModel`; ``corpus``: a tokenized corpus. Padding uses
    ``model.pad_id`` and a zero attention mask, so (causal attention, masked keys) the real
    positions see exactly what a clean pass sees. Returns a :class:`PaddedPass`.
    """


    layers = list(layers)
    for L in layers:
        model.layout.check_layer(L)
    width = int(corpus.lengths.max())
    out = {L: {k: [] for k in ("logits", "idx", "prob", "norm", "coords")} for L in layers}
    real_all, seq_all = [], []
    with torch.no_grad():
        for start in range(0, len(corpus), texts_per_batch):
            chunk = list(range(start, min(start + texts_per_batch, len(corpus))))
            ids, mask = corpus.padded(chunk, pad_id=model.pad_id, length=width)
            saved = {}
            with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                remote=model.remote):
                for L in layers:
                    x = block_input_in_trace(model, L).save()  # nnsight: accesses in execution order (input, then router)
                    r_logits, _, r_idx = routing_in_trace(model, L)
                    saved[L] = (x, r_logits.save(), r_idx.save())
            real_all.append(mask.reshape(-1).bool().numpy())
            seq_all.append(np.repeat(np.array(chunk), width))
            for L in layers:
                x, lg, idx = saved[L]
                x = x.reshape(-1, x.shape[-1])
                idx = idx.reshape(x.shape[0], -1)
                lg = lg.reshape(x.shape[0], -1).float()
                y = expert_outputs(model.hf_experts(L), x, idx.to(x.device), call=model.layout.spec.experts_call).float()
                out[L]["logits"].append(lg.cpu().numpy().astype(np.float64))
                out[L]["idx"].append(idx.cpu().numpy().astype(np.int64))
                out[L]["prob"].append(torch.softmax(lg, -1).gather(1, idx.to(lg.device)).cpu().numpy().astype(np.float64))
                out[L]["norm"].append(torch.linalg.vector_norm(y, dim=-1).cpu().numpy().astype(np.float64))
                out[L]["coords"].append(y[..., :n_coords].cpu().numpy().astype(np.float32))
    arrays = {L: {k: np.concatenate(v) for k, v in d.items()} for L, d in out.items()}
    return PaddedPass(layers=arrays, real=np.concatenate(real_all), seq_ids=np.concatenate(seq_all),
                      num_experts=int(model.layout.num_experts), top_k=int(model.layout.top_k))


def per_expert_aggregate(idx, values, rows, *, num_experts: int, how: str) -> np.ndarray:
    """Aggregate ``values`` over the (row, slot) pairs that select each expert, on the ``rows`` kept.

    ``idx``: (N, k) selected experts; ``values``: (N, k) or (N, k, c) numbers per selection;
    ``rows``: (N,) bool. ``how``: ``"mean"``, ``"std"`` (ddof 1 over selections) or
    ``"pooled_std"`` (ddof 1 over every coordinate of every selection, for (N, k, c) values).
    Returns (E,) with NaN for an expert never selected (and for a std over fewer than 2 values).
    """
    if how not in ("mean", "std", "pooled_std"):
        raise ValueError(f"how={how!r} must be 'mean', 'std' or 'pooled_std'")
    idx, values, rows = np.asarray(idx), np.asarray(values), np.asarray(rows, dtype=bool)
    e = idx[rows].reshape(-1)
    v = values[rows].reshape(e.size, -1)
    out = np.full(num_experts, np.nan)
    for j in np.unique(e):
        sel = v[e == j]
        if how == "mean":
            out[j] = sel[:, 0].mean()
        elif sel.size > 1:
            out[j] = (sel[:, 0] if how == "std" else sel.reshape(-1)).std(ddof=1)
    return out


def recipe_metric_tables(padded: PaddedPass, *, recipes=RELEASED_RECIPES) -> dict:
    """The four metrics per (layer, expert) under the paper's definitions and each released recipe.

    Returns ``{recipe: DataFrame}`` with columns ``layer``, ``expert`` and the book's metric names
    (``utilization_rate``, ``activation_norm``, ``mean_routing_weight``, ``activation_std``);
    ``PAPER_RECIPE`` holds the paper's Section 2 definitions on the real positions. Departures:

    * ``"OLMoE script"``: utilization = mean router logit over all positions (padding included);
      mean routing weight = :func:`released_mean_routing_weight_when_active`; activation
      norm/std over every selection, padding included.
    * ``"DeepSeek script"``: utilization = share of all positions (padding included) selecting e.
    * ``"Qwen script"``: utilization = count / (k x real tokens); activation norm over the first
      :data:`QWEN_NORM_TEXTS` texts; activation std = pooled std of the first coordinates.
    """
    E, k, real = padded.num_experts, padded.top_k, padded.real
    everything = np.ones_like(real)
    agg = per_expert_aggregate
    tables = {}
    for recipe in [PAPER_RECIPE, *recipes]:
        if recipe != PAPER_RECIPE and recipe not in RELEASED_RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; valid: {RELEASED_RECIPES}")
        frames = []
        for L, a in padded.layers.items():
            idx = a["idx"]
            m = {"utilization_rate": np.bincount(idx[real].reshape(-1), minlength=E) / real.sum(),
                 "activation_norm": agg(idx, a["norm"], real, num_experts=E, how="mean"),
                 "mean_routing_weight": agg(idx, a["prob"], real, num_experts=E, how="mean"),
                 "activation_std": agg(idx, a["norm"], real, num_experts=E, how="std")}
            if recipe == "OLMoE script":
                m["utilization_rate"] = a["logits"].mean(axis=0)
                m["mean_routing_weight"] = released_mean_routing_weight_when_active(a["logits"], top_k=k)[0]
                m["activation_norm"] = agg(idx, a["norm"], everything, num_experts=E, how="mean")
                m["activation_std"] = agg(idx, a["norm"], everything, num_experts=E, how="std")
            elif recipe == "DeepSeek script":
                m["utilization_rate"] = np.bincount(idx.reshape(-1), minlength=E) / len(idx)
            elif recipe == "Qwen script":
                m["utilization_rate"] = np.bincount(idx[real].reshape(-1), minlength=E) / (k * real.sum())
                m["activation_norm"] = agg(idx, a["norm"], real & (padded.seq_ids < QWEN_NORM_TEXTS),
                                           num_experts=E, how="mean")
                m["activation_std"] = agg(idx, a["coords"], real, num_experts=E, how="pooled_std")
            frames.append(pd.DataFrame({"layer": L, "expert": np.arange(E), **m}))
        tables[recipe] = pd.concat(frames, ignore_index=True)
    return tables


def recipe_rank_agreement(tables: dict, *, metrics=None) -> pd.DataFrame:
    """Spearman rho across experts between the paper's definition and each recipe, per layer and metric.

    ``tables``: the output of :func:`recipe_metric_tables`. Experts where either value is
    undefined are left out (:func:`moeaudit.stats.spearman_defined`). Columns ``recipe``,
    ``layer``, ``metric``, ``rho`` (NaN where undefined), ``experts``.
    """

    metrics = list(BOOK_METRICS if metrics is None else metrics)
    paper = tables[PAPER_RECIPE].set_index(["layer", "expert"])
    rows = []
    for recipe, t in tables.items():
        if recipe == PAPER_RECIPE:
            continue
        t = t.set_index(["layer", "expert"]).loc[paper.index]
        for L in paper.index.get_level_values("layer").unique():
            for metric in metrics:
                rho, _, n = spearman_defined(paper.loc[L, metric], t.loc[L, metric])
                rows.append({"recipe": recipe, "layer": L, "metric": metric, "rho": rho, "experts": n})
    return pd.DataFrame(rows)


def ablation_agreement(records_a: pd.DataFrame, records_b: pd.DataFrame, *, last_layer: int) -> pd.DataFrame:
    """Per layer: how far two sets of single-expert records of the same ablations lie apart.

    Records are matched on (``seq_id``, ``t``, ``layer``, ``expert``). Columns: ``layer``,
    ``last`` (``layer == last_layer``), ``max_diff`` and ``median_diff`` of ``|delta_a - delta_b|``,
    ``floor`` (the largest ``|clean_loss_a - clean_loss_b|`` over all matched records: two
    computations of the same un-ablated loss), ``median_abs_a``/``median_abs_b`` (median
    ``|delta|``), ``rho`` (Spearman over records), ``records``. Losses in nats.
    """

    key = ["seq_id", "t", "layer", "expert"]
    tw = records_a[key + ["delta_loss", "clean_loss"]].merge(records_b[key + ["delta_loss", "clean_loss"]],
                                                             on=key, suffixes=("_a", "_b"))
    if tw.empty:
        raise ValueError("the two sets of records share no (seq_id, t, layer, expert)")
    tw["diff"] = (tw.delta_loss_a - tw.delta_loss_b).abs()
    floor = float((tw.clean_loss_a - tw.clean_loss_b).abs().max())
    rows = []
    for L, g in tw.groupby("layer"):
        rows.append({"layer": int(L), "last": int(L) == last_layer, "max_diff": float(g["diff"].max()),
                     "median_diff": float(g["diff"].median()), "floor": floor,
                     "median_abs_a": float(g.delta_loss_a.abs().median()),
                     "median_abs_b": float(g.delta_loss_b.abs().median()),
                     "rho": spearman_defined(g.delta_loss_a, g.delta_loss_b)[0], "records": len(g)})
    return pd.DataFrame(rows)


def compare_audit_variants(cells: pd.DataFrame, table: pd.DataFrame, variant_a: str, variant_b: str, *,
                           alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per audit cell present under both variants: d_z of each, the paired-bootstrap CI of
    their difference, and whether the verdict changes.

    ``cells``: paired cells (``moeaudit.audit.paired_cells`` output) with columns ``variant``,
    ``model``, ``ranking``, ``layer``, ``seq_id``, ``t``, ``diff`` (D = delta_high - delta_low, nats);
    ``table``: ``moeaudit.stats.audit_table`` of those cells by (``model``, ``variant``, ``set``,
    ``ranking``, ``layer``). Positions are matched on (seq_id, t); the interval is
    :func:`moeaudit.stats.dz_difference_ci` (seed ``seed + row``). Columns: the key, ``n``,
    ``dz_a``, ``dz_b``, ``ddz`` (d_z(a) - d_z(b) on the matched positions), ``ddz_lo``, ``ddz_hi``,
    ``dual_a``/``dual_b`` (dual rule, Bonferroni within the family), ``p05_a``/``p05_b``
    (uncorrected p_t < ``alpha``), ``p_t_a``, ``p_t_b``, ``flip_dual``, ``flip_p05``, ``ci_excludes_0``
    (the interval excludes 0 *and* ``|ddz|`` exceeds :data:`DDZ_TOLERANCE`, so that a difference
    that is float rounding, e.g. ``1e-6`` with an interval ``[+0.000, +0.000]``, is not counted).
    """

    key = ["model", "set", "ranking", "layer"]
    ta, tb = (table[table.variant == v].set_index(key) for v in (variant_a, variant_b))
    groups = {v: dict(list(cells[cells.variant == v].groupby(["model", "ranking", "layer"], sort=False)))
              for v in (variant_a, variant_b)}
    rows = []
    for i, (k, ra) in enumerate(ta.iterrows()):
        if k not in tb.index:
            continue
        rb = tb.loc[k]
        ca, cb = groups[variant_a][k[0], k[2], k[3]], groups[variant_b][k[0], k[2], k[3]]
        both = ca[["seq_id", "t", "diff"]].merge(cb[["seq_id", "t", "diff"]], on=["seq_id", "t"], suffixes=("_a", "_b"))
        lo, hi = dz_difference_ci(both.diff_a, both.diff_b, n_boot=n_boot, seed=seed + i)
        rows.append({**dict(zip(key, k)), "n": len(both), "dz_a": float(ra.cohens_dz), "dz_b": float(rb.cohens_dz),
                     "ddz": cohens_dz(both.diff_a) - cohens_dz(both.diff_b), "ddz_lo": lo, "ddz_hi": hi,
                     "dual_a": bool(ra.sig_dual_bonf), "dual_b": bool(rb.sig_dual_bonf),
                     "p05_a": bool(ra.p_t < alpha), "p05_b": bool(rb.p_t < alpha),
                     "p_t_a": float(ra.p_t), "p_t_b": float(rb.p_t)})
    out = pd.DataFrame(rows)
    out["flip_dual"] = out.dual_a != out.dual_b
    out["flip_p05"] = out.p05_a != out.p05_b
    out["ci_excludes_0"] = ((out.ddz_lo > 0) | (out.ddz_hi < 0)) & (out.ddz.abs() > DDZ_TOLERANCE)
    return out


def variant_flip_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per model, from :func:`compare_audit_variants`: ``cells``, ``max_abs_ddz``, ``median_abs_ddz``,
    ``ci_excluding_0`` (count), ``flips_dual`` and ``flips_p05`` (counts of changed verdicts)."""
    return (comparison.assign(abs_ddz=comparison.ddz.abs())
            .groupby("model", sort=False)
            .agg(cells=("ddz", "size"), max_abs_ddz=("abs_ddz", "max"), median_abs_ddz=("abs_ddz", "median"),
                 ci_excluding_0=("ci_excludes_0", "sum"), flips_dual=("flip_dual", "sum"),
                 flips_p05=("flip_p05", "sum"))
            .reset_index())


def top_expert_raises_loss(records: pd.DataFrame) -> float:
    """Share of (position, layer) pairs at which removing the active expert with the largest router
    probability (``prob``) raises the loss (``delta_loss > 0``), from single-expert records."""
    top = records.sort_values(["seq_id", "t", "layer", "prob"], ascending=[True, True, True, False])
    top = top.groupby(["seq_id", "t", "layer"], sort=False).head(1)
    return float((top.delta_loss > 0).mean())


def precision_noise(full: pd.DataFrame, half: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Single-expert records of one model in a full and a half precision, matched on (seq_id, t,
    layer, expert) (ablations of an expert active in both precisions).

    Returns ``(matched, summary)``: ``matched`` has ``delta_loss_full``/``_half``,
    ``clean_loss_full``/``_half``, ``abs_full`` = ``|delta_full|`` and ``err`` =
    ``|delta_half - delta_full|`` (nats); ``summary`` has ``matched``, ``share_matched``,
    ``median_clean_diff``, ``median_err``, ``p95_err``, ``median_abs_full``,
    ``share_below_p95_err`` (share of |delta_full| below the 95th percentile of ``err``),
    ``sign_flips`` (share of records, both deltas non-zero, whose sign differs),
    ``top_raises_full``/``top_raises_half`` (:func:`top_expert_raises_loss`).
    """
    key = ["seq_id", "t", "layer", "expert"]
    m = full[key + ["delta_loss", "clean_loss"]].merge(half[key + ["delta_loss", "clean_loss"]], on=key,
                                                       suffixes=("_full", "_half"))
    if m.empty:
        raise ValueError("no ablation is matched between the two precisions")
    m["abs_full"] = m.delta_loss_full.abs()
    m["err"] = (m.delta_loss_half - m.delta_loss_full).abs()
    nz = (m.delta_loss_full != 0) & (m.delta_loss_half != 0)
    p95 = float(m.err.quantile(0.95))
    summary = {
        "matched": len(m), "share_matched": len(m) / len(full),
        "median_clean_diff": float((m.clean_loss_half - m.clean_loss_full).abs().median()),
        "median_err": float(m.err.median()), "p95_err": p95, "median_abs_full": float(m.abs_full.median()),
        "share_below_p95_err": float((m.abs_full < p95).mean()),
        "sign_flips": float((np.sign(m.delta_loss_full[nz]) != np.sign(m.delta_loss_half[nz])).mean()),
        "top_raises_full": top_expert_raises_loss(full), "top_raises_half": top_expert_raises_loss(half),
    }
    return m, summary


#: a difference of two Cohen's d_z smaller than this is treated as numerically zero: it rounds to
#: +0.000 or -0.000 at the three decimals the comparison tables print (used by
#: :func:`compare_audit_variants` for ``ci_excludes_0``; a bootstrap interval around a difference of
#: float rounding can exclude zero without any difference between the variants)
DDZ_TOLERANCE: float = 5e-4


#: share of padding among the positions the released OLMoE metric script records (the released-code
#: notes: all texts in one batch padded to the longest, "~62% padding"); approximate
RELEASED_OLMOE_PADDING_SHARE: float = 0.62


def float16_steps_caveat(deltas, *, losses=(4.0, 8.0)) -> pd.DataFrame:
    """How many loss changes lie within one float16 step of zero when the step is taken at a larger loss.

    A float16 loss near ``x`` nats is a multiple of :func:`float16_spacing` ``(x)``, which doubles at
    each power of two (``2**-9`` from 2 nats, ``2**-8`` from 4, ``2**-7`` from 8); a difference of two
    losses near ``x`` is resolved only to that step. ``deltas``: loss changes (nats); ``losses``: the
    loss levels at which the step is taken. One row per level: ``loss``, ``step`` (nats) and
    ``n_within`` (count of ``|delta| <= step``) out of ``n``.
    """
    d = np.abs(np.asarray(deltas, dtype=np.float64))
    return pd.DataFrame([{"loss": float(x), "step": float(float16_spacing(x)), "n_within": int((d <= float16_spacing(x)).sum()),
                          "n": int(d.size)} for x in losses])


def fifth_positions(n_positions: int) -> int:
    """The intervention-definitions chapter's "fewer positions" run: a fifth of ``n_positions`` (floor), at
    least :data:`moeaudit.stats.MIN_PAIRS`. ``ValueError`` for fewer than ``MIN_PAIRS`` positions."""
    if isinstance(n_positions, bool) or int(n_positions) != n_positions or n_positions < MIN_PAIRS:
        raise ValueError(f"n_positions must be a whole number >= {MIN_PAIRS}, got {n_positions!r}")
    return max(MIN_PAIRS, int(n_positions) // 5)


def check_09_intervention_definitions_3(answer, *, n_positions: int, alpha: float, family: int,
                                        power: float = 0.8) -> AnswerCheck:
    """Exercise 3 of the intervention-definitions chapter: the smallest |d_z| the paired t-test detects with
    ``power`` at a fifth of the positions (:func:`fifth_positions`), two-sided, at the Bonferroni level
    ``alpha / family`` of the first model's metric cells (:func:`moeaudit.stats.min_detectable_dz`); right
    within 0.005 (the page prints two decimals). ``ValueError`` for a family below one, a bad
    ``n_positions`` or an answer that is not a number."""
    if isinstance(family, bool) or int(family) != family or family < 1:
        raise ValueError(f"family must be a whole number >= 1 (the number of metric cells), got {family!r}")
    expected = min_detectable_dz(fifth_positions(n_positions), alpha=alpha / family, power=power)
    return check_answer(answer, expected, what="the smallest detectable |d_z| at a fifth of the positions",
                        tolerance=0.005)
