# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The audit: do observational metrics predict causal expert importance?
#
# This chapter reproduces the paper's central experiment (Section 3, Tables 1–3). For each
# model and each of five MoE layers spread over depth, it asks the question of Definition 2.1:
# *at a token position t, does the active expert that an observational metric ranks highest
# matter more for the next-token loss than the one it ranks lowest?*
#
# **Protocol.** n token positions are drawn once per model (seeded, without replacement, never
# the last token of a text). At every position and audited layer, each active routed expert is
# ablated on its own — its combine weight is set to zero at token t only, inside the forward
# pass — and the change of the loss $-\log p(x_{t+1}\mid x_{\le t})$ is recorded. Each metric
# then picks its highest- and lowest-ranked active expert at t, giving paired effects
# $D = \Delta\mathcal{L}_{\text{high}} - \Delta\mathcal{L}_{\text{low}}$. Validity in the sense of
# Definition 2.1 means D is reliably positive. Every metric of a cell uses the *same* positions
# and the *same* ablation records, so differences between metrics are not sampling noise of
# different draws.
#
# **Tests.** Paired t-test (Cohen's $d_z$ as effect size, with an exact 95% CI) and Wilcoxon
# signed-rank test per cell; Bonferroni over the 20 cells of a model; a cell counts only if
# both tests agree (the paper's dual-test rule). Holm and Benjamini–Hochberg are shown beside it.

# %% tags=["parameters"]
models = ["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"]  # shipped names, HF ids or local dirs
layers = None  # None: the paper's five layers for its checkpoints, else five depth-proportional MoE layers; or a list
n_positions = 200  # token positions per cell (the paper: 200)
seed = 42
mode = "token"  # "token" (the paper's definition) or "sequence" (the released code's)
dtype = "float32"
device = "cpu"
n_texts = 100  # the first n lines of the corpus longer than 50 characters (the paper: WikiText-2 test)
max_tokens = None  # None: min(512, the model's context)
min_context = 0
batch_size = 64
alpha = 0.05
corpus = "auto"  # "auto": WikiText-2 if found locally or on the hub, else the embedded corpus; "wikitext-2"; "embedded"; or a text file (one text per line)
data_dir = None  # folder with wikitext-2/ (default: $MOEAUDIT_DATA_DIR)
results_dir = None  # record cache (default: $MOEAUDIT_RESULTS_DIR or results/)

# %%
import pandas as pd
from IPython.display import Markdown, display

from moeaudit import report, stats
from moeaudit.audit import paired_cells, prepare, single_expert_records
from moeaudit.metrics import METRICS

report.use_book_style()
corpus_source = report.show_corpus(corpus, data_dir=data_dir)

# %% [markdown]
# ## Run the ablations
# Records are cached on disk under a key made of every parameter that produced them (model
# weights, corpus, positions, layers, mode, precision): re-running this page reuses them,
# an interrupted run resumes, and a changed parameter computes new records.

# %%
all_cells, contexts = [], {}
for name in models:
    ctx = prepare(name, n_texts=n_texts, max_tokens=max_tokens, dtype=dtype, device=device,
                  corpus=corpus_source, data_dir=data_dir, results_dir=results_dir)
    contexts[name] = ctx
    audited = list(layers) if layers is not None else ctx.model.audit_layers(5)
    rec = single_expert_records(ctx, layers=audited, n_positions=n_positions, seed=seed, mode=mode,
                                min_context=min_context, batch_size=batch_size)
    cells = paired_cells(rec, ctx.metrics, rankings=METRICS)
    cells["rel_depth"] = cells.layer.map(dict(zip(audited, report.relative_depth(audited, ctx.model.layout.moe_layers))))
    all_cells.append(cells)
    lay = ctx.model.layout
    display(Markdown(f"**{name}** ({lay.family}): {len(lay.moe_layers)} MoE layers of {lay.n_layers}, "
                     f"{lay.num_experts} routed experts, top-{lay.top_k}, {lay.n_shared_experts} shared; "
                     f"audited layers {audited}; {len(rec):,} single-expert ablations."))
cells = pd.concat(all_cells, ignore_index=True)

# %% [markdown]
# ## Per-cell statistics
# One family of cells per model (4 metrics × 5 layers = 20 tests, Bonferroni α = 0.05/20).

# %%
table = stats.audit_table(cells, by=("model", "ranking", "layer"), high_col="delta_loss_high",
                          low_col="delta_loss_low", family=("model",), alpha=alpha)
for name in models:
    t = table[table.model == name]
    display(Markdown(f"### {name}"))
    display(report.style_paper_layout(t, caption=f"{name}: Cohen's d_z [95% CI], p_t, p_W; n = {n_positions} per cell"))
display(Markdown(report.SIGNIFICANCE_NOTE))

# %% [markdown]
# ## Verdicts under each correction
# How many of each model's cells reach significance under Bonferroni (the paper), Holm, and
# Benjamini–Hochberg, for the t-test alone, the Wilcoxon test alone and the dual-test rule;
# and how many cells are *demonstrably* small (TOST equivalence at |d| < 0.2).

# %%
verdicts = table.groupby("model", sort=False).agg(
    cells=("p_t", "size"),
    uncorrected_t=("p_t", lambda p: int((p < alpha).sum())),
    bonferroni_t=("sig_t_bonf", "sum"), bonferroni_W=("sig_W_bonf", "sum"), bonferroni_dual=("sig_dual_bonf", "sum"),
    holm_dual=("sig_dual_holm", "sum"), bh_dual=("sig_dual_bh", "sum"),
    equivalent_below_0_2=("equivalent", "sum"),
    max_abs_dz=("cohens_dz", lambda d: float(d.abs().max())),
    min_detectable_dz=("mde_dz", "first"),
)
display(verdicts.style.format({"max_abs_dz": "{:.3f}", "min_detectable_dz": "{:.3f}"}))

# %% [markdown]
# `min_detectable_dz` is the effect size the paired t-test detects with 80% power at n positions
# and the Bonferroni level; effects below it can be missed, so "not significant" is not
# "no effect". The TOST column says where the data positively support |d_z| < 0.2.

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), sharey=True, squeeze=False)
for ax, name in zip(axes[0], models):
    t = table[table.model == name].merge(cells[["model", "layer", "rel_depth"]].drop_duplicates(), on=["model", "layer"])
    colors = report.model_colors(list(METRICS))
    for metric in METRICS:
        report.dz_by_depth(ax, t[t.ranking == metric], label=metric.replace("_", " "), color=colors[metric])
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_title(name)
    ax.set_xlabel("relative depth of the MoE layer")
axes[0][0].set_ylabel("Cohen's $d_z$ (95% CI)")
axes[0][-1].legend(fontsize=8)
fig.suptitle("Observational metrics: effect of ranking on the paired loss change")
fig.tight_layout()

# %% [markdown]
# ## Traceability
# Every cell is a set of pairs of raw records. The first pairs of one cell, with the experts
# compared and their loss changes (nats):

# %%
first = table.iloc[0]
example = cells[(cells.model == first.model) & (cells.ranking == first.ranking) & (cells.layer == first.layer)]
display(example[["model", "ranking", "layer", "seq_id", "t", "expert_high", "expert_low", "value_high", "value_low",
                 "delta_loss_high", "delta_loss_low", "diff"]].head(5).style.format(precision=4))

# %% [markdown]
# ## What this shows, and what it does not
# **Shows.** For each model, whether ranking the active experts at a token by a population-level
# statistic (computed over the whole corpus before any ablation) predicts which single-expert
# ablation hurts that token's prediction more, with the uncertainty of each effect and the
# verdict under several multiple-comparison rules.
#
# **Does not show.** That a metric is useless for pruning: the audit removes one expert at one
# token, while pruning removes experts everywhere (see the progressive-ablation chapter), and a
# null test is weak evidence for a null unless the TOST column says the effect is small. With
# the book's default small models, the numbers describe those models, not the paper's
# checkpoints; re-run this chapter with `models` set to the real checkpoint ids on a GPU for that.
