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
from .corpus import CorpusSource, TokenizedCorpus, load_eval_corpus, resolve_corpus, sample_positions
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
            max_tokens: int | None = None, dtype: str = "float32", device: str | None = "cpu", device_map=None,
            data_dir=None, results_dir=None, batch_size: int = 8, progress: bool | None = None) -> AuditContext:
    """Load a model and the evaluation corpus, and run (or reuse) the clean pass over it.

    ``corpus`` is resolved first (see :func:`moeaudit.corpus.resolve_corpus`), so a bad value
    fails before any model is loaded; the corpus used is part of the provenance (and so of every
    record-cache key and ``params.json``). ``max_tokens=None`` truncates texts to
    ``min(512, max_position_embeddings)`` (the paper used up to 512 tokens; the shipped small
    models were trained on shorter contexts).
    """
    source = corpus if isinstance(corpus, CorpusSource) else resolve_corpus(corpus, data_dir=data_dir)
    model = load_model(model_name, dtype=dtype, device=device, device_map=device_map)
    if max_tokens is None:
        max_tokens = int(min(512, getattr(model.hf.config, "max_position_embeddings", 512) or 512))
    if model.tokenizer is None:
        raise ValueError(f"model {model_name!r} has no tokenizer; the evaluation corpus cannot be tokenized")
    tokenized = load_eval_corpus(model.tokenizer, corpus=source, n_texts=n_texts, max_tokens=max_tokens)
    provenance = {"model": model_name, "model_fingerprint": model_fingerprint(model), "dtype": dtype,
                  "corpus": tokenized.fingerprint(), **source.key(), "n_texts": n_texts, "max_tokens": max_tokens,
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
                r = perplexity(ctx.model, corpus, batch_size=len(corpus), progress=False)
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
