"""SQLModel tables: conversations, messages, feedback, adapters, deployments, runs, evaluations.

Schema changes go through Alembic (data_store/migrations), never create_all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def now() -> datetime:
    return datetime.now(UTC)


# Authors of this prefix are anonymous sessions (serve/identity.py): anyone can open one.
ANONYMOUS = "anonymous:"


class Conversation(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=16)  # "ui" | "api"
    author: str = Field(default="anonymous", max_length=128)
    created_at: datetime = Field(default_factory=now)
    # Set when it began during a canary (serve/canary.py): the arm it was assigned to for good.
    canary_id: int | None = Field(default=None, foreign_key="canary.id", index=True)
    arm: str | None = Field(default=None, max_length=8)  # canary | control


class Message(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversation.id", index=True)
    position: int  # order inside the conversation
    role: str = Field(max_length=16)  # system | user | assistant
    content: str = Field(sa_column=Column(Text, nullable=False))
    # Which adapter version wrote an assistant message; NULL means the base model.
    adapter: str | None = Field(default=None, max_length=64, index=True)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    created_at: datetime = Field(default_factory=now)


class Feedback(SQLModel, table=True):
    """At most one record per message: a second click or an edit updates it."""

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", unique=True)
    rating: str | None = Field(default=None, max_length=8)  # "up" | "down" | None
    correction: str | None = Field(default=None, sa_column=Column(Text))
    comment: str | None = Field(default=None, sa_column=Column(Text))
    author: str = Field(default="anonymous", max_length=128, index=True)
    status: str = Field(default="pending", max_length=16, index=True)  # pending | approved | rejected
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)


class Adapter(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)  # never reused: vLLM caches by name
    path: str
    base_model: str
    rank: int  # 0 for a full fine-tune
    # lora: loaded into the spawned vLLM at run time; full: every weight, served by a vLLM of its own (serve/fleet.py)
    kind: str = Field(default="lora", max_length=8)
    status: str = Field(default="registered", max_length=16)  # registered | rejected
    parent: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=now)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Deployment(SQLModel, table=True):
    """Append-only log of what serves: the newest row not rolled back is active.

    adapter NULL means the base model serves.
    """

    id: int | None = Field(default=None, primary_key=True)
    adapter: str | None = Field(default=None, foreign_key="adapter.name")
    rolled_back: bool = False
    created_at: datetime = Field(default_factory=now)


class Canary(SQLModel, table=True):
    """A version serving a share of new conversations, until live thumbs decide (serve/canary.py).
    At most one runs per database (migration 0007)."""

    __table_args__ = (Index("uq_canary_one_running", "status", unique=True,
                            sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'")),)

    id: int | None = Field(default=None, primary_key=True)
    candidate: str = Field(max_length=64, foreign_key="adapter.name")
    control: str | None = Field(default=None, max_length=64)  # what served the rest when it began; NULL: base model
    share: float
    status: str = Field(default="running", max_length=16)  # running | completed | rolled_back | stopped
    run_id: int | None = Field(default=None, foreign_key="trainingrun.id")  # the cycle that started it, if one did
    started_by: str = Field(default="cycle", max_length=128)
    last_check: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    decision: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # how it ended, with the numbers
    started_at: datetime = Field(default_factory=now)
    ended_at: datetime | None = None


class TrainingRun(SQLModel, table=True):
    # At most one running cycle per database, whichever process claims it (migration 0005).
    __table_args__ = (Index("uq_trainingrun_one_running", "status", unique=True,
                            sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'")),)

    id: int | None = Field(default=None, primary_key=True)
    # The schedule slot this run is for ("2026-11-24T02:00:00+00:00", or "manual-..."): unique, so
    # two app processes firing the same due job make one run, not two.
    slot: str | None = Field(default=None, max_length=64, unique=True)
    status: str = Field(default="running", max_length=16)  # running | succeeded | failed | skipped
    # "host:pid:start-time" of the process running the cycle, so a restart can tell a dead one.
    owner: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    adapter: str | None = Field(default=None, max_length=64)
    dataset: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    history: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # loss curves
    decision: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    log: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime = Field(default_factory=now)
    finished_at: datetime | None = None


class EvalResult(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("run_id", "adapter", "metric"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="trainingrun.id", index=True)
    adapter: str | None = Field(default=None, max_length=64)  # NULL: base model
    metric: str = Field(max_length=32)
    value: float
    per_example: list[float] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=now)


class SplitKey(SQLModel, table=True):
    """Every prompt ever seen, with its frozen split. Never deleted, and updated only by the explicit
    `tuneloop data resplit` (retrain/resplit.py, which never moves a test prompt into train):
    an example's split does not move, even when the example itself is withdrawn and comes back."""

    key: str = Field(primary_key=True, max_length=40)  # hash of the normalized prompt
    split: str = Field(max_length=8)  # train | val | test
    minhash: bytes  # signature of the prompt, so near-duplicates can inherit the split
    created_at: datetime = Field(default_factory=now, index=True)  # an approval reads the most recent keys


class Example(SQLModel, table=True):
    """One curated training example: from an imported file or from approved feedback."""

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=16)  # import | feedback
    source_ref: str = Field(max_length=300)  # "file.jsonl:12" or "feedback:7"
    feedback_id: int | None = Field(default=None, foreign_key="feedback.id", unique=True)
    content_hash: str = Field(max_length=40, unique=True)  # re-importing the same line adds nothing
    kind: str = Field(default="chat", max_length=16)  # chat | classification
    prompt: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))  # messages before the answer
    chosen: str | None = Field(default=None, sa_column=Column(Text))  # the good answer (or the label)
    rejected: str | None = Field(default=None, sa_column=Column(Text))  # the bad answer it replaces
    label: str | None = Field(default=None, max_length=200)  # classification label
    rating: int = 0  # +1 liked or corrected, -1 disliked, 0 unrated (imports)
    author: str = Field(default="import", max_length=128, index=True)
    prompt_key: str = Field(foreign_key="splitkey.key", index=True, max_length=40)
    created_at: datetime = Field(default_factory=now)


class LabelSet(SQLModel, table=True):
    """The labels of classification data, recorded at import; an unknown label is an error later."""

    label: str = Field(primary_key=True, max_length=200)
    source_ref: str = Field(max_length=300)


class ApiKey(SQLModel, table=True):
    """A key an API client sends as `Authorization: Bearer <key>`; it acts as `owner`. Only its hash
    is stored, so the database does not hold usable keys."""

    id: int | None = Field(default=None, primary_key=True)
    owner: str = Field(max_length=128, index=True)
    label: str = Field(default="", max_length=200)
    key_hash: str = Field(max_length=64, unique=True)
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=now)
    revoked_at: datetime | None = None
