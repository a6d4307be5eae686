"""envctl's runtime agent: the main process of every runtime container.

It listens on a Unix socket (``/run/envctl/agent.sock`` inside the container, a file in the
runtime's private state directory on the host), so the runner reaches it without Docker in
the way and reconnects to it after the runner restarts. Cells run in kernels (see
``kernels.py``); their state lives here, not in the runner.

With ``--listen tcp:PORT --credential FILE`` it listens on a TCP port instead, for a runner on
another machine: TLS with a per-boot certificate, and no request is read before the client
proved it holds this boot's credential (``handshake.py``, read once from FILE at start).

Wire format: one JSON object per line, both ways. Every request has an ``op`` and an ``id``;
every reply echoes the ``id``.

    -> {"id": 1, "op": "ping"}
    <- {"id": 1, "ok": true, "op": "pong", "pid": 7, "started_at": 1700000000.0, "rss_kb": 9800, ...}

    -> {"id": 2, "op": "execute", "execution_id": "ex_...", "code": "1+1", "language": "python",
        "timeout": null, "cap": 10485760}
    <- {"id": 2, "ok": true, "event": "accepted", "execution_id": "ex_..."}
    <- {"id": 2, "event": "output", "index": 0, "output": {"output_type": "execute_result", ...}}
    <- {"id": 2, "ok": true, "event": "done", "status": "ok", "execution_count": 1, ...}

    -> {"id": 3, "op": "attach", "execution_id": "ex_...", "from": 5}   same events from index 5
    -> {"id": 4, "op": "interrupt", "execution_id": "ex_..."}
    -> {"id": 5, "op": "ack", "execution_id": "ex_..."}                  forget a stored execution
       (an ``execute`` may carry ``"ack": ["ex_..."]``: the same, without a message of its own)
    -> {"id": 6, "op": "status"}
    -> {"id": 7, "op": "resume", "execution_id": "ex_...", "draft": "taken"}  after a ``pressure`` event

With ``--memory-watch FRACTION`` a running cell near the container's memory limit is paused and
its stream carries ``{"id": 2, "event": "pressure", "execution_id": ..., "usage": ..., "limit": ...}``
before its next outputs: envctl takes a draft, then answers ``resume`` (``memwatch.py``).

An execution keeps running when its connection drops; its outputs stay here until the runner
acknowledges them, so a runner that restarts attaches again and loses nothing. Outputs past
the per-execution cap are discarded, leaving one visible truncation marker.

Python standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import handshake  # noqa: E402  (the agent's own modules, next to this file)
import kernels  # noqa: E402
import memwatch  # noqa: E402

# Annotations only: typing is not imported at run time (4 ms of the agent's start, four times
# that in a pod limited to 0.25 CPU; python3-minimal images may lack it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 2
DEFAULT_SOCKET = "/run/envctl/agent.sock"
DEFAULT_SECRETS_DIR = "/run/secrets"  # a tmpfs in the runtime's container
MAX_LINE = 64 * 1024 * 1024
DEFAULT_CAP = 10 * 1024 * 1024
ERROR_ALLOWANCE = 64 * 1024  # an error after the cap is still shown, up to this size
KEEP_UNACKED = 8
INTERRUPT_GRACE = 5.0
ACCEPT_COALESCE = 0.002  # seconds ``accepted`` may wait to go out with a quick cell's outputs
MERGE_MAX = 256 * 1024  # characters a stream output may grow to by joining the next ones, unsent
HANDSHAKE_TIMEOUT = 10.0  # seconds a network connection has to prove itself
KEEP_REFUSALS = 50  # refused connections remembered until envctl is told


class Execution:
    def __init__(self, execution_id: str, language: str, cap: int, timeout: float | None) -> None:
        self.id = execution_id
        self.language = language
        self.cap = cap
        self.timeout = timeout
        self.outputs: list[dict[str, Any]] = []  # index = position
        # Outputs before ``sealed`` were taken by a stream and never change again. Stream text
        # that arrives while the last output is still unsent joins it (``_parts``, joined when
        # it is taken): a cell that prints faster than envctl reads costs a few large events
        # instead of one per write, and nothing is held back (a stream takes what there is).
        self.sealed = 0
        self._parts: list[str] = []
        self._parts_len = 0
        self.bytes = 0
        self.truncated = False
        self.discarded = 0
        self.status = "queued"
        self.execution_count: int | None = None
        self.finished = False
        self.timed_out = False
        self.interrupted = False
        self.started_at = time.time()
        self.terminating: float | None = None  # when SIGTERM came, with --term-wait (terminate())
        self.draft_taken = threading.Event()  # a layer streamed since: envctl has the draft
        self.cells_since_layer = 0  # cells sent since envctl last took a layer (a save or a draft)
        self.released = False  # envctl stops the runtime itself: SIGTERM exits at once (op_release)
        self.finished_at: float | None = None
        self.cond = threading.Condition()
        self.kernel: kernels.Kernel | None = None
        self.pressure: dict[str, Any] | None = None  # set when the memory watch paused this cell
        self.resumed = threading.Event()  # envctl answered the pause (op_resume)

    def add(self, output: dict[str, Any]) -> None:
        size = _size_of(output)
        with self.cond:
            if self.finished:
                return
            is_error = output.get("output_type") == "error"
            if self.bytes + size > self.cap and not (is_error and size <= ERROR_ALLOWANCE):
                self.discarded += size
                if not self.truncated:
                    self.truncated = True
                    self._join()
                    self.outputs.append(
                        {
                            "output_type": "stream",
                            "name": "stderr",
                            "text": f"\n[envctl: output truncated: this cell's output reached its "
                            f"{_human(self.cap)} limit; the rest is discarded]\n",
                        }
                    )
                    self.cond.notify_all()
                return
            self.bytes += size
            text = output.get("text") if output.get("output_type") == "stream" else None
            if (
                isinstance(text, str)
                and self._parts
                and len(self.outputs) > self.sealed
                and self.outputs[-1].get("name") == output.get("name")
                and self._parts_len + len(text) <= MERGE_MAX
            ):
                self._parts.append(text)
                self._parts_len += len(text)
            else:
                self._join()
                self.outputs.append(output)
                if isinstance(text, str):
                    self._parts, self._parts_len = [text], len(text)
            self.cond.notify_all()

    def _join(self) -> None:
        """The texts joined to the last output, into it (under ``cond``)."""
        if len(self._parts) > 1:
            self.outputs[-1] = {**self.outputs[-1], "text": "".join(self._parts)}
        self._parts, self._parts_len = [], 0

    def take(self, start: int) -> list[dict[str, Any]]:
        """Outputs from ``start`` on, for a stream to send; fixed from now on (under ``cond``)."""
        self._join()
        self.sealed = max(self.sealed, len(self.outputs))
        return self.outputs[start:]

    def finish(self, status: str, execution_count: int | None) -> None:
        with self.cond:
            if self.finished:
                return
            self._join()
            if self.timed_out:
                status = "error"
                self.outputs.append(
                    {
                        "output_type": "error",
                        "ename": "TimeoutError",
                        "evalue": f"the execution exceeded its timeout of {self.timeout:g} s",
                        "traceback": [],
                    }
                )
            elif self.interrupted and status == "error":
                status = "interrupted"
            self.status = status
            self.execution_count = execution_count
            self.finished = True
            self.finished_at = time.time()
            self.cond.notify_all()

    def paused_untold(self, told: bool) -> bool:
        """The memory watch paused this cell now, and a stream that ``told`` nothing yet must
        say so (a stream attached after the pause ended says nothing)."""
        return not told and self.pressure is not None and not self.resumed.is_set()

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "execution_count": self.execution_count,
            "truncated": self.truncated,
            "output_bytes": self.bytes,
            "discarded_bytes": self.discarded,
            "outputs": len(self.outputs),
        }


def _human(n: int) -> str:
    if n >= 1048576:
        return f"{n / 1048576:g} MB"
    if n >= 1024:
        return f"{n / 1024:g} KB"
    return f"{n} bytes"


def _size_of(output: dict[str, Any]) -> int:
    if output.get("output_type") == "stream":
        return len(str(output.get("text", "")).encode("utf-8", "replace"))
    return len(json.dumps(output, default=str))


class Agent:
    def __init__(self, socket_path: str, credential: dict[str, Any] | None = None) -> None:
        self.socket_path = socket_path
        self.credential = credential  # a tcp channel's (handshake.py); None: the Unix socket
        self._refused: list[dict[str, Any]] = []  # refusals envctl has not been told about yet
        self.started_at = time.time()
        self.terminating: float | None = None  # when SIGTERM came, with --term-wait (terminate())
        self.draft_taken = threading.Event()  # a layer streamed since: envctl has the draft
        self.cells_since_layer = 0  # cells sent since envctl last took a layer (a save or a draft)
        self.released = False  # envctl stops the runtime itself: SIGTERM exits at once (op_release)
        self.handlers = {
            "ping": self.op_ping,
            "status": self.op_status,
            "interrupt": self.op_interrupt,
            "ack": self.op_ack,
            "stat": self.op_stat,
            "secrets": self.op_secrets,
            "warm": self.op_warm,
            "release": self.op_release,
            "resume": self.op_resume,
        }
        self.streaming = {"execute": self.op_execute, "attach": self.op_attach}
        self.kernels: dict[str, kernels.Kernel] = {}
        self.executions: OrderedDict[str, Execution] = OrderedDict()
        self.current: Execution | None = None
        # One thread runs the cells, one at a time, in the order they arrived. It is started
        # once: a thread per cell would cost every cell a thread's start-up handshake.
        self._cells: queue.SimpleQueue[tuple[Execution, str, dict[str, Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._run_cells, name="cells", daemon=True).start()
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._cell_started = threading.Event()  # wakes the memory watch (watch_memory)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ENVCTL_")}
        # envctl's own scratch files (bash cells, Jupyter connection files) live beside the
        # socket, in the runtime's private state directory: never in the runtime's filesystem.
        self.scratch = os.path.join(os.path.dirname(os.path.abspath(socket_path)), "scratch")
        os.makedirs(self.scratch, exist_ok=True)

    # --- simple operations ------------------------------------------------------------
    def op_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "op": "pong",
            "pid": os.getpid(),
            "started_at": self.started_at,
            "version": PROTOCOL_VERSION,
            "python": sys.version.split()[0],
            "rss_kb": rss_kb(),
            "busy": self.current is not None,
            "terminating": self.terminating is not None,
        }

    def op_release(self, request: dict[str, Any]) -> dict[str, Any]:
        """envctl is about to stop the runtime itself (after its draft, or a reset or delete):
        a SIGTERM then ends the agent at once instead of waiting for a draft."""
        self.released = True
        return {"op": "release"}

    def op_resume(self, request: dict[str, Any]) -> dict[str, Any]:
        """envctl took (or gave up on) the draft of a cell the memory watch paused: go on."""
        with self._state_lock:
            e = self.executions.get(str(request.get("execution_id")))
        if e is None or e.pressure is None:
            return {"op": "resume", "paused": False}
        e.pressure["draft"] = str(request.get("draft") or "")
        e.resumed.set()
        return {"op": "resume", "paused": True}

    # --- the memory watch (memwatch.py) -----------------------------------------------
    def watch_memory(self, fraction: float, pause: float, root: str = memwatch.CGROUP_ROOT) -> bool:
        """Start watching the memory cgroup while cells run; False (and nothing started)
        without a limit to watch."""
        found = memwatch.limit_of(root)
        if found is None or found.limit is None or not 0 < fraction < 1:
            print("envctl-agent: memory watch off (no memory limit to watch)", file=sys.stderr, flush=True)
            return False
        args = (root, found.version, fraction, pause)
        threading.Thread(target=self._watch, args=args, name="memory-watch", daemon=True).start()
        return True

    def _watch(self, root: str, version: int, fraction: float, pause: float) -> None:
        limit = memwatch.read(root, version)
        bound = fraction * (limit.limit or 0) if limit is not None else 0.0
        seen: Execution | None = None
        while not self._stop.is_set():
            e = self.current
            if e is None or e.pressure is not None:
                # idle, or this cell was paused once already: wait for the next cell
                self._cell_started.wait(None if e is None else memwatch.INTERVAL)
                self._cell_started.clear()
                continue
            if e is not seen:  # a new cell: its first reading one interval in (a quicker cell costs none)
                seen = e
                time.sleep(memwatch.INTERVAL)
                continue
            if bound and memwatch.usage_at_least(root, version, bound):
                reading = memwatch.read(root, version)
                if reading is not None and memwatch.should_pause(reading.usage, reading.limit, fraction):
                    self._pause(e, reading, fraction, pause)
                    continue
                if reading is not None and reading.limit:
                    bound = fraction * reading.limit  # the limit may have changed (a pod resized)
            time.sleep(memwatch.INTERVAL)

    def _pause(self, e: Execution, reading: memwatch.Reading, fraction: float, pause: float) -> None:
        """Stop the cell's processes, tell envctl (the stream's ``pressure`` event), go on at
        its ``resume`` or after ``pause`` seconds."""
        groups = [k.pid for k in list(self.kernels.values()) if k.alive() and k.pid]
        stopped = memwatch.freeze(groups)
        began = time.monotonic()
        with e.cond:
            e.pressure = {**reading.as_dict(), "fraction": fraction, "paused_at": time.time(), "pause": pause}
            e.cond.notify_all()
        used = f"{reading.usage / 1048576:.0f} MiB of {(reading.limit or 0) / 1048576:.0f} MiB"
        print(f"envctl-agent: memory at {used}: cell {e.id} paused for a draft", file=sys.stderr, flush=True)
        while not e.resumed.wait(0.2) and not e.finished and time.monotonic() - began < pause:
            pass
        memwatch.thaw(groups, stopped)
        answered = e.resumed.is_set()
        e.resumed.set()  # over: a stream attached from now on does not report it
        waited = time.monotonic() - began
        how = f"draft {e.pressure.get('draft') or 'taken'}" if answered else "no answer from envctl"
        print(f"envctl-agent: cell {e.id} resumed after {waited:.1f} s ({how})", file=sys.stderr, flush=True)

    def op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._state_lock:
            executions = {eid: e.summary() for eid, e in self.executions.items()}
        return {
            "op": "status",
            "current": self.current.id if self.current else None,
            "executions": executions,
            "kernels": {name: k.pid for name, k in self.kernels.items() if k.alive()},
            "rss_kb": rss_kb(),
        }

    def op_interrupt(self, request: dict[str, Any]) -> dict[str, Any]:
        wanted = request.get("execution_id")
        current = self.current
        if current is None or (wanted and wanted != current.id):
            return {"op": "interrupt", "interrupted": False}
        current.interrupted = True
        self._interrupt(current)
        return {"op": "interrupt", "interrupted": True}

    def op_stat(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sizes of regular files (None for anything else or missing), for the changes list."""
        sizes: dict[str, int | None] = {}
        marks: dict[str, list[int] | None] = {}
        for path in list(request.get("paths") or [])[:20000]:
            try:
                st = os.lstat(str(path))
            except OSError:
                sizes[str(path)] = marks[str(path)] = None
                continue
            sizes[str(path)] = st.st_size if stat.S_ISREG(st.st_mode) else None
            marks[str(path)] = [st.st_size, st.st_mtime_ns, st.st_mode, st.st_ctime_ns]
        return {"op": "stat", "sizes": sizes, "marks": marks}

    def op_secrets(self, request: dict[str, Any]) -> dict[str, Any]:
        """The runtime's secrets, at boot: into the cells' environment, and each into a file
        (mode 0400) of the secrets directory, a tmpfs. Never printed, never in an error."""
        directory = os.environ.get("ENVCTL_SECRETS_DIR", DEFAULT_SECRETS_DIR)
        files = dict(request.get("files") or {})
        for name in files:
            if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\x00" in name:
                raise ValueError("a secret's file name must be one plain path component")
        env = {str(k): str(v) for k, v in dict(request.get("env") or {}).items()}
        if files:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        for name, value in files.items():
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            try:
                os.write(fd, str(value).encode("utf-8"))
            finally:
                os.close(fd)
        self.env.update(env)
        for kernel in list(self.kernels.values()):  # a kernel warmed before (a pooled runtime)
            if isinstance(kernel, kernels.ProcessKernel):
                kernel.set_environ(env)
        return {"op": "secrets", "variables": sorted(env), "files": sorted(files)}

    def op_warm(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start the Python kernel now, before any cell (a warm pool's container): the first
        cell then runs at once. Variables given later reach it (``op_secrets``)."""
        kernel = self.kernels.get("python")
        if kernel is None:
            kernel = self.kernels["python"] = kernels.python_kernel(self._on_event, self.env)
        kernel.ensure_started()
        return {"op": "warm", "pid": kernel.pid}

    def op_ack(self, request: dict[str, Any]) -> dict[str, Any]:
        self._forget(str(request.get("execution_id")))
        return {"op": "ack"}

    def _forget(self, execution_id: str) -> None:
        with self._state_lock:
            e = self.executions.get(execution_id)
            if e is not None and e.finished:
                del self.executions[e.id]

    # --- executions -------------------------------------------------------------------
    def op_execute(self, request: dict[str, Any]) -> Execution:
        eid = str(request.get("execution_id") or "")
        if not eid:
            raise ValueError("execute needs an execution_id")
        self.cells_since_layer += 1
        for stored in list(request.get("ack") or [])[:16]:  # earlier cells the runner has stored
            self._forget(str(stored))
        with self._state_lock:
            existing = self.executions.get(eid)
            if existing is not None:
                return existing  # a resubmission after a reconnect: same execution
            language = str(request.get("language") or "python")
            timeout = request.get("timeout")
            cap = int(request.get("cap") or DEFAULT_CAP)
            e = Execution(eid, language, cap, float(timeout) if timeout else None)
            self.executions[eid] = e
            self._forget_old()
        self._cells.put((e, str(request.get("code", "")), request))
        return e

    def op_attach(self, request: dict[str, Any]) -> Execution:
        with self._state_lock:
            e = self.executions.get(str(request.get("execution_id")))
        if e is None:
            raise KeyError(f"unknown execution {request.get('execution_id')!r}")
        return e

    def _forget_old(self) -> None:
        finished = [eid for eid, e in self.executions.items() if e.finished]
        for eid in finished[: max(0, len(finished) - KEEP_UNACKED)]:
            del self.executions[eid]

    def _kernel(self, e: Execution, request: dict[str, Any]) -> kernels.Kernel:
        if e.language == "jupyter":
            name = str(request.get("kernel") or "python3")
            key = f"jupyter:{name}"
        else:
            key = e.language
        kernel = self.kernels.get(key)
        if kernel is None:
            if key == "python":
                kernel = kernels.python_kernel(self._on_event, self.env)
            elif key == "bash":
                kernel = kernels.bash_kernel(self._on_event, self.env, cell_dir=self.scratch)
            elif key.startswith("jupyter:"):
                env = {**self.env, "ENVCTL_AGENT_SCRATCH": self.scratch}
                kernel = kernels.jupyter_kernel(key.split(":", 1)[1], self._on_event, env)
            else:
                raise ValueError(f"unknown language {e.language!r}")
            self.kernels[key] = kernel
        kernel.ensure_started()
        return kernel

    def _run_cells(self) -> None:
        while True:
            e, code, request = self._cells.get()
            try:
                self._run(e, code, request)
            except Exception as exc:  # the cell ends in error; the agent keeps serving
                e.add({"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": []})
                e.finish("error", None)
                self.current = None

    def _run(self, e: Execution, code: str, request: dict[str, Any]) -> None:
        if e.interrupted:
            e.finish("interrupted", None)
            return
        e.status = "running"
        e.started_at = time.time()
        try:
            kernel = self._kernel(e, request)
        except Exception as exc:
            e.add({"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": []})
            e.finish("error", None)
            return
        e.kernel = kernel
        self.current = e
        self._cell_started.set()
        timer = None
        if e.timeout:
            timer = threading.Timer(e.timeout, self._time_out, args=(e,))
            timer.daemon = True
            timer.start()
        try:
            kernel.execute(code)
        except kernels.KernelDiedError as exc:
            e.add({"output_type": "error", "ename": "KernelDied", "evalue": str(exc), "traceback": []})
            e.finish("error", None)
        with e.cond:
            while not e.finished:
                e.cond.wait(1.0)
        if timer is not None:
            timer.cancel()
        self.current = None

    def _on_event(self, kind: str, payload: dict[str, Any]) -> None:
        e = self.current
        if e is None:
            return  # output with no cell running (a background process): nobody to show it to
        if kind == "output":
            e.add(payload)
        elif kind == "done":
            e.finish(str(payload.get("status", "ok")), payload.get("execution_count"))

    def _time_out(self, e: Execution) -> None:
        if not e.finished:
            e.timed_out = True
            self._interrupt(e)

    def _interrupt(self, e: Execution) -> None:
        kernel = e.kernel
        if kernel is None:
            return
        kernel.interrupt()

        def escalate() -> None:
            # A kernel deaf to SIGINT (a C extension in a tight loop) is killed; the cell ends.
            if not e.finished and kernel is not None:
                kernel.kill()

        t = threading.Timer(INTERRUPT_GRACE, escalate)
        t.daemon = True
        t.start()

    # --- serving ----------------------------------------------------------------------
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
        # Appear under the real name only once listening: a runner that sees it can connect.
        os.replace(tmp, self.socket_path)
        return server

    def serve(self, tcp: tuple[socket.socket, ssl.SSLContext] | None = None) -> None:
        """Accept connections: on the Unix socket, or on ``tcp`` (``listen_tcp``'s socket, made
        before this agent, and its TLS)."""
        target: Any
        if tcp is None:
            server = self.listen()
            target = self.handle
        else:
            server, tls = tcp

            def target(conn: socket.socket) -> None:
                self.handle_tcp(conn, tls)

        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except InterruptedError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            try:
                threading.Thread(target=target, args=(conn,), daemon=True).start()
            except RuntimeError as exc:  # "can't start new thread": the pids limit is reached (a fork bomb)
                # the agent lives on: this caller is turned away and dials again; the kept
                # connection (interrupts, the cell's end) and a stop still work meanwhile
                print(f"envctl-agent: turned a connection away: {exc}", file=sys.stderr, flush=True)
                conn.close()
                self._stop.wait(0.2)

    def handle_tcp(self, raw: socket.socket, tls: ssl.SSLContext) -> None:
        """A network connection: TLS, then the handshake, then the ordinary framing."""
        try:
            host, port = raw.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        conn: socket.socket = raw
        reader = None
        try:
            conn = tls.wrap_socket(raw, server_side=True)
            reader = conn.makefile("rb")
            with self._state_lock:
                report, self._refused = self._refused, []
            try:
                handshake.accept(conn, reader, dict(self.credential or {}), report)
            except Exception:
                with self._state_lock:  # not told after all
                    self._refused = (report + self._refused)[-KEEP_REFUSALS:]
                raise
        except handshake.RefusedError as exc:
            self.refuse(conn, peer, str(exc))
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.refuse(conn, peer, f"no TLS handshake ({type(exc).__name__}: {str(exc)[:200]})", answer=False)
            return
        conn.settimeout(None)
        self.handle(conn, reader)

    def refuse(self, conn: socket.socket, peer: str, reason: str, answer: bool = True) -> None:
        """Refuse a connection: say so to it, to the container's log and (later) to envctl."""
        entry = {"at": time.time(), "peer": peer, "reason": reason}
        with self._state_lock:
            self._refused = [*self._refused, entry][-KEEP_REFUSALS:]
        print(f"envctl-agent: refused a connection from {peer}: {reason}", file=sys.stderr, flush=True)
        if answer:
            with contextlib.suppress(OSError, ValueError):
                send(conn, {"id": None, "ok": False, "error": f"refused: {reason}"})
        with contextlib.suppress(OSError):
            conn.close()

    def handle(self, conn: socket.socket, reader: Any = None) -> None:
        reader = reader or conn.makefile("rb")
        try:
            while True:
                line = reader.readline(MAX_LINE)
                if not line:
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request must be a JSON object")
                except ValueError as exc:
                    send(conn, {"id": None, "ok": False, "error": f"malformed request: {exc}"})
                    continue
                op = str(request.get("op"))
                rid = request.get("id")
                if op == "layer":  # a save made in the runtime: raw tar frames after a header (layer.py)
                    import layer  # noqa: PLC0415  (the agent's own module, next to this file)

                    layer.serve(conn, rid, request)
                    if str(request.get("action") or "make") == "make":  # a save's or a draft's layer
                        self.cells_since_layer = 0
                        if self.terminating is not None:
                            self.draft_taken.set()
                    continue
                if op in ("unpack", "results"):  # mounts in, /results out, without a host path (files.py)
                    import files  # noqa: PLC0415  (the agent's own module, next to this file)

                    files.serve(op, conn, reader, rid, request)
                    continue
                if op in self.streaming:
                    try:
                        e = self.streaming[op](request)
                    except Exception as exc:
                        send(conn, {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    self.stream(conn, rid, e, int(request.get("from") or 0))
                    continue
                handler = self.handlers.get(op)
                if handler is None:
                    reply: dict[str, Any] = {"id": rid, "ok": False, "error": f"unknown op {op!r}"}
                else:
                    try:
                        reply = handler(request)
                        reply["id"] = rid
                        reply["ok"] = True
                    except Exception as exc:  # an op's failure must not take the agent down
                        reply = {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                send(conn, reply)
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def stream(self, conn: socket.socket, rid: Any, e: Execution, start: int) -> None:
        """Send an execution's outputs from ``start`` as they come, then its end.

        What is ready goes in one write: ``accepted`` waits up to ACCEPT_COALESCE for a quick
        cell's outputs and end, so that a trivial cell costs the connection one message
        instead of three (each one a wake-up on both sides, and a TLS record on a network)."""
        pending = encode({"id": rid, "ok": True, "event": "accepted", "execution_id": e.id})
        sent = max(0, start)
        wait_first = ACCEPT_COALESCE
        told = False  # of the memory watch's pause (watch_memory): once on each stream
        while True:
            with e.cond:
                if wait_first:
                    until = time.monotonic() + wait_first
                    while not e.finished and time.monotonic() < until:
                        e.cond.wait(max(0.0, until - time.monotonic()))
                    wait_first = 0.0
                else:
                    while len(e.outputs) <= sent and not e.finished and not e.paused_untold(told):
                        e.cond.wait(1.0)
                batch = e.take(sent)
                finished = e.finished and len(e.outputs) == sent + len(batch)
                pressure = dict(e.pressure) if e.pressure is not None and e.paused_untold(told) else None
            data = pending + b"".join(
                encode({"id": rid, "event": "output", "index": sent + i, "output": out}) for i, out in enumerate(batch)
            )
            pending = b""
            sent += len(batch)
            if pressure is not None:
                data += encode({"id": rid, "event": "pressure", "execution_id": e.id, **pressure})
                told = True
            if finished:
                data += encode({"id": rid, "ok": True, "event": "done", "execution_id": e.id, **e.summary()})
            if data:
                conn.sendall(data)
            if finished:
                return


def terminate(agent: Agent, wait: float) -> None:
    """SIGTERM with ``--term-wait``: what Swarm sends when a node drains or a service goes. The
    cells stop (the files hold still), the agent keeps answering for up to ``wait`` seconds so
    that envctl can take the unsaved changes as a draft (a ``layer`` request; pings say
    ``terminating``), then exits. The runtime's stop grace period must be longer than ``wait``."""
    if agent.terminating is not None:
        return
    if agent.released or (agent.cells_since_layer == 0 and agent.current is None):
        wait = 0.0  # nothing to keep: envctl stops it, or no cell ran since its last layer
    agent.terminating = time.time()
    for kernel in list(agent.kernels.values()):
        kernel.kill()
    print(f"envctl-agent: SIGTERM: waiting up to {wait:g} s for envctl to take a draft", file=sys.stderr, flush=True)

    def wait_then_exit() -> None:
        taken = agent.draft_taken.wait(wait) if wait > 0 else False
        print(f"envctl-agent: exiting ({'draft taken' if taken else 'no draft taken'})", file=sys.stderr, flush=True)
        os._exit(0)

    threading.Thread(target=wait_then_exit, name="terminating", daemon=True).start()


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


def send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(encode(message))


def rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _no_new_privileges() -> None:
    """``PR_SET_NO_NEW_PRIVS`` on the agent, so that no cell it starts gains privileges through
    a setuid program or file capabilities: the local engine sets it on the container already;
    Swarm 20.10 cannot (its service specs drop the option), so the agent does it itself.

    Where it is set already (the local engine, a pod with ``allowPrivilegeEscalation: false``)
    nothing more is done: ctypes is not imported, which images often hold no bytecode for (a
    compilation at every start: 8 ms of CPU, four times that in a pod limited to 0.25 CPU)."""
    if _no_new_privs_set():
        return
    import ctypes  # noqa: PLC0415  (only here)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    except (OSError, AttributeError) as exc:
        print(f"envctl-agent: could not set no-new-privileges: {exc}", file=sys.stderr, flush=True)


def _no_new_privs_set() -> bool:
    """Whether the kernel says ``NoNewPrivs: 1`` for this process already."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return any(line.split() == ["NoNewPrivs:", "1"] for line in f)
    except OSError:
        return False


def listen_tcp(port: int, credential: dict[str, Any]) -> tuple[socket.socket, ssl.SSLContext]:
    """The tcp channel's socket, listening, and its TLS (the credential's certificate, taken
    out of it). Connections wait in the backlog until the agent accepts them."""
    tls = handshake.server_context(credential.pop("tls"))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))  # noqa: S104  (the runtime's own address; envctl dials it)
    server.listen(64)
    return server, tls


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = os.environ.get("ENVCTL_AGENT_SOCKET", DEFAULT_SOCKET)
    options = dict(zip(argv[::2], argv[1::2], strict=False))
    path = options.get("--socket", path)
    port = None
    credential = None
    listen = options.get("--listen", "unix")
    if listen.startswith("tcp:"):
        port = int(listen[4:])
        try:  # read once, before anything else runs in the container
            credential = handshake.read_credential(options.get("--credential", "/run/envctl/agent.key"))
        except (OSError, ValueError) as exc:
            print(f"envctl-agent: cannot start the tcp channel: {exc}", file=sys.stderr, flush=True)
            return 3
    elif listen != "unix":
        print(f"envctl-agent: --listen must be unix or tcp:PORT, not {listen!r}", file=sys.stderr, flush=True)
        return 2

    _no_new_privileges()
    # Threads hand the GIL over after at most this long (default 5 ms): the agent's reader,
    # cell and connection threads pass each cell along between them.
    sys.setswitchinterval(0.0005)
    tcp = None
    if port is not None:
        # Listening first, then the rest of the start (the index walk, the agent's threads):
        # envctl's dial and handshake then overlap the walk, which its boot waits for anyway.
        assert credential is not None
        tcp = listen_tcp(port, credential)

    import layer  # noqa: PLC0415  (what the version holds, for a save made in the runtime)

    if options.get("--index", "yes") != "no":  # an attached container's agent makes no saves or drafts
        layer.start_index()
    agent = Agent(path, credential)

    term_wait = float(options.get("--term-wait", "0"))
    memory_watch = float(options.get("--memory-watch", "0"))
    if memory_watch > 0:  # given only where envctl takes drafts from the agent (not an attached container)
        pause = float(options.get("--memory-pause", "60"))
        agent.watch_memory(memory_watch, pause, options.get("--memory-cgroup", memwatch.CGROUP_ROOT))

    def _exit(signum: int, _frame: object) -> None:
        # As the container's main process a signal without a handler would be ignored.
        if signum == signal.SIGTERM and term_wait > 0 and agent.terminating is None:
            terminate(agent, term_wait)
            return
        for kernel in list(agent.kernels.values()):
            kernel.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    agent.serve(tcp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
