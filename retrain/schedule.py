"""The nightly schedule: APScheduler with its SQLAlchemy job store in the service's database.

Exactly-once across processes: every app process may run a scheduler, and all of them fire the
same stored job; the run row's unique slot (the cron time the firing belongs to) lets one claim it
and makes the others skip. At most one cycle runs per database (a partial unique index on running
rows); a firing that finds one running leaves a skipped row that says which. A firing runs in the
process that fired it, through that service's own composition root: no HTTP call to itself. A
firing missed while the app was down runs once on start-up if it is within the misfire grace time
(hours, not APScheduler's 1-second default); coalesce folds several missed firings into one. Cron
times are UTC.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from data_store.db import migrate, session
from data_store.models import TrainingRun, now
from retrain import runs
from settings import Settings

log = logging.getLogger(__name__)
JOB_ID = "tuneloop-retrain"
JOB = "retrain.schedule:scheduled_cycle"
MISFIRE_GRACE_S = 6 * 3600
# APScheduler's job store keeps the job as a reference by name plus pickled arguments, not the running
# service: the process that starts a scheduler registers here how it runs a firing (its own composition
# root and the settings it started with), under a key stored as the job's argument.
_FIRINGS: dict[str, Callable[[], None]] = {}


def trigger(settings: Settings):
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(settings.schedule, timezone=UTC)


def slot_for(settings: Settings, at: datetime) -> str:
    """The latest cron time at or before `at`: the firing a late or duplicate run belongs to."""
    trig = trigger(settings)
    t = trig.get_next_fire_time(None, at - timedelta(days=8))
    latest = None
    while t is not None and t <= at:
        latest = t
        t = trig.get_next_fire_time(t, t + timedelta(seconds=1))
    return (latest or at).isoformat()


def start_cycle(engine: Engine, slot: str, runner: Callable[[int], object]) -> int | None:
    """Claim the slot and run the cycle; None when another process has the slot or a cycle is running,
    which a row for the slot then says."""
    try:
        run_id = runs.claim(engine, slot)
    except runs.CycleRunning as e:
        log.info("retrain slot %s skipped: %s", slot, e)
        _record_skip(engine, slot, f"skipped: {e}")
        return None
    except runs.SlotTaken:
        log.info("retrain slot %s was already claimed by another process", slot)
        return None
    runner(run_id)
    return run_id


def _record_skip(engine: Engine, slot: str, reason: str) -> None:
    try:
        with session(engine) as s:
            s.add(TrainingRun(slot=slot, status="skipped", reason=reason, finished_at=now()))
    except IntegrityError:
        pass  # another process recorded this slot first


def firing(settings: Settings, engine: Engine, runner: Callable[[int], object]) -> Callable[[], None]:
    """What one scheduled firing does: claim the slot it belongs to and run the cycle in this thread."""
    return lambda: start_cycle(engine, slot_for(settings, datetime.now(UTC)), runner)


def _key(settings: Settings) -> str:
    return hashlib.sha256(settings.db_url.encode()).hexdigest()[:16]  # never the URL: it may hold a password


def scheduled_cycle(key: str | None = None) -> None:
    """The stored job: runs the firing its process registered for this database."""
    fire = _FIRINGS.get(key or "")
    if fire is None:
        log.error("the scheduled retrain fired in a process that registered no service for it (job argument %r); "
                  "nothing ran", key)
        return
    fire()


def start_scheduler(settings: Settings, fire: Callable[[], None], job: str = JOB):
    """Start the scheduler whose firings call `fire`. The stored job keeps its next run time across
    restarts (replacing it would forget a firing missed while the app was down); only a changed cron
    reschedules it."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    migrate(settings.db_url)
    key = _key(settings)
    _FIRINGS[key] = fire
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=settings.db_url, tablename="apscheduler_jobs"), "memory": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(1), "periodic": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=UTC,
    )
    scheduler.start(paused=True)
    existing = scheduler.get_job(JOB_ID)
    if existing is None:
        scheduler.add_job(job, trigger(settings), args=[key], id=JOB_ID)
    else:
        # A job stored by an older version keeps its own options: enforce ours.
        scheduler.modify_job(JOB_ID, func=job, args=[key], coalesce=True, max_instances=1, misfire_grace_time=MISFIRE_GRACE_S)
        if str(existing.trigger) != str(trigger(settings)):
            scheduler.reschedule_job(JOB_ID, trigger=trigger(settings))
    scheduler.resume()
    return scheduler


def every(scheduler, job_id: str, seconds: float, fn: Callable[[], None]) -> None:
    """A periodic job of this process only (kept in memory, on its own thread, so a nightly cycle running in
    the stored job's thread never delays it)."""
    scheduler.add_job(fn, "interval", seconds=seconds, id=job_id, jobstore="memory", executor="periodic",
                      coalesce=True, max_instances=1, replace_existing=True)


def start_now(engine: Engine, runner: Callable[[int], object]) -> int:
    """'Retrain now': a manual slot of its own, run in a background thread; returns the run id.
    Raises runs.CycleRunning when a cycle runs (the database admits one)."""
    run_id = runs.claim(engine, f"manual-{datetime.now(UTC).isoformat()}")
    threading.Thread(target=runner, args=(run_id,), name=f"retrain-{run_id}", daemon=True).start()
    return run_id
