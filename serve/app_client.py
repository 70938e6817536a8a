"""The CLI's calls to the running app: where it listens, the CLI's credentials, and one error type.

Every failure comes back as an AppError whose message the CLI prints before it exits 1; NotRunning
(nothing listens) is its own kind, because some commands then act on the store directly.
"""

from __future__ import annotations

from typing import Any

import httpx

from serve.auth import cli_token
from settings import Settings

ACT_TIMEOUT_S = 600  # promoting a version vLLM does not hold yet loads and probes it; a retrain start claims a run
READ_TIMEOUT_S = 30


class AppError(Exception):
    """The app refused (its own message), or failed to answer."""


class NotRunning(AppError):
    """Nothing listens at the app's address."""


def base_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # a wildcard bind is reached on loopback
    return f"http://{host}:{settings.port}"


def headers(settings: Settings) -> dict[str, str]:
    """The admin token if configured, else the local token the service keeps in its data directory
    (so curator logins alone do not lock the CLI out)."""
    token = settings.admin_token or cli_token(settings)
    return {"Authorization": f"Bearer {token}"} if token else {}


class AppClient:
    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None):
        self.url = base_url(settings)
        self.http = httpx.Client(base_url=self.url, headers=headers(settings), transport=transport)

    def post(self, path: str, body: dict | None = None) -> Any:
        return self._call("POST", path, json=body, timeout=ACT_TIMEOUT_S)

    def get(self, path: str) -> Any:
        return self._call("GET", path, timeout=READ_TIMEOUT_S)

    def _call(self, method: str, path: str, **kw) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise NotRunning(f"the service is not running at {self.url}") from None
        except httpx.HTTPError as e:
            raise AppError(f"the service at {self.url} did not answer {method} {path}: {e!r}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"the service answered {r.status_code}: {r.text[:300]}"
            raise AppError(message)
        try:
            return r.json()
        except ValueError:
            raise AppError(f"{self.url} answered {r.status_code} without JSON; is it tuneloop? {r.text[:300]}") from None
