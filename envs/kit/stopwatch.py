"""Where a long piece of work spends its time, by named spans, for the work's own report.

A save measures itself: ``with stopwatch.measuring() as watch:`` around it, and the code it calls,
however deep, marks its steps with ``with stopwatch.span("commit"):`` (nothing is kept when no
measuring is under way, so library code may mark spans freely). The spans of one kind add up;
``watch.ms()`` gives them in milliseconds, in the order they first started. A context variable
carries the watch, so a span in another thread (a pool's worker) is not counted: mark the wait
for it in the caller instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_CURRENT: contextvars.ContextVar[Stopwatch | None] = contextvars.ContextVar("envctl_stopwatch", default=None)


class Stopwatch:
    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._spans: dict[str, float] = {}  # name -> seconds, in the order first started

    def add(self, name: str, seconds: float) -> None:
        self._spans[name] = self._spans.get(name, 0.0) + seconds

    def ms(self) -> dict[str, float]:
        """Each span's milliseconds, and ``total`` (since the watch started)."""
        out = {name: round(s * 1000, 1) for name, s in self._spans.items()}
        out["total"] = round((time.perf_counter() - self._start) * 1000, 1)
        return out


@contextlib.contextmanager
def measuring() -> Iterator[Stopwatch]:
    """A new watch for the block: the spans marked inside it (in this thread) count on it."""
    watch = Stopwatch()
    token = _CURRENT.set(watch)
    try:
        yield watch
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    """Time the block as ``name`` on the watch measuring now, if any."""
    watch = _CURRENT.get()
    if watch is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        watch.add(name, time.perf_counter() - start)
