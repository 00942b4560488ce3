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


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """The results cache directory (created if missing)."""
    chosen = path if path not in (None, "") else os.environ.get(RESULTS_DIR_ENV)
    if chosen in (None, ""):
        base = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()
        chosen = base / "results"
    p = Path(chosen).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p
