"""An external vLLM, as an operator runs it: started by hand with runtime LoRA on and tuneloop's adapter
directory visible to it, and `tuneloop serve` with TUNELOOP_VLLM_MODE=external against it: chat, promote,
rollback, a restart of that server (tuneloop loads the active version into it again) and a cycle's
evaluation through it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import QUESTION, free_port, train_lora, wait_until

from serve.vllm_server import LORA_OPS_PLUGIN, healthy

pytestmark = pytest.mark.integration
CLI = Path(sys.executable).parent / "tuneloop"


def operator_vllm(model: str, port: int, log: Path) -> subprocess.Popen:
    """What an operator would run: vLLM's own server with runtime LoRA updates, eager (-O0) to start faster.
    On CPU, tuneloop's grouped LoRA ops plugin (installed with tuneloop) keeps base answers out of stale slots."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": LORA_OPS_PLUGIN,
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", Path(model).name,
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--enable-lora",
             "--max-loras", "3", "--max-lora-rank", "16", "-O0", "--disable-uvicorn-access-log"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not healthy(url):
        assert proc.poll() is None, f"the operator's vLLM exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the operator's vLLM did not become healthy in 10 minutes"
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_tuneloop_serves_through_an_external_vllm_and_reloads_after_it_restarts(default_model, tmp_path):
    vllm_port, app_port = free_port(), free_port()
    vllm_url, log = f"http://127.0.0.1:{vllm_port}", tmp_path / "operator-vllm.log"
    vllm = None
    env = {**os.environ, "TUNELOOP_DATA_DIR": str(tmp_path / "data"), "TUNELOOP_VLLM_MODE": "external",
           "TUNELOOP_VLLM_URL": vllm_url, "TUNELOOP_PORT": str(app_port), "TUNELOOP_VLLM_WATCH_S": "1",
           "TUNELOOP_GATE_MIN_TEST_EXAMPLES": "1", "TUNELOOP_RETRAIN_MIN_NEW_EXAMPLES": "0",
           "TUNELOOP_TRAIN__NUM_TRAIN_EPOCHS": "1", "TUNELOOP_TRAIN__LEARNING_RATE": "0.002"}
    app = None
    try:
        adapter = train_lora(default_model, tmp_path / "ext-lora", [(QUESTION, "Zorblax is the capital of France.")])
        # tuneloop starts before the server is up: it says so and waits, rather than failing
        app = subprocess.Popen([str(CLI), "serve"], env=env, cwd=tmp_path, stdout=open(tmp_path / "app.log", "wb"),
                               stderr=subprocess.STDOUT)
        api = httpx.Client(base_url=f"http://127.0.0.1:{app_port}", timeout=300)
        wait_until(lambda: _health(api) is not None, timeout=120)
        assert _health(api) == 503
        vllm = operator_vllm(default_model, vllm_port, log)  # the operator brings it up afterwards
        up(vllm, vllm_url, log)
        wait_until(lambda: _health(api) == 200, timeout=60)

        def ask() -> dict:
            r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                      "temperature": 0, "max_tokens": 16})
            assert r.status_code == 200, r.text
            return r.json()

        base = ask()
        assert "Paris" in base["choices"][0]["message"]["content"]
        added = subprocess.run([str(CLI), "adapters", "add", str(adapter), "--name", "ext-1"], env=env, cwd=tmp_path,
                               capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
        assert api.post("/api/adapters/promote", json={"name": "ext-1"}).status_code == 200
        tuned = ask()
        assert tuned["model"] == "ext-1" and "Zorblax" in tuned["choices"][0]["message"]["content"]

        # The operator restarts vLLM: it comes back without the adapter, and tuneloop loads it again.
        stop(vllm)
        wait_until(lambda: _health(api) == 503, timeout=30)
        vllm = operator_vllm(default_model, vllm_port, log)
        up(vllm, vllm_url, log)
        wait_until(lambda: "ext-1" in {m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"]}, timeout=30)
        wait_until(lambda: _health(api) == 200, timeout=30)
        health = api.get("/api/health").json()
        assert health["adapter"] == "ext-1" and health["vllm"]["restarts"] >= 1
        assert ask()["choices"][0]["message"]["content"] == tuned["choices"][0]["message"]["content"]

        r = api.post("/api/adapters/rollback")
        assert r.status_code == 200 and r.json()["active"] is None
        assert ask()["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]

        # A cycle trains, then evaluates candidate and serving version through the external server.
        seed = tmp_path / "seed.jsonl"
        seed.write_text("".join(json.dumps({"prompt": f"Give the code for item {i}.", "completion": f"Zorblax code {i}."}) + "\n"
                                for i in range(30)))
        done = subprocess.run([str(CLI), "data", "import", str(seed)], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        run_id = api.post("/api/curation/retrain", params={"force": True}).json()["run_id"]
        run = wait_until(lambda: (r := api.get(f"/api/curation/runs/{run_id}").json())["status"] != "running" and r,
                         timeout=900)
        assert run["status"] == "succeeded", f"{run['reason']}\n{run['log']}"
        metrics = run["decision"]["metrics"]
        assert run["decision"]["candidate"] == run["adapter"] and metrics["candidate"] and metrics["active"]
        held = {m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"]}
        assert (run["adapter"] in held) == bool(run["promoted"])  # promoted stays loaded; a rejected one is unloaded
    finally:
        if app is not None:
            app.terminate()
            app.wait(60)
        if vllm is not None:
            stop(vllm)


def _health(api: httpx.Client) -> int | None:
    """/api/health's status, or None while the app is not listening yet."""
    try:
        return api.get("/api/health").status_code
    except httpx.TransportError:
        return None
