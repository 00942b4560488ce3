"""The book's figure and table layout helpers: figures at the column's width, panels in rows,
readable tables, box text without raw markup."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from moeaudit import report  # noqa: E402


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    monkeypatch.setattr(plt, "show", lambda: None)
    yield
    plt.close("all")


def test_figures_default_to_the_column_width():
    report.use_book_style()
    fig = plt.figure()
    assert fig.get_size_inches()[0] * fig.dpi <= 688  # the text column in CSS px


@pytest.mark.parametrize("n, rows", [(1, 1), (2, 1), (3, 2), (5, 3)])
def test_panel_grid_wraps_into_rows_of_two(n, rows):
    fig, axes = report.panel_grid(n, height=2.0)
    assert len(axes) == n
    assert fig.get_size_inches()[0] == pytest.approx(report.COLUMN_INCHES)
    assert fig.get_size_inches()[1] == pytest.approx(2.0 * rows)
    assert sum(not ax.get_visible() for ax in fig.axes) == rows * min(2, n) - n
    with pytest.raises(ValueError, match="n >= 1"):
        report.panel_grid(0)


def test_finish_panels_labels_each_row_and_places_the_legend():
    fig, axes = report.model_panels(["a", "b", "c"])
    for ax in axes:
        ax.plot([0, 1], [0, 1], label="line")
    axes[2].plot([0, 1], [1, 0], label="only in the third panel")
    report.finish_panels(fig, axes, title="t " * 80, ylabel="d_z", xlabel="layer")
    assert [ax.get_ylabel() for ax in axes] == ["", "", ""] and fig.get_supylabel() == "d_z"  # once, whole height
    fig1, axes1 = report.model_panels(["a", "b"])
    report.finish_panels(fig1, axes1, title="t", ylabel="d_z")
    assert [ax.get_ylabel() for ax in axes1] == ["d_z", ""]  # one row: on its first panel
    assert "\n" in fig._suptitle.get_text()  # a long title wraps
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["line", "only in the third panel"]
    spare = next(ax for ax in fig.axes if not ax.get_visible()).get_position()
    x, y = legend.get_bbox_to_anchor().transformed(fig.transFigure.inverted()).p0
    assert spare.x0 <= x <= spare.x1 and spare.y0 <= y <= spare.y1  # in the spare slot


def test_side_by_side_x_labels_do_not_touch(monkeypatch):
    monkeypatch.setattr(plt, "show", lambda: None)
    fig, axes = report.model_panels(["a", "b", "c"])  # two rows: the grid's y label takes a margin
    long = "k = number of highest-weight experts removed"
    report.finish_panels(fig, axes, title="t", ylabel="y", xlabel=long)
    fig.canvas.draw()
    boxes = [ax.xaxis.label.get_window_extent() for ax in axes]
    # the left panel's label ends well before the right one's begins (unwrapped: about 5 px apart)
    assert boxes[1].x0 - boxes[0].x1 > 0.1 * fig.dpi
    assert all(ax.get_xlabel().replace("\n", " ") == long for ax in axes)


def test_show_table_renames_and_collapses(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    df = pd.DataFrame({"cohens_dz": range(30), "p_t": [0.5] * 30})
    report.show_table(df, labels={"cohens_dz": "d_z"}, max_rows=10, caption="cap")
    head, rest = shown
    html = head.to_html()
    assert report.show_table(df.head(2)) is None  # displayed once, not returned
    assert "d_z" in html and "p_\u200bt" in html and "cohens_dz" not in html
    assert "first 10 of 30 rows" in html
    assert "<details>" in rest.data and "all 30 rows" in rest.data
    shown.clear()
    report.show_table(df.head(5))
    assert len(shown) == 1


def test_box_text_has_no_raw_dollar_or_markup():
    out = report.text_html("set $MOEAUDIT_DATA_DIR <here> & retry")
    assert "$" not in out and "<code>MOEAUDIT_DATA_DIR</code>" in out and "&lt;here&gt;" in out


def test_per_model_columns_puts_each_model_in_a_column():
    frame = pd.DataFrame({"model": ["m1", "m2"], "cells": [20, 15], "share": [0.5, float("nan")]})
    out = report.per_model_columns(frame, [("cells", "cells", "{:d}"), ("share", "share", "{:.0%}"),
                                           ("absent", "absent", "{}")])
    assert list(out.columns) == ["m1", "m2"] and list(out.index) == ["cells", "share"]
    assert out.loc["cells", "m2"] == "15" and out.loc["share", "m1"] == "50%" and out.loc["share", "m2"] == "–"


def test_fmt_percent_keeps_the_half():
    assert report.fmt_percent(0.125) == "12.5%"  # f"{0.125:.0%}" reads 12%
    assert report.fmt_percent(0.5) == "50%" and report.fmt_percent(1 / 15) == "6.7%"


def test_per_model_columns_refuses_what_it_cannot_show():
    counts = pd.DataFrame({"model": ["m1", "m2"], "cells": [20, float("nan")]})  # a count made float by a NaN
    out = report.per_model_columns(counts, [("cells", "cells", "{:d}")])
    assert out.loc["cells", "m1"] == "20" and out.loc["cells", "m2"] == "–"
    for frame, rows, match in ((counts.drop(columns="model"), [("cells", "cells", "{:d}")], "model"),
                               (pd.concat([counts, counts]), [("cells", "cells", "{:d}")], "more than once"),
                               (counts, [("cells", "x", "{:d}"), ("cells", "x", "{:d}")], "label"),
                               (counts.assign(cells=[1.5, 2.5]), [("cells", "cells", "{:d}")], "'cells'")):
        with pytest.raises(ValueError, match=match):
            report.per_model_columns(frame, rows)
