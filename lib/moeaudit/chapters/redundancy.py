"""The analysis of the controlled redundancy family (chapter 11): does redundancy explain the null?

The paper reads its null result through redundancy (Section 4, Discussion): removing seven of
eight active experts at OLMoE's layers 0-9 leaves the mean loss almost unchanged, so any selection
rule looks harmless there and "the metric and the random baseline are doing the same thing"; it
leaves open whether observational metrics regain validity in low-redundancy architectures. The
redundancy family (:data:`moeaudit.zoo.REDUNDANCY_MODELS`) varies the routing (E routed experts,
top-k) with the training recipe fixed and two training seeds per setting; the active parameters
per token still grow with k. This module turns the
book's per-cell statistics of those models into per-model and per-setting summaries and into the
tests that answer the chapter's questions:

1. does any observational metric become valid (the paper's dual-test rule under the model's
   Bonferroni family) as k falls: :func:`validity_by_model`;
2. does the routing-weight control's signal grow as k falls: :func:`trend_against_k`;
3. is the spread between seeds smaller than the effect of the setting: :func:`setting_anova`;
4. where does the redundancy explanation hold: :func:`explanation_checks`, beside the
   alternative that needs no compensation at all, a removed expert's output share that shrinks
   like 1/k (:func:`share_checks`), and the comparison of a small expert pool with the large one
   at the same k and at the same k/E (:func:`pool_comparison`).

Every function takes tidy frames made by :func:`moeaudit.stats.audit_table`,
:func:`moeaudit.audit.progressive_summary` or the ablation records, and returns a tidy frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..report import join_words
from ..stats import (
    anova_min_detectable_f,
    binomial_upper_tail,
    holm,
    linear_trend,
    min_detectable_difference,
    min_detectable_slope,
    min_equivalence_bound,
    one_way_anova,
    sign_test,
    spearman_defined,
    two_sample_difference,
)
from ..zoo import SHIPPED_MODELS, ZOO_DIR

#: the per-model quantities that :func:`per_model_table` computes, with what each measures
QUANTITIES = {
    "audit_max_abs_dz": "largest |Cohen's d_z| over the model's observational cells (metrics × layers)",
    "audit_valid_cells": "observational cells valid under the dual-test rule (Bonferroni, d_z > 0)",
    "control_mean_dz": "mean Cohen's d_z of the routing-weight control over the audited layers",
    "control_valid_cells": "control cells valid under the dual-test rule (Bonferroni, d_z > 0)",
    "single_mean_dl": "mean loss change ΔL of a single-expert ablation (nats; positive: the removal hurts), over "
                      "positions, layers and experts",
    "single_mean_abs_dl": "mean size |ΔL| of the loss change of a single-expert ablation (nats), over positions, "
                          "layers and experts",
    "single_mean_gap": "mean norm of the removed output ||y_t - y_t^(-e)|| of a single-expert ablation (hidden-state "
                       "units)",
    "single_dl_per_gap": "damage per unit of removed output: the mean ΔL over the mean gap norm (nats per unit norm)",
    "single_abs_dl_per_gap": "size of the loss change per unit of removed output: the mean |ΔL| over the mean gap "
                             "norm (nats per unit norm)",
    "deepest_mean_dl": "mean ΔL with all active experts but one removed (nats), over positions and layers",
    "gap_growth": "mean gap norm of the last audited layer over that of the first",
}


def member_table(layouts: Mapping[str, object], *, seeds: Mapping[str, int | None] | None = None) -> pd.DataFrame:
    """One row per model: ``model``, ``n_experts`` (E, routed), ``top_k`` (k), ``k_over_E``,
    ``setting`` (``"E=64, top-2"``) and ``seed`` (training seed, ``<NA>`` when unknown).

    ``layouts`` maps a model name to its :class:`moeaudit.models.MoELayout` (anything with
    ``num_experts`` and ``top_k``). ``seeds`` maps names to training seeds (default:
    :func:`training_seed`). ``ValueError`` when fewer than two settings are given: the question
    is about the effect of the setting."""
    rows = []
    for name, lay in layouts.items():
        E, k = int(lay.num_experts), int(lay.top_k)
        seed = seeds[name] if seeds is not None and name in seeds else training_seed(name)
        rows.append({"model": name, "n_experts": E, "top_k": k, "k_over_E": k / E, "setting": f"E={E}, top-{k}",
                     "seed": seed})
    out = pd.DataFrame(rows)
    if out.empty or out.setting.nunique() < 2:
        raise ValueError(f"the redundancy analysis compares routing settings; got {out.setting.nunique() if len(out) else 0} "
                         "setting(s): give models that differ in experts or top-k")
    out["seed"] = out["seed"].astype("Int64")
    return out


def training_seed(name: str) -> int | None:
    """The training seed recorded in a model's ``training_summary.json`` (a shipped name or a
    directory written by :mod:`moeaudit.tooling.training`), else ``None``."""


    folder = ZOO_DIR / name if name in SHIPPED_MODELS else Path(name).expanduser()
    try:
        return int(json.loads((folder / "training_summary.json").read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _valid(table: pd.DataFrame) -> pd.Series:
    """The paper's validity criterion per cell: dual test at the Bonferroni level, d_z > 0."""
    return table.sig_dual_bonf.fillna(False).astype(bool) & (table.cohens_dz > 0)


def validity_by_model(audit: pd.DataFrame) -> pd.DataFrame:
    """Per (model, ranking) of an observational :func:`moeaudit.stats.audit_table` result (family:
    the model): ``cells``, ``valid_cells`` (dual test at the Bonferroni level with d_z > 0, the
    paper's Definition 2.1 criterion), ``negative_cells`` (the same rule with d_z < 0: the ranking
    points the wrong way), ``max_abs_dz`` and ``mean_dz`` over the tested cells.

    Where the table has the equivalence columns of :func:`moeaudit.stats.audit_table`
    (``equivalent``, ``tost_bound_d``, ``n``, ``alpha_corrected``) also ``equivalent_cells``
    (cells that TOST shows inside ±``tost_bound_d`` at the Bonferroni level), ``tost_bound_d``
    and ``min_tost_bound``: the smallest bound (d_z units) TOST can pass at all in the group's
    least powerful cell (:func:`moeaudit.stats.min_equivalence_bound`); a ``tost_bound_d`` at or
    below it cannot be shown for any data."""
    t = audit.assign(_valid=_valid(audit),
                     _neg=audit.sig_dual_bonf.fillna(False).astype(bool) & (audit.cohens_dz < 0))
    agg = {"cells": ("cohens_dz", "size"), "valid_cells": ("_valid", "sum"), "negative_cells": ("_neg", "sum"),
           "max_abs_dz": ("cohens_dz", lambda d: float(d.abs().max())), "mean_dz": ("cohens_dz", "mean")}
    if {"equivalent", "tost_bound_d", "n", "alpha_corrected"} <= set(audit.columns):
        reach = [min_equivalence_bound(int(n), alpha=float(a)) if n >= 2 and 0 < a < 1 else np.nan
                 for n, a in zip(audit.n, audit.alpha_corrected)]
        t = t.assign(_eq=audit.equivalent.fillna(False).astype(bool), _reach=reach)
        agg.update(equivalent_cells=("_eq", "sum"), tost_bound_d=("tost_bound_d", "max"),
                   min_tost_bound=("_reach", "max"))
    return t.groupby(["model", "ranking"], sort=False).agg(**agg).reset_index()


def gap_growth(records: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer) mean gap norm ``||y_t - y_t^(-e)||`` of single-expert records
    (``gap_norm``), with ``growth`` = the layer's mean over the model's first audited layer's
    (the paper's 41x from OLMoE's layer 0 to layer 15, Section 3)."""
    g = records.groupby(["model", "layer"], sort=True).gap_norm.mean().rename("mean_gap").reset_index()
    first = g.groupby("model").mean_gap.transform("first")
    return g.assign(growth=g.mean_gap / first)


def per_model_table(members: pd.DataFrame, *, audit: pd.DataFrame, control: pd.DataFrame, single: pd.DataFrame,
                  progressive: pd.DataFrame) -> pd.DataFrame:
    """One row per model of ``members`` (:func:`member_table`) with the columns of
    :data:`QUANTITIES`.

    ``audit``, ``control``: :func:`moeaudit.stats.audit_table` results of the observational
    rankings and of the routing-weight control (families: the model); ``single``: single-expert
    ablation records (``delta_loss``, ``gap_norm``); ``progressive``: progressive-ablation records
    (``k``, ``delta_loss``); the deepest removal is each model's largest ``k``. The per-unit
    quantities are ratios of the model's means (``mean ΔL / mean gap norm``), not means of
    per-record ratios, which a near-zero gap norm would dominate. ``KeyError`` if a model of
    ``members`` is missing from any of them."""
    out = members.set_index("model").copy()
    for name, frame in (("audit", audit), ("control", control), ("single", single), ("progressive", progressive)):
        missing = sorted(set(out.index) - set(frame.model))
        if missing:
            raise KeyError(f"{name} has no rows for {missing}")
    val = validity_by_model(audit).groupby("model")
    out["audit_max_abs_dz"] = val.max_abs_dz.max()
    out["audit_valid_cells"] = val.valid_cells.sum().astype(int)
    c = control.assign(_valid=_valid(control)).groupby("model")
    out["control_mean_dz"] = c.cohens_dz.mean()
    out["control_valid_cells"] = c._valid.sum().astype(int)
    by_model = single.assign(a=single.delta_loss.abs()).groupby("model")
    out["single_mean_dl"] = by_model.delta_loss.mean()
    out["single_mean_abs_dl"] = by_model.a.mean()
    out["single_mean_gap"] = by_model.gap_norm.mean()
    out["single_dl_per_gap"] = out.single_mean_dl / out.single_mean_gap
    out["single_abs_dl_per_gap"] = out.single_mean_abs_dl / out.single_mean_gap
    deepest = progressive[progressive.k == progressive.groupby("model").k.transform("max")]
    out["deepest_mean_dl"] = deepest.groupby("model").delta_loss.mean()
    growth = gap_growth(single).groupby("model").growth.last()
    out["gap_growth"] = growth
    return out.reset_index()


def setting_anova(summary: pd.DataFrame, *, quantities=None, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Is the spread between seeds smaller than the effect of the routing setting?

    For each quantity (a column of :func:`per_model_table`; default: :data:`ANOVA_QUANTITIES`), a
    one-way ANOVA of the per-model values with the setting as the factor and the seeds as
    replicates (``scipy.stats.f_oneway``): ``F``, ``p``, ``df_between``, ``df_within``;
    ``sd_between`` (standard deviation of the setting means, ddof=1), ``sd_seed`` (pooled
    within-setting standard deviation, ``sqrt(SS_within / df_within)``) and their ratio;
    ``eta_sq`` (``SS_between / SS_total``); ``p_holm``, the p-values Holm-adjusted over the
    quantities (:func:`moeaudit.stats.holm`). ``F``, ``p``, ``ratio`` and ``eta_sq`` are NaN where no setting has
    two models (no within-setting spread to compare with); ``F`` and ``p`` also where the seeds
    agree exactly.

    The power of each test, for the null results: ``min_detectable_f``, the smallest Cohen's f
    (SD of the setting means, ddof=0, over the within-setting SD) the F test detects with
    ``power`` at ``alpha / m``, the strictest level of Holm's procedure over the ``m`` tested
    quantities (:func:`moeaudit.stats.anova_min_detectable_f`), and ``min_detectable_sd`` =
    ``min_detectable_f * sd_seed * sqrt(G / (G - 1))`` over ``G`` settings: the same in the quantity's
    units and in ``sd_between``'s convention (ddof=1), so that the two compare directly (NaN where
    untested).

    The within-setting spread is that of the per-model *estimates*: it holds the training seed's
    effect and the sampling error of each model's value (the positions are one shared draw, so the
    comparison is conditional on it)."""
    quantities = list(quantities or ANOVA_QUANTITIES)
    rows = []
    for q in quantities:
        groups = [g[q].to_numpy(dtype=np.float64) for _, g in summary.groupby("setting", sort=False)]
        means = np.array([g.mean() for g in groups])
        allv = np.concatenate(groups)
        ss_within = float(sum(((g - g.mean()) ** 2).sum() for g in groups))
        ss_total = float(((allv - allv.mean()) ** 2).sum())
        df_within = len(allv) - len(groups)
        sd_seed = float(np.sqrt(ss_within / df_within)) if df_within > 0 else float("nan")
        testable = df_within > 0 and ss_within > 0 and len(groups) > 1
        F, p = one_way_anova(*groups) if testable else (np.nan, np.nan)
        sd_between = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
        rows.append({"quantity": q, "settings": len(groups), "models": len(allv), "F": float(F), "p": float(p),
                     "df_between": len(groups) - 1, "df_within": df_within, "sd_between": sd_between,
                     "sd_seed": sd_seed,
                     "ratio": (sd_between / sd_seed if sd_seed > 0 else float("inf")) if df_within > 0 else float("nan"),
                     "eta_sq": (ss_total - ss_within) / ss_total if ss_total > 0 and df_within > 0 else float("nan")})
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out.p)
    m = int(out.p.notna().sum())
    out["min_detectable_f"] = [anova_min_detectable_f(int(r.settings), int(r.models), alpha=alpha / m, power=power)
                               if np.isfinite(r.p) else np.nan for r in out.itertuples()]
    # Cohen's f divides the setting means' squared deviations by G; sd_between by G - 1
    out["min_detectable_sd"] = out.min_detectable_f * out.sd_seed * np.sqrt(out.settings / (out.settings - 1))
    return out


#: the per-model quantities whose setting effect :func:`setting_anova` tests by default
ANOVA_QUANTITIES = ["audit_max_abs_dz", "control_mean_dz", "single_mean_dl", "single_mean_abs_dl",
                    "single_abs_dl_per_gap", "deepest_mean_dl", "gap_growth"]


def trend_against_k(summary: pd.DataFrame, *, quantity: str, n_experts: int | None = None,
                    reference_slope: float = 0.0) -> dict:
    """Does ``quantity`` change with top-k among models with the same number of experts?

    Ordinary least squares of the per-model values on ``log2(top_k)``
    (:func:`moeaudit.stats.linear_trend`; seeds enter as separate points) over the models with
    ``n_experts`` routed experts (default: the most common E). Returns ``slope`` (change per
    doubling of k), ``stderr``, its ``ci_low``/``ci_high`` (95%, Student t with n - 2 degrees of
    freedom: ``slope ± t_{0.975, n-2} · stderr``), ``p`` (two-sided, slope = ``reference_slope``,
    by default 0: no trend), ``n`` (models), ``ks`` (the k values), ``spearman_rho`` with its
    ``spearman_p`` (:func:`moeaudit.stats.spearman_defined`), ``value`` (NaN) and
    ``seed_slopes``: ``{seed: slope}``, the least-squares slope of each seed's models alone
    (descriptive, no test; only seeds with two or more values of k), which shows whether the
    pooled trend hides a seed that goes the other way. When every model has the same value
    there is nothing to fit: the statistics are NaN and ``value`` is that value.
    ``ValueError`` with fewer than two distinct k or fewer than three models."""
    E = int(summary.n_experts.mode().iloc[0]) if n_experts is None else int(n_experts)
    s = summary[summary.n_experts == E]
    if s.top_k.nunique() < 2 or len(s) < 3:
        raise ValueError(f"a trend against k needs at least two values of k and three models with E={E}; "
                         f"got k in {sorted(int(k) for k in s.top_k.unique())} over {len(s)} model(s)")
    x, y = np.log2(s.top_k.to_numpy(dtype=np.float64)), s[quantity].to_numpy(dtype=np.float64)
    base = {"quantity": quantity, "n_experts": E, "n": int(len(x)), "ks": sorted(int(k) for k in s.top_k.unique()),
            "reference_slope": float(reference_slope), "seed_slopes": {}}
    nan = float("nan")
    if np.ptp(y) == 0:  # every model has the same value (e.g. no valid cell anywhere): nothing to fit
        return {**base, "slope": nan, "stderr": nan, "ci_low": nan, "ci_high": nan, "p": nan,
                "spearman_rho": nan, "spearman_p": nan, "value": float(y[0])}
    fit = linear_trend(x, y, reference_slope=reference_slope)
    rho, rho_p, _ = spearman_defined(x, y)
    seed_slopes = {}
    if "seed" in s.columns:
        for seed_, g in s.groupby("seed", sort=True):
            if g.top_k.nunique() >= 2:
                xs = np.log2(g.top_k.to_numpy(dtype=np.float64))
                seed_slopes[int(seed_)] = float(np.polyfit(xs, g[quantity].to_numpy(dtype=np.float64), 1)[0])
    return {**base, "slope": fit["slope"], "stderr": fit["stderr"], "ci_low": fit["ci_low"],
            "ci_high": fit["ci_high"], "p": fit["p"], "spearman_rho": float(rho), "spearman_p": float(rho_p),
            "value": nan, "seed_slopes": seed_slopes}


def _direction(slope: float, p: float, *, alpha: float) -> str:
    """``"falls"``/``"grows"`` as k grows when the (adjusted) test rejects at ``alpha``, else
    ``"not detected"``."""
    if not p < alpha:
        return "not detected"
    return "grows" if slope > 0 else "falls"


#: the explanation's checks: (check, quantity, predicted direction as k grows or None, specific).
#: ``specific`` is False where the output-share alternative (:func:`share_checks`) predicts the same
#: direction without any compensation, so a check that holds there does not single out redundancy.
CHECKS = [
    ("single-expert damage shrinks with k", "single_mean_dl", "falls", False),
    ("single-expert effect size shrinks with k", "single_mean_abs_dl", "falls", False),
    ("damage per unit of removed output shrinks with k", "single_dl_per_gap", "falls", True),
    ("effect size per unit of removed output shrinks with k", "single_abs_dl_per_gap", "falls", True),
    ("control signal shrinks with k", "control_mean_dz", "falls", True),
    ("observational validity shrinks with k", "audit_valid_cells", "falls", True),
    ("deepest-removal damage against k", "deepest_mean_dl", None, False),
]


def _trend_rows(summary: pd.DataFrame, specs, *, alpha: float, power: float, reference_slope: float = 0.0,
                transform=None) -> pd.DataFrame:
    """One :func:`trend_against_k` row per ``(check, quantity)`` of ``specs`` with Holm over the
    fitted rows, the observed direction, and the power of each test: ``min_detectable_slope``
    (:func:`moeaudit.stats.min_detectable_slope` at ``alpha / m``, Holm's strictest level) and
    ``equivalence_bound``, the smallest ``B`` for which TOST at that level could show
    ``|slope - reference| < B`` with these data (the farther end of the ``1 - 2 alpha / m``
    interval)."""
    rows = []
    for check, q in specs:
        row = {"check": check, "quantity": q, "slope": np.nan, "stderr": np.nan, "ci_low": np.nan,
               "ci_high": np.nan, "p": np.nan, "value": np.nan, "observed": "untested", "reason": "", "seed_slopes": {},
               "n_experts": np.nan, "n": np.nan, "ks": [], "reference_slope": float(reference_slope),
               "spearman_rho": np.nan, "spearman_p": np.nan}
        s = summary
        if transform is not None:
            values = summary[q].to_numpy(dtype=np.float64)
            if not np.all(values > 0):
                rows.append({**row, "reason": f"{q} is not positive in every model, so it has no logarithm"})
                continue
            s = summary.assign(**{q: transform(values)})
        try:
            tr = trend_against_k(s, quantity=q, reference_slope=reference_slope)
        except ValueError as err:  # too few models or values of k for a trend: reported, not raised
            rows.append({**row, "reason": str(err)})
            continue
        row.update(tr)
        if np.isfinite(tr["value"]):
            row["reason"] = f"every model has the value {tr['value']:g}, so there is no trend to fit"
        rows.append(row)
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out.p)
    fitted = out.p_holm.notna()
    m = int(fitted.sum())
    out["observed"] = out.observed.astype(object)
    out.loc[fitted, "observed"] = [_direction(r.slope - reference_slope, r.p_holm, alpha=alpha)
                                   for r in out[fitted].itertuples()]
    mds, eq = [], []
    for r in out.itertuples():
        if not fitted[r.Index]:
            mds.append(np.nan)
            eq.append(np.nan)
            continue
        mds.append(min_detectable_slope(float(r.stderr), int(r.n), alpha=alpha / m, power=power))
        E = int(r.n_experts)
        sub = summary[summary.n_experts == E]
        y = sub[r.quantity].to_numpy(dtype=np.float64)
        fit = linear_trend(np.log2(sub.top_k.to_numpy(dtype=np.float64)), transform(y) if transform else y,
                           reference_slope=reference_slope, ci=1 - 2 * alpha / m)
        eq.append(max(abs(fit["ci_low"] - reference_slope), abs(fit["ci_high"] - reference_slope)))
    out["min_detectable_slope"] = mds
    out["equivalence_bound"] = eq
    out["seeds_agree"] = pd.array([pd.NA if len(r.seed_slopes) < 2 or not np.isfinite(r.slope) else
                                   bool(all(np.sign(v - reference_slope) == np.sign(r.slope - reference_slope)
                                            for v in r.seed_slopes.values()))
                                   for r in out.itertuples()], dtype="boolean")
    return out


def explanation_checks(summary: pd.DataFrame, *, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """The redundancy explanation's predictions, each tested on the family (:data:`CHECKS`).

    If redundancy hides single experts' effects, then with fewer active experts (smaller k):
    (a) a single-expert ablation damages the model more (``single_mean_dl``, the signed mean ΔL,
    falls as k grows); its size ``single_mean_abs_dl`` falls too, but the size also counts
    removals that lower the loss, so it is reported beside the damage and is not the damage;
    (b) both fall by more than the removed output does (``single_dl_per_gap`` and
    ``single_abs_dl_per_gap`` fall as k grows): the alternative of :func:`share_checks`, a removed
    output that shrinks with k, predicts (a) without any compensation, but not (b); (c) the
    routing-weight control, which the paper finds valid, gets a stronger signal
    (``control_mean_dz`` falls as k grows); (d) the observational metrics, whose failure it is
    meant to explain, become valid (``audit_valid_cells`` falls as k grows). (e) The loss change
    with all active experts but one removed is reported with its trend but no prediction: at
    small k that removal also takes out fewer experts. (c) is the weakest test: d_z is
    scale-free, so a loss change that shrinks by the same factor for every expert leaves it
    unchanged, and the control compares the extremes of k experts, a contrast that widens as k
    grows.

    One row per check: ``check``, ``quantity``, ``predicted`` (direction as k grows, ``"—"``
    without a prediction), ``specific`` (False where the output-share alternative predicts the
    same direction), the :func:`trend_against_k` fields, ``p_holm`` (Holm-adjusted over the
    fitted rows, :func:`holm`), ``observed`` (``"falls"``, ``"grows"`` or ``"not detected"`` at
    ``alpha`` after adjustment), ``min_detectable_slope`` and ``equivalence_bound`` (the power of
    each test, at Holm's strictest level ``alpha / m``), ``seeds_agree`` (whether every seed's own
    slope has the pooled slope's sign) and ``holds``: True when the observed direction is the
    predicted one, False when it is the opposite one, ``<NA>`` when no trend is detected
    (inconclusive, not a refutation) or without a prediction. Where no trend can be fitted (fewer
    than three models or two values of k at one E, or every model with the same value)
    ``observed`` is ``"untested"``, the statistics are NaN and ``reason`` says why. A quantity
    missing from ``summary`` raises ``KeyError``."""
    missing = [q for _, q, _, _ in CHECKS if q not in summary.columns]
    if missing:
        raise KeyError(f"summary lacks the quantities {missing} (see per_model_table)")
    out = _trend_rows(summary, [(c, q) for c, q, _, _ in CHECKS], alpha=alpha, power=power)
    spec = {c: (pred, specific) for c, _, pred, specific in CHECKS}
    out.insert(1, "predicted", [spec[c][0] or "—" for c in out.check])
    out.insert(2, "specific", [spec[c][1] for c in out.check])
    holds = []
    for r in out.itertuples():
        if r.predicted == "—" or r.observed in ("untested", "not detected"):
            holds.append(pd.NA)
        else:
            holds.append(r.observed == r.predicted)
    out["holds"] = pd.array(holds, dtype="boolean")
    return out


#: quantities whose scaling with k :func:`share_checks` compares with the 1/k of an output share
SHARE_QUANTITIES = [("removed output shrinks like 1/k", "single_mean_gap"),
                    ("effect size shrinks like 1/k", "single_mean_abs_dl")]


def share_checks(summary: pd.DataFrame, *, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """The output-share alternative: does a quantity shrink with k as a 1/k share of the output would?

    If each of the k active experts carries about 1/k of the block's output, removing one changes
    the output, and a loss that responds in proportion, by about 1/k: a fall with k that needs no
    compensation at all. On ``log2`` of the per-model values against ``log2(top_k)`` that share
    predicts a slope of -1 (a halving per doubling of k). For the removed output's norm
    (``single_mean_gap``) and the size of the loss change (``single_mean_abs_dl``), the fitted
    log-log slope (:func:`trend_against_k` on ``log2`` of the values) is tested against -1
    (two-sided, Holm over the rows): ``relation`` is ``"steeper than 1/k"`` (the value falls
    faster than the share alone predicts: room for compensation), ``"shallower than 1/k"`` (it
    falls more slowly: the nominal share more than accounts for the fall) or ``"not
    distinguishable from 1/k"``; ``"untested"`` with a ``reason`` where no slope can be fitted or
    a value is not positive. Power columns as in :func:`explanation_checks`, for the distance
    from -1. The nominal 1/k ignores how the combine weights and the experts' output norms change
    with k; the per-unit checks of :func:`explanation_checks` use the measured removed output
    instead.

    The signed damage (``single_mean_dl``) can be zero or negative, so it has no logarithm; where
    ``summary`` has it, a last row ``single_k_mean_dl`` tests ``top_k · single_mean_dl`` (nats)
    against ``log2(top_k)`` for a slope of 0, which is what a damage falling like 1/k gives
    (``"steeper than 1/k"``: the damage falls faster). It is a separate test at ``alpha``, not
    part of the Holm family of the log-log rows."""
    missing = [q for _, q in SHARE_QUANTITIES if q not in summary.columns]
    if missing:
        raise KeyError(f"summary lacks the quantities {missing} (see per_model_table)")
    out = _trend_rows(summary, SHARE_QUANTITIES, alpha=alpha, power=power, reference_slope=-1.0, transform=np.log2)
    if "single_mean_dl" in summary.columns:
        scaled = summary.assign(single_k_mean_dl=summary.top_k * summary.single_mean_dl)
        damage = _trend_rows(scaled, [("damage shrinks like 1/k", "single_k_mean_dl")], alpha=alpha, power=power)
        out = pd.concat([out, damage], ignore_index=True)
    out["relation"] = [{"falls": "steeper than 1/k", "grows": "shallower than 1/k",
                        "not detected": "not distinguishable from 1/k"}.get(o, "untested") for o in out.observed]
    return out.drop(columns="observed")


#: quantities on which :func:`pool_comparison` compares the expert pools
POOL_QUANTITIES = ["single_mean_dl", "single_mean_abs_dl", "single_abs_dl_per_gap", "control_mean_dz"]


def pool_comparison(summary: pd.DataFrame, *, quantities=None, alpha: float = 0.05,
                    power: float = 0.8) -> pd.DataFrame:
    """Does k or k/E set a quantity? Each smaller expert pool against the large one.

    The large pool is the most common E. For every setting with another E (``setting``, its E_s
    and k_s) and each quantity (default :data:`POOL_QUANTITIES`), two comparisons of the per-model
    values (``n_experts`` and ``n_experts_ref`` are the two pools' E): ``"same k"`` against the
    large-pool setting with the same top-k (a different k/E) and
    ``"same k/E"`` against the large-pool setting with ``k = k_s · E / E_s`` (a different k).
    Each is a pooled two-sample t test (:func:`moeaudit.stats.two_sample_difference`; the models
    of a setting are the replicates): ``mean``, ``mean_ref``, ``diff`` (setting minus reference,
    the quantity's units) with its 95% ``ci_low``/``ci_high``, ``p``, ``df``, ``sd_pooled``;
    ``p_holm`` (Holm over every tested comparison); ``observed`` (``"higher"``, ``"lower"`` or
    ``"not detected"`` at ``alpha`` after adjustment); ``min_detectable_sd`` (the smallest
    difference, in pooled within-setting SDs, the test detects with ``power`` at Holm's
    strictest level ``alpha / m``, :func:`moeaudit.stats.min_detectable_difference`) and
    ``min_detectable_diff`` (the same in the quantity's units); ``ranges_overlap`` (whether the
    two settings' per-model values overlap: False means every model of one lies above every model
    of the other); ``closer`` (``True`` on the comparison whose reference mean is nearer, a
    description, not a test). A comparison whose reference setting is absent, or that has no
    within-setting spread, is ``"untested"`` with a ``reason``. An empty frame when every model
    has the same E."""
    quantities = list(quantities or POOL_QUANTITIES)
    cols = ["quantity", "comparison", "setting", "reference", "n_experts", "n_experts_ref", "n", "n_ref", "mean",
            "mean_ref", "diff", "ci_low",
            "ci_high", "p", "df", "sd_pooled", "ranges_overlap", "reason"]
    big = int(summary.n_experts.mode().iloc[0])
    small = summary[summary.n_experts != big][["setting", "n_experts", "top_k"]].drop_duplicates()
    rows = []
    for r in small.itertuples():
        group = summary[summary.setting == r.setting]
        targets = [("same k", int(r.top_k)), ("same k/E", r.top_k * big / r.n_experts)]
        for q in quantities:
            for label, k_ref in targets:
                ref = summary[(summary.n_experts == big) & (summary.top_k == k_ref)]
                ref_name = (f"E={big}, top-{int(k_ref)}" if float(k_ref).is_integer() else
                            f"E={big}, top-{k_ref:g}")
                row = dict.fromkeys(cols, np.nan)
                row.update(quantity=q, comparison=label, setting=r.setting, reference=ref_name,
                           n_experts=int(r.n_experts), n_experts_ref=big, n=len(group), n_ref=len(ref), reason="",
                           ranges_overlap=pd.NA)
                if ref.empty:
                    row["reason"] = f"no model with E={big} and top-{k_ref:g} in this run"
                    rows.append(row)
                    continue
                a, b = group[q].to_numpy(dtype=np.float64), ref[q].to_numpy(dtype=np.float64)
                d = two_sample_difference(a, b)
                row.update(mean=d["mean_a"], mean_ref=d["mean_b"], diff=d["diff"], ci_low=d["ci_low"],
                           ci_high=d["ci_high"], p=d["p"], df=d["df"], sd_pooled=d["sd_pooled"],
                           ranges_overlap=bool(a.min() <= b.max() and b.min() <= a.max()))
                if not np.isfinite(d["p"]):
                    row["reason"] = ("one model per setting: no within-setting spread to test against" if d["df"] < 1
                                     else "the models of each setting agree exactly: no spread to test against")
                rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    if out.empty:
        return out.assign(p_holm=[], observed=[], min_detectable_sd=[], min_detectable_diff=[], closer=[])
    out["p_holm"] = holm(out.p)
    tested = out.p_holm.notna()
    m = int(tested.sum())
    out["observed"] = [("higher" if r.diff > 0 else "lower") if r.p_holm < alpha else "not detected" if t else
                       "untested" for r, t in zip(out.itertuples(), tested)]
    out["min_detectable_sd"] = [min_detectable_difference(int(r.n), int(r.n_ref), alpha=alpha / m, power=power)
                                if t else np.nan for r, t in zip(out.itertuples(), tested)]
    out["min_detectable_diff"] = out.min_detectable_sd * out.sd_pooled
    near = out.assign(_gap=out["diff"].abs()).groupby(["setting", "quantity"])._gap.transform("min")
    out["closer"] = pd.array([pd.NA if not np.isfinite(g) or out["diff"].isna()[i] else bool(abs(dv) == g)
                              for i, (dv, g) in enumerate(zip(out["diff"], near))], dtype="boolean")
    return out


def _k_span(trend) -> str:
    return f"top-{trend['ks'][0]} to top-{trend['ks'][-1]} of {trend['n_experts']} experts"


def _seed_directions(r, *, reference: str = "") -> str:
    """``"; fitted on each seed's models alone, the slope is ... (seed 0) and ... (seed 1)"``, and
    whether every seed's slope lies on the pooled slope's side of zero (or of ``reference``), from
    ``seeds_agree``; where they differ and the pooled trend was detected, that the detected trend
    does not hold for every seed."""
    slopes = dict(getattr(r, "seed_slopes", {}) or {})
    if len(slopes) < 2:
        return ""
    parts = _join_words([f"{v:+.3g} (seed {s})" for s, v in slopes.items()])
    agree = getattr(r, "seeds_agree", pd.NA)
    side = f"on the pooled slope's side of {reference}" if reference else "the pooled slope's sign"
    detected = getattr(r, "observed", "") in ("falls", "grows") or getattr(r, "relation", "") in (
        "steeper than 1/k", "shallower than 1/k")
    tail = ("" if pd.isna(agree) else
            (f": every seed's slope lies {side}" if reference else f": every seed's slope has {side}") if bool(agree)
            else ": the seeds' slopes differ in sign" + (f" relative to {reference}" if reference else "")
            + (", so the detected trend does not hold for every seed" if detected else ""))
    return f"; fitted on each seed's models alone, the slope is {parts}{tail}"


def _join_words(items) -> str:

    return join_words(list(items))


def _power_phrase(r, *, power: float, m: int, alpha: float, unit: str, reference: str = "zero") -> str:
    """How large a slope the test would have caught, and whether equivalence could be shown."""
    if not np.isfinite(getattr(r, "min_detectable_slope", np.nan)):
        return ""
    where = f"at Holm's strictest level ({alpha:g}/{m})" if m > 1 else f"at the level {alpha:g}"
    return (f"A slope that differs from {reference} by {r.min_detectable_slope:.3g} {unit} per doubling would be "
            f"detected with {power:.0%} power {where}; equivalence (TOST at that "
            "level) could "
            f"bound the slope only within ±{r.equivalence_bound:.3g} {unit} of {reference}, so a "
            f"{'flat' if reference == 'zero' else 'matching'} trend is not shown either.")


def answer_text(summary: pd.DataFrame, validity: pd.DataFrame, anova: pd.DataFrame, checks: pd.DataFrame, *,
                alpha: float, mde_audit: float | None = None, mde_control: float | None = None,
                power: float = 0.8, shares: pd.DataFrame | None = None,
                pools: pd.DataFrame | None = None) -> dict[str, str]:
    """The chapter's answers as Markdown, computed from :func:`per_model_table`,
    :func:`validity_by_model`, :func:`setting_anova`, :func:`explanation_checks` and, where given,
    :func:`share_checks` (``shares``) and :func:`pool_comparison` (``pools``) results: keys
    ``validity``, ``control``, ``seeds``, ``explanation``, and ``share`` and ``pool`` when those
    are given. ``mde_audit`` and ``mde_control`` are the smallest d_z a cell detects with
    probability ``power`` at its Bonferroni level (:func:`moeaudit.stats.min_detectable_dz`),
    stated beside a null result."""
    out = {}
    valid = validity[validity.valid_cells > 0]
    n_models = summary.model.nunique()
    mde = (f" A cell detects an effect of d_z = {mde_audit:.3f} with {power:.0%} power (t-test at the model's Bonferroni "
           "level), so smaller effects would mostly be missed." if mde_audit is not None else "")
    if valid.empty:
        tost = ""
        if "equivalent_cells" in validity.columns and validity.tost_bound_d.notna().any():
            n_eq, cells = int(validity.equivalent_cells.sum()), int(validity.cells.sum())
            bound, reach = float(validity.tost_bound_d.max()), float(validity.min_tost_bound.max())
            tost = (f" Nor is a zero effect shown in general: {n_eq} of {cells} cells {'is' if n_eq == 1 else 'are'} "
                    f"demonstrably inside "
                    f"±{bound:g} d_z (TOST at the Bonferroni level); at that level TOST can pass only for a bound above "
                    f"{reach:.3f} in the least powerful cell, "
                    + (f"so at ±{bound:g} it passes there only for an observed |d_z| below {bound - reach:.3f}."
                       if reach < bound else f"so at ±{bound:g} it cannot pass there for any data."))
        out["validity"] = (f"**No valid cell is detected.** None of the {validity.ranking.nunique()} observational metrics "
                           f"has a valid cell in any of the {n_models} models (dual test at each model's Bonferroni "
                           f"level with d_z > 0), in any of the {summary.setting.nunique()} settings (k/E from "
                           f"{summary.k_over_E.min():.3f} to {summary.k_over_E.max():.3f}); the largest |d_z| of any "
                           f"observational cell is {summary.audit_max_abs_dz.max():.3f}." + mde + tost)
    else:
        where = valid.merge(summary[["model", "setting", "seed"]], on="model")
        parts = [f"{r.ranking.replace('_', ' ')} in {r.model} ({r.setting}, seed {r.seed}: {int(r.valid_cells)} of "
                 f"{int(r.cells)} cells)" for r in where.itertuples()]
        settings = where.groupby("setting").model.nunique()
        both = [s for s, n in settings.items() if n == summary[summary.setting == s].model.nunique() and n > 1]
        hit_models = int(where.model.nunique())
        chance = binomial_upper_tail(hit_models, n_models, alpha)
        out["validity"] = ("**In places.** Valid observational cells (dual test at the model's Bonferroni level, "
                           f"d_z > 0): {', '.join(parts)}. "
                           + (f"Every seed agrees at {', '.join(both)}." if both else
                              "No setting has valid cells under both seeds, so none of them is a property of the "
                              "setting rather than of one trained model.")
                           + f" Each model is its own family at family-wise level {alpha:g}, so across {n_models} "
                           f"models chance alone gives at least {hit_models} model{'s' if hit_models != 1 else ''} "
                           f"with a false valid cell with probability at most {chance:.2g} (binomial upper tail, "
                           "models taken as independent)"
                           + (": more than chance gives at that level." if chance < alpha else
                              ": not more than chance gives at that level.") + mde)
    c = checks.set_index("check").loc["control signal shrinks with k"]
    m_checks = int(checks.p_holm.notna().sum())
    positive = int((summary.control_mean_dz > 0).sum())
    negative = int((summary.control_mean_dz < 0).sum())
    sign_p = sign_test(positive, negative)
    level = (f"Its mean d_z per model ranges from {summary.control_mean_dz.min():+.3f} to "
             f"{summary.control_mean_dz.max():+.3f} (positive in {positive} of {n_models} models"
             + (f"; two-sided sign test p = {sign_p:.2g}" if np.isfinite(sign_p) else "") + "), and "
             + (f"it has {int(summary.control_valid_cells.min())} valid cells in every model"
                if summary.control_valid_cells.nunique() == 1 else
                f"its valid cells per model range from {int(summary.control_valid_cells.min())} to "
                f"{int(summary.control_valid_cells.max())}")
             + (f"; a control cell detects d_z = {mde_control:.3f} with {power:.0%} power" if mde_control is not None
                else "") + ".")
    if c.observed == "untested":
        out["control"] = f"No trend can be fitted on this run ({c.reason}). {level}"
    else:
        span = float(np.log2(c.ks[-1] / c.ks[0]))
        verb = {"falls": "grows as k falls", "grows": "shrinks as k falls",
                "not detected": "shows no detectable trend with k"}[c.observed]
        out["control"] = (f"The routing-weight control's mean d_z {verb} over {_k_span(c)}: slope {c.slope:+.3f} per "
                          f"doubling of k (95% CI [{c.ci_low:+.3f}, {c.ci_high:+.3f}], p = {c.p:.2g}, Holm-adjusted "
                          f"over {m_checks} trends: {c.p_holm:.2g}; n = {int(c.n)} models){_seed_directions(c)}. Over "
                          f"the whole range of k the interval allows a change from {c.ci_low * span:+.3f} to "
                          f"{c.ci_high * span:+.3f}."
                          + (" " + _power_phrase(c, power=power, m=m_checks, alpha=alpha, unit="d_z")
                             if c.observed == "not detected" else "") + f" {level}")
    lines = []
    family = int(anova.p.notna().sum())
    for r in anova.itertuples():
        what = QUANTITIES[r.quantity]
        if np.isnan(r.F):
            lines.append(f"- {what}: no spread between models of one setting to compare with (one model per setting, "
                         "or identical values).")
            continue
        detected = r.p_holm < alpha
        verdict = "larger than" if detected else "not distinguishable from"
        lines.append(f"- {what}: the setting effect is {verdict} the spread between models of one setting "
                     f"(F({r.df_between}, {r.df_within}) = {r.F:.3g}, p = {r.p:.2g}, Holm-adjusted over {family} "
                     f"quantities: {r.p_holm:.2g}; SD of setting means {r.sd_between:.3g} against within-setting SD "
                     f"{r.sd_seed:.3g})."
                     + ("" if detected or not np.isfinite(getattr(r, "min_detectable_f", np.nan)) else
                        f" Not a demonstration that the settings agree: with {power:.0%} power the test detects only "
                        f"setting means spread by Cohen's f = {r.min_detectable_f:.2f} within-setting SDs (SD "
                        f"{r.min_detectable_sd:.3g}) at Holm's strictest level ({alpha:g}/{family})."))
    out["seeds"] = "\n".join(lines)
    out["explanation"] = _explanation_text(checks, alpha=alpha, power=power)
    if shares is not None:
        out["share"] = _share_text(shares, checks, alpha=alpha, power=power)
    if pools is not None:
        out["pool"] = _pool_text(pools, alpha=alpha, power=power)
    return out


def _verdict(r) -> str:
    if pd.isna(r.holds):
        return "**Not detected** (inconclusive, not a refutation)."
    if not bool(r.holds):
        return "**Contradicted.**"
    if not r.specific:
        return ("**Holds, but not specifically:** the output-share alternative (below) predicts the same fall "
                "without any compensation.")
    return "**Holds.**"


def _explanation_text(checks: pd.DataFrame, *, alpha: float, power: float) -> str:
    lines = []
    m = int(checks.p_holm.notna().sum())
    for r in checks.itertuples():
        if r.predicted == "—":
            continue
        claim = _CLAIMS[r.quantity]
        if r.observed == "untested":
            lines.append(f"- *Predicted:* {claim}. *Not testable here:* {r.reason}.")
            continue
        extra = ""
        if r.observed == "not detected":
            extra = " " + _power_phrase(r, power=power, m=m, alpha=alpha, unit=_OBSERVED_NAMES[r.quantity][1])
            if r.specific and r.quantity in ("single_dl_per_gap", "single_abs_dl_per_gap"):
                extra += (" The output-share alternative predicts no trend here; not detecting one is consistent with "
                          "it but does not show it.")
        lines.append(f"- *Predicted:* {claim}. *Observed:* {_observed(r, m)}{_seed_directions(r)}. {_verdict(r)}{extra}")
    d = checks.set_index("check").loc["deepest-removal damage against k"]
    if d.observed == "untested":
        lines.append(f"- With all active experts but one removed: no trend can be fitted ({d.reason}).")
    else:
        tail = ""
        if d.observed == "not detected":
            tail = " " + _power_phrase(d, power=power, m=m, alpha=alpha, unit="nats")
        lines.append(f"- No prediction, because the deepest removal takes out more experts at larger k: "
                     f"{_observed(d, m)}{_seed_directions(d)}.{tail}")
    lines.append("\n" + _explanation_summary(checks))
    return "\n".join(lines)


def _explanation_summary(checks: pd.DataFrame) -> str:
    """One paragraph: where the explanation is contradicted, supported beyond the output-share
    alternative, only consistent with it, or undecided; built from ``holds`` and ``specific``."""
    predicted = checks[checks.predicted != "—"]
    held = predicted[predicted.holds.fillna(False).astype(bool)]
    contradicted = predicted[predicted.holds.notna() & ~predicted.holds.fillna(True).astype(bool)]
    specific = list(held[held.specific.astype(bool)].quantity)
    unspecific = list(held[~held.specific.astype(bool)].quantity)
    decided = set(held.quantity) | set(contradicted.quantity)
    untested = [q for q, o in zip(predicted.quantity, predicted.observed) if o == "untested"]
    open_q = [q for q in predicted.quantity if q not in decided and q not in untested]
    if not decided:
        return "No prediction could be decided on this run."
    parts = []
    if len(contradicted):
        parts.append(f"The data contradict the explanation where it predicts that {_join_claims(contradicted.quantity)}.")
    if specific:
        parts.append(f"They support it, beyond what the output-share alternative explains, where {_join_claims(specific)}.")
    if unspecific:
        both = len(unspecific) > 1
        parts.append(f"They agree with it where {_join_claims(unspecific)}; but the output-share alternative predicts "
                     + ("each of these falls as well, so none of them alone shows compensation." if both else
                        "that fall as well, so it alone does not show compensation."))
    if "single_mean_abs_dl" in unspecific and "single_mean_dl" in open_q:
        parts.append("The size of a single removal's loss change falls with top-k while its mean, the damage, shows no "
                     "detectable trend: the size counts removals that lower the loss as well, so it does not show that "
                     "fewer active experts make a removal more harmful.")
    if open_q:
        parts.append(f"Undecided at this power: whether {_join_claims(open_q)}.")
    if untested:
        parts.append(f"Not testable on this run: whether {_join_claims(untested)}.")
    return " ".join(parts)


def _share_text(shares: pd.DataFrame, checks: pd.DataFrame, *, alpha: float, power: float) -> str:
    """The output-share alternative, stated and tested (:func:`share_checks`), with the per-unit checks."""
    lines = ["*The alternative.* Each of the k active experts carries part of the block's output. If that part is "
             "about 1/k, removing one changes the output by about 1/k, and a loss that responds in proportion changes "
             "by about 1/k too, with no expert standing in for another. On a log-log scale that share alone predicts "
             "a slope of −1 per doubling of k (a halving); for the signed damage, which can be zero or negative and "
             "has no logarithm, it predicts that k times the mean ΔL stays constant."]
    names = {"single_mean_gap": "The removed output (mean gap norm)",
             "single_mean_abs_dl": "The size of the loss change (mean |ΔL|)"}
    log_m = int(shares[shares.quantity != "single_k_mean_dl"].p_holm.notna().sum())
    damage_rel = None
    for r in shares.itertuples():
        if r.quantity == "single_k_mean_dl":
            damage_rel = r.relation
            lines.append(_damage_share_line(r, power=power, alpha=alpha))
            continue
        if r.relation == "untested":
            lines.append(f"- {names[r.quantity]}: not testable here ({r.reason}).")
            continue
        factor = 2.0 ** r.slope
        rel = {("single_mean_gap", "steeper than 1/k"): "the removed output shrinks faster than a 1/k share",
               ("single_mean_gap", "shallower than 1/k"): "the removed output shrinks more slowly than a 1/k share",
               ("single_mean_abs_dl", "steeper than 1/k"):
                   "the loss change falls by more than a 1/k share alone would give; the excess is room for "
                   "compensation, or for a removed output that shrinks faster than 1/k",
               ("single_mean_abs_dl", "shallower than 1/k"):
                   "the size of the loss change falls by less than a 1/k share alone would give, so its fall is no "
                   "steeper than an output share gives and needs no compensation to be explained (it is not fitted "
                   "by a 1/k share either, which would be steeper)"}.get((r.quantity, r.relation),
                                                     "not distinguishable from a 1/k share")
        power_note = ("" if r.relation != "not distinguishable from 1/k" else
                      " " + _power_phrase(r, power=power, m=log_m, alpha=alpha, unit="log2 units", reference="−1"))
        lines.append(f"- {names[r.quantity]} changes by a factor {factor:.3g} per doubling of k (log-log slope "
                     f"{r.slope:+.3f}, 95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}]; against −1: p = {r.p:.2g}, "
                     f"Holm-adjusted over {log_m} slopes: {r.p_holm:.2g}){_seed_directions(r, reference='−1')}: {rel}."
                     + power_note)
    abs_rel = shares.set_index("quantity").relation.get("single_mean_abs_dl", "untested")
    if abs_rel == "shallower than 1/k" and damage_rel == "steeper than 1/k":
        lines.append("So the fall of the size of the loss change needs no compensation (it is shallower than a 1/k "
                     "share gives), but the fall of the damage is steeper than a 1/k share.")
    elif abs_rel == "shallower than 1/k" and damage_rel == "not distinguishable from 1/k":
        lines.append("So the fall of the size of the loss change needs no compensation (it is shallower than a 1/k "
                     "share gives); whether the fall of the damage does is not decided by this test.")
    per_unit = checks.set_index("quantity")
    summary = []
    for q, what in (("single_abs_dl_per_gap", "the size of the loss change"), ("single_dl_per_gap", "the damage")):
        if q not in per_unit.index:
            continue
        r = per_unit.loc[q]
        state = {"falls": "falls as top-k grows", "grows": "grows as top-k grows",
                 "not detected": "shows no trend with top-k detected after Holm's adjustment",
                 "untested": "cannot be tested"}[r.observed]
        excl = (f", with Holm-adjusted p = {r.p_holm:.2g} although the unadjusted 95% CI [{r.ci_low:+.3g}, "
                f"{r.ci_high:+.3g}] excludes zero" if _unadjusted_note(r) else "")
        summary.append(f"{what} per unit of removed output {state}{excl}")
    if summary:
        lines.append("\nThe nominal 1/k ignores how the combine weights and the experts' output norms change with k, so "
                     "the direct test uses the measured removed output: " + "; ".join(summary)
                     + " (rows of the prediction table above, Holm over its trends). Only a fall there is a loss "
                     "change that shrinks by more than the removed output, the part a compensation would have to "
                     "explain.")
    return "\n".join(lines)


def _pool_text(pools: pd.DataFrame, *, alpha: float, power: float) -> str:
    """The small pool against the large one at the same k and the same k/E (:func:`pool_comparison`)."""
    if pools.empty:
        return ("Every model of this run has the same number of experts, so k cannot be told apart from k/E.")
    m = int(pools.p_holm.notna().sum())
    lines = []
    for setting, g in pools.groupby("setting", sort=False):
        refs = g.drop_duplicates("comparison").set_index("comparison").reference
        E_s, E_b = int(g.n_experts.iloc[0]), int(g.n_experts_ref.iloc[0])
        lines.append("If the number of active experts is what makes experts stand in for one another, a smaller pool "
                     "matches the large pool's setting with the same top-k; if the active share k/E is, it matches the "
                     "setting with the same k/E.")
        lines.append(f"{setting} has the same top-k as {refs.get('same k', '—')} but a k/E {E_b / E_s:g} times larger, "
                     f"and the same k/E as {refs.get('same k/E', '—')} but a different top-k; with {E_s} instead of "
                     f"{E_b} routed experts it also has {'fewer' if E_s < E_b else 'more'} expert parameters at equal "
                     "expert width.")
        for q, gq in g.groupby("quantity", sort=False):
            name, unit = _OBSERVED_NAMES[q]
            parts = []
            for r in gq.itertuples():
                if r.observed == "untested":
                    parts.append(f"against {r.reference} ({r.comparison}): not testable ({r.reason})")
                    continue
                what = {"higher": "higher", "lower": "lower",
                        "not detected": "no difference detected after Holm's adjustment"}[r.observed]
                overlap = ("the two settings' models overlap" if bool(r.ranges_overlap) else
                           "every model of one setting lies beyond every model of the other")
                parts.append(f"against {r.reference} ({r.comparison}), {what}: {r.mean:.3g} against {r.mean_ref:.3g}, "
                             f"difference {r.diff:+.3g} {unit} (unadjusted 95% CI [{r.ci_low:+.3g}, {r.ci_high:+.3g}]"
                             + ("; it excludes zero, the Holm-adjusted test does not reject"
                                if r.observed == "not detected" and (r.ci_low > 0 or r.ci_high < 0) else "")
                             + f", pooled t on "
                             f"{int(r.df)} df, p = {r.p:.2g}, Holm-adjusted over {m} comparisons: {r.p_holm:.2g}; "
                             f"{overlap})")
            lines.append(f"- {name[0].upper() + name[1:]}: " + "; ".join(parts) + ". " + _pool_reading(gq))
        tested = g[g.p_holm.notna()]
        if len(tested):
            lines.append(f"\nWith {int(tested.n.min())} and {int(tested.n_ref.min())} models per setting, the "
                         f"within-setting spread rests on {int(tested.df.min())} degrees of freedom: at Holm's "
                         f"strictest level ({alpha:g}/{m}) a difference is detected with {power:.0%} power only if it "
                         f"exceeds {tested.min_detectable_sd.min():.1f} within-setting SDs. Complete separation of two "
                         f"settings' models happens by chance alone in {_separation_chance(tested):.2g} of equally "
                         "likely orderings, so it is no evidence by itself. A difference not detected here is not "
                         "evidence that top-k alone, or k/E alone, sets the quantity; and a difference that is "
                         "detected may come from the pool's parameter count as much as from k/E.")
    return "\n".join(lines)


def _separation_chance(tested: pd.DataFrame) -> float:
    """Chance that the ``n`` models of one setting all lie above, or all below, the ``n_ref`` of the
    other when every ordering is equally likely: ``2 / C(n + n_ref, n)`` (the smallest groups)."""
    from math import comb  # noqa: PLC0415

    n, n_ref = int(tested.n.min()), int(tested.n_ref.min())
    return 2.0 / comb(n + n_ref, n)


def _pool_reading(g: pd.DataFrame) -> str:
    """What one quantity's two comparisons support (k versus k/E), from the Holm-adjusted tests."""
    by = g.set_index("comparison")
    same_k = by.observed.get("same k", "untested")
    same_ke = by.observed.get("same k/E", "untested")
    said = []
    p = by.p_holm if "p_holm" in by else pd.Series(dtype=float)
    if same_k in ("higher", "lower"):
        said.append(f"at the same top-k the two pools differ in it (Holm-adjusted p = {p['same k']:.2g}), so top-k "
                    "alone does not set it; the difference may come from k/E or from the smaller pool's parameter count")
    if same_ke in ("higher", "lower"):
        said.append(f"at the same k/E the two settings differ in it (Holm-adjusted p = {p['same k/E']:.2g}), which may "
                    "come from their different top-k or from the smaller pool's parameter count, so k/E alone does not "
                    "set it")
    if not said:
        said.append("the family cannot tell top-k from k/E for it at this power")
    closer = by[by.closer.fillna(False).astype(bool)].index.tolist() if "closer" in by else []
    desc = (f" Descriptively the small pool's mean lies nearer the {closer[0]} setting (not a test)."
            if len(closer) == 1 and len(by) > 1 and by["diff"].notna().all() else "")
    return said[0][0].upper() + "; ".join(said)[1:] + "." + desc


def _join_claims(quantities) -> str:
    return "; ".join(_CLAIMS[q] for q in quantities)


#: what the redundancy explanation predicts for each quantity as top-k grows
_CLAIMS = {
    "single_mean_dl": "a single-expert ablation damages the model less (smaller mean ΔL) as top-k grows",
    "single_mean_abs_dl": "a single-expert ablation changes the loss by a smaller amount, of either sign, as top-k grows",
    "single_dl_per_gap": "the damage per unit of removed output shrinks as top-k grows",
    "single_abs_dl_per_gap": "the size of the loss change per unit of removed output shrinks as top-k grows",
    "control_mean_dz": "the routing-weight control's signal weakens as top-k grows",
    "audit_valid_cells": "the observational metrics have fewer valid cells as top-k grows",
}

_OBSERVED_NAMES = {
    "single_mean_dl": ("the mean ΔL of a single-expert ablation", "nats"),
    "single_mean_abs_dl": ("the mean |ΔL| of a single-expert ablation", "nats"),
    "single_mean_gap": ("the mean removed-output norm", "norm units"),
    "single_dl_per_gap": ("the mean ΔL per unit of removed output", "nats per unit norm"),
    "single_abs_dl_per_gap": ("the mean |ΔL| per unit of removed output", "nats per unit norm"),
    "control_mean_dz": ("the control's mean d_z", "d_z units"),
    "audit_valid_cells": ("the number of valid observational cells", "cells"),
    "deepest_mean_dl": ("the mean ΔL with all active experts but one removed", "nats"),
}


def _observed(r, m: int) -> str:
    name, unit = _OBSERVED_NAMES[r.quantity]
    if np.isfinite(getattr(r, "value", np.nan)):
        return f"{name} is {r.value:g} in every model"
    trend = {"falls": "falls as top-k grows", "grows": "grows as top-k grows",
             "not detected": "shows no trend with top-k detected after Holm's adjustment"}
    return (f"{name} {trend[r.observed]} (slope {r.slope:+.3g} {unit} per doubling, unadjusted 95% CI "
            f"[{r.ci_low:+.3g}, {r.ci_high:+.3g}], p = {r.p:.2g}, Holm-adjusted over {m} trends: {r.p_holm:.2g}"
            + _unadjusted_note(r) + ")")


def _unadjusted_note(r) -> str:
    """``"; the unadjusted interval excludes zero, the Holm-adjusted test does not reject"`` for a row
    whose ``observed`` is ``"not detected"`` although its unadjusted ``ci_low``/``ci_high`` lie on one
    side of zero; ``""`` otherwise."""
    if getattr(r, "observed", "") != "not detected" or not (r.ci_low > 0 or r.ci_high < 0):
        return ""
    return "; the unadjusted interval excludes zero, the Holm-adjusted test does not reject"


def _damage_share_line(r, *, power: float, alpha: float) -> str:
    """The signed damage against the 1/k share (the ``single_k_mean_dl`` row of :func:`share_checks`)."""
    if r.relation == "untested":
        return f"- The damage (mean ΔL): not testable against 1/k here ({r.reason})."
    rel = {"steeper than 1/k": "the damage falls faster than a 1/k share alone would give: room for compensation, or "
                               "for a removed output that shrinks faster than 1/k",
           "shallower than 1/k": "the damage falls more slowly than a 1/k share, which explains its fall without "
                                 "compensation",
           "not distinguishable from 1/k": "not distinguishable from a damage that falls like 1/k"}[r.relation]
    note = ("" if r.relation != "not distinguishable from 1/k" else
            " " + _power_phrase(r, power=power, m=1, alpha=alpha, unit="nats", reference="zero").replace(
                "a flat trend", "a 1/k fall"))
    return (f"- The damage (mean ΔL) times k changes by {r.slope:+.3g} nats per doubling of k (95% CI "
            f"[{r.ci_low:+.3g}, {r.ci_high:+.3g}]; against 0, what a 1/k fall gives: p = {r.p:.2g}, a separate test at "
            f"{alpha:g}){_seed_directions(r, reference='zero')}: {rel}." + note)


def control_rule_text(control: pd.DataFrame, *, audit_levels: Mapping[str, float]) -> str:
    """Which models' audit nulls can be read at all, by the control rule of chapter 5 (a model whose
    routing-weight control fails has an audit null that cannot be read either way), as sentences.

    ``control``: :func:`moeaudit.stats.audit_table` rows of the routing-weight control (``model``,
    ``sig_dual_bonf``, ``cohens_dz``, ``p_t``, ``p_W``, ``alpha_corrected``); ``audit_levels``:
    {model: the audit's per-cell Bonferroni level}. The control passes at its own level where some cell
    is valid (:func:`_valid`); it passes at the audit's level where some cell has d_z > 0 and both
    ``p_t`` and ``p_W`` below that level (the dual test at the stricter level).
    """
    models = list(dict.fromkeys(control.model))
    own = [m for m in models if _valid(control[control.model == m]).any()]
    at_audit = [m for m in own if any((r.cohens_dz > 0) and (r.p_t < audit_levels[m]) and (r.p_W < audit_levels[m])
                                      for r in control[control.model == m].itertuples())]
    n = len(models)
    own_lvl = sorted({float(v) for v in control.alpha_corrected})
    lvl = f"{own_lvl[0]:.3g}" if len(own_lvl) == 1 else f"{own_lvl[0]:.3g}–{own_lvl[-1]:.3g}"
    aud = sorted({float(audit_levels[m]) for m in models})
    alvl = f"{aud[0]:.3g}" if len(aud) == 1 else f"{aud[0]:.3g}–{aud[-1]:.3g}"
    s = (f"The routing-weight control passes (a valid cell at its own Bonferroni level, {lvl}) in {len(own)} of the "
         f"{n} models" + (f" ({_join_words(own)})" if 0 < len(own) < n else ""))
    if own:
        s += (f"; at the audit's stricter per-cell level ({alvl}) it passes in "
              + (f"{len(at_audit)} of them" + (f" ({_join_words(at_audit)})" if 0 < len(at_audit) < len(own) else "")
                 if at_audit else "none of them"))
    s += "."
    if len(own) < n:
        s += (f" By the control rule of the routing-weight chapter, the audit's nulls in the other {n - len(own)} "
              "model" + ("s" if n - len(own) != 1 else "") + " cannot be read either way: there the design does not "
              "detect even the control's effect.")
    return s
