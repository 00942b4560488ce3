"""Remote execution (nnsight 0.8.1, NDIF's protocol), verified offline.

* A model wrapped for local execution refuses ``remote`` (and any keyword its forward does not take)
  instead of passing it to the forward; ``load_model(..., remote=...)`` refuses bad values, local
  models and unreachable hosts before any work.
* Every kind of trace the project runs gives records equal to the local run when each trace goes
  through a server's path: serialised, deserialised with the project's modules hidden, run, and only
  its saved values sent back (:class:`moeaudit.tooling.ndif.InProcessServer`), on the shipped
  tiny-olmoe (every pass and operator) and on a tiny model of each of the 21 audited families (clean
  pass, token and sequence ablations, with the model's weights absent outside the traces, as on a
  client of NDIF); and under nnsight's own ``remote="local"`` simulation.
* nnsight's real HTTP client (``RemoteBackend``, non-blocking polling and the default blocking mode
  with its ``/subscribe`` websocket, through which the engine's passes run) against a loopback stand-in of
  NDIF's API, ``python -m moeaudit.tooling.ndif serve``, started and stopped here on 127.0.0.1. It
  relies on nnsight 0.8.1's endpoints: ``POST /request`` (multipart: ``data`` = the JSON
  ``RequestModel`` envelope, ``blob`` = the serialised trace), ``GET /response/{id}`` (a
  ``ResponseModel`` JSON: ``RECEIVED``, ``COMPLETED`` with ``data`` = a result URL, or ``ERROR`` with
  its description), the result URL (``torch.save`` bytes of the saved values, zstd-compressed when
  the request says ``compress``), ``GET /status`` (``deployments``) and ``/subscribe`` (a websocket: the
  session id, then the job's final ``ResponseModel``). Servers run traces with autograd on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nnsight
import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit import engine
from moeaudit.models import (AuditModel, check_remote, forward_keywords, load_model, remote_wrapper)
from moeaudit.tooling.ndif import InProcessServer
from moeaudit.tooling.testing import TINY_CONFIGS, random_token_corpus, tiny_random_model, tiny_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = sorted(TINY_CONFIGS)
assert nnsight.__version__ == "0.8.1", "the stand-ins here follow nnsight 0.8.1's remote protocol"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens


def _server_model(model: AuditModel, *, remote) -> tuple[AuditModel, InProcessServer]:
    """The same weights behind a remotable wrapper whose traces all go through an in-process server."""
    tokenizer = model.tokenizer or tiny_word_tokenizer(vocab_size=model.hf.config.vocab_size)
    wrapper = remote_wrapper(model.hf, tokenizer=tokenizer)
    server = InProcessServer(wrapper).attach(wrapper)
    return AuditModel(model.name, model.hf, wrapper, model.layout, model.tokenizer, remote=remote), server


def _requests(clean, layers, *, n_removed=1):
    return pd.DataFrame([{"seq_id": s, "t": t, "layer": L, "removed": [int(e) for e in clean.active(s, t, L)[:n_removed]]}
                         for s in (0, 1) for t in (1, 6) for L in layers])


def _same(a: pd.DataFrame, b: pd.DataFrame, cols=("clean_loss", "ablated_loss", "delta_loss", "gap_norm")):
    for c in cols:
        np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), atol=1e-6, rtol=0, err_msg=c)


def _same_clean(a, b):
    np.testing.assert_allclose(a.tokens.loss, b.tokens.loss, atol=1e-6)
    for L in a.routing:
        assert (a.routing[L]["indices"] == b.routing[L]["indices"]).all()
        for key in ("weight", "prob", "norm"):
            np.testing.assert_allclose(a.routing[L][key], b.routing[L][key], atol=1e-5, err_msg=key)


# ------------------------------------------------------------------------------------------------ refusals
def test_local_wrapper_refuses_remote_instead_of_passing_it_to_forward():
    model = tiny_random_model("olmoe")
    ids = torch.tensor([[3, 4, 5]])
    for value in (True, UNREACHABLE, "local"):
        with pytest.raises(ValueError, match=r"^remote=.*wrapped for local execution"):
            with model.nn.trace(input_ids=ids, remote=value):
                model.nn.output.logits.save()
    with pytest.raises(ValueError, match=r"^colour=1 is not a keyword of OlmoeForCausalLM.forward"):
        with model.nn.trace(input_ids=ids, colour=1):
            model.nn.output.logits.save()
    with model.nn.trace(input_ids=ids, remote=False):  # what the engine passes for a local model
        out = model.nn.output.logits.save()
    assert out.shape == (1, 3, model.hf.config.vocab_size)


def test_forward_keywords_reads_named_and_typed_keywords():
    class Typed(dict):
        __annotations__ = {"output_hidden_states": bool}

    class M(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs: Typed):  # noqa: D102
            return input_ids

    class Loose(torch.nn.Module):
        def forward(self, x, **kwargs):  # noqa: D102
            return x

    M.forward.__annotations__["kwargs"] = Typed  # as transformers 5 resolves Unpack[TransformersKwargs]
    assert forward_keywords(M()) == {"input_ids", "attention_mask", "output_hidden_states"}
    assert forward_keywords(Loose()) == {"x", None}  # any keyword: nothing can be refused


@pytest.mark.parametrize("value, name, message", [
    ("ftp://x", "some/model", r"^remote='ftp://x' is not valid; valid values are False"),
    (3, "some/model", r"^remote=3 is not valid"),
    (True, "tiny-olmoe", r"^remote=True sends every trace to a server.*'tiny-olmoe' is a shipped model"),
    ("http://127.0.0.1:9", str(ROOT), r"is a local path"),
    (UNREACHABLE, "some/model", r"^remote='http://127.0.0.1:9': the NDIF host http://127.0.0.1:9 could not be reached"),
])
def test_bad_remote_values_are_refused_before_any_work(value, name, message):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_model(name, remote=value)
    assert time.perf_counter() - t0 < 5


def test_remote_false_none_and_local_pass_the_check():
    assert check_remote(False, "x/y") is False and check_remote(None, "x/y") is False
    assert check_remote("local", "tiny-olmoe") == "local"


def test_model_key_is_the_hub_id_and_refuses_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_random_model("olmoe")
    wrapper = remote_wrapper(model.hf, tokenizer=tiny_word_tokenizer())
    wrapper.repo_id = "allenai/OLMoE-1B-7B-0924"
    key = wrapper.to_model_key()
    assert key.startswith("nnsight.modeling.transformers.TransformersModel:") and '"allenai/OLMoE-1B-7B-0924"' in key
    wrapper.repo_id = str(ROOT)
    with pytest.raises(ValueError, match="is a local directory, which a server cannot load"):
        wrapper.to_model_key()


def test_a_server_model_refuses_passes_that_need_local_weights():
    model = tiny_random_model("olmoe")
    remote, _server = _server_model(model, remote=UNREACHABLE)
    corpus = random_token_corpus(n_seqs=1, length=8)
    assert remote.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^expert_mean_outputs .* remote='http://127.0.0.1:9'"):
        engine.expert_mean_outputs(remote, corpus)


# ------------------------------------------------------------------------------------------------ tiny-olmoe
@pytest.fixture(scope="module")
def shipped():
    local = load_model("tiny-olmoe")
    corpus = random_token_corpus(n_seqs=2, length=12, vocab_size=local.hf.config.vocab_size)
    remote, server = _server_model(local, remote="local")
    return local, remote, server, corpus, engine.clean_pass(local, corpus, progress=False)


def test_every_pass_on_the_shipped_model_equals_the_local_run_through_a_server(shipped):
    local, remote, server, corpus, clean = shipped
    layers = local.audit_layers(2)
    _same_clean(engine.clean_pass(remote, corpus, progress=False), clean)
    req = _requests(clean, layers)
    for kw in ({"mode": "token", "strategy": "kv"}, {"mode": "token", "strategy": "full"}, {"mode": "sequence"},
               {"mode": "token", "operator": "mask"}):
        _same(engine.run_ablations(remote, corpus, clean, req, progress=False, **kw),
              engine.run_ablations(local, corpus, clean, req, progress=False, **kw))
    means = engine.expert_mean_outputs(local, corpus, layers=layers)
    np.testing.assert_allclose(engine.expert_mean_outputs(remote, corpus, layers=layers).means[layers[0]],
                               means.means[layers[0]], atol=1e-6)
    _same(engine.run_ablations(remote, corpus, clean, req, progress=False, operator="mean", means=means),
          engine.run_ablations(local, corpus, clean, req, progress=False, operator="mean", means=means))
    ids = corpus.sequences[0]
    for op, extra in (("remove", {}), ("mask", {}), ("mean", {"means": means})):
        a = engine.trace_ablation(remote, ids, layer=layers[0], experts=clean.active(0, 5, layers[0])[:1], t=5,
                                  operator=op, **extra)
        b = engine.trace_ablation(local, ids, layer=layers[0], experts=clean.active(0, 5, layers[0])[:1], t=5,
                                  operator=op, **extra)
        assert a["rows_changed"] == b["rows_changed"] and abs(a["delta_loss"] - b["delta_loss"]) < 1e-6
    rest = pd.DataFrame([{"seq_id": 0, "t": 6, "span_start": 0, "span_stop": 3, "layer": layers[0],
                          "restored": [int(clean.active(0, 6, layers[0])[0])]}])
    _same(engine.run_restorations(remote, corpus, clean, rest, progress=False),
          engine.run_restorations(local, corpus, clean, rest, progress=False),
          cols=("clean_loss", "corrupt_loss", "restored_loss", "block_gap_restored"))
    assert server.requests > 0 and max(server.request_bytes) < 2_000_000  # no weights travel


def test_router_sums_through_a_server_and_attribution_refused(shipped):
    from moeaudit.attribution import attribution_estimates
    from moeaudit.metrics import router_sums_real_and_padding

    local, remote, _server, corpus, clean = shipped
    ra, rb = router_sums_real_and_padding(remote, corpus), router_sums_real_and_padding(local, corpus)
    for L in ra["layers"]:
        np.testing.assert_allclose(ra["layers"][L]["logit_real"], rb["layers"][L]["logit_real"], atol=1e-6)
    with pytest.raises(ValueError, match="^attribution_estimates runs a backward pass inside the trace"):
        attribution_estimates(remote, corpus, clean, pd.DataFrame({"seq_id": [0], "t": [3]}),
                              layers=local.audit_layers(1), progress=False)


def test_nnsight_local_simulation_runs_the_clean_pass_and_ablations():
    local = load_model("tiny-olmoe")
    simulated = load_model("tiny-olmoe", remote="local")
    assert simulated.remote == "local" and simulated.nn.server is None  # nnsight's own LocalSimulationBackend
    corpus = random_token_corpus(n_seqs=2, length=12, vocab_size=local.hf.config.vocab_size)
    clean = engine.clean_pass(local, corpus, progress=False)
    _same_clean(engine.clean_pass(simulated, corpus, progress=False), clean)
    req = _requests(clean, local.audit_layers(1))
    _same(engine.run_ablations(simulated, corpus, clean, req, progress=False),
          engine.run_ablations(local, corpus, clean, req, progress=False))


# ------------------------------------------------------------------------------------------------ 21 families
#: families whose token-mode step passes one attention mask per layer type (a dict), which nnsight's batcher
#: cannot split: the trace gets the full-attention mask and the decoder the dict (engine._run_batch)
DICT_MASK_FAMILIES = {"dots1", "exaone_moe", "gpt_oss", "llama4_text", "qwen2_moe"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_records_equal_through_a_server_without_local_weights(family):
    """``remote`` a host URL: the engine computes everything that needs weights inside the traces."""
    local = tiny_random_model(family)
    remote, server = _server_model(local, remote=UNREACHABLE)  # the server hook answers; nothing is contacted
    corpus = random_token_corpus(n_seqs=2, length=12)
    clean = engine.clean_pass(local, corpus, progress=False)
    _same_clean(engine.clean_pass(remote, corpus, progress=False), clean)
    layers = [local.layout.moe_layers[0], local.layout.moe_layers[-1]]
    req = _requests(clean, layers)
    for mode in ("token", "sequence"):
        _same(engine.run_ablations(remote, corpus, clean, req, mode=mode, progress=False),
              engine.run_ablations(local, corpus, clean, req, mode=mode, progress=False))
    assert server.requests >= 3


@pytest.mark.parametrize("family", ["gpt_oss", "exaone_moe"])
def test_sliding_window_masks_reach_the_decoder_through_a_server(family):
    """Positions past the sliding window (8 in the tiny configs), where the per-layer-type masks differ: a
    server run that gave every layer the full-attention mask would differ from the local run."""
    local = tiny_random_model(family)
    remote, _server = _server_model(local, remote=UNREACHABLE)
    corpus = random_token_corpus(n_seqs=2, length=16)
    clean = engine.clean_pass(local, corpus, progress=False)
    L = local.layout.moe_layers[0]
    req = pd.DataFrame([{"seq_id": s, "t": t, "layer": L, "removed": [int(clean.active(s, t, L)[0])]}
                        for s in (0, 1) for t in (9, 10)])
    window, per_type = engine.attention_window(local)
    assert per_type and window is not None and window <= 9
    cache_kv, width = engine.clean_cache(local, corpus, [0, 1])
    step = engine.packed_step(local, corpus, list(req[["seq_id", "t"]].itertuples(index=False)), chunk=[0, 1],
                              cache_kv=cache_kv, width=width)
    assert not torch.equal(step.attention_mask["full_attention"], step.attention_mask["sliding_attention"])
    _same(engine.run_ablations(remote, corpus, clean, req, progress=False, strategy="kv"),
          engine.run_ablations(local, corpus, clean, req, progress=False, strategy="kv"))


def test_clean_pass_class_pickles_by_value():
    """A trace that names the engine module ships it by value (the package is registered with nnsight):
    every object in it must pickle. functools.cached_property holds a lock on Python 3.11."""
    from nnsight.intervention.serialization import dumps

    nnsight.register("moeaudit")
    dumps(engine)
    clean = engine.CleanPass("m", pd.DataFrame({"seq_id": [0, 0, 1]}), {}, np.array([0, 2]))
    assert clean.lengths.tolist() == [2, 1]


def test_without_grad_turns_off_grad_in_nested_results():
    from moeaudit.models import without_grad

    class Cache:
        def __init__(self):
            self.layers = [torch.ones(2, requires_grad=True)]

    leaf, cache = torch.zeros(3, requires_grad=True), Cache()
    out = without_grad({"a": leaf, "b": [(torch.ones(1, requires_grad=True),)], "c": cache, "d": 3})
    assert out["a"] is leaf and not leaf.requires_grad
    assert not out["b"][0][0].requires_grad and not cache.layers[0].requires_grad and out["d"] == 3
    nonleaf = torch.ones(2, requires_grad=True) * 2
    assert not without_grad(nonleaf).requires_grad


def test_websocket_handshake_and_frames_follow_rfc6455():
    from moeaudit.tooling.ndif import websocket_accept, websocket_text_frame

    assert websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455, 1.3
    assert websocket_text_frame("Hello") == b"\x81\x05Hello"  # RFC 6455, 5.7
    assert websocket_text_frame("x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert websocket_text_frame("x" * 70000)[:10] == b"\x81\x7f" + (70000).to_bytes(8, "big")


# ------------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def loopback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOEAUDIT_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moeaudit.tooling.ndif", "serve", "tiny-olmoe", "moeaudit/tiny-olmoe"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _poll(tracer, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        result = tracer.backend(tracer)
        if result is not None:
            return result
        time.sleep(0.05)
    raise TimeoutError("the loopback server gave no result")


def test_nnsight_http_client_end_to_end_against_a_loopback_server(loopback, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = load_model("tiny-olmoe")
    assert check_remote(loopback, "moeaudit/tiny-olmoe") == loopback  # the stand-in's /status lists it
    with pytest.raises(ValueError, match=r"does not host 'other/model'"):
        check_remote(loopback, "other/model")
    wrapper = remote_wrapper(local.hf, tokenizer=local.tokenizer)
    wrapper.repo_id = "moeaudit/tiny-olmoe"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with wrapper.trace(input_ids=ids, remote=loopback, blocking=False) as tracer:
        hidden = wrapper.model.layers[1].mlp.input.save()
        logits = wrapper.output.logits.save()
    result = _poll(tracer)
    with local.nn.trace(input_ids=ids):
        ref_hidden = local.nn.model.layers[1].mlp.input.save()
        ref = local.nn.output.logits.save()
    assert set(result) == {"hidden", "logits"}
    assert torch.allclose(result["hidden"], ref_hidden, atol=1e-6) and torch.allclose(result["logits"], ref, atol=1e-6)
    # a server-side error comes back as one error with the server's description
    from nnsight.intervention.backends.remote import RemoteError

    with wrapper.trace(input_ids=ids, remote=loopback, blocking=False) as tracer:
        bad = wrapper.output.logits[0, 99].save()  # index 99 of 5 positions: fails on the server
    with pytest.raises(RemoteError, match="IndexError"):
        _poll(tracer)


def test_engine_through_the_http_client_in_blocking_mode(loopback, monkeypatch):
    """The audit's own passes with ``remote`` the host URL: nnsight's default (blocking) client, its
    websocket and result download, and a trace that names the engine module (shipped by value)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    local = load_model("tiny-olmoe")
    wrapper = remote_wrapper(local.hf, tokenizer=local.tokenizer)
    wrapper.repo_id = "moeaudit/tiny-olmoe"
    remote = AuditModel(local.name, local.hf, wrapper, local.layout, local.tokenizer, remote=loopback)
    corpus = random_token_corpus(n_seqs=2, length=12, vocab_size=local.hf.config.vocab_size)
    clean = engine.clean_pass(local, corpus, progress=False)
    _same_clean(engine.clean_pass(remote, corpus, progress=False), clean)
    req = _requests(clean, local.audit_layers(1))
    _same(engine.run_ablations(remote, corpus, clean, req, progress=False),
          engine.run_ablations(local, corpus, clean, req, progress=False))
    ids = torch.as_tensor(corpus.sequences[0])[None]
    with wrapper.trace(input_ids=ids, remote=loopback):
        x = engine.block_input_in_trace(remote, 1).save()
    with local.nn.trace(input_ids=ids):
        ref = engine.block_input_in_trace(local, 1).save()
    assert not x.requires_grad and torch.allclose(x, ref, atol=1e-6)


def test_prepare_passes_remote_to_the_loader_and_keys_server_records_apart(tmp_path):
    from moeaudit.audit import model_fingerprint, prepare

    ctx = prepare("tiny-olmoe", remote="local", corpus="embedded", n_texts=3, results_dir=tmp_path, progress=False)
    assert ctx.model.remote == "local" and ctx.model.nn.server is None  # nnsight's own simulation backend
    local_fp = ctx.provenance["model_fingerprint"]
    assert local_fp == model_fingerprint(load_model("tiny-olmoe"))  # same weights, same cache
    remote, _server = _server_model(ctx.model, remote=UNREACHABLE)
    assert model_fingerprint(remote) != local_fp  # no weights here: config and hub id only
    with pytest.raises(ValueError, match=r"^remote=True sends every trace to a server"):
        prepare("tiny-olmoe", remote=True, corpus="embedded", n_texts=3, results_dir=tmp_path)


def test_perplexity_refuses_a_server_model():
    from moeaudit.pruning import perplexity

    remote, _server = _server_model(tiny_random_model("olmoe"), remote=UNREACHABLE)
    with pytest.raises(ValueError, match=r"^perplexity .* remote='http://127.0.0.1:9'"):
        perplexity(remote, random_token_corpus(n_seqs=1, length=8))
