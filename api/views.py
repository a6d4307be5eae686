"""Response builders: ORM rows (read inside their session) turned into the API's schemas.

One place for the builders that more than one route module uses, so that route modules never
import each other. A builder only reads what it is given; it runs no query of its own beyond
the relationships already loaded on the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from api.schemas import (
    EnvironmentOut,
    IdleOut,
    LeaseOut,
    LineageStep,
    LogEntryOut,
    MachineTypeOut,
    OperationOut,
    ResultOut,
    RuntimeOut,
    VersionOut,
)
from envs.models import Environment, EnvironmentVersion
from runner.models import Operation, ResultFile, Runtime, RuntimeLogEntry
from runner.runtimes.reboot import pending_view
from runner.runtimes.states import State
from runner.service import RunnerService, RuntimeStatus
from runner.settings import MachineType


def operation_out(op: Operation) -> OperationOut:
    return OperationOut(
        id=op.id,
        kind=op.kind,
        runtime_id=op.runtime_id,
        status=op.status,  # type: ignore[arg-type]
        phase=op.phase,
        message=op.message,
        result=op.result or {},
        error=op.error,
        created_at=op.created_at,
        finished_at=op.finished_at,
    )


def version_out(v: EnvironmentVersion, tags: list[str], parent_hidden: bool = False) -> VersionOut:
    """``parent_hidden``: its parent is a version the caller may not see (its name is not shown)."""
    return VersionOut(
        ref=v.ref,
        number=v.number,
        digest=v.digest,
        image_id=v.image_id,
        parent=v.parent.ref if v.parent is not None and not parent_hidden else None,
        parent_hidden=parent_hidden,
        message=v.message,
        author=v.author,
        size=v.size,
        size_added=v.size_added,
        created_at=v.created_at,
        tags=sorted(tags),
        save=(v.labels or {}).get("envctl.save"),
        registry_digest=v.registry_digest,
        imported=(v.labels or {}).get("envctl.imported"),
    )


def owner_ids(envs: Iterable[Environment]) -> set[str]:
    """The user ids that own ``envs``, to look their names up."""
    return {e.owner_id for e in envs if e.owner_id is not None}


def environment_out(
    env: Environment, owners: dict[str, str], only: set[int] | None = None, hidden: set[int] | None = None
) -> EnvironmentOut:
    """``owners`` maps user id to name; an owner missing from it (a user who is gone) shows as
    no owner, which is how such an environment is treated: admins only. ``only``: the ids of
    the versions to show (another team's published ones), ``None`` for all; ``hidden``: the
    ids of those whose parent the caller may not see."""
    tags_by_version: dict[int, list[str]] = {}
    for t in env.tags:
        tags_by_version.setdefault(t.version_id, []).append(t.name)
    by_id = {v.id: v for v in env.versions if only is None or v.id in only}
    tags = {t.name: by_id[t.version_id].ref for t in env.tags if t.version_id in by_id}
    return EnvironmentOut(
        name=env.full_name,
        team=env.namespace or None,
        owner=owners.get(env.owner_id) if env.owner_id is not None else None,
        latest=tags.get("latest"),
        tags=tags,
        versions=[version_out(v, tags_by_version.get(v.id, []), v.id in (hidden or ())) for v in by_id.values()],
    )


# A version of a lineage that the caller may not see: that something is there, nothing of it.
HIDDEN_STEP = LineageStep(hidden=True)


def lineage_step(v: EnvironmentVersion, own: bool = True) -> LineageStep:
    """``own``: the caller's team's version (or no team's); another team's does not say which
    of its runtimes it was saved from."""
    return LineageStep(
        hidden=False,
        ref=v.ref,
        digest=v.digest,
        message=v.message,
        author=v.author,
        created_at=v.created_at,
        size=v.size,
        size_added=v.size_added,
        source_runtime_id=v.source_runtime_id if own else None,
    )


def result_out(row: ResultFile) -> ResultOut:
    return ResultOut(
        id=row.id,
        path=row.path,
        sha256=row.sha256,
        size=row.size,
        runtime_id=row.runtime_id,
        execution_id=row.execution_id,
        created_at=row.created_at,
        content_url=f"/results/{row.id}/content",
    )


def machine_type_out(m: MachineType) -> MachineTypeOut:
    return MachineTypeOut(
        name=m.name,
        cpus=m.cpus,
        memory=m.memory,
        pids=m.pids,
        gpus=m.gpus,
        gpu_kind=m.gpu_kind or ("nvidia" if m.gpus else ""),
        idle_timeout=m.idle_timeout,
        description=m.description,
    )


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
        team=rt.team,
        type=rt.type,
        kernel=rt.kernel,
        language=rt.language,
        environment=rt.version.ref,
        environment_ref=rt.environment_ref,
        environment_digest=rt.version.digest,
        state=state.value,
        state_color=state.color,
        state_reason=rt.state_reason,
        origin="attached"
        if rt.environment_ref.startswith("attach:")
        else (rt.backend_state or {}).get("origin", "boot"),
        state_message=rt.state_message,
        phase="saving" if st.saving and not rt.phase else rt.phase,
        progress=rt.progress if rt.phase else None,
        busy=st.busy,
        saving=st.saving,
        unsaved_changes=st.unsaved_changes,
        idle_shutdown_at=decision.shutdown_at if decision else None,
        idle=idle,
        machine_type=rt.machine_type,
        idle_timeout=rt.idle_timeout,
        env=dict(rt.env or {}),
        cuda=rt.cuda,
        mounts=list(rt.mounts or []),
        mounts_used=list(rt.mounts_used or []),
        pending=pending_view(rt),
        secrets_outdated=st.secrets_outdated,
        runner=rt.runner,
        runner_alive=st.runner_alive,
        unreachable=st.unreachable,
        node=str((rt.backend_state or {}).get("node") or "") or None,
        lease=None
        if st.lease is None
        else LeaseOut(
            seconds=st.lease.seconds,
            expires_at=st.lease.expires_at,
            renewed_at=st.lease.renewed_at,
            expired=st.lease.expired,
        ),
        booted_at=rt.booted_at,
        created_at=rt.created_at,
        updated_at=rt.updated_at,
    )


def log_entry_out(e: RuntimeLogEntry) -> LogEntryOut:
    return LogEntryOut(at=e.at, state=e.state, event=e.event, reason=e.reason, message=e.message, details=e.details)


def sse(event: str, data: Any, event_id: int | str | None = None, *, encoded: str | None = None) -> bytes:
    """One server-sent event: its id (when given), its name and its data as compact JSON
    (``encoded``: the data encoded so already; JSON text is one line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = encoded if encoded is not None else json.dumps(data, separators=(",", ":"))
    return b"".join((f"{head}event: {event}\ndata: ".encode(), body.encode(), b"\n\n"))
