"""Statistics for paired ablation audits.

Every test is delegated to SciPy, statsmodels or pingouin; the few quantities that no
library computes (the exact confidence interval of Cohen's d_z, the matched-pairs
rank-biserial correlation used to give the Wilcoxon test a direction) are written out in
the docstring of the function that computes them and are checked against hand
computations in ``tests/test_stats.py``.

All arithmetic is float64. Functions take keyword-only options and return tidy pandas
objects in the style of pingouin: one function per test, one row per test.

Conventions
-----------
For one cell of the audit (one model, layer and ranking criterion) there are ``n`` token
positions. At each position the expert ranked highest by the criterion and the expert
ranked lowest were ablated in turn, giving loss changes ``high`` and ``low``. The analysis
is on the paired differences ``D = high - low``: a valid criterion predicts ``D > 0``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pingouin
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

__all__ = [
    "CORRECTIONS",
    "cohens_dz",
    "dz_confidence_interval",
    "min_detectable_dz",
    "required_n",
    "tost_from_t",
    "paired_effect",
    "summary_effect",
    "correct_family",
    "audit_table",
    "family_verdicts",
    "spearman",
    "spearman_defined",
    "critical_spearman_rho",
    "dz_difference_ci",
    "jzs_bayes_factor",
    "jeffreys_label",
    "JEFFREYS_SCALE",
]

#: Multiple-comparison corrections applied by :func:`audit_table`: column suffix ->
#: ``statsmodels.stats.multitest.multipletests`` method name.
CORRECTIONS: dict[str, str] = {"bonf": "bonferroni", "holm": "holm", "bh": "fdr_bh"}


def _as_float_array(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _paired_differences(high, low) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = _as_float_array(high, "high")
    lo = _as_float_array(low, "low")
    if h.shape != lo.shape:
        raise ValueError(f"high and low must have the same length, got {h.size} and {lo.size}")
    return h, lo, h - lo


def cohens_dz(d_values, *, ddof: int = 1) -> float:
    """Cohen's d_z of paired differences: ``mean(D) / std(D, ddof=ddof)``.

    ``ddof=1`` (the sample standard deviation) is the usual definition and the one used
    throughout this package; it satisfies ``d_z = t / sqrt(n)`` for the paired t statistic.
    ``ddof=0`` reproduces the statistic stored by the authors' per-token scripts
    (``d_z(ddof=0) = d_z(ddof=1) * sqrt(n / (n - 1))``).
    """
    d = _as_float_array(d_values, "d_values")
    sd = float(np.std(d, ddof=ddof))
    if d.size <= ddof or sd == 0.0:
        raise ValueError("Cohen's d_z needs at least two distinct values")
    return float(np.mean(d)) / sd


def dz_confidence_interval(dz: float, n: int, *, ci: float = 0.95) -> tuple[float, float]:
    """Exact confidence interval for Cohen's d_z (``ddof=1``) from the noncentral t.

    Method ("pivoting the noncentral t", Steiger & Fouladi 1997; Cumming & Finch 2001):
    with ``t = d_z * sqrt(n)`` and ``df = n - 1``, ``t`` follows a noncentral t
    distribution with noncentrality ``lambda = delta_z * sqrt(n)``. The bounds are the
    noncentralities ``lambda_L`` and ``lambda_U`` that solve

        ``nct.cdf(t, df, lambda_L) = 1 - (1 - ci) / 2``  and
        ``nct.cdf(t, df, lambda_U) = (1 - ci) / 2``,

    found with ``scipy.optimize.brentq`` on ``scipy.stats.nct.cdf``; the interval for d_z
    is ``(lambda_L / sqrt(n), lambda_U / sqrt(n))``. No library offers this interval
    (pingouin's ``compute_esci`` uses a normal approximation), hence the root finding.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError("ci must be between 0 and 1")
    if n < 3:
        raise ValueError("need n >= 3 for a confidence interval")
    df = n - 1
    t = float(dz) * np.sqrt(n)
    tail = (1.0 - ci) / 2.0

    def cdf(nc: float) -> float:
        value = float(stats.nct.cdf(t, df, nc))
        if np.isnan(value):  # SciPy can return NaN far in the tails, where cdf is 0 or 1
            value = 0.0 if nc > t else 1.0
        return value

    def solve(target: float) -> float:
        def f(nc: float) -> float:
            return cdf(nc) - target

        # the interval for lambda is about t -+ z * sqrt(1 + t^2 / (2 df)); start wider
        width = 10.0 * np.sqrt(1.0 + t * t / (2.0 * df))
        lo, hi = t - width, t + width
        # nct.cdf(t, df, nc) decreases in nc: widen the bracket until it changes sign
        while f(lo) < 0.0:
            lo -= width
        while f(hi) > 0.0:
            hi += width
        return optimize.brentq(f, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=500)

    return solve(1.0 - tail) / np.sqrt(n), solve(tail) / np.sqrt(n)


@functools.lru_cache(maxsize=4096)  # a deterministic root search, asked for the same (n, alpha) in every cell
def min_detectable_dz(n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |d_z| a two-sided paired t test at level ``alpha`` detects with ``power``.

    ``statsmodels.stats.power.TTestPower().solve_power(nobs=n, alpha=alpha, power=power)``.
    """
    return float(np.asarray(TTestPower().solve_power(
        effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided"
    )).reshape(-1)[0])


def required_n(dz: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Number of pairs a two-sided paired t test at ``alpha`` needs to detect ``dz``.

    ``statsmodels.stats.power.TTestPower().solve_power(effect_size=dz, ...)``; not rounded.
    """
    return float(np.asarray(TTestPower().solve_power(
        effect_size=abs(dz), nobs=None, alpha=alpha, power=power, alternative="two-sided"
    )).reshape(-1)[0])


def tost_from_t(t: float, n: int, *, bound_d: float = 0.2) -> float:
    """TOST p-value for ``|delta_z| < bound_d`` from a paired t statistic and ``n`` alone.

    For summaries that store only ``t`` and ``n``. With the bounds ``-+bound_d * sd`` in raw
    units (``sd`` treated as known, as in :func:`paired_effect`), the two one-sided
    statistics are ``t_low = t + bound_d * sqrt(n)`` and ``t_upp = t - bound_d * sqrt(n)``
    with ``n - 1`` degrees of freedom, and

        ``p_tost = max(t_dist.sf(t_low, n - 1), t_dist.cdf(t_upp, n - 1))``

    (``scipy.stats.t``). No library function takes a t statistic as input; the test suite
    checks that this equals ``statsmodels``' ``ttost_paired`` on raw data.
    """
    shift = bound_d * np.sqrt(n)
    df = n - 1
    return float(max(stats.t.sf(t + shift, df), stats.t.cdf(t - shift, df)))


def paired_effect(
    high,
    low,
    *,
    alpha: float = 0.05,
    n_tests: int = 1,
    tost_bound_d: float = 0.2,
    power: float = 0.8,
    ci: float = 0.95,
    zero_method: str = "wilcox",
    wilcoxon_method: str = "auto",
) -> pd.DataFrame:
    """All per-cell statistics of the audit for paired differences ``D = high - low``.

    Returns a one-row DataFrame with columns

    - ``n``, ``n_zero`` (number of ``D == 0``), ``mean_d``, ``median_d``,
      ``sd_d`` (``ddof=1``);
    - ``cohens_dz`` = ``mean_d / sd_d`` (``ddof=1``), with ``dz_ci_low``, ``dz_ci_high``
      the exact ``ci`` interval of :func:`dz_confidence_interval` (``ci_level``);
    - ``t``, ``dof``, ``p_t``: ``scipy.stats.ttest_rel(high, low)``, two-sided;
    - ``W``, ``p_W``: ``scipy.stats.wilcoxon(high, low, zero_method=zero_method,
      correction=False, method=wilcoxon_method)``, two-sided. With the defaults
      (``zero_method="wilcox"``: zero differences are dropped; ``method="auto"``) SciPy
      computes the exact null distribution when there are at most 50 differences and
      neither ties nor zeros, and otherwise the normal approximation (for n = 200 always
      the normal approximation, without continuity correction). ``W`` is the smaller of
      the two signed-rank sums, as in SciPy. ``wilcoxon_method`` records the method
      requested;
    - ``rank_biserial`` = ``(R+ - R-) / (R+ + R-)``, the matched-pairs rank-biserial
      correlation (Kerby 2014), where ``R+`` and ``R-`` are the sums of the signed ranks
      of the positive and negative differences (``R+`` is SciPy's one-sided
      ``wilcoxon(D, alternative="greater")`` statistic, ``R-`` the same for ``-D``). Its
      sign is the direction of the Wilcoxon test;
    - ``alpha_corrected`` = ``alpha / n_tests`` (Bonferroni, as in the paper);
      ``sig_t`` = ``p_t < alpha_corrected``; ``sig_W`` = ``p_W < alpha_corrected``;
      ``same_sign`` = ``sign(mean_d) == sign(rank_biserial) != 0``; ``sig_dual`` =
      ``sig_t and sig_W and same_sign`` (the paper's rule: a cell counts only if the t
      and Wilcoxon tests agree);
    - ``tost_bound_d``, ``tost_low``, ``tost_upp``, ``p_tost``, ``equivalent``: two
      one-sided t tests (``statsmodels.stats.weightstats.ttost_paired``) of
      ``H0: |E D| >= tost_bound_d * sd_d`` against ``|E D| < tost_bound_d * sd_d``. The
      bounds are set in d_z units and converted to raw units with the observed ``sd_d``
      (``tost_low = -tost_bound_d * sd_d``, ``tost_upp = +tost_bound_d * sd_d``), which
      treats ``sd_d`` as known, as is customary. ``equivalent`` =
      ``p_tost < alpha_corrected``: the effect is demonstrably inside ``±tost_bound_d``;
    - ``power``, ``mde_dz``: the smallest |d_z| that a two-sided paired t test at level
      ``alpha_corrected`` detects with probability ``power`` at this ``n``
      (``statsmodels.stats.power.TTestPower().solve_power``).
    """
    h, lo, d = _paired_differences(high, low)
    n = int(d.size)
    if n < 3:
        raise ValueError("need at least 3 pairs")
    if n_tests < 1:
        raise ValueError("n_tests must be >= 1")
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:
        raise ValueError("all paired differences are equal; d_z is undefined")
    mean = float(np.mean(d))
    dz = mean / sd
    dz_lo, dz_hi = dz_confidence_interval(dz, n, ci=ci)

    tt = stats.ttest_rel(h, lo, alternative="two-sided")
    wx = stats.wilcoxon(h, lo, zero_method=zero_method, correction=False,
                        alternative="two-sided", method=wilcoxon_method)
    r_plus = float(stats.wilcoxon(d, zero_method=zero_method, alternative="greater",
                                  method=wilcoxon_method).statistic)
    r_minus = float(stats.wilcoxon(-d, zero_method=zero_method, alternative="greater",
                                   method=wilcoxon_method).statistic)
    rank_biserial = (r_plus - r_minus) / (r_plus + r_minus)

    alpha_c = alpha / n_tests
    p_t = float(tt.pvalue)
    p_w = float(wx.pvalue)
    same_sign = bool(np.sign(mean) != 0 and np.sign(mean) == np.sign(rank_biserial))

    bound = tost_bound_d * sd
    p_tost = float(ttost_paired(h, lo, -bound, bound)[0])

    mde = min_detectable_dz(n, alpha=alpha_c, power=power)

    row = {
        "n": n,
        "n_zero": int(np.sum(d == 0.0)),
        "mean_d": mean,
        "median_d": float(np.median(d)),
        "sd_d": sd,
        "cohens_dz": dz,
        "dz_ci_low": float(dz_lo),
        "dz_ci_high": float(dz_hi),
        "ci_level": float(ci),
        "t": float(tt.statistic),
        "dof": n - 1,
        "p_t": p_t,
        "W": float(wx.statistic),
        "p_W": p_w,
        "wilcoxon_method": wilcoxon_method,
        "rank_biserial": float(rank_biserial),
        "alpha_corrected": float(alpha_c),
        "sig_t": p_t < alpha_c,
        "sig_W": p_w < alpha_c,
        "same_sign": same_sign,
        "sig_dual": bool(p_t < alpha_c and p_w < alpha_c and same_sign),
        "tost_bound_d": float(tost_bound_d),
        "tost_low": -bound,
        "tost_upp": bound,
        "p_tost": p_tost,
        "equivalent": p_tost < alpha_c,
        "power": float(power),
        "mde_dz": mde,
    }
    return pd.DataFrame([row])


def summary_effect(
    t: float,
    n: int,
    *,
    p_W: float,
    same_sign: bool,
    alpha: float = 0.05,
    n_tests: int = 1,
    tost_bound_d: float = 0.2,
    power: float = 0.8,
    ci: float = 0.95,
) -> pd.DataFrame:
    """The statistics of :func:`paired_effect` that a stored summary (``t``, ``n``, ``p_W``)
    still determines, for cells whose per-position records were not released.

    ``cohens_dz = t / sqrt(n)`` (the ddof=1 d_z, since ``t = mean / (sd / sqrt(n))``);
    ``dz_ci_low``/``dz_ci_high`` from :func:`dz_confidence_interval`;
    ``p_t = 2 * scipy.stats.t.sf(|t|, n - 1)``; ``p_tost`` from :func:`tost_from_t`;
    ``mde_dz`` from :func:`min_detectable_dz`. The direction of the Wilcoxon test is not
    recoverable from a stored two-sided statistic, so the caller states it with
    ``same_sign`` (say what was assumed). Returns a one-row DataFrame with the columns of
    :func:`paired_effect` that these determine: ``n``, ``cohens_dz``, ``dz_ci_low``,
    ``dz_ci_high``, ``ci_level``, ``t``, ``dof``, ``p_t``, ``p_W``, ``alpha_corrected``,
    ``sig_t``, ``sig_W``, ``same_sign``, ``sig_dual``, ``tost_bound_d``, ``p_tost``,
    ``equivalent``, ``power``, ``mde_dz``.
    """
    n = int(n)
    t = float(t)
    dz = t / np.sqrt(n)
    lo, hi = dz_confidence_interval(dz, n, ci=ci)
    p_t = float(2.0 * stats.t.sf(abs(t), n - 1))
    alpha_c = alpha / n_tests
    p_tost = tost_from_t(t, n, bound_d=tost_bound_d)
    p_W = float(p_W)
    return pd.DataFrame([{
        "n": n, "cohens_dz": dz, "dz_ci_low": float(lo), "dz_ci_high": float(hi),
        "ci_level": float(ci), "t": t, "dof": n - 1, "p_t": p_t, "p_W": p_W,
        "alpha_corrected": float(alpha_c), "sig_t": p_t < alpha_c, "sig_W": p_W < alpha_c,
        "same_sign": bool(same_sign),
        "sig_dual": bool(p_t < alpha_c and p_W < alpha_c and same_sign),
        "tost_bound_d": float(tost_bound_d), "p_tost": p_tost, "equivalent": p_tost < alpha_c,
        "power": float(power), "mde_dz": min_detectable_dz(n, alpha=alpha_c, power=power),
    }])


@contextlib.contextmanager
def _frozen_heap():
    """statsmodels' ``multipletests(method="holm")`` calls ``gc.collect()`` on every call, which
    costs ~0.3 s with a model and its records in memory (a full book calls it hundreds of times).
    ``gc.freeze()`` moves the existing objects out of the collector's view for the block, so that
    collection only scans what was allocated since; ``gc.unfreeze()`` puts them back."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def correct_family(
    table: pd.DataFrame,
    *,
    family: Sequence[str] | None = ("model",),
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Add multiple-comparison corrections to a table of cells with ``p_t``, ``p_W``.

    ``table`` has one row per cell and the columns ``p_t``, ``p_W`` and ``same_sign``
    (whether the t and Wilcoxon tests point the same way). Families are the groups of the
    ``family`` columns (``None`` or empty: the whole table). Returns a copy with, for each
    correction ``c`` in :data:`CORRECTIONS` (``bonf`` = Bonferroni, ``holm`` = Holm
    step-down, ``bh`` = Benjamini-Hochberg; ``statsmodels.stats.multitest.multipletests``
    within each family, separately for ``p_t`` and ``p_W``): ``p_t_c``, ``p_W_c``
    (adjusted p-values), ``sig_t_c``, ``sig_W_c`` (adjusted p < ``alpha``) and
    ``sig_dual_c`` (``sig_t_c and sig_W_c and same_sign``).
    """
    fam = [] if family is None else list(family)
    missing = [c for c in [*fam, "p_t", "p_W", "same_sign"] if c not in table.columns]
    if missing:
        raise KeyError(f"table lacks columns {missing}")
    out = table.copy()
    fam_keys = (out.groupby(fam, sort=False, observed=True).ngroup() if fam
                else pd.Series(0, index=out.index))
    same = out["same_sign"].astype(bool)
    for suffix, method in CORRECTIONS.items():
        for p in ("p_t", "p_W"):
            adj = pd.Series(np.nan, index=out.index, dtype=np.float64)
            for _, idx in fam_keys.groupby(fam_keys).groups.items():
                with _frozen_heap():
                    adj.loc[idx] = multipletests(out.loc[idx, p].to_numpy(dtype=np.float64),
                                                 alpha=alpha, method=method)[1]
            out[f"{p}_{suffix}"] = adj
        out[f"sig_t_{suffix}"] = out[f"p_t_{suffix}"] < alpha
        out[f"sig_W_{suffix}"] = out[f"p_W_{suffix}"] < alpha
        out[f"sig_dual_{suffix}"] = out[f"sig_t_{suffix}"] & out[f"sig_W_{suffix}"] & same
    return out


def audit_table(
    records: pd.DataFrame,
    *,
    by: Sequence[str] = ("model", "layer", "metric"),
    high_col: str = "delta_high",
    low_col: str = "delta_low",
    family: Sequence[str] | None = ("model",),
    alpha: float = 0.05,
    tost_bound_d: float = 0.2,
    power: float = 0.8,
    ci: float = 0.95,
) -> pd.DataFrame:
    """:func:`paired_effect` for every cell of ``records``, with family-wise corrections.

    ``records`` holds one row per token position; cells are the groups of ``by`` (kept in
    order of first appearance). Cells are grouped into multiple-comparison families by the
    ``family`` columns (a subset of ``by``; ``None`` or empty: all cells form one family).
    Each cell is tested with ``n_tests`` = the number of cells in its family, so
    ``alpha_corrected``, ``sig_*`` and ``equivalent`` use the Bonferroni level
    ``alpha / family_size``, and ``mde_dz`` is the minimum detectable effect at that level.

    Added columns: ``family_size``, and the corrected p-values and verdicts of
    :func:`correct_family` for each correction ``c`` in :data:`CORRECTIONS` (``bonf`` =
    Bonferroni, ``holm`` = Holm, ``bh`` = Benjamini-Hochberg): ``p_t_c``, ``p_W_c``,
    ``sig_t_c``, ``sig_W_c``, ``sig_dual_c``.
    """
    by = list(by)
    fam = [] if family is None else list(family)
    if not set(fam) <= set(by):
        raise ValueError(f"family columns {fam} must be among by={by}")
    missing = [c for c in [*by, high_col, low_col] if c not in records.columns]
    if missing:
        raise KeyError(f"records lacks columns {missing}")

    cells = records[by].drop_duplicates().reset_index(drop=True)
    if fam:
        sizes = cells.groupby(fam, sort=False, observed=True)[by[0]].transform("size")
    else:
        sizes = pd.Series(len(cells), index=cells.index)
    cells["family_size"] = sizes.astype(int)

    grouped = records.groupby(by, sort=False, observed=True)
    rows = []
    for _, cell in cells.iterrows():
        key = tuple(cell[c] for c in by)
        g = grouped.get_group(key)
        res = paired_effect(
            g[high_col].to_numpy(), g[low_col].to_numpy(), alpha=alpha,
            n_tests=int(cell["family_size"]), tost_bound_d=tost_bound_d, power=power, ci=ci,
        )
        rows.append(res)
    out = pd.concat([cells, pd.concat(rows, ignore_index=True)], axis=1)
    return correct_family(out, family=fam, alpha=alpha)


def spearman(
    x,
    y,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    method: str = "BCa",
) -> pd.DataFrame:
    """Spearman rank correlation with a paired bootstrap confidence interval.

    ``rho`` and ``p`` (two-sided) are ``scipy.stats.spearmanr(x, y)``. The interval is
    ``scipy.stats.bootstrap((x, y), paired=True)``: positions are resampled with their
    (x, y) pairs kept together, ``n_boot`` resamples, ``method`` (default bias-corrected
    and accelerated), generator ``numpy.random.default_rng(seed)``. The statistic of each
    resample is Spearman's rho as the Pearson correlation of the average ranks
    (``scipy.stats.pearsonr(rankdata(a), rankdata(b))``, which is how ``spearmanr`` defines
    it), computed for all resamples at once (``vectorized=True``).

    Returns a one-row DataFrame: ``n``, ``rho``, ``p``, ``ci_low``, ``ci_high``,
    ``ci_level``, ``n_boot``, ``ci_method``.
    """
    xa = _as_float_array(x, "x")
    ya = _as_float_array(y, "y")
    if xa.shape != ya.shape:
        raise ValueError("x and y must have the same length")
    res = stats.spearmanr(xa, ya)

    def rho(a, b, axis=-1):
        return stats.pearsonr(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis=axis).statistic

    boot = stats.bootstrap((xa, ya), rho, paired=True, vectorized=True, n_resamples=n_boot,
                           confidence_level=ci, method=method, rng=np.random.default_rng(seed))
    return pd.DataFrame([{
        "n": int(xa.size),
        "rho": float(res.statistic),
        "p": float(res.pvalue),
        "ci_low": float(boot.confidence_interval.low),
        "ci_high": float(boot.confidence_interval.high),
        "ci_level": float(ci),
        "n_boot": int(n_boot),
        "ci_method": method,
    }])


def jzs_bayes_factor(d_values, *, r: float = 0.707) -> float:
    """JZS Bayes factor BF10 for a paired t test on the differences ``d_values``.

    ``t`` is the one-sample t statistic of ``D`` against 0 (``scipy.stats.ttest_1samp``,
    identical to the paired t), and ``BF10 = pingouin.bayesfactor_ttest(t, n, paired=True,
    r=r)``: a Cauchy(0, r) prior on the standardised effect under H1 (Rouder et al.
    2009). ``BF10 > 1`` favours an effect, ``BF10 < 1`` favours the null.
    """
    d = _as_float_array(d_values, "d_values")
    if d.size < 2:
        raise ValueError("need at least 2 differences")
    t = float(stats.ttest_1samp(d, 0.0).statistic)
    return float(pingouin.bayesfactor_ttest(t, int(d.size), paired=True, r=r))


def spearman_defined(x, y) -> tuple[float, float, int]:
    """Spearman's rho and its two-sided p-value over the pairs where both values are finite.

    ``scipy.stats.spearmanr`` on the finite pairs; ``(nan, nan, n)`` when rho is undefined:
    fewer than 3 finite pairs or a constant column (for example an expert metric that is NaN for
    never-selected experts, or a layer where every value ties). Returns ``(rho, p, n)``, ``n`` the
    number of finite pairs used. ``ValueError`` if ``x`` and ``y`` differ in length.
    """
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(xa.size)
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan"), float("nan"), n
    res = stats.spearmanr(xa, ya)
    return float(res.statistic), float(res.pvalue), n


def critical_spearman_rho(n: int, *, alpha: float = 0.05) -> float:
    """Smallest |rho| that a two-sided test of Spearman's rho calls significant at ``alpha``.

    Uses the t approximation that ``scipy.stats.spearmanr`` uses for its p-value,
    ``t = rho * sqrt((n - 2) / (1 - rho^2))`` with ``n - 2`` degrees of freedom, solved for rho:
    ``rho_crit = t_crit / sqrt(n - 2 + t_crit^2)`` with ``t_crit`` the ``1 - alpha/2`` quantile of
    Student's t (``scipy.stats.t.ppf``). NaN for ``n < 4``; ``ValueError`` unless 0 < alpha < 1.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n < 4:
        return float("nan")
    t = float(stats.t.ppf(1 - alpha / 2, n - 2))
    return t / float(np.sqrt(n - 2 + t * t))


def dz_difference_ci(d1, d2, *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> tuple[float, float]:
    """Paired-bootstrap confidence interval of ``d_z(d1) - d_z(d2)``.

    ``d1`` and ``d2`` are paired differences measured at the same positions (for example the
    paired effects of one cell under two ablation definitions); positions are resampled with both
    values together (``scipy.stats.bootstrap(paired=True)``, ``n_boot`` resamples, generator
    ``numpy.random.default_rng(seed)``), ``d_z = mean / std(ddof=1)``. BCa interval, or the
    percentile interval where BCa is degenerate. ``(0.0, 0.0)`` when ``d1`` and ``d2`` are
    identical. ``ValueError`` for different lengths or fewer than 3 positions.
    """
    a, b = _as_float_array(d1, "d1"), _as_float_array(d2, "d2")
    if a.shape != b.shape:
        raise ValueError(f"d1 and d2 must have the same length, got {a.size} and {b.size}")
    if a.size < 3:
        raise ValueError(f"need at least 3 positions, got {a.size}")
    if np.array_equal(a, b):
        return 0.0, 0.0

    def diff(x, y, axis=-1):
        return (np.mean(x, axis=axis) / np.std(x, axis=axis, ddof=1)
                - np.mean(y, axis=axis) / np.std(y, axis=axis, ddof=1))

    kw = dict(paired=True, vectorized=True, n_resamples=n_boot, confidence_level=ci)
    with warnings.catch_warnings():
        warnings.simplefilter("error", stats.DegenerateDataWarning)
        try:
            res = stats.bootstrap((a, b), diff, method="BCa", rng=np.random.default_rng(seed), **kw)
        except stats.DegenerateDataWarning:
            res = stats.bootstrap((a, b), diff, method="percentile", rng=np.random.default_rng(seed), **kw)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


#: Jeffreys' (1961) evidence categories for BF10, as tabulated by Lee and Wagenmakers (2013):
#: (lower bound, label), the first bound that BF10 exceeds gives the label.
JEFFREYS_SCALE: tuple[tuple[float, str], ...] = (
    (100, "extreme H1"), (30, "very strong H1"), (10, "strong H1"), (3, "moderate H1"), (1, "anecdotal H1"),
    (1 / 3, "anecdotal H0"), (1 / 10, "moderate H0"), (1 / 30, "strong H0"), (1 / 100, "very strong H0"),
    (0, "extreme H0"),
)


def jeffreys_label(bf10: float) -> str:
    """The evidence category of a Bayes factor BF10 on Jeffreys' scale (:data:`JEFFREYS_SCALE`):
    ``"moderate H0"`` for 1/10 < BF10 <= 1/3, and so on. ``ValueError`` for a negative or NaN BF10."""
    bf = float(bf10)
    if not bf >= 0:
        raise ValueError(f"a Bayes factor is >= 0, got {bf10}")
    return next(label for bound, label in JEFFREYS_SCALE if bf > bound or bound == 0)


def family_verdicts(table: pd.DataFrame, *, by: str = "model", alpha: float = 0.05) -> pd.DataFrame:
    """One row per multiple-comparison family of an :func:`audit_table` result: how many of its
    cells pass each test and correction, and how large the effects are.

    Columns: ``by``, ``cells`` (the family size), ``alpha_bonferroni`` (``alpha / cells``, the
    paper's per-cell level), ``uncorrected_t`` (cells with p_t < ``alpha``),
    ``uncorrected_t_positive`` (those with d_z > 0, the direction a valid ranking predicts), ``bonferroni_t``,
    ``bonferroni_W``, ``bonferroni_dual`` (the paper's rule: t and Wilcoxon both significant at the
    Bonferroni level, same sign), ``holm_dual``, ``bh_dual``, ``equivalent`` (TOST supports
    |d_z| below the bound), ``max_abs_dz``, ``share_positive`` (fraction of cells with d_z > 0:
    a valid ranking makes d_z positive), ``min_detectable_dz`` (at the Bonferroni level).
    ``KeyError`` if ``table`` lacks the columns :func:`audit_table` adds.
    """
    need = [by, "family_size", "p_t", "cohens_dz", "sig_t_bonf", "sig_W_bonf", "sig_dual_bonf", "sig_dual_holm",
            "sig_dual_bh", "equivalent", "mde_dz"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise KeyError(f"table lacks columns {missing}")
    out = table.groupby(by, sort=False).agg(
        cells=("family_size", "first"),
        uncorrected_t=("p_t", lambda p: int((p < alpha).sum())),
        bonferroni_t=("sig_t_bonf", "sum"), bonferroni_W=("sig_W_bonf", "sum"),
        bonferroni_dual=("sig_dual_bonf", "sum"), holm_dual=("sig_dual_holm", "sum"), bh_dual=("sig_dual_bh", "sum"),
        equivalent=("equivalent", "sum"),
        max_abs_dz=("cohens_dz", lambda d: float(d.abs().max())),
        share_positive=("cohens_dz", lambda d: float((d > 0).mean())),
        min_detectable_dz=("mde_dz", "first"),
    ).reset_index()
    positive_hits = table[(table.p_t < alpha) & (table.cohens_dz > 0)].groupby(by, sort=False).size()
    out.insert(4, "uncorrected_t_positive", out[by].map(positive_hits).fillna(0).astype(int))
    out.insert(2, "alpha_bonferroni", alpha / out["cells"])
    int_cols = ["cells", "uncorrected_t", "bonferroni_t", "bonferroni_W", "bonferroni_dual", "holm_dual", "bh_dual",
                "equivalent"]
    out[int_cols] = out[int_cols].astype(int)
    return out
