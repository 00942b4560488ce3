"""The package's import graph, read from the source files (nothing is imported).

A module is named by its dotted name (``moeaudit.stats``, ``moeaudit.chapters.control``,
``moeaudit.zoo``); :func:`module_imports` lists the package modules a file imports, at module level
and inside functions, resolving relative imports from the file's place in the package. The book
driver follows these edges to find the code a chapter depends on (its execution key), and the test
suite checks with them that the library is a strict stack of layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "moeaudit"
LIB = Path(__file__).resolve().parents[1]  # .../lib/moeaudit

#: The layers of the library, bottom first, each with its modules in stack order: a module may import
#: the modules of lower layers and those listed before it in its own layer, nothing else. ``chapters.*``
#: stands for every per-chapter module (each imports the core, never another chapter) and ``tooling.*``
#: for tooling modules not listed by name. The presentation layer (figures, admonitions, words from
#: numbers) sits low so that every layer above can phrase its results with it; it imports no torch.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("moeaudit", "moeaudit.paths", "moeaudit.names", "moeaudit.families", "moeaudit.zoo")),
    ("numerics", ("moeaudit.stats", "moeaudit.corpus", "moeaudit.derived")),
    ("presentation", ("moeaudit.report",)),
    ("the paper", ("moeaudit.paper", "moeaudit.released")),
    ("model", ("moeaudit.models", "moeaudit.engine")),
    ("measurement", ("moeaudit.store", "moeaudit.metrics", "moeaudit.attribution", "moeaudit.pruning")),
    ("protocol", ("moeaudit.audit", "moeaudit.verify")),
    ("chapters", ("moeaudit.chapters", "moeaudit.chapters.*")),
    ("tooling", ("moeaudit.tooling", "moeaudit.tooling.imports", "moeaudit.tooling.params", "moeaudit.tooling.book",
                 "moeaudit.tooling.testing", "moeaudit.tooling.training", "moeaudit.tooling.*",
                 "moeaudit.tooling.badinputs")),
)
#: the layers that must load without torch (checked by the test suite in a fresh interpreter)
TORCH_FREE_LAYERS = ("base", "numerics", "presentation", "the paper")


def position(module: str) -> tuple[int, int]:
    """``(layer index, place in the layer)`` of a package module; ``KeyError`` for a module that
    :data:`LAYERS` does not place (every module must have one place)."""
    for i, (_, members) in enumerate(LAYERS):
        for j, member in enumerate(members):
            if member == module or (member.endswith(".*") and module.startswith(member[:-1])
                                    and module not in members):
                return i, j
    raise KeyError(f"{module} has no place in moeaudit.tooling.imports.LAYERS")


def layer_of(module: str) -> str:
    """The name of the layer of a package module."""
    return LAYERS[position(module)[0]][0]


def stack_violations(graph: dict[str, dict[str, set[str]]] | None = None) -> list[str]:
    """Every import that breaks the stack, one sentence each: an import of a module that is not below
    the importer (:func:`position`), one chapter module importing another, and any import of a
    package module inside a function. Empty when the library is a strict stack."""
    graph = import_graph() if graph is None else graph
    out = []
    for module, edges in sorted(graph.items()):
        for target in sorted(edges["function"]):
            out.append(f"{module} imports {target} inside a function: import it at the top of the module")
        for target in sorted(edges["top"] | edges["function"]):
            if (module.startswith("moeaudit.chapters.") and target.startswith("moeaudit.chapters.")
                    and target != module):
                out.append(f"{module} imports {target}: a chapter module imports no other chapter module")
            elif position(target) >= position(module) and not target.startswith(module + "."):
                out.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)}), which is not "
                           "below it")
    return out


def module_file(name: str, *, lib: Path = LIB) -> Path | None:
    """The file of package module ``name`` (``moeaudit.x.y`` -> ``x/y.py`` or ``x/y/__init__.py``),
    or ``None`` when there is none (a name imported from a module, not a module)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = lib.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path, *, lib: Path = LIB) -> str:
    """The dotted name of the package file ``path`` (inverse of :func:`module_file`)."""
    rel = Path(path).resolve().relative_to(lib).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(base: str, names: list[str], *, lib: Path) -> set[str]:
    """``from base import a, b``: the modules among ``base.a``, ``base.b``, else ``base`` itself."""
    found = {f"{base}.{n}" for n in names if module_file(f"{base}.{n}", lib=lib)}
    if len(found) < len(names) and module_file(base, lib=lib):
        found.add(base)
    return found


def module_imports(source: str, *, module: str | None = None, lib: Path = LIB) -> dict[str, set[str]]:
    """The package modules ``source`` imports: ``{"top": {...}, "function": {...}}``, the second for
    imports inside a function or method body. ``module`` is the importing module's dotted name (needed
    to resolve relative imports; ``None`` for a chapter notebook, which imports absolutely). A module
    named by ``from x import y`` is ``x.y`` when that is a module, else ``x``."""
    package = None
    if module is not None:
        is_pkg = module_file(module, lib=lib) is not None and module_file(module, lib=lib).name == "__init__.py"
        package = module.split(".") if is_pkg else module.split(".")[:-1]
    out: dict[str, set[str]] = {"top": set(), "function": set()}

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            found: set[str] = set()
            if isinstance(child, ast.Import):
                found = {a.name for a in child.names if a.name.split(".")[0] == PACKAGE and module_file(a.name, lib=lib)}
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    if package is None:
                        raise ValueError("a relative import needs the importing module's name")
                    anchor = package[:len(package) - child.level + 1]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base.split(".")[0] == PACKAGE:
                    found = _resolve(base, [a.name for a in child.names], lib=lib)
            out["function" if in_function else "top"] |= found - {module}
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def package_modules(*, lib: Path = LIB) -> list[str]:
    """Every module of the package (dotted names, sorted), the shipped models' folders excluded."""
    return sorted(module_name(p, lib=lib) for p in lib.rglob("*.py") if "zoo" not in p.relative_to(lib).parts[1:])


def import_graph(*, lib: Path = LIB) -> dict[str, dict[str, set[str]]]:
    """``{module: {"top": {...}, "function": {...}}}`` for every module of the package."""
    return {m: module_imports(module_file(m, lib=lib).read_text(), module=m, lib=lib) for m in package_modules(lib=lib)}


def dependencies(source: str, *, lib: Path = LIB) -> list[str]:
    """The package modules a notebook's ``source`` depends on: those it imports and, transitively,
    theirs (module- and function-level), with each package ``__init__`` on the way. Sorted."""
    first = module_imports(source, lib=lib)
    todo = first["top"] | first["function"] | {PACKAGE}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or module_file(name, lib=lib) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # the parent packages run first
        edges = module_imports(module_file(name, lib=lib).read_text(), module=name, lib=lib)
        todo |= edges["top"] | edges["function"]
    return sorted(seen)
