"""Memory-pressure drafts: a draft taken while a cell near its memory limit is paused.

On backends where a crash keeps nothing (Kubernetes, Swarm: ``images_from_registry``), the
memory killer ending a runtime's agent loses every change since its last draft. With
``ENVCTL_RUNNER_MEMORY_PRESSURE`` (percent of the limit, default 90; 0 is off) the agent watches
its container's memory cgroup while a cell runs (``runner/agent/memwatch.py``); past the line it
stops the cell's processes and says so on the cell's stream (a ``pressure`` event). The cell's
worker (``runner/cells/workers.py``) hands that here, and this

1. takes a draft at once (``Drafts.make_draft``, reason ``memory-pressure``) as the runtime's
   work (a claim: reconciliation leaves the runtime alone meanwhile), its runner log line naming
   the cell that was paused near the limit: a checkpoint normally never runs beside a cell, this
   one does because the cell is stopped and its files hold still;
2. answers the agent ``resume`` (the cell goes on) once the draft is taken, failed, or took
   longer than ``WAIT`` seconds (then the draft goes on beside the running cell and the runner
   log says the cell was resumed before it ended). The agent resumes by itself after its own
   bound (``--memory-pause``, longer than ``WAIT``) when envctl never answers.

Once per cell: a second ``pressure`` event of the same cell (a stream attached again) only
resumes. If the memory killer then ends the agent, reconciliation's message names this draft
(``runner/runtimes/reconcile.py``) and the next boot restores it; if the cell finishes instead,
the draft is one more draft, like a checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

from envs.kit.errors import EnvctlError
from runner.channel import AgentChannel, AgentTarget
from runner.concurrency import Concurrency
from runner.runtimes.store import Records
from runner.saves.drafts import Drafts

log = logging.getLogger("envctl.runner")

WAIT = 45.0  # seconds a paused cell waits for its draft before it is resumed anyway
MIB = 1048576


def note_of(execution_id: str, event: dict[str, Any]) -> str:
    """What the draft's runner log line says of the pause."""
    usage, limit = event.get("usage"), event.get("limit")
    used = (
        f" ({int(usage) / MIB:.0f} MiB of {int(limit) / MIB:.0f} MiB in use)"
        if isinstance(usage, int) and isinstance(limit, int) and limit > 0
        else ""
    )
    return f"taken while cell {execution_id} was paused near the memory limit{used}"


class PressureDrafts:
    def __init__(
        self,
        records: Records,
        concurrency: Concurrency,
        drafts: Drafts,
        agent: Callable[[str], AgentTarget],
        *,
        wait: float = WAIT,
    ) -> None:
        self.records = records
        self.concurrency = concurrency
        self.drafts = drafts
        self.agent = agent  # runtime id -> its agent's address
        self.wait = wait
        self._lock = threading.Lock()
        self._drafted: dict[str, str] = {}  # runtime id -> the last cell drafted for

    def on_pressure(self, runtime_id: str, execution_id: str, event: dict[str, Any]) -> None:
        """A cell of the runtime was paused near the memory limit: draft, then resume it.
        Called by the cell's worker, which waits (the cell is stopped meanwhile)."""
        with self._lock:
            again = self._drafted.get(runtime_id) == execution_id
            self._drafted[runtime_id] = execution_id
        outcome = "already taken" if again else "failed"
        try:
            if not again:
                outcome = self._draft(runtime_id, execution_id, event)
        finally:
            self._resume(runtime_id, execution_id, outcome)

    def _draft(self, runtime_id: str, execution_id: str, event: dict[str, Any]) -> str:
        """The draft, as the runtime's work, waited for up to ``wait``; what came of it."""
        result: dict[str, Any] = {}
        note = note_of(execution_id, event)

        def take(rid: str) -> None:
            try:
                result["image"] = self.drafts.make_draft(
                    rid, reason="memory-pressure", note=note, execution=execution_id
                )
            except EnvctlError as exc:
                result["error"] = exc.message

        with self.concurrency.claim(runtime_id) as submit:
            future = submit(take)
        try:
            future.result(timeout=self.wait)
        except concurrent.futures.TimeoutError:
            self._log(
                runtime_id,
                f"the memory-pressure draft ({note}) took longer than {self.wait:g} s: the cell was resumed "
                "before it ended (the draft goes on beside it)",
            )
            return "timed out"
        if "error" in result:
            self._log(runtime_id, f"the memory-pressure draft ({note}) failed: {result['error']}; the cell was resumed")
            return "failed"
        if result.get("image") is None:
            self._log(runtime_id, f"memory pressure ({note}): nothing changed since the version, no draft needed")
            return "not needed"
        return "taken"

    def _resume(self, runtime_id: str, execution_id: str, outcome: str) -> None:
        try:
            with AgentChannel(self.agent(runtime_id), timeout=5) as channel:
                channel.request("resume", execution_id=execution_id, draft=outcome)
        except (EnvctlError, OSError) as exc:  # the agent resumes by itself after its bound
            log.warning("could not tell the agent of %s to resume cell %s: %s", runtime_id, execution_id, exc)

    def _log(self, runtime_id: str, message: str) -> None:
        log.warning("%s: %s", runtime_id, message)
        try:
            self.records.log_now(runtime_id, event="memory-pressure", reason="memory-pressure", message=message)
        except Exception:  # the runtime was deleted meanwhile
            log.info("could not write the runner log of %s", runtime_id, exc_info=True)
