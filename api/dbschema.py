"""Schema management: Alembic migrations shipped inside the ``api`` package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from envs.kit.db import make_engine
from envs.kit.errors import DatabaseUnavailableError, SchemaOutOfDateError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["database_url"] = url
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database; None for an empty or not yet created one."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and not Path(database).exists():
        return None  # connecting would create the file, or fail when its directory is missing
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot read the schema of {engine.url.render_as_string(hide_password=True)}: "
            f"{str(exc.orig).splitlines()[0] if exc.orig else exc}"
        ) from exc


def upgrade(url: str, revision: str = "head") -> None:
    _prepare(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def _prepare(url: str) -> None:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def check_current(engine: Engine) -> None:
    """Refuse to run on a schema that is behind (or ahead of) this code."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise SchemaOutOfDateError(
            f"the database at {where} has no envctl schema yet; run `envctl db upgrade` to create it",
            details={"current": None, "head": head, "fix": "envctl db upgrade"},
        )
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise SchemaOutOfDateError(
            f"the database at {where} is at revision {current}, newer than this envctl knows "
            f"(head {head}); upgrade envctl",
            details={"current": current, "head": head},
        )
    raise SchemaOutOfDateError(
        f"the database at {where} is at revision {current}, behind this envctl ({head}); run `envctl db upgrade`",
        details={"current": current, "head": head, "fix": "envctl db upgrade"},
    )


def engine_for(url: str) -> Engine:
    return make_engine(url)
