"""One ASGI app on one port: the JSON API and the Gradio UI mounted at /."""

from __future__ import annotations

import gradio as gr
from fastapi import FastAPI

from feedback import curation_ui
from serve import api, chat_ui
from serve.services import Services


def build_app(services: Services) -> FastAPI:
    app = FastAPI(title="tuneloop", docs_url="/api/docs", openapi_url="/api/openapi.json")
    api.install_error_handlers(app)
    api.install_auth_handler(app)
    app.include_router(api.router(services))
    # Curation is its own page so that only curators log in to it; chat stays open to users.
    logins = services.settings.curator_logins or None
    curate = curation_ui.build(services)
    app = gr.mount_gradio_app(app, curate, path="/curate", auth=logins, auth_message="Curator login")
    demo = chat_ui.build(services)
    # Streaming chats run side by side; vLLM batches them.
    demo.queue(default_concurrency_limit=64)
    return gr.mount_gradio_app(app, demo, path="/")
