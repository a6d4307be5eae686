"""A Swarm runtime's mounts (issue 15 item 4): what its task mounts, and named volumes pinned to
the node that holds them.

- **git and S3 mounts** are prepared on envctl's host as on the local engine (validated before
  any network call, fetched into the caches, recorded), then streamed into the runtime over the
  agent channel at boot (``runner/mounts/streamed.py``, the agent's ``files.py``): the task gets
  an empty anonymous volume at each target for the agent to unpack into (a mount point, so never
  in a save or a draft; removed with the container). A written-back S3 mount is refused.
- ``/results`` is an anonymous volume too; envctl fetches what cells write there over the
  channel after each cell (``runner/cells/result_remote.py``).
- **A named volume** is a node's own Docker volume, so the runtime is pinned to the node that
  holds it: the first boot that mounts it lands where Swarm places it, and that node is recorded
  as a Swarm config of the installation (``envctl-volpin-<hash>``, labelled with the volume and
  the node: the cluster's own store, shared by every envctl server of the installation); later
  boots get the placement constraint ``node.id==<that node>``. A node that is gone leaves the
  runtime pending, and its boot fails naming the pin. The node makes the volume with the
  installation's labels (``VolumeOptions.Labels``: installation, owner, name, and the runner's
  labels), so it is found by them on its node.
- **Removal**: Swarm 20.10's manager API cannot list or remove a node's volumes (cluster volumes
  came with Engine 23), so ``envctl uninstall`` cannot remove them: it names each one with its
  node (from the pins) and the command that removes it there (``kept``, ``removal_note``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, InvalidInputError
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED, RuntimeSpec

RESULTS = "/results"
LABEL_PIN_VOLUME = "envctl.volume-pin"  # the engine name of the pinned volume
LABEL_PIN_NODE = "envctl.volume-node"  # the node's id
LABEL_PIN_NODE_NAME = "envctl.volume-node-name"


def task_mounts(spec: RuntimeSpec, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The task's mounts for the runtime's mounts and ``/results``; a named volume the node
    makes carries the installation's labels (and ``labels``, the runner's own)."""
    out: list[dict[str, Any]] = [{"Type": "volume", "Target": RESULTS}]
    for bind in spec.mounts:
        if bind.kind == "bind":
            if not bind.read_only:
                raise InvalidInputError(
                    f"mount at {bind.target}: an S3 mount written back on stop (writeback) is not available on "
                    "the swarm backend yet; mount it read-only or use a named volume",
                    field="mounts",
                )
            out.append({"Type": "volume", "Target": bind.target})  # empty; the agent unpacks into it
        else:
            made = {**labels, **dict(bind.labels), LABEL_INSTALLATION: spec.labels.get(LABEL_INSTALLATION, "")}
            out.append(
                {
                    "Type": "volume",
                    "Source": bind.source,
                    "Target": bind.target,
                    "ReadOnly": bind.read_only,
                    "VolumeOptions": {"Labels": made},  # the node makes it with them (not an existing one)
                }
            )
    return out


def streamed(spec: RuntimeSpec) -> bool:
    return any(b.kind == "bind" for b in spec.mounts)


def _pin_name(volume: str) -> str:
    return "envctl-volpin-" + hashlib.sha256(volume.encode()).hexdigest()[:40]


def pinned_volumes(client: docker.DockerClient, installation: str) -> list[dict[str, str]]:
    """Every named volume of the installation that a boot pinned to a node: ``volume`` (the
    engine name) and ``node`` (its name), ``node_id``, from the pins (Swarm configs)."""
    label = [f"{LABEL_INSTALLATION}={installation}", f"{LABEL_MANAGED}=volume-pin"]
    try:
        found = client.api.configs(filters={"label": label})
    except Exception as exc:
        raise daemon_error("list the installation's named volumes", exc) from exc
    out = []
    for c in found:
        labels = (c.get("Spec") or {}).get("Labels") or {}
        if labels.get(LABEL_INSTALLATION) != installation:
            continue
        out.append(
            {
                "volume": labels.get(LABEL_PIN_VOLUME, ""),
                "node": labels.get(LABEL_PIN_NODE_NAME, ""),
                "node_id": labels.get(LABEL_PIN_NODE, ""),
            }
        )
    return sorted(out, key=lambda v: (v["node"], v["volume"]))


def removal_note(volume: dict[str, str], installation: str) -> str:
    """How to remove a pinned volume on its node, which envctl cannot do through the manager."""
    return (
        f"{volume['volume']} on node {volume['node'] or volume['node_id']}: Swarm's manager cannot remove a node's "
        f"volume; on that node run `docker volume rm {volume['volume']}` (all of this installation's there: "
        f"`docker volume ls -q --filter label={LABEL_INSTALLATION}={installation}`)"
    )


def _volumes(spec: RuntimeSpec) -> dict[str, str]:
    """Engine volume name -> target, of the runtime's named volumes."""
    return {b.source: b.target for b in spec.mounts if b.kind == "volume"}


def pins(client: docker.DockerClient, spec: RuntimeSpec) -> dict[str, dict[str, str]]:
    """Engine volume name -> {"node_id", "node"} of the runtime's volumes already pinned."""
    found: dict[str, dict[str, str]] = {}
    installation = spec.labels.get(LABEL_INSTALLATION, "")
    for volume in _volumes(spec):
        try:
            configs = client.api.configs(filters={"name": _pin_name(volume)})
        except Exception as exc:
            raise daemon_error("look up the node of a named volume", exc) from exc
        for c in configs:
            labels = (c.get("Spec") or {}).get("Labels") or {}
            mine = labels.get(LABEL_INSTALLATION) == installation
            if (c.get("Spec") or {}).get("Name") == _pin_name(volume) and mine:
                found[volume] = {"node_id": labels.get(LABEL_PIN_NODE, ""), "node": labels.get(LABEL_PIN_NODE_NAME, "")}
    return found


def constraints(pinned: dict[str, dict[str, str]]) -> list[str]:
    return sorted({f"node.id=={p['node_id']}" for p in pinned.values() if p.get("node_id")})


def pinned_note(pinned: dict[str, dict[str, str]]) -> str:
    """For a boot that stayed pending: which node its volumes tie it to."""
    if not pinned:
        return ""
    nodes = sorted({p.get("node") or p.get("node_id", "") for p in pinned.values()})
    return f"; its named volumes are on node {', '.join(nodes)} (the runtime is pinned there, and it is not available)"


def unavailable(pinned: dict[str, dict[str, str]], nodes: list[dict[str, Any]]) -> str | None:
    """Why the node the runtime's named volumes pin it to cannot take it now (drained, paused,
    down or gone), or None. A pinned runtime cannot move: its boot fails at once saying so,
    rather than waiting in ``pending``; its draft and its volume stay for when the node is back."""
    by_id = {str(n.get("ID")): n for n in nodes}
    for p in pinned.values():
        node = by_id.get(p.get("node_id", ""))
        name = p.get("node") or p.get("node_id", "")
        if node is None:
            return f"its named volumes are on node {name}, which is no longer in the swarm"
        availability = (node.get("Spec") or {}).get("Availability")
        state = (node.get("Status") or {}).get("State")
        if availability != "active":
            return (
                f"its named volumes are on node {name}, which is "
                f"{ {'drain': 'drained', 'pause': 'paused'}.get(str(availability), str(availability)) }; "
                f"the runtime is pinned there and cannot move: `envctl nodes activate {name}` lets it boot again, "
                "with its draft and its volume"
            )
        if state != "ready":
            return f"its named volumes are on node {name}, which is {state}; the runtime is pinned there"
    return None


def record(
    client: docker.DockerClient,
    spec: RuntimeSpec,
    pinned: dict[str, dict[str, str]],
    node_id: str,
    node: str,
    labels: dict[str, str],
) -> dict[str, str]:
    """Pin the runtime's volumes not pinned yet to ``node_id``, where its task runs; target ->
    node name for every named volume of the runtime (for the runner log and ``mounts_used``).
    A volume pinned meanwhile by another boot to another node fails this boot."""
    installation = spec.labels.get(LABEL_INSTALLATION, "")
    targets = _volumes(spec)
    for volume in targets:
        if volume in pinned:
            continue
        made = {
            **labels,
            LABEL_INSTALLATION: installation,
            LABEL_MANAGED: "volume-pin",
            LABEL_PIN_VOLUME: volume[:200],
            LABEL_PIN_NODE: node_id,
            LABEL_PIN_NODE_NAME: node,
        }
        data = json.dumps({"volume": volume, "node_id": node_id, "node": node}).encode()
        try:
            client.api.create_config(_pin_name(volume), data, labels=made)
        except docker.errors.APIError as exc:
            if "already exists" not in str(exc):
                raise daemon_error("record the node of a named volume", exc) from exc
            other = pins(client, spec).get(volume, {})
            if other.get("node_id") and other["node_id"] != node_id:
                raise BackendError(
                    f"the volume at {targets[volume]} was made on node {other.get('node')} by a boot at the same "
                    f"moment, and this runtime landed on {node}: start it again (it will be placed on "
                    f"{other.get('node')})",
                    details={"volume_node": other.get("node")},
                ) from exc
        except Exception as exc:
            raise daemon_error("record the node of a named volume", exc) from exc
    return {t: (pinned.get(v) or {}).get("node") or node for v, t in targets.items()}
