"""The running service's parts, built once in app.py and handed to the web layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC

from sqlalchemy.engine import Engine

from data_store.models import Canary, now
from data_store.writer import GroupWriter
from retrain import cycle, runs, schedule
from serve import adapters, canary, zero_adapter
from serve.auth import CuratorAuth
from serve.chat import ChatService
from serve.client import VLLMClient
from serve.fleet import Fleet
from serve.identity import Identities
from serve.model import served_name
from serve.residency import Residency
from serve.vllm_server import ExternalWatch, VLLMSupervisor, base_via_zero_adapter
from settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    vllm: VLLMClient | Fleet  # a Fleet where tuneloop spawns vLLM: full fine-tunes get servers of their own
    chat: ChatService
    base_model: str  # what vLLM loaded: a directory or a hub id
    supervisor: VLLMSupervisor | ExternalWatch | None = None
    auth: CuratorAuth | None = None
    identities: Identities | None = None
    residency: Residency | None = None
    started_at: float = field(default_factory=time.time)  # GET /v1/models dates the base model by it

    def __post_init__(self) -> None:
        if self.residency is None:
            self.residency = Residency(self.settings, self.engine, self.vllm, self.chat.drain)
        if self.auth is None:
            self.auth = CuratorAuth(self.settings)
        if self.identities is None:
            self.identities = Identities(self.settings, self.engine, self.auth)

    @property
    def writer(self) -> GroupWriter:
        """The one group-commit writer, shared by chat turns and feedback."""
        return self.chat.writer

    # One step each: the version switched to is already loaded; draining and unloading follow in the background.
    def promote(self, name: str) -> None:
        self._no_canary("promote")
        self._promote(name)

    def _promote(self, name: str) -> None:
        self.residency.flip(lambda: name, lambda: adapters.promote(self.engine, self.vllm, self.settings, name))

    def _no_canary(self, what: str) -> None:
        # The canary's control is the version serving the rest: changing it by hand would judge the canary against
        # answers it does not count, and its end would undo the change.
        if (running := canary.running(self.engine)) is not None:
            raise canary.CanaryError(f"canary {running.id} of {running.candidate} is running; stop or complete it before you "
                                     f"{what} (`tuneloop adapters canary stop`)")

    def rollback(self) -> str | None:
        self._no_canary("roll back")
        return self.residency.flip(lambda: adapters.previous(self.engine),
                                   lambda: adapters.rollback(self.engine, self.vllm, self.settings))

    def deploy(self, name: str) -> str:
        """A version the gate passed: a canary on CANARY_SHARE of new conversations, or promoted at once."""
        if self.settings.canary_share > 0:
            self.start_canary(name, self.settings.canary_share, by="cycle", run_id=runs.running_id(self.engine))
            return "canary"
        self.promote(name)
        return "promoted"

    # ---- the canary (serve/canary.py decides; these act) ----

    def start_canary(self, name: str, share: float, by: str, run_id: int | None = None) -> Canary:
        if not 0 < share < 1:
            raise canary.CanaryError(f"canary share {share}: use a share of new conversations above 0 and below 1", 400)
        row = adapters.get(self.engine, name)
        if row.status == "rejected":
            raise adapters.AdapterError(f"adapter {name!r} was rejected; start a canary of another version")
        active = adapters.active(self.engine)
        if name == active:
            raise canary.CanaryError(f"{name!r} already serves every conversation")
        adapters.bring_up(self.vllm, row, self.settings)  # a cycle's candidate is loaded already: no request then
        return canary.create(self.engine, name, active, share, run_id, by)

    def check_canary(self) -> canary.Decision | None:
        """One look at the running canary (the scheduler's job, every CANARY_CHECK_S): stored, and acted on."""
        c = canary.running(self.engine)
        if c is None:
            return None
        s = self.settings
        arms = canary.counts(self.engine, c)
        age = (now() - (c.started_at if c.started_at.tzinfo else c.started_at.replace(tzinfo=UTC))).total_seconds()
        d = canary.decide(arms["canary"], arms["control"], age, alpha=s.canary_alpha, min_rated=s.canary_min_rated,
                          max_age_s=s.canary_max_hours * 3600)
        canary.save_check(self.engine, c.id, d)
        if d.action != "continue":
            self._end_canary(c, "completed" if d.action == "complete" else "rolled_back", d.reason, d.numbers, "automatic")
        return d

    def end_canary(self, how: str, by: str) -> Canary:
        """By hand: `complete` promotes the canary now, `stop` sends everyone back to the version serving the rest."""
        c = canary.running(self.engine)
        if c is None:
            raise canary.CanaryError("no canary is running")
        arms = canary.counts(self.engine, c)
        numbers = {"canary": vars(arms["canary"]), "control": vars(arms["control"])}
        return self._end_canary(c, "completed" if how == "complete" else "stopped", f"{how} by {by}", numbers, by)

    def _end_canary(self, c: Canary, status: str, reason: str, numbers: dict, by: str) -> Canary:
        # Claimed first, in one conditional write: of two deciders at once (two app processes' checks, a check
        # and a curator) one ends it. A promotion that fails hands it back to running.
        ended = canary.end(self.engine, c.id, status, reason, numbers, by)
        if ended is None:
            raise canary.CanaryError(f"canary {c.id} already ended")
        if status == "completed":
            try:
                self._promote(c.candidate)
            except Exception:
                canary.reopen(self.engine, c.id)
                raise
        if status == "rolled_back":
            adapters.mark_rejected(self.engine, c.candidate, f"canary rolled back: {reason}")
        if status != "completed":
            self.residency.retire(c.candidate)
        log.warning("canary %s of %s %s: %s", c.id, c.candidate, status, reason)
        return ended

    def cycle_deps(self, on_event: cycle.Event = lambda e: None) -> cycle.Deps:
        """A cycle's dependencies: this service's vLLM and store, and what it does with a passed version."""
        return cycle.Deps(self.settings, self.engine, self.vllm, self.base_model,
                          zero_adapter.ensure(self.vllm, self.settings, self.base_model), self.deploy, on_event)

    def run_cycle(self, run_id: int, force: bool = False, on_event: cycle.Event = lambda e: None):
        """One retrain cycle for a claimed run, promoting through this service."""
        return cycle.run_cycle(self.cycle_deps(on_event), run_id, force=force)

    def retrain_now(self, force: bool = False) -> int:
        """'Retrain now' (API, Runs tab): raises runs.CycleRunning while another cycle runs."""
        return schedule.start_now(self.engine, lambda run_id: self.run_cycle(run_id, force))

    def start_scheduler(self):
        """The nightly job, fired in this process through this object, with the settings it started with.
        First, runs left `running` by a process that died are marked failed so they block nothing."""
        for run_id in runs.recover(self.engine):
            log.warning("run %s was left running by a process that is gone: marked failed", run_id)
        scheduler = schedule.start_scheduler(self.settings, schedule.firing(self.settings, self.engine, self.run_cycle))
        schedule.every(scheduler, "canary-check", self.settings.canary_check_s, self._check_canary_logged)
        return scheduler

    def _check_canary_logged(self) -> None:
        try:
            self.check_canary()
        except Exception:  # the next check tries again; a failed promotion leaves the canary running
            log.exception("checking the canary failed")

    def must_hold(self) -> set[str]:
        """What vLLM must hold to serve: the active version, a running canary's, and the zero adapter where base
        traffic uses it."""
        active, running = adapters.active(self.engine), canary.running(self.engine)
        return ({active} - {None}) | ({running.candidate} if running else set()) | \
            ({zero_adapter.NAME} if base_via_zero_adapter(self.settings) else set())

    def watch_external(self) -> ExternalWatch:
        """vllm_mode=external: load what vLLM must hold now and again whenever it comes back without it."""
        watch = ExternalWatch(self.vllm.models, self.must_hold, self.reload_active, self.settings.vllm_watch_s)
        self.supervisor = watch
        watch.start()
        return watch

    def reload_active(self) -> str | None:
        """After vLLM (re)starts: the zero adapter, if base traffic uses one, then the active version."""
        zero_adapter.ensure(self.vllm, self.settings, self.base_model)
        # Through a flip, so it never races the background on the same version; its settle loads the previous one.
        active = self.residency.flip(lambda: adapters.active(self.engine),
                                     lambda: adapters.reload_active(self.engine, self.vllm, self.settings))
        if (running := canary.running(self.engine)) is not None:  # its arm's conversations need it too
            adapters.bring_up(self.vllm, adapters.get(self.engine, running.candidate), self.settings)
        return active


    def close(self) -> None:
        """At shutdown: commit what is queued, drop queued loads and unloads (moot once vLLM stops), stop vLLM."""
        self.writer.close()
        self.residency.close()
        if self.supervisor:
            self.supervisor.stop()
        if isinstance(self.vllm, Fleet):
            self.vllm.close()


def build(settings: Settings, engine: Engine, client: VLLMClient | Fleet, base_model: str) -> Services:
    if settings.vllm_mode == "spawn" and not isinstance(client, Fleet):
        client = Fleet(settings, client)
    chat = ChatService(settings, engine, client, served_name(settings), zero_adapter.route(settings))
    return Services(settings, engine, client, chat, base_model)
