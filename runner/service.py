"""The runner: creates runtimes, boots and stops them, and looks after them.

Rules (DESIGN.md, "Runtime states"):

- Every state change is a compare-and-set on the ``runtimes`` row (``UPDATE ... WHERE state IN
  (...)``) plus one runner-log line, in one transaction, so concurrent calls (and, later,
  several runners on one database) follow the state machine.
- Slow work (Docker calls, waiting for the agent) runs on worker threads, one runtime at a
  time under that runtime's lock, never on the event loop; API calls answer at once.
- The database is the runner's memory, not the truth: ``reconcile`` compares it with what the
  backend reports, and a backend error never counts as "the container is gone".
- Booting ends when the agent answers a ping, not when the container starts.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, selectinload

from envs import service as envs_service
from envs.kit.clock import utcnow
from envs.kit.config import MachineType, Settings
from envs.kit.db import Database
from envs.kit.errors import BackendError, EnvctlError, InvalidInputError, TooManyRequestsError
from envs.kit.ids import new_id
from envs.models import EnvironmentVersion
from envs.refs import check_name, parse_ref
from runner import idle
from runner.backends.base import BackendState, RuntimeBackend, RuntimeSpec, Status
from runner.channel import AgentUnavailableError, wait_for_agent
from runner.errors import RuntimeNotFoundError, RuntimeStateError
from runner.machines import get_machine_type
from runner.models import Runtime, RuntimeLogEntry
from runner.states import State, can_transition, sources_of

log = logging.getLogger("envctl.runner")

AGENT_DIR = Path(__file__).resolve().parent / "agent"
LANGUAGES = ("python", "bash")
RUNTIME_TYPES = ("native", "jupyter")
KERNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_IDLE_TIMEOUT = 7 * 24 * 3600


class _BootCancelledError(Exception):
    pass


@dataclass(frozen=True)
class RuntimeChanges:
    """Fields of a PATCH; ``None`` leaves a field as it is."""

    name: str | None = None
    idle_timeout: int | None = None
    clear_idle_timeout: bool = False
    machine_type: str | None = None
    environment: str | None = None
    language: str | None = None


class RunnerService:
    """One runner: owns the runtimes whose ``runner`` field is its name."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: RuntimeBackend,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend
        self.runner = settings.runner_name
        self.clock = clock
        self.agent_dir = AGENT_DIR
        self._executor = ThreadPoolExecutor(
            max_workers=max(4, settings.runner_max_boots + 4), thread_name_prefix="envctl-runner"
        )
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._inflight: dict[str, int] = {}  # runtime id -> boots/stops/resets queued or running
        self._running: set[str] = set()  # runtimes this process saw enter running (and not leave)
        self._changed = threading.Condition()
        self._cancel: dict[str, threading.Event] = {}
        self._boot_slots = threading.BoundedSemaphore(settings.runner_max_boots)
        self._housekeeper: threading.Thread | None = None
        self._closing = threading.Event()
        from runner.executions import ExecutionManager

        self.executions = ExecutionManager(self)
        from runner.collector import ResultCollector

        self.results = ResultCollector(self)
        from runner.operations import Operations
        from runner.snapshots import Snapshots

        self.operations = Operations(self)

        self.snapshots = Snapshots(self)
        from runner.builds import Builds

        self.builds = Builds(self)
        from runner.archives import Archives

        self.archives = Archives(self)

    # ------------------------------------------------------------------ lifecycle
    def open(self, *, housekeeping: bool = True) -> None:
        """Reconcile with the backend, then start the housekeeping loop (idle, liveness)."""
        self.settings.runtimes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.reconcile()
        except EnvctlError as exc:
            log.warning("reconciliation at start failed: %s", exc.message)
        self.executions.recover()
        self.operations.recover()
        if housekeeping:
            self._housekeeper = threading.Thread(
                target=self._housekeeping_loop, name="envctl-housekeeping", daemon=True
            )
            self._housekeeper.start()

    def close(self) -> None:
        """Stop background work. Runtimes keep running: the next start adopts them."""
        self._closing.set()
        for event in list(self._cancel.values()):
            event.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=5)
        self.backend.close()

    # ------------------------------------------------------------------ queries
    def list(self, owner_id: str) -> list[Runtime]:
        with self.db.session() as s:
            return list(s.scalars(self._query().where(Runtime.owner_id == owner_id).order_by(Runtime.created_at)))

    def get(self, owner_id: str, runtime_id: str) -> Runtime:
        with self.db.session() as s:
            return self._get(s, owner_id, runtime_id)

    def log_entries(self, owner_id: str, runtime_id: str) -> builtins.list[RuntimeLogEntry]:
        with self.db.session() as s:
            self._get(s, owner_id, runtime_id)
            return list(
                s.scalars(
                    select(RuntimeLogEntry).where(RuntimeLogEntry.runtime_id == runtime_id).order_by(RuntimeLogEntry.id)
                )
            )

    def machine(self, rt: Runtime) -> MachineType:
        return get_machine_type(self.settings, rt.machine_type)

    def idle_status(
        self, rt: Runtime, *, busy: bool | None = None, saving: bool | None = None
    ) -> idle.IdleDecision | None:
        """When and why a running runtime will shut down; None when it is not running.

        ``busy`` and ``saving`` default to what this process knows now. A caller that decides
        to stop passes the flags it read *before* reading the row: a cell's end and a save's
        end record their activity before they clear the flag, so flags read first and the row
        read after never combine into "not busy, not saving, idle since long ago"."""
        if rt.state != State.RUNNING or rt.last_activity_at is None:
            return None
        machine = self.settings.machine_types.get(rt.machine_type)
        timeout = idle.effective_timeout(
            rt.idle_timeout,
            machine.idle_timeout if machine else None,
            self.settings.runner_idle_timeout,
        )
        return idle.decide(
            last_activity_at=rt.last_activity_at,
            last_activity=rt.last_activity,
            now=self.clock(),
            timeout=timeout,
            busy=self.is_busy(rt.id) if busy is None else busy,
            saving=self.snapshots.is_saving(rt.id) if saving is None else saving,
        )

    def is_busy(self, runtime_id: str) -> bool:
        """Whether a cell is running or waiting to run in the runtime."""
        return self.executions.is_busy(runtime_id)

    def after_execution(self, runtime_id: str, owner_id: str, execution_id: str) -> None:
        """After each cell: collect the files it wrote under /results."""
        try:
            self.results.collect(runtime_id, owner_id, execution_id)
        except Exception:  # results must never cost the cell its status
            log.exception("collecting results of %s failed", execution_id)

    # ------------------------------------------------------------------ commands
    def create(
        self,
        owner_id: str,
        *,
        name: str,
        environment: str,
        language: str = "python",
        machine_type: str = "small",
        idle_timeout: int | None = None,
        type: str = "native",
        kernel: str | None = None,
    ) -> Runtime:
        check_name(name, "name", "runtime name")
        _check_choice(language, LANGUAGES, "language")
        _check_choice(type, RUNTIME_TYPES, "type")
        if type == "jupyter":
            kernel = kernel or "python3"
            if not KERNEL_RE.match(kernel):
                raise InvalidInputError(
                    f"kernel: {kernel[:64]!r} is not a kernelspec name (letters, digits, . _ -)", field="kernel"
                )
        elif kernel is not None:
            raise InvalidInputError("kernel: only runtimes of type jupyter take a kernel", field="kernel")
        _check_idle_timeout(idle_timeout)
        get_machine_type(self.settings, machine_type)
        ref = parse_ref(environment, "environment")
        now = self.clock()
        with self._tx() as s:
            version = envs_service.resolve(s, ref, "environment")
            if s.scalar(select(Runtime.id).where(Runtime.owner_id == owner_id, Runtime.name == name)):
                raise RuntimeStateError(
                    f"name: you already have a runtime named {name!r}",
                    details={"field": "name"},
                )
            rt = Runtime(
                id=new_id("rt"),
                owner_id=owner_id,
                name=name,
                type=type,
                kernel=kernel,
                language=language,
                environment_ref=str(ref),
                version_id=version.id,
                machine_type=machine_type,
                idle_timeout=idle_timeout,
                state=State.STOPPED,
                state_reason="created",
                state_message=f"created from {version.ref}",
                runner=self.runner,
                backend=self.backend.name,
                backend_state={},
                created_at=now,
                updated_at=now,
            )
            s.add(rt)
            s.flush()
            self._log(s, rt.id, state=State.STOPPED, reason="created", message=f"pinned to {version.ref}")
            return self._get(s, owner_id, rt.id)

    def update(self, owner_id: str, runtime_id: str, changes: RuntimeChanges) -> Runtime:
        """Change settings. Those that shape the container need the runtime stopped (409)."""
        if changes.name is not None:
            check_name(changes.name, "name", "runtime name")
        if changes.language is not None:
            _check_choice(changes.language, LANGUAGES, "language")
        _check_idle_timeout(changes.idle_timeout)
        if changes.machine_type is not None:
            get_machine_type(self.settings, changes.machine_type)
        ref = parse_ref(changes.environment, "environment") if changes.environment is not None else None
        with self._tx() as s:
            rt = self._get(s, owner_id, runtime_id, for_update=True)
            container_fields = [
                f for f, v in (("environment", ref), ("machine_type", changes.machine_type)) if v is not None
            ]
            if ref is not None and rt.draft_image_id:
                raise RuntimeStateError(
                    "environment: the runtime has unsaved changes from its current version; save them "
                    f"(`envctl save {rt.name} --as NAME`) or throw them away (`envctl runtime reset {rt.name}`) first",
                    details={"field": "environment", "unsaved_changes": len(rt.draft_changes or [])},
                )
            if container_fields and rt.state not in (State.STOPPED, State.ERROR):
                raise RuntimeStateError(
                    f"{', '.join(container_fields)} can only change while the runtime is stopped; "
                    f"it is {rt.state}. Stop it first (`envctl runtime stop {rt.name}`).",
                    details={"fields": container_fields, "state": rt.state},
                )
            notes = []
            if changes.name is not None and changes.name != rt.name:
                if s.scalar(select(Runtime.id).where(Runtime.owner_id == owner_id, Runtime.name == changes.name)):
                    raise RuntimeStateError(
                        f"name: you already have a runtime named {changes.name!r}",
                        details={"field": "name"},
                    )
                notes.append(f"name {rt.name} -> {changes.name}")
                rt.name = changes.name
            if changes.clear_idle_timeout:
                rt.idle_timeout = None
                notes.append("idle timeout -> default")
            elif changes.idle_timeout is not None:
                rt.idle_timeout = changes.idle_timeout
                notes.append(f"idle timeout -> {changes.idle_timeout} s")
            if changes.language is not None:
                rt.language = changes.language
                notes.append(f"language -> {changes.language}")
            if changes.machine_type is not None:
                rt.machine_type = changes.machine_type
                notes.append(f"machine type -> {changes.machine_type}")
            if ref is not None:
                version = envs_service.resolve(s, ref, "environment")
                rt.version_id = version.id
                rt.environment_ref = str(ref)
                notes.append(f"environment -> {version.ref}")
            if notes:
                rt.updated_at = self.clock()
                self._log(
                    s,
                    rt.id,
                    event="settings-changed",
                    reason="user-request",
                    message="; ".join(notes),
                )
            s.flush()
            s.expire(rt)
            out = self._get(s, owner_id, runtime_id)
        if notes:
            # after the commit: a cell submitted meanwhile would cache the old row again
            self.executions.forget_runtime(runtime_id)
        return out

    def start(self, owner_id: str, runtime_id: str) -> Runtime:
        """Ask for a boot; answers at once with the runtime in ``booting``."""
        with self._tx() as s:
            rt = self._get(s, owner_id, runtime_id)
            if rt.state in (State.BOOTING, State.RUNNING):
                return rt  # already on its way: starting twice is not an error
            if rt.state == State.STOPPING:
                raise RuntimeStateError(
                    "the runtime is stopping; start it again once it is stopped",
                    details={"state": rt.state},
                )
        self.backend.ping()  # an engine that does not answer is a 503 now, not an error later
        if not self._boot_slots.acquire(blocking=False):
            raise TooManyRequestsError(
                f"{self.settings.runner_max_boots} runtimes are booting already; try again shortly",
                retry_after=2,
            )
        try:
            with self._claim(runtime_id) as submit:
                with self._tx() as s:
                    ok = self._transition(s, runtime_id, State.BOOTING, "user-request", "boot requested")
                    rt = self._get(s, owner_id, runtime_id)
                if not ok:
                    self._boot_slots.release()
                    return rt
                self._cancel[runtime_id] = threading.Event()
                submit(self._boot)
        except BaseException:
            self._boot_slots.release()
            raise
        return rt

    def stop(
        self,
        owner_id: str,
        runtime_id: str,
        *,
        reason: str = "user-request",
        message: str = "stop requested",
    ) -> Runtime:
        with self._claim(runtime_id) as submit:
            with self._tx() as s:
                rt = self._get(s, owner_id, runtime_id)
                if rt.state == State.STOPPED:
                    return rt
                ok = self._transition(s, runtime_id, State.STOPPING, reason, message)
                rt = self._get(s, owner_id, runtime_id)
            if ok:
                cancel = self._cancel.get(runtime_id)
                if cancel is not None:
                    cancel.set()
                submit(self._stop, reason)
        return rt

    def reset(self, owner_id: str, runtime_id: str) -> Runtime:
        """Throw the unsaved changes away and boot from the version again (202)."""
        with self._claim(runtime_id) as submit:
            with self._tx() as s:
                rt = self._get(s, owner_id, runtime_id)
                if self.snapshots.is_saving(runtime_id):
                    raise RuntimeStateError("a save of this runtime is in progress; reset it afterwards")
                if rt.state in (State.RUNNING, State.BOOTING, State.ERROR) and rt.backend_state:
                    ok = self._transition(s, runtime_id, State.STOPPING, "reset", "reset requested: discarding changes")
                    if not ok:
                        raise RuntimeStateError(f"the runtime is {rt.state}; try again in a moment")
                    if self.snapshots.is_saving(runtime_id):  # began since the check: roll back
                        raise RuntimeStateError("a save of this runtime is in progress; reset it afterwards")
                elif rt.state == State.STOPPING:
                    raise RuntimeStateError("the runtime is stopping; reset it once it is stopped")
            cancel = self._cancel.get(runtime_id)
            if cancel is not None:
                cancel.set()
            submit(self._reset, owner_id)
        return self.get(owner_id, runtime_id)

    def _reset(self, runtime_id: str, owner_id: str) -> None:
        self._stop(runtime_id, "reset")  # no draft: the changes are what is thrown away
        self.snapshots.discard_draft(runtime_id)
        self.start(owner_id, runtime_id)

    def delete(self, owner_id: str, runtime_id: str) -> None:
        """Stop the runtime (synchronously) and forget it."""
        with self.db.session() as s:
            self._get(s, owner_id, runtime_id)
        cancel = self._cancel.get(runtime_id)
        if cancel is not None:
            cancel.set()
        with self._runtime_lock(runtime_id):
            with self.db.session() as s:
                rt = self._get(s, owner_id, runtime_id)
                state = dict(rt.backend_state or {})
                draft = rt.draft_image_id
            if state:
                self.backend.stop(state, timeout=2)
            with self._tx() as s:
                rt = self._get(s, owner_id, runtime_id)
                s.delete(rt)
        self.results.forget(runtime_id)
        self.executions.forget_runtime(runtime_id)
        with self._locks_guard:
            self._running.discard(runtime_id)
        if draft:
            self.backend.remove_image(draft)
        self._cleanup_state_dir(runtime_id)

    def wait_for(self, runtime_id: str, states: set[State] | set[str], timeout: float = 30.0) -> Runtime:
        """Block until the runtime is in one of ``states`` (for the CLI, tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        wanted = {State(s) for s in states}
        with self._changed:
            while True:
                with self.db.session() as s:
                    rt = s.get(Runtime, runtime_id)
                    if rt is None:
                        raise RuntimeNotFoundError(f"runtime {runtime_id} does not exist")
                    if State(rt.state) in wanted:
                        return rt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"runtime {runtime_id} is {rt.state}, not {sorted(wanted)}")
                self._changed.wait(min(remaining, 0.5))

    # ------------------------------------------------------------------ housekeeping
    def tick(self) -> None:
        """One round of housekeeping: reconcile with the backend, then idle shutdowns."""
        try:
            self.reconcile()
        except EnvctlError as exc:
            log.warning("reconciliation failed: %s", exc.message)
        self.shutdown_idle()

    def shutdown_idle(self) -> builtins.list[str]:
        """Stop every running runtime of this runner whose idle decision says so."""
        stopped = []
        with self.db.session() as s:
            running = list(
                s.scalars(self._query().where(Runtime.runner == self.runner, Runtime.state == State.RUNNING))
            )
        for candidate in running:
            first = self.idle_status(candidate)
            if first is None or not first.stop:
                continue
            # Decide again on fresh data: the flags first, then the row (see idle_status). The
            # list above may predate a save or a cell that ended since, with its activity.
            busy, saving = self.is_busy(candidate.id), self.snapshots.is_saving(candidate.id)
            with self._claim(candidate.id) as submit:
                with self._tx() as s:
                    rt = s.get(Runtime, candidate.id, populate_existing=True)
                    decision = None if rt is None else self.idle_status(rt, busy=busy, saving=saving)
                    if rt is None or decision is None or not decision.stop:
                        continue
                    ok = self._transition(
                        s,
                        rt.id,
                        State.STOPPING,
                        "idle",
                        decision.reason,
                        expect={State.RUNNING},
                        # and only while the activity is the one decided on: a save or a cell
                        # that begins now records activity, and then this stop does not happen
                        where=[Runtime.last_activity_at == rt.last_activity_at],
                        details={
                            "last_activity": rt.last_activity,
                            "last_activity_at": rt.last_activity_at.isoformat() if rt.last_activity_at else None,
                            "shutdown_at": decision.shutdown_at.isoformat() if decision.shutdown_at else None,
                        },
                    )
                if ok:
                    stopped.append(candidate.id)
                    submit(self._stop, "idle")
        return stopped

    def reconcile(self) -> None:
        from runner.reconcile import reconcile

        reconcile(self)

    def _housekeeping_loop(self) -> None:
        interval = self.settings.runner_idle_check_interval
        while not self._closing.wait(interval):
            try:
                self.tick()
            except Exception:  # the loop must outlive any one failure
                log.exception("housekeeping round failed")

    # ------------------------------------------------------------------ workers
    def _boot(self, runtime_id: str) -> None:
        mine = self._cancel.get(runtime_id)
        released = False

        def release() -> None:
            # before the runtime's lock is let go: a boot that follows (after a reset) may
            # register its own cancel event and need a slot as soon as it has the lock
            nonlocal released
            if not released:
                released = True
                self._boot_slots.release()
                with self._locks_guard:
                    if mine is not None and self._cancel.get(runtime_id) is mine:
                        del self._cancel[runtime_id]

        try:
            with self._runtime_lock(runtime_id):
                try:
                    self._boot_locked(runtime_id)
                finally:
                    release()
        finally:
            release()

    def _boot_locked(self, runtime_id: str) -> None:
        """Boot a runtime whose row says ``booting``. Its boot slot is held until it is
        ``running`` (or not booting any more): no more than ``max_boots`` rows are ever
        ``booting`` at once (R31)."""
        begun = time.monotonic()
        try:
            with self.db.session() as s:
                rt = s.get(
                    Runtime,
                    runtime_id,
                    options=[selectinload(Runtime.version).selectinload(EnvironmentVersion.environment)],
                )
                if rt is None or rt.state != State.BOOTING:
                    return
                spec = self._spec(rt)
                restoring = len(rt.draft_changes or []) if rt.draft_image_id else None
        except EnvctlError as exc:
            self._fail(runtime_id, "boot-failed", exc.message, {State.BOOTING})
            return
        with self.db.connection() as c:  # a new container: nothing of it is saved yet
            c.execute(update(Runtime).where(Runtime.id == runtime_id).values(change_baseline={}))
        if restoring is not None:
            with self._tx() as s:
                s.execute(update(Runtime).where(Runtime.id == runtime_id).values(phase="restoring"))
                self._log(
                    s,
                    runtime_id,
                    event="restoring",
                    reason="draft",
                    message=f"restoring {restoring} unsaved changes from the draft",
                )
        state_dir = spec.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / "results").mkdir(exist_ok=True)
        sock = self.backend.socket_path({}, state_dir)
        sock.unlink(missing_ok=True)
        try:
            backend_state = self.backend.start(spec)
        except EnvctlError as exc:
            self._fail(runtime_id, "backend-error", exc.message, {State.BOOTING})
            return
        with self._tx() as s:
            s.execute(update(Runtime).where(Runtime.id == runtime_id).values(backend_state=backend_state))
            self._log(
                s,
                runtime_id,
                event="container-created",
                reason="boot",
                message=f"container {backend_state.get('container_name', '')} started",
                details={"container_id": backend_state.get("container_id")},
            )
        cancel = self._cancel.get(runtime_id) or threading.Event()

        def alive() -> None:
            if cancel.is_set():
                raise _BootCancelledError()
            status = self.backend.poll(backend_state)
            if status.status is not Status.RUNNING:
                raise _ContainerDiedError(status.exit_code, status.oom_killed)

        deadline = begun + self.settings.runner_boot_timeout
        try:
            pong = wait_for_agent(sock, deadline, alive=alive)
        except _BootCancelledError:
            return  # a stop was requested; _stop removes the container
        except (_ContainerDiedError, AgentUnavailableError, BackendError) as exc:
            tail = self.backend.logs_tail(backend_state)
            if isinstance(exc, _ContainerDiedError):
                reason = "oom" if exc.oom_killed else "container-exited"
                message = f"the container exited with code {exc.exit_code} before its agent answered"
            elif isinstance(exc, AgentUnavailableError):
                reason, message = (
                    "boot-timeout",
                    (f"the agent did not answer within {self.settings.runner_boot_timeout:g} s"),
                )
            else:
                reason, message = "backend-error", exc.message
            if tail.strip():
                message += "; last output: " + tail.strip()[-800:]
            try:
                self.backend.stop(backend_state, timeout=1)
                backend_state = {}
            except EnvctlError:
                pass
            self._fail(runtime_id, reason, message, {State.BOOTING}, backend_state=backend_state)
            return
        took_ms = (time.monotonic() - begun) * 1000
        now = self.clock()
        with self._tx() as s:
            ok = self._transition(
                s,
                runtime_id,
                State.RUNNING,
                "agent-answered",
                f"agent answered after {took_ms:.0f} ms",
                expect={State.BOOTING},
                details={"boot_ms": round(took_ms, 1), "agent_pid": pong.get("pid")},
                values={"booted_at": now, "last_activity_at": now, "last_activity": "boot", "phase": None},
            )
        if not ok:
            log.info("runtime %s left booting while it booted; the stop in flight removes it", runtime_id)

    def _stop(self, runtime_id: str, reason: str) -> None:
        with self._runtime_lock(runtime_id):
            with self.db.session() as s:
                rt = s.get(Runtime, runtime_id)
                if rt is None or rt.state != State.STOPPING:
                    return
                backend_state = dict(rt.backend_state or {})
            if reason != "reset" and backend_state:
                try:
                    self.snapshots.make_draft(runtime_id)
                except EnvctlError as exc:
                    # Never lose a user's work: the container stays, reconciliation takes it
                    # back as running, and the next stop tries again.
                    self._fail(
                        runtime_id,
                        "draft-failed",
                        f"could not keep the unsaved changes, so the runtime was not stopped: {exc.message}",
                        {State.STOPPING},
                    )
                    return
            try:
                self.backend.stop(backend_state)
            except EnvctlError as exc:
                self._fail(
                    runtime_id,
                    "backend-error",
                    f"could not stop the container: {exc.message}",
                    {State.STOPPING},
                )
                return
            with self._tx() as s:
                self._transition(
                    s,
                    runtime_id,
                    State.STOPPED,
                    reason,
                    "container removed",
                    expect={State.STOPPING},
                    values={"backend_state": {}, "booted_at": None},
                )
            self._cleanup_socket(runtime_id)

    def _fail(
        self,
        runtime_id: str,
        reason: str,
        message: str,
        expect: set[State],
        backend_state: BackendState | None = None,
    ) -> None:
        values: dict[str, Any] = {"phase": None}
        if backend_state is not None:
            values["backend_state"] = backend_state
        with self._tx() as s:
            self._transition(s, runtime_id, State.ERROR, reason, message, expect=expect, values=values)
        log.warning("runtime %s: %s: %s", runtime_id, reason, message)

    @contextmanager
    def _claim(self, runtime_id: str) -> Iterator[Callable[..., Future[None]]]:
        """Mark the runtime in flight *before* its state changes, so that reconciliation, which
        reads the row and then lists containers, never sees a ``booting`` or ``stopping`` row
        whose work is not yet counted (it would call the container vanished). Yields a submit
        function; the claim passes to the submitted work, or is dropped if nothing was submitted."""
        with self._locks_guard:
            self._inflight[runtime_id] = self._inflight.get(runtime_id, 0) + 1
        handed_over = False

        def submit(fn: Callable[..., None], *args: Any) -> Future[None]:
            nonlocal handed_over
            future = self._submit(fn, runtime_id, *args)
            handed_over = True
            future.add_done_callback(lambda _f: self._unclaim(runtime_id))
            return future

        try:
            yield submit
        finally:
            if not handed_over:
                self._unclaim(runtime_id)

    def _unclaim(self, runtime_id: str) -> None:
        with self._locks_guard:
            left = self._inflight.get(runtime_id, 1) - 1
            if left <= 0:
                self._inflight.pop(runtime_id, None)
            else:
                self._inflight[runtime_id] = left

    def is_running(self, runtime_id: str) -> bool:
        """A fast, in-memory "is it running": true only after this process saw it enter running
        and no change since; false means "look in the database"."""
        with self._locks_guard:
            return runtime_id in self._running

    def in_flight(self, runtime_id: str) -> bool:
        """A boot, stop, reset or save of this process is queued or running for it."""
        if self.snapshots.is_saving(runtime_id):
            return True
        with self._locks_guard:
            return runtime_id in self._inflight

    def _submit_plain(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Background work that records its own failures (saves, resets)."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s%r failed", fn.__name__, args)

        return self._executor.submit(run)

    def touch(self, runtime_id: str, what: str) -> None:
        """Record activity on a runtime (it postpones idle shutdown)."""
        with self.db.connection() as c:
            c.execute(
                update(Runtime)
                .where(Runtime.id == runtime_id)
                .values(last_activity_at=self.clock(), last_activity=what)
            )

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s%r failed", fn.__name__, args)
                if args:
                    try:
                        self._fail(
                            str(args[0]),
                            "internal-error",
                            "envctl failed unexpectedly; see its log",
                            set(State),
                        )
                    except Exception:
                        log.exception("could not record the failure")

        return self._executor.submit(run)

    # ------------------------------------------------------------------ building blocks
    def _spec(self, rt: Runtime) -> RuntimeSpec:
        return RuntimeSpec(
            runtime_id=rt.id,
            name=rt.name,
            image=rt.draft_image_id or rt.version.image_id,
            environment=rt.version.ref,
            machine=self.machine(rt),
            state_dir=self.state_dir(rt.id),
            agent_dir=self.agent_dir,
            language=rt.language,
        )

    def state_dir(self, runtime_id: str) -> Path:
        return self.settings.runtimes_dir / runtime_id

    def _cleanup_socket(self, runtime_id: str) -> None:
        self.backend.socket_path({}, self.state_dir(runtime_id)).unlink(missing_ok=True)

    def _cleanup_state_dir(self, runtime_id: str) -> None:
        directory = self.state_dir(runtime_id)
        if directory.is_dir():
            import shutil

            shutil.rmtree(directory, ignore_errors=True)

    def _query(self) -> Any:
        return select(Runtime).options(selectinload(Runtime.version).selectinload(EnvironmentVersion.environment))

    def _get(
        self, s: Session, owner_id: str, runtime_id: str, *, for_update: bool = False, with_version: bool = True
    ) -> Runtime:
        """The caller's runtime (404 otherwise); ``with_version=False`` when only the runtime's
        own columns are read (saves them two queries)."""
        base: Any = self._query() if with_version else select(Runtime)
        q = base.where(Runtime.id == runtime_id, Runtime.owner_id == owner_id)
        if for_update:
            q = q.with_for_update()
        rt: Runtime | None = s.scalars(q).one_or_none()
        if rt is None:
            # Someone else's runtime is as invisible as a missing one (R27).
            raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
        return rt

    def _transition(
        self,
        s: Session,
        runtime_id: str,
        to: State,
        reason: str,
        message: str,
        *,
        expect: set[State] | frozenset[State] | None = None,
        details: dict[str, Any] | None = None,
        values: dict[str, Any] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> bool:
        """Compare-and-set the state; log it. False when the runtime was not in ``expect`` (or
        did not meet the further conditions ``where``)."""
        allowed = sources_of(to) if expect is None else {e for e in expect if can_transition(e, to)}
        now = self.clock()
        result = s.execute(
            update(Runtime)
            .where(Runtime.id == runtime_id, Runtime.state.in_([str(a) for a in allowed]), *where)
            .values(
                state=str(to),
                state_reason=reason,
                state_message=message,
                updated_at=now,
                **(values or {}),
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        with self._locks_guard:
            if to == State.RUNNING:
                self._running.add(runtime_id)
            else:
                self._running.discard(runtime_id)
        self._log(s, runtime_id, state=to, reason=reason, message=message, details=details)
        s.expire_all()
        return True

    def _log(
        self,
        s: Session,
        runtime_id: str,
        *,
        state: State | None = None,
        event: str | None = None,
        reason: str = "",
        message: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        s.add(
            RuntimeLogEntry(
                runtime_id=runtime_id,
                at=self.clock(),
                state=str(state) if state else None,
                event=event,
                reason=reason,
                message=message,
                details=details or {},
            )
        )

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """A transaction that wakes ``wait_for`` callers once it has committed."""
        with self.db.session() as s:
            yield s
        with self._changed:
            self._changed.notify_all()

    @contextmanager
    def _runtime_lock(self, runtime_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(runtime_id, threading.Lock())
        with lock:
            yield

    def try_runtime_lock(self, runtime_id: str) -> threading.Lock | None:
        """The runtime's lock, acquired, or None when a boot or stop holds it."""
        with self._locks_guard:
            lock = self._locks.setdefault(runtime_id, threading.Lock())
        return lock if lock.acquire(blocking=False) else None

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


class _ContainerDiedError(Exception):
    def __init__(self, exit_code: int | None, oom_killed: bool) -> None:
        super().__init__(f"exit code {exit_code}")
        self.exit_code = exit_code
        self.oom_killed = oom_killed


def _check_choice(value: str, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise InvalidInputError(f"{field}: {str(value)[:40]!r} is not one of {', '.join(choices)}", field=field)


def _check_idle_timeout(value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or value < 0 or value > MAX_IDLE_TIMEOUT:
        raise InvalidInputError(
            f"idle_timeout: must be whole seconds from 0 (never) to {MAX_IDLE_TIMEOUT}",
            field="idle_timeout",
        )
