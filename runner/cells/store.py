"""The cells store: the one module that writes ``executions``, ``execution_outputs`` and
``result_files`` rows (``tests/test_layering.py`` checks that no other module does).

The statements of a cell's way in and out are built once and run through ``Database.hot()``
(``envs/kit/hot.py``) inside the caller's transaction, which may also hold the runtimes store's
statements (a cell's number, its activity): one transaction on the way in, one at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    Float,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    null,
    select,
    update,
)

from envs.kit.db import Database, EncodedJSON, HotStatement, HotWriter, UTCDateTime
from runner.models import Execution, ExecutionOutput, ResultFile, Runtime
from runner.runtimes.store import claimable

INSERT_EXECUTION = HotStatement(insert(Execution))
INSERT_OUTPUTS = HotStatement(insert(ExecutionOutput))
# A queued execution made from the runtime's row in SQL, for a pipelined database (PostgreSQL):
# it travels with the runtime's CLAIM_SEQ_SEEN and the COMMIT, and under the same condition, so
# it writes nothing when that does not (``insert_claimed``).
INSERT_CLAIMED = HotStatement(
    insert(Execution).from_select(
        [
            "id",
            "runtime_id",
            "owner_id",
            "team",
            "submitted_by",
            "seq",
            "language",
            "code",
            "timeout",
            "status",
            "created_at",
            "output_count",
            "output_bytes",
            "truncated",
            "mounts",
        ],
        select(
            bindparam("x_id", type_=String),
            Runtime.id,
            Runtime.owner_id,
            Runtime.team,
            bindparam("x_by", type_=String),
            Runtime.next_seq,  # the number CLAIM_SEQ_SEEN took, earlier in the transaction
            func.coalesce(bindparam("x_language", type_=String), Runtime.language),
            bindparam("x_code", type_=Text),
            bindparam("x_timeout", type_=Float),
            literal("queued", String),
            bindparam("x_created", type_=UTCDateTime),
            literal(0, Integer),
            literal(0, Integer),
            literal(False, Boolean),
            # what the runtime's mounts hold when it runs (none: NULL, as ``submit`` keeps it)
            case(
                (
                    and_(
                        Runtime.state == literal("running", String),
                        cast(Runtime.mounts_used, Text).not_in([literal("[]", Text), literal("null", Text)]),
                    ),
                    Runtime.mounts_used,
                ),
                else_=null(),
            ),
        ).where(claimable()),
    )
)
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


def insert_claimed(c: HotWriter, claim: dict[str, Any], row: dict[str, Any]) -> None:
    """A queued execution from the runtime's row, in the transaction of ``claim_seq_seen``
    (``claim``: its parameters), written only if that numbered it. ``row``: ``id``,
    ``submitted_by``, ``language`` (None: the runtime's), ``code``, ``timeout``, ``created_at``."""
    c.execute(
        INSERT_CLAIMED,
        {
            **claim,
            "x_id": row["id"],
            "x_by": row["submitted_by"],
            "x_language": row["language"],
            "x_code": row["code"],
            "x_timeout": row["timeout"],
            "x_created": row["created_at"],
        },
    )


def insert_outputs(
    c: HotWriter, execution_id: str, outputs: Sequence[tuple[int, dict[str, Any] | EncodedJSON]]
) -> None:
    """Outputs of an execution: (index, output) each, the output as a dict or already encoded."""
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
