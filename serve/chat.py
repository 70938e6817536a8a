"""One chat turn: pick the active version, stream from vLLM, store the turn with its version.

Shared by the Gradio UI and the OpenAI-compatible API, so both produce feedback-able messages.
A turn is stored in one transaction after the answer completes: a failed turn stores nothing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from data_store.db import session
from data_store.errors import Refused
from data_store.models import Conversation, Feedback, Message
from data_store.text import unstorable
from data_store.writer import GroupWriter
from serve import adapters, canary
from serve.client import VLLMClient
from settings import Settings

ROLES = ("system", "user", "assistant")


class ChatInputError(Refused):
    """400: the request itself is wrong."""


@dataclass
class Turn:
    """The stored result of one answered turn."""

    conversation_id: int
    message_id: int
    adapter: str | None
    content: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float


def check_messages(messages: list[dict[str, str]], max_chars: int) -> None:
    """Pure validation of a chat history; raises ChatInputError naming the problem."""
    if not messages:
        raise ChatInputError("messages is empty; send at least one user message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ChatInputError(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ChatInputError(f"messages[{i}].content must be text")
        if len(content) > max_chars:
            raise ChatInputError(
                f"messages[{i}].content has {len(content)} characters, above the limit of {max_chars}; shorten it or raise "
                "TUNELOOP_MAX_INPUT_CHARS"
            )
        if problem := unstorable(content):
            raise ChatInputError(f"messages[{i}].content {problem}")
    if messages[-1]["role"] != "user":
        raise ChatInputError("the last message must have role 'user'; it is what the model answers")
    if not messages[-1]["content"].strip():
        raise ChatInputError("the last user message is empty; type something to ask")


class ChatService:
    def __init__(self, settings: Settings, engine: Engine, client: VLLMClient, base_name: str,
                 base_route: str | None = None):
        self.settings = settings
        self.engine = engine
        self.writer = GroupWriter(engine)  # turns are committed in groups with feedback (Services.writer)
        self.client = client
        self.base_name = base_name  # what users see and the API reports
        self.base_route = base_route or base_name  # what vLLM is asked for (see serve/zero_adapter.py)
        self._inflight: Counter[str] = Counter()
        self._cv = threading.Condition()

    # A version is unloaded only once requests already on it are done (serve/residency.py).
    def drain(self, model: str, timeout: float = 120) -> bool:
        """Wait until no request is on `model`; False if some still are after `timeout` seconds."""
        with self._cv:
            return self._cv.wait_for(lambda: self._inflight[model] == 0, timeout)

    def active(self) -> str | None:
        return adapters.active(self.engine)

    def pick(self, model: str | None, curator: bool) -> str | None:
        """The version a request's `model` pins, by the name GET /v1/models lists: the base model's or a
        registered version's, for curators only (side-by-side comparison), loaded into vLLM if it is not.
        None, the active version's own name, a running canary's (a client sending back the `model` it was
        answered by), or any other name (an OpenAI client's default) pins nothing: the active version, or
        the conversation's canary arm, answers. The base model is returned as base_name."""
        running = canary.running(self.engine)
        if not model or model in (self.active() or self.base_name, running.candidate if running else None):
            return None
        row = adapters.find(self.engine, model)
        if row is None and model != self.base_name:
            return None
        if not curator:
            raise Refused(f"model {model!r}: only curators choose the version that answers; leave model out "
                          "(the active version answers) or log in as a curator", 403)
        if row is not None and not adapters.loaded(self.client, row):
            if row.kind == "full":  # a server of its own per pinned version would be a whole model's memory each
                raise Refused(f"model {model!r} is a full fine-tune that is not serving now; it has a vLLM server only while it "
                              "is active, a canary or judged by a cycle", 409)
            adapters.bring_up(self.client, row, self.settings)  # validated, loaded and probed
        return model

    def history(self, conversation_id: int, author: str) -> list[dict[str, str]]:
        """A stored conversation as the model was sent it (original answers, not corrections), for its owner."""
        return [{"role": m.role, "content": m.content} for m in self.messages(conversation_id, author)]

    def messages(self, conversation_id: int, author: str) -> list[Message]:
        self._check_owner(conversation_id, author)
        with session(self.engine) as s:
            return list(s.exec(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.position)).all())

    def corrections(self, message_ids: list[int]) -> dict[int, str]:
        """The corrected text of those answers that have one (what the chat shows in their place)."""
        with session(self.engine) as s:
            rows = s.exec(select(Feedback).where(Feedback.message_id.in_(message_ids), Feedback.correction != None)).all()  # noqa: E711
        return {f.message_id: f.correction for f in rows}

    def conversations(self, author: str, limit: int = 50) -> list[tuple[int, str]]:
        """The author's conversations, newest first, each with its first question (for a list to pick from)."""
        with session(self.engine) as s:
            convs = s.exec(select(Conversation).where(Conversation.author == author[:128])
                           .order_by(Conversation.id.desc()).limit(limit)).all()
            ids = [c.id for c in convs]
            first: dict[int, str] = {}
            for m in s.exec(select(Message).where(Message.conversation_id.in_(ids), Message.role == "user")
                            .order_by(Message.position)).all():
                first.setdefault(m.conversation_id, m.content)
        return [(c.id, f"{c.created_at:%Y-%m-%d %H:%M} · {first.get(c.id, '')[:60]}") for c in convs]

    def stream(self, messages: list[dict[str, str]], *, conversation_id: int | None = None,
               store_from: int = 0, source: str = "api", author: str,
               params: dict[str, Any] | None = None, pinned: str | None = None) -> Iterator[dict[str, Any] | Turn]:
        """Yield vLLM's chunks as they come, then one Turn once the answer is stored.

        messages[store_from:] are new and stored with the answer; earlier ones already are.
        pinned: a version chosen by pick() (base_name for the base model); None is the active version.
        """
        check_messages(messages, self.settings.max_input_chars)
        if conversation_id is not None:
            self._check_owner(conversation_id, author)  # before the model spends an answer on it
        params = dict(params or {})
        params.setdefault("max_tokens", self.settings.max_new_tokens)
        params.setdefault("temperature", self.settings.temperature)
        if params.get("min_tokens", 0) > params["max_tokens"]:
            raise ChatInputError(f"min_tokens ({params['min_tokens']}) is above max_tokens ({params['max_tokens']}); "
                                 "lower min_tokens or raise max_tokens")
        with self._cv:
            # Read the version and count ourselves on it atomically with respect to drain.
            arm: tuple[int, str] | None = None
            if pinned is not None:
                adapter = None if pinned == self.base_name else pinned
            else:
                adapter, arm = self.route(conversation_id)
            model = adapter or self.base_route
            self._inflight[model] += 1
        started = time.perf_counter()
        parts: list[str] = []
        usage: dict[str, Any] = {}
        try:
            body = {**params, "model": model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
            for chunk in self.client.chat_stream(body):
                for choice in chunk.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
                usage = chunk.get("usage") or usage
                yield chunk
        finally:
            with self._cv:
                self._inflight[model] -= 1
                self._cv.notify_all()
        latency_ms = (time.perf_counter() - started) * 1000
        yield self._store(messages[store_from:], "".join(parts), adapter, usage, latency_ms,
                          conversation_id, source, author, arm)

    def route(self, conversation_id: int | None) -> tuple[str | None, tuple[int, str] | None]:
        """The version that answers, and for a new conversation during a canary the arm it gets for good:
        a conversation on the canary's arm stays on the canary while it runs; every other one gets the
        active version."""
        active = self.active()
        running = canary.running(self.engine)
        if running is None:
            return active, None
        if conversation_id is None:
            arm = canary.assign(running)
            return (running.candidate if arm == "canary" else active), (running.id, arm)
        on = canary.arm_of(self.engine, conversation_id)
        return (running.candidate if on == (running.id, "canary") else active), None

    def complete(self, messages: list[dict[str, str]], **kw: Any) -> Turn:
        """The non-streaming form: consume the stream and return the stored Turn."""
        turn = None
        for item in self.stream(messages, **kw):
            if isinstance(item, Turn):
                turn = item
        assert turn is not None
        return turn

    def _check_owner(self, conversation_id: int, author: str) -> None:
        with session(self.engine) as s:
            conv = s.get(Conversation, conversation_id)
            owned = conv is not None and conv.author == author[:128]
        if not owned:
            raise ChatInputError(f"conversation {conversation_id} is not one of yours; start a new one")

    def _store(self, new: list[dict[str, str]], answer: str, adapter: str | None, usage: dict[str, Any],
               latency_ms: float, conversation_id: int | None, source: str, author: str, arm: tuple[int, str] | None) -> Turn:
        return self.writer.run(lambda s: self._store_in(s, new, answer, adapter, usage, latency_ms, conversation_id, source,
                                                        author, arm))

    @staticmethod
    def _store_in(s: Session, new: list[dict[str, str]], answer: str, adapter: str | None, usage: dict[str, Any],
                  latency_ms: float, conversation_id: int | None, source: str, author: str,
                  arm: tuple[int, str] | None = None) -> Turn:
        if conversation_id is None:
            conv = Conversation(source=source, author=author[:128], canary_id=arm[0] if arm else None, arm=arm[1] if arm else None)
            s.add(conv)
            s.flush()
            conversation_id = conv.id
            position = 0
        else:
            position = s.exec(select(func.count()).select_from(Message).where(Message.conversation_id == conversation_id)).one()
        for m in new:
            s.add(Message(conversation_id=conversation_id, position=position, role=m["role"], content=m["content"]))
            position += 1
        reply = Message(conversation_id=conversation_id, position=position, role="assistant", content=answer,
                        adapter=adapter, prompt_tokens=usage.get("prompt_tokens"),
                        completion_tokens=usage.get("completion_tokens"), latency_ms=latency_ms)
        s.add(reply)
        s.flush()
        return Turn(conversation_id, reply.id, adapter, answer, reply.prompt_tokens, reply.completion_tokens, latency_ms)
