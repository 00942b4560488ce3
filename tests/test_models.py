"""Tests of moeaudit.models: the MoE layout of every family and the model loader.

Layout facts are checked against the instantiated transformers modules (which layers really
hold a router and fused experts, which shared experts exist) and against the router's own
output (renormalised or scaled top-k weights), not against the layout code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit import engine as E
from moeaudit.models import SUPPORTED_FAMILIES, MoELayout, layout_from_config, load_model, wrap_model
from moeaudit.tooling.testing import save_tiny_checkpoint, tiny_config, tiny_random_model

pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED = {  # tiny_config: 3 layers, 8 experts, top-2
    "olmoe": dict(moe_layers=(0, 1, 2), n_shared_experts=0, shared_expert_gate=None, norm_topk_prob=False),
    "qwen2_moe": dict(moe_layers=(0, 1), n_shared_experts=1, shared_expert_gate="sigmoid", norm_topk_prob=False),
    "deepseek_v2": dict(moe_layers=(1, 2), n_shared_experts=2, shared_expert_gate=None, norm_topk_prob=False),
    "qwen3_moe": dict(moe_layers=(0, 1, 2), n_shared_experts=0, shared_expert_gate=None, norm_topk_prob=True),
    "mixtral": dict(moe_layers=(0, 1, 2), n_shared_experts=0, shared_expert_gate=None, norm_topk_prob=True),
}


def _true_moe_layers(hf):
    return tuple(i for i, layer in enumerate(hf.model.layers)
                 if hasattr(layer.mlp, "gate") and hasattr(getattr(layer.mlp, "experts", None), "gate_up_proj"))


def _check_router_semantics(model):
    """Top-k weights are renormalised probabilities iff norm_topk_prob, else probs * scale."""
    lay = model.layout
    torch.manual_seed(1)
    x = torch.randn(16, model.hf.config.hidden_size)
    for L in lay.moe_layers:
        gate = model.hf.model.layers[L].mlp.gate
        with torch.no_grad():
            logits, w, idx = gate(x)
        assert idx.shape == (16, lay.top_k) and logits.shape == (16, lay.num_experts)
        p = torch.softmax(logits.float(), -1).gather(1, idx)
        expect = p / p.sum(1, keepdim=True) if lay.norm_topk_prob else p * lay.routed_scaling_factor
        torch.testing.assert_close(w.float(), expect, atol=1e-6, rtol=1e-5)


def test_layout_facts_per_family(model, family):
    lay = model.layout
    exp = EXPECTED[family]
    assert lay.family == family and lay.n_layers == 3
    for key, value in exp.items():
        assert getattr(lay, key) == value, key
    assert lay.moe_layers == _true_moe_layers(model.hf)
    assert lay.num_experts == 8 == model.hf.model.layers[lay.moe_layers[0]].mlp.experts.gate_up_proj.shape[0]
    assert lay.top_k == 2
    assert lay.routed_scaling_factor == 1.0
    assert lay.as_dict()["moe_layers"] == exp["moe_layers"]
    mlp = model.hf.model.layers[lay.moe_layers[0]].mlp
    if family == "qwen2_moe":
        assert mlp.shared_expert_gate.out_features == 1  # one scalar sigmoid gate for the one shared expert
        assert not hasattr(model.hf.model.layers[2].mlp, "gate")  # mlp_only_layers=[2] is dense
    elif family == "deepseek_v2":
        cfg = model.hf.config
        assert mlp.shared_experts.gate_proj.out_features == 2 * cfg.moe_intermediate_size  # 2 shared experts
        assert not hasattr(model.hf.model.layers[0].mlp, "gate")  # first_k_dense_replace=1
    else:
        assert not any(hasattr(mlp, a) for a in ("shared_expert", "shared_experts", "shared_expert_gate"))
    _check_router_semantics(model)


VARIANTS = [
    ("olmoe", dict(norm_topk_prob=True), dict(moe_layers=(0, 1, 2), norm_topk_prob=True)),
    ("qwen2_moe", dict(norm_topk_prob=True, mlp_only_layers=[0]), dict(moe_layers=(1, 2), norm_topk_prob=True)),
    ("qwen2_moe", dict(n_layers=4, mlp_only_layers=[], decoder_sparse_step=2), dict(moe_layers=(1, 3))),
    ("qwen3_moe", dict(n_layers=4, mlp_only_layers=[0], decoder_sparse_step=2), dict(moe_layers=(1, 3))),
    ("qwen3_moe", dict(norm_topk_prob=False, top_k=3), dict(norm_topk_prob=False, top_k=3)),
    ("deepseek_v2", dict(n_layers=4, first_k_dense_replace=2, routed_scaling_factor=2.5),
     dict(moe_layers=(2, 3), routed_scaling_factor=2.5, norm_topk_prob=False)),
    ("mixtral", dict(top_k=3, num_experts=6), dict(top_k=3, num_experts=6, norm_topk_prob=True)),
]


@pytest.mark.parametrize("family,kwargs,expected", VARIANTS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(VARIANTS)])
def test_layout_follows_config_variants(family, kwargs, expected):
    model = tiny_random_model(family, hidden_size=16, **kwargs)
    for key, value in expected.items():
        assert getattr(model.layout, key) == value, key
    assert model.layout.moe_layers == _true_moe_layers(model.hf)
    _check_router_semantics(model)


def test_layout_of_the_paper_models():
    """Configs shaped like the three audited checkpoints (no weights): the paper's Section 3 facts."""
    import transformers as tf

    olmoe = layout_from_config(tf.OlmoeConfig(num_hidden_layers=16, num_experts=64, num_experts_per_tok=8,
                                              norm_topk_prob=False))
    assert (olmoe.moe_layers, olmoe.num_experts, olmoe.top_k, olmoe.n_shared_experts) == (tuple(range(16)), 64, 8, 0)
    qwen = layout_from_config(tf.Qwen2MoeConfig(num_hidden_layers=24, num_experts=60, num_experts_per_tok=4,
                                                shared_expert_intermediate_size=5632, mlp_only_layers=[],
                                                decoder_sparse_step=1, norm_topk_prob=False))
    assert (qwen.moe_layers, qwen.num_experts, qwen.top_k) == (tuple(range(24)), 60, 4)
    assert (qwen.n_shared_experts, qwen.shared_expert_gate) == (1, "sigmoid")
    ds = layout_from_config(tf.DeepseekV2Config(num_hidden_layers=27, first_k_dense_replace=1, n_routed_experts=64,
                                                n_shared_experts=2, num_experts_per_tok=6, routed_scaling_factor=1.0))
    assert (ds.moe_layers, ds.num_experts, ds.top_k, ds.n_shared_experts) == (tuple(range(1, 27)), 64, 6, 2)
    assert ds.depth_proportional_layers(5) == [1, 7, 13, 20, 26]  # the paper's DeepSeek layers


@pytest.mark.parametrize("name,n_moe,generic", [("allenai/OLMoE-1B-7B-0924", 16, [0, 4, 8, 11, 15]),
                                                ("Qwen/Qwen1.5-MoE-A2.7B", 24, [0, 6, 12, 17, 23])], ids=["olmoe", "qwen"])
def test_audit_layers_use_the_papers_hand_picked_layers_for_its_checkpoints(name, n_moe, generic):
    # The paper's layers are not what even spacing gives (OLMoE L7 not L8, Qwen L18 not L17), so the
    # real checkpoints use the paper's table and any other model the generic rule.
    from moeaudit.models import PAPER_LAYERS, AuditModel

    lay = MoELayout("olmoe", n_moe, tuple(range(n_moe)), 64, 8, 0, None, False, 1.0)
    assert lay.depth_proportional_layers(5) == generic
    assert AuditModel(name, None, None, lay).audit_layers(5) == list(PAPER_LAYERS[name])
    assert AuditModel("some/other-model", None, None, lay).audit_layers(5) == generic
    with pytest.raises(ValueError, match="n must be >= 1"):
        lay.depth_proportional_layers(0)


def test_check_layer_message(model_cache):
    lay = model_cache("deepseek_v2").layout
    lay.check_layer(1)
    with pytest.raises(ValueError, match=r"^layer=0 is not an MoE layer of this deepseek_v2 model; MoE layers are \[1, 2\]$"):
        lay.check_layer(0)
    with pytest.raises(ValueError, match=r"layer=7 is not an MoE layer"):
        lay.check_layer(7)
    with pytest.raises(ValueError, match=r"qwen2_moe model; MoE layers are \[0, 1\]"):
        model_cache("qwen2_moe").layout.check_layer(2)


@pytest.mark.parametrize("moe", [tuple(range(16)), tuple(range(1, 27)), (0, 1, 3, 5, 8, 13, 21)])
def test_depth_proportional_layers(moe):
    lay = MoELayout("olmoe", max(moe) + 1, moe, 8, 2, 0, None, False, 1.0)
    for n in range(2, len(moe)):
        got = lay.depth_proportional_layers(n)
        assert len(got) == n and got[0] == moe[0] and got[-1] == moe[-1]
        assert set(got) <= set(moe) and all(a < b for a, b in zip(got, got[1:]))
        pos = [moe.index(g) for g in got]  # evenly spread: gaps between chosen indices differ by <= 1 (+ rounding)
        gaps = np.diff(pos)
        assert gaps.max() - gaps.min() <= 1
    assert lay.depth_proportional_layers(len(moe)) == list(moe)
    assert lay.depth_proportional_layers(100) == list(moe)
    assert lay.depth_proportional_layers(1) == [moe[-1]]
    assert MoELayout("olmoe", 16, tuple(range(16)), 8, 2, 0, None, False, 1.0).depth_proportional_layers() == [0, 4, 8, 11, 15]


def test_unsupported_config_names_supported_families():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match=r"model_type='llama'") as err:
        layout_from_config(LlamaConfig())
    for fam in SUPPORTED_FAMILIES:
        assert fam in str(err.value)
    with pytest.raises(ValueError, match=r"model_type=None"):
        layout_from_config(object())


def test_wrap_model_rejects_unfused_layout():
    model = tiny_random_model("olmoe", hidden_size=16)
    model.hf.model.layers[1].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(16, 16)])
    with pytest.raises(ValueError, match=r"layer 1 of this olmoe model does not have the fused"):
        wrap_model(model.hf)


# ------------------------------------------------------------------------------------ loading
@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


def test_load_model_nonexistent_path(offline_hub, tmp_path):
    for bad in (str(tmp_path / "missing" / "model"), str(tmp_path)):  # no such dir; dir without config.json
        with pytest.raises(ValueError, match=r"could not be loaded.*pass its directory") as err:
            load_model(bad)
        assert repr(bad) in str(err.value)


def test_load_model_offline_hub_id(offline_hub):
    with pytest.raises(ValueError, match=r"model 'allenai/OLMoE-1B-7B-0924' could not be loaded"):
        load_model("allenai/OLMoE-1B-7B-0924")


def test_load_model_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"dtype='float64'"):
        load_model(str(tmp_path), dtype="float64")


def test_load_model_unsupported_architecture(tmp_path):
    """A llama checkpoint without weights or tokenizer: the architecture error comes first."""
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='llama'.*olmoe.*mixtral"):
        load_model(str(tmp_path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family (three at most, for time) saved with save_pretrained plus a tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for fam in ("olmoe", "qwen2_moe", "deepseek_v2"):
        m = tiny_random_model(fam, seed=3)
        save_tiny_checkpoint(m, root / fam)
        out[fam] = (root / fam, m)
    return out


TEXT = "w5 w9 w17 w3 w100 w42 w7 w8 w99 w12 w64 w2"


@pytest.mark.parametrize("fam", ["olmoe", "qwen2_moe", "deepseek_v2"])
def test_load_model_from_directory(saved, fam, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path, ref = saved[fam]
    m = load_model(str(path))
    assert m.name == str(path) and m.layout == ref.layout and m.dtype == torch.float32
    assert m.device == torch.device("cpu") and not m.remote and not m.hf.training
    ids = m.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [int(w[1:]) for w in TEXT.split()]
    assert m.pad_id == 0
    with torch.no_grad():
        torch.testing.assert_close(m.hf(input_ids=ids).logits, ref.hf(input_ids=ids).logits, atol=1e-6, rtol=0)
    # the loaded model works end to end through the engine
    from moeaudit.corpus import TokenizedCorpus

    corpus = TokenizedCorpus.from_texts([TEXT, " ".join(TEXT.split()[:7])], m.tokenizer, max_tokens=10)
    assert corpus.lengths.tolist() == [10, 7]
    cp = E.clean_pass(m, corpus, progress=False)
    L = m.layout.moe_layers[-1]
    req = pd.DataFrame([(0, 5, L, (int(cp.active(0, 5, L)[0]),))], columns=["seq_id", "t", "layer", "removed"])
    a = E.run_ablations(m, corpus, cp, req, progress=False)
    b = E.run_ablations(ref, corpus, E.clean_pass(ref, corpus, progress=False), req, progress=False)
    assert a.delta_loss.iloc[0] == pytest.approx(b.delta_loss.iloc[0], abs=1e-6)
    assert a.delta_loss.iloc[0] != 0


def test_load_model_without_tokenizer_files_is_not_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_random_model("olmoe", hidden_size=16).hf.save_pretrained(tmp_path)  # weights and config only
    try:
        m = load_model(str(tmp_path))
    except ValueError as exc:  # a clear error is fine
        assert "tokenizer" in str(exc)
        return
    assert m.tokenizer is None or m.tokenizer(TEXT)["input_ids"] != []


def test_load_model_dtype_and_device_map(saved, monkeypatch):
    from transformers import AutoModelForCausalLM

    path, ref = saved["olmoe"]
    bf = load_model(str(path), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    assert {p.dtype for p in bf.hf.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[5, 9, 17, 3, 100]])
    with torch.no_grad():
        want = ref.hf(input_ids=ids).logits
        torch.testing.assert_close(bf.hf(input_ids=ids).logits.float(), want, atol=0.1, rtol=0.1)
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map", "<absent>"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(str(path))
    assert seen == ["<absent>"]  # no device_map: the model is moved to ``device`` instead
    for dm in ({"": "cpu"}, "cpu", "auto"):
        m = load_model(str(path), device_map=dm, device=None)
        assert seen[-1] == dm  # passed through to from_pretrained (accelerate places the modules)
        assert m.device == torch.device("cpu")
        with torch.no_grad():
            torch.testing.assert_close(m.hf(input_ids=ids).logits, want, atol=1e-6, rtol=0)


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match=r"no tiny config for family 'llama'"):
        tiny_config("llama")


def test_a_config_and_weights_that_do_not_belong_together_are_refused(tmp_path):
    """transformers would initialise missing layers at random (or drop extra ones) and the audit would run."""
    import json
    import shutil

    import pytest

    from moeaudit.models import load_model
    from moeaudit.zoo import zoo_path

    for layers, what in ((10, "missing from the checkpoint"), (4, "the config has no place for")):
        folder = tmp_path / f"layers{layers}"
        shutil.copytree(zoo_path("tiny-olmoe"), folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=f"{what}.*do not belong together"):
            load_model(str(folder))
