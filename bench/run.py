"""Run benchmarks by name and print their results as a table.

Run as: .venv/bin/python bench/run.py [all|dataset|ingest|hotswap|cycle]
Each benchmark is its own script writing bench/results/NAME.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(run: dict) -> str:
    return f"load {run['loadavg_before'][0]:.2f} -> {run['loadavg_after'][0]:.2f}"


def dataset_rows(r: dict) -> list[str]:
    return [f"| dataset | {r['lines']} lines: import {r['import_s']} s + dedupe/split/build {r['dedupe_split_build_s']} s "
            f"= {r['total_s']} s, peak RSS {r['peak_rss_mb']} MB, {load(r)} | < {r['target_total_s']} s |"]


def ingest_rows(r: dict) -> list[str]:
    rows = [f"| ingest | {lv['clients']} clients: {lv['per_s']} writes/s, p50 {lv['p50_ms']} ms, p99 {lv['p99_ms']} ms, "
            f"{lv['failed']} failed | >= {r['target_per_s']}/s, p99 < {r['target_p99_ms']} ms |" for lv in r["levels"]]
    return rows + [f"| ingest | rows afterwards {r['rows']} of {r['rows_expected']} expected, {load(r)} | no row lost |"]


def hotswap_rows(r: dict) -> list[str]:
    return [f"| hotswap | {len(r['promotions'])} promotions under {r['streams']} streams: promote -> first token of the new "
            f"version p50 {r['p50_s']} s, p99 {r['p99_s']} s; {r['failed']} failed and {r['version_mismatch']} mixed-version "
            f"of {r['responses']} responses, {load(r)} | p99 < {r['target_p99_s']} s, 0 failed, 0 mixed |"]


def cycle_rows(r: dict) -> list[str]:
    return [f"| cycle | {run['examples']} examples: {run['wall_s']} s wall ({run['train_steps']} training steps in "
            f"{run['train_s']} s), {'promoted' if run['promoted'] else 'kept out'}, {load(run)} | (reported) |" for run in r["runs"]]


# The order `all` runs them in: quick ones first. Serving, training and evaluation are not built yet (see the README).
BENCHMARKS = {"dataset": dataset_rows, "ingest": ingest_rows, "hotswap": hotswap_rows, "cycle": cycle_rows}


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    names = list(BENCHMARKS) if which == "all" else [which]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from: all, {', '.join(BENCHMARKS)}")
    print("| Benchmark | Figure | Target |\n|---|---|---|")
    for name in names:
        subprocess.run([sys.executable, str(HERE / f"{name}.py")], check=True, stdout=subprocess.DEVNULL)
        for row in BENCHMARKS[name](json.loads((HERE / "results" / f"{name}.json").read_text())):
            print(row, flush=True)


if __name__ == "__main__":
    main()
