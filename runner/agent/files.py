"""Files into and out of the runtime over the agent channel (stdlib only), for a runtime whose
container envctl cannot bind its host's directories into (the Swarm backend):

- ``unpack``: a git or S3 mount envctl prepared (validated, fetched and cached) on its own host,
  sent at boot as a tar in frames, unpacked at the mount's target (an empty volume the engine
  made there, so it is a mount point: never in a save or a draft);
- ``results``: the files under ``/results`` that differ from what envctl holds of them, sent
  after a cell, so that envctl records and keeps them as it does a host directory's.

Wire of ``unpack`` (after ``{"op": "unpack", "id": N, "target": "/mnt/code", "read_only": true}``):
the agent answers ``{"id": N, "ok": true, "event": "unpack"}``; envctl sends frames (a 4-byte
big-endian length and that many bytes of the tar, a frame of length 0 ending them); the agent
answers ``{"id": N, "ok": true|false, "event": "done", "files": ..., "bytes": ...}``.

Wire of ``results`` (``{"op": "results", "id": N, "have": {"a/b.png": [size, mtime_ns], ...}}``):
one JSON line ``{"id": N, "ok": true, "event": "results", "send": [[path, size, mtime_ns], ...],
"gone": [path, ...], "files": count}``, then for each of ``send`` in order exactly ``size`` bytes
(a file that shrank meanwhile is padded with zeros: its next mtime sends it again).
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tarfile

TYPE_CHECKING = False  # annotations only: typing is not imported at run time
if TYPE_CHECKING:
    from typing import Any

FRAME = struct.Struct(">I")
MAX_FRAME = 64 << 20
CHUNK = 1 << 20
RESULTS = "/results"
MAX_RESULT_FILES = 10000
MAX_DEPTH = 64


class _Frames:
    """The tar's bytes out of envctl's frames, as a file object ``tarfile`` reads in stream mode."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.left = 0
        self.ended = False
        self.total = 0

    def _exact(self, n: int) -> bytes:
        data = self.reader.read(n)
        if data is None or len(data) != n:
            raise OSError("the stream broke off")
        return data

    def read(self, n: int = -1) -> bytes:
        out = b""
        want = CHUNK if n is None or n < 0 else n
        while len(out) < want and not self.ended:
            if self.left == 0:
                (size,) = FRAME.unpack(self._exact(4))
                if size == 0:
                    self.ended = True
                    break
                if size > MAX_FRAME:
                    raise OSError(f"a frame of {size} bytes")
                self.left = size
            piece = self._exact(min(self.left, want - len(out)))
            self.left -= len(piece)
            self.total += len(piece)
            out += piece
        return out

    def drain(self) -> None:
        while not self.ended:
            self.read(CHUNK)


def _inside(target: str, name: str) -> str:
    """The path of a tar entry under ``target``; ValueError for one that would leave it."""
    if not name or name.startswith("/") or "\x00" in name:
        raise ValueError(f"the tar names {name[:200]!r}: not a relative path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"the tar names {name[:200]!r}: '..' in it")
    path = target
    for part in parts[:-1]:  # no directory on the way may be a link (never write through one)
        path = os.path.join(path, part)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise ValueError(f"the tar's entry {name[:200]!r} goes through {path!r}, not a directory")
        except FileNotFoundError:
            os.mkdir(path, 0o755)
    return os.path.join(path, parts[-1]) if parts else target


def unpack(conn: Any, reader: Any, rid: Any, request: dict[str, Any]) -> None:
    target = str(request.get("target") or "")
    read_only = bool(request.get("read_only", True))
    if not target.startswith("/") or ".." in target.split("/"):
        conn.sendall(_line({"id": rid, "ok": False, "error": f"not an absolute target: {target[:200]!r}"}))
        return
    conn.sendall(_line({"id": rid, "ok": True, "event": "unpack"}))
    frames = _Frames(reader)
    files = dirs = 0
    error = ""
    made: list[tuple[str, int]] = []
    try:
        os.makedirs(target, mode=0o755, exist_ok=True)
        with tarfile.open(fileobj=frames, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                path = _inside(target, member.name)
                if member.isdir():
                    if path != target and not os.path.isdir(path):
                        os.mkdir(path, 0o755)
                    made.append((path, 0o555 if read_only else 0o755))
                    dirs += 1
                elif member.isreg():
                    source = tar.extractfile(member)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        while source is not None:
                            piece = source.read(CHUNK)
                            if not piece:
                                break
                            out.write(piece)
                    mode = 0o555 if member.mode & 0o111 else 0o444
                    os.chmod(path, mode if read_only else mode | 0o200)
                    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
                    files += 1
                elif member.issym():
                    os.symlink(member.linkname, path)
                else:
                    raise ValueError(f"the tar's entry {member.name[:200]!r} is neither a file, a directory nor a link")
        for path, mode in reversed(made):
            os.chmod(path, mode)  # noqa: S103  (directories of a mount: readable by every user)
        if read_only:
            os.chmod(target, 0o555)  # noqa: S103  (read-only for all: a read-only mount's tree)
    except (OSError, ValueError, tarfile.TarError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    try:
        frames.drain()
    except OSError as exc:
        error = error or f"OSError: {exc}"
    reply = {"id": rid, "ok": not error, "event": "done", "files": files, "dirs": dirs, "bytes": frames.total}
    if error:
        reply["error"] = error[:1000]
    conn.sendall(_line(reply))


def _walk(root: str) -> dict[str, tuple[int, int]]:
    """Regular files under ``root`` (never through a link): relative path -> (size, mtime_ns)."""
    found: dict[str, tuple[int, int]] = {}
    stack = [("", 0)]
    while stack and len(found) < MAX_RESULT_FILES:
        rel, depth = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as entries:
                for entry in entries:
                    name = f"{rel}/{entry.name}" if rel else entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                        stack.append((name, depth + 1))
                    elif stat.S_ISREG(st.st_mode) and len(found) < MAX_RESULT_FILES:
                        found[name] = (st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return found


def results(conn: Any, rid: Any, request: dict[str, Any]) -> None:
    have = request.get("have") or {}
    present = _walk(str(request.get("root") or RESULTS))
    send: list[tuple[str, int, int]] = [
        (p, n, mtime) for p, (n, mtime) in sorted(present.items()) if list(have.get(p) or []) != [n, mtime]
    ]
    gone = sorted(p for p in have if p not in present)
    conn.sendall(_line({"id": rid, "ok": True, "event": "results", "send": send, "gone": gone, "files": len(present)}))
    root = str(request.get("root") or RESULTS)
    for rel, size, _mtime in send:
        left = size
        try:
            fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                while left > 0:
                    piece = f.read(min(CHUNK, left))
                    if not piece:
                        break
                    conn.sendall(piece)
                    left -= len(piece)
        except OSError:
            pass
        while left > 0:  # vanished or shrank: the promised size still arrives
            piece = b"\0" * min(CHUNK, left)
            conn.sendall(piece)
            left -= len(piece)


def serve(op: str, conn: Any, reader: Any, rid: Any, request: dict[str, Any]) -> None:
    if op == "unpack":
        unpack(conn, reader, rid, request)
    else:
        results(conn, rid, request)


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()
