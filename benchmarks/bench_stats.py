"""Time and peak memory of the statistics functions on a large audit (not a test: a benchmark).

    .venv/bin/python benchmarks/bench_stats.py [N ...]

For each N (default 200, 2000, 100000, 1000000 pairs) it runs ``stats.spearman`` (with its
interval) and ``stats.paired_effect`` in a fresh process and prints the wall time and the peak
resident memory of that process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = """
import json, resource, sys, time
import numpy as np
from moeaudit import stats
n = int(sys.argv[1]); rng = np.random.default_rng(0)
x = rng.normal(size=n); y = 0.3 * x + rng.normal(size=n)
out = {"n": n}
for name, fn in (("spearman", lambda: stats.spearman(x, y)), ("paired_effect", lambda: stats.paired_effect(x, y))):
    t = time.perf_counter(); row = fn().iloc[0]; out[name + "_s"] = round(time.perf_counter() - t, 2)
    if name == "spearman": out["ci_method"] = row.ci_method
out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(out))
"""


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [200, 2000, 100_000, 1_000_000]
    for n in sizes:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["process_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
