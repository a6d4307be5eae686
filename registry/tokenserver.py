"""envctl as the registry's token server (distribution's token authentication).

A client (``docker push``, ``docker pull``) that the registry turns away with a challenge asks
``GET /registry/token?service=...&scope=...`` with Basic auth (user name, and an envctl API
token as the password) and gets a signed JWT that lists what it may do. Every ``scope`` asked
for is answered, with the actions granted (possibly none):

- a member of team ``acme`` gets ``pull`` and ``push`` on ``acme/*``;
- anyone else signed in gets ``pull`` on another team's repository only when it is published
  (the token endpoint passes ``registry.catalog.published_repositories``: a repository is an
  environment, so one published version of it opens the repository to pulls; the catalog
  still shows, boots and imports only the published versions);
- repositories without a team (the base images) are everyone's to pull, admins' to push;
- envctl admins get ``pull`` and ``push`` everywhere; anonymous callers get nothing.

The registry checks what 2.8 checks: ``iss`` = ``auth.token.issuer``, ``aud`` = the service (one
string), ``exp``/``nbf`` with 60 s of leeway, and a signature by the key its bundle trusts.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from envs.kit.clock import utcnow
from envs.kit.errors import InvalidInputError, UnauthorizedError
from registry.distribution import ISSUER, SERVICE
from registry.drafts import is_draft_repository
from registry.signing import SigningKey
from registry.teams import published, team_names_of
from registry.users import authenticate

READ, WRITE = "pull", "push"
MAX_SCOPES = 32


@dataclass(frozen=True)
class Scope:
    type: str  # "repository", "registry" ...
    name: str  # "acme/ml"
    actions: tuple[str, ...]

    def as_claim(self, granted: list[str]) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": granted}


@dataclass(frozen=True)
class Requester:
    """Who asks: ``None`` is anonymous."""

    name: str
    is_admin: bool
    teams: frozenset[str]


def requester(session: Session, name: str, token: str) -> Requester:
    """The user ``name`` if ``token`` is one of theirs (401 otherwise, also for a revoked or
    expired token)."""
    user = authenticate(session, token)
    if user.name != name:
        raise UnauthorizedError("the user name does not go with the token: log in with your envctl user name")
    return Requester(user.name, user.is_admin, team_names_of(session, user.id))


def parse_scope(text: str) -> Scope:
    """``repository:acme/ml:pull,push`` (the name may hold a ``:``, the actions come last)."""
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and kind and name) or len(text) > 512:
        raise InvalidInputError(f"scope: {text[:100]!r} is not type:name:actions", field="scope")
    return Scope(kind, name, tuple(a for a in actions.split(",") if a))


def allowed_actions(scope: Scope, who: Requester | None, is_published: Callable[[str], bool] = published) -> list[str]:
    """The actions of ``scope`` that ``who`` is granted, in the order asked."""
    if who is None or scope.type != "repository":
        return []
    if is_draft_repository(scope.name):
        return []  # runtimes' drafts: envctl's own tokens only, never one the token server issues
    team = scope.name.split("/", 1)[0] if "/" in scope.name else None
    if who.is_admin or (team is not None and team in who.teams):
        rights = {READ, WRITE}
    elif team is None or is_published(scope.name):
        rights = {READ}
    else:
        rights = set()
    return [a for a in dict.fromkeys(scope.actions) if a in rights]


def claims_for(
    scopes: list[Scope],
    who: Requester | None,
    ttl: int,
    now: datetime | None = None,
    is_published: Callable[[str], bool] = published,
) -> dict[str, Any]:
    now = now or utcnow()
    stamp = int(now.timestamp())
    return {
        "iss": ISSUER,
        "sub": who.name if who is not None else "",
        "aud": SERVICE,
        "iat": stamp,
        "nbf": stamp,
        "exp": stamp + ttl,
        "jti": secrets.token_hex(16),
        "access": [s.as_claim(allowed_actions(s, who, is_published)) for s in scopes],
    }


def issue(
    key: SigningKey,
    scope_texts: list[str],
    who: Requester | None,
    ttl: int,
    is_published: Callable[[str], bool] = published,
) -> dict[str, Any]:
    """The token endpoint's answer: every scope answered, signed by ``key``."""
    if len(scope_texts) > MAX_SCOPES:
        raise InvalidInputError(f"scope: at most {MAX_SCOPES} scopes per request", field="scope")
    scopes = [parse_scope(t) for t in scope_texts]
    now = utcnow()
    token = key.sign(claims_for(scopes, who, ttl, now, is_published))
    return {
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
