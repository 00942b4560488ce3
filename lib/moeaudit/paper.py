"""The paper itself: its audited models and layers, the numbers printed in its tables, and the
released code's own definitions of the observational metrics.

:func:`paper_printed_values` holds the numbers printed in the paper's tables (typed from the text of
arXiv:2606.10703v1), so that recomputed values can be shown beside what the paper reports. Model keys
are ``"olmoe"``, ``"qwen"`` and ``"deepseek"`` (:data:`MODELS`); :data:`PAPER_METRIC_LABELS` maps the
metric keys of the released files to the row labels of the paper's tables (the book's own metric
keys are :data:`moeaudit.metrics.METRICS`).

The released recipes: the released scripts' own ways of computing the four observational metrics,
re-implemented so that they can be applied to any model the book audits. Sources: the released
per-token ablation scripts (``per_token_ablation_olmoe.py``, ``per_token_ablation_deepseek.py``,
``validation_qwen.py`` of ``callmeloui/observational_metrics``), as summarised in the project's notes
on the released code, "Observational metrics as implemented". Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .report import join_words

#: model key -> name used in the paper
MODELS: dict[str, str] = {
    "olmoe": "OLMoE-1B-7B-0924",
    "qwen": "Qwen1.5-MoE-A2.7B",
    "deepseek": "DeepSeek-V2-Lite",
}


#: metric key (as in the released files) -> row label used in the paper's tables
PAPER_METRIC_LABELS: dict[str, str] = {
    "utilization_rate": "Utilization rate",
    "activation_norm": "Activation norm",
    "mean_routing_weight_when_active": "Mean routing weight",
    "activation_std": "Activation std",
}


#: layers audited per model (paper, Section 2)
LAYERS: dict[str, tuple[int, ...]] = {
    "olmoe": (0, 4, 7, 11, 15),
    "qwen": (0, 6, 12, 18, 23),
    "deepseek": (1, 7, 13, 20, 26),
}


PROGRESSIVE_LAYERS: tuple[int, ...] = (0, 1, 7, 8, 9, 15)


#: the family-wise level of the paper's tests (Section 2: alpha_adj = 0.05/20 and 0.05/5); statements
#: about the paper use it, whatever level a chapter's own tests use
PAPER_ALPHA: float = 0.05


# Numbers the paper states in its running text (not in a table), typed from arXiv:2606.10703v1
# (``v2`` from version 2); key -> (value, where it is stated).
_PAPER_TEXT = {
    "max_abs_d_v1": (0.17, "abstract and Section 1/3 (v1): effect sizes below d = 0.17 across all 60 cells"),
    "max_abs_d_v2": (0.23, "abstract (v2): effect sizes below d = 0.23"),
    "metric_cells_total": (60, "abstract and Section 3: 60 metric-layer combinations"),
    "activation_norm_bound": (0.157, "Section 3: activation norm |d| <= 0.157 at every layer in every model"),
    "qwen_control_bound": (0.124, "Section 3: Qwen control within |d| <= 0.124"),
    "deepseek_control_bound": (0.098, "Section 3: DeepSeek control within |d| <= 0.098"),
    "olmoe_gap_norm_first": (0.0041, "Section 3: mean gap norm 0.0041 at OLMoE Layer 0"),
    "olmoe_gap_norm_last": (0.1697, "Section 3: mean gap norm 0.1697 at OLMoE Layer 15"),
    "olmoe_gap_norm_ratio": (41.0, "Section 3 and Appendix A.3: a 41x increase"),
    "qwen_gap_norm_ratio": (38.0, "Appendix A.3: Qwen's mean gap norm scales about 38x"),
    "positions_per_cell": (200, "Section 2: n = 200 token positions per cell"),
    "family_alpha": (0.05, "Section 2: Bonferroni from a family-wise 0.05"),
    "alpha_adj_metric": (0.0025, "Section 2: alpha_adj = 0.05/20 = 0.0025 for the audit"),
    "alpha_adj_control": (0.01, "Section 2: alpha_adj = 0.05/5 = 0.01 for the control"),
    "olmoe_uncorrected_cells": (1, "Section 3: in OLMoE, 19 of 20 cells are non-significant at p < 0.05"),
    "deepseek_uncorrected_cells": (3, "Section 3: in DeepSeek, three cells reach uncorrected p_t < 0.05"),
    "deepseek_wilcoxon_cells": (1, "Section 3: ... and only one survives Wilcoxon"),
    "control_signal_layer": (15, "Section 3: the OLMoE control effect at Layer 15"),
    "gap_comp_olmoe_layer": (15, "Appendix A.3: in OLMoE, this correlation strengthens only at Layer 15"),
}


def paper_text_values() -> dict[str, float]:
    """Numbers the paper states in its running text (abstract, Sections 2-3, Appendix A.3), typed once
    from arXiv:2606.10703v1 (and v2 where named): ``{key: value}``. Keys: ``max_abs_d_v1`` (0.17),
    ``max_abs_d_v2`` (0.23), ``metric_cells_total``, ``activation_norm_bound``, ``qwen_control_bound``,
    ``deepseek_control_bound``, ``olmoe_gap_norm_first``/``_last``, ``olmoe_gap_norm_ratio``,
    ``qwen_gap_norm_ratio``, ``positions_per_cell``, ``family_alpha``, ``alpha_adj_metric``,
    ``alpha_adj_control``, ``olmoe_uncorrected_cells``, ``deepseek_uncorrected_cells``,
    ``deepseek_wilcoxon_cells``, ``control_signal_layer``, ``gap_comp_olmoe_layer``. The numbers in the paper's tables are :func:`paper_printed_values`."""
    return {k: v for k, (v, _) in _PAPER_TEXT.items()}


# Tables as printed in arXiv:2606.10703v1, typed from the paper's text. Per row: the values
# at the table's layers (or k for Tables 8-9), in column order; a trailing "b" marks a bold
# cell, trailing "*" marks significance stars (Table 7).
_T_METRIC = {
    1: ("olmoe", {
        "utilization_rate": ("-0.071 -0.027 +0.029 +0.066 +0.051", "0.319 0.702 0.687 0.351 0.476"),
        "activation_norm": ("-0.095 +0.119 +0.075 +0.136 +0.033", "0.182 0.094 0.293 0.057 0.640"),
        "mean_routing_weight_when_active": ("+0.048 -0.093 +0.072 -0.036 -0.095",
                                            "0.500 0.189 0.312 0.611 0.179"),
        "activation_std": ("-0.034 +0.030 -0.098 +0.141b -0.020", "0.634 0.669 0.169 0.048b 0.777"),
    }),
    2: ("qwen", {
        "utilization_rate": ("-0.131 +0.012 +0.111 +0.009 -0.001", "0.065 0.861 0.118 0.903 0.993"),
        "activation_norm": ("+0.019 +0.053 +0.110 +0.045 +0.092", "0.786 0.454 0.120 0.526 0.194"),
        "mean_routing_weight_when_active": ("+0.021 +0.018 -0.006 +0.129 +0.035",
                                            "0.772 0.798 0.934 0.070 0.620"),
        "activation_std": ("+0.067 +0.046 +0.081 +0.149b +0.222b", "0.343 0.515 0.252 0.036b 0.002b"),
    }),
    3: ("deepseek", {
        "utilization_rate": ("-0.039 +0.044 +0.115 +0.163b +0.143b", "0.581 0.533 0.105 0.023b 0.045b"),
        "activation_norm": ("+0.157b +0.040 +0.097 +0.006 +0.084", "0.028b 0.576 0.172 0.937 0.235"),
        "mean_routing_weight_when_active": ("-0.007 -0.070 +0.097 -0.014 +0.035",
                                            "0.926 0.327 0.174 0.849 0.621"),
        "activation_std": ("+0.101 +0.064 +0.043 +0.050 +0.064", "0.156 0.369 0.545 0.483 0.370"),
    }),
}


_T_CONTROL = {
    4: ("olmoe", {
        "d": "-0.114 +0.095 +0.085 +0.164b +0.231b",
        "p_t": "0.107 0.180 0.233 0.022b 0.0013b",
        "p_W": "0.217 0.799 0.227 0.015 0.019",
        "rho": "-0.058 +0.019 +0.196 +0.084 +0.199",
    }),
    5: ("qwen", {
        "d": "+0.014 -0.031 +0.114 +0.124 +0.112",
        "p_t": "0.840 0.659 0.110 0.081 0.116",
        "p_W": "0.385 0.589 0.308 0.922 0.199",
        "rho": "-0.084 +0.043 -0.036 +0.082 -0.011",
    }),
    6: ("deepseek", {
        "d": "+0.075 +0.078 +0.068 +0.068 +0.098",
        "p_t": "0.293 0.273 0.336 0.335 0.169",
        "p_W": "0.390 0.508 0.460 0.085 0.466",
        "rho": "+0.090 -0.070 +0.051 -0.001 -0.018",
    }),
}


_T7 = {
    "mean_gap_norm": "0.011 0.122 0.090 0.239 0.440",
    "rho_rw_gap": "+0.558*** +0.638*** +0.632*** +0.596*** +0.744***",
    "rho_gap_comp": "+0.076 +0.394** +0.388** +0.349** +0.282*",
}


_T8 = {  # rows k = 1..7, columns layers 0, 1, 7, 8, 9, 15
    1: "+0.009 +0.018 +0.009 +0.015 +0.029 +0.082",
    2: "+0.013 +0.031 +0.016 +0.028 +0.060 +0.155",
    3: "+0.016 +0.035 +0.010 +0.045 +0.061 +0.214",
    4: "+0.019 +0.051 +0.022 +0.054 +0.073 +0.290",
    5: "+0.029 +0.058 +0.022 +0.061 +0.080 +0.354",
    6: "+0.021 +0.058 +0.025 +0.062 +0.078 +0.403",
    7: "+0.028 +0.068 +0.020 +0.070 +0.083 +0.431",
}


_T9 = {
    "median_delta": "+0.000 +0.003 +0.001 +0.008 +0.012 +0.018",
    "p95_delta": "+0.433 +0.398 +0.473 +0.641 +0.709 +2.633",
}


def _cells(text: str):
    for token in text.split():
        bold = token.endswith("b")
        token = token.rstrip("b")
        stars = len(token) - len(token.rstrip("*"))
        number = token.rstrip("*")
        decimals = len(number.split(".")[1]) if "." in number else 0
        yield number, float(number), decimals, bold, "*" * stars


def paper_printed_values() -> pd.DataFrame:
    """The numbers printed in the paper's Tables 1-9 (arXiv:2606.10703v1), in long form.

    Typed from the paper's text, not read from any data file. Columns: ``table`` (1-9),
    ``model``, ``experiment`` (``"metric"``, ``"control"``, ``"redistribution"``,
    ``"progressive"``), ``metric`` (metric key for Tables 1-3, ``"routing_weight"`` for
    Tables 4-6, else ``None``), ``layer``, ``k`` (Tables 8-9, else ``<NA>``), ``quantity``
    (``d``, ``p_t``, ``p_W``, ``rho`` for Tables 1-6; ``mean_gap_norm``, ``rho_rw_gap``,
    ``rho_gap_comp`` for Table 7; ``mean_delta``, ``median_delta``, ``p95_delta`` for
    Tables 8-9), ``printed`` (the text as printed), ``value`` (float), ``decimals``
    (printed precision), ``bold`` (bold in the paper: uncorrected p_t < 0.05 in Tables 1-3,
    "Bonferroni significance" per the caption of Tables 4-6), ``stars`` (Table 7
    significance markers: * p<0.05, ** p<0.01, *** p<0.001).

    Tables 1-3 print d and p_t only (no p_W). Table 4 (OLMoE control) has no released data.
    """
    rows = []

    def add(table, model, experiment, metric, layer, k, quantity, cell):
        printed, value, decimals, bold, stars = cell
        rows.append({"table": table, "model": model, "experiment": experiment,
                     "metric": metric, "layer": layer, "k": k, "quantity": quantity,
                     "printed": printed, "value": value, "decimals": decimals,
                     "bold": bold, "stars": stars})

    for table, (model, spec) in _T_METRIC.items():
        for metric, (d_row, p_row) in spec.items():
            for quantity, text in (("d", d_row), ("p_t", p_row)):
                for layer, cell in zip(LAYERS[model], _cells(text), strict=True):
                    add(table, model, "metric", metric, layer, None, quantity, cell)
    for table, (model, spec) in _T_CONTROL.items():
        for quantity, text in spec.items():
            for layer, cell in zip(LAYERS[model], _cells(text), strict=True):
                add(table, model, "control", "routing_weight", layer, None, quantity, cell)
    for quantity, text in _T7.items():
        for layer, cell in zip(LAYERS["qwen"], _cells(text), strict=True):
            add(7, "qwen", "redistribution", None, layer, None, quantity, cell)
    for k, text in _T8.items():
        for layer, cell in zip(PROGRESSIVE_LAYERS, _cells(text), strict=True):
            add(8, "olmoe", "progressive", None, layer, k, "mean_delta", cell)
    for quantity, text in _T9.items():
        for layer, cell in zip(PROGRESSIVE_LAYERS, _cells(text), strict=True):
            add(9, "olmoe", "progressive", None, layer, 7, quantity, cell)
    out = pd.DataFrame(rows)
    out["k"] = out["k"].astype("Int64")
    out["metric"] = out["metric"].astype(object).where(out["metric"].notna(), None)
    return out


def agrees_at_printed_precision(value, printed, decimals):
    """Whether ``value`` is consistent with a number printed to ``decimals`` places.

    True when ``|value - printed| <= 0.5 * 10**-decimals`` (plus 1e-12 for floating point),
    i.e. some correct rounding of ``value`` gives the printed number. Works elementwise on
    arrays and Series.
    """
    value = np.asarray(value, dtype=np.float64)
    printed = np.asarray(printed, dtype=np.float64)
    tol = 0.5 * np.power(10.0, -np.asarray(decimals, dtype=np.float64)) + 1e-12
    return np.abs(value - printed) <= tol


#: the released recipes, named after the script that uses them
RELEASED_RECIPES = ("OLMoE script", "DeepSeek script", "Qwen script")


#: which released recipe audited the real checkpoint that a model family stands in for
RECIPE_OF_FAMILY = {"olmoe": "OLMoE script", "mixtral": "OLMoE script", "deepseek_v2": "DeepSeek script",
                    "qwen2_moe": "Qwen script", "qwen3_moe": "Qwen script"}


#: the paper's definitions (Section 2), recomputed from the same padded pass
PAPER_RECIPE = "paper (re-computed)"


def released_active_threshold(logits, *, top_k: int) -> float:
    """The one threshold the released OLMoE "active" mask reduces to.

    The released OLMoE script (``ExpertMetricsComputer.compute_metrics``) builds the mask of
    "mean routing weight when active" for each expert ``e`` by looping over every recorded
    position ``y`` (padding included), taking ``thr(y)``, the ``top_k``-th largest router logit of
    ``y``, and OR-ing ``logit_e(x) >= thr(y)`` over all ``y`` into the mask of every position ``x``.
    Position ``x`` is therefore admitted iff ``logit_e(x) >= min_y thr(y)``: one threshold for the
    layer, the same for every expert, the smallest top-k cut-off of any position.

    ``logits``: (N, E) array of router logits at every recorded position (E experts); ``top_k``:
    1 <= top_k <= E. Returns the threshold (a logit). ``ValueError`` for a bad shape or ``top_k``.
    """
    lg = _logit_matrix(logits, top_k)
    return float(np.partition(lg, lg.shape[1] - top_k, axis=1)[:, lg.shape[1] - top_k].min())


def released_active_mask(logits, *, top_k: int) -> np.ndarray:
    """(N, E) bool mask of the released OLMoE recipe: ``logits >= released_active_threshold``.

    Admits far more than the ``top_k / E`` share of positions that the router selects (see
    :func:`released_active_threshold`); every position's own top-k is always admitted.
    """
    lg = _logit_matrix(logits, top_k)
    return lg >= released_active_threshold(lg, top_k=top_k)


def released_mean_routing_weight_when_active(logits, *, top_k: int) -> tuple[np.ndarray, float]:
    """The released OLMoE "mean routing weight when active": mean router *logit* over the released mask.

    ``logits``: (N, E) router logits over all recorded positions, padding included (the OLMoE
    gate is a Linear layer, so the released hook records logits, not probabilities). For each
    expert ``e``: the mean of ``logits[:, e]`` over the positions with
    ``logits[:, e] >= released_active_threshold(logits, top_k=top_k)``; 0.0 for an expert with no
    admitted position (the released script's fallback). Computed in float64.

    Returns ``(values, threshold)``: values (E,) in logit units (not probabilities, not nats),
    threshold a float logit. Source: ``per_token_ablation_olmoe.py`` of :data:`RELEASED_REPO`
    (notes on the released code, "Observational metrics as implemented"); the paper's Section 2
    defines the metric as the mean softmax probability over the tokens that select ``e``.
    ``ValueError`` for a bad shape or ``top_k``.
    """
    lg = _logit_matrix(logits, top_k)
    thr = released_active_threshold(lg, top_k=top_k)
    mask = lg >= thr
    count = mask.sum(axis=0)
    total = np.where(mask, lg, 0.0).sum(axis=0)
    values = np.divide(total, count, out=np.zeros(lg.shape[1]), where=count > 0)
    return values, thr


def _logit_matrix(logits, top_k: int) -> np.ndarray:
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or lg.shape[0] < 1 or lg.shape[1] < 1:
        raise ValueError(f"logits must be a non-empty (positions, experts) array, got shape {lg.shape}")
    if not 1 <= int(top_k) <= lg.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, {lg.shape[1]}] for {lg.shape[1]} experts")
    return lg


def float16_spacing(x) -> np.ndarray:
    """The gap between ``|x|`` and the next larger float16 number (``numpy.spacing`` in float16), as float64.

    A loss of about 2.5 nats stored in float16 is a multiple of ``2**-9``; the difference of two such
    losses is exact to that step. Elementwise on arrays.
    """
    return np.spacing(np.abs(np.asarray(x, dtype=np.float16))).astype(np.float64)


def progressive_in_float16_steps(progressive: pd.DataFrame) -> pd.DataFrame:
    """The released progressive-ablation summary (:func:`progressive_ablation`) in float16 steps.

    Per (layer, k): ``step`` = :func:`float16_spacing` at the layer's ``baseline_loss_mean`` (the
    resolution of one float16 loss there, nats), and ``median_steps``, ``p25_steps``, ``p75_steps``
    = |median|, |25th|, |75th percentile| of the loss change divided by ``step``; ``n_on_2_16``: how
    many of the three are exact multiples of ``2**-16`` (0-3).
    """
    out = progressive[["layer", "k", "median_delta", "p25_delta", "p75_delta", "share_positive",
                       "baseline_loss_mean"]].copy()
    out["step"] = float16_spacing(out.baseline_loss_mean)
    for q in ("median", "p25", "p75"):
        out[f"{q}_steps"] = out[f"{q}_delta"].abs() / out.step
    q = out[["median_delta", "p25_delta", "p75_delta"]].to_numpy() * 2.0 ** 16
    out["n_on_2_16"] = (np.abs(q - np.round(q)) < 1e-6).sum(axis=1)
    return out


#: ``hidden_size`` in the config.json of the paper's checkpoints (OLMoE-1B-7B-0924,
#: Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite), keyed as in :data:`LAYERS`
CHECKPOINT_HIDDEN_SIZE: dict[str, int] = {"olmoe": 2048, "qwen": 2048, "deepseek": 2048}


def paper_control_notes(pv: pd.DataFrame | None = None, *, alpha: float | None = None) -> dict[str, str]:
    """What the paper's Table 4 (OLMoE control) and its text do with the significance rule, as sentences.

    ``pv``: :func:`moeaudit.paper.paper_printed_values` (default: loaded); ``alpha``: the paper's
    family-wise level (default :data:`moeaudit.paper.PAPER_ALPHA`), Bonferroni over the table's
    layers. Returns ``{"rule": ..., "trend": ..., "intro": ...}``: ``rule`` compares the layers that pass on
    p_t, on both tests and the bold layers of Table 4; ``trend`` says whether its d rise monotonically with
    depth; ``intro`` (a clause, for the introduction) says in how many models and layers of Tables 4–6 the
    control passes the t-test alone at each table's Bonferroni level, and whether it passes the dual rule.
    """

    alpha = PAPER_ALPHA if alpha is None else alpha
    pv = paper_printed_values() if pv is None else pv
    t4 = pv[pv.table == 4].pivot_table(index="layer", columns="quantity", values="value")
    printed = pv[pv.table == 4].set_index(["layer", "quantity"]).printed
    bold = sorted(pv[(pv.table == 4) & (pv.quantity == "d") & pv.bold.astype(bool)].layer)
    k = len(t4)
    a_adj = alpha / k
    t_pass = list(t4.index[t4.p_t < a_adj])
    dual = list(t4.index[(t4.p_t < a_adj) & (t4.p_W < a_adj)])
    unc = list(t4.index[t4.p_t < alpha])
    cell = lambda L: f"layer {L} (p_t = {printed[(L, 'p_t')]}, p_W = {printed[(L, 'p_W')]})"  # noqa: E731
    rule = (f"In the paper's Table 4 (OLMoE, α_adj = {alpha:g}/{k} = {a_adj:.3g}) the t-test passes at that level "
            + (f"at {join_words(cell(L) for L in t_pass)}, " if t_pass else "at no layer, ")
            + (f"and Wilcoxon as well at {join_words(f'layer {L}' for L in dual)}. " if dual
               else "and Wilcoxon does not. " if len(t_pass) == 1 else "and Wilcoxon at none of them. "))
    if t_pass and not dual:
        rule += ("The paper's text nevertheless calls that result the one to survive Bonferroni correction: "
                 "for the control, the paper counts a t-test below α_adj alone, not the dual rule it applies to the "
                 "audit cells. ")
    extra = [L for L in bold if L not in t_pass]
    rule += (f"Its caption says bold marks Bonferroni significance, but it bolds layer{'s' if len(bold) != 1 else ''} "
             f"{join_words(bold)}" + (f", including {join_words(cell(L) for L in extra)}, whose p_t is above α_adj" if extra else "")
             + (f"; the bold layers are exactly those with uncorrected p_t < {alpha:g}." if bold == unc else "."))
    d = t4.d.sort_index()
    mono = bool(np.all(np.diff(d.to_numpy()) > 0))
    seq = ", ".join(f"L{L} {printed[(L, 'd')]}" for L in d.index)
    trend = (f"its Table 4 d rise with depth at every step ({seq})" if mono else
             f"its text says that the OLMoE effect grows monotonically with depth, but the d of its Table 4 ({seq}) "
             f"do not rise at every step")
    intro = _paper_control_intro(pv, alpha)
    return {"rule": rule, "trend": trend, "intro": intro}


def _paper_control_intro(pv: pd.DataFrame, alpha: float) -> str:
    """Where the paper's control (Tables 4–6, Bonferroni over each table's layers) passes the t-test
    and whether its Wilcoxon test does too, as a clause: the control against the dual rule."""

    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    t_only, dual = [], []
    for (table, model), g in pv[pv.table.isin([4, 5, 6])].groupby(["table", "model"], sort=True):
        v = g.pivot_table(index="layer", columns="quantity", values="value")
        printed = g.set_index(["layer", "quantity"]).printed
        a_adj = alpha / len(v)
        for L in v.index[v.p_t < a_adj]:
            cell = (MODELS.get(model, model), L, printed[(L, "p_t")], printed[(L, "p_W")], a_adj)
            (dual if v.p_W[L] < a_adj else t_only).append(cell)
    say = lambda k, w: f"{words.get(k, k)} {w}{'s' if k != 1 else ''}"  # noqa: E731
    where = lambda cells: join_words(f"{m} layer {L}" for m, L, *_ in cells)  # noqa: E731
    out = []
    if t_only:
        models = {c[0] for c in t_only}
        out.append(f"the router's own weight for the token at hand passes Bonferroni (α_adj = {t_only[0][4]:.3g}) on "
                   f"the t-test alone in {say(len(models), 'model')} at {say(len(t_only), 'layer')} ({where(t_only)}, "
                   + ", ".join(f"p_t = {c[2]}" for c in t_only)
                   + "); its Wilcoxon test there does not ("
                   + ", ".join(f"p_W = {c[3]}" for c in t_only)
                   + "), so it fails the dual rule the paper applies to the metrics")
    if dual:
        out.append(f"it passes the dual rule at {say(len(dual), 'layer')} ({where(dual)})")
    if not out:
        return "the router's own weight for the token at hand passes Bonferroni on the t-test at no layer"
    return "; ".join(out)
