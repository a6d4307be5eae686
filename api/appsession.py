"""Signing in to apps in a browser: a cookie for ``/apps/`` made from an API token.

``POST /apps/_signin`` (a form with the token, or a bearer header) checks the token and sets
``envctl_app``: ``<user id>.<expires>.<HMAC-SHA256>`` under a key derived from the installation's
secrets key. The cookie is HttpOnly, SameSite=Lax, Path=/apps/, lives ``COOKIE_SECONDS`` and holds
no token: whoever reads it learns a user id and a time, and cannot make another. Who the cookie's
user is (their teams) is read again every ``CALLER_TTL`` seconds, so a member removed from a team
stops opening its apps within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import threading
import time
from dataclasses import dataclass

from envs.kit.db import Database
from registry import teams as teams_service
from registry import users as registry_service
from registry.team_secrets import SecretBox

COOKIE = "envctl_app"
COOKIE_SECONDS = 8 * 3600
CALLER_TTL = 5.0


FORM = """<!doctype html><html><head><meta charset="utf-8"><title>Sign in to envctl apps</title></head>
<body><h1>Sign in to envctl apps</h1><p>{message}</p>
<form method="post" action="/apps/_signin"><input type="hidden" name="next" value="{next}">
<label>API token <input type="password" name="token" autocomplete="off" required></label>
<button type="submit">Sign in</button></form>
<p>An API token: <code>envctl token create</code>. The browser keeps a cookie for /apps/ only,
for {hours} hours; it holds no token.</p></body></html>"""


def safe_next(value: str) -> str:
    """Only a path of apps: never another site (an open redirect)."""
    return value if value.startswith("/apps/") and not value.startswith("//") and "\\" not in value else "/apps/"


def signin_page(next_url: str, message: str = "") -> str:
    return FORM.format(
        message=html.escape(message), next=html.escape(safe_next(next_url)), hours=COOKIE_SECONDS // 3600
    )


@dataclass(frozen=True)
class Visitor:
    user_id: str
    teams: frozenset[str]


class AppSessions:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self.box = box
        self._key: bytes | None = None
        self._cache: dict[str, tuple[float, Visitor]] = {}
        self._lock = threading.Lock()

    def key(self) -> bytes:
        if self._key is None:
            self._key = self.box.derive(b"app-session-cookie")
        return self._key

    def _mac(self, user_id: str, expires: int) -> str:
        return hmac.new(self.key(), f"{user_id}.{expires}".encode(), hashlib.sha256).hexdigest()

    def sign_in(self, token: str) -> str:
        """The cookie's value for the token's user (``UnauthorizedError`` for a bad token)."""
        with self.db.session() as s:
            user = registry_service.authenticate(s, token)
            user_id = user.id
        expires = int(time.time()) + COOKIE_SECONDS
        return f"{user_id}.{expires}.{self._mac(user_id, expires)}"

    def cached(self, cookie: str) -> Visitor | None:
        """Who the cookie says, if that was read within ``CALLER_TTL`` (no database)."""
        with self._lock:
            hit = self._cache.get(cookie)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def visitor(self, cookie: str | None) -> Visitor | None:
        """Who the cookie says, if it holds and has not expired."""
        if not cookie:
            return None
        with self._lock:
            hit = self._cache.get(cookie)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        user_id, _, rest = cookie.partition(".")
        expires, _, mac = rest.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return None
        if not hmac.compare_digest(mac, self._mac(user_id, int(expires))):
            return None
        with self.db.session() as s:
            visitor = Visitor(user_id, teams_service.team_names_of(s, user_id))
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[cookie] = (
                min(time.monotonic() + CALLER_TTL, time.monotonic() + int(expires) - time.time()),
                visitor,
            )
        return visitor

    def visitor_of_token(self, token: str) -> Visitor:
        with self.db.session() as s:
            user = registry_service.authenticate(s, token)
            return Visitor(user.id, teams_service.team_names_of(s, user.id))
