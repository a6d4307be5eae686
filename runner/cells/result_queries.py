"""Reading recorded results: the versions of the files a user's cells wrote under ``/results``.

Every query is scoped to what the caller sees: results of their own runtimes and of their teams'
(a result carries its runtime's owner and team, ``runner/runtimes/store.py`` decides); any other does
not exist for the caller (404), the same as a result id that was never recorded. Records
outlive their runtime.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from runner.cells.result_files import ResultNotFoundError
from runner.models import ResultFile
from runner.runtimes.store import Who, viewer_of

LIST_LIMIT = 1000  # newest first; older versions are still readable by id


def list_results(
    session: Session, who: Who, *, runtime_id: str | None = None, execution_id: str | None = None
) -> list[ResultFile]:
    """The result files ``who`` sees, newest first, optionally those of one runtime or
    execution; every recorded version of a path is listed."""
    q = select(ResultFile).where(viewer_of(who).where(ResultFile.owner_id, ResultFile.team))
    if runtime_id is not None:
        q = q.where(ResultFile.runtime_id == runtime_id)
    if execution_id is not None:
        q = q.where(ResultFile.execution_id == execution_id)
    return list(session.scalars(q.order_by(ResultFile.id.desc()).limit(LIST_LIMIT)))


def get_result(session: Session, who: Who, result_id: int) -> ResultFile:
    """One recorded result ``who`` sees; ``ResultNotFoundError`` for any other."""
    row = session.get(ResultFile, result_id)
    if row is None or not viewer_of(who).sees(row.owner_id, row.team):
        raise ResultNotFoundError(f"result {result_id} does not exist", details={"result_id": result_id})
    return row
