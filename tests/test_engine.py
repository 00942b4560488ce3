"""Contract tests of the ablation engine, the corpus loader and the position sampler.

Every ablation result is checked against an independent plain-PyTorch reference written here
(no nnsight, no engine code): a forward hook on ``layers[L].mlp.gate`` zeroes the combine weight
of the removed experts on the chosen token rows and the prefix ``x[:t+1]`` is run with a plain
``hf(...)`` call. All five supported families are covered through tiny random models.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from moeaudit import engine as E
from moeaudit.corpus import TokenizedCorpus, load_wikitext2, sample_positions, valid_positions
from moeaudit.tooling.testing import tiny_random_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5


# ----------------------------------------------------------------------------------- reference
def _reference(hf, seq, t, layer=None, removed=(), mode="token"):
    """Plain-PyTorch ablation of ``removed`` experts at ``layer``.

    ``mode="token"``: only row ``t`` loses the experts; ``"sequence"``: every row ``<= t`` where
    they are routed. Returns (float32 CE loss at t, MoE output at t of ``layer`` or None,
    full logits (T, V), number of gate-hook calls).
    """
    x = torch.as_tensor(np.asarray(seq[: t + 1]), dtype=torch.long).view(1, -1)
    handles, calls, moe_out = [], [], {}
    if layer is not None:
        mlp = hf.model.layers[layer].mlp
        rows = [t] if mode == "token" else list(range(t + 1))

        def gate_hook(module, inputs, output):
            logits, weights, idx = output
            calls.append(1)
            if not removed:
                return None
            drop = torch.zeros_like(idx, dtype=torch.bool)
            for r in rows:
                for e in removed:
                    drop[r] |= idx[r] == int(e)
            return logits, weights.masked_fill(drop, 0.0), idx

        def mlp_hook(module, inputs, output):
            moe_out["y"] = output[0, t].detach().clone()

        handles.append(mlp.gate.register_forward_hook(gate_hook))
        handles.append(mlp.register_forward_hook(mlp_hook))
    try:
        with torch.no_grad():
            logits = hf(input_ids=x).logits[0]
    finally:
        for h in handles:
            h.remove()
    loss = F.cross_entropy(logits[t].float()[None], torch.tensor([int(seq[t + 1])])).item()
    return loss, moe_out.get("y"), logits, len(calls)


def _moe_input(hf, seq, layer):
    """(T, H) input of ``layers[layer].mlp`` on the unpadded sequence, and the gate output."""
    store = {}
    mlp = hf.model.layers[layer].mlp
    h1 = mlp.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0][0].detach().clone()))
    h2 = mlp.gate.register_forward_hook(lambda m, a, o: store.__setitem__("gate", tuple(v.detach().clone() for v in o)))
    try:
        with torch.no_grad():
            hf(input_ids=torch.as_tensor(np.asarray(seq), dtype=torch.long).view(1, -1))
    finally:
        h1.remove()
        h2.remove()
    return store["x"], store["gate"]


def _expert(experts, x, e):
    """E_e(x) from the fused weights: down_e(act(gate_e x) * up_e x)."""
    with torch.no_grad():
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _requests(clean, corpus, layers, *, ts=None):
    """Single (first slot, last slot) and multiple (all active) removals at several positions."""
    rows = []
    for L in layers:
        for s in range(len(corpus)):
            n = int(corpus.lengths[s])
            for t in (ts or (0, n // 2, n - 2)):
                act = [int(a) for a in clean.active(s, t, L)]
                rows += [(s, t, L, (act[0],)), (s, t, L, (act[-1],)), (s, t, L, tuple(act))]
    return pd.DataFrame(rows, columns=["seq_id", "t", "layer", "removed"])


def _run(model, corpus, clean, req, **kw):
    return E.run_ablations(model, corpus, clean, req, progress=False, **kw)


def _edge_layers(model):
    moe = model.layout.moe_layers
    return sorted({moe[0], moe[-1]})


# ------------------------------------------------------------------- ablation == reference
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_delta_loss_matches_plain_pytorch_reference(model, clean, corpus, mode):
    req = _requests(clean, corpus, _edge_layers(model))
    out = _run(model, corpus, clean, req, mode=mode)
    assert len(out) == len(req)
    assert list(out.seq_id) == list(req.seq_id) and list(out.t) == list(req.t)
    changed = 0
    for rec in out.itertuples():
        seq = corpus.sequences[rec.seq_id]
        base, _, _, n0 = _reference(model.hf, seq, rec.t, rec.layer, (), mode)
        abl, _, _, n1 = _reference(model.hf, seq, rec.t, rec.layer, rec.removed, mode)
        assert n0 == 1 and n1 == 1  # the reference hook really ran
        assert rec.clean_loss == pytest.approx(base, abs=TOL)
        assert rec.ablated_loss == pytest.approx(abl, abs=TOL)
        assert rec.delta_loss == pytest.approx(abl - base, abs=TOL)
        changed += abs(abl - base) > 1e-4
    assert changed > len(out) // 2  # the ablations do something, so equality is not vacuous


@pytest.fixture(scope="module")
def olmoe_top4(corpus):
    m = tiny_random_model("olmoe", top_k=4, seed=1)
    return m, E.clean_pass(m, corpus, progress=False)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_removing_a_subset_of_several_active_experts_matches_reference(olmoe_top4, corpus, mode):
    model, clean = olmoe_top4
    rows = []
    for s in range(len(corpus)):
        for t in (1, int(corpus.lengths[s]) - 2):
            act = [int(a) for a in clean.active(s, t, 1)]
            assert len(act) == 4
            rows += [(s, t, 1, (act[0], act[2])), (s, t, 1, (act[3], act[1], act[0]))]
    req = pd.DataFrame(rows, columns=["seq_id", "t", "layer", "removed"])
    out = _run(model, corpus, clean, req, mode=mode)
    for rec in out.itertuples():
        seq = corpus.sequences[rec.seq_id]
        base = _reference(model.hf, seq, rec.t, rec.layer, (), mode)[0]
        abl = _reference(model.hf, seq, rec.t, rec.layer, rec.removed, mode)[0]
        assert rec.delta_loss == pytest.approx(abl - base, abs=TOL)
        assert rec.n_removed == len(rec.removed)


def test_kv_strategy_equals_full_strategy_in_token_mode(model, clean, corpus):
    req = _requests(clean, corpus, list(model.layout.moe_layers))
    kv = _run(model, corpus, clean, req, mode="token", strategy="kv")
    full = _run(model, corpus, clean, req, mode="token", strategy="full")
    for col in ("clean_loss", "ablated_loss", "delta_loss", "gap_norm"):
        np.testing.assert_allclose(kv[col], full[col], atol=TOL, rtol=0, err_msg=col)
    # the clean loss of the cached single-token step is the clean pass's loss at (seq, t)
    rows = clean.row(kv.seq_id.to_numpy(), kv.t.to_numpy())
    np.testing.assert_allclose(kv.clean_loss, clean.tokens.loss.to_numpy()[rows], atol=TOL, rtol=0)


def test_skipping_the_clean_layers_matches_and_skips(model, clean, corpus):
    """Token-mode kv steps start at the ablated layer (the layers before it are not run, their
    clean outputs are read from the cache forward) and give the records of full steps."""
    req = _requests(clean, corpus, list(model.layout.moe_layers))
    skip = _run(model, corpus, clean, req, mode="token", strategy="kv", seq_batch=8)
    full = _run(model, corpus, clean, req, mode="token", strategy="kv", seq_batch=8, skip_clean_layers=False)
    for col in ("clean_loss", "ablated_loss", "delta_loss", "gap_norm"):
        np.testing.assert_allclose(skip[col], full[col], atol=TOL, rtol=0, err_msg=col)
    assert skip.premise_ok.all()
    # requests at the last MoE layer only: layer 0's attention runs once, in the cache forward
    # (a skipped module still calls its own pre-hooks, so count a submodule)
    later = req[req.layer == model.layout.moe_layers[-1]].reset_index(drop=True)
    counts = {}
    for flag in (True, False):
        calls = []
        handle = model.hf.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            _run(model, corpus, clean, later, mode="token", strategy="kv", seq_batch=8, skip_clean_layers=flag)
        finally:
            handle.remove()
        counts[flag] = len(calls)
    assert counts[True] == 1 and counts[False] > 1


@pytest.mark.parametrize("mode,strategy", [("token", "kv"), ("token", "full"), ("sequence", "full")])
def test_batched_equals_one_at_a_time(model, clean, corpus, mode, strategy):
    req = _requests(clean, corpus, [model.layout.moe_layers[-1]], ts=(0, 3, 9))
    big = _run(model, corpus, clean, req, mode=mode, strategy=strategy, batch_size=256, seq_batch=8)
    one = _run(model, corpus, clean, req, mode=mode, strategy=strategy, batch_size=2, seq_batch=1)
    for col in ("clean_loss", "ablated_loss", "delta_loss", "gap_norm"):
        np.testing.assert_allclose(big[col], one[col], atol=TOL, rtol=0, err_msg=col)


def _uneven_requests(clean, corpus, layer):
    """Positions per sequence 1, 3 and 2, so packed steps hold sequences with different row counts."""
    rows = []
    for s, ts in enumerate([(5,), (0, 8, 17), (2, 16)]):
        for t in ts:
            act = [int(a) for a in clean.active(s, t, layer)]
            rows += [(s, t, layer, (a,)) for a in act] + [(s, t, layer, tuple(act))]
    return pd.DataFrame(rows, columns=["seq_id", "t", "layer", "removed"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size,seq_batch", [(256, 3), (7, 3), (4, 2), (256, 1)])
def test_packed_kv_steps_match_reference(family, corpus, attn, batch_size, seq_batch):
    """Packed token-mode steps (rows of several positions as new tokens of their sequence's cache
    row, uneven row counts, steps holding only part of a chunk) equal the plain-PyTorch reference,
    with sdpa and with eager attention (where the mask is added to the scores)."""
    model = tiny_random_model(family)
    model.hf.set_attn_implementation(attn)
    clean = E.clean_pass(model, corpus, progress=False)
    layer = model.layout.moe_layers[0]
    req = _uneven_requests(clean, corpus, layer)
    out = _run(model, corpus, clean, req, mode="token", batch_size=batch_size, seq_batch=seq_batch)
    for rec in out.itertuples():
        seq = corpus.sequences[rec.seq_id]
        base = _reference(model.hf, seq, rec.t)[0]
        abl = _reference(model.hf, seq, rec.t, rec.layer, rec.removed)[0]
        assert rec.clean_loss == pytest.approx(base, abs=TOL)
        assert rec.ablated_loss == pytest.approx(abl, abs=TOL)


def test_packed_kv_refuses_flash_attention(ds):
    model, corpus, clean = ds
    req = _one(clean=clean)
    before = model.hf.config._attn_implementation
    model.hf.config._attn_implementation = "flash_attention_2"  # refused before any forward runs
    try:
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            _run(model, corpus, clean, req, mode="token", strategy="kv")
    finally:
        model.hf.config._attn_implementation = before


def test_sequence_mode_ignores_kv_strategy(model, clean, corpus):
    req = _requests(clean, corpus, [model.layout.moe_layers[0]], ts=(7,))
    a = _run(model, corpus, clean, req, mode="sequence", strategy="kv")
    b = _run(model, corpus, clean, req, mode="sequence", strategy="full")
    np.testing.assert_allclose(a.delta_loss, b.delta_loss, atol=TOL, rtol=0)


def test_gap_norm_is_weighted_expert_output_norm(model, clean, corpus):
    req = _requests(clean, corpus, _edge_layers(model))
    out = _run(model, corpus, clean, req, mode="token")
    cache = {}
    for rec in out.itertuples():
        key = (rec.seq_id, rec.layer)
        if key not in cache:
            cache[key] = _moe_input(model.hf, corpus.sequences[rec.seq_id], rec.layer)[0]
        x_t = cache[key][rec.t]
        experts = model.hf.model.layers[rec.layer].mlp.experts
        route = clean.routing[rec.layer]
        r = clean.row(rec.seq_id, rec.t)
        gap = torch.zeros_like(x_t)
        for e in rec.removed:
            slot = int(np.flatnonzero(route["indices"][r] == e)[0])
            gap += float(route["weight"][r, slot]) * _expert(experts, x_t, e)
        assert rec.gap_norm == pytest.approx(torch.linalg.vector_norm(gap).item(), rel=1e-4, abs=1e-6)
        # and it is the displacement of the MoE output at t in the plain reference
        seq = corpus.sequences[rec.seq_id]
        y = _reference(model.hf, seq, rec.t, rec.layer, (), "token")[1]
        y_abl = _reference(model.hf, seq, rec.t, rec.layer, rec.removed, "token")[1]
        assert rec.gap_norm == pytest.approx(torch.linalg.vector_norm(y - y_abl).item(), rel=1e-4, abs=1e-6)
        assert rec.removed_weights == pytest.approx(
            [float(route["weight"][r, np.flatnonzero(route["indices"][r] == e)[0]]) for e in rec.removed])


def test_fused_expert_formula_reconstructs_the_moe_output(model, corpus):
    """Sanity check of the test's own E_e(x): routed sum (+ shared experts) == MoE block output."""
    seq = corpus.sequences[0]
    for L in model.layout.moe_layers:
        mlp = model.hf.model.layers[L].mlp
        x, (_, w, idx) = _moe_input(model.hf, seq, L)
        routed = torch.stack([sum(w[n, j] * _expert(mlp.experts, x[n], int(idx[n, j])) for j in range(idx.shape[1]))
                              for n in range(x.shape[0])])
        with torch.no_grad():
            y = mlp(x[None])[0]
            if model.layout.family == "qwen2_moe":
                routed = routed + torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
            elif model.layout.family == "deepseek_v2":
                routed = routed + mlp.shared_experts(x)
        torch.testing.assert_close(routed, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_earlier_positions_untouched_only_in_token_mode(model, clean, corpus, mode):
    """Capture the final hidden states of the whole prefix the engine runs (hook on the last norm;
    the engine applies the LM head at t only) and project them to full-prefix logits."""
    L = model.layout.moe_layers[0]
    s, t = 0, int(corpus.lengths[0]) - 2
    earlier = clean.routing[L]["indices"][clean.row(0, np.arange(t))]
    e = next(int(a) for a in clean.active(s, t, L) if (earlier == a).any())  # also routed before t
    req = pd.DataFrame([(s, t, L, (e,))], columns=["seq_id", "t", "layer", "removed"])
    captured = []
    h = model.hf.model.norm.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
    try:  # every layer recomputed: one forward, whose whole prefix the hook sees
        _run(model, corpus, clean, req, mode=mode, strategy="full", skip_clean_layers=False)
    finally:
        h.remove()
    assert len(captured) == 1
    with torch.no_grad():
        logits = model.hf.lm_head(captured[0])
    assert logits.shape[:2] == (2, t + 1)  # one clean row and one ablated row
    clean_ref = _reference(model.hf, corpus.sequences[s], t)[2]
    abl_ref = _reference(model.hf, corpus.sequences[s], t, L, (e,), mode)[2]
    is_clean = [bool((row[t] - clean_ref[t]).abs().max() < 1e-5) for row in logits]
    assert sum(is_clean) == 1
    clean_i = is_clean.index(True)
    abl_row = logits[1 - clean_i]
    torch.testing.assert_close(logits[clean_i], clean_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(abl_row, abl_ref, atol=1e-5, rtol=0)
    assert (abl_row[t] - clean_ref[t]).abs().max() > 1e-4
    if mode == "token":
        torch.testing.assert_close(abl_row[:t], clean_ref[:t], atol=1e-6, rtol=0)
    else:
        assert (abl_row[:t] - clean_ref[:t]).abs().max() > 1e-4


def test_token_and_sequence_modes_coincide_only_when_nothing_attends_afterwards(model, clean, corpus):
    first, last = model.layout.moe_layers[0], model.layout.moe_layers[-1]
    req = _requests(clean, corpus, [first, last], ts=(9, 15))
    tok = _run(model, corpus, clean, req, mode="token")
    seq = _run(model, corpus, clean, req, mode="sequence")
    diff = (tok.delta_loss - seq.delta_loss).abs()
    assert diff[req.layer == first].max() > 1e-4  # would fail if the modes were the same
    if last == model.layout.n_layers - 1:
        assert diff[req.layer == last].max() < TOL
        np.testing.assert_allclose(tok.gap_norm, seq.gap_norm, atol=TOL, rtol=0)
    else:  # Qwen2-MoE tiny: the last decoder layer is dense and its attention sees earlier rows
        assert model.layout.family == "qwen2_moe"
        assert diff[req.layer == last].max() > 1e-4


def test_no_stale_state_after_ablations(model, clean, corpus):
    seq = corpus.sequences[1]
    t = int(corpus.lengths[1]) - 2
    before = _reference(model.hf, seq, t)[2]
    req = _requests(clean, corpus, _edge_layers(model), ts=(4,))
    _run(model, corpus, clean, req, mode="token", strategy="kv")
    _run(model, corpus, clean, req, mode="sequence")
    after = _reference(model.hf, seq, t)[2]
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_records_carry_metadata(model, clean, corpus):
    req = _requests(clean, corpus, [model.layout.moe_layers[-1]], ts=(2,))
    req = req.iloc[::-1].set_index(np.arange(100, 100 + len(req)))
    req["tag"] = [f"r{i}" for i in range(len(req))]
    out = _run(model, corpus, clean, req, mode="token", seed=7)
    assert list(out.tag) == list(req.tag)  # request order and extra columns preserved
    assert list(map(tuple, out.removed)) == list(req.removed)
    for rec in out.itertuples():
        seq = corpus.sequences[rec.seq_id]
        assert rec.token_id == seq[rec.t] and rec.target_id == seq[rec.t + 1]
        assert rec.family == model.layout.family and rec.mode == "token" and rec.seed == 7
        assert rec.dtype == "float32"
        r = clean.row(rec.seq_id, rec.t)
        route = clean.routing[rec.layer]
        slots = [int(np.flatnonzero(route["indices"][r] == e)[0]) for e in rec.removed]
        assert rec.removed_probs == pytest.approx([route["prob"][r, j] for j in slots])


# --------------------------------------------------------------------------------- clean pass
def test_clean_pass_loss_matches_hf_reference(model, clean, corpus):
    for s, seq in enumerate(corpus.sequences):
        ids = torch.as_tensor(seq, dtype=torch.long).view(1, -1)
        with torch.no_grad():
            out = model.hf(input_ids=ids, labels=ids)
        tok = clean.tokens[clean.tokens.seq_id == s]
        assert np.isnan(tok.loss.iloc[-1]) and tok.target_id.iloc[-1] == -1
        assert np.nanmean(tok.loss) == pytest.approx(out.loss.item(), abs=1e-4)
        per_token = F.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:], reduction="none").numpy()
        np.testing.assert_allclose(tok.loss.to_numpy()[:-1], per_token, atol=TOL, rtol=0)


def test_clean_pass_rows_align_with_tokens(clean, corpus):
    tok = clean.tokens
    assert len(tok) == corpus.lengths.sum()
    for s, seq in enumerate(corpus.sequences):
        rows = clean.row(s, np.arange(len(seq)))
        assert (tok.seq_id.to_numpy()[rows] == s).all()
        assert (tok.t.to_numpy()[rows] == np.arange(len(seq))).all()
        assert (tok.token_id.to_numpy()[rows] == seq).all()
        assert (tok.target_id.to_numpy()[rows][:-1] == seq[1:]).all()
    for L, r in clean.routing.items():
        for key in ("indices", "weight", "prob", "norm"):
            assert r[key].shape[0] == len(tok), (L, key)


def test_clean_pass_routing_matches_router_and_expert_norms(model, clean, corpus):
    assert sorted(clean.routing) == list(model.layout.moe_layers)
    for L in model.layout.moe_layers:
        experts = model.hf.model.layers[L].mlp.experts
        route = clean.routing[L]
        for s, seq in enumerate(corpus.sequences):
            x, (logits, w, idx) = _moe_input(model.hf, seq, L)
            rows = clean.row(s, np.arange(len(seq)))
            got_idx = route["indices"][rows]
            order_got, order_ref = np.argsort(got_idx, 1), np.argsort(idx.numpy(), 1)
            np.testing.assert_array_equal(np.take_along_axis(got_idx, order_got, 1),
                                          np.take_along_axis(idx.numpy(), order_ref, 1))
            ref_w = np.take_along_axis(w.float().numpy(), order_ref, 1)
            np.testing.assert_allclose(np.take_along_axis(route["weight"][rows], order_got, 1), ref_w, atol=TOL)
            probs = torch.softmax(logits.float(), -1).gather(1, idx).numpy()
            np.testing.assert_allclose(np.take_along_axis(route["prob"][rows], order_got, 1),
                                       np.take_along_axis(probs, order_ref, 1), atol=TOL)
            norms = np.array([[torch.linalg.vector_norm(_expert(experts, x[n], int(e))).item() for e in idx[n]]
                              for n in range(len(seq))])
            np.testing.assert_allclose(np.take_along_axis(route["norm"][rows], order_got, 1),
                                       np.take_along_axis(norms, order_ref, 1), rtol=1e-4, atol=1e-6)


def test_clean_pass_weights_follow_the_layout(model, clean):
    lay = model.layout
    for L in lay.moe_layers:
        w, p = clean.routing[L]["weight"], clean.routing[L]["prob"]
        if lay.norm_topk_prob:
            np.testing.assert_allclose(w, p / p.sum(1, keepdims=True), atol=1e-6)
        else:
            np.testing.assert_allclose(w, p * lay.routed_scaling_factor, atol=1e-6)


def test_clean_pass_independent_of_batching(model, clean, corpus):
    one = E.clean_pass(model, corpus, batch_size=1, progress=False, layers=[model.layout.moe_layers[-1]])
    L = model.layout.moe_layers[-1]
    np.testing.assert_allclose(one.tokens.loss, clean.tokens.loss, atol=TOL, equal_nan=True)
    np.testing.assert_array_equal(np.sort(one.routing[L]["indices"], 1), np.sort(clean.routing[L]["indices"], 1))
    frame = one.routing_frame(L)
    assert len(frame) == len(one.tokens) * model.layout.top_k
    assert set(frame.columns) >= {"layer", "seq_id", "t", "token_id", "slot", "expert", "weight", "prob", "norm"}


# --------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def ds(model_cache, clean_cache, corpus):
    """DeepSeek-V2 tiny (layer 0 dense) with its clean pass."""
    return model_cache("deepseek_v2"), corpus, clean_cache("deepseek_v2")


def _one(seq_id=0, t=3, layer=1, removed=None, clean=None):
    if removed is None:
        removed = (int(clean.active(seq_id, t, layer)[0]),)
    return pd.DataFrame([(seq_id, t, layer, removed)], columns=["seq_id", "t", "layer", "removed"])


def test_bad_layer(ds, model_cache):
    model, corpus, clean = ds
    req = _one(clean=clean)
    for bad in (0, 3, -1):  # dense first layer; beyond the last layer
        with pytest.raises(ValueError, match=rf"layer={bad}\b.*not an MoE layer"):
            _run(model, corpus, clean, req.assign(layer=bad))
    with pytest.raises(ValueError, match=r"layer=0\b"):
        E.clean_pass(model, corpus, layers=[0], progress=False)
    q = model_cache("qwen2_moe")
    with pytest.raises(ValueError, match=r"layer=2\b.*not an MoE layer"):  # mlp_only_layers
        E.clean_pass(q, corpus, layers=[2], progress=False)


def test_layer_not_recorded_in_clean_pass(ds):
    model, corpus, _ = ds
    partial = E.clean_pass(model, corpus, layers=[2], progress=False)
    with pytest.raises(ValueError, match=r"layer=1\b.*clean pass"):
        _run(model, corpus, partial, _one(layer=1, removed=(0,), clean=None))


def test_expert_not_active(ds):
    model, corpus, clean = ds
    inactive = sorted(set(range(model.layout.num_experts)) - set(clean.active(0, 3, 1).tolist()))[0]
    with pytest.raises(ValueError, match=rf"expert\(s\) \[{inactive}\] not active at \(seq_id=0, t=3, layer=1\)"):
        _run(model, corpus, clean, _one(removed=(inactive,), clean=clean))


@pytest.mark.parametrize("t", [-1, 23, 24, 100])  # sequence 0 has 24 tokens: t=23 is the last one
def test_bad_position(ds, t):
    model, corpus, clean = ds
    assert corpus.lengths[0] == 24
    req = _one(clean=clean).assign(t=t)
    with pytest.raises(ValueError, match=rf"t={t} is out of range.*\[0, 22\]"):
        _run(model, corpus, clean, req)


def test_bad_seq_id(ds):
    model, corpus, clean = ds
    with pytest.raises(ValueError, match=r"seq_id=3 is out of range"):
        _run(model, corpus, clean, _one(clean=clean).assign(seq_id=3))


def test_bad_removed(ds):
    model, corpus, clean = ds
    e = int(clean.active(0, 3, 1)[0])
    for bad in [(), (e, e)]:
        with pytest.raises(ValueError, match=r"removed="):
            _run(model, corpus, clean, _one(removed=bad, clean=clean))


def test_bad_mode_strategy_batch(ds):
    model, corpus, clean = ds
    req = _one(clean=clean)
    with pytest.raises(ValueError, match=r"mode='tok'"):
        _run(model, corpus, clean, req, mode="tok")
    with pytest.raises(ValueError, match=r"strategy='cache'"):
        _run(model, corpus, clean, req, strategy="cache")
    with pytest.raises(ValueError, match=r"batch_size"):
        _run(model, corpus, clean, req, batch_size=1)


def test_empty_requests(ds):
    model, corpus, clean = ds
    with pytest.raises(ValueError, match=r"requests"):
        _run(model, corpus, clean, _one(clean=clean).iloc[:0])
    with pytest.raises(ValueError, match=r"requests"):
        _run(model, corpus, clean, pd.DataFrame())
    with pytest.raises(ValueError, match=r"requests lack columns \['removed'\]"):
        _run(model, corpus, clean, _one(clean=clean).drop(columns="removed"))


# ---------------------------------------------------------------------------- position sampler
@pytest.fixture(scope="module")
def small_corpus():
    return TokenizedCorpus.from_token_ids([np.arange(10, 20), np.arange(30, 36), [7, 8]])


def test_sampler_reproducible_and_seed_dependent(small_corpus):
    a = sample_positions(small_corpus, n=8, seed=42)
    b = sample_positions(small_corpus, n=8, seed=42)
    c = sample_positions(small_corpus, n=8, seed=43)
    pd.testing.assert_frame_equal(a, b)
    assert not a[["seq_id", "t"]].equals(c[["seq_id", "t"]])


def test_sampler_contract(small_corpus):
    pool = valid_positions(small_corpus)
    assert len(pool) == 9 + 5 + 1
    everything = sample_positions(small_corpus, n=len(pool), seed=0)  # without replacement: all of them
    pd.testing.assert_frame_equal(everything[["seq_id", "t"]], pool)
    for seed in range(5):
        out = sample_positions(small_corpus, n=10, seed=seed, min_context=2)
        assert not out.duplicated(["seq_id", "t"]).any()
        assert out.equals(out.sort_values(["seq_id", "t"]).reset_index(drop=True))
        for rec in out.itertuples():
            seq = small_corpus.sequences[rec.seq_id]
            assert 2 <= rec.t <= len(seq) - 2  # min_context respected, never the last token
            assert rec.token_id == seq[rec.t] and rec.target_id == seq[rec.t + 1]
    assert len(valid_positions(small_corpus, min_context=2)) == 7 + 3 + 0


def test_sampler_bad_arguments(small_corpus):
    with pytest.raises(ValueError, match=r"n_positions=16.*15 valid positions"):
        sample_positions(small_corpus, n=16, seed=0)
    with pytest.raises(ValueError, match=r"n_positions=11.*10 valid positions.*min_context=2"):
        sample_positions(small_corpus, n=11, seed=0, min_context=2)
    with pytest.raises(ValueError, match=r"n_positions=0"):
        sample_positions(small_corpus, n=0, seed=0)
    with pytest.raises(ValueError, match=r"min_context must be >= 0, got -1"):
        sample_positions(small_corpus, n=1, seed=0, min_context=-1)


def test_padded_is_right_padded(small_corpus):
    ids, mask = small_corpus.padded([2, 0], pad_id=0)
    assert ids.shape == mask.shape == (2, 10)
    assert ids[0, :2].tolist() == [7, 8] and ids[0, 2:].eq(0).all() and mask[0].tolist() == [1, 1] + [0] * 8
    assert ids[1].tolist() == list(range(10, 20)) and mask[1].eq(1).all()


# ------------------------------------------------------------------------------------ corpus
LINES = [" = Title = ", "", " A first line of text long enough to be kept by the selection rule here .", " short "]


@pytest.mark.parametrize("sub,name", [("wikitext-2", "test.txt"), ("", "wiki.test.raw"), ("wikitext-2-raw", "wiki.test.raw")])
def test_load_wikitext2_local_layouts(tmp_path, monkeypatch, sub, name):
    monkeypatch.delenv("MOEAUDIT_DATA_DIR", raising=False)
    folder = tmp_path / sub if sub else tmp_path
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("\n".join(LINES) + "\n", encoding="utf-8")
    assert load_wikitext2("test", data_dir=tmp_path) == LINES
    assert load_wikitext2("test", data_dir=str(tmp_path)) == LINES
    monkeypatch.setenv("MOEAUDIT_DATA_DIR", str(tmp_path))
    assert load_wikitext2("test") == LINES


def test_load_wikitext2_bad_split(tmp_path):
    with pytest.raises(ValueError, match=r"split='dev'"):
        load_wikitext2("dev", data_dir=tmp_path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.delenv("MOEAUDIT_DATA_DIR", raising=False)
    import sys

    if "datasets" in sys.modules:  # already imported: its config read the environment at import
        cfg = sys.modules["datasets"].config
        monkeypatch.setattr(cfg, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(cfg, "HF_DATASETS_OFFLINE", True, raising=False)
        monkeypatch.setattr(cfg, "HF_DATASETS_CACHE", tmp_path / "hf_datasets", raising=False)


def test_load_wikitext2_missing_offline_says_how_to_fix(offline, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MOEAUDIT_DATA_DIR") as err:
        load_wikitext2("test")
    assert "data_dir" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"MOEAUDIT_DATA_DIR") as err:
        load_wikitext2("test", data_dir=empty)
    assert str(empty) in str(err.value)


def test_load_wikitext2_nonexistent_data_dir(offline, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir"
    with pytest.raises((FileNotFoundError, ValueError), match=r"MOEAUDIT_DATA_DIR"):
        load_wikitext2("test", data_dir=missing)
    monkeypatch.setenv("MOEAUDIT_DATA_DIR", str(missing))
    with pytest.raises((FileNotFoundError, ValueError), match=r"MOEAUDIT_DATA_DIR"):
        load_wikitext2("test")


# ------------------------------------------------------------------------------ the plain trace


@pytest.mark.parametrize("mode", E.ABLATION_MODES)
def test_trace_ablation_equals_run_ablations(model, clean, corpus, mode, single_thread):
    """The one-prefix nnsight trace shown in the book is what the batched engine computes."""
    from moeaudit.engine import trace_ablation

    for L, seq_id, t in ((model.layout.moe_layers[-1], 0, 5), (model.layout.moe_layers[0], 2, 11)):
        active = clean.active(seq_id, t, L)
        req = pd.DataFrame({"seq_id": seq_id, "t": t, "layer": L, "removed": [[int(active[0])], [int(e) for e in active[:2]]]})
        rec = E.run_ablations(model, corpus, clean, req, mode=mode, progress=False)
        for removed, expected in zip(req.removed, rec.delta_loss):
            got = trace_ablation(model, corpus.sequences[seq_id], layer=L, experts=removed, t=t, mode=mode)
            assert got["delta_loss"] == pytest.approx(expected, abs=2e-5)
            assert (got["rows_changed"] == [t]) if mode == "token" else (t in got["rows_changed"])


def test_trace_ablation_refuses_bad_arguments(model_cache, corpus):
    from moeaudit.engine import trace_ablation

    m = model_cache("olmoe")
    with pytest.raises(ValueError, match="mode="):
        trace_ablation(m, corpus.sequences[0], layer=0, experts=[0], t=3, mode="tokens")
    with pytest.raises(ValueError, match="out of range"):
        trace_ablation(m, corpus.sequences[0], layer=0, experts=[0], t=len(corpus.sequences[0]) - 1)


@pytest.mark.parametrize("operator", ["remove", "mask"])
def test_sequence_mode_from_the_ablated_layer_equals_every_layer_recomputed(model, clean, corpus, operator):
    """Sequence mode started at the ablated layer, with the requests of a sequence that remove the same
    experts sharing one causal forward, gives the records of one full prefix forward per request
    (``skip_clean_layers=False``) to float32 rounding, downstream compensation and premise included."""
    req = _requests(clean, corpus, _edge_layers(model))
    req = pd.concat([req, req.assign(t=req.t.where(req.t == 0, req.t - 1))]).drop_duplicates(
        subset=["seq_id", "t", "layer", "removed"]).reset_index(drop=True)  # several t per (seq, layer, experts)
    req = req[[all(e in clean.active(s, t, L) for e in r) for s, t, L, r in req.itertuples(index=False)]]
    kw = dict(mode="sequence", downstream=True, operator=operator, batch_size=5)
    fast = _run(model, corpus, clean, req.reset_index(drop=True), **kw)
    slow = _run(model, corpus, clean, req.reset_index(drop=True), skip_clean_layers=False, **kw)
    assert len(fast) == len(req) and fast.premise_ok.all()
    for col in ("delta_loss", "clean_loss", "ablated_loss", "gap_norm", "downstream_compensation"):
        np.testing.assert_allclose(fast[col].to_numpy(), slow[col].to_numpy(), atol=2e-5, rtol=1e-4, err_msg=col)
    for col in ("removed_routed", "clean_routing_match") + (("replacement", "leak") if operator == "mask" else ()):
        assert fast[col].tolist() == slow[col].tolist(), col
    assert (fast.delta_loss.abs() > 0).any()


def _partitions(n):
    """Every cut of range(n) into contiguous [a, b) segments."""
    if n == 0:
        yield []
        return
    for first in range(1, n + 1):
        for rest in _partitions(n - first):
            yield [(0, first)] + [(a + first, b + first) for a, b in rest]


def test_length_segments_is_the_cheapest_cut():
    """Sequence-mode units: the padded work of the chosen cut equals the brute-force minimum."""
    from moeaudit.engine import _length_segments

    def cost(cut, lengths):
        return sum((b - a + 1) * lengths[a] for a, b in cut)

    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = sorted(rng.integers(1, 200, size=int(rng.integers(1, 8))).tolist(), reverse=True)
        cut = _length_segments(lengths, max_rows=3, extra_rows=1)
        assert [a for a, _ in cut][0] == 0 and cut[-1][1] == len(lengths)
        assert all(b - a <= 3 for a, b in cut)
        feasible = [c for c in _partitions(len(lengths)) if all(b - a <= 3 for a, b in c)]
        assert cost(cut, lengths) == min(cost(c, lengths) for c in feasible)
    # by hand: one long row and three short ones are cheaper apart ((1+1)*100 + (3+1)*10 = 240)
    # than together ((4+1)*100 = 500)
    assert _length_segments([100, 10, 10, 10], max_rows=8) == [(0, 1), (1, 4)]
    assert _length_segments([100, 90, 90], max_rows=8) == [(0, 3)]


def test_batch_boundaries_is_the_cheapest_packing():
    from moeaudit.engine import _batch_boundaries

    def cost(cut, rows, lengths, overhead):
        return sum(sum(rows[a:b]) * lengths[a] + overhead for a, b in cut)

    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 8))
        lengths = sorted(rng.integers(1, 300, size=n).tolist(), reverse=True)
        rows = rng.integers(1, 5, size=n).tolist()
        cut = _batch_boundaries(rows, lengths, max_rows=6, overhead=50)
        ok = [c for c in _partitions(n) if all(sum(rows[a:b]) <= 6 or b - a == 1 for a, b in c)]
        assert all(sum(rows[a:b]) <= 6 or b - a == 1 for a, b in cut)
        assert cost(cut, rows, lengths, 50) == min(cost(c, rows, lengths, 50) for c in ok)
    # by hand: a large overhead merges everything that fits; none splits by length
    assert _batch_boundaries([2, 2, 2], [300, 20, 10], max_rows=6, overhead=10_000) == [(0, 3)]
    assert _batch_boundaries([2, 2, 2], [300, 20, 10], max_rows=6, overhead=0) == [(0, 1), (1, 2), (2, 3)]
