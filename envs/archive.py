"""Environment archives: a version and its lineage as one OCI image layout in a tar file.

    envctl-export.json           what the archive holds: every version of the lineage, child
                                 first, with number, digest, parent, message, author, time,
                                 sizes and labels
    oci-layout                   {"imageLayoutVersion": "1.0.0"}
    index.json                   one manifest per version, named by its reference
    blobs/sha256/<hex>           configs, layers (uncompressed tars) and manifests

Made from ``docker save`` output and turned back into it for ``docker load``; the image
configuration bytes travel unchanged, so every image keeps its id (its digest).

Reading an archive never extracts it: members are read as streams. Anything but regular files
at the expected names (absolute paths, ``..``, links, devices) is refused, and every blob is
checked against its digest (R25). Damage is refused with a 422 that says what and where (R34):
a file cut short (inside a header, inside a member, or before the end-of-archive marker), a
member header that is damaged or lies about its size, a blob whose bytes changed, and JSON
that is broken or disagrees with the blobs (``envs.archive_contents``). ``index.json`` carries
the digest of ``envctl-export.json``, so a changed byte there is seen as well. Damage to bytes
nothing reads (the padding after a member, a manifest's name annotation) changes nothing a load
records and is let through.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from envs.archive_contents import (
    FORMAT,
    MAX_DOCUMENT,
    MEDIA_CONFIG,
    MEDIA_LAYER,
    MEDIA_MANIFEST,
    META,
    META_DIGEST,
    Checked,
    read_contents,
)
from envs.errors import ArchiveError

__all__ = ["FORMAT", "META", "Checked", "check", "copy_stream", "docker_archive", "stream_file", "write_oci"]

_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})\Z")
_ALLOWED_DIRS = {"blobs", "blobs/sha256"}
_DOCUMENTS = ("oci-layout", "index.json", META)
CHUNK = 1024 * 1024
MAX_TRAILER = 1024 * 1024  # zero bytes allowed after the end-of-archive marker (tar pads to a record)
# what reading a damaged tar file (or a damaged compressed one) raises
_UNREADABLE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _sha256_file(f: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def write_oci(docker_save: Path, images: list[str], meta: dict[str, Any], refs: dict[str, str], out: IO[bytes]) -> None:
    """Turn ``docker save`` output holding ``images`` into an envctl archive written to ``out``.

    ``refs`` maps image id to the version reference to name its manifest with.
    """
    with tarfile.open(docker_save) as src, tarfile.open(fileobj=out, mode="w|") as dst:
        manifest = json.load(_member(src, "manifest.json"))
        by_config: dict[str, dict[str, Any]] = {m["Config"]: m for m in manifest}
        written: set[str] = set()

        def put_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            dst.addfile(info, io.BytesIO(data))

        def put_blob(member: str) -> tuple[str, int]:
            f = _member(src, member)
            digest, size = _sha256_file(f)
            if digest not in written:
                info = tarfile.TarInfo(f"blobs/sha256/{digest}")
                info.size = size
                info.mode = 0o644
                dst.addfile(info, _member(src, member))
                written.add(digest)
            return digest, size

        put_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        meta_bytes = json.dumps({"format": FORMAT, **meta}, indent=2, default=str).encode()
        put_bytes(META, meta_bytes)
        index: list[dict[str, Any]] = []
        for image_id in images:
            hexid = image_id.split(":")[-1]
            entry = next((m for cfg, m in by_config.items() if hexid in cfg), None)
            if entry is None:
                raise ArchiveError(f"image {image_id[:19]} is not in what docker save gave")
            config_digest, config_size = put_blob(entry["Config"])
            if config_digest != hexid:
                raise ArchiveError(f"image {image_id[:19]}'s configuration does not hash to its id")
            layers = []
            for layer in entry["Layers"]:
                digest, size = put_blob(layer)
                layers.append({"mediaType": MEDIA_LAYER, "digest": f"sha256:{digest}", "size": size})
            manifest_bytes = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": MEDIA_MANIFEST,
                    "config": {"mediaType": MEDIA_CONFIG, "digest": f"sha256:{config_digest}", "size": config_size},
                    "layers": layers,
                },
                separators=(",", ":"),
            ).encode()
            manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
            if manifest_digest not in written:
                put_bytes(f"blobs/sha256/{manifest_digest}", manifest_bytes)
                written.add(manifest_digest)
            index.append(
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": f"sha256:{manifest_digest}",
                    "size": len(manifest_bytes),
                    "annotations": {"org.opencontainers.image.ref.name": refs.get(image_id, hexid[:12])},
                }
            )
        annotations = {META_DIGEST: "sha256:" + hashlib.sha256(meta_bytes).hexdigest()}
        put_bytes(
            "index.json",
            json.dumps({"schemaVersion": 2, "manifests": index, "annotations": annotations}, indent=2).encode(),
        )


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    f = tar.extractfile(name)
    if f is None:
        raise ArchiveError(f"{name} is not a file in the archive")
    return f


def check(path: Path) -> Checked:
    """Refuse anything but a well-formed, undamaged envctl archive whose blobs match their
    digests; ``ArchiveError`` (422) names the problem and where it is."""
    with _open(path) as tar:
        blobs, documents = _walk(tar)
        for required in _DOCUMENTS:
            if required not in documents:
                raise ArchiveError(f"archive: {required} is missing; is this an envctl export?", field="archive")
        return read_contents(documents, blobs, lambda blob: _read_blob(tar, blob))


def _open(path: Path) -> tarfile.TarFile:
    """The archive as a tar file: plain (as export writes it) or compressed."""
    try:
        return tarfile.open(path, "r:")
    except _UNREADABLE as plain:
        try:
            return tarfile.open(path, "r:*")
        except _UNREADABLE:
            raise ArchiveError(f"archive: not a readable tar file ({plain})", field="archive") from plain


def _walk(tar: tarfile.TarFile) -> tuple[dict[str, int], dict[str, bytes]]:
    """Every member checked and read once: blobs hashed (hex digest -> size), the JSON
    documents kept; then the end of the tar file checked."""
    blobs: dict[str, int] = {}
    documents: dict[str, bytes] = {}
    names: set[str] = set()
    try:
        for m in tar:
            where = f"archive: member {m.name[:120]!r}"
            clean = _allowed(m, where)
            if clean is None:
                continue
            if clean in names:
                raise ArchiveError(f"{where} appears twice", field="archive")
            names.add(clean)
            match = _BLOB.match(clean)
            if match is None:
                if m.size > MAX_DOCUMENT:
                    raise ArchiveError(
                        f"{where} is {m.size} bytes; at most {MAX_DOCUMENT} are allowed", field="archive"
                    )
                chunks: list[bytes] = []
                _read(tar, m, where, chunks.append)
                documents[clean] = b"".join(chunks)
                continue
            h = hashlib.sha256()
            _read(tar, m, where, h.update)
            if h.hexdigest() != match.group(1):
                raise ArchiveError(f"{where}: its content does not match its digest", field="archive")
            blobs[match.group(1)] = m.size
    except _UNREADABLE as exc:
        raise ArchiveError(
            f"archive: the tar file is damaged or cut short after byte {tar.offset} ({exc})", field="archive"
        ) from exc
    _check_end(tar)
    return blobs, documents


def _allowed(m: tarfile.TarInfo, where: str) -> str | None:
    """The member's clean name if it is a file an archive holds, None for an allowed
    directory; anything else is refused."""
    name = m.name
    if name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/"):
        raise ArchiveError(f"{where} would be written outside the destination", field="archive")
    if m.issym() or m.islnk():
        raise ArchiveError(f"{where} is a link; archives hold only regular files", field="archive")
    if m.isdev() or m.isfifo() or m.ischr() or m.isblk():
        raise ArchiveError(f"{where} is a device or fifo; archives hold only regular files", field="archive")
    clean = name.rstrip("/").removeprefix("./")
    if m.isdir():
        if clean not in _ALLOWED_DIRS and clean not in ("", "."):
            raise ArchiveError(f"{where} is not part of an envctl archive", field="archive")
        return None
    if not m.isfile() or m.issparse():
        raise ArchiveError(f"{where} is not a regular file", field="archive")
    if _BLOB.match(clean) is None and clean not in _DOCUMENTS:
        raise ArchiveError(f"{where} is not part of an envctl archive", field="archive")
    return clean


def _read(tar: tarfile.TarFile, m: tarfile.TarInfo, where: str, sink: Callable[[bytes], object]) -> None:
    """Stream a member's bytes into ``sink``; a member the file ends inside is refused."""
    f = tar.extractfile(m)
    if f is None:
        raise ArchiveError(f"{where} is not a regular file", field="archive")
    done = 0
    try:
        while chunk := f.read(CHUNK):
            sink(chunk)
            done += len(chunk)
    except _UNREADABLE as exc:
        raise ArchiveError(
            f"{where} is cut short or damaged: its header says {m.size} bytes ({exc})", field="archive"
        ) from exc
    if done != m.size:
        raise ArchiveError(f"{where} is cut short: its header says {m.size} bytes, {done} are there", field="archive")


def _check_end(tar: tarfile.TarFile) -> None:
    """The members must be followed by the end-of-archive marker (two zero blocks) and nothing
    but zeros. Python's tarfile takes a header it cannot read after the first for the end of
    the archive, so this is where a damaged header, or a file cut short between members, shows."""
    end = tar.offset
    marker = b"\0" * (2 * tarfile.BLOCKSIZE)
    try:
        f = tar.fileobj
        assert f is not None
        f.seek(end)
        found = f.read(len(marker))
        trailer = f.read(MAX_TRAILER + 1)
    except _UNREADABLE as exc:
        raise ArchiveError(f"archive: the tar file is damaged after byte {end} ({exc})", field="archive") from exc
    if found != marker:
        if len(found) < len(marker):  # a whole archive has at least the marker after its members
            what = "a member header" if found.strip(b"\0") else "the end-of-archive marker"
            problem = f"is cut short at byte {end + len(found)}: {what} is incomplete or missing"
        else:
            problem = f"has a damaged member header at byte {end}"
        raise ArchiveError(f"archive: the tar file {problem}", field="archive")
    if len(trailer) > MAX_TRAILER or trailer.strip(b"\0"):
        raise ArchiveError(f"archive: the tar file has data after its end (byte {end})", field="archive")


def _read_blob(tar: tarfile.TarFile, blob: str) -> bytes:
    f = _member(tar, f"blobs/sha256/{blob}")
    try:
        return f.read()
    except _UNREADABLE as exc:  # read once already; only a file changed under us gets here
        raise ArchiveError(f"archive: blob {blob[:12]} cannot be read again ({exc})", field="archive") from exc


def docker_archive(path: Path, checked: Checked, out: IO[bytes]) -> None:
    """The ``docker load`` form of a checked archive, written to ``out``."""
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w|") as dst:
        done: set[str] = set()

        def copy(blob: str, name: str) -> None:
            if name in done:
                return
            member = src.getmember(f"blobs/sha256/{blob}")
            info = tarfile.TarInfo(name)
            info.size = member.size
            info.mode = 0o644
            dst.addfile(info, _member(src, f"blobs/sha256/{blob}"))
            done.add(name)

        manifest = []
        for _image_id, (config, layers) in checked.images.items():
            copy(config, f"{config}.json")
            paths = []
            for layer in layers:
                copy(layer, f"{layer}/layer.tar")
                paths.append(f"{layer}/layer.tar")
            manifest.append({"Config": f"{config}.json", "RepoTags": None, "Layers": paths})
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))


def stream_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def copy_stream(chunks: Iterator[bytes], out: IO[bytes]) -> int:
    n = 0
    for chunk in chunks:
        out.write(chunk)
        n += len(chunk)
    return n
