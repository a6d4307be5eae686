"""The concurrency machinery of one runner process: locks, boot slots, the worker pool,
in-flight claims and cancel events.

- Slow work (Docker calls, waiting for an agent) runs on the pool's threads, never on the API's
  event loop; a runtime's boot and stop run one at a time under the runtime's lock.
- A boot holds one of ``max_boots`` slots from the moment it is asked for until the runtime is
  ``running`` (or not booting any more), so no more than ``max_boots`` runtimes boot at once;
  more start requests are refused at once with 429 (R31).
- A claim marks a runtime "in flight" *before* its state changes and until the submitted work
  ends, so reconciliation, which reads rows and then lists containers, leaves it alone.
- A cancel event lets a stop or reset cut a boot short.

This is memory of the process that does the work, and only of that work: it dies with the
process, and so does the work it describes. Nothing that other processes need to know lives
here (state, ownership and sequence numbers are in the database).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("envctl.runner")

Submit = Callable[..., "Future[None]"]


class Concurrency:
    def __init__(self, max_boots: int) -> None:
        self.max_boots = max_boots
        self.closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(4, max_boots + 4), thread_name_prefix="envctl-runner")
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._inflight: dict[str, int] = {}  # runtime id -> boots/stops/resets queued or running
        self._cancel: dict[str, threading.Event] = {}
        self._boot_slots = threading.BoundedSemaphore(max_boots)

    # ------------------------------------------------------------------ work
    def submit(self, fn: Callable[..., None], *args: Any, on_error: Callable[[], None] | None = None) -> Future[None]:
        """Run ``fn(*args)`` on the pool; an exception is logged and ``on_error`` called."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s%r failed", getattr(fn, "__name__", fn), args)
                if on_error is not None:
                    try:
                        on_error()
                    except Exception:
                        log.exception("could not record the failure")

        return self._pool.submit(run)

    def shutdown(self) -> None:
        """Stop taking work and wait for what runs; cancel boots first so none waits long."""
        self.closing.set()
        with self._guard:
            events = list(self._cancel.values())
        for event in events:
            event.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ claims
    @contextmanager
    def claim(self, runtime_id: str, *, on_error: Callable[[], None] | None = None) -> Iterator[Submit]:
        """Mark the runtime in flight and yield a submit function; the claim passes to the
        submitted work (released when it ends), or is dropped if nothing was submitted."""
        with self._guard:
            self._inflight[runtime_id] = self._inflight.get(runtime_id, 0) + 1
        handed_over = False

        def submit(fn: Callable[..., None], *args: Any) -> Future[None]:
            nonlocal handed_over
            future = self.submit(fn, runtime_id, *args, on_error=on_error)
            handed_over = True
            future.add_done_callback(lambda _f: self._unclaim(runtime_id))
            return future

        try:
            yield submit
        finally:
            if not handed_over:
                self._unclaim(runtime_id)

    def _unclaim(self, runtime_id: str) -> None:
        with self._guard:
            left = self._inflight.get(runtime_id, 1) - 1
            if left <= 0:
                self._inflight.pop(runtime_id, None)
            else:
                self._inflight[runtime_id] = left

    def in_flight(self, runtime_id: str) -> bool:
        """A boot, stop or reset of this process is queued or running for the runtime."""
        with self._guard:
            return runtime_id in self._inflight

    # ------------------------------------------------------------------ locks
    @contextmanager
    def runtime_lock(self, runtime_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(runtime_id, threading.Lock())
        with lock:
            yield

    def try_runtime_lock(self, runtime_id: str) -> threading.Lock | None:
        """The runtime's lock, acquired, or None when a boot or stop holds it."""
        with self._guard:
            lock = self._locks.setdefault(runtime_id, threading.Lock())
        return lock if lock.acquire(blocking=False) else None

    def forget(self, runtime_id: str) -> None:
        """The runtime is gone: drop its lock (if nobody holds it) and cancel event."""
        with self._guard:
            lock = self._locks.get(runtime_id)
            if lock is not None and not lock.locked():
                del self._locks[runtime_id]
            self._cancel.pop(runtime_id, None)

    # ------------------------------------------------------------------ boot slots
    def take_boot_slot(self) -> bool:
        return self._boot_slots.acquire(blocking=False)

    def release_boot_slot(self) -> None:
        self._boot_slots.release()

    # ------------------------------------------------------------------ cancel events
    def new_cancel(self, runtime_id: str) -> threading.Event:
        event = threading.Event()
        with self._guard:
            self._cancel[runtime_id] = event
        return event

    def cancel(self, runtime_id: str) -> None:
        """Cut a boot of the runtime short (a stop, reset or delete was asked for)."""
        with self._guard:
            event = self._cancel.get(runtime_id)
        if event is not None:
            event.set()

    def cancel_event(self, runtime_id: str) -> threading.Event | None:
        with self._guard:
            return self._cancel.get(runtime_id)

    def drop_cancel(self, runtime_id: str, event: threading.Event | None) -> None:
        """Remove ``event`` if it is still the runtime's (a later boot may have its own)."""
        with self._guard:
            if event is not None and self._cancel.get(runtime_id) is event:
                del self._cancel[runtime_id]
