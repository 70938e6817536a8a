"""A canary decided by live feedback: after the offline gate, a new version first serves a share of new
conversations (TUNELOOP_CANARY_SHARE), each conversation keeping the arm it was given, until users'
thumbs decide.

The decision (`decide`) is a pure function over the two arms' counts. It rolls back when the canary's
thumbs-up rate is significantly below control's under a test that stays valid however often it is
looked at (a mixture sequential probability ratio test, below); it completes once both arms have
CANARY_MIN_RATED rated answers without that, or after CANARY_MAX_HOURS. The rest of this module reads
and writes the store: which canary runs, the arm of a conversation, the counts, how a canary ended.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import and_, func, or_, select, update

from data_store.db import session
from data_store.errors import Refused
from data_store.models import Canary, Conversation, Feedback, Message, now

ARMS = ("canary", "control")


class CanaryError(Refused):
    """409: a canary cannot be started or ended as asked."""

    status = 409


@dataclass(frozen=True)
class Arm:
    up: int
    rated: int  # answers rated up or down

    @property
    def rate(self) -> float | None:
        return self.up / self.rated if self.rated else None


@dataclass(frozen=True)
class Decision:
    action: str  # continue | rollback | complete
    reason: str
    numbers: dict[str, Any]


def msprt(canary: Arm, control: Arm, tau2: float = 0.01) -> tuple[float, float]:
    """The always-valid test of Johari, Pekelis and Walsh ("Always Valid Inference", 2017; Optimizely's
    Stats Engine) for a difference of two proportions: a normal mixture N(0, tau2) over the true
    difference, with the difference's variance estimated from the counts. Returns (the observed
    difference canary - control, the likelihood ratio Lambda); rejecting "no difference" when
    Lambda >= 1/alpha keeps the false-alarm rate at alpha under continuous monitoring.
    tau2 = 0.01 puts the mixture's spread at 10 points of thumbs-up rate, the size of change we look for."""
    if not canary.rated or not control.rated:
        return 0.0, 1.0
    # The variance from add-one rates: all-up or all-down small arms would otherwise claim none.
    v = sum(p * (1 - p) / a.rated for a in (canary, control) for p in [(a.up + 1) / (a.rated + 2)])
    diff = canary.up / canary.rated - control.up / control.rated
    return diff, math.sqrt(v / (v + tau2)) * math.exp(tau2 * diff * diff / (2 * v * (v + tau2)))


TEST_FLOOR = 20  # rated answers per arm before the test may roll back: its normal approximation needs some


def decide(canary: Arm, control: Arm, age_s: float, *, alpha: float, min_rated: int, max_age_s: float) -> Decision:
    diff, ratio = msprt(canary, control)
    numbers = {"canary": asdict(canary) | {"rate": canary.rate}, "control": asdict(control) | {"rate": control.rate},
               "difference": round(diff, 4), "likelihood_ratio": round(min(ratio, 1e12), 4), "threshold": round(1 / alpha, 4),
               "alpha": alpha, "min_rated": min_rated, "age_s": round(age_s, 1), "max_age_s": max_age_s}
    if ratio >= 1 / alpha and diff < 0 and min(canary.rated, control.rated) >= TEST_FLOOR:
        return Decision("rollback", f"the canary's thumbs-up rate is significantly lower ({_pct(canary.rate)} of {canary.rated} "
                                    f"vs {_pct(control.rate)} of {control.rated}; likelihood ratio {ratio:.3g} >= {1 / alpha:g})",
                        numbers)
    if canary.rated >= min_rated and control.rated >= min_rated:
        return Decision("complete", f"{canary.rated} and {control.rated} rated answers (at least {min_rated} each) "
                                    "without a significant drop", numbers)
    if age_s >= max_age_s:
        return Decision("complete", f"{age_s / 3600:.1f} h without a significant drop (the limit is {max_age_s / 3600:g} h; "
                                    f"rated {canary.rated} and {control.rated})", numbers)
    return Decision("continue", f"waiting for rated answers ({canary.rated} and {control.rated} of {min_rated} each)", numbers)


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


# ---- the store ----

def running(engine: Engine) -> Canary | None:
    with session(engine) as s:
        return s.exec(select(Canary).where(Canary.status == "running")).first()


def get(engine: Engine, canary_id: int) -> Canary | None:
    with session(engine) as s:
        return s.get(Canary, canary_id)


def latest(engine: Engine, limit: int = 20) -> list[Canary]:
    with session(engine) as s:
        return list(s.exec(select(Canary).order_by(Canary.id.desc()).limit(limit)).all())


def assign(c: Canary, draw: float | None = None) -> str:
    """A new conversation's arm: the canary for `share` of them."""
    return "canary" if (random.random() if draw is None else draw) < c.share else "control"


def arm_of(engine: Engine, conversation_id: int) -> tuple[int | None, str | None]:
    with session(engine) as s:
        conv = s.get(Conversation, conversation_id)
        return (conv.canary_id, conv.arm) if conv else (None, None)


def counts(engine: Engine, c: Canary) -> dict[str, Arm]:
    """Per arm, its conversations rated up or down. A conversation counts once, by the latest thumb on an
    answer its arm's version gave: arms are assigned per conversation, and answers within one are rated
    alike, so counting answers would treat one user's opinion as many and inflate false alarms."""
    with session(engine) as s:
        rows = s.exec(
            select(Conversation.id, Conversation.arm, Feedback.rating)
            .join(Message, Message.conversation_id == Conversation.id)
            .join(Feedback, Feedback.message_id == Message.id)
            .where(Conversation.canary_id == c.id, Feedback.rating.in_(("up", "down")),
                   or_(and_(Conversation.arm == "canary", Message.adapter == c.candidate),
                       and_(Conversation.arm == "control", Message.adapter == c.control) if c.control is not None
                       else and_(Conversation.arm == "control", Message.adapter.is_(None))))
            .order_by(Feedback.updated_at, Feedback.id)).all()
    last = {conv: (arm, rating) for conv, arm, rating in rows}  # ordered by time: the last thumb wins
    return {arm: Arm(sum(v == (arm, "up") for v in last.values()), sum(v[0] == arm for v in last.values())) for arm in ARMS}


def version_rates(engine: Engine) -> list[dict[str, Any]]:
    """Every version's live thumbs-up rate with its count and a 95% Wilson interval (None: the base model)."""
    with session(engine) as s:
        rows = s.exec(select(Message.adapter, Feedback.rating, func.count()).join(Feedback, Feedback.message_id == Message.id)
                      .where(Feedback.rating.in_(("up", "down"))).group_by(Message.adapter, Feedback.rating)).all()
    found: dict[str | None, list[int]] = {}
    for adapter, rating, n in rows:
        found.setdefault(adapter, [0, 0])[0 if rating == "up" else 1] += n
    return [{"version": v, "up": up, "rated": up + down, "rate": up / (up + down), "interval": wilson(up, up + down)}
            for v, (up, down) in found.items()]


def rate_over_time(engine: Engine) -> list[dict[str, Any]]:
    """Per version and hour: the cumulative thumbs-up rate so far, with its 95% interval (for the plot)."""
    with session(engine) as s:
        rows = s.exec(select(Message.adapter, Feedback.rating, Feedback.updated_at).join(Feedback, Feedback.message_id == Message.id)
                      .where(Feedback.rating.in_(("up", "down"))).order_by(Feedback.updated_at)).all()
    seen: dict[str | None, list[int]] = {}
    points: dict[tuple[str | None, datetime], dict[str, Any]] = {}
    for adapter, rating, at in rows:
        up_down = seen.setdefault(adapter, [0, 0])
        up_down[0 if rating == "up" else 1] += 1
        up, rated = up_down[0], sum(up_down)
        hour = at.replace(minute=0, second=0, microsecond=0, tzinfo=at.tzinfo or UTC)
        low, high = wilson(up, rated)
        points[(adapter, hour)] = {"version": adapter, "time": hour, "rate": up / rated, "low": low, "high": high, "rated": rated}
    return list(points.values())


def wilson(up: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = up / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def create(engine: Engine, candidate: str, control: str | None, share: float, run_id: int | None, by: str) -> Canary:
    try:
        with session(engine) as s:
            c = Canary(candidate=candidate, control=control, share=share, run_id=run_id, started_by=by)
            s.add(c)
            s.flush()
            s.refresh(c)
            return c
    except IntegrityError:  # the partial unique index: another canary runs
        raise CanaryError("a canary is already running; complete or stop it first (`tuneloop adapters canary status`)") from None


def save_check(engine: Engine, canary_id: int, decision: Decision) -> None:
    with session(engine) as s:
        c = s.get(Canary, canary_id)
        c.last_check = {"at": now().isoformat(), "action": decision.action, "reason": decision.reason, **decision.numbers}
        s.add(c)


def end(engine: Engine, canary_id: int, status: str, reason: str, numbers: dict[str, Any], by: str) -> Canary | None:
    """Mark a running canary ended, in one conditional write: None if it was not running (another decider won)."""
    at = now()
    decision = {"status": status, "reason": reason, "by": by, "at": at.isoformat(), **numbers}
    with session(engine) as s:
        done = s.execute(update(Canary).where(Canary.id == canary_id, Canary.status == "running")
                      .values(status=status, ended_at=at, decision=decision))
        if done.rowcount != 1:
            return None
    return get(engine, canary_id)


def reopen(engine: Engine, canary_id: int) -> None:
    """Undo a completion whose promotion failed: the canary runs on (unless another one started meanwhile)."""
    with session(engine) as s:
        s.execute(update(Canary).where(Canary.id == canary_id, Canary.status == "completed").values(status="running", ended_at=None))


def describe(engine: Engine) -> list[str]:
    """The running canary (arms with 95% intervals, the last check) and how recent ones ended, as lines of text."""
    c, lines = running(engine), []
    if c is None:
        lines.append("no canary is running")
    else:
        lines.append(f"canary {c.id}: {c.candidate} on {100 * c.share:g}% of new conversations, against "
                     f"{c.control or 'the base model'}, since {c.started_at:%Y-%m-%d %H:%M} UTC (started by {c.started_by})")
        for arm, a in counts(engine, c).items():
            low, high = wilson(a.up, a.rated)
            lines.append(f"  {arm}: {a.up} up of {a.rated} rated = {_pct(a.rate)} (95% {_pct(low)} to {_pct(high)})")
        if c.last_check:
            lines.append(f"  last check {c.last_check['at'][:19]}: {c.last_check['action']}: {c.last_check['reason']}")
    lines += [f"canary {e.id} of {e.candidate}: {e.status} {e.ended_at:%Y-%m-%d %H:%M}: {e.decision.get('reason')}"
              for e in latest(engine, 5) if e.status != "running"]
    return lines


def view(c: Canary) -> dict[str, Any]:
    return c.model_dump(mode="json")
