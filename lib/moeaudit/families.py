"""One layout description per MoE family of transformers 5.23: the registry the audit reads.

Every entry of :data:`FAMILIES` is data, not code: where a decoder layer keeps its MoE block,
router and fused experts module, what the router returns, how the top-k selection and the
combine weights are formed, which quantity the audit records as the routing weight
``g_e(x_t)``, where the combine weight is applied (to the expert's output or to its input),
shared experts and their gate, and which layers are dense. :data:`REFUSED` names, for every
other ``model_type`` of transformers 5.23 with an MoE block, why it is not audited.

The intervention is the same for every family (see :mod:`moeaudit.engine`): inside the traced
forward the combine weight of every removed (token row, expert) pair is set to zero where the MoE
block hands it to the experts module, and nothing else changes.

* ``combine_site="experts_input"``: the experts module is called as
  ``experts(hidden_states, top_k_index, top_k_weights)`` (every class decorated with transformers'
  ``@use_experts_implementation``) and multiplies expert ``e``'s output by its combine weight. The
  engine rewrites ``top_k_weights`` of that call, so the block output loses exactly
  ``w_e(x_t) E_e(x_t)`` (experts with biases, gpt-oss, included: the bias is inside ``E_e``).
* ``combine_site="router_scores"`` (Llama 4): the router returns a dense (tokens, experts) score
  matrix, zero off the top-k; the block multiplies each expert's *input* by its score,
  ``routed_in = x * s_e`` and the experts have no bias, so a zero score gives ``E_e(0) = 0``. The
  engine zeroes the removed experts' scores in the router output: the block output loses exactly
  ``E_e(s_e x_t)``, the expert's whole contribution (not ``s_e E_e(x_t)``; the expert is not
  linear in its input).

The routing weight ``g_e(x_t)`` (``routing_weight``) is the paper's softmax probability over all
experts where the router defines one (``"softmax"``: ``softmax(router_logits)[e]``). Sigmoid
routers (DeepSeek-V3, GLM-4.5, dots1, ...) score each expert independently: the analogue is the
expert's sigmoid affinity ``sigmoid(router_logits)[e]`` (``"sigmoid"``), the quantity their combine
weights are made from (then normalised over the top-k and scaled); the selection bias
``e_score_correction_bias`` only changes which experts win, never a weight, and is not included.
Top-k-then-softmax routers (gpt-oss, Granite-MoE) never compute a probability over all experts;
the analogue recorded is ``softmax(router_logits)`` over all experts, the probability that
softmax-then-top-k-then-renormalise routers (Mixtral) compute before renormalising, so the two
designs are measured on the same scale (their combine weights coincide: the renormalised top-k
softmax equals the softmax of the top-k logits).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

COMBINE_SITES = ("experts_input", "router_scores")
ROUTING_WEIGHTS = ("softmax", "sigmoid")
#: how a family's attention is masked, which the packed key/value step must reproduce:
#: "causal" (no sliding window, whatever the config says), "window_by_config" (one mask for every
#: layer, windowed iff ``config.sliding_window`` is set), "per_layer_type" (one mask per entry of
#: ``config.layer_types``: full, sliding, or types a packed step cannot build)
ATTENTION_MASKS = ("causal", "window_by_config", "per_layer_type")
MOE_LAYER_RULES = ("all", "first_k_dense_replace", "mlp_only_layers", "mlp_layer_types", "moe_layers_list",
                   "moe_layer_range")


#: when a config makes some layer compute positions from the cache length (FamilySpec.positions_from_cache):
#: "nope_temperature_tuning": Llama 4's attention-temperature tuning, applied in its NoPE layers
#: (``no_rope_layers[i] == 0``), scales queries by positions counted from the cache length
POSITIONS_FROM_CACHE = {
    "nope_temperature_tuning": lambda cfg: bool(getattr(cfg, "attn_temperature_tuning", False))
    and any(not use_rope for use_rope in (getattr(cfg, "no_rope_layers", None) or [])),
}


@dataclass(frozen=True)
class FamilySpec:
    """How one ``model_type`` lays out its MoE blocks (module attributes are relative to a decoder
    layer, ``model.model.layers[i]``)."""

    model_type: str
    name: str  # the family's usual name
    block: str = "mlp"  # attribute of a decoder layer holding the MoE block
    router: str = "gate"  # attribute of the block: the router module
    experts: str = "experts"  # attribute of the block: the fused routed-experts module
    # router output: "logits_weights_indices" = (router_logits, top-k combine weights, top-k indices);
    # "scores_logits" = (dense (tokens, experts) scores, zero off the top-k; router_logits) (Llama 4)
    router_output: str = "logits_weights_indices"
    block_output_index: int | None = None  # index of the hidden states when the block returns a tuple
    combine_site: str = "experts_input"
    # how the experts module is called: "top_k" = experts(hidden_states, top_k_index, top_k_weights);
    # "expert_major" = experts(rows) with rows grouped expert by expert, (E * M, H) (Llama 4)
    experts_call: str = "top_k"
    routing_weight: str = "softmax"  # what the audit records as g_e(x_t): see the module docstring
    selection: str = "top-k of softmax(router logits)"
    combine: str = "top-k softmax probabilities"
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    moe_layers: str = "all"  # one of MOE_LAYER_RULES
    shared: str | None = None  # path from a decoder layer to the shared expert(s), never touched
    shared_gate: str | None = None  # path from a decoder layer to the shared expert's sigmoid gate
    n_shared_key: str | None = None  # config key counting shared experts (fused into one module)
    norm_topk_prob: bool | str = False  # True/False, or the config key holding it
    scaling_key: str | None = None  # config key of a factor multiplying every combine weight
    reroute: str | None = None  # how moeaudit.pruning re-runs the router: "softmax_topk", "softmax_topk_scaled"
    attention_masks: str = "causal"  # one of ATTENTION_MASKS (read off the family's modeling code)
    # a rule of POSITIONS_FROM_CACHE: when it holds for a config, some layer reads its positions from the
    # cache length (not only from position_ids), so the packed key/value step would compute wrong rows and
    # is refused (read off the family's modeling code)
    positions_from_cache: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.combine_site not in COMBINE_SITES:
            raise ValueError(f"combine_site={self.combine_site!r} is not one of {COMBINE_SITES}")
        if self.routing_weight not in ROUTING_WEIGHTS:
            raise ValueError(f"routing_weight={self.routing_weight!r} is not one of {ROUTING_WEIGHTS}")
        if self.attention_masks not in ATTENTION_MASKS:
            raise ValueError(f"attention_masks={self.attention_masks!r} is not one of {ATTENTION_MASKS}")
        if self.positions_from_cache is not None and self.positions_from_cache not in POSITIONS_FROM_CACHE:
            raise ValueError(f"positions_from_cache={self.positions_from_cache!r} is not one of {tuple(POSITIONS_FROM_CACHE)}")
        if self.moe_layers not in MOE_LAYER_RULES:
            raise ValueError(f"moe_layers={self.moe_layers!r} is not one of {MOE_LAYER_RULES}")

    @property
    def logits_index(self) -> int:
        """Position of the router logits in the router's output tuple."""
        return 1 if self.router_output == "scores_logits" else 0


_SOFTMAX_RENORM = "softmax probabilities at the top-k, renormalised to sum to one (= softmax of the top-k logits)"
_SIGMOID_V3 = FamilySpec(
    model_type="", name="", num_experts_key="n_routed_experts", moe_layers="first_k_dense_replace",
    shared="mlp.shared_experts", n_shared_key="n_shared_experts", norm_topk_prob="norm_topk_prob",
    scaling_key="routed_scaling_factor", routing_weight="sigmoid",
    selection="top-k of sigmoid(router logits) + e_score_correction_bias, within the top groups (n_group, topk_group)",
    combine="sigmoid(router logits) at the top-k, normalised over the top-k (norm_topk_prob), times routed_scaling_factor")

_ENTRIES = [
    FamilySpec("olmoe", "OLMoE", norm_topk_prob="norm_topk_prob", reroute="softmax_topk",
               combine="top-k softmax probabilities (renormalised when norm_topk_prob)"),
    FamilySpec("mixtral", "Mixtral", num_experts_key="num_local_experts", norm_topk_prob=True, reroute="softmax_topk",
               attention_masks="window_by_config",
               selection="top-k of softmax(router logits) (= top-k of the logits)", combine=_SOFTMAX_RENORM),
    FamilySpec("qwen2_moe", "Qwen1.5-MoE / Qwen2-MoE", moe_layers="mlp_only_layers", shared="mlp.shared_expert",
               shared_gate="mlp.shared_expert_gate", norm_topk_prob="norm_topk_prob", reroute="softmax_topk",
               combine="top-k softmax probabilities (renormalised when norm_topk_prob)", attention_masks="per_layer_type"),
    FamilySpec("qwen3_moe", "Qwen3-MoE", moe_layers="mlp_only_layers", norm_topk_prob="norm_topk_prob",
               reroute="softmax_topk", combine="top-k softmax probabilities (renormalised when norm_topk_prob)",
               attention_masks="window_by_config"),
    FamilySpec("deepseek_v2", "DeepSeek-V2", num_experts_key="n_routed_experts", moe_layers="first_k_dense_replace",
               shared="mlp.shared_experts", n_shared_key="n_shared_experts", scaling_key="routed_scaling_factor",
               reroute="softmax_topk_scaled",
               selection="top-k of softmax(router logits) (greedy, or within top groups: topk_method)",
               combine="top-k softmax probabilities times routed_scaling_factor (no renormalisation)"),
    replace(_SIGMOID_V3, model_type="deepseek_v3", name="DeepSeek-V3"),
    replace(_SIGMOID_V3, model_type="glm4_moe", name="GLM-4.5 (GLM-4-MoE)"),
    replace(_SIGMOID_V3, model_type="glm4_moe_lite", name="GLM-4.7-Flash (GLM-4-MoE-Lite)", moe_layers="mlp_layer_types"),
    replace(_SIGMOID_V3, model_type="dots1", name="dots.llm1", attention_masks="per_layer_type"),
    replace(_SIGMOID_V3, model_type="solar_open", name="Solar Open", moe_layers="all"),
    replace(_SIGMOID_V3, model_type="exaone_moe", name="EXAONE-MoE", num_experts_key="num_experts",
            moe_layers="mlp_layer_types", n_shared_key="num_shared_experts", attention_masks="per_layer_type"),
    FamilySpec("minimax_m2", "MiniMax-M2", num_experts_key="num_local_experts", routing_weight="sigmoid",
               selection="top-k of sigmoid(router logits) + e_score_correction_bias",
               combine="sigmoid(router logits) at the top-k, renormalised to sum to one", norm_topk_prob=True),
    FamilySpec("flex_olmo", "FlexOlmo", norm_topk_prob="norm_topk_prob",
               combine="top-k softmax probabilities (renormalised when norm_topk_prob)"),
    FamilySpec("hunyuan_v1_moe", "Hunyuan-A13B (HunYuan-MoE-V1)", top_k_key="moe_topk", norm_topk_prob=True,
               combine=_SOFTMAX_RENORM, shared="mlp.shared_mlp",
               note="one shared MLP (shared_mlp) added ungated"),
    FamilySpec("ernie4_5_moe", "ERNIE-4.5-MoE", num_experts_key="moe_num_experts", top_k_key="moe_k",
               moe_layers="moe_layer_range", shared="mlp.shared_experts", n_shared_key="moe_num_shared_experts",
               norm_topk_prob=True,
               selection="top-k of softmax(router logits) + e_score_correction_bias (moe_statics)",
               combine="softmax probabilities at the top-k, renormalised (clamped by moe_norm_min)"),
    FamilySpec("phimoe", "Phi-3.5-MoE", router="router", num_experts_key="num_local_experts",
               attention_masks="window_by_config",
               selection="sparsemixer: the top expert, then the best among the rest, each by a masked softmax",
               combine="sparsemixer's masked softmax probabilities (not a softmax over all experts)",
               note="the routing weight recorded is softmax over all router logits, the quantity the paper defines; "
                    "sparsemixer's combine weights are masked softmaxes of the same logits"),
    FamilySpec("granitemoe", "Granite-MoE", block="block_sparse_moe", router="router",
               num_experts_key="num_local_experts", selection="top-k of the router logits",
               combine="softmax of the top-k logits (top-k, then softmax)"),
    FamilySpec("granitemoeshared", "Granite-MoE with shared experts", block="block_sparse_moe", router="router",
               num_experts_key="num_local_experts", selection="top-k of the router logits",
               combine="softmax of the top-k logits (top-k, then softmax)", shared="shared_mlp",
               note="the shared MLP is a sibling of the block (layer.shared_mlp), added outside it"),
    FamilySpec("gpt_oss", "gpt-oss", router="router", num_experts_key="num_local_experts", block_output_index=0,
               attention_masks="per_layer_type",
               selection="top-k of the router logits (with router bias)",
               combine="softmax of the top-k logits (top-k, then softmax)",
               note="experts have biases (inside E_e, so scaled by the combine weight with the rest); the block "
                    "returns (hidden_states, router_scores)"),
    FamilySpec("llama4_text", "Llama 4 (text)", block="feed_forward", router="router",
               num_experts_key="num_local_experts", router_output="scores_logits", block_output_index=0,
               combine_site="router_scores", experts_call="expert_major", routing_weight="sigmoid",
               attention_masks="per_layer_type", positions_from_cache="nope_temperature_tuning",
               moe_layers="moe_layers_list",
               shared="feed_forward.shared_expert", selection="top-k of the router logits",
               combine="sigmoid(top-k logit), applied to the expert's input: the contribution is E_e(s_e x)",
               note="the combine weight scales the expert's input; zeroing it gives E_e(0) = 0 (no expert bias), "
                    "so the ablation removes the whole contribution E_e(s_e x_t)"),
    FamilySpec("qwen3_next", "Qwen3-Next", moe_layers="mlp_only_layers", shared="mlp.shared_expert",
               shared_gate="mlp.shared_expert_gate", norm_topk_prob="norm_topk_prob",
               combine="top-k softmax probabilities (renormalised when norm_topk_prob)",
               attention_masks="per_layer_type",
               note="hybrid linear attention (Gated DeltaNet): token mode runs with strategy='full' only"),
]

def reads_positions_from_cache(spec: FamilySpec, config) -> bool:
    """Whether some layer of this config computes positions from the cache length (the family's
    ``positions_from_cache`` rule, :data:`POSITIONS_FROM_CACHE`)."""
    return spec.positions_from_cache is not None and POSITIONS_FROM_CACHE[spec.positions_from_cache](config)


def config_value(config, key: str):
    """``config.<key>``; ``ValueError`` naming the key when the config lacks it."""
    if not hasattr(config, key):
        raise ValueError(f"this {config.model_type} config has no {key!r}; it does not match the registered layout")
    return getattr(config, key)


def moe_layer_indices(spec: FamilySpec, config, n_layers: int) -> tuple[int, ...]:
    """The decoder layers with an MoE block, by the family's rule (``spec.moe_layers``). ``config``
    is a transformers config or any object with the same attributes (a ``SimpleNamespace`` of a
    ``config.json`` works: :mod:`moeaudit.tooling.params` checks layers without importing transformers)."""
    rule = spec.moe_layers
    if rule == "all":
        return tuple(range(n_layers))
    if rule == "first_k_dense_replace":
        return tuple(range(int(config.first_k_dense_replace or 0), n_layers))
    if rule == "mlp_only_layers":  # Qwen: not listed as dense, and every decoder_sparse_step-th layer
        only = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        n_exp = config_value(config, spec.num_experts_key)
        return tuple(i for i in range(n_layers) if i not in only and n_exp > 0 and (i + 1) % step == 0)
    if rule == "mlp_layer_types":
        return tuple(i for i, kind in enumerate(config.mlp_layer_types[:n_layers]) if kind == "sparse")
    if rule == "moe_layers_list":
        return tuple(sorted(int(i) for i in config.moe_layers if 0 <= int(i) < n_layers))
    # "moe_layer_range" (ERNIE-4.5): every moe_layer_interval-th layer within [start, end]
    return tuple(i for i in range(n_layers) if (i + 1) % config.moe_layer_interval == 0
                 and config.moe_layer_start_index <= i <= config.moe_layer_end_index)


#: model_type -> :class:`FamilySpec` of every audited family
FAMILIES: dict[str, FamilySpec] = {f.model_type: f for f in _ENTRIES}

# Reasons shared by several refusals.
_COMPOSITE = "multimodal wrapper: audit its text model_type (a language model of its own) instead"
_NO_CAUSAL = "no causal-LM class in transformers 5.23 (AutoModelForCausalLM cannot build it)"
_ENC_DEC = "encoder-decoder: the audit measures next-token loss of a decoder-only language model"
_NOT_TESTED = ("same decorated experts interface, but no tiny configuration has passed the contract suite "
               "(tests/test_contract.py) yet")

#: model_type -> why it is not audited (every other transformers 5.23 model_type with an MoE block)
REFUSED: dict[str, str] = {
    "switch_transformers": _ENC_DEC, "nllb-moe": _ENC_DEC,
    "jetmoe": "experts are not a separate module: JetMoE's mixture of attention heads (MoA) and its MoE MLP "
              "compute and combine the experts inside one module with their own router call",
    "dbrx": "experts are not a separate module in the layout the engine rewrites: DBRX routes inside "
            "ffn.experts with its own weight layout (DbrxExperts, no top_k_weights input)",
    "doge": "experts are not a separate module: Doge's cross-domain MoE looks up expert embeddings "
            "(no fused experts module, no top-k combine-weight input)",
    "beam": "no MoE block in the tiny configurations transformers 5.23 builds (no experts module)",
    "gemma4_text": "the MoE block is optional and off by default (enable_moe_block); "
                   "its experts run beside a dense MLP: " + _NOT_TESTED,
    "llama4": _COMPOSITE, "aria": _COMPOSITE, "qwen3_5_moe": _COMPOSITE, "qwen3_vl_moe": _COMPOSITE,
    "qwen3_omni_moe": _COMPOSITE, "glm4v_moe": _COMPOSITE, "ernie4_5_vl_moe": _COMPOSITE, "gemma4": _COMPOSITE,
    "deepseek_ocr2": _COMPOSITE, "diffusion_gemma": _COMPOSITE, "glm5_next": _COMPOSITE, "inkling2": _COMPOSITE,
    "inkling_mm_model": _COMPOSITE, "minimax_m3_vl": _COMPOSITE, "mistral_large4": _COMPOSITE,
    "muse_spark": _COMPOSITE, "qwen4_exp": _COMPOSITE, "step3p7": _COMPOSITE, "unlimited_ocr": _COMPOSITE,
    "dots3_note": _COMPOSITE, "qwen3_omni_moe_thinker": _COMPOSITE,
}

_NOT_REGISTERED = ("not registered yet: it has a routed-experts module, but no registry entry and tiny configuration "
                   "have passed the contract suite (tests/test_contract.py)")


def moe_model_types() -> list[str]:
    """Every ``model_type`` of the installed transformers whose modeling module builds a routed-experts
    module (``self.experts = ...``), sorted. Reads the library's source files; no model is built."""
    import importlib.util  # noqa: PLC0415
    import re  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: PLC0415

    models_dir = Path(importlib.util.find_spec("transformers.models").submodule_search_locations[0])
    out = []
    for model_type, config_name in CONFIG_MAPPING_NAMES.items():
        from transformers import CONFIG_MAPPING  # noqa: PLC0415

        module = CONFIG_MAPPING[model_type].__module__.split(".")[-2]
        src = models_dir / module / f"modeling_{module}.py"
        if src.exists() and re.search(r"self\.experts\s*=", src.read_text()):
            out.append(model_type)
    return sorted(out)


def refusal_reason_for(model_type: str) -> str:
    """Why ``model_type`` is not audited: :data:`REFUSED`, else what its default config shows
    (encoder-decoder, multimodal wrapper, no causal-LM class), else "not registered yet"."""
    from transformers import CONFIG_MAPPING  # noqa: PLC0415
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    if model_type in REFUSED:
        return REFUSED[model_type]
    try:
        config = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001  (a config class that cannot be built with its defaults)
        config = None
    if getattr(config, "is_encoder_decoder", False):
        return _ENC_DEC
    if getattr(config, "sub_configs", None):
        return _COMPOSITE
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return _NO_CAUSAL
    return _NOT_REGISTERED


def families_table() -> str:
    """The Markdown table of ``docs/families.md``: every model_type of the installed transformers
    with a routed-experts module, audited (registry entry, tested by tests/test_contract.py) or
    refused with its reason. ``python -m moeaudit.families table`` prints it."""
    import transformers  # noqa: PLC0415

    types = sorted(set(moe_model_types()) | set(FAMILIES))
    lines = [
        "# MoE families: audited and refused",
        "",
        f"Generated by `python -m moeaudit.families table` from the registry (`lib/moeaudit/families.py`) for "
        f"transformers {transformers.__version__}; `tests/test_contract.py` checks that this file is current and "
        "runs the contract suite on a tiny random model of every audited family. Module paths are relative to a "
        "decoder layer (`model.model.layers[i]`).",
        "",
        f"Audited: {len(FAMILIES)} model_types. Refused: {len(types) - len(FAMILIES)}.",
        "",
        "## Audited",
        "",
        "| model_type | family | MoE block / router / experts | routing weight g_e(x_t) | selection | combine weights | "
        "weight applied to | shared experts | dense layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mt in sorted(FAMILIES):
        f = FAMILIES[mt]
        shared = f"`{f.shared}`" + (f" (sigmoid gate `{f.shared_gate}`)" if f.shared_gate else "") if f.shared else "none"
        site = "the expert's input (router scores)" if f.combine_site == "router_scores" else "the expert's output"
        g = "sigmoid(logit_e)" if f.routing_weight == "sigmoid" else "softmax(logits)_e"
        lines.append(f"| `{mt}` | {f.name} | `{f.block}` / `.{f.router}` / `.{f.experts}` | {g} | {f.selection} | "
                     f"{f.combine} | {site} | {shared} | `{f.moe_layers}` |")
    lines += ["", "Notes:", ""]
    lines += [f"- `{mt}`: {FAMILIES[mt].note}" for mt in sorted(FAMILIES) if FAMILIES[mt].note]
    lines += ["", "## Refused", "", "| model_type | reason |", "|---|---|"]
    for mt in types:
        if mt not in FAMILIES:
            lines.append(f"| `{mt}` | {refusal_reason_for(mt)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["table"]:
        raise SystemExit("usage: python -m moeaudit.families table > docs/families.md")
    import nnsight  # noqa: F401  (must precede transformers.models.* imports)

    sys.stdout.write(families_table())


def supported_line() -> str:
    """The sentence of the README that lists the audited families (checked by tests/test_contract.py)."""
    return (f"Audited families ({len(FAMILIES)} model_types, each passing `tests/test_contract.py`): "
            + ", ".join(f"`{mt}`" for mt in sorted(FAMILIES)) + ".")
