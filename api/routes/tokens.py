"""API tokens of the caller (made, listed, revoked) and users (made by envctl admins).

A token is shown once, when it is made; only its SHA-256 is kept. It has an expiry, and a
revoked or expired token is refused from then on.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerCache, CallerDep, CtxDep
from api.schemas import NAME_PATTERN
from envs.kit.errors import ForbiddenError
from registry import users as registry_service
from registry.teams import team_names_of
from registry.users import MAX_TOKEN_LIFE, TokenInfo

router = APIRouter(tags=["tokens"])

MAX_DAYS = MAX_TOKEN_LIFE.days


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=200, examples=["laptop"])
    expires_in_days: int = Field(default=90, ge=1, le=MAX_DAYS, description="days until the token expires")


class TokenOut(BaseModel):
    id: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool


class TokenCreated(TokenOut):
    token: str = Field(description="the token itself, shown this once only")


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN, examples=["alice"])
    admin: bool = False
    expires_in_days: int = Field(default=90, ge=1, le=MAX_DAYS, description="days until the first token expires")


class UserCreated(BaseModel):
    name: str
    admin: bool
    token: str = Field(description="the user's first API token, shown this once only")
    token_id: str
    expires_at: datetime | None


def _out(info: TokenInfo) -> TokenOut:
    return TokenOut(
        id=info.id,
        description=info.description,
        created_at=info.created_at,
        expires_at=info.expires_at,
        revoked_at=info.revoked_at,
        active=info.active,
    )


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(ctx: CtxDep, caller: CallerDep) -> list[TokenOut]:
    """The caller's tokens, revoked and expired ones too; never the tokens themselves."""
    with ctx.db.session() as s:
        return [_out(t) for t in registry_service.list_tokens(s, caller.id)]


@router.post("/tokens", status_code=201, response_model=TokenCreated)
def create_token(body: TokenCreate, ctx: CtxDep, caller: CallerDep) -> TokenCreated:
    """A new token for the caller. The answer is the only time the token is shown."""
    with ctx.db.session() as s:
        user = registry_service.get_user_by_name(s, caller.name)
        assert user is not None  # the caller was found by a token of theirs
        token, info = registry_service.create_token(s, user, body.description, timedelta(days=body.expires_in_days))
        return TokenCreated(token=token, **_out(info).model_dump())


@router.delete("/tokens/{token_id}", response_model=TokenOut)
def revoke_token(token_id: str, request: Request, ctx: CtxDep, caller: CallerDep) -> TokenOut:
    """Revoke one of the caller's tokens; it is refused from this answer on. Another user's
    token is a 404."""
    with ctx.db.session() as s:
        info = registry_service.revoke_token(s, caller.id, token_id)
    cache: CallerCache = request.app.state.callers
    cache.clear()  # the revoked token may be remembered; forget every token, they are looked up again
    return _out(info)


class Me(BaseModel):
    name: str
    admin: bool
    teams: list[str]


@router.get("/users/me", response_model=Me)
def me(ctx: CtxDep, caller: CallerDep) -> Me:
    """Who the token belongs to, and their teams (``envctl login`` shows it)."""
    with ctx.db.session() as s:
        teams = sorted(team_names_of(s, caller.id))
    return Me(name=caller.name, admin=caller.is_admin, teams=teams)


@router.post("/users", status_code=201, response_model=UserCreated)
def create_user(body: UserCreate, ctx: CtxDep, caller: CallerDep) -> UserCreated:
    """A new user and their first token, shown once (envctl admins only; 403 otherwise)."""
    if not caller.is_admin:
        raise ForbiddenError("only an envctl admin may create users")
    with ctx.db.session() as s:
        user = registry_service.create_user(s, body.name, is_admin=body.admin)
        token, info = registry_service.create_token(s, user, "first token", timedelta(days=body.expires_in_days))
        return UserCreated(
            name=user.name, admin=user.is_admin, token=token, token_id=info.id, expires_at=info.expires_at
        )
