"""The trusted image configuration of a save or a draft (R10).

A snapshot's configuration is never the container's (a plain ``docker commit`` copies the
container's environment, secrets included): it is the parent version's own configuration plus
envctl's labels and OCI annotations. The engine merges the container's labels back into a
commit, so the labels that say what a container *is* (its runtime, runner, installation) are
given empty values here.
"""

from __future__ import annotations

from typing import Any

from envs.kit.errors import BackendError
from runner.backends.base import (
    LABEL_INSTALLATION,
    LABEL_MACHINE,
    LABEL_MANAGED,
    LABEL_RUNNER,
    LABEL_RUNTIME,
    RuntimeBackend,
)

CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")

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
    base = info.config
    config: dict[str, Any] = {key: base.get(key) for key in CONFIG_KEYS}
    # The parent's own labels carry over (a base image's OCI labels, a team's labels), but not
    # envctl's: those say what an image *is* (a base image of a recipe, a draft, a version)
    # and belong to the parent alone; they are emptied, not left out (the engine merges).
    parent_labels = base.get("Labels") or {}
    inherited = {k: v for k, v in parent_labels.items() if not k.startswith("envctl.")}
    neutral = {k: "" for k in parent_labels if k.startswith("envctl.")}
    config["Labels"] = {**inherited, **neutral, **CONTAINER_LABELS_CLEARED, **labels}
    return config
