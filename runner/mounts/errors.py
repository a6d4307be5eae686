"""Errors of mounts."""

from __future__ import annotations

from envs.kit.errors import EnvctlError, NotFoundError


class VolumeNotFoundError(NotFoundError):
    code = "volume_not_found"


class VolumeInUseError(EnvctlError):
    code = "volume_in_use"
    status = 409


class VolumeExistsError(EnvctlError):
    code = "volume_exists"
    status = 409


class MountFetchError(EnvctlError):
    """A mount's source could not be fetched at boot (git clone, S3 download)."""

    code = "mount_fetch_failed"
    status = 502
