"""A cell's way through the API: ``run_cell`` records it and answers, the one function that
both ``POST /runtimes/{id}/executions`` (api/routes/executions.py) and the fast path for that
request (api/fastpath.py) call, and ``execution_out``, what every execution answer shows."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from api.deps import Caller, Context
from api.schemas import ExecutionCreate, ExecutionOut
from registry import users as registry_service
from runner.cells.streams import ExecutionView, merge_streams

MAX_WAIT = 30.0  # seconds a request may wait for its cell to finish


async def run_cell(ctx: Context, caller: Caller, runtime_id: str, cell: ExecutionCreate, wait: float) -> ExecutionOut:
    """Record the cell and answer: at once with the queued execution, or with ``wait`` as soon
    as it finishes (or after ``wait`` seconds).

    Recording is one short local write on SQLite, made on the event loop (a cell's round trip
    is dominated by hops between threads); on PostgreSQL it is network round trips, which the
    event loop does not wait on: a thread does."""
    manager = ctx.runner.executions

    def record() -> ExecutionView:
        return manager.submit(caller.viewer, runtime_id, code=cell.code, language=cell.language, timeout=cell.timeout)

    ex = await run_in_threadpool(record) if manager.submit_blocks else record()
    if not wait:
        return execution_out(ctx, caller, ex)
    async with manager.waiting(ex.id, wait):
        return execution_out(ctx, caller, manager.get(caller.viewer, ex.id))


def submitters(ctx: Context, caller: Caller, views: list[ExecutionView]) -> dict[str, str]:
    """The names of who submitted ``views``, by user id (a row from before revision 0016: its
    owner). The caller's own cells, the usual case and the hot path's, read no database."""
    names = {caller.id: caller.name}
    others = {ex.submitted_by or ex.owner_id for ex in views} - names.keys()
    if others:
        with ctx.db.session() as s:
            names.update(registry_service.user_names(s, others))
    return names


def execution_out(ctx: Context, caller: Caller, ex: ExecutionView, names: dict[str, str] | None = None) -> ExecutionOut:
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
