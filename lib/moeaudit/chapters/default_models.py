"""Appendix A1 (the default models): the tables and phrases of the model cards, read from each
shipped model's ``training_summary.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..report import join_words, value_span
from ..zoo import MIN_FRAC_USED, PPL_RATIO_MAX, USAGE_THRESHOLD


def recipe_row(summary: dict) -> dict:
    """One model's architecture, training settings and costs as display strings (appendix A1)."""
    a, t, p = summary["architecture"], summary["training"], summary["parameters"]
    n_exp = a.get("num_experts") or a.get("n_routed_experts")
    if "shared_expert_intermediate_size" in a:
        shared = f"1 (width {a['shared_expert_intermediate_size']}, sigmoid gate)"
    elif "n_shared_experts" in a:
        shared = f"{a['n_shared_experts']} (width {a['n_shared_experts'] * a['moe_intermediate_size']})"
    else:
        shared = "none"
    aux = summary["aux_loss"]
    return {
        "class": summary["class"],
        "stands in for": summary["mirrors"],
        "layers (dense)": f"{a['num_hidden_layers']} ({a.get('first_k_dense_replace', 0)})",
        "hidden size": a["hidden_size"],
        "routed experts, top-k": f"{n_exp}, top-{a['num_experts_per_tok']}",
        "expert width": a.get("moe_intermediate_size", a.get("intermediate_size")),
        "shared experts": shared,
        "parameters (active per token)": f"{p['total'] / 1e6:.2f} M ({p['active_per_token'] / 1e6:.2f} M)",
        "balance-loss coefficient (real model's)": f"{aux['coef']:g} ({aux.get('real_coef', aux['coef']):g})",
        "steps × batch × context": f"{t['steps']} × {t['batch_size']} × {t['context']}",
        "training tokens (epochs)": f"{t['tokens'] / 1e6:.2f} M ({t['epochs']:.1f})",
        "peak learning rate, warm-up": f"{t['lr']:g}, {t['warmup_steps']} steps",
        "weight decay, β": f"{t['weight_decay']}, {tuple(t['betas'])}",
        "training time (wall clock)": f"{t['wall_s'] / 60:.1f} min",
        "processor time": f"{t['cpu_s'] / 60:.1f} min on {t['threads']} thread(s)" if "cpu_s" in t else "not recorded",
        "seed": summary["seed"],
        "torch / transformers": f"{summary['versions']['torch']} / {summary['versions']['transformers']}",
    }


def generalisation_gap(summaries: dict) -> pd.DataFrame:
    """Per model: the training loss of the last steps (mean over the last 50 recorded steps, nats),
    the test-split loss (nats), their difference ``gap`` (nats), the epochs and training tokens."""

    rows = {m: {"train_loss": s["training"]["final_loss_mean_last_50"], "test_loss": s["evaluation"]["model"]["nll"],
                "epochs": s["training"]["epochs"], "training_tokens": s["data"]["train_stream_tokens"]}
            for m, s in summaries.items()}
    out = pd.DataFrame.from_dict(rows, orient="index")  # keeps each column's own dtype
    out["gap"] = out["test_loss"] - out["train_loss"]
    return out


def routing_mass_shares(summary: dict) -> pd.DataFrame:
    """Share of the routing mass (percent) per (MoE layer, expert) on the test split: rows are
    layers, columns expert ids; each row sums to 100."""

    layers = summary["evaluation"]["utilisation"]["layers"]
    return pd.DataFrame({int(k): v["mass_share"] for k, v in layers.items()}).T.sort_index() * 100


def utilisation_table(summaries: dict) -> pd.DataFrame:
    """Per (model, MoE layer): number of routed experts, the share of them with at least the usage
    threshold of the routing mass, the smallest and largest share, and the effective number of
    experts (exponential of the entropy of the shares)."""

    rows = []
    for m, s in summaries.items():
        util = s["evaluation"]["utilisation"]
        for layer, u in util["layers"].items():
            rows.append({"model": m, "layer": int(layer), "experts": util["n_experts"],
                         f"experts with ≥ {util['threshold']:.1%} of mass": u["frac_experts_ge_threshold"],
                         "smallest share": u["min_share"], "largest share": u["max_share"],
                         "effective number of experts": u["effective_experts"]})
    return pd.DataFrame(rows).set_index(["model", "layer"])


def perplexity_table(summaries: dict) -> pd.DataFrame:
    """Per model: test tokens scored, perplexity and loss (nats) of the model and of the unigram
    baseline with the same tokenizer, and the perplexity ratio (model / unigram)."""

    rows = {}
    for m, s in summaries.items():
        ev = s["evaluation"]
        rows[m] = {"test tokens scored": ev["model"]["n_tokens"], "perplexity": ev["model"]["perplexity"],
                   "unigram perplexity": ev["unigram_baseline"]["perplexity"], "ratio": ev["perplexity_ratio_to_unigram"],
                   "loss (nats)": ev["model"]["nll"], "unigram loss (nats)": ev["unigram_baseline"]["nll"]}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def regime_table(summaries: dict, audited: dict | None = None) -> pd.DataFrame:
    """Per model, the loss (nats per token) on each text against a unigram model fitted to the same
    tokens, and the gain (unigram minus model: what the model takes from context): WikiText-2 test
    as the card's evaluation scores it (consecutive chunks; no in-sample unigram there, the card's
    unigram is fitted on the training split), WikiText-2 test and the embedded corpus as the audit
    selects and reads them (the ``regime`` record of the summary: :func:`moeaudit.tooling.training.measure_regime`),
    and, with ``audited`` (model -> :func:`moeaudit.corpus.loss_regime` dict), the text this build audits.
    Missing records are NaN."""

    rows = {}
    for m, s in summaries.items():
        reg = s.get("regime") or {}
        wt, emb = reg.get("wikitext-2") or {}, reg.get("embedded") or {}
        row = {"WikiText-2 test, card (loss)": s["evaluation"]["model"]["nll"],
               "WikiText-2 test, audit selection (loss)": wt.get("mean_loss", np.nan),
               "WikiText-2 test, audit selection (gain)": wt.get("gain", np.nan),
               "embedded corpus, default form (loss)": emb.get("mean_loss", np.nan),
               "embedded corpus, default form (gain)": emb.get("gain", np.nan),
               "gain ratio (gate)": reg.get("gain_ratio", np.nan)}
        if audited is not None and m in audited:
            row["audited text (loss)"] = audited[m]["mean_loss"]
            row["audited text (gain)"] = audited[m]["gain"]
        rows[m] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def reproducibility_table(summaries: dict, dirs: dict) -> tuple[pd.DataFrame, dict]:
    """The same-seed retraining records: a table (steps compared, largest loss and weight difference,
    rerun time in minutes) and the per-step curves (``reproducibility_log.csv``) of the models that
    have them; ``dirs`` maps each model to its directory."""

    rows, curves = {}, {}
    for m, s in summaries.items():
        rep, path = s.get("reproducibility"), Path(dirs[m]) / "reproducibility_log.csv"
        if rep is None or not path.exists():
            continue
        curves[m] = pd.read_csv(path)
        rows[m] = {"steps compared": rep["steps"], "max |loss difference|": rep["max_abs_loss_diff"],
                   "max |weight difference|": rep["max_abs_param_diff"], "rerun time (min)": rep["rerun_wall_s"] / 60}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model"), curves


def top_next_tokens(model_dir, prompt: str, *, k: int = 5) -> dict:
    """The ``k`` most probable next tokens (and their probabilities) of the model in ``model_dir``
    after ``prompt``, as ``{"#1": "'token' (0.12)", ...}``."""

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        probs = lm(input_ids=tok(prompt, return_tensors="pt")["input_ids"]).logits[0, -1].softmax(-1)
    top = torch.topk(probs, k)
    return {f"#{i + 1}": f"{tok.decode([int(j)])!r} ({float(p):.2f})" for i, (p, j) in enumerate(zip(top.values, top.indices))}


def family_table(summaries: dict) -> pd.DataFrame:
    """One row per model of the redundancy family (appendix A1), from ``training_summary.json``
    records: routed experts, top-k, seed, parameters in total and active per token (millions),
    processor time (minutes), test perplexity and its ratio to the unigram baseline's, the worst
    layer's share of experts with at least the usage threshold of the routing mass, the mean
    effective number of experts over layers, the stored weights (MB) and, where recorded, the
    largest weight difference of a same-seed retraining."""

    rows = {}
    if not summaries:
        return pd.DataFrame(columns=["retrained: max |weight difference|", "ratio to unigram",
                                     "worst layer: experts used", "weights (MB)"])
    for m, s in summaries.items():
        a, ev, t = s["architecture"], s["evaluation"], s["training"]
        layers = ev["utilisation"]["layers"].values()
        rep = s.get("reproducibility")
        rows[m] = {"routed experts": a.get("num_experts") or a.get("n_routed_experts"), "top-k": a["num_experts_per_tok"],
                   "seed": s["seed"], "parameters (M)": s["parameters"]["total"] / 1e6,
                   "active per token (M)": s["parameters"]["active_per_token"] / 1e6,
                   "processor time (min)": t["cpu_s"] / 60 if "cpu_s" in t else float("nan"),
                   "test perplexity": ev["model"]["perplexity"], "ratio to unigram": ev["perplexity_ratio_to_unigram"],
                   "worst layer: experts used": ev["min_frac_experts_ge_threshold"],
                   "effective experts (mean over layers)": sum(u["effective_experts"] for u in layers) / len(layers),
                   "weights (MB)": s.get("weights", {}).get("file_mb", float("nan")),
                   "retrained: max |weight difference|": rep["max_abs_param_diff"] if rep else float("nan")}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def family_texts(summaries: dict, table) -> dict[str, str]:
    """The computed phrases of appendix A1's redundancy-family paragraph, from the family's
    ``training_summary.json`` records and their :func:`family_table`: ``family_depth``,
    ``family_gates`` (the gates and the range of each figure) and ``family_repro`` (which models
    were retrained from their seed)."""

    if not summaries:
        return {k: "(no family model in this run)" for k in ("family_depth", "family_gates", "family_repro")}
    depth = sorted({s["architecture"]["num_hidden_layers"] for s in summaries.values()})
    checked = table["retrained: max |weight difference|"].dropna()
    return {
        "family_depth": " or ".join(f"{d} decoder layers" for d in depth),
        "family_gates": (f"test perplexity at most {PPL_RATIO_MAX:g} of the unigram baseline's (here "
                         f"{value_span(table['ratio to unigram'], '{:.2f}')}), and in every MoE layer at least "
                         f"{MIN_FRAC_USED:.0%} of the routed experts with {USAGE_THRESHOLD:.1%} of the routing mass "
                         f"(worst layer here: {value_span(table['worst layer: experts used'], '{:.0%}')}); "
                         f"{table['weights (MB)'].sum():.1f} MB of weights in all"),
        "family_repro": (f"{len(checked)} of {len(table)} {'was' if len(checked) == 1 else 'were'} retrained from "
                         f"{'its' if len(checked) == 1 else 'their'} seed to check reproducibility "
                         f"({join_words(checked.index)}; largest weight difference {checked.max():.3g})" if len(checked)
                         else "none was retrained from its seed to check reproducibility"),
    }
