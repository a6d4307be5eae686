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
- An exited container's unsaved changes become a draft before it is removed, so the next boot
  restores them (R33); if the draft cannot be made the container stays, and the next round
  tries again.
- A labelled container with no row at all (a crash between create and commit) is removed,
  only after both the listing and the database query succeeded (R13).
- Runtimes that an in-flight boot or stop of this process holds are left alone.
- Only containers of this installation and runner are ever looked at (``list_owned``):
  another installation's or another runner's are none of its business (R32). Containers made
  before installations had an identity are adopted when a row knows them, never removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import select

from envs.kit.errors import BackendError, EnvctlError
from runner.backends.base import BackendState, FoundContainer, RuntimeBackend, Status
from runner.channel import AgentTarget, AgentUnavailableError, ping
from runner.concurrency import Concurrency
from runner.identity import RunnerIdentity
from runner.models import Runtime
from runner.paths import RuntimePaths
from runner.runtimes.secret_uses import RuntimeSecrets
from runner.runtimes.states import ACTIVE, State
from runner.runtimes.store import Records, activity
from runner.saves.drafts import Drafts

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
    reason: str = ""  # the backend's cause, when it knows one (``node-lost``)
    error: str = ""  # and its words for it


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
                        reason=current.status.reason,
                        error=current.status.error,
                    )
                )
        elif current is not None:
            # stopped / error rows have no business with a container
            actions.append(Action("stop-leftover", row.id, current.state, seen=row.state))
    for runtime_id, containers in by_runtime.items():
        if runtime_id not in known:
            for c in containers:
                if not c.legacy:  # an old container no row knows may be another installation's
                    actions.append(Action("remove-orphan", runtime_id, c.state))
    return actions


class Reconciler:
    """Applies ``plan`` for one runner; one round per ``run()``."""

    def __init__(
        self,
        identity: RunnerIdentity,
        records: Records,
        concurrency: Concurrency,
        backend: RuntimeBackend,
        paths: RuntimePaths,
        drafts: Drafts,
        *,
        is_saving: Callable[[str], bool],
        secrets: RuntimeSecrets | None = None,
        remap: Callable[[list[FoundContainer]], list[FoundContainer]] | None = None,
    ) -> None:
        self.identity = identity
        self.records = records
        self.concurrency = concurrency
        self.backend = backend
        self.paths = paths
        self.drafts = drafts
        self.is_saving = is_saving
        self.secrets = secrets
        # the warm pool's hand in a complete listing (runner/runtimes/pool.py): its own containers
        # taken care of, a claimed one reported under its runtime's id
        self.remap = remap

    def _busy_here(self, runtime_id: str) -> bool:
        return self.concurrency.in_flight(runtime_id) or self.is_saving(runtime_id)

    def _hand_secrets(self, action: Action, sock: AgentTarget) -> bool:
        """Before a runtime found booting (its boot cut short by a restart) is adopted: give its
        agent the runtime's secrets, which the boot may not have handed over yet (again is
        harmless: the agent keeps the last values). False when that failed and the runtime went
        to ``error``."""
        if self.secrets is None:
            return True
        rid = action.runtime_id
        try:
            delivery = self.secrets.prepare(rid)
            if delivery is not None:
                delivery.send(sock)
        except (EnvctlError, OSError) as exc:
            message = exc.message if isinstance(exc, EnvctlError) else f"could not hand its agent the secrets: {exc}"
            with self.records.tx() as s:
                self.records.transition(
                    s,
                    rid,
                    State.ERROR,
                    "secret-unavailable",
                    message,
                    expect=_seen(action),
                    values={"backend_state": action.state},
                )
            return False
        return True

    def run(self) -> list[Action]:
        """One reconciliation round. Returns what it did."""
        # Rows first, then the listing: a container recorded on a row was made before the row
        # was read, so it is in the listing unless it really is gone.
        with self.records.db.session() as s:
            rows = [
                Row(r.id, State(r.state), r.state_reason, dict(r.backend_state or {}))
                for r in s.scalars(select(Runtime).where(Runtime.runner == self.identity.name))
                # an attached runtime's container is not envctl's: runner/runtimes/attach.py looks after it
                if (r.backend_state or {}).get("origin") != "attached"
            ]
        try:
            found = self.backend.list_owned(self.identity)
        except BackendError as exc:
            self._mark_unreachable(exc)
            raise
        if self.remap is not None:
            found = self.remap(found)
        done: list[Action] = []
        for action in plan(rows, found):
            if self._busy_here(action.runtime_id):
                continue  # a boot, stop, reset or save of ours is queued or running for it
            lock = self.concurrency.try_runtime_lock(action.runtime_id)
            if lock is None:
                continue  # a boot or stop of ours is working on it
            try:
                if self._busy_here(action.runtime_id):
                    continue
                self.apply(action)
                done.append(action)
            except EnvctlError as exc:
                log.warning("reconcile %s %s failed: %s", action.kind, action.runtime_id, exc.message)
            finally:
                lock.release()
        return done

    def _row_moved_on(self, action: Action) -> bool:
        """Whether the row is no longer what the plan saw (a state change since, or gone)."""
        with self.records.db.session() as s:
            row = s.get(Runtime, action.runtime_id)
            return row is None or (action.seen is not None and State(row.state) != action.seen)

    def apply(self, action: Action) -> None:
        kind = action.kind
        if kind in ("remove-orphan", "stop-leftover") and not self._still_stray(action):
            return
        if kind == "remove-orphan":
            log.info("removing container %s of unknown runtime %s", action.state.get("container_id"), action.runtime_id)
            self.backend.stop(action.state, timeout=1)
        elif kind == "stop-leftover":
            self.backend.stop(action.state, timeout=1)
            self.records.log_now(
                action.runtime_id,
                event="leftover-removed",
                reason="reconcile",
                message=f"removed container {action.state.get('container_id', '')[:12]}, no longer the runtime's",
            )
        elif kind == "finish-stop":
            if action.state:
                self.backend.stop(action.state)
            with self.records.tx() as s:
                self.records.transition(
                    s,
                    action.runtime_id,
                    State.STOPPED,
                    "reconcile",
                    "stop finished after a restart",
                    expect={State.STOPPING},
                    values={"backend_state": {}, "booted_at": None},
                )
        elif kind == "vanished":
            with self.records.tx() as s:
                self.records.transition(
                    s,
                    action.runtime_id,
                    State.ERROR,
                    "container-vanished",
                    "the runtime's container is gone (removed outside envctl?); start the runtime again",
                    expect=_seen(action),
                    values={"backend_state": {}, "booted_at": None},
                )
        elif kind == "exited":
            self._exited(action)
        elif kind == "adopt":
            self._adopt(action)

    def _still_stray(self, action: Action) -> bool:
        """The rows were read before the containers were listed: a runtime created, or started,
        in between owns a container the plan took for a stray. Look again (under the runtime's
        lock, with nothing of ours in flight for it) before removing anything."""
        with self.records.db.session() as s:
            row = s.get(Runtime, action.runtime_id)
            fresh = None if row is None else (State(row.state), (row.backend_state or {}).get("container_id"))
        if action.kind == "remove-orphan":
            return fresh is None
        return not (fresh is None or fresh[0] != action.seen or fresh[1] == action.state.get("container_id"))

    def _exited(self, action: Action) -> None:
        """The container stopped without envctl asking: keep its changes, then say why."""
        rid = action.runtime_id
        if self._row_moved_on(action):
            return  # the row moved on since the plan was made: not this round's business
        if action.reason == "node-lost":
            self._node_lost(action)
            return
        reason = "oom" if action.oom_killed else (action.reason or "container-exited")
        message = (
            "the runtime ran out of memory and was killed; choose a larger machine type"
            if action.oom_killed
            else (action.error if action.reason else f"the runtime's container exited with code {action.exit_code}")
        )
        tail = self.backend.logs_tail(action.state)
        if tail.strip() and not action.oom_killed:
            message += "; last output: " + tail.strip()[-500:]
        try:
            draft = self.drafts.make_draft(rid, reason=reason, state=action.state)
        except EnvctlError as exc:
            # The container holds the user's work: it stays until a draft can be made.
            with self.records.tx() as s:
                self.records.transition(
                    s,
                    rid,
                    State.ERROR,
                    "draft-failed",
                    f"{message}; its unsaved changes could not be kept yet ({exc.message}), so the container is "
                    "kept and envctl tries again",
                    expect=_seen(action),
                    values={"backend_state": action.state, "booted_at": None},
                    details={"exit_code": action.exit_code},
                )
            return
        if draft is not None:
            message += "; its unsaved changes were kept and come back at the next boot"
        elif self.drafts.has_draft(rid):  # a checkpoint (runner/runtimes/checkpoints.py) or an earlier stop's
            message += "; its unsaved changes could not be kept, but its last draft comes back at the next boot"
            pressure = self.drafts.pressure_draft(rid)  # one taken near the memory limit (runtimes/pressure.py)
            if pressure is not None:
                message += (
                    f": the memory-pressure draft, taken while cell {pressure[0]} was paused near the memory "
                    "limit, so its unsaved changes as of that draft come back"
                )
                if pressure[1] and not action.oom_killed and action.exit_code == 137:  # Swarm says no more
                    message += " (killed with exit code 137 after that pause: most likely by the memory killer)"
            message += " (what changed after that draft is gone)"
        self.backend.stop(action.state, timeout=1)  # the dead container goes before the row says so
        with self.records.tx() as s:
            self.records.transition(
                s,
                rid,
                State.ERROR,
                reason,
                message,
                expect=_seen(action),
                values={"backend_state": {}, "booted_at": None},
                details={"exit_code": action.exit_code, "draft": draft},
            )

    def _node_lost(self, action: Action) -> None:
        """The node the runtime ran on went away: what was not saved there is gone (no draft can
        be read from a node that does not answer); the service goes, the row says so plainly."""
        message = (
            f"the node the runtime ran on went away ({action.error}); unsaved work on that node is gone. "
            "Its last saved version is intact: start the runtime again to boot it on another node"
        )
        self.backend.stop(action.state, timeout=0)
        with self.records.tx() as s:
            self.records.transition(
                s,
                action.runtime_id,
                State.ERROR,
                "node-lost",
                message,
                expect=_seen(action),
                values={"backend_state": {}, "booted_at": None},
                details={"node": action.state.get("node"), "cause": action.error},
            )

    def _adopt(self, action: Action) -> None:
        rid = action.runtime_id
        with self.records.db.session() as s:
            rt = s.get(Runtime, rid)
            if rt is None:
                return
            was = State(rt.state)
            recorded = dict(rt.backend_state or {})
            same = recorded.get("container_id") == action.state.get("container_id")
        if was == State.RUNNING and same:
            return  # the normal case on every round: its container runs, nothing to do
        if same and recorded.get("agent"):  # a tcp channel's address and credential: the row keeps them
            action = replace(action, state={**action.state, "agent": recorded["agent"]})
        sock = self.paths.agent(rid, action.state)
        try:
            pong = ping(sock, timeout=3)
        except (AgentUnavailableError, OSError) as exc:
            if was in (State.BOOTING, State.ERROR):
                return  # still booting, or already said to be unreachable: look again next round
            with self.records.tx() as s:
                self.records.transition(
                    s,
                    rid,
                    State.ERROR,
                    "agent-unreachable",
                    f"the container runs but its agent does not answer: {exc}",
                    expect=_seen(action),
                    values={"backend_state": action.state},
                )
            return
        if was != State.RUNNING and not self._hand_secrets(action, sock):
            return
        with self.records.tx() as s:
            if was == State.RUNNING:
                self.records.log(s, rid, event="adopted", reason="reconcile", message="container re-attached")
                self.records.set_in(s, rid, backend_state=action.state)
                return
            now = self.records.clock()
            self.records.transition(
                s,
                rid,
                State.RUNNING,
                "adopted",
                f"found its container running (agent pid {pong.get('pid')}); adopted without a restart",
                expect=_seen(action),
                values={
                    "backend_state": action.state,
                    "booted_at": now,
                    **activity("adopted after a restart", now),
                },
            )

    def _mark_unreachable(self, exc: BackendError) -> None:
        """The backend cannot list: say so on every active runtime, forgetting nothing."""
        with self.records.tx() as s:
            ids = list(
                s.scalars(
                    select(Runtime.id).where(
                        Runtime.runner == self.identity.name,
                        Runtime.state.in_([str(st) for st in (State.RUNNING, State.BOOTING)]),
                    )
                )
            )
            for rid in ids:
                if self._busy_here(rid):
                    continue  # its own boot finds out about the engine soon enough
                self.records.transition(
                    s,
                    rid,
                    State.ERROR,
                    "backend-unreachable",
                    f"cannot reach the container engine to check on this runtime: {exc.message}",
                    expect={State.RUNNING, State.BOOTING},
                )


def _seen(action: Action) -> set[State] | None:
    return {action.seen} if action.seen is not None else None
