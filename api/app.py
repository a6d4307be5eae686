"""The FastAPI application: ``create_app(settings)`` wires settings, database and runner."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from api import errors
from api.dbschema import check_current
from api.deps import CallerCache, Context
from api.fastpath import CellFastPath
from api.routes import (
    catalog,
    environments,
    executions,
    health,
    kernelspecs,
    machine_types,
    nodes,
    operations,
    packages,
    registry_auth,
    results,
    runners,
    runtimes,
    secrets,
    streams,
    teams,
    tokens,
    transfers,
    volumes,
)
from api.schemas import ErrorOut
from api.web import router as page_router
from envs.kit.config import Settings
from envs.kit.db import Database
from registry import service as registry_service
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


# Every error answer has the one envelope (api/errors.py); the schema says so.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (401, "no or unknown bearer token"),
        (403, "not allowed to this user, e.g. a change to another user's environment"),
        (404, "no such resource (or not yours)"),
        (409, "the resource's state does not allow it"),
        (422, "bad input; details.field names it"),
        (429, "too many at once; see Retry-After"),
        (503, "the database or the container engine does not answer"),
    )
}


def _telemetry(on: bool) -> TelemetryConfig:
    if on:
        return {"auto_configure": True}
    return {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def create_app(
    settings: Settings,
    *,
    backend: RuntimeBackend | None = None,
    housekeeping: bool = True,
) -> FastAPI:
    """Build the app. The runner starts (reconciles, housekeeps) with the app's lifespan."""
    db = Database(settings.effective_database_url)
    check_current(db.engine)  # refuse to serve an old schema; the error names the fix
    runner = RunnerService(settings, db, backend or load_backend(settings.runner_backend, settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        admin_id = write_admin_token(settings, db)
        runner.open(housekeeping=housekeeping)
        prepuller = None
        if settings.registry_prepull and runner.transfers.enabled:
            # pulls what the named teams publish, as envctl's admin (registry/prepull.py)
            prepuller = Prepuller(db, settings.registry_prepull, lambda ref: runner.transfers.pull_ref(admin_id, ref))
            prepuller.start()
        try:
            yield
        finally:
            if prepuller is not None:
                prepuller.stop()
            runner.close()
            db.dispose()

    app = FastAPI(
        title="envctl",
        version="0.1.0",
        description="Container environments for notebooks: runtimes, executions, versioned environments.",
        lifespan=lifespan,
        telemetry=_telemetry(settings.api_telemetry),
    )
    app.state.ctx = Context(settings=settings, db=db, runner=runner)
    app.state.callers = CallerCache()
    errors.install(app)
    app.include_router(kernelspecs.router, responses=ERROR_RESPONSES)  # before environments' /{ref:path}
    app.include_router(packages.router, responses=ERROR_RESPONSES)  # likewise
    app.include_router(catalog.router, responses=ERROR_RESPONSES)  # likewise (…/publish)
    app.include_router(transfers.router, responses=ERROR_RESPONSES)  # likewise
    app.include_router(streams.router)  # before /runtimes/{runtime_id}: /runtimes/events is a stream
    app.include_router(page_router())  # the web page at / (api/web), with its content security policy
    for module in (
        health,
        runtimes,
        executions,
        results,
        operations,
        environments,
        machine_types,
        runners,
        nodes,
        teams,
        secrets,
        tokens,
        registry_auth,
        volumes,
    ):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.add_middleware(CellFastPath, state=app.state)
    return app
