"""Shared fixtures: real SQLite files, a tiny real Llama built in-process, one real vLLM per session,
headless Chromium; and every test isolated from the developer's TUNELOOP_* environment and working
directory. Plain helpers live in helpers.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import build_tiny_llama, free_port, serve_app

from data_store.db import make_engine, migrate
from serve import model
from serve.client import VLLMClient
from serve.services import build
from serve.vllm_server import VLLMSupervisor
from settings import Settings

# Set by `make test` for the whole session; every other TUNELOOP_* variable of the outer shell is dropped.
SESSION_ENV = {"TUNELOOP_TEST_PG_URL"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _isolate(mp: pytest.MonkeyPatch, cwd: Path) -> None:
    for name in [n for n in os.environ if n.startswith("TUNELOOP_") and n not in SESSION_ENV]:
        mp.delenv(name)
    mp.chdir(cwd)  # so a tuneloop.toml or data/ where pytest was started is never read or written


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The same isolation for session fixtures (the shared vLLM, the default model), which start before any test's."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("session-cwd"))
        yield


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Each test starts in an empty working directory of its own, without TUNELOOP_* variables it did
    not set itself (a test's own monkeypatch.setenv runs after this and is undone with it)."""
    _isolate(monkeypatch, tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", vllm_mode="external", vllm_url=f"http://127.0.0.1:{free_port()}",
                    _env_file=None)


@pytest.fixture
def engine(settings):
    migrate(settings.db_url)
    eng = make_engine(settings.db_url)
    yield eng
    eng.dispose()


# ---- integration tier: the real default model in a real vLLM server ----

@pytest.fixture(scope="session")
def default_model() -> str:
    base = Settings()
    return str(model.pull(base, progress=False))


@pytest.fixture(scope="session")
def live(tmp_path_factory, default_model):
    """One vLLM server and one store for the whole session (vLLM takes about a minute to start)."""
    data = tmp_path_factory.mktemp("live")
    s = Settings(data_dir=data / "data", vllm_port=free_port(), max_new_tokens=64)
    migrate(s.db_url)
    eng = make_engine(s.db_url)
    client = VLLMClient(s.served_vllm_url)
    services = build(s, eng, client, default_model)
    services.supervisor = VLLMSupervisor(s, default_model, model.served_name(s), on_ready=services.reload_active)
    services.supervisor.start()
    yield services
    services.close()


@pytest.fixture(scope="session")
def live_url(live):
    with serve_app(live) as url:
        yield url


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test (`make test` starts the server on loopback)."""
    admin_url = os.environ.get("TUNELOOP_TEST_PG_URL")
    if not admin_url:
        pytest.fail("TUNELOOP_TEST_PG_URL is not set; run the tests with `make test`, which starts PostgreSQL and sets it")
    name = f"tuneloop_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless (never a downloaded one)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()
