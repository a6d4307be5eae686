"""Results: files cells wrote under /results, kept by content after the runtime is gone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import CallerDep, CtxDep
from api.schemas import ResultOut
from envs.kit.errors import NotFoundError
from runner.models import ResultFile

router = APIRouter(tags=["results"])
ResultId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a result's id")]


def _out(row: ResultFile) -> ResultOut:
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


def _list(ctx: CtxDep, owner_id: str, **where: str) -> list[ResultOut]:
    q = select(ResultFile).where(ResultFile.owner_id == owner_id)
    for column, value in where.items():
        q = q.where(getattr(ResultFile, column) == value)
    with ctx.db.session() as s:
        return [_out(r) for r in s.scalars(q.order_by(ResultFile.id.desc()).limit(1000))]


@router.get("/results", response_model=list[ResultOut])
def list_results(
    ctx: CtxDep, caller: CallerDep, runtime_id: Annotated[str | None, Query(max_length=64)] = None
) -> list[ResultOut]:
    """Your result files, newest first; every version of a path is listed."""
    return _list(ctx, caller.id, **({"runtime_id": runtime_id} if runtime_id else {}))


@router.get("/runtimes/{runtime_id}/results", response_model=list[ResultOut])
def runtime_results(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[ResultOut]:
    """Result files of a runtime, newest first (also after the runtime was deleted)."""
    return _list(ctx, caller.id, runtime_id=runtime_id)


@router.get("/executions/{execution_id}/results", response_model=list[ResultOut])
def execution_results(execution_id: str, ctx: CtxDep, caller: CallerDep) -> list[ResultOut]:
    """The result files an execution created or changed."""
    return _list(ctx, caller.id, execution_id=execution_id)


@router.get("/results/{result_id}", response_model=ResultOut)
def get_result(result_id: ResultId, ctx: CtxDep, caller: CallerDep) -> ResultOut:
    with ctx.db.session() as s:
        row = s.get(ResultFile, result_id)
        if row is None or row.owner_id != caller.id:
            raise NotFoundError(f"result {result_id} does not exist")
        return _out(row)


@router.get(
    "/results/{result_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}},
)
def result_content(result_id: ResultId, ctx: CtxDep, caller: CallerDep) -> StreamingResponse:
    """Download a result file's content."""
    meta = get_result(result_id, ctx, caller)
    chunks: Iterator[bytes] = ctx.runner.results.store.open(meta.sha256)
    name = meta.path.rsplit("/", 1)[-1]
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(meta.size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
            "ETag": f'"{meta.sha256}"',
        },
    )
