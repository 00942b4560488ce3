"""Tests for moeaudit.stats: against SciPy/statsmodels, hand computations and invariants."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats as sps
from statsmodels.stats.multitest import multipletests

from moeaudit import stats as S


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20260609)


def _pair(rng, n=200, shift=0.1):
    low = rng.normal(0.0, 1.0, n)
    high = low + rng.normal(shift, 0.5, n)
    return high, low


# --------------------------------------------------------------------------- hand examples

def test_hand_example_d_1234():
    # D = [1, 2, 3, 4]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # sd (ddof=1) = sqrt(5 / 3); d_z = 2.5 / sqrt(5/3); t = d_z * sqrt(4)
    res = S.paired_effect([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]).iloc[0]
    sd = math.sqrt(5.0 / 3.0)
    assert res["n"] == 4 and res["n_zero"] == 0
    assert res["mean_d"] == pytest.approx(2.5)
    assert res["median_d"] == pytest.approx(2.5)
    assert res["sd_d"] == pytest.approx(sd, rel=1e-12)
    assert res["cohens_dz"] == pytest.approx(2.5 / sd, rel=1e-12)
    assert res["cohens_dz"] == pytest.approx(1.9364916731037085, rel=1e-12)
    assert res["t"] == pytest.approx(2.5 / sd * 2.0, rel=1e-12)
    assert res["dof"] == 3
    # all differences positive: R+ = 1+2+3+4 = 10, R- = 0, W = min = 0, exact p = 2/16
    assert res["W"] == 0.0
    assert res["p_W"] == pytest.approx(2.0 / 16.0)
    assert res["rank_biserial"] == pytest.approx(1.0)


def test_ddof_matters_and_is_one():
    d = np.array([1.0, 2.0, 3.0, 4.0])
    # ddof=0 would give sd = sqrt(5/4) and d = 2.5 / sqrt(1.25) = 2.2360...
    assert S.cohens_dz(d) == pytest.approx(1.9364916731037085, rel=1e-12)
    assert S.cohens_dz(d, ddof=0) == pytest.approx(2.5 / math.sqrt(1.25), rel=1e-12)
    res = S.paired_effect(d, np.zeros(4)).iloc[0]
    assert res["cohens_dz"] != pytest.approx(S.cohens_dz(d, ddof=0), rel=1e-3)


def test_rank_biserial_hand_example():
    # D = [-1, 2, 3, -4, 5]: |D| ranks 1..5; R+ = 2+3+5 = 10, R- = 1+4 = 5
    d = np.array([-1.0, 2.0, 3.0, -4.0, 5.0])
    res = S.paired_effect(d, np.zeros(5)).iloc[0]
    assert res["W"] == 5.0
    assert res["rank_biserial"] == pytest.approx((10 - 5) / 15)


def test_zero_differences_are_counted_and_dropped_by_wilcoxon():
    d = np.array([0.0, 0.0, 1.0, 2.0, -0.5, 3.0, 1.5])
    res = S.paired_effect(d, np.zeros_like(d)).iloc[0]
    assert res["n_zero"] == 2
    ref = sps.wilcoxon(d, zero_method="wilcox")
    assert res["W"] == ref.statistic and res["p_W"] == pytest.approx(ref.pvalue)


# --------------------------------------------------------------------------- vs libraries

def test_matches_scipy_and_statsmodels(rng):
    high, low = _pair(rng)
    res = S.paired_effect(high, low, n_tests=5).iloc[0]
    d = high - low
    tt = sps.ttest_rel(high, low)
    wx = sps.wilcoxon(high, low)
    assert res["t"] == pytest.approx(tt.statistic, rel=1e-12)
    assert res["p_t"] == pytest.approx(tt.pvalue, rel=1e-12)
    assert res["W"] == wx.statistic
    assert res["p_W"] == pytest.approx(wx.pvalue, rel=1e-12)
    assert res["sd_d"] == pytest.approx(np.std(d, ddof=1), rel=1e-12)
    # d_z (ddof=1) is exactly t / sqrt(n); with ddof=0 it would be t / sqrt(n - 1)
    assert res["cohens_dz"] == pytest.approx(tt.statistic / math.sqrt(200), rel=1e-12)
    assert res["cohens_dz"] != pytest.approx(tt.statistic / math.sqrt(199), rel=1e-4)
    assert res["alpha_corrected"] == pytest.approx(0.01)


def test_tost_equals_two_one_sided_scipy_tests(rng):
    high, low = _pair(rng, shift=0.02)
    res = S.paired_effect(high, low, tost_bound_d=0.3).iloc[0]
    d = high - low
    b = 0.3 * np.std(d, ddof=1)
    assert res["tost_upp"] == pytest.approx(b) and res["tost_low"] == pytest.approx(-b)
    p_low = sps.ttest_1samp(d, -b, alternative="greater").pvalue
    p_upp = sps.ttest_1samp(d, b, alternative="less").pvalue
    assert res["p_tost"] == pytest.approx(max(p_low, p_upp), rel=1e-9)


def test_tost_verdicts():
    rng = np.random.default_rng(3)
    low = rng.normal(size=2000)
    # large n, true d_z ~ 0: clearly inside +-0.2
    res = S.paired_effect(low + rng.normal(0.0, 1.0, 2000), low).iloc[0]
    assert res["equivalent"]
    # true d_z = 0.5: clearly not equivalent
    res = S.paired_effect(low + rng.normal(0.5, 1.0, 2000), low).iloc[0]
    assert not res["equivalent"]


def test_minimum_detectable_effect():
    from statsmodels.stats.power import TTestPower

    rng = np.random.default_rng(5)
    low = rng.normal(size=200)
    res = S.paired_effect(low + rng.normal(size=200), low, n_tests=20, power=0.8).iloc[0]
    mde = res["mde_dz"]
    # the power of the paired t test at that effect is the requested power
    assert TTestPower().power(effect_size=mde, nobs=200, alpha=0.0025) == pytest.approx(0.8, abs=1e-6)
    # normal approximation (z_{1-a/2} + z_power) / sqrt(n) is close for n = 200
    approx = (sps.norm.ppf(1 - 0.0025 / 2) + sps.norm.ppf(0.8)) / math.sqrt(200)
    assert mde == pytest.approx(approx, rel=0.02)
    # a stricter level needs a larger effect
    res1 = S.paired_effect(low + rng.normal(size=200), low, n_tests=1).iloc[0]
    assert res1["mde_dz"] < mde


def test_power_helpers_are_inverse():
    mde = S.min_detectable_dz(200, alpha=0.0025, power=0.8)
    assert S.required_n(mde, alpha=0.0025, power=0.8) == pytest.approx(200, rel=1e-6)
    assert S.required_n(-mde, alpha=0.0025, power=0.8) == pytest.approx(200, rel=1e-6)
    # textbook check: d = 0.2 at alpha = 0.05, power 0.8 needs about 199 pairs
    assert S.required_n(0.2, alpha=0.05, power=0.8) == pytest.approx(198.15, abs=0.5)


def test_tost_from_t_matches_ttost_paired(rng):
    for shift in (0.0, 0.05, 0.3):
        high, low = _pair(rng, n=150, shift=shift)
        res = S.paired_effect(high, low, tost_bound_d=0.25).iloc[0]
        assert S.tost_from_t(res["t"], 150, bound_d=0.25) == pytest.approx(res["p_tost"], rel=1e-9)


def test_summary_effect_matches_paired_effect(rng):
    high, low = _pair(rng, n=180, shift=0.15)
    full = S.paired_effect(high, low, n_tests=4, tost_bound_d=0.2).iloc[0]
    summ = S.summary_effect(full["t"], 180, p_W=full["p_W"], same_sign=full["same_sign"],
                            n_tests=4, tost_bound_d=0.2).iloc[0]
    for col in summ.index:
        if isinstance(summ[col], (float, np.floating)):
            assert summ[col] == pytest.approx(full[col], rel=1e-9), col
        else:
            assert summ[col] == full[col], col


# --------------------------------------------------------------------------- CI of d_z

def test_ci_at_zero_is_normal_quantile():
    # nct.cdf(0, df, lam) = Phi(-lam) exactly, so at d_z = 0 the bounds are -+z_{.975}/sqrt(n)
    lo, hi = S.dz_confidence_interval(0.0, 50)
    z = sps.norm.ppf(0.975)
    assert lo == pytest.approx(-z / math.sqrt(50), rel=1e-8)
    assert hi == pytest.approx(z / math.sqrt(50), rel=1e-8)


def test_ci_solves_defining_equations():
    dz, n = 0.3, 40
    lo, hi = S.dz_confidence_interval(dz, n, ci=0.9)
    t = dz * math.sqrt(n)
    assert sps.nct.cdf(t, n - 1, lo * math.sqrt(n)) == pytest.approx(0.95, abs=1e-9)
    assert sps.nct.cdf(t, n - 1, hi * math.sqrt(n)) == pytest.approx(0.05, abs=1e-9)


def test_ci_close_to_large_sample_approximation():
    dz, n = 0.2, 5000
    lo, hi = S.dz_confidence_interval(dz, n)
    se = math.sqrt(1 / n + dz**2 / (2 * n))
    assert lo == pytest.approx(dz - 1.959964 * se, abs=2e-3)
    assert hi == pytest.approx(dz + 1.959964 * se, abs=2e-3)


def test_ci_contains_d_and_shrinks_with_n(rng):
    widths = []
    for n in (20, 80, 320):
        high, low = _pair(rng, n=n, shift=0.2)
        res = S.paired_effect(high, low).iloc[0]
        assert res["dz_ci_low"] < res["cohens_dz"] < res["dz_ci_high"]
        widths.append(res["dz_ci_high"] - res["dz_ci_low"])
    assert widths[0] > widths[1] > widths[2]


def test_ci_excludes_zero_iff_t_test_significant(rng):
    for shift in (0.0, 0.05, 0.1, 0.2):
        high, low = _pair(rng, n=100, shift=shift)
        res = S.paired_effect(high, low).iloc[0]
        excludes = res["dz_ci_low"] > 0 or res["dz_ci_high"] < 0
        assert excludes == (res["p_t"] < 0.05)


# --------------------------------------------------------------------------- dual verdict

def test_dual_verdict_requires_both_tests_and_same_sign():
    rng = np.random.default_rng(11)
    low = rng.normal(size=300)
    strong = S.paired_effect(low + rng.normal(0.6, 1.0, 300), low, n_tests=20).iloc[0]
    assert strong["sig_t"] and strong["sig_W"] and strong["same_sign"] and strong["sig_dual"]
    null = S.paired_effect(low + rng.normal(0.0, 1.0, 300), low, n_tests=20).iloc[0]
    assert not null["sig_dual"]


def test_dual_verdict_fails_when_tests_disagree_in_sign():
    # many small positive differences and a few huge negative ones: the mean is negative
    # (t test), the signed ranks are mostly positive (Wilcoxon)
    d = np.concatenate([np.full(180, 1.0) + np.linspace(0, 0.1, 180), np.full(20, -40.0)])
    res = S.paired_effect(d, np.zeros_like(d), alpha=0.5).iloc[0]
    assert res["mean_d"] < 0 < res["rank_biserial"]
    assert res["sig_W"] and not res["same_sign"] and not res["sig_dual"]


def test_dual_verdict_fails_when_only_t_passes():
    # one large outlier drives the t test; ranks are balanced
    rng = np.random.default_rng(2)
    d = rng.normal(0.0, 1.0, 200)
    d = d - d.mean()
    d[:6] += 20.0
    res = S.paired_effect(d, np.zeros_like(d), n_tests=1).iloc[0]
    assert res["sig_t"] and not res["sig_W"] and res["same_sign"]
    assert not res["sig_dual"]
    # the same cell in a family of 20 passes neither test
    res20 = S.paired_effect(d, np.zeros_like(d), n_tests=20).iloc[0]
    assert not res20["sig_t"] and not res20["sig_dual"]


# --------------------------------------------------------------------------- audit table

def _records(rng):
    frames = []
    for model, shift in (("a", 0.0), ("b", 0.35)):
        for layer in (0, 1, 2, 3):
            low = rng.normal(size=150)
            frames.append(pd.DataFrame({
                "model": model, "layer": layer, "metric": "m",
                "delta_high": low + rng.normal(shift if layer == 3 else 0.0, 1.0, 150),
                "delta_low": low,
            }))
    return pd.concat(frames, ignore_index=True)


def test_audit_table_matches_paired_effect_and_multipletests(rng):
    recs = _records(rng)
    tab = S.audit_table(recs, family=["model"])
    assert len(tab) == 8 and (tab["family_size"] == 4).all()
    first = recs[(recs.model == "b") & (recs.layer == 3)]
    ref = S.paired_effect(first.delta_high, first.delta_low, n_tests=4).iloc[0]
    row = tab[(tab.model == "b") & (tab.layer == 3)].iloc[0]
    for col in ("cohens_dz", "p_t", "p_W", "dz_ci_low", "p_tost", "mde_dz"):
        assert row[col] == pytest.approx(ref[col], rel=1e-12)
    for model in ("a", "b"):
        sub = tab[tab.model == model]
        for p in ("p_t", "p_W"):
            for suffix, method in S.CORRECTIONS.items():
                expect = multipletests(sub[p].to_numpy(), alpha=0.05, method=method)[1]
                np.testing.assert_allclose(sub[f"{p}_{suffix}"].to_numpy(), expect, rtol=1e-12)
    # Bonferroni-adjusted p < alpha <=> raw p < alpha / family size
    assert (tab["sig_t_bonf"] == tab["sig_t"]).all()
    assert (tab["sig_W_bonf"] == tab["sig_W"]).all()
    assert (tab["sig_dual_bonf"] == (tab["sig_t_bonf"] & tab["sig_W_bonf"] & tab["same_sign"])).all()
    # BH is never stricter than Holm, Holm never stricter than Bonferroni
    assert (tab["p_t_bh"] <= tab["p_t_holm"] + 1e-15).all()
    assert (tab["p_t_holm"] <= tab["p_t_bonf"] + 1e-15).all()


def test_audit_table_single_family(rng):
    recs = _records(rng)
    tab = S.audit_table(recs, family=None)
    assert (tab["family_size"] == 8).all()
    assert tab["alpha_corrected"].iloc[0] == pytest.approx(0.05 / 8)
    expect = multipletests(tab["p_t"].to_numpy(), method="holm")[1]
    np.testing.assert_allclose(tab["p_t_holm"].to_numpy(), expect)


def test_correct_family_on_summary_table():
    table = pd.DataFrame({
        "model": ["x"] * 4 + ["y"] * 2,
        "p_t": [0.001, 0.02, 0.04, 0.5, 0.001, 0.9],
        "p_W": [0.002, 0.5, 0.01, 0.5, 0.01, 0.9],
        "same_sign": [True, True, True, True, False, True],
    })
    out = S.correct_family(table, family=["model"])
    # Bonferroni by hand: x has 4 cells, y has 2
    np.testing.assert_allclose(out.p_t_bonf, [0.004, 0.08, 0.16, 1.0, 0.002, 1.0])
    # Holm by hand for x: sorted 0.001, 0.02, 0.04, 0.5 -> 0.004, 0.06, 0.08, 0.5
    np.testing.assert_allclose(out.p_t_holm[:4], [0.004, 0.06, 0.08, 0.5])
    # BH by hand for x: 0.001*4/1, 0.02*4/2, 0.04*4/3, 0.5 -> 0.004, 0.04, 0.0533, 0.5
    np.testing.assert_allclose(out.p_t_bh[:4], [0.004, 0.04, 0.04 * 4 / 3, 0.5])
    assert list(out.sig_dual_bonf) == [True, False, False, False, False, False]
    # y's first cell passes both tests under BH but the signs disagree
    assert out.sig_t_bh[4] and out.sig_W_bh[4] and not out.sig_dual_bh[4]
    assert "p_t_bonf" not in table.columns  # input untouched
    with pytest.raises(KeyError):
        S.correct_family(table.drop(columns="same_sign"))


def test_audit_table_rejects_bad_family(rng):
    with pytest.raises(ValueError):
        S.audit_table(_records(rng), family=["nope"])


# --------------------------------------------------------------------------- spearman, BF

def test_spearman_matches_scipy_and_bootstrap_ci(rng):
    x = rng.normal(size=120)
    y = 0.4 * x + rng.normal(size=120)
    res = S.spearman(x, y, n_boot=300, seed=1).iloc[0]
    ref = sps.spearmanr(x, y)
    assert res["rho"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    assert res["ci_low"] < res["rho"] < res["ci_high"]
    # reproducible with the seed, different with another seed
    again = S.spearman(x, y, n_boot=300, seed=1).iloc[0]
    other = S.spearman(x, y, n_boot=300, seed=2).iloc[0]
    assert again["ci_low"] == res["ci_low"]
    assert other["ci_low"] != res["ci_low"]


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_spearman_bootstrap_equals_resampling_spearmanr_itself(rng, method):
    # the vectorised statistic (Pearson of average ranks) against scipy's spearmanr called on
    # every resample, with ties in both variables
    x = np.round(rng.normal(size=80), 1)
    y = np.round(0.3 * x + rng.normal(size=80), 1)
    res = S.spearman(x, y, n_boot=400, seed=3, method=method).iloc[0]
    ref = sps.bootstrap((x, y), lambda a, b: sps.spearmanr(a, b).statistic, paired=True, vectorized=False,
                        n_resamples=400, method=method, rng=np.random.default_rng(3)).confidence_interval
    assert res["ci_low"] == pytest.approx(ref.low, abs=1e-12)
    assert res["ci_high"] == pytest.approx(ref.high, abs=1e-12)


def test_spearman_bootstrap_is_paired():
    # y is a monotone function of x: every paired resample gives rho = 1; an unpaired
    # resample would not
    x = np.arange(50, dtype=float)
    res = S.spearman(x, x**3, n_boot=200, seed=0, method="percentile").iloc[0]
    assert res["rho"] == pytest.approx(1.0)
    assert res["ci_low"] == pytest.approx(1.0) and res["ci_high"] == pytest.approx(1.0)


def test_jzs_bayes_factor_against_rouder_integral(rng):
    # Rouder et al. (2009), eq. 1, one-sample/paired with Cauchy scale r:
    # BF10 = int (1+n g r^2)^(-1/2) (1 + t^2/((1+n g r^2) v))^(-(v+1)/2)
    #           (2 pi)^(-1/2) g^(-3/2) exp(-1/(2g)) dg / (1 + t^2/v)^(-(v+1)/2)
    d = rng.normal(0.25, 1.0, 40)
    n = d.size
    v = n - 1
    t = sps.ttest_1samp(d, 0.0).statistic
    r = 0.707

    def integrand(g):
        a = 1 + n * g * r**2
        return a**-0.5 * (1 + t**2 / (a * v)) ** (-(v + 1) / 2) * (2 * np.pi) ** -0.5 * g**-1.5 * np.exp(-1 / (2 * g))

    bf = integrate.quad(integrand, 0, np.inf)[0] / (1 + t**2 / v) ** (-(v + 1) / 2)
    assert S.jzs_bayes_factor(d) == pytest.approx(bf, rel=1e-3)
    # a sample mean of exactly zero at large n favours the null
    z = rng.normal(0.0, 1.0, 2000)
    assert S.jzs_bayes_factor(z - z.mean()) < 1 / 10


def test_input_validation():
    # wrong arguments raise; data that cannot be tested (NaN, all equal, too few pairs) give a
    # row with a reason instead (tests/test_degenerate_cells.py)
    with pytest.raises(ValueError, match="same length"):
        S.paired_effect([1.0, 2.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="n_tests"):
        S.paired_effect([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], n_tests=0)
    with pytest.raises(ValueError, match="alpha"):
        S.paired_effect([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], alpha=5)
    for high in ([1.0, np.nan, 2.0], [1.0, 1.0, 1.0]):
        assert S.paired_effect(high, [0.0, 0.0, 0.0])["reason"].iloc[0]


# ----------------------------------------------------------------------------- small shared helpers


def test_spearman_defined_drops_non_finite_pairs_and_is_nan_when_undefined():
    # finite pairs (1,2), (2,1), (3,4), (4,3): ranks x = 1..4, y = 2,1,4,3 -> sum d^2 = 4
    # rho = 1 - 6*4 / (4*(16-1)) = 0.6 (no ties, so the textbook formula is exact)
    rho, p, n = S.spearman_defined([1, 2, np.nan, 3, 4, 5], [2, 1, 7, 4, 3, np.inf])
    assert n == 4 and rho == pytest.approx(0.6) and 0 < p < 1
    assert np.isnan(S.spearman_defined([1, 2, 3], [5, 5, 5])[0])  # constant column
    rho, p, n = S.spearman_defined([1, 2, np.nan], [1, 2, 3])  # two finite pairs
    assert np.isnan(rho) and np.isnan(p) and n == 2
    with pytest.raises(ValueError, match="same length"):
        S.spearman_defined([1, 2, 3], [1, 2])


def test_min_detectable_spearman_by_hand():
    # n = 28, alpha = 0.05, power = 0.8: z_0.975 + z_0.8 = 1.959964 + 0.841621 = 2.801585, / sqrt(25) = 0.560317.
    # rho solves atanh(rho) = 0.560317 * sqrt(1 + rho^2 / 2); at rho = 0.5365: 0.599215 vs 0.599282 (close),
    # at 0.53: 0.590145 < 0.598374 and at 0.54: 0.604156 > 0.599775, so the root lies in (0.53, 0.54).
    r = S.min_detectable_spearman(28, alpha=0.05, power=0.8)
    assert 0.53 < r < 0.54 and r == pytest.approx(0.5365, abs=1e-4)
    assert np.arctanh(r) == pytest.approx(0.560317 * np.sqrt(1 + r * r / 2), abs=1e-6)
    # at that rho the normal approximation's power is 0.8
    se = np.sqrt((1 + r * r / 2) / 25)
    assert sps.norm.cdf(np.arctanh(r) / se - 1.959964) == pytest.approx(0.8, abs=1e-5)
    assert S.min_detectable_spearman(200) < r  # more pairs, smaller detectable rho
    assert S.min_detectable_spearman(28, alpha=0.01) > r  # stricter level, larger
    assert np.isnan(S.min_detectable_spearman(3))
    with pytest.raises(ValueError, match="power"):
        S.min_detectable_spearman(28, power=1.0)
    with pytest.raises(ValueError, match="alpha"):
        S.min_detectable_spearman(28, alpha=0.0)


def test_critical_spearman_rho_by_hand():
    # n = 12, alpha = 0.05: t_crit = t_{0.975, 10} = 2.228139 -> rho = 2.228139 / sqrt(14.964603) = 2.228139 / 3.868411 = 0.575983
    assert S.critical_spearman_rho(12, alpha=0.05) == pytest.approx(0.575983, abs=1e-6)
    # at exactly that rho, spearmanr's t-approximation p-value is alpha
    r = S.critical_spearman_rho(30, alpha=0.01)
    t = r * np.sqrt(28 / (1 - r * r))
    assert 2 * sps.t.sf(t, 28) == pytest.approx(0.01)
    assert np.isnan(S.critical_spearman_rho(3))
    with pytest.raises(ValueError, match="alpha"):
        S.critical_spearman_rho(10, alpha=1.5)


def test_dz_difference_ci_covers_the_point_difference_and_is_zero_for_identical_inputs():
    rng = np.random.default_rng(0)
    d1 = rng.normal(0.5, 1, 200)
    d2 = d1 + rng.normal(-0.5, 0.3, 200)
    point = d1.mean() / d1.std(ddof=1) - d2.mean() / d2.std(ddof=1)
    lo, hi = S.dz_difference_ci(d1, d2, n_boot=500, seed=1)
    assert lo < point < hi and lo > 0  # d2 is shifted down: its d_z is clearly smaller
    assert S.dz_difference_ci(d1, d2, n_boot=500, seed=1) == (lo, hi)  # seeded
    assert S.dz_difference_ci(d1, d1.copy()) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same length"):
        S.dz_difference_ci(d1, d2[:10])
    assert np.isnan(S.dz_difference_ci([1.0, 2.0], [2.0, 1.0])).all()  # too few positions: undefined


@pytest.mark.parametrize("bf,label", [(150, "extreme H1"), (100, "very strong H1"), (5, "moderate H1"), (1.0, "anecdotal H0"),
                                      (0.2, "moderate H0"), (1 / 3, "moderate H0"), (0.05, "strong H0"), (0.0, "extreme H0")])
def test_jeffreys_label_bands(bf, label):
    assert S.jeffreys_label(bf) == label


def test_jeffreys_label_rejects_negative_and_calls_nan_undefined():
    with pytest.raises(ValueError):
        S.jeffreys_label(-1.0)
    assert S.jeffreys_label(float("nan")) == "undefined"


def test_family_verdicts_counts_by_hand():
    rng = np.random.default_rng(3)
    rows = []
    for m, shift in (("a", 0.0), ("b", 0.6)):
        for layer in range(3):
            high = rng.normal(shift if layer == 2 else 0.0, 1, 80)
            rows += [{"model": m, "layer": layer, "high": h, "low": 0.0} for h in high]
    table = S.audit_table(pd.DataFrame(rows), by=("model", "layer"), high_col="high", low_col="low")
    v = S.family_verdicts(table, alpha=0.05).set_index("model")
    assert list(v.index) == ["a", "b"] and (v.cells == 3).all() and v.alpha_bonferroni.tolist() == [0.05 / 3] * 2
    for m in "ab":
        t = table[table.model == m]
        assert v.loc[m, "uncorrected_t"] == int((t.p_t < 0.05).sum())
        assert v.loc[m, "bonferroni_dual"] == int((t.sig_t_bonf & t.sig_W_bonf & t.same_sign).sum())
        assert v.loc[m, "max_abs_dz"] == pytest.approx(t.cohens_dz.abs().max())
        assert v.loc[m, "share_positive"] == pytest.approx((t.cohens_dz > 0).mean())
    assert v.loc["b", "bonferroni_dual"] >= 1  # a shift of 0.6 sd at n = 80 is found
    with pytest.raises(KeyError, match="lacks columns"):
        S.family_verdicts(table.drop(columns=["mde_dz"]))


def test_t_test_power_by_hand():
    # noncentral t by hand: df = n - 1, nc = d_z sqrt(n), power = P(T > t_crit) + P(T < -t_crit)
    n, d, a = 200, 0.192, 0.0025
    t_crit = sps.t.ppf(1 - a / 2, n - 1)
    nc = d * math.sqrt(n)
    by_hand = sps.nct.sf(t_crit, n - 1, nc) + sps.nct.cdf(-t_crit, n - 1, nc)
    assert S.t_test_power(d, n, alpha=a) == pytest.approx(by_hand, rel=1e-9)
    assert S.t_test_power(d, n, alpha=a) == pytest.approx(0.367, abs=0.001)
    assert S.t_test_power(-d, n, alpha=a) == pytest.approx(by_hand, rel=1e-9)  # two-sided: sign-free
    assert S.t_test_power(0.0, 30, alpha=0.01) == pytest.approx(0.01, rel=1e-9)
    # the inverse of the minimum detectable effect
    mde = S.min_detectable_dz(200, alpha=a, power=0.8)
    assert S.t_test_power(mde, 200, alpha=a) == pytest.approx(0.8, abs=1e-6)
    # a looser level has more power
    assert S.t_test_power(d, n, alpha=0.01) > S.t_test_power(d, n, alpha=a)
    for bad in (dict(dz=0.2, n=1), dict(dz=float("nan"), n=10), dict(dz=0.2, n=10, alpha=1.5)):
        with pytest.raises(ValueError):
            S.t_test_power(**bad)


def test_sign_test_by_hand():
    # 7 of 10 positive: 2 * (120 + 45 + 10 + 1) / 1024
    assert S.sign_test(7, 3) == pytest.approx(352 / 1024, rel=1e-12)
    assert S.sign_test(3, 7) == pytest.approx(352 / 1024, rel=1e-12)
    # 10 of 10: 2 / 1024
    assert S.sign_test(10, 0) == pytest.approx(2 / 1024, rel=1e-12)
    assert S.sign_test(5, 5) == 1.0
    assert math.isnan(S.sign_test(0, 0))
    for bad in ((-1, 3), (2.5, 3), (True, 2)):
        with pytest.raises(ValueError):
            S.sign_test(*bad)


# --------------------------------------------------------------------------- trends and small-sample comparisons
def _t2_sf(t):
    """Upper tail of Student's t on 2 degrees of freedom, in closed form: (1 - t / sqrt(t^2 + 2)) / 2."""
    return 0.5 * (1.0 - t / math.sqrt(t * t + 2.0))


def test_linear_trend_by_hand():
    # x = 0..3, y = [0, 1, 1, 3]: S_xy = 4.5, S_xx = 5, slope 0.9, intercept -0.1, SSE = 0.7 on 2 df
    fit = S.linear_trend([0, 1, 2, 3], [0, 1, 1, 3])
    se = math.sqrt(0.7 / 2 / 5)
    assert fit["slope"] == pytest.approx(0.9) and fit["intercept"] == pytest.approx(-0.1)
    assert fit["stderr"] == pytest.approx(se) and fit["df"] == 2 and fit["n"] == 4
    assert fit["p"] == pytest.approx(2 * _t2_sf(0.9 / se), rel=1e-9)
    # the 95% interval on 2 df: t_{0.975, 2} = sqrt(2 / (0.05 (2 - 0.05))) ... = 4.302653
    half = 4.302652729911275 * se
    assert (fit["ci_low"], fit["ci_high"]) == pytest.approx((0.9 - half, 0.9 + half))
    # against a reference slope of -1: t = 1.9 / se
    ref = S.linear_trend([0, 1, 2, 3], [0, 1, 1, 3], reference_slope=-1.0)
    assert ref["t"] == pytest.approx(1.9 / se) and ref["p"] == pytest.approx(2 * _t2_sf(1.9 / se), rel=1e-9)
    assert ref["slope"] == fit["slope"] and ref["ci_low"] == fit["ci_low"]
    # a perfect fit: p = 0 against another slope, undefined against its own
    exact = S.linear_trend([1, 2, 3], [2, 4, 6])
    assert exact["p"] == 0.0 and exact["stderr"] == 0.0
    same = S.linear_trend([1, 2, 3], [2, 4, 6], reference_slope=2.0)
    assert math.isnan(same["p"]) and math.isnan(same["t"])
    for bad in (dict(x=[1, 2], y=[1, 2]), dict(x=[1, 1, 1], y=[1, 2, 3]), dict(x=[1, 2, 3], y=[1, 2]),
                dict(x=[1, 2, float("nan")], y=[1, 2, 3])):
        with pytest.raises(ValueError):
            S.linear_trend(**bad)


def test_min_detectable_slope_and_difference_by_hand():
    # many degrees of freedom: the noncentrality tends to z_{0.975} + z_{0.8}
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert S.min_detectable_slope(2.0, 10**6) == pytest.approx(2.0 * z, rel=1e-3)
    # the answer has the target power: P(|T'| > t_crit) with T' noncentral t on n - 2 df
    se, n, a = 0.1, 8, 0.01
    delta = S.min_detectable_slope(se, n, alpha=a, power=0.8) / se
    crit = sps.t.ppf(1 - a / 2, n - 2)
    assert sps.nct.sf(crit, n - 2, delta) + sps.nct.cdf(-crit, n - 2, delta) == pytest.approx(0.8, abs=1e-8)
    assert S.min_detectable_slope(se, n, alpha=0.05) < S.min_detectable_slope(se, n, alpha=a)  # a looser level
    assert S.min_detectable_slope(se, n, alpha=0.5, power=0.4) == 0.0
    # two groups: Cohen's d = delta / sqrt(n_a n_b / (n_a + n_b)); statsmodels agrees where it solves
    from statsmodels.stats.power import TTestIndPower
    assert S.min_detectable_difference(2, 2) == pytest.approx(
        TTestIndPower().solve_power(effect_size=None, nobs1=2, ratio=1.0, alpha=0.05, power=0.8), rel=1e-4)
    d = S.min_detectable_difference(2, 3, alpha=0.005)
    assert TTestIndPower().power(effect_size=d, nobs1=2, ratio=1.5, alpha=0.005) == pytest.approx(0.8, abs=1e-6)
    for bad in (dict(n_a=1, n_b=1), dict(n_a=0, n_b=4), dict(n_a=2, n_b=2, alpha=1.0)):
        with pytest.raises(ValueError):
            S.min_detectable_difference(**bad)
    with pytest.raises(ValueError):
        S.min_detectable_slope(0.1, 2)


def test_two_sample_difference_by_hand():
    # a = [1, 3], b = [4, 6]: diff -3, pooled variance (2 + 2) / 2 = 2, se = sqrt(2) sqrt(1/2 + 1/2)
    r = S.two_sample_difference([1, 3], [4, 6])
    se = math.sqrt(2.0)
    assert r["diff"] == -3.0 and r["sd_pooled"] == pytest.approx(math.sqrt(2.0)) and r["df"] == 2
    assert r["t"] == pytest.approx(-3.0 / se) and r["p"] == pytest.approx(2 * _t2_sf(3.0 / se), rel=1e-9)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((-3 - 4.302652729911275 * se, -3 + 4.302652729911275 * se))
    # unequal groups: pooled SS = 2 + 8 over 3 df
    u = S.two_sample_difference([1, 3], [2, 4, 6])
    assert u["sd_pooled"] == pytest.approx(math.sqrt(10 / 3)) and u["diff"] == pytest.approx(-2.0)
    # no spread to test against: no p, no interval
    flat = S.two_sample_difference([1, 1], [2, 2])
    assert flat["sd_pooled"] == 0.0 and math.isnan(flat["p"]) and math.isnan(flat["ci_low"])
    one = S.two_sample_difference([1.0], [2.0])
    assert one["df"] == 0 and math.isnan(one["sd_pooled"]) and one["diff"] == -1.0
    with pytest.raises(ValueError):
        S.two_sample_difference([], [1, 2])


def test_anova_min_detectable_f_by_hand():
    from statsmodels.stats.power import FTestAnovaPower
    # where statsmodels' solver works (f < 1) the two agree
    assert S.anova_min_detectable_f(3, 300) == pytest.approx(
        FTestAnovaPower().solve_power(effect_size=None, nobs=300, alpha=0.05, power=0.8, k_groups=3), rel=1e-4)
    # five settings of two models: the answer has the target power (noncentrality f^2 * n)
    f = S.anova_min_detectable_f(5, 10, alpha=0.01)
    crit = sps.f.ppf(0.99, 4, 5)
    assert sps.ncf.sf(crit, 4, 5, f * f * 10) == pytest.approx(0.8, abs=1e-8)
    assert f > S.anova_min_detectable_f(5, 10, alpha=0.05)
    for bad in (dict(n_groups=1, n_total=10), dict(n_groups=5, n_total=5)):
        with pytest.raises(ValueError):
            S.anova_min_detectable_f(**bad)


def test_binomial_excess_by_hand():
    # P(X >= 2), X ~ Bin(3, 1/2) = (3 + 1) / 8
    assert S.binomial_excess(2, 3, 0.5) == pytest.approx(0.5, rel=1e-12)
    # P(X >= 4), X ~ Bin(15, 0.05) = 1 - sum_{j<4} C(15, j) 0.05^j 0.95^(15-j)
    by_hand = 1 - sum(math.comb(15, j) * 0.05 ** j * 0.95 ** (15 - j) for j in range(4))
    assert S.binomial_excess(4, 15, 0.05) == pytest.approx(by_hand, rel=1e-9)
    assert S.binomial_excess(0, 10, 0.05) == pytest.approx(1.0)
    for bad in ((5, 4, 0.5), (-1, 4, 0.5), (1, 0, 0.5), (1, 4, 1.0)):
        with pytest.raises(ValueError):
            S.binomial_excess(*bad)


# --------------------------------------------------------------------------- chance, and what TOST can reach

def test_binomial_upper_detectable_share_by_hand():
    # one trial at null 0.01: rejects at 1 success (0.01 < 0.05), power = q, so q = 0.8
    assert S.binomial_upper_detectable_share(1, 0.01) == pytest.approx(0.8, abs=1e-9)
    # two trials at null 0.1: only 2 successes reject (0.01 < 0.05 <= 0.19), power q^2 -> sqrt(0.8)
    assert S.binomial_upper_detectable_share(2, 0.1) == pytest.approx(math.sqrt(0.8), abs=1e-9)
    assert S.binomial_upper_detectable_share(2, 0.1, power=0.5) == pytest.approx(math.sqrt(0.5), abs=1e-9)
    # ten trials at 1/2: P(X >= 9) = 11/1024 < 0.05 <= P(X >= 8) = 56/1024, power q^10 + 10 q^9 (1 - q)
    q = S.binomial_upper_detectable_share(10, 0.5)
    assert q ** 10 + 10 * q ** 9 * (1 - q) == pytest.approx(0.8, abs=1e-9)
    assert S.binomial_upper_detectable_share(40, 0.5) < q  # more trials, smaller detectable share
    # three fair trials: even 3 of 3 has p = 1/8 >= 0.05, so nothing is detectable
    assert math.isnan(S.binomial_upper_detectable_share(3, 0.5))
    for bad in ((0, 0.5), (2.5, 0.5), (5, 0.0), (5, 1.0)):
        with pytest.raises(ValueError):
            S.binomial_upper_detectable_share(*bad)
    with pytest.raises(ValueError, match="power"):
        S.binomial_upper_detectable_share(5, 0.1, power=1.0)


def test_binomial_upper_tail_by_hand():
    # two or more heads in three fair tosses: (C(3,2) + C(3,3)) / 8
    assert S.binomial_upper_tail(2, 3, 0.5) == pytest.approx(4 / 8, rel=1e-12)
    # 10 or more of 60 tests at 0.05 each: 1 - sum_{j<10} C(60,j) 0.05^j 0.95^(60-j)
    by_hand = 1 - sum(math.comb(60, j) * 0.05 ** j * 0.95 ** (60 - j) for j in range(10))
    assert S.binomial_upper_tail(10, 60, 0.05) == pytest.approx(by_hand, rel=1e-9)
    assert S.binomial_upper_tail(10, 60, 0.05) < 0.001 < S.binomial_upper_tail(6, 60, 0.05)
    assert S.binomial_upper_tail(0, 20, 0.05) == pytest.approx(1.0)
    assert S.binomial_upper_tail(20, 20, 0.05) == pytest.approx(0.05 ** 20, rel=1e-9)
    for bad in ((-1, 5, 0.5), (6, 5, 0.5), (2.5, 5, 0.5), (1, 0, 0.5), (1, 5, 0.0), (1, 5, 1.0), (True, 5, 0.5)):
        with pytest.raises(ValueError):
            S.binomial_upper_tail(*bad)


def test_tost_min_p_is_the_p_of_a_zero_mean_and_no_data_does_better():
    from statsmodels.stats.weightstats import ttost_paired

    n, bound = 200, 0.2
    # data with mean exactly 0: statsmodels' TOST on raw data, bounds -+ bound * sd
    d = np.tile([-1.0, 1.0], n // 2)
    sd = float(np.std(d, ddof=1))
    p_zero = float(ttost_paired(d, np.zeros(n), -bound * sd, bound * sd)[0])
    assert S.tost_min_p(n, bound_d=bound) == pytest.approx(p_zero, rel=1e-9)
    # by hand: s = 0.2 sqrt(200) = 2.828; upper tail of t(199) beyond it
    assert S.tost_min_p(n, bound_d=bound) == pytest.approx(sps.t.sf(0.2 * math.sqrt(200), 199), rel=1e-12)
    # no t statistic gives a smaller TOST p-value
    assert all(S.tost_from_t(t, n, bound_d=bound) >= S.tost_min_p(n, bound_d=bound) - 1e-15
               for t in np.linspace(-4, 4, 81))
    # at the paper's Bonferroni level 0.05/20 TOST at d = 0.2 and n = 200 cannot pass; at 0.05/5 it can
    assert S.tost_min_p(n, bound_d=bound) > 0.05 / 20 and S.tost_min_p(n, bound_d=bound) < 0.05 / 5
    assert S.tost_min_p(10, bound_d=0.0) == 0.5
    for bad in (dict(n=1), dict(n=10.0), dict(n=10, bound_d=-0.1), dict(n=10, bound_d=float("nan"))):
        with pytest.raises(ValueError):
            S.tost_min_p(**{"bound_d": 0.2, **bad})


def test_min_equivalence_bound_inverts_tost_min_p():
    n, a = 200, 0.0025
    b = S.min_equivalence_bound(n, alpha=a)
    assert b == pytest.approx(sps.t.ppf(1 - a, n - 1) / math.sqrt(n), rel=1e-12)
    assert S.tost_min_p(n, bound_d=b) == pytest.approx(a, rel=1e-9)
    assert 0.2 < b < 0.21  # just above the book's default bound
    assert S.min_equivalence_bound(n, alpha=0.01) < b  # a looser level reaches a tighter bound
    for bad in (dict(n=1, alpha=0.05), dict(n=200, alpha=0.0), dict(n=200, alpha=1.2)):
        with pytest.raises(ValueError):
            S.min_equivalence_bound(**bad)


def test_family_verdicts_say_whether_tost_can_pass():
    rng = np.random.default_rng(5)
    rows = [{"model": m, "layer": layer, "high": h, "low": 0.0}
            for m, n in (("small", 200), ("large", 2000)) for layer in range(4) for h in rng.normal(0, 1, n)]
    table = S.audit_table(pd.DataFrame(rows), by=("model", "layer"), high_col="high", low_col="low", alpha=0.05,
                          tost_bound_d=0.2)
    v = S.family_verdicts(table, alpha=0.05).set_index("model")
    # level 0.05/4 = 0.0125: at n = 200, t.sf(2.83, 199) = 0.0026 < 0.0125, so it can pass; with 20 cells it could not
    assert bool(v.loc["small", "tost_can_pass"]) and bool(v.loc["large", "tost_can_pass"])
    assert v.loc["large", "equivalent"] >= 1  # n = 2000 of pure noise: shown small
    rows20 = [{"model": "m", "layer": layer, "high": h, "low": 0.0} for layer in range(20) for h in rng.normal(0, 1, 200)]
    t20 = S.audit_table(pd.DataFrame(rows20), by=("model", "layer"), high_col="high", low_col="low", tost_bound_d=0.2)
    v20 = S.family_verdicts(t20).iloc[0]
    assert not bool(v20["tost_can_pass"]) and v20["equivalent"] == 0
    # without the columns audit_table adds, the column is left out
    assert "tost_can_pass" not in S.family_verdicts(t20.drop(columns=["n"])).columns


@pytest.mark.parametrize("module", ["moeaudit.stats", "moeaudit.corpus"])
def test_the_examples_in_the_docstrings_run(module):
    """Every ``Examples`` section (doctest) of the statistics and corpus modules runs and gives what it shows."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 5, result


def test_rounding_criterion_follows_the_precision_and_the_differences_not_the_largest_value():
    """A real effect among large float64 values is tested; one huge pair does not make a cell untested;
    float32 data whose differences spread by rounding only is untested, and the reason says so truly."""
    rng = np.random.default_rng(0)
    low = np.full(200, 1000.0)
    high = 1000.0 + rng.normal(1e-4, 1e-4, 200)  # float64, d_z about 1
    row = S.paired_effect(high, low).iloc[0]
    assert row.reason == "" and row.cohens_dz == pytest.approx(1.0, abs=0.2) and row.sig_t
    a, b = rng.normal(3.0, 1.0, 200), rng.normal(2.5, 1.0, 200)
    a[0] = b[0] = 5e7  # one pair at 5e7 among ordinary ones
    for precision in ("float64", "float32"):
        assert S.paired_effect(a, b, precision=precision).iloc[0].reason == ""
    # float32 values computed as low + 0.1: the differences spread by float32 rounding only
    low32 = rng.normal(1.0, 0.2, 50).astype(np.float32)
    high32 = (low32 + np.float32(0.1)).astype(np.float32)
    row = S.paired_effect(high32, low32).iloc[0]  # the arrays' dtype says float32
    assert "equal up to float32 rounding" in row.reason and np.isnan(row.cohens_dz)
    unit = S.rounding_unit(high32, low32, "float32")
    assert row.sd_d <= S.ROUNDING_UNITS * unit and f"{unit:.2g}" in row.reason
    # the same numbers handed over as float64 are tested unless their precision is named
    assert S.paired_effect(high32.astype(float), low32.astype(float)).iloc[0].reason == ""
    assert "float32 rounding" in S.paired_effect(high32.astype(float), low32.astype(float),
                                                     precision="float32").iloc[0].reason
    with pytest.raises(ValueError, match="precision='float8'"):
        S.paired_effect(high, low, precision="float8")


def test_rounding_unit_by_hand():
    assert S.rounding_unit([2.0, -4.0, 1.0], [1.0, 3.0, 0.5], "float64") == pytest.approx(2.0 * 2.0 ** -52)
    assert S.rounding_unit([8.0], [1.0], "bfloat16") == 8.0 * 2.0 ** -7
    assert S.rounding_unit([], [], "float32") == 0.0


def test_spearman_on_many_pairs_uses_the_analytic_interval_by_hand():
    rng = np.random.default_rng(1)
    n = S.BOOTSTRAP_MAX_N + 1
    x = rng.normal(size=n)
    y = 0.3 * x + rng.normal(size=n)
    row = S.spearman(x, y).iloc[0]
    rho = sps.spearmanr(x, y).statistic
    half = 1.959963984540054 * math.sqrt((1 + rho ** 2 / 2) / (n - 3))  # Bonett and Wright (2000)
    assert row.rho == pytest.approx(rho) and row.ci_method.startswith("Fisher z")
    assert row.ci_low == pytest.approx(math.tanh(math.atanh(rho) - half))
    assert row.ci_high == pytest.approx(math.tanh(math.atanh(rho) + half)) and row.reason == ""
    small = S.spearman(x[:300], y[:300]).iloc[0]
    assert small.ci_method == "BCa" and small.ci_low < small.rho < small.ci_high
    perfect = S.spearman(x, x).iloc[0]
    assert np.isnan(perfect.ci_low) and "perfect rank correlation" in perfect.reason


def test_a_spread_that_overflows_is_untested_not_a_confident_null():
    rng = np.random.default_rng(0)
    h, lo = np.r_[rng.normal(1, 1, 50), 1e155], np.r_[rng.normal(0, 1, 50), 0.0]
    row = S.paired_effect(h, lo).iloc[0]
    assert "overflows" in row.reason and np.isnan(row.cohens_dz) and np.isnan(row.p_t) and not row.sig_dual


def test_sign_test_power_and_detectable_share_by_hand():
    # n = 10, 5% level: only k in {0, 1, 9, 10} reject (p = 22/1024 at k = 9, 112/1024 at k = 8)
    q = 0.8
    by_hand = q ** 10 + 10 * q ** 9 * (1 - q) + (1 - q) ** 10 + 10 * (1 - q) ** 9 * q
    assert S.sign_test_power(q, 10) == pytest.approx(by_hand, rel=1e-12)
    assert S.sign_test_power(0.5, 10) == pytest.approx(22 / 1024, rel=1e-12)
    share = S.sign_test_detectable_share(10)
    assert share ** 10 + 10 * share ** 9 * (1 - share) + (1 - share) ** 10 + 10 * (1 - share) ** 9 * share \
        == pytest.approx(0.8, abs=1e-8)
    # more values detect a smaller excess; a stricter level needs a larger one
    assert 0.5 < S.sign_test_detectable_share(200) < S.sign_test_detectable_share(200, alpha=0.05 / 8) < share
    assert math.isnan(S.sign_test_detectable_share(2))  # two values can never reach p < 0.05
    for bad in ({"share": 1.5, "n": 10}, {"share": 0.6, "n": 0}):
        with pytest.raises(ValueError):
            S.sign_test_power(bad["share"], bad["n"])
    with pytest.raises(ValueError):
        S.sign_test_detectable_share(10, power=1.0)


def test_exact_spearman_test_by_hand():
    # n = 3 in the same order: of the 6 orderings rho takes 1, 0.5, 0.5, -0.5, -0.5, -1; |rho| >= 1 twice
    rho, p, m = S.spearman_exact([1.0, 2.0, 3.0], [5.0, 7.0, 9.0])
    assert (rho, m) == (1.0, 6) and p == pytest.approx(2 / 6, abs=1e-12)
    # n = 6, one adjacent swap: sum d^2 = 2, rho = 1 - 6*2/210; |rho| >= that for 1 + 5 orderings each side
    rho, p, m = S.spearman_exact([1, 2, 3, 4, 5, 6], [2, 1, 3, 4, 5, 6])
    assert rho == pytest.approx(1 - 12 / 210) and m == 720 and p == pytest.approx(12 / 720, abs=1e-12)
    # the enumeration gives SciPy's exact permutation test of |rho|, ties included
    x, y = np.array([0.3, 1.2, 0.7, 2.0, 1.1, 0.9]), np.array([5.0, 4.0, 4.0, 6.0, 1.0, 2.0])
    ref = sps.permutation_test((x, y), S._abs_spearman, permutation_type="pairings", vectorized=True,
                               n_resamples=np.inf, alternative="greater")
    assert S.spearman_exact(x, y)[1] == pytest.approx(ref.pvalue, abs=1e-12)
    rho, p, _ = S.spearman_exact([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0) and p == pytest.approx(2 / 720, abs=1e-12)
    for bad in (([1, 2, 3], [1, 2]), ([1, 2], [1, 2]), ([1, 1, 1], [1, 2, 3]), ([1, 2, np.nan], [1, 2, 3]),
                (list(range(10)), list(range(10)))):
        with pytest.raises(ValueError):
            S.spearman_exact(*bad)


def test_exact_spearman_critical_value_by_hand():
    # n = 6: sum d^2 <= 4 for 12 orderings (two-sided 24/720 = 0.033 <= 0.05), sum d^2 <= 6 for 21 (0.058)
    assert S.spearman_exact_critical(6) == pytest.approx(31 / 35, abs=1e-12)
    assert S.spearman_exact_critical(6, alpha=0.01) == pytest.approx(1.0)  # 2/720 <= 0.01 < 12/720
    assert S.spearman_exact_critical(5) == pytest.approx(1.0)  # 2/120 <= 0.05 < 10/120
    assert math.isnan(S.spearman_exact_critical(3))  # 2/6 > 0.05: nothing is significant
    for bad in ({"n": 2}, {"n": 10}, {"n": 6, "alpha": 0.0}):
        with pytest.raises(ValueError):
            S.spearman_exact_critical(**bad)


def test_exact_spearman_power_and_min_detectable():
    # at rho = 0 the power is the exact size 24/720 (Monte Carlo standard error 0.0013 at 20000 samples)
    assert S.spearman_exact_power(6, 0.0) == pytest.approx(24 / 720, abs=0.005)
    assert S.spearman_exact_power(3, 0.9) == 0.0  # no critical value at n = 3
    low, high = S.spearman_exact_power(6, 0.5), S.spearman_exact_power(6, 0.95)
    assert low < high and S.spearman_exact_power(9, 0.5) > low  # more pairs, more power
    r = S.spearman_min_detectable(6, n_sim=5000)
    assert S.spearman_exact_power(6, r, n_sim=5000) >= 0.8 > S.spearman_exact_power(6, r - 0.01, n_sim=5000)
    assert math.isnan(S.spearman_min_detectable(3, n_sim=500))
    for bad in ({"rho": 1.0}, {"rho": 0.5, "n_sim": 10}, {"rho": 0.5, "alpha": 1.5}):
        with pytest.raises(ValueError):
            S.spearman_exact_power(6, **bad)


def test_uniform_rank_pvalue_by_hand():
    assert S.uniform_rank_pvalue(1, 8) == 0.125 and S.uniform_rank_pvalue(8, 8) == 1.0
    with pytest.raises(ValueError, match="rank"):
        S.uniform_rank_pvalue(0, 8)
    with pytest.raises(ValueError, match="rank"):
        S.uniform_rank_pvalue(9, 8)


def test_uniform_rank_sum_pvalue_by_hand():
    # sizes (2, 3): S = R1 + R2 takes 2..5 with counts 1, 2, 2, 1 out of 6
    assert math.isclose(S.uniform_rank_sum_pvalue([1, 1], [2, 3]), 1 / 6)
    assert math.isclose(S.uniform_rank_sum_pvalue([1, 2], [2, 3]), 3 / 6)
    assert math.isclose(S.uniform_rank_sum_pvalue([2, 2], [2, 3]), 5 / 6)
    assert math.isclose(S.uniform_rank_sum_pvalue([2, 3], [2, 3]), 1.0)
    assert math.isclose(S.uniform_rank_sum_pvalue([3], [4]), 0.75)  # one layer: r / n
    with pytest.raises(ValueError, match="one length"):
        S.uniform_rank_sum_pvalue([1], [2, 3])


def test_uniform_rank_sum_critical_by_hand():
    # sizes (2, 3): P(S <= 2) = 1/6, P(S <= 3) = 1/2
    assert S.uniform_rank_sum_critical([2, 3], alpha=0.2) == 2.0
    assert S.uniform_rank_sum_critical([2, 3], alpha=0.5) == 3.0
    assert math.isnan(S.uniform_rank_sum_critical([2, 3], alpha=0.1))
    with pytest.raises(ValueError, match="alpha"):
        S.uniform_rank_sum_critical([2, 3], alpha=1.5)
