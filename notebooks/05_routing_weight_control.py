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
# # The routing-weight control: is there any signal for a ranking to find?
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - use the token's own routing weight as a control for what a ranking can find at all;
# - plan how many positions an effect of a given size needs (power, minimum detectable effect);
# - tell a result that survives a stated correction from one that does not.
# :::

# %% tags=["parameters", "hide-input"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list used for every model
n_positions = 200  # token positions per cell (the paper: 200)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
remote = False  # False (here), True (NDIF), "local" (simulated remote path) or an NDIF host URL
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
min_context = 0
batch_size = 64
alpha = 0.05  # family-wise level before correction
power = 0.8  # power for the minimum detectable effect and the sample-size plan
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)
n_boot = 2000  # bootstrap resamples for the Spearman confidence intervals

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("05_routing_weight_control", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("05_routing_weight_control"))

# %% [markdown]
# The audit of the previous chapter asked whether four *population-level* statistics of an
# expert (computed once over the whole corpus) predict which active expert matters more at a
# given token. A null result there has two readings: either those statistics carry no
# information about token-level importance, or the audit is too weak to see any information at
# all. This chapter separates the two readings, as the paper does in its control experiment
# (Section 3, Appendix A.2, Tables 4–6 and Figure 1 of {cite}`engmann2026audit`).
#
# **The control ranking.** Instead of a corpus statistic, the active experts at token $t$ are
# ranked by the router's own probability at that token, $g_e(x_t) = \mathrm{softmax}(W_g x_t)_e$.
# This is the routing quantity computed for the very token whose ablation is measured: the
# number the model uses to weight the expert's output in Equation (1) (models that renormalise
# over the top-k divide it by a constant per token, which leaves the ranking unchanged). It is
# not an upper bound on what a routing statistic can show — a population-level statistic can
# happen to order a token's experts better — and {glue:md}`control_beaten`. Its role is a
# positive check, read model by model: if it predicts which ablation hurts more *at the level at
# which the audit tested the observational cells* (the audit's per-cell Bonferroni level, stricter
# than the control's own, since the audit's family is larger), then effects of that size exist
# and can be detected at that level; the null of that model's observational metrics is then
# informative against effects of that size only to the extent of the audit's power at that size
# (stated model by model below), and it is not equivalence: it does not show the metrics' effects
# to be small.
# If it passes only at its own, looser level, it does not show that; if it does not pass at all,
# the two readings of that model's null are not separated.
#
# **Same machinery, same data.** The positions, the layers and the single-expert ablation
# records are exactly those of the audit chapter (they are read from the same cache; nothing
# is re-sampled). At every position the expert with the largest $g_e(x_t)$ and the one with the
# smallest are taken as "high" and "low", and
# $D = \Delta\mathcal{L}_{\text{high}} - \Delta\mathcal{L}_{\text{low}}$ is tested as before:
# paired t-test with Cohen's $d_z$ and its exact 95% confidence interval, Wilcoxon signed-rank
# test, and the paper's dual-test rule. The family for the Bonferroni correction is one model's
# control cells, one per audited layer (the paper: {glue:text}`paper_control_family` layers,
# $\alpha_{\text{adj}}$ = {glue:text}`paper_control_alpha:.3g`); this run's families are
# {glue:md}`control_families`.
#
# The paper's tables add one more statistic: the Spearman correlation between the *ratio* of the
# two routing weights, $w_{\text{high}}/w_{\text{low}}$, and $D$. It asks a finer question than
# the t-test: when the router is more decisive at a token, is the difference in importance
# larger?

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter
from myst_nb import glue

from moeaudit import paper, released, report, stats
from moeaudit.chapters.control import (control_against_observational, control_beaten_text,
                                       control_reading_text, control_summary_text, control_verdict_text,
                                       figure1_text, same_layer_margins)
from moeaudit.report import fmt_signed, join_words
from moeaudit.audit import paired_cells, prepare, single_expert_records
from moeaudit.paper import paper_control_notes
from moeaudit.metrics import METRICS, ROUTING_WEIGHT

report.use_book_style()
paper_control = paper.paper_printed_values().query("table in (4, 5, 6) and quantity == 'd'")
glue("paper_control_family", len(paper.LAYERS["olmoe"]), display=False)
glue("paper_control_alpha", paper.PAPER_ALPHA / len(paper.LAYERS["olmoe"]), display=False)

# %% [markdown]
# ## The records
# The call below is the audit chapter's call with the same parameters, so the records come from
# the cache when that chapter has run (and are computed and cached otherwise). Both the control
# ranking and the four observational rankings are read from them: the observational cells are
# needed for the grey band of Figure 1.

# %%
control_cells, observational_cells, layouts = [], [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    lay = ctx.model.layout
    layouts[name] = lay
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=min_context, batch_size=batch_size)
    depth = dict(zip(audited, report.relative_depth(audited, lay.moe_layers)))
    for rankings, sink in (([ROUTING_WEIGHT], control_cells), (list(METRICS), observational_cells)):
        c = paired_cells(rec, ctx.metrics, rankings=rankings)
        c["rel_depth"] = c.layer.map(depth)
        sink.append(c)
    display(Markdown(audit.model_summary(name, ctx, audited, rec)))
control_cells = pd.concat(control_cells, ignore_index=True)
observational_cells = pd.concat(observational_cells, ignore_index=True)

# %% [markdown]
# ## Per-layer statistics (the paper's Tables 4–6)
# One table per model, one column per audited layer. The Bonferroni family is that model's
# control cells only; the observational cells of the audit chapter are a separate family.

# %%
control = stats.audit_table(control_cells, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                            low_col="delta_loss_low", family=("model",), alpha=alpha, power=power)
control_verdicts = stats.family_verdicts(control, alpha=alpha)
depths = control_cells[["model", "layer", "rel_depth"]].drop_duplicates()
control = control.merge(depths, on=["model", "layer"], how="left")

rho_rows = []
for (name, layer), g in control_cells.groupby(["model", "layer"], sort=False):
    r = stats.spearman(g.value_high / g.value_low, g["diff"], n_boot=n_boot, seed=seed)
    r.insert(0, "model", name)
    r.insert(1, "layer", layer)
    rho_rows.append(r)
rho = pd.concat(rho_rows, ignore_index=True)
control = control.merge(rho[["model", "layer", "rho", "p", "ci_low", "ci_high"]].rename(
    columns={"p": "rho_p", "ci_low": "rho_ci_low", "ci_high": "rho_ci_high"}), on=["model", "layer"], how="left")
means = control_cells.groupby(["model", "layer"], sort=False)[["delta_loss_high", "delta_loss_low"]].mean()
control = control.merge(means.reset_index(), on=["model", "layer"], how="left")

# %% tags=["remove-input"]
glue("control_families", Markdown("; ".join(
    f"{r.cells} layer{'s' if r.cells != 1 else ''} for {r.model} (Bonferroni level α = {alpha:g}/{r.cells} = "
    f"{r.alpha_bonferroni:.3g})" for r in control_verdicts.itertuples())), display=False)


# %% tags=["hide-input"]
def control_table(t: pd.DataFrame):
    """The paper's layout: statistics as rows, layers as columns."""
    t = t.sort_values("layer")
    cols = [f"L{L}" for L in t.layer]
    rows = {
        "Cohen's d_z": [f"{r.cohens_dz:+.3f}" + (" ★" if r.sig_dual_bonf and r.cohens_dz > 0 else
                                                   " ▼" if (r.sig_dual_bonf or r.sig_t_bonf) and r.cohens_dz < 0 else "")
                        for r in t.itertuples()],
        "95% CI of d_z": [f"[{r.dz_ci_low:+.3f}, {r.dz_ci_high:+.3f}]" for r in t.itertuples()],
        "p_t": [f"{r.p_t:.3g}" for r in t.itertuples()],
        "p_W": [f"{r.p_W:.3g}" for r in t.itertuples()],
        "Spearman ρ (w_high/w_low, D)": [f"{r.rho:+.3f}" for r in t.itertuples()],
        "95% CI of ρ": [f"[{r.rho_ci_low:+.3f}, {r.rho_ci_high:+.3f}]" for r in t.itertuples()],
        "mean ΔL_high / ΔL_low (nats)": [f"{r.delta_loss_high:+.4f} / {r.delta_loss_low:+.4f}" for r in t.itertuples()],
    }
    table = pd.DataFrame(rows, index=cols).T.replace(r".*\bnan\b.*", "—", regex=True)  # undefined: see the note
    bold_cols = [c for c, s in zip(cols, t.sig_t_bonf) if s]

    def css(df):
        out = pd.DataFrame("", index=df.index, columns=df.columns)
        for c in bold_cols:
            out.loc[["Cohen's d_z", "p_t"], c] = "font-weight: bold"
        return out

    n = int(t.n.iloc[0]) if t.n.nunique() == 1 else f"{int(t.n.min())}–{int(t.n.max())}"
    k = len(t)
    return (table.style.apply(css, axis=None)
            .set_caption(f"Routing-weight control, {t.model.iloc[0]}. n = {n} positions per layer; "
                         f"Bonferroni over {k} layers: α_adj = {alpha}/{k} = {alpha / k:.3g}.")
            .set_properties(**{"text-align": "center", "font-size": "0.9em"}))


for name in models:
    display(Markdown(f"### {name}"))
    display(control_table(control[control.model == name]))
    report.show_untested_note(control[control.model == name], what="layer")

# %% [markdown]
# {glue:md}`control_verdict`
#
# *How to read these tables.* Cohen's $d_z = \bar D / s_D$ is the mean paired difference in units
# of its standard deviation; positive means that ablating the expert with the larger routing weight
# at the token hurts the next-token prediction more. The interval is the exact 95% interval of
# $d_z$ (noncentral t). $p_t$: two-sided paired t-test; $p_W$: two-sided Wilcoxon signed-rank test.
# **Bold** $d_z$ and $p_t$: $p_t$ below the Bonferroni level of the model (what the caption of
# the paper's Table 4 says its bold marks). ★: $d_z > 0$ and the dual-test rule also holds — Wilcoxon
# below the same level, pointing in the same direction — the rule the paper applies to its audit
# cells, where a t-test result without Wilcoxon agreement is called noise. ▼: a *reversal*, $d_z < 0$
# with $p_t$ below the level (removing the router's top expert costs less than removing its bottom
# one): significant, but evidence against the control, not for it. {glue:md}`paper_rule` Spearman ρ
# is computed over positions between $w_{\text{high}}/w_{\text{low}}$ (both are softmax router
# probabilities at the token) and $D$, with a bias-corrected and accelerated bootstrap interval
# (positions resampled in pairs). The last row gives the two mean loss changes in nats, so the
# effect size can be related to how much either ablation costs at all.

# %% tags=["remove-input"]
display(Markdown("\n\n".join(control_summary_text(control[control.model == name], alpha=alpha) for name in models)))
glue("control_verdict", Markdown(control_verdict_text(control, alpha=alpha)), display=False)

# %% [markdown]
# ## Figure 1: the control against the range of the observational metrics
# Each line is one model's control effect across relative depth (from its first MoE layer on the
# left to its last on the right), with its 95% confidence band. The grey band spans the effect sizes of *all* observational cells
# — four metrics, every audited layer, every model — computed here from the same records. A
# control effect above the band is larger than every population-level statistic's effect on
# this run; whether it is clearly larger depends on how far above the band it lies and whether
# its own interval still reaches into the band (stated below the figure). A control effect
# inside the band is no stronger than what the observational metrics produced. A cell *below*
# the band is a reversal, not a stronger control. Because the band pools every model and layer,
# the text below also compares each control cell with the strongest observational cell of its own
# layer, on the same positions. An asterisk marks a layer with $d_z > 0$ that passes Bonferroni
# within its model on the t-test (see the tables for the dual rule); a ▼ below a point marks a
# reversal ($d_z < 0$) that passes it.

# %% tags=["hide-input"]
observational = stats.audit_table(observational_cells, by=("model", "ranking", "layer"),
                                  high_col="delta_loss_high", low_col="delta_loss_low",
                                  family=("model",), alpha=alpha, power=power)
fig = report.figure1(control, observational)
fig.set_size_inches(report.COLUMN_INCHES, 4.2)  # the column's width
fig.tight_layout()
plt.show()

margins = same_layer_margins(control_against_observational(control, observational), control_cells,
                             observational_cells, n_boot=n_boot, seed=seed)
display(Markdown(figure1_text(control, observational, alpha=alpha, margins=margins)))

# %% [markdown]
# ## Where the signal would come from
# The t-test asks whether $D$ is positive on average; the Spearman correlation asks whether $D$
# grows with how strongly the router prefers the high expert over the low one. The scatter plots
# show the raw material of both: one point per position, the weight ratio on a logarithmic axis,
# $D$ on a symmetric-log axis (linear in a narrow band around zero, stated on the axis, and
# logarithmic outside it, because a few positions carry much larger loss changes than most).

# %% tags=["hide-input"]
abs_d = control_cells["diff"].abs()
linthresh = 10.0 ** np.floor(np.log10(max(float(abs_d[abs_d > 0].quantile(0.1)), 1e-6))) if (abs_d > 0).any() else 1e-3
fig, axes = report.model_panels(models, height=3.4, sharey=True)
for ax, name in zip(axes, models):
    g = control_cells[control_cells.model == name].assign(ratio=lambda d: d.value_high / d.value_low)
    layer_order = sorted(g.layer.unique())
    sns.scatterplot(data=g, x="ratio", y="diff", hue="layer", hue_order=layer_order,
                    palette=sns.color_palette("colorblind", len(layer_order)), s=12, alpha=0.6,
                    linewidth=0, ax=ax)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.legend(title="layer", fontsize=7, title_fontsize=7, loc="best", markerscale=0.8)
report.finish_panels(fig, axes, title="Paired loss difference against the router's preference, per position",
                     ylabel=f"$D = \\Delta L_{{high}} - \\Delta L_{{low}}$ (nats)\nsymlog, linear within ±{linthresh:g}",
                     xlabel="routing-weight ratio $w_{high}/w_{low}$ (log scale)", zero_line=True, legend=False)

# %% [markdown]
# ## How many positions would a detection need?
# For every control cell, the number of positions a two-sided paired t-test needs to detect the
# *observed* $d_z$ with {glue:text}`power:.0%` power at the model's Bonferroni level, beside the smallest $|d_z|$ the
# present n detects with that power. These numbers treat the observed effect as if it were the
# true one, so they are a planning aid for the exercises below, not a verdict.

# %%
plan = control[["model", "layer", "n", "cohens_dz", "alpha_corrected", "mde_dz"]].copy()
plan["n_needed"] = [stats.required_n(d, alpha=a, power=power) if abs(d) > 1e-3 else np.inf
                    for d, a in zip(plan.cohens_dz, plan.alpha_corrected)]
n_col = f"n for {power:.0%} power"
plan = plan.rename(columns={"cohens_dz": "observed d_z", "alpha_corrected": "α_adj",
                            "mde_dz": "detectable |d_z| at n", "n_needed": n_col})

# %% tags=["remove-input"]
same = [c for c in ("n", "α_adj") if plan[c].nunique() == 1]  # stated once in the caption instead of per row
_ = report.show_table(plan.drop(columns=same), labels={c: c for c in plan.columns}, caption="Positions needed to detect each control cell's observed effect"
                      + "".join(f"; {c} = {plan[c].iloc[0]:{',.0f' if c == 'n' else '.3g'}} in every row" for c in same),
                      formats={"observed d_z": "{:+.3f}", "α_adj": "{:.3g}", "detectable |d_z| at n": "{:.3f}",
                               n_col: lambda n: "∞" if not np.isfinite(n) else f"{n:,.0f}"})
glue("power", power, display=False)

# %% [markdown]
# `detectable |d_z| at n` is the smallest effect the t-test finds with probability
# {glue:text}`power` at the current number of positions and the Bonferroni level; the last column
# is the number of positions that would be needed if the observed effect were the true one (∞
# where it is practically zero).

# %% tags=["remove-input"]
paper_n = int(released.stored_statistics(model="deepseek", experiment="control").n.iloc[0])
paper_k = len(paper.LAYERS["olmoe"])
paper_best = paper_control[(paper_control.model == "olmoe")].sort_values("value").iloc[-1]
paper_a = paper.PAPER_ALPHA / paper_k
paper_mde = stats.min_detectable_dz(paper_n, alpha=paper_a, power=power)
display(Markdown(
    f"For comparison, the paper's design (n = {paper_n} positions, Bonferroni over {paper_k} layers, "
    f"α_adj = {paper.PAPER_ALPHA:g}/{paper_k} = {paper_a:.3g}) detects |d_z| ≥ {paper_mde:.3f} with {power:.0%} "
    f"power. If its largest control effect, d = {paper_best.printed} at OLMoE's layer {paper_best.layer}, were the "
    f"true effect, that design would find it only about "
    f"{stats.t_test_power(paper_best.value, paper_n, alpha=paper_a):.0%} of the time."))

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** Whether the router's own, token-conditioned preference among the active experts
# predicts which single-expert ablation costs more at that token, at each audited depth, with the
# uncertainty of each effect; and whether any such effect stands out from the range of effects
# the four population-level metrics produced on the same positions and records. A control effect
# with $d_z > 0$ that clears the dual-test bar at the audit's own per-cell level shows that the
# audit *can* detect an effect of that size, which makes that model's observational null evidence
# against effects of that size to the extent of the audit's power there (never equivalence)
# rather than a failure to look; a control that clears only its own, looser level does not, and one that fails
# leaves that model's null uninterpretable. Model by model:
#
# ```{glue:md} control_reading
# :format: myst
# ```
#
# **Does not show.** That the router "knows" which expert is important in general: the control
# compares only the top and bottom of the active set at one token, removes one expert at a time
# and does not renormalise the remaining weights. A control that stays inside the grey band does
# not by itself show that the audit lacks power either — the power table above says which effect
# sizes were detectable at all. And with the book's default small models, the numbers describe
# those models, not the paper's checkpoints; a comparison with the paper's printed values is in
# the chapter on the released results.

# %% [markdown]
# ## Exercises
# Each exercise changes parameters only. Write down your prediction before running the command
# (from the repository root), then open the expected result. {glue:md}`ex_layers_note`
#
# ````{exercise} 1. Power at a single layer
# :label: 05_routing_weight_control-ex1
# :nonumber:
#
# Pick the layer whose control effect you consider most likely
# to be real, look up the number of positions it needs in the power table above, and predict
# what happens to its confidence interval and p-value with {glue:text}`ex_factor` times as many
# positions. Run, e.g., {glue:md}`ex1_cmd`.
# ````

# %% [markdown]
# ````{solution} 05_routing_weight_control-ex1
# :class: dropdown
#
# The width of the confidence interval of $d_z$ is multiplied by about
# {glue:text}`ex_ci_factor:.2f` (it scales as $1/\sqrt{n}$). With a single audited layer the
# Bonferroni family has size one, so the corrected level is $\alpha$ itself
# ({glue:text}`alpha_plain`) — a reminder that the correction depends on how many tests you
# decided to run. At {glue:text}`ex_n_new` positions and that level the t-test detects
# $|d_z| \ge$ {glue:text}`ex_mde:.3f` with {glue:text}`power:.0%` power. {glue:md}`ex1_cells`
# A cell whose true effect is below that size will often stay non-significant even at the
# larger n; one above it will usually reach $p_t < \alpha$. The records at the larger n also take proportionally longer to compute the
# first time.
# ````

# %% [markdown]
# ````{exercise} 2. Which intervention?
# :label: 05_routing_weight_control-ex2
# :nonumber:
#
# The paper defines the ablation at token $t$ only; the released code
# removes the expert at every position of the sequence where it is routed. Predict at which
# layer the two definitions must give identical results, and where they may differ. Run
#
# ```bash
# make chapter NB=05_routing_weight_control PARAMS="-p mode sequence"
# ```
# ````

# %% [markdown]
# ````{solution} 05_routing_weight_control-ex2
# :class: dropdown
#
# At the last layer of the network the two definitions coincide: removing the expert at an
# earlier position changes only that position's residual stream, and no later layer exists to
# carry it to position $t$ through attention. The per-position loss changes, and therefore every
# statistic of that column, agree up to floating-point rounding. At earlier layers the
# sequence-wide ablation also removes the expert's contribution at earlier tokens, which *can*
# reach $t$ through attention. Whether it changes the measurements appreciably is not settled by
# the definitions: it is measured, on these models and positions, in the chapter on intervention
# definitions (per layer, the ratio of the typical loss change under the two definitions, and
# how far each cell's $d_z$ moves between them). Compare your run with that chapter rather than
# expecting the sequence-wide loss changes to be larger; a verdict that changes between the two
# runs rests on the definition, one that does not is robust to it. The run takes longer, because
# every ablation re-computes the prefix instead of reusing the clean key/value cache.
# ````

# %% [markdown]
# ````{exercise} 3. A fresh draw
# :label: 05_routing_weight_control-ex3
# :nonumber:
#
# Keep everything else and draw a different set of positions. Predict
# which verdicts in the tables survive. Run
#
# ```bash
# make chapter NB=05_routing_weight_control PARAMS="-p seed 7"
# ```
# ````

# %% [markdown]
# ````{solution} 05_routing_weight_control-ex3
# :class: dropdown
#
# Two independent draws of $n$ positions give estimates of $d_z$ whose difference has a standard
# deviation of about $\sqrt{2}\,\mathrm{SE}$, where SE is the standard error of $d_z$ (here
# derived from the tables' 95% intervals as half-width / $1.96$: {glue:md}`ex_se`). A typical change
# is therefore of that order, somewhat smaller than the interval's half-width ({glue:md}`ex_halfwidth`),
# and about one cell in twenty moves by more than twice $\sqrt{2}\,\mathrm{SE}$. Cells whose
# interval was far from zero usually keep their sign; a verdict whose $p_t$ or $p_W$ lies near the
# Bonferroni level can change in either direction, and uncorrected "bold" cells of the observational kind come
# and go. A verdict that does not survive a new seed was never strong evidence. The paper's
# largest control effect, at $p_t$ = {glue:md}`paper_best_p` against
# $\alpha_{\text{adj}}$ = {glue:text}`paper_control_alpha:.3g`, rests on one draw of positions
# and is reported on its own, as the one result to survive Bonferroni correction; {glue:md}`paper_trend`.
# ````

# %% tags=["remove-input"]
common_last = sorted({max(lay.moe_layers) for lay in layouts.values()})
common_first = max(min(lay.moe_layers) for lay in layouts.values())
ex_layer = common_last[0] if len(common_last) == 1 else max(layouts[models[0]].moe_layers)
glue("ex_layers_note", Markdown(
    (f"Layer {ex_layer} is the last MoE layer of every model here, " if len(common_last) == 1 else
     f"The last MoE layers differ between the models ({', '.join(f'{m}: {max(l.moe_layers)}' for m, l in layouts.items())}); ")
    + f"layer {common_first} is the first layer that is MoE in all of them."), display=False)
factor = 4
glue("ex_factor", factor, display=False)
glue("ex_ci_factor", factor ** -0.5, display=False)
glue("ex1_cmd", Markdown(f"`make chapter NB=05_routing_weight_control PARAMS=\"-p layers '[{ex_layer}]' "
                         f"-p n_positions {factor * n_positions}\"`"), display=False)
glue("alpha_plain", alpha, display=False)
half = (control.dz_ci_high - control.dz_ci_low) / 2
se = half / 1.959964
glue("ex_se", Markdown(f"√2·SE between {np.sqrt(2) * se.min():.3f} and {np.sqrt(2) * se.max():.3f}"), display=False)
mde_new = stats.min_detectable_dz(factor * n_positions, alpha=alpha, power=power)
big = control[control.cohens_dz.abs() >= mde_new]
glue("ex_n_new", factor * n_positions, display=False)
glue("ex_mde", mde_new, display=False)
glue("ex1_cells", Markdown("Of this run's control cells, " + (
    "none has an observed |d_z| that large." if big.empty else join_words(
        f"{r.model} layer {r.layer} ({fmt_signed(r.cohens_dz)})" for r in big.itertuples())
    + f" {'has' if len(big) == 1 else 'have'} an observed |d_z| at least that large.")), display=False)
glue("ex_halfwidth", Markdown(f"about {half.mean():.2f}" if half.max() - half.min() < 0.005 else
                              f"between {half.min():.2f} and {half.max():.2f}"), display=False)
paper_p = paper.paper_printed_values().query("table == 4 and quantity == 'p_t'")
glue("paper_best_p", Markdown(paper_p[paper_p.layer == paper_best.layer].printed.iloc[0]), display=False)
notes = paper_control_notes()
glue("paper_rule", Markdown(notes["rule"]), display=False)
glue("paper_trend", Markdown(notes["trend"]), display=False)
glue("control_beaten", Markdown(control_beaten_text(margins)), display=False)
glue("control_reading", Markdown(control_reading_text(control, observational, power=power)), display=False)
