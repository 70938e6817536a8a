"""One auth model for curators: whatever is configured (curator logins, the admin token, or both)
protects the curation page, its Gradio routes and every curator API alike, and a login made once
works for all of them. The CLI's local token works wherever they do."""

import httpx
import pytest
from conftest import free_port
from fastapi.testclient import TestClient
from helpers import corrected

from serve import auth
from serve.app_client import AppClient, AppError, NotRunning
from serve.chat import ChatService
from serve.client import VLLMClient
from serve.services import Services
from serve.web import build_app


def app_for(settings, engine):
    vllm = VLLMClient(settings.served_vllm_url)
    return TestClient(build_app(Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")))


def log_in(c, user, password):
    return c.post("/curate/login", data={"username": user, "password": password}, follow_redirects=False)


@pytest.mark.parametrize("configured", ["token", "logins", "both"])
def test_what_is_configured_protects_page_buttons_and_api_alike(configured, settings, engine):
    if configured in ("token", "both"):
        settings.admin_token = "t0ken"
    if configured in ("logins", "both"):
        settings.curators = "cur:pw"
    user, password = ("admin", "t0ken") if configured == "token" else ("cur", "pw")
    fb = corrected(engine, settings)
    with app_for(settings, engine) as c:
        # Without credentials: the page sends the browser to the login form; Gradio routes and the API refuse.
        for path in ("/curate", "/curate/"):
            r = c.get(path, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/curate/login"), (path, r.status_code)
        assert c.get("/curate/config").status_code == 401
        assert c.post("/curate/gradio_api/queue/join", json={}).status_code == 401
        assert c.get("/api/curation/queue").status_code == 401
        assert c.post("/api/curation/retrain").status_code == 401
        assert c.get("/").status_code == 200  # the chat stays open

        bad = log_in(c, user, "wrong")
        assert bad.status_code == 401 and "Wrong user or password" in bad.text and auth.COOKIE not in c.cookies
        ok = log_in(c, user, password)
        assert ok.status_code == 303 and ok.headers["location"] == "/curate/" and auth.COOKIE in c.cookies
        # The one login now works for the page, its Gradio routes and the API.
        assert c.get("/curate", follow_redirects=False).headers["location"] == "/curate/"
        assert c.get("/curate/").status_code == 200
        assert c.get("/curate/config").status_code == 200
        r = c.get("/api/curation/queue")
        assert r.status_code == 200 and r.json()["counts"]["pending"] == 1
        assert c.post(f"/api/curation/{fb.id}/approve", json={}).status_code == 200

        c.get("/curate/logout")
        assert c.get("/api/curation/queue").status_code == 401


def test_forged_and_expired_sessions_and_other_credentials_are_refused(settings, engine):
    settings.curators = "cur:pw"
    with app_for(settings, engine) as c:
        good = log_in(c, "cur", "pw").cookies[auth.COOKIE]
        user, expires, sig = good.split("|")
        c.cookies.clear()
        for forged in (f"admin|{expires}|{sig}", f"cur|{int(expires) + 10**6}|{sig}", f"cur|{expires}|{'0' * 64}", "cur", "||"):
            c.cookies.set(auth.COOKIE, forged)
            assert c.get("/api/curation/queue").status_code == 401, forged
            assert c.get("/curate/config").status_code == 401, forged
        c.cookies.clear()
        # The admin user name means nothing without an admin token configured.
        assert log_in(c, "admin", "").status_code == 401
        assert c.get("/api/curation/queue", headers={"Authorization": "Bearer "}).status_code == 401
        assert c.get("/api/curation/queue", headers={"Authorization": "Basic !!notbase64"}).status_code == 401
    # A session outlives nothing: a login removed from the settings ends it.
    settings.curators = "other:pw2"
    with app_for(settings, engine) as c:
        c.cookies.set(auth.COOKIE, good)
        assert c.get("/api/curation/queue").status_code == 401


def test_the_cli_token_is_private_and_accepted(settings, engine):
    settings.curators = "cur:pw"
    with app_for(settings, engine) as c:
        path = auth.cli_token_path(settings)
        assert path.stat().st_mode & 0o777 == 0o600
        token = auth.cli_token(settings)
        assert c.get("/api/curation/queue", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/api/curation/queue", headers={"Authorization": f"Bearer {token}x"}).status_code == 401


def test_nothing_configured_leaves_curation_open_and_curate_without_slash_works(settings, engine):
    with app_for(settings, engine) as c:
        r = c.get("/curate", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/curate/"
        assert c.get("/curate").status_code == 200 and c.get("/api/curation/queue").status_code == 200


def test_the_cli_client_brings_the_apps_refusals_and_a_stopped_app_back_as_one_error(settings, engine):
    settings.curators = "cur:pw"  # curation needs a login; the CLI uses the local token the app writes
    with app_for(settings, engine) as c:
        def to_app(req: httpx.Request) -> httpx.Response:  # the app in-process, sent each request whole
            r = c.request(req.method, req.url.raw_path.decode(), headers=dict(req.headers), content=req.read())
            return httpx.Response(r.status_code, headers={"content-type": r.headers.get("content-type", "")}, content=r.content)

        cli = AppClient(settings, transport=httpx.MockTransport(to_app))
        with pytest.raises(AppError, match="nothing to roll back"):  # past the curator check: the token was sent
            cli.post("/api/adapters/rollback")
        with pytest.raises(AppError, match="run 404 does not exist"):
            cli.get("/api/curation/runs/404")
        assert cli.get("/api/curation/runs") == []
        elsewhere = settings.model_copy(update={"data_dir": settings.data_dir / "elsewhere"})  # no token there
        with pytest.raises(AppError, match="needs a curator login"):  # the app's own refusal, as it words it
            AppClient(elsewhere, transport=httpx.MockTransport(to_app)).post("/api/adapters/rollback")
    stopped = settings.model_copy(update={"port": free_port()})  # nothing listens
    with pytest.raises(NotRunning, match=f"not running at http://127.0.0.1:{stopped.port}"):
        AppClient(stopped).get("/api/health")
