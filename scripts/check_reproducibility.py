"""Retrain shipped models with their recorded seed and step count and compare the loss curves.

    python scripts/check_reproducibility.py [tiny-olmoe tiny-qwen-moe tiny-deepseek-v2] [--no-record]

For each model, prints the maximum absolute difference between the shipped training loss curve
and the rerun's (and between the two sets of weights). Unless ``--no-record`` is given, the
figure is written into the model's ``training_summary.json`` and model card, and the rerun's
curve into ``reproducibility_log.csv``. Exits non-zero if any curve differs.
Needs the WikiText-2 validation split (``$MOEAUDIT_DATA_DIR`` or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import sys

import moeaudit  # noqa: F401
from moeaudit.tooling.training import check_reproducibility
from moeaudit.zoo import ZOO_MODELS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(ZOO_MODELS)} (default: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-record", action="store_true", help="only report; do not update the shipped files")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in ZOO_MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; the shipped models are {', '.join(ZOO_MODELS)}")
    worst = 0.0
    for name in args.models or ZOO_MODELS:
        res = check_reproducibility(name, data_dir=args.data_dir, record=not args.no_record, verbose=False)
        worst = max(worst, res["max_abs_loss_diff"])
        print(f"{name}: {res['steps']} steps, max |loss difference| = {res['max_abs_loss_diff']:.3g}, "
              f"max |weight difference| = {res['max_abs_param_diff']:.3g} (rerun {res['rerun_wall_s']} s)", flush=True)
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
