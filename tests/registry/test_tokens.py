"""Users and API tokens (registry/users.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.errors import InvalidInputError, UnauthorizedError
from registry import users as service
from registry.models import ApiToken, User


def make_admin(db: Database) -> tuple[str, str]:
    """The first admin's id and token."""
    with db.session() as s:
        admin, token = service.ensure_admin(s)
        assert token is not None
        return admin.id, token


def test_ensure_admin_creates_one_admin_with_a_token(db: Database) -> None:
    with db.session() as s:
        admin, token = service.ensure_admin(s)
        assert admin.is_admin
        assert admin.name == "admin"
        assert token is not None and token.startswith(service.TOKEN_PREFIX)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(User)) == 1
        assert s.scalar(select(func.count()).select_from(ApiToken)) == 1


def test_ensure_admin_a_second_time_returns_the_same_admin_and_no_token(db: Database) -> None:
    admin_id, _ = make_admin(db)
    with db.session() as s:
        admin, token = service.ensure_admin(s)
        assert admin.id == admin_id
        assert token is None
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(User)) == 1
        assert s.scalar(select(func.count()).select_from(ApiToken)) == 1


def test_authenticate_with_the_admin_token_returns_the_admin(db: Database) -> None:
    admin_id, token = make_admin(db)
    with db.session() as s:
        user = service.authenticate(s, token)
        assert user.id == admin_id
        assert user.is_admin


def test_authenticate_returns_the_owner_of_each_token(db: Database) -> None:
    with db.session() as s:
        alice = service.create_user(s, "alice")
        bob = service.create_user(s, "bob")
        alice_token = service.issue_token(s, alice)
        bob_token = service.issue_token(s, bob)
        ids = (alice.id, bob.id)
    with db.session() as s:
        assert service.authenticate(s, alice_token).id == ids[0]
        assert service.authenticate(s, bob_token).id == ids[1]
        assert not service.authenticate(s, bob_token).is_admin


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("envctl_not-a-real-token", id="unknown"),
        pytest.param("", id="empty"),
        pytest.param(None, id="missing"),
    ],
)
def test_unknown_or_empty_token_is_unauthorized(db: Database, token: str | None) -> None:
    make_admin(db)
    with db.session() as s, pytest.raises(UnauthorizedError) as caught:
        service.authenticate(s, token)
    assert caught.value.status == 401


def test_token_that_differs_by_one_character_is_unauthorized(db: Database) -> None:
    _, token = make_admin(db)
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    with db.session() as s, pytest.raises(UnauthorizedError, match="not known"):
        service.authenticate(s, tampered)


def test_expired_token_is_unauthorized(db: Database) -> None:
    with db.session() as s:
        user = service.create_user(s, "alice")
        token = service.issue_token(s, user, expires_at=utcnow() - timedelta(seconds=1))
    with db.session() as s, pytest.raises(UnauthorizedError, match="expired"):
        service.authenticate(s, token)


def test_token_that_expires_later_is_accepted(db: Database) -> None:
    with db.session() as s:
        user = service.create_user(s, "alice")
        token = service.issue_token(s, user, expires_at=utcnow() + timedelta(hours=1))
    with db.session() as s:
        assert service.authenticate(s, token).name == "alice"


def test_stored_token_row_holds_only_its_hash(db: Database) -> None:
    _, token = make_admin(db)
    with db.session() as s:
        rows = s.execute(text("SELECT * FROM api_tokens")).mappings().all()
        stored = s.scalars(select(ApiToken)).one()
    assert len(rows) == 1
    for column, value in rows[0].items():
        assert token not in str(value), f"column {column} holds the token"
        assert token[len(service.TOKEN_PREFIX) :] not in str(value), f"column {column} holds the token"
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest()


def test_tokens_are_different_each_time(db: Database) -> None:
    with db.session() as s:
        user = service.create_user(s, "alice")
        tokens = {service.issue_token(s, user) for _ in range(5)}
    assert len(tokens) == 5


def test_expiry_comes_back_timezone_aware(db: Database) -> None:
    with db.session() as s:
        user = service.create_user(s, "alice")
        service.issue_token(s, user, expires_at=utcnow() + timedelta(days=1))
    with db.session() as s:
        row = s.scalars(select(ApiToken)).one()
        assert row.expires_at is not None and row.expires_at.tzinfo is not None
        assert row.created_at.tzinfo is not None


def test_create_user_refuses_a_bad_name(db: Database) -> None:
    with db.session() as s, pytest.raises(InvalidInputError):
        service.create_user(s, "Alice Smith")
