"""What a boot does with a runtime's mounts, before its container is made.

The stored mounts are checked again (R28, R29: a setting or a DNS answer may have changed
since they were stored), then each is made ready, the runtime's phase going from
``preparing-download`` to ``downloading``:

- git: the commit the ref names, from the shared cache (runner/mounts/git.py), bound read-only;
- volume: the installation's Docker volume for the owner's named volume, made when missing
  (runner/mounts/volumes.py names it);

and what was mounted (the commit; the volume) is returned, to be kept on the runtime and
copied onto every execution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from envs.kit.config import Settings
from runner.backends.base import MountBind, RuntimeBackend
from runner.mounts.errors import MountFetchError
from runner.mounts.git import GitCache
from runner.mounts.validate import GitMount, S3Mount, VolumeMount, check_mounts
from runner.mounts.volumes import volume_labels, volume_name

PREPARING = "preparing-download"
DOWNLOADING = "downloading"


class MountPreparer:
    def __init__(self, settings: Settings, installation: str, backend: RuntimeBackend) -> None:
        self.settings = settings
        self.installation = installation
        self.backend = backend
        self.git = GitCache(settings.data_dir / "mounts" / "git", allow_hosts=settings.mounts_allow_hosts)

    def prepare(
        self, stored: Sequence[Mapping[str, Any]], owner_id: str, phase: Callable[[str], None]
    ) -> tuple[list[MountBind], list[dict[str, Any]]]:
        """The binds to give the container and the record of what they hold."""
        if not stored:
            return [], []
        phase(PREPARING)
        mounts = check_mounts(list(stored), allow_hosts=self.settings.mounts_allow_hosts)
        binds: list[MountBind] = []
        used: list[dict[str, Any]] = []
        for mount in mounts:
            if isinstance(mount, GitMount):
                phase(DOWNLOADING)
                tree, commit = self.git.prepare(mount)
                binds.append(MountBind(mount.target, str(tree), "bind", read_only=True))
                used.append(
                    {"type": "git", "target": mount.target, "url": mount.url, "ref": mount.ref, "commit": commit}
                )
            elif isinstance(mount, VolumeMount):
                name = volume_name(self.installation, owner_id, mount.name)
                self.backend.ensure_volume(name, volume_labels(self.installation, owner_id, mount.name))
                binds.append(MountBind(mount.target, name, "volume", read_only=mount.read_only))
                used.append({"type": "volume", "target": mount.target, "name": mount.name})
            else:
                assert isinstance(mount, S3Mount)
                raise MountFetchError(
                    f"mounts: S3 mounts ({mount.bucket}) are not available in this version",
                    details={"field": "mounts", "bucket": mount.bucket},
                )
        return binds, used
