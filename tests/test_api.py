"""The API's input handling with a real store and no model server reachable (a closed port)."""

import pytest
from fastapi.testclient import TestClient
from helpers import add_turn
from sqlmodel import func, select

from data_store.db import session
from data_store.models import Conversation, Feedback, Message
from serve.chat import ChatInputError, ChatService, check_messages
from serve.client import VLLMClient
from serve.services import Services
from serve.web import build_app


@pytest.fixture
def client(settings, engine):
    settings.users = "alice:pw,bob:pw2"
    vllm = VLLMClient(settings.served_vllm_url)
    services = Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")
    with TestClient(build_app(services)) as c:
        yield c


def rows(engine, model):
    with session(engine) as s:
        return s.exec(select(func.count()).select_from(model)).one()


@pytest.mark.parametrize("body,message", [
    ({}, "messages"),
    ({"messages": []}, "at least 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message must have role 'user'"),
    ({"messages": [{"role": "user", "content": "   "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "x" * 20000}]}, "above the limit"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 8}, "min_tokens (8) is above max_tokens (4)"),
    ({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": "sometimes"}, "ignore_eos"),
])
def test_malformed_chat_is_400_and_stores_nothing(client, engine, body, message):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    assert rows(engine, Conversation) == 0 and rows(engine, Message) == 0


def test_chat_with_model_server_down_is_503(client, engine):
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": stream})
        assert r.status_code == 503
        assert "unavailable" in r.json()["error"]["message"]
    assert rows(engine, Message) == 0


def test_not_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_feedback_endpoint(client, engine):
    mid = add_turn(engine, author="alice")
    r = client.post("/api/feedback", json={"message_id": mid, "rating": "down", "correction": "Paris.", "comment": "short"},
                    auth=("alice", "pw"))
    assert r.status_code == 200 and r.json()["rating"] == "down" and r.json()["author"] == "alice"
    r = client.post("/api/feedback", json={"message_id": mid, "rating": "up"}, auth=("alice", "pw"))
    assert r.json()["correction"] == "Paris."  # absent fields are left alone
    assert rows(engine, Feedback) == 1


@pytest.mark.parametrize("body,status", [
    ({"message_id": 424242, "rating": "up"}, 403),
    ({"message_id": "abc", "rating": "up"}, 400),
    ({"rating": "up"}, 400),
    ({"message_id": 1, "rating": "sideways"}, 400),
    ({"message_id": 1, "rating": "up", "surprise": 1}, 400),
])
def test_bad_feedback_requests(client, engine, body, status):
    add_turn(engine)
    r = client.post("/api/feedback", json=body, auth=("alice", "pw"))
    assert r.status_code == status
    assert r.json()["error"]["message"]
    assert rows(engine, Feedback) == 0


def test_health_reports_vllm_down(client):
    r = client.get("/api/health")
    assert r.status_code == 503
    body = r.json()
    assert body["database"] == "ok" and body["vllm"]["status"] == "unavailable" and body["adapter"] is None


def test_admin_endpoints_need_token_when_set(settings, engine):
    settings.admin_token = "s3cret"
    vllm = VLLMClient(settings.served_vllm_url)
    services = Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")
    with TestClient(build_app(services)) as c:
        assert c.post("/api/adapters/rollback").status_code == 401
        assert c.post("/api/adapters/rollback", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/api/adapters/rollback", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 400 and "nothing to roll back" in r.json()["error"]["message"]


def test_check_messages_is_pure():
    check_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], 100)
    with pytest.raises(ChatInputError):
        check_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], 100)


def test_retrain_now_while_a_cycle_runs_is_a_409_that_names_the_run(client, engine):
    from data_store.models import TrainingRun
    from retrain import runs

    rid = runs.claim(engine, "manual-first")
    r = client.post("/api/curation/retrain")
    assert r.status_code == 409 and f"run {rid} is still running" in r.json()["error"]["message"]
    assert rows(engine, TrainingRun) == 1


def test_a_conversation_is_continued_only_by_its_owner(client, engine):
    """Someone else's conversation, or one that does not exist: a 400 naming it, before the model is asked."""
    theirs = add_turn(engine, author="bob")
    with session(engine) as s:
        conversation = s.get(Message, theirs).conversation_id
    before = rows(engine, Message)
    for cid in (conversation, 999):
        r = client.post("/v1/chat/completions", auth=("alice", "pw"),
                        json={"conversation_id": cid, "messages": [{"role": "user", "content": "and then?"}]})
        assert r.status_code == 400 and f"conversation {cid} is not one of yours" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"conversation_id": 0, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "conversation_id" in r.json()["error"]["message"]
    assert rows(engine, Message) == before


def test_only_curators_pick_a_version_and_list_them_all(settings, engine, tmp_path, tiny_model):
    """With curator logins set, a chat user who names a registered version is refused (403) before the model
    is asked; a name that is no version (an OpenAI client's default) is the active version for anyone, so
    it reaches the (closed) model server, as does the active version's own name. GET /v1/models lists the
    active version to users, all to curators."""
    from helpers import build_lora

    from serve import adapters

    settings.users, settings.curators = "alice:pw,carol:pw3", "carol:pw3"  # carol chats and curates
    adapters.register(engine, settings, str(tiny_model), build_lora(tiny_model, tmp_path / "lora"), name="v-1")
    vllm = VLLMClient(settings.served_vllm_url)
    services = Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(build_app(services)) as c:
        r = c.post("/v1/chat/completions", auth=("alice", "pw"), json={**ask, "model": "v-1"})
        assert r.status_code == 403 and "only curators choose" in r.json()["error"]["message"]
        for name in ("gpt-4o-mini", "tiny"):  # no version; the active one (the base model here)
            assert c.post("/v1/chat/completions", auth=("alice", "pw"), json={**ask, "model": name}).status_code == 503
        assert c.post("/v1/chat/completions", auth=("carol", "pw3"), json={**ask, "model": "v-1"}).status_code == 503
        user = c.get("/v1/models", auth=("alice", "pw")).json()
        curator = c.get("/v1/models", auth=("carol", "pw3")).json()
    assert user["object"] == "list" and [(m["id"], m["tuneloop"]["active"]) for m in user["data"]] == [("tiny", True)]
    assert [(m["id"], m["tuneloop"]["kind"], m["tuneloop"]["active"]) for m in curator["data"]] == [
        ("tiny", "base", True), ("v-1", "lora", False)]
    assert rows(engine, Message) == 0
