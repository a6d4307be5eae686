"""The one place errors become HTTP responses.

Every error answer has the same envelope::

    {"error": {"code": "invalid_input", "message": "name: ...", "details": {"field": "name"}}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from envs.kit.errors import EnvctlError, TooManyRequestsError

log = logging.getLogger("envctl.api")


def envelope(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _problem(err: Any) -> str:
    """Pydantic's message, said for people where it speaks in regular expressions."""
    if err.get("type") == "string_pattern_mismatch":
        value = err.get("input")
        shown = f" (got {value[:80]!r})" if isinstance(value, str) else ""
        return "may contain only lower-case letters, digits, and . _ - between them" + shown
    if err.get("type") == "extra_forbidden":
        return "is not a field of this request"
    return str(err.get("msg", "invalid"))


def error_response(exc: EnvctlError) -> JSONResponse:
    """An envctl error as the HTTP answer: its status, the envelope, Retry-After on a 429."""
    headers = {}
    if isinstance(exc, TooManyRequestsError):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return JSONResponse(envelope(exc.code, exc.message, exc.details), status_code=exc.status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(EnvctlError)
    async def _envctl_error(_request: Request, exc: EnvctlError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            field = "body" if err.get("type") == "json_invalid" else _field_of(err.get("loc", ()))
            problems.append({"field": field, "problem": _problem(err)})
        first = problems[0] if problems else {"field": "body", "problem": "invalid request"}
        message = f"{first['field']}: {first['problem']}"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        return JSONResponse(
            envelope("invalid_input", message, {"field": first["field"], "problems": problems}),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return JSONResponse(
            envelope(code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            envelope("internal", "envctl failed unexpectedly; the server log has the details"),
            status_code=500,
        )
