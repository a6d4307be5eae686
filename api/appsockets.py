"""WebSockets of apps: a visitor's ``/apps/{team}/{name}/...`` upgrade relayed to the app.

``api/appproxy.py`` decides who may open the app and which instance answers, as for HTTP; this
module opens the app's WebSocket (the ``websockets`` client, to ``ws://address/path``) with the
visitor's subprotocols and the headers the HTTP path passes (no ``Authorization``, no
``envctl_app`` cookie), accepts the visitor's with the subprotocol the app chose, and relays
text and binary messages both ways until one side closes; the other side is then closed with
the same code. A refusal is answered before the handshake completes: with the HTTP status and
body the HTTP path would give (uvicorn's ``websocket.http.response`` extension), or a close with
1008 (policy violation) where the server cannot send one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

log = logging.getLogger("envctl.apps")

MAX_MESSAGE = 16 * 1024 * 1024  # uvicorn's own limit on what a visitor sends
OPEN_TIMEOUT = 10.0
# Close codes a close frame may not carry (RFC 6455 7.4.1): what is sent in their place.
UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}


def _sendable(code: int | None) -> int:
    if code is None:
        return 1000
    return UNSENDABLE.get(code, code)


async def deny(scope: Scope, receive: Receive, send: Send, answer: Response) -> None:
    """Refuse an upgrade with the answer the HTTP path gives, where the server can say it."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await answer(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008})


async def relay(
    scope: Scope, receive: Receive, send: Send, address: str, headers: list[tuple[bytes, bytes]], label: str
) -> None:
    """Open the app's WebSocket at ``address`` and relay the visitor's to it until either ends."""
    path = scope.get("raw_path") or scope["path"].encode()
    target = (b"/" + path.split(b"/", 4)[4] if path.count(b"/") >= 4 else b"/").decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    origin = None
    passed: list[tuple[str, str]] = []
    for key, value in headers:
        if key.startswith(b"sec-websocket-") or key == b"host":
            continue  # the client makes its own handshake headers and names the app's address
        if key == b"origin":
            origin = value.decode("latin-1")
            continue
        passed.append((key.decode("latin-1"), value.decode("latin-1")))
    agent = next((v for k, v in passed if k == "user-agent"), None)
    try:
        upstream = await connect(
            f"ws://{address}{target}",
            additional_headers=passed,
            user_agent_header=None if agent is not None else "envctl",
            origin=Origin(origin) if origin is not None else None,
            subprotocols=scope.get("subprotocols") or None,
            compression=None,  # the app is on this host: deflating costs more than it saves
            max_size=MAX_MESSAGE,
            open_timeout=OPEN_TIMEOUT,
            proxy=None,  # never a proxy of the environment: the app is on envctl's network
        )
    except InvalidStatus as exc:
        resp = exc.response
        body = resp.body or b""
        await deny(scope, receive, send, Response(body, status_code=resp.status_code))
        return
    except Exception as exc:  # noqa: BLE001 - any other failure to open is a 502, as for HTTP
        log.info("app %s: WebSocket not opened (%s)", label, type(exc).__name__)
        await deny(scope, receive, send, Response(f"the app did not answer: {type(exc).__name__}\n", 502))
        return
    try:
        await _pump(scope, receive, send, upstream, label)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(upstream.close(), 5.0)


async def _pump(scope: Scope, receive: Receive, send: Send, upstream: ClientConnection, label: str) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the visitor left before the handshake ended
    accept: dict[str, Any] = {"type": "websocket.accept", "subprotocol": upstream.subprotocol}
    cookies = upstream.response.headers.get_all("Set-Cookie") if upstream.response else []
    if cookies:
        accept["headers"] = [(b"set-cookie", c.encode("latin-1")) for c in cookies]
    try:
        await send(accept)
    except Exception as exc:  # noqa: BLE001 - the visitor left while the app's side was opened
        log.info("app %s: WebSocket not accepted (%s)", label, type(exc).__name__)
        return
    ended = {"visitor": False, "told": False}

    async def from_visitor() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                if message.get("text") is not None:
                    await upstream.send(message["text"])
                elif message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
            elif message["type"] == "websocket.disconnect":
                ended["visitor"] = True
                await upstream.close(_sendable(message.get("code")), message.get("reason") or "")
                return

    async def from_app() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in upstream:
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        await _tell(send, upstream)
        ended["told"] = True

    tasks = [asyncio.create_task(from_visitor()), asyncio.create_task(from_app())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and (error := task.exception()) is not None:
                log.info("app %s: WebSocket ended (%s)", label, type(error).__name__)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not ended["visitor"] and not ended["told"]:  # the app's end was seen first in a send
            await _tell(send, upstream)


async def _tell(send: Send, upstream: ClientConnection) -> None:
    """Close the visitor's WebSocket with the code the app closed with."""
    with contextlib.suppress(Exception):  # the visitor may be gone already
        code = _sendable(upstream.close_code)
        await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})
