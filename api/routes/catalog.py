"""Publishing and the catalog: a team makes a version or a tag readable by every team, and
anyone signed in searches what is published.

- ``POST /environments/{ref}/publish``, ``DELETE /environments/{ref}/publish``: publish or
  unpublish a version (``acme/ml@3``) or a tag (``acme/ml:stable``); members of the team only.
- ``GET /catalog?q=``: what is published across teams, searched by name, description, message
  and packages (when they were read).

Each team's events (``GET /teams/{team}/events``) are streamed by ``api/routes/streams.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from api.deps import CallerDep, CtxDep
from envs.kit.errors import ForbiddenError
from envs.service import Writer
from registry import catalog, distribution, garbage
from registry.errors import RegistryNotManagedError

router = APIRouter(tags=["catalog"])


class PublicationOut(BaseModel):
    ref: str = Field(description="what is published: a version (acme/ml@3) or a tag (acme/ml:stable)")
    version: str = Field(description="the version it means now: import or boot from this")
    published_by: str
    published_at: datetime


class CatalogEntryOut(PublicationOut):
    team: str
    environment: str
    description: str
    message: str
    digest: str
    size: int
    created_at: datetime
    packages: dict[str, int] | None = Field(description="packages per kind (deb, python); null: not read yet")
    matched_packages: list[str] = Field(description="the packages whose names hold the query")


def _writer(caller: CallerDep) -> Writer:
    return Writer(caller.id, caller.is_admin, caller.teams)


@router.post("/environments/{ref:path}/publish", response_model=PublicationOut)
def publish(ref: str, ctx: CtxDep, caller: CallerDep) -> PublicationOut:
    """Publish a version or a tag of a team's environment: every signed-in user may then read
    it, boot from it and import it (read only). A published tag publishes whichever version it
    points at as it moves. Members of the team only (403); publishing twice changes nothing."""
    with ctx.db.session() as s:
        pub = catalog.publish(s, ref, _writer(caller), caller.name)
        published, version = catalog.describe(s, pub)
        out = PublicationOut(
            ref=published,
            version=version,
            published_by=pub.published_by,
            published_at=pub.published_at,
        )
    return out


@router.delete("/environments/{ref:path}/publish", status_code=204)
def unpublish(ref: str, ctx: CtxDep, caller: CallerDep) -> Response:
    """Unpublish a version or a tag. Refused with 409 while another team's versions or other
    users' runtimes depend on a version only it published (names you may see, counts of the
    others); 404 when it is not published."""
    with ctx.db.session() as s:
        catalog.unpublish(s, ref, _writer(caller), caller.name, ctx.pinned_by)
    return Response(status_code=204)


@router.get("/catalog", response_model=list[CatalogEntryOut])
def search_catalog(
    ctx: CtxDep,
    _caller: CallerDep,
    q: Annotated[str, Query(max_length=200, description="words to look for; empty: everything")] = "",
) -> list[CatalogEntryOut]:
    """What is published across teams whose name, description, message or packages hold ``q``."""
    with ctx.db.session() as s:
        return [
            CatalogEntryOut(
                ref=e.ref,
                version=e.version.ref,
                team=e.version.environment.namespace,
                environment=e.version.environment.full_name,
                description=e.description,
                message=e.version.message,
                digest=e.version.digest,
                size=e.version.size,
                created_at=e.version.created_at,
                published_by=e.published_by,
                published_at=e.published_at,
                packages=e.packages,
                matched_packages=e.matched_packages,
            )
            for e in catalog.search(s, q)
        ]


class GcOut(BaseModel):
    blobs_deleted: int = Field(description="blobs no manifest named any more")
    blobs_kept: int = Field(description="blobs the remaining manifests name")
    bytes_before: int
    bytes_after: int
    seconds: float


@router.post("/registry/gc", response_model=GcOut)
def registry_gc(ctx: CtxDep, caller: CallerDep) -> GcOut:
    """Collect the managed registry's garbage: the blobs that no remaining manifest names (what
    deleted versions left). The registry is read-only meanwhile (pulls served, pushes refused).
    envctl admins only (403); 409 when this envctl runs no registry."""
    if not caller.is_admin:
        raise ForbiddenError("only an envctl admin may collect the registry's garbage")
    managed = ctx.managed_registry()
    if not isinstance(managed, distribution.ManagedRegistry):
        raise RegistryNotManagedError(
            "this envctl runs no registry (the setting registry is off or an external URL): collect garbage where "
            "the registry runs"
        )
    done = garbage.collect(managed)
    return GcOut(
        blobs_deleted=done.blobs_deleted,
        blobs_kept=done.blobs_kept,
        bytes_before=done.bytes_before,
        bytes_after=done.bytes_after,
        seconds=round(done.seconds, 3),
    )
