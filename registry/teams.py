"""Teams and their members.

A team is the namespace of its environments: ``acme/ml`` belongs to team ``acme``. Its members
read and write its environments (and push and pull its repositories in the registry); its
admins also add and remove members. Whoever creates a team is its first admin. envctl's own
admins (``User.is_admin``) may act on every team.

A user sees only the teams they belong to (admins see all); another team is a 404, as if it
did not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from envs.kit.clock import utcnow
from envs.kit.errors import ForbiddenError, InvalidInputError
from envs.kit.ids import new_id
from envs.refs import check_name
from registry.errors import LastTeamAdminError, TeamExistsError, TeamNotFoundError, UserNotFoundError
from registry.models import ROLE_ADMIN, ROLES, Membership, Team
from registry.users import get_user_by_name


@dataclass(frozen=True)
class Actor:
    """Who acts on teams: a user, and whether they are an envctl admin."""

    user_id: str
    is_admin: bool = False


def published(repository: str) -> bool:
    """The answer without the store: nothing is published. Callers that hold a session ask
    ``registry/visibility.py`` instead (``resolve`` for a reference), or the catalog's
    ``published_repositories`` (the token server)."""
    del repository
    return False


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInputError(f"role: {role!r} is not a role; roles are {', '.join(ROLES)}", field="role")
    return role


def team_names_of(session: Session, user_id: str) -> frozenset[str]:
    """The names of the teams ``user_id`` belongs to."""
    rows = session.scalars(
        select(Team.name).join(Membership, Membership.team_id == Team.id).where(Membership.user_id == user_id)
    )
    return frozenset(rows)


def admin_team_names_of(session: Session, user_id: str) -> frozenset[str]:
    """The names of the teams of which ``user_id`` is an admin."""
    rows = session.scalars(
        select(Team.name)
        .join(Membership, Membership.team_id == Team.id)
        .where(Membership.user_id == user_id, Membership.role == ROLE_ADMIN)
    )
    return frozenset(rows)


def create_team(session: Session, name: str, actor: Actor) -> Team:
    """A new team named ``name``, with ``actor`` as its first admin."""
    check_name(name, "name", "team name")
    if session.scalars(select(Team).where(Team.name == name)).one_or_none() is not None:
        raise TeamExistsError(f"name: a team named {name!r} exists already", details={"team": name})
    team = Team(id=new_id("team"), name=name, created_at=utcnow())
    session.add(team)
    session.flush()
    session.add(
        Membership(id=new_id("mem"), team_id=team.id, user_id=actor.user_id, role=ROLE_ADMIN, created_at=utcnow())
    )
    session.flush()
    session.refresh(team)
    return team


def list_teams(session: Session, actor: Actor) -> list[Team]:
    """The teams ``actor`` belongs to (every team for an envctl admin), with their members."""
    query = select(Team).options(selectinload(Team.members).selectinload(Membership.user)).order_by(Team.name)
    if not actor.is_admin:
        query = query.join(Membership, Membership.team_id == Team.id).where(Membership.user_id == actor.user_id)
    return list(session.scalars(query).unique())


def get_team(session: Session, name: str, actor: Actor) -> Team:
    """The team ``name`` if ``actor`` may see it (a member, or an envctl admin); 404 otherwise."""
    team = session.scalars(
        select(Team).where(Team.name == name).options(selectinload(Team.members).selectinload(Membership.user))
    ).one_or_none()
    if team is None or not (actor.is_admin or any(m.user_id == actor.user_id for m in team.members)):
        raise TeamNotFoundError(
            f"team: no team {name!r} of yours; `envctl team list` shows your teams", details={"team": name}
        )
    return team


def _check_team_admin(team: Team, actor: Actor) -> None:
    if actor.is_admin or any(m.user_id == actor.user_id and m.role == ROLE_ADMIN for m in team.members):
        return
    raise ForbiddenError(
        f"only an admin of team {team.name!r} may change its members; ask one of them",
        details={"team": team.name},
    )


def add_member(session: Session, team_name: str, user_name: str, role: str, actor: Actor) -> Membership:
    """Add ``user_name`` to the team with ``role``, or change their role if they are in it."""
    check_role(role)
    team = get_team(session, team_name, actor)
    _check_team_admin(team, actor)
    user = get_user_by_name(session, user_name)
    if user is None:
        raise UserNotFoundError(f"user: no user named {user_name!r}", details={"user": user_name})
    existing = next((m for m in team.members if m.user_id == user.id), None)
    if existing is not None:
        if existing.role != role:
            _keep_an_admin(team, existing, role)
            existing.role = role
            session.flush()
        return existing
    membership = Membership(id=new_id("mem"), team_id=team.id, user_id=user.id, role=role, created_at=utcnow())
    session.add(membership)
    session.flush()
    session.refresh(membership)
    return membership


def remove_member(session: Session, team_name: str, user_name: str, actor: Actor) -> None:
    """Take ``user_name`` out of the team (a team admin may; anyone may leave); a team keeps at
    least one admin (409 otherwise)."""
    team = get_team(session, team_name, actor)
    existing = next((m for m in team.members if m.user.name == user_name), None)
    if existing is None or existing.user_id != actor.user_id:
        _check_team_admin(team, actor)
    if existing is None:
        raise UserNotFoundError(
            f"user: {user_name!r} is not a member of team {team.name!r}", details={"user": user_name, "team": team.name}
        )
    _keep_an_admin(team, existing, None)
    session.delete(existing)
    session.flush()


def _keep_an_admin(team: Team, changed: Membership, new_role: str | None) -> None:
    if changed.role != ROLE_ADMIN or new_role == ROLE_ADMIN:
        return
    if not any(m.role == ROLE_ADMIN and m.id != changed.id for m in team.members):
        raise LastTeamAdminError(
            f"{changed.user.name!r} is the last admin of team {team.name!r}; make another member admin first",
            details={"team": team.name, "user": changed.user.name},
        )
