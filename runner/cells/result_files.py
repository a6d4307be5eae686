"""Results: the files a cell writes under ``/results``, kept after the runtime is gone.

On the host, a runtime's ``/results`` is a plain directory that the container can write to.
After each execution the runner calls :func:`scan` on it; every file that is new or changed
since the previous scan is put into a :class:`ResultStore`, addressed by its sha256, so the
same content is stored once and a result outlives the runtime that made it.

The results directory is written by untrusted code, so the scanner:

- never follows a symbolic link (they are skipped, wherever they point), walks directories
  through file descriptors opened with ``O_NOFOLLOW`` so a directory swapped for a link
  mid-scan is not entered, and skips everything that is not a regular file;
- never raises because a file vanished or changed while it was being read;
- stops at ``max_files`` regular files (and a bounded number of entries and depth), saying so
  in a logged warning.

Where results are kept (the data directory, or S3) is ``runner/cells/result_stores.py``; this module
re-exports its names.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from runner.cells.result_stores import (
    CHUNK_SIZE,
    FILE_FLAGS,
    LocalStore,
    ResultStore,
    S3Store,
    check_sha256,
    digest_fd,
    store_from_settings,
)
from runner.errors import ResultChangedError, ResultNotFoundError, ResultStoreError

log = logging.getLogger(__name__)


# A file whose mtime is this close to "now" may still be written to within the same clock tick
# (file times come from a coarse clock), which would leave its mtime unchanged. Such a file is
# hashed only once the clock has moved on, so a later write always shows in (size, mtime_ns).
_RACY_NS = 50_000_000
_RACY_RETRIES = 5
_MAX_DEPTH = 64
_ENTRIES_PER_FILE = 10  # entries (of any kind) a scan may look at, per allowed file

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


# --- scanning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannedFile:
    """A regular file :func:`scan` found; its recorded version is ``runner.models.ResultFile``."""

    path: str  # POSIX path relative to the results root, e.g. "plots/a.png"
    sha256: str  # hex
    size: int
    mtime_ns: int


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _hash_open_file(fd: int) -> tuple[str, os.stat_result] | None:
    """sha256 of an open regular file and the stat it belongs to; None if not a regular file.

    The stat returned was taken before the read and the file did not change during it, and its
    mtime is older than the file clock's resolution, so any later write changes (size, mtime_ns).
    """
    for attempt in range(_RACY_RETRIES + 1):
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        age = time.time_ns() - before.st_mtime_ns
        if 0 <= age < _RACY_NS and attempt < _RACY_RETRIES:
            time.sleep((_RACY_NS - age) / 1e9)
            continue
        digest = digest_fd(fd)
        if _signature(os.fstat(fd)) == _signature(before):
            return digest, before
    # Written to all along: keep the last reading; its mtime will differ next time if it goes on.
    return digest, before


@dataclass
class _Walk:
    previous: dict[str, ScannedFile]
    max_files: int
    max_entries: int
    root: Path
    index: dict[str, ScannedFile]
    changed: list[ScannedFile]
    entries: int = 0
    stopped: bool = False

    def stop(self, why: str) -> None:
        if not self.stopped:
            log.warning("results scan of %s stopped early: %s", self.root, why)
        self.stopped = True


def scan(
    root: Path, previous: dict[str, ScannedFile] | None = None, *, max_files: int = 10000
) -> tuple[dict[str, ScannedFile], list[ScannedFile]]:
    """Current index of regular files under root, and the list of files new or changed since `previous`.

    Re-hashes only files whose (size, mtime_ns) changed. Never follows symlinks (skipped
    entirely, wherever they point), skips non-regular files (fifos, devices, sockets) and names
    that are not UTF-8, never raises on a file vanishing mid-scan. Paths are POSIX, relative to
    root. Stops at ``max_files`` files (and says so via a logged warning). A missing root is an
    empty index. Deleted files are the keys of ``previous`` missing from the index.
    """
    walk = _Walk(
        previous=previous or {},
        max_files=max_files,
        max_entries=max(max_files, 1) * _ENTRIES_PER_FILE,
        root=Path(root),
        index={},
        changed=[],
    )
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        return walk.index, walk.changed
    try:
        _walk_dir(walk, root_fd, "", 0)
    finally:
        os.close(root_fd)
    return walk.index, walk.changed


def _walk_dir(walk: _Walk, dir_fd: int, prefix: str, depth: int) -> None:
    try:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.debug("results scan: cannot list %r: %s", prefix or ".", exc)
        return
    for entry in entries:
        if walk.stopped:
            return
        walk.entries += 1
        if walk.entries > walk.max_entries:
            walk.stop(f"more than {walk.max_entries} entries")
            return
        name = entry.name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            log.warning("results scan: skipping %r under %r: name is not UTF-8", name, prefix or ".")
            continue
        rel = prefix + name
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 >= _MAX_DEPTH:
                    log.warning("results scan: skipping %s: deeper than %d levels", rel, _MAX_DEPTH)
                    continue
                sub_fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    _walk_dir(walk, sub_fd, rel + "/", depth + 1)
                finally:
                    os.close(sub_fd)
            elif entry.is_file(follow_symlinks=False):
                _visit_file(walk, dir_fd, name, rel)
        except OSError as exc:  # vanished, replaced by a link, unreadable: not this scan's
            log.debug("results scan: skipping %s: %s", rel, exc)


def _visit_file(walk: _Walk, dir_fd: int, name: str, rel: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return
    if len(walk.index) >= walk.max_files:
        walk.stop(f"more than {walk.max_files} files (max_files)")
        return
    prev = walk.previous.get(rel)
    if prev is not None and (prev.size, prev.mtime_ns) == (st.st_size, st.st_mtime_ns):
        walk.index[rel] = prev
        return
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        hashed = _hash_open_file(fd)
    finally:
        os.close(fd)
    if hashed is None:
        return
    digest, fst = hashed
    record = ScannedFile(path=rel, sha256=digest, size=fst.st_size, mtime_ns=fst.st_mtime_ns)
    walk.index[rel] = record
    if prev is None or prev.sha256 != digest:
        walk.changed.append(record)


# The stores and the errors are re-exported under the names this module has always had.
__all__ = [
    "CHUNK_SIZE",
    "LocalStore",
    "ResultChangedError",
    "ResultNotFoundError",
    "ResultStore",
    "ResultStoreError",
    "S3Store",
    "ScannedFile",
    "check_sha256",
    "scan",
    "store_from_settings",
]
