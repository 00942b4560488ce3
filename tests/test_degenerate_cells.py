"""Cells that cannot be tested are reported in the table, with their reason, instead of failing it.

Every input is tiny and every expected value is worked out by hand in the comments.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from moeaudit import report
from moeaudit import stats as S
from moeaudit.chapters.control import control_against_observational, control_summary_text, figure1_text

STAT_COLS = ["cohens_dz", "dz_ci_low", "dz_ci_high", "t", "p_t", "W", "p_W", "rank_biserial", "p_tost"]
FLAGS = ["sig_t", "sig_W", "same_sign", "sig_dual", "equivalent"]


def _assert_untested(row):
    for c in STAT_COLS:
        assert np.isnan(row[c]), c
    for c in FLAGS:
        assert row[c] is False or row[c] == False, c  # noqa: E712 - numpy bools
    assert isinstance(row["reason"], str) and row["reason"]


# ----------------------------------------------------------------------------- one cell


def test_two_pairs_give_a_nan_row_with_a_reason():
    # D = [1, 2]: n = 2, mean 1.5, median 1.5, sd = sqrt(((-0.5)^2 + 0.5^2) / 1) = sqrt(0.5)
    row = S.paired_effect([1.0, 2.0], [0.0, 0.0]).iloc[0]
    assert row["n"] == 2 and row["dof"] == 1 and row["n_zero"] == 0
    assert row["mean_d"] == pytest.approx(1.5) and row["median_d"] == pytest.approx(1.5)
    assert row["sd_d"] == pytest.approx(math.sqrt(0.5))
    _assert_untested(row)
    assert "too few pairs" in row["reason"] and "n = 2" in row["reason"]
    assert np.isnan(row["mde_dz"])  # no test is run at n = 2, so no detectable effect either
    assert row["alpha_corrected"] == pytest.approx(0.05)


def test_all_equal_differences_give_nan_dz_and_a_reason():
    # D = [1, 1, 1, 1]: mean 1, sd 0, d_z = 1 / 0 undefined
    row = S.paired_effect([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], n_tests=2).iloc[0]
    assert row["n"] == 4 and row["mean_d"] == 1.0 and row["median_d"] == 1.0 and row["sd_d"] == 0.0
    _assert_untested(row)
    assert row["reason"].startswith("all 4 paired differences are equal (D = 1)") and "sd(D) = 0" in row["reason"]
    # the detectable effect at n = 4 and alpha / 2 is still defined
    assert row["mde_dz"] == pytest.approx(S.min_detectable_dz(4, alpha=0.025, power=0.8))
    # all differences zero (the two experts' removals change the loss equally at every position)
    zero = S.paired_effect([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]).iloc[0]
    assert zero["n_zero"] == 3 and zero["mean_d"] == 0.0
    _assert_untested(zero)
    assert zero["reason"].startswith("all 3 paired differences are zero")


def test_nan_and_infinite_values_give_a_reason_not_an_exception():
    row = S.paired_effect([1.0, np.nan, 3.0, 4.0], [0.0, 0.0, 0.0, np.inf]).iloc[0]
    assert row["n"] == 4
    _assert_untested(row)
    assert row["reason"] == "2 of 4 paired differences are NaN or infinite"
    assert np.isnan(row["mean_d"])  # the mean of values that include NaN is not defined


def test_a_degenerate_row_has_the_columns_of_a_tested_one():
    good = S.paired_effect([1.0, 2.0, 3.0, 4.0], [0.0] * 4)
    bad = S.paired_effect([1.0, 2.0], [0.0, 0.0])
    assert list(good.columns) == list(bad.columns)
    assert good["reason"].iloc[0] == ""


def test_summary_effect_with_too_few_pairs_or_an_undefined_t():
    row = S.summary_effect(3.0, 2, p_W=0.01, same_sign=True).iloc[0]
    assert "too few pairs" in row["reason"] and np.isnan(row["cohens_dz"]) and np.isnan(row["p_t"])
    assert not row["sig_t"] and not row["sig_W"] and not row["sig_dual"] and not row["equivalent"]
    row = S.summary_effect(float("nan"), 50, p_W=0.5, same_sign=True).iloc[0]
    assert "NaN or infinite" in row["reason"] and np.isnan(row["dz_ci_low"])
    assert S.summary_effect(2.0, 50, p_W=0.5, same_sign=True)["reason"].iloc[0] == ""


def test_the_other_per_cell_helpers_return_nan_instead_of_raising():
    assert np.isnan(S.cohens_dz([2.0, 2.0, 2.0]))            # sd = 0
    assert np.isnan(S.cohens_dz([1.0]))                      # one value, ddof 1
    assert np.isnan(S.cohens_dz([1.0, np.nan, 2.0]))
    assert np.isnan(S.jzs_bayes_factor([0.3, 0.3, 0.3]))     # t = 0.3 / 0 undefined
    assert np.isnan(S.jzs_bayes_factor([0.3]))
    assert S.jeffreys_label(float("nan")) == "undefined"
    lo, hi = S.dz_difference_ci([1.0, 2.0], [2.0, 1.0])      # two positions
    assert np.isnan(lo) and np.isnan(hi)
    lo, hi = S.dz_difference_ci([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 5.0])  # d_z of d1 undefined
    assert np.isnan(lo) and np.isnan(hi)
    assert S.dz_confidence_interval(float("nan"), 10) == pytest.approx((np.nan, np.nan), nan_ok=True)
    r = S.spearman([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], n_boot=50).iloc[0]
    assert np.isnan(r["rho"]) and np.isnan(r["ci_low"]) and r["reason"] == "y is constant: rho is undefined"
    r = S.spearman([1.0, 2.0], [2.0, 1.0], n_boot=50).iloc[0]
    assert np.isnan(r["rho"]) and "too few pairs" in r["reason"]
    r = S.spearman([1.0, 2.0, np.nan, 4.0], [1.0, 3.0, 2.0, 4.0], n_boot=50).iloc[0]
    assert np.isnan(r["rho"]) and r["reason"] == "1 of 4 pairs is NaN or infinite"


# ----------------------------------------------------------------------------- programming errors


def test_programming_errors_still_raise_and_name_the_parameter():
    with pytest.raises(ValueError, match="high and low must have the same length"):
        S.paired_effect([1.0, 2.0], [0.0, 0.0, 0.0])
    # invalid arguments raise even when the data alone would give a degenerate row
    with pytest.raises(ValueError, match="n_tests"):
        S.paired_effect([1.0, 2.0], [0.0, 0.0], n_tests=0)
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            S.paired_effect([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], alpha=bad)
    with pytest.raises(ValueError, match="ci"):
        S.paired_effect([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], ci=95)
    with pytest.raises(ValueError, match="power"):
        S.paired_effect([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], power=0.0)
    with pytest.raises(ValueError, match="tost_bound_d"):
        S.paired_effect([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], tost_bound_d=-0.2)
    with pytest.raises(ValueError, match="zero_method"):
        S.paired_effect([1.0, 2.0], [0.0, 0.0], zero_method="drop")
    with pytest.raises(ValueError, match="n_tests"):
        S.summary_effect(2.0, 50, p_W=0.5, same_sign=True, n_tests=0)
    with pytest.raises(ValueError, match="x and y must have the same length"):
        S.spearman([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="d1 and d2 must have the same length"):
        S.dz_difference_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="ddof"):
        S.cohens_dz([1.0, 2.0, 3.0], ddof=-1)
    with pytest.raises(ValueError, match="r must be in"):
        S.jzs_bayes_factor([1.0, 2.0, 3.0], r=0.0)
    with pytest.raises(ValueError):
        S.jeffreys_label(-1.0)


def test_an_error_inside_a_table_names_the_cell():
    recs = pd.DataFrame({"model": "m", "layer": [0, 0, 0], "metric": "x", "delta_high": [1.0, 2.0, 4.0],
                         "delta_low": 0.0})
    with pytest.raises(ValueError, match="alpha") as err:
        S.audit_table(recs, alpha=2.0)
    assert any("model m, layer 0, metric x" in note for note in getattr(err.value, "__notes__", []))


# ----------------------------------------------------------------------------- tables


#: two good cells and one whose differences are all equal, in one family of three
GOOD_A = ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])          # D = 1, 2, 3, 4
GOOD_C = ([-1.0, 2.0, 3.0, -4.0, 5.0], [0.0] * 5)              # D = -1, 2, 3, -4, 5
FLAT_B = ([1.0, 1.5, 2.0], [0.5, 1.0, 1.5])                    # D = 0.5, 0.5, 0.5


def _records(cells=(("a", GOOD_A), ("b", FLAT_B), ("c", GOOD_C))):
    return pd.concat([pd.DataFrame({"model": "m", "layer": i, "metric": name, "delta_high": h, "delta_low": lo})
                      for i, (name, (h, lo)) in enumerate(cells)], ignore_index=True)


def test_a_degenerate_cell_leaves_the_other_cells_of_the_table_as_they_are():
    tab = S.audit_table(_records())
    assert len(tab) == 3 and list(tab.metric) == ["a", "b", "c"]
    assert list(tab.reason.str.len() > 0) == [False, True, False]
    b = tab.iloc[1]
    _assert_untested(b)
    assert b["n"] == 3 and b["mean_d"] == pytest.approx(0.5) and b["sd_d"] == 0.0
    for i, (h, lo) in ((0, GOOD_A), (2, GOOD_C)):
        alone = S.paired_effect(h, lo, n_tests=3).iloc[0]  # the family has three cells
        for col in [*STAT_COLS, "mean_d", "sd_d", "mde_dz", "alpha_corrected", *FLAGS]:
            assert tab.iloc[i][col] == alone[col], col
    # hand values of the first cell: d_z = 2.5 / sqrt(5/3), t = 2 d_z, Wilcoxon exact p = 2/16
    assert tab.iloc[0]["cohens_dz"] == pytest.approx(2.5 / math.sqrt(5 / 3), rel=1e-12)
    assert tab.iloc[0]["p_W"] == pytest.approx(2 / 16)


def test_untested_cells_count_in_the_family_and_are_never_rejected():
    tab = S.audit_table(_records())
    assert (tab.family_size == 3).all() and tab.alpha_corrected.tolist() == [0.05 / 3] * 3
    p_a, p_c = tab.p_t.iloc[0], tab.p_t.iloc[2]
    # Bonferroni: m = 3 counts the untested cell; its adjusted p-value is NaN
    assert tab.p_t_bonf.iloc[0] == pytest.approx(min(1.0, 3 * p_a))
    assert tab.p_t_bonf.iloc[2] == pytest.approx(min(1.0, 3 * p_c))
    assert np.isnan(tab.p_t_bonf.iloc[1]) and np.isnan(tab.p_W_holm.iloc[1]) and np.isnan(tab.p_t_bh.iloc[1])
    # Holm on m = 3 with the untested cell as p = 1 (sorted last): 3 p_(1), max(3 p_(1), 2 p_(2))
    small, large = sorted([p_a, p_c])
    holm = {small: min(1.0, 3 * small), large: min(1.0, max(3 * small, 2 * large))}
    assert tab.p_t_holm.iloc[0] == pytest.approx(holm[p_a]) and tab.p_t_holm.iloc[2] == pytest.approx(holm[p_c])
    # Benjamini-Hochberg on m = 3: p_(2) * 3/2 capped by the p = 1 at rank 3; p_(1) * 3 capped by that
    bh_large = min(1.0, large * 3 / 2)
    bh = {small: min(bh_large, small * 3), large: bh_large}
    assert tab.p_t_bh.iloc[0] == pytest.approx(bh[p_a]) and tab.p_t_bh.iloc[2] == pytest.approx(bh[p_c])
    for c in ("bonf", "holm", "bh"):
        assert not tab[f"sig_t_{c}"].iloc[1] and not tab[f"sig_W_{c}"].iloc[1] and not tab[f"sig_dual_{c}"].iloc[1]
    # against the family without the untested cell: its two cells are corrected for two tests only
    two = S.audit_table(_records((("a", GOOD_A), ("c", GOOD_C))))
    assert two.p_t_bonf.iloc[0] == pytest.approx(min(1.0, 2 * p_a)) and (two.family_size == 2).all()


def test_correct_family_treats_a_nan_p_value_as_a_counted_non_rejection():
    table = pd.DataFrame({"model": ["x"] * 3, "p_t": [0.01, np.nan, 0.02], "p_W": [0.01, np.nan, 0.02],
                          "same_sign": [True, False, True]})
    out = S.correct_family(table)
    # Holm, m = 3: 0.01 * 3 = 0.03; max(0.03, 0.02 * 2) = 0.04; the NaN cell stays NaN
    np.testing.assert_allclose(out.p_t_holm, [0.03, np.nan, 0.04])
    # Benjamini-Hochberg, m = 3: 0.02 * 3/2 = 0.03, 0.01 * 3 = 0.03
    np.testing.assert_allclose(out.p_t_bh, [0.03, np.nan, 0.03])
    assert out.sig_dual_holm.tolist() == [True, False, True]


def test_family_verdicts_count_untested_cells_apart():
    tab = S.audit_table(_records())
    v = S.family_verdicts(tab).iloc[0]
    assert v["cells"] == 3 and v["untested"] == 1 and v["alpha_bonferroni"] == pytest.approx(0.05 / 3)
    # d_z of a: +1.94; of c: mean 1 / sd sqrt(12.5) = +0.28; both positive among the two tested cells
    assert v["share_positive"] == 1.0
    assert v["max_abs_dz"] == pytest.approx(2.5 / math.sqrt(5 / 3))
    assert v["min_detectable_dz"] == pytest.approx(tab.mde_dz.iloc[0])
    only_bad = S.family_verdicts(S.audit_table(_records((("b", FLAT_B),)))).iloc[0]
    assert only_bad["cells"] == 1 and only_bad["untested"] == 1 and np.isnan(only_bad["share_positive"])


def test_untested_cells_names_each_cell_and_its_reason():
    recs = _records().assign(ranking=lambda d: d.metric).drop(columns="metric")
    tab = S.audit_table(recs, by=("model", "ranking", "layer"))
    bad = S.untested_cells(tab)
    assert len(bad) == 1 and bad.cell.iloc[0] == "model m, ranking b, layer 1"
    assert "equal" in bad.reason.iloc[0]
    assert S.untested_cells(tab[tab.reason == ""]).empty


# ----------------------------------------------------------------------------- texts and displayed tables


def _chapter_table():
    recs = _records().assign(ranking=lambda d: d.metric).drop(columns="metric")
    return S.audit_table(recs, by=("model", "ranking", "layer"))


def test_the_paper_layout_shows_an_untested_cell_and_the_note_gives_its_reason():
    tab = _chapter_table()
    layout = report.paper_layout(tab)
    assert layout.loc["b", "L1"] == "not tested\nn = 3"
    assert "nan" not in " ".join(layout.fillna("").to_numpy().ravel())
    report.style_paper_layout(tab).to_html()  # renders
    note = report.untested_note(tab)
    assert note.startswith("*1 cell of 3 could not be tested* (its statistics are undefined)")
    assert "model m, ranking b, layer 1: all 3 paired differences are equal" in note
    assert "counts in its family's size" in note
    assert report.untested_note(tab[tab.reason == ""]) == ""


def test_verdict_texts_state_untested_cells_and_print_no_nan():
    tab = _chapter_table()
    v = S.family_verdicts(tab)
    text = report.family_verdict_text(v, tab)
    assert "of 3 cells (1 of them could not be tested and counts as not passing)" in text
    assert "2 of the 2 tested cells have d_z > 0" in text
    paper = pd.DataFrame({"model": ["olmoe"], "cells": [20], "alpha_bonferroni": [0.0025], "uncorrected_t": [1],
                          "uncorrected_t_positive": [1], "bonferroni_both": [0], "max_abs_d": [0.141],
                          "share_positive": [0.55]})
    cmp = report.audit_comparison_text(v, paper, tab)
    # two tested cells, both positive: binomtest(2, 2) p = 0.5
    assert "(1 could not be tested)" in cmp and "2 of this run's 2 tested (p = 0.5)" in cmp
    only_bad = S.audit_table(_records((("b", FLAT_B),)).assign(ranking="b"), by=("model", "ranking", "layer"))
    vb = S.family_verdicts(only_bad)
    texts = report.family_verdict_text(vb, only_bad) + report.audit_comparison_text(vb, paper, only_bad)
    assert "no cell has a defined d_z" in texts
    assert not re.search(r"\bnan\b", text + cmp + texts)


def test_control_texts_skip_untested_layers():
    control = S.audit_table(_records((("a", GOOD_A), ("b", FLAT_B), ("c", GOOD_C))).assign(ranking="routing_weight"),
                            by=("model", "ranking", "layer"))
    observational = S.audit_table(_records((("a", GOOD_C), ("b", FLAT_B), ("c", GOOD_A))).assign(ranking="x"),
                                  by=("model", "ranking", "layer"))
    cmp = control_against_observational(control, observational)
    assert cmp.position.tolist()[1] == "untested" and not cmp.beaten.iloc[1]
    # the band is that of the tested observational cells: d_z of GOOD_C and GOOD_A
    assert cmp.band_low.iloc[0] == pytest.approx(observational.cohens_dz.iloc[0])
    assert cmp.band_high.iloc[0] == pytest.approx(observational.cohens_dz.iloc[2])
    text = figure1_text(control, observational, alpha=0.05) + control_summary_text(control, alpha=0.05)
    assert "The 2 observational cells that could be tested (of 3)" in text
    assert "1 control cell could not be tested (m layer 1)" in text and "L1: not tested" in text
    assert not re.search(r"\bnan\b", text)
    # a figure with an untested cell draws
    import matplotlib.pyplot as plt

    plt.close(report.figure1(control.assign(rel_depth=control.layer / 2), observational))

