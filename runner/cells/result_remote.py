"""``/results`` of a runtime whose container has no directory on this host (a backend without
``host_paths``: Swarm): after each cell, the files that differ from this host's copy are fetched
over the agent channel (the agent's ``results``, ``runner/agent/files.py``) into the runtime's
results directory here, which ``results.py`` then scans, stores and records as it does a bound
one. One kept connection per runtime: a cell that wrote nothing costs one small request and
answer on it, no new TLS handshake.

What the agent sends is written by the runtime's cells, so every name is checked (relative, no
``..``, no empty or ``.`` part, no NUL) and written only by this module into a directory it
alone makes: never through a link, a file at most as large as the agent said.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.channel import AgentChannel, AgentTarget, AgentUnavailableError
from runner.errors import ResultFetchError

CHUNK = 1 << 20
READ_TIMEOUT = 15.0  # seconds the agent may be silent mid-answer (a node gone without a word)
CONNECT_TIMEOUT = 5.0
KEEP = 256  # kept connections, one per runtime that ran a cell lately
MAX_NAME = 4096


def _checked(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name or name.startswith("/"):
        raise ResultFetchError(f"the agent named a result {str(name)[:200]!r}: not a relative path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ResultFetchError(f"the agent named a result {name[:200]!r}: an empty, '.' or '..' part")
    return name


def have(root: Path) -> dict[str, list[int]]:
    """This host's copy: relative path -> [size, mtime_ns] of each regular file."""
    found: dict[str, list[int]] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found[os.path.relpath(path, root)] = [st.st_size, st.st_mtime_ns]
    return found


def _place(root: Path, rel: str) -> Path:
    """The path of ``rel`` under ``root``, its directories made; nothing on the way is a link
    or a file (a file in the way, from an earlier sync, goes)."""
    path = root
    for part in rel.split("/")[:-1]:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        path.mkdir(exist_ok=True)
    last = path / rel.split("/")[-1]
    if last.is_dir() and not last.is_symlink():
        shutil.rmtree(last)
    return last


def fetch(channel: AgentChannel, root: Path, source: str | None = None) -> int:
    """One sync of the runtime's ``/results`` (or ``source``) into ``root``; the files written."""
    root.mkdir(parents=True, exist_ok=True)
    request: dict[str, Any] = {"have": have(root), **({"root": source} if source else {})}
    header, reader = channel.open_stream_within(READ_TIMEOUT, "results", request)
    written = 0
    failure: ResultFetchError | None = None
    for entry in header.get("send") or []:
        rel, size, mtime_ns = entry[0], int(entry[1]), int(entry[2])
        try:
            target = _place(root, _checked(rel)) if failure is None else None
        except (ResultFetchError, OSError) as exc:
            failure = exc if isinstance(exc, ResultFetchError) else ResultFetchError(f"results: {exc}")
            target = None
        tmp = root / f".envctl-partial-{os.getpid()}-{threading.get_ident()}"
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(tmp, "wb")) if target is not None else None  # noqa: SIM115
            left = size
            while left > 0:  # the promised bytes are read off the connection either way
                try:
                    piece = reader.read(min(CHUNK, left))
                except OSError as exc:
                    raise AgentUnavailableError(f"the agent's results stream broke off: {exc}") from exc
                if not piece:
                    raise AgentUnavailableError("the agent's results stream broke off")
                left -= len(piece)
                if out is not None:
                    out.write(piece)
        if target is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, target)
            written += 1
        else:
            tmp.unlink(missing_ok=True)
    for rel in header.get("gone") or []:
        with contextlib.suppress(ResultFetchError, OSError):
            (root / _checked(rel)).unlink()
    if failure is not None:
        raise failure
    return written


class RemoteResults:
    """Kept agent connections, one per runtime, for the after-cell fetch."""

    def __init__(self, agent: Callable[[str], AgentTarget], source: str | None = None) -> None:
        self.agent = agent
        self.source = source  # the directory in the runtime (None: /results)
        self._channels: dict[str, tuple[AgentTarget, AgentChannel]] = {}  # id -> (its agent then, channel)
        self._lock = threading.Lock()
        self.connections_made = 0  # new agent connections so far (each a TLS handshake on tcp)

    def sync(self, runtime_id: str, root: Path) -> int:
        """Fetch what changed. A kept connection to an agent of an earlier boot is closed
        unused (its packets may go nowhere: a fenced node's bridge drops them silently, so it
        would only time out); one that broke is replaced once by a new one; a new one that
        fails is not retried (a node gone costs the cell's end at most CONNECT_TIMEOUT or
        READ_TIMEOUT, never both twice)."""
        target = self.agent(runtime_id)
        with self._lock:
            found = self._channels.pop(runtime_id, None)
        channel: AgentChannel | None = None
        if found is not None:
            if found[0] == target:
                channel = found[1]
            else:  # booted again since (another address, another boot): the old agent is gone
                found[1].close()
        while True:
            kept = channel is not None
            try:
                if channel is None:
                    self.connections_made += 1
                    channel = AgentChannel(target, timeout=CONNECT_TIMEOUT)
                written = fetch(channel, root, self.source)
            except BaseException as exc:
                if channel is not None:
                    channel.close()
                channel = None
                if kept and isinstance(exc, AgentUnavailableError):
                    continue
                raise
            self._keep(runtime_id, target, channel)
            return written

    def _keep(self, runtime_id: str, target: AgentTarget, channel: AgentChannel) -> None:
        """Keep the connection for the runtime's next cell; at most KEEP connections (the ones
        of runtimes quiet longest are closed)."""
        closing = []
        with self._lock:
            old = self._channels.pop(runtime_id, None)
            if old is not None:
                closing.append(old[1])
            self._channels[runtime_id] = (target, channel)  # last in the dict: most recently used
            while len(self._channels) > KEEP:
                closing.append(self._channels.pop(next(iter(self._channels)))[1])
        for c in closing:
            c.close()

    def forget(self, runtime_id: str) -> None:
        with self._lock:
            found = self._channels.pop(runtime_id, None)
        if found is not None:
            found[1].close()
