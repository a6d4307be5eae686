"""Fixtures for the CLI's exec, run and results tests.

The server is the one of ``test_cli.py`` (uvicorn in a thread, the app on the fake backend,
which runs the real agent as a local process, so python and bash cells really run); this
module re-exports it and adds what following executions needs: a TCP proxy that can cut an
event stream mid-way, and a way to send the CLI a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.api.test_cli import Server, _free_port, _isolated_client_config, run, server

__all__ = [
    "CuttingProxy",
    "Server",
    "_isolated_client_config",
    "api_get",
    "ctrl_c_when",
    "cutting_proxy",
    "run",
    "server",
]


def api_get(server: Server, path: str) -> Any:
    resp = httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.token}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


@dataclass
class CuttingProxy:
    """A TCP proxy in front of the server. The first ``/events`` response that carries
    ``cut_after`` output events is cut off right after them (both sockets closed), as a
    dropped connection would be. Every request line and header block is recorded."""

    upstream_port: int
    cut_after: int = 2
    port: int = field(default_factory=_free_port)
    requests: list[bytes] = field(default_factory=list)
    cuts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        following_events = False
        outputs = 0
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if b" HTTP/1.1\r\n" in data:
                            self.requests.append(data)
                            following_events = data.startswith(b"GET /executions/") and b"/events" in data
                            outputs = 0
                        upstream.sendall(data)
                        continue
                    client.sendall(data)
                    if following_events and self.cuts == 0:
                        outputs += data.count(b"event: output")
                        if outputs >= self.cut_after and b"event: status" not in data:
                            self.cuts += 1
                            return  # both sockets close in finally: the stream is cut
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def events_requests(self) -> list[bytes]:
        return [r for r in self.requests if r.startswith(b"GET /executions/") and b"/events" in r]


@pytest.fixture
def cutting_proxy(server: Server) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(int(server.url.rsplit(":", 1)[1]))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def ctrl_c_when(condition: Callable[[], bool], timeout: float = 20.0) -> threading.Thread:
    """Start a thread that sends SIGINT to the main thread (a Ctrl-C) once ``condition``
    holds: the CLI under test runs in the main thread, the server in others."""
    main_ident = threading.main_thread().ident
    assert main_ident is not None

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    time.sleep(0.3)  # let the CLI settle into following
                    signal.pthread_kill(main_ident, signal.SIGINT)
                    return
            except Exception:  # noqa: S112  (the condition polls a server that may be busy)
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch, name="ctrl-c", daemon=True)
    thread.start()
    return thread
