"""Attribution patching: a first-order estimate of every single-expert ablation at once.

For a token-level ablation of routed expert e at layer L and position t, the MoE output changes
by ``-g_e(x_t) E_e(x_t)`` and, to first order, the loss at t changes by

    dL_hat(t, e) = -grad_{y_t^L} L_t . g_e(x_t) E_e(x_t)

(Syed, Rager and Conmy 2023, "Attribution patching"). The gradient of L_t with respect to the
MoE output at t is taken in the KV-cached single-token step of the engine's ``token`` mode: the
cache of positions < t is a constant, so one forward and one backward over a batch of positions
gives the exact per-position gradients ``d L_t / d y_t`` for every MoE layer at once. The
estimate costs one forward and one backward per batch of positions, against ``k`` forwards per
position and layer for the measured ablations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .corpus import TokenizedCorpus
from .engine import CleanPass, _bar, _token_loss, expert_outputs
from .models import AuditModel


def attribution_estimates(model: AuditModel, corpus: TokenizedCorpus, clean: CleanPass, positions: pd.DataFrame,
                          *, layers, batch_size: int = 64, seq_batch: int = 4,
                          progress: bool | None = None) -> pd.DataFrame:
    """One row per (position, layer, active expert) with ``attribution`` = the first-order estimate
    of ``delta_loss`` for ablating that expert alone at that token (``token`` mode)."""
    from transformers import DynamicCache  # noqa: PLC0415

    layers = sorted(layers)
    for L in layers:
        model.layout.check_layer(L)
    dev = model.device
    pos = positions[["seq_id", "t"]].drop_duplicates().sort_values(["seq_id", "t"]).reset_index(drop=True)
    seqs = sorted(pos.seq_id.unique().tolist())
    frames = []
    for c0 in _bar(range(0, len(seqs), seq_batch), desc="attribution", progress=progress):
        chunk = seqs[c0:c0 + seq_batch]
        ids, mask = corpus.padded(chunk, pad_id=model.pad_id)
        with torch.no_grad():
            out = model.hf(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
        cache_kv = [(lay.keys, lay.values) for lay in out.past_key_values.layers]
        width, row_of = ids.shape[1], {s: i for i, s in enumerate(chunk)}
        sub = pos[pos.seq_id.isin(chunk)]
        for b0 in range(0, len(sub), batch_size):
            rows = sub.iloc[b0:b0 + batch_size]
            R = len(rows)
            sel = torch.tensor([row_of[s] for s in rows.seq_id], device=dev)
            cache = DynamicCache(ddp_cache_data=[(k.index_select(0, sel), v.index_select(0, sel)) for k, v in cache_kv])
            t_of = torch.tensor(rows.t.to_numpy())
            attn = (torch.arange(width + 1)[None, :] < t_of[:, None]).long()
            attn[:, width] = 1
            step_ids = torch.tensor([int(corpus.sequences[s][t]) for s, t in zip(rows.seq_id, rows.t)]).view(R, 1)
            targets = torch.tensor([int(corpus.sequences[s][t + 1]) for s, t in zip(rows.seq_id, rows.t)], device=dev)
            saved, grads = {}, {}
            with torch.enable_grad(), model.nn.trace(input_ids=step_ids.to(dev), attention_mask=attn.to(dev),
                                                     position_ids=t_of.view(R, 1).to(dev), past_key_values=cache,
                                                     use_cache=True, remote=model.remote):
                emb = model.nn.model.embed_tokens.output
                emb.requires_grad_(True)  # weights stay frozen; gradients flow through activations only
                ys = {}
                for L in layers:
                    mlp = model.layers()[L].mlp
                    x = mlp.input.save()
                    _, w, idx = mlp.gate.output
                    saved[L] = (x, w.save(), idx.save())
                    ys[L] = mlp.output
                logits = model.nn.output.logits
                loss = _token_loss(logits[:, -1], targets).sum()  # rows are independent: d(sum)/dy_r = dL_r/dy_r
                with loss.backward():
                    for L in reversed(layers):  # gradients arrive in reverse execution order
                        grads[L] = ys[L].grad.save()
            for L in layers:
                x, w, idx = saved[L]
                experts = model.hf.model.layers[L].mlp.experts
                with torch.no_grad():
                    contrib = expert_outputs(experts, x.reshape(R, -1).detach(), idx) * w.detach()[..., None]
                    est = -(grads[L].reshape(R, 1, -1).float() * contrib.float()).sum(-1)  # (R, k)
                k = idx.shape[1]
                frames.append(pd.DataFrame({
                    "seq_id": np.repeat(rows.seq_id.to_numpy(), k), "t": np.repeat(rows.t.to_numpy(), k),
                    "layer": L, "expert": idx.reshape(-1).cpu().numpy(),
                    "attribution": est.reshape(-1).cpu().numpy().astype(np.float64)}))
    return pd.concat(frames, ignore_index=True)
