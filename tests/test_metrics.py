"""Observational metrics against hand-computed values on a hand-built routing pattern."""

import numpy as np
import pytest

from moeaudit.metrics import RANKINGS, check_rankings, expert_metrics_from_routing


def test_metrics_on_hand_built_routing():
    # 4 tokens, top-2, 4 experts; expert 3 never selected, expert 2 selected once.
    idx = np.array([[0, 1], [0, 2], [1, 0], [0, 1]])
    prob = np.array([[0.5, 0.3], [0.6, 0.2], [0.7, 0.1], [0.4, 0.4]])
    norm = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 5.0], [2.0, 6.0]])
    m = expert_metrics_from_routing(idx, prob, norm, num_experts=4).set_index("expert")
    # expert 0: tokens 0,1,2,3 with probs .5,.6,.1,.4 and norms 1,3,5,2
    assert m.loc[0, "n_selected"] == 4
    assert m.loc[0, "utilization_rate"] == pytest.approx(4 / 4)
    assert m.loc[0, "mean_routing_weight"] == pytest.approx((0.5 + 0.6 + 0.1 + 0.4) / 4)
    assert m.loc[0, "activation_norm"] == pytest.approx((1 + 3 + 5 + 2) / 4)
    mean0 = 11 / 4
    assert m.loc[0, "activation_std"] == pytest.approx(np.sqrt(sum((v - mean0) ** 2 for v in (1, 3, 5, 2)) / 3))
    # expert 1: tokens 0,2,3 with probs .3,.7,.4 and norms 2,4,6
    assert m.loc[1, "utilization_rate"] == pytest.approx(3 / 4)
    assert m.loc[1, "mean_routing_weight"] == pytest.approx((0.3 + 0.7 + 0.4) / 3)
    assert m.loc[1, "activation_std"] == pytest.approx(2.0)
    # expert 2: once -> std undefined
    assert m.loc[2, "n_selected"] == 1 and np.isnan(m.loc[2, "activation_std"])
    assert m.loc[2, "activation_norm"] == pytest.approx(5.0)
    # expert 3: never selected -> count 0, utilization 0, the rest NaN (no crash)
    assert m.loc[3, "n_selected"] == 0 and m.loc[3, "utilization_rate"] == 0
    assert np.isnan(m.loc[3, "mean_routing_weight"]) and np.isnan(m.loc[3, "activation_norm"])
    assert (m.n_tokens == 4).all()


def test_unknown_metric_is_rejected_with_the_valid_names():
    assert check_rankings(["activation_norm"]) == ["activation_norm"]
    with pytest.raises(ValueError, match="valid metrics are") as e:
        check_rankings(["activation_nrom"])
    assert "activation_nrom" in str(e.value) and all(r in str(e.value) for r in RANKINGS)
