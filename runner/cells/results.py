"""Collects the files cells write under ``/results`` after each execution.

The runtime's results directory (``<state dir>/results`` on the host, ``/results`` in the
container; for a backend without ``host_paths`` a copy fetched over the agent channel first,
``result_remote.py``) is scanned; each new or changed file is copied to the results store by content
and recorded as a version (path, sha256, size, the execution that made it). Records keep no
foreign key to the runtime: results outlive it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from envs.kit.db import Database
from envs.kit.errors import EnvctlError
from runner.cells import store as cellstore
from runner.cells.result_files import ResultChangedError, ResultStore, ScannedFile, scan, store_from_settings
from runner.cells.result_remote import RemoteResults
from runner.models import ResultFile as ResultRow
from runner.models import Runtime
from runner.paths import RuntimePaths
from runner.settings import Settings

log = logging.getLogger("envctl.results")


class ResultCollector:
    def __init__(self, settings: Settings, db: Database, clock: Callable[[], datetime], paths: RuntimePaths) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.paths = paths
        self._store: ResultStore | None = None
        self._index: dict[str, dict[str, ScannedFile]] = {}  # runtime -> scan index (for mtime shortcuts)
        self._known: dict[str, dict[str, str]] = {}  # runtime -> path -> sha256 recorded last
        self._lock = threading.Lock()
        # a runtime without a directory on this host: its /results fetched over the agent channel
        self.remote = RemoteResults(paths.agent) if not paths.backend.host_paths else None

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = store_from_settings(self.settings)
        return self._store

    def results_dir(self, runtime_id: str) -> Path:
        return self.paths.results_dir(runtime_id)

    def collect(self, runtime_id: str, owner_id: str, execution_id: str | None) -> list[ScannedFile]:
        """Record what changed under the runtime's results since the last collection."""
        root = self.results_dir(runtime_id)
        if self.remote is not None:
            try:
                self.remote.sync(runtime_id, root)
            except EnvctlError as exc:  # what was fetched before is still recorded below
                log.warning("could not fetch the results of %s from its runtime: %s", runtime_id, exc.message)
        try:
            with os.scandir(root) as entries:
                empty = next(entries, None) is None
        except OSError:
            return []
        if empty and not self._known.get(runtime_id):
            return []  # the common case, decided with one look at the directory
        with self._lock:
            known = self._known.get(runtime_id)
            if known is None:
                known = self._load_known(runtime_id)
                self._known[runtime_id] = known
            index, _changed = scan(root, self._index.get(runtime_id))
            self._index[runtime_id] = index
            fresh = [f for f in index.values() if known.get(f.path) != f.sha256]
            recorded: list[ScannedFile] = []
            for f in fresh:
                try:
                    self.store.put(f.sha256, root / f.path)
                except ResultChangedError:
                    continue  # still being written: the next collection takes it
                except EnvctlError as exc:
                    log.warning("could not store result %s of %s: %s", f.path, runtime_id, exc.message)
                    continue
                recorded.append(f)
            if recorded:
                now = self.clock()
                with self.db.connection() as c:
                    # the runtime's team, so the results are its members' too (and outlive it)
                    team = c.scalar(select(Runtime.team).where(Runtime.id == runtime_id))
                    cellstore.record_results(
                        c,
                        [
                            {
                                "owner_id": owner_id,
                                "team": team,
                                "runtime_id": runtime_id,
                                "execution_id": execution_id,
                                "path": f.path,
                                "sha256": f.sha256,
                                "size": f.size,
                                "created_at": now,
                            }
                            for f in recorded
                        ],
                    )
                for f in recorded:
                    known[f.path] = f.sha256
            return recorded

    def _load_known(self, runtime_id: str) -> dict[str, str]:
        latest = (
            select(ResultRow.path, func.max(ResultRow.id).label("id"))
            .where(ResultRow.runtime_id == runtime_id)
            .group_by(ResultRow.path)
            .subquery()
        )
        with self.db.connection() as c:
            rows = c.execute(select(ResultRow.path, ResultRow.sha256).join(latest, ResultRow.id == latest.c.id)).all()
        return {r[0]: r[1] for r in rows}

    def forget(self, runtime_id: str) -> None:
        if self.remote is not None:
            self.remote.forget(runtime_id)
        with self._lock:
            self._index.pop(runtime_id, None)
            self._known.pop(runtime_id, None)
