"""The agent placed inside a container envctl did not start (runner/runtimes/attach.py), shared
by the backends that place it through their engine's exec (Kubernetes' ``pods/exec``,
``kube_attach``; Swarm's helper tasks doing the node's ``docker exec``, ``swarm_attach``).

``BOOTSTRAP`` runs in the container on its own ``python3`` (standard library only), argv[1] the
directory ``/dev/shm/.envctl-agent-<runtime id>``. It reads one line on its standard input (the
agent's files and the attach's fresh credential, ``bootstrap_line``: never in an argument, a
variable or a log) and writes them into that directory on the container's ``/dev/shm`` (a
tmpfs: no part of the container's filesystem, refused when it is not one), the credential into
a FIFO the agent reads and removes. It then forks the agent (a session of its own, listening on
TCP with that credential) and stays as the agent's parent and child subreaper, reaping the agent
and whatever its cells leave behind, so no zombie stays when it ends; it prints the pids and the
port (``answer``). Cells run in the container's namespaces, with its variables, user and working
directory (what an exec'd process gets).

``STOPPER`` (argv: the directory, the bootstrap's pid, the agent's pid; ``stopper_args``) sends
the agent SIGTERM (it kills its kernels), then SIGKILL to anything left under the bootstrap,
waits for the bootstrap to end, and removes the directory; it prints what is still there
(``stopped``). The container is never stopped, restarted or removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.kit.errors import BackendError

AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
SHM = "/dev/shm"
MARKER = ".envctl-agent-"  # the agent's directory: /dev/shm/.envctl-agent-<runtime id>

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
env["ENVCTL_PYTHON_KERNEL"] = json.dumps([sys.executable, "-u", "-B", os.path.join(d, "pykernel.py")])  # no .pyc left
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


# how both run in the container: -B, or the imports of a Python without compiled modules (a
# python3-minimal) would write __pycache__ files into the container's filesystem
PYTHON = ("python3", "-I", "-B", "-c")


def directory(runtime_id: str) -> str:
    return f"{SHM}/{MARKER}{runtime_id}"


def bootstrap_line(credential: bytes, port: int) -> bytes:
    """The bootstrap's standard input: the agent's files, the credential and the port to try."""
    files = {p.name: p.read_text() for p in sorted(AGENT_DIR.glob("*.py"))}
    return (json.dumps({"files": files, "credential": credential.decode(), "port": port}) + "\n").encode()


def answer(where: str, line: str) -> dict[str, Any]:
    """The bootstrap's line: the pids and port, or its error (``where``: the container, for messages)."""
    try:
        said = dict(json.loads(line))
    except ValueError as exc:
        raise BackendError(f"placing the agent in {where} failed: {line[:300]!r}") from exc
    if "error" in said:
        raise BackendError(f"placing the agent in {where} failed: {said['error']}", details={"container": where})
    return said


def stopper_args(state: dict[str, Any]) -> list[str] | None:
    """The stopper's argv after ``-c STOPPER`` for an attachment's ``state``; None when it names no
    agent directory of envctl's."""
    where = str(state.get("dir") or "")
    if MARKER not in where:
        return None
    return [where, str(int(state.get("reaper_pid") or 0)), str(int(state.get("in_container_pid") or 0))]


def stopped(where: str, out: str) -> dict[str, Any]:
    """The stopper's last line: ``left`` (pids still there) and ``dir_left``."""
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError) as exc:
        raise BackendError(f"removing the agent from {where}: {out[:300]!r}") from exc
