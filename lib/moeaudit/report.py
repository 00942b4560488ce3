"""Figures and tables shared by the chapters: one style, the paper's layouts, clear conventions."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .metrics import METRIC_LABELS

PALETTE = "colorblind"  # seaborn's colour-blind-safe palette (Okabe-Ito-like)

SIGNIFICANCE_NOTE = (
    "Cells show Cohen's d_z of the paired differences D = Δ_high − Δ_low (positive: ablating the "
    "highest-ranked expert hurts more) with the paired t-test p-value p_t and the Wilcoxon signed-rank "
    "p-value p_W. **Bold**: uncorrected p_t < 0.05 (the paper's convention). ★: significant under "
    "Bonferroni within the model's family of cells *and* confirmed by Wilcoxon with the same sign "
    "(the paper's dual-test rule)."
)


def use_book_style() -> None:
    """Seaborn theme and colour-blind-safe palette for every figure of the book."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "figure.figsize": (7.5, 4.2),
                         "axes.titleweight": "bold"})


def model_colors(models) -> dict:
    return dict(zip(models, sns.color_palette(PALETTE, n_colors=max(3, len(models)))))


def paper_layout(stats: pd.DataFrame, *, row: str = "ranking", col: str = "layer",
                 sig_col: str = "sig_dual_bonf") -> pd.DataFrame:
    """Pivot a statistics table to the paper's layout: rows ``row`` (metrics), columns ``col`` (layers),
    each cell ``d_z [CI] / p_t / p_W`` as text, with markers for significance."""

    def fmt(r):
        star = " ★" if bool(r.get(sig_col, False)) else ""
        return (f"{r.cohens_dz:+.3f}{star}  [{r.dz_ci_low:+.2f}, {r.dz_ci_high:+.2f}]\n"
                f"p_t={r.p_t:.3g}  p_W={r.p_W:.3g}")

    out = stats.assign(cell=stats.apply(fmt, axis=1)).pivot(index=row, columns=col, values="cell")
    if row == "ranking":
        out.index = [METRIC_LABELS.get(i, i) for i in out.index]
    out.columns = [f"L{c}" for c in out.columns] if col == "layer" else out.columns
    return out


def style_paper_layout(stats: pd.DataFrame, *, row: str = "ranking", col: str = "layer", caption: str = ""):
    """Styled version of :func:`paper_layout`: bold where uncorrected p_t < 0.05."""
    table = paper_layout(stats, row=row, col=col)
    bold = stats.assign(b=stats.p_t < 0.05).pivot(index=row, columns=col, values="b")
    bold.index, bold.columns = table.index, table.columns

    def css(_):
        return bold.replace({True: "font-weight: bold", False: ""})

    return (table.style.apply(css, axis=None).set_caption(caption)
            .set_properties(**{"white-space": "pre-wrap", "text-align": "center", "font-size": "0.85em"}))


def dz_by_depth(ax, stats: pd.DataFrame, *, label: str, color, depth_col: str = "rel_depth") -> None:
    """One model's d_z across depth with its 95% CI band (the paper's Figure 1 element)."""
    s = stats.sort_values(depth_col)
    ax.plot(s[depth_col], s.cohens_dz, marker="o", color=color, label=label)
    ax.fill_between(s[depth_col], s.dz_ci_low, s.dz_ci_high, color=color, alpha=0.18, linewidth=0)
    for r in s.itertuples():
        if getattr(r, "sig_dual_bonf", False) or getattr(r, "sig_t_bonf", False):
            ax.annotate("*", (getattr(r, depth_col), r.cohens_dz), textcoords="offset points", xytext=(0, 6),
                        ha="center", color=color, fontsize=14)


def figure1(control: pd.DataFrame, observational: pd.DataFrame | None = None, *, title: str = ""):
    """The paper's Figure 1: per-model d_z of the routing-weight control across relative depth with
    95% CI bands; a grey band spans the range of all observational-metric cells."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if observational is not None and len(observational):
        lo, hi = observational.cohens_dz.min(), observational.cohens_dz.max()
        ax.axhspan(lo, hi, color="0.6", alpha=0.25, label=f"all observational cells [{lo:+.2f}, {hi:+.2f}]")
    colors = model_colors(list(control.model.unique()))
    for m, s in control.groupby("model", sort=False):
        dz_by_depth(ax, s, label=m, color=colors[m])
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("relative depth of the audited MoE layer (0 = first, 1 = last)")
    ax.set_ylabel("Cohen's $d_z$ (paired, 95% CI)")
    ax.set_title(title or "Per-token routing-weight ranking: effect size across depth")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def relative_depth(layers, moe_layers) -> list[float]:
    """Position of each audited layer among the model's MoE layers, scaled to [0, 1]."""
    moe = list(moe_layers)
    return [moe.index(L) / max(1, len(moe) - 1) for L in layers]


def describe(values) -> str:
    """Short text summary of a numeric vector (for prose generated from results)."""
    v = np.asarray(values, dtype=float)
    return f"min {np.nanmin(v):+.3f}, median {np.nanmedian(v):+.3f}, max {np.nanmax(v):+.3f}"
