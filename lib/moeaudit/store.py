"""On-disk cache of raw records, keyed by the parameters that produced them.

A run is a directory ``<results_dir>/<kind>/<key>/`` where ``key`` hashes the canonical JSON of
its parameters (``params.json`` is written beside the records). Changing any parameter changes
the key, so records of other parameters are never reused.

Work is split into chunks, each a list of items (sequence ids, plan strings, ...). A chunk is
identified by its content, not by its position: :func:`chunk_id` hashes the canonical JSON of the
chunk's items, in order, and the finished chunk is written atomically as
``chunk-<id>.parquet``. How the work was split is therefore part of what a file is: a chunk
file is reused only by a request containing a chunk with exactly the same items in the same
order, and a resumed run with another chunk size recomputes the chunks it does not find. Files
of other chunkings are left in place, never read for this request.

``COMPLETE`` is written last and is a manifest: the ids of the chunks that make up the set, in
order. Records are complete *for a request* (a list of chunks) when the manifest lists exactly
that request's chunk ids and every listed file exists; anything else (no manifest, a manifest of
other chunks, a missing file, a ``COMPLETE`` of the old layout that held only a number of
``part-XXXXX.parquet`` files, whose chunking was not recorded) is not complete, and the missing
chunks are computed. The old layout's ``part-`` files are never read (and are removed once a
manifest replaces its ``COMPLETE``).

Every chunk file records what it holds: its parameter set (kind and key), chunk id, row count and
columns are written into the parquet file's own metadata (key ``moeaudit``). A file is served only
when it verifies: it reads as parquet, names the parameter set and the chunk it is found for, and
holds the rows and columns it says. A file that does not (a
truncated write, another chunk's file copied over it, a file of a version that recorded nothing)
is removed with one :class:`ChunkMismatchWarning` naming it and recomputed, never served and never
fatal; a set is complete only when every chunk of its manifest verifies.

Processes that need the same records at the same time (chapters executed in parallel) take an
exclusive lock on the run directory: the first computes, the others wait and then read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .engine import progress_bar
from .paths import results_dir as resolve_results_dir

MANIFEST_FORMAT = 3  # format 1 had a bare chunk count in COMPLETE; format 2's chunk files recorded nothing
#: the key of a chunk file's parquet metadata that records what it holds
CHUNK_META_KEY = b"moeaudit"


class ChunkMismatchWarning(UserWarning):
    """A chunk file did not verify (unreadable, another chunk's, or recording nothing) and is recomputed."""


def params_key(params: dict) -> str:
    """Short stable hash of a JSON-serialisable parameter dict."""
    blob = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _json_item(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"chunk items must be JSON-serialisable (numbers, strings, lists, dicts); got {type(obj).__name__}")


def chunk_id(chunk) -> str:
    """The identity of a chunk: a hash of the canonical JSON of its items, in order.

    Items are compared by their JSON form: a tuple and a list with the same elements, or a NumPy
    integer and a Python one, are the same item; ``1`` and ``1.0`` or ``1`` and ``"1"`` are not.
    Raises ``TypeError`` for items with no JSON form (never a ``str()`` fallback, which could
    give two different items one identity)."""
    blob = json.dumps(chunk, sort_keys=True, separators=(",", ":"), default=_json_item)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RecordStore:
    """Chunked, resumable parquet records for one parameter set.

    ``chunks`` is the requested work (a sequence of chunks, each a list of items); with it,
    :attr:`complete` and :meth:`load` are about that request. Without it they are about whatever
    set the manifest in ``COMPLETE`` names."""

    def __init__(self, kind: str, params: dict, *, chunks: Sequence | None = None, results_dir=None):
        self.kind, self.params = kind, params
        self.key = params_key(params)
        self.path = resolve_results_dir(results_dir) / kind / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        self.chunk_ids = None if chunks is None else [chunk_id(c) for c in chunks]
        meta = self.path / "params.json"
        if not meta.exists():
            _atomic_write_text(meta, json.dumps(params, sort_keys=True, indent=1, default=str))

    def __repr__(self) -> str:
        return f"RecordStore({self.kind!r}, key={self.key!r}, path={str(self.path)!r})"

    def manifest(self) -> list[str] | None:
        """The chunk ids listed in ``COMPLETE``, or ``None`` when there is no manifest of the
        current format (no ``COMPLETE``, or one of the old layout holding a bare count)."""
        try:
            data = json.loads((self.path / "COMPLETE").read_text())
        except (OSError, ValueError):  # missing, unreadable, a directory, not JSON: no manifest
            return None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            return None
        ids = data.get("chunks")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return None
        return ids

    @property
    def complete(self) -> bool:
        """True when ``COMPLETE`` names exactly the requested chunks (or, with no request, names
        some chunks) and every named chunk file exists."""
        listed = self.manifest()
        if listed is None or (self.chunk_ids is not None and listed != self.chunk_ids):
            return False
        return all(self.has_chunk(i) for i in listed)

    def missing(self) -> list[str]:
        """Ids of requested chunks with no file yet, each once, in request order."""
        if self.chunk_ids is None:
            raise ValueError("missing() needs the requested chunks (RecordStore(..., chunks=...))")
        return [i for i in dict.fromkeys(self.chunk_ids) if not self.has_chunk(i)]

    def chunk_path(self, cid: str) -> Path:
        """The file of the chunk with id ``cid`` (see :func:`chunk_id`)."""
        return self.path / f"chunk-{cid}.parquet"

    def has_chunk(self, cid: str) -> bool:
        """Whether the chunk's file exists and verifies (:meth:`verify_chunk`); a file that does not
        is removed (with one :class:`ChunkMismatchWarning`), so that the chunk is recomputed."""
        path = self.chunk_path(cid)
        if not path.exists() and not path.is_symlink():
            return False
        problem = self.verify_chunk(cid)
        if problem is None:
            return True
        warnings.warn(f"{path}: {problem}; it is removed and the chunk recomputed", ChunkMismatchWarning,
                      stacklevel=2)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return False

    def verify_chunk(self, cid: str) -> str | None:
        """``None`` when the file of chunk ``cid`` verifies, else what is wrong with it: unreadable as
        parquet (truncated, not parquet), no record of what it holds, the record of another chunk,
        or another number of rows than recorded. Reads only the file's footer."""
        path = self.chunk_path(cid)
        if path.is_dir():
            return "it is a directory, not a chunk file"
        try:
            meta = pq.read_metadata(path)  # the footer only, read once
            names = meta.schema.to_arrow_schema().names
        except (OSError, pa.ArrowException) as exc:
            return f"unreadable as parquet ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
        raw = (meta.metadata or {}).get(CHUNK_META_KEY)
        if raw is None:
            return "the file does not record which chunk it holds"
        try:
            rec = json.loads(raw)
        except ValueError:
            return "its record of what it holds is not JSON"
        if not isinstance(rec, dict):
            return "its record of what it holds is not a JSON object"
        if (rec.get("kind"), rec.get("key")) != (self.kind, self.key):
            return (f"it was written for another parameter set ({rec.get('kind')!r}, key {rec.get('key')!r}), "
                    f"not this one ({self.kind!r}, key {self.key!r})")
        if rec.get("chunk_id") != cid:
            return f"it holds chunk {rec.get('chunk_id')!r}, not {cid!r}"
        if not (isinstance(rec.get("rows"), int) and rec["rows"] == meta.num_rows):
            return f"it records {rec.get('rows')!r} rows and holds {meta.num_rows}"
        if "columns" in rec and rec["columns"] != list(names):
            return f"its columns {list(names)} are not the ones recorded {rec['columns']}"
        return None

    def save_chunk(self, cid: str, df: pd.DataFrame) -> None:
        """Write the records of the chunk with id ``cid`` atomically (a temporary file renamed
        into place), recording in the file's metadata the chunk id and the row count. The caller
        vouches that ``df`` is what the chunk's items produce."""
        path = self.chunk_path(cid)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        table = pa.Table.from_pandas(df, preserve_index=False)
        record = json.dumps({"chunk_id": cid, "rows": len(df), "kind": self.kind, "key": self.key,
                             "columns": list(table.schema.names)}).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), CHUNK_META_KEY: record})
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def mark_complete(self) -> None:
        """Write the manifest of the requested chunks into ``COMPLETE`` (atomically), and remove
        the old layout's ``part-XXXXX.parquet`` files, which are never read. Call it holding the
        run's lock (as :func:`cached_records` does).

        Raises ``ValueError`` without a request, ``RuntimeError`` if a requested chunk is missing."""
        if self.chunk_ids is None:
            raise ValueError("mark_complete() needs the requested chunks (RecordStore(..., chunks=...))")
        if missing := self.missing():
            raise RuntimeError(f"cannot mark {self.path} complete: {len(missing)} requested chunk(s) missing")
        _atomic_write_text(self.path / "COMPLETE",
                           json.dumps({"format": MANIFEST_FORMAT, "chunks": self.chunk_ids}, indent=0))
        for f in self.path.glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"):
            f.unlink(missing_ok=True)

    def load(self) -> pd.DataFrame:
        """The records of the requested chunks (or, with no request, of the chunks the manifest
        names), concatenated in chunk order with a fresh index.

        Raises ``RuntimeError`` ("incomplete") unless :attr:`complete`."""
        ids = self.chunk_ids if self.chunk_ids is not None else self.manifest()
        if ids is None or not self.complete:
            raise RuntimeError(f"records in {self.path} are incomplete"
                               + ("" if self.chunk_ids is None else " for the requested chunks"))
        return self._read(ids)

    def _read(self, ids: list[str]) -> pd.DataFrame:
        frames = [pd.read_parquet(self.chunk_path(i)) for i in ids]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}-{threading.get_ident()}")
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
    """Return ``compute(chunk)`` for every chunk of ``chunks``, concatenated in order (index reset),
    computing (and saving) only the chunks whose files are not on disk yet.

    A chunk's file is found by its content (:func:`chunk_id`), so the result equals an
    uninterrupted run with this chunking whatever chunking earlier, interrupted runs used;
    ``compute`` must depend only on ``params`` and the chunk's items. Chunks with identical
    items are computed once and their rows repeated. The records are always read back from disk
    (one dtype round trip for computed and reused chunks alike). Raises ``TypeError`` for chunk
    items with no JSON form, and whatever ``compute`` raises (finished chunks stay on disk and
    the set is not marked complete)."""
    store = RecordStore(kind, params, chunks=chunks, results_dir=results_dir)
    if not store.complete:
        with exclusive(store.path / ".lock"):  # re-checked under the lock: another process may have finished it
            if not store.complete:
                first: dict[str, object] = {}
                for cid, chunk in zip(store.chunk_ids, chunks):
                    first.setdefault(cid, chunk)
                for cid in progress_bar(store.missing(), desc=kind, progress=progress):
                    store.save_chunk(cid, compute(first[cid]))
                store.mark_complete()
    # The requested files, read directly: they are named by content and never rewritten or
    # removed, so this holds even if another request rewrites COMPLETE in the meantime.
    return store._read(store.chunk_ids), store
