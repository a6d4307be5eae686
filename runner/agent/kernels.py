"""Kernels: the processes that run cells, as the agent sees them.

Every kernel turns one cell into a sequence of events, delivered to a callback on the kernel's
reader thread:

    ("output", {Jupyter output dict})   any number, in order
    ("done", {"status": ..., "execution_count": N})   exactly one per cell

Three kinds share that shape:

- ``ProcessKernel`` runs a child that speaks the kernel protocol documented in ``pykernel.py``
  (the native Python kernel, and ``jupyter_bridge.py`` for Jupyter kernelspecs). Its stdout and
  stderr are read as ``stream`` outputs.
- ``BashKernel`` keeps one ``bash`` alive; each cell is sourced into it, so the working
  directory, variables and functions survive. Completion is signalled on a private pipe.

Interrupts are SIGINT to the kernel's process group; the kernel's state survives them.
Standard library only.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time

# Annotations only: typing is not imported at run time (4 ms of the agent's start, four times
# that in a pod limited to 0.25 CPU; python3-minimal images may lack it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

AGENT_DIR = os.path.dirname(os.path.abspath(__file__))


def command_override(variable: str) -> list[str] | None:
    """A kernel's command from the agent's own environment (a JSON list), for an agent that
    runs beside a container it was attached to (runner/runtimes/attach.py) and starts its kernels
    inside it; None: the usual command."""
    raw = os.environ.get(variable)
    if not raw:
        return None
    argv = json.loads(raw)
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"{variable} must be a JSON list of strings")
    return argv


READ_CHUNK = 256 * 1024
# The kernel's stdout and stderr pipes hold this much (Linux's default is 64 KB). While the
# reader lets a burst gather (below), a full pipe stops the printer: with 64 KB that capped a
# fast printer at about 64 KB per GATHER, ~60 MB/s, under `docker exec` to a pipe. 256 KB is 64
# pages a pipe, within the per-user soft limit of pipe pages (16384 by default) for well over a
# hundred kernels of one uid; a refusal (an older kernel, a lowered limit) keeps the default.
PIPE_SIZE = 256 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's value; Python < 3.10 lacks the name
# A stream that was read from this recently is in a burst (a loop that prints): the reader
# lets it gather this long before reading again, so a fast printer costs one wake-up and one
# output per few dozen KB instead of one per write. The first print after a pause is read at
# once, and the end of a cell (the control pipe) never waits.
BURST = 0.005
GATHER = 0.001


def widen_pipe(fd: int) -> None:
    """Let the pipe ``fd`` hold ``PIPE_SIZE`` bytes, if the system allows it."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


class KernelDiedError(Exception):
    pass


# The runtime's memory cgroup, as the container sees it: cgroup v2, then v1.
_OOM_EVENTS = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this container (None: unknown)."""
    for path in _OOM_EVENTS:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def memory_limit() -> int | None:
    """The container's memory limit in bytes (None: none or unknown)."""
    for path in _MEMORY_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
        return None
    return None


class Kernel:
    """Base: a child process whose stdout/stderr become stream outputs."""

    language = "?"

    def __init__(self, on_event: Callable[[str, dict[str, Any]], None], env: dict[str, str] | None = None) -> None:
        self.on_event = on_event
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._busy = False
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._fatal: str | None = None
        self._oom_kills_at_start: int | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_started(self, timeout: float = 120.0) -> None:
        if self.alive():
            return
        self._ready.clear()
        self._fatal = None
        self._oom_kills_at_start = oom_kills()
        self._start()
        if not self._ready.wait(timeout):
            self.kill()
            raise KernelDiedError(f"the {self.language} kernel did not start within {timeout:.0f} s")
        if self._fatal is not None:
            raise KernelDiedError(self._fatal)

    def _start(self) -> None:
        raise NotImplementedError

    def execute(self, code: str) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # --- reading -----------------------------------------------------------------------
    def _read_loop(self, streams: dict[int, str], control: int | None) -> None:
        """Read stream pipes and the control pipe until the child's pipes close.

        Stream pipes are drained before a control message is handled, so output printed
        before a result arrives before it.
        """
        sel = selectors.DefaultSelector()
        decoders = {}
        for fd, name in streams.items():
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
            decoders[fd] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        control_buf = b""
        if control is not None:
            os.set_blocking(control, False)
            sel.register(control, selectors.EVENT_READ, None)
        open_fds = set(streams) | ({control} if control is not None else set())
        last_read = 0.0
        while open_fds:
            events = sel.select()
            if all(key.data is not None for key, _ in events):  # streams only
                now = time.monotonic()
                if now - last_read < BURST:
                    time.sleep(GATHER)
                    events = sel.select(0) or events
                last_read = now
            # streams first
            ordered = sorted(events, key=lambda e: e[0].data is None)
            for key, _ in ordered:
                fd = key.fd
                if key.data is not None:
                    self._drain_stream(fd, key.data, decoders[fd], sel, open_fds)
                else:
                    for sfd, name in streams.items():
                        if sfd in open_fds:
                            self._drain_stream(sfd, name, decoders[sfd], sel, open_fds, once=True)
                    try:
                        chunk = os.read(fd, READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        open_fds.discard(fd)
                        continue
                    control_buf += chunk
                    while b"\n" in control_buf:
                        line, control_buf = control_buf.split(b"\n", 1)
                        if line.strip():
                            self._on_control_line(line)
        sel.close()
        self._on_exit()

    def _drain_stream(self, fd: int, name: str, decoder: Any, sel: Any, open_fds: set[int], once: bool = False) -> None:
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(fd)
                open_fds.discard(fd)
                tail = decoder.decode(b"", final=True)
                if tail:
                    self.on_event("output", {"output_type": "stream", "name": name, "text": tail})
                return
            text = decoder.decode(chunk)
            if text:
                self.on_event("output", {"output_type": "stream", "name": name, "text": text})
            if once and len(chunk) < READ_CHUNK:
                return

    def _on_control_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        kind = msg.get("type")
        if kind == "ready":
            self._ready.set()
        elif kind == "fatal":
            self._fatal = str(msg.get("message", "the kernel failed to start"))
            self._ready.set()
        elif kind == "output" and isinstance(msg.get("output"), dict):
            self.on_event("output", msg["output"])
        elif kind == "done":
            self._busy = False
            self.on_event("done", {"status": msg.get("status", "ok"), "execution_count": msg.get("execution_count")})

    def _on_exit(self) -> None:
        code = self.proc.wait() if self.proc is not None else None
        if not self._ready.is_set():
            self._fatal = self._fatal or f"the {self.language} kernel exited with code {code} while starting"
            self._ready.set()
        if self._busy:
            self._busy = False
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            ename = "KernelDied"
            evalue = f"the {self.language} kernel died ({how}); a new one starts with the next cell"
            kills = oom_kills()
            if code == -signal.SIGKILL and kills is not None and kills > (self._oom_kills_at_start or 0):
                limit = memory_limit()
                allowed = f" (its machine type allows {limit // 1048576} MB)" if limit else ""
                ename = "OutOfMemory"
                evalue = (
                    f"the {self.language} kernel ran out of memory{allowed} and was killed; its variables are "
                    "lost and a new kernel starts with the next cell. Use less memory, or choose a larger "
                    "machine type"
                )
            self.on_event("output", {"output_type": "error", "ename": ename, "evalue": evalue, "traceback": []})
            self.on_event("done", {"status": "error", "execution_count": None})


class ProcessKernel(Kernel):
    """A child speaking the kernel protocol on fds 3 (requests) and 4 (messages)."""

    def __init__(
        self,
        argv: list[str],
        language: str,
        on_event: Callable[[str, dict[str, Any]], None],
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(on_event, env)
        self.argv = argv
        self.language = language
        self._requests: Any = None

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        msg_r, msg_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            widen_pipe(fd)
        # The kernel expects its channels on fds 3 and 4; a small Python shim moves them there
        # and execs the kernel (no preexec_fn: the agent is multi-threaded; no shell: dash
        # cannot name fds above 9).
        wrapper = [sys.executable, "-c", FD_SHIM, str(req_r), str(msg_w)]
        self.proc = subprocess.Popen(
            [*wrapper, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            pass_fds=(req_r, msg_w),
            start_new_session=True,
            env=self.env,
            close_fds=True,
        )
        for fd in (req_r, msg_w, out_w, err_w):
            os.close(fd)
        self._requests = os.fdopen(req_w, "w", buffering=1, encoding="utf-8")
        self._reader = threading.Thread(
            target=self._read_loop, args=({out_r: "stdout", err_r: "stderr"}, msg_r), daemon=True
        )
        self._reader.start()

    def set_environ(self, env: dict[str, str]) -> None:
        """Variables given after the kernel started (a warm pool's runtime, claimed): into its
        ``os.environ`` before the next cell, without counting as one."""
        if self.alive() and self._requests is not None and env:
            with contextlib.suppress(OSError, ValueError):
                self._requests.write(json.dumps({"op": "environ", "env": env}) + "\n")
                self._requests.flush()

    def execute(self, code: str) -> None:
        self._busy = True
        try:
            self._requests.write(json.dumps({"op": "execute", "code": code}) + "\n")
            self._requests.flush()
        except (OSError, ValueError) as exc:
            self._busy = False
            raise KernelDiedError(f"the {self.language} kernel is gone: {exc}") from exc


FD_SHIM = """
import fcntl, os, sys
src = [int(sys.argv[1]), int(sys.argv[2])]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in src]
for fd in src:
    os.close(fd)
os.dup2(high[0], 3)
os.dup2(high[1], 4)
for fd in high:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


DONE_MARK = "__envctl_done__"


class BashKernel(Kernel):
    """One persistent bash; each cell is sourced into it with stdin from /dev/null."""

    language = "bash"

    def __init__(
        self, on_event: Callable[[str, dict[str, Any]], None], env: dict[str, str] | None = None, cell_dir: str = "/tmp"
    ) -> None:
        super().__init__(on_event, env)
        self.cell_dir = cell_dir
        self.count = 0
        self._stdin: Any = None

    def _start(self) -> None:
        done_r, done_w = os.pipe()
        self.proc = subprocess.Popen(
            command_override("ENVCTL_BASH_KERNEL") or ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(done_w,),
            env={**self.env, "PS1": "", "PS2": "", "TERM": "dumb"},
            start_new_session=True,
            close_fds=True,
        )
        os.close(done_w)
        self._stdin = self.proc.stdin
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream in (self.proc.stdout, self.proc.stderr):
            widen_pipe(stream.fileno())
        # The shell keeps fd `done_w` as its private completion channel. SIGINT ends the
        # running cell (return from `source`) but never the shell itself.
        prelude = (
            f"__envctl_fd={done_w}\n"
            "trap 'return 130 2>/dev/null || true' INT\n"
            f"printf '{DONE_MARK} ready\\n' >&$__envctl_fd\n"
        )
        self._begin(prelude, done_r)

    def _begin(self, prelude: str, control: int | None) -> None:
        """The shell given its prelude, and its stdout and stderr (and ``control``, the private
        completion pipe, when there is one) read from now on."""
        assert self.proc is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self._stdin.write(prelude.encode())
        self._stdin.flush()
        self._reader = threading.Thread(
            target=self._read_loop,
            args=({self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}, control),
            daemon=True,
        )
        self._reader.start()

    def _on_control_line(self, line: bytes) -> None:
        text = line.decode(errors="replace").strip()
        if not text.startswith(DONE_MARK):
            return
        value = text[len(DONE_MARK) :].strip()
        if value == "ready":
            self._ready.set()
            return
        try:
            rc = int(value)
        except ValueError:
            rc = 1
        self._busy = False
        if rc == 0:
            status = "ok"
        elif rc == 130:
            status = "interrupted"
            self.on_event(
                "output",
                {"output_type": "error", "ename": "KeyboardInterrupt", "evalue": "interrupted", "traceback": []},
            )
        else:
            status = "error"
            self.on_event(
                "output",
                {
                    "output_type": "error",
                    "ename": "ExitStatus",
                    "evalue": f"the cell's last command exited with status {rc}",
                    "traceback": [],
                },
            )
        self.on_event("done", {"status": status, "execution_count": self.count})

    def execute(self, code: str) -> None:
        self.count += 1
        # an attached agent writes the cell where the shell, in another mount namespace, finds it
        # under another name (ENVCTL_BASH_CELL_DIR)
        name = f".envctl-cell-{os.getpid()}.sh"
        written = os.path.join(os.environ.get("ENVCTL_BASH_CELL_WRITE_DIR") or self.cell_dir, name)
        path = os.path.join(os.environ.get("ENVCTL_BASH_CELL_DIR") or os.path.dirname(written), name)
        with open(written, "w", encoding="utf-8") as f:
            f.write(code)
            if not code.endswith("\n"):
                f.write("\n")
        self._busy = True
        command = (
            f"source {path} </dev/null; __envctl_rc=$?; printf '\\n{DONE_MARK} %d\\n' \"$__envctl_rc\" >&$__envctl_fd\n"
        )
        try:
            self._stdin.write(command.encode())
            self._stdin.flush()
        except (OSError, ValueError) as exc:
            self._busy = False
            raise KernelDiedError(f"the shell is gone: {exc}") from exc


def python_kernel(on_event: Callable[[str, dict[str, Any]], None], env: dict[str, str]) -> ProcessKernel:
    env = {**env, "PYTHONUNBUFFERED": "1", "MPLBACKEND": env.get("MPLBACKEND", "Agg")}
    argv = command_override("ENVCTL_PYTHON_KERNEL") or [sys.executable, "-u", os.path.join(AGENT_DIR, "pykernel.py")]
    return ProcessKernel(argv, "python", on_event, env)


def jupyter_kernel(name: str, on_event: Callable[[str, dict[str, Any]], None], env: dict[str, str]) -> ProcessKernel:
    return ProcessKernel(
        [sys.executable, "-u", os.path.join(AGENT_DIR, "jupyter_bridge.py"), "--kernel", name],
        f"jupyter:{name}",
        on_event,
        env,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class StreamBashKernel(BashKernel):
    """A shell reached through a byte stream only (``ENVCTL_BASH_STREAM``): a Bash-only attach on
    a cluster, where the kernel's process relays to a shell inside the container
    (``runner/backends/kube_shell.py``). No private pipe and no file cross such a stream, so each
    cell goes in on the shell's stdin as a quoted string, is sourced from a here-string
    (``source /dev/stdin <<<...``: ``return``, the interrupt trap and ``cd`` behave as in the
    local kernel, and a command reading stdin finds it at its end; ``eval`` in a shell without
    bash), and ends with a marker of this kernel's own token and the exit
    status, printed on stdout and on stderr: the cell is done when both arrived, so neither
    stream's last output comes after its end."""

    def __init__(self, on_event: Callable[[str, dict[str, Any]], None], env: dict[str, str] | None = None) -> None:
        super().__init__(on_event, env)
        self.token = "__envctl_" + os.urandom(8).hex()
        self._needle = "\n" + self.token + " "
        self._held = {"stdout": "", "stderr": ""}
        self._ended: dict[str, int] = {}
        self._bash = False
        self._emit = on_event
        self.on_event = self._filter

    def _start(self) -> None:
        argv = command_override("ENVCTL_BASH_KERNEL")
        if argv is None:
            raise KernelDiedError("no shell to stream to (ENVCTL_BASH_KERNEL)")
        self._held = {"stdout": "", "stderr": ""}
        self._ended = {}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
            close_fds=True,
        )
        self._stdin = self.proc.stdin
        assert self.proc.stdout is not None and self.proc.stderr is not None
        prelude = (
            "PS1= PS2=\n"
            "trap 'return 130 2>/dev/null || true' INT\n"
            f"printf '\\n{self.token} ready%s\\n' \"${{BASH_VERSION:+ bash}}\"\n"
        )
        self._begin(prelude, None)

    def _filter(self, kind: str, data: dict[str, Any]) -> None:
        """Stream outputs with the markers taken out; a marker ends the cell (or starts the kernel)."""
        if kind != "output" or data.get("output_type") != "stream" or data.get("name") not in self._held:
            self._emit(kind, data)
            return
        name = str(data["name"])
        buf = self._held[name] + str(data.get("text") or "")
        while (at := buf.find(self._needle)) >= 0 and (end := buf.find("\n", at + 1)) >= 0:
            if at:
                self._emit("output", {"output_type": "stream", "name": name, "text": buf[:at]})
            line, buf = buf[at + 1 : end], buf[end + 1 :]
            self._marker(name, line[len(self.token) :].strip())
        # hold back a marker not whole yet, or what may be the start of one
        keep = len(buf) - at if (at := buf.find(self._needle)) >= 0 else 0
        if not keep:
            keep = next(
                (n for n in range(min(len(buf), len(self._needle)), 0, -1) if self._needle.startswith(buf[-n:])), 0
            )
        out, self._held[name] = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out:
            self._emit("output", {"output_type": "stream", "name": name, "text": out})

    def _marker(self, name: str, value: str) -> None:
        if value.startswith("ready"):
            self._bash = value.endswith("bash")
            self._ready.set()
            return
        try:
            self._ended[name] = int(value)
        except ValueError:
            self._ended[name] = 1
        if len(self._ended) == 2:  # both streams ended: the error and "done" pass _filter unchanged
            rc = self._ended["stdout"]
            self._ended = {}
            self._on_control_line(f"{DONE_MARK} {rc}".encode())

    def execute(self, code: str) -> None:
        self.count += 1
        quoted = "'" + code.replace("'", "'\\''") + "'"
        # bash: a here-string, a pipe bash fills itself (no child process, no file)
        run = 'source /dev/stdin <<<"$__envctl_cell"' if self._bash else 'eval "$__envctl_cell" </dev/null'
        mark = f"printf '\\n{self.token} %d\\n' \"$__envctl_rc\""
        command = f"__envctl_cell={quoted}\n{run}; __envctl_rc=$?; unset __envctl_cell; {mark}; {mark} >&2\n"
        self._busy = True
        try:
            self._stdin.write(command.encode())
            self._stdin.flush()
        except (OSError, ValueError) as exc:
            self._busy = False
            raise KernelDiedError(f"the shell is gone: {exc}") from exc

    def kill(self) -> None:
        """SIGTERM first: the relay ends the shell in the container before it goes."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        super().kill()


def bash_kernel(on_event: Callable[[str, dict[str, Any]], None], env: dict[str, str], cell_dir: str) -> BashKernel:
    """The Bash kernel: a shell of its own, or one reached through a stream (a cluster's attach)."""
    if os.environ.get("ENVCTL_BASH_STREAM") == "1":
        return StreamBashKernel(on_event, env)
    return BashKernel(on_event, env, cell_dir=cell_dir)
