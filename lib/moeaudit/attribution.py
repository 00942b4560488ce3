"""Attribution patching: a first-order estimate of every single-expert ablation at once.

For a token-level ablation of routed expert e at layer L and position t, the MoE output changes
by minus the expert's contribution ``c_e(x_t)`` (``w_e(x_t) E_e(x_t)``, or ``E_e(w_e(x_t) x_t)`` for
a family that weights the expert's input: :func:`moeaudit.engine.expert_contributions`) and, to
first order, the loss at t changes by

    dL_hat(t, e) = -grad_{y_t^L} L_t . c_e(x_t)

(Syed, Rager and Conmy 2023, "Attribution patching"). The gradient of L_t with respect to the
MoE output at t is taken in the engine's packed ``token``-mode step (:func:`moeaudit.engine.packed_step`):
the cache of positions < t is a constant and the packed rows do not see each other, so one
forward and one backward over a batch of positions gives the exact per-position gradients
``d L_t / d y_t`` for every MoE layer at once. The
estimate costs one forward and one backward per batch of positions, against ``k`` forwards per
position and layer for the measured ablations.
"""

from __future__ import annotations

import nnsight
import numpy as np
import pandas as pd
import torch

from .corpus import TokenizedCorpus
from .engine import (CleanPass, _token_loss, attention_window, block_input_in_trace, block_output_in_trace, clean_cache,
                     expert_contributions, packed_step, progress_bar, routing_in_trace)
from .models import AuditModel


def attribution_estimates(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, positions: pd.DataFrame,
                          *, layers, batch_size: int = 64, seq_batch: int = 4,
                          progress: bool | None = None) -> pd.DataFrame:
    """One row per (position, layer, active expert) with ``attribution`` = the first-order estimate
    of ``delta_loss`` for ablating that expert alone at that token (``token`` mode)."""
    layers = sorted(layers)
    for L in layers:
        model.layout.check_layer(L)
    attention_window(model)  # refuses attention types the packed step cannot mask, before any forward
    if model.remote:  # its backward pass inside the trace does not survive nnsight 0.8.1's server path
        raise ValueError(f"attribution_estimates runs a backward pass inside the trace, which nnsight's remote "
                         f"execution does not run here (remote={model.remote!r}); use remote=False")
    dev = model.device
    pos = positions[["seq_id", "t"]].drop_duplicates().sort_values(["seq_id", "t"]).reset_index(drop=True)
    seqs = sorted(pos.seq_id.unique().tolist())
    frames = []
    for c0 in progress_bar(range(0, len(seqs), seq_batch), desc="attribution", progress=progress):
        chunk = seqs[c0:c0 + seq_batch]
        cache_kv, width = clean_cache(model, corpus, chunk)
        sub = pos[pos.seq_id.isin(chunk)]
        for b0 in range(0, len(sub), batch_size):
            rows = sub.iloc[b0:b0 + batch_size]
            step = packed_step(model, corpus, list(zip(rows.seq_id, rows.t)), chunk=chunk, cache_kv=cache_kv,
                               width=width)
            targets = torch.tensor([int(corpus.sequences[s][t + 1]) for s, t in zip(rows.seq_id, rows.t)], device=dev)
            flat, rr, rp = step.flat.to(dev), step.read_rows.to(dev), step.read_pos.to(dev)
            saved, grads = {}, {}
            with torch.enable_grad(), model.nn.trace(input_ids=step.input_ids.to(dev),
                                                     attention_mask=step.mask_on(dev),
                                                     position_ids=step.position_ids.to(dev), past_key_values=step.cache,
                                                     use_cache=True, remote=model.remote):
                emb = model.nn.model.embed_tokens.output
                emb.requires_grad_(True)  # weights stay frozen; gradients flow through activations only
                ys = {}
                for L in layers:
                    x = block_input_in_trace(model, L).save()
                    _, w, idx = routing_in_trace(model, L)
                    saved[L] = (x, w.save(), idx.save())
                    ys[L] = block_output_in_trace(model, L)
                logits = model.nn.output.logits
                # packed rows are independent (none attends to another): d(sum)/dy_r = dL_r/dy_r
                loss = _token_loss(logits[rr, rp], targets).sum()
                with loss.backward():
                    for L in reversed(layers):  # gradients arrive in reverse execution order
                        grads[L] = ys[L].grad.save()
                nnsight.save(saved), nnsight.save(grads)  # a server returns saved values only
            for L in layers:
                x, w, idx = saved[L]
                x = x.reshape(-1, x.shape[-1])[flat].detach()
                w, idx = w.reshape(-1, w.shape[-1])[flat].detach(), idx.reshape(-1, idx.shape[-1])[flat]
                g = grads[L].reshape(-1, grads[L].shape[-1])[flat]
                with torch.no_grad():
                    contrib = expert_contributions(model, L, x, idx, w)
                    est = -(g[:, None, :].float() * contrib.float()).sum(-1)  # (R, k)
                k = idx.shape[1]
                frames.append(pd.DataFrame({
                    "seq_id": np.repeat(rows.seq_id.to_numpy(), k), "t": np.repeat(rows.t.to_numpy(), k),
                    "layer": L, "expert": idx.reshape(-1).cpu().numpy(),
                    "attribution": est.reshape(-1).cpu().numpy().astype(np.float64)}))
    return pd.concat(frames, ignore_index=True)
