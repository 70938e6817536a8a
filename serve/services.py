"""The running service's parts, built once in app.py and handed to the web layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sqlalchemy.engine import Engine

from serve import adapters, zero_adapter
from serve.chat import ChatService
from serve.client import VLLMClient
from serve.vllm_server import VLLMSupervisor
from settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    vllm: VLLMClient
    chat: ChatService
    base_model: str  # what vLLM loaded: a directory or a hub id
    supervisor: Optional[VLLMSupervisor] = None

    def promote(self, name: str) -> None:
        adapters.promote(self.engine, self.vllm, self.settings, name, drain=self.chat.drain)

    def rollback(self) -> Optional[str]:
        return adapters.rollback(self.engine, self.vllm, self.settings, drain=self.chat.drain)

    def reload_active(self) -> Optional[str]:
        """After vLLM (re)starts: the zero adapter, if base traffic uses one, then the active version."""
        zero_adapter.ensure(self.vllm, self.settings, self.base_model)
        return adapters.reload_active(self.engine, self.vllm, self.settings)


def build(settings: Settings, engine: Engine, client: VLLMClient, base_model: str) -> Services:
    from serve.model import served_name

    chat = ChatService(settings, engine, client, served_name(settings), zero_adapter.route(settings))
    return Services(settings, engine, client, chat, base_model)
