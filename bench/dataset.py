"""Benchmark: import, dedupe and split 100,000 examples into a fresh SQLite store.

Run as: .venv/bin/python bench/dataset.py [--n 100000]
Writes bench/results/dataset.json. Records the load average before and after (noisy machines).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["photosynthesis", "the French revolution", "binary search", "TCP handshakes", "compound interest", "volcanoes",
          "the water cycle", "sorting algorithms", "black holes", "vaccines", "supply and demand", "plate tectonics"]


def make_file(path: Path, n: int, seed: int = 0) -> None:
    """n lines in all three chat shapes; about 10% are near-duplicates of the line before
    (one word added) and 2% exact repeats of it, as in real seed data."""
    rnd = random.Random(seed)
    prev = None
    with open(path, "w") as f:
        for i in range(n):
            r = rnd.random()
            if prev is not None and r < 0.02:
                line = prev
            else:
                t = rnd.choice(TOPICS)
                q = f"Question {i}: explain {t} to a student in grade {rnd.randint(1, 12)} using example {rnd.randint(0, 10**6)}"
                if prev is not None and r < 0.12:
                    q = json.loads(prev).get("prompt", q) + " please"
                shape = i % 3
                if shape == 0:
                    line = json.dumps({"prompt": q, "completion": f"Here is how {t} works, step by step."})
                elif shape == 1:
                    line = json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{t} explained."}]})
                else:
                    line = json.dumps({"input": q, "output": f"A short note on {t}."})
            f.write(line + "\n")
            prev = line


def curator_times(engine, settings, n: int = 20) -> dict:
    """With the store full: approve one feedback item, open the queue, open one item; n times each, median and worst."""
    from data_store.db import session
    from data_store.models import Conversation, Feedback, Message
    from feedback import curation

    fids = []
    with session(engine) as s:
        for i in range(n):
            c = Conversation(source="api", author=f"user{i}")
            s.add(c)
            s.flush()
            s.add(Message(conversation_id=c.id, position=0, role="user",
                          content=f"What is the boiling point of liquid number {i} at sea level?"))
            m = Message(conversation_id=c.id, position=1, role="assistant", content="I do not know.")
            s.add(m)
            s.flush()
            fb = Feedback(message_id=m.id, rating="down", correction=f"About {100 + i} degrees Celsius.", author=f"user{i}")
            s.add(fb)
            s.flush()
            fids.append(fb.id)
    times: dict[str, list[float]] = {"approve": [], "queue": [], "item": []}
    for fid in fids:
        t = time.perf_counter()
        curation.approve(engine, settings, fid)
        times["approve"].append(time.perf_counter() - t)
        t = time.perf_counter()
        curation.queue(engine, curation.Filters(status="approved"))
        times["queue"].append(time.perf_counter() - t)
        t = time.perf_counter()
        curation.item(engine, fid)
        times["item"].append(time.perf_counter() - t)
    return {k: {"median_s": round(sorted(v)[len(v) // 2], 4), "max_s": round(max(v), 4)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()

    from data_store.db import make_engine, migrate
    from retrain import examples, importer
    from settings import Settings

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seed = tmp / "seed.jsonl"
        make_file(seed, args.n)
        lines = sum(1 for _ in open(seed))
        settings = Settings(data_dir=tmp / "data", _env_file=None)
        migrate(settings.db_url)
        engine = make_engine(settings.db_url)
        t0 = time.perf_counter()
        report = importer.import_file(engine, settings, seed)
        t1 = time.perf_counter()
        built = examples.build(engine)  # near-duplicate collapse and the train/test leak check
        t2 = time.perf_counter()
        again = importer.import_file(engine, settings, seed)
        t3 = time.perf_counter()
        curator = curator_times(engine, settings)
    result = {
        "benchmark": "dataset", "lines": lines, "imported": report.added, "exact_duplicates": report.duplicates_in_file,
        "reimport_added": again.added, "splits": report.splits, "dataset": built.report(),
        "import_s": round(t1 - t0, 2), "dedupe_split_build_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
        "reimport_s": round(t3 - t2, 2), "target_total_s": 60,
        "curator": curator, "target_curator_s": 1.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
    }
    out = ROOT / "bench" / "results" / "dataset.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
