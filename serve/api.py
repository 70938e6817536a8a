"""The JSON API: OpenAI-compatible chat, feedback, health and adapter administration.

Every error is OpenAI-shaped, {"error": {"message", "type"}}: a refusal (data_store/errors.py) with
its own 4xx, a 503 when vLLM cannot answer; nothing is stored for a request that fails.
"""

from __future__ import annotations

import asyncio
import calendar
import json
from dataclasses import asdict
from datetime import datetime
from itertools import chain
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from data_store.db import ping
from data_store.errors import Refused
from feedback import curation
from feedback import record as feedback
from feedback.fields import UNSET
from retrain.runs import get_run, list_runs
from serve import adapters, canary, identity
from serve.chat import Turn
from serve.client import VLLMError, VLLMUnavailable
from serve.services import Services


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The OpenAI chat-completions body. `model` picks a version for curators only (ChatService.pick);
    `conversation_id` continues a stored conversation of the caller's: `messages` are then the new ones."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=1000)
    conversation_id: int | None = Field(None, ge=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # vLLM's own sampling extensions, passed through as vLLM's OpenAI server takes them
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request: each is stored as one message")
    # OpenAI clients send it; the author stored is the identity the server established, never this.
    user: str | None = Field(None, max_length=128)

    def params(self) -> dict[str, Any]:
        keys = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.max_tokens or self.max_completion_tokens:
            out["max_tokens"] = self.max_completion_tokens or self.max_tokens
        return out


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: int
    rating: Literal["up", "down"] | None = None
    correction: str | None = None
    comment: str | None = None
    author: Any | None = Field(None, description="refused: the author is who you are logged in as")


class ApproveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    correction: str | None = None


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["approve", "reject"]
    status: Literal["pending", "approved", "rejected"] | None = "pending"
    rating: Literal["up", "down", "none"] | None = None
    adapter: str | None = None
    author: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = Field(max_length=128)
    label: str = Field("", max_length=200)


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    share: float | None = Field(None, gt=0, lt=1, description="default: TUNELOOP_CANARY_SHARE")


KINDS = {401: "unauthorized", 404: "not_found", 409: "conflict"}  # the body's error type; others are invalid_request_error


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
        parts.append(f"{where}: {e['msg']}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return error(400, _describe(exc))

    @app.exception_handler(Refused)
    async def _refused(_request: Request, exc: Refused):
        return error(exc.status, str(exc), KINDS.get(exc.status, "invalid_request_error"))

    @app.exception_handler(VLLMUnavailable)
    async def _down(_request: Request, exc: VLLMUnavailable):
        return error(503, f"the model server is unavailable ({exc}); it restarts on its own, retry shortly", "service_unavailable")

    @app.exception_handler(VLLMError)
    async def _vllm(_request: Request, exc: VLLMError):
        status = 400 if exc.status in (400, 422) else 502
        kind = "model_error" if status == 502 else "invalid_request_error"
        return error(status, f"the model server refused the request: {exc.message}", kind)


def router(services: Services) -> APIRouter:
    api = APIRouter()
    chat = services.chat
    settings = services.settings

    def require_curator(request: Request) -> None:
        # Curation, retraining, promotion and rollback: the same check as the curation page (serve/auth.py).
        if services.auth.curator(request) is None:
            raise CuratorRequired()

    async def who(request: Request) -> str:
        # On the event loop unless an API key must be looked up: a thread hop per post costs more than the post.
        if services.identities.reads_store(request):
            return await run_in_threadpool(services.identities.identify, request)
        return services.identities.identify(request)

    def is_curator(request: Request) -> bool:
        return services.auth.curator(request) is not None

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request, author: str = Depends(who)):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        kw: dict[str, Any] = dict(source="api", author=author, params=req.params())
        if req.conversation_id is not None:  # the stored turns first, as the model was sent them
            stored = await run_in_threadpool(chat.history, req.conversation_id, author)
            messages = [*stored, *messages]
            kw.update(conversation_id=req.conversation_id, store_from=len(stored))
        if req.model:
            kw["pinned"] = await run_in_threadpool(lambda: chat.pick(req.model, is_curator(request)))
        if not req.stream:
            turn: Turn = await run_in_threadpool(chat.complete, messages, **kw)
            return _completion(turn, services.chat.base_name)
        gen = chat.stream(messages, **kw)
        # Pull the first chunk before answering, so an unreachable vLLM is a 503, not a broken 200.
        first = await run_in_threadpool(next, gen)
        return StreamingResponse(_sse(first, gen), media_type="text/event-stream")

    @api.get("/v1/models")
    async def list_models(request: Request, _who: str = Depends(who)):  # identified as chat is (CHAT_LOGIN_REQUIRED)
        """What the caller may name in `model`: the active version for everyone; for curators also the
        base model and every registered version (OpenAI's list shape, with tuneloop's own fields)."""
        curator = await run_in_threadpool(is_curator, request)
        active = await run_in_threadpool(chat.active)
        rows = await run_in_threadpool(adapters.list_all, services.engine) if curator else []
        started = int(services.started_at)

        def entry(name: str, created: int, kind: str, status: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "tuneloop",
                    "tuneloop": {"kind": kind, "status": status, "active": name == (active or chat.base_name)}}

        data = [entry(chat.base_name, started, "base", "base")] if curator or active is None else []
        data += [entry(r.name, _epoch(r.created_at), r.kind, r.status) for r in rows]  # kind: lora or full
        if active is not None and not curator:
            row = await run_in_threadpool(adapters.find, services.engine, active)
            data.append(entry(active, _epoch(row.created_at) if row else started, row.kind if row else "lora", "registered"))
        return {"object": "list", "data": data}

    @api.post("/api/feedback")
    async def post_feedback(req: FeedbackRequest, author: str = Depends(who)):
        given = req.model_dump(exclude_unset=True)
        if "author" in given:
            return error(400, f"author: the author is the identity you are logged in as ({author}); "
                              "remove the field (log in, or use an API key, to act as someone)")
        # Queued on the group-commit writer: no worker thread waits on the database's write lock, and the
        # answer comes only once the change is committed.
        fb = await asyncio.wrap_future(feedback.submit(
            services.writer, settings, req.message_id,
            rating=given.get("rating", UNSET), correction=given.get("correction", UNSET),
            comment=given.get("comment", UNSET), author=author,
        ))
        # Serialized by pydantic in one step: FastAPI's encoding of a returned dict costs more than the write.
        return Response(fb.model_dump_json(), media_type="application/json")

    @api.get("/api/health")
    async def health():
        report: dict[str, Any] = {"app": "ok"}
        ok = True
        try:
            await run_in_threadpool(ping, services.engine)
            report["database"] = "ok"
            report["adapter"] = await run_in_threadpool(chat.active)
        except Exception as e:  # the report says what is wrong rather than failing itself
            ok = False
            report["database"] = f"error: {e}"
        vllm_ok = await run_in_threadpool(services.vllm.healthy)
        report["vllm"] = {"url": services.vllm.url, "status": "ok" if vllm_ok else "unavailable"}
        if services.supervisor is not None:
            report["vllm"].update(state=services.supervisor.state, restarts=services.supervisor.restarts,
                                  pid=services.supervisor.proc.pid if services.supervisor.proc else None)
            vllm_ok = vllm_ok and services.supervisor.state == "ready"
        if services.vllm.blue_green:  # each full fine-tune serving from a vLLM of its own, which must be ready too
            report["vllm"]["full_versions"] = servers = services.vllm.states()
            # one still starting serves no one yet (a candidate being judged): the service is not down for it
            vllm_ok = vllm_ok and all(v["state"] == "ready" for v in servers.values() if v["serving"])
        report["base_model"] = chat.base_name
        ok = ok and vllm_ok
        return JSONResponse(report, status_code=200 if ok else 503)

    curate = APIRouter(prefix="/api/curation", dependencies=[Depends(require_curator)])

    @curate.get("/queue")
    async def queue(status: str | None = "pending", rating: str | None = None, adapter: str | None = None,
                    author: str | None = None, since: datetime | None = None, until: datetime | None = None,
                    limit: int = 200):
        f = curation.Filters(status or None, rating, adapter, author, since, until)
        items = await run_in_threadpool(curation.queue, services.engine, f, min(max(limit, 1), 1000))
        return {"counts": await run_in_threadpool(curation.counts, services.engine),
                "items": [asdict(i) | {"updated_at": i.updated_at.isoformat()} for i in items]}

    @curate.post("/{feedback_id}/approve")
    async def approve(feedback_id: int, req: ApproveRequest):
        ex = await run_in_threadpool(curation.approve, services.engine, settings, feedback_id, req.correction)
        return {"feedback_id": feedback_id, "status": "approved", "example_id": ex.id}

    @curate.post("/{feedback_id}/reject")
    async def reject(feedback_id: int):
        await run_in_threadpool(curation.reject, services.engine, feedback_id)
        return {"feedback_id": feedback_id, "status": "rejected"}

    @curate.post("/bulk")
    async def bulk(req: BulkRequest):
        f = curation.Filters(req.status, req.rating, req.adapter, req.author, req.since, req.until)
        report = await run_in_threadpool(curation.bulk, services.engine, settings, req.action, f)
        return asdict(report)

    @curate.post("/retrain", include_in_schema=True)
    async def retrain(force: bool = False):
        return {"run_id": await run_in_threadpool(services.retrain_now, force)}  # 409 while a cycle runs

    @curate.get("/runs")
    async def runs(limit: int = 50):
        return await run_in_threadpool(list_runs, services.engine, limit)

    @curate.get("/runs/{run_id}")
    async def run_detail(run_id: int):
        found = await run_in_threadpool(get_run, services.engine, run_id)
        return found if found is not None else error(404, f"run {run_id} does not exist", "not_found")

    @curate.get("/keys")
    async def keys():
        rows = await run_in_threadpool(identity.list_keys, services.engine)
        return {"keys": [r.model_dump(mode="json", exclude={"key_hash"}) for r in rows]}

    @curate.post("/keys")
    async def issue(req: KeyRequest, request: Request):
        by = services.auth.curator(request) or "open"
        issued = await run_in_threadpool(identity.issue_key, services.engine, req.owner, req.label, by)
        return asdict(issued)

    @curate.delete("/keys/{key_id}")
    async def revoke(key_id: int):
        row = await run_in_threadpool(services.identities.revoke, key_id)
        return {"id": row.id, "owner": row.owner, "revoked_at": row.revoked_at.isoformat()}

    api.include_router(curate)

    @api.get("/api/adapters")
    async def list_adapters():
        active = await run_in_threadpool(chat.active)
        rows = await run_in_threadpool(adapters.list_all, services.engine)
        return {"active": active, "adapters": [r.model_dump(mode="json") | {"active": r.name == active} for r in rows]}

    @api.post("/api/adapters/promote", dependencies=[Depends(require_curator)])
    async def promote(req: PromoteRequest):
        await run_in_threadpool(services.promote, req.name)
        return {"active": req.name}

    @api.post("/api/adapters/rollback", dependencies=[Depends(require_curator)])
    async def rollback():
        return {"active": await run_in_threadpool(services.rollback)}

    @api.get("/api/canary", dependencies=[Depends(require_curator)])
    async def canary_status():
        return await run_in_threadpool(canary_report, services)

    @api.post("/api/canary/start", dependencies=[Depends(require_curator)])
    async def canary_start(req: CanaryRequest, request: Request):
        share = req.share or settings.canary_share
        if not share:
            return error(400, "share: give a share of new conversations for the canary (TUNELOOP_CANARY_SHARE is 0)")
        by = services.auth.curator(request) or "open"
        return canary.view(await run_in_threadpool(services.start_canary, req.name, share, by))

    @api.post("/api/canary/{how}", dependencies=[Depends(require_curator)])
    async def canary_end(how: Literal["stop", "complete"], request: Request):
        by = services.auth.curator(request) or "open"
        return canary.view(await run_in_threadpool(services.end_canary, how, by))

    return api


class CuratorRequired(Refused):
    """401: a curator endpoint called without a curator's credentials."""

    status = 401

    def __init__(self):
        super().__init__("this endpoint needs a curator login (HTTP Basic or the /curate/login session, TUNELOOP_CURATORS) "
                         "or the admin token ('Authorization: Bearer <TUNELOOP_ADMIN_TOKEN>')")


def _completion(turn: Turn, base_name: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tl{turn.message_id}",
        "object": "chat.completion",
        "model": turn.adapter or base_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
                  "total_tokens": (turn.prompt_tokens or 0) + (turn.completion_tokens or 0)},
        "tuneloop": _ids(turn),
    }


def canary_report(services: Services) -> dict[str, Any]:
    """The running canary with its arms' live counts, each version's live thumbs-up rate, and recent canaries."""
    running = canary.running(services.engine)
    arms = canary.counts(services.engine, running) if running else {}
    return {"running": canary.view(running) if running else None,
            "arms": {k: asdict(v) | {"rate": v.rate, "interval": canary.wilson(v.up, v.rated)} for k, v in arms.items()},
            "versions": canary.version_rates(services.engine),
            "recent": [canary.view(c) for c in canary.latest(services.engine)]}


def _epoch(at: datetime) -> int:
    return calendar.timegm(at.utctimetuple())  # stored UTC; SQLite hands it back without its zone


def _ids(turn: Turn) -> dict[str, Any]:
    return {"message_id": turn.message_id, "conversation_id": turn.conversation_id, "adapter": turn.adapter}


def _sse(first, rest):
    """Forward vLLM's chunks; the last data event carries the stored message id."""
    try:
        for chunk in chain([first], rest):
            if isinstance(chunk, Turn):
                yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'tuneloop': _ids(chunk)})}\n\n"
            else:
                yield f"data: {json.dumps(chunk)}\n\n"
    except (VLLMUnavailable, VLLMError) as e:
        failed = {"message": f"the model server failed mid-answer: {e}; nothing was stored", "type": "service_unavailable"}
        yield f"data: {json.dumps({'error': failed})}\n\n"
    yield "data: [DONE]\n\n"
