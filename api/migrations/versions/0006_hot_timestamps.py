"""SQLite: timestamps written by the cell hot path in Core's format

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 18:15:00

Until this revision the hot path (``Database.hot``) stored the timestamps of executions and
a runtime's last activity in SQLite as Python's ``str(datetime)`` ("... 18:06:44.759938+00:00",
or without the fraction when it is zero) instead of SQLAlchemy's DATETIME text
("... 18:06:44.759938"). Both read back as the same time, but SQLite compares text: such a
value never equals the same time bound by Core, so a compare-and-set on it (the idle stop's
"only while the last activity is the one decided on") never matched. This rewrites them in
Core's format. PostgreSQL stored real timestamps all along: nothing to do there.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = {
    "executions": ("created_at", "started_at", "finished_at"),
    "runtimes": ("last_activity_at",),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, columns in COLUMNS.items():
        for column in columns:
            # "YYYY-MM-DD HH:MM:SS+00:00" (25) or "YYYY-MM-DD HH:MM:SS.ffffff+00:00" (32)
            op.execute(
                f"UPDATE {table} SET {column} = CASE WHEN length({column}) = 25 "
                f"THEN substr({column}, 1, 19) || '.000000' ELSE substr({column}, 1, 26) END "
                f"WHERE {column} LIKE '%+00:00'"
            )


def downgrade() -> None:
    pass  # the old code reads Core's format as well
