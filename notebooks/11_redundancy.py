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
# # Beyond the paper (3): does redundancy explain the null?
#
# :::{admonition} Learning objectives
# :class: tip
# About {glue:text}`reading_minutes` minutes of prose. After this chapter you can
# - compare models that differ only in routing (top-k, size of the expert pool) and in training seed;
# - tell a setting effect from a training accident with more than one seed per setting;
# - test whether redundancy explains the audit's null result.
# :::

# %% tags=["parameters", "hide-input"]
models = ["olmoe-e64-k2-s0", "olmoe-e64-k2-s1", "olmoe-e64-k4-s0", "olmoe-e64-k4-s1", "olmoe-e64-k8-s0",
          "olmoe-e64-k8-s1", "olmoe-e64-k16-s0", "olmoe-e64-k16-s1", "olmoe-e8-k2-s0", "olmoe-e8-k2-s1"]  # the redundancy family, or your own models that differ in routing
layers = None  # None: up to five depth-proportional MoE layers (all of them in a model with fewer); or a list used for every model
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
alpha = 0.05  # family-wise level of each model's audit and control; level of the trend and seed tests
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
text_form = "auto"  # "auto": the corpus's own form (the embedded corpus in WikiText-2's tokenized form, which the shipped models were trained on; WikiText-2 and a file as served); "released": each line as served (WikiText-2: leading space and line break kept, as the released code feeds it); "stripped"; "wikitext": the embedded corpus in WikiText-2's form
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %% tags=["hide-input"]
from moeaudit import audit, report
from moeaudit.tooling import params

params.validate("11_redundancy", globals())  # refuses a bad value before any work
corpus_source = report.show_corpus(corpus, data_dir=data_dir, text_form=text_form)
report.glue_values(reading_minutes=report.chapter_reading_minutes("11_redundancy"))

# %% [markdown]
# The paper reads its null result through redundancy. At OLMoE's early and middle layers,
# removing all but one of the active experts leaves the mean loss almost unchanged, so "any
# selection criterion that removes experts at these layers will look approximately harmless"
# {cite}`engmann2026audit`. That, it argues, is why pruning methods built on routing statistics
# succeed without identifying dispensable experts. All three of its models are high-redundancy
# (many active experts per token), and it leaves open "whether observational metrics regain
# validity in low-redundancy architectures such as Switch-style and Mixtral-8x7B". Public
# checkpoints that differ in everything at once cannot settle that. This chapter is a small-scale
# analogue of the comparison: a family of models that differ in routing and as little else as
# possible.
#
# **The family.** Small `OlmoeForCausalLM` models trained from scratch on the same data, with the
# same tokenizer, width, depth, steps, balance-loss coefficient and seed policy. They differ in
# routing: {glue:md}`family_settings`. Each setting is trained from {glue:md}`family_seeds`, so the
# spread between models of one setting is measured beside the effect of the setting. Recipes and
# quality gates are in appendix A1.
#
# **Redundancy here** is the number of active experts per token, top-k: the more experts share a
# token, the more of them can stand in for a removed one. The paper describes its models by the
# active share k/E. At a fixed number of experts E the two orders agree; the setting with few
# experts has the same k as one setting of the larger pool but a far larger k/E, so it is meant to
# tell them apart (whether it can at this power, the answer on the small pool says).
#
# **What else changes with k.** With the expert width fixed, a larger k means more active
# parameters per token; the small pool has fewer parameters in total; and the Switch-style balance
# loss, at a fixed coefficient, pushes harder towards balance at larger k, because its balanced
# value grows with k. So "differ in routing" means routing and what routing brings with it.
#
# **Protocol.** For every model, the book's machinery runs unchanged:
# - the audit of the observational metrics (chapter 4);
# - the routing-weight control (chapter 5);
# - progressive ablation (chapter 6).
#
# All three read one seeded draw of {glue:text}`n_positions` positions per model. Each model is
# its own Bonferroni family, as in the paper: {glue:md}`run_families`. Across models, the chapter
# asks:
# 1. Does any observational metric become valid as redundancy falls?
# 2. Does the control's signal grow as redundancy falls?
# 3. Do the settings differ by more than models of one setting do?
# 4. Where does the paper's explanation hold, and where not?
# 5. Does a smaller share of the output per expert explain the same facts without any compensation?
# 6. Is it the number of active experts, or the active share k/E, that matters?

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.lines import Line2D
from myst_nb import glue

from moeaudit import report, stats
from moeaudit.chapters import redundancy
from moeaudit.audit import (paired_cells, prepare, progressive_records, progressive_summary,
                            single_expert_records)
from moeaudit.metrics import METRICS, ROUTING_WEIGHT
from moeaudit.zoo import REDUNDANCY_SEEDS, REDUNDANCY_SETTINGS

report.use_book_style()
power = 0.8  # power at which the smallest detectable effect is stated

# %% tags=["remove-input"]
glue("n_positions", n_positions, display=False)
glue("alpha", alpha, display=False)
glue("power", power, display=False)
glue("power_pct", Markdown(f"{power:.0%}"), display=False)
ratio_names = {(64, 8): " (OLMoE's ratio)", (8, 2): " (Mixtral's ratio)"}
glue("family_settings", Markdown(report.join_words(f"{E} routed experts with top-{k}{ratio_names.get((E, k), '')}"
                                                   for E, k in REDUNDANCY_SETTINGS)), display=False)
glue("family_seeds", Markdown(f"{len(REDUNDANCY_SEEDS)} seeds ({report.join_words(REDUNDANCY_SEEDS)})"), display=False)

# %% [markdown]
# ## The records
# Every model gets single-expert ablations of every active expert at each position and audited
# layer; the observational metrics and the control are read from them. It also gets progressive
# ablations: the m highest-weight active experts removed together, for every m from one expert
# to all but one. Records are cached under a key made of every parameter that produced them.

# %%
single, prog, observational_cells, control_cells, layouts, intros, hidden = [], [], [], [], {}, [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device, remote=remote,
                  corpus=corpus_source, text_form=text_form, data_dir=data_dir, results_dir=results_dir)
    lay = layouts[name] = ctx.model.layout
    hidden[name] = int(ctx.model.hf.config.hidden_size)
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    depth = dict(zip(audited, report.relative_depth(audited, lay.moe_layers)))
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=min_context, batch_size=batch_size)
    single.append(rec)
    for rankings, sink in ((list(METRICS), observational_cells), ([ROUTING_WEIGHT], control_cells)):
        c = paired_cells(rec, ctx.metrics, rankings=rankings)
        sink.append(c.assign(rel_depth=c.layer.map(depth)))
    prog.append(progressive_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                    min_context=min_context, batch_size=batch_size))
    intros.append(audit.model_summary(name, ctx, audited, rec))
single, prog = pd.concat(single, ignore_index=True), pd.concat(prog, ignore_index=True)
members = redundancy.member_table(layouts)

# %% tags=["remove-input"]
shapes = sorted({(lay.n_layers, hidden[n]) for n, lay in layouts.items()})
glue("run_shape", Markdown(report.join_words(f"{L} decoder layers and hidden size {H}" for L, H in shapes)), display=False)
glue("intros", Markdown("\n\n".join(intros)), display=False)
_ = report.show_table(members, labels={"n_experts": "routed experts E", "top_k": "top-k", "k_over_E": "k/E",
                                      "seed": "training seed"}, formats={"k/E": "{:.3f}"}, max_rows=None,
                      caption="The models of this run: routed experts E, top-k, the active share k/E and the training seed")

# %% [markdown]
# ````{admonition} The models and their records
# :class: dropdown
# {glue:md}`intros`
# ````

# %% [markdown]
# ## Per-cell statistics
# The same tests as chapters 4 and 5. Each cell gets a paired t-test with Cohen's $d_z$ and its
# exact confidence interval, plus the Wilcoxon signed-rank test. A cell is *valid* in the sense
# of the paper's Definition 2.1 when both tests pass at the model's Bonferroni level with the
# same, positive sign. The summary has one row per model, in two tables (the audit, the control
# and the deepest removal; then the single-expert ablations); their columns are defined in their
# captions.

# %%
cells_obs = pd.concat(observational_cells, ignore_index=True)
cells_ctl = pd.concat(control_cells, ignore_index=True)
audit = stats.audit_table(cells_obs, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                          low_col="delta_loss_low", family=("model",), alpha=alpha, power=power)
control = stats.audit_table(cells_ctl, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                            low_col="delta_loss_low", family=("model",), alpha=alpha, power=power)
depths = cells_obs[["model", "layer", "rel_depth"]].drop_duplicates()
audit, control = audit.merge(depths, on=["model", "layer"]), control.merge(depths, on=["model", "layer"])
validity = redundancy.validity_by_model(audit)
prog_summary = progressive_summary(prog, alpha=alpha)
summary = redundancy.per_model_table(members, audit=audit, control=control, single=single, progressive=prog)

# %% tags=["remove-input"]
NAMES = {"audit_max_abs_dz": "audit: largest |d_z|", "audit_valid_cells": "audit: valid cells",
         "control_mean_dz": "control: mean d_z", "control_valid_cells": "control: valid cells",
         "single_mean_dl": "mean ΔL (nats)", "single_mean_abs_dl": "mean |ΔL| (nats)",
         "single_mean_gap": "mean gap norm", "single_dl_per_gap": "ΔL per unit gap norm",
         "single_abs_dl_per_gap": "|ΔL| per unit gap norm", "deepest_mean_dl": "deepest removal: mean ΔL (nats)",
         "gap_growth": "gap norm, last / first audited layer"}  # the quantities' names in every table below
num = lambda v, f="{:.3g}": "—" if pd.isna(v) else f.format(v)  # noqa: E731
yes_no = lambda v: "—" if pd.isna(v) else ("yes" if v else "no")  # noqa: E731


def with_ci(est, lo, hi) -> str:
    """An estimate and its interval as one cell, two significant digits: ``+0.12 [+0.05, +0.19]``."""
    return report.fmt_with_ci(est, lo, hi, digits=2, significant=True)


for part in (["audit_max_abs_dz", "audit_valid_cells", "control_mean_dz", "control_valid_cells", "deepest_mean_dl",
              "gap_growth"], ["single_mean_dl", "single_mean_abs_dl", "single_mean_gap", "single_dl_per_gap",
                              "single_abs_dl_per_gap"]):
    _ = report.show_table(summary[["model", *part]], labels=NAMES, max_rows=None,
                          formats={NAMES[q]: "{:.0f}" if q.endswith("cells") else "{:.3g}" for q in part},
                          caption="Per model: " + "; ".join(f"{NAMES[q]} = {redundancy.QUANTITIES[q]}" for q in part))
report.show_untested_note(audit)
_ = report.show_untested_note(control, what="layer")
fam_audit = audit.groupby("model").family_size.first()
fam_control = control.groupby("model").family_size.first()
glue("run_families", Markdown(
    f"{report.join_words(sorted(set(fam_audit)))} cells per model for the audit (Bonferroni level "
    f"{report.join_words(sorted({f'{alpha / n:.3g}' for n in fam_audit}))}) and "
    f"{report.join_words(sorted(set(fam_control)))} for the control (level "
    f"{report.join_words(sorted({f'{alpha / n:.3g}' for n in fam_control}))}), at α = {alpha:g}"), display=False)

# %% [markdown]
# ## Effect sizes against redundancy
# Each point is one cell, a (model, layer) pair, with its confidence interval (not corrected for
# the family, so an interval that excludes zero is not a valid cell by itself). The x-axis is
# top-k on a log scale; the seeds of a setting and the layers of a model sit side by side, colour
# gives the layer's relative depth, and hollow markers are the setting with the small expert pool.
# Points above zero mean the ranking predicts correctly: the expert it ranks higher costs more to
# remove. The last panel is the routing-weight control; the slot beside it holds the key.

# %% tags=["hide-input"]
seeds = sorted(members.seed.dropna().unique())
pools = sorted(members.n_experts.unique(), reverse=True)
cmap = plt.get_cmap("viridis")


def x_position(top_k, seed_, n_experts, rel_depth=0.5) -> float:
    """Top-k, nudged so that the seeds, the expert pools and the layers of one top-k do not overlap."""
    i_seed = seeds.index(seed_) if seed_ in seeds else 0
    return top_k * 2 ** (0.16 * (i_seed - (len(seeds) - 1) / 2) + 0.34 * pools.index(n_experts)
                         + 0.08 * (rel_depth - 0.5))


def marker_style(seed_, n_experts, color) -> dict:
    style = {"marker": "os^D"[seeds.index(seed_) % 4] if seed_ in seeds else "o", "markersize": 4.5, "color": color}
    if n_experts != pools[0]:
        style.update(markerfacecolor="white", markeredgecolor=color)
    return style


def effect_panel(ax, t: pd.DataFrame, title: str) -> None:
    t = t.merge(members[["model", "top_k", "n_experts", "seed"]], on="model")
    for r in t.itertuples():
        color = cmap(float(r.rel_depth))
        ax.errorbar(x_position(r.top_k, r.seed, r.n_experts, r.rel_depth), r.cohens_dz,
                    yerr=[[r.cohens_dz - r.dz_ci_low], [r.dz_ci_high - r.cohens_dz]], linestyle="none",
                    elinewidth=0.8, **marker_style(r.seed, r.n_experts, color))
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ks = sorted(members.top_k.unique())
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_title(title)


# %% tags=["hide-input"]
panels = [(audit[audit.ranking == m], m.replace("_", " ")) for m in METRICS] + [(control, "control: routing weight")]
fig, axes = report.panel_grid(len(panels) + 1, height=2.7, sharey=True)  # the last slot holds the key
for i, (ax, (t, title)) in enumerate(zip(axes, panels)):
    effect_panel(ax, t, title)
    ax.set_xlabel("top-k (active experts per token)", fontsize=9)
    ax.set_ylabel("Cohen's $d_z$ (95% CI)" if i % 2 == 0 else "")
key = axes[-1]
key.axis("off")
handles = [Line2D([], [], linestyle="", **marker_style(s_, pools[0], "0.3"), label=f"seed {s_}") for s_ in seeds]
handles += [Line2D([], [], linestyle="", **marker_style(seeds[0], E, "0.3"), label=f"E = {E}") for E in pools]
key.legend(handles=handles, loc="upper center", fontsize=8, ncol=2, frameon=False)
bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), cax=key.inset_axes([0.1, 0.2, 0.8, 0.1]), orientation="horizontal")
bar.set_label("relative depth of the layer", fontsize=9)
fig.suptitle("Audit and control effect per cell against the number of active experts")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Progressive ablation and the gap norm against redundancy
# Left: the mean loss change with all active experts but one removed, per audited layer, with its
# confidence interval, against top-k. The number removed grows with top-k: one expert at the
# smallest top-k, all but one of many at the largest. Right: per model, the mean gap norm
# $\lVert y_t - y_t^{(-e)}\rVert$ of a single-expert ablation at each audited layer over that of
# its first audited layer. The paper uses this ratio to show that an expert's contribution grows
# with depth in its checkpoints; here the last audited layer's ratio ranges over
# {glue:md}`gap_last_range`.

# %% tags=["hide-input"]
deepest = prog_summary[prog_summary.k == prog_summary.groupby("model").k.transform("max")].merge(members, on="model")
growth = redundancy.gap_growth(single).merge(members, on="model")
glue("gap_last_range", Markdown(report.value_span(growth.groupby("model").growth.last(), "{:.2f}")), display=False)

# %% tags=["hide-input"]
fig, (left, right) = plt.subplots(1, 2, figsize=(report.COLUMN_INCHES, 4.6))
settings = list(dict.fromkeys(members.sort_values(["n_experts", "top_k"], ascending=[False, True]).setting))
colors = dict(zip(settings, sns.color_palette("colorblind", len(settings))))
for r in deepest.itertuples():
    rel = r.layer / max(1, deepest[deepest.model == r.model].layer.max())
    left.errorbar(x_position(r.top_k, r.seed, r.n_experts, rel), r.mean, yerr=[[r.mean - r.ci_low], [r.ci_high - r.mean]],
                  linestyle="none", elinewidth=0.8, **marker_style(r.seed, r.n_experts, colors[r.setting]))
left.set_xscale("log", base=2)
left.set_xticks(sorted(members.top_k.unique()))
left.set_xticklabels(sorted(members.top_k.unique()))
left.minorticks_off()
left.axhline(0, color="0.3", linewidth=0.8)
left.set_xlabel("top-k (deepest removal:\nall active experts but one)", fontsize=9)
left.set_ylabel(f"mean ΔL (nats), {1 - alpha:.0%} CI")
left.set_title("Deepest removal, per layer")
for (model, setting, seed_), g in growth.groupby(["model", "setting", "seed"], sort=False):
    right.plot(g.layer, g.growth, linestyle="-" if seed_ == seeds[0] else "--", color=colors[setting],
               **{k: v for k, v in marker_style(seed_, g.n_experts.iloc[0], colors[setting]).items() if k != "color"})
right.axhline(1, color="0.3", linewidth=0.8)
right.set_xticks(sorted(growth.layer.unique()))
right.set_xlabel("decoder layer", fontsize=9)
right.set_ylabel("mean gap norm /\nfirst audited layer's")
right.set_title("Gap norm, relative to the first")
legend = [Line2D([], [], color=colors[s_], marker="o", linestyle="-", label=s_) for s_ in settings]
legend += [Line2D([], [], color="0.3", linestyle="-" if s_ == seeds[0] else "--", **{
    k: v for k, v in marker_style(s_, pools[0], "0.3").items() if k != "color"}, label=f"seed {s_}") for s_ in seeds]
fig.legend(handles=legend, loc="lower center", fontsize=8, ncol=4, title="setting (both panels)", title_fontsize=8,
           frameon=False)
fig.suptitle("Redundancy and depth: what removing experts does, per routing setting")
fig.tight_layout(rect=(0, 0.045 * (-(-len(legend) // 4) + 1) + 0.02, 1, 1))  # room for the legend's rows and title
plt.show()

# %% [markdown]
# ## Settings against models of one setting
# For each per-model quantity, a one-way ANOVA with the routing setting as the factor and the
# models of a setting as replicates (`moeaudit.chapters.redundancy.setting_anova`). It asks whether the
# setting means differ by more than the models of one setting do. Two things make up that
# within-setting spread: the training seed, and the sampling error of each model's value, which
# rests on one shared draw of positions. The p-values are Holm-adjusted over the quantities
# (*p (Holm)*). *SD between settings* is the standard deviation of the setting means, *SD within
# setting* the pooled within-setting one, *ratio* the first over the second, *η²* the share of the
# total variance between settings. With few models per setting the test is weak; *min. detectable
# f* (in the caption when it is the same for every quantity) is the smallest spread of the setting
# means, in within-setting SDs (Cohen's f), that it detects with {glue:md}`power_pct` power at
# Holm's strictest level, and *min. detectable SD* the same as a standard deviation of the setting
# means in the quantity's units, computed like *SD between settings* (divisor one less than the
# number of settings; Cohen's f divides by the number itself), so that the two columns compare.

# %%
anova = redundancy.setting_anova(summary, alpha=alpha, power=power)

# %% tags=["remove-input"]
design = ["settings", "models", "df_between", "df_within"]
fixed = all(anova[c].nunique() == 1 for c in design)  # the same design for every quantity: said once, in the caption
one_f = anova.min_detectable_f.nunique(dropna=False) == 1  # then also the detectable f: in the caption
_ = report.show_table(
    anova.assign(quantity=anova.quantity.map(NAMES))[
        ["quantity", *([] if fixed else design), "F", "p", "p_holm", "sd_between", "sd_seed", "ratio", "eta_sq",
         *([] if one_f else ["min_detectable_f"]), "min_detectable_sd"]],
    labels={"p_holm": "p (Holm)", "sd_between": "SD between settings", "sd_seed": "SD within setting",
            "eta_sq": "η²", "min_detectable_f": "min. detectable f", "min_detectable_sd": "min. detectable SD"},
    formats={"F": "{:.3g}", "p": "{:.2g}", "p (Holm)": "{:.2g}", "SD between settings": "{:.3g}",
             "SD within setting": "{:.3g}", "ratio": "{:.3g}", "η²": "{:.3g}", "min. detectable f": "{:.3g}",
             "min. detectable SD": "{:.3g}"}, max_rows=None,
    caption="One-way ANOVA per quantity: routing setting as the factor, models of a setting as replicates"
    + (f" ({anova.settings.iloc[0]} settings, {anova.models.iloc[0]} models: F on {anova.df_between.iloc[0]} and "
       f"{anova.df_within.iloc[0]} degrees of freedom)" if fixed else "")
    + (f"; min. detectable f = {num(anova.min_detectable_f.iloc[0])} for every quantity" if one_f else ""))

# %% [markdown]
# ## The explanation's predictions
# If redundancy hides single experts' effects, then as top-k grows at a fixed number of experts
# (the larger pool; the small pool has a single top-k and enters the pool comparison below):
# - a single-expert ablation should damage the model less: its mean loss change $\Delta L$, with
#   its sign, should fall. Its mean size $|\Delta L|$ is reported beside it, but it is not the
#   damage: it also counts removals that lower the loss;
# - both should fall by more than the removed output itself, measured per unit of the gap norm
#   $\lVert y_t - y_t^{(-e)}\rVert$. This is the part that only compensation explains (next section);
# - the control's signal should weaken;
# - the observational metrics should lose whatever validity they have at small top-k.
#
# The control is the weakest test. Cohen's $d_z$ is scale-free, so loss changes that all shrink by
# the same factor leave it unchanged. The control also compares the extremes of the k active
# experts, a contrast that widens as k grows.
#
# Each row is an ordinary least-squares trend of the per-model values on $\log_2 k$, the models of
# every seed as separate points, with Holm's adjustment over the rows
# (`moeaudit.chapters.redundancy.explanation_checks`). A trend that is not detected at level
# α = {glue:text}`alpha` after that adjustment is reported as inconclusive, not as a refutation:
# its *holds* cell shows a dash (—), as does that of a row for which no direction is predicted. The first table gives each trend and its test; the second its robustness
# and power. For a row without a detected trend, *min. detectable slope* is the slope the test
# would have caught with {glue:md}`power_pct` power at Holm's strictest level, and *equivalence
# bound* the narrowest band around zero that an equivalence test at that level could have shown.
# *Specific* is "no" where the output-share alternative predicts the same direction; *seed slopes*
# are the slopes fitted on each seed's models alone, and *seeds agree* says whether they all share
# the pooled slope's sign; *Spearman ρ* is the rank correlation of the values with k, beside the
# fitted line.

# %%
checks = redundancy.explanation_checks(summary, alpha=alpha, power=power)

# %% tags=["remove-input"]
def trend_tables(t: pd.DataFrame, caption: str, *, verdict: str, against: bool = False) -> None:
    """A trend table (explanation_checks, share_checks) as two: the trend and its test, then its
    robustness and power; rows that could not be fitted are listed under them with the reason."""
    n = t.n.dropna().unique()
    size = f" ({report.plural(int(n[0]), 'model')} per trend)" if len(n) == 1 else ""
    test = pd.DataFrame({"check": t.check, **({"predicted": t.predicted} if "predicted" in t else {}),
                         verdict: t[verdict], "slope per doubling of k [95% CI]": [
                             with_ci(*v) for v in zip(t.slope, t.ci_low, t.ci_high)],
                         **({"tested against": t.reference_slope.map("{:+g}".format)} if against else {}),
                         "p": t.p.map(lambda v: num(v, "{:.2g}")), "p (Holm)": t.p_holm.map(lambda v: num(v, "{:.2g}")),
                         **({"holds": t.holds.map(yes_no)} if "holds" in t else {})})
    _ = report.show_table(test, max_rows=None, caption=caption + size)
    power_ = pd.DataFrame({"check": t.check, **({"specific": t.specific.map(yes_no)} if "specific" in t else {}),
                           "seed slopes": [", ".join(f"{v:+.3g}" for v in d.values()) if d else "—"
                                           for d in t.seed_slopes],
                           "seeds agree": t.seeds_agree.map(yes_no),
                           "Spearman ρ (p)": [num(r, "{:+.2f}") + ("" if pd.isna(p) else f" ({p:.2g})")
                                              for r, p in zip(t.spearman_rho, t.spearman_p)],
                           "min. detectable slope": t.min_detectable_slope.map(num),
                           "equivalence bound": t.equivalence_bound.map(num)})
    _ = report.show_table(power_, max_rows=None, caption="The same trends: seeds, rank correlation and power")
    notes = [f"*{r.check}*: {r.reason}." for r in t.itertuples() if r.reason]
    if notes:
        display(Markdown("Not fitted: " + " ".join(notes)))


trend_tables(checks, "Trend of each per-model quantity against log2(top-k), at the larger expert pool",
             verdict="observed")

# %% [markdown]
# ## The output-share alternative
# A fall of the single-expert effect with top-k does not need compensation. Each of the k active
# experts carries part of the block's output; if that part is about $1/k$, removing one changes
# the output, and a loss that responds in proportion, by about $1/k$, with no expert standing in
# for another. On a log-log scale that share alone predicts a slope of $-1$ per doubling of k.
# The tables fit $\log_2$ of the mean removed output (gap norm) and of the mean $|\Delta L|$ on
# $\log_2 k$ and tests each slope against $-1$, with Holm's adjustment over the two rows
# (`moeaudit.chapters.redundancy.share_checks`). A nominal $1/k$ ignores how the combine weights and the
# experts' output norms change with k, so the per-unit rows of the table above, which divide by the
# measured removed output, are the direct test: only a loss change that falls faster than the
# removed output leaves something for compensation to explain.

# %%
shares = redundancy.share_checks(summary, alpha=alpha, power=power)

# %% tags=["remove-input"]
trend_tables(shares, "Log-log slope against log2(top-k), tested against the slope −1 of a 1/k output share "
             "(the damage row: k times the mean ΔL, against a slope of 0)", verdict="relation", against=True)

# %% [markdown]
# ## The small pool: top-k or k/E?
# The setting with the small pool has the same top-k as one setting of the large pool and the same
# active share k/E as another. If the number of active experts is what lets experts stand in for
# one another, it should match the first; if the active share is, the second. Each comparison is a
# pooled two-sample t-test of the per-model values, the models of a setting as replicates, with
# Holm's adjustment over all comparisons (`moeaudit.chapters.redundancy.pool_comparison`).
# The first table gives each difference and its test, the second how to read it. *Min. detectable
# SD* is the smallest difference, in within-setting SDs, that a comparison detects with
# {glue:md}`power_pct` power at Holm's strictest level; *ranges overlap* says whether the two
# settings' models overlap; *closer* marks the reference nearer the small pool's mean (a
# description, not a test). The small pool also has fewer expert parameters, which no comparison
# here separates from k/E.

# %%
pools = redundancy.pool_comparison(summary, alpha=alpha, power=power)

# %% tags=["remove-input"]
if pools.empty:
    display(Markdown("Every model of this run has the same number of routed experts: there is no smaller pool."))
else:
    one = pools.setting.nunique() == 1  # one small pool: named in the caption
    base = pd.DataFrame({"quantity": pools.quantity.map(NAMES), **({} if one else {"setting": pools.setting}),
                         "against": pools.reference + " (" + pools.comparison + ")"})
    _ = report.show_table(base.assign(**{
        (f"mean, {pools.setting.iloc[0]}" if one else "mean"): pools["mean"].map(num),
        "reference mean": pools.mean_ref.map(num),
        "difference [95% CI]": [with_ci(*v) for v in zip(pools["diff"], pools.ci_low, pools.ci_high)],
        "p": pools.p.map(lambda v: num(v, "{:.2g}")), "p (Holm)": pools.p_holm.map(lambda v: num(v, "{:.2g}"))}),
        max_rows=None, caption=(f"{pools.setting.iloc[0]} against " if one else "Each smaller expert pool against ")
        + "the large pool at the same top-k and at the same k/E (pooled two-sample t-test of the models' values)")
    _ = report.show_table(base.assign(**{
        "observed": pools.observed, "ranges overlap": pools.ranges_overlap.map(yes_no), "closer": pools.closer.map(yes_no),
        "min. detectable SD": pools.min_detectable_sd.map(num),
        "min. detectable difference": pools.min_detectable_diff.map(num)}), max_rows=None,
        caption="The same comparisons: the verdict after Holm's adjustment, the overlap of the models, and power")
    notes = [f"*{NAMES[r.quantity]}* against {r.reference}: {r.reason}." for r in pools.itertuples() if r.reason]
    if notes:
        display(Markdown("Not tested: " + " ".join(notes)))

# %% tags=["remove-input"]
lead = models[0]
mde_audit = stats.min_detectable_dz(n_positions, alpha=alpha / int(fam_audit[lead]), power=power)
mde_control = stats.min_detectable_dz(n_positions, alpha=alpha / int(fam_control[lead]), power=power)
answers = redundancy.answer_text(summary, validity, anova, checks, alpha=alpha, mde_audit=mde_audit,
                                 mde_control=mde_control, power=power, shares=shares, pools=pools)
for key, text in answers.items():
    glue(f"answer_{key}", Markdown(text), display=False)
glue("control_rule", Markdown(redundancy.control_rule_text(
    control, audit_levels={m: alpha / int(fam_audit[m]) for m in fam_audit.index})), display=False)

# %% [markdown]
# ## Answers
# **1. Does any observational metric become valid as redundancy falls?** {glue:md}`answer_validity`
# {glue:md}`control_rule`
#
# **2. Does the control's signal grow?** {glue:md}`answer_control`
#
# **3. Do the settings differ by more than models of one setting do?** A one-way ANOVA over all
# settings, the small pool included, with several degrees of freedom between settings. The trends
# of the next answer spend one degree of freedom on an ordered change with top-k at the larger pool, so
# they have more power against such a change: a quantity can be "not distinguishable" here and
# still show a trend there.
#
# ```{glue:md} answer_seeds
# :format: myst
# ```
#
# **4. Where does the paper's explanation hold?** Each prediction, tested as a trend of the
# per-model values against top-k at the larger expert pool:
#
# ```{glue:md} answer_explanation
# :format: myst
# ```
#
# **5. Does a smaller output share per expert explain the same facts without compensation?**
#
# ```{glue:md} answer_share
# :format: myst
# ```
#
# **6. Top-k or k/E?** The small pool against the large one:
#
# ```{glue:md} answer_pool
# :format: myst
# ```

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** It shows how the book's audit, control and progressive ablation change as the number
# of active experts changes with data, width, depth and steps held fixed (each setting replicated over
# training seeds), and whether the
# change exceeds the spread between models of one setting. It is a small-scale analogue of the
# comparison the paper leaves open.
#
# **Does not show.** It does not show the behaviour of large models. The models of this run have
# {glue:md}`run_shape`, and they are trained for minutes. Redundancy in a trained 7B model may
# come from width and depth as much as from top-k. Routing is not the only thing that varies: the
# active parameters grow with k, the small pool has fewer parameters, and the balance loss
# presses harder at larger k. A design with finer experts at larger k would hold the active
# compute fixed. The within-setting spread rests on few models per setting, so the ANOVA and the
# comparison of the expert pools have little power, and both assume equal spread in every setting.
# The small pool differs from the large one in k/E and in its number of parameters at once. The
# per-unit quantities divide by the removed output's norm, which assumes the loss responds to the
# removed output in proportion; a residual stream whose scale differs between settings would move
# them too. The null results are bounded by the
# smallest effects a cell can detect, stated with the answers; they do not show that the effects
# are zero.
#
# ## Exercises
# ````{exercise} 1. One seed
# :label: 11_redundancy-ex1
# :nonumber:
#
# Run the chapter on the seed-0 models only:
#
# ```bash
# make chapter NB=11_redundancy PARAMS="-p models '[\"olmoe-e64-k2-s0\", \"olmoe-e64-k4-s0\", \"olmoe-e64-k8-s0\", \"olmoe-e64-k16-s0\", \"olmoe-e8-k2-s0\"]'"
# ```
# ````

# %% [markdown]
# ````{solution} 11_redundancy-ex1
# :class: dropdown
#
# The records are reused from the cache: each model's records are keyed by the model and the
# positions, not by the list of models. The ANOVA table shows no F, p, ratio or η², and
# the comparison of the expert pools has no test: with one model per setting there is no
# within-setting spread to compare with. The trends are fitted
# on {glue:text}`ex1_n` points instead of {glue:text}`ex1_n_all`. The control's slope becomes
# {glue:md}`ex1_slope`. A conclusion that rests on one model per setting cannot tell a setting
# effect from a training accident.
# ````

# %% [markdown]
# ````{exercise} 2. Fewer positions
# :label: 11_redundancy-ex2
# :nonumber:
#
# Run with `-p n_positions 50`:
#
# ```bash
# make chapter NB=11_redundancy PARAMS="-p n_positions 50"
# ```
# ````

# %% [markdown]
# ````{solution} 11_redundancy-ex2
# :class: dropdown
#
# {glue:md}`ex2_expected`
# ````

# %% tags=["hide-input"]
one_seed = summary[summary.seed == summary.seed.min()]
big_pool = summary.n_experts.mode().iloc[0]
glue("ex1_n", int((one_seed.n_experts == big_pool).sum()), display=False)
glue("ex1_n_all", int((summary.n_experts == big_pool).sum()), display=False)
try:
    tr = redundancy.trend_against_k(one_seed, quantity="control_mean_dz")
    glue("ex1_slope", Markdown(f"{tr['slope']:+.3f} per doubling of k (p = {tr['p']:.2g}), against "
                               f"{checks.set_index('check').loc['control signal shrinks with k', 'slope']:+.3f} with every seed"),
         display=False)
except ValueError as err:
    glue("ex1_slope", Markdown(f"undefined ({err})"), display=False)
mde_50 = stats.min_detectable_dz(50, alpha=alpha / int(fam_audit[lead]), power=power)
glue("ex2_expected", Markdown(
    "This run already uses 50 positions: the exercise compares with a run on more." if n_positions == 50 else
    f"A new draw of {50} positions, so the records are computed afresh (about {50 / n_positions:.0%} of this run's "
    f"work). Every confidence interval of the effect figure changes in width by about a factor of "
    f"{(n_positions / 50) ** 0.5:.1f} (the square root of the ratio of sample sizes), and the smallest d_z a cell of "
    f"the first model detects with {power:.0%} power (t-test at its Bonferroni level) goes from {mde_audit:.3f} to "
    f"{mde_50:.3f}."), display=False)
