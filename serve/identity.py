"""Who is chatting: the identity the server establishes for every chat and feedback request.

The author of a message and of its feedback is this identity, never a string the client sends.
In order, a request is:
- an API key (`Authorization: Bearer tl_...`, issued by a curator, stored hashed): its owner;
- a chat account (`TUNELOOP_USERS`): HTTP Basic, or the session cookie the /login form sets;
- the user a trusted reverse proxy names in `TUNELOOP_PROXY_USER_HEADER`, only when the request comes
  from an address in `TUNELOOP_TRUSTED_PROXIES` (from anywhere else the header is ignored);
- otherwise `anonymous:<session>`, a random id in a signed cookie, when the operator leaves
  `TUNELOOP_CHAT_LOGIN_REQUIRED` off; with it on, the request is refused.
Credentials that are sent but wrong (a revoked key, a bad password) are refused, never downgraded.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.engine import Engine
from sqlmodel import select

from data_store.db import session
from data_store.errors import Refused
from data_store.models import ANONYMOUS, ApiKey, now
from serve.auth import ADMIN_USER, CuratorAuth, _same, basic, credentials, match
from settings import Settings

USER_COOKIE = "tuneloop_user"
SESSION_COOKIE = "tuneloop_session"
SESSION_STATE = "tuneloop_session"  # request.state key: the session id a first request was given
USER_SESSION_S = 7 * 24 * 3600
ANON_SESSION_S = 365 * 24 * 3600
KEY_PREFIX = "tl_"


class Unidentified(Refused):
    """401: the request carries no identity the server can vouch for, or wrong credentials."""

    status = 401


class ApiKeyError(Refused):
    """400 (404 for an unknown key): a key or identity name that cannot be used."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# Names the server gives itself: the admin-token bearer, the CLI, open curation.
RESERVED = {ADMIN_USER, "cli", "open"}


def name_problem(name: str) -> str | None:
    if not name or len(name) > 128 or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "is not a valid identity: 1-128 printable characters"
    if name.startswith(ANONYMOUS):
        return f"starts with {ANONYMOUS!r}, which is reserved for anonymous sessions"
    if name in RESERVED:
        return f"is reserved ({', '.join(sorted(RESERVED))} are the server's own names)"
    return None


def valid_name(name: str, what: str = "user") -> str:
    name = (name or "").strip()
    if problem := name_problem(name):
        raise ApiKeyError(f"{what} {name[:40]!r} {problem}")
    return name


# ---- API keys: issued and revoked by curators (CLI, curation page, API) ----

@dataclass
class IssuedKey:
    id: int
    owner: str
    label: str
    key: str  # shown once; only its hash is stored


def issue_key(engine: Engine, owner: str, label: str, by: str) -> IssuedKey:
    owner = valid_name(owner, "owner")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with session(engine) as s:
        row = ApiKey(owner=owner, label=(label or "").strip()[:200], key_hash=_hash(key), created_by=by[:128])
        s.add(row)
        s.flush()
        return IssuedKey(row.id, row.owner, row.label, key)


def revoke_key(engine: Engine, key_id: int) -> ApiKey:
    with session(engine) as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise ApiKeyError(f"API key {key_id} does not exist; `tuneloop keys list` shows them", status=404)
        if row.revoked_at is None:
            row.revoked_at = now()
            s.add(row)
        s.flush()
        s.expunge(row)
        return row


def list_keys(engine: Engine) -> list[ApiKey]:
    with session(engine) as s:
        rows = list(s.exec(select(ApiKey).order_by(ApiKey.id)))
        for r in rows:
            s.expunge(r)
        return rows


def key_owner(engine: Engine, key: str) -> str:
    return _key_row(engine, _hash(key))[0]


def _key_row(engine: Engine, key_hash: str) -> tuple[str, int]:
    with session(engine) as s:
        row = s.exec(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()
        if row is None:
            raise Unidentified("unknown API key; ask a curator for one (`tuneloop keys issue USER`)")
        if row.revoked_at is not None:
            raise Unidentified(f"API key {row.id} was revoked on {row.revoked_at:%Y-%m-%d %H:%M}; ask a curator for a new one")
        return row.owner, row.id


# A valid key's owner is remembered this long, so that a busy client's requests do not each read the
# store (and can be identified on the event loop). A key revoked through this service stops at once;
# one revoked by another process (`tuneloop keys revoke`) stops within this time.
KEY_RECHECK_S = 5.0


class Identities:
    def __init__(self, settings: Settings, engine: Engine, curators: CuratorAuth):
        self.settings, self.engine, self.curators = settings, engine, curators
        for name, _ in settings.user_logins:
            if problem := name_problem(name):
                raise ValueError(f"TUNELOOP_USERS: account {name[:40]!r} {problem}")
        self.signer = curators.signer
        self._proxies = [ipaddress.ip_network(p, strict=False) if _is_ip(p) else p for p in settings.proxies]
        self._keys: dict[str, tuple[str, int, float]] = {}  # key hash -> owner, key id, when checked

    # -- API keys --
    def key_owner(self, key: str) -> str:
        key_hash = _hash(key)
        known = self._keys.get(key_hash)
        if known is not None and time.monotonic() - known[2] < KEY_RECHECK_S:
            return known[0]
        owner, key_id = _key_row(self.engine, key_hash)  # raises for unknown and revoked keys: never cached
        self._keys[key_hash] = (owner, key_id, time.monotonic())
        return owner

    def revoke(self, key_id: int) -> ApiKey:
        row = revoke_key(self.engine, key_id)
        for key_hash, (_, kid, _) in list(self._keys.items()):
            if kid == key_id:
                self._keys.pop(key_hash, None)
        return row

    def reads_store(self, request: Request) -> bool:
        """Whether `identify` would query the store (an API key not checked lately); everything else it
        decides from the request alone, so a caller on the event loop can call it directly."""
        scheme, value = credentials(request)
        if scheme != "bearer" or not value.startswith(KEY_PREFIX):
            return False
        known = self._keys.get(_hash(value))
        return known is None or time.monotonic() - known[2] >= KEY_RECHECK_S

    # -- chat accounts --
    def login(self, user: str, password: str) -> str | None:
        return match(self.settings.user_logins, user, password)

    def session_cookie(self, user: str) -> str:
        return self.signer.sign("user", user, USER_SESSION_S)

    def new_anonymous_session(self) -> tuple[str, str]:
        """A fresh session id and its signed cookie value."""
        sid = secrets.token_urlsafe(12)
        return sid, self.signer.sign("session", sid, ANON_SESSION_S)

    def anonymous_session(self, request: Request) -> str | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        sid = self.signer.unsign("session", cookie) if cookie else None
        return sid or getattr(request.state, SESSION_STATE, None)

    # -- the identity of a request --
    def identify(self, request: Request) -> str:
        scheme, value = credentials(request)
        if scheme and not (scheme in ("bearer", "basic") and value):
            raise Unidentified("unrecognized Authorization header; send 'Bearer <API key>' or HTTP Basic")
        if scheme == "bearer":
            if value.startswith(KEY_PREFIX):
                return self.key_owner(value)
            if self.settings.admin_token and _same(value, self.settings.admin_token):
                return ADMIN_USER
            raise Unidentified("unknown bearer token; send an API key a curator issued (`tuneloop keys issue USER`)")
        if scheme == "basic":
            pair = basic(value)
            if pair is None:
                raise Unidentified("malformed HTTP Basic credentials")
            who = self.login(*pair)
            if who is None:
                raise Unidentified("wrong user or password (chat accounts are set in TUNELOOP_USERS)")
            return who
        proxied = request.headers.get(self.settings.proxy_user_header)
        if proxied and self._from_proxy(request):
            try:
                return valid_name(proxied, "proxy user")
            except ApiKeyError as e:
                raise Unidentified(str(e)) from None
        cookie = request.cookies.get(USER_COOKIE)
        if cookie:
            user = self.signer.unsign("user", cookie)
            if user is None or user not in {n for n, _ in self.settings.user_logins}:
                raise Unidentified("your login expired or was ended; log in again at /login")
            return user
        if self.settings.chat_login_required:
            raise Unidentified("log in first: the /login page, HTTP Basic with a TUNELOOP_USERS account, "
                               "or 'Authorization: Bearer <API key>'")
        sid = self.anonymous_session(request)
        if sid is None:
            raise Unidentified("no session: accept the tuneloop_session cookie, or send an API key")
        return ANONYMOUS + sid

    def gradio_user(self, request: Request) -> str | None:
        """For Gradio's auth_dependency: the identity, or None (Gradio then answers 401)."""
        try:
            return self.identify(request)
        except Unidentified:
            return None

    def _from_proxy(self, request: Request) -> bool:
        host = request.client.host if request.client else ""
        addr = ipaddress.ip_address(host) if _is_ip(host) else None
        return any(host == p if isinstance(p, str) else addr is not None and addr in p for p in self._proxies)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False
