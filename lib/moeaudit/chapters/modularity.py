"""Chapter 13 (a pre-registered modularity study of Command A+): its released data, re-analysed.

The study (Salomone, Gandhi and Asaria, "How Modular Is a Frontier Mixture-of-Experts? A
Pre-registered Causal Test in Which Apparent Expert Modularity Mostly Dissolves", arXiv 2606.25092)
released, under CC BY 4.0, the files of repository :data:`SOURCE_REPO` at commit :data:`SOURCE_COMMIT`:
a routing-mass atlas of Command A+ (11 probe categories x 32 layers x 128 experts), the frozen
pre-registered expert families, and the verdict tables of the family ablations (W4A4 and BF16).

Data access follows the pattern of :mod:`moeaudit.released`: the originals are read from
``<data_dir>/command-a-modularity/`` (``data_dir`` or ``$MOEAUDIT_DATA_DIR``) when that folder exists,
each checked against the sha256 recorded in the provenance file; otherwise the compact derived table
shipped with the package (:data:`EMBEDDED_TABLE`, built by ``python -m moeaudit.chapters.modularity pack``)
is read. Only numbers are embedded: the atlas masses, the family memberships, the verdict values and a
few short figures that the study states in its result files (:func:`study_statements`).

The analyses are pure functions of these tables: the re-derivation of the pre-registration from the
atlas (:func:`expert_lift`, :func:`top_k_families`, :func:`family_agreement`), both decision rules with
what the published precision resolves (:func:`decision_table`), and the comparison of observational
family statistics with the causal effects (:func:`family_observational`, :func:`rung_correlations`).
Effects are increases in per-token negative log-likelihood, in nats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moeaudit import paths, report, stats
from moeaudit.derived import read_derived, sha256, write_derived

__all__ = [
    "SOURCE_REPO", "SOURCE_COMMIT", "SOURCE_URL", "FOLDER", "SOURCE_FILES", "EMBEDDED_TABLE", "TESTED_FAMILIES",
    "ModularitySource", "ModularityDataError", "source", "show_source", "embedded_provenance", "derived_tables", "pack",
    "atlas_mass", "prereg_families", "verdicts", "study_statements",
    "mass_array", "expert_lift", "top_k_families", "family_agreement", "passed_over_experts",
    "decision_table", "rule_counts", "family_observational", "family_depth_profile", "causal_measures",
    "rung_correlations", "rank_power",
    "source_sentence", "prereg_sentence", "rules_sentence", "precision_sentence", "ci_rule_sentence",
    "rung_sentence", "power_sentence", "LABELS",
    "EMBEDDED_TOPICS", "embedded_topic", "topic_atlas", "family_requests", "family_effects", "shipped_sentence",
    "frozen_map", "lift_reproduced", "jaccard", "topic_families", "FAMILY_NAMES", "agreement_display",
    "replacement_sentence", "overlap_sentence", "count_table", "decision_display", "counts_sentence",
    "families_needed", "decimals_to_resolve", "exercise_answers", "shows_sentences",
]

SOURCE_REPO = "transformerlab/exp-command-a-plus-moe-modularity"
SOURCE_COMMIT = "3fc9244"
SOURCE_URL = f"https://github.com/{SOURCE_REPO}"
#: the folder of the data directory that holds the originals (same relative paths as the repository)
FOLDER = "command-a-modularity"
#: the original files the derived table is built from
SOURCE_FILES: tuple[str, ...] = ("atlas/atlas_mass.json", "atlas/prereg_map.json",
                                 "results/consolidation_verdict.json", "results/bf16_verdict.json")
EMBEDDED_TABLE = Path(__file__).resolve().parents[1] / "data" / "command_a_derived.parquet"
EMBEDDED_PROVENANCE = EMBEDDED_TABLE.with_suffix(".json")
#: the six pre-registered families that were ablated, in the order of the study's verdict table
TESTED_FAMILIES: tuple[str, ...] = ("ar", "es", "zh", "math", "code", "general")
#: the two precisions of the verdict files
PRECISIONS: dict[str, str] = {"W4A4": "results/consolidation_verdict.json", "BF16": "results/bf16_verdict.json"}


class ModularityDataError(ValueError):
    """An original file is missing or differs from the one the provenance record names."""


# ----------------------------------------------------------------------------- reading the originals


def _read_json(root: Path, rel: str, **kw):
    return json.loads((root / rel).read_text(encoding="utf-8"), **kw)


def _atlas_from_files(root: Path) -> pd.DataFrame:
    """The routing-mass atlas: one row per (category, layer, expert), ``mass`` = summed router weight."""
    d = _read_json(root, "atlas/atlas_mass.json")
    cats, layers, E = d["categories"], [int(x) for x in d["layers"]], int(d["num_experts"])
    mass = np.array([[d["mass"][c][str(L)] for L in layers] for c in cats], dtype=np.float64)
    if mass.shape != (len(cats), len(layers), E):
        raise ModularityDataError(f"atlas/atlas_mass.json: expected {len(cats)} x {len(layers)} x {E} masses, "
                                  f"got shape {mass.shape}")
    c, L, e = np.meshgrid(np.arange(len(cats)), layers, np.arange(E), indexing="ij")
    return pd.DataFrame({"category": np.array(cats, dtype=object)[c.ravel()], "layer": L.ravel().astype(np.int64),
                         "expert": e.ravel().astype(np.int64), "mass": mass.ravel()})


def _prereg_from_files(root: Path) -> pd.DataFrame:
    """The frozen pre-registration: one row per (family, expert) with ``role`` ``"family"``, and the
    shared core as rows of family ``"shared_core"``; ``frozen_mean_lift`` and ``family_k`` as stated."""
    p = _read_json(root, "atlas/prereg_map.json")
    rows = [{"family": f, "expert": int(e), "role": "family", "frozen_mean_lift": float(p["family_mean_lift"][f]),
             "family_k": int(p["family_K"])} for f, members in p["families"].items() for e in members]
    rows += [{"family": "shared_core", "expert": int(e), "role": "shared_core", "frozen_mean_lift": np.nan,
              "family_k": int(p["family_K"])} for e in p["roles"]["shared_core"]]
    return pd.DataFrame(rows)


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _verdicts_from_files(root: Path) -> pd.DataFrame:
    """Both verdict tables, one row per (precision, family); numbers as published, ``decimals`` the most
    decimals any number of the precision's table is published with."""
    rows = []
    for precision, rel in PRECISIONS.items():
        raw = _read_json(root, rel, parse_float=str)  # numbers as written, to read their precision
        n_axis = raw.get("n_per_axis") or _read_json(root, PRECISIONS["W4A4"])["n_per_axis"]
        texts = [v for fam in raw["verdict"].values() for k, v in fam.items()
                 if k in ("on_target", "null_mean_plus_2sigma", "worst_off_target")
                 or k == "on_target_CI"]
        flat = [t for v in texts for t in (v if isinstance(v, list) else [v]) if isinstance(t, str)]
        decimals = max(_decimals(t) for t in flat)
        for fam, v in raw["verdict"].items():
            f = (lambda x: np.nan if x is None else float(x))
            rows.append({"precision": precision, "family": fam, "domain": v["domain"],
                         "on_target": f(v["on_target"]), "ci_low": f(v["on_target_CI"][0]),
                         "ci_high": f(v["on_target_CI"][1]), "null_2sigma": f(v["null_mean_plus_2sigma"]),
                         "worst_off": f(v.get("worst_off_target")), "worst_off_axis": v.get("worst_off_axis"),
                         "stated_point": (np.nan if "point_rule_modular" not in v else float(v["point_rule_modular"])),
                         "stated_ci": float(v["ci_rule_modular"]),
                         "n_items": int(n_axis["language" if v["domain"] == "lang" else fam]),
                         "decimals": decimals})
    return pd.DataFrame(rows)


#: short figures the study states in its result files: key -> (file, field, pattern, group); each value is
#: a number read out of a statement by the pattern, never the statement itself
_STATEMENTS = {
    "point_count": ("results/consolidation_verdict.json", ("summary", "modular_point_rule"), r"(\d+)/\d+", 1),
    "n_families": ("results/consolidation_verdict.json", ("summary", "modular_point_rule"), r"\d+/(\d+)", 1),
    "ci_count": ("results/consolidation_verdict.json", ("summary", "modular_conservative_CI"), r"(\d+)/\d+", 1),
    "bf16_ci_count": ("results/bf16_verdict.json", ("summary", "modular_conservative_CI"), r"(\d+)/\d+", 1),
    "es_point_margin": ("results/consolidation_verdict.json", ("summary", "modular_point_rule"),
                        r"es passes selectivity by ([0-9.]+)", 1),
    "code_point_margin": ("results/consolidation_verdict.json", ("summary", "modular_point_rule"),
                          r"code \(rejected\) fails by ([0-9.]+)", -1),
    "bf16_es_point_margin": ("results/bf16_verdict.json", ("verdict", "es", "note"), r"FAIL by ([0-9.]+)", -1),
    "es_ar_shared_experts": ("results/consolidation_verdict.json", ("verdict", "es", "note"),
                             r"only (\d+) of \d+ experts", 1),
    "es_ar_jaccard": ("results/consolidation_verdict.json", ("verdict", "es", "note"), r"Jaccard ([0-9.]+)", 1),
    "n_random_null": ("results/consolidation_verdict.json", ("n_random_null",), None, 1),
    "n_bootstrap": ("results/consolidation_verdict.json", ("n_bootstrap",), None, 1),
}


def _statements_from_files(root: Path) -> pd.DataFrame:
    rows = []
    for key, (rel, field, pattern, sign) in _STATEMENTS.items():
        value = _read_json(root, rel)
        for k in field:
            value = value[k]
        if pattern is not None:
            m = re.search(pattern, value)
            if m is None:
                raise ModularityDataError(f"{rel}: the field {'.'.join(field)} no longer states {key}")
            value = m.group(1)
        rows.append({"key": key, "value": sign * float(value), "file": rel, "field": ".".join(field)})
    return pd.DataFrame(rows)


_BUILDERS = {"atlas_mass": _atlas_from_files, "prereg_families": _prereg_from_files,
             "verdicts": _verdicts_from_files, "study_statements": _statements_from_files}
DERIVED_TABLES: tuple[str, ...] = tuple(_BUILDERS)


def _check_files(root: Path, expected: dict | None) -> None:
    """``ModularityDataError`` naming the first file that is missing or whose sha256 differs from ``expected``."""
    for rel in SOURCE_FILES:
        if not (root / rel).is_file():
            raise ModularityDataError(f"{root / rel} is missing: the folder must hold {', '.join(SOURCE_FILES)} "
                                      f"as in {SOURCE_REPO} at commit {SOURCE_COMMIT}")
    for rel, sha in (expected or {}).items():
        got = sha256(root / rel)
        if got != sha:
            raise ModularityDataError(f"{root / rel} differs from the file of {SOURCE_REPO} at commit {SOURCE_COMMIT} "
                                      f"(sha256 {got[:12]}..., expected {sha[:12]}...): restore the original file")


def derived_tables(root: str | os.PathLike, *, check: bool = True) -> dict[str, pd.DataFrame]:
    """Every derived table built from the original files in ``root`` (a ``command-a-modularity/`` folder).
    With ``check`` each file is first compared with the sha256 of the provenance record (when there is one).
    Raises :class:`ModularityDataError` naming a missing or changed file."""
    root = Path(root)
    _check_files(root, embedded_provenance().get("source_files") if check and EMBEDDED_PROVENANCE.is_file() else None)
    return {name: build(root) for name, build in _BUILDERS.items()}


# ----------------------------------------------------------------------------- sources and the embedded table


@dataclass(frozen=True)
class ModularitySource:
    """Where the study's data is read from: ``kind`` ``"files"`` (``path`` the originals' folder) or
    ``"embedded"`` (``path`` :data:`EMBEDDED_TABLE`; ``reason`` says why the originals were not read)."""

    kind: str
    path: Path
    reason: str | None = None

    def describe(self) -> str:
        if self.kind == "files":
            return (f"the original files of {SOURCE_REPO} at commit {SOURCE_COMMIT}, read from {self.path} "
                    "(each checked against its recorded sha256)")
        prov = embedded_provenance()
        return (f"the derived table shipped with moeaudit ({EMBEDDED_TABLE.name}), built by `python -m "
                f"moeaudit.chapters.modularity pack` from {len(prov['source_files'])} files of {prov['source_repository']} "
                f"at commit {prov['source_commit']} (sha256 of each in {EMBEDDED_PROVENANCE.name})")


def source(data_dir: str | os.PathLike | None = None) -> ModularitySource:
    """The originals when ``<data_dir>/command-a-modularity/`` exists (``data_dir`` or ``$MOEAUDIT_DATA_DIR``),
    else the embedded derived table. ``ModularityDataError`` when the folder exists but a file is missing or
    changed; ``FileNotFoundError`` when neither is available."""
    d = paths.data_dir(data_dir)
    folder = d / FOLDER if d is not None else None
    if folder is not None and folder.is_dir():
        _check_files(folder, embedded_provenance().get("source_files") if EMBEDDED_PROVENANCE.is_file() else None)
        return ModularitySource("files", folder)
    if not EMBEDDED_TABLE.is_file():
        raise FileNotFoundError(f"neither a {FOLDER}/ folder in the data directory nor the embedded table "
                                f"{EMBEDDED_TABLE} is available")
    reason = (f"the data directory {d} holds no {FOLDER}/ folder" if d is not None
              else f"no data directory is set (${paths.DATA_DIR_ENV})")
    return ModularitySource("embedded", EMBEDDED_TABLE, reason)


def show_source(data_dir=None) -> ModularitySource:
    """Display, in a note box, which source of the study's data this page reads (:func:`source`), and return it."""
    from IPython.display import display  # noqa: PLC0415

    src = source(data_dir)
    sentence = source_sentence(src)
    what = re.sub(r"`([^`]+)`", r"<code>\1</code>", report.text_html(sentence))  # no raw $NAME on the page
    title = "Study data: the original files" if src.kind == "files" else "Study data: the embedded derived table"
    display(report.admonition("note", title, f"<p>{what}</p>", f"{title}. {sentence}"))
    return src


def embedded_provenance() -> dict:
    """The provenance record of the embedded table (source repository, commit, sha256 of every source
    file, each table's columns and dtypes). ``FileNotFoundError`` if it is missing."""
    if not EMBEDDED_PROVENANCE.is_file():
        raise FileNotFoundError(f"{EMBEDDED_PROVENANCE} is missing; build it with "
                                "`python -m moeaudit.chapters.modularity pack SRC`")
    return json.loads(EMBEDDED_PROVENANCE.read_text(encoding="utf-8"))


_CACHE: dict[tuple, pd.DataFrame] = {}


def _embedded(name: str) -> pd.DataFrame:
    key = ("embedded", name, EMBEDDED_TABLE.stat().st_mtime_ns)
    if key not in _CACHE:
        embedded_provenance()  # a clear error when the table is missing
        _CACHE[key] = read_derived(EMBEDDED_TABLE, name)
    return _CACHE[key].copy()


def _table(name: str, data_dir) -> pd.DataFrame:
    src = source(data_dir)
    if src.kind == "embedded":
        return _embedded(name)
    key = ("files", name, str(src.path))
    if key not in _CACHE:
        _CACHE[key] = _BUILDERS[name](src.path)
    return _CACHE[key].copy()


def atlas_mass(*, data_dir=None) -> pd.DataFrame:
    """The routing-mass atlas: columns ``category``, ``layer``, ``expert``, ``mass`` (summed router weight of
    the expert over the category's probe tokens at that layer; 11 x 32 x 128 rows)."""
    return _table("atlas_mass", data_dir)


def prereg_families(*, data_dir=None) -> pd.DataFrame:
    """The frozen family map: columns ``family``, ``expert``, ``role`` (``"family"`` or ``"shared_core"``),
    ``frozen_mean_lift`` (the study's stated mean lift of the family), ``family_k`` (16)."""
    return _table("prereg_families", data_dir)


def verdicts(*, data_dir=None) -> pd.DataFrame:
    """The verdict tables (W4A4 and BF16): ``precision``, ``family``, ``domain``, ``on_target``, ``ci_low``,
    ``ci_high`` (95% bootstrap interval), ``null_2sigma`` (random-16 null mean + 2 sd), ``worst_off`` and
    ``worst_off_axis`` (largest within-domain off-target effect; missing for W4A4 ``general``), the study's
    ``stated_point``/``stated_ci`` verdicts (1/0; BF16 states no point verdict: NaN), ``n_items`` and
    ``decimals`` (the precision the table is published with). Effects in nats per token."""
    return _table("verdicts", data_dir)


def study_statements(*, data_dir=None) -> dict[str, float]:
    """Short figures the study states in its result files (counts, margins), keyed as in
    :data:`_STATEMENTS`: ``point_count``, ``n_families``, ``ci_count``, ``bf16_ci_count``,
    ``es_point_margin``, ``code_point_margin``, ``bf16_es_point_margin`` (signed, nats), ``es_ar_shared_experts``,
    ``es_ar_jaccard``, ``n_random_null``, ``n_bootstrap``."""
    t = _table("study_statements", data_dir)
    return dict(zip(t.key, t.value.astype(float)))


def pack(src: str | os.PathLike | None = None, *, out: str | os.PathLike | None = None) -> Path:
    """Build the embedded derived table from the original files (``python -m moeaudit.chapters.modularity pack [SRC]``).

    ``src`` is a ``command-a-modularity/`` folder (default: the one in ``$MOEAUDIT_DATA_DIR``). Writes ``out``
    (default :data:`EMBEDDED_TABLE`; the tables of :data:`DERIVED_TABLES` stacked with a ``table`` column) and
    beside it the provenance JSON. When a provenance record exists, every file must match its sha256.
    Raises :class:`ModularityDataError` naming a missing or changed file, ``FileNotFoundError`` without ``src``.
    """
    if src is None:
        d = paths.data_dir(None)
        if d is None:
            raise FileNotFoundError(f"give the {FOLDER}/ folder (pack SRC) or set ${paths.DATA_DIR_ENV}")
        src = d / FOLDER
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder holding {', '.join(SOURCE_FILES)}")
    tables = derived_tables(root)
    out = Path(out) if out is not None else EMBEDDED_TABLE
    write_derived(tables, out, {
        "source_repository": SOURCE_REPO, "source_commit": SOURCE_COMMIT, "source_url": SOURCE_URL,
        "licence": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
        "attribution": "Tony Salomone, Deep Gandhi, Ali Asaria (Transformer Lab), arXiv 2606.25092",
        "source_files": {rel: sha256(root / rel) for rel in SOURCE_FILES},
        "generated_by": "python -m moeaudit.chapters.modularity pack"})
    _CACHE.clear()
    return out


# ----------------------------------------------------------------------------- rung 1: the atlas and the pre-registration


def mass_array(atlas: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """The atlas as ``(categories, mass)`` with ``mass`` of shape (categories, layers, experts), categories in
    their order of appearance. ``ValueError`` if a (category, layer, expert) cell is missing or repeated."""
    cats = list(dict.fromkeys(atlas["category"]))
    layers, experts = sorted(atlas["layer"].unique()), sorted(atlas["expert"].unique())
    if len(atlas) != len(cats) * len(layers) * len(experts) or atlas.duplicated(["category", "layer", "expert"]).any():
        raise ValueError("the atlas must hold exactly one mass per (category, layer, expert)")
    wide = atlas.set_index(["category", "layer", "expert"])["mass"]
    idx = pd.MultiIndex.from_product([cats, layers, experts])
    return cats, wide.reindex(idx).to_numpy(np.float64).reshape(len(cats), len(layers), len(experts))


def expert_lift(mass: np.ndarray) -> np.ndarray:
    """Routing lift of every expert for every category, shape (categories, experts).

    ``share[c, e] = sum_l mass[c, l, e] / sum_{l, e'} mass[c, l, e']`` (the expert's fraction of category
    c's routing mass, pooled over layers) and ``lift[c, e] = share[c, e] / mean_{c'} share[c', e]`` (mean
    over every category of the atlas). This definition is reconstructed: the study names it "top-K by lift"
    without a formula; it reproduces the study's stated mean lift of all 11 families to the three decimals
    published. ``mass`` has shape (categories, layers, experts), non-negative; ``ValueError`` otherwise or
    when a category has no mass.
    """
    m = np.asarray(mass, dtype=np.float64)
    if m.ndim != 3 or (m < 0).any() or not np.isfinite(m).all():
        raise ValueError("mass must be a finite, non-negative array of shape (categories, layers, experts)")
    total = m.sum(axis=(1, 2))
    if (total <= 0).any():
        raise ValueError("every category needs routing mass")
    share = m.sum(axis=1) / total[:, None]
    mean = share.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, share / mean, 0.0)


def top_k_families(lift: np.ndarray, categories, *, k: int = 16, exclude=()) -> dict[str, list[int]]:
    """Per category, the ``k`` experts of highest lift (ties by lower index), leaving out ``exclude``
    (the shared core): the study's stated family definition, "top-K by lift excluding the shared core".
    ``lift`` of shape (categories, experts). Returns ``{category: sorted expert ids}``. ``ValueError`` for
    ``k`` < 1 or more than the experts left."""
    lift = np.asarray(lift, dtype=np.float64)
    keep = [e for e in range(lift.shape[1]) if e not in set(int(x) for x in exclude)]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= len(keep)):
        raise ValueError(f"k must be an integer from 1 to {len(keep)} (experts outside exclude), got {k!r}")
    out = {}
    for i, c in enumerate(categories):
        order = sorted(keep, key=lambda e: (-lift[i, e], e))
        out[c] = sorted(order[:k])
    return out


def family_agreement(frozen: dict, derived: dict, lift: np.ndarray, categories, *, exclude=()) -> pd.DataFrame:
    """Per family of ``frozen``: ``n_members``, ``n_agree`` (members also in ``derived``), ``frozen_only`` and
    ``derived_only`` (the differing experts, each as ``(expert, lift rank)`` with rank 1 the highest lift
    outside ``exclude``), and ``lift_frozen``/``lift_derived`` (the family's mean lift)."""
    rows = []
    cat_index = {c: i for i, c in enumerate(categories)}
    for fam, members in frozen.items():
        i = cat_index[fam]
        keep = [e for e in range(lift.shape[1]) if e not in set(exclude)]
        rank = {e: r + 1 for r, e in enumerate(sorted(keep, key=lambda e: (-lift[i, e], e)))}
        f, d = set(members), set(derived[fam])
        rows.append({"family": fam, "n_members": len(f), "n_agree": len(f & d),
                     "frozen_only": [(e, rank.get(e)) for e in sorted(f - d)],
                     "derived_only": [(e, rank.get(e)) for e in sorted(d - f)],
                     "lift_frozen": float(lift[i, sorted(f)].mean()), "lift_derived": float(lift[i, sorted(d)].mean())})
    return pd.DataFrame(rows)


def passed_over_experts(agreement: pd.DataFrame) -> list[int]:
    """The experts that the stated definition puts in some family but the frozen map leaves out of it."""
    return sorted({e for items in agreement["derived_only"] for e, _ in items})


def frozen_map(prereg: pd.DataFrame) -> tuple[list[int], dict[str, list[int]], int]:
    """The frozen pre-registration of :func:`prereg_families` as ``(shared_core, families, k)``: the shared
    core's expert ids (sorted), ``{family: sorted expert ids}`` in the map's order, and the stated family size
    K. ``ValueError`` when the map states more than one K or holds no family."""
    ks = prereg["family_k"].unique()
    if len(ks) != 1:
        raise ValueError(f"the frozen map must state one family size K, got {sorted(ks.tolist())}")
    fam = prereg[prereg.role == "family"]
    if fam.empty:
        raise ValueError("the frozen map holds no family")
    core = sorted(int(e) for e in prereg.loc[prereg.role == "shared_core", "expert"])
    families = {f: sorted(int(e) for e in g.expert) for f, g in fam.groupby("family", sort=False)}
    return core, families, int(ks[0])


def lift_reproduced(agreement: pd.DataFrame, prereg: pd.DataFrame, *, decimals: int = 3) -> pd.Series:
    """Per family of ``agreement`` (:func:`family_agreement`), whether the recomputed mean lift of the frozen
    members (``lift_frozen``), rounded to ``decimals``, equals the study's stated mean lift
    (``frozen_mean_lift`` of :func:`prereg_families`, published with three decimals). Boolean Series indexed
    by family. ``ValueError`` for a family the map does not state."""
    stated = prereg[prereg.role == "family"].groupby("family").frozen_mean_lift.first()
    missing = sorted(set(agreement.family) - set(stated.index))
    if missing:
        raise ValueError(f"the frozen map states no mean lift for {', '.join(missing)}")
    got = agreement.set_index("family").lift_frozen.round(int(decimals))
    return (got - stated.reindex(got.index)).abs() < 10.0 ** -(int(decimals) + 3)


def jaccard(a, b) -> float:
    """Jaccard index ``|A & B| / |A | B|`` of two expert sets. ``ValueError`` when both are empty."""
    a, b = set(a), set(b)
    if not (a | b):
        raise ValueError("the Jaccard index of two empty sets is undefined")
    return len(a & b) / len(a | b)


# ----------------------------------------------------------------------------- rung 2: the decision rules


def decision_table(v: pd.DataFrame) -> pd.DataFrame:
    """Both decision rules recomputed from a verdict table (:func:`verdicts`, one precision or both).

    Point rule (pre-registered): ``on_target > null_2sigma`` and ``worst_off <= on_target / 3``.
    Columns: ``null_margin = on_target - null_2sigma``, ``sel_margin = on_target / 3 - worst_off`` (nats;
    NaN without an off-target value), ``point`` (1/0, NaN when undecidable), and what the published precision
    resolves: each value lies within ``h = 0.5 * 10**-decimals`` of its printed value, so
    ``sel_margin`` lies in ``[sel_low, sel_high] = [(on - h)/3 - (worst + h), (on + h)/3 - (worst - h)]`` and
    ``null_margin`` within ``2h``; ``point_resolved`` is True when every set of values that rounds to the
    printed ones gives the same verdict.

    Conservative CI rule: ``ci_low > null_2sigma`` and ``upper 95% bound of worst_off <= ci_low / 3``. The
    upper bound of the off-target effect is not released; since it is at least the point estimate, the rule
    fails for sure when ``ci_low <= null_2sigma`` or ``worst_off > ci_low / 3``. ``ci_status``: ``"fails"``
    or ``"undetermined"`` (the released values cannot decide; a pass needs the off-target's upper bound at
    most ``ci_bar = ci_low / 3``).
    """
    out = v.copy()
    h = 0.5 * 10.0 ** (-out["decimals"].astype(float))
    out["null_margin"] = out.on_target - out.null_2sigma
    out["sel_margin"] = out.on_target / 3 - out.worst_off
    out["sel_low"] = (out.on_target - h) / 3 - (out.worst_off + h)
    out["sel_high"] = (out.on_target + h) / 3 - (out.worst_off - h)
    beats = out.null_margin > 0
    point = np.where(~beats, 0.0, np.where(out.worst_off.isna(), np.nan, (out.sel_margin >= -1e-12).astype(float)))
    out["point"] = point
    eps = 1e-12
    null_fail_sure = out.null_margin + 2 * h <= eps
    null_pass_sure = out.null_margin - 2 * h >= -eps
    out["point_resolved"] = (null_fail_sure | (null_pass_sure & ((out.sel_low >= -eps) | (out.sel_high <= eps)))
                             ) & ~(beats & out.worst_off.isna())
    out["ci_bar"] = out.ci_low / 3
    fails = (out.ci_low <= out.null_2sigma) | (out.worst_off > out.ci_bar)
    out["ci_status"] = np.where(fails, "fails", "undetermined")
    return out


def rule_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per precision, from :func:`decision_table`: ``n_families``, ``point_count`` (recomputed passes),
    ``point_unresolved`` (verdicts the published precision cannot settle), ``point_low`` and ``point_high``
    (the fewest and most passes over all values that round to the published ones: the settled passes, plus
    every unsettled verdict for ``point_high``), ``point_stated`` (the study's count, NaN where it states
    none), ``ci_fails``, ``ci_undetermined`` (so the CI-rule count lies in ``[0, ci_undetermined]``) and
    ``ci_stated``."""
    rows = []
    for precision, g in table.groupby("precision", sort=False):
        settled = int(((g.point == 1) & g.point_resolved).sum())
        rows.append({"precision": precision, "n_families": len(g), "point_count": int((g.point == 1).sum()),
                     "point_unresolved": int((~g.point_resolved).sum()), "point_low": settled,
                     "point_high": settled + int((~g.point_resolved).sum()),
                     "point_stated": float(g.stated_point.sum()) if g.stated_point.notna().all() else np.nan,
                     "ci_fails": int((g.ci_status == "fails").sum()),
                     "ci_undetermined": int((g.ci_status == "undetermined").sum()),
                     "ci_stated": float(g.stated_ci.sum())})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- rung 1 against rung 2


def _family_layer_lift(mass: np.ndarray, cat: int, members) -> np.ndarray:
    """Per layer, the family's share of category ``cat``'s mass over its mean share across categories."""
    share = mass[:, :, list(members)].sum(axis=2) / mass.sum(axis=2)  # (categories, layers)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(share.mean(axis=0) > 0, share[cat] / share.mean(axis=0), np.nan)


def family_depth_profile(mass: np.ndarray, categories, families: dict) -> pd.DataFrame:
    """Per family and layer: ``layer_lift``, the family's share of its category's routing mass at that
    layer divided by the mean of that share over all categories (1 = no preference). Long format."""
    rows = []
    for fam, members in families.items():
        prof = _family_layer_lift(mass, categories.index(fam), members)
        rows += [{"family": fam, "layer": L, "layer_lift": float(x)} for L, x in enumerate(prof)]
    return pd.DataFrame(rows)


def family_observational(mass: np.ndarray, categories, families: dict) -> pd.DataFrame:
    """Observational statistics of each family (rung 1), from the atlas alone.

    ``mass`` (categories, layers, experts); ``families`` ``{category: expert ids}`` (each family is named by
    its category). Columns: ``mean_lift`` (mean :func:`expert_lift` of the members), ``concentration``
    (fraction of the category's routing mass, pooled over layers, that the members carry; a uniform router
    gives ``k / experts``), ``max_overlap`` (largest Jaccard index of the member set with another family of
    ``families``) and ``overlap_with``, ``depth_centroid`` (``sum_l l x_l / sum_l x_l / (layers - 1)`` with
    ``x_l = max(layer_lift_l - 1, 0)`` of :func:`family_depth_profile`: 0 = excess routing in the first
    layer, 1 = in the last; NaN without excess).
    """
    lift = expert_lift(mass)
    share = mass.sum(axis=1) / mass.sum(axis=(1, 2))[:, None]
    n_layers = mass.shape[1]
    rows = []
    for fam, members in families.items():
        i, mem = categories.index(fam), set(members)
        others = {g: len(mem & set(m)) / len(mem | set(m)) for g, m in families.items() if g != fam}
        best = max(others, key=others.get) if others else None
        x = np.clip(_family_layer_lift(mass, i, members) - 1.0, 0.0, None)
        centroid = float((np.arange(n_layers) * x).sum() / x.sum() / (n_layers - 1)) if x.sum() > 0 and n_layers > 1 else np.nan
        rows.append({"family": fam, "mean_lift": float(lift[i, sorted(mem)].mean()),
                     "concentration": float(share[i, sorted(mem)].sum()),
                     "max_overlap": float(others[best]) if best else np.nan, "overlap_with": best,
                     "depth_centroid": centroid})
    return pd.DataFrame(rows)


def causal_measures(v: pd.DataFrame) -> pd.DataFrame:
    """Causal family measures (rung 2) of a verdict table: ``on_target`` (nats), ``excess`` (on-target
    effect above the null band, ``on_target - null_2sigma``, nats) and ``off_ratio`` (``worst_off /
    on_target``: 0 = perfectly selective; the point rule asks <= 1/3; NaN without an off-target value)."""
    return v.assign(excess=v.on_target - v.null_2sigma, off_ratio=v.worst_off / v.on_target)[
        ["precision", "family", "on_target", "excess", "off_ratio"]]


#: observational and causal columns compared by :func:`rung_correlations`
OBSERVATIONAL = ("mean_lift", "concentration", "max_overlap", "depth_centroid")
CAUSAL = ("on_target", "excess", "off_ratio")


def rung_correlations(obs: pd.DataFrame, causal: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Spearman's rho between every observational statistic (:data:`OBSERVATIONAL`) and every causal measure
    (:data:`CAUSAL`), per precision, over the families where both are defined, with the exact two-sided
    permutation p-value over all ``n!`` pairings (:func:`moeaudit.stats.spearman_exact`) and Holm's
    correction within each precision (:func:`moeaudit.stats.holm`). Columns ``precision``, ``observational``,
    ``causal``, ``n``, ``n_permutations``, ``rho``, ``p_exact``, ``p_holm``, ``significant`` (``p_holm <
    alpha``). ``ValueError`` for ``alpha`` outside (0, 1)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    merged = causal.merge(obs, on="family")
    rows = []
    for precision, g in merged.groupby("precision", sort=False):
        for o in OBSERVATIONAL:
            for c in CAUSAL:
                ok = g[[o, c]].notna().all(axis=1)
                x, y = g.loc[ok, o].to_numpy(float), g.loc[ok, c].to_numpy(float)
                if ok.sum() >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                    rho, p, m = stats.spearman_exact(x, y)
                else:
                    rho, p, m = np.nan, np.nan, 0
                rows.append({"precision": precision, "observational": o, "causal": c, "n": int(ok.sum()),
                             "n_permutations": m, "rho": rho, "p_exact": p})
    out = pd.DataFrame(rows)
    out["p_holm"] = np.nan
    for precision, idx in out.groupby("precision", sort=False).groups.items():
        out.loc[idx, "p_holm"] = stats.holm(out.loc[idx, "p_exact"].to_numpy())
    out["significant"] = out.p_holm < alpha
    return out


def rank_power(ns, *, alpha: float = 0.05, power: float = 0.8, rhos=(0.5, 0.8), n_sim: int = 20000,
               seed: int = 0, n_tests: int = 1) -> pd.DataFrame:
    """What the exact Spearman test can detect with each number of families in ``ns``: ``n``,
    ``n_permutations``, ``smallest_p`` (``2 / n!``), ``critical_rho`` (:func:`moeaudit.stats.spearman_exact_critical`),
    ``min_detectable_rho`` (bivariate-normal correlation detected with ``power``) and ``power_at_<rho>``, all at
    ``alpha``; and the same at Holm's first-step level ``alpha_first = alpha / n_tests`` (the level the smallest
    of ``n_tests`` p-values must reach before any test of the family can be significant; Holm, 1979):
    ``critical_rho_first`` (NaN when even ``|rho| = 1`` cannot reach it), ``min_detectable_rho_first`` and
    ``first_power_at_<rho>``. ``ValueError`` for ``n_tests`` below 1."""
    if not (isinstance(n_tests, (int, np.integer)) and n_tests >= 1):
        raise ValueError(f"n_tests must be an integer >= 1, got {n_tests!r}")
    first = alpha / int(n_tests)
    rows = []
    for n in ns:
        n = int(n)
        row = {"n": n, "n_permutations": int(np.prod(np.arange(1, n + 1))), "smallest_p": 2 / np.prod(np.arange(1, n + 1)),
               "critical_rho": stats.spearman_exact_critical(n, alpha=alpha),
               "min_detectable_rho": stats.spearman_min_detectable(n, alpha=alpha, power=power, n_sim=n_sim, seed=seed)}
        for r in rhos:
            row[f"power_at_{r:g}"] = stats.spearman_exact_power(n, r, alpha=alpha, n_sim=n_sim, seed=seed)
        row.update({"n_tests": int(n_tests), "alpha_first": first,
                    "critical_rho_first": stats.spearman_exact_critical(n, alpha=first),
                    "min_detectable_rho_first": stats.spearman_min_detectable(n, alpha=first, power=power,
                                                                              n_sim=n_sim, seed=seed)})
        for r in rhos:
            row[f"first_power_at_{r:g}"] = stats.spearman_exact_power(n, r, alpha=first, n_sim=n_sim, seed=seed)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the same analysis on a shipped model

#: the four interleaved paragraph groups of the embedded corpus (data card ``EMBEDDED_CORPUS.md``): paragraph i
#: of the file belongs to group ``i % 4``
EMBEDDED_TOPICS: tuple[str, ...] = ("history", "science", "arts", "sport")


def embedded_topic(seq_ids) -> np.ndarray:
    """The paragraph group (index into :data:`EMBEDDED_TOPICS`) of each text of the embedded corpus, for texts
    selected in file order (every paragraph passes the selection rule, so text i is paragraph i)."""
    s = np.asarray(seq_ids)
    if s.size and (not np.issubdtype(s.dtype, np.integer) or (s < 0).any()):
        raise ValueError("seq_ids must be non-negative integers")
    return s % len(EMBEDDED_TOPICS)


def topic_atlas(seq_id, indices, weights, topics, *, layer: int, num_experts: int) -> pd.DataFrame:
    """A routing-mass atlas of one layer in the study's form: per (topic, expert) the summed combine weight
    over the tokens of the topic's texts. ``seq_id`` (N,) per token, ``indices``/``weights`` (N, k) its routed
    experts and combine weights, ``topics`` (N,) topic index per token. Columns as :func:`atlas_mass`
    (``category`` the topic name)."""
    idx, w, tp = np.asarray(indices), np.asarray(weights, dtype=np.float64), np.asarray(topics)
    if idx.shape != w.shape or idx.shape[0] != tp.shape[0] or len(np.asarray(seq_id)) != tp.shape[0]:
        raise ValueError("seq_id, topics (N,) and indices, weights (N, k) must describe the same N tokens")
    mass = np.zeros((len(EMBEDDED_TOPICS), num_experts))
    np.add.at(mass, (np.repeat(tp, idx.shape[1]), idx.ravel()), w.ravel())
    t, e = np.meshgrid(np.arange(len(EMBEDDED_TOPICS)), np.arange(num_experts), indexing="ij")
    return pd.DataFrame({"category": np.array(EMBEDDED_TOPICS, dtype=object)[t.ravel()], "layer": int(layer),
                         "expert": e.ravel(), "mass": mass.ravel()})


def family_requests(positions: pd.DataFrame, families: dict, *, layer: int, num_experts: int, n_null: int,
                    seed: int) -> pd.DataFrame:
    """Ablation requests of every family (and of ``n_null`` size-matched random expert sets, drawn once with
    ``numpy.random.default_rng(seed)``) at every position (``seq_id``, ``t``, ``topic``) of ``layer``.
    Columns ``seq_id``, ``t``, ``topic``, ``layer``, ``expert_set`` (a family name or ``null-<j>``), ``removed``."""
    sizes = {len(m) for m in families.values()}
    if len(sizes) != 1:
        raise ValueError("the families must have one size (the null draws are size-matched)")
    size = sizes.pop()
    rng = np.random.default_rng(seed)
    sets = dict(families)
    sets.update({f"null-{j}": sorted(rng.choice(num_experts, size=size, replace=False).tolist())
                 for j in range(int(n_null))})
    rows = [{"seq_id": int(p.seq_id), "t": int(p.t), "topic": p.topic, "layer": int(layer), "expert_set": f,
             "removed": [int(e) for e in m]} for p in positions.itertuples() for f, m in sets.items()]
    return pd.DataFrame(rows)


def family_effects(records: pd.DataFrame) -> pd.DataFrame:
    """The study's point rule applied to family ablations of a shipped model.

    ``records``: one row per (position, family) with ``operator``, ``expert_set`` (names, or ``null-<j>`` for the
    random draws), ``topic`` (of the position) and ``delta_loss`` (nats). Per operator and family: ``on_target``
    (mean over the positions of the family's own topic), ``worst_off`` and ``worst_off_topic`` (the largest mean
    over another topic), ``null_2sigma`` (mean + 2 sd, over the random draws, of each draw's mean effect over the
    family's topic), ``modular`` (``on_target > null_2sigma`` and ``worst_off <= on_target / 3``)."""
    rows = []
    for op, g in records.groupby("operator", sort=False):
        means = g.groupby(["expert_set", "topic"]).delta_loss.mean().unstack()
        null = means[means.index.str.startswith("null-")]
        for fam in [f for f in means.index if not f.startswith("null-")]:
            on = float(means.loc[fam, fam])
            off = means.loc[fam].drop(fam)
            band = float(null[fam].mean() + 2 * null[fam].std(ddof=1)) if len(null) > 1 else np.nan
            rows.append({"operator": op, "family": fam, "on_target": on, "worst_off": float(off.max()),
                         "worst_off_topic": off.idxmax(), "null_2sigma": band,
                         "modular": bool(on > band and off.max() <= on / 3)})
    return pd.DataFrame(rows)


def topic_families(seq_id, indices, weights, *, layer: int, num_experts: int,
                   share: float) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """The study's family construction on one layer of a shipped model and the embedded corpus: the per-topic
    atlas (:func:`topic_atlas`, each token's topic from :func:`embedded_topic` of its ``seq_id``) and per topic
    the ``max(1, round(share * num_experts))`` experts of highest :func:`expert_lift` (:func:`top_k_families`,
    no shared core). ``seq_id`` (N,), ``indices``/``weights`` (N, k). ``ValueError`` for ``share`` outside
    (0, 1]."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    seq = np.asarray(seq_id)
    atlas = topic_atlas(seq, indices, weights, embedded_topic(seq), layer=layer, num_experts=num_experts)
    cats, mass = mass_array(atlas)
    k = max(1, round(num_experts * share))
    return atlas, top_k_families(expert_lift(mass), cats, k=k)


# ----------------------------------------------------------------------------- sentences


def _count(k: int, n: int) -> str:
    return f"{k} of {n}"


def source_sentence(src: ModularitySource) -> str:
    """Which source the chapter read, as one sentence."""
    if src.kind == "files":
        return f"This page reads {src.describe()}."
    return f"This page reads {src.describe()}, because {src.reason}."


def prereg_sentence(agreement: pd.DataFrame, passed_over: list[int], n_reproduced_without: int, *,
                    n_lift_match: int, decimals: int = 3) -> str:
    """The re-derivation of the pre-registration, from :func:`family_agreement` over the tested families,
    the passed-over experts and the agreement when they are also excluded."""
    n, k = int(agreement.n_members.sum()), int(agreement.n_agree.sum())
    fams = len(agreement)
    differ = agreement[agreement.n_agree < agreement.n_members]
    parts = [f"Recomputed from the atlas, the stated definition gives {_count(k, n)} members of the {fams} tested "
             f"families; the mean lift of each frozen family matches the study's stated value to {decimals} decimals "
             f"in {_count(n_lift_match, fams)} families."]
    if len(differ):
        items = []
        for r in differ.itertuples():
            took = ", ".join(f"expert {e} (lift rank {rk})" for e, rk in r.frozen_only)
            left = ", ".join(f"expert {e} (rank {rk})" for e, rk in r.derived_only)
            items.append(f"{r.family}: the frozen map holds {took} instead of {left}")
        parts.append("The differences: " + "; ".join(items) + ".")
        parts.append(f"Leaving out expert{'s' if len(passed_over) > 1 else ''} {', '.join(map(str, passed_over))} "
                     f"as well as the shared core reproduces {_count(n_reproduced_without, n)} members; the released "
                     "files name no rule that excludes them (the map's shared core does not contain them, and it marks "
                     "no expert near-dead), so this exclusion fits the released numbers but is not documented.")
    return " ".join(parts)


def rules_sentence(counts: pd.DataFrame, statements: dict) -> str:
    """The recomputed point-rule counts beside the study's statements (:func:`rule_counts`), with the range
    of counts the published precision allows."""
    parts = []
    for r in counts.itertuples():
        stated = ("" if np.isnan(r.point_stated) else
                  f" (study: {int(r.point_stated)} of {r.n_families})")
        unresolved = (f", but {r.point_unresolved} of its {r.n_families} verdicts {'is' if r.point_unresolved == 1 else 'are'} "
                      "not settled by the published precision, so values that round to the published ones give "
                      f"{r.point_low} to {r.point_high}" if r.point_unresolved
                      else ", every verdict settled by the published precision")
        parts.append(f"{r.precision}: the point rule passes {_count(r.point_count, r.n_families)} families{stated}"
                     f"{unresolved}")
    return "Recomputed from the verdict values: " + "; ".join(parts) + "."


def precision_sentence(table: pd.DataFrame, statements: dict) -> str:
    """Which selectivity margins the published precision resolves (:func:`decision_table`), with the
    study's stated margins (``*_point_margin`` of :func:`study_statements`)."""
    stated = {("W4A4", "es"): statements.get("es_point_margin"), ("W4A4", "code"): statements.get("code_point_margin"),
              ("BF16", "es"): statements.get("bf16_es_point_margin")}
    parts = []
    for r in table.itertuples():
        if r.null_margin <= 0 or np.isnan(r.sel_margin):
            continue
        s = stated.get((r.precision, r.family))
        h = 0.5 * 10.0 ** -_decimals(repr(abs(s))) if s is not None else 0.0  # the stated margin is rounded too
        agrees = s is not None and r.sel_low - h - 1e-12 <= s <= r.sel_high + h + 1e-12
        said = ("" if s is None else
                f"; the study states {s:+.3f}, {'which agrees with' if agrees else 'which lies outside'} that range "
                "at its own precision")
        if r.point_resolved:
            edge = abs(r.sel_high) <= 1e-9 or abs(r.sel_low) <= 1e-9
            tail = ("resolved (the range touches zero only where both values lie exactly on a rounding boundary)"
                    if edge else "resolved")
        else:
            tail = "not resolved: the sign of the margin depends on digits that are not published"
        if s is not None or not r.point_resolved:
            parts.append(f"{r.family} ({r.precision}, {r.decimals} decimals): margin {r.sel_margin:+.4f} nats, between "
                         f"{r.sel_low:+.4f} and {r.sel_high:+.4f} for values that round to the published ones{said}; "
                         f"{tail}")
    return ("Selectivity margins (on-target / 3 minus worst off-target; a family passes at a margin of zero or "
            "more): " + "; ".join(parts) + ".")


def ci_rule_sentence(table: pd.DataFrame) -> str:
    """What the released values decide of the conservative CI rule (:func:`decision_table`)."""
    parts = []
    for precision, g in table.groupby("precision", sort=False):
        fails = g[g.ci_status == "fails"].family.tolist()
        und = g[g.ci_status == "undetermined"]
        u = ", ".join(f"{r.family} (needs the off-target upper bound ≤ {r.ci_bar:.3f}; point estimate {r.worst_off:.3f})"
                      for r in und.itertuples())
        parts.append(f"{precision}: {_count(len(fails), len(g))} families fail it for certain; "
                     f"{_count(len(und), len(g))} cannot be decided from the released values: {u or 'none'}")
    return ("The conservative CI rule needs the upper 95% bound of each family's worst off-target effect, which "
            "the released files do not contain. " + "; ".join(parts) + ".")


#: readable names of the compared statistics
LABELS = {"mean_lift": "mean lift", "concentration": "routing concentration", "max_overlap": "overlap with another family",
          "depth_centroid": "depth centroid", "on_target": "on-target effect", "excess": "effect above the null band",
          "off_ratio": "off-target ratio"}


def rung_sentence(corr: pd.DataFrame, *, alpha: float, precision: str) -> str:
    """The rung-1-against-rung-2 correlations of one precision (:func:`rung_correlations`), in one sentence."""
    g = corr[corr.precision == precision].dropna(subset=["rho"])
    if g.empty:
        return f"{precision}: no rank correlation is defined."
    best = g.loc[g.rho.abs().idxmax()]
    n_sig = int(g.significant.sum())
    return (f"{precision}: {_count(n_sig, len(g))} rank correlations are significant after Holm's correction "
            f"within the {len(g)} at level {alpha:g}; the largest in size is {LABELS[best.observational]} against "
            f"the {LABELS[best.causal]} (rho = {best.rho:+.2f}, n = {int(best.n)}, exact p = {best.p_exact:.3f} over "
            f"{int(best.n_permutations)} orderings, Holm {best.p_holm:.2f}).")


def power_sentence(power: pd.DataFrame, *, alpha: float, target: float = 0.8) -> str:
    """What the exact Spearman test can detect with each number of families (:func:`rank_power`): at ``alpha``
    before correction, and at Holm's first-step level (``alpha / n_tests``), the level at which one test of the
    family is significant when no other is."""
    at = [c.removeprefix("power_at_") for c in power.columns if c.startswith("power_at_")]

    def detect(crit, mdr, prefix, row):
        powers = ", ".join(f"{row[f'{prefix}power_at_{r}']:.0%} at {r}" for r in at)
        if np.isnan(crit):
            return "no ordering reaches it, so no correlation can be significant (power 0% at any true correlation)"
        need = (f"{target:.0%} power needs a true correlation of {mdr:.3f}" if np.isfinite(mdr)
                else f"no true correlation below 1 gives {target:.0%} power")
        return f"|rho| must reach {crit:.3f}, and {need} (power {powers})"

    parts = []
    for _, r in power.iterrows():
        parts.append(f"With {int(r.n)} families the exact test has {int(r.n_permutations)} orderings and a smallest "
                     f"p of {r.smallest_p:.4f}. At {alpha:g} before correction, "
                     f"{detect(r.critical_rho, r.min_detectable_rho, '', r)}. Under Holm's correction over the "
                     f"{int(r.n_tests)} tests of a precision, one correlation is significant on its own only at "
                     f"{alpha:g}/{int(r.n_tests)} = {r.alpha_first:.4f}: "
                     f"{detect(r.critical_rho_first, r.min_detectable_rho_first, 'first_', r)}.")
    return " ".join(parts)


def shipped_sentence(effects: pd.DataFrame, *, model: str, layer: int, n_positions: dict,
                     n_null: int | None = None) -> str:
    """The study's point rule on a shipped model's topic families under each operator (:func:`family_effects`);
    ``n_positions`` maps each topic to its number of sampled positions, ``n_null`` is the number of random draws
    behind the null band."""
    parts = []
    for op, g in effects.groupby("operator", sort=False):
        mod = g[g.modular].family.tolist()
        parts.append(f"under {op} {_count(len(mod), len(g))} families pass ({', '.join(mod) or 'none'})")
    flips = effects.pivot(index="family", columns="operator", values="modular")
    changed = flips.index[flips.nunique(axis=1) > 1].tolist() if flips.shape[1] > 1 else []
    if changed:
        flip = f"The verdict changes with the operator for {', '.join(changed)}. "
    elif not effects.modular.any():
        flip = "No family passes under any operator, so these verdicts cannot show the operator changing one. "
    else:
        flip = "No family's verdict changes with the operator. "
    n = ", ".join(f"{k} {v}" for k, v in n_positions.items())
    band = ("" if n_null is None else
            f" and the null band (mean + 2 sd) rests on {n_null} random draw{'s' if n_null != 1 else ''}")
    return (f"In {model} at layer {layer}, with the study's point rule: " + "; ".join(parts) + ". " + flip
            + f"Positions per topic: {n}; each mean is over so few positions{band}, so these verdicts illustrate "
              "the procedure and carry no confidence interval.")


#: the study's names of the tested families
FAMILY_NAMES = {"ar": "Arabic", "es": "Spanish", "zh": "Chinese", "math": "math", "code": "code", "general": "general"}


def _ranked(items) -> str:
    return ", ".join(f"{e} (rank {r})" for e, r in items) or "-"


def agreement_display(agreement: pd.DataFrame) -> pd.DataFrame:
    """The table of :func:`family_agreement` for the page: differing experts with their lift rank, readable
    column names."""
    return pd.DataFrame({"family": agreement.family, "members": agreement.n_members,
                         "members reproduced": agreement.n_agree,
                         "in the frozen map only": [_ranked(x) for x in agreement.frozen_only],
                         "by the stated rule only": [_ranked(x) for x in agreement.derived_only],
                         "mean lift (frozen)": agreement.lift_frozen, "mean lift (rule)": agreement.lift_derived})


def replacement_sentence(agreement: pd.DataFrame, passed_over: list[int], *, k: int) -> str:
    """Over all frozen families (:func:`family_agreement`), the lift ranks of the experts the frozen map holds
    instead of the stated rule's, and of those it passes over."""
    ranks_in = sorted({r for x in agreement.frozen_only for _, r in x})
    ranks_out = sorted({r for x in agreement.derived_only for _, r in x})
    if not ranks_in:
        return "The frozen map and the stated rule agree on every family."
    return (f"Over all {len(agreement)} frozen families, the experts the frozen map holds instead have lift "
            f"rank{'s' if len(ranks_in) > 1 else ''} {', '.join(map(str, ranks_in))} (K = {k}), and the ones it passes "
            f"over rank {min(ranks_out)} to {max(ranks_out)}: the map behaves as if {len(passed_over)} more "
            f"expert{'s' if len(passed_over) != 1 else ''} had been excluded.")


def overlap_sentence(frozen: dict, derived: dict, agreement: pd.DataFrame, verdict: pd.DataFrame,
                     statements: dict, *, a: str = "es", b: str = "ar", precision: str = "W4A4") -> str:
    """The overlap of families ``a`` and ``b`` in the frozen map and under the stated rule, beside the study's
    note (``es_ar_shared_experts``, ``es_ar_jaccard`` of :func:`study_statements`) and ``a``'s off-target effect
    on ``b`` (:func:`verdicts`); names the shared experts that the frozen map holds in place of the stated rule's."""
    na, nb = FAMILY_NAMES.get(a, a), FAMILY_NAMES.get(b, b)
    row = verdict[(verdict.precision == precision) & (verdict.family == a)]
    bleed = ""
    if len(row) and row.worst_off_axis.iloc[0] == b:
        bleed = (f"ablating the {na} family raises the loss on {nb} text by {row.worst_off.iloc[0]:.2f} nats per "
                 f"token ({precision}, its worst off-target effect), and ")
    shared_f, shared_d = sorted(set(frozen[a]) & set(frozen[b])), sorted(set(derived[a]) & set(derived[b]))
    swapped = {e: (fam, r) for fam, items in zip(agreement.family, agreement.frozen_only) if fam in (a, b)
               for e, r in items}
    held = [f"expert {e} is one the frozen map holds in the {FAMILY_NAMES.get(swapped[e][0], swapped[e][0])} family "
            f"in place of a higher-lift expert (its lift rank is {swapped[e][1]})" for e in shared_f if e in swapped]
    return (f"In the study's note, {bleed}the {na} and {nb} families share only "
            f"{int(statements['es_ar_shared_experts'])} experts (Jaccard {statements['es_ar_jaccard']:.3f}); the "
            "note leaves the mechanism open. Recomputed, the frozen families share "
            f"{report.plural(len(shared_f), 'expert')} ({', '.join(map(str, shared_f)) or 'none'}; Jaccard "
            f"{jaccard(frozen[a], frozen[b]):.3f})" + (f", and {'; '.join(held)}" if held else "")
            + f". Under the stated rule they share {report.plural(len(shared_d), 'expert')} "
              f"({', '.join(map(str, shared_d)) or 'none'}; Jaccard {jaccard(derived[a], derived[b]):.3f}).")


def count_table(counts: pd.DataFrame, statements: dict) -> pd.DataFrame:
    """The study's counts beside the recomputed ones (:func:`rule_counts`), one row per rule and precision."""
    rows = []
    for r in counts.itertuples():
        precision, n = r.precision, int(r.n_families)
        rng = f" ({r.point_low} to {r.point_high} within the published precision)" if r.point_unresolved else ""
        rows.append({"quantity": f"point rule, {precision}",
                     "the study states": "no count" if np.isnan(r.point_stated) else f"{r.point_stated:.0f} of {n}",
                     "recomputed": f"{r.point_count} of {n}{rng}"})
        rows.append({"quantity": f"CI rule, {precision}", "the study states": f"{r.ci_stated:.0f} of {n}",
                     "recomputed": f"between 0 and {r.ci_undetermined} of {n}"})
    return pd.DataFrame(rows)


def decision_display(table: pd.DataFrame) -> pd.DataFrame:
    """The table of :func:`decision_table` for the page (values in nats per token): verdicts as words, the
    selectivity margin's range at the published precision as one column."""
    def word(x, stated=False):
        return ("not stated" if stated else "-") if pd.isna(x) else ("pass" if x == 1 else "fail")

    return pd.DataFrame({
        "precision": table.precision, "family": table.family, "on-target": table.on_target,
        "lower 95% bound": table.ci_low, "null band": table.null_2sigma, "worst off-target": table.worst_off,
        "on axis": table.worst_off_axis.fillna("-"), "selectivity margin": table.sel_margin,
        "margin range": [("-" if np.isnan(lo) else f"{lo:+.4f} to {hi:+.4f}")
                         for lo, hi in zip(table.sel_low, table.sel_high)],
        "point rule": [word(x) + ("" if ok else " (unsettled)") for x, ok in zip(table.point, table.point_resolved)],
        "point rule (study)": [word(x, stated=True) for x in table.stated_point],
        "CI rule": table.ci_status.map({"fails": "fail", "undetermined": "open"}),
        "CI rule (study)": [word(x, stated=True) for x in table.stated_ci]})


def counts_sentence(counts: pd.DataFrame) -> str:
    """What the released values settle of each stated count (:func:`rule_counts`), in one sentence."""
    parts = []
    for r in counts.itertuples():
        n = r.n_families
        point = (f"the point rule gives {r.point_count} of {n} as printed"
                 + ("" if np.isnan(r.point_stated) else f" (the study: {r.point_stated:.0f})")
                 + (f" and {r.point_low} to {r.point_high} within the published precision" if r.point_unresolved else ""))
        parts.append(f"in {r.precision} {point}, while the CI-rule count can be anything from 0 to "
                     f"{r.ci_undetermined} (the study: {r.ci_stated:.0f})")
    return ("So " + "; ".join(parts) + ". The released files cannot settle the rule that the study calls "
            "conservative: a pass under it needs the upper bound of the off-target effect, which they do not hold.")


def families_needed(rho: float, *, alpha: float = 0.05, power: float = 0.8, n_sim: int = 4000,
                    seed: int = 0) -> int | None:
    """Smallest number of families (3 to :data:`moeaudit.stats.MAX_EXACT_SPEARMAN_N`) at which the exact
    Spearman test at ``alpha`` reaches ``power`` against a true correlation ``rho``
    (:func:`moeaudit.stats.spearman_exact_power`); None when no such number is in that range."""
    for n in range(3, stats.MAX_EXACT_SPEARMAN_N + 1):
        if stats.spearman_exact_power(n, rho, alpha=alpha, n_sim=n_sim, seed=seed) >= power:
            return n
    return None


#: the most families :func:`families_needed_approx` considers
MAX_APPROX_FAMILIES = 10_000


def families_needed_approx(rho: float, *, alpha: float = 0.05, power: float = 0.8,
                           max_n: int = MAX_APPROX_FAMILIES) -> int | None:
    """Smallest number of families at which the large-sample Spearman test at ``alpha`` reaches ``power``
    against a true (Pearson) correlation ``rho`` of bivariate normal data: the first ``n`` whose
    :func:`moeaudit.stats.min_detectable_spearman` is at most the population Spearman correlation
    ``(6 / pi) asin(rho / 2)`` (Pearson 1907; Kendall & Gibbons, *Rank Correlation Methods*, ch. 9).
    Fisher's z approximation: for the few families beyond the exact enumeration a guide, not an exact
    answer. None when ``max_n`` is not enough; ``ValueError`` for ``rho`` outside (0, 1)."""
    if not 0 < float(rho) < 1:
        raise ValueError(f"rho must be in (0, 1), got {rho!r}")
    target = 6 / np.pi * np.arcsin(float(rho) / 2)
    enough = lambda n: stats.min_detectable_spearman(n, alpha=alpha, power=power) <= target  # noqa: E731
    if not enough(max_n):
        return None
    lo, hi = 4, max_n  # the detectable correlation falls as n grows: bisect for the first n that is enough
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


def decimals_to_resolve(row: pd.Series, margin: float, *, max_decimals: int = 8) -> int | None:
    """Fewest decimals at which values carrying the selectivity ``margin`` (nats) settle the point verdict of
    one verdict row (:func:`verdicts`): the printed values are shifted so that ``on_target / 3 - worst_off``
    equals ``margin`` (on-target by ``3/2`` of the shift, off-target by ``-1/2``), rounded to ``d`` decimals and
    passed to :func:`decision_table`, for ``d`` from one more than the published decimals. None when even
    ``max_decimals`` does not settle it."""
    shift = margin - (row.on_target / 3 - row.worst_off)
    on, off = row.on_target + 1.5 * shift, row.worst_off - 0.5 * shift
    for d in range(int(row.decimals) + 1, max_decimals + 1):
        v = pd.DataFrame([row]).assign(decimals=d, on_target=round(on, d), worst_off=round(off, d))
        if bool(decision_table(v).point_resolved.iloc[0]):
            return d
    return None


def exercise_answers(derived: dict, verdict: pd.DataFrame, statements: dict, *, alpha: float, power: float,
                     rho: float, seed: int = 0) -> dict[str, str]:
    """The expected outcomes of the chapter's exercises: ``ex1`` (the experts the Spanish and Arabic families
    share under the stated rule), ``ex2`` (:func:`decimals_to_resolve` for the W4A4 Spanish margin the study
    states), ``ex3`` (:func:`families_needed` at ``rho``; beyond the exact enumeration, the exact test's power
    at its largest ``n`` and :func:`families_needed_approx`), each a sentence opening without a final period."""
    shared = sorted(set(derived["es"]) & set(derived["ar"]))
    row = verdict[(verdict.precision == "W4A4") & (verdict.family == "es")].iloc[0]
    d = decimals_to_resolve(row, statements["es_point_margin"])
    approx = families_needed_approx(rho, alpha=alpha, power=power)  # checks rho before the slower exact search
    n_sim = 4000  # the exact search and the power it reports use the same simulation (same n_sim, same seed)
    n = families_needed(rho, alpha=alpha, power=power, n_sim=n_sim, seed=seed)
    if n:
        ex3 = f"{n} families"
    else:
        at_max = stats.spearman_exact_power(stats.MAX_EXACT_SPEARMAN_N, rho, alpha=alpha, n_sim=n_sim, seed=seed)
        ex3 = (f"More than {stats.MAX_EXACT_SPEARMAN_N} families: at {stats.MAX_EXACT_SPEARMAN_N}, the most the exact "
               f"test enumerates, its power is {at_max:.3f}, below {power:g}; Fisher's z approximation "
               f"(`families_needed_approx`) puts the number at "
               + (f"about {approx}" if approx else f"more than it searches ({MAX_APPROX_FAMILIES:,})"))
    return {"ex1": f"They share {report.plural(len(shared), 'expert')}"
                   + (f" ({', '.join(map(str, shared))})" if shared else ""),
            "ex2": ("more than 8 decimals" if d is None else
                    f"{d} decimals, {d - int(row.decimals)} more than published, for the stated margin of "
                    f"{statements['es_point_margin']:+.3f} nats"),
            "ex3": ex3}


def shows_sentences(agreement: pd.DataFrame, passed_over: list[int], counts: pd.DataFrame, statements: dict,
                    corr: pd.DataFrame, power_table: pd.DataFrame, effects: pd.DataFrame, *, alpha: float,
                    power: float, model: str, n_positions: dict) -> str:
    """The "What this shows, and what it does not" bullets, from the chapter's tables."""
    out = [f"- The stated family rule, with a lift formula that reproduces the study's stated mean lifts, reproduces "
           f"{int(agreement.n_agree.sum())} of {int(agreement.n_members.sum())} members of the tested families; "
           + (f"all are reproduced when {report.plural(len(passed_over), 'more expert')} "
              f"{'is' if len(passed_over) == 1 else 'are'} also excluded, an exclusion the released files do not "
              "document." if passed_over else "no exclusion beyond the shared core is needed.")]
    for r in counts.itertuples():
        stated = (" (the study states no count)" if np.isnan(r.point_stated)
                  else f", the count the study states ({r.point_stated:.0f})")
        settle = (f"; {report.plural(r.point_unresolved, 'verdict')} {'rests' if r.point_unresolved == 1 else 'rest'} "
                  f"on digits that are not published, so the published values allow {r.point_low} to {r.point_high}"
                  if r.point_unresolved else "; the published precision settles every verdict")
        ci = (f"The CI-rule count cannot be recomputed: {r.ci_fails} families fail it for certain and "
              f"{r.ci_undetermined} stay open, so any count from 0 to {r.ci_undetermined} is consistent with the "
              f"released values, the study's {r.ci_stated:.0f} included." if r.ci_undetermined else
              f"The released values settle the CI rule: every family fails it (the study: {r.ci_stated:.0f}).")
        out.append(f"- {r.precision}: the printed values give {r.point_count} of {r.n_families} families under the "
                   f"point rule{stated}{settle}. {ci}")
    n_sig, per = int(corr.significant.sum()), corr.groupby("precision").size().iloc[0]
    big = power_table.set_index("n").loc[int(corr.n.max())]
    n_big = int(corr.n.max())
    alone = ("no correlation can be significant" if np.isnan(big.critical_rho_first)
             else f"a correlation is significant alone only if |rho| reaches {big.critical_rho_first:.3f}")
    need = (f"{power:.0%} power needs a true correlation of {big.min_detectable_rho_first:.3f}"
            if np.isfinite(big.min_detectable_rho_first) else f"no true correlation gives {power:.0%} power")
    out.append(f"- {n_sig} of {len(corr)} rank correlations between the atlas and the causal effects "
               f"({per} per precision, over {int(corr.n.min())} or {int(corr.n.max())} families) "
               f"{'is' if n_sig == 1 else 'are'} significant after Holm's correction within each precision at "
               f"{alpha:g}. With {n_big} families, {alone} after that correction, and {need}"
               + (": a non-significant correlation here is absence of evidence, not evidence that routing fails "
                  "to predict the effects." if n_sig == 0 else "."))
    ops = list(dict.fromkeys(effects.operator))
    flips = effects.pivot(index="family", columns="operator", values="modular")
    changed = int((flips.nunique(axis=1) > 1).sum()) if flips.shape[1] > 1 else 0
    span = f"{min(n_positions.values())} to {max(n_positions.values())} positions per topic"
    what = (f"no topic family passes under any operator ({', '.join(ops)}), with {span}, so this run shows nothing "
            "about the operators" if not effects.modular.any() else
            f"{changed} of {effects.family.nunique()} topic families change verdict between the operators "
            f"({', '.join(ops)}), with {span}")
    out.append(f"- On {model}, {what}; it illustrates the procedure on a small model and corpus and says nothing "
               "about Command A+.")
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeaudit.chapters.modularity",
                                 description="The Command A+ modularity study's released data: source and embedded table.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="build the embedded derived table from the original files")
    pk.add_argument("src", nargs="?", default=None, help=f"the {FOLDER}/ folder (default: in $MOEAUDIT_DATA_DIR)")
    pk.add_argument("--out", default=None, help=f"output parquet (default: {EMBEDDED_TABLE})")
    sub.add_parser("source", help="say where the study's data would be read from")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        try:
            out = pack(args.src, out=args.out)
        except (ModularityDataError, FileNotFoundError) as err:
            ap.exit(2, f"error: {err}\n")
        print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) and {out.with_suffix('.json')}")
    else:
        print(source().describe())
    return 0


def check_13_command_a_modularity_1(answer, derived: dict) -> report.AnswerCheck:
    """Exercise 1 of the modularity chapter: how many experts the Spanish (``"es"``) and Arabic (``"ar"``)
    families share when only the shared core is excluded (``derived``: family -> expert indices, as made by
    :func:`top_k_families`), an exact count. ``ValueError`` for a ``derived`` without both families or an
    answer that is not a number."""
    missing = {"es", "ar"} - set(derived)
    if missing:
        raise ValueError(f"derived must map the families 'es' and 'ar' to their experts; it lacks {sorted(missing)}")
    shared = len(set(derived["es"]) & set(derived["ar"]))
    return report.check_answer(answer, shared, what="the number of experts the Spanish and Arabic families share")


def check_13_command_a_modularity_2(answer, verdict: pd.DataFrame, statements: dict) -> report.AnswerCheck:
    """Exercise 2 of the modularity chapter: the fewest decimals at which the W4A4 table would settle the
    Spanish point verdict with the margin the study states (:func:`decimals_to_resolve`), an exact count.
    When no number of decimals up to eight settles it, every answer is judged wrong with that reason.
    ``ValueError`` for a verdict table without the W4A4 Spanish row or an answer that is not a number."""
    rows = verdict[(verdict.precision == "W4A4") & (verdict.family == "es")]
    if rows.empty:
        raise ValueError("verdict must hold the W4A4 row of the family 'es' (the chapter's verdict table)")
    d = decimals_to_resolve(rows.iloc[0], statements["es_point_margin"])
    what = "the decimals that settle the Spanish W4A4 verdict"
    if d is None:
        report.check_answer(answer, 0, what=what)  # refuses an answer that is not a number
        return report.AnswerCheck(False, float(answer), float("nan"),
                                  f"Not yet: no number of decimals up to eight settles {what[4:]}.")
    return report.check_answer(answer, d, what=what)


if __name__ == "__main__":
    raise SystemExit(main())
