from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, CtxDep
from api.schemas import BuildRequest, EnvironmentOut, LineageStep, LoadedVersion, OperationOut
from api.views import HIDDEN_STEP, environment_out, lineage_step, operation_out, owner_ids
from envs import archive
from envs import service as envs_service
from envs.kit.errors import InvalidInputError
from envs.refs import parse_ref
from registry import catalog, garbage, visibility
from registry import users as registry_service

router = APIRouter(tags=["environments"])


@router.get("/environments", response_model=list[EnvironmentOut])
def list_environments(ctx: CtxDep, caller: CallerDep) -> list[EnvironmentOut]:
    """Every environment the caller may see, with its versions, tags and owner: base images,
    names without a team, their own teams', and of another team's only what it published."""
    with ctx.db.session() as s:
        reader = caller.reader
        shown = [(e, visibility.readable_versions(s, e, reader)) for e in envs_service.list_environments(s)]
        envs = [(e, only) for e, only in shown if only is None or only]
        owners = registry_service.user_names(s, owner_ids(e for e, _ in envs))
        hidden = visibility.hidden_parents(s, (v for e, _ in envs for v in e.versions), reader)
        return [environment_out(e, owners, only, hidden) for e, only in envs]


@router.post("/environments/build", status_code=202, response_model=OperationOut)
def build(body: BuildRequest, ctx: CtxDep, caller: CallerDep) -> OperationOut:
    """Build a spec file: checked now (422 ``file:line: field: problem``), built in the
    background; the operation lists each step with the execution that runs it. The same spec
    on the same parent reuses the version built before. Building into an environment of
    another user (or a base image, unless an admin) is refused with 403."""
    op = ctx.runner.builds.build(caller.viewer, caller.name, body.spec, body.source)
    return operation_out(op)


@router.post("/environments/load", status_code=201, response_model=list[LoadedVersion])
async def load(request: Request, ctx: CtxDep, caller: CallerDep) -> list[LoadedVersion]:
    """Load an archive made by ``GET /environments/{ref}/export`` (the request body, as
    application/x-tar): its images and its versions with their lineage. An archive with
    paths outside its root, links, devices or blobs that do not match their digests is
    refused with 422 and nothing is loaded; so is a damaged one (cut short, bytes changed,
    headers or JSON that lie about sizes or digests), the message naming the problem, and
    one whose images the engine refuses. One that would add versions to an environment of
    another user is refused with 403. Environments it makes are the caller's."""
    archives = ctx.runner.archives
    fd, name = tempfile.mkstemp(dir=archives.scratch(), suffix=".upload.tar")
    path = Path(name)
    try:  # the upload goes, however this ends: loaded, refused, or the client gone mid-way
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
        loaded = await run_in_threadpool(archives.load, path, caller.id)
    finally:
        path.unlink(missing_ok=True)
    return [LoadedVersion(**v) for v in loaded]


@router.get(
    "/environments/{ref:path}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "an OCI image layout in a tar"}},
)
def export(ref: str, ctx: CtxDep, caller: CallerDep) -> StreamingResponse:
    """The version ``ref`` means, with its whole lineage, as an OCI archive that carries the
    lineage metadata (``envctl-export.json``). A version of the lineage the caller may not see
    travels as layers only: its name, message and author stay out of the archive."""
    path = ctx.runner.archives.export(ref, caller.reader)

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


@router.get("/environments/{ref:path}/lineage", response_model=list[LineageStep], response_model_exclude_unset=True)
def lineage(ref: str, ctx: CtxDep, caller: CallerDep) -> list[LineageStep]:
    """The chain from the version ``ref`` means down to its base image, newest first, each
    step with its message, author, time and the size it added (and, for the caller's own
    teams' versions, the runtime it was saved from). A version the caller may not see is one
    step ``{"hidden": true}``, without its name, message or author."""
    reader = caller.reader
    with ctx.db.session() as s:
        version = visibility.resolve(s, ref, reader, "ref")
        steps: list[LineageStep] = []
        for v in envs_service.lineage(s, version):
            only = visibility.readable_versions(s, v.environment, reader)
            if only is None or v.id in only:
                steps.append(lineage_step(v, own=only is None))
            elif not (steps and steps[-1].hidden):  # hidden ones in a row: one step, not their count
                steps.append(HIDDEN_STEP)
        return steps


@router.delete("/environments/{ref:path}", status_code=204)
def delete_version(ref: str, ctx: CtxDep, caller: CallerDep) -> Response:
    """Delete one version (``name@N`` or ``name@sha256:...``), and its manifest in the registry
    if it was pushed. Only the environment's writers may (403; base images: admins only).
    Refused with 409 while child versions or runtimes depend on it, naming those the caller
    may see and counting the others."""
    parsed = parse_ref(ref, "ref")
    if not parsed.is_pinned:
        raise InvalidInputError("ref: name one version to delete, as name@N or name@sha256:...", field="ref")
    with ctx.db.session() as s:
        version = visibility.resolve(s, parsed, caller.reader, "ref")
        repository, digest = version.environment.full_name, version.registry_digest
        image_id = catalog.delete_version(
            s, version, envs_service.Writer(caller.id, caller.is_admin, caller.teams), ctx.pinned_by
        )
    ctx.runner.backend.remove_image(image_id)
    garbage.forget_manifest(ctx.settings, repository, digest)  # its manifest in the registry, if pushed
    return Response(status_code=204)


@router.get("/environments/{ref:path}", response_model=EnvironmentOut)
def get_environment(ref: str, ctx: CtxDep, caller: CallerDep) -> EnvironmentOut:
    """One environment. ``ref`` is a name (``python3``, ``acme/ml``) or any reference to one
    of its versions; the whole environment is returned either way (another team's: only what
    it published)."""
    with ctx.db.session() as s:
        env, only = visibility.environment(s, ref, caller.reader, "ref")
        owners = registry_service.user_names(s, owner_ids([env]))
        return environment_out(env, owners, only, visibility.hidden_parents(s, env.versions, caller.reader))
