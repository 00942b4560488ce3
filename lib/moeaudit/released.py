"""The authors' released result files, read into tidy DataFrames.

The paper's authors released their result files (JSON and CSV) in the repository
``callmeloui/observational_metrics`` at commit :data:`RELEASED_COMMIT`. This module finds a
local copy (``<data_dir>/paper-released/``, same relative paths as in that repository; the
data directory is the ``data_dir`` argument or ``$MOEAUDIT_DATA_DIR``), or else downloads
the files it needs from that exact commit into a per-user cache
(``$MOEAUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/moeaudit``, else ``~/.cache/moeaudit``),
never into this repository.

Model keys are ``"olmoe"``, ``"qwen"`` and ``"deepseek"`` (see :data:`MODELS`); metric keys
are the ones used in the released files (see :data:`METRICS`). In every comparison table
``delta_high`` is the loss change from ablating the expert ranked highest by the criterion
and ``delta_low`` the one ranked lowest, both in nats.

:func:`paper_printed_values` is different in kind: it holds the numbers printed in the
paper's tables (typed from the text of arXiv:2606.10703v1), so that recomputed values can
be shown beside what the paper reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths
from .stats import (audit_table, cohens_dz, correct_family, dz_difference_ci, min_detectable_dz, required_n,
                    spearman, spearman_defined, summary_effect)

__all__ = [
    "RELEASED_REPO",
    "RELEASED_COMMIT",
    "RELEASED_URL",
    "RELEASED_FILES",
    "MODELS",
    "METRICS",
    "LAYERS",
    "PAPER_ALPHA",
    "ReleasedDataUnavailable",
    "ReleasedSource",
    "DERIVED_TABLES",
    "EMBEDDED_TABLE",
    "cache_dir",
    "released_dir",
    "released_source",
    "embedded_provenance",
    "derived_tables",
    "pack",
    "metric_comparisons",
    "control_comparisons",
    "stored_statistics",
    "qwen_summaries",
    "progressive_ablation",
    "redistribution",
    "redistribution_experts",
    "paper_printed_values",
    "paper_family_verdicts",
    "agrees_at_printed_precision",
    "RELEASED_RECIPES",
    "RECIPE_OF_FAMILY",
    "PAPER_RECIPE",
    "QWEN_NORM_TEXTS",
    "QWEN_STD_COORDS",
    "released_active_threshold",
    "released_active_mask",
    "released_mean_routing_weight_when_active",
    "PaddedPass",
    "padded_router_pass",
    "per_expert_aggregate",
    "recipe_metric_tables",
    "recipe_rank_agreement",
    "ablation_agreement",
    "compare_audit_variants",
    "variant_flip_summary",
    "top_expert_raises_loss",
    "precision_noise",
    "float16_spacing",
    "progressive_in_float16_steps",
    "MODEL_ORDER",
    "RANKING_LABELS",
    "CELL_KEYS",
    "paper_text_values",
    "with_paper_labels",
    "compare_printed",
    "printed_side_by_side",
    "cell_effect_sizes",
    "summary_cells",
    "printed_control_rows",
    "reanalysis_cells",
    "control_spearman",
    "pass_counts",
    "interval_summary",
    "equivalence_counts",
    "detectable_effects",
    "position_overlap",
    "context_summary",
    "metric_value_ranges",
    "control_repeats",
    "correlation_by_layer",
    "monotonicity_breaks",
    "reanalysis_counts",
]

RELEASED_REPO = "callmeloui/observational_metrics"
RELEASED_COMMIT = "18bd31b5d09150e7f4286f1cd4a8b5a1a329b301"
RELEASED_URL = f"https://raw.githubusercontent.com/{RELEASED_REPO}/{RELEASED_COMMIT}/"
CACHE_DIR_ENV = paths.CACHE_DIR_ENV

#: model key -> name used in the paper
MODELS: dict[str, str] = {
    "olmoe": "OLMoE-1B-7B-0924",
    "qwen": "Qwen1.5-MoE-A2.7B",
    "deepseek": "DeepSeek-V2-Lite",
}
#: metric key (as in the released files) -> row label used in the paper's tables
METRICS: dict[str, str] = {
    "utilization_rate": "Utilization rate",
    "activation_norm": "Activation norm",
    "mean_routing_weight_when_active": "Mean routing weight",
    "activation_std": "Activation std",
}
#: layers audited per model (paper, Section 2)
LAYERS: dict[str, tuple[int, ...]] = {
    "olmoe": (0, 4, 7, 11, 15),
    "qwen": (0, 6, 12, 18, 23),
    "deepseek": (1, 7, 13, 20, 26),
}
PROGRESSIVE_LAYERS: tuple[int, ...] = (0, 1, 7, 8, 9, 15)
#: the family-wise level of the paper's tests (Section 2: alpha_adj = 0.05/20 and 0.05/5); statements
#: about the paper use it, whatever level a chapter's own tests use
PAPER_ALPHA: float = 0.05

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


def _expected_sha256(relpath: str) -> str | None:
    """The sha256 of the authors' file ``relpath`` at the pinned commit, as shipped in the embedded
    table's provenance record (``None`` for a file it does not list)."""
    return embedded_provenance()["source_files"].get(relpath)


def _download(relpath: str, target: Path) -> None:
    """Fetch one released file into ``target``, only if its sha256 is the one recorded for it: a
    proxy's error page or a changed file served with status 200 raises ``OSError`` naming the file
    and nothing is written."""
    with _urlopen(RELEASED_URL + relpath, timeout=60) as response:
        payload = response.read()
    expected = _expected_sha256(relpath)
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
        path, expected = cached / rel, _expected_sha256(rel)
        if path.is_file() and expected is not None and _sha256(path) != expected:
            warnings.warn(f"{path}: sha256 differs from the recorded one of {RELEASED_REPO} at commit "
                          f"{RELEASED_COMMIT}; the cached copy is discarded", ReleasedFileMismatchWarning, stacklevel=2)
            path.unlink()
    missing = [f for f in RELEASED_FILES if not (cached / f).is_file()]
    if not missing:
        return cached
    looked = (f"{root / 'paper-released'}" if root is not None
              else f"no data directory (data_dir=None and ${paths.DATA_DIR_ENV} unset)")
    if download:
        try:
            for rel in missing:
                _download(rel, cached / rel)
            return cached
        except (OSError, urllib.error.URLError) as err:  # URLError is an OSError
            reason = f"downloading {len(missing)} file(s) from {RELEASED_URL} failed ({err})"
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
            for metric in METRICS:
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
                for metric in METRICS:
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


_REDIST_PAIRS = {
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
        for key, short in _REDIST_PAIRS.items():
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
        spec = embedded_provenance()["tables"][name]
        long = pd.read_parquet(EMBEDDED_TABLE, filters=[("table", "==", name)])
        out = long[spec["columns"]].reset_index(drop=True)
        for col, dtype in spec["dtypes"].items():
            if dtype == "object":
                out[col] = out[col].astype(object).where(out[col].notna(), None)
            else:
                out[col] = out[col].astype(dtype)
        _EMBEDDED_CACHE[name] = out
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    out.parent.mkdir(parents=True, exist_ok=True)
    long = pd.concat([t.assign(table=name) for name, t in tables.items()], ignore_index=True)
    for col in long.columns:  # one parquet type per column across the stacked tables
        if long[col].dtype == object:
            long[col] = long[col].astype("string")
    long.to_parquet(out, index=False, compression="zstd")
    used = {rel: _sha256(root / rel) for rel in RELEASED_FILES}
    provenance = {
        "source_repository": RELEASED_REPO,
        "source_commit": RELEASED_COMMIT,
        "source_files": dict(sorted(used.items())),
        "generated_by": "python -m moeaudit.released pack",
        "tables": {name: {"rows": len(t), "columns": list(t.columns),
                          "dtypes": {c: str(t[c].dtype) for c in t.columns}} for name, t in tables.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    _EMBEDDED_CACHE.clear()
    return out


# ----------------------------------------------------------------------------- re-analysis (chapter 8)
# Number-computing steps of the chapter "Re-analysing the authors' released results": the comparison of
# recomputed values with the printed tables, the 75 re-analysed cells (60 metric, 15 control), and the
# summaries its prose quotes. All effect sizes are Cohen's d_z of D = delta_high - delta_low (nats).

#: display order of the models and of the rankings (four metrics, then the routing-weight control)
MODEL_ORDER: tuple[str, ...] = ("olmoe", "qwen", "deepseek")
RANKING_LABELS: dict[str, str] = {**METRICS, "routing_weight": "Routing weight (control)"}
#: key columns of one re-analysed cell
CELL_KEYS: tuple[str, ...] = ("model", "experiment", "layer", "metric")

# Numbers the paper states in its running text (not in a table), typed from arXiv:2606.10703v1
# (``v2`` from version 2); key -> (value, where it is stated).
_PAPER_TEXT = {
    "max_abs_d_v1": (0.17, "abstract and Section 1/3 (v1): effect sizes below d = 0.17 across all 60 cells"),
    "max_abs_d_v2": (0.23, "abstract (v2): effect sizes below d = 0.23"),
    "metric_cells_total": (60, "abstract and Section 3: 60 metric-layer combinations"),
    "activation_norm_bound": (0.157, "Section 3: activation norm |d| <= 0.157 at every layer in every model"),
    "qwen_control_bound": (0.124, "Section 3: Qwen control within |d| <= 0.124"),
    "deepseek_control_bound": (0.098, "Section 3: DeepSeek control within |d| <= 0.098"),
    "olmoe_gap_norm_first": (0.0041, "Section 3: mean gap norm 0.0041 at OLMoE Layer 0"),
    "olmoe_gap_norm_last": (0.1697, "Section 3: mean gap norm 0.1697 at OLMoE Layer 15"),
    "olmoe_gap_norm_ratio": (41.0, "Section 3 and Appendix A.3: a 41x increase"),
    "qwen_gap_norm_ratio": (38.0, "Appendix A.3: Qwen's mean gap norm scales about 38x"),
    "positions_per_cell": (200, "Section 2: n = 200 token positions per cell"),
    "family_alpha": (0.05, "Section 2: Bonferroni from a family-wise 0.05"),
    "alpha_adj_metric": (0.0025, "Section 2: alpha_adj = 0.05/20 = 0.0025 for the audit"),
    "alpha_adj_control": (0.01, "Section 2: alpha_adj = 0.05/5 = 0.01 for the control"),
    "olmoe_uncorrected_cells": (1, "Section 3: in OLMoE, 19 of 20 cells are non-significant at p < 0.05"),
    "deepseek_uncorrected_cells": (3, "Section 3: in DeepSeek, three cells reach uncorrected p_t < 0.05"),
    "deepseek_wilcoxon_cells": (1, "Section 3: ... and only one survives Wilcoxon"),
    "control_signal_layer": (15, "Section 3: the OLMoE control effect at Layer 15"),
    "gap_comp_olmoe_layer": (15, "Appendix A.3: in OLMoE, this correlation strengthens only at Layer 15"),
}


def paper_text_values() -> dict[str, float]:
    """Numbers the paper states in its running text (abstract, Sections 2-3, Appendix A.3), typed once
    from arXiv:2606.10703v1 (and v2 where named): ``{key: value}``. Keys: ``max_abs_d_v1`` (0.17),
    ``max_abs_d_v2`` (0.23), ``metric_cells_total``, ``activation_norm_bound``, ``qwen_control_bound``,
    ``deepseek_control_bound``, ``olmoe_gap_norm_first``/``_last``, ``olmoe_gap_norm_ratio``,
    ``qwen_gap_norm_ratio``, ``positions_per_cell``, ``family_alpha``, ``alpha_adj_metric``,
    ``alpha_adj_control``, ``olmoe_uncorrected_cells``, ``deepseek_uncorrected_cells``,
    ``deepseek_wilcoxon_cells``, ``control_signal_layer``, ``gap_comp_olmoe_layer``. The numbers in the paper's tables are :func:`paper_printed_values`."""
    return {k: v for k, (v, _) in _PAPER_TEXT.items()}


def with_paper_labels(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` for display: ``model`` and ``metric`` keys replaced by the paper's names
    (:data:`MODELS`, :data:`RANKING_LABELS`) and rows sorted by model (:data:`MODEL_ORDER`), ranking
    and layer (stable). Columns other than these are untouched; the index is reset."""
    out = df.copy()
    order = []
    if "model" in out:
        out["_m"] = out["model"].map({m: i for i, m in enumerate(MODEL_ORDER)})
        out["model"] = out["model"].map(MODELS)
        order.append("_m")
    if "metric" in out:
        out["_r"] = out["metric"].map({m: i for i, m in enumerate(RANKING_LABELS)})
        out["metric"] = out["metric"].map(RANKING_LABELS)
        order.append("_r")
    if "layer" in out:
        order.append("layer")
    if order:
        out = out.sort_values(order, kind="stable")
    return out.drop(columns=[c for c in ("_m", "_r") if c in out]).reset_index(drop=True)


def compare_printed(recomputed: pd.DataFrame, *, tables, on, printed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The numbers printed in ``tables`` (:func:`paper_printed_values`, or ``printed``) beside recomputed ones.

    ``recomputed``: long form with the ``on`` key columns, ``quantity`` and ``recomputed``. One row per
    printed number (a left join, ``validate="one_to_one"``; ``ValueError`` if a key repeats), with the
    columns of :func:`paper_printed_values`, ``recomputed`` and ``agrees``
    (:func:`agrees_at_printed_precision`; False where nothing was recomputed).
    """
    printed = paper_printed_values() if printed is None else printed
    out = printed[printed.table.isin(list(tables))].merge(
        recomputed, on=[*on, "quantity"], how="left", validate="one_to_one")
    out["agrees"] = agrees_at_printed_precision(out["recomputed"], out["value"], out["decimals"])
    return out.reset_index(drop=True)


def printed_side_by_side(long: pd.DataFrame, *, index, quantities) -> pd.DataFrame:
    """:func:`compare_printed` output in wide form: one row per ``index`` key, columns
    ``"<q> paper"`` (the printed value) and ``"<q> released"`` (the recomputed one) for each of
    ``quantities``, and ``agrees`` (every quantity of the row agrees at printed precision).
    Rows and labels as :func:`with_paper_labels`."""
    index = list(index)
    pr = long.pivot(index=index, columns="quantity", values="value")
    rc = long.pivot(index=index, columns="quantity", values="recomputed")
    out = pd.DataFrame(index=pr.index)
    for q in quantities:
        out[f"{q} paper"] = pr[q]
        out[f"{q} released"] = rc[q]
    out["agrees"] = long.groupby(index)["agrees"].all()
    return with_paper_labels(out.reset_index())


def cell_effect_sizes(records: pd.DataFrame, *, ddof: int = 0) -> pd.DataFrame:
    """Cohen's d_z of each (model, layer, metric) cell of :func:`metric_comparisons` records, with the
    standard deviation of D = ``delta_high - delta_low`` taken with ``ddof`` (0: as the released
    per-token scripts compute it; 1: the sample standard deviation). Columns ``model``, ``layer``,
    ``metric``, ``d``; cells in order of first appearance."""

    return (records.assign(D=records.delta_high - records.delta_low)
            .groupby(["model", "layer", "metric"], sort=False)["D"]
            .apply(lambda D: cohens_dz(D, ddof=ddof)).rename("d").reset_index())


def summary_cells(rows: pd.DataFrame, *, n_tests: int, source: str, alpha: float = 0.05,
                  tost_bound_d: float = 0.2, power: float = 0.8) -> pd.DataFrame:
    """Re-analysed cells from stored summaries (``t``, ``n``, ``p_W`` per row, plus :data:`CELL_KEYS`):
    :func:`moeaudit.stats.summary_effect` for each row, with the Wilcoxon direction assumed to agree
    with the t test (``same_sign=True``: the files store no sign, and the assumption can only add
    passes under the agreement rule). ``n_tests`` is the Bonferroni family size; ``source`` is stored
    in a ``source`` column. One row per input row."""

    out = [summary_effect(r["t"], int(r["n"]), p_W=r["p_W"], same_sign=True, alpha=alpha, n_tests=n_tests,
                          tost_bound_d=tost_bound_d, power=power).assign(**{k: r[k] for k in CELL_KEYS})
           for _, r in rows.iterrows()]
    return pd.concat(out, ignore_index=True).assign(source=source)


def printed_control_rows(table: int = 4, *, model: str = "olmoe", n: int = 200,
                         printed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The printed routing-weight control of ``model`` (Table 4 for OLMoE, whose records were not
    released) as summary rows for :func:`summary_cells`: one row per layer with :data:`CELL_KEYS`,
    ``n``, the printed ``d``, ``p_t``, ``p_W``, ``rho`` and ``t = d * sqrt(n)`` (the printed d is the
    ddof-1 d_z of the control scripts, so ``t`` carries its rounding)."""
    printed = paper_printed_values() if printed is None else printed
    out = (printed[(printed.table == table) & (printed.model == model)]
           .pivot(index="layer", columns="quantity", values="value").reset_index()
           .assign(model=model, experiment="control", metric="routing_weight", n=int(n)))
    out["t"] = out["d"] * np.sqrt(out["n"])
    return out


def reanalysis_cells(*, alpha: float = 0.05, tost_bound_d: float = 0.2, power: float = 0.8,
                     data_dir=None) -> pd.DataFrame:
    """Every cell of the paper's audit (60 metric cells) and control (15 cells), re-analysed.

    Sources: the per-position records (OLMoE and DeepSeek metric cells, DeepSeek control:
    :func:`moeaudit.stats.audit_table`, ddof 1), Qwen's stored summaries and the OLMoE control's
    printed values (:func:`summary_cells`, :func:`printed_control_rows`; for the latter ``p_t`` is the
    printed one). Families are one model's metric cells or its control cells (the paper's
    Section 2), with size ``family_size`` and Bonferroni level ``alpha_corrected = alpha / family_size``;
    :func:`moeaudit.stats.correct_family` adds the Bonferroni, Holm and Benjamini-Hochberg columns.
    Columns: :data:`CELL_KEYS`, ``source``, ``n``, ``cohens_dz``, ``dz_ci_low``, ``dz_ci_high``
    (exact 95% CI), ``p_t``, ``p_W``, ``same_sign``, ``p_tost`` (TOST against ``tost_bound_d``),
    ``mde_dz`` (at ``power`` and the family's level), the correction columns, ``family_size``,
    ``alpha_corrected``. Rows: model, experiment, layer, metric as :func:`with_paper_labels` orders them.
    """

    kw = dict(alpha=alpha, tost_bound_d=tost_bound_d, power=power)
    records, control = metric_comparisons(data_dir=data_dir), control_comparisons(data_dir=data_dir)
    stored = stored_statistics(data_dir=data_dir)
    metric = audit_table(records, by=["model", "layer", "metric"], family=["model"], **kw).assign(experiment="metric")
    ctrl = audit_table(control, by=["model", "layer"], family=["model"], **kw).assign(
        experiment="control", metric="routing_weight")
    n_metric = len(METRICS) * len(LAYERS["olmoe"])
    n_control = len(LAYERS["olmoe"])
    qwen = stored[stored.model == "qwen"]
    olmoe_rows = printed_control_rows(4, model="olmoe")
    olmoe = summary_cells(olmoe_rows, n_tests=n_control, source="printed in paper", **kw)
    olmoe["p_t"] = olmoe_rows["p_t"].to_numpy()  # the printed p_t, not one from the rounded d
    cols = [*CELL_KEYS, "source", "n", "cohens_dz", "dz_ci_low", "dz_ci_high", "p_t", "p_W", "same_sign",
            "p_tost", "mde_dz"]
    cells = pd.concat([
        metric.assign(source="per-position records"), ctrl.assign(source="per-position records"),
        summary_cells(qwen[qwen.experiment == "metric"], n_tests=n_metric, source="stored summary", **kw),
        summary_cells(qwen[qwen.experiment == "control"], n_tests=n_control, source="stored summary", **kw),
        olmoe], ignore_index=True)[cols]
    cells["family_size"] = cells.groupby(["model", "experiment"])["layer"].transform("size")
    cells["alpha_corrected"] = alpha / cells["family_size"]
    cells = correct_family(cells, family=["model", "experiment"], alpha=alpha)
    order = cells.assign(_m=cells.model.map({m: i for i, m in enumerate(MODEL_ORDER)}),
                         _e=cells.experiment.map({"metric": 0, "control": 1}),
                         _r=cells.metric.map({m: i for i, m in enumerate(RANKING_LABELS)}))
    return cells.loc[order.sort_values(["_m", "_e", "_r", "layer"], kind="stable").index].reset_index(drop=True)


def control_spearman(control: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Spearman rho between the weight ratio ``w_high / w_low`` and D across the positions of each layer
    of :func:`control_comparisons` records (Table 6's last row), with a paired bootstrap (BCa) 95%
    interval (:func:`moeaudit.stats.spearman`, ``n_boot`` resamples, seed ``seed``). Columns: those of
    :func:`moeaudit.stats.spearman` and ``layer``."""

    return pd.concat([spearman(g.weight_ratio, g.delta_high - g.delta_low, n_boot=n_boot, seed=seed).assign(layer=layer)
                      for layer, g in control.groupby("layer")], ignore_index=True)


def _family_groups(cells: pd.DataFrame):
    return cells.groupby(["model", "experiment"], sort=False)


def pass_counts(cells: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """How many cells of each family of :func:`reanalysis_cells` pass, under which rule.

    One row per (model, experiment): ``cells``; ``uncorrected t``/``W`` (p below ``alpha``),
    ``uncorrected both`` (both, same sign); and for Bonferroni, Holm and BH the counts ``"<rule> t"``,
    ``"<rule> W"``, ``"<rule> both"`` (the paper's agreement rule) from the correction columns."""
    rows = []
    for (model, experiment), g in _family_groups(cells):
        row = {"model": model, "experiment": experiment, "cells": len(g),
               "uncorrected t": int((g.p_t < alpha).sum()), "uncorrected W": int((g.p_W < alpha).sum()),
               "uncorrected both": int(((g.p_t < alpha) & (g.p_W < alpha) & g.same_sign).sum())}
        for suffix, name in (("bonf", "Bonferroni"), ("holm", "Holm"), ("bh", "BH")):
            row[f"{name} t"] = int(g[f"sig_t_{suffix}"].sum())
            row[f"{name} W"] = int(g[f"sig_W_{suffix}"].sum())
            row[f"{name} both"] = int(g[f"sig_dual_{suffix}"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def interval_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model, experiment) of :func:`reanalysis_cells`: ``cells``, ``max_abs_dz`` (largest observed
    |d_z|), ``widest_ci`` (largest |d_z| inside some cell's 95% CI), ``mean_ci_half_width`` and
    ``ci_excludes_zero`` (cells whose uncorrected interval excludes 0)."""
    return pd.DataFrame([
        {"model": model, "experiment": experiment, "cells": len(g),
         "max_abs_dz": float(g.cohens_dz.abs().max()),
         "widest_ci": float(np.maximum(g.dz_ci_low.abs(), g.dz_ci_high.abs()).max()),
         "mean_ci_half_width": float(((g.dz_ci_high - g.dz_ci_low) / 2).mean()),
         "ci_excludes_zero": int(((g.dz_ci_low > 0) | (g.dz_ci_high < 0)).sum())}
        for (model, experiment), g in _family_groups(cells)])


def equivalence_counts(cells: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, experiment) of :func:`reanalysis_cells`: ``cells``, ``equivalent uncorrected``
    (``p_tost < alpha``), ``equivalent corrected`` (``p_tost < alpha_corrected``), ``median p_TOST``."""
    return pd.DataFrame([
        {"model": model, "experiment": experiment, "cells": len(g),
         "equivalent uncorrected": int((g.p_tost < alpha).sum()),
         "equivalent corrected": int((g.p_tost < g.alpha_corrected).sum()),
         "median p_TOST": float(g.p_tost.median())}
        for (model, experiment), g in _family_groups(cells)])


def detectable_effects(*, n: int, levels: dict, power: float = 0.8, powers=(0.5, 0.95),
                       targets=(0.1, 0.2)) -> pd.DataFrame:
    """Minimum detectable d_z of a two-sided paired t test at ``n`` positions, and positions needed.

    ``levels``: ``{label: per-test level}``. One row per level: ``level`` (label), ``alpha`` (the
    level), ``"MDE <p>"`` for each power in ``powers`` and ``power`` (sorted, duplicates dropped;
    :func:`moeaudit.stats.min_detectable_dz`) and ``"n for <d>"`` for each of ``targets``
    (:func:`moeaudit.stats.required_n` at ``power``)."""

    pws = sorted({*powers, power})
    rows = []
    for label, level in levels.items():
        row = {"level": label, "alpha": float(level)}
        row.update({f"MDE {pw:g}": min_detectable_dz(n, alpha=level, power=pw) for pw in pws})
        row.update({f"n for {d:g}": required_n(d, alpha=level, power=power) for d in targets})
        rows.append(row)
    return pd.DataFrame(rows)


def position_overlap(records: pd.DataFrame) -> pd.DataFrame:
    """How the sampled positions of :func:`metric_comparisons` records are shared, per model.

    Positions are identified by ``global_token_idx``. Columns: ``model``, ``positions per metric``
    (largest count of one metric at the first layer), ``distinct over metrics``, ``shared min`` and
    ``shared max`` (positions common to a pair of metrics, over all pairs), ``same at every layer``."""
    rows = []
    for model, g in records.groupby("model", sort=False):
        first = g[g.layer == g.layer.min()]
        by_metric = {m: set(gm.global_token_idx) for m, gm in first.groupby("metric", sort=False)}
        same = all(set(gm.global_token_idx) == by_metric[m]
                   for (layer, m), gm in g.groupby(["layer", "metric"], sort=False))
        names = list(by_metric)
        pairs = [len(by_metric[a] & by_metric[b]) for i, a in enumerate(names) for b in names[i + 1:]]
        rows.append({"model": model, "positions per metric": max(len(s) for s in by_metric.values()),
                     "distinct over metrics": len(set.union(*by_metric.values())),
                     "shared min": min(pairs), "shared max": max(pairs), "same at every layer": same})
    return pd.DataFrame(rows)


def context_summary(records: pd.DataFrame, *, short: int = 32) -> pd.DataFrame:
    """Where in the (padded) sequence the sampled positions of :func:`metric_comparisons` lie, per model
    (first layer; all layers share the positions). Columns: ``model``, ``share short`` (share with
    ``seq_position < short``), ``median position``, ``median first`` / ``median last`` (median over
    texts of the first / last sampled position of a text), ``max position``."""
    rows = []
    for model, g in records.groupby("model", sort=False):
        first = g[g.layer == g.layer.min()]
        per_text = first.groupby(["sample_idx", "batch_idx"]).seq_position.agg(["min", "max"])
        rows.append({"model": model, "share short": float((first.seq_position < short).mean()),
                     "median position": float(first.seq_position.median()),
                     "median first": float(per_text["min"].median()),
                     "median last": float(per_text["max"].median()),
                     "max position": int(first.seq_position.max())})
    return pd.DataFrame(rows)


def metric_value_ranges(records: pd.DataFrame) -> pd.DataFrame:
    """Range of the metric values stored for the ranked experts (high and low) of
    :func:`metric_comparisons` records: one row per (model, metric) with ``min``, ``max`` and
    ``share negative`` (share of stored values below 0)."""
    long = records.melt(id_vars=["model", "metric"], value_vars=["metric_value_high", "metric_value_low"],
                        value_name="v")
    return (long.groupby(["model", "metric"], sort=False)["v"]
            .agg(min="min", max="max", share_negative=lambda s: float((s < 0).mean()))
            .rename(columns={"share_negative": "share negative"}).reset_index())


def control_repeats(control: pd.DataFrame) -> pd.DataFrame:
    """Positions drawn more than once in the :func:`control_comparisons` records, per layer. The records
    store no text index, so a position is identified by ``token_pos`` and its clean loss (rounded to
    1e-6 nats). Columns ``layer``, ``positions``, ``distinct``, ``repeats`` (= positions - distinct)."""
    rows = [{"layer": int(layer), "positions": len(g),
             "distinct": len(set(zip(g.token_pos, g.baseline_loss.round(6))))}
            for layer, g in control.groupby("layer")]
    out = pd.DataFrame(rows)
    out["repeats"] = out.positions - out.distinct
    return out


def correlation_by_layer(redist: pd.DataFrame, *, model: str, pair: str = "gap_comp",
                         alpha: float = 0.05) -> pd.DataFrame:
    """One stored redistribution correlation of ``model`` across its layers (:func:`redistribution`).

    ``pair``: ``"gap_comp"`` (gap norm vs relative compensation), ``"rw_gap"``, ``"rw_comp"`` or
    ``"cos_gap"``. Columns ``layer``, ``rho``, ``p`` (the stored Spearman values across experts),
    ``significant`` (``p < alpha``), ``rank`` (1 = largest rho). ``ValueError`` for an unknown pair or
    a model without records."""
    if pair not in _REDIST_PAIRS.values():
        raise ValueError(f"pair must be one of {tuple(_REDIST_PAIRS.values())}, got {pair!r}")
    g = redist[redist.model == model].sort_values("layer")
    if g.empty:
        raise ValueError(f"no redistribution records for model {model!r}")
    out = pd.DataFrame({"layer": g.layer.to_numpy(), "rho": g[f"rho_{pair}"].to_numpy(dtype=float),
                        "p": g[f"p_{pair}"].to_numpy(dtype=float)})
    out["significant"] = out.p < alpha
    out["rank"] = out.rho.rank(ascending=False, method="min").astype(int)
    return out


def monotonicity_breaks(values, *, increasing: bool = True) -> list[tuple]:
    """Where a sequence fails to be strictly monotone.

    ``values``: a Series indexed by position (e.g. layer) in order, or a sequence. Returns the list of
    ``(index_a, index_b, value_a, value_b)`` for consecutive entries with ``value_b <= value_a``
    (``increasing``) or ``value_b >= value_a`` (decreasing); empty when strictly monotone."""
    s = values if isinstance(values, pd.Series) else pd.Series(list(values))
    idx, v = list(s.index), s.to_numpy(dtype=float)
    return [(idx[i], idx[i + 1], float(v[i]), float(v[i + 1])) for i in range(len(v) - 1)
            if (v[i + 1] <= v[i] if increasing else v[i + 1] >= v[i])]


def reanalysis_counts(cells: pd.DataFrame, *, alpha: float = 0.05) -> dict:
    """The counts the re-analysis reports, from :func:`reanalysis_cells` run at level ``alpha``.

    Returns a dict: ``metric_level`` / ``control_level`` (Bonferroni level of a metric / control
    family), ``dual_metric`` (observational cells passing the paper's rule: Bonferroni, both tests,
    same sign), ``dual_control`` (control cells passing it), ``dual_olmoe_control``, ``eq_min`` /
    ``eq_max`` (fewest / most metric cells of one model shown equivalent by TOST at ``alpha``),
    ``eq_corrected`` (metric cells equivalent at their family's Bonferroni level), ``eq_control``
    (control cells equivalent at ``alpha``)."""
    counts = pass_counts(cells, alpha=alpha).set_index(["model", "experiment"])
    eq = equivalence_counts(cells, alpha=alpha)
    m, c = eq[eq.experiment == "metric"], eq[eq.experiment == "control"]
    size = cells.groupby("experiment").family_size.first()
    return {"metric_level": alpha / int(size["metric"]), "control_level": alpha / int(size["control"]),
            "dual_metric": int(counts.xs("metric", level=1)["Bonferroni both"].sum()),
            "dual_control": int(counts.xs("control", level=1)["Bonferroni both"].sum()),
            "dual_olmoe_control": int(counts.loc[("olmoe", "control"), "Bonferroni both"]),
            "eq_min": int(m["equivalent uncorrected"].min()), "eq_max": int(m["equivalent uncorrected"].max()),
            "eq_corrected": int(m["equivalent corrected"].sum()), "eq_control": int(c["equivalent uncorrected"].sum())}


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


# ----------------------------------------------------------------------------- the paper

# Tables as printed in arXiv:2606.10703v1, typed from the paper's text. Per row: the values
# at the table's layers (or k for Tables 8-9), in column order; a trailing "b" marks a bold
# cell, trailing "*" marks significance stars (Table 7).
_T_METRIC = {
    1: ("olmoe", {
        "utilization_rate": ("-0.071 -0.027 +0.029 +0.066 +0.051", "0.319 0.702 0.687 0.351 0.476"),
        "activation_norm": ("-0.095 +0.119 +0.075 +0.136 +0.033", "0.182 0.094 0.293 0.057 0.640"),
        "mean_routing_weight_when_active": ("+0.048 -0.093 +0.072 -0.036 -0.095",
                                            "0.500 0.189 0.312 0.611 0.179"),
        "activation_std": ("-0.034 +0.030 -0.098 +0.141b -0.020", "0.634 0.669 0.169 0.048b 0.777"),
    }),
    2: ("qwen", {
        "utilization_rate": ("-0.131 +0.012 +0.111 +0.009 -0.001", "0.065 0.861 0.118 0.903 0.993"),
        "activation_norm": ("+0.019 +0.053 +0.110 +0.045 +0.092", "0.786 0.454 0.120 0.526 0.194"),
        "mean_routing_weight_when_active": ("+0.021 +0.018 -0.006 +0.129 +0.035",
                                            "0.772 0.798 0.934 0.070 0.620"),
        "activation_std": ("+0.067 +0.046 +0.081 +0.149b +0.222b", "0.343 0.515 0.252 0.036b 0.002b"),
    }),
    3: ("deepseek", {
        "utilization_rate": ("-0.039 +0.044 +0.115 +0.163b +0.143b", "0.581 0.533 0.105 0.023b 0.045b"),
        "activation_norm": ("+0.157b +0.040 +0.097 +0.006 +0.084", "0.028b 0.576 0.172 0.937 0.235"),
        "mean_routing_weight_when_active": ("-0.007 -0.070 +0.097 -0.014 +0.035",
                                            "0.926 0.327 0.174 0.849 0.621"),
        "activation_std": ("+0.101 +0.064 +0.043 +0.050 +0.064", "0.156 0.369 0.545 0.483 0.370"),
    }),
}
_T_CONTROL = {
    4: ("olmoe", {
        "d": "-0.114 +0.095 +0.085 +0.164b +0.231b",
        "p_t": "0.107 0.180 0.233 0.022b 0.0013b",
        "p_W": "0.217 0.799 0.227 0.015 0.019",
        "rho": "-0.058 +0.019 +0.196 +0.084 +0.199",
    }),
    5: ("qwen", {
        "d": "+0.014 -0.031 +0.114 +0.124 +0.112",
        "p_t": "0.840 0.659 0.110 0.081 0.116",
        "p_W": "0.385 0.589 0.308 0.922 0.199",
        "rho": "-0.084 +0.043 -0.036 +0.082 -0.011",
    }),
    6: ("deepseek", {
        "d": "+0.075 +0.078 +0.068 +0.068 +0.098",
        "p_t": "0.293 0.273 0.336 0.335 0.169",
        "p_W": "0.390 0.508 0.460 0.085 0.466",
        "rho": "+0.090 -0.070 +0.051 -0.001 -0.018",
    }),
}
_T7 = {
    "mean_gap_norm": "0.011 0.122 0.090 0.239 0.440",
    "rho_rw_gap": "+0.558*** +0.638*** +0.632*** +0.596*** +0.744***",
    "rho_gap_comp": "+0.076 +0.394** +0.388** +0.349** +0.282*",
}
_T8 = {  # rows k = 1..7, columns layers 0, 1, 7, 8, 9, 15
    1: "+0.009 +0.018 +0.009 +0.015 +0.029 +0.082",
    2: "+0.013 +0.031 +0.016 +0.028 +0.060 +0.155",
    3: "+0.016 +0.035 +0.010 +0.045 +0.061 +0.214",
    4: "+0.019 +0.051 +0.022 +0.054 +0.073 +0.290",
    5: "+0.029 +0.058 +0.022 +0.061 +0.080 +0.354",
    6: "+0.021 +0.058 +0.025 +0.062 +0.078 +0.403",
    7: "+0.028 +0.068 +0.020 +0.070 +0.083 +0.431",
}
_T9 = {
    "median_delta": "+0.000 +0.003 +0.001 +0.008 +0.012 +0.018",
    "p95_delta": "+0.433 +0.398 +0.473 +0.641 +0.709 +2.633",
}


def _cells(text: str):
    for token in text.split():
        bold = token.endswith("b")
        token = token.rstrip("b")
        stars = len(token) - len(token.rstrip("*"))
        number = token.rstrip("*")
        decimals = len(number.split(".")[1]) if "." in number else 0
        yield number, float(number), decimals, bold, "*" * stars


def paper_printed_values() -> pd.DataFrame:
    """The numbers printed in the paper's Tables 1-9 (arXiv:2606.10703v1), in long form.

    Typed from the paper's text, not read from any data file. Columns: ``table`` (1-9),
    ``model``, ``experiment`` (``"metric"``, ``"control"``, ``"redistribution"``,
    ``"progressive"``), ``metric`` (metric key for Tables 1-3, ``"routing_weight"`` for
    Tables 4-6, else ``None``), ``layer``, ``k`` (Tables 8-9, else ``<NA>``), ``quantity``
    (``d``, ``p_t``, ``p_W``, ``rho`` for Tables 1-6; ``mean_gap_norm``, ``rho_rw_gap``,
    ``rho_gap_comp`` for Table 7; ``mean_delta``, ``median_delta``, ``p95_delta`` for
    Tables 8-9), ``printed`` (the text as printed), ``value`` (float), ``decimals``
    (printed precision), ``bold`` (bold in the paper: uncorrected p_t < 0.05 in Tables 1-3,
    "Bonferroni significance" per the caption of Tables 4-6), ``stars`` (Table 7
    significance markers: * p<0.05, ** p<0.01, *** p<0.001).

    Tables 1-3 print d and p_t only (no p_W). Table 4 (OLMoE control) has no released data.
    """
    rows = []

    def add(table, model, experiment, metric, layer, k, quantity, cell):
        printed, value, decimals, bold, stars = cell
        rows.append({"table": table, "model": model, "experiment": experiment,
                     "metric": metric, "layer": layer, "k": k, "quantity": quantity,
                     "printed": printed, "value": value, "decimals": decimals,
                     "bold": bold, "stars": stars})

    for table, (model, spec) in _T_METRIC.items():
        for metric, (d_row, p_row) in spec.items():
            for quantity, text in (("d", d_row), ("p_t", p_row)):
                for layer, cell in zip(LAYERS[model], _cells(text), strict=True):
                    add(table, model, "metric", metric, layer, None, quantity, cell)
    for table, (model, spec) in _T_CONTROL.items():
        for quantity, text in spec.items():
            for layer, cell in zip(LAYERS[model], _cells(text), strict=True):
                add(table, model, "control", "routing_weight", layer, None, quantity, cell)
    for quantity, text in _T7.items():
        for layer, cell in zip(LAYERS["qwen"], _cells(text), strict=True):
            add(7, "qwen", "redistribution", None, layer, None, quantity, cell)
    for k, text in _T8.items():
        for layer, cell in zip(PROGRESSIVE_LAYERS, _cells(text), strict=True):
            add(8, "olmoe", "progressive", None, layer, k, "mean_delta", cell)
    for quantity, text in _T9.items():
        for layer, cell in zip(PROGRESSIVE_LAYERS, _cells(text), strict=True):
            add(9, "olmoe", "progressive", None, layer, 7, quantity, cell)
    out = pd.DataFrame(rows)
    out["k"] = out["k"].astype("Int64")
    out["metric"] = out["metric"].astype(object).where(out["metric"].notna(), None)
    return out


def agrees_at_printed_precision(value, printed, decimals):
    """Whether ``value`` is consistent with a number printed to ``decimals`` places.

    True when ``|value - printed| <= 0.5 * 10**-decimals`` (plus 1e-12 for floating point),
    i.e. some correct rounding of ``value`` gives the printed number. Works elementwise on
    arrays and Series.
    """
    value = np.asarray(value, dtype=np.float64)
    printed = np.asarray(printed, dtype=np.float64)
    tol = 0.5 * np.power(10.0, -np.asarray(decimals, dtype=np.float64)) + 1e-12
    return np.abs(value - printed) <= tol


# ----------------------------------------------------------------------------- released recipes
# The released scripts' own ways of computing the four observational metrics, re-implemented so
# that they can be applied to any model the book audits (chapter "Beyond the paper (1)"). Sources:
# the released per-token ablation scripts (``per_token_ablation_olmoe.py``,
# ``per_token_ablation_deepseek.py``, ``validation_qwen.py`` of :data:`RELEASED_REPO`), as
# summarised in the project's notes on the released code, "Observational metrics as implemented".

#: the released recipes, named after the script that uses them
RELEASED_RECIPES = ("OLMoE script", "DeepSeek script", "Qwen script")
#: which released recipe audited the real checkpoint that a model family stands in for
RECIPE_OF_FAMILY = {"olmoe": "OLMoE script", "mixtral": "OLMoE script", "deepseek_v2": "DeepSeek script",
                    "qwen2_moe": "Qwen script", "qwen3_moe": "Qwen script"}
#: the paper's definitions (Section 2), recomputed from the same padded pass
PAPER_RECIPE = "paper (re-computed)"
#: the Qwen script's choices: activation norm over the first texts only, std over the first coordinates
QWEN_NORM_TEXTS, QWEN_STD_COORDS = 30, 32


def released_active_threshold(logits, *, top_k: int) -> float:
    """The one threshold the released OLMoE "active" mask reduces to.

    The released OLMoE script (``ExpertMetricsComputer.compute_metrics``) builds the mask of
    "mean routing weight when active" for each expert ``e`` by looping over every recorded
    position ``y`` (padding included), taking ``thr(y)``, the ``top_k``-th largest router logit of
    ``y``, and OR-ing ``logit_e(x) >= thr(y)`` over all ``y`` into the mask of every position ``x``.
    Position ``x`` is therefore admitted iff ``logit_e(x) >= min_y thr(y)``: one threshold for the
    layer, the same for every expert, the smallest top-k cut-off of any position.

    ``logits``: (N, E) array of router logits at every recorded position (E experts); ``top_k``:
    1 <= top_k <= E. Returns the threshold (a logit). ``ValueError`` for a bad shape or ``top_k``.
    """
    lg = _logit_matrix(logits, top_k)
    return float(np.partition(lg, lg.shape[1] - top_k, axis=1)[:, lg.shape[1] - top_k].min())


def released_active_mask(logits, *, top_k: int) -> np.ndarray:
    """(N, E) bool mask of the released OLMoE recipe: ``logits >= released_active_threshold``.

    Admits far more than the ``top_k / E`` share of positions that the router selects (see
    :func:`released_active_threshold`); every position's own top-k is always admitted.
    """
    lg = _logit_matrix(logits, top_k)
    return lg >= released_active_threshold(lg, top_k=top_k)


def released_mean_routing_weight_when_active(logits, *, top_k: int) -> tuple[np.ndarray, float]:
    """The released OLMoE "mean routing weight when active": mean router *logit* over the released mask.

    ``logits``: (N, E) router logits over all recorded positions, padding included (the OLMoE
    gate is a Linear layer, so the released hook records logits, not probabilities). For each
    expert ``e``: the mean of ``logits[:, e]`` over the positions with
    ``logits[:, e] >= released_active_threshold(logits, top_k=top_k)``; 0.0 for an expert with no
    admitted position (the released script's fallback). Computed in float64.

    Returns ``(values, threshold)``: values (E,) in logit units (not probabilities, not nats),
    threshold a float logit. Source: ``per_token_ablation_olmoe.py`` of :data:`RELEASED_REPO`
    (notes on the released code, "Observational metrics as implemented"); the paper's Section 2
    defines the metric as the mean softmax probability over the tokens that select ``e``.
    ``ValueError`` for a bad shape or ``top_k``.
    """
    lg = _logit_matrix(logits, top_k)
    thr = released_active_threshold(lg, top_k=top_k)
    mask = lg >= thr
    count = mask.sum(axis=0)
    total = np.where(mask, lg, 0.0).sum(axis=0)
    values = np.divide(total, count, out=np.zeros(lg.shape[1]), where=count > 0)
    return values, thr


def _logit_matrix(logits, top_k: int) -> np.ndarray:
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or lg.shape[0] < 1 or lg.shape[1] < 1:
        raise ValueError(f"logits must be a non-empty (positions, experts) array, got shape {lg.shape}")
    if not 1 <= int(top_k) <= lg.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, {lg.shape[1]}] for {lg.shape[1]} experts")
    return lg


@dataclass
class PaddedPass:
    """Router and expert quantities at every position of a right-padded corpus (see :func:`padded_router_pass`).

    ``layers[L]`` holds (N = texts x width rows, k = top-k): ``logits`` (N, E) router logits,
    ``idx`` (N, k) selected experts, ``prob`` (N, k) their softmax probabilities, ``norm`` (N, k)
    L2 norms of their raw outputs ``E_i(x)``, ``coords`` (N, k, c) the first c coordinates of those
    outputs. ``real`` (N,) is True at real tokens, False at padding; ``seq_ids`` (N,) the text of
    each row. ``num_experts``, ``top_k``: the layout.
    """

    layers: dict
    real: np.ndarray
    seq_ids: np.ndarray
    num_experts: int
    top_k: int

    @property
    def padding_share(self) -> float:
        return float(1.0 - self.real.mean())


def padded_router_pass(model, corpus, *, layers, texts_per_batch: int = 8,
                       n_coords: int = QWEN_STD_COORDS) -> PaddedPass:
    """Run ``corpus`` right-padded to its longest text (as one released batch would be) and record,
    at every position of ``layers`` (padding included), what the released recipes read.

    ``model``: a :class:`moeaudit.models.AuditModel`; ``corpus``: a tokenized corpus. Padding uses
    ``model.pad_id`` and a zero attention mask, so (causal attention, masked keys) the real
    positions see exactly what a clean pass sees. Returns a :class:`PaddedPass`.
    """
    import torch  # noqa: PLC0415

    from .engine import block_input_in_trace, expert_outputs, routing_in_trace  # noqa: PLC0415

    layers = list(layers)
    for L in layers:
        model.layout.check_layer(L)
    width = int(corpus.lengths.max())
    out = {L: {k: [] for k in ("logits", "idx", "prob", "norm", "coords")} for L in layers}
    real_all, seq_all = [], []
    with torch.no_grad():
        for start in range(0, len(corpus), texts_per_batch):
            chunk = list(range(start, min(start + texts_per_batch, len(corpus))))
            ids, mask = corpus.padded(chunk, pad_id=model.pad_id, length=width)
            saved = {}
            with model.nn.trace(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                remote=model.remote):
                for L in layers:
                    x = block_input_in_trace(model, L).save()  # nnsight: accesses in execution order (input, then router)
                    r_logits, _, r_idx = routing_in_trace(model, L)
                    saved[L] = (x, r_logits.save(), r_idx.save())
            real_all.append(mask.reshape(-1).bool().numpy())
            seq_all.append(np.repeat(np.array(chunk), width))
            for L in layers:
                x, lg, idx = saved[L]
                x = x.reshape(-1, x.shape[-1])
                idx = idx.reshape(x.shape[0], -1)
                lg = lg.reshape(x.shape[0], -1).float()
                y = expert_outputs(model.hf_experts(L), x, idx.to(x.device), call=model.layout.spec.experts_call).float()
                out[L]["logits"].append(lg.cpu().numpy().astype(np.float64))
                out[L]["idx"].append(idx.cpu().numpy().astype(np.int64))
                out[L]["prob"].append(torch.softmax(lg, -1).gather(1, idx.to(lg.device)).cpu().numpy().astype(np.float64))
                out[L]["norm"].append(torch.linalg.vector_norm(y, dim=-1).cpu().numpy().astype(np.float64))
                out[L]["coords"].append(y[..., :n_coords].cpu().numpy().astype(np.float32))
    arrays = {L: {k: np.concatenate(v) for k, v in d.items()} for L, d in out.items()}
    return PaddedPass(layers=arrays, real=np.concatenate(real_all), seq_ids=np.concatenate(seq_all),
                      num_experts=int(model.layout.num_experts), top_k=int(model.layout.top_k))


def per_expert_aggregate(idx, values, rows, *, num_experts: int, how: str) -> np.ndarray:
    """Aggregate ``values`` over the (row, slot) pairs that select each expert, on the ``rows`` kept.

    ``idx``: (N, k) selected experts; ``values``: (N, k) or (N, k, c) numbers per selection;
    ``rows``: (N,) bool. ``how``: ``"mean"``, ``"std"`` (ddof 1 over selections) or
    ``"pooled_std"`` (ddof 1 over every coordinate of every selection, for (N, k, c) values).
    Returns (E,) with NaN for an expert never selected (and for a std over fewer than 2 values).
    """
    if how not in ("mean", "std", "pooled_std"):
        raise ValueError(f"how={how!r} must be 'mean', 'std' or 'pooled_std'")
    idx, values, rows = np.asarray(idx), np.asarray(values), np.asarray(rows, dtype=bool)
    e = idx[rows].reshape(-1)
    v = values[rows].reshape(e.size, -1)
    out = np.full(num_experts, np.nan)
    for j in np.unique(e):
        sel = v[e == j]
        if how == "mean":
            out[j] = sel[:, 0].mean()
        elif sel.size > 1:
            out[j] = (sel[:, 0] if how == "std" else sel.reshape(-1)).std(ddof=1)
    return out


def recipe_metric_tables(padded: PaddedPass, *, recipes=RELEASED_RECIPES) -> dict:
    """The four metrics per (layer, expert) under the paper's definitions and each released recipe.

    Returns ``{recipe: DataFrame}`` with columns ``layer``, ``expert`` and the book's metric names
    (``utilization_rate``, ``activation_norm``, ``mean_routing_weight``, ``activation_std``);
    ``PAPER_RECIPE`` holds the paper's Section 2 definitions on the real positions. Departures:

    * ``"OLMoE script"``: utilization = mean router logit over all positions (padding included);
      mean routing weight = :func:`released_mean_routing_weight_when_active`; activation
      norm/std over every selection, padding included.
    * ``"DeepSeek script"``: utilization = share of all positions (padding included) selecting e.
    * ``"Qwen script"``: utilization = count / (k x real tokens); activation norm over the first
      :data:`QWEN_NORM_TEXTS` texts; activation std = pooled std of the first coordinates.
    """
    E, k, real = padded.num_experts, padded.top_k, padded.real
    everything = np.ones_like(real)
    agg = per_expert_aggregate
    tables = {}
    for recipe in [PAPER_RECIPE, *recipes]:
        if recipe != PAPER_RECIPE and recipe not in RELEASED_RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; valid: {RELEASED_RECIPES}")
        frames = []
        for L, a in padded.layers.items():
            idx = a["idx"]
            m = {"utilization_rate": np.bincount(idx[real].reshape(-1), minlength=E) / real.sum(),
                 "activation_norm": agg(idx, a["norm"], real, num_experts=E, how="mean"),
                 "mean_routing_weight": agg(idx, a["prob"], real, num_experts=E, how="mean"),
                 "activation_std": agg(idx, a["norm"], real, num_experts=E, how="std")}
            if recipe == "OLMoE script":
                m["utilization_rate"] = a["logits"].mean(axis=0)
                m["mean_routing_weight"] = released_mean_routing_weight_when_active(a["logits"], top_k=k)[0]
                m["activation_norm"] = agg(idx, a["norm"], everything, num_experts=E, how="mean")
                m["activation_std"] = agg(idx, a["norm"], everything, num_experts=E, how="std")
            elif recipe == "DeepSeek script":
                m["utilization_rate"] = np.bincount(idx.reshape(-1), minlength=E) / len(idx)
            elif recipe == "Qwen script":
                m["utilization_rate"] = np.bincount(idx[real].reshape(-1), minlength=E) / (k * real.sum())
                m["activation_norm"] = agg(idx, a["norm"], real & (padded.seq_ids < QWEN_NORM_TEXTS),
                                           num_experts=E, how="mean")
                m["activation_std"] = agg(idx, a["coords"], real, num_experts=E, how="pooled_std")
            frames.append(pd.DataFrame({"layer": L, "expert": np.arange(E), **m}))
        tables[recipe] = pd.concat(frames, ignore_index=True)
    return tables


def recipe_rank_agreement(tables: dict, *, metrics=None) -> pd.DataFrame:
    """Spearman rho across experts between the paper's definition and each recipe, per layer and metric.

    ``tables``: the output of :func:`recipe_metric_tables`. Experts where either value is
    undefined are left out (:func:`moeaudit.stats.spearman_defined`). Columns ``recipe``,
    ``layer``, ``metric``, ``rho`` (NaN where undefined), ``experts``.
    """
    from .metrics import METRICS as BOOK_METRICS  # noqa: PLC0415

    metrics = list(BOOK_METRICS if metrics is None else metrics)
    paper = tables[PAPER_RECIPE].set_index(["layer", "expert"])
    rows = []
    for recipe, t in tables.items():
        if recipe == PAPER_RECIPE:
            continue
        t = t.set_index(["layer", "expert"]).loc[paper.index]
        for L in paper.index.get_level_values("layer").unique():
            for metric in metrics:
                rho, _, n = spearman_defined(paper.loc[L, metric], t.loc[L, metric])
                rows.append({"recipe": recipe, "layer": L, "metric": metric, "rho": rho, "experts": n})
    return pd.DataFrame(rows)


def ablation_agreement(records_a: pd.DataFrame, records_b: pd.DataFrame, *, last_layer: int) -> pd.DataFrame:
    """Per layer: how far two sets of single-expert records of the same ablations lie apart.

    Records are matched on (``seq_id``, ``t``, ``layer``, ``expert``). Columns: ``layer``,
    ``last`` (``layer == last_layer``), ``max_diff`` and ``median_diff`` of ``|delta_a - delta_b|``,
    ``floor`` (the largest ``|clean_loss_a - clean_loss_b|`` over all matched records: two
    computations of the same un-ablated loss), ``median_abs_a``/``median_abs_b`` (median
    ``|delta|``), ``rho`` (Spearman over records), ``records``. Losses in nats.
    """

    key = ["seq_id", "t", "layer", "expert"]
    tw = records_a[key + ["delta_loss", "clean_loss"]].merge(records_b[key + ["delta_loss", "clean_loss"]],
                                                             on=key, suffixes=("_a", "_b"))
    if tw.empty:
        raise ValueError("the two sets of records share no (seq_id, t, layer, expert)")
    tw["diff"] = (tw.delta_loss_a - tw.delta_loss_b).abs()
    floor = float((tw.clean_loss_a - tw.clean_loss_b).abs().max())
    rows = []
    for L, g in tw.groupby("layer"):
        rows.append({"layer": int(L), "last": int(L) == last_layer, "max_diff": float(g["diff"].max()),
                     "median_diff": float(g["diff"].median()), "floor": floor,
                     "median_abs_a": float(g.delta_loss_a.abs().median()),
                     "median_abs_b": float(g.delta_loss_b.abs().median()),
                     "rho": spearman_defined(g.delta_loss_a, g.delta_loss_b)[0], "records": len(g)})
    return pd.DataFrame(rows)


def compare_audit_variants(cells: pd.DataFrame, table: pd.DataFrame, variant_a: str, variant_b: str, *,
                           alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per audit cell present under both variants: d_z of each, the paired-bootstrap CI of
    their difference, and whether the verdict changes.

    ``cells``: paired cells (``moeaudit.audit.paired_cells`` output) with columns ``variant``,
    ``model``, ``ranking``, ``layer``, ``seq_id``, ``t``, ``diff`` (D = delta_high - delta_low, nats);
    ``table``: ``moeaudit.stats.audit_table`` of those cells by (``model``, ``variant``, ``set``,
    ``ranking``, ``layer``). Positions are matched on (seq_id, t); the interval is
    :func:`moeaudit.stats.dz_difference_ci` (seed ``seed + row``). Columns: the key, ``n``,
    ``dz_a``, ``dz_b``, ``ddz`` (d_z(a) - d_z(b) on the matched positions), ``ddz_lo``, ``ddz_hi``,
    ``dual_a``/``dual_b`` (dual rule, Bonferroni within the family), ``p05_a``/``p05_b``
    (uncorrected p_t < ``alpha``), ``p_t_a``, ``p_t_b``, ``flip_dual``, ``flip_p05``, ``ci_excludes_0``
    (the interval excludes 0 *and* ``|ddz|`` exceeds :data:`DDZ_TOLERANCE`, so that a difference
    that is float rounding, e.g. ``1e-6`` with an interval ``[+0.000, +0.000]``, is not counted).
    """

    key = ["model", "set", "ranking", "layer"]
    ta, tb = (table[table.variant == v].set_index(key) for v in (variant_a, variant_b))
    groups = {v: dict(list(cells[cells.variant == v].groupby(["model", "ranking", "layer"], sort=False)))
              for v in (variant_a, variant_b)}
    rows = []
    for i, (k, ra) in enumerate(ta.iterrows()):
        if k not in tb.index:
            continue
        rb = tb.loc[k]
        ca, cb = groups[variant_a][k[0], k[2], k[3]], groups[variant_b][k[0], k[2], k[3]]
        both = ca[["seq_id", "t", "diff"]].merge(cb[["seq_id", "t", "diff"]], on=["seq_id", "t"], suffixes=("_a", "_b"))
        lo, hi = dz_difference_ci(both.diff_a, both.diff_b, n_boot=n_boot, seed=seed + i)
        rows.append({**dict(zip(key, k)), "n": len(both), "dz_a": float(ra.cohens_dz), "dz_b": float(rb.cohens_dz),
                     "ddz": cohens_dz(both.diff_a) - cohens_dz(both.diff_b), "ddz_lo": lo, "ddz_hi": hi,
                     "dual_a": bool(ra.sig_dual_bonf), "dual_b": bool(rb.sig_dual_bonf),
                     "p05_a": bool(ra.p_t < alpha), "p05_b": bool(rb.p_t < alpha),
                     "p_t_a": float(ra.p_t), "p_t_b": float(rb.p_t)})
    out = pd.DataFrame(rows)
    out["flip_dual"] = out.dual_a != out.dual_b
    out["flip_p05"] = out.p05_a != out.p05_b
    out["ci_excludes_0"] = ((out.ddz_lo > 0) | (out.ddz_hi < 0)) & (out.ddz.abs() > DDZ_TOLERANCE)
    return out


def variant_flip_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per model, from :func:`compare_audit_variants`: ``cells``, ``max_abs_ddz``, ``median_abs_ddz``,
    ``ci_excluding_0`` (count), ``flips_dual`` and ``flips_p05`` (counts of changed verdicts)."""
    return (comparison.assign(abs_ddz=comparison.ddz.abs())
            .groupby("model", sort=False)
            .agg(cells=("ddz", "size"), max_abs_ddz=("abs_ddz", "max"), median_abs_ddz=("abs_ddz", "median"),
                 ci_excluding_0=("ci_excludes_0", "sum"), flips_dual=("flip_dual", "sum"),
                 flips_p05=("flip_p05", "sum"))
            .reset_index())


def top_expert_raises_loss(records: pd.DataFrame) -> float:
    """Share of (position, layer) pairs at which removing the active expert with the largest router
    probability (``prob``) raises the loss (``delta_loss > 0``), from single-expert records."""
    top = records.sort_values(["seq_id", "t", "layer", "prob"], ascending=[True, True, True, False])
    top = top.groupby(["seq_id", "t", "layer"], sort=False).head(1)
    return float((top.delta_loss > 0).mean())


def precision_noise(full: pd.DataFrame, half: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Single-expert records of one model in a full and a half precision, matched on (seq_id, t,
    layer, expert) (ablations of an expert active in both precisions).

    Returns ``(matched, summary)``: ``matched`` has ``delta_loss_full``/``_half``,
    ``clean_loss_full``/``_half``, ``abs_full`` = ``|delta_full|`` and ``err`` =
    ``|delta_half - delta_full|`` (nats); ``summary`` has ``matched``, ``share_matched``,
    ``median_clean_diff``, ``median_err``, ``p95_err``, ``median_abs_full``,
    ``share_below_p95_err`` (share of |delta_full| below the 95th percentile of ``err``),
    ``sign_flips`` (share of records, both deltas non-zero, whose sign differs),
    ``top_raises_full``/``top_raises_half`` (:func:`top_expert_raises_loss`).
    """
    key = ["seq_id", "t", "layer", "expert"]
    m = full[key + ["delta_loss", "clean_loss"]].merge(half[key + ["delta_loss", "clean_loss"]], on=key,
                                                       suffixes=("_full", "_half"))
    if m.empty:
        raise ValueError("no ablation is matched between the two precisions")
    m["abs_full"] = m.delta_loss_full.abs()
    m["err"] = (m.delta_loss_half - m.delta_loss_full).abs()
    nz = (m.delta_loss_full != 0) & (m.delta_loss_half != 0)
    p95 = float(m.err.quantile(0.95))
    summary = {
        "matched": len(m), "share_matched": len(m) / len(full),
        "median_clean_diff": float((m.clean_loss_half - m.clean_loss_full).abs().median()),
        "median_err": float(m.err.median()), "p95_err": p95, "median_abs_full": float(m.abs_full.median()),
        "share_below_p95_err": float((m.abs_full < p95).mean()),
        "sign_flips": float((np.sign(m.delta_loss_full[nz]) != np.sign(m.delta_loss_half[nz])).mean()),
        "top_raises_full": top_expert_raises_loss(full), "top_raises_half": top_expert_raises_loss(half),
    }
    return m, summary


def float16_spacing(x) -> np.ndarray:
    """The gap between ``|x|`` and the next larger float16 number (``numpy.spacing`` in float16), as float64.

    A loss of about 2.5 nats stored in float16 is a multiple of ``2**-9``; the difference of two such
    losses is exact to that step. Elementwise on arrays.
    """
    return np.spacing(np.abs(np.asarray(x, dtype=np.float16))).astype(np.float64)


def progressive_in_float16_steps(progressive: pd.DataFrame) -> pd.DataFrame:
    """The released progressive-ablation summary (:func:`progressive_ablation`) in float16 steps.

    Per (layer, k): ``step`` = :func:`float16_spacing` at the layer's ``baseline_loss_mean`` (the
    resolution of one float16 loss there, nats), and ``median_steps``, ``p25_steps``, ``p75_steps``
    = |median|, |25th|, |75th percentile| of the loss change divided by ``step``; ``n_on_2_16``: how
    many of the three are exact multiples of ``2**-16`` (0-3).
    """
    out = progressive[["layer", "k", "median_delta", "p25_delta", "p75_delta", "share_positive",
                       "baseline_loss_mean"]].copy()
    out["step"] = float16_spacing(out.baseline_loss_mean)
    for q in ("median", "p25", "p75"):
        out[f"{q}_steps"] = out[f"{q}_delta"].abs() / out.step
    q = out[["median_delta", "p25_delta", "p75_delta"]].to_numpy() * 2.0 ** 16
    out["n_on_2_16"] = (np.abs(q - np.round(q)) < 1e-6).sum(axis=1)
    return out


# ----------------------------------------------------------------------------- phrasing the comparisons
def released_digits(value: float, printed_value: float, decimals: int, *, max_extra: int = 8) -> str:
    """``value`` written with enough decimals to show how it compares with a number printed to ``decimals`` places.

    The fewest decimals ``k > decimals`` at which the written value itself lies more than half a unit of the
    printed precision from ``printed_value`` (so a reader sees why it does not round to the printed number), or,
    when ``value`` does agree, at which the written value lies within that half unit; at most
    ``decimals + max_extra``. Example: ``released_digits(0.027496, 0.028, 3)`` gives ``"0.027496"`` where
    four decimals would show the ambiguous ``0.0275``. Source: :func:`agrees_at_printed_precision`.
    """
    agrees = bool(agrees_at_printed_precision(value, printed_value, decimals))
    tol = 0.5 * 10.0 ** -decimals
    for k in range(decimals + 1, decimals + max_extra + 1):
        text = f"{value:.{k}f}"
        dist = abs(float(text) - printed_value)
        if (dist <= tol + 1e-15) if agrees else (dist > tol + 1e-15):
            return text
    return f"{value:.{decimals + max_extra}f}"


def mismatch_phrase(long: pd.DataFrame) -> str:
    """The rows of :func:`compare_printed` output that do not agree, as a phrase: ``"none"``, or items such as
    ``"DeepSeek-V2-Lite activation norm Layer 1, p_t: printed 0.028, released 0.027496"`` joined by ``"; "``,
    with the released value written by :func:`released_digits`."""
    bad = long[~long.agrees.astype(bool)]
    if bad.empty:
        return "none"
    return "; ".join(f"{MODELS[r.model]}" + (f" {RANKING_LABELS[r.metric].lower()}" if r.metric else "")
                     + f" Layer {r.layer}, {r.quantity}: printed {r.printed}, released "
                     + released_digits(r.recomputed, r.value, int(r.decimals)) for r in bad.itertuples())


def agreement_phrase(long: pd.DataFrame) -> str:
    """How many printed numbers of :func:`compare_printed` output agree, as the subject and verb of a sentence:
    ``"all 20 agree"``, ``"the one printed number agrees"``, ``"78 of the 80 agree"``, ``"none of the 5 agrees"``."""
    k, n = int(long.agrees.sum()), len(long)
    if n == 1:
        return "the one printed number agrees" if k else "the one printed number does not agree"
    return (f"all {n} agree" if k == n else "none of the {n} agrees".format(n=n) if k == 0
            else f"{k} of the {n} agree")


def side_by_side_as_printed(long: pd.DataFrame, *, index, quantities) -> pd.DataFrame:
    """:func:`printed_side_by_side` with each ``"<q> paper"`` column holding the number as the paper prints it
    (the ``printed`` text of :func:`paper_printed_values`, e.g. ``"0.0013"``, ``"+0.231"``) instead of a float."""
    out = printed_side_by_side(long, index=index, quantities=quantities)
    text = with_paper_labels(long.pivot(index=list(index), columns="quantity", values="printed").reset_index())
    keys = list(index)
    merged = out[keys].merge(text, on=keys, how="left")
    for q in quantities:
        out[f"{q} paper"] = merged[q].to_numpy()
    return out


def layer_correlation_of_d(records: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """How alike the layers of one metric are, given that they share their positions.

    ``records``: :func:`metric_comparisons` rows (positions identified by ``global_token_idx``; D =
    ``delta_high - delta_low``, nats). For every (model, metric) and every pair of layers, Spearman's rho of D
    between the two layers across the positions they share (:func:`moeaudit.stats.spearman_defined`). One row per
    (model, metric): ``pairs`` (layer pairs with a defined rho), ``positions`` (shared positions, smallest over the
    pairs), ``rho median``, ``rho min``, ``rho max``, ``significant`` (pairs with two-sided p < ``alpha``,
    uncorrected).
    """
    rows = []
    for (model, metric), g in records.groupby(["model", "metric"], sort=False):
        wide = g.assign(D=g.delta_high - g.delta_low).pivot_table(index="global_token_idx", columns="layer", values="D")
        layers = list(wide.columns)
        rhos, ns, ps = [], [], []
        for i, a in enumerate(layers):
            for b in layers[i + 1:]:
                rho, p, n = spearman_defined(wide[a].to_numpy(), wide[b].to_numpy())
                if np.isfinite(rho):
                    rhos.append(rho)
                    ns.append(n)
                    ps.append(p)
        rows.append({"model": model, "metric": metric, "pairs": len(rhos), "positions": min(ns) if ns else 0,
                     "rho median": float(np.median(rhos)) if rhos else np.nan,
                     "rho min": float(np.min(rhos)) if rhos else np.nan, "rho max": float(np.max(rhos)) if rhos else np.nan,
                     "significant": int((np.asarray(ps) < alpha).sum())})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    raise SystemExit(main())


#: a difference of two Cohen's d_z smaller than this is treated as numerically zero: it rounds to
#: +0.000 or -0.000 at the three decimals the comparison tables print (used by
#: :func:`compare_audit_variants` for ``ci_excludes_0``; a bootstrap interval around a difference of
#: float rounding can exclude zero without any difference between the variants)
DDZ_TOLERANCE: float = 5e-4

#: ``hidden_size`` in the config.json of the paper's checkpoints (OLMoE-1B-7B-0924,
#: Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite), keyed as in :data:`LAYERS`
CHECKPOINT_HIDDEN_SIZE: dict[str, int] = {"olmoe": 2048, "qwen": 2048, "deepseek": 2048}

#: share of padding among the positions the released OLMoE metric script records (the released-code
#: notes: all texts in one batch padded to the longest, "~62% padding"); approximate
RELEASED_OLMOE_PADDING_SHARE: float = 0.62


def float16_steps_caveat(deltas, *, losses=(4.0, 8.0)) -> pd.DataFrame:
    """How many loss changes lie within one float16 step of zero when the step is taken at a larger loss.

    A float16 loss near ``x`` nats is a multiple of :func:`float16_spacing` ``(x)``, which doubles at
    each power of two (``2**-9`` from 2 nats, ``2**-8`` from 4, ``2**-7`` from 8); a difference of two
    losses near ``x`` is resolved only to that step. ``deltas``: loss changes (nats); ``losses``: the
    loss levels at which the step is taken. One row per level: ``loss``, ``step`` (nats) and
    ``n_within`` (count of ``|delta| <= step``) out of ``n``.
    """
    d = np.abs(np.asarray(deltas, dtype=np.float64))
    return pd.DataFrame([{"loss": float(x), "step": float(float16_spacing(x)), "n_within": int((d <= float16_spacing(x)).sum()),
                          "n": int(d.size)} for x in losses])
