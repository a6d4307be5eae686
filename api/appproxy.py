"""The gateway in front of apps: ``/apps/{team}/{name}/...`` sent to the app's port.

An ASGI middleware (as ``api/fastpath.py`` is for cells): every request under ``/apps/`` but
the sign-in page (``/apps/_signin``, a route of ``api/routes/app_serving.py``) is answered here,
without FastAPI's routing and dependency solving, and forwarded over HTTP/1.1 connections kept
open to the app (``Upstream``: a small client of its own; a general-purpose client cost about
3 ms a request on this machine, several times the app's own time).

Who may open it: the domain's rule (``runner.apps.store.may_open``) on the visitor the
``envctl_app`` cookie names (api/appsession.py), or a bearer token for scripts. A visitor who is
not signed in gets 401 and the sign-in form, for a team app and for a name that is no app alike
(nothing tells them which); a signed-in outsider gets the 404 of an app that does not exist.

envctl reaches an app where its runtime's backend says the app's port is (the container's address
on the envctl network; on Swarm the node's published port): the runner records ``host:port`` per
instance once it answers (runner/apps/server.py). Requests
are spread over the current deployment's running instances in turn. Bodies are streamed both
ways (a server-sent event stream or a long download passes as it comes). A request body of up to
``MAX_BUFFERED`` bytes (a form, JSON) is read whole and sent with the request, on a kept
connection (which is replaced once when the app had closed it); a bigger one, or one of unknown
length (the visitor sent it chunked), is passed on as it arrives, with the visitor's
``Content-Length`` or chunked, on a connection of its own (nothing of it is kept to send again),
with at most a few chunks in envctl's memory at once: the ASGI server stops reading the
visitor's socket while the app is slow to take what came (``Upstream._pump`` sends each chunk
before it asks for more). An app that answers before it read such a body (a 413) and closes with
the rest unread (the kernel resets the connection) is heard: its answer reaches the visitor
(``api/appstream.py``).

What the app never sees: envctl's API token (``Authorization`` is removed), the visitor's
sign-in cookie (``envctl_app`` is cut out of ``Cookie``; other cookies pass), and hop-by-hop
headers. It is told where it is mounted: ``X-Forwarded-Prefix: /apps/{team}/{name}``, with
``X-Forwarded-Host``, ``X-Forwarded-Proto`` and ``X-Forwarded-For``.

WebSocket upgrades to the same addresses pass the same door and go to an instance chosen the
same way; ``api/appsockets.py`` relays them (the app sees the same headers, but ``Host`` names
its own address: the visitor's is in ``X-Forwarded-Host``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api import appsockets
from api.appsession import COOKIE, AppSessions, Visitor, signin_page
from api.appstream import StreamedConnection
from api.errors import error_response
from envs.kit.errors import EnvctlError, NotFoundError
from runner.apps.models import App
from runner.apps.store import may_open

log = logging.getLogger("envctl.apps")

LOOKUP_TTL = 0.5  # seconds an app's instances are remembered (a takeover leaves the old ones 2 s)
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"authorization", b"content-length",
    b"expect",  # a visitor's "100-continue" was answered by the ASGI server when its body was asked for
}  # fmt: skip
MAX_HEAD = 64 * 1024
CHUNK = 64 * 1024
MAX_BUFFERED = 256 * 1024  # a request body up to this is read whole; a bigger one streams
IDLE_PER_ADDRESS = 32
Found = tuple[App, list[str]] | None


class _UpstreamError(Exception):
    """The app did not answer, or answered what is no HTTP/1.1."""


class _VisitorGoneError(Exception):
    """The visitor went away before their request's body was all sent."""


@dataclass
class Outgoing:
    """A request for the app: its head, and its body either whole (``body``) or as it comes
    from the visitor (``stream``, sent chunked when ``chunked``, else as the head's length says)."""

    head: bytes
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    chunked: bool = False


def strip_cookie(value: str) -> str:
    """A ``Cookie`` header without envctl's sign-in cookie."""
    kept = [p.strip() for p in value.split(";") if p.strip() and p.strip().split("=", 1)[0] != COOKIE]
    return "; ".join(kept)


class Upstream:
    """HTTP/1.1 to apps with connections kept open per address."""

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def _connect(
        self, address: str, fresh: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        pool = None if fresh else self._idle.get(address)
        while pool:
            reader, writer = pool.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5.0)
        except (OSError, TimeoutError) as exc:
            raise _UpstreamError(f"cannot connect ({type(exc).__name__})") from exc
        return reader, writer, False

    def _release(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pool = self._idle.setdefault(address, [])
        if len(pool) < IDLE_PER_ADDRESS:
            pool.append((reader, writer))
        else:
            writer.close()

    async def exchange(
        self, address: str, request: Outgoing, has_body: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], AsyncIterator[bytes]]:
        """Send the request; its status, headers and body. A kept connection that the app closed
        meanwhile is replaced once, before any answer was read (not for a streamed body: that
        goes on a new connection, as nothing of it could be sent again)."""
        if request.stream is not None:
            return await self._exchange_streamed(address, request, has_body)
        for attempt in (0, 1):
            reader, writer, reused = await self._connect(address)
            try:
                writer.write(request.head)
                if request.body:
                    writer.write(request.body)
                await writer.drain()
                raw = await _final_head(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                writer.close()
                if reused and attempt == 0:
                    continue
                raise _UpstreamError(f"no answer ({type(exc).__name__})") from exc
            return self._answer(address, reader, writer, raw, has_body)
        raise _UpstreamError("no answer")

    async def _exchange_streamed(
        self, address: str, request: Outgoing, has_body: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], AsyncIterator[bytes]]:
        """The body is pumped beside the wait for the answer's head, on a connection of its own
        (``StreamedConnection``): an app may answer before it read it all (a 413, a redirect),
        and close with the rest unread; its answer is delivered. A visitor who goes away
        mid-body ends the exchange."""
        assert request.stream is not None
        host, _, port = address.rpartition(":")
        try:
            conn = await StreamedConnection.open(host, int(port))
        except (OSError, TimeoutError) as exc:
            raise _UpstreamError(f"cannot connect ({type(exc).__name__})") from exc
        pump = asyncio.ensure_future(self._pump(conn, request.head, request.stream, request.chunked))
        head = asyncio.ensure_future(_final_head(conn.reader))
        try:
            while not head.done():
                await asyncio.wait({pump, head} if not pump.done() else {head}, return_when=asyncio.FIRST_COMPLETED)
                failed = pump.exception() if pump.done() and not head.done() else None
                if failed is not None and not isinstance(failed, OSError):
                    raise failed  # the visitor went away: the app's answer is no one's
                # an app that stopped reading (or reset the connection) may still answer: its head is waited for
            raw = head.result()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _VisitorGoneError) as exc:
            for task in (pump, head):
                task.cancel()
            conn.close()
            raise _UpstreamError(f"no answer ({type(exc).__name__})") from exc
        except BaseException:
            for task in (pump, head):
                task.cancel()
            conn.close()
            raise
        return self._answer(address, conn.reader, conn, raw, has_body, pump)

    @staticmethod
    async def _pump(conn: StreamedConnection, head: bytes, stream: AsyncIterator[bytes], chunked: bool) -> None:
        """The request's head, then the visitor's body to the app, a chunk at a time: the next is
        asked for only when the last one was sent (so envctl holds a few chunks at most, whatever
        the body's size)."""
        await conn.send(head)
        async for data in stream:
            await conn.send(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if chunked:
            await conn.send(b"0\r\n\r\n")

    def _answer(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | StreamedConnection,
        raw: bytes,
        has_body: bool,
        pump: asyncio.Future[None] | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], AsyncIterator[bytes]]:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            writer.close()
            raise _UpstreamError("the app's answer is not HTTP/1.1")
        status = int(parts[1])
        headers = []
        length: int | None = None
        chunked = close = False
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
            if name not in HOP_BY_HOP or name == b"content-length":
                headers.append((name, value))
        if not has_body or status in (204, 304) or 100 <= status < 200:
            length, chunked = 0, False
        if chunked:
            headers = [(k, v) for k, v in headers if k != b"content-length"]
        return status, headers, self._body(address, reader, writer, length, chunked, close, pump)

    async def _body(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | StreamedConnection,
        length: int | None,
        chunked: bool,
        close: bool,
        pump: asyncio.Future[None] | None = None,
    ) -> AsyncIterator[bytes]:
        done = False
        try:
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                            pass
                        break
                    left = size
                    while left:
                        data = await reader.read(min(CHUNK, left))
                        if not data:
                            raise asyncio.IncompleteReadError(b"", left)
                        left -= len(data)
                        yield data
                    await reader.readexactly(2)
            elif length is not None:
                left = length
                while left:
                    data = await reader.read(min(CHUNK, left))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield data
            else:  # delimited by the connection's end
                close = True
                while data := await reader.read(CHUNK):
                    yield data
            done = True
        finally:
            # a request body still going (the app answered first), or broken off: the
            # connection is in no state to be used again
            sent = pump is None or (pump.done() and not pump.cancelled() and pump.exception() is None)
            if pump is not None and not pump.done():
                pump.cancel()
            if done and not close and sent and isinstance(writer, asyncio.StreamWriter):
                self._release(address, reader, writer)  # a streamed body's connection is not kept
            else:
                writer.close()


async def _final_head(reader: asyncio.StreamReader) -> bytes:
    """The head of the app's answer, past any interim one (``100 Continue``, ``103 Early Hints``:
    not for the visitor, whose ASGI server speaks for itself)."""
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        status = raw[9:12]
        if not (raw.startswith(b"HTTP/1.") and status[:1] == b"1" and status != b"101"):
            return raw


def _not_running(team: str, name: str) -> Response:
    return PlainTextResponse(f"app {team}/{name} is not running now\n", 503, headers={"Retry-After": "2"})


class AppGateway:
    """The ASGI middleware: requests under ``/apps/`` (but ``/apps/_signin``) end here."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: .ctx
        self.upstream = Upstream()
        self._turn = itertools.count()
        self._found: dict[tuple[str, str], tuple[float, Found]] = {}
        self._sessions: AppSessions | None = None
        state.app_gateway = self  # the apps' routes tell it of a stop (forget)

    def forget(self, team: str, name: str) -> None:
        """An app stopped or removed through this process: its remembered instances go now."""
        self._found.pop((team, name), None)

    @property
    def sessions(self) -> AppSessions:
        if self._sessions is None:
            ctx = self.state.ctx
            self._sessions = AppSessions(ctx.db, ctx.runner.secret_box)
            self.state.app_sessions = self._sessions
        return self._sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        kind = scope["type"]
        if kind not in ("http", "websocket") or not path.startswith("/apps/") or path.startswith("/apps/_signin"):
            await self.app(scope, receive, send)
            return
        team, _, rest = path[len("/apps/") :].partition("/")
        name, slash, sub = rest.partition("/")
        admitted: str | Response
        if not team or not name:
            admitted = PlainTextResponse("no app here: /apps/TEAM/NAME/\n", status_code=404)
        elif not slash and kind == "http":
            location = f"/apps/{team}/{name}/".encode()
            await send({"type": "http.response.start", "status": 307, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
            return
        elif not slash:
            admitted = PlainTextResponse(f"no app here: /apps/{team}/{name}/ is the app\n", status_code=404)
        else:
            team, name = unquote(team), unquote(name)
            try:
                admitted = await self._admit(scope, team, name)
            except EnvctlError as exc:
                admitted = error_response(exc)
        if isinstance(admitted, Response):
            if kind == "websocket":
                await appsockets.deny(scope, receive, send, admitted)
            else:
                await admitted(scope, receive, send)
            return
        prefix = f"/apps/{team}/{name}"
        if kind == "websocket":
            headers = forwarded_headers(scope, dict(scope["headers"]), prefix)
            await appsockets.relay(scope, receive, send, admitted, headers, f"{team}/{name}")
        else:
            await self._forward(scope, receive, send, admitted, (team, name))

    async def _visitor(self, headers: dict[bytes, bytes]) -> Visitor | None:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            try:
                return await run_in_threadpool(self.sessions.visitor_of_token, auth[7:].strip())
            except EnvctlError:
                return None
        cookie = _cookie(headers.get(b"cookie", b"").decode("latin-1"))
        if not cookie:
            return None
        return self.sessions.cached(cookie) or await run_in_threadpool(self.sessions.visitor, cookie)

    async def _lookup(self, team: str, name: str) -> Found:
        hit = self._found.get((team, name))
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        found: Found = await run_in_threadpool(self.state.ctx.runner.apps.store.serving, team, name)
        if len(self._found) > 4096:
            self._found.clear()
        self._found[(team, name)] = (time.monotonic() + LOOKUP_TTL, found)
        return found

    async def _admit(self, scope: Scope, team: str, name: str) -> str | Response:
        """The address of the instance to answer, or the answer of a refusal."""
        headers = dict(scope["headers"])
        visitor = await self._visitor(headers)
        found = await self._lookup(team, name)
        teams = visitor.teams if visitor is not None else frozenset()
        if found is None or not may_open(found[0], teams):
            if visitor is None:
                return HTMLResponse(signin_page(scope["path"], "Sign in to open this app."), status_code=401)
            raise NotFoundError(f"no app {team[:64]}/{name[:64]} of yours", details={"team": team, "app": name})
        addresses = sorted(found[1])
        if not addresses:
            return _not_running(team, name)
        return addresses[next(self._turn) % len(addresses)]

    async def _forward(self, scope: Scope, receive: Receive, send: Send, address: str, app: tuple[str, str]) -> None:
        label = "/".join(app)
        prefix = f"/apps/{label}"
        headers = dict(scope["headers"])
        request = await _request(scope, receive, headers, prefix)
        try:
            status, out, chunks = await self.upstream.exchange(address, request, scope["method"] != "HEAD")
        except _UpstreamError as exc:
            # The instances were remembered for LOOKUP_TTL: an app stopped since (here or by another
            # API process) is "not running" (503, try later), not a broken app (502).
            self._found.pop(app, None)
            found = await self._lookup(*app)
            answer = _not_running(*app) if found is None or address not in found[1] else None
            answer = answer or PlainTextResponse(f"the app did not answer: {exc}\n", status_code=502)
            await answer(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": status, "headers": out})
        try:
            async for data in chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except Exception as exc:  # noqa: BLE001 - the app or the visitor broke off: the answer ends here
            log.info("app %s: answer cut short (%s)", label, type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b""})


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == COOKIE:
            return value
    return None


async def _request(scope: Scope, receive: Receive, headers: dict[bytes, bytes], prefix: str) -> Outgoing:
    """The request for the app: its line and headers, and its body, read whole when the visitor
    said it is at most ``MAX_BUFFERED`` bytes (or sent no length and no chunks: nothing, as
    HTTP/1.1 has it), else passed on as it comes, framed as the visitor framed it."""
    path = scope.get("raw_path") or scope["path"].encode()
    target = b"/" + path.split(b"/", 4)[4] if path.count(b"/") >= 4 else b"/"
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    lines = [f"{scope['method']} ".encode() + target + b" HTTP/1.1"]
    lines += [key + b": " + value for key, value in forwarded_headers(scope, headers, prefix)]
    length = headers.get(b"content-length", b"").strip()
    chunked = b"transfer-encoding" in headers  # the server checked it and took the chunks apart
    if chunked or (length.isdigit() and int(length) > MAX_BUFFERED):
        lines.append(b"transfer-encoding: chunked" if chunked else b"content-length: " + length)
        return Outgoing(b"\r\n".join(lines) + b"\r\n\r\n", stream=_body_of(receive), chunked=chunked)
    body = b""
    if scope["method"] not in ("GET", "HEAD") or length:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        lines.append(b"content-length: " + str(len(body)).encode())
    return Outgoing(b"\r\n".join(lines) + b"\r\n\r\n", body)


async def _body_of(receive: Receive) -> AsyncIterator[bytes]:
    """The visitor's request body as the ASGI server hands it over."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _VisitorGoneError()
        data = message.get("body", b"")
        if data:
            yield data
        if not message.get("more_body"):
            return


def forwarded_headers(scope: Scope, headers: dict[bytes, bytes], prefix: str) -> list[tuple[bytes, bytes]]:
    """The visitor's headers as the app gets them: no hop-by-hop ones, no ``Authorization``, no
    ``envctl_app`` cookie, and where it is mounted and for whom."""
    out = []
    for key, value in scope["headers"]:
        if key in HOP_BY_HOP or key.startswith(b"x-forwarded-"):
            continue
        if key == b"cookie":
            value = strip_cookie(value.decode("latin-1")).encode("latin-1")
            if not value:
                continue
        out.append((key, value))
    client = scope.get("client") or ("", 0)
    out += [
        (b"host", headers.get(b"host", b"app")),
        (b"x-forwarded-prefix", prefix.encode()),
        (b"x-forwarded-host", headers.get(b"host", b"")),
        (
            b"x-forwarded-proto",
            {"ws": b"http", "wss": b"https"}.get(scope.get("scheme", ""), b"http")
            if scope["type"] == "websocket"
            else scope.get("scheme", "http").encode(),
        ),
        (b"x-forwarded-for", str(client[0]).encode()),
    ]
    return out
