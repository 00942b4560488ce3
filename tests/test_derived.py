"""The one mechanism of the embedded derived tables (moeaudit.derived): a round trip keeps every
table's columns, order, dtypes and missing values; the provenance record is the caller's plus each
table's description."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from moeaudit.derived import provenance, read_derived, sha256, write_derived


def test_round_trip_keeps_columns_dtypes_and_missing_values(tmp_path):
    a = pd.DataFrame({"model": pd.Series(["x", None, "z"], dtype=object), "layer": np.array([0, 7, 15], dtype="int64"),
                      "d": [0.1, np.nan, -0.3]})
    b = pd.DataFrame({"k": np.array([1, 2], dtype="int32"), "ok": [True, False]})
    out = write_derived({"a": a, "b": b}, tmp_path / "sub" / "t.parquet", {"source_commit": "abc"})
    rec = provenance(out)
    assert rec["source_commit"] == "abc" and list(rec["tables"]) == ["a", "b"]
    assert rec["tables"]["a"] == {"rows": 3, "columns": ["model", "layer", "d"],
                                  "dtypes": {"model": "object", "layer": "int64", "d": "float64"}}
    pd.testing.assert_frame_equal(read_derived(out, "a"), a)
    pd.testing.assert_frame_equal(read_derived(out, "b"), b)
    assert read_derived(out, "a").model[1] is None
    with pytest.raises(KeyError):
        read_derived(out, "c")


def test_sha256_is_of_the_bytes(tmp_path):
    f = tmp_path / "f.json"
    f.write_bytes(b'{"x": 1}\n')
    assert sha256(f) == hashlib.sha256(b'{"x": 1}\n').hexdigest()


def test_a_truncated_or_replaced_table_is_refused_by_name(tmp_path):
    a = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    out = write_derived({"a": a, "b": a.iloc[:1]}, tmp_path / "t.parquet", {})
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t.parquet is not a readable derived table"):
        read_derived(out, "a")
    write_derived({"a": a.iloc[:2], "b": a.iloc[:1]}, tmp_path / "u.parquet", {})
    (tmp_path / "u.json").write_text((tmp_path / "t.json").read_text())  # provenance of another table
    with pytest.raises(ValueError, match="has 2 rows, its provenance says 3"):
        read_derived(tmp_path / "u.parquet", "a")
