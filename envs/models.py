"""ORM models of environments, their immutable versions and movable tags."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from envs.kit.clock import utcnow
from envs.kit.db import Base, UTCDateTime


class Environment(Base):
    """A named line of images: ``python3``, ``acme/ml``. ``namespace`` is the team or ''.

    ``owner_id`` is the user who created it (its first save, build or load); only they and
    admins may add versions to it or delete them. ``None`` is no owner: base images, and
    environments older than owners; only admins may change those. Anyone may read any.

    ``owner_id`` is a plain user id, not a foreign key: users are the registry's table, and
    ``envs`` sits below ``registry``. User ids are random and never reused, so an environment
    whose owner is gone matches no writer: like one with no owner, it is left to the admins
    (and is listed without an owner, since no user has that id).
    """

    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    owner_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[EnvironmentVersion]] = relationship(
        back_populates="environment", order_by="EnvironmentVersion.number"
    )
    tags: Mapped[list[Tag]] = relationship(back_populates="environment")

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class EnvironmentVersion(Base):
    """One immutable image of an environment (``python3@3``). Never changes once created."""

    __tablename__ = "environment_versions"
    __table_args__ = (
        UniqueConstraint("environment_id", "number"),
        UniqueConstraint("environment_id", "digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    # Content address of the version. For a local image this is Docker's image id.
    digest: Mapped[str] = mapped_column(String(80))
    image_id: Mapped[str] = mapped_column(String(80))
    image_ref: Mapped[str] = mapped_column(String(255))  # a local tag that names the image
    # the digest of the manifest the registry holds for it, once pushed (pulls ask for this, R24)
    registry_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("environment_versions.id"), nullable=True, index=True)
    source_runtime_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    notebook: Mapped[str | None] = mapped_column(String(255), nullable=True)
    recipe_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(64), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    size_added: Mapped[int] = mapped_column(BigInteger, default=0)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    environment: Mapped[Environment] = relationship(back_populates="versions")
    parent: Mapped[EnvironmentVersion | None] = relationship(remote_side=[id])

    @property
    def ref(self) -> str:
        """The exact reference of this version, e.g. ``python3@1``."""
        return f"{self.environment.full_name}@{self.number}"


class Tag(Base):
    """A movable name over versions: ``python3:latest``."""

    __tablename__ = "environment_tags"
    __table_args__ = (UniqueConstraint("environment_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version_id: Mapped[int] = mapped_column(ForeignKey("environment_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    environment: Mapped[Environment] = relationship(back_populates="tags")
    version: Mapped[EnvironmentVersion] = relationship()
