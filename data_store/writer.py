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
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from data_store.db import session

T = TypeVar("T")
Unit = Callable[[Session], T]
MAX_GROUP = 256  # bounds one transaction's size and the wait of the last unit in it

class GroupWriter:
    def __init__(self, engine: Engine, max_group: int = MAX_GROUP):
        self.engine = engine
        self.max_group = max_group
        self.groups = 0  # commits made, and units committed: how well grouping works
        self.units = 0
        self._queue: queue.SimpleQueue[tuple[Unit, Future] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, unit: Unit[T]) -> Future[T]:
        """Queue one unit; its future holds the unit's result once committed, or the unit's error."""
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer is closed: the service is stopping")
            if self._thread is None:  # started on first use, so building Services starts no thread
                self._thread = threading.Thread(target=self._loop, name="tuneloop-writer", daemon=True)
                self._thread.start()
            self._queue.put((unit, fut))
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
            group = [(u, f) for u, f in group if f.set_running_or_notify_cancel()]
            try:
                if group:
                    self._commit(group)
            except BaseException as e:  # noqa: B036 - never leave a caller waiting, and keep the thread alive
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(e)
            if stop:
                return

    def _commit(self, group: list[tuple[Unit, Future]]) -> None:
        if len(group) == 1:
            self._alone(*group[0])
            return
        try:
            with session(self.engine) as s:
                results = [unit(s) for unit, _ in group]
        except BaseException:  # noqa: B036 - find the one that failed: each alone, in order
            for unit, fut in group:
                self._alone(unit, fut)
            return
        self.groups += 1
        self.units += len(group)
        for (_, fut), result in zip(group, results, strict=True):
            fut.set_result(result)

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
