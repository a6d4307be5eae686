"""A team's apps (runner/apps/): bundles, deployments, status, stop, rollback, removal.

The author's client asks for a bundle (id and key), encrypts, asks for a presigned upload URL,
uploads, then posts the deployment; ``envctl app deploy`` does all of it.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, CtxDep
from api.schemas import NAME_PATTERN
from envs.kit.errors import EnvctlError, InvalidInputError
from runner.apps.deploy import AppView
from runner.apps.models import AppDeployment, AppInstance

router = APIRouter(tags=["apps"])

TeamPath = Path(max_length=64, pattern=NAME_PATTERN)
AppPath = Path(max_length=64, pattern=NAME_PATTERN)
SHA256 = r"^[0-9a-f]{64}$"
EXAMPLE_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of nothing


class BundleOut(BaseModel):
    bundle_id: str
    key: str = Field(description="this bundle's AES-256-GCM key, base64: encrypt the zip with it")
    header: dict[str, str] = Field(description="the header to seal the bundle under (runner/apps/bundles.py)")
    max_size: int


class UploadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=SHA256, examples=[EXAMPLE_SHA256], description="sha256 of the encrypted bundle")
    size: int = Field(gt=0)


class UploadOut(BaseModel):
    url: str
    method: str
    headers: dict[str, str]
    expires_in: int


class DeployIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    notebook: str = Field(min_length=1, max_length=255, description="the notebook's path in the bundle")
    notebook_sha256: str = Field(pattern=SHA256, examples=[EXAMPLE_SHA256])
    bundle_id: str = Field(min_length=1, max_length=40)
    bundle_sha256: str = Field(pattern=SHA256, examples=[EXAMPLE_SHA256])
    environment: str = Field(default="python3", min_length=1, max_length=300)
    machine_type: str = Field(default="small", min_length=1, max_length=64)
    port: int = Field(default=8000, ge=1, le=65535)
    env: dict[str, Any] = Field(
        default_factory=dict,
        description='variables: "NAME": "value" or {"secret": "name"} (a reference, never a value)',
    )
    public: bool = Field(default=False, description="anyone may open it (default: the team's members)")
    instances: int = Field(default=1, ge=1, le=8)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: int = Field(ge=1)


class DeploymentOut(BaseModel):
    number: int
    status: str
    message: str
    author: str
    created_at: datetime
    updated_at: datetime
    notebook: str
    notebook_sha256: str
    bundle_sha256: str
    environment: str
    version: str = Field(description="the environment version pinned at deployment")
    machine_type: str
    port: int
    env: dict[str, Any] = Field(description="variables and secret references; never a secret's value")
    rollback_of: int | None


class InstanceOut(BaseModel):
    deployment: int
    runtime_id: str | None
    runner: str
    status: str
    message: str
    restarts: int
    secrets_outdated: list[str] = Field(
        default_factory=list, description="secrets changed since the runtime booted: a restart or deployment takes them"
    )


class AppOut(BaseModel):
    team: str
    name: str
    access: str
    instances: int
    current: int = Field(description="the deployment serving (0: none)")
    stopped: bool
    url: str
    deployments: list[DeploymentOut]
    running: list[InstanceOut]


def _deployment(d: AppDeployment) -> DeploymentOut:
    spec = d.spec or {}
    return DeploymentOut(
        number=d.number, status=d.status, message=d.message, author=d.author, created_at=d.created_at,
        updated_at=d.updated_at, notebook=d.notebook, notebook_sha256=d.notebook_sha256,
        bundle_sha256=d.bundle_sha256, environment=d.environment_ref, version=d.version_ref,
        machine_type=str(spec.get("machine_type", "")), port=int(spec.get("port", 0)), env=spec.get("env") or {},
        rollback_of=d.rollback_of,
    )  # fmt: skip


def _instance(i: AppInstance, numbers: dict[str, int], outdated: dict[str, list[str]]) -> InstanceOut:
    return InstanceOut(
        deployment=numbers.get(i.deployment_id, 0), runtime_id=i.runtime_id, runner=i.runner, status=i.status,
        message=i.message, restarts=i.restarts, secrets_outdated=outdated.get(i.runtime_id or "", []),
    )  # fmt: skip


def _app(view: AppView, outdated: dict[str, list[str]] | None = None) -> AppOut:
    a = view.app
    numbers = {d.id: d.number for d in view.deployments}
    outdated = outdated or {}
    return AppOut(
        team=a.team, name=a.name, access=a.access, instances=a.instances, current=a.current, stopped=a.stopped,
        url=f"/apps/{a.team}/{a.name}/", deployments=[_deployment(d) for d in view.deployments],
        running=[_instance(i, numbers, outdated) for i in view.instances],
    )  # fmt: skip


@router.post("/teams/{team}/apps/{name}/bundles", response_model=BundleOut, status_code=201)
def new_bundle(ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath) -> BundleOut:
    """A bundle id and that one bundle's key (the team's members only)."""
    return BundleOut(**ctx.runner.apps.new_bundle(caller.viewer, team, name))


@router.post("/teams/{team}/apps/{name}/bundles/upload-url", response_model=UploadOut)
def upload_url(
    body: UploadIn, request: Request, ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath
) -> UploadOut:
    """A presigned URL to PUT the encrypted bundle to (the object store results use)."""
    base = str(request.base_url)
    return UploadOut(**ctx.runner.apps.upload_url(caller.viewer, team, body.sha256, body.size, base))


@router.put("/app-bundles", status_code=201)
async def receive_bundle(request: Request, ctx: CtxDep) -> dict[str, Any]:
    """An upload through a presigned URL of this server (the local object store): the URL is the
    credential; its signature, expiry, size and sha256 are checked before anything is kept."""
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > 32 * 1024 * 1024:
        raise InvalidInputError("body: a bundle needs a Content-Length of at most 32 MiB", field="body")
    body = await request.body()
    stored: dict[str, Any] = await run_in_threadpool(ctx.runner.apps.receive, dict(request.query_params), body)
    return stored


@router.post("/teams/{team}/apps/{name}/deployments", response_model=DeploymentOut, status_code=202)
def deploy(body: DeployIn, ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath) -> DeploymentOut:
    """Deployment N of the app: recorded, and announced on the team's event stream; the team's
    app servers take it (its ``status`` follows: downloading, starting, running or failed)."""
    dep = ctx.runner.apps.deploy(
        caller.viewer, caller.name, team, name,
        notebook=body.notebook, notebook_sha256=body.notebook_sha256, bundle_id=body.bundle_id,
        bundle_sha256=body.bundle_sha256, environment=body.environment, machine_type=body.machine_type,
        port=body.port, env=body.env, access="public" if body.public else "team", instances=body.instances,
    )  # fmt: skip
    return _deployment(dep)


@router.get("/teams/{team}/apps", response_model=list[AppOut])
def list_apps(ctx: CtxDep, caller: CallerDep, team: str = TeamPath) -> list[AppOut]:
    return [_app(v) for v in ctx.runner.apps.list(caller.viewer, team)]


@router.get("/teams/{team}/apps/{name}", response_model=AppOut)
def show_app(ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath) -> AppOut:
    """The app, its deployments, and its instances; an instance whose secrets changed since it
    booted says which (``secrets_outdated``): the app is out of date until it restarts."""
    view = ctx.runner.apps.show(caller.viewer, team, name)
    runtimes = []
    for i in view.instances:
        if i.runtime_id:
            with contextlib.suppress(EnvctlError):
                runtimes.append(ctx.runner.get(caller.viewer, i.runtime_id))
    outdated = {rt.id: s.secrets_outdated for rt, s in zip(runtimes, ctx.runner.status_of(runtimes), strict=True)}
    return _app(view, outdated)


@router.get("/teams/{team}/apps/{name}/logs")
def app_logs(ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath) -> Response:
    """The app's output as text: its runtimes' logs and its cells' outputs."""
    view = ctx.runner.apps.show(caller.viewer, team, name)
    runtimes = [i.runtime_id for i in view.instances if i.runtime_id]
    return Response(ctx.runner.app_server.logs(caller.viewer, runtimes), media_type="text/plain")


@router.post("/teams/{team}/apps/{name}/rollback", response_model=DeploymentOut, status_code=202)
def rollback(
    body: RollbackIn, ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath
) -> DeploymentOut:
    """Deployment ``number`` deployed again, as a new numbered deployment."""
    return _deployment(ctx.runner.apps.rollback(caller.viewer, caller.name, team, name, body.number))


@router.post("/teams/{team}/apps/{name}/stop", response_model=AppOut)
def stop_app(request: Request, ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath) -> AppOut:
    """Nothing of the app serves any more; its runtimes are removed."""
    for rid in ctx.runner.apps.stop(caller.viewer, caller.name, team, name):
        _delete(ctx, caller, rid)
    _forget(request, team, name)
    return _app(ctx.runner.apps.show(caller.viewer, team, name))


@router.delete("/teams/{team}/apps/{name}", status_code=204)
def remove_app(request: Request, ctx: CtxDep, caller: CallerDep, team: str = TeamPath, name: str = AppPath) -> Response:
    for rid in ctx.runner.apps.remove(caller.viewer, caller.name, team, name):
        _delete(ctx, caller, rid)
    _forget(request, team, name)
    return Response(status_code=204)


def _forget(request: Request, team: str, name: str) -> None:
    """The gateway of this process stops sending visitors to the app's old instances at once."""
    gateway = getattr(request.app.state, "app_gateway", None)
    if gateway is not None:
        gateway.forget(team, name)


def _delete(ctx: CtxDep, caller: CallerDep, runtime_id: str) -> None:
    """An app runtime removed now when this runner owns it (else its app server does it)."""
    with contextlib.suppress(EnvctlError):
        ctx.runner.delete(ctx.runner.app_server.runner_viewer(runtime_id), runtime_id)
