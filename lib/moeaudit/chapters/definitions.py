"""Chapter 9 (the intervention's definitions): the released scripts' recipes applied to the book's
models (a padded router pass, per-expert aggregates, the metric tables of each recipe), their rank
agreement with the paper's definitions, the audit under each variant, the float16 precision of
the released records, and the audit under each operator that removes an expert (remove, mask, mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..engine import block_input_in_trace, check_operator, expert_outputs, routing_in_trace, run_ablations
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
    (uncorrected p_t < ``alpha``), ``p_t_a``, ``p_t_b``, ``p_W_a``, ``p_W_b`` (Wilcoxon), ``alpha_corrected``
    (the family's Bonferroni level the dual rule uses), ``flip_dual``, ``flip_p05``, ``ci_excludes_0``
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
                     "p_t_a": float(ra.p_t), "p_t_b": float(rb.p_t), "p_W_a": float(ra.p_W), "p_W_b": float(rb.p_W),
                     "alpha_corrected": float(ra.alpha_corrected)})
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


# ----------------------------------------------------------------------------- the operator that removes an expert

def operator_subset(records: pd.DataFrame, *, n_positions: int, seed: int) -> pd.DataFrame:
    """The records at ``n_positions`` of their positions, for re-running them under other operators.

    ``records``: single-expert records with ``seq_id`` and ``t``. The positions are drawn from the
    distinct (``seq_id``, ``t``) pairs of ``records`` (sorted) without replacement with
    ``numpy.random.default_rng(seed)``; every record at a drawn position is kept, in the input order
    (index reset). ``ValueError`` for ``n_positions`` below :data:`moeaudit.stats.MIN_PAIRS` or above
    the number of distinct positions.
    """
    pos = records[["seq_id", "t"]].drop_duplicates().sort_values(["seq_id", "t"]).reset_index(drop=True)
    if isinstance(n_positions, bool) or int(n_positions) != n_positions or not MIN_PAIRS <= n_positions <= len(pos):
        raise ValueError(f"n_positions={n_positions!r} must be a whole number from {MIN_PAIRS} to {len(pos)} "
                         "(the distinct positions of the records)")
    pick = pos.iloc[np.sort(np.random.default_rng(seed).choice(len(pos), size=int(n_positions), replace=False))]
    keep = records.merge(pick, on=["seq_id", "t"], how="left", indicator=True)["_merge"].eq("both").to_numpy()
    return records[keep].reset_index(drop=True)


def operator_records(model, corpus, clean, records: pd.DataFrame, *, operator: str, means=None,
                     batch_size: int = 64, seed: int | None = None) -> pd.DataFrame:
    """The token-local single-expert ablations of ``records`` (same positions, layers and experts)
    re-run under ``operator`` (:data:`moeaudit.engine.OPERATORS`) with
    :func:`moeaudit.engine.run_ablations`.

    ``records``: single-expert records (``seq_id``, ``t``, ``layer``, ``removed``, ``expert``).
    ``means``: the :class:`moeaudit.engine.ExpertMeans` of ``operator="mean"`` (None otherwise).
    Returns the engine's records (loss changes in nats; ``"mask"`` adds ``replacement``, ``leak``
    and ``masked_selected``) with ``prob`` and ``weight`` of the removed expert in the clean pass,
    as :func:`moeaudit.audit.single_expert_records` adds them, and ``operator``. ``ValueError`` for an
    unknown operator (before any forward) and whatever the engine refuses.
    """
    check_operator(operator)
    req = records[["seq_id", "t", "layer", "removed", "expert"]].reset_index(drop=True)
    rec = run_ablations(model, corpus, clean, req, mode="token", operator=operator, means=means,
                        batch_size=batch_size, seed=seed, progress=False)
    rec["prob"] = [p[0] for p in rec.removed_probs]
    rec["weight"] = [w[0] for w in rec.removed_weights]
    rec["operator"] = operator
    return rec


def next_ranked_expert(logits, selected) -> np.ndarray:
    """The expert a router would pick next: the largest logit among the experts not selected.

    ``logits``: (P, E) router logits at P positions; ``selected``: (P, k) the experts the router
    selected there (k < E). Returns (P,) int64 expert ids; a tie goes to the lowest id. For a
    softmax router this is the expert that enters the top-k when one selected expert's logit is set
    to ``-inf`` (``operator="mask"``). ``ValueError`` for shapes that do not match or k >= E.
    """
    lg, sel = np.asarray(logits, dtype=np.float64), np.asarray(selected)
    if lg.ndim != 2 or sel.ndim != 2 or sel.shape[0] != lg.shape[0] or sel.shape[1] >= lg.shape[1]:
        raise ValueError(f"logits (P, E) and selected (P, k < E) disagree: {lg.shape}, {sel.shape}")
    out = lg.copy()
    np.put_along_axis(out, sel.astype(np.int64), -np.inf, axis=1)
    return out.argmax(axis=1).astype(np.int64)


def next_ranked_table(padded: PaddedPass, positions: pd.DataFrame) -> pd.DataFrame:
    """Per audited layer of ``padded`` and position of ``positions`` (``seq_id``, ``t``): the
    clean top-k (``selected``, a list) and :func:`next_ranked_expert` (``next_expert``).

    The rows of text ``s`` in a :class:`PaddedPass` are contiguous, from the first row with
    ``seq_ids == s``. ``ValueError`` for a text not in the pass or a position at padding.
    """
    seq, t = positions.seq_id.to_numpy(dtype=np.int64), positions.t.to_numpy(dtype=np.int64)
    first = np.searchsorted(padded.seq_ids, seq, side="left")
    rows = first + t
    ok = (first < len(padded.seq_ids)) & (rows < len(padded.seq_ids))
    ok[ok] &= (padded.seq_ids[first[ok]] == seq[ok]) & (padded.seq_ids[rows[ok]] == seq[ok]) & padded.real[rows[ok]]
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"position (seq_id={seq[i]}, t={t[i]}) is not a real token of the padded pass")
    frames = []
    for L, a in padded.layers.items():
        sel = a["idx"][rows]
        frames.append(pd.DataFrame({"layer": L, "seq_id": seq, "t": t, "selected": [list(map(int, r)) for r in sel],
                                    "next_expert": next_ranked_expert(a["logits"][rows], sel)}))
    return pd.concat(frames, ignore_index=True)


def check_mask_leak(records: pd.DataFrame) -> None:
    """``ValueError`` unless every ``operator="mask"`` record has ``leak == 0`` (no combine weight left on a
    masked expert), naming how many records leak and the largest leak; records of other operators are
    not looked at. ``ValueError`` too when mask records lack the ``leak`` column."""
    m = records[records.operator == "mask"] if "operator" in records else records.iloc[:0]
    if len(m) and "leak" not in m:
        raise ValueError("the mask records have no leak column; compute them with run_ablations(operator='mask')")
    bad = m[m.leak != 0] if len(m) else m
    if len(bad):
        raise ValueError(f"{len(bad)} of {len(m)} mask records leave a combine weight on the masked expert "
                         f"(largest {float(bad.leak.abs().max()):.3g}): the router mask did not remove it")


def replacement_summary(mask_records: pd.DataFrame, next_ranked: pd.DataFrame) -> pd.DataFrame:
    """What took the masked expert's place, per model.

    ``mask_records``: ``operator="mask"`` single-expert records (``model``, ``layer``, ``seq_id``,
    ``t``, ``replacement``: experts in the masked top-k that the clean top-k lacks; ``leak``;
    ``masked_selected``); ``next_ranked``: :func:`next_ranked_table` with a ``model`` column.
    Columns: ``model``, ``records``, ``max_leak`` (largest combine weight left on a masked expert),
    ``masked_selected`` (records whose masked router still selected the expert, with weight 0),
    ``one_replacement`` (share of records with exactly one new expert), ``next_ranked`` (share
    whose replacement is exactly the next-ranked expert of the clean router, :func:`next_ranked_expert`).
    ``ValueError`` when a record has no next-ranked entry.
    """
    key = ["model", "layer", "seq_id", "t"]
    m = mask_records.merge(next_ranked[key + ["next_expert"]], on=key, how="left")
    if m.next_expert.isna().any():
        raise ValueError(f"{int(m.next_expert.isna().sum())} mask records have no next-ranked expert in next_ranked")
    m["one"] = [len(r) == 1 for r in m.replacement]
    m["is_next"] = [list(r) == [int(n)] for r, n in zip(m.replacement, m.next_expert)]
    return (m.groupby("model", sort=False)
            .agg(records=("leak", "size"), max_leak=("leak", "max"), masked_selected=("masked_selected", "sum"),
                 one_replacement=("one", "mean"), next_ranked=("is_next", "mean"))
            .reset_index())


def replacement_text(summary: pd.DataFrame) -> str:
    """The sentence on the mask's leak and replacement from :func:`replacement_summary`."""
    n = int(summary.records.sum())
    leak = float(summary.max_leak.max())
    share = float((summary.next_ranked * summary.records).sum() / n)
    per = ", ".join(f"{r.model} {r.next_ranked:.1%}" for r in summary.itertuples())
    sel = int(summary.masked_selected.sum())
    return ((f"No masked expert kept any combine weight: the leak is exactly 0 in all {n:,} mask records" if leak == 0 else
             f"The leak reaches {leak:.3g} (it must be 0): the mask did not remove every expert")
            + (", and the masked router never selected a masked expert. " if sel == 0 else
               f"; the masked router still selected a masked expert (with weight 0) in {sel:,} "
               f"record{'' if sel == 1 else 's'}. ")
            + f"The masked expert's place went to the expert ranked next by the clean router's logits in {share:.1%} of "
            f"the records ({per}).")


def operator_comparison_text(comparison: pd.DataFrame, *, label_a: str, label_b: str, n: int, family: int,
                             alpha: float, power: float = 0.8) -> str:
    """The sentence on one pair of operators from :func:`compare_audit_variants` of their cells.

    Gives the largest and the median |d_z(a) - d_z(b)| over the cells, the largest half-width of the
    paired-bootstrap intervals, how many intervals exclude zero (beyond :data:`DDZ_TOLERANCE`), the
    verdicts that change under the dual rule (Bonferroni within each model's family of ``family``
    metric cells, or of its control cells, at ``alpha``) and under uncorrected ``p_t < alpha``, and
    how many cells pass the dual rule under each operator (``dual_a``, ``dual_b``), and the power of
    the dual rule's verdicts: the smallest |d_z| a two-sided paired t-test on ``n`` positions (the
    fewest of any cell) detects with ``power`` at ``alpha / family`` (:func:`moeaudit.stats.min_detectable_dz`).
    ``ValueError`` for an empty comparison.
    """
    if comparison.empty:
        raise ValueError("the comparison has no cell")
    a = comparison.ddz.abs()
    half = float(((comparison.ddz_hi - comparison.ddz_lo) / 2).max())
    excl, fd, fp = int(comparison.ci_excludes_0.sum()), int(comparison.flip_dual.sum()), int(comparison.flip_p05.sum())
    mde = min_detectable_dz(n, alpha=alpha / family, power=power)
    verdicts = ("no verdict changes under the dual rule" if fd == 0 else
                f"{fd} verdict{' changes' if fd == 1 else 's change'} under the dual rule")
    passing = (f"{int(comparison.dual_a.sum())} cells pass the dual rule under {label_a} and "
               f"{int(comparison.dual_b.sum())} under {label_b}; ")
    return (f"**{label_a} against {label_b}**: |d_z({label_a}) − d_z({label_b})| is at most {a.max():.3f} "
            f"(median {a.median():.3f}) over {len(comparison)} cells, the 95% intervals reach ±{half:.3f} and "
            f"{excl} of them exclude{'s' if excl == 1 else ''} zero. {passing}{verdicts} (Bonferroni within each model's "
            f"family, at {alpha:g}) and {fp} under uncorrected p_t below {alpha:g}. With at least n = {n} positions per cell, "
            f"the paired t-test alone detects |d_z| ≥ {mde:.2f} with power {power:g} at the level of a family of "
            f"{family} metric cells (the dual rule, which also needs the Wilcoxon test, detects less; a control family "
            f"is smaller and detects a little more), so a cell whose effect is smaller can flip between operators by "
            f"chance or stay unresolved under both.")


def check_09_intervention_definitions_4(answer, records: dict, *, model: str) -> AnswerCheck:
    """Exercise 4 of the intervention-definitions chapter: the share of ``model``'s single-expert
    ablations whose loss change is smaller in size under mean replacement than under removal,
    ``|Delta_mean| < |Delta_remove|``, matched on (``seq_id``, ``t``, ``layer``, ``expert``).

    ``records``: ``{operator: records}`` with at least ``"remove"`` and ``"mean"`` (the records of
    several models, with a ``model`` column). Right within 0.005 (the page prints a percentage with
    one decimal). ``ValueError`` for a missing operator, a model without matched records, or an
    answer that is not a number.
    """
    missing = [op for op in ("remove", "mean") if op not in records]
    if missing:
        raise ValueError(f"records lack the operator(s) {missing}; give {{operator: records}} for 'remove' and 'mean'")
    expected = mean_smaller_share(records["remove"], records["mean"], model=model)
    return check_answer(answer, expected, what=f"the share of {model}'s ablations with |Δ_mean| < |Δ_remove|",
                        tolerance=0.005)


def mean_smaller_share(remove: pd.DataFrame, mean: pd.DataFrame, *, model: str) -> float:
    """Share of ``model``'s matched single-expert ablations (``seq_id``, ``t``, ``layer``, ``expert``)
    with ``|delta_loss|`` under mean replacement strictly below that under removal. ``ValueError``
    when nothing is matched."""
    key = ["seq_id", "t", "layer", "expert"]
    m = remove[remove.model == model][key + ["delta_loss"]].merge(
        mean[mean.model == model][key + ["delta_loss"]], on=key, suffixes=("_remove", "_mean"))
    if m.empty:
        raise ValueError(f"no ablation of model {model!r} is matched between the remove and mean records")
    return float((m.delta_loss_mean.abs() < m.delta_loss_remove.abs()).mean())
