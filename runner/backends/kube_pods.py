"""A Kubernetes runtime's objects as the API's JSON: its pod, its two Secrets, the agent's
ConfigMap, the installation's NetworkPolicy and a named volume's PersistentVolumeClaim. Pure
functions of a ``RuntimeSpec`` and the backend's settings, tested as the manifests they make.

What the pod holds (``runner/backends/kube.py`` makes it):

- labels: the installation, the runner, the runtime id (what the installation's watch selects
  and reconciliation lists); the environment and machine type as annotations (their ``@`` and
  ``/`` are not label values). No secret, credential or token in any label or annotation;
- ``restartPolicy: Never`` (a runtime that ended is an error to report, not a process to start
  again with its state gone), no service account token, no service links in the environment;
- the machine type as requests = limits (CPU, memory), ``nvidia.com/gpu`` for GPUs (Kubernetes
  places by requests: the same numbers make the pod ``Guaranteed``), its constraints as a node
  selector (``==``) and node affinity (``!=``), its tolerations;
- the security baseline: no privilege escalation, every capability dropped and Docker's
  default set minus the risky ones added back (what the local engine's containers have, so
  ``apt-get`` works as root), seccomp ``RuntimeDefault``, not privileged;
- files: the agent's code from a ConfigMap (read-only), its per-boot credential from a Secret
  on a memory-backed volume, memory-backed ``/run/envctl`` and ``/run/secrets`` (the runtime's
  secrets arrive over the agent channel into the latter, as on every backend), ``/results``
  and each streamed git/S3 mount an ``emptyDir`` (mount points: never in a save or a draft),
  named volumes PersistentVolumeClaims.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from envs.kit.errors import InvalidInputError
from runner.backends.base import (
    AGENT_CREDENTIAL,
    AGENT_MOUNT,
    AGENT_PORT,
    LABEL_ENVIRONMENT,
    LABEL_GPU_KIND,
    LABEL_INSTALLATION,
    LABEL_MACHINE,
    LABEL_MANAGED,
    LABEL_RUNNER,
    LABEL_RUNTIME,
    RESULTS_MOUNT,
    SECRETS_MOUNT,
    STATE_MOUNT,
    RuntimeSpec,
)
from runner.settings import MachineType

CONTAINER = "runtime"  # the pod's one container
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's extended resource
CREDENTIAL_DIR = f"{STATE_MOUNT}/credential"  # the credential Secret's volume (a directory of its own)
CREDENTIAL_PATH = f"{CREDENTIAL_DIR}/{AGENT_CREDENTIAL}"
# SIGTERM (a pod deleted outside envctl, an eviction, a drain) leaves the agent TERM_WAIT s for
# envctl to take a draft (runner/agent/main.py terminate); the kubelet kills after the grace period
TERM_WAIT = 20.0
GRACE_SECONDS = int(TERM_WAIT + 5)
PRESSURE_PAUSE = 60.0  # at most this long a cell stays paused near the memory limit (runtimes/pressure.py)
# Docker's default capabilities minus the ones the local engine drops (docker.DROPPED_CAPABILITIES)
ADDED_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID")
MEMORY_DIR_LIMIT = "8Mi"
KIND_CREDENTIAL = "credential"  # LABEL_MANAGED of a runtime's credential Secret
KIND_PULL = "pull"  # ... of its pull secret
KIND_AGENT = "agent"  # ... of the installation's agent ConfigMaps
KIND_FENCE = "fence"  # ... of the installation's NetworkPolicy
KIND_VOLUME = "volume"  # ... of a named volume's PersistentVolumeClaim
ANNOTATION_SOURCE = "envctl.volume-source"  # a claim's engine volume name, as the runner knows it

_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_CONSTRAINT = re.compile(r"node\.(labels\.|)([A-Za-z0-9_.\-/]+)\s*(==|!=)\s*(.+)")
_TOLERATION = re.compile(r"([^=:]+)(?:=([^:]*))?:(\w+)")


def label_value(text: str) -> str:
    """``text`` as a label value: itself when Kubernetes takes it, else a readable prefix and a hash."""
    if len(text) <= 63 and _LABEL_VALUE.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    head = re.sub(r"[^A-Za-z0-9_.\-]", "-", text)[:40].strip("-_.")
    return f"{head}-{digest}" if head else digest


def object_name(runtime_id: str, suffix: str = "") -> str:
    """A DNS-1123 name for a runtime's object: ``envctl-rt-5k2m…`` (ids hold ``_``)."""
    base = "envctl-" + re.sub(r"[^a-z0-9-]", "-", runtime_id.lower())
    return (base + (f"-{suffix}" if suffix else ""))[:253]


def owner_labels(installation: str, runner: str) -> dict[str, str]:
    return {LABEL_INSTALLATION: label_value(installation), LABEL_RUNNER: label_value(runner)}


def selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def quantity_cpu(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def resources(m: MachineType) -> dict[str, Any]:
    """Requests = limits: the scheduler places by what the limits allow."""
    if m.cpus <= 0 or m.memory <= 0:
        raise InvalidInputError(f"machine type {m.name!r} has a non-positive limit", field="machine_type")
    limits: dict[str, str] = {"cpu": quantity_cpu(m.cpus), "memory": str(m.memory)}
    if m.gpus:
        limits[GPU_RESOURCE] = str(m.gpus)
    return {"requests": dict(limits), "limits": limits}


def placement(m: MachineType) -> dict[str, Any]:
    """The machine type's constraints and tolerations as the pod spec's fields.

    Constraints are written as Swarm's (``node.labels.zone==eu``, ``node.hostname!=n1``):
    ``node.labels.K`` is the node label K, ``node.hostname`` is ``kubernetes.io/hostname``;
    ``==`` goes to the node selector, ``!=`` to a required node affinity (``NotIn``)."""
    select: dict[str, str] = {}
    not_in: list[dict[str, Any]] = []
    for text in m.constraints:
        found = _CONSTRAINT.fullmatch(text.strip())
        if found is None:
            raise InvalidInputError(
                f"machine type {m.name}: constraint {text!r} has no Kubernetes meaning (node.labels.K==V, "
                "node.hostname==N, or !=)",
                field="machine_types",
            )
        is_label, key, op, value = found.groups()
        if not is_label:
            if key != "hostname":
                raise InvalidInputError(
                    f"machine type {m.name}: constraint {text!r}: only node.labels.* and node.hostname place pods",
                    field="machine_types",
                )
            key = "kubernetes.io/hostname"
        value = value.strip()
        if op == "==":
            select[key] = value
        else:
            not_in.append({"key": key, "operator": "NotIn", "values": [value]})
    out: dict[str, Any] = {}
    if select:
        out["nodeSelector"] = select
    if not_in:
        out["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": not_in}]}
            }
        }
    tolerations = []
    for text in m.tolerations:
        found = _TOLERATION.fullmatch(text)
        if found is None:  # parse_tolerations checked them
            raise InvalidInputError(f"machine type {m.name}: toleration {text!r}", field="machine_types")
        key, value, effect = found.groups()
        item = {"key": key, "effect": effect}
        item.update({"operator": "Equal", "value": value} if value is not None else {"operator": "Exists"})
        tolerations.append(item)
    if m.gpus:  # GPU nodes are commonly tainted for GPU pods only
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        out["tolerations"] = tolerations
    return out


def pod_labels(spec: RuntimeSpec, extra: dict[str, str]) -> dict[str, str]:
    if not spec.labels.get(LABEL_INSTALLATION) or not spec.labels.get(LABEL_RUNNER):
        raise InvalidInputError("a runtime's pod needs its installation and runner labels", field="labels")
    labels = {k: label_value(v) for k, v in {**extra, **spec.labels}.items()}
    labels.update({LABEL_MANAGED: "1", LABEL_RUNTIME: label_value(spec.runtime_id)})
    labels.update({app_port_label(port): "1" for port in spec.ports})  # admitted by ``app_port_policy``
    return labels


def app_port_label(port: int) -> str:
    """The label of a runtime pod whose ``port`` (an app's web server) envctl dials."""
    return f"envctl.app-port-{int(port)}"


def agent_command(memory_watch: float = 0.0) -> list[str]:
    return [
        *("python3", "-u", "-I", f"{AGENT_MOUNT}/main.py"),
        *("--listen", f"tcp:{AGENT_PORT}", "--credential", CREDENTIAL_PATH),
        *("--term-wait", f"{TERM_WAIT:g}"),
        *(("--memory-watch", f"{memory_watch:g}", "--memory-pause", f"{PRESSURE_PAUSE:g}") if memory_watch else ()),
    ]


def pod_manifest(
    spec: RuntimeSpec,
    *,
    image: str,
    agent_config: str,
    credential_secret: str,
    pull_secret: str,
    labels: dict[str, str],
    claims: dict[str, str] | None = None,
    memory_watch: float = 0.0,
) -> dict[str, Any]:
    """The runtime's pod. ``claims``: engine volume name -> its PersistentVolumeClaim's name;
    ``memory_watch``: the agent's (runner/agent/memwatch.py), 0: off."""
    m = spec.machine
    memory_dir = {"medium": "Memory", "sizeLimit": MEMORY_DIR_LIMIT}
    volumes: list[dict[str, Any]] = [
        {"name": "agent", "configMap": {"name": agent_config, "defaultMode": 0o444}},
        {"name": "state", "emptyDir": dict(memory_dir)},
        {"name": "credential", "secret": {"secretName": credential_secret, "defaultMode": 0o400}},
        {"name": "secrets", "emptyDir": dict(memory_dir)},
        {"name": "results", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "agent", "mountPath": AGENT_MOUNT, "readOnly": True},
        {"name": "state", "mountPath": STATE_MOUNT},
        {"name": "credential", "mountPath": CREDENTIAL_DIR, "readOnly": True},
        {"name": "secrets", "mountPath": SECRETS_MOUNT},
        {"name": "results", "mountPath": RESULTS_MOUNT},
    ]
    for i, bind in enumerate(spec.mounts):
        name = f"mount-{i}"
        if bind.kind == "bind":  # a git/S3 tree envctl streams in over the agent channel
            if not bind.read_only:
                raise InvalidInputError(
                    f"mount at {bind.target}: an S3 mount written back on stop (writeback) is not available on "
                    "the kubernetes backend yet; mount it read-only or use a named volume",
                    field="mounts",
                )
            volumes.append({"name": name, "emptyDir": {}})
            mounts.append({"name": name, "mountPath": bind.target})
        else:
            claim = (claims or {}).get(bind.source) or claim_name(bind.source)
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
            mounts.append({"name": name, "mountPath": bind.target, "readOnly": bind.read_only})
    annotations = {LABEL_ENVIRONMENT: spec.environment, LABEL_MACHINE: m.name}
    if m.gpus:
        annotations[LABEL_GPU_KIND] = m.gpu_kind or "nvidia"
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",  # by digest: what is there is what was asked for
        "command": agent_command(memory_watch),
        "workingDir": "/root",
        "env": [{"name": k, "value": v} for k, v in spec.env.items()],  # the runtime's variables, never secrets
        "ports": [
            {"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"},
            *({"name": f"app-{p}", "containerPort": p, "protocol": "TCP"} for p in spec.ports if p != AGENT_PORT),
        ],
        "resources": resources(m),
        "securityContext": {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": list(ADDED_CAPABILITIES)},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": object_name(spec.runtime_id), "labels": labels, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": GRACE_SECONDS,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "imagePullSecrets": [{"name": pull_secret}],
            "containers": [container],
            "volumes": volumes,
            **placement(m),
        },
    }


def credential_secret(name: str, labels: dict[str, str], credential: bytes) -> dict[str, Any]:
    """The boot's credential line as a Secret (its data only; nothing of it in a label)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "labels": {**labels, LABEL_MANAGED: KIND_CREDENTIAL}},
        "data": {AGENT_CREDENTIAL: base64.b64encode(credential).decode()},
    }


def pull_secret(name: str, labels: dict[str, str], registry: str, user: str, password: str) -> dict[str, Any]:
    """A ``kubernetes.io/dockerconfigjson`` Secret with Basic credentials for ``registry``."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = {"auths": {registry: {"username": user, "password": password, "auth": auth}}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "labels": {**labels, LABEL_MANAGED: KIND_PULL}},
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    }


def owner_reference(pod: dict[str, Any]) -> dict[str, Any]:
    """A reference to the pod: what it owns goes when it goes (the garbage collector)."""
    meta = pod.get("metadata") or {}
    return {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name"), "uid": meta.get("uid"), "controller": False}


def agent_config(name: str, labels: dict[str, str], files: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {**labels, LABEL_MANAGED: KIND_AGENT}},
        "data": files,
    }


def stale_agent_configs(config_maps: list[dict[str, Any]], keep: str, pods: list[dict[str, Any]]) -> list[str]:
    """The agent ConfigMaps (``config_maps``: the installation's, by label) to remove: every
    one but ``keep`` (this envctl's agent version) that none of ``pods`` mounts (a runtime booted
    by an older envctl and adopted keeps its ConfigMap until a later start)."""
    used = {
        str((v.get("configMap") or {}).get("name"))
        for p in pods
        for v in (p.get("spec") or {}).get("volumes") or []
        if v.get("configMap")
    }
    names = (str((c.get("metadata") or {}).get("name") or "") for c in config_maps)
    return sorted(n for n in names if n and n != keep and n not in used)


def fence_policy(name: str, installation: str, labels: dict[str, str]) -> dict[str, Any]:
    """The runtime fence as a NetworkPolicy over the installation's runtime pods: in, only the
    agent's port; out, anywhere but loopback, link-local (the metadata address) and private
    networks (envctl's API, the cluster's services, other runtimes), and DNS."""
    private = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": {**labels, LABEL_MANAGED: KIND_FENCE}},
        "spec": {
            "podSelector": {"matchLabels": {LABEL_INSTALLATION: label_value(installation), LABEL_MANAGED: "1"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": AGENT_PORT}]}],
            "egress": [
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": private}}]},
                {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            ],
        },
    }


def app_port_policy(name: str, installation: str, port: int, labels: dict[str, str]) -> dict[str, Any]:
    """What lets envctl in to an app's port: the fence admits the agent's port alone, and
    NetworkPolicies add up, so the installation's pods labelled for ``port`` take it too (in
    only; what goes out stays the fence's)."""
    selected = {LABEL_INSTALLATION: label_value(installation), LABEL_MANAGED: "1", app_port_label(port): "1"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": {**labels, LABEL_MANAGED: KIND_FENCE}},
        "spec": {
            "podSelector": {"matchLabels": selected},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": int(port)}]}],
        },
    }


def claim_name(volume: str) -> str:
    """The PersistentVolumeClaim of an engine volume name (``envctl-vol-…``)."""
    clean = re.sub(r"[^a-z0-9-]", "-", volume.lower()).strip("-")[:200]
    if clean and clean == volume:
        return clean
    return f"{clean[:40].strip('-') or 'vol'}-{hashlib.sha256(volume.encode()).hexdigest()[:12]}"


def volume_claim(volume: str, labels: dict[str, str], storage_class: str, size: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(volume),
            "labels": {**{k: label_value(v) for k, v in labels.items()}, LABEL_MANAGED: KIND_VOLUME},
            "annotations": {ANNOTATION_SOURCE: volume},
        },
        "spec": spec,
    }
