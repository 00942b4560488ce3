"""The learner's aids: reading times, answer checks, and the exercise checks of the chapters without a
module of their own (verification, audit), each judged on hand-computed values with a right and a
wrong answer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moeaudit import report, stats
from moeaudit.chapters import exercises
from moeaudit.chapters.predictors import check_10_predictors_and_pruning_1, smallest_rank_pvalue
from moeaudit.chapters.progressive import check_06_progressive_ablation_2, interval_widening


# --- reading time -------------------------------------------------------------------------------------

def test_word_count_skips_code_and_directive_lines_and_counts_a_role_as_one_word():
    text = ("# A title\n\n````{exercise} Fewer positions\n:label: x-ex1\n\nRun it, then look.\n````\n"
            "```bash\nmake chapter NB=04_audit\n```\nIt has {glue:text}`n_cells` cells — and $d_z$.")
    # A, title | Run, it, then, look. | It, has, <role>, cells, and, $d_z$.  ("—" holds no letter)
    assert report.word_count(text) == 2 + 4 + 6


def test_word_count_refuses_a_non_string():
    with pytest.raises(TypeError, match="markdown must be a str"):
        report.word_count(None)


@pytest.mark.parametrize(("words", "wpm", "minutes"), [(0, 238, 1), (238, 238, 1), (239, 238, 2), (1000, 200, 5)])
def test_reading_minutes_rounds_up_and_is_at_least_one(words, wpm, minutes):
    assert report.reading_minutes(words, wpm=wpm) == minutes


@pytest.mark.parametrize(("words", "wpm"), [(-1, 238), (2.5, 238), (10, 0)])
def test_reading_minutes_refuses_bad_inputs(words, wpm):
    with pytest.raises(ValueError):
        report.reading_minutes(words, wpm=wpm)


def test_chapter_markdown_reads_only_markdown_cells(tmp_path):
    (tmp_path / "x.py").write_text("# ---\n# jupyter: {}\n# ---\n\n# %% [markdown]\n# # Title\n#\n# One two three.\n\n"
                                   "# %%\nx = 1  # a comment of code\n\n# %% [markdown]\n# Four five.\n")
    md = report.chapter_markdown("x", notebooks=tmp_path)
    assert md == "# Title\n\nOne two three.\n\n\nFour five."
    assert report.word_count(md) == 6  # "#" holds no letter
    assert report.chapter_reading_minutes("x", notebooks=tmp_path, wpm=4) == 2  # ceil(6 / 4)


def test_chapter_markdown_names_the_valid_chapters_for_an_unknown_one(tmp_path):
    (tmp_path / "01_a.py").write_text("")
    with pytest.raises(ValueError, match=r"one of \['01_a'\]; got 'nope'"):
        report.chapter_markdown("nope", notebooks=tmp_path)


def test_every_chapter_of_the_book_has_a_reading_time():
    from moeaudit.tooling import book

    for stem in book.chapters():
        assert report.chapter_reading_minutes(stem) >= 1


# --- answer checks --------------------------------------------------------------------------------------

def test_check_answer_right_within_tolerance_and_wrong_with_the_distance():
    right = report.check_answer(0.402, 0.4, what="the effect", tolerance=0.005, unit="nats")
    assert right.correct and str(right).startswith("Right: the effect is 0.402 nats")
    wrong = report.check_answer(0.5, 0.4, what="the effect", tolerance=0.005, unit="nats")
    assert not wrong.correct
    assert str(wrong) == "Not yet: your 0.5 for the effect is 0.1 nats too high (25% above)."
    low = report.check_answer(3, 4, what="the count")
    assert str(low) == "Not yet: your 3 for the count is 1 too low (25% below)."
    assert not report.check_answer(1, 0, what="a zero").correct  # no relative distance to a zero


@pytest.mark.parametrize("answer", ["0.4", None, float("nan"), True, [0.4]])
def test_check_answer_refuses_an_answer_that_is_not_a_number(answer):
    with pytest.raises(ValueError, match="answer must be a finite number"):
        report.check_answer(answer, 0.4, what="x")


def test_check_answer_refuses_a_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        report.check_answer(0.4, 0.4, what="x", tolerance=-1)


# --- chapter 2 ------------------------------------------------------------------------------------------

def _suite():
    # token mode: exact zero (passes strictly), rounding residue (fails strictly), inactive larger (fails);
    # sequence mode and other checks are not counted
    return pd.DataFrame({"key": ["position"] * 4 + ["losses"], "mode": ["token", "token", "token", "sequence", "token"],
                         "d_active": [0.5, 0.5, 0.1, 0.5, 0.5], "d_inactive": [0.0, 1e-7, 0.2, 0.0, 0.0]})


def test_strict_token_passes_counts_exact_zeros_only():
    assert exercises.strict_token_passes(_suite()) == 1


def test_check_02_verification_1_right_and_wrong():
    assert exercises.check_02_verification_1(1, _suite()).correct
    wrong = exercises.check_02_verification_1(2, _suite())
    assert not wrong.correct and "1 too high" in str(wrong)


def test_check_02_verification_1_refuses_another_table():
    with pytest.raises(ValueError, match="suite table"):
        exercises.check_02_verification_1(1, pd.DataFrame({"key": ["position"]}))


# --- chapter 4 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "quarter"), [(200, 50), (13, 3), (3, 3)])
def test_quarter_positions(n, quarter):
    assert exercises.quarter_positions(n) == quarter


def test_quarter_positions_refuses_too_few():
    with pytest.raises(ValueError, match="n_positions must be a whole number >= 3"):
        exercises.quarter_positions(2)


def test_check_04_audit_1_uses_a_quarter_of_the_positions_and_the_first_family():
    verdicts = pd.DataFrame({"model": ["a", "b"], "cells": [20, 4]})
    # Bonferroni level of the first model's family: 0.05 / 20; a quarter of 200 positions: 50
    expected = stats.min_detectable_dz(50, alpha=0.0025, power=0.8)
    assert 0.4 < expected < 0.7  # a paired t-test on 50 pairs at a strict level: a medium effect
    assert exercises.check_04_audit_1(round(expected, 3), verdicts, n_positions=200, alpha=0.05, power=0.8).correct
    # the answer at the uncorrected level (the wrong family) is judged wrong
    uncorrected = stats.min_detectable_dz(50, alpha=0.05, power=0.8)
    assert not exercises.check_04_audit_1(uncorrected, verdicts, n_positions=200, alpha=0.05, power=0.8).correct


def test_check_04_audit_1_refuses_an_empty_verdict_table():
    with pytest.raises(ValueError, match="verdict table"):
        exercises.check_04_audit_1(0.5, pd.DataFrame({"cells": []}), n_positions=200, alpha=0.05, power=0.8)


# --- chapter 6 ------------------------------------------------------------------------------------------

def test_interval_widening_is_the_ratio_of_t_quantiles():
    # t_{0.995, 9} = 3.2498, t_{0.975, 9} = 2.2622 (printed tables of Student's t)
    assert interval_widening(10, alpha=0.05, new_alpha=0.01) == pytest.approx(3.2498 / 2.2622, abs=2e-4)
    assert interval_widening(10, alpha=0.05, new_alpha=0.05) == 1.0
    with pytest.raises(ValueError, match="n_positions"):
        interval_widening(1, alpha=0.05, new_alpha=0.01)


def test_check_06_progressive_ablation_2_right_and_wrong():
    assert check_06_progressive_ablation_2(1.437, n_positions=10, alpha=0.05).correct
    wrong = check_06_progressive_ablation_2(1.2, n_positions=10, alpha=0.05)
    assert not wrong.correct and "too low" in str(wrong)


# --- chapter 10 -----------------------------------------------------------------------------------------

def test_smallest_rank_pvalue_is_one_over_draws_plus_one():
    assert smallest_rank_pvalue(5) == pytest.approx(1 / 6)
    assert smallest_rank_pvalue(99) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="n_draws"):
        smallest_rank_pvalue(0)


def test_check_10_predictors_and_pruning_1_right_and_wrong():
    assert check_10_predictors_and_pruning_1(0.167).correct
    assert not check_10_predictors_and_pruning_1(0.2).correct  # 1/5: the draws without the criterion
    assert math.isclose(check_10_predictors_and_pruning_1(0.1, n_draws=9).expected, 0.1)
    assert np.isfinite(check_10_predictors_and_pruning_1(0.5).expected)


# --- chapter 13 (its checks live in moeaudit.chapters.modularity) -------------------------------------------

def test_check_13_command_a_modularity_1_counts_the_shared_experts():
    from moeaudit.chapters import modularity as M

    derived = {"es": [1, 2, 7], "ar": [2, 5, 7], "de": [1]}  # shared by es and ar: 2 and 7
    assert M.check_13_command_a_modularity_1(2, derived).correct
    assert not M.check_13_command_a_modularity_1(3, derived).correct  # 1 is shared with de, not ar
    with pytest.raises(ValueError, match="lacks \\['ar'\\]"):
        M.check_13_command_a_modularity_1(2, {"es": [1]})


def test_check_13_command_a_modularity_2_needs_the_decimals_of_the_stated_margin():
    from moeaudit.chapters import modularity as M

    # printed 1.29 and 0.43 at 2 decimals (margin 0); a stated margin of +0.002 shifts them to 1.293 and 0.429:
    # at 3 decimals the margin lies in [1.2925/3 - 0.4295, 1.2935/3 - 0.4285] = [+0.0013, +0.0027], settled
    verdict = pd.DataFrame([{"precision": "W4A4", "family": "es", "domain": "lang", "on_target": 1.29, "ci_low": 1.23,
                             "ci_high": 1.36, "null_2sigma": 0.58, "worst_off": 0.43, "worst_off_axis": "ar",
                             "stated_point": 1.0, "stated_ci": 0.0, "n_items": 120, "decimals": 2}])
    assert M.check_13_command_a_modularity_2(3, verdict, {"es_point_margin": 0.002}).correct
    wrong = M.check_13_command_a_modularity_2(2, verdict, {"es_point_margin": 0.002})
    assert not wrong.correct and "1 too low" in str(wrong)
    with pytest.raises(ValueError, match="W4A4 row"):
        M.check_13_command_a_modularity_2(3, verdict.assign(family="ar"), {"es_point_margin": 0.002})


# --- chapter 9 (its check lives in moeaudit.chapters.definitions) -------------------------------------------

@pytest.mark.parametrize(("n", "fifth"), [(200, 40), (14, 3), (3, 3)])
def test_fifth_positions(n, fifth):
    from moeaudit.chapters.definitions import fifth_positions

    assert fifth_positions(n) == fifth


def test_check_09_intervention_definitions_3_uses_a_fifth_of_the_positions_and_the_family():
    from moeaudit.chapters.definitions import check_09_intervention_definitions_3 as check

    expected = stats.min_detectable_dz(40, alpha=0.05 / 20, power=0.8)  # 200 positions -> 40, family of 20
    assert check(round(expected, 2), n_positions=200, alpha=0.05, family=20).correct
    assert not check(stats.min_detectable_dz(200, alpha=0.05 / 20, power=0.8), n_positions=200, alpha=0.05,
                     family=20).correct  # the full run's effect, not the fifth's
    with pytest.raises(ValueError, match="family must be"):
        check(0.5, n_positions=200, alpha=0.05, family=0)
