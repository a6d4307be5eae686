"""Runtimes as records a user makes and changes: create, read, list and change settings.

A runtime is made ``stopped``, pinned to the exact version its environment reference means
now (a tag is resolved once; later saves never move it), and owned by the runner that made it.
Settings that shape the container (environment, type, environment variables, machine type)
change at once while it is stopped; while it runs they are refused (409, naming them) or, when
asked, kept for its next boot (runner/runtimes/reboot.py). Starting, stopping and deleting are
``runner/runtimes/lifecycle.py``.

A runtime made with ``team`` belongs to that team as well as to its maker (who must be a
member: 404 for another team, as the team routes answer). Its name is unique within the team,
a personal runtime's among its owner's personal ones: a clash is a 409 naming it. Who sees and acts
on it is decided in ``runner/runtimes/store.py`` (``Viewer``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.errors import InvalidInputError
from envs.kit.ids import new_id
from envs.refs import check_name, parse_ref
from registry import visibility
from registry.errors import TeamNotFoundError
from registry.teams import team_names_of
from runner.errors import LeaseExpiredError, RuntimeNotFoundError, RuntimeStateError
from runner.models import Runtime
from runner.mounts.named_volumes import check_mount_access
from runner.mounts.validate import VolumeMount, check_mounts, from_json
from runner.mounts.validate import to_json as mounts_json
from runner.runtimes import envvars, leases, reboot
from runner.runtimes import secret_uses as secrets
from runner.runtimes.machines import check_cuda, get_machine_type
from runner.runtimes.states import State
from runner.runtimes.store import Records, Who, reader_for, viewer_of
from runner.settings import Settings

LANGUAGES = ("python", "bash")
RUNTIME_TYPES = ("native", "jupyter")
KERNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_IDLE_TIMEOUT = 7 * 24 * 3600


@dataclass(frozen=True)
class RuntimeChanges:
    """Fields of a PATCH; ``None`` leaves a field as it is."""

    name: str | None = None
    idle_timeout: int | None = None
    clear_idle_timeout: bool = False
    machine_type: str | None = None
    environment: str | None = None
    language: str | None = None
    type: str | None = None
    kernel: str | None = None
    env: Mapping[str, envvars.EnvValue | None] = field(default_factory=dict)  # a merge patch: null unsets
    cuda: str | None = None  # a host CUDA version for a GPU machine type
    clear_cuda: bool = False
    mounts: list[Any] | None = None  # the complete new list (runner/mounts/validate.py); [] removes all
    next_boot: bool = False  # keep changes that need a reboot for the next boot instead of 409
    lease: int | None = None  # a new lease length, which starts now (runner/runtimes/leases.py)
    clear_lease: bool = False  # drop the lease: the runtime no longer goes with its client


class Runtimes:
    def __init__(self, settings: Settings, records: Records, backend_name: str) -> None:
        self.settings = settings
        self.records = records
        self.backend_name = backend_name

    def create(
        self,
        who: Who,
        *,
        name: str,
        environment: str,
        language: str = "python",
        machine_type: str = "small",
        idle_timeout: int | None = None,
        type: str = "native",
        kernel: str | None = None,
        env: Mapping[str, envvars.EnvValue] | None = None,
        cuda: str | None = None,
        mounts: list[Any] | None = None,
        team: str | None = None,
        lease: int | None = None,
    ) -> Runtime:
        """A runtime, stopped; with ``lease`` (seconds) it is stopped and deleted unless its
        client renews the lease in time (runner/runtimes/leases.py)."""
        owner_id = viewer_of(who).user_id
        check_name(name, "name", "runtime name")
        if team is not None:
            check_name(team, "team", "team name")
        check_choice(language, LANGUAGES, "language")
        kernel = check_type(type, kernel)
        own_env = envvars.check_env(env or {})
        check_idle_timeout(idle_timeout)
        if lease is not None:
            leases.check_lease(lease)
            leases.check_lease_allowed(team)
        get_machine_type(self.settings, machine_type)
        if cuda is not None:
            check_cuda(self.settings, cuda)
        own_mounts = self._check_mounts(mounts)
        ref = parse_ref(environment, "environment")
        now = self.records.clock()
        with self.records.tx() as s:
            version = visibility.resolve(s, ref, reader_for(s, who), "environment")
            if team is not None and team not in team_names_of(s, owner_id):
                raise TeamNotFoundError(
                    f"team: no team {team!r} of yours; `envctl team list` shows your teams", details={"team": team}
                )
            self._check_name_free(s, owner_id, team, name)
            check_team_mounts(team, own_mounts)
            check_mount_access(s, owner_id, own_mounts)
            own_env = secrets.resolve(s, owner_id, own_env, team_only=team)
            rt = self.records.create(
                s,
                f"pinned to {version.ref}",
                id=new_id("rt"),
                owner_id=owner_id,
                team=team,
                name=name,
                type=type,
                kernel=kernel,
                language=language,
                environment_ref=str(ref),
                version_id=version.id,
                version=version,
                machine_type=machine_type,
                idle_timeout=idle_timeout,
                env=own_env,
                cuda=cuda,
                mounts=own_mounts,
                pending={},
                state=State.STOPPED,
                state_reason="created",
                state_message=f"created from {version.ref}",
                backend=self.backend_name,
                backend_state={},
                next_seq=0,
                lease_seconds=lease,
                lease_expires_at=leases.ends_at(lease, now) if lease is not None else None,
                lease_renewed_at=now if lease is not None else None,
                created_at=now,
                updated_at=now,
            )
            # what the API shows, as ``Records.query`` loads it: the version and its environment,
            # both in this session already (no further read)
            _ = rt.version.environment
            return rt

    def get(self, who: Who, runtime_id: str) -> Runtime:
        with self.records.db.session() as s:
            return self.records.get(s, who, runtime_id)

    def update(self, who: Who, runtime_id: str, changes: RuntimeChanges) -> Runtime:
        """Change settings (its owner or an admin of its team may). Those that shape the
        container apply at once while the runtime is stopped; while it runs they are refused
        (409) or, with ``next_boot``, kept pending."""
        if changes.name is not None:
            check_name(changes.name, "name", "runtime name")
        if changes.language is not None:
            check_choice(changes.language, LANGUAGES, "language")
        check_idle_timeout(changes.idle_timeout)
        if changes.lease is not None:
            leases.check_lease(changes.lease)
        if changes.machine_type is not None:
            get_machine_type(self.settings, changes.machine_type)
        if changes.cuda is not None:
            check_cuda(self.settings, changes.cuda)
        if changes.type is not None:
            check_type(changes.type, changes.kernel)
        elif changes.kernel is not None:
            raise InvalidInputError("kernel: give it with type jupyter", field="kernel")
        for env_name, value in changes.env.items():
            envvars.check_name(env_name)
            if value is not None:
                envvars.check_entry(env_name, value)
        ref = parse_ref(changes.environment, "environment") if changes.environment is not None else None
        new_mounts = self._check_mounts(changes.mounts) if changes.mounts is not None else None
        with self.records.tx() as s:
            rt = self.records.get_to_manage(s, who, runtime_id, "changing the settings of", for_update=True)
            wanted = self._reboot_changes(s, rt, changes, ref, reader_for(s, who))
            if new_mounts is not None:
                # volumes are the owner's (a boot mounts them as the owner) and the changer's to give
                check_team_mounts(rt.team, new_mounts)
                for user_id in {rt.owner_id, viewer_of(who).user_id}:
                    check_mount_access(s, user_id, new_mounts)
                wanted["mounts"] = new_mounts
            values, notes = self._apply_at_once(s, rt, changes)
            lease_values, lease_notes = self._apply_lease(rt, changes)
            values.update(lease_values)
            notes = lease_notes + notes
            if wanted:
                more, reboot_notes = self._apply_reboot_changes(rt, wanted, changes.next_boot)
                values.update(more)
                notes += reboot_notes
            if notes:
                self.records.change(rt, **values, updated_at=self.records.clock())
                self.records.log(s, rt.id, event="settings-changed", reason="user-request", message="; ".join(notes))
            s.flush()
            s.expire(rt)
            return self.records.get(s, who, runtime_id)

    def renew_lease(self, who: Who, runtime_id: str) -> Runtime:
        """The client's heartbeat: the lease ends its length from now again. Whoever sees the
        runtime may renew it, through any server on the database (it is a write to the row);
        409 when it has no lease or the lease already ran out (it is being deleted)."""
        with self.records.tx() as s:
            rt = self.records.get(s, who, runtime_id, with_version=False)
            if rt.lease_seconds is None:
                raise RuntimeStateError(
                    f"runtime {rt.name!r} has no lease to renew; give it one with PATCH lease: SECONDS",
                    details={"field": "lease"},
                )
            now = self.records.clock()
            if self.records.renew_lease(s, rt.id, rt.lease_seconds, now) is None:
                s.expire(rt)
                if s.get(Runtime, runtime_id) is None:
                    raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
                raise self._lease_over(rt)
        with self.records.db.session() as s:
            return self.records.get(s, who, runtime_id)

    @staticmethod
    def _lease_over(rt: Runtime) -> LeaseExpiredError:
        expires_at = rt.lease_expires_at
        assert expires_at is not None
        return LeaseExpiredError(
            leases.expired_error_message(rt.name, expires_at),
            details={"field": "lease", "lease_expires_at": expires_at.isoformat()},
        )

    def _apply_lease(self, rt: Runtime, changes: RuntimeChanges) -> tuple[dict[str, Any], list[str]]:
        """A PATCH's lease: a new length (starting now) or none; the row's new columns and the
        runner-log notes. A lease that ran out is over: changing or dropping it is a 409, as
        renewing it is."""
        if changes.lease is None and not changes.clear_lease:
            return {}, []
        now = self.records.clock()
        if rt.lease_expires_at is not None and rt.lease_expires_at <= now:
            raise self._lease_over(rt)
        if changes.clear_lease:
            if rt.lease_seconds is None:
                return {}, []
            none = {"lease_seconds": None, "lease_expires_at": None, "lease_renewed_at": None}
            return none, ["lease dropped: the runtime no longer goes with its client"]
        assert changes.lease is not None
        leases.check_lease_allowed(rt.team)
        until = leases.ends_at(changes.lease, now)
        values = {"lease_seconds": changes.lease, "lease_expires_at": until, "lease_renewed_at": now}
        return values, [f"lease -> {changes.lease} s, until {until.isoformat(timespec='seconds')}"]

    def _check_mounts(self, mounts: list[Any] | None) -> list[dict[str, Any]]:
        """Mounts checked (R28, R29) before anything is stored; their stored form."""
        checked = check_mounts(mounts, allow_hosts=self.settings.mounts_allow_hosts)
        return mounts_json(checked)

    def _reboot_changes(
        self, s: Session, rt: Runtime, changes: RuntimeChanges, ref: Any, reader: visibility.Reader
    ) -> dict[str, Any]:
        """The container-shaping fields the PATCH sends (field -> new value); a new environment
        is resolved for ``reader``, who asks for it."""
        wanted: dict[str, Any] = {}
        if changes.machine_type is not None:
            wanted["machine_type"] = changes.machine_type
        if changes.type is not None:
            wanted["type"] = {"type": changes.type, "kernel": check_type(changes.type, changes.kernel)}
        if changes.cuda is not None or changes.clear_cuda:
            wanted["cuda"] = changes.cuda
        if changes.env:
            merged = envvars.merge(reboot.effective(rt, "env"), changes.env)
            wanted["env"] = secrets.resolve(s, rt.owner_id, merged, team_only=rt.team)
        if ref is not None:
            version = visibility.resolve(s, ref, reader, "environment")
            wanted["environment"] = {"ref": str(ref), "version_id": version.id, "version": version.ref}
        return wanted

    def _apply_at_once(self, s: Session, rt: Runtime, changes: RuntimeChanges) -> tuple[dict[str, Any], list[str]]:
        """Name, idle timeout and default language: no reboot needed. Returns the row's new
        columns and the runner-log notes."""
        values: dict[str, Any] = {}
        notes = []
        if changes.name is not None and changes.name != rt.name:
            self._check_name_free(s, rt.owner_id, rt.team, changes.name)
            notes.append(f"name {rt.name} -> {changes.name}")
            values["name"] = changes.name
        if changes.clear_idle_timeout:
            values["idle_timeout"] = None
            notes.append("idle timeout -> default")
        elif changes.idle_timeout is not None:
            values["idle_timeout"] = changes.idle_timeout
            notes.append(f"idle timeout -> {changes.idle_timeout} s")
        if changes.language is not None:
            values["language"] = changes.language
            notes.append(f"language -> {changes.language}")
        return values, notes

    @staticmethod
    def _apply_reboot_changes(rt: Runtime, wanted: dict[str, Any], next_boot: bool) -> tuple[dict[str, Any], list[str]]:
        """The row's new columns for the reboot fields (at once when stopped, else pending) and
        the runner-log notes."""
        fields = [f for f in reboot.REBOOT_FIELDS if f in wanted]
        stopped = rt.state in (State.STOPPED, State.ERROR)
        if "environment" in wanted and rt.draft_image_id and (stopped or not next_boot):
            raise RuntimeStateError(
                "environment: the runtime has unsaved changes from its current version; save them "
                f"(`envctl save {rt.name} --as NAME`) or throw them away (`envctl runtime reset {rt.name}`) first",
                details={"field": "environment", "unsaved_changes": len(rt.draft_changes or [])},
            )
        if stopped:
            pending = dict(rt.pending or {})
            values: dict[str, Any] = {}
            for f in fields:
                pending.pop(f, None)
                values.update(reboot.columns(f, wanted[f]))
            return {**values, "pending": pending}, [reboot.note(f, wanted[f]) for f in fields]
        if not next_boot:
            raise RuntimeStateError(
                f"{', '.join(fields)} can only change while the runtime is stopped (they need a reboot); "
                f"it is {rt.state}. Stop it first (`envctl runtime stop {rt.name}`), or ask for the change "
                "at its next boot (`?apply=next-boot`, `envctl runtime set ... --next-boot`).",
                details={"fields": fields, "needs_reboot": fields, "state": rt.state},
            )
        pending = {**(rt.pending or {}), **{f: wanted[f] for f in fields}}
        return {"pending": pending}, [f"at the next boot: {reboot.note(f, wanted[f])}" for f in fields]

    @staticmethod
    def _check_name_free(s: Session, owner_id: str, team: str | None, name: str) -> None:
        """A team runtime's name is unique within its team, a personal one's among its owner's
        personal runtimes (409 naming the clash)."""
        if team is not None:
            if s.scalar(select(Runtime.id).where(Runtime.team == team, Runtime.name == name)):
                raise RuntimeStateError(
                    f"name: team {team!r} already has a runtime named {name!r}; choose another name",
                    details={"field": "name", "name": name, "team": team},
                )
        elif s.scalar(
            select(Runtime.id).where(Runtime.owner_id == owner_id, Runtime.team.is_(None), Runtime.name == name)
        ):
            raise RuntimeStateError(
                f"name: you already have a runtime named {name!r}; choose another name",
                details={"field": "name", "name": name},
            )


def check_team_mounts(team: str | None, mounts: list[dict[str, Any]]) -> None:
    """A team runtime mounts no volume but its team's (``TEAM/NAME``): its members would read
    and write any other (the owner's own, another team's) through its cells."""
    if team is None:
        return
    for i, m in enumerate(from_json(mounts)):
        if isinstance(m, VolumeMount) and m.name.partition("/")[:2] != (team, "/"):
            raise InvalidInputError(
                f"mounts[{i}].name: a runtime of team {team!r} mounts only that team's volumes ({team}/NAME)",
                field=f"mounts[{i}].name",
            )


def check_choice(value: str, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise InvalidInputError(f"{field}: {str(value)[:40]!r} is not one of {', '.join(choices)}", field=field)


def check_type(type: str, kernel: str | None) -> str | None:
    """The runtime type, checked; the kernel it takes (python3 by default for jupyter)."""
    check_choice(type, RUNTIME_TYPES, "type")
    if type == "jupyter":
        kernel = kernel or "python3"
        if not KERNEL_RE.match(kernel):
            raise InvalidInputError(
                f"kernel: {kernel[:64]!r} is not a kernelspec name (letters, digits, . _ -)", field="kernel"
            )
        return kernel
    if kernel is not None:
        raise InvalidInputError("kernel: only runtimes of type jupyter take a kernel", field="kernel")
    return None


def check_idle_timeout(value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or value < 0 or value > MAX_IDLE_TIMEOUT:
        raise InvalidInputError(
            f"idle_timeout: must be whole seconds from 0 (never) to {MAX_IDLE_TIMEOUT}", field="idle_timeout"
        )
