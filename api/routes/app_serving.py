"""Signing in to apps in a browser (api/appsession.py): the form, and the cookie it sets.

Requests to the apps themselves (``/apps/{team}/{name}/...``) never reach a route: the gateway
middleware (api/appproxy.py) answers them.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from api.appsession import COOKIE, COOKIE_SECONDS, AppSessions, safe_next, signin_page
from api.deps import CtxDep
from envs.kit.errors import UnauthorizedError

router = APIRouter(tags=["apps"], include_in_schema=False)

SIGNIN = "/apps/_signin"


def _sessions(request: Request, ctx: CtxDep) -> AppSessions:
    state = request.app.state
    if getattr(state, "app_sessions", None) is None:
        state.app_sessions = AppSessions(ctx.db, ctx.runner.secret_box)
    sessions: AppSessions = state.app_sessions
    return sessions


@router.get(SIGNIN)
def signin_form(next: str = "/apps/") -> HTMLResponse:  # noqa: A002
    return HTMLResponse(signin_page(next))


@router.post(SIGNIN)
async def signin(request: Request, ctx: CtxDep) -> Response:
    """A form (``token``, ``next``) or a bearer header: the ``envctl_app`` cookie (HttpOnly,
    SameSite=Lax, Path=/apps/, short-lived, holding no token), then back to ``next``."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        next_url = request.query_params.get("next", "/apps/")
    else:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        next_url = (form.get("next") or ["/apps/"])[0]
    next_url = safe_next(next_url)
    try:
        cookie = await run_in_threadpool(_sessions(request, ctx).sign_in, token)
    except UnauthorizedError:
        return HTMLResponse(signin_page(next_url, "That token is not valid."), status_code=401)
    response: Response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        COOKIE, cookie, max_age=COOKIE_SECONDS, path="/apps/", httponly=True, samesite="lax",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response
