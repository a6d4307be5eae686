from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, CtxDep
from api.schemas import CudaOut, MachineTypeOut
from api.views import machine_type_out
from runner.backends.base import CUDA_MOUNT
from runner.runtimes.machines import cuda_versions, list_machine_types

router = APIRouter(tags=["machine types"])


@router.get("/machine-types", response_model=list[MachineTypeOut])
def machine_types(ctx: CtxDep, _caller: CallerDep) -> list[MachineTypeOut]:
    """The sizes a runtime can be given (from configuration)."""
    return [machine_type_out(m) for m in list_machine_types(ctx.settings)]


@router.get("/machine-types/cuda", response_model=CudaOut)
def cuda(ctx: CtxDep, _caller: CallerDep) -> CudaOut:
    """The host CUDA versions a GPU runtime may have mounted (its ``cuda`` setting): the
    ``cuda-<version>`` folders of the CUDA root."""
    return CudaOut(root=str(ctx.settings.runner_cuda_root), versions=cuda_versions(ctx.settings), mount=CUDA_MOUNT)
