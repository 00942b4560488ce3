"""One-shot expert pruning and perplexity, for checking what the token-level audit says about
the deployed pipeline (rank experts by a criterion, remove the lowest-ranked everywhere).

A pruned expert is removed from its router: its logit is set to -inf before the softmax, so the
router distributes probability over the remaining experts and picks the top-k among them, exactly
as a model without that expert would. The top-k re-computation follows each family's router
(softmax in float32, optional renormalisation, DeepSeek-V2's routed scaling factor), as the
registry states it (:attr:`moeaudit.families.FamilySpec.reroute`); families whose router is not
re-implemented here (sigmoid and group-limited routers, top-k-then-softmax routers, sparsemixer,
Llama 4's dense scores) are refused with a ``ValueError`` naming the family.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch

from .corpus import TokenizedCorpus
from .engine import _token_loss, check_corpus_context, progress_bar
from .families import FAMILIES
from .models import AuditModel
from .stats import min_detectable_dz, min_equivalence_bound
from .report import join_words, plural


def _reroute(layout, logits: torch.Tensor, pruned: torch.Tensor, like: torch.Tensor):
    """Re-run the router's top-k selection from ``logits`` with ``pruned`` experts removed."""
    masked = logits.float().masked_fill(pruned, float("-inf"))
    probs = torch.softmax(masked, dim=-1, dtype=torch.float32)
    if layout.spec.reroute == "softmax_topk_scaled":
        weights, idx = torch.topk(probs, layout.top_k, dim=-1, sorted=False)
        weights = weights * layout.routed_scaling_factor
    else:
        weights, idx = torch.topk(probs, layout.top_k, dim=-1)
        if layout.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(like.dtype), idx


@contextlib.contextmanager
def pruned_experts(model: AuditModel, pruned: dict[int, list[int]]):
    """Within the block, the experts ``pruned[layer]`` are removed from their routers.

    A layer listed with an empty list is re-routed through the same code path with nothing removed
    (so tests can check that the re-implementation reproduces the model's own router exactly).
    """
    layout = model.layout
    if layout.spec.reroute is None:
        supported = sorted(f for f, spec in FAMILIES.items() if spec.reroute is not None)
        raise ValueError(f"pruning re-implements the router of {', '.join(supported)} only; the {layout.family} router "
                         f"({layout.spec.selection}) is not re-implemented")
    masks = {}  # validate every entry before touching the model, so a bad entry leaves no hooks behind
    for layer, experts in pruned.items():
        layout.check_layer(layer)
        experts = sorted(set(int(e) for e in experts))
        bad = [e for e in experts if not 0 <= e < layout.num_experts]
        if bad:
            raise ValueError(f"experts {bad} out of range [0, {layout.num_experts - 1}] at layer {layer}")
        if layout.num_experts - len(experts) < layout.top_k:
            raise ValueError(f"pruning {len(experts)} of {layout.num_experts} experts at layer {layer} leaves fewer "
                             f"than top-k = {layout.top_k}")
        gate = model.hf_router(layer)
        if layout.family == "deepseek_v2" and getattr(gate, "topk_method", "greedy") != "greedy":
            raise ValueError("pruning supports DeepSeek-V2's greedy top-k router only")
        mask = torch.zeros(layout.num_experts, dtype=torch.bool)  # moved to the router logits' device in the hook
        mask[experts] = True
        masks[layer] = mask

    def make_hook(mask):
        def hook(_module, _inputs, output):
            logits, weights, _ = output
            new_w, new_idx = _reroute(layout, logits, mask.to(logits.device).expand_as(logits), weights)
            return logits, new_w, new_idx
        return hook

    handles = [model.hf_router(L).register_forward_hook(make_hook(m)) for L, m in masks.items()]
    model.hf._moeaudit_pruned = True  # the engine refuses to run on a re-routed model (see engine)
    try:
        yield model
    finally:
        model.hf._moeaudit_pruned = False
        for h in handles:
            h.remove()


@torch.no_grad()
def perplexity(model: AuditModel, corpus: TokenizedCorpus, *, batch_size: int = 8,
               progress: bool | None = None) -> dict:
    """Perplexity ``exp(mean_t -log p(x_{t+1} | x_{<=t}))`` over every next-token prediction of
    ``corpus`` (float32 losses), with the token count and mean loss. ``ValueError`` for a text longer
    than the model's context, or for a model that runs on a server (it calls the weights here)."""
    model.require_local_weights("perplexity (pruned perplexities call the model's weights with router hooks)")
    check_corpus_context(model, corpus)
    total, count = 0.0, 0
    order = list(range(len(corpus)))
    for b in progress_bar(range(0, len(order), batch_size), desc="perplexity", progress=progress):
        seq_ids = order[b:b + batch_size]
        ids, mask = corpus.padded(seq_ids, pad_id=model.pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model.hf(input_ids=ids, attention_mask=mask).logits
        valid = mask[:, 1:].bool()
        losses = _token_loss(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        total += float(losses[valid.reshape(-1)].double().sum())
        count += int(valid.sum())
    mean = total / count
    return {"perplexity": float(np.exp(mean)), "mean_loss": mean, "n_tokens": count}


def lowest_ranked(values: np.ndarray, fraction: float) -> list[int]:
    """Indices of the ``round(fraction * len(values))`` lowest values (NaN counts as lowest: an
    expert that is never selected is the first to go); ties broken by index."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    n = int(round(fraction * len(values)))
    key = np.where(np.isnan(values), -np.inf, values)
    return sorted(np.lexsort((np.arange(len(values)), key))[:n].tolist())


# --- Pruning plans and the random baseline -------------------------------------------------------

def n_pruned(num_experts: int, fraction: float) -> int:
    """Experts removed per layer when pruning ``fraction`` of ``num_experts``: ``round(fraction * n)``
    (as :func:`lowest_ranked`). ``ValueError`` unless 0 <= fraction < 1."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    return int(round(fraction * num_experts))


def criterion_plan(criteria, criterion: str, fraction: float, layers) -> dict[int, list[int]]:
    """Pruning plan ``{layer: experts}`` removing the lowest-ranked ``fraction`` of each layer's
    experts by the column ``criterion`` of ``criteria`` (one row per (layer, expert), for example
    :func:`moeaudit.metrics.pruning_criteria`); NaN ranks lowest, ties go to the lower id
    (:func:`lowest_ranked`). ``KeyError`` for an unknown criterion or a layer without rows."""
    plan = {}
    for L in layers:
        rows = criteria[criteria.layer == L].sort_values("expert")
        if rows.empty:
            raise KeyError(f"no criterion rows for layer {L}")
        plan[int(L)] = lowest_ranked(rows[criterion].to_numpy(dtype=float), fraction)
    return plan


def random_plan(num_experts: int, fraction: float, layers, *, seed: int, draw: int) -> dict[int, list[int]]:
    """Uniformly random pruning plan: at each layer ``n_pruned(num_experts, fraction)`` experts drawn
    without replacement from ``numpy.random.default_rng([seed, draw, round(1e6 * fraction), layer])``.
    A layer's choice depends only on (seed, draw, fraction, layer), so draw d prunes the same
    experts of layer L whether L is pruned alone or with the other layers."""
    n = n_pruned(num_experts, fraction)
    return {int(L): sorted(np.random.default_rng([seed, draw, int(round(fraction * 1e6)), int(L)])
                           .choice(num_experts, size=n, replace=False).tolist()) for L in layers}


def pruning_plans(criteria, *, criteria_names, fractions, n_random: int, moe_layers, num_experts: int, seed: int,
                  per_layer_fraction: float | None = None, n_random_per_layer: int | None = None):
    """The plans of the pruning experiment and one metadata row per plan.

    Plan 0 is the unpruned model (``{}``). Then, for every fraction, one plan per criterion and
    ``n_random`` random plans pruning every layer of ``moe_layers`` at once (``scope = "all"``);
    and, when ``per_layer_fraction`` is given, the same at that fraction for one layer at a time
    (``scope`` = the layer), with ``n_random_per_layer`` random plans (default ``n_random``). Returns ``(plans, meta)``: ``meta`` is a DataFrame aligned with
    ``plans[1:]`` with ``scope``, ``fraction``, ``criterion`` (``"random"`` for the draws) and ``draw``.
    """
    n_single = n_random if n_random_per_layer is None else n_random_per_layer
    if min(n_random, n_single) < 1:
        raise ValueError(f"n_random={n_random} and n_random_per_layer={n_random_per_layer} must be >= 1")
    plans, meta = [{}], []
    settings = [("all", f, list(moe_layers), n_random) for f in fractions]
    if per_layer_fraction is not None:
        settings += [(int(L), per_layer_fraction, [L], n_single) for L in moe_layers]
    for scope, f, layers, n_draws in settings:
        for c in criteria_names:
            plans.append(criterion_plan(criteria, c, f, layers))
            meta.append({"scope": scope, "fraction": f, "criterion": c, "draw": 0})
        for d in range(n_draws):
            plans.append(random_plan(num_experts, f, layers, seed=seed, draw=d))
            meta.append({"scope": scope, "fraction": f, "criterion": "random", "draw": d})
    return plans, pd.DataFrame(meta)


def random_rank_pvalue(value: float, random_values, *, lower_is_better: bool = True) -> float:
    """Monte-Carlo rank p-value of a criterion's result among ``n`` random draws.

    ``p = (1 + #{draws at least as good as value}) / (1 + n)``, "at least as good" meaning
    ``<= value`` when lower is better (perplexity, loss) and ``>= value`` otherwise. Under the null
    that the criterion's plan is exchangeable with a uniformly random plan, the criterion's rank
    among the n + 1 results is uniform, so ``P(p <= a) <= a``; the smallest attainable p is
    ``1 / (n + 1)``. Source: Davison & Hinkley (1997), *Bootstrap Methods and their Application*,
    Section 4.2 (Monte Carlo tests); Phipson & Smyth (2010), "Permutation p-values should never be
    zero". ``ValueError`` for no draws or a NaN value or draw.
    """
    r = np.asarray(random_values, dtype=np.float64).ravel()
    v = float(value)
    if r.size == 0:
        raise ValueError("need at least one random draw")
    if np.isnan(v) or np.isnan(r).any():
        raise ValueError("value and random draws must not be NaN")
    as_good = int((r <= v).sum()) if lower_is_better else int((r >= v).sum())
    return (1 + as_good) / (1 + r.size)


def compare_with_random(results, *, keys=("model", "scope", "fraction"), value: str = "perplexity"):
    """Each criterion's pruning result against the random draws of the same setting.

    ``results`` has one row per plan with the columns ``keys``, ``criterion`` (``"random"`` for a
    draw) and ``value`` (lower is better). One row per criterion and setting with the value, the
    random draws' ``n_draws``, ``random_mean``, ``random_sd`` (ddof = 1), ``random_min``,
    ``random_median``, ``random_max``, ``z = (value - random_mean) / random_sd``, the rank p-value
    ``p_rank`` (:func:`random_rank_pvalue`), and the flags ``beats_mean`` (value below the random
    mean), ``beats_all`` (below every draw) and ``loses_to_all`` (above every draw).
    ``ValueError`` if a setting has a criterion but no random draw.
    """
    keys = list(keys)
    rnd = results[results.criterion == "random"]
    crit = results[results.criterion != "random"]
    draws = {k: g[value].to_numpy(dtype=np.float64) for k, g in rnd.groupby(keys, sort=False)}
    rows = []
    for r in crit.itertuples(index=False):
        k = tuple(getattr(r, c) for c in keys)
        d = draws.get(k)
        if d is None:
            raise ValueError(f"no random draw for setting {dict(zip(keys, k))}")
        v = float(getattr(r, value))
        sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
        rows.append({**dict(zip(keys, k)), "criterion": r.criterion, value: v, "n_draws": int(d.size),
                     "random_mean": float(d.mean()), "random_sd": sd, "random_min": float(d.min()),
                     "random_median": float(np.median(d)), "random_max": float(d.max()),
                     "z": (v - float(d.mean())) / sd if sd > 0 else float("nan"),
                     "p_rank": random_rank_pvalue(v, d), "beats_mean": v < float(d.mean()),
                     "beats_all": v < float(d.min()), "loses_to_all": v > float(d.max())})
    return pd.DataFrame(rows)


def rank_tests_by_criterion(vs_random, *, alpha: float = 0.05, token_cells=None):
    """Per (model, criterion): how the criterion's rank p-values among the random draws fall over the fractions.

    ``vs_random``: :func:`compare_with_random` rows of one scope (columns ``model``, ``criterion``, ``fraction``,
    ``p_rank``, ``beats_mean``). ``token_cells`` (optional): a Series indexed by (model, criterion) with the
    number of token-level audit cells that pass, copied into a column of that name. Columns: ``model``,
    ``criterion``, ``fractions``, ``p ≤ alpha at every fraction``, ``p ≤ alpha at some fraction`` (bool),
    ``fractions with p ≤ alpha`` (count), ``largest p``, ``below random mean at every fraction`` (bool).
    """
    g = vs_random.assign(_ok=vs_random.p_rank <= alpha)
    out = g.groupby(["model", "criterion"], sort=False).agg(
        fractions=("fraction", "size"), every=("_ok", "all"), some=("_ok", "any"), n_ok=("_ok", "sum"),
        p_max=("p_rank", "max"), mean_all=("beats_mean", "all")).reset_index()
    out = out.rename(columns={"every": "p ≤ alpha at every fraction", "some": "p ≤ alpha at some fraction",
                              "n_ok": "fractions with p ≤ alpha", "p_max": "largest p",
                              "mean_all": "below random mean at every fraction"})
    if token_cells is not None:
        out["token_cells"] = token_cells.reindex(pd.MultiIndex.from_frame(out[["model", "criterion"]])).to_numpy()
    return out


def rank_test_model_phrase(by_criterion, model: str, *, alpha: float) -> str:
    """One model's picture from :func:`rank_tests_by_criterion`, as a phrase such as
    ``"tiny-olmoe: no criterion has rank p ≤ 0.05 at every fraction (2 of 6 reach it at some fraction)"``."""
    m = by_criterion[by_criterion.model == model]
    n, k_all = len(m), int(m["p ≤ alpha at every fraction"].sum())
    k_some = int(m["p ≤ alpha at some fraction"].sum())
    crit = "criterion" if n == 1 else "criteria"
    if k_all == n:
        head = f"every one of the {n} {crit} has rank p ≤ {alpha:g} at every fraction" if n > 1 else \
            f"the one criterion has rank p ≤ {alpha:g} at every fraction"
    elif k_all:
        head = f"{k_all} of the {n} {crit} {'has' if k_all == 1 else 'have'} rank p ≤ {alpha:g} at every fraction"
    elif k_some:
        head = f"no criterion has rank p ≤ {alpha:g} at every fraction"
    else:
        head = f"no criterion has rank p ≤ {alpha:g} at any fraction"
    if k_some > k_all:
        head += f" ({k_some} of the {n} {'reaches' if k_some == 1 else 'reach'} it at some fraction)"
    return f"{model}: {head}"


def best_time(fn, *, repeats: int = 3) -> float:
    """The smallest wall-clock time (seconds, ``time.perf_counter``) of ``repeats`` calls of ``fn()``: the usual
    estimate of a short computation's cost, least disturbed by other load. ``ValueError`` if ``repeats < 1``."""
    import time
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def corrected_rank_claims(by_criterion, *, alpha: float, n_draws: int):
    """Per model: can the rank test show that a criterion failing the token-level audit prunes
    better than random, once corrected for the number of such criteria tested?

    ``by_criterion``: :func:`rank_tests_by_criterion` with ``token_cells`` (the number of the
    criterion's token-level audit cells that pass) and the renamed column ``p_max`` (its largest
    rank p over the fractions). A criterion beats random at every fraction when ``p_max`` is at
    most the level (an intersection–union test: every fraction must reject, so no correction over
    fractions is needed); the claim "some failing criterion prunes better than chance" is a union
    over the model's ``m`` failing criteria, so its level is Bonferroni's ``alpha / m``. The rank
    p-value cannot go below ``p_min = 1 / (n_draws + 1)``, so the corrected test can only reject
    when ``p_min <= alpha / m``, i.e. with at least ``ceil(m / alpha) - 1`` draws.

    One row per model (in order of appearance) with ``m``, ``level`` (``alpha / m``; NaN when
    ``m = 0``), ``p_min``, ``attainable`` (``p_min <= level``), ``draws_needed``, ``corrected``
    (failing criteria with ``p_max <= level``, a list), ``uncorrected`` (those with
    ``p_max <= alpha``) and ``uncorrected_p`` (their ``p_max``). ``ValueError`` for ``n_draws < 1`` or ``alpha`` outside (0, 1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    p_min = 1.0 / (n_draws + 1)
    rows = []
    for model, g in by_criterion.groupby("model", sort=False):
        failed = g[g.token_cells == 0]
        m = len(failed)
        level = alpha / m if m else float("nan")
        rows.append({"model": model, "m": m, "level": level, "p_min": p_min,
                     "attainable": bool(m and p_min <= level + 1e-12),
                     "draws_needed": int(np.ceil(m / alpha - 1e-9)) - 1 if m else 0,
                     "corrected": list(failed.criterion[failed.p_max <= level + 1e-12]) if m else [],
                     "uncorrected": list(failed.criterion[failed.p_max <= alpha]) if m else [],
                     "uncorrected_p": list(failed.p_max[failed.p_max <= alpha]) if m else []})
    return pd.DataFrame(rows)


def validity_claim_texts(claims, *, alpha: float, n_draws: int, labels=None, beat_all=None) -> dict:
    """The verdicts of chapter 10 on "token-level validity is not necessary for pruning better than
    chance", from :func:`corrected_rank_claims`, as ``{"paper_claim_verdict": ..., "shows_verdict": ...}``
    (sentences without a final period, to be followed by one).

    A model counts against the paper's claim only where a failing criterion beats the random draws
    at every fraction at the *corrected* level. An uncorrected pass is named and set aside; where
    the corrected level lies below the smallest attainable rank p, the text says that this design
    could not show the claim wrong at all, and how many draws would be needed. A test that does not
    reject is never read as showing the criteria no better than random. ``labels``: criterion ->
    display name. ``beat_all``: optional ``(k, n)``, the number of (model, criterion, fraction)
    settings that beat every random draw and the number of settings; the count is set beside the
    ``n / (n_draws + 1)`` that chance gives, and said not to be a valid test (settings share their
    draws, and criteria that agree share their plans).
    """
    name = (lambda c: labels.get(c, c)) if labels else (lambda c: c)  # noqa: E731
    c = claims[claims.m > 0]
    if c.empty:
        msg = ("Every per-expert criterion passes the token-level audit in some cell, so the rank test has nothing to say "
               "about the claim")
        return {"paper_claim_verdict": msg, "shows_verdict": msg}
    ms = sorted(set(c.m))
    m_txt = f"{ms[0]}" if len(ms) == 1 else f"{ms[0]}–{ms[-1]}"
    levels = sorted(set(round(v, 6) for v in c.level))
    lvl_txt = f"{levels[0]:.3g}" if len(levels) == 1 else f"{levels[0]:.3g}–{levels[-1]:.3g}"
    p_min = float(c.p_min.iloc[0])
    head = (f"Corrected for the {m_txt} criteria per model not shown valid at the token level (Bonferroni, α/m = "
            f"{lvl_txt}; each criterion must reach it at every fraction)")
    against = c[c.corrected.map(len) > 0]
    unc = c[c.uncorrected.map(len) > 0]
    unc_items = [(r.model, x, q) for r in unc.itertuples() for x, q in zip(r.uncorrected, r.uncorrected_p)]
    unc_txt = "; ".join(f"{name(x)} on {m} (largest p {q:.3f}" + (", the smallest attainable)" if abs(q - p_min) < 1e-9
                                                                  else ")") for m, x, q in unc_items)
    unattainable = c[~c.attainable]
    attain_txt = ""
    if len(unattainable):
        need = int(unattainable.draws_needed.max())
        attain_txt = (f"with {n_draws} random draws the rank p-value cannot go below 1/{n_draws + 1} = {p_min:.3f}, above "
                      f"the corrected level{'s' if len(levels) > 1 else ''}, so this design cannot show any criterion "
                      f"better than random after correction{' on ' + ', '.join(unattainable.model) if len(unattainable) < len(c) else ''} "
                      f"(that needs at least {need} draws)")
    if len(against):
        models = ", ".join(against.model)
        verdict = (f"{head}, the claim is contradicted on {models}: "
                   + "; ".join(f"{', '.join(name(x) for x in r.corrected)} ({r.model}) beat{'s' if len(r.corrected) == 1 else ''} "
                               "the random draws at every fraction" for r in against.itertuples())
                   + ". On the other models no failing criterion is shown better than the random draws")
        shows = (f"So on {models} token-level validity, the paper's Definition 2.1, is not necessary for a criterion to "
                 f"prune better than chance (corrected for the criteria tested; \"not valid\" here means not shown valid "
                 "at the token level); on the other models the rank test does "
                 "not show it")
        return {"paper_claim_verdict": verdict, "shows_verdict": shows}
    verdict = (f"{head}, no criterion that is not shown valid at the token level is shown to prune better than the "
               "random draws")
    if attain_txt:
        verdict += f": {attain_txt}"
    if len(unc):
        verdict += (f". Uncorrected, {unc_txt} {'has' if len(unc_items) == 1 else 'have'} rank p ≤ {alpha:g} at every "
                    f"fraction: weak evidence against the claim, which does not survive the correction")
    verdict += (". The claim is not contradicted; nor is it confirmed, since a rank test that does not reject does not "
                "show a criterion to be no better than random")
    shows = ("So the rank test, corrected for the criteria tested, does not show on any model that a criterion not "
             "shown valid at the token level prunes better than chance"
             + (f" (with {n_draws} draws it could not have)" if len(unattainable) == len(c) else ""))
    if beat_all is not None:
        k, n = (int(v) for v in beat_all)
        expect = n / (n_draws + 1)
        shows += (f"; the number of settings that beat every draw, {k} of {n} against about {expect:.1f} by chance, "
                  + ("leans towards criteria pruning better than random, but it is not a valid test (the settings of "
                     "a model share their random draws and agreeing criteria share their plans), so no p-value is "
                     "attached to it" if k > expect else "is no larger than chance gives"))
    shows += (". Whether token-level validity is necessary for pruning better than chance is not decided by these "
              "data, and those criteria are not shown to be no better than random either")
    return {"paper_claim_verdict": verdict, "shows_verdict": shows}


def below_unpruned_text(results, unpruned, *, labels=None) -> str:
    """Whether pruning *improved* held-out perplexity (chapter 10), in computed prose.

    ``results``: one row per pruning plan with ``model``, ``criterion`` (``"random"`` for a draw),
    ``fraction``, ``perplexity``; ``unpruned``: {model: perplexity of the unpruned model}. Counts the
    criterion plans and the random draws whose perplexity lies below the unpruned model's, names the
    largest such improvement, and says that nothing is concluded from it; ``labels``: criterion ->
    display name. A plain sentence when no plan is below the unpruned model.
    """
    name = (lambda c: labels.get(c, c)) if labels else (lambda c: c)  # noqa: E731
    r = results.assign(base=results.model.map(unpruned).astype(float), perplexity=results.perplexity.astype(float))
    r = r.assign(gain=r.base - r.perplexity)
    below = r[r.gain > 0]
    crit, rnd = r[r.criterion != "random"], r[r.criterion == "random"]
    bc, br = below[below.criterion != "random"], below[below.criterion == "random"]
    if below.empty:
        return (f"No pruning plan lowers the held-out perplexity below the unpruned model's (all {len(crit)} criterion "
                f"settings and {len(rnd)} random draws raise it or leave it unchanged).")
    best = below.loc[below.gain.idxmax()]
    who = "random draw" if best.criterion == "random" else name(best.criterion)
    frac = f"{best.fraction:.1%}".replace(".0%", "%")
    per_model = "; ".join(f"{m} {int((g.gain > 0).sum())} of {len(g)}" for m, g in r.groupby("model", sort=False))
    rel = 100 * best.gain / best.base
    same = rnd[(rnd.model == best.model) & (rnd.fraction == best.fraction)]
    spread = ""
    if len(same):
        change = 100 * (same.perplexity - same.base) / same.base
        spread = (f"; at the same fraction the {len(same)} random draws of {best.model} change it by "
                  f"{change.min():+.2f}% to {change.max():+.2f}%")
        if change.min() <= -rel:
            spread += ", so a drop of this size is within what removing random experts gives"
    return (f"Pruning *lowers* the held-out perplexity below the unpruned model's in {len(bc)} of the {len(crit)} "
            f"criterion settings and {len(br)} of the {len(rnd)} random draws (per model, of all plans: {per_model}). "
            f"The largest drop is {best.model}, {who} at {frac}: {best.perplexity:.2f} against {best.base:.2f} unpruned, "
            f"{rel:.2f}% of the unpruned perplexity{spread}. Removing a few experts of these small models can thus "
            "move the held-out perplexity by a fraction of a percent either way; nothing is concluded from it here "
            "(it says nothing about which criterion finds dispensable experts, and the comparisons above are with the "
            "random draws, not with the unpruned model).")


def random_mean_counts_text(vs_random, *, what: str = "settings", value: str = "perplexity", sub: str | None = "fraction",
                            beat_all: bool = True) -> str:
    """Per-model counts of criterion settings that prune better than the mean of the random draws
    (chapter 10), naming where criteria do *worse* than the random mean more often than not.

    ``vs_random``: :func:`compare_with_random` rows (``model``, ``beats_mean``, ``beats_all``, and the
    column ``sub`` when given). Returns a clause without a final period: per model, how many of its
    settings lie below the random mean (and, with ``beat_all``, beat every draw); then the models, and
    the (model, ``sub``) groups of a model that is not already named, where fewer than half of the
    settings lie below the random mean. ``what`` names the settings, ``value`` the quantity compared.
    ``ValueError`` for an empty table.
    """
    if len(vs_random) == 0:
        raise ValueError("vs_random is empty")
    per = []
    for m, g in vs_random.groupby("model", sort=False):
        txt = f"{m} {int(g.beats_mean.sum())} of {len(g)}"
        if beat_all:
            k = int(g.beats_all.sum())
            txt += f" ({k} {'beats' if k == 1 else 'beat'} every draw)"
        per.append(txt)

    s = f"per model, {what} with a lower {value} than the random mean: " + "; ".join(per)
    share = vs_random.groupby("model", sort=False).beats_mean.mean()
    worse = list(share.index[share < 0.5])
    groups = []
    if sub is not None and sub in vs_random:
        sh = vs_random[~vs_random.model.isin(worse)].groupby(["model", sub], sort=False).beats_mean.agg(["sum", "size"])
        for (m, v), r in sh[sh["sum"] < sh["size"] / 2].iterrows():
            label = f"{v:.0%}" if sub == "fraction" else f"{sub} {v}"
            groups.append(f"{m} at {label} ({int(r['size'] - r['sum'])} of {int(r['size'])} worse)")
    if worse or groups:
        s += ("; criteria do worse than the random mean more often than not on "
              + join_words([f"{m} ({int((~vs_random[vs_random.model == m].beats_mean).sum())} of "
                            f"{int((vs_random.model == m).sum())} worse)" for m in worse] + groups))
    return s


def null_strength_text(table, *, bound_d: float = 0.2, power: float = 0.8) -> str:
    """How strong the token-level nulls of ``table`` are (chapter 10), as a clause without a final period.

    ``table``: :func:`moeaudit.stats.audit_table` rows (``n``, ``alpha_corrected``) of the cells that
    are not significant. States the range of the minimum detectable |d_z| at the cells' Bonferroni
    level with ``power`` (:func:`moeaudit.stats.min_detectable_dz`) and whether equivalence within
    ±``bound_d`` (TOST at the same level) could pass at any of them
    (:func:`moeaudit.stats.min_equivalence_bound`). ``""`` for an empty table.
    """

    t = table[table.n >= 3]
    if t.empty:
        return ""
    mde = [min_detectable_dz(int(n), alpha=float(a), power=power) for n, a in zip(t.n, t.alpha_corrected)]
    eq = [min_equivalence_bound(int(n), alpha=float(a)) for n, a in zip(t.n, t.alpha_corrected)]
    rng = lambda v: f"{min(v):.2f}" if f"{min(v):.2f}" == f"{max(v):.2f}" else f"{min(v):.2f}–{max(v):.2f}"  # noqa: E731
    n_rng = f"{int(t.n.min())}" if t.n.min() == t.n.max() else f"{int(t.n.min())}–{int(t.n.max())}"
    can = sum(b < bound_d for b in eq)
    return (f"with {n_rng} positions per cell, the minimum detectable |d_z| at the Bonferroni level with {power:.0%} "
            f"power is {rng(mde)}; TOST at the same level needs an equivalence bound above {rng(eq)}, so equivalence "
            f"within ±{bound_d:g} " + ("cannot be shown at any of these cells" if can == 0 else
                                       f"could be shown at {can} of {plural(len(t), 'cell')} at most"))


def bf_null_reading_text(bf, control_table, *, r: float, control: str = "routing_weight") -> str:
    """What ``BF10 < 1/3`` means for the audit's cells (chapter 10), with the routing-weight control as
    the comparison, as sentences ending with a period.

    ``bf``: one row per cell with ``model``, ``ranking``, ``layer``, ``BF10`` (JZS, Cauchy prior of scale
    ``r``); ``control_table``: :func:`moeaudit.stats.audit_table` rows of the ``control`` ranking
    (``model``, ``layer``, ``sig_dual_bonf``). A Bayes factor below 1/3 favours δ = 0 over an alternative
    that spreads its effects on the prior's scale (|δ| around ``r``), not over effects of the size the
    design can barely detect; the sentence counts, among the control's cells whose dual test is not
    significant, those whose BF10 is below 1/3, per model, so that the reader can see the criterion
    "favouring the null" where the control's effect is known to be positive in other cells.
    """

    s = (f"BF10 < 1/3 favours no effect over an alternative whose effects spread on the prior's scale (|d_z| around "
         f"{r:g}); it does not favour no effect over effects of the small size this design can barely detect")
    c = bf[bf.ranking == control].merge(control_table[["model", "layer", "sig_dual_bonf"]], on=["model", "layer"])
    fail = c[~c.sig_dual_bonf.astype(bool)]
    if fail.empty:
        return s + "."
    per = [f"{m}: {int((g.BF10 < 1 / 3).sum())} of {len(g)}" for m, g in fail.groupby("model", sort=False)]
    n_null = int((fail.BF10 < 1 / 3).sum())
    return (s + f". By the same criterion the routing-weight control, the audit's positive reference, "
            + ("\"favours the null\" in " if n_null else "favours the null in none of ")
            + (f"{n_null} of the {len(fail)} cells where its dual test is not significant ({join_words(per)})"
               if n_null else f"the {len(fail)} cells where its dual test is not significant")
            + (", so such a count for the other rankings does not show that their effects are absent." if n_null
               else "."))
