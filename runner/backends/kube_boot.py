"""What a pod's boot needs besides its own objects (split out of ``kube.py``): the
installation's agent ConfigMap (named by content; other agent versions' removed unless a pod
mounts them) and its fence NetworkPolicy, made once per installation; and the wait until the
pod runs, read from the installation's watch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from envs.kit.errors import BackendError
from runner.backends import kube_pods, kube_states
from runner.backends.base import AGENT_PORT, LABEL_INSTALLATION, LABEL_MANAGED, BackendState, RuntimeSpec, Status
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watches import SYNC_WAIT, Watches

log = logging.getLogger("envctl.kube")
AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
BOOT_POLL = 0.05  # seconds a boot waits for a change of its pod before it looks at its events again


def prepare_installation(api: KubeApi, installation: str, labels: dict[str, str], watches: Watches) -> str:
    """The installation's agent ConfigMap and fence; the ConfigMap's name."""
    files = {p.name: p.read_text() for p in sorted(AGENT_DIR.glob("*.py"))}
    digest = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in files.items()).encode()).hexdigest()[:16]
    inst = kube_pods.label_value(installation)
    owned = {**labels, LABEL_INSTALLATION: inst}
    name = f"envctl-agent-{inst.lower().replace('_', '-')[:30]}-{digest}"
    api.ensure_config_map(kube_pods.agent_config(name, owned, files))
    remove_old_agents(api, installation, name, watches)
    fence = f"envctl-fence-{inst.lower().replace('_', '-')[:40]}"
    api.ensure_policy(kube_pods.fence_policy(fence, installation, owned))
    log.warning(
        "runtime fence: NetworkPolicy %s/%s limits the runtimes' traffic only where the cluster's network plugin "
        "enforces NetworkPolicy (Calico, Cilium, ...); the plain bridge and flannel plugins do not, and envctl "
        "cannot tell from the API which one this cluster runs",
        api.namespace,
        fence,
    )
    return name


def admit_app_port(api: KubeApi, installation: str, labels: dict[str, str], port: int) -> None:
    """The installation's NetworkPolicy that lets envctl in to app runtimes' ``port``."""
    inst = kube_pods.label_value(installation)
    name = f"envctl-app-{inst.lower().replace('_', '-')[:40]}-{int(port)}"
    api.ensure_policy(kube_pods.app_port_policy(name, installation, port, {**labels, LABEL_INSTALLATION: inst}))


def remove_old_agents(api: KubeApi, installation: str, keep: str, watches: Watches) -> None:
    """The installation's agent ConfigMaps of other agent versions (only its own, by label)."""
    inst = kube_pods.label_value(installation)
    sel = kube_pods.selector({LABEL_INSTALLATION: inst, LABEL_MANAGED: kube_pods.KIND_AGENT})
    try:
        pods = list(watches.pods.items(wait=SYNC_WAIT).values())
        for old in kube_pods.stale_agent_configs(api.list_config_maps(sel), keep, pods):
            log.info("removing ConfigMap %s: the agent of another envctl version", old)
            api.delete_config_map(old)
    except BackendError as exc:
        log.info("could not remove the old agent ConfigMaps: %s", exc.message)


def wait_running(
    api: KubeApi,
    spec: RuntimeSpec,
    state: BackendState,
    watches: Watches,
    *,
    pending_timeout: float,
    pull_timeout: float,
    pull_retries: int,
) -> BackendState:
    """Until the pod runs with an IP: its node and the agent's address; ``BackendError`` with
    the scheduler's, the kubelet's or the container's reason otherwise."""
    began = time.monotonic()
    pulling_since: float | None = None
    phase: str | None = None
    generation = -1
    while True:
        generation = watches.pods.wait(generation, BOOT_POLL)  # events (another watch) may say more first
        pod = watches.pods.get(state["pod"])
        now = time.monotonic()
        if pod is None or str(pod["metadata"].get("uid")) != state["container_id"]:
            if now - began > 10 and api.read_pod(state["pod"]) is None:
                raise BackendError("the runtime's pod was deleted while it booted (not by envctl)")
            continue
        nodes, known = watches.node_map()
        status = kube_states.status_of(pod, nodes, nodes_known=known)
        if status.status is Status.EXITED:
            why = "ran out of memory (OOMKilled)" if status.oom_killed else status.error
            raise BackendError(f"the runtime's pod ended while it booted: {why}", details={"reason": status.reason})
        events = watches.events_of(pod)
        seen = kube_states.progress(pod, events, pull_retries)
        if seen.phase != phase and spec.on_phase is not None:
            phase = seen.phase
            spec.on_phase(seen.phase if seen.phase == "downloading" else None)
        if seen.failure:
            raise BackendError(seen.failure, details={"pod": state["pod"]})
        ip = str((pod.get("status") or {}).get("podIP") or "")
        # the kubelet's Started event comes at once; the pod's status only after its next
        # relist of the containers (up to 1 s later)
        running = "running" in (kube_states.container_status(pod).get("state") or {}) or any(
            e.get("reason") == "Started" for e in events
        )
        if running and ip:
            return {
                "node": str(pod["spec"].get("nodeName") or ""),
                "agent": {"channel": "tcp", "host": ip, "port": AGENT_PORT},
            }
        if seen.pulling:
            pulling_since = pulling_since or now
            if now - pulling_since > pull_timeout:
                raise BackendError(
                    f"node {pod['spec'].get('nodeName')} was still pulling the runtime's image after "
                    f"{pull_timeout:g} s (ENVCTL_KUBE_PULL_TIMEOUT)"
                )
        refused = kube_states.unschedulable(pod)
        if refused is not None and now - began > pending_timeout:
            raise BackendError(
                f"the runtime could not be placed within {pending_timeout:g} s: "
                + kube_states.missing_resource(spec.machine, refused),
                details={"reason": "unschedulable", "scheduler": refused},
            )
