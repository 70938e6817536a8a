"""Benchmark: feedback writes per second through POST /api/feedback at 1, 16 and 64 concurrent clients.

Run as: .venv/bin/python bench/ingest.py [--posts 2000]
Starts `tuneloop serve` as its own process on a fresh SQLite store (an external vLLM URL that is
never called: feedback needs no model), seeds one assistant message per post, posts from asyncio
clients, then counts the rows. Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS = (1, 16, 64)
TARGET_PER_S, TARGET_P99_MS = 1000, 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OWNER = "bench-client"  # every answer is this API client's, so it may rate them (the server checks)


def seed_messages(engine, n: int) -> list[int]:
    from data_store.db import session
    from data_store.models import Conversation, Message

    ids = []
    with session(engine) as s:
        for i in range(n):
            c = Conversation(source="api", author=OWNER)
            s.add(c)
            s.flush()
            s.add(Message(conversation_id=c.id, position=0, role="user", content=f"question {i}"))
            m = Message(conversation_id=c.id, position=1, role="assistant", content=f"answer {i}")
            s.add(m)
            s.flush()
            ids.append(m.id)
    return ids


async def post_all(base: str, ids: list[int], clients: int, key: str) -> tuple[float, list[float], int]:
    # aiohttp, not httpx: against an empty FastAPI endpoint on the 2-core CPU, httpx's AsyncClient
    # topped out at 557 / 332 posts/s at 16 / 64 clients and aiohttp at 7,859 / 6,738, so with httpx
    # the benchmark measured its own client.
    import aiohttp

    queue = list(ids)
    latencies: list[float] = []
    failed = 0

    async def worker(client) -> None:
        nonlocal failed
        while queue:
            mid = queue.pop()
            t = time.perf_counter()
            async with client.post(f"{base}/api/feedback", json={"message_id": mid, "rating": "down",
                                                                 "correction": f"better answer {mid}"}) as r:
                await r.read()
            latencies.append((time.perf_counter() - t) * 1000)
            failed += r.status != 200

    # unsafe=True keeps the session cookie of an IP-address host, as a browser or httpx would.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers={"Authorization": f"Bearer {key}"},
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - started, latencies, failed


def wait_for_app(base: str, app: subprocess.Popen, timeout: float, healthy: bool) -> None:
    """Until /api/health answers (healthy: with 200, so vLLM is up too); exits if the app dies."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/api/health", timeout=5).status_code == 200 or not healthy:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or app.poll() is not None:
            sys.exit("the app did not start; run `tuneloop serve` with the same settings to see why")
        time.sleep(0.5)


def wait_until_settled(pid: int, timeout: float = 180, window: float = 2.0, busy: float = 0.1) -> float:
    """Until the app's start-up work is done: its CPU use over `window` seconds under `busy` of a core.
    /api/health answers before the background thread that imports the model class (serve) finishes;
    measured beside it, the import's CPU and the collector's passes over its new objects gave 0.2-0.4 s
    stalls (p99 ~500 ms at 64 clients instead of ~80). Returns the seconds waited."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_s()
        time.sleep(window)
        if cpu_s() - before < busy * window:
            break
    return round(time.monotonic() - started, 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=2000, help="posts per concurrency level")
    args = ap.parse_args()

    from sqlmodel import func, select

    from data_store.db import make_engine, migrate, session
    from data_store.models import Feedback
    from settings import Settings

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "TUNELOOP_DATA_DIR": f"{tmp}/data", "TUNELOOP_PORT": str(port),
               "TUNELOOP_VLLM_MODE": "external", "TUNELOOP_VLLM_URL": "http://127.0.0.1:9"}
        s = Settings(data_dir=Path(tmp) / "data", _env_file=None)
        migrate(s.db_url)
        engine = make_engine(s.db_url)
        ids = seed_messages(engine, args.posts * len(LEVELS))
        from serve.identity import issue_key

        key = issue_key(engine, OWNER, "ingest benchmark", by="bench").key
        app = subprocess.Popen([str(Path(sys.executable).parent / "tuneloop"), "serve"], env=env, cwd=tmp,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_app(base, app, 120, healthy=False)  # feedback needs no vLLM
            settled_s = wait_until_settled(app.pid)
            levels = []
            for i, clients in enumerate(LEVELS):
                batch = ids[i * args.posts:(i + 1) * args.posts]
                wall, lat, failed = asyncio.run(post_all(base, batch, clients, key))
                levels.append({"clients": clients, "posts": len(batch), "failed": failed,
                               "per_s": round(len(batch) / wall, 1), "p50_ms": round(percentile(lat, 0.50), 1),
                               "p99_ms": round(percentile(lat, 0.99), 1)})
                print(json.dumps(levels[-1]), flush=True)
        finally:
            app.terminate()
            app.wait(30)
        with session(engine) as db:
            rows = db.exec(select(func.count()).select_from(Feedback)).one()
    result = {"benchmark": "ingest", "cpus": os.cpu_count(), "levels": levels, "rows": rows,
              "rows_expected": sum(lv["posts"] - lv["failed"] for lv in levels),
              "settled_after_start_s": settled_s,
              "target_per_s": TARGET_PER_S, "target_p99_ms": TARGET_P99_MS,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "ingest.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the vLLM and app children
    main()
