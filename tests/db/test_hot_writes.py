"""``Database.hot()``: a cell's few writes skip Core's per-statement work on SQLite, and store
exactly what Core would store; on PostgreSQL each transaction is one round trip."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import bindparam, insert, select, text, update

from api.dbschema import upgrade
from envs.kit.clock import utcnow
from envs.kit.db import Database, EncodedJSON, HotStatement
from envs.kit.errors import DatabaseUnavailableError
from envs.kit.hot import CoreWriter
from envs.service import NewVersion, register_version
from registry.users import create_user
from runner.cells import store as cellstore
from runner.models import Execution, ExecutionOutput, Runtime
from runner.runtimes import store as records
from tests.fixtures.services import PostgresCluster


def _runtime(db: Database) -> tuple[str, str]:
    with db.session() as s:
        user = create_user(s, "hotuser")
        version, _ = register_version(s, NewVersion(environment="bash", image_id="sha256:" + "a" * 64, image_ref="b"))
        rt = Runtime(
            id="rt_hot0000000000000",
            owner_id=user.id,
            name="hot",
            environment_ref="bash@1",
            version_id=version.id,
            machine_type="small",
            runner="r",
        )
        s.add(rt)
        return rt.id, user.id


def _execution(runtime_id: str, owner_id: str, eid: str, seq: int) -> dict[str, object]:
    return {
        "id": eid,
        "runtime_id": runtime_id,
        "owner_id": owner_id,
        "seq": seq,
        "language": "python",
        "code": "print('é')\n1+1",
        "timeout": 2.5,
        "status": "queued",
        "created_at": utcnow(),
        "output_count": 0,
        "output_bytes": 0,
        "truncated": False,
    }


def _row(db: Database, eid: str) -> dict[str, object]:
    with db.session() as s:
        row = s.get(Execution, eid)
        assert row is not None
        return {c.key: getattr(row, c.key) for c in Execution.__table__.columns if c.key != "id"}


def test_hot_writes_store_what_core_stores(db: Database) -> None:
    rid, owner = _runtime(db)
    hot_values, core_values = _execution(rid, owner, "ex_hot", 1), _execution(rid, owner, "ex_core", 2)
    core_values["created_at"] = hot_values["created_at"]
    with db.hot() as w:
        w.execute(cellstore.INSERT_EXECUTION, hot_values)
    with db.connection() as c:
        c.execute(insert(Execution), core_values)
    finished = utcnow() + timedelta(seconds=1)
    for eid in ("ex_hot", "ex_core"):
        end = {
            "b_id": eid,
            "b_status": "error",
            "b_count": 7,
            "b_started": hot_values["created_at"],
            "b_finished": finished,
            "b_truncated": True,
            "b_bytes": 12,
            "b_outputs": 2,
            "b_ename": "ValueError",
            "b_evalue": "bad ✓",
        }
        outputs = [
            {"execution_id": eid, "idx": 0, "output": {"output_type": "stream", "name": "stdout", "text": "é\n"}},
            {"execution_id": eid, "idx": 1, "output": {"output_type": "error", "ename": "ValueError", "traceback": []}},
        ]
        if eid == "ex_hot":
            with db.hot() as w:
                w.execute_many(cellstore.INSERT_OUTPUTS, outputs)
                assert w.count(cellstore.FINISH_EXECUTION, end) == 1
        else:
            with db.connection() as c:
                c.execute(insert(ExecutionOutput), outputs)
                c.execute(cellstore.FINISH_EXECUTION.statement, end)
    hot, core = _row(db, "ex_hot"), _row(db, "ex_core")
    assert hot.pop("seq") == 1 and core.pop("seq") == 2
    assert hot == core
    assert hot["finished_at"] == finished and hot["finished_at"].tzinfo is not None  # type: ignore[union-attr]
    assert hot["truncated"] is True and hot["timeout"] == 2.5
    with db.session() as s:
        stored = {
            eid: [o for (o,) in s.execute(select(ExecutionOutput.output).where(ExecutionOutput.execution_id == eid))]
            for eid in ("ex_hot", "ex_core")
        }
    assert stored["ex_hot"] == stored["ex_core"] and stored["ex_hot"][0]["text"] == "é\n"
    # the very bytes in the table, not only what reads back: SQLite compares and orders text,
    # so a timestamp stored in another format is never equal to the same time bound by Core
    with db.connection() as c:
        raw = {
            r[0]: tuple(r[1:])
            for r in c.execute(text("SELECT id, created_at, started_at, finished_at, truncated FROM executions"))
        }
        assert raw["ex_hot"] == raw["ex_core"], raw
        found = c.scalars(select(Execution.id).where(Execution.finished_at == finished).order_by(Execution.id)).all()
        assert found == ["ex_core", "ex_hot"]


def test_an_output_given_encoded_is_stored_as_the_same_output_given_as_a_dict(db: Database) -> None:
    """A cell's output is encoded once, for its server-sent event and its row: the row must read
    back as the dict it was made from (on PostgreSQL as a JSON value, not a JSON string), on the
    hot path and on the Core one alike."""
    rid, owner = _runtime(db)
    output = {"output_type": "stream", "name": "stdout", "text": 'é "quoted" ✓\n\ttab\\'}
    encoded = EncodedJSON(json.dumps(output, separators=(",", ":")))
    with db.hot() as w:
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_enc", 1))
        cellstore.insert_outputs(w, "ex_enc", [(0, encoded), (1, {"output_type": "error", "ename": "E"})])
    with db.connection() as c:
        cellstore.insert_outputs(CoreWriter(c), "ex_enc", [(2, encoded)])
    with db.session() as s:
        stored = s.scalars(
            select(ExecutionOutput.output).where(ExecutionOutput.execution_id == "ex_enc").order_by(ExecutionOutput.idx)
        ).all()
    assert stored == [output, {"output_type": "error", "ename": "E"}, output]
    if db.engine.dialect.name == "postgresql":
        with db.connection() as c:
            kinds = c.scalars(text("SELECT json_typeof(output) FROM execution_outputs WHERE execution_id = 'ex_enc'"))
            assert set(kinds) == {"object"}


def test_a_touch_stores_the_time_as_core_does_so_a_compare_and_set_on_it_matches(db: Database) -> None:
    """The idle stop applies only while the runtime's last activity is the one it decided on
    (``WHERE last_activity_at = :seen``): a hot touch must store what Core binds."""
    rid, _owner = _runtime(db)
    at = utcnow()
    with db.hot() as w:
        assert w.count(records.TOUCH, {"b_id": rid, "b_at": at, "b_what": "execution finished"}) == 1
    with db.connection() as c:
        matched = c.execute(
            update(Runtime).where(Runtime.id == rid, Runtime.last_activity_at == at).values(last_activity="seen")
        ).rowcount
    assert matched == 1


def test_a_literal_in_the_statement_is_kept(db: Database) -> None:
    """MARK_RUNNING only moves a queued execution: its ``status == 'queued'`` must hold."""
    rid, owner = _runtime(db)
    with db.hot() as w:
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_1", 1))
    with db.hot() as w:
        assert w.count(cellstore.MARK_RUNNING, {"b_id": "ex_1", "b_started": utcnow()}) == 1
    with db.hot() as w:
        assert w.count(cellstore.MARK_RUNNING, {"b_id": "ex_1", "b_started": utcnow()}) == 0
    assert _row(db, "ex_1")["status"] == "running"


def test_a_failed_hot_transaction_leaves_nothing(db: Database) -> None:
    rid, owner = _runtime(db)
    with pytest.raises(Exception), db.hot() as w:  # noqa: B017, PT011  (the driver's own error type)
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_a", 1))
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_b", 1))  # same seq: unique violation
    with db.session() as s:
        assert s.scalars(select(Execution.id)).all() == []


def test_a_column_default_is_never_silently_skipped(db: Database) -> None:
    rid, owner = _runtime(db)
    values = _execution(rid, owner, "ex_d", 1)
    del values["created_at"]  # has a Python-side default, which the hot path cannot apply
    with pytest.raises(ValueError, match="created_at"), db.hot() as w:
        w.execute(cellstore.INSERT_EXECUTION, values)


def test_each_thread_writes_on_its_own_connection_which_closes_with_the_thread(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from api.dbschema import upgrade

    url = f"sqlite:///{tmp_path / 'h.db'}"
    upgrade(url)
    db = Database(url)
    rid, owner = _runtime(db)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(20):
                with db.hot() as w:
                    w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, f"ex_{n}_{i}", n * 100 + i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.session() as s:
        assert len(s.scalars(select(Execution.id)).all()) == 80
    db.dispose()
    import gc

    gc.collect()
    assert len(db._hot._all) == 0, "a thread's connection closes when the thread is gone"


def test_an_unreachable_sqlite_file_is_a_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(DatabaseUnavailableError), db.hot() as w:
        w.execute(HotStatement(insert(Runtime)), {})


def test_a_sqlite_file_that_cannot_be_opened_is_a_503_on_every_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'gone' / 'envctl.db'}")
    with pytest.raises(DatabaseUnavailableError), db.session() as s:
        s.execute(select(Execution.id))
    with pytest.raises(DatabaseUnavailableError), db.connection() as c:
        c.execute(select(Execution.id))


def test_dispose_while_a_thread_writes_does_not_crash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """CI caught a segfault: dispose() closed a worker's sqlite3 connection under it."""
    from api.dbschema import upgrade

    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    db = Database(url)
    rid, owner = _runtime(db)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with db.hot() as w:
                    w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, f"ex_w{i}", i))
            except DatabaseUnavailableError:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    t = threading.Thread(target=write)
    t.start()
    import time

    time.sleep(0.2)
    db.dispose()
    time.sleep(0.2)
    stop.set()
    t.join(10)
    assert errors == []


@pytest.mark.postgres
def test_a_hot_connection_the_server_dropped_is_replaced_before_the_next_write(
    postgres: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R16 on the cell path: the database restarts (here: it drops every connection); the
    first write after it is back succeeds on a new connection."""
    from envs.kit import hot

    url = postgres.create_database("hot_" + uuid.uuid4().hex[:12])
    upgrade(url)
    db = Database(url)
    try:
        rid, owner = _runtime(db)
        with db.hot() as w:
            w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_before", 1))
        with db.connection() as c:  # what a restart does to every open connection
            c.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND datname = current_database()"
                )
            )
        monkeypatch.setattr(hot, "PING_AFTER_IDLE", 0.0)  # as after a while without cells
        with db.hot() as w:
            w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_after", 2))
        assert _row(db, "ex_after")["seq"] == 2
    finally:
        db.dispose()


def test_a_touch_after_the_transaction_is_stored_and_a_failed_transaction_drops_it(db: Database) -> None:
    """``execute_after`` (a cell's activity at its end): on PostgreSQL it follows the commit in a
    transaction of its own; on every backend it is stored when the transaction commits, and
    not at all when it fails."""
    rid, owner = _runtime(db)
    at = utcnow()
    with db.hot() as w:
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_t", 1))
        records.touch_hot(w, rid, "execution finished", at)
    with db.session() as s:
        rt = s.get(Runtime, rid)
        assert rt is not None and rt.last_activity == "execution finished" and rt.last_activity_at == at
    with pytest.raises(Exception), db.hot() as w:  # noqa: B017, PT011  (the driver's own error type)
        records.touch_hot(w, rid, "never", utcnow())
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_u", 1))  # same seq: unique violation
    with db.session() as s:
        rt = s.get(Runtime, rid)
        assert rt is not None and rt.last_activity == "execution finished"


def test_cell_writes_keep_their_order_and_one_failing_write_costs_no_other(db: Database) -> None:
    """``runner/cells/writes.py``: what queued while a commit was under way goes in one
    transaction; when that fails (here: outputs of an execution that is gone), each write is
    made again alone, and every caller hears how its own write went."""
    from runner.cells.writes import CellWrites, Write

    rid, owner = _runtime(db)
    with db.hot() as w:
        w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, "ex_w", 1))
    writes = CellWrites(db, name="test-cell-writes")
    release = threading.Event()
    heard: dict[str, Exception | None] = {}

    def outputs(eid: str, first: int, n: int, wait: bool = False):  # type: ignore[no-untyped-def]
        def statements(c):  # type: ignore[no-untyped-def]
            if wait:
                assert release.wait(10)
            cellstore.insert_outputs(
                c, eid, [(i, {"output_type": "stream", "name": "stdout", "text": f"{i}\n"}) for i in range(first, n)]
            )

        return statements

    def done(key: str):  # type: ignore[no-untyped-def]
        return lambda error: heard.__setitem__(key, error)

    writes.put(Write("ex_w", outputs("ex_w", 0, 2, wait=True), done=done("first")))
    writes.put(Write("ex_w", outputs("ex_w", 2, 4), done=done("second")))
    writes.put(Write("ex_gone", outputs("ex_gone", 0, 1), done=done("gone")))
    end = {"status": "ok", "count": 1, "started": None, "finished": utcnow(), "truncated": False}
    end |= {"bytes": 8, "outputs": 5, "ename": None, "evalue": None}
    writes.put(
        Write("ex_w", lambda c: (outputs("ex_w", 4, 5)(c), cellstore.finish(c, "ex_w", **end)), done=done("end"))
    )
    release.set()
    assert writes.wait_idle(20)
    assert heard["first"] is None and heard["second"] is None and heard["end"] is None
    assert heard["gone"] is not None  # its own failure, told to its caller
    with db.session() as s:
        stored = s.execute(
            select(ExecutionOutput.idx, ExecutionOutput.output)
            .where(ExecutionOutput.execution_id == "ex_w")
            .order_by(ExecutionOutput.idx)
        ).all()
    assert [(i, o["text"]) for i, o in stored] == [(i, f"{i}\n") for i in range(5)]
    assert _row(db, "ex_w")["status"] == "ok"


def test_a_transaction_marked_not_durable_skips_the_flush_for_itself_alone(db: Database) -> None:
    """``hot(durable=False)`` (a cell's way in): on PostgreSQL that transaction alone commits
    without waiting for the disk, and the next one on the same connection (a cell's end, on
    the same thread) waits for it again; on every backend its rows are stored as any."""
    from sqlalchemy import func

    rid, owner = _runtime(db)
    setting = HotStatement(
        update(Runtime)
        .where(Runtime.id == bindparam("b_id"))
        .values(last_activity=bindparam("b_what"))
        .returning(func.current_setting("synchronous_commit") if db.pipelined else Runtime.last_activity)
    )
    seen = []
    for durable in (False, True, False, True):
        with db.hot(durable=durable) as w:
            row = w.fetch(setting, {"b_id": rid, "b_what": f"durable={durable}"})
            assert row is not None
            seen.append(row[0])
            w.execute(cellstore.INSERT_EXECUTION, _execution(rid, owner, f"ex_{len(seen)}", len(seen)))
    if db.pipelined:
        assert seen == ["off", "on", "off", "on"]
    with db.session() as s:
        assert sorted(s.scalars(select(Execution.id)).all()) == ["ex_1", "ex_2", "ex_3", "ex_4"]
        rt = s.get(Runtime, rid)
        assert rt is not None and rt.last_activity == "durable=True"


def test_a_single_statement_not_durable_leaves_every_durable_transaction_durable(db: Database) -> None:
    """``hot_one(durable=False)`` (a cell's way in, one statement outside a transaction block)
    turns ``synchronous_commit`` off for its connection's session: every durable statement or
    transaction on that connection after it must still wait for the disk."""
    from sqlalchemy import func

    rid, _owner = _runtime(db)
    setting = HotStatement(
        update(Runtime)
        .where(Runtime.id == bindparam("b_id"))
        .values(last_activity=bindparam("b_what"))
        .returning(func.current_setting("synchronous_commit") if db.pipelined else Runtime.last_activity)
    )
    seen = []
    for one, durable in ((True, False), (False, True), (True, False), (False, False), (True, True), (False, True)):
        values = {"b_id": rid, "b_what": f"{one}-{durable}"}
        if one:
            row = db.hot_one(setting, values, durable=durable)
        else:
            with db.hot(durable=durable) as w:
                row = w.fetch(setting, values)
        assert row is not None
        seen.append(row[0])
    if db.pipelined:
        assert seen == ["off", "on", "off", "off", "on", "on"]
    with db.session() as s:
        rt = s.get(Runtime, rid)
        assert rt is not None and rt.last_activity == "False-True"


def test_a_cell_whose_runtime_is_not_the_runners_or_not_seen_writes_nothing(db: Database) -> None:
    """The way in on PostgreSQL decides in SQL: another runner's runtime, or a caller who does
    not see it, takes no number and writes no row."""
    if not db.pipelined:
        pytest.skip("the one-statement way in is PostgreSQL's")
    rid, owner = _runtime(db)
    at = utcnow()
    row = {"id": "ex_no", "language": None, "code": "1", "timeout": None, "created_at": at, "submitted_by": owner}
    claim = {"b_id": rid, "b_at": at, "b_what": "execution submitted"}
    assert (
        cellstore.claim_and_queue(db, {**claim, **records.claimer(records.Viewer(owner), "other")}, row, durable=False)
        is None
    )
    assert (
        cellstore.claim_and_queue(
            db, {**claim, **records.claimer(records.Viewer("u_x", frozenset({"t"})), "r")}, row, durable=False
        )
        is None
    )
    found = cellstore.claim_and_queue(db, {**claim, **records.claimer(records.Viewer(owner), "r")}, row, durable=False)
    assert found is not None and found[0] == 1 and found[1] == owner
    with db.session() as s:
        assert s.scalars(select(Execution.id)).all() == ["ex_no"]
        assert s.get(Runtime, rid).next_seq == 1  # type: ignore[union-attr]


def test_a_hot_transaction_on_postgresql_is_one_round_trip(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cell's way in (its number and row) and its end (outputs, status, then the runtime's
    activity in a transaction of its own) each wait for the server once: one Sync each in
    libpq's trace of the protocol. psycopg's own transactions would sync after BEGIN, at
    COMMIT and at the pipeline's end."""
    if not db.pipelined:
        pytest.skip("a pipelined database (PostgreSQL) only: SQLite makes no round trips")
    rid, owner = _runtime(db)
    viewer = records.Viewer(owner)
    traced = tmp_path / "trace"

    def cell(n: int, trace: bool) -> None:
        at = utcnow()
        row = {
            "id": f"ex_rt{n}",
            "language": None,
            "code": "1",
            "timeout": None,
            "created_at": at,
            "submitted_by": owner,
        }
        conn = db._hot._pg_connection()  # this thread's hot connection, to trace its protocol
        with traced.open("w") as out:
            if trace:
                conn.pgconn.trace(out.fileno())
            claim = {"b_id": rid, "b_at": at, "b_what": "execution submitted", **records.claimer(viewer, "r")}
            assert cellstore.claim_and_queue(db, claim, row, durable=False) is not None
            end = {"status": "ok", "count": 1, "started": at, "finished": utcnow(), "truncated": False}
            with db.hot() as w:
                cellstore.insert_outputs(w, row["id"], [(0, {"output_type": "stream", "name": "stdout", "text": "1"})])
                cellstore.finish(w, row["id"], **end, bytes=1, outputs=1, ename=None, evalue=None)
                records.touch_hot(w, rid, "execution finished", utcnow())
            if trace:
                conn.pgconn.untrace()

    for n in range(6):  # past psycopg's threshold for preparing statements
        cell(n, trace=False)
    cell(6, trace=True)
    protocol = traced.read_text()
    assert protocol.count("\tSync") == 2, protocol
    assert _row(db, "ex_rt6")["status"] == "ok" and _row(db, "ex_rt6")["seq"] == 7
    with db.session() as s:
        rt = s.get(Runtime, rid)
        assert rt is not None and rt.last_activity == "execution finished"
