"""What a runtime pod's phase, conditions, container state and events mean for envctl: pure
functions of the API's JSON (pods, events, nodes as the installation's watch keeps them),
tested with plain dicts.

- a pod the scheduler cannot place has ``PodScheduled`` false, reason ``Unschedulable``, with
  the scheduler's own message ("0/1 nodes are available: 1 Insufficient cpu.");
  :func:`unschedulable` names the resource the machine type asks for beside it;
- a pull in progress is the ``downloading`` phase (the kubelet's ``Pulling`` event, or the
  container waiting in ``ContainerCreating`` after one); ``ErrImagePull``/``ImagePullBackOff``
  are counted (the events' ``count``) and fail the boot past ``ENVCTL_KUBE_PULL_RETRIES``;
- ``OOMKilled`` is ``oom``; ``Evicted`` (the kubelet under pressure) is ``evicted``; a pod being
  deleted while it runs, not by envctl, is ``terminated`` (its agent waits for a draft); a
  pod on a node whose ``Ready`` condition is not ``True`` (or a node that is gone), or with
  the node controller's reason ``NodeLost``, is ``node-lost``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from runner.backends.base import LABEL_RUNTIME, ContainerStatus, Status
from runner.backends.kube_pods import CONTAINER, GPU_RESOURCE
from runner.settings import MachineType

PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
_INSUFFICIENT = re.compile(r"Insufficient ([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*(?:/[A-Za-z0-9_.-]*[A-Za-z0-9])?)")


def meta(obj: dict[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("metadata") or {})


def container_status(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return dict(cs)
    return {}


def ended(pod: dict[str, Any]) -> bool:
    """The pod's container has ended (or never will run): nothing of it runs on the node."""
    if str((pod.get("status") or {}).get("phase")) in ("Succeeded", "Failed"):
        return True
    return "terminated" in (container_status(pod).get("state") or {})


def node_ready(node: dict[str, Any] | None) -> str | None:
    """Why a node counts as lost (its Ready condition not True), or None while it is ready."""
    if not node:
        return "the node is no longer in the cluster"
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            if cond.get("status") == "True":
                return None
            why = cond.get("message") or cond.get("reason") or ""
            return f"node {meta(node).get('name')} is not ready ({cond.get('status')})" + (f": {why}" if why else "")
    return f"node {meta(node).get('name')} reports no Ready condition"


def status_of(pod: dict[str, Any] | None, nodes: dict[str, dict[str, Any]], *, nodes_known: bool) -> ContainerStatus:
    """The runtime's status from its pod; ``nodes``: the cluster's nodes by name
    (``nodes_known``: the listing is complete, so a missing node is a lost one)."""
    if pod is None:
        return ContainerStatus(Status.GONE)
    status = pod.get("status") or {}
    phase = str(status.get("phase") or "Pending")
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    cs = container_status(pod)
    state = cs.get("state") or {}
    started = str((state.get("running") or {}).get("startedAt") or status.get("startTime") or "") or None
    if phase in ("Failed", "Succeeded") or "terminated" in state:
        ended = state.get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        reason = str(ended.get("reason") or status.get("reason") or "")
        code = ended.get("exitCode")
        message = str(ended.get("message") or status.get("message") or reason or f"the pod's phase is {phase}")
        if status.get("reason") == "Evicted":
            return ContainerStatus(
                Status.EXITED,
                exit_code=code,
                error=f"evicted: {status.get('message') or ''}".strip(),
                reason="evicted",
                node=node,
            )
        if status.get("reason") == "NodeLost":
            return ContainerStatus(Status.EXITED, error=message, reason="node-lost", node=node)
        return ContainerStatus(
            Status.EXITED,
            exit_code=int(code) if isinstance(code, int) else None,
            oom_killed=reason == "OOMKilled",
            error=message[:500],
            started_at=started,
            node=node,
        )
    if status.get("reason") == "NodeLost":
        return ContainerStatus(
            Status.EXITED, error=str(status.get("message") or "node lost"), reason="node-lost", node=node
        )
    if node and nodes_known:
        lost = node_ready(nodes.get(node))
        if lost is not None:
            return ContainerStatus(Status.EXITED, error=lost, reason="node-lost", node=node)
    if meta(pod).get("deletionTimestamp"):
        return ContainerStatus(
            Status.EXITED,
            error="its pod is being deleted (not by envctl: someone deleted it, or the cluster evicted it)",
            reason="terminated",
            node=node,
        )
    return ContainerStatus(Status.RUNNING, started_at=started, node=node)


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's message while it cannot place the pod, or None."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return str(cond.get("message") or "unschedulable")
    return None


def missing_resource(machine: MachineType, message: str) -> str:
    """The scheduler's message with what the machine type asks of each resource it names."""
    wants = {
        "cpu": f"{machine.cpus:g} CPUs",
        "memory": f"{machine.memory / 1024**3:.1f} GiB of memory",
        GPU_RESOURCE: f"{machine.gpus} {GPU_RESOURCE}",
    }
    named = list(dict.fromkeys(_INSUFFICIENT.findall(message)))
    asks = [f"{r} (machine type {machine.name} asks {wants[r]})" if r in wants else r for r in named]
    if asks:
        return f"no node has the {' and '.join(asks)}; the scheduler: {message.strip()}"
    if machine.constraints or machine.tolerations:
        return (
            f"no node meets machine type {machine.name}'s placement ({', '.join(machine.constraints)}); "
            f"the scheduler: {message.strip()}"
        )
    return f"the scheduler: {message.strip()}"


@dataclass(frozen=True)
class Progress:
    """A boot's view of its pod: the phase to show, and why it failed (None: not failed)."""

    phase: str | None
    failure: str | None = None
    pulls_failed: int = 0
    pulling: bool = False


def progress(pod: dict[str, Any], events: list[dict[str, Any]], pull_retries: int) -> Progress:
    """Where a pod on its way to running is, from its container state and its events."""
    cs = container_status(pod)
    waiting = (cs.get("state") or {}).get("waiting") or {}
    reason = str(waiting.get("reason") or "")
    failed = sum(int(e.get("count") or 1) for e in events if e.get("reason") == "Failed" and _pull_event(e))
    if reason in PULL_FAILURES:
        failed = max(failed, 1)
    pulling = any(e.get("reason") == "Pulling" for e in events) and not any(
        e.get("reason") in ("Pulled",) for e in events
    )
    if reason in ("InvalidImageName", "ErrImageNeverPull") or failed > pull_retries:
        why = str(waiting.get("message") or _last_message(events, "Failed") or reason)
        return Progress(
            "downloading", f"the node could not pull the runtime's image after {failed} tries: {why}", failed
        )
    if reason in ("CreateContainerConfigError", "CreateContainerError", "RunContainerError"):
        return Progress(
            "booting", f"the kubelet could not start the runtime's container ({reason}): {waiting.get('message')}"
        )
    if pulling or reason in PULL_FAILURES:
        return Progress("downloading", None, failed, pulling=True)
    if (pod.get("spec") or {}).get("nodeName"):
        return Progress("booting", None, failed)
    return Progress(None, None, failed)


def _pull_event(event: dict[str, Any]) -> bool:
    text = str(event.get("message") or "").lower()
    return "pull" in text or "image" in text


def _last_message(events: list[dict[str, Any]], reason: str) -> str:
    found = [e for e in events if e.get("reason") == reason]
    return str(found[-1].get("message") or "") if found else ""


def log_line(event: dict[str, Any]) -> tuple[str, str] | None:
    """An event worth the runner log: (event, message), or None for routine ones."""
    reason = str(event.get("reason") or "")
    message = str(event.get("message") or "")
    if reason in ("Scheduled", "Pulling", "Pulled", "Created", "Started", "Killing"):
        return f"pod-{reason.lower()}", message
    if reason in ("FailedScheduling", "Failed", "BackOff", "Evicted", "OOMKilling", "FailedMount", "NodeNotReady"):
        return f"pod-{reason.lower()}", message
    return None


AVAILABILITIES = ("active", "pause", "drain")
ANNOTATION_AVAILABILITY = "envctl.availability"  # pause or drain, on a node envctl cordoned


def availability_patch(availability: str) -> dict[str, Any]:
    """A node's merge patch for an availability: ``pause`` and ``drain`` cordon it (the
    scheduler places no new pod there), ``active`` uncordons it; which of the two envctl set is
    kept in an annotation, for ``GET /nodes``."""
    cordon = availability != "active"
    return {
        "metadata": {"annotations": {ANNOTATION_AVAILABILITY: availability if cordon else None}},
        "spec": {"unschedulable": cordon},
    }


def availability(node: dict[str, Any]) -> str:
    if not (node.get("spec") or {}).get("unschedulable"):
        return "active"
    said = str((meta(node).get("annotations") or {}).get(ANNOTATION_AVAILABILITY) or "")
    return said if said in ("pause", "drain") else "pause"  # cordoned by someone else: placing nothing


def nodes_view(nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``GET /nodes`` of a cluster: each node with its labels, capacity (allocatable), what the
    installation's pods on it request, health, and the runtimes (``pods``: this installation's)."""
    out = []
    for n in nodes:
        m, status = meta(n), n.get("status") or {}
        name = str(m.get("name") or "")
        mine = [p for p in pods if (p.get("spec") or {}).get("nodeName") == name]
        live = [p for p in mine if str((p.get("status") or {}).get("phase")) in ("Pending", "Running")]
        labels = dict(m.get("labels") or {})
        ready = node_ready(n)
        addresses = status.get("addresses") or []
        internal = [a.get("address") for a in addresses if a.get("type") == "InternalIP"]
        out.append(
            {
                "id": str(m.get("uid") or name),
                "name": name,
                "role": "control-plane" if any(k.startswith("node-role.kubernetes.io/") for k in labels) else "worker",
                "address": str(internal[0] if internal else ""),
                "labels": labels,
                "capacity": capacity(status.get("allocatable") or status.get("capacity") or {}),
                "reserved": reserved(live),
                "health": {
                    "state": "ready" if ready is None else "down",
                    "availability": availability(n),
                    "message": ready or "",
                },
                "engine": str((status.get("nodeInfo") or {}).get("containerRuntimeVersion") or ""),
                "runtimes": sorted({str(meta(p).get("labels", {}).get(LABEL_RUNTIME)) for p in live}),
            }
        )
    return sorted(out, key=lambda n: n["name"])


def cpu_nanos(text: str) -> int:
    text = str(text)
    if text.endswith("m"):
        return int(float(text[:-1]) * 1_000_000)
    return int(float(text) * 1_000_000_000)


_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def memory_bytes(text: str) -> int:
    text = str(text)
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


def capacity(res: dict[str, Any]) -> dict[str, Any]:
    generic = {k: int(v) for k, v in res.items() if "/" in k and str(v).isdigit()}
    return {
        "nano_cpus": cpu_nanos(res.get("cpu") or "0"),
        "memory": memory_bytes(res.get("memory") or "0"),
        "generic_resources": generic,
    }


def reserved(pods: list[dict[str, Any]]) -> dict[str, Any]:
    cpus = memory = 0
    generic: dict[str, int] = {}
    for p in pods:
        for c in (p.get("spec") or {}).get("containers") or []:
            req = (c.get("resources") or {}).get("requests") or {}
            cpus += cpu_nanos(req.get("cpu") or "0")
            memory += memory_bytes(req.get("memory") or "0")
            for k, v in req.items():
                if "/" in k:
                    generic[k] = generic.get(k, 0) + int(v)
    return {"nano_cpus": cpus, "memory": memory, "generic_resources": generic}
