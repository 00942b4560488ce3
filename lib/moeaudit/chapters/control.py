"""Chapter 5 (the routing-weight control): the control's cells against the observational metrics
of the same layer and positions, the paper's Figure 1 comparison, and the chapter's sentence builders
(every number and verdict picked from the tables beside them)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..report import fmt_bound, fmt_signed, join_words, plural, zero_relation
from ..stats import binomial_excess, dz_difference_ci, min_detectable_dz, t_test_power, tost_min_p


def control_against_observational(control: pd.DataFrame, observational: pd.DataFrame) -> pd.DataFrame:
    """Each routing-weight control cell against the observational cells (chapter 5, the paper's Figure 1).

    ``control`` and ``observational``: :func:`moeaudit.stats.audit_table` results with ``model``,
    ``layer``, ``cohens_dz`` (control also ``dz_ci_low``/``dz_ci_high``; observational ``ranking``).
    One row per control cell with ``control_dz``, ``dz_ci_low``, ``dz_ci_high``; ``best_ranking`` and
    ``best_dz``: the observational cell of the same model and layer with the largest d_z; ``beaten``
    (``best_dz > control_dz``); ``band_low``/``band_high``: min and max d_z of *all* observational cells
    (the grey band); ``position`` ("above", "below" or "inside" the band), ``margin`` (distance beyond
    the nearest band edge, 0 inside) and ``ci_overlaps_band`` (the control's interval meets the band).

    Cells that could not be tested (NaN ``cohens_dz``, see :func:`moeaudit.stats.paired_effect`) take
    no part in the band or in ``best_*``; an untested control cell has ``position`` "untested",
    NaN ``margin`` and False ``beaten`` and ``ci_overlaps_band``. ``ValueError`` when
    ``observational`` has no tested cell.
    """
    tested = observational[observational.cohens_dz.notna()]
    if tested.empty:
        raise ValueError("observational has no tested cell (it is empty or every d_z is NaN)")
    lo, hi = float(tested.cohens_dz.min()), float(tested.cohens_dz.max())
    best = tested.loc[tested.groupby(["model", "layer"], sort=False).cohens_dz.idxmax(),
                      ["model", "layer", "ranking", "cohens_dz"]]
    best = best.rename(columns={"ranking": "best_ranking", "cohens_dz": "best_dz"})
    out = control[["model", "layer", "cohens_dz", "dz_ci_low", "dz_ci_high"]].rename(columns={"cohens_dz": "control_dz"})
    out = out.merge(best, on=["model", "layer"], how="left").reset_index(drop=True)
    out["beaten"] = out.best_dz > out.control_dz
    out["band_low"], out["band_high"] = lo, hi
    out["position"] = np.where(out.control_dz.isna(), "untested", np.where(
        out.control_dz > hi, "above", np.where(out.control_dz < lo, "below", "inside")))
    out["margin"] = np.clip(out.control_dz - hi, 0, None) + np.clip(lo - out.control_dz, 0, None)
    out["ci_overlaps_band"] = (out.dz_ci_low <= hi) & (out.dz_ci_high >= lo)
    return out


def same_layer_margins(cmp: pd.DataFrame, control_cells: pd.DataFrame, observational_cells: pd.DataFrame, *,
                       n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Whether each control cell's d_z exceeds that of the strongest observational cell of its own layer.

    ``cmp``: :func:`control_against_observational` (``model``, ``layer``, ``control_dz``,
    ``best_ranking``, ``best_dz``); ``control_cells`` and ``observational_cells``: the per-position
    rows of :func:`paired_cells` (``model``, ``ranking``, ``layer``, ``seq_id``, ``t``, ``diff`` in
    nats). The two rankings of a layer are compared on the positions both kept (inner join on
    ``seq_id``, ``t``), with the paired-bootstrap interval of ``d_z(control) - d_z(best)``
    (:func:`moeaudit.stats.dz_difference_ci`, level ``ci``). Returns ``cmp`` with ``n_shared``,
    ``diff_ci_low``, ``diff_ci_high`` and ``vs_best``: ``"exceeds"`` (interval above zero, see
    :func:`zero_relation`), ``"below"`` (below zero: the observational cell is the stronger),
    ``"not shown"`` (the interval contains or touches zero) or ``"untested"`` (a d_z or the interval
    is undefined). The strongest observational cell is chosen after seeing the data, which biases
    its d_z upward: an "exceeds" is conservative, a "not shown" is not evidence that the two are equal.
    """

    out = cmp.copy()
    n_sh, lo, hi = [], [], []
    for r in out.itertuples():
        if pd.isna(r.control_dz) or pd.isna(r.best_dz):
            n_sh.append(0), lo.append(np.nan), hi.append(np.nan)
            continue
        a = control_cells[(control_cells.model == r.model) & (control_cells.layer == r.layer)]
        b = observational_cells[(observational_cells.model == r.model) & (observational_cells.layer == r.layer)
                                & (observational_cells.ranking == r.best_ranking)]
        j = a[["seq_id", "t", "diff"]].merge(b[["seq_id", "t", "diff"]], on=["seq_id", "t"], suffixes=("_c", "_o"))
        low, high = dz_difference_ci(j.diff_c, j.diff_o, n_boot=n_boot, seed=seed, ci=ci)
        n_sh.append(len(j)), lo.append(low), hi.append(high)
    out["n_shared"], out["diff_ci_low"], out["diff_ci_high"] = n_sh, lo, hi
    rel = [zero_relation(a, b) for a, b in zip(out.diff_ci_low, out.diff_ci_high)]
    out["vs_best"] = ["exceeds" if x == "above" else "below" if x == "below" else "untested" if x == "undefined"
                      else "not shown" for x in rel]
    return out


def _cell_label(r) -> str:
    return f"{r.model} layer {r.layer}"


def control_beaten_text(cmp: pd.DataFrame) -> str:
    """How the control's d_z compares with the observational cells (a :func:`control_against_observational`
    result, optionally with :func:`same_layer_margins`), as a clause that continues a sentence.

    Counts the layers where some population-level statistic has the larger point estimate, with the
    largest such gap; with the margins, also where the control is *shown* to exceed the strongest
    observational cell of its layer (its interval of the difference above zero), where that cell is
    shown to exceed the control, and names the layers where the control's estimate is the larger one
    without being shown larger, so that the text never reads a larger point estimate as a stronger
    control. Layers whose control cell could not be tested are counted apart."""
    beaten = cmp[cmp.beaten]
    n = int(cmp.control_dz.notna().sum())
    untested = len(cmp) - n
    skipped = (f" ({plural(untested, 'layer')} could not be tested and {'is' if untested == 1 else 'are'} left out)"
               if untested else "")
    if beaten.empty:
        s = (f"on this run the control's d_z is at least as large as every observational d_z at all "
             f"{n} audited layers" + (" where it is defined" if untested else "") + skipped)
    else:
        r = beaten.loc[(beaten.best_dz - beaten.control_dz).idxmax()]
        s = (f"on this run, at {len(beaten)} of {n} audited layers{skipped} at least one population-level "
             f"statistic has a larger d_z than the control (the largest gap: {r.model} layer {r.layer}, control "
             f"{fmt_signed(r.control_dz)} against {str(r.best_ranking).replace('_', ' ')} {fmt_signed(r.best_dz)})")
    if "vs_best" not in cmp:
        return s
    m = cmp[cmp.vs_best != "untested"]
    if m.empty:
        return s
    ahead = m[m.control_dz > m.best_dz]
    up, down = ahead[ahead.vs_best == "exceeds"], m[m.vs_best == "below"]
    labels = lambda rows: join_words(_cell_label(r) for r in rows.itertuples())  # noqa: E731
    s += (f". Against the strongest observational cell of its own layer (same positions), the control's d_z is the "
          f"larger at {len(ahead)} of {len(m)} layers" + (f" ({labels(ahead)})" if len(ahead) else ""))
    if len(ahead):
        rest = len(ahead) - len(up)
        if up.empty:
            s += (". It is not shown larger there: the paired-bootstrap 95% interval of the difference of d_z "
                  "includes zero" if len(ahead) == 1 else
                  ". At none of them is it shown larger: every paired-bootstrap 95% interval of the difference of d_z "
                  "includes zero")
        else:
            s += (f". At {len(up)} of them it is shown larger (paired-bootstrap 95% interval of the difference of d_z "
                  f"above zero: {labels(up)})" + (f"; at the other {rest} the interval includes zero" if rest else ""))
    if len(down):
        s += (f". The strongest observational cell is shown larger than the control at {len(down)} "
              f"({labels(down)})")
    return s


def figure1_text(control: pd.DataFrame, observational: pd.DataFrame, *, alpha: float,
                 margins: pd.DataFrame | None = None) -> str:
    """The paragraph under Figure 1 of chapter 5: the grey band, the control cells outside it (by how
    much, whether their intervals still meet the band, and a cell below the band named as a
    reversal, never as a stronger control), the layers where the control is shown to exceed the
    strongest observational cell of its own layer (``margins``: :func:`same_layer_margins`, optional),
    and the counts of passing cells by direction, with the uncorrected count tested against chance
    (:func:`moeaudit.stats.binomial_excess`). ``control`` also needs ``sig_dual_bonf`` and ``p_t``.
    Cells that could not be tested (NaN d_z) are named as such and left out of the band and the
    comparisons."""

    cmp = control_against_observational(control, observational)
    n_obs = int(observational.cohens_dz.notna().sum())
    s = (f"The {n_obs} observational cells" + (f" that could be tested (of {len(observational)})"
                                               if n_obs < len(observational) else "")
         + f" span d_z from {fmt_signed(cmp.band_low.iloc[0])} to {fmt_signed(cmp.band_high.iloc[0])}. ")
    out = cmp[~cmp.position.isin(["inside", "untested"])]
    untested = cmp[cmp.position == "untested"]
    if len(untested):
        s += (f"{plural(len(untested), 'control cell')} could not be tested ("
              + join_words(f"{r.model} layer {r.layer}" for r in untested.itertuples()) + "). ")
    if out.empty and len(untested) < len(cmp):
        s += (f"Every control cell{' that could be tested' if len(untested) else ''} lies inside that range: "
              "per-token conditioning does not produce a larger effect than the population-level metrics did. ")
    for r in out.itertuples():
        ci = f"its 95% interval [{fmt_signed(r.dz_ci_low)}, {fmt_signed(r.dz_ci_high)}]"
        if r.position == "above":
            s += (f"{r.model} layer {r.layer} lies above the band (d_z = {fmt_signed(r.control_dz)}, {r.margin:.3f} "
                  f"beyond its edge); {ci} "
                  + ("overlaps the band, so it is not shown to be stronger than the strongest observational cell. "
                     if r.ci_overlaps_band else "does not overlap the band. "))
        else:
            s += (f"{r.model} layer {r.layer} lies below the band (d_z = {fmt_signed(r.control_dz)}, {r.margin:.3f} "
                  "beyond its edge): a reversal, where removing the router's top expert costs *less* than removing "
                  f"its bottom one, not a stronger control; {ci} "
                  + ("overlaps the band, so it is not shown to be more negative than every observational cell. "
                     if r.ci_overlaps_band else "does not overlap the band. "))
    if margins is not None and "vs_best" in margins:
        m = margins[margins.vs_best != "untested"]
        up = m[m.vs_best == "exceeds"]
        s += (f"Layer by layer, against the strongest observational cell of the same layer and positions, the control "
              f"is shown larger (paired-bootstrap 95% interval of the difference of d_z above zero) at "
              + (f"{len(up)} of {len(m)} layers ({join_words(_cell_label(r) for r in up.itertuples())}); "
                 f"it does not exceed the observational metrics at the other {len(m) - len(up)}. "
                 if len(up) else f"none of the {len(m)} layers: it does not exceed the observational metrics anywhere "
                                 "on this run. "))
    tested = control[control.cohens_dz.notna()]
    dual = tested[tested.sig_dual_bonf.astype(bool)]
    unc = tested[tested.p_t < alpha]
    n_rev = int((dual.cohens_dz < 0).sum())
    s += (f"Of the {len(control)} control cells, {len(dual)} pass{'es' if len(dual) == 1 else ''} the dual-test rule "
          f"under Bonferroni within their model"
          + (f" ({n_rev} of them {'a reversal' if n_rev == 1 else 'reversals'}, d_z < 0)" if n_rev else "")
          + f", and {len(unc)} reach{'es' if len(unc) == 1 else ''} uncorrected p_t < {alpha:g} "
          f"({int((unc.cohens_dz > 0).sum())} with d_z > 0, {plural(int((unc.cohens_dz < 0).sum()), 'reversal')})")
    if len(tested):
        s += (f"; chance alone would give about {alpha * len(tested):.2g} of {len(tested)}, and {len(unc)} or more "
              f"arise by chance with probability {binomial_excess(len(unc), len(tested), alpha):.2g} (one-sided "
              "binomial; the cells of a model share positions, so this is indicative)")
    return s + "."


def control_summary_text(t: pd.DataFrame, *, alpha: float) -> str:
    """One model's control cells (rows of the control table, one per layer) as a paragraph: d_z by
    layer, the largest positive one (the direction a working control predicts) and any reversal
    (d_z < 0: the top-weighted expert's removal costs less) named as such, and which layers pass
    Bonferroni on both tests, on one alone, with reversals marked. A layer that could not be tested
    (NaN d_z) reads "not tested" and passes nothing."""
    t = t.sort_values("layer")
    flags = t[["sig_dual_bonf", "sig_t_bonf", "sig_W_bonf"]].fillna(False).astype(bool)
    dual = t[flags.sig_dual_bonf]
    t_only, w_only = t[flags.sig_t_bonf & ~flags.sig_dual_bonf], t[flags.sig_W_bonf & ~flags.sig_t_bonf]
    seq = ", ".join(f"L{r.layer}: {fmt_signed(r.cohens_dz) if pd.notna(r.cohens_dz) else 'not tested'}"
                    for r in t.itertuples())
    s = f"**{t.model.iloc[0]}.** d_z by layer: {seq}. "
    cell = lambda r: (f"layer {int(r.layer)} (d_z = {fmt_signed(r.cohens_dz)}, 95% CI "  # noqa: E731
                      f"[{fmt_signed(r.dz_ci_low)}, {fmt_signed(r.dz_ci_high)}], p_t = {r.p_t:.3g}, p_W = {r.p_W:.3g})")
    pos, neg = t[t.cohens_dz > 0], t[t.cohens_dz < 0]
    if t.cohens_dz.notna().any():
        if len(pos):
            s += f"The largest positive d_z is at {cell(pos.loc[pos.cohens_dz.idxmax()])}. "
        else:
            s += "No layer has a positive d_z. "
        if len(neg) and neg.cohens_dz.abs().max() > (pos.cohens_dz.max() if len(pos) else 0):
            s += (f"The largest in magnitude is a reversal, at {cell(neg.loc[neg.cohens_dz.idxmin()])}: there removing "
                  "the router's top expert costs *less* than removing its bottom one. ")
    else:
        s += "No layer could be tested. "
    mark = lambda rows: join_words(f"L{r.layer}" + (" [a reversal]" if r.cohens_dz < 0 else "")  # noqa: E731
                                   for r in rows.itertuples())
    if len(dual):
        s += (f"{len(dual)} of {len(t)} layers pass{'es' if len(dual) == 1 else ''} Bonferroni under the dual-test rule "
              f"({mark(dual)}). ")
    else:
        s += f"No layer passes Bonferroni under the dual-test rule (α_adj = {alpha / len(t):.3g}). "
    for sub, what, why in ((t_only, "on the t-test alone but not on Wilcoxon", "a disagreement the paper's audit rule "
                            "counts as noise"), (w_only, "on the Wilcoxon test alone but not on the t-test",
                                                 "which the rule also sets aside")):
        if len(sub):
            s += (f"{'One layer passes' if len(sub) == 1 else f'{len(sub)} layers pass'} {what} "
                  f"({mark(sub)}): {why}. ")
    return s


def control_verdict_text(control: pd.DataFrame, *, alpha: float) -> str:
    """The control's verdict under the paper's dual-test rule at each model's own Bonferroni level
    (the control family: one model's control cells), as one paragraph: the passing cells named with
    their d_z, a passing cell with d_z < 0 named as a reversal (the rule counts it, but it is not
    evidence that the router's weight predicts importance), and the count per model. ``control``: an
    :func:`moeaudit.stats.audit_table` of the control cells with ``family=("model",)``."""
    t = control.assign(_dual=control.sig_dual_bonf.fillna(False).astype(bool))
    dual = t[t._dual]
    pos, rev = dual[dual.cohens_dz > 0], dual[dual.cohens_dz < 0]
    per_model = "; ".join(f"{m} {int(g._dual.sum())} of {len(g)} (α = {alpha:g}/{len(g)} = {alpha / len(g):.3g})"
                          for m, g in t.groupby("model", sort=False))
    if dual.empty:
        head = ("**No control cell passes** the paper's rule (t and Wilcoxon tests both significant after Bonferroni, "
                "same sign): the router's own weight is not shown to predict which active expert matters more at a token")
    else:
        head = (f"**{plural(len(pos), 'control cell')} pass{'es' if len(pos) == 1 else ''}** the paper's rule with "
                "d_z > 0 (t and Wilcoxon tests both significant after Bonferroni, same sign)"
                + (": " + join_words(f"{r.model} layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)})"
                                     for r in pos.itertuples()) if len(pos) else "")
                + (f"; {plural(len(rev), 'cell')} pass{'es' if len(rev) == 1 else ''} it as "
                   f"{'a reversal' if len(rev) == 1 else 'reversals'} (d_z < 0: the top expert's removal costs less), "
                   + join_words(f"{r.model} layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)})" for r in rev.itertuples())
                   if len(rev) else ""))
    return f"{head}. Per model: {per_model}." + _control_nulls_text(t)


def _control_nulls_text(t: pd.DataFrame) -> str:
    """What the control's own non-passing cells can say (``t``: the control table with ``n``,
    ``alpha_corrected``, ``tost_bound_d``, ``equivalent``, ``mde_dz``, ``power``): whether TOST at the
    bound can pass at the control's level for any data (:func:`moeaudit.stats.tost_min_p`), how many
    cells it shows within ±bound, and the smallest |d_z| the t-test detects there. ``""`` when the
    table lacks those columns or no cell was tested."""

    need = {"n", "alpha_corrected", "tost_bound_d", "equivalent", "mde_dz", "power"}
    tested = t[t.cohens_dz.notna()] if need <= set(t.columns) else t.iloc[:0]
    if tested.empty:
        return ""
    bound = float(tested.tost_bound_d.iloc[0])
    can = np.array([tost_min_p(int(r.n), bound_d=bound) < r.alpha_corrected for r in tested.itertuples()])
    eq = tested[tested.equivalent.fillna(False).astype(bool)]
    levels = sorted({f"{a:.3g}" for a in tested.alpha_corrected})
    at = f"the control's level {levels[0]}" if len(levels) == 1 else f"each model's control level ({', '.join(levels)})"
    mde = tested.mde_dz
    detect = (f"the t-test there detects |d_z| ≥ {mde.min():.3f}" if mde.max() - mde.min() < 5e-4 else
              f"the t-test there detects |d_z| from {mde.min():.3f} to {mde.max():.3f} or more") \
        + f" with {float(tested.power.iloc[0]):.0%} power"
    if not can.any():
        return (f" A control cell that does not pass is not shown to be small: TOST at |d_z| < {bound:g} cannot pass at "
                f"{at} for any data, and {detect}.")
    return (f" A control cell that does not pass is not thereby shown to be small: TOST at |d_z| < {bound:g} can pass at "
            f"{at}" + ("" if can.all() else f" in {int(can.sum())} of the {len(tested)} cells") + f", and it shows "
            + (f"{len(eq)} of the {len(tested)} tested control cells within ±{bound:g} ("
               + join_words(f"{r.model} layer {r.layer}" for r in eq.itertuples()) + ")" if len(eq) else
               f"none of the {len(tested)} tested control cells within ±{bound:g}")
            + f"; {detect}.")


def control_reading_text(control: pd.DataFrame, observational: pd.DataFrame | None = None, *,
                         power: float = 0.8, rho_ci: float = 0.95) -> str:
    """Whether this run's control separates the two readings of the audit's null, model by model
    (chapter 5), and which Spearman intervals (``rho``, ``rho_ci_low``, ``rho_ci_high``) exclude zero.

    ``control``: the control table (:func:`moeaudit.stats.audit_table`, family = one model's control
    cells, with ``n``, ``p_t``, ``p_W``, ``same_sign``, ``alpha_corrected``, ``sig_dual_bonf``).
    ``observational``: the audit's table of the same models (its ``alpha_corrected`` is the audit's
    per-cell Bonferroni level, e.g. 0.05/20). Each model's null is read against that model's own
    control, at the audit's level: a control cell counts only with d_z > 0 and both tests below the
    audit's level, and the power of the audit's t-test against the control's observed d_z
    (:func:`moeaudit.stats.t_test_power`) is stated with it. A model whose control passes nowhere
    (at its own level) leaves its null uninterpretable; one whose control passes only at the
    control's looser level does not show that the audit can detect an effect of that size; there the
    test that fails at the audit's level is named per layer. A model's null is read only to the extent
    of the audit's power (never as equivalence): with a ``tost_bound_d`` column (of ``observational``,
    else ``control``) it also says whether TOST at that bound could pass at the audit's level at all
    (:func:`moeaudit.stats.tost_min_p`). A Spearman interval is said to exclude zero only when it does at the displayed precision
    (:func:`zero_relation`); one whose bound rounds to zero is said to touch zero. The count of
    intervals that exclude zero is tested against the number that chance gives at their level
    ``rho_ci`` (:func:`moeaudit.stats.binomial_excess`). Without ``observational`` the audit level is
    the control's own.
    """

    def failing(r, level) -> str:  # which test keeps a control cell from passing at ``level``
        t_ok, w_ok = r.p_t < level, r.p_W < level
        if t_ok and w_ok:
            return f"at layer {r.layer} both tests pass but point in opposite directions"
        if t_ok:
            return (f"at layer {r.layer} the t-test passes (p_t = {r.p_t:.2g}) but the Wilcoxon test does not "
                    f"(p_W = {r.p_W:.2g}, not below {level:.3g})")
        if w_ok:
            return (f"at layer {r.layer} the Wilcoxon test passes (p_W = {r.p_W:.2g}) but the t-test does not "
                    f"(p_t = {r.p_t:.2g}, not below {level:.3g})")
        return f"at layer {r.layer} neither test does (p_t = {r.p_t:.2g}, p_W = {r.p_W:.2g})"

    paras = []
    for model, t in control.groupby("model", sort=False):
        t = t.sort_values("layer")
        own = float(t.alpha_corrected.iloc[0])
        if observational is not None and (observational.model == model).any():
            level = float(observational[observational.model == model].alpha_corrected.iloc[0])
            fam = int(observational[observational.model == model].family_size.iloc[0]) \
                if "family_size" in observational else None
        else:
            level, fam = own, None
        lvl = f"the audit's per-cell level {level:.3g}" + (f" (Bonferroni over its {fam} cells of this model)" if fam else "")
        ok_own = t[t.sig_dual_bonf.fillna(False).astype(bool) & (t.cohens_dz > 0)]
        same = t.same_sign.fillna(False).astype(bool) if "same_sign" in t else pd.Series(True, index=t.index)
        ok_audit = t[(t.p_t < level) & (t.p_W < level) & same & (t.cohens_dz > 0)]
        n = int(t.n.max())
        mde = min_detectable_dz(n, alpha=level, power=power)
        pw = lambda r: t_test_power(float(r.cohens_dz), int(r.n), alpha=level)  # noqa: E731
        cells = lambda rows: join_words(  # noqa: E731
            f"layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)}, p_t = {r.p_t:.2g}, p_W = {r.p_W:.2g}; power of the "
            f"audit's t-test at that d_z: {pw(r):.0%})" for r in rows.itertuples())
        head = f"**{model}.** "
        src = observational[observational.model == model] if observational is not None and \
            (observational.model == model).any() else t
        bound = float(src.tost_bound_d.iloc[0]) if "tost_bound_d" in src.columns else None
        if bound is None:
            small = ""
        elif tost_min_p(n, bound_d=bound) < level:
            small = f"; only a passing TOST at |d_z| < {bound:g} shows an effect to be small"
        else:
            small = (f", and it cannot show any effect to be small (TOST at |d_z| < {bound:g} cannot pass at that "
                     f"level for any data: its smallest attainable p at n = {n} is {tost_min_p(n, bound_d=bound):.3g})")
        if ok_own.empty:
            paras.append(head + f"No control cell passes the dual rule with d_z > 0 even at the control's own level "
                         f"({own:.3g}): the control fails on this model, so by this page's logic the audit's null for "
                         f"{model} cannot be read either way — it does not separate \"the metrics carry no information\" "
                         "from \"the audit is too weak to see it\".")
        elif ok_audit.empty:
            paras.append(head + f"The control passes at its own level ({own:.3g}) at {cells(ok_own)}. At {lvl}, at "
                         "which the observational cells were tested, it passes at no layer: "
                         + "; ".join(failing(r, level) for r in ok_own.itertuples()) + ". "
                         "The audit's t-test would detect an observational effect of the control's size with the power "
                         "given (its dual rule, which also needs the Wilcoxon test, less often), but the control does not "
                         f"show that the audit detects effects of its size. The null for {model} would miss an effect of "
                         f"|d_z| ≥ {mde:.3f} with probability at most {1 - power:.0%} ({power:.0%} power at n = {n} and "
                         f"that level){small}.")
        else:
            strong = ok_audit[[pw(r) >= power for r in ok_audit.itertuples()]]
            paras.append(head + f"The control passes even at {lvl} at {cells(ok_audit)}. "
                         + (f"There the audit's null is evidence against observational effects as large as the "
                            f"control's ({join_words(f'layer {r.layer}' for r in strong.itertuples())}, power ≥ "
                            f"{power:.0%}), to the extent of that power; " if len(strong) else
                            f"Its power against the control's d_z is below {power:.0%}, so the audit's null there is "
                            "weak evidence even against effects of that size; ")
                         + f"against smaller effects it is weaker still, and against effects near zero it is no evidence "
                         f"at all (minimum detectable |d_z| {mde:.3f} at {power:.0%} power). The null is not "
                         f"equivalence{small}.")
    tested = control[control.rho_ci_low.notna() & control.rho_ci_high.notna()]
    rel = pd.Series([zero_relation(a, b) for a, b in zip(tested.rho_ci_low, tested.rho_ci_high)], index=tested.index,
                    dtype=object)
    ex, touch = tested[rel.isin(["above", "below"])], tested[rel == "touches"]
    fmt_rho = lambda r: (f"{r.model} layer {r.layer} (ρ = {fmt_signed(r.rho)}, "  # noqa: E731
                         f"[{fmt_bound(r.rho_ci_low)}, {fmt_bound(r.rho_ci_high)}])")
    if ex.empty:
        s = f"No Spearman interval of the {len(control)} cells excludes zero"
    else:
        s = (f"The Spearman interval excludes zero at {plural(len(ex), 'cell')} of {len(control)}: "
             + "; ".join(fmt_rho(r) for r in ex.itertuples()))
    if len(touch):
        s += (f"; {'the interval' if len(touch) == 1 else 'the intervals'} of "
              + "; ".join(fmt_rho(r) for r in touch.itertuples())
              + f" touch{'es' if len(touch) == 1 else ''} zero (a bound that rounds to zero at three decimals, well "
                "within the bootstrap's own resampling error), so it is not counted as excluding zero")
    if len(tested):
        s += (f". With {len(tested)} uncorrected {rho_ci:.0%} intervals, about {(1 - rho_ci) * len(tested):.2g} would "
              f"exclude zero by chance alone; {len(ex)} or more do so with probability "
              f"{binomial_excess(len(ex), len(tested), 1 - rho_ci):.2g} (one-sided binomial; indicative, since a "
              "model's cells share positions)")
    paras.append(s + ".")
    return "\n\n".join(paras)
