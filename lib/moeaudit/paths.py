"""Where the project reads data from and writes results to.

Nothing under the data directory is ever copied into the repository. The data directory is
named by a parameter or by the ``MOEAUDIT_DATA_DIR`` environment variable and is expected to
hold ``wikitext-2/`` (WikiText-2 splits) and ``paper-released/`` (the authors' result files,
same relative paths as their repository). Results are cached under ``MOEAUDIT_RESULTS_DIR``
(default: ``results/`` at the repository root, or the current directory when installed).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MOEAUDIT_DATA_DIR"
RESULTS_DIR_ENV = "MOEAUDIT_RESULTS_DIR"
CACHE_DIR_ENV = "MOEAUDIT_CACHE_DIR"

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``path`` if given, else ``$MOEAUDIT_DATA_DIR``, else ``None``."""
    chosen = path if path not in (None, "") else os.environ.get(DATA_DIR_ENV)
    if chosen in (None, ""):
        return None
    p = Path(chosen).expanduser()
    if not p.is_dir():
        raise ValueError(f"data_dir={str(p)!r} is not a directory (set it or ${DATA_DIR_ENV} to the folder holding wikitext-2/ and paper-released/)")
    return p


#: folders of the repository that hold its sources: a results directory may not lie in them
SOURCE_FOLDERS = ("lib", "notebooks", "tests", "docs", "benchmarks", "scripts", ".ci", "book", ".git", ".venv")


def refused_output_dir(path: str | os.PathLike) -> str | None:
    """Why ``path`` may not be written to (a results directory, an offload folder), or ``None``: the filesystem root, the installed package
    (its shipped models and data), or a source folder of the repository (:data:`SOURCE_FOLDERS`):
    a run would drop parquet files among shipped files, and the book would see its sources change."""
    p = Path(path).expanduser().resolve()
    if p == Path(p.anchor):
        return "it is the filesystem root"
    package = Path(__file__).resolve().parent
    if p == package or package in p.parents:
        return "it lies inside the moeaudit package, among its shipped models and data"
    for name in SOURCE_FOLDERS:
        folder = (REPO_ROOT / name).resolve()
        if (REPO_ROOT / "pyproject.toml").exists() and (p == folder or folder in p.parents):
            return f"it lies inside the repository's source folder {name}/"
    return None


def cache_dir() -> Path:
    """Per-user cache (downloaded released files, offloaded weights): ``$MOEAUDIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/moeaudit``, else ``~/.cache/moeaudit`` (not created here)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moeaudit"


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """The results cache directory (created if missing): ``path``, else ``$MOEAUDIT_RESULTS_DIR``, else
    ``results/`` at the repository root (or the current directory when installed). ``ValueError``
    for a directory that may not hold results (:func:`refused_output_dir`)."""
    chosen = path if path not in (None, "") else os.environ.get(RESULTS_DIR_ENV)
    if chosen in (None, ""):
        base = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()
        chosen = base / "results"
    p = Path(chosen).expanduser()
    if why := refused_output_dir(p):
        raise ValueError(f"results_dir={str(p)!r} is refused: {why}; give a folder of its own "
                         f"(or set ${RESULTS_DIR_ENV})")
    p.mkdir(parents=True, exist_ok=True)
    return p
