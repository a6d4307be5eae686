"""What is known of executions while they are hot: their view, their outputs so far, and who
listens (``Feed``), for the executions of this process's runtimes.

An API request that follows a cell (``?wait``, server-sent events) subscribes to its feed and
hears each output and the end as they happen, without touching the database. Finished feeds are
kept for a while (``RECENT``) for fast reads; the database has everything too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runner.models import Execution

log = logging.getLogger("envctl.executions")

FINAL = frozenset({"ok", "error", "interrupted"})
RECENT = 256  # finished executions kept in memory for fast reads


@dataclass
class Event:
    kind: str  # "output" | "status"
    index: int = -1
    data: dict[str, Any] = field(default_factory=dict)
    # ``data`` as compact JSON, when its producer encoded it already (a cell's output is encoded
    # once, by its worker, for the server-sent event and the database row alike)
    encoded: str | None = None


Subscriber = Callable[[Event], None]


@dataclass
class ExecutionView:
    """What the API shows of an execution: plain data, kept in memory while it is hot."""

    id: str
    runtime_id: str
    owner_id: str  # the runtime's owner
    seq: int
    language: str
    code: str
    timeout: float | None
    status: str
    created_at: datetime
    kernel: str | None = None  # set for cells of jupyter runtimes: the kernelspec that runs them
    execution_count: int | None = None
    output_bytes: int = 0
    output_count: int = 0
    truncated: bool = False
    error_name: str | None = None
    error_value: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    mounts: list[dict[str, Any]] | None = None  # what the runtime's mounts held (git commit, ...)
    team: str | None = None  # the runtime's team
    submitted_by: str | None = None  # the user id of who submitted it; None: the owner (rows before 0016)

    @classmethod
    def of(cls, row: Execution) -> ExecutionView:
        return cls(
            id=row.id,
            runtime_id=row.runtime_id,
            owner_id=row.owner_id,
            team=row.team,
            submitted_by=row.submitted_by,
            seq=row.seq,
            language=row.language,
            code=row.code,
            timeout=row.timeout,
            status=row.status,
            created_at=row.created_at,
            execution_count=row.execution_count,
            output_bytes=row.output_bytes,
            output_count=row.output_count,
            truncated=row.truncated,
            error_name=row.error_name,
            error_value=row.error_value,
            started_at=row.started_at,
            finished_at=row.finished_at,
            mounts=row.mounts,
        )


class Feed:
    """The live side of one execution: its view, outputs so far, and who listens."""

    def __init__(self, view: ExecutionView) -> None:
        self.view = view
        self.outputs: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.subscribers: list[Subscriber] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.answering = 0  # API requests answering their client about this execution's end
        self.answered = threading.Event()
        self.answered.set()

    def publish(self, event: Event) -> None:
        with self.lock:
            if event.kind == "output":
                self.outputs.append(event.data)
            else:
                self.final = event.data
            subscribers = list(self.subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # a slow or gone client must not stop the cell
                log.debug("subscriber failed", exc_info=True)
        if event.kind == "status":
            self.done.set()


class Feeds:
    """The feeds of this process: queued and running ones, and a few finished lately."""

    def __init__(self) -> None:
        self._live: dict[str, Feed] = {}
        self._recent: OrderedDict[str, Feed] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, execution_id: str) -> Feed | None:
        with self._lock:
            return self._live.get(execution_id) or self._recent.get(execution_id)

    def live(self, execution_id: str) -> Feed | None:
        with self._lock:
            return self._live.get(execution_id)

    def add(self, feed: Feed) -> None:
        with self._lock:
            self._live[feed.view.id] = feed

    def has(self, execution_id: str) -> bool:
        with self._lock:
            return execution_id in self._live

    def finished(self, execution_id: str) -> Feed | None:
        """Move a feed from live to recent; returns it (None if it was not live)."""
        with self._lock:
            feed = self._live.pop(execution_id, None)
            if feed is not None:
                self._recent[execution_id] = feed
                while len(self._recent) > RECENT:
                    self._recent.popitem(last=False)
            return feed


def merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive stream outputs of the same name, as Jupyter shows them."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        if (
            merged
            and out.get("output_type") == "stream"
            and merged[-1].get("output_type") == "stream"
            and merged[-1].get("name") == out.get("name")
        ):
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + out.get("text", "")}
        else:
            merged.append(dict(out))
    return merged
