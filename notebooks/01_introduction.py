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
# # From observation to intervention
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - tell observing a router (rung 1 of Pearl's ladder) from intervening on it (rung 2);
# - follow one expert's removal at one token through a model's forward pass, and the loss change it causes;
# - choose a path through the book for what you want to learn.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe"]  # the example uses the first model: shipped name, HF id or local dir
layer = None  # None: the model's last MoE layer
seq_id = 0  # which evaluation text
t = None  # None: the middle position of that text
n_texts = 10  # texts loaded for the example (only seq_id is used)
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("01_introduction", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("01_introduction"))

# %% [markdown]
# This book reproduces, as executable chapters, the paper *From Observation to Intervention:
# A Causal Audit of Expert Importance in Mixture-of-Experts Models* {cite}`engmann2026audit`.
# Every number, table and figure on these pages is computed when the page is
# executed. Where a chapter sets its results beside the paper's, the paper's numbers are read
# from its printed tables (entered once in the library) or from the authors' released result
# files, and are labelled as the paper's.
#
# ## The question
#
# A Mixture-of-Experts (MoE) layer replaces the dense feed-forward block of a transformer by
# $N$ experts $E_1,\dots,E_N$ and a router. For the hidden state $\mathbf{x}_t$ at token
# position $t$ the router scores every expert, keeps the $k$ best, and the layer returns
#
# $$\mathbf{y}_t = \sum_{i \in \text{top-}k} g_i(\mathbf{x}_t)\, E_i(\mathbf{x}_t),
# \qquad g_i(\mathbf{x}_t) = \operatorname{softmax}(W_g \mathbf{x}_t)_i .$$
#
# Methods that prune or merge experts must decide which experts the model can do without.
# They usually decide from statistics of the router and the experts observed on a corpus:
# how often an expert is selected (*utilization rate*), how large its outputs are (*activation
# norm* and its spread, *activation std*), how much weight the router gives it when it is
# selected (*mean routing weight*). The tacit assumption is that these observed quantities
# predict what would happen if the expert were removed.
#
# The paper tests that assumption directly. At individual token positions it removes one
# active expert at a time and measures how much the model's next-token loss changes. If a
# metric identifies important experts, then among the experts active at a token, the one
# the metric ranks highest should hurt more when removed than the one it ranks lowest
# (the paper's Definition 2.1). In the paper, no metric passes its corrected test (Bonferroni
# within each model, with the t and Wilcoxon tests agreeing) at any audited layer of three large
# MoE models, and {glue:md}`paper_control_intro`. A test that does not pass is not evidence of no effect unless the design could have seen
# one; the audit chapter states, for every run, how large an effect it could detect and whether it
# could show an effect to be small (each of these statistics is worked once in its
# {ref}`statistics primer <stats-primer>`).
#
# ## Two rungs of Pearl's ladder
#
# Pearl's hierarchy {cite}`pearl2009causality,bareinboim2022hierarchy` separates questions by the
# evidence they need. **Rung 1, association**
# ("seeing") asks what we observe together: which experts the router selects at a token,
# and with what weight. **Rung 2, intervention** ("doing") asks what happens if we *set* part
# of the system: if expert $e$'s contribution at token $t$ is removed, how does the model's
# prediction change? The two answers coincide only if the observed quantities track the
# mechanism that produces the output, which is what is being tested. Removing expert $e$
# at $t$ replaces the layer output by
#
# $$\mathbf{y}_t^{(-e)} = \mathbf{y}_t - g_e(\mathbf{x}_t)\,E_e(\mathbf{x}_t),$$
#
# leaving the other experts' weights as they are (no renormalisation), and its functional
# importance is the loss change
# $\Delta\mathcal{L}_e^{(t)} = \mathcal{L}_t^{(-e)} - \mathcal{L}_t$ with
# $\mathcal{L}_t = -\log p_\theta(x_{t+1}\mid x_{\le t})$ in nats.
#
# The cells below make the two rungs concrete on one token of one model.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from moeaudit import report
from moeaudit.audit import prepare
from moeaudit.engine import run_ablations

report.use_book_style()

# %% [markdown]
# ## One token, seen and intervened on
#
# The model below is loaded, the first texts of the evaluation corpus (named in the box at the
# top of this page) are run through it once (the *clean pass*, which records at every token which experts the router
# selected and with what weight), and one token position is picked.

# %%
name = models[0]
ctx = prepare(name, n_texts=n_texts, dtype=dtype, device=device, remote=remote, corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
lay = ctx.model.layout
L = lay.moe_layers[-1] if layer is None else int(layer)
lay.check_layer(L)
n_tok = int(ctx.corpus.lengths[seq_id])
t_ex = n_tok // 2 if t is None else int(t)
if not 0 <= t_ex <= n_tok - 2:
    raise ValueError(f"t={t_ex} is out of range for text {seq_id} of {n_tok} tokens: use 0 <= t <= {n_tok - 2}")
ids = ctx.corpus.sequences[seq_id]
clean_loss = float(ctx.clean.tokens.loss.iloc[ctx.clean.row(seq_id, t_ex)])  # the clean pass's loss at t, nats

# %% tags=["remove-input"]
display(Markdown(audit.regime_line(name, ctx)))
tok = ctx.model.tokenizer


def _show(text: str) -> str:  # as plain text inside Markdown: no code spans, no line breaks, "<unk>" visible
    return text.replace("`", "'").replace("\n", " ").replace("&", "&amp;").replace("<", "&lt;")


context = _show(tok.decode(ids[max(0, t_ex - 40):t_ex]))
current = _show(tok.decode(ids[t_ex:t_ex + 1]))
target = _show(tok.decode(ids[t_ex + 1:t_ex + 2]))
display(Markdown(
    f"**Model** `{name}` ({lay.family}): {lay.n_layers} layers, {len(lay.moe_layers)} of them MoE, "
    f"{lay.num_experts} routed experts per MoE layer, top-{lay.top_k}"
    + (f", {lay.n_shared_experts} shared expert(s) that are never ablated" if lay.n_shared_experts else "")
    + f". **Layer** {L}. **Text** {seq_id}, position t = {t_ex} of {n_tok} tokens.\n\n"
    f"> …{context}<strong>⟦{current}⟧</strong> → next token <code>{target}</code>\n\n"
    f"The model assigns the true next token probability {np.exp(-clean_loss):.3g} "
    f"(loss {clean_loss:.3f} nats)."))

# %% [markdown]
# **Rung 1 (what the router says).** The clean pass already holds the router's view of this
# token: the $k$ selected experts and their routing weights $g_e(\mathbf{x}_t)$.
#
# **Rung 2 (what happens when we intervene).** Each selected expert is now removed on its
# own, at this token only, and the next-token loss is measured again. One request per
# expert; the engine runs them as one batch together with an un-ablated row, so the clean
# loss and the ablated losses come from the same forward computation.

# %%
active = ctx.clean.active(seq_id, t_ex, L)
requests = pd.DataFrame({"seq_id": seq_id, "t": t_ex, "layer": L, "removed": [[int(e)] for e in active]})
token_rec = run_ablations(ctx.model, ctx.corpus, ctx.clean, requests, mode="token", progress=False)
seq_rec = run_ablations(ctx.model, ctx.corpus, ctx.clean, requests, mode="sequence", progress=False)

example = pd.DataFrame({
    "expert": [r[0] for r in token_rec.removed],
    "g": [p[0] for p in token_rec.removed_probs],
    "combine weight": [w[0] for w in token_rec.removed_weights],
    "gap norm": token_rec.gap_norm.to_numpy(),
    "ΔL token": token_rec.delta_loss.to_numpy(),
    "ΔL sequence": seq_rec.delta_loss.to_numpy(),
}).sort_values("g", ascending=False).reset_index(drop=True)
example.insert(1, "router rank", np.arange(1, len(example) + 1))
example.insert(len(example.columns) - 1, "ablation rank",
               example["ΔL token"].rank(ascending=False, method="first").astype(int))

# %% tags=["remove-input"]
show_combine = not np.allclose(example["g"], example["combine weight"])
cols = [c for c in example.columns if c != "combine weight" or show_combine]
display(example[cols].style.format({"g": "{:.3f}", "combine weight": "{:.3f}", "gap norm": "{:.3f}",
                                    "ΔL token": "{:+.4f}", "ΔL sequence": "{:+.4f}"})
        .background_gradient(subset=["ΔL token"], cmap="RdBu_r", vmin=-example["ΔL token"].abs().max(),
                             vmax=example["ΔL token"].abs().max())
        .hide(axis="index")
        .set_caption(f"{name}, layer {L}, text {seq_id}, t = {t_ex}: the {lay.top_k} active experts"))
display(Markdown(
    "Rows are the active experts, sorted by the router's weight. `g` is the softmax router "
    "probability $g_e(\\mathbf{x}_t)$ (rung 1). "
    + ("`combine weight` is the factor the layer actually multiplies the expert's output by "
       "(after the model's renormalisation or scaling of the top-k weights); it is what the "
       "ablation sets to zero. " if show_combine else
       "For this model the layer multiplies each expert's output by exactly $g_e$, so zeroing "
       "that factor is the ablation. ")
    + "`gap norm` is $\\lVert \\mathbf{y}_t - \\mathbf{y}_t^{(-e)}\\rVert_2$, how far the removal moves the "
    "layer output. `ΔL token` is the loss change in nats when the expert is removed at t only "
    "(rung 2; positive: the prediction gets worse); `ablation rank` orders the experts by it. "
    "`ΔL sequence` removes the expert at every position up to t where it is routed (see below)."))

# %% tags=["hide-input"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(report.COLUMN_INCHES, 0.45 * len(example) + 1.8), sharey=True)
ylab = [f"expert {e}" for e in example.expert]
pal = plt.rcParams["axes.prop_cycle"].by_key()["color"]
ax1.barh(ylab, example["g"], color=pal[0])
ax1.invert_yaxis()
ax1.set_xlabel("routing weight $g_e(x_t)$\n(probability)", fontsize=10)
ax1.set_title("Rung 1: what the router says")
ax2.barh(ylab, example["ΔL token"], color=[pal[3] if v > 0 else pal[2] for v in example["ΔL token"]])
ax2.axvline(0, color="0.3", linewidth=0.8)
ax2.set_xlabel("loss change when removed,\n$\\Delta\\mathcal{L}$ (nats)", fontsize=10)
ax2.set_title("Rung 2: what removing it does")
fig.suptitle(f"{name}, layer {L}, one token (text {seq_id}, t = {t_ex})", fontsize=11)
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
display(Markdown(report.one_token_text(example)))

# %% tags=["hide-input"]
from myst_nb import glue

from moeaudit.paper import paper_control_notes

glue("paper_control_intro", Markdown(paper_control_notes()["intro"]), display=False)

# %% [markdown]
# ## The intervention, written out
#
# Every ablation in this book is the same few lines inside an nnsight trace
# {cite}`fiottokaufman2025nnsight`. The MoE block of a layer calls its routed experts with the
# hidden states of every token row, the indices of the experts the router selected for each row, and
# the combine weights it will multiply each selected expert's output by. Reading that call's inputs,
# setting the combine weight of expert $e$ to zero on the row of token $t$, and writing them back
# makes the block output at $t$ lose exactly $g_e(\mathbf{x}_t)\,E_e(\mathbf{x}_t)$; nothing else
# in the forward pass is touched. Where the block and its experts sit differs between model families;
# the family registry names them (`ctx.model.layout.spec`), so the same lines run on every audited
# family. One family (`llama4_text`) has a router that instead returns a dense score per expert that
# scales the expert's *input*; there the score of $e$ is zeroed. The cell below does this for the router's
# top expert at the token above and reads the next-token loss.

# %% tags=["intervention-written-out"]
e = int(example.expert.iloc[0])                      # the router's top expert at token t
spec = ctx.model.layout.spec                         # where this family keeps its router and experts
block = ctx.model.nn_block(L)                        # the MoE block of layer L, seen through nnsight
prefix = torch.as_tensor(ids[: t_ex + 1])[None]      # the text up to and including token t
with torch.no_grad(), ctx.model.nn.trace(input_ids=prefix):
    if spec.combine_site == "experts_input":         # experts(hidden, top_k_index, top_k_weights)
        experts = getattr(block, spec.experts)
        (hidden, index, weights, *rest), kwargs = experts.inputs  # one row per token of the prefix
        row_t = torch.zeros_like(index, dtype=torch.bool)
        row_t[t_ex] = True                           # only the row of token t ...
        experts.inputs = ((hidden, index, weights.masked_fill((index == e) & row_t, 0.0), *rest), kwargs)  # ... loses e
    else:                                            # llama4_text: router scores (tokens, experts) scale the inputs
        router = getattr(block, spec.router)
        scores, router_logits = router.output
        cell = torch.zeros_like(scores, dtype=torch.bool)
        cell[t_ex, e] = True                         # expert e on the row of token t
        router.output = (scores.masked_fill(cell, 0.0), router_logits)
    next_token_logits = ctx.model.nn.output.logits[0, t_ex].save()
ablated_loss = torch.nn.functional.cross_entropy(next_token_logits[None].float(), torch.tensor([int(ids[t_ex + 1])]))

# %% tags=["remove-input"]
by_trace = float(ablated_loss) - clean_loss
by_engine = float(token_rec.delta_loss[[r[0] == e for r in token_rec.removed]].iloc[0])
display(Markdown(
    f"Removing expert {e} at token t by hand gives ΔL = {by_trace:+.6f} nats; the batched engine "
    f"(`run_ablations`, many positions per forward against a key/value cache) gave {by_engine:+.6f} nats for the "
    + ("same request: identical. " if by_trace == by_engine else
       f"same request, a difference of {abs(by_trace - by_engine):.1e} nats (floating-point rounding between a "
       "batched step and a single prefix). ")
    + "`engine.trace_ablation` is this cell as a library function, in both "
    "ablation modes, and the test suite checks it against the engine on every supported model family."))

# %% [markdown]
# One token proves nothing either way: a weight that predicts the loss change at one token
# may fail at the next. The audit therefore repeats this comparison at hundreds of sampled
# positions and asks whether $D$ is reliably positive. Note also that the routing weight
# shown here is computed for this very token. The pruning metrics are one number per expert,
# computed over the whole corpus (the audited tokens included) and not conditioned on the token at
# hand. The paper's per-token routing-weight control (chapter 5) runs the same test with this
# token-level weight. It is a positive check, read as chapter 5 reads it: a pass at the control's
# own Bonferroni level shows nothing about the audit; a pass at the audit's stricter per-cell level
# shows that effects of that size exist, which the audit's test then detects only with the
# probability its power at that size gives. It is not an upper bound on what a routing-derived metric could achieve: a
# population statistic can happen to order a token's experts better, and chapter 5 reports, on
# each run, whether one does.
#
# ## Two ways to intervene
#
# The paper defines the ablation at the token: expert $e$ is removed at position $t$ only,
# and everything before $t$ is computed by the intact model (**token mode**, the book's
# default). The authors' released code instead zeroes the expert wherever it is routed in
# the sequence, so the loss at $t$ also reflects the expert's absence at earlier positions,
# which reaches $t$ through attention (**sequence mode**). The two coincide at the last
# layer, where nothing later can attend to the changed positions, and can differ anywhere
# earlier. Every chapter that ablates takes a `mode` parameter, so either definition can be
# audited; the verification chapter shows how to tell them apart, and chapter 9 compares
# the audit's results under both.

# %% tags=["remove-input"]
gap = float(np.max(np.abs(example["ΔL token"] - example["ΔL sequence"])))
is_last = L == lay.n_layers - 1
display(Markdown(
    f"For the token above, the largest difference between the two definitions over the "
    f"{len(example)} experts is {gap:.2e} nats"
    + (f": layer {L} is the model's last layer, so the two must agree up to floating-point rounding."
       if is_last else
       f": layer {L} is followed by {lay.n_layers - 1 - L} more layer(s), through which the removal at "
       "earlier positions reaches t.")))

# %% [markdown]
# ## How to read this book
#
# Three paths lead through the book. Each lists its chapters in the order of the table of contents,
# with the reading time of their prose at {glue:text}`reading_wpm` words per minute, the mean silent
# reading rate for non-fiction {cite}`brysbaert2019read` (tables, figures and computed sentences are
# not counted, so a first reading takes longer):
#
# ```{glue:md} reading_paths
# :format: myst
# ```
#
# Every chapter ends with exercises. Their solutions are hidden until you open them: predict first,
# then look. An exercise that asks you to compute a number names a function, such as
# `check_04_audit_1(answer, ...)`, that says whether your answer is right or how far off it is; run
# it in the notebook that the page's download button gives, after running the notebook's cells.
# The chapters, part by part, with what each one teaches:
#
# ```{glue:md} chapter_table
# :format: myst
# ```
#
# The book runs by default on three small MoE models shipped with it, built with the same
# model classes as OLMoE-1B-7B-0924, Qwen1.5-MoE-A2.7B and DeepSeek-V2-Lite (routed and
# shared experts, top-k, routing and scaling rules) so that every chapter executes on a
# laptop CPU in seconds to minutes. Their numbers describe those small models, not the
# paper's checkpoints. The chapters are written to run unchanged on the real checkpoints given a
# GPU (this build contains no such run), and chapter 8 works directly with the authors'
# released results.
#
# %% tags=["hide-input"]
from moeaudit.chapters import introduction

report.glue_values(reading_paths=introduction.reading_paths_text(introduction.reading_paths_table()),
                   chapter_table=introduction.chapters_text(), reading_wpm=report.READING_WPM, as_markdown=True)

# %% [markdown]
# ## Re-running a chapter
#
# Every chapter starts with a cell of parameters. To execute one chapter with other values
# and rebuild the HTML:
#
# ```bash
# make chapter NB=04_audit PARAMS="-p models '[\"tiny-olmoe\"]' -p n_positions 50"
# ```
#
# and to execute every chapter with its defaults and build the whole book:
#
# ```bash
# make book
# ```
#
# Parameter values are read as YAML (`50` is a number, `'["a", "b"]'` a list, `null` is
# None). Models are given as shipped names, Hugging Face ids (e.g.
# `'["allenai/OLMoE-1B-7B-0924"]'` with `-p device cuda -p dtype bfloat16`) or local
# directories. The `corpus` parameter names the evaluation text: `"auto"` (the default) reads
# WikiText-2 from `$MOEAUDIT_DATA_DIR` (or the `data_dir` parameter) or from the Hugging Face
# hub, and otherwise the corpus of original prose shipped with the project, whose numbers are
# illustrative; `"wikitext-2"` insists on WikiText-2; a file path reads one text per line.
# `text_form` says how a line becomes a text: `"auto"` (the default) uses the corpus's own form
# (WikiText-2's tokenized form for the embedded corpus, which the shipped models were trained on;
# WikiText-2 and a file as served); `"released"` keeps each line as the corpus serves it, with its
# leading space and line break, as the released code does; `"stripped"` removes that whitespace,
# which changes every text's first token; `"wikitext"` puts the embedded corpus in WikiText-2's
# tokenized form. Ablation records are cached on disk (`results/`, or `$MOEAUDIT_RESULTS_DIR`)
# under a key made of every parameter that produced them, so a re-run reuses them, an
# interrupted run resumes, and a changed parameter computes new records.
#
# ## What this shows, and what it does not
#
# **Shows.** What the two rungs mean operationally in this book: a routing weight is read
# from one clean forward pass, an importance is measured by removing one expert's
# contribution at one token and re-computing the loss; and that the two orderings of the
# same experts need not agree.
#
# **Does not show.** Anything general. One token of one small model is an illustration;
# whether observational rankings predict interventional ones is a statistical question
# about many positions, tested in chapters 4 and 5, where each verdict is stated with its
# correction and with the smallest effect the test could detect.
