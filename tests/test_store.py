"""Record store: a resumed run equals an uninterrupted one, whatever the chunking of either.

Pure pandas: ``compute`` makes rows deterministically from a chunk's items, and some columns
depend on the chunk as a whole (its length and first item, as batching does in the real
callers), so rows computed under another chunking can never pass for the requested ones.
"""

import functools
import json
import random

import pandas as pd
import pytest

from moeaudit.store import RecordStore, cached_records, params_key


class Interrupted(Exception):
    pass


class Compute:
    """Rows for a chunk: ``1 + item % 4`` rows per item; raises after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, chunk):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Interrupted
        self.calls.append(list(chunk))
        rows = [{"item": item, "r": r, "value": _int(item) * 10 + r, "chunk_len": len(chunk), "chunk_first": chunk[0]}
                for item in chunk for r in range(1 + _int(item) % 4)]
        return pd.DataFrame(rows, columns=["item", "r", "value", "chunk_len", "chunk_first"])


def _int(item):
    return item if isinstance(item, int) else len(item)


def chunked(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def run(tmp_path, chunks, compute, kind="demo", params=None):
    df, _ = cached_records(kind, params or {"x": 1}, chunks, compute, results_dir=tmp_path, progress=False)
    return df


def uninterrupted(tmp_path, chunks, kind="demo", params=None):
    return run(tmp_path / "fresh", chunks, Compute(), kind=kind, params=params)


def test_reported_case_chunks_of_two_interrupted_then_eight(tmp_path):
    items = list(range(18))
    with pytest.raises(Interrupted):
        run(tmp_path, chunked(items, 2), Compute(fail_after=3))
    assert not RecordStore("demo", {"x": 1}, results_dir=tmp_path).complete
    new = chunked(items, 8)
    compute = Compute()
    df = run(tmp_path, new, compute)
    expected = uninterrupted(tmp_path, new)
    pd.testing.assert_frame_equal(df, expected)
    assert sorted(df["item"].unique()) == items
    assert compute.calls == new  # no chunk of size 8 was on disk: all three computed
    assert RecordStore("demo", {"x": 1}, results_dir=tmp_path).complete


@pytest.mark.parametrize("seed", range(8))
def test_interrupted_at_random_points_and_resumed_with_other_chunk_sizes(tmp_path, seed):
    rng = random.Random(seed)
    items = list(range(rng.randint(5, 30)))
    sizes = [rng.randint(1, 9) for _ in range(rng.randint(1, 3))] + [rng.randint(1, 9)]
    done = set()
    for size in sizes[:-1]:  # one or more interrupted runs, each with its own chunk size
        chunks = chunked(items, size)
        need = [c for c in chunks if tuple(c) not in done]
        if not need:  # an earlier run left every chunk of this size: nothing to interrupt
            continue
        compute = Compute(fail_after=rng.randint(0, len(need) - 1))
        with pytest.raises(Interrupted):
            run(tmp_path, chunks, compute)
        assert compute.calls == need[:compute.fail_after]  # chunks on disk were not recomputed
        done |= {tuple(c) for c in compute.calls}
        assert not RecordStore("demo", {"x": 1}, results_dir=tmp_path).complete
    final = chunked(items, sizes[-1])
    compute = Compute()
    df = run(tmp_path, final, compute)
    pd.testing.assert_frame_equal(df, uninterrupted(tmp_path, final))
    # chunks finished by an earlier run with identical items are reused, every other one computed
    assert compute.calls == [c for c in final if tuple(c) not in done]
    # and a second call computes nothing
    pd.testing.assert_frame_equal(run(tmp_path, final, lambda c: pytest.fail("recomputed")), df)


@pytest.mark.parametrize("seed", range(4))
def test_a_complete_set_is_not_complete_for_another_chunking(tmp_path, seed):
    rng = random.Random(100 + seed)
    items = list(range(rng.randint(6, 25)))
    a, b = rng.sample(range(1, 10), 2)
    run(tmp_path, chunked(items, a), Compute())
    new = chunked(items, b)
    with pytest.raises(Interrupted):  # chunks of size b are not on disk: the set is not taken as complete
        run(tmp_path, new, Compute(fail_after=0))
    df = run(tmp_path, new, Compute())
    pd.testing.assert_frame_equal(df, uninterrupted(tmp_path, new))
    # switching back reuses the files of the first chunking
    pd.testing.assert_frame_equal(run(tmp_path, chunked(items, a), lambda c: pytest.fail("recomputed")),
                                  uninterrupted(tmp_path / "again", chunked(items, a)))


def test_a_different_item_list_under_the_same_params_is_not_complete(tmp_path):
    run(tmp_path, chunked(list(range(10)), 4), Compute())
    other = chunked(list(range(10, 20)), 4)
    compute = Compute()
    df = run(tmp_path, other, compute)
    assert compute.calls == other
    pd.testing.assert_frame_equal(df, uninterrupted(tmp_path, other))
    # a subset of what is on disk: same chunks, so reused, and only those rows returned
    sub = other[:1]
    pd.testing.assert_frame_equal(run(tmp_path, sub, lambda c: pytest.fail("recomputed")),
                                  uninterrupted(tmp_path / "sub", sub))


def test_legacy_complete_with_a_chunk_count_is_not_misread(tmp_path):
    items, params = list(range(18)), {"x": 1}
    # the old layout: part files numbered by position, COMPLETE holding their number
    path = tmp_path / "demo" / params_key(params)
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    old = Compute()
    for i, chunk in enumerate(chunked(items, 2)[:3]):
        old(chunk).to_parquet(path / f"part-{i:05d}.parquet", index=False)
    (path / "COMPLETE").write_text("3")
    assert not RecordStore("demo", params, results_dir=tmp_path).complete
    new = chunked(items, 8)
    df = run(tmp_path, new, Compute())
    pd.testing.assert_frame_equal(df, uninterrupted(tmp_path, new))
    # with the old chunking too: the old files are not taken for it
    compute = Compute()
    pd.testing.assert_frame_equal(run(tmp_path, chunked(items, 2), compute),
                                  uninterrupted(tmp_path / "two", chunked(items, 2)))
    assert compute.calls == [c for c in chunked(items, 2) if c not in new]  # [16, 17] is a chunk of both
    assert not list(path.glob("part-*"))  # the old layout's files, never read, are gone


def test_pruned_perplexity_style_string_chunks(tmp_path):
    plans = [json.dumps({str(L): [e]}, sort_keys=True) for L in range(3) for e in range(4)]
    params = {"kind": "pruned_perplexity", "plans": plans}
    with pytest.raises(Interrupted):
        run(tmp_path, chunked(plans, 8), Compute(fail_after=1), kind="pruned_perplexity", params=params)
    new = chunked(plans, 5)
    compute = Compute()
    df = run(tmp_path, new, compute, kind="pruned_perplexity", params=params)
    pd.testing.assert_frame_equal(df, uninterrupted(tmp_path, new, kind="pruned_perplexity", params=params))
    assert df["item"].tolist() == [p for p in plans for _ in range(1 + len(p) % 4)]
    assert compute.calls == new


def test_manifest_names_the_chunks_and_a_lost_chunk_file_is_recomputed(tmp_path):
    from moeaudit.store import chunk_id

    chunks = chunked(list(range(7)), 3)
    run(tmp_path, chunks, Compute())
    store = RecordStore("demo", {"x": 1}, chunks=chunks, results_dir=tmp_path)
    manifest = json.loads((store.path / "COMPLETE").read_text())
    assert manifest["chunks"] == [chunk_id(c) for c in chunks]
    assert store.complete
    store.chunk_path(chunk_id(chunks[1])).unlink()
    assert not store.complete
    assert not RecordStore("demo", {"x": 1}, results_dir=tmp_path).complete
    with pytest.raises(RuntimeError, match="incomplete"):
        store.load()
    compute = Compute()
    pd.testing.assert_frame_equal(run(tmp_path, chunks, compute), uninterrupted(tmp_path, chunks))
    assert compute.calls == [chunks[1]]


def test_chunk_ids_follow_content_not_position():
    from moeaudit.store import chunk_id

    import numpy as np

    assert chunk_id([1, 2]) == chunk_id([np.int64(1), np.int64(2)]) == chunk_id((1, 2))
    assert len({chunk_id([1, 2]), chunk_id([2, 1]), chunk_id([1]), chunk_id([1, 2, 3]), chunk_id(["1", "2"]),
                chunk_id([1.0, 2.0])}) == 6
    with pytest.raises(TypeError, match="JSON"):
        chunk_id([object()])


def test_mark_complete_refuses_while_chunks_are_missing(tmp_path):
    from moeaudit.store import chunk_id

    chunks = [["a"], ["b"]]
    store = RecordStore("demo", {"x": 1}, chunks=chunks, results_dir=tmp_path)
    store.save_chunk(chunk_id(chunks[0]), Compute()(chunks[0]))
    with pytest.raises(RuntimeError, match="missing"):
        store.mark_complete()
    assert not store.complete


def _records_in_child(results_dir, size, out):
    chunks = chunked(list(range(12)), size)
    df, _ = cached_records("shared", {"x": 1}, chunks, functools.partial(_slow_compute), results_dir=results_dir,
                           progress=False)
    df.to_parquet(out, index=False)


def _slow_compute(chunk):
    import time

    time.sleep(0.05)
    return Compute()(chunk)


def test_concurrent_processes_with_different_chunkings_each_get_their_own(tmp_path):
    import multiprocessing

    sizes = [2, 5, 2, 5]
    outs = [tmp_path / f"out-{i}.parquet" for i in range(len(sizes))]
    procs = [multiprocessing.get_context("fork").Process(target=_records_in_child, args=(tmp_path, s, o))
             for s, o in zip(sizes, outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(sizes)
    for size, out in zip(sizes, outs):
        expected = uninterrupted(tmp_path / f"fresh-{size}", chunked(list(range(12)), size), kind="shared")
        pd.testing.assert_frame_equal(pd.read_parquet(out), expected)


def test_a_chunk_file_overwritten_by_another_valid_chunk_is_recomputed_not_served(tmp_path):
    """A bad copy of a results folder: one chunk's file replaced by another chunk's (a valid parquet)."""
    from moeaudit.store import ChunkMismatchWarning

    chunks = chunked(list(range(12)), 4)
    expected = uninterrupted(tmp_path, chunks)
    _, store = cached_records("demo", {"x": 1}, chunks, Compute(), results_dir=tmp_path, progress=False)
    a, b = store.chunk_ids[0], store.chunk_ids[1]
    store.chunk_path(b).write_bytes(store.chunk_path(a).read_bytes())
    with pytest.warns(ChunkMismatchWarning, match=rf"chunk-{b}\.parquet: it holds chunk '{a}', not '{b}'"):
        assert not store.complete
    compute = Compute()
    got = run(tmp_path, chunks, compute)  # the bad file was removed when it failed to verify
    assert compute.calls == [chunks[1]]  # only the bad chunk is recomputed
    pd.testing.assert_frame_equal(got, expected)
    assert not got.duplicated(["item", "r"]).any()


def test_a_truncated_chunk_file_is_recomputed_even_in_a_set_marked_complete(tmp_path):
    from moeaudit.store import ChunkMismatchWarning

    chunks = chunked(list(range(10)), 5)
    expected = uninterrupted(tmp_path, chunks)
    _, store = cached_records("demo", {"x": 1}, chunks, Compute(), results_dir=tmp_path, progress=False)
    path = store.chunk_path(store.chunk_ids[1])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    compute = Compute()
    with pytest.warns(ChunkMismatchWarning, match="unreadable as parquet"):
        got = run(tmp_path, chunks, compute)
    assert compute.calls == [chunks[1]]
    pd.testing.assert_frame_equal(got, expected)


def test_a_chunk_file_that_records_nothing_is_not_served(tmp_path):
    """A file of the same name written by other means (or an older version) holds no record of its chunk."""
    from moeaudit.store import ChunkMismatchWarning

    chunks = chunked(list(range(6)), 3)
    expected = uninterrupted(tmp_path, chunks)
    _, store = cached_records("demo", {"x": 1}, chunks, Compute(), results_dir=tmp_path, progress=False)
    Compute()(chunks[0]).assign(value=-1).to_parquet(store.chunk_path(store.chunk_ids[0]), index=False)
    with pytest.warns(ChunkMismatchWarning, match="does not record which chunk it holds"):
        got = run(tmp_path, chunks, Compute())
    pd.testing.assert_frame_equal(got, expected)


def test_a_chunk_of_another_parameter_set_or_a_directory_is_recomputed(tmp_path):
    """Chunk files copied in from a run with other parameters (same chunk ids), a chunk with a column
    dropped, and a directory in place of a chunk file: each recomputed with one warning, never fatal."""
    from moeaudit.store import ChunkMismatchWarning

    chunks = chunked(list(range(8)), 4)
    expected = uninterrupted(tmp_path, chunks)
    _, mine = cached_records("demo", {"x": 1}, chunks, Compute(), results_dir=tmp_path, progress=False)
    _, other = cached_records("demo", {"x": 2}, chunks, Compute(), results_dir=tmp_path, progress=False)
    cid = mine.chunk_ids[0]
    mine.chunk_path(cid).write_bytes(other.chunk_path(cid).read_bytes())
    with pytest.warns(ChunkMismatchWarning, match="written for another parameter set"):
        pd.testing.assert_frame_equal(run(tmp_path, chunks, Compute()), expected)
    mine.chunk_path(cid).unlink()
    mine.chunk_path(cid).mkdir()
    with pytest.warns(ChunkMismatchWarning, match="it is a directory"):
        pd.testing.assert_frame_equal(run(tmp_path, chunks, Compute()), expected)
    (mine.path / "COMPLETE").unlink()
    (mine.path / "COMPLETE").mkdir()  # an unreadable manifest is no manifest
    assert mine.manifest() is None
