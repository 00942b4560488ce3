"""REAP's expert-pruning criteria (CerebrasResearch/reap at ``metrics.REAP_COMMIT``) and the
super-expert score, each against a hand computation on a hand-built routing pattern: three tokens,
four experts, top-2, expert 3 never routed. The router probabilities of a token's two selected
experts do not sum to one, so REAP's weight with and without top-k renormalisation differ and a
wrong choice of weight fails."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from moeaudit import metrics as M
from moeaudit.families import FAMILIES

E = 4
IDX = np.array([[0, 1], [1, 2], [0, 1]])
# softmax over all four experts, read at the two selected ones (the rest of each row goes to unselected experts)
P = np.array([[0.4, 0.1], [0.3, 0.3], [0.6, 0.2]])
# renormalised over the top-2: token 0 -> 0.4/0.5, 0.1/0.5; token 1 -> 0.3/0.6 twice; token 2 -> 0.6/0.8, 0.2/0.8
P_RENORM = np.array([[0.8, 0.2], [0.5, 0.5], [0.75, 0.25]])
NORM = np.array([[2.0, 4.0], [1.0, 8.0], [6.0, 2.0]])
SMAX = np.array([[1.0, -3.0], [2.0, -0.5], [4.0, 1.5]])
SABS = np.array([[1.0, 5.0], [2.0, 9.0], [4.0, 1.5]])
# mean output of each expert over its routed tokens (H = 2); expert 3 has no routed token (NaN row)
MEANS = np.array([[3.0, 4.0], [0.0, -2.0], [6.0, 8.0], [np.nan, np.nan]])
# expert 0: tokens 0, 2; norms 2, 6        expert 1: tokens 0, 1, 2; norms 4, 1, 2
# expert 2: token 1; norm 8                expert 3: never routed
KW = {"num_experts": E}


def test_router_weights_with_and_without_renormalisation():
    np.testing.assert_allclose(M.reap_router_weights(P, renormalize=False), P)
    np.testing.assert_allclose(M.reap_router_weights(P, renormalize=True), P_RENORM)
    # renormalised weights are clamped below at float32's epsilon, as in REAP
    tiny = M.reap_router_weights(np.array([[1e-12, 0.5]]), renormalize=True)
    assert tiny[0, 0] == pytest.approx(float(np.finfo(np.float32).eps))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.reap_router_weights(np.array([[1.5, 0.1]]), renormalize=False)
    with pytest.raises(ValueError, match="sum to 0"):
        M.reap_router_weights(np.zeros((1, 2)), renormalize=True)


def test_unweighted_criteria_by_hand():
    np.testing.assert_array_equal(M.frequency(IDX, **KW), [2, 3, 1, 0])
    np.testing.assert_array_equal(M.ean_sum(IDX, NORM, **KW), [2 + 6, 4 + 1 + 2, 8, 0])
    np.testing.assert_allclose(M.ean_mean(IDX, NORM, **KW), [8 / 2, 7 / 3, 8, 0])
    # ||(3, 4)|| = 5, ||(0, -2)|| = 2, ||(6, 8)|| = 10, never routed -> 0
    np.testing.assert_allclose(M.ean_ca(MEANS), [5, 2, 10, 0])
    # max element over routed slots, floored at 0: expert 0 max(1, 4); expert 1 max(-3, 2, 1.5);
    # expert 2 only -0.5 -> 0; expert 3 never routed -> 0
    np.testing.assert_array_equal(M.max_activations(IDX, SMAX, **KW), [4, 2, 0, 0])
    np.testing.assert_allclose(M.super_expert_score(IDX, SABS, **KW), [4, 5, 9, np.nan])


def test_weighted_criteria_with_full_softmax_probability():
    g = M.reap_router_weights(P, renormalize=False)
    # expert 0: 0.4 + 0.6; expert 1: 0.1 + 0.3 + 0.2; expert 2: 0.3
    np.testing.assert_allclose(M.weighted_frequency_sum(IDX, g, **KW), [1.0, 0.6, 0.3, 0])
    # expert 0: 0.4*2 + 0.6*6 = 4.4; expert 1: 0.1*4 + 0.3*1 + 0.2*2 = 1.1; expert 2: 0.3*8 = 2.4
    np.testing.assert_allclose(M.weighted_ean_sum(IDX, g, NORM, **KW), [4.4, 1.1, 2.4, 0])
    np.testing.assert_allclose(M.reap_score(IDX, g, NORM, **KW), [4.4 / 2, 1.1 / 3, 2.4, 0])


def test_weighted_criteria_with_renormalised_weight():
    g = M.reap_router_weights(P, renormalize=True)
    # expert 0: 0.8 + 0.75; expert 1: 0.2 + 0.5 + 0.25; expert 2: 0.5
    np.testing.assert_allclose(M.weighted_frequency_sum(IDX, g, **KW), [1.55, 0.95, 0.5, 0])
    # expert 0: 0.8*2 + 0.75*6 = 6.1; expert 1: 0.2*4 + 0.5*1 + 0.25*2 = 1.8; expert 2: 0.5*8 = 4
    np.testing.assert_allclose(M.weighted_ean_sum(IDX, g, NORM, **KW), [6.1, 1.8, 4.0, 0])
    np.testing.assert_allclose(M.reap_score(IDX, g, NORM, **KW), [3.05, 0.6, 4.0, 0])


@pytest.mark.parametrize("renormalize, wfs, wes, reap", [
    (False, [1.0, 0.6, 0.3, 0], [4.4, 1.1, 2.4, 0], [2.2, 1.1 / 3, 2.4, 0]),
    (True, [1.55, 0.95, 0.5, 0], [6.1, 1.8, 4.0, 0], [3.05, 0.6, 4.0, 0]),
])
def test_table_takes_the_probability_and_reaps_choice(renormalize, wfs, wes, reap):
    t = M.reap_criteria_from_routing(IDX, P, NORM, renormalize=renormalize, means=MEANS, slot_max=SMAX,
                                     slot_max_abs=SABS, **KW)
    assert list(t.columns) == ["expert", *M.REAP_CRITERIA]
    np.testing.assert_allclose(t.weighted_frequency_sum, wfs)
    np.testing.assert_allclose(t.weighted_ean_sum, wes)
    np.testing.assert_allclose(t.reap, reap)
    np.testing.assert_allclose(t.ean_ca, [5, 2, 10, 0])
    np.testing.assert_array_equal(t.frequency, [2, 3, 1, 0])
    np.testing.assert_array_equal(t.max_activations, [4, 2, 0, 0])


def test_missing_inputs_leave_their_columns_empty():
    t = M.reap_criteria_from_routing(IDX, P, NORM, renormalize=False, **KW)
    assert t[["ean_ca", "max_activations", "super_expert"]].isna().all().all()
    assert t.drop(columns=["ean_ca", "max_activations", "super_expert"]).notna().all().all()
    with pytest.raises(ValueError, match="one row per expert"):
        M.reap_criteria_from_routing(IDX, P, NORM, renormalize=False, means=MEANS[:3], **KW)


def test_every_criterion_has_a_label_and_the_l2_names_are_absent():
    assert set(M.REAP_CRITERIA) <= set(M.CRITERION_LABELS)
    assert len(set(M.REAP_CRITERIA)) == len(M.REAP_CRITERIA)
    assert len({M.CRITERION_LABELS[c] for c in M.REAP_CRITERIA}) == len(M.REAP_CRITERIA)
    assert not {"weighted_ean_sum_l2", "reap_l2"} & set(M.REAP_CRITERIA)  # listed by REAP, computed nowhere
    assert len(M.REAP_COMMIT) == 40 and int(M.REAP_COMMIT, 16) >= 0


def _model(family: str, **config):
    return SimpleNamespace(layout=SimpleNamespace(spec=FAMILIES[family]), hf=SimpleNamespace(config=SimpleNamespace(**config)))


def test_reap_renormalises_by_the_config_attribute():
    assert M.reap_renormalizes(_model("olmoe", norm_topk_prob=False)) is False
    assert M.reap_renormalizes(_model("qwen3_moe", norm_topk_prob=True)) is True
    assert M.reap_renormalizes(_model("qwen3_moe", norm_topk_prob=True), renormalize_router_weights=False) is False
    # Mixtral renormalises by construction, but its config has no norm_topk_prob: REAP does not
    assert M.reap_renormalizes(_model("mixtral")) is False
    with pytest.raises(ValueError, match="sigmoid"):
        M.reap_renormalizes(_model("deepseek_v3", norm_topk_prob=True))


def test_float64_accumulation():
    idx = np.zeros((4, 1), dtype=np.int64)
    vals = np.array([[1e8], [1.0], [-1e8], [1.0]], dtype=np.float32)
    assert M.routed_sum(idx, vals, num_experts=1)[0] == 2.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        M.ean_sum(IDX, NORM[:2], num_experts=3)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\)"):
        M.frequency(IDX, num_experts=2)
    with pytest.raises(ValueError, match=r"\(E, H\)"):
        M.ean_ca(np.ones(3))


def test_a_failed_forward_is_not_an_unimportant_expert():
    bad = NORM.copy()
    bad[0, 0] = np.nan  # REAP's NaN-to-zero would score expert 0 as never routed
    with pytest.raises(ValueError, match="finite"):
        M.reap_criteria_from_routing(IDX, P, bad, renormalize=False, **KW)
    with pytest.raises(ValueError, match="finite"):
        M.reap_criteria_from_routing(IDX, P, -NORM, renormalize=False, **KW)
    with pytest.raises(TypeError, match="renormalize"):
        M.reap_criteria_from_routing(IDX, P, NORM, renormalize="no", **KW)
