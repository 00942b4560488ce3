"""One-shot expert pruning and perplexity, for checking what the token-level audit says about
the deployed pipeline (rank experts by a criterion, remove the lowest-ranked everywhere).

A pruned expert is removed from its router: its logit is set to -inf before the softmax, so the
router distributes probability over the remaining experts and picks the top-k among them, exactly
as a model without that expert would. The top-k re-computation follows each family's router
(softmax in float32, optional renormalisation, DeepSeek-V2's routed scaling factor).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .corpus import TokenizedCorpus
from .engine import progress_bar, _token_loss
from .models import AuditModel


def _reroute(layout, logits: torch.Tensor, pruned: torch.Tensor, like: torch.Tensor):
    """Re-run the router's top-k selection from ``logits`` with ``pruned`` experts removed."""
    masked = logits.float().masked_fill(pruned, float("-inf"))
    probs = torch.softmax(masked, dim=-1, dtype=torch.float32)
    if layout.family == "deepseek_v2":
        weights, idx = torch.topk(probs, layout.top_k, dim=-1, sorted=False)
        weights = weights * layout.routed_scaling_factor
    else:
        weights, idx = torch.topk(probs, layout.top_k, dim=-1)
        if layout.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(like.dtype), idx


@contextlib.contextmanager
def pruned_experts(model: AuditModel, pruned: dict[int, list[int]]):
    """Within the block, the experts ``pruned[layer]`` are removed from their routers.

    A layer listed with an empty list is re-routed through the same code path with nothing removed
    (so tests can check that the re-implementation reproduces the model's own router exactly).
    """
    layout = model.layout
    masks = {}  # validate every entry before touching the model, so a bad entry leaves no hooks behind
    for layer, experts in pruned.items():
        layout.check_layer(layer)
        experts = sorted(set(int(e) for e in experts))
        bad = [e for e in experts if not 0 <= e < layout.num_experts]
        if bad:
            raise ValueError(f"experts {bad} out of range [0, {layout.num_experts - 1}] at layer {layer}")
        if layout.num_experts - len(experts) < layout.top_k:
            raise ValueError(f"pruning {len(experts)} of {layout.num_experts} experts at layer {layer} leaves fewer "
                             f"than top-k = {layout.top_k}")
        gate = model.hf.model.layers[layer].mlp.gate
        if layout.family == "deepseek_v2" and getattr(gate, "topk_method", "greedy") != "greedy":
            raise ValueError("pruning supports DeepSeek-V2's greedy top-k router only")
        mask = torch.zeros(layout.num_experts, dtype=torch.bool, device=gate.weight.device)
        mask[experts] = True
        masks[layer] = mask

    def make_hook(mask):
        def hook(_module, _inputs, output):
            logits, weights, _ = output
            new_w, new_idx = _reroute(layout, logits, mask.expand_as(logits), weights)
            return logits, new_w, new_idx
        return hook

    handles = [model.hf.model.layers[L].mlp.gate.register_forward_hook(make_hook(m)) for L, m in masks.items()]
    model.hf._moeaudit_pruned = True  # the engine refuses to run on a re-routed model (see engine)
    try:
        yield model
    finally:
        model.hf._moeaudit_pruned = False
        for h in handles:
            h.remove()


@torch.no_grad()
def perplexity(model: AuditModel, corpus: TokenizedCorpus, *, batch_size: int = 8,
               progress: bool | None = None) -> dict:
    """Perplexity ``exp(mean_t -log p(x_{t+1} | x_{<=t}))`` over every next-token prediction of
    ``corpus`` (float32 losses), with the token count and mean loss."""
    total, count = 0.0, 0
    order = list(range(len(corpus)))
    for b in progress_bar(range(0, len(order), batch_size), desc="perplexity", progress=progress):
        seq_ids = order[b:b + batch_size]
        ids, mask = corpus.padded(seq_ids, pad_id=model.pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model.hf(input_ids=ids, attention_mask=mask).logits
        valid = mask[:, 1:].bool()
        losses = _token_loss(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        total += float(losses[valid.reshape(-1)].double().sum())
        count += int(valid.sum())
    mean = total / count
    return {"perplexity": float(np.exp(mean)), "mean_loss": mean, "n_tokens": count}


def lowest_ranked(values: np.ndarray, fraction: float) -> list[int]:
    """Indices of the ``round(fraction * len(values))`` lowest values (NaN counts as lowest: an
    expert that is never selected is the first to go); ties broken by index."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    n = int(round(fraction * len(values)))
    key = np.where(np.isnan(values), -np.inf, values)
    return sorted(np.lexsort((np.arange(len(values)), key))[:n].tolist())
