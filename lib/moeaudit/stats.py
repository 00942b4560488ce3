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

Degenerate cells
----------------
A cell whose data cannot be tested -- fewer than :data:`MIN_PAIRS` pairs, a NaN or infinite
loss change, paired differences that are all equal (``sd(D) = 0``, so ``d_z`` and the t
statistic are undefined) or equal up to rounding (``sd(D)`` at most :data:`ROUNDING_UNITS`
rounding units of the precision the values were computed in, :func:`rounding_unit`, where ``d_z``
would measure rounding noise) -- is not an error: the per-cell functions return their usual row with
the undefined statistics set to NaN, every significance flag False, and the cause in a ``reason``
column (``""`` for a cell that was tested). Descriptive columns that are still defined (``n``,
``mean_d``, ``sd_d``, ...) are filled. Such a cell still counts in the size of its
multiple-comparison family (see :func:`audit_table` and :func:`correct_family`). Wrong arguments
-- inputs of different lengths, ``n_tests < 1``, a level outside (0, 1) -- still raise
``ValueError`` naming the parameter.
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
    "holm",
    "one_way_anova",
    "t_critical",
    "MIN_PAIRS",
    "untested_cells",
    "cohens_dz",
    "dz_confidence_interval",
    "min_detectable_dz",
    "required_n",
    "t_test_power",
    "sign_test",
    "sign_test_power",
    "sign_test_detectable_share",
    "binomial_excess",
    "tost_from_t",
    "tost_min_p",
    "min_equivalence_bound",
    "binomial_upper_tail",
    "paired_effect",
    "summary_effect",
    "correct_family",
    "audit_table",
    "family_verdicts",
    "spearman",
    "spearman_defined",
    "critical_spearman_rho",
    "min_detectable_spearman",
    "MAX_EXACT_SPEARMAN_N",
    "spearman_exact",
    "spearman_exact_critical",
    "spearman_exact_power",
    "spearman_min_detectable",
    "dz_difference_ci",
    "jzs_bayes_factor",
    "jeffreys_label",
    "JEFFREYS_SCALE",
    "linear_trend",
    "min_detectable_slope",
    "two_sample_difference",
    "min_detectable_difference",
    "anova_min_detectable_f",
]

#: Multiple-comparison corrections applied by :func:`audit_table`: column suffix ->
#: ``statsmodels.stats.multitest.multipletests`` method name.
CORRECTIONS: dict[str, str] = {"bonf": "bonferroni", "holm": "holm", "bh": "fdr_bh"}


#: Fewest pairs for which :func:`paired_effect` tests a cell: the exact interval of d_z
#: (:func:`dz_confidence_interval`) needs ``n - 1 >= 2`` degrees of freedom.
MIN_PAIRS = 3
#: A cell whose differences spread by at most this many rounding units of a typical pair is untested
#: (:func:`rounding_unit`): its d_z would measure the noise of the arithmetic, not an effect.
ROUNDING_UNITS = 8
#: the precisions a cell's values may have been computed in, with their machine epsilon
PRECISIONS = {"float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps),
              "bfloat16": 2.0 ** -7, "float16": float(np.finfo(np.float16).eps)}


def rounding_unit(high, low, precision: str = "float64") -> float:
    """The rounding noise of one paired difference D = high - low computed in ``precision``: the
    machine epsilon of ``precision`` times the median over pairs of ``max(|high|, |low|)`` (the
    median, so that one large pair does not set the scale of a cell of ordinary ones). ``ValueError``
    for an unknown precision.

    >>> rounding_unit([1000.0, 1000.0, 1000.0], [1000.0, 1000.0, 2.0], "float32") == 1000 * 2.0 ** -23
    True
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {tuple(PRECISIONS)}")
    h, lo = _float_vector(high), _float_vector(low)
    return PRECISIONS[precision] * float(np.median(np.maximum(np.abs(h), np.abs(lo)))) if h.size else 0.0


def _precision_of(*arrays) -> str:
    """The precision values arrive in: float16 or float32 arrays keep theirs; anything else is float64."""
    names = {getattr(np.asarray(a).dtype, "name", "") for a in arrays}
    for p in ("float16", "float32"):
        if names == {p}:
            return p
    return "float64"


def _float_vector(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same length, got {a.size} and {b.size}")


def _check_level(value, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``0 < value < 1`` (a level, a power, a confidence)."""
    if not 0.0 < float(value) < 1.0:  # NaN fails as well
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_n_tests(n_tests) -> None:
    if not n_tests >= 1:
        raise ValueError(f"n_tests must be >= 1, got {n_tests!r}")


def _nonfinite_reason(*arrays: np.ndarray, what: str = "paired differences") -> str:
    bad = ~np.all([np.isfinite(a) for a in arrays], axis=0) if arrays[0].size else np.zeros(0, bool)
    k = int(bad.sum())
    return f"{k} of {bad.size} {what} {'is' if k == 1 else 'are'} NaN or infinite" if k else ""


def _degenerate_reason(h: np.ndarray, lo: np.ndarray, d: np.ndarray, precision: str = "float64") -> str:
    """Why the paired differences ``d`` cannot be tested, or ``""`` when they can."""
    if d.size == 0:
        return "no pairs"
    bad = _nonfinite_reason(h, lo)
    if bad:
        return bad
    if d.size < MIN_PAIRS:
        return f"too few pairs (n = {d.size}; the tests need at least {MIN_PAIRS})"
    if not np.all(np.isfinite(d)):
        return "a paired difference overflows (high - low is not finite although both are)"
    with np.errstate(over="ignore", invalid="ignore"):
        sd = float(np.std(d, ddof=1))
    if not np.isfinite(sd):
        return (f"the spread of the {d.size} paired differences overflows (sd(D) is not finite although every "
                "difference is): d_z and the tests would be computed from infinities")
    unit = rounding_unit(h, lo, precision)
    if 0.0 < sd <= ROUNDING_UNITS * unit:
        return (f"the {d.size} paired differences are equal up to {precision} rounding (sd(D) = {sd:.2g}, at most "
                f"{ROUNDING_UNITS} rounding units of {unit:.2g}: {precision}'s epsilon times the median pair's "
                "largest |value|): d_z would measure rounding noise")
    if sd == 0.0:
        if d[0] == 0.0:
            return (f"all {d.size} paired differences are zero: sd(D) = 0, so d_z and the t-test are undefined, and "
                    "the Wilcoxon test has no nonzero difference to rank")
        return (f"all {d.size} paired differences are equal (D = {d[0]:.6g}): sd(D) = 0, so d_z and the t-test are "
                "undefined and the dual rule cannot be applied")
    return ""


def _paired_differences(high, low) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, lo = _float_vector(high), _float_vector(low)
    _same_length(h, lo, "high and low")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing difference is reported, not warned
        return h, lo, h - lo


def cohens_dz(d_values, *, ddof: int = 1) -> float:
    """Cohen's d_z of paired differences: ``mean(D) / std(D, ddof=ddof)``.

    ``ddof=1`` (the sample standard deviation) is the usual definition and the one used
    throughout this package; it satisfies ``d_z = t / sqrt(n)`` for the paired t statistic.
    ``ddof=0`` reproduces the statistic stored by the authors' per-token scripts
    (``d_z(ddof=0) = d_z(ddof=1) * sqrt(n / (n - 1))``).

    NaN where d_z is undefined: at most ``ddof`` values, a NaN or infinite value, or all values
    equal (``sd = 0``). ``ValueError`` for a negative ``ddof``.
    """
    if ddof < 0:
        raise ValueError(f"ddof must be >= 0, got {ddof!r}")
    d = _float_vector(d_values)
    if d.size <= ddof or not np.all(np.isfinite(d)):
        return float("nan")
    sd = float(np.std(d, ddof=ddof))
    return float(np.mean(d)) / sd if sd > 0.0 else float("nan")


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

    ``(nan, nan)`` for a NaN or infinite ``dz`` (an undefined effect has no interval).
    ``ValueError`` unless ``0 < ci < 1`` and ``n >= 3``.
    """
    _check_level(ci, "ci")
    if n < MIN_PAIRS:
        raise ValueError(f"n must be >= {MIN_PAIRS} for a confidence interval, got {n}")
    if not np.isfinite(dz):
        return float("nan"), float("nan")
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

    ``statsmodels.stats.power.TTestPower().solve_power(nobs=n, alpha=alpha, power=power)``. A
    ``power`` at or below ``alpha`` is reached by every effect, d_z = 0 included (the power at
    d_z = 0 is ``alpha``): the answer is 0.
    """
    if power <= alpha:
        return 0.0
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


def t_test_power(dz: float, n: int, *, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t test at level ``alpha`` against a true effect ``dz``.

    Parameters
    ----------
    dz : float
        True standardised effect (Cohen's d_z = mean / sd of the paired differences; unitless).
        Its sign does not matter.
    n : int
        Number of pairs (positions), at least 2.
    alpha : float
        Per-test level, in (0, 1) (for example a Bonferroni level ``0.05 / m``).

    Returns
    -------
    float
        ``P(|T| > t_{1-alpha/2, n-1})`` with ``T`` noncentral t on ``n - 1`` degrees of freedom and
        noncentrality ``dz * sqrt(n)``, i.e. the probability that the test rejects;
        ``statsmodels.stats.power.TTestPower().power(effect_size=dz, nobs=n, alpha=alpha,
        alternative="two-sided")``. Equals ``alpha`` at ``dz = 0``.

    Raises
    ------
    ValueError
        For ``n < 2``, a non-finite ``dz`` or ``alpha`` outside (0, 1).

    Examples
    --------
    >>> round(t_test_power(0.5, 10, alpha=0.05), 3)
    0.293
    >>> round(t_test_power(0.0, 50, alpha=0.01), 3)
    0.01
    """
    _check_level(alpha, "alpha")
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not np.isfinite(dz):
        raise ValueError(f"dz must be finite, got {dz!r}")
    return float(np.asarray(TTestPower().power(effect_size=abs(float(dz)), nobs=int(n), alpha=alpha,
                                               alternative="two-sided")).reshape(-1)[0])


def sign_test(n_positive: int, n_negative: int) -> float:
    """Two-sided sign test: is the share of positive values different from one half?

    Parameters
    ----------
    n_positive, n_negative : int
        Counts of strictly positive and strictly negative values (ties, i.e. zeros, are left out
        beforehand, as the sign test prescribes). Non-negative integers.

    Returns
    -------
    float
        The two-sided exact binomial p-value of ``n_positive`` successes in
        ``n_positive + n_negative`` trials with success probability 1/2
        (``scipy.stats.binomtest(n_positive, n_positive + n_negative, 0.5).pvalue``). NaN when
        both counts are 0 (no value with a sign).

    Raises
    ------
    ValueError
        For a negative or non-integer count.

    Examples
    --------
    7 increases and 3 decreases: ``2 * (C(10,7) + C(10,8) + C(10,9) + C(10,10)) / 2**10 = 352/1024``.

    >>> sign_test(7, 3)
    0.34375
    >>> sign_test(5, 5)
    1.0
    """
    for v, name in ((n_positive, "n_positive"), (n_negative, "n_negative")):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    n = int(n_positive) + int(n_negative)
    if n == 0:
        return float("nan")
    return float(stats.binomtest(int(n_positive), n, 0.5).pvalue)


def _check_count(n, name: str = "n") -> None:
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")


def sign_test_power(share: float, n: int, *, alpha: float = 0.05) -> float:
    """Power of the two-sided exact sign test (:func:`sign_test`) with ``n`` signed values when a
    value is positive with probability ``share``.

    The test rejects at ``k`` positives when its p-value ``min(1, 2 * F(min(k, n - k)))`` is below
    ``alpha`` (``F`` the Binomial(n, 1/2) CDF, the same rule as ``sign_test(k, n - k) < alpha``);
    the power is ``sum over rejected k of C(n, k) share^k (1 - share)^(n - k)``
    (``scipy.stats.binom``). A probability, unitless.

    Raises
    ------
    ValueError
        For ``n < 1``, ``share`` outside [0, 1] or ``alpha`` outside (0, 1).

    Examples
    --------
    With 10 values at the 5% level only k = 0, 1, 9, 10 reject (p = 2·11/1024 = 0.021 at k = 9,
    2·56/1024 = 0.109 at k = 8); at share 1/2 the power is the test's size, ``2·11/1024``.

    >>> round(sign_test_power(0.5, 10), 6)
    0.021484
    """
    _check_count(n)
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    _check_level(alpha, "alpha")
    k = np.arange(int(n) + 1)
    p = np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(k, int(n) - k), int(n), 0.5))
    return float(stats.binom.pmf(k[p < alpha], int(n), float(share)).sum())


def sign_test_detectable_share(n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest share of positive values, above one half, that the two-sided exact sign test with
    ``n`` signed values detects with probability ``power`` at level ``alpha``.

    Solves ``sign_test_power(q, n, alpha=alpha) = power`` for ``q`` in (1/2, 1]
    (``scipy.optimize.brentq``; the power rises with ``q`` there). By symmetry ``1 - q`` is the
    detectable share below one half. A share, unitless; NaN when even ``q = 1`` (every value
    positive) does not reach ``power`` (too few values for the level).

    Raises
    ------
    ValueError
        For ``n < 1`` or ``alpha``/``power`` outside (0, 1).

    Examples
    --------
    With 10 values at the 5% level the test rejects at k >= 9, so ``q^10 + 10 q^9 (1 - q)`` (plus the
    negligible lower tail) must reach 0.8: q = 0.917.

    >>> round(sign_test_detectable_share(10), 3)
    0.917
    >>> round(sign_test_detectable_share(200, alpha=0.05 / 8), 2)
    0.63
    """
    _check_count(n)
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    if sign_test_power(1.0, n, alpha=alpha) < power:
        return float("nan")
    return float(optimize.brentq(lambda q: sign_test_power(q, n, alpha=alpha) - power, 0.5, 1.0, xtol=1e-10))


def binomial_excess(k: int, n: int, p: float) -> float:
    """One-sided binomial tail: the probability of ``k`` or more successes in ``n`` trials of
    probability ``p``, the p-value of "more tests reject than chance allows".

    Parameters
    ----------
    k : int
        Observed count (for example cells with uncorrected p < alpha), ``0 <= k <= n``.
    n : int
        Number of trials (tests), ``n >= 1``.
    p : float
        Success probability under the null (for example the per-test level alpha), in (0, 1).

    Returns
    -------
    float
        ``P(X >= k)`` for ``X ~ Binomial(n, p)``:
        ``scipy.stats.binomtest(k, n, p, alternative="greater").pvalue``. Exact for independent
        tests; tests that share data (cells on the same positions) make it indicative only.

    Raises
    ------
    ValueError
        For ``n < 1``, ``k`` outside ``[0, n]`` or ``p`` outside (0, 1).

    Examples
    --------
    2 or more of 3 at p = 0.5: ``(3 + 1) / 8``.

    >>> binomial_excess(2, 3, 0.5)
    0.5
    >>> binomial_excess(0, 10, 0.05)
    1.0
    """
    _check_level(p, "p")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not (isinstance(k, (int, np.integer)) and 0 <= k <= n):
        raise ValueError(f"k must be an integer in [0, n={n}], got {k!r}")
    return float(stats.binomtest(int(k), int(n), p, alternative="greater").pvalue)


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


def _check_pairs(n, name: str = "n") -> None:
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 2):
        raise ValueError(f"{name} must be an integer >= 2 (pairs), got {n!r}")


def tost_min_p(n: int, *, bound_d: float = 0.2) -> float:
    """Smallest p-value that TOST of ``|delta_z| < bound_d`` can give with ``n`` pairs, whatever the data.

    The TOST p-value of :func:`tost_from_t` (and of :func:`paired_effect`, whose bounds
    ``-+bound_d * sd`` treat the observed ``sd`` as known) is
    ``max(t_dist.sf(t + s, n - 1), t_dist.sf(s - t, n - 1))`` with ``s = bound_d * sqrt(n)``. Both
    terms are monotone in the t statistic and meet at ``t = 0``, so its smallest value over all
    possible data is ``t_dist.sf(bound_d * sqrt(n), n - 1)`` (``scipy.stats.t``). When this is not
    below the level of the test, no data can show equivalence: "not equivalent" then says nothing
    about the data.

    Parameters
    ----------
    n : int
        Number of pairs, at least 2.
    bound_d : float
        Equivalence bound in d_z units (unitless), at least 0.

    Returns
    -------
    float
        The smallest attainable ``p_tost``, in (0, 0.5].

    Raises
    ------
    ValueError
        For ``n < 2`` or a non-integer ``n``, and for a negative or NaN ``bound_d``.

    Examples
    --------
    With ``n = 200`` and ``bound_d = 0.2``, ``s = 0.2 * sqrt(200) = 2.828``; the upper tail of t on
    199 degrees of freedom beyond it is about 0.0026, above a Bonferroni level 0.05 / 20 = 0.0025:

    >>> round(tost_min_p(200, bound_d=0.2), 5)
    0.00258
    >>> tost_min_p(200, bound_d=0.2) < 0.05 / 20
    False
    >>> tost_min_p(10, bound_d=0.0)
    0.5
    """
    _check_pairs(n)
    if not bound_d >= 0:
        raise ValueError(f"bound_d must be >= 0, got {bound_d!r}")
    return float(stats.t.sf(float(bound_d) * np.sqrt(n), n - 1))


def min_equivalence_bound(n: int, *, alpha: float = 0.05) -> float:
    """Smallest equivalence bound (in d_z units) for which TOST at level ``alpha`` can pass with ``n`` pairs.

    TOST rejects both one-sided nulls only if ``bound_d * sqrt(n)`` exceeds the critical value
    ``t_{1 - alpha, n - 1}`` even at ``t = 0`` (see :func:`tost_min_p`), so the bound must exceed
    ``t_{1 - alpha, n - 1} / sqrt(n)`` (``scipy.stats.t.ppf``). A bound at or below it cannot be
    shown for any data; a bound above it can, for data with a t statistic near 0.

    Parameters
    ----------
    n : int
        Number of pairs, at least 2.
    alpha : float
        Level of each one-sided test, in (0, 1) (for example a Bonferroni level ``0.05 / m``).

    Returns
    -------
    float
        ``t_{1 - alpha, n - 1} / sqrt(n)``, unitless (d_z units).

    Raises
    ------
    ValueError
        For ``n < 2`` or a non-integer ``n``, and for ``alpha`` outside (0, 1).

    Examples
    --------
    >>> round(min_equivalence_bound(200, alpha=0.0025), 4)
    0.2007
    >>> round(min_equivalence_bound(200, alpha=0.01), 4)
    0.1658
    """
    _check_pairs(n)
    _check_level(alpha, "alpha")
    return float(stats.t.ppf(1.0 - alpha, n - 1) / np.sqrt(n))


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """Exact upper tail ``P(X >= k)`` of ``X ~ Binomial(n, p)``: is ``k`` more than chance gives?

    For ``n`` tests each with a false-positive rate ``p`` under its null, ``k`` significant results
    exceed chance at level ``a`` if ``P(X >= k) < a``:
    ``P(X >= k) = sum_{j=k}^{n} C(n, j) p^j (1 - p)^(n - j)``, the one-sided p-value
    ``scipy.stats.binomtest(k, n, p, alternative="greater").pvalue``. The tests are taken as
    independent; positively dependent tests (cells that share positions) spread the count wider
    than the binomial, so the tail is then too small and only indicative.

    Parameters
    ----------
    k : int
        Observed count, ``0 <= k <= n``.
    n : int
        Number of tests, at least 1.
    p : float
        Probability of a success under the null, in (0, 1) (a per-test level).

    Returns
    -------
    float
        ``P(X >= k)``, in (0, 1]; 1 for ``k = 0``.

    Raises
    ------
    ValueError
        For a non-integer or negative count, ``k > n``, ``n < 1`` or ``p`` outside (0, 1).

    Examples
    --------
    Two or more heads in three fair tosses: ``(3 + 1) / 8``.

    >>> binomial_upper_tail(2, 3, 0.5)
    0.5
    >>> round(binomial_upper_tail(10, 60, 0.05), 5)
    0.00074
    """
    for v, name in ((k, "k"), (n, "n")):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if n < 1 or k > n:
        raise ValueError(f"need 1 <= n and 0 <= k <= n, got k = {k!r}, n = {n!r}")
    _check_level(p, "p")
    return float(stats.binomtest(int(k), int(n), float(p), alternative="greater").pvalue)


def binomial_upper_detectable_share(n: int, p: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest success probability that the one-sided exact binomial test of :func:`binomial_upper_tail`
    (``n`` trials, null probability ``p``, reject when ``P(X >= k) < alpha``) detects with probability
    ``power``: the minimum detectable share of a null result.

    The test rejects at ``k >= k_crit``, the smallest ``k`` with ``P(X >= k | p) < alpha``; its power
    at a true probability ``q`` is ``P(X >= k_crit | q) = sum_{j >= k_crit} C(n, j) q^j (1 - q)^(n - j)``
    (``scipy.stats.binom.sf``), which rises with ``q``; the detectable ``q`` solves power(q) = ``power``
    (``scipy.optimize.brentq``). A probability, unitless; NaN when even ``k = n`` successes do not
    reach ``alpha`` (``p^n >= alpha``: too few trials for the level).

    Raises
    ------
    ValueError
        For ``n`` not an integer >= 1 or ``p``, ``alpha`` or ``power`` outside (0, 1).

    Examples
    --------
    Two trials at null probability 0.1: ``P(X >= 2) = 0.01 < 0.05 <= P(X >= 1) = 0.19``, so the test
    rejects only at two successes and the power is ``q^2``; it reaches 0.8 at ``q = sqrt(0.8)``.

    >>> round(binomial_upper_detectable_share(2, 0.1), 6)
    0.894427
    >>> import math; math.isnan(binomial_upper_detectable_share(3, 0.5))  # 1/8 >= 0.05
    True
    """
    _check_count(n)
    for v, name in ((p, "p"), (alpha, "alpha"), (power, "power")):
        _check_level(v, name)
    k = np.arange(int(n) + 1)
    tail = stats.binom.sf(k - 1, int(n), float(p))  # P(X >= k)
    reject = np.flatnonzero(tail < alpha)
    if reject.size == 0:
        return float("nan")
    k_crit = int(reject[0])
    return float(optimize.brentq(lambda q: stats.binom.sf(k_crit - 1, int(n), q) - power, 0.0, 1.0, xtol=1e-12))


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
    precision: str | None = None,
) -> pd.DataFrame:
    """All per-cell statistics of the audit for paired differences ``D = high - low``.

    ``precision`` is the floating-point precision the values were computed in (a key of
    :data:`PRECISIONS`; ``None``: the dtype of the arrays given, float32 or float16 arrays keeping
    theirs and anything else read as float64). It sets only the rounding criterion below.

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
      (``statsmodels.stats.power.TTestPower().solve_power``);
    - ``reason``: ``""`` when the cell was tested, else why it could not be (see below).

    **Degenerate cells.** When the pairs cannot be tested -- none, fewer than
    :data:`MIN_PAIRS`, a NaN or infinite value in ``high`` or ``low`` or in their difference, all
    differences equal (``sd_d = 0``: ``d_z = mean / 0`` and the t statistic are undefined, and
    with all ``D = 0`` Wilcoxon has no nonzero difference to rank), or equal up to rounding
    (``0 < sd_d <= ROUNDING_UNITS * rounding_unit(high, low, precision)``: the differences' own spread
    against the rounding noise of a typical pair) -- no test is run and no exception is raised: the
    row has the same columns, ``reason`` states the cause, the tests' statistics, p-values, the
    d_z interval and ``p_tost`` are NaN, and ``sig_t``, ``sig_W``, ``same_sign``, ``sig_dual``
    and ``equivalent`` are False. ``n``, ``n_zero``, ``dof`` (``n - 1``), ``alpha_corrected``,
    ``power``, ``ci_level``, ``tost_bound_d`` are always filled; ``mean_d``, ``median_d`` (and
    ``sd_d``, ``tost_low``, ``tost_upp`` from two pairs on) when the values are finite;
    ``mde_dz`` from :data:`MIN_PAIRS` pairs on.

    ``ValueError`` (naming the parameter) for arguments that no data can make valid: ``high`` and
    ``low`` of different lengths, ``n_tests < 1``, ``alpha``, ``ci`` or ``power`` outside (0, 1),
    a negative or NaN ``tost_bound_d``, an unknown ``zero_method`` or ``precision``.
    """
    precision = _precision_of(high, low) if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {tuple(PRECISIONS)}")
    h, lo, d = _paired_differences(high, low)
    _check_level(alpha, "alpha")
    _check_level(ci, "ci")
    _check_level(power, "power")
    _check_n_tests(n_tests)
    if not tost_bound_d >= 0:
        raise ValueError(f"tost_bound_d must be >= 0, got {tost_bound_d!r}")
    if zero_method not in ("wilcox", "pratt", "zsplit"):
        raise ValueError(f"zero_method must be 'wilcox', 'pratt' or 'zsplit', got {zero_method!r}")
    n = int(d.size)
    alpha_c = alpha / n_tests
    reason = _degenerate_reason(h, lo, d, precision)
    finite = n > 0 and bool(np.all(np.isfinite(d)))
    mean = float(np.mean(d)) if finite else float("nan")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing spread is reported in `reason`
        sd = float(np.std(d, ddof=1)) if finite and n > 1 else float("nan")
    bound = tost_bound_d * sd
    nan = float("nan")
    row = {
        "n": n, "n_zero": int(np.sum(d == 0.0)), "mean_d": mean,
        "median_d": float(np.median(d)) if finite else nan, "sd_d": sd,
        "cohens_dz": nan, "dz_ci_low": nan, "dz_ci_high": nan, "ci_level": float(ci),
        "t": nan, "dof": max(n - 1, 0), "p_t": nan, "W": nan, "p_W": nan, "wilcoxon_method": wilcoxon_method,
        "rank_biserial": nan, "alpha_corrected": float(alpha_c),
        "sig_t": False, "sig_W": False, "same_sign": False, "sig_dual": False,
        "tost_bound_d": float(tost_bound_d), "tost_low": -bound, "tost_upp": bound, "p_tost": nan,
        "equivalent": False, "power": float(power),
        "mde_dz": min_detectable_dz(n, alpha=alpha_c, power=power) if n >= MIN_PAIRS else nan,
        "reason": reason,
    }
    if reason:
        return pd.DataFrame([row])

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

    p_t = float(tt.pvalue)
    p_w = float(wx.pvalue)
    same_sign = bool(np.sign(mean) != 0 and np.sign(mean) == np.sign(rank_biserial))
    p_tost = float(ttost_paired(h, lo, -bound, bound)[0])

    row.update({
        "cohens_dz": dz, "dz_ci_low": float(dz_lo), "dz_ci_high": float(dz_hi),
        "t": float(tt.statistic), "p_t": p_t, "W": float(wx.statistic), "p_W": p_w,
        "rank_biserial": float(rank_biserial),
        "sig_t": p_t < alpha_c, "sig_W": p_w < alpha_c, "same_sign": same_sign,
        "sig_dual": bool(p_t < alpha_c and p_w < alpha_c and same_sign),
        "p_tost": p_tost, "equivalent": p_tost < alpha_c,
    })
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
    ``equivalent``, ``power``, ``mde_dz``, ``reason``.

    A summary that cannot be tested (``n`` below :data:`MIN_PAIRS`, or a NaN or infinite ``t``)
    gives the degenerate row of :func:`paired_effect`: NaN statistics, False flags and the cause
    in ``reason`` (``""`` otherwise). A NaN ``p_W`` only makes ``sig_W`` (and ``sig_dual``)
    False. ``ValueError`` for ``n_tests < 1`` or ``alpha``, ``ci``, ``power`` outside (0, 1).
    """
    _check_level(alpha, "alpha")
    _check_level(ci, "ci")
    _check_level(power, "power")
    _check_n_tests(n_tests)
    n = int(n)
    t = float(t)
    alpha_c = alpha / n_tests
    p_W = float(p_W)
    nan = float("nan")
    reason = (f"too few pairs (n = {n}; the tests need at least {MIN_PAIRS})" if n < MIN_PAIRS else
              "the stored t statistic is NaN or infinite" if not np.isfinite(t) else "")
    if reason:
        return pd.DataFrame([{
            "n": n, "cohens_dz": nan, "dz_ci_low": nan, "dz_ci_high": nan, "ci_level": float(ci), "t": t,
            "dof": max(n - 1, 0), "p_t": nan, "p_W": p_W, "alpha_corrected": float(alpha_c), "sig_t": False,
            "sig_W": False, "same_sign": False, "sig_dual": False, "tost_bound_d": float(tost_bound_d),
            "p_tost": nan, "equivalent": False, "power": float(power),
            "mde_dz": min_detectable_dz(n, alpha=alpha_c, power=power) if n >= MIN_PAIRS else nan, "reason": reason,
        }])
    dz = t / np.sqrt(n)
    lo, hi = dz_confidence_interval(dz, n, ci=ci)
    p_t = float(2.0 * stats.t.sf(abs(t), n - 1))
    p_tost = tost_from_t(t, n, bound_d=tost_bound_d)
    return pd.DataFrame([{
        "n": n, "cohens_dz": dz, "dz_ci_low": float(lo), "dz_ci_high": float(hi),
        "ci_level": float(ci), "t": t, "dof": n - 1, "p_t": p_t, "p_W": p_W,
        "alpha_corrected": float(alpha_c), "sig_t": p_t < alpha_c, "sig_W": p_W < alpha_c,
        "same_sign": bool(same_sign),
        "sig_dual": bool(p_t < alpha_c and p_W < alpha_c and same_sign),
        "tost_bound_d": float(tost_bound_d), "p_tost": p_tost, "equivalent": p_tost < alpha_c,
        "power": float(power), "mde_dz": min_detectable_dz(n, alpha=alpha_c, power=power), "reason": "",
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

    **Cells that could not be tested** (NaN p-value, see :func:`paired_effect`) stay in their
    family: the family size ``m`` is the number of its rows, as in the paper, whose family is
    the design's cells (metrics x layers) fixed before any data are seen. Such a cell enters the
    correction as a hypothesis that is not rejected (its p-value is taken as 1), and its adjusted
    p-value is reported as NaN with its flags False. For Bonferroni this keeps the level
    ``alpha / m``; for Holm and Benjamini-Hochberg a p-value of 1 sorts last, so the other
    cells are corrected exactly as the procedure on ``m`` hypotheses corrects them. Dropping
    the cell instead would shrink ``m`` because of the data and loosen every other cell's
    level; keeping it is the conservative choice, and the family-wise (Bonferroni, Holm) and
    false-discovery (Benjamini-Hochberg) guarantees hold as stated for ``m`` hypotheses.
    """
    fam = [] if family is None else list(family)
    missing = [c for c in [*fam, "p_t", "p_W", "same_sign"] if c not in table.columns]
    if missing:
        raise KeyError(f"table lacks columns {missing}")
    _check_level(alpha, "alpha")
    out = table.copy()
    fam_keys = (out.groupby(fam, sort=False, observed=True).ngroup() if fam
                else pd.Series(0, index=out.index))
    same = out["same_sign"].fillna(False).astype(bool)
    for suffix, method in CORRECTIONS.items():
        for p in ("p_t", "p_W"):
            adj = pd.Series(np.nan, index=out.index, dtype=np.float64)
            for _, idx in fam_keys.groupby(fam_keys).groups.items():
                raw = out.loc[idx, p].to_numpy(dtype=np.float64)
                untested = np.isnan(raw)
                with _frozen_heap():
                    fixed = multipletests(np.where(untested, 1.0, raw), alpha=alpha, method=method)[1]
                adj.loc[idx] = np.where(untested, np.nan, fixed)
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
    precision: str = "float32",
) -> pd.DataFrame:
    """:func:`paired_effect` for every cell of ``records``, with family-wise corrections.

    ``precision``: the precision the loss changes were computed in (the engine computes losses in
    float32 whatever the model's dtype), which sets the rounding criterion of :func:`paired_effect`.

    ``records`` holds one row per token position; cells are the groups of ``by`` (kept in
    order of first appearance). Cells are grouped into multiple-comparison families by the
    ``family`` columns (a subset of ``by``; ``None`` or empty: all cells form one family).
    Each cell is tested with ``n_tests`` = the number of cells in its family, so
    ``alpha_corrected``, ``sig_*`` and ``equivalent`` use the Bonferroni level
    ``alpha / family_size``, and ``mde_dz`` is the minimum detectable effect at that level.

    A cell that cannot be tested (too few pairs, a NaN loss change, all differences equal; see
    :func:`paired_effect`) keeps its row, named by its ``by`` columns, with NaN statistics,
    False flags and the cause in ``reason``; the other rows are exactly what they would be with
    it tested. It counts in ``family_size`` (the family is the design's cells, not the cells
    that turned out testable; :func:`correct_family` explains why and how). An unexpected error
    in a cell propagates with a note naming the cell. :func:`untested_cells` lists the
    untested rows.

    Rows marked ``premise_excluded`` (an ablation whose premise failed, :func:`moeaudit.audit.paired_cells`)
    are left out of their cell's tests; the cell keeps its row and its place in the family, and
    ``n_premise_excluded`` counts them (a cell with every pair excluded is untested: "no pairs").

    Added columns: ``family_size``, ``reason``, ``n_premise_excluded`` where ``records`` have the
    ``premise_excluded`` column, and the corrected p-values and verdicts of
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
    if records.empty:
        raise ValueError("records is empty: there is no cell to test (a top-1 model has no pairs; see "
                         "moeaudit.audit.paired_cells)")
    unnamed = [c for c in by if records[c].isna().any()]
    if unnamed:
        raise ValueError(f"records have missing values in the cell columns {unnamed}: every row must name its cell")

    cells = records[by].drop_duplicates().reset_index(drop=True)
    if fam:
        sizes = cells.groupby(fam, sort=False, observed=True)[by[0]].transform("size")
    else:
        sizes = pd.Series(len(cells), index=cells.index)
    cells["family_size"] = sizes.astype(int)

    marked = "premise_excluded" in records.columns
    grouped = records.groupby(by, sort=False, observed=True)
    rows, excluded_counts = [], []
    for _, cell in cells.iterrows():
        key = tuple(cell[c] for c in by)
        g = grouped.get_group(key)
        if marked:
            drop = g["premise_excluded"].fillna(True).astype(bool)
            excluded_counts.append(int(drop.sum()))
            g = g[~drop]
        try:
            res = paired_effect(
                g[high_col].to_numpy(), g[low_col].to_numpy(), alpha=alpha,
                n_tests=int(cell["family_size"]), tost_bound_d=tost_bound_d, power=power, ci=ci,
                precision=precision,
            )
        except Exception as err:
            err.add_note(f"in the cell {_cell_name(dict(zip(by, key)))}")
            raise
        rows.append(res)
    out = pd.concat([cells, pd.concat(rows, ignore_index=True)], axis=1)
    if marked:  # pairs left out for a failed premise (moeaudit.audit.paired_cells)
        out.insert(out.columns.get_loc("n") + 1, "n_premise_excluded", excluded_counts)
    return correct_family(out, family=fam, alpha=alpha)


def _cell_name(keys: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in keys.items())


def untested_cells(table: pd.DataFrame, *, by: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of a statistics table (:func:`audit_table`, :func:`paired_effect`,
    :func:`summary_effect`, :func:`spearman`) that could not be tested, with a ``cell`` column
    naming each (``"model m, ranking r, layer 3"``, from the ``by`` columns, by default those
    of ``model``, ``experiment``, ``variant``, ``set``, ``ranking``, ``metric``, ``predictor``,
    ``layer`` that the table has) and its ``reason``. A row is untested when its ``reason`` is
    a non-empty string, or, in a table without ``reason``, when ``p_t`` is NaN. Empty (with the
    same columns) when every cell was tested."""
    if "reason" in table.columns:
        mask = table["reason"].fillna("").astype(str).str.len() > 0
    elif "p_t" in table.columns:
        mask = table["p_t"].isna()
    else:
        raise KeyError("table has neither a reason nor a p_t column")
    keys = list(by) if by is not None else [c for c in ("model", "experiment", "variant", "set", "ranking",
                                                         "metric", "predictor", "layer") if c in table.columns]
    out = table[mask].copy()
    reasons = out["reason"] if "reason" in out.columns else pd.Series("p_t is NaN", index=out.index)
    out["cell"] = [_cell_name(dict(zip(keys, vals))) for vals in out[keys].itertuples(index=False)]
    out["reason"] = reasons
    return out


#: above this many pairs :func:`spearman` gives the analytic interval instead of the bootstrap (whose
#: BCa jackknife grows as n**2: 43 s and 2 GB at 10,000 pairs; benchmarks/bench_stats.py)
BOOTSTRAP_MAX_N = 2000


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
    it), computed in batches of about a million resampled values (``batch``), which bounds the memory.

    Above :data:`BOOTSTRAP_MAX_N` pairs the interval is analytic instead (``ci_method`` says which):
    Fisher's z = atanh(rho) with the standard error of Bonett and Wright (2000) for Spearman's rho,
    ``sqrt((1 + rho**2 / 2) / (n - 3))``, back-transformed with tanh; at such n the bootstrap's
    corrections are negligible, and its cost (quadratic in n for BCa) is not. It stays in seconds
    and far under 1 GB at a million pairs.

    Returns a one-row DataFrame: ``n``, ``rho``, ``p``, ``ci_low``, ``ci_high``,
    ``ci_level``, ``n_boot``, ``ci_method``, ``reason``.

    Where rho is undefined -- fewer than 3 pairs, a NaN or infinite value, or a constant ``x``
    or ``y`` (no ranks to correlate) -- ``rho``, ``p`` and the interval are NaN and ``reason``
    says why (``""`` otherwise); no exception. Where rho is defined but the bootstrap interval is
    not, the interval is NaN and ``reason`` says so. ``ValueError`` for ``x`` and ``y`` of different
    lengths or ``ci`` outside (0, 1).
    """
    xa, ya = _float_vector(x), _float_vector(y)
    _same_length(xa, ya, "x and y")
    _check_level(ci, "ci")
    nan = float("nan")
    reason = _nonfinite_reason(xa, ya, what="pairs")
    if not reason and xa.size < 3:
        reason = f"too few pairs (n = {xa.size}; Spearman's rho needs at least 3)"
    if not reason and (np.ptp(xa) == 0 or np.ptp(ya) == 0):
        reason = f"{'x' if np.ptp(xa) == 0 else 'y'} is constant: rho is undefined"
    if reason:
        return pd.DataFrame([{"n": int(xa.size), "rho": nan, "p": nan, "ci_low": nan, "ci_high": nan,
                              "ci_level": float(ci), "n_boot": int(n_boot), "ci_method": method, "reason": reason}])
    res = stats.spearmanr(xa, ya)
    if xa.size > BOOTSTRAP_MAX_N:
        r = float(res.statistic)
        if abs(r) < 1 - 1e-12:  # rounding leaves a perfect correlation at 1 - 2e-16
            half = stats.norm.ppf(0.5 + ci / 2) * np.sqrt((1 + r * r / 2) / (xa.size - 3))
            low, high, why = float(np.tanh(np.arctanh(r) - half)), float(np.tanh(np.arctanh(r) + half)), ""
        else:
            low = high = nan
            why = "a perfect rank correlation: the Fisher-z interval is undefined"
        return pd.DataFrame([{"n": int(xa.size), "rho": r, "p": float(res.pvalue), "ci_low": low, "ci_high": high,
                              "ci_level": float(ci), "n_boot": 0,
                              "ci_method": "Fisher z, Bonett-Wright standard error", "reason": why}])

    def rho(a, b, axis=-1):
        return stats.pearsonr(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis=axis).statistic

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # an undefined acceleration is reported in `reason`
        boot = stats.bootstrap((xa, ya), rho, paired=True, vectorized=True, n_resamples=n_boot,
                               confidence_level=ci, method=method, rng=np.random.default_rng(seed),
                               batch=max(1, int(1e6 // xa.size)))
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    why = "" if np.isfinite(low) and np.isfinite(high) else (
        "the bootstrap interval is undefined (resamples with a constant column, or a perfect correlation, "
        "leave rho or its acceleration undefined)")
    return pd.DataFrame([{
        "n": int(xa.size),
        "rho": float(res.statistic),
        "p": float(res.pvalue),
        "ci_low": low,
        "ci_high": high,
        "ci_level": float(ci),
        "n_boot": int(n_boot),
        "ci_method": method,
        "reason": why,
    }])


#: Largest Cauchy prior scale accepted by :func:`jzs_bayes_factor` (conventional scales are 0.5 to 1.414).
MAX_PRIOR_R = 10.0


def jzs_bayes_factor(d_values, *, r: float = 0.707) -> float:
    """JZS Bayes factor BF10 for a paired t test on the differences ``d_values``.

    ``t`` is the one-sample t statistic of ``D`` against 0 (``scipy.stats.ttest_1samp``,
    identical to the paired t), and ``BF10 = pingouin.bayesfactor_ttest(t, n, paired=True,
    r=r)``: a Cauchy(0, r) prior on the standardised effect under H1 (Rouder et al.
    2009). ``BF10 > 1`` favours an effect, ``BF10 < 1`` favours the null.

    NaN where the t statistic is undefined: fewer than 2 differences, a NaN or infinite value,
    or all differences equal (``sd = 0``); ``inf`` where ``t`` is so large that pingouin's integral
    underflows. ``ValueError`` for a prior scale outside ``(0, MAX_PRIOR_R]``.
    """
    if not 0 < r <= MAX_PRIOR_R:
        raise ValueError(f"r must be in (0, {MAX_PRIOR_R:g}] (the scale of the Cauchy prior in d_z units), got {r!r}")
    d = _float_vector(d_values)
    if d.size < 2 or not np.all(np.isfinite(d)) or float(np.std(d, ddof=1)) == 0.0:
        return float("nan")
    t = float(stats.ttest_1samp(d, 0.0).statistic)
    try:
        return float(pingouin.bayesfactor_ttest(t, int(d.size), paired=True, r=r))
    except (ZeroDivisionError, OverflowError):
        # pingouin's integral underflows for an overwhelming t; BF10 grows without bound in |t|
        return float("inf")


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


def min_detectable_spearman(n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest Spearman rho > 0 that a two-sided test at ``alpha`` detects with probability ``power``.

    Fisher's z approximation with the standard error of Bonett and Wright (2000) for Spearman's
    rho (the one :func:`spearman` uses for large n), ``se(rho) = sqrt((1 + rho**2 / 2) / (n - 3))``:
    the test rejects with probability about ``Phi(atanh(rho) / se(rho) - z_{1 - alpha/2})``, so the
    detectable rho solves ``atanh(rho) = (z_{1 - alpha/2} + z_power) * se(rho)``, found with
    ``scipy.optimize.brentq`` (``z`` quantiles from ``scipy.stats.norm.ppf``). A null result at ``n``
    pairs speaks only against correlations at least this large. NaN for ``n < 4``;
    ``ValueError`` unless ``0 < alpha < 1`` and ``0 < power < 1``.

    Examples
    --------
    >>> round(min_detectable_spearman(28), 4)  # z sum 2.8016, / sqrt(25)
    0.5365
    >>> bool(min_detectable_spearman(200) < min_detectable_spearman(50))
    True
    """
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    if n < 4:
        return float("nan")
    c = (float(stats.norm.ppf(1 - alpha / 2)) + float(stats.norm.ppf(power))) / float(np.sqrt(n - 3))
    return float(optimize.brentq(lambda r: np.arctanh(r) - c * np.sqrt(1 + r * r / 2), 0.0, 1 - 1e-15, xtol=1e-14))


def dz_difference_ci(d1, d2, *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> tuple[float, float]:
    """Paired-bootstrap confidence interval of ``d_z(d1) - d_z(d2)``.

    ``d1`` and ``d2`` are paired differences measured at the same positions (for example the
    paired effects of one cell under two ablation definitions); positions are resampled with both
    values together (``scipy.stats.bootstrap(paired=True)``, ``n_boot`` resamples, generator
    ``numpy.random.default_rng(seed)``), ``d_z = mean / std(ddof=1)``. BCa interval, or the
    percentile interval where BCa is degenerate. ``(0.0, 0.0)`` when ``d1`` and ``d2`` are
    identical (and d_z is defined). ``(nan, nan)`` where a d_z is undefined: fewer than
    :data:`MIN_PAIRS` positions, a NaN or infinite value, a constant ``d1`` or ``d2``, or so
    many ties that the resampled d_z are undefined too.
    ``ValueError`` for ``d1`` and ``d2`` of different lengths or ``ci`` outside (0, 1).
    """
    a, b = _float_vector(d1), _float_vector(d2)
    _same_length(a, b, "d1 and d2")
    _check_level(ci, "ci")
    if (a.size < MIN_PAIRS or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
            or np.ptp(a) == 0 or np.ptp(b) == 0):
        return float("nan"), float("nan")
    if np.array_equal(a, b):
        return 0.0, 0.0

    def diff(x, y, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):  # constant resamples give NaN, handled below
            return (np.mean(x, axis=axis) / np.std(x, axis=axis, ddof=1)
                    - np.mean(y, axis=axis) / np.std(y, axis=axis, ddof=1))

    kw = dict(paired=True, vectorized=True, n_resamples=n_boot, confidence_level=ci)
    with warnings.catch_warnings():
        warnings.simplefilter("error", stats.DegenerateDataWarning)
        try:
            res = stats.bootstrap((a, b), diff, method="BCa", rng=np.random.default_rng(seed), **kw)
        except stats.DegenerateDataWarning:
            try:
                res = stats.bootstrap((a, b), diff, method="percentile", rng=np.random.default_rng(seed), **kw)
            except stats.DegenerateDataWarning:  # resamples with a constant column: d_z undefined in them
                return float("nan"), float("nan")
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
    ``"moderate H0"`` for 1/10 < BF10 <= 1/3, and so on; ``"undefined"`` for a NaN BF10 (a cell
    whose Bayes factor is undefined, see :func:`jzs_bayes_factor`). ``ValueError`` for a
    negative BF10."""
    bf = float(bf10)
    if np.isnan(bf):
        return "undefined"
    if not bf >= 0:
        raise ValueError(f"a Bayes factor is >= 0, got {bf10}")
    return next(label for bound, label in JEFFREYS_SCALE if bf > bound or bound == 0)


def family_verdicts(table: pd.DataFrame, *, by: str = "model", alpha: float = 0.05) -> pd.DataFrame:
    """One row per multiple-comparison family of an :func:`audit_table` result: how many of its
    cells pass each test and correction, and how large the effects are.

    Columns: ``by``, ``cells`` (the family size, untested cells included), ``untested`` (cells
    that could not be tested, see :func:`untested_cells`; they pass nothing),
    ``alpha_bonferroni`` (``alpha / cells``, the paper's per-cell level), ``uncorrected_t``
    (cells with p_t < ``alpha``), ``uncorrected_t_positive`` (those with d_z > 0, the direction
    a valid ranking predicts), ``bonferroni_t``, ``bonferroni_W``, ``bonferroni_dual`` (the
    paper's rule: t and Wilcoxon both significant at the Bonferroni level, same sign),
    ``holm_dual``, ``bh_dual``, ``equivalent`` (TOST supports |d_z| below the bound),
    ``max_abs_dz`` (over the tested cells; NaN if none), ``share_positive`` (fraction of the
    *tested* cells with d_z > 0: a valid ranking makes d_z positive; NaN if none),
    ``min_detectable_dz`` (at the Bonferroni level, from the first cell where it is defined),
    ``tost_can_pass`` (whether TOST at the cells' bound and level could pass in some tested cell for
    *any* data, :func:`tost_min_p` below ``alpha_corrected``; when False, ``equivalent`` is 0 by
    design, not by the data; only when ``table`` has ``n``, ``tost_bound_d`` and
    ``alpha_corrected``, as :func:`audit_table` gives).
    ``KeyError`` if ``table`` lacks the columns :func:`audit_table` adds; ``ValueError`` if the
    groups of ``by`` are not the table's families (a group's cell count differs from its
    ``family_size``), since the counts and levels would describe neither.
    """
    need = [by, "family_size", "p_t", "cohens_dz", "sig_t_bonf", "sig_W_bonf", "sig_dual_bonf", "sig_dual_holm",
            "sig_dual_bh", "equivalent", "mde_dz"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise KeyError(f"table lacks columns {missing}")
    _check_level(alpha, "alpha")
    sizes = table.groupby(by, sort=False).agg(rows=("family_size", "size"), low=("family_size", "min"),
                                              high=("family_size", "max"))
    off = sizes[(sizes.low != sizes.high) | (sizes.low != sizes.rows)]
    if len(off):
        g = off.index[0]
        raise ValueError(f"the families of this table are not its {by!r} groups ({by} {g!r} has {off.rows.iloc[0]} "
                         f"cells but family sizes {off.low.iloc[0]}..{off.high.iloc[0]}); build it with "
                         f"audit_table(family=({by!r},)) or count verdicts by the family columns")
    untested = table.index.isin(untested_cells(table).index)
    table = table.assign(_untested=untested, _tested_dz=table.cohens_dz.where(~untested))
    flags = ["sig_t_bonf", "sig_W_bonf", "sig_dual_bonf", "sig_dual_holm", "sig_dual_bh", "equivalent"]
    table[flags] = table[flags].fillna(False).astype(bool)
    out = table.groupby(by, sort=False).agg(
        cells=("family_size", "first"),
        untested=("_untested", "sum"),
        uncorrected_t=("p_t", lambda p: int((p < alpha).sum())),
        bonferroni_t=("sig_t_bonf", "sum"), bonferroni_W=("sig_W_bonf", "sum"),
        bonferroni_dual=("sig_dual_bonf", "sum"), holm_dual=("sig_dual_holm", "sum"), bh_dual=("sig_dual_bh", "sum"),
        equivalent=("equivalent", "sum"),
        max_abs_dz=("_tested_dz", lambda d: float(d.abs().max())),
        share_positive=("_tested_dz", lambda d: float((d.dropna() > 0).mean()) if d.notna().any() else float("nan")),
        min_detectable_dz=("mde_dz", "first"),
    ).reset_index()
    positive_hits = table[(table.p_t < alpha) & (table.cohens_dz > 0)].groupby(by, sort=False).size()
    out.insert(5, "uncorrected_t_positive", out[by].map(positive_hits).fillna(0).astype(int))
    out.insert(3, "alpha_bonferroni", alpha / out["cells"])
    int_cols = ["cells", "untested", "uncorrected_t", "bonferroni_t", "bonferroni_W", "bonferroni_dual", "holm_dual",
                "bh_dual", "equivalent"]
    out[int_cols] = out[int_cols].astype(int)
    if {"n", "tost_bound_d", "alpha_corrected"} <= set(table.columns):
        tested = table[~table._untested & (table.n >= 2)]
        possible = pd.Series([tost_min_p(int(r.n), bound_d=float(r.tost_bound_d)) < float(r.alpha_corrected)
                              for r in tested.itertuples()], index=tested.index, dtype=bool)
        can = possible.groupby(tested[by], sort=False).any()
        out.insert(out.columns.get_loc("equivalent") + 1, "tost_can_pass",
                   out[by].map(can).fillna(False).astype(bool))
    return out


# --------------------------------------------------------------------------- trends and small-sample comparisons
# (used by the redundancy analysis, moeaudit.chapters.redundancy: a handful of trained models per setting)


def linear_trend(x, y, *, reference_slope: float = 0.0, ci: float = 0.95) -> dict:
    """Ordinary least-squares slope of ``y`` on ``x`` with its t interval and a test against a reference slope.

    The fit is ``scipy.stats.linregress(x, y)``: slope ``b = S_xy / S_xx``, standard error
    ``se = sqrt(SSE / (n - 2) / S_xx)``. The test of ``H0: slope = reference_slope`` uses
    ``t = (b - reference_slope) / se`` on ``n - 2`` degrees of freedom, two-sided
    (``p = 2 * scipy.stats.t.sf(|t|, n - 2)``); the interval is ``b ± t_{(1 + ci)/2, n - 2} * se``.

    Parameters
    ----------
    x, y : array-like of float, shape (n,)
        Predictor and response (units of ``y`` per unit of ``x`` for the slope). Finite values.
    reference_slope : float
        Slope under the null hypothesis (0: no trend).
    ci : float
        Confidence level of the interval, in (0, 1).

    Returns
    -------
    dict
        ``n``, ``df`` (``n - 2``), ``slope``, ``intercept``, ``stderr``, ``ci_low``, ``ci_high``,
        ``reference_slope``, ``t`` and ``p`` (against ``reference_slope``). With a perfect fit
        (``se = 0``) ``t`` is ±inf and ``p`` 0, or both NaN when the slope equals the reference.

    Raises
    ------
    ValueError
        For ``x`` and ``y`` of different lengths, fewer than 3 points, a non-finite value, a
        constant ``x`` (no slope to fit) or ``ci`` outside (0, 1).

    Examples
    --------
    ``x = [0, 1, 2, 3]``, ``y = [0, 1, 1, 3]``: ``S_xy = 4.5``, ``S_xx = 5``, slope 0.9,
    ``SSE = 0.7``, ``se = sqrt(0.35 / 5)``.

    >>> fit = linear_trend([0, 1, 2, 3], [0, 1, 1, 3])
    >>> round(fit["slope"], 6), round(fit["stderr"], 6), fit["df"]
    (0.9, 0.264575, 2)
    >>> round(linear_trend([0, 1, 2, 3], [0, 1, 1, 3], reference_slope=-1.0)["t"], 4)
    7.1813
    """
    xa, ya = _float_vector(x), _float_vector(y)
    _same_length(xa, ya, "x and y")
    _check_level(ci, "ci")
    if xa.size < 3:
        raise ValueError(f"a slope with an interval needs at least 3 points, got {xa.size}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError("x and y must be finite")
    if np.ptp(xa) == 0:
        raise ValueError("x is constant: there is no slope to fit")
    fit = stats.linregress(xa, ya)
    df = int(xa.size - 2)
    se, slope, ref = float(fit.stderr), float(fit.slope), float(reference_slope)
    if se > 0:
        t = (slope - ref) / se
        p = float(2.0 * stats.t.sf(abs(t), df))
    else:
        t = float("nan") if slope == ref else float(np.copysign(np.inf, slope - ref))
        p = float("nan") if slope == ref else 0.0
    half = float(stats.t.ppf(0.5 + ci / 2.0, df) * se)
    return {"n": int(xa.size), "df": df, "slope": slope, "intercept": float(fit.intercept), "stderr": se,
            "ci_low": slope - half, "ci_high": slope + half, "reference_slope": ref, "t": float(t), "p": p}


def _t_noncentrality(df: int, *, alpha: float, power: float) -> float:
    """Noncentrality ``delta`` at which a two-sided t test on ``df`` degrees of freedom at ``alpha``
    rejects with probability ``power``: ``nct.sf(c, df, delta) + nct.sf(c, df, -delta) = power``
    (the second term is ``P(T' < -c)`` by symmetry, where SciPy's ``nct.cdf`` can return NaN in the
    far tail), ``c = t_{1 - alpha/2, df}`` (``scipy.stats.nct``, root by ``scipy.optimize.brentq``);
    0 when ``power <= alpha``."""
    if power <= alpha:
        return 0.0
    crit = stats.t.ppf(1.0 - alpha / 2.0, df)

    def gap(delta):
        return stats.nct.sf(crit, df, delta) + stats.nct.sf(crit, df, -delta) - power

    hi = 1.0
    while gap(hi) < 0.0:  # power grows with delta: widen until the root is bracketed
        hi *= 2.0
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-10, rtol=1e-10, maxiter=500))


def min_detectable_slope(stderr: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true change of a slope that its two-sided t test detects with ``power``.

    For a least-squares slope on ``n`` points (``n - 2`` degrees of freedom) whose standard error
    is ``stderr``: ``delta * stderr``, where ``delta`` is the noncentrality at which the test at
    level ``alpha`` rejects with probability ``power``,
    ``P(|T'| > t_{1 - alpha/2, n - 2}) = power`` for ``T'`` noncentral t with ``n - 2`` degrees of
    freedom (``scipy.stats.nct``). The standard error is the fit's estimate, so the answer is
    the power at the observed scatter, not a design quantity. Units: those of the slope. 0 when
    ``power <= alpha``.

    Parameters
    ----------
    stderr : float
        Standard error of the slope, >= 0.
    n : int
        Number of points of the fit, at least 3.
    alpha : float
        Level of the two-sided test, in (0, 1) (for example a Bonferroni level ``0.05 / m``).
    power : float
        Target power, in (0, 1).

    Raises
    ------
    ValueError
        For ``n < 3``, a negative or non-finite ``stderr``, ``alpha`` or ``power`` outside (0, 1).

    Examples
    --------
    With many points the noncentrality tends to ``z_{0.975} + z_{0.8} = 2.8016``:

    >>> round(min_detectable_slope(1.0, 10**6, alpha=0.05, power=0.8), 3)
    2.802
    >>> round(min_detectable_slope(0.1, 8, alpha=0.05, power=0.8), 3)
    0.337
    """
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 3):
        raise ValueError(f"n must be an integer >= 3 (points of the fit), got {n!r}")
    if not (np.isfinite(stderr) and stderr >= 0):
        raise ValueError(f"stderr must be finite and >= 0, got {stderr!r}")
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    return _t_noncentrality(int(n) - 2, alpha=alpha, power=power) * float(stderr)


def two_sample_difference(a, b, *, ci: float = 0.95) -> dict:
    """Difference of two group means with the pooled-variance (Student) t test and interval.

    ``diff = mean(a) - mean(b)``; pooled standard deviation
    ``sd_pooled = sqrt(((n_a - 1) var(a) + (n_b - 1) var(b)) / (n_a + n_b - 2))`` (``ddof=1``);
    ``se = sd_pooled * sqrt(1/n_a + 1/n_b)``; ``t = diff / se`` on ``df = n_a + n_b - 2``;
    ``p`` two-sided (``scipy.stats.ttest_ind(a, b, equal_var=True)``); interval
    ``diff ± t_{(1 + ci)/2, df} * se``. Units: those of ``a`` and ``b``.

    Parameters
    ----------
    a, b : array-like of float
        The two groups (for example one value per trained model of two settings). Finite values.
    ci : float
        Confidence level of the interval, in (0, 1).

    Returns
    -------
    dict
        ``n_a``, ``n_b``, ``mean_a``, ``mean_b``, ``diff``, ``sd_pooled``, ``df``, ``t``, ``p``,
        ``ci_low``, ``ci_high``. Where there is no within-group spread to test against
        (``df < 1``, or ``sd_pooled = 0``) ``t``, ``p`` and the interval are NaN (and
        ``sd_pooled`` is NaN when ``df < 1``).

    Raises
    ------
    ValueError
        For an empty group, a non-finite value or ``ci`` outside (0, 1).

    Examples
    --------
    ``a = [1, 3]``, ``b = [4, 6]``: ``diff = -3``, ``sd_pooled = sqrt(2)``, ``se = sqrt(2)``,
    ``t = -2.1213`` on 2 degrees of freedom.

    >>> r = two_sample_difference([1, 3], [4, 6])
    >>> r["diff"], round(r["t"], 4), r["df"], round(r["p"], 4)
    (-3.0, -2.1213, 2, 0.1679)
    """
    xa, xb = _float_vector(a), _float_vector(b)
    _check_level(ci, "ci")
    if xa.size < 1 or xb.size < 1:
        raise ValueError(f"each group needs at least one value, got {xa.size} and {xb.size}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(xb))):
        raise ValueError("a and b must be finite")
    df = int(xa.size + xb.size - 2)
    diff = float(xa.mean() - xb.mean())
    nan = float("nan")
    out = {"n_a": int(xa.size), "n_b": int(xb.size), "mean_a": float(xa.mean()), "mean_b": float(xb.mean()),
           "diff": diff, "sd_pooled": nan, "df": df, "t": nan, "p": nan, "ci_low": nan, "ci_high": nan}
    if df < 1:
        return out
    ss = float(((xa - xa.mean()) ** 2).sum() + ((xb - xb.mean()) ** 2).sum())
    sd = float(np.sqrt(ss / df))
    out["sd_pooled"] = sd
    if sd == 0.0:
        return out
    se = sd * float(np.sqrt(1.0 / xa.size + 1.0 / xb.size))
    half = float(stats.t.ppf(0.5 + ci / 2.0, df) * se)
    res = stats.ttest_ind(xa, xb, equal_var=True)
    out.update(t=float(res.statistic), p=float(res.pvalue), ci_low=diff - half, ci_high=diff + half)
    return out


def min_detectable_difference(n_a: int, n_b: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest standardised difference of two means that the pooled two-sample t test detects.

    In units of the within-group standard deviation (Cohen's d): ``delta / sqrt(n_a n_b / (n_a + n_b))``,
    where ``delta`` is the noncentrality at which the two-sided test at ``alpha`` on
    ``n_a + n_b - 2`` degrees of freedom rejects with probability ``power`` (``scipy.stats.nct``).
    Multiply by the pooled standard deviation for the difference in the data's units. 0 when
    ``power <= alpha``.

    Parameters
    ----------
    n_a, n_b : int
        Group sizes, each at least 1, with ``n_a + n_b >= 3`` (one degree of freedom).
    alpha, power : float
        Level of the two-sided test and target power, each in (0, 1).

    Raises
    ------
    ValueError
        For group sizes that leave no degree of freedom, or a level outside (0, 1).

    Examples
    --------
    Large groups: ``(z_{0.975} + z_{0.8}) * sqrt(2 / n)``; two models per group: several SDs.

    >>> round(min_detectable_difference(10**6, 10**6) * (10**6 / 2) ** 0.5, 3)
    2.802
    >>> round(min_detectable_difference(2, 2, alpha=0.05), 2)
    5.65
    """
    for v, name in ((n_a, "n_a"), (n_b, "n_b")):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if n_a + n_b < 3:
        raise ValueError(f"n_a + n_b must be at least 3 (one degree of freedom), got {n_a} + {n_b}")
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    delta = _t_noncentrality(int(n_a + n_b - 2), alpha=alpha, power=power)
    return delta / float(np.sqrt(n_a * n_b / (n_a + n_b)))


def anova_min_detectable_f(n_groups: int, n_total: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest Cohen's f that a one-way ANOVA F test detects with ``power``.

    Cohen's ``f = sigma_means / sigma`` (standard deviation of the group means, ``ddof=0`` over
    equal groups, over the within-group standard deviation; unitless). The F test on
    ``(n_groups - 1, n_total - n_groups)`` degrees of freedom has noncentrality
    ``lambda = f^2 * n_total`` (the convention of ``statsmodels.stats.power.FTestAnovaPower``);
    the answer solves ``ncf.sf(F_crit, df1, df2, lambda) = power`` with ``F_crit`` the
    ``1 - alpha`` quantile of the central F (``scipy.stats.ncf``, ``scipy.stats.f``, root by
    ``scipy.optimize.brentq``). 0 when ``power <= alpha``.

    Parameters
    ----------
    n_groups : int
        Number of groups, at least 2.
    n_total : int
        Number of observations, more than ``n_groups``.
    alpha, power : float
        Level of the test and target power, each in (0, 1).

    Raises
    ------
    ValueError
        For fewer than 2 groups, ``n_total <= n_groups`` or a level outside (0, 1).

    Examples
    --------
    Five groups of two (5 within-group degrees of freedom), and a large design:

    >>> round(anova_min_detectable_f(5, 10, alpha=0.05), 2)
    1.74
    >>> round(anova_min_detectable_f(3, 300, alpha=0.05), 3)
    0.18
    """
    if not (isinstance(n_groups, (int, np.integer)) and n_groups >= 2):
        raise ValueError(f"n_groups must be an integer >= 2, got {n_groups!r}")
    if not (isinstance(n_total, (int, np.integer)) and n_total > n_groups):
        raise ValueError(f"n_total must be an integer > n_groups = {n_groups}, got {n_total!r}")
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    if power <= alpha:
        return 0.0
    df1, df2 = int(n_groups - 1), int(n_total - n_groups)
    crit = stats.f.ppf(1.0 - alpha, df1, df2)

    def gap(lam):
        return stats.ncf.sf(crit, df1, df2, lam) - power

    hi = 1.0
    while gap(hi) < 0.0:
        hi *= 2.0
    lam = optimize.brentq(gap, 0.0, hi, xtol=1e-10, rtol=1e-10, maxiter=500)
    return float(np.sqrt(lam / n_total))


def holm(p) -> np.ndarray:
    """Holm-adjusted p-values over the finite entries of ``p`` (Holm 1979, step-down:
    ``p_(i) * (m - i + 1)`` made monotone and capped at 1; ``statsmodels.stats.multitest.multipletests``
    with ``method="holm"``). NaN entries stay NaN and do not count in the family. Shape of ``p``.

    >>> holm([0.01, float("nan"), 0.04, 0.03]).round(3).tolist()
    [0.03, nan, 0.06, 0.06]
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def one_way_anova(*groups) -> tuple[float, float]:
    """One-way analysis of variance of ``groups`` (1-D arrays of observations): ``(F, p)`` from
    ``scipy.stats.f_oneway``, with ``F = (SS_between / (g - 1)) / (SS_within / (N - g))``.

    >>> F, p = one_way_anova([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    >>> round(F, 3), round(p, 4)
    (13.5, 0.0213)
    """
    res = stats.f_oneway(*[np.asarray(g, dtype=np.float64) for g in groups])
    return float(res.statistic), float(res.pvalue)


def t_critical(alpha: float, dof) -> float:
    """The two-sided critical value of Student's t at level ``alpha`` with ``dof`` degrees of freedom:
    ``t_{1 - alpha/2, dof}`` (``scipy.stats.t.ppf``), the half-width of a ``1 - alpha`` interval of a
    mean in standard errors. ``ValueError`` unless ``0 < alpha < 1``.

    >>> round(t_critical(0.05, 10), 4)
    2.2281
    """
    _check_level(alpha, "alpha")
    return float(stats.t.ppf(1 - alpha / 2, dof))


# ----------------------------------------------------------------------------- exact rank correlation, small n

#: largest number of pairs for which the exact tests of Spearman's rho enumerate all ``n!`` orderings
MAX_EXACT_SPEARMAN_N = 9


def _check_exact_n(n, name: str = "n") -> None:
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 3 <= n <= MAX_EXACT_SPEARMAN_N):
        raise ValueError(f"{name} must be an integer from 3 to {MAX_EXACT_SPEARMAN_N} (the exact test enumerates "
                         f"all n! orderings), got {n!r}")


def _abs_spearman(x, y, axis=-1):
    """|Spearman's rho| of the rows of ``x`` and ``y`` (the statistic of :func:`spearman_exact`)."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    return np.abs((rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis)))


def spearman_exact(x, y) -> tuple[float, float, int]:
    """Spearman's rho with its exact two-sided permutation p-value over all ``n!`` pairings.

    Parameters
    ----------
    x, y : array-like of shape (n,)
        Paired values, finite, ``3 <= n <=`` :data:`MAX_EXACT_SPEARMAN_N`, neither constant.

    Returns
    -------
    (rho, p, n_permutations)
        ``rho`` from ``scipy.stats.spearmanr`` (Pearson's r of the mid-ranks); ``p`` is
        ``#{orderings pi of y: |rho(x, y_pi)| >= |rho(x, y)|} / n!``, counted over every ordering
        (the observed one included, enumerated with ``itertools.permutations``; the same value as
        ``scipy.stats.permutation_test`` with ``permutation_type="pairings"``, ``n_resamples=inf`` and the
        statistic ``|rho|``, which is checked in the tests but is a thousand times slower);
        ``n_permutations = n!``. With no ties the smallest possible p is ``2 / n!`` (the orderings with
        rho = 1 and rho = -1).

    Raises
    ------
    ValueError
        For ``x`` and ``y`` of different lengths, a non-finite value, ``n`` outside the range, or a
        constant ``x`` or ``y`` (rho undefined).

    Examples
    --------
    Three pairs in the same order: of the 3! = 6 orderings, rho = 1 and rho = -1 reach ``|rho| >= 1``.

    >>> rho, p, m = spearman_exact([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
    >>> rho, round(p, 4), m
    (1.0, 0.3333, 6)
    """
    a, b = _float_vector(x), _float_vector(y)
    _same_length(a, b, "x and y")
    _check_exact_n(a.size, "the number of pairs")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("x and y must be finite")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise ValueError("x and y must not be constant: Spearman's rho is undefined")
    import itertools  # noqa: PLC0415

    rho = float(stats.spearmanr(a, b).statistic)
    orderings = np.array(list(itertools.permutations(range(a.size))))
    null = _abs_spearman(np.broadcast_to(a, orderings.shape), b[orderings])
    p = float((null >= abs(rho) * (1 - 1e-12) - 1e-14).mean())  # ties of |rho| within rounding count as reached
    return rho, p, int(len(orderings))


def _null_rhos(n: int) -> np.ndarray:
    """Spearman's rho of every ordering of ``n`` untied ranks: ``1 - 6 sum d^2 / (n (n^2 - 1))``."""
    import itertools  # noqa: PLC0415

    perms = np.array(list(itertools.permutations(range(n))), dtype=np.float64)
    d2 = ((perms - np.arange(n)) ** 2).sum(axis=1)
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def spearman_exact_critical(n: int, *, alpha: float = 0.05) -> float:
    """Smallest |rho| that the exact two-sided permutation test (:func:`spearman_exact`) calls
    significant at ``alpha`` with ``n`` untied pairs.

    The exact null distribution is enumerated: for each of the ``n!`` orderings,
    ``rho = 1 - 6 sum_i d_i^2 / (n (n^2 - 1))`` with ``d_i`` the rank differences; the critical value is
    the smallest ``r`` in its support with ``P(|rho| >= r) <= alpha``. NaN when even ``|rho| = 1``
    (``p = 2 / n!``) exceeds ``alpha``.

    Raises
    ------
    ValueError
        For ``n`` outside 3 to :data:`MAX_EXACT_SPEARMAN_N` or ``alpha`` outside (0, 1).

    Examples
    --------
    n = 6: ``sum d^2 <= 4`` (rho >= 31/35) holds for 1 + 5 + 6 = 12 orderings, two-sided
    ``24/720 = 0.033``; ``sum d^2 = 6`` adds 9 more (``42/720 = 0.058``), so the critical |rho| is 31/35.

    >>> round(spearman_exact_critical(6), 4)
    0.8857
    >>> spearman_exact_critical(5)
    1.0
    """
    _check_exact_n(n)
    _check_level(alpha, "alpha")
    null = np.abs(_null_rhos(int(n)))
    support = np.unique(np.round(null, 12))
    p = np.array([(null >= r - 1e-12).mean() for r in support])
    ok = support[p <= alpha]
    if not ok.size:
        return float("nan")
    return float(null[np.abs(null - ok.min()) < 1e-9][0])  # the unrounded value of the support


def _normal_pairs(n: int, n_sim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_sim, n)), rng.standard_normal((n_sim, n))


def _power_from_pairs(z1, z2, rho: float, crit: float) -> float:
    y = rho * z1 + np.sqrt(1.0 - rho * rho) * z2
    return float((_abs_spearman(z1, y) >= crit - 1e-12).mean())


def spearman_exact_power(n: int, rho: float, *, alpha: float = 0.05, n_sim: int = 20000, seed: int = 0) -> float:
    """Power of the exact two-sided Spearman test (:func:`spearman_exact`) at ``alpha`` with ``n`` pairs.

    Monte Carlo: ``n_sim`` samples of ``n`` pairs from a bivariate normal with Pearson correlation
    ``rho`` (``y = rho z1 + sqrt(1 - rho^2) z2``, ``z1, z2`` standard normal from
    ``numpy.random.default_rng(seed)``); the power is the share of samples whose ``|r_s|`` reaches the
    exact critical value (:func:`spearman_exact_critical`). The population Spearman correlation of
    such data is ``(6 / pi) asin(rho / 2)``. At ``rho = 0`` it estimates the test's exact size, at most
    ``alpha`` (the null distribution is discrete). Standard error ``sqrt(power (1 - power) / n_sim)``.

    Raises
    ------
    ValueError
        For ``n`` outside 3 to :data:`MAX_EXACT_SPEARMAN_N`, ``rho`` outside (-1, 1), ``alpha`` outside
        (0, 1) or ``n_sim < 100``.

    Examples
    --------
    n = 6 at alpha = 0.05: the exact size is ``24/720 = 0.033``.

    >>> round(spearman_exact_power(6, 0.0, n_sim=20000), 2)
    0.03
    """
    _check_exact_n(n)
    _check_level(alpha, "alpha")
    if not (isinstance(rho, (int, float, np.floating)) and -1 < float(rho) < 1):
        raise ValueError(f"rho must be a number in (-1, 1), got {rho!r}")
    if not (isinstance(n_sim, (int, np.integer)) and n_sim >= 100):
        raise ValueError(f"n_sim must be an integer >= 100, got {n_sim!r}")
    crit = spearman_exact_critical(int(n), alpha=alpha)
    if not np.isfinite(crit):
        return 0.0
    z1, z2 = _normal_pairs(int(n), int(n_sim), seed)
    return _power_from_pairs(z1, z2, float(rho), crit)


def spearman_min_detectable(n: int, *, alpha: float = 0.05, power: float = 0.8, n_sim: int = 20000,
                            seed: int = 0) -> float:
    """Smallest Pearson correlation ``rho`` of a bivariate normal at which the exact two-sided Spearman
    test with ``n`` pairs at ``alpha`` has at least ``power`` (:func:`spearman_exact_power`).

    Bisection on ``rho`` in [0, 1) to 1e-3 with the same ``n_sim`` standard normal samples at every
    ``rho`` (common random numbers, so the estimated power rises with ``rho``). NaN when ``power`` is
    out of reach (no critical value at ``alpha``, or the power at ``rho = 0.999`` is below ``power``).

    Raises
    ------
    ValueError
        As :func:`spearman_exact_power`, and for ``power`` outside (0, 1).

    Examples
    --------
    >>> r = spearman_min_detectable(6, n_sim=4000)
    >>> 0.8 < r < 1.0
    True
    """
    _check_exact_n(n)
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    if not (isinstance(n_sim, (int, np.integer)) and n_sim >= 100):
        raise ValueError(f"n_sim must be an integer >= 100, got {n_sim!r}")
    crit = spearman_exact_critical(int(n), alpha=alpha)
    if not np.isfinite(crit):
        return float("nan")
    z1, z2 = _normal_pairs(int(n), int(n_sim), seed)
    lo, hi = 0.0, 0.999
    if _power_from_pairs(z1, z2, hi, crit) < power:
        return float("nan")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if _power_from_pairs(z1, z2, mid, crit) >= power:
            hi = mid
        else:
            lo = mid
    return float(hi)


def uniform_rank_pvalue(rank: int, n: int) -> float:
    """Exact p-value of one rank under a uniformly random ranking.

    A criterion ranks ``n`` items (1 = ranked most important); under the null that its ranking is
    uniformly random, the rank ``R`` of a fixed item is uniform on ``{1, ..., n}``, so the one-sided
    p-value "ranked at least as high as observed" is ``P(R <= r) = r / n``. The smallest attainable
    value is ``1 / n``.

    Parameters
    ----------
    rank : int
        Observed rank ``r``, 1 <= r <= n.
    n : int
        Number of ranked items (>= 1).

    Returns
    -------
    float
        ``r / n``.

    Raises
    ------
    ValueError
        If ``n < 1`` or ``rank`` is not an integer in ``[1, n]``.

    Examples
    --------
    >>> uniform_rank_pvalue(1, 8)
    0.125
    >>> uniform_rank_pvalue(3, 4)
    0.75
    """
    _check_ranks([rank], [n])
    return int(rank) / int(n)


def _check_ranks(ranks, sizes) -> tuple[list[int], list[int]]:
    r, n = list(ranks), list(sizes)
    if len(r) != len(n) or not r:
        raise ValueError(f"ranks and sizes must be non-empty and of one length, got {len(r)} and {len(n)}")
    for a, b in zip(r, n):
        if isinstance(a, bool) or isinstance(b, bool) or int(b) != b or int(b) < 1 or int(a) != a or not 1 <= int(a) <= int(b):
            raise ValueError(f"every rank must be an integer in [1, size] with size >= 1; got rank={a!r}, size={b!r}")
    return [int(a) for a in r], [int(b) for b in n]


def _rank_sum_distribution(sizes) -> np.ndarray:
    """P(S = s) for s = 0..sum(sizes) of a sum of independent uniforms on {1..n_i} (exact convolution)."""
    dist = np.array([1.0])
    for n in sizes:
        dist = np.convolve(dist, np.r_[0.0, np.full(int(n), 1.0 / int(n))])
    return dist


def uniform_rank_sum_pvalue(ranks, sizes) -> float:
    """Exact pooled p-value of several ranks under uniformly random rankings (rank-sum test).

    Layer ``i`` ranks ``n_i`` items and the item of interest gets rank ``r_i``; under the null the
    ranks are independent and uniform on ``{1, ..., n_i}``. The statistic is ``S = sum_i R_i`` and
    the one-sided p-value is ``P(S <= sum_i r_i)``, computed exactly by convolving the uniform
    distributions (no approximation). The smallest attainable value is ``prod_i 1 / n_i``.

    Parameters
    ----------
    ranks : sequence of int
        Observed ranks ``r_i`` (1 = highest).
    sizes : sequence of int
        Numbers of ranked items ``n_i``, one per rank.

    Returns
    -------
    float
        ``P(S <= sum r_i)``.

    Raises
    ------
    ValueError
        If the sequences are empty or of different lengths, or a rank is outside ``[1, n_i]``.

    Examples
    --------
    Two layers of 2 experts: S is 2, 3 or 4 with probabilities 1/4, 1/2, 1/4.

    >>> uniform_rank_sum_pvalue([1, 1], [2, 2])
    0.25
    >>> uniform_rank_sum_pvalue([1, 2], [2, 2])
    0.75
    """
    r, n = _check_ranks(ranks, sizes)
    dist = _rank_sum_distribution(n)
    return float(min(1.0, dist[: sum(r) + 1].sum()))


def uniform_rank_sum_critical(sizes, *, alpha: float = 0.05) -> float:
    """The largest rank sum the test of :func:`uniform_rank_sum_pvalue` rejects at ``alpha``.

    ``max{s : P(S <= s) <= alpha}`` for ``S`` a sum of independent uniforms on ``{1..n_i}``:
    a minimum detectable effect in rank units (the ranks must sum to at most this, i.e. sit at a
    mean rank of at most ``s / len(sizes)``, for the pooled test to reject). NaN when no rank sum
    can be rejected (``prod 1 / n_i > alpha``: too few layers or experts).

    Parameters
    ----------
    sizes : sequence of int
        Numbers of ranked items ``n_i`` (each >= 1).
    alpha : float
        Level, in (0, 1).

    Returns
    -------
    float
        The critical rank sum, or NaN.

    Raises
    ------
    ValueError
        If ``sizes`` is empty or holds a size below 1, or ``alpha`` is not in (0, 1).

    Examples
    --------
    >>> uniform_rank_sum_critical([2, 2], alpha=0.3)
    2.0
    >>> import math; math.isnan(uniform_rank_sum_critical([2, 2], alpha=0.2))
    True
    """
    _check_level(alpha, "alpha")
    n = _check_ranks([1] * len(list(sizes)), sizes)[1]
    cdf = np.cumsum(_rank_sum_distribution(n))
    ok = np.flatnonzero((cdf <= alpha + 1e-12) & (np.arange(cdf.size) >= len(n)))  # S >= len(n) always
    return float(ok.max()) if ok.size else float("nan")
