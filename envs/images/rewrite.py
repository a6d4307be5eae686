"""Give an image exactly a given configuration, by rewriting its config JSON (save, edit, load).

``docker commit`` records more than the configuration it is given: the container's labels and
variables the configuration does not name are merged in, and (before Docker 25) the whole
container configuration is kept as ``container_config``. Base images must carry nothing of
their build container, so their committed image is saved, its config JSON replaced, and loaded
back. The layers are untouched (the lineage is unchanged) and the engine skips the layers it
already has.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import docker

from envs.images.docker import engine_call, info, load_stream
from envs.kit.errors import BackendError


def replace_config(
    client: docker.DockerClient,
    image: str,
    config: Mapping[str, Any],
    *,
    history: Mapping[str, str],
    repository: str,
    tag: str,
    action: str,
) -> str:
    """Load a copy of ``image`` whose configuration is ``config``, tagged ``repository:tag``.

    The copy records no ``container_config``, ``container`` or ``comment``; its last history
    entry becomes ``history`` (``created_by``, ``comment``), keeping its time and whether it
    added a layer. ``image`` itself
    is left as it is. Returns the copy's id as ``docker image inspect`` reports it.
    """
    with tempfile.TemporaryFile() as out:
        with engine_call(action):
            source = io.BufferedReader(ChunkReader(client.api.get_image(image)), 1 << 20)
            _rewrite(source, out, config, history, f"{repository}:{tag}", action)
        out.seek(0)
        load_stream(client, out, action)
    loaded = info(client, f"{repository}:{tag}")
    if loaded is None:
        raise BackendError(f"Docker loaded no image {repository}:{tag} ({action})", details={"action": action})
    return loaded.id


def _rewrite(
    source: BinaryIO,
    out: BinaryIO,
    config: Mapping[str, Any],
    history: Mapping[str, str],
    reference: str,
    action: str,
) -> None:
    """Copy a one-image ``docker save`` archive, its config JSON replaced and named anew."""
    configs: dict[str, bytes] = {}
    manifest: list[dict[str, Any]] = []
    with tarfile.open(fileobj=source, mode="r|") as tin, tarfile.open(fileobj=out, mode="w|") as tout:
        for member in tin:
            name = member.name
            if name == "manifest.json" or (name.endswith(".json") and "/" not in name):
                data = tin.extractfile(member).read()  # type: ignore[union-attr]
                if name == "manifest.json":
                    manifest = json.loads(data)
                else:
                    configs[name] = data
            elif name.endswith("/layer.tar") or member.isdir():
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
            # legacy per-layer json/VERSION and "repositories" are dropped
        if len(manifest) != 1 or manifest[0].get("Config") not in configs:
            raise BackendError(f"unexpected docker save archive ({action}): {manifest}", details={"action": action})
        image = json.loads(configs[manifest[0]["Config"]])
        image["config"] = dict(config)
        for key in ("container_config", "container", "comment"):
            image.pop(key, None)
        entries = image.get("history") or [{}]
        last = {"created": entries[-1].get("created", image.get("created")), **history}
        if entries[-1].get("empty_layer"):  # a commit without changes adds no layer: still none
            last["empty_layer"] = True
        entries[-1] = last
        image["history"] = entries
        data = json.dumps(image, separators=(",", ":"), sort_keys=True).encode()
        manifest[0]["Config"] = config_name = hashlib.sha256(data).hexdigest() + ".json"
        manifest[0]["RepoTags"] = [reference]
        for name, payload in ((config_name, data), ("manifest.json", json.dumps(manifest).encode())):
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(payload), 0o644
            tout.addfile(entry, io.BytesIO(payload))


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (a docker save stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = memoryview(chunk)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size
