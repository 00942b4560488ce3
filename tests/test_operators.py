"""The interventions of ``engine.OPERATORS`` on hand-built inputs: the router-logit mask, the
per-expert output sums of the mean operator, and the refusals before any forward. The contract on
every audited family is in ``tests/test_contract.py``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import moeaudit.models  # noqa: F401  (imports nnsight first)
from moeaudit import engine


def test_operators_constant_and_check():
    assert engine.OPERATORS == ("remove", "mask", "mean")
    for op in engine.OPERATORS:
        assert engine.check_operator(op) == op
    with pytest.raises(ValueError, match=r"operator='drop'.*\['remove', 'mask', 'mean'\]"):
        engine.check_operator("drop")


class _ToyRouter(torch.nn.Module):
    """Softmax-then-top-2 without renormalisation over 3 experts, with a second 3-column linear after
    the logits (which the mask must leave alone)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))

    def forward(self, x):
        logits = torch.nn.functional.linear(x, self.weight)
        later = torch.nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1)
        w, idx = torch.topk(probs, 2, dim=-1)
        return logits, w, idx, later


def test_router_logit_mask_by_hand():
    router = _ToyRouter()
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # logits (1, 2, 3) in both rows
    mask = torch.tensor([[False, False, True], [False, False, False]])  # mask expert 2 in row 0 only
    mode = engine._RouterLogitMask(mask, 3)
    with torch.no_grad(), mode:
        logits, w, idx, later = router(x)
    # row 0: softmax over (1, 2, -inf) = (1, e) / (1 + e): expert 1 then expert 0, weights renormalised by the mask
    e = np.e
    assert idx[0].tolist() == [1, 0] and np.allclose(w[0].numpy(), [e / (1 + e), 1 / (1 + e)])
    assert logits[0, 2] == float("-inf") and later[0, 2] == 3.0  # only the first linear is masked
    # row 1 untouched: softmax(1, 2, 3), top-2 = experts 2, 1
    z = 1 + e + e ** 2
    assert idx[1].tolist() == [2, 1] and np.allclose(w[1].numpy(), [e ** 2 / z, e / z])


def test_accumulate_expert_sums_by_hand():
    sums, counts = np.zeros((3, 2)), np.zeros(3, dtype=np.int64)
    idx = np.array([[0, 2], [2, 1]])
    out = np.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    engine.accumulate_expert_sums(sums, counts, idx, out)
    assert counts.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(sums, [[1.0, 2.0], [7.0, 8.0], [8.0, 10.0]])  # expert 2: (3,4) + (5,6)
    engine.accumulate_expert_sums(sums, counts, np.array([[0, 1]]), np.array([[[1.0, 1.0], [0.0, 0.0]]]))
    assert counts.tolist() == [2, 2, 2] and sums[0].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="disagree"):
        engine.accumulate_expert_sums(sums, counts, idx, out[:, :1])


def test_expert_means_tensor_and_missing_layer():
    m = engine.ExpertMeans("toy", {3: np.array([[1.0, 2.0], [np.nan, np.nan]])}, {3: np.array([4, 0])})
    assert m.tensor(3).dtype == torch.float32 and m.tensor(3)[0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="layer=5 has no mean expert outputs"):
        m.tensor(5)


def test_bad_operator_refused_before_any_model_runs():
    req = pd.DataFrame([{"seq_id": 0, "t": 0, "layer": 0, "removed": [0]}])
    with pytest.raises(ValueError, match="valid operators are"):
        engine.run_ablations(None, None, None, req, operator="prune")  # the model is never touched
    with pytest.raises(ValueError, match="needed by operator='mean'"):
        engine.run_ablations(None, None, None, req, operator="mean")
    with pytest.raises(ValueError, match="needed by operator='mean'"):
        engine.run_ablations(None, None, None, req, operator="mask", means=engine.ExpertMeans("x", {}, {}))
    with pytest.raises(ValueError, match="applies to operator='remove' only"):
        engine.run_ablations(None, None, None, req, operator="mask", scale=0.5)
    with pytest.raises(ValueError, match="valid operators are"):
        engine.trace_ablation(None, [1, 2, 3], layer=0, experts=[0], t=0, operator="zero")


def test_mean_operator_refuses_an_expert_without_a_mean():
    from moeaudit.tooling.testing import random_token_corpus, tiny_random_model

    model = tiny_random_model("olmoe")
    corpus = random_token_corpus(n_seqs=1, length=8, seed=3)
    clean = engine.clean_pass(model, corpus, progress=False)
    L = model.layout.moe_layers[0]
    e = int(clean.active(0, 2, L)[0])
    means = engine.expert_mean_outputs(model, corpus, layers=[L])
    means.counts[L][e] = 0
    req = pd.DataFrame([{"seq_id": 0, "t": 2, "layer": L, "removed": [e]}])
    with pytest.raises(ValueError, match=rf"expert\(s\) \[{e}\] of layer {L} were never routed"):
        engine.run_ablations(model, corpus, clean, req, operator="mean", means=means, progress=False)
    with pytest.raises(ValueError, match="seq_ids must be a non-empty selection"):
        engine.expert_mean_outputs(model, corpus, seq_ids=[5])
