"""Operations: long work that a 202 answer points at (saves, builds; later pushes, pulls).

One place creates them, moves their phase along, and records how they ended, so every kind of
long work reads the same at ``GET /operations/{id}``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from envs.kit import stopwatch
from envs.kit.errors import EnvctlError, NotFoundError
from envs.kit.ids import new_id
from envs.models import EnvironmentVersion
from runner.backends.base import RuntimeBackend
from runner.errors import OperationNotFoundError
from runner.models import Operation, Runtime
from runner.runtimes.store import Records, Who, viewer_of, visible_to

log = logging.getLogger("envctl.operations")


class Operations:
    def __init__(
        self, records: Records, backend: RuntimeBackend, *, delete_runtime: Callable[[str, str], None]
    ) -> None:
        self.records = records
        self.db = records.db
        self.backend = backend
        self.delete_runtime = delete_runtime  # (owner id, runtime id): build runtimes left by a crash
        self.ended = threading.Condition()  # notified once an operation's end (finish) is committed

    def create(
        self,
        owner_id: str,
        kind: str,
        message: str,
        *,
        runtime_id: str | None = None,
        result: dict[str, Any] | None = None,
        finished: bool = False,
        session: Session | None = None,
    ) -> Operation:
        """Record a new operation (running, or already ``succeeded`` when ``finished``), in
        ``session``'s transaction when one is given."""
        now = self.records.clock()
        op = Operation(
            id=new_id("op"),
            owner_id=owner_id,
            kind=kind,
            runtime_id=runtime_id,
            runner=self.records.runner,
            status="succeeded" if finished else "running",
            phase="succeeded" if finished else "queued",
            message=message,
            result=dict(result or {}),
            created_at=now,
            finished_at=now if finished else None,
        )
        if session is not None:
            session.add(op)
            session.flush()
            return op
        with self.db.session() as s:
            s.add(op)
        return op

    def phase(self, op_id: str, phase: str, message: str, **values: Any) -> None:
        with stopwatch.span("phase-notes"), self.db.connection() as c:
            c.execute(update(Operation).where(Operation.id == op_id).values(phase=phase, message=message, **values))

    def update(self, op_id: str, *, steps: list[dict[str, Any]] | None = None, **values: Any) -> None:
        """Change columns of an operation; ``steps`` replaces ``result["steps"]`` (a build's)."""
        with self.db.connection() as c:
            if steps is not None:
                row = c.execute(Operation.__table__.select().where(Operation.id == op_id)).first()
                result = dict(row.result or {}) if row is not None else {}
                result["steps"] = steps
                values["result"] = result
            if values:
                c.execute(update(Operation).where(Operation.id == op_id).values(**values))

    def finish(
        self,
        op_id: str,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        message: str = "",
    ) -> None:
        with self.db.connection() as c:
            c.execute(
                update(Operation)
                .where(Operation.id == op_id)
                .values(
                    status=status,
                    phase=status,
                    result=result or {},
                    error=error,
                    message=message,
                    finished_at=self.records.clock(),
                )
            )
        with self.ended:
            self.ended.notify_all()

    def fail(self, op_id: str, exc: Exception, what: str, *, result: dict[str, Any] | None = None) -> str:
        """Record ``exc`` as the end of the operation; returns the message a person reads."""
        error, text = self.failure(op_id, exc, what)
        self.finish(op_id, "failed", error=error, message=text, result=result)
        return text

    @staticmethod
    def failure(op_id: str, exc: Exception, what: str) -> tuple[dict[str, Any], str]:
        """The error envelope and the message a person reads for ``exc`` (logged with its
        traceback when it is not one of envctl's own errors)."""
        if isinstance(exc, EnvctlError):
            return exc.to_dict(), exc.message
        log.exception("%s %s failed", what, op_id, exc_info=exc)
        text = f"the {what} failed unexpectedly; see envctl's log"
        return {"code": "internal", "message": text, "details": {}}, text

    def recover(self) -> list[str]:
        """End the operations this runner left unfinished when it last stopped (a crash, a
        SIGKILL): called at start, before any new work. A save whose version was recorded is
        marked done; any other ends ``failed`` with code ``interrupted``, and the images it had
        made but not recorded are removed, so nothing half-made is left (R15). Build runtimes
        are deleted. Returns the ids it ended."""
        with self.db.session() as s:
            mine = select(Operation).where(Operation.runner == self.records.runner, Operation.status == "running")
            stale = list(s.scalars(mine))
            facts = [(op.id, op.kind, op.owner_id, op.runtime_id, list(op.pending_images or [])) for op in stale]
        ended = []
        for op_id, kind, owner_id, runtime_id, pending in facts:
            try:
                self._recover_one(op_id, kind, owner_id, runtime_id, pending)
                ended.append(op_id)
            except EnvctlError as exc:
                log.warning("could not end interrupted operation %s: %s", op_id, exc.message)
        return ended

    def _recorded(self, pending: list[str]) -> dict[str, str] | None:
        """The version that records one of ``pending``'s images, if any."""
        if not pending:
            return None
        with self.db.session() as s:
            row = s.scalars(select(EnvironmentVersion).where(EnvironmentVersion.image_id.in_(pending))).first()
            return {"version": row.ref, "digest": row.digest, "image_id": row.image_id} if row is not None else None

    def discard_pending(self, op_id: str) -> None:
        """Remove the images the operation made that no version records (it failed)."""
        with self.db.session() as s:
            op = s.get(Operation, op_id)
            pending = list(op.pending_images or []) if op is not None else []
        self._remove_unrecorded(pending, self._recorded(pending))

    def _remove_unrecorded(self, pending: list[str], version: dict[str, str] | None) -> None:
        recorded = {version["image_id"]} if version is not None else set()
        for image in pending:
            if image not in recorded:
                with contextlib.suppress(EnvctlError):
                    self.backend.remove_image(image)

    def _recover_one(self, op_id: str, kind: str, owner_id: str, runtime_id: str | None, pending: list[str]) -> None:
        version = self._recorded(pending)
        if version is not None and kind == "save":
            self.finish(op_id, "succeeded", result=version, message=f"saved as {version['version']}")
            log.info("save %s had recorded %s before envctl stopped; marked done", op_id, version["version"])
            return
        self._remove_unrecorded(pending, version)
        if kind == "build" and runtime_id is not None:
            with contextlib.suppress(NotFoundError):
                self.delete_runtime(owner_id, runtime_id)
        text = f"envctl stopped while this {kind} ran; nothing was kept: run it again"
        self.finish(
            op_id,
            "failed",
            error={"code": "interrupted", "message": text, "details": {}},
            message=text,
        )
        if kind == "save" and runtime_id is not None:
            with self.records.tx() as s:
                rt = s.get(Runtime, runtime_id)
                state = dict(rt.backend_state or {}) if rt is not None else {}
                if rt is not None:
                    self.records.log(s, runtime_id, event="save-failed", reason="interrupted", message=text)
            with contextlib.suppress(EnvctlError):  # a save pauses its container while it reads it
                self.backend.resume(state)
        log.info("%s %s was interrupted by a restart; marked failed", kind, op_id)

    def set_pending(self, op_id: str, images: list[str]) -> None:
        """Note the images the operation made (or is making) that no version records yet."""
        with self.db.connection() as c:
            c.execute(update(Operation).where(Operation.id == op_id).values(pending_images=list(images)))

    def wait(self, who: Who, op_id: str, timeout: float) -> Operation:
        """The operation once it has ended, or as it is after ``timeout`` seconds. Woken by
        ``finish`` at once (no polling delay on the end of a save), and by nothing else that
        commits (a save's phase notes and record would each cost a read, meanwhile); an
        operation another process ends is seen within half a second."""
        deadline = time.monotonic() + timeout
        with self.ended:
            while True:
                op = self.get(who, op_id)
                remaining = deadline - time.monotonic()
                if op.status != "running" or remaining <= 0:
                    return op
                self.ended.wait(min(remaining, 0.5))

    def get(self, who: Who, op_id: str) -> Operation:
        """An operation ``who`` started, or one on a runtime ``who`` sees (a teammate's save of a
        team runtime); 404 for any other, as for a missing one."""
        with self.db.session() as s:
            op = s.get(Operation, op_id)
            if op is not None and op.owner_id != viewer_of(who).user_id:
                on_visible = op.runtime_id is not None and s.scalar(
                    select(Runtime.id).where(Runtime.id == op.runtime_id, visible_to(who))
                )
                op = op if on_visible else None
            if op is None:
                raise OperationNotFoundError(f"operation {op_id[:64]!r} does not exist")
            return op
