"""A save's layer made inside the runtime: what changed, walked and streamed as a tar (stdlib only).

A runtime on another machine has no host whose storage driver envctl could read, so the agent
finds what changed itself and streams it to envctl as one OCI layer (``runner/saves/insave.py`` takes
it from there: scan, hash, upload). What changed is judged against what the version held:

- **The index.** Right after the agent starts, a background thread walks the filesystem once and
  keeps, per directory, its inode and the names in it (``Index``): what the version holds, as
  far as deletions need it. Files need no entry: a changed file has a newer ctime, which no
  program can set back. Measured on the python3 base image (about 12,000 paths): see the
  README (issue 15, "Saves inside the runtime"); the walk runs once per boot, off the cells'
  path, and a save's own walk makes the next index (what the saved version holds), kept only
  when envctl says the version was recorded (``action: keep``).
- **Changed** (``since_ns``: the boot, or the walk of the last kept save, minus a margin for the
  kernel's coarse timestamps): an entry whose ctime is newer, or whose name its directory did
  not hold, goes in, with the directories above it. A directory whose inode is not the one the
  index has was replaced: it goes in whole, marked opaque (``.wh..wh..opq``).
- **Deleted**: a name the index's directory held that is gone now is a whiteout ``.wh.NAME``.

Left out: ``/proc``, ``/sys``, ``/dev``, ``/run`` (the agent's state, the secrets tmpfs),
``/results``, the agent's own code, every mount point (``/proc/self/mountinfo``: mounts, the
engine's ``/etc/hosts`` and ``docker-init``), what the request's ``exclude`` names, and files in
the request's ``caches`` (counted per cache directory, never sent).

Wire (after the agent's ordinary JSON request line ``{"op": "layer", "id": N, ...}``): one JSON
line ``{"id": N, "ok": true, "event": "layer"}``, then frames: a 4-byte big-endian length and
that many bytes of the tar, a frame of length 0 ending them; then one JSON line
``{"id": N, "ok": true|false, "event": "done", "entries": ..., "left_out": {...}, ...}``. No
base64: the tar's bytes travel as they are, over whichever channel carries the agent's lines.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tarfile
import threading
import time

# Annotations only: typing is not imported at run time (4 ms of the agent's start, four times
# that in a pod limited to 0.25 CPU; python3-minimal images may lack it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FRAME = struct.Struct(">I")
CHUNK = 1 << 20
BLOCK = 512
MARGIN_NS = 20_000_000  # the kernel stamps ctimes with a coarse clock (a jiffy behind at most)
SKIPPED = ("/proc", "/sys", "/dev", "/run", "/results", "/opt/envctl", "/.dockerenv")
XATTR_PREFIXES = ("user.", "security.capability")
WH = ".wh."
OPAQUE = ".wh..wh..opq"


class Index:
    """What the version holds, per directory: its inode and its names."""

    def __init__(self, since_ns: int, dirs: dict[str, tuple[int, frozenset[str]]]) -> None:
        self.since_ns = since_ns
        self.dirs = dirs


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.index: Index | None = None
        self.error = ""
        self.pending: dict[str, Index] = {}  # a save's next index, until envctl keeps it
        self.index_seconds = 0.0


STATE = _State()


def mount_points() -> set[str]:
    """Every mount point but the root, from the kernel's own list."""
    found: set[str] = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if len(fields) > 4:
                    point = _unescape(fields[4].decode("utf-8", "surrogateescape"))
                    if point != "/":
                        found.add(point)
    except OSError:
        pass
    return found


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit() and len(text[i + 1 : i + 4]) == 3:
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class Skip:
    """The paths no layer holds."""

    def __init__(self, extra: list[str] | None = None) -> None:
        self.roots = (
            set(SKIPPED) | mount_points() | {str(p).rstrip("/") for p in (extra or []) if str(p).startswith("/")}
        )

    def __call__(self, path: str) -> bool:
        if path in self.roots:
            return True
        at = path.rfind("/")
        while at > 0:
            if path[:at] in self.roots:
                return True
            at = path.rfind("/", 0, at)
        return False


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


def build_index(skip: Skip, since_ns: int) -> Index:
    """The walk is never below a skipped path, so a child is skipped exactly when it is one of
    ``skip.roots`` itself (one set lookup, not one per ancestor: the walk is on a boot's way,
    in a pod with a fraction of a CPU)."""
    roots = skip.roots
    dirs: dict[str, tuple[int, frozenset[str]]] = {}
    stack = ["/"]
    while stack:
        path = stack.pop()
        prefix = "/" if path == "/" else path + "/"
        try:
            st = os.lstat(path)
            with os.scandir(path) as entries:
                names = []
                for entry in entries:
                    name = entry.name
                    child = prefix + name
                    if child in roots:
                        continue
                    names.append(name)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(child)
        except OSError:
            continue
        dirs[path] = (st.st_ino, frozenset(names))
    return Index(since_ns, dirs)


def start_index() -> None:
    """At the agent's start: index what the version holds, in the background."""
    since = time.time_ns() - MARGIN_NS

    def run() -> None:
        started = time.monotonic()
        try:
            index = build_index(Skip(), since)
        except Exception as exc:  # a save then says why it cannot judge deletions
            STATE.error = f"{type(exc).__name__}: {exc}"
            STATE.ready.set()
            return
        with STATE.lock:
            if STATE.index is None:
                STATE.index = index
            STATE.index_seconds = time.monotonic() - started
        STATE.ready.set()

    threading.Thread(target=run, name="envctl-index", daemon=True).start()


# ----------------------------------------------------------------------------- the stream
class FrameWriter:
    """Bytes into frames on the connection, buffered up to CHUNK."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.buf = bytearray()
        self.sent = 0

    def write(self, data: bytes) -> None:
        if len(data) >= CHUNK:
            self.flush()
            self.conn.sendall(FRAME.pack(len(data)))
            self.conn.sendall(data)
            self.sent += len(data)
            return
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.conn.sendall(FRAME.pack(len(self.buf)) + bytes(self.buf))
            self.sent += len(self.buf)
            self.buf = bytearray()

    def end(self) -> None:
        self.flush()
        self.conn.sendall(FRAME.pack(0))


def _cache_of(patterns: list[list[str]], path: str) -> str | None:
    parts = [p for p in path.split("/") if p]
    for pattern in patterns:
        if len(parts) > len(pattern) and all(w == "*" or w == p for w, p in zip(pattern, parts, strict=False)):
            return "/" + "/".join(parts[: len(pattern)])
    return None


class Walk:
    """One save's walk: the layer's entries written as they are found, the next index kept."""

    def __init__(self, out: FrameWriter, index: Index, skip: Skip, caches: list[list[str]], forced: set[str]) -> None:
        self.out = out
        self.index = index
        self.skip = skip
        self.caches = caches
        self.forced = forced
        self.next: dict[str, tuple[int, frozenset[str]]] = {}
        self.pending: list[tuple[str, os.stat_result, bool]] = []  # directories not written yet
        self.links: dict[tuple[int, int], str] = {}
        self.left_out: dict[str, dict[str, int]] = {}
        self.entries = 0
        self.whiteouts = 0
        self.content = 0
        self.whited: set[str] = set()

    # --- entries
    def _flush_parents(self) -> None:
        for path, st, opaque in self.pending:
            self._write(path, st, opaque)
        self.pending = []

    def _header(self, info: tarfile.TarInfo) -> None:
        self.out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.entries += 1

    def _info(self, path: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        return info

    def _xattrs(self, info: tarfile.TarInfo, path: str) -> None:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return
        pax = {}
        for name in names:
            if not name.startswith(XATTR_PREFIXES):
                continue
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        if pax:
            info.pax_headers = pax

    def whiteout(self, parent: str, name: str) -> None:
        path = _join(parent, name)
        if path in self.whited:
            return  # a forced deletion the walk found gone already
        self.whited.add(path)
        self._flush_parents()
        info = tarfile.TarInfo(_join(parent, WH + name).lstrip("/"))
        info.mode = 0o600
        info.mtime = int(time.time())
        self._header(info)
        self.whiteouts += 1

    def _write(self, path: str, st: os.stat_result, opaque: bool = False) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            info = self._info(path + "/", st, tarfile.DIRTYPE)
            self._xattrs(info, path)
            self._header(info)
            if opaque:
                mark = tarfile.TarInfo(_join(path, OPAQUE).lstrip("/"))
                mark.mode = 0o600
                mark.mtime = int(st.st_mtime)
                self._header(mark)
            return
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key) if st.st_nlink > 1 else None
            if first:
                info = self._info(path, st, tarfile.LNKTYPE)
                info.linkname = first
                self._header(info)
                return
            if st.st_nlink > 1:
                self.links[key] = path.lstrip("/")
            self._file(path, st)
            return
        if stat.S_ISLNK(mode):
            info = self._info(path, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info = self._info(path, st, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info = self._info(path, st, tarfile.FIFOTYPE)
        else:
            return  # a socket: never in a layer
        self._header(info)

    def _file(self, path: str, st: os.stat_result) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115
        except OSError:
            return  # gone meanwhile
        with f:
            info = self._info(path, st, tarfile.REGTYPE)
            info.size = st.st_size
            self._xattrs(info, path)
            self._header(info)
            left = st.st_size
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    chunk = b"\0" * min(CHUNK, left)  # it shrank while read: the header said more
                left -= len(chunk)
                self.out.write(chunk)
            self.content += st.st_size
            if st.st_size % BLOCK:
                self.out.write(b"\0" * (BLOCK - st.st_size % BLOCK))

    # --- the walk
    def run(self) -> None:
        self.directory("/", os.lstat("/"), self.index.dirs.get("/"), whole=False)

    def directory(
        self, path: str, st: os.stat_result, old: tuple[int, frozenset[str]] | None, whole: bool, opaque: bool = False
    ) -> None:
        """``old``: the index's entry of the same directory (None: not the version's); ``whole``:
        everything under it goes in; ``opaque``: it hides what the version held there."""
        try:
            raw = sorted(os.listdir(path))
        except OSError:
            return
        names = [n for n in raw if not self.skip(_join(path, n))]
        self.next[path] = (st.st_ino, frozenset(names))
        held = old[1] if old is not None else frozenset()
        pushed = False
        if path != "/":
            if whole or st.st_ctime_ns > self.index.since_ns or path in self.forced:
                self._flush_parents()
                self._write(path, st, opaque)
            else:
                self.pending.append((path, st, False))
                pushed = True
        if old is not None and not whole:
            for name in sorted(held.difference(raw)):
                self.whiteout(path, name)
        for name in names:
            child = _join(path, name)
            try:
                cst = os.lstat(child)
            except OSError:
                continue
            if stat.S_ISDIR(cst.st_mode):
                if whole:
                    self.directory(child, cst, None, True)
                    continue
                was = self.index.dirs.get(child)
                if was is None:  # new, or a file of the version became a directory
                    self.directory(child, cst, None, True, opaque=name in held)
                elif was[0] != cst.st_ino:  # replaced
                    self.directory(child, cst, None, True, opaque=True)
                else:
                    self.directory(child, cst, was, False)
                continue
            if not (whole or cst.st_ctime_ns > self.index.since_ns or name not in held or child in self.forced):
                continue
            cache = _cache_of(self.caches, child)
            if cache is not None:
                counted = self.left_out.setdefault(cache, {"bytes": 0, "files": 0})
                counted["files"] += 1
                if stat.S_ISREG(cst.st_mode):
                    counted["bytes"] += cst.st_size
                continue
            self._flush_parents()
            self._write(child, cst)
        if pushed and self.pending and self.pending[-1][0] == path:
            self.pending.pop()

    def forced_deletions(self) -> None:
        """Paths the draft this runtime booted from deleted (envctl names them): whiteouts."""
        for path in sorted(self.forced):
            if path != "/" and not os.path.lexists(path) and not self.skip(path):
                parent, _, name = path.rpartition("/")
                if os.path.isdir(parent or "/"):  # a parent gone is a whiteout of its own
                    self.whiteout(parent or "/", name)


def serve(conn: Any, rid: Any, request: dict[str, Any]) -> None:
    """The ``layer`` request: ``action`` ``make`` (the default) streams the layer; ``keep``
    makes that save's walk the new index (the version it made was recorded); ``ready`` answers
    once the boot's index is made (the boot waits for it before ``running`` on the in-runtime
    path, so a deletion made right after it is never missed)."""
    action = str(request.get("action") or "make")
    token = str(request.get("save") or "")
    if action == "keep":
        with STATE.lock:
            index = STATE.pending.pop(token, None)
            if index is not None:
                STATE.index = index
        conn.sendall(
            _line(
                {
                    "id": rid,
                    "ok": index is not None,
                    "op": "layer",
                    "kept": index is not None,
                    **({} if index is not None else {"error": "no such save's walk"}),
                }
            )
        )
        return
    if action == "ready":  # the boot waits for the index: a deletion made after ``running`` is seen
        ready = STATE.ready.wait(float(request.get("wait") or 60))
        conn.sendall(
            _line(
                {
                    "id": rid,
                    "ok": True,
                    "op": "layer",
                    "ready": ready,
                    "index_seconds": round(STATE.index_seconds, 4),
                    **({"error": STATE.error} if STATE.error else {}),
                }
            )
        )
        return
    if action != "make":
        conn.sendall(_line({"id": rid, "ok": False, "error": f"unknown layer action {action!r}"}))
        return
    if not STATE.ready.wait(float(request.get("index_wait") or 300)):
        conn.sendall(_line({"id": rid, "ok": False, "error": "the boot's index of the version is not ready yet"}))
        return
    with STATE.lock:
        index = STATE.index
    if index is None:
        conn.sendall(_line({"id": rid, "ok": False, "error": f"no index of the version: {STATE.error}"}))
        return
    caches = [[str(p) for p in pattern] for pattern in request.get("caches") or []]
    forced = {str(p) for p in request.get("forced") or [] if str(p).startswith("/")}
    skip = Skip([str(p) for p in request.get("exclude") or []])
    conn.sendall(_line({"id": rid, "ok": True, "event": "layer", "since_ns": index.since_ns}))
    out = FrameWriter(conn)
    started = time.monotonic()
    walk_ns = time.time_ns() - MARGIN_NS
    walk = Walk(out, index, skip, caches, forced)
    error = ""
    try:
        walk.run()
        walk.forced_deletions()
        out.write(b"\0" * (2 * BLOCK))
    except OSError as exc:
        if isinstance(exc, (BrokenPipeError, ConnectionError)):
            raise
        error = f"{type(exc).__name__}: {exc}"
    out.end()
    if not error and token:
        with STATE.lock:
            STATE.pending = {token: Index(walk_ns, walk.next)}
    conn.sendall(
        _line(
            {
                "id": rid,
                "ok": not error,
                "event": "done",
                **({"error": error} if error else {}),
                "entries": walk.entries,
                "whiteouts": walk.whiteouts,
                "content_bytes": walk.content,
                "tar_bytes": out.sent,
                "left_out": walk.left_out,
                "walk_seconds": round(time.monotonic() - started, 4),
                "index_seconds": round(STATE.index_seconds, 4),
                "index_dirs": len(index.dirs),
            }
        )
    )


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()
