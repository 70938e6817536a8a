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


def test_a_prepared_group_ends_as_the_same_changes_one_by_one(store):
    """A group's feedback is prepared in three queries; repeated posts on one message, an update of an approved
    record and a trusted author's auto-approval end exactly as the same posts committed one at a time."""
    settings, engine = store
    settings.trusted_authors = "trusty"
    posts = lambda mids, trusted: [  # noqa: E731
        (mids[0], dict(rating="up")), (mids[0], dict(correction="Paris.")), (mids[0], dict(rating="down")),
        (mids[1], dict(rating="down", correction="It is Paris.")), (mids[2], dict(rating="up")),
        (trusted, dict(rating="down", correction="Paris, of course.")), (mids[1], dict(comment="thanks")),
    ]

    def outcome(mids, trusted):
        from data_store.models import Example

        order = [*mids, trusted]
        with session(engine) as s:
            rows = {fb.message_id: fb for fb in s.exec(select(Feedback).where(Feedback.message_id.in_(order)))}
            taught = {e.feedback_id for e in s.exec(select(Example).where(Example.source == "feedback"))}
        return ([(order.index(m), f.rating, f.correction, f.comment, f.status) for m, f in sorted(rows.items())],
                [order.index(m) for m, f in sorted(rows.items()) if f.id in taught])

    results = []
    for grouped in (False, True):
        mids = [add_turn(engine, author="alice") for _ in range(3)]
        trusted = add_turn(engine, author="trusty")
        writer = GroupWriter(engine)
        hold = threading.Event()
        if grouped:
            writer.submit(lambda s, hold=hold: hold.wait(10))
        futures = []
        for mid, change in posts(mids, trusted):
            fut = feedback.submit(writer, settings, mid, author="trusty" if mid == trusted else "alice", **change)
            if not grouped:
                fut.result()
            futures.append(fut)
        hold.set()
        assert [f.result(timeout=30).message_id for f in futures] == [m for m, _ in posts(mids, trusted)]
        groups = writer.groups
        writer.close()
        results.append(outcome(mids, trusted))
        if grouped:
            assert groups <= 2  # the seven posts shared one commit (with the blocker, or after it): none ran alone
    assert results[0] == results[1]
    rows, approved = results[1]
    assert rows[0][1:3] == ("down", "Paris.") and rows[3][-1] == "approved" and approved == [3]


def test_prepare_hooks_run_once_per_group_with_every_item(store):
    _, engine = store
    seen: list[list[int]] = []

    def record_items(s, items):
        seen.append(items)

    writer = GroupWriter(engine)
    hold = threading.Event()
    writer.submit(lambda s: hold.wait(10))
    futures = [writer.submit(lambda s, i=i: i * 10, prepare=lambda s, items: seen.append(items), item=i) for i in range(2)]
    futures += [writer.submit(lambda s, i=i: i * 10, prepare=record_items, item=i) for i in range(2, 6)]
    hold.set()
    assert [f.result(timeout=30) for f in futures] == [0, 10, 20, 30, 40, 50]
    writer.close()
    assert sorted(seen) == [[0], [1], [2, 3, 4, 5]]  # once per hook: two lambdas, and one function for four units
