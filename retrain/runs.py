"""The TrainingRun rows: claim one per slot, update it as a cycle goes, recover dead ones, read them.

The database admits one running row (a partial unique index) and one row per slot, so two
claimants, in one process or two, make one run. A running row whose process is gone is marked
failed, so it blocks nothing.
"""

from __future__ import annotations

import socket
from datetime import UTC, timedelta
from typing import Any

import psutil
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from data_store.db import session
from data_store.errors import Refused
from data_store.models import TrainingRun, now


class SlotTaken(Refused):
    """409: another process already runs (or ran) the cycle for this slot."""

    status = 409

    def __init__(self, what: str):
        super().__init__(f"a cycle is already running: {what}")


class CycleRunning(SlotTaken):
    """Another cycle is running on this database: at most one runs at a time."""

    def __init__(self, run: TrainingRun):
        super().__init__(f"run {run.id} is still running (started {run.started_at:%Y-%m-%d %H:%M} UTC); wait for it to finish")
        self.run_id = run.id


STALE_AFTER = timedelta(hours=12)  # a running row of another host, or of an old version, this old is dead
STOPPED = "the service stopped during the cycle"


def this_process() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.0f}"


def _alive(run: TrainingRun) -> bool:
    """Whether the process that claimed a running row still runs. A pid is compared with its start time,
    so a recycled pid is not mistaken for the owner; another host's rows can only age out."""
    host, pid, created = (run.owner or "::").rsplit(":", 2)
    if run.owner and host == socket.gethostname():
        try:
            return f"{psutil.Process(int(pid)).create_time():.0f}" == created
        except (psutil.NoSuchProcess, ValueError):
            return False
    started = run.started_at if run.started_at.tzinfo else run.started_at.replace(tzinfo=UTC)
    return now() - started <= STALE_AFTER


def running_id(engine: Engine) -> int | None:
    """The cycle running now (the database admits one), if any."""
    with session(engine) as s:
        return s.exec(select(TrainingRun.id).where(TrainingRun.status == "running")).first()


def recover(engine: Engine) -> list[int]:
    """Mark running rows whose process is gone failed, so they no longer block the next cycle."""
    failed = []
    with session(engine) as s:
        for run in s.exec(select(TrainingRun).where(TrainingRun.status == "running")).all():
            if not _alive(run):
                run.status, run.finished_at = "failed", now()
                run.reason = f"{STOPPED} (process {run.owner or 'of an older version'} is gone)"
                s.add(run)
                failed.append(run.id)
    return failed


def running(engine: Engine) -> TrainingRun | None:
    recover(engine)
    with session(engine) as s:
        return s.exec(select(TrainingRun).where(TrainingRun.status == "running")).first()


def claim(engine: Engine, slot: str) -> int:
    """Create the running row for a slot. The database admits one running row (a partial unique index)
    and one row per slot, so two claimants, in one process or two, make one run; the loser learns why."""
    for _ in range(2):  # a second try after recovering a dead owner's row
        try:
            with session(engine) as s:
                run = TrainingRun(slot=slot, status="running", owner=this_process())
                s.add(run)
                s.flush()
                return run.id
        except IntegrityError:
            pass
        with session(engine) as s:
            if s.exec(select(TrainingRun.id).where(TrainingRun.slot == slot)).first() is not None:
                raise SlotTaken(slot)
        if (other := running(engine)) is not None:
            raise CycleRunning(other)
    raise SlotTaken(slot)


def update(engine: Engine, run_id: int, **fields) -> None:
    with session(engine) as s:
        run = s.get(TrainingRun, run_id)
        for k, v in fields.items():
            setattr(run, k, v)
        s.add(run)


def _view(run: TrainingRun, full: bool) -> dict[str, Any]:
    out = {"id": run.id, "slot": run.slot, "status": run.status, "reason": run.reason, "adapter": run.adapter,
           "started_at": run.started_at.isoformat(), "finished_at": run.finished_at.isoformat() if run.finished_at else None,
           "promoted": (run.decision or {}).get("promote"), "deployed": (run.decision or {}).get("deployed"),
           "summary": (run.decision or {}).get("summary")}
    if full:
        data = dict(run.dataset or {})
        data.pop("train_example_ids", None)
        out.update(dataset=data, history=run.history, decision=run.decision, log=(run.log or "")[-4000:])
    return out


def list_runs(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    with session(engine) as s:
        return [_view(r, False) for r in s.exec(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)).all()]


def get_run(engine: Engine, run_id: int) -> dict[str, Any] | None:
    with session(engine) as s:
        run = s.get(TrainingRun, run_id)
        return _view(run, True) if run else None
