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
    Select,
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
from runner.models import Execution, ExecutionOutput, ResultFile
from runner.runtimes.store import CLAIMED, claimed_cte

INSERT_EXECUTION = HotStatement(insert(Execution))
INSERT_OUTPUTS = HotStatement(insert(ExecutionOutput))


def _claim_and_queue() -> Select[Any]:
    """A cell's way in on PostgreSQL as one statement: the runtime's number taken (only if the
    runtime is this runner's and the caller sees it: ``claimed_cte``), the queued execution
    written from the runtime's row, and what the number came with (``CLAIMED``) returned; no
    row and nothing written when the check fails. One statement is one transaction."""
    claimed = claimed_cte()
    c = claimed.c
    queued = (
        insert(Execution)
        .from_select(
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
                c.id,
                c.owner_id,
                c.team,
                bindparam("x_by", type_=String),
                c.next_seq,  # the number just taken
                func.coalesce(bindparam("x_language", type_=String), c.language),
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
                            c.state == literal("running", String),
                            cast(c.mounts_used, Text).not_in([literal("[]", Text), literal("null", Text)]),
                        ),
                        c.mounts_used,
                    ),
                    else_=null(),
                ),
            ).select_from(claimed),
        )
        .cte("queued")
    )
    return select(*(c[col.key] for col in CLAIMED)).add_cte(queued)


CLAIM_AND_QUEUE = HotStatement(_claim_and_queue())


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


def claim_and_queue(
    db: Database, claim: dict[str, Any], row: dict[str, Any], *, durable: bool
) -> tuple[Any, ...] | None:
    """A cell's way in on PostgreSQL, one statement and one round trip (``CLAIM_AND_QUEUE``):
    what its number came with (``CLAIMED``), or None when nothing was written (no such runtime,
    not this runner's, or not seen by the caller). ``claim``: ``b_id``, ``b_at``, ``b_what`` and
    ``claimer``'s; ``row``: ``id``, ``submitted_by``, ``language`` (None: the runtime's),
    ``code``, ``timeout``, ``created_at``."""
    return db.hot_one(
        CLAIM_AND_QUEUE,
        {
            **claim,
            "x_id": row["id"],
            "x_by": row["submitted_by"],
            "x_language": row["language"],
            "x_code": row["code"],
            "x_timeout": row["timeout"],
            "x_created": row["created_at"],
        },
        durable=durable,
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
