"""Every chapter's parameters are checked against a schema before any work: bad values fail within
seconds, with one line naming the parameter, the value and what is allowed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from moeaudit.tooling import book, params
from moeaudit.tooling.params import ParameterError, validate
from moeaudit.zoo import SHIPPED_MODELS, ZOO_DIR

STEMS = book.chapters()


def _defaults(stem: str) -> dict:
    return book.notebook_parameters(stem)


def _refused(stem: str, **given) -> str:
    """The message of the ParameterError for ``given`` on top of the chapter's defaults."""
    with pytest.raises(ParameterError) as err:
        validate(stem, {**_defaults(stem), **given})
    message = str(err.value)
    assert "\n" not in message and "validation error" not in message and "errors.pydantic.dev" not in message
    assert message.startswith(f"chapter {stem}: ")
    return message


# ----------------------------------------------------------------------------- schemas and chapters agree


def test_every_chapter_has_a_schema():
    assert set(params.SCHEMAS) == set(STEMS)


@pytest.mark.parametrize("stem", STEMS)
def test_parameters_cell_and_schema_agree(stem):
    """Same names, the defaults pass, and every parameter says what it accepts."""
    defaults = _defaults(stem)
    fields = params.schema(stem).model_fields
    assert set(defaults) == set(fields), f"only in the notebook: {set(defaults) - set(fields)}, " \
                                         f"only in the schema: {set(fields) - set(defaults)}"
    validate(stem, defaults)
    for name in fields:
        assert params.allowed(stem, name), f"{stem}.{name} has no 'allowed' text"


@pytest.mark.parametrize("stem", STEMS)
def test_first_cell_after_the_parameters_validates_them(stem):
    """The chapter's own first cell refuses a bad value before anything else runs (papermill and
    Jupyter users get the same message as the book driver)."""
    cells = [c for c in jupytext.read(book.NOTEBOOKS / f"{stem}.py").cells if c.cell_type == "code"]
    assert "parameters" in cells[0].metadata.get("tags", [])
    first = cells[1].source
    assert f'params.validate("{stem}", globals())' in first
    assert first.index("params.validate(") < first.index(".show_")  # before the corpus or the released data is read

    namespace = {"__name__": "__main__"}
    exec(cells[0].source, namespace)  # noqa: S102 - the chapter's own parameters cell
    validate(stem, namespace)  # the defaults, read from a namespace (IPython names are ignored)
    namespace["data_dir"] = 3  # every chapter has data_dir
    with pytest.raises(ParameterError, match=rf"chapter {stem}: data_dir=3 is refused: an integer, not a string"):
        exec(first, namespace)  # noqa: S102
    assert "corpus_source" not in namespace and "released_source" not in namespace


# ----------------------------------------------------------------------------- the reported cases


REPORTED = [
    ("n_positions", "2", "n_positions=2 is refused: below the minimum 3"),
    ("n_positions", "abc", "n_positions='abc' is refused: a string, not an integer"),
    ("models", "tiny-olmoe", "models='tiny-olmoe' is refused: a string, not a list "
                             "(one value is still a list: -p models '[\"tiny-olmoe\"]')"),
    ("n_position", "5", "n_position is unknown: the chapter has no parameter of that name; did you mean 'n_positions'?"),
]


@pytest.mark.parametrize("name,value,expected", REPORTED, ids=[f"{n}={v}" for n, v, _ in REPORTED])
def test_reported_cases_fail_fast_through_the_book_driver(name, value, expected, tmp_path):
    """``python -m moeaudit.tooling.book chapter`` stops with one line, before a kernel starts or a results folder is made
    (how long that takes is measured in the README, not asserted here)."""
    env = {**os.environ, "MOEAUDIT_RESULTS_DIR": str(tmp_path / "results")}  # never the shared cache
    proc = subprocess.run([sys.executable, "-m", "moeaudit.tooling.book", "chapter", "04_audit", "-p", name, value, "--no-html"],
                          capture_output=True, text=True, cwd=str(book.REPO_ROOT), env=env, timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("FAILED: chapter 04_audit: "), proc.stderr
    assert expected in lines[-1]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name,value,expected", REPORTED, ids=[f"{n}={v}" for n, v, _ in REPORTED])
def test_reported_cases_are_refused_by_the_validator(name, value, expected):
    assert expected in _refused("04_audit", **book._parse_params([(name, value)]))


def test_no_kernel_starts_for_a_bad_value(monkeypatch, tmp_path):
    import papermill

    def never(*args, **kwargs):
        raise AssertionError("the kernel was started")

    monkeypatch.setattr(papermill, "execute_notebook", never)
    for stem, given in (("04_audit", {"n_positions": 2}), ("09_intervention_definitions", {"modes": "token"}),
                        ("08_released_reanalysis", {"alpha": 1}), ("A2_departures", {"chapter": "04"})):
        with pytest.raises(ParameterError, match=f"chapter {stem}: "):
            book.execute_chapter(stem, given, book_dir=tmp_path)
    with pytest.raises(ValueError, match="has no parameter"):
        book.execute_chapter("04_audit", {"n_postions": 5}, book_dir=tmp_path)


def test_the_kernel_refuses_a_bad_value_in_the_first_cell(tmp_path, monkeypatch):
    """Executed by papermill directly (no book driver), the chapter stops in its validating cell."""
    import papermill

    monkeypatch.setenv("MOEAUDIT_RESULTS_DIR", str(tmp_path / "results"))
    raw = tmp_path / "04_audit.ipynb"
    jupytext.write(jupytext.read(book.NOTEBOOKS / "04_audit.py"), raw)
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(raw), str(tmp_path / "out.ipynb"), parameters={"n_positions": 2},
                                   kernel_name="python3", cwd=str(book.REPO_ROOT), progress_bar=False)
    assert err.value.ename == "ParameterError"
    assert "n_positions=2 is refused: below the minimum 3" in err.value.evalue
    executed = json.loads((tmp_path / "out.ipynb").read_text())
    counts = [c.get("execution_count") for c in executed["cells"] if c["cell_type"] == "code"]
    assert counts[:3] == [1, 2, 3] and all(c is None for c in counts[3:])  # parameters, injected, validate
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- boundaries and rules


def test_boundaries():
    d = _defaults("04_audit")
    for ok in ({"n_positions": 3}, {"alpha": 0.5}, {"alpha": 1e-9}, {"seed": 0}, {"layers": None}, {"layers": [1, 3]},
               {"max_tokens": 2}, {"max_tokens": 128}, {"min_context": 126}, {"mode": "sequence"}, {"power": 0.99},
               {"device": "cuda:1"}, {"corpus": "embedded"}):
        validate("04_audit", {**d, **ok})
    assert "below the minimum 3" in _refused("04_audit", n_positions=2)
    assert "not above 0" in _refused("04_audit", alpha=0)
    assert "not below 1" in _refused("04_audit", alpha=1)
    assert "not a finite number" in _refused("04_audit", alpha=float("nan"))
    assert "seed=-1 is refused: below the minimum 0" in _refused("04_audit", seed=-1)
    assert "a boolean, not an integer" in _refused("04_audit", n_positions=True)
    assert "a number, not an integer" in _refused("04_audit", n_positions=3.0)
    assert "min_context=127 is refused" in _refused("04_audit", min_context=127)  # 128 tokens: t <= 126
    assert "max_tokens=129 is refused: tiny-olmoe has a context of 128 positions" in _refused("04_audit", max_tokens=129)
    assert "layers=[] is refused: empty" in _refused("04_audit", layers=[])
    assert "item -1 is below the minimum 0" in _refused("04_audit", layers=[-1])
    assert "n_boot=99 is refused" in _refused("05_routing_weight_control", n_boot=99)
    validate("05_routing_weight_control", {**_defaults("05_routing_weight_control"), "n_boot": 100})


def test_every_list_parameter_refuses_a_single_value_showing_the_list_form():
    for stem, name, value, form in (("04_audit", "models", "tiny-qwen-moe", "-p models '[\"tiny-qwen-moe\"]'"),
                                    ("04_audit", "layers", 3, "-p layers '[3]'"),
                                    ("09_intervention_definitions", "modes", "token", "-p modes '[\"token\"]'"),
                                    ("10_predictors_and_pruning", "prune_fractions", 0.25, "-p prune_fractions '[0.25]'")):
        message = _refused(stem, **{name: value})
        assert f"{name}={value!r} is refused: " in message and form in message


def test_several_bad_values_give_one_line_naming_each():
    message = _refused("04_audit", n_positions=1, alpha=2, mode="tokens", n_positon=4)
    assert message.startswith("chapter 04_audit: 4 parameters refused: n_positon is unknown")
    for part in ("n_positions=1", "alpha=2", "mode='tokens'", "did you mean 'token'?"):
        assert part in message


def test_model_checks_read_only_the_config(tmp_path):
    assert "8 is not an MoE layer of tiny-olmoe, whose MoE layers are 0-7" in _refused("04_audit", layers=[8])
    # DeepSeek-V2's first layer is dense
    message = _refused("04_audit", models=["tiny-deepseek-v2"], layers=[0])
    assert "0 is not an MoE layer of tiny-deepseek-v2, whose MoE layers are 1-7" in message
    assert "layer=9 is refused" in _refused("01_introduction", layer=9)
    # a local directory with top-1 routing: fine for an example, refused where active experts are compared
    top1 = tmp_path / "top1"
    top1.mkdir()
    config = json.loads((ZOO_DIR / "tiny-olmoe" / "config.json").read_text())
    (top1 / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 1}))
    validate("01_introduction", {**_defaults("01_introduction"), "models": [str(top1)]})
    assert "needs top-k >= 2" in _refused("04_audit", models=[str(top1)])
    (top1 / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "not one of the supported MoE families" in _refused("04_audit", models=[str(top1)])
    assert "has no readable config.json" in _refused("04_audit", models=[str(tmp_path)])
    # a Hugging Face id is not looked up; a name that is neither is refused with the shipped name meant
    validate("04_audit", {**_defaults("04_audit"), "models": ["allenai/OLMoE-1B-7B-0924"], "layers": [0, 15]})
    assert "did you mean 'tiny-olmoe'?" in _refused("04_audit", models=["tiny-olmo"])


def test_config_layout_agrees_with_the_library_on_the_shipped_models():
    from transformers import AutoConfig

    from moeaudit.models import layout_from_config

    for name in SHIPPED_MODELS:
        layout = layout_from_config(AutoConfig.from_pretrained(ZOO_DIR / name))
        mine = params.config_layout(name)
        assert mine["moe_layers"] == list(layout.moe_layers) and mine["top_k"] == layout.top_k, name
        assert mine["family"] == layout.family and mine["n_layers"] == layout.n_layers
    assert params.config_layout("allenai/OLMoE-1B-7B-0924") is None


def test_constants_agree_with_the_modules_that_use_them():
    from moeaudit import corpus, models, stats

    assert params.DTYPES == tuple(models.DTYPES)
    assert params.SUPPORTED_FAMILIES == tuple(models.SUPPORTED_FAMILIES)
    assert params.TEXT_FORMS == tuple(corpus.TEXT_FORMS)
    assert params.CORPUS_CHOICES == tuple(corpus.CORPUS_CHOICES)
    assert params.MIN_POSITIONS == getattr(stats, "MIN_PAIRS", params.MIN_POSITIONS)


def test_chapter_specific_rules():
    assert "there is no text 10 among n_texts=10 texts" in _refused("01_introduction", seq_id=10)
    assert "it equals dtype='float32'" in _refused("09_intervention_definitions", half_dtype="float32")
    assert "'token' given more than once" in _refused("09_intervention_definitions", modes=["token", "token"])
    assert "not in increasing order" in _refused("10_predictors_and_pruning", prune_fractions=[0.5, 0.25])
    assert "an integer, not true or false" in _refused("10_predictors_and_pruning", per_layer_sweep=1)
    assert "has no training_summary.json" in _refused("A1_default_models", models=["allenai/OLMoE-1B-7B-0924"])
    assert "did you mean '04_audit'?" in _refused("A2_departures", chapter="04-audit")
    assert "04_audit" in params.DEPARTURE_CHAPTERS and "A2_departures" not in params.DEPARTURE_CHAPTERS
    with pytest.raises(ParameterError, match="no such chapter; did you mean '04_audit'?"):
        validate("04_audt", {})


def test_corpus_names_and_files(tmp_path):
    assert "did you mean 'wikitext-2'?" in _refused("04_audit", corpus="wikitxt-2")
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\n")
    validate("04_audit", {**_defaults("04_audit"), "corpus": str(texts)})
    # a missing file that is not a misspelt name is left to resolve_corpus (FileNotFoundError, in seconds)
    validate("04_audit", {**_defaults("04_audit"), "corpus": str(tmp_path / "missing.txt")})
    assert "data_dir='/nonexistent/dir' is refused: no such directory" in _refused("04_audit", data_dir="/nonexistent/dir")
    assert "it exists and is not a directory" in _refused("04_audit", results_dir=str(texts))


def test_yaml_values_that_look_like_numbers_are_numbers():
    parsed = book._parse_params([("alpha", "1e-3"), ("a", "2E5"), ("n", "50"), ("s", "abc"), ("l", "[1, 2]"),
                                 ("z", "null"), ("e", "e5")])
    assert parsed == {"alpha": 0.001, "a": 200000.0, "n": 50, "s": "abc", "l": [1, 2], "z": None, "e": "e5"}


def test_list_shows_defaults_and_allowed_values():
    lines = book.list_parameters("04_audit")
    assert any(ln.startswith("  n_positions = 200: an integer >= 3") for ln in lines)
    assert len(lines) == len(_defaults("04_audit"))


def test_preflight_reports_bad_defaults(monkeypatch):
    bad = {**_defaults("01_introduction"), "corpus": "embedded", "n_texts": 0}
    monkeypatch.setattr(book, "notebook_parameters", lambda stem: bad)
    problems = book.preflight(["01_introduction"], log=lambda *_: None)
    assert any(p.startswith("chapter 01_introduction: n_texts=0 is refused") for p in problems), problems


# ----------------------------------------------------------------------------- the table of bad inputs


def test_bad_input_table_is_current():
    """``docs/bad_inputs.md`` is what ``python -m moeaudit.tooling.badinputs`` writes now, every chapter input in
    it is refused by the schema, and no library call in it gives a wrong number silently."""
    from moeaudit.tooling import badinputs

    table = badinputs.page()
    assert "should have been refused" not in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| `-p ")]
    assert len(rows) == len(badinputs.BAD_INPUTS)
    library = table[table.index("## Library calls"):]
    assert len([ln for ln in library.splitlines() if ln.startswith("| ") and not ln.startswith("| call")]) == \
        len(badinputs.library_cases())
    assert "identical to an uninterrupted run: True" in library and "premise_ok=False" in library
    assert "largest difference 0)" in library
    committed = Path(badinputs.REPO_ROOT / badinputs.BAD_INPUTS_PAGE)
    assert committed.is_file() and committed.read_text() == table, \
        f"{badinputs.BAD_INPUTS_PAGE} is out of date: run .venv/bin/python -m moeaudit.tooling.badinputs"


def test_redundancy_chapter_needs_two_routing_settings():
    """Two seeds of one setting are refused from their configs, before any model is loaded."""
    message = _refused("11_redundancy", models=["olmoe-e64-k8-s0", "olmoe-e64-k8-s1"])
    assert "every model routes to top-8 of 64 experts" in message
    assert "1 item, at least 2 needed" in _refused("11_redundancy", models=["olmoe-e64-k8-s0"])
    validate("11_redundancy", {**_defaults("11_redundancy"), "models": ["olmoe-e64-k8-s0", "olmoe-e8-k2-s0"]})
    assert params.config_layout("olmoe-e8-k2-s1")["n_experts"] == 8


def test_remote_values():
    """``remote``: False, True, 'local' or an http(s) host; a server value needs hub ids, not shipped models or
    local directories (checked from the names alone: no network)."""
    for bad, message in (("gpu", "remote='gpu' is refused: not a valid value"),
                         ("ftp://host", "remote='ftp://host' is refused"),
                         (1, "remote=1 is refused: an integer, not true or false")):
        assert message in _refused("04_audit", remote=bad)
    assert "'tiny-olmoe' is a shipped model" in _refused("04_audit", remote=True)
    assert "is a local directory" in _refused("02_verification", remote="https://ndif.example",
                                              models=[str(book.REPO_ROOT / "lib/moeaudit/zoo/tiny-olmoe")])
    defaults = book.notebook_parameters("04_audit")
    assert defaults["remote"] is False
    assert validate("04_audit", {**defaults, "remote": "local"}).remote == "local"
    hub = {**defaults, "models": ["allenai/OLMoE-1B-7B-0924"]}
    for ok in (True, "https://ndif.example", "http://127.0.0.1:8000"):
        assert validate("04_audit", {**hub, "remote": ok}).remote == ok
