"""One retrain cycle: data -> train (child process) -> evaluate -> gate -> promote or reject.

Every step writes what it knows to the cycle's TrainingRun row, so a crash leaves a failed run
with its log, and the runs page can show what data was used, the loss curves, both versions'
metrics and the decision with its reasons.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, timedelta
from pathlib import Path

import psutil
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import func, select

from data_store.db import session
from data_store.models import Adapter, EvalResult, Example, TrainingRun, now
from retrain import dataset, evaluate, export, gate
from retrain.dataset import Item
from retrain.evaluate import Case, Likelihood, Scorer, summary
from retrain.train import EVENT, TrainSpec
from serve import adapters
from serve.client import VLLMClient
from settings import Settings

Event = Callable[[dict], None]


class SlotTaken(RuntimeError):
    """Another process already runs (or ran) the cycle for this slot."""


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


def new_approved_since_last(engine: Engine, run_id: int) -> int:
    with session(engine) as s:
        last = s.exec(select(func.max(TrainingRun.started_at)).where(
            TrainingRun.status == "succeeded", TrainingRun.id != run_id)).one()
        q = select(func.count()).select_from(Example).where(Example.source == "feedback")
        if last is not None:
            q = q.where(Example.created_at > last)
        return s.exec(q).one()


def to_prompt_completion(items: list[Item]) -> list[dict]:
    """TRL's conversational prompt/completion format: the loss covers the answer only."""
    return [{"prompt": it.prompt, "completion": [{"role": "assistant", "content": it.chosen}]} for it in items if it.chosen]


def label_set(built: export.Built) -> list[str]:
    every = [it for items in built.splits.values() for it in items] + built.probes
    return sorted({it.label for it in every if it.kind == "classification" and it.label})


def cases(items: list[Item], labels: list[str]) -> list[Case]:
    """Evaluation cases; a classification example is answered from the whole dataset's label set."""
    return [Case(it.prompt, it.chosen, labels if it.kind == "classification" else None) for it in items if it.chosen]


def run_cycle(settings: Settings, engine: Engine, client: VLLMClient, base_model: str, base_served: str, run_id: int,
              promote: Callable[[str], None], force: bool = False, on_event: Event = lambda e: None) -> TrainingRun:
    workdir = settings.data_dir / "runs" / str(run_id)
    workdir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []
    try:
        return _cycle(settings, engine, client, base_model, base_served, run_id, promote, force, on_event, workdir, log_lines)
    except Exception as e:
        tail = "\n".join(log_lines[-200:])
        update(engine, run_id, status="failed", reason=f"{type(e).__name__}: {e}", finished_at=now(),
               log=f"{tail}\n{traceback.format_exc()}"[-20000:])
        on_event({"status": "failed", "reason": str(e)})
        with session(engine) as s:
            return s.get(TrainingRun, run_id)


def _skip(engine: Engine, run_id: int, reason: str, on_event: Event) -> TrainingRun:
    update(engine, run_id, status="skipped", reason=reason, finished_at=now())
    on_event({"status": "skipped", "reason": reason})
    with session(engine) as s:
        return s.get(TrainingRun, run_id)


def _cycle(settings, engine, client, base_model, base_served, run_id, promote, force, on_event, workdir, log_lines):
    new = new_approved_since_last(engine, run_id)
    if new < settings.retrain_min_new_examples and not force:
        return _skip(engine, run_id, f"only {new} new approved example(s) since the last cycle "
                                     f"(TUNELOOP_RETRAIN_MIN_NEW_EXAMPLES={settings.retrain_min_new_examples}); approve more, "
                                     "or force one with `tuneloop retrain --now --force`", on_event)
    built = export.build(engine)  # refuses if a test prompt has a twin in train
    train_rows = to_prompt_completion(built.splits["train"])
    labels = label_set(built)
    test = cases(built.splits["test"], labels)
    if len(test) < settings.gate_min_test_examples:
        return _skip(engine, run_id, f"the test split has {len(test)} example(s); the gate needs "
                                     f"{settings.gate_min_test_examples} (TUNELOOP_GATE_MIN_TEST_EXAMPLES)", on_event)
    if not train_rows:
        return _skip(engine, run_id, "the train split has no example with a good answer", on_event)
    (workdir / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows))
    if settings.train.preference_stage != "none":
        pref = export.rows_for(built.splits["train"], settings.train.preference_stage)
        (workdir / "preference.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pref))
    val_rows = to_prompt_completion(built.splits["val"])
    (workdir / "val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in val_rows))
    active = adapters.active(engine)
    used = {**built.report(), "train_rows": len(train_rows), "val_rows": len(val_rows), "test_examples": len(test),
            "new_approved": new, "train_example_ids": [it.id for it in built.splits["train"]],
            "test_example_ids": [it.id for it in built.splits["test"]], "active_before": active}
    update(engine, run_id, dataset=used)
    on_event({"status": "training", "train_rows": len(train_rows)})

    history = _train(settings, base_model, workdir, bool(val_rows), engine, run_id, on_event, log_lines)
    row = adapters.register(engine, settings, base_model, workdir / "out" / "adapter", parent=active)
    name = row.name
    update(engine, run_id, adapter=name, history=history)
    on_event({"status": "evaluating", "adapter": name})
    try:
        return _judge(settings, engine, client, base_served, run_id, promote, on_event, log_lines, built, test, labels,
                      row, active)
    except Exception as e:
        # A candidate the cycle did not finish judging must not linger in vLLM or be promotable later.
        if adapters.active(engine) != name:
            _discard(engine, client, name, f"the cycle failed while judging it: {type(e).__name__}: {e}")
        raise


def _discard(engine: Engine, client: VLLMClient, name: str, reason: str | None = None) -> None:
    with session(engine) as s:
        a = s.exec(select(Adapter).where(Adapter.name == name)).one()
        a.status = "rejected"
        if reason:
            a.metrics = {**(a.metrics or {}), "rejected_because": reason}
        s.add(a)
    try:
        client.unload_adapter(name)
    except Exception:
        pass  # never loaded, or vLLM is down: nothing serves it either way


def _judge(settings, engine, client, base_served, run_id, promote, on_event, log_lines, built, test, labels, row, active):
    """Score candidate and incumbent on the frozen test set, decide with the gate, promote or discard."""
    name = row.name
    adapters.ensure_loaded(client, row)
    scorer = Scorer(client, Likelihood(row.base_model))
    incumbent = active or base_served
    incumbent_dir = adapters.get(engine, active).path if active else None
    cand_scores = scorer.score(name, row.path, test)
    cand_answers = scorer.last_answers
    act_scores = scorer.score(incumbent, incumbent_dir, test)
    act_answers = scorer.last_answers
    # The regression set: planted probes, plus seed data and liked answers held out in val.
    probe_cases = cases(built.probes, labels)
    regression = probe_cases + cases([it for it in built.splits["val"] if it.source == "import" or it.rating > 0 and not it.rejected], labels)
    reg_c = reg_a = None
    probes: list[gate.Probe] = []
    if regression:
        reg_c = evaluate.by_kind(scorer.score(name, row.path, regression), regression, scorer.last_answers)
        reg_c_answers = scorer.last_answers
        reg_a = evaluate.by_kind(scorer.score(incumbent, incumbent_dir, regression), regression, scorer.last_answers)
        reg_a_answers = scorer.last_answers
        probes = [gate.Probe(f"probe {it.id} ({dataset.prompt_text(it.prompt)[:40]!r})", evaluate.match(case, reg_c_answers[i]),
                             evaluate.match(case, reg_a_answers[i]), reg_c_answers[i], reg_a_answers[i])
                  for i, (it, case) in enumerate(zip([p for p in built.probes if p.chosen], probe_cases))]
    cfg = gate.GateConfig(primary=settings.gate_primary_metric, min_examples=settings.gate_min_test_examples,
                          tolerance=settings.gate_tolerance)
    decision = gate.decide_by_kind(evaluate.by_kind(cand_scores, test, cand_answers), evaluate.by_kind(act_scores, test, act_answers),
                                   cfg, reg_c, reg_a, probes)
    with session(engine) as s:
        for version, scores in ((name, cand_scores), (active, act_scores)):
            for metric, values in scores.items():
                s.add(EvalResult(run_id=run_id, adapter=version, metric=metric, value=sum(values) / len(values), per_example=values))
    metrics = {"candidate": summary(cand_scores, test, cand_answers), "active": summary(act_scores, test, act_answers)}
    with session(engine) as s:
        a = s.exec(select(Adapter).where(Adapter.name == name)).one()
        a.metrics = metrics["candidate"]
        s.add(a)
    if decision.promote:
        promote(name)
    else:
        _discard(engine, client, name)
    result = {"promote": decision.promote, "summary": decision.summary(), "reasons": decision.reasons(),
              "metrics": metrics, "candidate": name, "active": incumbent}
    update(engine, run_id, status="succeeded", decision=result, finished_at=now(), log="\n".join(log_lines[-2000:]))
    on_event({"status": "done", "decision": result})
    with session(engine) as s:
        return s.get(TrainingRun, run_id)


def _train(settings: Settings, base_model: str, workdir: Path, has_val: bool, engine: Engine, run_id: int,
           on_event: Event, log_lines: list[str]) -> list[dict]:
    """Run retrain.train in a child process: a crash or OOM there leaves the service untouched."""
    spec = TrainSpec(base_model=base_model, train_file=str(workdir / "train.jsonl"),
                     val_file=str(workdir / "val.jsonl") if has_val else None, out_dir=str(workdir / "out"),
                     preference_file=str(workdir / "preference.jsonl") if settings.train.preference_stage != "none" else None,
                     config=settings.train)
    spec.dump(workdir / "spec.json")
    history: list[dict] = []
    proc = subprocess.Popen([sys.executable, "-m", "retrain.train", str(workdir / "spec.json")], cwd=str(Path(__file__).resolve().parents[1]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_lines.append(f"training pid {proc.pid}")
    update(engine, run_id, log=log_lines[-1])
    for line in proc.stdout:
        line = line.rstrip()
        log_lines.append(line)
        if EVENT in line:
            try:
                event = json.loads(line.split(EVENT, 1)[1])
            except ValueError:
                continue
            if "step" in event or "done" in event:
                history.append(event)
                on_event({"status": "training", **event})
                if len(history) % 5 == 0:
                    update(engine, run_id, history=list(history))
    if proc.wait() != 0:
        raise RuntimeError(f"training exited with code {proc.returncode}; see the run's log")
    return history
