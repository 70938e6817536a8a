import threading

import pytest
from helpers import add_turn
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import func, select

from data_store.db import migrate, session
from data_store.models import Feedback, Message
from feedback import record as feedback
from feedback.fields import FeedbackError


def test_migrations_create_every_table(engine):
    tables = set(inspect(engine).get_table_names())
    assert {"conversation", "message", "feedback", "adapter", "deployment", "trainingrun", "evalresult", "alembic_version"} <= tables


def test_migrate_twice_is_a_no_op(settings, engine):
    mid = add_turn(engine)
    migrate(settings.db_url)
    with session(engine) as s:
        assert s.get(Message, mid) is not None


def test_sqlite_pragmas(engine):
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert c.execute(text("PRAGMA busy_timeout")).scalar() >= 5000


def test_foreign_keys_enforced(engine):
    with pytest.raises(IntegrityError):
        with session(engine) as s:
            s.add(Message(conversation_id=12345, position=0, role="user", content="orphan"))


def count(engine, model) -> int:
    with session(engine) as s:
        return s.exec(select(func.count()).select_from(model)).one()


def test_feedback_updates_one_record(engine, settings):
    mid = add_turn(engine)
    feedback.record(engine, settings, mid, author="alice", rating="up")
    feedback.record(engine, settings, mid, author="alice", rating="up")  # same thumb twice
    feedback.record(engine, settings, mid, author="alice", rating="down")  # changed mind
    feedback.record(engine, settings, mid, author="alice", correction="Paris is the capital of France.")
    feedback.record(engine, settings, mid, author="alice", comment="too terse")
    assert count(engine, Feedback) == 1
    fb = feedback.get(engine, mid)
    assert (fb.rating, fb.correction, fb.comment, fb.status) == ("down", "Paris is the capital of France.", "too terse", "pending")
    with session(engine) as s:
        assert s.get(Message, mid).content == "The capital of France is Paris."  # the original is kept


def test_editing_back_to_original_withdraws_correction(engine, settings):
    mid = add_turn(engine)
    feedback.record(engine, settings, mid, author="alice", correction="Something else")
    feedback.record(engine, settings, mid, author="alice", correction="The capital of France is Paris.")
    assert feedback.get(engine, mid).correction is None


def test_concurrent_first_clicks_make_one_record(engine, settings):
    mid = add_turn(engine)
    errors = []

    def click(r):
        try:
            feedback.record(engine, settings, mid, author="alice", rating=r)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=click, args=("up" if i % 2 else "down",)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert count(engine, Feedback) == 1


@pytest.mark.parametrize("kw,message", [
    ({"rating": "meh"}, "rating"),
    ({"correction": "   "}, "correction is empty"),
    ({"correction": "x" * 20}, "above the limit"),
    ({"comment": 5}, "comment must be text"),
])
def test_bad_feedback_is_rejected_and_nothing_stored(engine, settings, kw, message):
    mid = add_turn(engine)
    settings.max_input_chars = 10
    with pytest.raises(FeedbackError, match=message):
        feedback.record(engine, settings, mid, author="alice", **kw)
    assert count(engine, Feedback) == 0


def test_feedback_on_unknown_or_user_message(engine, settings):
    mid = add_turn(engine)
    with pytest.raises(FeedbackError) as e:
        feedback.record(engine, settings, 999, author="alice", rating="up")
    assert e.value.status == 403
    with pytest.raises(FeedbackError, match="user message"):
        feedback.record(engine, settings, mid - 1, author="alice", rating="up")
