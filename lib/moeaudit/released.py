"""The authors' released result files, read into tidy DataFrames.

The paper's authors released their result files (JSON and CSV) in the repository
``callmeloui/observational_metrics`` at commit :data:`RELEASED_COMMIT`. This module finds a
local copy (``<data_dir>/paper-released/``, same relative paths as in that repository; the
data directory is the ``data_dir`` argument or ``$MOEAUDIT_DATA_DIR``), or else downloads
the files it needs from that exact commit into a per-user cache
(``$MOEAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/moeaudit``, else ``~/.cache/moeaudit``),
never into this repository.

Model keys are ``"olmoe"``, ``"qwen"`` and ``"deepseek"`` (see :data:`moeaudit.paper.MODELS`);
metric keys are the ones used in the released files (see :data:`moeaudit.paper.PAPER_METRIC_LABELS`).
In every comparison table ``delta_high`` is the loss change from ablating the expert ranked highest
by the criterion and ``delta_low`` the one ranked lowest, both in nats. The numbers printed in the
paper are in :mod:`moeaudit.paper`. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

from . import paths
from .derived import read_derived, sha256, write_derived
from .paper import LAYERS, MODELS, PAPER_METRIC_LABELS
from .report import admonition, text_html
from .stats import correct_family

RELEASED_REPO = "callmeloui/observational_metrics"
RELEASED_COMMIT = "18bd31b5d09150e7f4286f1cd4a8b5a1a329b301"
RELEASED_URL = f"https://raw.githubusercontent.com/{RELEASED_REPO}/{RELEASED_COMMIT}/"
CACHE_DIR_ENV = paths.CACHE_DIR_ENV


_METRIC_FILE = {
    "olmoe": "olmoe/olmoe_per_token_ablation/layer_{layer:02d}_results.json",
    "deepseek": "deepseek/layer_{layer:02d}_results.json",
}
_DEEPSEEK_CONTROL = "deepseek/routing_weight_control_all_layers_full_deepseek.json"
_QWEN_METRIC = "qwen/per_token_ablation_results.json"
_QWEN_CONTROL = "qwen/routing_weight_control.json"
_PROGRESSIVE = "olmoe/olmoe_progressive_ablation_results/progressive_ablation_summary.csv"
_OLMOE_REDIST = "olmoe/olmoe_redistribution/redistribution_v2_layer{layer}_wikitext.json"
_QWEN_REDIST = "qwen/redistribution_layer{layer}_full.json"

#: every released file this module reads (relative to ``paper-released/``)
RELEASED_FILES: tuple[str, ...] = (
    *(_METRIC_FILE["olmoe"].format(layer=layer) for layer in LAYERS["olmoe"]),
    *(_METRIC_FILE["deepseek"].format(layer=layer) for layer in LAYERS["deepseek"]),
    _DEEPSEEK_CONTROL,
    _QWEN_METRIC,
    _QWEN_CONTROL,
    _PROGRESSIVE,
    *(_OLMOE_REDIST.format(layer=layer) for layer in range(16)),
    *(_QWEN_REDIST.format(layer=layer) for layer in LAYERS["qwen"]),
)

_urlopen = urllib.request.urlopen  # indirection so tests can simulate being offline


class ReleasedDataUnavailable(FileNotFoundError):
    """The released result files are neither available locally nor downloadable."""


# ----------------------------------------------------------------------------- locating


cache_dir = paths.cache_dir  # per-user cache for downloaded released files


class ReleasedFileMismatchWarning(UserWarning):
    """A cached released file does not have the sha256 recorded for it and is discarded."""


def _expectedsha256(relpath: str) -> str | None:
    """The sha256 of the authors' file ``relpath`` at the pinned commit, as shipped in the embedded
    table's provenance record (``None`` for a file it does not list)."""
    return embedded_provenance()["source_files"].get(relpath)


def _download(relpath: str, target: Path) -> None:
    """Fetch one released file into ``target``, only if its sha256 is the one recorded for it: a
    proxy's error page or a changed file served with status 200 raises ``OSError`` naming the file
    and nothing is written."""
    with _urlopen(RELEASED_URL + relpath, timeout=60) as response:
        payload = response.read()
    expected = _expectedsha256(relpath)
    got = hashlib.sha256(payload).hexdigest()
    if expected is not None and got != expected:
        raise OSError(f"{relpath} was downloaded with sha256 {got[:16]}..., not the recorded {expected[:16]}... "
                      f"(not the file of {RELEASED_REPO} at commit {RELEASED_COMMIT}); it was discarded")
    target.parent.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, target)


def released_dir(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The folder holding the released files.

    1. ``<data_dir>/paper-released`` where ``data_dir`` is the argument or
       ``$MOEAUDIT_DATA_DIR``, if that folder exists;
    2. otherwise ``cache_dir()/paper-released``, after downloading any of
       :data:`RELEASED_FILES` missing there from :data:`RELEASED_URL` (if ``download``). Cached and
       downloaded files are checked against the sha256 shipped in the embedded table's provenance:
       a cached file that differs is discarded (one :class:`ReleasedFileMismatchWarning` naming it)
       and fetched again; a download that differs is never written.

    Raises :class:`ReleasedDataUnavailable` with instructions when neither works.
    """
    root = paths.data_dir(data_dir)
    if root is not None and (root / "paper-released").is_dir():
        return root / "paper-released"
    cached = cache_dir() / "paper-released"
    for rel in RELEASED_FILES:  # a cached copy is used only if it is the authors' file
        path, expected = cached / rel, _expectedsha256(rel)
        if path.is_file() and expected is not None and sha256(path) != expected:
            warnings.warn(f"{path}: sha256 differs from the recorded one of {RELEASED_REPO} at commit "
                          f"{RELEASED_COMMIT}; the cached copy is discarded", ReleasedFileMismatchWarning, stacklevel=2)
            path.unlink()
    missing = [f for f in RELEASED_FILES if not (cached / f).is_file()]
    if not missing:
        return cached
    looked = (f"{root / 'paper-released'}" if root is not None
              else f"no data directory (neither data_dir nor ${paths.DATA_DIR_ENV} is set)")
    if download:
        try:
            for rel in missing:
                _download(rel, cached / rel)
            return cached
        except (OSError, urllib.error.URLError) as err:  # URLError is an OSError
            cause = getattr(err, "reason", err)  # urllib's URLError wraps the socket error
            cause = getattr(cause, "strerror", None) or str(cause)
            reason = f"downloading {len(missing)} file(s) from {RELEASED_URL} failed: {cause}"
    else:
        reason = f"{len(missing)} file(s) are missing there and download=False"
    raise ReleasedDataUnavailable(
        "The authors' released result files were not found. Looked in: " + looked
        + f"; then in the cache {cached}, where " + reason + ". To fix: set "
        f"${paths.DATA_DIR_ENV} to a folder that contains paper-released/ (the result files "
        f"of {RELEASED_REPO} at commit {RELEASED_COMMIT}, same relative paths), or pass "
        "data_dir=<that folder>; or run once with network access so the files can be "
        "downloaded into the cache."
    )


def _read_json(relpath: str, root: Path) -> dict:
    with open(Path(root) / relpath, encoding="utf-8") as fh:
        return json.load(fh)


def _check_model(model: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if model is None:
        return allowed
    if model not in allowed:
        raise ValueError(f"model must be one of {allowed} or None, got {model!r}")
    return (model,)


# ----------------------------------------------------------------------------- raw records


def _files_metric_comparisons(root: Path, *, model: str | None = None) -> pd.DataFrame:
    """Per-position records of the observational-metric audit (OLMoE and DeepSeek).

    One row per (model, layer, metric, sampled position); 200 positions per cell. Columns:
    ``model``, ``layer``, ``metric``, ``position`` (0-199, order in the file),
    ``global_token_idx``, ``sample_idx``, ``batch_idx``, ``seq_position`` (index in the
    padded sequence), ``num_active_experts``, ``expert_high``, ``expert_low`` (ids of the
    experts ranked highest/lowest by the metric among the active ones),
    ``metric_value_high``, ``metric_value_low``, ``baseline_loss``, ``loss_high``,
    ``loss_low``, ``delta_high``, ``delta_low`` and ``delta_diff_stored`` (the file's
    ``delta_difference``, = ``delta_high - delta_low``).
    """
    rows = []
    for m in _check_model(model, ("olmoe", "deepseek")):
        for layer in LAYERS[m]:
            payload = _read_json(_METRIC_FILE[m].format(layer=layer), root)
            if payload["layer_idx"] != layer:
                raise ValueError(f"{m} file for layer {layer} says layer {payload['layer_idx']}")
            for metric in PAPER_METRIC_LABELS:
                res = payload["metric_results"][metric]
                for i, c in enumerate(res["comparisons"]):
                    if len(c["top_k_experts"]) != 1 or len(c["bottom_k_experts"]) != 1:
                        raise ValueError("expected one high and one low expert per position")
                    rows.append({
                        "model": m, "layer": layer, "metric": metric, "position": i,
                        "global_token_idx": c["global_token_idx"],
                        "sample_idx": c["sample_idx"], "batch_idx": c["batch_idx"],
                        "seq_position": c["seq_position"],
                        "num_active_experts": c["num_active_experts"],
                        "expert_high": c["top_k_experts"][0],
                        "expert_low": c["bottom_k_experts"][0],
                        "metric_value_high": c["top_k_metric_values"][0],
                        "metric_value_low": c["bottom_k_metric_values"][0],
                        "baseline_loss": c["baseline_loss"],
                        "loss_high": c["high_ablated_loss"], "loss_low": c["low_ablated_loss"],
                        "delta_high": c["high_delta"], "delta_low": c["low_delta"],
                        "delta_diff_stored": c["delta_difference"],
                    })
    return pd.DataFrame(rows)


def _files_control_comparisons(root: Path) -> pd.DataFrame:
    """Per-position records of the DeepSeek-V2-Lite routing-weight control (Table 6).

    At each sampled position the active expert with the largest routing weight is
    ``expert_high`` and the one with the smallest ``expert_low``. Columns: ``model``
    (``"deepseek"``), ``layer``, ``position`` (0-199), ``token_pos``, ``expert_high``,
    ``expert_low``, ``weight_high``, ``weight_low``, ``weight_ratio`` (stored,
    = ``weight_high / weight_low``), ``baseline_loss``, ``loss_high``, ``loss_low``,
    ``delta_high``, ``delta_low``. The file does not record which text a position belongs
    to, only ``token_pos``.
    """
    payload = _read_json(_DEEPSEEK_CONTROL, root)
    rows = []
    for key, res in payload.items():
        layer = int(res["layer"])
        if int(key) != layer:
            raise ValueError(f"control entry {key} says layer {layer}")
        for i, c in enumerate(res["comparisons"]):
            rows.append({
                "model": "deepseek", "layer": layer, "position": i,
                "token_pos": c["token_pos"],
                "expert_high": c["high_expert"], "expert_low": c["low_expert"],
                "weight_high": c["high_weight"], "weight_low": c["low_weight"],
                "weight_ratio": c["weight_ratio"],
                "baseline_loss": c["baseline_loss"],
                "loss_high": c["high_loss"], "loss_low": c["low_loss"],
                "delta_high": c["high_delta"], "delta_low": c["low_delta"],
            })
    return pd.DataFrame(rows).sort_values(["layer", "position"], ignore_index=True)


# ----------------------------------------------------------------------------- stored stats

_STAT_COLUMNS = [
    "model", "experiment", "layer", "metric", "n", "mean_diff", "sd_diff", "median_diff",
    "cohens_d", "ddof", "t", "p_t", "W", "p_W", "spearman_rho", "spearman_p", "sig_label",
    "pct_high_larger", "source",
]


def _implied_ddof(d: float, t: float, n: int) -> int:
    """Which standard deviation the stored d used: ``t/sqrt(n)`` (ddof 1) or ``t/sqrt(n-1)``."""
    return 0 if abs(d - t / np.sqrt(n - 1)) < abs(d - t / np.sqrt(n)) else 1


def _files_stored_statistics(root: Path, *, model: str | None = None,
                             experiment: str | None = None) -> pd.DataFrame:
    """The per-cell statistics as stored in the released files.

    One row per cell: ``experiment`` is ``"metric"`` (observational-metric audit; ``metric``
    is the metric key) or ``"control"`` (routing-weight control; ``metric`` is
    ``"routing_weight"``). Columns: ``model``, ``experiment``, ``layer``, ``metric``, ``n``,
    ``mean_diff``, ``sd_diff``, ``median_diff``, ``cohens_d``, ``ddof`` (the ddof of the
    standard deviation in the stored ``cohens_d``, implied by the stored ``t``: d equals
    ``t/sqrt(n-1)`` for ddof 0 and ``t/sqrt(n)`` for ddof 1), ``t``, ``p_t``, ``W``, ``p_W``,
    ``spearman_rho``, ``spearman_p`` (control only), ``sig_label`` (the stored
    uncorrected significance label, where present), ``pct_high_larger``, ``source``
    (relative path of the file). Fields a file does not store are NaN.

    OLMoE's routing-weight control (the paper's Table 4) was not released.
    """
    if experiment not in (None, "metric", "control"):
        raise ValueError("experiment must be 'metric', 'control' or None")
    models = _check_model(model, ("olmoe", "qwen", "deepseek"))
    rows = []
    if experiment in (None, "metric"):
        for m in models:
            if m == "qwen":
                payload = _read_json(_QWEN_METRIC, root)
                for layer_key, per_metric in payload.items():
                    for metric, s in per_metric.items():
                        rows.append({
                            "model": m, "experiment": "metric", "layer": int(layer_key),
                            "metric": metric, "n": s["n"], "mean_diff": s["mean_diff"],
                            "cohens_d": s["cohens_d"], "t": s["t_stat"], "p_t": s["t_pval"],
                            "W": s["wilcoxon_stat"], "p_W": s["wilcoxon_pval"],
                            "sig_label": s["sig"], "source": _QWEN_METRIC,
                        })
                continue
            for layer in LAYERS[m]:
                rel = _METRIC_FILE[m].format(layer=layer)
                payload = _read_json(rel, root)
                for metric in PAPER_METRIC_LABELS:
                    s = payload["metric_results"][metric]["statistics"]
                    rows.append({
                        "model": m, "experiment": "metric", "layer": layer, "metric": metric,
                        "n": s["num_completed"], "mean_diff": s["mean_difference"],
                        "sd_diff": s["std_difference"], "median_diff": s["median_difference"],
                        "cohens_d": s["cohens_d"], "t": s["paired_t_stat"],
                        "p_t": s["paired_t_pval"], "W": s["wilcoxon_stat"],
                        "p_W": s["wilcoxon_pval"], "pct_high_larger": s["pct_high_larger"],
                        "source": rel,
                    })
    if experiment in (None, "control"):
        for m in models:
            if m == "olmoe":
                continue
            rel = _QWEN_CONTROL if m == "qwen" else _DEEPSEEK_CONTROL
            payload = _read_json(rel, root)
            for layer_key, s in payload.items():
                rows.append({
                    "model": m, "experiment": "control", "layer": int(layer_key),
                    "metric": "routing_weight", "n": s["n"], "mean_diff": s["mean_diff"],
                    "sd_diff": s.get("std_diff", np.nan), "cohens_d": s["cohens_d"],
                    "t": s["t_stat"], "p_t": s["t_pval"], "W": s["wilcoxon_stat"],
                    "p_W": s["wilcoxon_pval"], "spearman_rho": s["spearman_rho"],
                    "spearman_p": s["spearman_pval"], "sig_label": s["sig"], "source": rel,
                })
    out = pd.DataFrame(rows).reindex(columns=_STAT_COLUMNS)
    for col in ("n", "layer"):
        out[col] = out[col].astype(int)
    out["ddof"] = [_implied_ddof(d, t, n) for d, t, n in zip(out["cohens_d"], out["t"], out["n"])]
    float_cols = [c for c in _STAT_COLUMNS if c not in
                  ("model", "experiment", "layer", "metric", "n", "ddof", "sig_label", "source")]
    out[float_cols] = out[float_cols].astype(np.float64)
    out["sig_label"] = out["sig_label"].astype(object).where(out["sig_label"].notna(), None)
    return out.sort_values(["model", "experiment", "layer", "metric"], ignore_index=True)


def qwen_summaries(*, data_dir=None) -> pd.DataFrame:
    """Qwen1.5-MoE's stored summaries (metric audit and control): no raw records exist.

    Same columns as :func:`stored_statistics`.
    """
    return stored_statistics(model="qwen", data_dir=data_dir)


# ----------------------------------------------------------------------------- summaries


def _files_progressive_ablation(root: Path) -> pd.DataFrame:
    """OLMoE progressive ablation summary (the paper's Tables 8 and 9).

    One row per (layer, k), where the k highest-weight active experts were removed.
    Columns: ``model`` (``"olmoe"``), ``layer``, ``k``, ``mean_delta``, ``sd_delta``,
    ``median_delta``, ``p25_delta``, ``p75_delta``, ``p95_delta`` (cumulative loss change in
    nats over the positions), ``share_positive`` (fraction of positions with a positive
    change), ``weight_share_removed_mean`` (mean fraction of routing weight removed),
    ``n`` (positions), ``baseline_loss_mean``.
    """
    path = Path(root) / _PROGRESSIVE
    raw = pd.read_csv(path)
    out = raw.rename(columns={
        "n_removed": "k", "delta_loss_mean": "mean_delta", "delta_loss_std": "sd_delta",
        "delta_loss_median": "median_delta", "delta_loss_p25": "p25_delta",
        "delta_loss_p75": "p75_delta", "delta_loss_p95": "p95_delta",
        "pct_positive": "share_positive", "pct_weight_removed_mean": "weight_share_removed_mean",
        "n_samples": "n",
    })
    out.insert(0, "model", "olmoe")
    return out.sort_values(["layer", "k"], ignore_index=True)


REDISTRIBUTION_PAIRS = {
    "routing_weight_vs_gap_norm": "rw_gap",
    "gap_norm_vs_relative_compensation": "gap_comp",
    "routing_weight_vs_relative_compensation": "rw_comp",
    "compensation_cosine_vs_gap_norm": "cos_gap",
}


def _redistribution_files(root):
    for layer in range(16):
        rel = _OLMOE_REDIST.format(layer=layer)
        yield "olmoe", layer, rel, _read_json(rel, root)
    for layer in LAYERS["qwen"]:
        rel = _QWEN_REDIST.format(layer=layer)
        yield "qwen", layer, rel, _read_json(rel, root)


def _files_redistribution_experts(root: Path) -> pd.DataFrame:
    """Per-expert redistribution aggregates (OLMoE layers 0-15, Qwen layers 0/6/12/18/23).

    Columns: ``model``, ``layer``, ``expert``, ``mean_routing_weight``, ``token_coverage``,
    ``mean_gap_norm``, ``std_gap_norm``, ``compensation_cosine``, ``relative_compensation``,
    ``n_active_tokens``.
    """
    rows = []
    for m, layer, _, payload in _redistribution_files(root):
        for expert, e in payload["experts"].items():
            rows.append({"model": m, "layer": layer, "expert": int(expert), **e})
    return pd.DataFrame(rows)


def _files_redistribution(root: Path) -> pd.DataFrame:
    """Per-layer redistribution aggregates (the paper's Table 7 and Section 3 gap norms).

    Columns: ``model``, ``layer``, ``n_experts``, ``n_tokens``, ``mean_gap_norm`` (mean over
    the experts of each expert's mean gap norm, as in Table 7), and the stored Spearman
    correlations across experts with their p-values: ``rho_rw_gap``/``p_rw_gap`` (routing
    weight vs gap norm), ``rho_gap_comp``/``p_gap_comp`` (gap norm vs relative
    compensation), ``rho_rw_comp``/``p_rw_comp``, ``rho_cos_gap``/``p_cos_gap``;
    ``source``.
    """
    rows = []
    for m, layer, rel, payload in _redistribution_files(root):
        gaps = np.array([e["mean_gap_norm"] for e in payload["experts"].values()], dtype=np.float64)
        row = {"model": m, "layer": layer, "n_experts": len(gaps),
               "n_tokens": payload.get("n_tokens_total", payload.get("n_tokens")),
               "mean_gap_norm": float(gaps.mean())}
        for key, short in REDISTRIBUTION_PAIRS.items():
            row[f"rho_{short}"] = payload["correlations"][key]["rho"]
            row[f"p_{short}"] = payload["correlations"][key]["p"]
        row["source"] = rel
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- sources

#: the embedded derived table (package data) and its provenance record
EMBEDDED_TABLE = Path(__file__).resolve().parent / "data" / "released_derived.parquet"
EMBEDDED_PROVENANCE = EMBEDDED_TABLE.with_suffix(".json")
#: the tables of the embedded derived table: public function -> its file-based builder
_TABLE_BUILDERS = {
    "metric_comparisons": lambda root: _files_metric_comparisons(root),
    "control_comparisons": lambda root: _files_control_comparisons(root),
    "stored_statistics": lambda root: _files_stored_statistics(root),
    "progressive_ablation": lambda root: _files_progressive_ablation(root),
    "redistribution": lambda root: _files_redistribution(root),
    "redistribution_experts": lambda root: _files_redistribution_experts(root),
}
DERIVED_TABLES: tuple[str, ...] = tuple(_TABLE_BUILDERS)


@dataclass(frozen=True)
class ReleasedSource:
    """Where the released results are read from.

    ``kind`` is ``"files"`` (the original files: ``path`` is their ``paper-released/`` folder, in
    the data directory or the download cache) or ``"embedded"`` (the derived table shipped with
    the package: ``path`` is :data:`EMBEDDED_TABLE`); ``reason`` says why the files were not used.
    """

    kind: str
    path: Path
    reason: str | None = None

    def describe(self) -> str:
        if self.kind == "files":
            return f"the original result files of {RELEASED_REPO} at commit {RELEASED_COMMIT[:7]}, read from {self.path}"
        prov = embedded_provenance()
        return (f"the derived table shipped with moeaudit ({EMBEDDED_TABLE.name}), built by "
                f"`python -m moeaudit.released pack` from {len(prov['source_files'])} result files of "
                f"{prov['source_repository']} at commit {prov['source_commit'][:7]} (sha256 of each in "
                f"{EMBEDDED_PROVENANCE.name})")


def embedded_provenance() -> dict:
    """The provenance record of the embedded table: source repository, commit, the sha256 of every
    source file, and each table's columns and dtypes. ``FileNotFoundError`` if it is missing."""
    if not EMBEDDED_PROVENANCE.is_file():
        raise FileNotFoundError(f"the embedded released table is missing ({EMBEDDED_PROVENANCE}); "
                                "build it with `python -m moeaudit.released pack`")
    return json.loads(EMBEDDED_PROVENANCE.read_text(encoding="utf-8"))


def released_source(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                    embedded: bool = True) -> ReleasedSource:
    """The original files when present (:func:`released_dir`: data directory, download cache, or a
    download), else the embedded derived table when ``embedded``.

    A fallback to the table is remembered for the process (same data directory, cache and table), so
    the many readers of a chapter do not each retry a download that failed.
    Raises :class:`ReleasedDataUnavailable` when neither is available.
    """
    key = (str(paths.data_dir(data_dir)), str(cache_dir()), str(EMBEDDED_TABLE), download, id(_urlopen))
    if embedded and key in _FALLBACKS:
        return _FALLBACKS[key]
    try:
        return ReleasedSource("files", released_dir(data_dir, download=download))
    except ReleasedDataUnavailable as err:
        if not embedded or not EMBEDDED_TABLE.is_file():
            raise
        reason = str(err).split(" To fix:")[0].removeprefix("The authors' released result files were not found. ")
        _FALLBACKS[key] = ReleasedSource("embedded", EMBEDDED_TABLE, reason.rstrip("."))
        return _FALLBACKS[key]


_FALLBACKS: dict[tuple, ReleasedSource] = {}


_EMBEDDED_CACHE: dict[str, pd.DataFrame] = {}


def _embedded_table(name: str) -> pd.DataFrame:
    """One table of the embedded derived table, with the columns, order and dtypes it had when built."""
    if name not in _EMBEDDED_CACHE:
        _EMBEDDED_CACHE[name] = read_derived(EMBEDDED_TABLE, name)
    return _EMBEDDED_CACHE[name].copy()


def _table(name: str, data_dir) -> pd.DataFrame:
    src = released_source(data_dir)
    if src.kind == "embedded":
        return _embedded_table(name)
    return _TABLE_BUILDERS[name](src.path)


def _only(df: pd.DataFrame, column: str, value) -> pd.DataFrame:
    return df if value is None else df[df[column] == value].reset_index(drop=True)


def metric_comparisons(*, model: str | None = None, data_dir=None) -> pd.DataFrame:
    """Per-position records of the observational-metric audit (OLMoE and DeepSeek); see
    :func:`_files_metric_comparisons` for the columns. Read from the original files when present,
    else from the embedded derived table (identical values; see :func:`released_source`)."""
    _check_model(model, ("olmoe", "deepseek"))
    return _only(_table("metric_comparisons", data_dir), "model", model)


def control_comparisons(*, data_dir=None) -> pd.DataFrame:
    """Per-position records of the DeepSeek-V2-Lite routing-weight control (Table 6); see
    :func:`_files_control_comparisons` for the columns. Source as in :func:`metric_comparisons`."""
    return _table("control_comparisons", data_dir)


def stored_statistics(*, model: str | None = None, experiment: str | None = None, data_dir=None) -> pd.DataFrame:
    """The per-cell statistics as stored in the released files; see
    :func:`_files_stored_statistics` for the columns. Source as in :func:`metric_comparisons`."""
    if experiment not in (None, "metric", "control"):
        raise ValueError("experiment must be 'metric', 'control' or None")
    _check_model(model, ("olmoe", "qwen", "deepseek"))
    return _only(_only(_table("stored_statistics", data_dir), "model", model), "experiment", experiment)


def progressive_ablation(*, data_dir=None) -> pd.DataFrame:
    """OLMoE progressive ablation summary (Tables 8 and 9); see
    :func:`_files_progressive_ablation` for the columns. Source as in :func:`metric_comparisons`."""
    return _table("progressive_ablation", data_dir)


def redistribution(*, data_dir=None) -> pd.DataFrame:
    """Per-layer redistribution aggregates (Table 7 and Section 3's gap norms); see
    :func:`_files_redistribution` for the columns. Source as in :func:`metric_comparisons`."""
    return _table("redistribution", data_dir)


def redistribution_experts(*, data_dir=None) -> pd.DataFrame:
    """Per-expert redistribution aggregates (OLMoE layers 0-15, Qwen's five layers); see
    :func:`_files_redistribution_experts` for the columns. Source as in :func:`metric_comparisons`."""
    return _table("redistribution_experts", data_dir)


def derived_tables(root: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Every table of the embedded derived table, built from the original files in ``root``
    (a ``paper-released/`` folder)."""
    return {name: build(Path(root)) for name, build in _TABLE_BUILDERS.items()}


def pack(*, data_dir=None, out: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Build the embedded derived table from the original files (``python -m moeaudit.released pack``).

    Writes ``out`` (default :data:`EMBEDDED_TABLE`): one parquet table, the rows of the tables in
    :data:`DERIVED_TABLES` stacked with a ``table`` column (zstd-compressed), and beside it a JSON
    provenance record (source repository, commit, sha256 of every source file, each table's
    columns and dtypes). Nothing of the original files is copied except the values these tables
    hold. Raises :class:`ReleasedDataUnavailable` if the original files cannot be found.
    """
    root = released_dir(data_dir, download=download)
    tables = derived_tables(root)
    out = Path(out) if out is not None else EMBEDDED_TABLE
    used = {rel: sha256(root / rel) for rel in RELEASED_FILES}
    write_derived(tables, out, {"source_repository": RELEASED_REPO, "source_commit": RELEASED_COMMIT,
                                "source_files": dict(sorted(used.items())),
                                "generated_by": "python -m moeaudit.released pack"})
    _EMBEDDED_CACHE.clear()
    return out


def main(argv=None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m moeaudit.released",
                                 description="The authors' released result files: where they are read from, and the embedded derived table.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="build the embedded derived table from the original files")
    pk.add_argument("--data-dir", default=None, help="folder holding paper-released/ (default: $MOEAUDIT_DATA_DIR)")
    pk.add_argument("--out", default=None, help=f"output parquet (default: {EMBEDDED_TABLE})")
    sub.add_parser("source", help="print where the released results would be read from")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        out = pack(data_dir=args.data_dir, out=args.out)
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) and {out.with_suffix('.json')}")
    else:
        print(released_source().describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def paper_family_verdicts(*, alpha: float = 0.05, data_dir=None) -> pd.DataFrame:
    """The paper's observational-metric audit (Tables 1-3) counted per model, from the stored
    statistics of the released files (:func:`stored_statistics`, which the printed tables round).

    One row per model (``olmoe``, ``qwen``, ``deepseek``): ``cells`` (4 metrics x 5 layers),
    ``alpha_bonferroni`` (``alpha / cells``), ``uncorrected_t`` (p_t < ``alpha``: the paper's bold
    cells), ``uncorrected_t_positive`` (those with d > 0), ``bonferroni_t``, ``bonferroni_W`` (p below the Bonferroni level), ``bonferroni_both``
    (both below it: the paper's dual rule; the files store no sign for the Wilcoxon statistic, so
    same-sign agreement cannot be checked and is not required here), ``holm_both`` and ``bh_both``
    (the same rule with Holm's and Benjamini-Hochberg's adjusted p-values within the model's family,
    :func:`moeaudit.stats.correct_family`), ``max_abs_d`` (the stored d) and ``share_positive``.
    """

    st = stored_statistics(experiment="metric", data_dir=data_dir)
    adjusted = correct_family(st.assign(same_sign=True), family=("model",), alpha=alpha)
    rows = []
    for m in MODELS:
        g = st[st.model == m]
        adj = adjusted[adjusted.model == m]
        a = alpha / len(g)
        rows.append({"model": m, "cells": len(g), "alpha_bonferroni": a,
                     "uncorrected_t": int((g.p_t < alpha).sum()),
                     "uncorrected_t_positive": int(((g.p_t < alpha) & (g.cohens_d > 0)).sum()),
                     "bonferroni_t": int((g.p_t < a).sum()),
                     "bonferroni_W": int((g.p_W < a).sum()), "bonferroni_both": int(((g.p_t < a) & (g.p_W < a)).sum()),
                     "holm_both": int(adj.sig_dual_holm.sum()), "bh_both": int(adj.sig_dual_bh.sum()),
                     "max_abs_d": float(g.cohens_d.abs().max()), "share_positive": float((g.cohens_d > 0).mean())})
    return pd.DataFrame(rows)


def show_released_source(data_dir=None):
    """Display where the authors' released results are read from (original files or the embedded
    derived table) and return the :class:`moeaudit.released.ReleasedSource`."""

    source = released_source(data_dir)
    what = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(source.describe()))  # code spans of the plain text
    if source.kind == "files":
        display(admonition("note", "Released results: the original files", f"<p>Read from {what}.</p>",
                            f"Released results: {source.describe()}"))
    else:
        body = (f"<p>The original files were not found ({text_html(source.reason or '')}), so this page reads "
                f"{what}. Its values are those of the original files, cell for cell (checked by the test suite "
                "when the files are present). To read the files themselves, set <code>MOEAUDIT_DATA_DIR</code> to a "
                "folder holding <code>paper-released/</code>, or run once with network access.</p>")
        display(admonition("note", "Released results: the embedded derived table", body,
                            f"Released results: {source.describe()}"))
    return source
