"""Tiny random-weight models of every supported family, built from their config classes.

Used by the contract tests and the benchmarks: no download, seconds to build, the same
transformers classes (and so the same router/experts code) as the real checkpoints.
"""

from __future__ import annotations

import nnsight  # noqa: F401  (must precede transformers.models.* imports)
import torch

from .models import AuditModel, wrap_model

TINY_VOCAB = 128


def tiny_config(family: str, *, vocab_size: int = TINY_VOCAB, hidden_size: int = 32, n_layers: int = 3,
                num_experts: int = 8, top_k: int = 2, **overrides):
    """A small config of ``family`` with the family's structural quirks kept."""
    import transformers as tf  # noqa: PLC0415

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                  tie_word_embeddings=False)
    if family == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=16, num_experts=num_experts)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=16, num_local_experts=num_experts)
    elif family == "qwen2_moe":
        # one sigmoid-gated shared expert; the last layer is dense (mlp_only_layers) to exercise skipping
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
                                shared_expert_intermediate_size=24, mlp_only_layers=[n_layers - 1],
                                norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
                                head_dim=8, norm_topk_prob=True)
    elif family == "deepseek_v2":
        common["num_key_value_heads"] = 4
        cfg = tf.DeepseekV2Config(**common, intermediate_size=24, moe_intermediate_size=16, n_routed_experts=num_experts,
                                  n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                  qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=1.0,
                                  topk_method="greedy")
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_random_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> AuditModel:
    """A randomly initialised tiny model of ``family``, wrapped for the audit."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = tiny_config(family, **config_kwargs)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Random init leaves router weights tiny; scale them so that routing is not a near-tie
    # everywhere (ties make "which expert is active" numerically fragile in tests).
    with torch.no_grad():
        for layer in hf.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "weight"):
                gate.weight.normal_(0.0, 0.5)
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None and hasattr(experts, "gate_up_proj"):
                experts.gate_up_proj.normal_(0.0, 0.2)
                experts.down_proj.normal_(0.0, 0.2)
    return wrap_model(hf, name=f"tiny-random-{family}")


def tiny_word_tokenizer(*, vocab_size: int = TINY_VOCAB):
    """A word-level fast tokenizer over ``<pad>``, ``<unk>``, ``w2`` .. ``w{vocab_size-1}`` (ids equal
    to the word numbers), so that a saved tiny model loads with a tokenizer and no download."""
    from tokenizers import Tokenizer  # noqa: PLC0415
    from tokenizers.models import WordLevel  # noqa: PLC0415
    from tokenizers.pre_tokenizers import Whitespace  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def save_tiny_checkpoint(model: AuditModel, path) -> None:
    """``save_pretrained`` of a tiny model plus :func:`tiny_word_tokenizer`, as a loadable directory."""
    model.hf.save_pretrained(path)
    tiny_word_tokenizer(vocab_size=model.hf.config.vocab_size).save_pretrained(path)


def random_token_corpus(*, n_seqs: int = 3, length: int = 24, vocab_size: int = TINY_VOCAB, seed: int = 0,
                        ragged: bool = True):
    """A :class:`~moeaudit.corpus.TokenizedCorpus` of random ids (ids >= 1; 0 is padding)."""
    import numpy as np  # noqa: PLC0415

    from .corpus import TokenizedCorpus  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    lens = [length - (3 * i if ragged else 0) for i in range(n_seqs)]
    return TokenizedCorpus.from_token_ids([rng.integers(1, vocab_size, size=n) for n in lens], source="random")


def tiny_audit_context(results_dir, *, n_layers: int = 3, num_experts: int = 8, top_k: int = 3, n_seqs: int = 4,
                       length: int = 30):
    """An :class:`moeaudit.audit.AuditContext` on a tiny random OLMoE and a random-token corpus, with
    its clean pass and observational metrics, caching records under ``results_dir`` (tests only)."""
    from .audit import AuditContext  # noqa: PLC0415
    from .engine import clean_pass  # noqa: PLC0415
    from .metrics import observational_metrics  # noqa: PLC0415

    model = tiny_random_model("olmoe", n_layers=n_layers, num_experts=num_experts, top_k=top_k)
    corpus = random_token_corpus(n_seqs=n_seqs, length=length)
    clean = clean_pass(model, corpus, progress=False)
    metrics = observational_metrics(clean, num_experts=num_experts)
    return AuditContext(model, corpus, clean, metrics, {"model": "tiny", "corpus": corpus.fingerprint()}, results_dir)
