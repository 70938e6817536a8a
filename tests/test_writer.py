"""The group-commit writer: many concurrent writers, every acknowledged row stored, a bad unit alone refused."""

import threading

import pytest
from helpers import add_turn, count
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from data_store.db import make_engine, migrate, session
from data_store.models import Conversation, Feedback, Message
from data_store.writer import GroupWriter
from feedback import record as feedback
from feedback.fields import FeedbackError
from serve.chat import ChatService


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, settings):
    url = settings.db_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url)
    engine = make_engine(url)
    yield settings, engine
    engine.dispose()


def test_concurrent_feedback_is_grouped_and_every_row_stored(store):
    settings, engine = store
    mids = [add_turn(engine, author=f"user{i % 8}") for i in range(400)]
    writer = GroupWriter(engine)
    start = threading.Barrier(32)
    errors: list[BaseException] = []

    def client(k: int) -> None:
        start.wait()
        for i in range(k, len(mids), 32):
            try:
                fb = feedback.submit(writer, settings, mids[i], rating="down", correction=f"better {i}",
                                     author=f"user{i % 8}").result()
                assert fb.id is not None and fb.correction == f"better {i}"  # acknowledged = committed, with its id
            except BaseException as e:  # noqa: B036
                errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert errors == []
    assert count(engine, Feedback) == 400
    assert writer.units == 400
    assert writer.groups < 400  # concurrent posts shared commits


def test_a_refused_unit_fails_alone_and_its_group_is_kept(store):
    settings, engine = store
    mine = [add_turn(engine, author="alice") for _ in range(20)]
    bobs = add_turn(engine, author="bob")
    writer = GroupWriter(engine)
    hold = threading.Event()
    blocker = writer.submit(lambda s: hold.wait(10))  # the thread waits, so everything below queues into one group
    futures = [feedback.submit(writer, settings, m, rating="up", author="alice") for m in mine[:10]]
    stolen = feedback.submit(writer, settings, bobs, rating="down", author="alice")  # not alice's answer
    futures += [feedback.submit(writer, settings, m, rating="up", author="alice") for m in mine[10:]]
    hold.set()
    blocker.result()
    assert all(f.result().rating == "up" for f in futures)
    with pytest.raises(FeedbackError) as e:
        stolen.result()
    assert e.value.status == 403
    writer.close()
    assert count(engine, Feedback) == 20
    assert feedback.get(engine, bobs) is None


def test_chat_turns_in_one_group_keep_their_positions(store):
    """Turns of one conversation committed together: positions follow each other, nothing collides."""
    settings, engine = store
    with session(engine) as s:
        conv = Conversation(source="api", author="alice")
        s.add(conv)
        s.flush()
        cid = conv.id
    writer = GroupWriter(engine)
    hold = threading.Event()
    writer.submit(lambda s: hold.wait(10))
    turns = [writer.submit(lambda s, i=i: ChatService._store_in(s, [{"role": "user", "content": f"q{i}"}], f"a{i}", None, {},
                                                                 1.0, cid, "api", "alice")) for i in range(3)]
    hold.set()
    ids = [t.result().message_id for t in turns]
    writer.close()
    with session(engine) as s:
        rows = sorted((m.position, m.role, m.content) for m in s.exec(select(Message).where(Message.conversation_id == cid)))
    assert rows == [(0, "user", "q0"), (1, "assistant", "a0"), (2, "user", "q1"), (3, "assistant", "a1"),
                    (4, "user", "q2"), (5, "assistant", "a2")]
    assert len(set(ids)) == 3


def test_a_closed_writer_refuses_new_work_after_committing_the_queue(store):
    settings, engine = store
    mid = add_turn(engine)
    writer = GroupWriter(engine)
    fut = feedback.submit(writer, settings, mid, rating="up", author="alice")
    writer.close()
    assert fut.result().rating == "up"
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda s: None)


def test_integrity_errors_outside_the_queue_are_retried_once(store):
    _, engine = store
    tries = []

    def unit(s):
        tries.append(1)
        if len(tries) == 1:
            raise IntegrityError("insert", {}, Exception("lost a race"))
        return "ok"

    writer = GroupWriter(engine)
    assert writer.run(unit) == "ok" and len(tries) == 2
    writer.close()


class Boom(BaseException):
    """Not an Exception: the kind that would end a thread that only caught Exception."""


def test_a_unit_raising_base_exception_fails_alone_and_the_writer_lives_on(store):
    settings, engine = store
    mids = [add_turn(engine) for _ in range(5)]
    writer = GroupWriter(engine)
    hold = threading.Event()
    writer.submit(lambda s: hold.wait(10))
    good = [feedback.submit(writer, settings, m, rating="up", author="alice") for m in mids[:4]]

    def boom(s):
        raise Boom()

    bad = writer.submit(boom)
    hold.set()
    assert all(f.result(timeout=30).rating == "up" for f in good)
    with pytest.raises(Boom):
        bad.result(timeout=30)
    assert feedback.submit(writer, settings, mids[4], rating="down", author="alice").result(timeout=30).rating == "down"
    writer.close()
    assert count(engine, Feedback) == 5
