#!/usr/bin/env python
"""Wall time of rendering the whole default book: cold (no records) and with every record cached.

Runs ``python -m moeaudit.tooling.book build --force`` twice against a fresh, temporary results directory
(``MOEAUDIT_RESULTS_DIR``): the first run computes every clean pass, ablation record and pruned
perplexity; the second re-executes every chapter with all of them on disk. A third run without
``--force`` is an unchanged rebuild (what ``make book`` does when nothing changed). Reports the total wall
time of each run (chapter execution plus the HTML build), each chapter's execution time (papermill's
duration of the executed notebook) and the load average, and writes a JSON report.

    .venv/bin/python benchmarks/bench_book.py --out benchmarks/reports/book_timing.json

The executed notebooks in ``book/`` are overwritten and record the temporary results directory,
so the next ``make book`` re-executes every chapter once (with the records under ``results/``).
``--keep`` keeps the temporary results directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chapter_durations() -> dict[str, float]:
    out = {}
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        meta = json.loads(nb.read_text()).get("metadata", {})
        out[nb.stem] = round(float(meta.get("papermill", {}).get("duration") or float("nan")), 1)
    return out


def build(results_dir: Path, jobs: int, *, force: bool = True) -> dict:
    env = {**os.environ, "MOEAUDIT_RESULTS_DIR": str(results_dir), "MOEAUDIT_BOOK_JOBS": str(jobs)}
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moeaudit.tooling.book", "build", *(["--force"] if force else [])], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"book build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "load_start": load_start, "load_end": os.getloadavg(),
            "chapters_s": chapter_durations()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="chapters executed at once (as MOEAUDIT_BOOK_JOBS)")
    ap.add_argument("--out", default=None, help="JSON report path")
    ap.add_argument("--keep", action="store_true", help="keep the temporary results directory")
    args = ap.parse_args(argv)
    results = Path(tempfile.mkdtemp(prefix="moeaudit-bench-book-"))
    try:
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "cpus": os.cpu_count(), "jobs": args.jobs, "results_dir": str(results)}
        print(f"cold build (empty results directory {results}) ...", flush=True)
        report["cold"] = build(results, args.jobs)
        print(f"  {report['cold']['wall_s']} s", flush=True)
        print("cached build (every record on disk, every chapter re-executed) ...", flush=True)
        report["cached"] = build(results, args.jobs)
        print(f"  {report['cached']['wall_s']} s", flush=True)
        print("unchanged build (what `make book` does when nothing changed: no chapter re-executed) ...", flush=True)
        report["unchanged"] = build(results, args.jobs, force=False)
        print(f"  {report['unchanged']['wall_s']} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(results, ignore_errors=True)
    print("\n| chapter | cold s | cached s |\n|---|---|---|")
    for stem in report["cold"]["chapters_s"]:
        print(f"| {stem} | {report['cold']['chapters_s'][stem]} | {report['cached']['chapters_s'].get(stem)} |")
    print(f"| **total wall, with HTML build** | **{report['cold']['wall_s']}** | **{report['cached']['wall_s']}** |")
    print(f"unchanged rebuild: {report['unchanged']['wall_s']} s")
    print(f"load average at start: cold {report['cold']['load_start']}, cached {report['cached']['load_start']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
