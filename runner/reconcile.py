"""Reconciliation: make the database agree with what the backend really runs.

Runs when the runner starts and then on every housekeeping round. The plan is a pure function
of (rows, containers); applying it is the only part that acts.

- A complete listing of the backend comes first. If the backend cannot list (daemon down,
  timeout), active runtimes are marked ``error`` / ``backend-unreachable`` with their
  container ids kept, so nothing is forgotten and the next good round re-adopts them (R14).
- A running container of a runtime the database thinks active is adopted: its agent is pinged
  and the runtime is ``running`` again, container untouched (R11).
- An active runtime whose container vanished goes to ``error`` / ``container-vanished``; one
  whose container exited goes to ``error`` with ``oom`` or ``container-exited`` (R3, R12).
- A labelled container with no row at all (a crash between create and commit) is removed,
  only after both the listing and the database query succeeded (R13).
- Runtimes that an in-flight boot or stop of this process holds are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from envs.kit.errors import BackendError, EnvctlError
from runner.backends.base import BackendState, FoundContainer, Status
from runner.channel import AgentUnavailableError, ping
from runner.models import Runtime
from runner.states import ACTIVE, State

if TYPE_CHECKING:
    from runner.service import RunnerService

log = logging.getLogger("envctl.reconcile")


@dataclass(frozen=True)
class Row:
    """What reconciliation needs of a runtime row."""

    id: str
    state: State
    state_reason: str
    backend_state: BackendState


@dataclass(frozen=True)
class Action:
    kind: str  # adopt | vanished | exited | stop-leftover | remove-orphan | finish-stop
    runtime_id: str
    state: BackendState
    exit_code: int | None = None
    oom_killed: bool = False
    # the state the plan saw; a state change is applied only if the row is still in it, so a
    # plan made from a row that a boot or stop has since moved on never overrides that work
    seen: State | None = None


def plan(rows: list[Row], found: list[FoundContainer]) -> list[Action]:
    """What to do, given every row of this runner and every container it owns."""
    by_runtime: dict[str, list[FoundContainer]] = {}
    for c in found:
        by_runtime.setdefault(c.runtime_id, []).append(c)
    known = {r.id for r in rows}
    actions: list[Action] = []
    for row in rows:
        containers = by_runtime.get(row.id, [])
        recorded = row.backend_state.get("container_id")
        mine = [c for c in containers if c.state.get("container_id") == recorded] if recorded else containers
        strays = [c for c in containers if c not in mine]
        # Extra containers of a known runtime (at most one container per runtime, ever).
        for c in strays:
            actions.append(Action("stop-leftover", row.id, c.state))
        current = mine[0] if mine else None
        for c in mine[1:]:
            actions.append(Action("stop-leftover", row.id, c.state))
        adoptable = row.state in ACTIVE or (
            # errors that say nothing against the container: it still holds the user's work,
            # and is taken back once it answers again (never removed as a leftover)
            row.state == State.ERROR
            and row.state_reason in ("backend-unreachable", "draft-failed", "agent-unreachable")
        )
        if row.state == State.STOPPING:
            actions.append(Action("finish-stop", row.id, current.state if current else {}))
        elif adoptable:
            if current is None:
                actions.append(Action("vanished", row.id, {}, seen=row.state))
            elif current.status.status is Status.RUNNING:
                actions.append(Action("adopt", row.id, current.state, seen=row.state))
            else:
                actions.append(
                    Action(
                        "exited",
                        row.id,
                        current.state,
                        current.status.exit_code,
                        current.status.oom_killed,
                        seen=row.state,
                    )
                )
        elif current is not None:
            # stopped / error rows have no business with a container
            actions.append(Action("stop-leftover", row.id, current.state, seen=row.state))
    for runtime_id, containers in by_runtime.items():
        if runtime_id not in known:
            for c in containers:
                actions.append(Action("remove-orphan", runtime_id, c.state))
    return actions


def reconcile(service: RunnerService) -> list[Action]:
    """One reconciliation round for ``service``'s runner. Returns what it did."""
    backend = service.backend
    # Rows first, then the listing: a container recorded on a row was made before the row was
    # read, so it is in the listing unless it really is gone.
    with service.db.session() as s:
        rows = [
            Row(r.id, State(r.state), r.state_reason, dict(r.backend_state or {}))
            for r in s.scalars(select(Runtime).where(Runtime.runner == service.runner))
        ]
    try:
        found = backend.list_owned()
    except BackendError as exc:
        _mark_unreachable(service, exc)
        raise
    done: list[Action] = []
    for action in plan(rows, found):
        if service.in_flight(action.runtime_id):
            continue  # a boot, stop or reset of ours is queued or running for it
        lock = service.try_runtime_lock(action.runtime_id)
        if lock is None:
            continue  # a boot or stop of ours is working on it
        if service.in_flight(action.runtime_id):
            lock.release()
            continue
        try:
            _apply(service, action)
            done.append(action)
        except EnvctlError as exc:
            log.warning("reconcile %s %s failed: %s", action.kind, action.runtime_id, exc.message)
        finally:
            lock.release()
    return done


def _apply(service: RunnerService, action: Action) -> None:
    backend = service.backend
    rid = action.runtime_id
    if action.kind in ("remove-orphan", "stop-leftover"):
        # The rows were read before the containers were listed: a runtime created, or started,
        # in between owns a container the plan took for a leftover. Look again (under the
        # runtime's lock, with nothing of ours in flight for it) before removing anything.
        with service.db.session() as s:
            row = s.get(Runtime, rid)
            fresh = None if row is None else (State(row.state), (row.backend_state or {}).get("container_id"))
        if action.kind == "remove-orphan" and fresh is not None:
            return
        if action.kind == "stop-leftover" and (
            fresh is None or fresh[0] != action.seen or fresh[1] == action.state.get("container_id")
        ):
            return
    if action.kind == "remove-orphan":
        log.info("removing container %s of unknown runtime %s", action.state.get("container_id"), rid)
        backend.stop(action.state, timeout=1)
        return
    if action.kind == "stop-leftover":
        backend.stop(action.state, timeout=1)
        with service._tx() as s:
            service._log(
                s,
                rid,
                event="leftover-removed",
                reason="reconcile",
                message=f"removed container {action.state.get('container_id', '')[:12]}, no longer the runtime's",
            )
        return
    if action.kind == "finish-stop":
        if action.state:
            backend.stop(action.state)
        with service._tx() as s:
            service._transition(
                s,
                rid,
                State.STOPPED,
                "reconcile",
                "stop finished after a restart",
                expect={State.STOPPING},
                values={"backend_state": {}, "booted_at": None},
            )
        return
    if action.kind == "vanished":
        with service._tx() as s:
            service._transition(
                s,
                rid,
                State.ERROR,
                "container-vanished",
                "the runtime's container is gone (removed outside envctl?); start the runtime again",
                expect=_seen(action),
                values={"backend_state": {}, "booted_at": None},
            )
        return
    if action.kind == "exited":
        reason = "oom" if action.oom_killed else "container-exited"
        message = (
            "the runtime ran out of memory and was killed; choose a larger machine type"
            if action.oom_killed
            else f"the runtime's container exited with code {action.exit_code}"
        )
        with service.db.session() as s:
            row = s.get(Runtime, rid)
            if row is None or (action.seen is not None and State(row.state) != action.seen):
                return  # the row moved on since the plan was made: not this round's business
        tail = backend.logs_tail(action.state)
        if tail.strip() and not action.oom_killed:
            message += "; last output: " + tail.strip()[-500:]
        backend.stop(action.state, timeout=1)  # the dead container goes before the row says so
        with service._tx() as s:
            service._transition(
                s,
                rid,
                State.ERROR,
                reason,
                message,
                expect=_seen(action),
                values={"backend_state": {}, "booted_at": None},
                details={"exit_code": action.exit_code},
            )
        return
    if action.kind == "adopt":
        with service.db.session() as s:
            rt = s.get(Runtime, rid)
            if rt is None:
                return
            was = State(rt.state)
            same = (rt.backend_state or {}).get("container_id") == action.state.get("container_id")
        if was == State.RUNNING and same:
            return  # the normal case on every round: its container runs, nothing to do
        sock = backend.socket_path(action.state, service.state_dir(rid))
        try:
            pong = ping(sock, timeout=3)
        except (AgentUnavailableError, OSError) as exc:
            if was in (State.BOOTING, State.ERROR):
                return  # still booting, or already said to be unreachable: look again next round
            with service._tx() as s:
                service._transition(
                    s,
                    rid,
                    State.ERROR,
                    "agent-unreachable",
                    f"the container runs but its agent does not answer: {exc}",
                    expect=_seen(action),
                    values={"backend_state": action.state},
                )
            return
        if was == State.RUNNING and same:
            return  # nothing to do: the normal case on every round
        now = service.clock()
        values: dict[str, object] = {"backend_state": action.state}
        if was != State.RUNNING:
            values.update(booted_at=now, last_activity_at=now, last_activity="adopted after a restart")
        with service._tx() as s:
            if was == State.RUNNING:
                service._log(s, rid, event="adopted", reason="reconcile", message="container re-attached")
                s.execute(update(Runtime).where(Runtime.id == rid).values(backend_state=action.state))
            else:
                service._transition(
                    s,
                    rid,
                    State.RUNNING,
                    "adopted",
                    f"found its container running (agent pid {pong.get('pid')}); adopted without a restart",
                    expect=_seen(action),
                    values=values,
                )


def _seen(action: Action) -> set[State] | None:
    return {action.seen} if action.seen is not None else None


def _mark_unreachable(service: RunnerService, exc: BackendError) -> None:
    """The backend cannot list: say so on every active runtime, forgetting nothing."""
    with service._tx() as s:
        ids = list(
            s.scalars(
                select(Runtime.id).where(
                    Runtime.runner == service.runner,
                    Runtime.state.in_([str(st) for st in (State.RUNNING, State.BOOTING)]),
                )
            )
        )
        for rid in ids:
            if service.in_flight(rid):
                continue  # its own boot finds out about the engine soon enough
            service._transition(
                s,
                rid,
                State.ERROR,
                "backend-unreachable",
                f"cannot reach the container engine to check on this runtime: {exc.message}",
                expect={State.RUNNING, State.BOOTING},
            )
