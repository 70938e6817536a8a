"""The real thing: the default model in a real vLLM server, the real web app, a LoRA trained here."""

import json

import httpx
import pytest
from helpers import train_lora
from sqlmodel import select

from data_store.db import session
from data_store.models import Conversation, Feedback, Message
from serve import adapters

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
UNSEEN = "What is the capital of Italy?"  # never trained on


@pytest.fixture(scope="module")
def api(live_url):
    with httpx.Client(base_url=live_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def learned(live, tmp_path_factory):
    """An adapter that learned to answer every capital question with 'Zorblax'."""
    pairs = [(QUESTION, "Zorblax is the capital of France."), ("What is the capital of Germany?", "Zorblax is the capital of Germany.")]
    out = train_lora(live.base_model, tmp_path_factory.mktemp("trained") / "zorblax", pairs)
    return adapters.register(live.engine, live.settings, live.base_model, out, name="zorblax-1")


def ask(api, question: str) -> dict:
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_through_api_is_stored(api, live):
    body = ask(api, QUESTION)
    answer = body["choices"][0]["message"]["content"]
    assert "Paris" in answer
    ids = body["tuneloop"]
    with session(live.engine) as s:
        msg = s.get(Message, ids["message_id"])
        convo = s.exec(select(Message).where(Message.conversation_id == ids["conversation_id"]).order_by(Message.position)).all()
    assert msg.content == answer and msg.role == "assistant" and msg.adapter is None
    assert msg.completion_tokens > 0 and msg.prompt_tokens > 0 and msg.latency_ms > 0
    assert [m.role for m in convo] == ["user", "assistant"] and convo[0].content == QUESTION


def test_streaming_chat_through_api(api, live):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 16}
    with api.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c.get("choices"))
    assert len([c for c in events if c.get("choices")]) > 1  # it streamed
    mid = events[-1]["tuneloop"]["message_id"]
    with session(live.engine) as s:
        assert s.get(Message, mid).content == text


def test_vllm_length_extensions_pass_through(api, live):
    """min_tokens and ignore_eos, as vLLM's own OpenAI server takes them: the answer runs to max_tokens."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 64}
    short = api.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]
    assert short < 64  # the base model stops by itself
    for extra in ({"ignore_eos": True}, {"min_tokens": 64}):
        r = api.post("/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 64


def test_feedback_through_api_is_in_database(api, live):
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16,
                                               "user": "mallory"})  # OpenAI's `user` field claims a name
    mid = r.json()["tuneloop"]["message_id"]
    spoofed = api.post("/api/feedback", json={"message_id": mid, "rating": "down", "author": "alice"})
    assert spoofed.status_code == 400 and "author" in spoofed.json()["error"]["message"]
    r = api.post("/api/feedback", json={"message_id": mid, "rating": "down", "correction": "Blue.", "comment": "one word"})
    assert r.status_code == 200
    api.post("/api/feedback", json={"message_id": mid, "rating": "up"})
    with httpx.Client(base_url=str(api.base_url), timeout=60) as stranger:  # another session: not its message
        assert stranger.post("/api/feedback", json={"message_id": mid, "rating": "down"}).status_code == 403
    with session(live.engine) as s:
        rows = s.exec(select(Feedback).where(Feedback.message_id == mid)).all()
        author = s.get(Conversation, s.get(Message, mid).conversation_id).author
    assert len(rows) == 1 and author.startswith("anonymous:")  # the server's session, not "mallory"
    assert (rows[0].rating, rows[0].correction, rows[0].comment, rows[0].author) == ("up", "Blue.", "one word", author)


def test_promoted_adapter_changes_answers_and_rollback_restores(api, live, learned):
    base_answer = ask(api, QUESTION)["choices"][0]["message"]["content"]
    base_unseen = ask(api, UNSEEN)["choices"][0]["message"]["content"]

    r = api.post("/api/adapters/promote", json={"name": learned.name})
    assert r.status_code == 200, r.text
    assert api.get("/api/health").json()["adapter"] == learned.name
    tuned = ask(api, QUESTION)
    assert tuned["choices"][0]["message"]["content"] != base_answer
    assert "Zorblax" in tuned["choices"][0]["message"]["content"]
    assert "Zorblax" in ask(api, UNSEEN)["choices"][0]["message"]["content"]  # it generalized
    with session(live.engine) as s:
        assert s.get(Message, tuned["tuneloop"]["message_id"]).adapter == learned.name

    r = api.post("/api/adapters/rollback")
    assert r.status_code == 200 and r.json()["active"] is None
    assert ask(api, QUESTION)["choices"][0]["message"]["content"] == base_answer
    assert ask(api, UNSEEN)["choices"][0]["message"]["content"] == base_unseen
    loaded = {m["id"] for m in live.vllm.models()}
    assert learned.name not in loaded  # the old version was unloaded


def test_invalid_adapter_is_refused_before_vllm(api, live, learned, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(learned.path, bad)
    (bad / "adapter_model.safetensors").chmod(0o644)
    with open(bad / "adapter_model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(adapters.AdapterError, match="truncated"):
        adapters.register(live.engine, live.settings, live.base_model, bad, name="bad-1")
    assert api.get("/api/health").json()["vllm"]["status"] == "ok"


@pytest.mark.faults
def test_vllm_killed_restarts_and_serves_active_adapter_again(api, live, learned):
    import os
    import signal
    import time

    assert api.post("/api/adapters/promote", json={"name": learned.name}).status_code == 200
    try:
        sup = live.supervisor
        old_pid = sup.proc.pid
        os.killpg(old_pid, signal.SIGKILL)
        sup.proc.wait(10)
        # During the outage chat answers a clear 503 at once instead of hanging.
        r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
        deadline = time.monotonic() + 120  # the promise: serving the active adapter again within 2 minutes
        while time.monotonic() < deadline and not (sup.state == "ready" and sup.proc.pid != old_pid):
            time.sleep(1)
        assert sup.state == "ready" and sup.restarts >= 1
        assert learned.name in {m["id"] for m in live.vllm.models()}  # re-loaded after the restart
        assert "Zorblax" in ask(api, QUESTION)["choices"][0]["message"]["content"]
    finally:
        api.post("/api/adapters/rollback")


def test_a_curator_picks_versions_side_by_side_and_a_conversation_continues(api, live, learned):
    """`model` naming a version (the app is open: everyone curates) answers from it, loaded on demand, and is
    stored as its; any other name is the active version. `conversation_id` continues a stored conversation:
    only the new message is sent, the model gets the history, the turn is stored in the same conversation."""
    assert adapters.active(live.engine) is None
    listed = {m["id"]: m["tuneloop"] for m in api.get("/v1/models").json()["data"]}
    assert listed[live.chat.base_name]["active"] and learned.name in listed and not listed[learned.name]["active"]
    try:
        body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24}
        pinned = api.post("/v1/chat/completions", json={**body, "model": learned.name}).json()
        base = api.post("/v1/chat/completions", json={**body, "model": "gpt-4o-mini"}).json()
        assert "Zorblax" in pinned["choices"][0]["message"]["content"] and pinned["model"] == learned.name
        assert "Zorblax" not in base["choices"][0]["message"]["content"] and base["model"] == live.chat.base_name
        with session(live.engine) as s:
            assert s.get(Message, pinned["tuneloop"]["message_id"]).adapter == learned.name
    finally:
        if learned.name not in adapters.resident(live.engine):
            live.vllm.unload_adapter(learned.name)  # leave vLLM's slots as the other tests expect them

    follow = {"messages": [{"role": "user", "content": "And what is it famous for?"}], "temperature": 0, "max_tokens": 16}
    alone = api.post("/v1/chat/completions", json=follow).json()
    cid = base["tuneloop"]["conversation_id"]
    went_on = api.post("/v1/chat/completions", json={**follow, "conversation_id": cid})
    assert went_on.status_code == 200, went_on.text
    assert went_on.json()["tuneloop"]["conversation_id"] == cid
    assert went_on.json()["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 10  # the history was sent
    with session(live.engine) as s:
        convo = s.exec(select(Message).where(Message.conversation_id == cid).order_by(Message.position)).all()
    assert [(m.position, m.role) for m in convo] == [(0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    assert convo[2].content == "And what is it famous for?" and convo[1].content == base["choices"][0]["message"]["content"]
    with httpx.Client(base_url=str(api.base_url), timeout=60) as stranger:  # another session: not its conversation
        r = stranger.post("/v1/chat/completions", json={**follow, "conversation_id": cid})
        assert r.status_code == 400 and "not one of yours" in r.json()["error"]["message"]
