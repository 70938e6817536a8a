"""The nightly schedule: APScheduler with its SQLAlchemy job store in the service's database.

Exactly-once across processes: every app process may run a scheduler, and all of them fire the
same stored job; the run row's unique slot (the cron time the firing belongs to) lets one claim it
and makes the others skip. A firing missed while the app was down runs once on start-up if it is
within the misfire grace time (hours, not APScheduler's 1-second default); coalesce folds several
missed firings into one. Cron times are UTC.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

from sqlalchemy.engine import Engine
from sqlmodel import select

from data_store.db import make_engine, migrate, session
from data_store.models import TrainingRun, now
from retrain import cycle
from settings import Settings

log = logging.getLogger(__name__)
JOB_ID = "tuneloop-retrain"
MISFIRE_GRACE_S = 6 * 3600
STALE_AFTER = timedelta(hours=12)  # a "running" row this old belongs to a process that died


def trigger(settings: Settings):
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(settings.schedule, timezone=timezone.utc)


def slot_for(settings: Settings, at: datetime) -> str:
    """The latest cron time at or before `at`: the firing a late or duplicate run belongs to."""
    trig = trigger(settings)
    t = trig.get_next_fire_time(None, at - timedelta(days=8))
    latest = None
    while t is not None and t <= at:
        latest = t
        t = trig.get_next_fire_time(t, t + timedelta(seconds=1))
    return (latest or at).isoformat()


def running(engine: Engine) -> Optional[TrainingRun]:
    with session(engine) as s:
        for run in s.exec(select(TrainingRun).where(TrainingRun.status == "running")).all():
            started = run.started_at if run.started_at.tzinfo else run.started_at.replace(tzinfo=timezone.utc)
            if now() - started > STALE_AFTER:
                run.status, run.reason, run.finished_at = "failed", "its process died (no progress for 12 hours)", now()
                s.add(run)
            else:
                return run
    return None


def start_cycle(settings: Settings, engine: Engine, slot: str, runner: Callable[[int], object]) -> Optional[int]:
    """Claim the slot and run the cycle; None when another process has it or a cycle is running."""
    other = running(engine)
    if other is not None:
        log.info("retrain slot %s skipped: run %s is still running", slot, other.id)
        return None
    try:
        run_id = cycle.claim(engine, slot)
    except cycle.SlotTaken:
        log.info("retrain slot %s was already claimed by another process", slot)
        return None
    runner(run_id)
    return run_id


def scheduled_cycle() -> None:
    """The stored job (referenced by name, so it survives restarts): settings come from the
    environment and tuneloop.toml of the process that fires it."""
    from retrain.service import run_by_id

    settings = Settings()
    engine = make_engine(settings.db_url)
    start_cycle(settings, engine, slot_for(settings, datetime.now(timezone.utc)),
                lambda run_id: run_by_id(settings, engine, run_id))


def start_scheduler(settings: Settings, job: str = "retrain.schedule:scheduled_cycle"):
    """Start the scheduler. The stored job keeps its next run time across restarts (replacing it
    would forget a firing missed while the app was down); only a changed cron reschedules it."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    migrate(settings.db_url)
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=settings.db_url, tablename="apscheduler_jobs")},
        executors={"default": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=timezone.utc,
    )
    scheduler.start(paused=True)
    existing = scheduler.get_job(JOB_ID)
    if existing is None:
        scheduler.add_job(job, trigger(settings), id=JOB_ID)
    else:
        # A job stored by an older version keeps its own options: enforce ours.
        scheduler.modify_job(JOB_ID, func=job, coalesce=True, max_instances=1, misfire_grace_time=MISFIRE_GRACE_S)
        if str(existing.trigger) != str(trigger(settings)):
            scheduler.reschedule_job(JOB_ID, trigger=trigger(settings))
    scheduler.resume()
    return scheduler


def start_now(settings: Settings, engine: Engine, runner: Callable[[int], object]) -> int:
    """'Retrain now': a manual slot of its own, run in a background thread; returns the run id."""
    if (other := running(engine)) is not None:
        raise cycle.SlotTaken(f"run {other.id} is still running; wait for it to finish")
    run_id = cycle.claim(engine, f"manual-{datetime.now(timezone.utc).isoformat()}")
    threading.Thread(target=runner, args=(run_id,), name=f"retrain-{run_id}", daemon=True).start()
    return run_id
