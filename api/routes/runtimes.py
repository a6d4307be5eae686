from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response, status

from api.deps import CallerDep, CtxDep
from api.schemas import (
    ChangeOut,
    EnvVarOut,
    IdleOut,
    LogEntryOut,
    OperationOut,
    RuntimeCreate,
    RuntimeEnvOut,
    RuntimeOut,
    RuntimePatch,
    SaveRequest,
)
from api.views import operation_out
from runner.models import Runtime
from runner.service import RunnerService, RuntimeChanges, RuntimeStatus
from runner.settings import pending_view
from runner.states import State

router = APIRouter(prefix="/runtimes", tags=["runtimes"])

ID_PATH = {"max_length": 64}


def runtime_out(runner: RunnerService, rt: Runtime, *, look: bool = False) -> RuntimeOut:
    return runtimes_out(runner, [rt], look=look)[0]


def runtimes_out(runner: RunnerService, rts: list[Runtime], *, look: bool = False) -> list[RuntimeOut]:
    """The runtimes as the API shows them, with what the runner knows beside their rows."""
    return [_out(rt, st) for rt, st in zip(rts, runner.status_of(rts, look=look), strict=True)]


def _out(rt: Runtime, st: RuntimeStatus) -> RuntimeOut:
    decision = st.idle
    idle = None
    if decision is not None:
        idle = IdleOut(
            timeout=st.idle_timeout,
            shutdown_at=decision.shutdown_at,
            reason=decision.reason,
            last_activity_at=rt.last_activity_at,
            last_activity=rt.last_activity,
        )
    state = State(rt.state)
    return RuntimeOut(
        id=rt.id,
        name=rt.name,
        type=rt.type,
        kernel=rt.kernel,
        language=rt.language,
        environment=rt.version.ref,
        environment_ref=rt.environment_ref,
        environment_digest=rt.version.digest,
        state=state.value,
        state_color=state.color,
        state_reason=rt.state_reason,
        state_message=rt.state_message,
        phase="saving" if st.saving and not rt.phase else rt.phase,
        busy=st.busy,
        saving=st.saving,
        unsaved_changes=st.unsaved_changes,
        idle_shutdown_at=decision.shutdown_at if decision else None,
        idle=idle,
        machine_type=rt.machine_type,
        idle_timeout=rt.idle_timeout,
        env=dict(rt.env or {}),
        cuda=rt.cuda,
        pending=pending_view(rt),
        runner=rt.runner,
        runner_alive=st.runner_alive,
        unreachable=st.unreachable,
        booted_at=rt.booted_at,
        created_at=rt.created_at,
        updated_at=rt.updated_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RuntimeOut)
def create_runtime(body: RuntimeCreate, ctx: CtxDep, caller: CallerDep) -> RuntimeOut:
    """Create a runtime, stopped, pinned to the exact version ``environment`` means now."""
    rt = ctx.runner.create(
        caller.id,
        name=body.name,
        environment=body.environment,
        language=body.language,
        machine_type=body.machine_type,
        idle_timeout=body.idle_timeout,
        type=body.type,
        kernel=body.kernel,
        env=body.env,
        cuda=body.cuda,
    )
    return runtime_out(ctx.runner, rt)


@router.get("", response_model=list[RuntimeOut])
def list_runtimes(ctx: CtxDep, caller: CallerDep) -> list[RuntimeOut]:
    return runtimes_out(ctx.runner, ctx.runner.list(caller.id))


@router.get("/{runtime_id}", response_model=RuntimeOut)
def get_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> RuntimeOut:
    return runtime_out(ctx.runner, ctx.runner.get(caller.id, runtime_id), look=True)


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
        env=body.env or {},
        cuda=body.cuda,
        clear_cuda="cuda" in sent and body.cuda is None,
        next_boot=body.next_boot or apply == "next-boot",
    )
    return runtime_out(ctx.runner, ctx.runner.update(caller.id, runtime_id, changes))


@router.get("/{runtime_id}/env", response_model=RuntimeEnvOut)
def runtime_env(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> RuntimeEnvOut:
    """The environment variables a cell sees: the runtime's own (``set here``) and those of its
    environment's image (``inherited``); the runtime's own win."""
    rt = ctx.runner.get(caller.id, runtime_id)
    variables, pending = ctx.runner.env_of(caller.id, runtime_id)
    return RuntimeEnvOut(
        runtime_id=rt.id,
        environment=rt.version.ref,
        variables=[EnvVarOut(name=v.name, value=v.value, source=v.source, overrides=v.overrides) for v in variables],  # type: ignore[arg-type]
        pending=pending,
    )


@router.delete("/{runtime_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> Response:
    """Stop the runtime if it runs, then delete it."""
    ctx.runner.delete(caller.id, runtime_id)
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
    rt = ctx.runner.start(caller.id, runtime_id)
    if wait:
        rt = ctx.runner.await_state(caller.id, runtime_id, SETTLED_AFTER_START, wait)
    return runtime_out(ctx.runner, rt)


@router.post("/{runtime_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=RuntimeOut)
def stop_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep, wait: Wait = 0) -> RuntimeOut:
    """Stop the runtime, keeping its unsaved changes as a draft; answers at once
    (``stopping``), or with ``wait`` as soon as it is stopped, or after ``wait`` seconds."""
    rt = ctx.runner.stop(caller.id, runtime_id)
    if wait:
        rt = ctx.runner.await_state(caller.id, runtime_id, SETTLED_AFTER_STOP, wait)
    return runtime_out(ctx.runner, rt)


@router.get("/{runtime_id}/log", response_model=list[LogEntryOut])
def runtime_log(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[LogEntryOut]:
    """The runner log: every state change and housekeeping step, with its reason."""
    return [
        LogEntryOut(
            at=e.at,
            state=e.state,
            event=e.event,
            reason=e.reason,
            message=e.message,
            details=e.details,
        )
        for e in ctx.runner.log_entries(caller.id, runtime_id)
    ]


@router.post("/{runtime_id}/reset", status_code=status.HTTP_202_ACCEPTED, response_model=RuntimeOut)
def reset_runtime(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> RuntimeOut:
    """Throw away the unsaved changes (and the draft) and boot from the version again."""
    return runtime_out(ctx.runner, ctx.runner.reset(caller.id, runtime_id))


@router.get("/{runtime_id}/changes", response_model=list[ChangeOut])
def runtime_changes(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[ChangeOut]:
    """Paths added, changed and deleted since the version the runtime booted from (its draft
    included), with sizes; mounts, /results and envctl's own files are left out."""
    return [
        ChangeOut(kind=c.kind, path=c.path, size=c.size)  # type: ignore[arg-type]
        for c in ctx.runner.changes_of(caller.id, runtime_id)
    ]


@router.post("/{runtime_id}/save", status_code=status.HTTP_202_ACCEPTED, response_model=OperationOut)
def save_runtime(runtime_id: str, body: SaveRequest, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Save the runtime's filesystem as the next version of ``environment``. Answers at once
    with an operation; poll ``GET /operations/{id}`` (``?wait=`` seconds) for the new version."""
    op = ctx.runner.snapshots.save(
        caller.id, caller.name, runtime_id, environment=body.environment, message=body.message, tag=body.tag
    )
    return operation_out(op)
