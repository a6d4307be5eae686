"""Each team's events: what changed in its environments, in order, for
``GET /teams/{team}/events``.

Kinds: ``saved`` (a new version), ``tag_moved`` (a tag made or moved), ``deleted`` (a version
deleted), ``published`` and ``unpublished`` (a version or a tag); for apps (runner/apps/),
``deployment_started`` (app servers of the team take it from here) and ``app_stopped``, their
``environment`` the app's ``team/name`` and ``ref`` ``team/name#N``. An event is a row of
``team_events`` written in the same transaction as the change it tells of, so a client never
sees an event of a change that was rolled back, nor misses one that committed. ``id`` only
grows: a client that reconnects with the last id it saw gets what it missed.

Versions and tags are watched through SQLAlchemy's mapper events (whoever saves, loads, builds
or deletes, through whichever path); publishing writes its own events. Only environments in a
team's namespace (``acme/ml``) have events: the team is the namespace.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event, insert, inspect, select
from sqlalchemy.orm import Mapper, Session

from envs.kit.clock import utcnow
from envs.models import Environment, EnvironmentVersion, Tag
from registry.models import Team, TeamEvent

KINDS = ("saved", "tag_moved", "deleted", "published", "unpublished", "deployment_started", "app_stopped")
_ENVS = Environment.__table__


def record(session: Session, namespace: str, kind: str, environment: str, ref: str, **data: Any) -> None:
    """Write one event of team ``namespace`` in ``session``'s transaction ('' : no team, none)."""
    if namespace:
        _insert(session.connection(), namespace, kind, environment, ref, data)


def _insert(
    connection: Connection, namespace: str, kind: str, environment: str, ref: str, data: dict[str, Any]
) -> None:
    """The event row, written while holding the team's row: on PostgreSQL two transactions
    could otherwise commit their events out of id order, and a reader that resumed after the
    later id would never see the earlier one. (SQLite writes one transaction at a time.)"""
    connection.execute(select(Team.id).where(Team.name == namespace).with_for_update())
    connection.execute(insert(TeamEvent).values(_row(namespace, kind, environment, ref, data)))


def after(session: Session, team: str, after_id: int, limit: int = 500) -> list[TeamEvent]:
    """Team ``team``'s events with ids above ``after_id``, oldest first."""
    query = select(TeamEvent).where(TeamEvent.team == team, TeamEvent.id > after_id)
    return list(session.scalars(query.order_by(TeamEvent.id).limit(limit)))


def as_json(e: TeamEvent) -> dict[str, Any]:
    """What a client is sent of an event."""
    return {
        "id": e.id,
        "kind": e.kind,
        "environment": e.environment,
        "ref": e.ref,
        "at": e.created_at.isoformat(),
        **e.data,
    }


def _row(namespace: str, kind: str, environment: str, ref: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "team": namespace,
        "kind": kind,
        "environment": environment,
        "ref": ref,
        "data": data,
        "created_at": utcnow(),
    }


def _environment(connection: Connection, environment_id: int) -> tuple[str, str] | None:
    row = connection.execute(select(_ENVS.c.namespace, _ENVS.c.name).where(_ENVS.c.id == environment_id)).one_or_none()
    return (row[0], row[1]) if row is not None else None


def _version_ref(connection: Connection, version_id: int) -> str | None:
    versions = EnvironmentVersion.__table__
    row = connection.execute(
        select(_ENVS.c.namespace, _ENVS.c.name, versions.c.number)
        .join(versions, versions.c.environment_id == _ENVS.c.id)
        .where(versions.c.id == version_id)
    ).one_or_none()
    if row is None:
        return None
    return f"{row[0]}/{row[1]}@{row[2]}" if row[0] else f"{row[1]}@{row[2]}"


def _write(connection: Connection, environment_id: int, kind: str, ref_of: str, data: dict[str, Any]) -> None:
    found = _environment(connection, environment_id)
    if found is None or not found[0]:
        return
    namespace, name = found
    full_name = f"{namespace}/{name}"
    _insert(connection, namespace, kind, full_name, full_name + ref_of, data)


@event.listens_for(EnvironmentVersion, "after_insert")
def _version_saved(_mapper: Mapper[Any], connection: Connection, target: EnvironmentVersion) -> None:
    data = {"digest": target.digest, "author": target.author, "message": target.message}
    _write(connection, target.environment_id, "saved", f"@{target.number}", data)


@event.listens_for(EnvironmentVersion, "after_delete")
def _version_deleted(_mapper: Mapper[Any], connection: Connection, target: EnvironmentVersion) -> None:
    _write(connection, target.environment_id, "deleted", f"@{target.number}", {"digest": target.digest})


@event.listens_for(Tag, "after_insert")
def _tag_made(_mapper: Mapper[Any], connection: Connection, target: Tag) -> None:
    version = _version_ref(connection, target.version_id)
    _write(connection, target.environment_id, "tag_moved", f":{target.name}", {"version": version})


@event.listens_for(Tag, "after_update")
def _tag_moved(mapper: Mapper[Any], connection: Connection, target: Tag) -> None:
    if inspect(target).attrs.version_id.history.has_changes():
        _tag_made(mapper, connection, target)
