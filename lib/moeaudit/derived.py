"""Embedded derived tables: compact tables of numbers derived from other people's released files,
stored as one parquet file with a provenance record beside it.

One mechanism serves every embedded table of the book (the paper's released results, the Command A+
study's data): :func:`write_derived` stacks named tables into one parquet file (a ``table`` column
tells them apart) and writes ``<name>.json`` beside it with the caller's provenance (source repository,
commit, the sha256 of every source file, licence and attribution where the data ask for them) and each
table's columns and dtypes; :func:`read_derived` gives one table back with exactly those columns and
dtypes. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd


def sha256(path) -> str:
    """The sha256 (hex) of the bytes of the file ``path``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(parquet) -> dict:
    """The provenance record written beside ``parquet`` (its ``.json``). ``FileNotFoundError`` without one."""
    return json.loads(Path(parquet).with_suffix(".json").read_text(encoding="utf-8"))


def write_derived(tables: dict[str, pd.DataFrame], out, record: dict) -> Path:
    """Write ``tables`` (name -> DataFrame) stacked into the parquet file ``out`` (zstd; one parquet type
    per column: a column that holds text in one table becomes a string column, one that holds booleans
    a nullable boolean one) and ``record`` plus each table's ``rows``, ``columns``
    and ``dtypes`` (under ``"tables"``) as ``out.with_suffix(".json")``. Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    long = pd.concat([t.assign(table=name) for name, t in tables.items()], ignore_index=True)
    for col in long.columns:  # one parquet type per column across the stacked tables
        if long[col].dtype == object:
            values = long[col].dropna()
            if values.map(lambda v: isinstance(v, (bool, np.bool_))).all():
                long[col] = long[col].astype("boolean")  # a bool column that other tables lack: nullable
            else:
                long[col] = long[col].astype("string")
    long.to_parquet(out, index=False, compression="zstd")
    full = {**record, "tables": {name: {"rows": len(t), "columns": list(t.columns),
                                        "dtypes": {c: str(t[c].dtype) for c in t.columns}}
                                 for name, t in tables.items()}}
    out.with_suffix(".json").write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
    return out


def read_derived(parquet, name: str) -> pd.DataFrame:
    """Table ``name`` of the derived parquet file, with the columns, order and dtypes it had when written
    (missing values of text columns as ``None``). ``KeyError`` for a table the provenance does not list;
    ``ValueError`` naming the file when it is not a readable parquet file or its table does not have the
    rows and columns the provenance records (a truncated or replaced file)."""
    spec = provenance(parquet)["tables"][name]
    try:
        long = pd.read_parquet(parquet, filters=[("table", "==", name)])
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{parquet} is not a readable derived table ({type(err).__name__}: {err}); rebuild it with "
                         f"the pack command named in {Path(parquet).with_suffix('.json').name}") from err
    missing = [c for c in spec["columns"] if c not in long.columns]
    if missing:
        raise ValueError(f"{parquet}: table {name!r} lacks the columns {missing} that its provenance lists")
    if len(long) != spec["rows"]:
        raise ValueError(f"{parquet}: table {name!r} has {len(long)} rows, its provenance says {spec['rows']}")
    out = long[spec["columns"]].reset_index(drop=True)
    for col, dtype in spec["dtypes"].items():
        out[col] = (out[col].astype(object).where(out[col].notna(), None) if dtype == "object"
                    else out[col].astype(dtype))
    return out
