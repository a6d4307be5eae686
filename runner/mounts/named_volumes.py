"""Named persistent volumes: a home for data that outlives runtimes.

A volume is ``NAME``, its owner's own, or ``TEAM/NAME``, the team's: every member may mount,
create and delete it. It is the Docker volume
``envctl-vol-<installation hash>-<u.USER ID | t.TEAM>-<NAME>``, labelled with the installation,
its owner and its name, made by ``POST /volumes`` or at the first boot that mounts it. Reset
and deletion of runtimes never remove it; volumes without this installation's label are never
touched (runner/backends/docker_volumes.py). A volume that a runtime's mounts name cannot be deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.db import Database
from registry.teams import team_names_of
from runner.backends.base import LABEL_INSTALLATION, RuntimeBackend
from runner.models import Runtime
from runner.mounts.errors import VolumeExistsError, VolumeInUseError, VolumeNotFoundError
from runner.mounts.validate import VolumeMount, check_volume_name, from_json

LABEL_VOLUME_OWNER = "envctl.volume-owner"
LABEL_VOLUME_NAME = "envctl.volume-name"


def owner_of(owner_id: str, name: str) -> str:
    """The owner label of a volume name: ``t.TEAM`` or ``u.USER ID``."""
    team, sep, _ = name.partition("/")
    return f"t.{team}" if sep else f"u.{owner_id}"


def volume_name(installation: str, owner_id: str, name: str) -> str:
    """The engine's name of a volume (Docker's name rules hold: the parts are checked ids
    and names; the installation is shortened by hashing)."""
    inst = hashlib.sha256(installation.encode()).hexdigest()[:12]
    return f"envctl-vol-{inst}-{owner_of(owner_id, name)}-{name.rpartition('/')[2]}"


def volume_labels(installation: str, owner_id: str, name: str) -> dict[str, str]:
    return {LABEL_INSTALLATION: installation, LABEL_VOLUME_OWNER: owner_of(owner_id, name), LABEL_VOLUME_NAME: name}


def check_access(s: Session, user_id: str, names: Iterable[tuple[str, str]]) -> None:
    """Each ``(name, field)`` is the user's own volume or one of a team they belong to; a team
    they do not belong to is a 404, as teams are elsewhere."""
    teams: frozenset[str] | None = None
    for name, field in names:
        team, sep, _ = name.partition("/")
        if not sep:
            continue
        if teams is None:
            teams = team_names_of(s, user_id)
        if team not in teams:
            raise VolumeNotFoundError(
                f"{field}: there is no team {team!r} of yours; a volume is NAME (yours) or TEAM/NAME of a team "
                "you belong to",
                details={"field": field},
            )


def check_mount_access(s: Session, user_id: str, mounts: list[dict[str, Any]], field: str = "mounts") -> None:
    check_access(
        s,
        user_id,
        ((m.name, f"{field}[{i}].name") for i, m in enumerate(from_json(mounts)) if isinstance(m, VolumeMount)),
    )


@dataclass(frozen=True)
class VolumeInfo:
    name: str  # NAME or TEAM/NAME
    owner: str  # "you" or "team TEAM"
    created_at: str
    used_by: list[str]  # names of the caller's runtimes (and ids of others') whose mounts name it


class Volumes:
    def __init__(self, db: Database, backend: RuntimeBackend, installation: str) -> None:
        self.db = db
        self.backend = backend
        self.installation = installation

    def _users(self, s: Session, engine_name: str) -> list[tuple[str, str, str]]:
        """(runtime id, name, owner id) of the runtimes whose mounts name the volume."""
        rows = s.execute(select(Runtime.id, Runtime.name, Runtime.owner_id, Runtime.mounts)).all()
        out = []
        for rid, rname, owner, mounts in rows:
            for m in from_json(mounts):
                if isinstance(m, VolumeMount) and volume_name(self.installation, owner, m.name) == engine_name:
                    out.append((rid, rname, owner))
                    break
        return out

    def list(self, user_id: str) -> list[VolumeInfo]:
        with self.db.session() as s:
            teams = team_names_of(s, user_id)
            mine = {f"u.{user_id}", *(f"t.{t}" for t in teams)}
            found = [
                v for v in self.backend.list_volumes(self.installation) if v.labels.get(LABEL_VOLUME_OWNER) in mine
            ]
            out = []
            for v in found:
                name = v.labels.get(LABEL_VOLUME_NAME, "")
                users = self._users(s, v.name)
                used_by = [rname if owner == user_id else rid for rid, rname, owner in users]
                owner = "you" if "/" not in name else f"team {name.partition('/')[0]}"
                out.append(VolumeInfo(name, owner, v.created_at, used_by))
        return sorted(out, key=lambda v: v.name)

    def create(self, user_id: str, name: str) -> VolumeInfo:
        check_volume_name(name, "name")
        with self.db.session() as s:
            check_access(s, user_id, [(name, "name")])
        engine_name = volume_name(self.installation, user_id, name)
        if any(v.name == engine_name for v in self.backend.list_volumes(self.installation)):
            raise VolumeExistsError(f"name: the volume {name} exists already", details={"field": "name"})
        self.backend.ensure_volume(engine_name, volume_labels(self.installation, user_id, name))
        return next(v for v in self.list(user_id) if v.name == name)

    def delete(self, user_id: str, name: str) -> None:
        check_volume_name(name, "name")
        engine_name = volume_name(self.installation, user_id, name)
        with self.db.session() as s:
            check_access(s, user_id, [(name, "name")])
            users = self._users(s, engine_name)
        if not any(v.name == engine_name for v in self.backend.list_volumes(self.installation)):
            raise VolumeNotFoundError(f"name: there is no volume {name}", details={"field": "name"})
        if users:
            shown = [rname if owner == user_id else rid for rid, rname, owner in users]
            raise VolumeInUseError(
                f"the volume {name} is mounted by runtimes {', '.join(shown)}; remove it from their mounts "
                "(`envctl runtime set NAME --mount ...`) or delete them first",
                details={"runtimes": shown},
            )
        self.backend.remove_volume(engine_name, self.installation)
