"""Operations: long work a 202 answer points at (saves now; pushes, pulls and builds later)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CallerDep, CtxDep
from api.schemas import OperationOut
from api.views import operation_out

router = APIRouter(tags=["operations"])


@router.get("/operations/{operation_id}", response_model=OperationOut)
def get_operation(
    operation_id: str,
    ctx: CtxDep,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=30, description="seconds to wait for it to finish")] = 0,
) -> OperationOut:
    return operation_out(ctx.runner.operations.wait(caller.viewer, operation_id, wait))
