"""A fast path for the API's hottest request: running a cell.

``POST /runtimes/{id}/executions`` is what an editor sends for every cell, and a trivial cell
should come back in a few milliseconds. FastAPI's request machinery (routing, dependency
solving, validating the answer again) costs more CPU than the rest of the round trip together,
so this ASGI middleware answers that one request directly, with the same pieces the route uses:
the same token cache, the same body model, the same function (``api.cells.run_cell``) and the
same error envelope.

It takes only the plain case: a token already in the cache, a JSON body that validates, and a
``wait`` query that is a number in range. Anything else (first use of a token, a bad body, an
odd query) goes on to the FastAPI route unchanged, with the body handed over as it came, so
unusual requests get exactly the route's behaviour and its error messages.
``tests/api/test_fastpath.py`` checks that both paths give the same answers.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.cells import MAX_WAIT, run_cell
from api.errors import error_response
from api.schemas import ExecutionCreate
from envs.kit.errors import EnvctlError

_PATH = re.compile(r"/runtimes/([A-Za-z0-9_.-]{1,64})/executions")
_MAX_BODY = 2 * 1024 * 1024 + 4096  # a cell is at most 1 MiB of text; JSON escaping may double it


class CellFastPath:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: .ctx and .callers
        state.fast_cells = 0  # cells this path took, for tests and the curious

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _PATH.fullmatch(scope["path"])
        caller = self._cached_caller(scope) if match else None
        wait = _wait(scope.get("query_string", b"")) if caller else None
        if match is None or caller is None or wait is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        cell: ExecutionCreate | None = None
        if complete:
            try:
                cell = ExecutionCreate.model_validate_json(body)
            except ValidationError:
                cell = None
        if cell is None:  # the route says what is wrong, in its own words
            await self.app(scope, _replay(body, receive, complete), send)
            return
        self.state.fast_cells += 1
        try:
            out = await run_cell(self.state.ctx, caller, match.group(1), cell, wait)
        except EnvctlError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await _answer(send, out.model_dump_json().encode())

    def _cached_caller(self, scope: Scope) -> Any:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return None
                return self.state.callers.get(token.strip())
        return None


async def _answer(send: Send, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == b"application/json")
    return False


def _wait(query: bytes) -> float | None:
    """The ``wait`` parameter if the query is just that (or empty); None sends it to the route."""
    if not query:
        return 0.0
    name, _, raw = query.partition(b"=")
    if name != b"wait" or not raw or b"&" in raw or b"%" in raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_WAIT:
        return None
    return value


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body; ``complete`` is False when it is over the size a cell can have (the
    rest is left for the route, which refuses it)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > _MAX_BODY:
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive, complete: bool) -> Receive:
    """A ``receive`` that hands over what was read, then whatever is still to come."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return again
