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
# # Beyond the paper (4): necessity versus sufficiency, removing an expert against restoring it
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - tell necessity (removing an expert from a clean run) from sufficiency (restoring it in a corrupted run);
# - read the rank agreement between the two, with its interval and minimum detectable correlation;
# - judge what excluding positions with a small corruption gap does to the comparison.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: five depth-proportional MoE layers (the paper's five for its checkpoints); or a list used for every model
n_positions = 20  # token positions per model (few: every position restores every active expert of every layer)
seed = 42  # draws the positions and the corrupting noise
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
batch_size = 64
span_tokens = 3  # tokens ending at t whose input embeddings are corrupted
corruption_scale = 3.0  # noise standard deviation in standard deviations of the input embeddings (causal tracing: 3)
min_gap = 0.05  # nats: a position whose corruption raises the loss by less is excluded from the recovered fraction
alpha = 0.05  # family-wise level (Holm) of each model's rank correlations
power = 0.8  # power at which the smallest detectable correlation is stated
n_boot = 2000  # bootstrap resamples for the Spearman intervals
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form; "released"; "stripped"; "wikitext" (the embedded corpus in WikiText-2's form)
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import report
from moeaudit.tooling import params

params.validate("12_necessity_sufficiency", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("12_necessity_sufficiency"))

# %% [markdown]
# The paper asks whether observational statistics of an expert (how often it is routed, how large
# its output is) predict what happens when the expert is intervened on. In Pearl's terms
# {cite}`pearl2009causality` that is a question across the rungs of the causal ladder: the
# metrics are *associations* (rung one, read from clean runs), the ablation is an *intervention*
# (rung two, $do(\text{expert } e \text{ absent at } t)$). There is more than one intervention on
# an expert, though, and they answer different questions. Both below are rung-two interventions:
# removal sets the expert's contribution to zero in a clean run, restoration sets it to its clean
# value in a corrupted run. "Necessity" and "sufficiency" name them as in activation patching:
# graded loss changes, not Pearl's probabilities of necessity and sufficiency, which are
# counterfactual (rung-three) quantities {cite}`pearl2009causality`.
#
# **Noising: is the expert necessary?** The paper's ablation starts from a clean run and removes
# one active expert's contribution $w_e(x_t)E_e(x_t)$ at layer $L$ and token $t$. The loss change
# $\Delta L$ says how much the prediction *needs* that contribution when everything else is
# clean. Redundancy hides necessity: if other experts or later layers can stand in, removing one
# costs little even when it carries the information.
#
# **Denoising: is the expert sufficient?** Causal tracing {cite}`meng2022locating` starts from a
# corrupted run. Gaussian noise is added to the input embeddings of a span of tokens (in ROME,
# the subject's tokens), with a standard deviation of {glue:text}`corruption_scale` times the
# empirical standard deviation of the input embeddings. ROME measures that standard deviation over
# the embeddings of its subjects' tokens; here it is measured over every token of the corpus
# (`engine.embedding_std`), as no span here is a subject. Then one internal value is set back to its
# clean value, and the question is how much of the clean prediction comes back. Expert-aware
# causal tracing {cite}`lu2026expertaware` restores single experts' clean updates inside a
# routed MoE block. Here: at layer $L$ and token $t$, the corrupted run's contribution of expert
# $e$ is replaced by its clean contribution $c_e = w_e(x_t)E_e(x_t)$ (the clean run's routed
# output times its combine weight). If the corrupted run did not route $e$ there, its corrupted
# contribution is zero and $c_e$ is added. Nothing else changes: not the router, not the other
# experts, not the shared experts. The measure is the **recovered fraction** of the next-token
# loss,
#
# $$ r = \frac{L_\text{corrupt} - L_\text{restored}}{L_\text{corrupt} - L_\text{clean}}, $$
#
# where $r = 1$ undoes the corruption at $t$, $r = 0$ does nothing, and $r < 0$ makes it worse. A
# position where the corruption raises the loss by less than {glue:text}`min_gap` nats is left out:
# the denominator is near zero or negative there. The excluded positions are counted below.
#
# **What each answers.** The two measures ask different questions. An expert can be necessary
# but not sufficient: its contribution matters only together with others that the noise has
# also spoiled. It can also be sufficient but not necessary: one of several redundant carriers,
# any one of which restores the prediction. So the ranking of a token's active experts by
# restoration need not match their ranking by removal. This chapter measures how far they agree
# on the default models. It also asks whether the observational metrics track sufficiency, which
# the paper did not test (its audit asks about necessity, and the audit chapter answers it for these
# models on its own positions).
#
# **Design.** For each model, {glue:text}`n_positions` seeded positions $t$. The corrupted span is
# the {glue:text}`span_tokens` tokens ending at $t$, and the loss is read at $t$. At every audited
# layer, every active expert is restored alone in one run and removed alone in another. The
# removals are the book's single-expert records (token mode) at the same positions, so each
# (position, layer, expert) has both measures.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moeaudit import audit, report, stats
from moeaudit.audit import prepare, single_expert_records
from moeaudit.chapters import restoration

report.use_book_style()
glue("corruption_scale", f"{corruption_scale:g}", display=False)
glue("min_gap", f"{min_gap:g}", display=False)
glue("n_positions", n_positions, display=False)
glue("span_tokens", span_tokens, display=False)

# %% [markdown]
# ## The records
# Restorations and removals are cached under keys that hold every parameter that shaped them.
# The removals come from the audit's machinery with the positions' minimum context raised so
# that the corrupted span fits before $t$. Both sets therefore use the same seeded draw.

# %%
pairs, restored_all, intros, layouts = [], [], [], {}
need = restoration.min_context_for(span_tokens)
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    layouts[name] = ctx.model.layout
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    removed = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode="token",
                                    min_context=need, batch_size=batch_size)
    rec = restoration.restoration_records(ctx, layers=audited, n_positions=n_positions, seed=seed,
                                          span_tokens=span_tokens, corruption_scale=corruption_scale,
                                          batch_size=batch_size)
    rec = restoration.with_recovered(rec, min_gap=min_gap)
    restored_all.append(rec)
    pairs.append(restoration.paired_with_removal(rec, removed, ctx.metrics.assign(model=name)))
    intros.append(audit.model_summary(name, ctx, audited, removed))
restored_all = pd.concat(restored_all, ignore_index=True)
pairs = pd.concat(pairs, ignore_index=True)

# %% tags=["remove-input"]
glue("intros", Markdown("\n\n".join(intros)), display=False)
glue("corruption_text", Markdown(restoration.corruption_text(restored_all, min_gap=min_gap)), display=False)
glue("routed_text", Markdown(restoration.routed_text(restored_all)), display=False)

# %% [markdown]
# ````{admonition} The models and their removal records
# :class: dropdown
# {glue:md}`intros`
# ````
#
# **The corruption.** {glue:md}`corruption_text`
#
# **What was restored.** {glue:md}`routed_text`

# %% [markdown]
# ## Removal against restoration, expert by expert
# Each point is one active expert at one position and layer. The x-axis is its removal effect
# $\Delta L$ in a clean run (nats). The y-axis is the share of the corruption's loss increase that
# restoring it alone undoes (a fraction, no unit). Colour gives the layer's place among the
# model's audited layers, from the shallowest (dark) to the deepest (yellow); the layer numbers
# per model are those of the table below. Both axes are symmetric-logarithmic: linear within
# ±{glue:text}`linthresh`, logarithmic beyond. The grey lines mark zero on each axis. Excluded positions are not
# shown.

# %% tags=["hide-input"]
kept = pairs[~pairs.excluded]
linthresh = 0.01  # the symlog axes are linear within ±linthresh
glue("linthresh", f"{linthresh:g}", display=False)
fig, axes = report.model_panels(models, height=4.0)
cmap = plt.get_cmap("viridis")
for ax, name in zip(axes, models):
    g = kept[kept.model == name]
    ls = sorted(g.layer.unique())
    for i, L in enumerate(ls):
        h = g[g.layer == L]
        place = {0: " (shallowest)", len(ls) - 1: " (deepest)"}.get(i, "")
        ax.scatter(h[restoration.REMOVAL], h.recovered, s=9, alpha=0.7, color=cmap(i / max(1, len(ls) - 1)),
                   label=f"audited layer {i + 1} of {len(ls)}{place}" if name == models[0] else None)
    ax.axvline(0, color="0.6", linewidth=0.6)
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.tick_params(labelsize=9)
report.finish_panels(fig, axes, title="Necessity (removal ΔL) against sufficiency (recovered fraction), per expert",
                     ylabel="recovered fraction of the corruption's\nloss increase (symlog)",
                     xlabel="removal ΔL in the clean run (nats, symlog)", zero_line=True)

# %% [markdown]
# ## Do the rankings agree?
# Per model and layer: Spearman's $\rho$ between the recovered fraction and each criterion, over
# the (position, expert) pairs of the layer that are not excluded. The criteria are the removal
# $\Delta L$ of the same expert at the same position, and the paper's four observational metrics
# of the expert (computed over the corpus's clean run). The interval is a paired bootstrap
# ({glue:text}`n_boot` resamples, bias-corrected and accelerated), at the {glue:text}`ci_pct` level of a
# single row, not adjusted for the number of rows; the p-value is scipy's test of Spearman's $\rho$
# (a t approximation), so near the threshold the interval and the p-value can disagree.
# Holm's correction runs over every row of a model: the layers times the criteria.
# *Min. detectable |ρ|* is the $|\rho|$ that a row detects with {glue:text}`power_pct` power at
# Holm's strictest level. A row that is not significant speaks only against correlations at least
# that large. All three treat the pairs as independent. They are not: the $k$ experts of a
# position share its corruption, and an expert recurs at several positions (*distinct experts*
# counts the distinct experts of a layer). The p-values and intervals are therefore somewhat
# optimistic, and the detectable $|\rho|$ too.
#
# The first table holds the removal rows, with their intervals (a bold Holm-adjusted p-value is
# significant); the second the four observational metrics, one column each, as $\rho$ with its
# Holm-adjusted p-value (bold: significant); their intervals are drawn in the figure after the
# tables. Every column of every row is in the collapsed
# table under them.

# %%
table = restoration.rank_agreement(pairs, alpha=alpha, power=power, n_boot=n_boot, seed=seed)

# %% tags=["remove-input"]
from IPython.display import HTML  # noqa: E402

ci_pct = f"{table.ci_level.iloc[0]:.0%}"
glue("power_pct", f"{power:.0%}", display=False)
glue("ci_pct", ci_pct, display=False)
glue("n_boot", n_boot, display=False)
fmt = lambda v, f="{:+.2f}": "—" if pd.isna(v) else f.format(v)  # noqa: E731
removal = table[table.criterion == restoration.REMOVAL]
shown = pd.DataFrame({"model": removal.model, "layer": removal.layer, "pairs": removal.n,
                      "distinct experts": removal.n_experts,
                      f"ρ [{ci_pct} CI]": [report.fmt_with_ci(r, lo, hi, digits=2)
                                           for r, lo, hi in zip(removal.rho, removal.ci_low, removal.ci_high)],
                      "p": removal.p.map(lambda v: fmt(v, "{:.2g}")), "p (Holm)": removal.p_holm.map(lambda v: fmt(v, "{:.2g}")),
                      "min. detectable |ρ|": removal.min_detectable_rho.map(lambda v: fmt(v, "{:.2f}"))})
display(shown.style.hide(axis="index")
        .apply(lambda d: np.where(removal.significant.to_numpy(dtype=bool), "font-weight: bold", ""), subset="p (Holm)")
        .set_caption(f"Spearman's ρ of the removal ΔL with the recovered fraction, per layer; Holm over each "
                     f"model's rows, α = {alpha:g} (bold: significant)"))
metric_rows = table[table.criterion != restoration.REMOVAL]
cells = metric_rows.assign(cell=[fmt(r) + " (" + fmt(p, "{:.2g}") + ")" for r, p in zip(metric_rows.rho, metric_rows.p_holm)])
wide = cells.pivot(index=["model", "layer"], columns="criterion", values="cell")[list(restoration.CRITERIA[1:])]
wide.columns.name = None
bold = cells.pivot(index=["model", "layer"], columns="criterion", values="significant")[wide.columns].fillna(False)
css = pd.DataFrame(np.where(bold.astype(bool), "font-weight: bold", ""), index=bold.index,
                   columns=[restoration.CRITERION_LABELS[c] for c in bold.columns])
display(wide.rename(columns=restoration.CRITERION_LABELS).style.apply(lambda _: css, axis=None)
        .set_caption("Spearman's ρ of each observational metric with the recovered fraction, per layer: "
                     "ρ (p, Holm over each model's rows); bold: significant"))
full = table.assign(criterion=table.criterion.map(restoration.CRITERION_LABELS))[
    ["model", "layer", "criterion", "n", "n_experts", "rho", "ci_low", "ci_high", "p", "p_holm", "min_detectable_rho",
     "significant"]]
display(HTML("<details><summary>every row and column of the two tables</summary>" + full.style.hide(axis="index")
             .format(precision=3, na_rep="—").format("{:.2g}", subset=["p", "p_holm"], na_rep="—").to_html()
             + "</details>"))

# %% tags=["hide-input"]
fig, axes = report.model_panels(models, height=4.0, sharey=True)
crit_colors = dict(zip(restoration.CRITERIA, plt.get_cmap("tab10").colors))
for ax, name in zip(axes, models):
    g = table[table.model == name]
    for j, crit in enumerate(restoration.CRITERIA):
        h = g[g.criterion == crit].sort_values("layer")
        x = np.arange(len(h)) + (j - (len(restoration.CRITERIA) - 1) / 2) * 0.12
        ax.errorbar(x, h.rho, yerr=[h.rho - h.ci_low, h.ci_high - h.rho], fmt="o", markersize=4, elinewidth=0.8,
                    color=crit_colors[crit], mfc="white",
                    label=restoration.CRITERION_LABELS[crit] if name == models[0] else None)
        sig = h.significant.to_numpy(dtype=bool)
        ax.plot(x[sig], h.rho[sig], "o", markersize=4, color=crit_colors[crit], zorder=3)  # filled: significant (Holm)
    ax.set_xticks(np.arange(g.layer.nunique()))
    ax.set_xticklabels([f"L{L}" for L in sorted(g.layer.unique())])
report.finish_panels(fig, axes, title="Which criterion ranks experts as restoration does? (95% bootstrap CI; "
                                  "filled: significant after Holm)",
                     ylabel="Spearman ρ with the recovered fraction", xlabel="audited layer", zero_line=True)

# %% [markdown]
# In the figure, each circle is one row of the tables: a criterion's Spearman $\rho$ with the
# recovered fraction at one layer, with the row's bootstrap interval as a bar; the criteria of a
# layer stand side by side. A filled circle is significant after Holm's correction over the
# model's rows, an open one is not. The horizontal line marks no correlation.

# %% [markdown]
# ## Within a position: is the most sufficient expert the most necessary one?
# The correlations above pool positions, and a position with a large corruption moves every one of
# its experts at once. The bootstrap also treats the $k$ experts of a position as independent. A
# comparison inside each position avoids both problems. At each non-excluded position: is the
# expert whose restoration recovers most the one whose removal costs most? By chance that happens
# with probability $1/k$. The p-value is the one-sided binomial tail.

# %%
top = restoration.top_expert_agreement(pairs)

# %% tags=["remove-input"]
_ = report.show_table(top, labels={"n_positions": "positions", "share": "share that agree", "chance": "chance (1/k)",
                               "p": "p (one-sided binomial)"},
                  formats={"share that agree": "{:.2f}", "chance (1/k)": "{:.3f}", "p (one-sided binomial)": "{:.2g}"},
                  max_rows=None,
                  caption="Positions whose most-recovering expert is the most costly to remove, against chance 1/k")

# %% tags=["remove-input"]
glue("answer_removal", Markdown(restoration.agreement_text(table, alpha=alpha, power=power)), display=False)
glue("answer_observational", Markdown(restoration.observational_text(table, alpha=alpha, power=power)), display=False)
glue("answer_top", Markdown(restoration.top_agreement_text(top, alpha=alpha, power=power)), display=False)

# %% [markdown]
# ## Answers
# **Do restoration and removal order a layer's (position, expert) pairs alike?**
# {glue:md}`answer_removal` This pools the positions of a layer: it mixes differences between
# positions with the order of the experts within one. The next answer speaks to the latter.
#
# **Within a position.** {glue:md}`answer_top`
#
# **Do the observational metrics track sufficiency?** {glue:md}`answer_observational`

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** On the default models, at the sampled positions, it shows how far two interventions
# on the same expert at the same token agree: removal from a clean run (necessity) and
# restoration into a corrupted run (sufficiency). It also shows whether the paper's observational
# metrics rank experts as restoration does. Each statement carries its correction, its level and
# its detectable effect.
#
# **Does not show.** The models are tiny and the positions few, so the detectable correlations are
# large and a null is weak evidence. Restoration depends on the corruption: on the noise scale, on
# the span (here the tokens ending at $t$, not a subject as in causal tracing) and on the noise
# draw. Another corruption can rank the experts differently. The recovered fraction is read from
# the next-token loss, not from the logit contrast of a true and a foil answer
# {cite}`lu2026expertaware`. It is a ratio, so positions with a small corruption gap give unstable
# values; the threshold only removes the worst of them. The pooled correlations treat the
# experts of a position as independent, and the metrics' pairs repeat one value per expert, so
# their p-values, intervals and detectable correlations are optimistic. The within-position
# comparison avoids that, but it uses only the top expert of a few positions per layer. The
# removal correlations are measured at these positions and layers only: they do not say that
# restoration and removal rank an expert alike elsewhere, nor across layers. Restoring one expert at a time cannot show
# sufficiency that needs a coalition of experts, which causal tracing in larger MoEs has found
# {cite}`lu2026expertaware`.
#
# ## Exercises
# ````{exercise} 1. A stricter exclusion
# :label: 12_necessity_sufficiency-ex1
# :nonumber:
#
# Raise the threshold of the corruption gap:
#
# ```bash
# make chapter NB=12_necessity_sufficiency PARAMS="-p min_gap 0.5"
# ```
# ````

# %% [markdown]
# ````{solution} 12_necessity_sufficiency-ex1
# :class: dropdown
#
# {glue:md}`ex1_expected`
# ````

# %% [markdown]
# ````{exercise} 2. Fewer positions
# :label: 12_necessity_sufficiency-ex2
# :nonumber:
#
# Halve the draw:
#
# ```bash
# make chapter NB=12_necessity_sufficiency PARAMS="-p n_positions 10"
# ```
# ````

# %% [markdown]
# ````{solution} 12_necessity_sufficiency-ex2
# :class: dropdown
#
# {glue:md}`ex2_expected`
# ````

# %% tags=["hide-input"]
ex_gap = 0.5
strict = restoration.with_recovered(pairs, min_gap=ex_gap)  # the same records, the stricter threshold
strict_table = restoration.rank_agreement(strict, criteria=[restoration.REMOVAL], alpha=alpha, power=power,
                                          n_boot=n_boot, seed=seed)
excl = lambda d: int(d.drop_duplicates(["model", "seq_id", "t"]).excluded.sum())  # noqa: E731
glue("ex1_expected", Markdown(
    "This run already uses that threshold." if min_gap == ex_gap else
    f"The records are reused from the cache (the threshold is applied after them). The excluded positions go from "
    f"{excl(restored_all)} to {excl(strict)} over {report.plural(len(models), 'model')}. The removal row alone, tested on its own "
    f"(Holm over the layers only, so not the table's family), reads: "
    + restoration.agreement_text(strict_table, alpha=alpha, power=power)), display=False)
k_of = {m: layouts[m].top_k for m in models}
pairs_now = {m: int(removal[removal.model == m].n.min()) for m in models}  # after this run's exclusions
mde_now = {m: stats.min_detectable_spearman(pairs_now[m], alpha=alpha / int(table[table.model == m].shape[0]),
                                            power=power) for m in models}
mde_10 = {m: stats.min_detectable_spearman(10 * k_of[m], alpha=alpha / int(table[table.model == m].shape[0]),
                                           power=power) for m in models}
glue("ex2_expected", Markdown(
    "This run already uses 10 positions." if n_positions == 10 else
    "A new seeded draw of 10 positions, so both the removals and the restorations are computed afresh. A "
    "layer's smallest detectable |ρ| at Holm's strictest level goes from "
    + report.join_words(f"{mde_now[m]:.2f} ({pairs_now[m]} pairs in this run) to at least {mde_10[m]:.2f} (at most "
                        f"{10 * k_of[m]} pairs, fewer where positions are excluded) for {m}" for m in models)
    + ". The intervals widen by about the square root of the ratio of the pairs, a factor of "
    f"{(n_positions / 10) ** 0.5:.1f}."), display=False)
