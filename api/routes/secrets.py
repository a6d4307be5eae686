"""A team's secrets, write-only: set (PUT), list (names and times, never values), delete.

Only the team's members act on them. A value is never returned, logged or put in an error.
Runtimes use a secret by name in their ``env`` (``{"DB_PASSWORD": {"secret": "db-pass"}}``).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerDep, CtxDep
from registry import team_secrets as secrets_service
from registry.models import TeamSecret
from registry.teams import Actor

router = APIRouter(tags=["secrets"])

TeamPath = Path(max_length=64)
NamePath = Path(max_length=200)


class SecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(description="the secret's value (text, at most 32 KiB); never shown again")


class SecretOut(BaseModel):
    team: str
    name: str
    version: int = Field(description="grows by one each time the value changes")
    created_at: datetime
    updated_at: datetime


def _out(team: str, secret: TeamSecret) -> SecretOut:
    return SecretOut(
        team=team,
        name=secret.name,
        version=secret.version,
        created_at=secret.created_at,
        updated_at=secret.updated_at,
    )


@router.put("/teams/{team}/secrets/{name}", response_model=SecretOut)
def put_secret(
    body: SecretIn, response: Response, ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = NamePath
) -> SecretOut:
    """Set a secret of the team (201 when new, 200 when changed). Runtimes that use it get the
    new value at their next boot; running ones say they are out of date."""
    with ctx.db.session() as s:
        secret, created = secrets_service.put_secret(
            s, ctx.runner.secret_box, team, name, body.value, Actor(caller.id, caller.is_admin)
        )
        out = _out(team, secret)
    response.status_code = 201 if created else 200
    return out


@router.get("/teams/{team}/secrets", response_model=list[SecretOut])
def list_secrets(ctx: CtxDep, caller: CallerDep, team: str = TeamPath) -> list[SecretOut]:
    """The team's secrets: names, versions and times, never values."""
    with ctx.db.session() as s:
        return [_out(team, x) for x in secrets_service.list_secrets(s, team, Actor(caller.id, caller.is_admin))]


@router.delete("/teams/{team}/secrets/{name}", status_code=204)
def delete_secret(ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = NamePath) -> Response:
    """Delete a secret. Runtimes that use it cannot boot until it is set again or their
    reference is removed; running ones say they are out of date."""
    with ctx.db.session() as s:
        secrets_service.delete_secret(s, team, name, Actor(caller.id, caller.is_admin))
    return Response(status_code=204)
