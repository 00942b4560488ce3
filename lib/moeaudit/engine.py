"""The ablation engine: a clean pass and token-level expert ablations inside the forward pass.

Mechanism (one for every family and mode): inside an nnsight trace, the combine weight of every
removed expert is set to zero on the chosen token rows at the point where the MoE block hands it
to the routed experts (:func:`ablate_in_trace`): the ``top_k_weights`` argument of the fused
experts call ``experts(hidden_states, top_k_index, top_k_weights)``, or, for a family whose block
applies the weight to the expert's input (Llama 4), the router's dense score matrix. The family's
layout (:data:`moeaudit.families.FAMILIES`) says which. The MoE output at those rows loses
exactly the removed experts' contributions (``sum_{e removed} w_e(x_t) E_e(x_t)``, or
``E_e(w_e x_t)`` for input-weighted experts). Other combine weights are not renormalised, the
router and the selection are left as the model computes them, and shared experts are never
touched.

Two intervention definitions (``mode``):

* ``token`` (the paper's Definition 2.1): only position ``t`` loses the expert. Executed by
  default with ``strategy="kv"``: one clean forward per chunk of sequences builds a key/value
  cache, then the ablated and clean rows of many positions of a sequence are packed as new tokens
  of one step against that sequence's cache, with position ids ``t`` and a 4-D mask that lets
  each row see only the clean cache of positions ``< t`` and itself (so the cache is never
  copied per row). ``strategy="full"`` re-runs the prefix ``x[:t+1]`` and changes only row ``t``
  (slower; used to verify the cached path).
* ``sequence`` (the released code's behaviour): the expert is removed at every position
  ``<= t`` where it is routed. Executed by forwarding the prefix ``x[:t+1]``.

Every batch also carries one un-ablated row per position, so the baseline loss and the gap
norm ``||y_t - y_t^(-e)||`` come from the same batch as the ablation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass

import nnsight
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .corpus import TokenizedCorpus, check_context, integer_ids, is_integer
from .names import ABLATION_MODES, STRATEGIES
from .families import reads_positions_from_cache
from .models import AuditModel

#: the interventions one ablation can apply to the marked (token row, expert) pairs (see :func:`ablate_in_trace`):
#: "remove" (the paper's: the expert's weighted contribution is dropped, no renormalisation), "mask" (router
#: masking: the expert's router logit is -inf before the top-k, so the family's router selects the next expert and
#: forms its combine weights as it always does) and "mean" (the expert's output at the token is replaced by its mean
#: output over the tokens routed to it in a clean pass, :func:`expert_mean_outputs`; the combine weight is kept)
OPERATORS = ("remove", "mask", "mean")


def check_operator(operator) -> str:
    """``operator`` if it is one of :data:`OPERATORS`; else ``ValueError`` listing them."""
    if not isinstance(operator, str) or operator not in OPERATORS:
        raise ValueError(f"operator={operator!r} is not a known intervention; valid operators are {list(OPERATORS)}")
    return operator


def progress_enabled(progress: bool | None) -> bool:
    """Progress bars on by default; ``MOEAUDIT_PROGRESS=0`` turns them off (e.g. when rendering)."""
    if progress is not None:
        return progress
    return os.environ.get("MOEAUDIT_PROGRESS", "1") not in ("0", "false", "False")


def progress_bar(iterable, *, total=None, desc="", progress=None):
    """A tqdm bar on stderr, shown unless ``progress_enabled(progress)`` is false."""
    return tqdm(iterable, total=total, desc=desc, disable=not progress_enabled(progress), file=sys.stderr,
                leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Expert outputs through the model's own experts module
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def expert_outputs(experts: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, *, call: str = "top_k",
                   input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Raw expert outputs ``E_e(x_n)`` for every (row n, slot j) with ``e = indices[n, j]``.

    ``experts`` is the model's fused experts module, called through its own ``forward`` on the
    ``N*k`` rows ``x_n`` repeated once per slot, so the expert function is the family's own code
    and the call goes through whatever hooks are attached to the module: accelerate's
    ``AlignDevicesHook`` materialises offloaded (``meta``) weights for the call and releases them
    after, exactly as in the model's forward. (Reading ``experts.gate_up_proj`` directly would see
    the placeholder of an offloaded layer.)

    ``call`` is the family's calling convention (:attr:`moeaudit.families.FamilySpec.experts_call`):
    ``"top_k"``: ``experts(rows, top_k_index, top_k_weights)`` with each row routed to its single
    expert with combine weight 1 (every ``@use_experts_implementation`` class); ``"expert_major"``:
    ``experts(inputs)`` with ``inputs`` of shape (E * M, H) grouped expert by expert (Llama 4), each
    row placed in its expert's block and zeros elsewhere (``E_e(0) = 0``: those experts have no bias).
    ``input_scale`` (N, k), optional, multiplies each row's input first: ``E_e(s x_n)``, the
    contribution of an expert whose combine weight is applied to its input.

    ``x``: (N, H) inputs of the MoE block; ``indices``: (N, k) expert ids. Returns (N, k, H) in
    the model's dtype, without the combine weight of output-weighted experts. Bitwise equal to
    ``down_e(act(gate_e x) * up_e x)`` computed expert by expert, since the module groups the same
    rows in the same order. ``ValueError`` for an unknown ``call``.
    """
    return _expert_outputs(experts, x, indices, call=call, input_scale=input_scale)


def _expert_outputs(experts, x, indices, *, call, input_scale):
    """:func:`expert_outputs` without its ``torch.no_grad`` decorator (a decorated function does not
    travel by value in a remote trace)."""
    n, k = indices.shape
    dtype = next(experts.parameters()).dtype  # the dtype survives offloading; the values may not
    rows = x.to(dtype).repeat_interleave(k, dim=0)
    if input_scale is not None:
        rows = rows * input_scale.reshape(n * k, 1).to(rows.device, dtype)
    flat = indices.reshape(n * k).to(rows.device)
    if call == "top_k":
        ones = torch.ones(n * k, 1, dtype=dtype, device=rows.device)
        out = experts(rows, flat.reshape(n * k, 1), ones)
    elif call == "expert_major":
        n_experts = int(experts.gate_up_proj.shape[0])  # the shape survives offloading
        slots = torch.arange(n * k, device=rows.device)
        grouped = torch.zeros(n_experts, n * k, rows.shape[-1], dtype=dtype, device=rows.device)
        grouped[flat, slots] = rows
        out = experts(grouped.reshape(n_experts * n * k, -1)).reshape(n_experts, n * k, -1)[flat, slots]
    else:
        raise ValueError(f"call={call!r} is not 'top_k' or 'expert_major'")
    return out.reshape(n, k, -1)


@torch.no_grad()
def expert_contributions(model: AuditModel, layer: int, x: torch.Tensor, indices: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """What each routed expert adds to the MoE output of ``layer``: (N, k, H) in the model's dtype.

    ``w_e(x_n) E_e(x_n)`` for experts that weight their output (every family but Llama 4), and
    ``E_e(w_e(x_n) x_n)`` for experts whose block scales their input by the combine weight
    (``combine_site="router_scores"``); ``x``: (N, H) block inputs, ``indices``/``weights``: (N, k)
    top-k ids and combine weights. This is exactly what :func:`ablate_in_trace` removes."""
    spec = model.layout.spec
    experts = model.hf_experts(layer)
    if spec.combine_site == "router_scores":
        return expert_outputs(experts, x, indices, call=spec.experts_call, input_scale=weights)
    return expert_outputs(experts, x, indices, call=spec.experts_call) * weights[..., None]


def block_input_in_trace(model: AuditModel, layer: int):
    """Inside an nnsight trace: the MoE block's input hidden states (batch, seq, H). Read it before
    :func:`routing_in_trace` of the same layer (nnsight reads modules in execution order)."""
    return model.nn_block(layer).input


def routing_in_trace(model: AuditModel, layer: int) -> tuple:
    """Inside an nnsight trace: ``(router_logits, combine_weights, top_k_indices)`` of ``layer``,
    flattened over tokens ((N, E), (N, k), (N, k)), as the family's block uses them.

    The logits are read from the router's output (:attr:`FamilySpec.logits_index`); the combine
    weights and indices from the experts call's ``(hidden_states, top_k_index, top_k_weights)``, or,
    for a dense-score router (Llama 4), gathered from its scores at the top-k of its logits (the
    router's own ``torch.topk``). Reads the router, then the experts (execution order)."""
    spec = model.layout.spec
    block = model.nn_block(layer)
    router = getattr(block, spec.router)
    if spec.router_output == "scores_logits":
        scores, logits = router.output
        indices = torch.topk(logits, model.layout.top_k, dim=-1).indices
        return logits, scores.gather(1, indices), indices
    logits = router.output[spec.logits_index]
    args, _kwargs = getattr(block, spec.experts).inputs
    return logits, args[2], args[1]


def block_output_in_trace(model: AuditModel, layer: int, *, shape: tuple[int, int] | None = None):
    """Inside an nnsight trace: the MoE block's output hidden states (the first element when the
    block returns a tuple, :attr:`FamilySpec.block_output_index`). Some blocks return them flattened
    over tokens (Llama 4: (N, H)); with ``shape=(batch, seq)`` the result is (batch, seq, H)."""
    out = model.nn_block(layer).output
    index = model.layout.spec.block_output_index
    out = out if index is None else out[index]
    return out if shape is None else out.reshape(*shape, out.shape[-1])


def _expert_outputs_in_trace(model: AuditModel, layer: int, x, indices):
    """Inside an nnsight trace: the raw outputs ``E_e(x_n)`` (N, k, H) of the experts ``indices``
    (N, k) selects, for block inputs ``x`` (..., H): :func:`expert_outputs` called on the traced
    model's experts module (its nnsight envoy), so on a server the experts that hold the weights
    compute them."""
    # the undecorated function: shipped by value, torch.no_grad's wrapper would lose its source and defaults
    return _expert_outputs(getattr(model.nn_block(layer), model.layout.spec.experts), x.reshape(-1, x.shape[-1]),
                          indices, call=model.layout.spec.experts_call, input_scale=None)


class _RouterLogitMask(torch.overrides.TorchFunctionMode):
    """Active while one router runs: sets the marked entries of the router's first linear output
    with ``num_experts`` columns (its logits) to ``-inf``; every later operation of the router is
    the family's own code on the masked logits."""

    def __init__(self, mask: torch.Tensor, num_experts: int):
        super().__init__()
        self.mask, self.num_experts, self.done = mask, num_experts, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.done and func is torch.nn.functional.linear and out.shape[-1] == self.num_experts:
            self.done = True
            out = out.masked_fill(self.mask.to(out.device).reshape(out.shape), float("-inf"))
        return out


@contextlib.contextmanager
def router_logit_masks(model: AuditModel, masks: dict):
    """Router masking (``operator="mask"``) for the forwards run inside this context.

    ``masks``: ``{layer: (N, E) bool}`` over the flattened token rows of the next forward and the
    experts. While the router of a masked layer runs, its logits (the output of its linear map,
    ``x W^T (+ b)``, the first ``torch.nn.functional.linear`` call of the router with E outputs) are
    set to ``-inf`` at the marked (row, expert) pairs before anything else reads them, so the
    family's own router code selects the top-k and forms the combine weights from the masked logits:
    softmax-then-top-k (with or without ``norm_topk_prob``), top-k-then-softmax, sigmoid scores with
    group selection and ``e_score_correction_bias``, sparsemixer. A masked expert's probability or
    affinity is exactly 0 (``exp(-inf) = sigmoid(-inf) = 0``), so it gets combine weight 0 and
    softmax routers select the next expert; a router that adds a selection bias to the affinity
    (``e_score_correction_bias``) compares ``0 + b_e`` with the others' ``s_j + b_j`` and can still
    select a masked expert with weight 0 (the records say so: ``masked_selected``). This is what
    masking the router logits does in serving engines (vLLM's ``FusedMoE`` takes the logits as
    input). Implemented with a PyTorch forward pre-hook that enters a ``TorchFunctionMode`` and a
    forward hook that leaves it, removed on exit, also on error. An empty dict does nothing."""
    handles, modes = [], {}
    E = model.layout.num_experts
    try:
        for L, mask in masks.items():
            router = model.hf_router(int(L))

            def enter(_module, _args, L=L, mask=mask):
                modes[L] = _RouterLogitMask(mask, E)
                modes[L].__enter__()

            def leave(_module, _args, _output, L=L):
                mode = modes.pop(L, None)
                if mode is not None:
                    mode.__exit__(None, None, None)

            handles.append(router.register_forward_pre_hook(enter))
            handles.append(router.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def ablate_in_trace(model: AuditModel, layer: int, removal: torch.Tensor, *, scale: float = 0.0,
                    operator: str = "remove", mean: torch.Tensor | None = None):
    """Inside an nnsight trace: remove the experts ``removal`` marks from ``layer``'s output.

    ``removal``: (N, E) bool over the flattened token rows of the batch and the experts. Where the
    block hands the combine weights to the experts (:attr:`FamilySpec.combine_site`), the weight of
    every marked (row, expert) that the router selected is multiplied by ``scale`` (0: removed);
    everything else, the router's selection included, is as the model computes it. Returns the
    top-k indices (N, k) of this very forward (for the premise check) and the (N, k) bool of slots
    changed. Reads the router, then the experts (execution order).

    ``operator`` (:data:`OPERATORS`) picks the intervention on the marked pairs:

    * ``"remove"`` (default): as above, the paper's ablation.
    * ``"mean"``: as ``"remove"``, then the block output at each marked routed slot gets back
      ``w_e(x_t) mu_e`` (``mu_e`` for input-weighted experts, whose ``mu_e`` already holds the weight),
      with ``mean`` the (E, H) mean expert outputs of :func:`expert_mean_outputs`: the expert's output
      at the token is replaced by its clean-pass mean, its combine weight kept. Reads the router, the
      experts, then the block output.
    * ``"mask"``: the masking itself happens inside the router (:func:`router_logit_masks`, which
      must wrap the trace with the same marks); here the routing that the masked router produced is
      read. Returns ``(indices, hit, weights)``: the post-mask top-k indices and combine weights
      (N, k), and the (N, k) bool of slots still holding a masked expert.
    """
    spec = model.layout.spec
    if operator == "mask":
        _logits, weights, indices = routing_in_trace(model, layer)
        return indices, removal.to(indices.device).gather(1, indices), weights
    block = model.nn_block(layer)
    router = getattr(block, spec.router)
    if spec.combine_site == "router_scores":
        scores, logits = router.output
        indices = torch.topk(logits, model.layout.top_k, dim=-1).indices
        mark = removal.to(scores.device)
        new_scores = scores.masked_fill(mark, 0) if scale == 0.0 else torch.where(mark, scores * scale, scores)
        router.output = (new_scores, logits)
        hit = mark.gather(1, indices)
        if operator == "mean":  # mu_e is the mean of E_e(s_e x): the weight is inside
            _add_to_block_output(model, layer, hit.float(), indices, mean)
        return indices, hit
    experts = getattr(block, spec.experts)
    args, kwargs = experts.inputs
    hidden, indices, weights = args[0], args[1], args[2]
    hit = removal.to(indices.device).gather(1, indices)
    new_weights = weights.masked_fill(hit, 0) if scale == 0.0 else torch.where(hit, weights * scale, weights)
    experts.inputs = ((hidden, indices, new_weights, *args[3:]), kwargs)
    if operator == "mean":
        _add_to_block_output(model, layer, hit.float() * weights.float(), indices, mean)
    return indices, hit


def _add_to_block_output(model: AuditModel, layer: int, coef: torch.Tensor, indices: torch.Tensor,
                         mean: torch.Tensor) -> None:
    """Inside a trace: add ``sum_j coef[n, j] mean[indices[n, j]]`` to row n of ``layer``'s block output."""
    if mean is None:
        raise ValueError("operator='mean' needs the (E, H) mean expert outputs of the layer (expert_mean_outputs)")
    block = model.nn_block(layer)
    out = block.output
    index = model.layout.spec.block_output_index
    y = out if index is None else out[index]
    add = (coef.to(y.device)[..., None] * mean.to(y.device, torch.float32)[indices.to(y.device)]).sum(1)
    new = (y.float() + add.reshape(y.shape)).to(y.dtype)
    block.output = new if index is None else (*out[:index], new, *out[index + 1:])


def routing_weight(model: AuditModel, logits: torch.Tensor) -> torch.Tensor:
    """The routing weight ``g_e(x)`` of every expert from router logits (N, E), float32: the
    paper's ``softmax`` over all experts, or the family's analogue (:attr:`FamilySpec.routing_weight`;
    ``sigmoid`` affinities for sigmoid routers), see :mod:`moeaudit.families`."""
    if model.layout.spec.routing_weight == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)


def _refuse_inside_pruning(model: AuditModel) -> None:
    # Pruning re-routes with PyTorch forward hooks on the routers, which run after nnsight has read
    # the router output: routing records and ablations would describe the unpruned router.
    if getattr(model.hf, "_moeaudit_pruned", False):
        raise ValueError("the engine cannot run inside moeaudit.pruning.pruned_experts (its routing records would "
                         "describe the unpruned router); measure pruned models with moeaudit.pruning.perplexity")


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log p(target | context)`` in nats (the paper's per-token loss), computed in float32 from
    bfloat16/float16/float32 logits and in float64 from float64 logits (so that a float64 model's
    losses are not rounded to float32)."""
    return torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                                             reduction="none")


# --------------------------------------------------------------------------------------------
# Clean pass
# --------------------------------------------------------------------------------------------
@dataclass
class CleanPass:
    """Routing and loss of the un-ablated model on every real token of a corpus.

    ``tokens`` has one row per real token (``seq_id``, ``t``, ``token_id``, ``target_id``,
    ``loss``; the last token of a sequence has ``target_id = -1`` and ``loss = NaN``).
    ``routing[layer]`` holds arrays aligned with ``tokens`` rows: ``indices`` (N, k) expert ids,
    ``weight`` (N, k) combine weights as used by the model, ``prob`` (N, k) routing weights
    g_e(x_t) (softmax router probabilities, or the family's analogue: :func:`routing_weight`), and
    ``norm`` (N, k) expert output norms ||E_e(x_t)|| (unweighted).
    """

    model_name: str
    tokens: pd.DataFrame
    routing: dict[int, dict[str, np.ndarray]]
    offsets: np.ndarray  # row of (seq_id, 0) in ``tokens``

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sequence (n_sequences,), computed once. (Not ``functools.cached_property``: on
        Python 3.11 it holds a lock, so this class, shipped by value in a remote trace, would not pickle.)"""
        if "_lengths" not in self.__dict__:
            self.__dict__["_lengths"] = np.diff(np.append(self.offsets, len(self.tokens)))
        return self.__dict__["_lengths"]

    def row(self, seq_id, t):
        """Row(s) of ``tokens`` (and of every routing array) for token ``t`` of sequence ``seq_id``
        (scalars or equal-shape arrays). ``IndexError`` for a sequence outside
        ``[0, n_sequences)`` or a position outside ``[0, length)`` of its sequence (nothing wraps
        into a neighbouring sequence)."""
        seq, pos = np.asarray(seq_id), np.asarray(t)
        if not (np.issubdtype(seq.dtype, np.integer) and np.issubdtype(pos.dtype, np.integer)):
            raise TypeError(f"seq_id and t must be integers, got {seq.dtype} and {pos.dtype}")
        n_seq = len(self.offsets)
        bad_seq = (seq < 0) | (seq >= n_seq)
        if np.any(bad_seq):
            raise IndexError(f"seq_id={np.atleast_1d(seq[bad_seq])[0]} is out of range: the clean pass has "
                             f"{n_seq} sequences (ids 0..{n_seq - 1})")
        length = self.lengths[seq]
        bad_t = (pos < 0) | (pos >= length)
        if np.any(bad_t):
            s_bad = np.atleast_1d(np.broadcast_to(seq, bad_t.shape)[bad_t])[0]
            raise IndexError(f"t={np.atleast_1d(np.broadcast_to(pos, bad_t.shape)[bad_t])[0]} is out of range for "
                             f"sequence {s_bad} of {int(self.lengths[s_bad])} tokens (t in 0..{int(self.lengths[s_bad]) - 1})")
        return self.offsets[seq] + pos

    def layer_routing(self, layer: int) -> dict[str, np.ndarray]:
        """The routing arrays of ``layer`` (``indices``, ``weight``, ``prob``, ``norm``, each (N, k)).
        ``TypeError`` for a non-integer layer, ``ValueError`` for a layer not in the clean pass."""
        if not is_integer(layer):
            raise TypeError(f"layer must be an integer, got {layer!r}")
        if layer not in self.routing:
            raise ValueError(f"layer={layer} was not recorded in the clean pass (recorded: {sorted(self.routing)})")
        return self.routing[layer]

    def active(self, seq_id: int, t: int, layer: int) -> np.ndarray:
        """Expert ids (k,) routed at token ``t`` of ``seq_id`` at ``layer``. ``IndexError`` for an
        out-of-range sequence or position, ``ValueError`` for a layer not in the clean pass."""
        return self.layer_routing(layer)["indices"][self.row(seq_id, t)]

    def routing_frame(self, layer: int) -> pd.DataFrame:
        """Long format: one row per (token, active expert) at ``layer`` (``ValueError`` for a layer
        not in the clean pass)."""
        r = self.layer_routing(layer)
        n, k = r["indices"].shape
        base = self.tokens.loc[np.repeat(np.arange(n), k), ["seq_id", "t", "token_id"]].reset_index(drop=True)
        base.insert(0, "layer", layer)
        base["slot"] = np.tile(np.arange(k), n)
        for key in ("indices", "weight", "prob", "norm"):
            base["expert" if key == "indices" else key] = r[key].reshape(-1)
        return base


@torch.no_grad()
def check_corpus_context(model: AuditModel, corpus: TokenizedCorpus) -> None:
    """``ValueError`` when a text of ``corpus`` is longer than ``model``'s context
    (``max_position_embeddings``): :func:`moeaudit.corpus.check_context` for every pass over a
    tokenized corpus (clean pass, perplexity), whatever built the corpus."""
    if len(corpus):
        longest = int(corpus.lengths.max())
        check_context(longest, getattr(model.hf.config, "max_position_embeddings", None), model.name,
                      what=f"a text of {longest} tokens")


def clean_pass(model: AuditModel, corpus: TokenizedCorpus, *, layers=None, batch_size: int = 8,
               progress: bool | None = None) -> CleanPass:
    """Run the un-ablated model over ``corpus`` and record routing, expert norms and losses.
    ``ValueError`` for a text longer than the model's context (:func:`check_corpus_context`)."""
    _refuse_inside_pruning(model)
    check_corpus_context(model, corpus)
    layers = sorted(model.layout.moe_layers if layers is None else layers)
    for layer in layers:
        model.layout.check_layer(layer)
    token_rows, routing = [], {L: {k: [] for k in ("indices", "weight", "prob", "norm")} for L in layers}
    order = list(range(len(corpus)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for seq_ids in progress_bar(batches, desc="clean pass", progress=progress):
        ids, mask = corpus.padded(seq_ids, pad_id=model.pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        saved = {}
        on_server = model.on_server
        with torch.no_grad(), model.nn.trace(input_ids=ids, attention_mask=mask, remote=model.remote):
            for L in layers:
                x = block_input_in_trace(model, L)
                r_logits, r_weight, r_idx = routing_in_trace(model, L)
                if on_server:  # the weights are there only: expert output norms (N, k) computed in the trace
                    y = _expert_outputs_in_trace(model, L, x, r_idx)
                    saved[L] = (None, r_logits, r_weight, r_idx, torch.linalg.vector_norm(y.float(), dim=-1))
                else:
                    saved[L] = (x, r_logits, r_weight, r_idx, None)
            if on_server:  # the next-token losses (batch, seq - 1), not the (batch, seq, vocab) logits, come back
                out_logits = model.nn.output.logits
                logits = _token_loss(out_logits[:, :-1].reshape(-1, out_logits.shape[-1]),
                                     ids[:, 1:].reshape(-1)).reshape(ids.shape[0], -1)
            else:
                logits = model.nn.output.logits
            nnsight.save(saved), nnsight.save(logits)  # only saved values come back from a server
        real = mask.reshape(-1).bool()
        for L in layers:
            x, r_logits, r_weight, r_idx, norms = saved[L]
            idx = r_idx.reshape(-1, r_idx.shape[-1])[real]
            probs = routing_weight(model, r_logits.reshape(real.shape[0], -1)[real])
            if norms is None:
                x = x.reshape(-1, x.shape[-1])[real]
                y = expert_outputs(model.hf_experts(L), x, idx.to(x.device), call=model.layout.spec.experts_call)
                norms = torch.linalg.vector_norm(y.float(), dim=-1)
            else:
                norms = norms.reshape(real.shape[0], idx.shape[-1])[real.to(norms.device)]
            routing[L]["indices"].append(idx.cpu().numpy().astype(np.int64))
            routing[L]["weight"].append(r_weight.reshape(-1, idx.shape[-1])[real].float().cpu().numpy().astype(np.float64))
            routing[L]["prob"].append(probs.gather(1, idx.to(probs.device)).cpu().numpy().astype(np.float64))
            routing[L]["norm"].append(norms.cpu().numpy().astype(np.float64))
        lengths = mask.sum(1).tolist()
        for row, seq in enumerate(seq_ids):
            n = lengths[row]
            loss = np.full(n, np.nan)
            target = np.full(n, -1, dtype=np.int64)
            if n > 1:
                tgt = ids[row, 1:n]
                loss[:-1] = (logits[row, : n - 1] if on_server else _token_loss(logits[row, : n - 1], tgt)).cpu().numpy()
                target[:-1] = tgt.cpu().numpy()
            token_rows.append(pd.DataFrame({"seq_id": seq, "t": np.arange(n), "token_id": ids[row, :n].cpu().numpy(),
                                            "target_id": target, "loss": loss}))
    tokens = pd.concat(token_rows, ignore_index=True)
    offsets = np.concatenate([[0], np.cumsum(corpus.lengths)[:-1]]).astype(np.int64)
    routing_arrays = {L: {k: np.concatenate(v) for k, v in d.items()} for L, d in routing.items()}
    return CleanPass(model.name, tokens, routing_arrays, offsets)


@dataclass
class ExpertMeans:
    """Mean expert outputs over a clean pass: the replacement of ``operator="mean"``.

    ``means[layer]``: (E, H) float64, row e the mean of expert e's output over the real tokens whose
    top-k selects e (``E_e(x_s)`` for experts that weight their output, ``E_e(w_e(x_s) x_s)`` for
    experts whose combine weight scales their input, Llama 4); ``counts[layer]``: (E,) int64, the
    number of those tokens (a row with count 0 is NaN: no mean exists). The same pass keeps, per
    layer and aligned with its real tokens, the routing pattern ``indices`` (N, k) and, per
    routed slot, the largest element ``slot_max`` (N, k) and largest absolute element
    ``slot_max_abs`` (N, k) of that expert's output vector (float64): the inputs of the
    maximum-activation and super-expert criteria (:mod:`moeaudit.metrics`)."""

    model_name: str
    means: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    indices: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    slot_max: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    slot_max_abs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def tensor(self, layer: int) -> torch.Tensor:
        """The (E, H) means of ``layer`` as a float32 tensor. ``ValueError`` for a layer not computed."""
        if layer not in self.means:
            raise ValueError(f"layer={layer} has no mean expert outputs (computed: {sorted(self.means)})")
        return torch.from_numpy(self.means[layer]).float()


def accumulate_expert_sums(sums: np.ndarray, counts: np.ndarray, indices: np.ndarray, outputs: np.ndarray) -> None:
    """Add one batch to per-expert output sums, in place, in float64.

    ``sums``: (E, H) float64; ``counts``: (E,) int64; ``indices``: (N, k) selected experts;
    ``outputs``: (N, k, H) the selected experts' outputs. ``ValueError`` on mismatched shapes."""
    idx = np.asarray(indices)
    out = np.asarray(outputs, dtype=np.float64)
    if idx.ndim != 2 or out.shape[:2] != idx.shape or out.shape[2] != sums.shape[1]:
        raise ValueError(f"indices (N, k) and outputs (N, k, H={sums.shape[1]}) disagree: {idx.shape}, {out.shape}")
    np.add.at(sums, idx.reshape(-1), out.reshape(-1, out.shape[2]))
    np.add.at(counts, idx.reshape(-1), 1)


@torch.no_grad()
def expert_mean_outputs(model: AuditModel, corpus: TokenizedCorpus, *, layers=None, seq_ids=None,
                        batch_size: int = 8, progress: bool | None = None) -> ExpertMeans:
    """Mean output of every expert over the real tokens routed to it (MoNE's replacement, arXiv
    2507.00390): one clean forward over the texts ``seq_ids`` of ``corpus`` (all when None), the
    block inputs and top-k read as :func:`clean_pass` reads them, each selected expert's output
    computed through the model's experts module (:func:`expert_outputs`) and summed per expert in
    float64 (:func:`accumulate_expert_sums`). ``ValueError`` for a layer without an MoE block or a
    text id outside the corpus."""
    _refuse_inside_pruning(model)
    check_corpus_context(model, corpus)
    layers = sorted(model.layout.moe_layers if layers is None else layers)
    for layer in layers:
        model.layout.check_layer(layer)
    order = list(range(len(corpus))) if seq_ids is None else integer_ids(seq_ids, "seq_ids")
    bad = [i for i in order if not 0 <= i < len(corpus)]
    if bad or not order:
        raise ValueError(f"seq_ids must be a non-empty selection of text ids 0..{len(corpus) - 1}; got {seq_ids!r}")
    model.require_local_weights("expert_mean_outputs (the mean expert outputs of operator='mean')")
    E, spec = model.layout.num_experts, model.layout.spec
    sums, counts = {}, {L: np.zeros(E, dtype=np.int64) for L in layers}
    slots = {L: ([], [], []) for L in layers}  # indices, slot max, slot max |.|
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for ids_b in progress_bar(batches, desc="expert means", progress=progress):
        ids, mask = corpus.padded(ids_b, pad_id=model.pad_id)
        saved = {}
        with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), remote=model.remote):
            for L in layers:
                x = block_input_in_trace(model, L).save()
                _lg, r_weight, r_idx = routing_in_trace(model, L)
                saved[L] = (x, r_weight.save(), r_idx.save())
            nnsight.save(saved)  # a server returns saved values only, not the dict's mutation
        real = mask.reshape(-1).bool()
        for L in layers:
            x, w, idx = saved[L]
            x = x.reshape(-1, x.shape[-1])[real.to(x.device)]
            idx = idx.reshape(-1, idx.shape[-1])[real.to(idx.device)]
            w = w.reshape(-1, idx.shape[-1])[real.to(w.device)]
            scale = w if spec.combine_site == "router_scores" else None
            out = expert_outputs(model.hf_experts(L), x, idx.to(x.device), call=spec.experts_call, input_scale=scale)
            if L not in sums:
                sums[L] = np.zeros((E, out.shape[-1]), dtype=np.float64)
            out64 = out.float().cpu().numpy().astype(np.float64)
            accumulate_expert_sums(sums[L], counts[L], idx.cpu().numpy(), out64)
            for acc, value in zip(slots[L], (idx.cpu().numpy().astype(np.int64), out64.max(-1), np.abs(out64).max(-1))):
                acc.append(value)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {L: sums[L] / counts[L][:, None] for L in layers}
    cat = {L: [np.concatenate(a) for a in slots[L]] for L in layers}
    return ExpertMeans(model.name, means, counts, indices={L: c[0] for L, c in cat.items()},
                       slot_max={L: c[1] for L, c in cat.items()}, slot_max_abs={L: c[2] for L, c in cat.items()})


# --------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------
def resolve_strategy(model: AuditModel, *, mode: str, strategy: str) -> str:
    """The strategy actually run: sequence mode always re-runs the prefix (``"full"``: it changes
    earlier positions too, so the clean cache cannot be reused); ``"auto"`` is ``"kv"`` where
    :func:`packed_step_supported`, else ``"full"``. ``ValueError`` for an unknown mode or
    strategy."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {ABLATION_MODES}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if mode == "sequence" and strategy in ("kv", "auto"):
        return "full"
    if strategy == "auto":
        return "kv" if packed_step_supported(model) else "full"
    return strategy


def validate_requests(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, requests: pd.DataFrame,
                      *, mode: str, strategy: str = "kv", require_active: bool = True) -> tuple[pd.DataFrame, str]:
    """Check every requested ablation; raise a ``ValueError`` naming the parameter otherwise."""
    strategy = resolve_strategy(model, mode=mode, strategy=strategy)
    missing = {"seq_id", "t", "layer", "removed"} - set(requests.columns)
    if missing:
        raise ValueError(f"requests lack columns {sorted(missing)}")
    req = requests.reset_index(drop=True).copy()
    for col in ("seq_id", "t", "layer"):
        if not (pd.api.types.is_integer_dtype(req[col]) and not pd.api.types.is_bool_dtype(req[col])):
            raise TypeError(f"requests column {col!r} must hold integers, got dtype {req[col].dtype}")
    E = model.layout.num_experts
    req["removed"] = [tuple(integer_ids(np.atleast_1d(r).tolist() if not isinstance(r, str) else r, "removed"))
                      for r in req["removed"]]
    lengths = corpus.lengths
    for row in req.itertuples(index=False):
        model.layout.check_layer(int(row.layer))
        out_of_range = [e for e in row.removed if not 0 <= e < E]
        if out_of_range:
            raise ValueError(f"removed={list(row.removed)} holds expert ids outside [0, {E - 1}]: {out_of_range}")
        if not 0 <= row.seq_id < len(corpus):
            raise ValueError(f"seq_id={row.seq_id} is out of range: the corpus has {len(corpus)} sequences")
        n = int(lengths[row.seq_id])
        if not 0 <= row.t <= n - 2:
            raise ValueError(f"position t={row.t} is out of range for sequence {row.seq_id} of length {n}: "
                             f"t must be in [0, {n - 2}] (the last token has no next-token target)")
        if len(row.removed) == 0 or len(set(row.removed)) != len(row.removed):
            raise ValueError(f"removed={row.removed} must be a non-empty set of distinct experts")
        active = clean.active(row.seq_id, row.t, row.layer)
        bad = [e for e in row.removed if e not in active]
        if bad and require_active:
            raise ValueError(f"expert(s) {bad} not active at (seq_id={row.seq_id}, t={row.t}, layer={row.layer}); "
                             f"active experts there are {sorted(active.tolist())}")
    return req, strategy


def _sequence_chunk(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, sub: pd.DataFrame,
                    chunk: list[int], *, batch_size: int, layer_of, removed_of, operator: str, scale: float,
                    means, downstream: bool, out: tuple, bar) -> None:
    """Sequence-mode ablations of the requests ``sub`` (sequences ``chunk``), started at the ablated layer.

    One clean forward over the chunk gives the residual stream entering every layer. The requests are
    grouped by (sequence, layer, removed experts): each group is one row, a forward of the prefix up to the
    group's last position with the experts removed at every position of it, started at the layer from the
    clean residual (:func:`_run_batch` skips the layers before it); each request reads its loss, block
    output and routing at its own ``t``. The rows of a (sequence, layer), longest first, are cut into units
    (:func:`_length_segments`), each with one clean row up to the unit's longest prefix, started the same
    way, for the clean loss and the premise. Batches hold units of one layer and similar length, at most
    ``batch_size`` rows (:func:`_batch_boundaries`).
    Fills ``out = (results, premise, replacement, leak, masked_selected)`` at the requests' indices, as
    :func:`run_ablations` reads them."""
    results, premise, replacement, leak, masked_selected = out
    E, dev = model.layout.num_experts, model.device
    residual = clean_residual(model, corpus, chunk)
    t_of = {int(i): int(t) for i, t in sub.t.items()}  # request index -> its position
    units = []  # ((seq, layer), [(removed, [request indices]), ...]) with at most batch_size - 1 removed sets
    for (L, s), g in sub.groupby(["layer", "seq_id"], sort=True):
        sets: dict[tuple, list] = {}
        for i in g.index:
            sets.setdefault(tuple(sorted(removed_of[i])), []).append(int(i))
        # longest prefix first, cut where a shorter forward for the rest saves more than its clean row costs
        items = sorted(sets.items(), key=lambda it: -max(t_of[i] for i in it[1]))
        lengths = [max(t_of[i] for i in idxs) + 1 for _, idxs in items]
        for a, b in _length_segments(lengths, max_rows=batch_size - 1, extra_rows=1):
            units.append(((int(s), int(L)), items[a:b]))
    by_layer: dict[int, list] = {}
    for u in units:
        by_layer.setdefault(u[0][1], []).append(u)
    batches = []
    for L_units in by_layer.values():  # one layer per batch; units of similar length share a batch
        L_units.sort(key=lambda u: -max(t_of[i] for _, idxs in u[1] for i in idxs))
        rows_of = [len(u[1]) + 1 for u in L_units]
        len_of = [max(t_of[i] for _, idxs in u[1] for i in idxs) + 1 for u in L_units]
        batches += [L_units[a:b] for a, b in _batch_boundaries(rows_of, len_of, max_rows=batch_size)]
    for batch in batches:
        L = batch[0][0][1]
        rows = []  # (seq, last position, removed experts or None, request indices)
        clean_row = []  # each row's clean row: the one its unit starts with
        for (s, _L), items in batch:
            last = max(t_of[i] for _, idxs in items for i in idxs)
            clean_row += [len(rows)] * (len(items) + 1)
            rows.append((s, last, None, [i for _, idxs in items for i in idxs]))
            rows.extend((s, max(t_of[i] for i in idxs), removed, idxs) for removed, idxs in items)
        R, q_len = len(rows), max(r[1] for r in rows) + 1
        input_ids = torch.full((R, q_len), model.pad_id, dtype=torch.long)
        attn = torch.zeros((R, q_len), dtype=torch.long)
        removal = torch.zeros(R * q_len, E, dtype=torch.bool)
        for r, (s, last, removed, _idxs) in enumerate(rows):
            input_ids[r, : last + 1] = torch.from_numpy(corpus.sequences[s][: last + 1])
            attn[r, : last + 1] = 1
            if removed is not None:
                removal.view(R, q_len, E)[r, : last + 1, list(removed)] = True
        entering = residual[L]
        at = torch.tensor([chunk.index(r[0]) for r in rows], device=entering.device)
        start_hidden = entering[at, :q_len] if L > 0 else None
        reads, read_of = [], {}  # (row, t) pairs read, and the read index of each
        for r, (s, _last, removed, idxs) in enumerate(rows):
            for i in idxs:
                key = (r, t_of[i])
                if key not in read_of:
                    read_of[key] = len(reads)
                    reads.append(key)
        read_rows = torch.tensor([r for r, _ in reads], dtype=torch.long)
        read_pos = torch.tensor([t for _, t in reads], dtype=torch.long)
        kept = torch.unique(read_pos)  # the LM head only at the positions read
        logit_pos = torch.searchsorted(kept, read_pos)
        later = [Lp for Lp in model.layout.moe_layers if Lp > L] if downstream else []
        logits, moe_out, routed, routed_w = _run_batch(
            model, input_ids=input_ids.to(dev), attention_mask=attn.to(dev), position_ids=None,
            past_key_values=None, removal={L: removal}, read_rows=read_rows.to(dev), read_pos=read_pos.to(dev),
            read_layers=later, scale=scale, logits_to_keep=kept.to(dev), logit_pos=logit_pos.to(dev),
            start_layer=L, start_hidden=start_hidden, operator=operator,
            means=means)
        targets = torch.tensor([int(corpus.sequences[rows[r][0]][t + 1]) for r, t in reads], device=logits.device)
        losses = _token_loss(logits, targets).cpu().numpy()
        flat = (read_rows * q_len + read_pos).to(routed[L].device)
        routed_at = routed[L].reshape(-1, routed[L].shape[-1])[flat].cpu().numpy()  # (reads, k)
        weight_at = (routed_w[L].reshape(-1, routed_w[L].shape[-1])[flat.to(routed_w[L].device)].float().cpu().numpy()
                     if L in routed_w else None)
        for r, (s, _last, removed, idxs) in enumerate(rows):
            if removed is None:
                continue
            for i in idxs:
                t = t_of[i]
                c, a = read_of[(clean_row[r], t)], read_of[(r, t)]
                g = (moe_out[L][c] - moe_out[L][a]).float()
                gap = torch.linalg.vector_norm(g).item()
                comp = np.nan
                if downstream and gap > 0:
                    comp = sum(float(torch.dot((moe_out[Lp][a] - moe_out[Lp][c]).float().reshape(-1), g.reshape(-1)))
                               for Lp in later) / gap ** 2 if later else 0.0
                results[i] = (losses[c], losses[a], gap, comp)
                here, before = routed_at[a].tolist(), routed_at[c].tolist()
                if operator == "mask":
                    premise[i, 0] = sum(e in before for e in removed_of[i])
                    replacement[i] = sorted(int(e) for e in set(here) - set(before))
                    in_top = np.isin(routed_at[a], removed_of[i])
                    leak[i] = float(np.abs(weight_at[a][in_top]).sum())
                    masked_selected[i] = int(in_top.sum())
                else:
                    premise[i, 0] = sum(e in here for e in removed_of[i])
                row = clean.row(s, t)
                premise[i, 1] = bool((np.sort(routed_at[c]) == np.sort(clean.routing[L]["indices"][row])).all())
            bar.update(len(idxs))


#: The fixed cost of one traced forward, in token rows (rows x positions) of computation, with which
#: :func:`_batch_boundaries` weighs another forward against the padding it saves.
FORWARD_OVERHEAD_TOKENS = 1024


def _cheapest_cut(n: int, cost) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into contiguous segments ``[a, b)`` minimising ``sum(cost(a, b))`` (``cost``
    returns ``inf`` for a segment not allowed). Exact dynamic programme over the O(n^2) segments."""
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b):
            c = best[a] + cost(a, b)
            if c < best[b]:
                best[b], cut[b] = c, a
    out, b = [], n
    while b > 0:
        out.append((cut[b], b))
        b = cut[b]
    return out[::-1]


def _length_segments(lengths: list[int], *, max_rows: int, extra_rows: int = 1) -> list[tuple[int, int]]:
    """Cut rows sorted by decreasing prefix length into contiguous segments ``[a, b)`` of at most
    ``max_rows`` rows, minimising the padded work ``sum((b - a + extra_rows) * lengths[a])``: each
    segment is computed at its longest row's length, plus ``extra_rows`` rows of that length (the
    clean row each segment carries). :func:`_cheapest_cut`."""
    return _cheapest_cut(len(lengths), lambda a, b: (b - a + extra_rows) * lengths[a] if b - a <= max_rows
                         else float("inf"))


def _batch_boundaries(rows: list[int], lengths: list[int], *, max_rows: int,
                      overhead: float = FORWARD_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Pack units (``rows[j]`` rows each, sorted by decreasing ``lengths``) into batches ``[a, b)`` of
    at most ``max_rows`` rows (a unit larger than that is a batch of its own), minimising the padded
    work ``sum(total rows * lengths[a] + overhead)`` (one forward per batch, every row padded to the
    batch's longest). :func:`_cheapest_cut`."""
    before = np.concatenate([[0], np.cumsum(rows)]).tolist()

    def cost(a, b):
        total = before[b] - before[a]
        return total * lengths[a] + overhead if total <= max_rows or b - a == 1 else float("inf")

    return _cheapest_cut(len(rows), cost)


def _group_batches(groups: list, batch_size: int, *, key=None) -> list[list]:
    """Pack (position, request indices) groups into batches of at most ``batch_size`` rows without
    splitting a group; with ``key`` a batch also holds only groups of one ``key(group)``."""
    batches, current, size = [], [], 0
    for g in groups:
        n = len(g[1]) + 1  # + the clean row
        if current and (size + n > batch_size or (key is not None and key(g) != key(current[-1]))):
            batches.append(current)
            current, size = [], 0
        current.append(g)
        size += n
    if current:
        batches.append(current)
    return batches


def _run_batch(model: AuditModel, *, input_ids, attention_mask, position_ids, past_key_values,
               removal: dict[int, torch.Tensor], read_rows: torch.Tensor, read_pos: torch.Tensor,
               read_layers=(), scale: float = 0.0, logits_to_keep: torch.Tensor | None = None,
               start_layer: int = 0, start_hidden: torch.Tensor | None = None, operator: str = "remove",
               means: dict | None = None, logit_pos: torch.Tensor | None = None):
    """One traced forward. ``removal[L]`` is a (rows, E) bool matrix over the flattened token rows of
    the batch; returns logits, MoE outputs at ``(read_rows, read_pos)`` for every ablated layer
    and every layer in ``read_layers``, and the top-k indices (flattened rows, k) that the router
    of every ablated layer produced in this very forward (the premise check of
    :func:`run_ablations`). With ``logits_to_keep`` (a (rows, 1) position tensor) the LM head runs
    only there and the logits are read at its single kept position; with ``logit_pos`` as well
    (``logits_to_keep`` then a 1-D tensor of the kept positions) the logits of read ``i`` are read at
    kept position ``logit_pos[i]``. With ``start_layer`` S > 0 the
    decoder layers before S are skipped (nnsight's ``Envoy.skip``) and layer S reads
    ``start_hidden`` (the batch's residual stream entering layer S, (batch, seq, H)) instead.
    ``operator`` (:data:`OPERATORS`) is applied to the marked pairs (:func:`ablate_in_trace`; for
    ``"mask"`` the trace runs inside :func:`router_logit_masks` of ``removal``, and the post-mask
    combine weights are returned too, ``weights[L]``; ``means[L]``: (E, H) tensors for ``"mean"``).
    Returns ``(logits, outputs, routed, weights)``; ``weights`` is empty unless ``operator="mask"``."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    # nnsight's remotable wrapper (and a server's) batches a trace's inputs and cannot split a dict of
    # per-layer-type masks: the trace gets the full-attention mask and hands the dict to the decoder inside
    masks_by_type = attention_mask if isinstance(attention_mask, dict) and model.remote else None
    if masks_by_type is not None:
        kwargs["attention_mask"] = masks_by_type["full_attention"]
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if past_key_values is not None:
        kwargs.update(past_key_values=past_key_values, use_cache=True)
    outputs, routed, weights = {}, {}, {}
    masks = removal if operator == "mask" else {}
    if masks:
        model.require_local_weights("operator='mask' (router masking through PyTorch hooks)")
    with torch.no_grad(), router_logit_masks(model, masks), model.nn.trace(**kwargs, remote=model.remote):
        if masks_by_type is not None:
            decoder_args, decoder_kwargs = model.nn.model.inputs
            model.nn.model.inputs = (decoder_args, {**decoder_kwargs, "attention_mask": masks_by_type})
        for skipped in range(start_layer):  # each returns the residual entering S; only the last is read
            model.layers()[skipped].skip(start_hidden)
        for L in sorted(set(removal) | set(read_layers)):
            if L in removal and operator == "mask":
                r_idx, _hit, r_w = ablate_in_trace(model, L, removal[L], operator="mask")
                routed[L], weights[L] = r_idx.save(), r_w.save()
            elif L in removal and operator == "mean":
                r_idx, _hit = ablate_in_trace(model, L, removal[L], operator="mean", mean=means[L])
                routed[L] = r_idx.save()
            elif L in removal:
                r_idx, _hit = ablate_in_trace(model, L, removal[L], scale=scale)
                routed[L] = r_idx.save()
            outputs[L] = block_output_in_trace(model, L, shape=tuple(input_ids.shape))[read_rows, read_pos].save()
        if logits_to_keep is None:
            logits = model.nn.output.logits[read_rows, read_pos].save()
        elif logit_pos is not None:
            logits = model.nn.output.logits[read_rows, logit_pos].save()
        else:
            logits = model.nn.output.logits[read_rows, 0].save()
        nnsight.save(outputs), nnsight.save(routed), nnsight.save(weights)  # a server returns saved values only
    return logits, outputs, routed, weights


@torch.no_grad()
def trace_ablation(model: AuditModel, token_ids, *, layer: int, experts, t: int, mode: str = "token",
                   operator: str = "remove", means: ExpertMeans | None = None) -> dict:
    """The intervention written out once, plainly: remove ``experts`` at ``layer`` inside one nnsight
    trace of the prefix ``x[:t+1]`` and read the next-token loss at ``t``.

    Inside the trace the combine weight of every removed expert is set to zero on the chosen rows
    (``mode="token"``: row ``t`` only, the paper's Definition 2.1; ``"sequence"``: every row
    ``<= t``, the released code's hook) where the block hands it to the experts
    (:func:`ablate_in_trace`), so the layer output loses the removed experts' contributions there
    and nothing else changes. A second,
    un-ablated trace gives the clean loss. This is the reference that :func:`run_ablations`
    (batched, with a key/value cache) must agree with; it runs one prefix per call.

    ``token_ids``: 1-D sequence of token ids (at least ``t + 2`` long: ``x_{t+1}`` is the target).
    Returns ``clean_loss``, ``ablated_loss`` and ``delta_loss`` (nats, float32 losses) and
    ``rows_changed`` (token rows whose combine weights were zeroed). ``ValueError`` for a bad
    ``mode``, layer or position.

    ``operator`` (:data:`OPERATORS`, see :func:`run_ablations`): with ``"mask"`` the marked router
    logits are ``-inf`` (:func:`router_logit_masks`), ``rows_changed`` lists the rows whose top-k
    set differs from the clean trace's and ``leak`` is the largest combine weight a masked expert
    keeps after the top-k (0); with ``"mean"`` the removed outputs are replaced by ``means``
    (:func:`expert_mean_outputs`). ``ValueError`` for an unknown operator or missing means.
    """
    check_operator(operator)
    if (means is not None) != (operator == "mean"):
        raise ValueError(f"means is needed by operator='mean' and used by no other operator (operator={operator!r})")
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {ABLATION_MODES}")
    layer, t = (integer_ids([v], name)[0] for v, name in ((layer, "layer"), (t, "t")))
    model.layout.check_layer(layer)
    arr = np.asarray(token_ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token_ids must be a 1-D sequence of integer token ids, got shape {arr.shape} of {arr.dtype}")
    ids = torch.as_tensor(arr, dtype=torch.long)
    experts = integer_ids(np.atleast_1d(experts).tolist(), "experts")
    E = model.layout.num_experts
    if not experts or len(set(experts)) != len(experts) or not all(0 <= e < E for e in experts):
        raise ValueError(f"experts={experts} must be a non-empty set of distinct expert ids in [0, {E - 1}]")
    if not 0 <= t <= len(ids) - 2:
        raise ValueError(f"t={t} is out of range for a sequence of {len(ids)} tokens: use 0 <= t <= {len(ids) - 2}")
    removed = torch.as_tensor(np.atleast_1d(experts), dtype=torch.long)
    prefix = ids[: t + 1].unsqueeze(0).to(model.device)
    target = ids[t + 1: t + 2].to(model.device)
    removal = torch.zeros(t + 1, model.layout.num_experts, dtype=torch.bool)  # rows = tokens 0..t of the prefix
    removal[t if mode == "token" else slice(None), removed] = True  # which token rows lose the experts
    with model.nn.trace(input_ids=prefix, remote=model.remote):
        clean_idx = routing_in_trace(model, layer)[2].save() if operator == "mask" else None
        clean_logits = model.nn.output.logits[0, t].save()
    extra = {}
    with router_logit_masks(model, {layer: removal} if operator == "mask" else {}), \
            model.nn.trace(input_ids=prefix, remote=model.remote):
        if operator == "mask":
            indices, hit, weights = ablate_in_trace(model, layer, removal, operator="mask")
            indices, weights = indices.save(), weights.save()
            changed = None
        else:
            mean = means.tensor(layer) if operator == "mean" else None
            _indices, hit = ablate_in_trace(model, layer, removal, operator=operator, mean=mean)
            changed = hit.any(dim=1).nonzero().flatten().save()
        ablated_logits = model.nn.output.logits[0, t].save()
    if operator == "mask":
        before, after = torch.sort(clean_idx, dim=-1).values, torch.sort(indices, dim=-1).values
        changed = (before != after).any(dim=1).nonzero().flatten()
        extra["leak"] = float(weights.float().abs().masked_fill(~removal.to(indices.device).gather(1, indices), 0).max())
    clean_loss = float(_token_loss(clean_logits[None], target)[0])
    ablated_loss = float(_token_loss(ablated_logits[None], target)[0])
    return {"clean_loss": clean_loss, "ablated_loss": ablated_loss, "delta_loss": ablated_loss - clean_loss,
            "rows_changed": [int(r) for r in changed.tolist()], **extra}


def packed_step_supported(model: AuditModel) -> bool:
    """Whether token mode can run with ``strategy="kv"`` on ``model``: its attention implementation
    takes a 4-D mask, no layer reads positions from the cache length (the registry's
    ``positions_from_cache``), and every layer type is full or sliding-window attention (not linear
    or chunked attention, whose state a packed step cannot reproduce). ``strategy="auto"`` picks
    ``"kv"`` then, else ``"full"``."""
    try:
        _check_custom_mask_support(model)
        attention_window(model)
    except ValueError:
        return False
    return True


def attention_window(model: AuditModel) -> tuple[int | None, bool]:
    """The sliding attention window of ``model`` as the packed step must reproduce it.

    Returns ``(window, per_layer_type)``: ``window`` is ``W`` when some layers attend only to the
    last ``W`` positions (transformers' ``sliding_window_overlay``: key ``p`` is visible from query
    ``t`` iff ``t - W < p <= t``), else ``None``; ``per_layer_type`` is True when the model reads one
    mask per entry of ``config.layer_types`` (``{"full_attention": ..., "sliding_attention": ...}``,
    e.g. Qwen2-MoE) and False when one mask serves every layer (Mixtral, Qwen3-MoE: the mask is
    windowed iff ``config.sliding_window`` is set). Which of these a family does is its registry
    entry's ``attention_masks`` (:data:`moeaudit.families.ATTENTION_MASKS`): a ``sliding_window``
    key in the config of a family whose attention has no window (OLMoE, DeepSeek-V2, ...) is
    ignored, as the model ignores it. ``ValueError`` naming ``strategy="full"`` for attention types
    the packed step does not build (chunked, linear)."""
    cfg = model.hf.config
    kind = model.layout.spec.attention_masks
    if kind == "causal":
        return None, False
    window = getattr(cfg, "sliding_window", None) or None
    if kind == "window_by_config":
        return (int(window) if window else None), False
    types = list(getattr(cfg, "layer_types", None) or [])
    other = sorted(set(types) - {"full_attention", "sliding_attention"})
    if other:
        raise ValueError(f"token mode with strategy='kv' builds full and sliding-window attention masks only; this "
                         f"model also has {other} layers: use strategy='full'")
    return (int(window) if window and "sliding_attention" in types else None), True


@dataclass
class PackedStep:
    """Inputs of one token-mode step against a chunk's clean key/value cache (see :func:`packed_step`).

    ``attention_mask`` is one 4-D additive mask, or a dict of them keyed by layer type when the
    model reads one mask per type (see :func:`attention_window`). ``flat`` is each row's index
    among the step's flattened tokens (the router's rows); ``read_rows``/``read_pos`` its (batch
    row, query position) in the outputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | dict
    position_ids: torch.Tensor
    cache: object
    flat: torch.Tensor
    read_rows: torch.Tensor
    read_pos: torch.Tensor

    def mask_on(self, device) -> torch.Tensor | dict:
        """The attention mask (or masks) moved to ``device``."""
        if isinstance(self.attention_mask, dict):
            return {k: v.to(device) for k, v in self.attention_mask.items()}
        return self.attention_mask.to(device)


def packed_step(model: AuditModel, corpus: TokenizedCorpus, rows: list, *, chunk: list[int], cache_kv: list,
                width: int) -> PackedStep:
    """Pack ``rows`` = [(seq_id, t, ...), ...] as new tokens of their sequences' clean cache rows.

    ``cache_kv`` holds the (keys, values) per layer of a clean forward over the sequences ``chunk``
    right-padded to ``width``. Sequence ``s`` keeps its cache row; its rows of this step become new
    tokens ``0..R_s-1`` of that row, with position id ``t``. The 4-D additive mask lets new token r
    see the cached positions ``< t_r`` and itself only, so each row is exactly a single-token
    forward at ``t_r`` on the clean prefix, and the cache is never copied per row (only the cache
    rows of sequences absent from the step are dropped, once per step). The mask is additive
    (``finfo.min`` where hidden): eager attention adds it to the scores, where a boolean mask would
    add 0/1. Unused slots (a sequence with fewer rows than the longest) attend to themselves only
    and are never read. With a sliding attention window ``W`` (:func:`attention_window`) the
    windowed mask also hides cached positions ``<= t_r - W``, as the model's own mask does.
    """
    from transformers import DynamicCache  # noqa: PLC0415

    window, per_type = attention_window(model)
    in_step = sorted({int(r[0]) for r in rows})
    step_kv = cache_kv
    if len(in_step) < len(chunk):
        sel = torch.tensor([chunk.index(s) for s in in_step])
        step_kv = [(k.index_select(0, sel.to(k.device)), v.index_select(0, sel.to(v.device))) for k, v in cache_kv]
    batch_row = {s: b for b, s in enumerate(in_step)}
    per_seq: dict[int, int] = {}
    where = []
    for r in rows:
        s = int(r[0])
        j = per_seq.get(s, 0)
        per_seq[s] = j + 1
        where.append((batch_row[s], j))
    B, q = len(in_step), max(per_seq.values())
    input_ids = torch.full((B, q), model.pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, q), dtype=torch.long)
    allowed = torch.zeros((B, 1, q, width + q), dtype=torch.bool)
    allowed[:, 0, torch.arange(q), width + torch.arange(q)] = True  # every query sees its own key
    windowed = allowed.clone() if window is not None else None
    for (b, j), r in zip(where, rows):
        s, t = int(r[0]), int(r[1])
        input_ids[b, j] = int(corpus.sequences[s][t])
        position_ids[b, j] = t
        allowed[b, 0, j, :t] = True
        if windowed is not None:
            windowed[b, 0, j, max(0, t - window + 1):t] = True
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32

    def additive(ok):
        return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)

    if per_type:
        mask = {"full_attention": additive(allowed),
                "sliding_attention": additive(windowed if windowed is not None else allowed)}
    else:
        mask = additive(windowed if windowed is not None else allowed)
    b_of = torch.tensor([b for b, _ in where], dtype=torch.long)
    j_of = torch.tensor([j for _, j in where], dtype=torch.long)
    return PackedStep(input_ids, mask, position_ids, DynamicCache(ddp_cache_data=step_kv), b_of * q + j_of, b_of, j_of)


def clean_cache(model: AuditModel, corpus: TokenizedCorpus, chunk: list[int], *, hidden_states: bool = False):
    """Key/value cache of a clean forward over the sequences ``chunk`` (right-padded), and its
    width. The LM head is skipped (``logits_to_keep=1``): only the cache is needed. The cache keeps
    every position of every layer (a plain ``DynamicCache``, not the model's own, which would keep
    only the last ``W - 1`` positions of a sliding-window layer): the packed step's mask applies
    the window.

    Returns ``(cache_kv, width)``; with ``hidden_states=True`` ``(cache_kv, width, residual)``,
    where ``residual[l]`` (len(chunk), width, H) is the residual stream entering decoder layer ``l``
    (transformers' ``output_hidden_states``: entry l is layer l's input, entry 0 the embeddings)."""
    from transformers import DynamicCache  # noqa: PLC0415

    ids, mask = corpus.padded(chunk, pad_id=model.pad_id)
    if model.on_server:  # the forward runs where the weights are; its output (the cache) comes back
        with torch.no_grad(), model.nn.trace(input_ids=ids, attention_mask=mask, use_cache=True,
                                             past_key_values=DynamicCache(), logits_to_keep=1,
                                             output_hidden_states=hidden_states, remote=model.remote):
            out = model.nn.output.save()
    else:
        with torch.no_grad():
            out = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=True,
                           past_key_values=DynamicCache(), logits_to_keep=1, output_hidden_states=hidden_states)
    kv = [(lay.keys, lay.values) for lay in out.past_key_values.layers]
    if not hidden_states:
        return kv, int(ids.shape[1])
    return kv, int(ids.shape[1]), list(out.hidden_states[:model.layout.n_layers])


def clean_residual(model: AuditModel, corpus: TokenizedCorpus, chunk: list[int]) -> list[torch.Tensor]:
    """The residual stream entering every decoder layer in a clean forward over the sequences ``chunk``
    (right-padded), without a key/value cache (so for every family, hybrid attention included):
    ``residual[l]`` is (len(chunk), width, H), entry 0 the embeddings (transformers'
    ``output_hidden_states``). The LM head is skipped (``logits_to_keep=1``)."""
    ids, mask = corpus.padded(chunk, pad_id=model.pad_id)
    with torch.no_grad():
        out = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False,
                       logits_to_keep=1, output_hidden_states=True)
    return list(out.hidden_states[:model.layout.n_layers])


def _check_custom_mask_support(model: AuditModel) -> None:
    """``ValueError`` naming ``strategy="full"`` where the packed key/value step's assumptions fail:
    the attention takes no custom 4-D mask (flash attention), or a layer computes positions from the
    cache length rather than from ``position_ids`` only (the family's ``positions_from_cache`` rule,
    e.g. Llama 4's attention-temperature tuning in NoPE layers), so a packed row would be computed at the wrong
    position."""
    if reads_positions_from_cache(model.layout.spec, model.hf.config):
        raise ValueError(f"token mode with strategy='kv' packs many positions into one step and passes each its "
                         f"position only through position_ids; this {model.layout.family} configuration "
                         f"({model.layout.spec.positions_from_cache}) computes positions from the cache length in some "
                         "layers, so the packed rows would be wrong: use strategy='full' (strategy='auto' picks it)")
    impl = str(getattr(model.hf.config, "_attn_implementation", "") or "")
    if "flash" in impl:
        raise ValueError(f"token mode with strategy='kv' needs a custom 4-D attention mask, which attn_implementation="
                         f"{impl!r} does not take; load the model with attn_implementation='sdpa' (or 'eager'), "
                         f"or use strategy='full'")


@torch.no_grad()
def run_ablations(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, requests: pd.DataFrame, *,
                  mode: str = "token", strategy: str = "auto", batch_size: int = 64, seq_batch: int = 4,
                  seed: int | None = None, require_active: bool = True, downstream: bool = False,
                  scale: float = 0.0, skip_clean_layers: bool = True,
                  progress: bool | None = None, operator: str = "remove",
                  means: ExpertMeans | None = None) -> pd.DataFrame:
    """Run every requested ablation and return one tidy record per request.

    ``requests``: columns ``seq_id``, ``t``, ``layer``, ``removed`` (expert ids, all active at
    (t, layer)); any other columns are carried into the records. The loss is
    ``-log p(x_{t+1} | x_{<=t})`` in float32; ``delta_loss = ablated_loss - clean_loss`` with the
    clean loss from an un-ablated row of the same batch. ``require_active=False`` allows removing
    an expert that is not routed at t (a no-op there in ``token`` mode; used by the verification
    suite to show that the effect is position-specific).

    ``scale`` multiplies the removed experts' combine weights (0 = ablation, the default; ``1 - eps``
    removes only the fraction ``eps`` of their contribution, for small-perturbation checks).

    ``downstream=True`` adds ``downstream_compensation``: how much of the removed contribution
    ``g = y_t - y_t^(-e)`` the later MoE layers put back at t after the ablation,
    ``sum_{L' > L} <y'_{L'} - y_{L'}, g> / ||g||^2`` (re-measured MoE outputs of the ablated run
    minus the clean ones; 1 would mean full restoration, 0 none, negative amplification).

    Every record checks its own premise inside the forward that changes it: ``removed_routed`` is
    the number of removed experts that the ablated layer's router put in the top-k at t in that
    very forward (``n_removed`` when the premise holds); ``clean_routing_match`` says whether the
    batch's un-ablated row at t routed the same experts as the clean pass; ``premise_ok`` is both.
    In float32 both hold for every record of the shipped models. In reduced precision a re-run
    prefix (``strategy="full"``, sequence mode) can route differently from the clean pass where two
    router probabilities nearly tie; the record then says so instead of passing a no-op off as a
    zero effect (see :func:`premise_failures`). ``strategy`` records how the row was computed:
    ``"kv"``, ``"full"``, or ``"auto"`` (the default): ``"kv"`` where :func:`packed_step_supported`,
    else ``"full"`` (models with linear or chunked attention layers).

    ``batch_size`` is the number of rows (ablations plus one clean row per position) per traced
    forward; ``seq_batch`` the number of sequences whose clean key/value cache is held at once.
    In token mode with ``strategy="kv"`` the rows of a step are packed as new tokens of their
    sequence's cache row (see :func:`packed_step`); otherwise each row is its own prefix
    ``x[:t+1]`` and the LM head is applied at ``t`` only.

    ``skip_clean_layers`` (token mode with ``strategy="kv"``, and sequence mode): a step starts at the
    ablated layer L. In sequence mode the layers before L are unchanged at every position too, so each
    forward starts at L from the clean residual stream of the whole prefix, and the requests of one
    sequence that remove the same experts at the same layer share one causal forward over the prefix up
    to their last position, each read at its own t (a position sees only the positions before it, so
    removing the experts further on changes nothing there); see :func:`_sequence_chunk`. In token mode:
    The decoder layers before L are skipped and L reads the residual stream that enters it in the
    clean cache forward: a token-mode ablation changes nothing before L, so those layers' outputs
    at t are the clean ones. Each batch then holds rows of one layer, with one clean row per
    (position, layer), also started at L. The records equal those of the full step to float32
    rounding (about 1e-6 nats; ``tests/test_engine.py``); ``False`` recomputes every layer.

    ``operator`` (:data:`OPERATORS`) is the intervention applied to the requested (position,
    experts), through the same batches and the same marks (:func:`ablate_in_trace`):

    * ``"remove"`` (default): the paper's ablation above; its records are unchanged (no extra
      columns).
    * ``"mask"``: router masking with renormalisation (:func:`router_logit_masks`): the removed
      experts' router logits are ``-inf`` before the top-k, so the family's router selects the next
      experts and forms their combine weights as it always does. Several removed experts are masked
      together. Records add ``replacement`` (the experts in the top-k at t after masking that the
      batch's clean row did not select), ``leak`` (the summed combine weight that the masked experts
      still get after the top-k: exactly 0 when masking works), ``masked_selected`` (masked experts
      still in the top-k, with weight 0: only a router with a selection bias can do this). The
      premise's ``removed_routed`` counts the removed experts in the clean row's top-k at t (the
      masked forward cannot select them).
    * ``"mean"``: mean-output replacement (MoNE): the removed experts' outputs at t are replaced by
      their means over a clean pass, ``means`` (:func:`expert_mean_outputs`), the combine weights
      kept. Every removed expert needs a mean (routed at least once in that pass).

    Records of ``"mask"`` and ``"mean"`` carry an ``operator`` column. ``scale`` applies to
    ``"remove"`` only. ``ValueError`` for an unknown operator (listing the valid ones), missing or
    mismatched ``means``, or ``means`` given to another operator, before any forward.
    """
    check_operator(operator)
    if operator != "remove" and scale != 0.0:
        raise ValueError(f"scale={scale!r} applies to operator='remove' only (operator={operator!r} keeps scale=0)")
    if (means is not None) != (operator == "mean"):
        raise ValueError("means (expert_mean_outputs) is needed by operator='mean' and used by no other operator; "
                         f"got operator={operator!r} with means={'given' if means is not None else None}")
    _refuse_inside_pruning(model)
    req, strategy = validate_requests(model, corpus, clean, requests, mode=mode, strategy=strategy,
                                      require_active=require_active)
    if not is_integer(batch_size) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (one clean row plus one ablation), got {batch_size!r}")
    if not is_integer(seq_batch) or seq_batch < 1:
        raise ValueError(f"seq_batch must be an integer >= 1, got {seq_batch!r}")
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(scale) < 1.0:
        raise ValueError(f"scale={scale!r} must be a number in [0, 1): the fraction of the removed experts' combine "
                         "weights kept (0 removes them; 1 would remove nothing)")
    if len(req) == 0:
        raise ValueError("requests is empty")
    mean_tensors = _check_means(model, req, means) if operator == "mean" else None
    if strategy == "kv":
        _check_custom_mask_support(model)
        attention_window(model)  # refuses attention types the packed step cannot mask, before any forward
    E = model.layout.num_experts
    dev = model.device
    results = np.full((len(req), 4), np.nan)  # clean_loss, ablated_loss, gap_norm, downstream compensation
    premise = np.zeros((len(req), 2), dtype=np.int64)  # removed experts routed at t here; clean row routed as clean pass
    replacement, leak, masked_selected = [[] for _ in range(len(req))], np.zeros(len(req)), np.zeros(len(req), np.int64)
    seqs = sorted(req.seq_id.unique().tolist())
    chunks = [seqs[i:i + seq_batch] for i in range(0, len(seqs), seq_batch)]
    bar = progress_bar(None, total=len(req), desc=f"ablations ({mode})", progress=progress)
    layer_of, removed_of = req.layer.to_numpy(), [list(r) for r in req.removed]  # plain lookups in the loops
    resume = bool(skip_clean_layers) and strategy == "kv" and mode == "token"
    for chunk in chunks:
        sub = req[req.seq_id.isin(chunk)]
        if mode == "sequence" and skip_clean_layers:
            _sequence_chunk(model, corpus, clean, sub, chunk, batch_size=batch_size, layer_of=layer_of,
                            removed_of=removed_of, operator=operator, scale=float(scale), means=mean_tensors,
                            downstream=downstream, out=(results, premise, replacement, leak, masked_selected),
                            bar=bar)
            continue
        if resume:  # groups of one (position, layer), batches of one layer: a step starts at that layer
            groups = [((int(s), int(t), int(L)), list(g.index))
                      for (L, s, t), g in sub.groupby(["layer", "seq_id", "t"], sort=True)]
        else:
            groups = [((int(s), int(t), 0), list(g.index)) for (s, t), g in sub.groupby(["seq_id", "t"], sort=True)]
        cache_kv = residual = None
        if strategy == "kv" and resume:
            cache_kv, width, residual = clean_cache(model, corpus, chunk, hidden_states=True)
        elif strategy == "kv":
            cache_kv, width = clean_cache(model, corpus, chunk)
        for batch in _group_batches(groups, batch_size, key=lambda g: g[0][2]):
            start_layer = batch[0][0][2]
            rows = []  # (seq, t, request index or None)
            for (s, t, _start), idxs in batch:
                rows.append((s, t, None))
                rows.extend((s, t, i) for i in idxs)
            R = len(rows)
            t_of = torch.tensor([r[1] for r in rows], dtype=torch.long)
            layers_here = sorted({int(layer_of[i]) for _, idxs in batch for i in idxs})
            logits_to_keep = None
            if strategy == "kv":
                step = packed_step(model, corpus, rows, chunk=chunk, cache_kv=cache_kv, width=width)
                input_ids, attn, position_ids, cache = step.input_ids, step.mask_on(dev), step.position_ids, step.cache
                flat_of, read_rows, read_pos = step.flat, step.read_rows, step.read_pos
                q_len, n_flat = input_ids.shape[1], input_ids.numel()
                start_hidden = None
                if start_layer > 0:  # the clean residual entering start_layer at each row's (seq, t)
                    entering = residual[start_layer]
                    start_hidden = entering.new_zeros((input_ids.shape[0], q_len, entering.shape[-1]))
                    at = torch.tensor([chunk.index(r[0]) for r in rows], device=entering.device)
                    start_hidden[read_rows.to(entering.device), read_pos.to(entering.device)] = \
                        entering[at, t_of.to(entering.device)]
            else:
                q_len = int(t_of.max()) + 1
                input_ids = torch.full((R, q_len), model.pad_id, dtype=torch.long)
                attn = torch.zeros((R, q_len), dtype=torch.long)
                for r, (s, t, _) in enumerate(rows):
                    input_ids[r, : t + 1] = torch.from_numpy(corpus.sequences[s][: t + 1])
                    attn[r, : t + 1] = 1
                position_ids, cache, start_hidden = None, None, None
                flat_of = torch.arange(R) * q_len + t_of
                n_flat = R * q_len
                # The LM head only at each row's read position (a (rows, 1) position tensor).
                logits_to_keep = t_of.view(R, 1)
                read_rows, read_pos = torch.arange(R), t_of
            removal = {L: torch.zeros(n_flat, E, dtype=torch.bool) for L in layers_here}
            for r, (s, t, i) in enumerate(rows):
                if i is None:
                    continue
                L, removed = int(layer_of[i]), removed_of[i]
                if mode == "sequence":
                    flat = [r * q_len + j for j in range(t + 1)]
                else:
                    flat = [int(flat_of[r])]
                for f in flat:
                    removal[L][f, removed] = True
            logits, moe_out, routed, routed_w = _run_batch(
                model, input_ids=input_ids.to(dev), attention_mask=attn if isinstance(attn, dict) else attn.to(dev),
                position_ids=None if position_ids is None else position_ids.to(dev), past_key_values=cache,
                removal=removal, read_rows=read_rows.to(dev), read_pos=read_pos.to(dev),
                read_layers=[L for L in model.layout.moe_layers if L > min(layers_here)] if downstream else (),
                scale=float(scale), logits_to_keep=None if logits_to_keep is None else logits_to_keep.to(dev),
                start_layer=start_layer, start_hidden=start_hidden, operator=operator, means=mean_tensors)
            targets = torch.tensor([int(corpus.sequences[s][t + 1]) for s, t, _ in rows], device=logits.device)
            losses = _token_loss(logits, targets).cpu().numpy()
            routed_at = {L: idx.reshape(-1, idx.shape[-1])[flat_of.to(idx.device)].cpu().numpy()
                         for L, idx in routed.items()}  # (R, k): the routing each row's position got here
            # the clean pass's routing at each row's (seq, t), for the premise check (one lookup per batch)
            at_clean = clean.row(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))
            same_as_clean = {L: (np.sort(a, axis=1) == np.sort(clean.routing[L]["indices"][at_clean], axis=1)).all(1)
                             for L, a in routed_at.items()}
            routed_lists = {L: a.tolist() for L, a in routed_at.items()}
            weight_at = {L: w.reshape(-1, w.shape[-1])[flat_of.to(w.device)].float().cpu().numpy()
                         for L, w in routed_w.items()}  # (R, k) post-mask combine weights (operator="mask")
            clean_row = {}
            for r, (s, t, i) in enumerate(rows):
                if i is None:
                    clean_row[(s, t)] = r
                    continue
                c = clean_row[(s, t)]
                L = int(layer_of[i])
                g = (moe_out[L][c] - moe_out[L][r]).float()
                gap = torch.linalg.vector_norm(g).item()
                comp = np.nan
                if downstream and gap > 0:
                    later = [Lp for Lp in moe_out if Lp > L]
                    comp = sum(float(torch.dot((moe_out[Lp][r] - moe_out[Lp][c]).float().reshape(-1), g.reshape(-1)))
                               for Lp in later) / gap ** 2 if later else 0.0
                results[i] = (losses[c], losses[r], gap, comp)
                here = routed_lists[L][r]
                if operator == "mask":  # the masked forward cannot select them: the premise is the clean row's
                    before = routed_lists[L][c]
                    premise[i, 0] = sum(e in before for e in removed_of[i])
                    replacement[i] = sorted(int(e) for e in set(here) - set(before))
                    in_top = np.isin(routed_at[L][r], removed_of[i])
                    leak[i] = float(np.abs(weight_at[L][r][in_top]).sum())
                    masked_selected[i] = int(in_top.sum())
                else:
                    premise[i, 0] = sum(e in here for e in removed_of[i])
                premise[i, 1] = same_as_clean[L][c]
            bar.update(sum(len(idxs) for _, idxs in batch))
    bar.close()
    rec = _records(model, clean, req, results[:, :3], mode=mode, seed=seed)
    rec["strategy"] = strategy
    rec["removed_routed"] = premise[:, 0]
    rec["clean_routing_match"] = premise[:, 1].astype(bool)
    rec["premise_ok"] = (rec.removed_routed.to_numpy() == rec.n_removed.to_numpy()) & rec.clean_routing_match.to_numpy()
    if downstream:
        rec["downstream_compensation"] = results[:, 3]
    if operator != "remove":
        rec["operator"] = operator
    if operator == "mask":
        rec["replacement"], rec["leak"], rec["masked_selected"] = replacement, leak, masked_selected
    return rec


def _check_means(model: AuditModel, req: pd.DataFrame, means) -> dict[int, torch.Tensor]:
    """The (E, H) mean tensors per requested layer; ``ValueError`` when ``means`` is not an
    :class:`ExpertMeans` of this model's shape, lacks a requested layer, or has no mean (count 0)
    for a requested expert."""
    if not isinstance(means, ExpertMeans):
        raise ValueError(f"means must be the ExpertMeans of expert_mean_outputs, got {type(means).__name__}")
    out = {}
    for L, g in req.groupby("layer"):
        L = int(L)
        t = means.tensor(L)
        if t.shape[0] != model.layout.num_experts:
            raise ValueError(f"means of layer {L} hold {t.shape[0]} experts; the model has {model.layout.num_experts}")
        missing = sorted({int(e) for r in g.removed for e in r if means.counts[L][int(e)] == 0})
        if missing:
            raise ValueError(f"expert(s) {missing} of layer {L} were never routed in the pass that computed the means: "
                             "operator='mean' has no mean output to put in their place")
        out[L] = t
    return out


PREMISE_COLUMNS = ("removed_routed", "clean_routing_match", "premise_ok")


def premise_failures(records: pd.DataFrame, *, by=("model", "layer")) -> pd.DataFrame:
    """Count the ablation records whose premise failed (see :func:`run_ablations`).

    One row per group of ``by``: ``n_records``, ``n_not_routed`` (a removed expert was not in the
    top-k at t in the ablating forward), ``n_routing_changed`` (the batch's clean row routed
    differently from the clean pass) and ``n_failed`` (either). ``ValueError`` when ``records``
    lack the premise columns (records computed before the check existed)."""
    missing = [c for c in PREMISE_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack the premise columns {missing}; recompute them with this engine")
    by = [c for c in by if c in records.columns]
    r = records.assign(_not_routed=records.removed_routed < records.n_removed,
                       _changed=~records.clean_routing_match.astype(bool), _failed=~records.premise_ok.astype(bool))
    if not by:
        r = r.assign(_all="all")
        by = ["_all"]
    out = r.groupby(by, sort=True).agg(n_records=("premise_ok", "size"), n_not_routed=("_not_routed", "sum"),
                                         n_routing_changed=("_changed", "sum"), n_failed=("_failed", "sum"))
    return out.reset_index().drop(columns=["_all"], errors="ignore")


def strategy_spread(kv: pd.DataFrame, full: pd.DataFrame) -> dict:
    """How far two executions of the same token-mode ablations differ: records of
    ``strategy="kv"`` and ``strategy="full"`` matched on (``seq_id``, ``t``, ``layer``, the removed
    experts). In float32 they agree to rounding (about 1e-6 nats); in reduced precision the re-run
    prefix of ``"full"`` rounds differently from the cached clean prefix of ``"kv"``.

    Returns ``matched``, ``max_abs_diff`` and ``median_abs_diff`` (nats, |delta_kv - delta_full|),
    ``sign_flips`` (share of matched records, both deltas non-zero, whose signs differ) and
    ``premise_failed_kv``/``premise_failed_full`` (records whose premise failed; see
    :func:`premise_failures`). ``ValueError`` when nothing matches."""
    key = ["seq_id", "t", "layer", "_removed"]
    cols = ["delta_loss", "premise_ok"]
    a, b = (r.assign(_removed=[tuple(x) for x in r.removed])[key + cols] for r in (kv, full))
    m = a.merge(b, on=key, suffixes=("_kv", "_full"))
    if m.empty:
        raise ValueError("no ablation is matched between the two strategies")
    diff = (m.delta_loss_kv - m.delta_loss_full).abs()
    nz = (m.delta_loss_kv != 0) & (m.delta_loss_full != 0)
    return {"matched": int(len(m)), "max_abs_diff": float(diff.max()), "median_abs_diff": float(diff.median()),
            "sign_flips": float((np.sign(m.delta_loss_kv[nz]) != np.sign(m.delta_loss_full[nz])).mean()),
            "premise_failed_kv": int((~kv.premise_ok.astype(bool)).sum()),
            "premise_failed_full": int((~full.premise_ok.astype(bool)).sum())}


def _records(model: AuditModel, clean: CleanPass, req: pd.DataFrame, results: np.ndarray, *, mode: str,
             seed: int | None) -> pd.DataFrame:
    rec = req.copy()
    rows = clean.row(rec.seq_id.to_numpy(), rec.t.to_numpy())
    rec["token_id"] = clean.tokens.token_id.to_numpy()[rows]
    rec["target_id"] = clean.tokens.target_id.to_numpy()[rows]
    weights, probs = [], []
    for r, layer, removed in zip(rows, rec.layer, rec.removed):
        route = clean.routing[int(layer)]
        slots = [np.flatnonzero(route["indices"][r] == e) for e in removed]
        # an inactive expert (only with require_active=False) has combine weight 0 at t
        weights.append([float(route["weight"][r, j[0]]) if len(j) else 0.0 for j in slots])
        probs.append([float(route["prob"][r, j[0]]) if len(j) else float("nan") for j in slots])
    rec["removed"] = [list(r) for r in rec.removed]
    rec["n_removed"] = [len(r) for r in rec.removed]
    rec["removed_weights"] = weights
    rec["removed_probs"] = probs
    rec["clean_loss"], rec["ablated_loss"], rec["gap_norm"] = results[:, 0], results[:, 1], results[:, 2]
    rec["delta_loss"] = rec.ablated_loss - rec.clean_loss
    rec.insert(0, "model", model.name)
    rec.insert(1, "family", model.layout.family)
    rec["mode"] = mode
    rec["dtype"] = str(model.dtype).replace("torch.", "")
    rec["seed"] = -1 if seed is None else int(seed)
    return rec


# --------------------------------------------------------------------------------------------
# Restoration (denoising): an expert's clean contribution put back into a corrupted run
# --------------------------------------------------------------------------------------------
#: ROME's corruption: Gaussian noise of 3 standard deviations of the input embeddings (Meng et al. 2022)
CORRUPTION_SCALE = 3.0
RESTORATION_COLUMNS = ("seq_id", "t", "span_start", "span_stop", "layer", "restored")


def check_corruption_scale(scale) -> float:
    """``scale`` as a float: the standard deviation of the corrupting noise in multiples of the
    embeddings' standard deviation. ``ValueError`` unless it is a finite number > 0 (zero noise
    corrupts nothing, so there would be nothing to restore)."""
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not np.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"corruption_scale={scale!r} must be a finite number > 0 (the noise's standard deviation in "
                         f"embedding standard deviations; causal tracing uses {CORRUPTION_SCALE:g})")
    return float(scale)


@torch.no_grad()
def embedding_std(model: AuditModel, corpus: TokenizedCorpus) -> float:
    """Standard deviation of every element of the input embeddings of every token of ``corpus``
    (each occurrence counts; ``ddof = 1``, as ``torch.std``), in the embeddings' units.

    ROME's ``collect_embedding_std`` (Meng et al. 2022) takes the same statistic over the embedded
    tokens of its subjects; causal tracing then corrupts with noise of 3 times this value. Each
    distinct token is embedded once and weighted by its count. ``ValueError`` for an empty corpus
    or one of a single token (no spread to measure)."""
    if len(corpus) == 0 or int(corpus.lengths.sum()) < 1:
        raise ValueError("the corpus is empty: the embeddings' standard deviation needs at least one token")
    ids, counts = np.unique(np.concatenate([np.asarray(s) for s in corpus.sequences]), return_counts=True)
    vectors = model.hf.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.long).to(model.device))
    e = vectors.double().cpu().numpy()  # (distinct tokens, H)
    n = float(counts.sum()) * e.shape[1]  # elements over all occurrences
    if n < 2:
        raise ValueError("the corpus holds a single embedding element: no standard deviation")
    mean = float((counts[:, None] * e).sum() / n)
    return float(np.sqrt((counts[:, None] * (e - mean) ** 2).sum() / (n - 1)))


def corruption_noise(n_tokens: int, hidden_size: int, *, std: float, seed: int, key=()) -> torch.Tensor:
    """Gaussian noise (n_tokens, hidden_size), float32, standard deviation ``std``, drawn with
    ``numpy.random.default_rng([seed, *key])``. The chapter's key is the position and span, so the
    noise of a position does not depend on which other positions or batches are run."""
    rng = np.random.default_rng([int(seed), *(int(k) for k in key)])
    return torch.from_numpy(rng.standard_normal((n_tokens, hidden_size)) * float(std)).float()


def restore_in_trace(model: AuditModel, layer: int, restored: torch.Tensor, clean_contribution: torch.Tensor):
    """Inside an nnsight trace: put the clean contributions of the experts ``restored`` marks back
    into ``layer``'s output.

    ``restored``: (N, E) bool over the flattened token rows of the batch and the experts;
    ``clean_contribution``: (N, H), per row the sum of the marked experts' contributions in the
    clean run (:func:`expert_contributions`: ``w_e(x_t) E_e(x_t)`` of the clean input), zeros on
    unmarked rows. The edit is the ablation's (:func:`ablate_in_trace`, ``scale=0``: every marked
    expert that the router selected *in this forward* loses its combine weight, so its corrupted
    contribution leaves the MoE output), then ``clean_contribution`` is added to the block output.
    A marked expert that this forward did not route loses nothing and gains its clean contribution.
    So a row's MoE output becomes ``y'_t - sum_e c'_e + sum_e c_e`` (``c'_e = 0`` for an expert not
    routed here). Returns the top-k indices (N, k) of this forward, the (N, k) bool of slots
    whose weight was zeroed, and the edited block output (flattened to (N, H))."""
    indices, hit = ablate_in_trace(model, layer, restored)
    block = model.nn_block(layer)
    index = model.layout.spec.block_output_index
    out = block.output
    hidden = out if index is None else out[index]
    add = clean_contribution.to(hidden.device, torch.float32).reshape(hidden.shape)
    new = (hidden.float() + add).to(hidden.dtype)
    block.output = new if index is None else (*out[:index], new, *out[index + 1:])
    return indices, hit, new.reshape(-1, new.shape[-1])


def validate_restorations(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, requests: pd.DataFrame,
                          *, require_active: bool = True) -> pd.DataFrame:
    """Check every requested restoration before any forward; ``ValueError`` naming the column otherwise.

    Columns :data:`RESTORATION_COLUMNS`: the corrupted span ``[span_start, span_stop)`` must lie in
    the text and in the prefix that predicts ``x_{t+1}`` (``0 <= span_start < span_stop <= t + 1``:
    tokens after ``t`` cannot change that prediction); ``restored`` is a non-empty set of distinct
    experts active at ``(t, layer)`` in the clean pass (whose contributions are restored; with
    ``require_active=False`` any experts: an expert the clean run did not route has clean
    contribution 0, so restoring it removes whatever the corrupted run gave it)."""
    missing = set(RESTORATION_COLUMNS) - set(requests.columns)
    if missing:
        raise ValueError(f"requests lack columns {sorted(missing)}")
    req = requests.reset_index(drop=True).copy()
    for col in RESTORATION_COLUMNS[:-1]:
        if not (pd.api.types.is_integer_dtype(req[col]) and not pd.api.types.is_bool_dtype(req[col])):
            raise TypeError(f"requests column {col!r} must hold integers, got dtype {req[col].dtype}")
    E = model.layout.num_experts
    req["restored"] = [tuple(integer_ids(np.atleast_1d(r).tolist(), "restored")) for r in req["restored"]]
    for row in req.itertuples(index=False):
        model.layout.check_layer(int(row.layer))
        if not 0 <= row.seq_id < len(corpus):
            raise ValueError(f"seq_id={row.seq_id} is out of range: the corpus has {len(corpus)} sequences")
        n = int(corpus.lengths[row.seq_id])
        if not 0 <= row.span_start < row.span_stop <= n:
            raise ValueError(f"the corrupted span [{row.span_start}, {row.span_stop}) lies outside text {row.seq_id} of "
                             f"{n} tokens: spans must satisfy 0 <= span_start < span_stop <= {n}")
        if not 0 <= row.t <= n - 2:
            raise ValueError(f"position t={row.t} is out of range for sequence {row.seq_id} of length {n}: "
                             f"t must be in [0, {n - 2}] (the last token has no next-token target)")
        if row.span_stop > row.t + 1:
            raise ValueError(f"the corrupted span [{row.span_start}, {row.span_stop}) reaches past t={row.t}: tokens "
                             f"after t cannot change the prediction at t, so span_stop must be <= {row.t + 1}")
        if len(row.restored) == 0 or len(set(row.restored)) != len(row.restored) \
                or not all(0 <= e < E for e in row.restored):
            raise ValueError(f"restored={list(row.restored)} must be a non-empty set of distinct expert ids in "
                             f"[0, {E - 1}]")
        active = clean.active(row.seq_id, row.t, row.layer)
        bad = [e for e in row.restored if e not in active]
        if bad and require_active:
            raise ValueError(f"expert(s) {bad} not active at (seq_id={row.seq_id}, t={row.t}, layer={row.layer}) in the "
                             f"clean run, so they have no clean contribution to restore; active experts there are "
                             f"{sorted(active.tolist())}")
    return req


@torch.no_grad()
def run_restorations(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, requests: pd.DataFrame, *,
                     corruption_scale: float = CORRUPTION_SCALE, noise_std: float | None = None, seed: int = 0,
                     batch_size: int = 64, require_active: bool = True, progress: bool | None = None) -> pd.DataFrame:
    """Causal tracing at the level of experts: corrupt the input, restore one expert, read the loss.

    For every request (columns :data:`RESTORATION_COLUMNS`, others are carried into the records):

    1. *Clean and corrupted runs* of the prefix ``x[:t+1]``, in one batch. The corrupted run adds
       Gaussian noise to the input embeddings of the tokens ``[span_start, span_stop)``: standard
       deviation ``noise_std``, by default ``corruption_scale`` times :func:`embedding_std` of
       ``corpus`` (causal tracing's calibration, ROME, Meng et al. 2022), drawn by
       :func:`corruption_noise` keyed by ``(seed, seq_id, t, span_start, span_stop)``, so every
       request of a position and span sees the same noise. The runs give ``clean_loss`` and
       ``corrupt_loss`` (nats, ``-log p(x_{t+1} | x_{<=t})`` in float32), and at ``layer`` and
       token ``t`` each routed expert's contribution ``c_e`` (clean) and ``c'_e`` (corrupted)
       (:func:`expert_contributions`).
    2. *Restored run*: the corrupted run again, with the MoE output of ``layer`` at ``t`` edited by
       :func:`restore_in_trace`: ``y'_t - sum_{e in restored} c'_e + sum_{e in restored} c_e``.
       An expert that the corrupted run did not route at ``(layer, t)`` has ``c'_e = 0``: its clean
       contribution is added. Nothing else changes (the router, the other experts, shared experts).
       ``require_active=False`` also accepts experts the clean run did not route at (layer, t):
       their clean contribution is 0 (so restoring every expert routed in either run makes the
       routed part of the MoE output at (layer, t) the clean one).
       ``restored_loss`` is the next-token loss at ``t``.

    The chapter's recovered fraction is ``(corrupt_loss - restored_loss) / (corrupt_loss -
    clean_loss)``. Records also hold ``restored_routed_corrupt`` (how many restored experts the
    corrupted run routed at (layer, t), counted inside the restored forward),
    ``clean_routing_match`` (the batch's clean row routed as the clean pass did),
    ``block_gap_corrupt`` and ``block_gap_restored`` (``||y'_t - y_t||`` and ``||y^r_t - y_t||``
    at ``layer``, in the residual stream's units: restoring every routed expert of a layer without
    shared experts leaves ``block_gap_restored`` at rounding level), ``noise_std`` and
    ``corruption_scale``.

    ``ValueError`` (before any forward) for a ``corruption_scale`` or ``noise_std`` that is not a finite
    number > 0, a span outside the text or past ``t``, a bad layer, position or expert set
    (:func:`validate_restorations`), ``batch_size < 1`` or a bad ``seed``; ``TypeError`` for
    non-integer request columns. Each forward runs up to ``batch_size`` restored rows of one
    position."""
    _refuse_inside_pruning(model)
    corruption_scale = check_corruption_scale(corruption_scale)
    if noise_std is not None:
        check_corruption_scale(noise_std)
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r} (the noise is drawn reproducibly from it)")
    req = validate_restorations(model, corpus, clean, requests, require_active=require_active)
    model.require_local_weights("run_restorations (the corrupted embeddings and clean contributions)")
    if len(req) == 0:
        raise ValueError("requests is empty")
    std = float(noise_std) if noise_std is not None else corruption_scale * embedding_std(model, corpus)
    dev, embed = model.device, model.hf.get_input_embeddings()
    H = int(model.hf.config.hidden_size)
    results = np.full((len(req), 5), np.nan)  # clean, corrupt, restored loss; block gap corrupt, restored
    premise = np.zeros((len(req), 2), dtype=np.int64)
    bar = progress_bar(None, total=len(req), desc="restorations", progress=progress)
    for (s, t, a, b), group in req.groupby(["seq_id", "t", "span_start", "span_stop"], sort=True):
        s, t, a, b = int(s), int(t), int(a), int(b)
        ids = torch.as_tensor(np.asarray(corpus.sequences[s][: t + 1]), dtype=torch.long)[None].to(dev)
        emb = embed(ids)
        corrupted = emb.clone()
        corrupted[0, a:b] += corruption_noise(b - a, H, std=std, seed=seed, key=(s, t, a, b)).to(emb.device, emb.dtype)
        layers = sorted({int(L) for L in group.layer})
        saved = {}
        with model.nn.trace(inputs_embeds=torch.cat([emb, corrupted]), logits_to_keep=1, remote=model.remote):
            for L in layers:
                x = block_input_in_trace(model, L)[:, t].save()
                _logits, w, idx = routing_in_trace(model, L)
                rows = torch.tensor([t, t + 1 + t])
                saved[L] = (x, w[rows].save(), idx[rows].save(), block_output_in_trace(model, L, shape=(2, t + 1))[:, t].save())
            pair_logits = model.nn.output.logits[:, -1].save()
            nnsight.save(saved)  # a server returns saved values only, not the dict's mutation
        target = torch.tensor([int(corpus.sequences[s][t + 1])], device=pair_logits.device)
        clean_loss, corrupt_loss = _token_loss(pair_logits, target.repeat(2)).cpu().tolist()
        clean_c, corrupt_y, clean_y, clean_match, zero = {}, {}, {}, {}, torch.zeros(H)
        row = clean.row(s, t)
        for L, (x, w, idx, y) in saved.items():
            c = expert_contributions(model, L, x[:1], idx[:1], w[:1])[0].float()  # (k, H)
            clean_c[L] = {int(e): c[j] for j, e in enumerate(idx[0].tolist())}
            clean_y[L], corrupt_y[L] = y[0].float(), y[1].float()
            clean_match[L] = sorted(idx[0].tolist()) == sorted(clean.routing[L]["indices"][row].tolist())
        for start in range(0, len(group), batch_size):
            part = group.iloc[start:start + batch_size]
            R = len(part)
            marks = {L: torch.zeros(R * (t + 1), model.layout.num_experts, dtype=torch.bool) for L in layers}
            adds = {L: torch.zeros(R * (t + 1), H) for L in layers}
            for r, (L, experts) in enumerate(zip(part.layer, part.restored)):
                marks[int(L)][r * (t + 1) + t, list(experts)] = True
                adds[int(L)][r * (t + 1) + t] = sum(clean_c[int(L)].get(e, zero) for e in experts).cpu()
            here = sorted({int(L) for L in part.layer})
            routed, edited = {}, {}
            with model.nn.trace(inputs_embeds=corrupted.expand(R, -1, -1), logits_to_keep=1, remote=model.remote):
                for L in here:
                    idx, _hit, new = restore_in_trace(model, L, marks[L], adds[L])
                    at = torch.arange(R) * (t + 1) + t
                    routed[L], edited[L] = idx[at].save(), new[at].save()
                logits = model.nn.output.logits[:, -1].save()
                nnsight.save(routed), nnsight.save(edited)
            losses = _token_loss(logits, target.repeat(R)).cpu().numpy()
            for r, (i, L, experts) in enumerate(zip(part.index, part.layer, part.restored)):
                L = int(L)
                results[i] = (clean_loss, corrupt_loss, losses[r],
                              float(torch.linalg.vector_norm(corrupt_y[L] - clean_y[L])),
                              float(torch.linalg.vector_norm(edited[L][r].float() - clean_y[L])))
                premise[i] = (sum(e in routed[L][r].tolist() for e in experts), clean_match[L])
            bar.update(R)
    bar.close()
    rec = req.copy()
    rows = clean.row(rec.seq_id.to_numpy(), rec.t.to_numpy())
    rec["restored"] = [list(r) for r in rec.restored]
    rec["n_restored"] = [len(r) for r in rec.restored]
    rec["token_id"] = clean.tokens.token_id.to_numpy()[rows]
    rec["target_id"] = clean.tokens.target_id.to_numpy()[rows]
    rec["clean_loss"], rec["corrupt_loss"], rec["restored_loss"] = results[:, 0], results[:, 1], results[:, 2]
    rec["block_gap_corrupt"], rec["block_gap_restored"] = results[:, 3], results[:, 4]
    rec["restored_routed_corrupt"] = premise[:, 0]
    rec["clean_routing_match"] = premise[:, 1].astype(bool)
    rec["noise_std"] = std
    rec["corruption_scale"] = corruption_scale if noise_std is None else float("nan")
    rec.insert(0, "model", model.name)
    rec.insert(1, "family", model.layout.family)
    rec["dtype"] = str(model.dtype).replace("torch.", "")
    rec["seed"] = int(seed)
    return rec
