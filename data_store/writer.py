"""One writer thread that commits queued units of work in groups (group commit).

Every feedback post and chat turn used to be its own write transaction, and on SQLite all of them
queue on the one write lock: under 64 clients most of a post's time was waiting for it. Here a
request hands its unit (a function of a session) to the queue and waits on a future; the thread
takes everything queued (up to MAX_GROUP units), runs it in one transaction and commits once, then
answers every future. A future resolves only after its group's commit, so an acknowledged write is
durable (SQLite's WAL; PostgreSQL works the same, with fewer lock waits to save).

If one unit of a group raises, the group rolls back and each unit runs again alone in its own
transaction, so a bad request gets its own error and never takes its neighbours' writes with it.
Units must therefore only touch the session: no effects outside the database.

A unit may name a `prepare(session, items)` hook with an item: before a group runs, each hook is
called once with the items of its units, so that it can load in one query the rows they will read
(feedback loads the rated messages and their records). Units must still work without it: one that
runs alone, after its group failed, is not prepared.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from data_store.db import session

T = TypeVar("T")
Unit = Callable[[Session], T]
Prepare = Callable[[Session, list[Any]], None]
MAX_GROUP = 256  # bounds one transaction's size and the wait of the last unit in it

@dataclass(slots=True)
class _Queued:
    unit: Unit
    fut: Future
    prepare: Prepare | None
    item: Any


class GroupWriter:
    def __init__(self, engine: Engine, max_group: int = MAX_GROUP):
        self.engine = engine
        self.max_group = max_group
        self.groups = 0  # commits made, and units committed: how well grouping works
        self.units = 0
        self._queue: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, unit: Unit[T], prepare: Prepare | None = None, item: Any = None) -> Future[T]:
        """Queue one unit; its future holds the unit's result once committed, or the unit's error."""
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer is closed: the service is stopping")
            if self._thread is None:  # started on first use, so building Services starts no thread
                self._thread = threading.Thread(target=self._loop, name="tuneloop-writer", daemon=True)
                self._thread.start()
            self._queue.put(_Queued(unit, fut, prepare, item))
        return fut

    def run(self, unit: Unit[T]) -> T:
        """Submit and wait: for callers that are already on a worker thread."""
        return self.submit(unit).result()

    def close(self, timeout: float = 30) -> None:
        """Commit what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            group = [first] if first is not None else []
            stop = first is None
            while not stop and len(group) < self.max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    group.append(item)
            group = [q for q in group if q.fut.set_running_or_notify_cancel()]
            try:
                if group:
                    self._commit(group)
            except BaseException as e:  # noqa: B036 - never leave a caller waiting, and keep the thread alive
                for q in group:
                    if not q.fut.done():
                        q.fut.set_exception(e)
            if stop:
                return

    def _commit(self, group: list[_Queued]) -> None:
        if len(group) == 1:
            self._alone(group[0].unit, group[0].fut)
            return
        try:
            with session(self.engine) as s:
                hooks: dict[Prepare, list[Any]] = {}
                for q in group:
                    if q.prepare is not None:
                        hooks.setdefault(q.prepare, []).append(q.item)
                for prepare, items in hooks.items():
                    prepare(s, items)
                results = [q.unit(s) for q in group]
        except BaseException:  # noqa: B036 - find the one that failed: each alone, in order
            for q in group:
                self._alone(q.unit, q.fut)
            return
        self.groups += 1
        self.units += len(group)
        for q, result in zip(group, results, strict=True):
            q.fut.set_result(result)

    def _alone(self, unit: Unit, fut: Future) -> None:
        for attempt in range(2):
            try:
                with session(self.engine) as s:
                    result = unit(s)
                break
            except IntegrityError as e:
                # Lost a race on a unique key to a writer outside this queue (the curation page, another
                # process): run once more, when the unit sees the other row and updates it instead.
                if attempt:
                    fut.set_exception(e)
                    return
            except BaseException as e:  # noqa: B036 - the caller's future gets every failure, the thread lives on
                fut.set_exception(e)
                return
        self.groups += 1
        self.units += 1
        fut.set_result(result)
