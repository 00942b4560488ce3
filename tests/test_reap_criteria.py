"""The expert-pruning criteria of REAP's reference code and the super-expert score, on a hand-built
routing pattern (three tokens, top-2, three experts)."""

from __future__ import annotations

import numpy as np
import pytest

from moeaudit import metrics as M

IDX = np.array([[0, 1], [1, 2], [0, 1]])
W = np.array([[0.5, 0.25], [1.0, 0.5], [0.25, 0.5]])
NORM = np.array([[2.0, 4.0], [1.0, 8.0], [6.0, 2.0]])
SMAX = np.array([[1.0, -3.0], [2.0, 0.5], [4.0, 1.5]])
SABS = np.array([[1.0, 5.0], [2.0, 9.0], [4.0, 1.5]])
# expert 0: tokens 0, 2 (w 0.5, 0.25; norm 2, 6; g*norm 1, 1.5)
# expert 1: tokens 0, 1, 2 (w 0.25, 1, 0.5; norm 4, 1, 2; g*norm 1, 1, 1)
# expert 2: token 1 (w 0.5; norm 8; g*norm 4)


def test_each_criterion_by_hand():
    kw = {"num_experts": 4}  # expert 3 is never routed
    np.testing.assert_array_equal(M.frequency(IDX, **kw), [2, 3, 1, 0])
    np.testing.assert_array_equal(M.ean_sum(IDX, NORM, **kw), [8.0, 7.0, 8.0, 0.0])
    np.testing.assert_allclose(M.ean_mean(IDX, NORM, **kw), [4.0, 7 / 3, 8.0, np.nan])
    np.testing.assert_array_equal(M.weighted_frequency(IDX, W, **kw), [0.75, 1.75, 0.5, 0.0])
    np.testing.assert_array_equal(M.weighted_ean_sum(IDX, W, NORM, **kw), [2.5, 3.0, 4.0, 0.0])
    np.testing.assert_allclose(M.weighted_ean_sum_l2(IDX, W, NORM, **kw), [np.sqrt(1 + 2.25), np.sqrt(3), 4.0, 0.0])
    np.testing.assert_allclose(M.reap_score(IDX, W, NORM, **kw), [1.25, 1.0, 4.0, np.nan])
    np.testing.assert_allclose(M.reap_l2(IDX, W, NORM, **kw), [np.sqrt(3.25 / 2), 1.0, 4.0, np.nan])
    np.testing.assert_allclose(M.max_activation(IDX, SMAX, **kw), [4.0, 2.0, 0.5, np.nan])
    np.testing.assert_allclose(M.super_expert_score(IDX, SABS, **kw), [4.0, 5.0, 9.0, np.nan])


def test_table_and_agreement_with_the_existing_reap():
    t = M.reap_criteria_from_routing(IDX, W, NORM, num_experts=3, slot_max=SMAX, slot_max_abs=SABS)
    assert list(t.columns) == ["expert", *M.REAP_CRITERIA]
    old = M.literature_criteria_from_routing(IDX, W, NORM, num_experts=3)
    np.testing.assert_allclose(t.reap, old.reap)
    np.testing.assert_allclose(t.ean_sum / 3, old.freq_weighted_norm)  # (1/N) sum norm, N = 3 tokens
    assert t.max_activation.notna().all()
    assert M.reap_criteria_from_routing(IDX, W, NORM, num_experts=3).super_expert.isna().all()


def test_float64_accumulation():
    idx = np.zeros((4, 1), dtype=np.int64)
    vals = np.array([[1e8], [1.0], [-1e8], [1.0]], dtype=np.float32)
    assert M.routed_sum(idx, vals, num_experts=1)[0] == 2.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        M.ean_sum(IDX, NORM[:2], num_experts=3)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\)"):
        M.frequency(IDX, num_experts=2)
