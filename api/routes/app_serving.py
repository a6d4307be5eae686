"""Apps served: ``/apps/{team}/{name}/...`` proxied to the app (api/appproxy.py), and signing in
to apps in a browser (api/appsession.py).

Who may open an app is the domain's rule (``runner.apps.store.may_open``): a public app anyone,
a team app the team's members, signed in with the ``envctl_app`` cookie (or, for scripts, a
bearer token). A visitor who has not signed in gets 401 with the way to sign in, for a team app
and for a name that is no app alike (nothing tells them which); a signed-in outsider gets the
404 of an app that does not exist.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from api.appproxy import AppProxy
from api.appsession import COOKIE, COOKIE_SECONDS, AppSessions, Visitor
from api.deps import CtxDep
from envs.kit.errors import EnvctlError, NotFoundError, UnauthorizedError
from runner.apps.store import may_open

router = APIRouter(tags=["apps"], include_in_schema=False)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SIGNIN = "/apps/_signin"


def _sessions(request: Request, ctx: CtxDep) -> AppSessions:
    state = request.app.state
    if getattr(state, "app_sessions", None) is None:
        state.app_sessions = AppSessions(ctx.db, ctx.runner.secret_box)
    sessions: AppSessions = state.app_sessions
    return sessions


def _proxy(request: Request) -> AppProxy:
    state = request.app.state
    if getattr(state, "app_proxy", None) is None:
        state.app_proxy = AppProxy()
    proxy: AppProxy = state.app_proxy
    return proxy


FORM = """<!doctype html><html><head><meta charset="utf-8"><title>Sign in to envctl apps</title></head>
<body><h1>Sign in to envctl apps</h1><p>{message}</p>
<form method="post" action="/apps/_signin"><input type="hidden" name="next" value="{next}">
<label>API token <input type="password" name="token" autocomplete="off" required></label>
<button type="submit">Sign in</button></form>
<p>An API token: <code>envctl token create</code>. The browser keeps a cookie for /apps/ only,
for {hours} hours; it holds no token.</p></body></html>"""


def _form(next_url: str, message: str = "", status: int = 200) -> HTMLResponse:
    page = FORM.format(message=html.escape(message), next=html.escape(next_url), hours=COOKIE_SECONDS // 3600)
    return HTMLResponse(page, status_code=status)


def _safe_next(value: str) -> str:
    """Only a path of apps: never another site (an open redirect)."""
    return value if value.startswith("/apps/") and not value.startswith("//") and "\\" not in value else "/apps/"


@router.get(SIGNIN)
def signin_form(next: str = "/apps/") -> HTMLResponse:  # noqa: A002
    return _form(_safe_next(next))


@router.post(SIGNIN)
async def signin(request: Request, ctx: CtxDep) -> Response:
    """A form (``token``, ``next``) or a bearer header: the ``envctl_app`` cookie, then back to ``next``."""
    auth = request.headers.get("authorization", "")
    token, next_url = "", "/apps/"
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        next_url = request.query_params.get("next", "/apps/")
    else:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        next_url = (form.get("next") or ["/apps/"])[0]
    next_url = _safe_next(next_url)
    try:
        cookie = await run_in_threadpool(_sessions(request, ctx).sign_in, token)
    except UnauthorizedError:
        return _form(next_url, "That token is not valid.", status=401)
    response: Response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        COOKIE, cookie, max_age=COOKIE_SECONDS, path="/apps/", httponly=True, samesite="lax",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@router.api_route("/apps/{team}/{name}", methods=METHODS)
def app_root(team: str, name: str) -> Response:
    return RedirectResponse(f"/apps/{quote(team)}/{quote(name)}/", status_code=307)


@router.api_route("/apps/{team}/{name}/{path:path}", methods=METHODS)
async def serve_app(request: Request, ctx: CtxDep, team: str, name: str, path: str) -> Response:
    visitor = await _visitor(request, ctx)
    proxy = _proxy(request)
    found = proxy.cached(team, name)
    if found is None:
        found = await run_in_threadpool(ctx.runner.apps.store.serving, team, name)
        proxy.remember(team, name, found)
    teams = visitor.teams if visitor is not None else frozenset()
    if found is None or not may_open(found[0], teams):
        if visitor is None:
            return _form(_safe_next(request.url.path), "Sign in to open this app.", status=401)
        raise NotFoundError(f"no app {team[:64]}/{name[:64]} of yours", details={"team": team, "app": name})
    app, addresses = found
    if not addresses:
        return Response(f"app {team}/{name} is not running now\n", status_code=503, headers={"Retry-After": "2"})
    return await proxy.forward(request, proxy.pick(addresses), f"/apps/{team}/{name}", path)


async def _visitor(request: Request, ctx: CtxDep) -> Visitor | None:
    sessions = _sessions(request, ctx)
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        try:
            return await run_in_threadpool(sessions.visitor_of_token, auth[7:].strip())
        except EnvctlError:
            return None
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    return sessions.cached(cookie) or await run_in_threadpool(sessions.visitor, cookie)
