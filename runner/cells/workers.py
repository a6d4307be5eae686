"""The cell workers: one thread per runtime with cells to run, running them in order.

A worker takes the runtime's next cell off its queue, boots the runtime if it is not running,
sends the cell to the agent (or reads the events of a cell ``submit`` sent itself), and passes
each output to the cell's feed at once and to the database in batches (``_Sink``). The end is
published to waiting requests first; the database writes go to one writer thread
(``runner/cells/writes.py``), so the worker is free for the next cell while they commit (the
agent keeps the cell until it is acknowledged, after that write, so a crash in between loses
nothing). If envctl dies mid-cell the agent keeps it running; the next start attaches again
from the last stored output.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from envs.kit.db import Database, EncodedJSON, HotWriter
from envs.kit.errors import EnvctlError
from runner.cells import store as cellstore
from runner.cells.streams import FINAL, Event, ExecutionView, Feed, Feeds
from runner.cells.writes import CellWrites, Write
from runner.channel import AgentChannel, AgentUnavailableError
from runner.paths import RuntimePaths
from runner.runtimes.states import State
from runner.runtimes.store import Records, touch_hot
from runner.settings import Settings

log = logging.getLogger("envctl.executions")

FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 256 * 1024
MARK_RUNNING_AFTER = 0.05  # seconds: quicker cells are never written down as "running"
SEND_NOW_MAX = 64 * 1024  # characters: larger cells are sent by the worker (no blocking write there)
STOP_WAIT = 300.0  # seconds a cell that arrives as its runtime stops waits for the stop, then boots it
LINGER = 2.0  # seconds an idle worker waits for the next cell (a notebook's usually follows at once)
DRAIN_WAIT = 15.0  # seconds a delete waits for the runtime's worker to write its cells' ends
DELETED = "the runtime was deleted"


@dataclass
class Job:
    view: ExecutionView
    attach: bool  # the agent has the cell already (after a restart): attach to its events
    # set when submit sent the cell to an idle worker's agent itself (see ``send_now``)
    events: Iterator[dict[str, Any]] | None = None
    runtime_running: bool = False  # the runtime ran when the cell was submitted


class CellWorkers:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        records: Records,
        feeds: Feeds,
        paths: RuntimePaths,
        *,
        start: Callable[[str, str], object],
        after_execution: Callable[[str, str, str], None],
        closing: threading.Event,
    ) -> None:
        self.settings = settings
        self.db = db
        self.records = records
        self.feeds = feeds
        self.paths = paths
        self.start = start  # boots a runtime: (owner id, runtime id)
        self.after_execution = after_execution  # (runtime id, owner id, execution id): results
        self.closing = closing
        self._queues: dict[str, queue.Queue[Job]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._busy: dict[str, str] = {}  # runtime id -> running execution id
        self._channels: dict[str, AgentChannel] = {}  # runtime id -> its worker's connection
        self._acks: dict[str, str] = {}  # runtime id -> its last cell stored, the agent not yet told
        self._submit_locks: dict[str, threading.Lock] = {}  # runtime id -> see in_order
        self._retired: set[str] = set()  # runtimes being (or that were) deleted: see retire
        self._lock = threading.Lock()
        self._later = _Later("envctl-exec-marks")
        self.writes = CellWrites(db)
        self._writing: dict[str, int] = {}  # runtime id -> its cells' ends handed over, not yet written
        self.sent_at_once = 0  # cells that submit sent to the agent itself (see send_now)
        # a cell paused near its memory limit (the stream's ``pressure`` event): draft, then resume
        # it (runner/runtimes/pressure.py; set at start-up where the agent watches memory)
        self.on_pressure: Callable[[str, str, dict[str, Any]], None] | None = None

    @contextlib.contextmanager
    def in_order(self, runtime_id: str) -> Iterator[None]:
        """Held while a cell of the runtime is numbered and queued: cells queue in the order of
        their numbers."""
        with self._lock:
            lock = self._submit_locks.setdefault(runtime_id, threading.Lock())
        with lock:
            yield

    def is_busy(self, runtime_id: str) -> bool:
        """A cell of the runtime is queued or running. Counted from the moment it is queued
        until after its end is recorded (``task_done``), so the worker taking a job off the
        queue leaves no instant in which the runtime looks idle."""
        with self._lock:
            if runtime_id in self._busy or self._writing.get(runtime_id):
                return True
            q = self._queues.get(runtime_id)
            return q is not None and q.unfinished_tasks > 0

    # ------------------------------------------------------------------ a runtime that goes
    def retire(self, runtime_id: str) -> None:
        """The runtime is about to be deleted: from now on its worker boots nothing and retries
        nothing; its queued cells and the one that runs end with ``RuntimeStopped`` (deleted)
        once its container is stopped. ``drain`` then waits until those ends are written."""
        with self._lock:
            self._retired.add(runtime_id)

    def disconnect(self, runtime_id: str) -> None:
        """The runtime's container was stopped: the worker's kept connection to its agent is
        closed, so that the next boot's cells go to the next boot's agent. A container that
        lingers after its stop (Swarm's SIGTERM wait, a pod's grace period) would otherwise
        still answer on it, and run them where nothing is kept. A busy worker keeps its
        connection: its cell ends with the container, and the worker drops it then."""
        with self._lock:
            if runtime_id in self._busy:
                return
            channel = self._channels.pop(runtime_id, None)
            self._acks.pop(runtime_id, None)  # the stopped agent's last cell: nothing to acknowledge
        if channel is not None:
            channel.close()

    def drain(self, runtime_id: str, timeout: float = DRAIN_WAIT) -> bool:
        """Wait until the runtime's worker has written the end of every cell it had (so the
        delete's cascade removes no row the worker still writes to); False after ``timeout``."""
        with self._lock:
            q = self._queues.get(runtime_id)
        deadline = time.monotonic() + timeout
        while (q is not None and q.unfinished_tasks > 0) or self._writing.get(runtime_id):
            if time.monotonic() > deadline:
                log.warning("the cells of runtime %s did not end within %.0f s of its deletion", runtime_id, timeout)
                return False
            time.sleep(0.02)
        return True

    def _retiring(self, runtime_id: str) -> bool:
        with self._lock:
            return runtime_id in self._retired

    # ------------------------------------------------------------------ queueing
    def enqueue(self, job: Job, *, send_now: bool = False) -> None:
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

    def _send_now_locked(self, job: Job, q: queue.Queue[Job], worker: threading.Thread | None) -> None:
        """Send a cell to the agent at once when its runtime's worker is idle and connected.

        The worker would send it as soon as it woke up; sending here lets the agent start while
        the worker wakes, which takes a good part of a trivial cell's round trip. The worker
        then only reads the events. Anything unusual (a busy or absent worker, a runtime not
        running when the cell came, a large cell, a broken connection) leaves the sending to
        the worker. Called with ``_lock`` held: an idle worker takes its next job, or exits
        and closes its connection, only under that lock.
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
            or not job.runtime_running
        ):
            return
        try:
            job.events = self._send(channel, view)
            self.sent_at_once += 1
        except EnvctlError:
            job.events = None  # the worker finds out, and reconnects

    def interrupt(self, view: ExecutionView) -> None:
        """Ask the agent to interrupt a running cell, on a connection of its own."""
        with AgentChannel(self.paths.agent(view.runtime_id), timeout=5) as channel:
            channel.request("interrupt", execution_id=view.id)

    # ------------------------------------------------------------------ the worker
    def _work(self, runtime_id: str) -> None:
        q = self._queues[runtime_id]
        while not self.closing.is_set():
            try:
                job = q.get(timeout=LINGER)
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
                if self._retiring(runtime_id):  # its rows went with the runtime after all
                    log.info("execution %s ended with its deleted runtime", job.view.id, exc_info=True)
                    continue
                log.exception("execution %s failed unexpectedly", job.view.id)
                try:
                    self.finish(
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

    def _run(self, job: Job) -> None:
        view = job.view
        feed = self.feeds.live(view.id)
        if feed is None or view.status in FINAL:
            return
        accepted = job.attach
        sent, job.events = job.events, None
        if self._retiring(view.runtime_id) and not accepted and sent is None:
            self.finish(view, "error", None, {}, error=("RuntimeStopped", DELETED))
            return
        if not accepted and sent is None:
            problem = self._ensure_running(view)
            if problem is not None:
                self.finish(view, "error", None, {}, error=("RuntimeNotRunning", problem))
                return
            if view.status != "queued":
                return  # interrupted while it waited
        sink = _Sink(self.writes, view, feed, start=len(feed.outputs), cap=self.settings.runner_output_cap)
        attempts = 0
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
                    elif kind == "pressure":
                        sink.flush()  # what the cell printed so far is stored before the draft
                        self._pressure(view, event)
                    elif kind == "done":
                        status = str(event.get("status", "ok"))
                        if status == "error" and self._retiring(view.runtime_id):
                            # the delete's stop killed the kernel under the cell: say why it ended
                            self.finish(view, "error", None, {}, error=("RuntimeStopped", DELETED), sink=sink)
                        else:
                            self.finish(view, status, event.get("execution_count"), event, sink=sink)
                        return
            except AgentUnavailableError as exc:
                self._drop_channel(view.runtime_id)
                attempts += 1
                if self.closing.is_set():
                    sink.flush()
                    return  # envctl is stopping: the next start attaches again
                state = None if self._retiring(view.runtime_id) else self.records.state_of(view.runtime_id)
                if state == State.RUNNING and attempts <= 3:
                    time.sleep(0.1 * (attempts - 1))  # the first retry at once: a stale connection
                    continue
                message = f"the runtime stopped while the cell ran ({state or 'deleted'}): {exc.message}"
                self.finish(view, "error", None, {}, error=("RuntimeStopped", message), sink=sink)
                return
            except EnvctlError as exc:
                self._drop_channel(view.runtime_id)
                lost = accepted and "unknown execution" in exc.message
                message = "the runtime restarted and lost this cell" if lost else exc.message
                self.finish(view, "error", None, {}, error=("AgentError", message), sink=sink)
                return

    def _pressure(self, view: ExecutionView, event: dict[str, Any]) -> None:
        """The agent paused the cell near its memory limit: the draft, then resume it; without
        ``on_pressure`` (the watch turned off since the agent started) resume it at once."""
        try:
            if self.on_pressure is not None:
                self.on_pressure(view.runtime_id, view.id, event)
                return
            with AgentChannel(self.paths.agent(view.runtime_id), timeout=5) as channel:
                channel.request("resume", execution_id=view.id, draft="not taken (the watch is off)")
        except Exception:  # the agent resumes the cell by itself after its bound
            log.exception("the memory-pressure pause of %s could not be handled", view.runtime_id)

    def _send(self, channel: AgentChannel, view: ExecutionView) -> Iterator[dict[str, Any]]:
        """Send the cell to the agent; its events follow on the returned iterator."""
        stored = self._acks.pop(view.runtime_id, None)
        events = channel.stream(
            "execute",
            **({"ack": [stored]} if stored else {}),
            execution_id=view.id,
            code=view.code,
            language="jupyter" if view.kernel else view.language,
            kernel=view.kernel,
            timeout=view.timeout,
            cap=self.settings.runner_output_cap,
        )
        # "running" is recorded only if the cell is still going a moment later: a quick cell
        # goes from queued to its end in one write. Sending first is safe: the agent knows
        # executions by id, so a resend is no rerun.
        if view.status == "queued":
            view.status, view.started_at = "running", self.records.clock()
            self._later.call(MARK_RUNNING_AFTER, self._mark_running, view)
        return events

    def _channel(self, runtime_id: str) -> AgentChannel:
        """The worker's connection to the runtime's agent, kept open between cells."""
        channel = self._channels.get(runtime_id)
        if channel is None:
            channel = AgentChannel(self.paths.agent(runtime_id), timeout=10)
            self._channels[runtime_id] = channel
        return channel

    def _drop_channel(self, runtime_id: str) -> None:
        channel = self._channels.pop(runtime_id, None)
        stored = self._acks.pop(runtime_id, None)
        if channel is not None:
            if stored:  # the worker leaves: the agent may forget the last cell now
                with contextlib.suppress(EnvctlError):
                    channel.post("ack", execution_id=stored)
            channel.close()

    def _mark_running(self, view: ExecutionView) -> None:
        if view.finished_at is not None:
            return
        with self.db.hot() as c:
            started = cellstore.mark_running(c, view.id, view.started_at)
            if started and view.started_at is not None:  # not after the end: that would move the activity back
                touch_hot(c, view.runtime_id, "execution started", view.started_at)
        if not started and view.finished_at is None:
            # interrupted while it was queued, just as it was sent: stop it in the agent
            with contextlib.suppress(EnvctlError):
                self.interrupt(view)

    def _ensure_running(self, view: ExecutionView) -> str | None:
        """Boot the runtime if needed; None when it runs, else why it does not."""
        runtime_id = view.runtime_id
        state = None if self._retiring(runtime_id) else self.records.state_of(runtime_id)
        if state == State.RUNNING:
            return None
        if state is None:
            return DELETED
        if state == State.STOPPING:
            # stopping as the cell came (an idle shutdown at its deadline, a stop): let the stop
            # finish, keeping the changes as a draft, then boot again for the cell
            try:
                state = State(
                    self.records.wait_for(runtime_id, {State.STOPPED, State.ERROR, State.RUNNING}, STOP_WAIT).state
                )
            except TimeoutError:
                return "the runtime is still stopping; run the cell again once it has stopped"
        if state in (State.STOPPED, State.ERROR):
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.start(view.owner_id, runtime_id)
                    break
                except EnvctlError as exc:
                    if exc.status == 429 and time.monotonic() < deadline:
                        time.sleep(1)
                        continue
                    return f"the runtime could not be started: {exc.message}"
        try:
            rt = self.records.wait_for(
                runtime_id, {State.RUNNING, State.ERROR, State.STOPPED}, self.settings.runner_boot_timeout + 15
            )
        except TimeoutError:
            return "the runtime did not finish booting in time"
        if rt.state != State.RUNNING:
            return f"the runtime failed to boot ({rt.state_reason}): {rt.state_message}"
        if view.mounts is None and rt.mounts_used:  # the boot recorded them on the row too
            view.mounts = list(rt.mounts_used)
        return None

    # ------------------------------------------------------------------ the end
    def finish(
        self,
        view: ExecutionView,
        status: str,
        execution_count: int | None,
        event: dict[str, Any],
        *,
        error: tuple[str, str] | None = None,
        sink: _Sink | None = None,
    ) -> None:
        """Record the end of a cell: outputs, status, activity; waiting requests hear first,
        the database a moment later (``runner/cells/writes.py``)."""
        feed = self.feeds.live(view.id)
        if sink is None:
            sink = _Sink(
                self.writes,
                view,
                feed or Feed(view),
                start=len(feed.outputs) if feed else 0,
                cap=self.settings.runner_output_cap,
            )
        if error is not None:
            sink.add(sink.next_index, {"output_type": "error", "ename": error[0], "evalue": error[1], "traceback": []})
        if status not in FINAL:
            status = "error"
        now = self.records.clock()
        ename, evalue = sink.last_error or (None, None)
        view.status, view.execution_count, view.finished_at = status, execution_count, now
        view.truncated = bool(event.get("truncated", False))
        view.output_bytes, view.output_count = sink.bytes, sink.next_index
        view.error_name, view.error_value = ename, (evalue[:2000] if evalue else None)
        self.after_execution(view.runtime_id, view.owner_id, view.id)
        # Waiters hear of the end first; the database follows at once. A crash in between
        # loses nothing: the agent keeps the cell until it is acknowledged, after this write.
        feed = self.feeds.finished(view.id)
        if feed is not None:
            data = {"status": status, "execution_count": execution_count, "truncated": view.truncated}
            feed.publish(Event("status", data=data))
        last = sink.take()
        end = {
            "status": status,
            "count": execution_count,
            "started": view.started_at,
            "finished": now,
            "truncated": view.truncated,
            "bytes": view.output_bytes,
            "outputs": view.output_count,
            "ename": view.error_name,
            "evalue": view.error_value,
        }

        def statements(c: HotWriter) -> None:  # the last outputs and the end, in one transaction
            if last:
                cellstore.insert_outputs(c, view.id, last)
            cellstore.finish(c, view.id, **end)
            touch_hot(c, view.runtime_id, "execution finished", now)

        rid = view.runtime_id
        with self._lock:
            self._writing[rid] = self._writing.get(rid, 0) + 1
        self.writes.put(Write(view.id, statements, feed=feed, done=lambda error: self._written(view, error)))

    def _written(self, view: ExecutionView, error: Exception | None) -> None:
        """A cell's end is in the database (or could not be written)."""
        rid = view.runtime_id
        with self._lock:
            left = self._writing.get(rid, 1) - 1
            if left:
                self._writing[rid] = left
            else:
                self._writing.pop(rid, None)
        if error is None:
            # stored: the agent may forget it, told with the next cell (or on leaving)
            self._acks[rid] = view.id
        elif self._retiring(rid):  # its rows went with the runtime
            log.info("execution %s ended with its deleted runtime", view.id)
        else:
            # the agent keeps the cell (not acknowledged): the next start attaches again
            log.error("could not record the end of execution %s: %s", view.id, error)


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

    def __init__(self, writes: CellWrites, view: ExecutionView, feed: Feed, *, start: int, cap: int) -> None:
        self.writes = writes
        self.view = view
        self.feed = feed
        self.next_index = start
        self.pending: list[tuple[int, EncodedJSON]] = []
        self.pending_bytes = 0
        self.bytes = view.output_bytes
        self.last_flush = time.monotonic()
        self.last_error: tuple[str, str] | None = None
        self.limit = cap * 2 + 1024 * 1024  # the agent caps output; this is the runner's own safety net

    def add(self, index: int, output: dict[str, Any]) -> None:
        if index < self.next_index:
            return  # already have it (a re-attach replays from where we asked)
        if self.bytes > self.limit:
            return
        size = len(output.get("text", "")) if output.get("output_type") == "stream" else len(str(output))
        self.bytes += size
        self.next_index = index + 1
        if output.get("output_type") == "error":
            self.last_error = (str(output.get("ename", "")), str(output.get("evalue", "")))
        # encoded once, here: for the server-sent events of whoever follows and for the row
        encoded = EncodedJSON(json.dumps(output, separators=(",", ":")))
        self.pending.append((index, encoded))
        self.pending_bytes += size
        self.feed.publish(Event("output", index=index, data=output, encoded=encoded))
        if self.pending_bytes >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_INTERVAL:
            self.flush()

    def take(self) -> list[tuple[int, EncodedJSON]]:
        """The outputs not handed to the database yet (the caller writes them)."""
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        self.last_flush = time.monotonic()
        return pending

    def flush(self) -> None:
        """Hand the pending outputs to the writer thread."""
        pending = self.take()
        if pending:
            execution_id = self.view.id

            def statements(c: HotWriter) -> None:
                cellstore.insert_outputs(c, execution_id, pending)

            self.writes.put(Write(execution_id, statements))
