"""Restoration (denoising) in the engine and the analyses of chapter 12 (necessity against sufficiency)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import moeaudit.engine as E
from moeaudit.chapters import restoration as R
from moeaudit.corpus import TokenizedCorpus


def _requests(clean, layer, *, seq=0, ts=(6, 12), span=3, experts="first"):
    rows = []
    for t in ts:
        act = [int(a) for a in clean.active(seq, t, layer)]
        chosen = experts if not isinstance(experts, str) else {"first": [act[0]], "active": act}[experts]
        rows.append((seq, t, t - span + 1, t + 1, layer, list(chosen)))
    return pd.DataFrame(rows, columns=list(E.RESTORATION_COLUMNS))


def _reference(model, corpus, clean, row, *, std, seed):
    """Plain reference: the corrupted run with the MoE output at (layer, t) replaced by
    y' - sum c'_e + sum c_e, the contributions computed from the saved block inputs and routing."""
    s, t, a, b, L, experts = (row.seq_id, row.t, row.span_start, row.span_stop, row.layer, list(row.restored))
    ids = torch.as_tensor(np.asarray(corpus.sequences[s][: t + 1]), dtype=torch.long)[None]
    emb = model.hf.get_input_embeddings()(ids)
    bad = emb.clone()
    bad[0, a:b] += E.corruption_noise(b - a, emb.shape[-1], std=std, seed=seed, key=(s, t, a, b))
    contrib = {}
    for name, x_in in (("clean", emb), ("corrupt", bad)):
        with torch.no_grad(), model.nn.trace(inputs_embeds=x_in):
            x = E.block_input_in_trace(model, L)[0, t].save()
            _lg, w, idx = E.routing_in_trace(model, L)
            w, idx = w[t].save(), idx[t].save()
        c = E.expert_contributions(model, L, x[None], idx[None], w[None])[0]
        contrib[name] = {int(e): c[j] for j, e in enumerate(idx.tolist())}
    delta = sum(contrib["clean"].get(e, 0) - contrib["corrupt"].get(e, 0) for e in experts)
    with torch.no_grad(), model.nn.trace(inputs_embeds=bad):
        out = model.nn_block(L).output
        index = model.layout.spec.block_output_index
        y = out if index is None else out[index]
        y = y.clone()
        y.reshape(-1, y.shape[-1])[t] += delta
        model.nn_block(L).output = y if index is None else (*out[:index], y, *out[index + 1:])
        logits = model.nn.output.logits[0, t].save()
    target = torch.tensor([int(corpus.sequences[s][t + 1])])
    return float(torch.nn.functional.cross_entropy(logits[None].float(), target))


# ------------------------------------------------------------------- the engine's restoration
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2"])
def test_restoration_equals_replacing_the_contribution_by_hand(family, model_cache, corpus, clean_cache, single_thread):
    model, clean = model_cache(family), clean_cache(family)
    L = model.layout.moe_layers[-1]
    req = pd.concat([_requests(clean, L), _requests(clean, L, experts="active")], ignore_index=True)
    rec = E.run_restorations(model, corpus, clean, req, seed=3, progress=False)
    for row in rec.itertuples():
        assert row.clean_loss == pytest.approx(clean.tokens.loss[clean.row(row.seq_id, row.t)], abs=1e-4)
        assert row.restored_loss == pytest.approx(_reference(model, corpus, clean, row, std=row.noise_std, seed=3),
                                                  abs=2e-4)
    assert (rec.corrupt_loss != rec.clean_loss).all()  # the noise does something
    assert (rec.restored_loss != rec.corrupt_loss).all()  # and so does the restoration


def test_restoring_every_expert_makes_the_moe_output_clean_without_shared_experts(model_cache, corpus, clean_cache):
    # An expert the clean run did not route has clean contribution 0; restoring all E experts removes every
    # corrupted contribution and adds every clean one, so at (layer, t) the MoE output of a model without
    # shared experts is the clean one. (The loss is not: the noise still travels in the residual stream.)
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    assert model.layout.n_shared_experts == 0
    L = model.layout.moe_layers[1]
    every = list(range(model.layout.num_experts))
    req = _requests(clean, L, ts=(4, 9, 15), experts=every)
    rec = E.run_restorations(model, corpus, clean, req, seed=0, require_active=False, progress=False)
    assert (rec.block_gap_corrupt > 0.1).all()
    assert (rec.block_gap_restored < 1e-5).all()
    one = E.run_restorations(model, corpus, clean, _requests(clean, L, ts=(4, 9, 15)), seed=0, progress=False)
    assert (one.block_gap_restored > 1e-3).all()  # one expert alone does not


def test_restorations_are_seeded_and_independent_of_batching(model_cache, corpus, clean_cache):
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    L = model.layout.moe_layers[0]
    req = _requests(clean, L, experts="active").explode("restored").assign(restored=lambda d: d.restored.map(
        lambda e: [int(e)])).reset_index(drop=True)
    a = E.run_restorations(model, corpus, clean, req, seed=5, progress=False)
    b = E.run_restorations(model, corpus, clean, req, seed=5, batch_size=1, progress=False)
    c = E.run_restorations(model, corpus, clean, req, seed=6, progress=False)
    np.testing.assert_allclose(a.restored_loss, b.restored_loss, atol=1e-5)
    assert (a.corrupt_loss.to_numpy() != c.corrupt_loss.to_numpy()).all()
    assert a.noise_std.iloc[0] == pytest.approx(3.0 * E.embedding_std(model, corpus))


@pytest.mark.parametrize("scale", [0, 0.0, -3.0, float("nan"), float("inf"), True, "3"])
def test_zero_or_bad_corruption_scale_is_refused(scale, model_cache, corpus, clean_cache):
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    with pytest.raises(ValueError, match="corruption_scale"):
        E.run_restorations(model, corpus, clean, _requests(clean, model.layout.moe_layers[0]), corruption_scale=scale)
    with pytest.raises(ValueError, match="> 0"):
        E.run_restorations(model, corpus, clean, _requests(clean, model.layout.moe_layers[0]), noise_std=0.0)


class _NoForward:
    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the requests were checked")


@pytest.mark.parametrize("span, match", [((-1, 5), "outside text 0"), ((3, 25), "outside text 0"),
                                         ((3, 3), "outside text 0"), ((5, 9), "reaches past t=6")])
def test_span_outside_the_text_is_refused_before_any_model_runs(span, match, model_cache, corpus, clean_cache):
    real, clean = model_cache("olmoe"), clean_cache("olmoe")
    stub = SimpleNamespace(layout=real.layout, hf=SimpleNamespace(), nn=_NoForward(), name="stub")
    L = real.layout.moe_layers[0]
    req = _requests(clean, L, ts=(6,)).assign(span_start=span[0], span_stop=span[1])
    with pytest.raises(ValueError, match=match):
        E.run_restorations(stub, corpus, clean, req)
    ok = _requests(clean, L, ts=(6,))
    with pytest.raises(AssertionError, match="before the requests"):  # a good request reaches the model
        E.run_restorations(SimpleNamespace(layout=real.layout, hf=_NoForward(), nn=_NoForward(), name="stub"),
                           corpus, clean, ok)


def test_other_bad_requests_are_refused(model_cache, corpus, clean_cache):
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    L = model.layout.moe_layers[0]
    inactive = [e for e in range(model.layout.num_experts) if e not in clean.active(0, 6, L)][0]
    with pytest.raises(ValueError, match="not active"):
        E.run_restorations(model, corpus, clean, _requests(clean, L, ts=(6,), experts=[inactive]))
    with pytest.raises(ValueError, match="restored"):
        E.run_restorations(model, corpus, clean, _requests(clean, L, ts=(6,), experts=[]))
    with pytest.raises(ValueError, match="lack columns"):
        E.run_restorations(model, corpus, clean, _requests(clean, L).drop(columns="span_start"))
    with pytest.raises(ValueError, match="batch_size"):
        E.run_restorations(model, corpus, clean, _requests(clean, L), batch_size=0)


def test_embedding_std_by_hand():
    # token embeddings [0, 0], [1, 1], [2, 4]; corpus occurrences 0, 1, 1, 2 -> elements 0 0 1 1 1 1 2 4:
    # mean 10/8 = 1.25; squared deviations 2*1.5625 + 4*0.0625 + 0.5625 + 7.5625 = 11.5; / 7 -> std 1.281740
    emb = torch.nn.Embedding(3, 2)
    emb.weight.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 4.0]])
    stub = SimpleNamespace(hf=SimpleNamespace(get_input_embeddings=lambda: emb), device=torch.device("cpu"))
    corpus = TokenizedCorpus.from_token_ids([np.array([0, 1]), np.array([1, 2])])
    assert E.embedding_std(stub, corpus) == pytest.approx(np.sqrt(11.5 / 7), rel=1e-12)
    assert E.embedding_std(stub, corpus) == pytest.approx(float(torch.tensor([0, 0, 1, 1, 1, 1, 2, 4.0]).std()))


def test_corruption_noise_is_keyed():
    a = E.corruption_noise(3, 4, std=2.0, seed=1, key=(0, 5))
    assert a.shape == (3, 4) and a.dtype == torch.float32
    assert torch.equal(a, E.corruption_noise(3, 4, std=2.0, seed=1, key=(0, 5)))
    assert not torch.equal(a, E.corruption_noise(3, 4, std=2.0, seed=1, key=(0, 6)))
    torch.testing.assert_close(E.corruption_noise(3, 4, std=1.0, seed=1, key=(0, 5)) * 2, a)


# ------------------------------------------------------------------- the chapter's analyses
def test_recovered_fraction_by_hand():
    frac, excluded = R.recovered_fraction([1.0, 2.0, 3.0, 1.0, 1.0], [3.0, 2.01, 2.0, 2.0, 2.0],
                                          [2.0, 2.0, 2.5, 2.5, 1.0], min_gap=0.05)
    # (3-2)/(3-1) = 0.5; gap 0.01 < 0.05 excluded; gap -1 excluded; (2-2.5)/(2-1) = -0.5; (2-1)/(2-1) = 1
    np.testing.assert_allclose(frac, [0.5, np.nan, np.nan, -0.5, 1.0])
    assert excluded.tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match="min_gap"):
        R.recovered_fraction([1.0], [2.0], [1.5], min_gap=0)
    with pytest.raises(ValueError, match="one shape"):
        R.recovered_fraction([1.0], [2.0, 3.0], [1.5])


def test_requests_cover_every_active_expert_and_refuse_a_span_before_the_text(model_cache, clean_cache):
    model, clean = model_cache("olmoe"), clean_cache("olmoe")
    L = model.layout.moe_layers[0]
    pos = pd.DataFrame({"seq_id": [0, 1], "t": [4, 10]})
    req = R.restoration_requests(clean, pos, [L], span_tokens=3)
    k = model.layout.top_k
    assert len(req) == 2 * k
    assert req.span_start.tolist() == [2] * k + [8] * k and req.span_stop.tolist() == [5] * k + [11] * k
    assert sorted(req.expert[:k]) == sorted(clean.active(0, 4, L).tolist())
    with pytest.raises(ValueError, match="outside the text"):
        R.restoration_requests(clean, pos, [L], span_tokens=6)
    with pytest.raises(ValueError, match="span_tokens"):
        R.restoration_requests(clean, pos, [L], span_tokens=0)
    assert R.min_context_for(3) == 2 and R.min_context_for(1, 4) == 4


def _pairs():
    # one model, one layer, 4 positions x 2 experts; recovered follows removal exactly at 3 positions
    rows = []
    for p, (rem, rec) in enumerate([((0.1, 0.2), (0.01, 0.05)), ((0.3, 0.1), (0.2, 0.0)),
                                    ((0.05, 0.4), (0.0, 0.3)), ((0.2, 0.1), (0.0, 0.1))]):
        for j in range(2):
            rows.append({"model": "m", "seq_id": 0, "t": p, "layer": 1, "expert": j, "excluded": False,
                         R.REMOVAL: rem[j], "recovered": rec[j], **{m: float(j) for m in R.METRICS}})
    return pd.DataFrame(rows)


def test_top_expert_agreement_by_hand():
    top = R.top_expert_agreement(_pairs())
    r = top.iloc[0]
    # agreements at positions 0, 1, 2; not at 3 -> 3 of 4, chance 1/2; P(X >= 3 | Bin(4, .5)) = 5/16
    assert (r.n_positions, r.agree, r.chance) == (4, 3, 0.5)
    assert r.p == pytest.approx(5 / 16)
    text = R.top_agreement_text(top, alpha=0.05)
    assert "75%" in text and "50%" in text and "at no layer above chance" in text
    # 4 positions at chance 1/2: even 4 of 4 has p = 1/16 > 0.05, so the null says nothing
    assert "says nothing: even full agreement could not reach" in text


def test_top_agreement_text_states_the_detectable_share_of_a_null():
    # 2 positions at chance 0.1: P(X >= 2) = 0.01 < 0.05 <= P(X >= 1) = 0.19, power q^2 = 0.8 at q = 0.894
    top = pd.DataFrame({"model": "m", "layer": [3], "n_positions": [2], "agree": [0], "share": [0.0],
                        "chance": [0.1], "p": [1.0]})
    text = R.top_agreement_text(top, alpha=0.05, power=0.8)
    assert "speaks only against an agreement of 89% or more" in text and "80% power" in text
    # a layer above chance has no detectable-share clause; Holm over the 2 layers
    both = pd.concat([top, top.assign(layer=5, agree=2, share=1.0, p=0.01)], ignore_index=True)
    text = R.top_agreement_text(both, alpha=0.05)
    assert "above chance at layer 5" in text and "Holm over 2 layers" in text
    # at Holm's strictest level 0.025 two positions still suffice (0.01 < 0.025), so the same share
    assert "89% or more" in text
    above_only = R.top_agreement_text(top.assign(agree=2, share=1.0, p=0.01), alpha=0.05)
    assert "speaks only against" not in above_only and "says nothing" not in above_only


def test_rank_agreement_and_its_sentence():
    pairs = _pairs()
    table = R.rank_agreement(pairs, criteria=[R.REMOVAL, "utilization_rate"], n_boot=200)
    assert list(table.criterion) == [R.REMOVAL, "utilization_rate"]
    rem = table.iloc[0]
    # scipy's rho of the 8 pairs, and Holm over the 2 rows: 2 p_min, then max(2 p_min, p_max), capped at 1
    from scipy.stats import spearmanr
    ref = spearmanr(pairs[R.REMOVAL], pairs.recovered)
    assert rem.rho == pytest.approx(ref.statistic) and rem.n == 8
    p_min, p_max = sorted(table.p)
    expected = {p_min: min(1.0, 2 * p_min), p_max: min(1.0, max(2 * p_min, p_max))}
    np.testing.assert_allclose(table.p_holm, [expected[p] for p in table.p])
    assert rem.min_detectable_rho == pytest.approx(R.stats.min_detectable_spearman(8, alpha=0.025))
    text = R.agreement_text(table, alpha=0.05, power=0.8)
    assert "Holm over 2 tests" in text and f"{rem.rho:+.2f}" in text
    assert table.n_experts.tolist() == [2, 2]  # two distinct experts carry the 8 pairs
    obs = R.observational_text(table, alpha=0.05, power=0.8)
    assert "for 8 pairs, which hold only 2 distinct experts" in obs and "optimistic" in obs


def test_agreement_text_bounds_a_positive_correlation_below_one():
    row = {"model": "m", "criterion": R.REMOVAL, "n": 40, "rho": 0.5, "ci_low": 0.2, "ci_high": 0.7, "p_holm": 0.001,
           "significant": True, "min_detectable_rho": 0.45, "family_size": 2, "reason": ""}
    table = pd.DataFrame([{**row, "layer": 0}, {**row, "layer": 1, "rho": 0.6, "ci_high": 0.8}])
    text = R.agreement_text(table, alpha=0.05, power=0.8)
    assert "positive at 2 layers" in text and "no interval reaches above +0.80" in text
    assert "related at those layers, not the same" in text
    null = table.assign(significant=False, p_holm=0.3)
    text = R.agreement_text(null, alpha=0.05, power=0.8)
    assert "not significant at 2 layers" in text and "no interval reaches" not in text


def test_paired_with_removal_refuses_other_positions():
    restored = pd.DataFrame({"model": ["m"], "seq_id": [0], "t": [3], "layer": [1], "expert": [2], "recovered": [0.1],
                             "excluded": [False]})
    removed = restored[["model", "seq_id", "layer", "expert"]].assign(t=4, delta_loss=0.2, prob=0.3)
    metrics = pd.DataFrame({"layer": [1], "expert": [2], **{m: [1.0] for m in R.METRICS}})
    with pytest.raises(ValueError, match="same positions"):
        R.paired_with_removal(restored, removed, metrics)
    out = R.paired_with_removal(restored, removed.assign(t=3), metrics)
    assert out[R.REMOVAL].tolist() == [0.2] and out.routing_weight.tolist() == [0.3]


def test_corruption_and_routed_sentences():
    rec = pd.DataFrame({"model": "m", "seq_id": [0, 0, 1, 1], "t": [5, 5, 9, 9], "noise_std": 0.3,
                        "clean_loss": [1.0, 1.0, 2.0, 2.0], "corrupt_loss": [3.0, 3.0, 1.99, 1.99],
                        "corruption_gap": [2.0, 2.0, -0.01, -0.01], "excluded": [False, False, True, True],
                        "restored_routed_corrupt": [1, 0, 1, 1], "n_restored": 1,
                        "clean_routing_match": True})
    text = R.corruption_text(rec, min_gap=0.05)
    assert "raised the next-token loss at 1 of 2 positions" in text and "1 position with a gap below 0.05" in text
    assert "mean clean loss 1.500 nats, corrupted 2.495 nats" in text
    routed = R.routed_text(rec)
    assert "in 3 (75%)" in routed and "in the other 1 the clean contribution was added" in routed
