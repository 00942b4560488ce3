"""Chapter 10 (predictors and pruning): does a pruning criterion find the experts whose removal hurts most?

The *tail* of a layer is the set of experts whose mean single-expert loss change, averaged over
the audited positions where the expert is routed, is in the top ``share`` (5 %) of the layer's
experts with a measured mean, at least one expert. A pruning criterion ranks the same experts by
its score (higher = more important, so the last to be pruned); it "finds the tail" when its own
top cut of the same size holds the tail experts, and when it ranks the single most damaging
expert near the top. Against a uniformly random ranking:

* precision at the cut = |criterion's cut ∩ tail| / |cut|, expected ``|tail| / n`` at random;
  recall = |cut ∩ tail| / |tail| (the two coincide when cut and tail have one size, as here);
* the rank ``r`` (1 = highest) of the most damaging expert under the criterion, ties counted
  against the criterion (the worst rank among tied scores), with the exact p-value
  ``P(R <= r) = r / n`` of a uniform rank ("ranked at least as high");
* pooled over layers and models by the exact rank-sum test
  (:func:`moeaudit.stats.uniform_rank_sum_pvalue`), Holm-corrected over the criteria
  (:func:`moeaudit.stats.holm`); its minimum detectable effect is the largest mean rank the
  test can still reject (:func:`moeaudit.stats.uniform_rank_sum_critical`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moeaudit import stats
from moeaudit.pruning import random_rank_pvalue
from moeaudit.report import AnswerCheck, check_answer, plural

TAIL_SHARE = 0.05


def n_tail(n_experts: int, share: float = TAIL_SHARE) -> int:
    """Size of the tail: ``max(1, floor(share * n_experts))``. ``ValueError`` unless ``n_experts >= 1``
    and ``0 < share < 1``."""
    if isinstance(n_experts, bool) or int(n_experts) != n_experts or n_experts < 1:
        raise ValueError(f"n_experts must be an integer >= 1, got {n_experts!r}")
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    return max(1, math.floor(share * n_experts + 1e-12))


def _top(values: pd.Series, n: int) -> list[int]:
    """The ``n`` experts (index) with the highest values, NaN last, ties to the lower expert id."""
    key = values.fillna(-np.inf)
    order = sorted(key.index, key=lambda e: (-key[e], e))
    return [int(e) for e in order[:n]]


def tail_match(mean_delta: pd.Series, scores: pd.Series, *, share: float = TAIL_SHARE) -> dict:
    """How one criterion's ranking of one layer's experts meets that layer's tail.

    ``mean_delta``: mean loss change (nats) per expert (index = expert id), NaN or absent for an
    expert without a measurement; ``scores``: the criterion's score per expert (higher = more
    important; NaN ranks last). The universe is the experts with a finite mean loss change.
    Returns ``n_experts``, ``n_tail``, ``tail`` (list), ``cut`` (the criterion's top ``n_tail``),
    ``precision``, ``recall``, ``random_precision`` (= n_tail / n_experts), ``top_expert`` (the
    most damaging), ``rank_top`` (its rank under the criterion, ties counted against it) and
    ``p_rank`` (= rank_top / n_experts). ``ValueError`` when no expert has a finite mean."""
    md = pd.Series(mean_delta, dtype=np.float64)
    md = md[np.isfinite(md)]
    if md.empty:
        raise ValueError("mean_delta has no finite value: no expert of this layer was measured")
    sc = pd.Series(scores, dtype=np.float64).reindex(md.index)
    n = len(md)
    k = n_tail(n, share)
    tail, cut = _top(md, k), _top(sc, k)
    hit = len(set(tail) & set(cut))
    top = tail[0]
    key = sc.fillna(-np.inf)
    rank = int((key >= key[top]).sum())  # ties against the criterion
    return {"n_experts": n, "n_tail": k, "tail": tail, "cut": cut, "precision": hit / len(cut),
            "recall": hit / len(tail), "random_precision": k / n, "top_expert": top, "rank_top": rank,
            "p_rank": stats.uniform_rank_pvalue(rank, n)}


def tail_table(records: pd.DataFrame, criteria: pd.DataFrame, *, criteria_names, share: float = TAIL_SHARE) -> pd.DataFrame:
    """:func:`tail_match` for every (model, layer) of ``records`` and every criterion.

    ``records``: single-expert ablation records (``model``, ``layer``, ``expert``,
    ``delta_loss`` in nats), averaged per (model, layer, expert) over their positions;
    ``criteria``: one row per (model, layer, expert) with a column per name of
    ``criteria_names``. One row per (model, layer, criterion), with ``n_obs_top`` (the records
    behind the most damaging expert's mean) and ``median_obs`` (the median over the layer's
    measured experts). ``ValueError`` for a criterion missing from ``criteria``."""
    missing = [c for c in criteria_names if c not in criteria.columns]
    if missing:
        raise ValueError(f"criteria lack the columns {missing}")
    grouped = records.groupby(["model", "layer", "expert"]).delta_loss
    mean, count = grouped.mean(), grouped.count()
    rows = []
    for (model, layer), md in mean.groupby(level=[0, 1]):
        md = md.droplevel([0, 1])
        obs = count.loc[(model, layer)]
        crit = criteria[(criteria.model == model) & (criteria.layer == layer)].set_index("expert")
        for c in criteria_names:
            m = tail_match(md, crit[c] if len(crit) else pd.Series(dtype=float), share=share)
            rows.append({"model": model, "layer": int(layer), "criterion": c, **m,
                         "n_obs_top": int(obs[m["top_expert"]]),
                         "median_obs": float(obs[np.isfinite(md.reindex(obs.index))].median())})
    return pd.DataFrame(rows)


def pooled_tail_summary(table: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """One row per criterion of a :func:`tail_table`: ``n_layers`` (model, layer) pairs, mean
    ``precision`` and ``random_precision``, ``mean_rank`` and ``mean_n`` (experts per layer),
    ``p_pooled`` (exact rank-sum p-value over the layers), ``p_holm`` (Holm over the criteria),
    ``p_min`` (the smallest attainable pooled p-value), ``critical_mean_rank`` (the largest mean
    rank that the pooled test rejects at ``alpha``, Holm's most lenient step; NaN when none can be)
    and ``critical_mean_rank_strict`` (the same at ``alpha / m`` for ``m`` criteria, Holm's first step)."""
    out = []
    for c, g in table.groupby("criterion", sort=False):
        sizes = g.n_experts.tolist()
        crit = stats.uniform_rank_sum_critical(sizes, alpha=alpha)
        out.append({"criterion": c, "n_layers": len(g), "precision": g.precision.mean(),
                    "random_precision": g.random_precision.mean(), "mean_rank": g.rank_top.mean(),
                    "mean_n": g.n_experts.mean(), "p_pooled": stats.uniform_rank_sum_pvalue(g.rank_top, sizes),
                    "p_min": float(np.prod([1.0 / n for n in sizes])),
                    "critical_mean_rank": crit / len(g) if np.isfinite(crit) else float("nan")})
    df = pd.DataFrame(out)
    df["p_holm"] = stats.holm(df.p_pooled.to_numpy())
    strict = [stats.uniform_rank_sum_critical(g.n_experts.tolist(), alpha=alpha / len(df))
              for _, g in table.groupby("criterion", sort=False)]
    df["critical_mean_rank_strict"] = [c / n if np.isfinite(c) else float("nan") for c, n in zip(strict, df.n_layers)]
    return df


def tail_sentence(summary: pd.DataFrame, *, alpha: float, labels: dict | None = None) -> str:
    """The verdict on the tail analysis, from :func:`pooled_tail_summary`: which criteria rank the
    most damaging expert higher than a random ranking would (exact rank-sum test pooled over the
    layers, Holm over the criteria at ``alpha``), with their precision at the tail cut against
    random (descriptive, untested), and what a null speaks against: the mean rank that Holm's first
    step (``alpha / m``) rejects whatever the other criteria do, and the mean rank above which no
    step can reject (``alpha``); these thresholds are the smallest effects that can be significant,
    reached only about half the time at that effect. Or, when no rank sum can reach ``alpha``, that
    a null says nothing. ``summary`` must be computed at the same ``alpha``."""
    labels = labels or {}
    name = lambda c: labels.get(c, c)  # noqa: E731
    n_crit, n_layers = len(summary), int(summary.n_layers.max())
    mean_n = float(summary.mean_n.mean())
    found = summary[summary.p_holm <= alpha]
    rest = summary[summary.p_holm > alpha]
    crit_rank = summary.critical_mean_rank.iloc[0]
    strict = summary.critical_mean_rank_strict.iloc[0]
    test = f"exact rank-sum test over the {n_layers} layers, one rank per layer, Holm over the {n_crit} criteria"
    if found.empty:
        best = summary.sort_values("p_pooled").iloc[0]
        verdict = (f"No criterion of the {n_crit} ranks the most damaging expert of a layer higher than a random ranking "
                   f"at α = {alpha} ({test}); the closest is "
                   f"{name(best.criterion)} (mean rank {best.mean_rank:.2f}, pooled p = {best.p_pooled:.3g}, "
                   f"Holm {best.p_holm:.3g})")
    else:
        parts = [f"{name(r.criterion)} (mean rank {r.mean_rank:.2f}, Holm p = {r.p_holm:.3g})" for r in found.itertuples()]
        verdict = (f"{len(found)} of {n_crit} criteria rank the most damaging expert of a layer higher than a random "
                   f"ranking at α = {alpha} ({test}): " + "; ".join(parts))
    if not np.isfinite(crit_rank):
        power = (f"With {n_layers} layers of about {mean_n:.0f} measured experts each, no ranking can reach α = "
                 f"{alpha} (smallest attainable p = {summary.p_min.iloc[0]:.3g}): a null here says nothing")
    else:
        nulls = "; ".join(f"{name(r.criterion)} {r.mean_rank:.2f}" for r in rest.itertuples())
        rejects = (f"rejects a criterion whose most damaging experts sit at a mean rank of {strict:.2f} or better "
                   f"whatever the others do (level α/{n_crit})" if np.isfinite(strict) else
                   f"cannot reject at its first step (level α/{n_crit}) whatever the ranks")
        power = (f"With {n_layers} layers of about {mean_n:.0f} measured experts each (mean rank {(mean_n + 1) / 2:.1f} "
                 f"at random, rank 1 = top), Holm's procedure {rejects}, and no step can reject a mean rank above "
                 f"{crit_rank:.2f} (level α); these are the smallest effects that can be significant, reached about "
                 f"half the time at that effect"
                 + (f". The criteria not shown to find the tail (mean ranks: {nulls}) are therefore not shown to rank "
                    f"at random either" if len(rest) else ""))
    prec = (f"Precision at the tail cut is descriptive and untested: from {summary.precision.min():.2f} to "
            f"{summary.precision.max():.2f} over the criteria, against {summary.random_precision.mean():.2f} at random")
    return f"{verdict}. {power}. {prec}."


def tail_selection_sentence(table: pd.DataFrame) -> str:
    """How many observations the most damaging expert of a layer rests on, against the layer's
    typical expert, from :func:`tail_table` (``n_obs_top``, ``median_obs``; one value per (model,
    layer)). The most damaging expert is the largest of noisy means, and a mean over fewer
    observations is noisier, so the choice leans towards rarely routed experts; when the top
    experts rest on fewer observations than the median on average, the sentence says which kind of
    criterion that alone can favour (one that does not grow with how often the expert is routed)."""
    per_layer = table.drop_duplicates(["model", "layer"])
    if per_layer.empty:
        return "No layer was measured, so no tail was drawn."
    top, med = per_layer.n_obs_top, per_layer.median_obs
    fewer = int((top < med).sum())
    text = (f"The most damaging expert of a layer rests on {top.mean():.1f} held-out observations on average (from "
            f"{int(top.min())} to {int(top.max())}), against a median of {med.mean():.1f} for the layer's measured "
            f"experts, and on fewer than that median at {fewer} of {plural(len(per_layer), 'layer')}")
    if top.mean() < med.mean():
        text += (". The largest of noisy means leans towards experts measured few times, that is rarely routed ones, "
                 "so a criterion that does not grow with routing frequency (an average over the routed tokens) "
                 "or grows with it only slowly (a maximum, which rises with the number of tokens it is taken over) "
                 "can rank the tail higher, and a frequency-weighted sum lower, from that selection alone")
    return text + "."


def smallest_rank_pvalue(n_draws: int) -> float:
    """The smallest rank p-value a criterion can attain against ``n_draws`` random draws: the p-value of
    a result better than every draw, ``1 / (n_draws + 1)`` (:func:`moeaudit.pruning.random_rank_pvalue`).
    ``ValueError`` unless ``n_draws`` is a whole number >= 1."""
    if isinstance(n_draws, bool) or int(n_draws) != n_draws or n_draws < 1:
        raise ValueError(f"n_draws must be a whole number >= 1, got {n_draws!r}")
    return random_rank_pvalue(0.0, np.ones(int(n_draws)))


def check_10_predictors_and_pruning_1(answer, *, n_draws: int = 5) -> AnswerCheck:
    """Exercise 1 of the predictors-and-pruning chapter: the smallest attainable rank p-value with
    ``n_draws`` random draws (:func:`smallest_rank_pvalue`), right within 0.0005 (the page prints three
    decimals). ``ValueError`` for an answer that is not a number or a bad ``n_draws``."""
    return check_answer(answer, smallest_rank_pvalue(n_draws), what="the smallest attainable rank p-value",
                        tolerance=0.0005)
