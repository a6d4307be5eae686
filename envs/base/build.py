"""Building the base images: reuse what was built from the same recipe, else build and check.

``build`` loads the family (``envs.base.hierarchy``), then for each image in order, parents
first: an image already carrying the same recipe digest (and, for a child, continuing its
parent's current layers) is reused; otherwise a root is made with debootstrap
(``envs.base.rootfs``) and a child by running its steps (``envs.base.child``). A new image must
have exactly its trusted configuration (``envs.images.config``) and record nothing of a build
container; then the ``verify`` scripts of it and its ancestors run inside it. A failure
removes the new image. Every image is labelled ``envctl.base-image``, ``envctl.recipe-digest``
and ``envctl.parent-image`` and tagged ``envctl-base/<name>:<12 hex of the digest>``.

Nothing here pulls an image. Builds of one recipe digest are serialized between processes on
this machine by a lock file in the temp directory (a second builder waits, then reuses).
Among several images with one digest, reuse picks the one already tagged, else the newest; a
child is reused only when its layers continue its parent's current image, and an image made on
top of another one with the same digest (a commit of a base image's container keeps its labels)
is never taken for the base image.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker

from envs.base.child import build_child
from envs.base.hierarchy import (
    LABEL_DIGEST,
    LABEL_IMAGE,
    Recipe,
    build_labels,
    build_order,
    default_recipes_dir,
    image_config,
    lineage,
    load_hierarchy,
    repository_tag,
    spec_of,
)
from envs.base.host import check_mirror, default_extra_ca_certs, default_mirror, read_extra_ca_certs
from envs.base.progress import BuildEvent, OutputStream, Progress, no_progress
from envs.base.recipes import VERIFY_FILE
from envs.base.rootfs import build_root
from envs.images import docker as images
from envs.images.config import recorded_container
from envs.kit.errors import BackendError, EnvctlError

_VERIFY_TIMEOUT = 600  # seconds


@dataclass(frozen=True)
class BuiltImage:
    name: str
    parent: str | None
    image_id: str
    recipe_digest: str
    size: int
    reused: bool


def build(
    names: list[str] | None,
    *,
    mirror: str | None = None,
    client: docker.DockerClient | None = None,
    recipes_dir: Path | None = None,
    progress: Progress | None = None,
    verify: bool = True,
    extra_ca_certs: Sequence[str | Path] | None = None,
) -> list[BuiltImage]:
    """Build (or reuse) the named base images and their ancestors, parents first.

    ``extra_ca_certs`` are the CA files and folders a root image trusts besides Debian's
    (default: the ``base.extra_ca_certs`` setting). Returns one BuiltImage per image in build
    order, ancestors included. Invalid input (unknown name, bad mirror, broken recipe, bad
    certificate) raises InvalidInputError before Docker is called; a failed debootstrap,
    update-ca-certificates, apt step, import, commit or verify raises BackendError.
    """
    mirror = check_mirror(mirror) if mirror else default_mirror()
    certs = read_extra_ca_certs(default_extra_ca_certs() if extra_ca_certs is None else extra_ca_certs)
    recipes = load_hierarchy(recipes_dir or default_recipes_dir(), mirror, certs)
    order = build_order(recipes, names)
    client = client or images.connect()
    emit = progress or no_progress
    built: dict[str, BuiltImage] = {}
    for recipe in order:
        parent_id = built[recipe.parent].image_id if recipe.parent else None
        built[recipe.name] = _build_one(client, recipes, recipe, parent_id, mirror, emit, verify)
    return [built[recipe.name] for recipe in order]


def verify_image(
    recipes: Mapping[str, Recipe],
    name: str,
    image: str,
    *,
    client: docker.DockerClient | None = None,
    progress: Progress | None = None,
) -> None:
    """Run the ``verify`` script of ``name`` and of each of its ancestors inside ``image``.

    Each runs as the main process of a fresh container (no network, label envctl.build=1,
    always removed). Raises BackendError with the script's last output lines on failure.
    """
    client = client or images.connect()
    emit = progress or no_progress
    for link in lineage(recipes, name):
        script = link.directory / VERIFY_FILE
        if not script.is_file():
            emit(BuildEvent(name, "verify", f"{link.name} has no verify script; skipped"))
            continue
        _run_verify(client, name, link.name, script, image, emit)


def _build_one(
    client: docker.DockerClient,
    recipes: Mapping[str, Recipe],
    recipe: Recipe,
    parent_id: str | None,
    mirror: str,
    emit: Progress,
    verify: bool,
) -> BuiltImage:
    reused = _reuse(client, recipe, parent_id, emit)
    if reused is not None:
        return reused
    first_phase = "debootstrap" if recipe.parent is None else "step"
    with _build_lock(recipe, first_phase, emit):
        # Another process may have built it while we waited for the lock.
        reused = _reuse(client, recipe, parent_id, emit)
        if reused is not None:
            return reused
        return _build_new(client, recipes, recipe, parent_id, mirror, emit, verify)


def _reuse(client: docker.DockerClient, recipe: Recipe, parent_id: str | None, emit: Progress) -> BuiltImage | None:
    existing = _find_image(client, recipe, parent_id)
    if existing is None:
        return None
    image_id, size = existing
    emit(BuildEvent(recipe.name, "reuse", f"{image_id[:19]} has recipe digest {recipe.digest[:19]}"))
    return BuiltImage(recipe.name, recipe.parent, image_id, recipe.digest, size, reused=True)


@contextlib.contextmanager
def _build_lock(recipe: Recipe, phase: str, emit: Progress) -> Iterator[None]:
    """Serialize builds of one recipe digest between processes on this machine."""
    locks = Path(tempfile.gettempdir()) / "envctl-base-locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    path = locks / f"{recipe.digest[7:23]}.lock"
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit(BuildEvent(recipe.name, phase, "waiting for another build of this recipe"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_new(
    client: docker.DockerClient,
    recipes: Mapping[str, Recipe],
    recipe: Recipe,
    parent_id: str | None,
    mirror: str,
    emit: Progress,
    verify: bool,
) -> BuiltImage:
    started = time.monotonic()
    config = image_config(recipes, recipe)
    spec = spec_of(recipe)
    if recipe.parent is None:
        image_id = build_root(client, recipe, spec, config, mirror, emit)
    else:
        assert parent_id is not None
        image_id = build_child(client, recipe, spec, config, parent_id, emit)
    try:
        info = images.verify_config(client, image_id, config, action=f"build base image {recipe.name}")
        leftover = recorded_container(images.inspect(client, image_id) or {})
        if leftover:
            raise BackendError(
                f"{recipe.name}: the built image records a build container's configuration",
                details={"container_config": leftover},
            )
        if verify:
            verify_image(recipes, recipe.name, image_id, client=client, progress=emit)
    except BaseException:
        with contextlib.suppress(EnvctlError):
            images.remove_image(client, image_id, force=True)
        raise
    seconds = time.monotonic() - started
    emit(BuildEvent(recipe.name, "done", f"{image_id[:19]} {info.size / 1e6:.1f} MB in {seconds:.0f} s"))
    return BuiltImage(recipe.name, recipe.parent, image_id, recipe.digest, info.size, reused=False)


def _find_image(client: docker.DockerClient, recipe: Recipe, parent_id: str | None) -> tuple[str, int] | None:
    """The newest image with ``recipe``'s digest, and for a child built on ``parent_id``.

    A child image built on an earlier image of the same parent recipe (the parent was removed
    and rebuilt: debootstrap output is not byte-reproducible) is not reused: its layers
    would not continue the parent's.
    """
    with images.engine_call(f"list the images of {recipe.name}"):
        found = client.api.images(filters={"label": f"{LABEL_DIGEST}={recipe.digest}"})
    # Only a base image itself: never an image made on top of one that kept its labels
    # (a save or a draft of an older envctl), which would be "the newest with this digest".
    found = [
        i
        for i in found
        if (i.get("Labels") or {}).get(LABEL_IMAGE) == recipe.name
        and not {"envctl.environment", "envctl.draft-of"} & set(i.get("Labels") or {})
    ]
    # A base image is one layer on its parent's (the root: one layer). An image with more was
    # made from one (someone's commit of a base image's container keeps its labels).
    parent_layers = _layers(client, parent_id) if parent_id is not None else []
    found = [
        i
        for i in found
        if (layers := _layers(client, i["Id"]))[: len(parent_layers)] == parent_layers
        and len(layers) == len(parent_layers) + 1
    ]
    if not found:
        return None
    repository, tag = repository_tag(recipe)
    tagged = [i for i in found if f"{repository}:{tag}" in (i.get("RepoTags") or [])]
    newest = tagged[0] if tagged else max(found, key=lambda i: i.get("Created") or 0)
    if f"{repository}:{tag}" not in (newest.get("RepoTags") or []):
        with images.engine_call(f"tag {newest['Id'][:19]} as {repository}:{tag}"):
            client.api.tag(newest["Id"], repository, tag)
    return newest["Id"], int(newest.get("Size") or 0)


def _layers(client: docker.DockerClient, image_id: str) -> list[str]:
    attrs = images.inspect(client, image_id)
    if attrs is None:
        raise BackendError(f"the image {image_id[:19]} vanished while base images were being built")
    return list(attrs["RootFS"]["Layers"])


def _run_verify(
    client: docker.DockerClient,
    image_name: str,
    owner: str,
    script: Path,
    image: str,
    emit: Progress,
) -> None:
    target = f"/tmp/envctl-verify-{owner}"
    emit(BuildEvent(image_name, "verify", f"running {owner}/verify"))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        data = script.read_bytes()
        entry = tarfile.TarInfo(Path(target).name)
        entry.size, entry.mode, entry.mtime = len(data), 0o755, int(time.time())
        tar.addfile(entry, io.BytesIO(data))
    container_id = None
    stream = OutputStream(image_name, "verify", emit, prefix=f"{owner}/verify: ")
    try:
        with images.engine_call(f"run {owner}/verify in {image_name}"):
            container_id = client.api.create_container(
                image,
                command=[target],
                labels=build_labels(image_name),
                name=f"envctl-verify-{image_name}-{uuid.uuid4().hex[:8]}",
                host_config=client.api.create_host_config(network_mode="none"),
            )["Id"]
            client.api.put_archive(container_id, "/tmp", archive.getvalue())
            client.api.start(container_id)
            code = client.api.wait(container_id, timeout=_VERIFY_TIMEOUT)["StatusCode"]
            stream.feed(client.api.logs(container_id, stdout=True, stderr=True))
            stream.close()
    finally:
        if container_id is not None:
            images.remove_container(client, container_id, f"remove the verify container of {image_name}")
    if code != 0:
        raise BackendError(
            f"{image_name}: {owner}/verify failed in image {image[:19]} (exit {code}):\n{stream.text()}",
            details={"script": str(script), "exit_code": code},
        )
