"""the warm pool: pool_entries

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 05:40:00

- ``pool_entries``: containers of the warm pool (runner/pool.py), booted ahead and claimed
  once by a runtime in a compare-and-set on ``state``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pool_entries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("runner", sa.String(length=128), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("machine_type", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("backend_state", sa.JSON(), nullable=False),
        sa.Column("runtime_id", sa.String(length=40), nullable=True),
        sa.Column("boot_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pool_entries")),
    )
    op.create_index(op.f("ix_pool_entries_runner"), "pool_entries", ["runner"], unique=False)
    op.create_index(op.f("ix_pool_entries_state"), "pool_entries", ["state"], unique=False)
    op.create_index(op.f("ix_pool_entries_version_id"), "pool_entries", ["version_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_pool_entries_version_id"), table_name="pool_entries")
    op.drop_index(op.f("ix_pool_entries_state"), table_name="pool_entries")
    op.drop_index(op.f("ix_pool_entries_runner"), table_name="pool_entries")
    op.drop_table("pool_entries")
