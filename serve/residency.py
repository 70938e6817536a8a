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
from serve.adapters import AdapterError
from serve.client import VLLMClient, VLLMError, VLLMUnavailable
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
        self._closed = threading.Event()

    def flip(self, target: Callable[[], str | None], change: Callable[[], T]) -> T:
        """Run a promotion, rollback or reload onto the version `target()` names (read under the lock, so
        two flips at once cannot aim at a stale one), then settle in the background what it changed."""
        with self._cv:
            if not self._cv.wait_for(lambda: target() not in self._busy, 300):  # never onto a half-unloaded version
                raise AdapterError(f"version {target()!r} is still being loaded or unloaded in vLLM; try again")
            before = set(adapters.resident(self.engine))
            result = change()
            self._last = self._worker.submit(self._settle, before)
        return result

    def retire(self, name: str) -> None:
        """Unload, in the background once its answers are done, a version that stopped serving without a
        flip (a canary that ended without being promoted)."""
        with self._cv:
            self._last = self._worker.submit(self._each, name, self._retire)

    def close(self) -> None:
        """At shutdown: drop queued work and stop waiting on drains (vLLM stops next)."""
        self._closed.set()
        self._worker.shutdown(wait=False, cancel_futures=True)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background work queued so far is done (tests)."""
        if self._last is not None:
            self._last.result(timeout)

    def _settle(self, before: set[str]) -> None:
        try:
            keep = adapters.resident(self.engine)
            held = {m["id"] for m in self.client.models()}
        except Exception:
            log.exception("could not read the deployment log or vLLM's models; its loaded versions are left as they are")
            return
        for name in sorted(before - set(keep)):
            self._each(name, self._retire)
        for name in keep:  # what a rollback returns to, loaded now so that it is instant
            if name not in held:
                self._each(name, self._load)

    def _each(self, name: str, act: Callable[[str], None]) -> None:
        try:
            act(name)
        except Exception:  # one version's failure leaves the others to be settled
            log.exception("settling %s in vLLM failed; promotion and rollback still work (a version vLLM lacks is "
                          "loaded in the call)", name)

    def _load(self, name: str) -> None:
        with self._cv:
            self._busy.add(name)
        self._unmark_after(name, lambda: adapters.bring_up(self.client, adapters.get(self.engine, name), self.settings))

    def _retire(self, name: str) -> None:
        """Unload a version nothing points at, once no request is on it. The check is made under the
        flip lock and the version marked busy, so no flip can make it active until the unload is done;
        a request counts itself on a version only while it is active, so none can start on it either."""
        waited = 0
        while not self._closed.is_set():
            if not self.drain(name, 5):  # wait outside the lock: promotions go on meanwhile
                waited += 5
                if waited % 120 == 0:
                    log.warning("%s still has answers streaming after %d s; it is unloaded when they end", name, waited)
                continue
            with self._cv:
                if name in adapters.resident(self.engine):
                    return  # promoted again while it drained: keep it
                if not self.drain(name, 0):
                    continue  # a request that read it just before the flip is still running
                self._busy.add(name)
            self._unmark_after(name, lambda: self._unload(name))
            return

    def _unload(self, name: str) -> None:
        try:
            self.client.unload_adapter(name)
        except (VLLMError, VLLMUnavailable):
            pass  # already gone (a vLLM restart) or vLLM is down: nothing to free

    def _unmark_after(self, name: str, call: Callable[[], None]) -> None:
        """Run a vLLM call on a version marked busy, outside the lock, then wake flips waiting on it."""
        try:
            call()
        finally:
            with self._cv:
                self._busy.discard(name)
                self._cv.notify_all()
