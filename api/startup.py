"""Start-up: every collaborator of one envctl server, built once, in one place.

``Services.build(settings)`` makes the database (refusing an old schema), the backend, the
runner service (which wires the runner's own rooms, ``runner/service.py``) and, for ``serve``,
the managed registry process; ``open`` writes the first admin's token, opens the runner
(reconcile, recover, housekeeping) and starts the pre-puller; ``close`` stops all of it in the
reverse order. ``envctl serve`` (api/cli/local.py), the app factory (``api.app.create_app``)
and the tests take a ``Services`` instead of wiring their own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from api.dbschema import check_current
from api.settings import Settings
from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.service import PinnedBy
from registry import distribution
from registry import users as registry_service
from registry.errors import RegistryUnavailableError
from registry.prepull import Prepuller
from runner.backends import load_backend
from runner.backends.base import RuntimeBackend
from runner.service import RunnerService

log = logging.getLogger("envctl.api")


def write_admin_token(settings: Settings, db: Database) -> str:
    """Create the first admin if there is none, and write its token for the CLI; the admin's id."""
    with db.session() as s:
        admin, token = registry_service.ensure_admin(s)
        admin_id = admin.id
    if token is not None:
        path: Path = settings.admin_token_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(token + "\n")
        log.info("created the first admin; its token is in %s", path)
    return admin_id


def start_registry(settings: Settings) -> distribution.ManagedRegistry | None:
    """The managed registry, started (``None`` when there is none to run); says on stderr what
    it did. One that does not start yet is returned all the same: its watcher keeps trying."""
    plan = distribution.plan(settings)
    if plan.mode != "managed":
        where = f" at {plan.url}" if plan.url else ""
        print(f"registry: {plan.mode}{where} ({plan.reason})", file=sys.stderr)
        return None
    managed = distribution.ManagedRegistry(settings)
    try:
        managed.start()
    except RegistryUnavailableError as exc:  # envctl serves anyway; the watcher keeps trying
        print(f"registry: {exc.message}; envctl serves without it meanwhile", file=sys.stderr)
    else:
        print(f"registry: managed at {managed.url} (storage and log in {managed.dir})", file=sys.stderr)
    return managed


@dataclass
class Services:
    """One server's collaborators. Build with ``Services.build``; ``open`` and ``close`` run
    with the app's lifespan."""

    settings: Settings
    db: Database
    backend: RuntimeBackend
    runner: RunnerService
    housekeeping: bool = True
    registry: distribution.ManagedRegistry | None = None
    prepuller: Prepuller | None = None
    admin_id: str | None = None
    _opened: bool = field(default=False, repr=False)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        db: Database | None = None,
        backend: RuntimeBackend | None = None,
        housekeeping: bool = True,
        clock: Callable[[], datetime] = utcnow,
    ) -> Services:
        """Everything but the registry process (``start_registry``: ``serve`` runs it)."""
        db = db or Database(settings.effective_database_url)
        check_current(db.engine)  # refuse to serve an old schema; the error names the fix
        backend = backend or load_backend(settings.runner_backend, settings)
        runner = RunnerService(settings, db, backend, clock=clock)
        return cls(settings, db, backend, runner, housekeeping=housekeeping)

    @property
    def pinned_by(self) -> PinnedBy:
        """What pins a version (the runtimes store's answer), for envs and the catalog."""
        return self.runner.records.pinned_to

    def start_registry(self) -> None:
        """The managed registry, when the settings ask for one (``start_registry``)."""
        self.registry = start_registry(self.settings)

    def open(self) -> None:
        """The first admin, the runner (reconcile, recover, housekeeping), the pre-puller."""
        self.admin_id = admin_id = write_admin_token(self.settings, self.db)
        self._opened = True
        self.runner.open(housekeeping=self.housekeeping)
        transfers = self.runner.transfers
        if self.settings.registry_prepull and transfers.enabled:
            # pulls what the named teams publish, as envctl's admin (registry/prepull.py)
            self.prepuller = Prepuller(
                self.db, self.settings.registry_prepull, lambda ref: transfers.pull_ref(admin_id, ref)
            )
            self.prepuller.start()

    def close(self) -> None:
        """Stop everything ``open`` and ``start_registry`` started, once. Runtimes keep running."""
        if self._closed:
            return
        self._closed = True
        if self.prepuller is not None:
            self.prepuller.stop()
        if self._opened:
            self.runner.close()
        if self.registry is not None:
            self.registry.stop()
        self.db.dispose()
