"""Reconciliation's view of the cluster (split out of ``kube.py``): the runner's pods found
again after a restart, each with the state a boot would have written, and the sweep of its
Secrets that no pod owns (a crash between making them and the pod). Only this installation's
and runner's objects, by label.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import time

from envs.kit.errors import BackendError
from runner.backends import kube_pods, kube_states
from runner.backends.base import AGENT_PORT, LABEL_RUNNER, LABEL_RUNTIME, BackendState, FoundContainer
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watches import SYNC_WAIT, Watches
from runner.identity import RunnerIdentity

log = logging.getLogger("envctl.kube")
SWEEP_EVERY = 60.0
SWEEP_AGE = 120.0  # seconds an unowned Secret of ours may live (a boot between its steps)


def owned_pods(api: KubeApi, watches: Watches, identity: RunnerIdentity) -> list[FoundContainer]:
    """The runner's pods as found containers, with the state a boot would have written."""
    pods = watches.pods.items(wait=SYNC_WAIT)
    nodes, known = watches.node_map()
    runner = kube_pods.label_value(identity.name)
    found = []
    for name, pod in pods.items():
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_RUNNER) != runner or not labels.get(LABEL_RUNTIME):
            continue
        state: BackendState = {
            "pod": name,
            "container_name": f"envctl-{labels[LABEL_RUNTIME]}",
            "container_id": str(pod["metadata"].get("uid")),
            "namespace": api.namespace,
            "installation": identity.installation,
            "node": str((pod.get("spec") or {}).get("nodeName") or ""),
        }
        for vol in (pod.get("spec") or {}).get("volumes") or []:
            if vol.get("name") == "credential":
                state["secret"] = (vol.get("secret") or {}).get("secretName")
        ip = str((pod.get("status") or {}).get("podIP") or "")
        if ip:
            state["agent"] = {"channel": "tcp", "host": ip, "port": AGENT_PORT}
        status = kube_states.status_of(pod, nodes, nodes_known=known)
        found.append(FoundContainer(runtime_id=str(labels[LABEL_RUNTIME]), state=state, status=status))
    return found


class SecretSweeper:
    """Removes this runner's Secrets that no pod owns and that are older than a boot takes, at
    most every ``SWEEP_EVERY`` seconds; never another installation's or runner's."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.swept = 0.0

    def sweep(self, identity: RunnerIdentity) -> None:
        now = time.time()
        if now - self.swept < SWEEP_EVERY:
            return
        self.swept = now
        sel = kube_pods.selector(kube_pods.owner_labels(identity.installation, identity.name))
        try:
            secrets = self.api.list_secrets(sel)
        except BackendError as exc:
            log.info("could not list the runner's secrets to sweep: %s", exc.message)
            return
        for s in secrets:
            meta = s.get("metadata") or {}
            if meta.get("ownerReferences"):
                continue  # the garbage collector removes it with its pod
            made = str(meta.get("creationTimestamp") or "")
            with contextlib.suppress(ValueError):
                age = now - calendar.timegm(time.strptime(made, "%Y-%m-%dT%H:%M:%SZ"))
                if age > SWEEP_AGE:
                    log.info("removing secret %s: no pod of this runner owns it", meta.get("name"))
                    self.api.delete_secret(str(meta.get("name")))
