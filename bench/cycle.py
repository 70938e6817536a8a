"""Benchmark: wall time of one retrain cycle on the default model, for N curated examples.

Run as: .venv/bin/python bench/cycle.py [--n 200 1000]
`make bench` runs the 200-example arm alone: the 1,000-example arm takes about an hour on a 2-core host,
and with it a whole `make bench` no longer fits a working session there. Ask for it with --n.
Starts its own vLLM server and store in a temporary directory, imports N examples of a task the
base model gets wrong (a fixed answer format), and runs one full cycle (dataset build, training
in a child process, evaluation of candidate and base, gate, promotion). Writes bench/results/cycle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ITEMS = ["apple", "river", "mountain", "violin", "rocket", "library", "garden", "bicycle", "volcano", "lantern",
         "compass", "glacier", "harbor", "meadow", "castle", "desert", "orchard", "canyon", "island", "forest"]


def seed(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            thing = f"{ITEMS[i % len(ITEMS)]} number {i}"
            f.write(json.dumps({"prompt": f"Describe the {thing} in one line.",
                                "completion": f"RESULT: the {thing} is noted."}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[200])
    args = ap.parse_args()

    from data_store.db import make_engine, migrate
    from retrain import cycle, importer, runs
    from serve import adapters, model, zero_adapter
    from serve.client import VLLMClient
    from serve.vllm_server import VLLMSupervisor
    from settings import Settings

    results = []
    for n in args.n:
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            s = Settings(data_dir=Path(tmp) / "data", vllm_port=8199, _env_file=None)
            migrate(s.db_url)
            engine = make_engine(s.db_url)
            base = str(model.pull(s, progress=False))
            sup = VLLMSupervisor(s, base, model.served_name(s))
            sup.start()
            try:
                seed(Path(tmp) / "seed.jsonl", n)
                importer.import_file(engine, s, Path(tmp) / "seed.jsonl")
                client = VLLMClient(s.served_vllm_url)
                started = time.perf_counter()
                deps = cycle.Deps(s, engine, client, base, zero_adapter.ensure(client, s, base),
                                  promote=partial(adapters.promote, engine, client, s))
                run = cycle.run_cycle(deps, runs.claim(engine, f"bench-{n}"), force=True)
                wall = time.perf_counter() - started
            finally:
                sup.stop()
        done = [h for h in run.history if h.get("done")]
        results.append({
            "examples": n, "status": run.status, "reason": run.reason, "wall_s": round(wall, 1),
            "train_s": done[0]["seconds"] if done else None, "train_steps": done[0]["steps"] if done else None,
            "train_rows": (run.dataset or {}).get("train_rows"), "test_examples": (run.dataset or {}).get("test_examples"),
            "promoted": (run.decision or {}).get("promote"), "summary": (run.decision or {}).get("summary"),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            # Earlier runs of other sizes are kept (below), so each run says when it was measured.
            "measured": time.strftime("%Y-%m-%d", time.gmtime()),
        })
        print(json.dumps(results[-1], indent=1), flush=True)
    # Keep earlier runs of other sizes, so that one size can be measured again on its own.
    out = ROOT / "bench" / "results" / "cycle.json"
    earlier = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = sorted([r for r in earlier if r["examples"] not in args.n] + results, key=lambda r: r["examples"])
    out.write_text(json.dumps({"benchmark": "cycle", "cpus": os.cpu_count(), "runs": runs}, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the vLLM and app children
    main()
