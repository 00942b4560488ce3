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
import inspect
import os
import typing
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
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


#: keywords of ``nnsight``'s remote execution (``Remotable.trace``), which a local wrapper does not take
REMOTE_TRACE_KEYWORDS = ("remote", "blocking", "job_id", "verbose")


def forward_keywords(hf_model) -> frozenset[str]:
    """The keyword arguments that ``hf_model.forward`` takes: its named parameters and, where it takes
    ``**kwargs: Unpack[TransformersKwargs]`` (transformers 5), the keys of that typed dict. A forward
    with an un-annotated ``**kwargs`` takes any keyword: then ``None`` is in the set."""
    params = inspect.signature(hf_model.forward).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
    for p in params.values():
        if p.kind is p.VAR_KEYWORD:
            ann = p.annotation
            typed = next((getattr(a, "__annotations__", None) for a in (ann, *typing.get_args(ann))
                          if getattr(a, "__annotations__", None)), None)
            if typed:
                names |= set(typed)
            else:
                names.add(None)
    return frozenset(names)


class _AuditNNsight(nnsight.NNsight):
    """nnsight's wrapper, except that traced inputs are moved to :func:`input_device` rather than to
    the first parameter's device, which is ``meta`` when accelerate has offloaded that weight, and
    that a trace refuses a keyword the model's forward does not take (nnsight passes every keyword of
    ``trace`` on to ``forward``, where ``**kwargs`` would swallow it): above all ``remote``, which only
    a remotable wrapper (:func:`load_model` with ``remote=``) honours."""

    @property
    def device(self) -> torch.device | None:
        return input_device(self._module)

    def trace(self, *args, **kwargs):
        accepted = forward_keywords(self._module)
        if not kwargs.get("remote"):  # remote=False (or None): local execution, as the engine asks of a local model
            kwargs.pop("remote", None)
        remote = sorted(k for k in kwargs if k in REMOTE_TRACE_KEYWORDS)
        if remote:
            raise ValueError(f"{remote[0]}={kwargs[remote[0]]!r}: this model is wrapped for local execution "
                             "(nnsight.NNsight), which would pass the keyword to the model's forward and run here; "
                             "load it with moeaudit.models.load_model(..., remote=True, 'local' or a host URL) for "
                             "nnsight's remote execution")
        unknown = sorted(k for k in kwargs if k not in accepted and k not in ("fn", "backend", "tracer_cls", "trace"))
        if unknown and None not in accepted:
            raise ValueError(f"{unknown[0]}={kwargs[unknown[0]]!r} is not a keyword of "
                             f"{type(self._module).__name__}.forward; it takes {sorted(accepted)}")
        return super().trace(*args, **kwargs)


def _is_remote_host(remote) -> bool:
    return remote is True or (isinstance(remote, str) and remote.startswith(("http://", "https://")))


def check_remote(remote, name_or_path=None):
    """``remote`` as :func:`load_model` uses it: ``False`` (local execution), ``True`` (NDIF at
    nnsight's configured host, ``nnsight.CONFIG.API.HOST``), a host URL (``"http://..."`` or
    ``"https://..."``: an NDIF-compatible server there) or ``"local"`` (nnsight's local simulation of
    the remote path: each trace is serialised, deserialised with the project's modules hidden, as on a
    server, and run here on the local weights).

    Checked before any work, each with one ``ValueError`` naming ``remote``: a value outside those;
    ``True`` or a host URL with a model that is a shipped model or a local directory (a server runs
    only the hub ids it hosts); a host that cannot be reached (``GET <host>/status``, 5 s to connect);
    a host whose ``/status`` lists its deployments and not this model (compared as given, case
    insensitively: the hub's canonical spelling of an id cannot be looked up offline). Returns the
    value (``None`` becomes ``False``)."""
    if remote is None or remote is False:
        return False
    if not (remote is True or remote == "local" or _is_remote_host(remote)):
        raise ValueError(f"remote={remote!r} is not valid; valid values are False (run here), True (NDIF at "
                         f"{nnsight.CONFIG.API.HOST}), 'local' (nnsight's local simulation of the remote path) or a "
                         "host URL starting with http:// or https://")
    if remote == "local" or name_or_path is None:
        return remote
    name = str(name_or_path)
    if name in SHIPPED_MODELS or Path(name).expanduser().exists():
        raise ValueError(f"remote={remote!r} sends every trace to a server, which runs only the Hugging Face hub "
                         f"ids it hosts; model {name!r} is a {'shipped model' if name in SHIPPED_MODELS else 'local path'}"
                         ". Use remote=False to run it here, or remote='local' to simulate the remote path")
    host = nnsight.CONFIG.API.HOST if remote is True else remote.rstrip("/")
    try:
        hosted = ndif_deployments(host)
    except ValueError as exc:
        raise ValueError(f"remote={remote!r}: {exc}") from None
    if hosted is not None and name.lower() not in {h.lower() for h in hosted}:
        raise ValueError(f"remote={remote!r}: the server at {host} does not host {name!r}; the models it runs now "
                         f"are {sorted(hosted)}")
    return remote


def ndif_deployments(host: str, *, timeout: float = 5.0) -> list[str] | None:
    """The hub ids that the NDIF server at ``host`` runs now (``GET <host>/status``: its ``deployments``
    entries whose ``deployment_level`` is ``HOT`` or ``WARM``, as ``nnsight.status`` counts them), or
    ``None`` when the answer lists no deployments at all (nothing to check against). ``ValueError``
    when the host cannot be reached or does not answer with JSON."""
    try:
        response = httpx.get(f"{host}/status", timeout=httpx.Timeout(timeout, read=30.0))
        response.raise_for_status()
        status = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"the NDIF host {host} could not be reached or gave no status "
                         f"({type(exc).__name__}: {str(exc)[:160]}); check the address and the network, or use "
                         "remote=False") from None
    deployments = status.get("deployments") if isinstance(status, dict) else None
    if not isinstance(deployments, dict):
        return None
    return [str(v.get("repo_id", k)) for k, v in deployments.items()
            if isinstance(v, dict) and v.get("deployment_level", "HOT") in ("HOT", "WARM")]


class _AuditLanguageModel(nnsight.LanguageModel):
    """nnsight's remotable language-model wrapper, with two additions: its model key refuses a local
    directory (a server cannot load it) and falls back to the hub id as given when the hub cannot be
    asked for its canonical spelling; and ``server`` (a callable ``model -> nnsight Backend``), when
    set, stands in for the server of every remote trace (the test suite's in-process server)."""

    server = None

    def _remoteable_model_key(self) -> str:
        if self.repo_id is None or Path(str(self.repo_id)).expanduser().exists():
            raise ValueError(f"remote: model {self.repo_id!r} is a local directory, which a server cannot load; "
                             "use a Hugging Face hub id that NDIF hosts, or remote='local'")
        from nnsight.modeling import huggingface as nn_hf  # noqa: PLC0415

        if self.repo_id not in nn_hf._ID_CACHE:
            try:
                from huggingface_hub import HfApi  # noqa: PLC0415

                nn_hf._ID_CACHE[self.repo_id] = HfApi().model_info(self.repo_id).id
            except Exception:  # offline or rate-limited: the id as given
                nn_hf._ID_CACHE[self.repo_id] = self.repo_id
        return super()._remoteable_model_key()

    def _remote_backend(self, remote, blocking, job_id, verbose):
        if self.server is not None:
            return self.server(self)
        backend = super()._remote_backend(remote, blocking, job_id, verbose)
        if hasattr(backend, "finalize"):  # nnsight's RemoteBackend: every result passes through finalize
            finalize = backend.finalize
            backend.finalize = lambda content: without_grad(finalize(content))
        return backend


def without_grad(value, *, _seen=None):
    """``value`` (a server's saved values: tensors in dicts, lists, tuples, model outputs or a cache
    object's attributes) with ``requires_grad`` turned off on every tensor, in place, and returned.

    A server runs a trace with autograd on (the client's ``torch.no_grad`` does not travel with the
    request), so the tensors it sends back require grad, and ``.numpy()`` on them fails."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        if value.requires_grad and value.is_leaf:
            value.requires_grad_(False)
        return value.detach() if value.requires_grad else value
    if isinstance(value, dict):
        for k, v in value.items():
            value[k] = without_grad(v, _seen=seen)
    elif isinstance(value, list):
        value[:] = [without_grad(v, _seen=seen) for v in value]
    elif isinstance(value, tuple):
        return type(value)(*(without_grad(v, _seen=seen) for v in value)) if hasattr(value, "_fields") \
            else tuple(without_grad(v, _seen=seen) for v in value)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        for k, v in vars(value).items():
            if isinstance(v, (torch.Tensor, dict, list, tuple)) or hasattr(v, "__dict__"):
                setattr(value, k, without_grad(v, _seen=seen))
    return value


def remote_wrapper(hf_model_or_id, *, tokenizer=None, **kwargs) -> nnsight.LanguageModel:
    """nnsight's remotable wrapper (``LanguageModel``) of a loaded Hugging Face model or a hub id (a
    meta model: no weights are read), with the project's package registered for serialisation by
    value, so that the engine's functions called inside a trace travel with the request (a server
    has nnsight, torch and transformers, not this package)."""
    nnsight.register(__name__.split(".")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
        return _AuditLanguageModel(hf_model_or_id, tokenizer=tokenizer, **kwargs)


@dataclass
class AuditModel:
    """A loaded model: Hugging Face module, nnsight wrapper, tokenizer and MoE layout."""

    name: str
    hf: torch.nn.Module
    nn: object  # nnsight.NNsight / LanguageModel wrapping ``hf``
    layout: MoELayout
    tokenizer: object | None = None
    #: how every trace runs: False (here), True or a host URL (on that server), "local" (nnsight's simulation
    #: of the remote path); see :func:`check_remote`
    remote: bool | str = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go (see :func:`input_device`); the CPU for a model that runs on a server (its
        local copy is a meta model without weights; the request carries CPU tensors)."""
        if self.on_server:
            return torch.device("cpu")
        return input_device(self.hf)

    def __getstate__(self) -> dict:
        # A trace sent to a server carries the AuditModel its engine functions read (name, layout, remote;
        # the modules travel as references to the server's own): the tokenizer stays here.
        return {**self.__dict__, "tokenizer": None}

    @property
    def on_server(self) -> bool:
        """Whether the traces run on a server whose weights are not here (``remote`` True or a host URL)."""
        return _is_remote_host(self.remote)

    def require_local_weights(self, what: str) -> None:
        """``ValueError`` when the model runs on a server: ``what`` computes with the weights outside a
        trace (or with PyTorch hooks on the local modules), which a server run does not have here."""
        if self.on_server:
            raise ValueError(f"{what} needs the model's weights outside a trace (or PyTorch hooks on its modules), "
                             f"which a model loaded with remote={self.remote!r} does not have here; run it with "
                             "remote=False or remote='local'")

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
    ``remote`` (:func:`check_remote`, checked first): ``True`` or a host URL wraps a hub id in
    nnsight's remotable ``LanguageModel`` (:func:`remote_wrapper`; a meta model, no weights read) and
    every trace runs on that server; ``"local"`` loads the model here and runs every trace through
    nnsight's local simulation of the remote path. ``local_files_only`` defaults to ``$HF_HUB_OFFLINE``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    remote = check_remote(remote, name_or_path)
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
    if remote and remote != "local":
        lm = remote_wrapper(path, tokenizer=tokenizer, dtype=DTYPES[dtype])
        _check_block_structure(lm._module, layout)
        return AuditModel(str(name_or_path), lm._module, lm, layout, tokenizer, remote=remote)
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
    if remote == "local":
        audit.nn, audit.remote = remote_wrapper(hf_model, tokenizer=tokenizer), "local"
    return audit
