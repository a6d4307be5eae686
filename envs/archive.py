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
checked against its digest (R25).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from envs.errors import ArchiveError

FORMAT = 1
META = "envctl-export.json"
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})\Z")
_ALLOWED_DIRS = {"blobs", "blobs/sha256"}
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1024 * 1024


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
        put_bytes(META, json.dumps({"format": FORMAT, **meta}, indent=2, default=str).encode())
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
        put_bytes("index.json", json.dumps({"schemaVersion": 2, "manifests": index}, indent=2).encode())


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    f = tar.extractfile(name)
    if f is None:
        raise ArchiveError(f"{name} is not a file in the archive")
    return f


@dataclass
class Checked:
    """A checked archive: its metadata and, per image id, its config and layer blob digests."""

    meta: dict[str, Any]
    images: dict[str, tuple[str, list[str]]]


def check(path: Path) -> Checked:
    """Refuse anything but a well-formed envctl archive whose blobs match their digests."""
    try:
        tar = tarfile.open(path)  # noqa: SIM115  (closed by the with below)
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"archive: not a readable tar file ({exc})", field="archive") from exc
    with tar:
        blobs: set[str] = set()
        names: set[str] = set()
        for m in tar:
            name = m.name
            where = f"archive: member {name[:120]!r}"
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
                continue
            if not m.isfile():
                raise ArchiveError(f"{where} is not a regular file", field="archive")
            match = _BLOB.match(clean)
            if match is None and clean not in ("oci-layout", "index.json", META):
                raise ArchiveError(f"{where} is not part of an envctl archive", field="archive")
            if clean in names:
                raise ArchiveError(f"{where} appears twice", field="archive")
            names.add(clean)
            if match is not None:
                f = tar.extractfile(m)
                assert f is not None
                digest, _size = _sha256_file(f)
                if digest != match.group(1):
                    raise ArchiveError(f"{where}: its content does not match its digest", field="archive")
                blobs.add(digest)
        for required in ("oci-layout", "index.json", META):
            if required not in names:
                raise ArchiveError(f"archive: {required} is missing; is this an envctl export?", field="archive")
        meta = json.load(_member(tar, META))
        index = json.load(_member(tar, "index.json"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("versions"), list):
            raise ArchiveError(f"archive: {META} is not of format {FORMAT}", field="archive")
        images: dict[str, tuple[str, list[str]]] = {}
        for entry in index.get("manifests", []):
            digest = str(entry.get("digest", "")).split(":")[-1]
            if digest not in blobs:
                raise ArchiveError(f"archive: manifest {digest[:12]} is missing", field="archive")
            manifest = json.load(_member(tar, f"blobs/sha256/{digest}"))
            config = str(manifest["config"]["digest"]).split(":")[-1]
            layers = [str(layer["digest"]).split(":")[-1] for layer in manifest.get("layers", [])]
            for blob in (config, *layers):
                if blob not in blobs:
                    raise ArchiveError(f"archive: blob {blob[:12]} is missing", field="archive")
            images[f"sha256:{config}"] = (config, layers)
        for v in meta["versions"]:
            if v.get("image_id") not in images:
                raise ArchiveError(f"archive: the image of {v.get('ref')} is missing", field="archive")
        return Checked(meta=meta, images=images)


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
