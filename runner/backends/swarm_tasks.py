"""What a Swarm task's state means for a runtime, and which resource no node has: pure functions
of the manager's answers (``GET /tasks``, ``GET /nodes``), tested with plain dicts.

Swarm 20.10's facts these rely on are in ``runner/backends/swarm_notes.md``: a pending task never names the
resource it waits for ("insufficient resources on 3 nodes" for memory, CPU and generic resources
alike), a failed pull is ``rejected`` "No such image", and a lost node shows on the node (``down``),
not on its task, which keeps its last state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, InvalidInputError
from runner.backends.base import LABEL_RUNTIME, ContainerStatus, Status
from runner.errors import NodeNotFoundError
from runner.settings import MachineType

# task states on the way to running, and the runtime phase each one is
WAITING = {"new": None, "pending": None, "assigned": None, "accepted": None, "ready": "booting", "starting": "booting"}
PULLING = "preparing"
ENDED = ("complete", "shutdown", "failed", "rejected", "remove", "orphaned")
POLL = 0.2

log = logging.getLogger("envctl.swarm")


@dataclass(frozen=True)
class TaskView:
    """One task of a runtime's service, as the backend reads it."""

    state: str
    message: str
    err: str
    node_id: str
    exit_code: int | None
    since: str
    ports: list[dict[str, Any]]
    desired: str = "running"  # the manager's DesiredState: shutdown/remove while it stops the task


def latest_task(tasks: list[dict[str, Any]]) -> TaskView | None:
    """The service's newest task (one per service with restart condition none, but a rejected
    one stays listed beside nothing else)."""
    if not tasks:
        return None
    task = max(tasks, key=lambda t: (int((t.get("Version") or {}).get("Index") or 0), str(t.get("CreatedAt") or "")))
    status = task.get("Status") or {}
    container = status.get("ContainerStatus") or {}
    code = container.get("ExitCode")
    return TaskView(
        state=str(status.get("State") or "new"),
        message=str(status.get("Message") or ""),
        err=str(status.get("Err") or ""),
        node_id=str(task.get("NodeID") or ""),
        exit_code=int(code) if isinstance(code, int) and status.get("State") in ENDED else None,
        since=str(status.get("Timestamp") or ""),
        ports=list((status.get("PortStatus") or {}).get("Ports") or []),
        desired=str(task.get("DesiredState") or "running"),
    )


def status_of(task: TaskView | None, nodes: dict[str, dict[str, Any]]) -> ContainerStatus:
    """The runtime's status from its task and the nodes. A task Swarm is stopping on its own
    (desired state shutdown while it still runs: its node drains, or its service was changed
    outside envctl) is ``terminated``: its agent waits a while for envctl to take a draft."""
    if task is None:
        return ContainerStatus(Status.GONE)
    node = nodes.get(task.node_id) if task.node_id else None
    name = node_name(node)
    if task.node_id and (lost := node_down(node)) is not None and task.state not in ENDED:
        return ContainerStatus(Status.EXITED, error=lost, reason="node-lost", node=name)
    if task.state in ENDED:
        return ContainerStatus(
            Status.EXITED, exit_code=task.exit_code, error=task.err or task.message, started_at=task.since, node=name
        )
    if task.state == "running" and task.desired in ("shutdown", "remove", "complete"):
        availability = str(((node or {}).get("Spec") or {}).get("Availability") or "")
        why = f"node {name} is draining" if availability == "drain" else "Swarm stopped its task"
        return ContainerStatus(
            Status.EXITED,
            error=f"{why} (not envctl: the task's desired state is {task.desired})",
            reason="terminated",
            node=name,
        )
    return ContainerStatus(Status.RUNNING, started_at=task.since, node=name)


def node_name(node: dict[str, Any] | None) -> str:
    if not node:
        return ""
    return str((node.get("Description") or {}).get("Hostname") or node.get("ID") or "")


def node_down(node: dict[str, Any] | None) -> str | None:
    """Why a node counts as gone (its state down/unknown/disconnected), or None while it is up."""
    if not node:
        return "the node is no longer in the swarm"
    status = node.get("Status") or {}
    state = str(status.get("State") or "unknown")
    if state in ("down", "disconnected", "unknown"):
        return f"node {node_name(node)} is {state}" + (f" ({status['Message']})" if status.get("Message") else "")
    return None


def generic_of(resources: dict[str, Any]) -> dict[str, int]:
    """A node's (or reservation's) generic resources as kind -> count."""
    out: dict[str, int] = {}
    for item in resources.get("GenericResources") or []:
        if "NamedResourceSpec" in item:
            kind = str(item["NamedResourceSpec"].get("Kind"))
            out[kind] = out.get(kind, 0) + 1
        elif "DiscreteResourceSpec" in item:
            kind = str(item["DiscreteResourceSpec"].get("Kind"))
            out[kind] = out.get(kind, 0) + int(item["DiscreteResourceSpec"].get("Value") or 0)
    return out


def capacity_of(node: dict[str, Any]) -> dict[str, Any]:
    res = (node.get("Description") or {}).get("Resources") or {}
    return {
        "nano_cpus": int(res.get("NanoCPUs") or 0),
        "memory": int(res.get("MemoryBytes") or 0),
        "generic_resources": generic_of(res),
    }


def reserved_on(node_id: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """What the live tasks on a node reserve (what the scheduler subtracts from its capacity)."""
    cpus = memory = 0
    generic: dict[str, int] = {}
    for task in tasks:
        if task.get("NodeID") != node_id or (task.get("DesiredState") not in ("running", "ready", "accepted")):
            continue
        if str((task.get("Status") or {}).get("State")) in ENDED:
            continue
        res = ((task.get("Spec") or {}).get("Resources") or {}).get("Reservations") or {}
        cpus += int(res.get("NanoCPUs") or 0)
        memory += int(res.get("MemoryBytes") or 0)
        for kind, n in generic_of(res).items():
            generic[kind] = generic.get(kind, 0) + n
    return {"nano_cpus": cpus, "memory": memory, "generic_resources": generic}


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def missing_resource(
    machine: MachineType, gpu_kind: str, nodes: list[dict[str, Any]], tasks: list[dict[str, Any]], err: str
) -> str:
    """Which resource of the machine type no node has: compared with each ready, active node's
    capacity minus what its tasks reserve (Swarm itself only says "insufficient resources").
    ``err`` is the scheduler's text, kept at the end."""
    ready = [
        n
        for n in nodes
        if (n.get("Status") or {}).get("State") == "ready" and (n.get("Spec") or {}).get("Availability") == "active"
    ]
    if not ready:
        return f"no node of the swarm is ready and active ({err})"
    want_cpus = int(machine.cpus * 1e9)
    short: dict[str, list[str]] = {"CPU": [], "memory": [], gpu_kind: []}
    for node in ready:
        cap, used = capacity_of(node), reserved_on(str(node.get("ID")), tasks)
        name = node_name(node)
        free_cpus = cap["nano_cpus"] - used["nano_cpus"]
        free_mem = cap["memory"] - used["memory"]
        if free_cpus < want_cpus:
            short["CPU"].append(f"{name} has {free_cpus / 1e9:g} free")
        if free_mem < machine.memory:
            short["memory"].append(f"{name} has {_gib(free_mem)} free")
        if machine.gpus:
            free = cap["generic_resources"].get(gpu_kind, 0) - used["generic_resources"].get(gpu_kind, 0)
            if free < machine.gpus:
                short[gpu_kind].append(f"{name} has {max(free, 0)} free")
    wants = {"CPU": f"{machine.cpus:g} CPUs", "memory": _gib(machine.memory), gpu_kind: f"{machine.gpus} {gpu_kind}"}
    lacking = [k for k, v in short.items() if len(v) == len(ready) and (k != gpu_kind or machine.gpus)]
    if lacking:
        parts = [f"{wants[k]} ({'; '.join(short[k])})" for k in lacking]
        return (
            f"no node has the {' and '.join(k for k in lacking)} machine type {machine.name} reserves: "
            + ", ".join(parts)
            + f" (swarm: {err})"
        )
    if machine.constraints:
        return (
            f"no node meets machine type {machine.name}'s placement constraints "
            f"{', '.join(machine.constraints)} with room for it (swarm: {err})"
        )
    return f"no node fits machine type {machine.name} (swarm: {err})"


def nodes_view(
    nodes: list[dict[str, Any]], tasks: list[dict[str, Any]], services: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``GET /nodes`` of a swarm: each node with its labels, capacity, what its tasks reserve,
    health, and the runtimes of ``services`` (this installation's) it runs."""
    mine = {
        str(s["ID"]): ((s.get("Spec") or {}).get("Labels") or {}).get(LABEL_RUNTIME)
        for s in services
        if ((s.get("Spec") or {}).get("Labels") or {}).get(LABEL_RUNTIME)
    }
    out = []
    for n in nodes:
        nid = str(n.get("ID"))
        spec, status = n.get("Spec") or {}, n.get("Status") or {}
        runs = sorted(
            {
                str(mine[str(t.get("ServiceID"))])
                for t in tasks
                if t.get("NodeID") == nid
                and str(t.get("ServiceID")) in mine
                and str((t.get("Status") or {}).get("State")) not in ENDED
            }
        )
        out.append(
            {
                "id": nid,
                "name": node_name(n),
                "role": spec.get("Role") or "",
                "address": status.get("Addr") or "",
                "labels": dict(spec.get("Labels") or {}),
                "capacity": capacity_of(n),
                "reserved": reserved_on(nid, tasks),
                "health": {
                    "state": status.get("State") or "unknown",
                    "availability": spec.get("Availability") or "",
                    "message": status.get("Message") or "",
                },
                "engine": ((n.get("Description") or {}).get("Engine") or {}).get("EngineVersion") or "",
                "runtimes": runs,
            }
        )
    return sorted(out, key=lambda n: (n["role"] != "manager", n["name"]))


AVAILABILITIES = ("active", "pause", "drain")


def find_node(nodes: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The node called ``name`` (its hostname, or its id); ``NodeNotFoundError`` naming it."""
    for n in nodes:
        if name in (node_name(n), str(n.get("ID"))):
            return n
    known = ", ".join(sorted(node_name(n) for n in nodes)) or "none"
    raise NodeNotFoundError(f"no node {name!r} in the swarm (its nodes: {known})", details={"node": name})


def set_availability(client: docker.DockerClient, name: str, availability: str) -> dict[str, Any]:
    """Set the node's availability (``docker node update --availability``); the node as it was."""
    if availability not in AVAILABILITIES:
        raise InvalidInputError(
            f"availability must be one of {', '.join(AVAILABILITIES)}, not {availability!r}", field="availability"
        )
    try:
        node = find_node(list(client.api.nodes()), name)
        spec = dict(node.get("Spec") or {})
        if spec.get("Availability") != availability:
            spec["Availability"] = availability
            client.api.update_node(node["ID"], int((node.get("Version") or {}).get("Index") or 0), spec)
    except (NodeNotFoundError, InvalidInputError):
        raise
    except Exception as exc:
        raise daemon_error(f"set node {name}'s availability to {availability}", exc) from exc
    return node


def wait_removed(
    tasks_of: Callable[[str], list[dict[str, Any]]],
    list_nodes: Callable[[], list[dict[str, Any]]],
    service_id: str,
    bound: float,
) -> None:
    """Until the removed service's task is gone from the manager: its node stopped and removed
    the container (``service rm`` returns at once). A task on a node that is down stays
    until the node comes back (its engine then removes the container); after ``bound``
    seconds the stop goes on and says so in the server's log."""
    deadline = time.monotonic() + bound
    while True:
        try:
            tasks = [t for t in tasks_of(service_id) if t.get("ServiceID") == service_id]
            nodes = {str(n.get("ID")): n for n in list_nodes()} if tasks else {}
        except BackendError:
            return  # the manager no longer knows the service at all: nothing left to wait for
        alive = [t for t in tasks if node_down(nodes.get(str(t.get("NodeID")))) is None]
        if not alive:
            return
        if time.monotonic() > deadline:
            log.warning(
                "service %s: its task on node %s was still there %.0f s after the service was removed",
                service_id,
                node_name(nodes.get(str(alive[0].get("NodeID")))),
                bound,
            )
            return
        time.sleep(POLL)
