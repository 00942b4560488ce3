"""Necessity against sufficiency: removing an expert from a clean run against restoring it in a corrupted one.

The paper measures *necessity* ("noising"): the next-token loss change ``Delta L`` when one active
expert's contribution is removed from a clean run (:func:`moeaudit.engine.run_ablations`).
Expert-aware causal tracing (arXiv 2606.03780), after ROME's causal tracing (Meng et al. 2022),
measures *sufficiency* ("denoising"): the input is corrupted with Gaussian noise on the embeddings
of a span of tokens, then one expert's clean contribution at one layer and token is put back
(:func:`moeaudit.engine.run_restorations`), and the share of the corruption's loss increase that
this undoes is read off:

    recovered = (L_corrupt - L_restored) / (L_corrupt - L_clean)      (dimensionless)

1 means the restoration undoes the whole corruption at that token, 0 nothing, a negative value
that it makes the corrupted prediction worse. A position whose corruption raises the loss by less
than ``min_gap`` nats is excluded (the denominator is near zero or negative there) and counted.

This module builds the requests (every active expert of every audited layer at sampled positions,
the corrupted span being the ``span_tokens`` tokens that end at ``t``), caches the records, adds the
recovered fraction, joins it with the removal records of the same positions and the observational
metrics, compares the rankings (Spearman's rho per layer with a bootstrap interval and Holm's
correction, and the within-position agreement of the top expert), and writes the chapter's sentences.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit import report, stats
from ..corpus import is_integer, sample_positions
from moeaudit.engine import CORRUPTION_SCALE, check_corruption_scale, run_restorations
from ..metrics import METRIC_LABELS, METRICS
from moeaudit.store import cached_records

#: the removal criterion (the paper's Delta L of the same expert at the same position and layer)
REMOVAL = "removal_delta_loss"
#: what the restoration ranking is compared with: removal first, then the observational metrics
CRITERIA = (REMOVAL, *METRICS)
CRITERION_LABELS = {REMOVAL: "Removal ΔL (necessity)", **METRIC_LABELS}
#: default exclusion threshold of the recovered fraction's denominator, nats
MIN_GAP = 0.05


def check_span_tokens(span_tokens) -> int:
    """``span_tokens`` as an int: how many tokens, ending at the audited token t, are corrupted.
    ``ValueError`` unless it is an integer >= 1."""
    if not is_integer(span_tokens) or span_tokens < 1:
        raise ValueError(f"span_tokens={span_tokens!r} must be an integer >= 1 (tokens corrupted, ending at t)")
    return int(span_tokens)


def min_context_for(span_tokens: int, min_context: int = 0) -> int:
    """The fewest tokens before t that a sampled position needs so that the span of ``span_tokens``
    tokens ending at t lies in the text: ``max(min_context, span_tokens - 1)``."""
    return max(int(min_context), check_span_tokens(span_tokens) - 1)


def restoration_requests(clean, positions: pd.DataFrame, layers, *, span_tokens: int) -> pd.DataFrame:
    """One request per (position, layer, active expert): restore that expert alone.

    ``positions``: ``seq_id``, ``t``; ``layers``: MoE layers of the clean pass. The corrupted span is
    ``[t - span_tokens + 1, t + 1)``. ``ValueError`` (before any model runs) for a bad
    ``span_tokens`` or a position whose span would start before its text (``t < span_tokens - 1``).
    Columns: those of :data:`moeaudit.engine.RESTORATION_COLUMNS` and ``expert``."""
    span_tokens = check_span_tokens(span_tokens)
    seq, t = positions.seq_id.to_numpy(), positions.t.to_numpy()
    early = t < span_tokens - 1
    if early.any():
        i = int(np.flatnonzero(early)[0])
        raise ValueError(f"span_tokens={span_tokens} reaches before the start of text {int(seq[i])} at t={int(t[i])}: "
                         f"the span [{int(t[i]) - span_tokens + 1}, {int(t[i]) + 1}) lies outside the text; sample "
                         f"positions with min_context >= {span_tokens - 1}")
    frames = []
    for L in layers:
        active = clean.layer_routing(L)["indices"][clean.row(seq, t)]
        k = active.shape[1]
        frames.append(pd.DataFrame({"seq_id": np.repeat(seq, k), "t": np.repeat(t, k),
                                    "span_start": np.repeat(t - span_tokens + 1, k), "span_stop": np.repeat(t + 1, k),
                                    "layer": int(L), "restored": [[int(e)] for e in active.reshape(-1)],
                                    "expert": active.reshape(-1).astype(np.int64)}))
    return pd.concat(frames, ignore_index=True)


def restoration_records(ctx, *, layers, n_positions: int, seed: int, span_tokens: int, min_context: int = 0,
                        corruption_scale: float = CORRUPTION_SCALE, batch_size: int = 64, seq_per_chunk: int = 8,
                        progress: bool | None = None) -> pd.DataFrame:
    """Single-expert restorations at a seeded draw of positions, cached like the ablation records.

    ``ctx`` is an audit context (model, corpus, clean pass, provenance, results folder). The
    positions are :func:`moeaudit.corpus.sample_positions` with ``min_context`` raised to
    :func:`min_context_for` ``(span_tokens)``, the same draw as
    :func:`moeaudit.audit.single_expert_records` with that ``min_context``. The noise is seeded by
    ``seed`` and the position (:func:`moeaudit.engine.corruption_noise`). Everything that shapes a
    record is in the cache key. ``ValueError`` for a ``corruption_scale`` <= 0 or a bad
    ``span_tokens`` before any model runs."""
    corruption_scale = check_corruption_scale(corruption_scale)
    need = min_context_for(span_tokens, min_context)
    pos = sample_positions(ctx.corpus, n=n_positions, seed=seed, min_context=need)
    req = restoration_requests(ctx.clean, pos, sorted(layers), span_tokens=span_tokens)
    seqs = sorted(req.seq_id.unique().tolist())
    chunks = [seqs[i:i + seq_per_chunk] for i in range(0, len(seqs), seq_per_chunk)]
    params = {**ctx.provenance, "kind": "restoration", "layers": sorted(int(L) for L in layers),
              "n_positions": n_positions, "seed": seed, "min_context": need, "span_tokens": span_tokens,
              "corruption_scale": corruption_scale}

    def compute(chunk):
        sub = req[req.seq_id.isin(chunk)]
        return run_restorations(ctx.model, ctx.corpus, ctx.clean, sub, corruption_scale=corruption_scale, seed=seed,
                                batch_size=batch_size, progress=False)

    records, _ = cached_records("restoration", params, chunks, compute, results_dir=ctx.results_dir, progress=progress)
    return records


def recovered_fraction(clean_loss, corrupt_loss, restored_loss, *, min_gap: float = MIN_GAP):
    """``(L_corrupt - L_restored) / (L_corrupt - L_clean)`` elementwise, and the exclusion mask.

    Losses in nats (arrays of one shape). Where the corruption raised the loss by less than
    ``min_gap`` nats (``L_corrupt - L_clean < min_gap``, a denominator near zero or negative) the
    fraction is NaN and the mask True. Returns ``(fraction, excluded)``. ``ValueError`` for a
    ``min_gap`` that is not a finite number > 0 or arrays of different shapes."""
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float, np.integer, np.floating)) \
            or not np.isfinite(min_gap) or min_gap <= 0:
        raise ValueError(f"min_gap={min_gap!r} must be a finite number > 0 (nats)")
    c, k, r = (np.asarray(v, dtype=np.float64) for v in (clean_loss, corrupt_loss, restored_loss))
    if not c.shape == k.shape == r.shape:
        raise ValueError(f"the three losses must have one shape, got {c.shape}, {k.shape} and {r.shape}")
    gap = k - c
    excluded = ~(gap >= min_gap)  # NaN gaps are excluded too
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(excluded, np.nan, (k - r) / np.where(excluded, 1.0, gap))
    return frac, excluded


def with_recovered(records: pd.DataFrame, *, min_gap: float = MIN_GAP) -> pd.DataFrame:
    """``records`` with ``corruption_gap`` (``L_corrupt - L_clean``, nats), ``recovered`` and
    ``excluded`` (:func:`recovered_fraction`)."""
    frac, excluded = recovered_fraction(records.clean_loss, records.corrupt_loss, records.restored_loss, min_gap=min_gap)
    return records.assign(corruption_gap=records.corrupt_loss - records.clean_loss, recovered=frac, excluded=excluded)


def paired_with_removal(restored: pd.DataFrame, removed: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, position, layer, active expert) with both measures and the expert's metrics.

    ``restored``: :func:`with_recovered` records; ``removed``: single-expert ablation records of the
    same positions (``expert``, ``delta_loss`` in nats, ``prob``); ``metrics``: the observational
    metrics per (layer, expert) of one model (or with a ``model`` column for several). Columns:
    ``recovered``, ``excluded``, ``removal_delta_loss``, ``routing_weight`` and the :data:`METRICS`.
    ``ValueError`` when a restoration has no removal record (the positions differ)."""
    key = ["model", "seq_id", "t", "layer", "expert"]
    rem = removed[key + ["delta_loss", "prob"]].rename(columns={"delta_loss": REMOVAL, "prob": "routing_weight"})
    out = restored.merge(rem, on=key, how="left", validate="one_to_one")
    if out[REMOVAL].isna().any():
        n = int(out[REMOVAL].isna().sum())
        raise ValueError(f"{n} restoration(s) have no removal record at the same (position, layer, expert): the two "
                         "sets of records must come from the same positions (same n_positions, seed and min_context)")
    on = [c for c in ("model", "layer", "expert") if c in metrics.columns]
    return out.merge(metrics[on + list(METRICS)], on=on, how="left")


def rank_agreement(pairs: pd.DataFrame, *, criteria=CRITERIA, alpha: float = 0.05, power: float = 0.8,
                   n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Spearman's rho between each criterion and the recovered fraction, per (model, layer).

    Over the (position, expert) pairs of a layer that are not excluded (:func:`stats.spearman`:
    rho, two-sided p and a paired-bootstrap interval). Holm's correction runs over every row of a
    model (``p_holm``, :func:`stats.holm`); ``significant`` is ``p_holm < alpha``;
    ``min_detectable_rho`` is the rho detected with ``power`` at Holm's strictest level
    ``alpha / m`` (:func:`stats.min_detectable_spearman`), what a null row speaks against;
    ``n_experts`` is the number of distinct experts among the layer's pairs (an observational
    metric takes one value per expert, so its pairs repeat that value). The p-value, the bootstrap
    (which resamples pairs) and the detectable rho all treat the pairs as independent, although the
    k experts of a position share it and an expert recurs across positions."""
    rows = []
    for (model, layer), g in pairs[~pairs.excluded].groupby(["model", "layer"], sort=True):
        for crit in criteria:
            r = stats.spearman(g[crit], g.recovered, n_boot=n_boot, seed=seed).iloc[0].to_dict()
            rows.append({"model": model, "layer": int(layer), "criterion": crit, **r,
                         "n_experts": int(g.expert.nunique())})
    out = pd.DataFrame(rows, columns=["model", "layer", "criterion", "n", "rho", "p", "ci_low", "ci_high", "ci_level",
                                      "n_boot", "ci_method", "reason", "n_experts"])
    out["p_holm"] = np.nan
    out["min_detectable_rho"] = np.nan
    for model, idx in out.groupby("model").groups.items():
        m = len(idx)
        out.loc[idx, "p_holm"] = stats.holm(out.loc[idx, "p"].to_numpy())
        out.loc[idx, "min_detectable_rho"] = [stats.min_detectable_spearman(int(n), alpha=alpha / m, power=power)
                                              for n in out.loc[idx, "n"]]
        out.loc[idx, "family_size"] = m
    out["significant"] = out.p_holm < alpha
    return out


def top_expert_agreement(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer): at how many positions the expert whose restoration recovers most is the
    expert whose removal costs most, against chance ``1/k``.

    Only positions that are not excluded; the first expert wins a tie. Columns ``n_positions``,
    ``agree``, ``share``, ``chance`` and ``p`` (one-sided, :func:`stats.binomial_upper_tail`:
    ``P(X >= agree)`` for ``X ~ Binomial(n_positions, 1/k)``). This compares within a position,
    so positions with a large corruption do not weigh more."""
    rows = []
    kept = pairs[~pairs.excluded]
    for (model, layer), g in kept.groupby(["model", "layer"], sort=True):
        agree = n = 0
        k = int(g.groupby(["seq_id", "t"]).size().max())
        for _, pos in g.groupby(["seq_id", "t"], sort=True):
            n += 1
            agree += int(pos.expert.iloc[int(np.argmax(pos.recovered.to_numpy()))]
                         == pos.expert.iloc[int(np.argmax(pos[REMOVAL].to_numpy()))])
        rows.append({"model": model, "layer": int(layer), "n_positions": n, "agree": agree,
                     "share": agree / n if n else np.nan, "chance": 1 / k,
                     "p": stats.binomial_upper_tail(agree, n, 1 / k) if n else np.nan})
    return pd.DataFrame(rows, columns=["model", "layer", "n_positions", "agree", "share", "chance", "p"])


# ----------------------------------------------------------------------------- sentences


def corruption_text(records: pd.DataFrame, *, min_gap: float) -> str:
    """What the corruption did, per model: positions, mean clean and corrupted loss, and how many
    positions were excluded (gap below ``min_gap`` nats). ``records``: :func:`with_recovered` rows."""
    parts = []
    for model, g in records.groupby("model", sort=False):
        pos = g.drop_duplicates(["seq_id", "t"])
        n, n_ex = len(pos), int(pos.excluded.sum())
        raised = int((pos.corruption_gap > 0).sum())
        parts.append(f"for {model}, the corruption (noise of standard deviation {g.noise_std.iloc[0]:.3g}) raised the "
                     f"next-token loss at {raised} of {report.plural(n, 'position')} (mean clean loss "
                     f"{pos.clean_loss.mean():.3f} nats, corrupted {pos.corrupt_loss.mean():.3f} nats); "
                     f"{report.plural(n_ex, 'position')} with a gap below {min_gap:g} nats "
                     f"{'was' if n_ex == 1 else 'were'} excluded")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def routed_text(records: pd.DataFrame) -> str:
    """How many restored experts the corrupted run had routed at (layer, t): those had their
    corrupted contribution replaced; the others had their clean contribution added."""
    n = len(records)
    routed = int((records.restored_routed_corrupt == records.n_restored).sum())
    match = int(records.clean_routing_match.sum())
    return (f"Of {report.plural(n, 'restoration')}, the corrupted run had routed the restored expert at its layer and "
            f"token in {routed} ({routed / n:.0%}): there its corrupted contribution was replaced by the clean one; in "
            f"the other {n - routed} the clean contribution was added. The clean row of every batch routed as the "
            f"clean pass did in {match} of {n}.")


def _rho_phrase(r) -> str:
    return (f"layer {r.layer}: ρ = {r.rho:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}], Holm p = {r.p_holm:.2g}, "
            f"n = {int(r.n)}")


def agreement_text(table: pd.DataFrame, *, criterion: str = REMOVAL, alpha: float, power: float) -> str:
    """Per model, which layers' Spearman rho between ``criterion`` and the recovered fraction is
    significant after Holm's correction (level ``alpha``), with sign; the others as nulls with the
    smallest rho detectable with ``power``. When some layer is significantly positive, a last
    sentence gives the highest upper interval bound among those layers: the orderings are related
    there, not the same."""
    label = CRITERION_LABELS.get(criterion, criterion)
    parts = []
    for model, g in table[table.criterion == criterion].groupby("model", sort=False):
        m = int(g.family_size.iloc[0])
        sig = g[g.significant]
        undefined = g[~np.isfinite(g.rho)]
        null = g[~g.significant & np.isfinite(g.rho)]
        bits = []
        pos, neg = sig[sig.rho > 0], sig[sig.rho < 0]
        if len(pos):
            bits.append(f"positive at {report.plural(len(pos), 'layer')} ({'; '.join(_rho_phrase(r) for r in pos.itertuples())})")
        if len(neg):
            bits.append(f"negative at {report.plural(len(neg), 'layer')} ({'; '.join(_rho_phrase(r) for r in neg.itertuples())})")
        if len(null):
            rhos = report.value_span(null.rho, '{:+.2f}')
            bits.append(f"not significant at {report.plural(len(null), 'layer')} (ρ {'from' if ' to ' in rhos else '='} "
                        f"{rhos}; at these n a layer detects |ρ| of "
                        f"{report.value_span(null.min_detectable_rho, '{:.2f}')} or more with {power:.0%} power)")
        if len(undefined):
            bits.append(f"undefined at {report.plural(len(undefined), 'layer')} ({undefined.reason.iloc[0]})")
        parts.append(f"{model} (Holm over {m} tests at α = {alpha:g}): {report.join_words(bits)}")
    if not parts:
        return f"{label}: no position was left after the exclusion, so no ranking was compared."
    text = f"{label} against the recovered fraction — " + "; ".join(parts) + "."
    pos = table[(table.criterion == criterion) & table.significant & (table.rho > 0)]
    if len(pos):
        text += (f" Where the correlation is positive, no interval reaches above {pos.ci_high.max():+.2f}: the two "
                 f"orderings are related at those layers, not the same, and a layer that is not significant is not "
                 f"shown to disagree.")
    return text


def observational_text(table: pd.DataFrame, *, alpha: float, power: float) -> str:
    """How many (layer, metric) rows of the observational metrics reach Holm's level per model,
    with their signs, and the range of detectable rho for the rest; and how few distinct experts
    (``n_experts``) carry a layer's pairs, which makes that detectable rho optimistic."""
    obs = table[table.criterion.isin(METRICS)]
    parts = []
    for model, g in obs.groupby("model", sort=False):
        sig = g[g.significant]
        desc = ", ".join(f"{CRITERION_LABELS[r.criterion].lower()} at layer {r.layer} (ρ = {r.rho:+.2f})"
                         for r in sig.itertuples())
        parts.append(f"for {model}, {len(sig)} of {len(g)} metric-layer rows {'reaches' if len(sig) == 1 else 'reach'} Holm's level"
                     + (f": {desc}" if len(sig) else "")
                     + f" (detectable |ρ| with {power:.0%} power: {report.value_span(g.min_detectable_rho, '{:.2f}')}"
                     + f" for {report.value_span(g.n, '{:d}')} pairs, which hold only "
                     + f"{report.value_span(g.n_experts, '{:d}')} distinct experts)")
    if not parts:
        return "No position was left after the exclusion, so no metric was compared."
    text = "; ".join(parts)
    neg = (" A negative ρ means that the metric orders the experts opposite to their recovered fraction."
           if (obs.significant & (obs.rho < 0)).any() else "")
    return (text[0].upper() + text[1:] + f", at α = {alpha:g} with Holm's correction over each model's tests.{neg} A "
            "metric takes one value per expert, repeated at every position where the expert is active, so the pairs "
            "are not independent and the detectable |ρ|, computed as if they were, is optimistic.")


def top_agreement_text(top: pd.DataFrame, *, alpha: float, power: float = 0.8) -> str:
    """The within-position comparison: per model, the share of positions whose most-recovering
    expert is the most costly to remove, against chance, and the layers where the one-sided
    binomial p is below ``alpha`` after Holm's correction over the model's layers. For the other
    layers, the agreement share detected with ``power`` at Holm's strictest level ``alpha / m``
    (:func:`stats.binomial_upper_detectable_share`), what those nulls speak against."""
    parts = []
    for model, g in top.groupby("model", sort=False):
        p_holm = stats.holm(g.p.to_numpy())
        above = [int(L) for L, p in zip(g.layer, p_holm) if p < alpha]
        is_null = np.array([not p < alpha for p in p_holm]) & (g.n_positions.to_numpy() > 0)
        mde = np.array([stats.binomial_upper_detectable_share(int(r.n_positions), float(r.chance), alpha=alpha / len(g),
                                                              power=power) for r in g[is_null].itertuples()])
        if not is_null.any():
            mde_text = ""
        elif np.isfinite(mde).any():
            mde_text = (f"; with so few positions, a layer not above chance speaks only against an agreement of "
                        f"{report.value_span(mde, '{:.0%}')} or more, the share detected with {power:.0%} power at "
                        f"Holm's strictest level")
        else:
            mde_text = ("; with so few positions, a layer not above chance says nothing: even full agreement could "
                        "not reach Holm's strictest level")
        parts.append(f"for {model} the top expert agrees at {report.value_span(g.share, '{:.0%}')} of positions per "
                     f"layer against a chance of {report.fmt_percent(g.chance.iloc[0])} (top-{round(1 / g.chance.iloc[0])}); "
                     + (f"above chance at layer{'s' if len(above) > 1 else ''} {report.join_words(above)}"
                        if above else "at no layer above chance")
                     + f" (one-sided binomial test, Holm over {len(g)} layers, α = {alpha:g}; "
                     f"n = {report.value_span(g.n_positions, '{:d}')} positions){mde_text}")
    if not parts:
        return "No position was left after the exclusion, so no top expert was compared."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."
