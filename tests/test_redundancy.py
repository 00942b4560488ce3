"""The redundancy analysis (moeaudit.redundancy) against hand-computed values on tiny frames."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from moeaudit import redundancy as R
from moeaudit.training import SPECS, build_model, count_parameters
from moeaudit.zoo import REDUNDANCY_MODELS, REDUNDANCY_SEEDS, REDUNDANCY_SETTINGS, SHIPPED_MODELS, ZOO_MODELS

SETTINGS = [(64, 2), (64, 4), (64, 8), (64, 16), (8, 2)]


def _members(seeds=(0, 1)):
    layouts = {f"m-e{E}-k{k}-s{s}": SimpleNamespace(num_experts=E, top_k=k) for E, k in SETTINGS for s in seeds}
    return R.member_table(layouts, seeds={n: int(n[-1]) for n in layouts})


def test_member_table_columns_and_refusal():
    m = _members()
    assert list(m.columns) == ["model", "n_experts", "top_k", "k_over_E", "setting", "seed"]
    row = m.set_index("model").loc["m-e8-k2-s1"]
    assert row.k_over_E == 0.25 and row.setting == "E=8, top-2" and row.seed == 1
    with pytest.raises(ValueError, match="compares routing settings"):
        R.member_table({"a": SimpleNamespace(num_experts=64, top_k=8), "b": SimpleNamespace(num_experts=64, top_k=8)})


def _cells(rows):
    return pd.DataFrame(rows, columns=["model", "ranking", "layer", "cohens_dz", "sig_dual_bonf"])


def test_validity_counts_only_positive_dual_significant_cells():
    t = _cells([("a", "x", 0, 0.3, True), ("a", "x", 1, -0.4, True), ("a", "x", 2, 0.5, False),
                ("a", "y", 0, 0.1, np.nan), ("b", "x", 0, 0.2, True)])
    v = R.validity_by_model(t).set_index(["model", "ranking"])
    assert v.loc[("a", "x")].tolist()[:3] == [3, 1, 1]  # cells, valid, negative
    assert v.loc[("a", "x"), "max_abs_dz"] == pytest.approx(0.5)
    assert v.loc[("a", "x"), "mean_dz"] == pytest.approx((0.3 - 0.4 + 0.5) / 3)
    assert v.loc[("a", "y"), "valid_cells"] == 0  # an untested cell (NaN flag) is not valid
    assert v.loc[("b", "x"), "valid_cells"] == 1


def test_gap_growth_is_relative_to_the_first_audited_layer():
    rec = pd.DataFrame({"model": ["a"] * 4 + ["b"] * 2, "layer": [1, 1, 3, 3, 0, 2],
                        "gap_norm": [1.0, 3.0, 10.0, 30.0, 0.5, 0.5]})
    g = R.gap_growth(rec).set_index(["model", "layer"])
    assert g.loc[("a", 1), "mean_gap"] == 2.0 and g.loc[("a", 3), "growth"] == 10.0
    assert g.loc[("b", 2), "growth"] == 1.0


def test_setting_anova_by_hand():
    s = pd.DataFrame({"setting": ["p", "p", "q", "q", "r", "r"], "v": [1.0, 3.0, 2.0, 4.0, 10.0, 12.0]})
    a = R.setting_anova(s, quantities=["v"]).iloc[0]
    # means 2, 3, 11; grand mean 16/3; SS_between = 2 * sum (m - 16/3)^2; SS_within = 3 * 2
    ssb = 2 * ((2 - 16 / 3) ** 2 + (3 - 16 / 3) ** 2 + (11 - 16 / 3) ** 2)
    assert a.F == pytest.approx((ssb / 2) / (6 / 3))
    assert a.df_between == 2 and a.df_within == 3
    assert a.sd_seed == pytest.approx(math.sqrt(2))
    assert a.sd_between == pytest.approx(np.std([2, 3, 11], ddof=1))
    assert a.eta_sq == pytest.approx(ssb / (ssb + 6))
    same = R.setting_anova(s.assign(v=[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]), quantities=["v"]).iloc[0]
    assert np.isnan(same.F) and np.isnan(same.p) and same.ratio == math.inf
    one = R.setting_anova(s.iloc[[0, 2, 4]], quantities=["v"]).iloc[0]
    assert np.isnan(one.F) and one.df_within == 0 and np.isnan(one.ratio) and np.isnan(one.eta_sq)


def _summary(**columns):
    m = _members()
    out = m.copy()
    for name, f in columns.items():
        out[name] = [f(r) for r in m.itertuples()]
    return out


def test_trend_against_k_recovers_an_exact_slope_and_a_flat_line():
    s = _summary(q=lambda r: 2.0 - 0.5 * math.log2(r.top_k) + (0.1 if r.seed else -0.1))
    tr = R.trend_against_k(s, quantity="q")
    assert tr["n_experts"] == 64 and tr["n"] == 8 and tr["ks"] == [2, 4, 8, 16]  # the E=8 models are left out
    assert tr["slope"] == pytest.approx(-0.5) and tr["ci_low"] < -0.5 < tr["ci_high"] < 0
    assert tr["p"] < 1e-4 and tr["spearman_rho"] < -0.9 and np.isnan(tr["value"])
    flat = R.trend_against_k(_summary(q=lambda r: 0), quantity="q")
    assert np.isnan(flat["slope"]) and np.isnan(flat["p"]) and flat["value"] == 0  # nothing to fit, not "p = 1"
    with pytest.raises(ValueError, match="two values of k"):
        R.trend_against_k(_summary(q=lambda r: r.seed), quantity="q", n_experts=8)


def test_holm_by_hand_and_nan_outside_the_family():
    # sorted p 0.01, 0.02, 0.04 over m = 3: 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    out = R.holm([0.04, np.nan, 0.01, 0.02])
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[2, 3, 0]], [0.03, 0.04, 0.04])


def test_explanation_checks_compare_observed_with_predicted_direction():
    s = _summary(single_mean_abs_dl=lambda r: 1.0 / r.top_k + 0.001 * r.seed,
                 control_mean_dz=lambda r: 0.1 * math.log2(r.top_k) + 0.01 * r.seed,
                 audit_valid_cells=lambda r: 0, deepest_mean_dl=lambda r: 0.2 * r.top_k + 0.01 * r.seed)
    c = R.explanation_checks(s, alpha=0.05).set_index("check")
    assert c.loc["single-expert effect shrinks with k", "observed"] == "falls"
    assert bool(c.loc["single-expert effect shrinks with k", "holds"]) is True
    assert c.loc["control signal shrinks with k", "observed"] == "grows"  # significant, the other way
    assert bool(c.loc["control signal shrinks with k", "holds"]) is False
    assert c.loc["observational validity shrinks with k", "observed"] == "untested"  # all zero: nothing to fit
    assert pd.isna(c.loc["observational validity shrinks with k", "holds"])
    assert pd.isna(c.loc["deepest-removal damage against k", "holds"])
    # Holm over the three fitted rows
    fitted = c.p.notna()
    np.testing.assert_allclose(c.p_holm[fitted], R.holm(c.p[fitted]))
    # a trend that is not detected is inconclusive, not a refutation
    noisy = s.assign(control_mean_dz=[0.05 + 0.04 * ((-1) ** i) for i in range(len(s))])
    n = R.explanation_checks(noisy).set_index("check").loc["control signal shrinks with k"]
    assert n.observed == "not detected" and pd.isna(n.holds)
    text = R.answer_text(s.assign(audit_max_abs_dz=0.1, control_valid_cells=0),
                         pd.DataFrame({"model": s.model, "ranking": "x", "cells": 4, "valid_cells": 0}),
                         R.setting_anova(s.assign(audit_max_abs_dz=0.1, gap_growth=1.0)), R.explanation_checks(s),
                         alpha=0.05, mde_audit=0.271, mde_control=0.238)
    assert text["validity"].startswith("**No valid cell is detected.**") and "d_z = 0.271 with 80% power" in text["validity"]
    assert "shrinks as k falls" in text["control"] and "d_z = 0.238" in text["control"]
    ex = text["explanation"]
    assert "a single-expert ablation changes the loss by less as top-k grows. *Observed:* the mean |ΔL| of a " \
           "single-expert ablation falls as top-k grows" in ex and ex.count("**Holds.**") == 1
    assert ex.count("**Contradicted.**") == 1 and "*Not testable here:* every model has the value 0" in ex
    assert "The data contradict the explanation where it predicts that the routing-weight control's signal" in ex


def test_model_summary_from_hand_records():
    m = R.member_table({"a": SimpleNamespace(num_experts=8, top_k=2), "b": SimpleNamespace(num_experts=64, top_k=8)},
                       seeds={"a": 0, "b": 0})
    audit = pd.DataFrame({"model": ["a", "a", "b"], "ranking": "x", "layer": [0, 1, 0], "cohens_dz": [0.5, -0.7, 0.1],
                          "sig_dual_bonf": [True, False, False]})
    control = pd.DataFrame({"model": ["a", "a", "b"], "ranking": "w", "layer": [0, 1, 0], "cohens_dz": [0.2, 0.4, 0.3],
                            "sig_dual_bonf": [True, True, False]})
    single = pd.DataFrame({"model": ["a", "a", "b", "b"], "layer": [0, 1, 0, 0], "delta_loss": [-1.0, 3.0, 0.5, 0.5],
                           "gap_norm": [1.0, 4.0, 2.0, 2.0]})
    prog = pd.DataFrame({"model": ["a", "b", "b", "b"], "k": [1, 1, 7, 7], "delta_loss": [0.3, 9.0, 1.0, 2.0]})
    s = R.model_summary(m, audit=audit, control=control, single=single, progressive=prog).set_index("model")
    assert s.loc["a", "audit_max_abs_dz"] == pytest.approx(0.7) and s.loc["a", "audit_valid_cells"] == 1
    assert s.loc["a", "control_mean_dz"] == pytest.approx(0.3) and s.loc["a", "control_valid_cells"] == 2
    assert s.loc["a", "single_mean_abs_dl"] == pytest.approx(2.0) and s.loc["a", "gap_growth"] == pytest.approx(4.0)
    assert s.loc["b", "deepest_mean_dl"] == pytest.approx(1.5)  # k = 7 only
    with pytest.raises(KeyError, match="progressive"):
        R.model_summary(m, audit=audit, control=control, single=single, progressive=prog[prog.model == "a"])


# ----------------------------------------------------------------------------- the shipped family
def test_family_names_specs_and_budget():
    assert len(REDUNDANCY_MODELS) == len(REDUNDANCY_SETTINGS) * len(REDUNDANCY_SEEDS)
    assert set(SHIPPED_MODELS) == set(ZOO_MODELS) | set(REDUNDANCY_MODELS)
    base = SPECS["tiny-olmoe"]["config"]
    total_mb = 0.0
    for name in REDUNDANCY_MODELS:
        spec = SPECS[name]
        E, k, seed = spec["config"]["num_experts"], spec["config"]["num_experts_per_tok"], spec["seed"]
        assert name == f"olmoe-e{E}-k{k}-s{seed}"
        # everything but the routing equals the default OLMoE stand-in's recipe, at 4 layers
        same = {key: v for key, v in spec["config"].items() if key not in ("num_experts", "num_experts_per_tok",
                                                                          "num_hidden_layers")}
        assert same == {key: v for key, v in base.items() if key not in ("num_experts", "num_experts_per_tok")}
        assert spec["config"]["num_hidden_layers"] == 4 and spec["class"] == "OlmoeForCausalLM"
        if seed == REDUNDANCY_SEEDS[0]:
            total_mb += count_parameters(build_model(name))["total"] * 2 / 2**20  # bfloat16 on disk
    assert total_mb * len(REDUNDANCY_SEEDS) <= 50


def test_default_models_have_eight_layers():
    for name in ZOO_MODELS:
        model = build_model(name)
        assert model.config.num_hidden_layers == 8
        assert count_parameters(model)["total"] * 2 / 2**20 <= 10  # bfloat16 on disk


def test_checks_without_enough_models_are_reported_untested():
    s = _summary(single_mean_abs_dl=lambda r: 1.0, control_mean_dz=lambda r: 0.1, audit_valid_cells=lambda r: 0,
                 deepest_mean_dl=lambda r: 0.2, audit_max_abs_dz=lambda r: 0.1, control_valid_cells=lambda r: 0,
                 gap_growth=lambda r: 1.0)
    two = s[s.model.isin(["m-e64-k2-s0", "m-e64-k8-s0"])]
    c = R.explanation_checks(two)
    assert (c.observed == "untested").all() and c.holds.isna().all() and c.reason.str.contains("three models").all()
    anova = R.setting_anova(two)
    assert anova[["F", "p", "ratio", "eta_sq", "p_holm"]].isna().all().all()  # one model per setting
    text = R.answer_text(two, pd.DataFrame({"model": two.model, "ranking": "x", "cells": 4, "valid_cells": 0}),
                         anova, c, alpha=0.05)
    assert "No trend can be fitted" in text["control"]
    assert text["explanation"].count("*Not testable here:*") == 3 and "No prediction could be decided" in text["explanation"]
    assert "no spread between models of one setting" in text["seeds"]
