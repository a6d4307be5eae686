"""What a boot does with a runtime's mounts, before its container is made.

The stored mounts are checked again (R28, R29: a setting or a DNS answer may have changed
since they were stored), then each is made ready, the runtime's phase going from
``preparing-download`` to ``downloading``:

- git: the commit the ref names, from the shared cache (runner/mounts/git.py), bound read-only;
- s3: the prefix's objects from the ETag-aware cache (runner/mounts/s3.py), bound read-only,
  or a copy of the runtime's own, read-write, when written back on stop;
- volume: the installation's Docker volume for the owner's named volume, made when missing
  (runner/mounts/named_volumes.py names it);

(a backend without ``host_paths``, Swarm, gets the git and S3 trees streamed into the runtime
once its agent answers: runner/mounts/streamed.py; a written-back S3 mount is refused there);

and what was mounted (the commit; the ETags; the volume) is returned, to be kept on the runtime and
copied onto every execution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from envs.kit.errors import InvalidInputError
from runner.backends.base import MountBind, RuntimeBackend
from runner.mounts.errors import MountFetchError
from runner.mounts.git import GitCache
from runner.mounts.named_volumes import volume_labels, volume_name
from runner.mounts.s3 import S3Cache
from runner.mounts.validate import GitMount, Mount, S3Mount, VolumeMount, check_mounts, from_json
from runner.settings import Settings

Report = Callable[[str, tuple[int, int] | None], None]  # (phase, (bytes done, bytes to fetch) or None)
PREPARING = "preparing-download"
DOWNLOADING = "downloading"


class MountPreparer:
    def __init__(self, settings: Settings, installation: str, backend: RuntimeBackend) -> None:
        self.settings = settings
        self.installation = installation
        self.backend = backend
        self.git = GitCache(settings.data_dir / "mounts" / "git", allow_hosts=settings.mounts_allow_hosts)
        self.s3 = S3Cache(settings.data_dir / "mounts", settings.mounts_s3_endpoint_url, settings.mounts_s3_region)

    def prepare(
        self, stored: Sequence[Mapping[str, Any]], owner_id: str, runtime_id: str, report: Report
    ) -> tuple[list[MountBind], list[dict[str, Any]]]:
        """The binds to give the container and the record of what they hold. ``report`` hears
        the phase and, while downloading, the bytes done and to fetch."""
        if not stored:
            return [], []
        report(PREPARING, None)
        mounts = check_mounts(list(stored), allow_hosts=self.settings.mounts_allow_hosts)
        for i, m in enumerate(mounts):
            if isinstance(m, S3Mount) and m.writeback and not self.backend.host_paths:
                raise InvalidInputError(
                    f"mounts[{i}]: an S3 mount written back on stop (writeback) is not available on the "
                    f"{self.backend.name} backend yet; mount it read-only or use a named volume",
                    field=f"mounts[{i}].writeback",
                )
        try:
            return self._prepare(mounts, owner_id, runtime_id, report)
        except OSError as exc:  # the data directory: full, unwritable
            raise MountFetchError(f"the mounts could not be made ready: {exc}") from exc

    def _prepare(
        self, mounts: list[Mount], owner_id: str, runtime_id: str, report: Report
    ) -> tuple[list[MountBind], list[dict[str, Any]]]:
        binds: list[MountBind] = []
        used: list[dict[str, Any]] = []
        for mount in mounts:
            if isinstance(mount, GitMount):
                report(DOWNLOADING, None)
                tree, commit = self.git.prepare(mount)
                binds.append(MountBind(mount.target, str(tree), "bind", read_only=True))
                used.append(
                    {"type": "git", "target": mount.target, "url": mount.url, "ref": mount.ref, "commit": commit}
                )
            elif isinstance(mount, VolumeMount):
                name = volume_name(self.installation, owner_id, mount.name)
                labels = volume_labels(self.installation, owner_id, mount.name)
                self.backend.ensure_volume(name, labels)
                binds.append(
                    MountBind(mount.target, name, "volume", read_only=mount.read_only, labels=tuple(labels.items()))
                )
                used.append({"type": "volume", "target": mount.target, "name": mount.name})
            else:
                assert isinstance(mount, S3Mount)
                files, record = self.s3.prepare(mount, lambda done, total: report(DOWNLOADING, (done, total)))
                if mount.writeback:
                    files = self.s3.writable_copy(mount, files, runtime_id)
                binds.append(MountBind(mount.target, str(files), "bind", read_only=not mount.writeback))
                used.append(
                    {"type": "s3", "target": mount.target, "bucket": mount.bucket, "prefix": mount.prefix, **record}
                )
        return binds, used

    def write_back(self, stored: Sequence[Mapping[str, Any]], runtime_id: str) -> list[str]:
        """On stop: the S3 mounts asked to be written back upload what the runtime changed;
        the keys uploaded."""
        uploaded: list[str] = []
        for mount in from_json(stored):
            if isinstance(mount, S3Mount) and mount.writeback:
                uploaded += self.s3.write_back(mount, runtime_id)
        return uploaded

    def forget(self, runtime_id: str) -> None:
        """A deleted runtime's own copies of its write-back mounts go."""
        self.s3.forget(runtime_id)


def mounted_note(used: Sequence[Mapping[str, Any]]) -> str:
    """What a boot mounted, for the runner log."""
    parts = []
    for u in used:
        if u["type"] == "git":
            parts.append(f"{u['target']}: git {u['url']} at {u['commit'][:12]}")
        elif u["type"] == "s3":
            parts.append(
                f"{u['target']}: s3://{u['bucket']}/{u['prefix']}, {u['objects']} objects, "
                f"{u['downloaded']} of {u['bytes']} bytes downloaded"
            )
        else:
            parts.append(f"{u['target']}: volume {u['name']}")
    return "mounted " + "; ".join(parts)
