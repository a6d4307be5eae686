"""The API under test: a migrated database with two environments, the app with its runner.

Everything runs on the fake backend (the real agent as a local process, no Docker). The app's
lifespan runs inside a ``TestClient`` context, so the runner (reconciliation, housekeeping) is
live and the admin token has been written before a test makes its first request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import create_app
from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.kit.db import Database
from envs.service import NewVersion, register_version
from registry import users as registry_service
from runner.backends.base import RuntimeBackend
from runner.backends.fake import FakeBackend
from runner.models import Runtime
from runner.service import RunnerService

# The fake backend never looks at images; these only have to look like image ids.
BASH_IMAGE = "sha256:" + "a" * 64
PYTHON_IMAGE = "sha256:" + "b" * 64

FINAL_STATES = {"stopped", "running", "error"}


def prepare_database(settings: Settings) -> None:
    """Migrate, then register ``bash@1`` and ``python3@1`` (parent ``bash@1``)."""
    url = settings.effective_database_url
    upgrade(url)
    db = Database(url)
    try:
        with db.session() as s:
            bash, _ = register_version(
                s,
                NewVersion(
                    environment="bash",
                    image_id=BASH_IMAGE,
                    image_ref="envctl-base/bash:test",
                    message="base image bash",
                    author="tests",
                    size=100_000_000,
                    size_added=100_000_000,
                ),
            )
            register_version(
                s,
                NewVersion(
                    environment="python3",
                    image_id=PYTHON_IMAGE,
                    image_ref="envctl-base/python3:test",
                    parent=bash,
                    message="base image python3",
                    author="tests",
                    size=150_000_000,
                    size_added=50_000_000,
                ),
            )
    finally:
        db.dispose()


@dataclass
class ApiHarness:
    """One running app with a client and the admin's headers."""

    app: FastAPI
    client: TestClient
    settings: Settings
    headers: dict[str, str]

    @property
    def runner(self) -> RunnerService:
        runner: RunnerService = self.app.state.ctx.runner
        return runner

    @property
    def db(self) -> Database:
        db: Database = self.app.state.ctx.db
        return db

    # --- requests -----------------------------------------------------------------
    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=kw.pop("headers", self.headers), **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(path, headers=kw.pop("headers", self.headers), **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.client.patch(path, headers=kw.pop("headers", self.headers), **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete(path, headers=kw.pop("headers", self.headers), **kw)

    def create_runtime(self, name: str = "demo", **body: Any) -> dict[str, Any]:
        payload = {"environment": "python3", "name": name, **body}
        resp = self.post("/runtimes", json=payload)
        assert resp.status_code == 201, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def log(self, runtime_id: str) -> list[dict[str, Any]]:
        resp = self.get(f"/runtimes/{runtime_id}/log")
        assert resp.status_code == 200, resp.text
        entries: list[dict[str, Any]] = resp.json()
        return entries

    def state_log(self, runtime_id: str) -> list[str]:
        return [e["state"] for e in self.log(runtime_id) if e["state"] is not None]

    # --- the runner and the fake engine -------------------------------------------
    def wait_for(self, runtime_id: str, states: set[str], timeout: float = 15.0) -> Runtime:
        return self.runner.wait_for(runtime_id, states, timeout)

    def wait_settled(self, runtime_id: str, timeout: float = 15.0) -> Runtime:
        """Wait until the runtime is in a final state and no boot or stop holds it."""
        deadline = time.monotonic() + timeout
        while True:
            rt = self.wait_for(runtime_id, FINAL_STATES, max(0.1, deadline - time.monotonic()))
            lock = self.runner.concurrency.try_runtime_lock(runtime_id)
            if lock is not None:
                lock.release()
                again = self.wait_for(runtime_id, FINAL_STATES, 1)
                if again.state == rt.state:
                    return again
            if time.monotonic() > deadline:
                raise TimeoutError(f"runtime {runtime_id} did not settle (last seen {rt.state})")
            time.sleep(0.05)

    @property
    def engine(self) -> dict[str, Any]:
        """The fake engine's containers of this runner, by container id."""
        return FakeBackend.containers(self.runner.identity)

    def containers(self, runtime_id: str) -> list[Any]:
        return [c for c in list(self.engine.values()) if c.runtime_id == runtime_id]

    def runtime_rows(self) -> int:
        from sqlalchemy import func, select

        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Runtime)) or 0)


AppFactory = Callable[..., ApiHarness]


@pytest.fixture
def prepared_settings(settings: Settings) -> Settings:
    """The shared ``settings`` with a migrated database holding ``bash@1`` and ``python3@1``."""
    prepare_database(settings)
    return settings


@pytest.fixture
def make_api(prepared_settings: Settings) -> Iterator[AppFactory]:
    """Build and start apps on the prepared database; all are shut down at the end."""
    with ExitStack() as stack:

        def factory(backend: RuntimeBackend | None = None, **overrides: Any) -> ApiHarness:
            settings = prepared_settings.with_overrides(**overrides) if overrides else prepared_settings
            app = create_app(Services.build(settings, backend=backend))
            client = stack.enter_context(TestClient(app, raise_server_exceptions=False))
            token = settings.admin_token_file.read_text().strip()
            return ApiHarness(app, client, settings, {"Authorization": f"Bearer {token}"})

        yield factory


@pytest.fixture
def api(make_api: AppFactory) -> ApiHarness:
    """The app on the fake backend, started, with the admin's headers."""
    return make_api()


@pytest.fixture
def admin_headers(api: ApiHarness) -> dict[str, str]:
    return dict(api.headers)


@pytest.fixture
def other_headers(prepared_settings: Settings) -> dict[str, str]:
    """Headers of a second, ordinary user (for cross-user checks). Made in the database
    directly: a second app on the same runner name would be a second runner of that name."""
    db = Database(prepared_settings.effective_database_url)
    try:
        with db.session() as s:
            user = registry_service.create_user(s, "bob")
            token = registry_service.issue_token(s, user, "tests")
    finally:
        db.dispose()
    return {"Authorization": f"Bearer {token}"}
