"""Chapter 6 (progressive ablation; the paper's Section 3 "Progressive ablation", Appendix C,
Tables 8-9): the shares of positive and of extreme loss changes, the removal direction, where the
redundancy buffer breaks, the threshold calls, and the chapter's sentence builders."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..paper import paper_printed_values
from ..report import AnswerCheck, check_answer, fmt_bound, fmt_signed, join_words, zero_relation
from ..stats import sign_test, sign_test_detectable_share, t_critical


def tail_share(x, *, q: float = 0.95) -> float:
    """Share of the summed positive loss increase contributed by the values above the ``q`` quantile.

    ``sum(max(x_i, 0) for x_i > quantile(x, q)) / sum(max(x_i, 0))`` (``numpy.quantile``, linear
    interpolation). About ``(1 - q) / s`` when every rising value rises by the same amount, ``s``
    being the share of values above zero (``1 - q`` when all rise), near 1 when a few positions
    carry the increase. NaN when no value is positive; ``ValueError`` for an empty ``x`` or q outside [0, 1].
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("x is empty")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = np.clip(x, 0, None)
    total = pos.sum()
    return float(pos[x > np.quantile(x, q)].sum() / total) if total > 0 else float("nan")


def deepest_removal_summary(records: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """The distribution of the cumulative loss change at each model's deepest removal (the paper's
    Table 9 and its tails), one row per (model, layer).

    The deepest removal is the largest ``k`` of the model in ``records`` (``top_k - 1`` by
    default: all active routed experts but one removed). Columns: ``model``, ``layer``, ``k``,
    ``n``, ``mean``, ``sd`` (ddof=1; NaN for n < 2), ``median``, ``p05``, ``p95`` (nats), ``share_above`` (fraction of positions
    with ΔL > ``threshold``), ``share_below_zero`` (fraction where the loss fell), ``n_up`` and
    ``n_down`` (counts of positions where the loss rose and fell; positions with ΔL = 0 are in
    neither), ``top5_share`` (:func:`tail_share` at q = 0.95).
    """
    rows = []
    for model, m in records.groupby("model", sort=False):
        kmax = int(m.k.max())
        for layer, g in m[m.k == kmax].groupby("layer", sort=False):
            x = g.delta_loss.to_numpy(dtype=np.float64)
            rows.append({"model": model, "layer": layer, "k": kmax, "n": int(x.size), "mean": float(x.mean()),
                         "sd": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                         "median": float(np.median(x)), "p05": float(np.quantile(x, 0.05)),
                         "p95": float(np.quantile(x, 0.95)), "share_above": float(np.mean(x > threshold)),
                         "share_below_zero": float(np.mean(x < 0)), "n_up": int((x > 0).sum()),
                         "n_down": int((x < 0).sum()), "top5_share": tail_share(x, q=0.95)})
    return pd.DataFrame(rows)


def removal_direction(deepest: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Whether the deepest removal raises or lowers the mean loss, and the loss at more than half of
    the positions, each at the Bonferroni level ``alpha / m`` (``m`` the number of layers of that
    model in ``deepest``).

    ``deepest``: a :func:`deepest_removal_summary` result (``model``, ``layer``, ``n``, ``mean``, ``sd``,
    ``n_up``, ``n_down``, ``share_below_zero``). Returns ``deepest`` with

    - ``alpha_sign`` (``alpha / m``), ``mean_low``/``mean_high`` (Student-t interval of the mean at
      confidence ``1 - alpha / m``, nats; NaN without ``sd`` or for n < 2);
    - ``p_sign``: a two-sided sign test (:func:`moeaudit.stats.sign_test`) of the positions where the
      loss rose against those where it fell (a test of the median shift);
    - ``direction``: ``"raises"`` (``p_sign < alpha / m``, more rises), ``"lowers"`` (significant, more
      falls) or ``"undistinguished"`` (the share of falls is not distinguishable from one half; also
      when no position changed);
    - ``detectable_share``: the share of rises (above one half) the sign test detects with 80% power
      at that level and ``n_up + n_down`` positions (:func:`moeaudit.stats.sign_test_detectable_share`).

    ``ValueError`` unless 0 < alpha < 1.
    """

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    out = deepest.copy()
    m = out.groupby("model", sort=False).layer.transform("size")
    out["p_sign"] = [sign_test(int(u), int(d)) for u, d in zip(out.n_up, out.n_down)]
    out["alpha_sign"] = alpha / m
    sd = out["sd"] if "sd" in out else pd.Series(np.nan, index=out.index)
    half = [t_critical(a, int(n) - 1) * s / np.sqrt(n) if n > 1 and np.isfinite(s) else np.nan
            for a, n, s in zip(out.alpha_sign, out.n, sd)]
    out["mean_low"], out["mean_high"] = out["mean"] - half, out["mean"] + half
    out["detectable_share"] = [sign_test_detectable_share(int(u + d), alpha=a) if u + d > 0 else np.nan
                               for u, d, a in zip(out.n_up, out.n_down, out.alpha_sign)]
    sig = out.p_sign < out.alpha_sign  # NaN p (no position changed) is not significant
    out["direction"] = np.where(sig & (out.n_up > out.n_down), "raises",
                                np.where(sig & (out.n_down > out.n_up), "lowers", "undistinguished"))
    return out


def redundancy_breaks(summary: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """Where each layer's progressive-ablation trajectory breaks, one row per (model, layer).

    ``summary`` needs ``model``, ``layer``, ``k``, ``mean`` (mean cumulative ΔL in nats) and
    optionally ``clean_loss``; a :func:`progressive_summary` result, or the paper's Table 8 in the
    same columns. Columns: ``first_k_above`` (smallest k with mean > ``threshold``; ``<NA>`` if
    none), ``largest_step`` and ``largest_step_k`` (the largest ``mean(k) - mean(k-1)`` with
    ``mean(0) = 0``, and its k), ``mean_deepest`` (mean at the largest k), ``clean_loss`` and
    ``ratio_to_clean`` (``mean_deepest / clean_loss``; NaN without ``clean_loss``).
    """
    rows = []
    for (model, layer), g in summary.groupby(["model", "layer"], sort=False):
        g = g.sort_values("k")
        means, ks = g["mean"].to_numpy(dtype=np.float64), g.k.to_numpy()
        steps = np.diff(np.concatenate([[0.0], means]))
        above = ks[means > threshold]
        clean = float(g.clean_loss.iloc[-1]) if "clean_loss" in g else float("nan")
        rows.append({"model": model, "layer": layer, "first_k_above": int(above[0]) if above.size else pd.NA,
                     "largest_step": float(steps.max()), "largest_step_k": int(ks[int(steps.argmax())]),
                     "mean_deepest": float(means[-1]), "clean_loss": clean, "ratio_to_clean": float(means[-1] / clean)})
    out = pd.DataFrame(rows)
    out["first_k_above"] = out["first_k_above"].astype("Int64")
    return out


def paper_progressive_table() -> pd.DataFrame:
    """The paper's Tables 8-9 (OLMoE-1B-7B-0924, as printed) in the columns of
    :func:`progressive_summary`: ``model`` (``"paper: OLMoE-1B-7B"``), ``layer``, ``k``, ``mean``,
    and ``median``/``p95`` at k = 7 (NaN elsewhere); ``n`` is the paper's 500 positions per cell.
    Read from :func:`moeaudit.paper.paper_printed_values`."""

    pv = paper_printed_values()
    pv = pv[pv.table.isin([8, 9])]
    out = pv.pivot_table(index=["layer", "k"], columns="quantity", values="value").reset_index()
    out = out.rename(columns={"mean_delta": "mean", "median_delta": "median", "p95_delta": "p95"})
    out.insert(0, "model", "paper: OLMoE-1B-7B")
    out["k"] = out["k"].astype(int)
    out["n"] = 500
    return out.sort_values(["layer", "k"], ignore_index=True)


def distribution_shape(*, median: float, p05: float, p95: float, ratio: float = 0.25) -> str:
    """The shape of a distribution of loss changes (nats) from its median and 5th/95th percentiles.

    With ``scale = max(|p05|, |p95|)``: ``"shift"`` when ``|median| >= ratio·scale`` (the centre moved);
    otherwise ``"two-sided"`` when both tails are long — ``p05 < 0 < p95`` and
    ``min(|p05|, p95) >= ratio·scale`` (a wide spread of both signs); otherwise ``"upper tail"``
    (``p95`` is the long side: a tail of large increases) or ``"lower tail"``; ``"none"`` when
    ``scale`` is 0. ``ValueError`` unless ``0 < ratio < 1`` or when ``p05 > p95``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if p05 > p95:
        raise ValueError(f"p05 ({p05}) exceeds p95 ({p95})")
    scale = max(abs(p05), abs(p95))
    if scale == 0:
        return "none"
    if abs(median) >= ratio * scale:
        return "shift"
    if p05 < 0 < p95 and min(-p05, p95) >= ratio * scale:
        return "two-sided"
    return "upper tail" if abs(p95) >= abs(p05) else "lower tail"


def threshold_calls(summary: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """At each model's deepest removal, whether a layer's mean loss change is above or below
    ``threshold`` (nats) beyond its confidence interval.

    ``summary``: a :func:`progressive_summary` result. One row per (model, layer) at the model's
    largest ``k`` with ``k``, ``mean``, ``ci_low``, ``ci_high`` and ``call``: ``"above"`` (``ci_low >
    threshold``), ``"below"`` (``ci_high < threshold``) or ``"undecided"`` (the interval contains the
    threshold, or is NaN).
    """
    rows = []
    for model, m in summary.groupby("model", sort=False):
        deep = m[m.k == m.k.max()]
        for r in deep.itertuples():
            call = "above" if r.ci_low > threshold else "below" if r.ci_high < threshold else "undecided"
            rows.append({"model": model, "layer": r.layer, "k": int(r.k), "mean": r.mean, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "call": call})
    return pd.DataFrame(rows)


_SHAPE_WORDS = {"shift": "a shift of the whole distribution", "two-sided": "a wide spread of both signs",
                "upper tail": "a tail of large increases", "lower tail": "a tail of large decreases",
                "none": "no change at all"}


def shape_phrase(row) -> str:
    """A :func:`deepest_removal_summary` row (``median``, ``p05``, ``p95``, ``share_below_zero``) as
    its :func:`distribution_shape` in words, with the numbers it rests on."""
    shape = distribution_shape(median=row["median"], p05=row["p05"], p95=row["p95"])
    return (f"{_SHAPE_WORDS[shape]} (median {fmt_signed(row['median'])}, P5 {fmt_signed(row['p05'])}, "
            f"P95 {fmt_signed(row['p95'])} nats; the loss fell at {row['share_below_zero']:.0%} of positions)")


def _undecided(calls: pd.DataFrame, threshold: float) -> str:
    u = calls[calls.call == "undecided"]
    if u.empty:
        return ""
    return (f" At k = {int(u.k.iloc[0])} the {'interval' if len(u) == 1 else 'intervals'} of the mean at "
            + join_words(f"layer {r.layer} ([{fmt_signed(r.ci_low)}, {fmt_signed(r.ci_high)}])" for r in u.itertuples())
            + f" contain{'s' if len(u) == 1 else ''} {threshold:g} nats, so whether "
            + ("that layer is" if len(u) == 1 else "those layers are")
            + " above or below the threshold cannot be told apart on these positions.")


def buffer_readings(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, *,
                    threshold: float) -> pd.DataFrame:
    """What each layer's progressive-ablation result supports, one row per (model, layer).

    ``breaks``: :func:`redundancy_breaks`; ``deepest``: :func:`removal_direction` (with
    ``mean_low``/``mean_high``, the interval of the mean at the Bonferroni level ``alpha_sign``, and
    the sign test ``p_sign``/``direction``); ``calls``: :func:`threshold_calls` (same threshold as
    ``breaks``); ``threshold`` (nats) the one ``breaks`` used. Returns ``model``, ``layer``, ``share_below_zero``, ``p_sign``, ``alpha_sign``,
    ``direction``, ``detectable_share``, ``mean``, ``mean_low``, ``mean_high``, ``call``,
    ``ci_low``/``ci_high`` (the uncorrected interval of :func:`threshold_calls`) and ``reading``.

    One definition of a buffer applies to every layer: the deepest removal raises the *mean* loss
    (its interval at the Bonferroni level lies above zero, as displayed at three decimals,
    :func:`zero_relation`), but by less than the threshold (the same interval lies below it), and
    the mean crosses the threshold at no k. Readings:

    - ``"crosses"``: the mean crosses the threshold at some k (``first_k_above`` set);
    - ``"buffer"``: as defined above;
    - ``"raises, undecided"``: the mean is raised, but its interval contains the threshold;
    - ``"lowers"``: the interval of the mean lies below zero;
    - ``"no direction"``: it contains zero: the mean change is not distinguishable from zero, so a
      small mean is no evidence of a buffer.

    The sign test (the median sense) is reported beside the reading and does not decide it.
    """
    if "mean_low" not in deepest:
        raise ValueError("deepest needs mean_low/mean_high: pass a removal_direction result")
    b = breaks[["model", "layer", "first_k_above"]]
    d = deepest[["model", "layer", "share_below_zero", "p_sign", "alpha_sign", "direction", "detectable_share",
                 "mean", "mean_low", "mean_high"]]
    out = b.merge(d, on=["model", "layer"], how="inner").merge(calls[["model", "layer", "call", "ci_low", "ci_high"]],
                                                              on=["model", "layer"], how="left")
    rel = np.array([zero_relation(lo, hi) for lo, hi in zip(out.mean_low, out.mean_high)])
    out["reading"] = np.where(out.first_k_above.notna(), "crosses", np.where(
        rel == "below", "lowers", np.where(rel != "above", "no direction", np.where(
            out.mean_high < threshold, "buffer", "raises, undecided"))))
    return out.drop(columns="first_k_above")


def _named(rows: pd.DataFrame, most: int = 6) -> str:
    """`` (m layer 0, m layer 5)`` for a few (model, layer) rows, ``""`` for none or too many to list."""
    if rows.empty or len(rows) > most:
        return ""
    return " (" + ", ".join(f"{r.model} layer {r.layer}" for r in rows.itertuples()) + ")"


def _pct_span(shares) -> str:
    lo, hi = f"{min(shares):.0%}", f"{max(shares):.0%}"
    return lo if lo == hi else f"{lo[:-1]}–{hi}"


def _layers(rows: pd.DataFrame) -> str:
    return f"layer{'s' if len(rows) > 1 else ''} {join_words(rows.layer)}"


def _p_equals(ps) -> str:
    """``"p = 0.0014"`` for one p-value, ``"p = 0.0014, 0.003 and 0.02"`` for several (two significant digits)."""
    return "p = " + join_words(f"{p:.2g}" for p in ps)


def _mean_intervals(rows: pd.DataFrame) -> str:
    return "; ".join(f"L{r.layer}: {fmt_signed(r.mean)} [{fmt_bound(r.mean_low)}, {fmt_bound(r.mean_high)}]"
                     for r in rows.itertuples()) + " nats"


def _median_clause(rows: pd.DataFrame) -> str:
    """The sign test (median sense) of ``rows`` in words, with its power where it is not significant."""
    sig = rows[rows.direction != "undistinguished"]
    flat = rows[rows.direction == "undistinguished"]
    parts = []
    for what, g in sig.groupby("direction", sort=False):
        parts.append(f"the loss {'rose' if what == 'raises' else 'fell'} at more than half of the positions at "
                     f"{_layers(g)} (it fell at {_pct_span(g.share_below_zero)}; sign test {_p_equals(g.p_sign)})")
    if len(flat):
        q = flat.detectable_share.max()
        parts.append(f"at {_layers(flat)} the share of positions where the loss fell ({_pct_span(flat.share_below_zero)}) "
                     f"is not distinguishable from one half (sign test {_p_equals(flat.p_sign)})"
                     + (f", a weak test here: it detects a share of rises of {q:.0%} with 80% power" if np.isfinite(q) else ""))
    return "; ".join(parts)


def buffer_phrase(readings: pd.DataFrame, *, threshold: float) -> str:
    """The layers that do not cross ``threshold`` (a :func:`buffer_readings` result, one model), by what
    they support, as clauses joined by semicolons; ``""`` when every layer crosses. Each clause quotes
    the mean at the deepest removal with its interval at the Bonferroni level, and the sign test of
    the share of positions where the loss fell (the median sense), with its power where it is not
    significant."""
    r = readings[readings.reading != "crosses"]
    if r.empty:
        return ""
    level = f"{100 * (1 - r.alpha_sign.iloc[0]):.2f}".rstrip("0").rstrip(".") + "%"
    parts = []
    buf = r[r.reading == "buffer"]
    if len(buf):
        parts.append(f"{_layers(buf)} keep{'s' if len(buf) == 1 else ''} a buffer by this threshold: the deepest "
                     f"removal raises the mean loss, but by less than {threshold:g} nats ({_mean_intervals(buf)}; "
                     f"{level} intervals, Bonferroni over the model's layers, above zero and below the threshold)")
    und = r[r.reading == "raises, undecided"]
    if len(und):
        parts.append(f"at {_layers(und)} the deepest removal raises the mean loss ({_mean_intervals(und)}), but the "
                     f"{level} interval contains {threshold:g} nats, so a buffer by this threshold is not shown")
    nod = r[r.reading == "no direction"]
    if len(nod):
        parts.append(f"at {_layers(nod)} the {level} interval of the mean contains zero ({_mean_intervals(nod)}): "
                     "the mean change is not distinguishable from zero, so staying below the threshold there is no "
                     "evidence of a buffer")
    low = r[r.reading == "lowers"]
    if len(low):
        parts.append(f"at {_layers(low)} the deepest removal *lowers* the mean loss ({_mean_intervals(low)}): these "
                     "experts' removal improves the prediction on average, which is not a buffer")
    med = _median_clause(r)
    return "; ".join(parts) + (f". In the median sense, {med}" if med else "")


def cliff_text(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, *, threshold: float,
               alpha: float = 0.05) -> str:
    """One model's progressive-ablation result as a paragraph (chapter 6): the deepest-removal means,
    the layers whose mean crosses ``threshold``, the interval calls at the deepest k
    (:func:`threshold_calls`), what the other layers support (:func:`buffer_phrase`: a buffer only
    where the removal raises the loss), the largest step and the shape of the widest distribution.
    All three tables restricted to one model; ``deepest`` a :func:`deepest_removal_summary` or
    :func:`removal_direction` result (the sign tests use ``alpha`` when it lacks ``direction``)."""
    if "direction" not in deepest:
        deepest = removal_direction(deepest, alpha=alpha)
    b, d = breaks, deepest.set_index("layer")
    kmax = int(d.k.iloc[0])
    worst, mildest = b.loc[b.mean_deepest.idxmax()], b.loc[b.mean_deepest.idxmin()]
    broken, steepest, tail = b[b.first_k_above.notna()], b.loc[b.largest_step.idxmax()], d.loc[d.p95.idxmax()]
    s = (f"**{b.model.iloc[0]}.** Removing {kmax} of the {kmax + 1} active experts changes the loss by "
         f"{fmt_signed(mildest.mean_deepest)} nats on average at layer {mildest.layer} and by "
         f"{fmt_signed(worst.mean_deepest)} nats at layer {worst.layer} ({worst.ratio_to_clean:.1%} of the clean loss there). ")
    if len(broken):
        rest = sorted(set(b.layer) - set(broken.layer))
        s += (f"The mean (a point estimate; its intervals follow) crosses {threshold:g} nats at "
              + join_words(f"layer {r.layer} (k = {r.first_k_above})" for r in broken.itertuples())
              + (f"; layer{'s' if len(rest) > 1 else ''} {join_words(rest)} stay{'' if len(rest) > 1 else 's'} below it "
                 "at every k." if rest else "; no layer stays below it."))
    else:
        s += f"No layer's mean crosses {threshold:g} nats at any k."
    s += _undecided(calls, threshold)
    phrase = buffer_phrase(buffer_readings(breaks, deepest.reset_index(), calls, threshold=threshold),
                           threshold=threshold)
    if phrase:
        s += f" Of the layers whose mean stays below {threshold:g} nats, " + phrase + "."
    return s + (f" The largest single step is at layer {steepest.layer}, k = {steepest.largest_step_k} "
                f"({fmt_signed(steepest.largest_step)} nats). At k = {kmax} the median lies between "
                f"{fmt_signed(d['median'].min())} and {fmt_signed(d['median'].max())} nats across layers; the widest "
                f"upper tail is at layer {tail.name}, where the distribution is {shape_phrase(tail)}, and the positions "
                f"above the 95th percentile contribute {tail.top5_share:.0%} of the summed increase.")


def progressive_overview_text(readings: pd.DataFrame, breaks: pd.DataFrame, *, threshold: float) -> str:
    """The progressive-ablation result over all models in a few sentences (chapter 6, "Shows").

    ``readings``: :func:`buffer_readings` (every model); ``breaks``: :func:`redundancy_breaks`. States
    the range of the deepest-removal means and how many layers cross ``threshold``; at how many the
    interval of the mean at the Bonferroni level lies above zero, below it or contains it; at which
    layers a buffer (:func:`buffer_readings`: mean raised, by less than ``threshold``) is shown; and,
    in the median sense, at how many the sign test finds more rises or falls, its power where it
    does not, and the layers whose mean is raised although their median shift is not significant.
    Whether any layer is in the regime the paper's explanation needs (removals that raise the loss,
    but little) follows from the buffer count alone; the layers whose interval contains zero but lies
    below ``threshold`` are counted apart (removal shown to cost less than the threshold, not shown to
    cost anything).
    """
    n = len(readings)
    n_cross = int(breaks.first_k_above.notna().sum())
    rel = np.array([zero_relation(lo, hi) for lo, hi in zip(readings.mean_low, readings.mean_high)])
    up, down = int((rel == "above").sum()), int((rel == "below").sum())
    s = (f"the mean loss change at the deepest removal ranges from {fmt_signed(breaks.mean_deepest.min())} to "
         f"{fmt_signed(breaks.mean_deepest.max())} nats over {n} audited layers, and "
         + (f"no layer crosses {threshold:g} nats. " if n_cross == 0 else
            f"{n_cross} of them cross{'es' if n_cross == 1 else ''} {threshold:g} nats. ")
         + f"The interval of the mean at the Bonferroni level over each model's layers lies above zero at {up} of the "
           f"{n} layers{_named(readings[rel == 'above'])}" + (f", below zero at {down}{_named(readings[rel == 'below'])}"
                                                              if down else "")
         + f" and contains zero at {n - up - down}. ")
    buf = readings[readings.reading == "buffer"]
    strict = (f"A buffer in the strict sense (the deepest removal raises the mean loss, but by less than {threshold:g} "
              "nats, both beyond that interval) is shown at ")
    if len(buf):
        s += (strict + f"{len(buf)} of the {n} layers ("
              + "; ".join(f"{m}: {join_words(g.layer)}" for m, g in buf.groupby("model", sort=False)) + "). ")
    else:
        s += strict + "no layer. "
    small = readings[(readings.reading == "no direction") & (readings.mean_high < threshold)]
    if len(small):
        s += (f"At {len(small)} of the {n} layers the interval contains zero and lies below {threshold:g} nats: there "
              f"removing the experts is shown to cost less than {threshold:g} nats on average (the \"approximately "
              "harmless\" removal of the paper's explanation) but not shown to cost anything, so at this sample size "
              "redundant experts cannot be told apart there from experts whose removal has no measurable effect. ")
    s += ("Only a layer with a buffer is shown to be in the regime the paper uses to explain why observational pruning "
          "criteria \"work\" without identifying dispensable experts: removal that costs something, but little. ")
    raises = int((readings.direction == "raises").sum())
    lowers = int((readings.direction == "lowers").sum())
    flat = readings[readings.direction == "undistinguished"]
    s += (f"In the median sense, the deepest removal raises the loss at more than half of the positions (two-sided "
          f"sign test, same level) at {raises} of the {n} layers{_named(readings[readings.direction == 'raises'])}"
          + (f" and lowers it at {lowers}{_named(readings[readings.direction == 'lowers'])}" if lowers else ""))
    if len(flat):
        q = flat.detectable_share.max()
        s += (f"; at {len(flat)} the share of positions where the loss fell ({_pct_span(flat.share_below_zero)}) is not "
              "distinguishable from one half"
              + (f", but the test is weak: with these positions it needs about {q:.0%} of them to rise for 80% power"
                 if np.isfinite(q) else ""))
        raised = flat[[zero_relation(lo, hi) == "above" for lo, hi in zip(flat.mean_low, flat.mean_high)]]
        if len(raised):
            s += ("; of these, " + join_words(f"{r.model} layer {r.layer}" for r in raised.itertuples())
                  + f" {'raises' if len(raised) == 1 else 'raise'} the mean loss nevertheless ("
                  + join_words(f"{fmt_signed(r.mean)} nats, sign test p = {r.p_sign:.2g}" for r in raised.itertuples())
                  + "): there a minority of positions with large increases carries the mean, and the median shift is "
                    "not significant at the Bonferroni level")
    return s + "."


def paper_share_positive_text(rel: pd.DataFrame, *, alpha: float = 0.05) -> str:
    """The released progressive-ablation summary's share of positions whose loss rose, per layer, with
    a sign test against one half (chapter 6).

    ``rel``: :func:`moeaudit.released.progressive_ablation` rows of one ``k`` (``layer``,
    ``share_positive``, ``n``). The summary gives only the share that rose, so every other position
    is counted as a fall: positions with no change at all would make the true test *more* favourable
    to a rise, so a rise called distinguishable here is distinguishable, while a share called not
    distinguishable could become so if many positions did not change. Two-sided sign test
    (:func:`moeaudit.stats.sign_test`) at the Bonferroni level ``alpha / len(rel)``.
    """

    n_up = [int(round(sh * n)) for sh, n in zip(rel.share_positive, rel.n)]
    p = [sign_test(u, int(n) - u) for u, n in zip(n_up, rel.n)]
    level = alpha / len(rel)
    up = [L for L, sh, q in zip(rel.layer, rel.share_positive, p) if q < level and sh > 0.5]
    down = [L for L, sh, q in zip(rel.layer, rel.share_positive, p) if q < level and sh < 0.5]
    flat = [L for L, q in zip(rel.layer, p) if not q < level]
    s = (join_words(f"layer {L} {sh:.0%} (sign test p = {q:.2g})" for L, sh, q in zip(rel.layer, rel.share_positive, p))
         + f" (n = {int(rel.n.min())} positions per layer; a position whose loss did not rise is counted as a fall). "
         f"At the Bonferroni level {alpha:g}/{len(rel)} = {level:.3g}, ")
    parts = []
    if up:
        parts.append(f"the loss rose at more than half of the positions at layer{'s' if len(up) > 1 else ''} {join_words(up)}")
    if down:
        parts.append(f"it fell at more than half at layer{'s' if len(down) > 1 else ''} {join_words(down)}")
    if flat:
        parts.append(f"at layer{'s' if len(flat) > 1 else ''} {join_words(flat)} the share is not distinguishable from "
                     "one half (unless many positions did not change at all, which the summary does not say): there the "
                     "paper's own numbers do not show the removal raising the loss at most positions")
    return s + "; ".join(parts) + "."


def _crossing(crossed, last, threshold: float) -> str:
    if not crossed:
        return f"no layer crosses {threshold:g} nats"
    if list(crossed) == [last]:
        return f"only the last audited layer ({last}) crosses {threshold:g} nats"
    return f"layer{'s' if len(crossed) > 1 else ''} {join_words(crossed)} cross{'' if len(crossed) > 1 else 'es'} {threshold:g} nats"


def cliff_comparison_text(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, paper_breaks: pd.DataFrame,
                          *, last: int, threshold: float, alpha: float = 0.05) -> str:
    """One bullet comparing one model's crossings of ``threshold`` with the paper's Table 8
    (``paper_breaks``: :func:`redundancy_breaks` of :func:`paper_progressive_table`), what the layers
    below the threshold support (:func:`buffer_phrase`), where the largest deepest-removal mean lies,
    and the shape of the damage there (:func:`shape_phrase`). ``deepest`` as in :func:`cliff_text`."""
    if "direction" not in deepest:
        deepest = removal_direction(deepest, alpha=alpha)
    b, d = breaks.set_index("layer"), deepest.set_index("layer")
    crossed = list(b.index[b.first_k_above.notna()])
    p_crossed = list(paper_breaks.layer[paper_breaks.first_k_above.notna()])
    p_last = int(paper_breaks.layer.max())
    same = (not crossed and not p_crossed) or (crossed == [last] and p_crossed == [p_last])
    shape = _crossing(crossed, last, threshold)
    undecided = calls[calls.call == "undecided"]
    shape += (f" (the interval of the mean at the deepest removal contains {threshold:g} nats at layer"
              f"{'s' if len(undecided) > 1 else ''} {join_words(undecided.layer)})" if len(undecided) else "")
    phrase = buffer_phrase(buffer_readings(breaks, deepest.reset_index(), calls, threshold=threshold),
                           threshold=threshold)
    shape += f"; {phrase}" if phrase else ""
    shape += ("; as in the paper's Table 8" if same else "; in the paper's Table 8, "
              + _crossing(p_crossed, p_last, threshold))
    worst = b.mean_deepest.idxmax()
    where = ("the largest mean change at the deepest removal (a point estimate, not tested against the other "
             "layers') is at the last audited layer" if worst == last else
             f"the largest mean change at the deepest removal (a point estimate, not tested against the other "
             f"layers') is at layer {worst}, not the last")
    return (f"- **{b.model.iloc[0]}**: {shape}; {where}, and there the loss change shows "
            f"{shape_phrase(d.loc[worst])}.")


def interval_widening(n_positions: int, *, alpha: float, new_alpha: float) -> float:
    """Factor by which the half-width of a Student-t interval of a mean over ``n_positions`` positions
    changes when its level goes from ``1 - alpha`` to ``1 - new_alpha``:
    ``t_{1 - new_alpha/2, n-1} / t_{1 - alpha/2, n-1}`` (:func:`moeaudit.stats.t_critical`); the standard
    error does not change. ``ValueError`` for fewer than two positions or a level outside (0, 1)."""
    if isinstance(n_positions, bool) or int(n_positions) != n_positions or n_positions < 2:
        raise ValueError(f"n_positions must be a whole number >= 2, got {n_positions!r}")
    return t_critical(new_alpha, n_positions - 1) / t_critical(alpha, n_positions - 1)


def check_06_progressive_ablation_2(answer, *, n_positions: int, alpha: float, new_alpha: float = 0.01) -> AnswerCheck:
    """Exercise 2 of the progressive-ablation chapter: the factor by which every interval's half-width
    is multiplied at level ``new_alpha`` (:func:`interval_widening`), right within 0.005 (the page prints
    two decimals). ``ValueError`` for an answer that is not a number or a bad ``n_positions``."""
    return check_answer(answer, interval_widening(n_positions, alpha=alpha, new_alpha=new_alpha),
                        what="the factor on the intervals' half-widths", tolerance=0.005)
