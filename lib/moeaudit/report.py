"""Figures and tables shared by the chapters: one style, the paper's layouts, clear conventions."""

from __future__ import annotations

import html
import math
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .corpus import (
    NEAR_UNIGRAM_GAIN,
    CorpusFallbackWarning,
    resolve_corpus,
    resolve_text_form,
)
from .names import METRIC_LABELS
from .paths import REPO_ROOT
from .stats import (
    binomial_upper_tail,
    min_equivalence_bound,
    sign_test,
    spearman_defined,
    tost_min_p,
    untested_cells,
)

PALETTE = "colorblind"  # seaborn's colour-blind-safe palette (Okabe-Ito-like)

SIGNIFICANCE_NOTE = (
    "Cells show Cohen's d_z of the paired differences D = Δ_high − Δ_low (positive: ablating the "
    "highest-ranked expert hurts more) with the paired t-test p-value p_t and the Wilcoxon signed-rank "
    "p-value p_W. **Bold**: uncorrected p_t < 0.05 (the paper's convention). ★: significant under "
    "Bonferroni within the model's family of cells *and* confirmed by Wilcoxon with the same sign "
    "(the paper's dual-test rule)."
)


#: Width of the book's text column in inches at :data:`BOOK_DPI` (the theme's column is 688 CSS px
#: at a desktop width): a figure at most this wide is shown at its own size, labels at their size.
COLUMN_INCHES = 7.0
#: Pixels per inch of the figures on the page (the PNG written for a figure of ``w`` inches is
#: ``w * BOOK_DPI`` px wide).
BOOK_DPI = 96


def use_book_style() -> None:
    """Seaborn theme and colour-blind-safe palette for every figure of the book; figures default to
    the column's width (:data:`COLUMN_INCHES` at :data:`BOOK_DPI`), so that they are shown at the
    size they were drawn, with legible labels, and a figure with more panels grows in height."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": BOOK_DPI, "savefig.dpi": BOOK_DPI, "figure.figsize": (COLUMN_INCHES, 4.0),
                         "axes.titleweight": "bold", "axes.titlesize": 11, "figure.titlesize": 12})


def panel_grid(n: int, *, ncols: int = 2, height: float = 3.2, sharey: bool = False, sharex: bool = False):
    """``n`` panels in rows of at most ``ncols``, the column's width (:data:`COLUMN_INCHES`) and
    ``height`` inches per row. Returns ``(fig, axes)``: ``axes`` a list of the ``n`` panels, row by
    row; the grid's spare slots are hidden (:func:`finish_panels` puts the legend in the first one).
    ``ValueError`` for ``n < 1`` or ``ncols < 1``."""
    if n < 1 or ncols < 1:
        raise ValueError(f"panel_grid needs n >= 1 and ncols >= 1, got n={n!r}, ncols={ncols!r}")
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(COLUMN_INCHES, height * rows), sharey=sharey, sharex=sharex,
                             squeeze=False)
    flat = list(grid.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def model_colors(models) -> dict:
    return dict(zip(models, sns.color_palette(PALETTE, n_colors=max(3, len(models)))))


def _untested_rows(stats: pd.DataFrame) -> pd.Series:
    """True for the rows of a statistics table that could not be tested (a non-empty ``reason``,
    or NaN ``cohens_dz`` in a table without ``reason``)."""
    if "reason" in stats.columns:
        return stats["reason"].fillna("").astype(str).str.len() > 0
    return stats["cohens_dz"].isna()


def paper_layout(stats: pd.DataFrame, *, row: str = "ranking", col: str = "layer",
                 sig_col: str = "sig_dual_bonf") -> pd.DataFrame:
    """Pivot a statistics table to the paper's layout: rows ``row`` (metrics), columns ``col`` (layers),
    each cell ``d_z [CI] / p_t / p_W`` as text, with markers for significance. A cell that could not
    be tested (see :func:`moeaudit.stats.untested_cells`) reads "not tested" and its n; its reason
    is for the note under the table (:func:`untested_note`)."""
    untested = _untested_rows(stats)

    def fmt(r):
        if untested[r.name]:
            return f"not tested\nn = {int(r.n)}" if "n" in r and pd.notna(r.n) else "not tested"
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
    bold = stats.assign(b=(stats.p_t < 0.05) & ~_untested_rows(stats)).pivot(index=row, columns=col, values="b")
    bold.index, bold.columns = table.index, table.columns

    def css(_):
        return bold.replace({True: "font-weight: bold", False: ""})

    return (table.style.apply(css, axis=None).set_caption(caption)
            .set_properties(**{"white-space": "pre-wrap", "text-align": "center", "font-size": "0.85em"}))


def depth_marked(stats: pd.DataFrame) -> pd.Series:
    """Which cells :func:`dz_by_depth` marks with ``*``: the paired t-test significant at the
    family's Bonferroni level (``sig_t_bonf``; a cell passing the dual rule, ``sig_dual_bonf``,
    passes it too), Wilcoxon not required. Boolean, aligned with ``stats``."""
    flags = [stats[c].fillna(False).astype(bool) for c in ("sig_t_bonf", "sig_dual_bonf") if c in stats.columns]
    out = pd.Series(False, index=stats.index)
    for f in flags:
        out |= f
    return out


def dz_by_depth(ax, stats: pd.DataFrame, *, label: str, color, depth_col: str = "rel_depth",
                mark_reversals: bool = False) -> None:
    """One model's d_z across depth with its 95% CI band (the paper's Figure 1 element); ``*``
    above the cells of :func:`depth_marked` (captioned by :func:`depth_marks_caption`). With
    ``mark_reversals``, a marked cell with d_z < 0 (a reversal) gets a ``▼`` below its point instead,
    so that a significant effect in the wrong direction is not starred like a positive one."""
    s = stats.sort_values(depth_col)
    ax.plot(s[depth_col], s.cohens_dz, marker="o", color=color, label=label)
    ax.fill_between(s[depth_col], s.dz_ci_low, s.dz_ci_high, color=color, alpha=0.18, linewidth=0)
    for r, marked in zip(s.itertuples(), depth_marked(s)):
        if marked:
            reversal = mark_reversals and r.cohens_dz < 0
            ax.annotate("▼" if reversal else "*", (getattr(r, depth_col), r.cohens_dz), textcoords="offset points",
                        xytext=(0, -14) if reversal else (0, 6), ha="center", color=color,
                        fontsize=10 if reversal else 14)


def depth_marks_caption(table: pd.DataFrame) -> str:
    """The caption of the ``*`` marks of :func:`dz_by_depth` for the cells of ``table`` (an
    :func:`moeaudit.stats.audit_table` result with ``model``, ``ranking``, ``layer``): which test
    and level a mark means (two-sided paired t-test at the family's Bonferroni level, read from
    ``alpha_corrected``; Wilcoxon not required), how it differs from the tables' ★ (the dual rule),
    and which cells carry one, with how many of them pass the dual rule (markdown)."""
    marked = depth_marked(table)
    levels = value_span(table.alpha_corrected, "{:.4g}") if "alpha_corrected" in table.columns else ""
    level = f" ({levels} per cell)" if levels and levels != "none" else ""
    text = (f"A `*` above a point marks a cell whose two-sided paired t-test is significant at its family's "
            f"Bonferroni level{level}, corrected; the Wilcoxon test is not required, so a `*` is not the paper's "
            "verdict. The ★ of the tables also requires the Wilcoxon test at that level with the same sign (the dual "
            "rule). ")
    hits = table[marked]
    if hits.empty:
        return text + "No cell carries a `*`."
    dual = int(hits.sig_dual_bonf.fillna(False).astype(bool).sum()) if "sig_dual_bonf" in hits.columns else 0

    def label(r):
        ranking = getattr(r, "ranking", "")
        return METRIC_LABELS.get(ranking, ranking).lower()

    named = "; ".join(f"{r.model}, {label(r)} at layer {r.layer} (d_z = {fmt_signed(r.cohens_dz)})"
                      for r in hits.itertuples())
    k = len(hits)
    both = ("it also passes" if dual else "it does not pass") if k == 1 else (
        "all of them also pass" if dual == k else "none of them passes" if dual == 0 else f"{dual} of them also pass")
    return text + f"{plural(k, 'cell')} carr{'ies' if k == 1 else 'y'} a `*`: {named}; {both} the dual rule."


#: What the values of each ranking are, for captions of tables that show them beside loss changes
#: (nats): the observational metrics of :mod:`moeaudit.metrics` and the per-token routing weight.
METRIC_VALUE_UNITS = {
    "utilization_rate": "a share of the corpus's tokens, without unit",
    "activation_norm": "a mean L2 norm of the expert's output vector, in the units of the hidden state",
    "mean_routing_weight": "a mean router probability, without unit",
    "activation_std": "a standard deviation of that norm, in the units of the hidden state",
    "routing_weight": "the router probability at the token, without unit",
}


def traceability_caption(model: str, ranking: str, layer) -> str:
    """The caption of a few raw pairs of one audit cell (markdown): ``expert_high``/``expert_low``
    are the experts compared, ``value_high``/``value_low`` the ranking's values for them in that
    metric's own units (:data:`METRIC_VALUE_UNITS`; not nats), ``delta_loss_high``,
    ``delta_loss_low`` and ``diff`` = D the loss changes in nats. ``KeyError`` for an unknown
    ``ranking``."""
    label = METRIC_LABELS.get(ranking, ranking)
    return (f"The first pairs of one cell ({model}, {label.lower()}, layer {layer}): the experts compared "
            f"(`expert_high`, `expert_low`); the ranking's values for them (`value_high`, `value_low`: "
            f"{METRIC_VALUE_UNITS[ranking]}; not nats); and the loss change when each is removed at the token "
            "(`delta_loss_high`, `delta_loss_low`) with their difference `diff` = D, in nats.")


def figure1(control: pd.DataFrame, observational: pd.DataFrame | None = None, *, title: str = ""):
    """The paper's Figure 1: per-model d_z of the routing-weight control across relative depth with
    95% CI bands; a grey band spans the range of all observational-metric cells. Marks as in
    :func:`dz_by_depth` with ``mark_reversals``: ``*`` above a passing cell with d_z > 0, ``▼`` below
    a passing reversal."""
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 4.2))
    if observational is not None and observational.cohens_dz.notna().any():  # untested cells (NaN) left out
        lo, hi = observational.cohens_dz.min(), observational.cohens_dz.max()
        ax.axhspan(lo, hi, color="0.6", alpha=0.25, label=f"all observational cells [{lo:+.2f}, {hi:+.2f}]")
    colors = model_colors(list(control.model.unique()))
    for m, s in control.groupby("model", sort=False):
        dz_by_depth(ax, s, label=m, color=colors[m], mark_reversals=True)
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


def text_html(text: str) -> str:
    """Plain text (a reason, a message) as HTML for a box: escaped, with each environment variable
    written ``$NAME`` shown as code (``<code>NAME</code>``), so that no ``$`` reaches the page's math."""
    return re.sub(r"\$([A-Z][A-Z0-9_]*)", r"<code>\1</code>", html.escape(text))


def admonition(kind: str, title: str, body_html: str, plain: str):
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
    "example": "Only the row on the audited text and the example predictions at the end of this page read it; the "
               "model card's measurements come from the training records (WikiText-2).",
}


_FORMS = {
    "released": "Each text is a line as the corpus serves it, with its leading space and line break (the form the "
                "released code feeds to the tokenizer; parameter <code>text_form</code>).",
    "stripped": "Each text is a line stripped of its surrounding whitespace (parameter <code>text_form</code>; the "
                "released code keeps it).",
    "wikitext": "Each text is a paragraph written in WikiText-2's tokenized form, the form the shipped models were "
                "trained on: punctuation split off, <code>@-@</code> for a hyphen inside a word, <code>@,@</code> and "
                "<code>@.@</code> inside numbers, and <code>&lt;unk&gt;</code> for a capitalised word that the "
                "models' training text never contains (parameter <code>text_form</code>).",
}


def corpus_admonition(source, *, scope: str = "page", text_form: str | None = None):
    """The box at the top of a chapter naming the corpus it reads (``source``: a
    :class:`moeaudit.corpus.CorpusSource`): a note for WikiText-2, a warning for any other corpus
    (``scope="page"``: the page's numbers are illustrative; ``"example"``: only an example reads
    it), with how to get WikiText-2; with ``text_form`` (see :func:`moeaudit.corpus.select_texts`)
    also how lines become texts (a resolved form: :func:`moeaudit.corpus.resolve_text_form`).
    ``ValueError`` for another ``scope`` or ``text_form``."""
    if scope not in _SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {tuple(_SCOPES)}")
    if text_form is not None and text_form not in _FORMS:
        raise ValueError(f"text_form={text_form!r} is not one of {tuple(_FORMS)}")
    form = f" {_FORMS[text_form]}" if text_form else ""
    what = html.escape(source.describe())
    if source.is_paper_corpus:
        body = f"<p>Evaluation corpus: {what} (parameter <code>corpus={html.escape(repr(source.requested))}</code>).{form}</p>"
        return admonition("note", "Corpus: WikiText-2", body, f"Corpus: {source.describe()}")
    why = (f" WikiText-2 was not found: {text_html(source.fallback_reason)}." if source.fallback_reason else "")
    body = (f"<p>Evaluation corpus: {what} (parameter <code>corpus={html.escape(repr(source.requested))}</code>)."
            f"{why}{form}</p><p>{_SCOPES[scope]} To use WikiText-2, set <code>MOEAUDIT_DATA_DIR</code> to a "
            "folder holding <code>wikitext-2/</code> (<code>test.txt</code> or <code>wiki.test.raw</code>), or run "
            "where the Hugging Face hub is reachable, and execute the chapter again.</p>")
    return admonition("warning", "Corpus: not WikiText-2", body, f"Corpus: {source.describe()} (not WikiText-2)")


def show_corpus(corpus="auto", *, data_dir=None, scope: str = "page", text_form: str | None = None):
    """Resolve the ``corpus`` parameter (and ``text_form`` for it), display :func:`corpus_admonition`,
    and return the :class:`moeaudit.corpus.CorpusSource` (pass it on to :func:`moeaudit.audit.prepare`).

    Called in a chapter's first cell, so a bad ``corpus``, or a ``text_form`` that does not exist
    for it (``ValueError`` naming the allowed forms), fails before any model is loaded. The
    fallback warning of ``corpus="auto"`` is shown by the box instead of on stderr.
    """
    from IPython.display import display  # noqa: PLC0415


    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorpusFallbackWarning)
        source = resolve_corpus(corpus, data_dir=data_dir)
    form = resolve_text_form(source, text_form) if text_form is not None else None
    display(corpus_admonition(source, scope=scope, text_form=form))
    return source


# ----------------------------------------------------------------------------- words from numbers


def plural(k: int, word: str, plural_form: str | None = None) -> str:
    """``"1 cell"``, ``"3 cells"``, ``"1,800 restorations"`` (``plural_form`` for irregular plurals)."""
    return f"{k:,} {word if k == 1 else (plural_form or word + 's')}"


def fmt_signed(x: float, decimals: int = 3) -> str:
    """``x`` with an explicit sign and ``decimals`` decimals; a value that rounds to zero prints as
    ``+0.000`` (never ``-0.000``)."""
    s = f"{float(x):+.{decimals}f}"
    return "+" + s[1:] if float(s) == 0 else s


def join_words(items) -> str:
    """``[1, 2, 3]`` -> ``"1, 2 and 3"``; one item as itself; ``""`` for none."""
    items = [str(i) for i in items]
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def value_span(values, fmt: str = "{:.3g}", *, empty: str = "none") -> str:
    """The range of ``values`` as text: ``"0.12 to 0.40"``, or one value when the smallest and
    largest print alike (``"6.8"``, not ``"6.8 to 6.8"``). None and NaN are ignored; ``empty`` is
    returned when nothing is left. ``fmt`` is a ``str.format`` template (``"{:+.2f}"``) or a bare
    format spec (``"+.2f"``)."""
    template = fmt if "{" in fmt else "{:" + fmt + "}"
    if not isinstance(values, (np.ndarray, pd.Series)):
        values = list(values)
    vals = pd.to_numeric(pd.Series(np.ravel(np.asarray(values, dtype=object))), errors="coerce").dropna()
    if vals.empty:
        return empty
    if (vals == vals.round()).all() and np.isfinite(vals).all():
        vals = vals.astype("int64")  # whole numbers print as such ("4", not "4.0")
    lo, hi = template.format(vals.min()), template.format(vals.max())
    return lo if lo == hi else f"{lo} to {hi}"


def glue_values(*, as_markdown: bool = False, **values) -> None:
    """Glue each value under its name for the page's prose (myst-nb ``glue``, not displayed): numpy
    scalars as Python numbers; with ``as_markdown`` every ``str`` as markdown (for ``{glue:md}``),
    else as text (for ``{glue:text}``)."""
    from IPython.display import Markdown  # noqa: PLC0415
    from myst_nb import glue  # noqa: PLC0415

    for key, value in values.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif as_markdown and isinstance(value, str):
            value = Markdown(value)
        glue(key, value, display=False)


def untested_note(table: pd.DataFrame, *, by=None, what: str = "cell") -> str:
    """The note under a statistics table that has cells which could not be tested: how many, which
    (named by their ``by`` columns, see :func:`moeaudit.stats.untested_cells`) and why, and that they
    still count in their family's size. ``""`` when every cell was tested. ``what`` names a row
    (``"cell"``, ``"layer"``)."""

    bad = untested_cells(table, by=by)
    if bad.empty:
        return ""
    k = len(bad)
    counted = (f" {'It counts' if k == 1 else 'They count'} in {'its' if k == 1 else 'their'} family's size for the "
               f"Bonferroni, Holm and Benjamini–Hochberg corrections, as {'a hypothesis' if k == 1 else 'hypotheses'} "
               "that cannot be rejected."
               if "family_size" in table.columns else "")
    return (f"*{plural(k, what)} of {len(table)} could not be tested* ({'its' if k == 1 else 'their'} statistics are undefined): "
            + "; ".join(f"{r.cell}: {r.reason}" for r in bad.itertuples()) + "." + counted)


def show_untested_note(table: pd.DataFrame, **kwargs) -> str:
    """Display :func:`untested_note` (markdown) under a table when it has untested cells; return it."""
    note = untested_note(table, **kwargs)
    if note:
        from IPython.display import Markdown, display  # noqa: PLC0415

        display(Markdown(note))
    return note


#: The multiple-comparison corrections of the audit, in the order the verdicts name them: the name,
#: the column of :func:`moeaudit.stats.family_verdicts` and that of
#: :func:`moeaudit.released.paper_family_verdicts` counting the cells that pass the dual rule.
VERDICT_CORRECTIONS = (("Bonferroni", "bonferroni_dual", "bonferroni_both"), ("Holm", "holm_dual", "holm_both"),
                       ("Benjamini–Hochberg", "bh_dual", "bh_both"))
_FDR_NOTE = " (which bounds the false-discovery rate, not the family-wise error)"


def _bonferroni_level(verdicts: pd.DataFrame) -> str:
    """``"the Bonferroni level 0.0025"`` when every family has that level, else the range."""
    levels = value_span(verdicts.alpha_bonferroni, "{:.4g}")
    return (f"the Bonferroni level {levels}" if " to " not in levels else
            f"each model's Bonferroni level ({levels})")


def _other_corrections_text(verdicts: pd.DataFrame) -> str:
    """How Holm and Benjamini–Hochberg change the Bonferroni count of dual-rule passes, and, when
    Bonferroni passes nothing, for which corrections "no cell passes" holds."""
    b = int(verdicts.bonferroni_dual.sum())
    same, differ = [], []
    for name, col, _ in VERDICT_CORRECTIONS[1:]:
        if col in verdicts.columns:
            k = int(verdicts[col].sum())
            (same if k == b else differ).append((name, col, k))
    parts = []
    if same:
        parts.append(f"{join_words(n for n, _, _ in same)} give{'s' if len(same) == 1 else ''} the same count")
    for name, col, k in differ:
        where = ", ".join(f"{r.model} {int(getattr(r, col))}" for r in verdicts.itertuples() if getattr(r, col))
        parts.append(f"under {name}{_FDR_NOTE if col == 'bh_dual' else ''} {plural(k, 'cell')} "
                     f"pass{'es' if k == 1 else ''}" + (f" ({where})" if where else ""))
    if not parts:
        return ""
    text = "; ".join(parts)
    text = text[0].upper() + text[1:] + "."
    if b == 0 and any(k for _, _, k in differ):
        none = ["Bonferroni"] + [n for n, _, _ in same] + [n for n, _, k in differ if k == 0]
        text += f" \"No cell passes\" holds under {join_words(none)} only."
    return text


def _uncorrected_direction(k: int, positive: int, symbol: str = "d_z") -> str:
    """``"all with d_z > 0"``, ``"all with d_z < 0"``, ``"3 with d_z > 0 and 2 with d_z < 0"`` for
    ``k`` hits of which ``positive`` have a positive effect (``symbol`` names the effect)."""
    negative = k - positive
    if not k:
        return ""
    if positive == k:
        return f"all with {symbol} > 0" if k > 1 else f"with {symbol} > 0"
    if negative == k:
        return f"all with {symbol} < 0" if k > 1 else f"with {symbol} < 0"
    return f"{positive} with {symbol} > 0 and {negative} with {symbol} < 0"


def _excess_phrase(k: int, n: int, level: float) -> str:
    """Chance count and exact binomial upper tail of ``k`` hits among ``n`` tests at ``level``."""

    p = binomial_upper_tail(int(k), int(n), float(level))
    return (f"about {n * level:.1f} expected by chance; exact binomial P(X ≥ {k}) = {p:.2g}, "
            + (f"below the {level:g} level only if the cells were independent; they share positions and records, "
               "so this is no evidence of an excess" if p < level else
               f"not significantly more than chance at the {level:g} level"))


def _models_in_excess(verdicts: pd.DataFrame, names: dict) -> list[str]:
    """The models (display names from ``names``) whose uncorrected hits (``uncorrected_t`` of
    ``cells`` at the family level ``alpha_bonferroni * cells``) would be more than chance at that
    level if the cells were independent, each as ``"name (k of n, P(X ≥ k) = p)"`` (exact binomial
    upper tail)."""

    out = []
    for r in verdicts.itertuples():
        k, n = int(r.uncorrected_t), int(r.cells)
        level = float(r.alpha_bonferroni * r.cells)
        if k and (p := binomial_upper_tail(k, n, level)) < level:
            out.append(f"{names.get(r.model, r.model)} ({k} of {n}, P(X ≥ {k}) = {p:.2g})")
    return out


def _hit_concentration(table: pd.DataFrame, model: str, level: float) -> str:
    """Where one model's uncorrected hits (cells of ``table``, an :func:`moeaudit.stats.audit_table`,
    with ``p_t < level``) sit when one layer holds most of them (two or more hits, a strict majority),
    and which cells pass the t-test at the Bonferroni level (``sig_t_bonf``), as sentences; ``""``
    when neither applies or ``table`` lacks the columns."""
    if not {"model", "layer", "p_t"} <= set(table.columns):
        return ""
    fam = table[table.model == model]
    hits = fam[fam.p_t < level]
    out = ""
    if len(hits) >= 2:
        counts = hits.layer.value_counts()
        layer, m = counts.index[0], int(counts.iloc[0])
        if 2 * m > len(hits):
            out += ("Both of its uncorrected hits" if m == len(hits) == 2 else
                    f"All {len(hits)} of its uncorrected hits" if m == len(hits) else
                    f"{m} of its {len(hits)} uncorrected hits") + f" sit at layer {layer}."
    if "sig_t_bonf" in fam.columns:
        bonf = fam[fam.sig_t_bonf.fillna(False).astype(bool)]
        if len(bonf):
            out += (" " if out else "") + (
                f"Its t-test pass{'es' if len(bonf) > 1 else ''} at the Bonferroni level: "
                + join_words(f"{str(getattr(r, 'ranking', 'cell')).replace('_', ' ')} at layer {r.layer} "
                             f"(p_t = {r.p_t:.2g})" for r in bonf.itertuples()) + ".")
    return out


def _positive_counts(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per family: tested cells, cells with d_z > 0 (from ``share_positive``), uncorrected hits with
    d_z > 0 and < 0, and the two-sided sign test of the tested cells (:func:`moeaudit.stats.sign_test`)."""

    untested = verdicts.untested if "untested" in verdicts.columns else 0
    out = pd.DataFrame({"model": verdicts.model, "tested": (verdicts.cells - untested).astype(int)})
    out["positive"] = (verdicts.share_positive.fillna(0.0) * out.tested).round().astype(int)
    out["hits"] = verdicts.uncorrected_t.astype(int)
    pos_col = "uncorrected_t_positive" if "uncorrected_t_positive" in verdicts.columns else None
    out["hits_positive"] = verdicts[pos_col].astype(int) if pos_col else -1
    out["sign_p"] = [sign_test(int(p), int(t - p)) for p, t in zip(out.positive, out.tested)]
    return out


def design_sensitivity_text(verdicts: pd.DataFrame, table: pd.DataFrame | None = None, *,
                            short: bool = False) -> str:
    """Whether the audit could have found, or excluded, effects of the size it observes (markdown).

    Per family of :func:`moeaudit.stats.family_verdicts`: the minimum detectable |d_z|
    (``min_detectable_dz``, the t-test at the Bonferroni level with the chapter's power) against
    the largest observed |d_z| (``max_abs_dz``), and whether TOST at the equivalence bound could
    pass at that level for any data (``tost_can_pass``; with ``table``, the per-cell
    :func:`moeaudit.stats.audit_table`, also its smallest attainable p-value,
    :func:`moeaudit.stats.tost_min_p`, and the smallest bound that could pass,
    :func:`moeaudit.stats.min_equivalence_bound`; ``n``, ``power`` and the bound are read from
    ``table``). A family whose minimum detectable effect exceeds every observed |d_z| and whose
    TOST cannot pass "can neither detect nor exclude effects of the size it observes". ``short``:
    only the conclusion. ``""`` when no family has a defined effect or minimum detectable effect.
    """

    groups: dict[tuple, list] = {}
    verdict_of: dict[str, str] = {}
    for r in verdicts.itertuples():
        mde, top = float(r.min_detectable_dz), float(r.max_abs_dz)
        if not (np.isfinite(mde) and np.isfinite(top)):
            continue
        fam = table[(table.model == r.model) & ~_untested_rows(table)] if table is not None else None
        n = int(fam.n.max()) if fam is not None and "n" in fam.columns and len(fam) else None
        power = float(fam.power.iloc[0]) if fam is not None and "power" in fam.columns and len(fam) else None
        bound = (float(fam.tost_bound_d.iloc[0]) if fam is not None and "tost_bound_d" in fam.columns and len(fam)
                 else None)
        can = bool(r.tost_can_pass) if "tost_can_pass" in verdicts.columns else None
        key = (n, float(r.alpha_bonferroni), f"{mde:.3f}", power, bound, can)
        groups.setdefault(key, []).append(r)
        detect = top >= mde
        verdict_of[r.model] = ("neither" if not detect and can is False else "miss" if not detect else
                               "no_exclude" if can is False else "both" if can else "detect")
    if not verdict_of:
        return ""
    sentences = []
    for (n, level, mde, power, bound, can), rows in groups.items():
        at = " and ".join(s for s in (f"n = {n} positions per cell" if n else "", f"the Bonferroni level {level:.4g}") if s)
        below = [f"{r.model} ({r.max_abs_dz:.3f})" for r in rows if r.max_abs_dz < float(mde)]
        above = [f"{r.model} ({r.max_abs_dz:.3f})" for r in rows if r.max_abs_dz >= float(mde)]
        cmp = ([f"more than the largest observed |d_z| of {join_words(below)}"] if below else []) + (
            [f"no more than the largest observed |d_z| of {join_words(above)}"] if above else [])
        s = (f"At {at}, the paired t-test detects an effect of |d_z| = {mde}"
             + (f" with {power:.0%} power" if power else "") + ", " + "; ".join(cmp))
        eq = sum(int(r.equivalent) for r in rows)
        bound_text = f"|d_z| < {bound:g}" if bound is not None else "the equivalence bound"
        if can is False:
            s += f". TOST at {bound_text} cannot pass at that level for any data"
            if n and bound is not None:
                s += (f" (its smallest attainable p is {tost_min_p(n, bound_d=bound):.3g}, not below {level:.4g}; only "
                      f"a bound above {min_equivalence_bound(n, alpha=level):.3f} could be shown)")
            s += ", so \"not equivalent\" says nothing about the data"
        elif can:
            s += f". TOST at {bound_text} can pass at that level; {plural(eq, 'cell')} {'does' if eq == 1 else 'do'}"
        sentences.append(s + ".")
    by_case = {c: [m for m, v in verdict_of.items() if v == c] for c in ("neither", "miss", "no_exclude", "both",
                                                                           "detect")}
    conclusions = []
    if by_case["neither"]:
        conclusions.append(f"For {join_words(by_case['neither'])} the design can **neither detect** (with the stated "
                           "power) **nor exclude** (by TOST) effects of the size it observes: its null verdicts do not "
                           "show that such effects are absent.")
    if by_case["miss"]:
        conclusions.append(f"For {join_words(by_case['miss'])} effects of the observed size are below what the design "
                           "detects with the stated power, so they can be missed; only a passing TOST shows an effect "
                           "small.")
    if by_case["no_exclude"]:
        conclusions.append(f"For {join_words(by_case['no_exclude'])} effects as large as the largest observed would be "
                           "detected with the stated power, but TOST cannot show any effect small.")
    if by_case["both"]:
        conclusions.append(f"For {join_words(by_case['both'])} effects as large as the largest observed would be "
                           "detected with the stated power, and TOST can show an effect small.")
    if by_case["detect"]:
        conclusions.append(f"For {join_words(by_case['detect'])} effects as large as the largest observed would be "
                           "detected with the stated power.")
    if short:
        return " ".join(conclusions)
    return " ".join(sentences + conclusions)


def family_verdict_text(verdicts: pd.DataFrame, table: pd.DataFrame | None = None, *, short: bool = False) -> str:
    """The verdicts of :func:`moeaudit.stats.family_verdicts` as sentences (markdown).

    The first sentence says whether any cell passes the paper's dual rule under Bonferroni (naming
    the level), naming the passing cells when ``table`` (the :func:`moeaudit.stats.audit_table`
    result) is given; the next says how Holm and Benjamini–Hochberg change that count, and when
    Bonferroni passes nothing, under which corrections "no cell passes" holds. Unless ``short``,
    one paragraph per model follows with its counts: passes under each correction, the tests
    alone, uncorrected hits with their direction and their excess over chance (exact binomial
    upper tail, :func:`moeaudit.stats.binomial_upper_tail`), the cells with d_z > 0 with a sign
    test (:func:`moeaudit.stats.sign_test`), equivalence (or that TOST cannot pass at all), and
    the largest |d_z|; then :func:`design_sensitivity_text`. Every number is a cell of
    ``verdicts`` or computed from it (and from ``table``). Wording follows the numbers.
    """
    total = int(verdicts.bonferroni_dual.sum())
    rule = f"(t and Wilcoxon tests both significant at {_bonferroni_level(verdicts)}, same sign)"
    if total == 0:
        head = (f"**No cell passes** the paper's rule under Bonferroni {rule} in any model: no observational metric "
                "is shown to predict which active expert matters more at a token.")
    else:
        head = f"**{plural(total, 'cell')} pass{'es' if total == 1 else ''}** the paper's rule under Bonferroni {rule}"
        if table is not None:
            hits = table[table.sig_dual_bonf.astype(bool)]
            head += ": " + "; ".join(f"{r.model}, {getattr(r, 'ranking', '')} at layer {r.layer} (d_z = {r.cohens_dz:+.3f})"
                                     for r in hits.itertuples())
        head += "."
    others = _other_corrections_text(verdicts)
    head += (" " + others) if others else ""
    if short:
        return head
    lines = [head]
    counts = _positive_counts(verdicts).set_index("model")
    for r in verdicts.itertuples():
        alpha = r.alpha_bonferroni * r.cells
        c = counts.loc[r.model]
        untested = int(getattr(r, "untested", 0) or 0)
        not_tested = (f" ({untested} of them could not be tested and count{'s' if untested == 1 else ''} as not "
                      "passing)" if untested else "")
        k = int(r.uncorrected_t)
        direction = _uncorrected_direction(k, int(c.hits_positive)) if c.hits_positive >= 0 else ""
        uncorrected = (f"{k} {'has' if k == 1 else 'have'} uncorrected p_t < {alpha:g}"
                       + (f", {direction}" if direction else "")
                       + (f" ({_excess_phrase(k, r.cells, alpha)})" if k else ""))
        can = getattr(r, "tost_can_pass", None)
        if can is None:
            tost = (f"{r.equivalent} {'is' if r.equivalent == 1 else 'are'} demonstrably small (TOST at the Bonferroni "
                    "level)")
        elif bool(can):
            tost = (f"{r.equivalent} {'is' if r.equivalent == 1 else 'are'} demonstrably small (TOST at the Bonferroni "
                    "level, which can pass here)")
        else:
            explained = np.isfinite(r.max_abs_dz) and np.isfinite(r.min_detectable_dz)  # by design_sensitivity_text
            tost = ("none can be shown small, since TOST cannot pass at the Bonferroni level for any data"
                    + (" (see below)" if explained else ""))
        tested = int(c.tested)
        if not tested:
            tost = "none could be tested for equivalence"
        effects = (f"{int(c.positive)} of the {tested}{' tested' if untested else ''} cells have d_z > 0 (two-sided "
                   f"sign test p = {c.sign_p:.2g}) and the largest |d_z| is {r.max_abs_dz:.3f}."
                   if tested and np.isfinite(r.max_abs_dz) and np.isfinite(r.share_positive)
                   else "no cell has a defined d_z.")
        lines.append(
            f"**{r.model}**: {r.bonferroni_dual} of {r.cells} cells{not_tested} pass{'es' if r.bonferroni_dual == 1 else ''} the "
            f"dual rule at the Bonferroni level {r.alpha_bonferroni:.4g} ({r.holm_dual} under Holm, {r.bh_dual} under "
            f"Benjamini–Hochberg); {r.bonferroni_t} pass{'es' if r.bonferroni_t == 1 else ''} the t-test alone and "
            f"{r.bonferroni_W} the Wilcoxon test alone at that level; {uncorrected}; {tost}; " + effects
            + (" " + where if table is not None and (where := _hit_concentration(table, r.model, alpha)) else ""))
    design = design_sensitivity_text(verdicts, table)
    if design:
        lines.append(design)
    return "\n\n".join(lines)


def _lean_text(counts: pd.DataFrame, names: dict, alpha: float) -> str:
    """Which models lean one way by their own two-sided sign test at ``alpha`` (``sign_p`` of
    :func:`_positive_counts`) and which are not shown to lean either way (a test that does not reject
    does not show an even split), as one sentence."""
    lean: dict[str, list] = {"positive": [], "negative": []}
    flat = []
    for c in counts.itertuples():
        if not c.tested:
            continue
        name = names.get(c.model, c.model)
        if c.sign_p < alpha:
            lean["positive" if 2 * c.positive > c.tested else "negative"].append(f"{name} (p = {c.sign_p:.2g})")
        else:
            flat.append(name)
    parts = [f"{join_words(v)} lean{'s' if len(v) == 1 else ''} {k}" for k, v in lean.items() if v]
    if flat:
        parts.append(f"{join_words(flat)} {'is' if len(flat) == 1 else 'are'} not shown to lean either way"
                     if parts else "no model is shown to lean either way (which does not show an even split)")
    return f" By its own sign test at the {alpha:g} level, " + "; ".join(parts) + "." if parts else ""


def _directions_text(counts: pd.DataFrame, names: dict, whose: str, symbol: str = "d_z", *,
                     alpha: float = 0.05) -> str:
    """Per model (``counts``: :func:`_positive_counts`): cells with an effect > 0 of those tested
    (sign test p) and the direction of the uncorrected hits; then which models go against the
    pooled direction, and why; then which models lean one way by their own sign test at ``alpha``
    and which are not shown to lean either way (:func:`_lean_text`). ``symbol`` names the effect
    (``"d_z"``, the paper's ``"d"``)."""
    tested, positive = int(counts.tested.sum()), int(counts.positive.sum())
    if not tested:
        return ""
    pooled = np.sign(2 * positive - tested)
    per = []
    against = []
    for c in counts.itertuples():
        name = names.get(c.model, c.model)
        hits = ""
        if c.hits and c.hits_positive >= 0:
            hits = (f", {plural(int(c.hits), 'uncorrected hit')} "
                    + _uncorrected_direction(int(c.hits), int(c.hits_positive), symbol))
        per.append(f"{name} {c.positive} of {c.tested} (p = {c.sign_p:.2g}){hits}" if c.tested else
                   f"{name}: no tested cell")
        if not c.tested or pooled == 0:
            continue
        why, opposite = [], False
        if np.sign(2 * c.positive - c.tested) == -pooled:
            why.append(f"{'fewer' if pooled > 0 else 'more'} than half of its cells are positive ({c.positive} of {c.tested})")
            opposite = True
        elif 2 * c.positive == c.tested:
            why.append(f"exactly half of its cells are positive ({c.positive} of {c.tested})")
        if c.hits and c.hits_positive >= 0 and np.sign(2 * c.hits_positive - c.hits) == -pooled:
            n_against = int(c.hits - c.hits_positive) if pooled > 0 else int(c.hits_positive)
            sign = "<" if pooled > 0 else ">"
            why.append(f"its one uncorrected hit has {symbol} {sign} 0" if c.hits == 1 else
                       (f"all {n_against} of its uncorrected hits" if n_against == c.hits else
                        f"{n_against} of its {int(c.hits)} uncorrected hits") + f" have {symbol} {sign} 0")
            opposite = True
        if why:
            against.append((name, why, opposite))
    text = f"Per model, cells with {symbol} > 0 in {whose}: " + "; ".join(per) + "."
    if pooled == 0:
        return text + f" The pooled cells of {whose} lean neither way." + _lean_text(counts, names, alpha)
    way = "positive" if pooled > 0 else "negative"
    for name, why, opposite in against:
        text += (f" **{name} {'goes against' if opposite else 'does not share'} the pooled ({way}) direction**: "
                 f"{' and '.join(why)}, which the pooled sign test hides.")
    return text + _lean_text(counts, names, alpha)


def audit_comparison_text(verdicts: pd.DataFrame, paper: pd.DataFrame, table: pd.DataFrame | None = None, *,
                          paper_names: dict | None = None) -> str:
    """Sentences comparing this run's audit (:func:`moeaudit.stats.family_verdicts`) with the paper's
    (:func:`moeaudit.released.paper_family_verdicts`), in three paragraphs (markdown).

    1. Passing cells; uncorrected hits (and how many point the predicted way, d > 0) against the
       number expected by chance alone (``cells * alpha``), with the exact binomial upper tail
       (:func:`moeaudit.stats.binomial_upper_tail`) saying whether the excess is more than chance,
       for the paper and this run; the largest effect.
    2. The share of positive effects with a two-sided sign test (:func:`moeaudit.stats.sign_test`),
       pooled, then per model with the direction of its uncorrected hits, naming each model that
       goes against the pooled direction (cells share positions, so the tests are indicative).
    3. The verdict under each correction (:data:`VERDICT_CORRECTIONS`: Bonferroni, the paper's,
       then Holm and Benjamini–Hochberg), saying for which corrections this run agrees with the
       paper and where it does not. The paper's Holm and Benjamini–Hochberg counts come from the
       columns ``holm_both`` and ``bh_both`` when ``paper`` has them. With ``table`` (the per-cell
       :func:`moeaudit.stats.audit_table`), cells passing here are also tested at the paper's
       stricter per-cell level when this run's level is less strict.

    ``paper_names`` maps the paper's model keys to display names. Every number is computed from
    the frames. Cells of this run that could not be tested (``untested`` of
    :func:`moeaudit.stats.family_verdicts`) are said so; the sign tests count only tested cells.
    """

    names = paper_names or {}
    alpha = float((paper.alpha_bonferroni * paper.cells).iloc[0])
    here_alpha = float((verdicts.alpha_bonferroni * verdicts.cells).iloc[0])
    p_cells, h_cells = int(paper.cells.sum()), int(verdicts.cells.sum())
    h_untested = int(verdicts.untested.sum()) if "untested" in verdicts.columns else 0
    p_pass, h_pass = int(paper.bonferroni_both.sum()), int(verdicts.bonferroni_dual.sum())
    p_unc, h_unc = int(paper.uncorrected_t.sum()), int(verdicts.uncorrected_t.sum())
    p_unc_pos, h_unc_pos = int(paper.uncorrected_t_positive.sum()), int(verdicts.uncorrected_t_positive.sum())
    p_top = paper.loc[paper.max_abs_d.idxmax()]
    h_top = verdicts.loc[verdicts.max_abs_dz.idxmax()] if verdicts.max_abs_dz.notna().any() else None
    p_counts = _positive_counts(paper.assign(untested=0))
    h_counts = _positive_counts(verdicts)
    p_npos, h_npos = int(p_counts.positive.sum()), int(h_counts.positive.sum())
    h_tested = int(h_counts.tested.sum())
    p_sign = sign_test(p_npos, p_cells - p_npos)
    h_sign = sign_test(h_npos, h_tested - h_npos) if h_tested else float("nan")

    p_excess = binomial_upper_tail(p_unc, p_cells, alpha)
    h_excess = binomial_upper_tail(h_unc, h_cells, here_alpha)

    p_dir, h_dir = _uncorrected_direction(p_unc, p_unc_pos, "d"), _uncorrected_direction(h_unc, h_unc_pos)
    p_more, h_more = p_excess < alpha, h_excess < here_alpha
    if p_more == h_more:
        excess_cmp = ("Pooled over the models, both counts would be more than chance alone gives if the cells were "
                      "independent" if h_more else
                      "Pooled over the models, neither count is significantly more than chance alone gives")
    else:
        excess_cmp = (f"Pooled over the models, unlike the paper's {p_unc}, this run's {h_unc} uncorrected hits would "
                      "be more than chance alone gives if the cells were independent" if h_more else
                      f"Pooled over the models, unlike the paper's {p_unc}, this run's {h_unc} uncorrected hits are "
                      "not significantly more than chance alone gives")
    p_models, h_models = _models_in_excess(paper, names), _models_in_excess(verdicts, {})
    excess_cmp += ". " + (
        "Nor is any single model's count, in the paper or in this run" if not (p_models or h_models) else
        "Per model, the count would be more than chance, for independent cells, for "
        + (join_words(h_models) + " in this run" if h_models else "no model of this run")
        + " and for " + (join_words(p_models) + " in the paper" if p_models else "no model of the paper")) + ". "
    half, h_half = alpha / 2, here_alpha / 2
    p_dir_tail = binomial_upper_tail(p_unc_pos, p_cells, half)
    h_dir_tail = binomial_upper_tail(h_unc_pos, h_cells, h_half)
    excess_cmp += (
        "Definition 2.1 is directional (a hit with d_z < 0 counts against a metric, not for it), so the hits with "
        f"d_z > 0 are counted on their own, against the {half:g} of each test's level that chance puts on that side: "
        f"the paper's {p_unc_pos} (chance: about {p_cells * half:.1f}; P(X ≥ {p_unc_pos}) = {p_dir_tail:.2g}) "
        + ("would be" if p_dir_tail < alpha else "are not significantly") + f" more than chance at the {alpha:g} level, "
        f"and this run's {h_unc_pos} (chance: about {h_cells * h_half:.1f}; P(X ≥ {h_unc_pos}) = {h_dir_tail:.2g}) "
        + ("would be" if h_dir_tail < here_alpha else "are not significantly") + " more than chance at that level. "
        "All these binomial tails take the cells as independent, and they are not: the cells of a model share "
        "positions and ablation records, and the cells of one layer rank the same active experts, so their paired "
        "differences can be strongly correlated. A small tail is therefore no evidence of an excess (correlated hits "
        "may be one effect counted several times); only a count that chance explains even for independent cells "
        "says something, that there is no excess to explain.")
    if (h_more or h_models or h_dir_tail < here_alpha) and h_pass == 0:
        excess_cmp += (" An excess of uncorrected hits with no cell passing after correction suggests that some cells "
                       "carry effects too small to single out at the corrected level, not which ones.")
    p_leans, h_leans = p_sign < alpha, bool(h_sign < here_alpha)
    lean_cmp = ("" if not h_tested or p_leans == h_leans else
                f"At the {here_alpha:g} level the paper's sign test {'is' if p_leans else 'is not'} significant and "
                f"this run's {'is' if h_leans else 'is not'}; the two shares ({p_npos / p_cells:.0%} and "
                f"{h_npos / h_tested:.0%}) were not tested against each other, so this does not show that they "
                "differ. ")
    out = [
        f"In the paper, {p_pass} of {p_cells} cells pass both tests at the Bonferroni level; {p_unc} "
        f"reach{'es' if p_unc == 1 else ''} uncorrected p_t < {alpha:g}" + (f", {p_dir}" if p_dir else "")
        + f", where chance alone would give about {p_cells * alpha:.1f}"
        + (f" (P(X ≥ {p_unc}) = {p_excess:.2g}, exact binomial)" if p_unc else "")
        + f"; the largest |d| is {p_top.max_abs_d:.3f} ({names.get(p_top.model, p_top.model)}). "
        f"In this run, {h_pass} of {h_cells} cells pass the dual rule"
        + (f" ({h_untested} could not be tested)" if h_untested else "")
        + f"; {h_unc} reach{'es' if h_unc == 1 else ''} uncorrected p_t < {here_alpha:g}"
        + (f", {h_dir}" if h_dir else "") + f" (chance: about {h_cells * here_alpha:.1f}"
        + (f"; P(X ≥ {h_unc}) = {h_excess:.2g}" if h_unc else "") + "); "
        + (f"the largest |d_z| is {h_top.max_abs_dz:.3f} ({h_top.model})." if h_top is not None
           else "no cell has a defined d_z.") + " " + excess_cmp,
        f"A metric that identified the important expert would make d_z positive in most cells: {p_npos} of the "
        f"paper's {p_cells} cells are positive (two-sided sign test p = {p_sign:.2g}) and "
        + (f"{h_npos} of this run's {h_tested}{' tested' if h_untested else ''} (p = {h_sign:.2g})" if h_tested
           else "none of this run's, which could not be tested")
        + ". " + lean_cmp + _directions_text(h_counts, {}, "this run", alpha=here_alpha) + " "
        + _directions_text(p_counts, names, "the paper", "d", alpha=alpha) + " The sign tests treat cells as independent, which they "
        "are not (the cells of a model share positions), so they only indicate whether the effects lean one way.",
    ]
    out.append(_agreement_text(verdicts, paper, table))
    return "\n\n".join(out)


def _agreement_text(verdicts: pd.DataFrame, paper: pd.DataFrame, table: pd.DataFrame | None) -> str:
    """Whether this run agrees with the paper's verdict, correction by correction (Bonferroni, the
    paper's; Holm; Benjamini–Hochberg), with the counts of both; a correction whose paper count is
    not in ``paper`` is reported for this run only."""
    rows = []
    for name, here_col, paper_col in VERDICT_CORRECTIONS:
        if here_col not in verdicts.columns:
            continue
        here = int(verdicts[here_col].sum())
        there = int(paper[paper_col].sum()) if paper_col in paper.columns else None
        where = ", ".join(f"{r.model} {int(getattr(r, here_col))}" for r in verdicts.itertuples()
                          if getattr(r, here_col))
        rows.append((name, here, there, where))
    b_name, b_here, b_there, b_where = rows[0]
    if b_here == 0 and b_there == 0:
        text = ("**Under Bonferroni (the paper's correction), this run agrees with the paper's verdict**: no "
                "observational metric passes the dual rule in either.")
    elif b_here > 0 and b_there == 0:
        text = (f"**Unlike the paper**, under Bonferroni (the paper's correction) {plural(b_here, 'cell')} of this run "
                f"pass{'es' if b_here == 1 else ''} the dual rule" + (f" ({b_where})" if b_where else ""))
        p_level = float(paper.alpha_bonferroni.min())
        if table is not None and float(verdicts.alpha_bonferroni.min()) > p_level:
            hits = table[table.sig_dual_bonf.astype(bool)]
            strict = int(((hits.p_t < p_level) & (hits.p_W < p_level)).sum())
            text += (f"; the families here are smaller, so their Bonferroni level is less strict than the paper's "
                     f"{p_level:.4g}, and {strict} of {plural(b_here, 'passing cell')} would also pass at that level")
        text += "."
    elif b_here == 0:
        text = (f"**Unlike the paper**, under Bonferroni (the paper's correction) no cell of this run passes the dual "
                f"rule, where the paper has {plural(b_there, 'passing cell')}.")
    else:
        text = (f"Under Bonferroni (the paper's correction), both have passing cells: {b_there} in the paper and "
                f"{b_here} here" + (f" ({b_where})" if b_where else "") + ".")
    agree, disagree, unknown = [], [], []
    for name, here, there, where in rows[1:]:
        if there is None:
            unknown.append(f"{name}{_FDR_NOTE if name.startswith('Benjamini') else ''} passes {plural(here, 'cell')} here"
                           + (f" ({where})" if where else "") + " (the paper's count under it is not available)")
        elif (here > 0) == (there > 0):
            agree.append(f"{name} ({here} here, {there} in the paper)")
        else:
            disagree.append((name, f"passes {plural(here, 'cell')} here" + (f" ({where})" if where else "")
                                   + f" and {there} in the paper"))
    if agree:
        text += f" Whether any cell passes is the same under {join_words(agree)}."
    if disagree:
        same = ["Bonferroni"] * ((b_here > 0) == (b_there > 0)) + [a.split(" (")[0] for a in agree]
        named = join_words(n + (_FDR_NOTE if n.startswith("Benjamini") else "") for n, _ in disagree)
        details = ("it " + disagree[0][1] if len(disagree) == 1 else "; ".join(f"{n} {d}" for n, d in disagree))
        text += (f" **Under {named} it is not**: {details}, so the agreement holds under {join_words(same)} only."
                 if same else f" Nor is it under {named}: {details}.")
    if unknown:
        text += " " + "; ".join(u[0].upper() + u[1:] for u in unknown) + "."
    return text


def one_token_text(example: pd.DataFrame) -> str:
    """What one token's ablations show, worded from the numbers (markdown).

    ``example`` has one row per active expert, sorted by routing weight (highest first), with
    columns ``expert``, ``g`` (routing weight) and ``ΔL token`` (loss change in nats when the expert
    is removed at the token; positive = the prediction gets worse). The text names the router's top
    expert, the removal that hurts most — or, when no removal raises the loss, says so —, the paired
    difference D (top minus bottom expert) the audit is built on, and the rank correlation between
    weight and loss change (Spearman, :func:`moeaudit.stats.spearman_defined`).
    """

    d = example["ΔL token"].to_numpy(dtype=float)
    k = len(example)
    top_router = int(example.expert.iloc[0])
    n_up, n_down = int((d > 0).sum()), int((d < 0).sum())
    worst = int(np.argmax(d))
    parts = [f"At this token the router gives its largest weight to expert {top_router} (g = {example.g.iloc[0]:.3f})."]
    if n_up == 0:
        parts.append(f"No removal hurts the prediction here: all {k} removals {'lower' if n_down == k else 'lower or leave'} "
                     f"the loss, the smallest decrease being that of expert {int(example.expert.iloc[worst])} "
                     f"(ΔL = {d[worst]:+.4f} nats).")
    elif worst == 0:
        parts.append(f"Removing that expert is also the removal that hurts the prediction most (ΔL = {d[0]:+.4f} nats).")
    else:
        parts.append(f"The removal that hurts the prediction most, however, is that of expert "
                     f"{int(example.expert.iloc[worst])} (ΔL = {d[worst]:+.4f} nats), ranked {worst + 1} of {k} by "
                     "the router.")
    parts.append(f"The paired difference the audit is built on, highest-weight minus lowest-weight expert, is "
                 f"D = {_minus(f'{d[0]:+.4f}')} − ({_minus(f'{d[-1]:+.4f}')}) = {_minus(f'{d[0] - d[-1]:+.4f}')} nats here.")
    rho = spearman_defined(example.g.to_numpy(dtype=float), d)[0]  # NaN for < 3 experts or a constant column
    if np.isfinite(rho):
        parts.append(f"Over the {k} active experts the rank correlation between weight and loss change is {rho:+.2f}.")
    if 0 < n_down < k:
        parts.append(f"Removing {n_down} of them *lowers* the loss (green bars in the right panel; vermilion bars mark "
                     "removals that raise it).")
    elif n_down == 0:
        parts.append("No removal lowers the loss.")
    return " ".join(parts)


def significance_stars(p) -> str:
    """The paper's significance markers (Table 7, Figure 2): ``"***"`` for p < 0.001, ``"**"`` for
    p < 0.01, ``"*"`` for p < 0.05, else ``""`` (also for None or NaN). Uncorrected, two-sided."""
    if p is None or not np.isfinite(float(p)):
        return ""
    p = float(p)
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def model_panels(models, *, height: float = 3.2, sharey: bool = False, ncols: int = 2):
    """One panel per model, titled with the model's name, in rows of at most ``ncols`` at the
    column's width (:func:`panel_grid`; ``height`` inches per row). Returns ``(fig, axes)``, ``axes``
    a list in the order of ``models``."""
    fig, axes = panel_grid(len(models), ncols=ncols, height=height, sharey=sharey)
    for ax, name in zip(axes, models):
        ax.set_title(name)
    return fig, axes


def finish_panels(fig, axes, *, title: str, ylabel: str, xlabel: str | None = None, zero_line: bool = False,
                  legend: bool = True) -> None:
    """Label, lay out and show a :func:`model_panels` (or :func:`panel_grid`) figure: ``ylabel`` on
    the first panel of a single row, or once for the whole height of a grid of several rows;
    ``xlabel`` on every panel (wrapped to the panel's width), a horizontal line at 0 if asked, and the
    panels' legend entries (each label once) in the grid's first spare slot, or below the panels
    when there is none.
    A long ``title`` is wrapped to the figure's width."""
    rows = {ax.get_subplotspec().rowspan.start for ax in axes}
    cols = {ax.get_subplotspec().colspan.start for ax in axes}
    # about ten characters of a size-9 label per inch of panel, so that side-by-side labels never touch
    x_chars = max(20, int(fig.get_figwidth() / max(len(cols), 1) * 10))
    for ax in axes:
        if xlabel:
            ax.set_xlabel("\n".join(textwrap.wrap(xlabel, x_chars)), fontsize=9)
        if zero_line:
            ax.axhline(0, color="0.3", linewidth=0.8)
        if len(rows) == 1 and ax.get_subplotspec().colspan.start == 0:
            ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 40)))
    left = 0.0
    if len(rows) > 1:  # one label for the whole height: a label per row would run into the next row's
        fig.supylabel(ylabel, fontsize=11)
        left = 0.035
    fig.suptitle("\n".join(textwrap.wrap(title, 70)))
    handles, labels = [], []
    for ax in axes if legend else []:  # every panel's entries, each label once, in order of appearance
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    spare = [ax for ax in fig.axes if not ax.get_visible()]
    if handles and spare:
        fig.tight_layout(rect=(left, 0, 1, 1))
        box = spare[0].get_position()
        fig.legend(handles, labels, fontsize=8, loc="center", bbox_to_anchor=(box.x0 + box.width / 2, box.y0 + box.height / 2))
    elif handles:
        n_rows = -(-len(labels) // 3)
        fig.tight_layout(rect=(left, 0.05 * n_rows + 0.02, 1, 1))
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(3, len(labels)), frameon=False)
    else:
        fig.tight_layout(rect=(left, 0, 1, 1))
    plt.show()


def show_table(table: pd.DataFrame, *, labels: dict | None = None, caption: str = "", formats: dict | None = None,
               max_rows: int | None = 20, index: bool = False):
    """Display ``table`` for reading in the text column: columns renamed by ``labels`` (a column not
    in ``labels`` keeps its name, with a break opportunity after each ``_`` so that a long header can
    wrap), values formatted by ``formats`` (column -> format string or callable, by the *new* names;
    a missing value shows as "–" without reaching the formatter), the index hidden unless ``index``.
    A table longer than ``max_rows`` shows its first ``max_rows`` rows and the whole table in a
    collapsed block ("all N rows"). Returns None (the table is displayed, not returned, so that it
    is shown once when the call ends a cell)."""
    from IPython.display import HTML, display  # noqa: PLC0415

    labels = labels or {}
    shown = table.rename(columns={c: labels.get(c, str(c).replace("_", "_\u200b")) for c in table.columns})

    def styled(frame, cap):
        st = frame.style.format(formats or {}, na_rep="–")
        if not index:
            st = st.hide(axis="index")
        return st.set_caption(cap) if cap else st

    if max_rows is None or len(shown) <= max_rows:
        display(styled(shown, caption))
        return None
    display(styled(shown.head(max_rows), f"{caption} (first {max_rows} of {len(shown)} rows)" if caption
                   else f"first {max_rows} of {len(shown)} rows"))
    display(HTML(f"<details><summary>all {len(shown)} rows</summary>{styled(shown, caption).to_html()}</details>"))
    return None


def per_model_columns(frame: pd.DataFrame, rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One column per model of ``frame`` (one row per model, a ``model`` column), one row per quantity:
    ``rows`` lists ``(column, label, format string)`` top to bottom; a column ``frame`` lacks is left
    out, and a missing or NaN value reads "–"; a whole-number float (a count column that pandas made
    float by a NaN) takes an integer format. The table is made for :func:`show_table` with
    ``index=True`` (the labels are its index). ``ValueError`` for a frame without a ``model`` column,
    a model named twice, a label used twice, or a value its format cannot take (naming the column).

    >>> per_model_columns(pd.DataFrame({"model": ["a", "b"], "cells": [20, 15]}), [("cells", "cells", "{:d}")])
            a   b
    cells  20  15
    """
    if "model" not in frame.columns:
        raise ValueError(f"frame needs a 'model' column (one row per model), got columns {list(frame.columns)}")
    twice = frame.model[frame.model.duplicated()].tolist()
    if twice:
        raise ValueError(f"each model must have one row; named more than once: {twice}")
    labels = [label for _, label, _ in rows]
    if len(set(labels)) < len(labels):
        raise ValueError(f"each label must be used once, got {labels}")

    def fmt(v, col, f):
        if v is None or (np.ndim(v) == 0 and pd.isna(v)):
            return "–"
        if isinstance(v, (float, np.floating)) and float(v).is_integer() and f.endswith("d}"):
            v = int(v)
        try:
            return f.format(v)
        except (ValueError, TypeError) as err:
            raise ValueError(f"column {col!r}: the value {v!r} does not take the format {f!r} ({err})") from None

    return pd.DataFrame({r["model"]: {label: fmt(r.get(col), col, f) for col, label, f in rows if col in frame.columns}
                         for r in frame.to_dict("records")})


#: The paper's protocol and the released code's, for the table of departures. Each value is
#: documented: paper = arXiv:2606.10703v1, Sections 2-3 and Appendix A; released code = the
#: repository callmeloui/observational_metrics at commit 18bd31b (its behaviour as read and
#: re-run, see the chapter on the released results).
PROTOCOL_REFERENCE: dict[str, tuple[str, str]] = {
    "ablation": ("the expert's contribution removed at token t (Section 2, functional importance)",
                 "the expert zeroed at every position of the sequence where it is routed (forward hook)"),
    "positions": ("200 positions per cell", "a fresh seeded draw (seed 42) per metric; the control draws with replacement"),
    "layers": ("five MoE layers per model, proportional to depth", "the same five layers"),
    "family": ("Bonferroni over 4 metrics x 5 layers = 20 cells per model (5 for the control)",
               "no correction and no agreement rule in the code"),
    "models": ("OLMoE-1B-7B-0924, Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite", "the same checkpoints"),
    "context": ("not stated in the text",
                "the first 100 test lines longer than 50 characters, right-padded to the longest (430 tokens for "
                "OLMoE, 512 for DeepSeek)"),
    "corpus": ("the WikiText-2 test split (release not stated)", "the split as loaded by the code, one line per text"),
    "evaluation text vs training distribution": (
        "the checkpoints' own pre-training text is not WikiText-2; their loss on it is not reported",
        "not measured"),
    "metrics": ("utilisation, activation norm/std, mean routing weight over the real tokens that select the expert",
                "differs per model: router logits and padding positions for OLMoE; padding counted for DeepSeek; "
                "for Qwen, count/(k*T), norms from 30 texts, std of 32 coordinates"),
    "statistics": ("Cohen's d, paired t-test, Wilcoxon signed-rank, Bonferroni, t-and-Wilcoxon agreement",
                   "d with ddof 0 in the per-token scripts, ddof 1 elsewhere; scipy defaults"),
    "precision": ("not stated beyond a half-precision tolerance in the verification (Appendix B)",
                  "losses in float32; the progressive ablation ran in float16"),
}


def protocol_departures(*, params: dict, corpus_source, audited: dict, n_moe_layers: dict, contexts: dict,
                        n_parameters: dict, n_metrics: int, regimes: dict | None = None) -> pd.DataFrame:
    """One row per aspect of the protocol: what the paper says, what the released code does
    (:data:`PROTOCOL_REFERENCE`), and what this build does. The last column is computed from the
    audit chapter's parameters (``params``), the resolved corpus (``corpus_source``, a
    :class:`moeaudit.corpus.CorpusSource`), and per model: the audited layers, the number of MoE
    layers, the context length in tokens and the parameter count; ``n_metrics`` is the number of
    observational metrics; ``regimes`` (model -> ``(audited, training)``: the
    :func:`moeaudit.corpus.loss_regime` dicts on the text this build audits and on the model's training
    distribution, or ``None`` where it is not recorded) fills the row on how the two texts compare.
    ``KeyError`` if ``params`` lacks an audit parameter.
    """
    build = {
        "ablation": f"mode = {params['mode']!r}: "
                    + ("token-local, as the paper defines it" if params["mode"] == "token" else "sequence-wide, as the released code")
                    + "; the other definition is one parameter away and compared in the chapter on intervention definitions",
        "positions": f"{params['n_positions']} positions per model, one seeded draw (seed {params['seed']}) shared by every "
                     "metric, layer and the control, without replacement",
        "layers": "; ".join(f"{m}: {len(a)} of {n_moe_layers[m]} MoE layers {list(a)}" for m, a in audited.items()),
        "family": "; ".join(f"{m}: {n_metrics * len(a)} cells ({len(a)} for the control)" for m, a in audited.items())
                  + "; the paper's dual rule, with Holm and Benjamini-Hochberg beside Bonferroni",
        "models": "; ".join(f"{m}: {n / 1e6:.2f} M parameters" if n else f"{m}: size not recorded"
                            for m, n in n_parameters.items()),
        "context": f"the first {params['n_texts']} corpus lines longer than 50 characters, up to "
                   + (f"{next(iter(contexts.values()))} tokens" if len(set(contexts.values())) == 1 else
                      ", ".join(f"{c} tokens ({m})" for m, c in contexts.items())) + "; each text unpadded",
        "corpus": corpus_source.describe(),
        "metrics": "the paper's definitions, over the real tokens only",
        "statistics": "Cohen's d_z with ddof 1 and an exact (noncentral t) 95% interval, paired t-test, Wilcoxon "
                      "signed-rank, TOST equivalence and the minimum detectable effect",
        "precision": f"dtype = {params['dtype']!r} for the model; losses in float32",
        "evaluation text vs training distribution": "; ".join(
            _regime_pair(m, *pair) for m, pair in (regimes or {}).items()) or "not measured in this build",
    }
    form = resolve_text_form(corpus_source, params.get("text_form", "auto"))
    build["corpus"] += {"released": "; each line as the corpus serves it, with its leading space and line break",
                        "stripped": "; lines stripped of surrounding whitespace",
                        "wikitext": "; each paragraph in WikiText-2's tokenized form (the models' training form)",
                        }.get(form, f"; text form {form!r}")
    return pd.DataFrame([{"aspect": k, "paper": v[0], "released code": v[1], "this build": build[k]}
                         for k, v in PROTOCOL_REFERENCE.items()])


def regime_connection_text(table: pd.DataFrame, audited_corpus: str) -> str:
    """The paragraph under appendix A1's regime table (``table``: :func:`moeaudit.zoo.regime_table`):
    how the card's test loss, the audit's selection of the same split, the embedded corpus and the
    text this build audits (``audited_corpus``: its description) compare, each as a range over the
    models, with a bold warning when the audited text's gain is below
    :data:`moeaudit.corpus.NEAR_UNIGRAM_GAIN` for some model."""
    def span(col, fmt="{:.2f}"):
        return value_span(table[col], fmt) if col in table else "not recorded"

    parts = [f"The model cards score WikiText-2 test at {span('WikiText-2 test, card (loss)')} nats per token."]
    if table["WikiText-2 test, audit selection (loss)"].notna().any():
        parts.append(f"Read as the audit reads it (each selected line from its own start), the same split gives "
                     f"{span('WikiText-2 test, audit selection (loss)')} nats, a gain over its in-sample unigram of "
                     f"{span('WikiText-2 test, audit selection (gain)')} nats per token.")
    if table["embedded corpus, default form (loss)"].notna().any():
        parts.append(f"The embedded corpus in its default form gives {span('embedded corpus, default form (loss)')} "
                     f"nats and a gain of {span('embedded corpus, default form (gain)')}: "
                     f"{span('gain ratio (gate)', '{:.0%}')} of the WikiText-2 gain.")
    if "audited text (gain)" in table:
        gains = table["audited text (gain)"]
        parts.append(f"The text this build audits ({audited_corpus}) gives {span('audited text (loss)')} nats and a "
                     f"gain of {span('audited text (gain)')} nats per token.")
        low = [str(m) for m, g in gains.items() if np.isfinite(g) and g < NEAR_UNIGRAM_GAIN]
        if low:
            parts.append(f"**{join_words(low)} take less than {NEAR_UNIGRAM_GAIN} nats per token from context on it**: "
                         "on this text the audit measures models that predict token frequencies, not models that read "
                         "their context.")
    return " ".join(parts)


def _regime_pair(model: str, audited: dict, training: dict | None) -> str:
    """``model``'s loss and gain over the in-sample unigram (nats per token) on the audited text and,
    where recorded, on its training distribution (WikiText-2 test, from its model card)."""
    text = (f"{model}: loss {audited['mean_loss']:.2f} on the audited text (in-sample unigram "
            f"{audited['unigram_loss']:.2f}, gain {audited['gain']:.2f})")
    if training is None:
        return text + ", training distribution not recorded"
    return (text + f" vs {training['mean_loss']:.2f} on WikiText-2 test (unigram {training['unigram_loss']:.2f}, "
            f"gain {training['gain']:.2f}): {audited['gain'] / training['gain']:.0%} of the gain")


def routing_share_heatmaps(shares: dict, *, vmin: float = 0.1):
    """One heat map per model of the routing-mass share (percent) per (layer, expert), on one shared
    logarithmic colour scale from ``vmin`` percent (smaller shares get its colour) to the largest
    share (at least 10%), with one colour bar. ``shares``: model -> frame (layers x experts)."""
    from matplotlib.cm import ScalarMappable  # noqa: PLC0415
    from matplotlib.colors import LogNorm  # noqa: PLC0415
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415

    vmax = max(10.0, max(float(f.values.max()) for f in shares.values()))
    norm = LogNorm(vmin=vmin, vmax=vmax)
    n_rows = [len(f) for f in shares.values()]
    fig, axes = plt.subplots(len(shares), 1, figsize=(COLUMN_INCHES, 0.72 * len(shares) + 0.34 * sum(n_rows)),
                             squeeze=False, layout="constrained", gridspec_kw={"height_ratios": n_rows})
    for ax, (m, f) in zip(axes[:, 0], shares.items()):
        sns.heatmap(f.clip(lower=vmin), ax=ax, cmap="viridis", norm=norm, cbar=False, xticklabels=8, yticklabels=True)
        ax.set(title=m, xlabel="expert index", ylabel="layer")
        ax.tick_params(axis="y", rotation=0)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=axes[:, 0].tolist(), shrink=0.9, pad=0.01,
                      label="share of routing mass (%)", extend="min")
    cb.set_ticks([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if vmin <= t <= vmax])
    cb.ax.yaxis.set_major_formatter("{x:g}")
    cb.ax.yaxis.set_minor_formatter(NullFormatter())
    return fig


def audit_limits_text(*, default_models: bool, paper_corpus: bool, family_sizes: dict | None = None,
                      paper_family: int | None = None, mode: str = "token") -> str:
    """What limits a comparison of this run's audit with the paper's: the small default models
    (when ``default_models``), families of another size than the paper's (``family_sizes``: model
    -> cells of this run, against ``paper_family`` cells per model), another corpus (unless
    ``paper_corpus``), and the documented departures of the protocol from the released code
    (listed in the appendix on departures); ``mode`` (``"token"`` or ``"sequence"``) is the run's
    ablation, which departs from the released code's (token mode) or follows it (sequence mode).
    ``ValueError`` for another mode."""
    limits = []
    if default_models:
        limits.append("The default models are small stand-ins trained for this book (see the appendix on them).")
    if family_sizes and paper_family:
        sizes = sorted(set(family_sizes.values()))
        if sizes == [paper_family]:
            limits.append(f"Their families have the paper's size ({paper_family} cells per model), so the Bonferroni "
                          "level is the paper's.")
        else:
            off = [f"{m} {n}" for m, n in family_sizes.items() if n != paper_family]
            larger = {n > paper_family for n in family_sizes.values() if n != paper_family}
            level = ("stricter than the paper's" if larger == {True} else "less strict than the paper's"
                     if larger == {False} else "stricter than the paper's for some models and less strict for others")
            limits.append(f"Families differ from the paper's {paper_family} cells per model ({join_words(off)}), so the "
                          f"Bonferroni level is {level}.")
    if not paper_corpus:
        limits.append("The effects are measured on another corpus than the paper's (see the box at the top).")
    if mode not in ("token", "sequence"):
        raise ValueError(f"mode must be 'token' or 'sequence', got {mode!r}")
    ablation = ("and token-local ablation (the released code's is sequence-wide, which differs except at the last "
                "layer)" if mode == "token" else "while its ablation here is the released code's sequence-wide one "
                "(the paper defines it at the token, which differs except at the last layer)")
    limits.append("The protocol also differs from the released code's in documented ways: one draw of positions shared "
                  "by all metrics (the released code draws per metric), the paper's metric definitions (the released "
                  f"OLMoE utilisation and mean routing weight are statistics of router logits), {ablation}; the "
                  "appendix on departures lists them all.")
    return " ".join(limits)


def strategy_spread_text(spreads: dict, dtype: str) -> str:
    """Per model, how far the cached packed step (``strategy="kv"``) and the re-run prefix
    (``"full"``) of the same token-mode ablations differ in ``dtype`` (``spreads[name]`` is
    :func:`moeaudit.engine.strategy_spread`): the largest and median |difference| in nats, the share
    of sign flips and the premise failures of each path."""
    parts = []
    for name, s in spreads.items():
        if s["max_abs_diff"] == 0:
            parts.append(f"{name}: identical over {s['matched']:,} matched ablations, with "
                         f"{plural(s['premise_failed_kv'], 'premise failure')} on either path in {dtype}"
                         if s["premise_failed_kv"] == s["premise_failed_full"] else
                         f"{name}: identical losses over {s['matched']:,} matched ablations, but the premise check "
                         f"fails for {plural(s['premise_failed_kv'], 'record')} of the cached path and "
                         f"{s['premise_failed_full']:,} of the re-run in {dtype}")
            continue
        flips = ("no two non-zero effects to compare signs" if s["sign_flips"] != s["sign_flips"]
                 else f"{s['sign_flips']:.1%} of the signs flip")
        parts.append(f"{name}: at most {s['max_abs_diff']:.3g} nats apart (median {s['median_abs_diff']:.2g}) over "
                     f"{s['matched']:,} matched ablations, {flips}, and the premise "
                     f"check fails for {plural(s['premise_failed_kv'], 'record')} of the cached path and "
                     f"{s['premise_failed_full']:,} of the re-run in {dtype}")
    return "; ".join(parts)


def finite_or(value, fmt: str, otherwise: str) -> str:
    """``fmt.format(value)`` for a finite number, else ``otherwise`` (the words for an undefined
    value, so that no page prints "nan")."""
    v = float(value)
    return fmt.format(v) if np.isfinite(v) else otherwise


def ablation_site(mode: str) -> str:
    """Where an ablation of ``mode`` removes the expert, in words for the chapters' protocol text:
    ``"token"`` (the paper's Definition 2.1) at token t only; ``"sequence"`` (the released code's
    hook) at every position up to t where the expert is routed. ``ValueError`` for another mode."""
    if mode == "token":
        return "at token t only (the paper's Definition 2.1)"
    if mode == "sequence":
        return ("at every position up to t where it is routed (`mode = \"sequence\"`, the released code's "
                "intervention rather than the paper's Definition 2.1; chapter 9 compares the two)")
    raise ValueError(f"mode={mode!r} is not 'token' or 'sequence'")


def utilisation_variants_text(cmp: pd.DataFrame, *, rho_col: str, n_variants: int, padding: dict,
                              balanced: dict) -> str:
    """Chapter 3's reading of the released utilisation variants against the paper's definition.

    ``cmp``: one row per (model, layer, variant) with ``rho_col`` and ``same high expert``;
    ``padding``: :func:`moeaudit.metrics.padding_summary`; ``balanced[model]``: the share a
    balanced router gives the top-k experts (k / E). Says, per variant, the range of rho and of
    the same-high-expert share; how concentrated the router is at padding positions; how much
    padding the corpus produced; and, when fewer than ``n_variants`` variants appear, why (no
    padding position: the padded variants cannot be re-created)."""
    parts = [f"**{v}**: ρ from {g[rho_col].min():+.2f} to {g[rho_col].max():+.2f}, same high expert at "
             f"{g['same high expert'].min():.0%}–{g['same high expert'].max():.0%} of tokens."
             for v, g in cmp.groupby("variant", sort=False)]
    top = padding["top_share"]
    if top:
        parts.append(f"At padding positions the router sends {min(top.values()):.0%}–{max(top.values()):.0%} of its "
                     "selections to the same top-k experts of the layer (a balanced router would give them "
                     + ", ".join(f"{b:.1%} ({n})" for n, b in balanced.items()) + ").")
    parts.append("Right-padding the book's corpus to its longest text gave "
                 + ", ".join(f"{p:.0f}% padding ({n})" for n, p in padding["pad_percent"].items()) + ".")
    shown = cmp.variant.nunique()
    if shown < n_variants:
        parts.append(f"Only {shown} of the {n_variants} variants {'appears' if shown == 1 else 'appear'}: where every text fills the context there "
                     "is no padding position, so the padded variants cannot be re-created from this corpus "
                     "(WikiText-2's lines, of unequal length, give them).")
    return " ".join(parts)


def regime_text(r: dict) -> str:
    """The sentence that states how well a model reads the text it is audited on (``r``: the dict of
    :func:`moeaudit.corpus.loss_regime`), with a warning in bold when the model predicts the text no
    better than a uniform guess, or takes less than :data:`moeaudit.corpus.NEAR_UNIGRAM_GAIN` nats per
    token from context (near-unigram: an expert's removal then changes predictions that barely use
    context, and its effects say little about a model reading text it knows). Over a small sample
    (``small_sample``) it says that the gain is understated instead of warning."""
    # the gain as the difference of the two losses as printed, so that the sentence's arithmetic holds
    gain = round(r["unigram_loss"], 2) - round(r["mean_loss"], 2)
    text = (f"Mean loss on this text {r['mean_loss']:.2f} nats per token, against {r['unigram_loss']:.2f} for a "
            f"unigram model fitted to the same tokens and {r['uniform_loss']:.2f} for a uniform guess: the model "
            f"takes {gain:.2f} nats per token from context.")
    if r.get("small_sample"):
        text += (f" (Over only {r['n_tokens']:,} scored tokens, against a vocabulary of {r['vocab_size']:,}, the "
                 "unigram fitted to them fits them closely: it understates a unigram model's loss, and so this gain "
                 "understates what the model takes from context.)")
    if not r["above_chance"]:
        text += (" **This model predicts the text no better than chance** (a random or untrained model): its "
                 "effects and verdicts below describe noise, not a trained MoE model.")
    elif r["near_unigram"] and not r.get("small_sample"):
        text += (f" **This model barely reads this text** (less than {NEAR_UNIGRAM_GAIN} nats per token from "
                 "context, close to a unigram model): its effects and verdicts below describe a model that "
                 "predicts token frequencies, not one that reads its context; use the text form or corpus it was "
                 "trained on.")
    return text


def zero_relation(lo: float, hi: float, *, digits: int = 3) -> str:
    """Where an interval ``[lo, hi]`` lies relative to zero, decided so that the words agree with the
    interval as displayed at ``digits`` decimals.

    ``"above"`` when ``lo > 0`` and ``lo`` does not round to zero at ``digits`` decimals; ``"below"``
    likewise for ``hi < 0``; ``"touches"`` when the unrounded interval excludes zero but its bound
    nearest zero rounds to zero (so "[+0.000, +0.271]" is never called excluding zero);
    ``"contains"`` when ``lo <= 0 <= hi``; ``"undefined"`` when a bound is NaN.
    ``ValueError`` when ``lo > hi`` or ``digits < 0``.
    """
    if digits < 0:
        raise ValueError(f"digits must be >= 0, got {digits}")
    if np.isnan(lo) or np.isnan(hi):
        return "undefined"
    if lo > hi:
        raise ValueError(f"lo ({lo}) exceeds hi ({hi})")
    if lo > 0:
        return "above" if round(lo, digits) > 0 else "touches"
    if hi < 0:
        return "below" if round(hi, digits) < 0 else "touches"
    return "contains"


def fmt_bound(v: float, *, digits: int = 3) -> str:
    """A signed interval bound at ``digits`` decimals, or with two significant digits where it would
    round to zero (``+0.00031`` instead of ``+0.000``), so that a bound that excludes zero shows it."""
    if v != 0 and round(v, digits) == 0:
        return f"{v:+.2g}"
    return f"{0.0 if round(v, digits) == 0 else v:+.{digits}f}"


def _minus(text: str) -> str:
    """``text`` with a leading ASCII hyphen-minus written as the minus sign (U+2212), as in formulas."""
    return "\u2212" + text[1:] if text.startswith("-") else text


def fmt_percent(x: float) -> str:
    """A share as a percentage with one decimal where it has one, none where it is whole (no
    round-half-to-even surprise: 0.125 reads 12.5%, not 12%).

    >>> fmt_percent(0.125), fmt_percent(0.1), fmt_percent(1 / 15)
    ('12.5%', '10%', '6.7%')
    """
    return f"{100 * float(x):.1f}".rstrip("0").rstrip(".") + "%"


def fmt_with_ci(est: float, lo: float, hi: float, *, digits: int = 3, significant: bool = False) -> str:
    """An estimate and its interval as one table cell, ``"+0.120 [+0.050,\u00a0+0.190]"`` (a
    non-breaking space inside the brackets, so that the interval never wraps).

    ``digits`` decimals (``significant=False``: every number through :func:`fmt_bound`, so that a
    value that is not zero never prints as ``+0.000``) or ``digits`` significant digits
    (``significant=True``, in fixed notation: ``+120`` rather than ``+1.2e+02``). ``"—"`` for a NaN
    estimate; the estimate alone when a bound is NaN. ``ValueError`` for ``digits`` that is not a
    whole number >= 0 (>= 1 with ``significant``) and for ``lo > hi``.

    >>> fmt_with_ci(0.12, 0.0004, 0.19)
    '+0.120 [+0.0004,\xa0+0.190]'
    >>> fmt_with_ci(0.0123, -0.004, 0.031, digits=2, significant=True)
    '+0.012 [-0.004,\xa0+0.031]'
    """
    if isinstance(digits, bool) or not isinstance(digits, (int, np.integer)) or digits < int(significant):
        raise ValueError(f"digits must be a whole number >= {int(significant)}, got {digits!r}")
    if pd.isna(est):
        return "—"
    one = (lambda v: fmt_significant(v, int(digits))) if significant else (lambda v: fmt_bound(float(v), digits=int(digits)))
    if pd.isna(lo) or pd.isna(hi):
        return one(est)
    if float(lo) > float(hi):
        raise ValueError(f"the interval's lower bound {lo!r} exceeds its upper bound {hi!r}")
    return f"{one(est)} [{one(lo)},\u00a0{one(hi)}]"


def fmt_significant(v: float, digits: int) -> str:
    """``v`` signed, to ``digits`` significant digits in fixed notation, trailing zeros dropped as
    the ``g`` format drops them (``+120``, ``-0.004``, ``+0`` for zero, never ``-0``, never
    ``1.2e+02``).

    >>> fmt_significant(123.4, 2), fmt_significant(-0.004, 2), fmt_significant(-0.0, 2), fmt_significant(9.96, 2)
    ('+120', '-0.004', '+0', '+10')
    """
    v = float(v)
    if v == 0 or not np.isfinite(v):
        return "+0" if v == 0 else f"{v:+}"
    rounded = round(v, digits - 1 - int(np.floor(np.log10(abs(v)))))
    if rounded == 0:
        return "+0"
    decimals = max(digits - 1 - int(np.floor(np.log10(abs(rounded)))), 0)
    text = f"{rounded:+.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --- The learner's aids: reading time and answer checks for the exercises --------------------------

#: silent reading rate of English non-fiction, words per minute: the mean of the meta-analysis by
#: Brysbaert (2019), "How many words do we read per minute?", J. Memory and Language 109, 104047
READING_WPM = 238
#: where the chapters' sources live (jupytext percent format, one file per chapter)
NOTEBOOK_DIR = REPO_ROOT / "notebooks"

_FENCED_CODE = re.compile(r"^(`{3,})(?:bash|sh|python|console|text|)[ \t]*$.*?^\1[ \t]*$", re.S | re.M)
_DIRECTIVE_LINE = re.compile(r"^(?:`{3,}|:{3,}).*$|^:[a-z\-]+:.*$", re.M)
_ROLE = re.compile(r"\{[a-z:]+\}`[^`]*`")


def word_count(markdown: str) -> int:
    """Words a reader reads in a MyST markdown text: whitespace-separated tokens holding a letter or a
    digit, after removing fenced code blocks and directive fences and options (a directive's content
    counts); a role such as a glued value or a citation counts as one word, a formula as its tokens.
    ``TypeError`` unless ``markdown`` is a ``str``.

    Examples
    --------
    >>> word_count("The audit ablates {glue:text}`n` experts.\\n```bash\\nmake book\\n```")
    5
    """
    if not isinstance(markdown, str):
        raise TypeError(f"markdown must be a str, got {type(markdown).__name__}")
    text = _ROLE.sub(" role ", _DIRECTIVE_LINE.sub(" ", _FENCED_CODE.sub(" ", markdown)))
    return sum(1 for token in text.split() if re.search(r"\w", token))


def reading_minutes(words: int, *, wpm: float = READING_WPM) -> int:
    """Reading time in whole minutes, at least one: ``ceil(words / wpm)`` (default rate
    :data:`READING_WPM`). ``ValueError`` for a negative word count or a rate that is not positive."""
    if int(words) != words or words < 0:
        raise ValueError(f"words must be a whole number >= 0, got {words!r}")
    if not wpm > 0:
        raise ValueError(f"wpm must be > 0, got {wpm!r}")
    return max(1, math.ceil(words / wpm))


def chapter_markdown(stem: str, *, notebooks: Path = NOTEBOOK_DIR) -> str:
    """The markdown cells of chapter ``stem`` (``notebooks/<stem>.py``, jupytext percent format), joined
    by blank lines, with the comment marks removed. ``ValueError`` naming the valid stems for an
    unknown chapter."""
    path = Path(notebooks) / f"{stem}.py"
    if not path.is_file():
        valid = sorted(p.stem for p in Path(notebooks).glob("*.py"))
        raise ValueError(f"stem must name a chapter in {notebooks}, one of {valid}; got {stem!r}")
    cells, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            current = [] if "[markdown]" in line else None
            if current is not None:
                cells.append(current)
        elif current is not None:
            current.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    return "\n\n".join("\n".join(c) for c in cells)


def chapter_reading_minutes(stem: str, *, notebooks: Path = NOTEBOOK_DIR, wpm: float = READING_WPM) -> int:
    """Reading time of chapter ``stem``'s prose in minutes (:func:`word_count` of
    :func:`chapter_markdown`, :func:`reading_minutes`): tables, figures and computed sentences are not
    counted, so it is a lower bound for a first reading. ``ValueError`` for an unknown chapter."""
    return reading_minutes(word_count(chapter_markdown(stem, notebooks=notebooks)), wpm=wpm)


@dataclass(frozen=True)
class AnswerCheck:
    """A learner's answer judged against the value the page computed: ``correct``, the ``answer``, the
    ``expected`` value and ``message``, one sentence saying right, or wrong and by how much. Shown as
    that sentence in a notebook."""

    correct: bool
    answer: float
    expected: float
    message: str

    def __str__(self) -> str:
        return self.message

    def _repr_markdown_(self) -> str:
        return self.message


def check_answer(answer, expected: float, *, what: str, tolerance: float = 0.0, unit: str = "") -> AnswerCheck:
    """Judge a numeric ``answer`` to an exercise: right when ``|answer - expected| <= tolerance``,
    else wrong, with the signed distance (and, for a non-zero ``expected``, the relative one) in the
    message. ``what`` names the quantity ("the smallest detectable d_z"), ``unit`` its unit ("nats").
    ``ValueError`` for an answer that is not a finite real number, a non-finite ``expected`` or a
    negative ``tolerance``.

    Examples
    --------
    >>> check_answer(0.25, 0.25, what="the share").correct
    True
    >>> print(check_answer(3, 5, what="the number of cells"))
    Not yet: your 3 for the number of cells is 2 too low (40% below).
    """
    if isinstance(answer, bool) or not isinstance(answer, (int, float, np.integer, np.floating)) \
            or not np.isfinite(answer):
        raise ValueError(f"answer must be a finite number, got {answer!r}")
    if not np.isfinite(expected):
        raise ValueError(f"expected must be a finite number, got {expected!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    diff = float(answer) - float(expected)
    u = f" {unit}" if unit else ""
    if abs(diff) <= tolerance + 1e-12:
        within = f" (within {tolerance:g}{u} of the page's {expected:.6g})" if tolerance else ""
        return AnswerCheck(True, float(answer), float(expected), f"Right: {what} is {answer:g}{u}{within}.")
    rel = f" ({abs(diff) / abs(expected):.0%} {'above' if diff > 0 else 'below'})" if expected else ""
    return AnswerCheck(False, float(answer), float(expected),
                       f"Not yet: your {answer:g} for {what} is {abs(diff):g}{u} too {'high' if diff > 0 else 'low'}{rel}.")


def chapter_command(stem: str, changes: dict, *, current: dict, defaults: dict) -> str:
    """The one command that re-executes chapter ``stem`` as this run did but with ``changes``: a
    ``make chapter`` line whose ``-p`` values are the run's parameters that differ from the
    chapter's defaults (``current`` against ``defaults``, by name) and then ``changes`` (JSON
    values, so lists and strings are quoted as the book driver reads them). Parameters of
    ``current`` that the chapter does not have are ignored."""
    import json  # noqa: PLC0415

    values = {k: v for k, v in current.items() if k in defaults and v != defaults[k] and k not in changes}
    values.update(changes)
    parts = []
    for k, v in values.items():
        if (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, str) and re.fullmatch(r"[\w.\-/]+", v)):
            parts.append(f"-p {k} {v}")  # a number or a plain word reads as itself
        else:  # a YAML value in single quotes, its double quotes escaped inside PARAMS="..."
            parts.append(f"-p {k} '{json.dumps(v)}'".replace('"', '\\"'))
    return f'make chapter NB={stem} PARAMS="{" ".join(parts)}"'
