from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, CtxDep
from api.schemas import MachineTypeOut
from api.views import machine_type_out
from runner.machines import list_machine_types

router = APIRouter(tags=["machine types"])


@router.get("/machine-types", response_model=list[MachineTypeOut])
def machine_types(ctx: CtxDep, _caller: CallerDep) -> list[MachineTypeOut]:
    """The sizes a runtime can be given (from configuration)."""
    return [machine_type_out(m) for m in list_machine_types(ctx.settings)]
