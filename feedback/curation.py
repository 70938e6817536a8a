"""The review queue: feedback becomes a training example only when approved.

Approval turns one feedback record into one Example (with the conversation before the answer as
its prompt) in the same transaction that marks it approved; rejecting or changing the feedback
removes that example again. One author can have at most CURATION_AUTHOR_CAP examples approved
per retrain cycle, so a single account cannot teach the model much.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, delete, func, select

from data_store.db import session
from data_store.models import ANONYMOUS, Example, Feedback, LabelSet, Message, SplitKey, TrainingRun, now
from feedback.fields import UNSET, FeedbackError, check
from retrain import dataset, examples
from settings import Settings

STATUSES = ("pending", "approved", "rejected")


@dataclass
class Filters:
    status: str | None = "pending"
    rating: str | None = None  # up | down | none
    adapter: str | None = None  # adapter name, or "base"
    author: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass
class QueueItem:
    feedback_id: int
    message_id: int
    status: str
    rating: str | None
    author: str
    adapter: str | None
    context: list[dict[str, str]]  # the conversation up to the question
    answer: str  # what the model said
    correction: str | None
    comment: str | None
    updated_at: datetime


def auto_approves(settings: Settings, fb: Feedback) -> bool:
    """Pure policy: trusted authors, and (if enabled) plain thumbs-up, skip the queue. Anonymous
    sessions never do: anyone can open one."""
    if fb.author.startswith(ANONYMOUS):
        return False
    if fb.author in settings.trusted:
        return fb.rating is not None or fb.correction is not None
    return settings.auto_approve_thumbs_up and fb.rating == "up" and fb.correction is None


def _query(f: Filters):
    q = select(Feedback, Message).join(Message, Message.id == Feedback.message_id)
    if f.status:
        if f.status not in STATUSES:
            raise FeedbackError(f"status {f.status!r} is not one of {', '.join(STATUSES)}")
        q = q.where(Feedback.status == f.status)
    if f.rating == "none":
        q = q.where(Feedback.rating.is_(None))
    elif f.rating:
        q = q.where(Feedback.rating == f.rating)
    if f.adapter == "base":
        q = q.where(Message.adapter.is_(None))
    elif f.adapter:
        q = q.where(Message.adapter == f.adapter)
    if f.author:
        q = q.where(Feedback.author == f.author)
    if f.since:
        q = q.where(Feedback.updated_at >= f.since)
    if f.until:
        q = q.where(Feedback.updated_at <= f.until)
    return q


def queue(engine: Engine, f: Filters, limit: int = 200) -> list[QueueItem]:
    with session(engine) as s:
        pairs = s.exec(_query(f).order_by(Feedback.updated_at.desc()).limit(limit)).all()
        return [QueueItem(fb.id, m.id, fb.status, fb.rating, fb.author, m.adapter, _context(s, m), m.content,
                          fb.correction, fb.comment, fb.updated_at) for fb, m in pairs]


def item(engine: Engine, feedback_id: int) -> QueueItem:
    """One feedback item in its conversation (what the queue shows when a curator opens it)."""
    with session(engine) as s:
        found = s.exec(select(Feedback, Message).join(Message, Message.id == Feedback.message_id).where(Feedback.id == feedback_id)).first()
        if found is None:
            raise FeedbackError(f"feedback {feedback_id} does not exist", 404)
        fb, m = found
        return QueueItem(fb.id, m.id, fb.status, fb.rating, fb.author, m.adapter, _context(s, m), m.content,
                         fb.correction, fb.comment, fb.updated_at)


def counts(engine: Engine) -> dict[str, int]:
    with session(engine) as s:
        found = dict(s.exec(select(Feedback.status, func.count()).group_by(Feedback.status)).all())
    return {st: found.get(st, 0) for st in STATUSES}


def _context(s: Session, m: Message) -> list[dict[str, str]]:
    before = s.exec(select(Message).where(Message.conversation_id == m.conversation_id, Message.position < m.position)
                    .order_by(Message.position)).all()
    return [{"role": x.role, "content": x.content} for x in before]


def cycle_start(s: Session) -> datetime:
    """The per-author cap counts approvals since the last retrain cycle began."""
    last = s.exec(select(func.max(TrainingRun.started_at))).one()
    if last is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return last if last.tzinfo else last.replace(tzinfo=UTC)


def approve(engine: Engine, settings: Settings, feedback_id: int, correction: Any = None) -> Example:
    """Approve (optionally with the curator's edited correction) and create its training example."""
    with session(engine) as s:
        fb = s.get(Feedback, feedback_id)
        if fb is None:
            raise FeedbackError(f"feedback {feedback_id} does not exist", 404)
        if correction is not None:
            check(UNSET, correction, UNSET, settings.max_input_chars)
            fb.correction = correction
        return approve_in(s, settings, fb)


def approve_in(s: Session, settings: Settings, fb: Feedback) -> Example:
    """Approval inside the caller's transaction (also used by auto-approval when feedback arrives)."""
    msg = s.get(Message, fb.message_id)
    chosen = fb.correction or (msg.content if fb.rating == "up" else None)
    rejected = msg.content if (fb.correction or fb.rating == "down") else None
    if chosen is None and rejected is None:
        raise FeedbackError(f"feedback {fb.id} has no rating or correction; there is nothing to learn from it")
    # Anyone can open a new anonymous session, so all anonymous sessions share one cap.
    anonymous = fb.author.startswith(ANONYMOUS)
    same_author = Example.author.startswith(ANONYMOUS) if anonymous else Example.author == fb.author
    approved = s.exec(select(func.count()).select_from(Example).where(
        Example.source == "feedback", same_author, Example.created_at >= cycle_start(s),
        Example.feedback_id != fb.id)).one()
    if approved >= settings.curation_author_cap:
        who = "anonymous sessions together have" if anonymous else f"author {fb.author!r} already has"
        raise FeedbackError(f"{who} {approved} approved examples this cycle "
                            f"(cap TUNELOOP_CURATION_AUTHOR_CAP={settings.curation_author_cap}); approve after the next cycle")
    if fb.id is not None:  # re-approval replaces the old example (never `IS NULL`: that is every imported one)
        s.exec(delete(Example).where(Example.feedback_id == fb.id))
    prompt = _context(s, msg)
    key = dataset.prompt_key(prompt)
    splits = examples.assign_in(s, settings.split_ratios, {key: prompt}, {key: chosen or rejected})
    for row in splits.new_rows:
        s.add(SplitKey(**row))
    s.flush()
    # An answer that is one of the imported labels makes a classification example: the gate then
    # judges it by accuracy on the label set, not by how likely the label's tokens are.
    label = known_label(s, chosen)
    ex = Example(source="feedback", source_ref=f"feedback:{fb.id}", feedback_id=fb.id,
                 content_hash=dataset.content_hash(prompt, chosen, rejected, None, f"feedback:{fb.id}"),
                 kind="classification" if label else "chat", label=label,
                 prompt=prompt, chosen=label or chosen, rejected=rejected, rating=1 if chosen else -1,
                 author=fb.author, prompt_key=key)
    fb.status = "approved"
    fb.updated_at = now()
    s.add(fb)
    s.add(ex)
    s.flush()
    return ex


def known_label(s: Session, answer: str | None) -> str | None:
    """The declared label this answer is (ignoring case, spaces and punctuation), if any."""
    if not answer or len(answer) > 200:
        return None
    labels = {dataset.key_text(lab): lab for lab in s.exec(select(LabelSet.label)).all()}
    return labels.get(dataset.key_text(answer))


def reject(engine: Engine, feedback_id: int) -> None:
    with session(engine) as s:
        fb = s.get(Feedback, feedback_id)
        if fb is None:
            raise FeedbackError(f"feedback {feedback_id} does not exist", 404)
        withdraw_in(s, fb, "rejected")


def withdraw_in(s: Session, fb: Feedback, status: str) -> None:
    """Move feedback out of 'approved' (rejected, or changed and pending again): drop its example."""
    if fb.id is not None:  # new feedback has no example; `feedback_id == None` would match every imported one
        s.exec(delete(Example).where(Example.feedback_id == fb.id))
    fb.status = status
    fb.updated_at = now()
    s.add(fb)


@dataclass
class BulkReport:
    done: int
    skipped: list[str]


def bulk(engine: Engine, settings: Settings, action: str, f: Filters) -> BulkReport:
    """Approve or reject everything the current filter shows; each item is its own transaction,
    so one capped or empty item does not undo the others."""
    if action not in ("approve", "reject"):
        raise FeedbackError(f"bulk action {action!r}; use approve or reject")
    with session(engine) as s:
        ids = list(s.exec(_query(f).with_only_columns(Feedback.id).order_by(Feedback.id)).all())
    done, skipped = 0, []
    for fid in ids:
        try:
            approve(engine, settings, fid) if action == "approve" else reject(engine, fid)
            done += 1
        except FeedbackError as e:
            skipped.append(f"feedback {fid}: {e}")
    return BulkReport(done, skipped)
