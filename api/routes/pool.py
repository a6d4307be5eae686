"""The warm pool (runner/runtimes/pool.py): what it keeps waiting, and what waits now."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, CtxDep
from api.schemas import PoolOut
from runner.runtimes.pool_overview import overview

router = APIRouter(tags=["pool"])


@router.get("/pool", response_model=PoolOut)
def pool(ctx: CtxDep, _caller: CallerDep) -> PoolOut:
    """This runner's warm pool: its targets (``ENVCTL_RUNNER_POOL``) with how many containers
    wait and boot for each, the waiting and booting containers (never a claimed one: that is
    a user's runtime now), and the memory they reserve against the budget."""
    return PoolOut.model_validate(overview(ctx.runner.pool))
