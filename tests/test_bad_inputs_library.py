"""Bad inputs to the library that used to pass silently, fail late or fail unclearly.

Each case is a value a user can pass (or data a run can produce); each test states what it gets
now: a refusal naming the argument before any work, or a statistics row that says why it is
untested instead of a number that measures nothing.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from moeaudit import audit, report, stats
from moeaudit.tooling import params
from moeaudit.corpus import integer_ids
from moeaudit.tooling.testing import random_token_corpus, tiny_audit_context

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------- ids
@pytest.mark.parametrize("bad", ["12", [1.7], [True], ["1"], 3])
def test_integer_ids_refuse_what_would_be_coerced(bad):
    with pytest.raises(TypeError, match="ids"):
        integer_ids(bad, "seq_ids")
    corpus = random_token_corpus(n_seqs=3, length=10, seed=1)
    with pytest.raises(TypeError):
        corpus.padded(bad)


def test_integer_ids_keep_numpy_integers():
    assert integer_ids(np.array([2, 0]), "x") == [2, 0] and integer_ids(range(3), "x") == [0, 1, 2]


def test_padded_length_must_be_an_integer():
    corpus = random_token_corpus(n_seqs=2, length=10, seed=1)
    for bad in (True, 0, 2.5):
        with pytest.raises(ValueError, match="length must be an integer"):
            corpus.padded([0], length=bad)


# ----------------------------------------------------------------------------------- statistics
def test_differences_equal_up_to_rounding_are_untested():
    """Float32 losses whose differences are all 0.1 up to rounding: sd(D) ~ 1e-8, which would give
    d_z ~ 1e6 and p ~ 1e-180; the cell is reported as untested instead."""
    rng = np.random.default_rng(0)
    low = rng.normal(1.0, 0.2, 30).astype(np.float32)
    high = (low + np.float32(0.1)).astype(np.float32)
    row = stats.paired_effect(high.astype(np.float64), low.astype(np.float64), precision="float32").iloc[0]
    assert 0 < np.std(high.astype(np.float64) - low, ddof=1) < 1e-7
    assert "equal up to float32 rounding" in row.reason and np.isnan(row.cohens_dz) and not row.sig_dual
    # a real spread just above the rounding bound is tested
    ok = stats.paired_effect(high + rng.normal(0, 1e-3, 30), low).iloc[0]
    assert ok.reason == "" and np.isfinite(ok.cohens_dz)


def test_overflowing_difference_is_untested():
    row = stats.paired_effect(np.array([1e308, 1.0, 2.0]), np.array([-1e308, 0.0, 0.5])).iloc[0]
    assert "overflows" in row.reason and not row.sig_t
    assert len(stats.untested_cells(stats.audit_table(pd.DataFrame(
        {"m": ["a"] * 3, "delta_high": [1e308, 1.0, 2.0], "delta_low": [-1e308, 0.0, 0.5]}), by=("m",),
        family=None))) == 1


def test_dz_difference_ci_on_heavily_tied_data_is_nan_not_fatal():
    rng = np.random.default_rng(0)
    lo, hi = stats.dz_difference_ci([0.0] * 19 + [1.0], rng.normal(size=20), n_boot=200)
    assert np.isnan(lo) and np.isnan(hi)


def test_bayes_factor_of_an_overwhelming_effect_is_infinite_and_prior_scale_is_bounded():
    d = np.linspace(1.0, 1.0 + 1e-3, 200)  # t of several thousand
    assert stats.jzs_bayes_factor(d) == float("inf")
    with pytest.raises(ValueError, match="r must be in"):
        stats.jzs_bayes_factor(np.arange(5.0), r=1e300)


def test_spearman_says_why_its_interval_is_missing():
    row = stats.spearman([1.0, 2, 3, 4, 5], [2.0, 4, 6, 8, 10], n_boot=200).iloc[0]
    assert row.rho == pytest.approx(1.0)
    assert np.isnan(row.ci_low) and "bootstrap interval is undefined" in row.reason
    fine = stats.spearman(np.arange(30.0), np.arange(30.0) % 7, n_boot=200).iloc[0]
    assert np.isfinite(fine.ci_low) and fine.reason == ""


def test_power_at_or_below_the_level_needs_no_effect():
    assert stats.min_detectable_dz(30, alpha=0.01, power=0.01) == 0.0
    assert stats.min_detectable_dz(30, alpha=0.01, power=0.005) == 0.0
    assert stats.min_detectable_dz(30, alpha=0.01, power=0.8) > 0


def _table(family):
    rng = np.random.default_rng(1)
    rows = [{"model": m, "layer": L, "metric": "x", "delta_high": rng.normal(0.1), "delta_low": rng.normal()}
            for m, layers in (("A", 3), ("B", 2)) for L in range(layers) for _ in range(20)]
    return stats.audit_table(pd.DataFrame(rows), by=("model", "layer", "metric"), family=family)


def test_family_verdicts_refuse_groups_that_are_not_the_families():
    assert stats.family_verdicts(_table(("model",))).cells.tolist() == [3, 2]
    for fam in (("model", "layer"), None):
        with pytest.raises(ValueError, match="not its 'model' groups"):
            stats.family_verdicts(_table(fam))


def test_audit_table_refuses_unnamed_cells():
    df = pd.DataFrame({"model": ["a", None, "a"], "delta_high": [1.0, 2, 3], "delta_low": [0.0, 1, 1]})
    with pytest.raises(ValueError, match="missing values in the cell columns"):
        stats.audit_table(df, by=("model",))


# ----------------------------------------------------------------------------------- texts
def test_texts_on_empty_or_undefined_inputs():
    empty = pd.DataFrame(columns=["removed_routed", "n_removed", "clean_routing_match", "premise_ok"])
    assert audit.premise_phrase(empty) == "there are no records to check"
    s = {"matched": 5, "max_abs_diff": 0.1, "median_abs_diff": 0.05, "sign_flips": float("nan"),
         "premise_failed_kv": 0, "premise_failed_full": 0}
    text = report.strategy_spread_text({"m": s}, "bfloat16")
    assert "nan" not in text and "no two non-zero effects to compare signs" in text


# ----------------------------------------------------------------------------------- records
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return tiny_audit_context(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("kw,match", [
    ({"seq_per_chunk": 0}, "seq_per_chunk must be an integer >= 1"),
    ({"seq_per_chunk": -1}, "seq_per_chunk must be an integer >= 1"),
    ({"seq_per_chunk": True}, "seq_per_chunk must be an integer >= 1"),
    ({"layers": []}, "layers is empty"),
    ({"layers": [1, 1]}, "repeats a layer"),
    ({"layers": [7]}, "not an MoE layer"),
])
def test_single_expert_records_refuse_bad_arguments(ctx, kw, match):
    from moeaudit.audit import single_expert_records

    args = {"layers": [1], "n_positions": 4, "seed": 0, **kw}
    with pytest.raises(ValueError, match=match):
        single_expert_records(ctx, **args, progress=False)


def test_single_expert_records_refuse_bool_layers_and_ignore_layer_order(ctx):
    from moeaudit.audit import single_expert_records

    with pytest.raises(TypeError, match="layers"):
        single_expert_records(ctx, layers=[True], n_positions=4, seed=0, progress=False)
    a = single_expert_records(ctx, layers=[2, 1], n_positions=4, seed=0, progress=False)
    b = single_expert_records(ctx, layers=[1, 2], n_positions=4, seed=0, progress=False)
    pd.testing.assert_frame_equal(a, b)


def test_pruned_perplexities_check_every_plan_before_work(ctx, monkeypatch):
    from moeaudit import audit

    calls = []
    monkeypatch.setattr(audit, "perplexity", lambda *a, **k: calls.append(1) or {"mean_loss": 1.0, "n_tokens": 1})
    with pytest.raises(ValueError, match="plans is empty"):
        audit.pruned_perplexities(ctx, [], ctx.corpus, progress=False)
    with pytest.raises(ValueError, match="plans_per_chunk"):
        audit.pruned_perplexities(ctx, [{}], ctx.corpus, plans_per_chunk=0, progress=False)
    with pytest.raises(TypeError, match=r"plans\[1\]"):
        audit.pruned_perplexities(ctx, [{}, {1: "12"}], ctx.corpus, progress=False)
    with pytest.raises(ValueError, match=r"plans\[2\] prunes"):
        audit.pruned_perplexities(ctx, [{}, {1: [0]}, {1: [0, 1, 2, 3, 4, 5]}], ctx.corpus, plans_per_chunk=1,
                                  progress=False)
    assert calls == []  # nothing was evaluated before the bad plan was found


# ----------------------------------------------------------------------------------- chapter parameters
def _refusal(stem, **given):
    from moeaudit.tooling.book import notebook_parameters

    with pytest.raises(params.ParameterError) as err:
        params.validate(stem, {**notebook_parameters(stem), **given})
    return str(err.value)


def test_schema_refuses_values_that_failed_late(tmp_path):
    assert "seed=" in _refusal("04_audit", seed=2 ** 63)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert "is a file" in _refusal("04_audit", results_dir=str(a_file / "sub"))
    assert "bf_prior_r=" in _refusal("10_predictors_and_pruning", bf_prior_r=1e300)
    assert stats.MAX_PRIOR_R == 10.0  # the schema's bound is the library's


def test_cuda_device_is_refused_where_torch_sees_none():
    import torch

    from moeaudit.tooling.book import _check_device

    _check_device("04_audit", "cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(params.ParameterError, match="no CUDA device"):
        _check_device("04_audit", "cuda")


# ----------------------------------------------------------------------------------- the cache key of a model
def test_fingerprint_sees_every_weight_change_but_not_the_location(tmp_path):
    """Swapping two experts keeps every tensor's shape and sum: the fingerprint must still change
    (it keys cached clean passes and records). Saving the same weights elsewhere keeps it."""
    import torch

    from moeaudit.audit import model_fingerprint
    from moeaudit.models import load_model
    from moeaudit.tooling.testing import save_tiny_checkpoint, tiny_random_model

    m = tiny_random_model("olmoe", seed=3)
    save_tiny_checkpoint(m, tmp_path / "a")
    save_tiny_checkpoint(m, tmp_path / "b")
    a, b = load_model(str(tmp_path / "a")), load_model(str(tmp_path / "b"))
    assert model_fingerprint(a) == model_fingerprint(b)
    ex = b.hf.model.layers[1].mlp.experts
    with torch.no_grad():
        ex.gate_up_proj[[0, 1]] = ex.gate_up_proj[[1, 0]].clone()
        ex.down_proj[[0, 1]] = ex.down_proj[[1, 0]].clone()
    assert float(ex.gate_up_proj.sum()) == pytest.approx(float(a.hf.model.layers[1].mlp.experts.gate_up_proj.sum()))
    assert model_fingerprint(a) != model_fingerprint(b)
