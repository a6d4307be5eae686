"""``GET /environments/{ref}/kernelspecs``: which Jupyter kernels an environment provides."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, CtxDep
from api.schemas import KernelspecOut, KernelspecsOut
from runner.runtimes.kernelspecs import find_kernelspecs

router = APIRouter(tags=["environments"])


@router.get("/environments/{ref:path}/kernelspecs", response_model=KernelspecsOut)
def list_kernelspecs(ref: str, ctx: CtxDep, caller: CallerDep) -> KernelspecsOut:
    """The Jupyter kernelspecs installed in the image of the version ``ref`` means (name,
    display name, language), from the ``kernel.json`` files under Jupyter's standard data
    paths, read without running the image. A notebook whose ``metadata.kernelspec.name`` is
    among them runs with the ``jupyter`` runtime type and that kernel. 409 when the engine no
    longer has the version's image."""
    found = find_kernelspecs(ctx.db, ctx.runner.backend, ref, caller.reader)
    return KernelspecsOut(ref=found.ref, kernelspecs=[KernelspecOut(**k) for k in found.kernelspecs])
