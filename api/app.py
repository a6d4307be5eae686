"""The FastAPI application: ``create_app(services)`` puts the routes on what ``api/startup.py`` built."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from api import errors
from api.appproxy import AppGateway
from api.deps import CallerCache, Context
from api.fastpath import CellFastPath
from api.routes import (
    app_serving,
    apps,
    catalog,
    environments,
    executions,
    health,
    kernelspecs,
    machine_types,
    nodes,
    operations,
    packages,
    pool,
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
from api.startup import Services
from api.web import router as page_router

log = logging.getLogger("envctl.api")


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


def create_app(services: Services) -> FastAPI:
    """The app on ``services`` (``api/startup.py``), which open and close with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.open()
        try:
            yield
        finally:
            services.close()

    app = FastAPI(
        title="envctl",
        version="0.1.0",
        description="Container environments for notebooks: runtimes, executions, versioned environments.",
        lifespan=lifespan,
        telemetry=_telemetry(services.settings.api_telemetry),
    )
    app.state.services = services
    app.state.ctx = Context(
        settings=services.settings,
        db=services.db,
        runner=services.runner,
        pinned_by=services.pinned_by,
        managed_registry=lambda: services.registry,
    )
    app.state.callers = CallerCache()
    errors.install(app)
    app.include_router(kernelspecs.router, responses=ERROR_RESPONSES)  # before environments' /{ref:path}
    app.include_router(packages.router, responses=ERROR_RESPONSES)  # likewise
    app.include_router(catalog.router, responses=ERROR_RESPONSES)  # likewise (…/publish)
    app.include_router(transfers.router, responses=ERROR_RESPONSES)  # likewise
    app.include_router(streams.router)  # before /runtimes/{runtime_id}: /runtimes/events is a stream
    app.include_router(app_serving.router)  # /apps/_signin (the apps themselves: AppGateway)
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
        pool,
        apps,
    ):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.add_middleware(CellFastPath, state=app.state)
    app.add_middleware(AppGateway, state=app.state)  # /apps/TEAM/NAME/...: the apps themselves
    return app
