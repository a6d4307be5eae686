"""Versions to and from the registry: ``POST /environments/{ref}/push`` and ``/pull``.

Both answer 202 with an operation (``GET /operations/{id}``): its phase is ``uploading`` or
``downloading`` and its result holds bytes ``done`` and ``total`` while it runs; when it ends,
the version, its ``registry_digest`` and the bytes that travelled. A pull asks the registry for
the digest the catalog recorded, never a tag, and checks what it got (R24).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, CallerDep, Context, CtxDep
from api.schemas import OperationOut
from api.views import operation_out
from envs import service as envs_service
from envs.refs import parse_ref

router = APIRouter(tags=["environments"])


@router.post("/environments/{ref:path}/push", status_code=202, response_model=OperationOut)
async def push(ref: str, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Push the version ``ref`` names to the registry as the caller (members push their team's
    environments; others get 403 here, before the registry is asked). 409 ``no_registry`` when
    there is no registry."""
    await run_in_threadpool(_check_push, ctx, caller, ref)
    op = await run_in_threadpool(ctx.runner.transfers.request_push, caller.id, ref)
    return operation_out(op)


@router.post("/environments/{ref:path}/pull", status_code=202, response_model=OperationOut)
async def pull(ref: str, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Pull the version ``ref`` names from the registry by its recorded digest, so that runtimes
    boot from it without waiting (a boot pulls it too). Already here: the operation has
    ended. 409 ``not_pushed`` when it was never pushed."""
    op = await run_in_threadpool(ctx.runner.transfers.request_pull, caller.id, ref)
    return operation_out(op)


def _check_push(ctx: Context, caller: Caller, ref: str) -> None:
    """Only the environment's writers push its versions (a published version is read only)."""
    with ctx.db.session() as s:
        version = envs_service.resolve(s, parse_ref(ref, "ref"), "ref")
        writer = envs_service.Writer(caller.id, caller.is_admin, caller.teams)
        envs_service.check_write(version.environment, writer, "push its versions")
