"""Chapter 1's reading paths: read from a table of contents and the chapters' sources, in their order,
refusing a part or chapter the book does not have."""

from __future__ import annotations

import pytest

from moeaudit.chapters import introduction as I

TOC = """format: jb-book
root: book/01_intro
parts:
  - caption: Core
    chapters:
      - file: book/02_a
      - file: book/03_b
  - caption: Extra
    chapters:
      - file: book/04_c
"""


@pytest.fixture()
def tiny_book(tmp_path):
    (tmp_path / "_toc.yml").write_text(TOC)
    nb = tmp_path / "notebooks"
    nb.mkdir()
    words = {"01_intro": 1, "02_a": 300, "03_b": 10, "04_c": 500}
    for stem, n in words.items():
        (nb / f"{stem}.py").write_text(f"# %% [markdown]\n# # Title {stem[3:]}\n#\n# " + "word " * n + "\n")
    return tmp_path / "_toc.yml", nb


def test_toc_parts_in_order_with_the_root_first(tiny_book):
    toc, _ = tiny_book
    assert I.toc_parts(toc) == [("", ["01_intro"]), ("Core", ["02_a", "03_b"]), ("Extra", ["04_c"])]


def test_path_chapters_follow_the_toc_order_whatever_the_order_given(tiny_book):
    toc, _ = tiny_book
    assert I.path_chapters(["Extra"], ["03_b", "01_intro"], toc=toc) == ["01_intro", "03_b", "04_c"]
    assert I.path_chapters(["Core"], [], toc=toc) == ["02_a", "03_b"]


def test_path_chapters_refuse_an_unknown_part_or_chapter(tiny_book):
    toc, _ = tiny_book
    with pytest.raises(ValueError, match=r"part 'Nope' is not in the table of contents; parts: \['Core', 'Extra'\]"):
        I.path_chapters(["Nope"], [], toc=toc)
    with pytest.raises(ValueError, match="chapter '09_x' is not in the table of contents"):
        I.path_chapters([], ["09_x"], toc=toc)


def test_reading_paths_table_and_text(tiny_book):
    toc, nb = tiny_book
    paths = {"Quick": ("a first look", ("Core",), ())}
    table = I.reading_paths_table(paths, toc=toc, notebooks=nb)
    assert list(table.stem) == ["02_a", "03_b"]
    assert list(table.title) == ["Title a", "Title b"]
    # 300 + 3 words at 238 words per minute: 2 minutes; 10 + 3 words: 1 minute
    assert list(table.minutes) == [2, 1]
    assert I.reading_paths_text(table) == ("- **Quick** (a first look; about 3 minutes of prose): "
                                           "[Title a](02_a.ipynb) → [Title b](03_b.ipynb)")


def test_chapter_title_refuses_a_chapter_without_a_heading(tmp_path):
    (tmp_path / "x.py").write_text("# %% [markdown]\n# No heading here.\n")
    with pytest.raises(ValueError, match="no level-one heading"):
        I.chapter_title("x", notebooks=tmp_path)


def test_the_book_has_three_paths_over_its_own_chapters():
    table = I.reading_paths_table()
    assert table.path.nunique() == 3
    assert (table.minutes >= 1).all() and table.title.str.len().gt(0).all()


def test_the_chapter_table_follows_the_table_of_contents(tmp_path):
    from moeaudit.chapters.introduction import chapters_text, first_objective
    from moeaudit.tooling import book

    text = chapters_text()
    stems = [s for s in book.chapters() if s != "01_introduction"]
    assert [line.split("](")[1].split(".ipynb")[0] for line in text.splitlines()[2:]] == stems
    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / "x.py").write_text("# %% [markdown]\n# # X\n#\n# After this chapter you can\n# - do one thing\n#   well;\n"
                             "# - do another.\n")
    (nb / "y.py").write_text("# %% [markdown]\n# # Y\n# No objectives here.\n")
    assert first_objective("x", notebooks=nb) == "do one thing well"
    with pytest.raises(ValueError, match="no learning objectives"):
        first_objective("y", notebooks=nb)
