"""The cells store: the one module that writes ``executions``, ``execution_outputs`` and
``result_files`` rows (``tests/test_layering.py`` checks that no other module does).

The statements of a cell's way in and out are built once and run through ``Database.hot()``
(``envs/kit/hot.py``) inside the caller's transaction, which may also hold the runtimes store's
statements (a cell's number, its activity): one transaction on the way in, one at the end.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, update

from envs.kit.db import Database, HotStatement, HotWriter
from runner.models import Execution, ExecutionOutput, ResultFile

INSERT_EXECUTION = HotStatement(insert(Execution))
INSERT_OUTPUTS = HotStatement(insert(ExecutionOutput))
FINISH_EXECUTION = HotStatement(
    update(Execution)
    .where(Execution.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        execution_count=bindparam("b_count"),
        started_at=bindparam("b_started"),
        finished_at=bindparam("b_finished"),
        truncated=bindparam("b_truncated"),
        output_bytes=bindparam("b_bytes"),
        output_count=bindparam("b_outputs"),
        error_name=bindparam("b_ename"),
        error_value=bindparam("b_evalue"),
    )
)
MARK_RUNNING = HotStatement(
    update(Execution)
    .where(Execution.id == bindparam("b_id"), Execution.status == "queued")
    .values(status="running", started_at=bindparam("b_started"))
)


def insert_execution(c: HotWriter, row: dict[str, Any]) -> None:
    """A queued execution (every column of ``executions`` given)."""
    c.execute(INSERT_EXECUTION, row)


def insert_outputs(c: HotWriter, execution_id: str, outputs: list[tuple[int, dict[str, Any]]]) -> None:
    """Outputs of an execution: (index, output) each."""
    c.execute_many(INSERT_OUTPUTS, [{"execution_id": execution_id, "idx": i, "output": o} for i, o in outputs])


def mark_running(c: HotWriter, execution_id: str, started_at: datetime | None) -> bool:
    """``queued`` -> ``running``; False when it is no longer queued (interrupted, ended)."""
    return bool(c.count(MARK_RUNNING, {"b_id": execution_id, "b_started": started_at}))


def finish(c: HotWriter, execution_id: str, **end: Any) -> None:
    """The end of an execution: ``status``, ``count``, ``started``, ``finished``, ``truncated``,
    ``bytes``, ``outputs``, ``ename``, ``evalue``."""
    c.execute(FINISH_EXECUTION, {"b_id": execution_id, **{f"b_{k}": v for k, v in end.items()}})


def interrupt_queued(db: Database, execution_id: str, at: datetime) -> bool:
    """A queued execution ends ``interrupted`` before it runs; False when it is no longer queued."""
    with db.connection() as c:
        done = c.execute(
            update(Execution)
            .where(Execution.id == execution_id, Execution.status == "queued")
            .values(status="interrupted", finished_at=at)
        ).rowcount
    return bool(done)


def set_queued_mounts(db: Database, runtime_id: str, used: list[dict[str, Any]]) -> None:
    """Cells queued before a boot run on what it mounted: they record it."""
    with db.connection() as c:
        c.execute(
            update(Execution)
            .where(Execution.runtime_id == runtime_id, Execution.status == "queued", Execution.mounts.is_(None))
            .values(mounts=used)
        )


def record_results(c: Connection, rows: list[dict[str, Any]]) -> None:
    """Versions of files cells wrote under /results (``runner/cells/results.py`` found and stored
    them), in the caller's transaction."""
    c.execute(insert(ResultFile), rows)
