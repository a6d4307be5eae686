"""Database kernel: the declarative ``Base``, engines and sessions.

SQLite (a file under the data directory) is the embedded default; PostgreSQL is reached
through ``ENVCTL_DATABASE_URL``. Every model module in every package derives from ``Base``;
the schema itself is owned by the Alembic migrations in ``api/migrations``.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import TypeDecorator

from envs.kit.clock import as_utc
from envs.kit.errors import DatabaseUnavailableError

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on every backend (SQLite forgets the zone; we put UTC back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a timezone-aware column")
        return as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return as_utc(value)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings envctl relies on for each backend."""
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_timeout", 5)
    if url.startswith("postgresql"):
        kwargs.setdefault("connect_args", {"connect_timeout": 3})
    return create_engine(url, **kwargs)


_Prepared = tuple[str, tuple[str, ...], dict[str, Callable[[Any], Any]], dict[str, Any]]


class HotStatement:
    """An INSERT or UPDATE on a hot path (each cell writes a few), compiled once per dialect.

    Executing a Core statement costs a few hundred microseconds of Python: checking out a
    pooled connection, looking the statement up in the compiled cache, setting up a result.
    ``Database.hot()`` runs these on a plain DB-API connection of its own instead, with the
    statement's SQL and SQLAlchemy's own bind processors (UTC timestamps, booleans, JSON), so
    what is stored is what Core would store. Every column written must be given a value:
    column defaults are not applied here (``prepare`` refuses a statement that would need one).
    """

    def __init__(self, statement: UpdateBase) -> None:
        self.statement = statement
        self._prepared: dict[tuple[str, frozenset[str]], _Prepared] = {}

    def prepare(self, dialect: Dialect, keys: frozenset[str]) -> _Prepared:
        """SQL, parameter order, bind processors and constants for these value keys."""
        prepared = self._prepared.get((dialect.name, keys))
        if prepared is not None:
            return prepared
        compiled = self.statement.compile(dialect=dialect, column_keys=sorted(keys))
        if not compiled.positional or compiled.positiontup is None:
            raise ValueError(f"hot statements need a positional dialect, not {dialect.name}")
        defaulted = [c.key for c in (*compiled.insert_prefetch, *compiled.update_prefetch) if c.key not in keys]
        if defaulted:
            raise ValueError(f"hot statement needs values for {', '.join(defaulted)} (defaults are not applied here)")
        processors: dict[str, Callable[[Any], Any]] = {}
        constants: dict[str, Any] = {}
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            # the dialect's own implementation of the type: a TypeDecorator's bind_processor
            # on its own applies only its process_bind_param, not the dialect's conversion
            # (SQLite's DATETIME text format), and would store what Core does not
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                processors[name] = proc
            if name in keys:
                continue
            if bind.callable is not None or (bind.value is None and bind.required):
                raise ValueError(f"hot statement needs a value for {name!r} (defaults are not applied here)")
            constants[name] = bind.value  # a literal of the statement, such as status == "queued"
        prepared = (compiled.string, tuple(compiled.positiontup), processors, constants)
        self._prepared[(dialect.name, keys)] = prepared
        return prepared

    def args(self, dialect: Dialect, values: dict[str, Any]) -> tuple[str, list[Any]]:
        sql, names, processors, constants = self.prepare(dialect, frozenset(values))
        out = []
        for name in names:
            value = values[name] if name in values else constants[name]
            proc = processors.get(name)
            out.append(proc(value) if proc is not None and value is not None else value)
        return sql, out


class HotWriter:
    """One transaction of hot statements (see ``Database.hot``)."""

    def __init__(self, db: Database, conn: sqlite3.Connection | None, core: Connection | None) -> None:
        self._db = db
        self._conn = conn
        self._core = core

    def execute(self, statement: HotStatement, values: dict[str, Any]) -> int:
        """Run it; returns the number of rows it touched."""
        if self._core is not None:
            return int(self._core.execute(statement.statement, values).rowcount)
        assert self._conn is not None
        sql, args = statement.args(self._db.engine.dialect, values)
        return self._conn.execute(sql, args).rowcount

    def execute_many(self, statement: HotStatement, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self._core is not None:
            self._core.execute(statement.statement, rows)
            return
        assert self._conn is not None
        dialect = self._db.engine.dialect
        prepared = [statement.args(dialect, r) for r in rows]
        self._conn.executemany(prepared[0][0], [a for _, a in prepared])


class _HotConnection(sqlite3.Connection):
    """A plain sqlite3 connection that can be weakly referenced (to close them all)."""


class Database:
    """An engine plus a session factory; ``session()`` is the one way code gets a transaction."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        # hot writes go to a file-backed SQLite directly; anything else takes the Core path
        self._hot_file = database if database and database != ":memory:" else None
        self._hot_local = threading.local()
        self._hot_all: weakref.WeakSet[_HotConnection] = weakref.WeakSet()
        self._hot_lock = threading.Lock()

    @contextmanager
    def hot(self) -> Iterator[HotWriter]:
        """A transaction for ``HotStatement``s, committed on success, rolled back on error.

        On a SQLite file each thread keeps a connection of its own for these (it closes when
        the thread ends); on other databases this is ``connection()``.
        """
        if self._hot_file is None:
            with self.connection() as core:
                yield HotWriter(self, None, core)
            return
        conn = self._hot_connection()
        try:
            yield HotWriter(self, conn, None)
            conn.commit()
        except sqlite3.OperationalError as exc:
            conn.rollback()
            raise _unavailable(exc) from exc
        except BaseException:
            conn.rollback()
            raise

    def _hot_connection(self) -> sqlite3.Connection:
        conn: _HotConnection | None = getattr(self._hot_local, "conn", None)
        if conn is None:
            assert self._hot_file is not None
            try:
                conn = sqlite3.connect(self._hot_file, timeout=30, check_same_thread=False, factory=_HotConnection)
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as exc:
                raise _unavailable(exc) from exc
            self._hot_local.conn = conn
            with self._hot_lock:
                self._hot_all.add(conn)
        return conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error.

        A database that cannot be reached becomes ``DatabaseUnavailableError`` (503) so that
        requests fail fast and say why.
        """
        try:
            with self._factory() as s, s.begin():
                yield s
        except (OperationalError, PoolTimeoutError) as exc:
            if _is_connection_problem(exc):
                raise _unavailable(exc) from exc
            raise

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A Core transaction, for hot paths where the ORM's bookkeeping costs too much."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, PoolTimeoutError) as exc:
            if _is_connection_problem(exc):
                raise _unavailable(exc) from exc
            raise

    def ping(self) -> None:
        """One round trip to the database; ``DatabaseUnavailableError`` when it does not answer."""
        with self.connection() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        # Hot connections are never closed from here: a worker thread may be using its own
        # right now, and closing a sqlite3 connection under another thread crashes the
        # process. Dropping the references is enough: each closes when the last user lets go.
        self._hot_file = None  # from now on hot() takes the Core path
        self._hot_local = threading.local()
        self.engine.dispose()


def _unavailable(exc: Exception) -> DatabaseUnavailableError:
    """A database that cannot be reached becomes a 503 that says so."""
    return DatabaseUnavailableError(
        "the database does not answer; try again shortly",
        details={"cause": str(getattr(exc, "orig", exc)).splitlines()[0][:300]},
    )


def _is_connection_problem(exc: Exception) -> bool:
    if isinstance(exc, PoolTimeoutError):
        return True
    if isinstance(exc, OperationalError):
        text = str(exc).lower()
        return (
            bool(exc.connection_invalidated)
            or "connect" in text
            or "closed" in text
            or "unable to open database" in text  # a SQLite file whose folder went away
        )
    return False
