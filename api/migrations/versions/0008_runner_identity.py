"""the installation's identity, runners with heartbeats, execution numbers counted in the store

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 22:00:00

- ``installation``: one row, the installation's id (made here, random). Every container carries
  it; reconciliation touches only containers of its own installation and runner.
- ``runners``: each runner's name, the process holding it, and its heartbeat. Several servers on
  one database show every runtime with its owner and whether that owner is alive.
- ``runtimes.next_seq``: the last execution number handed out, so that processes sharing the
  store never hand out one twice (filled from the executions already there).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    installation = op.create_table(
        "installation",
        sa.Column("key", sa.String(length=16), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_installation")),
        sa.UniqueConstraint("id", name=op.f("uq_installation_id")),
    )
    op.bulk_insert(
        installation,
        [{"key": "this", "id": "in_" + uuid.uuid4().hex[:20], "created_at": datetime.now(UTC)}],
    )
    op.create_table(
        "runners",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("instance", sa.String(length=40), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_runners")),
    )
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_seq", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE runtimes SET next_seq = COALESCE("
        "(SELECT MAX(executions.seq) FROM executions WHERE executions.runtime_id = runtimes.id), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.drop_column("next_seq")
    op.drop_table("runners")
    op.drop_table("installation")
