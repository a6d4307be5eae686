"""Results: files cells wrote under /results, kept by content after the runtime is gone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from api.deps import CallerDep, CtxDep
from api.schemas import ResultOut
from api.views import result_out
from runner.cells import result_queries as results_queries
from runner.runtimes.store import Viewer

router = APIRouter(tags=["results"])
ResultId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a result's id")]


def _list(
    ctx: CtxDep, viewer: Viewer, *, runtime_id: str | None = None, execution_id: str | None = None
) -> list[ResultOut]:
    with ctx.db.session() as s:
        rows = results_queries.list_results(s, viewer, runtime_id=runtime_id, execution_id=execution_id)
        return [result_out(r) for r in rows]


@router.get("/results", response_model=list[ResultOut])
def list_results(
    ctx: CtxDep, caller: CallerDep, runtime_id: Annotated[str | None, Query(max_length=64)] = None
) -> list[ResultOut]:
    """Your result files, newest first; every version of a path is listed."""
    return _list(ctx, caller.viewer, runtime_id=runtime_id or None)


@router.get("/runtimes/{runtime_id}/results", response_model=list[ResultOut])
def runtime_results(runtime_id: str, ctx: CtxDep, caller: CallerDep) -> list[ResultOut]:
    """Result files of a runtime, newest first (also after the runtime was deleted)."""
    return _list(ctx, caller.viewer, runtime_id=runtime_id)


@router.get("/executions/{execution_id}/results", response_model=list[ResultOut])
def execution_results(execution_id: str, ctx: CtxDep, caller: CallerDep) -> list[ResultOut]:
    """The result files an execution created or changed."""
    return _list(ctx, caller.viewer, execution_id=execution_id)


@router.get("/results/{result_id}", response_model=ResultOut)
def get_result(result_id: ResultId, ctx: CtxDep, caller: CallerDep) -> ResultOut:
    with ctx.db.session() as s:
        return result_out(results_queries.get_result(s, caller.viewer, result_id))


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
