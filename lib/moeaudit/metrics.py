"""Observational expert metrics (paper, Section 2), computed over real tokens of a clean pass.

For expert i at layer L, over the N real tokens of the corpus and the set S_i of tokens whose
top-k selects i:

* ``utilization_rate``    = |S_i| / N                       (share of tokens that select i)
* ``mean_routing_weight`` = mean_{t in S_i} g_i(x_t)        (softmax router probability)
* ``activation_norm``     = mean_{t in S_i} ||E_i(x_t)||_2
* ``activation_std``      = std_{t in S_i} ||E_i(x_t)||_2    (ddof = 1)

An expert that is never selected gets ``n_selected = 0``, ``utilization_rate = 0`` and NaN for
the three metrics that are defined over its selections (``activation_std`` is also NaN for a
single selection).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .engine import CleanPass

METRICS = ("utilization_rate", "activation_norm", "mean_routing_weight", "activation_std")
ROUTING_WEIGHT = "routing_weight"  # the per-token control ranking (g_e(x_t) at the audited token)
RANKINGS = METRICS + (ROUTING_WEIGHT,)
METRIC_LABELS = {"utilization_rate": "Utilization rate", "activation_norm": "Activation norm",
                 "mean_routing_weight": "Mean routing weight", "activation_std": "Activation std",
                 ROUTING_WEIGHT: "Per-token routing weight"}


def check_rankings(rankings) -> list[str]:
    bad = [r for r in rankings if r not in RANKINGS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid metrics are {list(RANKINGS)}")
    return list(rankings)


def expert_metrics_from_routing(indices: np.ndarray, probs: np.ndarray, norms: np.ndarray, *,
                                num_experts: int) -> pd.DataFrame:
    """The four metrics per expert from (N, k) arrays of selected experts, their probabilities and
    output norms. Pure numpy/pandas so it can be checked on a hand-built routing pattern."""
    n_tokens = indices.shape[0]
    flat = pd.DataFrame({"expert": indices.reshape(-1), "prob": probs.reshape(-1).astype(np.float64),
                         "norm": norms.reshape(-1).astype(np.float64)})
    agg = flat.groupby("expert").agg(n_selected=("prob", "size"), mean_routing_weight=("prob", "mean"),
                                     activation_norm=("norm", "mean"), activation_std=("norm", lambda s: s.std(ddof=1)))
    out = agg.reindex(range(num_experts))
    out.index.name = "expert"
    out["n_selected"] = out["n_selected"].fillna(0).astype(np.int64)
    out["n_tokens"] = n_tokens
    out["utilization_rate"] = out["n_selected"] / n_tokens
    return out.reset_index()[["expert", "n_selected", "n_tokens", *METRICS]]


def observational_metrics(clean: CleanPass, *, num_experts: int, layers=None) -> pd.DataFrame:
    """Tidy table: one row per (layer, expert) with ``n_selected``, ``n_tokens`` and the four metrics."""
    layers = sorted(clean.routing) if layers is None else list(layers)
    frames = []
    for L in layers:
        r = clean.routing[L]
        df = expert_metrics_from_routing(r["indices"], r["prob"], r["norm"], num_experts=num_experts)
        df.insert(0, "layer", L)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
