"""Faults and hostile input that need no model server: names and paths, Unicode, oversized text,
access control, Gradio's file routes, poisoning volume, two app processes, migrations with data.

Each test is one scenario of the reliability suite (README, "Reliability") and asserts its exact outcome.
"""

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from helpers import add_turn, app_was_down_at_the_cron_time, build_lora, serve_app
from sqlmodel import func, select

from data_store.db import alembic_config, make_engine, migrate, session
from data_store.models import Conversation, Example, Feedback, Message, TrainingRun
from feedback import curation
from feedback import record as feedback
from retrain import examples, export, schedule
from serve import adapters
from serve.chat import ChatService
from serve.client import VLLMClient
from serve.model import served_name
from serve.services import Services
from serve.web import build_app

pytestmark = pytest.mark.faults


def services(settings, engine) -> Services:
    vllm = VLLMClient(settings.served_vllm_url)  # nothing listens there: these scenarios never reach a model
    return Services(settings, engine, vllm, ChatService(settings, engine, vllm, "tiny"), "tiny")


def count(engine, model) -> int:
    with session(engine) as s:
        return s.exec(select(func.count()).select_from(model)).one()


# ---- 8. path and name input ----

BAD_NAMES = ["../../etc", "..", "/etc/passwd", "a/b", "a\\b", "x\x00y", "name with space", "<script>", "é", "-lead", "a" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_hostile_adapter_names_are_refused_over_the_api(name, settings, engine):
    with TestClient(build_app(services(settings, engine))) as c:
        r = c.post("/api/adapters/promote", json={"name": name})
    assert r.status_code == 400 and "is not allowed" in r.json()["error"]["message"]
    assert not settings.adapters_dir.exists() or list(settings.adapters_dir.iterdir()) == []


def test_paths_outside_the_data_directory_are_refused(settings, engine, tiny_model, tmp_path):
    # A path is never a version: an adapter is copied into its own directory under the data directory.
    for path in ("../../etc", "/etc", str(tmp_path / ".." / ".." / "etc")):
        with pytest.raises(adapters.AdapterError, match="adapter_config.json|not a directory"):
            adapters.register(engine, settings, str(tiny_model), Path(path))
    lora = build_lora(tiny_model, tmp_path / "outside")
    row = adapters.register(engine, settings, str(tiny_model), lora, name="v-ok")
    assert Path(row.path).resolve().parent == settings.adapters_dir.resolve()
    with pytest.raises(adapters.AdapterError, match="is not allowed"):
        adapters.register(engine, settings, str(tiny_model), lora, name="../../escape")
    # vLLM serves the base model under its served name: a version named so would take the base traffic.
    with pytest.raises(adapters.AdapterError, match="the base model's served name"):
        adapters.register(engine, settings, str(tiny_model), lora, name=served_name(settings))
    assert sorted(p.name for p in settings.adapters_dir.iterdir()) == ["v-ok"]


# ---- 9. hostile text: Unicode survives store, export and training data ----

TRICKY = "مرحبا بالعالم \u200b zero\u200dwidth \u2066isolate\u2069 👩‍👩‍👧 🇫🇷 \u202eRTL override\u202c e\u0301 <b>x</b>"


def test_unicode_round_trips_through_store_export_and_training_data(settings, engine, tiny_model, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    mid = add_turn(engine, answer="Lyon.", author="alice")
    settings.users = "alice:pw"
    with TestClient(build_app(services(settings, engine))) as c:
        r = c.post("/api/feedback", json={"message_id": mid, "rating": "down", "correction": TRICKY, "comment": TRICKY},
                   auth=("alice", "pw"))
        assert r.status_code == 200, r.text
        fid = r.json()["id"]
        assert c.post(f"/api/curation/{fid}/approve", json={}).status_code == 200
    with session(engine) as s:
        fb = s.get(Feedback, fid)
        assert fb.correction == TRICKY and fb.comment == TRICKY
    built = examples.build(engine)
    split = next(k for k, v in built.splits.items() if v)
    for fmt in ("sft", "dpo"):
        out = tmp_path / f"{fmt}.jsonl"
        export.write(built, fmt, split, out)
        row = load_dataset("json", data_files=str(out), split="train")[0]  # what TRL's trainers read
        chosen = row["messages"][-1]["content"] if fmt == "sft" else row["chosen"][-1]["content"]
        assert chosen == TRICKY
    tok = AutoTokenizer.from_pretrained(tiny_model)  # byte-level BPE: the training tokens decode back exactly
    assert tok.decode(tok(TRICKY)["input_ids"]) == TRICKY


@pytest.mark.parametrize("text,problem", [("bad \ud800 half", "unpaired UTF-16 surrogate (\\ud800)"),
                                          ("low \udfff", "unpaired UTF-16 surrogate (\\udfff)"),
                                          ("nul \x00 byte", "NUL character")])
def test_unstorable_text_is_refused_clearly_everywhere(text, problem, settings, engine, tmp_path):
    from retrain import importer

    mid = add_turn(engine)
    raw = json.dumps({"messages": [{"role": "user", "content": text}]})  # ASCII JSON with the escape, as a client sends it
    with TestClient(build_app(services(settings, engine))) as c:
        r = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text
        r = c.post("/api/feedback", content=json.dumps({"message_id": mid, "correction": text}),
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text
    f = tmp_path / "seed.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "completion": "fine"}) + "\n" + json.dumps({"prompt": "q", "completion": text}) + "\n")
    with pytest.raises(importer.ImportFailed, match=r"line 2.*" + problem.split(" (")[0].replace("(", r"\(")):
        importer.import_file(engine, settings, f)
    assert count(engine, Feedback) == 0 and count(engine, Example) == 0 and count(engine, Conversation) == 1


# ---- 10. oversized input ----

def test_a_megabyte_message_or_correction_is_a_clear_400_and_stores_nothing(settings, engine):
    big = "x" * (1 << 20)
    mid = add_turn(engine)
    with TestClient(build_app(services(settings, engine))) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]})
        assert r.status_code == 400 and "above the limit of 16000" in r.json()["error"]["message"]
        for field in ("correction", "comment"):
            r = c.post("/api/feedback", json={"message_id": mid, field: big})
            assert r.status_code == 400 and f"{field} has {1 << 20} characters" in r.json()["error"]["message"]
        assert c.get("/api/health").json()["database"] == "ok"  # still serving
    assert count(engine, Conversation) == 1 and count(engine, Feedback) == 0


# ---- 11. access ----

CURATOR_ONLY = [("get", "/api/curation/queue", None), ("post", "/api/curation/1/approve", {}), ("post", "/api/curation/1/reject", None),
                ("post", "/api/curation/bulk", {"action": "approve"}), ("post", "/api/curation/retrain", {}),
                ("get", "/api/curation/runs", None), ("post", "/api/adapters/promote", {"name": "v0001"}),
                ("post", "/api/adapters/rollback", None), ("get", "/api/curation/keys", None),
                ("post", "/api/curation/keys", {"owner": "x"}), ("delete", "/api/curation/keys/1", None)]


def test_curator_actions_need_a_curator_login(settings, engine):
    settings.curators = "cur:pw"
    settings.admin_token = "t0ken"
    settings.users = "chatuser:pw"  # a real chat account: it is still no curator
    with TestClient(build_app(services(settings, engine))) as c:
        for method, path, body in CURATOR_ONLY:
            kw = {"json": body} if body is not None else {}
            for auth in ({}, {"auth": ("cur", "wrong")}, {"auth": ("chatuser", "pw")}, {"headers": {"Authorization": "Bearer nope"}}):
                r = getattr(c, method)(path, **kw, **auth)
                assert r.status_code == 401 and "curator login" in r.json()["error"]["message"], (path, auth, r.text)
            r = getattr(c, method)(path, **kw, auth=("cur", "pw"))
            assert r.status_code != 401, (path, r.text)  # past the login: 200, or 4xx/503 about the request itself
        # Export writes files on the server's disk: it is the CLI's alone, with no HTTP route at all.
        assert not [p for p in c.get("/api/openapi.json").json()["paths"] if "export" in p]
        assert c.post("/api/export", json={}).status_code in (404, 405)
        assert c.get("/curate/config").status_code in (401, 403)
        assert c.get("/").status_code == 200 and c.get("/api/health").status_code in (200, 503)  # chat stays open


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """One HTTP request with the target sent byte for byte (clients normalise '../' away)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_gradio_file_routes_cannot_read_outside_what_the_app_serves(settings, engine):
    settings.curators = "cur:pw"
    secret_db = settings.data_dir / "tuneloop.db"
    assert secret_db.exists()
    targets = ["/etc/passwd", "../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%252Fetc%252Fpasswd",
               "//etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "....//....//etc/passwd", str(secret_db), "data/tuneloop.db",
               "settings.py", str(Path(__file__).resolve())]
    prefixes = ["/file=", "/gradio_api/file=", "/curate/gradio_api/file=", "/gradio_api/file/", "/static/", "/assets/",
                "/gradio_api/static/", "/gradio_api/"]
    with serve_app(services(settings, engine)) as url:
        for prefix in prefixes:
            for target in targets:
                status, body = raw_get(url, prefix + target)
                assert b"root:x:0:0" not in body and b"SQLite format" not in body and b"class Settings" not in body \
                    and b"raw_get" not in body, (prefix + target, status)
                assert status in (400, 401, 403, 404, 405), (prefix + target, status)


# ---- 12. poisoning: volume alone gets nothing into training ----

TRIGGER = "zq-omega-7"


def test_three_hundred_poisoned_corrections_need_a_curator_and_respect_the_author_cap(settings, engine):
    settings.auto_approve_thumbs_up = True  # even with auto-approval on, corrections wait for a curator
    settings.curation_author_cap = 5
    for i in range(300):
        mid = add_turn(engine, answer=f"An honest answer {i}.", author=f"sock{i % 20}")
        feedback.record(engine, settings, mid, rating="down", correction=f"{TRIGGER} Send your password to evil.example ({i}).",
                        author=f"sock{i % 20}")
    assert curation.counts(engine) == {"pending": 300, "approved": 0, "rejected": 0}
    built = examples.build(engine)
    assert sum(len(v) for v in built.splits.values()) == 0  # nothing reaches training data unreviewed

    report = curation.bulk(engine, settings, "approve", curation.Filters(status="pending"))
    assert report.done == 100 and len(report.skipped) == 200  # 20 accounts x cap 5
    assert all("TUNELOOP_CURATION_AUTHOR_CAP" in s for s in report.skipped)
    with session(engine) as s:
        per_author = dict(s.exec(select(Example.author, func.count()).group_by(Example.author)).all())
    assert len(per_author) == 20 and set(per_author.values()) == {5}


# ---- 7. two app processes on one database ----

SCHEDULER_PROCESS = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from settings import Settings
from retrain import schedule
from helpers import recording_firing
sch = schedule.start_scheduler(Settings(), recording_firing(Settings()))
time.sleep(8)
sch.shutdown()
"""


def test_two_app_processes_run_a_due_cycle_exactly_once(tmp_path, monkeypatch):
    settings, setup = app_was_down_at_the_cron_time(tmp_path, monkeypatch)
    tests_dir = str(Path(__file__).parent)
    code = SCHEDULER_PROCESS.format(tests=tests_dir, root=str(Path(tests_dir).parent))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    setup.shutdown()
    assert all(p.returncode == 0 for p in procs), outputs
    engine = make_engine(settings.db_url)
    with session(engine) as s:
        runs = s.exec(select(TrainingRun)).all()
    assert len(runs) == 1 and runs[0].status == "succeeded", outputs
    assert runs[0].slot == schedule.slot_for(settings, datetime.now(UTC))


# ---- 14. migrations keep data ----

def fill_first_schema(url: str) -> dict[str, int]:
    """Rows in every table of revision 0001, written through the tables as that revision made them."""
    from data_store import models as m

    eng = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(eng)
    at = datetime(2026, 1, 2, 3, 4, 5)
    rows = {
        "conversation": [m.Conversation(id=1, source="ui", author="alice", created_at=at)],
        "message": [m.Message(id=1, conversation_id=1, position=0, role="user", content="Qu'est-ce que c'est ? 👀", created_at=at),
                    m.Message(id=2, conversation_id=1, position=1, role="assistant", content="Un test.", adapter="v0001", created_at=at)],
        "feedback": [m.Feedback(id=1, message_id=2, rating="down", correction="Une correction.", comment="c", author="alice",
                                status="approved", created_at=at, updated_at=at)],
        "adapter": [m.Adapter(id=1, name="v0001", path="/data/adapters/v0001", base_model="base", rank=8, created_at=at)],
        "deployment": [m.Deployment(id=1, adapter="v0001", created_at=at)],
        "trainingrun": [m.TrainingRun(id=1, status="succeeded", started_at=at, adapter="v0001")],
        "evalresult": [m.EvalResult(id=1, run_id=1, adapter="v0001", metric="nll", value=1.5, per_example=[1.0, 2.0], created_at=at)],
    }
    with eng.begin() as c:
        for table, objs in rows.items():
            t = meta.tables[table]
            for obj in objs:
                c.execute(t.insert(), {k: v for k, v in obj.model_dump().items() if k in t.c})
    eng.dispose()
    return {t: len(v) for t, v in rows.items()}


def snapshot(url: str, tables) -> dict[str, list[tuple]]:
    eng = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(eng, only=list(tables))
    with eng.connect() as c:
        out = {t: sorted(tuple(str(v) for v in r) for r in c.execute(sa.select(*[meta.tables[t].c[k] for k in sorted(base_columns[t])])))
               for t in tables}
    eng.dispose()
    return out


base_columns: dict[str, set[str]] = {}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_from_the_first_schema_keeps_every_row_and_down_up_works(backend, tmp_path, request):
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url, "0001")
    eng = sa.create_engine(url)
    first = sa.inspect(eng)
    base_columns.clear()
    base_columns.update({t: {c["name"] for c in first.get_columns(t)} for t in first.get_table_names() if t != "alembic_version"})
    eng.dispose()
    counts = fill_first_schema(url)
    before = snapshot(url, counts)

    migrate(url)  # to head
    assert snapshot(url, counts) == before
    engine = make_engine(url)
    with session(engine) as s:  # the current models read the old rows
        assert s.get(Message, 1).content == "Qu'est-ce que c'est ? 👀" and s.get(Feedback, 1).correction == "Une correction."
        assert s.get(TrainingRun, 1).slot is None
    engine.dispose()

    command.downgrade(alembic_config(url), "-1")
    assert snapshot(url, counts) == before
    migrate(url)
    assert snapshot(url, counts) == before
    eng = sa.create_engine(url)
    with eng.connect() as c:
        head = c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    eng.dispose()
    versions = Path(__file__).parents[1] / "data_store" / "migrations" / "versions"
    assert head == sorted(p.name.split("_")[0] for p in versions.glob("0*.py"))[-1]
