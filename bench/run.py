"""Run benchmarks by name and print their results as a table.

Run as: .venv/bin/python bench/run.py [all|dataset|ingest|training|evaluation|serving|hotswap|cycle|learning]
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
            f"= {r['total_s']} s, peak RSS {r['peak_rss_mb']} MB, {load(r)} | < {r['target_total_s']} s |"] + (
        [f"| dataset | with the store full: approve one item {r['curator']['approve']['median_s']} s "
         f"(worst {r['curator']['approve']['max_s']}), "
         f"open the queue {r['curator']['queue']['median_s']} s, open one item {r['curator']['item']['median_s']} s "
         f"| each < {r['target_curator_s']} s |"]
        if "curator" in r else [])


def ingest_rows(r: dict) -> list[str]:
    rows = [f"| ingest | {lv['clients']} clients: {lv['per_s']} writes/s, p50 {lv['p50_ms']} ms, p99 {lv['p99_ms']} ms, "
            f"{lv['failed']} failed | >= {r['target_per_s']}/s, p99 < {r['target_p99_ms']} ms |" for lv in r["levels"]]
    return rows + [f"| ingest | rows afterwards {r['rows']} of {r['rows_expected']} expected, {load(r)} | no row lost |"]


def hotswap_rows(r: dict) -> list[str]:
    if "promote_call_p99_s" not in r:  # a result from before one-step promotion
        return [f"| hotswap | promote -> first token p50 {r['p50_s']} s, p99 {r['p99_s']} s (old format) | |"]
    flips = r["promotions"]
    n_promote = sum(f["kind"] == "promote" for f in flips)
    return [f"| hotswap | {n_promote} promotions and {len(flips) - n_promote} rollbacks under {r['streams']} streams: promote call "
            f"p50 {r['promote_call_p50_s']} s, p99 {r['promote_call_p99_s']} s (rollback p99 {r['rollback_call_p99_s']} s) "
            f"| p99 < {r['target_promote_call_p99_s']} s |",
            f"| hotswap | call -> first token of the version switched to: p50 {r['p50_s']} s, p99 {r['p99_s']} s, against the "
            f"steady TTFT p50 {r['steady_ttft_p50_s']} s, p99 {r['steady_ttft_p99_s']} s; {r['late_flips']} flips late | "
            f"<= steady TTFT p99 + 1 s = {r['target_first_token_s']} s |",
            f"| hotswap | {r['failed']} failed and {r['version_mismatch']} mixed-version of {r['responses']} responses, "
            f"{r['promote_errors']} flip errors, {load(r)} | 0 failed, 0 mixed |"]


def cycle_rows(r: dict) -> list[str]:
    return [f"| cycle | {run['examples']} examples: {run['wall_s']} s wall ({run['train_steps']} training steps in "
            f"{run['train_s']} s), {'promoted' if run['promoted'] else 'kept out'}, {load(run)}, "
            f"measured {run.get('measured', 'on an earlier date (not recorded)')} | (reported) |" for run in r["runs"]]


def serving_rows(r: dict) -> list[str]:
    t = r["targets"]
    rows = []
    for lv in r["levels"]:
        tok = " / ".join(str(lv[k]["tok_s"]) for k in "abcd")
        ttft = " / ".join(str(lv[k]["ttft_p50_s"]) for k in "abcd")
        failed = sum(lv[k]["failed"] for k in "abc")
        rows.append(f"| serving | {lv['streams']} streams, a / b / c / d: {tok} tokens/s, TTFT p50 {ttft} s; "
                    f"c/a {lv['ratios']['c/a']}, c/d {lv['ratios']['c/d']}, c/b {lv['ratios']['c/b']}, b/a {lv['ratios']['b/a']}; "
                    f"{failed} failed | c/a >= {t['c/a']}, c/d >= {t['c/d']} (8, 32 streams), c/b >= {t['c/b']} |")
    rows += [f"| serving variant | {v['label']}: a {v['a_tok_s']}, b {v['b_tok_s']} tokens/s at {v['streams']} streams, b/a {v['b/a']}"
             + "".join(f"; c {v[f'c_tok_s_{n}']} at {n} (c/a {v[f'c/a_{n}']})" for n in (8, 32) if f"c_tok_s_{n}" in v)
             + " | (reported) |" for v in r["variants"]]
    return rows + [f"| serving | ({r['max_tokens']} tokens per answer; {load(r)}) | |"]


def training_rows(r: dict) -> list[str]:
    peak = r["matmul_peak_flop_s"] / 1e9
    rows = [f"| training | {label}: {c['tok_s']} tokens/s ({c['steps']} steps in {c['seconds']} s), "
            f"{c['achieved_flop_s'] / 1e9:.1f} GFLOP/s = {100 * c['of_peak']:.1f}% of the {peak:.0f} GFLOP/s fp32 matmul peak | |"
            for label, c in r["configs"].items()]
    rows += [f"| training | steady state, {label}, {r['steady_examples']} rows: {c['steady_tok_s']} tokens/s after a first step "
             f"of {c['first_step_s']} s = {100 * c['steady_of_peak']:.1f}% of peak at 4N FLOPs per token "
             f"({100 * c.get('steady_done_of_peak', c['steady_of_peak']):.1f}% counting only the FLOPs done) "
             f"| >= {100 * r['target_of_peak']:.0f}% |"
             for label, c in r.get("steady", {}).items()]
    return rows + [f"| training | tuneloop / TRL defaults: {r['speedup_vs_trl_defaults']}x (/ TRL defaults in float32: "
                   f"{r.get('speedup_vs_trl_defaults_in_float32', 'n/a')}x), {load(r)} | >= {r['target_speedup']}x |"]


def evaluation_rows(r: dict) -> list[str]:
    return [f"| evaluation | {r['cases']} examples x 2 adapters: tuneloop {r['tuneloop_s']} s, sequential HF generate "
            f"{r['hf_sequential_s_scaled']} s (measured on {r['hf_sample']} per adapter, scaled): {r['speedup']}x, {load(r)} "
            f"| >= {r['target_speedup']}x |"]


def learning_rows(r: dict) -> list[str]:
    t, rows = r["targets"], []
    for name, sc in r["scenarios"].items():
        d, b, a = sc["decision"], sc["accuracy_before"], sc["accuracy_after"]
        source = f"{sc['approved']} corrections approved" if name == "corrections" else f"{sc['imported']} rows imported"
        split = "/".join(str(sc["dataset_counts"][k]) for k in ("train", "val", "test"))
        verdict = "promoted" if d["promoted"] else f"kept out ({d['summary']})" if d["promoted"] is False else sc["run"]["status"]
        want = (f"rejected, <= {t['cycle_wall_s']} s" if name == "shuffled" else
                f">= {t['accuracy_after']:.0%} after or +{t['or_gain_points'] * 100:.0f} points, <= {t['cycle_wall_s']} s")
        met = ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in sc["met"].items())
        rows.append(f"| learning | {name}: {source}, cycle used train/val/test {split}; held-out {b['n']} strict "
                    f"{b['strict']:.2f} -> {a['strict']:.2f} (lenient {b['lenient']:.2f} -> {a['lenient']:.2f}); cycle "
                    f"{sc['cycle_wall_s']} s, {verdict}; {load(sc)} | {want} ({met}) |")
    return rows


# The order `all` runs them in: quick ones first.
BENCHMARKS = {"dataset": dataset_rows, "ingest": ingest_rows, "training": training_rows, "evaluation": evaluation_rows,
              "serving": serving_rows, "hotswap": hotswap_rows, "cycle": cycle_rows, "learning": learning_rows}


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
