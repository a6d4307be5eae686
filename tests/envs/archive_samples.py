"""Envctl archives made without an engine, and ways to damage them.

A sample is what ``GET /environments/{ref}/export`` writes for a two-version lineage: ``docker
save`` output (made here by hand, with image configurations that hash to their ids) turned
into an OCI layout by ``envs.archive.write_oci``. The damage helpers work on the bytes of a tar
file: cut it, flip a byte, or make a member header lie about its size (with a checksum that
still adds up, so the header itself looks sound).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs import archive
from envs.archive_contents import META_DIGEST

BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Image:
    image_id: str
    config: bytes
    layers: list[bytes]


def layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image(layers: list[bytes], seed: str, *, rootfs: bool = True) -> Image:
    """An image of ``layers``; without ``rootfs`` its configuration is one Docker refuses."""
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"envctl.seed": seed}},
    }
    if rootfs:
        doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config = json.dumps(doc).encode()
    return Image("sha256:" + hashlib.sha256(config).hexdigest(), config, layers)


def version(ref: str, img: Image, parent: tuple[str, Image] | None, **extra: Any) -> dict[str, Any]:
    return {
        "ref": ref,
        "environment": ref.split("@")[0],
        "number": int(ref.split("@")[1]),
        "digest": img.image_id,
        "image_id": img.image_id,
        "parent": parent[0] if parent else None,
        "parent_image_id": parent[1].image_id if parent else None,
        "message": f"made {ref}",
        "author": "elsewhere",
        "created_at": "2026-12-01T10:00:00+00:00",
        "size": 1000 * len(img.layers),
        "size_added": 1000,
        "source_runtime_id": None,
        "labels": {},
        **extra,
    }


def docker_save(images: list[Image]) -> bytes:
    """What ``docker save`` writes for ``images``: configs, layer tars and manifest.json."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        manifest = []
        for img in images:
            hexid = img.image_id.split(":")[1]
            members = {f"{hexid}.json": img.config}
            paths = []
            for data in img.layers:
                path = f"{hashlib.sha256(data).hexdigest()}/layer.tar"
                members[path] = data
                paths.append(path)
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            manifest.append({"Config": f"{hexid}.json", "RepoTags": None, "Layers": paths})
        body = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def make_archive(tmp: Path, tag: str = "sample", *, base_rootfs: bool = True) -> bytes:
    """An archive of ``travelled@1`` on ``base@1``, as export writes it; ``base_rootfs=False``
    gives ``base@1`` a configuration the engine refuses, after it took ``travelled@1``."""
    base_layer = layer({"etc/os-release": b"ID=debian\n", "bin/sh": b"\x7fELF" + bytes(range(256)) * 8})
    own_layer = layer({"root/souvenir": f"travelled {tag}\n".encode()})
    base = image([base_layer], f"base-{tag}", rootfs=base_rootfs)
    child = image([base_layer, own_layer], f"child-{tag}")
    meta = {
        "exported": "travelled@1",
        "versions": [
            version("travelled@1", child, ("base@1", base)),
            version("base@1", base, None, message="base image base"),
        ],
    }
    raw = tmp / f"docker-save-{tag}.tar"
    raw.write_bytes(docker_save([child, base]))
    out = io.BytesIO()
    archive.write_oci(
        raw, [child.image_id, base.image_id], meta, {child.image_id: "travelled@1", base.image_id: "base@1"}, out
    )
    raw.unlink()
    return out.getvalue()


# --- the layout of a tar file -------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str
    header: int  # offset of its header block
    data: int  # offset of its data
    size: int


def members(data: bytes) -> list[Member]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [Member(m.name, m.offset, m.offset_data, m.size) for m in tar]


def end_of_members(data: bytes) -> int:
    """Where the end-of-archive marker starts."""
    last = members(data)[-1]
    return last.data + -(-last.size // BLOCK) * BLOCK


def cut(data: bytes, at: int) -> bytes:
    return data[:at]


def flip(data: bytes, at: int, mask: int = 0xFF) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


def with_size(data: bytes, member: Member, size: int) -> bytes:
    """``data`` with ``member``'s header saying ``size`` bytes, its checksum made right again."""
    header = bytearray(data[member.header : member.header + BLOCK])
    if size < 8**11:
        header[124:136] = b"%011o\0" % size
    else:  # GNU base-256 for sizes past the octal field
        header[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[: member.header] + bytes(header) + data[member.header + BLOCK :]


def rebuild(data: bytes, replace: dict[str, bytes], *, drop: tuple[str, ...] = ()) -> bytes:
    """The same archive with members replaced (by name) or dropped, headers written anew."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        bodies: dict[str, bytes] = {}
        for m in src:
            f = src.extractfile(m)
            assert f is not None
            bodies[m.name] = f.read()
        bodies.update(replace)  # new names go last
        for name, body in bodies.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mode = 0o644
            dst.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def read_member(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def read_json(data: bytes, name: str) -> Any:
    return json.loads(read_member(data, name))


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":")[-1]


def put_blob(replace: dict[str, bytes], body: bytes) -> str:
    """Add ``body`` as a blob to a ``rebuild`` replacement map; returns its ``sha256:`` digest."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    replace[blob_name(digest)] = body
    return digest


def with_meta(data: bytes, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """The archive with its metadata changed and the digest in index.json made to match, so
    that what is refused is the lie itself, not the damage."""
    meta = read_json(data, archive.META)
    change(meta)
    body = json.dumps(meta).encode()
    index = read_json(data, "index.json")
    index["annotations"][META_DIGEST] = "sha256:" + hashlib.sha256(body).hexdigest()
    return rebuild(data, {archive.META: body, "index.json": json.dumps(index).encode()})


def with_index(data: bytes, change: Callable[[dict[str, Any]], Any], extra: dict[str, bytes] | None = None) -> bytes:
    """The archive with index.json changed (and ``extra`` members added)."""
    index = read_json(data, "index.json")
    change(index)
    return rebuild(data, {**(extra or {}), "index.json": json.dumps(index).encode()})
