"""Named persistent volumes for runtime mounts: ``NAME`` (yours) or ``TEAM/NAME`` (a team's).
They survive reset and deletion of runtimes; one that a runtime's mounts name cannot be
deleted (409)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerDep, CtxDep
from runner.mounts.named_volumes import VolumeInfo

router = APIRouter(prefix="/volumes", tags=["volumes"])

VOLUME_NAME = Field(min_length=1, max_length=128, examples=["home-data", "acme/datasets"])


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = VOLUME_NAME


class VolumeOut(BaseModel):
    name: str = Field(description="NAME (yours) or TEAM/NAME (the team's)")
    owner: str = Field(description="you, or team TEAM")
    created_at: str = Field(description="when the engine made it (its own format)")
    used_by: list[str] = Field(description="the runtimes whose mounts name it (yours by name, others' by id)")


def _out(v: VolumeInfo) -> VolumeOut:
    return VolumeOut(name=v.name, owner=v.owner, created_at=v.created_at, used_by=v.used_by)


@router.get("", response_model=list[VolumeOut])
def list_volumes(ctx: CtxDep, caller: CallerDep) -> list[VolumeOut]:
    """Your volumes and your teams'."""
    return [_out(v) for v in ctx.runner.volumes.list(caller.id)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=VolumeOut)
def create_volume(body: VolumeCreate, ctx: CtxDep, caller: CallerDep) -> VolumeOut:
    """Make a volume (a runtime's first boot that mounts one makes it too)."""
    return _out(ctx.runner.volumes.create(caller.id, body.name))


@router.delete("/{volume:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_volume(ctx: CtxDep, caller: CallerDep, volume: str = Path(max_length=128)) -> Response:
    """Delete a volume (``NAME`` or ``TEAM/NAME``) and its data; refused (409) while a runtime's
    mounts name it."""
    ctx.runner.volumes.delete(caller.id, volume)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
