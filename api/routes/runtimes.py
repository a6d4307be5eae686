from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from starlette.concurrency import run_in_threadpool

from api.cells import MAX_WAIT, run_cell
from api.deps import CallerDep, CtxDep
from api.schemas import (
    ChangeOut,
    EnvVarOut,
    LeaseOut,
    LogEntryOut,
    OperationOut,
    RuntimeCreate,
    RuntimeCreatedOut,
    RuntimeEnvOut,
    RuntimeOut,
    RuntimePatch,
    SaveRequest,
    SecretRef,
)
from api.views import log_entry_out, operation_out, runtime_out, runtimes_out
from envs.kit.errors import InvalidInputError
from runner.runtimes.states import State
from runner.service import RuntimeChanges

router = APIRouter(prefix="/runtimes", tags=["runtimes"])

ID_PATH = {"max_length": 64}
CELL_MAX_WAIT = MAX_WAIT  # as POST /runtimes/{id}/executions


def _env(env: Mapping[str, str | SecretRef | None]) -> dict[str, Any]:
    """Variables as the runner takes them: secret references as plain maps."""
    return {k: v.model_dump(exclude_none=True) if isinstance(v, SecretRef) else v for k, v in env.items()}


CellWait = Annotated[
    float,
    Query(
        ge=0,
        le=CELL_MAX_WAIT,
        description="with a `cell`: seconds to wait for it to finish (0 answers at once, the cell queued)",
    ),
]


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=RuntimeCreatedOut, response_model_exclude_unset=True
)
async def create_runtime(body: RuntimeCreate, ctx: CtxDep, caller: CallerDep, wait: CellWait = 0) -> RuntimeCreatedOut:
    """Create a runtime, stopped, pinned to the exact version ``environment`` means now.
    Another team's environment is a 404 naming ``environment`` unless what it names is
    published (``registry/visibility.py``). With ``team`` (a team of the caller's; another is
    a 404) its members see and use it too; its name is then unique within the team (409).

    With ``cell`` (create-and-run) the cell is submitted at once, as ``POST
    /runtimes/{id}/executions`` would (the runtime boots for it, from the warm pool when one
    fits); with ``?wait=`` the answer comes when the cell has finished (or after ``wait``
    seconds) and carries it as ``execution``: an editor opening a notebook makes one request."""

    def create() -> Any:
        if body.attach is not None:
            if body.environment is not None or body.env or body.mounts or body.cuda:
                raise InvalidInputError(
                    "attach: an attached runtime runs in its container as it is; leave out environment, env, "
                    "mounts and cuda",
                    field="attach",
                )
            return ctx.runner.create_attached(
                caller.viewer, name=body.name, container=body.attach.container, team=body.team, lease=body.lease
            )
        if body.environment is None:
            raise InvalidInputError("environment: required (or attach a container with `attach`)", field="environment")
        return ctx.runner.create(
            caller.viewer,
            name=body.name,
            environment=body.environment,
            language=body.language,
            machine_type=body.machine_type,
            idle_timeout=body.idle_timeout,
            type=body.type,
            kernel=body.kernel,
            env=_env(body.env),
            cuda=body.cuda,
            mounts=body.mounts,
            team=body.team,
            lease=body.lease,
        )

    rt = await run_in_threadpool(create)
    if body.cell is None:
        return RuntimeCreatedOut(**(await run_in_threadpool(runtime_out, ctx.runner, rt)).model_dump())
    execution = await run_cell(ctx, caller, rt.id, body.cell, wait)
    shown = await run_in_threadpool(lambda: runtime_out(ctx.runner, ctx.runner.get(caller.viewer, rt.id)))
    return RuntimeCreatedOut(**shown.model_dump(), execution=execution)


@router.get("", response_model=list[RuntimeOut])
def list_runtimes(ctx: CtxDep, caller: CallerDep) -> list[RuntimeOut]:
    return runtimes_out(ctx.runner, ctx.runner.list(caller.viewer))


@router.get("/{runtime_id}", response_model=RuntimeOut)
def get_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> RuntimeOut:
    return runtime_out(ctx.runner, ctx.runner.get(caller.viewer, runtime_id), look=True)


Apply = Annotated[
    Literal["now", "next-boot"],
    Query(description="next-boot: while the runtime runs, keep changes that need a reboot for its next boot"),
]


@router.patch("/{runtime_id}", response_model=RuntimeOut)
def patch_runtime(
    runtime_id: str, body: RuntimePatch, ctx: CtxDep, caller: CallerDep, apply: Apply = "now"
) -> RuntimeOut:
    """Change settings. Name, language and idle timeout apply at once. Environment, type,
    env and machine type need a reboot: while the runtime runs they are a 409 naming them,
    unless asked for the next boot (``?apply=next-boot`` or ``next_boot``); then ``pending``
    shows them until the next boot applies them."""
    sent = body.model_fields_set
    changes = RuntimeChanges(
        name=body.name,
        language=body.language,
        machine_type=body.machine_type,
        environment=body.environment,
        idle_timeout=body.idle_timeout,
        clear_idle_timeout="idle_timeout" in sent and body.idle_timeout is None,
        type=body.type,
        kernel=body.kernel,
        env=_env(body.env or {}),
        cuda=body.cuda,
        clear_cuda="cuda" in sent and body.cuda is None,
        mounts=body.mounts,
        next_boot=body.next_boot or apply == "next-boot",
        lease=body.lease,
        clear_lease="lease" in sent and body.lease is None,
    )
    return runtime_out(ctx.runner, ctx.runner.update(caller.viewer, runtime_id, changes))


@router.post("/{runtime_id}/lease", response_model=LeaseOut)
def renew_lease(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> LeaseOut:
    """The client's heartbeat: the runtime's lease ends its length from now again. Renew at
    least every lease length (``envctl run`` does every third of it); once it ran out the
    runtime is being stopped and deleted, and this is a 409 (``lease_expired``). A running cell
    does not keep a lease runtime: only its client does. 409 too when the runtime has no lease."""
    rt = runtime_out(ctx.runner, ctx.runner.renew_lease(caller.viewer, runtime_id))
    assert rt.lease is not None
    return rt.lease


@router.get("/{runtime_id}/env", response_model=RuntimeEnvOut, response_model_exclude_unset=True)
def runtime_env(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> RuntimeEnvOut:
    """The environment variables a cell sees: the runtime's own (``set here``) and those of its
    environment's image (``inherited``); the runtime's own win."""
    rt = ctx.runner.get(caller.viewer, runtime_id)
    variables, pending = ctx.runner.env_of(caller.viewer, runtime_id)
    return RuntimeEnvOut(
        runtime_id=rt.id,
        environment=rt.version.ref,
        variables=[
            EnvVarOut(
                name=v.name,
                value=v.value,
                source=v.source,  # type: ignore[arg-type]
                overrides=v.overrides,
                **({"secret": v.secret} if v.secret else {}),
                **({"image_value": v.image_value} if v.image_value is not None else {}),
            )
            for v in variables
        ],
        pending=pending,
    )


@router.delete("/{runtime_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> Response:
    """Stop the runtime if it runs, then delete it."""
    ctx.runner.delete(caller.viewer, runtime_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


MAX_WAIT = 60.0
Wait = Annotated[
    float,
    Query(ge=0, le=MAX_WAIT, description="seconds to wait for the runtime to get there; 0 answers at once"),
]
SETTLED_AFTER_START = {State.RUNNING, State.ERROR, State.STOPPED}
SETTLED_AFTER_STOP = {State.STOPPED, State.ERROR}


@router.post("/{runtime_id}/start", status_code=status.HTTP_202_ACCEPTED, response_model=RuntimeOut)
def start_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep, wait: Wait = 0) -> RuntimeOut:
    """Boot the runtime; answers at once (``booting``), or with ``wait`` as soon as it is
    running (or failed), or after ``wait`` seconds. Follow ``GET /runtimes/{id}`` or its log."""
    rt = ctx.runner.start(caller.viewer, runtime_id)
    if wait:
        rt = ctx.runner.await_state(caller.viewer, runtime_id, SETTLED_AFTER_START, wait)
    return runtime_out(ctx.runner, rt)


@router.post("/{runtime_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=RuntimeOut)
def stop_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep, wait: Wait = 0) -> RuntimeOut:
    """Stop the runtime, keeping its unsaved changes as a draft; answers at once
    (``stopping``), or with ``wait`` as soon as it is stopped, or after ``wait`` seconds."""
    rt = ctx.runner.stop(caller.viewer, runtime_id)
    if wait:
        rt = ctx.runner.await_state(caller.viewer, runtime_id, SETTLED_AFTER_STOP, wait)
    return runtime_out(ctx.runner, rt)


@router.get("/{runtime_id}/log", response_model=list[LogEntryOut])
def runtime_log(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[LogEntryOut]:
    """The runner log: every state change and housekeeping step, with its reason."""
    return [log_entry_out(e) for e in ctx.runner.log_entries(caller.viewer, runtime_id)]


@router.post("/{runtime_id}/reset", status_code=status.HTTP_202_ACCEPTED, response_model=RuntimeOut)
def reset_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> RuntimeOut:
    """Throw away the unsaved changes (and the draft) and boot from the version again."""
    return runtime_out(ctx.runner, ctx.runner.reset(caller.viewer, runtime_id))


@router.get("/{runtime_id}/changes", response_model=list[ChangeOut], response_model_exclude_unset=True)
def runtime_changes(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[ChangeOut]:
    """Paths added, changed and deleted since the version the runtime booted from (its draft
    included), with sizes; mounts, /results and envctl's own files are left out. ``cache``
    (only on such paths) names the cache directory of a path a save would leave out."""
    return [
        ChangeOut(kind=c.kind, path=c.path, size=c.size, **({"cache": c.cache} if c.cache else {}))  # type: ignore[arg-type]
        for c in ctx.runner.changes_of(caller.viewer, runtime_id)
    ]


@router.post("/{runtime_id}/save", status_code=status.HTTP_202_ACCEPTED, response_model=OperationOut)
def save_runtime(
    runtime_id: str,
    body: SaveRequest,
    ctx: CtxDep,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=30, description="seconds to wait for the save to end")] = 0,
) -> OperationOut:
    """Save the runtime's filesystem as the next version of ``environment``. Answers with an
    operation: at once, or with ``wait`` as soon as it ended (or after ``wait`` seconds, still
    running); poll ``GET /operations/{id}`` (``?wait=`` seconds) for the new version.
    Package caches are left out unless ``keep_caches``; a layer holding secrets fails the
    operation with ``save_has_secrets`` naming each path, unless it is in ``allow_secrets``."""
    op = ctx.runner.snapshots.save(
        caller.viewer,
        caller.name,
        runtime_id,
        environment=body.environment,
        message=body.message,
        tag=body.tag,
        keep_caches=body.keep_caches,
        allow_secrets=body.allow_secrets,
        attached_save=body.attached_save,
    )
    if wait:
        op = ctx.runner.operations.wait(caller.viewer, op.id, wait)
    return operation_out(op)
