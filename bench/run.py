"""Run benchmarks by name and print their results as a table.

Run as: .venv/bin/python bench/run.py [all|dataset]
Each benchmark is its own script writing bench/results/NAME.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"dataset": HERE / "dataset.py", "cycle": HERE / "cycle.py"}  # the others are not built yet (see the README)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    names = list(BENCHMARKS) if which == "all" else [which]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from: all, {', '.join(BENCHMARKS)}")
    for name in names:
        subprocess.run([sys.executable, str(BENCHMARKS[name])], check=True, stdout=subprocess.DEVNULL)
        r = json.loads((HERE / "results" / f"{name}.json").read_text())
        if name == "cycle":
            for run in r["runs"]:
                print(f"| cycle | {run['examples']} examples: {run['wall_s']} s wall ({run['train_steps']} training steps in "
                      f"{run['train_s']} s), {'promoted' if run['promoted'] else 'kept out'} |")
            continue
        print(f"| {name} | {r['lines']} lines: import {r['import_s']} s + dedupe/split/build {r['dedupe_split_build_s']} s "
              f"= {r['total_s']} s (target < {r['target_total_s']} s), peak RSS {r['peak_rss_mb']} MB, "
              f"load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f} |")


if __name__ == "__main__":
    main()
