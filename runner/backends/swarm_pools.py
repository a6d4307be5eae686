"""A node out of address pools for a Swarm installation's runtime network (R44 on Swarm).

On the local engine envctl gives its runtime network a subnet of ``ENVCTL_RUNNER_SUBNET_POOL``
(``runner/backends/subnets.py``). On a Swarm it cannot: Swarm 20.10 drops the IPAM settings of a
swarm-scoped bridge network (``swarm_fence``), and each node where a runtime lands takes the
subnet from its *own* default address pools (a /16 of 172.17–31.0.0/16, then /20s of
192.168.0.0/16: about 30 networks per node, each installation's holding one). The only way to give
such a network a subnet is a network made with ``--config-from`` a *config-only* network that
exists on every node (checked on the fixture: the subnet and ``enable_icc=false`` then hold on the
nodes that have it, and a node without it rejects the task with 'configuration network "..." does
not exist'); a config-only network is local to its node, made through that node's own Engine API,
which envctl has only when an admin grants it (``ENVCTL_SWARM_ATTACH_ENGINE``: then
``swarm_subnets`` does just that, and takes the subnet from the pool).

Without that grant, what envctl does instead: a task its node rejects because the node's pools are full ("could not
find an available, non-overlapping IPv4 address pool") fails the boot with the same error as on
the local engine, ``network_pool_exhausted``, naming the node, the envctl networks on the swarm
(each with its installation and how many services that installation still has) and how to free
them.
"""

from __future__ import annotations

import re
from typing import Any

import docker

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED
from runner.backends.swarm_fence import NETWORK_ROLE
from runner.errors import NetworkPoolExhaustedError

_FULL_RE = re.compile(r"could not find an available, non-overlapping IPv[46] address pool")
_NAMED = 10  # networks named in the message; details has them all


def holders(client: docker.DockerClient) -> list[dict[str, Any]]:
    """envctl's swarm networks (every installation's), each with its installation and how many
    services that installation has on the swarm (its runtimes and its guard)."""
    try:
        networks = [
            n
            for n in client.api.networks(filters={"label": [f"{LABEL_MANAGED}={NETWORK_ROLE}"]})
            if n.get("Scope") == "swarm"
        ]
        services = client.api.services(filters={"label": [LABEL_INSTALLATION]})
    except Exception as exc:
        raise daemon_error("list envctl's swarm networks", exc) from exc
    count: dict[str, int] = {}
    for s in services:
        inst = ((s.get("Spec") or {}).get("Labels") or {}).get(LABEL_INSTALLATION, "")
        count[inst] = count.get(inst, 0) + 1
    out = []
    for n in sorted(networks, key=lambda n: str(n.get("Name"))):
        inst = (n.get("Labels") or {}).get(LABEL_INSTALLATION, "")
        out.append({"network": str(n.get("Name")), "installation": inst, "services": count.get(inst, 0)})
    return out


def exhausted(client: docker.DockerClient, error: BackendError, installation: str) -> NetworkPoolExhaustedError | None:
    """The ``network_pool_exhausted`` error for a boot whose task its node rejected for want of
    an address pool; None for any other failure."""
    details = error.details or {}
    if not _FULL_RE.search(str(details.get("swarm_error") or "")):
        return None
    node = str(details.get("node") or "") or "the runtime's node"
    held = holders(client)
    idle = [h for h in held if not h["services"]]
    named = "; ".join(
        f"{h['network']} (installation {h['installation']}"
        + (", this one" if h["installation"] == installation else "")
        + (f", {h['services']} services)" if h["services"] else ", no service left)")
        for h in held[:_NAMED]
    )
    if len(held) > _NAMED:
        named += f"; and {len(held) - _NAMED} more (in details)"
    free = (
        f"the {len(idle)} whose installation has no service left are removed with `docker network rm NAME` on the "
        "manager (or `envctl uninstall` in that installation's data directory)"
        if idle
        else "every one's installation still has services: `envctl uninstall` in an installation's data "
        "directory removes it with its network"
    )
    return NetworkPoolExhaustedError(
        f"node {node} has no address pool left for this installation's runtime network: on a Swarm each node "
        "gives a swarm network a subnet of its own default address pools (Swarm 20.10 drops the subnet envctl "
        "would take from ENVCTL_RUNNER_SUBNET_POOL), and they are all taken there. envctl networks on the "
        f"swarm: {named or 'none'}; {free}. Networks that are not envctl's hold the rest; or give the node "
        "larger default-address-pools (its daemon.json), or grant envctl the nodes' engines "
        "(ENVCTL_SWARM_ATTACH_ENGINE) so that it takes the subnet from ENVCTL_RUNNER_SUBNET_POOL",
        details={
            "node": node,
            "swarm_error": str(details.get("swarm_error") or ""),
            "networks": held,
            "pool": "the node's default-address-pools",
        },
    )
