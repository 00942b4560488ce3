"""Tiny random-weight models of every supported family, built from their config classes.

Used by the contract tests and the benchmarks: no download, seconds to build, the same
transformers classes (and so the same router/experts code) as the real checkpoints.
"""

from __future__ import annotations

import nnsight  # noqa: F401  (must precede transformers.models.* imports)
import torch

from ..audit import AuditContext
from ..corpus import TokenizedCorpus
from ..engine import clean_pass
from ..families import FAMILIES
from ..metrics import observational_metrics
from ..models import AuditModel, wrap_model

TINY_VOCAB = 128


# Per family: (config class of transformers, keyword arguments beyond the common ones). ``{E}``, ``{k}``
# and ``{n}`` are filled with the number of experts, top-k and layers. Structural quirks are kept: a
# dense layer where the family has them, shared experts, sigmoid group routers with two groups,
# sliding-window and linear-attention layers.
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8,
            v_head_dim=8)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts="{E}")),
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts="{E}")),
    # one sigmoid-gated shared expert; the last layer is dense (mlp_only_layers) to exercise skipping
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts="{E}",
                                         shared_expert_intermediate_size=24, mlp_only_layers="{last}",
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts="{E}", head_dim=8,
                                         norm_topk_prob=True)),
    "deepseek_v2": ("DeepseekV2Config", dict(_MLA, intermediate_size=24, moe_intermediate_size=16,
                                             n_routed_experts="{E}", n_shared_experts=2, first_k_dense_replace=1,
                                             routed_scaling_factor=1.0, topk_method="greedy")),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA, intermediate_size=24, moe_intermediate_size=16,
                                             n_routed_experts="{E}", n_shared_experts=1, first_k_dense_replace=1,
                                             n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts="{E}",
                                       n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                       head_dim=8, routed_scaling_factor=1.5, norm_topk_prob=True)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(_MLA, intermediate_size=24, moe_intermediate_size=16,
                                                n_routed_experts="{E}", n_shared_experts=1, n_group=1, topk_group=1,
                                                mlp_layer_types="{dense_first}", routed_scaling_factor=1.8)),
    "dots1": ("Dots1Config", dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts="{E}",
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=8)),
    "solar_open": ("SolarOpenConfig", dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts="{E}",
                                           n_shared_experts=1, n_group=1, topk_group=1, head_dim=8)),
    "exaone_moe": ("ExaoneMoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts="{E}",
                                           num_shared_experts=1, mlp_layer_types="{dense_first}", n_group=1,
                                           topk_group=1, head_dim=8, sliding_window=8,
                                           layer_types="{sliding_full}")),
    "minimax_m2": ("MiniMaxM2Config", dict(intermediate_size=16, num_local_experts="{E}", head_dim=8)),
    "flex_olmo": ("FlexOlmoConfig", dict(intermediate_size=16, num_experts="{E}")),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=16, num_experts="{E}", moe_topk="{k}", head_dim=8)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, moe_num_experts="{E}",
                                                moe_k="{k}", moe_num_shared_experts=1, moe_layer_start_index=1,
                                                moe_layer_end_index="{last}", moe_layer_interval=1)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=16, num_local_experts="{E}")),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=16, num_local_experts="{E}")),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(intermediate_size=16, num_local_experts="{E}",
                                                        shared_intermediate_size=16)),
    # yarn RoPE as in the real checkpoints, its factor consistent with the tiny context (32 x 16 = 512)
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_local_experts="{E}", head_dim=8, sliding_window=8,
                                     layer_types="{sliding_full}",
                                     rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                      "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                                      "original_max_position_embeddings": 16})),
    "llama4_text": ("Llama4TextConfig", dict(intermediate_size=16, intermediate_size_mlp=24, num_local_experts="{E}",
                                             head_dim=8, moe_layers="{all_but_first}", interleave_moe_layer_step=1,
                                             layer_types="{full}", attention_chunk_size=512, no_rope_layers="{ones}")),
    "qwen3_next": ("Qwen3NextConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts="{E}",
                                           shared_expert_intermediate_size=24, head_dim=8, linear_num_key_heads=2,
                                           linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                           layer_types="{linear_full}", norm_topk_prob=True)),
}


def _fill(value, *, num_experts: int, top_k: int, n_layers: int):
    if not isinstance(value, str) or not value.startswith("{"):
        return value
    return {"{E}": num_experts, "{k}": top_k, "{last}": [n_layers - 1] if value == "{last}" else None,
            "{dense_first}": ["dense"] + ["sparse"] * (n_layers - 1),
            "{all_but_first}": list(range(1, n_layers)), "{full}": ["full_attention"] * n_layers,
            "{ones}": [1] * n_layers,
            "{sliding_full}": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers - 1)]
            + ["full_attention"],
            "{linear_full}": ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers - 1)]
            + ["full_attention"]}[value]


def tiny_config(family: str, *, vocab_size: int = TINY_VOCAB, hidden_size: int = 32, n_layers: int = 3,
                num_experts: int = 8, top_k: int = 2, **overrides):
    """A small config of ``family`` (a model_type of :data:`TINY_CONFIGS`) with the family's structural
    quirks kept. ``overrides`` are set on the config afterwards. ``ValueError`` for a family without
    a tiny configuration."""
    import transformers as tf  # noqa: PLC0415

    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for family {family!r}; families with one: {', '.join(TINY_CONFIGS)}")
    cls_name, extra = TINY_CONFIGS[family]
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                  tie_word_embeddings=False)
    kwargs = {**common, **{k: _fill(v, num_experts=num_experts, top_k=top_k, n_layers=n_layers)
                           for k, v in extra.items()}}
    if family == "ernie4_5_moe":
        kwargs["moe_layer_end_index"] = n_layers - 1
    cfg = getattr(tf, cls_name)(**kwargs)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_random_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> AuditModel:
    """A randomly initialised tiny model of ``family``, wrapped for the audit."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415


    torch.manual_seed(seed)
    cfg = tiny_config(family, **config_kwargs)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    spec = FAMILIES[family]
    # Random init leaves router weights tiny; scale them so that routing is not a near-tie
    # everywhere (ties make "which expert is active" numerically fragile in tests).
    with torch.no_grad():
        for layer in hf.model.layers:
            block = getattr(layer, spec.block, None)
            gate = getattr(block, spec.router, None)
            if gate is not None and hasattr(gate, "weight"):
                gate.weight.normal_(0.0, 0.5)
            experts = getattr(block, spec.experts, None)
            if experts is not None and hasattr(experts, "gate_up_proj"):
                experts.gate_up_proj.normal_(0.0, 0.2)
                experts.down_proj.normal_(0.0, 0.2)
                for bias in ("gate_up_proj_bias", "down_proj_bias"):
                    if hasattr(experts, bias):
                        getattr(experts, bias).normal_(0.0, 0.2)
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


    rng = np.random.default_rng(seed)
    lens = [length - (3 * i if ragged else 0) for i in range(n_seqs)]
    return TokenizedCorpus.from_token_ids([rng.integers(1, vocab_size, size=n) for n in lens], source="random")


def tiny_audit_context(results_dir, *, n_layers: int = 3, num_experts: int = 8, top_k: int = 3, n_seqs: int = 4,
                       length: int = 30):
    """An :class:`moeaudit.audit.AuditContext` on a tiny random OLMoE and a random-token corpus, with
    its clean pass and observational metrics, caching records under ``results_dir`` (tests only)."""

    model = tiny_random_model("olmoe", n_layers=n_layers, num_experts=num_experts, top_k=top_k)
    corpus = random_token_corpus(n_seqs=n_seqs, length=length)
    clean = clean_pass(model, corpus, progress=False)
    metrics = observational_metrics(clean, num_experts=num_experts)
    return AuditContext(model, corpus, clean, metrics, {"model": "tiny", "corpus": corpus.fingerprint()}, results_dir)


def main(argv=None) -> int:
    """``python -m moeaudit.tooling.testing save-tiny FAMILY DIR [--seed N]``: save a tiny random model of
    ``FAMILY`` (a model_type of :data:`TINY_CONFIGS`) with a word-level tokenizer as a checkpoint
    directory that :func:`moeaudit.models.load_model` (and every chapter's ``models``) accepts."""
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m moeaudit.tooling.testing")
    sub = ap.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save-tiny", help="save a tiny random checkpoint of one MoE family")
    save.add_argument("family", choices=sorted(TINY_CONFIGS))
    save.add_argument("directory")
    save.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = tiny_random_model(args.family, seed=args.seed)
    save_tiny_checkpoint(model, args.directory)
    print(f"saved a tiny random {args.family} model to {args.directory} "
          f"(MoE layers {list(model.layout.moe_layers)}, {model.layout.num_experts} experts, top-{model.layout.top_k})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
