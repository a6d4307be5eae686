"""Users and API tokens: create them, list and revoke tokens, and find who a bearer token
belongs to. A token is shown once when it is made; only its SHA-256 is stored. A revoked or
expired token is refused."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.clock import utcnow
from envs.kit.errors import InvalidInputError, UnauthorizedError
from envs.kit.ids import new_id
from envs.refs import check_name
from registry.errors import TokenNotFoundError, UserExistsError
from registry.models import ApiToken, User

TOKEN_PREFIX = "envctl_"  # noqa: S105  (a prefix, not a secret)
# The user names a cluster node's pull secret and envctl's own push of a version a boot needs
# log in to the registry's token endpoint with (registry/pull_grants.py): that endpoint takes a
# grant, never a password, under them, so no envctl user may be called so.
PULL_GRANT_USER = "envctl-pull-grant"
PUSH_GRANT_USER = "envctl-push-grant"
RESERVED_NAMES = frozenset({PULL_GRANT_USER, PUSH_GRANT_USER})


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: A token made through the API lives this long unless asked otherwise, and at most MAX_TOKEN_LIFE.
DEFAULT_TOKEN_LIFE = timedelta(days=90)
MAX_TOKEN_LIFE = timedelta(days=366)


def create_user(session: Session, name: str, *, is_admin: bool = False) -> User:
    check_name(name, "name", "user name")
    if name in RESERVED_NAMES:
        raise InvalidInputError(
            f"name: the user name {name!r} is reserved (the registry's token endpoint takes it for the grants "
            "envctl signs: Kubernetes nodes' pull secrets, its own pushes); choose another name",
            field="name",
        )
    if get_user_by_name(session, name) is not None:
        raise UserExistsError(f"name: a user named {name!r} exists already", details={"name": name})
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
    if row.revoked_at is not None:
        raise UnauthorizedError("the bearer token was revoked; make a new one with `envctl token create`")
    now = utcnow()
    if row.expires_at is not None and row.expires_at <= now:
        raise UnauthorizedError("the bearer token has expired; make a new one with `envctl token create`")
    return row.user


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown of a token after it was made: never the token itself."""

    id: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > utcnow())


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(row.id, row.description, row.created_at, row.expires_at, row.revoked_at)


def create_token(session: Session, user: User, description: str, life: timedelta | None) -> tuple[str, TokenInfo]:
    """A new token for ``user`` living ``life`` (the default when ``None``); the token and what
    may be shown of it later."""
    life = DEFAULT_TOKEN_LIFE if life is None else life
    token = issue_token(session, user, description, utcnow() + life)
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == _hash(token))).one()
    return token, _info(row)


def list_tokens(session: Session, user_id: str) -> list[TokenInfo]:
    rows = session.scalars(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.created_at))
    return [_info(r) for r in rows]


def revoke_token(session: Session, user_id: str, token_id: str) -> TokenInfo:
    """Revoke one of ``user_id``'s tokens (another user's is a 404, as if it did not exist)."""
    row = session.get(ApiToken, token_id)
    if row is None or row.user_id != user_id:
        raise TokenNotFoundError(
            f"token_id: you have no token {token_id!r}; `envctl token list` shows yours",
            details={"token_id": token_id},
        )
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return _info(row)


def ensure_admin(session: Session, name: str = "admin") -> tuple[User, str | None]:
    """Create the first admin if there is none; returns the admin and a new token if made."""
    admin = session.scalars(select(User).where(User.is_admin.is_(True)).order_by(User.created_at)).first()
    if admin is not None:
        return admin, None
    admin = create_user(session, name, is_admin=True)
    return admin, issue_token(session, admin, "first admin, made by envctl serve")
