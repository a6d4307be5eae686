"""``GET /environments/{ref}/packages`` and ``.../packages/diff``: what an environment version
has installed (Debian packages, Python distributions) and how two versions differ.

The packages are read from the version's image without running it (``envs.packages``), once
per version: they are kept in the version's labels. The helper container carries the runner's
labels and its installation's identity, with ``envctl.managed=packages``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, CallerDep, Context, CtxDep
from api.schemas import PackageOut, PackagesDiffOut, PackagesKindDiffOut, PackagesOut
from envs import packages
from registry import visibility
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED, LABEL_RUNNER
from runner.backends.docker import DockerBackend

router = APIRouter(tags=["environments"])


def _reader(ctx: Context) -> packages.ImageReader | None:
    """How this server reads an image's packages: through its Docker backend, or not at all."""
    backend = ctx.runner.backend
    if not isinstance(backend, DockerBackend):
        return None
    identity = ctx.runner.identity
    labels = {
        **backend.labels,
        LABEL_MANAGED: "packages",
        LABEL_INSTALLATION: identity.installation,
        LABEL_RUNNER: identity.name,
    }
    return lambda image: packages.read_image(backend.client, image, labels)


def _visible(ctx: Context, caller: Caller, ref: str, field: str) -> str:
    """The exact version ``ref`` means for the caller (``registry/visibility.py``: what they may
    not see is a 404 naming ``field``)."""
    with ctx.db.session() as s:
        return visibility.resolve(s, ref, caller.reader, field).ref


async def _visible_ref(ref: str, ctx: CtxDep, caller: CallerDep) -> str:
    """The path's ``ref``, resolved before the query is read: a version the caller may not see
    is a 404 whatever else the request lacks."""
    return await run_in_threadpool(_visible, ctx, caller, ref, "ref")


VisibleRef = Annotated[str, Depends(_visible_ref)]


def _out(items: list[packages.Package]) -> list[PackageOut]:
    return [PackageOut(name=p.name, version=p.version) for p in items]


@router.get("/environments/{ref:path}/packages/diff", response_model=PackagesDiffOut)
async def packages_diff(
    ref: str,
    new_ref: VisibleRef,
    ctx: CtxDep,
    caller: CallerDep,
    against: str = Query(description="the version to compare with (the old side), e.g. python3@1"),
) -> PackagesDiffOut:
    """What the version ``ref`` means adds, removes and changes against the version ``against``
    means, for Debian packages and Python distributions (Python names compared as pip does).
    409 when the packages of either are not known and cannot be read."""
    old_ref = await run_in_threadpool(_visible, ctx, caller, against, "against")
    reader = _reader(ctx)
    new = await run_in_threadpool(packages.version_packages, ctx.db, new_ref, reader, "ref")
    old = await run_in_threadpool(packages.version_packages, ctx.db, old_ref, reader, "against")
    kinds = packages.diff(old.packages, new.packages)
    return PackagesDiffOut(
        ref=new.ref,
        against=old.ref,
        **{kind: PackagesKindDiffOut(**asdict(d)) for kind, d in kinds.items()},
    )


@router.get("/environments/{ref:path}/packages", response_model=PackagesOut)
async def list_packages(ref: str, exact: VisibleRef, ctx: CtxDep) -> PackagesOut:
    """The Debian packages (``install ok installed`` in dpkg's status) and the Python
    distributions (``*.dist-info``/``*.egg-info`` in the system's site- and dist-packages and a
    venv at /opt/venv or /venv) of the version ``ref`` means, read from its image without running
    it, once per version. 409 when they are not known and cannot be read (the engine no longer
    has the image, or the server's backend cannot look inside images)."""
    found = await run_in_threadpool(packages.version_packages, ctx.db, exact, _reader(ctx), "ref")
    return PackagesOut(ref=found.ref, deb=_out(found.packages.deb), python=_out(found.packages.python))
