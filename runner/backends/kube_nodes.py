"""The cluster's nodes for ``GET /nodes`` and a drain (split out of ``kube.py``): the nodes
with the installation's runtimes on them, and a node cordoned or uncordoned."""

from __future__ import annotations

from typing import Any

from envs.kit.errors import InvalidInputError
from runner.backends import kube_states
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watches import SYNC_WAIT, Watches
from runner.errors import NodeNotFoundError


def nodes_view(watches: Watches) -> list[dict[str, Any]]:
    nodes = watches.nodes.items(wait=SYNC_WAIT)
    pods = watches.pods.items(wait=SYNC_WAIT)
    return kube_states.nodes_view(list(nodes.values()), list(pods.values()))


def set_availability(api: KubeApi, name: str, availability: str) -> dict[str, Any]:
    """Cordon (``pause``, ``drain``: ``spec.unschedulable``) or uncordon (``active``) the
    node; the node as it was, in the shape ``runner/runtimes/drain.py`` reads. What a drain
    then stops is this runner's runtimes only (with their drafts); unlike Swarm's ``drain``
    nothing else is evicted: other workloads on the node are the cluster's (``kubectl
    drain``) and other installations' business."""
    if availability not in kube_states.AVAILABILITIES:
        raise InvalidInputError(
            f"availability must be one of {', '.join(kube_states.AVAILABILITIES)}, not {availability!r}",
            field="availability",
        )
    node = api.read_node(name)
    if node is None:
        raise NodeNotFoundError(f"the cluster has no node {name!r}", details={"node": name})
    api.patch_node(name, kube_states.availability_patch(availability))
    meta = node.get("metadata") or {}
    return {**node, "ID": str(meta.get("uid") or name), "Description": {"Hostname": str(meta.get("name") or name)}}
