"""The runner's side of the agent protocol (see ``runner/agent/main.py``)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envs.kit.errors import BackendError
from runner.errors import AgentUnavailableError

__all__ = ["AgentChannel", "AgentUnavailableError", "ping", "wait_for_agent"]

# sockaddr_un holds 108 bytes; deeper paths are reached through /proc/self/fd/<dir fd>.
_SUN_PATH_MAX = 100


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    target = str(path)
    if len(target) <= _SUN_PATH_MAX:
        sock.connect(target)
        return sock
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)
    return sock


class AgentChannel:
    """One connection to one agent. Not thread-safe: one caller at a time."""

    _ids = itertools.count(1)

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        try:
            self._sock = _connect(path, timeout)
        except OSError as exc:
            raise AgentUnavailableError(
                f"the runtime's agent does not answer at {path}: {exc.strerror or exc}"
            ) from exc
        self._reader = self._sock.makefile("rb")
        self._unread = 0  # replies to ``post`` requests not read yet

    def post(self, op: str, **fields: Any) -> None:
        """Send a request whose reply nobody waits for (``ack``): it is read, and dropped,
        before the next request's. Saves a round trip between two cells."""
        self._send(op, fields)
        self._unread += 1

    def _send(self, op: str, fields: dict[str, Any]) -> None:
        payload = json.dumps({"id": next(self._ids), "op": op, **fields}, separators=(",", ":")) + "\n"
        try:
            self._sock.sendall(payload.encode())
        except OSError as exc:
            raise AgentUnavailableError(f"lost the connection to the agent: {exc}") from exc

    def _skip_unread(self) -> None:
        while self._unread:
            line = self._reader.readline()
            if not line:
                raise AgentUnavailableError("the agent closed the connection")
            self._unread -= 1

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self._send(op, fields)
        try:
            self._skip_unread()
            line = self._reader.readline()
        except OSError as exc:
            raise AgentUnavailableError(f"lost the connection to the agent: {exc}") from exc
        if not line:
            raise AgentUnavailableError("the agent closed the connection")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise BackendError(f"the agent refused {op!r}: {reply.get('error')}", details=reply)
        return reply

    def ping(self) -> dict[str, Any]:
        return self.request("ping")

    def open_stream(self, op: str, **fields: Any) -> tuple[dict[str, Any], Any]:
        """Send a request answered by one JSON header line, then bytes the op frames itself
        (``layer``: ``runner/agent/layer.py``); the header and the connection's binary reader,
        just after it. No time limit between reads, as for ``stream``."""
        self._send(op, fields)
        try:
            self._sock.settimeout(None)
            self._skip_unread()
            line = self._reader.readline()
        except OSError as exc:
            raise AgentUnavailableError(f"lost the connection to the agent: {exc}") from exc
        if not line:
            raise AgentUnavailableError("the agent closed the connection")
        header: dict[str, Any] = json.loads(line)
        if not header.get("ok"):
            raise BackendError(f"the agent refused {op!r}: {header.get('error')}", details=header)
        return header, self._reader

    def stream(self, op: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Send a streaming request (``execute``, ``attach``); yield its events up to ``done``.

        The request is sent before this returns, so the caller can do other work while the
        agent starts on it. The first event is ``accepted``. Waits without a time limit
        between events: a cell may be quiet for hours; a dead agent closes the socket.
        """
        self._send(op, fields)
        return self._events(op)

    def _events(self, op: str) -> Iterator[dict[str, Any]]:
        try:
            self._sock.settimeout(None)
            self._skip_unread()
            while True:
                line = self._reader.readline()
                if not line:
                    raise AgentUnavailableError("the agent closed the connection")
                event: dict[str, Any] = json.loads(line)
                if event.get("ok") is False:
                    raise BackendError(f"the agent refused {op!r}: {event.get('error')}", details=event)
                yield event
                if event.get("event") == "done":
                    return
        except OSError as exc:
            raise AgentUnavailableError(f"lost the connection to the agent: {exc}") from exc

    def close(self) -> None:
        try:
            self._reader.close()
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> AgentChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(path: Path, timeout: float = 2.0) -> dict[str, Any]:
    """One ping on a fresh connection."""
    with AgentChannel(path, timeout) as channel:
        return channel.ping()


def wait_for_agent(path: Path, deadline: float, *, alive: Any = None, interval: float = 0.003) -> dict[str, Any]:
    """Ping the agent until it answers or ``deadline`` (a ``time.monotonic()`` value) passes.

    ``alive`` is an optional callable, checked now and then, that raises when the container
    died so we stop waiting early.
    """
    last_error: Exception | None = None
    checks = 0
    while True:
        if path.exists():
            try:
                return ping(path, timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            except (AgentUnavailableError, OSError) as exc:
                last_error = exc
        checks += 1
        if alive is not None and checks % 50 == 0:
            alive()
        if time.monotonic() >= deadline:
            raise AgentUnavailableError(
                "the agent did not answer in time" + (f" (last error: {last_error})" if last_error else ""),
            )
        time.sleep(interval)
