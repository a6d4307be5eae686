"""runtime settings: environment variables and changes waiting for the next boot

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-02 01:00:00

- ``runtimes.env``: the runtime's own environment variables (name -> value), handed to its
  container at boot.
- ``runtimes.cuda``: the host CUDA version a GPU runtime has mounted (null: none).
- ``runtimes.pending``: settings changed while the runtime ran, applied by its next boot
  (field -> new value; empty when nothing waits).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("env", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("pending", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("cuda", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.drop_column("cuda")
        batch_op.drop_column("pending")
        batch_op.drop_column("env")
