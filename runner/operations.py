"""Operations: long work that a 202 answer points at (saves, builds; later pushes, pulls).

One place creates them, moves their phase along, and records how they ended, so every kind of
long work reads the same at ``GET /operations/{id}``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from envs.kit.errors import EnvctlError, NotFoundError
from envs.kit.ids import new_id
from runner.models import Operation

if TYPE_CHECKING:
    from runner.service import RunnerService

log = logging.getLogger("envctl.operations")


class OperationNotFoundError(NotFoundError):
    code = "operation_not_found"


class Operations:
    def __init__(self, runner: RunnerService) -> None:
        self.runner = runner

    def create(
        self,
        owner_id: str,
        kind: str,
        message: str,
        *,
        runtime_id: str | None = None,
        result: dict[str, Any] | None = None,
        finished: bool = False,
    ) -> Operation:
        """Record a new operation (running, or already ``succeeded`` when ``finished``)."""
        now = self.runner.clock()
        op = Operation(
            id=new_id("op"),
            owner_id=owner_id,
            kind=kind,
            runtime_id=runtime_id,
            status="succeeded" if finished else "running",
            phase="succeeded" if finished else "queued",
            message=message,
            result=dict(result or {}),
            created_at=now,
            finished_at=now if finished else None,
        )
        with self.runner.db.session() as s:
            s.add(op)
        return op

    def phase(self, op_id: str, phase: str, message: str, **values: Any) -> None:
        with self.runner.db.connection() as c:
            c.execute(update(Operation).where(Operation.id == op_id).values(phase=phase, message=message, **values))

    def finish(
        self,
        op_id: str,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        message: str = "",
    ) -> None:
        with self.runner.db.connection() as c:
            c.execute(
                update(Operation)
                .where(Operation.id == op_id)
                .values(
                    status=status,
                    phase=status,
                    result=result or {},
                    error=error,
                    message=message,
                    finished_at=self.runner.clock(),
                )
            )
        self.runner.notify()

    def fail(self, op_id: str, exc: Exception, what: str, *, result: dict[str, Any] | None = None) -> str:
        """Record ``exc`` as the end of the operation; returns the message a person reads."""
        if isinstance(exc, EnvctlError):
            error, text = exc.to_dict(), exc.message
        else:
            log.exception("%s %s failed", what, op_id)
            text = f"the {what} failed unexpectedly; see envctl's log"
            error = {"code": "internal", "message": text, "details": {}}
        self.finish(op_id, "failed", error=error, message=text, result=result)
        return text

    def get(self, owner_id: str, op_id: str) -> Operation:
        with self.runner.db.session() as s:
            op = s.get(Operation, op_id)
            if op is None or op.owner_id != owner_id:
                raise OperationNotFoundError(f"operation {op_id[:64]!r} does not exist")
            return op
