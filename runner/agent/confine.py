"""Start a kernel inside an attached container with no more than the container's own process
has (runner/runtimes/attach.py): ``confine.py PID -- COMMAND...`` (stdlib only; run as root on the host).

In order: the cgroup.procs files of every cgroup of process PID (the container's init, read
from /proc/PID/cgroup and this host's cgroup mounts, v1 hierarchies and v2) are opened; the
process enters PID's namespaces and forks (a PID namespace takes effect for children); the
child joins those cgroups (their memory, CPU and pids limits apply to it), takes PID's root and
working directory, drops every capability outside PID's bounding set, becomes PID's user,
groups and group, takes PID's effective, permitted and inheritable capabilities (no ambient
ones), sets no_new_privs when PID has it, checks all of that in /proc/self/status and execs
COMMAND. The parent only waits for the child and exits as it did; it holds no channel of the
kernel's. Whatever fails, COMMAND does not run: exit code 126 and a line on stderr naming the
step. Not applied: the container's seccomp filter and its AppArmor/SELinux profile.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_VERSION_3 = 0x20080522
NAMESPACES = ("cgroup", "ipc", "uts", "net", "pid", "mnt")  # nsenter's order; the mount one last
FAILED = 126

_libc = ctypes.CDLL(None, use_errno=True)


class ConfineError(Exception):
    pass


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def status_of(pid: int | str) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _mounts() -> list[tuple[str, str, set[str]]]:
    """This host's cgroup mounts: (root inside the hierarchy, mount point, options)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            parts, rest = head.split(), tail.split()
            if len(parts) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
                opts = set(rest[2].split(",")) if rest[0] == "cgroup" else {"cgroup2"}
                found.append((parts[3], parts[4], opts))
    return found


def cgroup_files(pid: int) -> list[str]:
    """The cgroup.procs file of each of ``pid``'s cgroups, as this host sees them."""
    mounts, files = _mounts(), []
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f if line.strip()]
    for _, controllers, path in lines:
        want = set(controllers.split(",")) if controllers else {"cgroup2"}
        for root, point, opts in mounts:
            if want <= opts and (path == root or path.startswith(root.rstrip("/") + "/") or root == "/"):
                inner = path[len(root) :] if root != "/" else path
                files.append(os.path.join(point, inner.lstrip("/"), "cgroup.procs"))
                break
        else:
            if controllers or len(lines) == 1:  # a v2 line beside v1 ones may have no mount here
                raise ConfineError(f"the container's cgroup {controllers or 'v2'}:{path} is not mounted on this host")
    if not files:
        raise ConfineError("no cgroup of the container found")
    return files


def _check(ok: int, what: str) -> None:
    if ok != 0:
        raise ConfineError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(CAP_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "setting capabilities (capset)")


def _confine_self(want: dict[str, str], procs: list[int], root: int, cwd: int) -> None:
    """In the child, already in the container's namespaces."""
    for fd in procs:
        try:
            os.write(fd, b"0")
        except OSError as exc:
            raise ConfineError(f"joining the container's cgroup ({os.readlink(f'/proc/self/fd/{fd}')}): {exc}") from exc
        os.close(fd)
    try:
        os.fchdir(root)
        os.chroot(".")
        os.fchdir(cwd)
    except OSError as exc:
        raise ConfineError(f"entering the container's root and working directory: {exc}") from exc
    bounding = int(want["CapBnd"], 16)
    with open("/proc/sys/kernel/cap_last_cap", encoding="utf-8") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if not bounding >> cap & 1:
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
    uid, gid = int(want["Uid"].split()[0]), int(want["Gid"].split()[0])
    groups = [int(g) for g in want.get("Groups", "").split()]
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "keeping capabilities across the change of user")
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise ConfineError(f"becoming the container's user {uid}:{gid} (groups {groups}): {exc}") from exc
    _capset(int(want["CapEff"], 16), int(want["CapPrm"], 16), int(want["CapInh"], 16))
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing the ambient capabilities")
    _check(_libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "resetting keep-capabilities")
    if want.get("NoNewPrivs", "0") == "1":
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
    now = status_of("self")
    for key in ("CapBnd", "CapEff", "CapPrm", "CapInh", "Uid", "Gid"):
        if now.get(key) != want.get(key):
            raise ConfineError(f"after confining, {key} is {now.get(key)}, the container's is {want.get(key)}")
    if sorted(now.get("Groups", "").split()) != sorted(want.get("Groups", "").split()):
        raise ConfineError("after confining, the supplementary groups differ from the container's")
    if want.get("NoNewPrivs", "0") == "1" and now.get("NoNewPrivs") != "1":
        raise ConfineError("after confining, no_new_privs is not set")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write("usage: confine.py PID -- COMMAND...\n")
        return 2
    pid, command = int(argv[0]), argv[2:]
    try:
        want = status_of(pid)
        procs = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup_files(pid)]
        root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        cwd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for ns in NAMESPACES:
            path = f"/proc/{pid}/ns/{ns}"
            if not os.path.exists(path) or os.stat(path).st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            _check(_libc.setns(fd, 0), f"entering the container's {ns} namespace")
            os.close(fd)
    except (OSError, ValueError, KeyError, ConfineError) as exc:
        sys.stderr.write(f"envctl: could not confine the cell to the attached container: {exc}\n")
        return FAILED
    child = os.fork()
    if child == 0:
        try:
            _confine_self(want, procs, root, cwd)
            for default in (signal.SIGPIPE, signal.SIGXFSZ):  # as a shell would start it, not as Python left them
                signal.signal(default, signal.SIG_DFL)
            os.execvpe(command[0], command, os.environ)  # noqa: S606 (the kernel's own argv, no shell)
        except (OSError, ValueError, KeyError, ConfineError) as exc:
            os.write(2, f"envctl: could not confine the cell to the attached container: {exc}\n".encode())
        os._exit(FAILED)
    # the parent: no channel of the kernel's kept open; signals the agent sends to the kernel's
    # process group reach the child itself, those sent to this process alone are passed on
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 65536)
    for ignored in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(ignored, signal.SIG_IGN)
    for passed in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(passed, lambda s, _f: os.kill(child, s))
    while True:
        try:
            _, code = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
