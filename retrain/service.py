"""Wire a cycle to the running service: vLLM client, base model, and the service's own promotion.

Called from the service's composition root (serve/services.py), whose `promote` drains requests on
the old version before unloading it; never through HTTP to the app itself.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Engine

from retrain import cycle
from serve import model, zero_adapter
from serve.client import VLLMClient
from settings import Settings


def run_by_id(settings: Settings, engine: Engine, run_id: int, promote: Callable[[str], None],
              force: bool = False, on_event: cycle.Event = lambda e: None):
    client = VLLMClient(settings.served_vllm_url)
    try:
        base = model.resolve(settings)
        return cycle.run_cycle(settings, engine, client, base, zero_adapter.ensure(client, settings, base), run_id,
                               promote, force=force, on_event=on_event)
    finally:
        client.close()
