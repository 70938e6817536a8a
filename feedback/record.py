"""Record feedback on an assistant message: one record per message, updated in place.

A second click, a changed mind or an edit updates that record; it never duplicates it.
Any change sends the record back to review (status pending).

The service records through its group-commit writer (`submit`, data_store/writer.py); `record` is
the same change in its own transaction, for scripts and tests.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from data_store.db import session
from data_store.models import Conversation, Feedback, Message
from data_store.writer import GroupWriter
from feedback import curation
from feedback.fields import UNSET, FeedbackError, check
from settings import Settings


def record(engine: Engine, settings: Settings, message_id: int, *, rating: Any = UNSET, correction: Any = UNSET,
           comment: Any = UNSET, author: str) -> Feedback:
    """`author` is the identity the server established (serve/identity.py); it must own the conversation."""
    check(rating, correction, comment, settings.max_input_chars)
    for attempt in range(2):
        try:
            with session(engine) as s:
                return upsert_in(s, settings, message_id, rating, correction, comment, author)
        except IntegrityError:
            if attempt:  # two first clicks raced on the unique message_id: the loser updates
                raise
    raise AssertionError("unreachable")


def submit(writer: GroupWriter, settings: Settings, message_id: int, *, rating: Any = UNSET, correction: Any = UNSET,
           comment: Any = UNSET, author: str) -> Future[Feedback]:
    """The same change queued on the writer: the fields are checked now (a FeedbackError raises here), the
    future resolves once the change is committed, or with the refusal found in the store."""
    check(rating, correction, comment, settings.max_input_chars)
    return writer.submit(lambda s: upsert_in(s, settings, message_id, rating, correction, comment, author),
                         prepare=prepare, item=message_id)


_KNOWN = "tuneloop.feedback"  # Session.info key: what `prepare` loaded for this group


def prepare(s: Session, message_ids: list[int]) -> None:
    """The writer's hook: three queries load every message a group rates, their conversations and their
    existing feedback, instead of three per post. The lists keep the rows alive in the session's
    identity map (which holds them weakly), so each unit's `s.get` finds them without a query."""
    ids = sorted(set(message_ids))
    messages = s.exec(select(Message).where(Message.id.in_(ids))).all()
    conversations = s.exec(select(Conversation).where(
        Conversation.id.in_({m.conversation_id for m in messages}))).all()
    existing: dict[int, Feedback | None] = dict.fromkeys(ids)
    for fb in s.exec(select(Feedback).where(Feedback.message_id.in_(ids))):
        existing[fb.message_id] = fb
    s.info[_KNOWN] = (messages, conversations, existing)


def upsert_in(s: Session, settings: Settings, message_id: int, rating: Any, correction: Any, comment: Any,
              author: str) -> Feedback:
    msg = s.get(Message, message_id)
    conv = s.get(Conversation, msg.conversation_id) if msg is not None else None
    if conv is None or conv.author != author:
        # The same answer whether the message is someone else's or does not exist: ids reveal nothing.
        raise FeedbackError(f"message {message_id} is not in one of your conversations; "
                            "rate and correct answers you were given", status=403)
    if msg.role != "assistant":
        raise FeedbackError(f"message {message_id} is a {msg.role} message; feedback is for assistant answers")
    known = s.info[_KNOWN][2] if _KNOWN in s.info else {}
    fb = known[message_id] if message_id in known else s.exec(
        select(Feedback).where(Feedback.message_id == message_id)).first()
    if fb is None:
        fb = Feedback(message_id=message_id, author=author[:128])
        if _KNOWN in s.info:
            known[message_id] = fb  # a second post on the same message in this group updates this record
    if rating is not UNSET:
        fb.rating = rating
    if correction is not UNSET:
        # Editing back to the original withdraws the correction; the original stays in the message.
        fb.correction = None if correction is None or correction == msg.content else correction
    if comment is not UNSET:
        fb.comment = comment or None
    # Any change goes back to review; an approved example of the old version is withdrawn.
    curation.withdraw_in(s, fb, "pending")
    if curation.auto_approves(settings, fb):
        s.flush()  # the example refers to the record's id; otherwise the group's commit flushes once
        try:
            curation.approve_in(s, settings, fb)
        except FeedbackError:
            pass  # over the author's cap, or nothing to learn: it waits for a curator
    return fb


def get(engine: Engine, message_id: int) -> Feedback | None:
    with session(engine) as s:
        return s.exec(select(Feedback).where(Feedback.message_id == message_id)).first()
