"""Starting, stopping, resetting and deleting runtimes: the commands, and the stop worker.

Each command answers at once (the API's 202) after a compare-and-set on the runtime's row;
the slow part runs on a worker thread under the runtime's lock (``runner/concurrency.py``).
Booting itself is ``runner/runtimes/boot.py``. Rules (DESIGN.md, "Runtime states"):

- Only the runner that owns a runtime acts on it; others get a 409 naming the owner.
- A stop keeps the unsaved changes as a draft first; if the draft cannot be made the runtime
  is not stopped (never lose a user's work). A reset throws them away and boots again.
- At most ``max_boots`` runtimes boot at once; more start requests get 429 with Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from envs.kit.errors import EnvctlError, TooManyRequestsError
from runner.backends.base import RuntimeBackend
from runner.cells.workers import CellWorkers
from runner.concurrency import Concurrency
from runner.errors import RuntimeStateError
from runner.models import Runtime
from runner.mounts.prepare import MountPreparer
from runner.paths import RuntimePaths
from runner.runtimes.boot import Booter
from runner.runtimes.states import State
from runner.runtimes.store import Records, Who
from runner.saves.drafts import Drafts
from runner.settings import Settings

log = logging.getLogger("envctl.runner")


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        records: Records,
        concurrency: Concurrency,
        backend: RuntimeBackend,
        paths: RuntimePaths,
        drafts: Drafts,
        booter: Booter,
        mounts: MountPreparer,
        cells: CellWorkers,
        *,
        is_saving: Callable[[str], bool],
        on_deleted: Callable[[str], None],
        serve_pooled: Callable[[Runtime], bool] | None = None,
        detach: Callable[[str, dict[str, Any]], bool] | None = None,
        on_deleting: Callable[[Session, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.records = records
        self.concurrency = concurrency
        self.backend = backend
        self.paths = paths
        self.drafts = drafts
        self.booter = booter
        self.mounts = mounts
        self.cells = cells
        self.is_saving = is_saving
        self.on_deleted = on_deleted
        # claims a warm container for a stopped runtime that fits (runner/runtimes/pool.py): True when
        # it did (the runtime is then running, or in error), False to boot as usual
        self.serve_pooled = serve_pooled
        # ends an attached runtime's agent, leaving its container as it was (runner/runtimes/attach.py);
        # False for any other runtime
        self.detach = detach
        # reads what must outlive the row, in the delete's transaction (the pool's boot counts)
        self.on_deleting = on_deleting

    def _failed_unexpectedly(self, runtime_id: str) -> Callable[[], None]:
        def record() -> None:
            self.records.fail(runtime_id, "internal-error", "envctl failed unexpectedly; see its log", set(State))

        return record

    # ------------------------------------------------------------------ start
    def start(self, who: Who, runtime_id: str) -> Runtime:
        """Ask for a boot; answers at once with the runtime in ``booting`` (``running`` when
        the warm pool or an attached container served it)."""
        self.begin(who, runtime_id)
        with self.records.db.session() as s:
            return self.records.get(s, who, runtime_id)

    def begin(self, who: Who, runtime_id: str) -> None:
        """``start`` without reading the runtime back: what a cell waiting for its runtime calls
        (it waits for the state itself), so that a pooled first cell reads no more than it must."""
        with self.records.tx() as s:
            rt = self.records.get_mine(s, who, runtime_id, with_version=False)
            if rt.state in (State.BOOTING, State.RUNNING):
                return  # already on its way: starting twice is not an error
            if rt.state == State.STOPPING:
                raise RuntimeStateError(
                    "the runtime is stopping; start it again once it is stopped", details={"state": rt.state}
                )
            stopped = rt.state in (State.STOPPED, State.ERROR)
        if stopped and self.serve_pooled is not None:
            with self.concurrency.claim(runtime_id), self.concurrency.runtime_lock(runtime_id):
                served = self.serve_pooled(rt)
            if served:
                return
        self.backend.ping()  # an engine that does not answer is a 503 now, not an error later
        if not self.concurrency.take_boot_slot():
            raise TooManyRequestsError(
                f"{self.settings.runner_max_boots} runtimes are booting already; try again shortly", retry_after=2
            )
        try:
            with self.concurrency.claim(runtime_id, on_error=self._failed_unexpectedly(runtime_id)) as submit:
                with self.records.tx() as s:
                    ok = self.records.transition(s, runtime_id, State.BOOTING, "user-request", "boot requested")
                if not ok:
                    self.concurrency.release_boot_slot()
                    return
                self.concurrency.new_cancel(runtime_id)
                submit(self.booter.boot)
        except BaseException:
            self.concurrency.release_boot_slot()
            raise

    # ------------------------------------------------------------------ stop
    def stop(
        self, who: Who, runtime_id: str, *, reason: str = "user-request", message: str = "stop requested"
    ) -> Runtime:
        with self.concurrency.claim(runtime_id, on_error=self._failed_unexpectedly(runtime_id)) as submit:
            with self.records.tx() as s:
                rt = self.records.get_mine(s, who, runtime_id)
                if rt.state == State.STOPPED:
                    return rt
                ok = self.records.transition(s, runtime_id, State.STOPPING, reason, message)
                rt = self.records.get(s, who, runtime_id)
            if ok:
                self.concurrency.cancel(runtime_id)
                submit(self.stop_now, reason)
        return rt

    def stop_now(self, runtime_id: str, reason: str) -> None:
        """The stop worker: keep a draft (unless resetting), remove the container, ``stopped``."""
        with self.concurrency.runtime_lock(runtime_id):
            with self.records.db.session() as s:
                rt = s.get(Runtime, runtime_id)
                if rt is None or rt.state != State.STOPPING:
                    return
                backend_state = dict(rt.backend_state or {})
                mounts = list(rt.mounts or [])
            if self.detach is not None and self.detach(runtime_id, backend_state):
                backend_state = {}  # an attached container is never stopped, and holds no draft of ours
            if reason != "reset" and backend_state:
                try:
                    self.drafts.make_draft(runtime_id)
                except EnvctlError as exc:
                    # Never lose a user's work: the container stays, reconciliation takes it
                    # back as running, and the next stop tries again.
                    self.records.fail(
                        runtime_id,
                        "draft-failed",
                        f"could not keep the unsaved changes, so the runtime was not stopped: {exc.message}",
                        {State.STOPPING},
                    )
                    return
            try:
                self.backend.stop(backend_state)
            except EnvctlError as exc:
                self.records.fail(
                    runtime_id, "backend-error", f"could not stop the container: {exc.message}", {State.STOPPING}
                )
                return
            self.cells.disconnect(runtime_id)  # before ``stopped``: no cell of a next boot reaches this agent
            self._write_back(runtime_id, mounts)
            with self.records.tx() as s:
                self.records.transition(
                    s,
                    runtime_id,
                    State.STOPPED,
                    reason,
                    "container removed",
                    expect={State.STOPPING},
                    values={"backend_state": {}, "booted_at": None},
                )
            self.paths.remove_socket(runtime_id)

    def _write_back(self, runtime_id: str, mounts: list[dict[str, Any]]) -> None:
        """S3 mounts asked to be written back upload what the runtime changed (logged; a
        failure is logged and does not keep the runtime from stopping)."""
        try:
            uploaded = self.mounts.write_back(mounts, runtime_id)
        except EnvctlError as exc:
            with self.records.tx() as s:
                self.records.log(s, runtime_id, event="writeback-failed", reason="stop", message=exc.message)
            return
        if uploaded:
            with self.records.tx() as s:
                self.records.log(
                    s,
                    runtime_id,
                    event="written-back",
                    reason="stop",
                    message=f"{len(uploaded)} files written back to S3",
                )

    # ------------------------------------------------------------------ reset
    def reset(self, who: Who, runtime_id: str) -> Runtime:
        """Throw the unsaved changes away and boot from the version again (202)."""
        with self.concurrency.claim(runtime_id, on_error=self._failed_unexpectedly(runtime_id)) as submit:
            with self.records.tx() as s:
                rt = self.records.get_mine(s, who, runtime_id)
                if self.is_saving(runtime_id):
                    raise RuntimeStateError("a save of this runtime is in progress; reset it afterwards")
                if rt.state in (State.RUNNING, State.BOOTING, State.ERROR) and rt.backend_state:
                    ok = self.records.transition(
                        s, runtime_id, State.STOPPING, "reset", "reset requested: discarding changes"
                    )
                    if not ok:
                        raise RuntimeStateError(f"the runtime is {rt.state}; try again in a moment")
                    if self.is_saving(runtime_id):  # began since the check: roll back
                        raise RuntimeStateError("a save of this runtime is in progress; reset it afterwards")
                elif rt.state == State.STOPPING:
                    raise RuntimeStateError("the runtime is stopping; reset it once it is stopped")
            self.concurrency.cancel(runtime_id)
            submit(self._reset, who)
        with self.records.db.session() as s:
            return self.records.get(s, who, runtime_id)

    def _reset(self, runtime_id: str, who: Who) -> None:
        self.stop_now(runtime_id, "reset")  # no draft: the changes are what is thrown away
        self.drafts.discard_draft(runtime_id)
        self.start(who, runtime_id)

    # ------------------------------------------------------------------ delete
    def delete(self, who: Who, runtime_id: str) -> None:
        """Stop the runtime (synchronously) and forget it; its results stay. Its owner or an
        admin of its team may (``Records.get_to_manage``).

        In this order, so that nothing writes for rows the delete removes: the cell worker is
        told the runtime goes (it boots and retries nothing more), the container stops (the
        running cell ends, "deleted"), the worker writes the ends of its cells, and only then
        the runtimes store deletes the row (its log and executions go with it)."""
        with self.records.db.session() as s:
            self.records.get_to_manage(s, who, runtime_id, "deleting", with_version=False)
        self.concurrency.cancel(runtime_id)
        self.cells.retire(runtime_id)
        with self.concurrency.runtime_lock(runtime_id):
            with self.records.db.session() as s:
                rt = self.records.get(s, who, runtime_id, with_version=False)
                state = dict(rt.backend_state or {})
                draft = rt.draft_image_id
                mounts = list(rt.mounts or [])
            if self.detach is not None and self.detach(runtime_id, state):
                state = {}
            if state:
                self.backend.stop(state, timeout=2)
                self._write_back(runtime_id, mounts)
            with self.cells.in_order(runtime_id):  # no cell is numbered meanwhile
                self.cells.drain(runtime_id)
                with self.records.tx() as s:
                    if self.on_deleting is not None:
                        self.on_deleting(s, runtime_id)
                    self.records.delete(s, who, runtime_id)
        self.on_deleted(runtime_id)
        self.concurrency.forget(runtime_id)
        if draft:
            self.backend.remove_image(draft)
        self.paths.remove_state_dir(runtime_id)
        self.mounts.forget(runtime_id)
