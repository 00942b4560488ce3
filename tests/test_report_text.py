"""Verdict sentences generated from numbers: every number stated is in the frames, wording follows them."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from moeaudit import audit, report


def _verdicts(dual=(0, 0), cells=(16, 12), unc=(1, 0), maxd=(0.12, 0.2), pos=(0.5, 0.75), unc_pos=None, holm=None,
              bh=None, tost=None):
    v = pd.DataFrame({
        "model": ["m1", "m2"], "cells": list(cells), "alpha_bonferroni": [0.05 / c for c in cells],
        "uncorrected_t": list(unc), "uncorrected_t_positive": list(unc_pos or [min(u, 1) for u in unc]),
        "bonferroni_t": [0, 1], "bonferroni_W": [0, 0], "bonferroni_dual": list(dual),
        "holm_dual": list(holm or dual), "bh_dual": list(bh or dual), "equivalent": [3, 1], "max_abs_dz": list(maxd),
        "share_positive": list(pos), "min_detectable_dz": [0.3, 0.28]})
    if tost is not None:
        v.insert(v.columns.get_loc("equivalent") + 1, "tost_can_pass", list(tost))
    return v


def _paper():
    return pd.DataFrame({"model": ["olmoe", "qwen"], "cells": [20, 20], "alpha_bonferroni": [0.0025, 0.0025],
                         "uncorrected_t": [1, 2], "uncorrected_t_positive": [1, 2], "bonferroni_t": [0, 1],
                         "bonferroni_W": [0, 0],
                         "bonferroni_both": [0, 0], "max_abs_d": [0.141, 0.222], "share_positive": [0.55, 0.85]})


def test_no_passing_cell_is_said_plainly_and_counts_come_from_the_frame():
    text = report.family_verdict_text(_verdicts())
    assert text.startswith("**No cell passes** the paper's rule under Bonferroni")
    assert "each model's Bonferroni level (0.003125 to 0.004167)" in text
    assert "0 of 16 cells" in text and "0 of 12 cells" in text and "0.003125" in text and "0.004167" in text
    # 1 hit among 16 cells at 0.05: 0.8 expected, P(X >= 1) = 1 - 0.95^16 = 0.56
    assert "1 has uncorrected p_t < 0.05, with d_z > 0 (about 0.8 expected by chance; exact binomial " \
           "P(X ≥ 1) = 0.56, not significantly more than chance at the 0.05 level" in text
    assert "0 have uncorrected p_t < 0.05;" in text
    assert "1 passes the t-test alone" in text
    # 0.75 of 12 = 9 positive: two-sided sign test 2 * (220 + 66 + 12 + 1) / 4096 = 0.146
    assert "9 of the 12 cells have d_z > 0 (two-sided sign test p = 0.15)" in text
    assert "3 are demonstrably small (TOST at the Bonferroni level)" in text  # no tost_can_pass column: as counted


def test_passing_cells_are_named_from_the_table():
    v = _verdicts(dual=(1, 0))
    table = pd.DataFrame({"model": ["m1", "m1"], "ranking": ["activation_std", "utilization_rate"], "layer": [3, 1],
                          "cohens_dz": [0.41, 0.02], "sig_dual_bonf": [True, False]})
    text = report.family_verdict_text(v, table, short=True)
    assert text.startswith("**1 cell passes**") and "activation_std at layer 3 (d_z = +0.410)" in text
    assert "utilization_rate" not in text


def test_comparison_with_the_paper_follows_the_numbers():
    agree = report.audit_comparison_text(_verdicts(), _paper(), paper_names={"qwen": "Qwen1.5-MoE-A2.7B"})
    assert "0 of 40 cells pass both tests" in agree and "0 of 28 cells pass the dual rule" in agree
    assert "3 reach uncorrected p_t < 0.05, all with d > 0" in agree and "0.222 (Qwen1.5-MoE-A2.7B)" in agree
    # chance: 40 * 0.05 = 2.0 and 28 * 0.05 = 1.4; P(X >= 3 | 40, 0.05) = 0.32, P(X >= 1 | 28, 0.05) = 1 - 0.95^28 = 0.76
    assert "chance alone would give about 2.0 (P(X ≥ 3) = 0.32, exact binomial)" in agree
    assert "(chance: about 1.4; P(X ≥ 1) = 0.76)" in agree and "neither count is significantly more than chance" in agree
    assert "Nor is any single model's count, in the paper or in this run." in agree
    # hits with d > 0 against half the level: paper 3 of 40 at 0.025 (P = 0.075), this run 1 of 28 (P = 0.51)
    up40 = 1 - sum(math.comb(40, j) * 0.025 ** j * 0.975 ** (40 - j) for j in range(3))
    up28 = 1 - 0.975 ** 28
    assert f"the paper's 3 (chance: about 1.0; P(X ≥ 3) = {up40:.2g}) are not significantly more than chance at the " \
           f"0.05 level, and this run's 1 (chance: about 0.7; P(X ≥ 1) = {up28:.2g}) are not significantly more " \
           "than chance" in agree
    assert "A small tail is therefore no evidence of an excess" in agree  # the cells are not independent
    assert "0.200 (m2)" in agree and "Under Bonferroni (the paper's correction), this run agrees with the paper's " \
                                      "verdict" in agree
    # _paper() has no Holm or Benjamini-Hochberg counts: this run's are stated alone
    assert "Holm passes 0 cells here (the paper's count under it is not available)" in agree
    # m1: 8 of 16 positive, exactly half, while the pooled cells lean positive
    assert "**m1 does not share the pooled (positive) direction**: exactly half of its cells are positive" in agree
    # 0.55*20 + 0.85*20 = 28 of 40 positive: binomtest(28, 40) p = 0.0166; 0.5*16 + 0.75*12 = 17 of 28: p = 0.345
    assert "28 of the paper's 40 cells are positive (two-sided sign test p = 0.017)" in agree
    assert "17 of this run's 28 (p = 0.34)" in agree
    assert "At the 0.05 level the paper's sign test is significant and this run's is not; the two shares (70% and " \
           "61%) were not tested against each other" in agree and "The two differ" not in agree
    # a model leans only when its own sign test says so: m2 9 of 12 (p = 0.15) does not, qwen 17 of 20 (p = 0.0026) does
    assert "By its own sign test at the 0.05 level, no model is shown to lean either way (which does not show an " \
           "even split)." in agree
    assert "Qwen1.5-MoE-A2.7B (p = 0.0026) leans positive; olmoe is not shown to lean either way." in agree
    differ = report.audit_comparison_text(_verdicts(dual=(2, 0)), _paper())
    assert "**Unlike the paper**, under Bonferroni (the paper's correction) 2 cells of this run pass the dual rule " \
           "(m1 2)" in differ and "agrees" not in differ
    table = pd.DataFrame({"model": ["m1", "m1"], "sig_dual_bonf": [True, True], "p_t": [0.003, 0.0001],
                          "p_W": [0.001, 0.002]})
    strict = report.audit_comparison_text(_verdicts(dual=(2, 0)), _paper(), table)
    assert "less strict than the paper's 0.0025, and 1 of 2 passing cells would also pass" in strict
    assert not re.search(r"\bnan\b", agree + differ)


def _token(deltas, g=None):
    k = len(deltas)
    g = g or sorted([0.5 / (i + 1) for i in range(k)], reverse=True)
    return pd.DataFrame({"expert": [10 + i for i in range(k)], "g": g, "ΔL token": deltas})


def test_one_token_text_when_every_removal_lowers_the_loss():
    text = report.one_token_text(_token([-0.02, -0.0084, -0.05]))
    assert "No removal hurts the prediction here: all 3 removals lower the loss" in text
    assert "expert 11 (ΔL = -0.0084 nats)" in text and "hurts the prediction most" not in text
    assert "D = \u22120.0200 − (\u22120.0500) = +0.0300" in text


def test_one_token_text_names_the_worst_removal_and_its_router_rank():
    agree = report.one_token_text(_token([0.3, 0.1, -0.01]))
    assert "Removing that expert is also the removal that hurts the prediction most (ΔL = +0.3000" in agree
    assert "Removing 1 of them *lowers* the loss" in agree
    disagree = report.one_token_text(_token([0.01, 0.2, 0.05]))
    assert "that of expert 11 (ΔL = +0.2000 nats), ranked 2 of 3 by the router" in disagree
    assert "No removal lowers the loss." in disagree
    # g = 0.5, 0.25, 0.1667 against ΔL = 0.01, 0.2, 0.05: ranks (3,2,1) vs (1,3,2) -> rho = -0.5
    assert "rank correlation between weight and loss change is -0.50" in disagree


def test_protocol_departures_follow_the_parameters():
    from moeaudit.corpus import resolve_corpus

    params = {"mode": "token", "n_positions": 50, "seed": 7, "layers": None, "n_texts": 20, "max_tokens": None,
              "dtype": "bfloat16", "text_form": "stripped"}
    t = report.protocol_departures(params=params, corpus_source=resolve_corpus("embedded"),
                                   audited={"m": [1, 3]}, n_moe_layers={"m": 3}, contexts={"m": 128},
                                   n_parameters={"m": 2_500_000}, n_metrics=4).set_index("aspect")["this build"]
    assert list(t.index) == list(report.PROTOCOL_REFERENCE)
    assert "50 positions" in t["positions"] and "seed 7" in t["positions"]
    assert t["layers"] == "m: 2 of 3 MoE layers [1, 3]" and t["family"].startswith("m: 8 cells (2 for the control)")
    assert "2.50 M parameters" in t["models"] and "up to 128 tokens;" in t["context"]
    assert "embedded corpus" in t["corpus"] and "'bfloat16'" in t["precision"] and "token-local" in t["ablation"]
    assert t["corpus"].endswith("lines stripped of surrounding whitespace")
    seq = report.protocol_departures(params={**params, "mode": "sequence"}, corpus_source=resolve_corpus("embedded"),
                                     audited={"m": [1]}, n_moe_layers={"m": 3}, contexts={"m": 64},
                                     n_parameters={"m": None}, n_metrics=4).set_index("aspect")["this build"]
    assert "sequence-wide" in seq["ablation"] and "size not recorded" in seq["models"]
    seq = report.protocol_departures(params={**params, "text_form": "released"}, corpus_source=resolve_corpus("embedded"),
                                     audited={"m": [1]}, n_moe_layers={"m": 3}, contexts={"m": 64},
                                     n_parameters={"m": None}, n_metrics=4).set_index("aspect")["this build"]
    assert "leading space and line break" in seq["corpus"]


def test_audit_limits_follow_the_run():
    both = report.audit_limits_text(default_models=True, paper_corpus=False)
    assert "small stand-ins" in both and "another corpus" in both and "departures" in both
    real = report.audit_limits_text(default_models=False, paper_corpus=True)
    assert "stand-ins" not in real and "another corpus" not in real and "sequence-wide" in real
    same = report.audit_limits_text(default_models=True, paper_corpus=True, family_sizes={"a": 20, "b": 20},
                                    paper_family=20)
    assert "have the paper's size (20 cells per model)" in same
    fewer = report.audit_limits_text(default_models=True, paper_corpus=True, family_sizes={"a": 20, "b": 12},
                                     paper_family=20)
    assert "differ from the paper's 20 cells per model (b 12)" in fewer and "less strict than the paper's." in fewer
    mixed = report.audit_limits_text(default_models=True, paper_corpus=True, family_sizes={"a": 24, "b": 12},
                                     paper_family=20)
    assert "stricter than the paper's for some models and less strict for others" in mixed


def test_words_from_numbers():
    import numpy as np

    assert report.value_span([4, 4, None], "{:,}") == "4" and report.value_span([2048, 64], "{:,}") == "64 to 2,048"
    assert report.value_span([0.101, np.nan, 0.399], "+.2f") == "+0.10 to +0.40"  # bare format spec, NaN ignored
    assert report.value_span([6.81, 6.84], "{:.1f}") == "6.8"  # alike when printed: one value
    assert report.value_span([None]) == "none" and report.value_span([], empty="-") == "-"
    assert report.fmt_signed(-0.0004) == "+0.000" and report.fmt_signed(-0.002) == "-0.002"
    assert report.join_words([1, 2, 3]) == "1, 2 and 3" and report.join_words(["a"]) == "a" and report.join_words([]) == ""
    assert report.plural(1, "cell") == "1 cell" and report.plural(2, "cell") == "2 cells"
    assert report.plural(2, "is", "are") == "2 are"


def test_premise_phrase_counts_from_the_records():
    ok = pd.DataFrame({"removed_routed": [1, 1, 2], "n_removed": [1, 1, 2], "clean_routing_match": [True] * 3,
                       "premise_ok": [True] * 3})
    assert audit.premise_phrase(ok) == ("the premise check holds for all 3 (each removed expert was routed there "
                                         "in the ablating forward)")
    bad = ok.assign(removed_routed=[0, 1, 2], clean_routing_match=[False, False, True],
                    premise_ok=[False, False, True])
    text = audit.premise_phrase(bad)
    assert text.startswith("the premise check fails for 2 of 3 (1 removed an expert")
    assert "2 sit in a batch whose clean row routed differently" in text


def test_strategy_spread_text_reads_every_field():
    s = {"matched": 1920, "max_abs_diff": 0.28, "median_abs_diff": 0.0041, "sign_flips": 0.097,
         "premise_failed_kv": 0, "premise_failed_full": 24}
    text = report.strategy_spread_text({"m": s}, "bfloat16")
    assert text == ("m: at most 0.28 nats apart (median 0.0041) over 1,920 matched ablations, 9.7% of the signs "
                    "flip, and the premise check fails for 0 records of the cached path and 24 of the re-run in "
                    "bfloat16")
    assert "fails for 1 record of the cached path" in report.strategy_spread_text(
        {"m": {**s, "premise_failed_kv": 1}}, "bfloat16")
    same = {**s, "max_abs_diff": 0.0, "median_abs_diff": 0.0, "sign_flips": 0.0, "premise_failed_full": 0}
    assert report.strategy_spread_text({"d": same}, "bfloat16") == (
        "d: identical over 1,920 matched ablations, with 0 premise failures on either path in bfloat16")


def test_finite_or_never_prints_nan():
    assert report.finite_or(0.123, "{:.2f}", "undefined") == "0.12"
    assert report.finite_or(float("nan"), "{:.2f}", "undefined") == "undefined"
    assert report.finite_or(float("inf"), "{:.2f}", "undefined") == "undefined"


def test_ablation_site_follows_the_mode():
    assert report.ablation_site("token").startswith("at token t only")
    assert "every position up to t" in report.ablation_site("sequence")
    with pytest.raises(ValueError):
        report.ablation_site("tokens")


def test_utilisation_variants_text_by_hand():
    from moeaudit.metrics import padding_summary

    st = {"m": {"layers": {0: {"sel_pad": np.array([6.0, 3.0, 1.0, 0.0]), "n_pad": 25, "n_real": 75},
                           1: {"sel_pad": np.zeros(4), "n_pad": 25, "n_real": 75}}}}
    pad = padding_summary(st, {"m": [0, 1]}, top_k={"m": 2})
    assert pad == {"top_share": {("m", 0): 0.9}, "pad_percent": {"m": 25.0}}
    cmp = pd.DataFrame({"variant": ["a", "a"], "rho": [0.5, -0.25], "same high expert": [0.5, 1.0]})
    text = report.utilisation_variants_text(cmp, rho_col="rho", n_variants=3, padding=pad, balanced={"m": 0.5})
    assert text.startswith("**a**: ρ from -0.25 to +0.50, same high expert at 50%–100% of tokens.")
    assert "sends 90%–90% of its selections" in text and "50.0% (m)" in text and "25% padding (m)" in text
    assert "Only 1 of the 3 variants appear" in text
    none = report.utilisation_variants_text(cmp, rho_col="rho", n_variants=1,
                                            padding={"top_share": {}, "pad_percent": {"m": 0.0}}, balanced={"m": 0.5})
    assert "padding positions the router" not in none and "Only" not in none and "0% padding (m)" in none


def test_loss_regime_and_its_sentence_by_hand():
    from moeaudit.corpus import loss_regime

    # targets 1,1,2,3: in-sample unigram -(2 ln 1/2 + 2 ln 1/4)/4 = 1.0397 nats; the last token (-1) is not scored
    r = loss_regime([1, 1, 2, 3, -1], [0.2, 0.2, 0.3, 0.3, float("nan")], 100)
    assert r["mean_loss"] == pytest.approx(0.25) and r["unigram_loss"] == pytest.approx(1.5 * np.log(2))
    assert r["gain"] == pytest.approx(r["unigram_loss"] - 0.25) and r["n_tokens"] == 4
    assert r["uniform_loss"] == pytest.approx(np.log(100)) and r["above_chance"] and not r["near_unigram"]
    text = report.regime_text(r)
    assert "0.25 nats per token, against 1.04 for a unigram model" in text and "4.61 for a uniform guess" in text
    assert "takes 0.79 nats per token from context" in text and "**" not in text
    # the printed gain is the difference of the printed losses (6.14 - 4.44), not the rounded true gain (1.69)
    printed = report.regime_text({"mean_loss": 4.444, "unigram_loss": 6.136, "uniform_loss": 8.3, "gain": 1.692,
                                  "above_chance": True, "near_unigram": False})
    assert "4.44 nats per token, against 6.14" in printed and "takes 1.70 nats per token" in printed
    near = report.regime_text(loss_regime([1, 1, 2, 3] * 60, [1.0] * 240, 100))  # gain 0.04 < 0.5, 240 tokens
    assert "**This model barely reads this text**" in near and "chance" not in near
    noise = report.regime_text(loss_regime([1, 2] * 100, [4.5] * 200, 100))  # within 0.5 nats of ln 100
    assert "**This model predicts the text no better than chance**" in noise and "barely" not in noise
    with pytest.raises(ValueError, match="scored token"):
        loss_regime([-1], [float("nan")], 100)
    with pytest.raises(ValueError, match="vocab_size"):
        loss_regime([1], [1.0], 1)
    with pytest.raises(ValueError, match="differ in length"):
        loss_regime([1, 2], [1.0], 10)


def _paper_all_corrections(holm=(0, 0), bh=(0, 0), both=(0, 0)):
    return _paper().assign(holm_both=list(holm), bh_both=list(bh), bonferroni_both=list(both))


def test_the_verdict_names_its_correction_and_where_another_disagrees():
    only_bh = _verdicts(bh=(3, 0))
    head = report.family_verdict_text(only_bh, short=True)
    assert head.startswith("**No cell passes** the paper's rule under Bonferroni")
    assert "Holm gives the same count; under Benjamini–Hochberg (which bounds the false-discovery rate, not the " \
           "family-wise error) 3 cells pass (m1 3)." in head
    assert "\"No cell passes\" holds under Bonferroni and Holm only." in head
    same = report.family_verdict_text(_verdicts(), short=True)
    assert "Holm and Benjamini–Hochberg give the same count." in same and "holds under" not in same
    # one cell passes Bonferroni, Holm passes it too, BH two more: counts stated, no "no cell passes" clause
    more = report.family_verdict_text(_verdicts(dual=(1, 0), bh=(2, 1)), short=True)
    assert more.startswith("**1 cell passes**") and "Holm gives the same count" in more
    assert "3 cells pass (m1 2, m2 1)" in more and "holds under" not in more

    cmp = report.audit_comparison_text(only_bh, _paper_all_corrections())
    assert "**Under Bonferroni (the paper's correction), this run agrees with the paper's verdict**" in cmp
    assert "Whether any cell passes is the same under Holm (0 here, 0 in the paper)." in cmp
    assert "**Under Benjamini–Hochberg (which bounds the false-discovery rate, not the family-wise error) it is " \
           "not**: it passes 3 cells here (m1 3) and 0 in the paper, so the agreement holds under Bonferroni and " \
           "Holm only." in cmp
    everywhere = report.audit_comparison_text(_verdicts(), _paper_all_corrections())
    assert "Whether any cell passes is the same under Holm (0 here, 0 in the paper) and Benjamini–Hochberg (0 here, " \
           "0 in the paper)." in everywhere and "it is not" not in everywhere
    lost = report.audit_comparison_text(_verdicts(), _paper_all_corrections(both=(1, 0), holm=(1, 0), bh=(1, 0)))
    assert "**Unlike the paper**, under Bonferroni (the paper's correction) no cell of this run passes the dual " \
           "rule, where the paper has 1 passing cell." in lost
    assert "Nor is it under Holm and Benjamini–Hochberg (which bounds" in lost
    both = report.audit_comparison_text(_verdicts(dual=(1, 1)), _paper_all_corrections(both=(0, 2), holm=(0, 2),
                                                                                          bh=(0, 2)))
    assert "both have passing cells: 2 in the paper and 2 here (m1 1, m2 1)" in both


def test_an_excess_of_uncorrected_hits_is_tested_against_chance():
    v = _verdicts(cells=(20, 20), unc=(5, 5), unc_pos=(5, 2), pos=(0.7, 0.5))
    text = report.family_verdict_text(v)
    # P(X >= 5 | 20, 0.05) = 1 - sum_{j<5} C(20,j) 0.05^j 0.95^(20-j) = 0.0026
    tail = 1 - sum(math.comb(20, j) * 0.05 ** j * 0.95 ** (20 - j) for j in range(5))
    assert f"5 have uncorrected p_t < 0.05, all with d_z > 0 (about 1.0 expected by chance; exact binomial " \
           f"P(X ≥ 5) = {tail:.2g}, below the 0.05 level only if the cells were independent; they share positions " \
           "and records, so this is no evidence of an excess)" in text
    assert "5 have uncorrected p_t < 0.05, 2 with d_z > 0 and 3 with d_z < 0" in text
    cmp = report.audit_comparison_text(v, _paper_all_corrections())
    # 10 of 40 at 0.05 against the paper's 3 of 40
    tail40 = 1 - sum(math.comb(40, j) * 0.05 ** j * 0.95 ** (40 - j) for j in range(10))
    assert f"(chance: about 2.0; P(X ≥ 10) = {tail40:.2g})" in cmp
    assert "unlike the paper's 3, this run's 10 uncorrected hits would be more than chance alone gives if the cells " \
           "were independent" in cmp
    # per model: 5 of 20 at 0.05 each would be more than chance for independent cells (P = 0.0026)
    assert f"the count would be more than chance, for independent cells, for m1 (5 of 20, P(X ≥ 5) = {tail:.2g}) and m2 (5 of 20, P(X ≥ 5) = " \
           f"{tail:.2g}) in this run and for no model of the paper" in cmp
    # of the 10 hits 7 have d_z > 0: P(X >= 7 | 40, 0.025)
    up = 1 - sum(math.comb(40, j) * 0.025 ** j * 0.975 ** (40 - j) for j in range(7))
    assert f"this run's 7 (chance: about 1.0; P(X ≥ 7) = {up:.2g}) would be more than chance" in cmp
    assert "some cells carry effects too small to single out at the corrected level" in cmp
    passing = report.audit_comparison_text(v.assign(bonferroni_dual=[1, 0]), _paper_all_corrections())
    assert "too small to single out" not in passing  # a cell passes: the sentence on an excess without a pass is left out


def test_a_model_against_the_pooled_direction_is_named():
    # m1: 6 of 20 positive and all 3 of its uncorrected hits negative; m2: 18 of 20 positive; pooled 24 of 40
    v = _verdicts(cells=(20, 20), unc=(3, 2), unc_pos=(0, 2), pos=(0.3, 0.9))
    cmp = report.audit_comparison_text(v, _paper_all_corrections())
    assert "24 of this run's 40 (p = 0.27)" in cmp  # binomtest(24, 40): 2 * P(X >= 24) = 0.268
    assert "m1 6 of 20 (p = 0.12), 3 uncorrected hits all with d_z < 0; m2 18 of 20 (p = 0.0004), 2 uncorrected " \
           "hits all with d_z > 0" in cmp
    assert "**m1 goes against the pooled (positive) direction**: fewer than half of its cells are positive (6 of 20) " \
           "and all 3 of its uncorrected hits have d_z < 0, which the pooled sign test hides." in cmp
    assert "m2 goes against" not in cmp and "m2 (p = 0.0004) leans positive; m1 is not shown to lean either way" in cmp
    aligned = report.audit_comparison_text(_verdicts(cells=(20, 20), pos=(0.7, 0.9)), _paper_all_corrections())
    # 14 of 20 (p = 0.12) is no lean; 18 of 20 is
    assert "m2 (p = 0.0004) leans positive; m1 is not shown to lean either way." in aligned
    assert "goes against" not in aligned and "Every model" not in aligned
    both = report.audit_comparison_text(_verdicts(cells=(20, 20), pos=(0.95, 0.9)), _paper_all_corrections())
    assert "m1 (p = 4e-05) and m2 (p = 0.0004) lean positive." in both and "not shown to lean" not in \
        both.split("in the paper:")[0]
    # one hit against the lean: the singular is worded as such
    one = report.audit_comparison_text(_verdicts(cells=(20, 20), unc=(1, 0), unc_pos=(0, 0), pos=(0.7, 0.9)),
                                       _paper_all_corrections())
    assert "**m1 goes against the pooled (positive) direction**: its one uncorrected hit has d_z < 0" in one


def _design_table(n=200, bound=0.2, power=0.8, models=("m1", "m2")):
    return pd.DataFrame({"model": list(models), "ranking": "activation_norm", "layer": 1, "n": n,
                         "tost_bound_d": bound, "power": power, "reason": ""})


def test_design_sensitivity_says_when_effects_can_be_neither_detected_nor_excluded():
    from scipy import stats as sps

    v = _verdicts(cells=(20, 20), maxd=(0.231, 0.184), tost=(False, False)).assign(min_detectable_dz=0.276)
    text = report.design_sensitivity_text(v, _design_table())
    min_p = sps.t.sf(0.2 * math.sqrt(200), 199)  # the smallest TOST p-value at n = 200, bound 0.2
    needed = sps.t.ppf(1 - 0.0025, 199) / math.sqrt(200)
    assert "At n = 200 positions per cell and the Bonferroni level 0.0025, the paired t-test detects an effect of " \
           "|d_z| = 0.276 with 80% power, more than the largest observed |d_z| of m1 (0.231) and m2 (0.184)." in text
    assert f"TOST at |d_z| < 0.2 cannot pass at that level for any data (its smallest attainable p is {min_p:.3g}, " \
           f"not below 0.0025; only a bound above {needed:.3f} could be shown)" in text
    assert "For m1 and m2 the design can **neither detect** (with the stated power) **nor exclude** (by TOST)" in text
    short = report.design_sensitivity_text(v, _design_table(), short=True)
    assert short.startswith("For m1 and m2 the design can **neither detect**") and "At n =" not in short
    # the per-model verdicts point to it instead of counting "0 equivalent" as a finding
    full = report.family_verdict_text(v, _design_table())
    assert "none can be shown small, since TOST cannot pass at the Bonferroni level for any data" in full
    assert "demonstrably small" not in full and full.endswith(text)


def test_design_sensitivity_other_cases():
    # m1: the largest effect reaches the detectable one; m2 does not; TOST can pass in both
    v = _verdicts(cells=(5, 5), maxd=(0.3, 0.1), tost=(True, True)).assign(min_detectable_dz=0.25, equivalent=[0, 2])
    text = report.design_sensitivity_text(v, _design_table())
    assert "more than the largest observed |d_z| of m2 (0.100); no more than the largest observed |d_z| of m1 " \
           "(0.300)" in text
    assert "TOST at |d_z| < 0.2 can pass at that level; 2 cells do." in text
    assert "For m2 effects of the observed size are below what the design detects" in text
    assert "For m1 effects as large as the largest observed would be detected with the stated power, and TOST can " \
           "show an effect small." in text
    full = report.family_verdict_text(v, _design_table())
    assert "2 are demonstrably small (TOST at the Bonferroni level, which can pass here)" in full
    # detectable but not excludable
    w = _verdicts(cells=(20, 20), maxd=(0.3, 0.4), tost=(False, False)).assign(min_detectable_dz=0.276)
    assert "For m1 and m2 effects as large as the largest observed would be detected with the stated power, but " \
           "TOST cannot show any effect small." in report.design_sensitivity_text(w, _design_table())
    # without a table: no n, power or bound to name, the comparison still stands
    bare = report.design_sensitivity_text(w)
    assert bare.startswith("At the Bonferroni level 0.0025, the paired t-test detects an effect of |d_z| = 0.276,")
    assert "TOST at the equivalence bound cannot pass" in bare and "nan" not in bare
    assert report.design_sensitivity_text(w.assign(max_abs_dz=np.nan)) == ""


def test_depth_marks_caption_names_the_test_level_and_cells():
    table = pd.DataFrame({"model": ["m", "m", "m"], "ranking": ["activation_norm", "utilization_rate", "activation_std"],
                          "layer": [3, 5, 7], "cohens_dz": [0.3, -0.05, 0.41], "alpha_corrected": 0.0025,
                          "sig_t_bonf": [True, False, True], "sig_dual_bonf": [False, False, True]})
    text = report.depth_marks_caption(table)
    assert text.startswith("A `*` above a point marks a cell whose two-sided paired t-test is significant at its "
                           "family's Bonferroni level (0.0025 per cell), corrected; the Wilcoxon test is not required")
    assert "2 cells carry a `*`: m, activation norm at layer 3 (d_z = +0.300); m, activation std at layer 7 " \
           "(d_z = +0.410); 1 of them also pass the dual rule." in text
    assert report.depth_marked(table).tolist() == [True, False, True]
    one = report.depth_marks_caption(table.iloc[:2])
    assert "1 cell carries a `*`: m, activation norm at layer 3 (d_z = +0.300); it does not pass the dual rule." in one
    none = report.depth_marks_caption(table.assign(sig_t_bonf=False, sig_dual_bonf=False))
    assert none.endswith("No cell carries a `*`.")


def test_traceability_caption_gives_each_column_its_unit():
    text = report.traceability_caption("m", "activation_norm", 4)
    assert text.startswith("The first pairs of one cell (m, activation norm, layer 4)")
    assert "`value_high`, `value_low`: a mean L2 norm of the expert's output vector, in the units of the hidden " \
           "state; not nats" in text
    assert "`diff` = D, in nats" in text
    assert "without unit" in report.traceability_caption("m", "utilization_rate", 0)
    with pytest.raises(KeyError):
        report.traceability_caption("m", "no_such_metric", 0)


def test_every_page_states_the_regime_of_the_shipped_model(tmp_path, monkeypatch):
    """On the embedded corpus in the models' form the page states a real gain; on its plain orthography
    (the form the models were not trained on) it warns that the model barely reads the text."""
    from moeaudit import audit

    monkeypatch.delenv("MOEAUDIT_DATA_DIR", raising=False)
    lines = {}
    for form in ("wikitext", "released"):
        ctx = audit.prepare("tiny-olmoe", corpus="embedded", text_form=form, results_dir=tmp_path, progress=False)
        r = audit.context_regime(ctx)
        assert r == {k: v for k, v in audit.corpus_regime(ctx).items() if k in r}
        lines[form] = audit.regime_line("tiny-olmoe", ctx)
        assert lines[form].startswith("**tiny-olmoe**: Mean loss on this text "
                                      f"{r['mean_loss']:.2f} nats per token, against {r['unigram_loss']:.2f}")
    assert "barely reads" not in lines["wikitext"] and "**This model barely reads this text**" in lines["released"]


def test_regime_over_few_tokens_says_the_gain_is_understated():
    from moeaudit.corpus import loss_regime

    few = loss_regime([1, 1, 2, 3], [1.0, 1.0, 1.0, 1.0], 100)  # 4 tokens against 100 types: small sample
    assert few["small_sample"] and few["near_unigram"]
    text = report.regime_text(few)
    assert "Over only 4 scored tokens, against a vocabulary of 100" in text and "understates" in text
    assert "barely reads" not in text  # no near-unigram verdict from a biased baseline
    many = loss_regime(np.arange(300) % 3, np.ones(300), 100)
    assert not many["small_sample"] and "Over only" not in report.regime_text(many)


def test_hits_that_sit_in_one_layer_are_located():
    v = _verdicts(cells=(20, 20), unc=(3, 2), unc_pos=(2, 2))
    table = pd.DataFrame({"model": ["m1"] * 4 + ["m2"] * 3,
                          "ranking": ["activation_norm", "activation_std", "utilization_rate", "activation_norm",
                                      "activation_norm", "activation_std", "utilization_rate"],
                          "layer": [0, 0, 0, 4, 1, 5, 5], "p_t": [0.0016, 0.01, 0.04, 0.6, 0.03, 0.02, 0.7],
                          "cohens_dz": [0.23, 0.2, -0.15, 0.01, 0.16, 0.17, 0.0],
                          "sig_t_bonf": [True, False, False, False, False, False, False],
                          "sig_dual_bonf": [False] * 7})
    text = report.family_verdict_text(v, table)
    m1, m2 = text.split("\n\n")[1:3]
    assert "All 3 of its uncorrected hits sit at layer 0. Its t-test pass at the Bonferroni level: activation norm " \
           "at layer 0 (p_t = 0.0016)." in m1
    assert "sit at layer" not in m2 and "t-test pass at" not in m2  # one hit per layer: no majority, no pass
    moved = table.assign(layer=[0, 0, 3, 4, 1, 5, 5])
    assert "2 of its 3 uncorrected hits sit at layer 0." in report.family_verdict_text(v, moved)
    assert "sit at layer" not in report.family_verdict_text(v)  # without the table nothing is located
    two = table.assign(p_t=[0.0016, 0.01, 0.4, 0.6, 0.03, 0.02, 0.7])
    assert "Both of its uncorrected hits sit at layer 0." in report.family_verdict_text(v, two)


def test_chapter_command_keeps_the_run_and_changes_what_is_asked():
    cmd = report.chapter_command("04_audit", {"n_positions": 12},
                                 current={"models": ["tiny-olmoe"], "n_positions": 50, "mode": "sequence", "seed": 0},
                                 defaults={"models": ["a", "b"], "n_positions": 200, "mode": "token", "seed": 0})
    assert cmd == 'make chapter NB=04_audit PARAMS="-p models \'[\\"tiny-olmoe\\"]\' -p mode sequence -p n_positions 12"'
    assert report.chapter_command("04_audit", {"mode": "token"}, current={"mode": "token"},
                                  defaults={"mode": "token"}) == 'make chapter NB=04_audit PARAMS="-p mode token"'


def test_audit_limits_follow_the_ablation_mode():
    token = report.audit_limits_text(default_models=False, paper_corpus=True)
    seq = report.audit_limits_text(default_models=False, paper_corpus=True, mode="sequence")
    assert "token-local ablation (the released code's is sequence-wide" in token
    assert "its ablation here is the released code's sequence-wide one" in seq and "token-local ablation (" not in seq
    with pytest.raises(ValueError, match="mode"):
        report.audit_limits_text(default_models=False, paper_corpus=True, mode="tokens")
