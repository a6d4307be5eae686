"""Users and API tokens: create them, and find who a bearer token belongs to."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.clock import utcnow
from envs.kit.errors import UnauthorizedError
from envs.kit.ids import new_id
from envs.refs import check_name
from registry.models import ApiToken, User

TOKEN_PREFIX = "envctl_"  # noqa: S105  (a prefix, not a secret)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str, *, is_admin: bool = False) -> User:
    check_name(name, "name", "user name")
    user = User(id=new_id("usr"), name=name, is_admin=is_admin, created_at=utcnow())
    session.add(user)
    session.flush()
    return user


def get_user_by_name(session: Session, name: str) -> User | None:
    return session.scalars(select(User).where(User.name == name)).one_or_none()


def user_names(session: Session, ids: Iterable[str]) -> dict[str, str]:
    """The names of the users with ``ids``, by id; an id of no user (one who is gone) is left out."""
    wanted = set(ids)
    if not wanted:
        return {}
    return {uid: name for uid, name in session.execute(select(User.id, User.name).where(User.id.in_(wanted)))}


def issue_token(session: Session, user: User, description: str = "", expires_at: datetime | None = None) -> str:
    """Create a token for ``user`` and return it; it cannot be read back later."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            id=new_id("tok"),
            user_id=user.id,
            token_hash=_hash(token),
            description=description,
            created_at=utcnow(),
            expires_at=expires_at,
        )
    )
    session.flush()
    return token


def authenticate(session: Session, token: str | None) -> User:
    """The user a bearer token belongs to, or UnauthorizedError."""
    if not token:
        raise UnauthorizedError(
            "no bearer token; send 'Authorization: Bearer <token>' (the CLI reads ENVCTL_TOKEN "
            "or the token `envctl serve` wrote)"
        )
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == _hash(token))).one_or_none()
    if row is None:
        raise UnauthorizedError("the bearer token is not known")
    now = utcnow()
    if row.expires_at is not None and row.expires_at <= now:
        raise UnauthorizedError("the bearer token has expired")
    return row.user


def ensure_admin(session: Session, name: str = "admin") -> tuple[User, str | None]:
    """Create the first admin if there is none; returns the admin and a new token if made."""
    admin = session.scalars(select(User).where(User.is_admin.is_(True)).order_by(User.created_at)).first()
    if admin is not None:
        return admin, None
    admin = create_user(session, name, is_admin=True)
    return admin, issue_token(session, admin, "first admin, made by envctl serve")
