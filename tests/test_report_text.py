"""Verdict sentences generated from numbers: every number stated is in the frames, wording follows them."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from moeaudit import report


def _verdicts(dual=(0, 0), cells=(16, 12), unc=(1, 0), maxd=(0.12, 0.2), pos=(0.5, 0.75)):
    return pd.DataFrame({
        "model": ["m1", "m2"], "cells": list(cells), "alpha_bonferroni": [0.05 / c for c in cells],
        "uncorrected_t": list(unc), "uncorrected_t_positive": [min(u, 1) for u in unc], "bonferroni_t": [0, 1], "bonferroni_W": [0, 0], "bonferroni_dual": list(dual),
        "holm_dual": list(dual), "bh_dual": list(dual), "equivalent": [3, 1], "max_abs_dz": list(maxd),
        "share_positive": list(pos), "min_detectable_dz": [0.3, 0.28]})


def _paper():
    return pd.DataFrame({"model": ["olmoe", "qwen"], "cells": [20, 20], "alpha_bonferroni": [0.0025, 0.0025],
                         "uncorrected_t": [1, 2], "uncorrected_t_positive": [1, 2], "bonferroni_t": [0, 1],
                         "bonferroni_W": [0, 0],
                         "bonferroni_both": [0, 0], "max_abs_d": [0.141, 0.222], "share_positive": [0.55, 0.85]})


def test_no_passing_cell_is_said_plainly_and_counts_come_from_the_frame():
    text = report.family_verdict_text(_verdicts())
    assert text.startswith("**No cell passes**")
    assert "0 of 16 cells" in text and "0 of 12 cells" in text and "0.003125" in text and "0.004167" in text
    assert "1 has uncorrected p_t < 0.05 (all with d_z > 0)" in text and "0 have uncorrected" in text
    assert "1 passes the t-test alone" in text
    assert "75% of the cells have d_z > 0" in text


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
    assert "chance alone would give about 2.0" in agree and "(chance: about 1.4)" in agree
    assert "0.200 (m2)" in agree and "agrees with the paper's verdict" in agree
    # 0.55*20 + 0.85*20 = 28 of 40 positive: binomtest(28, 40) p = 0.0166; 0.5*16 + 0.75*12 = 17 of 28: p = 0.345
    assert "28 of the paper's 40 cells are positive (two-sided sign test p = 0.017)" in agree
    assert "17 of this run's 28 (p = 0.34)" in agree and "differs in whether the effects lean positive" in agree
    differ = report.audit_comparison_text(_verdicts(dual=(2, 0)), _paper())
    assert "Unlike the paper" in differ and "2 cells" in differ and "agree" not in differ
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
    assert "D = -0.0200 − (-0.0500) = +0.0300" in text


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
    assert report.premise_phrase(ok) == ("the premise check holds for all 3 (each removed expert was routed there "
                                         "in the ablating forward)")
    bad = ok.assign(removed_routed=[0, 1, 2], clean_routing_match=[False, False, True],
                    premise_ok=[False, False, True])
    text = report.premise_phrase(bad)
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


def test_chance_check_by_hand():
    out = report.chance_check([1.0, 2.0, float("nan")], 100)
    assert out["mean_loss"] == 1.5 and out["uniform_loss"] == pytest.approx(np.log(100)) and out["above_chance"]
    assert not report.chance_check([np.log(100) - 0.4], 100)["above_chance"]  # within 0.5 nats of a uniform guess
    with pytest.raises(ValueError):
        report.chance_check([float("nan")], 100)
    with pytest.raises(ValueError):
        report.chance_check([1.0], 1)
