"""The memory watch: a cell near its container's memory limit is paused while envctl takes a draft.

On a backend where a crash keeps nothing (Kubernetes, Swarm: no engine on envctl's host can
commit a node's container), the memory killer ending the agent loses every change since the last
draft. With ``--memory-watch FRACTION`` the agent reads its container's memory cgroup every
``INTERVAL`` seconds while a cell runs; once the working set (usage less the inactive file cache,
which the kernel reclaims before it kills anything: what the kubelet calls the working set) is
at least FRACTION of the limit, it

1. stops every process the cell may be using (``SIGSTOP`` to each kernel's process group and to
   every descendant of the agent): the memory holds still, and so do the files;
2. tells envctl, as a ``pressure`` event on the cell's stream (``main.py``); envctl takes a
   draft (reason ``memory-pressure``) and answers ``resume``;
3. continues them (``SIGCONT``) at that answer, or after ``--memory-pause`` seconds without one.

Once per cell: a cell that stays above the line is not paused again. A container with no memory
limit (or whose cgroup cannot be read) is not watched. Both cgroup versions, as the container
sees them: v2 ``memory.current``/``memory.max``/``memory.stat`` (``inactive_file``) at the
cgroup root, v1 ``memory.usage_in_bytes``/``memory.limit_in_bytes``/``memory.stat``
(``total_inactive_file``) under ``memory/``.

Python standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal

# Annotations only: typing is not imported at run time (see main.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

CGROUP_ROOT = "/sys/fs/cgroup"
INTERVAL = 0.1  # seconds between two reads while a cell runs
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


class Reading:
    """One reading of the memory cgroup: bytes in use (the working set), and the limit."""

    __slots__ = ("limit", "usage", "version")

    def __init__(self, usage: int, limit: int | None, version: int) -> None:
        self.usage = usage
        self.limit = limit
        self.version = version

    def as_dict(self) -> dict[str, int | None]:
        return {"usage": self.usage, "limit": self.limit, "cgroup": self.version}


def should_pause(usage: int, limit: int | None, fraction: float) -> bool:
    """Whether a cell using ``usage`` bytes of a ``limit`` must be paused for a draft (a pure
    decision): never without a limit or with the watch off (``fraction`` not in (0, 1))."""
    if limit is None or limit <= 0 or not 0 < fraction < 1:
        return False
    return usage >= fraction * limit


def _number(path: str) -> int | None:
    """The one number a cgroup file holds; None for ``max``, a missing file or anything else."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: str, key: str) -> int:
    """One counter of a ``memory.stat`` file (0 when absent)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def limit_of(root: str = CGROUP_ROOT) -> Reading | None:
    """Which cgroup version the container sees and its limit, without the usage's cost; None
    when neither version's files are there."""
    v2 = os.path.join(root, "memory.current")
    if os.path.exists(v2):
        return Reading(0, _limit(_number(os.path.join(root, "memory.max"))), 2)
    v1 = os.path.join(root, "memory", "memory.usage_in_bytes")
    if os.path.exists(v1):
        return Reading(0, _limit(_number(os.path.join(root, "memory", "memory.limit_in_bytes"))), 1)
    return None


def _limit(value: int | None) -> int | None:
    return value if value is not None and 0 < value < NO_LIMIT else None


def read(root: str = CGROUP_ROOT, version: int | None = None) -> Reading | None:
    """The container's memory cgroup now: the working set and the limit (None: unreadable)."""
    if version is None:
        found = limit_of(root)
        if found is None:
            return None
        version = found.version
    if version == 2:
        usage = _number(os.path.join(root, "memory.current"))
        limit = _limit(_number(os.path.join(root, "memory.max")))
        stat, key = os.path.join(root, "memory.stat"), "inactive_file"
    else:
        usage = _number(os.path.join(root, "memory", "memory.usage_in_bytes"))
        limit = _limit(_number(os.path.join(root, "memory", "memory.limit_in_bytes")))
        stat, key = os.path.join(root, "memory", "memory.stat"), "total_inactive_file"
    if usage is None:
        return None
    return Reading(max(0, usage - _stat(stat, key)), limit, version)


def usage_at_least(root: str, version: int, bound: float) -> bool:
    """A cheap first look: the raw usage (one small file) is at least ``bound``. The working set
    is never more than it, so below the line nothing else needs reading."""
    name = "memory.current" if version == 2 else os.path.join("memory", "memory.usage_in_bytes")
    usage = _number(os.path.join(root, name))
    return usage is not None and usage >= bound


def descendants(root_pid: int, proc: str = "/proc") -> list[int]:
    """Every process whose parent chain leads to ``root_pid`` (not itself)."""
    parents: dict[int, int] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat"), "rb") as f:
                data = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ")"
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents[int(name)] = int(fields[1])
    found: list[int] = []
    for pid in parents:
        seen = 0
        p = parents.get(pid)
        while p is not None and p != root_pid and seen < 64:
            p, seen = parents.get(p), seen + 1
        if p == root_pid and pid != root_pid:
            found.append(pid)
    return sorted(found)


def signal_all(groups: Iterable[int], pids: Iterable[int], signum: int) -> None:
    """``signum`` to each process group and each process (gone ones are skipped)."""
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def freeze(groups: list[int]) -> list[int]:
    """Stop the kernels' process groups and every descendant of the agent; the pids stopped.
    Looked for twice: a process forked between the first look and its parent's stop is caught
    by the second."""
    own = os.getpid()
    signal_all(groups, (), signal.SIGSTOP)
    stopped: list[int] = []
    for _ in range(2):
        more = [p for p in descendants(own) if p not in stopped]
        signal_all((), more, signal.SIGSTOP)
        stopped.extend(more)
    return stopped


def thaw(groups: list[int], pids: list[int]) -> None:
    signal_all(groups, pids, signal.SIGCONT)
