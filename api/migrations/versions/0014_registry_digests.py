"""registry transfer: the manifest digest of a pushed version, and a runtime's transfer progress

Revision ID: 0014
Revises: 0010
Create Date: 2026-12-02 04:30:00

- ``environment_versions.registry_digest``: the digest of the manifest the registry holds for
  the version (``sha256:...``), set by its push; pulls ask for it by this digest, never by tag,
  and check what they got against it (R24). Null: never pushed.
- ``runtimes.progress``: bytes done and total of the upload or download the runtime's phase
  names (``uploading``, ``downloading``); null when none runs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("environment_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("registry_digest", sa.String(length=80), nullable=True))
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("progress", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.drop_column("progress")
    with op.batch_alter_table("environment_versions", schema=None) as batch_op:
        batch_op.drop_column("registry_digest")
