"""The intervention-definitions chapter's comparison of operators (remove, mask, mean), checked on
hand-made inputs and, for the re-run of the records, on a tiny random OLMoE."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit import engine, stats
from moeaudit.chapters import definitions as D


def _positions_records():
    # 4 positions, two records (experts) each
    return pd.DataFrame({"seq_id": [0, 0, 0, 0, 1, 1, 2, 2], "t": [3, 3, 5, 5, 1, 1, 2, 2],
                         "expert": [1, 2, 1, 2, 0, 3, 1, 2], "delta_loss": np.arange(8.0)})


def test_operator_subset_keeps_every_record_of_the_drawn_positions():
    rec = _positions_records()
    sub = D.operator_subset(rec, n_positions=3, seed=0)
    # the draw of numpy's generator: 3 of the 4 sorted positions (0,3), (0,5), (1,1), (2,2)
    pick = np.sort(np.random.default_rng(0).choice(4, size=3, replace=False))
    want = [[(0, 3), (0, 5), (1, 1), (2, 2)][i] for i in pick]
    got = list(dict.fromkeys(zip(sub.seq_id, sub.t)))
    assert got == want and len(sub) == 6  # both records of each drawn position, in the input order
    assert D.operator_subset(rec, n_positions=4, seed=5).equals(rec)  # all positions: everything, same order


@pytest.mark.parametrize("n", [2, 5, 3.5, True])
def test_operator_subset_refuses_a_bad_count(n):
    with pytest.raises(ValueError, match="n_positions=.* must be a whole number from 3 to 4"):
        D.operator_subset(_positions_records(), n_positions=n, seed=0)


def test_next_ranked_expert_by_hand():
    logits = np.array([[4.0, 3.0, 1.0, 0.0],
                       [0.0, 1.0, 2.0, 5.0],
                       [1.0, 1.0, 0.5, 1.0]])
    selected = np.array([[0, 1], [3, 2], [0, 3]])
    # row 0: experts 2, 3 left (logits 1, 0) -> 2; row 1: 0, 1 left (0, 1) -> 1; row 2: 1, 2 left (1, 0.5) -> 1
    np.testing.assert_array_equal(D.next_ranked_expert(logits, selected), [2, 1, 1])
    # a tie among the unselected goes to the lowest id
    assert D.next_ranked_expert(np.array([[5.0, 2.0, 2.0]]), np.array([[0]]))[0] == 1
    with pytest.raises(ValueError, match="disagree"):
        D.next_ranked_expert(logits, np.zeros((3, 4), dtype=int))  # k = E: nothing left to pick


def _padded():
    # two texts padded to width 3: text 0 has 3 real tokens, text 1 has 2 (its last row is padding); E = 3, k = 1
    logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0],
                       [2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [9.0, 9.0, 9.0]])
    idx = logits.argmax(1)[:, None]
    return D.PaddedPass(layers={4: {"logits": logits, "idx": idx}}, real=np.array([1, 1, 1, 1, 1, 0], dtype=bool),
                        seq_ids=np.repeat([0, 1], 3), num_experts=3, top_k=1)


def test_next_ranked_table_reads_the_rows_of_each_text():
    tab = D.next_ranked_table(_padded(), pd.DataFrame({"seq_id": [0, 1, 1], "t": [2, 0, 1]}))
    assert tab.layer.tolist() == [4, 4, 4]
    assert tab.selected.tolist() == [[1], [0], [1]]  # rows 2, 3, 4
    assert tab.next_expert.tolist() == [2, 2, 2]     # logits (1,3,2) -> 2; (2,0,1) -> 2; (0,2,1) -> 2


@pytest.mark.parametrize(("seq", "t"), [(1, 2), (2, 0), (0, 3)])
def test_next_ranked_table_refuses_padding_and_unknown_texts(seq, t):
    with pytest.raises(ValueError, match="not a real token"):
        D.next_ranked_table(_padded(), pd.DataFrame({"seq_id": [seq], "t": [t]}))


def _mask_records():
    return pd.DataFrame({"model": "m", "operator": "mask", "layer": 4, "seq_id": [0, 0, 1, 1], "t": [2, 2, 0, 0],
                         "expert": [1, 0, 0, 2], "replacement": [[2], [2], [1], [1, 2]], "leak": 0.0,
                         "masked_selected": [0, 0, 0, 1]})


def test_replacement_summary_and_text_by_hand():
    nxt = pd.DataFrame({"model": "m", "layer": 4, "seq_id": [0, 1], "t": [2, 0], "next_expert": [2, 1]})
    s = D.replacement_summary(_mask_records(), nxt).iloc[0]
    assert s.records == 4 and s.max_leak == 0 and s.masked_selected == 1
    assert s.one_replacement == pytest.approx(0.75) and s.next_ranked == pytest.approx(0.75)  # [1, 2] is not [1]
    text = D.replacement_text(D.replacement_summary(_mask_records(), nxt))
    assert "the leak is exactly 0 in all 4 mask records" in text
    assert "still selected a masked expert (with weight 0) in 1 record." in text
    assert "in 75.0% of the records (m 75.0%)" in text
    with pytest.raises(ValueError, match="no next-ranked expert"):
        D.replacement_summary(_mask_records(), nxt.iloc[:1])


def test_check_mask_leak_refuses_a_weight_left_on_a_masked_expert():
    D.check_mask_leak(_mask_records())
    D.check_mask_leak(pd.DataFrame({"operator": ["remove"], "delta_loss": [0.1]}))  # no mask record: nothing to check
    bad = _mask_records().assign(leak=[0.0, 0.25, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"1 of 4 mask records .* \(largest 0.25\)"):
        D.check_mask_leak(bad)


def _comparison(ddz, lo, hi, flip_dual, flip_p05):
    n = len(ddz)
    return pd.DataFrame({"model": "m", "ddz": ddz, "ddz_lo": lo, "ddz_hi": hi,
                         "ci_excludes_0": [x > 0 or y < 0 for x, y in zip(lo, hi)],
                         "flip_dual": flip_dual, "flip_p05": flip_p05, "n": [40] * n,
                         "dual_a": [True, True, False][:n], "dual_b": [True, False, False][:n]})


def test_operator_comparison_text_by_hand():
    cmp = _comparison([0.1, -0.3, 0.02], [-0.1, -0.5, -0.04], [0.3, -0.1, 0.08], [False, True, False], [True, True, False])
    text = D.operator_comparison_text(cmp, label_a="remove", label_b="mask", n=40, family=20, alpha=0.05)
    mde = stats.min_detectable_dz(40, alpha=0.05 / 20, power=0.8)
    assert "is at most 0.300 (median 0.100) over 3 cells" in text
    assert "the 95% intervals reach ±0.200 and" in text
    assert "1 of them excludes zero. 2 cells pass the dual rule under remove and 1 under mask; 1 verdict changes" in text
    assert "and 2 under uncorrected p_t below 0.05" in text
    assert f"at least n = 40 positions per cell, the paired t-test alone detects |d_z| ≥ {mde:.2f} with power 0.8" in text
    assert "the dual rule, which also needs the Wilcoxon test, detects less" in text
    none = D.operator_comparison_text(cmp.assign(flip_dual=False), label_a="a", label_b="b", n=40, family=20, alpha=0.05)
    assert "no verdict changes under the dual rule" in none
    with pytest.raises(ValueError, match="no cell"):
        D.operator_comparison_text(cmp.iloc[:0], label_a="a", label_b="b", n=40, family=20, alpha=0.05)


def _op_records(delta):
    return pd.DataFrame({"model": "m", "seq_id": 0, "t": [1, 1, 2], "layer": 3, "expert": [0, 1, 0], "delta_loss": delta})


def test_mean_smaller_share_and_exercise_check():
    rec = {"remove": _op_records([0.4, -0.2, 0.1]), "mean": _op_records([0.1, -0.3, -0.1])}
    # |0.1| < |0.4| yes; |-0.3| < |-0.2| no; |-0.1| < |0.1| no (not strictly)
    assert D.mean_smaller_share(rec["remove"], rec["mean"], model="m") == pytest.approx(1 / 3)
    assert D.check_09_intervention_definitions_4(0.333, rec, model="m").correct
    assert not D.check_09_intervention_definitions_4(0.5, rec, model="m").correct
    with pytest.raises(ValueError, match="lack the operator"):
        D.check_09_intervention_definitions_4(0.3, {"remove": rec["remove"]}, model="m")
    with pytest.raises(ValueError, match="no ablation of model 'x'"):
        D.mean_smaller_share(rec["remove"], rec["mean"], model="x")


def test_operator_records_rerun_remove_exactly_and_mask_without_leak(model_cache, corpus, clean_cache, single_thread):
    """On a tiny OLMoE: 'remove' re-runs the engine's records to the same numbers; 'mask' leaves no weight on
    the masked expert and puts the next-ranked expert of the clean router in its place."""
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    L = int(model.layout.moe_layers[0])
    rows = clean.tokens[(clean.tokens.target_id >= 0)].head(3)
    idx = clean.routing[L]["indices"][rows.index.to_numpy()]
    recs = pd.DataFrame({"seq_id": np.repeat(rows.seq_id.to_numpy(), 2), "t": np.repeat(rows.t.to_numpy(), 2),
                         "layer": L, "removed": [[int(e)] for e in idx[:, :2].reshape(-1)]})
    recs["expert"] = [r[0] for r in recs.removed]
    ref = engine.run_ablations(model, corpus, clean, recs, progress=False)
    again = D.operator_records(model, corpus, clean, recs, operator="remove")
    np.testing.assert_allclose(again.delta_loss, ref.delta_loss, atol=1e-6)
    assert again.prob.tolist() == [p[0] for p in ref.removed_probs] and (again.operator == "remove").all()
    mask = D.operator_records(model, corpus, clean, recs, operator="mask").assign(model="tiny")
    D.check_mask_leak(mask)
    padded = D.padded_router_pass(model, corpus, layers=[L], texts_per_batch=2)
    nxt = D.next_ranked_table(padded, recs[["seq_id", "t"]].drop_duplicates()).assign(model="tiny")
    assert D.replacement_summary(mask, nxt).next_ranked.iloc[0] == 1.0  # a softmax router: always the next-ranked
    with pytest.raises(ValueError, match="valid operators are"):
        D.operator_records(model, corpus, clean, recs, operator="drop")
