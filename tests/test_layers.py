"""Where things live: every statistical inference of the project (p-values, intervals, corrections,
test statistics) comes from ``moeaudit.stats``, the one module that calls SciPy's statistics,
statsmodels or pingouin; the library and the chapters call it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFERENCE_PACKAGES = ("scipy.stats", "statsmodels", "pingouin")
SOURCES = sorted([*(ROOT / "lib" / "moeaudit").rglob("*.py"), *(ROOT / "notebooks").glob("*.py")])


def inference_imports(source: str) -> list[str]:
    """The imports of SciPy's statistics, statsmodels or pingouin in ``source`` (module- or function-level)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith(INFERENCE_PACKAGES)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(INFERENCE_PACKAGES):
                found.append(node.module)
            elif node.module == "scipy":
                found += [f"scipy.{a.name}" for a in node.names if a.name == "stats"]
    return found


def test_the_checker_finds_each_form_of_import():
    src = ("import scipy.stats\nfrom scipy import stats as sps\nfrom scipy.stats import t\nimport pingouin as pg\n"
           "def f():\n    from statsmodels.stats.multitest import multipletests\nfrom scipy import optimize\n")
    assert inference_imports(src) == ["scipy.stats", "scipy.stats", "scipy.stats", "pingouin",
                                      "statsmodels.stats.multitest"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_inference_only_in_stats(path):
    if path == ROOT / "lib" / "moeaudit" / "stats.py":
        return
    assert inference_imports(path.read_text()) == [], f"{path.name}: call moeaudit.stats instead"


# ----------------------------------------------------------------------------- the stack of layers

from moeaudit.tooling import imports as I  # noqa: E402


def test_the_library_is_a_strict_stack():
    """No upward or sideways import, no chapter module importing another, no package import inside a
    function (:data:`moeaudit.tooling.imports.LAYERS`)."""
    assert I.stack_violations() == []


def test_the_import_graph_has_no_cycle():
    import graphlib

    graph = I.import_graph()
    order = list(graphlib.TopologicalSorter({m: e["top"] | e["function"] for m, e in graph.items()}).static_order())
    assert set(graph) <= set(order)


def test_every_module_has_one_place():
    for module in I.package_modules():
        I.position(module)  # KeyError for a module LAYERS does not place
    with pytest.raises(KeyError, match="no place"):
        I.position("moeaudit.nowhere")


def test_the_checker_finds_each_kind_of_violation():
    def g(top=(), function=()):
        return {"top": set(top), "function": set(function)}

    graph = {"moeaudit.stats": g(top=["moeaudit.engine"]),                       # numerics imports the model layer
             "moeaudit.engine": g(top=["moeaudit.models"]),                       # allowed: listed before it
             "moeaudit.models": g(function=["moeaudit.zoo"]),                     # inside a function
             "moeaudit.chapters.control": g(top=["moeaudit.chapters.mechanism"]),  # chapter to chapter
             "moeaudit.audit": g(top=["moeaudit.tooling.params"]),                # core imports tooling
             "moeaudit.paths": g(top=["moeaudit.names"])}                         # same layer, listed after it
    found = I.stack_violations(graph)
    assert len(found) == 5, found
    assert any("moeaudit.stats (numerics) imports moeaudit.engine (model)" in v for v in found)
    assert any("inside a function" in v for v in found)
    assert any("no other chapter module" in v for v in found)
    assert any("moeaudit.audit (protocol) imports moeaudit.tooling.params (tooling)" in v for v in found)
    assert any("moeaudit.paths (base) imports moeaudit.names (base)" in v for v in found)


def test_relative_imports_are_resolved_from_the_file_place():
    src = ("from ..stats import t_critical\nfrom .. import report as R\nfrom . import redundancy\n"
           "import moeaudit.engine\ndef f():\n    from ..audit import prepare\n")
    edges = I.module_imports(src, module="moeaudit.chapters.control")
    assert edges == {"top": {"moeaudit.stats", "moeaudit.report", "moeaudit.chapters.redundancy", "moeaudit.engine"},
                     "function": {"moeaudit.audit"}}
    with pytest.raises(ValueError, match="relative import"):
        I.module_imports("from . import x\n")


def test_the_lower_layers_load_without_torch():
    import subprocess
    import sys

    modules = [m for name, members in I.LAYERS if name in I.TORCH_FREE_LAYERS for m in members]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "MOEAUDIT_PROGRESS": "1"})
    assert out.stdout.strip() == "False", out.stderr
