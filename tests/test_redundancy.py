"""The redundancy analysis (moeaudit.chapters.redundancy) against hand-computed values on tiny frames."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moeaudit.chapters import redundancy as R
from moeaudit import stats as S
from moeaudit.tooling.training import SPECS, build_model, count_parameters
from moeaudit.zoo import REDUNDANCY_MODELS, REDUNDANCY_SEEDS, REDUNDANCY_SETTINGS, SHIPPED_MODELS, ZOO_MODELS

SETTINGS = [(64, 2), (64, 4), (64, 8), (64, 16), (8, 2)]


def _members(seeds=(0, 1)):
    layouts = {f"m-e{E}-k{k}-s{s}": SimpleNamespace(num_experts=E, top_k=k) for E, k in SETTINGS for s in seeds}
    return R.member_table(layouts, seeds={n: int(n[-1]) for n in layouts})


def test_member_table_columns_and_refusal():
    m = _members()
    assert list(m.columns) == ["model", "n_experts", "top_k", "k_over_E", "setting", "seed"]
    row = m.set_index("model").loc["m-e8-k2-s1"]
    assert row.k_over_E == 0.25 and row.setting == "E=8, top-2" and row.seed == 1
    with pytest.raises(ValueError, match="compares routing settings"):
        R.member_table({"a": SimpleNamespace(num_experts=64, top_k=8), "b": SimpleNamespace(num_experts=64, top_k=8)})


def _cells(rows):
    return pd.DataFrame(rows, columns=["model", "ranking", "layer", "cohens_dz", "sig_dual_bonf"])


def test_validity_counts_only_positive_dual_significant_cells():
    t = _cells([("a", "x", 0, 0.3, True), ("a", "x", 1, -0.4, True), ("a", "x", 2, 0.5, False),
                ("a", "y", 0, 0.1, np.nan), ("b", "x", 0, 0.2, True)])
    v = R.validity_by_model(t).set_index(["model", "ranking"])
    assert v.loc[("a", "x")].tolist()[:3] == [3, 1, 1]  # cells, valid, negative
    assert v.loc[("a", "x"), "max_abs_dz"] == pytest.approx(0.5)
    assert v.loc[("a", "x"), "mean_dz"] == pytest.approx((0.3 - 0.4 + 0.5) / 3)
    assert v.loc[("a", "y"), "valid_cells"] == 0  # an untested cell (NaN flag) is not valid
    assert v.loc[("b", "x"), "valid_cells"] == 1


def test_gap_growth_is_relative_to_the_first_audited_layer():
    rec = pd.DataFrame({"model": ["a"] * 4 + ["b"] * 2, "layer": [1, 1, 3, 3, 0, 2],
                        "gap_norm": [1.0, 3.0, 10.0, 30.0, 0.5, 0.5]})
    g = R.gap_growth(rec).set_index(["model", "layer"])
    assert g.loc[("a", 1), "mean_gap"] == 2.0 and g.loc[("a", 3), "growth"] == 10.0
    assert g.loc[("b", 2), "growth"] == 1.0


def test_setting_anova_by_hand():
    s = pd.DataFrame({"setting": ["p", "p", "q", "q", "r", "r"], "v": [1.0, 3.0, 2.0, 4.0, 10.0, 12.0]})
    a = R.setting_anova(s, quantities=["v"]).iloc[0]
    # means 2, 3, 11; grand mean 16/3; SS_between = 2 * sum (m - 16/3)^2; SS_within = 3 * 2
    ssb = 2 * ((2 - 16 / 3) ** 2 + (3 - 16 / 3) ** 2 + (11 - 16 / 3) ** 2)
    assert a.F == pytest.approx((ssb / 2) / (6 / 3))
    assert a.df_between == 2 and a.df_within == 3
    assert a.sd_seed == pytest.approx(math.sqrt(2))
    assert a.sd_between == pytest.approx(np.std([2, 3, 11], ddof=1))
    assert a.eta_sq == pytest.approx(ssb / (ssb + 6))
    same = R.setting_anova(s.assign(v=[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]), quantities=["v"]).iloc[0]
    assert np.isnan(same.F) and np.isnan(same.p) and same.ratio == math.inf
    one = R.setting_anova(s.iloc[[0, 2, 4]], quantities=["v"]).iloc[0]
    assert np.isnan(one.F) and one.df_within == 0 and np.isnan(one.ratio) and np.isnan(one.eta_sq)


def _summary(**columns):
    m = _members()
    out = m.copy()
    for name, f in columns.items():
        out[name] = [f(r) for r in m.itertuples()]
    return out


def test_trend_against_k_recovers_an_exact_slope_and_a_flat_line():
    s = _summary(q=lambda r: 2.0 - 0.5 * math.log2(r.top_k) + (0.1 if r.seed else -0.1))
    tr = R.trend_against_k(s, quantity="q")
    assert tr["n_experts"] == 64 and tr["n"] == 8 and tr["ks"] == [2, 4, 8, 16]  # the E=8 models are left out
    assert tr["slope"] == pytest.approx(-0.5) and tr["ci_low"] < -0.5 < tr["ci_high"] < 0
    assert tr["p"] < 1e-4 and tr["spearman_rho"] < -0.9 and np.isnan(tr["value"])
    assert tr["seed_slopes"] == pytest.approx({0: -0.5, 1: -0.5})  # each seed's own fit
    # against the true slope as reference, the test does not reject; against another it does
    assert R.trend_against_k(s, quantity="q", reference_slope=-0.5)["p"] > 0.99
    assert R.trend_against_k(s, quantity="q", reference_slope=-1.0)["p"] < 1e-4
    flat = R.trend_against_k(_summary(q=lambda r: 0), quantity="q")
    assert np.isnan(flat["slope"]) and np.isnan(flat["p"]) and flat["value"] == 0  # nothing to fit, not "p = 1"
    with pytest.raises(ValueError, match="two values of k"):
        R.trend_against_k(_summary(q=lambda r: r.seed), quantity="q", n_experts=8)


def test_holm_by_hand_and_nan_outside_the_family():
    # sorted p 0.01, 0.02, 0.04 over m = 3: 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    from moeaudit.stats import holm

    out = holm([0.04, np.nan, 0.01, 0.02])
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[2, 3, 0]], [0.03, 0.04, 0.04])


def _full(**over):
    """A family summary with every quantity the checks read; ``over`` replaces columns by functions
    of the row. By default: the damage and its size fall like the removed output (1/k), so the
    per-unit quantities are flat up to seed noise, and nothing else moves."""
    noise = lambda r: 0.002 * (1 if r.seed else -1) * (1 + math.log2(r.top_k) % 2)  # noqa: E731
    base = dict(single_mean_dl=lambda r: 0.05 / r.top_k * (1 + noise(r)),
                single_mean_abs_dl=lambda r: 0.4 / r.top_k * (1 + noise(r)),
                single_mean_gap=lambda r: 0.1 / r.top_k,
                control_mean_dz=lambda r: 0.05 + 10 * noise(r), audit_valid_cells=lambda r: 0,
                deepest_mean_dl=lambda r: 0.2 + 10 * noise(r), audit_max_abs_dz=lambda r: 0.1 + noise(r),
                control_valid_cells=lambda r: 0, gap_growth=lambda r: 1.0 + noise(r))
    base.update(over)
    s = _summary(**base)
    s["single_dl_per_gap"] = s.single_mean_dl / s.single_mean_gap
    s["single_abs_dl_per_gap"] = s.single_mean_abs_dl / s.single_mean_gap
    return s


def _texts(s, **kw):
    validity = pd.DataFrame({"model": s.model, "ranking": "x", "cells": 4, "valid_cells": 0})
    return R.answer_text(s, validity, R.setting_anova(s), R.explanation_checks(s), alpha=0.05,
                         shares=R.share_checks(s), pools=R.pool_comparison(s), **kw)


def test_explanation_checks_compare_observed_with_predicted_direction():
    s = _full(control_mean_dz=lambda r: 0.1 * math.log2(r.top_k) + 0.01 * r.seed,
              deepest_mean_dl=lambda r: 0.2 * r.top_k + 0.01 * r.seed)
    c = R.explanation_checks(s, alpha=0.05).set_index("check")
    dmg, size = c.loc["single-expert damage shrinks with k"], c.loc["single-expert effect size shrinks with k"]
    assert dmg.observed == "falls" and bool(dmg.holds) and not dmg.specific  # the share predicts it as well
    assert size.observed == "falls" and bool(size.holds) and not size.specific
    assert c.loc["effect size per unit of removed output shrinks with k", "specific"]
    assert c.loc["control signal shrinks with k", "observed"] == "grows"  # significant, the other way
    assert bool(c.loc["control signal shrinks with k", "holds"]) is False
    assert c.loc["observational validity shrinks with k", "observed"] == "untested"  # all zero: nothing to fit
    assert pd.isna(c.loc["observational validity shrinks with k", "holds"])
    assert pd.isna(c.loc["deepest-removal damage against k", "holds"])
    # Holm over the fitted rows; the power of each test at Holm's strictest level
    fitted = c.p.notna()
    np.testing.assert_allclose(c.p_holm[fitted], R.holm(c.p[fitted]))
    m = int(fitted.sum())
    ctl = c.loc["control signal shrinks with k"]
    assert ctl.min_detectable_slope == pytest.approx(S.min_detectable_slope(ctl.stderr, 8, alpha=0.05 / m))
    assert np.isnan(c.loc["observational validity shrinks with k", "min_detectable_slope"])
    # a trend that is not detected is inconclusive, not a refutation
    noisy = s.assign(control_mean_dz=[0.05 + 0.04 * ((-1) ** i) for i in range(len(s))])
    n = R.explanation_checks(noisy).set_index("check").loc["control signal shrinks with k"]
    assert n.observed == "not detected" and pd.isna(n.holds)
    text = _texts(s.assign(audit_max_abs_dz=0.1, control_valid_cells=0), mde_audit=0.271, mde_control=0.238)
    assert text["validity"].startswith("**No valid cell is detected.**") and "d_z = 0.271 with 80% power" in text["validity"]
    assert "shrinks as k falls" in text["control"] and "d_z = 0.238" in text["control"]
    assert "Holm-adjusted over 6 trends" in text["control"]
    ex = text["explanation"]
    assert "a single-expert ablation damages the model less (smaller mean ΔL) as top-k grows. *Observed:* the mean ΔL " \
           "of a single-expert ablation falls as top-k grows" in ex
    assert ex.count("**Holds, but not specifically:**") == 2 and "**Holds.**" not in ex
    assert ex.count("**Contradicted.**") == 1 and "*Not testable here:* every model has the value 0" in ex
    assert "The data contradict the explanation where it predicts that the routing-weight control's signal" in ex
    # both unspecific falls (the damage and |ΔL|) carry the caveat together
    assert ("but the output-share alternative predicts each of these falls as well, so none of them alone shows "
            "compensation") in ex
    one = R._explanation_summary(R.explanation_checks(s).assign(
        specific=lambda d: d.quantity != "single_mean_dl"))
    assert "predicts that fall as well, so it alone does not show compensation" in one


def test_size_alone_does_not_make_the_damage_prediction_hold():
    # |ΔL| falls cleanly, the signed mean only scatters: the damage row is not detected, not "Holds"
    s = _full(single_mean_dl=lambda r: 0.01 * ((-1) ** (r.seed + int(math.log2(r.top_k)))))
    c = R.explanation_checks(s).set_index("check")
    assert c.loc["single-expert damage shrinks with k", "observed"] == "not detected"
    assert pd.isna(c.loc["single-expert damage shrinks with k", "holds"])
    assert bool(c.loc["single-expert effect size shrinks with k", "holds"])
    ex = _texts(s)["explanation"]
    damage_line = next(line for line in ex.splitlines() if "damages the model less" in line)
    assert "**Not detected** (inconclusive, not a refutation)" in damage_line and "Holds" not in damage_line
    assert "with 80% power at Holm's strictest level (0.05/" in damage_line and "equivalence (TOST" in damage_line
    assert "while its mean, the damage, shows no detectable trend" in ex
    assert "fewer active experts make a single expert's removal change the loss by more" not in ex


def test_a_fall_beyond_the_removed_output_is_specific_support():
    # the loss change falls like 1/k^2 while the removed output falls like 1/k: the per-unit rows fall
    s = _full(single_mean_abs_dl=lambda r: 0.4 / r.top_k ** 2 * (1 + 0.01 * r.seed),
              single_mean_dl=lambda r: 0.1 / r.top_k ** 2 * (1 + 0.01 * r.seed))
    c = R.explanation_checks(s).set_index("check")
    row = c.loc["effect size per unit of removed output shrinks with k"]
    assert row.observed == "falls" and bool(row.holds) and row.specific
    ex = _texts(s)["explanation"]
    assert ex.count("**Holds.**") == 2  # the two per-unit rows
    assert "They support it, beyond what the output-share alternative explains, where the damage per unit" in ex


def test_seed_directions_flag_a_seed_that_goes_the_other_way():
    # seed 0 falls steeply, seed 1 rises a little: pooled slope negative, the seeds disagree
    s = _full(control_mean_dz=lambda r: (-0.2 if r.seed == 0 else 0.02) * math.log2(r.top_k))
    c = R.explanation_checks(s).set_index("check").loc["control signal shrinks with k"]
    assert c.seed_slopes == pytest.approx({0: -0.2, 1: 0.02}) and not bool(c.seeds_agree)
    text = _texts(s)["control"]
    assert "+0.02 (seed 1)" in text and "the seeds' slopes differ in sign" in text
    same = R.explanation_checks(_full()).set_index("check").loc["single-expert effect size shrinks with k"]
    assert bool(same.seeds_agree)


def test_share_checks_compare_the_log_log_slope_with_minus_one():
    jitter = lambda r: 1 + 0.01 * (1 if r.seed else -1)  # noqa: E731
    cases = {"not distinguishable from 1/k": lambda r: 0.1 / r.top_k * jitter(r),
             "shallower than 1/k": lambda r: 0.1 * r.top_k ** -0.3 * jitter(r),
             "steeper than 1/k": lambda r: 0.1 * r.top_k ** -2.0 * jitter(r)}
    for relation, gap in cases.items():
        s = _full(single_mean_gap=gap)
        sh = R.share_checks(s).set_index("quantity")
        assert sh.loc["single_mean_gap", "relation"] == relation, relation
        if relation != "not distinguishable from 1/k":
            assert sh.loc["single_mean_gap", "p_holm"] < 0.05
    s = _full(single_mean_gap=cases["shallower than 1/k"])
    sh = R.share_checks(s).set_index("quantity")
    assert sh.loc["single_mean_gap", "slope"] == pytest.approx(-0.3, abs=0.01)
    assert sh.loc["single_mean_abs_dl", "relation"] == "not distinguishable from 1/k"  # |ΔL| = 0.4 / k by default
    logs = sh.drop(index="single_k_mean_dl")
    np.testing.assert_allclose(logs.p_holm, R.holm(logs.p))  # the damage row is a separate test
    assert sh.loc["single_k_mean_dl", "p_holm"] == pytest.approx(sh.loc["single_k_mean_dl", "p"])
    text = _texts(s)["share"]
    assert "slope of −1 per doubling of k" in text and "the removed output shrinks more slowly than a 1/k share" in text
    assert f"factor {2 ** sh.loc['single_mean_gap', 'slope']:.3g} per doubling" in text
    assert "per unit of removed output" in text
    # a value that is not positive has no logarithm
    bad = R.share_checks(_full(single_mean_abs_dl=lambda r: 0.0 if r.top_k == 4 else 0.1)).set_index("quantity")
    assert bad.loc["single_mean_abs_dl", "relation"] == "untested"
    assert "no logarithm" in bad.loc["single_mean_abs_dl", "reason"]


def test_pool_comparison_by_hand():
    s = _full(control_mean_dz=lambda r: {(8, 2): [1.0, 3.0], (64, 2): [4.0, 6.0], (64, 16): [1.5, 2.5]}.get(
        (r.n_experts, r.top_k), [0.0, 0.0])[r.seed])
    p = R.pool_comparison(s, quantities=["control_mean_dz"])
    same_k = p.set_index("comparison").loc["same k"]
    assert same_k.reference == "E=64, top-2" and same_k.n_experts == 8 and same_k.n_experts_ref == 64
    # [1, 3] against [4, 6]: difference -3, pooled SD sqrt(2), t = -3 / sqrt(2) on 2 df
    t = 3 / math.sqrt(2)
    assert same_k["diff"] == -3.0 and same_k.df == 2 and same_k.sd_pooled == pytest.approx(math.sqrt(2))
    assert same_k.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)  # 2 * upper tail of t on 2 df
    assert bool(same_k.ranges_overlap) is False and same_k.observed == "not detected"
    same_ke = p.set_index("comparison").loc["same k/E"]
    assert same_ke.reference == "E=64, top-16" and same_ke["diff"] == 0.0 and bool(same_ke.ranges_overlap)
    np.testing.assert_allclose(p.p_holm, R.holm(p.p))
    assert same_k.min_detectable_sd == pytest.approx(S.min_detectable_difference(2, 2, alpha=0.05 / 2))
    assert same_k.min_detectable_diff == pytest.approx(same_k.min_detectable_sd * math.sqrt(2))
    assert bool(same_ke.closer) and not bool(same_k.closer)


def test_pool_comparison_verdicts_and_what_cannot_be_concluded():
    # the small pool matches the same-k setting and differs clearly from the same-k/E one
    s = _full(control_mean_dz=lambda r: (5.0 if r.top_k == 2 else 1.0) + 0.001 * r.seed)
    p = R.pool_comparison(s).set_index(["quantity", "comparison"])
    assert p.loc[("control_mean_dz", "same k/E"), "observed"] == "higher"
    assert p.loc[("control_mean_dz", "same k"), "observed"] == "not detected"
    text = _texts(s)["pool"]
    line = next(line for line in text.splitlines() if line.startswith("- The control's mean d_z"))
    holm_ke = p.loc[("control_mean_dz", "same k/E"), "p_holm"]
    assert (f"At the same k/E the two settings differ in it (Holm-adjusted p = {holm_ke:.2g}), which may come from their "
            "different top-k or from the smaller pool's parameter count, so k/E alone does not set it.") in line
    assert "nearer the same k setting (not a test)" in line
    assert "a k/E 8 times larger" in text and "fewer expert parameters" in text
    assert "on 2 degrees of freedom" in text and "in 0.33 of equally likely orderings" in text
    assert "is not evidence that top-k alone, or k/E alone, sets the quantity" in text
    # and the other way round: at the same top-k the pool changes the quantity
    other = _texts(_full(control_mean_dz=lambda r: (5.0 if r.n_experts == 8 else 1.0) + 0.001 * r.seed))["pool"]
    assert "At the same top-k the two pools differ in it (Holm-adjusted p = " in other
    assert "so top-k alone does not set it; the difference may come from k/E or from the smaller pool's parameter" in other
    # nothing detected: the family cannot tell
    assert "cannot tell top-k from k/E" in text
    # one model per setting: no test; one pool only: nothing to compare
    one = R.pool_comparison(s[s.seed == 0])
    assert (one.observed == "untested").all() and one.reason.str.contains("one model per setting").all()
    assert R.pool_comparison(s[s.n_experts == 64]).empty
    assert "same number of experts" in _texts(s[s.n_experts == 64])["pool"]
    # a reference setting that is missing is reported, not raised
    gap = R.pool_comparison(s[s.top_k != 16]).set_index("comparison")
    assert (gap.loc["same k/E", "observed"] == "untested").all()
    assert gap.loc["same k/E", "reason"].str.contains("no model with E=64 and top-16").all()


def test_setting_anova_states_the_power_of_its_nulls():
    s = _full()
    a = R.setting_anova(s, alpha=0.05, power=0.8).set_index("quantity")
    m = int(a.p.notna().sum())
    row = a.loc["control_mean_dz"]
    f = S.anova_min_detectable_f(5, 10, alpha=0.05 / m, power=0.8)
    assert row.min_detectable_f == pytest.approx(f)
    # in sd_between's convention (ddof=1): Cohen's f uses the G-divisor SD of the setting means
    g = int(row.settings)
    assert row.min_detectable_sd == pytest.approx(f * row.sd_seed * math.sqrt(g / (g - 1)))
    text = _texts(s)["seeds"]
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    ctl = lines["- mean Cohen's d_z of the routing-weight control over the audited layers"]
    assert "not distinguishable from" in ctl and f"Cohen's f = {f:.2f}" in ctl
    size = lines["- mean size |ΔL| of the loss change of a single-expert ablation (nats), over positions, layers and " 
                 "experts"]
    assert "larger than" in size and "Cohen's f" not in size  # a detected effect needs no power statement


def test_validity_text_states_equivalence_and_chance():
    s = _full()
    base = pd.DataFrame({"model": s.model, "ranking": "x", "cells": 16, "valid_cells": 0, "equivalent_cells": 0,
                         "tost_bound_d": 0.2, "min_tost_bound": 0.195})
    v = R.answer_text(s, base, R.setting_anova(s), R.explanation_checks(s), alpha=0.05)["validity"]
    assert "0 of 160 cells are demonstrably inside ±0.2 d_z" in v and "only for an observed |d_z| below 0.005" in v
    never = R.answer_text(s, base.assign(min_tost_bound=0.25), R.setting_anova(s), R.explanation_checks(s),
                          alpha=0.05)["validity"]
    assert "it cannot pass there for any data" in never
    # one model of ten with a valid cell: chance alone gives that with probability 1 - 0.95^10
    one = base.assign(valid_cells=[1] + [0] * (len(base) - 1))
    text = R.answer_text(s, one, R.setting_anova(s), R.explanation_checks(s), alpha=0.05)["validity"]
    assert text.startswith("**In places.**") and f"at most {1 - 0.95 ** 10:.2g}" in text
    assert "not more than chance gives at that level" in text
    many = base.assign(valid_cells=[1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    text = R.answer_text(s, many, R.setting_anova(s), R.explanation_checks(s), alpha=0.05)["validity"]
    assert ": more than chance gives at that level" in text


def test_validity_by_model_carries_equivalence_counts():
    t = _cells([("a", "x", 0, 0.01, False), ("a", "x", 1, 0.3, True)]).assign(
        equivalent=[True, False], tost_bound_d=0.2, n=200, alpha_corrected=0.05 / 16)
    v = R.validity_by_model(t).iloc[0]
    assert v.equivalent_cells == 1 and v.tost_bound_d == 0.2
    assert v.min_tost_bound == pytest.approx(S.min_equivalence_bound(200, alpha=0.05 / 16))


def test_per_model_table_from_hand_records():
    m = R.member_table({"a": SimpleNamespace(num_experts=8, top_k=2), "b": SimpleNamespace(num_experts=64, top_k=8)},
                       seeds={"a": 0, "b": 0})
    audit = pd.DataFrame({"model": ["a", "a", "b"], "ranking": "x", "layer": [0, 1, 0], "cohens_dz": [0.5, -0.7, 0.1],
                          "sig_dual_bonf": [True, False, False]})
    control = pd.DataFrame({"model": ["a", "a", "b"], "ranking": "w", "layer": [0, 1, 0], "cohens_dz": [0.2, 0.4, 0.3],
                            "sig_dual_bonf": [True, True, False]})
    single = pd.DataFrame({"model": ["a", "a", "b", "b"], "layer": [0, 1, 0, 0], "delta_loss": [-1.0, 3.0, 0.5, 0.5],
                           "gap_norm": [1.0, 4.0, 2.0, 2.0]})
    prog = pd.DataFrame({"model": ["a", "b", "b", "b"], "k": [1, 1, 7, 7], "delta_loss": [0.3, 9.0, 1.0, 2.0]})
    s = R.per_model_table(m, audit=audit, control=control, single=single, progressive=prog).set_index("model")
    assert s.loc["a", "audit_max_abs_dz"] == pytest.approx(0.7) and s.loc["a", "audit_valid_cells"] == 1
    assert s.loc["a", "control_mean_dz"] == pytest.approx(0.3) and s.loc["a", "control_valid_cells"] == 2
    assert s.loc["a", "single_mean_abs_dl"] == pytest.approx(2.0) and s.loc["a", "gap_growth"] == pytest.approx(4.0)
    # signed mean (-1 + 3) / 2 = 1, size (1 + 3) / 2 = 2, gap (1 + 4) / 2 = 2.5: ratios of means
    assert s.loc["a", "single_mean_dl"] == pytest.approx(1.0) and s.loc["a", "single_mean_gap"] == pytest.approx(2.5)
    assert s.loc["a", "single_dl_per_gap"] == pytest.approx(0.4)
    assert s.loc["a", "single_abs_dl_per_gap"] == pytest.approx(0.8)
    assert s.loc["b", "deepest_mean_dl"] == pytest.approx(1.5)  # k = 7 only
    with pytest.raises(KeyError, match="progressive"):
        R.per_model_table(m, audit=audit, control=control, single=single, progressive=prog[prog.model == "a"])
    with pytest.raises(KeyError, match="lacks the quantities"):
        R.explanation_checks(s.reset_index().drop(columns="single_mean_dl"))


# ----------------------------------------------------------------------------- the shipped family
def test_family_names_specs_and_budget():
    assert len(REDUNDANCY_MODELS) == len(REDUNDANCY_SETTINGS) * len(REDUNDANCY_SEEDS)
    assert set(SHIPPED_MODELS) == set(ZOO_MODELS) | set(REDUNDANCY_MODELS)
    base = SPECS["tiny-olmoe"]["config"]
    total_mb = 0.0
    for name in REDUNDANCY_MODELS:
        spec = SPECS[name]
        E, k, seed = spec["config"]["num_experts"], spec["config"]["num_experts_per_tok"], spec["seed"]
        assert name == f"olmoe-e{E}-k{k}-s{seed}"
        # everything but the routing equals the default OLMoE stand-in's recipe, at 4 layers
        same = {key: v for key, v in spec["config"].items() if key not in ("num_experts", "num_experts_per_tok",
                                                                          "num_hidden_layers")}
        assert same == {key: v for key, v in base.items() if key not in ("num_experts", "num_experts_per_tok")}
        assert spec["config"]["num_hidden_layers"] == 4 and spec["class"] == "OlmoeForCausalLM"
        if seed == REDUNDANCY_SEEDS[0]:
            total_mb += count_parameters(build_model(name))["total"] * 2 / 2**20  # bfloat16 on disk
    assert total_mb * len(REDUNDANCY_SEEDS) <= 50


def test_default_models_have_eight_layers():
    for name in ZOO_MODELS:
        model = build_model(name)
        assert model.config.num_hidden_layers == 8
        assert count_parameters(model)["total"] * 2 / 2**20 <= 10  # bfloat16 on disk


def test_checks_without_enough_models_are_reported_untested():
    s = _full()
    two = s[s.model.isin(["m-e64-k2-s0", "m-e64-k8-s0"])]
    c = R.explanation_checks(two)
    assert (c.observed == "untested").all() and c.holds.isna().all() and c.reason.str.contains("three models").all()
    assert c.min_detectable_slope.isna().all()
    anova = R.setting_anova(two)
    assert anova[["F", "p", "ratio", "eta_sq", "p_holm", "min_detectable_f"]].isna().all().all()  # one model per setting
    shares = R.share_checks(two)
    assert (shares.relation == "untested").all()
    text = R.answer_text(two, pd.DataFrame({"model": two.model, "ranking": "x", "cells": 4, "valid_cells": 0}),
                         anova, c, alpha=0.05, shares=shares, pools=R.pool_comparison(two))
    assert "No trend can be fitted" in text["control"]
    assert text["explanation"].count("*Not testable here:*") == 6 and "No prediction could be decided" in text["explanation"]
    assert "no spread between models of one setting" in text["seeds"]
    assert text["share"].count("not testable here") == 2
    assert "same number of experts" in text["pool"]


def test_share_checks_test_the_signed_damage_against_one_over_k():
    jitter = lambda r: 1 + 0.01 * (1 if r.seed else -1)  # noqa: E731
    cases = {"not distinguishable from 1/k": lambda r: 0.02 / r.top_k * jitter(r),
             "steeper than 1/k": lambda r: 0.02 * r.top_k ** -2.0 * jitter(r),
             "shallower than 1/k": lambda r: 0.02 * r.top_k ** -0.3 * jitter(r)}
    for relation, dl in cases.items():
        s = _full(single_mean_dl=dl)
        row = R.share_checks(s).set_index("quantity").loc["single_k_mean_dl"]
        assert row.relation == relation, relation
        # k · mean ΔL against log2 k, by hand
        big = s[s.n_experts == s.n_experts.mode().iloc[0]]
        slope = np.polyfit(np.log2(big.top_k), big.top_k * big.single_mean_dl, 1)[0]
        assert row.slope == pytest.approx(slope, rel=1e-9)
    text = _texts(_full(single_mean_dl=cases["steeper than 1/k"],
                        single_mean_abs_dl=lambda r: 0.4 * r.top_k ** -0.5 * jitter(r)))["share"]
    assert "The damage (mean ΔL) times k changes by" in text and "the damage falls faster than a 1/k share" in text
    assert "needs no compensation to be explained (it is not fitted by a 1/k share either" in text
    assert "1/k share explains" not in text  # a slope shallower than -1 is not the 1/k share's
    assert "but the fall of the damage is steeper than a 1/k share" in text
    flat = _texts(_full(single_mean_dl=cases["not distinguishable from 1/k"]))["share"]
    assert "not distinguishable from a damage that falls like 1/k" in flat and "which is steeper" not in flat
    assert "at the level 0.05; equivalence" in flat  # a single test: no Holm level
    assert "whether the fall of the damage does is not decided" in _texts(_full(
        single_mean_dl=cases["not distinguishable from 1/k"], single_mean_abs_dl=lambda r: 0.4 * r.top_k ** -0.5 * jitter(r)))["share"]


def test_observed_names_an_unadjusted_interval_that_excludes_zero():
    r = pd.Series({"quantity": "single_dl_per_gap", "observed": "not detected", "slope": -0.116, "ci_low": -0.214,
                   "ci_high": -0.0168, "p": 0.029, "p_holm": 0.086, "value": np.nan})
    t = R._observed(r, 3)
    assert "no trend with top-k detected after Holm's adjustment" in t and "unadjusted 95% CI [-0.214, -0.0168]" in t
    assert "the unadjusted interval excludes zero, the Holm-adjusted test does not reject" in t
    assert "excludes zero" not in R._observed(r.copy().replace({-0.0168: 0.01}), 3)


def test_control_rule_text_names_the_unreadable_models():
    ctl = pd.DataFrame({"model": ["a", "a", "b", "c"], "sig_dual_bonf": [True, False, True, False],
                        "cohens_dz": [0.4, 0.1, 0.3, 0.5], "p_t": [0.001, 0.5, 0.01, 0.2], "p_W": [0.002, 0.4, 0.011, 0.3],
                        "alpha_corrected": 0.0125})
    t = R.control_rule_text(ctl, audit_levels={"a": 0.0025, "b": 0.0025, "c": 0.0025})
    assert "passes (a valid cell at its own Bonferroni level, 0.0125) in 2 of the 3 models (a and b)" in t
    assert "at the audit's stricter per-cell level (0.0025) it passes in 1 of them (a)" in t
    assert "the audit's nulls in the other 1 model cannot be read either way" in t
    allok = R.control_rule_text(ctl.assign(sig_dual_bonf=True, p_t=1e-4, p_W=1e-4), audit_levels=dict.fromkeys("abc", 0.0025))
    assert "in 3 of the 3 models" in allok and "cannot be read" not in allok
