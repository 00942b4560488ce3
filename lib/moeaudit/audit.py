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
from .corpus import (TEXT_FORMS, CorpusSource, check_context, resolve_text_form, TokenizedCorpus, integer_ids, is_integer, load_eval_corpus,
                     resolve_corpus, sample_positions)
from .engine import CleanPass, clean_pass, resolve_strategy, run_ablations
from .metrics import METRICS, ROUTING_WEIGHT, check_rankings, observational_metrics
from .models import AuditModel, load_model
from .paths import results_dir as resolve_results_dir
from .pruning import perplexity, pruned_experts
from .report import context_regime, fmt_signed, join_words, plural  # noqa: F401  (re-exported for the chapters)
from .stats import (binomial_excess, dz_difference_ci, min_detectable_dz, sign_test,
                    sign_test_detectable_share, spearman_defined, t_critical, t_test_power, tost_min_p)
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
            device: str | None = "cpu", device_map=None,
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
    """
    source = corpus if isinstance(corpus, CorpusSource) else resolve_corpus(corpus, data_dir=data_dir)
    if text_form not in TEXT_FORMS:
        raise ValueError(f"text_form={text_form!r} is not one of {TEXT_FORMS}")
    text_form = resolve_text_form(source, text_form)
    model = load_model(model_name, dtype=dtype, device=device, device_map=device_map)
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
    ``n``, ``mean``, ``sd`` (ddof=1; NaN for n < 2), ``median``, ``p05``, ``p95`` (nats), ``share_above`` (fraction of positions
    with ΔL > ``threshold``), ``share_below_zero`` (fraction where the loss fell), ``n_up`` and
    ``n_down`` (counts of positions where the loss rose and fell; positions with ΔL = 0 are in
    neither), ``top5_share`` (:func:`tail_share` at q = 0.95).
    """
    rows = []
    for model, m in records.groupby("model", sort=False):
        kmax = int(m.k.max())
        for layer, g in m[m.k == kmax].groupby("layer", sort=False):
            x = g.delta_loss.to_numpy(dtype=np.float64)
            rows.append({"model": model, "layer": layer, "k": kmax, "n": int(x.size), "mean": float(x.mean()),
                         "sd": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                         "median": float(np.median(x)), "p05": float(np.quantile(x, 0.05)),
                         "p95": float(np.quantile(x, 0.95)), "share_above": float(np.mean(x > threshold)),
                         "share_below_zero": float(np.mean(x < 0)), "n_up": int((x > 0).sum()),
                         "n_down": int((x < 0).sum()), "top5_share": tail_share(x, q=0.95)})
    return pd.DataFrame(rows)


def removal_direction(deepest: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Whether the deepest removal raises or lowers the mean loss, and the loss at more than half of
    the positions, each at the Bonferroni level ``alpha / m`` (``m`` the number of layers of that
    model in ``deepest``).

    ``deepest``: a :func:`deepest_removal_summary` result (``model``, ``layer``, ``n``, ``mean``, ``sd``,
    ``n_up``, ``n_down``, ``share_below_zero``). Returns ``deepest`` with

    - ``alpha_sign`` (``alpha / m``), ``mean_low``/``mean_high`` (Student-t interval of the mean at
      confidence ``1 - alpha / m``, nats; NaN without ``sd`` or for n < 2);
    - ``p_sign``: a two-sided sign test (:func:`moeaudit.stats.sign_test`) of the positions where the
      loss rose against those where it fell (a test of the median shift);
    - ``direction``: ``"raises"`` (``p_sign < alpha / m``, more rises), ``"lowers"`` (significant, more
      falls) or ``"undistinguished"`` (the share of falls is not distinguishable from one half; also
      when no position changed);
    - ``detectable_share``: the share of rises (above one half) the sign test detects with 80% power
      at that level and ``n_up + n_down`` positions (:func:`moeaudit.stats.sign_test_detectable_share`).

    ``ValueError`` unless 0 < alpha < 1.
    """

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    out = deepest.copy()
    m = out.groupby("model", sort=False).layer.transform("size")
    out["p_sign"] = [sign_test(int(u), int(d)) for u, d in zip(out.n_up, out.n_down)]
    out["alpha_sign"] = alpha / m
    sd = out["sd"] if "sd" in out else pd.Series(np.nan, index=out.index)
    half = [t_critical(a, int(n) - 1) * s / np.sqrt(n) if n > 1 and np.isfinite(s) else np.nan
            for a, n, s in zip(out.alpha_sign, out.n, sd)]
    out["mean_low"], out["mean_high"] = out["mean"] - half, out["mean"] + half
    out["detectable_share"] = [sign_test_detectable_share(int(u + d), alpha=a) if u + d > 0 else np.nan
                               for u, d, a in zip(out.n_up, out.n_down, out.alpha_sign)]
    sig = out.p_sign < out.alpha_sign  # NaN p (no position changed) is not significant
    out["direction"] = np.where(sig & (out.n_up > out.n_down), "raises",
                                np.where(sig & (out.n_down > out.n_up), "lowers", "undistinguished"))
    return out


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


def same_layer_margins(cmp: pd.DataFrame, control_cells: pd.DataFrame, observational_cells: pd.DataFrame, *,
                       n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Whether each control cell's d_z exceeds that of the strongest observational cell of its own layer.

    ``cmp``: :func:`control_against_observational` (``model``, ``layer``, ``control_dz``,
    ``best_ranking``, ``best_dz``); ``control_cells`` and ``observational_cells``: the per-position
    rows of :func:`paired_cells` (``model``, ``ranking``, ``layer``, ``seq_id``, ``t``, ``diff`` in
    nats). The two rankings of a layer are compared on the positions both kept (inner join on
    ``seq_id``, ``t``), with the paired-bootstrap interval of ``d_z(control) - d_z(best)``
    (:func:`moeaudit.stats.dz_difference_ci`, level ``ci``). Returns ``cmp`` with ``n_shared``,
    ``diff_ci_low``, ``diff_ci_high`` and ``vs_best``: ``"exceeds"`` (interval above zero, see
    :func:`zero_relation`), ``"below"`` (below zero: the observational cell is the stronger),
    ``"not shown"`` (the interval contains or touches zero) or ``"untested"`` (a d_z or the interval
    is undefined). The strongest observational cell is chosen after seeing the data, which biases
    its d_z upward: an "exceeds" is conservative, a "not shown" is not evidence that the two are equal.
    """

    out = cmp.copy()
    n_sh, lo, hi = [], [], []
    for r in out.itertuples():
        if pd.isna(r.control_dz) or pd.isna(r.best_dz):
            n_sh.append(0), lo.append(np.nan), hi.append(np.nan)
            continue
        a = control_cells[(control_cells.model == r.model) & (control_cells.layer == r.layer)]
        b = observational_cells[(observational_cells.model == r.model) & (observational_cells.layer == r.layer)
                                & (observational_cells.ranking == r.best_ranking)]
        j = a[["seq_id", "t", "diff"]].merge(b[["seq_id", "t", "diff"]], on=["seq_id", "t"], suffixes=("_c", "_o"))
        low, high = dz_difference_ci(j.diff_c, j.diff_o, n_boot=n_boot, seed=seed, ci=ci)
        n_sh.append(len(j)), lo.append(low), hi.append(high)
    out["n_shared"], out["diff_ci_low"], out["diff_ci_high"] = n_sh, lo, hi
    rel = [zero_relation(a, b) for a, b in zip(out.diff_ci_low, out.diff_ci_high)]
    out["vs_best"] = ["exceeds" if x == "above" else "below" if x == "below" else "untested" if x == "undefined"
                      else "not shown" for x in rel]
    return out


def _cell_label(r) -> str:
    return f"{r.model} layer {r.layer}"


def control_beaten_text(cmp: pd.DataFrame) -> str:
    """How the control's d_z compares with the observational cells (a :func:`control_against_observational`
    result, optionally with :func:`same_layer_margins`), as a clause that continues a sentence.

    Counts the layers where some population-level statistic has the larger point estimate, with the
    largest such gap; with the margins, also where the control is *shown* to exceed the strongest
    observational cell of its layer (its interval of the difference above zero), where that cell is
    shown to exceed the control, and names the layers where the control's estimate is the larger one
    without being shown larger, so that the text never reads a larger point estimate as a stronger
    control. Layers whose control cell could not be tested are counted apart."""
    beaten = cmp[cmp.beaten]
    n = int(cmp.control_dz.notna().sum())
    untested = len(cmp) - n
    skipped = (f" ({plural(untested, 'layer')} could not be tested and {'is' if untested == 1 else 'are'} left out)"
               if untested else "")
    if beaten.empty:
        s = (f"on this run the control's d_z is at least as large as every observational d_z at all "
             f"{n} audited layers" + (" where it is defined" if untested else "") + skipped)
    else:
        r = beaten.loc[(beaten.best_dz - beaten.control_dz).idxmax()]
        s = (f"on this run, at {len(beaten)} of {n} audited layers{skipped} at least one population-level "
             f"statistic has a larger d_z than the control (the largest gap: {r.model} layer {r.layer}, control "
             f"{fmt_signed(r.control_dz)} against {str(r.best_ranking).replace('_', ' ')} {fmt_signed(r.best_dz)})")
    if "vs_best" not in cmp:
        return s
    m = cmp[cmp.vs_best != "untested"]
    if m.empty:
        return s
    ahead = m[m.control_dz > m.best_dz]
    up, down = ahead[ahead.vs_best == "exceeds"], m[m.vs_best == "below"]
    labels = lambda rows: join_words(_cell_label(r) for r in rows.itertuples())  # noqa: E731
    s += (f". Against the strongest observational cell of its own layer (same positions), the control's d_z is the "
          f"larger at {len(ahead)} of {len(m)} layers" + (f" ({labels(ahead)})" if len(ahead) else ""))
    if len(ahead):
        rest = len(ahead) - len(up)
        if up.empty:
            s += (". It is not shown larger there: the paired-bootstrap 95% interval of the difference of d_z "
                  "includes zero" if len(ahead) == 1 else
                  ". At none of them is it shown larger: every paired-bootstrap 95% interval of the difference of d_z "
                  "includes zero")
        else:
            s += (f". At {len(up)} of them it is shown larger (paired-bootstrap 95% interval of the difference of d_z "
                  f"above zero: {labels(up)})" + (f"; at the other {rest} the interval includes zero" if rest else ""))
    if len(down):
        s += (f". The strongest observational cell is shown larger than the control at {len(down)} "
              f"({labels(down)})")
    return s


def figure1_text(control: pd.DataFrame, observational: pd.DataFrame, *, alpha: float,
                 margins: pd.DataFrame | None = None) -> str:
    """The paragraph under Figure 1 of chapter 5: the grey band, the control cells outside it (by how
    much, whether their intervals still meet the band, and a cell below the band named as a
    reversal, never as a stronger control), the layers where the control is shown to exceed the
    strongest observational cell of its own layer (``margins``: :func:`same_layer_margins`, optional),
    and the counts of passing cells by direction, with the uncorrected count tested against chance
    (:func:`moeaudit.stats.binomial_excess`). ``control`` also needs ``sig_dual_bonf`` and ``p_t``.
    Cells that could not be tested (NaN d_z) are named as such and left out of the band and the
    comparisons."""

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
        ci = f"its 95% interval [{fmt_signed(r.dz_ci_low)}, {fmt_signed(r.dz_ci_high)}]"
        if r.position == "above":
            s += (f"{r.model} layer {r.layer} lies above the band (d_z = {fmt_signed(r.control_dz)}, {r.margin:.3f} "
                  f"beyond its edge); {ci} "
                  + ("overlaps the band, so it is not shown to be stronger than the strongest observational cell. "
                     if r.ci_overlaps_band else "does not overlap the band. "))
        else:
            s += (f"{r.model} layer {r.layer} lies below the band (d_z = {fmt_signed(r.control_dz)}, {r.margin:.3f} "
                  "beyond its edge): a reversal, where removing the router's top expert costs *less* than removing "
                  f"its bottom one, not a stronger control; {ci} "
                  + ("overlaps the band, so it is not shown to be more negative than every observational cell. "
                     if r.ci_overlaps_band else "does not overlap the band. "))
    if margins is not None and "vs_best" in margins:
        m = margins[margins.vs_best != "untested"]
        up = m[m.vs_best == "exceeds"]
        s += (f"Layer by layer, against the strongest observational cell of the same layer and positions, the control "
              f"is shown larger (paired-bootstrap 95% interval of the difference of d_z above zero) at "
              + (f"{len(up)} of {len(m)} layers ({join_words(_cell_label(r) for r in up.itertuples())}); "
                 f"it does not exceed the observational metrics at the other {len(m) - len(up)}. "
                 if len(up) else f"none of the {len(m)} layers: it does not exceed the observational metrics anywhere "
                                 "on this run. "))
    tested = control[control.cohens_dz.notna()]
    dual = tested[tested.sig_dual_bonf.astype(bool)]
    unc = tested[tested.p_t < alpha]
    n_rev = int((dual.cohens_dz < 0).sum())
    s += (f"Of the {len(control)} control cells, {len(dual)} pass{'es' if len(dual) == 1 else ''} the dual-test rule "
          f"under Bonferroni within their model"
          + (f" ({n_rev} of them {'a reversal' if n_rev == 1 else 'reversals'}, d_z < 0)" if n_rev else "")
          + f", and {len(unc)} reach{'es' if len(unc) == 1 else ''} uncorrected p_t < {alpha:g} "
          f"({int((unc.cohens_dz > 0).sum())} with d_z > 0, {plural(int((unc.cohens_dz < 0).sum()), 'reversal')})")
    if len(tested):
        s += (f"; chance alone would give about {alpha * len(tested):.2g} of {len(tested)}, and {len(unc)} or more "
              f"arise by chance with probability {binomial_excess(len(unc), len(tested), alpha):.2g} (one-sided "
              "binomial; the cells of a model share positions, so this is indicative)")
    return s + "."


def control_summary_text(t: pd.DataFrame, *, alpha: float) -> str:
    """One model's control cells (rows of the control table, one per layer) as a paragraph: d_z by
    layer, the largest positive one (the direction a working control predicts) and any reversal
    (d_z < 0: the top-weighted expert's removal costs less) named as such, and which layers pass
    Bonferroni on both tests, on one alone, with reversals marked. A layer that could not be tested
    (NaN d_z) reads "not tested" and passes nothing."""
    t = t.sort_values("layer")
    flags = t[["sig_dual_bonf", "sig_t_bonf", "sig_W_bonf"]].fillna(False).astype(bool)
    dual = t[flags.sig_dual_bonf]
    t_only, w_only = t[flags.sig_t_bonf & ~flags.sig_dual_bonf], t[flags.sig_W_bonf & ~flags.sig_t_bonf]
    seq = ", ".join(f"L{r.layer}: {fmt_signed(r.cohens_dz) if pd.notna(r.cohens_dz) else 'not tested'}"
                    for r in t.itertuples())
    s = f"**{t.model.iloc[0]}.** d_z by layer: {seq}. "
    cell = lambda r: (f"layer {int(r.layer)} (d_z = {fmt_signed(r.cohens_dz)}, 95% CI "  # noqa: E731
                      f"[{fmt_signed(r.dz_ci_low)}, {fmt_signed(r.dz_ci_high)}], p_t = {r.p_t:.3g}, p_W = {r.p_W:.3g})")
    pos, neg = t[t.cohens_dz > 0], t[t.cohens_dz < 0]
    if t.cohens_dz.notna().any():
        if len(pos):
            s += f"The largest positive d_z is at {cell(pos.loc[pos.cohens_dz.idxmax()])}. "
        else:
            s += "No layer has a positive d_z. "
        if len(neg) and neg.cohens_dz.abs().max() > (pos.cohens_dz.max() if len(pos) else 0):
            s += (f"The largest in magnitude is a reversal, at {cell(neg.loc[neg.cohens_dz.idxmin()])}: there removing "
                  "the router's top expert costs *less* than removing its bottom one. ")
    else:
        s += "No layer could be tested. "
    mark = lambda rows: join_words(f"L{r.layer}" + (" [a reversal]" if r.cohens_dz < 0 else "")  # noqa: E731
                                   for r in rows.itertuples())
    if len(dual):
        s += (f"{len(dual)} of {len(t)} layers pass{'es' if len(dual) == 1 else ''} Bonferroni under the dual-test rule "
              f"({mark(dual)}). ")
    else:
        s += f"No layer passes Bonferroni under the dual-test rule (α_adj = {alpha / len(t):.3g}). "
    for sub, what, why in ((t_only, "on the t-test alone but not on Wilcoxon", "a disagreement the paper's audit rule "
                            "counts as noise"), (w_only, "on the Wilcoxon test alone but not on the t-test",
                                                 "which the rule also sets aside")):
        if len(sub):
            s += (f"{'One layer passes' if len(sub) == 1 else f'{len(sub)} layers pass'} {what} "
                  f"({mark(sub)}): {why}. ")
    return s


def control_verdict_text(control: pd.DataFrame, *, alpha: float) -> str:
    """The control's verdict under the paper's dual-test rule at each model's own Bonferroni level
    (the control family: one model's control cells), as one paragraph: the passing cells named with
    their d_z, a passing cell with d_z < 0 named as a reversal (the rule counts it, but it is not
    evidence that the router's weight predicts importance), and the count per model. ``control``: an
    :func:`moeaudit.stats.audit_table` of the control cells with ``family=("model",)``."""
    t = control.assign(_dual=control.sig_dual_bonf.fillna(False).astype(bool))
    dual = t[t._dual]
    pos, rev = dual[dual.cohens_dz > 0], dual[dual.cohens_dz < 0]
    per_model = "; ".join(f"{m} {int(g._dual.sum())} of {len(g)} (α = {alpha:g}/{len(g)} = {alpha / len(g):.3g})"
                          for m, g in t.groupby("model", sort=False))
    if dual.empty:
        head = ("**No control cell passes** the paper's rule (t and Wilcoxon tests both significant after Bonferroni, "
                "same sign): the router's own weight is not shown to predict which active expert matters more at a token")
    else:
        head = (f"**{plural(len(pos), 'control cell')} pass{'es' if len(pos) == 1 else ''}** the paper's rule with "
                "d_z > 0 (t and Wilcoxon tests both significant after Bonferroni, same sign)"
                + (": " + join_words(f"{r.model} layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)})"
                                     for r in pos.itertuples()) if len(pos) else "")
                + (f"; {plural(len(rev), 'cell')} pass{'es' if len(rev) == 1 else ''} it as "
                   f"{'a reversal' if len(rev) == 1 else 'reversals'} (d_z < 0: the top expert's removal costs less), "
                   + join_words(f"{r.model} layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)})" for r in rev.itertuples())
                   if len(rev) else ""))
    return f"{head}. Per model: {per_model}." + _control_nulls_text(t)


def _control_nulls_text(t: pd.DataFrame) -> str:
    """What the control's own non-passing cells can say (``t``: the control table with ``n``,
    ``alpha_corrected``, ``tost_bound_d``, ``equivalent``, ``mde_dz``, ``power``): whether TOST at the
    bound can pass at the control's level for any data (:func:`moeaudit.stats.tost_min_p`), how many
    cells it shows within ±bound, and the smallest |d_z| the t-test detects there. ``""`` when the
    table lacks those columns or no cell was tested."""

    need = {"n", "alpha_corrected", "tost_bound_d", "equivalent", "mde_dz", "power"}
    tested = t[t.cohens_dz.notna()] if need <= set(t.columns) else t.iloc[:0]
    if tested.empty:
        return ""
    bound = float(tested.tost_bound_d.iloc[0])
    can = np.array([tost_min_p(int(r.n), bound_d=bound) < r.alpha_corrected for r in tested.itertuples()])
    eq = tested[tested.equivalent.fillna(False).astype(bool)]
    levels = sorted({f"{a:.3g}" for a in tested.alpha_corrected})
    at = f"the control's level {levels[0]}" if len(levels) == 1 else f"each model's control level ({', '.join(levels)})"
    mde = tested.mde_dz
    detect = (f"the t-test there detects |d_z| ≥ {mde.min():.3f}" if mde.max() - mde.min() < 5e-4 else
              f"the t-test there detects |d_z| from {mde.min():.3f} to {mde.max():.3f} or more") \
        + f" with {float(tested.power.iloc[0]):.0%} power"
    if not can.any():
        return (f" A control cell that does not pass is not shown to be small: TOST at |d_z| < {bound:g} cannot pass at "
                f"{at} for any data, and {detect}.")
    return (f" A control cell that does not pass is not thereby shown to be small: TOST at |d_z| < {bound:g} can pass at "
            f"{at}" + ("" if can.all() else f" in {int(can.sum())} of the {len(tested)} cells") + f", and it shows "
            + (f"{len(eq)} of the {len(tested)} tested control cells within ±{bound:g} ("
               + join_words(f"{r.model} layer {r.layer}" for r in eq.itertuples()) + ")" if len(eq) else
               f"none of the {len(tested)} tested control cells within ±{bound:g}")
            + f"; {detect}.")


def control_reading_text(control: pd.DataFrame, observational: pd.DataFrame | None = None, *,
                         power: float = 0.8, rho_ci: float = 0.95) -> str:
    """Whether this run's control separates the two readings of the audit's null, model by model
    (chapter 5), and which Spearman intervals (``rho``, ``rho_ci_low``, ``rho_ci_high``) exclude zero.

    ``control``: the control table (:func:`moeaudit.stats.audit_table`, family = one model's control
    cells, with ``n``, ``p_t``, ``p_W``, ``same_sign``, ``alpha_corrected``, ``sig_dual_bonf``).
    ``observational``: the audit's table of the same models (its ``alpha_corrected`` is the audit's
    per-cell Bonferroni level, e.g. 0.05/20). Each model's null is read against that model's own
    control, at the audit's level: a control cell counts only with d_z > 0 and both tests below the
    audit's level, and the power of the audit's t-test against the control's observed d_z
    (:func:`moeaudit.stats.t_test_power`) is stated with it. A model whose control passes nowhere
    (at its own level) leaves its null uninterpretable; one whose control passes only at the
    control's looser level does not show that the audit can detect an effect of that size; there the
    test that fails at the audit's level is named per layer. A model's null is read only to the extent
    of the audit's power (never as equivalence): with a ``tost_bound_d`` column (of ``observational``,
    else ``control``) it also says whether TOST at that bound could pass at the audit's level at all
    (:func:`moeaudit.stats.tost_min_p`). A Spearman interval is said to exclude zero only when it does at the displayed precision
    (:func:`zero_relation`); one whose bound rounds to zero is said to touch zero. The count of
    intervals that exclude zero is tested against the number that chance gives at their level
    ``rho_ci`` (:func:`moeaudit.stats.binomial_excess`). Without ``observational`` the audit level is
    the control's own.
    """

    def failing(r, level) -> str:  # which test keeps a control cell from passing at ``level``
        t_ok, w_ok = r.p_t < level, r.p_W < level
        if t_ok and w_ok:
            return f"at layer {r.layer} both tests pass but point in opposite directions"
        if t_ok:
            return (f"at layer {r.layer} the t-test passes (p_t = {r.p_t:.2g}) but the Wilcoxon test does not "
                    f"(p_W = {r.p_W:.2g}, not below {level:.3g})")
        if w_ok:
            return (f"at layer {r.layer} the Wilcoxon test passes (p_W = {r.p_W:.2g}) but the t-test does not "
                    f"(p_t = {r.p_t:.2g}, not below {level:.3g})")
        return f"at layer {r.layer} neither test does (p_t = {r.p_t:.2g}, p_W = {r.p_W:.2g})"

    paras = []
    for model, t in control.groupby("model", sort=False):
        t = t.sort_values("layer")
        own = float(t.alpha_corrected.iloc[0])
        if observational is not None and (observational.model == model).any():
            level = float(observational[observational.model == model].alpha_corrected.iloc[0])
            fam = int(observational[observational.model == model].family_size.iloc[0]) \
                if "family_size" in observational else None
        else:
            level, fam = own, None
        lvl = f"the audit's per-cell level {level:.3g}" + (f" (Bonferroni over its {fam} cells of this model)" if fam else "")
        ok_own = t[t.sig_dual_bonf.fillna(False).astype(bool) & (t.cohens_dz > 0)]
        same = t.same_sign.fillna(False).astype(bool) if "same_sign" in t else pd.Series(True, index=t.index)
        ok_audit = t[(t.p_t < level) & (t.p_W < level) & same & (t.cohens_dz > 0)]
        n = int(t.n.max())
        mde = min_detectable_dz(n, alpha=level, power=power)
        pw = lambda r: t_test_power(float(r.cohens_dz), int(r.n), alpha=level)  # noqa: E731
        cells = lambda rows: join_words(  # noqa: E731
            f"layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)}, p_t = {r.p_t:.2g}, p_W = {r.p_W:.2g}; power of the "
            f"audit's t-test at that d_z: {pw(r):.0%})" for r in rows.itertuples())
        head = f"**{model}.** "
        src = observational[observational.model == model] if observational is not None and \
            (observational.model == model).any() else t
        bound = float(src.tost_bound_d.iloc[0]) if "tost_bound_d" in src.columns else None
        if bound is None:
            small = ""
        elif tost_min_p(n, bound_d=bound) < level:
            small = f"; only a passing TOST at |d_z| < {bound:g} shows an effect to be small"
        else:
            small = (f", and it cannot show any effect to be small (TOST at |d_z| < {bound:g} cannot pass at that "
                     f"level for any data: its smallest attainable p at n = {n} is {tost_min_p(n, bound_d=bound):.3g})")
        if ok_own.empty:
            paras.append(head + f"No control cell passes the dual rule with d_z > 0 even at the control's own level "
                         f"({own:.3g}): the control fails on this model, so by this page's logic the audit's null for "
                         f"{model} cannot be read either way — it does not separate \"the metrics carry no information\" "
                         "from \"the audit is too weak to see it\".")
        elif ok_audit.empty:
            paras.append(head + f"The control passes at its own level ({own:.3g}) at {cells(ok_own)}. At {lvl}, at "
                         "which the observational cells were tested, it passes at no layer: "
                         + "; ".join(failing(r, level) for r in ok_own.itertuples()) + ". "
                         "The audit's t-test would detect an observational effect of the control's size with the power "
                         "given (its dual rule, which also needs the Wilcoxon test, less often), but the control does not "
                         f"show that the audit detects effects of its size. The null for {model} would miss an effect of "
                         f"|d_z| ≥ {mde:.3f} with probability at most {1 - power:.0%} ({power:.0%} power at n = {n} and "
                         f"that level){small}.")
        else:
            strong = ok_audit[[pw(r) >= power for r in ok_audit.itertuples()]]
            paras.append(head + f"The control passes even at {lvl} at {cells(ok_audit)}. "
                         + (f"There the audit's null is evidence against observational effects as large as the "
                            f"control's ({join_words(f'layer {r.layer}' for r in strong.itertuples())}, power ≥ "
                            f"{power:.0%}), to the extent of that power; " if len(strong) else
                            f"Its power against the control's d_z is below {power:.0%}, so the audit's null there is "
                            "weak evidence even against effects of that size; ")
                         + f"against smaller effects it is weaker still, and against effects near zero it is no evidence "
                         f"at all (minimum detectable |d_z| {mde:.3f} at {power:.0%} power). The null is not "
                         f"equivalence{small}.")
    tested = control[control.rho_ci_low.notna() & control.rho_ci_high.notna()]
    rel = pd.Series([zero_relation(a, b) for a, b in zip(tested.rho_ci_low, tested.rho_ci_high)], index=tested.index,
                    dtype=object)
    ex, touch = tested[rel.isin(["above", "below"])], tested[rel == "touches"]
    fmt_rho = lambda r: (f"{r.model} layer {r.layer} (ρ = {fmt_signed(r.rho)}, "  # noqa: E731
                         f"[{fmt_bound(r.rho_ci_low)}, {fmt_bound(r.rho_ci_high)}])")
    if ex.empty:
        s = f"No Spearman interval of the {len(control)} cells excludes zero"
    else:
        s = (f"The Spearman interval excludes zero at {plural(len(ex), 'cell')} of {len(control)}: "
             + "; ".join(fmt_rho(r) for r in ex.itertuples()))
    if len(touch):
        s += (f"; {'the interval' if len(touch) == 1 else 'the intervals'} of "
              + "; ".join(fmt_rho(r) for r in touch.itertuples())
              + f" touch{'es' if len(touch) == 1 else ''} zero (a bound that rounds to zero at three decimals, well "
                "within the bootstrap's own resampling error), so it is not counted as excluding zero")
    if len(tested):
        s += (f". With {len(tested)} uncorrected {rho_ci:.0%} intervals, about {(1 - rho_ci) * len(tested):.2g} would "
              f"exclude zero by chance alone; {len(ex)} or more do so with probability "
              f"{binomial_excess(len(ex), len(tested), 1 - rho_ci):.2g} (one-sided binomial; indicative, since a "
              "model's cells share positions)")
    paras.append(s + ".")
    return "\n\n".join(paras)


def paper_control_notes(pv: pd.DataFrame | None = None, *, alpha: float | None = None) -> dict[str, str]:
    """What the paper's Table 4 (OLMoE control) and its text do with the significance rule, as sentences.

    ``pv``: :func:`moeaudit.released.paper_printed_values` (default: loaded); ``alpha``: the paper's
    family-wise level (default :data:`moeaudit.released.PAPER_ALPHA`), Bonferroni over the table's
    layers. Returns ``{"rule": ..., "trend": ..., "intro": ...}``: ``rule`` compares the layers that pass on
    p_t, on both tests and the bold layers of Table 4; ``trend`` says whether its d rise monotonically with
    depth; ``intro`` (a clause, for the introduction) says in how many models and layers of Tables 4–6 the
    control passes the t-test alone at each table's Bonferroni level, and whether it passes the dual rule.
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
    intro = _paper_control_intro(pv, alpha)
    return {"rule": rule, "trend": trend, "intro": intro}


def _paper_control_intro(pv: pd.DataFrame, alpha: float) -> str:
    """Where the paper's control (Tables 4–6, Bonferroni over each table's layers) passes the t-test
    and whether its Wilcoxon test does too, as a clause: the control against the dual rule."""
    from .released import MODELS  # noqa: PLC0415

    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    t_only, dual = [], []
    for (table, model), g in pv[pv.table.isin([4, 5, 6])].groupby(["table", "model"], sort=True):
        v = g.pivot_table(index="layer", columns="quantity", values="value")
        printed = g.set_index(["layer", "quantity"]).printed
        a_adj = alpha / len(v)
        for L in v.index[v.p_t < a_adj]:
            cell = (MODELS.get(model, model), L, printed[(L, "p_t")], printed[(L, "p_W")], a_adj)
            (dual if v.p_W[L] < a_adj else t_only).append(cell)
    say = lambda k, w: f"{words.get(k, k)} {w}{'s' if k != 1 else ''}"  # noqa: E731
    where = lambda cells: join_words(f"{m} layer {L}" for m, L, *_ in cells)  # noqa: E731
    out = []
    if t_only:
        models = {c[0] for c in t_only}
        out.append(f"the router's own weight for the token at hand passes Bonferroni (α_adj = {t_only[0][4]:.3g}) on "
                   f"the t-test alone in {say(len(models), 'model')} at {say(len(t_only), 'layer')} ({where(t_only)}, "
                   + ", ".join(f"p_t = {c[2]}" for c in t_only)
                   + "); its Wilcoxon test there does not ("
                   + ", ".join(f"p_W = {c[3]}" for c in t_only)
                   + "), so it fails the dual rule the paper applies to the metrics")
    if dual:
        out.append(f"it passes the dual rule at {say(len(dual), 'layer')} ({where(dual)})")
    if not out:
        return "the router's own weight for the token at hand passes Bonferroni on the t-test at no layer"
    return "; ".join(out)


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


def zero_relation(lo: float, hi: float, *, digits: int = 3) -> str:
    """Where an interval ``[lo, hi]`` lies relative to zero, decided so that the words agree with the
    interval as displayed at ``digits`` decimals.

    ``"above"`` when ``lo > 0`` and ``lo`` does not round to zero at ``digits`` decimals; ``"below"``
    likewise for ``hi < 0``; ``"touches"`` when the unrounded interval excludes zero but its bound
    nearest zero rounds to zero (so "[+0.000, +0.271]" is never called excluding zero);
    ``"contains"`` when ``lo <= 0 <= hi``; ``"undefined"`` when a bound is NaN.
    ``ValueError`` when ``lo > hi`` or ``digits < 0``.
    """
    if digits < 0:
        raise ValueError(f"digits must be >= 0, got {digits}")
    if np.isnan(lo) or np.isnan(hi):
        return "undefined"
    if lo > hi:
        raise ValueError(f"lo ({lo}) exceeds hi ({hi})")
    if lo > 0:
        return "above" if round(lo, digits) > 0 else "touches"
    if hi < 0:
        return "below" if round(hi, digits) < 0 else "touches"
    return "contains"


def fmt_bound(v: float, *, digits: int = 3) -> str:
    """A signed interval bound at ``digits`` decimals, or with two significant digits where it would
    round to zero (``+0.00031`` instead of ``+0.000``), so that a bound that excludes zero shows it."""
    if v != 0 and round(v, digits) == 0:
        return f"{v:+.2g}"
    return f"{0.0 if round(v, digits) == 0 else v:+.{digits}f}"


def buffer_readings(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, *,
                    threshold: float) -> pd.DataFrame:
    """What each layer's progressive-ablation result supports, one row per (model, layer).

    ``breaks``: :func:`redundancy_breaks`; ``deepest``: :func:`removal_direction` (with
    ``mean_low``/``mean_high``, the interval of the mean at the Bonferroni level ``alpha_sign``, and
    the sign test ``p_sign``/``direction``); ``calls``: :func:`threshold_calls` (same threshold as
    ``breaks``); ``threshold`` (nats) the one ``breaks`` used. Returns ``model``, ``layer``, ``share_below_zero``, ``p_sign``, ``alpha_sign``,
    ``direction``, ``detectable_share``, ``mean``, ``mean_low``, ``mean_high``, ``call``,
    ``ci_low``/``ci_high`` (the uncorrected interval of :func:`threshold_calls`) and ``reading``.

    One definition of a buffer applies to every layer: the deepest removal raises the *mean* loss
    (its interval at the Bonferroni level lies above zero, as displayed at three decimals,
    :func:`zero_relation`), but by less than the threshold (the same interval lies below it), and
    the mean crosses the threshold at no k. Readings:

    - ``"crosses"``: the mean crosses the threshold at some k (``first_k_above`` set);
    - ``"buffer"``: as defined above;
    - ``"raises, undecided"``: the mean is raised, but its interval contains the threshold;
    - ``"lowers"``: the interval of the mean lies below zero;
    - ``"no direction"``: it contains zero: the mean change is not distinguishable from zero, so a
      small mean is no evidence of a buffer.

    The sign test (the median sense) is reported beside the reading and does not decide it.
    """
    if "mean_low" not in deepest:
        raise ValueError("deepest needs mean_low/mean_high: pass a removal_direction result")
    b = breaks[["model", "layer", "first_k_above"]]
    d = deepest[["model", "layer", "share_below_zero", "p_sign", "alpha_sign", "direction", "detectable_share",
                 "mean", "mean_low", "mean_high"]]
    out = b.merge(d, on=["model", "layer"], how="inner").merge(calls[["model", "layer", "call", "ci_low", "ci_high"]],
                                                              on=["model", "layer"], how="left")
    rel = np.array([zero_relation(lo, hi) for lo, hi in zip(out.mean_low, out.mean_high)])
    out["reading"] = np.where(out.first_k_above.notna(), "crosses", np.where(
        rel == "below", "lowers", np.where(rel != "above", "no direction", np.where(
            out.mean_high < threshold, "buffer", "raises, undecided"))))
    return out.drop(columns="first_k_above")


def _pct_span(shares) -> str:
    lo, hi = f"{min(shares):.0%}", f"{max(shares):.0%}"
    return lo if lo == hi else f"{lo[:-1]}–{hi}"


def _layers(rows: pd.DataFrame) -> str:
    return f"layer{'s' if len(rows) > 1 else ''} {join_words(rows.layer)}"


def _p_equals(ps) -> str:
    """``"p = 0.0014"`` for one p-value, ``"p = 0.0014, 0.003 and 0.02"`` for several (two significant digits)."""
    return "p = " + join_words(f"{p:.2g}" for p in ps)


def _mean_intervals(rows: pd.DataFrame) -> str:
    return "; ".join(f"L{r.layer}: {fmt_signed(r.mean)} [{fmt_bound(r.mean_low)}, {fmt_bound(r.mean_high)}]"
                     for r in rows.itertuples()) + " nats"


def _median_clause(rows: pd.DataFrame) -> str:
    """The sign test (median sense) of ``rows`` in words, with its power where it is not significant."""
    sig = rows[rows.direction != "undistinguished"]
    flat = rows[rows.direction == "undistinguished"]
    parts = []
    for what, g in sig.groupby("direction", sort=False):
        parts.append(f"the loss {'rose' if what == 'raises' else 'fell'} at more than half of the positions at "
                     f"{_layers(g)} (it fell at {_pct_span(g.share_below_zero)}; sign test {_p_equals(g.p_sign)})")
    if len(flat):
        q = flat.detectable_share.max()
        parts.append(f"at {_layers(flat)} the share of positions where the loss fell ({_pct_span(flat.share_below_zero)}) "
                     f"is not distinguishable from one half (sign test {_p_equals(flat.p_sign)})"
                     + (f", a weak test here: it detects a share of rises of {q:.0%} with 80% power" if np.isfinite(q) else ""))
    return "; ".join(parts)


def buffer_phrase(readings: pd.DataFrame, *, threshold: float) -> str:
    """The layers that do not cross ``threshold`` (a :func:`buffer_readings` result, one model), by what
    they support, as clauses joined by semicolons; ``""`` when every layer crosses. Each clause quotes
    the mean at the deepest removal with its interval at the Bonferroni level, and the sign test of
    the share of positions where the loss fell (the median sense), with its power where it is not
    significant."""
    r = readings[readings.reading != "crosses"]
    if r.empty:
        return ""
    level = f"{100 * (1 - r.alpha_sign.iloc[0]):.2f}".rstrip("0").rstrip(".") + "%"
    parts = []
    buf = r[r.reading == "buffer"]
    if len(buf):
        parts.append(f"{_layers(buf)} keep{'s' if len(buf) == 1 else ''} a buffer by this threshold: the deepest "
                     f"removal raises the mean loss, but by less than {threshold:g} nats ({_mean_intervals(buf)}; "
                     f"{level} intervals, Bonferroni over the model's layers, above zero and below the threshold)")
    und = r[r.reading == "raises, undecided"]
    if len(und):
        parts.append(f"at {_layers(und)} the deepest removal raises the mean loss ({_mean_intervals(und)}), but the "
                     f"{level} interval contains {threshold:g} nats, so a buffer by this threshold is not shown")
    nod = r[r.reading == "no direction"]
    if len(nod):
        parts.append(f"at {_layers(nod)} the {level} interval of the mean contains zero ({_mean_intervals(nod)}): "
                     "the mean change is not distinguishable from zero, so staying below the threshold there is no "
                     "evidence of a buffer")
    low = r[r.reading == "lowers"]
    if len(low):
        parts.append(f"at {_layers(low)} the deepest removal *lowers* the mean loss ({_mean_intervals(low)}): these "
                     "experts' removal improves the prediction on average, which is not a buffer")
    med = _median_clause(r)
    return "; ".join(parts) + (f". In the median sense, {med}" if med else "")


def cliff_text(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, *, threshold: float,
               alpha: float = 0.05) -> str:
    """One model's progressive-ablation result as a paragraph (chapter 6): the deepest-removal means,
    the layers whose mean crosses ``threshold``, the interval calls at the deepest k
    (:func:`threshold_calls`), what the other layers support (:func:`buffer_phrase`: a buffer only
    where the removal raises the loss), the largest step and the shape of the widest distribution.
    All three tables restricted to one model; ``deepest`` a :func:`deepest_removal_summary` or
    :func:`removal_direction` result (the sign tests use ``alpha`` when it lacks ``direction``)."""
    if "direction" not in deepest:
        deepest = removal_direction(deepest, alpha=alpha)
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
    phrase = buffer_phrase(buffer_readings(breaks, deepest.reset_index(), calls, threshold=threshold),
                           threshold=threshold)
    if phrase:
        s += f" Of the layers whose mean stays below {threshold:g} nats, " + phrase + "."
    return s + (f" The largest single step is at layer {steepest.layer}, k = {steepest.largest_step_k} "
                f"({fmt_signed(steepest.largest_step)} nats). At k = {kmax} the median lies between "
                f"{fmt_signed(d['median'].min())} and {fmt_signed(d['median'].max())} nats across layers; the widest "
                f"upper tail is at layer {tail.name}, where the distribution is {shape_phrase(tail)}, and the positions "
                f"above the 95th percentile contribute {tail.top5_share:.0%} of the summed increase.")


def progressive_overview_text(readings: pd.DataFrame, breaks: pd.DataFrame, *, threshold: float) -> str:
    """The progressive-ablation result over all models in a few sentences (chapter 6, "Shows").

    ``readings``: :func:`buffer_readings` (every model); ``breaks``: :func:`redundancy_breaks`. States
    the range of the deepest-removal means and how many layers cross ``threshold``; at how many the
    interval of the mean at the Bonferroni level lies above zero, below it or contains it; at which
    layers a buffer (:func:`buffer_readings`: mean raised, by less than ``threshold``) is shown; and,
    in the median sense, at how many the sign test finds more rises or falls, its power where it
    does not, and the layers whose mean is raised although their median shift is not significant.
    Whether any layer is in the regime the paper's explanation needs (removals that raise the loss,
    but little) follows from the buffer count alone.
    """
    n = len(readings)
    n_cross = int(breaks.first_k_above.notna().sum())
    rel = np.array([zero_relation(lo, hi) for lo, hi in zip(readings.mean_low, readings.mean_high)])
    up, down = int((rel == "above").sum()), int((rel == "below").sum())
    s = (f"the mean loss change at the deepest removal ranges from {fmt_signed(breaks.mean_deepest.min())} to "
         f"{fmt_signed(breaks.mean_deepest.max())} nats over {n} audited layers, and "
         + (f"no layer crosses {threshold:g} nats. " if n_cross == 0 else
            f"{n_cross} of them cross{'es' if n_cross == 1 else ''} {threshold:g} nats. ")
         + f"The interval of the mean at the Bonferroni level over each model's layers lies above zero at {up} of the "
           f"{n} layers" + (f", below zero at {down}" if down else "")
         + f" and contains zero at {n - up - down}. ")
    buf = readings[readings.reading == "buffer"]
    if len(buf):
        s += (f"A buffer (the deepest removal raises the mean loss, but by less than {threshold:g} nats, both beyond "
              f"that interval) is shown at {len(buf)} of the {n} layers ("
              + "; ".join(f"{m}: {join_words(g.layer)}" for m, g in buf.groupby("model", sort=False))
              + f"); only {'that layer is' if len(buf) == 1 else 'those are'} shown to be in the regime the paper uses to "
                "explain why observational pruning criteria \"work\" without identifying dispensable experts. ")
    else:
        s += ("A buffer (the deepest removal raises the mean loss, but by less than the threshold, both beyond that "
              "interval) is shown at no layer, so no layer of this run is shown to be in the regime the paper uses to "
              "explain why observational pruning criteria \"work\" without identifying dispensable experts. ")
    raises = int((readings.direction == "raises").sum())
    lowers = int((readings.direction == "lowers").sum())
    flat = readings[readings.direction == "undistinguished"]
    s += (f"In the median sense, the deepest removal raises the loss at more than half of the positions (two-sided "
          f"sign test, same level) at {raises} of the {n} layers" + (f" and lowers it at {lowers}" if lowers else ""))
    if len(flat):
        q = flat.detectable_share.max()
        s += (f"; at {len(flat)} the share of positions where the loss fell ({_pct_span(flat.share_below_zero)}) is not "
              "distinguishable from one half"
              + (f", but the test is weak: with these positions it needs about {q:.0%} of them to rise for 80% power"
                 if np.isfinite(q) else ""))
        raised = flat[[zero_relation(lo, hi) == "above" for lo, hi in zip(flat.mean_low, flat.mean_high)]]
        if len(raised):
            s += ("; of these, " + join_words(f"{r.model} layer {r.layer}" for r in raised.itertuples())
                  + f" {'raises' if len(raised) == 1 else 'raise'} the mean loss nevertheless ("
                  + join_words(f"{fmt_signed(r.mean)} nats, sign test p = {r.p_sign:.2g}" for r in raised.itertuples())
                  + "): there a minority of positions with large increases carries the mean, and the median shift is "
                    "not significant at the Bonferroni level")
    return s + "."


def paper_share_positive_text(rel: pd.DataFrame, *, alpha: float = 0.05) -> str:
    """The released progressive-ablation summary's share of positions whose loss rose, per layer, with
    a sign test against one half (chapter 6).

    ``rel``: :func:`moeaudit.released.progressive_ablation` rows of one ``k`` (``layer``,
    ``share_positive``, ``n``). The summary gives only the share that rose, so every other position
    is counted as a fall: positions with no change at all would make the true test *more* favourable
    to a rise, so a rise called distinguishable here is distinguishable, while a share called not
    distinguishable could become so if many positions did not change. Two-sided sign test
    (:func:`moeaudit.stats.sign_test`) at the Bonferroni level ``alpha / len(rel)``.
    """

    n_up = [int(round(sh * n)) for sh, n in zip(rel.share_positive, rel.n)]
    p = [sign_test(u, int(n) - u) for u, n in zip(n_up, rel.n)]
    level = alpha / len(rel)
    up = [L for L, sh, q in zip(rel.layer, rel.share_positive, p) if q < level and sh > 0.5]
    down = [L for L, sh, q in zip(rel.layer, rel.share_positive, p) if q < level and sh < 0.5]
    flat = [L for L, q in zip(rel.layer, p) if not q < level]
    s = (join_words(f"layer {L} {sh:.0%} (sign test p = {q:.2g})" for L, sh, q in zip(rel.layer, rel.share_positive, p))
         + f" (n = {int(rel.n.min())} positions per layer; a position whose loss did not rise is counted as a fall). "
         f"At the Bonferroni level {alpha:g}/{len(rel)} = {level:.3g}, ")
    parts = []
    if up:
        parts.append(f"the loss rose at more than half of the positions at layer{'s' if len(up) > 1 else ''} {join_words(up)}")
    if down:
        parts.append(f"it fell at more than half at layer{'s' if len(down) > 1 else ''} {join_words(down)}")
    if flat:
        parts.append(f"at layer{'s' if len(flat) > 1 else ''} {join_words(flat)} the share is not distinguishable from "
                     "one half (unless many positions did not change at all, which the summary does not say): there the "
                     "paper's own numbers do not show the removal raising the loss at most positions")
    return s + "; ".join(parts) + "."


def _crossing(crossed, last, threshold: float) -> str:
    if not crossed:
        return f"no layer crosses {threshold:g} nats"
    if list(crossed) == [last]:
        return f"only the last audited layer ({last}) crosses {threshold:g} nats"
    return f"layer{'s' if len(crossed) > 1 else ''} {join_words(crossed)} cross{'' if len(crossed) > 1 else 'es'} {threshold:g} nats"


def cliff_comparison_text(breaks: pd.DataFrame, deepest: pd.DataFrame, calls: pd.DataFrame, paper_breaks: pd.DataFrame,
                          *, last: int, threshold: float, alpha: float = 0.05) -> str:
    """One bullet comparing one model's crossings of ``threshold`` with the paper's Table 8
    (``paper_breaks``: :func:`redundancy_breaks` of :func:`paper_progressive_table`), what the layers
    below the threshold support (:func:`buffer_phrase`), where the largest deepest-removal mean lies,
    and the shape of the damage there (:func:`shape_phrase`). ``deepest`` as in :func:`cliff_text`."""
    if "direction" not in deepest:
        deepest = removal_direction(deepest, alpha=alpha)
    b, d = breaks.set_index("layer"), deepest.set_index("layer")
    crossed = list(b.index[b.first_k_above.notna()])
    p_crossed = list(paper_breaks.layer[paper_breaks.first_k_above.notna()])
    p_last = int(paper_breaks.layer.max())
    same = (not crossed and not p_crossed) or (crossed == [last] and p_crossed == [p_last])
    shape = _crossing(crossed, last, threshold)
    undecided = calls[calls.call == "undecided"]
    shape += (f" (the interval of the mean at the deepest removal contains {threshold:g} nats at layer"
              f"{'s' if len(undecided) > 1 else ''} {join_words(undecided.layer)})" if len(undecided) else "")
    phrase = buffer_phrase(buffer_readings(breaks, deepest.reset_index(), calls, threshold=threshold),
                           threshold=threshold)
    shape += f"; {phrase}" if phrase else ""
    shape += ("; as in the paper's Table 8" if same else "; in the paper's Table 8, "
              + _crossing(p_crossed, p_last, threshold))
    worst = b.mean_deepest.idxmax()
    where = ("the largest mean change at the deepest removal is at the last audited layer" if worst == last else
             f"the largest mean change at the deepest removal is at layer {worst}, not the last")
    return f"- **{b.model.iloc[0]}**: {shape}; {where}, and there the damage is {shape_phrase(d.loc[worst])}."
