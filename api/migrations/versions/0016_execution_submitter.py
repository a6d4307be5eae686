"""who ran a cell: executions.submitted_by

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 08:30:00

- ``executions.submitted_by``: the user who submitted the cell (for a team runtime, any member
  of its team); ``owner_id`` stays the runtime's owner, which carries visibility. Rows from
  before this revision keep null, read as "the owner".
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("submitted_by", sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_executions_submitted_by_users"), "users", ["submitted_by"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_executions_submitted_by_users"), type_="foreignkey")
        batch_op.drop_column("submitted_by")
