"""Request dependencies: the app's context and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from envs.kit.config import Settings
from envs.kit.db import Database
from registry import service as registry_service
from runner.service import RunnerService


@dataclass
class Context:
    settings: Settings
    db: Database
    runner: RunnerService


@dataclass(frozen=True)
class Caller:
    id: str
    name: str
    is_admin: bool


def get_context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


_bearer = HTTPBearer(auto_error=False, description="an envctl API token")


def get_caller(
    ctx: Annotated[Context, Depends(get_context)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    token = credentials.credentials if credentials is not None else None
    with ctx.db.session() as s:
        user = registry_service.authenticate(s, token)
        return Caller(user.id, user.name, user.is_admin)


CtxDep = Annotated[Context, Depends(get_context)]
CallerDep = Annotated[Caller, Depends(get_caller)]
