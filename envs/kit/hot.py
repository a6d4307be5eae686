"""Hot writes: the few statements each cell makes, on a plain DB-API connection per thread.

Executing a Core statement costs a few hundred microseconds of Python (a pooled connection
checked out and pinged, the compiled cache, a result object), and on PostgreSQL each statement
and the transaction's BEGIN and COMMIT are network round trips of their own. A cell makes two
transactions (its row on the way in; its outputs and end on the way out), so the cell path
runs them here instead:

- ``HotStatement``: an INSERT or UPDATE compiled once per dialect, executed with SQLAlchemy's
  own bind processors (UTC timestamps, booleans, JSON), so what is stored is what Core stores;
- on a SQLite file, a ``sqlite3`` connection per thread;
- on PostgreSQL, a ``psycopg`` connection per thread in pipeline mode: the statements of a
  transaction, its BEGIN and its COMMIT travel together, and only a result someone reads
  (``count``, ``fetch``) waits for the server. A connection idle for a while is pinged before
  use, so the first cell after a database restart reconnects instead of failing;
- anything else goes through Core.

A transaction of one statement (``one``; a cell's way in, whose number, check and row are one
statement of data-modifying CTEs) goes outside any pipeline on PostgreSQL: the statement alone
in autocommit mode, one message and one round trip. Measured beside the same work as a
pipelined BEGIN, SET LOCAL, two statements and COMMIT, on this machine under load (~10): 0.6-1.1
ms against 2.1-2.6 ms, less than half the Python and a third less of the server's CPU.

A transaction may be marked not durable (``transaction(durable=False)``): on PostgreSQL it
runs with ``SET LOCAL synchronous_commit TO OFF``, its first statement, in the same round trip.
Its COMMIT then answers without waiting for the write-ahead log to reach the disk (on the
machine here a flush of the disk costs a few milliseconds under load, most of a PostgreSQL
cell's extra time). What that keeps, as PostgreSQL documents for asynchronous commit:

- others see the transaction at once, as any commit's; locks are released at once;
- the database stays consistent after any crash: the log is replayed in order, and a later
  synchronous commit (of any session) flushes everything logged before it, so a record
  written after it and durably committed never lacks it;
- a crash of envctl loses nothing (the server has the commit; its WAL writer flushes within
  about three ``wal_writer_delay``s, 0.6 s by default). Only a crash of the PostgreSQL server
  or its machine may lose such commits of that last moment, whole, never in part.

That is the guarantee SQLite gives every commit as envctl runs it (WAL with
``synchronous=NORMAL``: a power loss may roll back the last transactions, never corrupt), so on
SQLite the flag changes nothing. Everything else stays durable.

A connection the database dropped is thrown away and the call fails with
``DatabaseUnavailableError`` (503); the next one connects again.
"""

from __future__ import annotations

import abc
import contextlib
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Select
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.dml import UpdateBase

if TYPE_CHECKING:
    import psycopg


class EncodedJSON(str):
    """A JSON column's value already encoded as JSON text, stored as it is: a cell's output is
    encoded once, for its server-sent event and its row alike (``runner/cells/workers.py``);
    the column's own encoder would encode it again, the largest cost of a fast printer's
    stream after reading it. Given to a hot statement's JSON column only."""

    __slots__ = ()


_Prepared = tuple[str, tuple[str, ...], dict[str, Callable[[Any], Any]], dict[str, Any]]
PING_AFTER_IDLE = 2.0  # seconds a PostgreSQL hot connection may sit unused before it is pinged


class HotStatement:
    """An INSERT or UPDATE on a hot path, compiled once per dialect. Every column written must
    be given a value: column defaults are not applied here (``prepare`` refuses a statement
    that would need one)."""

    def __init__(self, statement: UpdateBase | Select[Any]) -> None:
        self.statement = statement
        self._prepared: dict[tuple[str, str, frozenset[str]], _Prepared] = {}

    def prepare(self, dialect: Dialect, keys: frozenset[str]) -> _Prepared:
        """SQL, parameter order, bind processors and constants for these value keys."""
        cache_key = (dialect.name, dialect.paramstyle, keys)
        prepared = self._prepared.get(cache_key)
        if prepared is not None:
            return prepared
        compiled = self.statement.compile(dialect=dialect, column_keys=sorted(keys))
        if not compiled.positional or compiled.positiontup is None:
            raise ValueError(f"hot statements need a positional dialect, not {dialect.name} ({dialect.paramstyle})")
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
        self._prepared[cache_key] = prepared
        return prepared

    def args(self, dialect: Dialect, values: dict[str, Any]) -> tuple[str, list[Any]]:
        sql, names, processors, constants = self.prepare(dialect, frozenset(values))
        out = []
        for name in names:
            value = values[name] if name in values else constants[name]
            proc = processors.get(name)
            if proc is not None and value is not None and not isinstance(value, EncodedJSON):
                value = proc(value)
            out.append(value)
        return sql, out


class HotWriter(abc.ABC):
    """One transaction of hot statements (see ``Database.hot``)."""

    @abc.abstractmethod
    def execute(self, statement: HotStatement, values: dict[str, Any]) -> None:
        """Run it; nobody waits for its result (on PostgreSQL it travels with the commit)."""

    @abc.abstractmethod
    def count(self, statement: HotStatement, values: dict[str, Any]) -> int:
        """Run it now; the number of rows it touched."""

    @abc.abstractmethod
    def fetch(self, statement: HotStatement, values: dict[str, Any]) -> tuple[Any, ...] | None:
        """Run a statement with RETURNING now; the first row it returned, or None."""

    @abc.abstractmethod
    def execute_many(self, statement: HotStatement, rows: list[dict[str, Any]]) -> None:
        """``execute`` for each of ``rows``."""

    def execute_after(self, statement: HotStatement, values: dict[str, Any]) -> None:
        """Run it for what a database crash may lose (a runtime's activity time): on PostgreSQL
        in a short transaction of its own right after this one, committed without waiting for
        the disk, so the rows it locks are not held while this one's commit is flushed (the
        next cell's number waits on the runtime's row); elsewhere in this transaction."""
        self.execute(statement, values)


def _decoded(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``EncodedJSON`` decoded: Core applies the column's encoder itself."""
    if not any(isinstance(v, EncodedJSON) for v in values.values()):
        return values
    return {k: json.loads(v) if isinstance(v, EncodedJSON) else v for k, v in values.items()}


class CoreWriter(HotWriter):
    def __init__(self, core: Connection) -> None:
        self._core = core

    def execute(self, statement: HotStatement, values: dict[str, Any]) -> None:
        self._core.execute(statement.statement, _decoded(values))

    def count(self, statement: HotStatement, values: dict[str, Any]) -> int:
        return int(self._core.execute(statement.statement, _decoded(values)).rowcount)

    def fetch(self, statement: HotStatement, values: dict[str, Any]) -> tuple[Any, ...] | None:
        row = self._core.execute(statement.statement, _decoded(values)).first()
        return tuple(row) if row is not None else None

    def execute_many(self, statement: HotStatement, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._core.execute(statement.statement, [_decoded(r) for r in rows])


class _DbApiWriter(HotWriter):
    """A DB-API cursor with ``%s``/``?`` parameters and the dialect's bind processors."""

    def __init__(self, cursor: Any, dialect: Dialect, sync: Callable[[], None] | None = None) -> None:
        self._cursor = cursor
        self._dialect = dialect
        self._sync = sync  # a pipeline's: results (a row count) come back only once it syncs
        self.after: list[tuple[HotStatement, dict[str, Any]]] = []  # a pipeline's execute_after

    def execute(self, statement: HotStatement, values: dict[str, Any]) -> None:
        self._cursor.execute(*statement.args(self._dialect, values))

    def count(self, statement: HotStatement, values: dict[str, Any]) -> int:
        self._cursor.execute(*statement.args(self._dialect, values))
        if self._sync is not None:
            self._sync()
        return int(self._cursor.rowcount)

    def fetch(self, statement: HotStatement, values: dict[str, Any]) -> tuple[Any, ...] | None:
        self._cursor.execute(*statement.args(self._dialect, values))
        rows = self._cursor.fetchall()  # to the end: the statement must finish
        return tuple(rows[0]) if rows else None

    def execute_many(self, statement: HotStatement, rows: list[dict[str, Any]]) -> None:
        if rows:
            prepared = [statement.args(self._dialect, r) for r in rows]
            self._cursor.executemany(prepared[0][0], [a for _, a in prepared])

    def execute_after(self, statement: HotStatement, values: dict[str, Any]) -> None:
        if self._sync is None:
            self.execute(statement, values)
        else:
            self.after.append((statement, values))

    def relax(self) -> None:
        """This PostgreSQL transaction's commit does not wait for the disk (see the module's
        docstring); it must come first in the transaction."""
        self._cursor.execute("SET LOCAL synchronous_commit TO OFF")

    def queue_after(self) -> None:
        """A pipeline's ``execute_after`` statements, queued as a transaction of their own
        behind this one's COMMIT: the server runs them once that commit is done (flushed), in
        the same round trip, and skips them when anything before failed."""
        if self.after:
            self._cursor.execute("BEGIN", prepare=False)
            self.relax()
            for statement, values in self.after:
                self.execute(statement, values)
            self._cursor.execute("COMMIT", prepare=False)
            self.after = []


class _HotSqlite(sqlite3.Connection):
    """A plain sqlite3 connection that can be weakly referenced."""


class HotConnections:
    """The hot path's connections, one per thread, for one database."""

    def __init__(self, engine: Engine, unavailable: Callable[[Exception], Exception]) -> None:
        self.engine = engine
        self.unavailable = unavailable
        self.kind = _kind(engine)
        self._local = threading.local()
        self._all: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._dialect: Dialect = engine.dialect
        if self.kind == "psycopg":
            from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

            # the same dialect, with positional parameters (psycopg takes %s as well)
            self._dialect = PGDialect_psycopg(paramstyle="format")  # type: ignore[no-untyped-call]

    @contextmanager
    def transaction(self, core: Callable[[], Any], *, durable: bool = True) -> Iterator[HotWriter]:
        """A transaction on this thread's connection; ``core`` gives a Core one otherwise.
        ``durable=False``: see the module's docstring (PostgreSQL through psycopg only; the
        Core path, for other drivers, keeps the server's setting)."""
        if self.kind == "sqlite":
            yield from self._sqlite()
        elif self.kind == "psycopg":
            yield from self._psycopg(durable)
        else:
            with core() as conn:
                yield CoreWriter(conn)

    def one(
        self, core: Callable[[], Any], statement: HotStatement, values: dict[str, Any], *, durable: bool = True
    ) -> tuple[Any, ...] | None:
        """One statement as a transaction of its own; the first row it returns, or None.

        On PostgreSQL it is sent alone on the connection in autocommit mode (one statement is
        one transaction there, data-modifying CTEs included): no BEGIN, COMMIT or pipeline,
        whose messages and Python cost a cell's way in more than twice the statement itself
        (``tests/bench/bench_cells.py``). ``durable=False`` then needs the session's setting,
        not ``SET LOCAL``: the connection keeps ``synchronous_commit`` off from its first such
        statement on (one round trip, once), and every durable transaction on it sets it on
        again for itself (``SET LOCAL``, in its pipeline: no round trip). Elsewhere: ``fetch``
        in a hot transaction."""
        if self.kind != "psycopg":
            with self.transaction(core, durable=durable) as writer:
                return writer.fetch(statement, values)
        import psycopg

        conn = self._pg_connection()
        try:
            relaxed = getattr(self._local, "relaxed", None) is conn
            if relaxed == durable:
                conn.execute("SET synchronous_commit TO " + ("ON" if durable else "OFF"))
                self._local.relaxed = None if durable else conn
            sql, args = statement.args(self._dialect, values)
            row = conn.execute(sql, args, prepare=True).fetchone()
        except psycopg.OperationalError as exc:
            self._drop_pg(conn)
            raise self.unavailable(exc) from exc
        except BaseException:
            if conn.broken:
                self._drop_pg(conn)
            raise
        self._local.used_at = time.monotonic()
        return tuple(row) if row is not None else None

    def forget(self) -> None:
        """Stop handing out the connections made so far. They are never closed from here: a
        worker thread may be using its own right now (closing a sqlite3 connection under
        another thread crashes the process); each closes when its thread lets go."""
        self.kind = "core"
        self._local = threading.local()

    # ------------------------------------------------------------------ SQLite
    def _sqlite(self) -> Iterator[HotWriter]:
        conn: _HotSqlite | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    str(self.engine.url.database), timeout=30, check_same_thread=False, factory=_HotSqlite
                )
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as exc:
                raise self.unavailable(exc) from exc
            self._local.conn = conn
            with self._lock:
                self._all.add(conn)
        try:
            yield _DbApiWriter(conn.cursor(), self._dialect)
            conn.commit()
        except sqlite3.OperationalError as exc:
            conn.rollback()
            raise self.unavailable(exc) from exc
        except BaseException:
            conn.rollback()
            raise

    # ------------------------------------------------------------------ PostgreSQL (psycopg)
    def _psycopg(self, durable: bool) -> Iterator[HotWriter]:
        import psycopg

        conn = self._pg_connection()
        try:
            # BEGIN and COMMIT are statements of the pipeline (the connection is in autocommit
            # mode): psycopg's own transaction handling would sync the pipeline after its
            # BEGIN and at its commit, and its pipeline's exit syncs once more, three round
            # trips for what is one. Here the only one is the exit's (and a ``count``'s).
            with conn.pipeline() as pipeline:
                cursor = conn.cursor()
                cursor.execute("BEGIN", prepare=False)
                writer = _DbApiWriter(cursor, self._dialect, pipeline.sync)
                relaxed = getattr(self._local, "relaxed", None) is conn  # see ``one``
                if durable and relaxed:
                    cursor.execute("SET LOCAL synchronous_commit TO ON")
                elif not durable and not relaxed:  # travels with the transaction's statements: no round trip
                    writer.relax()
                yield writer
                cursor.execute("COMMIT", prepare=False)
                writer.queue_after()
        except psycopg.OperationalError as exc:
            self._drop_pg(conn)
            raise self.unavailable(exc) from exc
        except BaseException:
            if conn.broken:
                self._drop_pg(conn)
            else:
                try:
                    conn.rollback()
                except psycopg.Error:
                    self._drop_pg(conn)
            raise
        self._local.used_at = time.monotonic()

    def _pg_connection(self) -> psycopg.Connection[Any]:
        import psycopg

        conn: psycopg.Connection[Any] | None = getattr(self._local, "pg", None)
        if conn is not None and not conn.closed:
            if time.monotonic() - getattr(self._local, "used_at", 0.0) <= PING_AFTER_IDLE:
                return conn
            try:  # idle for a while: the server may have gone and come back since
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                self._drop_pg(conn)
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        try:
            # autocommit: transactions are the BEGIN and COMMIT ``_psycopg`` sends itself
            conn = psycopg.connect(*cargs, **{"connect_timeout": 3, **cparams}, autocommit=True)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from exc
        self._local.pg = conn
        with self._lock:
            self._all.add(conn)
        return conn

    def _drop_pg(self, conn: Any) -> None:
        self._local.pg = None
        self._local.relaxed = None
        with contextlib.suppress(Exception):  # a connection that is gone may not even close
            conn.close()


def _kind(engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        return "sqlite" if database and database != ":memory:" else "core"
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
        return "psycopg"
    return "core"
