"""Observational expert metrics (paper, Section 2), computed over real tokens of a clean pass.

For expert i at layer L, over the N real tokens of the corpus and the set S_i of tokens whose
top-k selects i:

* ``utilization_rate``    = |S_i| / N                       (share of tokens that select i)
* ``mean_routing_weight`` = mean_{t in S_i} g_i(x_t)        (softmax router probability)
* ``activation_norm``     = mean_{t in S_i} ||E_i(x_t)||_2
* ``activation_std``      = std_{t in S_i} ||E_i(x_t)||_2    (ddof = 1)

An expert that is never selected gets ``n_selected = 0``, ``utilization_rate = 0`` and NaN for
the three metrics that are defined over its selections (``activation_std`` is also NaN for a
single selection).
"""

from __future__ import annotations

import nnsight
import numpy as np
import pandas as pd

from .corpus import integer_ids
from .engine import CleanPass, routing_in_trace
from .names import METRIC_LABELS, METRICS, RANKINGS, ROUTING_WEIGHT  # noqa: F401  (the metric keys, defined in names)
from .stats import spearman_defined


def check_rankings(rankings) -> list[str]:
    bad = [r for r in rankings if r not in RANKINGS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid metrics are {list(RANKINGS)}")
    return list(rankings)


def expert_metrics_from_routing(indices: np.ndarray, probs: np.ndarray, norms: np.ndarray, *,
                                num_experts: int) -> pd.DataFrame:
    """The four metrics per expert from (N, k) arrays of selected experts, their probabilities and
    output norms. Pure numpy/pandas so it can be checked on a hand-built routing pattern."""
    n_tokens = indices.shape[0]
    flat = pd.DataFrame({"expert": indices.reshape(-1), "prob": probs.reshape(-1).astype(np.float64),
                         "norm": norms.reshape(-1).astype(np.float64)})
    agg = flat.groupby("expert").agg(n_selected=("prob", "size"), mean_routing_weight=("prob", "mean"),
                                     activation_norm=("norm", "mean"), activation_std=("norm", lambda s: s.std(ddof=1)))
    out = agg.reindex(range(num_experts))
    out.index.name = "expert"
    out["n_selected"] = out["n_selected"].fillna(0).astype(np.int64)
    out["n_tokens"] = n_tokens
    out["utilization_rate"] = out["n_selected"] / n_tokens
    return out.reset_index()[["expert", "n_selected", "n_tokens", *METRICS]]


def observational_metrics(clean: CleanPass, *, num_experts: int, layers=None) -> pd.DataFrame:
    """Tidy table: one row per (layer, expert) with ``n_selected``, ``n_tokens`` and the four metrics."""
    layers = sorted(clean.routing) if layers is None else list(layers)
    frames = []
    for L in layers:
        r = clean.routing[L]
        df = expert_metrics_from_routing(r["indices"], r["prob"], r["norm"], num_experts=num_experts)
        df.insert(0, "layer", L)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# --- Expert-pruning criteria from the literature, and per-token predictors -----------------------

#: per-expert criteria of the expert-pruning literature (computed on a calibration corpus by
#: :func:`pruning_criteria`): the frequency-weighted activation norm
#: ``(1/N) sum_{s in S_e} ||E_e(x_s)||`` (mean output norm times utilisation, of the kind benchmarked
#: by Jaiswal et al. 2025, MC-Suite; REAP's ``ean_sum`` over N tokens) and REAP's own score
#: (:func:`reap_score`)
LITERATURE_CRITERIA = ("freq_weighted_norm", "reap")
#: per-token predictors of a single-expert ablation's effect (read at the audited token)
TOKEN_PREDICTORS = ("gap_norm", "attribution")
CRITERION_LABELS = {**METRIC_LABELS, "gap_norm": "Per-token gap norm", "attribution": "Attribution patching",
                    "freq_weighted_norm": "Freq.-weighted act. norm", "reap": "REAP"}


# --- REAP's pruning criteria ----------------------------------------------------------------------
#
# Each function below follows the definition in the reference code of REAP (Lasby et al. 2025),
# repository CerebrasResearch/reap at commit REAP_COMMIT; "file:line" refers to that commit. Over
# one MoE layer, REAP's observer (src/reap/observer.py:340-395) keeps the real tokens of every
# calibration batch (padding dropped through the attention mask), selects S_e, the tokens whose
# top-k of the raw router logits contains e (observer.py:356, 377), and computes the output
# E_e(x) of every expert without its combine weight (observer.py:351-383); its router weight
# g_e(x) is the softmax over all E router logits, renormalised over the selected top-k when
# asked (:func:`reap_router_weights`). The per-batch values of src/reap/pruning_metrics.py:186-202
# are summed over batches (pruning_metrics.py:204-214): in float64 for the sums, as
# count-weighted running means in float32 (``OnlineStatsTracker``, src/reap/metrics.py:218-286)
# for the means, which equal the mean over all routed tokens. Here every criterion is one pass
# over the (N, k) routing arrays of the calibration tokens, accumulated in float64, and S_e is the
# model's own top-k: the same set as REAP's wherever the model selects the top-k of its softmax or
# of its logits, not where a selection bias decides (ERNIE-4.5, DeepSeek-V3-style routers). An
# expert never routed scores 0 on every REAP criterion, as in REAP (zero-initialised state, NaN
# replaced by 0), and REAP prunes the lowest scores of a layer (src/reap/prune.py:84-103). Norms
# are Euclidean, unitless like the hidden states.

#: the commit of CerebrasResearch/reap whose definitions the REAP criteria below follow
REAP_COMMIT = "1970473c51ca3caeb98c10392f15b3a08a672974"
#: REAP's pruning criteria, named as the ``prune_method`` choices of its ``src/reap/args.py:487-503``
#: (at :data:`REAP_COMMIT`), plus the super-expert score; each is a column of
#: :func:`reap_criteria_from_routing` (higher = more important). Two choices are left out:
#: ``weighted_ean_sum_l2`` and ``reap_l2`` are listed there but computed nowhere in REAP's code
#: (its observer state has no such key, so ``prune.py:95-100`` stops with a ``ValueError``).
REAP_CRITERIA = ("frequency", "ean_ca", "ean_sum", "ean_mean", "weighted_frequency_sum", "weighted_ean_sum", "reap",
                 "max_activations", "super_expert")
CRITERION_LABELS.update({"frequency": "Frequency", "ean_ca": "EAN of the mean output", "ean_sum": "EAN sum",
                         "ean_mean": "EAN mean", "weighted_frequency_sum": "Weighted frequency",
                         "weighted_ean_sum": "Weighted EAN sum", "max_activations": "Max. activation",
                         "super_expert": "Super-expert score"})


def _routed_arrays(indices, values, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened expert ids and float64 values of (N, k) arrays; ``ValueError`` on a shape mismatch, a
    non-2-D array or an expert id outside ``[0, num_experts)``."""
    idx, val = np.asarray(indices), np.asarray(values, dtype=np.float64)
    if idx.ndim != 2 or idx.shape != val.shape:
        raise ValueError(f"indices and values must be (N, k) arrays of one shape, got {idx.shape} and {val.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {idx.min()}..{idx.max()}")
    return idx.reshape(-1).astype(np.int64), val.reshape(-1)


def routed_sum(indices, values, *, num_experts: int) -> np.ndarray:
    """``sum_{s in S_e} v_s`` per expert (E,), float64 accumulation; ``indices``/``values``: (N, k),
    ``S_e`` the slots routed to e. 0 for an expert never routed."""
    idx, val = _routed_arrays(indices, values, num_experts)
    return np.bincount(idx, weights=val, minlength=num_experts).astype(np.float64)


def routed_mean(indices, values, *, num_experts: int) -> np.ndarray:
    """``(1/|S_e|) sum_{s in S_e} v_s`` per expert (E,), float64; NaN for an expert never routed."""
    idx, _ = _routed_arrays(indices, values, num_experts)
    n = np.bincount(idx, minlength=num_experts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, routed_sum(indices, values, num_experts=num_experts) / n, np.nan)


def routed_max(indices, values, *, num_experts: int) -> np.ndarray:
    """``max_{s in S_e} v_s`` per expert (E,), float64; NaN for an expert never routed."""
    idx, val = _routed_arrays(indices, values, num_experts)
    out = np.full(num_experts, np.nan)
    np.fmax.at(out, idx, val)
    return out


def reap_router_weights(probs, *, renormalize: bool) -> np.ndarray:
    """REAP's router weight ``g_e(x_s)`` at the selected slots, (N, k) float64.

    ``probs`` (N, k): the router's softmax probability over all E experts, ``softmax(logits)_e``, at
    each token's selected experts (the clean pass's ``prob`` for a softmax-routed family). REAP
    (CerebrasResearch/reap at :data:`REAP_COMMIT`, src/reap/pruning_metrics.py:172-184) uses this
    probability as it is, or, with ``renormalize``, divided by its sum over the token's k selected
    experts, ``p_e / sum_{j in top-k} p_j``, then clamped below at the float32 machine epsilon.
    Whether REAP renormalises is :func:`reap_renormalizes`. ``ValueError`` unless ``probs`` is a
    2-D array of values in [0, 1] (and, to renormalise, every row sum is positive); ``TypeError``
    unless ``renormalize`` is a bool (a string such as ``"no"`` would read as true)."""
    if not isinstance(renormalize, (bool, np.bool_)):
        raise TypeError(f"renormalize must be True or False, got {renormalize!r}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be an (N, k) array, got shape {p.shape}")
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1 + 1e-6):
        raise ValueError("probs must be softmax probabilities in [0, 1]")
    if not renormalize:
        return p
    total = p.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("a token's selected probabilities sum to 0: nothing to renormalise")
    return np.maximum(p / total, float(np.finfo(np.float32).eps))


def reap_renormalizes(model, *, renormalize_router_weights: bool = True) -> bool:
    """Whether REAP's observer renormalises the router weights of ``model`` (an
    :class:`moeaudit.models.AuditModel`) over the top-k: ``renormalize_router_weights`` (REAP's
    option, ``True`` by default: src/reap/args.py:141-148) and the config's ``norm_topk_prob``
    attribute, ``False`` where the config has none (src/reap/main.py:121-124; CerebrasResearch/reap
    at :data:`REAP_COMMIT`). The rule reads the config attribute, not the model's behaviour:
    Mixtral renormalises by construction, but its config has no ``norm_topk_prob``, so REAP weights
    it by the full softmax probability.

    ``ValueError`` for a family whose recorded routing weight is not the softmax over all experts
    (sigmoid routers, :attr:`moeaudit.families.FamilySpec.routing_weight`): REAP applies a softmax
    to the router logits whatever the router, and the clean pass does not record that quantity for
    them."""
    spec = model.layout.spec
    if spec.routing_weight != "softmax":
        raise ValueError(f"REAP weights by softmax(router logits); the {spec.name} clean pass records "
                         f"{spec.routing_weight} router weights, so REAP's weighted criteria cannot be formed from it")
    return bool(renormalize_router_weights and getattr(model.hf.config, "norm_topk_prob", False))


def frequency(indices, *, num_experts: int) -> np.ndarray:
    """REAP's ``frequency``: ``|S_e|``, the number of calibration tokens whose top-k selects e, (E,)
    float64 (a count; 0 for an expert never routed). ``indices``: (N, k). CerebrasResearch/reap at
    :data:`REAP_COMMIT`: ``expert_frequency``, src/reap/pruning_metrics.py:114-121 (the prune
    method is mapped to that key at src/reap/prune.py:93-94)."""
    return routed_sum(indices, np.ones(np.shape(indices)), num_experts=num_experts)


def ean_sum(indices, norms, *, num_experts: int) -> np.ndarray:
    """REAP's ``ean_sum`` (expert activation norm): ``sum_{s in S_e} ||E_e(x_s)||_2``, (E,) float64,
    0 for an expert never routed. ``indices``/``norms``: (N, k), ``norms`` the output norms of the
    selected experts without their combine weight. CerebrasResearch/reap at :data:`REAP_COMMIT`,
    src/reap/pruning_metrics.py:193-194."""
    return routed_sum(indices, norms, num_experts=num_experts)


def ean_mean(indices, norms, *, num_experts: int) -> np.ndarray:
    """REAP's ``ean_mean``: ``(1/|S_e|) sum_{s in S_e} ||E_e(x_s)||_2`` (the paper's activation norm),
    (E,) float64; 0 for an expert never routed, as REAP's running mean starts at 0.
    ``indices``/``norms``: (N, k). CerebrasResearch/reap at :data:`REAP_COMMIT`,
    src/reap/pruning_metrics.py:195 and 205-207."""
    return np.nan_to_num(routed_mean(indices, norms, num_experts=num_experts), nan=0.0)


def ean_ca(means) -> np.ndarray:
    """REAP's ``ean_ca``: ``||(1/|S_e|) sum_{s in S_e} E_e(x_s)||_2``, the norm of the expert's mean
    output over its routed tokens (its "routed characteristic activation"), (E,) float64.

    ``means`` (E, H): that mean output per expert (:attr:`moeaudit.engine.ExpertMeans.means`); a
    NaN entry (an expert never routed) counts as 0, as REAP replaces the NaN of 0/0 by 0, so such an
    expert scores 0. CerebrasResearch/reap at :data:`REAP_COMMIT`: src/reap/metrics.py:178-215
    (the mean), src/reap/observer.py:412-428 (kept over batches), src/reap/prune.py:84-90 (the
    norm). ``ValueError`` unless ``means`` is 2-D."""
    m = np.asarray(means, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"means must be an (E, H) array, got shape {m.shape}")
    return np.linalg.norm(np.nan_to_num(m, nan=0.0), axis=1)


def weighted_frequency_sum(indices, weights, *, num_experts: int) -> np.ndarray:
    """REAP's ``weighted_frequency_sum`` (observer key ``weighted_expert_frequency_sum``):
    ``sum_{s in S_e} g_e(x_s)``, (E,) float64, 0 for an expert never routed. ``indices``/``weights``:
    (N, k), ``weights`` REAP's router weights (:func:`reap_router_weights`). CerebrasResearch/reap
    at :data:`REAP_COMMIT`, src/reap/pruning_metrics.py:192 and 196."""
    return routed_sum(indices, weights, num_experts=num_experts)


def weighted_ean_sum(indices, weights, norms, *, num_experts: int) -> np.ndarray:
    """REAP's ``weighted_ean_sum``: ``sum_{s in S_e} g_e(x_s) ||E_e(x_s)||_2``, (E,) float64, 0 for an
    expert never routed. ``indices``/``weights``/``norms``: (N, k), ``weights`` REAP's router
    weights (:func:`reap_router_weights`). CerebrasResearch/reap at :data:`REAP_COMMIT`,
    src/reap/pruning_metrics.py:197."""
    return routed_sum(indices, np.asarray(weights, np.float64) * np.asarray(norms, np.float64), num_experts=num_experts)


def reap_score(indices, weights, norms, *, num_experts: int) -> np.ndarray:
    """REAP (Lasby et al. 2025, Eq. 9; prune method ``reap``):
    ``(1/|S_e|) sum_{s in S_e} g_e(x_s) ||E_e(x_s)||_2``, (E,) float64; 0 for an expert never routed,
    as REAP's running mean starts at 0. ``indices``/``weights``/``norms``: (N, k), ``weights``
    REAP's router weights (:func:`reap_router_weights`). CerebrasResearch/reap at
    :data:`REAP_COMMIT`, src/reap/pruning_metrics.py:198 and 209-211."""
    g = np.asarray(weights, np.float64) * np.asarray(norms, np.float64)
    return np.nan_to_num(routed_mean(indices, g, num_experts=num_experts), nan=0.0)


def max_activations(indices, slot_max, *, num_experts: int) -> np.ndarray:
    """REAP's ``max_activations``: ``max(0, max_{s in S_e} max_h E_e(x_s)_h)``, the largest (signed)
    element of the expert's output over its routed tokens, floored at 0 because REAP's running
    maximum starts at 0; (E,) float64, 0 for an expert never routed. ``slot_max`` (N, k): per
    routed slot the largest element of that expert's output
    (:attr:`moeaudit.engine.ExpertMeans.slot_max`). CerebrasResearch/reap at :data:`REAP_COMMIT`,
    src/reap/pruning_metrics.py:61-63 and 200-202."""
    return np.maximum(np.nan_to_num(routed_max(indices, slot_max, num_experts=num_experts), nan=0.0), 0.0)


def super_expert_score(indices, slot_max_abs, *, num_experts: int) -> np.ndarray:
    """Super-expert score: ``max_{s in S_e} max_h |E_e(x_s)_h|`` (E,), the largest absolute element of
    the expert's down-projection output over the tokens routed to it. Su et al. (2025, arXiv
    2507.23279) call "super experts" the few experts whose down-projection outputs carry extreme
    activation outliers; this score is that magnitude, before any threshold (the paper flags
    experts whose outlier is extreme relative to all experts' outliers). Not one of REAP's
    criteria (REAP thresholds its ``max_activations`` to find super experts,
    src/reap/model_util.py:240). ``slot_max_abs`` (N, k):
    :attr:`moeaudit.engine.ExpertMeans.slot_max_abs`. NaN if never routed."""
    return routed_max(indices, slot_max_abs, num_experts=num_experts)


def reap_criteria_from_routing(indices, probs, norms, *, num_experts: int, renormalize: bool, means=None,
                               slot_max=None, slot_max_abs=None) -> pd.DataFrame:
    """Every criterion of :data:`REAP_CRITERIA` per expert, one row per expert 0..num_experts-1.

    ``indices`` (selected experts), ``probs`` (the router's softmax probability over all experts at
    the selected slots, the clean pass's ``prob``) and ``norms`` (||E_e(x_s)||_2, without the
    combine weight): (N, k) over N calibration tokens. REAP's router weight is
    :func:`reap_router_weights` of ``probs`` with ``renormalize`` (:func:`reap_renormalizes` gives
    REAP's choice for a model). ``means`` (E, H) feeds ``ean_ca``; ``slot_max``/``slot_max_abs``
    (N, k, aligned with ``indices``) feed ``max_activations``/``super_expert``; a column whose input
    is not given is NaN. ``ValueError`` for mismatched shapes, an expert id out of range, or
    ``means`` with other than ``num_experts`` rows, and for ``norms`` that are not finite and >= 0
    (REAP would score such an expert 0, as if never routed: a failed forward must not look like an
    unimportant expert)."""
    kw = {"num_experts": num_experts}
    g = reap_router_weights(probs, renormalize=renormalize)
    nrm = np.asarray(norms, dtype=np.float64)
    if nrm.size and not (np.isfinite(nrm).all() and nrm.min() >= 0):
        raise ValueError("norms must be finite and >= 0 (output norms ||E_e(x)||); got NaN, inf or a negative value")
    out = pd.DataFrame({"expert": np.arange(num_experts), "frequency": frequency(indices, **kw), "ean_ca": np.nan,
                        "ean_sum": ean_sum(indices, norms, **kw), "ean_mean": ean_mean(indices, norms, **kw),
                        "weighted_frequency_sum": weighted_frequency_sum(indices, g, **kw),
                        "weighted_ean_sum": weighted_ean_sum(indices, g, norms, **kw),
                        "reap": reap_score(indices, g, norms, **kw)})
    if means is not None:
        if np.shape(means)[0] != num_experts:
            raise ValueError(f"means must have one row per expert ({num_experts}), got {np.shape(means)[0]}")
        out["ean_ca"] = ean_ca(means)
    out["max_activations"] = np.nan if slot_max is None else max_activations(indices, slot_max, **kw)
    out["super_expert"] = np.nan if slot_max_abs is None else super_expert_score(indices, slot_max_abs, **kw)
    return out[["expert", *REAP_CRITERIA]]


def pruning_criteria(clean: CleanPass, *, num_experts: int, renormalize: bool, seq_ids=None,
                     layers=None) -> pd.DataFrame:
    """Every per-expert criterion — the paper's four metrics (:func:`expert_metrics_from_routing`)
    and the literature criteria (:data:`LITERATURE_CRITERIA`) — over the real tokens of the texts
    ``seq_ids`` of a clean pass (all texts when None). One row per (layer, expert).

    The literature criteria come from :func:`reap_criteria_from_routing` (REAP's definitions, REAP's
    router weight with ``renormalize``, which :func:`reap_renormalizes` gives for a model):
    ``reap`` is REAP's score, ``freq_weighted_norm`` its ``ean_sum`` divided by the number N of
    calibration tokens. An expert never routed scores 0 on both.

    ``IndexError`` for a text id outside the clean pass or an empty selection; ``ValueError`` for a
    layer the clean pass did not record."""
    if seq_ids is None:
        keep = np.ones(len(clean.tokens), bool)
    else:
        ids = integer_ids(seq_ids, "seq_ids")
        n_seq = len(clean.offsets)
        bad = [i for i in ids if not 0 <= i < n_seq]
        if bad or not ids:
            raise IndexError(f"seq_ids must be a non-empty selection of text ids 0..{n_seq - 1} of the clean pass; "
                             f"got {'nothing' if not ids else 'out-of-range ids ' + str(bad[:5])}")
        keep = clean.tokens.seq_id.isin(ids).to_numpy()
    frames = []
    for L in (sorted(clean.routing) if layers is None else list(layers)):
        r = clean.layer_routing(L)
        idx, prob, norm = r["indices"][keep], r["prob"][keep], r["norm"][keep]
        df = expert_metrics_from_routing(idx, prob, norm, num_experts=num_experts)
        reap = reap_criteria_from_routing(idx, prob, norm, num_experts=num_experts, renormalize=renormalize)
        df["freq_weighted_norm"] = reap.ean_sum.to_numpy() / idx.shape[0]
        df["reap"] = reap.reap.to_numpy()
        df.insert(0, "layer", L)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def token_gap_norm(clean: CleanPass, records: pd.DataFrame) -> np.ndarray:
    """Per-token gap norm g_e(x_t) ||E_e(x_t)||_2 of every record, predicted from the clean pass.

    ``records`` needs ``layer``, ``seq_id``, ``t``, ``expert`` and ``weight`` (the combine weight
    g_e(x_t)); the output norm is read from ``clean.routing[layer]["norm"]`` in the slot of the
    record's expert. This is the size of what a ``token``-mode ablation removes from the MoE
    output at t. NaN where the expert is not active at that token; ``ValueError`` for a layer the
    clean pass did not record.
    """
    out = np.full(len(records), np.nan)
    layer = records.layer.to_numpy()
    rows = clean.row(records.seq_id.to_numpy(), records.t.to_numpy())
    expert = records.expert.to_numpy()
    for L in np.unique(layer):
        if int(L) not in clean.routing:
            raise ValueError(f"layer {L} was not recorded in the clean pass")
        m = layer == L
        r = clean.routing[int(L)]
        hit = r["indices"][rows[m]] == expert[m][:, None]
        norm = np.where(hit, r["norm"][rows[m]], 0.0).sum(1)
        out[m] = np.where(hit.any(1), norm, np.nan)
    return records.weight.to_numpy(dtype=np.float64) * out


def paired_by_value(records: pd.DataFrame, value_col: str, *, ranking: str) -> pd.DataFrame:
    """The paper's paired cells (Section 2, Definition 2.1) for any per-record value.

    At every (layer, seq_id, t) of the single-expert ``records``, the active expert with the
    highest ``value_col`` ("high") and the one with the lowest ("low"); records whose value is NaN
    are left out. Ties are broken by expert id, lowest id wins "high" and highest id wins "low",
    as in :func:`moeaudit.audit.paired_cells`; a position where high and low coincide is dropped.
    One row per position with ``expert_high/low``, ``value_high/low``, ``delta_loss_high/low`` and
    ``diff = delta_loss_high - delta_loss_low`` (nats), ``ranking`` set to ``ranking``.
    """
    df = records.assign(value=records[value_col]).dropna(subset=["value"])
    keys = ["layer", "seq_id", "t"]
    high = (df.sort_values([*keys, "value", "expert"], ascending=[True, True, True, False, True])
            .groupby(keys, sort=False).head(1).set_index(keys))
    low = (df.sort_values([*keys, "value", "expert"], ascending=[True, True, True, True, False])
           .groupby(keys, sort=False).head(1).set_index(keys))
    cols = ["expert", "value", "delta_loss"]
    lead = [c for c in ("model", "family", "mode") if c in df.columns]
    pair = high[[*lead, *cols]].merge(low[cols], left_index=True, right_index=True, suffixes=("_high", "_low"))
    pair = pair[pair.expert_high != pair.expert_low].reset_index()
    pair.insert(3, "ranking", ranking)
    pair["diff"] = pair.delta_loss_high - pair.delta_loss_low
    return pair.sort_values(keys).reset_index(drop=True)


# --- Describing the observational metrics (chapter 3) --------------------------------------------

def metric_depth_trend(metrics: pd.DataFrame, *, columns=METRICS) -> dict[str, float]:
    """Spearman rho between the layer index and each metric's per-layer median over experts.

    ``metrics``: the rows of one model (:func:`observational_metrics`: ``layer`` and the metric
    columns). Medians skip NaN (never-selected experts); rho from
    :func:`moeaudit.stats.spearman_defined`, NaN with fewer than 3 layers or a constant median.
    """

    med = metrics.groupby("layer")[list(columns)].median()
    return {c: spearman_defined(med.index.to_numpy(float), med[c].to_numpy(float))[0] for c in columns}


def metric_rank_correlations(layer_metrics: pd.DataFrame, *, min_selected: int = 2,
                             columns=METRICS) -> tuple[pd.DataFrame, int]:
    """Spearman rho between every pair of metrics across the experts of one layer.

    Experts with ``n_selected >= min_selected`` and every metric finite enter (with 2 selections
    all four metrics are defined); rho is the Pearson correlation of the ranks (average ranks for
    ties), i.e. Spearman's. Returns the (metric × metric) matrix and the number of experts used.
    """
    d = layer_metrics[layer_metrics.n_selected >= min_selected][list(columns)].dropna()
    return d.rank().corr(method="pearson"), len(d)


def load_balance(utilization: np.ndarray, n_selected: np.ndarray, *, top_k: int, num_experts: int) -> dict:
    """How evenly one layer's router spreads its selections over the experts.

    ``utilization``/``n_selected``: per expert (length ``num_experts``), as in
    :func:`expert_metrics_from_routing`. The uniform share is ``top_k / num_experts``. Returns
    ``never`` (experts never selected), ``rare`` (selected 1–9 times), ``max_rel``/``min_rel``
    (highest/lowest utilisation over the uniform share), ``cv`` (std/mean of utilisation, ddof=0),
    ``top10_share`` (share of all selections made by the most-selected tenth of the experts, at
    least one expert). ``ValueError`` on length mismatch or no selections.
    """
    u, n = np.asarray(utilization, float), np.asarray(n_selected)
    if len(u) != num_experts or len(n) != num_experts:
        raise ValueError(f"expected {num_experts} experts, got {len(u)} and {len(n)}")
    if u.sum() <= 0:
        raise ValueError("no selections")
    share = top_k / num_experts
    top = np.sort(u)[::-1][:max(1, num_experts // 10)]
    return {"never": int((n == 0).sum()), "rare": int(((n > 0) & (n < 10)).sum()),
            "max_rel": float(u.max() / share), "min_rel": float(u.min() / share),
            "cv": float(u.std() / u.mean()), "top10_share": float(top.sum() / u.sum())}


def pick_active(idx: np.ndarray, score: np.ndarray, *, high: bool) -> np.ndarray:
    """At each token (row of the (N, k) array ``idx`` of selected experts), the selected expert
    that the per-expert ``score`` (length num_experts) ranks highest (``high=True``) or lowest.

    NaN scores rank last either way; ties go to the lowest expert id for 'high' and the highest
    for 'low', as in :func:`moeaudit.audit.paired_cells`. Returns an (N,) array of expert ids.
    """
    idx = np.asarray(idx)
    v = np.asarray(score, float)[idx]
    key = np.where(np.isnan(v), -np.inf if high else np.inf, v)
    order = np.lexsort((idx if high else -idx, -key if high else key), axis=1)
    return idx[np.arange(len(idx)), order[:, 0]]


def accumulate_router_sums(acc: dict, logits: np.ndarray, indices: np.ndarray, pad: np.ndarray) -> dict:
    """Add one batch to per-expert sums over real and padding positions (in place; returns ``acc``).

    ``logits`` (P, E) router logits, ``indices`` (P, k) selected experts and ``pad`` (P,) bool for
    P flattened positions. ``acc`` holds length-E arrays ``logit_real``, ``logit_pad`` (summed
    logits) and ``sel_real``, ``sel_pad`` (selection counts), and the counts ``n_real``, ``n_pad``.
    """
    pad = np.asarray(pad, bool)
    E = acc["logit_real"].shape[0]
    acc["logit_real"] += logits[~pad].sum(0)
    acc["logit_pad"] += logits[pad].sum(0)
    acc["sel_real"] += np.bincount(indices[~pad].reshape(-1), minlength=E)
    acc["sel_pad"] += np.bincount(indices[pad].reshape(-1), minlength=E)
    acc["n_real"] += int((~pad).sum())
    acc["n_pad"] += int(pad.sum())
    return acc


def router_sums_real_and_padding(model, corpus, *, batch_size: int = 8) -> dict:
    """Per MoE layer, router-logit sums and selection counts over real and padding positions.

    The corpus is right-padded to its longest text (``model.pad_id``, attention mask 0) and run in
    batches of ``batch_size`` texts; inside one nnsight trace per batch the router logits and top-k
    indices of every MoE layer (:func:`moeaudit.engine.routing_in_trace`) are saved and
    accumulated with :func:`accumulate_router_sums`. Returns ``{layer: acc}`` plus ``width``.
    This re-creates the released statistics pass, which reads every padded position.
    """
    import torch  # noqa: PLC0415

    E, moe = model.layout.num_experts, list(model.layout.moe_layers)
    width = int(corpus.lengths.max())
    acc = {L: {"logit_real": np.zeros(E), "logit_pad": np.zeros(E), "sel_real": np.zeros(E), "sel_pad": np.zeros(E),
               "n_real": 0, "n_pad": 0} for L in moe}
    with torch.no_grad():
        for b in range(0, len(corpus), batch_size):
            ids, mask = corpus.padded(list(range(b, min(b + batch_size, len(corpus)))), pad_id=model.pad_id,
                                      length=width)
            saved = {}
            with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                remote=model.remote):
                for L in moe:
                    r_logits, _w, r_idx = routing_in_trace(model, L)
                    saved[L] = (r_logits.save(), r_idx.save())
                nnsight.save(saved)  # a server returns saved values only, not the dict's mutation
            pad = (mask.reshape(-1) == 0).numpy()
            for L, (lg, ix) in saved.items():
                accumulate_router_sums(acc[L], lg.reshape(pad.size, -1).float().cpu().numpy(),
                                       ix.reshape(pad.size, -1).cpu().numpy(), pad)
    return {"layers": acc, "width": width}


#: the released code's utilisation variants that can be re-created from real and padding sums
RELEASED_UTILISATION_VARIANTS = ("mean logit, real tokens", "mean logit, padded", "selection share, padded")


def released_utilisation_variants(utilization: np.ndarray, acc: dict, *, pad_share: float) -> dict[str, np.ndarray]:
    """The released code's versions of utilisation, per expert, from one layer's sums.

    ``utilization``: the paper's (selected share of real tokens); ``acc``: one layer of
    :func:`router_sums_real_and_padding`; ``pad_share``: the share ``p`` of padding positions to
    mix in (0.62 in the released OLMoE statistics run). Variants:
    ``mean logit, real tokens`` = sum of logits / n_real; ``mean logit, padded`` =
    ``(1 - p) * mean logit over real + p * mean logit over padding``; ``selection share, padded``
    = ``(1 - p) * utilization + p * selections at padding / n_pad``. The padded variants are left
    out when there is no padding. ``ValueError`` unless 0 <= pad_share < 1.
    """
    if not 0 <= pad_share < 1:
        raise ValueError(f"pad_share must be in [0, 1), got {pad_share}")
    p = pad_share
    real = acc["logit_real"] / max(acc["n_real"], 1)
    out = {RELEASED_UTILISATION_VARIANTS[0]: real}
    if acc["n_pad"]:
        out[RELEASED_UTILISATION_VARIANTS[1]] = (1 - p) * real + p * acc["logit_pad"] / acc["n_pad"]
        out[RELEASED_UTILISATION_VARIANTS[2]] = (1 - p) * np.asarray(utilization, float) + p * acc["sel_pad"] / acc["n_pad"]
    return out


def ranking_agreement(idx: np.ndarray, reference: np.ndarray, score: np.ndarray) -> dict:
    """How far a per-expert ``score`` ranks one layer's experts as ``reference`` does.

    ``rho``: Spearman rho across experts (:func:`moeaudit.stats.spearman_defined`); ``same_high``
    / ``same_low``: share of tokens (rows of the (N, k) ``idx``) at which :func:`pick_active`
    picks the same highest / lowest selected expert under both scores.
    """

    return {"rho": spearman_defined(reference, score)[0],
            "same_high": float(np.mean(pick_active(idx, score, high=True) == pick_active(idx, reference, high=True))),
            "same_low": float(np.mean(pick_active(idx, score, high=False) == pick_active(idx, reference, high=False)))}


def padding_summary(pad_stats: dict, audited: dict, *, top_k: dict) -> dict:
    """How the released statistics pass's padding looks, per model, from
    :func:`router_sums_real_and_padding` results ``pad_stats[model]`` at the ``audited[model]``
    layers: ``top_share[(model, layer)]`` = share of the selections at padding positions that go
    to the layer's ``top_k[model]`` most-selected experts (layers with padding only), and
    ``pad_percent[model]`` = padding positions as a percentage of all positions of the padded
    corpus (read at the model's first audited layer)."""
    top_share = {}
    for name, st in pad_stats.items():
        for L in audited[name]:
            sel = np.asarray(st["layers"][L]["sel_pad"], dtype=np.float64)
            if sel.sum():
                top_share[name, L] = float(np.sort(sel)[::-1][:top_k[name]].sum() / sel.sum())
    pad_percent = {}
    for name, st in pad_stats.items():
        a = st["layers"][audited[name][0]]
        pad_percent[name] = 100.0 * a["n_pad"] / (a["n_pad"] + a["n_real"])
    return {"top_share": top_share, "pad_percent": pad_percent}
