"""Shared fixtures. Services are real; see tests/fixtures/services.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import APIError

from api.dbschema import upgrade
from api.settings import Settings
from envs.kit.db import Database
from runner.backends import netguard
from tests.fixtures.services import PostgresCluster, docker_client, start_postgres

TEST_SESSION = uuid.uuid4().hex[:12]
TEST_LABEL = "envctl.test-session"


@pytest.fixture(scope="session")
def test_session_id() -> str:
    return TEST_SESSION


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    yield from start_postgres()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'envctl.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database("t_" + uuid.uuid4().hex[:16])


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated database (upgrade head) on SQLite and PostgreSQL."""
    upgrade(db_url)
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: own data dir and runner name, fake backend, fast housekeeping."""
    return Settings(
        data_dir=tmp_path / "data",
        runner_name=f"test-{TEST_SESSION}-{uuid.uuid4().hex[:8]}",
        runner_backend="fake",
        runner_idle_check_interval=0.2,
        runner_boot_timeout=20,
        runner_labels={TEST_LABEL: TEST_SESSION},
    )


@pytest.fixture(scope="session")
def docker() -> Iterator[Any]:
    """A Docker SDK client; removes every container the test session labelled at the end."""
    client = docker_client()
    yield client
    for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={TEST_SESSION}"}):
        c.remove(force=True)
    # isolated networks of the session's installations, and their firewall rules: each one
    # tried even when another fails, and what stays is said (the suite leaves no network)
    kept: list[str] = []
    for held in netguard.envctl_networks(client, {TEST_LABEL: TEST_SESSION}):
        try:
            if not netguard.teardown(client, held.installation):
                kept.append(f"{held.network} (a container is attached)")
        except Exception as exc:  # reported below; the others still go
            kept.append(f"{held.network} ({exc})")
    # images saved by the session's runtimes (versions, drafts), children before parents
    # (the engine runs one prune at a time: another client's prune is waited for, a few seconds)
    for attempt in range(20):
        try:
            client.images.prune(filters={"label": f"{TEST_LABEL}={TEST_SESSION}", "dangling": False})
            break
        except APIError as exc:
            if exc.status_code != 409 or attempt == 19:
                raise
            time.sleep(0.5)
    client.close()
    assert not kept, f"the test session's networks could not all be removed: {kept}"


@pytest.fixture(autouse=True)
def _reset_fake_engine() -> Iterator[None]:
    yield
    from runner.backends.fake import FakeBackend

    FakeBackend.reset_all()


# The real single-node Kubernetes (issue 18), for any test that asks for it: imported last, as
# its module reads TEST_SESSION from this one.
from tests.fixtures.kube import kube, kube_namespace  # noqa: E402, F401
