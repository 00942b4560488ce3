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
# # A2. Departures from the paper's protocol
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - list where this build departs from the paper's protocol and from the released code;
# - find, for each departure, the value this build uses and the parameter that changes it.
# :::

# %% tags=["parameters", "hide-input"]
chapter = "04_audit"  # the chapter whose default parameters define "this build"
corpus = "auto"  # as in the chapters: "auto", "wikitext-2", "embedded", or a text file
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)

# %% tags=["hide-input"]
from moeaudit import report
from moeaudit.tooling import params

params.validate("A2_departures", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir)
report.glue_values(reading_minutes=report.chapter_reading_minutes("A2_departures"))

# %% [markdown]
# A reproduction is only as useful as its list of differences. This page gathers in one table
# every point where this book's default build departs from the protocol of the paper
# {cite}`engmann2026audit` or from what the authors' released code does
# {cite}`engmann2026code`: the ablation definition, the draw of token positions, the audited
# layers and the size of the correction family, the models, the context length, the corpus and
# its form, the definitions of the observational metrics, the statistics and the numerical
# precision. The column *this build* is computed from the parameters the audit chapter runs
# with by default, the shipped models' configurations and the corpus actually found, so it
# changes when they change.

# %% tags=["hide-input"]
import json
from pathlib import Path

from IPython.display import Markdown, display
from myst_nb import glue
from transformers import AutoConfig

import moeaudit.models  # noqa: F401  (imports nnsight, which must precede transformers.models.*)
from moeaudit import audit, report
from moeaudit.tooling import book
from moeaudit.metrics import METRICS
from moeaudit.models import PAPER_LAYERS, layout_from_config, resolve_model_path

report.use_book_style()
params = book.notebook_parameters(chapter)
configs = {m: AutoConfig.from_pretrained(resolve_model_path(m)) for m in params["models"]}
layouts = {m: layout_from_config(c) for m, c in configs.items()}
audited = {m: (params["layers"] if params["layers"] is not None else  # the rule of AuditModel.audit_layers
               list(PAPER_LAYERS.get(m, ())) or lay.depth_proportional_layers(5)) for m, lay in layouts.items()}
contexts = {m: int(min(512, c.max_position_embeddings)) if params["max_tokens"] is None else int(params["max_tokens"])
            for m, c in configs.items()}

# %% tags=["hide-input"]
n_parameters = {}
for m in params["models"]:
    summary = Path(resolve_model_path(m)) / "training_summary.json"  # shipped models record their size
    n_parameters[m] = json.loads(summary.read_text())["parameters"]["total"] if summary.is_file() else None
regimes = {}  # each model's loss on the audited text, and on its training distribution where its card records it
for m in params["models"]:
    ctx = audit.prepare(m, corpus=corpus_source, text_form=params["text_form"], n_texts=params["n_texts"],
                        max_tokens=params["max_tokens"], dtype=params["dtype"], device=params["device"],
                        data_dir=data_dir, results_dir=params["results_dir"], progress=False)
    summary = Path(resolve_model_path(m)) / "training_summary.json"
    recorded = json.loads(summary.read_text()).get("regime", {}) if summary.is_file() else {}
    regimes[m] = (audit.corpus_regime(ctx), recorded.get("wikitext-2"))
table = report.protocol_departures(params=params, corpus_source=corpus_source, audited=audited,
                                   n_moe_layers={m: len(lay.moe_layers) for m, lay in layouts.items()},
                                   contexts=contexts, n_parameters=n_parameters, n_metrics=len(METRICS),
                                   regimes=regimes)
glue("n_aspects", len(table), display=False)
glue("ex_corpus", Markdown("Nothing changes, because this build already reads the embedded corpus; with WikiText-2 "
                           "available, only the corpus row changes" if corpus_source.name == "embedded" else
                           "Only the corpus row changes, and it names the embedded corpus"), display=False)

# %% [markdown]
# ## The table
# {glue:text}`n_aspects` aspects of the protocol. Where the released code and the paper disagree,
# the chapter on the released results shows the evidence in the authors' own records; where
# this build differs from both, the chapters listed in the next section measure what the
# difference changes. "Not stated" means the paper's text does not say.

# %% tags=["hide-input"]
display(table.set_index("aspect").style.format(escape="html").set_properties(**{"text-align": "left", "white-space": "pre-wrap",
                                                           "font-size": "0.85em"}))

# %% [markdown]
# ## Where each difference is measured
#
# - **Ablation definition**: the chapter on intervention definitions runs the audit under both
#   definitions and compares every cell.
# - **Shared position draw**: sharing positions makes the metrics of a cell comparable with
#   each other; the released files' own draws are re-analysed in the chapter on the released
#   results.
# - **Layers, family size, models, context**: consequences of running on small stand-in models
#   by default (see the appendix on the default models); on the real checkpoints the same
#   chapters use the paper's layers, family and context (this build contains no such run).
# - **Metric definitions**: the intervention-definitions chapter audits the released recipes
#   beside the paper's definitions.
# - **Precision**: the intervention-definitions chapter measures how often half precision
#   changes the sign of a single-expert effect.
# - **Evaluation text vs training distribution**: each model's loss on the audited text beside its
#   loss on the text it was trained to predict (WikiText-2 test, recorded in its model card), both
#   against a unigram model fitted to the same tokens. An audit on text the model cannot read
#   measures a model that predicts token frequencies; every audit chapter states this figure for
#   each model it runs and warns when the gain is small.
#
# ## What this shows, and what it does not
#
# **Shows.** Every place where a number in this book could differ from the paper's for a
# reason other than chance, with the value this build uses.
#
# **Does not show.** How much each difference moves the results: that is measured in the
# chapters named above, one difference at a time.
#
# ## Exercises
#
# ````{exercise} 1. Another corpus
# :label: A2_departures-ex1
# :nonumber:
#
# Predict which rows of the table change with the embedded corpus, then run
# `make chapter NB=A2_departures PARAMS="-p corpus embedded"`.
# ````
#
# ````{solution} A2_departures-ex1
# :class: dropdown
#
# {glue:md}`ex_corpus`.
# ````
#
# ````{exercise} 2. Another chapter
# :label: A2_departures-ex2
# :nonumber:
#
# Predict what the table says for the routing-weight control chapter, then run
# `make chapter NB=A2_departures PARAMS="-p chapter 05_routing_weight_control"`.
# ````
#
# ````{solution} A2_departures-ex2
# :class: dropdown
#
# The table is unchanged, because the control chapter runs with the same positions, layers and
# models as the audit.
# ````
