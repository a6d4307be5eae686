"""The trusted image configuration of a save or a draft (R10).

A snapshot's configuration is never the container's (a plain ``docker commit`` copies the
container's environment, secrets included): it is the parent version's own configuration plus
envctl's labels and OCI annotations (``envs.images.config.child_config``, shared with base-image
builds). The labels that say what a container *is* (its runtime, runner, installation) are
given empty values: the engine merges a container's labels back into a commit.
"""

from __future__ import annotations

from typing import Any

from envs.images.config import CONFIG_KEYS, child_config
from envs.kit.errors import BackendError
from runner.backends.base import (
    LABEL_INSTALLATION,
    LABEL_MACHINE,
    LABEL_MANAGED,
    LABEL_RUNNER,
    LABEL_RUNTIME,
    RuntimeBackend,
)

__all__ = ["CONFIG_KEYS", "CONTAINER_LABELS_CLEARED", "trusted_config"]

#: a container's own labels, neutralised in every image made from one
CONTAINER_LABELS_CLEARED = {
    LABEL_RUNTIME: "",
    LABEL_RUNNER: "",
    LABEL_INSTALLATION: "",
    LABEL_MANAGED: "",
    LABEL_MACHINE: "",
}


def trusted_config(
    backend: RuntimeBackend, parent_image: str, parent_ref: str, labels: dict[str, str]
) -> dict[str, Any]:
    """The configuration for a child of the version ``parent_ref`` (image ``parent_image``)."""
    info = backend.image_info(parent_image)
    if info is None:
        raise BackendError(
            f"the image of {parent_ref} ({parent_image[:19]}) is not in the container engine",
            details={"version": parent_ref},
        )
    return child_config(info.config, {**CONTAINER_LABELS_CLEARED, **labels})
