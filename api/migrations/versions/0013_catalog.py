"""published versions and tags, and each team's events

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 04:30:00

- ``publications``: a version (``version_id``) or a tag (``tag``) of a team's environment that
  every team may read and import.
- ``team_events``: what changed in a team's environments, in order (``id`` only grows), for
  ``GET /teams/{team}/events``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "publications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("environment_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("tag", sa.String(length=128), nullable=True),
        sa.Column("published_by", sa.String(length=64), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_publications_environment_id_environments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["environment_versions.id"],
            name=op.f("fk_publications_version_id_environment_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_publications")),
    )
    op.create_index(op.f("ix_publications_environment_id"), "publications", ["environment_id"], unique=False)
    op.create_index(op.f("ix_publications_version_id"), "publications", ["version_id"], unique=False)
    op.create_table(
        "team_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("team", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("environment", sa.String(length=140), nullable=False),
        sa.Column("ref", sa.String(length=300), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_team_events")),
    )
    op.create_index(op.f("ix_team_events_team"), "team_events", ["team"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_team_events_team"), table_name="team_events")
    op.drop_table("team_events")
    op.drop_index(op.f("ix_publications_version_id"), table_name="publications")
    op.drop_index(op.f("ix_publications_environment_id"), table_name="publications")
    op.drop_table("publications")
