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
