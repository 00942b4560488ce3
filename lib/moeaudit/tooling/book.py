"""Render the book: jupytext source -> papermill execution -> Jupyter Book HTML.

    python -m moeaudit.tooling.book build                       # execute every changed chapter, then build HTML
    python -m moeaudit.tooling.book build --jobs 1              # one chapter at a time (default: 2 in parallel)
    python -m moeaudit.tooling.book build --no-execute          # rebuild HTML from the executed notebooks
    python -m moeaudit.tooling.book chapter 04_audit -p n_positions 50 -p models '["tiny-olmoe"]'
    python -m moeaudit.tooling.book list                        # chapters, their parameters and allowed values
    python -m moeaudit.tooling.book library-map                 # rewrite the README's library map from the module docstrings

``build`` skips a chapter whose executed notebook was produced from the same source, parameters,
library and model files (``--force`` re-executes everything); raw records are cached separately
(see :mod:`moeaudit.store`), so a re-executed chapter reuses them. Chapter sources live in
``notebooks/<stem>.py`` (jupytext percent format, with a cell tagged
``parameters``); executed notebooks are written to ``book/<stem>.ipynb`` only when execution
succeeded, so a failed run never leaves a page that looks complete. Parameter values given
with ``-p`` are parsed as YAML (``50`` is an int, ``'[1, 2]'`` a list, ``null`` is None; ``1e-3``,
which YAML 1.1 reads as a string, is taken as the number it looks like). They are checked against
the chapter's schema (:mod:`moeaudit.tooling.params`) before the kernel starts: a bad value stops the run
within a second with one line naming the parameter, the value and what is allowed.

``build`` executes up to ``--jobs`` chapters at once, each in its own process and kernel with one
torch thread (``MOEAUDIT_BOOK_JOBS`` sets the default, 2): the chapters are independent, and
chapters that need the same records or clean pass wait for the first one computing them (see
:mod:`moeaudit.store`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..chapters import modularity
from ..corpus import CorpusFallbackWarning, resolve_corpus
from ..paths import REPO_ROOT
from ..released import ReleasedDataUnavailable, released_source
from ..zoo import SHIPPED_MODELS, zoo_path
from .imports import LIB, dependencies, layer_of, module_file, package_modules, position
from .params import ParameterError, describe, validate

NOTEBOOKS = REPO_ROOT / "notebooks"
BOOK = REPO_ROOT / "book"


class ChapterError(RuntimeError):
    """A chapter failed to execute; the message is one line naming the chapter, the cell and the error."""


def chapters() -> list[str]:
    """Chapter stems in table-of-contents order (read from ``_toc.yml``)."""
    import yaml  # noqa: PLC0415

    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    stems = [Path(f).name for f in files]
    return [s for s in stems if (NOTEBOOKS / f"{s}.py").exists()]


def notebook_parameters(stem: str) -> dict:
    """The default parameters of a chapter (its ``parameters`` cell)."""
    import jupytext  # noqa: PLC0415

    nb = jupytext.read(NOTEBOOKS / f"{stem}.py")
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            scope: dict = {}
            exec(cell.source, {}, scope)  # noqa: S102 - our own source file
            return {k: v for k, v in scope.items() if not k.startswith("_")}
    return {}


def chapter_modules(stem: str) -> list[str]:
    """The package modules a chapter depends on (dotted names): those it imports and, transitively,
    theirs (:func:`moeaudit.tooling.imports.dependencies`)."""
    return dependencies((NOTEBOOKS / f"{stem}.py").read_text())


def chapter_models(stem: str, parameters: dict | None = None) -> list[str]:
    """The shipped models a chapter loads with these parameters (its defaults updated by
    ``parameters``): the names in its ``models`` and ``family`` parameters, and those of the chapter
    named by its ``chapter`` parameter (appendix A2), that are shipped models (a directory or hub id is
    not part of the package). Sorted, each once."""

    values = {**notebook_parameters(stem), **(parameters or {})}
    names = [*(values.get("models") or []), *(values.get("family") or [])]
    if isinstance(values.get("chapter"), str) and values["chapter"] in chapters():  # A2 loads another chapter's
        names += chapter_models(values["chapter"])
    return sorted({n for n in names if isinstance(n, str) and n in SHIPPED_MODELS})


def _reads(code: list[Path], data_file: Path) -> bool:
    """Whether one of the modules ``code`` names the package data file ``data_file`` (its stem, as in
    ``"released_derived"`` for ``released_derived.parquet`` and ``.json``)."""
    return any(data_file.stem in path.read_text() for path in code)


def execution_key(stem: str, parameters: dict | None = None) -> str:
    """Hash of everything an executed chapter depends on: its source, its parameters, the package
    modules it imports (directly or through other modules, :func:`chapter_modules`), the package
    data files those modules name (embedded corpus, released table), the files of the shipped models it loads
    (:func:`chapter_models`) and the data/results locations. Editing a module no chapter imports
    (training code, tests, benchmarks) or retraining a shipped model a chapter does not load leaves
    its key alone."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    h.update((NOTEBOOKS / f"{stem}.py").read_bytes())
    h.update(json.dumps(parameters or {}, sort_keys=True, default=str).encode())
    code = [module_file(m) for m in chapter_modules(stem)]
    files = list(code)
    files += [f for f in sorted((LIB / "data").rglob("*"))
              if f.is_file() and f.suffix in (".json", ".txt", ".parquet", ".csv") and _reads(code, f)]
    files += [f for name in chapter_models(stem, parameters) for f in sorted((LIB / "zoo" / name).rglob("*"))
              if f.is_file() and f.suffix in (".json", ".safetensors", ".txt", ".csv")]
    for f in files:
        h.update(f.relative_to(LIB).as_posix().encode())
        h.update(f.read_bytes())
    for var in ("MOEAUDIT_DATA_DIR", "MOEAUDIT_RESULTS_DIR"):
        h.update(f"{var}={os.environ.get(var, '')}".encode())
    return h.hexdigest()[:16]


def is_up_to_date(stem: str, parameters: dict | None = None, *, book_dir: Path = BOOK) -> bool:
    """Whether ``<book_dir>/<stem>.ipynb`` was executed from exactly the current inputs."""
    target = Path(book_dir) / f"{stem}.ipynb"
    if not target.exists():
        return False
    meta = json.loads(target.read_text()).get("metadata", {}).get("moeaudit", {})
    return meta.get("execution_key") == execution_key(stem, parameters)


def _check_device(stem: str, device) -> None:
    """A CUDA ``device`` on a machine whose torch sees no CUDA device is refused before the kernel
    starts (importing torch costs about a second, so only when CUDA is asked for)."""
    if not (isinstance(device, str) and device.startswith("cuda")):
        return
    import torch  # noqa: PLC0415


    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= n:
        raise ParameterError(stem, [f"device={device!r} is refused: this torch ({torch.__version__}) sees "
                                    f"{n} CUDA device(s). Allowed: cpu, or cuda/cuda:<index> below {n}"
                                    if n else f"device={device!r} is refused: this torch ({torch.__version__}) sees "
                                    "no CUDA device. Allowed here: cpu"])


class _CellProgress(logging.Handler):
    """Follows papermill's ``Executing Cell N`` log records (its cell outputs are ignored), so that a
    heartbeat can say which cell of a chapter is running."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.cell = 0

    def emit(self, record):
        m = re.match(r"Executing Cell (\d+)", record.getMessage())
        if m:
            self.cell = int(m.group(1))


def _heartbeat(stem: str, n_cells: int, expected: float, progress: _CellProgress, log, every_s: float,
               stop: threading.Event) -> None:
    t0 = time.time()
    while not stop.wait(every_s):
        log(f"{stem}: running for {time.time() - t0:.0f} s (about {expected:.0f} s expected), "
            f"cell {progress.cell} of {n_cells}")


def execute_chapter(stem: str, parameters: dict | None = None, *, book_dir: Path = BOOK, log=print,
                    heartbeat_s: float | None = 15.0) -> Path:
    """Execute ``notebooks/<stem>.py`` with ``parameters`` into ``<book_dir>/<stem>.ipynb``.

    Every ``heartbeat_s`` seconds (``None``: never) ``log`` receives one line with the time elapsed,
    the time expected (:func:`expected_seconds`) and the cell running, so that a long chapter is
    never silent. ``ParameterError`` for a bad parameter and ``ChapterError`` for a failed cell."""
    import jupytext  # noqa: PLC0415
    import papermill  # noqa: PLC0415

    src = NOTEBOOKS / f"{stem}.py"
    if not src.exists():
        raise ValueError(f"no chapter {stem!r}; chapters are {', '.join(chapters())}")
    parameters = dict(parameters or {})
    known = notebook_parameters(stem)

    validate(stem, {**known, **parameters})  # ParameterError (a ValueError): one line, before any work
    _check_device(stem, {**known, **parameters}.get("device"))
    if "corpus" in known:  # WikiText-2 missing fails here, in seconds, not after the kernel has started
        import warnings  # noqa: PLC0415


        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorpusFallbackWarning)
            resolve_corpus(parameters.get("corpus", known["corpus"]), data_dir=parameters.get("data_dir", known.get("data_dir")))
    book_dir = Path(book_dir)
    book_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw, done = Path(tmp) / f"{stem}.ipynb", Path(tmp) / f"{stem}.out.ipynb"
        source_nb = jupytext.read(src)
        jupytext.write(source_nb, raw)
        # No progress bars inside rendered pages; one torch thread unless MOEAUDIT_THREADS says
        # otherwise: the default models are so small that thread synchronisation costs more than it
        # saves, and several threads per kernel thrash a shared CPU.
        kernel_env = {"MOEAUDIT_PROGRESS": "0", "OMP_NUM_THREADS": os.environ.get("MOEAUDIT_THREADS", "1")}
        saved_env = {k: os.environ.get(k) for k in kernel_env}
        os.environ.update(kernel_env)  # inherited by the kernel process
        key = execution_key(stem, parameters)  # of the sources as they are when the run starts: an edit
        t0 = time.time()                       # made while it runs leaves the page stale, as it should
        progress, stop = _CellProgress(), threading.Event()
        pm_logger = logging.getLogger("papermill")
        saved_logger = pm_logger.level, pm_logger.propagate
        pm_logger.addHandler(progress)  # cell outputs reach only this handler, not the caller's logging
        pm_logger.setLevel(logging.INFO)
        pm_logger.propagate = False
        if heartbeat_s:
            n_cells = len(source_nb.cells) + bool(parameters)  # every cell, markdown and injected parameters too
            threading.Thread(target=_heartbeat, daemon=True,
                             args=(stem, n_cells, expected_seconds(stem, book_dir=book_dir), progress, log,
                                   heartbeat_s, stop)).start()
        try:
            papermill.execute_notebook(str(raw), str(done), parameters=parameters, kernel_name="python3",
                                       cwd=str(REPO_ROOT), progress_bar=False, log_output=True)
        except papermill.PapermillExecutionError as err:
            kept = book_dir / f"{stem}.failed.ipynb"  # not in the table of contents: never rendered
            if done.exists():
                shutil.copy(done, kept)
            raise ChapterError(f"chapter {stem} failed in cell {err.exec_count} after {time.time() - t0:.0f} s: "
                               f"{err.ename}: {err.evalue} (executed notebook with the traceback: {kept})") from None
        finally:
            stop.set()
            pm_logger.removeHandler(progress)
            pm_logger.setLevel(saved_logger[0])
            pm_logger.propagate = saved_logger[1]
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        target = book_dir / f"{stem}.ipynb"
        (book_dir / f"{stem}.failed.ipynb").unlink(missing_ok=True)
        nb = json.loads(done.read_text())
        nb.setdefault("metadata", {})["moeaudit"] = {"execution_key": key,
                                                     "parameters": parameters,
                                                     "seconds": round(time.time() - t0, 1)}
        done.write_text(json.dumps(nb, indent=1))
        shutil.move(done, target)
    log(f"executed {stem} in {time.time() - t0:.1f} s -> {target}")
    return target


def expected_seconds(stem: str, *, book_dir: Path = BOOK) -> float:
    """How long ``stem`` is expected to take: its last execution time (recorded in
    ``<book_dir>/<stem>.ipynb``), else the cold time measured by ``benchmarks/bench_book.py``
    (``benchmarks/reports/book_timing.json``), else its source size in kB (a rough proxy)."""
    done = Path(book_dir) / f"{stem}.ipynb"
    if done.exists():
        seconds = json.loads(done.read_text()).get("metadata", {}).get("moeaudit", {}).get("seconds")
        if seconds:
            return float(seconds)
    report = REPO_ROOT / "benchmarks" / "reports" / "book_timing.json"
    if report.is_file():
        measured = json.loads(report.read_text()).get("cold", {}).get("chapters_s", {})
        if stem in measured:
            return float(measured[stem])
    source = NOTEBOOKS / f"{stem}.py"
    return source.stat().st_size / 1000 if source.is_file() else 0.0  # an unknown chapter fails when it runs


def execute_chapters(stems: list[str], *, jobs: int = 2, log=print, heartbeat_s: float = 15.0) -> None:
    """Execute ``stems`` with their default parameters, ``jobs`` at a time, each in a separate
    ``python -m moeaudit.tooling.book chapter <stem> --no-html`` process, longest expected first
    (:func:`expected_seconds`; it shortens the whole run when chapters differ much in length);
    raise if any failed (after the others finished, so one failure does not discard the rest).
    Logs each chapter as it starts and as it finishes, every ``heartbeat_s`` seconds without a finish
    the chapters still running with their elapsed and expected time, so that a long run is never
    silent, and at the end a table of every chapter's time against the time expected for it."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(stems) <= 1:
        for stem in stems:
            execute_chapter(stem, log=log)
        return

    started: dict[str, float] = {}
    lock = threading.Lock()
    printing = threading.Lock()
    outer_log = log

    def log(msg):  # one whole line at a time, whichever thread reports
        with printing:
            outer_log(msg)

    def run(stem):
        t0 = time.time()
        with lock:
            started[stem] = t0
        log(f"started {stem}")
        proc = subprocess.run([sys.executable, "-m", "moeaudit.tooling.book", "chapter", stem, "--no-html"],
                              capture_output=True, text=True, cwd=str(REPO_ROOT))
        with lock:
            started.pop(stem, None)
        return stem, proc, time.time() - t0

    failed, took = [], {}
    expected = {stem: expected_seconds(stem) for stem in stems}
    order = sorted(stems, key=expected.get, reverse=True)
    t_all, done = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(run, stem) for stem in order}
        while pending:  # report each chapter as it finishes, and every heartbeat_s what is still running
            finished, pending = concurrent.futures.wait(pending, timeout=heartbeat_s,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
            if not finished:
                with lock:
                    running = ", ".join(f"{st} ({time.time() - t0:.0f} s of about {expected.get(st, 0):.0f} s)"
                                        for st, t0 in started.items())
                log(f"still running after {time.time() - t_all:.0f} s: {running}; {done} of {len(order)} done")
            for fut in finished:
                stem, proc, seconds = fut.result()
                done += 1
                took[stem] = seconds
                if proc.returncode == 0:
                    log(f"executed {stem} in {seconds:.1f} s (process wall time, {jobs} in parallel; "
                        f"{done} of {len(order)} done)")
                else:
                    failed.append(stem)
                    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                    reason = next((ln for ln in reversed(lines) if ln.startswith("FAILED: ")), None)
                    log(reason or f"FAILED {stem} after {seconds:.1f} s:\n" + "\n".join(lines[-40:]))
    log(f"{'chapter':32s} {'seconds':>8s} {'expected':>9s}")
    for stem in stems:
        log(f"{stem:32s} {took.get(stem, float('nan')):8.1f} {expected[stem]:9.1f}"
            + ("  FAILED" if stem in failed else ""))
    log(f"{'all, ' + str(jobs) + ' in parallel':32s} {time.time() - t_all:8.1f}")
    if failed:
        failed.sort(key=stems.index)  # in the order asked for, whatever order they finished in
        raise RuntimeError(f"chapter(s) {failed} failed to execute (output above)")


def preflight(stems: list[str] | None = None, *, log=print) -> list[str]:
    """Check, in seconds and before any chapter starts, what the chapters' default parameters need:
    that they pass each chapter's schema (:mod:`moeaudit.tooling.params`), the evaluation corpus, the
    authors' released results, the models and the offline MathJax extension. Logs one line per item
    saying what will be used; returns the list of problems (empty when everything is there)."""
    import importlib.util  # noqa: PLC0415


    stems = chapters() if stems is None else stems
    defaults = {stem: notebook_parameters(stem) for stem in stems}
    problems: list[str] = []
    for stem, values in defaults.items():
        try:
            validate(stem, values)
        except ParameterError as err:
            problems.append(str(err))
    corpora = {(p.get("corpus"), p.get("data_dir")) for p in defaults.values() if "corpus" in p}
    if corpora:
        import warnings  # noqa: PLC0415


        for corpus, data_dir in sorted(corpora, key=str):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CorpusFallbackWarning)
                    src = resolve_corpus(corpus, data_dir=data_dir)
                note = "" if src.is_paper_corpus else f" -- not WikiText-2, numbers are illustrative ({src.fallback_reason})"
                log(f"corpus={corpus!r}: {src.describe()}{note}")
            except (OSError, ValueError, TypeError) as err:
                problems.append(f"corpus={corpus!r}: {err}")
    if any(stem.startswith("08_") for stem in stems):
        try:
            log(f"released results: {released_source().describe()}")
        except ReleasedDataUnavailable as err:
            problems.append(f"released results: {err}")
    if any(stem.startswith("13_") for stem in stems):
        try:
            log(f"study data (chapter 13): {modularity.source_sentence(modularity.source(None))}")
        except (OSError, ValueError, modularity.ModularityDataError) as err:
            problems.append(f"study data (chapter 13): {err}")

    names = sorted({m for p in defaults.values() for m in (p.get("models") or [])})
    for name in names:
        if name in SHIPPED_MODELS:
            try:
                folder = zoo_path(name)
                missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
                if missing:
                    problems.append(f"model {name}: {', '.join(missing)} missing in {folder}")
            except (OSError, ValueError) as err:
                problems.append(f"model {name}: {err}")
        elif Path(name).expanduser().is_dir():
            continue
        else:
            log(f"model {name}: not shipped and not a local directory; it will be loaded from the hub")
    if names:
        log(f"models: {', '.join(names)}")
    if importlib.util.find_spec("sphinx-mathjax-offline") is None:
        problems.append("the Sphinx extension sphinx-mathjax-offline is not installed (math would not render offline); "
                        "run `make install`")
    for problem in problems:
        log(f"PROBLEM {problem}")
    return problems


def build_html(*, root: Path = REPO_ROOT, strict: bool = True) -> Path:
    """``jupyter-book build`` of ``root`` (holding ``_config.yml``, ``_toc.yml`` and ``book/``) into
    ``<root>/book/_build/html``, with warnings as errors when ``strict``."""
    root = Path(root)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--path-output", str(root / "book")]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    subprocess.run(cmd, check=True)
    return root / "book" / "_build" / "html"


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_params(pairs) -> dict:
    """``-p NAME VALUE`` pairs as a dict of YAML values. YAML 1.1 reads ``1e-3`` (no dot or no
    exponent sign) as a string; such a value is taken as the float it looks like. ``ValueError``
    (one line naming the parameter) for a value that is not YAML or carries a tag ``safe_load``
    refuses."""
    import yaml  # noqa: PLC0415

    out = {}
    for name, text in pairs or []:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # a syntax error, or a tag safe_load does not construct
            where = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"-p {name} {text!r}: not a YAML value ({where}); values are YAML, e.g. 50, "
                             "'[3, 7]', null, \"some text\"") from None
        out[name] = float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) else value
    return out


def list_parameters(stem: str) -> list[str]:
    """Lines describing chapter ``stem``'s parameters: name, default and what is allowed."""

    defaults = notebook_parameters(stem)  # in the order of the chapter's parameters cell
    allowed = describe(stem)
    names = [n for n in defaults if n in allowed] + [n for n in allowed if n not in defaults]
    return [f"  {name} = {json.dumps(defaults.get(name), default=str)}: {allowed[name]}" for name in names]


#: the lines that enclose the generated library map in README.md
LIBRARY_MAP_BEGIN = "<!-- library map: generated from the module docstrings by python -m moeaudit.tooling.book library-map -->"
LIBRARY_MAP_END = "<!-- end of the library map -->"


def library_map(package: Path = REPO_ROOT / "lib" / "moeaudit") -> str:
    """A markdown table of every module of the package, layer by layer from the bottom
    (:data:`moeaudit.tooling.imports.LAYERS`), with the first sentence of its docstring: the README's
    library map. ``ValueError`` naming a module without a docstring."""
    import ast  # noqa: PLC0415

    rows = ["| layer | module | what |", "| --- | --- | --- |"]
    modules = [m for m in package_modules(lib=package) if m not in ("moeaudit", "moeaudit.chapters", "moeaudit.tooling")]
    for name in sorted(modules, key=lambda m: (position(m), m)):
        doc = ast.get_docstring(ast.parse(module_file(name, lib=package).read_text()))
        if not doc:
            raise ValueError(f"module {name} has no docstring: the library map is made from them")
        para = " ".join(doc.split("\n\n")[0].split())
        first = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0].rstrip(".")
        first = re.sub(r":\w+:`([^`]+)`", r"`\1`", first).replace("``", "`")  # reST roles and literals as Markdown
        rows.append(f"| {layer_of(name)} | `{name.removeprefix('moeaudit.')}` | {first.replace('|', '/')} |")
    return "\n".join(rows)


def write_library_map(readme: Path = REPO_ROOT / "README.md") -> Path:
    """Replace the text between :data:`LIBRARY_MAP_BEGIN` and :data:`LIBRARY_MAP_END` in ``readme`` with
    :func:`library_map`. ``ValueError`` when the markers are missing."""
    text = readme.read_text()
    if LIBRARY_MAP_BEGIN not in text or LIBRARY_MAP_END not in text:
        raise ValueError(f"{readme} lacks the library-map markers")
    head, rest = text.split(LIBRARY_MAP_BEGIN, 1)
    _, tail = rest.split(LIBRARY_MAP_END, 1)
    readme.write_text(f"{head}{LIBRARY_MAP_BEGIN}\n{library_map()}\n{LIBRARY_MAP_END}{tail}")
    return readme


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeaudit.tooling.book", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="execute every chapter with its default parameters, then build HTML")
    b.add_argument("--no-execute", action="store_true", help="only rebuild HTML from book/*.ipynb")
    b.add_argument("--force", action="store_true", help="re-execute chapters even when their inputs are unchanged")
    b.add_argument("--jobs", type=int, default=int(os.environ.get("MOEAUDIT_BOOK_JOBS", "2")),
                   help="chapters executed at once, each in its own process (default 2, or $MOEAUDIT_BOOK_JOBS)")
    c = sub.add_parser("chapter", help="execute one chapter with other parameters, then rebuild HTML")
    c.add_argument("stem")
    c.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="parameter (YAML value)")
    c.add_argument("--no-html", action="store_true", help="skip the HTML rebuild")
    sub.add_parser("list", help="list chapters, their parameters, defaults and allowed values")
    sub.add_parser("library-map", help="rewrite the README's library map from the module docstrings")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for stem in chapters():
            print(stem)
            print("\n".join(list_parameters(stem)))
        return 0
    if args.cmd == "library-map":
        print(f"wrote {write_library_map()}")
        return 0
    t0 = time.time()

    try:
        return _run(args, t0)
    except (ChapterError, ParameterError) as err:  # already one line naming the chapter
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as err:  # a bad parameter, a missing corpus or model
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _run(args, t0) -> int:
    if args.cmd == "build":
        if not args.no_execute:
            problems = preflight()
            if problems:
                print(f"FAILED: {len(problems)} problem(s) found before executing any chapter (listed above)",
                      file=sys.stderr)
                return 1
            todo = []
            for stem in chapters():
                if not args.force and is_up_to_date(stem):
                    print(f"{stem} is up to date (same source, parameters, library and models)")
                else:
                    todo.append(stem)
            try:
                execute_chapters(todo, jobs=args.jobs)
            except RuntimeError as err:
                print(f"FAILED: {err}", file=sys.stderr)
                return 1
        build_html()
    else:
        execute_chapter(args.stem, _parse_params(args.p))
        if not args.no_html:
            build_html()
    print(f"done in {time.time() - t0:.0f} s; open {BOOK / '_build' / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
