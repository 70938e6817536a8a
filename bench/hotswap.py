"""Benchmark: promotion in one step while 16 streams chat through the app without pause.

Run as: .venv/bin/python bench/hotswap.py [--promotions 20] [--streams 16]
Starts `tuneloop serve` (its own vLLM) on a fresh store with one registered version per promotion
(copies of two PEFT LoRAs with random B matrices, so they really change the answers). Each version
goes through what a cycle does with its candidate: loaded into the service's vLLM and asked a few
evaluation questions, then promoted through the API. After every second promotion, a rollback.
For each flip: how long the call took, and the time from the call to the first token streamed by
the version switched to, against the steady-state TTFT of the same 16 streams (a window with no
flips before the first one). Every response is checked: HTTP 200, no error event, and the stored
message names the version the app reported. Writes bench/results/hotswap.json.
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

TARGET_CALL_P99_S = 1.0  # the promote call
TARGET_FIRST_TOKEN_OVER_TTFT_S = 1.0  # first new-version token, beyond the steady TTFT p99
STEADY_S = 20
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

    from data_store.db import make_engine, migrate, session
    from data_store.models import Message
    from serve import adapters, model
    from serve.client import VLLMClient
    from settings import Settings

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        port, vllm_port = free_port(), free_port()
        env = {**os.environ, "TUNELOOP_DATA_DIR": f"{tmp}/data", "TUNELOOP_PORT": str(port),
               "TUNELOOP_VLLM_PORT": str(vllm_port)}
        s = Settings(data_dir=Path(tmp) / "data", _env_file=None)
        base_model = str(model.pull(s, progress=False))
        migrate(s.db_url)
        engine = make_engine(s.db_url)
        files = [random_adapter(base_model, Path(tmp) / f"lora-{i}", seed=i) for i in range(2)]
        versions = [adapters.register(engine, s, base_model, files[i % 2], name=f"hs-{i:02d}") for i in range(args.promotions)]
        cli = str(Path(sys.executable).parent / "tuneloop")
        app = subprocess.Popen([cli, "serve"], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        vllm = VLLMClient(f"http://127.0.0.1:{vllm_port}", timeout=300)
        results: list[dict] = []
        stop = threading.Event()
        flips: list[dict] = []
        try:
            wait_for_app(url, app, 900, healthy=True)
            streams = [threading.Thread(target=stream_forever, args=(url, stop, results)) for _ in range(args.streams)]
            for t in streams:
                t.start()
            time.sleep(5)  # streams are running
            steady_from = time.perf_counter()
            time.sleep(STEADY_S)
            steady = [r["first"] - r["started"] for r in list(results) if r["first"] and r["started"] >= steady_from]
            with httpx.Client(base_url=url, timeout=600) as admin:
                def flip(kind: str, target: str | None, call) -> None:
                    called = time.perf_counter()
                    status = call().status_code
                    returned = time.perf_counter()
                    firsts: list[dict] = []
                    while not firsts and time.perf_counter() - called < 300:
                        time.sleep(0.01)  # wait for the first token of the version switched to
                        firsts = [r for r in list(results) if r["ids"].get("adapter", "?") == target
                                  and r["first"] and r["started"] >= called]
                    if not firsts:
                        sys.exit(f"{target} never answered within 300 s of its {kind}")
                    first = min(firsts, key=lambda r: r["first"])
                    flips.append({"kind": kind, "adapter": target, "status": status, "call_s": round(returned - called, 3),
                                  "to_first_token_s": round(first["first"] - called, 3),
                                  "its_ttft_s": round(first["first"] - first["started"], 3)})
                    print(json.dumps(flips[-1]), flush=True)

                for i, row in enumerate(versions):
                    adapters.ensure_loaded(vllm, row)  # the cycle's evaluation of its candidate
                    for _ in range(4):
                        vllm.chat({"model": row.name, "messages": QUESTION, "max_tokens": 10, "temperature": 0})
                    flip("promote", row.name, lambda n=row.name: admin.post("/api/adapters/promote", json={"name": n}))
                    if i % 2:
                        flip("rollback", versions[i - 1].name, lambda: admin.post("/api/adapters/rollback"))
            stop.set()
            for t in streams:
                t.join(300)
        finally:
            stop.set()
            app.terminate()
            app.wait(60)
        mixed = 0
        with session(engine) as db:
            for r in results:
                mid = r["ids"].get("message_id")
                if mid:  # responses without one are counted as failed below
                    mixed += db.get(Message, mid).adapter != r["ids"].get("adapter")
        engine.dispose()
    promotes = [f for f in flips if f["kind"] == "promote"]
    rollbacks = [f for f in flips if f["kind"] == "rollback"]
    waits = [f["to_first_token_s"] for f in flips]
    steady_p99 = round(percentile(steady, 0.99), 3)
    result = {"benchmark": "hotswap", "cpus": os.cpu_count(), "streams": args.streams, "promotions": flips,
              "promote_call_p50_s": percentile([f["call_s"] for f in promotes], 0.5),
              "promote_call_p99_s": percentile([f["call_s"] for f in promotes], 0.99),
              "rollback_call_p50_s": percentile([f["call_s"] for f in rollbacks], 0.5) if rollbacks else None,
              "rollback_call_p99_s": percentile([f["call_s"] for f in rollbacks], 0.99) if rollbacks else None,
              "p50_s": percentile(waits, 0.5), "p99_s": percentile(waits, 0.99),
              "steady_ttft_p50_s": round(percentile(steady, 0.5), 3), "steady_ttft_p99_s": steady_p99,
              "steady_responses": len(steady),
              "target_promote_call_p99_s": TARGET_CALL_P99_S,
              "target_first_token_s": round(steady_p99 + TARGET_FIRST_TOKEN_OVER_TTFT_S, 3),
              "late_flips": sum(w > steady_p99 + TARGET_FIRST_TOKEN_OVER_TTFT_S for w in waits),
              "responses": len(results), "failed": sum(r["status"] != 200 or r["error"] for r in results),
              "version_mismatch": mixed, "promote_errors": sum(f["status"] != 200 for f in flips),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "hotswap.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "promotions"}, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the vLLM and app children
    main()
