"""HTTP client for the vLLM OpenAI server: chat (streaming or not) and runtime adapter loading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be reached (starting, restarting or down); the API answers 503."""


class VLLMError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"vLLM answered {status}: {message}")
        self.status = status
        self.message = message


class VLLMClient:
    blue_green = False  # serves full fine-tunes on servers of their own (serve/fleet.py's Fleet does)

    def __init__(self, url: str, timeout: float = 300, transport: httpx.BaseTransport | None = None):
        """`transport` replaces the network (tests pass an httpx.MockTransport to play vLLM's side)."""
        self.url = url.rstrip("/")
        # One pooled client per process; vLLM is on loopback, so keep connections alive, but drop an
        # idle one well before vLLM's server does (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): reusing a
        # connection the server is closing fails the request ("server disconnected"), a spurious 503.
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=5), transport=transport,
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2))

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            r = self.http.post(path, json=body)
        except httpx.TransportError as e:
            raise VLLMUnavailable(f"vLLM at {self.url} is not reachable ({type(e).__name__})") from e
        if r.status_code >= 400:
            raise VLLMError(r.status_code, _error_text(r))
        return r

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/chat/completions", {**body, "stream": False}).json()

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """A plain-text completion: the evaluation's prompt log-probabilities come this way."""
        return self._post("/v1/completions", {**body, "stream": False}).json()

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each server-sent chunk of a streaming chat completion as a dict."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise VLLMError(r.status_code, _error_text(r))
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.TransportError as e:
            raise VLLMUnavailable(f"vLLM at {self.url} stopped answering ({type(e).__name__})") from e

    def load_adapter(self, name: str, path: str) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def models(self) -> list[dict[str, Any]]:
        try:
            r = self.http.get("/v1/models", timeout=5)
        except httpx.TransportError as e:
            raise VLLMUnavailable(f"vLLM at {self.url} is not reachable ({type(e).__name__})") from e
        return r.json()["data"]

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("error", body)
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        return r.text[:500]
