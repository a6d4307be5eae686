"""The Docker backend's save path: which directories make the new layer, the helper, the fallbacks.

A save's layer is made from the container's overlay2 directories (``overlay.plan_layer``) when
this host can read them and the kernel's overlay keeps whole files in the upper directory (no
``redirect_dir``, no ``metacopy``: the engine itself then falls back to a naive diff). The
layers of the container's image above the version's (a draft restored at boot) are merged into
the new layer, so that they are filtered and scanned too; the image keeps the layers the two
have in common. After a save from the same running container, the new image keeps every layer
of the version that save made, and its layer holds only what changed since
(``change_baseline.saved_at_ns``, ``overlay.plan_layer``): a second save does not send the
first one's files again.

**The helper.** The runtime's own container is never committed: the engine would merge its
configuration (the runtime's variables, its command, working directory, labels) into the
image, and before Docker 25 keep all of it as ``ContainerConfig``. Instead a *helper*
container (``runner/backends/helpers.py``: held paused so that its filesystem stays mounted,
kept for the next save on the same layers) of an image of exactly the layers the new image
keeps (the version's) is given the planned layer in its upper directory, as hard links to the files where they lie
(``overlay.lay_out``: no byte copied), and the engine commits the helper with the trusted
configuration: the engine makes the layer as fast as its own ``docker commit``. The files are
scanned where they lie meanwhile (GNU grep first, ``overlay.scan_files``), the runtime's
container paused by envctl from the plan to the end (as ``docker commit`` pauses it); a refused
layer's image is removed. The helper's names are taken away again before the container
resumes, and the save's moment for "changed since" (``SavedImage.saved_at_ns``) is taken after
that, since linking changes a file's ctime. A draft is made the same way, keeping every file
(:func:`draft_from_directories`).

Where no helper can be made (no image of exactly the kept layers, or a configuration with
neither command nor entrypoint, which the engine cannot create a container of), the layer is
streamed into the engine (``envs.images.layers.load_layer``). Where the directories cannot be
read, the save is a ``docker commit`` of the runtime's container: every changed file is first
read from the engine (``get_archive``) and scanned, nothing can be left out
(``SavedLayer.lean`` is False), and the image made is given the trusted configuration at once
(``envs.images.layers.reconfigure``), the commit's own image removed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images import docker as engine
from envs.images.config import ImageInfo
from envs.images.docker import daemon_error
from envs.images.layers import load_layer, reconfigure
from envs.images.rewrite import ChunkReader
from envs.kit.errors import EnvctlError
from envs.kit.stopwatch import span
from runner.backends import overlay
from runner.backends.base import PRIVATE_PATHS, Change, LayerObserver
from runner.backends.helpers import Helpers
from runner.backends.pausing import Pausing, paused

log = logging.getLogger("envctl.saves")

#: mount points Docker makes in every runtime container: never part of a layer
MOUNT_POINTS = (*PRIVATE_PATHS, "/usr/sbin/docker-init", "/sbin/docker-init")
_OVERLAY_PARAMETERS = Path("/sys/module/overlay/parameters")
SINCE = ", since the last save"


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
    holder: str | None  # an image of exactly those ``keep`` layers (a helper's), when known
    container: dict[str, Any] | None  # the runtime container's inspection, when just made (its State)


@dataclass(frozen=True)
class SavedImage:
    """The image a save or draft made, what its layer left out, and the moment after which a
    change of the container's files is not in it (taken while it was paused)."""

    info: ImageInfo
    left_out: dict[str, dict[str, int]]
    saved_at_ns: int
    resumed: Callable[[], None]  # waits for the container's resume (``_make``'s ``resume_later``)
    hold: Callable[[], Callable[[], None]]  # keeps the engine work after the resume until answered (pausing.py)


class KeepEverything:
    """The observer of a draft: nothing left out, nothing looked at."""

    def cache_of(self, path: str) -> str | None:
        return None

    def entry(self, path: str, link: str | None = None) -> None:
        return None

    def content(self, path: str, size: int) -> Callable[[bytes], None] | None:
        return None

    def verdict(self) -> None:
        return None

    def allowed(self) -> list[dict[str, Any]]:
        return []


def _layers_of(attrs: dict[str, Any]) -> list[str]:
    return list((attrs.get("RootFS") or {}).get("Layers") or [])


Layout = Callable[[str], dict[str, Any]]  # a container id -> its Id, Image and GraphDriver (DockerBackend.layout)


def _overlay_of(
    client: docker.DockerClient, cid: str, layout: Layout | None
) -> tuple[dict[str, Any], overlay.OverlayLayers] | None:
    container = layout(cid) if layout is not None else client.api.inspect_container(cid)
    layers = overlay.OverlayLayers.from_inspect(container.get("GraphDriver") or {})
    if layers is None or not _whole_files():
        return None
    return container, layers


def layer_roots(
    client: docker.DockerClient, cid: str, version_image: str, saved_at_ns: int = 0, layout: Layout | None = None
) -> LayerPlan | None:
    """The directories of the new layer and the layers the new image keeps, or None when the
    layer cannot be made from the directories. After a save from this container
    (``saved_at_ns``), the new image keeps every layer of the version it saved (when their
    directories can be read) and the layer holds what changed since. ``layout``: the
    container's image and directories as kept by the backend (else it is inspected)."""
    try:
        found = _overlay_of(client, cid, layout)
        if found is None:
            return None
        container, layers = found
        image = str(container["Image"])
        mine = _layers_of(engine.inspect_id(client, image))
        version_attrs = engine.inspect_id(client, version_image)
    except Exception as exc:
        raise daemon_error("inspect the runtime's container", exc) from exc
    version = _layers_of(version_attrs)
    keep = 0
    while keep < min(len(mine), len(version)) and mine[keep] == version[keep]:
        keep += 1
    lowers = layers.lowers
    if keep == 0 or len(lowers) != len(mine) + 1 or not lowers[0].endswith("-init/diff"):
        return None
    roots = [layers.upper, *lowers[1 : 1 + len(mine) - keep]]
    saved = _saved_layers(version_attrs, len(version) - keep) if saved_at_ns else None
    inspected = None if layout is not None else container  # a kept layout has no State to go by
    if saved is None:
        holder = version_image if keep == len(version) else image if keep == len(mine) else None
        return LayerPlan(roots, image, keep, [], holder, inspected)
    return LayerPlan(roots, version_image, len(version), saved, version_image, inspected)


def draft_roots(client: docker.DockerClient, cid: str, layout: Layout | None = None) -> LayerPlan | None:
    """A draft's layer: the container's upper directory whole, on every layer of its image."""
    try:
        found = _overlay_of(client, cid, layout)
        if found is None:
            return None
        container, layers = found
        image = str(container["Image"])
        keep = len(_layers_of(engine.inspect_id(client, image)))
    except Exception as exc:
        raise daemon_error("inspect the runtime's container", exc) from exc
    return LayerPlan([layers.upper], image, keep, [], image, None if layout is not None else container)


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
    helpers: Helpers | None,
    saved_at_ns: int = 0,
    layout: Layout | None = None,
    early: Pausing | None = None,
) -> SavedImage | None:
    """The save's image; None when the directories cannot be used. ``helpers``: the backend's
    (None: the layer is streamed into the engine); ``early``: the container's pause, asked for
    already. The container resumes in the background: ``SavedImage.resumed`` waits for it."""
    action = "save the runtime's filesystem"
    if early is None:
        early = Pausing(client, cid)  # the engine pauses it while its directories are looked up
    try:
        with span("inspect"):
            plan = layer_roots(client, cid, version_image, saved_at_ns, layout)
    except BaseException:
        early.undo()
        raise
    if plan is None:
        early.undo()
        return None
    since = saved_at_ns if plan.saved else 0
    options: dict[str, Any] = {"config": config, "repository": repository, "tag": tag, "helpers": helpers}
    return _make(
        client,
        cid,
        plan,
        observer,
        since=since,
        purpose="save",
        action=action,
        resume_later=True,
        early=early,
        **options,
    )


def draft_from_directories(
    client: docker.DockerClient,
    cid: str,
    *,
    config: dict[str, Any],
    repository: str,
    tag: str,
    helpers: Helpers | None,
    layout: Layout | None = None,
) -> SavedImage | None:
    """A draft's image (every change the container holds); None when the directories cannot be used."""
    plan = draft_roots(client, cid, layout)
    if plan is None:
        return None
    options: dict[str, Any] = {"config": config, "repository": repository, "tag": tag, "helpers": helpers}
    return _make(
        client,
        cid,
        plan,
        KeepEverything(),
        since=0,
        purpose="draft",
        action="snapshot the runtime's filesystem",
        **options,
    )


def _make(
    client: docker.DockerClient,
    cid: str,
    plan: LayerPlan,
    observer: LayerObserver,
    *,
    config: dict[str, Any],
    repository: str,
    tag: str,
    helpers: Helpers | None,
    since: int,
    purpose: str,
    action: str,
    resume_later: bool = False,
    early: Pausing | None = None,
) -> SavedImage:
    helper = None
    if helpers is not None and plan.holder is not None and (config.get("Cmd") or config.get("Entrypoint")):
        try:
            with span("helper-take"):
                helper = helpers.take(plan.holder)  # a kept one, or one made while the container is paused and planned
        except BaseException:
            if early is not None:
                early.undo()
            raise
    try:
        with paused(client, cid, action, plan.container, early) as held:
            with span("plan"):
                layer = overlay.plan_layer(
                    plan.roots, observer, private=is_mount_point, saved_at_ns=since, saved=plan.saved
                )
            if helper is not None:
                info = helper.commit(
                    client, layer, observer, config=config, repository=repository, tag=tag, action=action,
                    taken=held.resume_now if resume_later else None,
                )  # fmt: skip
            else:
                info = load_layer(
                    client,
                    base=plan.base,
                    keep=plan.keep,
                    layer_size=layer.tar_size(),
                    layer=overlay.layer_chunks(layer, observer),
                    ready=observer.verdict,
                    config=config,
                    created=str(config.get("Labels", {}).get("org.opencontainers.image.created") or now()),
                    created_by=f"envctl {purpose} ({len(layer.entries)} entries{SINCE if since else ''})",
                    repository=repository,
                    tag=tag,
                    action=action,
                )
            # still paused, the layer taken away: what it held is in the image
            saved_at = held.taken_ns or time.time_ns()
            if resume_later:
                held.resume_later()
    except BaseException:
        if helper is not None and helpers is not None:
            helpers.discard(helper)
        raise
    if helper is not None and helpers is not None:
        # after the resume: a helper started or removed meanwhile would keep the engine from it
        kept, made = helper, info.id
        held.then(lambda: helpers.give_back(kept))  # for the next save on the same layers
        if purpose == "save":  # and one for this runtime's next save, on the new version
            held.then(lambda: helpers.prepare(made, cid))
    return SavedImage(info, layer.left_out, saved_at, held.wait, held.hold)


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
    paused from the first read to the commit's end. The image is given ``config`` exactly."""
    action = "save the runtime's filesystem"
    with paused(client, cid, action):
        for change in changes():  # listed while paused: nothing new slips in unscanned
            if change.kind != "deleted":
                _scan_path(client, cid, change.path, observer)
        observer.verdict()
        return commit_reconfigured(client, cid, config=config, repository=repository, tag=tag, action=action)


def commit_reconfigured(
    client: docker.DockerClient, cid: str, *, config: dict[str, Any], repository: str, tag: str, action: str
) -> ImageInfo:
    """``docker commit`` of the (paused or exited) container, then the same layers under
    ``config`` exactly; the commit's own image (with what it took from the container) removed."""
    raw, given = engine.commit_unchecked(
        client, cid, config=config, repository=repository, tag=tag, pause=False, action=action
    )
    try:
        return reconfigure(client, raw, config=given, repository=repository, tag=tag, action=action)
    finally:
        with contextlib.suppress(EnvctlError):
            engine.remove_image(client, raw)


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
