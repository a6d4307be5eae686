from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, CtxDep
from api.routes.runtimes import operation_out
from api.schemas import BuildRequest, EnvironmentOut, LineageStep, LoadedVersion, OperationOut, VersionOut
from envs import archive
from envs import service as envs_service
from envs.errors import EnvironmentNotFoundError
from envs.kit.errors import InvalidInputError
from envs.models import Environment, EnvironmentVersion
from envs.refs import parse_ref
from registry.models import User

router = APIRouter(tags=["environments"])


def version_out(v: EnvironmentVersion, tags: list[str]) -> VersionOut:
    return VersionOut(
        ref=v.ref,
        number=v.number,
        digest=v.digest,
        image_id=v.image_id,
        parent=v.parent.ref if v.parent is not None else None,
        message=v.message,
        author=v.author,
        size=v.size,
        size_added=v.size_added,
        created_at=v.created_at,
        tags=sorted(tags),
    )


def owner_names(s: Session, envs: list[Environment]) -> dict[str, str]:
    """User names of the owners of ``envs``, by user id."""
    ids = {e.owner_id for e in envs if e.owner_id is not None}
    if not ids:
        return {}
    rows = s.execute(select(User.id, User.name).where(User.id.in_(ids)))
    return {uid: name for uid, name in rows}


def environment_out(env: Environment, owners: dict[str, str]) -> EnvironmentOut:
    tags_by_version: dict[int, list[str]] = {}
    for t in env.tags:
        tags_by_version.setdefault(t.version_id, []).append(t.name)
    by_id = {v.id: v for v in env.versions}
    tags = {t.name: by_id[t.version_id].ref for t in env.tags if t.version_id in by_id}
    return EnvironmentOut(
        name=env.full_name,
        team=env.namespace or None,
        owner=owners.get(env.owner_id) if env.owner_id is not None else None,
        latest=tags.get("latest"),
        tags=tags,
        versions=[version_out(v, tags_by_version.get(v.id, [])) for v in env.versions],
    )


@router.get("/environments", response_model=list[EnvironmentOut])
def list_environments(ctx: CtxDep, _caller: CallerDep) -> list[EnvironmentOut]:
    """Every environment with its versions, tags and owner. Every user sees every one."""
    with ctx.db.session() as s:
        envs = envs_service.list_environments(s)
        owners = owner_names(s, envs)
        return [environment_out(e, owners) for e in envs]


@router.post("/environments/build", status_code=202, response_model=OperationOut)
def build(body: BuildRequest, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Build a spec file: checked now (422 ``file:line: field: problem``), built in the
    background; the operation lists each step with the execution that runs it. The same spec
    on the same parent reuses the version built before. Building into an environment of
    another user (or a base image, unless an admin) is refused with 403."""
    op = ctx.runner.builds.build(caller.id, caller.name, body.spec, body.source)
    return operation_out(op)


@router.post("/environments/load", status_code=201, response_model=list[LoadedVersion])
async def load(request: Request, ctx: CtxDep, caller: CallerDep) -> list[LoadedVersion]:
    """Load an archive made by ``GET /environments/{ref}/export`` (the request body, as
    application/x-tar): its images and its versions with their lineage. An archive with
    paths outside its root, links, devices or blobs that do not match their digests is
    refused with 422 and nothing is loaded; so is, with 403, one that would add versions to
    an environment of another user. Environments it makes are the caller's."""
    archives = ctx.runner.archives
    with tempfile.NamedTemporaryFile(dir=archives.scratch(), suffix=".upload.tar", delete=False) as f:
        path = Path(f.name)
        async for chunk in request.stream():
            f.write(chunk)
    try:
        loaded = await run_in_threadpool(archives.load, path, caller.id)
    finally:
        path.unlink(missing_ok=True)
    return [LoadedVersion(**v) for v in loaded]


@router.get(
    "/environments/{ref:path}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "an OCI image layout in a tar"}},
)
def export(ref: str, ctx: CtxDep, _caller: CallerDep) -> StreamingResponse:
    """The version ``ref`` means, with its whole lineage, as an OCI archive that carries the
    lineage metadata (``envctl-export.json``)."""
    path = ctx.runner.archives.export(ref)

    def chunks() -> Iterator[bytes]:
        try:
            yield from archive.stream_file(path)
        finally:
            path.unlink(missing_ok=True)

    name = ref.replace("/", "_").replace(":", "_").replace("@", "_")
    return StreamingResponse(
        chunks(),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(path.stat().st_size),
            "Content-Disposition": f'attachment; filename="{name}.tar"',
        },
    )


@router.get("/environments/{ref:path}/lineage", response_model=list[LineageStep])
def lineage(ref: str, ctx: CtxDep, _caller: CallerDep) -> list[LineageStep]:
    """The chain from the version ``ref`` means down to its base image, newest first, each
    step with its message, author, time and the size it added."""
    with ctx.db.session() as s:
        version = envs_service.resolve(s, parse_ref(ref, "ref"), "ref")
        return [
            LineageStep(
                ref=v.ref,
                digest=v.digest,
                message=v.message,
                author=v.author,
                created_at=v.created_at,
                size=v.size,
                size_added=v.size_added,
                source_runtime_id=v.source_runtime_id,
            )
            for v in envs_service.lineage(s, version)
        ]


@router.delete("/environments/{ref:path}", status_code=204)
def delete_version(ref: str, ctx: CtxDep, caller: CallerDep) -> Response:
    """Delete one version (``name@N`` or ``name@sha256:...``). Only the environment's owner
    or an admin may (403; base images: admins only). Refused with 409, naming them, while
    child versions or runtimes depend on it."""
    parsed = parse_ref(ref, "ref")
    if not parsed.is_pinned:
        raise InvalidInputError("ref: name one version to delete, as name@N or name@sha256:...", field="ref")
    with ctx.db.session() as s:
        version = envs_service.resolve(s, parsed, "ref")
        image_id = envs_service.delete_version(s, version, envs_service.Writer(caller.id, caller.is_admin))
    ctx.runner.backend.remove_image(image_id)
    return Response(status_code=204)


@router.get("/environments/{ref:path}", response_model=EnvironmentOut)
def get_environment(ref: str, ctx: CtxDep, _caller: CallerDep) -> EnvironmentOut:
    """One environment. ``ref`` is a name (``python3``, ``acme/ml``) or any reference to one
    of its versions; the whole environment is returned either way."""
    parsed = parse_ref(ref, "ref")
    with ctx.db.session() as s:
        env = envs_service.get_environment(s, parsed.full_name)
        if env is None:
            raise EnvironmentNotFoundError(f"ref: no environment named {parsed.full_name!r}", details={"field": "ref"})
        if parsed.is_pinned:
            envs_service.resolve(s, parsed, "ref")  # 404 for a version that does not exist
        s.refresh(env)
        return environment_out(env, owner_names(s, [env]))
