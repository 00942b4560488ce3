"""On-disk cache of raw records, keyed by the parameters that produced them.

A run is a directory ``<results_dir>/<kind>/<key>/`` where ``key`` hashes the canonical JSON of
its parameters (``params.json`` is written beside the records). Work is split into chunks;
each finished chunk is written atomically as ``part-XXXXX.parquet``, so an interrupted run
resumes at the first missing chunk. ``COMPLETE`` is written last: a directory without it is
never read as a finished result. Changing any parameter changes the key, so stale records
are never silently reused. Processes that need the same records at the same time (chapters
executed in parallel) take an exclusive lock on the run directory: the first computes, the
others wait and then read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .engine import progress_bar
from .paths import results_dir as resolve_results_dir


def params_key(params: dict) -> str:
    """Short stable hash of a JSON-serialisable parameter dict."""
    blob = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RecordStore:
    """Chunked, resumable parquet records for one parameter set."""

    def __init__(self, kind: str, params: dict, *, results_dir=None):
        self.kind, self.params = kind, params
        self.key = params_key(params)
        self.path = resolve_results_dir(results_dir) / kind / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "params.json"
        if not meta.exists():
            _atomic_write_text(meta, json.dumps(params, sort_keys=True, indent=1, default=str))

    @property
    def complete(self) -> bool:
        return (self.path / "COMPLETE").exists()

    def chunk_path(self, i: int) -> Path:
        return self.path / f"part-{i:05d}.parquet"

    def has_chunk(self, i: int) -> bool:
        return self.chunk_path(i).exists()

    def save_chunk(self, i: int, df: pd.DataFrame) -> None:
        tmp = self.chunk_path(i).with_suffix(f".tmp-{os.getpid()}")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.chunk_path(i))

    def mark_complete(self, n_chunks: int) -> None:
        _atomic_write_text(self.path / "COMPLETE", str(n_chunks))

    def load(self) -> pd.DataFrame:
        if not self.complete:
            raise RuntimeError(f"records in {self.path} are incomplete")
        n = int((self.path / "COMPLETE").read_text())
        return pd.concat([pd.read_parquet(self.chunk_path(i)) for i in range(n)], ignore_index=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Hold an exclusive advisory lock (``flock``) on ``lock_file`` for the block; another process
    asking for the same lock waits until it is released (or its holder exits)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_records(kind: str, params: dict, chunks: Sequence, compute: Callable[[object], pd.DataFrame], *,
                   results_dir=None, progress: bool | None = None) -> tuple[pd.DataFrame, RecordStore]:
    """Return the records for ``params``, computing (and saving) only the chunks not on disk yet."""
    store = RecordStore(kind, params, results_dir=results_dir)
    if not store.complete:
        with exclusive(store.path / ".lock"):  # re-checked under the lock: another process may have finished it
            if not store.complete:
                todo = [i for i in range(len(chunks)) if not store.has_chunk(i)]
                for i in progress_bar(todo, desc=kind, progress=progress):
                    store.save_chunk(i, compute(chunks[i]))
                store.mark_complete(len(chunks))
    return store.load(), store
