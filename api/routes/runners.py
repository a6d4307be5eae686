"""Runners: the runner processes of this installation and whether each is alive."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, CtxDep
from api.schemas import RunnerOut

router = APIRouter(tags=["runners"])


@router.get("/runners", response_model=list[RunnerOut])
def list_runners(ctx: CtxDep, caller: CallerDep) -> list[RunnerOut]:
    """Every runner that has served this installation's database, with its heartbeat. A
    runner that stopped beating has its runtimes shown as unreachable, never deleted."""
    del caller  # any signed-in user may see which runners there are
    return [
        RunnerOut(
            name=r.name,
            alive=r.alive,
            heartbeat_at=r.heartbeat_at,
            reason=r.reason,
            this_server=r.name == ctx.runner.runner,
        )
        for r in ctx.runner.runners()
    ]
