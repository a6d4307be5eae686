"""team secrets, and the secrets each runtime was given

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 04:40:00

- ``team_secrets``: a team's named secrets, each value encrypted with the installation's
  secrets key (a file apart from the database), with a version that grows on each change.
- ``runtime_secret_uses``: per runtime, the secrets its container got at its last boot
  (variable -> team, name, version) and, encrypted, every value it was given (what a save
  of it is searched for).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "team_secrets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("team_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_team_secrets_team_id_teams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_team_secrets")),
        sa.UniqueConstraint("team_id", "name", name=op.f("uq_team_secrets_team_id_name")),
    )
    op.create_index(op.f("ix_team_secrets_team_id"), "team_secrets", ["team_id"], unique=False)
    op.create_table(
        "runtime_secret_uses",
        sa.Column("runtime_id", sa.String(length=40), nullable=False),
        sa.Column("delivered", sa.JSON(), nullable=False),
        sa.Column("sealed_values", sa.LargeBinary(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["runtime_id"],
            ["runtimes.id"],
            name=op.f("fk_runtime_secret_uses_runtime_id_runtimes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("runtime_id", name=op.f("pk_runtime_secret_uses")),
    )


def downgrade() -> None:
    op.drop_table("runtime_secret_uses")
    op.drop_index(op.f("ix_team_secrets_team_id"), table_name="team_secrets")
    op.drop_table("team_secrets")
