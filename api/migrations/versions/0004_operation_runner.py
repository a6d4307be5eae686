"""operations: the runner that runs them, and images made but not yet recorded

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 15:30:00

An operation interrupted by a crash of envctl is found by the runner that ran it when it starts
again (``runner``); a save's snapshot images that were made but not yet recorded as a version
(``pending_images``) are removed then, or, if the version was recorded, the save is marked done.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("pending_images", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.create_index(batch_op.f("ix_operations_runner"), ["runner"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_runner"))
        batch_op.drop_column("pending_images")
        batch_op.drop_column("runner")
