"""Train the book's default models: three small MoE language models built from the same
``transformers`` classes as the audited checkpoints.

=====================  ========================  ===============================================
name                   class                     mirrors
=====================  ========================  ===============================================
``tiny-olmoe``         ``OlmoeForCausalLM``      OLMoE-1B-7B-0924: 64 routed experts, top-8, no
                                                 shared expert, load-balancing coefficient 0.01
``tiny-qwen-moe``      ``Qwen2MoeForCausalLM``   Qwen1.5-MoE-A2.7B: 60 routed experts, top-4, one
                                                 sigmoid-gated shared expert (4x expert width),
                                                 coefficient 0.001
``tiny-deepseek-v2``   ``DeepseekV2ForCausalLM`` DeepSeek-V2-Lite: 64 routed experts, top-6, two
                                                 shared experts, first layer dense, multi-head
                                                 latent attention without query compression,
                                                 sequence-wise balance loss (alpha 0.001)
=====================  ========================  ===============================================

Everything is scaled down (8 decoder layers, hidden size 64, expert width 32, a 4,096-token
byte-level BPE vocabulary, 128-token context) so that each model trains in minutes on one CPU
thread; eight layers leave room for the paper's five audited layers spread over depth.
The routing ratios (experts, top-k) and the shared-expert structure are kept; the balance-loss
coefficients are the real models' times :data:`AUX_COEF_SCALE` (see there why).

Data: the tokenizer and the model see only the WikiText-2 *validation* split; the *test* split
is the evaluation corpus of the audit and is used here only to measure perplexity and expert
utilisation after training.

Command line::

    python -m moeaudit.tooling.training tiny-olmoe [--seed 0] [--out DIR] [--steps N] [--data-dir DIR]

writes ``config.json``, ``model.safetensors``, the tokenizer, ``training_log.csv``,
``training_summary.json`` and a model card ``README.md`` to ``DIR`` (default: the package
directory ``moeaudit/zoo/<name>/``, which is where :func:`moeaudit.zoo.zoo_path` looks). ``--check-repro`` retrains an existing model directory
with its recorded seed and compares the loss curves (see :func:`check_reproducibility`). A model
that misses a quality gate (:func:`gate_failures`: test perplexity at most half the unigram
baseline's; in every MoE layer at least 90% of the routed experts with 0.2% of the routing mass)
is not written: the command stops naming every figure that missed, and ``DIR`` keeps what it held.

``training_log.csv`` has one row per optimiser step: ``loss`` (next-token cross-entropy of the
batch, nats), ``aux_loss`` (balance loss before its coefficient), ``total_loss``, ``grad_norm``
(before clipping), ``lr``, ``min_frac_experts_used`` (for the worst MoE layer, the fraction of
experts whose running share of the training batches' routing mass, an exponential moving average
with decay 0.98, is at least 0.2%), ``epoch`` and ``elapsed_s``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nnsight  # noqa: F401  (must precede transformers.models.*: trained models are audited in the same process)
import numpy as np

from ..audit import corpus_regime, prepare
from ..corpus import _LOCAL_NAMES, _local_file, load_wikitext2
from ..paths import data_dir as resolve
from ..zoo import (
    MIN_FRAC_USED,
    PPL_RATIO_MAX,
    REDUNDANCY_SEEDS,
    REDUNDANCY_SETTINGS,
    REGIME_GAIN_RATIO_MIN,
    SHIPPED_MODELS,
    USAGE_THRESHOLD,
    ZOO_DIR,
    redundancy_name,
)


class GateError(RuntimeError):
    """A trained model missed a quality gate (:func:`gate_failures`); nothing was written to the
    output directory."""


def gate_failures(summary: dict) -> list[str]:
    """The quality gates a training summary misses, each with the figure that missed: test
    perplexity at most :data:`PPL_RATIO_MAX` times the unigram baseline's, and in every MoE layer
    at least :data:`MIN_FRAC_USED` of the routed experts with :data:`USAGE_THRESHOLD` of the
    routing mass or more; and, where the summary has its ``regime`` (:func:`measure_regime`), a gain
    over the in-sample unigram on the embedded corpus of at least :data:`REGIME_GAIN_RATIO_MIN` of the
    gain on WikiText-2's test split. ``[]`` when all hold. ``ValueError`` for a summary without an
    evaluation."""
    ev = summary.get("evaluation")
    if ev is None:
        raise ValueError("the summary has no evaluation: the gates are measured on the test split")
    out = []
    ratio = ev["model"]["perplexity"] / ev["unigram_baseline"]["perplexity"]
    if not ratio <= PPL_RATIO_MAX:
        out.append(f"test perplexity {ev['model']['perplexity']:.1f} is {ratio:.2f} of the unigram baseline's "
                   f"{ev['unigram_baseline']['perplexity']:.1f} (gate: at most {PPL_RATIO_MAX})")
    for layer, u in ev["utilisation"]["layers"].items():
        if not u["frac_experts_ge_threshold"] >= MIN_FRAC_USED:
            out.append(f"layer {layer}: {u['frac_experts_ge_threshold']:.1%} of the routed experts receive at least "
                       f"{USAGE_THRESHOLD:.1%} of the routing mass (gate: at least {MIN_FRAC_USED:.0%})")
    reg = summary.get("regime")
    if reg and reg.get("gain_ratio") is not None and not reg["gain_ratio"] >= REGIME_GAIN_RATIO_MIN:
        out.append(f"gain over the in-sample unigram on the embedded corpus {reg['embedded']['gain']:.3f} nats is "
                   f"{reg['gain_ratio']:.2f} of the gain on WikiText-2 test {reg['wikitext-2']['gain']:.3f} "
                   f"(gate: at least {REGIME_GAIN_RATIO_MIN})")
    return out


#: what :func:`measure_regime` measures, as the model card states it
REGIME_MEASUREMENT = ("the audit's default text selection (the first 100 lines longer than 50 characters, each cut "
                      "to the model's 128-token context), float32; loss in nats per scored token; gain = in-sample "
                      "unigram loss minus the model's loss")


def measure_regime(model: str | Path, *, data_dir=None) -> dict:
    """The model's regime on the embedded corpus (its default form) and on WikiText-2's test split,
    measured the same way (:data:`REGIME_MEASUREMENT`, :func:`moeaudit.audit.corpus_regime`), and the
    ratio of the two gains (the quality gate :data:`REGIME_GAIN_RATIO_MIN`).

    ``model``: a shipped name or a checkpoint directory. Without WikiText-2 (no data directory and no
    hub), ``wikitext-2`` and ``gain_ratio`` are ``None``.
    """

    keep = ("mean_loss", "unigram_loss", "uniform_loss", "gain", "n_tokens", "n_texts", "corpus_variant", "text_form")
    out = {"measurement": REGIME_MEASUREMENT}
    with tempfile.TemporaryDirectory() as tmp:
        emb = corpus_regime(prepare(str(model), corpus="embedded", results_dir=tmp, progress=False))
        out["embedded"] = {k: emb[k] for k in keep}
        try:
            wt = corpus_regime(prepare(str(model), corpus="wikitext-2", data_dir=data_dir, results_dir=tmp,
                                       progress=False))
            out["wikitext-2"] = {k: wt[k] for k in keep}
        except FileNotFoundError:
            out["wikitext-2"] = None
    out["gain_ratio"] = out["embedded"]["gain"] / out["wikitext-2"]["gain"] if out["wikitext-2"] else None
    return out


def record_regime(name: str, *, data_dir=None, model_dir: str | Path | None = None) -> dict:
    """Measure :func:`measure_regime` for the shipped model ``name`` (or the model in ``model_dir``) and
    record it in its ``training_summary.json`` and model card. ``FileNotFoundError`` without WikiText-2
    (the record holds both corpora)."""
    model_dir = Path(model_dir) if model_dir is not None else ZOO_DIR / name
    reg = measure_regime(model_dir, data_dir=data_dir)
    if reg["wikitext-2"] is None:
        raise FileNotFoundError("WikiText-2 is needed to record the regime (set $MOEAUDIT_DATA_DIR or pass --data-dir)")
    summary = json.loads((model_dir / "training_summary.json").read_text())
    summary["regime"] = reg
    write_summary(model_dir, summary)
    return reg

#: The balance-loss coefficients are those of the real models times this factor, which keeps
#: their ratios (OLMoE 10 x Qwen). With the real values (factor 1), routing in layers 2-3 of the
#: 4-layer Qwen and DeepSeek stand-ins partly collapsed as the learning rate decayed: by the end
#: of training up to 19-20% of the experts of the worst layer received < 0.2% of the routing
#: mass on the test split (OLMoE's stayed balanced). With factor 5 every expert of every layer
#: stays above 0.2%.
AUX_COEF_SCALE = 5

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

#: Shared by all models (a spec's ``config`` may override entries: the redundancy family has 4 layers).
COMMON = {
    "vocab_size": 4096,
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "output_router_logits": True,
}

#: Training recipe shared by all three models (each spec may override entries).
TRAIN = {
    "context": 128,
    "batch_size": 16,
    "steps": 1000,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 60,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "threads": 1,
}

SPECS = {
    "tiny-olmoe": {
        "class": "OlmoeForCausalLM",
        "config_class": "OlmoeConfig",
        "mirrors": "allenai/OLMoE-1B-7B-0924",
        "config": {
            "num_key_value_heads": 4,
            "intermediate_size": 32,  # expert width (OLMoE: 1024 = hidden/2)
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": False,
            "router_aux_loss_coef": 0.01 * AUX_COEF_SCALE,
        },
        "aux": {"kind": "switch", "coef": 0.01 * AUX_COEF_SCALE, "real_coef": 0.01,
                "description": f"Switch-Transformer load-balancing loss computed per MoE layer and averaged over "
                               f"layers, coefficient {0.01 * AUX_COEF_SCALE:g} ({AUX_COEF_SCALE} x OLMoE's 0.01)"},
        "train": {},
    },
    "tiny-qwen-moe": {
        "class": "Qwen2MoeForCausalLM",
        "config_class": "Qwen2MoeConfig",
        "mirrors": "Qwen/Qwen1.5-MoE-A2.7B",
        "config": {
            "num_key_value_heads": 4,
            "intermediate_size": 128,  # unused (no dense layers), kept equal to the shared expert
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 128,  # Qwen1.5-MoE: shared expert = 4 x expert width
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "router_aux_loss_coef": 0.001 * AUX_COEF_SCALE,
        },
        "aux": {"kind": "switch", "coef": 0.001 * AUX_COEF_SCALE, "real_coef": 0.001,
                "description": f"Switch-Transformer load-balancing loss computed per MoE layer and averaged over "
                               f"layers, coefficient {0.001 * AUX_COEF_SCALE:g} ({AUX_COEF_SCALE} x Qwen1.5-MoE's 0.001)"},
        "train": {},
    },
    "tiny-deepseek-v2": {
        "class": "DeepseekV2ForCausalLM",
        "config_class": "DeepseekV2Config",
        "mirrors": "deepseek-ai/DeepSeek-V2-Lite",
        "config": {
            "num_key_value_heads": 4,
            "intermediate_size": 256,  # the dense first layer (V2-Lite: 10944 ~ 7.8 x expert width)
            "moe_intermediate_size": 32,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "topk_method": "greedy",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "q_lora_rank": None,  # V2-Lite: no query compression
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "aux_loss_alpha": 0.001 * AUX_COEF_SCALE,  # key as in the original DeepSeek config
            "seq_aux": True,
        },
        "aux": {"kind": "seq", "coef": 0.001 * AUX_COEF_SCALE, "real_coef": 0.001,
                "description": f"DeepSeek-V2 expert-level balance loss computed per sequence (seq_aux) and summed "
                               f"over MoE layers, alpha {0.001 * AUX_COEF_SCALE:g} ({AUX_COEF_SCALE} x "
                               f"DeepSeek-V2-Lite's 0.001; transformers' DeepseekV2ForCausalLM does not compute "
                               f"this loss, so the trainer adds it)"},
        "train": {},
    },
}


def _redundancy_spec(n_experts: int, top_k: int, seed: int) -> dict:
    """A member of the redundancy family: ``tiny-olmoe``'s recipe at 4 layers, routing varied."""
    coef = SPECS["tiny-olmoe"]["aux"]["coef"]
    ratio = " (OLMoE's ratio)" if (n_experts, top_k) == (64, 8) else \
        " (Mixtral's ratio)" if (n_experts, top_k) == (8, 2) else ""
    return {
        "class": "OlmoeForCausalLM",
        "config_class": "OlmoeConfig",
        "mirrors": f"redundancy family: {n_experts} routed experts, top-{top_k}{ratio}",
        "family": "redundancy",
        "seed": seed,
        "config": {**SPECS["tiny-olmoe"]["config"], "num_hidden_layers": 4,
                   "num_experts": n_experts, "num_experts_per_tok": top_k},
        "aux": {**SPECS["tiny-olmoe"]["aux"],
                "description": f"Switch-Transformer load-balancing loss computed per MoE layer and averaged over "
                               f"layers, coefficient {coef:g} (as tiny-olmoe)"},
        "train": {},
    }


for _e, _k in REDUNDANCY_SETTINGS:
    for _s in REDUNDANCY_SEEDS:
        SPECS[redundancy_name(_e, _k, _s)] = _redundancy_spec(_e, _k, _s)


def _check_name(name: str) -> None:
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; the trainable models are {', '.join(SHIPPED_MODELS)}")


def train_config(name: str, **overrides) -> dict:
    """The training recipe of ``name`` (``TRAIN`` with the spec's overrides, then ``overrides``)."""
    _check_name(name)
    cfg = {**TRAIN, **SPECS[name]["train"]}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------

def set_determinism(seed: int, threads: int) -> dict:
    """Seed Python/NumPy/torch, fix the thread count and ask torch for deterministic kernels.

    Returns the previous torch settings, for :func:`restore_torch_settings`.
    """
    import random  # noqa: PLC0415

    import torch  # noqa: PLC0415

    previous = {"threads": torch.get_num_threads(),
                "deterministic": torch.are_deterministic_algorithms_enabled()}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return previous


def restore_torch_settings(previous: dict) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(previous["threads"])
    torch.use_deterministic_algorithms(previous["deterministic"])


# --------------------------------------------------------------------------------------------
# tokenizer and token streams
# --------------------------------------------------------------------------------------------

def training_lines(lines: list[str]) -> list[str]:
    """Non-empty stripped lines: the unit the tokenizer is trained on and documents are cut into."""
    return [ln.strip() for ln in lines if ln.strip()]


def train_tokenizer(lines: list[str], *, vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer trained on ``lines``, wrapped as ``PreTrainedTokenizerFast``.

    Token 0 is ``<|endoftext|>`` (end of each line/document, also used as eos), token 1 is
    ``<|pad|>``. No token is added automatically: ``tok(text)`` returns the bare BPE ids, as the
    audit's corpus builder expects.
    """
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_lines(lines), trainer=trainer, length=None)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def encode_stream(tokenizer, lines: list[str]) -> np.ndarray:
    """All non-empty lines, stripped, tokenized and concatenated with eos after each: one int64 stream."""
    texts = training_lines(lines)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return np.fromiter((t for enc in encodings for t in (*enc.ids, eos)), dtype=np.int64)


def eval_chunks(stream: np.ndarray, context: int, max_chunks: int | None = None) -> np.ndarray:
    """Non-overlapping ``context``-token chunks of ``stream`` (the incomplete tail is dropped)."""
    n = len(stream) // context
    if max_chunks is not None:
        n = min(n, max_chunks)
    return stream[: n * context].reshape(n, context)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

def build_config(name: str, *, eos_token_id: int, pad_token_id: int):
    import transformers  # noqa: PLC0415

    _check_name(name)
    spec = SPECS[name]
    cls = getattr(transformers, spec["config_class"])
    kwargs = {**COMMON, **spec["config"], "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
              "bos_token_id": None}
    config = cls(**kwargs)
    config.architectures = [spec["class"]]
    return config


def build_model(name: str, *, eos_token_id: int = 0, pad_token_id: int = 1):
    """A freshly initialised (seeded by the caller) model of ``name``."""
    import transformers  # noqa: PLC0415

    config = build_config(name, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return getattr(transformers, SPECS[name]["class"])(config)


def count_parameters(model) -> dict:
    """Total parameters, and the parameters one token touches (routed experts: top-k of E)."""
    cfg = model.config
    n_exp = int(getattr(cfg, "num_experts", None) or cfg.n_routed_experts)
    k = int(cfg.num_experts_per_tok)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return {"total": int(total), "routed_experts": int(routed),
            "active_per_token": int(total - routed + routed * k / n_exp)}


def balance_loss(name: str, router_logits, *, batch_size: int, seq_len: int):
    """The load-balancing auxiliary loss of ``name`` (before its coefficient).

    ``switch`` (OLMoE, Qwen1.5-MoE): per layer, ``E * sum_i f_i P_i`` with ``f_i`` the fraction
    of top-k slots routed to expert i (summing to k) and ``P_i`` its mean router probability;
    averaged over layers (value k when routing is balanced). transformers'
    ``load_balancing_loss_func`` instead pools f and P over all layers before taking the product,
    which lets one layer's overused expert offset another layer's starved one; with it, routing
    in the later layers of these small models collapsed onto a subset of experts.
    ``seq`` (DeepSeek-V2): the same product per sequence with ``f`` scaled to sum to E, averaged
    over sequences and summed over layers (value = number of MoE layers when balanced).
    """
    import torch  # noqa: PLC0415

    cfg = SPECS[name]
    n_exp = int(cfg["config"].get("num_experts") or cfg["config"]["n_routed_experts"])
    k = int(cfg["config"]["num_experts_per_tok"])
    if cfg["aux"]["kind"] == "switch":
        total = 0.0
        for logits in router_logits:
            probs = logits.float().softmax(dim=-1)
            idx = torch.topk(probs, k, dim=-1).indices
            counts = torch.zeros(n_exp, dtype=probs.dtype, device=probs.device)
            counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=probs.dtype, device=probs.device))
            total = total + n_exp * (counts / probs.shape[0] * probs.mean(dim=0)).sum()
        return total / len(router_logits)
    # DeepSeek-V2 sequence-wise expert balance loss: sum over layers of
    # mean_b sum_i f_{b,i} P_{b,i}, f = (E / (K T)) * #selections, P = mean routing probability.
    total = 0.0
    for logits in router_logits:
        scores = logits.float().softmax(dim=-1).view(batch_size, seq_len, n_exp)
        idx = torch.topk(scores, k, dim=-1).indices.view(batch_size, -1)
        counts = torch.zeros(batch_size, n_exp, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=scores.dtype))
        f = counts / (seq_len * k / n_exp)
        total = total + (f * scores.mean(dim=1)).sum(dim=1).mean()
    return total


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------

def _routers(model):
    """(decoder layer index, router module) for every MoE layer."""
    out = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(getattr(layer.mlp, "experts", None), "gate_up_proj"):
            out.append((i, gate))
    return out


def evaluate_model(model, chunks: np.ndarray, *, batch_size: int = 16) -> tuple[dict, dict]:
    """One pass over ``chunks``: ``(perplexity, utilisation)``.

    Perplexity: mean next-token negative log-likelihood (nats) and its exponential, each chunk
    scored on its tokens 1..L-1 (no context carried over from the previous chunk).

    Utilisation, per MoE layer: each routed expert's share of the routing mass (the sum of the gate
    weights the router gives it over all tokens, normalised to 1 per layer) and of the top-k
    selections, read from the routers' own outputs (logits, top-k weights, top-k indices).
    """
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    routers = _routers(model)
    n_exp = int(getattr(model.config, "num_experts", None) or model.config.n_routed_experts)
    mass = {i: torch.zeros(n_exp, dtype=torch.float64) for i, _ in routers}
    sel = {i: torch.zeros(n_exp, dtype=torch.float64) for i, _ in routers}

    def hook(layer_idx):
        def fn(_module, _inputs, output):
            _, weights, indices = output
            mass[layer_idx].index_add_(0, indices.reshape(-1), weights.reshape(-1).double())
            sel[layer_idx].index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.float64))
        return fn

    handles = [gate.register_forward_hook(hook(i)) for i, gate in routers]
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(chunks), batch_size):
                ids = torch.from_numpy(np.ascontiguousarray(chunks[i:i + batch_size]))
                logits = model(input_ids=ids, output_router_logits=False).logits.float()
                total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="sum"))
                n += ids[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ppl = {"nll": total / n, "perplexity": math.exp(total / n), "n_tokens": n}
    layers = {}
    for i, _ in routers:
        m = (mass[i] / mass[i].sum()).numpy()
        s = (sel[i] / sel[i].sum()).numpy()
        p = m[m > 0]
        layers[str(i)] = {
            "mass_share": [round(float(x), 7) for x in m],
            "selection_share": [round(float(x), 7) for x in s],
            "frac_experts_ge_threshold": float((m >= USAGE_THRESHOLD).mean()),
            "min_share": float(m.min()), "max_share": float(m.max()),
            "effective_experts": float(np.exp(-(p * np.log(p)).sum())),
        }
    util = {"threshold": USAGE_THRESHOLD, "n_experts": n_exp, "n_tokens": int(chunks.size), "layers": layers}
    return ppl, util


def unigram_perplexity(train_stream: np.ndarray, chunks: np.ndarray, vocab_size: int) -> dict:
    """Perplexity of the add-one-smoothed unigram model fitted on ``train_stream``, on the same
    targets :func:`evaluate_model` scores (tokens 1..L-1 of each chunk)."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = chunks[:, 1:].reshape(-1)
    nll = float(-logp[targets].mean())
    return {"nll": nll, "perplexity": math.exp(nll), "n_tokens": int(targets.size)}


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def lr_at(step: int, *, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    warm = min(warmup_steps, max(steps - 1, 0))
    if step < warm:
        return lr * (step + 1) / warm
    span = max(steps - warm - 1, 1)
    frac = min((step - warm) / span, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _batches(stream: np.ndarray, *, context: int, batch_size: int, generator):
    """Endless packed training batches: each epoch starts at a random offset, cuts the stream into
    ``context``-token chunks and visits them in a random order (incomplete last batch dropped)."""
    import torch  # noqa: PLC0415

    data = torch.from_numpy(stream)
    epoch = 0
    while True:
        offset = int(torch.randint(0, context, (1,), generator=generator))
        n = (len(stream) - offset) // context
        chunks = data[offset: offset + n * context].view(n, context)
        order = torch.randperm(n, generator=generator)
        for b in range(n // batch_size):
            yield epoch, chunks[order[b * batch_size:(b + 1) * batch_size]]
        epoch += 1


def _sha256(path: Path) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _data_files(data_dir):

    root = resolve(data_dir)
    if root is None:
        return {s: None for s in _LOCAL_NAMES}
    return {s: _local_file(s, root) for s in ("validation", "test")}


def train(name: str, *, seed: int | None = None, out: str | Path | None = None, steps: int | None = None,
          data_dir: str | Path | None = None, evaluate: bool = True, log_every: int = 100,
          verbose: bool = True) -> dict:
    """Train ``name`` from ``seed`` and save it (with tokenizer, log, summary and card) to ``out``.

    ``seed`` defaults to the model's own (0, or the ``-s<seed>`` of a redundancy-family name; another
    seed for a family member is refused for its shipped directory). Weights are stored in bfloat16
    (:data:`STORED_DTYPE`) and computed in float32: the gates are measured on the stored weights.

    ``steps`` overrides the recipe's number of optimiser steps (the cosine schedule follows it).
    ``evaluate=False`` skips the test-split measurements (used by the quick reproducibility test);
    it is refused for the shipped directory, whose models must pass the gates.

    The model is trained into a staging folder beside ``out``. With ``evaluate`` the quality gates
    (:func:`gate_failures`) are checked there; a miss raises :class:`GateError` naming every figure
    that missed, and ``out`` is left as it was. Only a model that passes replaces ``out`` (by a
    rename, so ``out`` never holds half a model). Returns the summary dictionary written to
    ``training_summary.json``.
    """
    _check_name(name)
    hp = train_config(name, steps=steps)
    out = Path(out) if out is not None else ZOO_DIR / name
    own_seed = SPECS[name].get("seed", 0)
    seed = own_seed if seed is None else int(seed)
    if "seed" in SPECS[name] and seed != own_seed and out.resolve() == (ZOO_DIR / name).resolve():
        raise ValueError(f"{name} is the seed-{own_seed} member of the redundancy family; train seed {seed} "
                         "into another --out")
    if not evaluate and out.resolve() == (ZOO_DIR / name).resolve():
        raise ValueError(f"evaluate=False would write {name} to its shipped directory {out} without checking the "
                         "quality gates; give another --out, or evaluate")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if (out / "training_summary.json").is_file():  # keep its reproducibility record if it is about this run
        shutil.copy2(out / "training_summary.json", staging / "training_summary.json")
    previous = set_determinism(seed, hp["threads"])
    try:
        summary = _train(name, seed=seed, out=staging, hp=hp, data_dir=data_dir, evaluate=evaluate,
                         log_every=log_every, verbose=verbose)
        missed = gate_failures(summary) if evaluate else []
        if missed:
            raise GateError(f"{name} (seed {seed}, {hp['steps']} steps) missed the quality gates; nothing was written "
                            f"to {out}: " + "; ".join(missed))
        _replace_dir(staging, out)
        return summary
    finally:
        restore_torch_settings(previous)
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``: renames only, the old ``target`` removed last."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _train(name, *, seed, out, hp, data_dir, evaluate, log_every, verbose) -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415


    t_start = time.time()

    def say(msg):
        if verbose:
            print(f"[{name} {time.time() - t_start:7.1f}s] {msg}", flush=True)

    valid_lines = load_wikitext2("validation", data_dir=data_dir)
    tokenizer = train_tokenizer(valid_lines, vocab_size=COMMON["vocab_size"],
                                model_max_length=COMMON["max_position_embeddings"])
    train_stream = encode_stream(tokenizer, valid_lines)
    say(f"tokenizer: {len(tokenizer)} tokens; validation stream {len(train_stream):,} tokens")

    torch.manual_seed(seed)
    model = build_model(name, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train()
    n_params = count_parameters(model)
    say(f"{SPECS[name]['class']}: {n_params['total']:,} parameters ({n_params['active_per_token']:,} active per token)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=tuple(hp["betas"]), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(train_stream, context=hp["context"], batch_size=hp["batch_size"], generator=gen)
    coef = SPECS[name]["aux"]["coef"]
    n_exp = int(getattr(model.config, "num_experts", None) or model.config.n_routed_experts)
    k_top = int(model.config.num_experts_per_tok)
    ema = {}
    log = []
    t_train, cpu_train = time.time(), time.process_time()
    epoch = 0
    for step in range(hp["steps"]):
        lr = lr_at(step, steps=hp["steps"], lr=hp["lr"], warmup_steps=hp["warmup_steps"],
                   min_lr_ratio=hp["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        epoch, ids = next(batches)
        outputs = model(input_ids=ids, output_router_logits=True)
        logits = outputs.logits.float()
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        aux = balance_loss(name, outputs.router_logits, batch_size=ids.shape[0], seq_len=ids.shape[1])
        loss = lm + coef * aux
        with torch.no_grad():  # running routing mass per layer (diagnostic only)
            for j, logits in enumerate(outputs.router_logits):
                w, idx = torch.topk(logits.float().softmax(dim=-1), k_top, dim=-1)
                batch_mass = torch.zeros(n_exp, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1).double())
                ema[j] = batch_mass / batch_mass.sum() if step == 0 else 0.98 * ema[j] + 0.02 * batch_mass / batch_mass.sum()
            used = min(float((e >= USAGE_THRESHOLD).double().mean()) for e in ema.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        log.append({"step": step + 1, "loss": float(lm.detach()), "aux_loss": float(aux.detach()),
                    "total_loss": float(loss.detach()), "grad_norm": float(gnorm), "lr": lr,
                    "min_frac_experts_used": used, "epoch": epoch, "elapsed_s": round(time.time() - t_train, 3)})
        if step == 0 or (step + 1) % log_every == 0 or step + 1 == hp["steps"]:
            say(f"step {step + 1}/{hp['steps']} loss {log[-1]['loss']:.4f} aux {log[-1]['aux_loss']:.4f} "
                f"lr {lr:.2e} experts used (running, worst layer) {used:.3f}")
    train_wall, train_cpu = time.time() - t_train, time.process_time() - cpu_train
    model.eval()

    _write_log(out / "training_log.csv", log)
    # Trained with router logits on (the balance loss needs them); shipped with them off, as in the
    # real checkpoints, so that ``model(..., labels=...)`` returns the plain language-model loss.
    model.config.output_router_logits = False
    model.save_pretrained(out)
    store_weights(out / "model.safetensors")
    tokenizer.save_pretrained(out)

    files = _data_files(data_dir)
    summary = {
        "name": name,
        "class": SPECS[name]["class"],
        "mirrors": SPECS[name]["mirrors"],
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": __import__("tokenizers").__version__, "numpy": np.__version__},
        "architecture": {**COMMON, **SPECS[name]["config"]},
        "parameters": n_params,
        "weights": {"stored_dtype": STORED_DTYPE, "compute_dtype": "float32",
                    "file_mb": round((out / "model.safetensors").stat().st_size / 2**20, 2)},
        "family": SPECS[name].get("family", "default"),
        "aux_loss": SPECS[name]["aux"],
        "training": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()},
                     "optimizer": "AdamW (no weight decay on norms and 1-d parameters)",
                     "schedule": "linear warm-up, cosine decay to min_lr_ratio * lr",
                     "tokens": int(hp["steps"] * hp["batch_size"] * hp["context"]),
                     "epochs": round(hp["steps"] * hp["batch_size"] * hp["context"] / len(train_stream), 2),
                     "deterministic": True,
                     "output_router_logits": "on during training (balance loss); off in the shipped config",
                     "wall_s": round(train_wall, 1),
                     "cpu_s": round(train_cpu, 1),
                     "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                     "final_loss_mean_last_50": float(np.mean([r["loss"] for r in log[-50:]]))},
        "data": {"train_split": "validation", "eval_split": "test",
                 "corpus": "WikiText-2 (tokenized release v1)",
                 "train_file_sha256": _sha256(files.get("validation")),
                 "test_file_sha256": _sha256(files.get("test")),
                 "train_stream_tokens": int(len(train_stream))},
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "trained_on": "validation split", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
    }
    if evaluate:
        test_stream = encode_stream(tokenizer, load_wikitext2("test", data_dir=data_dir))
        chunks = eval_chunks(test_stream, hp["context"])
        # score what is shipped: the stored (bfloat16) weights, computed in float32
        reloaded = getattr(transformers, SPECS[name]["class"]).from_pretrained(out, dtype=torch.float32)
        ppl, util = evaluate_model(reloaded, chunks)
        uni = unigram_perplexity(train_stream, chunks, len(tokenizer))
        summary["data"]["test_stream_tokens"] = int(len(test_stream))
        summary["evaluation"] = {
            "split": "test", "context": hp["context"], "n_chunks": int(len(chunks)),
            "model": ppl, "unigram_baseline": uni,
            "perplexity_ratio_to_unigram": ppl["perplexity"] / uni["perplexity"],
            "utilisation": util,
            "min_frac_experts_ge_threshold": min(v["frac_experts_ge_threshold"] for v in util["layers"].values()),
        }
        summary["regime"] = measure_regime(out, data_dir=data_dir)
        say(f"test perplexity {ppl['perplexity']:.1f} vs unigram {uni['perplexity']:.1f}; "
            f"min fraction of experts with >= {USAGE_THRESHOLD:.1%} of mass: "
            f"{summary['evaluation']['min_frac_experts_ge_threshold']:.3f}")
    summary["wall_s_total"] = round(time.time() - t_start, 1)
    old = out / "training_summary.json"
    if old.is_file():  # keep an existing reproducibility record only if it is about this very run
        prev = json.loads(old.read_text())
        rep = prev.get("reproducibility")
        if rep and rep.get("seed") == seed and rep.get("steps") == hp["steps"] and \
                _sha256(out / "training_log.csv") == rep.get("reference_log_sha256"):
            summary["reproducibility"] = rep
    write_summary(out, summary)
    say(f"saved to {out} ({_dir_mb(out):.2f} MB)")
    return summary


#: dtype of the shipped weights (computed in float32: :func:`moeaudit.models.load_model` upcasts).
STORED_DTYPE = "bfloat16"
#: the largest shipped weights file of one model, MB (2**20 bytes)
MAX_WEIGHTS_MB = 10.0


def store_weights(path: Path) -> None:
    """Rewrite the float32 ``model.safetensors`` at ``path`` with every floating tensor rounded to
    :data:`STORED_DTYPE` (round to nearest even, torch's ``Tensor.to``); the config keeps float32,
    so ``from_pretrained`` computes in float32. ``ValueError`` if the file would exceed
    :data:`MAX_WEIGHTS_MB`."""
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    tensors = load_file(str(path))
    dtype = getattr(torch, STORED_DTYPE)
    stored = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(stored, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)
    mb = Path(path).stat().st_size / 2**20
    if mb > MAX_WEIGHTS_MB:
        raise ValueError(f"{path} holds {mb:.1f} MB of weights, more than the {MAX_WEIGHTS_MB:g} MB allowed")


def _write_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def read_log(path: str | Path):
    import pandas as pd  # noqa: PLC0415

    return pd.read_csv(path)


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 2**20


def write_summary(out: Path, summary: dict) -> None:
    (Path(out) / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (Path(out) / "README.md").write_text(model_card(summary))


def model_card(s: dict) -> str:
    """A short model card (``README.md``) from a training summary."""
    a, t = s["architecture"], s["training"]
    if s.get("family") == "redundancy":
        intro = (f"A small `{s['class']}` trained from scratch (seed {s['seed']}), a member of the redundancy family "
                 "of the book *From Observation to Intervention: A Causal Audit of Expert Importance in MoE Models* "
                 f"({s['mirrors'].removeprefix('redundancy family: ')}). The family's models share data, tokenizer, "
                 "width, depth, steps and seed policy; their recipes differ only in routing, so that the effect of the number of "
                 "active experts can be measured. It is not a useful language model.")
    else:
        intro = (f"A small `{s['class']}` trained from scratch (seed {s['seed']}) as a stand-in for "
                 f"`{s['mirrors']}` in the book *From Observation to Intervention: A Causal Audit of Expert "
                 "Importance in MoE Models*. It keeps the routing structure of the real model "
                 "(number of routed experts, top-k, shared experts) at a size that runs on a laptop CPU. "
                 "It is not a useful language model and reproduces none of the paper's numbers by itself.")
    w = s.get("weights")
    lines = [
        f"# {s['name']}", "", intro, "",
        "## Architecture", "",
        f"- {a['num_hidden_layers']} layers, hidden size {a['hidden_size']}, {a['num_attention_heads']} heads, "
        f"vocabulary {a['vocab_size']}, context {a['max_position_embeddings']}",
        f"- parameters: {s['parameters']['total']:,} in total, {s['parameters']['active_per_token']:,} active per token",
        f"- load balancing: {s['aux_loss']['description']}",
        *([f"- weights stored in {w['stored_dtype']} ({w['file_mb']} MB), computed in {w['compute_dtype']}"] if w else []),
        "",
        "## Training", "",
        f"- data: WikiText-2 {s['data']['train_split']} split ({s['data']['train_stream_tokens']:,} tokens); "
        f"the {s['data']['eval_split']} split is held out",
        f"- {t['steps']} AdamW steps of {t['batch_size']} x {t['context']} tokens ({t['tokens']:,} tokens, "
        f"{t['epochs']} epochs), peak learning rate {t['lr']}, {t['schedule']}",
        f"- {t['wall_s']} s wall clock, {t.get('cpu_s', 'not recorded')} s of processor time on {t['threads']} CPU "
        f"thread(s), torch {s['versions']['torch']}, transformers {s['versions']['transformers']}",
        f"- reproduce: `python -m moeaudit.tooling.training {s['name']} --seed {s['seed']}`", "",
    ]
    ev = s.get("evaluation")
    if ev:
        lines += [
            "## Evaluation (WikiText-2 test split)", "",
            f"- perplexity {ev['model']['perplexity']:.1f} (unigram baseline with the same tokenizer: "
            f"{ev['unigram_baseline']['perplexity']:.1f}) over {ev['model']['n_tokens']:,} tokens",
            f"- expert utilisation: in every MoE layer at least {ev['min_frac_experts_ge_threshold']:.1%} of routed "
            f"experts receive >= {ev['utilisation']['threshold']:.1%} of the routing mass",
            f"- quality gates (checked before the model was written): perplexity ratio to the unigram baseline "
            f"{ev['perplexity_ratio_to_unigram']:.3f} (at most {PPL_RATIO_MAX}); share of experts used in the worst "
            f"layer {ev['min_frac_experts_ge_threshold']:.1%} (at least {MIN_FRAC_USED:.0%})", "",
        ]
    reg = s.get("regime")
    if reg:
        e, w = reg["embedded"], reg["wikitext-2"]
        lines += ["## The text the book audits it on", "",
                  f"Measured on {reg['measurement']}.", "",
                  "| text | model loss | in-sample unigram | uniform guess | gain | scored tokens |",
                  "|---|---|---|---|---|---|"]
        for label, r in ((f"embedded corpus ({e['text_form']} form)", e), ("WikiText-2 test split", w)):
            if r:
                lines.append(f"| {label} | {r['mean_loss']:.3f} | {r['unigram_loss']:.3f} | {r['uniform_loss']:.3f} | "
                             f"{r['gain']:.3f} | {r['n_tokens']:,} |")
        if reg.get("gain_ratio") is not None:
            lines += ["", f"- quality gate: the gain on the embedded corpus is {reg['gain_ratio']:.2f} of the gain on "
                      f"WikiText-2 test (at least {REGIME_GAIN_RATIO_MIN})"]
        lines.append("")
    rep = s.get("reproducibility")
    if rep:
        lines += ["## Reproducibility", "",
                  f"- retrained with the same seed: maximum absolute difference of the loss curves "
                  f"{rep['max_abs_loss_diff']:.3g} over {rep['steps']} steps; maximum absolute difference of the "
                  f"weights {rep['max_abs_param_diff']:.3g}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# reproducibility check
# --------------------------------------------------------------------------------------------

def check_reproducibility(name: str, *, model_dir: str | Path | None = None, data_dir=None,
                          record: bool = True, verbose: bool = True) -> dict:
    """Retrain ``name`` with the seed and step count recorded in ``model_dir`` and compare.

    Reports the maximum absolute difference between the two loss curves (and between the two
    sets of weights). With ``record=True`` the result is stored in the summary and model card,
    and the rerun's curve in ``reproducibility_log.csv``.
    """
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    model_dir = Path(model_dir) if model_dir is not None else ZOO_DIR / name
    summary = json.loads((model_dir / "training_summary.json").read_text())
    ref = read_log(model_dir / "training_log.csv")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        train(name, seed=summary["seed"], out=tmp, steps=summary["training"]["steps"], data_dir=data_dir,
              evaluate=False, verbose=verbose)
        wall = time.time() - t0
        rerun_summary = json.loads((Path(tmp) / "training_summary.json").read_text())
        rerun = read_log(Path(tmp) / "training_log.csv")
        a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(Path(tmp) / "model.safetensors"))
        param_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        same_keys = set(a) == set(b)
    n = min(len(ref), len(rerun))
    diff = (ref["loss"].to_numpy()[:n] - rerun["loss"].to_numpy()[:n])
    result = {
        "seed": summary["seed"], "steps": int(n), "lengths_equal": bool(len(ref) == len(rerun)),
        "max_abs_loss_diff": float(np.abs(diff).max()),
        "max_abs_aux_loss_diff": float(np.abs(ref["aux_loss"].to_numpy()[:n] - rerun["aux_loss"].to_numpy()[:n]).max()),
        "max_abs_param_diff": param_diff, "same_parameter_names": same_keys,
        "rerun_wall_s": round(wall, 1), "rerun_train_wall_s": rerun_summary["training"]["wall_s"],
        "rerun_train_cpu_s": rerun_summary["training"]["cpu_s"], "threads": summary["training"]["threads"],
        "torch": torch.__version__, "checked": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference_log_sha256": _sha256(model_dir / "training_log.csv"),
    }
    if record:
        rep = ref[["step", "loss"]].iloc[:n].rename(columns={"loss": "loss_shipped"}).copy()
        rep["loss_rerun"] = rerun["loss"].to_numpy()[:n]
        rep["abs_diff"] = np.abs(diff)
        rep.to_csv(model_dir / "reproducibility_log.csv", index=False)
        summary["reproducibility"] = result
        write_summary(model_dir, summary)
    if verbose:
        print(json.dumps({k: v for k, v in result.items() if k != "reference_log_sha256"}, indent=1))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeaudit.tooling.training", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=SHIPPED_MODELS)
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the model's own)")
    p.add_argument("--out", default=None, help="output directory (default: the package's zoo/<name>/)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the model's recipe)")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2/ (default: $MOEAUDIT_DATA_DIR)")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    p.add_argument("--regime", action="store_true",
                   help="do not train: measure the model's loss against the in-sample unigram on the embedded corpus "
                        "and on WikiText-2 test, and record it in its summary and card")
    p.add_argument("--check-repro", action="store_true",
                   help="do not train: retrain the model in --out (or the zoo) with its recorded seed and "
                        "steps and report the difference of the loss curves")
    args = p.parse_args(argv)
    if args.regime:
        try:
            reg = record_regime(args.name, data_dir=args.data_dir, model_dir=args.out)
        except FileNotFoundError as err:
            print(f"FAILED: {err}", file=sys.stderr)
            return 2
        print(json.dumps(reg, indent=1))
        return 0 if reg["gain_ratio"] >= REGIME_GAIN_RATIO_MIN else 1
    if args.check_repro:
        res = check_reproducibility(args.name, model_dir=args.out, data_dir=args.data_dir)
        return 0 if res["max_abs_loss_diff"] == 0.0 else 1
    try:
        train(args.name, seed=args.seed, out=args.out, steps=args.steps, data_dir=args.data_dir,
              evaluate=not args.no_eval)
    except (GateError, ValueError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
