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
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import __version__
from .corpus import (
    TEXT_FORMS,
    CorpusSource,
    TokenizedCorpus,
    check_context,
    integer_ids,
    is_integer,
    load_eval_corpus,
    loss_regime,
    resolve_corpus,
    resolve_text_form,
    sample_positions,
)
from .engine import CleanPass, clean_pass, premise_failures, resolve_strategy, run_ablations
from .metrics import METRICS, ROUTING_WEIGHT, check_rankings, observational_metrics
from .models import AuditModel, load_model
from .paths import results_dir as resolve_results_dir
from .pruning import perplexity, pruned_experts
from .report import join_words, regime_text
from .stats import t_critical
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
    offloaded model equals that of the same weights loaded plainly.

    A model that runs on a server (``model.on_server``) has no weights here: its fingerprint hashes
    the config and the hub id it names (``server:<id>``), so its records are cached apart from any
    local run and are trusted to the server's copy of that checkpoint."""
    from accelerate.utils import align_module_device  # noqa: PLC0415

    config = json.loads(model.hf.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if model.on_server:
        h.update(f"server:{model.name}".encode())
        return h.hexdigest()[:16]
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


#: format of a cached clean pass's COMPLETE record (format 1 held "1" and no checksums)
CLEAN_FORMAT = 2
_CLEAN_FILES = ("tokens.parquet", "routing.npz", "corpus.parquet", "params.json")


def _clean_problem(path) -> str | None:
    """Why the cached clean pass in ``path`` may not be served, or ``None``: its ``COMPLETE`` record
    must be readable and name the sha256 of each of its files, and each file must match."""
    try:
        record = json.loads((path / "COMPLETE").read_text())
    except (OSError, ValueError):
        return "its COMPLETE record is unreadable"
    if not isinstance(record, dict) or record.get("format") != CLEAN_FORMAT:
        return "its COMPLETE record holds no checksums (an older format)"
    for name in _CLEAN_FILES:
        try:
            digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
        except OSError as exc:
            return f"{name} is unreadable ({type(exc).__name__})"
        if digest != record.get("sha256", {}).get(name):
            return f"{name} differs from the file that was written"
    return None


class CachedCleanPassWarning(UserWarning):
    """A cached clean pass did not verify and is computed again."""


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
    digests = {name: hashlib.sha256((tmp / name).read_bytes()).hexdigest() for name in _CLEAN_FILES}
    (tmp / "COMPLETE").write_text(json.dumps({"format": CLEAN_FORMAT, "sha256": digests}, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:  # a finished copy is already there: keep it
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(model_name: str, *, corpus: str | os.PathLike | CorpusSource = "auto", n_texts: int = 100,
            text_form: str = "auto", max_tokens: int | None = None, dtype: str = "float32",
            device: str | None = "cpu", device_map=None, remote: bool | str = False,
            data_dir=None, results_dir=None, batch_size: int = 8, progress: bool | None = None) -> AuditContext:
    """Load a model and the evaluation corpus, and run (or reuse) the clean pass over it.

    ``corpus`` is resolved first (see :func:`moeaudit.corpus.resolve_corpus`), so a bad value
    fails before any model is loaded; ``text_form`` says how a selected line becomes a text
    (:func:`moeaudit.corpus.select_texts`; ``"auto"`` is the corpus's own form, resolved by
    :func:`moeaudit.corpus.resolve_text_form`, which raises ``ValueError`` for a form that does not exist
    for the corpus). The corpus used and its resolved form are part of the provenance (and so of every
    record-cache key and ``params.json``). A cached clean pass is served only when every file matches
    the sha256 recorded when it was written; otherwise it is computed again (one
    :class:`CachedCleanPassWarning`). ``max_tokens=None`` truncates texts to
    ``min(512, max_position_embeddings)`` (the paper used up to 512 tokens; the shipped small
    models were trained on shorter contexts); a ``max_tokens`` above the model's context raises
    ``ValueError`` before the corpus is tokenized (:func:`moeaudit.corpus.check_context`).
    ``remote`` is :func:`moeaudit.models.load_model`'s (checked there before any weights are read): ``True``
    or an NDIF host URL runs every trace of a hub id on that server; ``"local"`` simulates that path here.
    """
    source = corpus if isinstance(corpus, CorpusSource) else resolve_corpus(corpus, data_dir=data_dir)
    if text_form not in TEXT_FORMS:
        raise ValueError(f"text_form={text_form!r} is not one of {TEXT_FORMS}")
    text_form = resolve_text_form(source, text_form)
    model = load_model(model_name, dtype=dtype, device=device, device_map=device_map, remote=remote)
    context = getattr(model.hf.config, "max_position_embeddings", None)
    if max_tokens is None:
        max_tokens = int(min(512, context or 512))
    check_context(max_tokens, context, model_name)
    if model.tokenizer is None:
        raise ValueError(f"model {model_name!r} has no tokenizer; the evaluation corpus cannot be tokenized")
    tokenized = load_eval_corpus(model.tokenizer, corpus=source, n_texts=n_texts, max_tokens=max_tokens,
                                 text_form=text_form)
    provenance = {"model": model_name, "model_fingerprint": model_fingerprint(model), "dtype": dtype,
                  "corpus": tokenized.fingerprint(), **source.key(), "text_form": text_form, "n_texts": n_texts,
                  "max_tokens": max_tokens,
                  "engine_version": ENGINE_VERSION, "moeaudit": __version__}
    path = resolve_results_dir(results_dir) / "clean" / params_key(provenance)
    if (path / "COMPLETE").exists() and (problem := _clean_problem(path)) is not None:
        with exclusive(path.with_name(f"{path.name}.lock")):
            if (path / "COMPLETE").exists() and (problem := _clean_problem(path)) is not None:
                warnings.warn(f"{path}: {problem}; the cached clean pass is removed and computed again",
                              CachedCleanPassWarning, stacklevel=2)
                shutil.rmtree(path)
    if not (path / "COMPLETE").exists():
        # one process computes a clean pass, others needing it wait for it (chapters run in parallel)
        with exclusive(path.with_name(f"{path.name}.lock")):  # a lock file beside the folder
            if not (path / "COMPLETE").exists():
                _compute_and_save_clean(model, tokenized, provenance, path, batch_size=batch_size, progress=progress)
    clean = _load_clean(path, model.name)
    metrics = observational_metrics(clean, num_experts=model.layout.num_experts)
    return AuditContext(model, tokenized, clean, metrics, provenance, results_dir, source)


def corpus_regime(ctx: AuditContext) -> dict:
    """How well the audited model reads the audited text, the regime its effects are measured in:
    :func:`moeaudit.report.context_regime` (:func:`moeaudit.corpus.loss_regime` over every scored token
    of the clean pass, nats per token) with ``n_texts`` and the corpus read (``corpus_source``,
    ``corpus_variant``, ``text_form``)."""
    return {**context_regime(ctx), "n_texts": len(ctx.corpus),
            **{k: ctx.provenance[k] for k in ("corpus_source", "corpus_variant", "text_form")}}


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


def paired_cells(records: pd.DataFrame, metrics: pd.DataFrame, *, rankings=None,
                 keep_failed_premise: bool = False) -> pd.DataFrame:
    """For every (layer, ranking, position): the highest- and lowest-ranked active expert and their
    loss changes. ``records`` are single-expert records; ``metrics`` the observational table.

    Ties are broken by expert id (lowest id wins 'high', highest id wins 'low'), deterministically.
    Experts whose ranking value is NaN are left out of the ranking at that position.

    The premise of each record (``premise_ok``: the removed expert was routed in the forward that
    removed it, and the batch's clean row routed as the clean pass did; a missing or non-boolean
    value counts as failed) is carried for both sides (``premise_ok_high``, ``premise_ok_low``,
    ``premise_ok`` = both). By default a pair whose premise fails is marked ``premise_excluded``:
    :func:`moeaudit.stats.audit_table` leaves marked pairs out of its tests, keeps their cell (so no
    cell leaves its family), and counts them per cell (``n_premise_excluded``); anything else computed
    from these pairs should drop them too. ``keep_failed_premise=True`` marks none. ``ValueError``
    when no position has two active experts to compare (a top-1 model: the paired audit is undefined
    there).
    """
    rankings = check_rankings(rankings or [*METRICS, ROUTING_WEIGHT])
    base = records[["model", "family", "mode", "layer", "seq_id", "t", "expert", "prob", "weight",
                    "delta_loss", "gap_norm", "clean_loss"]].copy()
    # only a boolean True holds: NaN, a string "False" or a number is not a premise that was checked
    base["premise_ok"] = (records["premise_ok"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v))
                          if "premise_ok" in records else True)
    if not records.empty and records.groupby(["layer", "seq_id", "t"]).expert.nunique().max() < 2:
        raise ValueError("every position has a single active expert (a top-1 model?): there is no highest- and "
                         "lowest-ranked pair of active experts to compare, so the paired audit is undefined; "
                         "audit a model that routes each token to at least two experts")
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
        cols = ["expert", "value", "delta_loss", "gap_norm", "prob", "premise_ok"]
        pair = high[["model", "family", "mode", "clean_loss", *cols]].join(low[cols], lsuffix="_high", rsuffix="_low")
        pair = pair[pair.expert_high != pair.expert_low].reset_index()
        pair.insert(3, "ranking", ranking)
        out.append(pair)
    cells = pd.concat(out, ignore_index=True)
    cells["diff"] = cells.delta_loss_high - cells.delta_loss_low
    cells["premise_ok"] = cells.premise_ok_high & cells.premise_ok_low
    cells["premise_excluded"] = False if keep_failed_premise else ~cells.premise_ok
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
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rows = []
    for (model, layer, k), g in records.groupby(["model", "layer", "k"], sort=False):
        x = g.delta_loss.to_numpy(dtype=np.float64)
        n, mean = x.size, float(x.mean())
        half = float(t_critical(alpha, n - 1) * x.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append({"model": model, "layer": layer, "k": int(k), "n": int(n), "mean": mean,
                     "ci_low": mean - half, "ci_high": mean + half, "median": float(np.median(x)),
                     "p05": float(np.quantile(x, 0.05)), "p95": float(np.quantile(x, 0.95)),
                     "clean_loss": float(g.clean_loss.mean())})
    return pd.DataFrame(rows)


def premise_phrase(records: pd.DataFrame) -> str:
    """One clause on the premise check of ablation records (:func:`moeaudit.engine.premise_failures`):
    whether every removed expert was routed at its position in the forward that removed it, and
    every batch's clean row routed as the clean pass did. Counts come from ``records``."""

    if len(records) == 0:
        return "there are no records to check"
    c = premise_failures(records, by=()).iloc[0]
    n, failed = int(c.n_records), int(c.n_failed)
    if failed == 0:
        return f"the premise check holds for all {n:,} (each removed expert was routed there in the ablating forward)"
    return (f"the premise check fails for {failed:,} of {n:,} ({int(c.n_not_routed):,} removed an expert the "
            f"ablating forward did not route there, {int(c.n_routing_changed):,} sit in a batch whose clean row "
            f"routed differently from the clean pass); they are kept and flagged in the column premise_ok")


def context_regime(ctx) -> dict:
    """:func:`moeaudit.corpus.loss_regime` over the clean pass of a prepared model (``ctx``: an
    :class:`moeaudit.audit.AuditContext`): every scored token of the corpus it reads."""
    tokens = ctx.clean.tokens
    return loss_regime(tokens.target_id.to_numpy(), tokens.loss.to_numpy(), int(ctx.model.hf.config.vocab_size))


def regime_line(name: str, ctx) -> str:
    """``**name**:`` followed by :func:`regime_text` of :func:`context_regime`: the line a
    chapter shows for each model it runs, so that every page states how well its models read the text."""
    return f"**{name}**: " + regime_text(context_regime(ctx))


def model_summary(name: str, ctx, audited, records: pd.DataFrame, *, what: str = "single-expert ablations") -> str:
    """One paragraph introducing a model's run in a chapter: family, MoE layout, audited layers,
    the number of ablation records and their premise check (:func:`premise_phrase`), and how well it
    reads the text (:func:`regime_text` of :func:`moeaudit.corpus.loss_regime` over the clean pass)."""
    lay = ctx.model.layout
    r = context_regime(ctx)
    return (f"**{name}** ({lay.family}): MoE layers {join_words(lay.moe_layers)} of {lay.n_layers}, "
            f"{lay.num_experts} routed experts, top-{lay.top_k}, {lay.n_shared_experts} shared; audited layers "
            f"{join_words(audited)}; {len(records):,} {what}; {premise_phrase(records)}. " + regime_text(r))
