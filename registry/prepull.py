"""Pulling ahead: a server told to (the setting ``registry_prepull``, team names) pulls each
version those teams publish as soon as it is published, so that the first boot here does not
wait for the download.

``Prepuller`` watches the ``published`` events of its teams (``registry/events.py``) from the
moment it starts and hands the version each one means now (a published tag: the version it
points at) to ``pull``, one at a time, in order. A pull that fails is logged and not tried
again: the boot that needs the version pulls it anyway.

The pull itself is the transfer module's (``runner/transfers/pushpull.py``, by the recorded digest,
checked): ``envctl serve`` starts one in the app's lifespan when a registry is configured,
pulling as envctl's admin.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from sqlalchemy import func, select

from envs.kit.db import Database
from envs.kit.errors import EnvctlError
from registry import visibility
from registry.models import TeamEvent

log = logging.getLogger("envctl.registry")

Pull = Callable[[str], object]  # pull the version ``ref`` (``acme/ml@3``) into this server's engine


class Prepuller:
    def __init__(self, db: Database, teams: Iterable[str], pull: Pull, interval: float = 2.0) -> None:
        self.db = db
        self.teams = tuple(teams)
        self.pull = pull
        self.interval = interval
        with db.session() as s:
            self.after = int(s.scalar(select(func.max(TeamEvent.id))) or 0)  # what is published from now on
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="envctl-prepull", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # the loop outlives a database that does not answer for a while
                log.exception("pre-pull: reading the teams' events failed; trying again")

    def run_once(self) -> list[str]:
        """Pull what was published since the last look; the versions pulled."""
        with self.db.session() as s:
            published = s.scalars(
                select(TeamEvent)
                .where(TeamEvent.id > self.after, TeamEvent.team.in_(self.teams), TeamEvent.kind == "published")
                .order_by(TeamEvent.id)
            ).all()
            refs = []
            for event in published:
                self.after = event.id
                try:
                    # as anyone outside the team sees it: what is no longer published is not pulled
                    refs.append(visibility.resolve(s, event.ref, visibility.ANYONE, "ref").ref)
                except EnvctlError:  # gone or unpublished since: nothing to pull
                    continue
        pulled = []
        for ref in dict.fromkeys(refs):
            try:
                self.pull(ref)
            except EnvctlError as exc:
                log.warning("pre-pull of %s failed (the first boot will pull it): %s", ref, exc.message)
                continue
            pulled.append(ref)
        return pulled
