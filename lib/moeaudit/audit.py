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
from .corpus import (TEXT_FORMS, CorpusSource, TokenizedCorpus, integer_ids, is_integer, load_eval_corpus,
                     resolve_corpus, sample_positions)
from .engine import CleanPass, clean_pass, resolve_strategy, run_ablations
from .metrics import METRICS, ROUTING_WEIGHT, check_rankings, observational_metrics
from .models import AuditModel, load_model
from .paths import results_dir as resolve_results_dir
from .pruning import perplexity, pruned_experts
from .report import fmt_signed, join_words, plural  # noqa: F401  (re-exported for the chapters)
from .store import cached_records, exclusive, params_key

ENGINE_VERSION = 4  # bump when the engine's numerics change, so cached records are recomputed


def model_fingerprint(model: AuditModel) -> str:
    """SHA-256 (first 16 hex digits) of the config and of the bytes of every weight tensor, with its
    name, shape and dtype: any change of any weight (swapping two experts included) changes it, so
    cached clean passes and records are never reused for other weights. The checkpoint's location
    (``_name_or_path``) is left out, so a moved checkpoint keeps its cached results. Hashing runs
    at about 0.6 GB/s on one CPU core.

    Offloaded weights (accelerate's ``device_map`` with ``"cpu"``/``"disk"`` entries, or
    ``cpu_offload``: parameters left on the ``meta`` device) are read through accelerate's own
    hook (``accelerate.utils.align_module_device``), module by module, so the fingerprint of an
    offloaded model equals that of the same weights loaded plainly."""
    from accelerate.utils import align_module_device  # noqa: PLC0415

    config = json.loads(model.hf.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    seen: set[int] = set()  # tied weights (one tensor, two names) are hashed once, as named_parameters lists them
    with torch.no_grad():
        for prefix, module in model.hf.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for _, p in own)
            with align_module_device(module):
                for name, _ in own:
                    p = getattr(module, name).detach()
                    full = f"{prefix}.{name}" if prefix else name
                    h.update(f"{full}:{tuple(p.shape)}:{p.dtype}".encode())
                    h.update(p.contiguous().view(torch.uint8).cpu().numpy().data)
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


def _positive_int(value, name: str) -> int:
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _audit_layers(ctx: AuditContext, layers) -> list[int]:
    """``layers`` checked: a non-empty collection of distinct MoE layer indices (ints, not bools)."""
    layers = integer_ids(layers, "layers")
    if not layers:
        raise ValueError("layers is empty: give at least one MoE layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers={layers} repeats a layer; each layer once")
    for L in layers:
        ctx.model.layout.check_layer(L)
    return sorted(layers)


def _seq_chunks(positions: pd.DataFrame, per_chunk: int) -> list[list[int]]:
    per_chunk = _positive_int(per_chunk, "seq_per_chunk")
    seqs = sorted(positions.seq_id.unique().tolist())
    return [seqs[i:i + per_chunk] for i in range(0, len(seqs), per_chunk)]


def _ablation_records(ctx: AuditContext, kind: str, requests: pd.DataFrame, params: dict, *, mode: str,
                      batch_size: int, seq_per_chunk: int, progress, downstream: bool = False,
                      strategy: str = "auto") -> pd.DataFrame:
    strategy = resolve_strategy(ctx.model, mode=mode, strategy=strategy)  # the key names what is run
    full = {**ctx.provenance, **params, "mode": mode, "kind": kind, "downstream": downstream, "strategy": strategy}
    chunks = _seq_chunks(requests, seq_per_chunk)

    def compute(seqs):
        sub = requests[requests.seq_id.isin(seqs)]
        return run_ablations(ctx.model, ctx.corpus, ctx.clean, sub, mode=mode, strategy=strategy,
                             batch_size=batch_size, seed=params.get("seed"), downstream=downstream, progress=False)

    records, _ = cached_records(kind, full, chunks, compute, results_dir=ctx.results_dir, progress=progress)
    return records


def audit_positions(ctx: AuditContext, *, n_positions: int, seed: int, min_context: int = 0) -> pd.DataFrame:
    """The positions of an audit: one seeded draw shared by every layer and metric."""
    return sample_positions(ctx.corpus, n=n_positions, seed=seed, min_context=min_context)


def single_expert_records(ctx: AuditContext, *, layers, n_positions: int, seed: int, mode: str = "token",
                          min_context: int = 0, batch_size: int = 64, seq_per_chunk: int = 8,
                          downstream: bool = False, strategy: str = "auto",
                          progress: bool | None = None) -> pd.DataFrame:
    """Ablate every active routed expert, one at a time, at each sampled position and layer.

    ``downstream=True`` also records how much later MoE layers restore the removed contribution;
    ``strategy`` says how token mode is executed (``"kv"``: packed steps on the clean cache;
    ``"full"``: the prefix re-run; ``"auto"``, the default: ``"kv"`` where the model's attention
    allows it); see :func:`moeaudit.engine.run_ablations`. Both are part of the cache key (the
    strategy as resolved). ``ValueError`` for an empty or repeated ``layers``, a layer that is not an MoE
    layer, or ``seq_per_chunk < 1``; ``TypeError`` for non-integer layers. Rows come in layer order
    whatever the order of ``layers``."""
    layers = _audit_layers(ctx, layers)
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
                            seq_per_chunk=seq_per_chunk, progress=progress, downstream=downstream,
                            strategy=strategy)
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
    layers = _audit_layers(ctx, layers)
    pos = audit_positions(ctx, n_positions=n_positions, seed=seed, min_context=min_context)
    reqs = []
    for L in layers:
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
    plans_per_chunk = _positive_int(plans_per_chunk, "plans_per_chunk")
    if len(plans) == 0:
        raise ValueError("plans is empty: give at least one pruning plan ({} is the unpruned model)")
    layout = ctx.model.layout
    for i, p in enumerate(plans):  # every plan checked before the first is evaluated
        for L, v in p.items():
            layout.check_layer(integer_ids([L], f"plans[{i}] layer")[0])
            experts = integer_ids(v, f"plans[{i}][{L}]")
            bad = [e for e in experts if not 0 <= e < layout.num_experts]
            if bad or layout.num_experts - len(set(experts)) < layout.top_k:
                raise ValueError(f"plans[{i}] prunes {experts} at layer {L}: experts must be ids in "
                                 f"[0, {layout.num_experts - 1}] leaving at least top-k = {layout.top_k}")
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
    expert outputs ``E_e(x_t)`` are recomputed
    (:func:`moeaudit.engine.expert_outputs`, through the model's own experts module) at the clean pass's routing, and ``g = w_e E_e(x_t)``
    with the combine weight ``w_e``. One row per (layer, token row, slot): ``layer``, ``row`` (the
    clean pass's token row), ``slot``, ``expert``, ``prob`` (router probability), ``weight``,
    ``gap_norm``, ``r_norm``, ``cos``, ``rel_comp``, and ``norm_check`` = |recomputed ||E_e|| -
    stored ||E_e||| / stored ||E_e|| (small when every row is aligned with the clean pass).
    ``ValueError`` for a layer that is not a MoE layer.
    """
    from .engine import block_input_in_trace, block_output_in_trace, expert_outputs  # noqa: PLC0415

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
                saved[L] = (block_input_in_trace(model, L).save(), block_output_in_trace(model, L).save())
        real = mask.reshape(-1).bool().to(model.device)
        rows = clean.row(np.repeat(seq_ids, lengths[seq_ids]), np.concatenate([np.arange(lengths[s]) for s in seq_ids]))
        for L in layers:
            x, y = (v.reshape(-1, v.shape[-1])[real] for v in saved[L])
            route = clean.routing[L]
            idx = torch.from_numpy(route["indices"][rows]).to(x.device)
            w = torch.from_numpy(route["weight"][rows]).to(x.device, torch.float32)
            E = expert_outputs(model.hf_experts(L), x, idx, call=model.layout.spec.experts_call).float()
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


# ----------------------------------------------------------------------------- chapters 5-6: computed wording
# (sentences whose every number and verdict is picked from the tables beside them)

def control_against_observational(control: pd.DataFrame, observational: pd.DataFrame) -> pd.DataFrame:
    """Each routing-weight control cell against the observational cells (chapter 5, the paper's Figure 1).

    ``control`` and ``observational``: :func:`moeaudit.stats.audit_table` results with ``model``,
    ``layer``, ``cohens_dz`` (control also ``dz_ci_low``/``dz_ci_high``; observational ``ranking``).
    One row per control cell with ``control_dz``, ``dz_ci_low``, ``dz_ci_high``; ``best_ranking`` and
    ``best_dz``: the observational cell of the same model and layer with the largest d_z; ``beaten``
    (``best_dz > control_dz``); ``band_low``/``band_high``: min and max d_z of *all* observational cells
    (the grey band); ``position`` ("above", "below" or "inside" the band), ``margin`` (distance beyond
    the nearest band edge, 0 inside) and ``ci_overlaps_band`` (the control's interval meets the band).

    Cells that could not be tested (NaN ``cohens_dz``, see :func:`moeaudit.stats.paired_effect`) take
    no part in the band or in ``best_*``; an untested control cell has ``position`` "untested",
    NaN ``margin`` and False ``beaten`` and ``ci_overlaps_band``. ``ValueError`` when
    ``observational`` has no tested cell.
    """
    tested = observational[observational.cohens_dz.notna()]
    if tested.empty:
        raise ValueError("observational has no tested cell (it is empty or every d_z is NaN)")
    lo, hi = float(tested.cohens_dz.min()), float(tested.cohens_dz.max())
    best = tested.loc[tested.groupby(["model", "layer"], sort=False).cohens_dz.idxmax(),
                      ["model", "layer", "ranking", "cohens_dz"]]
    best = best.rename(columns={"ranking": "best_ranking", "cohens_dz": "best_dz"})
    out = control[["model", "layer", "cohens_dz", "dz_ci_low", "dz_ci_high"]].rename(columns={"cohens_dz": "control_dz"})
    out = out.merge(best, on=["model", "layer"], how="left").reset_index(drop=True)
    out["beaten"] = out.best_dz > out.control_dz
    out["band_low"], out["band_high"] = lo, hi
    out["position"] = np.where(out.control_dz.isna(), "untested", np.where(
        out.control_dz > hi, "above", np.where(out.control_dz < lo, "below", "inside")))
    out["margin"] = np.clip(out.control_dz - hi, 0, None) + np.clip(lo - out.control_dz, 0, None)
    out["ci_overlaps_band"] = (out.dz_ci_low <= hi) & (out.dz_ci_high >= lo)
    return out


def control_beaten_text(cmp: pd.DataFrame) -> str:
    """How often a population-level statistic ranks a token's experts better than the control does
    (a :func:`control_against_observational` result), with the largest such margin; layers whose
    control cell could not be tested are counted apart."""
    beaten = cmp[cmp.beaten]
    n = int(cmp.control_dz.notna().sum())
    untested = len(cmp) - n
    skipped = (f" ({plural(untested, 'layer')} could not be tested and {'is' if untested == 1 else 'are'} left out)"
               if untested else "")
    if beaten.empty:
        return (f"on this run the control's d_z is at least as large as every observational d_z at all "
                f"{n} audited layers" + (" where it is defined" if untested else "") + skipped)
    r = beaten.loc[(beaten.best_dz - beaten.control_dz).idxmax()]
    return (f"on this run, at {len(beaten)} of {n} audited layers{skipped} at least one population-level "
            f"statistic has a larger d_z than the control (the largest gap: {r.model} layer {r.layer}, control "
            f"{fmt_signed(r.control_dz)} against {str(r.best_ranking).replace('_', ' ')} {fmt_signed(r.best_dz)})")


def figure1_text(control: pd.DataFrame, observational: pd.DataFrame, *, alpha: float) -> str:
    """The paragraph under Figure 1 of chapter 5: the grey band, the control cells outside it (by how
    much, and whether their intervals still meet the band), and the counts of passing cells.
    ``control`` also needs ``sig_dual_bonf`` and ``p_t``. Cells that could not be tested (NaN d_z)
    are named as such and left out of the band and the comparisons."""
    cmp = control_against_observational(control, observational)
    n_obs = int(observational.cohens_dz.notna().sum())
    s = (f"The {n_obs} observational cells" + (f" that could be tested (of {len(observational)})"
                                               if n_obs < len(observational) else "")
         + f" span d_z from {fmt_signed(cmp.band_low.iloc[0])} to {fmt_signed(cmp.band_high.iloc[0])}. ")
    out = cmp[~cmp.position.isin(["inside", "untested"])]
    untested = cmp[cmp.position == "untested"]
    if len(untested):
        s += (f"{plural(len(untested), 'control cell')} could not be tested ("
              + join_words(f"{r.model} layer {r.layer}" for r in untested.itertuples()) + "). ")
    if out.empty and len(untested) < len(cmp):
        s += (f"Every control cell{' that could be tested' if len(untested) else ''} lies inside that range: "
              "per-token conditioning does not produce a larger effect than the population-level metrics did. ")
    for r in out.itertuples():
        s += (f"{r.model} layer {r.layer} lies {r.position} the band (d_z = {fmt_signed(r.control_dz)}, "
              f"{r.margin:.3f} beyond its edge); its 95% interval [{fmt_signed(r.dz_ci_low)}, {fmt_signed(r.dz_ci_high)}] "
              + ("overlaps the band, so it is not shown to be stronger than the strongest observational cell. "
                 if r.ci_overlaps_band else "does not overlap the band. "))
    n_dual, n_unc = int(control.sig_dual_bonf.sum()), int((control.p_t < alpha).sum())
    return s + (f"Of the {len(control)} control cells, {n_dual} pass{'es' if n_dual == 1 else ''} the dual-test rule "
                f"under Bonferroni within their model, and {n_unc} reach{'es' if n_unc == 1 else ''} uncorrected "
                f"p_t < {alpha:g}.")


def control_summary_text(t: pd.DataFrame, *, alpha: float) -> str:
    """One model's control cells (rows of the control table, one per layer) as a paragraph: d_z by
    layer, the largest, and which layers pass Bonferroni on both tests, on one alone. A layer that
    could not be tested (NaN d_z) reads "not tested" and passes nothing."""
    t = t.sort_values("layer")
    flags = t[["sig_dual_bonf", "sig_t_bonf", "sig_W_bonf"]].fillna(False).astype(bool)
    dual = t[flags.sig_dual_bonf]
    t_only, w_only = t[flags.sig_t_bonf & ~flags.sig_dual_bonf], t[flags.sig_W_bonf & ~flags.sig_t_bonf]
    seq = ", ".join(f"L{r.layer}: {fmt_signed(r.cohens_dz) if pd.notna(r.cohens_dz) else 'not tested'}"
                    for r in t.itertuples())
    s = f"**{t.model.iloc[0]}.** d_z by layer: {seq}. "
    if t.cohens_dz.notna().any():
        best = t.loc[t.cohens_dz.abs().idxmax()]
        s += (f"The largest in magnitude is at layer {int(best.layer)} (d_z = {fmt_signed(best.cohens_dz)}, 95% CI "
              f"[{fmt_signed(best.dz_ci_low)}, {fmt_signed(best.dz_ci_high)}], p_t = {best.p_t:.3g}, "
              f"p_W = {best.p_W:.3g}). ")
    else:
        s += "No layer could be tested. "
    if len(dual):
        s += (f"{len(dual)} of {len(t)} layers pass{'es' if len(dual) == 1 else ''} Bonferroni under the dual-test rule "
              f"({join_words(f'L{L}' for L in dual.layer)}). ")
    else:
        s += f"No layer passes Bonferroni under the dual-test rule (α_adj = {alpha / len(t):.3g}). "
    for sub, what, why in ((t_only, "on the t-test alone but not on Wilcoxon", "a disagreement the paper's audit rule "
                            "counts as noise"), (w_only, "on the Wilcoxon test alone but not on the t-test",
                                                 "which the rule also sets aside")):
        if len(sub):
            s += (f"{'One layer passes' if len(sub) == 1 else f'{len(sub)} layers pass'} {what} "
                  f"({join_words(f'L{L}' for L in sub.layer)}): {why}. ")
    return s


def control_reading_text(control: pd.DataFrame) -> str:
    """Whether this run's control separates the two readings of the audit's null (chapter 5), and
    which Spearman intervals (``rho``, ``rho_ci_low``, ``rho_ci_high``) exclude zero."""
    dual = control[control.sig_dual_bonf.astype(bool)]
    if dual.empty:
        s = ("On this run no control cell passes the dual-test rule under Bonferroni, so the control does not "
             "separate the two readings: the observational null stays ambiguous here. ")
    else:
        s = (f"On this run {plural(len(dual), 'control cell')} pass{'es' if len(dual) == 1 else ''} the rule ("
             + join_words(f"{r.model} layer {r.layer}" for r in dual.itertuples())
             + "): the audit detects an effect of that size, and the observational null is informative there. ")
    ex = control[(control.rho_ci_low > 0) | (control.rho_ci_high < 0)]
    if ex.empty:
        return s + f"No Spearman interval of the {len(control)} cells excludes zero."
    return s + (f"The Spearman interval excludes zero at {plural(len(ex), 'cell')} of {len(control)}: "
                + "; ".join(f"{r.model} layer {r.layer} (ρ = {fmt_signed(r.rho)}, [{fmt_signed(r.rho_ci_low)}, "
                            f"{fmt_signed(r.rho_ci_high)}])" for r in ex.itertuples()) + ".")


def paper_control_notes(pv: pd.DataFrame | None = None, *, alpha: float | None = None) -> dict[str, str]:
    """What the paper's Table 4 (OLMoE control) and its text do with the significance rule, as sentences.

    ``pv``: :func:`moeaudit.released.paper_printed_values` (default: loaded); ``alpha``: the paper's
    family-wise level (default :data:`moeaudit.released.PAPER_ALPHA`), Bonferroni over the table's
    layers. Returns ``{"rule": ..., "trend": ...}``: ``rule`` compares the layers that pass on p_t,
    on both tests and the bold layers of Table 4; ``trend`` says whether its d rise monotonically with depth.
    """
    from .released import PAPER_ALPHA, paper_printed_values  # noqa: PLC0415

    alpha = PAPER_ALPHA if alpha is None else alpha
    pv = paper_printed_values() if pv is None else pv
    t4 = pv[pv.table == 4].pivot_table(index="layer", columns="quantity", values="value")
    printed = pv[pv.table == 4].set_index(["layer", "quantity"]).printed
    bold = sorted(pv[(pv.table == 4) & (pv.quantity == "d") & pv.bold.astype(bool)].layer)
    k = len(t4)
    a_adj = alpha / k
    t_pass = list(t4.index[t4.p_t < a_adj])
    dual = list(t4.index[(t4.p_t < a_adj) & (t4.p_W < a_adj)])
    unc = list(t4.index[t4.p_t < alpha])
    cell = lambda L: f"layer {L} (p_t = {printed[(L, 'p_t')]}, p_W = {printed[(L, 'p_W')]})"  # noqa: E731
    rule = (f"In the paper's Table 4 (OLMoE, α_adj = {alpha:g}/{k} = {a_adj:.3g}) the t-test passes at that level "
            + (f"at {join_words(cell(L) for L in t_pass)}, " if t_pass else "at no layer, ")
            + (f"and Wilcoxon as well at {join_words(f'layer {L}' for L in dual)}. " if dual
               else "and Wilcoxon does not. " if len(t_pass) == 1 else "and Wilcoxon at none of them. "))
    if t_pass and not dual:
        rule += ("The paper's text nevertheless calls that result the one to survive Bonferroni correction: "
                 "for the control, the paper counts a t-test below α_adj alone, not the dual rule it applies to the "
                 "audit cells. ")
    extra = [L for L in bold if L not in t_pass]
    rule += (f"Its caption says bold marks Bonferroni significance, but it bolds layer{'s' if len(bold) != 1 else ''} "
             f"{join_words(bold)}" + (f", including {join_words(cell(L) for L in extra)}, whose p_t is above α_adj" if extra else "")
             + (f"; the bold layers are exactly those with uncorrected p_t < {alpha:g}." if bold == unc else "."))
    d = t4.d.sort_index()
    mono = bool(np.all(np.diff(d.to_numpy()) > 0))
    seq = ", ".join(f"L{L} {printed[(L, 'd')]}" for L in d.index)
    trend = (f"its Table 4 d rise with depth at every step ({seq})" if mono else
             f"its text says that the OLMoE effect grows monotonically with depth, but the d of its Table 4 ({seq}) "
             f"do not rise at every step")
    return {"rule": rule, "trend": trend}


def distribution_shape(*, median: float, p05: float, p95: float, ratio: float = 0.25) -> str:
    """The shape of a distribution of loss changes (nats) from its median and 5th/95th percentiles.

    With ``scale = max(|p05|, |p95|)``: ``"shift"`` when ``|median| >= ratio·scale`` (the centre moved);
    otherwise ``"two-sided"`` when both tails are long — ``p05 < 0 < p95`` and
    ``min(|p05|, p95) >= ratio·scale`` (a wide spread of both signs); otherwise ``"upper tail"``
    (``p95`` is the long side: a tail of large increases) or ``"lower tail"``; ``"none"`` when
    ``scale`` is 0. ``ValueError`` unless ``0 < ratio < 1`` or when ``p05 > p95``.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if p05 > p95:
        raise ValueError(f"p05 ({p05}) exceeds p95 ({p95})")
    scale = max(abs(p05), abs(p95))
    if scale == 0:
        return "none"
    if abs(median) >= ratio * scale:
        return "shift"
    if p05 < 0 < p95 and min(-p05, p95) >= ratio * scale:
        return "two-sided"
    return "upper tail" if abs(p95) >= abs(p05) else "lower tail"


def threshold_calls(summary: pd.DataFrame, *, threshold: float) -> pd.DataFrame:
    """At each model's deepest removal, whether a layer's mean loss change is above or below
    ``threshold`` (nats) beyond its confidence interval.

    ``summary``: a :func:`progressive_summary` result. One row per (model, layer) at the model's
    largest ``k`` with ``k``, ``mean``, ``ci_low``, ``ci_high`` and ``call``: ``"above"`` (``ci_low >
    threshold``), ``"below"`` (``ci_high < threshold``) or ``"undecided"`` (the interval contains the
    threshold, or is NaN).
    """
    rows = []
    for model, m in summary.groupby("model", sort=False):
        deep = m[m.k == m.k.max()]
        for r in deep.itertuples():
            call = "above" if r.ci_low > threshold else "below" if r.ci_high < threshold else "undecided"
            rows.append({"model": model, "layer": r.layer, "k": int(r.k), "mean": r.mean, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "call": call})
    return pd.DataFrame(rows)


def gap_rounding_ratio(measured, clean, r_norm, *, dtype: str = "float32") -> np.ndarray:
    """How far a measured gap norm departs from its clean-pass value, in units of the rounding that
    the subtraction ``g = y - y'`` can produce.

    ``measured``: ``||y - y'||`` from an ablation (nats-free, hidden-space units); ``clean``:
    ``w_e · ||E_e(x)||`` from the clean pass; ``r_norm``: ``||r||``, the norm of the rest of the
    block's output. Each of ``y`` and ``y'`` is rounded to about ``eps · ||y||`` (``eps`` = machine
    epsilon of ``dtype``), so their difference carries an absolute error of order
    ``eps · (||r|| + ||g||)`` and a relative error of order ``eps · (||r|| + ||g||) / ||g||``
    (cancellation: small gaps beside a large rest lose the most digits). Returns, elementwise,
    ``(|measured - clean| / clean) / (eps · (r_norm + clean) / clean)``; values of order one mean
    the disagreement is that rounding. Raises ValueError for arrays of different lengths.
    """
    m, c, r = (np.asarray(v, dtype=np.float64) for v in (measured, clean, r_norm))
    if not (m.shape == c.shape == r.shape):
        raise ValueError(f"measured, clean and r_norm must have one shape, got {m.shape}, {c.shape}, {r.shape}")
    eps = float(torch.finfo(getattr(torch, dtype)).eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.abs(m - c) / c) / (eps * (r + c) / c)


def cosine_against_chance(median_cos: pd.DataFrame, hidden_size: dict) -> pd.DataFrame:
    """Per model: the median (over experts) mean cosine between the removed and the remaining output,
    set against the spread of the cosine of two unrelated directions.

    For two independent isotropic directions in ``d`` dimensions the cosine has mean 0 and standard
    deviation ``1/sqrt(d)`` (exactly ``1/sqrt(d)``, since ``E[cos^2] = 1/d``). ``median_cos``: rows
    with ``model`` and ``median_cos`` (one per layer, :func:`compensation_factors`);
    ``hidden_size``: {model: d}. Returns one row per model (in order of appearance) with ``d``,
    ``chance`` = ``1/sqrt(d)``, ``lo``/``hi`` (range over layers of the median cosine),
    ``ratio_lo``/``ratio_hi`` (the same in units of ``chance``) and ``relation``: ``"above"`` when
    every layer lies above ``chance``, ``"below"`` when every layer lies below it, else ``"across"``.
    Raises KeyError for a model without a hidden size.
    """
    rows = []
    for model, s in median_cos.groupby("model", sort=False):
        d = int(hidden_size[model])
        chance = 1.0 / float(np.sqrt(d))
        lo, hi = float(s.median_cos.min()), float(s.median_cos.max())
        rows.append({"model": model, "d": d, "chance": chance, "lo": lo, "hi": hi, "ratio_lo": lo / chance,
                     "ratio_hi": hi / chance,
                     "relation": "above" if lo > chance else "below" if hi < chance else "across"})
    return pd.DataFrame(rows)


def slope_sign_separation(slope, rho) -> dict:
    """Do layers with a negative and with a positive correlation fall into two groups by slope?

    ``slope``, ``rho``: one value per layer (e.g. the log–log slope of the cosine against the gap norm
    and ρ(gap norm, rel. comp.)); NaNs are dropped pairwise. Returns ``n_neg``, ``n_pos``,
    ``max_slope_neg`` (largest slope among layers with ρ < 0), ``min_slope_pos`` (smallest among
    ρ > 0), ``separated`` (True when ``max_slope_neg < min_slope_pos``, i.e. a single slope threshold
    splits the signs; None when one group is empty) and ``n_overlap`` (layers whose slope lies in the
    overlap ``[min_slope_pos, max_slope_neg]``).
    """
    s, r = np.asarray(slope, dtype=float), np.asarray(rho, dtype=float)
    ok = np.isfinite(s) & np.isfinite(r)
    s, r = s[ok], r[ok]
    neg, pos = s[r < 0], s[r > 0]
    out = {"n_neg": int(neg.size), "n_pos": int(pos.size),
           "max_slope_neg": float(neg.max()) if neg.size else float("nan"),
           "min_slope_pos": float(pos.min()) if pos.size else float("nan")}
    if not (neg.size and pos.size):
        return {**out, "separated": None, "n_overlap": 0}
    lo, hi = out["min_slope_pos"], out["max_slope_neg"]
    return {**out, "separated": bool(hi < lo), "n_overlap": int(((s >= lo) & (s <= hi)).sum()) if hi >= lo else 0}


def significant_signs_text(layers, rho, p, *, alpha: float = 0.05) -> str:
    """'k of n layers' at which ``p < alpha``, with the sign of those correlations.

    ``layers``, ``rho``, ``p``: one value per layer (NaN ρ or p: the layer is left out of n). Returns
    e.g. ``"3 of 4 layers, all negative (-0.43 to -0.33)"``, ``"2 of 3 layers, of opposite signs
    (L0 -0.42, L1 +0.41)"``, ``"1 of 4 layers (positive, +0.31)"`` or ``"0 of 4 layers"``.
    """
    L, r, pv = (np.asarray(v) for v in (layers, rho, p))
    ok = np.isfinite(r.astype(float)) & np.isfinite(pv.astype(float))
    L, r, pv = L[ok], r[ok].astype(float), pv[ok].astype(float)
    sig = pv < alpha
    head = f"{int(sig.sum())} of {len(r)} layer{'' if len(r) == 1 else 's'}"
    if not sig.any():
        return head
    rs, Ls = r[sig], L[sig]
    fmt = lambda v: f"{0.0 if round(v, 2) == 0 else v:+.2f}"  # noqa: E731
    if sig.sum() == 1:
        return f"{head} ({'positive' if rs[0] > 0 else 'negative'}, {fmt(rs[0])})"
    if (rs > 0).all() or (rs < 0).all():
        word = "positive" if rs[0] > 0 else "negative"
        rng = fmt(rs.min()) if fmt(rs.min()) == fmt(rs.max()) else f"{fmt(rs.min())} to {fmt(rs.max())}"
        return f"{head}, all {word} ({rng})"
    return f"{head}, of opposite signs (" + ", ".join(f"L{a} {fmt(b)}" for a, b in zip(Ls, rs)) + ")"


_SHAPE_WORDS = {"shift": "a shift of the whole distribution", "two-sided": "a wide spread of both signs",
                "upper tail": "a tail of large increases", "lower tail": "a tail of large decreases",
                "none": "no change at all"}


def shape_phrase(row) -> str:
    """A :func:`deepest_removal_summary` row (``median``, ``p05``, ``p95``, ``share_below_zero``) as
    its :func:`distribution_shape` in words, with the numbers it rests on."""
    shape = distribution_shape(median=row["median"], p05=row["p05"], p95=row["p95"])
    return (f"{_SHAPE_WORDS[shape]} (median {fmt_signed(row['median'])}, P5 {fmt_signed(row['p05'])}, "
            f"P95 {fmt_signed(row['p95'])} nats; the loss fell at {row['share_below_zero']:.0%} of positions)")


def _undecided(calls: pd.DataFrame, threshold: float) -> str:
    u = calls[calls.call == "undecided"]
    if u.empty:
        return ""
    return (f" At k = {int(u.k.iloc[0])} the {'interval' if len(u) == 1 else 'intervals'} of the mean at "
            + join_words(f"layer {r.layer} ([{fmt_signed(r.ci_low)}, {fmt_signed(r.ci_high)}])" for r in u.itertuples())
            + f" contain{'s' if len(u) == 1 else ''} {threshold:g} nats, so whether "
            + ("that layer is" if len(u) == 1 else "those layers are")
            + " above or below the threshold cannot be told apart on these positions.")


def cliff_text(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, *, threshold: float) -> str:
    """One model's progressive-ablation result as a paragraph (chapter 6): the deepest-removal means,
    the layers whose mean crosses ``threshold``, the interval calls at the deepest k
    (:func:`threshold_calls`), the largest step and the shape of the widest distribution.
    All three tables restricted to one model."""
    b, d = breaks, deepest.set_index("layer")
    kmax = int(d.k.iloc[0])
    worst, mildest = b.loc[b.mean_deepest.idxmax()], b.loc[b.mean_deepest.idxmin()]
    broken, steepest, tail = b[b.first_k_above.notna()], b.loc[b.largest_step.idxmax()], d.loc[d.p95.idxmax()]
    s = (f"**{b.model.iloc[0]}.** Removing {kmax} of the {kmax + 1} active experts changes the loss by "
         f"{fmt_signed(mildest.mean_deepest)} nats on average at layer {mildest.layer} and by "
         f"{fmt_signed(worst.mean_deepest)} nats at layer {worst.layer} ({worst.ratio_to_clean:.1%} of the clean loss there). ")
    if len(broken):
        rest = sorted(set(b.layer) - set(broken.layer))
        s += (f"The mean crosses {threshold:g} nats at "
              + join_words(f"layer {r.layer} (k = {r.first_k_above})" for r in broken.itertuples())
              + (f"; layer{'s' if len(rest) > 1 else ''} {join_words(rest)} stay{'' if len(rest) > 1 else 's'} below it "
                 "at every k." if rest else "; no layer stays below it."))
    else:
        s += f"No layer's mean crosses {threshold:g} nats at any k."
    s += _undecided(calls, threshold)
    return s + (f" The largest single step is at layer {steepest.layer}, k = {steepest.largest_step_k} "
                f"({fmt_signed(steepest.largest_step)} nats). At k = {kmax} the median lies between "
                f"{fmt_signed(d['median'].min())} and {fmt_signed(d['median'].max())} nats across layers; the widest "
                f"upper tail is at layer {tail.name}, where the distribution is {shape_phrase(tail)}, and the positions "
                f"above the 95th percentile contribute {tail.top5_share:.0%} of the summed increase.")


def _crossing(crossed, last, threshold: float) -> str:
    if not crossed:
        return f"no layer crosses {threshold:g} nats"
    if list(crossed) == [last]:
        return f"only the last audited layer ({last}) crosses {threshold:g} nats"
    return f"layer{'s' if len(crossed) > 1 else ''} {join_words(crossed)} cross{'' if len(crossed) > 1 else 'es'} {threshold:g} nats"


def cliff_comparison_text(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, paper_breaks: pd.DataFrame,
                          *, last: int, threshold: float) -> str:
    """One bullet comparing one model's crossings of ``threshold`` with the paper's Table 8
    (``paper_breaks``: :func:`redundancy_breaks` of :func:`paper_progressive_table`), where the largest
    deepest-removal mean lies, and the shape of the damage there (:func:`shape_phrase`)."""
    b, d = breaks.set_index("layer"), deepest.set_index("layer")
    crossed = list(b.index[b.first_k_above.notna()])
    p_crossed = list(paper_breaks.layer[paper_breaks.first_k_above.notna()])
    p_last = int(paper_breaks.layer.max())
    same = (not crossed and not p_crossed) or (crossed == [last] and p_crossed == [p_last])
    shape = _crossing(crossed, last, threshold) + (", so by this threshold every audited layer keeps a buffer"
                                                   if not crossed else "")
    undecided = calls[calls.call == "undecided"]
    shape += (f" (the interval of the mean at the deepest removal contains {threshold:g} nats at layer"
              f"{'s' if len(undecided) > 1 else ''} {join_words(undecided.layer)})" if len(undecided) else "")
    shape += ("; as in the paper's Table 8" if same else "; in the paper's Table 8, "
              + _crossing(p_crossed, p_last, threshold))
    worst = b.mean_deepest.idxmax()
    where = ("the largest mean change at the deepest removal is at the last audited layer" if worst == last else
             f"the largest mean change at the deepest removal is at layer {worst}, not the last")
    return f"- **{b.model.iloc[0]}**: {shape}; {where}, and there the damage is {shape_phrase(d.loc[worst])}."
