"""Database kernel: the declarative ``Base``, engines and sessions.

SQLite (a file under the data directory) is the embedded default; PostgreSQL is reached
through ``ENVCTL_DATABASE_URL``. Every model module in every package derives from ``Base``;
the schema itself is owned by the Alembic migrations in ``api/migrations``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from envs.kit.clock import as_utc
from envs.kit.errors import DatabaseUnavailableError
from envs.kit.hot import EncodedJSON, HotConnections, HotStatement, HotWriter

__all__ = ["Base", "Database", "EncodedJSON", "HotStatement", "HotWriter", "UTCDateTime", "make_engine"]

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


class Database:
    """An engine plus a session factory; ``session()`` is the one way code gets a transaction.

    ``committed`` is notified once a transaction that wrote something has ended (``session``,
    ``connection`` and ``hot`` alike): whoever waits for a change (the event streams, a caller
    waiting for a runtime's state or an operation's end) waits on it, so no writer has to
    remember to announce its change. A transaction that only read wakes no one.
    """

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        self._hot = HotConnections(self.engine, _unavailable)
        self.committed = threading.Condition()
        self._wrote = threading.local()  # this thread's transaction wrote (set by the engine's event)
        event.listen(self.engine, "after_cursor_execute", self._note_write)

    def _note_write(self, _conn: Any, _cursor: Any, _stmt: Any, _params: Any, context: Any, _many: Any) -> None:
        if context is not None and (context.isinsert or context.isupdate or context.isdelete):
            self._wrote.flag = True

    def _wake_if_written(self) -> None:
        """After a transaction: wake the waiters if it wrote (a rolled-back one may wake them
        too: a spurious wake-up costs a read, a missed one a stale page)."""
        if getattr(self._wrote, "flag", False):
            self._wrote.flag = False
            self.wake()

    def wake(self) -> None:
        with self.committed:
            self.committed.notify_all()

    @property
    def local(self) -> bool:
        """Whether a write is a local file's (SQLite) rather than a round trip over a network:
        an event loop may make a local write itself, but not wait on a network."""
        return self.engine.dialect.name == "sqlite"

    @property
    def pipelined(self) -> bool:
        """Whether a hot transaction's statements and COMMIT travel together (PostgreSQL), so
        that a statement should decide in SQL, not in Python between round trips."""
        return self._hot.kind == "psycopg"

    @contextmanager
    def hot(self, *, durable: bool = True) -> Iterator[HotWriter]:
        """A transaction for ``HotStatement``s (the cell path), committed on success, rolled
        back on error, on a plain connection of this thread's (see ``envs/kit/hot.py``).

        ``durable=False`` is for records whose loss in a crash of the database server or its
        machine is harmless: on PostgreSQL its commit does not wait for the disk
        (``synchronous_commit`` off for this transaction alone; see ``envs/kit/hot.py`` for
        what that keeps and what it may lose). The caller says in a comment why the loss is
        harmless. SQLite as envctl runs it (WAL, ``synchronous=NORMAL``) commits that way
        always."""
        try:
            with self._hot.transaction(self.connection, durable=durable) as writer:
                yield writer
        finally:
            self._wrote.flag = True  # every hot statement writes
            self._wake_if_written()

    def hot_one(
        self, statement: HotStatement, values: dict[str, Any], *, durable: bool = True
    ) -> tuple[Any, ...] | None:
        """One hot statement as a transaction of its own (``hot``'s ``durable`` alike); the
        first row it returns, or None. On PostgreSQL one message and one round trip, outside
        any pipeline (``HotConnections.one``): the cell's way in, a single statement."""
        try:
            return self._hot.one(self.connection, statement, values, durable=durable)
        finally:
            self._wrote.flag = True
            self._wake_if_written()

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
        finally:
            self._wake_if_written()

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
        finally:
            self._wake_if_written()

    def ping(self) -> None:
        """One round trip to the database; ``DatabaseUnavailableError`` when it does not answer."""
        with self.connection() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self._hot.forget()  # from now on hot() takes the Core path
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
