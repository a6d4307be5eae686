"""Checkpoints: periodic drafts of running runtimes, opt-in (``ENVCTL_RUNNER_CHECKPOINT_INTERVAL``
seconds; 0, the default, is off), for backends where a crash keeps nothing (Swarm: no engine on
this host can commit a node's container, so a task killed without warning — SIGKILL, the memory
killer, its node's engine restarted — loses everything since its last draft or save).

A checkpoint is the draft a stop makes (``Drafts.make_draft``, reason ``checkpoint``): the agent
streams every change since the version into the runtime's draft repository, and the row points
at it; the next boot after a crash restores it. It is taken by the housekeeping round when
``due`` says so: a cell ran since the last checkpoint (nothing changes a runtime's files but its
cells), at least one interval went by since it, and the runtime is neither busy nor saving (a
checkpoint never runs beside a cell, so the layer never holds a half-written file of one; the
memory-pressure draft, ``pressure.py``, does, with the cell's processes stopped). It
records no activity, so it never holds off idle shutdown. What it costs: one walk of the
runtime's filesystem against the version's index and the changed files streamed and pushed, once
per interval at most and only after cells: the same as a draft at stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from envs.kit.errors import EnvctlError
from runner.concurrency import Concurrency
from runner.models import Runtime
from runner.runtimes.states import State
from runner.runtimes.store import Records

log = logging.getLogger("envctl.runner")


def due(
    *,
    last_activity_at: datetime | None,
    checkpointed_activity_at: datetime | None,
    checkpointed_at: datetime | None,
    now: datetime,
    interval: float,
    busy: bool,
    saving: bool,
) -> bool:
    """Whether a running runtime's checkpoint is due (a pure decision, tested with datetimes)."""
    if interval <= 0 or busy or saving or last_activity_at is None:
        return False
    if checkpointed_activity_at is not None and last_activity_at <= checkpointed_activity_at:
        return False  # nothing ran since the last one
    return checkpointed_at is None or now - checkpointed_at >= timedelta(seconds=interval)


class Checkpoints:
    def __init__(
        self,
        records: Records,
        concurrency: Concurrency,
        interval: float,
        *,
        make_draft: Callable[[str], object],
        is_busy: Callable[[str], bool],
        is_saving: Callable[[str], bool],
    ) -> None:
        self.records = records
        self.concurrency = concurrency
        self.interval = interval
        self.make_draft = make_draft  # (runtime id): the draft, reason "checkpoint"
        self.is_busy = is_busy
        self.is_saving = is_saving
        self._lock = threading.Lock()
        self._taken: dict[str, tuple[datetime | None, datetime]] = {}  # id -> (activity it covers, when)
        self._pending: set[str] = set()  # submitted, not ended: the next rounds leave them be

    def run(self) -> list[str]:
        """Take the checkpoints that are due, each as the runtime's work; their runtime ids."""
        if self.interval <= 0:
            return []
        with self.records.db.session() as s:
            q = self.records.query().where(Runtime.runner == self.records.runner, Runtime.state == State.RUNNING)
            running = [(rt.id, rt.last_activity_at, rt.booted_at) for rt in s.scalars(q)]
        now = self.records.clock()
        taken = []
        for rid, activity_at, booted_at in running:
            with self._lock:
                if rid in self._pending:
                    continue
                covered, at = self._taken.get(rid, (None, None))
            if at is not None and booted_at is not None and at < booted_at:
                covered, at = None, None  # a checkpoint of an earlier boot
            if not due(
                last_activity_at=activity_at,
                checkpointed_activity_at=covered if at is not None else booted_at,
                checkpointed_at=at,
                now=now,
                interval=self.interval,
                busy=self.is_busy(rid),
                saving=self.is_saving(rid),
            ):
                continue
            with self._lock:
                self._pending.add(rid)
            try:
                with self.concurrency.claim(rid) as submit:
                    submit(self._take, activity_at)
            except BaseException:
                with self._lock:
                    self._pending.discard(rid)
                raise
            taken.append(rid)
        return taken

    def _take(self, runtime_id: str, activity_at: datetime | None) -> None:
        began = self.records.clock()
        try:
            self.make_draft(runtime_id)
        except EnvctlError as exc:
            log.warning("checkpoint of %s failed: %s", runtime_id, exc.message)
        finally:
            with self._lock:
                self._taken[runtime_id] = (activity_at, began)
                self._pending.discard(runtime_id)
