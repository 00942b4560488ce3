"""Chapters 2 and 3: the verification suite's helpers and the descriptions of the observational
metrics, checked against hand-computed tiny inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit import metrics as M
from moeaudit import verify as V


# --- chapter 2: verification ------------------------------------------------------------------

def test_rounding_tolerance_is_ulps_of_the_loss():
    assert V.rounding_tolerance(4.0) == pytest.approx(8 * 2.0 ** -23 * 4.0)
    assert V.rounding_tolerance(0.5) == pytest.approx(8 * 2.0 ** -23)       # floor at |loss| = 1
    assert V.rounding_tolerance(2.0, dtype=torch.float16, n_ulp=1) == pytest.approx(2 * 2.0 ** -10)
    with pytest.raises(ValueError):
        V.rounding_tolerance(float("nan"))


def test_check4_rules_released_passes_what_the_paper_and_the_book_fail():
    # the inactive change is larger: the paper's rule and the book's fail, the released rule passes
    assert V.check4_rules(0.001, -0.002, mode="sequence") == {"paper": False, "released": True, "book": False}
    # sequence mode: active larger, nonzero inactive is allowed
    assert V.check4_rules(-0.01, 0.002, mode="sequence") == {"paper": True, "released": True, "book": True}
    # token mode: a nonzero inactive effect beyond the tolerance fails only the book's rule
    assert V.check4_rules(0.01, 0.002, mode="token", tolerance=1e-6) == {"paper": True, "released": True, "book": False}
    assert V.check4_rules(0.01, 4.7e-7, mode="token", tolerance=1e-6)["book"]
    # no pair found: everything fails, the released rule included
    assert not any(V.check4_rules(np.nan, np.nan, mode="token").values())
    with pytest.raises(ValueError):
        V.check4_rules(1.0, 0.0, mode="both")


def _suite_rows(model, layer, mode, d_active, d_inactive, u=30.0, tol=1e-6):
    rows = [{"key": k, "value": v, "passed": True} for k, v in (("ce", 1e-8), ("stale", 0.0), ("diversity", 1.0))]
    pos = {"t": 10, "u": u, "d_active": d_active, "d_inactive": d_inactive, "tolerance": tol}
    rows.append({"key": "position", "value": abs(d_active) - abs(d_inactive), "passed": True, **pos})
    rows.append({"key": "inactive", "value": abs(d_inactive), "passed": True, **pos})
    return pd.DataFrame(rows).assign(model=model, layer=layer, mode=mode)


def _suite():
    return pd.concat([
        _suite_rows("a", 0, "token", 0.02, 0.0), _suite_rows("a", 3, "token", 0.01, 5e-7),
        _suite_rows("a", 0, "sequence", 0.02, 0.004), _suite_rows("a", 3, "sequence", 0.01, 2e-7),
        _suite_rows("b", 1, "token", 0.003, 0.0), _suite_rows("b", 1, "sequence", 0.001, -0.002),
    ], ignore_index=True)


def test_check4_summary_counts_by_hand():
    s = V.check4_summary(_suite(), last_layer={"a": 3, "b": 5})
    assert (s["n_token"], s["n_token_zero"], s["n_token_within_tol"]) == (3, 2, 3)
    # sequence suites at inner layers: a/0 (0.004) and b/1 (0.002); the last layer: a/3
    assert (s["n_seq_inner"], s["n_seq_inner_nonzero"], s["n_seq_last"]) == (2, 2, 1)
    assert s["median_seq_inner"] == pytest.approx(0.003)
    assert s["max_seq_last"] == pytest.approx(2e-7) and s["n_seq_last_within_tol"] == 1
    assert (s["pass_paper_sequence"], s["pass_released_sequence"], s["pass_book_sequence"]) == (2, 3, 2)
    assert (s["pass_paper_token"], s["pass_book_token"]) == (3, 3)


def test_suite_tables_pivot_one_mode():
    val, ok = V.suite_tables(_suite(), "token")
    assert list(val.index) == [("a", 0), ("a", 3), ("b", 1)]
    assert list(val.columns) == ["t / u", *V.CHECK_LABELS.values()]
    assert val.loc[("a", 3), V.CHECK_LABELS["inactive"]] == pytest.approx(5e-7)
    assert val.loc[("a", 0), "t / u"] == "10 / 30"
    assert ok.to_numpy().all()
    with pytest.raises(ValueError):
        V.suite_tables(_suite(), "neither")


def test_layers_text():
    assert V.layers_text([1, 2, 3, 4]) == "1–4 (4)"
    assert V.layers_text([0, 7]) == "0, 7"
    assert V.layers_text([0, 1]) == "0, 1"


# --- chapter 3: the observational metrics -----------------------------------------------------

def _layer_table():
    # 5 experts; expert 4 selected once (std undefined), the rest with hand-picked metrics
    return pd.DataFrame({"expert": range(5), "n_selected": [4, 3, 2, 5, 1],
                         "utilization_rate": [0.4, 0.3, 0.2, 0.5, 0.1],
                         "activation_norm": [1.0, 2.0, 3.0, 4.0, 9.0],
                         "mean_routing_weight": [0.4, 0.3, 0.2, 0.1, 0.5],
                         "activation_std": [0.1, 0.3, 0.2, 0.4, np.nan]})


def test_metric_rank_correlations_by_hand():
    rho, n = M.metric_rank_correlations(_layer_table())
    assert n == 4                                                  # expert 4 drops out
    assert rho.loc["activation_norm", "mean_routing_weight"] == pytest.approx(-1.0)
    # util ranks (3,2,1,4) vs norm ranks (1,2,3,4): d = (2,0,-2,0), rho = 1 - 6*8/(4*15) = 0.2
    assert rho.loc["utilization_rate", "activation_norm"] == pytest.approx(0.2)
    # norm ranks (1,2,3,4) vs std ranks (1,3,2,4): rho = 1 - 6*2/60 = 0.8
    assert rho.loc["activation_norm", "activation_std"] == pytest.approx(0.8)


def test_metric_depth_trend_by_hand():
    m = pd.concat([_layer_table().assign(layer=L, activation_norm=_layer_table().activation_norm * f)
                   for L, f in ((0, 1.0), (1, 2.0), (2, 0.5))])
    trend = M.metric_depth_trend(m)
    assert trend["activation_norm"] == pytest.approx(-0.5)        # medians 3, 6, 1.5: ranks 2, 3, 1
    assert np.isnan(trend["utilization_rate"])                     # the same median at every layer


def test_load_balance_by_hand():
    u = np.array([0.5, 0.25, 0.25, 0.0])                            # k=1 of 4 experts: uniform 0.25
    out = M.load_balance(u, np.array([50, 5, 25, 0]), top_k=1, num_experts=4)
    assert (out["never"], out["rare"]) == (1, 1)
    assert out["max_rel"] == pytest.approx(2.0) and out["min_rel"] == 0.0
    assert out["cv"] == pytest.approx(np.std(u) / 0.25)
    assert out["top10_share"] == pytest.approx(0.5)                # the single top expert
    with pytest.raises(ValueError):
        M.load_balance(u[:3], np.array([1, 1, 1]), top_k=1, num_experts=4)


def test_pick_active_ties_and_nan():
    idx = np.array([[0, 2], [1, 3], [2, 3]])
    score = np.array([1.0, 5.0, 1.0, np.nan])
    assert M.pick_active(idx, score, high=True).tolist() == [0, 1, 2]      # tie 0/2 -> lowest id
    assert M.pick_active(idx, score, high=False).tolist() == [2, 1, 2]     # tie -> highest id; NaN last


def test_accumulate_router_sums_by_hand():
    acc = {"logit_real": np.zeros(3), "logit_pad": np.zeros(3), "sel_real": np.zeros(3), "sel_pad": np.zeros(3),
           "n_real": 0, "n_pad": 0}
    logits = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0], [5.0, 5.0, 5.0]])
    idx = np.array([[2], [2], [0]])
    M.accumulate_router_sums(acc, logits, idx, np.array([False, False, True]))
    assert acc["logit_real"].tolist() == [1.0, 1.0, 4.0] and acc["logit_pad"].tolist() == [5.0, 5.0, 5.0]
    assert acc["sel_real"].tolist() == [0, 0, 2] and acc["sel_pad"].tolist() == [1, 0, 0]
    assert (acc["n_real"], acc["n_pad"]) == (2, 1)
    v = M.released_utilisation_variants(np.array([0.0, 0.0, 1.0]), acc, pad_share=0.5)
    assert v["mean logit, real tokens"].tolist() == [0.5, 0.5, 2.0]
    assert v["mean logit, padded"].tolist() == [2.75, 2.75, 3.5]
    assert v["selection share, padded"].tolist() == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError):
        M.released_utilisation_variants(np.zeros(3), acc, pad_share=1.0)


def test_ranking_agreement_by_hand():
    idx = np.array([[0, 1], [1, 2], [0, 2]])
    ref, score = np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])     # reversed order
    out = M.ranking_agreement(idx, ref, score)
    assert out["rho"] == pytest.approx(-1.0)
    assert out["same_high"] == 0.0 and out["same_low"] == 0.0
    assert M.ranking_agreement(idx, ref, ref)["same_high"] == 1.0


def test_router_sums_count_the_engines_selections(model_cache, corpus, clean_cache):
    """Selections summed over real positions equal the clean pass's routing record."""
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    out = M.router_sums_real_and_padding(model, corpus, batch_size=2)
    width = int(corpus.lengths.max())
    for L, acc in out["layers"].items():
        assert acc["n_real"] == int(corpus.lengths.sum())
        assert acc["n_real"] + acc["n_pad"] == len(corpus) * width
        counts = np.bincount(clean.routing[L]["indices"].reshape(-1), minlength=model.layout.num_experts)
        np.testing.assert_array_equal(acc["sel_real"], counts)


def test_suite_tables_keep_each_models_layer_order():
    """Rows follow the suite, model by model: a layer that only a later model audits is not moved
    behind the layers an earlier model shares with it (chapter 2 once listed 4, 5, 7, 1, 3)."""
    rows = [_suite_rows("a", L, "token", 0.02, 0.0) for L in (0, 2, 4)]
    rows += [_suite_rows("b", L, "token", 0.02, 0.0) for L in (1, 3, 4)]
    val, ok = V.suite_tables(pd.concat(rows, ignore_index=True), "token")
    assert list(val.index) == [("a", 0), ("a", 2), ("a", 4), ("b", 1), ("b", 3), ("b", 4)]
    assert list(ok.index) == list(val.index)
