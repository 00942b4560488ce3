"""Does redundancy explain the null? The analysis of the controlled redundancy family.

The paper attributes the failure of observational metrics to redundancy among the active experts
(Section 5: removing most active experts at early layers leaves OLMoE's loss almost unchanged,
so "the metric and the random baseline are doing the same thing") and leaves open whether the
metrics regain validity in low-redundancy architectures. The redundancy family
(:data:`moeaudit.zoo.REDUNDANCY_MODELS`) varies one factor, the routing (E routed experts,
top-k), with everything else fixed and two training seeds per setting. This module turns the
book's per-cell statistics of those models into per-model and per-setting summaries and into the
tests that answer the chapter's four questions:

1. does any observational metric become valid (the paper's dual-test rule under the model's
   Bonferroni family) as k falls: :func:`validity_by_model`;
2. does the routing-weight control's signal grow as k falls: :func:`trend_against_k`;
3. is the spread between seeds smaller than the effect of the setting: :func:`setting_anova`;
4. where does the redundancy explanation hold: :func:`explanation_checks`.

Every function takes tidy frames made by :func:`moeaudit.stats.audit_table`,
:func:`moeaudit.audit.progressive_summary` or the ablation records, and returns a tidy frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

#: the per-model quantities that :func:`model_summary` computes, with what each measures
QUANTITIES = {
    "audit_max_abs_dz": "largest |Cohen's d_z| over the model's observational cells (4 metrics x layers)",
    "audit_valid_cells": "observational cells valid under the dual-test rule (Bonferroni, d_z > 0)",
    "control_mean_dz": "mean Cohen's d_z of the routing-weight control over the audited layers",
    "control_valid_cells": "control cells valid under the dual-test rule (Bonferroni, d_z > 0)",
    "single_mean_abs_dl": "mean |ΔL| of a single-expert ablation (nats), over positions, layers and experts",
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
        seed = (seeds or {}).get(name, training_seed(name)) if seeds is not None else training_seed(name)
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
    directory written by :mod:`moeaudit.training`), else ``None``."""
    from .zoo import SHIPPED_MODELS, ZOO_DIR  # noqa: PLC0415

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
    points the wrong way), ``max_abs_dz`` and ``mean_dz`` over the tested cells."""
    t = audit.assign(_valid=_valid(audit),
                     _neg=audit.sig_dual_bonf.fillna(False).astype(bool) & (audit.cohens_dz < 0))
    return t.groupby(["model", "ranking"], sort=False).agg(
        cells=("cohens_dz", "size"), valid_cells=("_valid", "sum"), negative_cells=("_neg", "sum"),
        max_abs_dz=("cohens_dz", lambda d: float(d.abs().max())), mean_dz=("cohens_dz", "mean")).reset_index()


def gap_growth(records: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer) mean gap norm ``||y_t - y_t^(-e)||`` of single-expert records
    (``gap_norm``), with ``growth`` = the layer's mean over the model's first audited layer's
    (the paper's "~40x from the first to the last audited layer", Section 4.3)."""
    g = records.groupby(["model", "layer"], sort=True).gap_norm.mean().rename("mean_gap").reset_index()
    first = g.groupby("model").mean_gap.transform("first")
    return g.assign(growth=g.mean_gap / first)


def model_summary(members: pd.DataFrame, *, audit: pd.DataFrame, control: pd.DataFrame, single: pd.DataFrame,
                  progressive: pd.DataFrame) -> pd.DataFrame:
    """One row per model of ``members`` (:func:`member_table`) with the columns of
    :data:`QUANTITIES`.

    ``audit``, ``control``: :func:`moeaudit.stats.audit_table` results of the observational
    rankings and of the routing-weight control (families: the model); ``single``: single-expert
    ablation records (``delta_loss``, ``gap_norm``); ``progressive``: progressive-ablation records
    (``k``, ``delta_loss``); the deepest removal is each model's largest ``k``. ``KeyError`` if
    a model of ``members`` is missing from any of them."""
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
    out["single_mean_abs_dl"] = single.assign(a=single.delta_loss.abs()).groupby("model").a.mean()
    deepest = progressive[progressive.k == progressive.groupby("model").k.transform("max")]
    out["deepest_mean_dl"] = deepest.groupby("model").delta_loss.mean()
    growth = gap_growth(single).groupby("model").growth.last()
    out["gap_growth"] = growth
    return out.reset_index()


def setting_anova(summary: pd.DataFrame, *, quantities=None) -> pd.DataFrame:
    """Is the spread between seeds smaller than the effect of the routing setting?

    For each quantity (a column of :func:`model_summary`; default: the float columns of
    :data:`QUANTITIES`), a one-way ANOVA of the per-model values with the setting as the factor
    and the seeds as replicates (``scipy.stats.f_oneway``): ``F``, ``p``, ``df_between``,
    ``df_within``; ``sd_between`` (standard deviation of the setting means, ddof=1),
    ``sd_seed`` (pooled within-setting standard deviation, ``sqrt(SS_within / df_within)``) and
    their ratio; ``eta_sq`` (``SS_between / SS_total``). ``F`` and ``p`` are NaN where the
    seeds agree exactly or a setting has one model (no within-setting spread to compare with)."""
    from scipy import stats as sps  # noqa: PLC0415

    quantities = list(quantities or ["audit_max_abs_dz", "control_mean_dz", "single_mean_abs_dl", "deepest_mean_dl",
                                     "gap_growth"])
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
        F, p = sps.f_oneway(*groups) if testable else (np.nan, np.nan)
        sd_between = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
        rows.append({"quantity": q, "settings": len(groups), "models": len(allv), "F": float(F), "p": float(p),
                     "df_between": len(groups) - 1, "df_within": df_within, "sd_between": sd_between,
                     "sd_seed": sd_seed, "ratio": sd_between / sd_seed if sd_seed > 0 else float("inf"),
                     "eta_sq": (ss_total - ss_within) / ss_total if ss_total > 0 else float("nan")})
    return pd.DataFrame(rows)


def trend_against_k(summary: pd.DataFrame, *, quantity: str, n_experts: int | None = None) -> dict:
    """Does ``quantity`` change with top-k among models with the same number of experts?

    Ordinary least squares of the per-model values on ``log2(top_k)`` (``scipy.stats.linregress``;
    seeds enter as separate points) over the models with ``n_experts`` routed experts (default:
    the most common E). Returns ``slope`` (change per doubling of k), its ``ci_low``/``ci_high``
    (95%, Student t with n - 2 degrees of freedom: ``slope ± t_{0.975, n-2} · stderr``), ``p``
    (two-sided, slope = 0), ``n`` (models), ``ks`` (the k values) and ``spearman_rho`` with its
    ``spearman_p`` (``scipy.stats.spearmanr``). When every model has the same value the slope is
    0 with p = 1, the Spearman fields are NaN and ``value`` is that value. ``ValueError`` with fewer than two distinct k
    or fewer than three models."""
    from scipy import stats as sps  # noqa: PLC0415

    E = int(summary.n_experts.mode().iloc[0]) if n_experts is None else int(n_experts)
    s = summary[summary.n_experts == E]
    if s.top_k.nunique() < 2 or len(s) < 3:
        raise ValueError(f"a trend against k needs at least two values of k and three models with E={E}; "
                         f"got k in {sorted(int(k) for k in s.top_k.unique())} over {len(s)} model(s)")
    x, y = np.log2(s.top_k.to_numpy(dtype=np.float64)), s[quantity].to_numpy(dtype=np.float64)
    base = {"quantity": quantity, "n_experts": E, "n": int(len(x)), "ks": sorted(int(k) for k in s.top_k.unique())}
    if np.ptp(y) == 0:  # every model has the same value (e.g. no valid cell anywhere): no trend, nothing to fit
        return {**base, "slope": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "spearman_rho": float("nan"),
                "spearman_p": float("nan"), "value": float(y[0])}
    fit = sps.linregress(x, y)
    half = float(sps.t.ppf(0.975, len(x) - 2) * fit.stderr)
    rho = sps.spearmanr(x, y)
    return {**base, "slope": float(fit.slope), "ci_low": float(fit.slope - half), "ci_high": float(fit.slope + half),
            "p": float(fit.pvalue), "spearman_rho": float(rho.statistic), "spearman_p": float(rho.pvalue)}


def _direction(trend: dict, *, alpha: float) -> str:
    """``"falls"``/``"grows"`` as k grows when the slope's test rejects at ``alpha``, else ``"flat"``."""
    if not trend["p"] < alpha:
        return "flat"
    return "grows" if trend["slope"] > 0 else "falls"


def explanation_checks(summary: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """The redundancy explanation's predictions, each tested on the family.

    If redundancy hides single experts' effects, then with fewer active experts (smaller k):
    (a) a single-expert ablation changes the loss more (``single_mean_abs_dl`` falls as k grows);
    (b) the routing-weight control, which the paper finds valid, gets a stronger signal
    (``control_mean_dz`` falls as k grows); (c) the observational metrics, whose failure it is
    meant to explain, become valid (``audit_valid_cells`` falls as k grows, i.e. more valid
    cells at small k). (d) The loss change with all active experts but one removed is reported
    with its trend but no prediction: at small k that removal also takes out fewer experts.

    One row per check: ``check``, ``quantity``, ``predicted`` (direction as k grows), the
    :func:`trend_against_k` fields, ``observed`` (``"falls"``, ``"grows"`` or ``"flat"`` at
    ``alpha``) and ``holds`` (observed == predicted; ``<NA>`` without a prediction). Where no trend
    can be fitted (fewer than three models or two values of k at one E), ``observed`` is
    ``"untested"``, the statistics are NaN and ``reason`` says why."""
    checks = [("single-expert effect shrinks with k", "single_mean_abs_dl", "falls"),
              ("control signal shrinks with k", "control_mean_dz", "falls"),
              ("observational validity shrinks with k", "audit_valid_cells", "falls"),
              ("deepest-removal damage against k", "deepest_mean_dl", None)]
    rows = []
    for check, q, predicted in checks:
        try:
            tr = trend_against_k(summary, quantity=q)
        except ValueError as err:  # too few models or values of k for a trend: reported, not raised
            rows.append({"check": check, "predicted": predicted or "—", "quantity": q, "slope": np.nan,
                         "ci_low": np.nan, "ci_high": np.nan, "p": np.nan, "observed": "untested", "holds": pd.NA,
                         "reason": str(err)})
            continue
        observed = _direction(tr, alpha=alpha)
        rows.append({"check": check, "predicted": predicted or "—", **tr, "observed": observed,
                     "holds": pd.NA if predicted is None else observed == predicted, "reason": ""})
    out = pd.DataFrame(rows)
    out["holds"] = out["holds"].astype("boolean")
    return out


def _k_span(trend: dict) -> str:
    return f"top-{trend['ks'][0]} to top-{trend['ks'][-1]} of {trend['n_experts']} experts"


def answer_text(summary: pd.DataFrame, validity: pd.DataFrame, anova: pd.DataFrame, checks: pd.DataFrame, *,
                alpha: float) -> dict[str, str]:
    """The chapter's four answers as Markdown, computed from :func:`model_summary`,
    :func:`validity_by_model`, :func:`setting_anova` and :func:`explanation_checks` results:
    keys ``validity``, ``control``, ``seeds``, ``explanation``."""
    out = {}
    valid = validity[validity.valid_cells > 0]
    n_models = summary.model.nunique()
    if valid.empty:
        out["validity"] = (f"**No.** None of the {validity.ranking.nunique()} observational metrics has a valid cell in any "
                           f"of the {n_models} models (dual test at each model's Bonferroni level with d_z > 0), "
                           f"in any of the {summary.setting.nunique()} settings (k/E from {summary.k_over_E.min():.3g} "
                           f"to {summary.k_over_E.max():.3g}); the largest |d_z| of any "
                           f"observational cell is {summary.audit_max_abs_dz.max():.3f}.")
    else:
        where = valid.merge(summary[["model", "setting", "seed"]], on="model")
        parts = [f"{r.ranking.replace('_', ' ')} in {r.model} ({r.setting}, seed {r.seed}: {int(r.valid_cells)} of "
                 f"{int(r.cells)} cells)" for r in where.itertuples()]
        settings = where.groupby("setting").model.nunique()
        both = [s for s, n in settings.items() if n == summary[summary.setting == s].model.nunique() and n > 1]
        out["validity"] = ("**In places.** Valid observational cells (dual test at the model's Bonferroni level, "
                           f"d_z > 0): {', '.join(parts)}. "
                           + (f"Every seed agrees at {', '.join(both)}." if both else
                              "No setting has valid cells under both seeds, so none of them is a property of the "
                              "setting rather than of one trained model."))
    c = checks.set_index("check").loc["control signal shrinks with k"]
    valid_span = (f"its mean d_z per model ranges from {summary.control_mean_dz.min():+.3f} to "
                  f"{summary.control_mean_dz.max():+.3f}, and its valid cells per model from "
                  f"{int(summary.control_valid_cells.min())} to {int(summary.control_valid_cells.max())}.")
    if c.observed == "untested":
        out["control"] = f"No trend can be fitted on this run ({c.reason}); {valid_span}"
    else:
        ci = f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]"
        verb = {"falls": "grows as k falls", "grows": "shrinks as k falls", "flat": "shows no trend with k"}[c.observed]
        out["control"] = (f"The routing-weight control's mean d_z {verb} over {_k_span(c)}: slope "
                          f"{c.slope:+.3f} per doubling of k, 95% CI {ci}, p = {c.p:.2g} (n = {int(c.n)} models); "
                          + valid_span)
    lines = []
    for r in anova.itertuples():
        what = QUANTITIES[r.quantity]
        if np.isnan(r.F):
            lines.append(f"- {what}: no seed spread to compare with (one model per setting, or identical seeds).")
            continue
        verdict = "larger than" if r.p < alpha else "not distinguishable from"
        lines.append(f"- {what}: the setting effect is {verdict} the seed spread (F({r.df_between}, {r.df_within}) = "
                     f"{r.F:.3g}, p = {r.p:.2g}; SD of setting means {r.sd_between:.3g} against seed SD "
                     f"{r.sd_seed:.3g}).")
    out["seeds"] = "\n".join(lines)
    lines = []
    for r in checks.itertuples():
        if r.predicted == "—":
            continue
        claim = _CLAIMS[r.quantity]
        if r.observed == "untested":
            lines.append(f"- *Predicted:* {claim}. *Not tested:* {r.reason}.")
            continue
        verdict = "**Holds.**" if bool(r.holds) else "**Does not hold.**"
        lines.append(f"- *Predicted:* {claim}. *Observed:* {_observed(r)}. {verdict}")
    d = checks.set_index("check").loc["deepest-removal damage against k"]
    if d.observed == "untested":
        lines.append(f"- With all active experts but one removed: no trend can be fitted ({d.reason}).")
    else:
        lines.append(f"- No prediction, because the deepest removal takes out more experts at larger k: {_observed(d)}.")
    tested = checks[checks.holds.notna()]
    held_q = list(tested[tested.holds.astype(bool)].quantity)
    failed_q = list(tested[~tested.holds.astype(bool)].quantity)
    ranking_q = {"control_mean_dz", "audit_valid_cells"}
    if tested.empty:
        lines.append("\nNo prediction could be tested on this run.")
    elif not failed_q:
        lines.append("\nEvery tested prediction holds on this family.")
    elif not held_q:
        lines.append("\nNo tested prediction holds on this family.")
    elif "single_mean_abs_dl" in held_q and ranking_q <= set(failed_q):
        lines.append("\nOn this family, redundancy changes how much a single expert's removal costs, but not "
                     "whether a ranking, observational or the control, can tell which of the active experts costs "
                     "more.")
    else:
        lines.append(f"\nThe explanation holds where {'; '.join(_CLAIMS[q] for q in held_q)}, and not where "
                     f"{'; '.join(_CLAIMS[q] for q in failed_q)}.")
    out["explanation"] = "\n".join(lines)
    return out


#: what the redundancy explanation predicts for each quantity as top-k grows
_CLAIMS = {
    "single_mean_abs_dl": "a single-expert ablation costs less as top-k grows",
    "control_mean_dz": "the routing-weight control's signal weakens as top-k grows",
    "audit_valid_cells": "the observational metrics have fewer valid cells as top-k grows",
}

_OBSERVED_NAMES = {
    "single_mean_abs_dl": ("the mean |ΔL| of a single-expert ablation", "nats"),
    "control_mean_dz": ("the control's mean d_z", "d_z units"),
    "audit_valid_cells": ("the number of valid observational cells", "cells"),
    "deepest_mean_dl": ("the mean ΔL with all active experts but one removed", "nats"),
}


def _observed(r) -> str:
    name, unit = _OBSERVED_NAMES[r.quantity]
    trend = {"falls": "falls as top-k grows", "grows": "grows as top-k grows", "flat": "shows no trend with top-k"}
    if r.slope == 0 and r.p == 1.0:
        return f"{name} is the same in every model" + (f" ({r.value:g})" if np.isfinite(getattr(r, "value", np.nan)) else "")
    return f"{name} {trend[r.observed]} (slope {r.slope:+.3g} {unit} per doubling, p = {r.p:.2g})"


