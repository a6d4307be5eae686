"""Attaching to a pod envctl did not start (runner/runtimes/attach.py), on the kubernetes backend:
``POD`` or ``POD/CONTAINER`` in envctl's namespace, read and entered through the API only (the
pod's processes are on some node, not on envctl's host), so it works on any node's pod.

Placing the agent (``place``): one ``pods/exec`` of the container's own ``python3`` with the
bootstrap of ``agent_bootstrap`` (shared with Swarm's attach), which reads one line on its
standard input (the agent's files and the attach's fresh credential: never in an argument, a
variable or a log) and writes them into a directory of its own on the container's ``/dev/shm``
(a tmpfs: no part of the container's filesystem, refused when it is not one). It then forks
the agent (a session of its own, listening on TCP with that credential) and stays as the
agent's parent and child subreaper, reaping the agent and whatever its cells leave behind, so
no zombie stays when it ends; it prints the pids and the port, and envctl closes the exec
stream and dials the pod's IP as it dials its own pods. Cells run in the container's
namespaces, with its variables, user and working directory (what an exec'd process gets).

Removing it (``remove``): a second exec sends the agent SIGTERM (it kills its kernels), then
SIGKILL to anything left under the bootstrap, waits for the bootstrap to end, and removes the
directory; it answers what is still there. The pod is never deleted or restarted.

Without ``python3`` in the container the agent has nothing to run on in the pod: it runs on
envctl's host instead, as the local engine's attach does, and its Bash kernel is a relay
(``kube_shell``) to a shell in the container behind one long-lived ``pods/exec`` stream
(``shell_relay``); detaching kills the shells the relays recorded and their descendants, by one
more exec (``end_shells``). Python cells are refused there, saying why; Bash cells run.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from runner.backends import agent_bootstrap, kube_shell
from runner.backends.base import AGENT_PORT, OtherContainer
from runner.backends.kube_api import KubeApi

PLACE_TIMEOUT = 20.0
REMOVE_TIMEOUT = 20.0


def parse_ref(text: str) -> tuple[str, str]:
    """``POD`` or ``POD/CONTAINER``."""
    pod, _, container = text.strip().partition("/")
    if not pod or "/" in container or len(pod) > 253:
        raise InvalidInputError("attach.container: give POD or POD/CONTAINER of envctl's namespace", field="attach")
    return pod, container


def inspect(api: KubeApi, text: str) -> OtherContainer | None:
    """The pod's container (``POD/CONTAINER``; ``POD`` alone: its only container), as an
    ``OtherContainer``: ``name`` the pod's, ``member`` the container's; None: no such pod."""
    pod_name, wanted = parse_ref(text)
    pod = api.read_pod(pod_name)
    if pod is None:
        return None
    spec = pod.get("spec") or {}
    names = [str(c.get("name")) for c in spec.get("containers") or []]
    if not wanted:
        if len(names) != 1:
            raise InvalidInputError(
                f"attach.container: pod {pod_name} has containers {', '.join(names)}; name one as {pod_name}/CONTAINER",
                field="attach",
            )
        wanted = names[0]
    if wanted not in names:
        return None
    c = next(c for c in spec.get("containers") or [] if c.get("name") == wanted)
    statuses = {str(s.get("name")): s for s in (pod.get("status") or {}).get("containerStatuses") or []}
    running = (pod.get("status") or {}).get("phase") == "Running" and bool(
        ((statuses.get(wanted) or {}).get("state") or {}).get("running")
    )
    meta = pod.get("metadata") or {}
    return OtherContainer(
        id=str(meta.get("uid") or ""),
        name=pod_name,
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        running=running,
        pid=0,
        env={str(e["name"]): str(e.get("value") or "") for e in c.get("env") or [] if "value" in e},
        working_dir=str(c.get("workingDir") or ""),
        user="",
        member=wanted,
        address=str((pod.get("status") or {}).get("podIP") or ""),
    )


def has_python(api: KubeApi, c: OtherContainer) -> bool:
    try:
        out = api.exec(c.name, c.member, ["python3", "-I", "-B", "-S", "-c", "print('envctl-python-ok')"], timeout=15)
    except BackendError:
        return False
    return "envctl-python-ok" in out


def place(api: KubeApi, c: OtherContainer, runtime_id: str, credential: bytes) -> dict[str, Any]:
    """The agent in the container (see the module's doc); what detaching needs and where it listens."""
    if not c.address:
        raise ConflictError(f"pod {c.name} has no IP address yet; wait until it runs", details={"pod": c.name})
    where = agent_bootstrap.directory(runtime_id)
    line = agent_bootstrap.bootstrap_line(credential, AGENT_PORT)
    leftover = {"pod": c.name, "container": c.member, "dir": where}  # found by its directory's name
    command = [*agent_bootstrap.PYTHON, agent_bootstrap.BOOTSTRAP, where]
    for attempt in (1, 2):
        answer = ""
        try:
            answer = api.exec_first_line(c.name, c.member, command, line, timeout=PLACE_TIMEOUT)
            said = agent_bootstrap.answer(f"pod {c.name}", answer)
            break
        except BackendError:
            # whatever this try (or an envctl that died while placing one) left there goes; a
            # directory such an envctl left is the one failure worth a second try
            with contextlib.suppress(BackendError):
                remove(api, leftover)
            if attempt == 2 or "cannot make" not in answer:
                raise
    pod = api.read_pod(c.name) or {}
    return {
        "origin": "attached",
        "restarts": int(_status(pod, c.member).get("restartCount") or 0),
        "pod": c.name,
        "container": c.member,
        "container_id": c.id,
        "container_name": f"{c.name}/{c.member}",
        "dir": where,
        "reaper_pid": int(said["reaper"]),
        "in_container_pid": int(said["agent"]),
        "host": c.address,
        "port": int(said["port"]),
        "python": True,
    }


def remove(api: KubeApi, state: dict[str, Any]) -> dict[str, Any]:
    """The agent ended and its directory removed (see the module's doc); what is still there."""
    args = agent_bootstrap.stopper_args(state)
    if args is None or not state.get("pod"):
        return {}
    command = [*agent_bootstrap.PYTHON, agent_bootstrap.STOPPER, *args]
    out = api.exec(str(state["pod"]), str(state.get("container") or ""), command, timeout=REMOVE_TIMEOUT)
    return agent_bootstrap.stopped(f"pod {state['pod']}", out)


def shell_relay(api: KubeApi, c: OtherContainer, pids: Path) -> tuple[list[str], dict[str, Any]]:
    """The relay's command (kube_shell: envctl's own credentials, loaded again there) and what
    detaching needs; the shells it starts are recorded in ``pids``."""
    pod = api.read_pod(c.name) or {}
    argv = [sys.executable, "-B", "-m", "runner.backends.kube_shell"]
    argv += [api.config, api.context, api.namespace, c.name, c.member, str(pids)]
    state = {
        "origin": "attached",
        "shell_relay": True,  # a Bash-only attach (not "relay": a Swarm attach names its relay service so)
        "restarts": int(_status(pod, c.member).get("restartCount") or 0),
        "pod": c.name,
        "container": c.member,
        "container_id": c.id,
        "container_name": f"{c.name}/{c.member}",
        "shells": str(pids),
        "python": False,
    }
    return argv, state


def end_shells(api: KubeApi, state: dict[str, Any]) -> str:
    """Every shell the attach's relays started, and their descendants, killed (one exec)."""
    shells = kube_shell.read_pids(str(state.get("shells") or ""))
    return kube_shell.signal_shells(api, str(state["pod"]), str(state.get("container") or ""), "KILL", shells)


def pod_alive(api: KubeApi, state: dict[str, Any]) -> bool:
    """Whether the attached pod is still the one attached to and its container runs."""
    pod = api.read_pod(str(state.get("pod") or ""))
    if pod is None or str((pod.get("metadata") or {}).get("uid")) != str(state.get("container_id") or ""):
        return False
    status = _status(pod, str(state.get("container") or ""))
    running = bool((status.get("state") or {}).get("running"))
    return running and int(status.get("restartCount") or 0) == int(state.get("restarts") or 0)


def _status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    for s in (pod.get("status") or {}).get("containerStatuses") or []:
        if s.get("name") == container:
            return dict(s)
    return {}
