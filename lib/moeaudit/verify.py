"""The verification suite of the paper's Appendix B, made able to fail.

1. Per-token cross-entropy equals the Hugging Face reference loss (``labels=input_ids``) on
   one sequence: 1e-4 in float32, 1e-2 in half precision.
2. No stale state: the baseline loss at a position before an ablation, the ablated loss, and
   the baseline after it; baseline and post-ablation baseline must agree within 1e-3 (with
   nnsight nothing persists after a trace, so the difference is expected to be exactly 0).
3. Position diversity: over up to 100 positions of one sequence, more than 50% distinct losses.
4. Position-specific effect: ablating expert e where it is active changes the loss more than
   ablating it where it is not active; in ``token`` mode the inactive-position effect must be
   exactly 0 (the combine weight of an unrouted expert is already 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .audit import AuditContext
from .engine import _token_loss, run_ablations


class VerificationError(AssertionError):
    """Raised when a verification check fails."""


@torch.no_grad()
def _hf_reference_losses(ctx: AuditContext, seq_id: int) -> tuple[float, np.ndarray]:
    ids = torch.from_numpy(ctx.corpus.sequences[seq_id])[None].to(ctx.model.device)
    out = ctx.model.hf(input_ids=ids, labels=ids)
    per_token = _token_loss(out.logits[0, :-1], ids[0, 1:]).cpu().numpy()
    return float(out.loss), per_token


def verification_suite(ctx: AuditContext, *, layer: int, mode: str = "token", seq_id: int | None = None,
                       fail_loudly: bool = True) -> pd.DataFrame:
    """Run the four checks at ``layer`` and return one row per check.

    Raises :class:`VerificationError` listing the failed checks when ``fail_loudly``.
    """
    ctx.model.layout.check_layer(layer)
    half = ctx.model.dtype in (torch.float16, torch.bfloat16)
    lengths = ctx.corpus.lengths
    if seq_id is None:
        seq_id = int(np.argmax(lengths))
    n = int(lengths[seq_id])
    if n < 4:
        raise ValueError(f"sequence {seq_id} has {n} tokens; the suite needs at least 4")
    rows = []

    # 1. per-token CE vs HF reference
    ref_loss, _ = _hf_reference_losses(ctx, seq_id)
    toks = ctx.clean.tokens[ctx.clean.tokens.seq_id == seq_id]
    ours = float(np.nanmean(toks.loss.to_numpy()))
    tol = 1e-2 if half else 1e-4
    rows.append(("per-token CE = HF reference loss", abs(ours - ref_loss), f"<= {tol:g}", abs(ours - ref_loss) <= tol))

    # 2. no stale state: baseline, ablation, post-clear baseline at one position
    t = n // 2
    active = ctx.clean.active(seq_id, t, layer)
    e_active = int(active[0])
    _, before = _hf_reference_losses(ctx, seq_id)
    rec = run_ablations(ctx.model, ctx.corpus, ctx.clean,
                        pd.DataFrame([{"seq_id": seq_id, "t": t, "layer": layer, "removed": [e_active]}]),
                        mode=mode, progress=False)
    _, after = _hf_reference_losses(ctx, seq_id)
    stale = float(abs(after[t] - before[t]))
    rows.append(("no stale state (baseline vs post-clear)", stale, "<= 1e-3", stale <= 1e-3))

    # 3. position diversity over up to 100 positions
    ts = np.arange(min(100, n - 1))
    losses = toks.set_index("t").loss.reindex(ts).to_numpy()
    distinct = len(np.unique(np.round(losses, 6))) / len(ts)
    rows.append(("position diversity (share of distinct losses)", distinct, "> 0.5", distinct > 0.5))

    # 4. position-specific effect: same expert, a position where it is active vs one where it is not
    routed = ctx.clean.routing[layer]["indices"][ctx.clean.row(seq_id, np.arange(n - 1))]
    inactive_ts = [u for u in range(n - 1) if e_active not in routed[u] and u != t]
    if not inactive_ts:
        rows.append(("position-specific effect", np.nan, "needs a position where e is inactive", False))
    else:
        u = inactive_ts[-1] if inactive_ts[-1] > t else inactive_ts[0]
        both = run_ablations(ctx.model, ctx.corpus, ctx.clean, pd.DataFrame([
            {"seq_id": seq_id, "t": t, "layer": layer, "removed": [e_active]},
            {"seq_id": seq_id, "t": u, "layer": layer, "removed": [e_active]}]),
            mode=mode, require_active=False, progress=False)
        d_active, d_inactive = (abs(float(x)) for x in both.delta_loss)
        ok = d_active > d_inactive and (mode != "token" or d_inactive == 0.0)
        rule = "|delta active| > |delta inactive|" + (", inactive == 0" if mode == "token" else "")
        rows.append((f"position-specific effect (|delta| active t={t} vs inactive t={u})",
                     d_active - d_inactive, rule, ok))
        rows.append(("  |delta| where inactive", d_inactive, "== 0 in token mode", mode != "token" or d_inactive == 0.0))
    out = pd.DataFrame(rows, columns=["check", "value", "criterion", "passed"])
    out.insert(0, "layer", layer)
    out.insert(0, "model", ctx.name)
    out["ablation_delta_at_t"] = float(rec.delta_loss.iloc[0])
    if fail_loudly and not out.passed.all():
        raise VerificationError(f"verification failed for {ctx.name} at layer {layer}:\n"
                                + out.loc[~out.passed, ["check", "value", "criterion"]].to_string(index=False))
    return out
