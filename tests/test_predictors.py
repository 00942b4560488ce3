"""Tests of the cheap predictors and of one-shot pruning (chapter "Beyond the paper (2)").

* Attribution patching is the first-order term of the loss change: removing only the fraction
  ``eps`` of an expert's contribution (the engine's ``scale = 1 - eps``) changes the loss by
  ``eps * attribution + O(eps^2)``, so ``delta_loss(eps) / eps`` must converge to the estimate.
* Pruning: pruning nothing through the re-routing hook reproduces the model exactly; pruned
  experts are never selected; ``lowest_ranked`` on a hand example; bad inputs raise ``ValueError``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.attribution import attribution_estimates
from moeaudit.corpus import sample_positions
from moeaudit.engine import clean_pass, run_ablations
from moeaudit.pruning import lowest_ranked, perplexity, pruned_experts
from moeaudit.tooling.testing import random_token_corpus, tiny_random_model

FAMILIES = ("olmoe", "qwen2_moe", "deepseek_v2", "qwen3_moe", "mixtral")


# ------------------------------------------------------------------------------- attribution
@pytest.fixture(scope="module")
def float64_setup():
    """float64 tiny models, so that the only rounding left is the engine's float32 per-token loss."""
    corpus = random_token_corpus(n_seqs=3, length=20)
    cache = {}

    def get(family):
        if family not in cache:
            # the fused grouped-mm expert kernels take no float64; the eager expert loop does
            model = tiny_random_model(family, dtype=torch.float64, _experts_implementation="eager")
            cache[family] = (model, corpus, clean_pass(model, corpus, progress=False))
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2"])
def test_attribution_is_the_small_perturbation_limit(family, float64_setup):
    """Removing the fraction eps of one expert's contribution at one token changes the loss by
    ``eps * attribution + O(eps^2)``: checked for every active expert of every MoE layer at 8
    positions. The engine's losses are float32, so at eps = 1e-3 the residual reaches the rounding
    of the loss (a few ulp); the test states that explicitly instead of hiding it in a tolerance."""
    model, corpus, clean = float64_setup(family)
    layers = list(model.layout.moe_layers)
    pos = sample_positions(corpus, n=8, seed=0)
    att = attribution_estimates(model, corpus, clean, pos, layers=layers, progress=False)
    rows = clean.row(pos.seq_id.to_numpy(), pos.t.to_numpy())
    k = model.layout.top_k
    req = pd.concat([pd.DataFrame({"seq_id": np.repeat(pos.seq_id.to_numpy(), k), "t": np.repeat(pos.t.to_numpy(), k),
                                   "layer": L, "removed": [[int(e)] for e in clean.routing[L]["indices"][rows].reshape(-1)]})
                     for L in layers], ignore_index=True)
    req["expert"] = [r[0] for r in req.removed]
    ref = req.merge(att, on=["seq_id", "t", "layer", "expert"], how="left", validate="one_to_one")
    assert ref.attribution.notna().all()
    a = ref.attribution.to_numpy()
    assert np.linalg.norm(a) > 0
    residual, rel_error = {}, {}
    for eps in (1e-1, 1e-2, 1e-3):
        rec = run_ablations(model, corpus, clean, req[["seq_id", "t", "layer", "removed"]], scale=1.0 - eps,
                            progress=False)
        residual[eps] = rec.delta_loss.to_numpy() - eps * a
        rel_error[eps] = float(np.linalg.norm(residual[eps] / eps) / np.linalg.norm(a))
    ulp = float(np.spacing(np.float32(np.nanmax(clean.tokens.loss))))
    # the relative error of delta_loss / eps shrinks with eps and is below 2% at eps = 1e-3
    assert rel_error[1e-2] < rel_error[1e-1], rel_error
    assert rel_error[1e-3] < 0.02, rel_error
    # below eps = 1e-2 the residual is second order (a tenth of eps, a hundredth of the residual),
    # up to the float32 rounding of the two losses
    assert np.abs(residual[1e-3] - residual[1e-2] / 100).max() <= 4 * ulp
    assert np.abs(residual[1e-3]).max() <= max(4 * ulp, np.abs(residual[1e-2]).max() / 10)
    # and without the rounding floor the relative error shrinks by about the factor of eps
    floor_free = np.clip(np.abs(residual[1e-3]) - 4 * ulp, 0, None)
    assert np.linalg.norm(floor_free / 1e-3) / np.linalg.norm(a) < rel_error[1e-2]


def test_full_scale_is_the_ablation(float64_setup):
    """scale=0 (the default) and an explicit scale of 0.0 are the same ablation."""
    model, corpus, clean = float64_setup("olmoe")
    L = model.layout.moe_layers[0]
    e = int(clean.active(0, 5, L)[0])
    req = pd.DataFrame({"seq_id": [0], "t": [5], "layer": [L], "removed": [[e]]})
    a = run_ablations(model, corpus, clean, req, progress=False)
    b = run_ablations(model, corpus, clean, req, scale=0.0, progress=False)
    assert a.delta_loss.iloc[0] == b.delta_loss.iloc[0]


# ------------------------------------------------------------------------------------ pruning
@pytest.fixture(scope="module")
def float32_models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_random_model(family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def ppl_corpus():
    return random_token_corpus(n_seqs=4, length=24)


def _gate_hooks(model) -> int:
    return sum(len(model.hf.model.layers[L].mlp.gate._forward_hooks) for L in model.layout.moe_layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_nothing_leaves_perplexity_unchanged(family, float32_models, ppl_corpus):
    model = float32_models(family)
    base = perplexity(model, ppl_corpus, progress=False)
    values = np.linspace(0.0, 1.0, model.layout.num_experts)
    plan = {L: lowest_ranked(values, 0.0) for L in model.layout.moe_layers}
    assert all(v == [] for v in plan.values())
    with pruned_experts(model, plan):  # every layer goes through the re-routing hook
        assert _gate_hooks(model) == len(model.layout.moe_layers)
        same = perplexity(model, ppl_corpus, progress=False)
    assert _gate_hooks(model) == 0
    assert same["mean_loss"] == base["mean_loss"]
    assert same["perplexity"] == base["perplexity"]
    assert same["n_tokens"] == base["n_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_experts_are_never_selected(family, float32_models, ppl_corpus):
    model = float32_models(family)
    lay = model.layout
    base_clean = clean_pass(model, ppl_corpus, progress=False)
    # prune each layer's most used experts, so that routing must change
    plan = {}
    for L in lay.moe_layers:
        counts = np.bincount(base_clean.routing[L]["indices"].reshape(-1), minlength=lay.num_experts)
        plan[L] = sorted(np.argsort(-counts, kind="stable")[: lay.num_experts // 2].tolist())
    seen, logits_seen = {}, {}
    with pruned_experts(model, plan):
        # registered after the pruning hook, so it sees the re-routed output
        handles = []
        for L in lay.moe_layers:
            def grab(_m, _i, out, L=L):
                seen.setdefault(L, []).append(out[2].detach().clone())
                logits_seen.setdefault(L, []).append(out[0].detach().clone())
            handles.append(model.hf.model.layers[L].mlp.gate.register_forward_hook(grab))
        try:
            pruned_ppl = perplexity(model, ppl_corpus, progress=False)
        finally:
            for h in handles:
                h.remove()
    base_ppl = perplexity(model, ppl_corpus, progress=False)
    for L, removed in plan.items():
        idx = torch.cat(seen[L])
        assert not np.isin(idx.numpy(), removed).any()
        # the kept experts are the top-k of the router logits among the remaining experts
        logits = torch.cat(logits_seen[L]).float()
        masked = logits.masked_fill(torch.isin(torch.arange(lay.num_experts), torch.tensor(removed)), float("-inf"))
        expect = torch.topk(masked, lay.top_k, dim=-1).indices
        assert torch.equal(idx.sort(dim=-1).values, expect.sort(dim=-1).values)
        assert np.isin(base_clean.routing[L]["indices"], removed).any()  # routing did change
    assert pruned_ppl["mean_loss"] != base_ppl["mean_loss"]
    assert _gate_hooks(model) == 0


def test_lowest_ranked_hand_example():
    values = np.array([0.3, np.nan, 0.1, 0.1, 0.5, 0.2, np.nan, 0.9])
    assert lowest_ranked(values, 0.0) == []
    assert lowest_ranked(values, 0.25) == [1, 6]  # NaN (never selected) goes first
    assert lowest_ranked(values, 0.375) == [1, 2, 6]  # tie at 0.1 broken by index
    assert lowest_ranked(values, 0.5) == [1, 2, 3, 6]
    assert lowest_ranked(values, 0.75) == [0, 1, 2, 3, 5, 6]
    assert lowest_ranked(np.array([3.0, 1.0, 2.0, 0.0]), 0.5) == [1, 3]


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_lowest_ranked_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        lowest_ranked(np.arange(8.0), fraction)


def test_pruning_rejects_bad_inputs(float32_models):
    model = float32_models("olmoe")  # 8 experts, top-2
    E, k = model.layout.num_experts, model.layout.top_k
    L = model.layout.moe_layers[0]
    for bad in ([E], [-1]):
        with pytest.raises(ValueError, match="out of range"):
            with pruned_experts(model, {L: bad}):
                pass
    with pytest.raises(ValueError, match="top-k"):
        with pruned_experts(model, {L: list(range(E - k + 1))}):
            pass
    with pruned_experts(model, {L: list(range(E - k))}):  # exactly top-k left is allowed
        pass
    qwen = float32_models("qwen2_moe")  # the last layer is dense
    with pytest.raises(ValueError, match="not an MoE layer"):
        with pruned_experts(qwen, {qwen.layout.n_layers - 1: [0]}):
            pass
    assert _gate_hooks(model) == 0


def test_failed_pruning_leaves_no_hooks(float32_models):
    """A bad entry for a later layer must not leave the earlier layers hooked."""
    model = float32_models("mixtral")
    layers = list(model.layout.moe_layers)
    with pytest.raises(ValueError):
        with pruned_experts(model, {layers[0]: [0], layers[1]: [model.layout.num_experts]}):
            pass
    assert _gate_hooks(model) == 0


def test_engine_refuses_to_run_inside_pruning(float32_models):
    from moeaudit.engine import clean_pass
    from moeaudit.tooling.testing import random_token_corpus

    model = float32_models("olmoe")
    corpus = random_token_corpus(n_seqs=1, length=8)
    with pruned_experts(model, {model.layout.moe_layers[0]: [0]}):
        with pytest.raises(ValueError, match="pruned_experts"):
            clean_pass(model, corpus, progress=False)
    clean_pass(model, corpus, progress=False)  # fine again once the context has exited


# --- The tail analysis of chapter 10 (moeaudit.chapters.predictors) -------------------------------
import math  # noqa: E402

from moeaudit.chapters import predictors as tail  # noqa: E402


def test_n_tail_is_five_percent_with_at_least_one():
    assert [tail.n_tail(n) for n in (1, 8, 19, 20, 40, 64)] == [1, 1, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="share"):
        tail.n_tail(8, 0.0)
    with pytest.raises(ValueError, match="n_experts"):
        tail.n_tail(0)


def test_tail_match_by_hand():
    md = pd.Series({0: 0.1, 1: 0.9, 2: 0.3, 3: np.nan, 4: 0.2})  # expert 3 unmeasured: n = 4, tail = [1]
    perfect = tail.tail_match(md, pd.Series({0: 1.0, 1: 5.0, 2: 2.0, 3: 9.0, 4: 0.0}))
    assert perfect["n_experts"] == 4 and perfect["tail"] == [1] and perfect["cut"] == [1]
    assert perfect["precision"] == perfect["recall"] == 1.0 and perfect["random_precision"] == 0.25
    assert perfect["rank_top"] == 1 and perfect["p_rank"] == 0.25
    worst = tail.tail_match(md, pd.Series({0: 3.0, 1: 1.0, 2: 2.0, 4: np.nan}))  # expert 1 ranked 2nd of 3 finite
    assert worst["cut"] == [0] and worst["precision"] == 0.0 and worst["rank_top"] == 3 and worst["p_rank"] == 0.75
    tied = tail.tail_match(md, pd.Series({0: 1.0, 1: 1.0, 2: 1.0, 4: 1.0}))  # all tied: counted against it
    assert tied["rank_top"] == 4 and tied["p_rank"] == 1.0
    with pytest.raises(ValueError, match="no finite value"):
        tail.tail_match(pd.Series({0: np.nan}), pd.Series({0: 1.0}))


def test_tail_table_and_pooled_summary_by_hand():
    rec = pd.DataFrame({"model": "m", "layer": [0, 0, 0, 0, 1, 1, 1, 1], "expert": [0, 0, 1, 2, 0, 1, 1, 2],
                        "delta_loss": [0.2, 0.4, 0.1, 0.0, 0.0, 0.5, 0.7, 0.2]})
    # layer 0 means: e0 0.3, e1 0.1, e2 0.0 -> top e0; layer 1: e0 0.0, e1 0.6, e2 0.2 -> top e1
    crit = pd.DataFrame({"model": "m", "layer": [0, 0, 0, 1, 1, 1], "expert": [0, 1, 2, 0, 1, 2],
                         "good": [3.0, 2.0, 1.0, 1.0, 3.0, 2.0], "bad": [1.0, 2.0, 3.0, 3.0, 1.0, 2.0]})
    t = tail.tail_table(rec, crit, criteria_names=["good", "bad"])
    assert t.set_index(["layer", "criterion"]).rank_top.to_dict() == {(0, "good"): 1, (0, "bad"): 3,
                                                                     (1, "good"): 1, (1, "bad"): 3}
    s = tail.pooled_tail_summary(t, alpha=0.2).set_index("criterion")
    assert math.isclose(s.loc["good", "p_pooled"], 1 / 9) and math.isclose(s.loc["bad", "p_pooled"], 1.0)
    assert math.isclose(s.loc["good", "p_min"], 1 / 9) and s.loc["good", "critical_mean_rank"] == 1.0
    assert math.isclose(s.loc["good", "p_holm"], 2 / 9)
    s05 = tail.pooled_tail_summary(t, alpha=0.05)  # the sentence reads a summary made at its own level
    text = tail.tail_sentence(s05, alpha=0.05, labels={"good": "Good"})
    assert "No criterion of the 2" in text and "Good" in text and "no ranking can reach" in text
    text = tail.tail_sentence(tail.pooled_tail_summary(t, alpha=0.25), alpha=0.25)
    assert text.startswith("1 of 2 criteria") and "mean rank of 1.00 or better" in text
    # the tail's observations: layer 0's top e0 rests on 2 records, layer 1's top e1 on 2; medians 1
    assert t.n_obs_top.tolist() == [2, 2, 2, 2] and t.median_obs.tolist() == [1.0] * 4
    # at alpha 0.2 Holm's first step (0.1) cannot reject (P(S <= 2) = 1/9 > 0.1), the last step takes S <= 2
    s20 = tail.pooled_tail_summary(t, alpha=0.2)
    assert np.isnan(s20.critical_mean_rank_strict).all() and (s20.critical_mean_rank == 1.0).all()
    text = tail.tail_sentence(s20, alpha=0.2)
    assert text.startswith("No criterion of the 2") and "cannot reject at its first step (level α/2)" in text
    assert "no step can reject a mean rank above 1.00" in text and "(mean ranks: good 1.00; bad 3.00)" in text
    assert "descriptive and untested: from 0.00 to 1.00 over the criteria, against 0.33 at random" in text
    s50 = tail.pooled_tail_summary(t, alpha=0.5)  # first step 0.25: P(S <= 2) = 1/9, P(S <= 3) = 1/3
    assert (s50.critical_mean_rank_strict == 1.0).all() and (s50.critical_mean_rank == 1.5).all()


def test_tail_selection_sentence_by_hand():
    # layer 0: e0 measured once (0.9), e1 and e2 three times each; the top e0 rests on 1 record, median 3
    rec = pd.DataFrame({"model": "m", "layer": 0, "expert": [0, 1, 1, 1, 2, 2, 2],
                        "delta_loss": [0.9, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0]})
    crit = pd.DataFrame({"model": "m", "layer": 0, "expert": [0, 1, 2], "c": [1.0, 2.0, 3.0]})
    t = tail.tail_table(rec, crit, criteria_names=["c"])
    assert (t.n_obs_top.iloc[0], t.median_obs.iloc[0]) == (1, 3.0)
    text = tail.tail_selection_sentence(t)
    assert "rests on 1.0 held-out observations on average (from 1 to 1), against a median of 3.0" in text
    assert "at 1 of 1 layer" in text and "leans towards experts measured few times" in text
    even = tail.tail_selection_sentence(t.assign(n_obs_top=3))
    assert "at 0 of 1 layer" in even and "leans" not in even
    assert "no tail" in tail.tail_selection_sentence(t.iloc[:0])
    with pytest.raises(ValueError, match="lack the columns"):
        tail.tail_table(rec, crit, criteria_names=["missing"])
