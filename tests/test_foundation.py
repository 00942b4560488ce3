"""The project's foundation: pins agree, the README's commands are what CI runs."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)\s*", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    py_pins = _pins(declared)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = _pins(pip_section)
    assert py_pins, "pyproject declares no pinned dependencies"
    assert py_pins == env_pins, f"pins drifted: only in pyproject {set(py_pins.items()) - set(env_pins.items())}, " \
                                f"only in environment.yml {set(env_pins.items()) - set(py_pins.items())}"
    assert "python=3.11" in env["dependencies"]


def test_every_dependency_is_pinned_and_torch_is_the_cpu_release():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert "==" in dep, f"{dep} is not pinned"
    assert "torch==2.13.0" in project["dependencies"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, flags=re.S)
    setup = [b.strip() for b in blocks[:2]]
    assert len(setup) == 2, "README must open with exactly two set-up commands"
    test_cmd = setup[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f"CI does not run the README's test command {test_cmd!r}"
    # both configurations: with the data directory, and without it (a fresh machine)
    assert re.search(r'MOEAUDIT_DATA_DIR="\$data" ' + re.escape(test_cmd), ci)
    assert re.search(r"env -u MOEAUDIT_DATA_DIR .*" + re.escape(test_cmd), ci)


def test_toc_lists_only_existing_chapter_sources():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for p in toc["parts"] for c in p["chapters"]]
    for f in files:
        stem = Path(f).name
        if (ROOT / f"{f}.md").is_file():  # a plain page (the references)
            continue
        assert (ROOT / "notebooks" / f"{stem}.py").exists(), f"{f} has no source notebooks/{stem}.py"


def test_results_dir_refused_inside_sources_package_and_root(tmp_path):
    import pytest

    from moeaudit import paths

    for bad, why in ((paths.REPO_ROOT / "lib" / "moeaudit" / "zoo" / "tiny-olmoe", "inside the moeaudit package"),
                     (paths.REPO_ROOT / "notebooks", "source folder notebooks/"),
                     (paths.REPO_ROOT / "tests" / "out", "source folder tests/"),
                     ("/", "filesystem root")):
        assert why in paths.refused_output_dir(bad)
        with pytest.raises(ValueError, match="is refused: .*" + why.split()[0]):
            paths.results_dir(bad)
    assert paths.refused_output_dir(tmp_path / "r") is None and paths.results_dir(tmp_path / "r").is_dir()
    assert paths.refused_output_dir(paths.REPO_ROOT / "results") is None
