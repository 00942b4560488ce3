"""Every chapter executes under papermill with tiny parameters, and the book builds with warnings
as errors. Slow (a few minutes): it renders a complete miniature of the book."""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from moeaudit.tooling import book
from moeaudit.zoo import SHIPPED_MODELS, ZOO_MODELS, zoo_path

pytestmark = pytest.mark.slow

TINY = {
    "models": [ZOO_MODELS[0]],
    "n_positions": 6,
    "n_texts": 6,
    "n_boot": 100,
    "layers": None,
    "operator_positions": 6,  # chapter 9's operator comparison draws from the chapter's positions
}


#: chapters that compare models get several: three redundancy-family models, two values of k at E = 64
#: (so that the trends against k are fitted) and two seeds of one setting (so that the seed spread is)
TINY_MODELS = {"11_redundancy": ["olmoe-e64-k2-s0", "olmoe-e64-k2-s1", "olmoe-e64-k4-s0"]}


def _tiny_params(stem: str) -> dict:
    known = book.notebook_parameters(stem)
    params = {k: v for k, v in TINY.items() if k in known}
    if "models" in known and not isinstance(known["models"], list):
        params.pop("models")
    if stem in TINY_MODELS:
        params["models"] = TINY_MODELS[stem]
    return params


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    for m in SHIPPED_MODELS:  # the default book needs every shipped model
        assert (zoo_path(m) / "config.json").exists(), f"shipped model {m} is missing"
    root = tmp_path_factory.mktemp("bookroot")
    for f in ("_config.yml", "_toc.yml", "book/references.bib", "book/references.md", "book/_static/book.css"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(book.REPO_ROOT / f, root / f)
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEAUDIT_RESULTS_DIR", str(root / "results"))  # inherited by the notebook kernels
    executed = {}
    for stem in book.chapters():
        executed[stem] = book.execute_chapter(stem, _tiny_params(stem), book_dir=root / "book", log=lambda *_: None)
    html = book.build_html(root=root)
    yield root, executed, html
    mp.undo()


def test_every_chapter_executes_without_error_outputs(rendered):
    _, executed, _ = rendered
    assert set(executed) == set(book.chapters())
    for stem, path in executed.items():
        nb = json.loads(Path(path).read_text())
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                assert out["output_type"] != "error", f"{stem}: error output"
                if out["output_type"] == "stream":
                    assert out["name"] != "stderr", f"{stem}: stderr output {''.join(out['text'])[:300]}"


def test_built_html_contains_every_chapter(rendered):
    _, _, html = rendered
    for stem in book.chapters():
        page = html / "book" / f"{stem}.html"
        assert page.exists(), f"{stem} missing from the HTML build"
        text = page.read_text(errors="replace")
        assert "Traceback" not in text
        # a list glued into a paragraph renders as raw "- " items run together
        assert not re.search(r"<p>- \S", text), f"{stem}: a markdown list rendered as a paragraph"


def _outputs_text(path) -> str:
    nb = json.loads(Path(path).read_text())
    texts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            texts.append("".join(data.get("text/html", "")) + "".join(data.get("text/markdown", "")))
    return [t for t in texts if t.strip()]


def test_every_page_names_its_corpus_or_released_source(rendered):
    """The first output of every chapter is the box naming the corpus it read (chapter 8: the
    released results' source; chapter 13: the study's data); without WikiText-2 the box says the
    numbers are illustrative."""
    from moeaudit.corpus import CorpusFallbackWarning, resolve_corpus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorpusFallbackWarning)
        expected = resolve_corpus("auto")
    _, executed, html = rendered
    for stem, path in executed.items():
        text = _outputs_text(path)[0]
        if stem.startswith("08_"):
            assert "Released results:" in text and "18bd31b" in text
            continue
        if stem.startswith("13_"):  # the study's data, not a corpus, comes first; the shipped model's corpus later
            assert "Study data:" in text and "3fc9244" in text, text
            continue
        assert "Corpus:" in text and expected.variant in text, stem
        # the model card's numbers come from the training records; only its example reads the corpus
        caveat = "example predictions" if stem.startswith("A1_") else "illustrative"
        assert (caveat in text) == (not expected.is_paper_corpus), stem
        page = (html / "book" / f"{stem}.html").read_text()
        assert 'class="admonition' in page and "Corpus:" in page, stem


def outside_hosts(page: str) -> list[str]:
    """Every outside address a page names for a script or a style: the ``src``/``href`` of its
    ``<script>`` and ``<link>`` tags, and any address inside an inline script or style (a launcher URL
    kept in a variable counts, whether or not it is loaded). Links in the text are not counted."""
    found = []
    for tag in re.findall(r"<(?:script|link)\b[^>]*>", page):
        found += re.findall(r"\s(?:src|href)=[\"']((?:https?:)?//[^\"']+)", tag)
    for _, body in re.findall(r"<(script|style)\b[^>]*>(.*?)</\1>", page, re.S):
        found += re.findall(r"(?:https?:)?//[\w-]+(?:\.[\w-]+)+", body)
    return found


def test_outside_hosts_finds_scripts_styles_and_inline_urls_but_not_text_links():
    page = ('<link rel="stylesheet" href="https://cdn.example.org/a.css"><link rel="stylesheet" href="_static/b.css">'
            '<script src="//cdn.example.org/c.js"></script><script src="_static/d.js"></script>'
            '<script>const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"; // a comment</script>'
            '<style>@import url(https://fonts.example.com/e.css);</style>'
            '<p><a href="https://arxiv.org/abs/2606.10703">the paper</a></p>')
    assert outside_hosts(page) == ["https://cdn.example.org/a.css", "//cdn.example.org/c.js", "https://unpkg.com",
                                   "https://fonts.example.com"]


def test_the_book_config_loads_no_launcher_and_the_exercise_extension():
    """sphinx-thebe writes a launcher URL on unpkg.com into every page: the book's Sphinx extensions
    (as jupyter-book computes them from _config.yml) leave it out, and include sphinx-exercise."""
    from jupyter_book.config import get_final_config

    config, _ = get_final_config(user_yaml=book.REPO_ROOT / "_config.yml", cli_config={"latex_individualpages": False},
                                 sourcedir=book.REPO_ROOT)
    assert "sphinx_thebe" not in config["extensions"]
    assert {"sphinx_exercise", "sphinxcontrib.bibtex", "sphinx-mathjax-offline", "myst_nb"} <= set(config["extensions"])


def test_math_is_served_from_the_book_not_a_cdn(rendered):
    """MathJax is copied into the built book; no page names a script or style on another host."""
    _, _, html = rendered
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in html.rglob("*.html"):
        text = page.read_text(errors="replace")
        external = outside_hosts(text)
        assert not external, f"{page.name} names outside hosts {external}"
        assert "THEBE_JS_URL" not in text and "unpkg.com" not in text, page.name
    intro = (html / "book" / "01_introduction.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in intro
    assert "_static/book.css" in intro and (html / "_static" / "book.css").is_file()  # tables that fit the column


def test_solutions_are_hidden_until_clicked(rendered):
    """Every chapter's exercises are sphinx-exercise directives whose solutions are dropdowns: the
    solution's admonition carries the class ``dropdown``, which sphinx-togglebutton (loaded on the page)
    collapses until the reader clicks its title."""
    _, _, html = rendered
    for stem in book.chapters():
        page = (html / "book" / f"{stem}.html").read_text()
        if stem == "01_introduction":
            continue  # the introduction has no exercises
        exercises = re.findall(r'<div class="([^"]*\bexercise\b[^"]*)"', page)
        solutions = re.findall(r'<div class="([^"]*\bsolution\b[^"]*)"', page)
        assert exercises, f"{stem}: no exercise directive"
        assert len(solutions) == len(exercises), f"{stem}: {len(exercises)} exercises, {len(solutions)} solutions"
        assert all("dropdown" in c.split() for c in solutions), f"{stem}: a solution is not hidden: {solutions}"
        assert "togglebutton.js" in page, f"{stem}: the dropdown script is not loaded"


def test_a_changed_parameter_produces_a_new_record_set(rendered):
    root, _, _ = rendered
    runs_before = {p.name for p in (root / "results" / "single_expert").iterdir()}
    logs = []
    book.execute_chapter("04_audit", {**_tiny_params("04_audit"), "seed": 7}, book_dir=root / "book2",
                         log=logs.append, heartbeat_s=0.5)
    # never silent: a heartbeat line names the running cell while the chapter executes
    beats = [m for m in map(re.compile(r"04_audit: running for \d+ s \(about \d+ s expected\), "
                                       r"cell (\d+) of (\d+)").match, logs) if m]
    assert beats, logs
    assert any(int(m.group(1)) > 1 for m in beats) and all(int(m.group(1)) <= int(m.group(2)) for m in beats)
    assert logs[-1].startswith("executed 04_audit")
    runs_after = {p.name for p in (root / "results" / "single_expert").iterdir()}
    new = runs_after - runs_before
    assert len(new) == 1
    params = json.loads((root / "results" / "single_expert" / new.pop() / "params.json").read_text())
    assert params["seed"] == 7


def test_unknown_chapter_parameter_is_rejected():
    with pytest.raises(ValueError, match="has no parameter"):
        book.execute_chapter("04_audit", {"n_postions": 5})


def test_parallel_execution_reports_every_failed_chapter():
    """Chapters run in separate processes; a failure in one does not hide another's."""
    logs = []
    with pytest.raises(RuntimeError, match=r"\['no_such_chapter', 'no_such_chapter_either'\]"):
        book.execute_chapters(["no_such_chapter", "no_such_chapter_either"], jobs=2, log=logs.append)
    assert sum("no chapter 'no_such_chapter" in line for line in logs) == 2
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        book.execute_chapters(["01_introduction"], jobs=0)


def _glued(path) -> dict:
    """The glued values of an executed notebook: name -> text (markdown or plain)."""
    out = {}
    for cell in json.loads(Path(path).read_text())["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                data = o["data"]
                text = data.get("application/papermill.record/text/markdown",
                                data.get("application/papermill.record/text/plain"))
                out[name] = "".join(text) if isinstance(text, list) else text
    return out


def test_computed_prose_follows_a_two_layer_subset(rendered, tmp_path):
    """Chapters 4 and 5 on two layers: the family sizes, Bonferroni levels and verdicts stated in the
    prose are those of this run, recomputed here from the cached records."""
    from moeaudit import stats
    from moeaudit.audit import paired_cells, prepare, single_expert_records
    from moeaudit.metrics import METRICS, ROUTING_WEIGHT

    params = {**_tiny_params("04_audit"), "layers": [1, 3]}
    ch4 = _glued(book.execute_chapter("04_audit", params, book_dir=tmp_path, log=lambda *_: None))
    ch5 = _glued(book.execute_chapter("05_routing_weight_control", params, book_dir=tmp_path, log=lambda *_: None))
    model = params["models"][0]
    assert ch4["families"] == (f"{2 * len(METRICS)} cells for {model} ({len(METRICS)} metrics × 2 layers, "
                               f"Bonferroni level α = 0.05/8 = 0.00625)")
    assert ch5["control_families"] == f"2 layers for {model} (Bonferroni level α = 0.05/2 = 0.025)"
    assert ch4["one_layer_family"] == str(len(METRICS)) and float(ch4["one_layer_alpha"]) == 0.05 / len(METRICS)
    ctx = prepare(model, n_texts=params["n_texts"])
    rec = single_expert_records(ctx, layers=[1, 3], n_positions=params["n_positions"], seed=42)
    for rankings, text in ((list(METRICS), ch4["verdict_text"]), ([ROUTING_WEIGHT], ch5["control_verdict"])):
        table = stats.audit_table(paired_cells(rec, ctx.metrics, rankings=rankings), by=("model", "ranking", "layer"),
                                  high_col="delta_loss_high", low_col="delta_loss_low", family=("model",))
        passing = int(table.sig_dual_bonf.sum())
        assert text.startswith(("**No cell passes**", "**No control cell passes**")) == (passing == 0), text
        if rankings != [ROUTING_WEIGHT]:
            assert f"{passing} of 8 cells pass the dual rule at the Bonferroni level 0.00625" in text


def test_imported_modules_are_found_in_chapters():
    from moeaudit.tooling.imports import module_imports

    chapter = "import moeaudit.models\nfrom moeaudit import report, stats\nfrom moeaudit.audit import prepare\n" \
              "def f():\n    from moeaudit.zoo import MIN_FRAC_USED\n"
    assert module_imports(chapter) == {"top": {"moeaudit.models", "moeaudit.report", "moeaudit.stats", "moeaudit.audit"},
                                       "function": {"moeaudit.zoo"}}


def test_execution_key_depends_only_on_what_a_chapter_imports(monkeypatch):
    """Tooling and test helpers are imported by no chapter, so editing them does not mark a chapter
    stale; the re-analysis of the released results loads no model, so editing the engine, the models
    or the metrics leaves it alone (the family registry reaches it only through the parameter schemas,
    which check model names), and only the data files its modules name are hashed."""
    assert {"moeaudit.audit", "moeaudit.engine", "moeaudit.stats", "moeaudit.corpus",
            "moeaudit.zoo"} <= set(book.chapter_modules("04_audit"))
    for stem in book.chapters():
        assert not {"moeaudit.tooling.training", "moeaudit.tooling.testing",
                    "moeaudit.tooling.badinputs"} & set(book.chapter_modules(stem)), stem
    ch8 = set(book.chapter_modules("08_released_reanalysis"))
    assert not {"moeaudit.engine", "moeaudit.models", "moeaudit.metrics", "moeaudit.audit"} & ch8
    assert book._reads([book.module_file(m) for m in ch8], book.LIB / "data" / "released_derived.parquet")
    assert not book._reads([book.module_file(m) for m in ch8 - {"moeaudit.corpus"}],
                           book.LIB / "data" / "embedded_corpus.txt")
    key = book.execution_key("04_audit")
    monkeypatch.setattr(book, "chapter_modules", lambda stem: ["moeaudit", "moeaudit.stats"])
    assert book.execution_key("04_audit") != key  # the key is made of those modules' contents


def _package_copy(tmp_path, monkeypatch, *, ignore=()) -> Path:
    """A copy of the package under ``tmp_path`` that the book driver's execution keys read instead of
    the installed one (the chapters' notebooks stay the repository's)."""
    import shutil

    from moeaudit.tooling import imports

    lib = tmp_path / "moeaudit"
    shutil.copytree(book.LIB, lib, ignore=shutil.ignore_patterns(*ignore))
    monkeypatch.setattr(book, "LIB", lib)
    monkeypatch.setattr(book, "module_file", lambda m: imports.module_file(m, lib=lib))
    monkeypatch.setattr(book, "chapter_modules",
                        lambda stem: imports.dependencies((book.NOTEBOOKS / f"{stem}.py").read_text(), lib=lib))
    return lib


def test_editing_the_engine_leaves_chapter_8_current(tmp_path, monkeypatch):
    """A copy of the package whose engine gains a line: chapter 4's key changes, chapter 8's does not."""
    lib = _package_copy(tmp_path, monkeypatch, ignore=("olmoe-*", "__pycache__"))
    keys = {}
    for edit in (False, True):
        if edit:
            (lib / "engine.py").write_text((lib / "engine.py").read_text() + "\n# edited\n")
        keys[edit] = {s: book.execution_key(s) for s in ("04_audit", "08_released_reanalysis")}
    assert keys[True]["04_audit"] != keys[False]["04_audit"]
    assert keys[True]["08_released_reanalysis"] == keys[False]["08_released_reanalysis"]


def test_longest_chapters_are_started_first(tmp_path):
    """The recorded execution time orders the chapters; without one, a measured or size estimate."""
    for stem, seconds in (("04_audit", 90.0), ("01_introduction", 5.0)):
        (tmp_path / f"{stem}.ipynb").write_text(json.dumps({"metadata": {"moeaudit": {"seconds": seconds}}}))
    assert book.expected_seconds("04_audit", book_dir=tmp_path) == 90.0
    assert book.expected_seconds("01_introduction", book_dir=tmp_path) == 5.0
    assert book.expected_seconds("A2_departures", book_dir=tmp_path) > 0


def test_a_yaml_error_in_a_parameter_value_is_one_line(capsys):
    from moeaudit.tooling import book as B

    for raw, why in (("[1, 2", "expected ',' or ']'"), ("!!python/object:os.system x", "could not determine a constructor")):
        assert B.main(["chapter", "04_audit", "-p", "n_positions", raw, "--no-html"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"FAILED: ValueError: -p n_positions {raw!r}: not a YAML value")
        assert why in err[0]


def test_a_long_build_reports_starts_finishes_and_what_is_still_running(monkeypatch):
    import subprocess
    import time as _time

    from moeaudit.tooling import book as B

    def fake_run(cmd, **kwargs):
        _time.sleep(0.3 if cmd[4] == "slow" else 0.01)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    monkeypatch.setattr(B, "expected_seconds", lambda stem: {"slow": 2.0, "quick": 1.0}[stem])
    lines = []
    B.execute_chapters(["quick", "slow"], jobs=2, log=lines.append, heartbeat_s=0.1)
    assert "started slow" in lines and "started quick" in lines
    assert any(ln.startswith("executed quick") and "1 of 2 done" in ln for ln in lines)
    assert any(ln.startswith("still running after") and "slow (" in ln and "of about 2 s" in ln and "1 of 2 done" in ln
               for ln in lines)
    finished = next(i for i, ln in enumerate(lines) if ln.startswith("executed slow"))
    assert "2 of 2 done" in lines[finished]
    table = lines[finished + 1:]  # the time of every chapter against its expected time, in the order asked for
    assert table[0].split() == ["chapter", "seconds", "expected"]
    assert [row.split()[0] for row in table[1:3]] == ["quick", "slow"] and table[2].split()[2] == "2.0"
    assert table[-1].startswith("all, 2 in parallel")


def test_the_readme_library_map_is_current_and_names_every_module():
    from moeaudit.tooling import book as B

    readme = (B.REPO_ROOT / "README.md").read_text()
    current = readme.split(B.LIBRARY_MAP_BEGIN)[1].split(B.LIBRARY_MAP_END)[0].strip()
    assert current == B.library_map(), "README's library map is out of date: run python -m moeaudit.tooling.book library-map"
    from moeaudit.tooling.imports import package_modules

    modules = [m.removeprefix("moeaudit.") for m in package_modules()
               if m not in ("moeaudit", "moeaudit.chapters", "moeaudit.tooling")]
    assert len(modules) > 30 and all(f"| `{m}` |" in current for m in modules)


def test_retraining_one_family_model_marks_only_the_chapters_that_load_it(monkeypatch, tmp_path):
    """The execution key hashes the files of the shipped models a chapter loads, not the whole zoo."""
    import shutil

    from moeaudit.tooling import book as B
    from moeaudit import zoo

    assert B.chapter_models("04_audit") == sorted(["tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2"])
    assert "olmoe-e8-k2-s1" in B.chapter_models("11_redundancy") and B.chapter_models("08_released_reanalysis") == []
    assert B.chapter_models("A2_departures") == B.chapter_models("04_audit")  # it measures the audit's models
    assert B.chapter_models("04_audit", {"models": ["olmoe-e8-k2-s1", "/some/dir"]}) == ["olmoe-e8-k2-s1"]
    fake = _package_copy(tmp_path, monkeypatch, ignore=("*.safetensors", "__pycache__"))
    before = {stem: B.execution_key(stem) for stem in ("04_audit", "08_released_reanalysis", "11_redundancy")}
    card = fake / "zoo" / "olmoe-e8-k2-s1" / "training_summary.json"
    card.write_text(card.read_text() + " ")  # "retrained"
    after = {stem: B.execution_key(stem) for stem in before}
    assert after["11_redundancy"] != before["11_redundancy"]
    assert after["04_audit"] == before["04_audit"] and after["08_released_reanalysis"] == before["08_released_reanalysis"]
    assert zoo.SHIPPED_MODELS  # the registry itself is unchanged
