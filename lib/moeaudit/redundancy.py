"""Does redundancy explain the null? The analysis of the controlled redundancy family.

The paper reads its null result through redundancy (Section 4, Discussion): removing seven of
eight active experts at OLMoE's layers 0-9 leaves the mean loss almost unchanged, so any selection
rule looks harmless there and "the metric and the random baseline are doing the same thing"; it
leaves open whether observational metrics regain validity in low-redundancy architectures. The
redundancy family (:data:`moeaudit.zoo.REDUNDANCY_MODELS`) varies the routing (E routed experts,
top-k) with the training recipe fixed and two training seeds per setting; the active parameters
per token still grow with k. This module turns the
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
    "audit_max_abs_dz": "largest |Cohen's d_z| over the model's observational cells (metrics × layers)",
    "audit_valid_cells": "observational cells valid under the dual-test rule (Bonferroni, d_z > 0)",
    "control_mean_dz": "mean Cohen's d_z of the routing-weight control over the audited layers",
    "control_valid_cells": "control cells valid under the dual-test rule (Bonferroni, d_z > 0)",
    "single_mean_abs_dl": "mean size |ΔL| of the loss change of a single-expert ablation (nats), over positions, "
                          "layers and experts",
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
    (the paper's 41x from OLMoE's layer 0 to layer 15, Section 3)."""
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

    For each quantity (a column of :func:`model_summary`; default: every quantity of
    :data:`QUANTITIES` but the two counts of valid cells), a one-way ANOVA of the per-model values with the setting as the factor
    and the seeds as replicates (``scipy.stats.f_oneway``): ``F``, ``p``, ``df_between``,
    ``df_within``; ``sd_between`` (standard deviation of the setting means, ddof=1),
    ``sd_seed`` (pooled within-setting standard deviation, ``sqrt(SS_within / df_within)``) and
    their ratio; ``eta_sq`` (``SS_between / SS_total``); ``p_holm``, the p-values Holm-adjusted
    over the quantities (:func:`holm`). ``F``, ``p``, ``ratio`` and ``eta_sq`` are NaN where no
    setting has two models (no within-setting spread to compare with); ``F`` and ``p`` also where
    the seeds agree exactly.

    The within-setting spread is that of the per-model *estimates*: it holds the training seed's
    effect and the sampling error of each model's value (the positions are one shared draw, so the
    comparison is conditional on it)."""
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
                     "sd_seed": sd_seed,
                     "ratio": (sd_between / sd_seed if sd_seed > 0 else float("inf")) if df_within > 0 else float("nan"),
                     "eta_sq": (ss_total - ss_within) / ss_total if ss_total > 0 and df_within > 0 else float("nan")})
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out.p)
    return out


def holm(p) -> np.ndarray:
    """Holm-adjusted p-values over the finite entries of ``p`` (``statsmodels.stats.multitest.
    multipletests(method="holm")``); NaN entries stay NaN and do not count in the family."""
    from statsmodels.stats.multitest import multipletests  # noqa: PLC0415

    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def trend_against_k(summary: pd.DataFrame, *, quantity: str, n_experts: int | None = None) -> dict:
    """Does ``quantity`` change with top-k among models with the same number of experts?

    Ordinary least squares of the per-model values on ``log2(top_k)`` (``scipy.stats.linregress``;
    seeds enter as separate points) over the models with ``n_experts`` routed experts (default:
    the most common E). Returns ``slope`` (change per doubling of k), its ``ci_low``/``ci_high``
    (95%, Student t with n - 2 degrees of freedom: ``slope ± t_{0.975, n-2} · stderr``), ``p``
    (two-sided, slope = 0), ``n`` (models), ``ks`` (the k values) and ``spearman_rho`` with its
    ``spearman_p`` (``scipy.stats.spearmanr``), and ``value`` (NaN). When every model has the same
    value there is nothing to fit: the statistics are NaN and ``value`` is that value.
    ``ValueError`` with fewer than two distinct k or fewer than three models."""
    from scipy import stats as sps  # noqa: PLC0415

    E = int(summary.n_experts.mode().iloc[0]) if n_experts is None else int(n_experts)
    s = summary[summary.n_experts == E]
    if s.top_k.nunique() < 2 or len(s) < 3:
        raise ValueError(f"a trend against k needs at least two values of k and three models with E={E}; "
                         f"got k in {sorted(int(k) for k in s.top_k.unique())} over {len(s)} model(s)")
    x, y = np.log2(s.top_k.to_numpy(dtype=np.float64)), s[quantity].to_numpy(dtype=np.float64)
    base = {"quantity": quantity, "n_experts": E, "n": int(len(x)), "ks": sorted(int(k) for k in s.top_k.unique())}
    if np.ptp(y) == 0:  # every model has the same value (e.g. no valid cell anywhere): nothing to fit
        return {**base, "slope": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"),
                "spearman_rho": float("nan"), "spearman_p": float("nan"), "value": float(y[0])}
    fit = sps.linregress(x, y)
    half = float(sps.t.ppf(0.975, len(x) - 2) * fit.stderr)
    rho = sps.spearmanr(x, y)
    return {**base, "slope": float(fit.slope), "ci_low": float(fit.slope - half), "ci_high": float(fit.slope + half),
            "p": float(fit.pvalue), "spearman_rho": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "value": float("nan")}


def _direction(slope: float, p: float, *, alpha: float) -> str:
    """``"falls"``/``"grows"`` as k grows when the (adjusted) test rejects at ``alpha``, else
    ``"not detected"``."""
    if not p < alpha:
        return "not detected"
    return "grows" if slope > 0 else "falls"


def explanation_checks(summary: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """The redundancy explanation's predictions, each tested on the family.

    If redundancy hides single experts' effects, then with fewer active experts (smaller k):
    (a) a single-expert ablation changes the loss by more (``single_mean_abs_dl`` falls as k
    grows); (b) the routing-weight control, which the paper finds valid, gets a stronger signal
    (``control_mean_dz`` falls as k grows); (c) the observational metrics, whose failure it is
    meant to explain, become valid (``audit_valid_cells`` falls as k grows, i.e. more valid
    cells at small k). (d) The loss change with all active experts but one removed is reported
    with its trend but no prediction: at small k that removal also takes out fewer experts.
    (b) is the weakest test: d_z is scale-free, so a loss change that shrinks by the same factor
    for every expert leaves it unchanged, and the control compares the extremes of k experts, a
    contrast that widens as k grows.

    One row per check: ``check``, ``quantity``, ``predicted`` (direction as k grows), the
    :func:`trend_against_k` fields, ``p_holm`` (Holm-adjusted over the fitted rows, :func:`holm`),
    ``observed`` (``"falls"``, ``"grows"`` or ``"not detected"`` at ``alpha`` after adjustment)
    and ``holds``: True when the observed direction is the predicted one, False when it is the
    opposite one, ``<NA>`` when no trend is detected (inconclusive, not a refutation) or without a
    prediction. Where no trend can be fitted (fewer than three models or two values of k at one
    E, or every model with the same value) ``observed`` is ``"untested"``, the statistics are NaN
    and ``reason`` says why."""
    checks = [("single-expert effect shrinks with k", "single_mean_abs_dl", "falls"),
              ("control signal shrinks with k", "control_mean_dz", "falls"),
              ("observational validity shrinks with k", "audit_valid_cells", "falls"),
              ("deepest-removal damage against k", "deepest_mean_dl", None)]
    rows = []
    for check, q, predicted in checks:
        row = {"check": check, "predicted": predicted or "—", "quantity": q, "slope": np.nan, "ci_low": np.nan,
               "ci_high": np.nan, "p": np.nan, "value": np.nan, "observed": "untested", "reason": ""}
        try:
            tr = trend_against_k(summary, quantity=q)
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
    out.loc[fitted, "observed"] = [_direction(r.slope, r.p_holm, alpha=alpha) for r in out[fitted].itertuples()]
    holds = []
    for r in out.itertuples():
        if r.predicted == "—" or r.observed in ("untested", "not detected"):
            holds.append(pd.NA)
        else:
            holds.append(r.observed == r.predicted)
    out["holds"] = pd.array(holds, dtype="boolean")
    return out


def _k_span(trend: dict) -> str:
    return f"top-{trend['ks'][0]} to top-{trend['ks'][-1]} of {trend['n_experts']} experts"


def answer_text(summary: pd.DataFrame, validity: pd.DataFrame, anova: pd.DataFrame, checks: pd.DataFrame, *,
                alpha: float, mde_audit: float | None = None, mde_control: float | None = None,
                power: float = 0.8) -> dict[str, str]:
    """The chapter's four answers as Markdown, computed from :func:`model_summary`,
    :func:`validity_by_model`, :func:`setting_anova` and :func:`explanation_checks` results:
    keys ``validity``, ``control``, ``seeds``, ``explanation``. ``mde_audit`` and ``mde_control``
    are the smallest d_z a cell detects with probability ``power`` at its Bonferroni level
    (:func:`moeaudit.stats.min_detectable_dz`), stated beside a null result."""
    out = {}
    valid = validity[validity.valid_cells > 0]
    n_models = summary.model.nunique()
    mde = (f" A cell detects an effect of d_z = {mde_audit:.3f} with {power:.0%} power (t-test at the model's Bonferroni "
           "level), so smaller effects would mostly be missed." if mde_audit is not None else "")
    if valid.empty:
        out["validity"] = (f"**No valid cell is detected.** None of the {validity.ranking.nunique()} observational metrics "
                           f"has a valid cell in any of the {n_models} models (dual test at each model's Bonferroni "
                           f"level with d_z > 0), in any of the {summary.setting.nunique()} settings (k/E from "
                           f"{summary.k_over_E.min():.3f} to {summary.k_over_E.max():.3f}); the largest |d_z| of any "
                           f"observational cell is {summary.audit_max_abs_dz.max():.3f}." + mde)
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
                              "setting rather than of one trained model.") + mde)
    c = checks.set_index("check").loc["control signal shrinks with k"]
    positive = int((summary.control_mean_dz > 0).sum())
    level = (f"Its mean d_z per model ranges from {summary.control_mean_dz.min():+.3f} to "
             f"{summary.control_mean_dz.max():+.3f} (positive in {positive} of {n_models} models), and "
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
                          f"{c.p_holm:.2g}; n = {int(c.n)} models). Over the whole range of k the interval allows a "
                          f"change from {c.ci_low * span:+.3f} to {c.ci_high * span:+.3f}. {level}")
    lines = []
    family = int(anova.p.notna().sum())
    for r in anova.itertuples():
        what = QUANTITIES[r.quantity]
        if np.isnan(r.F):
            lines.append(f"- {what}: no spread between models of one setting to compare with (one model per setting, "
                         "or identical values).")
            continue
        verdict = "larger than" if r.p_holm < alpha else "not distinguishable from"
        lines.append(f"- {what}: the setting effect is {verdict} the spread between models of one setting "
                     f"(F({r.df_between}, {r.df_within}) = {r.F:.3g}, p = {r.p:.2g}, Holm-adjusted over {family} "
                     f"quantities: {r.p_holm:.2g}; SD of setting means {r.sd_between:.3g} against within-setting SD "
                     f"{r.sd_seed:.3g}).")
    out["seeds"] = "\n".join(lines)
    lines = []
    for r in checks.itertuples():
        if r.predicted == "—":
            continue
        claim = _CLAIMS[r.quantity]
        if r.observed == "untested":
            lines.append(f"- *Predicted:* {claim}. *Not testable here:* {r.reason}.")
            continue
        verdict = {True: "**Holds.**", False: "**Contradicted.**"}.get(None if pd.isna(r.holds) else bool(r.holds),
                                                                       "**Not detected** (inconclusive at this power).")
        lines.append(f"- *Predicted:* {claim}. *Observed:* {_observed(r)}. {verdict}")
    d = checks.set_index("check").loc["deepest-removal damage against k"]
    if d.observed == "untested":
        lines.append(f"- With all active experts but one removed: no trend can be fitted ({d.reason}).")
    else:
        lines.append(f"- No prediction, because the deepest removal takes out more experts at larger k: {_observed(d)}.")
    predicted = checks[checks.predicted != "—"]
    held = list(predicted[predicted.holds.fillna(False).astype(bool)].quantity)
    contradicted = list(predicted[predicted.holds.notna() & ~predicted.holds.fillna(True).astype(bool)].quantity)
    open_q = [q for q in predicted.quantity if q not in held and q not in contradicted]
    ranking_q = {"control_mean_dz", "audit_valid_cells"}
    if not held and not contradicted:
        lines.append("\nNo prediction could be decided on this run.")
    elif contradicted:
        lines.append(f"\nThe data contradict the explanation where it predicts that {_join_claims(contradicted)}"
                     + (f", and support it where {_join_claims(held)}" if held else "") + ".")
    elif "single_mean_abs_dl" in held and ranking_q <= set(open_q):
        lines.append("\nOn this family, fewer active experts make a single expert's removal change the loss by more, "
                     "as the explanation says. Whether they also let a ranking, observational or the control, tell "
                     "the active experts apart is not detected at this power: the explanation is supported for the "
                     "size of the effects and undecided for their ranking.")
    else:
        lines.append(f"\nThe explanation is supported where {_join_claims(held)}"
                     + (f"; undecided where {_join_claims(open_q)}" if open_q else "") + ".")
    out["explanation"] = "\n".join(lines)
    return out


def _join_claims(quantities) -> str:
    return "; ".join(_CLAIMS[q] for q in quantities)


#: what the redundancy explanation predicts for each quantity as top-k grows
_CLAIMS = {
    "single_mean_abs_dl": "a single-expert ablation changes the loss by less as top-k grows",
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
    if np.isfinite(getattr(r, "value", np.nan)):
        return f"{name} is {r.value:g} in every model"
    trend = {"falls": "falls as top-k grows", "grows": "grows as top-k grows",
             "not detected": "shows no detectable trend with top-k"}
    return (f"{name} {trend[r.observed]} (slope {r.slope:+.3f} {unit} per doubling, p = {r.p:.2g}, Holm-adjusted "
            f"{r.p_holm:.2g})")
