"""Tests for the re-analysis functions of moeaudit.released (the chapter on the released results).

Tiny hand-computed inputs first; then checks on the released tables, which are always available (the
original files under $MOEAUDIT_DATA_DIR/paper-released, or the embedded derived table).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit import released as R
from moeaudit.chapters import reanalysis
from moeaudit import paper
from moeaudit import stats as S

# ----------------------------------------------------------------------------- tiny inputs


def test_with_paper_labels_orders_and_names():
    df = pd.DataFrame({"model": ["deepseek", "olmoe", "olmoe"], "metric": ["activation_std", "routing_weight",
                                                                        "utilization_rate"], "layer": [1, 4, 0]})
    out = reanalysis.with_paper_labels(df)
    assert out.model.tolist() == ["OLMoE-1B-7B-0924", "OLMoE-1B-7B-0924", "DeepSeek-V2-Lite"]
    assert out.metric.tolist() == ["Utilization rate", "Routing weight (control)", "Activation std"]
    assert list(out.columns) == ["model", "metric", "layer"]


def _printed(values, decimals):
    return pd.DataFrame({"table": 1, "model": "olmoe", "layer": [0, 4], "quantity": "d",
                         "printed": [str(v) for v in values], "value": values, "decimals": decimals})


def test_compare_printed_flags_the_last_digit():
    printed = _printed([0.028, 0.172], [3, 3])
    rec = pd.DataFrame({"model": "olmoe", "layer": [0, 4], "quantity": "d", "recomputed": [0.0285, 0.17249]})
    out = reanalysis.compare_printed(rec, tables=[1], on=["model", "layer"], printed=printed)
    # 0.0285 is exactly half a unit away (consistent with rounding); 0.17249 rounds to 0.172
    assert out.agrees.tolist() == [True, True]
    rec.loc[0, "recomputed"] = 0.02747  # 0.53 units of the last digit: rounds to 0.027
    out = reanalysis.compare_printed(rec, tables=[1], on=["model", "layer"], printed=printed)
    assert out.agrees.tolist() == [False, True]
    with pytest.raises(pd.errors.MergeError):
        reanalysis.compare_printed(pd.concat([rec, rec]), tables=[1], on=["model", "layer"], printed=printed)


def test_printed_side_by_side():
    long = pd.DataFrame({"model": "olmoe", "layer": [0, 0], "quantity": ["d", "p_t"], "value": [0.1, 0.5],
                         "recomputed": [0.11, 0.5], "agrees": [False, True]})
    out = reanalysis.printed_side_by_side(long, index=["model", "layer"], quantities=["d", "p_t"])
    row = out.iloc[0]
    assert (row["d paper"], row["d released"], row["p_t released"]) == (0.1, 0.11, 0.5)
    assert not row["agrees"]


def test_cell_effect_sizes_ddof():
    rec = pd.DataFrame({"model": "olmoe", "layer": 0, "metric": "activation_norm",
                        "delta_high": [1.0, 2.0, 3.0], "delta_low": [0.0, 0.0, 0.0]})
    # D = 1, 2, 3: mean 2, population sd sqrt(2/3), sample sd 1
    assert reanalysis.cell_effect_sizes(rec, ddof=0).d.iloc[0] == pytest.approx(2 / np.sqrt(2 / 3))
    assert reanalysis.cell_effect_sizes(rec, ddof=1).d.iloc[0] == pytest.approx(2.0)


def test_summary_cells_from_t_and_n():
    rows = pd.DataFrame({"model": ["qwen"], "experiment": ["metric"], "layer": [0], "metric": ["activation_std"],
                         "t": [2.0], "n": [16], "p_W": [0.04]})
    out = reanalysis.summary_cells(rows, n_tests=4, source="stored summary", alpha=0.05)
    assert out.cohens_dz.iloc[0] == pytest.approx(0.5)  # t / sqrt(n)
    assert bool(out.same_sign.iloc[0]) and out.source.iloc[0] == "stored summary"
    assert out.alpha_corrected.iloc[0] == pytest.approx(0.05 / 4)


def _cells(p_t, p_W, same=True, p_tost=0.5, alpha_corrected=0.0125):
    n = len(p_t)
    c = pd.DataFrame({"model": "olmoe", "experiment": "metric", "layer": range(n), "metric": "activation_norm",
                      "p_t": p_t, "p_W": p_W, "same_sign": same, "p_tost": p_tost, "cohens_dz": 0.1,
                      "dz_ci_low": -0.1, "dz_ci_high": 0.3, "alpha_corrected": alpha_corrected, "family_size": n})
    return S.correct_family(c, family=["model", "experiment"], alpha=0.05)


def test_pass_counts_by_hand():
    # four cells, Bonferroni level 0.0125: only cell 0 passes both; cell 1 passes t only
    c = _cells([0.001, 0.01, 0.03, 0.5], [0.002, 0.2, 0.04, 0.5])
    row = reanalysis.pass_counts(c, alpha=0.05).iloc[0]
    assert (row["uncorrected t"], row["uncorrected W"], row["uncorrected both"]) == (3, 2, 2)
    assert (row["Bonferroni t"], row["Bonferroni W"], row["Bonferroni both"]) == (2, 1, 1)
    c2 = _cells([0.001, 0.01, 0.03, 0.5], [0.002, 0.2, 0.04, 0.5], same=[False, True, True, True])
    assert reanalysis.pass_counts(c2, alpha=0.05).iloc[0]["Bonferroni both"] == 0


def test_interval_and_equivalence_summaries():
    c = _cells([0.5, 0.5], [0.5, 0.5], p_tost=[0.01, 0.04])
    c.loc[1, ["cohens_dz", "dz_ci_low", "dz_ci_high"]] = [-0.25, -0.4, -0.05]
    iv = reanalysis.interval_summary(c).iloc[0]
    assert iv.max_abs_dz == pytest.approx(0.25) and iv.widest_ci == pytest.approx(0.4)
    assert iv.mean_ci_half_width == pytest.approx((0.2 + 0.175) / 2) and iv.ci_excludes_zero == 1
    eq = reanalysis.equivalence_counts(c, alpha=0.05).iloc[0]
    assert (eq["equivalent uncorrected"], eq["equivalent corrected"]) == (2, 1)  # 0.01 < 0.0125, 0.04 is not


def test_detectable_effects_uses_the_stats_functions():
    t = reanalysis.detectable_effects(n=200, levels={"a": 0.05, "b": 0.0025}, power=0.8, targets=(0.2,))
    assert t["MDE 0.8"].tolist() == pytest.approx([S.min_detectable_dz(200, alpha=a, power=0.8) for a in (0.05, 0.0025)])
    assert t["n for 0.2"].iloc[1] == pytest.approx(S.required_n(0.2, alpha=0.0025, power=0.8))
    assert {"MDE 0.5", "MDE 0.95"} <= set(t.columns)


def _records():
    rows = []
    for layer in (0, 4):
        for metric, idx in (("a", [1, 2, 3]), ("b", [3, 4, 5])):
            for i, g in enumerate(idx):
                rows.append({"model": "olmoe", "layer": layer, "metric": metric, "global_token_idx": g,
                             "sample_idx": 0, "batch_idx": i % 2, "seq_position": [5, 40, 100][i],
                             "metric_value_high": [-1.0, 0.5, 2.0][i], "metric_value_low": -0.5})
    return pd.DataFrame(rows)


def test_position_overlap_context_and_values_by_hand():
    rec = _records()
    o = reanalysis.position_overlap(rec).iloc[0]
    assert (o["positions per metric"], o["distinct over metrics"], o["shared min"], o["shared max"]) == (3, 5, 1, 1)
    assert bool(o["same at every layer"])
    rec.loc[(rec.layer == 4) & (rec.metric == "b") & (rec.global_token_idx == 5), "global_token_idx"] = 9
    assert not bool(reanalysis.position_overlap(rec).iloc[0]["same at every layer"])
    c = reanalysis.context_summary(_records(), short=32).iloc[0]
    # first layer: positions 5, 40, 100 for each metric; texts (0,0) hold 5 and 100, (0,1) holds 40
    assert c["share short"] == pytest.approx(1 / 3) and c["median position"] == 40 and c["max position"] == 100
    assert (c["median first"], c["median last"]) == (22.5, 70.0)
    v = reanalysis.metric_value_ranges(_records()).set_index("metric").loc["a"]
    assert (v["min"], v["max"], v["share negative"]) == (-1.0, 2.0, pytest.approx(4 / 6))


def test_control_repeats_by_hand():
    c = pd.DataFrame({"layer": 1, "token_pos": [3, 3, 4, 3], "baseline_loss": [2.0, 2.0, 2.0, 2.5]})
    r = reanalysis.control_repeats(c).iloc[0]
    assert (r.positions, r.distinct, r.repeats) == (4, 3, 1)


def test_correlation_by_layer_and_errors():
    red = pd.DataFrame({"model": "olmoe", "layer": [1, 0, 2], "rho_gap_comp": [0.2, 0.5, 0.9],
                        "p_gap_comp": [0.2, 0.01, 0.001]})
    out = reanalysis.correlation_by_layer(red, model="olmoe", alpha=0.05)
    assert out.layer.tolist() == [0, 1, 2] and out.significant.tolist() == [True, False, True]
    assert out["rank"].tolist() == [2, 3, 1]
    with pytest.raises(ValueError):
        reanalysis.correlation_by_layer(red, model="olmoe", pair="nonsense")
    with pytest.raises(ValueError):
        reanalysis.correlation_by_layer(red, model="qwen")


def test_monotonicity_breaks():
    assert reanalysis.monotonicity_breaks([1, 2, 3]) == []
    assert reanalysis.monotonicity_breaks(pd.Series([1.0, 2.0, 2.0, 3.0, 1.0], index=[0, 4, 7, 11, 15])) == [
        (4, 7, 2.0, 2.0), (11, 15, 3.0, 1.0)]
    assert reanalysis.monotonicity_breaks([3, 2, 1], increasing=False) == []


# ----------------------------------------------------------------------------- released tables


def test_paper_text_values():
    t = paper.paper_text_values()
    assert t["max_abs_d_v1"] == 0.17 and t["alpha_adj_metric"] == pytest.approx(t["family_alpha"] / 20)
    assert t["gap_comp_olmoe_layer"] == max(paper.LAYERS["olmoe"])


def test_table4_is_not_monotone():
    printed = paper.paper_printed_values()
    d = printed.query("table == 4 and quantity == 'd'").set_index("layer").value
    assert reanalysis.monotonicity_breaks(d) == [(4, 7, 0.095, 0.085)]


def test_olmoe_gap_compensation_significant_at_every_layer():
    out = reanalysis.correlation_by_layer(R.redistribution(), model="olmoe", alpha=0.05).set_index("layer")
    assert len(out) == 16 and out.significant.all()
    assert out.rho.loc[[0, 7, 15]].tolist() == pytest.approx([0.377, 0.853, 0.747], abs=5e-4)
    assert out.rho.idxmax() == 7 and out["rank"].loc[15] == 4


def test_reanalysis_cells_on_the_released_tables():
    cells = reanalysis.reanalysis_cells()
    assert len(cells) == 75
    sizes = cells.groupby(["model", "experiment"]).size()
    assert set(sizes.xs("metric", level=1)) == {20} and set(sizes.xs("control", level=1)) == {5}
    assert (cells.alpha_corrected == 0.05 / cells.family_size).all()
    olmoe = cells[(cells.model == "olmoe") & (cells.experiment == "control")].set_index("layer")
    assert olmoe.p_t.loc[15] == 0.0013 and olmoe.cohens_dz.loc[15] == pytest.approx(0.231)
    stored = R.stored_statistics(model="deepseek", experiment="metric").set_index(["layer", "metric"])
    ds = cells[(cells.model == "deepseek") & (cells.experiment == "metric")].set_index(["layer", "metric"])
    assert ds.p_t.to_numpy() == pytest.approx(stored.loc[ds.index].p_t.to_numpy(), abs=1e-12)


def test_reanalysis_counts_follow_alpha():
    base = reanalysis.reanalysis_counts(reanalysis.reanalysis_cells(alpha=0.05), alpha=0.05)
    assert base["dual_metric"] == 0 and base["dual_olmoe_control"] == 0
    assert base["metric_level"] == pytest.approx(0.0025) and base["eq_corrected"] == 0
    loose = reanalysis.reanalysis_counts(reanalysis.reanalysis_cells(alpha=0.1), alpha=0.1)
    # at 0.1/5 = 0.02 the OLMoE Layer 15 control (p_t 0.0013, p_W 0.019) passes both tests
    assert loose["dual_olmoe_control"] == 1 and loose["control_level"] == pytest.approx(0.02)


def test_control_spearman_matches_table6():
    rho = reanalysis.control_spearman(R.control_comparisons(), n_boot=200, seed=0).set_index("layer")
    printed = paper.paper_printed_values().query("table == 6 and quantity == 'rho'").set_index("layer").value
    assert rho.rho.loc[printed.index].to_numpy() == pytest.approx(printed.to_numpy(), abs=5e-4)
    assert ((rho.ci_low <= rho.rho) & (rho.rho <= rho.ci_high)).all()


def test_released_digits_shows_why_rounding_differs():
    assert reanalysis.released_digits(0.027496, 0.028, 3) == "0.027496"  # 0.0275 would look like a tie
    assert reanalysis.released_digits(0.02747, 0.028, 3) == "0.02747"
    assert reanalysis.released_digits(0.02751, 0.028, 3) == "0.0275"  # agrees: the first extra digit already shows it


def test_agreement_and_mismatch_phrases():
    long = pd.DataFrame({"model": ["olmoe", "olmoe"], "metric": [None, None], "layer": [0, 4], "quantity": "d",
                         "printed": ["0.028", "0.100"], "value": [0.028, 0.1], "decimals": 3,
                         "recomputed": [0.027496, 0.1], "agrees": [False, True]})
    assert reanalysis.agreement_phrase(long) == "1 of the 2 agree"
    assert reanalysis.agreement_phrase(long.iloc[[1]]) == "the one printed number agrees"
    assert reanalysis.mismatch_phrase(long) == "OLMoE-1B-7B-0924 Layer 0, d: printed 0.028, released 0.027496"
    assert reanalysis.mismatch_phrase(long.iloc[[1]]) == "none"


def test_side_by_side_as_printed_keeps_the_printed_text():
    long = pd.DataFrame({"model": "olmoe", "layer": [0, 4], "quantity": "p_t", "printed": ["0.0020", "0.50"],
                         "value": [0.002, 0.5], "decimals": [4, 2], "recomputed": [0.00201, 0.5], "agrees": True})
    out = reanalysis.side_by_side_as_printed(long, index=["model", "layer"], quantities=["p_t"])
    assert out["p_t paper"].tolist() == ["0.0020", "0.50"]


def test_layer_correlation_of_d_by_hand():
    idx = np.arange(6)
    d0 = np.array([1.0, 2, 3, 4, 5, 6])
    rows = [pd.DataFrame({"model": "olmoe", "metric": "m", "layer": L, "global_token_idx": idx,
                          "delta_high": d, "delta_low": 0.0}) for L, d in ((0, d0), (1, d0 * 2), (2, -d0))]
    out = reanalysis.layer_correlation_of_d(pd.concat(rows), alpha=0.05).iloc[0]
    assert out.pairs == 3 and out.positions == 6
    assert out["rho max"] == pytest.approx(1.0) and out["rho min"] == pytest.approx(-1.0)
    assert out.significant == 3
