"""Who may curate: one check for the curation page, its buttons and every curator API.

Whatever the operator configured is accepted everywhere, in the same way:
- a curator login (`TUNELOOP_CURATORS`, user:password): HTTP Basic on the API, or the form at
  /curate/login, which sets a signed session cookie that the page, its buttons and the API all take;
- the admin token (`TUNELOOP_ADMIN_TOKEN`): `Authorization: Bearer <token>`, or the form with user
  `admin` and the token as its password.
The CLI on the service's machine acts through the app with a local token that lives in
DATA_DIR/cli-token (mode 0600): whoever can read the data directory can already change the database.
With neither logins nor a token configured, curation is open (the service binds loopback by default).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from fastapi import Request

from settings import Settings

COOKIE = "tuneloop_curator"
SESSION_S = 12 * 3600
ADMIN_USER = "admin"


def _secret_file(path: Path) -> str:
    """A random secret kept in a file only its owner reads; every process on the data directory shares it."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    try:
        os.link(tmp, path)  # first writer wins; a concurrent start reads the winner's value
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def cli_token_path(settings: Settings) -> Path:
    return settings.data_dir / "cli-token"


def cli_token(settings: Settings) -> str | None:
    """The local token, for the CLI; None when no service has written one here."""
    try:
        return cli_token_path(settings).read_text().strip() or None
    except (FileNotFoundError, PermissionError):
        return None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def match(logins: list[tuple[str, str]], user: str, password: str) -> str | None:
    """The login a user name and password match, or None; every pair is compared (constant time)."""
    ok = None
    for name, expected in logins:
        if _same(user, name) and _same(password, expected):
            ok = name
    return ok


def credentials(request: Request) -> tuple[str, str]:
    """The Authorization header as (scheme, value): scheme lower-cased, '' when there is none."""
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    return scheme.lower(), value.strip()


def basic(value: str) -> tuple[str, str] | None:
    """(user, password) from an HTTP Basic value, or None when it is malformed."""
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


class Signer:
    """Signed, expiring cookie values. The purpose is signed too, so a chat user's session cookie can
    never pass as a curator's, even under the same name."""

    def __init__(self, settings: Settings):
        self._key = _secret_file(settings.data_dir / "session-key").encode()

    def sign(self, purpose: str, value: str, ttl_s: int) -> str:
        expires = str(int(time.time()) + ttl_s)
        return f"{value}|{expires}|{self._mac(purpose, value, expires)}"

    def unsign(self, purpose: str, token: str) -> str | None:
        parts = token.rsplit("|", 2)
        if len(parts) != 3:
            return None
        value, expires, sig = parts
        if not _same(sig, self._mac(purpose, value, expires)) or not expires.isdigit() or int(expires) < time.time():
            return None
        return value

    def _mac(self, purpose: str, value: str, expires: str) -> str:
        return hmac.new(self._key, f"{purpose}|{value}|{expires}".encode(), hashlib.sha256).hexdigest()


class CuratorAuth:
    def __init__(self, settings: Settings, signer: Signer | None = None):
        self.settings = settings
        self.signer = signer or Signer(settings)
        self._cli = _secret_file(cli_token_path(settings))

    @property
    def required(self) -> bool:
        return bool(self.settings.curator_logins or self.settings.admin_token)

    def login(self, user: str, password: str) -> str | None:
        """The curator a user name and password identify, or None."""
        ok = match(self.settings.curator_logins, user, password)
        if self.settings.admin_token and _same(user, ADMIN_USER) and _same(password, self.settings.admin_token):
            ok = ADMIN_USER
        return ok

    def _bearer(self, token: str) -> str | None:
        if self.settings.admin_token and _same(token, self.settings.admin_token):
            return ADMIN_USER
        return "cli" if _same(token, self._cli) else None

    def session_cookie(self, user: str) -> str:
        return self.signer.sign("curator", user, SESSION_S)

    def _from_cookie(self, value: str) -> str | None:
        user = self.signer.unsign("curator", value)
        # A login removed from the settings ends its sessions at the next restart.
        curators = {n for n, _ in self.settings.curator_logins}
        if user is not None and (user in curators or (user == ADMIN_USER and self.settings.admin_token)):
            return user
        return None

    def curator(self, request: Request) -> str | None:
        """The curator this request carries credentials for (header or session cookie), or None.
        With nothing configured everyone curates, as `open`."""
        if not self.required:
            return "open"
        scheme, value = credentials(request)
        if scheme == "bearer" and value:
            return self._bearer(value)
        if scheme == "basic" and value:
            pair = basic(value)
            return self.login(*pair) if pair else None
        cookie = request.cookies.get(COOKIE)
        return self._from_cookie(cookie) if cookie else None
