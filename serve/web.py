"""One ASGI app on one port: the JSON API, the curator login, and the Gradio UIs (/curate, /)."""

from __future__ import annotations

import html
from collections.abc import Callable
from urllib.parse import quote

import gradio as gr
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback import curation_ui
from serve import api, auth, chat_ui, identity
from serve.services import Services

LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tuneloop: {title}</title></head>
<body style="font-family:sans-serif;max-width:24em;margin:4em auto">
<h2>{title}</h2><p style="color:#b00">{error}</p>
<form method="post" action="{action}">
<label>User <input name="username" autocomplete="username" autofocus></label><br><br>
<label>Password <input name="password" type="password" autocomplete="current-password"></label><br><br>
<button type="submit" id="login">Log in</button></form>
<p style="color:#666">{hint}</p>
</body></html>"""
CURATOR_LOGIN = dict(title="Curator login", action="/curate/login",
                     hint="Curator logins are set in TUNELOOP_CURATORS; with the admin token, the user is <code>admin</code>.")
CHAT_LOGIN = dict(title="Log in to chat", action="/login", hint="Chat accounts are set in TUNELOOP_USERS.")


def _page(kind: dict, error: str = "", status: int = 200) -> HTMLResponse:
    return HTMLResponse(LOGIN_PAGE.format(error=html.escape(error), **kind), status_code=status)


def _login_routes(app: FastAPI, prefix: str, page: dict, login: Callable[[str, str], str | None], cookie: str,
                  session_cookie: Callable[[str], str], max_age: int, logged_out: str) -> None:
    """GET and POST {prefix}/login (the form sets a signed session cookie) and {prefix}/logout."""
    @app.get(f"{prefix}/login", include_in_schema=False)
    async def login_form():
        return _page(page)

    @app.post(f"{prefix}/login", include_in_schema=False)
    async def log_in(username: str = Form(""), password: str = Form("")):
        user = login(username, password)
        if user is None:
            return _page(page, "Wrong user or password.", 401)
        response = RedirectResponse(f"{prefix}/", status_code=303)
        # Strict: a page on another site cannot make the browser send it with a forged POST.
        response.set_cookie(cookie, session_cookie(user), max_age=max_age, httponly=True, samesite="strict", path="/")
        return response

    @app.get(f"{prefix}/logout", include_in_schema=False)
    async def log_out():
        response = RedirectResponse(logged_out, status_code=303)
        response.delete_cookie(cookie, path="/")
        return response


class PageGate:
    """Before any route: a session cookie for every client without one, and the login redirects of the chat
    and curation pages.

    Plain ASGI rather than @app.middleware: each of those runs the request in a task with memory streams,
    which cost more than storing a feedback post."""

    def __init__(self, app: ASGIApp, services: Services):
        self.app, self.people, self.curators = app, services.identities, services.auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        path, get = request.url.path, request.method == "GET"
        # `/curate` works as typed; a browser without a curator session is sent to the login form.
        if get and path in ("/curate", "/curate/"):
            if self.curators.curator(request) is None:
                return await RedirectResponse(f"/curate/login?next={quote('/curate/')}", status_code=303)(scope, receive, send)
            if path == "/curate":
                query = f"?{request.url.query}" if request.url.query else ""
                return await RedirectResponse("/curate/" + query, status_code=307)(scope, receive, send)
        # Every client without a valid session cookie gets one; the request already counts as it.
        if self.people.anonymous_session(request) is None:
            sid, value = self.people.new_anonymous_session()
            setattr(request.state, identity.SESSION_STATE, sid)
            send = _with_cookie(send, value)
        # A browser without an identity (login required, or its login expired) is sent to the login form.
        if get and path == "/" and self.people.gradio_user(request) is None:
            response = RedirectResponse("/login", status_code=303)
            response.delete_cookie(identity.USER_COOKIE, path="/")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _with_cookie(send: Send, value: str) -> Send:
    cookie = Response()
    cookie.set_cookie(identity.SESSION_COOKIE, value, max_age=identity.ANON_SESSION_S, httponly=True, samesite="lax", path="/")
    header = cookie.raw_headers[-1]

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return sending


def build_app(services: Services) -> FastAPI:
    app = FastAPI(title="tuneloop", docs_url="/api/docs", openapi_url="/api/openapi.json")
    api.install_error_handlers(app)
    app.include_router(api.router(services))
    curators = services.auth

    people = services.identities
    # Routes on this app come before the mounts, so these answer before Gradio's own /curate/login.
    _login_routes(app, "/curate", CURATOR_LOGIN, curators.login, auth.COOKIE, curators.session_cookie, auth.SESSION_S,
                  logged_out="/curate/login")
    _login_routes(app, "", CHAT_LOGIN, people.login, identity.USER_COOKIE, people.session_cookie, identity.USER_SESSION_S,
                  logged_out="/login" if services.settings.user_logins else "/")

    app.add_middleware(PageGate, services=services)

    # Curation is its own page so that only curators reach it; every Gradio route under it (page,
    # config, queue, buttons) asks `curators.curator`, the same check as the curator API.
    curate = curation_ui.build(services)
    app = gr.mount_gradio_app(app, curate, path="/curate", auth_dependency=curators.curator if curators.required else None)
    demo = chat_ui.build(services)
    # Streaming chats run side by side; vLLM batches them.
    demo.queue(default_concurrency_limit=64)
    # Every chat event carries the server's identity of its sender (gr.Request.username).
    return gr.mount_gradio_app(app, demo, path="/", auth_dependency=people.gradio_user)
