"""What a Swarm runtime's service is made of (the Engine API's JSON), apart from the backend
that creates it: every limit, label, file and network in one place, the pull token the node
gets in the create call, and the small readings of a task (its node's address, the agent's
published port) the boot needs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from envs.kit.errors import BackendError
from registry import signing
from registry.distribution import ISSUER, SERVICE
from runner.backends import agent_channel, swarm_mounts, swarm_tasks
from runner.backends.base import (
    AGENT_MOUNT,
    AGENT_PORT,
    LABEL_GPU_KIND,
    SECRETS_MOUNT,
    STATE_MOUNT,
    RuntimeSpec,
    runtime_labels,
)
from runner.backends.docker import DROPPED_CAPABILITIES

GPU_RESOURCE = "gpu"  # the generic resource kind nodes advertise their GPUs as
# SIGTERM (a drain, a service removed outside envctl) leaves the agent TERM_WAIT s for envctl to
# take a draft (runner/agent/main.py terminate); Swarm kills the task after the grace period
TERM_WAIT = 20.0
STOP_GRACE_NS = int((TERM_WAIT + 5) * 1e9)
PRESSURE_PAUSE = 60.0  # at most this long a cell stays paused near the memory limit (runtimes/pressure.py)


def service_spec(
    spec: RuntimeSpec,
    secret: dict[str, Any],
    configs: list[dict[str, Any]],
    *,
    registry: str,
    labels: dict[str, str],
    log_max_size: str,
    pinned: list[str] | None = None,
    network: str | None = None,
    memory_watch: float = 0.0,
) -> dict[str, Any]:
    """The service of one runtime: ``registry`` the nodes pull from, ``labels`` the runner's own,
    ``pinned`` the constraints of its named volumes' node (``swarm_mounts``), ``network`` the
    installation's fenced network (``swarm_fence``), when there is one."""
    m = spec.machine
    all_labels = runtime_labels(spec, labels, "service")
    reservations: dict[str, Any] = {"NanoCPUs": int(m.cpus * 1e9), "MemoryBytes": m.memory}
    if m.gpus:
        all_labels[LABEL_GPU_KIND] = m.gpu_kind or "nvidia"
        reservations["GenericResources"] = [{"DiscreteResourceSpec": {"Kind": GPU_RESOURCE, "Value": m.gpus}}]
    tmpfs = {"Type": "tmpfs"}
    container: dict[str, Any] = {
        "Image": f"{registry}/{spec.image}",
        "Command": [
            *("python3", "-u", "-I", f"{AGENT_MOUNT}/main.py", *agent_channel.arguments("tcp")),
            *("--term-wait", f"{TERM_WAIT:g}"),
            *(("--memory-watch", f"{memory_watch:g}", "--memory-pause", f"{PRESSURE_PAUSE:g}") if memory_watch else ()),
        ],
        "Hostname": spec.name[:63],
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "Dir": "/root",
        "Labels": all_labels,
        "Init": True,
        "CapabilityDrop": [f"CAP_{c}" for c in DROPPED_CAPABILITIES],
        "StopGracePeriod": STOP_GRACE_NS,
        "StopSignal": "SIGTERM",
        "Mounts": [
            {**tmpfs, "Target": STATE_MOUNT, "TmpfsOptions": {"SizeBytes": 8 << 20, "Mode": 0o700}},
            {**tmpfs, "Target": SECRETS_MOUNT, "TmpfsOptions": {"SizeBytes": 8 << 20, "Mode": 0o700}},
            *swarm_mounts.task_mounts(spec, labels),  # git/S3 ones streamed in by envctl, /results, named volumes
        ],
        "Secrets": [secret],
        "Configs": configs,
    }
    template: dict[str, Any] = {
        "ContainerSpec": container,
        "Resources": {
            "Limits": {"NanoCPUs": int(m.cpus * 1e9), "MemoryBytes": m.memory, "Pids": m.pids},
            "Reservations": reservations,
        },
        "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        "Placement": {"Constraints": [*m.constraints, *(pinned or [])]},
        "LogDriver": {"Name": "json-file", "Options": {"max-size": log_max_size, "max-file": "1"}},
    }
    if network:
        template["Networks"] = [{"Target": network}]
    return {
        "Name": spec.container_name,
        "Labels": all_labels,
        "TaskTemplate": template,
        "Mode": {"Replicated": {"Replicas": 1}},
        "EndpointSpec": {
            "Mode": "dnsrr",
            "Ports": [
                {"Protocol": "tcp", "TargetPort": port, "PublishMode": "host"}
                for port in (AGENT_PORT, *sorted(set(spec.ports) - {AGENT_PORT}))
            ],  # the agent's, and an app's (Swarm picks each a free port of the node)
        },
    }


def pull_token(key: signing.SigningKey | None, repository: str, ttl: int) -> str:
    """A pull-only registry token for exactly ``repository``, living ``ttl`` seconds."""
    if key is None:
        raise BackendError("no registry signing key: the swarm backend needs envctl's managed registry")
    now = int(time.time())
    return key.sign(
        {
            "iss": ISSUER,
            "sub": "envctl-swarm-node",
            "aud": SERVICE,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "access": [{"type": "repository", "name": repository, "actions": ["pull"]}],
        }
    )


def transient(exc: BackendError) -> bool:
    """A failure of the node's engine while it set the container up, not of the runtime: 20.10
    sometimes cannot remount a task's secrets directory read-only ("device or resource busy")."""
    text = str((exc.details or {}).get("swarm_error") or "")
    return text.startswith("starting container failed") and "device or resource busy" in text


def node_address(node: dict[str, Any] | None) -> str:
    addr = str(((node or {}).get("Status") or {}).get("Addr") or "")
    if not addr or addr == "0.0.0.0":  # noqa: S104  (a comparison)
        raise BackendError(f"node {swarm_tasks.node_name(node)} has no address envctl can dial")
    return addr


def published(task: swarm_tasks.TaskView, target: int = AGENT_PORT) -> int:
    """The node's port that ``target`` (the agent's, or an app's) is published on."""
    for port in task.ports:
        if int(port.get("TargetPort") or 0) == target and port.get("PublishedPort"):
            return int(port["PublishedPort"])
    what = "its agent" if target == AGENT_PORT else f"port {target}"
    raise BackendError(f"the runtime's task has no published port for {what} ({task.ports})")
