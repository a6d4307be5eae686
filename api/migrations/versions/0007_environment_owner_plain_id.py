"""environments: owner_id is a plain user id, no longer a foreign key to users

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:00:00

Users are the registry's table and ``envs`` sits below ``registry``: the environments table no
longer refers to it. User ids are random and never reused, so an environment whose owner is
gone matches no writer and is left to the admins, as the ``SET NULL`` of 0005 did. The column,
its index and its values stay as they are.

Downgrading puts the foreign key back; owner ids that name no user by then become NULL first
(no owner: admins only, which is how they were already treated), or the key could not be made.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

FK = "fk_environments_owner_id_users"


def upgrade() -> None:
    with op.batch_alter_table("environments", schema=None) as batch_op:
        batch_op.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    environments = sa.table("environments", sa.column("owner_id", sa.String))
    users = sa.table("users", sa.column("id", sa.String))
    op.execute(
        environments.update()
        .where(environments.c.owner_id.is_not(None), environments.c.owner_id.not_in(sa.select(users.c.id)))
        .values(owner_id=None)
    )
    with op.batch_alter_table("environments", schema=None) as batch_op:
        batch_op.create_foreign_key(FK, "users", ["owner_id"], ["id"], ondelete="SET NULL")
