"""The registry's token endpoint (distribution's token authentication) and the registry's status.

``docker login 127.0.0.1:PORT -u USER`` with an envctl API token as the password, then
``docker push``/``docker pull``: the registry sends the client here for a token.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from api.deps import CallerDep, CtxDep
from envs.kit.errors import InvalidInputError, UnauthorizedError
from registry import catalog, distribution, pull_grants, tokenserver

router = APIRouter(tags=["registry"])


class TokenAnswer(BaseModel):
    token: str
    access_token: str
    expires_in: int
    issued_at: str


class RegistryOut(BaseModel):
    mode: str
    url: str | None
    running: bool | None
    service: str
    realm: str


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise UnauthorizedError("the Basic credentials are not base64 of user:token") from exc
    if not sep or not name or not password:
        raise UnauthorizedError("send your envctl user name and an API token as Basic credentials")
    return name, password


@router.get("/registry/token", response_model=TokenAnswer)
def registry_token(
    request: Request,
    ctx: CtxDep,
    service: str | None = Query(default=None, max_length=200),
    scope: list[str] = Query(default=[]),  # noqa: B008
) -> dict[str, Any]:
    """A registry token answering every ``scope`` (``repository:acme/ml:pull,push``) with the
    actions granted. Basic auth: envctl user name and API token; none is anonymous (nothing
    granted); a wrong token is a 401."""
    if service is not None and service != distribution.SERVICE:
        raise InvalidInputError(f"service: this token server signs for {distribution.SERVICE!r} only", field="service")
    credentials = _basic(request.headers.get("authorization", ""))
    key = distribution.signing_key(ctx.settings)
    kind = pull_grants.KINDS.get(credentials[0]) if credentials is not None else None
    if credentials is not None and kind is not None:  # a cluster node's pull secret, envctl's own push
        repository = pull_grants.open_grant(key, credentials[1], kind=kind)
        return pull_grants.issue(key, scope, repository, ctx.settings.registry_token_ttl, kind=kind)
    who = None
    published: set[str] = set()
    if credentials is not None:
        with ctx.db.session() as s:
            who = tokenserver.requester(s, *credentials)
            published = catalog.published_repositories(s)
    return tokenserver.issue(key, scope, who, ctx.settings.registry_token_ttl, published.__contains__)


@router.get("/registry", response_model=RegistryOut)
def registry_status(ctx: CtxDep, caller: CallerDep) -> RegistryOut:
    """The registry this envctl uses: managed (and whether it runs), external, or off."""
    del caller
    plan = distribution.plan(ctx.settings)
    managed = ctx.managed_registry()
    running = managed.answers() if isinstance(managed, distribution.ManagedRegistry) else None
    mode = plan.mode if managed is not None or plan.mode != "managed" else "off"
    return RegistryOut(
        mode=mode,
        url=plan.url if mode != "off" else None,
        running=running,
        service=distribution.SERVICE,
        realm=distribution.realm_of(ctx.settings),
    )
