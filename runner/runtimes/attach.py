"""Attached runtimes: cells in a container envctl did not start (a data service, a training
job), which it never stops, restarts, removes or commits unless told to.

Which containers may be attached is the admins' word only: ``ENVCTL_RUNNER_ATTACH_ALLOW``,
``label:KEY=VALUE`` and ``name:GLOB`` rules (attaching gives a user a shell in that
container). Anything outside it is a 403 naming the rules (R42); so is a container of envctl's
own runtimes.

How cells get in: envctl's agent runs beside the container, as a process of this host with
its socket in the runtime's private state directory (so the runner reaches it as any other,
also after a restart). Its kernels start through ``agent/confine.py``: the container's cgroups
(its limits apply to cells), all its namespaces, its root and working directory, its bounding
set and capabilities, its user and groups and its no_new_privs, taken from its main process
and checked before the kernel runs; anything failing, the kernel does not start (README:
what is not applied, its seccomp filter first). Cells see its processes and files and can call
its programs. Python cells run on the container's
own ``python3`` (the agent's kernel files are copied for as long as it is attached into a
directory on the container's ``/dev/shm`` tmpfs, which is no part of its filesystem: nothing
shows in ``docker diff``); a container without ``python3`` runs Bash cells only, and says so.

Detaching (a stop, idle shutdown, deletion) ends the agent and its kernels and removes that
directory: the container is left as it was. The runtime's row remembers the container as its
``environment_ref`` (``attach:NAME``); its version is the ``bash`` base, only nominally.
On the kubernetes backend (``attach_inside``) the agent goes into the pod instead, through the
API's ``pods/exec`` (``runner/backends/kube_attach.py``): ``POD[/CONTAINER]`` of envctl's
namespace, on any node; a fresh credential per attach, handed over on the exec's standard input
into the container's ``/dev/shm``; envctl dials it at the pod's IP as it dials its own pods
(its address and sealed key on the row, as a boot's). A pod without ``python3`` runs Bash cells
only: the agent runs on this host (``_place_relay``) and its Bash kernel relays to a shell in
the container through the backend (``shell_relay``, runner/backends/kube_shell.py); detaching
has the relays end their shells, then kills what is left (``end_shells``). On Swarm the same
bootstrap goes in by the node's ``docker exec``, through helper tasks on the container's node
(``runner/backends/swarm_attach.py``), when an admin allows that (``ENVCTL_SWARM_ATTACH_ENGINE``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from envs.kit.errors import ConflictError, EnvctlError
from runner.agentauth import make_credential
from runner.backends.base import LABEL_MANAGED, LABEL_RUNTIME, OtherContainer, RuntimeBackend
from runner.channel import AgentUnavailableError, wait_for_agent
from runner.errors import AttachNotAllowedError, ContainerNotFoundError, RuntimeStateError
from runner.models import Runtime
from runner.paths import RuntimePaths
from runner.runtimes.states import State
from runner.runtimes.store import Records, activity
from runner.settings import Settings

log = logging.getLogger("envctl.attach")

PREFIX = "attach:"  # an attached runtime's environment_ref: attach:<container name>
NOMINAL_ENVIRONMENT = "bash"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASH_FLAGS = ["--noprofile", "--norc"]
RELAY_END = 15.0  # how long a detach waits for the shell relays to end their shells
_AGENT_FILES = ("main.py", "kernels.py", "pykernel.py", "magics.py")  # the kernels' files in the container


def container_of(rt: Runtime) -> str | None:
    """The container an attached runtime is attached to; None for any other runtime."""
    ref = rt.environment_ref or ""
    return ref[len(PREFIX) :] if ref.startswith(PREFIX) else None


def check_attached_save(rt: Runtime, attached_save: bool) -> None:
    """A save of an attached runtime is refused unless asked for (``attached_save``), and then
    refused as not supported yet; any other runtime passes."""
    container = container_of(rt)
    if container is None:
        return
    if not attached_save:
        raise RuntimeStateError(
            f"runtime {rt.name!r} is attached to container {container!r}, which envctl did not start: a save "
            "would make an environment of it; ask for that explicitly (`attached_save: true`)",
            details={"container": container, "field": "attached_save"},
        )
    raise RuntimeStateError(
        f"saving attached container {container!r} is not supported yet: its image is no envctl version to "
        "make a layer on; `docker commit` it yourself and import the image",
        details={"container": container},
    )


class Attach:
    def __init__(
        self, settings: Settings, records: Records, backend: RuntimeBackend, paths: RuntimePaths, runner: str
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.records = records
        self.backend = backend
        self.paths = paths
        self._agents: dict[int, subprocess.Popen[bytes]] = {}  # agent pid -> process (reaped on detach)

    # ------------------------------------------------------------------ the allow-list
    def rules_text(self) -> str:
        rules = self.settings.runner_attach_allow
        return ", ".join(f"{kind}:{rule}" for kind, rule in rules) if rules else "(empty: no container may be attached)"

    def check(self, container: str) -> OtherContainer:
        """The container, if it exists, runs and the allow-list names it."""
        if not container or len(container) > 200:
            raise ContainerNotFoundError("attach.container: give a container's id or name")
        found = self.backend.inspect_other(container)
        if found is None:
            raise ContainerNotFoundError(
                f"attach.container: no container {container[:80]!r} in the engine",
                details={"container": container[:80]},
            )
        if LABEL_MANAGED in found.labels or LABEL_RUNTIME in found.labels:
            raise AttachNotAllowedError(
                f"container {found.name!r} is an envctl runtime's; it cannot be attached to",
                details={"container": found.name},
            )
        if not self.allowed(found):
            raise AttachNotAllowedError(
                f"container {found.name!r} is not in the attach allow-list (ENVCTL_RUNNER_ATTACH_ALLOW: "
                f"{self.rules_text()}); an admin decides which containers may be attached",
                details={"container": found.name, "rules": [f"{k}:{r}" for k, r in self.settings.runner_attach_allow]},
            )
        if not found.running or (found.pid <= 0 and not self.backend.attach_inside):
            raise ConflictError(
                f"container {found.name!r} is not running; start it first", details={"container": found.name}
            )
        return found

    def allowed(self, c: OtherContainer) -> bool:
        for kind, rule in self.settings.runner_attach_allow:
            if kind == "label":
                key, _, value = rule.partition("=")
                if c.labels.get(key.strip()) == value.strip():
                    return True
            elif kind == "name" and fnmatch.fnmatchcase(c.name, rule):
                return True
        return False

    def has_python(self, c: OtherContainer) -> bool:
        """Whether ``c`` runs Python cells; a container without python3 on a backend that
        places the agent inside and has no shell relay is refused."""
        if not self.backend.attach_inside:
            return _has(Path(f"/proc/{c.pid}/root"), c.env.get("PATH", DEFAULT_PATH), "python3")
        python = c.python if c.python is not None else self.backend.other_has_python(c)
        if not python and not self.backend.bash_relay:
            raise ConflictError(
                f"container {ref_of(c)!r} has no python3: on the {self.backend.name} backend envctl's agent runs "
                "inside the attached container, on its python3 (Bash-only attach needs the local Docker engine "
                "or Kubernetes)",
                details={"container": ref_of(c)},
            )
        return python

    def record(self, runtime_id: str, c: OtherContainer, python: bool | None = None) -> None:
        """A runtime just created for ``c`` (stopped): its row remembers the container."""
        python = self.has_python(c) if python is None else python
        with self.records.tx() as s:
            rt = s.get(Runtime, runtime_id, with_for_update=True)
            assert rt is not None
            self.records.change(
                rt,
                environment_ref=PREFIX + ref_of(c),
                state_message=f"attached runtime of container {c.name}" + ("" if python else ": Bash cells only"),
                **({} if python else {"language": "bash"}),
            )
            self.records.log(
                s,
                runtime_id,
                event="attach-created",
                reason="user-request",
                message=f"a runtime attached to container {ref_of(c)} ({c.id[:12]}); "
                + ("Python and Bash cells" if python else "Bash cells only: the container has no python3"),
            )

    # ------------------------------------------------------------------ attach and detach
    def serve(self, runtime_id: str) -> bool:
        """Start an attached runtime (a stopped or failed one): place the agent, ``running``.
        False for any other runtime."""
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            if rt is None or rt.state not in (State.STOPPED, State.ERROR):
                return False
            container = container_of(rt)
            left = dict(rt.backend_state or {})
        if container is None:
            return False
        if left:
            self.detach(runtime_id, left)
        try:
            found = self.check(container)
        except EnvctlError as exc:
            self.records.fail(runtime_id, "attach-failed", exc.message, {State.STOPPED, State.ERROR})
            return True
        with self.records.tx() as s:
            ok = self.records.transition(
                s,
                runtime_id,
                State.BOOTING,
                "attach",
                f"attaching to container {found.name}",
                expect={State.STOPPED, State.ERROR},
                values={"backend_state": {}},
            )
        if not ok:
            return True
        begun = time.monotonic()
        state: dict[str, Any] = {}
        try:
            if self.backend.attach_inside and self.has_python(found):
                state = self._place_inside(runtime_id, found)
                target: Any = self.paths.agent(runtime_id, state)
            elif self.backend.attach_inside:
                state = self._place_relay(runtime_id, found)
                target = self.paths.socket(runtime_id)
            else:
                state = self._place(runtime_id, found)
                target = self.paths.socket(runtime_id)
            wait_for_agent(target, begun + 20, alive=self._alive(state))
        except (EnvctlError, OSError) as exc:
            message = exc.message if isinstance(exc, EnvctlError) else str(exc)
            self.detach(runtime_id, state)
            self.records.fail(runtime_id, "attach-failed", f"could not attach: {message}", {State.BOOTING})
            return True
        cells = "Python and Bash cells" if state["python"] else "Bash cells only: the container has no python3"
        now = self.records.clock()
        with self.records.tx() as s:
            self.records.transition(
                s,
                runtime_id,
                State.RUNNING,
                "attached",
                f"attached to container {ref_of(found)} ({cells})",
                expect={State.BOOTING},
                details={"container_id": found.id, "python": state["python"]},
                values={
                    "backend_state": state,
                    "booted_at": now,
                    **activity("attach", now),
                    "phase": None,
                },
            )
        return True

    def _alive(self, state: dict[str, Any]) -> Any:
        def alive() -> None:
            pid = int(state.get("agent_pid") or 0)
            proc = self._agents.get(pid)
            if proc is not None and proc.poll() is not None:
                raise AgentUnavailableError(f"the agent exited with code {proc.returncode}")

        return alive

    def _place_inside(self, runtime_id: str, c: OtherContainer) -> dict[str, Any]:
        """The agent inside the container, through the backend's API, with a fresh credential."""
        if self.paths.links is None:
            raise EnvctlError("attaching here needs the tcp channel's credentials (no secrets key)")
        credential = make_credential(runtime_id)
        state = dict(self.backend.place_agent(c, runtime_id, credential.line()))
        state["agent"] = self.paths.links.record(credential, str(state.pop("host")), int(state.pop("port")))
        return state

    def _place(self, runtime_id: str, c: OtherContainer) -> dict[str, Any]:
        """The agent beside the container, its kernels' files in the container's /dev/shm."""
        root = Path(f"/proc/{c.pid}/root")
        inner = (
            f"/dev/shm/.envctl-agent-{runtime_id}"
            if (root / "dev/shm").is_dir()
            else f"/tmp/.envctl-agent-{runtime_id}"
        )
        seen = root / inner.lstrip("/")
        seen.mkdir(mode=0o700, parents=False, exist_ok=True)
        state: dict[str, Any] = {
            "origin": "attached",
            "container_id": c.id,
            "container_name": c.name,
            "container_pid": c.pid,
            "dir": inner,
        }
        for name in _AGENT_FILES:
            shutil.copyfile(self.paths.agent_dir / name, seen / name)
        (seen / "scratch").mkdir(mode=0o700, exist_ok=True)
        path = c.env.get("PATH", DEFAULT_PATH)
        python = _has(root, path, "python3")
        shell = "bash" if _has(root, path, "bash") else "sh"
        # every kernel starts through confine.py: the container's cgroups, namespaces, root,
        # working directory, user, capabilities and no_new_privs, or it does not start
        enter = [sys.executable, "-I", "-B", str(self.paths.agent_dir / "confine.py"), str(c.pid)]
        uid, gid = _ids_of(c.pid)
        os.chown(seen, uid, gid)  # the container's user reads the kernel's files, writes scratch
        os.chown(seen / "scratch", uid, gid)
        if python:
            py = [*enter, "--", "python3", "-u", "-B", f"{inner}/pykernel.py"]
        else:
            py = _refusal("this attached container has no python3: run Bash cells (language bash)")
        env = {
            **c.env,
            "ENVCTL_BASH_KERNEL": json.dumps(
                [*enter, "--", shell, *(["--noprofile", "--norc"] if shell == "bash" else [])]
            ),
            "ENVCTL_PYTHON_KERNEL": json.dumps(py),
            "ENVCTL_BASH_CELL_WRITE_DIR": str(seen / "scratch"),
            "ENVCTL_BASH_CELL_DIR": f"{inner}/scratch",
            "ENVCTL_SECRETS_DIR": str(seen / "secrets"),
        }
        state["agent_pid"] = self._start_agent(runtime_id, env)
        state["python"] = python
        return state

    def _state_dir(self, runtime_id: str) -> Path:
        state_dir = self.paths.state_dir(runtime_id)
        if state_dir.is_symlink():
            state_dir.unlink()
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return state_dir

    def _start_agent(self, runtime_id: str, env: dict[str, str]) -> int:
        """envctl's agent on this host, listening on the runtime's socket; its pid."""
        state_dir = self._state_dir(runtime_id)
        self.paths.remove_socket(runtime_id)
        with open(state_dir / "attached-agent.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-u", "-I", "-B", str(self.paths.agent_dir / "main.py"), "--socket", "agent.sock"],
                cwd=state_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # it outlives a restart of envctl, as a container would
            )
        self._agents[proc.pid] = proc
        return proc.pid

    def _place_relay(self, runtime_id: str, c: OtherContainer) -> dict[str, Any]:
        """A container without python3 on a cluster: the agent on this host, its Bash kernel a
        relay to a shell in the container (``backend.shell_relay``, e.g. kube_shell); Python
        cells refused, saying why."""
        pids = self._state_dir(runtime_id) / "shells"
        pids.unlink(missing_ok=True)
        argv, state = self.backend.shell_relay(c, pids)
        root = str(Path(__file__).resolve().parents[2])  # the relay imports envctl's own modules
        env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "HOME": os.environ.get("HOME", "/"),
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
            "ENVCTL_BASH_STREAM": "1",
            "ENVCTL_BASH_KERNEL": json.dumps(argv),
            "ENVCTL_PYTHON_KERNEL": json.dumps(
                _refusal("this attached container has no python3: run Bash cells (language bash)")
            ),
            "ENVCTL_SECRETS_DIR": str(self.paths.state_dir(runtime_id) / "secrets"),
        }
        state["agent_pid"] = self._start_agent(runtime_id, env)
        return state

    def detach(self, runtime_id: str, state: dict[str, Any]) -> bool:
        """End the agent and its kernels and remove the agent's files from the container; the
        container itself is left as it was. False when ``state`` is not an attachment."""
        if state.get("origin") != "attached":
            return False
        if state.get("shell_relay"):
            return self._detach_relay(runtime_id, state)
        if state.get("pod") or state.get("inside"):
            return self._detach_inside(runtime_id, state)
        self._end_agent(state)
        inner = str(state.get("dir") or "")
        pid = int(state.get("container_pid") or 0)
        if pid and "/.envctl-agent-" in inner:
            shutil.rmtree(Path(f"/proc/{pid}/root") / inner.lstrip("/"), ignore_errors=True)
        self.paths.remove_socket(runtime_id)
        with self.records.tx() as s:
            self.records.log(
                s,
                runtime_id,
                event="detached",
                reason="stop",
                message=f"detached from container {state.get('container_name', '')}: agent ended, its files removed; "
                "the container keeps running",
            )
        return True

    def _end_agent(self, state: dict[str, Any]) -> None:
        """The agent on this host and everything under it (kernels, relays) killed."""
        agent = int(state.get("agent_pid") or 0)
        if agent and _is_our_agent(agent):
            for pid in reversed(_tree(agent)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        proc = self._agents.pop(agent, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def _end_relays(self, state: dict[str, Any]) -> None:
        """SIGTERM to the agent's shell relays: each ends its shell's descendants and has the
        shell reap them and exit (runner/backends/kube_shell.py); waited for, a while."""
        agent = int(state.get("agent_pid") or 0)
        if not agent or not _is_our_agent(agent):
            return
        relays = [p for p in _tree(agent) if b"runner.backends.kube_shell" in _cmdline(p)]
        for pid in relays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + RELAY_END
        while time.monotonic() < deadline and any(_cmdline(p) for p in relays):
            time.sleep(0.05)

    def _detach_relay(self, runtime_id: str, state: dict[str, Any]) -> bool:
        """Every shell the agent's relays started in the container (and their descendants)
        killed through the backend's API, then the agent on this host; nothing was written there."""
        name = str(state.get("container_name") or state.get("pod"))
        self._end_relays(state)
        try:
            # what is left of the shells first: a relay ended first closes its shell's stdin, and a shell that
            # exits leaves what a cell started in the background to the container's pid 1
            said = self.backend.end_shells(state)
            message = (
                f"detached from container {name}: agent ended, its shells ended (no files were placed); "
                "the container keeps running"
            )
            details = {"ended": said.split()[1:]}
        except EnvctlError as exc:
            message = f"detached from container {name}; its shells could not be reached to end them: {exc.message}"
            details = {}
        self._end_agent(state)
        Path(str(state.get("shells") or "/nonexistent")).unlink(missing_ok=True)
        self.paths.remove_socket(runtime_id)
        with self.records.tx() as s:
            self.records.log(s, runtime_id, event="detached", reason="stop", message=message, details=details)
        return True

    def _detach_inside(self, runtime_id: str, state: dict[str, Any]) -> bool:
        """The agent placed in a pod ended and its files removed, through the backend's API."""
        name = str(state.get("container_name") or state.get("pod"))
        try:
            left = self.backend.remove_agent(state)
            message = f"detached from container {name}: agent ended, its files removed; the container keeps running"
            if left.get("left") or left.get("dir_left"):
                message = (
                    f"detached from container {name}, but left: pids {left.get('left')}, files {left.get('dir_left')}"
                )
        except EnvctlError as exc:
            left = {}
            message = f"detached from container {name}; its agent could not be reached to end it: {exc.message}"
        with self.records.tx() as s:
            self.records.log(s, runtime_id, event="detached", reason="stop", message=message, details=left)
        return True

    def check_alive(self) -> None:
        """Attached runtimes whose container or agent went away: ``error``, what is left
        detached (a housekeeping step)."""
        with self.records.db.session() as s:
            rows = [
                (r.id, dict(r.backend_state or {}))
                for r in s.scalars(select(Runtime).where(Runtime.runner == self.runner, Runtime.state == State.RUNNING))
                if (r.backend_state or {}).get("origin") == "attached"
            ]
        for runtime_id, state in rows:
            if state.get("shell_relay"):
                agent = int(state.get("agent_pid") or 0)
                try:
                    if agent and _is_our_agent(agent) and self.backend.other_alive(state):
                        continue
                except EnvctlError:
                    continue  # the API does not answer: not "gone"
            elif state.get("pod") or state.get("inside"):
                try:
                    if self.backend.other_alive(state):
                        continue
                except EnvctlError:
                    continue  # the API does not answer: not "gone"
            elif (agent := int(state.get("agent_pid") or 0)) and _is_our_agent(agent):
                continue
            self.detach(runtime_id, state)
            self.records.fail(
                runtime_id, "agent-unreachable", "the attached agent is gone (the container stopped?)", {State.RUNNING}
            )
        with contextlib.suppress(EnvctlError):  # what an envctl that died while attaching left
            self.backend.sweep_placed(self._attached)

    def _attached(self) -> set[str]:
        """This runner's runtimes that are attached or attaching now."""
        with self.records.db.session() as s:
            rows = s.scalars(
                select(Runtime).where(Runtime.runner == self.runner, Runtime.state.in_((State.RUNNING, State.BOOTING)))
            )
            return {r.id for r in rows if container_of(r) is not None}


def ref_of(c: OtherContainer) -> str:
    """How an attached runtime names its container: ``NAME``, or ``POD/CONTAINER`` in a pod."""
    return f"{c.name}/{c.member}" if c.member else c.name


def _refusal(message: str) -> list[str]:
    """A kernel command that only says ``message`` and fails (a language the container lacks):
    a "fatal" message on the kernel protocol's channel (fd 4, runner/agent/pykernel.py), which
    the cell's error then says."""
    line = json.dumps({"type": "fatal", "message": message}) + "\n"
    return [sys.executable, "-c", f"import os, sys; os.write(4, {line.encode()!r}); sys.exit(1)"]


def _has(root: Path, path: str, program: str) -> bool:
    """Whether ``program`` is on the container's PATH (looked at through its root)."""
    return any(os.path.lexists(root / d.lstrip("/") / program) for d in path.split(":") if d.startswith("/"))


def _ids_of(pid: int) -> tuple[int, int]:
    """The user and group of the container's main process."""
    uid = gid = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def _cmdline(pid: int) -> bytes:
    """A live process's command line (empty: gone, or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_our_agent(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"/agent/main.py") for part in cmdline) and b"agent.sock" in cmdline


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    order, todo = [], [root]
    while todo:
        pid = todo.pop()
        order.append(pid)
        todo.extend(children.get(pid, []))
    return order
