"""Revision 0007: environments.owner_id stops being a foreign key to users (envs sits below
registry), on a database that holds rows, on SQLite and PostgreSQL. The generic checks (upgrade
head, the round trip to base, models against migrations) are in test_migrations.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, inspect, text

from api import dbschema
from envs.kit.db import make_engine

WHEN = "2026-01-01 00:00:00"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def owner_keys(engine: Engine) -> list[str]:
    """The referred tables of environments' foreign keys on owner_id (a fresh connection: SQLite
    connections in a pool may hold on to an old schema)."""
    engine.dispose()
    with engine.connect() as conn:
        keys = inspect(conn).get_foreign_keys("environments")
    return [k["referred_table"] for k in keys if k["constrained_columns"] == ["owner_id"]]


def add_user(conn: Connection, user_id: str) -> None:
    conn.execute(
        text("INSERT INTO users (id, name, is_admin, created_at) VALUES (:id, :id, false, :t)"),
        {"id": user_id, "t": WHEN},
    )


def add_environment(conn: Connection, env_id: int, name: str) -> None:
    """An environment with one version, so that rebuilding the table meets a row referring to it."""
    conn.execute(
        text("INSERT INTO environments (id, namespace, name, description, created_at) VALUES (:i, '', :n, '', :t)"),
        {"i": env_id, "n": name, "t": WHEN},
    )
    conn.execute(
        text(
            "INSERT INTO environment_versions (id, environment_id, number, digest, image_id, image_ref, message,"
            " author, size, size_added, labels, created_at)"
            " VALUES (:i, :i, 1, :d, :d, 'ref', '', '', 0, 0, '{}', :t)"
        ),
        {"i": env_id, "d": f"sha256:{env_id:064x}", "t": WHEN},
    )


def rows(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        owners = {name: owner for name, owner in conn.execute(text("SELECT name, owner_id FROM environments"))}
        versions = conn.execute(text("SELECT environment_id, number FROM environment_versions ORDER BY 1")).all()
    return {"owners": owners, "versions": [tuple(v) for v in versions]}


def test_a_populated_database_upgrades_from_0004_with_its_rows(db_url: str, engine: Engine) -> None:
    """0005 and 0007 rebuild the environments table on SQLite while versions refer to it."""
    dbschema.upgrade(db_url, "0004")
    with engine.begin() as conn:
        add_environment(conn, 1, "bash")
    dbschema.upgrade(db_url, "0007")
    assert rows(engine) == {"owners": {"bash": None}, "versions": [(1, 1)]}


def test_0007_drops_the_foreign_key_to_users_and_keeps_every_owner(db_url: str, engine: Engine) -> None:
    dbschema.upgrade(db_url, "0006")
    with engine.begin() as conn:
        add_user(conn, "usr_alice")
        add_environment(conn, 1, "mine")
        add_environment(conn, 2, "base")
        conn.execute(text("UPDATE environments SET owner_id = 'usr_alice' WHERE id = 1"))
    assert owner_keys(engine) == ["users"]
    dbschema.upgrade(db_url, "0007")
    assert owner_keys(engine) == []
    assert rows(engine) == {"owners": {"mine": "usr_alice", "base": None}, "versions": [(1, 1), (2, 1)]}


def test_downgrading_0007_puts_the_key_back_and_owners_that_are_gone_become_none(db_url: str, engine: Engine) -> None:
    """Once the key is gone, a user row can go while environments still name it; the key
    cannot be made over such a row, so the downgrade clears it (no owner: admins only, which
    is how an owner that is gone is treated anyway)."""
    dbschema.upgrade(db_url, "0007")
    with engine.begin() as conn:
        add_user(conn, "usr_alice")
        add_user(conn, "usr_bob")
        add_environment(conn, 1, "alices")
        add_environment(conn, 2, "bobs")
        conn.execute(text("UPDATE environments SET owner_id = 'usr_alice' WHERE id = 1"))
        conn.execute(text("UPDATE environments SET owner_id = 'usr_bob' WHERE id = 2"))
        conn.execute(text("DELETE FROM users WHERE id = 'usr_bob'"))
    dbschema.downgrade(db_url, "0006")
    assert owner_keys(engine) == ["users"]
    assert rows(engine) == {"owners": {"alices": "usr_alice", "bobs": None}, "versions": [(1, 1), (2, 1)]}
    dbschema.upgrade(db_url, "0007")
    assert owner_keys(engine) == []
    assert rows(engine)["owners"] == {"alices": "usr_alice", "bobs": None}
