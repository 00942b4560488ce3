"""Chapter 8 (re-analysing the authors' released results): the comparison of recomputed values with
the printed tables, the 75 re-analysed cells (60 metric, 15 control), the summaries its prose quotes
and its sentence builders. All effect sizes are Cohen's d_z of D = delta_high - delta_low (nats).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..paper import LAYERS, MODELS, PAPER_METRIC_LABELS, agrees_at_printed_precision, paper_printed_values
from ..released import REDISTRIBUTION_PAIRS, control_comparisons, metric_comparisons, stored_statistics
from ..stats import (
    audit_table,
    cohens_dz,
    correct_family,
    min_detectable_dz,
    required_n,
    spearman,
    spearman_defined,
    summary_effect,
)

#: display order of the models and of the rankings (four metrics, then the routing-weight control)
MODEL_ORDER: tuple[str, ...] = ("olmoe", "qwen", "deepseek")


RANKING_LABELS: dict[str, str] = {**PAPER_METRIC_LABELS, "routing_weight": "Routing weight (control)"}


#: key columns of one re-analysed cell
CELL_KEYS: tuple[str, ...] = ("model", "experiment", "layer", "metric")


def with_paper_labels(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` for display: ``model`` and ``metric`` keys replaced by the paper's names
    (:data:`MODELS`, :data:`RANKING_LABELS`) and rows sorted by model (:data:`MODEL_ORDER`), ranking
    and layer (stable). Columns other than these are untouched; the index is reset."""
    out = df.copy()
    order = []
    if "model" in out:
        out["_m"] = out["model"].map({m: i for i, m in enumerate(MODEL_ORDER)})
        out["model"] = out["model"].map(MODELS)
        order.append("_m")
    if "metric" in out:
        out["_r"] = out["metric"].map({m: i for i, m in enumerate(RANKING_LABELS)})
        out["metric"] = out["metric"].map(RANKING_LABELS)
        order.append("_r")
    if "layer" in out:
        order.append("layer")
    if order:
        out = out.sort_values(order, kind="stable")
    return out.drop(columns=[c for c in ("_m", "_r") if c in out]).reset_index(drop=True)


def compare_printed(recomputed: pd.DataFrame, *, tables, on, printed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The numbers printed in ``tables`` (:func:`paper_printed_values`, or ``printed``) beside recomputed ones.

    ``recomputed``: long form with the ``on`` key columns, ``quantity`` and ``recomputed``. One row per
    printed number (a left join, ``validate="one_to_one"``; ``ValueError`` if a key repeats), with the
    columns of :func:`paper_printed_values`, ``recomputed`` and ``agrees``
    (:func:`agrees_at_printed_precision`; False where nothing was recomputed).
    """
    printed = paper_printed_values() if printed is None else printed
    out = printed[printed.table.isin(list(tables))].merge(
        recomputed, on=[*on, "quantity"], how="left", validate="one_to_one")
    out["agrees"] = agrees_at_printed_precision(out["recomputed"], out["value"], out["decimals"])
    return out.reset_index(drop=True)


def printed_side_by_side(long: pd.DataFrame, *, index, quantities) -> pd.DataFrame:
    """:func:`compare_printed` output in wide form: one row per ``index`` key, columns
    ``"<q> paper"`` (the printed value) and ``"<q> released"`` (the recomputed one) for each of
    ``quantities``, and ``agrees`` (every quantity of the row agrees at printed precision).
    Rows and labels as :func:`with_paper_labels`."""
    index = list(index)
    pr = long.pivot(index=index, columns="quantity", values="value")
    rc = long.pivot(index=index, columns="quantity", values="recomputed")
    out = pd.DataFrame(index=pr.index)
    for q in quantities:
        out[f"{q} paper"] = pr[q]
        out[f"{q} released"] = rc[q]
    out["agrees"] = long.groupby(index)["agrees"].all()
    return with_paper_labels(out.reset_index())


def cell_effect_sizes(records: pd.DataFrame, *, ddof: int = 0) -> pd.DataFrame:
    """Cohen's d_z of each (model, layer, metric) cell of :func:`metric_comparisons` records, with the
    standard deviation of D = ``delta_high - delta_low`` taken with ``ddof`` (0: as the released
    per-token scripts compute it; 1: the sample standard deviation). Columns ``model``, ``layer``,
    ``metric``, ``d``; cells in order of first appearance."""

    return (records.assign(D=records.delta_high - records.delta_low)
            .groupby(["model", "layer", "metric"], sort=False)["D"]
            .apply(lambda D: cohens_dz(D, ddof=ddof)).rename("d").reset_index())


def summary_cells(rows: pd.DataFrame, *, n_tests: int, source: str, alpha: float = 0.05,
                  tost_bound_d: float = 0.2, power: float = 0.8) -> pd.DataFrame:
    """Re-analysed cells from stored summaries (``t``, ``n``, ``p_W`` per row, plus :data:`CELL_KEYS`):
    :func:`moeaudit.stats.summary_effect` for each row, with the Wilcoxon direction assumed to agree
    with the t test (``same_sign=True``: the files store no sign, and the assumption can only add
    passes under the agreement rule). ``n_tests`` is the Bonferroni family size; ``source`` is stored
    in a ``source`` column. One row per input row."""

    out = [summary_effect(r["t"], int(r["n"]), p_W=r["p_W"], same_sign=True, alpha=alpha, n_tests=n_tests,
                          tost_bound_d=tost_bound_d, power=power).assign(**{k: r[k] for k in CELL_KEYS})
           for _, r in rows.iterrows()]
    return pd.concat(out, ignore_index=True).assign(source=source)


def printed_control_rows(table: int = 4, *, model: str = "olmoe", n: int = 200,
                         printed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The printed routing-weight control of ``model`` (Table 4 for OLMoE, whose records were not
    released) as summary rows for :func:`summary_cells`: one row per layer with :data:`CELL_KEYS`,
    ``n``, the printed ``d``, ``p_t``, ``p_W``, ``rho`` and ``t = d * sqrt(n)`` (the printed d is the
    ddof-1 d_z of the control scripts, so ``t`` carries its rounding)."""
    printed = paper_printed_values() if printed is None else printed
    out = (printed[(printed.table == table) & (printed.model == model)]
           .pivot(index="layer", columns="quantity", values="value").reset_index()
           .assign(model=model, experiment="control", metric="routing_weight", n=int(n)))
    out["t"] = out["d"] * np.sqrt(out["n"])
    return out


def reanalysis_cells(*, alpha: float = 0.05, tost_bound_d: float = 0.2, power: float = 0.8,
                     data_dir=None) -> pd.DataFrame:
    """Every cell of the paper's audit (60 metric cells) and control (15 cells), re-analysed.

    Sources: the per-position records (OLMoE and DeepSeek metric cells, DeepSeek control:
    :func:`moeaudit.stats.audit_table`, ddof 1), Qwen's stored summaries and the OLMoE control's
    printed values (:func:`summary_cells`, :func:`printed_control_rows`; for the latter ``p_t`` is the
    printed one). Families are one model's metric cells or its control cells (the paper's
    Section 2), with size ``family_size`` and Bonferroni level ``alpha_corrected = alpha / family_size``;
    :func:`moeaudit.stats.correct_family` adds the Bonferroni, Holm and Benjamini-Hochberg columns.
    Columns: :data:`CELL_KEYS`, ``source``, ``n``, ``cohens_dz``, ``dz_ci_low``, ``dz_ci_high``
    (exact 95% CI), ``p_t``, ``p_W``, ``same_sign``, ``p_tost`` (TOST against ``tost_bound_d``),
    ``mde_dz`` (at ``power`` and the family's level), the correction columns, ``family_size``,
    ``alpha_corrected``. Rows: model, experiment, layer, metric as :func:`with_paper_labels` orders them.
    """

    kw = dict(alpha=alpha, tost_bound_d=tost_bound_d, power=power)
    records, control = metric_comparisons(data_dir=data_dir), control_comparisons(data_dir=data_dir)
    stored = stored_statistics(data_dir=data_dir)
    metric = audit_table(records, by=["model", "layer", "metric"], family=["model"], **kw).assign(experiment="metric")
    ctrl = audit_table(control, by=["model", "layer"], family=["model"], **kw).assign(
        experiment="control", metric="routing_weight")
    n_metric = len(PAPER_METRIC_LABELS) * len(LAYERS["olmoe"])
    n_control = len(LAYERS["olmoe"])
    qwen = stored[stored.model == "qwen"]
    olmoe_rows = printed_control_rows(4, model="olmoe")
    olmoe = summary_cells(olmoe_rows, n_tests=n_control, source="printed in paper", **kw)
    olmoe["p_t"] = olmoe_rows["p_t"].to_numpy()  # the printed p_t, not one from the rounded d
    cols = [*CELL_KEYS, "source", "n", "cohens_dz", "dz_ci_low", "dz_ci_high", "p_t", "p_W", "same_sign",
            "p_tost", "mde_dz"]
    cells = pd.concat([
        metric.assign(source="per-position records"), ctrl.assign(source="per-position records"),
        summary_cells(qwen[qwen.experiment == "metric"], n_tests=n_metric, source="stored summary", **kw),
        summary_cells(qwen[qwen.experiment == "control"], n_tests=n_control, source="stored summary", **kw),
        olmoe], ignore_index=True)[cols]
    cells["family_size"] = cells.groupby(["model", "experiment"])["layer"].transform("size")
    cells["alpha_corrected"] = alpha / cells["family_size"]
    cells = correct_family(cells, family=["model", "experiment"], alpha=alpha)
    order = cells.assign(_m=cells.model.map({m: i for i, m in enumerate(MODEL_ORDER)}),
                         _e=cells.experiment.map({"metric": 0, "control": 1}),
                         _r=cells.metric.map({m: i for i, m in enumerate(RANKING_LABELS)}))
    return cells.loc[order.sort_values(["_m", "_e", "_r", "layer"], kind="stable").index].reset_index(drop=True)


def control_spearman(control: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Spearman rho between the weight ratio ``w_high / w_low`` and D across the positions of each layer
    of :func:`control_comparisons` records (Table 6's last row), with a paired bootstrap (BCa) 95%
    interval (:func:`moeaudit.stats.spearman`, ``n_boot`` resamples, seed ``seed``). Columns: those of
    :func:`moeaudit.stats.spearman` and ``layer``."""

    return pd.concat([spearman(g.weight_ratio, g.delta_high - g.delta_low, n_boot=n_boot, seed=seed).assign(layer=layer)
                      for layer, g in control.groupby("layer")], ignore_index=True)


def _family_groups(cells: pd.DataFrame):
    return cells.groupby(["model", "experiment"], sort=False)


def pass_counts(cells: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """How many cells of each family of :func:`reanalysis_cells` pass, under which rule.

    One row per (model, experiment): ``cells``; ``uncorrected t``/``W`` (p below ``alpha``),
    ``uncorrected both`` (both, same sign); and for Bonferroni, Holm and BH the counts ``"<rule> t"``,
    ``"<rule> W"``, ``"<rule> both"`` (the paper's agreement rule) from the correction columns."""
    rows = []
    for (model, experiment), g in _family_groups(cells):
        row = {"model": model, "experiment": experiment, "cells": len(g),
               "uncorrected t": int((g.p_t < alpha).sum()), "uncorrected W": int((g.p_W < alpha).sum()),
               "uncorrected both": int(((g.p_t < alpha) & (g.p_W < alpha) & g.same_sign).sum())}
        for suffix, name in (("bonf", "Bonferroni"), ("holm", "Holm"), ("bh", "BH")):
            row[f"{name} t"] = int(g[f"sig_t_{suffix}"].sum())
            row[f"{name} W"] = int(g[f"sig_W_{suffix}"].sum())
            row[f"{name} both"] = int(g[f"sig_dual_{suffix}"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def interval_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model, experiment) of :func:`reanalysis_cells`: ``cells``, ``max_abs_dz`` (largest observed
    |d_z|), ``widest_ci`` (largest |d_z| inside some cell's 95% CI), ``mean_ci_half_width`` and
    ``ci_excludes_zero`` (cells whose uncorrected interval excludes 0)."""
    return pd.DataFrame([
        {"model": model, "experiment": experiment, "cells": len(g),
         "max_abs_dz": float(g.cohens_dz.abs().max()),
         "widest_ci": float(np.maximum(g.dz_ci_low.abs(), g.dz_ci_high.abs()).max()),
         "mean_ci_half_width": float(((g.dz_ci_high - g.dz_ci_low) / 2).mean()),
         "ci_excludes_zero": int(((g.dz_ci_low > 0) | (g.dz_ci_high < 0)).sum())}
        for (model, experiment), g in _family_groups(cells)])


def equivalence_counts(cells: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, experiment) of :func:`reanalysis_cells`: ``cells``, ``equivalent uncorrected``
    (``p_tost < alpha``), ``equivalent corrected`` (``p_tost < alpha_corrected``), ``median p_TOST``."""
    return pd.DataFrame([
        {"model": model, "experiment": experiment, "cells": len(g),
         "equivalent uncorrected": int((g.p_tost < alpha).sum()),
         "equivalent corrected": int((g.p_tost < g.alpha_corrected).sum()),
         "median p_TOST": float(g.p_tost.median())}
        for (model, experiment), g in _family_groups(cells)])


def detectable_effects(*, n: int, levels: dict, power: float = 0.8, powers=(0.5, 0.95),
                       targets=(0.1, 0.2)) -> pd.DataFrame:
    """Minimum detectable d_z of a two-sided paired t test at ``n`` positions, and positions needed.

    ``levels``: ``{label: per-test level}``. One row per level: ``level`` (label), ``alpha`` (the
    level), ``"MDE <p>"`` for each power in ``powers`` and ``power`` (sorted, duplicates dropped;
    :func:`moeaudit.stats.min_detectable_dz`) and ``"n for <d>"`` for each of ``targets``
    (:func:`moeaudit.stats.required_n` at ``power``)."""

    pws = sorted({*powers, power})
    rows = []
    for label, level in levels.items():
        row = {"level": label, "alpha": float(level)}
        row.update({f"MDE {pw:g}": min_detectable_dz(n, alpha=level, power=pw) for pw in pws})
        row.update({f"n for {d:g}": required_n(d, alpha=level, power=power) for d in targets})
        rows.append(row)
    return pd.DataFrame(rows)


def position_overlap(records: pd.DataFrame) -> pd.DataFrame:
    """How the sampled positions of :func:`metric_comparisons` records are shared, per model.

    Positions are identified by ``global_token_idx``. Columns: ``model``, ``positions per metric``
    (largest count of one metric at the first layer), ``distinct over metrics``, ``shared min`` and
    ``shared max`` (positions common to a pair of metrics, over all pairs), ``same at every layer``."""
    rows = []
    for model, g in records.groupby("model", sort=False):
        first = g[g.layer == g.layer.min()]
        by_metric = {m: set(gm.global_token_idx) for m, gm in first.groupby("metric", sort=False)}
        same = all(set(gm.global_token_idx) == by_metric[m]
                   for (layer, m), gm in g.groupby(["layer", "metric"], sort=False))
        names = list(by_metric)
        pairs = [len(by_metric[a] & by_metric[b]) for i, a in enumerate(names) for b in names[i + 1:]]
        rows.append({"model": model, "positions per metric": max(len(s) for s in by_metric.values()),
                     "distinct over metrics": len(set.union(*by_metric.values())),
                     "shared min": min(pairs), "shared max": max(pairs), "same at every layer": same})
    return pd.DataFrame(rows)


def context_summary(records: pd.DataFrame, *, short: int = 32) -> pd.DataFrame:
    """Where in the (padded) sequence the sampled positions of :func:`metric_comparisons` lie, per model
    (first layer; all layers share the positions). Columns: ``model``, ``share short`` (share with
    ``seq_position < short``), ``median position``, ``median first`` / ``median last`` (median over
    texts of the first / last sampled position of a text), ``max position``."""
    rows = []
    for model, g in records.groupby("model", sort=False):
        first = g[g.layer == g.layer.min()]
        per_text = first.groupby(["sample_idx", "batch_idx"]).seq_position.agg(["min", "max"])
        rows.append({"model": model, "share short": float((first.seq_position < short).mean()),
                     "median position": float(first.seq_position.median()),
                     "median first": float(per_text["min"].median()),
                     "median last": float(per_text["max"].median()),
                     "max position": int(first.seq_position.max())})
    return pd.DataFrame(rows)


def metric_value_ranges(records: pd.DataFrame) -> pd.DataFrame:
    """Range of the metric values stored for the ranked experts (high and low) of
    :func:`metric_comparisons` records: one row per (model, metric) with ``min``, ``max`` and
    ``share negative`` (share of stored values below 0)."""
    long = records.melt(id_vars=["model", "metric"], value_vars=["metric_value_high", "metric_value_low"],
                        value_name="v")
    return (long.groupby(["model", "metric"], sort=False)["v"]
            .agg(min="min", max="max", share_negative=lambda s: float((s < 0).mean()))
            .rename(columns={"share_negative": "share negative"}).reset_index())


def control_repeats(control: pd.DataFrame) -> pd.DataFrame:
    """Positions drawn more than once in the :func:`control_comparisons` records, per layer. The records
    store no text index, so a position is identified by ``token_pos`` and its clean loss (rounded to
    1e-6 nats). Columns ``layer``, ``positions``, ``distinct``, ``repeats`` (= positions - distinct)."""
    rows = [{"layer": int(layer), "positions": len(g),
             "distinct": len(set(zip(g.token_pos, g.baseline_loss.round(6))))}
            for layer, g in control.groupby("layer")]
    out = pd.DataFrame(rows)
    out["repeats"] = out.positions - out.distinct
    return out


def correlation_by_layer(redist: pd.DataFrame, *, model: str, pair: str = "gap_comp",
                         alpha: float = 0.05) -> pd.DataFrame:
    """One stored redistribution correlation of ``model`` across its layers (:func:`redistribution`).

    ``pair``: ``"gap_comp"`` (gap norm vs relative compensation), ``"rw_gap"``, ``"rw_comp"`` or
    ``"cos_gap"``. Columns ``layer``, ``rho``, ``p`` (the stored Spearman values across experts),
    ``significant`` (``p < alpha``), ``rank`` (1 = largest rho). ``ValueError`` for an unknown pair or
    a model without records."""
    if pair not in REDISTRIBUTION_PAIRS.values():
        raise ValueError(f"pair must be one of {tuple(REDISTRIBUTION_PAIRS.values())}, got {pair!r}")
    g = redist[redist.model == model].sort_values("layer")
    if g.empty:
        raise ValueError(f"no redistribution records for model {model!r}")
    out = pd.DataFrame({"layer": g.layer.to_numpy(), "rho": g[f"rho_{pair}"].to_numpy(dtype=float),
                        "p": g[f"p_{pair}"].to_numpy(dtype=float)})
    out["significant"] = out.p < alpha
    out["rank"] = out.rho.rank(ascending=False, method="min").astype(int)
    return out


def monotonicity_breaks(values, *, increasing: bool = True) -> list[tuple]:
    """Where a sequence fails to be strictly monotone.

    ``values``: a Series indexed by position (e.g. layer) in order, or a sequence. Returns the list of
    ``(index_a, index_b, value_a, value_b)`` for consecutive entries with ``value_b <= value_a``
    (``increasing``) or ``value_b >= value_a`` (decreasing); empty when strictly monotone."""
    s = values if isinstance(values, pd.Series) else pd.Series(list(values))
    idx, v = list(s.index), s.to_numpy(dtype=float)
    return [(idx[i], idx[i + 1], float(v[i]), float(v[i + 1])) for i in range(len(v) - 1)
            if (v[i + 1] <= v[i] if increasing else v[i + 1] >= v[i])]


def reanalysis_counts(cells: pd.DataFrame, *, alpha: float = 0.05) -> dict:
    """The counts the re-analysis reports, from :func:`reanalysis_cells` run at level ``alpha``.

    Returns a dict: ``metric_level`` / ``control_level`` (Bonferroni level of a metric / control
    family), ``dual_metric`` (observational cells passing the paper's rule: Bonferroni, both tests,
    same sign), ``dual_control`` (control cells passing it), ``dual_olmoe_control``, ``eq_min`` /
    ``eq_max`` (fewest / most metric cells of one model shown equivalent by TOST at ``alpha``),
    ``eq_corrected`` (metric cells equivalent at their family's Bonferroni level), ``eq_control``
    (control cells equivalent at ``alpha``)."""
    counts = pass_counts(cells, alpha=alpha).set_index(["model", "experiment"])
    eq = equivalence_counts(cells, alpha=alpha)
    m, c = eq[eq.experiment == "metric"], eq[eq.experiment == "control"]
    size = cells.groupby("experiment").family_size.first()
    return {"metric_level": alpha / int(size["metric"]), "control_level": alpha / int(size["control"]),
            "dual_metric": int(counts.xs("metric", level=1)["Bonferroni both"].sum()),
            "dual_control": int(counts.xs("control", level=1)["Bonferroni both"].sum()),
            "dual_olmoe_control": int(counts.loc[("olmoe", "control"), "Bonferroni both"]),
            "eq_min": int(m["equivalent uncorrected"].min()), "eq_max": int(m["equivalent uncorrected"].max()),
            "eq_corrected": int(m["equivalent corrected"].sum()), "eq_control": int(c["equivalent uncorrected"].sum())}


# ----------------------------------------------------------------------------- phrasing the comparisons
def released_digits(value: float, printed_value: float, decimals: int, *, max_extra: int = 8) -> str:
    """``value`` written with enough decimals to show how it compares with a number printed to ``decimals`` places.

    The fewest decimals ``k > decimals`` at which the written value itself lies more than half a unit of the
    printed precision from ``printed_value`` (so a reader sees why it does not round to the printed number), or,
    when ``value`` does agree, at which the written value lies within that half unit; at most
    ``decimals + max_extra``. Example: ``released_digits(0.027496, 0.028, 3)`` gives ``"0.027496"`` where
    four decimals would show the ambiguous ``0.0275``. Source: :func:`agrees_at_printed_precision`.
    """
    agrees = bool(agrees_at_printed_precision(value, printed_value, decimals))
    tol = 0.5 * 10.0 ** -decimals
    for k in range(decimals + 1, decimals + max_extra + 1):
        text = f"{value:.{k}f}"
        dist = abs(float(text) - printed_value)
        if (dist <= tol + 1e-15) if agrees else (dist > tol + 1e-15):
            return text
    return f"{value:.{decimals + max_extra}f}"


def mismatch_phrase(long: pd.DataFrame) -> str:
    """The rows of :func:`compare_printed` output that do not agree, as a phrase: ``"none"``, or items such as
    ``"DeepSeek-V2-Lite activation norm Layer 1, p_t: printed 0.028, released 0.027496"`` joined by ``"; "``,
    with the released value written by :func:`released_digits`."""
    bad = long[~long.agrees.astype(bool)]
    if bad.empty:
        return "none"
    return "; ".join(f"{MODELS[r.model]}" + (f" {RANKING_LABELS[r.metric].lower()}" if r.metric else "")
                     + f" Layer {r.layer}, {r.quantity}: printed {r.printed}, released "
                     + released_digits(r.recomputed, r.value, int(r.decimals)) for r in bad.itertuples())


def agreement_phrase(long: pd.DataFrame) -> str:
    """How many printed numbers of :func:`compare_printed` output agree, as the subject and verb of a sentence:
    ``"all 20 agree"``, ``"the one printed number agrees"``, ``"78 of the 80 agree"``, ``"none of the 5 agrees"``."""
    k, n = int(long.agrees.sum()), len(long)
    if n == 1:
        return "the one printed number agrees" if k else "the one printed number does not agree"
    return (f"all {n} agree" if k == n else "none of the {n} agrees".format(n=n) if k == 0
            else f"{k} of the {n} agree")


def side_by_side_as_printed(long: pd.DataFrame, *, index, quantities) -> pd.DataFrame:
    """:func:`printed_side_by_side` with each ``"<q> paper"`` column holding the number as the paper prints it
    (the ``printed`` text of :func:`paper_printed_values`, e.g. ``"0.0013"``, ``"+0.231"``) instead of a float."""
    out = printed_side_by_side(long, index=index, quantities=quantities)
    text = with_paper_labels(long.pivot(index=list(index), columns="quantity", values="printed").reset_index())
    keys = list(index)
    merged = out[keys].merge(text, on=keys, how="left")
    for q in quantities:
        out[f"{q} paper"] = merged[q].to_numpy()
    return out


def layer_correlation_of_d(records: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """How alike the layers of one metric are, given that they share their positions.

    ``records``: :func:`metric_comparisons` rows (positions identified by ``global_token_idx``; D =
    ``delta_high - delta_low``, nats). For every (model, metric) and every pair of layers, Spearman's rho of D
    between the two layers across the positions they share (:func:`moeaudit.stats.spearman_defined`). One row per
    (model, metric): ``pairs`` (layer pairs with a defined rho), ``positions`` (shared positions, smallest over the
    pairs), ``rho median``, ``rho min``, ``rho max``, ``significant`` (pairs with two-sided p < ``alpha``,
    uncorrected).
    """
    rows = []
    for (model, metric), g in records.groupby(["model", "metric"], sort=False):
        wide = g.assign(D=g.delta_high - g.delta_low).pivot_table(index="global_token_idx", columns="layer", values="D")
        layers = list(wide.columns)
        rhos, ns, ps = [], [], []
        for i, a in enumerate(layers):
            for b in layers[i + 1:]:
                rho, p, n = spearman_defined(wide[a].to_numpy(), wide[b].to_numpy())
                if np.isfinite(rho):
                    rhos.append(rho)
                    ns.append(n)
                    ps.append(p)
        rows.append({"model": model, "metric": metric, "pairs": len(rhos), "positions": min(ns) if ns else 0,
                     "rho median": float(np.median(rhos)) if rhos else np.nan,
                     "rho min": float(np.min(rhos)) if rhos else np.nan, "rho max": float(np.max(rhos)) if rhos else np.nan,
                     "significant": int((np.asarray(ps) < alpha).sum())})
    return pd.DataFrame(rows)
