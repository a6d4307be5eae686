"""Request dependencies: the app's context and the caller's identity."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.settings import Settings
from envs.kit.db import Database
from envs.service import PinnedBy
from registry import teams as teams_service
from registry import users as registry_service
from registry.distribution import ManagedRegistry
from registry.visibility import Reader
from runner.runtimes.store import Viewer
from runner.service import RunnerService


@dataclass
class Context:
    settings: Settings
    db: Database
    runner: RunnerService
    pinned_by: PinnedBy  # what pins a version (the runtimes store's answer): envs and the catalog ask it
    managed_registry: Callable[[], ManagedRegistry | None]  # the registry process serve runs, if any


@dataclass(frozen=True)
class Caller:
    id: str
    name: str
    is_admin: bool
    teams: frozenset[str] = frozenset()  # the teams the caller is a member of
    admin_of: frozenset[str] = frozenset()  # those of them the caller is an admin of

    @property
    def viewer(self) -> Viewer:
        """Who asks, as the runner decides what they see and may do (``runner/runtimes/store.py``).
        Read with the caller, so a change of membership counts within the cache's ``ttl``."""
        return Viewer(self.id, self.teams, self.admin_of, self.is_admin)

    @property
    def reader(self) -> Reader:
        """Who asks, as a reader of environments (``registry/visibility.py``)."""
        return Reader(self.id, self.teams, self.is_admin)


async def get_context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


CALLER_TTL = 5.0  # seconds a caller (their token, their teams) is remembered

_bearer = HTTPBearer(auto_error=False, description="an envctl API token")


class CallerCache:
    """Who a token belongs to, remembered for a few seconds so hot paths skip the database.

    A revoked or expired token is refused again at most ``ttl`` seconds later, and a change of
    the caller's teams (a member removed: their team's runtimes are gone for them) counts at
    most ``ttl`` seconds later on every server; this server's own team routes clear it at once.
    """

    def __init__(self, ttl: float = CALLER_TTL, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def get(self, token: str) -> Caller | None:
        with self._lock:
            entry = self._entries.get(token)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, token: str, caller: Caller) -> None:
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.clear()
            self._entries[token] = (time.monotonic() + self.ttl, caller)

    def clear(self) -> None:
        """Forget every token (after one was revoked): each is looked up again on its next use."""
        with self._lock:
            self._entries.clear()


async def get_caller(
    request: Request,
    ctx: Annotated[Context, Depends(get_context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """Who is calling. Async so that a cached token costs no trip through the thread pool.

    What they may see of environments is decided where a reference is resolved, whatever it
    came from (``registry/visibility.py``, given ``caller.reader``), not here."""
    token = credentials.credentials if credentials is not None else None
    cache: CallerCache = request.app.state.callers
    if token:
        hit = cache.get(token)
        if hit is not None:
            return hit
    caller = await run_in_threadpool(_lookup, ctx, token)
    if token:
        cache.put(token, caller)
    return caller


class LiveViewer:
    """The caller of a long-lived stream as the runner sees them, their teams read again every
    ``ttl`` seconds: a member removed from a team stops seeing its runtimes on a stream that was
    open already, as on their next request."""

    def __init__(self, ctx: Context, caller: Caller, ttl: float | None = None) -> None:
        self.ctx = ctx
        self.caller = caller
        self.ttl = CALLER_TTL if ttl is None else ttl
        self.viewer = caller.viewer
        self.read_at = time.monotonic()

    def __call__(self) -> Viewer:
        """Called off the event loop (it may read the database)."""
        if time.monotonic() - self.read_at > self.ttl:
            with self.ctx.db.session() as s:
                teams = teams_service.team_names_of(s, self.caller.id)
                admin_of = teams_service.admin_team_names_of(s, self.caller.id)
            self.viewer = Viewer(self.caller.id, teams, admin_of, self.caller.is_admin)
            self.read_at = time.monotonic()
        return self.viewer


def _lookup(ctx: Context, token: str | None) -> Caller:
    with ctx.db.session() as s:
        user = registry_service.authenticate(s, token)
        return Caller(
            user.id,
            user.name,
            user.is_admin,
            teams_service.team_names_of(s, user.id),
            teams_service.admin_team_names_of(s, user.id),
        )


CtxDep = Annotated[Context, Depends(get_context)]
CallerDep = Annotated[Caller, Depends(get_caller)]
