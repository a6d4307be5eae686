"""A cell submitted through the API: recorded for its runtime, and shown as the API shows it.

One place for the submit path that ``POST /runtimes/{id}/executions``, its fast path
(``api/fastpath.py``) and create-and-run (``POST /runtimes`` with a ``cell``) share.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from api.deps import Caller
from api.schemas import ExecutionCreate, ExecutionOut
from registry import service as registry_service
from runner.executions import ExecutionManager
from runner.feeds import ExecutionView, merge_streams
from runner.records import Viewer


def submitters(ctx: Any, caller: Caller, views: list[ExecutionView]) -> dict[str, str]:
    """The names of who submitted ``views``, by user id (a row from before revision 0016: its
    owner). The caller's own cells, the usual case and the hot path's, read no database."""
    names = {caller.id: caller.name}
    others = {ex.submitted_by or ex.owner_id for ex in views} - names.keys()
    if others:
        with ctx.db.session() as s:
            names.update(registry_service.user_names(s, others))
    return names


def execution_out(ctx: Any, caller: Caller, ex: ExecutionView, names: dict[str, str] | None = None) -> ExecutionOut:
    """``names``: ``submitters`` of a list the execution is in (read here otherwise)."""
    outputs = [o for _, o in ctx.runner.executions.outputs(ex.id)]
    if names is None:
        names = submitters(ctx, caller, [ex])
    return ExecutionOut(
        id=ex.id,
        runtime_id=ex.runtime_id,
        submitted_by=names.get(ex.submitted_by or ex.owner_id),
        seq=ex.seq,
        language=ex.language,
        code=ex.code,
        status=ex.status,  # type: ignore[arg-type]
        execution_count=ex.execution_count,
        outputs=merge_streams(outputs),
        output_bytes=ex.output_bytes,
        truncated=ex.truncated,
        error_name=ex.error_name,
        error_value=ex.error_value,
        created_at=ex.created_at,
        started_at=ex.started_at,
        finished_at=ex.finished_at,
        mounts=ex.mounts,
    )


async def record_cell(
    manager: ExecutionManager, viewer: Viewer, runtime_id: str, body: ExecutionCreate
) -> ExecutionView:
    """Record the cell. On SQLite that is one short local write, made on the event loop: a
    cell's round trip is dominated by hops between threads. On PostgreSQL it is network round
    trips, which the event loop does not wait on: a thread does."""

    def record() -> ExecutionView:
        return manager.submit(viewer, runtime_id, code=body.code, language=body.language, timeout=body.timeout)

    return await run_in_threadpool(record) if manager.submit_blocks else record()
