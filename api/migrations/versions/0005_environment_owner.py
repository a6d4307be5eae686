"""environments: the user who owns each one

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 10:00:00

Whoever creates an environment (its first save, build or load) owns it: only they and admins
may add versions to it or delete them. Environments made before this revision, and base
images, keep ``owner_id`` NULL: no owner, so only admins may change them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("environments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f("ix_environments_owner_id"), ["owner_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_environments_owner_id_users"), "users", ["owner_id"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("environments", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_environments_owner_id_users"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_environments_owner_id"))
        batch_op.drop_column("owner_id")
