"""The contract every audited MoE family must meet, on a tiny random model of each.

For every model_type in :data:`moeaudit.families.FAMILIES` (built offline from its transformers
config class by :func:`moeaudit.tooling.testing.tiny_random_model`):

* the clean pass matches the model's own loss and routing: combine weights and top-k indices as
  the block hands them to the experts, routing weights from the router logits as the registry
  defines them, expert-output norms from the removed contributions;
* token and sequence ablations (one and several removed experts, first and last MoE layer, both
  strategies) equal an independent plain-PyTorch reference written here: forward hooks that
  subtract the removed experts' contributions from the MoE block's output (1e-5, float32), so
  "zero the combine weight where the block hands it to the experts" is shown to be "remove
  exactly the expert's contribution" for each family;
* shared experts (and their gate) compute bitwise the same output with and without the ablation;
* the Appendix-B verification suite passes;
* ``docs/families.md`` is the table generated from the registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moeaudit.models  # noqa: F401  (imports nnsight first)
from moeaudit import engine
from moeaudit.audit import AuditContext
from moeaudit.families import FAMILIES, families_table
from moeaudit.metrics import observational_metrics
from moeaudit.models import SUPPORTED_FAMILIES, layout_from_config
from moeaudit.tooling.testing import TINY_CONFIGS, random_token_corpus, tiny_config, tiny_random_model
from moeaudit.verify import verification_suite

ROOT = Path(__file__).resolve().parents[1]
FAMILY_LIST = sorted(SUPPORTED_FAMILIES)
TOL = 1e-5
# FlexOlmo normalises the MoE output (post_feedforward_layernorm) before the residual: the float32
# rounding of "subtract the contribution" and "zero its weight" differ by up to ~3e-5 nats there.
FAMILY_TOL = {"flex_olmo": 5e-5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict = {}


def _setup(family: str):
    """(model, corpus, clean pass) of ``family``, built once per module."""
    if family not in _CACHE:
        model = tiny_random_model(family)
        corpus = random_token_corpus(n_seqs=2, length=14, seed=3)
        _CACHE[family] = (model, corpus, engine.clean_pass(model, corpus, progress=False))
    return _CACHE[family]


def _module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ------------------------------------------------------------------------------------------------
# The independent reference: plain PyTorch hooks that subtract the removed contributions
# ------------------------------------------------------------------------------------------------
def _router_topk(spec, out, top_k: int):
    """(combine weights, indices) (N, k) from a router's output, read by format."""
    if spec.router_output == "scores_logits":
        scores, logits = out
        idx = torch.topk(logits, top_k, dim=-1).indices
        return scores.gather(1, idx), idx
    return out[1], out[2]


def _contribution(spec, experts, x_row: torch.Tensor, expert: int, weight: torch.Tensor) -> torch.Tensor:
    """What expert ``expert`` adds to the block output at one token (H,), by a direct call."""
    if spec.combine_site == "router_scores":  # weight applied to the expert's input, expert-major call
        n_exp = experts.gate_up_proj.shape[0]
        grouped = torch.zeros(n_exp, 1, x_row.shape[-1], dtype=x_row.dtype)
        grouped[expert, 0] = x_row * weight
        return experts(grouped.reshape(n_exp, -1))[expert]
    return experts(x_row[None], torch.tensor([[expert]]), weight.reshape(1, 1))[0]


@torch.no_grad()
def reference_delta(model, ids: np.ndarray, *, layer: int, removed, t: int, mode: str,
                    means: np.ndarray | None = None) -> tuple[float, float]:
    """(delta_loss, gap norm at t) of removing ``removed`` at ``layer``: forward of the prefix
    ``x[:t+1]`` with a hook on the MoE block that subtracts, at row t (token mode) or every row
    <= t where routed (sequence mode), each removed expert's contribution computed on its own.
    With ``means`` ((E, H), the mean-output operator) each subtracted contribution is replaced by
    ``w_e mu_e`` (``mu_e`` for input-weighted experts)."""
    spec, hf = model.layout.spec, model.hf
    block = _module(hf.model.layers[layer], spec.block)
    router, experts = getattr(block, spec.router), getattr(block, spec.experts)
    prefix = torch.as_tensor(ids[: t + 1])[None]
    target = torch.as_tensor(ids[t + 1: t + 2])
    seen = {}
    h1 = router.register_forward_hook(lambda _m, _i, out: seen.update(route=_router_topk(spec, out, model.layout.top_k)))

    def subtract(_m, args, out):
        x = args[0].reshape(-1, args[0].shape[-1])
        w, idx = seen["route"]
        y = out if spec.block_output_index is None else out[spec.block_output_index]
        flat = y.reshape(-1, y.shape[-1]).clone()
        rows = [t] if mode == "token" else range(t + 1)
        for r in rows:
            for e in removed:
                slots = (idx[r] == e).nonzero().flatten()
                for j in slots.tolist():
                    flat[r] -= _contribution(spec, experts, x[r], e, w[r, j]).to(flat.dtype)
                    if means is not None:
                        mu = torch.as_tensor(means[e], dtype=torch.float32)
                        flat[r] += (mu if spec.combine_site == "router_scores" else w[r, j].float() * mu).to(flat.dtype)
        seen["gap"] = float(torch.linalg.vector_norm((y.reshape(-1, y.shape[-1])[t] - flat[t]).float()))
        new = flat.reshape(y.shape)
        return new if spec.block_output_index is None else (new, *out[1:])

    clean_logits = hf(input_ids=prefix).logits[0, t]
    h2 = block.register_forward_hook(subtract)
    try:
        abl_logits = hf(input_ids=prefix).logits[0, t]
    finally:
        h1.remove()
        h2.remove()
    loss = torch.nn.functional.cross_entropy
    return float(loss(abl_logits[None].float(), target) - loss(clean_logits[None].float(), target)), seen["gap"]


def _requests(model, clean, *, layers, n_removed: int) -> pd.DataFrame:
    rows = []
    for s in (0, 1):
        for t in (0, 4, 9):
            for L in layers:
                rows.append({"seq_id": s, "t": t, "layer": L, "removed": [int(e) for e in clean.active(s, t, L)[:n_removed]]})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# Registry and configs
# ------------------------------------------------------------------------------------------------
def test_at_least_fifteen_families_and_the_named_ones():
    must = {"olmoe", "qwen2_moe", "deepseek_v2", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss",
            "llama4_text", "granitemoe", "phimoe", "qwen3_next"}
    assert must <= set(SUPPORTED_FAMILIES) and len(SUPPORTED_FAMILIES) >= 15
    assert set(TINY_CONFIGS) == set(FAMILIES)  # every audited family has a tiny configuration to test it on


def test_unsupported_families_are_refused_with_their_reason():
    from transformers import CONFIG_MAPPING

    with pytest.raises(ValueError, match="encoder-decoder"):
        layout_from_config(CONFIG_MAPPING["switch_transformers"]())
    with pytest.raises(ValueError, match="experts are not a separate module"):
        layout_from_config(CONFIG_MAPPING["jetmoe"]())
    with pytest.raises(ValueError, match="text model_type"):
        layout_from_config(CONFIG_MAPPING["llama4"]())
    with pytest.raises(ValueError, match="model_type='llama'"):
        layout_from_config(CONFIG_MAPPING["llama"]())


def test_families_table_is_generated_from_the_registry():
    committed = (ROOT / "docs" / "families.md").read_text()
    assert committed == families_table(), "docs/families.md is stale: run python -m moeaudit.families table > docs/families.md"


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_layout_matches_the_built_model(family):
    model, _, _ = _setup(family)
    spec = model.layout.spec
    built = [i for i, layer in enumerate(model.hf.model.layers)
             if hasattr(getattr(layer, spec.block, None), spec.experts)]
    assert list(model.layout.moe_layers) == built
    assert layout_from_config(tiny_config(family)) == model.layout
    if spec.shared is not None:
        assert model.layout.n_shared_experts >= 1
        _module(model.hf.model.layers[built[-1]], spec.shared)


# ------------------------------------------------------------------------------------------------
# Clean pass
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_LIST)
def test_clean_pass_matches_the_model(family):
    model, corpus, clean = _setup(family)
    spec = model.layout.spec
    ids = torch.as_tensor(corpus.sequences[0])[None]
    captured = {}
    hooks = []
    for L in model.layout.moe_layers:
        block = _module(model.hf.model.layers[L], spec.block)
        hooks.append(getattr(block, spec.router).register_forward_hook(
            lambda _m, _i, out, L=L: captured.__setitem__(L, out)))
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    toks = clean.tokens[clean.tokens.seq_id == 0]
    assert abs(np.nanmean(toks.loss) - float(out.loss)) < 1e-4
    n = len(corpus.sequences[0])
    for L in model.layout.moe_layers:
        r = clean.routing[L]
        w, idx = _router_topk(spec, captured[L], model.layout.top_k)
        logits = captured[L][spec.logits_index].float()
        np.testing.assert_array_equal(r["indices"][:n], idx.numpy())
        np.testing.assert_allclose(r["weight"][:n], w.float().numpy(), rtol=0, atol=TOL)
        g = torch.sigmoid(logits) if spec.routing_weight == "sigmoid" else torch.softmax(logits, -1)
        np.testing.assert_allclose(r["prob"][:n], g.gather(1, idx).numpy(), rtol=0, atol=TOL)
        assert r["indices"].shape == r["weight"].shape == r["prob"].shape == r["norm"].shape == (len(clean.tokens), model.layout.top_k)
    metrics = observational_metrics(clean, num_experts=model.layout.num_experts)
    assert len(metrics) == len(model.layout.moe_layers) * model.layout.num_experts
    assert metrics.n_selected.sum() == len(clean.tokens) * model.layout.top_k * len(model.layout.moe_layers)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_expert_norms_are_the_removed_contributions(family):
    """``norm`` = ||E_e(x_t)|| (the expert called alone with weight 1); for output-weighted experts
    the gap of removing e alone at t is ``w_e ||E_e(x_t)||``."""
    model, corpus, clean = _setup(family)
    spec = model.layout.spec
    L, s, t = model.layout.moe_layers[-1], 0, 5
    block = _module(model.hf.model.layers[L], spec.block)
    seen = {}
    h = block.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0].reshape(-1, args[0].shape[-1])))
    try:
        _, gap = reference_delta(model, corpus.sequences[s], layer=L, removed=[int(clean.active(s, t, L)[0])], t=t,
                                 mode="token")
    finally:
        h.remove()
    row = clean.row(s, t)
    for j, e in enumerate(clean.routing[L]["indices"][row]):
        with torch.no_grad():
            alone = _contribution(spec, getattr(block, spec.experts), seen["x"][t], int(e), torch.tensor(1.0))
        assert abs(float(torch.linalg.vector_norm(alone)) - clean.routing[L]["norm"][row, j]) <= 1e-5
    if spec.combine_site == "experts_input":
        w, norm = clean.routing[L]["weight"][row, 0], clean.routing[L]["norm"][row, 0]
        assert abs(gap - abs(w) * norm) <= 1e-5 * max(1.0, gap)


# ------------------------------------------------------------------------------------------------
# Ablations against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_LIST)
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_ablations_match_the_hook_reference(family, mode):
    model, corpus, clean = _setup(family)
    moe = model.layout.moe_layers
    for n_removed in (1, 2):
        req = _requests(model, clean, layers=[moe[0], moe[-1]], n_removed=n_removed)
        rec = engine.run_ablations(model, corpus, clean, req, mode=mode, progress=False)
        assert rec.premise_ok.all()
        for r in rec.itertuples():
            ref, gap = reference_delta(model, corpus.sequences[r.seq_id], layer=r.layer, removed=r.removed, t=r.t,
                                       mode=mode)
            assert abs(r.delta_loss - ref) <= FAMILY_TOL.get(family, TOL), (r.seq_id, r.t, r.layer, r.removed, r.delta_loss, ref)
            assert abs(r.gap_norm - gap) <= TOL * max(1.0, gap)


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("family", FAMILY_LIST)
def test_trace_ablation_matches_the_hook_reference(family, mode):
    """The written-out trace of the book equals the hook reference (which run_ablations is checked
    against above) in both modes, at the first MoE layer, where later layers make the modes differ."""
    model, corpus, clean = _setup(family)
    L = model.layout.moe_layers[0]
    removed = [int(e) for e in clean.active(1, 6, L)]
    got = engine.trace_ablation(model, corpus.sequences[1], layer=L, experts=removed, t=6, mode=mode)
    ref, _ = reference_delta(model, corpus.sequences[1], layer=L, removed=removed, t=6, mode=mode)
    assert abs(got["delta_loss"] - ref) <= FAMILY_TOL.get(family, TOL)
    assert got["rows_changed"] == [6] if mode == "token" else 6 in got["rows_changed"]


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_kv_and_full_strategies_agree(family):
    model, corpus, clean = _setup(family)
    moe = model.layout.moe_layers
    req = _requests(model, clean, layers=[moe[0], moe[-1]], n_removed=1)
    full = engine.run_ablations(model, corpus, clean, req, mode="token", strategy="full", progress=False)
    if not engine.packed_step_supported(model):  # linear/chunked attention: the packed step is refused by name
        with pytest.raises(ValueError, match="strategy='full'"):
            engine.run_ablations(model, corpus, clean, req, mode="token", strategy="kv", progress=False)
        assert (engine.run_ablations(model, corpus, clean, req, progress=False).strategy == "full").all()
        return
    kv = engine.run_ablations(model, corpus, clean, req, mode="token", strategy="kv", progress=False)
    spread = engine.strategy_spread(kv, full)
    assert spread["matched"] == len(req) and spread["max_abs_diff"] <= TOL


@pytest.mark.parametrize("family", [f for f in FAMILY_LIST if FAMILIES[f].shared is not None])
def test_shared_experts_untouched(family):
    model, corpus, clean = _setup(family)
    spec = model.layout.spec
    L = model.layout.moe_layers[0]
    layer = model.hf.model.layers[L]
    paths = [spec.shared] + ([spec.shared_gate] if spec.shared_gate else [])
    outs: dict = {p: [] for p in paths}
    hooks = [_module(layer, p).register_forward_hook(lambda _m, _i, o, p=p: outs[p].append(o.detach().clone()))
             for p in paths]
    try:
        got = engine.trace_ablation(model, corpus.sequences[0], layer=L, experts=[int(e) for e in clean.active(0, 7, L)],
                                    t=7, mode="sequence")
    finally:
        for h in hooks:
            h.remove()
    assert got["delta_loss"] != 0.0
    for p in paths:
        clean_out, ablated_out = outs[p]
        assert torch.equal(clean_out, ablated_out), p


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_verification_suite_passes(family, tmp_path):
    model, corpus, clean = _setup(family)
    ctx = AuditContext(model, corpus, clean, observational_metrics(clean, num_experts=model.layout.num_experts),
                       {"model": family}, tmp_path)
    for L in (model.layout.moe_layers[0], model.layout.moe_layers[-1]):
        suite = verification_suite(ctx, layer=L, mode="token")
        assert suite.passed.all()


# ------------------------------------------------------------------------------------------------
# The reference can fail: a mutated engine is caught
# ------------------------------------------------------------------------------------------------
def test_reference_catches_an_ablation_that_also_renormalises(monkeypatch):
    model, corpus, clean = _setup("mixtral")
    real = engine.ablate_in_trace

    def renormalising(model, layer, removal, *, scale=0.0):  # a plausible bug: renormalise the kept weights
        idx, hit = real(model, layer, removal, scale=scale)
        block = model.nn_block(layer)
        args, kwargs = block.experts.inputs
        w = args[2]
        block.experts.inputs = ((args[0], args[1], w / w.sum(-1, keepdim=True).clamp_min(1e-9)), kwargs)
        return idx, hit

    monkeypatch.setattr(engine, "ablate_in_trace", renormalising)
    req = _requests(model, clean, layers=[model.layout.moe_layers[0]], n_removed=1).head(2)
    rec = engine.run_ablations(model, corpus, clean, req, mode="token", strategy="full", progress=False)
    r = rec.iloc[0]
    ref, _ = reference_delta(model, corpus.sequences[r.seq_id], layer=r.layer, removed=r.removed, t=r.t, mode="token")
    assert abs(r.delta_loss - ref) > TOL


def test_readme_lists_the_audited_families():
    from moeaudit.families import supported_line

    assert supported_line() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("tuning", [True, False])
def test_packed_step_refused_where_a_layer_reads_positions_from_the_cache(tuning):
    """Llama 4 with every layer NoPE and attention-temperature tuning on scales queries by positions
    counted from the cache length, which a packed key/value step does not reproduce: the step is
    refused by name, "auto" runs the full prefix, and the records equal the independent reference.
    With the tuning off, the packed step runs and agrees with the full strategy."""
    n_layers = 3
    model = tiny_random_model("llama4_text", n_layers=n_layers, seed=1, no_rope_layers=[0] * n_layers,
                              attn_temperature_tuning=tuning, floor_scale=4, attn_scale=0.5)
    corpus = random_token_corpus(n_seqs=2, length=14, seed=3)
    clean = engine.clean_pass(model, corpus, progress=False)
    req = _requests(model, clean, layers=list(model.layout.moe_layers), n_removed=1)
    assert engine.packed_step_supported(model) is (not tuning)
    auto = engine.run_ablations(model, corpus, clean, req, mode="token", progress=False)
    if tuning:
        with pytest.raises(ValueError, match="computes positions from the cache length.*strategy='full'"):
            engine.run_ablations(model, corpus, clean, req, mode="token", strategy="kv", progress=False)
        assert (auto.strategy == "full").all() and auto.premise_ok.all()
        for r in auto.itertuples():
            ref, _ = reference_delta(model, corpus.sequences[r.seq_id], layer=r.layer, removed=r.removed, t=r.t,
                                     mode="token")
            assert abs(r.delta_loss - ref) <= TOL, (r.seq_id, r.t, r.layer, r.delta_loss, ref)
    else:
        full = engine.run_ablations(model, corpus, clean, req, mode="token", strategy="full", progress=False)
        assert (auto.strategy == "kv").all() and engine.strategy_spread(auto, full)["max_abs_diff"] <= TOL


# ------------------------------------------------------------------------------------------------
# The operators beside the paper's removal (engine.OPERATORS)
# ------------------------------------------------------------------------------------------------
# families whose selection is the top-k of a monotone function of the router logits, with no
# selection bias or groups: masking one selected expert brings in the (k+1)-th by logit
_PLAIN_TOPK = {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "flex_olmo", "hunyuan_v1_moe", "granitemoe",
               "granitemoeshared", "gpt_oss", "llama4_text", "deepseek_v2"}


@torch.no_grad()
def _clean_router_logits(model, ids: np.ndarray, layer: int) -> torch.Tensor:
    spec = model.layout.spec
    router = getattr(_module(model.hf.model.layers[layer], spec.block), spec.router)
    seen = {}
    h = router.register_forward_hook(lambda _m, _i, out: seen.update(logits=out[spec.logits_index]))
    try:
        model.hf(input_ids=torch.as_tensor(ids)[None])
    finally:
        h.remove()
    return seen["logits"].reshape(len(ids), -1).float()


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_mask_operator_leaks_nothing_and_routes_to_the_next_expert(family):
    model, corpus, clean = _setup(family)
    moe, k = model.layout.moe_layers, model.layout.top_k
    default = None
    for n_removed in (1, 2):
        req = _requests(model, clean, layers=[moe[0], moe[-1]], n_removed=n_removed)
        rec = engine.run_ablations(model, corpus, clean, req, mode="token", operator="mask", progress=False)
        assert (rec.leak == 0.0).all() and (rec.masked_selected == 0).all() and rec.premise_ok.all()
        assert all(len(r) >= n_removed for r in rec.replacement) and (rec.operator == "mask").all()
        assert all(not set(r) & set(m) for r, m in zip(rec.replacement, rec.removed))
        full = engine.run_ablations(model, corpus, clean, req, mode="token", strategy="full", operator="mask",
                                    progress=False)
        assert np.abs(full.delta_loss - rec.delta_loss).max() <= TOL and (full.leak == 0.0).all()
        if n_removed == 1 and family in _PLAIN_TOPK:
            for r in rec.itertuples():
                order = torch.argsort(_clean_router_logits(model, corpus.sequences[r.seq_id], r.layer)[r.t],
                                      descending=True).tolist()
                assert r.replacement == [order[k]], (r.seq_id, r.t, r.layer, r.replacement, order[:k + 1])
        if n_removed == 1:
            default = engine.run_ablations(model, corpus, clean, req, progress=False)
            explicit = engine.run_ablations(model, corpus, clean, req, operator="remove", progress=False)
            pd.testing.assert_frame_equal(default, explicit)  # the default operator: records bit-identical
    L = moe[-1]
    removed = [int(e) for e in clean.active(1, 6, L)[:1]]
    got = engine.trace_ablation(model, corpus.sequences[1], layer=L, experts=removed, t=6, operator="mask")
    assert got["leak"] == 0.0 and got["rows_changed"] == [6]
    one = engine.run_ablations(model, corpus, clean, pd.DataFrame([{"seq_id": 1, "t": 6, "layer": L, "removed": removed}]),
                               operator="mask", progress=False)
    assert abs(one.delta_loss.iloc[0] - got["delta_loss"]) <= FAMILY_TOL.get(family, TOL)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_mean_operator_matches_the_hook_reference(family):
    model, corpus, clean = _setup(family)
    moe = model.layout.moe_layers
    means = engine.expert_mean_outputs(model, corpus)
    for L in (moe[0], moe[-1]):
        assert means.counts[L].sum() == len(clean.tokens) * model.layout.top_k
    req = _requests(model, clean, layers=[moe[0], moe[-1]], n_removed=2)
    rec = engine.run_ablations(model, corpus, clean, req, mode="token", operator="mean", means=means, progress=False)
    assert rec.premise_ok.all() and (rec.operator == "mean").all()
    for r in rec.itertuples():
        ref, gap = reference_delta(model, corpus.sequences[r.seq_id], layer=r.layer, removed=r.removed, t=r.t,
                                   mode="token", means=means.means[r.layer])
        assert abs(r.delta_loss - ref) <= FAMILY_TOL.get(family, TOL), (r.seq_id, r.t, r.layer, r.delta_loss, ref)
        assert abs(r.gap_norm - gap) <= TOL * max(1.0, gap)


# ------------------------------------------------------------------------------------------------
# Chapter 1's written-out intervention
# ------------------------------------------------------------------------------------------------
def _written_out_cell() -> str:
    """The source of chapter 1's cell that writes the intervention out (tag ``intervention-written-out``)."""
    import jupytext

    nb = jupytext.read(ROOT / "notebooks" / "01_introduction.py")
    cells = [c.source for c in nb.cells if "intervention-written-out" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "chapter 1 must have exactly one cell tagged intervention-written-out"
    return cells[0]


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_chapter_1_written_out_intervention_runs_on_every_family(family):
    """Chapter 1's cell, executed as written on a tiny model of the family, removes the router's top
    expert at one token and gives the engine's reference loss (:func:`moeaudit.engine.trace_ablation`)."""
    import linecache
    import types

    model, corpus, clean = _setup(family)
    L, seq, t = model.layout.moe_layers[0], 0, 9
    row = clean.row(seq, t)
    routed = clean.routing[L]
    e = int(routed["indices"][row][np.argmax(routed["weight"][row])])
    ids = corpus.sequences[seq]
    scope = {"torch": torch, "ctx": types.SimpleNamespace(model=model), "L": L, "t_ex": t, "ids": ids,
             "example": pd.DataFrame({"expert": [e]})}
    source, name = _written_out_cell(), "<chapter 1: intervention-written-out>"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # nnsight reads the with-block source
    exec(compile(source, name, "exec"), scope)  # noqa: S102 - the project's own notebook
    ref = engine.trace_ablation(model, ids, layer=L, experts=[e], t=t, mode="token")
    assert float(scope["ablated_loss"]) == pytest.approx(ref["ablated_loss"], abs=1e-5)
    assert ref["ablated_loss"] != pytest.approx(ref["clean_loss"], abs=1e-7)  # the removal changed the loss
