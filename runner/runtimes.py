"""Runtimes as records a user makes and changes: create, read, list and change settings.

A runtime is made ``stopped``, pinned to the exact version its environment reference means
now (a tag is resolved once; later saves never move it), and owned by the runner that made it.
Settings that shape the container (environment, machine type) change only while it is
stopped (409 otherwise, saying so). Starting, stopping and deleting are ``runner/lifecycle.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs import service as envs_service
from envs.kit.config import Settings
from envs.kit.errors import InvalidInputError
from envs.kit.ids import new_id
from envs.refs import check_name, parse_ref
from runner.errors import RuntimeStateError
from runner.machines import get_machine_type
from runner.models import Runtime
from runner.records import Records
from runner.states import State

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


class Runtimes:
    def __init__(self, settings: Settings, records: Records, backend_name: str) -> None:
        self.settings = settings
        self.records = records
        self.backend_name = backend_name

    def create(
        self,
        owner_id: str,
        *,
        name: str,
        environment: str,
        language: str = "python",
        machine_type: str = "small",
        idle_timeout: int | None = None,
        type: str = "native",
        kernel: str | None = None,
    ) -> Runtime:
        check_name(name, "name", "runtime name")
        check_choice(language, LANGUAGES, "language")
        check_choice(type, RUNTIME_TYPES, "type")
        if type == "jupyter":
            kernel = kernel or "python3"
            if not KERNEL_RE.match(kernel):
                raise InvalidInputError(
                    f"kernel: {kernel[:64]!r} is not a kernelspec name (letters, digits, . _ -)", field="kernel"
                )
        elif kernel is not None:
            raise InvalidInputError("kernel: only runtimes of type jupyter take a kernel", field="kernel")
        check_idle_timeout(idle_timeout)
        get_machine_type(self.settings, machine_type)
        ref = parse_ref(environment, "environment")
        now = self.records.clock()
        with self.records.tx() as s:
            version = envs_service.resolve(s, ref, "environment")
            self._check_name_free(s, owner_id, name)
            rt = Runtime(
                id=new_id("rt"),
                owner_id=owner_id,
                name=name,
                type=type,
                kernel=kernel,
                language=language,
                environment_ref=str(ref),
                version_id=version.id,
                machine_type=machine_type,
                idle_timeout=idle_timeout,
                state=State.STOPPED,
                state_reason="created",
                state_message=f"created from {version.ref}",
                runner=self.records.runner,
                backend=self.backend_name,
                backend_state={},
                next_seq=0,
                created_at=now,
                updated_at=now,
            )
            s.add(rt)
            s.flush()
            self.records.log(s, rt.id, state=State.STOPPED, reason="created", message=f"pinned to {version.ref}")
            return self.records.get(s, owner_id, rt.id)

    def get(self, owner_id: str, runtime_id: str) -> Runtime:
        with self.records.db.session() as s:
            return self.records.get(s, owner_id, runtime_id)

    def update(self, owner_id: str, runtime_id: str, changes: RuntimeChanges) -> Runtime:
        """Change settings. Those that shape the container need the runtime stopped (409)."""
        if changes.name is not None:
            check_name(changes.name, "name", "runtime name")
        if changes.language is not None:
            check_choice(changes.language, LANGUAGES, "language")
        check_idle_timeout(changes.idle_timeout)
        if changes.machine_type is not None:
            get_machine_type(self.settings, changes.machine_type)
        ref = parse_ref(changes.environment, "environment") if changes.environment is not None else None
        with self.records.tx() as s:
            rt = self.records.get_mine(s, owner_id, runtime_id, for_update=True)
            container_fields = [
                f for f, v in (("environment", ref), ("machine_type", changes.machine_type)) if v is not None
            ]
            if ref is not None and rt.draft_image_id:
                raise RuntimeStateError(
                    "environment: the runtime has unsaved changes from its current version; save them "
                    f"(`envctl save {rt.name} --as NAME`) or throw them away (`envctl runtime reset {rt.name}`) first",
                    details={"field": "environment", "unsaved_changes": len(rt.draft_changes or [])},
                )
            if container_fields and rt.state not in (State.STOPPED, State.ERROR):
                raise RuntimeStateError(
                    f"{', '.join(container_fields)} can only change while the runtime is stopped; "
                    f"it is {rt.state}. Stop it first (`envctl runtime stop {rt.name}`).",
                    details={"fields": container_fields, "state": rt.state},
                )
            notes = []
            if changes.name is not None and changes.name != rt.name:
                self._check_name_free(s, owner_id, changes.name)
                notes.append(f"name {rt.name} -> {changes.name}")
                rt.name = changes.name
            if changes.clear_idle_timeout:
                rt.idle_timeout = None
                notes.append("idle timeout -> default")
            elif changes.idle_timeout is not None:
                rt.idle_timeout = changes.idle_timeout
                notes.append(f"idle timeout -> {changes.idle_timeout} s")
            if changes.language is not None:
                rt.language = changes.language
                notes.append(f"language -> {changes.language}")
            if changes.machine_type is not None:
                rt.machine_type = changes.machine_type
                notes.append(f"machine type -> {changes.machine_type}")
            if ref is not None:
                version = envs_service.resolve(s, ref, "environment")
                rt.version_id = version.id
                rt.environment_ref = str(ref)
                notes.append(f"environment -> {version.ref}")
            if notes:
                rt.updated_at = self.records.clock()
                self.records.log(s, rt.id, event="settings-changed", reason="user-request", message="; ".join(notes))
            s.flush()
            s.expire(rt)
            return self.records.get(s, owner_id, runtime_id)

    @staticmethod
    def _check_name_free(s: Session, owner_id: str, name: str) -> None:
        if s.scalar(select(Runtime.id).where(Runtime.owner_id == owner_id, Runtime.name == name)):
            raise RuntimeStateError(f"name: you already have a runtime named {name!r}", details={"field": "name"})


def check_choice(value: str, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise InvalidInputError(f"{field}: {str(value)[:40]!r} is not one of {', '.join(choices)}", field=field)


def check_idle_timeout(value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or value < 0 or value > MAX_IDLE_TIMEOUT:
        raise InvalidInputError(
            f"idle_timeout: must be whole seconds from 0 (never) to {MAX_IDLE_TIMEOUT}", field="idle_timeout"
        )
