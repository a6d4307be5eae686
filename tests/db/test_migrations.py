"""The schema: Alembic migrations, the models they must match, and the refusal of an old schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

import envs.models  # noqa: F401  (every table on Base.metadata)
import registry.models  # noqa: F401
import runner.apps.models  # noqa: F401
import runner.models  # noqa: F401
from api import dbschema
from api.app import create_app
from api.cli import main
from api.settings import Settings
from api.startup import Services
from envs.kit.db import Base, make_engine
from envs.kit.errors import SchemaOutOfDateError

TABLES = {
    "environments",
    "environment_versions",
    "environment_tags",
    "users",
    "api_tokens",
    "runtimes",
    "runtime_log",
    "executions",
    "execution_outputs",
    "result_files",
    "operations",
    "installation",
    "runners",
    "teams",
    "team_members",
    "publications",
    "team_events",
    "team_secrets",
    "runtime_secret_uses",
    "pool_entries",
    "apps",
    "app_deployments",
    "app_instances",
}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names()) - {"alembic_version"}


def set_revision(engine: Engine, revision: str) -> None:
    """Write ``alembic_version`` by hand, as a database from another envctl would have it."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:r)"), {"r": revision})


def test_every_model_table_is_on_the_metadata() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_upgrade_head_creates_every_table_and_records_head(db_url: str, engine: Engine) -> None:
    assert dbschema.current_revision(engine) is None
    dbschema.upgrade(db_url)
    assert dbschema.current_revision(engine) == dbschema.head_revision()
    assert tables(engine) == TABLES


def test_upgrade_head_twice_changes_nothing(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url)
    dbschema.upgrade(db_url)
    assert dbschema.current_revision(engine) == dbschema.head_revision()
    assert tables(engine) == TABLES


def test_downgrade_to_base_and_upgrade_again_round_trips(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url)
    dbschema.downgrade(db_url, "base")
    assert tables(engine) == set()
    assert dbschema.current_revision(engine) is None
    dbschema.upgrade(db_url)
    assert tables(engine) == TABLES
    assert dbschema.current_revision(engine) == dbschema.head_revision()


def test_models_match_the_migrations(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_upgrade_creates_the_directory_of_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'envctl.db'}"
    dbschema.upgrade(url)
    assert (tmp_path / "new" / "dir" / "envctl.db").exists()


def test_check_current_refuses_an_empty_database_naming_the_upgrade_command(
    engine: Engine,
) -> None:
    with pytest.raises(SchemaOutOfDateError) as caught:
        dbschema.check_current(engine)
    assert "envctl db upgrade" in caught.value.message
    assert caught.value.status == 503
    assert caught.value.details["current"] is None
    assert caught.value.details["head"] == dbschema.head_revision()


def test_check_current_refuses_a_database_downgraded_to_base(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url)
    dbschema.downgrade(db_url, "base")
    with pytest.raises(SchemaOutOfDateError, match="envctl db upgrade"):
        dbschema.check_current(engine)


def test_check_current_refuses_a_database_at_an_unknown_revision(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url)
    set_revision(engine, "ffffffffffff")
    with pytest.raises(SchemaOutOfDateError) as caught:
        dbschema.check_current(engine)
    assert "ffffffffffff" in caught.value.message
    assert "upgrade envctl" in caught.value.message
    assert caught.value.details["current"] == "ffffffffffff"


def test_check_current_passes_on_a_current_database(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url)
    dbschema.check_current(engine)


def test_check_current_passes_on_a_database_stamped_at_head(db_url: str, engine: Engine) -> None:
    command.stamp(dbschema.alembic_config(db_url), "head")
    dbschema.check_current(engine)


def test_serve_refuses_a_database_without_the_schema(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, runner_backend="fake", runner_name="test-serve")
    with pytest.raises(SchemaOutOfDateError, match="envctl db upgrade"):
        create_app(Services.build(settings, housekeeping=False))


def test_serve_refuses_an_empty_database_on_each_backend(db_url: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        runner_backend="fake",
        runner_name="test-serve",
    )
    with pytest.raises(SchemaOutOfDateError, match="envctl db upgrade"):
        create_app(Services.build(settings, housekeeping=False))


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ENVCTL_DATA_DIR at a fresh directory; nothing else from the caller's environment."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for var in ("ENVCTL_CONFIG", "ENVCTL_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(data_dir))
    return data_dir


def test_cli_db_current_fails_before_upgrade_and_passes_after(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "current"]) == 1
    assert "envctl db upgrade" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "current"]) == 0


def test_cli_db_upgrade_migrates_the_database_in_the_data_dir(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade"]) == 0
    assert dbschema.head_revision() in capsys.readouterr().out
    engine = make_engine(f"sqlite:///{cli_env / 'envctl.db'}")
    try:
        assert dbschema.current_revision(engine) == dbschema.head_revision()
        assert tables(engine) == TABLES
    finally:
        engine.dispose()


def test_cli_db_upgrade_uses_envctl_database_url(
    cli_env: Path, db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENVCTL_DATABASE_URL", db_url)
    assert main(["db", "current"]) == 1
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "current"]) == 0
    assert dbschema.current_revision(engine) == dbschema.head_revision()


def test_cli_db_current_with_a_data_dir_that_does_not_exist_yet_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("ENVCTL_CONFIG", "ENVCTL_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(tmp_path / "not-yet"))
    assert main(["db", "current"]) == 1


def test_serve_refuses_a_data_dir_that_does_not_exist_yet_naming_the_upgrade_command(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "not-yet", runner_backend="fake", runner_name="test-serve")
    with pytest.raises(SchemaOutOfDateError, match="envctl db upgrade"):
        create_app(Services.build(settings, housekeeping=False))


def test_0006_rewrites_hot_path_timestamps_in_cores_format_on_sqlite(tmp_path: Path) -> None:
    """Rows written before the hot path's fix read back fine but never compared equal in
    SQLite; after the upgrade they do, and their times are unchanged."""
    from datetime import UTC, datetime

    from sqlalchemy import select, update

    from envs.kit.db import Database
    from runner.models import Runtime

    url = f"sqlite:///{tmp_path / 'old.db'}"
    at = {"at": "2026-11-21 18:00:00"}
    dbschema.upgrade(url, "0005")
    db = Database(url)
    try:
        with db.connection() as c:  # in SQL: the models are newer than this schema
            c.execute(text("INSERT INTO users (id, name, is_admin, created_at) VALUES ('u_old', 'old', 0, :at)"), at)
            c.execute(
                text(
                    "INSERT INTO environments (id, namespace, name, description, created_at) "
                    "VALUES (1, '', 'bash', '', :at)"
                ),
                at,
            )
            c.execute(
                text(
                    "INSERT INTO environment_versions (id, environment_id, number, digest, image_id, image_ref, "
                    "message, author, size, size_added, labels, created_at) "
                    "VALUES (1, 1, 1, :digest, :digest, 'b', '', 'old', 0, 0, '{}', :at)"
                ),
                {"digest": "sha256:" + "a" * 64, **at},
            )
            for rid in ("rt_a", "rt_b"):
                c.execute(
                    text(
                        "INSERT INTO runtimes (id, owner_id, name, type, language, environment_ref, version_id, "
                        "machine_type, state, state_reason, state_message, runner, backend, backend_state, "
                        "last_activity, draft_changes, change_baseline, created_at, updated_at) VALUES (:id, "
                        "'u_old', :id, 'native', 'python', 'bash@1', 1, 'small', 'stopped', 'created', '', 'r', "
                        "'docker', '{}', '', '[]', '{}', '2026-11-21 18:00:00', '2026-11-21 18:00:00')"
                    ),
                    {"id": rid},
                )
        with db.connection() as c:  # as the old hot path wrote them
            c.execute(
                text("UPDATE runtimes SET last_activity_at = '2026-11-21 18:06:44.759938+00:00' WHERE id = 'rt_a'")
            )
            c.execute(text("UPDATE runtimes SET last_activity_at = '2026-11-21 18:06:45+00:00' WHERE id = 'rt_b'"))
        dbschema.upgrade(url)
        with db.connection() as c:
            raw = dict(c.execute(text("SELECT id, last_activity_at FROM runtimes")).all())
            assert raw == {"rt_a": "2026-11-21 18:06:44.759938", "rt_b": "2026-11-21 18:06:45.000000"}
            at = datetime(2026, 11, 21, 18, 6, 44, 759938, tzinfo=UTC)
            assert c.execute(update(Runtime).where(Runtime.last_activity_at == at).values(name="x")).rowcount == 1
        with db.session() as s:
            assert s.scalar(select(Runtime.last_activity_at).where(Runtime.id == "rt_b")) == datetime(
                2026, 11, 21, 18, 6, 45, tzinfo=UTC
            )
    finally:
        db.dispose()
