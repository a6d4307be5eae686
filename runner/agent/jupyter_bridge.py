"""A kernel of the agent's kernel protocol that runs a Jupyter kernel through jupyter_client.

Launched by the agent with the *environment's* Python (so jupyter_client comes from the
environment, not from the agent)::

    python3 /opt/envctl/agent/jupyter_bridge.py --kernel NAME      # NAME defaults to python3

It speaks the kernel protocol documented in ``pykernel.py``:

- fd 3 carries requests, one JSON object per line: ``{"op": "execute", "code": "..."}``.
- fd 4 carries messages, one JSON object per line: ``{"type": "ready", "language": ...}``
  once the Jupyter kernel answers, then per execution any number of
  ``{"type": "output", "output": {...}}`` (nbformat output shapes: ``stream``,
  ``display_data``, ``execute_result``, ``error``, ``clear_output``) and one
  ``{"type": "done", "status": "ok"|"error"|"interrupted", "execution_count": N}``.
- When the bridge cannot start at all (jupyter_client missing, no kernelspec NAME, a kernel
  that does not start), it writes ``{"type": "fatal", "message": "..."}`` on fd 4, the same
  message on stderr, and exits 1.
- SIGINT interrupts the running cell (``KernelManager.interrupt_kernel``); the bridge and the
  kernel's state stay. SIGTERM, or EOF on fd 3, shuts the kernel down and exits 0.

The bridge writes nothing on fd 1 and 2 while it runs: a Jupyter kernel's outputs come over
IOPub, and the kernel process's own stdout and stderr (startup noise, logs) are kept in a
small buffer, shown only when the kernel dies or cannot start. A kernel that dies during a
cell gives an ``error`` output and status ``error``; it is restarted before the next cell,
which is told so by a ``stream`` output on stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

CONTROL_IN, CONTROL_OUT = 3, 4
STARTUP_TIMEOUT = 60.0  # seconds for a kernel to answer kernel_info
POLL = 0.2  # seconds between checks of signals and kernel liveness while a cell runs
REPLY_TIMEOUT = 3.0  # seconds to wait for execute_reply once IOPub said idle (it is normally sent first)
NUDGE_AFTER = 1.5  # seconds after an interrupt with no KeyboardInterrupt yet: send it to the main thread
SHUTDOWN_WAIT = 2.0  # seconds a kernel gets to exit after a shutdown request
LOG_LINES = 200  # lines of the kernel process's stdout/stderr kept for error messages
LOG_TAIL = 20  # of which this many go into an error message

#: IOPub message types forwarded as outputs; others (status, execute_input, comm_*, ...) are not
OUTPUT_TYPES = {"stream", "display_data", "update_display_data", "execute_result", "error", "clear_output"}
#: outputs that may belong to an earlier cell (a background thread's print) and are still shown
LATE_OUTPUT_TYPES = {"stream", "display_data", "update_display_data", "clear_output"}


class Fatal(Exception):
    """The bridge cannot serve: reported as a ``fatal`` message, exit status 1."""


class Stop(Exception):
    """SIGTERM or EOF on fd 3 while a cell runs: shut down now."""


# --- output shapes ------------------------------------------------------------------------


def to_output(msg_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
    """A Jupyter IOPub message as an nbformat output, or None when it is not an output."""
    if msg_type == "stream":
        return {"output_type": "stream", "name": content.get("name", "stdout"), "text": content.get("text", "")}
    if msg_type in {"display_data", "update_display_data"}:
        return {
            "output_type": "display_data",
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
        }
    if msg_type == "execute_result":
        return {
            "output_type": "execute_result",
            "execution_count": content.get("execution_count"),
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
        }
    if msg_type == "error":
        return {
            "output_type": "error",
            "ename": content.get("ename", ""),
            "evalue": content.get("evalue", ""),
            "traceback": list(content.get("traceback", [])),
        }
    if msg_type == "clear_output":
        return {"output_type": "clear_output", "wait": bool(content.get("wait", False))}
    return None


def reply_status(content: dict[str, Any], interrupted: bool) -> str:
    """The protocol's status for an execute_reply's content."""
    status = content.get("status")
    if status == "ok":
        return "ok"
    if status == "aborted":
        return "interrupted"
    if status == "error" and content.get("ename") == "KeyboardInterrupt":
        return "interrupted"
    if status == "error":
        return "error"
    return "interrupted" if interrupted else "error"


# --- the kernel process's own stdout/stderr ------------------------------------------------


class KernelLog:
    """A pipe the kernel process writes its stdout and stderr to; the last lines are kept."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_inheritable(self.write_fd, False)  # passed to the kernel explicitly, not by accident
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._partial = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, name="kernel-log", daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                data = self._partial + chunk
                *complete, self._partial = data.split(b"\n")
                if len(self._partial) > 4096:
                    complete.append(self._partial)
                    self._partial = b""
                for line in complete:
                    self.lines.append(line.decode("utf-8", "replace").rstrip("\r"))

    def write(self, text: str) -> int:
        """Bridge-side text (Python warnings, jupyter_client's log) lands here too."""
        with self._lock:
            for line in text.splitlines():
                if line.strip():
                    self.lines.append(line)
        return len(text)

    def flush(self) -> None:
        pass

    def clear(self) -> None:
        with self._lock:
            self.lines.clear()

    def tail(self, wait: float = 0.2) -> list[str]:
        time.sleep(wait)  # let the pump catch the last words of a dying kernel
        with self._lock:
            lines = list(self.lines)
            if self._partial:
                lines.append(self._partial.decode("utf-8", "replace"))
        return lines[-LOG_TAIL:]


# --- the bridge ---------------------------------------------------------------------------


class Bridge:
    def __init__(self, kernel_name: str) -> None:
        self.kernel_name = kernel_name
        self.out = os.fdopen(CONTROL_OUT, "w", buffering=1, encoding="utf-8")
        self.requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.interrupt_requested = False
        self.stopping = False
        self.running = False
        self.needs_restart = False
        self.force_shutdown = False  # stopped mid-cell: no graceful shutdown request
        self.count = 0
        self.log = KernelLog()
        # Under the runtime's private state directory when the agent gives one, so nothing of
        # envctl's lands in the runtime's filesystem (and so in a save).
        self.runtime_dir = tempfile.mkdtemp(prefix="envctl-jupyter-", dir=os.environ.get("ENVCTL_AGENT_SCRATCH"))
        self.km: Any = None  # jupyter_client.KernelManager
        self.kc: Any = None  # its BlockingKernelClient
        self.language = ""
        self.info: dict[str, Any] = {}

    # --- messages to the agent ------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(message, separators=(",", ":"), default=str) + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.stopping = True  # the agent went away

    def output(self, output: dict[str, Any]) -> None:
        self.send({"type": "output", "output": output})

    # --- signals and requests -------------------------------------------------------------
    def install_signals(self) -> None:
        def on_sigint(signum: int, frame: object) -> None:
            if self.running:
                self.interrupt_requested = True

        def on_sigterm(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, on_sigterm)

    def read_requests(self) -> None:
        """Reader thread: fd 3 lines into the queue; None at EOF."""
        try:
            with os.fdopen(CONTROL_IN, "r", encoding="utf-8") as requests:
                for line in requests:
                    try:
                        request = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(request, dict):
                        self.requests.put(request)
        except (OSError, ValueError):
            pass
        self.stopping = True  # the agent went away: a running cell is not waited for
        self.requests.put(None)

    # --- kernel lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        try:
            from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
            from jupyter_client.manager import KernelManager
        except ImportError as exc:
            found = scan_kernelspecs()
            raise Fatal(
                f"runtime type jupyter needs jupyter_client in the environment ({exc}); install it "
                f"with `python3 -m pip install jupyter_client ipykernel`. Kernelspecs found: "
                f"{', '.join(found) or 'none'}"
            ) from None

        specs = KernelSpecManager().find_kernel_specs()
        if self.kernel_name not in specs:
            listing = ", ".join(f"{name} ({path})" for name, path in sorted(specs.items())) or "none"
            raise Fatal(f"no Jupyter kernelspec named {self.kernel_name!r} in this environment; found: {listing}")
        self.km = KernelManager(
            kernel_name=self.kernel_name,
            connection_file=os.path.join(self.runtime_dir, "kernel.json"),
        )
        self.km.shutdown_wait_time = SHUTDOWN_WAIT
        try:
            spec = self.km.kernel_spec
        except NoSuchKernel as exc:
            raise Fatal(f"kernelspec {self.kernel_name!r} cannot be loaded: {exc}") from None
        self.language = getattr(spec, "language", "") or ""
        try:
            self.km.start_kernel(stdout=self.log.write_fd, stderr=self.log.write_fd, cwd=os.getcwd())
        except Exception as exc:
            raise Fatal(self.describe_failure(f"kernel {self.kernel_name!r} did not start: {exc}")) from None
        self.connect()

    def connect(self) -> None:
        """A fresh client on the current kernel; waits until it answers."""
        assert self.km is not None
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        except Exception as exc:  # RuntimeError (kernel died) or TimeoutError
            raise Fatal(
                self.describe_failure(
                    f"kernel {self.kernel_name!r} did not become ready in {STARTUP_TIMEOUT:.0f} s: {exc}"
                )
            ) from None
        self.info = self.kernel_info()

    def kernel_info(self) -> dict[str, Any]:
        assert self.kc is not None
        msg_id = self.kc.kernel_info()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_shell_msg(timeout=1)
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return dict(msg.get("content", {}))
        return {}

    def restart(self) -> None:
        assert self.km is not None
        self.log.clear()  # the dead kernel's last words were shown with its cell
        try:
            self.km.restart_kernel(now=True, newports=True)
        except Exception as exc:
            raise Fatal(self.describe_failure(f"kernel {self.kernel_name!r} could not be restarted: {exc}")) from None
        self.connect()
        self.needs_restart = False
        self.count = 0

    def alive(self) -> bool:
        assert self.km is not None
        try:
            return bool(self.km.is_alive())
        except Exception:
            return False

    def exit_code(self) -> int | None:
        process = getattr(getattr(self.km, "provisioner", None), "process", None) or getattr(self.km, "kernel", None)
        code = getattr(process, "returncode", None)
        if code is None and process is not None:
            with contextlib.suppress(Exception):
                code = process.poll()
        return code

    def describe_failure(self, message: str) -> str:
        code = self.exit_code()
        if code is not None:
            message += f" (kernel process exit status {code})"
        tail = self.log.tail()
        if tail:
            message += "\nlast kernel output:\n" + "\n".join(tail)
        return message

    def shutdown(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=self.force_shutdown or self.needs_restart)
            except Exception:
                process = getattr(getattr(self.km, "provisioner", None), "process", None)
                if process is not None:
                    with contextlib.suppress(Exception):
                        os.killpg(process.pid, signal.SIGKILL)
                    with contextlib.suppress(Exception):
                        process.kill()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # --- execution ------------------------------------------------------------------------
    def check_stop(self) -> None:
        if self.stopping:
            raise Stop

    def execute(self, code: str) -> None:
        assert self.kc is not None
        if self.needs_restart:
            try:
                self.restart()
            except Fatal as exc:  # the cell still gets its done; then the bridge exits
                self.output({"output_type": "error", "ename": "KernelDied", "evalue": str(exc), "traceback": []})
                self.send({"type": "done", "status": "error", "execution_count": self.count})
                raise
            self.output(
                {
                    "output_type": "stream",
                    "name": "stderr",
                    "text": f"The {self.kernel_name} kernel died and was restarted: its state is gone.\n",
                }
            )
        self.interrupt_requested = False
        self.running = True
        try:
            status = self._execute(code)
        finally:
            self.running = False
            self.interrupt_requested = False
        self.send({"type": "done", "status": status, "execution_count": self.count})

    def _execute(self, code: str) -> str:
        assert self.kc is not None and self.km is not None
        msg_id = self.kc.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=False)
        sent_at = time.monotonic()
        busy_at: float | None = None
        running = False  # the kernel runs this cell's code: execute_input seen
        interrupted = False
        interrupted_at = 0.0
        nudged = False  # the interrupt was sent again, to the kernel's main thread
        saw_error = False
        next_alive_check = time.monotonic() + 1.0
        # IOPub until the kernel is idle again after this request
        while True:
            self.check_stop()
            if self.interrupt_requested and self.may_interrupt(running, busy_at, sent_at):
                self.interrupt_requested = False
                interrupted, interrupted_at = True, time.monotonic()
                with contextlib.suppress(Exception):
                    self.km.interrupt_kernel()
            if interrupted and not nudged and not saw_error and time.monotonic() - interrupted_at > NUDGE_AFTER:
                nudged = True
                self.nudge()
            try:
                msg = self.kc.get_iopub_msg(timeout=POLL)
            except queue.Empty:
                if time.monotonic() >= next_alive_check:
                    next_alive_check = time.monotonic() + 1.0
                    if not self.alive():
                        return self.died()
                continue
            msg_type = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            content = msg.get("content", {})
            mine = msg.get("parent_header", {}).get("msg_id") == msg_id
            if mine and msg_type == "status" and content.get("execution_state") == "idle":
                break
            if mine and msg_type == "status" and content.get("execution_state") == "busy":
                busy_at = time.monotonic()
            if mine and msg_type == "execute_input":
                running = True
                if content.get("execution_count"):
                    self.count = int(content["execution_count"])
            if msg_type not in OUTPUT_TYPES or (not mine and msg_type not in LATE_OUTPUT_TYPES):
                continue
            output = to_output(msg_type, content)
            if output is None:
                continue
            if msg_type == "error":
                saw_error = True
            if msg_type == "execute_result" and output.get("execution_count"):
                self.count = int(output["execution_count"])
            self.output(output)
        # then the shell reply
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_stop()
            try:
                msg = self.kc.get_shell_msg(timeout=POLL)
            except queue.Empty:
                if not self.alive():
                    return self.died()
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            content = msg.get("content", {})
            if content.get("execution_count"):
                self.count = int(content["execution_count"])
            return reply_status(content, interrupted)
        # idle without a reply: judge by what was seen
        if interrupted:
            return "interrupted"
        return "error" if saw_error else "ok"

    def nudge(self) -> None:
        """Send SIGINT again, to the kernel's main thread alone.

        A signal sent to a process goes to any one of its threads. When one of ipykernel's
        helper threads takes it, Python only marks it and the main thread, blocked in a call
        such as ``time.sleep``, sees it when that call returns: the cell runs on for as long
        as it blocks. A signal aimed at the main thread (tgkill) wakes the call; both marks
        are one, so the cell is interrupted once.
        """
        if getattr(self.km.kernel_spec, "interrupt_mode", "signal") != "signal":
            return
        process = getattr(getattr(self.km, "provisioner", None), "process", None)
        pid = getattr(process, "pid", None)
        if not pid:
            return
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.tgkill(pid, pid, signal.SIGINT)  # the main thread's id is the process id

    @staticmethod
    def may_interrupt(running: bool, busy_at: float | None, sent_at: float) -> bool:
        """Whether a SIGINT now reaches the cell's code.

        ipykernel ignores SIGINT until it starts handling a request, so an interrupt sent
        right after the request would be lost and the cell would run on. It waits for
        ``execute_input`` (published once the handler runs), or a while after ``busy`` or
        the request for kernels that publish no ``execute_input``.
        """
        now = time.monotonic()
        return running or (busy_at is not None and now - busy_at > 0.5) or now - sent_at > 2.0

    def died(self) -> str:
        """The kernel process is gone mid-cell: say so; restart it before the next cell."""
        assert self.kc is not None
        # outputs already on their way still belong to this cell
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                break
            msg_type = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            if msg_type in OUTPUT_TYPES:
                output = to_output(msg_type, msg.get("content", {}))
                if output is not None:
                    self.output(output)
        code = self.exit_code()
        evalue = f"The {self.kernel_name} kernel died while running this cell" + (
            f" (exit status {code})" if code is not None else ""
        )
        evalue += "; it will be restarted for the next cell, and its state is lost."
        tail = self.log.tail()
        traceback = [f"KernelDied: {evalue}"]
        if tail:
            traceback += ["", "Last output of the kernel process:", *tail]
        self.output({"output_type": "error", "ename": "KernelDied", "evalue": evalue, "traceback": traceback})
        self.needs_restart = True
        return "error"

    # --- main loop ------------------------------------------------------------------------
    def serve(self) -> None:
        threading.Thread(target=self.read_requests, name="requests", daemon=True).start()
        language_info = self.info.get("language_info") or {}
        self.send(
            {
                "type": "ready",
                "language": self.language or language_info.get("name", ""),
                "version": language_info.get("version", ""),
                "kernel": self.kernel_name,
                "implementation": self.info.get("implementation", ""),
            }
        )
        while not self.stopping:
            try:
                request = self.requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if request is None:
                return  # EOF on fd 3: the agent went away
            if request.get("op") == "execute":
                try:
                    self.execute(str(request.get("code", "")))
                except Stop:
                    self.force_shutdown = True
                    return


def scan_kernelspecs() -> list[str]:
    """Kernelspec names on Jupyter's usual paths, without jupyter_client (for error messages)."""
    roots = [
        os.path.expanduser("~/.local/share/jupyter"),
        os.path.join(sys.prefix, "share", "jupyter"),
        "/usr/local/share/jupyter",
        "/usr/share/jupyter",
    ]
    roots[:0] = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    found: list[str] = []
    for root in roots:
        for spec in sorted(glob.glob(os.path.join(root, "kernels", "*", "kernel.json"))):
            name = os.path.basename(os.path.dirname(spec))
            if name not in found:
                found.append(name)
    return found


def fatal(message: str) -> None:
    line = json.dumps({"type": "fatal", "message": message}, separators=(",", ":")) + "\n"
    with contextlib.suppress(OSError):
        os.write(CONTROL_OUT, line.encode("utf-8"))
    with contextlib.suppress(OSError):
        os.write(2, f"jupyter_bridge: {message}\n".encode("utf-8", "replace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jupyter_bridge", description="Run a Jupyter kernel behind envctl's kernel protocol."
    )
    parser.add_argument("--kernel", default="python3", help="kernelspec name (default: python3)")
    args = parser.parse_args(argv)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    bridge = Bridge(args.kernel)
    # fd 1 and 2 are the agent's cell-output pipes: the bridge's own chatter (warnings,
    # jupyter_client's log) goes to the kernel log instead; fatal errors still reach fd 2.
    sys.stdout = sys.stderr = bridge.log  # type: ignore[assignment,unused-ignore]
    bridge.install_signals()
    try:
        bridge.start()
        if not bridge.stopping:  # SIGTERM while the kernel started: just shut it down
            bridge.serve()
    except Fatal as exc:
        fatal(str(exc))
        bridge.shutdown()
        return 1
    except Exception as exc:  # a bug or an unexpected jupyter_client failure: still say why
        fatal(f"jupyter bridge failed: {type(exc).__name__}: {exc}")
        bridge.shutdown()
        return 1
    bridge.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
