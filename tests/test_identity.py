"""Identities the server vouches for: the author of a message and its feedback is who the server says
the sender is (an account, an API key, a trusted proxy's user, or an anonymous session), never a name
the client sends; only the owner of a conversation rates or corrects its answers. Each attack gets a
clear 4xx and stores nothing. The model server is a closed port: these requests never reach it."""

import time

from fastapi.testclient import TestClient
from helpers import add_turn, serve_app
from sqlmodel import select
from typer.testing import CliRunner

from data_store.db import session
from data_store.models import ApiKey, Feedback
from serve import identity
from serve.auth import Signer
from serve.chat import ChatService
from serve.client import VLLMClient
from serve.services import Services
from serve.web import build_app


def app_for(settings, engine):
    vllm = VLLMClient(settings.served_vllm_url)
    return TestClient(build_app(Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")))


def feedback_rows(engine):
    with session(engine) as s:
        return list(s.exec(select(Feedback)))


def rate(c, mid, **kw):
    return c.post("/api/feedback", json={"message_id": mid, "rating": "down", "correction": "Paris."}, **kw)


def test_a_spoofed_author_is_refused_and_the_author_is_the_login(settings, engine):
    settings.users = "alice:pw,bob:pw2"
    mid = add_turn(engine, author="alice")
    with app_for(settings, engine) as c:
        r = c.post("/api/feedback", json={"message_id": mid, "rating": "down", "author": "bob"}, auth=("alice", "pw"))
        assert r.status_code == 400 and "logged in as (alice)" in r.json()["error"]["message"]
        assert feedback_rows(engine) == []
        r = rate(c, mid, auth=("alice", "pw"))
        assert r.status_code == 200 and r.json()["author"] == "alice"
        # The chat's OpenAI `user` field names no one: with the model down the request is a 503 past
        # identity (not a 400 or 401); what it would store is covered by test_integration.
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": "bob"},
                      auth=("alice", "pw")).status_code == 503


def test_another_users_message_is_a_403_that_reveals_nothing(settings, engine):
    settings.users = "alice:pw,mallory:pw3"
    mine = add_turn(engine, author="alice")
    with app_for(settings, engine) as c:
        theirs = rate(c, mine, auth=("mallory", "pw3"))
        missing = rate(c, mine + 1000, auth=("mallory", "pw3"))
        assert theirs.status_code == missing.status_code == 403
        same = missing.json()["error"]["message"].replace(str(mine + 1000), "N")
        assert theirs.json()["error"]["message"].replace(str(mine), "N") == same
        assert c.post("/api/feedback", json={"message_id": mine, "rating": "up"}, auth=("mallory", "wrong")).status_code == 401
    assert feedback_rows(engine) == []


def test_api_keys_are_issued_hashed_act_as_their_owner_and_revoke_at_once(settings, engine):
    settings.curators = "cur:pw"
    mid = add_turn(engine, author="ci-bot")
    with app_for(settings, engine) as c:
        assert c.post("/api/curation/keys", json={"owner": "ci-bot"}).status_code == 401
        assert c.post("/api/curation/keys", json={"owner": "anonymous:abc"}, auth=("cur", "pw")).status_code == 400
        issued = c.post("/api/curation/keys", json={"owner": "ci-bot", "label": "nightly eval"}, auth=("cur", "pw")).json()
        key = issued["key"]
        with session(engine) as s:
            row = s.exec(select(ApiKey)).one()
        assert key.startswith("tl_") and key not in row.key_hash and row.created_by == "cur"
        listed = c.get("/api/curation/keys", auth=("cur", "pw")).json()["keys"]
        assert [k["owner"] for k in listed] == ["ci-bot"] and "key_hash" not in listed[0]
        r = rate(c, mid, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["author"] == "ci-bot"
        assert c.delete(f"/api/curation/keys/{issued['id']}", auth=("cur", "pw")).status_code == 200
        r = rate(c, mid, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        assert rate(c, mid, headers={"Authorization": "Bearer tl_made-up"}).status_code == 401
        assert c.delete("/api/curation/keys/999", auth=("cur", "pw")).status_code == 404
        # A key is not a curator credential.
        assert c.get("/api/curation/queue", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert len(feedback_rows(engine)) == 1


def test_a_key_revoked_by_another_process_stops_within_the_recheck_time(settings, engine, monkeypatch):
    """The service remembers a valid key's owner for KEY_RECHECK_S; a revocation it did not make itself
    (`tuneloop keys revoke` is another process) is seen at the next check, and unknown keys are never remembered."""
    monkeypatch.setattr(identity, "KEY_RECHECK_S", 0.5)
    mid = add_turn(engine, author="ci-bot")
    issued = identity.issue_key(engine, "ci-bot", "", by="cli")
    auth = {"Authorization": f"Bearer {issued.key}"}
    with app_for(settings, engine) as c:
        assert rate(c, mid, headers=auth).status_code == 200
        identity.revoke_key(engine, issued.id)  # as the CLI does: straight to the store
        time.sleep(0.6)
        r = rate(c, mid, headers=auth)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        for _ in range(2):  # refused every time: a refusal is not remembered as an identity
            assert rate(c, mid, headers={"Authorization": "Bearer tl_unknown"}).status_code == 401
    assert len(feedback_rows(engine)) == 1


def test_keys_from_the_cli(settings, engine, monkeypatch):
    import app as cli

    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", settings.db_url)
    runner = CliRunner()
    out = runner.invoke(cli.app, ["keys", "issue", "dana", "--label", "notebook"])
    assert out.exit_code == 0, out.output
    key = out.output.split(": ", 1)[1].split()[0]
    assert identity.key_owner(engine, key) == "dana"
    assert "dana" in runner.invoke(cli.app, ["keys", "list"]).output
    assert runner.invoke(cli.app, ["keys", "revoke", "1"]).exit_code == 0
    assert "revoked" in runner.invoke(cli.app, ["keys", "list"]).output
    bad = runner.invoke(cli.app, ["keys", "revoke", "42"])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def test_login_required_refuses_the_unidentified_and_a_chat_login_is_no_curator(settings, engine):
    settings.users = "alice:pw"
    settings.curators = "cur:pw"
    settings.chat_login_required = True
    mid = add_turn(engine, author="alice")
    with app_for(settings, engine) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and "log in" in r.json()["error"]["message"]
        assert rate(c, mid).status_code == 401
        assert c.post("/gradio_api/queue/join", json={}).status_code == 401
        assert c.post("/login", data={"username": "alice", "password": "nope"}).status_code == 401
        r = c.post("/login", data={"username": "alice", "password": "pw"}, follow_redirects=False)
        assert r.status_code == 303 and identity.USER_COOKIE in r.cookies
        assert c.get("/").status_code == 200
        assert rate(c, mid).json()["author"] == "alice"  # the session cookie identifies her
        # A chat login is not a curator login, by form, by Basic or by moving its cookie.
        assert c.post("/curate/login", data={"username": "alice", "password": "pw"}).status_code == 401
        assert c.get("/api/curation/queue", auth=("alice", "pw")).status_code == 401
        c.cookies.set("tuneloop_curator", c.cookies.get(identity.USER_COOKIE))  # no curator cookie was there
        assert c.get("/api/curation/queue").status_code == 401
        assert c.get("/curate/", follow_redirects=False).status_code == 303


def test_the_proxy_header_counts_only_from_a_trusted_proxy(settings, engine):
    mid = add_turn(engine, author="carol")
    settings.trusted_proxies = "10.0.0.0/8"  # the test client's address ("testclient") is not in it
    with app_for(settings, engine) as c:
        r = rate(c, mid, headers={"X-Forwarded-User": "carol"})
        assert r.status_code == 403  # the header was ignored: this is an anonymous session
    settings.trusted_proxies = "testclient"
    with app_for(settings, engine) as c:
        r = rate(c, mid, headers={"X-Forwarded-User": "carol"})
        assert r.status_code == 200 and r.json()["author"] == "carol"
        assert rate(c, mid, headers={"X-Forwarded-User": "anonymous:someone"}).status_code == 401


def test_anonymous_sessions_are_server_issued_and_separate(settings, engine):
    with app_for(settings, engine) as a, app_for(settings, engine) as b:
        a.get("/api/health")
        b.get("/api/health")
        signer = Signer(settings)
        sa = signer.unsign("session", a.cookies.get(identity.SESSION_COOKIE))
        sb = signer.unsign("session", b.cookies.get(identity.SESSION_COOKIE))
        assert sa and sb and sa != sb
        mid = add_turn(engine, author=identity.ANONYMOUS + sa)
        assert rate(b, mid).status_code == 403
        r = rate(a, mid)
        assert r.status_code == 200 and r.json()["author"] == f"anonymous:{sa}"
        # A forged session cookie names no one: the client gets a fresh session instead.
        b.cookies.delete(identity.SESSION_COOKIE)
        b.cookies.set(identity.SESSION_COOKIE, f"{sa}|9999999999|forged")
        assert rate(b, mid).status_code == 403


def test_wrong_credentials_are_refused_never_downgraded_to_anonymous(settings, engine):
    settings.users = "alice:pw"
    mid = add_turn(engine, author="alice")
    with app_for(settings, engine) as c:
        for header in ("tl_bogus", "Token tl_x", "Bearer ", "Basic", "Bearer not-a-key"):
            r = rate(c, mid, headers={"Authorization": header})
            assert r.status_code == 401, (header, r.status_code)
        c.post("/login", data={"username": "alice", "password": "pw"})
        good = c.cookies.get(identity.USER_COOKIE)
        value, expires, sig = good.rsplit("|", 2)
        for bad in (f"{value}|{expires}|{'0' * len(sig)}", f"mallory|{expires}|{sig}", f"{value}|1|{sig}"):
            c.cookies.delete(identity.USER_COOKIE)
            c.cookies.set(identity.USER_COOKIE, bad)
            r = rate(c, mid)
            assert r.status_code == 401 and "log in again" in r.json()["error"]["message"]
            page = c.get("/", follow_redirects=False)  # the browser goes back to the login form
            assert page.status_code == 303 and page.headers["location"] == "/login"
    assert feedback_rows(engine) == []


def test_reserved_and_malformed_names_are_refused(settings, engine):
    for owner in ("admin", "cli", "open", "anonymous:x", "", "a" * 129, "tab\there"):
        try:
            identity.issue_key(engine, owner, "", by="test")
        except identity.ApiKeyError:
            continue
        raise AssertionError(f"owner {owner!r} was accepted")
    settings.users = "admin:pw"
    import pytest

    with pytest.raises(ValueError, match="TUNELOOP_USERS"):
        app_for(settings, engine)


def test_anonymous_sessions_share_one_author_cap(settings, engine):
    from feedback import curation
    from feedback import record as feedback

    settings.curation_author_cap = 3
    fbs = [feedback.record(engine, settings, add_turn(engine, author=f"anonymous:s{i}"), author=f"anonymous:s{i}",
                           rating="down", correction=f"Better {i}.") for i in range(5)]
    report = curation.bulk(engine, settings, "approve", curation.Filters(status="pending"))
    assert report.done == 3 and len(report.skipped) == 2  # five fresh sessions are still one crowd
    assert "anonymous sessions together" in str(report.skipped[0])
    assert len(fbs) == 5


def test_the_proxy_header_through_a_real_server_on_loopback(settings, engine):
    """As deployed: a proxy on the same machine connects from 127.0.0.1 and adds X-Forwarded-For; the
    peer address checked is the proxy's own."""
    import httpx

    vllm = VLLMClient(settings.served_vllm_url)
    mid = add_turn(engine, author="carol")
    settings.trusted_proxies = "127.0.0.1"
    with serve_app(Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")) as url:
        r = httpx.post(f"{url}/api/feedback", json={"message_id": mid, "rating": "up"},
                       headers={"X-Forwarded-User": "carol", "X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 200 and r.json()["author"] == "carol"
    settings.trusted_proxies = "10.0.0.1"  # not this peer: the same header is ignored
    with serve_app(Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")) as url:
        r = httpx.post(f"{url}/api/feedback", json={"message_id": mid, "rating": "down"},
                       headers={"X-Forwarded-User": "carol", "X-Forwarded-For": "10.0.0.1"})
        assert r.status_code == 403
