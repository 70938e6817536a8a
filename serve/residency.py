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
        self.lock = threading.Lock()  # flips and unloads; never held while waiting on requests
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="residency")
        self._last: Future | None = None

    def flip(self, change: Callable[[], T]) -> T:
        """Run a promotion or rollback, then settle in the background what it changed."""
        with self.lock:
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
            with self.lock:  # a version rollback would return to, loaded now so the rollback is instant
                for name in adapters.resident(self.engine):
                    adapters.bring_up(self.client, adapters.get(self.engine, name), self.settings)
        except Exception:
            log.exception("settling vLLM's loaded versions failed; promotion and rollback still work, "
                          "a version not loaded is loaded in the call instead")

    def _retire(self, name: str) -> None:
        """Unload a version nothing points at, once no request is on it. The check and the unload hold
        the lock, so no flip can make it active again in between; a request counts itself on a version
        only while it is active, so none can start on it either."""
        while True:
            self.drain(name, 120)  # wait outside the lock: promotions go on meanwhile
            with self.lock:
                if name in adapters.resident(self.engine):
                    return  # promoted again while it drained: keep it
                if not self.drain(name, 0):
                    continue  # a request that read it just before the flip is still running
                try:
                    self.client.unload_adapter(name)
                except VLLMError:
                    pass  # already gone (a vLLM restart): nothing to free
                return
