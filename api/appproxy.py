"""The proxy in front of apps: ``/apps/{team}/{name}/...`` sent to the app's port.

envctl reaches an app at its runtime container's address on the envctl network (the runner
records ``address:port`` per instance once the port answers: runner/apps/server.py). Requests
are spread over the current deployment's running instances in turn. The request and the answer
are streamed both ways (a server-sent event stream or a long download passes as it comes).

What the app never sees: envctl's API token (``Authorization`` is removed), the visitor's
sign-in cookie (``envctl_app`` is cut out of ``Cookie``; other cookies pass), and hop-by-hop
headers. It is told where it is mounted: ``X-Forwarded-Prefix: /apps/{team}/{name}``, with
``X-Forwarded-Host`` and ``X-Forwarded-Proto``.

WebSockets are not proxied yet: the server has no WebSocket implementation installed (uvicorn
needs ``websockets`` or ``wsproto``); see the README's Apps section.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api.appsession import COOKIE
from runner.apps.models import App

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "content-length",
}


def strip_cookie(value: str) -> str:
    """A ``Cookie`` header without envctl's sign-in cookie."""
    kept = [p.strip() for p in value.split(";") if p.strip() and p.strip().split("=", 1)[0] != COOKIE]
    return "; ".join(kept)


LOOKUP_TTL = 0.5  # seconds an app's instances are remembered (a takeover leaves the old ones 2 s)
Found = tuple[App, list[str]] | None


class AppProxy:
    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self._turn = itertools.count()
        self._found: dict[tuple[str, str], tuple[float, Found]] = {}

    def cached(self, team: str, name: str) -> Found:
        hit = self._found.get((team, name))
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def remember(self, team: str, name: str, found: Found) -> None:
        if len(self._found) > 4096:
            self._found.clear()
        self._found[(team, name)] = (time.monotonic() + LOOKUP_TTL, found)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=10.0),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
                follow_redirects=False,
            )
        return self._client

    def pick(self, addresses: list[str]) -> str:
        return sorted(addresses)[next(self._turn) % len(addresses)]

    async def forward(self, request: Request, address: str, prefix: str, path: str) -> Response:
        headers = []
        for key, value in request.headers.items():
            k = key.lower()
            if k in HOP_BY_HOP or k.startswith("x-forwarded-"):
                continue
            if k == "cookie":
                value = strip_cookie(value)
                if not value:
                    continue
            headers.append((k, value))
        headers += [
            ("x-forwarded-prefix", prefix),
            ("x-forwarded-host", request.headers.get("host", "")),
            ("x-forwarded-proto", request.url.scheme),
        ]
        query = request.url.query
        url = f"http://{address}/{path}" + (f"?{query}" if query else "")
        body = request.stream() if request.method not in ("GET", "HEAD", "OPTIONS") else None
        upstream = self.client.build_request(request.method, url, headers=headers, content=body)
        try:
            answer = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return Response(f"the app did not answer ({type(exc).__name__})\n", status_code=502)
        out = [(k, v) for k, v in answer.headers.multi_items() if k.lower() not in HOP_BY_HOP - {"content-length"}]
        return _response(answer, out)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def _chunks(answer: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in answer.aiter_raw():
        yield chunk


def _response(answer: httpx.Response, headers: list[tuple[str, str]]) -> Response:
    response = StreamingResponse(
        _chunks(answer), status_code=answer.status_code, background=BackgroundTask(answer.aclose)
    )
    response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    return response
