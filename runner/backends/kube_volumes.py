"""Named volumes as PersistentVolumeClaims (split out of ``kube.py``; storage class from
``ENVCTL_KUBE_STORAGE_CLASS``): made, listed and removed by the installation's label only."""

from __future__ import annotations

import contextlib
from typing import Any

from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from runner.backends import kube_pods
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED, VolumeFound
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watches import SYNC_WAIT, Watches


def ensure_volume(api: KubeApi, name: str, labels: dict[str, str], storage_class: str, size: str) -> None:
    claim = kube_pods.claim_name(name)
    found = api.read_claim(claim)
    inst = kube_pods.label_value(labels.get(LABEL_INSTALLATION, ""))
    if found is not None:
        if ((found.get("metadata") or {}).get("labels") or {}).get(LABEL_INSTALLATION) != inst:
            raise InvalidInputError(
                f"a PersistentVolumeClaim {claim} exists and is not this installation's", field="mounts"
            )
        return
    with contextlib.suppress(ConflictError):
        api.create_claim(kube_pods.volume_claim(name, labels, storage_class, size))


def list_volumes(api: KubeApi, installation: str) -> list[VolumeFound]:
    sel = kube_pods.selector({LABEL_INSTALLATION: kube_pods.label_value(installation), LABEL_MANAGED: "volume"})
    out = []
    for c in api.list_claims(sel):
        meta = c.get("metadata") or {}
        source = str((meta.get("annotations") or {}).get(kube_pods.ANNOTATION_SOURCE) or meta.get("name"))
        out.append(VolumeFound(source, dict(meta.get("labels") or {}), str(meta.get("creationTimestamp") or "")))
    return out


def remove_volume(api: KubeApi, name: str, installation: str, watches: Watches) -> None:
    claim = kube_pods.claim_name(name)
    found = api.read_claim(claim)
    if found is None:
        return
    labels = (found.get("metadata") or {}).get("labels") or {}
    if labels.get(LABEL_INSTALLATION) != kube_pods.label_value(installation):
        return
    pods: dict[str, Any]
    try:
        pods = watches.pods.items(wait=SYNC_WAIT)
    except BackendError:
        pods = {}
    for pod in pods.values():
        for vol in (pod.get("spec") or {}).get("volumes") or []:
            if (vol.get("persistentVolumeClaim") or {}).get("claimName") == claim:
                raise ConflictError(f"the volume {name} is in use by pod {pod['metadata']['name']}")
    api.delete_claim(claim)
