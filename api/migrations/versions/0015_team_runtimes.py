"""team runtimes: a runtime, its executions and results shared with a team

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 07:45:00

- ``runtimes.team``: the name of the team the runtime belongs to (null: personal, as before).
  Names: a team runtime's are unique within its team (``uq_runtimes_team_name``; null teams
  never clash), a personal runtime's among its owner's personal ones (the partial unique index
  ``ix_runtimes_personal_name`` takes the place of ``uq_runtimes_owner_id_name``), so an owner
  may have ``demo`` and ``acme``'s ``demo``.
- ``executions.team``, ``result_files.team``: the runtime's team, copied when the cell is
  queued and its results recorded, so both follow the runtime's visibility and outlive it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_runtimes_team"), ["team"], unique=False)
        batch_op.create_unique_constraint(batch_op.f("uq_runtimes_team_name"), ["team", "name"])
        batch_op.drop_constraint(batch_op.f("uq_runtimes_owner_id_name"), type_="unique")
    op.create_index(
        "ix_runtimes_personal_name",
        "runtimes",
        ["owner_id", "name"],
        unique=True,
        sqlite_where=sa.text("team IS NULL"),
        postgresql_where=sa.text("team IS NULL"),
    )
    for table in ("executions", "result_files"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("team", sa.String(length=64), nullable=True))
            batch_op.create_index(batch_op.f(f"ix_{table}_team"), ["team"], unique=False)


def downgrade() -> None:
    for table in ("result_files", "executions"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_team"))
            batch_op.drop_column("team")
    op.drop_index("ix_runtimes_personal_name", table_name="runtimes")
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f("uq_runtimes_owner_id_name"), ["owner_id", "name"])
        batch_op.drop_constraint(batch_op.f("uq_runtimes_team_name"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_runtimes_team"))
        batch_op.drop_column("team")
