"""Figures and tables shared by the chapters: one style, the paper's layouts, clear conventions."""

from __future__ import annotations

import html
import warnings

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


def _admonition(kind: str, title: str, body_html: str, plain: str):
    """An admonition as rich output: HTML in the theme's admonition classes, plain text otherwise."""
    from IPython.display import HTML  # noqa: PLC0415

    class _Admonition(HTML):
        def __repr__(self):  # text/plain, e.g. in a terminal
            return plain

    return _Admonition(f'<div class="admonition {kind}"><p class="admonition-title">{html.escape(title)}</p>'
                       f"{body_html}</div>")


_SCOPES = {
    "page": "The numbers on this page are <strong>illustrative</strong>: they measure the models on other text "
            "than the paper's WikiText-2.",
    "example": "Only the example predictions at the end of this page read it; the model card's measurements "
               "come from the training records (WikiText-2).",
}


def corpus_admonition(source, *, scope: str = "page"):
    """The box at the top of a chapter naming the corpus it reads (``source``: a
    :class:`moeaudit.corpus.CorpusSource`): a note for WikiText-2, a warning for any other corpus
    (``scope="page"``: the page's numbers are illustrative; ``"example"``: only an example reads
    it), with how to get WikiText-2. ``ValueError`` for another ``scope``."""
    if scope not in _SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {tuple(_SCOPES)}")
    what = html.escape(source.describe())
    if source.is_paper_corpus:
        body = f"<p>Evaluation corpus: {what} (parameter <code>corpus={html.escape(repr(source.requested))}</code>).</p>"
        return _admonition("note", "Corpus: WikiText-2", body, f"Corpus: {source.describe()}")
    why = (f" WikiText-2 was not found: {html.escape(source.fallback_reason)}." if source.fallback_reason else "")
    body = (f"<p>Evaluation corpus: {what} (parameter <code>corpus={html.escape(repr(source.requested))}</code>)."
            f"{why}</p><p>{_SCOPES[scope]} To use WikiText-2, set <code>MOEAUDIT_DATA_DIR</code> to a "
            "folder holding <code>wikitext-2/</code> (<code>test.txt</code> or <code>wiki.test.raw</code>), or run "
            "where the Hugging Face hub is reachable, and execute the chapter again.</p>")
    return _admonition("warning", "Corpus: not WikiText-2", body, f"Corpus: {source.describe()} (not WikiText-2)")


def show_corpus(corpus="auto", *, data_dir=None, scope: str = "page"):
    """Resolve the ``corpus`` parameter, display :func:`corpus_admonition`, and return the
    :class:`moeaudit.corpus.CorpusSource` (pass it on to :func:`moeaudit.audit.prepare`).

    Called in a chapter's first cell, so a bad ``corpus`` fails before any model is loaded. The
    fallback warning of ``corpus="auto"`` is shown by the box instead of on stderr.
    """
    from IPython.display import display  # noqa: PLC0415

    from .corpus import CorpusFallbackWarning, resolve_corpus  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorpusFallbackWarning)
        source = resolve_corpus(corpus, data_dir=data_dir)
    display(corpus_admonition(source, scope=scope))
    return source


def show_released_source(data_dir=None):
    """Display where the authors' released results are read from (original files or the embedded
    derived table) and return the :class:`moeaudit.released.ReleasedSource`."""
    from IPython.display import display  # noqa: PLC0415

    from .released import released_source  # noqa: PLC0415

    source = released_source(data_dir)
    what = html.escape(source.describe())
    if source.kind == "files":
        display(_admonition("note", "Released results: the original files", f"<p>Read from {what}.</p>",
                            f"Released results: {source.describe()}"))
    else:
        body = (f"<p>The original files were not found ({html.escape(source.reason or '')}), so this page reads "
                f"{what}. Its values are those of the original files, cell for cell (checked by the test suite "
                "when the files are present). To read the files themselves, set <code>MOEAUDIT_DATA_DIR</code> to a "
                "folder holding <code>paper-released/</code>, or run once with network access.</p>")
        display(_admonition("note", "Released results: the embedded derived table", body,
                            f"Released results: {source.describe()}"))
    return source
