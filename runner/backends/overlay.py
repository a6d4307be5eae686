"""A container's changes read from its overlay2 upper directory, without asking the engine.

``docker diff`` costs more than half a second even for a container that changed nothing (the
engine takes locks and walks layer metadata), and envctl asks it on every stop (is there a
draft to keep?) and for the "unsaved changes" flag. With the overlay2 storage driver on this
host, a container's writable layer is a plain directory, ``GraphDriver.Data.UpperDir``; what is
in it is what changed, which is what the engine's own native overlay diff reads too:

- an entry present in the upper directory is added, or changed when a lower layer has it too;
- a character device with device number 0 is a whiteout: the path was deleted;
- a directory marked opaque (``trusted.overlay.opaque`` = ``y``) replaced one below.

Used only when the engine runs on this host with overlay2 and its directories can be read
(envctl runs as root beside dockerd); otherwise the backend asks the engine.

A save's layer is made here too (:func:`plan_layer`, then :func:`layer_chunks`), as the
engine's overlay2 driver makes a commit's: a tar of the upper directory with whiteouts as
``.wh.<name>`` files and opaque directories marked ``.wh..wh..opq``. Layers a draft added on top
of the version are merged into it (the topmost entry of a path wins; a whiteout or opaque
directory hides what is below it), so that they are filtered and scanned too. Every entry passes
the save's observer: files in caches are left out, content is streamed through the scan.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from runner.backends.base import Change, LayerObserver, changed_since_save

_OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque")


@dataclass(frozen=True)
class OverlayLayers:
    upper: str  # the container's writable layer
    lowers: tuple[str, ...]  # the image's layers (and the container's init layer), top first

    @classmethod
    def from_inspect(cls, graph_driver: dict[str, object]) -> OverlayLayers | None:
        """From ``GraphDriver`` of a container's inspection; None unless overlay2 and readable."""
        data = graph_driver.get("Data")
        if graph_driver.get("Name") != "overlay2" or not isinstance(data, dict):
            return None
        upper = data.get("UpperDir")
        lowers = tuple(p for p in str(data.get("LowerDir") or "").split(":") if p)
        if not isinstance(upper, str) or not os.access(upper, os.R_OK | os.X_OK):
            return None
        if not all(os.access(p, os.X_OK) for p in lowers):
            return None
        return cls(upper, lowers)


def changes(layers: OverlayLayers) -> list[Change]:
    """Every changed path of the container, as ``docker diff`` lists them."""
    return list(_walk(layers, "", below=True))


def _in_lower(layers: OverlayLayers, rel: str) -> bool:
    return any(os.path.lexists(os.path.join(lower, rel)) for lower in layers.lowers)


def _opaque(path: str) -> bool:
    for name in _OPAQUE:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _walk(layers: OverlayLayers, rel: str, *, below: bool) -> Iterator[Change]:
    """The changes under ``rel`` of the upper directory. ``below``: the directory exists in a
    lower layer (else everything under it is new, and no lower layer need be asked)."""
    with os.scandir(os.path.join(layers.upper, rel)) as entries:
        found = sorted(entries, key=lambda e: e.name)
    for entry in found:
        child = f"{rel}/{entry.name}" if rel else entry.name
        path = "/" + child
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            yield Change("deleted", path)  # a whiteout
            continue
        existed = below and _in_lower(layers, child)
        if stat.S_ISDIR(st.st_mode):
            yield Change("changed" if existed else "added", path)
            yield from _walk(layers, child, below=existed and not _opaque(entry.path))
        else:
            yield Change("changed" if existed else "added", path)


# ------------------------------------------------------------------------------ save layers
_BLOCK = 512
_CHUNK = 1 << 20
_WH = ".wh."
_OPAQUE_MARK = ".wh..wh..opq"
_CAPABILITY = "security.capability"


@dataclass
class PlannedLayer:
    """The entries of a layer, in order (their size as a tar is :meth:`tar_size`)."""

    entries: list[tuple[tarfile.TarInfo, str | None]] = field(default_factory=list)  # (header, content file)
    left_out: dict[str, dict[str, int]] = field(default_factory=dict)

    def tar_size(self) -> int:
        """The exact size of the layer as a tar (:func:`layer_chunks`): asked only of a layer
        that is streamed, since each header is made to be measured."""
        return 2 * _BLOCK + sum(
            len(_header(info)) + _padded(info.size if source else 0) for info, source in self.entries
        )


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def plan_layer(
    roots: Sequence[str],
    observer: LayerObserver,
    *,
    private: Callable[[str], bool],
    saved_at_ns: int = 0,
    saved: Sequence[str] = (),
) -> PlannedLayer:
    """The layer of ``roots`` (the upper directory, then the draft layers below it, top first),
    without the paths ``private`` names and the files in the observer's caches.

    After a save from the same container (``saved_at_ns``; ``saved``: the layers that save and
    any before it since the boot added, top first), only what changed since then, by
    ``changed_since_save``: the layer goes on the saved version's. Its entries are the paths
    changed after the save or missing from its layers (files it left out), the directories
    above them, whiteouts for what was deleted since
    (a path the saved layers hold that the container's layers no longer have), and, for a
    directory replaced since (opaque, and itself newer), everything under it."""
    plan = PlannedLayer()
    links: dict[tuple[int, int], str] = {}
    parents: dict[str, tuple[str, os.stat_result]] = {}  # older directories, added above a newer entry
    whole: list[str] = []  # directories replaced since the save: everything under them goes in

    def above(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(len(parts)):
            found = parents.pop("/".join(parts[: i + 1]), None)
            if found is not None:
                _add_entry(plan, "/".join(parts[: i + 1]), found[0], found[1], links, observer, opaque=False)

    for rel, host, st, opaque in _merged(roots, "", list(range(len(roots)))):
        path = "/" + rel
        if private(path):
            continue
        if saved_at_ns and not (whole and rel.startswith(whole[-1] + "/")):
            if not changed_since_save(st.st_ctime_ns, saved_at_ns):
                if stat.S_ISDIR(st.st_mode):
                    parents[rel] = (host, st)
                    continue
                if any(os.path.lexists(os.path.join(layer, rel)) for layer in saved):
                    continue  # in the saved version as it is here
                # not in it: a file the last save left out (a cache), which this one may keep
            above(rel)
            if opaque and stat.S_ISDIR(st.st_mode):
                whole.append(rel)
        parent, _, name = rel.rpartition("/")
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            _whiteout(plan, parent, name, st)
            continue
        if not stat.S_ISDIR(st.st_mode):
            cache = observer.cache_of(path)
            if cache is not None:
                counted = plan.left_out.setdefault(cache, {"bytes": 0, "files": 0})
                counted["files"] += 1
                if stat.S_ISREG(st.st_mode) and (st.st_nlink < 2 or (st.st_dev, st.st_ino) not in links):
                    counted["bytes"] += st.st_size
                    links.setdefault((st.st_dev, st.st_ino), "")
                continue
        _add_entry(plan, rel, host, st, links, observer, opaque=opaque)
    if saved_at_ns and saved:
        for rel, st in _vanished(saved, roots, "", list(range(len(roots))), tuple(whole)):
            if not private("/" + rel):
                above(rel)
                parent, _, name = rel.rpartition("/")
                _whiteout(plan, parent, name, st)
    return plan


def _whiteout(plan: PlannedLayer, parent: str, name: str, st: os.stat_result) -> None:
    info = _info(f"{parent}/{_WH}{name}" if parent else _WH + name, st, tarfile.REGTYPE)
    info.mode = 0o600
    _add(plan, info, None)


def _add_entry(
    plan: PlannedLayer,
    rel: str,
    host: str,
    st: os.stat_result,
    links: dict[tuple[int, int], str],
    observer: LayerObserver,
    *,
    opaque: bool,
) -> None:
    made = _entry(rel, host, st, links)
    if made is None:
        return  # a socket: never in a layer
    observer.entry("/" + rel, made.linkname or None)
    _xattrs(made, host)
    _add(plan, made, host if made.type == tarfile.REGTYPE else None)
    if opaque:
        mark = _info(f"{rel}/{_OPAQUE_MARK}", st, tarfile.REGTYPE)
        mark.mode = stat.S_IMODE(st.st_mode)
        _add(plan, mark, None)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _vanished(
    saved: Sequence[str], roots: Sequence[str], rel: str, visible: list[int], whole: tuple[str, ...]
) -> Iterator[tuple[str, os.stat_result]]:
    """The paths under ``rel`` that the saved layers hold and the container no longer has (it
    removed them from its upper directory, where they were only), with their saved stat. A
    path a lower layer also has leaves a whiteout instead, which the walk of ``roots`` finds."""
    names: dict[str, os.stat_result] = {}
    for layer in saved:
        try:
            with os.scandir(os.path.join(layer, rel)) as entries:
                for entry in entries:
                    if entry.name not in names:
                        names[entry.name] = entry.stat(follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
    for name in sorted(names):
        child = f"{rel}/{name}" if rel else name
        was = names[name]
        if stat.S_ISCHR(was.st_mode) and was.st_rdev == 0:
            continue  # deleted in the saved version already
        found = [(i, st) for i in visible if (st := _lstat(os.path.join(roots[i], child))) is not None]
        if not found:
            yield child, was
            continue
        if not stat.S_ISDIR(was.st_mode) or not stat.S_ISDIR(found[0][1].st_mode) or child in whole:
            continue  # replaced (a newer entry the walk of roots found) or wholly in the layer
        below: list[int] = []
        for i, st in found:  # as the container sees it: down to an opaque directory or a non-directory
            if not stat.S_ISDIR(st.st_mode):
                break
            below.append(i)
            if _opaque(os.path.join(roots[i], child)):
                break
        yield from _vanished(saved, roots, child, below, whole)


def _add(plan: PlannedLayer, info: tarfile.TarInfo, source: str | None) -> None:
    plan.entries.append((info, source))


def _entry(rel: str, host: str, st: os.stat_result, links: dict[tuple[int, int], str]) -> tarfile.TarInfo | None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return _info(rel + "/", st, tarfile.DIRTYPE)
    if stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        first = links.get(key) if st.st_nlink > 1 else None
        if first:
            info = _info(rel, st, tarfile.LNKTYPE)
            info.linkname = first
            return info
        if st.st_nlink > 1:
            links[key] = rel
        info = _info(rel, st, tarfile.REGTYPE)
        info.size = st.st_size
        return info
    if stat.S_ISLNK(mode):
        info = _info(rel, st, tarfile.SYMTYPE)
        info.linkname = os.readlink(host)
        return info
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info = _info(rel, st, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE)
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return info
    if stat.S_ISFIFO(mode):
        return _info(rel, st, tarfile.FIFOTYPE)
    return None


def _xattrs(info: tarfile.TarInfo, host: str) -> None:
    """File capabilities travel, as the engine's own layers keep them (nothing else does)."""
    if info.type not in (tarfile.REGTYPE, tarfile.DIRTYPE):
        return
    try:
        value = os.getxattr(host, _CAPABILITY, follow_symlinks=False)
    except OSError:
        return
    info.pax_headers = {"SCHILY.xattr." + _CAPABILITY: value.decode("utf-8", "surrogateescape")}


def _merged(roots: Sequence[str], rel: str, visible: list[int]) -> Iterator[tuple[str, str, os.stat_result, bool]]:
    """(path, host path, stat, opaque) of every entry under ``rel``, the topmost root's winning."""
    names: dict[str, int] = {}
    for i in visible:
        try:
            with os.scandir(os.path.join(roots[i], rel)) as entries:
                for entry in entries:
                    names.setdefault(entry.name, i)
        except (FileNotFoundError, NotADirectoryError):
            continue
    for name in sorted(names):
        child = f"{rel}/{name}" if rel else name
        top = names[name]
        host = os.path.join(roots[top], child)
        st = os.lstat(host)
        if not stat.S_ISDIR(st.st_mode):
            yield child, host, st, False
            continue
        below: list[int] = []
        opaque = False
        for i in visible:
            if i < top:
                continue
            try:
                here = os.lstat(os.path.join(roots[i], child))
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(here.st_mode):
                opaque = True  # a file or whiteout below hides what the version has: replace it
                break
            below.append(i)
            if _opaque(os.path.join(roots[i], child)):
                opaque = True
                break
        yield child, host, st, opaque
        yield from _merged(roots, child, below)


def lay_out(plan: PlannedLayer, dest: str) -> None:
    """The layer as a directory ``dest`` (empty, on the same filesystem: a helper container's
    upper directory), as the engine keeps a layer: every regular file a hard link to the one
    it was planned from, so that no byte is copied (a copy where a link cannot be made); the
    others made anew with the owner, mode and time of their entry. Whiteouts and opaque marks
    stay the ``.wh.`` files a layer's tar holds, which the engine reads as such.

    Linking adds a name to a file of the container's upper directory, which changes the
    file's ctime: :func:`empty` takes the names away again, and a save records its moment
    after that (``changed_since_save``)."""
    made_dirs: list[tuple[str, float]] = []
    for info, source in plan.entries:
        path = os.path.join(dest, info.name.rstrip("/"))
        kind = info.type
        if kind == tarfile.REGTYPE and source is not None:
            _link(source, path, info)
            continue
        if kind == tarfile.LNKTYPE:
            _link(os.path.join(dest, info.linkname), path, info)
            continue
        _parent(path)
        if kind == tarfile.DIRTYPE:
            os.mkdir(path)
            made_dirs.append((path, info.mtime))
        elif kind == tarfile.REGTYPE:  # a whiteout or an opaque mark: an empty file
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        elif kind == tarfile.SYMTYPE:
            os.symlink(info.linkname, path)
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            device = stat.S_IFCHR if kind == tarfile.CHRTYPE else stat.S_IFBLK
            os.mknod(path, device | info.mode, os.makedev(info.devmajor, info.devminor))
        elif kind == tarfile.FIFOTYPE:
            os.mkfifo(path, info.mode)
        os.lchown(path, info.uid, info.gid)
        if kind != tarfile.SYMTYPE:
            os.chmod(path, info.mode)
        _set_xattrs(path, info)
        if kind != tarfile.DIRTYPE:
            os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)
    for path, mtime in reversed(made_dirs):  # after their entries, which change a directory's time
        os.utime(path, (mtime, mtime))


def _parent(path: str) -> None:
    """The directory above ``path``, made when the plan has no entry of it (root's, 0755)."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, 0o755)


def _link(source: str, path: str, info: tarfile.TarInfo) -> None:
    _parent(path)
    try:
        os.link(source, path, follow_symlinks=False)
    except OSError:  # another filesystem, or links refused: a copy, with what the tar would say
        shutil.copyfile(source, path, follow_symlinks=False)
        os.lchown(path, info.uid, info.gid)
        os.chmod(path, info.mode)
        _set_xattrs(path, info)
        os.utime(path, (info.mtime, info.mtime))


def _set_xattrs(path: str, info: tarfile.TarInfo) -> None:
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            os.setxattr(path, key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape"))


def empty(dest: str) -> None:
    """Everything in ``dest`` removed (a link's other names, the container's files, stay)."""
    with os.scandir(dest) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def scan_files(plan: PlannedLayer, observer: LayerObserver, tree: str | None = None) -> None:
    """Every regular file of the layer through the observer, read where it lies (no tar).

    ``tree``: the layer laid out as a directory (:func:`lay_out`). When the observer names the
    needles a finding needs (``SaveFilter.needles``), GNU grep searches the tree for them first
    (many times faster than Python, in a process of its own), and only the files it names, and
    those the observer reads whole, are read here; every file is still announced, so that its
    path is judged. Where grep cannot be used, every file is read here."""
    needles = getattr(observer, "needles", lambda: None)()
    holding = grep_files(tree, needles) if tree is not None and needles is not None else None
    for info, source in plan.entries:
        if source is None:
            continue
        sink = observer.content("/" + info.name, info.size)
        if sink is None:
            continue
        if holding is not None and info.name not in holding and not getattr(sink, "reads_whole", False):
            sink(b"")  # none of the needles in it: nothing to read
            continue
        with open(source, "rb") as f:
            while chunk := f.read(_CHUNK):
                sink(chunk)
        sink(b"")


def grep_files(tree: str, needles: Sequence[bytes]) -> set[str] | None:
    """The regular files under ``tree`` (paths relative to it) that hold any of ``needles``
    (none with a line break): ``grep -rlaF``, the needles through a pipe (never on disk or in
    a command line), bytes as bytes (``LC_ALL=C``); symbolic links are not followed, devices
    and FIFOs skipped. None when grep is missing or fails: the caller then reads every file."""
    command = ["grep", "-r", "-l", "-a", "-F", "-Z", "-D", "skip", "-f", "-", "--", "."]
    try:
        done = subprocess.run(
            command,
            cwd=tree,
            input=b"\n".join(needles) + b"\n",
            capture_output=True,
            env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )
    except OSError:
        return None
    if done.returncode not in (0, 1):
        return None
    return {os.fsdecode(p).removeprefix("./") for p in done.stdout.split(b"\0") if p}


def layer_chunks(plan: PlannedLayer, observer: LayerObserver) -> Iterator[bytes]:
    """The layer's tar, exactly ``plan.tar_size()`` bytes, every file's content through the observer."""
    for info, source in plan.entries:
        yield _header(info)
        if source is None:
            continue
        sink = observer.content("/" + info.name, info.size)
        left = info.size
        with open(source, "rb") as f:
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    chunk = b"\0" * min(_CHUNK, left)  # shrank since it was planned (never while paused)
                left -= len(chunk)
                if sink is not None:
                    sink(chunk)
                yield chunk
        if sink is not None:
            sink(b"")
        if info.size % _BLOCK:
            yield b"\0" * (_BLOCK - info.size % _BLOCK)
    yield b"\0" * (2 * _BLOCK)
