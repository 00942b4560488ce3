"""Loading MoE language models and describing their expert layout.

One loader (:func:`load_model`) for a shipped short name, a Hugging Face id or a local
directory. It returns an :class:`AuditModel`: the Hugging Face model, the same model wrapped
in nnsight, its tokenizer, and a :class:`MoELayout` that says which layers are MoE and how
their routers combine experts.

Every supported family is described by one entry of :data:`moeaudit.families.FAMILIES` (data:
where the MoE block, router and fused experts module are, the router's output format, how the
top-k selection and combine weights are formed, which quantity is recorded as the routing weight
``g_e(x_t)``, where the combine weight is applied, shared experts and dense layers); every other
transformers 5.23 ``model_type`` with an MoE block is refused with its reason
(:func:`refusal_reason`, :data:`moeaudit.families.REFUSED`). The table of both is
``docs/families.md``, generated from the registry and the contract suite.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import nnsight  # noqa: F401  (must precede transformers.models.* imports)
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
from . import paths  # noqa: E402
from .families import (  # noqa: E402
    _COMPOSITE,
    _ENC_DEC,
    FAMILIES,
    REFUSED,
    FamilySpec,
    config_value,
    moe_layer_indices,
    refusal_reason_for,
)
from .names import DTYPES as DTYPE_NAMES  # noqa: E402
from .zoo import SHIPPED_MODELS, zoo_path  # noqa: E402

#: every audited model_type (the contract suite, tests/test_contract.py, runs on each)
SUPPORTED_FAMILIES = tuple(FAMILIES)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

# The five audited layers of the paper (Section 2). They are close to, but not exactly, evenly
# spaced over depth (OLMoE L7 and Qwen L18 are not what any single rounding rule gives), so the
# real checkpoints use this table and every other model uses depth_proportional_layers.
PAPER_LAYERS = {
    "allenai/OLMoE-1B-7B-0924": (0, 4, 7, 11, 15),
    "Qwen/Qwen1.5-MoE-A2.7B": (0, 6, 12, 18, 23),
    "deepseek-ai/DeepSeek-V2-Lite": (1, 7, 13, 20, 26),
}


@dataclass(frozen=True)
class MoELayout:
    """What the audit needs to know about a model's MoE layers."""

    family: str
    n_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    n_shared_experts: int
    shared_expert_gate: str | None  # "sigmoid" (Qwen2-MoE) or None (ungated / absent)
    norm_topk_prob: bool  # top-k weights renormalised to sum to one
    routed_scaling_factor: float

    def check_layer(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise ValueError(f"layer={layer} is not an MoE layer of this {self.family} model; "
                             f"MoE layers are {list(self.moe_layers)}")

    def depth_proportional_layers(self, n: int = 5) -> list[int]:
        """``n`` MoE layers spread evenly (rounded) from the first to the last MoE layer.

        This is the generic rule; the paper's own layers for its three checkpoints are in
        :data:`PAPER_LAYERS` (see :meth:`AuditModel.audit_layers`)."""
        if n < 1:
            raise ValueError(f"n={n} layers requested; n must be >= 1")
        moe = list(self.moe_layers)
        if n >= len(moe):
            return moe
        idx = [round(i * (len(moe) - 1) / (n - 1)) for i in range(n)] if n > 1 else [len(moe) - 1]
        return [moe[i] for i in idx]

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def spec(self) -> FamilySpec:
        """The registry entry of this family (:data:`moeaudit.families.FAMILIES`)."""
        return FAMILIES[self.family]


def refusal_reason(config) -> str:
    """Why a transformers config is not audited: the registry's stated reason for its ``model_type``
    (:func:`moeaudit.families.refusal_reason_for`: :data:`~moeaudit.families.REFUSED`, else what the
    config shows: encoder-decoder, a multimodal wrapper, no causal-LM class, not registered yet)."""
    from transformers import CONFIG_MAPPING  # noqa: PLC0415


    family = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return REFUSED.get(family, _ENC_DEC)
    if getattr(config, "sub_configs", None):
        return REFUSED.get(family, _COMPOSITE)
    if family in CONFIG_MAPPING:
        return refusal_reason_for(family)
    return "not a transformers model_type with an MoE block"


def layout_from_config(config) -> MoELayout:
    """Describe the MoE layout of a supported transformers config (registry entry of its
    ``model_type``). ``ValueError`` naming the reason (:func:`refusal_reason`) for any other."""
    family = getattr(config, "model_type", None)
    spec = FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"unsupported architecture model_type={family!r}: {refusal_reason(config)}. Supported MoE "
                         f"families: {', '.join(SUPPORTED_FAMILIES)} (see docs/families.md)")
    n_layers = int(config.num_hidden_layers)
    moe = moe_layer_indices(spec, config, n_layers)
    if family == "deepseek_v2" and getattr(config, "num_experts", None) is not None:
        num_experts = config.num_experts
    else:
        num_experts = config_value(config, spec.num_experts_key)
    if spec.n_shared_key is not None:
        shared = int(getattr(config, spec.n_shared_key, 0) or 0)
    elif family == "qwen2_moe":
        shared = 1 if (getattr(config, "shared_expert_intermediate_size", 0) or 0) > 0 else 0
    elif family == "granitemoeshared":
        shared = 1 if (getattr(config, "shared_intermediate_size", 0) or 0) > 0 else 0
    else:
        shared = 1 if spec.shared is not None else 0
    gate = "sigmoid" if spec.shared_gate is not None and shared else None
    norm = bool(getattr(config, spec.norm_topk_prob, False)) if isinstance(spec.norm_topk_prob, str) \
        else bool(spec.norm_topk_prob)
    scale = float(getattr(config, spec.scaling_key, 1.0) or 1.0) if spec.scaling_key else 1.0
    return MoELayout(family, n_layers, moe, int(num_experts), int(config_value(config, spec.top_k_key)), shared, gate,
                     norm, scale)


def input_device(hf_model) -> torch.device:
    """The device that input ids must be on: the input embedding's device or, when that weight is
    offloaded (accelerate leaves a placeholder on ``meta`` and loads it in a hook on every
    forward), the execution device of that hook. ``ValueError`` when the embedding is on ``meta``
    with no accelerate hook (a model that was never dispatched)."""
    emb = hf_model.get_input_embeddings()
    dev = emb.weight.device
    if dev.type != "meta":
        return dev
    exec_dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if exec_dev is None:
        raise ValueError("the input embedding is on the meta device and no accelerate hook loads it; load the "
                         "model with from_pretrained(device_map=...) or dispatch it with accelerate")
    return torch.device(f"cuda:{exec_dev}" if isinstance(exec_dev, int) else exec_dev)


class _AuditNNsight(nnsight.NNsight):
    """nnsight's wrapper, except that traced inputs are moved to :func:`input_device` rather than to
    the first parameter's device, which is ``meta`` when accelerate has offloaded that weight."""

    @property
    def device(self) -> torch.device | None:
        return input_device(self._module)


@dataclass
class AuditModel:
    """A loaded model: Hugging Face module, nnsight wrapper, tokenizer and MoE layout."""

    name: str
    hf: torch.nn.Module
    nn: object  # nnsight.NNsight / LanguageModel wrapping ``hf``
    layout: MoELayout
    tokenizer: object | None = None
    remote: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go (see :func:`input_device`)."""
        return input_device(self.hf)

    def audit_layers(self, n: int = 5) -> list[int]:
        """The layers to audit: the paper's five for its checkpoints, else ``n`` depth-proportional ones."""
        paper = PAPER_LAYERS.get(self.name)
        if paper is not None and n == len(paper) and all(L in self.layout.moe_layers for L in paper):
            return list(paper)
        return self.layout.depth_proportional_layers(n)

    def layers(self):
        """The decoder layers of the nnsight wrapper (``model.layers``)."""
        return self.nn.model.layers

    def hf_moe_block(self, layer: int):
        """The MoE block module of decoder layer ``layer`` (``mlp``, ``block_sparse_moe``, ``feed_forward``, ...)."""
        self.layout.check_layer(layer)
        return getattr(self.hf.model.layers[layer], self.layout.spec.block)

    def hf_experts(self, layer: int):
        """The fused routed-experts module of ``layer`` (call it through :func:`moeaudit.engine.expert_outputs`)."""
        return getattr(self.hf_moe_block(layer), self.layout.spec.experts)

    def hf_router(self, layer: int):
        """The router module of ``layer``."""
        return getattr(self.hf_moe_block(layer), self.layout.spec.router)

    def nn_block(self, layer: int):
        """The nnsight envoy of the MoE block of ``layer`` (inside a trace)."""
        return getattr(self.layers()[layer], self.layout.spec.block)

    @property
    def pad_id(self) -> int:
        for src in (self.tokenizer, self.hf.config):
            pid = getattr(src, "pad_token_id", None)
            if pid is not None:
                return int(pid)
        return 0


def _check_block_structure(hf_model, layout: MoELayout) -> None:
    """Every MoE layer of the layout has the registered block, router and experts modules, and no
    other layer has an experts module (the config's dense-layer rule matches the built model)."""
    spec = layout.spec
    for i, layer in enumerate(hf_model.model.layers):
        block = getattr(layer, spec.block, None)
        experts = getattr(block, spec.experts, None) if block is not None else None
        if i in layout.moe_layers:
            if getattr(block, spec.router, None) is None or experts is None or not hasattr(experts, "gate_up_proj"):
                raise ValueError(f"layer {i} of this {layout.family} model does not have the fused router/experts layout "
                                 f"({spec.block}.{spec.router} + {spec.block}.{spec.experts}.gate_up_proj of "
                                 "transformers 5.23); upgrade transformers")
        elif experts is not None:
            raise ValueError(f"layer {i} of this {layout.family} model has an experts module but the config's "
                             f"dense-layer rule ({spec.moe_layers!r}) says it is dense")


def wrap_model(hf_model, *, tokenizer=None, name: str | None = None) -> AuditModel:
    """Wrap an already-instantiated Hugging Face MoE model (eval mode) for the audit."""
    layout = layout_from_config(hf_model.config)
    _check_block_structure(hf_model, layout)
    hf_model.eval()
    # The load-balancing loss is a training-time quantity; computing it on padded/cached batches
    # would fail on shape checks and it plays no part in the audit.
    if getattr(hf_model.config, "output_router_logits", False):
        hf_model.config.output_router_logits = False
    return AuditModel(name or getattr(hf_model.config, "_name_or_path", "") or layout.family,
                      hf_model, _AuditNNsight(hf_model), layout, tokenizer)


def resolve_model_path(name_or_path: str) -> str:
    """A shipped short name (``tiny-olmoe`` ...) becomes its package directory; others pass through."""

    if name_or_path in SHIPPED_MODELS:
        return str(zoo_path(name_or_path))
    return str(name_or_path)


#: buffers that models compute from their config rather than read from a checkpoint (never "missing")
_DERIVED_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def default_offload_folder(path) -> Path:
    """Where :func:`load_model` offloads a model's disk layers when no ``offload_folder`` is given:
    ``<cache_dir>/offload/<first 16 hex of the sha256 of the resolved model path>``."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return paths.cache_dir() / "offload" / digest


def load_model(name_or_path: str, *, dtype: str = "float32", device: str | None = "cpu",
               device_map: str | dict | None = None, remote: bool = False,
               local_files_only: bool | None = None, offload_folder: str | os.PathLike | None = None) -> AuditModel:
    """Load a model for the audit.

    ``name_or_path``: a shipped short name (see :data:`moeaudit.zoo.SHIPPED_MODELS`), a local
    directory, or a Hugging Face id (``allenai/OLMoE-1B-7B-0924``, ``Qwen/Qwen1.5-MoE-A2.7B``,
    ``deepseek-ai/DeepSeek-V2-Lite``, ...). ``dtype`` is ``float32`` (default), ``bfloat16`` or
    ``float16``. ``device_map`` (e.g. ``"auto"``) is passed to ``from_pretrained`` so accelerate
    can shard a large model over several devices; otherwise the model is moved to ``device``.
    Layers that ``device_map`` puts on ``"disk"`` (or that ``"auto"`` may put there) are offloaded
    to ``offload_folder``, by default a folder of the model under ``moeaudit.paths.cache_dir()``
    (``offload/<hash of the model path>``).
    ``remote=True`` wraps the model for nnsight remote execution (NDIF); the id must be hosted
    there. ``local_files_only`` defaults to ``$HF_HUB_OFFLINE``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    path = resolve_model_path(name_or_path)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {name_or_path!r} could not be loaded: it is not a shipped model, not a local "
                         f"directory with config.json, and the hub could not provide it ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}). Offline, download the checkpoint elsewhere and pass "
                         "its directory.") from None
    layout = layout_from_config(config)  # clear error before any weights are read
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        # without these files transformers silently builds a near-empty placeholder tokenizer
        raise ValueError(f"model directory {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                         "copy the checkpoint's tokenizer into it")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    if remote:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = nnsight.LanguageModel(path, tokenizer=tokenizer, dtype=DTYPES[dtype])
        return AuditModel(str(name_or_path), lm._model, lm, layout, tokenizer, remote=True)
    kwargs = {"dtype": DTYPES[dtype], "local_files_only": local_files_only}
    if device_map is not None:
        kwargs["device_map"] = device_map
        disk = device_map in ("auto", "balanced", "balanced_low_0", "sequential") or (
            isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()})
        if disk or offload_folder is not None:
            folder = Path(offload_folder).expanduser() if offload_folder is not None else default_offload_folder(path)
            if why := paths.refused_output_dir(folder):
                raise ValueError(f"offload_folder={str(folder)!r} is refused: {why}; give a folder of its own")
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"offload_folder={str(folder)!r} exists and is not a directory")
            kwargs["offload_folder"] = str(folder)
    hf_model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith(_DERIVED_BUFFERS)]
    mismatched = list(info.get("mismatched_keys", ()))
    unexpected = list(info.get("unexpected_keys", ()))
    if missing or mismatched or unexpected:
        # missing or mis-shaped weights are initialised at random, unexpected ones are dropped: the audit
        # would measure a model nobody trained
        what = (f"{len(missing)} weight(s) missing from the checkpoint (e.g. {missing[0]}), which transformers "
                "would initialise at random" if missing else
                f"{len(mismatched)} weight(s) of the wrong shape (e.g. {mismatched[0][0]}), which transformers "
                "would initialise at random" if mismatched else
                f"{len(unexpected)} weight(s) in the checkpoint that the config has no place for (e.g. "
                f"{unexpected[0]}), which transformers would drop")
        raise ValueError(f"model {name_or_path!r}: {what}. The config and the weights do not belong together (a "
                         "changed config.json, or another model's model.safetensors)")
    if device_map is None and device is not None:
        hf_model = hf_model.to(device)
    audit = wrap_model(hf_model, tokenizer=tokenizer, name=str(name_or_path))
    return audit
