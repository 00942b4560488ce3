"""Chapter 1 (introduction): how to read the book, three reading paths through its chapters, each
listed in the order of the table of contents (``_toc.yml``) with its titles and reading times.

A path is a set of table-of-contents parts and single chapters; the chapters are read from
``_toc.yml`` and their titles from the first heading of each chapter's source, so a chapter that
is added to a part joins the paths that name that part, and a path that names a chapter or a part
the book does not have is refused.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ..paths import REPO_ROOT
from ..report import NOTEBOOK_DIR, chapter_markdown, chapter_reading_minutes

#: the three reading paths: title -> (who it is for, the toc parts it takes whole, further chapters)
READING_PATHS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "The paper's argument": (
        "the claim, its evidence and how far this build departs from it",
        ("The audit", "The paper's own data"), ("A2_departures",)),
    "Causal interpretability from scratch": (
        "from observing a router to intervening on it, and what an intervention measures",
        (), ("02_verification", "03_observational_metrics", "04_audit", "09_intervention_definitions",
             "12_necessity_sufficiency")),
    "Auditing your own MoE": (
        "running the audit on another model: checks first, then the measurements that decide pruning",
        (), ("A1_default_models", "02_verification", "04_audit", "06_progressive_ablation", "10_predictors_and_pruning",
             "11_redundancy")),
}


def toc_parts(toc: Path = REPO_ROOT / "_toc.yml") -> list[tuple[str, list[str]]]:
    """The book's parts in order as ``(caption, [chapter stems])``, the root page first under the caption
    ``""`` (read from ``_toc.yml``, jupyter-book's ``jb-book`` format). ``ValueError`` for a file that is
    not in that format."""
    data = yaml.safe_load(Path(toc).read_text())
    if not isinstance(data, dict) or "root" not in data:
        raise ValueError(f"toc must be a jupyter-book table of contents with a 'root' entry: {toc}")
    parts = [("", [Path(data["root"]).name])]
    for part in data.get("parts", []):
        parts.append((part.get("caption", ""), [Path(c["file"]).name for c in part.get("chapters", [])]))
    return parts


def path_chapters(parts_taken, chapters, *, toc: Path = REPO_ROOT / "_toc.yml") -> list[str]:
    """The chapter stems of a reading path in table-of-contents order: every chapter of the parts named
    by ``parts_taken`` and the chapters named by ``chapters``. ``ValueError`` naming the valid captions
    or stems for a part or chapter the table of contents does not have."""
    parts = toc_parts(toc)
    order = [s for _, stems in parts for s in stems]
    captions = [c for c, _ in parts if c]
    for caption in parts_taken:
        if caption not in captions:
            raise ValueError(f"part {caption!r} is not in the table of contents; parts: {captions}")
    for stem in chapters:
        if stem not in order:
            raise ValueError(f"chapter {stem!r} is not in the table of contents; chapters: {order}")
    chosen = {s for c, stems in parts if c in parts_taken for s in stems} | set(chapters)
    return [s for s in order if s in chosen]


def chapter_title(stem: str, *, notebooks: Path = NOTEBOOK_DIR) -> str:
    """The title of a chapter: the first level-one heading of its source. ``ValueError`` when it has none
    (or for an unknown chapter)."""
    for line in chapter_markdown(stem, notebooks=notebooks).splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise ValueError(f"chapter {stem!r} has no level-one heading")


def reading_paths_table(paths=None, *, toc: Path = REPO_ROOT / "_toc.yml", notebooks: Path = NOTEBOOK_DIR):
    """One row per path and chapter: ``path``, ``for`` (who it serves), ``stem``, ``title`` and
    ``minutes`` (:func:`moeaudit.report.chapter_reading_minutes`), chapters in table-of-contents order.
    ``paths`` defaults to :data:`READING_PATHS`."""
    rows = []
    for name, (aim, parts_taken, chapters) in (READING_PATHS if paths is None else paths).items():
        for stem in path_chapters(parts_taken, chapters, toc=toc):
            rows.append({"path": name, "for": aim, "stem": stem, "title": chapter_title(stem, notebooks=notebooks),
                         "minutes": chapter_reading_minutes(stem, notebooks=notebooks)})
    return pd.DataFrame(rows, columns=["path", "for", "stem", "title", "minutes"])


def reading_paths_text(table) -> str:
    """The paths as a MyST bullet list: each path in bold with whom it serves, its chapters as links to
    their pages (``<stem>.ipynb``) in order, and the prose reading time summed over them."""
    lines = []
    for name, g in table.groupby("path", sort=False):
        links = " → ".join(f"[{r.title}]({r.stem}.ipynb)" for r in g.itertuples())
        lines.append(f"- **{name}** ({g['for'].iloc[0]}; about {int(g.minutes.sum())} minutes of prose): {links}")
    return "\n".join(lines)


def first_objective(stem: str, *, notebooks: Path = NOTEBOOK_DIR) -> str:
    """The first learning objective of a chapter: the first bullet after "After this chapter you can" in
    its opening box, joined over its continuation lines, without the final semicolon or full stop.
    ``ValueError`` for a chapter without learning objectives."""
    lines = chapter_markdown(stem, notebooks=notebooks).splitlines()
    for i, line in enumerate(lines):
        if "After this chapter you can" in line:
            bullet = []
            for nxt in lines[i + 1:]:
                if nxt.startswith("- ") and bullet:
                    break
                if nxt.startswith("- ") or (bullet and nxt.startswith("  ")):
                    bullet.append(nxt[2:].strip())
                elif bullet:
                    break
            if bullet:
                return " ".join(bullet).rstrip(";. ")
    raise ValueError(f"chapter {stem!r} has no learning objectives (\"After this chapter you can\" and a bullet)")


def chapters_text(*, toc: Path = REPO_ROOT / "_toc.yml", notebooks: Path = NOTEBOOK_DIR) -> str:
    """The book's chapters after the introduction, part by part as ``_toc.yml`` lists them, as a MyST table:
    the part, the chapter's title linked to its page, and what a reader can do after it (its first
    learning objective, :func:`first_objective`). A chapter added to ``_toc.yml`` appears here."""
    rows = ["| Part | Chapter | After it you can |", "| --- | --- | --- |"]
    for caption, stems in toc_parts(toc):
        for stem in stems:
            if not caption or not (Path(notebooks) / f"{stem}.py").is_file():
                continue  # the introduction itself, and pages that are not chapters (the references)
            title = chapter_title(stem, notebooks=notebooks)
            rows.append(f"| {caption} | [{title}]({stem}.ipynb) | {first_objective(stem, notebooks=notebooks)} |")
    return "\n".join(rows)
