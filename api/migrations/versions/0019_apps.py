"""apps: apps, app_deployments, app_instances

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 15:00:00

- ``apps``: a team's deployed notebooks (runner/apps/models.py), unique by (team, name).
- ``app_deployments``: numbered deployments of an app, with the bundle's id and digest and the
  spec (pinned version, machine type, variables, secret references, port).
- ``app_instances``: the runtimes serving a deployment and the address envctl proxies to.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "apps",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("team", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("access", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("next_number", sa.Integer(), nullable=False),
        sa.Column("current", sa.Integer(), nullable=False),
        sa.Column("stopped", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apps")),
        sa.UniqueConstraint("team", "name", name=op.f("uq_apps_team_name")),
    )
    op.create_index(op.f("ix_apps_team"), "apps", ["team"], unique=False)
    op.create_table(
        "app_deployments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("app_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("author_id", sa.String(length=40), nullable=False),
        sa.Column("author", sa.String(length=64), nullable=False),
        sa.Column("notebook", sa.String(length=255), nullable=False),
        sa.Column("notebook_sha256", sa.String(length=64), nullable=False),
        sa.Column("bundle_id", sa.String(length=40), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("bundle_size", sa.BigInteger(), nullable=False),
        sa.Column("environment_ref", sa.String(length=300), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("version_ref", sa.String(length=300), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("rollback_of", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("runner", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_app_deployments_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_deployments")),
        sa.UniqueConstraint("app_id", "number", name=op.f("uq_app_deployments_app_id_number")),
    )
    op.create_index(op.f("ix_app_deployments_app_id"), "app_deployments", ["app_id"], unique=False)
    op.create_index(op.f("ix_app_deployments_status"), "app_deployments", ["status"], unique=False)
    op.create_table(
        "app_instances",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("deployment_id", sa.String(length=40), nullable=False),
        sa.Column("app_id", sa.String(length=40), nullable=False),
        sa.Column("runtime_id", sa.String(length=40), nullable=True),
        sa.Column("runner", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["app_deployments.id"],
            name=op.f("fk_app_instances_deployment_id_app_deployments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_instances")),
    )
    op.create_index(op.f("ix_app_instances_app_id"), "app_instances", ["app_id"], unique=False)
    op.create_index(op.f("ix_app_instances_deployment_id"), "app_instances", ["deployment_id"], unique=False)
    op.create_index(op.f("ix_app_instances_runtime_id"), "app_instances", ["runtime_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_app_instances_runtime_id"), table_name="app_instances")
    op.drop_index(op.f("ix_app_instances_deployment_id"), table_name="app_instances")
    op.drop_index(op.f("ix_app_instances_app_id"), table_name="app_instances")
    op.drop_table("app_instances")
    op.drop_index(op.f("ix_app_deployments_status"), table_name="app_deployments")
    op.drop_index(op.f("ix_app_deployments_app_id"), table_name="app_deployments")
    op.drop_table("app_deployments")
    op.drop_index(op.f("ix_apps_team"), table_name="apps")
    op.drop_table("apps")
