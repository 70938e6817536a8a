"""The running service's parts, built once in app.py and handed to the web layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from data_store.writer import GroupWriter
from retrain import cycle, runs, schedule
from serve import adapters, zero_adapter
from serve.auth import CuratorAuth
from serve.chat import ChatService
from serve.client import VLLMClient
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
    vllm: VLLMClient
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
        self.residency.flip(lambda: name, lambda: adapters.promote(self.engine, self.vllm, self.settings, name))

    def rollback(self) -> str | None:
        return self.residency.flip(lambda: next(iter(adapters.resident(self.engine)[1:]), None),
                                   lambda: adapters.rollback(self.engine, self.vllm, self.settings))

    def cycle_deps(self, on_event: cycle.Event = lambda e: None) -> cycle.Deps:
        """A cycle's dependencies: this service's vLLM and store, and its one-step promotion."""
        return cycle.Deps(self.settings, self.engine, self.vllm, self.base_model,
                          zero_adapter.ensure(self.vllm, self.settings, self.base_model), self.promote, on_event)

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
        return schedule.start_scheduler(self.settings, schedule.firing(self.settings, self.engine, self.run_cycle))

    def must_hold(self) -> set[str]:
        """What vLLM must hold to serve: the active version, and the zero adapter where base traffic uses it."""
        active = adapters.active(self.engine)
        return ({active} if active else set()) | ({zero_adapter.NAME} if base_via_zero_adapter(self.settings) else set())

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
        return self.residency.flip(lambda: adapters.active(self.engine),
                                   lambda: adapters.reload_active(self.engine, self.vllm, self.settings))


def build(settings: Settings, engine: Engine, client: VLLMClient, base_model: str) -> Services:
    chat = ChatService(settings, engine, client, served_name(settings), zero_adapter.route(settings))
    return Services(settings, engine, client, chat, base_model)
