"""Versions to and from the registry: ``POST /environments/{ref}/push`` and ``/pull``.

``POST /environments/import-remote`` imports a version from another envctl server's registry.
All answer 202 with an operation (``GET /operations/{id}``): its phase is ``uploading`` or
``downloading`` and its result holds bytes ``done`` and ``total`` while it runs; when it ends,
the version, its ``registry_digest`` and the bytes that travelled. A pull asks the registry for
the digest the catalog recorded, never a tag, and checks what it got (R24).
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, CallerDep, Context, CtxDep
from api.schemas import OperationOut
from api.views import operation_out
from envs import service as envs_service
from registry import visibility

router = APIRouter(tags=["environments"])


class ImportRemote(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", max_length=2000, description="the URL of the envctl server that holds the version")
    ref: str = Field(max_length=300, description="the version there: acme/ml@3, acme/ml:stable, acme/ml")
    token: str = Field(min_length=1, max_length=500, description="your API token on that server (used, not kept)")
    name: str | None = Field(
        default=None, max_length=300, description="the environment here it becomes a version of (default: its name)"
    )


@router.post("/environments/import-remote", status_code=202, response_model=OperationOut)
async def import_remote(body: ImportRemote, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Import a version that another envctl server holds in its registry: read it from that
    server's API with ``token``, pull it from its registry by the digest its catalog recorded
    (operation phase ``downloading`` with bytes ``done`` and ``total``), check it (R24), and
    record it here with where it came from. 409 ``upstream_refused`` when that server refuses
    (a wrong token, an unknown or unpublished version), ``not_pushed`` when it never reached
    that server's registry; 403 when the caller may not write the environment here."""
    op = await run_in_threadpool(ctx.runner.imports.request, caller.viewer, body.from_, body.token, body.ref, body.name)
    return operation_out(op)


@router.post("/environments/{ref:path}/push", status_code=202, response_model=OperationOut)
async def push(ref: str, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Push the version ``ref`` names to the registry as the caller (members push their team's
    environments; others get 403 here, before the registry is asked). 409 ``no_registry`` when
    there is no registry."""
    await run_in_threadpool(_check_push, ctx, caller, ref)
    op = await run_in_threadpool(ctx.runner.transfers.request_push, caller.viewer, ref)
    return operation_out(op)


@router.post("/environments/{ref:path}/pull", status_code=202, response_model=OperationOut)
async def pull(ref: str, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Pull the version ``ref`` names from the registry by its recorded digest, so that runtimes
    boot from it without waiting (a boot pulls it too). Already here: the operation has
    ended. 409 ``not_pushed`` when it was never pushed."""
    op = await run_in_threadpool(ctx.runner.transfers.request_pull, caller.viewer, ref)
    return operation_out(op)


def _check_push(ctx: Context, caller: Caller, ref: str) -> None:
    """Only the environment's writers push its versions (a published version is read only)."""
    with ctx.db.session() as s:
        version = visibility.resolve(s, ref, caller.reader, "ref")
        writer = envs_service.Writer(caller.id, caller.is_admin, caller.teams)
        envs_service.check_write(version.environment, writer, "push its versions")
