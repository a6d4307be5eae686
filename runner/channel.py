"""The runner's side of the agent protocol (see ``runner/agent/main.py``).

Two channels carry it (``ENVCTL_RUNNER_CHANNEL``):

- ``unix`` (the default for the local engine): the agent's Unix socket in the runtime's
  private state directory, a host bind mount. Only a runner on the engine's host reaches it.
- ``tcp``: the agent listens on a TCP port of the runtime's own address; envctl dials in,
  over TLS 1.3 with the per-boot certificate pinned, and both sides prove that they hold the
  runtime's credential for this boot before any request (``runner/agent/handshake.py``).

Why envctl dials in, not the runtime out: every engine envctl places runtimes with gives each
one an address that the servers of the installation can route to without publishing a port
on its node (a Docker bridge's container address, from the engine's host; an attachable Swarm
overlay network that envctl joins; a pod's IP, which the Kubernetes network model makes
reachable from every pod and node without NAT, as KubeSpawner relies on). Then

- the runtimes' network fence stays shut (R4): no runtime needs a route to any port of
  envctl's, so no cell can even reach a listener of envctl's to probe it; dialling out would
  have opened one port on every server's host to every cell;
- the address and the sealed credential are on the runtime's row (``backend_state``), so any
  server of the installation can reach any runtime, and one restarted (R11) reconnects to a
  recorded address at once: nothing waits for an agent to redial with backoff;
- the protocol keeps its shape: one caller per connection, an interrupt on a connection of
  its own while a cell streams on another; dialling out would have needed a pool of parked
  connections or multiplexing.

What it costs: envctl must run where runtimes' addresses route (inside the cluster's network,
as JupyterHub's hub does); a runtime behind NAT that envctl cannot route to is not supported.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.kit.errors import BackendError
from runner.agent import handshake
from runner.errors import AgentUnavailableError

__all__ = ["AgentAddress", "AgentChannel", "AgentTarget", "AgentUnavailableError", "ping", "wait_for_agent"]

log = logging.getLogger("envctl.channel")


@dataclass(frozen=True)
class AgentAddress:
    """Where a tcp channel's agent listens, and what proves envctl to it (never shown: no
    ``repr`` of the key). ``report`` writes refusals into the runtime's runner log."""

    host: str
    port: int
    runtime_id: str
    boot: str
    key: bytes = field(repr=False)
    pin: str  # SHA-256 of the agent's per-boot certificate (DER)
    report: Callable[[str, str, dict[str, Any]], None] | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


AgentTarget = Path | AgentAddress
_TLS = handshake.client_context()

# sockaddr_un holds 108 bytes; deeper paths are reached through /proc/self/fd/<dir fd>.
_SUN_PATH_MAX = 100
# The buffer a connection's events are read through: a fast printer's outputs come as lines of
# up to the agent's MERGE_MAX (256 KB); with the default 8 KB buffer each was 32 reads and joins,
# about 4 ms of a stream's 8 MB (of ~130 ms) on the machine here.
READ_BUFFER = 256 * 1024


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


def _connect_tcp(address: AgentAddress, timeout: float) -> tuple[socket.socket, Any]:
    """A TLS connection to the agent, its certificate pinned, the handshake done."""
    raw = socket.create_connection((address.host, address.port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = _TLS.wrap_socket(raw)
    except (OSError, ssl.SSLError):
        raw.close()
        raise
    reader = sock.makefile("rb", buffering=READ_BUFFER)
    try:
        der = sock.getpeercert(binary_form=True) or b""
        if not handshake.same(handshake.fingerprint(der), address.pin):
            raise handshake.RefusedError("its TLS certificate is not this boot's")
        reported = handshake.dial(sock, reader, address.runtime_id, address.boot, address.key)
    except handshake.RefusedError as exc:
        reader.close()
        sock.close()
        theirs = str(exc).startswith("the agent refused")
        message = (
            f"envctl's connection to the agent at {address} was refused: {exc}"
            if theirs
            else f"envctl refused the agent at {address}: {exc} (an address now another container's?)"
        )
        log.warning("runtime %s: %s", address.runtime_id, message)
        if address.report is not None:
            address.report(address.runtime_id, message, {"peer": str(address), "side": "agent" if theirs else "envctl"})
        raise AgentUnavailableError(message) from exc
    except BaseException:
        reader.close()
        sock.close()
        raise
    for refusal in reported:
        message = f"the agent refused a connection from {refusal.get('peer')}: {refusal.get('reason')}"
        log.warning("runtime %s: %s", address.runtime_id, message)
        if address.report is not None:
            address.report(address.runtime_id, message, {**refusal, "side": "agent"})
    return sock, reader


class AgentChannel:
    """One connection to one agent. Not thread-safe: one caller at a time."""

    _ids = itertools.count(1)

    def __init__(self, target: AgentTarget, timeout: float = 10.0) -> None:
        self.target = target
        try:
            if isinstance(target, AgentAddress):
                self._sock, self._reader = _connect_tcp(target, timeout)
            else:
                self._sock = _connect(target, timeout)
                self._reader = self._sock.makefile("rb", buffering=READ_BUFFER)
        except (OSError, ssl.SSLError) as exc:
            raise AgentUnavailableError(
                f"the runtime's agent does not answer at {target}: {getattr(exc, 'strerror', None) or exc}"
            ) from exc
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
        return self.open_stream_within(None, op, fields)

    def open_stream_within(
        self, read_timeout: float | None, op: str, fields: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """``open_stream`` with a time limit on each read (``results``: a node gone silently)."""
        self._send(op, fields)
        try:
            self._sock.settimeout(read_timeout)
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

    def write(self, data: bytes) -> None:
        """Raw bytes after an ``open_stream`` request whose op reads them (``unpack``: frames)."""
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise AgentUnavailableError(f"lost the connection to the agent: {exc}") from exc

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
        with contextlib.suppress(OSError):
            self._reader.close()
            self._sock.close()

    def __enter__(self) -> AgentChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(target: AgentTarget, timeout: float = 2.0) -> dict[str, Any]:
    """One ping on a fresh connection."""
    with AgentChannel(target, timeout) as channel:
        return channel.ping()


def wait_for_agent(
    target: AgentTarget, deadline: float, *, alive: Any = None, interval: float = 0.003
) -> dict[str, Any]:
    """Ping the agent until it answers or ``deadline`` (a ``time.monotonic()`` value) passes.

    ``alive`` is an optional callable, checked now and then, that raises when the container
    died so we stop waiting early.
    """
    last_error: Exception | None = None
    checks = 0
    while True:
        if isinstance(target, AgentAddress) or target.exists():
            try:
                return ping(target, timeout=max(0.5, min(5.0, deadline - time.monotonic())))
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
