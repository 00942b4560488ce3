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
