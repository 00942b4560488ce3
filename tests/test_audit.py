"""Audit protocol: shared positions, paired cells traceable to records, cached/resumable records."""

import json

import numpy as np
import pandas as pd
import pytest

from moeaudit.audit import paired_cells, prepare, progressive_records, single_expert_records
from moeaudit.metrics import METRICS, ROUTING_WEIGHT
from moeaudit.store import RecordStore, cached_records
from moeaudit.tooling.testing import random_token_corpus, tiny_random_model


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from moeaudit.tooling.testing import tiny_audit_context

    return tiny_audit_context(tmp_path_factory.mktemp("results"))


def test_single_expert_records_cover_every_active_expert(ctx):
    rec = single_expert_records(ctx, layers=[0, 2], n_positions=12, seed=1, progress=False)
    assert len(rec) == 12 * 2 * 3
    for (s, t, L), g in rec.groupby(["seq_id", "t", "layer"]):
        assert sorted(g.expert) == sorted(ctx.clean.active(s, t, L).tolist())
    assert rec.seed.eq(1).all() and rec["mode"].eq("token").all()


def test_paired_cells_pick_high_and_low_by_hand(ctx):
    rec = single_expert_records(ctx, layers=[1], n_positions=10, seed=2, progress=False)
    cells = paired_cells(rec, ctx.metrics)
    assert set(cells.ranking) == set(METRICS) | {ROUTING_WEIGHT}
    # every ranking uses the same positions
    pos = {r: set(zip(g.seq_id, g.t)) for r, g in cells.groupby("ranking")}
    assert len({frozenset(p) for p in pos.values()}) == 1
    # check one position by hand for the routing-weight control and for activation_norm
    s, t = rec.seq_id.iloc[0], rec.t.iloc[0]
    here = rec[(rec.seq_id == s) & (rec.t == t)]
    c = cells[(cells.seq_id == s) & (cells.t == t)].set_index("ranking")
    hi, lo = here.loc[here.prob.idxmax()], here.loc[here.prob.idxmin()]
    assert c.loc[ROUTING_WEIGHT, "expert_high"] == hi.expert and c.loc[ROUTING_WEIGHT, "expert_low"] == lo.expert
    assert c.loc[ROUTING_WEIGHT, "diff"] == pytest.approx(hi.delta_loss - lo.delta_loss)
    norms = ctx.metrics[ctx.metrics.layer == 1].set_index("expert").activation_norm
    values = {e: norms[e] for e in here.expert}
    assert c.loc["activation_norm", "expert_high"] == max(values, key=values.get)
    assert c.loc["activation_norm", "expert_low"] == min(values, key=values.get)


def test_records_are_cached_and_a_changed_parameter_computes_new_ones(ctx):
    a = single_expert_records(ctx, layers=[0], n_positions=8, seed=3, progress=False)
    runs = list((ctx.results_dir / "single_expert").iterdir())
    b = single_expert_records(ctx, layers=[0], n_positions=8, seed=3, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert list((ctx.results_dir / "single_expert").iterdir()) == runs  # reused, nothing new
    single_expert_records(ctx, layers=[0], n_positions=8, seed=4, progress=False)
    after = list((ctx.results_dir / "single_expert").iterdir())
    assert len(after) == len(runs) + 1
    params = [json.loads((p / "params.json").read_text()) for p in after]
    assert {p["seed"] for p in params} >= {3, 4}


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_and_is_never_read_as_complete(tmp_path):
    calls, fail = [], {"now": True}

    def compute(chunk):
        calls.append(chunk)
        if chunk == "boom" and fail["now"]:
            raise Interrupted
        return pd.DataFrame({"chunk": [chunk]})

    chunks = ["a", "b", "boom", "c"]
    with pytest.raises(Interrupted):
        cached_records("demo", {"x": 1}, chunks, compute, results_dir=tmp_path, progress=False)
    store = RecordStore("demo", {"x": 1}, results_dir=tmp_path)
    assert not store.complete
    with pytest.raises(RuntimeError, match="incomplete"):
        store.load()
    calls.clear()
    fail["now"] = False
    df, store = cached_records("demo", {"x": 1}, chunks, compute, results_dir=tmp_path, progress=False)
    assert calls == ["boom", "c"]  # finished chunks were not recomputed
    assert df.chunk.tolist() == chunks and store.complete


def _count_and_compute(chunk, log, pause):
    import time

    with open(log, "a") as fh:
        fh.write(f"{chunk}\n")
    time.sleep(pause)  # long enough that both processes ask for the records while one computes
    return pd.DataFrame({"chunk": [chunk]})


def _records_in_child(results_dir, log):
    import functools

    cached_records("shared", {"x": 1}, ["a", "b"], functools.partial(_count_and_compute, log=log, pause=0.5),
                   results_dir=results_dir, progress=False)


def test_concurrent_processes_compute_shared_records_once(tmp_path):
    import multiprocessing

    log = tmp_path / "computed.txt"
    procs = [multiprocessing.get_context("fork").Process(target=_records_in_child, args=(tmp_path, log))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(log.read_text().split()) == ["a", "b"]  # each chunk computed by one process only
    df, _ = cached_records("shared", {"x": 1}, ["a", "b"], lambda c: pytest.fail("recomputed"),
                           results_dir=tmp_path, progress=False)
    assert df.chunk.tolist() == ["a", "b"]


def test_progressive_removes_top_weight_experts_cumulatively(ctx):
    rec = progressive_records(ctx, layers=[2], n_positions=6, seed=0, progress=False)
    assert sorted(rec.k.unique()) == [1, 2]
    for (s, t), g in rec.groupby(["seq_id", "t"]):
        r = ctx.clean.row(s, t)
        w = ctx.clean.routing[2]["weight"][r]
        order = ctx.clean.routing[2]["indices"][r][np.argsort(-w, kind="stable")]
        for row in g.itertuples():
            assert list(row.removed) == order[: row.k].tolist()
    with pytest.raises(ValueError, match="max_k"):
        progressive_records(ctx, layers=[2], n_positions=6, seed=0, max_k=3, progress=False)


def test_prepare_from_a_local_model_directory_and_corpus(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of and to in is was for on that with as by at from his her it an".split()
    vocab = {"<pad>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    m = tiny_random_model("qwen2_moe", vocab_size=len(vocab))
    m.hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=20)) for _ in range(6)] + ["short"]
    (tmp_path / "data" / "wikitext-2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext-2" / "test.txt").write_text("\n".join(lines))
    ctx = prepare(str(tmp_path / "model"), n_texts=5, data_dir=tmp_path / "data", results_dir=tmp_path / "res",
                  progress=False)
    assert len(ctx.corpus) == 5 and ctx.corpus.lengths.min() == 20
    assert set(ctx.metrics.layer) == set(m.layout.moe_layers)
    again = prepare(str(tmp_path / "model"), n_texts=5, data_dir=tmp_path / "data", results_dir=tmp_path / "res",
                    progress=False)  # from the cached clean pass
    pd.testing.assert_frame_equal(ctx.clean.tokens, again.clean.tokens)
    np.testing.assert_array_equal(ctx.clean.routing[0]["indices"], again.clean.routing[0]["indices"])
    with pytest.raises(ValueError, match="n_texts"):
        prepare(str(tmp_path / "model"), n_texts=50, data_dir=tmp_path / "data", results_dir=tmp_path / "res")


def test_pruned_perplexities_match_direct_evaluation_and_are_cached(ctx, monkeypatch):
    from moeaudit import audit
    from moeaudit.pruning import perplexity, pruned_experts

    held = random_token_corpus(n_seqs=2, length=20, seed=5)
    plans = [{}, {1: [0, 5]}, {0: [2], 2: [7, 1]}, {1: [5, 0]}]  # the last is the second, reordered
    out = audit.pruned_perplexities(ctx, plans, held, plans_per_chunk=2, progress=False)
    assert list(out.plan) == [0, 1, 2, 3]
    for plan, loss in zip(plans, out.mean_loss):
        with pruned_experts(ctx.model, plan):
            ref = perplexity(ctx.model, held, batch_size=2, progress=False)["mean_loss"]
        assert loss == pytest.approx(ref, abs=1e-6)
    assert out.mean_loss[1] == out.mean_loss[3] and out.mean_loss[1] != out.mean_loss[0]
    np.testing.assert_allclose(out.perplexity, np.exp(out.mean_loss))

    def fail(*a, **k):
        raise AssertionError("a cached plan was re-evaluated")

    monkeypatch.setattr(audit, "perplexity", fail)
    again = audit.pruned_perplexities(ctx, plans, held, plans_per_chunk=2, progress=False)
    pd.testing.assert_frame_equal(out, again)
    with pytest.raises(AssertionError, match="re-evaluated"):  # a new plan is not silently reused
        audit.pruned_perplexities(ctx, [{2: [3]}], held, progress=False)


def test_paired_cells_exclude_failed_premises_and_count_them():
    """A record whose removed expert was not routed (premise_ok False) does not feed d_z by default;
    the cell says how many pairs it lost; keep_failed_premise keeps them."""
    from moeaudit import stats
    from moeaudit.audit import paired_cells
    from moeaudit.metrics import METRICS

    rows = []
    for t in range(6):
        for e, prob in ((0, 0.7), (1, 0.3)):
            rows.append({"model": "m", "family": "olmoe", "mode": "token", "layer": 0, "seq_id": 0, "t": t,
                         "expert": e, "prob": prob, "weight": prob, "delta_loss": 0.1 * (t + 1) * (2 - e),
                         "gap_norm": 1.0, "clean_loss": 3.0, "premise_ok": not (t == 2 and e == 1)})
    records = pd.DataFrame(rows)
    metrics = pd.DataFrame({"layer": [0, 0], "expert": [0, 1], **{m: [2.0, 1.0] for m in METRICS}})
    cells = paired_cells(records, metrics, rankings=["routing_weight"])
    assert len(cells) == 6 and cells.premise_excluded.tolist() == [t == 2 for t in range(6)]
    kept = paired_cells(records, metrics, rankings=["routing_weight"], keep_failed_premise=True)
    assert (~kept.premise_ok).sum() == 1 and not kept.premise_excluded.any()
    kw = dict(by=("model", "ranking", "layer"), high_col="delta_loss_high", low_col="delta_loss_low")
    table = stats.audit_table(cells, **kw)
    assert table.n.iloc[0] == 5 and table.n_premise_excluded.iloc[0] == 1
    assert stats.audit_table(kept, **kw).n.iloc[0] == 6
    # a premise stored as NaN or as the string "False" is not a premise that held
    odd = records.astype({"premise_ok": object})
    odd.loc[0, "premise_ok"], odd.loc[2, "premise_ok"] = float("nan"), "False"
    assert paired_cells(odd, metrics, rankings=["routing_weight"]).premise_excluded.sum() == 3
    # a cell whose every pair fails keeps its row and its place in the family
    records.loc[records.layer == 0, "premise_ok"] = False
    other = records.assign(layer=1, premise_ok=True)
    both = paired_cells(pd.concat([records, other]), pd.concat([metrics, metrics.assign(layer=1)]),
                        rankings=["routing_weight"])
    table = stats.audit_table(both, **kw)
    assert len(table) == 2 and (table.family_size == 2).all()
    lost = table[table.layer == 0].iloc[0]
    assert lost.n == 0 and lost.n_premise_excluded == 6 and lost.reason == "no pairs" and not lost.sig_dual_bonf


def test_paired_cells_refuse_a_top1_model_in_one_line():
    from moeaudit import stats
    from moeaudit.audit import paired_cells
    from moeaudit.metrics import METRICS

    records = pd.DataFrame([{"model": "m", "family": "olmoe", "mode": "token", "layer": 0, "seq_id": 0, "t": t,
                             "expert": t % 2, "prob": 1.0, "weight": 1.0, "delta_loss": 0.1, "gap_norm": 1.0,
                             "clean_loss": 3.0, "premise_ok": True} for t in range(5)])
    metrics = pd.DataFrame({"layer": [0, 0], "expert": [0, 1], **{m: [2.0, 1.0] for m in METRICS}})
    with pytest.raises(ValueError, match="single active expert .*top-1.*paired audit is undefined"):
        paired_cells(records, metrics)
    with pytest.raises(ValueError, match="records is empty"):
        stats.audit_table(pd.DataFrame(columns=["model", "layer", "metric", "delta_high", "delta_low"]))


def test_a_damaged_clean_pass_cache_is_computed_again(tmp_path):
    from moeaudit.audit import CachedCleanPassWarning

    ctx = prepare("tiny-olmoe", corpus="embedded", n_texts=2, results_dir=tmp_path, progress=False)
    (folder,) = (tmp_path / "clean").glob("*/")
    expected = ctx.clean.tokens.copy()
    tokens = pd.read_parquet(folder / "tokens.parquet")
    tokens.assign(loss=9.99).to_parquet(folder / "tokens.parquet", index=False)  # edited values
    with pytest.warns(CachedCleanPassWarning, match="tokens.parquet differs"):
        again = prepare("tiny-olmoe", corpus="embedded", n_texts=2, results_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again.clean.tokens, expected)
    (folder / "routing.npz").write_bytes(b"truncated")
    with pytest.warns(CachedCleanPassWarning, match="routing.npz differs"):
        prepare("tiny-olmoe", corpus="embedded", n_texts=2, results_dir=tmp_path, progress=False)
