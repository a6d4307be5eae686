"""Cells' writes on their way to the database: their outputs in batches and their ends, made by
one thread for all runtimes of this process, in the order they were handed over.

A runtime's worker (``runner/cells/workers.py``) publishes a cell's outputs and its end to
waiting clients at once and hands the database writes here, so it goes back to the agent for
the next cell instead of waiting for a commit: on PostgreSQL a commit waits for the disk, and a
notebook's next cell usually arrives while it would. Nothing is at risk meanwhile: the agent
keeps a cell until envctl tells it the end is stored (``ack``), which it does only after the
write (``Write.done``); after a crash the next start attaches again from the last stored output.

- One thread, first in first out: the outputs of a cell are committed in the order of their
  indexes, so another server following the cell from the database (``_follow_store``) never
  sees a later output before an earlier one.
- What has queued up while a commit was under way goes in one transaction (one commit, one
  flush of the disk, for many cells of many runtimes). If that transaction fails (a runtime
  deleted meanwhile: its rows are gone), each write is made again alone, so one runtime's
  trouble costs no other its rows.
- A cell's end waits (at most ``ANSWER_FIRST``) until requests waiting for it have answered:
  the write and the answer would otherwise contend for the interpreter, and the client waits.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from envs.kit.db import Database, HotWriter
from runner.cells.streams import Feed

log = logging.getLogger("envctl.executions")

ANSWER_FIRST = 0.01  # seconds an end's write may wait for waiting clients' answers
BATCH = 64  # writes at most in one transaction


@dataclass
class Write:
    execution_id: str
    statements: Callable[[HotWriter], None]  # the statements, in the writer's transaction
    feed: Feed | None = None  # an end's: waits for its answers first
    done: Callable[[Exception | None], None] | None = None  # after the commit (or its failure)
    queued_at: float = field(default_factory=time.monotonic)


class CellWrites:
    def __init__(self, db: Database, name: str = "envctl-cell-writes") -> None:
        self.db = db
        self._queue: collections.deque[Write] = collections.deque()
        self._cond = threading.Condition()
        self._name = name
        self._thread: threading.Thread | None = None
        self._pending = 0  # handed over and not yet written

    def put(self, write: Write) -> None:
        with self._cond:
            self._queue.append(write)
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything handed over so far is written; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            for w in batch:
                if w.feed is not None:
                    w.feed.answered.wait(max(0.0, w.queued_at + ANSWER_FIRST - time.monotonic()))
            try:
                self._commit(batch)
                results: list[Exception | None] = [None] * len(batch)
            except Exception as exc:
                if len(batch) == 1:
                    results = [exc]
                else:
                    log.info("a batch of %d cell writes failed (%s); writing each alone", len(batch), exc)
                    results = [self._alone(w) for w in batch]
            for w, error in zip(batch, results, strict=True):
                if w.done is not None:
                    try:
                        w.done(error)
                    except Exception:
                        log.exception("after writing execution %s", w.execution_id)
                elif error is not None:
                    log.error("could not store outputs of execution %s: %s", w.execution_id, error)
            with self._cond:
                self._pending -= len(batch)
                self._cond.notify_all()

    def _commit(self, batch: list[Write]) -> None:
        with self.db.hot() as c:
            for w in batch:
                w.statements(c)

    def _alone(self, w: Write) -> Exception | None:
        try:
            self._commit([w])
        except Exception as exc:
            return exc
        return None
