"""What ``GET /pool`` shows of the warm pool (runner/runtimes/pool.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from envs.models import EnvironmentVersion
from runner.models import PoolEntry
from runner.runtimes.machines import get_machine_type
from runner.runtimes.pool import BOOTING, WAITING, Pool


def overview(pool: Pool) -> dict[str, Any]:
    """What ``GET /pool`` shows: the targets with how many wait and boot, the waiting and
    booting containers (never a claimed one), and the memory they reserve."""
    wanted = {(w.version_id, w.target.machine_type): w for w in pool.wanted()} if pool.enabled else {}
    with pool.records.db.session() as s:
        entries = list(
            s.scalars(
                select(PoolEntry)
                .where(PoolEntry.runner == pool.identity.name, PoolEntry.state.in_([BOOTING, WAITING]))
                .order_by(PoolEntry.created_at)
            )
        )
        versions = {
            v.id: v.ref
            for v in s.scalars(
                select(EnvironmentVersion).where(EnvironmentVersion.id.in_({e.version_id for e in entries}))
            )
        }
    targets = []
    for t in pool.targets:
        w = next((w for w in wanted.values() if w.target == t), None)
        mine = [
            e for e in entries if w is not None and (e.version_id, e.machine_type) == (w.version_id, t.machine_type)
        ]
        targets.append(
            {
                "environment": t.ref,
                "version": w.version if w is not None else None,
                "machine_type": t.machine_type,
                "count": t.count,
                "waiting": sum(1 for e in mine if e.state == WAITING),
                "booting": sum(1 for e in mine if e.state == BOOTING),
            }
        )
    return {
        "runner": pool.identity.name,
        "targets": targets,
        "entries": [
            {
                "id": e.id,
                "state": e.state,
                "environment": versions.get(e.version_id, ""),
                "machine_type": e.machine_type,
                "container": (e.backend_state or {}).get("container_name"),
                "boot_ms": e.boot_ms,
                "ready_at": e.ready_at,
            }
            for e in entries
        ],
        "memory_budget": pool.settings.runner_pool_memory,
        "memory_reserved": sum(
            get_machine_type(pool.settings, e.machine_type).memory
            for e in entries
            if e.machine_type in pool.settings.machine_types
        ),
    }
