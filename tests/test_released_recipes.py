"""The released scripts' recipes for the observational metrics, and the helpers of the chapter
"Beyond the paper (1)", checked on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit import paper
from moeaudit.chapters import definitions
from moeaudit import stats as S

# three positions, four experts, top-2; the 2nd-largest logits are 3, 2 and 1
HAND = np.array([[4.0, 3.0, 1.0, 0.0],
                 [0.0, 1.0, 2.0, 5.0],
                 [1.0, 1.5, 0.5, 0.2]])


def released_loop(logits, top_k):
    """The released recipe step by step: for each token its top_k-th largest logit, OR-ed into the mask."""
    logits = np.asarray(logits, dtype=np.float64)
    values = []
    for e in range(logits.shape[1]):
        col = logits[:, e]
        mask = np.zeros(len(col), dtype=bool)
        for token in logits:
            mask |= col >= np.sort(token)[-top_k]
        values.append(col[mask].mean() if mask.any() else 0.0)
    return np.array(values)


def test_threshold_and_values_by_hand():
    assert paper.released_active_threshold(HAND, top_k=2) == 1.0
    values, thr = paper.released_mean_routing_weight_when_active(HAND, top_k=2)
    assert thr == 1.0
    np.testing.assert_allclose(values, [2.5, 5.5 / 3, 1.5, 5.0])
    mask = paper.released_active_mask(HAND, top_k=2)
    np.testing.assert_array_equal(mask.mean(axis=0), [2 / 3, 1.0, 2 / 3, 1 / 3])


def test_equals_the_step_by_step_loop_on_random_logits():
    rng = np.random.default_rng(3)
    for n, e, k in ((50, 8, 2), (200, 16, 4), (7, 5, 5), (30, 6, 1)):
        lg = rng.normal(size=(n, e))
        values, _ = paper.released_mean_routing_weight_when_active(lg, top_k=k)
        np.testing.assert_allclose(values, released_loop(lg, k), rtol=1e-12)


def test_admitted_share_is_what_the_threshold_implies():
    rng = np.random.default_rng(0)
    lg = rng.normal(size=(400, 16)) + rng.normal(size=(1, 16))
    k = 4
    thr = paper.released_active_threshold(lg, top_k=k)
    mask = paper.released_active_mask(lg, top_k=k)
    np.testing.assert_array_equal(mask.mean(axis=0), (lg >= thr).mean(axis=0))
    own_topk = np.zeros_like(mask)
    np.put_along_axis(own_topk, np.argsort(-lg, axis=1)[:, :k], True, axis=1)
    assert (mask | own_topk).sum() == mask.sum()  # every position's own top-k is admitted
    assert mask.mean() > k / lg.shape[1]           # and more: the loosest cut-off applies to every position


def test_an_expert_never_admitted_gets_the_released_fallback_zero():
    lg = np.array([[5.0, 0.0, -100.0], [0.0, 5.0, -100.0]])
    values, thr = paper.released_mean_routing_weight_when_active(lg, top_k=1)
    assert thr == 5.0
    np.testing.assert_array_equal(values, [5.0, 5.0, 0.0])


@pytest.mark.parametrize("bad, k", [(np.zeros(4), 1), (np.zeros((3, 4)), 0), (np.zeros((3, 4)), 5), (np.zeros((0, 4)), 1)])
def test_bad_inputs_are_refused(bad, k):
    with pytest.raises(ValueError):
        paper.released_mean_routing_weight_when_active(bad, top_k=k)


def test_per_expert_aggregate_by_hand():
    idx = np.array([[0, 1], [1, 2], [0, 2]])
    vals = np.array([[1.0, 2.0], [4.0, 6.0], [3.0, 10.0]])
    rows = np.array([True, True, False])
    np.testing.assert_allclose(definitions.per_expert_aggregate(idx, vals, rows, num_experts=4, how="mean"), [1.0, 3.0, 6.0, np.nan])
    np.testing.assert_allclose(definitions.per_expert_aggregate(idx, vals, np.ones(3, bool), num_experts=4, how="std"),
                               [np.std([1, 3], ddof=1), np.std([2, 4], ddof=1), np.std([6, 10], ddof=1), np.nan])
    coords = np.arange(12, dtype=float).reshape(3, 2, 2)  # (N, k, c)
    pooled = definitions.per_expert_aggregate(idx, coords, rows, num_experts=3, how="pooled_std")
    assert pooled[1] == pytest.approx(np.std([2, 3, 4, 5], ddof=1))
    with pytest.raises(ValueError):
        definitions.per_expert_aggregate(idx, vals, rows, num_experts=3, how="median")


def _hand_padded():
    """Two texts of width 3; text 1 has one padding position (row 5)."""
    idx = np.array([[0, 1], [0, 2], [1, 2], [0, 1], [2, 1], [2, 0]])
    logits = np.array([[3, 2, 0], [3, 0, 2], [0, 3, 2], [3, 2, 0], [0, 2, 3], [2, 0, 3]], dtype=float)
    ones = np.ones((6, 2))
    layer = {"logits": logits, "idx": idx, "prob": ones / 2, "norm": ones, "coords": np.ones((6, 2, 1))}
    return definitions.PaddedPass(layers={0: layer}, real=np.array([1, 1, 1, 1, 1, 0], bool),
                        seq_ids=np.array([0, 0, 0, 1, 1, 1]), num_experts=3, top_k=2)


def test_recipe_tables_by_hand():
    p = _hand_padded()
    assert p.padding_share == pytest.approx(1 / 6)
    t = definitions.recipe_metric_tables(p)
    # paper: share of the 5 real positions selecting each expert; DeepSeek: of all 6 positions
    np.testing.assert_allclose(t[paper.PAPER_RECIPE].utilization_rate, [3 / 5, 4 / 5, 3 / 5])
    np.testing.assert_allclose(t["DeepSeek script"].utilization_rate, [4 / 6, 4 / 6, 4 / 6])
    np.testing.assert_allclose(t["Qwen script"].utilization_rate, np.array([3, 4, 3]) / (2 * 5))
    np.testing.assert_allclose(t["OLMoE script"].utilization_rate, p.layers[0]["logits"].mean(axis=0))
    np.testing.assert_allclose(t["OLMoE script"].mean_routing_weight,
                               paper.released_mean_routing_weight_when_active(p.layers[0]["logits"], top_k=2)[0])
    agree = definitions.recipe_rank_agreement(t)
    row = agree[(agree.recipe == "Qwen script") & (agree.metric == "utilization_rate")].iloc[0]
    assert row.rho == pytest.approx(1.0) and row.experts == 3
    with pytest.raises(ValueError, match="unknown recipe"):
        definitions.recipe_metric_tables(p, recipes=["Mixtral script"])


def test_padded_pass_recomputes_the_clean_metrics(model_cache, corpus, clean_cache, single_thread):
    """The paper's definitions from the padded pass equal the observational metrics of the clean pass."""
    from moeaudit.metrics import METRICS, observational_metrics

    model = model_cache("olmoe")
    layers = list(model.layout.moe_layers)
    p = definitions.padded_router_pass(model, corpus, layers=layers, texts_per_batch=2)
    assert p.real.sum() == corpus.lengths.sum()
    recipe = definitions.recipe_metric_tables(p)[paper.PAPER_RECIPE].set_index(["layer", "expert"])
    ref = observational_metrics(clean_cache("olmoe"), num_experts=model.layout.num_experts, layers=layers)
    ref = ref.set_index(["layer", "expert"]).loc[recipe.index]
    np.testing.assert_allclose(recipe[list(METRICS)].to_numpy(), ref[list(METRICS)].to_numpy(), rtol=1e-4, atol=1e-6)


def _records(delta, clean, layer=0):
    n = len(delta)
    return pd.DataFrame({"seq_id": 0, "t": np.arange(n), "layer": layer, "expert": 1,
                         "delta_loss": delta, "clean_loss": clean})


def test_ablation_agreement_by_hand():
    a = pd.concat([_records([0.1, -0.2, 0.3], [2.0, 2.0, 2.0]), _records([0.5, 0.1, 0.2], [1.0, 1.0, 1.0], layer=3)])
    b = pd.concat([_records([0.1, -0.1, 0.0], [2.0, 2.0, 2.001]), _records([0.5, 0.1, 0.2], [1.0, 1.0, 1.0], layer=3)])
    ag = definitions.ablation_agreement(a, b, last_layer=3).set_index("layer")
    assert ag.loc[0, "max_diff"] == pytest.approx(0.3) and ag.loc[0, "median_diff"] == pytest.approx(0.1)
    assert ag.loc[3, "max_diff"] == 0 and bool(ag.loc[3, "last"]) and not bool(ag.loc[0, "last"])
    assert ag.loc[0, "floor"] == pytest.approx(0.001)
    assert ag.loc[0, "median_abs_a"] == pytest.approx(0.2) and ag.loc[0, "median_abs_b"] == pytest.approx(0.1)
    assert ag.loc[3, "rho"] == pytest.approx(1.0)


def _cells(diff, variant):
    n = len(diff)
    return pd.DataFrame({"model": "m", "variant": variant, "set": "metrics", "ranking": "activation_norm", "layer": 0,
                         "seq_id": 0, "t": np.arange(n), "diff": diff, "delta_loss_high": diff,
                         "delta_loss_low": np.zeros(n)})


def test_compare_audit_variants_finds_a_flip_and_no_change():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=200)
    cells = pd.concat([_cells(noise + 0.5, "a"), _cells(noise + 0.5, "same"), _cells(noise, "b")], ignore_index=True)
    table = S.audit_table(cells, by=("model", "variant", "set", "ranking", "layer"), high_col="delta_loss_high",
                          low_col="delta_loss_low", family=("model", "variant", "set"))
    same = definitions.compare_audit_variants(cells, table, "a", "same", n_boot=200)
    assert same.ddz.iloc[0] == 0 and (same.ddz_lo.iloc[0], same.ddz_hi.iloc[0]) == (0.0, 0.0)
    assert not same.flip_dual.iloc[0] and not same.ci_excludes_0.iloc[0]
    diff = definitions.compare_audit_variants(cells, table, "a", "b", n_boot=500)
    r = diff.iloc[0]
    assert r.dual_a and not r.dual_b and r.flip_dual and r.flip_p05 == (r.p05_a != r.p05_b)
    assert r.ddz == pytest.approx(S.cohens_dz(noise + 0.5) - S.cohens_dz(noise)) and r.ci_excludes_0
    summ = definitions.variant_flip_summary(pd.concat([same, diff]))
    assert summ.cells.iloc[0] == 2 and summ.flips_dual.iloc[0] == 1 and summ.ci_excluding_0.iloc[0] == 1


def test_precision_noise_and_top_expert_by_hand():
    key = {"seq_id": 0, "t": [0, 0, 1, 1], "layer": 0, "expert": [1, 2, 1, 2]}
    full = pd.DataFrame({**key, "delta_loss": [0.2, -0.1, 0.05, 0.3], "clean_loss": 2.0, "prob": [0.6, 0.4, 0.7, 0.3]})
    half = pd.DataFrame({**key, "delta_loss": [0.25, 0.1, 0.05, 0.3], "clean_loss": 2.01, "prob": [0.6, 0.4, 0.3, 0.7]})
    assert definitions.top_expert_raises_loss(full) == 1.0  # expert 1 at t=0 (+0.2) and t=1 (+0.05)
    m, s = definitions.precision_noise(full, half)
    np.testing.assert_allclose(m.err, [0.05, 0.2, 0.0, 0.0], atol=1e-12)
    assert s["sign_flips"] == 0.25 and s["matched"] == 4 and s["median_clean_diff"] == pytest.approx(0.01)
    assert s["median_err"] == pytest.approx(0.025) and s["median_abs_full"] == pytest.approx(0.15)


def test_float16_steps():
    np.testing.assert_array_equal(paper.float16_spacing([2.5, 1.0, -3.9, 0.75]), [2 ** -9, 2 ** -10, 2 ** -9, 2 ** -11])
    prog = pd.DataFrame({"layer": 0, "k": [1, 2], "median_delta": [0.0, 2 ** -9], "p25_delta": [-0.0274658203125, -0.1],
                         "p75_delta": [0.03125, 0.05], "share_positive": 0.5, "baseline_loss_mean": 2.5})
    st = paper.progressive_in_float16_steps(prog)
    assert st.step.tolist() == [2 ** -9, 2 ** -9]
    assert st.median_steps.tolist() == [0.0, 1.0] and st.p75_steps.iloc[0] == 16.0
    assert st.p25_steps.iloc[0] == pytest.approx(14.0625)
    assert st.n_on_2_16.tolist() == [3, 1]


def test_compare_audit_variants_ignores_an_interval_around_a_rounding_difference():
    # variant "tiny" differs from "a" by a shift of 1e-7 nats at every position: d_z moves by ~1e-7,
    # the paired bootstrap interval is then [+0.000, +0.000] and may exclude zero, but the point
    # difference is below DDZ_TOLERANCE, so it is not counted
    rng = np.random.default_rng(2)
    noise = rng.normal(size=200)
    cells = pd.concat([_cells(noise + 0.5, "a"), _cells(noise + 0.5 + 1e-7, "tiny")], ignore_index=True)
    table = S.audit_table(cells, by=("model", "variant", "set", "ranking", "layer"), high_col="delta_loss_high",
                          low_col="delta_loss_low", family=("model", "variant", "set"))
    r = definitions.compare_audit_variants(cells, table, "a", "tiny", n_boot=200).iloc[0]
    assert 0 < abs(r.ddz) < definitions.DDZ_TOLERANCE
    assert (r.ddz_lo > 0) or (r.ddz_hi < 0)  # the raw interval does exclude zero ...
    assert not r.ci_excludes_0  # ... but the difference is numerically zero
    assert definitions.variant_flip_summary(pd.DataFrame([r])).ci_excluding_0.iloc[0] == 0


def test_float16_steps_caveat_by_hand():
    out = definitions.float16_steps_caveat([0.001, -0.003, 0.005, 0.02], losses=(2.5, 4.0, 8.0)).set_index("loss")
    assert out.loc[2.5, "step"] == 2 ** -9 and out.loc[4.0, "step"] == 2 ** -8 and out.loc[8.0, "step"] == 2 ** -7
    assert list(out.n_within) == [1, 2, 3] and set(out.n) == {4}


def test_checkpoint_constants():
    assert set(paper.CHECKPOINT_HIDDEN_SIZE) == set(paper.LAYERS)
    assert 0 < definitions.RELEASED_OLMOE_PADDING_SHARE < 1 and 0 < definitions.DDZ_TOLERANCE < 1e-3
