"""ORM models of apps: an app, its numbered deployments, and the runtimes serving them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from envs.kit.clock import utcnow
from envs.kit.db import Base, UTCDateTime


class App(Base):
    """A team's app (``acme/sales``): who may open it (``team`` or ``public``), how many
    instances serve it, and which deployment is live (``current``; 0: none yet, or stopped)."""

    __tablename__ = "apps"
    __table_args__ = (UniqueConstraint("team", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))
    access: Mapped[str] = mapped_column(String(16), default="team")  # team | public
    instances: Mapped[int] = mapped_column(Integer, default=1)
    next_number: Mapped[int] = mapped_column(Integer, default=0)  # the last deployment number handed out
    current: Mapped[int] = mapped_column(Integer, default=0)  # the deployment serving (0: none)
    stopped: Mapped[bool] = mapped_column(default=False)  # stopped by hand: nothing serves until deployed again
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AppDeployment(Base):
    """Deployment ``number`` of an app: who, when, the notebook's digest, the bundle it came in
    (its id and the sha256 of its encrypted bytes in the object store) and the spec (the pinned
    environment version, machine type, variables, secret references (never values), port).

    ``status``: ``pending`` (waiting for an app server) → ``downloading`` → ``starting`` →
    ``running``, or ``failed`` (``message`` says why), and ``stopped`` once another deployment
    took over or the app was stopped."""

    __tablename__ = "app_deployments"
    __table_args__ = (UniqueConstraint("app_id", "number"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    app_id: Mapped[str] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    author_id: Mapped[str] = mapped_column(String(40))
    author: Mapped[str] = mapped_column(String(64))
    notebook: Mapped[str] = mapped_column(String(255))  # the notebook's file name in the bundle
    notebook_sha256: Mapped[str] = mapped_column(String(64))
    bundle_id: Mapped[str] = mapped_column(String(40))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    bundle_size: Mapped[int] = mapped_column(BigInteger)
    environment_ref: Mapped[str] = mapped_column(String(300))  # as asked for
    version_id: Mapped[int] = mapped_column(Integer)  # pinned: the version it resolved to
    version_ref: Mapped[str] = mapped_column(String(300))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # machine_type, port, env (references)
    rollback_of: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the deployment it deploys again
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    message: Mapped[str] = mapped_column(Text, default="")
    runner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the app server that took it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AppInstance(Base):
    """One runtime serving a deployment: its address while it answers, its restarts."""

    __tablename__ = "app_instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("app_deployments.id", ondelete="CASCADE"), index=True)
    app_id: Mapped[str] = mapped_column(String(40), index=True)
    runtime_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    runner: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="downloading")
    message: Mapped[str] = mapped_column(Text, default="")
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)  # host:port envctl proxies to
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
