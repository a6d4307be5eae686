"""envctl's runtime agent: the main process of every runtime container.

It listens on a Unix socket (``/run/envctl/agent.sock`` inside the container, a file in the
runtime's private state directory on the host), so the runner can reach it without Docker in
the way and reconnect to it after the runner restarts.

Wire format: one JSON object per line, both ways. Every request has an ``op`` and an ``id``;
every reply echoes the ``id``.

    -> {"id": 1, "op": "ping"}
    <- {"id": 1, "ok": true, "op": "pong", "pid": 1, "started_at": 1700000000.0, "version": 1}

An unknown op or malformed line gets ``{"id": ..., "ok": false, "error": "..."}``; the
connection stays usable.

Python standard library only, and only modules that Debian's python3-minimal carries.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time

try:  # noqa: SIM105  (annotations only; python3-minimal images may lack typing)
    from typing import Any
except ImportError:  # pragma: no cover
    pass

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/envctl/agent.sock"
MAX_LINE = 16 * 1024 * 1024


class Agent:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.started_at = time.time()
        self.handlers = {"ping": self.op_ping}
        self._stop = threading.Event()

    # --- operations -----------------------------------------------------------------
    def op_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "op": "pong",
            "pid": os.getpid(),
            "started_at": self.started_at,
            "version": PROTOCOL_VERSION,
            "python": sys.version.split()[0],
        }

    # --- serving --------------------------------------------------------------------
    def listen(self) -> socket.socket:
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = self.socket_path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(tmp)
        # The state directory (0700 on the host) is what guards the socket; the file itself
        # must be usable by a runner that does not run as root.
        os.chmod(tmp, 0o666)  # noqa: S103
        server.listen(64)
        # Appear under the real name only once listening: a runner that sees the file can
        # connect at once.
        os.replace(tmp, self.socket_path)
        return server

    def serve(self) -> None:
        server = self.listen()
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except InterruptedError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        lock = threading.Lock()
        try:
            while True:
                line = reader.readline(MAX_LINE)
                if not line:
                    return
                reply = self.dispatch(line)
                data = (json.dumps(reply, separators=(",", ":")) + "\n").encode()
                with lock:
                    conn.sendall(data)
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request must be a JSON object")
        except ValueError as exc:
            return {"id": None, "ok": False, "error": f"malformed request: {exc}"}
        rid = request.get("id")
        handler = self.handlers.get(str(request.get("op")))
        if handler is None:
            return {"id": rid, "ok": False, "error": f"unknown op {request.get('op')!r}"}
        try:
            reply = handler(request)
        except Exception as exc:  # an op's failure must not take the agent down
            return {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = rid
        reply["ok"] = True
        return reply


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = os.environ.get("ENVCTL_AGENT_SOCKET", DEFAULT_SOCKET)
    if argv[:1] == ["--socket"] and len(argv) > 1:
        path = argv[1]

    def _exit(signum: int, _frame: object) -> None:
        # As PID 1 (or under tini) a signal without a handler would be ignored.
        os._exit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    Agent(path).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
