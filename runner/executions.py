"""Executions: cells submitted to a runtime, run in order, outputs stored and streamed live.

- ``submit`` records the cell (``queued``) and answers at once; a per-runtime worker thread
  runs the runtime's cells one after another, booting the runtime first when it is stopped.
- The worker streams the agent's events: each output goes to the live feed at once (clients
  following ``/executions/{id}/events`` see it immediately) and to the database in batches.
- Executions keep running with no client connected. If envctl dies mid-cell, the agent keeps
  the cell running and its outputs buffered; on restart ``recover`` attaches again from the
  last stored output, so nothing is lost or repeated.
- A running or queued execution makes the runtime busy, which idle shutdown respects.

A trivial cell's round trip is a few milliseconds, most of it spent handing work between
threads and processes, so the hot path avoids every hand-over it can:

- one database write on the way in (``INSERT_EXECUTION``) and one transaction at the end,
  both through ``Database.hot()``; "running" is written only for cells still going after
  ``MARK_RUNNING_AFTER``, by one shared timer thread;
- when the runtime's worker is idle and connected, ``submit`` sends the cell to the agent
  itself (``_send_now_locked``) and the worker only reads its events;
- the end is published to waiting requests before it is written, and the write waits (a few
  ms at most) until those requests have answered (``waiting``); the agent's ``ack`` follows
  the write without waiting for a reply (``AgentChannel.post``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, insert, select, update

from envs.kit.db import HotStatement, HotWriter
from envs.kit.errors import ConflictError, EnvctlError, InvalidInputError, NotFoundError
from envs.kit.ids import new_id
from runner.channel import AgentChannel, AgentUnavailableError
from runner.errors import RuntimeNotFoundError
from runner.models import Execution, ExecutionOutput, Runtime
from runner.states import State

if TYPE_CHECKING:
    from runner.service import RunnerService

log = logging.getLogger("envctl.executions")

FINAL = frozenset({"ok", "error", "interrupted"})
LANGUAGES = ("python", "bash")
MAX_CODE = 1024 * 1024
FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 256 * 1024
RECENT = 256  # finished executions kept in memory for fast reads
MARK_RUNNING_AFTER = 0.05  # seconds: quicker cells are never written down as "running"
SEND_NOW_MAX = 64 * 1024  # characters: larger cells are sent by the worker (no blocking write here)
ANSWER_FIRST = 0.01  # seconds the end's database write may wait for waiting clients' answers
STOP_WAIT = 300.0  # seconds a cell that arrives as its runtime stops waits for the stop, then boots it


# The statements of a cell's hot path, built once and run through ``Database.hot()``. A
# statement built per call with ``.values(...)`` costs about 1 ms of CPU to build and look up
# in the compiled cache, three times what executing it does; these are compiled once.
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
TOUCH_RUNTIME = HotStatement(
    update(Runtime)
    .where(Runtime.id == bindparam("b_id"))
    .values(last_activity_at=bindparam("b_at"), last_activity=bindparam("b_what"))
)


class ExecutionNotFoundError(NotFoundError):
    code = "execution_not_found"


@dataclass
class Event:
    kind: str  # "output" | "status"
    index: int = -1
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


@dataclass
class ExecutionView:
    """What the API shows of an execution: plain data, kept in memory while it is hot."""

    id: str
    runtime_id: str
    owner_id: str
    seq: int
    language: str
    code: str
    timeout: float | None
    status: str
    created_at: datetime
    kernel: str | None = None  # set for cells of jupyter runtimes: the kernelspec that runs them
    execution_count: int | None = None
    output_bytes: int = 0
    output_count: int = 0
    truncated: bool = False
    error_name: str | None = None
    error_value: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def of(cls, row: Execution) -> ExecutionView:
        return cls(
            id=row.id,
            runtime_id=row.runtime_id,
            owner_id=row.owner_id,
            seq=row.seq,
            language=row.language,
            code=row.code,
            timeout=row.timeout,
            status=row.status,
            created_at=row.created_at,
            execution_count=row.execution_count,
            output_bytes=row.output_bytes,
            output_count=row.output_count,
            truncated=row.truncated,
            error_name=row.error_name,
            error_value=row.error_value,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class Feed:
    """The live side of one execution: its view, outputs so far, and who listens."""

    def __init__(self, view: ExecutionView) -> None:
        self.view = view
        self.outputs: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.subscribers: list[Subscriber] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.answering = 0  # API requests answering their client about this execution's end
        self.answered = threading.Event()
        self.answered.set()

    def publish(self, event: Event) -> None:
        with self.lock:
            if event.kind == "output":
                self.outputs.append(event.data)
            else:
                self.final = event.data
            subscribers = list(self.subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # a slow or gone client must not stop the cell
                log.debug("subscriber failed", exc_info=True)
        if event.kind == "status":
            self.done.set()


@dataclass
class _RuntimeInfo:
    owner_id: str
    language: str
    type: str
    kernel: str | None
    next_seq: int


@dataclass
class _Job:
    view: ExecutionView
    attach: bool
    # set when submit sent the cell to an idle worker's agent itself (see ``_send_now``)
    events: Iterator[dict[str, Any]] | None = None


class ExecutionManager:
    def __init__(self, runner: RunnerService) -> None:
        self.runner = runner
        self.db = runner.db
        self._feeds: dict[str, Feed] = {}  # queued and running
        self._recent: OrderedDict[str, Feed] = OrderedDict()  # finished lately, for fast reads
        self._queues: dict[str, queue.Queue[_Job]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._busy: dict[str, str] = {}  # runtime id -> running execution id
        self._channels: dict[str, AgentChannel] = {}  # runtime id -> its worker's connection
        self._runtimes: dict[str, _RuntimeInfo] = {}  # what submit needs to know, remembered
        self._lock = threading.Lock()
        self._later = _Later("envctl-exec-marks")
        self.sent_at_once = 0  # cells that submit sent to the agent itself (see _send_now_locked)

    # ------------------------------------------------------------------ queries
    def _feed(self, execution_id: str) -> Feed | None:
        return self._feeds.get(execution_id) or self._recent.get(execution_id)

    def get(self, owner_id: str, execution_id: str) -> ExecutionView:
        feed = self._feed(execution_id)
        if feed is not None and feed.view.owner_id == owner_id:
            return feed.view
        with self.db.session() as s:
            ex = s.get(Execution, execution_id)
            if ex is None or ex.owner_id != owner_id:
                raise ExecutionNotFoundError(f"execution {execution_id[:64]!r} does not exist")
            return ExecutionView.of(ex)

    def outputs(self, execution_id: str, start: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """Outputs from index ``start`` on: from memory while hot, else from the database."""
        feed = self._feed(execution_id)
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

    def list_for_runtime(self, owner_id: str, runtime_id: str, limit: int = 100) -> list[ExecutionView]:
        self.runner.get(owner_id, runtime_id)
        with self.db.session() as s:
            rows = s.scalars(
                select(Execution).where(Execution.runtime_id == runtime_id).order_by(Execution.seq.desc()).limit(limit)
            )
            # what is in memory is ahead of the rows (a cell's end is published, then written)
            views = []
            for r in rows:
                feed = self._feed(r.id)
                views.append(feed.view if feed is not None and feed.view.owner_id == owner_id else ExecutionView.of(r))
            return views

    def is_busy(self, runtime_id: str) -> bool:
        """A cell of the runtime is queued or running. Counted from the moment it is queued
        until after its end is recorded (``task_done``), so the worker taking a job off the
        queue leaves no instant in which the runtime looks idle."""
        with self._lock:
            if runtime_id in self._busy:
                return True
            q = self._queues.get(runtime_id)
            return q is not None and q.unfinished_tasks > 0

    def subscribe(
        self, execution_id: str, callback: Subscriber
    ) -> tuple[list[dict[str, Any]] | None, Callable[[], None]]:
        """Listen to an execution of this process. Returns the outputs so far (None when this
        process does not have it in memory: read the database) and a function to stop."""
        feed = self._feed(execution_id)
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

        The worker holds back the end's database write while such a block runs (at most
        ``ANSWER_FIRST`` seconds): the write and the answer would otherwise contend for the
        interpreter, and the client is the one waiting. Nothing is at risk meanwhile: the agent
        keeps the cell until it is acknowledged, which happens after the write.
        """
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_event(event: Event) -> None:
            if event.kind == "status":
                loop.call_soon_threadsafe(done.set)

        feed = self._feed(execution_id)
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

    def wait(self, execution_id: str, timeout: float) -> None:
        feed = self._feed(execution_id)
        if feed is not None:
            feed.done.wait(timeout)

    # ------------------------------------------------------------------ commands
    def submit(
        self,
        owner_id: str,
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
        now = self.runner.clock()
        info = self._runtime_info(runtime_id)
        if info.owner_id != owner_id:
            raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
        with self._lock:
            seq = info.next_seq
            info.next_seq += 1
        view = ExecutionView(
            id=new_id("ex"),
            runtime_id=runtime_id,
            owner_id=owner_id,
            seq=seq,
            language=language or info.language,
            code=code,
            timeout=timeout,
            status="queued",
            created_at=now,
            kernel=(info.kernel or "python3") if info.type == "jupyter" else None,
        )
        # The one write on a cell's way in; what the runtime is and its next number are
        # remembered (see _runtime_info), so no read comes before it.
        with self.db.hot() as s:
            s.execute(
                INSERT_EXECUTION,
                {
                    "id": view.id,
                    "runtime_id": runtime_id,
                    "owner_id": owner_id,
                    "seq": seq,
                    "language": view.language,
                    "code": code,
                    "timeout": timeout,
                    "status": "queued",
                    "created_at": now,
                    "output_count": 0,
                    "output_bytes": 0,
                    "truncated": False,
                },
            )
        self._feeds[view.id] = Feed(view)
        self._enqueue(_Job(view, attach=False), send_now=True)
        return view

    def _send_now_locked(self, job: _Job, q: queue.Queue[_Job], worker: threading.Thread | None) -> None:
        """Send a cell to the agent at once when its runtime's worker is idle and connected.

        The worker would send it as soon as it woke up; sending here lets the agent start while
        the worker wakes, which takes a good part of a trivial cell's round trip. The worker
        then only reads the events. Anything unusual (a busy or absent worker, a runtime not
        known to run, a large cell, a broken connection) leaves the sending to the worker.
        Called with ``_lock`` held: an idle worker takes its next job, or exits and closes its
        connection, only under that lock.
        """
        view = job.view
        rid = view.runtime_id
        channel = self._channels.get(rid)
        if (
            len(view.code) > SEND_NOW_MAX
            or channel is None
            or worker is None
            or not worker.is_alive()
            or rid in self._busy
            or not q.empty()
            or not self.runner.is_running(rid)
        ):
            return
        try:
            job.events = self._send(channel, view)
            self.sent_at_once += 1
        except EnvctlError:
            job.events = None  # the worker finds out, and reconnects

    def _runtime_info(self, runtime_id: str) -> _RuntimeInfo:
        info = self._runtimes.get(runtime_id)
        if info is not None:
            return info
        with self.db.connection() as c:
            row = c.execute(
                select(Runtime.owner_id, Runtime.language, Runtime.type, Runtime.kernel).where(Runtime.id == runtime_id)
            ).first()
            if row is None:
                raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
            seq = c.scalar(select(func.max(Execution.seq)).where(Execution.runtime_id == runtime_id)) or 0
        info = _RuntimeInfo(owner_id=row[0], language=row[1], type=row[2], kernel=row[3], next_seq=seq + 1)
        with self._lock:
            return self._runtimes.setdefault(runtime_id, info)

    def forget_runtime(self, runtime_id: str) -> None:
        """The runtime's settings changed or it is gone: read them again next time."""
        with self._lock:
            self._runtimes.pop(runtime_id, None)

    def interrupt(self, owner_id: str, execution_id: str) -> ExecutionView:
        view = self.get(owner_id, execution_id)
        if view.status in FINAL:
            return view
        if view.status == "queued":
            with self.db.session() as s:
                done = s.execute(
                    update(Execution)
                    .where(Execution.id == execution_id, Execution.status == "queued")
                    .values(status="interrupted", finished_at=self.runner.clock())
                ).rowcount  # type: ignore[attr-defined]
            if done:
                feed = self._feeds.get(execution_id)
                if feed is not None:
                    feed.view.status = "interrupted"
                    feed.view.finished_at = self.runner.clock()
                    feed.publish(Event("status", data={"status": "interrupted", "execution_count": None}))
                return self.get(owner_id, execution_id)
        try:
            with AgentChannel(self._socket(view.runtime_id), timeout=5) as channel:
                channel.request("interrupt", execution_id=execution_id)
        except AgentUnavailableError as exc:
            raise ConflictError(
                f"the runtime's agent does not answer, so the cell cannot be interrupted: {exc.message}"
            ) from exc
        return self.get(owner_id, execution_id)

    def recover(self) -> None:
        """After a restart: attach to cells that were running, queue the ones that waited."""
        with self.db.session() as s:
            rows = s.execute(
                select(Execution, Runtime.type, Runtime.kernel)
                .join(Runtime, Runtime.id == Execution.runtime_id)
                .where(Runtime.runner == self.runner.runner, Execution.status.in_(["queued", "running"]))
                .order_by(Execution.runtime_id, Execution.seq)
            ).all()
            views = []
            for ex, rtype, kernel in rows:
                view = ExecutionView.of(ex)
                view.kernel = (kernel or "python3") if rtype == "jupyter" else None
                views.append(view)
        for view in views:
            if view.id in self._feeds:
                continue
            feed = Feed(view)
            feed.outputs = [o for _, o in self.outputs_from_db(view.id)]
            self._feeds[view.id] = feed
            self._enqueue(_Job(view, attach=view.status == "running"))

    # ------------------------------------------------------------------ workers
    def _enqueue(self, job: _Job, *, send_now: bool = False) -> None:
        runtime_id = job.view.runtime_id
        with self._lock:
            q = self._queues.setdefault(runtime_id, queue.Queue())
            worker = self._workers.get(runtime_id)
            if send_now:
                self._send_now_locked(job, q, worker)
            q.put(job)
            if worker is None or not worker.is_alive():
                worker = threading.Thread(
                    target=self._work, args=(runtime_id,), name=f"envctl-exec-{runtime_id}", daemon=True
                )
                self._workers[runtime_id] = worker
                worker.start()

    def _work(self, runtime_id: str) -> None:
        q = self._queues[runtime_id]
        while not self.runner._closing.is_set():
            try:
                # Linger a little: the next cell of a notebook usually follows at once.
                job = q.get(timeout=2.0)
            except queue.Empty:
                with self._lock:
                    if q.empty():
                        self._workers.pop(runtime_id, None)
                        self._drop_channel(runtime_id)
                        return
                continue
            with self._lock:
                self._busy[runtime_id] = job.view.id
            try:
                self._run(job)
            except Exception:
                log.exception("execution %s failed unexpectedly", job.view.id)
                try:
                    self._finish(
                        job.view,
                        "error",
                        None,
                        {},
                        error=("InternalError", "envctl failed while running this cell; see its log"),
                    )
                except Exception:  # e.g. the runtime was deleted meanwhile: the worker lives on
                    log.exception("could not record the end of execution %s", job.view.id)
            finally:
                with self._lock:
                    self._busy.pop(runtime_id, None)
                    q.task_done()

    def _socket(self, runtime_id: str) -> Path:
        return self.runner.backend.socket_path({}, self.runner.state_dir(runtime_id))

    def _run(self, job: _Job) -> None:
        view = job.view
        feed = self._feeds.get(view.id)
        if feed is None or view.status in FINAL:
            return
        attach = job.attach
        sent, job.events = job.events, None
        if not attach and sent is None:
            problem = self._ensure_running(view.owner_id, view.runtime_id)
            if problem is not None:
                self._finish(view, "error", None, {}, error=("RuntimeNotRunning", problem))
                return
            if view.status != "queued":
                return  # interrupted while it waited
        sink = _Sink(self, view, feed, start=len(feed.outputs))
        attempts = 0
        accepted = attach
        while True:
            try:
                channel = self._channel(view.runtime_id)
                if sent is not None:
                    events, sent = sent, None  # submit sent it already
                elif accepted:
                    events = channel.stream("attach", execution_id=view.id, **{"from": sink.next_index})
                else:
                    events = self._send(channel, view)
                for event in events:
                    kind = event.get("event")
                    if kind == "accepted":
                        accepted = True  # from here on, a lost connection means: attach again
                    elif kind == "output":
                        sink.add(int(event["index"]), event["output"])
                    elif kind == "done":
                        status = str(event.get("status", "ok"))
                        self._finish(view, status, event.get("execution_count"), event, sink=sink)
                        with contextlib.suppress(EnvctlError):
                            channel.post("ack", execution_id=view.id)  # stored: the agent may forget it
                        return
            except AgentUnavailableError as exc:
                self._drop_channel(view.runtime_id)
                attempts += 1
                if self.runner._closing.is_set():
                    sink.flush()
                    return  # envctl is stopping: the next start attaches again
                with self.db.connection() as c:
                    state = c.scalar(select(Runtime.state).where(Runtime.id == view.runtime_id))
                if state == State.RUNNING and attempts <= 3:
                    time.sleep(0.1 * (attempts - 1))  # the first retry at once: a stale connection
                    continue
                message = f"the runtime stopped while the cell ran ({state or 'deleted'}): {exc.message}"
                self._finish(view, "error", None, {}, error=("RuntimeStopped", message), sink=sink)
                return
            except EnvctlError as exc:
                self._drop_channel(view.runtime_id)
                lost = accepted and "unknown execution" in exc.message
                message = "the runtime restarted and lost this cell" if lost else exc.message
                self._finish(view, "error", None, {}, error=("AgentError", message), sink=sink)
                return

    def _send(self, channel: AgentChannel, view: ExecutionView) -> Iterator[dict[str, Any]]:
        """Send the cell to the agent; its events follow on the returned iterator."""
        events = channel.stream(
            "execute",
            execution_id=view.id,
            code=view.code,
            language="jupyter" if view.kernel else view.language,
            kernel=view.kernel,
            timeout=view.timeout,
            cap=self.runner.settings.runner_output_cap,
        )
        # "running" is recorded only if the cell is still going a moment later: a quick cell
        # goes from queued to its end in one write. Sending first is safe: the agent knows
        # executions by id, so a resend is no rerun.
        if view.status == "queued":
            view.status, view.started_at = "running", self.runner.clock()
            self._later.call(MARK_RUNNING_AFTER, self._mark_running, view)
        return events

    def _channel(self, runtime_id: str) -> AgentChannel:
        """The worker's connection to the runtime's agent, kept open between cells."""
        channel = self._channels.get(runtime_id)
        if channel is None:
            channel = AgentChannel(self._socket(runtime_id), timeout=10)
            self._channels[runtime_id] = channel
        return channel

    def _drop_channel(self, runtime_id: str) -> None:
        channel = self._channels.pop(runtime_id, None)
        if channel is not None:
            channel.close()

    def _interrupt_via_new_connection(self, view: ExecutionView) -> None:
        with AgentChannel(self._socket(view.runtime_id), timeout=5) as channel:
            channel.request("interrupt", execution_id=view.id)

    def _mark_running(self, view: ExecutionView) -> None:
        if view.finished_at is not None:
            return
        with self.db.hot() as c:
            started = c.execute(MARK_RUNNING, {"b_id": view.id, "b_started": view.started_at})
            if started:  # not after the end: that would move the runtime's last activity back
                c.execute(
                    TOUCH_RUNTIME, {"b_id": view.runtime_id, "b_at": view.started_at, "b_what": "execution started"}
                )
        if not started and view.finished_at is None:
            # interrupted while it was queued, just as it was sent: stop it in the agent
            with contextlib.suppress(EnvctlError):
                self._interrupt_via_new_connection(view)

    def outputs_from_db(self, execution_id: str) -> list[tuple[int, dict[str, Any]]]:
        with self.db.session() as s:
            rows = s.execute(
                select(ExecutionOutput.idx, ExecutionOutput.output)
                .where(ExecutionOutput.execution_id == execution_id)
                .order_by(ExecutionOutput.idx)
            ).all()
        return [(r[0], r[1]) for r in rows]

    def _ensure_running(self, owner_id: str, runtime_id: str) -> str | None:
        """Boot the runtime if needed; None when it runs, else why it does not."""
        if self.runner.is_running(runtime_id):
            return None
        with self.db.connection() as c:
            state = c.scalar(select(Runtime.state).where(Runtime.id == runtime_id))
        if state == State.RUNNING:
            return None
        if state is None:
            return "the runtime was deleted"
        if state == State.STOPPING:
            # stopping as the cell came (an idle shutdown at its deadline, a stop): let the stop
            # finish, keeping the changes as a draft, then boot again for the cell
            try:
                state = self.runner.wait_for(runtime_id, {State.STOPPED, State.ERROR, State.RUNNING}, STOP_WAIT).state
            except TimeoutError:
                return "the runtime is still stopping; run the cell again once it has stopped"
        if state in (State.STOPPED, State.ERROR):
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.runner.start(owner_id, runtime_id)
                    break
                except EnvctlError as exc:
                    if exc.status == 429 and time.monotonic() < deadline:
                        time.sleep(1)
                        continue
                    return f"the runtime could not be started: {exc.message}"
        try:
            rt = self.runner.wait_for(
                runtime_id, {State.RUNNING, State.ERROR, State.STOPPED}, self.runner.settings.runner_boot_timeout + 15
            )
        except TimeoutError:
            return "the runtime did not finish booting in time"
        if rt.state != State.RUNNING:
            return f"the runtime failed to boot ({rt.state_reason}): {rt.state_message}"
        return None

    def _finish(
        self,
        view: ExecutionView,
        status: str,
        execution_count: int | None,
        event: dict[str, Any],
        *,
        error: tuple[str, str] | None = None,
        sink: _Sink | None = None,
    ) -> None:
        feed = self._feeds.get(view.id)
        if sink is None:
            sink = _Sink(self, view, feed or Feed(view), start=len(feed.outputs) if feed else 0)
        if error is not None:
            sink.add(sink.next_index, {"output_type": "error", "ename": error[0], "evalue": error[1], "traceback": []})
        if status not in FINAL:
            status = "error"
        now = self.runner.clock()
        ename, evalue = sink.last_error or (None, None)
        view.status, view.execution_count, view.finished_at = status, execution_count, now
        view.truncated = bool(event.get("truncated", False))
        view.output_bytes, view.output_count = sink.bytes, sink.next_index
        view.error_name, view.error_value = ename, (evalue[:2000] if evalue else None)
        self.runner.after_execution(view.runtime_id, view.owner_id, view.id)
        # Waiters hear of the end first; the database follows at once. A crash in between
        # loses nothing: the agent keeps the cell until it is acknowledged, after this write.
        self._feeds.pop(view.id, None)
        if feed is not None:
            self._recent[view.id] = feed
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            feed.publish(
                Event(
                    "status", data={"status": status, "execution_count": execution_count, "truncated": view.truncated}
                )
            )
            feed.answered.wait(ANSWER_FIRST)  # see ``waiting``
        with self.db.hot() as c:  # the last outputs and the end, in one transaction
            sink.flush(c)
            c.execute(
                FINISH_EXECUTION,
                {
                    "b_id": view.id,
                    "b_status": status,
                    "b_count": execution_count,
                    "b_started": view.started_at,
                    "b_finished": now,
                    "b_truncated": view.truncated,
                    "b_bytes": view.output_bytes,
                    "b_outputs": view.output_count,
                    "b_ename": view.error_name,
                    "b_evalue": view.error_value,
                },
            )
            c.execute(TOUCH_RUNTIME, {"b_id": view.runtime_id, "b_at": now, "b_what": "execution finished"})


class _Later:
    """Calls made a little later, from one shared thread: marking each cell "running" after
    a moment costs a heap push, not a thread of its own."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._count = itertools.count()
        self._cond = threading.Condition()
        self._name = name
        self._thread: threading.Thread | None = None

    def call(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        when = time.monotonic() + delay
        with self._cond:
            # wake the thread only if it must wait less than it does now (no wake-up per cell)
            wake = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, next(self._count), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if wake:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", getattr(fn, "__name__", fn))


class _Sink:
    """Outputs of one execution on their way to the feed (at once) and the database (batched)."""

    def __init__(self, manager: ExecutionManager, view: ExecutionView, feed: Feed, start: int) -> None:
        self.manager = manager
        self.view = view
        self.feed = feed
        self.next_index = start
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.pending_bytes = 0
        self.bytes = view.output_bytes
        self.last_flush = time.monotonic()
        self.last_error: tuple[str, str] | None = None
        self.limit = manager.runner.settings.runner_output_cap * 2 + 1024 * 1024

    def add(self, index: int, output: dict[str, Any]) -> None:
        if index < self.next_index:
            return  # already have it (a re-attach replays from where we asked)
        if self.bytes > self.limit:
            return  # the agent caps output; this is the runner's own safety net
        size = len(output.get("text", "")) if output.get("output_type") == "stream" else len(str(output))
        self.bytes += size
        self.next_index = index + 1
        if output.get("output_type") == "error":
            self.last_error = (str(output.get("ename", "")), str(output.get("evalue", "")))
        self.pending.append((index, output))
        self.pending_bytes += size
        self.feed.publish(Event("output", index=index, data=output))
        if self.pending_bytes >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_INTERVAL:
            self.flush()

    def flush(self, conn: HotWriter | None = None) -> None:
        if self.pending:
            rows = [{"execution_id": self.view.id, "idx": i, "output": o} for i, o in self.pending]
            if conn is not None:
                conn.execute_many(INSERT_OUTPUTS, rows)
            else:
                with self.manager.db.hot() as c:
                    c.execute_many(INSERT_OUTPUTS, rows)
            self.pending = []
            self.pending_bytes = 0
        self.last_flush = time.monotonic()


def merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive stream outputs of the same name, as Jupyter shows them."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        if (
            merged
            and out.get("output_type") == "stream"
            and merged[-1].get("output_type") == "stream"
            and merged[-1].get("name") == out.get("name")
        ):
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + out.get("text", "")}
        else:
            merged.append(dict(out))
    return merged
