"""registry transfer: the manifest digest of a pushed version

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 04:30:00

- ``environment_versions.registry_digest``: the digest of the manifest the registry holds for
  the version (``sha256:...``), set by its push; pulls ask for it by this digest, never by tag,
  and check what they got against it (R24). Null: never pushed.
  (``runtimes.progress``, which a push or pull also fills, came with 0012.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("environment_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("registry_digest", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("environment_versions", schema=None) as batch_op:
        batch_op.drop_column("registry_digest")
