"""Housekeeping: one loop that, every ``runner_idle_check_interval`` seconds, reconciles with the
backend, shuts idle runtimes down and takes the checkpoints that are due, when on
(jupyterhub-idle-culler's shape: fetch, decide, act).

The decision is ``runner/runtimes/idle.py``'s pure ``decide``; this module fetches what it needs and
acts on it. Idle shutdown is a stop like any other: the unsaved changes become a draft.
Before it stops a runtime it decides again on fresh data (the flags first, then the row) and
the stop applies only while the row's last activity is still the one it decided on, so a cell
or a save that begins meanwhile always wins (R18, R20).

Each round also ends the runtimes of this runner whose client lease ran out
(``runner/runtimes/leases.py``): a runner-log line says why (lease expired, the last heartbeat),
the server's log says it too (the runtime's own log goes with it), and the runtime is deleted as
``DELETE /runtimes/{id}`` deletes it (container stopped and removed, no draft). A running cell
does not keep it: a lease is about the client being there. Only the owning runner does this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from envs.kit.errors import EnvctlError
from runner.concurrency import Concurrency
from runner.models import Runtime
from runner.runtimes import idle, leases
from runner.runtimes.reconcile import Reconciler
from runner.runtimes.states import State
from runner.runtimes.store import Records
from runner.settings import Settings

log = logging.getLogger("envctl.runner")


class Housekeeping:
    def __init__(
        self,
        settings: Settings,
        records: Records,
        concurrency: Concurrency,
        reconciler: Reconciler,
        *,
        stop_now: Callable[[str, str], None],
        is_busy: Callable[[str], bool],
        is_saving: Callable[[str], bool],
        acting: Callable[[], bool],
        delete_runtime: Callable[[str, str], None] | None = None,
        checkpoints: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.records = records
        self.concurrency = concurrency
        self.reconciler = reconciler
        self.stop_now = stop_now  # the stop worker: (runtime id, reason)
        self.is_busy = is_busy
        self.is_saving = is_saving
        self.acting = acting  # False once another process took this runner's name over
        self.delete_runtime = delete_runtime  # (acting user id, runtime id): Lifecycle.delete
        self.checkpoints = checkpoints  # periodic drafts (runner/runtimes/checkpoints.py), when on
        self._thread: threading.Thread | None = None
        self._lease_told: dict[str, object] = {}  # runtime id -> the lease end its log line told of

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="envctl-housekeeping", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        interval = self.settings.runner_idle_check_interval
        while not self.concurrency.closing.wait(interval):
            try:
                self.tick()
            except Exception:  # the loop must outlive any one failure
                log.exception("housekeeping round failed")

    def tick(self) -> None:
        """One round: reconcile with the backend, then idle shutdowns."""
        if not self.acting():
            return
        try:
            self.reconciler.run()
        except EnvctlError as exc:
            log.warning("reconciliation failed: %s", exc.message)
        self.end_leases()
        self.shutdown_idle()
        if self.checkpoints is not None:
            self.checkpoints()

    # ------------------------------------------------------------------ idle shutdown
    def idle_status(
        self, rt: Runtime, *, busy: bool | None = None, saving: bool | None = None
    ) -> idle.IdleDecision | None:
        """When and why a running runtime will shut down; None when it is not running.

        ``busy`` and ``saving`` default to what is known now. A caller that decides to stop
        passes the flags it read *before* reading the row: a cell's end and a save's end record
        their activity before they clear the flag, so flags read first and the row read after
        never combine into "not busy, not saving, idle since long ago"."""
        if rt.state != State.RUNNING or rt.last_activity_at is None:
            return None
        machine = self.settings.machine_types.get(rt.machine_type)
        timeout = idle.effective_timeout(
            rt.idle_timeout, machine.idle_timeout if machine else None, self.settings.runner_idle_timeout
        )
        return idle.decide(
            last_activity_at=rt.last_activity_at,
            last_activity=rt.last_activity,
            now=self.records.clock(),
            timeout=timeout,
            busy=self.is_busy(rt.id) if busy is None else busy,
            saving=self.is_saving(rt.id) if saving is None else saving,
        )

    def shutdown_idle(self) -> list[str]:
        """Stop every running runtime of this runner whose idle decision says so."""
        stopped = []
        with self.records.db.session() as s:
            q = self.records.query().where(Runtime.runner == self.records.runner, Runtime.state == State.RUNNING)
            running = list(s.scalars(q))
        for candidate in running:
            first = self.idle_status(candidate)
            if first is None or not first.stop:
                continue
            # Decide again on fresh data: the flags first, then the row (see idle_status). The
            # list above may predate a save or a cell that ended since, with its activity.
            busy, saving = self.is_busy(candidate.id), self.is_saving(candidate.id)
            with self.concurrency.claim(candidate.id) as submit:
                with self.records.tx() as s:
                    rt = s.get(Runtime, candidate.id, populate_existing=True)
                    decision = None if rt is None else self.idle_status(rt, busy=busy, saving=saving)
                    if rt is None or decision is None or not decision.stop:
                        continue
                    ok = self.records.transition(
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
                    submit(self.stop_now, "idle")
        return stopped

    # ------------------------------------------------------------------ leases
    def end_leases(self, *, wait: bool = False) -> list[str]:
        """Stop and delete every runtime of this runner whose client lease ran out, each on the
        runner's workers (a delete waits for the container to stop; the loop does not); the ids
        whose delete began. With ``wait``, return once those deletes ended."""
        if self.delete_runtime is None:
            return []
        ended, futures = [], []
        for runtime_id in self.records.expired_leases(self.records.clock()):
            if self.concurrency.in_flight(runtime_id):
                continue  # a boot, a stop or the delete of an earlier round: the next round sees
            busy = self.is_busy(runtime_id)
            with self.concurrency.claim(runtime_id) as submit:
                with self.records.tx() as s:
                    rt = s.get(Runtime, runtime_id, populate_existing=True, with_for_update=True)
                    st = (
                        None
                        if rt is None
                        else leases.status(
                            rt.lease_seconds, rt.lease_expires_at, rt.lease_renewed_at, self.records.clock()
                        )
                    )
                    if rt is None or st is None or not st.expired or rt.runner != self.records.runner:
                        continue  # dropped or deleted since the listing (a renewal is refused once it ran out)
                    message = leases.expiry_message(st, busy=busy)
                    told = self._lease_told.get(runtime_id) == st.expires_at  # a delete that failed, again
                    self._lease_told[runtime_id] = st.expires_at
                    if not told:
                        self.records.log(
                            s,
                            runtime_id,
                            event="lease-expired",
                            reason="lease-expired",
                            message=message,
                            details={
                                "lease_seconds": st.seconds,
                                "lease_expires_at": st.expires_at.isoformat(),
                                "last_heartbeat_at": st.renewed_at.isoformat() if st.renewed_at else None,
                                "busy": busy,
                            },
                        )
                    owner, name = rt.owner_id, rt.name
                if not told:
                    log.warning("runtime %s (%s): %s", name, runtime_id, message)
                futures.append(submit(self._end_lease, owner))
                ended.append(runtime_id)
        if wait:
            for future in futures:
                future.result()
        return ended

    def _end_lease(self, runtime_id: str, owner: str) -> None:
        assert self.delete_runtime is not None
        try:
            self.delete_runtime(owner, runtime_id)
        except EnvctlError as exc:  # tried again next round (said once): the lease stays expired
            log.warning("deleting runtime %s after its lease expired failed: %s", runtime_id, exc.message)
            return
        self._lease_told.pop(runtime_id, None)
