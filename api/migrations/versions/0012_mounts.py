"""runtime mounts: git repositories, S3 prefixes and named volumes at target directories

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 04:40:00

- ``runtimes.mounts``: the runtime's mounts as checked (runner/mounts/validate.py);
- ``runtimes.mounts_used``: what its current boot mounted (git commit, S3 ETags);
- ``runtimes.progress``: bytes done and to fetch while a boot downloads its mounts;
- ``executions.mounts``: the same, copied onto each execution when it is queued.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mounts", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("mounts_used", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("progress", sa.JSON(), nullable=True))
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mounts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_column("mounts")
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.drop_column("progress")
        batch_op.drop_column("mounts_used")
        batch_op.drop_column("mounts")
