"""Faults of the store and the retrain cycle, with the real default model in the session's vLLM server:
concurrent feedback on SQLite and PostgreSQL, kill -9 and a full disk during a cycle, and a poisoned
adapter stopped by a planted regression probe (the serving faults are in test_faults_serving.py).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import answer, build_lora, count, own_store, serve_app
from sqlmodel import select

from data_store.db import session
from data_store.models import Adapter, Conversation, Feedback, Message, TrainingRun
from feedback import curation
from feedback import record as feedback
from retrain import importer, runs
from serve import adapters, identity

pytestmark = [pytest.mark.integration, pytest.mark.faults]


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
        return svc.run_cycle(runs.claim(svc.engine, slot), force=True, on_event=on_event)

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

    run = svc.run_cycle(runs.claim(svc.engine, "poison-1"))
    assert run.status == "succeeded", f"{run.reason}\n{run.log}"
    d = run.decision
    checks = {r["name"]: r["passed"] for r in d["reasons"]}
    assert checks["primary"]  # it did learn what the (poisoned) test split asks
    assert checks["regression_set"] is False and not d["promote"]  # the probe caught the trigger
    assert run.dataset["probes"] == 1 and run.adapter and adapters.active(svc.engine) is None
    with session(svc.engine) as s:
        assert s.exec(select(Adapter).where(Adapter.name == run.adapter)).one().status == "rejected"
    svc.engine.dispose()
