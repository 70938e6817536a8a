"""Which versions vLLM holds, kept right off the request path.

vLLM keeps loaded the live version and the one a rollback returns to (adapters.resident), plus any
candidate a cycle loaded for its evaluation. So promotion and rollback only validate the files again
and flip the active row: the version they switch to is already loaded and warm. Afterwards, in one
background thread, the version that dropped out is drained and unloaded, and the new previous version
is loaded when it is not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy.engine import Engine

from serve import adapters
from serve.client import VLLMClient, VLLMError
from settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class Residency:
    def __init__(self, settings: Settings, engine: Engine, client: VLLMClient,
                 drain: Callable[[str, float], bool]):
        self.settings, self.engine, self.client = settings, engine, client
        self.drain = drain  # ChatService.drain: True once no request is on that version
        # Flips hold it; the background holds it only to decide, never across a call to vLLM.
        self._cv = threading.Condition()
        self._busy: set[str] = set()  # versions the background is loading or unloading right now
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="residency")
        self._last: Future | None = None

    def flip(self, target: str | None, change: Callable[[], T]) -> T:
        """Run a promotion or rollback to `target`, then settle in the background what it changed."""
        with self._cv:
            self._cv.wait_for(lambda: target not in self._busy, 300)  # never flip onto a half-unloaded version
            before = set(adapters.resident(self.engine))
            result = change()
            self._last = self._worker.submit(self._settle, before)
        return result

    def refresh(self) -> None:
        """Load in the background whatever of the live and previous versions vLLM lacks (after a restart)."""
        self._last = self._worker.submit(self._settle, set())

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background work queued so far is done (tests, shutdown)."""
        if self._last is not None:
            self._last.result(timeout)

    def _settle(self, before: set[str]) -> None:
        try:
            for name in sorted(before - set(adapters.resident(self.engine))):
                self._retire(name)
            for name in adapters.resident(self.engine):  # what a rollback returns to, loaded now so it is instant
                self._in_flight(name, lambda n=name: adapters.bring_up(self.client, adapters.get(self.engine, n), self.settings))
        except Exception:
            log.exception("settling vLLM's loaded versions failed; promotion and rollback still work, "
                          "a version not loaded is loaded in the call instead")

    def _retire(self, name: str) -> None:
        """Unload a version nothing points at, once no request is on it. The check is made under the
        flip lock and the version marked busy, so no flip can make it active until the unload is done;
        a request counts itself on a version only while it is active, so none can start on it either."""
        while True:
            self.drain(name, 120)  # wait outside the lock: promotions go on meanwhile
            with self._cv:
                if name in adapters.resident(self.engine):
                    return  # promoted again while it drained: keep it
                if not self.drain(name, 0):
                    continue  # a request that read it just before the flip is still running
                self._busy.add(name)
            break
        self._in_flight(name, lambda: self._unload(name), marked=True)

    def _unload(self, name: str) -> None:
        try:
            self.client.unload_adapter(name)
        except VLLMError:
            pass  # already gone (a vLLM restart): nothing to free

    def _in_flight(self, name: str, call: Callable[[], None], marked: bool = False) -> None:
        """Run a vLLM call on `name` outside the lock, with the version marked busy meanwhile."""
        if not marked:
            with self._cv:
                self._busy.add(name)
        try:
            call()
        finally:
            with self._cv:
                self._busy.discard(name)
                self._cv.notify_all()
