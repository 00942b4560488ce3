"""The shipped default models (moeaudit/zoo): loadable offline by short name, of the right
class and structure, good enough to audit (quality gates), and reproducible from their seed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import moeaudit.models  # noqa: F401  (imports nnsight, which must precede transformers.models.*)
from moeaudit import paths
from moeaudit.zoo import MIRRORS, REDUNDANCY_MODELS, SHIPPED_MODELS, ZOO_MODELS, load_summary, zoo_path

CLASSES = {"tiny-olmoe": "OlmoeForCausalLM", "tiny-qwen-moe": "Qwen2MoeForCausalLM",
           "tiny-deepseek-v2": "DeepseekV2ForCausalLM", **{m: "OlmoeForCausalLM" for m in REDUNDANCY_MODELS}}
#: (routed experts, top-k) of the real checkpoints the shipped models mirror.
ROUTING = {"tiny-olmoe": (64, 8), "tiny-qwen-moe": (60, 4), "tiny-deepseek-v2": (64, 6)}

from moeaudit.zoo import PPL_RATIO_MAX  # noqa: E402  (model perplexity at most half the unigram baseline's)
from moeaudit.zoo import MIN_FRAC_USED  # noqa: E402  (share of routed experts that must get >= 0.2% of the mass)
MAX_DIR_MB = 10.0


def _have_wikitext() -> bool:
    root = os.environ.get(paths.DATA_DIR_ENV)
    return bool(root) and (Path(root) / "wikitext-2" / "test.txt").is_file() and \
        (Path(root) / "wikitext-2" / "valid.txt").is_file()


needs_data = pytest.mark.skipif(not _have_wikitext(), reason=f"${paths.DATA_DIR_ENV} does not hold wikitext-2/")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is fastest, and far faster than two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded():
    """``get(name)`` -> (model, tokenizer) loaded offline from the package by short name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(name):
        if name not in cache:
            path = zoo_path(name)
            cache[name] = (AutoModelForCausalLM.from_pretrained(path, local_files_only=True),
                           AutoTokenizer.from_pretrained(path, local_files_only=True))
        return cache[name]

    return get


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ValueError) as err:
        zoo_path("tiny-mixtral")
    for name in SHIPPED_MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_loads_offline_by_short_name_from_any_directory(name, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = zoo_path(name)
    assert path.is_absolute() and path.is_dir()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == CLASSES[name]
    assert tok.eos_token is not None and tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok("The lobster is a species of crustacean .", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3 and int(ids.max()) < model.config.vocab_size
    assert tok.decode(ids[0]) == "The lobster is a species of crustacean ."
    size_mb = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
    assert size_mb <= MAX_DIR_MB
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:  # stored in bfloat16, computed in float32
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert next(model.parameters()).dtype == torch_float32()


def torch_float32():
    import torch

    return torch.float32


def test_redundancy_family_differs_only_in_routing(loaded):
    """Every family model is the tiny-olmoe recipe at 4 layers with the (E, top-k) and seed of its name;
    the whole family stays within its 50 MB weight budget."""
    base = load_summary("tiny-olmoe")
    total = 0.0
    for name in REDUNDANCY_MODELS:
        s = load_summary(name)
        E, k, seed = (int(part[1:]) for part in name.split("-")[1:])
        model, tok = loaded(name)
        cfg = model.config
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers, s["seed"]) == (E, k, 4, seed)
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                    "router_aux_loss_coef", "norm_topk_prob"):
            assert getattr(cfg, key) == base["architecture"][key], key
        recipe = ("steps", "batch_size", "context", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas",
                  "grad_clip", "threads")
        assert {r: s["training"][r] for r in recipe} == {r: base["training"][r] for r in recipe}
        assert (zoo_path(name) / "tokenizer.json").read_bytes() == (zoo_path("tiny-olmoe") / "tokenizer.json").read_bytes()
        assert s["family"] == "redundancy"
        total += (zoo_path(name) / "model.safetensors").stat().st_size / 2**20
    assert total <= 50


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_structure_mirrors_the_real_checkpoint(name, loaded):
    model, _ = loaded(name)
    cfg = model.config
    n_exp = getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    assert (n_exp, cfg.num_experts_per_tok) == ROUTING[name]
    assert not cfg.norm_topk_prob
    assert not cfg.output_router_logits  # plain LM loss from model(..., labels=...)
    layers = model.model.layers
    if name == "tiny-olmoe":
        assert all(not hasattr(layer.mlp, "shared_expert") for layer in layers)
    elif name == "tiny-qwen-moe":
        assert cfg.shared_expert_intermediate_size > 0
        assert all(hasattr(layer.mlp, "shared_expert_gate") for layer in layers)  # sigmoid-gated shared expert
    else:
        assert cfg.n_shared_experts == 2 and cfg.first_k_dense_replace == 1 and cfg.q_lora_rank is None
        assert not hasattr(layers[0].mlp, "experts")  # dense first layer
        assert all(hasattr(layer.mlp, "shared_experts") for layer in layers[1:])
        assert hasattr(layers[0].self_attn, "kv_a_proj_with_mqa")  # multi-head latent attention
    summary = load_summary(name)
    assert summary["mirrors"] == MIRRORS[name]
    # balance-loss coefficients: the real model's times one common factor (keeps OLMoE = 10 x Qwen)
    from moeaudit.tooling.training import AUX_COEF_SCALE

    aux = summary["aux_loss"]
    assert aux["coef"] == pytest.approx(AUX_COEF_SCALE * aux["real_coef"])
    assert aux["real_coef"] == {"tiny-olmoe": 0.01, "tiny-qwen-moe": 0.001, "tiny-deepseek-v2": 0.001}[name]


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_summary_passes_the_gates(name):
    s = load_summary(name)
    assert s["data"]["train_split"] == "validation" and s["data"]["eval_split"] == "test"
    assert s["tokenizer"]["trained_on"] == "validation split"
    ev = s["evaluation"]
    assert ev["model"]["perplexity"] <= PPL_RATIO_MAX * ev["unigram_baseline"]["perplexity"]
    n_moe = sum(1 for i in range(s["architecture"]["num_hidden_layers"])
                if not (name == "tiny-deepseek-v2" and i < s["architecture"]["first_k_dense_replace"]))
    assert len(ev["utilisation"]["layers"]) == n_moe
    for layer in ev["utilisation"]["layers"].values():
        assert layer["frac_experts_ge_threshold"] >= MIN_FRAC_USED
        assert abs(sum(layer["mass_share"]) - 1) < 1e-4
    log = (zoo_path(name) / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,") and len(log) == s["training"]["steps"] + 1
    rep = s.get("reproducibility")
    if name in ZOO_MODELS:  # every default model was retrained from its seed; family members where recorded
        assert rep is not None
    if rep is not None:
        assert rep["max_abs_loss_diff"] == 0.0 and rep["max_abs_param_diff"] == 0.0
        assert rep["steps"] == s["training"]["steps"]


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_regime_gate_on_the_embedded_corpus(name, tmp_path):
    """The default book's text is in the models' regime: on the embedded corpus (its default form) each
    model takes from context at least REGIME_GAIN_RATIO_MIN of what it takes on WikiText-2 test, both
    measured the same way. The embedded half is re-measured here; the WikiText half where the data is."""
    from moeaudit.tooling.training import REGIME_GAIN_RATIO_MIN, gate_failures, measure_regime

    reg = load_summary(name)["regime"]
    assert reg["gain_ratio"] >= REGIME_GAIN_RATIO_MIN and not gate_failures(load_summary(name))
    now = measure_regime(name)
    for key in ("mean_loss", "unigram_loss", "gain", "n_tokens", "text_form"):
        assert now["embedded"][key] == pytest.approx(reg["embedded"][key], abs=1e-4), key
    assert now["embedded"]["text_form"] == "wikitext" and now["embedded"]["n_tokens"] > 10_000
    assert now["embedded"]["gain"] >= REGIME_GAIN_RATIO_MIN * reg["wikitext-2"]["gain"]
    if _have_wikitext():
        for key in ("mean_loss", "unigram_loss", "gain", "n_tokens"):
            assert now["wikitext-2"][key] == pytest.approx(reg["wikitext-2"][key], abs=1e-4), key
    assert f"{reg['gain_ratio']:.2f} of the gain on WikiText-2 test" in (zoo_path(name) / "README.md").read_text()


def test_regime_gate_refuses_a_near_unigram_model():
    from moeaudit.tooling.training import gate_failures

    s = json.loads(json.dumps(load_summary("tiny-olmoe")))
    s["regime"]["embedded"]["gain"], s["regime"]["gain_ratio"] = 0.05, 0.05 / s["regime"]["wikitext-2"]["gain"]
    missed = gate_failures(s)
    assert len(missed) == 1 and "gain over the in-sample unigram on the embedded corpus 0.050 nats" in missed[0]


def test_some_family_member_was_retrained_from_its_seed():
    assert any(load_summary(m).get("reproducibility") for m in REDUNDANCY_MODELS)


@pytest.fixture(scope="module")
def streams(loaded):
    """Per model: (validation token stream, first 32 test chunks), tokenized with its own tokenizer."""
    from moeaudit.corpus import load_wikitext2
    from moeaudit.tooling.training import encode_stream, eval_chunks

    valid, test = load_wikitext2("validation"), load_wikitext2("test")
    out = {}

    def get(name):
        if name not in out:
            model, tok = loaded(name)
            ctx = model.config.max_position_embeddings
            out[name] = (encode_stream(tok, valid), eval_chunks(encode_stream(tok, test[:400]), ctx, max_chunks=32))
        return out[name]

    return get


@needs_data
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_gates_remeasured_on_a_test_slice(name, loaded, streams):
    from moeaudit.tooling.training import USAGE_THRESHOLD, evaluate_model, unigram_perplexity

    model, tok = loaded(name)
    train_stream, chunks = streams(name)
    assert chunks.shape == (32, model.config.max_position_embeddings)
    ppl, util = evaluate_model(model, chunks)
    uni = unigram_perplexity(train_stream, chunks, len(tok))
    assert ppl["perplexity"] <= PPL_RATIO_MAX * uni["perplexity"], (ppl, uni)
    for layer, u in util["layers"].items():
        share = np.asarray(u["mass_share"])
        assert (share >= USAGE_THRESHOLD).mean() >= MIN_FRAC_USED, (layer, np.sort(share)[:8])


@needs_data
@pytest.mark.slow
def test_training_is_reproducible_from_the_seed(tmp_path):
    """A few steps of training, twice with the same seed: identical loss curves and weights."""
    import torch
    from safetensors.torch import load_file

    from moeaudit.tooling.training import read_log, train

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    for run in ("a", "b"):
        train("tiny-deepseek-v2", seed=3, steps=4, out=tmp_path / run, evaluate=False, verbose=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)
    a, b = read_log(tmp_path / "a" / "training_log.csv"), read_log(tmp_path / "b" / "training_log.csv")
    assert len(a) == 4
    assert a["loss"].tolist() == b["loss"].tolist() and a["aux_loss"].tolist() == b["aux_loss"].tolist()
    assert a["aux_loss"].gt(0).all()  # the balance loss is part of the objective
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    summary = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert summary["seed"] == 3 and summary["training"]["steps"] == 4 and "evaluation" not in summary


def test_cli_rejects_an_unknown_name(capsys):
    from moeaudit.tooling.training import main

    with pytest.raises(SystemExit) as err:
        main(["tiny-mixtral"])
    assert err.value.code != 0 and "tiny-olmoe" in capsys.readouterr().err


def test_model_card_tables_from_the_summaries():
    from moeaudit.chapters.default_models import generalisation_gap, recipe_row, routing_mass_shares, utilisation_table

    summaries = {m: load_summary(m) for m in ZOO_MODELS}
    row = recipe_row(summaries["tiny-olmoe"])
    assert row["routed experts, top-k"] == "64, top-8" and row["shared experts"] == "none"
    assert recipe_row(summaries["tiny-deepseek-v2"])["layers (dense)"].endswith("(1)")
    gap = generalisation_gap(summaries)
    s = summaries["tiny-qwen-moe"]
    assert gap.loc["tiny-qwen-moe", "gap"] == pytest.approx(
        s["evaluation"]["model"]["nll"] - s["training"]["final_loss_mean_last_50"])
    shares = routing_mass_shares(summaries["tiny-olmoe"])
    assert np.allclose(shares.sum(axis=1), 100, atol=1e-2) and shares.shape[1] == 64
    util = utilisation_table(summaries)
    assert len(util) == 8 + 8 + 7 and (util["experts"] > 0).all()  # MoE layers: deepseek's first is dense
    from moeaudit.chapters.default_models import family_table, family_texts

    fam_summaries = {m: load_summary(m) for m in REDUNDANCY_MODELS}
    fam = family_table(fam_summaries)
    assert list(fam.index) == list(REDUNDANCY_MODELS)
    assert fam.loc["olmoe-e8-k2-s0", "routed experts"] == 8 and fam.loc["olmoe-e64-k16-s1", "top-k"] == 16
    assert fam["weights (MB)"].sum() <= 50
    texts = family_texts(fam_summaries, fam)
    checked = fam["retrained: max |weight difference|"].dropna()
    assert texts["family_repro"].startswith(f"{len(checked)} of {len(fam)} {'was' if len(checked) == 1 else 'were'} "
                                            "retrained")
    assert texts["family_depth"] == "4 decoder layers"
    assert family_texts({}, family_table({}))["family_gates"] == "(no family model in this run)"


def test_a_model_that_misses_a_gate_writes_nothing(tmp_path, monkeypatch):
    """Training whose evaluation misses a quality gate raises with the figures that missed and
    leaves the output directory exactly as it was; one that passes replaces it."""
    from moeaudit.tooling import training

    out = tmp_path / "tiny-deepseek-v2"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous model")
    lines = [f" = Section {i} = " if i % 7 == 0 else f" line {i} of a small text about routers and experts ."
             for i in range(400)]
    monkeypatch.setattr("moeaudit.tooling.training.load_wikitext2", lambda split, data_dir=None: lines)  # bound at import
    layers = {str(i): {"frac_experts_ge_threshold": f, "mass_share": []} for i, f in ((1, 1.0), (2, 0.5), (3, 0.95))}
    monkeypatch.setattr(training, "evaluate_model", lambda model, chunks: (
        {"nll": 5.0, "perplexity": 148.4, "n_tokens": 10}, {"threshold": 0.002, "layers": layers}))
    monkeypatch.setattr(training, "unigram_perplexity", lambda *a: {"nll": 5.3, "perplexity": 200.0, "n_tokens": 10})
    with pytest.raises(training.GateError) as err:
        training.train("tiny-deepseek-v2", seed=1, steps=2, out=out, verbose=False)
    text = str(err.value)
    assert "nothing was written" in text and "0.74 of the unigram baseline" in text
    assert "layer 2: 50.0% of the routed experts" in text and "layer 1" not in text and "layer 3" not in text
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the previous model"
    assert not list(tmp_path.glob(".*staging*"))
    layers["2"]["frac_experts_ge_threshold"] = 0.95
    monkeypatch.setattr(training, "unigram_perplexity", lambda *a: {"nll": 6.0, "perplexity": 400.0, "n_tokens": 10})
    training.train("tiny-deepseek-v2", seed=1, steps=2, out=out, verbose=False)
    assert (out / "training_summary.json").is_file() and (out / "model.safetensors").read_bytes() != b"the previous model"


def test_unevaluated_training_cannot_write_the_shipped_model():
    from moeaudit.tooling import training

    with pytest.raises(ValueError, match="without checking the quality gates"):
        training.train("tiny-olmoe", steps=1, evaluate=False, verbose=False)


def test_gate_failures_by_hand():
    from moeaudit.tooling.training import gate_failures

    ok = {"evaluation": {"model": {"perplexity": 50.0}, "unigram_baseline": {"perplexity": 100.0},
                         "utilisation": {"layers": {"0": {"frac_experts_ge_threshold": 0.9}}}}}
    assert gate_failures(ok) == []
    ok["evaluation"]["model"]["perplexity"] = 50.1
    assert gate_failures(ok) == ["test perplexity 50.1 is 0.50 of the unigram baseline's 100.0 (gate: at most 0.5)"]
    with pytest.raises(ValueError, match="no evaluation"):
        gate_failures({})
