"""Subnets of ``ENVCTL_RUNNER_SUBNET_POOL`` on a Swarm, through each node's own engine (opt-in).

Swarm 20.10 drops the IPAM settings of a swarm-scoped bridge network (``swarm_fence``): each
node takes the subnet from its own default pools, about 30 networks per node (``swarm_pools``).
What does hold on a node is a swarm network made ``--config-from`` a *config-only* network
that exists on that node: the runtime's bridge there gets the config-only network's subnet and
``enable_icc=false``. A config-only network is local to its node and made through that node's
own Engine API, which envctl reaches only when an admin grants it for attach
(``ENVCTL_SWARM_ATTACH_ENGINE``, the node label ``envctl.engine-socket``; ``swarm_attach``).
With that grant, and the ``isolated`` network, each new network of the installation (each
generation, ``swarm_fence.renew``) is made so:

1. **A subnet of the pool**, the first free one by ``subnets.first_free`` as on the local engine,
   claimed on the manager by a Swarm *config* named after it (``envctl-subnet-10.213.5.0-24``,
   labelled with the installation, the network, the config-only network and the helper image:
   Swarm refuses labels on a network made ``--config-from``, so the claim holds them and
   ``swarm_fence.networks`` finds the network through it). Swarm names are unique, so of two
   installations asking at once one gets the name and the other takes the next subnet: two
   installations never hold the same subnet. Taken are the claims, every network the manager
   lists (its swarm networks, its own local ones), and what a node answers as overlapping.
2. **The config-only network** ``<network>-config`` on every ready, active node, one helper job
   per node (``swarm_helper`` ``netmake``: the subnet, ``enable_icc=false``, the installation's
   identity labels, ``envctl.managed=network-config``). A node with a network that overlaps the
   subnet refuses it: the others' are removed, the claim dropped, the next subnet tried.
3. **The swarm network** ``--config-from`` it (no labels, no options: Swarm refuses both there).

A node that lacks the config-only network (it joined later, was drained, or its engine lost it)
rejects the runtime's task with 'configuration network "…" does not exist': the boot makes it
on that node (``repair``) and tries once more. ``envctl uninstall`` removes, after the swarm
networks, the installation's config-only networks on every ready node (``remove``: only those
labelled with its id); the claims are configs of the installation and go with its configs.
Without the grant nothing here runs and ``swarm_pools`` reports a node's exhausted pools.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError
from runner.backends import swarm_fence, swarm_tasks
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED
from runner.backends.subnets import Pool, first_free, subnets_of
from runner.backends.swarm_attach import SwarmAttach
from runner.backends.swarm_helper import CONFIG_ROLE
from runner.errors import NetworkPoolExhaustedError

CLAIM_ROLE, LABEL_SUBNET, LABEL_NETWORK = swarm_fence.CLAIM_ROLE, swarm_fence.LABEL_SUBNET, swarm_fence.LABEL_NETWORK
LABEL_CONFIG, LABEL_HELPER = swarm_fence.LABEL_CONFIG, swarm_fence.LABEL_HELPER
_MISSING_RE = re.compile(r'configuration network "([^"]+)" does not exist')
_ATTEMPTS = 8  # subnets tried when claims or nodes keep refusing the one found free
_NAMED = 10


def config_name(network: str) -> str:
    return f"{network}-config"


def claim_name(subnet: IPv4Network) -> str:
    return f"envctl-subnet-{subnet.network_address}-{subnet.prefixlen}"


@dataclass(frozen=True)
class Claim:
    id: str
    subnet: IPv4Network
    installation: str
    network: str
    labels: dict[str, str]


def claims(client: docker.DockerClient) -> list[Claim]:
    """Every installation's subnet claims on the swarm."""
    try:
        found = client.api.configs(filters={"label": [f"{LABEL_MANAGED}={CLAIM_ROLE}"]})
    except Exception as exc:
        raise daemon_error("list the swarm's subnet claims", exc) from exc
    out = []
    for c in found:
        labels = (c.get("Spec") or {}).get("Labels") or {}
        try:
            subnet = IPv4Network(str(labels.get(LABEL_SUBNET) or ""))
        except ValueError:
            continue
        out.append(
            Claim(
                str(c["ID"]),
                subnet,
                str(labels.get(LABEL_INSTALLATION) or ""),
                str(labels.get(LABEL_NETWORK)),
                {str(k): str(v) for k, v in labels.items()},
            )
        )
    return out


class NodeSubnets:
    """The installation's swarm networks made ``--config-from`` a config-only network on every
    node (the module's doc); ``helpers`` runs the jobs on the nodes (``swarm_attach``)."""

    def __init__(self, helpers: SwarmAttach, pool: Pool, registry: str) -> None:
        self.helpers = helpers
        self.pool = pool
        self.registry = registry

    def create_network(self, client: docker.DockerClient, name: str, labels: dict[str, str]) -> None:
        """The swarm network ``name`` (``labels``: the installation's) on a subnet of the pool."""
        installation = labels[LABEL_INSTALLATION]
        config = config_name(name)
        refused: list[IPv4Network] = []
        claimed = {**labels, LABEL_CONFIG: config, LABEL_HELPER: f"{self.registry}/{self._image()}"}
        overlaps: dict[str, dict[str, Any]] = {}
        for _ in range(_ATTEMPTS):
            subnet = self._claim(client, name, installation, claimed, refused)
            overlaps = self._make_on_nodes(client, config, subnet, labels)
            if not overlaps:
                break
            self._undo(client, installation, config, subnet)
            # the node's network's whole subnet skipped, not just the one tried
            refused += [subnet, *(IPv4Network(str(o["subnet"]), strict=False) for o in overlaps.values())]
        else:
            named = "; ".join(f"on {node}: {o['overlap']}" for node, o in overlaps.items())
            raise BackendError(
                f"{_ATTEMPTS} subnets of {self.pool.network} in a row overlapped networks of the nodes (last: "
                f"{named}); set ENVCTL_RUNNER_SUBNET_POOL to a range the nodes do not use",
                details={"pool": str(self.pool.network)},
            )
        body = {
            "Name": name,
            "CheckDuplicate": True,
            "Driver": "bridge",
            "Scope": "swarm",
            "ConfigFrom": {"Network": config},
        }
        swarm_fence.post(client, "/networks/create", body, {}, "create the runtimes' swarm network", conflict_ok=True)

    def repair(self, client: docker.DockerClient, error: BackendError, installation: str) -> bool:
        """A task rejected because its node lacks the config-only network: made there; whether
        the boot may try once more. ``BackendError`` when it cannot be made there."""
        details = error.details or {}
        found = _MISSING_RE.search(str(details.get("swarm_error") or ""))
        node_id = str(details.get("node_id") or "")
        if found is None or not node_id:
            return False
        config = found.group(1)
        network = next(
            (
                n
                for n in swarm_fence.networks(client, installation)
                if (n.get("Labels") or {}).get(LABEL_CONFIG) == config
            ),
            None,
        )
        if network is None:
            return False
        labels = dict(network.get("Labels") or {})
        subnet = IPv4Network(labels[LABEL_SUBNET])
        mine = {k: v for k, v in labels.items() if k not in (LABEL_SUBNET, LABEL_CONFIG, LABEL_HELPER, LABEL_NETWORK)}
        mine[LABEL_MANAGED] = CONFIG_ROLE
        said = self._jobs(client, {node_id: _make_args(node_id, config, subnet, mine)})
        where = str(details.get("node") or node_id)
        if said[node_id].get("overlap"):
            raise BackendError(
                f"node {where} lacked this installation's network configuration {config} ({subnet}), and it cannot "
                f"be made there: its network {said[node_id]['overlap']} overlaps that subnet; remove that network "
                "or drain the node",
                details={"node": where, "subnet": str(subnet)},
            )
        return True

    # ------------------------------------------------------------------ steps
    def _claim(
        self,
        client: docker.DockerClient,
        name: str,
        installation: str,
        labels: dict[str, str],
        refused: list[IPv4Network],
    ) -> IPv4Network:
        for _ in range(_ATTEMPTS * 4):
            held = claims(client)
            mine = [c for c in held if c.installation == installation and c.network == name]
            if mine and mine[0].subnet not in refused:  # an earlier boot of ours got this far
                return mine[0].subnet
            try:
                listed = client.api.networks()
            except Exception as exc:
                raise daemon_error("list the swarm's networks", exc) from exc
            taken = [c.subnet for c in held] + [s for n in listed for s in subnets_of(n)] + refused
            subnet = first_free(self.pool, taken)
            if subnet is None:
                raise exhausted(self.pool, held)
            claim = {**labels, LABEL_MANAGED: CLAIM_ROLE, LABEL_SUBNET: str(subnet), LABEL_NETWORK: name}
            try:
                client.api.create_config(claim_name(subnet), installation.encode(), labels=claim)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # another installation claimed it first: the next one
                    continue
                raise daemon_error("claim a subnet for the runtimes' swarm network", exc) from exc
            except Exception as exc:
                raise daemon_error("claim a subnet for the runtimes' swarm network", exc) from exc
            return subnet
        raise BackendError(f"the subnets of {self.pool.network} were claimed as fast as envctl found them")

    def _make_on_nodes(
        self,
        client: docker.DockerClient,
        config: str,
        subnet: IPv4Network,
        labels: dict[str, str],
    ) -> dict[str, dict[str, Any]]:
        """The config-only network on every ready, active node; what nodes whose own network
        overlaps the subnet answered (node name -> ``overlap``: "network (its subnet)", ``subnet``)."""
        try:
            nodes = list(swarm_fence.eligible_nodes(list(client.api.nodes())))
        except Exception as exc:
            raise daemon_error("list the swarm's nodes", exc) from exc
        made = {**labels, LABEL_MANAGED: CONFIG_ROLE}
        said = self._jobs(client, {n: _make_args(n, config, subnet, made) for n in nodes})
        return {_name(client, n): out for n, out in said.items() if out.get("overlap")}

    def _undo(self, client: docker.DockerClient, installation: str, config: str, subnet: IPv4Network) -> None:
        nodes = [str(n["ID"]) for n in _ready(client)]
        self._jobs(client, {n: ["netrm", n, installation, config] for n in nodes})
        for c in claims(client):
            if c.installation == installation and c.subnet == subnet:
                try:
                    client.api.remove_config(c.id)
                except docker.errors.NotFound:
                    pass
                except Exception as exc:
                    raise daemon_error("drop a subnet claim", exc) from exc

    def _jobs(self, client: docker.DockerClient, jobs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
        said = self.helpers.run_jobs(jobs, "network")
        for node_id, out in said.items():
            if out.get("error"):
                raise BackendError(
                    f"the runtimes' network configuration on node {_name(client, node_id)}: {out['error']}",
                    details={"node_id": node_id},
                )
        return said

    def _image(self) -> str:
        if self.helpers.image is None:
            raise BackendError("the node helpers have no image (the server did not wire one)")
        return self.helpers.image()


def _make_args(node_id: str, config: str, subnet: IPv4Network, labels: dict[str, str]) -> list[str]:
    return ["netmake", node_id, config, str(subnet), str(subnet.network_address + 1), json.dumps(labels)]


def _ready(client: docker.DockerClient) -> list[dict[str, Any]]:
    try:
        return [n for n in client.api.nodes() if swarm_tasks.node_down(n) is None]
    except Exception as exc:
        raise daemon_error("list the swarm's nodes", exc) from exc


def _name(client: docker.DockerClient, node_id: str) -> str:
    try:
        return swarm_tasks.node_name(client.api.inspect_node(node_id))
    except Exception:
        return node_id


def exhausted(pool: Pool, held: list[Claim]) -> NetworkPoolExhaustedError:
    """No subnet of the pool is left on the swarm: who holds them."""
    inside = [c for c in held if c.subnet.overlaps(pool.network)]
    named = "; ".join(f"{c.network} ({c.subnet}, installation {c.installation})" for c in inside[:_NAMED]) or "none"
    if len(inside) > _NAMED:
        named += f"; and {len(inside) - _NAMED} more (in details)"
    return NetworkPoolExhaustedError(
        f"no subnet is left for this installation's runtime network on the swarm: the /{pool.prefix} subnets of "
        f"ENVCTL_RUNNER_SUBNET_POOL {pool.network} are taken. envctl networks holding them: {named}. "
        "`envctl uninstall` in an installation's data directory frees its subnet; or set "
        "ENVCTL_RUNNER_SUBNET_POOL to a larger or another free range",
        details={
            "pool": str(pool.network),
            "prefix": pool.prefix,
            "networks": [
                {"network": c.network, "subnets": [str(c.subnet)], "installation": c.installation} for c in inside
            ],
        },
    )


# ---------------------------------------------------------------- envctl uninstall
def remove(client: docker.DockerClient, installation: str, labels: dict[str, str], engine_socket: str) -> str:
    """The installation's config-only networks removed from every ready node (after its swarm
    networks went, before its subnet claims go: they name them). A sentence saying what went."""
    mine = [c for c in claims(client) if c.installation == installation and c.labels.get(LABEL_CONFIG)]
    configs = sorted({c.labels[LABEL_CONFIG] for c in mine})
    image = next((c.labels.get(LABEL_HELPER, "") for c in mine if "/" in c.labels.get(LABEL_HELPER, "")), "")
    if not configs:
        return "none"
    if not engine_socket or not image:
        return (
            f"not removed: ENVCTL_SWARM_ATTACH_ENGINE is not set, so envctl cannot reach the nodes' engines; "
            f"`docker network rm {' '.join(configs)}` on each node removes them"
        )
    registry, _, ref = image.partition("/")
    helpers = SwarmAttach(
        lambda: client,
        socket=engine_socket,
        registry=registry,
        labels=labels,
        create_service=_service_creator(client),
        registry_auth=lambda _repository: "",  # the nodes have the image: they made the networks with it
    )
    helpers.image, helpers.identity = (lambda: ref), {LABEL_INSTALLATION: installation}
    nodes = [str(n["ID"]) for n in _ready(client)]
    said = helpers.run_jobs({n: ["netrm", n, installation] for n in nodes}, "network")
    gone = sum(len(out.get("removed") or []) for out in said.values())
    problems = [
        f"{_name(client, n)}: {out.get('error') or ', '.join(out.get('left') or [])}"
        for n, out in said.items()
        if out.get("error") or out.get("left")
    ]
    text = f"removed {gone} on {len(said)} node(s)"
    return text + (f"; left: {'; '.join(problems)}" if problems else "")


def _service_creator(client: docker.DockerClient) -> Callable[[dict[str, Any], str], str]:
    def create(body: dict[str, Any], registry_auth: str) -> str:
        swarm_fence.post(
            client,
            "/services/create",
            body,
            {"X-Registry-Auth": registry_auth} if registry_auth else {},
            "start a helper job on the nodes",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [
                s for s in client.api.services(filters={"name": body["Name"]}) if s["Spec"]["Name"] == body["Name"]
            ]
            if found:
                return str(found[0]["ID"])
            time.sleep(0.2)
        raise BackendError(f"the Swarm manager made the helper job {body['Name']} but does not list it")

    return create
