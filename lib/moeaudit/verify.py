"""The verification suite of the paper's Appendix B, made able to fail.

1. Per-token cross-entropy equals the Hugging Face reference loss (``labels=input_ids``) on
   one sequence: 1e-4 in float32, 1e-2 in half precision.
2. No stale state: the baseline loss at a position before an ablation, the ablated loss, and
   the baseline after it; baseline and post-ablation baseline must agree within 1e-3 (with
   nnsight nothing persists after a trace, so the difference is expected to be exactly 0).
3. Position diversity: over up to 100 positions of one sequence, more than 50% distinct losses.
4. Position-specific effect: ablating expert e where it is active changes the loss more (in
   absolute value) than ablating it where it is not active (the paper's rule, Appendix B).
   4b, the book's addition, in ``token`` mode only: the inactive-position effect is zero up to
   floating-point rounding (:func:`rounding_tolerance`), because the combine weight of an
   unrouted expert is already 0 there.

The released code (``verify_all`` in the OLMoE and DeepSeek per-token workers) records check 4
as passed as soon as it has found an (active, inactive) pair and measured both loss changes;
it prints them but never compares them (:func:`check4_rules`, ``"released"``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .audit import AuditContext
from .engine import _token_loss, run_ablations


class VerificationError(AssertionError):
    """Raised when a verification check fails."""


#: the checks' keys, in order, and their short labels for tables
CHECK_LABELS = {"ce": "1. CE = HF reference", "stale": "2. no stale state", "diversity": "3. position diversity",
                "position": "4. active − inactive |ΔL|", "inactive": "4b. |ΔL| where inactive"}


def rounding_tolerance(loss: float, *, dtype=torch.float32, n_ulp: int = 8) -> float:
    """What "zero up to floating-point rounding" means for a loss change, in nats.

    ``n_ulp * eps(dtype) * max(1, |loss|)``, with ``eps`` the machine epsilon of the model's
    ``dtype`` (``torch.finfo``; 2**-23 for float32). The clean and the ablated loss of one request
    come from different rows of a batched forward pass, and their arithmetic can differ in the
    last bits even when the ablation changes nothing. ``ValueError`` for a non-finite loss or
    ``n_ulp < 1``.
    """
    if not np.isfinite(loss):
        raise ValueError(f"loss must be finite, got {loss}")
    if n_ulp < 1:
        raise ValueError(f"n_ulp must be >= 1, got {n_ulp}")
    return float(n_ulp * torch.finfo(dtype).eps * max(1.0, abs(float(loss))))


def check4_rules(d_active: float, d_inactive: float, *, mode: str, tolerance: float = 0.0) -> dict[str, bool]:
    """How three readings of check 4 judge one measured pair of loss changes (nats).

    ``d_active``/``d_inactive``: the loss change from removing expert e at a position where the
    router selected it / did not; NaN when no such pair was found.

    * ``"paper"``: Appendix B, "must produce larger loss change": ``|d_active| > |d_inactive|``.
    * ``"released"``: the released ``verify_all``: passed whenever a pair was measured (both
      values finite), whatever their sizes; it prints them and never compares them.
    * ``"book"``: the paper's rule and, in ``token`` mode, ``|d_inactive| <= tolerance``
      (:func:`rounding_tolerance`): removing an unrouted expert at one position is a no-op.

    All three are False when no pair was found. ``ValueError`` for an unknown ``mode``.
    """
    if mode not in ("token", "sequence"):
        raise ValueError(f"mode must be 'token' or 'sequence', got {mode!r}")
    found = bool(np.isfinite(d_active) and np.isfinite(d_inactive))
    paper = found and abs(d_active) > abs(d_inactive)
    book = paper and (mode != "token" or abs(d_inactive) <= tolerance)
    return {"paper": bool(paper), "released": found, "book": bool(book)}


@torch.no_grad()
def _hf_reference_losses(ctx: AuditContext, seq_id: int) -> tuple[float, np.ndarray]:
    ids = torch.from_numpy(ctx.corpus.sequences[seq_id])[None].to(ctx.model.device)
    out = ctx.model.hf(input_ids=ids, labels=ids)
    per_token = _token_loss(out.logits[0, :-1], ids[0, 1:]).cpu().numpy()
    return float(out.loss), per_token


def verification_suite(ctx: AuditContext, *, layer: int, mode: str = "token", seq_id: int | None = None,
                       fail_loudly: bool = True) -> pd.DataFrame:
    """Run the four checks at ``layer`` and return one row per check.

    Columns: ``model``, ``layer``, ``key`` (see :data:`CHECK_LABELS`), ``check``, ``value``,
    ``criterion``, ``passed``, and for check 4: ``t``, ``u`` (active and inactive position),
    ``expert``, ``d_active``, ``d_inactive`` (signed loss changes, nats), ``tolerance``.
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
    rows.append({"key": "ce", "check": "per-token CE = HF reference loss", "value": abs(ours - ref_loss),
                 "criterion": f"<= {tol:g}", "passed": abs(ours - ref_loss) <= tol})

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
    rows.append({"key": "stale", "check": "no stale state (baseline vs post-clear)", "value": stale,
                 "criterion": "<= 1e-3", "passed": stale <= 1e-3})

    # 3. position diversity over up to 100 positions
    ts = np.arange(min(100, n - 1))
    losses = toks.set_index("t").loss.reindex(ts).to_numpy()
    distinct = len(np.unique(np.round(losses, 6))) / len(ts)
    rows.append({"key": "diversity", "check": "position diversity (share of distinct losses)", "value": distinct,
                 "criterion": "> 0.5", "passed": distinct > 0.5})

    # 4. position-specific effect: same expert, a position where it is active vs one where it is not
    routed = ctx.clean.routing[layer]["indices"][ctx.clean.row(seq_id, np.arange(n - 1))]
    inactive_ts = [u for u in range(n - 1) if e_active not in routed[u] and u != t]
    pos = {"t": t, "u": np.nan, "expert": e_active, "d_active": np.nan, "d_inactive": np.nan, "tolerance": np.nan}
    if inactive_ts:
        u = inactive_ts[-1] if inactive_ts[-1] > t else inactive_ts[0]
        both = run_ablations(ctx.model, ctx.corpus, ctx.clean, pd.DataFrame([
            {"seq_id": seq_id, "t": t, "layer": layer, "removed": [e_active]},
            {"seq_id": seq_id, "t": u, "layer": layer, "removed": [e_active]}]),
            mode=mode, require_active=False, progress=False)
        pos.update(u=u, d_active=float(both.delta_loss.iloc[0]), d_inactive=float(both.delta_loss.iloc[1]),
                   tolerance=rounding_tolerance(float(both.clean_loss.iloc[1]), dtype=ctx.model.dtype))
    rule = check4_rules(pos["d_active"], pos["d_inactive"], mode=mode,
                        tolerance=0.0 if np.isnan(pos["tolerance"]) else pos["tolerance"])
    a, i = abs(pos["d_active"]), abs(pos["d_inactive"])
    rows.append({"key": "position", "check": f"position-specific effect (|delta| active t={t} vs inactive t={pos['u']})",
                 "value": a - i, "criterion": "|delta active| > |delta inactive|", "passed": rule["paper"], **pos})
    rows.append({"key": "inactive", "check": "  |delta| where inactive", "value": i,
                 "criterion": "<= rounding tolerance in token mode; none in sequence mode",
                 "passed": rule["released"] and (mode != "token" or i <= pos["tolerance"]), **pos})
    out = pd.DataFrame(rows)
    out.insert(0, "layer", layer)
    out.insert(0, "model", ctx.name)
    out["ablation_delta_at_t"] = float(rec.delta_loss.iloc[0])
    if fail_loudly and not out.passed.all():
        raise VerificationError(f"verification failed for {ctx.name} at layer {layer}:\n"
                                + out.loc[~out.passed, ["check", "value", "criterion"]].to_string(index=False))
    return out


def suite_tables(suite: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The values and pass flags of one mode's suites as two (model, layer) × check tables.

    ``suite``: rows of :func:`verification_suite` for several models, layers and modes, with a
    ``mode`` column. Columns are :data:`CHECK_LABELS` values in check order, plus ``t / u`` (the
    active and inactive positions of check 4, as text) in the values table; rows keep the order
    of ``suite``. ``ValueError`` when ``mode`` has no rows.
    """
    s = suite[suite["mode"] == mode]
    if s.empty:
        raise ValueError(f"no suites in mode {mode!r}")
    idx = ["model", "layer"]
    val = s.pivot_table(index=idx, columns="key", values="value", aggfunc="first", sort=False)
    ok = s.pivot_table(index=idx, columns="key", values="passed", aggfunc="first", sort=False).astype(bool)
    order = pd.MultiIndex.from_frame(s[idx].drop_duplicates())  # pivot_table orders layers by their first
    val, ok = val.reindex(order), ok.reindex(order)               # appearance in any model, not model by model
    keys = [k for k in CHECK_LABELS if k in val.columns]
    val, ok = val[keys].rename(columns=CHECK_LABELS), ok[keys].rename(columns=CHECK_LABELS)
    val.columns.name = ok.columns.name = None
    pos = s[s.key == "position"].set_index(idx)
    val.insert(0, "t / u", [f"{int(t)} / {int(u)}" if np.isfinite(u) else f"{int(t)} / —"
                            for t, u in zip(pos.t.reindex(val.index), pos.u.reindex(val.index))])
    return val, ok


def check4_summary(suite: pd.DataFrame, *, last_layer: dict) -> dict:
    """Counts that describe check 4 over all suites (one row per model, layer and mode).

    ``last_layer``: model -> index of its last decoder layer (where the two ablation definitions
    coincide). Keys: ``n_token``, ``n_token_zero`` (inactive effect exactly 0),
    ``n_token_within_tol`` (within :func:`rounding_tolerance`), ``n_seq_inner`` and
    ``n_seq_inner_nonzero`` (sequence-mode suites at layers followed by further layers, and those
    with an inactive effect above the tolerance), ``median_seq_inner`` (their median
    |inactive effect|), ``n_seq_last``, ``max_seq_last`` (largest |inactive effect| at a last
    layer), ``n_seq_last_within_tol`` (those within the tolerance), and per rule of :func:`check4_rules` and mode ``pass_<rule>_<mode>`` and ``n_<mode>``.
    """
    c4 = suite[suite.key == "position"].copy()
    c4["ai"], c4["tol"] = c4.d_inactive.abs(), c4.tolerance.fillna(0.0)
    tok, seq = c4[c4["mode"] == "token"], c4[c4["mode"] == "sequence"]
    is_last = seq.apply(lambda r: r.layer == last_layer[r.model], axis=1).astype(bool) if len(seq) else seq.ai > 0
    inner, last = seq[~is_last], seq[is_last]
    out = {"n_token": len(tok), "n_token_zero": int((tok.ai == 0).sum()),
           "n_token_within_tol": int((tok.ai <= tok.tol).sum()),
           "n_seq_inner": len(inner), "n_seq_inner_nonzero": int((inner.ai > inner.tol).sum()),
           "median_seq_inner": float(inner.ai.median()) if len(inner) else float("nan"),
           "n_seq_last": len(last), "max_seq_last": float(last.ai.max()) if len(last) else float("nan"),
           "n_seq_last_within_tol": int((last.ai <= last.tol).sum())}
    for m, g in (("token", tok), ("sequence", seq)):
        out[f"n_{m}"] = len(g)
        verdicts = [check4_rules(a, i, mode=m, tolerance=tl) for a, i, tl in zip(g.d_active, g.d_inactive, g.tol)]
        for rule in ("paper", "released", "book"):
            out[f"pass_{rule}_{m}"] = int(sum(v[rule] for v in verdicts))
    return out


def layers_text(layers) -> str:
    """``[1, 2, 3, 4]`` -> ``"1–4 (4)"`` for a run of three or more consecutive layers, else ``"0, 7"``."""
    ls = [int(x) for x in layers]
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}–{ls[-1]} ({len(ls)})"
    return ", ".join(map(str, ls))


def layout_summary(model, *, audited_layers, corpus=None) -> dict:
    """What the audit reads from one model's configuration, as a column of text for a table.

    ``model``: an :class:`~moeaudit.models.AuditModel`; ``audited_layers``: its audited layers;
    ``corpus``: the evaluation corpus (for the number of texts and real tokens), optional.
    Counts parameters with ``numel`` over ``model.hf.parameters()`` (in millions).
    """
    d = model.layout.as_dict()
    cfg = model.hf.config
    d["moe_layers"] = layers_text(d["moe_layers"])
    d["audited_layers"] = ", ".join(str(int(L)) for L in audited_layers)
    d["active_ratio"] = f"{d['top_k'] / d['num_experts']:.1%}"
    d["hidden_size"] = cfg.hidden_size
    d["context_length"] = getattr(cfg, "max_position_embeddings", None)
    d["parameters"] = f"{sum(p.numel() for p in model.hf.parameters()) / 1e6:.2f} M"
    d["dtype"] = str(model.dtype).replace("torch.", "")
    if corpus is not None:
        d["eval_texts / tokens"] = f"{len(corpus)} / {int(corpus.lengths.sum()):,}"
    return {k: "—" if v is None else str(v) for k, v in d.items()}
