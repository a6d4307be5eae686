"""An image made from layers the engine has plus one new layer streamed in: a save's image.

``docker commit`` writes every byte of a container's writable layer into the image. A save
that leaves caches out, and that must be able to refuse its layer after reading it, makes the
layer itself and loads it: a ``docker save``-form archive holding only the new layer, its
config JSON (the trusted configuration, the kept layers' diff ids plus the new one, their
history) and a manifest. The engine skips the layers it already has (by chain id) without
opening their files, checks the new layer's diff id, and adds the image.

The archive is streamed into the engine as it is made (no temporary file): the layer's size
is known in advance, its digest is computed on the way, and the config JSON comes after it. A
``ready`` callback runs between the two: if it raises, the upload is cut short before the
manifest, the engine loads nothing, and the exception is raised here.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import docker

from envs.images.config import ImageInfo
from envs.images.docker import engine_call, inspect, messages, verify_config
from envs.kit.errors import BackendError


def _member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 512)


def history_of(client: docker.DockerClient, image: str, layers: int) -> list[dict[str, Any]]:
    """The history entries of ``image``'s first ``layers`` layers, oldest first (as in a config)."""
    with engine_call(f"read the history of image {image[:19]}"):
        entries = list(reversed(client.api.history(image) or []))
    out: list[dict[str, Any]] = []
    counted = 0
    for e in entries:
        empty = not e.get("Size")  # an empty entry added no layer (a layer of 0 bytes reads as one)
        if not empty and counted == layers:
            break
        counted += 0 if empty else 1
        item: dict[str, Any] = {"created": _rfc3339(int(e.get("Created") or 0))}
        if e.get("CreatedBy"):
            item["created_by"] = str(e["CreatedBy"])
        if e.get("Comment"):
            item["comment"] = str(e["Comment"])
        if empty:
            item["empty_layer"] = True
        out.append(item)
    return out


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_layer(
    client: docker.DockerClient,
    *,
    base: str,
    keep: int,
    layer_size: int,
    layer: Iterable[bytes],
    ready: Callable[[], None],
    config: Mapping[str, Any],
    created: str,
    created_by: str,
    repository: str,
    tag: str,
    action: str,
) -> ImageInfo:
    """Load an image of the first ``keep`` layers of image ``base`` plus ``layer`` (an
    uncompressed tar of exactly ``layer_size`` bytes), configured ``config``, tagged
    ``repository:tag``; checked as a commit is (:func:`envs.images.docker.verify_config`)."""
    attrs = inspect(client, base)
    if attrs is None:
        raise BackendError(f"image {base[:19]} vanished before the save ({action})", details={"action": action})
    kept = list((attrs.get("RootFS") or {}).get("Layers") or [])[:keep]
    history = history_of(client, base, keep) + [{"created": created, "created_by": created_by}]
    image: dict[str, Any] = {"architecture": attrs.get("Architecture") or "amd64", "os": attrs.get("Os") or "linux"}
    if attrs.get("Variant"):
        image["variant"] = attrs["Variant"]
    stream = _Archive(kept, layer_size, layer, ready, image, config, created, history, f"{repository}:{tag}")
    try:
        with engine_call(action):
            answer = client.api.load_image(stream.chunks(), quiet=False)
            messages(answer, action)
    except BaseException:
        if stream.refusal is not None:
            raise stream.refusal from None
        raise
    if stream.image_id is None:
        raise BackendError(f"the layer was not sent whole ({action})", details={"action": action})
    return verify_config(client, stream.image_id, config, action=action)


class _Archive:
    def __init__(
        self,
        kept: list[str],
        layer_size: int,
        layer: Iterable[bytes],
        ready: Callable[[], None],
        image: dict[str, Any],
        config: Mapping[str, Any],
        created: str,
        history: list[dict[str, Any]],
        reference: str,
    ) -> None:
        self.kept, self.layer_size, self.layer, self.ready = kept, layer_size, layer, ready
        self.image, self.config, self.created, self.history = image, config, created, history
        self.reference = reference
        self.refusal: BaseException | None = None
        self.image_id: str | None = None

    def chunks(self) -> Iterator[bytes]:
        digest = hashlib.sha256()
        yield _member("layer/layer.tar", self.layer_size)
        sent = 0
        for chunk in self.layer:
            digest.update(chunk)
            sent += len(chunk)
            yield chunk
        if sent != self.layer_size:
            self.refusal = BackendError(f"the layer was {sent} bytes, not the {self.layer_size} planned")
            raise self.refusal
        yield _pad(sent)
        try:
            self.ready()
        except BaseException as exc:  # the upload stops here: the engine gets no manifest
            self.refusal = exc
            raise
        self.image.update(
            created=self.created,
            config=dict(self.config),
            rootfs={"type": "layers", "diff_ids": [*self.kept, "sha256:" + digest.hexdigest()]},
            history=self.history,
        )
        names = [f"kept{i}/layer.tar" for i in range(len(self.kept))] + ["layer/layer.tar"]
        self.image_id, tail = _config_and_manifest(self.image, names, self.reference)
        yield tail


def _config_and_manifest(image: Mapping[str, Any], layer_names: list[str], reference: str) -> tuple[str, bytes]:
    """The end of a ``docker save``-form archive: the config JSON ``image``, a manifest naming
    ``layer_names`` (those the engine has need not be in the archive) and the two zero blocks;
    with the id of the image it makes."""
    data = json.dumps(image, separators=(",", ":"), sort_keys=True).encode()
    config_name = hashlib.sha256(data).hexdigest()
    manifest = [{"Config": config_name + ".json", "RepoTags": [reference], "Layers": layer_names}]
    tail = io.BytesIO()
    for name, payload in ((config_name + ".json", data), ("manifest.json", json.dumps(manifest).encode())):
        tail.write(_member(name, len(payload)) + payload + _pad(len(payload)))
    tail.write(b"\0" * 1024)
    return "sha256:" + config_name, tail.getvalue()


def reconfigure(
    client: docker.DockerClient,
    image: str,
    *,
    config: Mapping[str, Any],
    repository: str,
    tag: str,
    action: str,
) -> ImageInfo:
    """A copy of ``image`` configured exactly ``config``, tagged ``repository:tag``; checked as
    a commit is (:func:`envs.images.docker.verify_config`).

    The copy is loaded from an archive of its config JSON and manifest alone: every layer is
    one the engine has, so none is sent or read. It records nothing of a container (no
    ``container_config``); its history is the image's. ``image`` itself is left as it is.
    """
    attrs = inspect(client, image)
    if attrs is None:
        raise BackendError(
            f"image {image[:19]} vanished before it was configured ({action})", details={"action": action}
        )
    layers = list((attrs.get("RootFS") or {}).get("Layers") or [])
    made: dict[str, Any] = {
        "architecture": attrs.get("Architecture") or "amd64",
        "os": attrs.get("Os") or "linux",
        "created": str(attrs.get("Created") or ""),
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": layers},
        "history": history_of(client, image, len(layers)),
    }
    if attrs.get("Variant"):
        made["variant"] = attrs["Variant"]
    image_id, archive = _config_and_manifest(
        made, [f"kept{i}/layer.tar" for i in range(len(layers))], f"{repository}:{tag}"
    )
    with engine_call(action):
        messages(client.api.load_image(archive, quiet=False), action)
    return verify_config(client, image_id, config, action=action)
