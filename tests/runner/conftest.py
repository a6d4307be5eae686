from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from api.dbschema import upgrade
from envs.kit.config import Settings
from envs.kit.db import Database
from envs.service import NewVersion, register_version
from registry.service import create_user
from runner.backends.base import RuntimeBackend
from runner.backends.fake import FakeBackend
from runner.service import RunnerService


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
        bash, _ = register_version(
            s, NewVersion(environment="bash", image_id="sha256:" + "a" * 64, image_ref="bash")
        )
        register_version(
            s,
            NewVersion(environment="python3", image_id=image_id, image_ref=image_ref, parent=bash),
        )
        return create_user(s, "alice").id


@pytest.fixture
def make_runner(settings: Settings, runner_db: Database) -> Iterator[Callable[..., RunnerService]]:
    """Build runner services on one database, as a restarted envctl would be."""
    made: list[RunnerService] = []

    def make(
        backend: RuntimeBackend | None = None, *, housekeeping: bool = False, **overrides: object
    ) -> RunnerService:
        s = settings.with_overrides(**overrides) if overrides else settings
        svc = RunnerService(s, runner_db, backend or FakeBackend(s.runner_name))
        svc.open(housekeeping=housekeeping)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc._closing.set()
        svc._executor.shutdown(wait=True, cancel_futures=True)
