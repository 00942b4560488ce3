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
# # Setup and verification
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - say what each of the paper's verification checks tests, and how it could fail;
# - tell the token-local ablation from the sequence-wide one by a measurement rather than by reading the code;
# - judge whether a check that passes could have failed at all.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # not used here (kept so every chapter accepts the same parameters)
seed = 42  # not used here: the suite's positions are fixed by the text (see below)
mode = "token"  # the main table's mode; the contrast runs the other one
seq_id = None  # text the suite runs on; None: the longest evaluation text
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100
max_tokens = None
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None
results_dir = None

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("02_verification", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("02_verification"))

# %% [markdown]
# Before any audit number can be trusted, two things must be established for each model:
# what its MoE layers look like (which layers route, over how many experts, how the top-k
# weights are combined, whether shared experts sit beside the routed ones), and that the
# ablation machinery does what it claims. The paper's Appendix B {cite}`engmann2026audit` lists
# four verification checks, run before data collection, and reports that all three models
# passed all four.
#
# This chapter runs the same four checks at every audited layer of every model. Each compares
# against an independent reference and would fail if the machinery were wrong:
#
# 1. **Per-token cross-entropy matches the Hugging Face reference loss** (the *CE check*). Our per-token losses
#    come from the clean pass, which runs padded batches and computes
#    $-\log p(x_{t+1}\mid x_{\le t})$ in float32 from the logits. The reference is the model's own
#    `labels=input_ids` loss on the same text, unpadded, in a separate forward call. A wrong
#    attention mask, a padding token counted as a target, or a target shifted by one would
#    break the match. Tolerance $10^{-4}$ in float32, $10^{-2}$ in half precision (the paper's).
# 2. **No stale state after an ablation** (the *stale-state check*). The clean loss at a position is computed, then an
#    ablation is run, then the clean loss is computed again by a plain forward of the
#    unmodified model; the two clean losses must agree within $10^{-3}$. An intervention that
#    leaked into the model (an in-place weight edit, a hook left behind) would fail here.
#    The book's interventions live inside one nnsight trace {cite}`fiottokaufman2025nnsight`
#    and leave nothing behind, so the expected difference is exactly zero.
# 3. **Position diversity** (the *diversity check*). Over up to $100$ positions of one text, more than $50\%$ of the
#    per-token losses must be distinct. This catches code that returns the loss of one
#    position for all of them (e.g. always reading the last row of the logits).
# 4. **Position-specific effect** (the *position check*). Expert $e$, active at position $t$, is removed at $t$ and,
#    separately, at a position $u$ of the same text where the router did *not* select it.
#    The paper's rule: the loss change must be larger where $e$ is active,
#    $\lvert\Delta L_t\rvert > \lvert\Delta L_u\rvert$. The book adds, in token mode, a *zero check* (`4b` in the tables):
#    the change at $u$ must be **zero up to floating-point rounding**. An unselected expert
#    already has combine weight zero at $u$, so removing it at $u$ only is a no-op, and any
#    larger value means the ablation reached positions or experts it should not have.
#
# ## What a passing position check requires, in the paper and in the released code
#
# The paper states the position check as a comparison of two effects. The released code
# {cite}`engmann2026code` does not make that comparison. Its verification function
# (`verify_all`, in the OLMoE and the DeepSeek per-token workers; the Qwen script has none)
# walks through the positions in order, takes the first one with at least two active experts,
# takes the first expert of that position's active set, and looks in the same text for the
# first position more than $20$ tokens away where that expert is not selected. It then runs
# one forward pass with the expert removed (everywhere it is routed in the text), prints the
# two signed loss changes, and records the check as passed. The two changes are never compared:
# the check fails only if no such pair of positions exists, and it passes whatever the numbers
# are, including when the inactive-position change is the larger one.
#
# Even the paper's rule, had it been applied, cannot tell the two ablation definitions apart.
# Under the paper's token-level definition (Definition 2.1) the inactive-position effect is
# zero; under the released code's sequence-wide ablation, removing $e$ "at $u$" also removes it
# at every earlier position where it *was* routed, and those removals reach $u$ through
# attention. The inactive-position effect is then nonzero, yet usually smaller than the active
# one. The chapter runs the suite in both modes and judges the position check by all three rules.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moeaudit import report
from moeaudit.audit import prepare
from moeaudit.chapters import exercises
from moeaudit.engine import ABLATION_MODES
from moeaudit.verify import (check4_rules, check4_summary, layout_summary, rounding_tolerance, suite_tables,
                             verification_suite)

report.use_book_style()
if mode not in ABLATION_MODES:
    raise ValueError(f"mode={mode!r} is not one of {ABLATION_MODES}")
other_mode = [m for m in ABLATION_MODES if m != mode][0]

# %% [markdown]
# ## The models
#
# Each model is loaded once and run over the evaluation corpus (its first lines longer than
# $50$ characters, as the paper takes them from the WikiText-2 test split {cite}`merity2016pointer`)
# to record its routing. The table describes what the audit reads from each model's configuration.

# %%
contexts, audited = {}, {}
for name in models:
    contexts[name] = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                             corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    audited[name] = [int(L) for L in layers] if layers is not None else contexts[name].model.audit_layers(5)
    display(Markdown(audit.regime_line(name, contexts[name])))
    for L in audited[name]:
        contexts[name].model.layout.check_layer(L)

# %% tags=["remove-input"]
layout_table = pd.DataFrame({name: layout_summary(ctx.model, audited_layers=audited[name], corpus=ctx.corpus)
                             for name, ctx in contexts.items()})
order = ["family", "n_layers", "moe_layers", "audited_layers", "num_experts", "top_k", "active_ratio",
         "n_shared_experts", "shared_expert_gate", "norm_topk_prob", "routed_scaling_factor", "hidden_size",
         "context_length", "parameters", "dtype", "eval_texts / tokens"]
display(layout_table.loc[order].style.set_caption("MoE layout of each model"))

# %% [markdown]
# Conventions: `moe_layers` are the decoder layers whose feed-forward block is an MoE block
# (range and count); a dense first layer, as in DeepSeek-V2 {cite}`deepseekai2024v2`, is excluded.
# `audited_layers` are MoE layers spread evenly over depth from the first to the last, the
# paper's choice of five (fewer if the model has fewer MoE layers). `active_ratio` is top-k over
# the number of routed experts. `n_shared_experts` are always-on experts outside the router
# {cite}`dai2024deepseekmoe`; they are never ablated. `shared_expert_gate` is `sigmoid` where a
# learned gate scales the shared expert (Qwen2-MoE {cite}`qwen2024moe`). `norm_topk_prob` says
# whether the top-k weights are renormalised to sum to one before they multiply the expert
# outputs; `routed_scaling_factor` multiplies them afterwards (DeepSeek-V2). Together these decide
# the *combine weight* an ablation sets to zero; the routing weight $g_e(\mathbf{x}_t)$ the metrics
# use is always the softmax probability before either step. `eval_texts / tokens` counts the
# evaluation texts and their real (non-padding) tokens, truncated to `context_length`.
#
# ## The four checks, in each mode
#
# The suite runs on one text (the longest, unless `seq_id` is set). The stale-state and position checks use the
# first expert in the router's top-k list at the middle position $t$ of that text, and for the position check
# the position $u$ where that expert is not selected that lies furthest after $t$ (or, if
# none does, the first one before it).

# %%
suite = pd.concat([verification_suite(ctx, layer=L, mode=m, seq_id=seq_id, fail_loudly=False).assign(mode=m)
                   for name, ctx in contexts.items() for m in (mode, other_mode) for L in audited[name]],
                  ignore_index=True)
runs = suite.groupby(["model", "layer", "mode"], sort=False).passed.all()
main_ok = runs.xs(mode, level="mode")
c4 = check4_summary(suite, last_layer={n: c.model.layout.n_layers - 1 for n, c in contexts.items()})

# %% tags=["remove-input"]
glue("n_main_pass", int(main_ok.sum()), display=False)
glue("n_main", len(main_ok), display=False)
glue("main_mode", Markdown(mode), display=False)
glue("other_mode", Markdown(other_mode), display=False)
glue("n_ulp", rounding_tolerance.__kwdefaults__["n_ulp"], display=False)


# %% tags=["hide-input"]
def styled(m: str):
    val, ok = suite_tables(suite, m)
    text = val.copy().astype(object)
    for c in ok.columns:
        applies = m == "token" or not c.startswith("4b")  # 4b has a criterion in token mode only
        text[c] = [f"{v:.3g} {'✓' if p else '✗'}" if applies else f"{v:.3g}" for v, p in zip(val[c], ok[c])]
    text["all passed"] = ["✓" if a else "✗" for a in ok.all(axis=1)]

    def css(_):
        out = ok.replace({True: "", False: "background-color: #f4c7a5"}).astype(str)
        out.insert(0, "t / u", "")
        out["all passed"] = ["" if a else "background-color: #f4c7a5" for a in ok.all(axis=1)]
        return out

    return text.style.apply(css, axis=None).set_caption(f"Verification suite, {m} mode")


display(styled(mode))

# %% [markdown]
# Each cell is the measured value and whether it meets the criterion (✓ / ✗, failures shaded).
# The CE check is the absolute difference of mean per-token losses in nats; the stale-state
# check the absolute difference of the clean loss before and after an ablation, in nats; the
# diversity check the share of distinct losses; the position check the active-minus-inactive
# difference of absolute loss changes, in nats (the paper's rule: positive); the zero check the
# absolute loss change at the inactive position alone
# (in token mode at most {glue:text}`n_ulp` units of rounding of that position's loss in the
# model's precision, `verify.rounding_tolerance`). `t / u` are the active and inactive positions of the position
# check. The CE and diversity checks do not involve the layer and repeat down a model's rows.
#
# In {glue:md}`main_mode` mode, {glue:text}`n_main_pass` of {glue:text}`n_main` (model, layer)
# suites pass every check. {glue:md}`main_verdict` The table below repeats the suite in
# {glue:md}`other_mode` mode, on the same text, positions and experts.

# %% tags=["remove-input"]
failing = [f"{m} layer {L}" for (m, L), v in main_ok.items() if not v]
glue("main_verdict", Markdown(
    "No check fails, so the records of these layers can be read as what they claim to be." if not failing else
    "The failing suites are " + ", ".join(failing) + "; their audit numbers should not be trusted until the "
    "cause is found."), display=False)
display(styled(other_mode))

# %% [markdown]
# ## What the position check sees under each definition
#
# The figure sets side by side, for each audited layer, the absolute loss change from
# removing the expert where it is active (filled markers, solid lines) and where it is not
# (open markers, dotted lines), under both definitions. The vertical axis is linear near zero
# and logarithmic above, so exact zeros (on the bottom edge) and small nonzero effects are
# both visible.

# %% tags=["hide-input"]
pos = suite[suite.key == "position"].assign(active=lambda d: d.d_active.abs(), inactive=lambda d: d.d_inactive.abs())
fig, axes = report.model_panels(models, height=3.4)
pal = plt.rcParams["axes.prop_cycle"].by_key()["color"]
styles = {("token", "active"): (pal[0], "o", "-"), ("token", "inactive"): (pal[0], "o", ":"),
          ("sequence", "active"): (pal[1], "s", "-"), ("sequence", "inactive"): (pal[1], "s", ":")}
for ax, name in zip(axes, models):
    for (m, w), (col, mk, ls) in styles.items():
        q = pos[(pos.model == name) & (pos["mode"] == m)].sort_values("layer")
        ax.plot(q.layer.astype(str), q[w], marker=mk, linestyle=ls, color=col,
                markerfacecolor=col if w == "active" else "white", label=f"{m} mode, e {w}", clip_on=False)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_ylim(bottom=0)
report.finish_panels(fig, axes, title="Position check: one expert removed where it is active and where it is not",
                     ylabel="|ΔL| from removing expert e\n(nats, symmetric log scale)", xlabel="audited MoE layer")

# %% [markdown]
# {glue:md}`check4_text`
#
# The table judges every measured pair by the three rules: the paper's (larger change where
# active), the released code's (a pair was found) and the book's (the paper's, plus a zero
# inactive effect in token mode).

# %%
rules = pd.DataFrame([{"model": r.model, "layer": r.layer, "mode": r["mode"], "ΔL active": r.d_active,
                       "ΔL inactive": r.d_inactive,
                       **check4_rules(r.d_active, r.d_inactive, mode=r["mode"],
                                      tolerance=0.0 if np.isnan(r.tolerance) else r.tolerance)}
                      for _, r in suite[suite.key == "position"].iterrows()]).set_index(["model", "layer", "mode"])
display(rules.style.format({"ΔL active": "{:+.3g}", "ΔL inactive": "{:+.3g}"})
        .format(lambda v: "✓" if v else "✗", subset=["paper", "released", "book"])
        .set_caption("The position check under the paper's, the released code's and the book's rule (ΔL in nats)"))

# %% tags=["remove-input"]
seq_where = ("at layers that are followed by further layers" if c4["n_seq_inner"] else "")
glue("check4_text", Markdown(
    f"In token mode the inactive-position effect is exactly zero in {c4['n_token_zero']} of {c4['n_token']} suites "
    f"and within rounding in {c4['n_token_within_tol']}. "
    + (f"In sequence mode it exceeds rounding in {c4['n_seq_inner_nonzero']} of the {c4['n_seq_inner']} suites "
       f"{seq_where} (median |effect| over all {c4['n_seq_inner']} of these suites: {c4['median_seq_inner']:.3g} nats)" if c4["n_seq_inner"] else "")
    + ((", and " if c4["n_seq_inner"] else "In sequence mode, ")
       + (f"at the last layer it is exactly 0 nats" if c4['max_seq_last'] == 0 else
          f"at the last layer it is at most {c4['max_seq_last']:.2g} nats"
          + (", within rounding of zero" if c4["n_seq_last_within_tol"] == c4["n_seq_last"] else ""))
       + (", because nothing after the last layer can carry the earlier removals to position u"
          if c4["n_seq_last_within_tol"] == c4["n_seq_last"] else "") if c4["n_seq_last"] else "")
    + f". The paper's rule holds in {c4['pass_paper_sequence']} of {c4['n_sequence']} sequence-mode suites and in "
    f"{c4['pass_paper_token']} of {c4['n_token']} token-mode suites"
    + (", so passing it does not say which definition the code implements." if c4["pass_paper_sequence"]
       else "; here it happens to separate the modes, but nothing in its construction guarantees that.")
    + f" The released rule passes {c4['pass_released_sequence'] + c4['pass_released_token']} of "
    f"{c4['n_sequence'] + c4['n_token']} suites, every one where a pair was found"
    + ("" if rules.paper.eq(rules.released).all() else ", including " + ", ".join(
        f"{m} layer {L} in {md} mode" for (m, L, md) in rules.index[rules.released & ~rules.paper])
       + ", where the inactive-position change is the larger one") + "."), display=False)
n_strict = c4["n_token_within_tol"] - c4["n_token_zero"]
glue("ex_strict", Markdown(f"the book's rule then fails in {n_strict} of the {c4['n_token']} token-mode suites, exactly "
                           "those whose inactive-position effect is a rounding residue rather than an exact zero"
                           if n_strict else "the book's rule still passes in every token-mode suite that passed "
                           "before: in this run every inactive-position effect within rounding is exactly zero"),
     display=False)
glue("n_released_pass_all", c4["pass_released_sequence"] + c4["pass_released_token"], display=False)
glue("ex_strict_pass", exercises.strict_token_passes(suite), display=False)
glue("ex_n_token", c4["n_token"], display=False)
glue("n_paper_seq_pass", c4["pass_paper_sequence"], display=False)
glue("n_seq_suites", c4["n_sequence"], display=False)

# %% [markdown]
# ## What this shows, and what it does not
#
# **Shows.** For each model and audited layer: whether the per-token losses the audit uses are
# the model's own losses, whether an ablation leaves a trace on later computations, whether
# losses vary across positions, and, in token mode, whether removing an expert changes nothing
# where the router did not select it. In this run {glue:text}`n_main_pass` of
# {glue:text}`n_main` suites pass all of these in {glue:md}`main_mode` mode; where they do,
# a token-mode record measures what Definition 2.1 asks for. The position-check table shows that the
# released code's version of the position check passes in {glue:text}`n_released_pass_all` suites,
# whatever the two loss changes are, and that the paper's rule passes in
# {glue:text}`n_paper_seq_pass` of {glue:text}`n_seq_suites` sequence-mode suites; neither
# separates the two ablation definitions, and the first cannot fail once a pair is found.
#
# **Does not show.** That the loss changes are *large enough* to be measured reliably (that is
# a question of the audit's power, chapter 4), or that the models behave like the real
# checkpoints (appendix A). Each check uses one text, one position and one expert per layer;
# it tests the machinery, not the population. Nor does it show that the released code
# measured something wrong: its position check simply could not have told.
#
# ## Exercises
#
# ````{exercise} 1. Make the book's zero check strict
# :label: 02_verification-ex1
# :nonumber:
#
# The book's tolerance allows for the last bits of float32 arithmetic. Judge the token-mode suites
# with `tolerance=0` instead: for each row of the position-check table in token mode, call
# `moeaudit.verify.check4_rules(d_active, d_inactive, mode="token", tolerance=0.0)`. In how many
# token-mode suites does the book's rule still pass? Check your count in the downloaded notebook
# with `exercises.check_02_verification_1(answer, suite)`
# (`from moeaudit.chapters import exercises`).
# ````
#
# ````{solution} 02_verification-ex1
# :class: dropdown
#
# The strict rule passes in {glue:text}`ex_strict_pass` of the {glue:text}`ex_n_token` token-mode
# suites: {glue:md}`ex_strict`.
# ````
#
# ````{exercise} 2. Swap the main mode
# :label: 02_verification-ex2
# :nonumber:
#
# Predict what changes in the two suite tables and in the position-check table, then run
# `make chapter NB=02_verification PARAMS="-p mode sequence"`.
# ````
#
# ````{solution} 02_verification-ex2
# :class: dropdown
#
# The two suite tables change places; the zero check has no criterion in the first table, so a
# suite there fails only on the paper's four checks, and the position-check table is unchanged
# (the same {glue:text}`n_released_pass_all` released-rule passes), because both modes are always
# run.
# ````
