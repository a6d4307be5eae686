"""Named persistent volumes: a home for data that outlives runtimes.

A runtime's ``{"type": "volume", "name": "data", ...}`` mount is the Docker volume
``envctl-vol-<installation>-<owner>-<name>``, made at the first boot that uses it and labelled
with the installation, the owner and the name. Reset and deletion of runtimes never remove it;
volumes without this installation's label are never touched (runner/backends/docker.py).
"""

from __future__ import annotations

import hashlib

from runner.backends.base import LABEL_INSTALLATION

LABEL_VOLUME_OWNER = "envctl.volume-owner"
LABEL_VOLUME_NAME = "envctl.volume-name"


def volume_name(installation: str, owner_id: str, name: str) -> str:
    """The engine's name of an owner's volume (Docker's name rules hold: the parts are checked
    ids and names; the installation is shortened by hashing)."""
    inst = hashlib.sha256(installation.encode()).hexdigest()[:12]
    return f"envctl-vol-{inst}-{owner_id}-{name}"


def volume_labels(installation: str, owner_id: str, name: str) -> dict[str, str]:
    return {LABEL_INSTALLATION: installation, LABEL_VOLUME_OWNER: owner_id, LABEL_VOLUME_NAME: name}
