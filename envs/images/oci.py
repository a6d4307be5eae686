"""OCI image configuration and manifest of a child image, as plain data (no engine).

A save made inside a runtime (``runner/saves/insave.py``) writes its image itself: the configuration
is the parent's own (read from the registry) with the trusted ``Config`` of
``envs.images.config.child_config``, the parent's ``rootfs.diff_ids`` and ``history`` plus the new
layer's; the manifest lists the parent's layers as the registry holds them and the new one, and
carries ``org.opencontainers.image.base.digest`` / ``base.name`` annotations. The Docker engine
takes the configuration's digest as the image id, so the catalog records exactly that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
#: Docker's media types and the OCI ones for the same bytes
_AS_OCI = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": LAYER_TAR,
    "application/vnd.docker.container.image.v1+json": CONFIG,
}
#: what a child's configuration takes from its parent's besides ``config``
_KEPT = ("architecture", "os", "variant", "os.version", "os.features")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def layers_of(manifest: Mapping[str, Any]) -> list[Descriptor]:
    """The layer descriptors of a (Docker schema 2 or OCI) manifest, with OCI media types."""
    out = []
    for layer in manifest.get("layers") or []:
        kind = str(layer.get("mediaType") or LAYER_GZIP)
        out.append(Descriptor(_AS_OCI.get(kind, kind), str(layer["digest"]), int(layer["size"])))
    return out


def child_config(
    parent: Mapping[str, Any], config: Mapping[str, Any], diff_id: str, *, created: str, created_by: str
) -> bytes:
    """The configuration blob of a child of the image configured ``parent`` (its whole
    configuration JSON): ``config`` (the trusted ``Config``: Env, Cmd, Entrypoint, WorkingDir,
    User, Labels) and one more layer ``diff_id``."""
    rootfs = parent.get("rootfs") or {}
    diff_ids = [*list(rootfs.get("diff_ids") or []), diff_id]
    history = [*list(parent.get("history") or []), {"created": created, "created_by": created_by}]
    body: dict[str, Any] = {key: parent[key] for key in _KEPT if key in parent}
    body.update(
        {
            "created": created,
            "config": {k: v for k, v in config.items() if v is not None},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        }
    )
    return canonical(body)


def manifest(config: bytes, layers: Sequence[Descriptor], annotations: Mapping[str, str] | None = None) -> bytes:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": Descriptor(CONFIG, digest_of(config), len(config)).as_dict(),
        "layers": [d.as_dict() for d in layers],
    }
    if annotations:
        body["annotations"] = dict(annotations)
    return canonical(body)
