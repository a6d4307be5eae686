"""What ``GET /pool`` shows of the warm pool (runner/runtimes/pool.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from envs.models import EnvironmentVersion
from registry import visibility
from runner.models import PoolEntry
from runner.runtimes.machines import get_machine_type
from runner.runtimes.pool import BOOTING, WAITING, Pool, Target
from runner.runtimes.pool_hot import why


def overview(pool: Pool, reader: visibility.Reader) -> dict[str, Any]:
    """What ``GET /pool`` shows: the targets (configured, then hot ones) with why each is pooled
    and how many wait and boot, the waiting and booting containers (never a claimed one), and
    the memory they reserve. A hot target comes from users' boots: one of a version ``reader``
    may not see (another team's, unpublished: ``registry/visibility.py``) is left out, and so
    are its containers (counted in ``hidden``, their memory still in ``memory_reserved``)."""
    with pool.records.db.session() as s:
        entries = list(
            s.scalars(
                select(PoolEntry)
                .where(PoolEntry.runner == pool.identity.name, PoolEntry.state.in_([BOOTING, WAITING]))
                .order_by(PoolEntry.created_at)
            )
        )
    wanted = pool.wanted(frozenset((e.version_id, e.machine_type) for e in entries)) if pool.enabled else []
    with pool.records.db.session() as s:
        rows = s.scalars(
            select(EnvironmentVersion).where(
                EnvironmentVersion.id.in_({e.version_id for e in entries} | {w.version_id for w in wanted})
            )
        ).all()
        versions = {v.id: v.ref for v in rows}
        seen = {v.id for v in rows if visibility.sees(s, v, reader)}
    configured = {(w.version_id, w.target.machine_type) for w in wanted if w.target.boots is None}
    hidden_keys = {
        (w.version_id, w.target.machine_type) for w in wanted if w.target.boots is not None and w.version_id not in seen
    }
    # an entry of neither (a hot one gone cold, about to go) is shown only to whom may see it
    shown = [
        e
        for e in entries
        if (e.version_id, e.machine_type) in configured
        or ((e.version_id, e.machine_type) not in hidden_keys and e.version_id in seen)
    ]
    targets: list[Target] = [*pool.targets, *(w.target for w in wanted if w.target.boots is not None)]
    out = []
    for t in targets:
        w = next((w for w in wanted if w.target == t), None)
        if w is not None and (w.version_id, t.machine_type) in hidden_keys:
            continue
        mine = [
            e for e in entries if w is not None and (e.version_id, e.machine_type) == (w.version_id, t.machine_type)
        ]
        out.append(
            {
                "environment": t.ref,
                "version": w.version if w is not None else None,
                "machine_type": t.machine_type,
                "count": t.count,
                "why": why(t.boots),
                "boots": t.boots,
                "waiting": sum(1 for e in mine if e.state == WAITING),
                "booting": sum(1 for e in mine if e.state == BOOTING),
            }
        )
    return {
        "runner": pool.identity.name,
        "targets": out,
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
            for e in shown
        ],
        "hidden": len(entries) - len(shown),
        "memory_budget": pool.settings.runner_pool_memory,
        "hot_budget": pool.hot_budget,
        "memory_reserved": sum(
            get_machine_type(pool.settings, e.machine_type).memory
            for e in entries
            if e.machine_type in pool.settings.machine_types
        ),
    }
