"""ORM models of runtimes and their runner log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from envs.kit.clock import utcnow
from envs.kit.db import Base, UTCDateTime
from envs.models import EnvironmentVersion


class Runtime(Base):
    """One container plus its agent, bound to one environment version, with settings.

    ``runner`` names the runner process that owns the runtime, so several runners can share
    one database. ``backend_state`` is what the backend needs to find the container again
    after a restart (its id); nothing else about the container is assumed. ``team`` (a team's
    name; None for a personal runtime) shares it with the team's members (who sees and acts on
    what: ``runner/runtimes/store.py``).
    """

    __tablename__ = "runtimes"
    # names: a personal runtime's unique among its owner's personal ones, a team runtime's
    # within its team (so ``TEAM/NAME`` and a bare ``NAME`` each name one runtime)
    __table_args__ = (
        UniqueConstraint("team", "name"),
        Index(
            "ix_runtimes_personal_name",
            "owner_id",
            "name",
            unique=True,
            sqlite_where=text("team IS NULL"),
            postgresql_where=text("team IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    team: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(16), default="native")
    kernel: Mapped[str | None] = mapped_column(String(64), nullable=True)  # jupyter kernelspec name
    language: Mapped[str] = mapped_column(String(16), default="python")
    environment_ref: Mapped[str] = mapped_column(String(300))  # as the user asked for it
    version_id: Mapped[int] = mapped_column(ForeignKey("environment_versions.id"), index=True)
    machine_type: Mapped[str] = mapped_column(String(64))
    idle_timeout: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="stopped", index=True)
    state_reason: Mapped[str] = mapped_column(String(64), default="created")
    state_message: Mapped[str] = mapped_column(Text, default="")
    phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    runner: Mapped[str] = mapped_column(String(128), index=True)
    backend: Mapped[str] = mapped_column(String(32), default="docker")
    backend_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_activity: Mapped[str] = mapped_column(String(200), default="")
    booted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The unsaved changes kept when the runtime stopped: an image on top of the version, and
    # the list of what it changed. The next boot starts from it (state "restoring").
    draft_image_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    draft_changes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # What the running container already differed by when it was last saved (path -> [kind,
    # size, mtime]): the runtime moved to the saved version, so those are no longer changes.
    change_baseline: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The last execution number handed out: the next cell takes next_seq + 1, counted in the
    # database (UPDATE ... RETURNING), so processes sharing the store never hand out one twice.
    next_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The runtime's own environment variables (name -> value), given to its container at boot
    # through Docker's API (never a shell), and settings changed while it ran that wait for the
    # next boot (field -> new value, runner/runtimes/reboot.py).
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict, server_default="{}")
    pending: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # the host's CUDA version mounted into a GPU runtime (runner/runtimes/machines.py); None: none
    cuda: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The runtime's mounts as checked (runner/mounts/validate.py), and what its current boot
    # mounted (the git commit, the S3 ETags: runner/mounts/prepare.py), copied onto each execution.
    mounts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, server_default="[]")
    mounts_used: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, server_default="[]")
    # bytes done and total of the download or upload ``phase`` names (a boot fetching mounts or
    # pulling its image, a save pushing): {"done": n, "total": m}; None when none runs
    progress: Mapped[dict[str, int] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # The client's lease (runner/runtimes/leases.py): its length in seconds, when it ends unless
    # renewed, and when it was last renewed (the client's last heartbeat); all None: no lease
    lease_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    lease_renewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    version: Mapped[EnvironmentVersion] = relationship()
    log: Mapped[list[RuntimeLogEntry]] = relationship(
        back_populates="runtime", cascade="all, delete-orphan", order_by="RuntimeLogEntry.id"
    )


class RuntimeLogEntry(Base):
    """One line of the runner log: a state change or a housekeeping event, with its reason."""

    __tablename__ = "runtime_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    runtime_id: Mapped[str] = mapped_column(ForeignKey("runtimes.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    event: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    runtime: Mapped[Runtime] = relationship(back_populates="log")


class Execution(Base):
    """One cell run in a runtime: code in, outputs out, a final status."""

    __tablename__ = "executions"
    __table_args__ = (UniqueConstraint("runtime_id", "seq"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    runtime_id: Mapped[str] = mapped_column(ForeignKey("runtimes.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)  # the runtime's owner
    team: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # the runtime's team
    # the user who submitted the cell (a member of the runtime's team, or envctl's work on behalf
    # of a user); None on rows from before revision 0016: the owner
    submitted_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    seq: Mapped[int] = mapped_column(Integer)  # order within the runtime
    language: Mapped[str] = mapped_column(String(16))
    code: Mapped[str] = mapped_column(Text)
    timeout: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    execution_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_count: Mapped[int] = mapped_column(Integer, default=0)
    output_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    error_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error_value: Mapped[str | None] = mapped_column(Text, nullable=True)
    # what the runtime's mounts held when the execution was queued (commit, ETags); None: no mounts
    mounts: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ExecutionOutput(Base):
    """One output of an execution, in Jupyter's shape; ``idx`` is its place in the stream."""

    __tablename__ = "execution_outputs"
    __table_args__ = (UniqueConstraint("execution_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    execution_id: Mapped[str] = mapped_column(ForeignKey("executions.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    output: Mapped[dict[str, Any]] = mapped_column(JSON)


class ResultFile(Base):
    """A version of a file a cell wrote under ``/results``, stored by content (sha256).

    No foreign key to the runtime: results outlive it; its owner and team are copied here.
    """

    __tablename__ = "result_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(40), index=True)
    team: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    runtime_id: Mapped[str] = mapped_column(String(40), index=True)
    execution_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Operation(Base):
    """Long work (a save, later push, pull, build) that a client polls: 202 answers point here."""

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    runtime_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    # the runner (envctl process) doing the work: after a crash it finds its unfinished ones
    runner: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | succeeded | failed
    phase: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # images a save made that no version records yet (removed if envctl dies before it does)
    pending_images: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Installation(Base):
    """The identity of one installation (one state store): made by the migration that added
    it, or on first start. Every container carries it, so two installations sharing a Docker
    engine never take each other's containers for their own."""

    __tablename__ = "installation"

    key: Mapped[str] = mapped_column(String(16), primary_key=True, default="this")  # one row
    id: Mapped[str] = mapped_column(String(40), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunnerRecord(Base):
    """A runner of the installation and its heartbeat: the proof that it is alive.

    ``instance`` names the process holding the name now: a second process that asks for a name
    a live one holds is refused; one that finds the holder dead (no heartbeat for
    ``runner_stale_after``, or its process gone on this host) takes the name over.
    ``stopped_at`` is set by a clean shutdown, so others need not wait for the beat to go stale.
    """

    __tablename__ = "runners"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    instance: Mapped[str] = mapped_column(String(40))
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    backend: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PoolEntry(Base):
    """A container of the warm pool (runner/runtimes/pool.py): booted ahead, pristine, claimed once.

    ``state``: ``booting`` -> ``waiting`` -> ``claimed`` (by ``runtime_id``, in one
    compare-and-set: R41). A claimed entry stays until its container is gone, so that
    reconciliation knows which runtime the container (named and labelled after the entry's id)
    belongs to. ``version_id`` is no foreign key: deleting a version removes its waiting
    containers instead of being refused.
    """

    __tablename__ = "pool_entries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    runner: Mapped[str] = mapped_column(String(128), index=True)
    version_id: Mapped[int] = mapped_column(Integer, index=True)
    machine_type: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    backend_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    runtime_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    boot_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
