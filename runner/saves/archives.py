"""Export a version with its lineage to an archive, and load such an archive into envctl."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from envs import archive
from envs import service as envs_service
from envs.errors import ArchiveError
from envs.kit.db import Database
from envs.kit.errors import BackendError, EnvctlError
from envs.models import EnvironmentVersion
from registry import visibility
from registry.visibility import Reader
from runner.backends.base import RuntimeBackend
from runner.saves.snapshots import writer_of

log = logging.getLogger("envctl.archives")

# The labels a save records that name or point at its parent (runner/saves/snapshots.py): left out of
# an export's metadata when the parent is one its reader may not see.
PARENT_LABELS = frozenset(
    {"envctl.parent", "org.opencontainers.image.base.name", "org.opencontainers.image.base.digest"}
)


class Archives:
    def __init__(self, db: Database, backend: RuntimeBackend, scratch_dir: Path) -> None:
        self.db = db
        self.backend = backend
        self.scratch_dir = scratch_dir

    def scratch(self) -> Path:
        d = self.scratch_dir
        d.mkdir(parents=True, exist_ok=True)
        return d

    def export(self, ref: str, reader: Reader) -> Path:
        """Write the archive of ``ref`` (and its lineage) to a temporary file; the caller
        streams it and removes it. ``ref`` is resolved for ``reader`` (``registry/visibility.py``),
        and the lineage in the archive stops above the first version they may not see: its
        layers travel inside the child's image, its name, message and author do not."""
        with self.db.session() as s:
            version = visibility.resolve(s, ref, reader, "ref")
            whole = envs_service.lineage(s, version)
            seen = next((n for n, v in enumerate(whole) if not visibility.sees(s, v, reader)), len(whole))
            versions = [_describe(v) for v in whole[:seen]]
            if seen < len(whole):  # the last one shown stands on a hidden one: no parent named
                shown = versions[-1]
                labels = {k: v for k, v in shown["labels"].items() if k not in PARENT_LABELS}
                shown.update(parent=None, parent_image_id=None, labels=labels)
            exported = version.ref
        images = list(dict.fromkeys(v["image_id"] for v in versions))
        for image in images:
            if self.backend.image_info(image) is None:
                raise BackendError(f"the image {image[:19]} of {exported}'s lineage is not in the container engine")
        scratch = self.scratch()
        with tempfile.NamedTemporaryFile(dir=scratch, suffix=".docker.tar", delete=False) as raw:
            raw_path = Path(raw.name)
        out_path = raw_path.with_suffix(".envctl.tar")
        try:
            self.backend.save_images(images, raw_path)
            with open(out_path, "wb") as out:
                archive.write_oci(
                    raw_path,
                    images,
                    {"exported": exported, "versions": versions},
                    {v["image_id"]: v["ref"] for v in versions},
                    out,
                )
        except BaseException:
            out_path.unlink(missing_ok=True)
            raise
        finally:
            raw_path.unlink(missing_ok=True)
        return out_path

    def load(self, path: Path, user_id: str) -> list[dict[str, Any]]:
        """Check an archive, load its images, and record its versions with their lineage.

        Loading versions into an environment is writing to it: refused (403) before any image
        is loaded unless ``user_id`` owns it or is an admin. Environments the load makes are
        theirs; versions already present (a lineage's base images) are no writes.
        """
        checked = archive.check(path)
        with self.db.session() as s:
            writer = writer_of(s, user_id)
            for v in checked.meta["versions"]:
                env = envs_service.get_environment(s, str(v.get("environment", "")))
                if env is not None and not any(x.digest == v.get("digest") for x in env.versions):
                    envs_service.check_write(
                        env, writer, "load versions into it", "ask its owner or an admin to load this archive"
                    )
        backend = self.backend
        present = {image for image in checked.images if backend.image_info(image) is not None}
        try:
            self._load_images(path, checked)
            for image_id in checked.images:
                if backend.image_info(image_id) is None:
                    raise BackendError(f"after loading, the image {image_id[:19]} is not in the engine")
            return self._record(checked, writer)
        except BaseException:
            for image_id in set(checked.images) - present:  # nothing of a failed load stays behind
                try:
                    backend.remove_image(image_id)
                except EnvctlError as exc:
                    log.warning("could not remove image %s of a failed load: %s", image_id[:19], exc.message)
            raise

    def _load_images(self, path: Path, checked: archive.Checked) -> None:
        """Hand the checked archive to the engine in ``docker load`` form. A refusal by an
        engine that answers is about the archive (422, in the engine's words); one that does
        not answer is a 503."""
        fd, name = tempfile.mkstemp(dir=self.scratch(), suffix=".docker.tar")
        docker_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                archive.docker_archive(path, checked, out)
            try:
                self.backend.load_images(docker_path)
            except BackendError as exc:
                try:
                    self.backend.ping()
                except EnvctlError:
                    raise exc from None
                raise ArchiveError(
                    f"archive: the container engine refused its images: {exc.message}", field="archive"
                ) from exc
        finally:
            docker_path.unlink(missing_ok=True)

    def _record(self, checked: archive.Checked, writer: envs_service.Writer) -> list[dict[str, Any]]:
        loaded: list[dict[str, Any]] = []
        by_image: dict[str, EnvironmentVersion] = {}
        with self.db.session() as s:
            for v in reversed(checked.meta["versions"]):  # base first, so parents exist
                parent = by_image.get(v.get("parent_image_id") or "")
                env = envs_service.get_environment(s, v["environment"])
                version, created = envs_service.register_version(
                    s,
                    envs_service.NewVersion(
                        environment=v["environment"],
                        image_id=v["image_id"],
                        digest=v["digest"],
                        image_ref=v["image_id"],
                        parent=parent,
                        message=v.get("message", ""),
                        author=v.get("author", ""),
                        size=int(v.get("size", 0)),
                        size_added=int(v.get("size_added", 0)),
                        source_runtime_id=v.get("source_runtime_id"),
                        labels=v.get("labels") or {},
                        tag="latest" if env is None or not env.tags else None,
                    ),
                    writer,
                )
                by_image[v["image_id"]] = version
                loaded.append({"ref": version.ref, "exported_as": v["ref"], "digest": version.digest, "new": created})
        return list(reversed(loaded))


def _describe(v: EnvironmentVersion) -> dict[str, Any]:
    return {
        "ref": v.ref,
        "environment": v.environment.full_name,
        "number": v.number,
        "digest": v.digest,
        "image_id": v.image_id,
        "parent": v.parent.ref if v.parent else None,
        "parent_image_id": v.parent.image_id if v.parent else None,
        "message": v.message,
        "author": v.author,
        "created_at": v.created_at.isoformat(),
        "size": v.size,
        "size_added": v.size_added,
        "source_runtime_id": v.source_runtime_id,
        "labels": v.labels or {},
    }
