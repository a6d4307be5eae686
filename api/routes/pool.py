"""The warm pool (runner/runtimes/pool.py): what it keeps waiting, and what waits now."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, CtxDep
from api.schemas import PoolOut
from runner.runtimes.pool_overview import overview

router = APIRouter(tags=["pool"])


@router.get("/pool", response_model=PoolOut)
def pool(ctx: CtxDep, caller: CallerDep) -> PoolOut:
    """This runner's warm pool: its targets (``ENVCTL_RUNNER_POOL``, then, in hot mode, the
    versions booted most in the last hour) with why each is pooled and how many containers wait
    and boot for it, the waiting and booting containers (never a claimed one: that is a user's
    runtime now), and the memory they reserve against the budgets. Hot versions the caller may
    not see are left out."""
    return PoolOut.model_validate(overview(ctx.runner.pool, caller.reader))
