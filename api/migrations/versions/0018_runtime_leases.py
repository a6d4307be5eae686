"""runtime leases: a runtime tied to its client's heartbeat

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 12:40:00

- ``runtimes.lease_seconds``, ``runtimes.lease_expires_at``, ``runtimes.lease_renewed_at``:
  the client's lease (runner/runtimes/leases.py); all null on every existing runtime (no lease,
  as before). ``lease_expires_at`` is indexed: housekeeping looks for leases that ran out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_seconds", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_renewed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_runtimes_lease_expires_at"), ["lease_expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runtimes_lease_expires_at"))
        batch_op.drop_column("lease_renewed_at")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_seconds")
