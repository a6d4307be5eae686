"""Progress of a base-image build: typed events, and process output turned into them.

A build reports a stream of :class:`BuildEvent` (image, phase, message), as repo2docker does:
``envctl base build`` prints them as ``[image] phase: message`` lines.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

_TAIL_LINES = 30
_EMIT_INTERVAL = 0.5  # seconds between streamed output events


@dataclass(frozen=True)
class BuildEvent:
    image: str
    # "reuse" | "debootstrap" | "certificates" | "import" | "step" | "commit" | "verify" | "done"
    phase: str
    message: str


Progress = Callable[[BuildEvent], None]


def no_progress(event: BuildEvent) -> None:
    """A Progress that shows nothing."""


class OutputStream:
    """Turns process output into throttled progress events and keeps the last lines."""

    def __init__(self, image: str, phase: str, emit: Progress, prefix: str = "") -> None:
        self.image, self.phase, self.emit, self.prefix = image, phase, emit, prefix
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self._last_emit = 0.0
        self._pending: str | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = re.split(rb"\r?\n|\r", data)
        for raw in lines:
            self._line(raw)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if self._pending is not None:
            self.emit(BuildEvent(self.image, self.phase, self.prefix + self._pending))
            self._pending = None

    def text(self) -> str:
        return "\n".join(self.tail)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line:
            return
        self.tail.append(line)
        now = time.monotonic()
        if now - self._last_emit >= _EMIT_INTERVAL:
            self._last_emit = now
            self._pending = None
            self.emit(BuildEvent(self.image, self.phase, self.prefix + line))
        else:
            self._pending = line
