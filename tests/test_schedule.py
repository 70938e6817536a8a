"""The schedule: two scheduler instances on one database run a due cycle exactly once, a firing
missed while the app was down still runs once, at most one cycle runs per database (the database
enforces it), and a cycle whose process died blocks nothing."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import app_was_down_at_the_cron_time, recording_firing
from sqlmodel import select

from data_store.db import make_engine, migrate, session
from data_store.models import TrainingRun
from retrain import runs, schedule
from settings import Settings


def run_rows(engine) -> list[TrainingRun]:
    with session(engine) as s:
        return s.exec(select(TrainingRun).order_by(TrainingRun.id)).all()


def test_slot_is_the_latest_cron_time():
    s = Settings(schedule="0 2 * * *")
    at = datetime(2026, 11, 24, 2, 30, tzinfo=UTC)
    assert schedule.slot_for(s, at) == "2026-11-24T02:00:00+00:00"
    assert schedule.slot_for(s, at - timedelta(hours=1)) == "2026-11-23T02:00:00+00:00"


@pytest.mark.faults
def test_two_schedulers_missed_firing_runs_exactly_once(tmp_path, monkeypatch):
    settings, setup = app_was_down_at_the_cron_time(tmp_path, monkeypatch)
    schedulers = [schedule.start_scheduler(settings, recording_firing(settings)) for _ in range(2)]
    engine = make_engine(settings.db_url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = run_rows(engine)
        if found and all(r.status != "running" for r in found):
            break
        time.sleep(0.2)
    time.sleep(1.5)  # give a second (wrong) firing time to show up
    for sch in schedulers:
        sch.shutdown()
    setup.shutdown()
    found = run_rows(engine)
    assert len(found) == 1 and found[0].status == "succeeded"
    assert found[0].slot == schedule.slot_for(settings, datetime.now(UTC))


def test_retrain_now_refuses_while_a_cycle_runs(engine, settings):
    rid = runs.claim(engine, "manual-1")
    with pytest.raises(runs.CycleRunning, match=f"run {rid} is still running"):
        schedule.start_now(engine, lambda r: None)
    assert [r.id for r in run_rows(engine)] == [rid]  # the refused request left nothing behind


@pytest.mark.faults
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_eight_concurrent_retrain_now_start_exactly_one_cycle(backend, settings, request):
    """Check-then-claim would let several through; the partial unique index on running rows cannot."""
    url = settings.db_url if backend == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url)
    engine = make_engine(url)
    release = threading.Event()
    started, refused = [], []
    barrier = threading.Barrier(8)

    def cycle_in_progress(run_id):
        release.wait(30)
        runs.update(engine, run_id, status="succeeded")

    def press():
        barrier.wait()
        try:
            started.append(schedule.start_now(engine, cycle_in_progress))
        except runs.CycleRunning as e:
            refused.append(str(e))

    threads = [threading.Thread(target=press) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(started) == 1 and len(refused) == 7, (started, refused)
    assert all(f"run {started[0]} is still running" in m for m in refused)
    assert [(r.id, r.status) for r in run_rows(engine)] == [(started[0], "running")]
    release.set()
    wait_until_none_runs(engine)
    assert schedule.start_now(engine, lambda r: runs.update(engine, r, status="succeeded")) > started[0]  # free again
    wait_until_none_runs(engine)
    engine.dispose()


def wait_until_none_runs(engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(r.status == "running" for r in run_rows(engine)) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_cron_firing_during_a_manual_cycle_leaves_a_skipped_row(engine, settings):
    manual = runs.claim(engine, "manual-now")
    assert recording_firing(settings)() is None
    found = run_rows(engine)
    assert [(r.id, r.status) for r in found][0] == (manual, "running")
    skipped = found[1]
    assert skipped.status == "skipped" and f"run {manual} is still running" in skipped.reason
    assert skipped.slot == schedule.slot_for(settings, datetime.now(UTC))
    assert recording_firing(settings)() is None and len(run_rows(engine)) == 2  # the same slot is not recorded twice


HOLDS_A_CYCLE = """
import sys, time
sys.path.insert(0, {root!r})
from data_store.db import make_engine
from retrain import runs
print(runs.claim(make_engine({url!r}), "manual-killed"), flush=True)
time.sleep(600)
"""


@pytest.mark.faults
def test_kill_9_mid_cycle_then_the_next_firing_runs(engine, settings):
    """A process killed while its cycle runs leaves a running row; the next start-up or firing sees that
    its process is gone, marks it failed with the reason, and runs."""
    code = HOLDS_A_CYCLE.format(root=str(Path(__file__).resolve().parents[1]), url=settings.db_url)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    dead = int(proc.stdout.readline())
    with pytest.raises(runs.CycleRunning):  # alive, it holds the database's one running cycle
        schedule.start_now(engine, lambda r: None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert runs.recover(engine) == [dead]  # what `tuneloop serve` does when it starts
    row = next(r for r in run_rows(engine) if r.id == dead)
    assert row.status == "failed" and row.reason.startswith(runs.STOPPED) and row.finished_at is not None

    # Without a restart, the next firing recovers it too.
    proc = subprocess.Popen([sys.executable, "-c", code.replace("manual-killed", "manual-killed-2")], stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    dead2 = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    ran = recording_firing(settings)()
    assert ran is not None and ran > dead2
    statuses = {r.id: r.status for r in run_rows(engine)}
    assert statuses[dead2] == "failed" and statuses[ran] == "succeeded"
