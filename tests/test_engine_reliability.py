"""The engine cannot hand back a wrong number silently.

* Sliding-window attention (Mixtral, Qwen3-MoE: one windowed mask for every layer; Qwen2-MoE: one
  mask per layer type) is reproduced by the packed key/value step: ``strategy="kv"`` equals a
  plain-PyTorch hook reference (written here, the model's own masks) and ``strategy="full"``.
  Attention types the packed step does not build are refused naming ``strategy="full"``.
* Every ablation record proves its own premise: the removed experts were routed at t in the
  forward that removed them, and the batch's clean row routed as the clean pass did. A clean pass
  that disagrees with the model is caught in the record, not passed off as a zero effect.
* ``CleanPass`` accessors and ``TokenizedCorpus.padded`` check their indices (nothing wraps into a
  neighbouring sequence).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit import engine as E
from moeaudit.tooling.testing import random_token_corpus, tiny_random_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
WINDOW = 4


def _hook_reference(hf, seq, t, layer, removed):
    """Loss at t of the prefix x[:t+1] with ``removed`` experts' combine weights zeroed at row t of
    ``layer`` (plain forward hook on the router, the model's own attention masks)."""
    x = torch.as_tensor(np.asarray(seq[: t + 1]), dtype=torch.long).view(1, -1)

    def hook(_m, _i, out):
        logits, w, idx = out
        drop = torch.zeros_like(idx, dtype=torch.bool)
        for e in removed:
            drop[t] |= idx[t] == int(e)
        return logits, w.masked_fill(drop, 0.0), idx

    h = hf.model.layers[layer].mlp.gate.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = hf(input_ids=x).logits[0, t].float()
    finally:
        h.remove()
    return float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([int(seq[t + 1])])))


def _windowed(family):
    if family == "qwen2_moe":  # one mask per layer type: the first layer slides, the others attend fully
        return tiny_random_model(family, seed=1, sliding_window=WINDOW, use_sliding_window=True,
                                 layer_types=["sliding_attention", "full_attention", "full_attention"])
    return tiny_random_model(family, seed=1, sliding_window=WINDOW)


def _requests(clean, layers):
    n = clean.lengths
    rows = [(s, t, L, (int(clean.active(s, t, L)[0]),)) for s in range(len(n)) for t in (1, 3, 9, 12) if t < n[s] - 1
            for L in layers]
    return pd.DataFrame(rows, columns=["seq_id", "t", "layer", "removed"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_sliding_window_packed_steps_match_reference(family, attn):
    model = _windowed(family)
    model.hf.set_attn_implementation(attn)
    corpus = random_token_corpus(n_seqs=3, length=20, seed=3)
    assert E.attention_window(model) == (WINDOW, family == "qwen2_moe")
    clean = E.clean_pass(model, corpus, progress=False)
    req = _requests(clean, model.layout.moe_layers)
    kv = E.run_ablations(model, corpus, clean, req, strategy="kv", batch_size=7, seq_batch=2, progress=False)
    full = E.run_ablations(model, corpus, clean, req, strategy="full", progress=False)
    np.testing.assert_allclose(kv.delta_loss, full.delta_loss, atol=TOL, rtol=0)
    for rec in kv.itertuples():
        ref = _hook_reference(model.hf, corpus.sequences[rec.seq_id], rec.t, rec.layer, rec.removed)
        assert rec.ablated_loss == pytest.approx(ref, abs=TOL)
    # the window is doing something here: past it, the clean losses differ from unwindowed attention
    unwindowed = copy.deepcopy(model.hf)
    if family == "qwen2_moe":
        unwindowed.config.layer_types = ["full_attention"] * 3
    else:
        unwindowed.config.sliding_window = None
    with torch.no_grad():
        seq = torch.as_tensor(corpus.sequences[0]).view(1, -1)
        assert (model.hf(input_ids=seq).logits - unwindowed(input_ids=seq).logits).abs().max() > 1e-3


def test_unsupported_attention_type_is_refused_before_any_forward(monkeypatch):
    model = tiny_random_model("qwen2_moe", seed=1)
    corpus = random_token_corpus(n_seqs=2, length=12, seed=3)
    clean = E.clean_pass(model, corpus, progress=False)
    req = _requests(clean, model.layout.moe_layers[:1])
    model.hf.config.layer_types = ["linear_attention", "full_attention", "full_attention"]
    monkeypatch.setattr(E, "clean_cache", lambda *a, **k: pytest.fail("a forward ran before the refusal"))
    with pytest.raises(ValueError, match="strategy='full'"):
        E.run_ablations(model, corpus, clean, req, strategy="kv", progress=False)


# ------------------------------------------------------------------------------- the premise
@pytest.fixture(scope="module")
def olmoe():
    model = tiny_random_model("olmoe", seed=2, num_experts=8, top_k=3)
    corpus = random_token_corpus(n_seqs=3, length=16, seed=5)
    return model, corpus, E.clean_pass(model, corpus, progress=False)


@pytest.mark.parametrize("mode,strategy", [("token", "kv"), ("token", "full"), ("sequence", "full")])
def test_premise_holds_in_float32(olmoe, mode, strategy):
    model, corpus, clean = olmoe
    req = _requests(clean, model.layout.moe_layers)
    rec = E.run_ablations(model, corpus, clean, req, mode=mode, strategy=strategy, progress=False)
    assert rec.premise_ok.all() and (rec.removed_routed == rec.n_removed).all() and rec.clean_routing_match.all()
    assert (rec.strategy == ("full" if mode == "sequence" else strategy)).all()
    counts = E.premise_failures(rec)
    assert counts.n_failed.sum() == 0 and counts.n_records.sum() == len(rec)


@pytest.mark.parametrize("strategy", ["kv", "full"])
def test_premise_failure_is_recorded_not_hidden(olmoe, strategy):
    """A clean pass that says an expert was routed where the model does not route it (what a
    near-tie in reduced precision does): the record shows the failed premise and the counts say so."""
    model, corpus, clean = olmoe
    L, s, t = model.layout.moe_layers[1], 1, 6
    routed = set(clean.active(s, t, L).tolist())
    stranger = next(e for e in range(model.layout.num_experts) if e not in routed)
    wrong = copy.deepcopy(clean)
    wrong.routing[L]["indices"][clean.row(s, t)][0] = stranger  # the clean pass now claims `stranger` is routed
    req = pd.DataFrame({"seq_id": [s, s, 0], "t": [t, t, t], "layer": [L, L, L],
                        "removed": [(stranger,), (int(clean.active(s, t, L)[1]),), (int(clean.active(0, t, L)[0]),)]})
    rec = E.run_ablations(model, corpus, wrong, req, strategy=strategy, progress=False)
    assert rec.removed_routed.tolist() == [0, 1, 1]
    assert rec.clean_routing_match.tolist() == [False, False, True]
    assert rec.premise_ok.tolist() == [False, False, True]
    assert rec.delta_loss.iloc[0] == 0.0  # the no-op that the premise column exposes
    counts = E.premise_failures(rec, by=("layer",))
    assert counts.n_failed.tolist() == [2] and counts.n_not_routed.tolist() == [1]


def test_inactive_removal_fails_its_premise(olmoe):
    model, corpus, clean = olmoe
    L = model.layout.moe_layers[0]
    off = next(e for e in range(model.layout.num_experts) if e not in set(clean.active(0, 5, L).tolist()))
    req = pd.DataFrame({"seq_id": [0], "t": [5], "layer": [L], "removed": [(off,)]})
    rec = E.run_ablations(model, corpus, clean, req, require_active=False, progress=False)
    assert not rec.premise_ok.iloc[0] and rec.removed_routed.iloc[0] == 0 and rec.clean_routing_match.iloc[0]


def test_premise_failures_needs_the_columns(olmoe):
    with pytest.raises(ValueError, match="premise columns"):
        E.premise_failures(pd.DataFrame({"model": ["m"], "layer": [0]}))


def test_strategy_spread_by_hand():
    base = {"seq_id": [0, 0, 1], "t": [1, 2, 3], "layer": [0, 0, 0], "removed": [[1], [2], [3]]}
    kv = pd.DataFrame({**base, "delta_loss": [0.5, -0.1, 0.0], "premise_ok": [True, True, True]})
    full = pd.DataFrame({**base, "delta_loss": [0.25, 0.2, 0.1], "premise_ok": [True, False, True]})
    out = E.strategy_spread(kv, full)
    assert out["matched"] == 3
    assert out["max_abs_diff"] == pytest.approx(0.3) and out["median_abs_diff"] == pytest.approx(0.25)
    assert out["sign_flips"] == pytest.approx(0.5)  # of the two pairs with both deltas non-zero, one flips
    assert out["premise_failed_kv"] == 0 and out["premise_failed_full"] == 1
    with pytest.raises(ValueError, match="no ablation is matched"):
        E.strategy_spread(kv, full.assign(layer=1))


# ------------------------------------------------------------------------------- bounds
def test_clean_pass_accessors_check_bounds(olmoe):
    model, corpus, clean = olmoe
    L = model.layout.moe_layers[0]
    n0 = int(corpus.lengths[0])
    assert clean.row(1, 0) == n0  # the first token of sequence 1 ...
    with pytest.raises(IndexError, match=f"t={n0} is out of range for sequence 0"):
        clean.active(0, n0, L)  # ... is not reachable as token n0 of sequence 0
    for s, t in ((-1, 0), (3, 0), (0, -1)):
        with pytest.raises(IndexError, match="out of range"):
            clean.row(s, t)
    with pytest.raises(IndexError):
        clean.row(np.array([0, 1]), np.array([0, 99]))
    with pytest.raises(TypeError, match="integers"):
        clean.row(0, 1.5)
    with pytest.raises(ValueError, match="not recorded"):
        clean.routing_frame(99)
    assert (clean.lengths == corpus.lengths).all()


def test_padded_checks_sequence_ids():
    corpus = random_token_corpus(n_seqs=3, length=10, seed=1)
    with pytest.raises(IndexError, match="out of range"):
        corpus.padded([0, 3])
    with pytest.raises(IndexError, match="out of range"):
        corpus.padded([-1])  # no wrap-around to the last sequence
    with pytest.raises(ValueError, match="empty"):
        corpus.padded([])
    ids, mask = corpus.padded([2, 0])
    assert ids.shape[0] == 2 and mask.sum() == corpus.lengths[2] + corpus.lengths[0]


def test_pruning_criteria_check_their_selection(olmoe):
    from moeaudit.metrics import pruning_criteria

    model, _, clean = olmoe
    E_ = model.layout.num_experts
    assert len(pruning_criteria(clean, num_experts=E_, renormalize=False, seq_ids=range(2))) == E_ * len(clean.routing)
    for ids in ([0, 3], [-1], []):
        with pytest.raises(IndexError, match="text ids"):
            pruning_criteria(clean, num_experts=E_, renormalize=False, seq_ids=ids)
    with pytest.raises(ValueError, match="not recorded"):
        pruning_criteria(clean, num_experts=E_, renormalize=False, layers=[99])


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2"])
def test_a_sliding_window_key_the_family_ignores_is_ignored(family):
    """OLMoE and DeepSeek-V2 attention has no window: a ``sliding_window`` key in their config
    changes nothing in the model, so the packed step must not apply one either."""
    model = tiny_random_model(family, seed=1, sliding_window=WINDOW)
    assert E.attention_window(model) == (None, False)
    corpus = random_token_corpus(n_seqs=3, length=20, seed=3)
    clean = E.clean_pass(model, corpus, progress=False)
    req = _requests(clean, model.layout.moe_layers)
    kv = E.run_ablations(model, corpus, clean, req, strategy="kv", progress=False)
    full = E.run_ablations(model, corpus, clean, req, strategy="full", progress=False)
    np.testing.assert_allclose(kv.delta_loss, full.delta_loss, atol=TOL, rtol=0)
    rows = clean.row(kv.seq_id.to_numpy(), kv.t.to_numpy())
    np.testing.assert_allclose(kv.clean_loss, clean.tokens.loss.to_numpy()[rows], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("removed,error,match", [
    ([-1], ValueError, "outside"), ([99], ValueError, "outside"), ([7.9], TypeError, "integer ids"),
    ("7", TypeError, "integer ids"), ([True], TypeError, "integer ids"),
])
def test_removed_experts_must_be_ids_of_this_model(olmoe, removed, error, match):
    model, corpus, clean = olmoe
    req = pd.DataFrame({"seq_id": [0], "t": [3], "layer": [0], "removed": [removed]})
    with pytest.raises(error, match=match):
        E.run_ablations(model, corpus, clean, req, require_active=False, progress=False)


@pytest.mark.parametrize("col,value", [("seq_id", 1.0), ("t", 2.5), ("layer", True)])
def test_request_positions_must_be_integers(olmoe, col, value):
    model, corpus, clean = olmoe
    req = pd.DataFrame({"seq_id": [0], "t": [3], "layer": [0], "removed": [[int(clean.active(0, 3, 0)[0])]]})
    req[col] = [value]
    with pytest.raises(TypeError, match=f"column '{col}' must hold integers"):
        E.run_ablations(model, corpus, clean, req, progress=False)


@pytest.mark.parametrize("kw", [{"scale": 1.0}, {"scale": float("nan")}, {"scale": -5}, {"scale": "0"},
                                {"batch_size": 2.5}, {"seq_batch": True}])
def test_run_arguments_are_checked(olmoe, kw):
    model, corpus, clean = olmoe
    req = pd.DataFrame({"seq_id": [0], "t": [3], "layer": [0], "removed": [[int(clean.active(0, 3, 0)[0])]]})
    with pytest.raises(ValueError, match=next(iter(kw))):
        E.run_ablations(model, corpus, clean, req, progress=False, **kw)


@pytest.mark.parametrize("kw,error", [({"experts": [99]}, ValueError), ({"experts": [-1]}, ValueError),
                                      ({"experts": []}, ValueError), ({"layer": 1.0}, TypeError),
                                      ({"layer": True}, TypeError), ({"t": 2.5}, TypeError), ({"t": True}, TypeError)])
def test_trace_ablation_checks_its_arguments(olmoe, kw, error):
    model, corpus, _ = olmoe
    args = {"layer": 0, "experts": [1], "t": 2, **kw}
    with pytest.raises(error):
        E.trace_ablation(model, corpus.sequences[0], **args)
    with pytest.raises(TypeError, match="1-D sequence of integer"):
        E.trace_ablation(model, np.asarray(corpus.sequences[0], dtype=float), layer=0, experts=[1], t=2)


def test_clean_pass_layer_must_be_an_integer(olmoe):
    _, _, clean = olmoe
    for bad in (1.0, True):
        with pytest.raises(TypeError, match="layer must be an integer"):
            clean.active(0, 1, bad)
