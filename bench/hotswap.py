"""Benchmark: promote a new adapter 20 times while 16 streams chat through the app without pause.

Run as: .venv/bin/python bench/hotswap.py [--promotions 20] [--streams 16]
Starts `tuneloop serve` (its own vLLM) on a fresh store with two registered adapters (PEFT LoRAs
with random B matrices, so they really change the answers), then alternates promotions between
them. For each promotion: time from the promote call to the first token streamed by the new
version. Every response is checked: HTTP 200, no error event, and the stored message names the
version the app reported. Writes bench/results/hotswap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ingest import free_port, percentile, wait_for_app  # noqa: E402

TARGET_P99_S = 1.0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def random_adapter(base: str, out: Path, seed: int, r: int = 8,
                   targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), b_scale: float = 1.0) -> Path:
    """A PEFT LoRA with random A and B; b_scale < 1 keeps its answers close to the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                      init_lora_weights=False, task_type="CAUSAL_LM")  # random B: the answers change
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(out)
    return out


def stream_forever(base: str, stop: threading.Event, out: list) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=300) as c:
        while not stop.is_set():
            started, first, lines, status = time.perf_counter(), None, [], 0
            try:
                with c.stream("POST", "/v1/chat/completions",
                              json={"messages": QUESTION, "stream": True, "temperature": 0, "max_tokens": 10}) as r:
                    status = r.status_code
                    for ln in r.iter_lines():
                        if ln.startswith("data: {"):
                            event = json.loads(ln[6:])
                            delta = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
                            if first is None and delta:
                                first = time.perf_counter()
                            lines.append(event)
            except Exception as e:
                lines.append({"error": repr(e)})
            last = lines[-1] if lines else {}
            out.append({"started": started, "first": first, "status": status,
                        "error": any("error" in e for e in lines), "ids": last.get("tuneloop") or {}})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--promotions", type=int, default=20)
    ap.add_argument("--streams", type=int, default=16)
    args = ap.parse_args()

    import httpx

    from data_store.db import make_engine, session
    from data_store.models import Message
    from serve import model
    from settings import Settings

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "TUNELOOP_DATA_DIR": f"{tmp}/data", "TUNELOOP_PORT": str(port),
               "TUNELOOP_VLLM_PORT": str(free_port())}
        s = Settings(data_dir=Path(tmp) / "data", _env_file=None)
        base_model = str(model.pull(s, progress=False))
        cli = str(Path(sys.executable).parent / "tuneloop")
        names = ["swap-a", "swap-b"]
        for i, name in enumerate(names):
            path = random_adapter(base_model, Path(tmp) / name, seed=i)
            subprocess.run([cli, "adapters", "add", str(path), "--name", name], env=env, check=True, stdout=subprocess.DEVNULL)
        app = subprocess.Popen([cli, "serve"], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        results: list[dict] = []
        stop = threading.Event()
        try:
            wait_for_app(url, app, 600, healthy=True)
            streams = [threading.Thread(target=stream_forever, args=(url, stop, results)) for _ in range(args.streams)]
            for t in streams:
                t.start()
            time.sleep(5)  # streams are running before the first promotion
            swaps = []
            with httpx.Client(base_url=url, timeout=600) as admin:
                for i in range(args.promotions):
                    name = names[i % 2]
                    called = time.perf_counter()
                    status = admin.post("/api/adapters/promote", json={"name": name}).status_code
                    returned = time.perf_counter()
                    firsts: list[float] = []
                    while not firsts and time.perf_counter() - called < 300:
                        time.sleep(0.01)  # wait for the new version's first token, then promote the other one
                        firsts = [r["first"] for r in list(results)
                                  if r["ids"].get("adapter") == name and r["first"] and r["first"] >= called]
                    if not firsts:
                        sys.exit(f"{name} never answered within 300 s of its promotion")
                    first = min(firsts)
                    swaps.append({"adapter": name, "status": status, "call_s": round(returned - called, 3),
                                  "to_first_token_s": round(first - called, 3)})
                    print(json.dumps(swaps[-1]), flush=True)
            stop.set()
            for t in streams:
                t.join(300)
        finally:
            stop.set()
            app.terminate()
            app.wait(60)
        engine = make_engine(s.db_url)
        mixed = 0
        with session(engine) as db:
            for r in results:
                mid = r["ids"].get("message_id")
                if mid:  # responses without one are counted as failed below
                    mixed += db.get(Message, mid).adapter != r["ids"].get("adapter")
        engine.dispose()
    waits = [w["to_first_token_s"] for w in swaps]
    result = {"benchmark": "hotswap", "cpus": os.cpu_count(), "streams": args.streams, "promotions": swaps,
              "p50_s": percentile(waits, 0.5), "p99_s": percentile(waits, 0.99), "target_p99_s": TARGET_P99_S,
              "responses": len(results), "failed": sum(r["status"] != 200 or r["error"] for r in results),
              "version_mismatch": mixed, "promote_errors": sum(w["status"] != 200 for w in swaps),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "hotswap.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "promotions"}, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the vLLM and app children
    main()
