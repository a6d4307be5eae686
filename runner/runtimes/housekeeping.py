"""Housekeeping: one loop that, every ``runner_idle_check_interval`` seconds, reconciles with the
backend and shuts idle runtimes down (jupyterhub-idle-culler's shape: fetch, decide, act).

The decision is ``runner/runtimes/idle.py``'s pure ``decide``; this module fetches what it needs and
acts on it. Idle shutdown is a stop like any other: the unsaved changes become a draft.
Before it stops a runtime it decides again on fresh data (the flags first, then the row) and
the stop applies only while the row's last activity is still the one it decided on, so a cell
or a save that begins meanwhile always wins (R18, R20).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from envs.kit.errors import EnvctlError
from runner.concurrency import Concurrency
from runner.models import Runtime
from runner.runtimes import idle
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
    ) -> None:
        self.settings = settings
        self.records = records
        self.concurrency = concurrency
        self.reconciler = reconciler
        self.stop_now = stop_now  # the stop worker: (runtime id, reason)
        self.is_busy = is_busy
        self.is_saving = is_saving
        self.acting = acting  # False once another process took this runner's name over
        self._thread: threading.Thread | None = None

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
        self.shutdown_idle()

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
