"""Read retrain runs for the API, the CLI and the runs page."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from data_store.db import session
from data_store.models import TrainingRun


def _view(run: TrainingRun, full: bool) -> dict[str, Any]:
    out = {"id": run.id, "slot": run.slot, "status": run.status, "reason": run.reason, "adapter": run.adapter,
           "started_at": run.started_at.isoformat(), "finished_at": run.finished_at.isoformat() if run.finished_at else None,
           "promoted": (run.decision or {}).get("promote"), "summary": (run.decision or {}).get("summary")}
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
