"""Git and S3 mounts of a runtime whose container cannot bind this host's directories (a backend
without ``host_paths``: Swarm): the trees ``prepare.py`` made ready here (validated before any
network call, fetched through the caches, recorded) are streamed into the runtime at boot, once
its agent answers and before it is ``running``, as a tar in frames over the agent channel (the
agent's ``unpack``, ``runner/agent/files.py``). The runtime's node never fetches anything and
never holds the mounts' credentials. The phase is ``downloading`` with the bytes sent. The
runtime's ``/results`` as this host's copy has it comes back the same way (``restore_results``).
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.backends.base import MountBind
from runner.channel import AgentChannel, AgentTarget
from runner.mounts.errors import MountFetchError

FRAME = struct.Struct(">I")
FRAME_BYTES = 1 << 20
REPORT_EVERY = 0.25
Report = Callable[[str, tuple[int, int] | None], None]


class _FrameWriter:
    """A file object ``tarfile`` writes to; sends its bytes as frames of at most a megabyte."""

    def __init__(self, channel: AgentChannel, sent: Callable[[int], None]) -> None:
        self.channel = channel
        self.sent = sent
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= FRAME_BYTES:
            self._flush(FRAME_BYTES)
        return len(data)

    def _flush(self, n: int) -> None:
        piece = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.channel.write(FRAME.pack(len(piece)) + piece)
        self.sent(len(piece))

    def end(self) -> None:
        if self.buffer:
            self._flush(len(self.buffer))
        self.channel.write(FRAME.pack(0))


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
    return total


def send_mounts(target: AgentTarget, binds: Sequence[MountBind], report: Report) -> int:
    """Stream every prepared tree (``kind`` bind) into the runtime at its target; the bytes sent.
    ``MountFetchError`` naming the target when the agent could not unpack one."""
    todo = [b for b in binds if b.kind == "bind"]
    if not todo:
        return 0
    total = sum(tree_bytes(Path(b.source)) for b in todo)
    done = [0]
    told = [time.monotonic()]

    def sent(n: int) -> None:  # the row's progress, at most every REPORT_EVERY seconds
        done[0] += n
        if time.monotonic() - told[0] >= REPORT_EVERY or done[0] >= total:
            told[0] = time.monotonic()
            report("downloading", (min(done[0], total), total))

    report("downloading", (0, total))
    with AgentChannel(target, timeout=30) as channel:
        for bind in todo:
            _header, reader = channel.open_stream("unpack", target=bind.target, read_only=bind.read_only)
            out = _FrameWriter(channel, sent)
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                tar.add(bind.source, arcname=".", recursive=True)  # links stay links, never followed
            out.end()
            line = reader.readline()
            trailer: dict[str, Any] = json.loads(line) if line else {}
            if not trailer.get("ok"):
                raise MountFetchError(
                    f"the mount at {bind.target} could not be unpacked in the runtime: "
                    f"{trailer.get('error') or 'the agent did not answer'}",
                    details={"target": bind.target},
                )
    return done[0]


def restore_results(target: AgentTarget, root: Path) -> int:
    """A runtime booted again gets back what its cells wrote under ``/results`` before (this
    host's copy, ``runner/cells/result_remote.py``), as a bound results directory keeps it."""
    if not root.is_dir() or not any(root.iterdir()):
        return 0
    return send_mounts(target, [MountBind("/results", str(root), read_only=False)], lambda *_: None)


def with_nodes(used: Sequence[Mapping[str, Any]], volume_nodes: Mapping[str, str]) -> list[dict[str, Any]]:
    """``mounts_used`` with the node each named volume is on (and the runtime pinned to)."""
    out = []
    for u in used:
        entry = dict(u)
        if entry.get("type") == "volume" and entry.get("target") in volume_nodes:
            entry["node"] = volume_nodes[str(entry["target"])]
        out.append(entry)
    return out
