"""Progressive-ablation summaries (chapter 6) and block geometry / redistribution (chapter 7),
checked against hand-computed tiny inputs."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit import released
from moeaudit.chapters.mechanism import (block_geometry, chain_correlations, compensation_factors,
                                         expert_means, layer_gap_ratios, log_log_slope, measure_agreement,
                                         relative_compensation, released_expert_means)
from moeaudit.chapters.progressive import (deepest_removal_summary, paper_progressive_table,
                                           redundancy_breaks, tail_share)
from moeaudit.audit import progressive_summary, single_expert_records
from moeaudit.report import significance_stars


# ----------------------------------------------------------------------------- chapter 6

def _records(rows):
    return pd.DataFrame(rows, columns=["model", "layer", "k", "delta_loss", "clean_loss"])


def test_progressive_summary_by_hand():
    rec = _records([("m", 0, 1, d, 2.0) for d in (1.0, 2.0, 3.0, 4.0)] + [("m", 0, 2, 5.0, 3.0)])
    s = progressive_summary(rec, alpha=0.05).set_index("k")
    # mean 2.5, sd sqrt(5/3), t_{0.975, 3} = 3.182446
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert s.loc[1, "n"] == 4 and s.loc[1, "mean"] == pytest.approx(2.5)
    assert s.loc[1, "ci_low"] == pytest.approx(2.5 - half) and s.loc[1, "ci_high"] == pytest.approx(2.5 + half)
    assert s.loc[1, "median"] == pytest.approx(2.5)
    assert s.loc[1, "p05"] == pytest.approx(1.15) and s.loc[1, "p95"] == pytest.approx(3.85)
    assert s.loc[1, "clean_loss"] == pytest.approx(2.0)
    assert np.isnan(s.loc[2, "ci_low"]) and s.loc[2, "mean"] == 5.0  # one position: no interval
    wider = progressive_summary(rec, alpha=0.01).set_index("k")
    assert wider.loc[1, "ci_high"] > s.loc[1, "ci_high"]
    with pytest.raises(ValueError):
        progressive_summary(rec, alpha=1.5)


def test_tail_share_by_hand():
    # quantile 0.95 of 1..20 is 19.05: only 20 lies above, out of a total of 210
    assert tail_share(np.arange(1, 21)) == pytest.approx(20 / 210)
    # negatives count in the quantile, not in the total: median 1, above it only 2, total 1+1+2
    assert tail_share([-5.0, 1.0, 1.0, 2.0], q=0.5) == pytest.approx(0.5)
    assert math.isnan(tail_share([-1.0, -2.0]))
    with pytest.raises(ValueError):
        tail_share([])
    with pytest.raises(ValueError):
        tail_share([1.0], q=2)


def test_deepest_removal_summary_uses_the_largest_k():
    rec = _records([("m", 3, 1, 9.0, 1.0)] * 3 + [("m", 3, 2, d, 1.0) for d in (-0.2, 0.0, 0.05, 0.3, 1.0)])
    d = deepest_removal_summary(rec, threshold=0.1).iloc[0]
    assert d.k == 2 and d.n == 5 and d["mean"] == pytest.approx(1.15 / 5)
    assert d["median"] == pytest.approx(0.05)
    assert d.share_above == pytest.approx(2 / 5) and d.share_below_zero == pytest.approx(1 / 5)
    assert d.top5_share == pytest.approx(1.0 / 1.35)  # only 1.0 lies above the 0.95 quantile


def test_redundancy_breaks_by_hand():
    summary = pd.DataFrame({"model": "m", "layer": [0] * 3 + [1] * 3, "k": [1, 2, 3] * 2,
                            "mean": [0.05, 0.12, 0.30, 0.01, 0.02, 0.015], "clean_loss": 2.0})
    b = redundancy_breaks(summary, threshold=0.1).set_index("layer")
    assert b.loc[0, "first_k_above"] == 2 and pd.isna(b.loc[1, "first_k_above"])
    assert b.loc[0, "largest_step"] == pytest.approx(0.18) and b.loc[0, "largest_step_k"] == 3
    assert b.loc[1, "largest_step"] == pytest.approx(0.01) and b.loc[1, "largest_step_k"] == 1
    assert b.loc[0, "mean_deepest"] == pytest.approx(0.30) and b.loc[0, "ratio_to_clean"] == pytest.approx(0.15)
    lower = redundancy_breaks(summary, threshold=0.01).set_index("layer")
    assert lower.loc[0, "first_k_above"] == 1 and lower.loc[1, "first_k_above"] == 2


def test_paper_progressive_table_reproduces_the_papers_reading():
    """Section 3: layers 0-9 stay below +0.083 at k = 7; layer 15 breaks at k = 2 (+0.155)."""
    paper = paper_progressive_table()
    assert len(paper) == 6 * 7
    b = redundancy_breaks(paper, threshold=0.1).set_index("layer")
    assert b.loc[15, "first_k_above"] == 2 and b.drop(index=15).first_k_above.isna().all()
    assert b.drop(index=15).mean_deepest.max() == pytest.approx(0.083)
    l15 = paper[paper.layer == 15].set_index("k")
    assert l15.loc[2, "mean"] == pytest.approx(0.155) and l15.loc[7, "p95"] == pytest.approx(2.633)


# ----------------------------------------------------------------------------- chapter 7

def test_relative_compensation_by_hand():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    r = torch.tensor([[2.0, 2.0], [1.0, -1.0]])
    q = relative_compensation(g, g + r)
    assert q["gap_norm"].tolist() == pytest.approx([1.0, 2.0])
    assert q["r_norm"].tolist() == pytest.approx([2 * math.sqrt(2), math.sqrt(2)])
    assert q["cos"].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert q["rel_comp"].tolist() == pytest.approx([2.0, 0.0])  # <g, r> = 2 and -2, clipped at 0
    # the identity the chapter uses: rel_comp = max(cos, 0) * ||r|| / ||g||
    ident = q["cos"].clamp(min=0) * q["r_norm"] / q["gap_norm"]
    assert torch.allclose(ident, q["rel_comp"])
    # halving g at fixed r doubles ||r|| / ||g|| and keeps the cosine: rel_comp doubles
    half = relative_compensation(g / 2, g / 2 + r)
    assert half["rel_comp"][0].item() == pytest.approx(4.0) and half["cos"][0].item() == pytest.approx(1 / math.sqrt(2))


def test_expert_means_by_hand():
    rows = pd.DataFrame({"model": "m", "layer": 0, "expert": [0, 0, 1], "prob": [0.2, 0.4, 0.9],
                         "gap_norm": [1.0, 3.0, 5.0], "r_norm": [2.0, 6.0, 1.0], "rel_comp": [2.0, 4.0, 0.0],
                         "cos": [0.5, 0.1, -1.0]})
    pe = expert_means(rows, min_activations=2)
    assert pe.expert.tolist() == [0]
    r = pe.iloc[0]
    assert r.n == 2 and r.mean_rw == pytest.approx(0.3) and r.mean_gap == pytest.approx(2.0)
    assert r.mean_rel_comp == pytest.approx(3.0) and r.mean_cos == pytest.approx(0.3)
    assert r.mean_r_over_g == pytest.approx(2.0)
    assert len(expert_means(rows, min_activations=1)) == 2
    with pytest.raises(ValueError):
        expert_means(rows, min_activations=0)


def test_chain_correlations_by_hand():
    pe = pd.DataFrame({"model": "m", "layer": [0] * 4 + [1] * 2, "mean_rw": [1, 2, 3, 4, 1, 2],
                       "mean_gap": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0], "mean_rel_comp": [4.0, 3.0, 2.0, 1.0, 1.0, 2.0]})
    c = chain_correlations(pe).set_index("layer")
    assert set(c.columns) >= {"rho_rw_gap", "p_rw_gap", "rho_gap_comp", "p_gap_comp"}
    assert "rho_gap_down" not in c  # its columns are absent
    assert c.loc[0, "rho_rw_gap"] == pytest.approx(1.0) and c.loc[0, "rho_gap_comp"] == pytest.approx(-1.0)
    assert c.loc[0, "n_experts"] == 4 and c.loc[0, "mean_gap"] == pytest.approx(2.5)
    assert np.isnan(c.loc[1, "rho_gap_comp"])  # two experts: undefined
    empty = chain_correlations(pe.iloc[:0], pairs={"gap_comp": ("mean_gap", "mean_rel_comp")})
    assert empty.empty and {"model", "layer", "n_experts", "rho_gap_comp", "p_gap_comp"} <= set(empty.columns)
    assert empty.rho_gap_comp.dtype == np.float64  # merges onto other tables keep numeric columns numeric


def test_chain_correlations_reproduce_the_released_stored_values():
    """The authors' stored Spearman rows follow from their per-expert records."""
    mine = chain_correlations(released_expert_means(released.redistribution_experts()))
    stored = released.redistribution()
    both = mine.merge(stored, on=["model", "layer"], suffixes=("", "_stored"))
    assert len(both) == len(stored) == 21
    for key in ("rw_gap", "gap_comp", "gap_cos"):
        np.testing.assert_allclose(both[f"rho_{key}"], both[f"rho_{key}_stored" if key != "gap_cos" else "rho_cos_gap"],
                                   atol=1e-9)


def test_log_log_slope_and_compensation_factors_by_hand():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    assert log_log_slope(x, 3 * x**2) == pytest.approx(2.0)
    assert log_log_slope([1.0, 2.0, 4.0, 8.0, -1.0], [1.0, 2.0, 4.0, 8.0, 5.0]) == pytest.approx(1.0)  # -1 dropped
    assert math.isnan(log_log_slope([1.0, 2.0], [1.0, 2.0]))
    with pytest.raises(ValueError):
        log_log_slope([1.0], [1.0, 2.0])
    pe = pd.DataFrame({"model": "m", "layer": 0, "mean_gap": x, "mean_cos": 0.1 * np.sqrt(x),
                       "mean_r_over_g": 5 / x, "mean_rel_comp": 0.5 / np.sqrt(x)})
    f = compensation_factors(pe).iloc[0]
    assert f.slope_cos == pytest.approx(0.5) and f.slope_r_over_g == pytest.approx(-1.0)
    assert f.slope_rel_comp == pytest.approx(-0.5)
    assert f.median_cos == pytest.approx(0.1 * (math.sqrt(2) + 2) / 2)
    assert math.isnan(compensation_factors(pe.drop(columns="mean_r_over_g")).iloc[0].slope_r_over_g)


def test_measure_agreement_by_hand():
    rec = pd.DataFrame({"model": "m", "layer": [0] * 4 + [1] * 3, "rel_comp": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0],
                        "downstream_compensation": [0.1, 0.2, -0.3, 0.4, 0.0, 0.0, 0.0]})
    a = measure_agreement(rec).set_index("layer")
    assert a.loc[0, "ablations"] == 4 and a.loc[0, "share_down_positive"] == pytest.approx(0.75)
    assert a.loc[0, "mean_down"] == pytest.approx(0.1) and a.loc[0, "rho"] == pytest.approx(0.4)
    assert np.isnan(a.loc[1, "rho"]) and a.loc[1, "share_down_positive"] == 0  # constant (last layer)


def test_layer_gap_ratios_by_hand():
    per_layer = pd.DataFrame({"model": "m", "layer": [2, 0, 1], "mean_gap": [8.0, 2.0, 1.0]})
    r = layer_gap_ratios(per_layer).iloc[0]
    assert (r.first_layer, r.last_layer) == (0, 2)
    assert r.ratio_last_first == pytest.approx(4.0) and r.ratio_max_min == pytest.approx(8.0)


def test_released_gap_growth_is_the_papers_41_and_38():
    per_layer = released.redistribution()
    r = layer_gap_ratios(per_layer, gap="mean_gap_norm").set_index("model")
    assert int(r.loc["olmoe", "ratio_last_first"]) == 41 and round(r.loc["qwen", "ratio_last_first"]) == 38


def test_significance_stars():
    assert [significance_stars(p) for p in (0.0009, 0.001, 0.009, 0.0499, 0.05, 0.5)] == \
        ["***", "**", "**", "*", "", ""]
    assert significance_stars(None) == "" and significance_stars(float("nan")) == ""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from moeaudit.tooling.testing import tiny_audit_context

    return tiny_audit_context(tmp_path_factory.mktemp("results"))


def test_block_geometry_agrees_with_the_clean_pass_and_the_ablations(ctx):
    geo = block_geometry(ctx, [0, 2], batch_size=3)
    n_tokens = len(ctx.clean.tokens)
    assert len(geo) == 2 * n_tokens * 3 and geo.norm_check.max() < 1e-4
    # the gap is the combine weight times the stored expert norm
    stored = np.concatenate([ctx.clean.routing[L]["norm"].reshape(-1) for L in (0, 2)])
    np.testing.assert_allclose(geo.gap_norm, geo.weight * stored, rtol=1e-4)
    # the identity rel_comp = max(cos, 0) ||r|| / ||g|| holds row by row
    np.testing.assert_allclose(geo.rel_comp, geo.cos.clip(lower=0) * geo.r_norm / geo.gap_norm, rtol=1e-4, atol=1e-6)
    # the gap measured by ablating inside the forward pass is the same vector's norm
    rec = single_expert_records(ctx, layers=[0, 2], n_positions=6, seed=0, progress=False)
    rec["row"] = ctx.clean.row(rec.seq_id.to_numpy(), rec.t.to_numpy())
    both = rec.merge(geo, on=["layer", "row", "expert"], suffixes=("_abl", ""))
    assert len(both) == len(rec)
    np.testing.assert_allclose(both.gap_norm_abl, both.gap_norm, rtol=1e-3)
    with pytest.raises(ValueError):
        block_geometry(ctx, [7])


def test_gap_rounding_ratio_by_hand():
    from moeaudit.chapters.mechanism import gap_rounding_ratio
    eps = float(np.finfo(np.float32).eps)
    # relative error 2 eps on a gap of 0.01 beside a rest of 0.99: unit eps * (0.99 + 0.01) / 0.01 = 100 eps
    out = gap_rounding_ratio([0.01 * (1 + 2 * eps)], [0.01], [0.99])
    assert out[0] == pytest.approx(2 * eps / (100 * eps))
    with pytest.raises(ValueError):
        gap_rounding_ratio([1.0, 2.0], [1.0], [1.0])


def test_cosine_against_chance_by_hand():
    from moeaudit.chapters.mechanism import cosine_against_chance
    rows = pd.DataFrame({"model": ["a", "a", "b", "b", "c", "c"],
                         "median_cos": [0.2, 0.4, 0.001, 0.01, 0.01, 0.05]})
    out = cosine_against_chance(rows, {"a": 64, "b": 2500, "c": 2500}).set_index("model")
    assert out.loc["a", "chance"] == pytest.approx(0.125) and out.loc["b", "chance"] == pytest.approx(0.02)
    assert out.loc["a", "ratio_lo"] == pytest.approx(1.6) and out.loc["a", "ratio_hi"] == pytest.approx(3.2)
    assert list(out.relation) == ["above", "below", "across"]
    with pytest.raises(KeyError):
        cosine_against_chance(rows, {"a": 64})


def test_slope_sign_separation_by_hand():
    from moeaudit.chapters.mechanism import slope_sign_separation
    sep = slope_sign_separation([0.1, 0.2, 0.7, 0.8], [-0.3, -0.1, 0.4, 0.5])
    assert sep["separated"] and sep["max_slope_neg"] == 0.2 and sep["min_slope_pos"] == 0.7 and sep["n_overlap"] == 0
    ov = slope_sign_separation([0.1, 0.6, 0.5, 0.8, np.nan], [-0.3, -0.1, 0.4, 0.5, 0.9])
    assert not ov["separated"] and ov["n_neg"] == 2 and ov["n_pos"] == 2 and ov["n_overlap"] == 2
    assert slope_sign_separation([0.1, 0.2], [0.3, 0.4])["separated"] is None


def test_significant_signs_text_by_hand():
    from moeaudit.chapters.mechanism import significant_signs_text
    assert significant_signs_text([0, 1, 2, 3], [-0.4, -0.3, 0.1, -0.5], [0.001, 0.01, 0.5, 0.02]) == \
        "3 of 4 layers, all negative (-0.50 to -0.30)"
    assert significant_signs_text([0, 1, 2], [-0.42, 0.41, 0.0], [0.001, 0.01, 0.9]) == \
        "2 of 3 layers, of opposite signs (L0 -0.42, L1 +0.41)"
    assert significant_signs_text([0, 1], [0.3, 0.1], [0.01, np.nan]) == "1 of 1 layer (positive, +0.30)"
    assert significant_signs_text([0, 1], [0.3, 0.1], [0.2, 0.3]) == "0 of 2 layers"


# ----------------------------------------------------------------------------- chapters 5-6 wording helpers

def test_distribution_shape_tells_a_tail_from_a_two_sided_spread():
    from moeaudit.chapters.progressive import distribution_shape

    # tiny-olmoe layer 0 at k = 7: the lower tail is almost half as long as the upper one
    assert distribution_shape(median=0.042, p05=-0.267, p95=0.594) == "two-sided"
    # the paper's layer 15 shape with a short lower tail: a tail of large increases
    assert distribution_shape(median=0.018, p05=-0.05, p95=2.633) == "upper tail"
    assert distribution_shape(median=0.5, p05=0.1, p95=1.0) == "shift"
    assert distribution_shape(median=0.0, p05=-1.0, p95=0.01) == "lower tail"
    assert distribution_shape(median=0.0, p05=0.0, p95=0.0) == "none"
    with pytest.raises(ValueError):
        distribution_shape(median=0.0, p05=1.0, p95=0.0)


def test_threshold_calls_by_hand():
    from moeaudit.chapters.progressive import threshold_calls

    s = pd.DataFrame({"model": "m", "layer": [0, 1, 2, 0, 1, 2], "k": [1, 1, 1, 2, 2, 2],
                      "mean": [0.0] * 3 + [0.2, 0.05, 0.1], "ci_low": [0.0] * 3 + [0.15, 0.0, 0.05],
                      "ci_high": [0.0] * 3 + [0.25, 0.09, 0.2]})
    c = threshold_calls(s, threshold=0.1).set_index("layer")
    assert list(c.call) == ["above", "below", "undecided"] and set(c.k) == {2}


def test_control_against_observational_by_hand():
    from moeaudit.chapters.control import control_against_observational

    control = pd.DataFrame({"model": "m", "layer": [0, 1], "cohens_dz": [0.30, 0.05],
                            "dz_ci_low": [0.15, -0.1], "dz_ci_high": [0.45, 0.2]})
    obs = pd.DataFrame({"model": "m", "layer": [0, 0, 1], "ranking": ["a", "b", "a"], "cohens_dz": [0.1, 0.2, -0.1]})
    c = control_against_observational(control, obs).set_index("layer")
    assert c.loc[0, "position"] == "above" and c.loc[0, "margin"] == pytest.approx(0.1)
    assert bool(c.loc[0, "ci_overlaps_band"]) and not bool(c.loc[0, "beaten"])
    assert c.loc[1, "position"] == "inside" and c.loc[1, "best_ranking"] == "a" and c.loc[1, "margin"] == 0


def test_paper_control_notes_read_table_4():
    from moeaudit.paper import paper_control_notes

    notes = paper_control_notes()
    assert "layer 15 (p_t = 0.0013, p_W = 0.019)" in notes["rule"] and "Wilcoxon does not" in notes["rule"]
    assert "layers 11 and 15" in notes["rule"] and "uncorrected p_t < 0.05" in notes["rule"]
    assert "do not rise at every step" in notes["trend"]
    # at a looser level (alpha_adj = 0.02) the dual rule holds at layer 15 only
    assert "Wilcoxon as well at layer 15." in paper_control_notes(alpha=0.1)["rule"]
    # the introduction's clause: the t-test alone passes in one model at one layer, which fails the dual rule
    assert notes["intro"].startswith("the router's own weight for the token at hand passes Bonferroni (α_adj = 0.01) "
                                     "on the t-test alone in one model at one layer (OLMoE-1B-7B-0924 layer 15, "
                                     "p_t = 0.0013); its Wilcoxon test there does not (p_W = 0.019), so it fails the "
                                     "dual rule")
    assert "it passes the dual rule at one layer (OLMoE-1B-7B-0924 layer 15)" in paper_control_notes(alpha=0.1)["intro"]
