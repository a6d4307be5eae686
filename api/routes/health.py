from __future__ import annotations

from fastapi import APIRouter

from api.deps import CtxDep
from api.schemas import HealthOut
from envs.kit.errors import EnvctlError

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut)
def health(ctx: CtxDep) -> HealthOut:
    """Liveness of the server, with the state of the database and the container backend."""
    database = backend = "ok"
    try:
        ctx.db.ping()
    except EnvctlError as exc:
        database = exc.message
    except Exception as exc:  # health must answer whatever is wrong
        database = f"error: {type(exc).__name__}"
    try:
        ctx.runner.backend.ping()
    except EnvctlError as exc:
        backend = exc.message
    ok = database == "ok" and backend == "ok"
    return HealthOut(status="ok" if ok else "degraded", database=database, backend=backend, runner=ctx.runner.runner)
