"""Alembic environment: the URL comes from the caller (``envctl db upgrade``), never a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

import envs.models  # noqa: F401  (registers tables on Base.metadata)
import registry.models  # noqa: F401
import runner.apps.models  # noqa: F401
import runner.models  # noqa: F401
from envs.kit.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = str(config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url"))
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # Batch mode rebuilds a table by copying it and dropping the original, which
                # SQLite refuses while other tables' rows refer to it. Foreign keys can only be
                # switched off outside a transaction: now, before the first statement. The
                # engine is disposed of below, so no connection keeps this setting.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite needs batch mode to alter tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows that refer to missing ones: {broken[:5]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
