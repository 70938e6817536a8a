"""One retrain cycle, as its steps: build -> write -> train -> register -> evaluate -> decide -> record
-> promote or reject.

Every step writes what it knows to the cycle's TrainingRun row, so a crash leaves a failed run
with its log, and the runs page can show what data was used, the loss curves, both versions'
metrics and the decision with its reasons.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import func, select

from data_store.db import session
from data_store.models import Adapter, EvalResult, Example, TrainingRun, now
from retrain import dataset, evaluate, examples, export, gate
from retrain.evaluate import Case, Scored, Scorer, nll_for
from retrain.runs import update
from retrain.train import EVENT, TrainSpec, launch_command, output_dir
from serve import adapters, canary
from serve.client import VLLMClient
from settings import Settings

log = logging.getLogger(__name__)
Event = Callable[[dict], None]


@dataclass(frozen=True)
class Deps:
    """What a cycle needs from the running service (built by its composition root, serve/services.py)."""
    settings: Settings
    engine: Engine
    client: VLLMClient
    base_model: str  # what training starts from: a directory or a hub id
    base_served: str  # the name vLLM serves the base model under (the zero adapter on CPU)
    # What the service does with a version the gate passed: "promoted" (one step; serve/residency.py drains
    # afterwards) or "canary" (it first serves a share of new conversations: serve/canary.py).
    promote: Callable[[str], str | None]
    on_event: Event = lambda e: None


@dataclass
class Run:
    id: int
    workdir: Path
    log: list[str] = field(default_factory=list)


class Skip(Exception):
    """Nothing to train on this time: the run is recorded as skipped, with this reason."""


@dataclass(frozen=True)
class Data:
    built: examples.Built
    labels: list[str]
    test: list[Case]
    new_approved: int
    active: str | None  # the version serving when the cycle began: judged against, recorded as


@dataclass(frozen=True)
class Files:
    train: Path
    val: Path | None
    preference: Path | None
    manifests: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Judged:
    candidate: Scored
    incumbent: Scored
    regression_candidate: Scored | None
    regression_incumbent: Scored | None
    probes: list[gate.Probe]


def run_cycle(deps: Deps, run_id: int, force: bool = False) -> TrainingRun:
    run = Run(run_id, deps.settings.data_dir / "runs" / str(run_id))
    run.workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = build(deps, run, force)
        files = write(deps, run, data)
        history = train(deps, run, files)
        candidate = register(deps, run, history, data.active)
        try:
            judged = evaluate_both(deps, candidate, data)
            decision = decide(deps.settings, judged)
            incumbent = record(deps, run, candidate, judged, data.active)
            deployed = promote_or_reject(deps, candidate, decision.promote)
        except Exception as e:
            # A candidate the cycle did not finish judging must not linger in vLLM or be promotable later.
            if adapters.active(deps.engine) != candidate.name:
                reject(deps, candidate.name, f"the cycle failed while judging it: {type(e).__name__}: {e}")
            raise
        result = {"promote": decision.promote, "summary": decision.summary(), "reasons": decision.reasons(),
                  "metrics": {"candidate": judged.candidate.summary(), "active": judged.incumbent.summary()},
                  "candidate": candidate.name, "active": incumbent, "deployed": deployed}
        return finish(deps, run, "succeeded", decision=result, log="\n".join(run.log[-2000:]), event={"status": "done", "decision": result})
    except Skip as e:
        return finish(deps, run, "skipped", reason=str(e), event={"status": "skipped", "reason": str(e)})
    except Exception as e:
        tail = "\n".join(run.log[-200:])
        return finish(deps, run, "failed", reason=f"{type(e).__name__}: {e}", event={"status": "failed", "reason": str(e)},
                      log=f"{tail}\n{traceback.format_exc()}"[-20000:])
    finally:
        # A registered version is its own copy, and a cycle never resumes: whatever the outcome, the trainer's
        # output and checkpoints would only fill the disk (a full fine-tune's are over three times the model).
        shutil.rmtree(run.workdir / "out", ignore_errors=True)


def finish(deps: Deps, run: Run, status: str, event: dict, **fields) -> TrainingRun:
    update(deps.engine, run.id, status=status, finished_at=now(), **fields)
    deps.on_event(event)
    with session(deps.engine) as s:
        return s.get(TrainingRun, run.id)


def new_approved_since_last(engine: Engine, run_id: int) -> int:
    with session(engine) as s:
        last = s.exec(select(func.max(TrainingRun.started_at)).where(
            TrainingRun.status == "succeeded", TrainingRun.id != run_id)).one()
        q = select(func.count()).select_from(Example).where(Example.source == "feedback")
        if last is not None:
            q = q.where(Example.created_at > last)
        return s.exec(q).one()


def build(deps: Deps, run: Run, force: bool) -> Data:
    """The deduplicated dataset with its frozen splits (refused if a test prompt has a twin in train)."""
    settings = deps.settings
    if (running := canary.running(deps.engine)) is not None:
        raise Skip(f"canary {running.id} of {running.candidate} is running: a new version waits until live feedback decides it "
                   "(`tuneloop adapters canary status | stop | complete`)")
    new = new_approved_since_last(deps.engine, run.id)
    if new < settings.retrain_min_new_examples and not force:
        raise Skip(f"only {new} new approved example(s) from feedback since the last cycle "
                   f"(TUNELOOP_RETRAIN_MIN_NEW_EXAMPLES={settings.retrain_min_new_examples}; imported examples do not count); "
                   "approve more, or force one with `tuneloop retrain --now --force`")
    built = examples.build(deps.engine)
    labels = evaluate.label_set([it for items in built.splits.values() for it in items] + built.probes)
    test = evaluate.cases(built.splits["test"], labels)
    if len(test) < settings.gate_min_test_examples:
        raise Skip(f"the test split has {len(test)} example(s); the gate needs "
                   f"{settings.gate_min_test_examples} (TUNELOOP_GATE_MIN_TEST_EXAMPLES)")
    if not dataset.rows_for(built.splits["train"], "prompt-completion"):
        raise Skip("the train split has no example with a good answer")
    return Data(built, labels, test, new, adapters.active(deps.engine))


def write(deps: Deps, run: Run, data: Data) -> Files:
    """The training files, each with its manifest, and what data the run uses on its row."""
    stage = deps.settings.train.preference_stage
    out = {"train": export.write(data.built, "prompt-completion", "train", run.workdir / "train.jsonl"),
           "val": export.write(data.built, "prompt-completion", "val", run.workdir / "val.jsonl")}
    if stage != "none":
        out["preference"] = export.write(data.built, stage, "train", run.workdir / "preference.jsonl")
    files = Files(run.workdir / "train.jsonl", run.workdir / "val.jsonl" if out["val"]["rows"] else None,
                  run.workdir / "preference.jsonl" if stage != "none" else None, out)
    used = {**data.built.report(), "train_rows": out["train"]["rows"], "val_rows": out["val"]["rows"],
            "test_examples": len(data.test), "new_approved": data.new_approved,
            "train_example_ids": [it.id for it in data.built.splits["train"]],
            "test_example_ids": [it.id for it in data.built.splits["test"]], "active_before": data.active}
    update(deps.engine, run.id, dataset=used)
    deps.on_event({"status": "training", "train_rows": out["train"]["rows"]})
    return files


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def train(deps: Deps, run: Run, files: Files) -> list[dict]:
    """Run retrain.train in a child process: a crash or OOM there leaves the service untouched."""
    spec = TrainSpec(base_model=deps.base_model, train_file=str(files.train), val_file=str(files.val) if files.val else None,
                     preference_file=str(files.preference) if files.preference else None, out_dir=str(run.workdir / "out"),
                     config=deps.settings.train)
    spec.dump(run.workdir / "spec.json")
    history: list[dict] = []
    s = deps.settings
    if s.train.method == "full":  # refused now, not after the training it would waste
        if not deps.client.blue_green:
            raise adapters.AdapterError("TRAIN__METHOD=full makes a version served by a vLLM of its own, which tuneloop starts only "
                                        "with TUNELOOP_VLLM_MODE=spawn; train LoRA versions (TRAIN__METHOD=lora) for an external vLLM")
        deps.client.check_room("the candidate", deps.base_model)
    command = launch_command(run.workdir / "spec.json", s.accelerate_processes, s.accelerate_config, gpu_count())
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run.log.append(f"training pid {proc.pid}")
    update(deps.engine, run.id, log=run.log[-1])
    for line in proc.stdout:
        line = line.rstrip()
        run.log.append(line)
        if EVENT in line:
            try:
                event = json.loads(line.split(EVENT, 1)[1])
            except ValueError:
                continue
            if "step" in event or "done" in event:
                history.append(event)
                deps.on_event({"status": "training", **event})
                if len(history) % 5 == 0:
                    update(deps.engine, run.id, history=list(history))
    if proc.wait() != 0:
        raise RuntimeError(f"training exited with code {proc.returncode}; see the run's log")
    return history


def register(deps: Deps, run: Run, history: list[dict], parent: str | None) -> Adapter:
    """The trained adapter (or full model) becomes an immutable version, the child of the one it was judged against."""
    row = adapters.register(deps.engine, deps.settings, deps.base_model,
                            output_dir(run.workdir / "out", deps.settings.train.method), parent=parent)
    update(deps.engine, run.id, adapter=row.name, history=history)
    deps.on_event({"status": "evaluating", "adapter": row.name})
    return row


def evaluate_both(deps: Deps, candidate: Adapter, data: Data) -> Judged:
    """Score candidate and incumbent on the frozen test set, and on the regression set: planted probes,
    plus seed data and liked answers held out in val."""
    adapters.ensure_loaded(deps.client, candidate)
    scorer = Scorer(deps.client, nll_for(deps.settings, deps.client, candidate.base_model))
    active = data.active  # the version serving when the cycle began
    incumbent, incumbent_dir = (active, adapters.get(deps.engine, active).path) if active else (deps.base_served, None)
    cand, inc = scorer.score(candidate.name, candidate.path, data.test), scorer.score(incumbent, incumbent_dir, data.test)
    probes = [p for p in data.built.probes if p.chosen]
    liked = [it for it in data.built.splits["val"] if it.source == "import" or it.rating > 0 and not it.rejected]
    regression = evaluate.cases(probes, data.labels) + evaluate.cases(liked, data.labels)
    if not regression:
        return Judged(cand, inc, None, None, [])
    reg_c, reg_a = scorer.score(candidate.name, candidate.path, regression), scorer.score(incumbent, incumbent_dir, regression)
    checks = [gate.Probe(f"probe {it.id} ({dataset.prompt_text(it.prompt)[:40]!r})", evaluate.match(case, reg_c.answers[i]),
                         evaluate.match(case, reg_a.answers[i]), reg_c.answers[i], reg_a.answers[i])
              for i, (it, case) in enumerate(zip(probes, regression, strict=False))]  # probes come first in the regression set
    return Judged(cand, inc, reg_c, reg_a, checks)


def decide(settings: Settings, judged: Judged) -> gate.Decision:
    """The gate's verdict: per task kind on the test set, no regression on the regression set, every probe kept."""
    return gate.decide_by_kind(judged.candidate.by_kind(), judged.incumbent.by_kind(), gate_config(settings),
                               _by_kind(judged.regression_candidate), _by_kind(judged.regression_incumbent), judged.probes)


def _by_kind(scored: Scored | None) -> dict[str, dict[str, list[float]]] | None:
    return scored.by_kind() if scored is not None else None


def gate_config(settings: Settings) -> gate.GateConfig:
    return gate.GateConfig(primary=settings.gate_primary_metric, min_examples=settings.gate_min_test_examples,
                           tolerance=settings.gate_tolerance)


def record(deps: Deps, run: Run, candidate: Adapter, judged: Judged, active: str | None) -> str:
    """Both versions' per-example scores on the run, the candidate's summary on its version; returns the
    incumbent's name."""
    with session(deps.engine) as s:
        for version, scored in ((candidate.name, judged.candidate), (active, judged.incumbent)):
            for metric, values in scored.scores.items():
                s.add(EvalResult(run_id=run.id, adapter=version, metric=metric, value=sum(values) / len(values), per_example=values))
        a = s.exec(select(Adapter).where(Adapter.name == candidate.name)).one()
        a.metrics = judged.candidate.summary()
        s.add(a)
    return active or deps.base_served


def promote_or_reject(deps: Deps, candidate: Adapter, promote: bool) -> str:
    if promote:
        return deps.promote(candidate.name) or "promoted"
    reject(deps, candidate.name)
    return "rejected"


def reject(deps: Deps, name: str, reason: str | None = None) -> None:
    if name in adapters.resident(deps.engine):
        # A curator promoted it by hand while it was judged: it serves now, so it is neither marked nor unloaded.
        log.warning("the gate said no to %s, but it was promoted by hand during the cycle; it stays active", name)
        return
    adapters.mark_rejected(deps.engine, name, reason)
    try:
        deps.client.unload_adapter(name)
    except Exception:
        pass  # never loaded, or vLLM is down: nothing serves it either way
