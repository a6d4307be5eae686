from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.service import NewVersion, register_version
from registry.users import create_user
from runner.backends import netguard
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, RuntimeBackend
from runner.backends.fake import FakeBackend
from runner.identity import RunnerIdentity, installation_id
from runner.service import RunnerService
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import base_image
from tests.fixtures.swarm import manager, swarm, swarm_registry  # noqa: F401  (the swarm tests' fixtures)


@pytest.fixture
def sqlite_db(settings: Settings) -> Iterator[Database]:
    """The settings' own SQLite database, migrated (for apps built from ``settings``)."""
    upgrade(settings.effective_database_url)
    db = Database(settings.effective_database_url)
    yield db
    db.dispose()


@pytest.fixture
def runner_db(db: Database) -> Database:
    """A migrated database on SQLite and on PostgreSQL: the runner's rules hold on both."""
    return db


def seed(db: Database, image_id: str = "sha256:" + "b" * 64, image_ref: str = "python3") -> str:
    """A user and a python3@1 version; returns the user id."""
    with db.session() as s:
        bash, _ = register_version(s, NewVersion(environment="bash", image_id="sha256:" + "a" * 64, image_ref="bash"))
        register_version(
            s,
            NewVersion(environment="python3", image_id=image_id, image_ref=image_ref, parent=bash),
        )
        return create_user(s, "alice").id


@pytest.fixture
def make_runner(settings: Settings, runner_db: Database) -> Iterator[Callable[..., RunnerService]]:
    """Build runner services on one database, as a restarted envctl would be: built as a server
    builds them (``api/startup.py``), opened and closed here (the database is the fixture's)."""
    made: list[RunnerService] = []

    def make(
        backend: RuntimeBackend | None = None,
        *,
        housekeeping: bool = False,
        clock: Callable[[], datetime] = utcnow,
        **overrides: object,
    ) -> RunnerService:
        s = settings.with_overrides(**overrides) if overrides else settings
        svc = Services.build(s, db=runner_db, backend=backend or FakeBackend(), clock=clock).runner
        svc.open(housekeeping=housekeeping)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


class Clock:
    """The runner's clock in a test: the real time, or a moment the test sets (``at``)."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def __call__(self) -> datetime:
        return self.at or utcnow()


def identity_of(db: Database, settings: Settings) -> RunnerIdentity:
    """The identity a runner built from ``settings`` on ``db`` has."""
    return RunnerIdentity(installation_id(db), settings.runner_name)


def identity_labels(identity: RunnerIdentity) -> dict[str, str]:
    """The labels that make a container this identity's."""
    return {LABEL_INSTALLATION: identity.installation, LABEL_RUNNER: identity.name}


def crash(svc: RunnerService) -> None:
    """The runner's process "dies": nothing of it acts any more (no stop, no heartbeat), and
    its runtimes' containers keep running, as after a SIGKILL."""
    svc.concurrency.closing.set()
    svc.lease.abandon()


def start_server(docker: Any, data: Path, images: list[str] | None = None, **env: str) -> Server:
    """A real `envctl serve` on the Docker engine, its containers labelled for cleanup."""
    prepare_data_dir(data, images)
    runner = f"test-{TEST_SESSION}-{uuid.uuid4().hex[:6]}"
    srv = Server(
        data,
        env={
            "ENVCTL_RUNNER_NAME": runner,
            "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION}",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
            **env,
        },
    )
    srv.start()
    return srv


def remove_runner_containers(docker: Any, srv: Server) -> None:
    srv.stop()
    for c in docker.containers.list(all=True, filters={"label": f"{LABEL_RUNNER}={srv.env['ENVCTL_RUNNER_NAME']}"}):
        c.remove(force=True)
    remove_fence(docker, srv)


def remove_fence(docker: Any, srv: Server) -> None:
    """The server's installation's isolated network and firewall rules go, as its owner would
    remove them (another installation's, or one still in use, stay)."""
    db = Database(srv.env.get("ENVCTL_DATABASE_URL") or f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        netguard.teardown(docker, installation_id(db))
    finally:
        db.dispose()


@pytest.fixture
def server(docker: Any, tmp_path: Path) -> Iterator[Server]:
    base_image(docker, "python3")  # skip/fail early with a clear reason when not built
    srv = start_server(docker, tmp_path / "data")
    yield srv
    remove_runner_containers(docker, srv)


@pytest.fixture(scope="module")
def module_server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `envctl serve` for a whole module (starting one costs seconds; see ``shared_server``)."""
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path_factory.mktemp("server") / "data")
    yield srv
    remove_runner_containers(docker, srv)


@pytest.fixture
def shared_server(module_server: Server) -> Iterator[Server]:
    """The module's server for a test that neither kills it nor changes its settings: the
    runtimes the test made are deleted after it, so the next test finds the server as it was
    (the same runtime names free, no container of it left running)."""
    assert module_server.proc is not None and module_server.proc.poll() is None, module_server.output()[-2000:]
    with module_server.client() as client:
        before = {rt["id"] for rt in client.get("/runtimes").json()}
    yield module_server
    with module_server.client() as client:
        for rt in client.get("/runtimes").json():
            if rt["id"] not in before:
                r = client.delete(f"/runtimes/{rt['id']}")
                assert r.status_code in (204, 404), r.text
