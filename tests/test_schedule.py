"""The schedule: two scheduler instances on one database run a due cycle exactly once, and a firing
missed while the app was down still runs once."""

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import select

from data_store.db import make_engine, session
from data_store.models import TrainingRun
from retrain import cycle, schedule
from settings import Settings


def fire():
    """The job under test: the real slot claim, with a cycle that only records it ran."""
    settings = Settings()
    engine = make_engine(settings.db_url)
    schedule.start_cycle(settings, engine, schedule.slot_for(settings, datetime.now(timezone.utc)),
                         lambda run_id: cycle.update(engine, run_id, status="succeeded"))


def test_slot_is_the_latest_cron_time():
    s = Settings(schedule="0 2 * * *")
    at = datetime(2026, 11, 24, 2, 30, tzinfo=timezone.utc)
    assert schedule.slot_for(s, at) == "2026-11-24T02:00:00+00:00"
    assert schedule.slot_for(s, at - timedelta(hours=1)) == "2026-11-23T02:00:00+00:00"


def app_was_down_at_the_cron_time(tmp_path, monkeypatch):
    """A store holding a job that fell due 30 minutes ago; returns the settings and a paused
    scheduler that keeps it stored and unfired (a shutdown now would consume the firing)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    from data_store.db import migrate

    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNELOOP_SCHEDULE", f"{(datetime.now(timezone.utc) - timedelta(minutes=30)).minute} * * * *")
    settings = Settings()
    migrate(settings.db_url)
    setup = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(url=settings.db_url, tablename="apscheduler_jobs")}, timezone=timezone.utc)
    setup.add_job("test_schedule:fire", schedule.trigger(settings), id=schedule.JOB_ID,
                  next_run_time=datetime.now(timezone.utc) - timedelta(minutes=30))
    setup.start(paused=True)
    return settings, setup


@pytest.mark.faults
def test_two_schedulers_missed_firing_runs_exactly_once(tmp_path, monkeypatch):
    settings, setup = app_was_down_at_the_cron_time(tmp_path, monkeypatch)
    schedulers = [schedule.start_scheduler(settings, job="test_schedule:fire") for _ in range(2)]
    engine = make_engine(settings.db_url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with session(engine) as s:
            runs = s.exec(select(TrainingRun)).all()
        if runs and all(r.status != "running" for r in runs):
            break
        time.sleep(0.2)
    time.sleep(1.5)  # give a second (wrong) firing time to show up
    for sch in schedulers:
        sch.shutdown()
    setup.shutdown()
    with session(engine) as s:
        runs = s.exec(select(TrainingRun)).all()
    assert len(runs) == 1 and runs[0].status == "succeeded"
    assert runs[0].slot == schedule.slot_for(settings, datetime.now(timezone.utc))


def test_retrain_now_refuses_while_a_cycle_runs(engine, settings):
    rid = cycle.claim(engine, "manual-1")
    import pytest

    with pytest.raises(cycle.SlotTaken, match=f"run {rid} is still running"):
        schedule.start_now(settings, engine, lambda r: None)
