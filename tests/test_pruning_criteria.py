"""Pruning criteria (metrics), pruning plans and the random baseline (pruning), on hand-computed inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit import metrics, pruning
from moeaudit.engine import CleanPass


# ---- literature criteria ------------------------------------------------------------------------

def _clean():
    tokens = pd.DataFrame({"seq_id": [0, 0, 1], "t": [0, 1, 0]})
    routing = {3: {"indices": np.array([[0, 1], [0, 2], [1, 0]]),
                   "weight": np.array([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]),
                   "prob": np.array([[0.4, 0.3], [0.2, 0.6], [0.7, 0.1]]),
                   "norm": np.array([[2.0, 4.0], [8.0, 1.0], [6.0, 10.0]])}}
    return CleanPass(model_name="toy", tokens=tokens, routing=routing, offsets=np.array([0, 2]))


@pytest.mark.parametrize("renormalize", [False, True])
def test_literature_criteria_by_hand(renormalize):
    # three tokens, top-2, four experts; expert 3 is never selected; REAP weights by the router's
    # probability (renormalised over the top-2 when asked: rows sum to 0.7, 0.8, 0.8), not by the
    # combine weight the model applies ("weight"), which differs here
    got = metrics.pruning_criteria(_clean(), num_experts=4, renormalize=renormalize).set_index("expert")
    # freq-weighted norm: sum of the expert's norms over the N = 3 tokens, divided by 3
    assert got.freq_weighted_norm.tolist() == pytest.approx([(2 + 8 + 10) / 3, (4 + 6) / 3, 1 / 3, 0.0])
    s = (0.7, 0.8, 0.8) if renormalize else (1.0, 1.0, 1.0)
    # REAP: mean of g * ||E|| over the tokens that select the expert; 0 for one never selected
    assert got.reap[0] == pytest.approx((0.4 / s[0] * 2 + 0.2 / s[1] * 8 + 0.1 / s[2] * 10) / 3)
    assert got.reap[1] == pytest.approx((0.3 / s[0] * 4 + 0.7 / s[2] * 6) / 2)
    assert got.reap[2] == pytest.approx(0.6 / s[1] * 1)
    assert got.reap[3] == 0.0


def test_pruning_criteria_restricts_to_the_calibration_texts():
    crit = metrics.pruning_criteria(_clean(), num_experts=4, renormalize=False, seq_ids=[0]).set_index("expert")
    # text 0 only (two tokens): expert 0 selected twice with norms 2 and 8, probabilities 0.4 and 0.2
    assert crit.utilization_rate.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert crit.freq_weighted_norm[0] == pytest.approx((2 + 8) / 2)
    assert crit.reap[0] == pytest.approx((0.4 * 2 + 0.2 * 8) / 2)
    assert crit.mean_routing_weight[0] == pytest.approx(0.3)
    assert set(crit.layer) == {3}


def test_token_gap_norm_reads_the_experts_slot():
    rec = pd.DataFrame({"layer": [3, 3, 3], "seq_id": [0, 1, 0], "t": [1, 0, 0], "expert": [2, 0, 3],
                        "weight": [0.75, 0.5, 0.1]})
    got = metrics.token_gap_norm(_clean(), rec)
    assert got[:2] == pytest.approx([0.75 * 1.0, 0.5 * 10.0])
    assert np.isnan(got[2])  # expert 3 is not active there
    with pytest.raises(ValueError, match="layer 5"):
        metrics.token_gap_norm(_clean(), rec.assign(layer=5))


def test_paired_by_value_takes_extremes_and_breaks_ties_by_id():
    rec = pd.DataFrame({"model": "toy", "layer": 0, "seq_id": [0, 0, 0, 1, 1, 2, 2],
                        "t": [4, 4, 4, 2, 2, 1, 1], "expert": [5, 1, 3, 0, 7, 2, 3],
                        "v": [0.2, 0.9, 0.2, 0.5, 0.5, 1.0, np.nan],
                        "delta_loss": [0.1, 0.3, -0.2, 0.05, 0.01, 0.4, 0.0]})
    got = metrics.paired_by_value(rec, "v", ranking="toy_rank")
    # position (0, 4): high = expert 1; low tie between 5 and 3 at 0.2 -> the higher id, 5
    # position (1, 2): all tied -> high = lowest id 0, low = highest id 7
    # position (2, 1): only one expert has a value -> dropped
    assert got[["seq_id", "expert_high", "expert_low"]].values.tolist() == [[0, 1, 5], [1, 0, 7]]
    assert got["diff"].tolist() == pytest.approx([0.3 - 0.1, 0.05 - 0.01])
    assert (got.ranking == "toy_rank").all()


# ---- plans -----------------------------------------------------------------------------------

def test_criterion_plan_removes_the_lowest_per_layer():
    crit = pd.DataFrame({"layer": [1] * 4 + [2] * 4, "expert": [0, 1, 2, 3] * 2,
                         "c": [0.3, np.nan, 0.1, 0.9, 5.0, 4.0, 4.0, 1.0]})
    assert pruning.criterion_plan(crit, "c", 0.5, [1, 2]) == {1: [1, 2], 2: [1, 3]}
    with pytest.raises(KeyError):
        pruning.criterion_plan(crit, "c", 0.5, [7])


def test_random_plan_is_seeded_per_layer_and_sized():
    a = pruning.random_plan(8, 0.25, [0, 1], seed=1, draw=0)
    assert [len(v) for v in a.values()] == [2, 2] and all(len(set(v)) == 2 for v in a.values())
    assert pruning.random_plan(8, 0.25, [1], seed=1, draw=0) == {1: a[1]}  # same choice alone or together
    draws = {tuple(pruning.random_plan(8, 0.25, [0], seed=1, draw=d)[0]) for d in range(20)}
    assert len(draws) > 5  # different draws differ
    with pytest.raises(ValueError):
        pruning.n_pruned(8, 1.0)


def test_pruning_plans_layout():
    crit = pd.DataFrame({"layer": [1] * 4 + [2] * 4, "expert": [0, 1, 2, 3] * 2, "c": np.arange(8.0)})
    plans, meta = pruning.pruning_plans(crit, criteria_names=["c"], fractions=[0.25, 0.5], n_random=3,
                                        moe_layers=[1, 2], num_experts=4, seed=0, per_layer_fraction=0.5)
    assert plans[0] == {} and len(plans) == 1 + len(meta)
    assert len(meta) == 2 * (1 + 3) + 2 * (1 + 3)
    assert meta.criterion.value_counts()["random"] == 12
    assert plans[1] == {1: [0], 2: [0]}
    single = meta.index[(meta.scope == 2) & (meta.criterion == "c")][0]
    assert plans[1 + single] == {2: [0, 1]}
    _, meta2 = pruning.pruning_plans(crit, criteria_names=["c"], fractions=[0.25], n_random=3, moe_layers=[1, 2],
                                     num_experts=4, seed=0, per_layer_fraction=0.5, n_random_per_layer=1)
    assert meta2.groupby("scope").size().to_dict() == {"all": 4, 1: 2, 2: 2}
    with pytest.raises(ValueError):
        pruning.pruning_plans(crit, criteria_names=["c"], fractions=[0.25], n_random=0, moe_layers=[1],
                              num_experts=4, seed=0)


# ---- random baseline ----------------------------------------------------------------------------

def test_random_rank_pvalue_by_hand():
    draws = [10.0, 12.0, 11.0, 9.0]
    assert pruning.random_rank_pvalue(8.0, draws) == pytest.approx(1 / 5)      # better than all four
    assert pruning.random_rank_pvalue(10.5, draws) == pytest.approx(3 / 5)     # 9 and 10 are as good
    assert pruning.random_rank_pvalue(11.0, draws) == pytest.approx(4 / 5)     # a tie counts as at least as good
    assert pruning.random_rank_pvalue(13.0, draws) == pytest.approx(1.0)
    assert pruning.random_rank_pvalue(13.0, draws, lower_is_better=False) == pytest.approx(1 / 5)
    with pytest.raises(ValueError):
        pruning.random_rank_pvalue(1.0, [])
    with pytest.raises(ValueError):
        pruning.random_rank_pvalue(np.nan, draws)


def test_random_rank_pvalue_is_uniform_under_exchangeability():
    rng = np.random.default_rng(0)
    n = 19
    ps = np.array([pruning.random_rank_pvalue(x[0], x[1:]) for x in rng.normal(size=(4000, n + 1))])
    assert ps.min() == pytest.approx(1 / (n + 1))
    assert abs((ps <= 0.05).mean() - 1 / 20) < 0.015  # P(p <= 1/20) = 1/20 exactly for 19 draws


def test_compare_with_random_summaries():
    res = pd.DataFrame({"model": "m", "scope": "all", "fraction": 0.5,
                        "criterion": ["a", "b", *["random"] * 4], "perplexity": [8.0, 10.5, 10, 12, 11, 9]})
    got = pruning.compare_with_random(res).set_index("criterion")
    assert got.loc["a", "p_rank"] == pytest.approx(1 / 5) and bool(got.loc["a", "beats_all"])
    assert got.loc["b", "random_median"] == pytest.approx(10.5)
    assert got.loc["b", "random_mean"] == pytest.approx(10.5) and not bool(got.loc["b", "beats_mean"])
    assert got.loc["a", "z"] == pytest.approx((8 - 10.5) / np.std([10, 12, 11, 9], ddof=1))
    assert (got.n_draws == 4).all() and got.loc["b", "random_min"] == 9
    with pytest.raises(ValueError, match="no random draw"):
        pruning.compare_with_random(res.assign(fraction=[0.25, 0.5, 0.5, 0.5, 0.5, 0.5]))


def test_rank_tests_by_criterion_and_phrase():
    from moeaudit import pruning as P
    vs = pd.DataFrame({"model": "m", "criterion": ["a", "a", "b", "b"], "fraction": [0.25, 0.5, 0.25, 0.5],
                       "p_rank": [0.04, 0.04, 0.04, 0.5], "beats_mean": [True, True, True, False]})
    out = P.rank_tests_by_criterion(vs, alpha=0.05, token_cells=pd.Series(
        [0, 2], index=pd.MultiIndex.from_tuples([("m", "a"), ("m", "b")]))).set_index("criterion")
    assert bool(out.loc["a", "p ≤ alpha at every fraction"]) and not out.loc["b", "p ≤ alpha at every fraction"]
    assert bool(out.loc["b", "p ≤ alpha at some fraction"]) and out.loc["b", "largest p"] == 0.5
    assert out.token_cells.tolist() == [0, 2]
    assert P.rank_test_model_phrase(out.reset_index(), "m", alpha=0.05) == \
        "m: 1 of the 2 criteria has rank p ≤ 0.05 at every fraction (2 of the 2 reach it at some fraction)"
    none = out.reset_index().assign(**{"p ≤ alpha at every fraction": False, "p ≤ alpha at some fraction": False})
    assert P.rank_test_model_phrase(none, "m", alpha=0.05) == "m: no criterion has rank p ≤ 0.05 at any fraction"


def test_best_time_takes_the_minimum():
    from moeaudit import pruning as P
    calls = []
    assert P.best_time(lambda: calls.append(1), repeats=3) >= 0 and len(calls) == 3
    with pytest.raises(ValueError):
        P.best_time(lambda: None, repeats=0)


def _by_criterion(pmax: dict, token_cells=0):
    return pd.DataFrame([{"model": m, "criterion": c, "p_max": p, "token_cells": token_cells}
                         for m, ps in pmax.items() for c, p in ps.items()])


def test_corrected_rank_claims_by_hand():
    from moeaudit import pruning as P
    bc = _by_criterion({"a": {"x": 1 / 21, "y": 0.5, "z": 0.3}, "b": {"x": 0.9, "y": 0.8, "z": 0.7}})
    bc.loc[(bc.model == "a") & (bc.criterion == "z"), "token_cells"] = 2  # passes the audit: not part of the claim
    c = P.corrected_rank_claims(bc, alpha=0.05, n_draws=20).set_index("model")
    assert c.loc["a", "m"] == 2 and c.loc["a", "level"] == pytest.approx(0.025)
    assert c.loc["a", "p_min"] == pytest.approx(1 / 21) and not c.loc["a", "attainable"]
    assert c.loc["a", "draws_needed"] == 39  # 1 / (39 + 1) = 0.025 = 0.05 / 2
    assert c.loc["a", "corrected"] == [] and c.loc["a", "uncorrected"] == ["x"]
    c = P.corrected_rank_claims(bc, alpha=0.05, n_draws=39).set_index("model")
    assert bool(c.loc["a", "attainable"]) and c.loc["a", "corrected"] == []  # x's p stays 1/21 in this table
    with pytest.raises(ValueError):
        P.corrected_rank_claims(bc, alpha=0.05, n_draws=0)


def test_validity_claim_texts_correct_for_the_criteria_tested():
    from moeaudit import pruning as P
    # one criterion at the smallest attainable p with 20 draws, six failing criteria: not significant after correction
    bc = _by_criterion({"q": {f"c{i}": p for i, p in enumerate([1 / 21, 0.5, 0.6, 0.7, 0.8, 0.9])},
                        "o": {f"c{i}": 0.5 for i in range(6)}})
    t = P.validity_claim_texts(P.corrected_rank_claims(bc, alpha=0.05, n_draws=20), alpha=0.05, n_draws=20,
                               labels={"c0": "mean routing weight"})
    v, s = t["paper_claim_verdict"], t["shows_verdict"]
    assert "Corrected for the 6 criteria per model not shown valid at the token level (Bonferroni, α/m = 0.00833" in v
    assert "fail" not in v
    assert "cannot go below 1/21 = 0.048" in v and "at least 119 draws" in v
    assert "mean routing weight on q (largest p 0.048, the smallest attainable) has rank p ≤ 0.05" in v
    assert "does not survive the correction" in v and "contradicted on" not in v
    assert "not necessary for" not in s and "not decided by these data" in s
    assert "(with 20 draws it could not have)" in s and "not shown to be no better than random" in s
    leaning = P.validity_claim_texts(P.corrected_rank_claims(bc, alpha=0.05, n_draws=20), alpha=0.05, n_draws=20,
                                     beat_all=(17, 54))["shows_verdict"]
    assert "17 of 54 against about 2.6 by chance, leans towards criteria pruning better than random" in leaning
    assert "not a valid test" in leaning and "no p-value is attached" in leaning and "leans towards it," not in leaning
    flat = P.validity_claim_texts(P.corrected_rank_claims(bc, alpha=0.05, n_draws=20), alpha=0.05, n_draws=20,
                                  beat_all=(2, 54))["shows_verdict"]
    assert "2 of 54 against about 2.6 by chance, is no larger than chance gives" in flat
    # with enough draws and a p below the corrected level, the claim is contradicted on that model only
    bc2 = bc.assign(p_max=bc.p_max.where(bc.p_max > 0.05, 0.004))
    t2 = P.validity_claim_texts(P.corrected_rank_claims(bc2, alpha=0.05, n_draws=300), alpha=0.05, n_draws=300)
    assert "the claim is contradicted on q: c0 (q) beats the random draws at every fraction" in t2["paper_claim_verdict"]
    assert t2["shows_verdict"].startswith("So on q token-level validity") and "(corrected" in t2["shows_verdict"]
    # no criterion even uncorrected
    bc3 = bc.assign(p_max=0.5)
    t3 = P.validity_claim_texts(P.corrected_rank_claims(bc3, alpha=0.05, n_draws=300), alpha=0.05, n_draws=300)
    assert "Uncorrected" not in t3["paper_claim_verdict"] and "cannot go below" not in t3["paper_claim_verdict"]
    assert "could not have" not in t3["shows_verdict"]
    # no failing criterion at all
    none = P.validity_claim_texts(P.corrected_rank_claims(bc.assign(token_cells=3), alpha=0.05, n_draws=20),
                                  alpha=0.05, n_draws=20)
    assert "nothing to say" in none["paper_claim_verdict"]


def test_below_unpruned_text_says_when_pruning_improves():
    from moeaudit import pruning as P
    res = pd.DataFrame({"model": ["m", "m", "m", "n"], "criterion": ["a", "random", "random", "a"],
                        "fraction": [0.25, 0.25, 0.25, 0.125], "perplexity": [614.32, 630.0, 619.0, 700.0]})
    text = P.below_unpruned_text(res, {"m": 623.67, "n": 650.0}, labels={"a": "mean routing weight"})
    assert "*lowers* the held-out perplexity below the unpruned model's in 1 of the 2 criterion settings and 1 of the " \
           "2 random draws" in text
    assert "m 2 of 3; n 0 of 1" in text
    assert "m, mean routing weight at 25%: 614.32 against 623.67 unpruned, 1.50% of the unpruned perplexity" in text
    # random draws of m at 25%: 630.0 (+1.01%) and 619.0 (-0.75%): the 1.50% drop is larger than any of them
    assert "the 2 random draws of m change it by -0.75% to +1.01%." in text and "within what" not in text
    assert "nothing is concluded from it" in text
    close = P.below_unpruned_text(res.assign(perplexity=[620.0, 630.0, 610.0, 700.0]), {"m": 623.67, "n": 650.0})
    assert "-2.19% to +1.01%, so a drop of this size is within what removing random experts gives" in close
    worse = P.below_unpruned_text(res.assign(perplexity=res.perplexity + 100), {"m": 623.67, "n": 650.0})
    assert worse.startswith("No pruning plan lowers") and "all 2 criterion settings and 2 random draws" in worse


def test_random_mean_counts_text_gives_per_model_counts_and_names_reversals():
    from moeaudit import pruning as P
    v = pd.DataFrame({"model": ["a"] * 6 + ["b"] * 6, "fraction": [0.25, 0.25, 0.25, 0.5, 0.5, 0.5] * 2,
                      "beats_mean": [1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0], "beats_all": [1, 0, 0, 0, 0, 0] * 2}
                     ).astype({"beats_mean": bool, "beats_all": bool})
    t = P.random_mean_counts_text(v)
    assert "a 4 of 6 (1 beats every draw); b 1 of 6 (1 beats every draw)" in t
    # b is mostly worse overall; a only at 50%
    assert "more often than not on b (5 of 6 worse) and a at 50% (2 of 3 worse)" in t
    calm = P.random_mean_counts_text(v.assign(beats_mean=True), sub=None, beat_all=False, value="loss")
    assert "lower loss than the random mean: a 6 of 6; b 6 of 6" in calm and "worse" not in calm
    with pytest.raises(ValueError):
        P.random_mean_counts_text(v.iloc[:0])


def test_null_strength_text_states_power_and_equivalence():
    from moeaudit import pruning as P
    from moeaudit import stats as S
    t = P.null_strength_text(pd.DataFrame({"n": [100, 98], "alpha_corrected": [0.0025, 0.0025]}))
    assert "with 98–100 positions per cell" in t and f"is {S.min_detectable_dz(100, alpha=0.0025):.2f}" in t
    assert "cannot be shown at any of these cells" in t and "(" not in t  # read inside the verdict's parentheses
    assert f"needs an equivalence bound above {S.min_equivalence_bound(100, alpha=0.0025):.2f}" in t
    big = P.null_strength_text(pd.DataFrame({"n": [5000], "alpha_corrected": [0.0025]}))
    assert "could be shown at 1 of 1 cell at most" in big
    assert P.null_strength_text(pd.DataFrame({"n": [], "alpha_corrected": []})) == ""


def test_bf_null_reading_text_compares_with_the_control():
    from moeaudit import pruning as P
    bf = pd.DataFrame({"model": ["m"] * 3 + ["k"], "ranking": ["routing_weight"] * 4, "layer": [0, 1, 2, 0],
                       "BF10": [0.2, 5.0, 0.5, 0.1]})
    ctl = pd.DataFrame({"model": ["m"] * 3 + ["k"], "layer": [0, 1, 2, 0], "sig_dual_bonf": [False, True, False, False]})
    t = P.bf_null_reading_text(bf, ctl, r=0.707)
    assert "(|d_z| around 0.707)" in t
    assert "\"favours the null\" in 2 of the 3 cells where its dual test is not significant (m: 1 of 2 and k: 1 of 1)" in t
    none = P.bf_null_reading_text(bf.assign(BF10=1.0), ctl, r=0.707)
    assert "favours the null in none of the 3 cells" in none
    ok = P.bf_null_reading_text(bf, ctl.assign(sig_dual_bonf=True), r=0.707)
    assert ok.endswith("barely detect.")
