"""Executions: cells submitted to a runtime, run in order, outputs stored and streamed live.

- ``submit`` records the cell (``queued``) and answers at once; the runtime's worker
  (``runner/cells/workers.py``) runs its cells one after another, booting the runtime first when
  it is stopped.
- Outputs go to the cell's feed at once (``runner/cells/streams.py``: clients following
  ``/executions/{id}/events`` see them immediately) and to the database in batches.
- Executions keep running with no client connected. If envctl dies mid-cell, the agent keeps
  the cell running and its outputs buffered; on restart ``recover`` attaches again from the
  last stored output, so nothing is lost or repeated.
- A queued or running execution makes the runtime busy, which idle shutdown respects.
- An execution carries its runtime's owner and team (whoever of them submitted it), so it is
  seen by whoever sees the runtime (``runner/runtimes/store.py``, ``Viewer``), also after it is gone;
  who submitted it is ``submitted_by`` (the caller's user id; envctl's own cells, such as a
  build's, the user they run for).
- Sequence numbers come from the database: ``submit``'s one statement on the way in bumps the
  runtime's ``next_seq`` and returns what the cell needs to know of the runtime (owner, team,
  language, type, runner, state), so no cache can go stale when another process changes or
  deletes the runtime, and two processes never hand out one number twice (R36).

A trivial cell's round trip is a few milliseconds, most of it spent handing work between
threads and processes, so the hot path avoids every hand-over it can:

- one transaction on the way in (``records.claim_seq`` + ``cellstore.insert_execution``; on
  PostgreSQL one statement, ``cellstore.claim_and_queue``, sent alone outside any pipeline) and
  one at the end, through ``Database.hot()``; "running" is written only for cells still going after
  ``MARK_RUNNING_AFTER``, by one shared timer thread;
- when the runtime's worker is idle and connected, ``submit`` sends the cell to the agent
  itself and the worker only reads its events;
- the end is published to waiting requests before it is written, and the write waits (a few
  ms at most) until those requests have answered (``waiting``); the write is made by one
  writer thread (``runner/cells/writes.py``), so the worker is free for the next cell while
  it commits; the agent is told the cell is stored (``ack``) with the next cell sent on the
  connection, or when the worker leaves it (``AgentChannel.post``): no message of its own on
  the hot path;
- on PostgreSQL the runtime's activity at a cell's end is written just after the end's
  transaction, without waiting for the disk (``HotWriter.execute_after``): the next cell's
  number (an update of the runtime's row) does not wait for that commit's flush;
- the way in is committed without waiting for the disk either (``QUEUED_DURABLE``, which says
  why that is safe); the end is a durable commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select

from envs.kit.db import Database
from envs.kit.errors import ConflictError, InvalidInputError
from envs.kit.ids import new_id
from runner.cells import store as cellstore
from runner.cells.streams import FINAL, Event, ExecutionView, Feed, Feeds, Subscriber
from runner.cells.workers import CellWorkers, Job
from runner.channel import AgentUnavailableError
from runner.errors import ExecutionNotFoundError, RuntimeNotFoundError
from runner.models import Execution, ExecutionOutput, Runtime
from runner.runtimes.states import State
from runner.runtimes.store import Records, Viewer, Who, claim_seq, claimer, viewer_of

log = logging.getLogger("envctl.executions")

LANGUAGES = ("python", "bash")
POLL = 0.5  # seconds between reads of an execution that another runner runs (``follow``)
MAX_CODE = 1024 * 1024
# A cell's way in (its number, the runtime's "execution submitted" activity, its queued row) is
# committed without waiting for the disk (``durable=False``: ``Database.hot_one``, ``envs/kit/hot.py``);
# its end (outputs, status, ``runner/cells/workers.py``) stays durable, as do results, runtime
# states and everything else. On PostgreSQL the way in is on the path a client waits on, and a
# flush of the disk there costs 1-4 ms on the machine here under load, against 0.4-0.6 ms for the
# whole round trip without it (``tests/bench/bench_cells.py`` measures the cell). Why losing it
# is harmless:
# - only a crash of the PostgreSQL server or its machine loses it (not one of envctl), and only
#   for the cells submitted in the last fraction of a second, whole: row, number and activity;
# - the log is replayed in order, and a cell's end is a durable commit made after its way in,
#   so a cell whose end is stored always has its row; what can vanish is a cell that had not
#   ended: its end could not be stored at that moment either (the database went away under
#   it; a durable row would have waited for the next start of envctl to attach again and
#   store it). Such a cell is gone from the runtime's history as if never submitted; its
#   outputs reached whoever followed it live, the interpreter's state is untouched, a later
#   "running" mark finds no queued row and interrupts it in the agent, and the agent drops
#   it with its old unacknowledged cells. Its number goes to the next cell: no two stored rows
#   ever share one (R36 holds);
# - SQLite as envctl runs it (WAL, synchronous=NORMAL) gives every commit just this guarantee.
QUEUED_DURABLE = False


def _json_list(value: Any) -> list[Any] | None:
    """A JSON column as a RETURNING of the hot path gives it (text on the DB-API path); None
    when empty."""
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return list(value) if value else None


def _view(viewer: Viewer, runtime_id: str, cell: dict[str, Any], found: tuple[Any, ...]) -> tuple[ExecutionView, str]:
    """A queued cell's view from what its number came with (``CLAIMED``); and the runtime's state."""
    seq, owner_id, team, rt_language, rt_type, kernel, _runner, state, mounts_used = found
    view = ExecutionView(
        id=cell["id"],
        runtime_id=runtime_id,
        owner_id=owner_id,
        team=team,
        submitted_by=viewer.user_id,
        seq=seq,
        language=cell["language"] or rt_language,
        code=cell["code"],
        timeout=cell["timeout"],
        status="queued",
        created_at=cell["created_at"],
        kernel=(kernel or "python3") if rt_type == "jupyter" else None,
        mounts=_json_list(mounts_used) if state == State.RUNNING else None,
    )
    return view, state


class ExecutionManager:
    def __init__(
        self,
        db: Database,
        records: Records,
        feeds: Feeds,
        workers: CellWorkers,
        clock: Callable[[], datetime],
    ) -> None:
        self.db = db
        self.records = records
        self.feeds = feeds
        self.workers = workers
        self.clock = clock
        # submit's transaction is a local file write on SQLite (quick enough for the API's
        # event loop) but network round trips on PostgreSQL (then the API calls it off the loop)
        self.submit_blocks = not db.local

    # ------------------------------------------------------------------ queries
    def get(self, who: Who, execution_id: str) -> ExecutionView:
        """An execution ``who`` sees (404 otherwise, as for a missing one)."""
        viewer = viewer_of(who)
        feed = self.feeds.get(execution_id)
        if feed is not None and viewer.sees(feed.view.owner_id, feed.view.team):
            return feed.view
        with self.db.session() as s:
            ex = s.get(Execution, execution_id)
            if ex is None or not viewer.sees(ex.owner_id, ex.team):
                raise ExecutionNotFoundError(f"execution {execution_id[:64]!r} does not exist")
            return ExecutionView.of(ex)

    def outputs(self, execution_id: str, start: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """Outputs from index ``start`` on: from memory while hot, else from the database."""
        feed = self.feeds.get(execution_id)
        if feed is not None:
            with feed.lock:
                return [(i, o) for i, o in enumerate(feed.outputs) if i >= start]
        with self.db.session() as s:
            rows = s.execute(
                select(ExecutionOutput.idx, ExecutionOutput.output)
                .where(ExecutionOutput.execution_id == execution_id, ExecutionOutput.idx >= start)
                .order_by(ExecutionOutput.idx)
            ).all()
        return [(r[0], r[1]) for r in rows]

    def list_for_runtime(self, who: Who, runtime_id: str, limit: int = 100) -> list[ExecutionView]:
        with self.db.session() as s:
            self.records.get(s, who, runtime_id, with_version=False)
            rows = s.scalars(
                select(Execution).where(Execution.runtime_id == runtime_id).order_by(Execution.seq.desc()).limit(limit)
            )
            # what is in memory is ahead of the rows (a cell's end is published, then written)
            views = []
            for r in rows:
                feed = self.feeds.get(r.id)
                views.append(feed.view if feed is not None else ExecutionView.of(r))
            return views

    def is_busy(self, runtime_id: str) -> bool:
        """A cell of the runtime is queued or running in this process."""
        return self.workers.is_busy(runtime_id)

    def busy_in_store(self, runtime_ids: list[str]) -> set[str]:
        """Which of these runtimes have a cell queued or running, as the database says: for
        runtimes of other runners, whose workers this process cannot see."""
        if not runtime_ids:
            return set()
        with self.db.connection() as c:
            rows = c.execute(
                select(Execution.runtime_id)
                .where(Execution.runtime_id.in_(runtime_ids), Execution.status.in_(["queued", "running"]))
                .distinct()
            )
            return {r[0] for r in rows}

    def subscribe(
        self, execution_id: str, callback: Subscriber
    ) -> tuple[list[dict[str, Any]] | None, Callable[[], None]]:
        """Listen to an execution of this process. Returns the outputs so far (None when this
        process does not have it in memory: read the database) and a function to stop."""
        feed = self.feeds.get(execution_id)
        if feed is None:
            return None, lambda: None
        with feed.lock:
            feed.subscribers.append(callback)
            snapshot = list(feed.outputs)
            final = feed.final

        def unsubscribe() -> None:
            with feed.lock:
                if callback in feed.subscribers:
                    feed.subscribers.remove(callback)

        if final is not None:
            callback(Event("status", data=final))
        return snapshot, unsubscribe

    @contextlib.asynccontextmanager
    async def waiting(self, execution_id: str, timeout: float) -> AsyncIterator[None]:
        """Wait (on the API's event loop, holding no thread) until the execution ends or
        ``timeout`` passes, then run the block: the caller answers its client there.

        The writer of cells' ends (``runner/cells/writes.py``) holds back the end's database
        write while such a block runs (at most ``ANSWER_FIRST`` seconds): the write and the
        answer would otherwise contend for the interpreter, and the client is the one waiting.
        Nothing is at risk meanwhile: the agent keeps the cell until it is acknowledged, which
        happens after the write.
        """
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_event(event: Event) -> None:
            if event.kind == "status":
                loop.call_soon_threadsafe(done.set)

        feed = self.feeds.get(execution_id)
        snapshot, unsubscribe = self.subscribe(execution_id, on_event)
        if feed is None or snapshot is None:
            yield
            return
        with feed.lock:
            feed.answering += 1
            feed.answered.clear()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
            unsubscribe()
            yield
        finally:
            unsubscribe()
            with feed.lock:
                feed.answering -= 1
                if feed.answering == 0:
                    feed.answered.set()

    async def follow(
        self, who: Who, execution_id: str, start: int = 0, *, quiet: float = 15.0
    ) -> AsyncGenerator[Event | None, None]:
        """An execution's events from output ``start`` on, as they happen: each output, then
        the final status (the last event). ``None`` when nothing happened for ``quiet`` seconds
        (the caller checks its client there). Live from this process's feed; an execution
        another runner runs is read from the store every ``POLL`` seconds."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, event)

        snapshot, unsubscribe = self.subscribe(execution_id, deliver)
        try:
            if snapshot is None:
                async for stored in self._follow_store(who, execution_id, start):
                    yield stored
                return
            next_index = start
            for idx, out in enumerate(snapshot):
                if idx >= next_index:
                    yield Event("output", index=idx, data=out)
                    next_index = idx + 1
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), quiet)
                except TimeoutError:
                    yield None
                    continue
                if event.kind != "output":
                    yield event
                    return
                if event.index >= next_index:
                    yield event
                    next_index = event.index + 1
        finally:
            unsubscribe()

    async def _follow_store(self, who: Who, execution_id: str, start: int) -> AsyncIterator[Event | None]:
        """``follow`` for an execution this process does not run: what the store has, read
        again every ``POLL`` seconds until it ends."""
        next_index = start
        while True:
            view = await asyncio.to_thread(self.get, who, execution_id)
            # outputs after the status: a cell's last outputs and its end commit together
            for idx, out in await asyncio.to_thread(self.outputs, execution_id, next_index):
                yield Event("output", index=idx, data=out)
                next_index = idx + 1
            if view.status in FINAL:
                data = {"status": view.status, "execution_count": view.execution_count, "truncated": view.truncated}
                yield Event("status", data=data)
                return
            yield None
            await asyncio.sleep(POLL)

    def wait(self, execution_id: str, timeout: float) -> None:
        feed = self.feeds.get(execution_id)
        if feed is not None:
            feed.done.wait(timeout)

    # ------------------------------------------------------------------ commands
    def submit(
        self,
        who: Who,
        runtime_id: str,
        *,
        code: str,
        language: str | None = None,
        timeout: float | None = None,
    ) -> ExecutionView:
        if language is not None and language not in LANGUAGES:
            raise InvalidInputError(
                f"language: {language[:20]!r} is not one of {', '.join(LANGUAGES)}", field="language"
            )
        if len(code) > MAX_CODE:
            raise InvalidInputError(f"code: a cell may hold at most {MAX_CODE} characters", field="code")
        if timeout is not None and not (0 < timeout <= 7 * 24 * 3600):
            raise InvalidInputError("timeout: must be seconds between 0 and one week, or null", field="timeout")
        now = self.clock()
        execution_id = new_id("ex")
        # One transaction on a cell's way in: the number, what the runtime is, the row. The
        # number is the order the cell runs in, so this process queues the runtime's cells in
        # the order the database numbered them: the transaction and the queueing happen under
        # the runtime's submit lock (other processes refuse cells for runtimes not theirs).
        viewer = viewer_of(who)
        cell = {"id": execution_id, "language": language, "code": code, "timeout": timeout, "created_at": now}
        with self.workers.in_order(runtime_id):
            if self.db.pipelined:
                view, state = self._claim_pipelined(viewer, runtime_id, cell)
            else:
                with self.db.hot(durable=QUEUED_DURABLE) as c:
                    found = claim_seq(c, runtime_id, now)
                    if found is None or not viewer.sees(found[1], found[2]):  # rolled back: not spent
                        raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
                    if found[6] != self.records.runner:
                        self.records.mine(found[6])  # raises, naming the owner
                    view, state = _view(viewer, runtime_id, cell, found)
                    cellstore.insert_execution(
                        c,
                        {
                            "id": execution_id,
                            "runtime_id": runtime_id,
                            "owner_id": view.owner_id,
                            "team": view.team,
                            "submitted_by": viewer.user_id,
                            "seq": view.seq,
                            "language": view.language,
                            "code": code,
                            "timeout": timeout,
                            "status": "queued",
                            "created_at": now,
                            "output_count": 0,
                            "output_bytes": 0,
                            "truncated": False,
                            # what the runtime's mounts hold (a cell that boots it gets the boot's)
                            "mounts": view.mounts,
                        },
                    )
            self.feeds.add(Feed(view))
            self.workers.enqueue(Job(view, attach=False, runtime_running=state == State.RUNNING), send_now=True)
        return view

    def _claim_pipelined(self, viewer: Viewer, runtime_id: str, cell: dict[str, Any]) -> tuple[ExecutionView, str]:
        """``submit``'s transaction on PostgreSQL: one statement, the number and the row, in one
        round trip, the checks (the runtime is this runner's, the caller sees it) made in SQL;
        when they fail nothing was written, and a read says why."""
        mine = self.records.runner
        claim = {"b_id": runtime_id, "b_at": cell["created_at"], "b_what": "execution submitted"}
        found = cellstore.claim_and_queue(
            self.db,
            {**claim, **claimer(viewer, mine)},
            {**cell, "submitted_by": viewer.user_id},
            durable=QUEUED_DURABLE,
        )
        if found is None:
            with self.db.connection() as conn:
                row = conn.execute(
                    select(Runtime.owner_id, Runtime.team, Runtime.runner).where(Runtime.id == runtime_id)
                ).first()
            if row is not None and viewer.sees(row[0], row[1]) and row[2] != mine:
                self.records.mine(row[2])  # raises, naming the owner
            raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
        return _view(viewer, runtime_id, cell, found)

    def interrupt(self, who: Who, execution_id: str) -> ExecutionView:
        view = self.get(who, execution_id)
        if view.status in FINAL:
            return view
        with self.db.connection() as c:
            runner = c.scalar(select(Runtime.runner).where(Runtime.id == view.runtime_id))
        if runner is None:
            raise ExecutionNotFoundError(f"execution {execution_id[:64]!r} does not exist")
        self.records.mine(runner)
        if view.status == "queued" and cellstore.interrupt_queued(self.db, execution_id, self.clock()):
            feed = self.feeds.live(execution_id)
            if feed is not None:
                feed.view.status = "interrupted"
                feed.view.finished_at = self.clock()
                feed.publish(Event("status", data={"status": "interrupted", "execution_count": None}))
            return self.get(who, execution_id)
        try:
            self.workers.interrupt(view)
        except AgentUnavailableError as exc:
            raise ConflictError(
                f"the runtime's agent does not answer, so the cell cannot be interrupted: {exc.message}"
            ) from exc
        return self.get(who, execution_id)

    def recover(self) -> None:
        """After a restart: attach to cells that were running, queue the ones that waited."""
        with self.db.session() as s:
            rows = s.execute(
                select(Execution, Runtime.type, Runtime.kernel, Runtime.state)
                .join(Runtime, Runtime.id == Execution.runtime_id)
                .where(Runtime.runner == self.records.runner, Execution.status.in_(["queued", "running"]))
                .order_by(Execution.runtime_id, Execution.seq)
            ).all()
            jobs = []
            for ex, rtype, kernel, state in rows:
                view = ExecutionView.of(ex)
                view.kernel = (kernel or "python3") if rtype == "jupyter" else None
                jobs.append(Job(view, attach=view.status == "running", runtime_running=state == State.RUNNING))
            outputs = {
                j.view.id: [o for _, o in self._stored_outputs(s, j.view.id)]
                for j in jobs
                if not self.feeds.has(j.view.id)
            }
        for job in jobs:
            if job.view.id not in outputs:
                continue
            feed = Feed(job.view)
            feed.outputs = outputs[job.view.id]
            self.feeds.add(feed)
            self.workers.enqueue(job)

    @staticmethod
    def _stored_outputs(s: Any, execution_id: str) -> list[tuple[int, dict[str, Any]]]:
        rows = s.execute(
            select(ExecutionOutput.idx, ExecutionOutput.output)
            .where(ExecutionOutput.execution_id == execution_id)
            .order_by(ExecutionOutput.idx)
        ).all()
        return [(r[0], r[1]) for r in rows]
