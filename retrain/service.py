"""Wire a cycle to the running service: vLLM client, base model, and promotion.

Promotion goes through the app's API when the app runs (it drains requests on the old version
before unloading it); otherwise straight to vLLM.
"""

from __future__ import annotations

from typing import Callable, Optional

import httpx
from sqlalchemy.engine import Engine

from retrain import cycle
from serve import adapters, model, zero_adapter
from serve.client import VLLMClient
from settings import Settings


def promote_via_app(settings: Settings, engine: Engine, client: VLLMClient) -> Callable[[str], None]:
    def promote(name: str) -> None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        headers = {"Authorization": f"Bearer {settings.admin_token}"} if settings.admin_token else {}
        try:
            r = httpx.post(f"http://{host}:{settings.port}/api/adapters/promote", json={"name": name}, headers=headers, timeout=600)
        except httpx.ConnectError:
            adapters.promote(engine, client, settings, name)
            return
        if r.status_code >= 400:
            raise adapters.AdapterError(f"the service refused to promote {name}: {r.text[:500]}")
    return promote


def run_by_id(settings: Settings, engine: Engine, run_id: int, promote: Optional[Callable[[str], None]] = None,
              force: bool = False, on_event: cycle.Event = lambda e: None):
    client = VLLMClient(settings.served_vllm_url)
    try:
        base = model.resolve(settings)
        return cycle.run_cycle(settings, engine, client, base, zero_adapter.ensure(client, settings, base), run_id,
                               promote or promote_via_app(settings, engine, client), force=force, on_event=on_event)
    finally:
        client.close()
