"""Executions: submit cells, read their outputs, follow them live (SSE), interrupt them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.cells import MAX_WAIT, execution_out, run_cell, submitters
from api.deps import CallerDep, CtxDep
from api.schemas import ExecutionCreate, ExecutionOut
from api.views import sse
from runner.cells.streams import FINAL

router = APIRouter(tags=["executions"])
KEEPALIVE = 15.0


@router.post("/runtimes/{runtime_id}/executions", status_code=status.HTTP_202_ACCEPTED, response_model=ExecutionOut)
async def submit(
    runtime_id: str,
    body: ExecutionCreate,
    ctx: CtxDep,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for the cell to finish")] = 0,
) -> ExecutionOut:
    """Run a cell. Answers at once with the queued execution (a stopped runtime is booted
    first); with ``wait`` it answers as soon as the cell finishes, or after ``wait`` seconds."""
    return await run_cell(ctx, caller, runtime_id, body, wait)


@router.get("/runtimes/{runtime_id}/executions", response_model=list[ExecutionOut])
def list_executions(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[ExecutionOut]:
    """The runtime's latest executions, newest first."""
    views = ctx.runner.executions.list_for_runtime(caller.viewer, runtime_id)
    names = submitters(ctx, caller, views)
    return [execution_out(ctx, caller, ex, names) for ex in views]


@router.get("/executions/{execution_id}", response_model=ExecutionOut)
def get_execution(
    execution_id: str,
    ctx: CtxDep,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for it to finish")] = 0,
) -> ExecutionOut:
    manager = ctx.runner.executions
    ex = manager.get(caller.viewer, execution_id)
    if wait and ex.status not in FINAL:
        manager.wait(execution_id, wait)
        ex = manager.get(caller.viewer, execution_id)
    return execution_out(ctx, caller, ex)


@router.post("/executions/{execution_id}/interrupt", status_code=status.HTTP_202_ACCEPTED, response_model=ExecutionOut)
def interrupt(execution_id: str, ctx: CtxDep, caller: CallerDep) -> ExecutionOut:
    """Stop the running cell; the interpreter's state stays. A queued cell never runs."""
    return execution_out(ctx, caller, ctx.runner.executions.interrupt(caller.viewer, execution_id))


@router.get(
    "/executions/{execution_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
)
async def events(
    execution_id: str,
    request: Request,
    ctx: CtxDep,
    caller: CallerDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    start: Annotated[int, Query(alias="from", ge=0, description="first output index to send")] = 0,
) -> StreamingResponse:
    """Outputs as server-sent events, live: one ``output`` event each (its ``id`` is the
    output's index), then one ``status`` event with the final status, then the stream ends.
    A client that reconnects with ``Last-Event-ID`` continues after the last event it saw."""
    manager = ctx.runner.executions
    await run_in_threadpool(manager.get, caller.viewer, execution_id)  # a 404 before the stream starts
    if last_event_id is not None and last_event_id.strip().isdigit():
        start = max(start, int(last_event_id) + 1)
    loop = asyncio.get_running_loop()

    async def stream() -> AsyncIterator[bytes]:
        sent_at = loop.time()
        async with contextlib.aclosing(manager.follow(caller.viewer, execution_id, start, quiet=KEEPALIVE)) as events:
            async for event in events:
                if event is None:  # nothing happened for a while: is the client still there?
                    if await request.is_disconnected():
                        return
                    if loop.time() - sent_at >= KEEPALIVE:
                        yield b": keep-alive\n\n"
                        sent_at = loop.time()
                    continue
                if event.kind == "output":
                    yield sse("output", event.data, event.index, encoded=event.encoded)
                else:
                    yield sse("status", event.data)
                sent_at = loop.time()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
