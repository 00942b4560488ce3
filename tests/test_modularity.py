"""Tests for moeaudit.chapters.modularity: the embedded table against the originals, bad files, and the
analyses on hand-made inputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moeaudit.chapters import modularity as M


def _originals() -> Path:
    """The originals' folder in $MOEAUDIT_DATA_DIR; the test is skipped without it."""
    root = os.environ.get("MOEAUDIT_DATA_DIR")
    if root and (Path(root) / M.FOLDER).is_dir():
        return Path(root) / M.FOLDER
    pytest.skip(f"the original files of the modularity study are not present ($MOEAUDIT_DATA_DIR/{M.FOLDER})")


# --------------------------------------------------------------------------- data access


def test_embedded_table_equals_a_rebuild_from_the_originals():
    root = _originals()
    built = M.derived_tables(root)
    for name, table in built.items():
        embedded = M._embedded(name)
        pd.testing.assert_frame_equal(embedded.reset_index(drop=True), table.reset_index(drop=True),
                                      check_dtype=True, obj=name)


def test_provenance_names_the_commit_and_every_source_file():
    prov = M.embedded_provenance()
    assert prov["source_repository"] == M.SOURCE_REPO and prov["source_commit"] == M.SOURCE_COMMIT
    assert sorted(prov["source_files"]) == sorted(M.SOURCE_FILES)
    assert all(len(sha) == 64 for sha in prov["source_files"].values())


def test_without_a_data_directory_the_embedded_table_is_read(monkeypatch):
    monkeypatch.delenv("MOEAUDIT_DATA_DIR", raising=False)
    src = M.source()
    assert src.kind == "embedded" and "no data directory" in M.source_sentence(src)
    assert len(M.atlas_mass()) == 11 * 32 * 128 and set(M.verdicts().precision) == {"W4A4", "BF16"}


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / M.FOLDER
    for rel in M.SOURCE_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_originals() / rel, dst / rel)
    return dst


def test_a_changed_file_is_refused_naming_it(tmp_path):
    dst = _copy(tmp_path)
    path = dst / "results/bf16_verdict.json"
    path.write_text(path.read_text().replace("1.8104", "1.9104"))
    with pytest.raises(M.ModularityDataError, match="bf16_verdict.json differs"):
        M.source(tmp_path)
    with pytest.raises(M.ModularityDataError, match="bf16_verdict.json differs"):
        M.pack(dst, out=tmp_path / "out.parquet")


def test_pack_on_a_folder_missing_a_file_names_it(tmp_path):
    dst = _copy(tmp_path)
    (dst / "atlas/prereg_map.json").unlink()
    with pytest.raises(M.ModularityDataError, match="prereg_map.json is missing"):
        M.pack(dst, out=tmp_path / "out.parquet")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        M.pack(tmp_path / "nowhere", out=tmp_path / "out.parquet")


def test_statements_are_figures_read_from_the_files():
    st = M.study_statements()
    assert st["point_count"] == 3 and st["ci_count"] == 1 and st["n_families"] == 6
    assert st["es_point_margin"] == pytest.approx(0.002) and st["code_point_margin"] == pytest.approx(-0.009)


# --------------------------------------------------------------------------- analyses on hand-made inputs


def _mass():
    # 2 categories x 1 layer x 4 experts; category a: 1, 1, 2, 0 (share .25 .25 .5 0); b: 1, 1, 0, 2
    return np.array([[[1.0, 1.0, 2.0, 0.0]], [[1.0, 1.0, 0.0, 2.0]]])


def test_lift_by_hand():
    lift = M.expert_lift(_mass())
    # mean shares .25 .25 .25 .25 -> lift = share / .25
    np.testing.assert_allclose(lift, [[1, 1, 2, 0], [1, 1, 0, 2]])
    with pytest.raises(ValueError):
        M.expert_lift(-_mass())
    with pytest.raises(ValueError):
        M.expert_lift(np.zeros((2, 1, 4)))


def test_top_k_families_exclude_the_core_and_break_ties_by_index():
    lift = M.expert_lift(_mass())
    assert M.top_k_families(lift, ["a", "b"], k=2) == {"a": [0, 2], "b": [0, 3]}
    assert M.top_k_families(lift, ["a", "b"], k=2, exclude=[0]) == {"a": [1, 2], "b": [1, 3]}
    with pytest.raises(ValueError, match="k must be"):
        M.top_k_families(lift, ["a", "b"], k=4, exclude=[0])


def test_family_agreement_and_passed_over_experts():
    lift = M.expert_lift(_mass())
    ag = M.family_agreement({"a": [1, 2]}, {"a": [0, 2]}, lift, ["a", "b"])
    row = ag.iloc[0]
    assert row.n_agree == 1 and row.frozen_only == [(1, 3)] and row.derived_only == [(0, 2)]
    assert M.passed_over_experts(ag) == [0]


def _verdict(**kw):
    base = {"precision": "W4A4", "family": "x", "domain": "lang", "on_target": 1.29, "ci_low": 1.23, "ci_high": 1.36,
            "null_2sigma": 0.58, "worst_off": 0.43, "worst_off_axis": "ar", "stated_point": 1.0, "stated_ci": 0.0,
            "n_items": 120, "decimals": 2}
    base.update(kw)
    return pd.DataFrame([base])


def test_decision_rules_by_hand():
    # 1.29/3 = 0.43: margin 0, within +-(0.005/3 + 0.005) = +-0.00667 -> the sign is not published
    t = M.decision_table(_verdict()).iloc[0]
    assert t.point == 1 and not t.point_resolved
    assert t.sel_low == pytest.approx(-0.02 / 3) and t.sel_high == pytest.approx(0.02 / 3)
    assert t.ci_status == "fails"  # 0.43 > 1.23 / 3 = 0.41
    # 0.49/3 - 0.17 = -0.00667, upper end (0.495/3 - 0.165) = 0: fails for every value that rounds so
    t = M.decision_table(_verdict(on_target=0.49, ci_low=0.39, worst_off=0.17, null_2sigma=0.08)).iloc[0]
    assert t.point == 0 and t.point_resolved
    # 1.80 vs 0.43 passes clearly; the CI rule needs the off-target's upper bound <= 1.73 / 3
    t = M.decision_table(_verdict(on_target=1.80, ci_low=1.73, worst_off=0.43, null_2sigma=0.64)).iloc[0]
    assert t.point == 1 and t.point_resolved and t.ci_status == "undetermined"
    assert t.ci_bar == pytest.approx(1.73 / 3)
    # below its null: fails both rules, whatever the off-target value (here missing)
    t = M.decision_table(_verdict(on_target=0.10, ci_low=0.05, worst_off=np.nan, null_2sigma=0.19)).iloc[0]
    assert t.point == 0 and t.point_resolved and t.ci_status == "fails"
    # four decimals: the same margin is resolved
    t = M.decision_table(_verdict(on_target=1.298, worst_off=0.4481, decimals=4)).iloc[0]
    assert t.point == 0 and t.point_resolved


def test_rule_counts():
    v = pd.concat([_verdict(family="a"), _verdict(family="b", on_target=1.80, ci_low=1.73, null_2sigma=0.64)])
    c = M.rule_counts(M.decision_table(v)).iloc[0]
    assert (c.point_count, c.point_unresolved, c.point_stated, c.ci_fails, c.ci_undetermined) == (2, 1, 2, 1, 1)


def test_family_observational_by_hand():
    # 2 categories x 2 layers x 4 experts
    mass = np.array([[[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
                     [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 3.0]]])
    obs = M.family_observational(mass, ["a", "b"], {"a": [0, 1], "b": [1, 3]}).set_index("family")
    # category a: total 8; experts 0 and 1 carry 4 + 2 = 6 -> 0.75; Jaccard {0,1} vs {1,3} = 1/3
    assert obs.loc["a", "concentration"] == pytest.approx(0.75)
    assert obs.loc["a", "max_overlap"] == pytest.approx(1 / 3) and obs.loc["a", "overlap_with"] == "b"
    # family a's layer shares: layer 0 a 1.0, b 0.5 (lift 1/0.75); layer 1 a 0.5, b 0 (lift 2): excess 1/3 and 1
    assert obs.loc["a", "depth_centroid"] == pytest.approx(1.0 / (1 / 3 + 1.0))
    prof = M.family_depth_profile(mass, ["a", "b"], {"a": [0, 1]})
    np.testing.assert_allclose(prof.layer_lift, [4 / 3, 2.0])


def test_rung_correlations_use_every_ordering():
    obs = pd.DataFrame({"family": list("abcdef"), "mean_lift": [1, 2, 3, 4, 5, 6.0], "concentration": [1, 2, 3, 4, 6, 5.0],
                        "max_overlap": [6, 5, 4, 3, 2, 1.0], "depth_centroid": [1, 3, 2, 4, 5, 6.0]})
    causal = pd.DataFrame({"precision": "P", "family": list("abcdef"), "on_target": [1, 2, 3, 4, 5, 6.0],
                           "excess": [1, 2, 3, 4, 5, 6.0], "off_ratio": [np.nan, 2, 3, 4, 5, 6.0]})
    c = M.rung_correlations(obs, causal).set_index(["observational", "causal"])
    r = c.loc[("mean_lift", "on_target")]
    assert r.rho == pytest.approx(1.0) and r.p_exact == pytest.approx(2 / 720) and r.n_permutations == 720
    assert c.loc[("mean_lift", "off_ratio")].n == 5 and c.loc[("mean_lift", "off_ratio")].n_permutations == 120
    assert c.loc[("max_overlap", "on_target")].rho == pytest.approx(-1.0)
    assert r.p_holm == pytest.approx(min(1.0, 12 * 2 / 720))  # the smallest of 12 p-values, times 12
    with pytest.raises(ValueError, match="alpha"):
        M.rung_correlations(obs, causal, alpha=0)


def test_shipped_model_family_helpers_by_hand():
    assert M.embedded_topic([0, 1, 5, 7]).tolist() == [0, 1, 1, 3]
    with pytest.raises(ValueError):
        M.embedded_topic([-1])
    atlas = M.topic_atlas([0, 1], [[0, 1], [1, 2]], [[0.5, 0.5], [0.25, 0.75]], [0, 1], layer=3, num_experts=3)
    wide = atlas.set_index(["category", "expert"]).mass
    assert wide[("history", 0)] == 0.5 and wide[("science", 2)] == 0.75 and wide[("arts", 1)] == 0.0
    pos = pd.DataFrame({"seq_id": [0, 1], "t": [4, 5], "topic": ["history", "science"]})
    req = M.family_requests(pos, {"history": [0, 1], "science": [2, 3]}, layer=3, num_experts=8, n_null=2, seed=0)
    assert len(req) == 2 * 4 and set(req.expert_set) == {"history", "science", "null-0", "null-1"}
    assert all(len(r) == 2 for r in req.removed)
    with pytest.raises(ValueError, match="one size"):
        M.family_requests(pos, {"a": [0], "b": [1, 2]}, layer=3, num_experts=8, n_null=1, seed=0)
    rec = pd.DataFrame({"operator": "remove", "expert_set": ["history", "history", "null-0", "null-1", "science", "science"],
                        "topic": ["history", "science", "history", "history", "history", "science"],
                        "delta_loss": [0.9, 0.2, 0.1, 0.3, 0.05, 0.5]})
    eff = M.family_effects(rec).set_index("family")
    # null band over the draws' means on history: mean 0.2 + 2 sd (0.1414) = 0.4828; 0.2 <= 0.9/3
    assert eff.loc["history", "null_2sigma"] == pytest.approx(0.2 + 2 * np.std([0.1, 0.3], ddof=1))
    assert bool(eff.loc["history", "modular"]) and eff.loc["history", "worst_off_topic"] == "science"


# --------------------------------------------------------------------------- page tables and sentences


def _prereg():
    rows = [{"family": f, "expert": e, "role": "family", "frozen_mean_lift": lift, "family_k": 2}
            for f, members, lift in (("a", [1, 2], 1.5), ("b", [2, 3], 1.25)) for e in members]
    rows.append({"family": "shared_core", "expert": 0, "role": "shared_core", "frozen_mean_lift": np.nan, "family_k": 2})
    return pd.DataFrame(rows)


def test_frozen_map_and_lift_reproduced():
    core, fams, k = M.frozen_map(_prereg())
    assert core == [0] and fams == {"a": [1, 2], "b": [2, 3]} and k == 2
    ag = pd.DataFrame({"family": ["a", "b"], "lift_frozen": [1.5004, 1.2496]})
    # 1.5004 rounds to 1.500 (match); 1.2496 rounds to 1.250 (match); 1.2494 would round to 1.249 (no match)
    assert M.lift_reproduced(ag, _prereg()).tolist() == [True, True]
    assert M.lift_reproduced(ag.assign(lift_frozen=[1.5004, 1.2494]), _prereg()).tolist() == [True, False]
    with pytest.raises(ValueError, match="no mean lift for c"):
        M.lift_reproduced(pd.DataFrame({"family": ["c"], "lift_frozen": [1.0]}), _prereg())
    with pytest.raises(ValueError, match="one family size"):
        M.frozen_map(_prereg().assign(family_k=[2, 2, 2, 3, 2]))


def test_jaccard_by_hand():
    assert M.jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert M.jaccard([1], [1]) == 1.0
    with pytest.raises(ValueError):
        M.jaccard([], [])


def test_rule_counts_range_and_tables():
    # family a: margin 0 at 2 decimals (unsettled pass); b: clear pass; c: below its null
    v = pd.concat([_verdict(family="a"), _verdict(family="b", on_target=1.80, ci_low=1.73, null_2sigma=0.64),
                   _verdict(family="c", on_target=0.10, ci_low=0.05, null_2sigma=0.19, stated_point=0.0)])
    counts = M.rule_counts(M.decision_table(v))
    c = counts.iloc[0]
    assert (c.point_count, c.point_low, c.point_high) == (2, 1, 2)
    t = M.count_table(counts, {}).set_index("quantity")
    assert t.loc["point rule, W4A4", "recomputed"] == "2 of 3 (1 to 2 within the published precision)"
    assert t.loc["point rule, W4A4", "the study states"] == "2 of 3"
    assert t.loc["CI rule, W4A4", "recomputed"] == "between 0 and 1 of 3"
    d = M.decision_display(M.decision_table(v)).set_index("family")
    assert d.loc["a", "point rule"] == "pass (unsettled)" and d.loc["b", "CI rule"] == "open"
    assert d.loc["c", "point rule"] == "fail" and d.loc["a", "margin range"] == "-0.0067 to +0.0067"
    text = M.counts_sentence(counts)
    assert "2 of 3 as printed" in text and "1 to 2 within the published precision" in text and "from 0 to 1" in text


def test_precision_sentence_compares_the_stated_margin_at_its_precision():
    # 1.298 / 3 - 0.4481 = -0.01543 (4 decimals, range about +-0.0001); a stated -0.015 agrees at 3 decimals,
    # a stated -0.030 does not
    v = _verdict(family="es", precision="BF16", on_target=1.298, worst_off=0.4481, decimals=4)
    t = M.decision_table(v)
    assert "which agrees with that range" in M.precision_sentence(t, {"bf16_es_point_margin": -0.015})
    assert "which lies outside that range" in M.precision_sentence(t, {"bf16_es_point_margin": -0.030})


def test_decimals_to_resolve_by_hand():
    # printed 1.29 and 0.43 (margin 0); a margin of +0.002 shifts them to 1.293 and 0.429: at 3 decimals the
    # margin lies in [1.2925/3 - 0.4295, 1.2935/3 - 0.4285] = [+0.0013, +0.0027], settled
    row = _verdict().iloc[0]
    assert M.decimals_to_resolve(row, 0.002) == 3
    # a margin of +0.0002 needs 4 decimals: at 3, 1.2903/3 - 0.4299 rounds to 1.290/3 - 0.430 = 0 (unsettled)
    assert M.decimals_to_resolve(row, 0.0002) == 4


def test_families_needed_approx_follows_fisher_z():
    from moeaudit import stats as S
    n = M.families_needed_approx(0.8)
    target = 6 / np.pi * np.arcsin(0.4)  # population Spearman correlation of bivariate normal data, rho = 0.8
    assert S.min_detectable_spearman(n, alpha=0.05, power=0.8) <= target < S.min_detectable_spearman(n - 1)
    assert M.families_needed_approx(0.5) > n  # a weaker correlation needs more families
    with pytest.raises(ValueError):
        M.families_needed_approx(1.0)


def test_families_needed():
    # a near-perfect correlation is detected with few families; 0.8 needs more than the exact test enumerates
    n = M.families_needed(0.99, n_sim=2000)
    assert n is not None and n <= 6
    assert M.families_needed(0.8, n_sim=2000) is None


def test_rank_power_at_holms_first_step():
    pw = M.rank_power([5, 6], n_sim=500, n_tests=12).set_index("n")
    # alpha / 12 = 0.00417: with 5 families the smallest p is 2/120 = 0.0167 (never), with 6 it is 2/720 = 0.0028
    assert np.isnan(pw.loc[5, "critical_rho_first"]) and pw.loc[5, "first_power_at_0.8"] == 0.0
    assert pw.loc[6, "critical_rho_first"] == pytest.approx(1.0)
    assert pw.loc[6, "alpha_first"] == pytest.approx(0.05 / 12)
    text = M.power_sentence(pw.reset_index(), alpha=0.05)
    assert "0.05/12 = 0.0042: no ordering reaches it" in text
    with pytest.raises(ValueError, match="n_tests"):
        M.rank_power([6], n_tests=0)


def test_overlap_and_replacement_sentences():
    frozen = {"es": [1, 2, 3], "ar": [3, 4, 5]}
    derived = {"es": [1, 2, 3], "ar": [4, 5, 6]}
    agreement = pd.DataFrame({"family": ["es", "ar"], "n_members": [3, 3], "n_agree": [3, 2],
                              "frozen_only": [[], [(3, 4)]], "derived_only": [[], [(6, 2)]]})
    verdict = pd.concat([_verdict(family="es")])  # worst off-target axis "ar", 0.43
    text = M.overlap_sentence(frozen, derived, agreement, verdict, {"es_ar_shared_experts": 1, "es_ar_jaccard": 0.2})
    assert "raises the loss on Arabic text by 0.43 nats" in text
    assert "share 1 expert (3; Jaccard 0.200)" in text and "expert 3 is one the frozen map holds in the Arabic" in text
    assert "Under the stated rule they share 0 experts (none; Jaccard 0.000)" in text
    rep = M.replacement_sentence(agreement, [6], k=3)
    assert "lift rank 4 (K = 3)" in rep and "rank 2 to 2" in rep and "1 more expert had been excluded" in rep
    assert M.replacement_sentence(agreement.assign(frozen_only=[[], []], derived_only=[[], []]), [], k=3).startswith(
        "The frozen map and the stated rule agree")


def test_topic_families_take_the_highest_lift_experts_per_topic():
    # 8 tokens of texts 0-3 (topics history, science, arts, sport), each routed to one expert of 4 with weight 1:
    # topic i routes to expert i, so each topic's lift is highest on its own expert
    seq = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    idx = (seq % 4)[:, None]
    atlas, fams = M.topic_families(seq, idx, np.ones_like(idx, dtype=float), layer=2, num_experts=4, share=0.25)
    assert fams == {"history": [0], "science": [1], "arts": [2], "sport": [3]}
    assert atlas.mass.sum() == 8
    with pytest.raises(ValueError, match="share"):
        M.topic_families(seq, idx, np.ones_like(idx, dtype=float), layer=2, num_experts=4, share=0)


def test_shipped_and_shows_sentences_say_when_nothing_passes():
    eff = pd.DataFrame({"operator": ["remove", "mask"], "family": ["history", "history"], "on_target": [0.1, 0.1],
                        "worst_off": [0.2, 0.2], "worst_off_topic": ["arts", "arts"], "null_2sigma": [0.3, 0.3],
                        "modular": [False, False]})
    text = M.shipped_sentence(eff, model="m", layer=1, n_positions={"history": 4}, n_null=3)
    assert "No family passes under any operator" in text and "rests on 3 random draws" in text
    flipped = eff.assign(modular=[True, False])
    assert "changes with the operator for history" in M.shipped_sentence(flipped, model="m", layer=1,
                                                                          n_positions={"history": 4})


def test_agreement_display_exercises_and_shows():
    ag = pd.DataFrame({"family": ["es", "ar"], "n_members": [3, 3], "n_agree": [3, 2], "frozen_only": [[], [(3, 4)]],
                       "derived_only": [[], [(6, 2)]], "lift_frozen": [1.0, 1.1], "lift_derived": [1.0, 1.2]})
    d = M.agreement_display(ag).set_index("family")
    assert d.loc["ar", "in the frozen map only"] == "3 (rank 4)" and d.loc["es", "by the stated rule only"] == "-"
    ex = M.exercise_answers({"es": [1, 2], "ar": [2, 5]}, _verdict(family="es"), {"es_point_margin": 0.002},
                            alpha=0.05, power=0.8, rho=0.8)
    assert ex["ex1"] == "They share 1 expert (2)" and ex["ex2"].startswith("3 decimals, 1 more than published")
    assert ex["ex3"].startswith("More than 9 families") and f"about {M.families_needed_approx(0.8)}" in ex["ex3"]
    counts = M.rule_counts(M.decision_table(_verdict(family="a")))
    corr = pd.DataFrame({"precision": "W4A4", "n": [5, 6], "significant": [False, False]})
    pw = pd.DataFrame({"n": [5, 6], "critical_rho_first": [np.nan, 1.0], "min_detectable_rho_first": [np.nan, 0.999]})
    eff = pd.DataFrame({"operator": ["remove", "mask"], "family": ["h", "h"], "modular": [True, False]})
    text = M.shows_sentences(ag, [6], counts, {}, corr, pw, eff, alpha=0.05, power=0.8, model="m",
                             n_positions={"h": 4, "s": 9})
    assert "reproduces 5 of 6 members" in text and "1 more expert is also excluded" in text
    assert "the published values allow 0 to 1" in text and "every family fails it (the study: 0)" in text
    assert "0 of 2 rank correlations" in text and "only if |rho| reaches 1.000" in text and "absence of evidence" in text
    assert "1 of 1 topic families change verdict" in text and "4 to 9 positions per topic" in text
