"""``GET /environments/{ref}/packages`` and ``.../packages/diff``: what an environment version
has installed (Debian packages, Python distributions) and how two versions differ.

The packages are read from the version's image without running it (``envs.packages``), once
per version: they are kept in the version's labels. The helper container carries the runner's
labels and its installation's identity, with ``envctl.managed=packages``.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, Context, CtxDep, check_visible
from api.schemas import PackageOut, PackagesDiffOut, PackagesKindDiffOut, PackagesOut
from envs import packages
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


def _out(items: list[packages.Package]) -> list[PackageOut]:
    return [PackageOut(name=p.name, version=p.version) for p in items]


@router.get("/environments/{ref:path}/packages/diff", response_model=PackagesDiffOut)
async def packages_diff(
    ref: str,
    ctx: CtxDep,
    caller: CallerDep,
    against: str = Query(description="the version to compare with (the old side), e.g. python3@1"),
) -> PackagesDiffOut:
    """What the version ``ref`` means adds, removes and changes against the version ``against``
    means, for Debian packages and Python distributions (Python names compared as pip does).
    409 when the packages of either are not known and cannot be read."""
    await run_in_threadpool(check_visible, ctx, caller, against, "against")
    reader = _reader(ctx)
    new = await run_in_threadpool(packages.version_packages, ctx.db, ref, reader, "ref")
    old = await run_in_threadpool(packages.version_packages, ctx.db, against, reader, "against")
    kinds = packages.diff(old.packages, new.packages)
    return PackagesDiffOut(
        ref=new.ref,
        against=old.ref,
        **{kind: PackagesKindDiffOut(**asdict(d)) for kind, d in kinds.items()},
    )


@router.get("/environments/{ref:path}/packages", response_model=PackagesOut)
async def list_packages(ref: str, ctx: CtxDep, _caller: CallerDep) -> PackagesOut:
    """The Debian packages (``install ok installed`` in dpkg's status) and the Python
    distributions (``*.dist-info``/``*.egg-info`` in the system's site- and dist-packages and a
    venv at /opt/venv or /venv) of the version ``ref`` means, read from its image without running
    it, once per version. 409 when they are not known and cannot be read (the engine no longer
    has the image, or the server's backend cannot look inside images)."""
    found = await run_in_threadpool(packages.version_packages, ctx.db, ref, _reader(ctx), "ref")
    return PackagesOut(ref=found.ref, deb=_out(found.packages.deb), python=_out(found.packages.python))
