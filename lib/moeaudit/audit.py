"""The audit protocol on top of the engine: shared context, cached records, paired cells.

Design: at every sampled position t and audited layer L, each active routed expert is ablated
once on its own (``single_expert_records``). Every ranking (the four observational metrics and
the per-token routing-weight control) then picks its highest- and lowest-ranked active expert
at t from the *same* records, so all metrics of a cell share positions and ablations, and the
paired effect ``D = delta_high - delta_low`` is traceable to two raw records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import __version__
from .corpus import TEXT_FORMS, CorpusSource, TokenizedCorpus, load_eval_corpus, resolve_corpus, sample_positions
from .engine import CleanPass, clean_pass, run_ablations
from .metrics import METRICS, ROUTING_WEIGHT, check_rankings, observational_metrics
from .models import AuditModel, load_model
from .paths import results_dir as resolve_results_dir
from .pruning import perplexity, pruned_experts
from .store import cached_records, exclusive, params_key

ENGINE_VERSION = 2  # bump when the engine's numerics change, so cached records are recomputed


def model_fingerprint(model: AuditModel) -> str:
    """Hash of the config and of a cheap summary of every weight tensor."""
    h = hashlib.sha256(model.hf.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.detach().float().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


@dataclass
class AuditContext:
    """Everything a chapter needs for one model: model, corpus, clean pass, metrics, provenance."""

    model: AuditModel
    corpus: TokenizedCorpus
    clean: CleanPass
    metrics: pd.DataFrame
    provenance: dict
    results_dir: object = None
    corpus_source: CorpusSource | None = None

    @property
    def name(self) -> str:
        return self.model.name


def _save_clean(path, clean: CleanPass) -> None:
    clean.tokens.to_parquet(path / "tokens.parquet", index=False)
    arrays = {f"{L}:{k}": v for L, d in clean.routing.items() for k, v in d.items()}
    np.savez(path / "routing.npz", offsets=clean.offsets, **arrays)


def _load_clean(path, model_name: str) -> CleanPass:
    tokens = pd.read_parquet(path / "tokens.parquet")
    z = np.load(path / "routing.npz")
    routing: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        if key == "offsets":
            continue
        L, k = key.split(":")
        routing.setdefault(int(L), {})[k] = z[key]
    return CleanPass(model_name, tokens, dict(sorted(routing.items())), z["offsets"])


def _compute_and_save_clean(model: AuditModel, corpus: TokenizedCorpus, provenance: dict, path, *, batch_size: int,
                            progress) -> None:
    clean = clean_pass(model, corpus, batch_size=batch_size, progress=progress)
    # write into a private folder and rename it into place, so an interrupted run never leaves
    # (or reads) a half-written clean pass
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    corpus.to_frame().to_parquet(tmp / "corpus.parquet", index=False)
    _save_clean(tmp, clean)
    (tmp / "COMPLETE").write_text("1")
    try:
        os.replace(tmp, path)
    except OSError:  # a finished copy is already there: keep it
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(model_name: str, *, corpus: str | os.PathLike | CorpusSource = "auto", n_texts: int = 100,
            text_form: str = "released", max_tokens: int | None = None, dtype: str = "float32",
            device: str | None = "cpu", device_map=None,
            data_dir=None, results_dir=None, batch_size: int = 8, progress: bool | None = None) -> AuditContext:
    """Load a model and the evaluation corpus, and run (or reuse) the clean pass over it.

    ``corpus`` is resolved first (see :func:`moeaudit.corpus.resolve_corpus`), so a bad value
    fails before any model is loaded; ``text_form`` says how a selected line becomes a text
    (:func:`moeaudit.corpus.select_texts`). The corpus used and its form are part of the provenance (and so of every
    record-cache key and ``params.json``). ``max_tokens=None`` truncates texts to
    ``min(512, max_position_embeddings)`` (the paper used up to 512 tokens; the shipped small
    models were trained on shorter contexts).
    """
    source = corpus if isinstance(corpus, CorpusSource) else resolve_corpus(corpus, data_dir=data_dir)
    if text_form not in TEXT_FORMS:
        raise ValueError(f"text_form={text_form!r} is not one of {TEXT_FORMS}")
    model = load_model(model_name, dtype=dtype, device=device, device_map=device_map)
    if max_tokens is None:
        max_tokens = int(min(512, getattr(model.hf.config, "max_position_embeddings", 512) or 512))
    if model.tokenizer is None:
        raise ValueError(f"model {model_name!r} has no tokenizer; the evaluation corpus cannot be tokenized")
    tokenized = load_eval_corpus(model.tokenizer, corpus=source, n_texts=n_texts, max_tokens=max_tokens,
                                 text_form=text_form)
    provenance = {"model": model_name, "model_fingerprint": model_fingerprint(model), "dtype": dtype,
                  "corpus": tokenized.fingerprint(), **source.key(), "text_form": text_form, "n_texts": n_texts,
                  "max_tokens": max_tokens,
                  "engine_version": ENGINE_VERSION, "moeaudit": __version__}
    path = resolve_results_dir(results_dir) / "clean" / params_key(provenance)
    if not (path / "COMPLETE").exists():
        # one process computes a clean pass, others needing it wait for it (chapters run in parallel)
        with exclusive(path.with_name(f"{path.name}.lock")):  # a lock file beside the folder
            if not (path / "COMPLETE").exists():
                _compute_and_save_clean(model, tokenized, provenance, path, batch_size=batch_size, progress=progress)
    clean = _load_clean(path, model.name)
    metrics = observational_metrics(clean, num_experts=model.layout.num_experts)
    return AuditContext(model, tokenized, clean, metrics, provenance, results_dir, source)


def _seq_chunks(positions: pd.DataFrame, per_chunk: int) -> list[list[int]]:
    seqs = sorted(positions.seq_id.unique().tolist())
    return [seqs[i:i + per_chunk] for i in range(0, len(seqs), per_chunk)]


def _ablation_records(ctx: AuditContext, kind: str, requests: pd.DataFrame, params: dict, *, mode: str,
                      batch_size: int, seq_per_chunk: int, progress, downstream: bool = False) -> pd.DataFrame:
    full = {**ctx.provenance, **params, "mode": mode, "kind": kind, "downstream": downstream}
    chunks = _seq_chunks(requests, seq_per_chunk)

    def compute(seqs):
        sub = requests[requests.seq_id.isin(seqs)]
        return run_ablations(ctx.model, ctx.corpus, ctx.clean, sub, mode=mode, batch_size=batch_size,
                             seed=params.get("seed"), downstream=downstream, progress=False)

    records, _ = cached_records(kind, full, chunks, compute, results_dir=ctx.results_dir, progress=progress)
    return records


def audit_positions(ctx: AuditContext, *, n_positions: int, seed: int, min_context: int = 0) -> pd.DataFrame:
    """The positions of an audit: one seeded draw shared by every layer and metric."""
    return sample_positions(ctx.corpus, n=n_positions, seed=seed, min_context=min_context)


def single_expert_records(ctx: AuditContext, *, layers, n_positions: int, seed: int, mode: str = "token",
                          min_context: int = 0, batch_size: int = 64, seq_per_chunk: int = 8,
                          downstream: bool = False, progress: bool | None = None) -> pd.DataFrame:
    """Ablate every active routed expert, one at a time, at each sampled position and layer.

    ``downstream=True`` also records how much later MoE layers restore the removed contribution
    (see :func:`moeaudit.engine.run_ablations`)."""
    for L in layers:
        ctx.model.layout.check_layer(L)
    pos = audit_positions(ctx, n_positions=n_positions, seed=seed, min_context=min_context)
    reqs = []
    for L in layers:
        active = ctx.clean.routing[L]["indices"][ctx.clean.row(pos.seq_id.to_numpy(), pos.t.to_numpy())]
        k = active.shape[1]
        reqs.append(pd.DataFrame({"seq_id": np.repeat(pos.seq_id.to_numpy(), k), "t": np.repeat(pos.t.to_numpy(), k),
                                  "layer": L, "removed": [[int(e)] for e in active.reshape(-1)]}))
    req = pd.concat(reqs, ignore_index=True)
    req["expert"] = [r[0] for r in req.removed]
    params = {"layers": sorted(layers), "n_positions": n_positions, "seed": seed, "min_context": min_context}
    rec = _ablation_records(ctx, "single_expert", req, params, mode=mode, batch_size=batch_size,
                            seq_per_chunk=seq_per_chunk, progress=progress, downstream=downstream)
    rec["prob"] = [p[0] for p in rec.removed_probs]
    rec["weight"] = [w[0] for w in rec.removed_weights]
    return rec


def progressive_records(ctx: AuditContext, *, layers, n_positions: int, seed: int, mode: str = "token",
                        min_context: int = 0, max_k: int | None = None, batch_size: int = 64,
                        seq_per_chunk: int = 8, progress: bool | None = None) -> pd.DataFrame:
    """Remove the k highest-weight active experts, k = 1 .. top_k - 1 (the paper's Tables 8-9)."""
    top_k = ctx.model.layout.top_k
    max_k = top_k - 1 if max_k is None else max_k
    if not 1 <= max_k <= top_k - 1:
        raise ValueError(f"max_k={max_k} must be in [1, {top_k - 1}] (top-k is {top_k})")
    pos = audit_positions(ctx, n_positions=n_positions, seed=seed, min_context=min_context)
    reqs = []
    for L in layers:
        ctx.model.layout.check_layer(L)
        rows = ctx.clean.row(pos.seq_id.to_numpy(), pos.t.to_numpy())
        idx, w = ctx.clean.routing[L]["indices"][rows], ctx.clean.routing[L]["weight"][rows]
        order = np.argsort(-w, axis=1, kind="stable")
        ranked = np.take_along_axis(idx, order, axis=1)
        for k in range(1, max_k + 1):
            reqs.append(pd.DataFrame({"seq_id": pos.seq_id.to_numpy(), "t": pos.t.to_numpy(), "layer": L, "k": k,
                                      "removed": [list(map(int, r[:k])) for r in ranked]}))
    req = pd.concat(reqs, ignore_index=True)
    params = {"layers": sorted(layers), "n_positions": n_positions, "seed": seed, "min_context": min_context,
              "max_k": max_k}
    return _ablation_records(ctx, "progressive", req, params, mode=mode, batch_size=batch_size,
                             seq_per_chunk=seq_per_chunk, progress=progress)


def pruned_perplexities(ctx: AuditContext, plans: list[dict], corpus: TokenizedCorpus, *, plans_per_chunk: int = 8,
                        progress: bool | None = None) -> pd.DataFrame:
    """Perplexity of ``corpus`` under each pruning plan (``{layer: [experts removed]}``; ``{}`` is
    the unpruned model), cached and resumable like the ablation records (keyed by the model, the
    corpus and the list of plans). One row per plan, in order: ``plan`` (its index), ``mean_loss``,
    ``perplexity``, ``n_tokens``; identical plans are evaluated once."""
    blobs = [json.dumps({int(L): sorted(int(e) for e in v) for L, v in p.items()}, sort_keys=True) for p in plans]
    distinct = list(dict.fromkeys(blobs))
    chunks = [distinct[i:i + plans_per_chunk] for i in range(0, len(distinct), plans_per_chunk)]

    def compute(chunk):
        rows = []
        for blob in chunk:
            plan = {int(L): v for L, v in json.loads(blob).items()}
            with pruned_experts(ctx.model, plan):
                # eight texts per forward: a quarter faster than one batch of all of them on one CPU thread
                r = perplexity(ctx.model, corpus, batch_size=8, progress=False)
            rows.append({"plan_json": blob, "mean_loss": r["mean_loss"], "n_tokens": r["n_tokens"]})
        return pd.DataFrame(rows)

    params = {**ctx.provenance, "kind": "pruned_perplexity", "eval_corpus": corpus.fingerprint(), "plans": distinct}
    done, _ = cached_records("pruned_perplexity", params, chunks, compute, results_dir=ctx.results_dir,
                             progress=progress)
    by_plan = done.set_index("plan_json")
    out = pd.DataFrame({"plan": range(len(plans)), "plan_json": blobs})
    out["mean_loss"] = by_plan.mean_loss.reindex(out.plan_json).to_numpy()
    out["n_tokens"] = by_plan.n_tokens.reindex(out.plan_json).to_numpy()
    out["perplexity"] = np.exp(out.mean_loss)
    return out


def paired_cells(records: pd.DataFrame, metrics: pd.DataFrame, *, rankings=None) -> pd.DataFrame:
    """For every (layer, ranking, position): the highest- and lowest-ranked active expert and their
    loss changes. ``records`` are single-expert records; ``metrics`` the observational table.

    Ties are broken by expert id (lowest id wins 'high', highest id wins 'low'), deterministically.
    Experts whose ranking value is NaN are left out of the ranking at that position.
    """
    rankings = check_rankings(rankings or [*METRICS, ROUTING_WEIGHT])
    base = records[["model", "family", "mode", "layer", "seq_id", "t", "expert", "prob", "weight",
                    "delta_loss", "gap_norm", "clean_loss"]]
    base = base.merge(metrics[["layer", "expert", *METRICS]], on=["layer", "expert"], how="left")
    out = []
    for ranking in rankings:
        value_col = "prob" if ranking == ROUTING_WEIGHT else ranking
        df = base.assign(value=base[value_col]).dropna(subset=["value"])
        df = df.sort_values(["layer", "seq_id", "t", "value", "expert"], ascending=[True, True, True, False, True])
        g = df.groupby(["layer", "seq_id", "t"], sort=False)
        high = g.head(1).set_index(["layer", "seq_id", "t"])
        low = df.sort_values(["layer", "seq_id", "t", "value", "expert"],
                             ascending=[True, True, True, True, False]).groupby(["layer", "seq_id", "t"], sort=False).head(1)
        low = low.set_index(["layer", "seq_id", "t"])
        cols = ["expert", "value", "delta_loss", "gap_norm", "prob"]
        pair = high[["model", "family", "mode", "clean_loss", *cols]].join(low[cols], lsuffix="_high", rsuffix="_low")
        pair = pair[pair.expert_high != pair.expert_low].reset_index()
        pair.insert(3, "ranking", ranking)
        out.append(pair)
    cells = pd.concat(out, ignore_index=True)
    cells["diff"] = cells.delta_loss_high - cells.delta_loss_low
    return cells.sort_values(["ranking", "layer", "seq_id", "t"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- progressive ablation summaries
# (chapter 6; the paper's Section 3 "Progressive ablation", Appendix C, Tables 8-9)

def progressive_summary(records: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, layer, k) summary of progressive-ablation records (:func:`progressive_records`).

    ``records`` needs ``model``, ``layer``, ``k``, ``delta_loss`` (cumulative loss change in nats)
    and ``clean_loss`` (nats). Returns one row per group, in order of first appearance, with
    ``n`` (positions), ``mean``, ``ci_low``/``ci_high`` (Student-t interval of the mean at
    confidence ``1 - alpha``: ``mean ± t_{1-alpha/2, n-1} · sd / sqrt(n)``, ``sd`` with ddof=1;
    NaN for ``n < 2``), ``median``, ``p05`` and ``p95`` (``numpy.quantile``, linear interpolation),
    ``clean_loss`` (mean clean loss of the same positions). ``ValueError`` unless 0 < alpha < 1.
    """
    from scipy import stats as sps  # noqa: PLC0415

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rows = []
    for (model, layer, k), g in records.groupby(["model", "layer", "k"], sort=False):
        x = g.delta_loss.to_numpy(dtype=np.float64)
        n, mean = x.size, float(x.mean())
        half = float(sps.t.ppf(1 - alpha / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append({"model": model, "layer": layer, "k": int(k), "n": int(n), "mean": mean,
                     "ci_low": mean - half, "ci_high": mean + half, "median": float(np.median(x)),
                     "p05": float(np.quantile(x, 0.05)), "p95": float(np.quantile(x, 0.95)),
                     "clean_loss": float(g.clean_loss.mean())})
    return pd.DataFrame(rows)


def tail_share(x, *, q: float = 0.95) -> float:
    """Share of the summed positive loss increase contributed by the values above the ``q`` quantile.

    ``sum(max(x_i, 0) for x_i > quantile(x, q)) / sum(max(x_i, 0))`` (``numpy.quantile``, linear
    interpolation). About ``1 - q`` when the increase is spread evenly, near 1 when a few positions
    carry it. NaN when no value is positive; ``ValueError`` for an empty ``x`` or q outside [0, 1].
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("x is empty")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = np.clip(x, 0, None)
    total = pos.sum()
    return float(pos[x > np.quantile(x, q)].sum() / total) if total > 0 else float("nan")


def deepest_removal_summary(records: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """The distribution of the cumulative loss change at each model's deepest removal (the paper's
    Table 9 and its tails), one row per (model, layer).

    The deepest removal is the largest ``k`` of the model in ``records`` (``top_k - 1`` by
    default: all active routed experts but one removed). Columns: ``model``, ``layer``, ``k``,
    ``n``, ``mean``, ``median``, ``p05``, ``p95`` (nats), ``share_above`` (fraction of positions
    with ΔL > ``threshold``), ``share_below_zero`` (fraction where the loss fell), ``top5_share``
    (:func:`tail_share` at q = 0.95).
    """
    rows = []
    for model, m in records.groupby("model", sort=False):
        kmax = int(m.k.max())
        for layer, g in m[m.k == kmax].groupby("layer", sort=False):
            x = g.delta_loss.to_numpy(dtype=np.float64)
            rows.append({"model": model, "layer": layer, "k": kmax, "n": int(x.size), "mean": float(x.mean()),
                         "median": float(np.median(x)), "p05": float(np.quantile(x, 0.05)),
                         "p95": float(np.quantile(x, 0.95)), "share_above": float(np.mean(x > threshold)),
                         "share_below_zero": float(np.mean(x < 0)), "top5_share": tail_share(x, q=0.95)})
    return pd.DataFrame(rows)


def redundancy_breaks(summary: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """Where each layer's progressive-ablation trajectory breaks, one row per (model, layer).

    ``summary`` needs ``model``, ``layer``, ``k``, ``mean`` (mean cumulative ΔL in nats) and
    optionally ``clean_loss``; a :func:`progressive_summary` result, or the paper's Table 8 in the
    same columns. Columns: ``first_k_above`` (smallest k with mean > ``threshold``; ``<NA>`` if
    none), ``largest_step`` and ``largest_step_k`` (the largest ``mean(k) - mean(k-1)`` with
    ``mean(0) = 0``, and its k), ``mean_deepest`` (mean at the largest k), ``clean_loss`` and
    ``ratio_to_clean`` (``mean_deepest / clean_loss``; NaN without ``clean_loss``).
    """
    rows = []
    for (model, layer), g in summary.groupby(["model", "layer"], sort=False):
        g = g.sort_values("k")
        means, ks = g["mean"].to_numpy(dtype=np.float64), g.k.to_numpy()
        steps = np.diff(np.concatenate([[0.0], means]))
        above = ks[means > threshold]
        clean = float(g.clean_loss.iloc[-1]) if "clean_loss" in g else float("nan")
        rows.append({"model": model, "layer": layer, "first_k_above": int(above[0]) if above.size else pd.NA,
                     "largest_step": float(steps.max()), "largest_step_k": int(ks[int(steps.argmax())]),
                     "mean_deepest": float(means[-1]), "clean_loss": clean, "ratio_to_clean": float(means[-1] / clean)})
    out = pd.DataFrame(rows)
    out["first_k_above"] = out["first_k_above"].astype("Int64")
    return out


def paper_progressive_table() -> pd.DataFrame:
    """The paper's Tables 8-9 (OLMoE-1B-7B-0924, as printed) in the columns of
    :func:`progressive_summary`: ``model`` (``"paper: OLMoE-1B-7B"``), ``layer``, ``k``, ``mean``,
    and ``median``/``p95`` at k = 7 (NaN elsewhere); ``n`` is the paper's 500 positions per cell.
    Read from :func:`moeaudit.released.paper_printed_values`."""
    from .released import paper_printed_values  # noqa: PLC0415

    pv = paper_printed_values()
    pv = pv[pv.table.isin([8, 9])]
    out = pv.pivot_table(index=["layer", "k"], columns="quantity", values="value").reset_index()
    out = out.rename(columns={"mean_delta": "mean", "median_delta": "median", "p95_delta": "p95"})
    out.insert(0, "model", "paper: OLMoE-1B-7B")
    out["k"] = out["k"].astype(int)
    out["n"] = 500
    return out.sort_values(["layer", "k"], ignore_index=True)


# ----------------------------------------------------------------------------- block geometry (chapter 7)
# (the paper's Section 3 "Mechanism", Appendix A.3, Table 7 and Figure 2; the released
# redistribution scripts define gap, compensation cosine and relative compensation)

def relative_compensation(g: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The released redistribution quantities of removed contributions ``g`` within outputs ``y``.

    ``g`` (..., H) is the removed weighted expert output ``w_e E_e(x_t)`` (the gap), ``y`` (..., H)
    the MoE block output it is part of (broadcast against ``g``), so the remaining output is
    ``r = y - g``. Returns float32 tensors of shape ``g.shape[:-1]``:

    - ``gap_norm`` = ||g||,
    - ``r_norm`` = ||r||,
    - ``cos`` = <g, r> / (||g|| ||r||) (the released ``compensation_cosine``; NaN where a norm is 0),
    - ``rel_comp`` = max(<g, r>, 0) / ||g||^2 = max(cos, 0) · ||r|| / ||g|| (the released
      ``relative_compensation``; inf or NaN where ||g|| = 0).

    Nothing is re-computed after the removal: ``r`` is what the other experts (and any shared
    experts) produced in the clean pass, so these describe geometry, not a response.
    """
    g, y = g.float(), y.float()
    r = y - g
    dot = (g * r).sum(-1)
    gap = torch.linalg.vector_norm(g, dim=-1)
    rn = torch.linalg.vector_norm(r, dim=-1)
    return {"gap_norm": gap, "r_norm": rn, "cos": dot / (gap * rn),
            "rel_comp": torch.clamp(dot, min=0) / gap.pow(2)}


@torch.no_grad()
def block_geometry(ctx: AuditContext, layers, *, batch_size: int = 64) -> pd.DataFrame:
    """:func:`relative_compensation` for every real token and active routed expert at each of ``layers``.

    One un-ablated nnsight trace per batch saves each MoE block's input ``x_t`` and output ``y_t``;
    expert outputs ``E_e(x_t)`` are recomputed from the fused weights
    (:func:`moeaudit.engine.expert_outputs`) at the clean pass's routing, and ``g = w_e E_e(x_t)``
    with the combine weight ``w_e``. One row per (layer, token row, slot): ``layer``, ``row`` (the
    clean pass's token row), ``slot``, ``expert``, ``prob`` (router probability), ``weight``,
    ``gap_norm``, ``r_norm``, ``cos``, ``rel_comp``, and ``norm_check`` = |recomputed ||E_e|| -
    stored ||E_e||| / stored ||E_e|| (small when every row is aligned with the clean pass).
    ``ValueError`` for a layer that is not a MoE layer.
    """
    from .engine import expert_outputs  # noqa: PLC0415

    for L in layers:
        ctx.model.layout.check_layer(L)
    model, corpus, clean = ctx.model, ctx.corpus, ctx.clean
    parts: dict[int, list[pd.DataFrame]] = {L: [] for L in layers}
    lengths = corpus.lengths
    for start in range(0, len(corpus), batch_size):
        seq_ids = list(range(start, min(start + batch_size, len(corpus))))
        ids, mask = corpus.padded(seq_ids, pad_id=model.pad_id)
        saved = {}
        with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)):
            for L in layers:
                mlp = model.layers()[L].mlp
                saved[L] = (mlp.input.save(), mlp.output.save())
        real = mask.reshape(-1).bool().to(model.device)
        rows = clean.row(np.repeat(seq_ids, lengths[seq_ids]), np.concatenate([np.arange(lengths[s]) for s in seq_ids]))
        for L in layers:
            x, y = (v.reshape(-1, v.shape[-1])[real] for v in saved[L])
            route = clean.routing[L]
            idx = torch.from_numpy(route["indices"][rows]).to(x.device)
            w = torch.from_numpy(route["weight"][rows]).to(x.device, torch.float32)
            E = expert_outputs(model.hf.model.layers[L].mlp.experts, x, idx).float()
            q = {k: v.cpu().numpy().reshape(-1) for k, v in relative_compensation(w[..., None] * E, y[:, None, :]).items()}
            enorm = torch.linalg.vector_norm(E, dim=-1).cpu().numpy().reshape(-1)
            stored = route["norm"][rows].reshape(-1)
            k = idx.shape[1]
            parts[L].append(pd.DataFrame({
                "layer": L, "row": np.repeat(rows, k), "slot": np.tile(np.arange(k), len(rows)),
                "expert": route["indices"][rows].reshape(-1), "prob": route["prob"][rows].reshape(-1),
                "weight": route["weight"][rows].reshape(-1), **q,
                "norm_check": np.abs(enorm - stored) / np.maximum(stored, 1e-30)}))
    return pd.concat([pd.concat(p, ignore_index=True) for p in parts.values()], ignore_index=True)


#: per-expert means of :func:`block_geometry` rows (or ablation records) used by :func:`expert_means`
_EXPERT_MEANS = {"mean_rw": "prob", "mean_gap": "gap_norm", "mean_rel_comp": "rel_comp", "mean_cos": "cos",
                 "mean_r_over_g": "r_over_g", "mean_down": "downstream_compensation"}


def expert_means(rows: pd.DataFrame, *, min_activations: int, by=("model", "layer")) -> pd.DataFrame:
    """Per-expert means over the tokens that route to each expert (the paper's Table 7 convention).

    ``rows``: one row per active (token, expert), e.g. :func:`block_geometry` rows or ablation
    records, with ``expert`` and any of ``prob``, ``gap_norm``, ``rel_comp``, ``cos``,
    ``r_norm`` and ``downstream_compensation``. Returns one row per (``by``..., expert) with ``n``
    (activations) and, for each column present, ``mean_rw``, ``mean_gap``, ``mean_rel_comp``,
    ``mean_cos``, ``mean_r_over_g`` (mean of ||r|| / ||g||), ``mean_down``; experts with fewer
    than ``min_activations`` activations are dropped. ``ValueError`` if ``min_activations < 1``.
    """
    if min_activations < 1:
        raise ValueError(f"min_activations must be >= 1, got {min_activations}")
    rows = rows.copy()
    if "r_norm" in rows and "gap_norm" in rows:
        rows["r_over_g"] = rows.r_norm / rows.gap_norm
    keys = [*by, "expert"]
    agg = {"n": ("expert", "size"), **{k: ("_x_" + c, "mean") for k, c in _EXPERT_MEANS.items() if c in rows}}
    rows = rows.rename(columns={c: "_x_" + c for c in _EXPERT_MEANS.values() if c in rows})
    out = rows.groupby(keys, sort=False).agg(**agg).reset_index()
    return out[out.n >= min_activations].reset_index(drop=True)


def layer_gap_ratios(per_layer: pd.DataFrame, *, label: str = "model", gap: str = "mean_gap") -> pd.DataFrame:
    """First-to-last and largest-to-smallest ratios of a per-layer mean gap norm, one row per ``label``.

    ``per_layer`` has ``label``, ``layer`` and ``gap`` (one row per layer). Columns: ``label``,
    ``first_layer``, ``last_layer``, ``gap_first``, ``gap_last``, ``ratio_last_first``
    (``gap_last / gap_first``: the paper's "41×" for OLMoE, "38×" for Qwen), ``ratio_max_min``.
    """
    out = []
    for m, s in per_layer.sort_values("layer").groupby(label, sort=False):
        first, last = s.iloc[0], s.iloc[-1]
        out.append({label: m, "first_layer": int(first.layer), "last_layer": int(last.layer),
                    "gap_first": float(first[gap]), "gap_last": float(last[gap]),
                    "ratio_last_first": float(last[gap] / first[gap]),
                    "ratio_max_min": float(s[gap].max() / s[gap].min())})
    return pd.DataFrame(out)


#: the correlation pairs of the redistribution analysis: key -> (x column, y column) of :func:`expert_means`
CHAIN_PAIRS: dict[str, tuple[str, str]] = {
    "rw_gap": ("mean_rw", "mean_gap"),            # chain 1: routing weight -> gap norm
    "gap_comp": ("mean_gap", "mean_rel_comp"),    # chain 2, the released measure
    "gap_cos": ("mean_gap", "mean_cos"),          # its factor max(cos, 0) (released: compensation_cosine)
    "gap_rg": ("mean_gap", "mean_r_over_g"),      # its factor ||r|| / ||g||
    "gap_down": ("mean_gap", "mean_down"),        # chain 2, re-measured downstream
}


def chain_correlations(per_expert: pd.DataFrame, *, pairs=None, by=("model", "layer")) -> pd.DataFrame:
    """Spearman correlations across experts, per group ``by`` (the paper's Table 7 and Figure 2).

    ``per_expert``: one row per expert (an :func:`expert_means` result, or the released per-expert
    records renamed to its columns). ``pairs`` maps a key to an (x, y) column pair (default: every
    pair of :data:`CHAIN_PAIRS` whose columns are present). Returns one row per group with
    ``n_experts``, the group mean of ``mean_gap`` (and of ``mean_rel_comp`` and ``mean_down`` when
    present), and ``rho_<key>``, ``p_<key>`` (two-sided, uncorrected) from
    :func:`moeaudit.stats.spearman_defined`: NaN when fewer than 3 experts or a constant column.
    An empty ``per_expert`` (no expert passed ``min_activations``) gives an empty frame with these columns.
    """
    from .stats import spearman_defined  # noqa: PLC0415

    if pairs is None:
        pairs = {k: v for k, v in CHAIN_PAIRS.items() if set(v) <= set(per_expert.columns)}
    rows = []
    for key, s in per_expert.groupby(list(by), sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), n_experts=len(s))
        for col in ("mean_gap", "mean_rel_comp", "mean_down"):
            if col in s:
                row[col] = float(s[col].mean())
        for name, (x, y) in pairs.items():
            row[f"rho_{name}"], row[f"p_{name}"], _ = spearman_defined(s[x], s[y])
        rows.append(row)
    columns = [*by, "n_experts", *(c for c in ("mean_gap", "mean_rel_comp", "mean_down") if c in per_expert),
               *(f"{q}_{name}" for name in pairs for q in ("rho", "p"))]
    out = pd.DataFrame(rows, columns=columns)  # the columns also when no expert is left
    numeric = columns[len(by) + 1:]
    out[numeric] = out[numeric].astype(np.float64)
    return out.astype({"n_experts": np.int64})


def released_expert_means(experts: pd.DataFrame) -> pd.DataFrame:
    """The released per-expert redistribution records (:func:`moeaudit.released.redistribution_experts`)
    in the columns of :func:`expert_means`: ``mean_rw`` (``mean_routing_weight``), ``mean_gap``
    (``mean_gap_norm``), ``mean_rel_comp`` (``relative_compensation``), ``mean_cos``
    (``compensation_cosine``), ``n`` (``n_active_tokens``); ``model`` and ``layer`` kept."""
    return experts.rename(columns={"mean_routing_weight": "mean_rw", "mean_gap_norm": "mean_gap",
                                   "relative_compensation": "mean_rel_comp", "compensation_cosine": "mean_cos",
                                   "n_active_tokens": "n"})[["model", "layer", "expert", "n", "mean_rw", "mean_gap",
                                                             "mean_rel_comp", "mean_cos"]]


def measure_agreement(records: pd.DataFrame, *, by=("model", "layer")) -> pd.DataFrame:
    """Per group, the released relative compensation against the re-measured downstream compensation
    over the same single-expert ablations.

    ``records``: one row per ablation with ``rel_comp`` (:func:`relative_compensation` at the
    ablated (t, e)) and ``downstream_compensation`` (:func:`moeaudit.engine.run_ablations` with
    ``downstream=True``). Columns: ``ablations`` (finite pairs), ``mean_rel_comp``, ``mean_down``,
    ``share_down_positive`` (fraction with downstream compensation > 0), ``rho``/``p`` (Spearman
    across ablations, :func:`moeaudit.stats.spearman_defined`; NaN where the downstream measure is
    constant, as at the last MoE layer where it is 0 by construction).
    """
    from .stats import spearman_defined  # noqa: PLC0415

    rows = []
    for key, s in records.groupby(list(by), sort=False):
        rho, p, n = spearman_defined(s.rel_comp, s.downstream_compensation)
        rows.append({**dict(zip(by, key)), "ablations": n, "mean_rel_comp": float(s.rel_comp.mean()),
                     "mean_down": float(s.downstream_compensation.mean()),
                     "share_down_positive": float((s.downstream_compensation > 0).mean()), "rho": rho, "p": p})
    return pd.DataFrame(rows)


def log_log_slope(x, y) -> float:
    """Least-squares slope of ``log y`` on ``log x`` over the pairs where both are finite and
    positive (the elasticity of y with respect to x: y ∝ x^slope). NaN for fewer than 3 such
    pairs or a constant x. ``ValueError`` if the lengths differ."""
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    lx, ly = np.log(xa[ok]), np.log(ya[ok])
    if lx.size < 3 or np.ptp(lx) == 0:
        return float("nan")
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def compensation_factors(per_expert: pd.DataFrame, *, by=("model", "layer")) -> pd.DataFrame:
    """How the two factors of the released relative compensation move with the gap norm across experts.

    Per activation, ``rel_comp = max(cos, 0) · ||r|| / ||g||`` (:func:`relative_compensation`), so
    across experts the mean relative compensation rises with the mean gap norm only if the
    alignment ``cos`` rises fast enough to outweigh the falling ``||r|| / ||g||``. ``per_expert``:
    an :func:`expert_means` result (or :func:`released_expert_means`). One row per group with
    ``n_experts``, ``median_cos`` (median over experts of the mean cosine), and the
    :func:`log_log_slope` against ``mean_gap`` of ``mean_cos`` (``slope_cos``), of
    ``mean_r_over_g`` (``slope_r_over_g``; NaN when the column is absent, as in the released
    records, which store no ||r||) and of ``mean_rel_comp`` (``slope_rel_comp``).
    """
    rows = []
    for key, s in per_expert.groupby(list(by), sort=False):
        rows.append({**dict(zip(by, key)), "n_experts": len(s), "median_cos": float(s.mean_cos.median()),
                     "slope_cos": log_log_slope(s.mean_gap, s.mean_cos),
                     "slope_r_over_g": (log_log_slope(s.mean_gap, s.mean_r_over_g) if "mean_r_over_g" in s
                                        else float("nan")),
                     "slope_rel_comp": log_log_slope(s.mean_gap, s.mean_rel_comp)})
    return pd.DataFrame(rows)
