"""What an installation holds on a Swarm, and its removal (``envctl uninstall`` with the swarm
backend): every service, secret, config and network labelled ``envctl.installation=<its id>``
on the manager, and the network guard's firewall rules on every node (``swarm_fence``).
Nothing without that label is looked at, so another installation's objects on the same swarm
stay. Order: the runtimes' services (their tasks stopped), the guard, a one-shot global job that
deletes the installation's rules on every node, then the secrets and the networks, the
config-only networks of ``swarm_subnets`` on every ready node (helper jobs through the nodes'
engines, ``ENVCTL_SWARM_ATTACH_ENGINE``: only those labelled with the installation), and last the
configs (the subnet claims among them, which name those config-only networks: an uninstall
interrupted before finds them again).

Named volumes live on the nodes, and Swarm 20.10's manager API cannot remove a node's volume:
they are listed with their node (``swarm_mounts.pinned_volumes``) and each comes back under
``volumes_kept`` with the command that removes it on its node (``swarm_mounts.removal_note``),
whether or not ``--volumes`` was given."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from runner.backends import swarm_fence, swarm_mounts, swarm_subnets, swarm_tasks
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED

WAIT = 60.0  # seconds for the services' tasks, and the unfence job, to end
POLL = 0.3


@dataclass
class SwarmHoldings:
    manager: str
    services: list[dict[str, str]] = field(default_factory=list)  # name, id, role
    secrets: list[dict[str, str]] = field(default_factory=list)
    configs: list[dict[str, str]] = field(default_factory=list)
    networks: list[dict[str, str]] = field(default_factory=list)
    volumes: list[dict[str, str]] = field(default_factory=list)  # named volumes on nodes: volume, node, node_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "manager": self.manager,
            "services": self.services,
            "secrets": self.secrets,
            "configs": self.configs,
            "networks": self.networks,
            "volumes": self.volumes,
        }


def _named(items: list[dict[str, Any]], name_of: Any) -> list[dict[str, str]]:
    out = []
    for item in items:
        spec = item.get("Spec") or {}
        labels = spec.get("Labels") or item.get("Labels") or {}
        out.append(
            {
                "id": str(item.get("ID") or item.get("Id")),
                "name": str(name_of(item)),
                "role": labels.get(LABEL_MANAGED, ""),
            }
        )
    return sorted(out, key=lambda x: x["name"])


def listed(client: docker.DockerClient, manager: str, installation: str) -> SwarmHoldings:
    swarm_fence.network_name(installation)  # checks the id before it goes into any filter
    label = {"label": [f"{LABEL_INSTALLATION}={installation}"]}
    try:
        services = client.api.services(filters=label)
        secrets = client.api.secrets(filters=label)
        configs = client.api.configs(filters=label)
        networks = [n for n in client.api.networks(filters=label) if n.get("Scope") == "swarm"]
        ids = {n.get("Id") for n in networks}  # and those made --config-from, found by their claims
        networks += [n for n in swarm_fence.networks(client, installation) if n.get("Id") not in ids]
    except Exception as exc:
        raise daemon_error("list the installation's objects on the swarm", exc) from exc

    def mine(x: dict[str, Any]) -> bool:
        return bool(
            ((x.get("Spec") or {}).get("Labels") or x.get("Labels") or {}).get(LABEL_INSTALLATION) == installation
        )

    def spec_name(x: dict[str, Any]) -> str:
        return str((x.get("Spec") or {}).get("Name", ""))

    return SwarmHoldings(
        manager,
        services=_named([s for s in services if mine(s)], spec_name),
        secrets=_named([s for s in secrets if mine(s)], spec_name),
        configs=_named([c for c in configs if mine(c)], spec_name),
        networks=_named([n for n in networks if mine(n)], lambda n: n.get("Name", "")),
        volumes=swarm_mounts.pinned_volumes(client, installation),
    )


def remove(
    client: docker.DockerClient,
    held: SwarmHoldings,
    installation: str,
    labels: dict[str, str],
    engine_socket: str = "",
) -> dict[str, Any]:
    """Remove what ``held`` names (in the order of the module's docstring); what went.
    ``engine_socket``: ``ENVCTL_SWARM_ATTACH_ENGINE``, for the nodes' config-only networks."""
    done: dict[str, Any] = {
        "services": [],
        "secrets": [],
        "configs": [],
        "networks": [],
        "rules": "none",
        "node_networks": "none",
        "volumes_kept": [swarm_mounts.removal_note(v, installation) for v in held.volumes],
    }
    guard = [s for s in held.services if s["role"] == swarm_fence.GUARD_ROLE]
    runtimes = [s for s in held.services if s["role"] not in (swarm_fence.GUARD_ROLE, swarm_fence.UNFENCE_ROLE)]
    guard_image = ""
    for s in guard:
        with contextlib.suppress(docker.errors.NotFound):
            spec = client.api.inspect_service(s["id"])["Spec"]
            guard_image = str(spec["TaskTemplate"]["ContainerSpec"]["Image"])
    for s in runtimes + guard:
        _remove_service(client, s["id"])
        done["services"].append(s["name"])
    for s in runtimes + guard:
        _wait_tasks_ended(client, s["id"])
    if guard_image:
        done["rules"] = _unfence(client, installation, labels, guard_image)
    for s in held.services:
        if s["role"] == swarm_fence.UNFENCE_ROLE:  # a job left by an earlier, interrupted uninstall
            _remove_service(client, s["id"])
    removers: list[tuple[str, list[dict[str, str]], Callable[[str], Any]]] = [
        ("secrets", held.secrets, lambda i: client.api.remove_secret(i)),
        ("networks", held.networks, lambda i: client.api.remove_network(i)),
        ("configs", held.configs, lambda i: client.api.remove_config(i)),
    ]
    for kind, items, remover in removers:
        if kind == "configs":  # the subnet claims (configs) name the nodes' config-only networks: they go first
            done["node_networks"] = swarm_subnets.remove(client, installation, labels, engine_socket)
        for item in items:
            _retry_in_use(remover, item["id"], f"remove the installation's {kind[:-1]} {item['name']}")
            done[kind].append(item["name"])
    return done


def _remove_service(client: docker.DockerClient, service_id: str) -> None:
    try:
        client.api.remove_service(service_id)
    except docker.errors.NotFound:
        pass
    except Exception as exc:
        raise daemon_error("remove the installation's services", exc) from exc


def _tasks(client: docker.DockerClient, service_id: str) -> list[dict[str, Any]]:
    """The service's tasks, also once the service is removed (a filter by service then fails):
    the manager keeps each task until its node has stopped the container."""
    try:
        return [t for t in client.api.tasks() if t.get("ServiceID") == service_id]
    except Exception as exc:
        raise daemon_error("list the installation's tasks", exc) from exc


def _wait_tasks_ended(client: docker.DockerClient, service_id: str) -> None:
    deadline = time.monotonic() + WAIT
    while _tasks(client, service_id) and time.monotonic() < deadline:
        time.sleep(POLL)


def _unfence(client: docker.DockerClient, installation: str, labels: dict[str, str], image: str) -> str:
    """Run the unfence job on every node; a sentence saying where the rules went."""
    made = {**labels, LABEL_INSTALLATION: installation, LABEL_MANAGED: swarm_fence.UNFENCE_ROLE}
    body = swarm_fence.unfence_spec(client, installation, made, image)
    swarm_fence.post(client, "/services/create", body, {}, "start the job removing the network guard's rules")
    found = [s for s in client.api.services(filters={"name": body["Name"]}) if s["Spec"]["Name"] == body["Name"]]
    if not found:
        return "not removed: the job removing them did not start"
    sid = str(found[0]["ID"])
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            tasks = _tasks(client, sid)
            views = [swarm_tasks.latest_task([t]) for t in tasks]
            if tasks and all(v is not None and v.state in (*swarm_tasks.ENDED, "complete") for v in views):
                failed = [v for v in views if v is not None and v.state != "complete"]
                if failed:
                    why = failed[0].err or failed[0].state
                    return f"removed on {len(views) - len(failed)} node(s); not on {len(failed)}: {why}"
                return f"removed on {len(views)} node(s)"
            time.sleep(POLL)
        return f"not confirmed within {WAIT:g} s"
    finally:
        _remove_service(client, sid)


def _retry_in_use(remover: Any, object_id: str, action: str) -> None:
    """A secret or network still in use by a task that is going: asked again for a while."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            remover(object_id)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise daemon_error(action, exc) from exc
            time.sleep(POLL)
        except Exception as exc:
            raise daemon_error(action, exc) from exc
