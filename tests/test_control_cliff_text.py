"""Computed wording of the routing-weight control (chapter 5) and of progressive ablation (chapter 6).

Every test builds its tables by hand, so that each case a sentence builder distinguishes is
exercised and the numbers it must quote are known in advance.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from moeaudit import stats as S
from moeaudit.chapters.progressive import (buffer_phrase, buffer_readings, cliff_comparison_text, cliff_text,
                                           deepest_removal_summary, paper_share_positive_text,
                                           progressive_overview_text, redundancy_breaks, removal_direction,
                                           threshold_calls)
from moeaudit.chapters.control import (control_against_observational, control_beaten_text,
                                       control_reading_text, control_summary_text, control_verdict_text,
                                       figure1_text, same_layer_margins)
from moeaudit.report import fmt_bound, zero_relation

# ----------------------------------------------------------------------------- helpers shared by both chapters


def test_zero_relation_follows_the_displayed_precision():
    assert zero_relation(0.12, 0.4) == "above"
    assert zero_relation(-0.4, -0.12) == "below"
    assert zero_relation(-0.1, 0.2) == "contains"
    # excludes zero unrounded, but the lower bound prints as +0.000: never called excluding zero
    assert zero_relation(0.00023, 0.271) == "touches"
    assert zero_relation(-0.271, -0.0004) == "touches"
    assert zero_relation(0.00023, 0.271, digits=4) == "above"
    assert zero_relation(float("nan"), 0.3) == "undefined"
    with pytest.raises(ValueError):
        zero_relation(0.3, 0.1)


def test_fmt_bound_shows_the_digits_that_exclude_zero():
    assert fmt_bound(0.00023) == "+0.00023"
    assert fmt_bound(-0.0004) == "-0.0004"
    assert fmt_bound(0.271) == "+0.271"
    assert fmt_bound(0.0) == "+0.000"
    assert fmt_bound(-0.0) == "+0.000"


def test_an_interval_cell_never_prints_a_bound_that_excludes_zero_as_zero():
    from moeaudit.report import fmt_with_ci

    # the interval excludes zero; at three decimals its lower bound would read +0.000
    cell = fmt_with_ci(0.05, 0.0003, 0.1)
    assert cell == "+0.050 [+0.0003,\u00a0+0.100]" and "+0.000," not in cell
    assert fmt_with_ci(0.0123, -0.004, 0.031, digits=2, significant=True) == "+0.012 [-0.004,\u00a0+0.031]"
    assert fmt_with_ci(float("nan"), 0.1, 0.2) == "—"
    assert fmt_with_ci(0.5, float("nan"), 0.7) == "+0.500"
    # nor an estimate that is not zero, inside an interval that excludes zero
    assert fmt_with_ci(0.0003, 0.0001, 0.0005).startswith("+0.0003 ")
    # significant digits in fixed notation, no negative zero
    assert fmt_with_ci(123.4, 99.5, 150, digits=2, significant=True) == "+120 [+100,\u00a0+150]"
    assert fmt_with_ci(-0.0, -0.0, 0.0, digits=2, significant=True) == "+0 [+0,\u00a0+0]"
    for bad in (-1, 1.5, "3", None, True):
        with pytest.raises(ValueError, match="digits"):
            fmt_with_ci(0.1, 0.0, 0.2, digits=bad)
    with pytest.raises(ValueError, match="exceeds"):
        fmt_with_ci(0.1, 0.3, 0.0)


# ----------------------------------------------------------------------------- chapter 5: the control


def _control(rows):
    """Control-table rows: (model, layer, d_z, p_t, p_W, rho, rho_lo, rho_hi); n = 200, own level 0.01."""
    t = pd.DataFrame(rows, columns=["model", "layer", "cohens_dz", "p_t", "p_W", "rho", "rho_ci_low", "rho_ci_high"])
    t["n"] = 200
    t["ranking"] = "routing_weight"
    t["same_sign"] = True
    t["alpha_corrected"] = 0.01
    t["family_size"] = 5
    t["sig_t_bonf"] = t.p_t < 0.01
    t["sig_W_bonf"] = t.p_W < 0.01
    t["sig_dual_bonf"] = t.sig_t_bonf & t.sig_W_bonf
    half = 1.96 / np.sqrt(200)
    t["dz_ci_low"], t["dz_ci_high"] = t.cohens_dz - half, t.cohens_dz + half
    return t


def _observational(models, *, level=0.0025, dz=(0.05, 0.1)):
    rows = [{"model": m, "layer": L, "ranking": r, "cohens_dz": d, "alpha_corrected": level, "family_size": 20}
            for m in models for L in (0, 1) for r, d in zip(("utilization_rate", "activation_norm"), dz)]
    return pd.DataFrame(rows)


def test_control_reading_is_per_model_and_at_the_audit_level():
    control = _control([
        # fails everywhere, even at its own level 0.01
        ("fail", 0, 0.05, 0.4, 0.5, 0.0, -0.1, 0.1), ("fail", 1, -0.02, 0.7, 0.6, 0.0, -0.1, 0.1),
        # passes at its own level 0.01, not at the audit's 0.0025 (Wilcoxon 0.005)
        ("own", 0, 0.192, 0.007, 0.005, 0.0, -0.1, 0.1), ("own", 1, 0.01, 0.9, 0.9, 0.0, -0.1, 0.1),
        # passes even at the audit's level, with a d_z the audit detects with high power
        ("audit", 0, 0.35, 1e-6, 1e-5, 0.0, -0.1, 0.1), ("audit", 1, 0.0, 0.99, 0.99, 0.0, -0.1, 0.1),
    ])
    text = control_reading_text(control, _observational(["fail", "own", "audit"]), power=0.8)
    fail, own, audit, spearman = text.split("\n\n")
    assert fail.startswith("**fail.**") and "cannot be read either way" in fail
    assert "own." in own and "passes at no layer" in own and "0.0025" in own
    # the power of the audit's t-test against d_z = 0.192 at n = 200, alpha = 0.0025 is about 37%
    p = S.t_test_power(0.192, 200, alpha=0.0025)
    assert f"{p:.0%}" in own and f"{p:.0%}" == "37%"
    mde = S.min_detectable_dz(200, alpha=0.0025, power=0.8)
    assert f"|d_z| ≥ {mde:.3f}" in own
    assert "informative there" not in text and "detects an effect of that size" not in text
    # the test that fails at the audit's level is named, and the null is read at its power only
    assert "it passes at no layer: at layer 0 the t-test does not (p_t = 0.007" not in own
    assert "at layer 0 neither test does (p_t = 0.007, p_W = 0.005)" in own
    assert f"would miss an effect of |d_z| ≥ {mde:.3f} with probability at most 20%" in own
    assert "informative only against" not in own
    assert "passes even at the audit's per-cell level 0.0025" in audit and "evidence against" in audit
    assert f"{S.t_test_power(0.35, 200, alpha=0.0025):.0%}" in audit
    assert "No Spearman interval" in spearman


def test_control_reading_low_power_at_the_audit_level_is_called_weak():
    # d_z = 0.2 with p below 0.0025 (a lucky draw): power at that d_z is below 80%
    control = _control([("m", 0, 0.2, 0.001, 0.002, 0.0, -0.1, 0.1)])
    text = control_reading_text(control, _observational(["m"]), power=0.8)
    assert "weak evidence" in text and "evidence against observational effects" not in text
    assert "against smaller effects it is weaker still, and against effects near zero it is no evidence at all" in text
    assert "against smaller effects it is not" not in text and "The null is not equivalence" in text


def test_control_reading_names_the_failing_test_and_what_tost_can_show():
    # the t-test passes at the audit's 0.0025, Wilcoxon (0.0093) does not
    control = _control([("m", 0, 0.274, 0.00015, 0.0093, 0.0, -0.1, 0.1)]).assign(tost_bound_d=0.2)
    obs = _observational(["m"]).assign(tost_bound_d=0.2)
    text = control_reading_text(control, obs, power=0.8).split("\n\n")[0]
    assert "at layer 0 the t-test passes (p_t = 0.00015) but the Wilcoxon test does not (p_W = 0.0093, not below " \
           "0.0025)." in text
    # TOST at 0.2 cannot pass at 0.0025 with n = 200 (smallest p 0.00258); at a looser audit level it can
    assert f"cannot show any effect to be small (TOST at |d_z| < 0.2 cannot pass at that level for any data: its " \
           f"smallest attainable p at n = 200 is {S.tost_min_p(200, bound_d=0.2):.3g})" in text
    loose = control_reading_text(control, obs.assign(alpha_corrected=0.005), power=0.8).split("\n\n")[0]
    assert "only a passing TOST at |d_z| < 0.2 shows an effect to be small" in loose
    wilcoxon_only = _control([("m", 0, 0.25, 0.004, 0.001, 0.0, -0.1, 0.1)])
    assert "the Wilcoxon test passes (p_W = 0.001) but the t-test does not (p_t = 0.004, not below 0.0025)" in \
        control_reading_text(wilcoxon_only, _observational(["m"]))


def test_a_reversal_does_not_make_the_control_pass():
    # significant at every level, but d_z < 0: not a working control
    control = _control([("m", 0, -0.4, 1e-8, 1e-8, 0.0, -0.1, 0.1)])
    text = control_reading_text(control, _observational(["m"]))
    assert "cannot be read either way" in text


def test_spearman_intervals_that_round_to_zero_touch_it():
    control = _control([("m", 0, 0.1, 0.2, 0.2, 0.266, 0.120, 0.400), ("m", 1, 0.1, 0.2, 0.2, 0.138, 0.00023, 0.271),
                        ("m", 2, 0.1, 0.2, 0.2, 0.01, -0.1, 0.12)])
    text = control_reading_text(control, _observational(["m"])).split("\n\n")[-1]
    assert "excludes zero at 1 cell of 3: m layer 0" in text
    assert "m layer 1 (ρ = +0.138, [+0.00023, +0.271]) touches zero" in text
    assert "[+0.000, +0.271]" not in text
    # one of three 95% intervals excludes zero: P(X >= 1), X ~ Bin(3, 0.05) = 1 - 0.95^3
    assert f"probability {1 - 0.95 ** 3:.2g}" in text and "about 0.15" in text


def _cells(model, layer, ranking, diffs):
    n = len(diffs)
    return pd.DataFrame({"model": model, "layer": layer, "ranking": ranking, "seq_id": np.arange(n), "t": 5,
                         "diff": diffs})


def test_same_layer_margins_exceeds_not_shown_and_below():
    rng = np.random.default_rng(0)
    base = rng.normal(size=300)
    strong = 0.6 + rng.normal(size=300)
    control_cells = pd.concat([_cells("m", 0, "routing_weight", strong), _cells("m", 1, "routing_weight", base),
                               _cells("m", 2, "routing_weight", base)])
    obs_cells = pd.concat([_cells("m", 0, "activation_norm", base), _cells("m", 1, "activation_norm", base),
                           _cells("m", 2, "activation_norm", strong)])
    dz = lambda x: x.mean() / x.std(ddof=1)  # noqa: E731
    cmp = pd.DataFrame({"model": "m", "layer": [0, 1, 2], "control_dz": [dz(strong), dz(base), dz(base)],
                        "best_ranking": "activation_norm", "best_dz": [dz(base), dz(base), dz(strong)]})
    out = same_layer_margins(cmp, control_cells, obs_cells, n_boot=500, seed=1).set_index("layer")
    assert out.vs_best.tolist() == ["exceeds", "not shown", "below"]
    assert out.loc[0, "diff_ci_low"] > 0 and out.loc[2, "diff_ci_high"] < 0 and (out.n_shared == 300).all()


def _cmp_with_margins():
    cmp = pd.DataFrame({
        "model": "m", "layer": [0, 1, 2], "control_dz": [0.287, 0.05, 0.30], "dz_ci_low": [0.15, -0.09, 0.16],
        "dz_ci_high": [0.43, 0.19, 0.44], "best_ranking": ["mean_routing_weight", "activation_norm", "activation_std"],
        "best_dz": [0.257, 0.2, 0.01], "beaten": [False, True, False], "band_low": -0.1, "band_high": 0.257,
        "position": ["above", "inside", "above"], "margin": [0.03, 0.0, 0.043], "ci_overlaps_band": True,
        "n_shared": 200, "diff_ci_low": [-0.043, -0.3, 0.05], "diff_ci_high": [0.096, -0.01, 0.5],
        "vs_best": ["not shown", "below", "exceeds"]})
    return cmp


def test_control_beaten_text_names_where_the_control_does_not_exceed():
    text = control_beaten_text(_cmp_with_margins())
    assert "at 1 of 3 audited layers at least one population-level statistic has a larger d_z" in text
    assert "the control's d_z is the larger at 2 of 3 layers (m layer 0 and m layer 2)" in text
    assert "At 1 of them it is shown larger (paired-bootstrap 95% interval of the difference of d_z above zero: " \
           "m layer 2); at the other 1 the interval includes zero" in text
    assert "The strongest observational cell is shown larger than the control at 1 (m layer 1)" in text
    assert not text.endswith(".") and " — " not in text
    none = control_beaten_text(_cmp_with_margins().assign(vs_best="not shown"))
    assert "At none of them is it shown larger: every paired-bootstrap 95% interval of the difference of d_z " \
           "includes zero" in none and "shown larger than the control" not in none
    one = control_beaten_text(_cmp_with_margins().assign(vs_best="not shown", best_dz=[0.257, 0.2, 0.5]))
    assert "is the larger at 1 of 3 layers (m layer 0). It is not shown larger there" in one
    # without margins only the point estimates are compared
    plain = control_beaten_text(_cmp_with_margins().drop(columns="vs_best"))
    assert "shown larger" not in plain


def test_figure1_text_calls_a_cell_below_the_band_a_reversal():
    control = _control([("m", 0, 0.287, 7e-5, 0.005, 0, -0.1, 0.1), ("m", 1, -0.200, 0.005, 0.03, 0, -0.1, 0.1),
                        ("m", 2, 0.02, 0.8, 0.7, 0, -0.1, 0.1)])
    obs = _observational(["m"], dz=(-0.184, 0.257))
    text = figure1_text(control, obs, alpha=0.05)
    below = text[text.index("m layer 1 lies below"):]
    assert "a reversal" in below.split(". ")[0] and "not a stronger control" in below
    assert "not shown to be more negative" in text
    assert "1 reversal" in text and "2 with d_z > 0" not in text and "1 with d_z > 0" in text
    # 2 of 3 tested cells reach p_t < 0.05; P(X >= 2), X ~ Bin(3, 0.05)
    p = 3 * 0.05 ** 2 * 0.95 + 0.05 ** 3
    assert f"probability {p:.2g}" in text
    margins = _cmp_with_margins()
    assert "shown larger (paired-bootstrap 95% interval of the difference of d_z above zero) at 1 of 3 layers" in \
        figure1_text(control, obs, alpha=0.05, margins=margins)
    nowhere = figure1_text(control, obs, alpha=0.05, margins=margins.assign(vs_best="not shown"))
    assert "does not exceed the observational metrics anywhere" in nowhere


def test_control_summary_text_names_reversals():
    t = _control([("m", 1, 0.082, 0.25, 0.6, 0, -0.1, 0.1), ("m", 5, -0.200, 0.005, 0.034, 0, -0.1, 0.1)])
    text = control_summary_text(t, alpha=0.05)
    assert "The largest positive d_z is at layer 1 (d_z = +0.082" in text
    assert "The largest in magnitude is a reversal, at layer 5 (d_z = -0.200" in text
    assert "(L5 [a reversal])" in text
    pos = _control([("m", 1, 0.3, 1e-5, 1e-4, 0, -0.1, 0.1), ("m", 5, -0.1, 0.3, 0.3, 0, -0.1, 0.1)])
    text = control_summary_text(pos, alpha=0.05)
    assert "reversal" not in text and "1 of 2 layers passes Bonferroni under the dual-test rule (L1)" in text


def test_control_verdict_text_counts_reversals_apart():
    t = _control([("a", 0, 0.287, 1e-5, 1e-4, 0, -0.1, 0.1), ("a", 1, -0.3, 1e-5, 1e-4, 0, -0.1, 0.1),
                  ("b", 0, 0.01, 0.9, 0.9, 0, -0.1, 0.1)])
    text = control_verdict_text(t, alpha=0.05)
    assert text.startswith("**1 control cell passes** the paper's rule with d_z > 0")
    assert "a layer 0 (d_z = +0.287)" in text and "as a reversal" in text and "a layer 1 (d_z = -0.300)" in text
    assert "a 2 of 2" in text and "b 0 of 1" in text
    none = control_verdict_text(t[t.model == "b"], alpha=0.05)
    assert none.startswith("**No control cell passes**")
    assert "TOST" not in text  # without the equivalence columns nothing is said of them


def test_control_verdict_text_says_what_the_control_nulls_show():
    t = _control([("a", 0, 0.287, 1e-5, 1e-4, 0, -0.1, 0.1), ("a", 1, 0.01, 0.9, 0.9, 0, -0.1, 0.1),
                  ("b", 0, 0.05, 0.5, 0.5, 0, -0.1, 0.1)])
    t = t.assign(tost_bound_d=0.2, equivalent=[False, True, False], mde_dz=S.min_detectable_dz(200, alpha=0.01),
                 power=0.8)
    text = control_verdict_text(t, alpha=0.05)
    # at 0.01 with n = 200 the smallest TOST p (0.00258) is below the level: it can pass
    assert "TOST at |d_z| < 0.2 can pass at the control's level 0.01, and it shows 1 of the 3 tested control cells " \
           "within ±0.2 (a layer 1)" in text
    assert f"detects |d_z| ≥ {S.min_detectable_dz(200, alpha=0.01):.3f} with 80% power" in text
    strict = control_verdict_text(t.assign(alpha_corrected=0.001, equivalent=False), alpha=0.05)
    assert "cannot pass at the control's level 0.001 for any data" in strict


def test_control_against_observational_still_feeds_the_margins():
    control = _control([("m", 0, 0.3, 1e-5, 1e-4, 0, -0.1, 0.1)])
    cmp = control_against_observational(control, _observational(["m"]))
    assert {"best_ranking", "best_dz", "beaten"} <= set(cmp.columns)


# ----------------------------------------------------------------------------- chapter 6: progressive ablation


def _records(model, layer, values, k=3, clean=6.0):
    return pd.DataFrame({"model": model, "layer": layer, "k": k, "delta_loss": values, "clean_loss": clean})


def _progressive(layers: dict, *, model="m", kmax=3):
    """Records with k = 1..kmax; the deepest k carries ``layers[L]``, shallower ones a tenth of it."""
    parts = []
    for L, v in layers.items():
        for k in range(1, kmax + 1):
            parts.append(_records(model, L, np.asarray(v) * (k / kmax), k=k))
    return pd.concat(parts, ignore_index=True)


def _tables(records, threshold=0.1):
    from moeaudit.audit import progressive_summary

    summary = progressive_summary(records)
    deepest = removal_direction(deepest_removal_summary(records, threshold=threshold))
    return redundancy_breaks(summary, threshold=threshold), deepest, threshold_calls(summary, threshold=threshold)


#: 200 positions: 140 small rises and 60 small falls (mean +0.008), 100 and 100 (mean 0), 50 rises and 150 falls
RAISES = [0.02] * 140 + [-0.02] * 60
HALF = [0.02] * 100 + [-0.02] * 100
LOWERS = [0.02] * 50 + [-0.02] * 150
CLIFF = [0.5] * 150 + [-0.1] * 50


def test_deepest_removal_summary_counts_rises_and_falls():
    d = deepest_removal_summary(_records("m", 0, [0.1, -0.2, 0.0, 0.3]), threshold=0.05).iloc[0]
    assert d.n_up == 2 and d.n_down == 1 and d.share_below_zero == pytest.approx(0.25)


def test_removal_direction_by_hand():
    recs = pd.concat([_records("m", 0, RAISES), _records("m", 1, HALF), _records("m", 2, LOWERS)])
    d = removal_direction(deepest_removal_summary(recs, threshold=0.1), alpha=0.05).set_index("layer")
    assert d.direction.tolist() == ["raises", "undistinguished", "lowers"]
    assert d.alpha_sign.iloc[0] == pytest.approx(0.05 / 3)  # Bonferroni over the model's three layers
    assert d.loc[1, "p_sign"] == pytest.approx(1.0)
    assert d.loc[0, "p_sign"] == pytest.approx(S.sign_test(140, 60))
    # 108 rises of 200: p = 0.29, not distinguishable from one half
    near = removal_direction(deepest_removal_summary(_records("m", 0, [0.02] * 108 + [-0.02] * 92), threshold=0.1))
    assert near.direction.iloc[0] == "undistinguished"
    with pytest.raises(ValueError):
        removal_direction(d.reset_index(), alpha=1.0)


#: mean raised (+0.07) by half of the positions, median shift nil (100 rises, 100 falls); mean near the threshold
MEAN_ONLY = [0.15] * 100 + [-0.01] * 100
NEAR = [0.13] * 100 + [0.06] * 100


def test_removal_direction_gives_the_bonferroni_interval_of_the_mean_and_the_sign_test_power():
    recs = pd.concat([_records("m", 0, RAISES), _records("m", 1, HALF)])
    d = removal_direction(deepest_removal_summary(recs, threshold=0.1), alpha=0.05).set_index("layer")
    x = np.asarray(RAISES)
    half = S.t_critical(0.025, 199) * x.std(ddof=1) / np.sqrt(200)
    assert d.loc[0, "mean_low"] == pytest.approx(x.mean() - half) and d.loc[0, "mean_high"] == pytest.approx(x.mean() + half)
    assert d.loc[0, "detectable_share"] == pytest.approx(S.sign_test_detectable_share(200, alpha=0.025))


def test_buffer_is_defined_by_the_mean_at_the_bonferroni_level():
    breaks, deepest, calls = _tables(_progressive({0: RAISES, 1: HALF, 2: LOWERS, 3: CLIFF, 4: MEAN_ONLY, 5: NEAR}))
    r = buffer_readings(breaks, deepest, calls, threshold=0.1).set_index("layer")
    assert r.reading.tolist() == ["buffer", "no direction", "lowers", "crosses", "buffer", "raises, undecided"]
    assert r.loc[4, "direction"] == "undistinguished"  # a buffer in the mean sense although the median does not move
    phrase = buffer_phrase(r.reset_index(), threshold=0.1)
    assert "layers 0 and 4 keep a buffer by this threshold: the deepest removal raises the mean loss" in phrase
    assert "99.17% intervals, Bonferroni over the model's layers" in phrase  # 1 - 0.05/6
    assert "at layer 5 the deepest removal raises the mean loss" in phrase and "contains 0.1 nats" in phrase
    assert "at layer 1 the 99.17% interval of the mean contains zero" in phrase
    assert "at layer 2 the deepest removal *lowers* the mean loss" in phrase
    assert "In the median sense" in phrase and "layer 3" not in phrase  # layer 3 crosses: no clause
    assert f"sign test p = {S.sign_test(140, 60):.2g}" in phrase and "p ≤" not in phrase
    assert "is not distinguishable from one half" in phrase and "with 80% power" in phrase


def test_cliff_texts_never_read_a_buffer_into_a_flat_layer():
    breaks, deepest, calls = _tables(_progressive({0: HALF, 1: [0.01] * 104 + [-0.01] * 96}))
    text = cliff_text(breaks, deepest, calls, threshold=0.1)
    assert "No layer's mean crosses 0.1 nats" in text and "keeps a buffer" not in text and "keep a buffer" not in text
    assert "at layers 0 and 1 the 97.5% interval of the mean contains zero" in text
    assert "at layers 0 and 1 the share of positions where the loss fell (48–50%)" in text
    paper = redundancy_breaks(pd.DataFrame({"model": "p", "layer": [0, 15], "k": 7, "mean": [0.05, 0.4]}),
                              threshold=0.1)
    bullet = cliff_comparison_text(breaks, deepest, calls, paper, last=1, threshold=0.1)
    assert "every audited layer keeps a buffer" not in bullet and "no layer crosses 0.1 nats" in bullet
    assert "not distinguishable from one half" in bullet and "only the last audited layer (15)" in bullet
    # a layer whose removal raises the mean loss, below the threshold, is a buffer
    breaks, deepest, calls = _tables(_progressive({0: RAISES}))
    assert "layer 0 keeps a buffer" in cliff_comparison_text(breaks, deepest, calls, paper, last=0, threshold=0.1)


def test_cliff_text_accepts_a_summary_without_directions():
    recs = _progressive({0: RAISES, 1: HALF})
    from moeaudit.audit import progressive_summary

    summary = progressive_summary(recs)
    breaks, calls = redundancy_breaks(summary, threshold=0.1), threshold_calls(summary, threshold=0.1)
    text = cliff_text(breaks, deepest_removal_summary(recs, threshold=0.1), calls, threshold=0.1, alpha=0.05)
    assert "layer 0 keeps a buffer" in text and "at layer 1 the 97.5% interval of the mean contains zero" in text


def test_progressive_overview_text_conditions_the_regime_on_a_buffer():
    breaks, deepest, calls = _tables(_progressive({0: HALF, 1: HALF}))
    text = progressive_overview_text(buffer_readings(breaks, deepest, calls, threshold=0.1), breaks, threshold=0.1)
    assert "lies above zero at 0 of the 2 layers and contains zero at 2" in text
    assert "is shown at no layer" in text and "at 0 of the 2 layers" in text
    below = buffer_readings(breaks, deepest, calls, threshold=0.1)
    n_small = int(((below.reading == "no direction") & (below.mean_high < 0.1)).sum())
    assert n_small > 0 and f"At {n_small} of the 2 layers the interval contains zero and lies below 0.1 nats" in text
    assert "not shown to cost anything" in text
    assert f"about {S.sign_test_detectable_share(200, alpha=0.025):.0%} of them to rise for 80% power" in text
    assert "nevertheless" not in text
    breaks, deepest, calls = _tables(_progressive({0: RAISES, 1: HALF}))
    text = progressive_overview_text(buffer_readings(breaks, deepest, calls, threshold=0.1), breaks, threshold=0.1)
    assert "is shown at 1 of the 2 layers (m: 0). " in text and "Only a layer with a buffer is shown" in text
    assert not re.search(r"\bnan\b", text)
    # a mean raised by a minority of large increases, with the median shift not significant, is named apart
    breaks, deepest, calls = _tables(_progressive({0: MEAN_ONLY, 1: CLIFF}))
    text = progressive_overview_text(buffer_readings(breaks, deepest, calls, threshold=0.1), breaks, threshold=0.1)
    assert f"m layer 0 raises the mean loss nevertheless (+0.070 nats, sign test p = {S.sign_test(100, 100):.2g})" in text
    assert "1 of them crosses 0.1 nats" in text and "lies above zero at 2 of the 2 layers (m layer 0, m layer 1)" in text


def test_paper_share_positive_text_tests_each_share():
    rel = pd.DataFrame({"layer": [0, 8], "share_positive": [0.512, 0.582], "n": 500})
    text = paper_share_positive_text(rel, alpha=0.05)
    assert f"layer 0 51% (sign test p = {S.sign_test(256, 244):.2g})" in text
    assert f"layer 8 58% (sign test p = {S.sign_test(291, 209):.2g})" in text
    assert "Bonferroni level 0.05/2 = 0.025" in text
    assert "rose at more than half of the positions at layer 8" in text
    assert "at layer 0 the share is not distinguishable from one half" in text


def test_dz_by_depth_marks_reversals_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moeaudit import report

    t = pd.DataFrame({"rel_depth": [0.0, 0.5, 1.0], "cohens_dz": [0.3, -0.2, 0.01], "dz_ci_low": [0.2, -0.3, -0.1],
                      "dz_ci_high": [0.4, -0.1, 0.1], "sig_t_bonf": [True, True, False],
                      "sig_dual_bonf": [True, False, False]})
    for flag, want in ((True, ["*", "▼"]), (False, ["*", "*"])):
        fig, ax = plt.subplots()
        report.dz_by_depth(ax, t, label="m", color="k", mark_reversals=flag)
        assert [a.get_text() for a in ax.texts] == want
        plt.close(fig)
