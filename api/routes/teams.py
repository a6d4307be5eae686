"""Teams and their members. A team is the namespace of its environments (``acme/ml``); a
user sees only their own teams (another team is a 404), envctl admins see all."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerCache, CallerDep, CtxDep
from api.schemas import NAME_PATTERN
from registry import teams as teams_service
from registry.models import Membership, Team
from registry.teams import Actor

router = APIRouter(tags=["teams"])

Role = Field(default="member", pattern=r"^(member|admin)$", description="member, or admin (also manages members)")


class TeamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN, examples=["acme"])


class MemberIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN, examples=["alice"])
    role: str = Role


class MemberOut(BaseModel):
    user: str
    role: str
    added_at: datetime


class TeamOut(BaseModel):
    name: str
    created_at: datetime
    role: str | None = Field(description="the caller's role in the team; null for an envctl admin outside it")
    members: list[MemberOut]


def _member(m: Membership) -> MemberOut:
    return MemberOut(user=m.user.name, role=m.role, added_at=m.created_at)


def _team(team: Team, caller_id: str) -> TeamOut:
    mine = next((m.role for m in team.members if m.user_id == caller_id), None)
    members = sorted((_member(m) for m in team.members), key=lambda m: m.user)
    return TeamOut(name=team.name, created_at=team.created_at, role=mine, members=members)


def _actor(caller: CallerDep) -> Actor:
    return Actor(caller.id, caller.is_admin)


def _forget_callers(request: Request) -> None:
    """Membership changed: remembered callers (with their teams) are looked up again."""
    cache: CallerCache = request.app.state.callers
    cache.clear()


@router.get("/teams", response_model=list[TeamOut])
def list_teams(ctx: CtxDep, caller: CallerDep) -> list[TeamOut]:
    """The caller's teams with their members (every team for an envctl admin)."""
    with ctx.db.session() as s:
        return [_team(t, caller.id) for t in teams_service.list_teams(s, _actor(caller))]


@router.post("/teams", status_code=201, response_model=TeamOut)
def create_team(body: TeamCreate, request: Request, ctx: CtxDep, caller: CallerDep) -> TeamOut:
    """A new team; the caller is its first admin. A name taken already is a 409."""
    with ctx.db.session() as s:
        made = _team(teams_service.create_team(s, body.name, _actor(caller)), caller.id)
    _forget_callers(request)
    return made


@router.get("/teams/{team}", response_model=TeamOut)
def get_team(team: str, ctx: CtxDep, caller: CallerDep) -> TeamOut:
    with ctx.db.session() as s:
        return _team(teams_service.get_team(s, team, _actor(caller)), caller.id)


@router.get("/teams/{team}/members", response_model=list[MemberOut])
def list_members(team: str, ctx: CtxDep, caller: CallerDep) -> list[MemberOut]:
    with ctx.db.session() as s:
        return _team(teams_service.get_team(s, team, _actor(caller)), caller.id).members


@router.post("/teams/{team}/members", response_model=MemberOut)
def add_member(team: str, body: MemberIn, request: Request, ctx: CtxDep, caller: CallerDep) -> MemberOut:
    """Add a user to the team, or change their role (team admins and envctl admins only; 403
    otherwise). Demoting the last admin is a 409."""
    with ctx.db.session() as s:
        member = _member(teams_service.add_member(s, team, body.user, body.role, _actor(caller)))
    _forget_callers(request)
    return member


@router.delete("/teams/{team}/members/{user}", status_code=204)
def remove_member(team: str, user: str, request: Request, ctx: CtxDep, caller: CallerDep) -> Response:
    """Take a user out of the team (team admins and envctl admins only; anyone may leave);
    removing the last admin is a 409."""
    with ctx.db.session() as s:
        teams_service.remove_member(s, team, user, _actor(caller))
    _forget_callers(request)
    return Response(status_code=204)
