"""Answer checks for the exercises of the chapters without a module of their own (verification, the
audit): each ``check_<chapter>_<n>(answer, ...)`` recomputes, from the tables the page made, the
value the exercise asks for and says whether ``answer`` is right or how far off it is.

A check takes the page's own tables and parameters (the names the executed notebook defines), so it
runs in the notebook downloaded from the page after its cells have run; it judges the reader's
number with :func:`moeaudit.report.check_answer`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..report import AnswerCheck, check_answer
from ..stats import MIN_PAIRS, min_detectable_dz
from ..verify import check4_rules


def strict_token_passes(suite: pd.DataFrame) -> int:
    """How many token-mode position checks pass the book's rule with ``tolerance=0``
    (:func:`moeaudit.verify.check4_rules`): the paper's rule ``|d_active| > |d_inactive|`` and an
    inactive-position loss change of exactly 0 nats. ``suite``: the verification chapter's suite table
    (columns ``key``, ``mode``, ``d_active``, ``d_inactive``, nats). ``ValueError`` for a table
    without those columns."""
    missing = {"key", "mode", "d_active", "d_inactive"} - set(suite.columns)
    if missing:
        raise ValueError(f"suite must be the verification chapter's suite table; it lacks {sorted(missing)}")
    rows = suite[(suite.key == "position") & (suite["mode"] == "token")]
    return sum(check4_rules(r.d_active, r.d_inactive, mode="token", tolerance=0.0)["book"] for r in rows.itertuples())


def check_02_verification_1(answer, suite: pd.DataFrame) -> AnswerCheck:
    """Exercise 1 of the verification chapter: the number of token-mode suites whose position check
    still passes the book's rule at ``tolerance=0`` (:func:`strict_token_passes`), an exact count.
    ``ValueError`` for an answer that is not a number or a table that is not the suite table."""
    expected = strict_token_passes(suite)  # the table is checked before the answer is judged
    return check_answer(answer, expected, what="the number of token-mode suites that pass the strict rule")


def quarter_positions(n_positions: int) -> int:
    """The audit chapter's "fewer positions" run: a quarter of ``n_positions`` (floor), at least
    :data:`moeaudit.stats.MIN_PAIRS`. ``ValueError`` for fewer than ``MIN_PAIRS`` positions."""
    if isinstance(n_positions, bool) or int(n_positions) != n_positions or n_positions < MIN_PAIRS:
        raise ValueError(f"n_positions must be a whole number >= {MIN_PAIRS}, got {n_positions!r}")
    return max(MIN_PAIRS, int(n_positions) // 4)


def check_04_audit_1(answer, verdicts: pd.DataFrame, *, n_positions: int, alpha: float, power: float) -> AnswerCheck:
    """Exercise 1 of the audit chapter: the smallest |d_z| that the paired t-test detects with
    ``power`` at a quarter of the positions (:func:`quarter_positions`), two-sided, at the Bonferroni
    level ``alpha / cells`` of the first model's family (``verdicts.cells`` of its first row;
    :func:`moeaudit.stats.min_detectable_dz`). Right within 0.005 (the page prints three decimals).
    ``ValueError`` for an empty verdict table, a bad ``n_positions`` or an answer that is not a number."""
    if len(verdicts) == 0 or "cells" not in verdicts:
        raise ValueError("verdicts must be the audit chapter's verdict table (a column 'cells', one row per model)")
    cells = int(np.asarray(verdicts["cells"])[0])
    expected = min_detectable_dz(quarter_positions(n_positions), alpha=alpha / cells, power=power)
    return check_answer(answer, expected, what="the smallest detectable |d_z| at a quarter of the positions",
                        tolerance=0.005)
