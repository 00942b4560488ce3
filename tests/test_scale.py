"""Scaling beyond one device: what can be checked on a CPU-only machine without network.

* ``load_model(dir, device_map={"": "cpu"})`` and ``device_map="auto"`` (accelerate's placement; on
  a machine without GPU everything lands on the CPU) give the same clean pass (losses, routing)
  and the same ablation deltas, token and sequence mode, as the plain load.
* accelerate's dispatch hooks (``dispatch_model(..., force_hooks=True)``: the ``AlignDevicesHook``
  that multi-GPU sharding with ``device_map`` installs on every placed module) do not change what
  the engine measures.
* Offloaded weights (a ``device_map`` that sends decoder layers to ``"disk"`` or ``"cpu"``
  offload, and ``accelerate.cpu_offload``: parameters left on the meta device and moved in by a
  hook on every forward) give the same clean pass (every field, expert norms included), ablations,
  attribution estimates, block geometry, pruned perplexity and model fingerprint as the plain
  load: nothing is read from the weights outside the model's own (hooked) modules.
* ``AuditModel.remote`` is False unless asked for. ``load_model(..., remote=True)`` (nnsight remote
  execution on NDIF) needs network access and an NDIF-hosted model id: it is documented, not
  exercised here -- nothing in this file touches the network.

Not tested here (no GPU, no network): real multi-GPU sharding and NDIF remote execution.
"""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit import engine as E
from moeaudit.models import AuditModel, load_model, wrap_model
from moeaudit.tooling.testing import random_token_corpus, save_tiny_checkpoint, tiny_random_model

TOL = 1e-6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random OLMoE (16 experts, top-4) and a WordLevel tokenizer saved in one directory."""
    path = tmp_path_factory.mktemp("scale") / "tiny-olmoe-random"
    m = tiny_random_model("olmoe", seed=7, num_experts=16, top_k=4)
    save_tiny_checkpoint(m, path)
    return path


@pytest.fixture(scope="module")
def corpus():
    return random_token_corpus(n_seqs=3, length=20, seed=3)  # ragged: 20, 17, 14 tokens


@pytest.fixture(scope="module")
def plain(saved, corpus):
    """The plain load (model moved to ``device="cpu"``), a fixed request list and its measurements."""
    m = load_model(str(saved))
    clean = E.clean_pass(m, corpus, progress=False)
    rows = []
    for s, t in [(0, 3), (0, 11), (1, 8), (2, 12)]:
        for L in m.layout.moe_layers:
            for e in clean.active(s, t, L)[:2]:
                rows.append((s, t, L, (int(e),)))
    req = pd.DataFrame(rows, columns=["seq_id", "t", "layer", "removed"])
    return m, req, _measure(m, corpus, req)


def _measure(m, corpus, req):
    """Clean pass, token-mode and sequence-mode records of ``req``."""
    clean = E.clean_pass(m, corpus, progress=False)
    token = E.run_ablations(m, corpus, clean, req, mode="token", progress=False)
    seq = E.run_ablations(m, corpus, clean, req, mode="sequence", progress=False)
    return clean, token, seq


def _assert_same(a, b, req):
    clean_a, token_a, seq_a = a
    clean_b, token_b, seq_b = b
    np.testing.assert_allclose(clean_b.tokens.loss.to_numpy(), clean_a.tokens.loss.to_numpy(), atol=TOL, rtol=0)
    for L in clean_a.routing:
        np.testing.assert_array_equal(clean_b.routing[L]["indices"], clean_a.routing[L]["indices"])
        np.testing.assert_allclose(clean_b.routing[L]["weight"], clean_a.routing[L]["weight"], atol=TOL, rtol=0)
    for x, y in ((token_a, token_b), (seq_a, seq_b)):
        assert len(x) == len(y) == len(req)
        np.testing.assert_allclose(y.delta_loss.to_numpy(), x.delta_loss.to_numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(y.gap_norm.to_numpy(), x.gap_norm.to_numpy(), atol=TOL, rtol=0)
    assert np.abs(token_a.delta_loss.to_numpy()).max() > 1e-4  # the ablations do something


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"], ids=["dict-cpu", "auto"])
def test_device_map_load_matches_plain_load(saved, corpus, plain, device_map):
    m0, req, ref = plain
    m = load_model(str(saved), device_map=device_map, device=None)
    assert m.device == torch.device("cpu") and {p.device.type for p in m.hf.parameters()} == {"cpu"}
    assert m.layout == m0.layout and not m.remote
    _assert_same(ref, _measure(m, corpus, req), req)


def test_accelerate_dispatch_hooks_do_not_change_results(saved, corpus, plain):
    """A per-layer device map dispatched with ``force_hooks=True`` installs accelerate's
    AlignDevicesHook on every placed module -- the hook path that sharding over several GPUs uses
    (here every device is the CPU). The engine's nnsight trace must see the same router outputs."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    m0, req, ref = plain
    hf = AutoModelForCausalLM.from_pretrained(str(saved))
    n = hf.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(n)}}
    dispatch_model(hf, device_map=device_map, force_hooks=True)
    assert hasattr(hf.model.layers[0], "_hf_hook")
    m = wrap_model(hf, tokenizer=m0.tokenizer, name="dispatched")
    _assert_same(ref, _measure(m, corpus, req), req)


def _offloaded(saved, how, tmp_path):
    """The saved checkpoint loaded with part (or all) of its weights offloaded."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    tokenizer = load_model(str(saved)).tokenizer
    if how == "cpu_offload":
        hf = AutoModelForCausalLM.from_pretrained(str(saved))
        cpu_offload(hf, execution_device=torch.device("cpu"))
    else:
        n = AutoModelForCausalLM.from_pretrained(str(saved)).config.num_hidden_layers
        where = {"disk-last-two": lambda i: "disk" if i >= n - 2 else "cpu",
                 "disk-all": lambda i: "disk"}[how]
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": where(i) for i in range(n)}}
        hf = AutoModelForCausalLM.from_pretrained(str(saved), device_map=device_map, offload_folder=str(tmp_path))
    assert "meta" in {p.device.type for p in hf.parameters()}  # really offloaded
    return wrap_model(hf, tokenizer=tokenizer, name=f"offloaded-{how}")


@pytest.mark.parametrize("how", ["disk-last-two", "disk-all", "cpu_offload"])
def test_offloaded_weights_match_plain_load(saved, corpus, plain, how, tmp_path):
    from moeaudit.attribution import attribution_estimates
    from moeaudit.audit import model_fingerprint
    from moeaudit.pruning import perplexity, pruned_experts

    m0, req, ref = plain
    m = _offloaded(saved, how, tmp_path)
    assert m.device == torch.device("cpu")
    measured = _measure(m, corpus, req)
    _assert_same(ref, measured, req)
    clean_a, clean_b = ref[0], measured[0]
    for L in clean_a.routing:  # every field, twice (offloaded weights must not drift between calls)
        for key in ("prob", "norm"):
            np.testing.assert_allclose(clean_b.routing[L][key], clean_a.routing[L][key], atol=TOL, rtol=0)
    again = E.clean_pass(m, corpus, progress=False)
    for L in clean_a.routing:
        np.testing.assert_array_equal(again.routing[L]["norm"], clean_b.routing[L]["norm"])
    assert model_fingerprint(m) == model_fingerprint(m0)
    pos = req[["seq_id", "t"]].drop_duplicates()
    layers = list(m0.layout.moe_layers)
    att0 = attribution_estimates(m0, corpus, clean_a, pos, layers=layers, progress=False)
    att1 = attribution_estimates(m, corpus, clean_b, pos, layers=layers, progress=False)
    np.testing.assert_allclose(att1.attribution.to_numpy(), att0.attribution.to_numpy(), atol=TOL, rtol=0)
    plan = {layers[-1]: [0, 1]}
    with pruned_experts(m0, plan):
        p0 = perplexity(m0, corpus, progress=False)
    with pruned_experts(m, plan):
        p1 = perplexity(m, corpus, progress=False)
    assert abs(p1["mean_loss"] - p0["mean_loss"]) < TOL


def test_offloaded_block_geometry_matches_plain_load(saved, corpus, plain, tmp_path):
    from moeaudit.audit import AuditContext
    from moeaudit.chapters.mechanism import block_geometry

    m0, _, ref = plain
    m = _offloaded(saved, "disk-last-two", tmp_path)
    layers = list(m0.layout.moe_layers)
    geo = [block_geometry(AuditContext(mm, corpus, ref[0], pd.DataFrame(), {}), layers) for mm in (m0, m)]
    for col in ("gap_norm", "r_norm", "cos", "norm_check"):
        np.testing.assert_allclose(geo[1][col].to_numpy(), geo[0][col].to_numpy(), atol=TOL, rtol=0)
    assert geo[1].norm_check.max() < 1e-5


def test_remote_is_off_by_default_and_documented():
    """Remote (NDIF) execution is opt-in and documented; it is exercised offline in tests/test_remote.py
    (a server stand-in on 127.0.0.1 and nnsight's local simulation), never against a real host here."""
    assert inspect.signature(load_model).parameters["remote"].default is False
    field = AuditModel.__dataclass_fields__["remote"]
    assert field.default is False
    assert "``remote``" in load_model.__doc__ and "LanguageModel" in load_model.__doc__
    m = tiny_random_model("olmoe")
    assert m.remote is False


def test_load_model_offloads_disk_layers_with_and_without_an_offload_folder(saved, corpus, plain, tmp_path,
                                                                           monkeypatch):
    """``load_model(..., device_map={... "disk" ...})`` works: into ``offload_folder`` when given, else into
    a folder of the model under the cache; records equal the plain load's."""
    from transformers import AutoConfig

    from moeaudit.models import default_offload_folder

    monkeypatch.setenv("MOEAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    m0, req, ref = plain
    n = AutoConfig.from_pretrained(str(saved)).num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("disk" if i >= n - 2 else "cpu") for i in range(n)}}
    for folder in (tmp_path / "mine", None):
        m = load_model(str(saved), device_map=device_map, offload_folder=folder)
        assert "meta" in {p.device.type for p in m.hf.parameters()}  # really offloaded
        where = folder if folder is not None else default_offload_folder(str(saved))
        assert where.is_dir() and any(where.iterdir())
        _assert_same(ref, _measure(m, corpus, req), req)
    assert str(tmp_path / "cache") in str(default_offload_folder(str(saved)))
