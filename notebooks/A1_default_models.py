# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A1. The default models
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - describe how the default models were trained, and which quality gates they pass;
# - compare their regime on the audited text with the real checkpoints';
# - retrain a model from another seed and audit it.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names or directories with a training_summary.json
family = ["olmoe-e64-k2-s0", "olmoe-e64-k2-s1", "olmoe-e64-k4-s0", "olmoe-e64-k4-s1", "olmoe-e64-k8-s0",
          "olmoe-e64-k8-s1", "olmoe-e64-k16-s0", "olmoe-e64-k16-s1", "olmoe-e8-k2-s0", "olmoe-e8-k2-s1"]  # the redundancy family's models (section at the end; [] to leave it out)
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR); only for the audited text and the example predictions
results_dir = None  # where the tables of this page are saved as CSV, and the clean passes cached (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import report
from moeaudit.tooling import params

params.validate("A1_default_models", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form, scope="example")
report.glue_values(reading_minutes=report.chapter_reading_minutes("A1_default_models"))

# %% [markdown]
# The paper audits three MoE language models with billions of parameters
# {cite}`muennighoff2025olmoe,qwen2024moe,deepseekai2024v2`: `allenai/OLMoE-1B-7B-0924`,
# `Qwen/Qwen1.5-MoE-A2.7B` and `deepseek-ai/DeepSeek-V2-Lite`. Running them needs a GPU and tens of
# gigabytes of weights. So that every chapter of this book can be executed on a laptop, without a
# network connection, the book ships three small models, trained from scratch for this purpose,
# that use **the same model classes** as the real checkpoints and keep the features of their
# routing that the audit depends on — the number of routed experts, top-k, shared experts and
# their gate, a dense first layer where the real model has one: {glue:md}`stand_ins`.
#
# Everything else is scaled down: {glue:md}`scaled_down`. Each model is trained with the form of
# load-balancing loss its real counterpart uses (a Switch-style loss {cite}`fedus2022switch` for
# OLMoE and Qwen, DeepSeek's sequence-wise expert-balance loss), because how evenly the router
# spreads tokens over experts is part of what the audit is about. {glue:md}`coefficients` The
# larger coefficients were chosen because, when these small models were first trained with the
# real ones, the routers in the last layers of the Qwen- and DeepSeek-like models stopped using a
# sizeable share of their experts towards the end of training (those runs are not shipped).
#
# This page documents how the models were trained and how good they are: what data they saw,
# their loss curves, their perplexity against a unigram baseline, how evenly each layer uses
# its experts, and whether training is reproducible from the seed.
#
# ```{important}
# The figures and tables of this book's default run come from these small models. They show
# that the audit's machinery works and what its outputs look like; they are **not** estimates
# of the paper's numbers, and no chapter of this book contains a run of the real checkpoints:
# every comparison with the paper uses its printed tables and the authors' released result
# files. The chapters are written to run on the real checkpoints on a GPU, for example
#
#     make chapter NB=04_audit PARAMS="-p models '[\"allenai/OLMoE-1B-7B-0924\"]' -p dtype bfloat16 -p device cuda"
#
# and likewise with `Qwen/Qwen1.5-MoE-A2.7B` and `deepseek-ai/DeepSeek-V2-Lite`.
# ```

# %% tags=["hide-input"]
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

import moeaudit.models  # noqa: F401  (imports nnsight, which must precede transformers.models.*)
from moeaudit import audit, paths, report
from moeaudit.chapters import default_models
from moeaudit.zoo import REGIME_GAIN_RATIO_MIN, SHIPPED_MODELS, zoo_path

report.use_book_style()
colors = report.model_colors(models)
out_dir = paths.results_dir(results_dir) / "A1_default_models"
out_dir.mkdir(parents=True, exist_ok=True)


def model_dir(name):
    return zoo_path(name) if name in SHIPPED_MODELS else Path(name)


summaries = {m: json.loads((model_dir(m) / "training_summary.json").read_text()) for m in models}
logs = {m: pd.read_csv(model_dir(m) / "training_log.csv") for m in models}

# %% [markdown]
# ## How the models were trained
#
# **Data.** Each model ships with a byte-level BPE tokenizer ({glue:text}`vocab` tokens,
# including an end-of-text and a padding token) trained on the *validation* split of WikiText-2
# {cite}`merity2016pointer`, and the model itself is trained on the same split: every non-empty
# line is tokenized, followed by an end-of-text token, and the concatenated stream is cut into
# {glue:text}`context`-token chunks (a new random offset and order each epoch). The *test* split
# is never seen during training; it is used below only for evaluation, and it is the text the
# audit reads wherever WikiText-2 is available.
#
# **Optimisation.** AdamW with a linear warm-up and a cosine decay of the learning rate, weight
# decay on the weight matrices only, gradient clipping at norm {glue:text}`grad_clip`. The objective is the
# next-token cross-entropy plus the model's load-balancing loss times its coefficient.
# Training runs on one CPU thread with PyTorch's deterministic algorithms and a fixed seed.
# The table lists the settings and costs as recorded by the training run. The models were
# trained on a machine shared with other jobs, so the wall-clock times overstate what an idle
# laptop needs; the processor time is the better guide.

# %% tags=["hide-input"]
recipe = pd.DataFrame({m: default_models.recipe_row(s) for m, s in summaries.items()})
recipe.to_csv(out_dir / "recipe.csv")
display(recipe)

# %% tags=["remove-input"]
first = summaries[models[0]]
arch = {m: s["architecture"] for m, s in summaries.items()}


def _span(key):
    return report.value_span((a.get(key) for a in arch.values()), '{:,}')


glue("stand_ins", Markdown("; ".join(f"`{m}` ({s['class']}, for {s['mirrors']}): routed experts "
                                     f"{recipe.loc['routed experts, top-k', m]}, shared experts "
                                     f"{recipe.loc['shared experts', m]}, layers (of them dense) "
                                     f"{recipe.loc['layers (dense)', m]}" for m, s in summaries.items())), display=False)
glue("scaled_down", Markdown(f"{_span('num_hidden_layers')} layers, hidden size {_span('hidden_size')}, experts "
                             f"{_span('moe_intermediate_size') if any('moe_intermediate_size' in a for a in arch.values()) else _span('intermediate_size')} "
                             f"units wide, a vocabulary of {_span('vocab_size')} tokens and a context of "
                             f"{_span('max_position_embeddings')} tokens"), display=False)
coefs = {m: (s["aux_loss"]["coef"], s["aux_loss"].get("real_coef", s["aux_loss"]["coef"])) for m, s in summaries.items()}
ratios = sorted({round(c / r, 6) for c, r in coefs.values()})
glue("coefficients", Markdown(
    f"The balance-loss coefficients are {' and '.join(f'{x:g}' for x in ratios)} times the real models' ("
    + "; ".join(f"{m}: {c:g}, real {r:g}" for m, (c, r) in coefs.items()) + ")."), display=False)
glue("vocab", int(first["architecture"]["vocab_size"]), display=False)
glue("context", int(first["training"]["context"]), display=False)
glue("grad_clip", first["training"]["grad_clip"], display=False)
tok = {m: s["data"]["train_stream_tokens"] for m, s in summaries.items()}
same_tok = len({(model_dir(m) / "tokenizer.json").read_bytes() for m in models}) == 1
display(Markdown(
    ("The tokenizer training is deterministic, so the models' tokenizers are identical. " if same_tok and len(models) > 1
     else "") +
    f"The validation split is {min(tok.values()):,} tokens long in BPE tokens (WikiText-2, tokenized release); "
    f"the longest run saw it {max(s['training']['epochs'] for s in summaries.values()):.1f} times."))

# %% [markdown]
# ## Loss curves
#
# Training loss per step (thin lines) and its running mean over {glue:text}`window` steps (thick
# lines), in nats per token. The dashed line marks the test-split loss of a unigram model with the same
# tokenizer, the loss of a model that ignores the context; the dotted lines are the trained
# models' test-split losses. The right panel shows the load-balancing loss, divided by the
# value it takes when every expert receives the same share of tokens and of router
# probability (the dashed line: perfectly balanced in that sense).

# %% tags=["hide-input"]
window = 50
glue("window", window, display=False)
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(report.COLUMN_INCHES, 3.8))
for m, log in logs.items():
    s = summaries[m]
    ax.plot(log.step, log.loss, color=colors[m], alpha=0.25, lw=0.7)
    ax.plot(log.step, log.loss.rolling(window, min_periods=1).mean(), color=colors[m], lw=2, label=m)
    ev = s.get("evaluation")
    if ev:
        ax.axhline(ev["model"]["nll"], color=colors[m], ls=":", lw=1.2)
    # balanced value of each loss: top-k for the Switch-style loss (averaged over layers),
    # number of MoE layers for DeepSeek's sequence-wise loss (summed over layers)
    a = s["architecture"]
    balanced = (a["num_hidden_layers"] - a.get("first_k_dense_replace", 0)) if s["aux_loss"]["kind"] == "seq" \
        else a["num_experts_per_tok"]
    ax2.plot(log.step, (log.aux_loss / balanced).rolling(window, min_periods=1).mean(), color=colors[m], lw=2, label=m)
uni = np.mean([s["evaluation"]["unigram_baseline"]["nll"] for s in summaries.values() if "evaluation" in s])
ax.axhline(uni, color="0.3", ls="--", lw=1.2, label="unigram baseline (test)")
ax.plot([], [], color="0.3", ls=":", lw=1.2, label="trained model (test)")
ax.set(xlabel="optimiser step", ylabel="cross-entropy (nats per token)", title="Language-model loss")
ax.legend(frameon=True, framealpha=0.9, edgecolor="none", fontsize=8)
ax2.axhline(1, color="0.3", ls="--", lw=1)
ax2.set(xlabel="optimiser step", ylabel="balance loss / balanced value", title="Load-balancing loss")
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
gap = default_models.generalisation_gap(summaries)
glue("gap_text", Markdown(
    f"The test loss lies {report.value_span(gap.gap, '{:.2f}')} nats above the training loss of the last steps "
    "(mean over the last 50 steps: " + ", ".join(f"{m} {r.train_loss:.2f} vs {r.test_loss:.2f}" for m, r in gap.iterrows())
    + f"). The models saw their {int(gap.training_tokens.min()):,}-token training split "
    + report.value_span(gap.epochs.round(1), "{:.1f}") + " times, "
    "so they fit it better than text they have not seen: a generalisation gap. The audit measures the models on "
    "text they were not trained on, where their loss is the higher one."), display=False)

# %% [markdown]
# {glue:md}`gap_text` Whatever they learnt, the models remain far better than a model that ignores
# the context, as the next section shows.
#
# ## Perplexity against a unigram baseline
#
# Perplexity on the WikiText-2 test split, cut into consecutive {glue:text}`context`-token chunks;
# each chunk is scored on all its tokens after the first, without context from the previous chunk. The baseline is a
# unigram model over the same tokenizer, fitted on the validation split with add-one
# smoothing and scored on exactly the same tokens. A model that has learnt anything about
# context must beat it by a wide margin.

# %% tags=["hide-input"]
ppl = default_models.perplexity_table(summaries)
ppl.to_csv(out_dir / "perplexity.csv")
display(ppl.style.format({"test tokens scored": "{:,}", "perplexity": "{:.1f}", "unigram perplexity": "{:.1f}",
                          "ratio": "{:.3f}", "loss (nats)": "{:.3f}", "unigram loss (nats)": "{:.3f}"}))
display(Markdown(
    "Perplexities computed with different tokenizers are not comparable (a larger vocabulary makes each "
    "prediction harder and each token longer), which is why the baseline uses the model's own tokenizer; "
    "these numbers cannot be compared with published perplexities of the real checkpoints."))

# %% [markdown]
# ## From the test split to the text the book audits
#
# The chapters do not score the test split in chunks: they read the first {glue:text}`n_texts_audit`
# lines longer than {glue:text}`min_chars_audit` characters of their corpus, each from its own start and cut to the model's
# context. The table puts the two side by side, and beside them the embedded corpus that a build
# without WikiText-2 reads, in the form the models were trained on (WikiText-2's tokenized form). Each
# loss is compared with a unigram model fitted to the very tokens it is scored on: the gain is what
# the model takes from context on that text. A model audited on text it cannot read would show a
# gain near zero there, and its expert effects would describe a model that predicts token
# frequencies. The quality gate asks the embedded corpus's gain to be at least
# {glue:text}`regime_gate` of the WikiText-2 gain.

# %% tags=["hide-input"]
audited_regime = {}
for m in models:
    path = str(model_dir(m))
    ctx = audit.prepare(path, corpus=corpus_source, text_form=text_form, data_dir=data_dir,
                        results_dir=results_dir, progress=False)
    audited_regime[m] = audit.corpus_regime(ctx)
regimes = default_models.regime_table(summaries, audited_regime)
regimes.to_csv(out_dir / "regime.csv")
display(regimes.T.style.format("{:.3f}"))  # one column per model
glue("n_texts_audit", int(next(iter(audited_regime.values()))["n_texts"]), display=False)
glue("min_chars_audit", int(ctx.corpus.meta["min_chars"]), display=False)
glue("regime_gate", REGIME_GAIN_RATIO_MIN, display=False)
glue("regime_text", Markdown(report.regime_connection_text(regimes, corpus_source.describe())), display=False)

# %% [markdown]
# {glue:md}`regime_text`

# %% [markdown]
# ## Expert utilisation
#
# For every MoE layer, the share of the routing mass each routed expert receives on the test
# split: the sum over all tokens of the gate weight the router gives the expert when it selects
# it, divided by the layer's total. With perfectly even routing every expert would receive
# {glue:md}`even_share`. The colour scale is logarithmic and shared by the panels and runs from
# {glue:text}`vmin_pct`% (smaller shares get the darkest colour) upwards; experts are in their
# index order. A collapsed router would show as a few bright cells in an otherwise dark row; the
# acceptance criterion for the shipped models is that in every layer at least
# {glue:text}`accept_frac:.0%` of the experts receive at least {glue:text}`usage_threshold:.1%` of
# the mass. {glue:md}`dense_note`

# %% tags=["hide-input"]
from moeaudit.zoo import MIN_FRAC_USED, USAGE_THRESHOLD  # noqa: E402

n_exp = {m: (a.get("num_experts") or a.get("n_routed_experts")) for m, a in arch.items()}
glue("even_share", Markdown(", ".join(f"1/{n} ({1 / n:.1%}) in {m}" for m, n in n_exp.items())), display=False)
glue("accept_frac", MIN_FRAC_USED, display=False)
glue("usage_threshold", USAGE_THRESHOLD, display=False)
dense = {m: a.get("first_k_dense_replace", 0) for m, a in arch.items() if a.get("first_k_dense_replace", 0)}
glue("dense_note", Markdown(" ".join((f"The first layer of `{m}` is dense" if k == 1 else f"The first {k} layers of "
                                      f"`{m}` are dense") + ", as in its real counterpart, without a router."
                                     for m, k in dense.items())), display=False)


shares = {m: default_models.routing_mass_shares(s) for m, s in summaries.items()}
vmin_pct = 0.1
glue("vmin_pct", vmin_pct, display=False)
fig = report.routing_share_heatmaps(shares, vmin=vmin_pct)
plt.show()

# %% tags=["hide-input"]
util_table = default_models.utilisation_table(summaries)
util_table.to_csv(out_dir / "utilisation.csv")
display(util_table.style.format({c: "{:.2%}" if "share" in c else "{:.1%}" for c in util_table.columns if "share" in c or "≥" in c}
                                | {"effective number of experts": "{:.1f}"}))
worst = util_table.iloc[:, 1].min()
display(Markdown(
    (f"Every routed expert of every MoE layer receives at least {USAGE_THRESHOLD:.1%} of the routing mass" if worst == 1
     else f"In every MoE layer at least {worst:.0%} of the routed experts receive at least {USAGE_THRESHOLD:.1%} of the "
     "routing mass") +
    f" (the acceptance threshold for the shipped models is {MIN_FRAC_USED:.0%} of the experts in every layer). The *effective number "
    "of experts* is the exponential of the entropy of the shares: it equals the number of experts when routing is "
    "perfectly even."))

# %% [markdown]
# ## Reproducibility
#
# Each model was trained a second time from the same seed on the same machine, and the two
# loss curves were compared step by step. The left panel overlays the original curve (solid)
# and the rerun (dashed); the right panel shows their absolute difference at every step.

# %% tags=["hide-input"]
repro, curves = default_models.reproducibility_table(summaries, {m: model_dir(m) for m in models})
if curves:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(report.COLUMN_INCHES, 3.6))
    for m, c in curves.items():
        ax.plot(c.step, c.loss_shipped.rolling(50, min_periods=1).mean(), color=colors[m], lw=2, label=f"{m}")
        ax.plot(c.step, c.loss_rerun.rolling(50, min_periods=1).mean(), color="black", lw=1, ls="--")
        ax2.plot(c.step, c.abs_diff, color=colors[m], lw=1.5, label=m)
    ax.plot([], [], color="black", lw=1, ls="--", label="rerun, same seed")
    ax.set(xlabel="optimiser step", ylabel="training loss (nats, running mean)", title="Original and rerun")
    ax.legend(frameon=False, fontsize=8)
    top = max(float(c.abs_diff.max()) for c in curves.values())
    ax2.set_ylim(-0.05 * max(top, 1e-6), max(top, 1e-6) * 1.05)
    if top == 0:
        ax2.text(0.5, 0.55, "identical at every step\n(difference exactly 0)", transform=ax2.transAxes,
                 ha="center", va="center", fontsize=11, color="0.3")
    ax2.set(xlabel="optimiser step", ylabel="|loss difference| (nats)", title="Absolute difference per step")
    ax2.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    plt.show()
    repro.to_csv(out_dir / "reproducibility.csv")
    display(repro.style.format({"max |loss difference|": "{:.3g}", "max |weight difference|": "{:.3g}",
                                "rerun time (min)": "{:.1f}"}))
    display(Markdown(
        "A difference of exactly zero means the rerun is bit-for-bit identical. This holds for the same software "
        "versions, thread count and processor type; on other hardware, floating-point results may differ in the "
        "last bits and the curves then agree only approximately."))
else:
    display(Markdown("No reproducibility record was found for these models."))

# %% [markdown]
# ## What the models predict
#
# To make the numbers above concrete: the start of the first long paragraph of the evaluation
# corpus, and each model's five most probable next tokens after it.

# %% tags=["hide-input"]
from transformers.utils import logging as hf_logging  # noqa: E402

from moeaudit.corpus import resolve_text_form, select_texts  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
prompt = " ".join(select_texts(list(corpus_source.lines), n_texts=1,
                               text_form=resolve_text_form(corpus_source, text_form))[0].split()[:24])
display(Markdown(f"From {corpus_source.describe()}:\n\n> {prompt.replace('&', '&amp;').replace('<', '&lt;')} …"))
display(pd.DataFrame({m: default_models.top_next_tokens(model_dir(m), prompt) for m in models}).T.rename_axis("model"))

# %% [markdown]
# ## Using the models
#
# The models are ordinary Hugging Face checkpoints inside the `moeaudit` package and load
# without a network connection:
#
# ```python
# from transformers import AutoModelForCausalLM, AutoTokenizer
# from moeaudit.zoo import zoo_path
#
# model = AutoModelForCausalLM.from_pretrained(zoo_path("tiny-olmoe"))
# tokenizer = AutoTokenizer.from_pretrained(zoo_path("tiny-olmoe"))
# ```
#
# Every chapter accepts the short names (`tiny-olmoe`, `tiny-qwen-moe`, `tiny-deepseek-v2`)
# wherever it accepts a model, and each model's directory holds its model card (`README.md`),
# training log and summary. A model is retrained, bit for bit, with
#
# ```bash
# .venv/bin/python -m moeaudit.tooling.training tiny-olmoe --seed 0
# ```
#
# ({glue:md}`train_cpu` of processor time for the shipped models; `--out DIR` writes elsewhere,
# `--steps N` shortens the run),
# and `.venv/bin/python scripts/check_reproducibility.py` retrains all three and compares them with the
# shipped ones.
#
# ## What this shows, and what it does not
#
# **Shows.** How the default models were made and that they are usable stand-ins for the
# audit's machinery: they predict text far better than a unigram model, every layer's router
# spreads its mass over its experts, and training is reproducible from the seed.
#
# **Does not show.** Anything about the real checkpoints. The small models have the routing
# structure of the real ones but not their depth, width, data or training budget; they were
# trained for several epochs on a small split and fit it better than unseen text. Nothing in this
# book's default run says how the real models behave, and no chapter contains a run of them.
#
# ## Exercises
#
# ````{exercise} 1. Another seed
# :label: A1_default_models-ex1
# :nonumber:
#
# Train a model from another seed into a folder of your own and audit it:
# `.venv/bin/python -m moeaudit.tooling.training tiny-olmoe --seed 1 --out /tmp/tiny-olmoe-seed1`, then
# `make chapter NB=04_audit PARAMS="-p models '[\"/tmp/tiny-olmoe-seed1\"]'"`. Predict its test
# perplexity and how far the audit's $d_z$ values move.
# ````
#
# ````{solution} A1_default_models-ex1
# :class: dropdown
#
# The test perplexity should stay close to the shipped model's ({glue:text}`ppl_first:.1f`) and far
# below the unigram baseline, since only the seed changes; the audit's individual $d_z$ values can
# move by amounts comparable to their confidence intervals, because a different seed trains
# different experts — that spread is the uncertainty a single trained model does not show.
# ````
#
# ````{exercise} 2. Check reproducibility
# :label: A1_default_models-ex2
# :nonumber:
#
# Predict the largest loss difference between two trainings from the same seed, then run
# `.venv/bin/python -m moeaudit.tooling.training tiny-olmoe --check-repro`.
# ````
#
# ````{solution} A1_default_models-ex2
# :class: dropdown
#
# The largest loss difference over the {glue:text}`steps_first` steps is exactly zero on a machine
# like the one that trained the shipped models; on other processors it may differ in the last
# bits.
# ````

# %% tags=["remove-input"]
glue("ppl_first", summaries[models[0]]["evaluation"]["model"]["perplexity"], display=False)
cpu_min = [s["training"]["cpu_s"] / 60 for s in summaries.values() if "cpu_s" in s["training"]]
glue("train_cpu", Markdown(f"{report.value_span([round(m, 1) for m in cpu_min], '{:.1f}')} minutes" if cpu_min
                           else "minutes"), display=False)
glue("steps_first", f'{summaries[models[0]]["training"]["steps"]:,}', display=False)

# %% [markdown]
# ## The redundancy family
# The redundancy chapter of "Beyond the paper" audits a family of small `OlmoeForCausalLM` models that
# differ in routing. Each is trained with the recipe of `tiny-olmoe` (data, tokenizer,
# width, steps, learning-rate schedule, balance-loss coefficient) at {glue:md}`family_depth`, with
# its routed experts and top-k changed, from the seed in its name. They pass the same quality
# gates as the default models, checked before anything is written: {glue:md}`family_gates`. Of
# them, {glue:md}`family_repro`. Each directory holds its model card, training log and summary,
# like the default models; the two tables collect them, size and cost first, then quality. Besides
# the routing, the active parameters per token grow with top-k and the small expert pool has fewer
# parameters in total (columns "parameters" and "active per token").

# %% tags=["hide-input"]
family_summaries = {m: json.loads((model_dir(m) / "training_summary.json").read_text()) for m in family}
fam = default_models.family_table(family_summaries)
if family_summaries:
    fam.to_csv(out_dir / "redundancy_family.csv")
    formats = {"worst layer: experts used": "{:.0%}", "test perplexity": "{:.1f}", "parameters (M)": "{:.2f}",
               "active per token (M)": "{:.2f}", "processor time (min)": "{:.1f}", "weights (MB)": "{:.2f}",
               "ratio to unigram": "{:.3f}", "effective experts (mean over layers)": "{:.1f}",
               "retrained: max |weight difference|": "{:.3g}"}
    size = ["routed experts", "top-k", "seed", "parameters (M)", "active per token (M)", "weights (MB)",
            "processor time (min)"]
    for part, caption in ((size, "Size and cost"), ([c for c in fam.columns if c not in size], "Quality")):
        display(fam[part].style.format({c: f for c, f in formats.items() if c in part}, na_rep="not checked")
                .set_caption(caption))
for key, text in default_models.family_texts(family_summaries, fam).items():
    glue(key, Markdown(text), display=False)
if family_summaries:  # the family's regime on the embedded corpus, as for the default models (model cards)
    display(Markdown("The same measurement of each family model's regime (its model card), as in the section on "
                     "the text the book audits:"))
    display(default_models.regime_table(family_summaries).style.format("{:.3f}"))
