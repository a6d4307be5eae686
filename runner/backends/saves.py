"""The Docker backend's save path: which directories make the new layer, the pause, the fallback.

A save's layer is made from the container's overlay2 directories (``overlay.plan_layer``) when
this host can read them and the kernel's overlay keeps whole files in the upper directory (no
``redirect_dir``, no ``metacopy``: the engine itself then falls back to a naive diff). The
layers of the container's image above the version's (a draft restored at boot) are merged into
the new layer, so that they are filtered and scanned too; the image keeps the layers the two
have in common. After a save from the same running container, the new image keeps every layer
of the version that save made, and its layer holds only what changed since
(``change_baseline.saved_at_ns``, ``overlay.plan_layer``): a second save does not send the
first one's files again.

Where nothing is left out and no draft is merged, the engine's own commit makes the layer
(faster than a load), the container paused by envctl from the scan to the commit's end, the
files scanned where they lie while the engine commits; a refused layer's image is removed.
Otherwise the layer is streamed into the engine (``envs.images.layers.load_layer``).

Where the directories cannot be read, the save is a ``docker commit``: every changed file is first read from the engine
(``get_archive``) and scanned, and nothing can be left out (``SavedLayer.lean`` is False).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images import docker as engine
from envs.images.config import ImageInfo
from envs.images.docker import daemon_error
from envs.images.layers import load_layer
from envs.images.rewrite import ChunkReader
from envs.kit.errors import EnvctlError
from runner.backends import overlay
from runner.backends.base import PRIVATE_PATHS, Change, LayerObserver

#: mount points Docker makes in every runtime container: never part of a layer
MOUNT_POINTS = (*PRIVATE_PATHS, "/usr/sbin/docker-init", "/sbin/docker-init")
_OVERLAY_PARAMETERS = Path("/sys/module/overlay/parameters")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def is_mount_point(path: str) -> bool:
    return any(path == m or path.startswith(m + "/") for m in MOUNT_POINTS)


def _whole_files() -> bool:
    """The kernel's overlay copies whole files up and keeps directories in place."""
    for name in ("redirect_dir", "metacopy"):
        try:
            if (_OVERLAY_PARAMETERS / name).read_text().strip() in ("Y", "on", "1"):
                return False
        except OSError:
            continue
    return True


@dataclass(frozen=True)
class LayerPlan:
    """Where a save's layer comes from and what it goes on."""

    roots: list[str]  # the directories of the new layer, top first
    base: str  # the image whose first ``keep`` layers the new image keeps
    keep: int
    saved: list[str]  # since a save: the layers saves from this container added, top first


def layer_roots(client: docker.DockerClient, cid: str, version_image: str, saved_at_ns: int = 0) -> LayerPlan | None:
    """The directories of the new layer and the layers the new image keeps, or None when the
    layer cannot be made from the directories. After a save from this container
    (``saved_at_ns``), the new image keeps every layer of the version it saved (when their
    directories can be read) and the layer holds what changed since."""
    try:
        container = client.api.inspect_container(cid)
        layers = overlay.OverlayLayers.from_inspect(container.get("GraphDriver") or {})
        if layers is None or not _whole_files():
            return None
        image = str(container["Image"])
        mine = list((client.api.inspect_image(image).get("RootFS") or {}).get("Layers") or [])
        version_attrs = client.api.inspect_image(version_image)
    except Exception as exc:
        raise daemon_error("inspect the runtime's container", exc) from exc
    version = list((version_attrs.get("RootFS") or {}).get("Layers") or [])
    keep = 0
    while keep < min(len(mine), len(version)) and mine[keep] == version[keep]:
        keep += 1
    lowers = layers.lowers
    if keep == 0 or len(lowers) != len(mine) + 1 or not lowers[0].endswith("-init/diff"):
        return None
    roots = [layers.upper, *lowers[1 : 1 + len(mine) - keep]]
    saved = _saved_layers(version_attrs, len(version) - keep) if saved_at_ns else None
    if saved is None:
        return LayerPlan(roots, image, keep, [])
    return LayerPlan(roots, version_image, len(version), saved)


def _saved_layers(attrs: dict[str, Any], count: int) -> list[str] | None:
    """The directories of an image's top ``count`` layers (top first), when readable."""
    graph = attrs.get("GraphDriver") or {}
    data = graph.get("Data") if graph.get("Name") == "overlay2" else None
    if count < 1 or not isinstance(data, dict) or not isinstance(data.get("UpperDir"), str):
        return None
    dirs = [str(data["UpperDir"]), *(p for p in str(data.get("LowerDir") or "").split(":") if p)][:count]
    if len(dirs) < count or not all(os.access(d, os.R_OK | os.X_OK) for d in dirs):
        return None
    return dirs


def from_directories(
    client: docker.DockerClient,
    cid: str,
    *,
    config: dict[str, Any],
    repository: str,
    tag: str,
    version_image: str,
    observer: LayerObserver,
    saved_at_ns: int = 0,
) -> tuple[ImageInfo, dict[str, dict[str, int]]] | None:
    """The save's image and what its layer left out; None when the directories cannot be used."""
    plan = layer_roots(client, cid, version_image, saved_at_ns)
    if plan is None:
        return None
    since = saved_at_ns if plan.saved else 0
    action = "save the runtime's filesystem"
    with paused(client, cid, action):
        layer = overlay.plan_layer(plan.roots, observer, private=is_mount_point, saved_at_ns=since, saved=plan.saved)
        if not layer.left_out and len(plan.roots) == 1 and not since:
            # Nothing to leave out, no draft to merge, no earlier save to build on: the engine's
            # own commit makes the same layer faster. The files are scanned meanwhile, read where
            # they lie (the container stays paused throughout); a refused layer's image is removed at once.
            with ThreadPoolExecutor(1, thread_name_prefix="envctl-scan") as pool:
                scanning = pool.submit(overlay.scan_files, layer, observer)
                info = engine.commit(
                    client, cid, config=config, repository=repository, tag=tag, pause=False, action=action
                )
                scanning.result()
            try:
                observer.verdict()
            except BaseException:
                with contextlib.suppress(EnvctlError):
                    engine.remove_image(client, info.id, force=True)
                raise
            return info, {}
        info = load_layer(
            client,
            base=plan.base,
            keep=plan.keep,
            layer_size=layer.size,
            layer=overlay.layer_chunks(layer, observer),
            ready=observer.verdict,
            config=config,
            created=str(config.get("Labels", {}).get("org.opencontainers.image.created") or now()),
            created_by=f"envctl save ({len(layer.entries)} entries{', since the last save' if since else ''})",
            repository=repository,
            tag=tag,
            action=action,
        )
    return info, layer.left_out


@contextlib.contextmanager
def paused(client: docker.DockerClient, cid: str, action: str) -> Iterator[None]:
    """The container frozen for the block, as ``docker commit`` freezes it."""
    try:
        was_paused = bool((client.api.inspect_container(cid).get("State") or {}).get("Paused"))
        if not was_paused:
            client.api.pause(cid)
    except Exception as exc:
        raise daemon_error(action, exc) from exc
    try:
        yield
    finally:
        if not was_paused:
            try:
                client.api.unpause(cid)
            except docker.errors.NotFound:
                pass  # removed meanwhile: nothing to resume
            except Exception as exc:
                raise daemon_error("resume the runtime after its save", exc) from exc


def commit_and_scan(
    client: docker.DockerClient,
    cid: str,
    changes: Callable[[], list[Change]],
    *,
    config: dict[str, Any],
    repository: str,
    tag: str,
    observer: LayerObserver,
) -> ImageInfo:
    """A commit, every changed file read from the engine and scanned first; the container is
    paused from the first read to the commit's end."""
    action = "save the runtime's filesystem"
    with paused(client, cid, action):
        for change in changes():  # listed while paused: nothing new slips in unscanned
            if change.kind != "deleted":
                _scan_path(client, cid, change.path, observer)
        observer.verdict()
        return engine.commit(client, cid, config=config, repository=repository, tag=tag, pause=False, action=action)


def _scan_path(client: docker.DockerClient, cid: str, path: str, observer: LayerObserver) -> None:
    observer.entry(path)
    try:
        chunks, _stat = client.api.get_archive(cid, path)
    except docker.errors.NotFound:
        return
    except Exception as exc:
        raise daemon_error("read the runtime's changes", exc) from exc
    with tarfile.open(fileobj=io.BufferedReader(ChunkReader(chunks), 1 << 20), mode="r|") as tar:
        member = tar.next()
        handle = tar.extractfile(member) if member is not None and member.isreg() else None
        sink = observer.content(path, member.size) if handle is not None and member is not None else None
        if handle is None or sink is None:
            return
        while chunk := handle.read(1 << 20):
            sink(chunk)
        sink(b"")
