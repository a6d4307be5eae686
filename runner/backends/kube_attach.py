"""Attaching to a pod envctl did not start (runner/runtimes/attach.py), on the kubernetes backend:
``POD`` or ``POD/CONTAINER`` in envctl's namespace, read and entered through the API only (the
pod's processes are on some node, not on envctl's host), so it works on any node's pod.

Placing the agent (``place``): one ``pods/exec`` of the container's own ``python3`` with a small
bootstrap, which reads one line on its standard input (the agent's files and the attach's fresh
credential: never in an argument, a variable or a log) and writes them into a directory of its
own on the container's ``/dev/shm`` (a tmpfs: no part of the container's filesystem, refused
when it is not one). It then forks the agent (a session of its own, listening on TCP with that
credential) and stays as the agent's parent and child subreaper,
reaping the agent and whatever its cells leave behind, so no zombie stays when it ends; it
prints the pids and the port, and envctl closes the exec stream and dials the pod's IP as it
dials its own pods. Cells run in the container's namespaces, with its variables, user and
working directory (what an exec'd process gets).

Removing it (``remove``): a second exec sends the agent SIGTERM (it kills its kernels), then
SIGKILL to anything left under the bootstrap, waits for the bootstrap to end, and removes the
directory; it answers what is still there. The pod is never deleted or restarted.

Without ``python3`` in the container the agent has nothing to run on in the pod: attach is
refused there, naming why (the local engine's runs its agent beside the container instead).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from runner.backends.base import AGENT_PORT, OtherContainer
from runner.backends.kube_api import KubeApi

AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
SHM = "/dev/shm"
MARKER = ".envctl-agent-"  # the agent's directory: /dev/shm/.envctl-agent-<runtime id>
PLACE_TIMEOUT = 20.0
REMOVE_TIMEOUT = 20.0

# Runs in the container (its python3, standard library only). argv[1]: the directory.
BOOTSTRAP = r"""
import ctypes, json, os, shutil, signal, socket, sys
d = sys.argv[1]
def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
data = json.loads(sys.stdin.buffer.readline())
shm = os.path.dirname(d)
fs = [l.split() for l in open("/proc/mounts").read().splitlines()]
if not any(len(f) > 2 and f[1] == shm and f[2] == "tmpfs" for f in fs):
    say(error=shm + " is no tmpfs in this container: the agent's credential would be on a disk"); sys.exit(1)
try:
    os.mkdir(d, 0o700)
except OSError as exc:
    say(error="cannot make " + d + ": " + str(exc)); sys.exit(1)
for name, text in data["files"].items():
    with open(os.path.join(d, os.path.basename(name)), "w") as f:
        f.write(text)
os.mkdir(os.path.join(d, "scratch"), 0o700)
cred = os.path.join(d, "agent.key")
os.mkfifo(cred, 0o600)  # a pipe: its bytes only in kernel memory; the agent reads it and removes it
keep = os.open(cred, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
line = data["credential"].encode()
if os.write(keep, line) != len(line):
    say(error="the credential did not fit the pipe"); sys.exit(1)
port = int(data["port"])
with socket.socket() as s:
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        s.bind(("0.0.0.0", 0)); port = s.getsockname()[1]
env = {k: v for k, v in os.environ.items() if not k.startswith("ENVCTL_")}
env["ENVCTL_SECRETS_DIR"] = os.path.join(d, "secrets")
if not shutil.which("bash"):
    env["ENVCTL_BASH_KERNEL"] = json.dumps(["sh"])
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: what the cells leave, reaped here
except Exception:
    pass
signal.signal(signal.SIGHUP, signal.SIG_IGN); signal.signal(signal.SIGPIPE, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setsid()
    out = os.open(os.path.join(d, "agent.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0); os.dup2(out, 1); os.dup2(out, 2)
    signal.signal(signal.SIGHUP, signal.SIG_DFL); signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = [sys.executable, "-u", "-I", "-B", os.path.join(d, "main.py"), "--listen", "tcp:%d" % port,
            "--credential", cred, "--socket", os.path.join(d, "agent.sock"), "--index", "no"]
    os.execve(sys.executable, argv, env)
say(reaper=os.getpid(), agent=pid, port=port, python=sys.version.split()[0])
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0); os.dup2(null, 1); os.dup2(null, 2)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
"""

# Runs in the container. argv: the directory, the bootstrap's pid, the agent's pid.
STOPPER = r"""
import json, os, shutil, signal, sys, time
d, reaper, agent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
me = os.getpid()
def cmd(pid):
    try:
        return open("/proc/%d/cmdline" % pid, "rb").read()
    except OSError:
        return b""
def alive(pid):
    try:
        st = open("/proc/%d/stat" % pid).read()
    except OSError:
        return False
    return st[st.rindex(")") + 2] != "Z"
def ours():
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit() and int(e) != me and d.encode() in cmd(int(e)):
            out.append(int(e))
    return out
def under(root):
    kids = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            st = open("/proc/%s/stat" % e).read()
        except OSError:
            continue
        kids.setdefault(int(st[st.rindex(")") + 2:].split()[1]), []).append(int(e))
    out, todo = [], list(kids.get(root, []))
    while todo:
        p = todo.pop(); out.append(p); todo.extend(kids.get(p, []))
    return out
def wait(pred, t):
    end = time.monotonic() + t
    while time.monotonic() < end and not pred():
        time.sleep(0.05)
mine = set(ours())
if agent in mine:
    os.kill(agent, signal.SIGTERM)
    wait(lambda: not alive(agent), 3)
for root in [p for p in (reaper, agent) if p in mine]:
    for p in under(root):
        if p != me:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
if reaper in mine:
    wait(lambda: not alive(reaper), 5)
    if alive(reaper):
        os.kill(reaper, signal.SIGKILL)
for p in ours():
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
wait(lambda: not [p for p in ours() if alive(p)], 2)
if os.path.basename(d).startswith(".envctl-agent-"):
    shutil.rmtree(d, ignore_errors=True)
print(json.dumps({"left": [p for p in ours() if alive(p)], "dir_left": os.path.lexists(d)}))
"""


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
        out = api.exec(c.name, c.member, ["python3", "-c", "print('envctl-python-ok')"], timeout=15)
    except BackendError:
        return False
    return "envctl-python-ok" in out


def directory(runtime_id: str) -> str:
    return f"{SHM}/{MARKER}{runtime_id}"


def place(api: KubeApi, c: OtherContainer, runtime_id: str, credential: bytes) -> dict[str, Any]:
    """The agent in the container (see the module's doc); what detaching needs and where it listens."""
    if not c.address:
        raise ConflictError(f"pod {c.name} has no IP address yet; wait until it runs", details={"pod": c.name})
    where = directory(runtime_id)
    files = {p.name: p.read_text() for p in sorted(AGENT_DIR.glob("*.py"))}
    line = json.dumps({"files": files, "credential": credential.decode(), "port": AGENT_PORT}) + "\n"
    leftover = {"pod": c.name, "container": c.member, "dir": where}  # found by its directory's name
    for attempt in (1, 2):
        answer = ""
        try:
            answer = api.exec_first_line(
                c.name, c.member, ["python3", "-I", "-c", BOOTSTRAP, where], line.encode(), timeout=PLACE_TIMEOUT
            )
            said = _answer(c.name, answer)
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


def _answer(pod: str, answer: str) -> dict[str, Any]:
    """The bootstrap's line: the pids and port, or its error."""
    try:
        said = dict(json.loads(answer))
    except ValueError as exc:
        raise BackendError(f"placing the agent in pod {pod} failed: {answer[:300]!r}") from exc
    if "error" in said:
        raise BackendError(f"placing the agent in pod {pod} failed: {said['error']}", details={"pod": pod})
    return said


def remove(api: KubeApi, state: dict[str, Any]) -> dict[str, Any]:
    """The agent ended and its directory removed (see the module's doc); what is still there."""
    where = str(state.get("dir") or "")
    if MARKER not in where or not state.get("pod"):
        return {}
    command = [
        "python3",
        "-I",
        "-c",
        STOPPER,
        where,
        str(int(state.get("reaper_pid") or 0)),
        str(int(state.get("in_container_pid") or 0)),
    ]
    out = api.exec(str(state["pod"]), str(state.get("container") or ""), command, timeout=REMOVE_TIMEOUT)
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError) as exc:
        raise BackendError(f"removing the agent from pod {state['pod']}: {out[:300]!r}") from exc


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
