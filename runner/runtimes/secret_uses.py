"""A runtime's secrets: references in its ``env``, resolved at boot and handed to its agent.

A runtime uses a team secret by name in its environment variables:
``{"DB_PASSWORD": {"secret": "db-pass"}}`` (the team is the one of the owner's teams that has
it; ``{"secret": "acme/db-pass"}`` or ``"team": "acme"`` says which). The reference is stored
as ``{"secret": NAME, "team": TEAM}``; no value is ever in the runtime's row, its container's
configuration (Docker's ``Env``, labels, host config) or its log (R6).

At boot (runner/runtimes/boot.py), :meth:`RuntimeSecrets.prepare` opens the values before the container
is made (a secret gone, or a team the owner left, fails the boot at once, naming it); once the
agent answers, :meth:`Delivery.send` hands them over its channel (its Unix socket, or TLS): the agent adds them to
the cells' environment and writes each to a file on a tmpfs (``/run/secrets/NAME``, mode 0400)
that never reaches a layer. What was given is recorded (``runtime_secret_uses``): which
version of which secret each variable got, for :meth:`RuntimeSecrets.outdated` (a secret
changed or deleted since is shown on the running runtime), and every value the runtime was
ever given, encrypted, for :meth:`RuntimeSecrets.values_of`, which the save scan searches for
(runner/saves/scans.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.errors import InvalidInputError
from registry.models import Membership, RuntimeSecretUse, Team
from registry.team_secrets import SecretBox, check_secret_name, secrets_named
from runner.channel import AgentChannel, AgentTarget
from runner.errors import SecretUnavailableError
from runner.models import Runtime
from runner.runtimes.states import State

#: values a runtime keeps on record for its save scan (the most recent ones)
MAX_REMEMBERED = 256


def is_ref(value: object) -> bool:
    return isinstance(value, Mapping)


def check_ref(var: str, value: object, field: str = "env") -> dict[str, str | None]:
    """A reference's shape: ``{"secret": NAME}``, ``{"secret": "TEAM/NAME"}`` or with ``team``."""
    where = f"{field}.{var}"
    if not isinstance(value, Mapping) or not set(value) <= {"secret", "team"} or "secret" not in value:
        raise InvalidInputError(
            f'{where}: a secret reference is {{"secret": NAME}} (or {{"secret": NAME, "team": TEAM}})', field=where
        )
    name, team = value["secret"], value.get("team")
    if isinstance(name, str) and "/" in name and team is None:
        team, _, name = name.partition("/")
    check_secret_name(name, where)
    if team is not None:
        check_secret_name(team, f"{where}.team")
    return {"secret": name, "team": team}


def ref_label(ref: Mapping[str, Any]) -> str:
    return f"{ref['team']}/{ref['secret']}" if ref.get("team") else str(ref["secret"])


def refs_of(env: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in (env or {}).items() if is_ref(v)}


def _owner_teams(s: Session, owner_id: str) -> dict[str, str]:
    """Team name -> id of the teams the runtime's owner is in."""
    rows = s.execute(
        select(Team.name, Team.id).join(Membership, Membership.team_id == Team.id).where(Membership.user_id == owner_id)
    )
    return {name: tid for name, tid in rows}


def _runtime_teams(s: Session, owner_id: str, team_only: str | None) -> dict[str, str]:
    """The teams whose secrets a runtime may use: its owner's, or only its own team's."""
    teams = _owner_teams(s, owner_id)
    return teams if team_only is None else {k: v for k, v in teams.items() if k == team_only}


def resolve(
    s: Session, owner_id: str, env: Mapping[str, Any], field: str = "env", team_only: str | None = None
) -> dict[str, Any]:
    """``env`` with every secret reference checked (the secret exists, in a team of the owner)
    and its team filled in. A reference to nothing is a 422 naming the variable and secret.
    ``team_only``: a team runtime's team, the one team whose secrets it may use (its members
    can read them in its cells)."""
    refs = refs_of(env)
    if not refs:
        return dict(env)
    teams = _runtime_teams(s, owner_id, team_only)
    out = dict(env)
    for var, ref in refs.items():
        where = f"{field}.{var}"
        name, team = ref["secret"], ref.get("team")
        if team is not None:
            found = [team] if team in teams and secrets_named(s, [(team, name)]) else []
        else:
            found = sorted(t for t, _ in secrets_named(s, [(t, name) for t in teams]))
        if not found:
            where_to_look = f"team {team!r}" if team else f"your teams ({', '.join(sorted(teams)) or 'none'})"
            if team_only is not None:
                where_to_look += f" (a runtime of team {team_only!r} uses that team's secrets only)"
            raise InvalidInputError(
                f"{where}: there is no secret {name!r} in {where_to_look}; set it first "
                f"(`envctl secret set {team or 'TEAM'} {name}`)",
                field=where,
                details={"secret": name, "team": team},
            )
        if len(found) > 1:
            raise InvalidInputError(
                f"{where}: teams {', '.join(sorted(found))} each have a secret {name!r}; say which, "
                f'as {{"secret": "{sorted(found)[0]}/{name}"}}',
                field=where,
                details={"secret": name, "teams": sorted(found)},
            )
        out[var] = {"secret": name, "team": found[0]}
    files: dict[str, str] = {}
    for var, ref in refs_of(out).items():
        other = files.setdefault(ref["secret"], ref["team"])
        if other != ref["team"]:
            raise InvalidInputError(
                f"{field}.{var}: secrets {other}/{ref['secret']} and {ref_label(ref)} would share the file "
                f"/run/secrets/{ref['secret']}; a runtime uses one secret of each name",
                field=f"{field}.{var}",
            )
    return out


@dataclass
class Delivery:
    """The values a booting runtime gets, opened; handed to its agent by :meth:`send`."""

    runtime_id: str
    env: dict[str, str]  # variable -> value
    files: dict[str, str]  # secret name -> value
    delivered: dict[str, dict[str, Any]]  # variable -> team, secret, version
    owner: RuntimeSecrets = field(repr=False)

    def send(self, target: AgentTarget) -> None:
        """Give the agent the values (over its channel, never through Docker), then record it."""
        with AgentChannel(target) as channel:
            channel.request("secrets", env=self.env, files=self.files)
        self.owner.record(self.runtime_id, self.delivered, self.env.values())


class RuntimeSecrets:
    """Resolves, delivers and remembers the secrets of runtimes."""

    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self.box = box

    def prepare(self, runtime_id: str) -> Delivery | None:
        """The values of the runtime's secret references, opened; None when it has none.
        ``SecretUnavailableError`` names a reference that no longer leads to a secret."""
        with self.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            if rt is None:
                return None
            refs = refs_of(rt.env)
            if not refs:
                self._forget_delivered(s, runtime_id)
                return None
            teams = _runtime_teams(s, rt.owner_id, rt.team)
            rows = secrets_named(s, [(r["team"], r["secret"]) for r in refs.values()])
            env: dict[str, str] = {}
            files: dict[str, str] = {}
            delivered: dict[str, dict[str, Any]] = {}
            for var, ref in sorted(refs.items()):
                row = rows.get((ref["team"], ref["secret"]))
                if row is None or ref["team"] not in teams:
                    why = "no longer exists" if row is None else f"is of team {ref['team']}, which the owner left"
                    raise SecretUnavailableError(
                        f"env.{var}: secret {ref_label(ref)} {why}; set it (`envctl secret set {ref['team']} "
                        f"{ref['secret']}`) or stop using it (`envctl runtime set {rt.name} --unset-env {var}`)",
                        details={"field": f"env.{var}", "secret": ref_label(ref)},
                    )
                value = self.box.open(row.ciphertext)
                env[var] = files[ref["secret"]] = value
                delivered[var] = {"team": ref["team"], "secret": ref["secret"], "version": row.version}
        return Delivery(runtime_id, env, files, delivered, self)

    def _forget_delivered(self, s: Session, runtime_id: str) -> None:
        use = s.get(RuntimeSecretUse, runtime_id)
        if use is not None and use.delivered:
            use.delivered = {}

    def record(self, runtime_id: str, delivered: dict[str, dict[str, Any]], values: Iterable[str]) -> None:
        """Remember what the runtime got: versions (for ``outdated``) and values (for saves)."""
        with self.db.session() as s:
            use = s.get(RuntimeSecretUse, runtime_id, with_for_update=True)
            known = self._open_values(use)
            merged = list(dict.fromkeys([*values, *known]))[:MAX_REMEMBERED]
            sealed = self.box.seal(json.dumps(merged))
            if use is None:
                s.add(
                    RuntimeSecretUse(
                        runtime_id=runtime_id, delivered=delivered, sealed_values=sealed, delivered_at=utcnow()
                    )
                )
            else:
                use.delivered, use.sealed_values, use.delivered_at = delivered, sealed, utcnow()

    def _open_values(self, use: RuntimeSecretUse | None) -> list[str]:
        if use is None or not use.sealed_values:
            return []
        return [str(v) for v in json.loads(self.box.open(use.sealed_values))]

    def values_of(self, runtime_id: str) -> list[str]:
        """Every value the runtime was given, and those of the secrets it refers to now: what
        a save of it must not hold. In memory only, for the save scan."""
        with self.db.session() as s:
            values = self._open_values(s.get(RuntimeSecretUse, runtime_id))
            rt = s.get(Runtime, runtime_id)
            refs = refs_of(rt.env if rt is not None else None)
            rows = secrets_named(s, [(r["team"], r["secret"]) for r in refs.values() if r.get("team")])
            values += [self.box.open(row.ciphertext) for row in rows.values()]
        return list(dict.fromkeys(values))

    def outdated(self, runtimes: list[Runtime]) -> dict[str, list[str]]:
        """Runtime id -> the secrets (``team/name``) changed or deleted since its container got
        them, for runtimes with a container (booting, running, stopping)."""
        live = [rt.id for rt in runtimes if rt.state in (State.BOOTING, State.RUNNING, State.STOPPING)]
        if not live:
            return {}
        with self.db.session() as s:
            uses = [
                u
                for u in s.scalars(select(RuntimeSecretUse).where(RuntimeSecretUse.runtime_id.in_(live)))
                if u.delivered
            ]
            wanted = {(str(d["team"]), str(d["secret"])) for u in uses for d in u.delivered.values()}
            rows = secrets_named(s, list(wanted))
            out: dict[str, list[str]] = {}
            for use in uses:
                stale = {
                    f"{d['team']}/{d['secret']}"
                    for d in use.delivered.values()
                    if (row := rows.get((str(d["team"]), str(d["secret"])))) is None or row.version != d["version"]
                }
                if stale:
                    out[use.runtime_id] = sorted(stale)
        return out
