"""Event streams for pages that watch runtimes: the caller's runtimes as they change, and one
runtime's runner log as it grows. Both are server-sent events; neither needs the client to poll.

- ``GET /runtimes/events``: first a ``snapshot`` event with every runtime of the caller (the same
  objects ``GET /runtimes`` gives), then a ``runtime`` event each time one of them changes (state,
  phase, busy, idle shutdown, settings) and a ``removed`` event when one is deleted.
- ``GET /runtimes/{id}/log/events``: every line of the runner log, oldest first, then each new
  line as it is written; each event's ``id`` is the line's id, so a client that reconnects with
  ``Last-Event-ID`` gets only what it missed.
- ``GET /teams/{team}/events``: the team's events (``registry/events.py``: ``saved``,
  ``tag_moved``, ``deleted``, ``published``, ``unpublished``), oldest first, then each as it is
  committed; ``id`` is the event's, so ``Last-Event-ID`` resumes after it. Members only.

How a change reaches a stream: the database wakes its waiters once any transaction that wrote
has ended (``Database.committed``, ``envs/kit/db.py``); one thread per app (``Wakeups``) waits
on that and wakes each open stream, which then reads what it shows again and sends what
differs. What this process does not write (another runner's runtimes) is picked up by a
wake-up every ``SWEEP`` seconds. Neither stream is in the OpenAPI schema: a schema fuzzer would follow
them forever; they are described here and in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, Context, CtxDep, LiveViewer
from api.views import log_entry_out, runtimes_out, sse
from registry import events
from registry import teams as teams_service
from runner.errors import RuntimeNotFoundError

router = APIRouter(tags=["streams"])
SWEEP = 2.0  # seconds between wake-ups that nothing announced
KEEPALIVE = 15.0
SETTLE = 0.15  # a burst of commits is read once: at most a few reads a second per stream
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Wakeups:
    """Wakes the open event streams of one app when the runner commits a change.

    The thread holds the condition's lock except while it waits on it, so no notification
    falls between two waits; it ends when the last stream has gone, and starts with the next.
    """

    def __init__(self, changed: threading.Condition, sweep: float = SWEEP) -> None:
        self.changed = changed
        self.sweep = sweep
        self.lock = threading.Lock()
        self.streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self.thread: threading.Thread | None = None

    def subscribe(self) -> tuple[asyncio.Event, Callable[[], None]]:
        wake = asyncio.Event()
        key = id(wake)
        with self.lock:
            self.streams[key] = (asyncio.get_running_loop(), wake)
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="envctl-stream-wakeups", daemon=True)
                self.thread.start()

        def unsubscribe() -> None:
            with self.lock:
                self.streams.pop(key, None)

        return wake, unsubscribe

    def run(self) -> None:
        with self.changed:
            while True:
                self.changed.wait(self.sweep)
                with self.lock:
                    streams = list(self.streams.values())
                    if not streams:
                        self.thread = None
                        return
                for loop, wake in streams:
                    with contextlib.suppress(RuntimeError):  # that stream's loop closed: it is going away
                        loop.call_soon_threadsafe(wake.set)


def wakeups(request: Request, ctx: Context) -> Wakeups:
    state = request.app.state
    found: Wakeups | None = getattr(state, "stream_wakeups", None)
    if found is None:
        found = state.stream_wakeups = Wakeups(ctx.db.committed)
    return found


async def follow(request: Request, ctx: Context, read: Callable[[], list[bytes]]) -> AsyncIterator[bytes]:
    """Send what ``read`` (run in a thread) finds, at the start and after each wake-up; a
    comment line when nothing was sent for ``KEEPALIVE`` seconds keeps proxies from closing."""
    wake, unsubscribe = wakeups(request, ctx).subscribe()
    loop = asyncio.get_running_loop()
    try:
        yield b"retry: 500\n\n"  # ms before a cut-off client reconnects
        quiet_since = loop.time()
        while True:
            try:
                chunks = await run_in_threadpool(read)
            except RuntimeNotFoundError as exc:  # deleted while followed
                yield sse("gone", {"code": exc.code, "message": exc.message})
                return
            for chunk in chunks:
                yield chunk
            if chunks:
                quiet_since = loop.time()
            elif loop.time() - quiet_since > KEEPALIVE:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                quiet_since = loop.time()
            await wake.wait()
            await asyncio.sleep(SETTLE)  # what commits in the meantime is read with it
            wake.clear()
    finally:
        unsubscribe()


@router.get("/runtimes/events", include_in_schema=False)
async def runtime_events(request: Request, ctx: CtxDep, caller: CallerDep) -> StreamingResponse:
    """The caller's runtimes (their own and their teams'), live: a ``snapshot``, then
    ``runtime`` and ``removed`` events."""
    shown: dict[str, str] | None = None  # what the client has: runtime id -> its JSON
    viewer = LiveViewer(ctx, caller)  # their own and their teams' runtimes, as teams change

    def read() -> list[bytes]:
        nonlocal shown
        runtimes = runtimes_out(ctx.runner, ctx.runner.list(viewer()))
        now = {rt.id: rt.model_dump_json() for rt in runtimes}
        if shown is None:
            chunks = [sse("snapshot", [rt.model_dump(mode="json") for rt in runtimes])]
        else:
            chunks = [sse("runtime", json.loads(text)) for rid, text in now.items() if shown.get(rid) != text]
            chunks += [sse("removed", {"id": rid}) for rid in shown if rid not in now]
        shown = now
        return chunks

    return StreamingResponse(follow(request, ctx, read), media_type="text/event-stream", headers=HEADERS)


@router.get("/runtimes/{runtime_id}/log/events", include_in_schema=False)
async def log_events(
    runtime_id: str,
    request: Request,
    ctx: CtxDep,
    caller: CallerDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> StreamingResponse:
    """The runner log, live: one ``entry`` event per line, its ``id`` the line's id."""
    after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else 0
    await run_in_threadpool(ctx.runner.get, caller.viewer, runtime_id)  # 404 before the stream starts
    viewer = LiveViewer(ctx, caller)  # a member removed from its team: "gone"

    def read() -> list[bytes]:
        nonlocal after
        entries = ctx.runner.log_entries(viewer(), runtime_id, after)
        if entries:
            after = entries[-1].id
        return [sse("entry", log_entry_out(e).model_dump(mode="json"), e.id) for e in entries]

    return StreamingResponse(follow(request, ctx, read), media_type="text/event-stream", headers=HEADERS)


@router.get("/teams/{team}/events", include_in_schema=False)
async def team_events(
    team: str,
    request: Request,
    ctx: CtxDep,
    caller: CallerDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> StreamingResponse:
    """A team's events, live: one event per change, its ``id`` the event's; resumes after
    ``Last-Event-ID``. Members and envctl admins only (another team is a 404)."""
    after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else 0
    actor = teams_service.Actor(caller.id, caller.is_admin)

    def check() -> None:
        with ctx.db.session() as s:
            teams_service.get_team(s, team, actor)  # 404 before the stream starts

    await run_in_threadpool(check)

    def read() -> list[bytes]:
        nonlocal after
        with ctx.db.session() as s:
            found = events.after(s, team, after)
            chunks = [sse(e.kind, events.as_json(e), e.id) for e in found]
        if found:
            after = found[-1].id
        return chunks

    return StreamingResponse(follow(request, ctx, read), media_type="text/event-stream", headers=HEADERS)
