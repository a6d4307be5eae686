"""ORM models of users, their API tokens, teams and team membership."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from envs.kit.clock import utcnow
from envs.kit.db import Base, UTCDateTime


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored; the token itself is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    user: Mapped[User] = relationship(back_populates="tokens")


ROLE_MEMBER = "member"
ROLE_ADMIN = "admin"
ROLES = (ROLE_MEMBER, ROLE_ADMIN)


class Team(Base):
    """A team: the namespace of its environments (``acme`` owns ``acme/ml``)."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    members: Mapped[list[Membership]] = relationship(back_populates="team", cascade="all, delete-orphan")


class Membership(Base):
    """A user in a team with a role: ``member`` reads and writes the team's environments,
    ``admin`` also adds and removes members."""

    __tablename__ = "team_members"
    __table_args__ = (UniqueConstraint("team_id", "user_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16), default=ROLE_MEMBER)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    team: Mapped[Team] = relationship(back_populates="members")
    user: Mapped[User] = relationship()


class Publication(Base):
    """A version, or a tag, of a team's environment made readable by every team.

    ``version_id`` is set for a published version (``acme/ml@3``); ``tag`` for a published tag
    (``acme/ml:stable``), which publishes whichever version the tag points at, as it moves.
    """

    __tablename__ = "publications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("environment_versions.id", ondelete="CASCADE"), nullable=True, index=True
    )
    tag: Mapped[str | None] = mapped_column(String(128), nullable=True)
    published_by: Mapped[str] = mapped_column(String(64), default="")
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TeamEvent(Base):
    """One change to a team's environments, in order (``id`` only grows): a version saved, a
    version or tag published or unpublished, a version deleted, a tag moved. Written in the same
    transaction as the change; ``GET /teams/{team}/events`` streams them."""

    __tablename__ = "team_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    environment: Mapped[str] = mapped_column(String(140))
    ref: Mapped[str] = mapped_column(String(300))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TeamSecret(Base):
    """A team's secret: its value encrypted with the installation's secrets key (never stored
    in the clear; the key is a file apart from the database, registry/team_secrets.py)."""

    __tablename__ = "team_secrets"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer, default=1)  # +1 on each change
    created_by: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    team: Mapped[Team] = relationship()


class RuntimeSecretUse(Base):
    """The secrets a runtime's container was given at its last boot (variable -> team, name,
    version), and every value it was ever given, encrypted (what its saves are searched for)."""

    __tablename__ = "runtime_secret_uses"

    runtime_id: Mapped[str] = mapped_column(ForeignKey("runtimes.id", ondelete="CASCADE"), primary_key=True)
    delivered: Mapped[dict[str, dict[str, object]]] = mapped_column(JSON, default=dict)
    sealed_values: Mapped[bytes] = mapped_column(LargeBinary)
    delivered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
