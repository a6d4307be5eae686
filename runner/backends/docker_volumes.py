"""Docker volumes of runtime mounts (runner/mounts/named_volumes.py names them): made with the
installation's labels, listed and removed only when they carry them."""

from __future__ import annotations

from typing import Any

import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import ConflictError, InvalidInputError
from runner.backends.base import LABEL_INSTALLATION, VolumeFound


def ensure(client: Any, name: str, labels: dict[str, str]) -> None:
    """Make the volume unless it exists carrying the same installation label; refuse one that
    exists without it (it is someone else's: left alone)."""
    try:
        try:
            found = client.api.inspect_volume(name)
        except docker.errors.NotFound:
            client.api.create_volume(name, labels=labels)
            return
    except Exception as exc:
        raise daemon_error("make the runtime's volume", exc) from exc
    if (found.get("Labels") or {}).get(LABEL_INSTALLATION) != labels.get(LABEL_INSTALLATION):
        raise InvalidInputError(
            f"mounts: the Docker volume {name} exists but is not this installation's; it is left alone",
            field="mounts",
        )


def listed(client: Any, installation: str) -> list[VolumeFound]:
    try:
        found = client.api.volumes(filters={"label": [f"{LABEL_INSTALLATION}={installation}"]})
    except Exception as exc:
        raise daemon_error("list the volumes", exc) from exc
    return [
        VolumeFound(str(v["Name"]), dict(v.get("Labels") or {}), str(v.get("CreatedAt") or ""))
        for v in (found or {}).get("Volumes") or []
    ]


def remove(client: Any, name: str, installation: str) -> None:
    try:
        try:
            found = client.api.inspect_volume(name)
        except docker.errors.NotFound:
            return
        if (found.get("Labels") or {}).get(LABEL_INSTALLATION) != installation:
            return  # not this installation's: left alone
        client.api.remove_volume(name)
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise ConflictError(
                f"the volume {name} is in use by a container; stop the runtimes that mount it first",
                details={"volume": name},
            ) from exc
        raise daemon_error("remove the volume", exc) from exc
    except Exception as exc:
        raise daemon_error("remove the volume", exc) from exc
