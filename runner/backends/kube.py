"""Runtimes as Kubernetes pods (``ENVCTL_RUNNER_BACKEND=kubernetes``), placed by the cluster's
scheduler, reached over the tcp agent channel at the pod's IP (``runner/channel.py`` says why
envctl dials in: the Kubernetes network model routes pod IPs from every node and pod).

- One pod per boot (``restartPolicy: Never``), its manifest in ``kube_pods``: labels with the
  installation, runner and runtime id; the machine type as requests/limits, node selector,
  affinity, tolerations, ``nvidia.com/gpu``; the security context; the agent's code from a
  ConfigMap per installation (named by content).
- The boot's credential is a Secret mounted on a memory-backed volume; the node pulls
  ``<registry>/<repository>@<digest>`` with a pull secret holding a *pull grant* for exactly
  that repository (``registry/pull_grants.py``), removed once the pod runs. Both Secrets are
  made first, then the pod, then given to it (``ownerReferences``): they go with the pod,
  and a crash in between leaves Secrets that reconciliation sweeps (``kube_adopt``).
- States come from one watch per installation (``kube_watch``: pods, their events, the
  nodes), never from polling each pod: a boot waits on the watch; ``poll`` and ``list_owned``
  read it. ``kube_states`` maps phases and events to envctl's states: unschedulable past
  ``ENVCTL_KUBE_PENDING_TIMEOUT`` fails naming the resource, pulls are ``downloading`` with
  bounded retries, ``OOMKilled`` is ``oom``, eviction, deletion outside envctl (its agent
  waits for a draft), node lost. Events of the installation's pods go to the runner log
  (``report_event``).
- Saves and drafts are made in the runtime and pushed through the registry; git/S3 mounts
  and ``/results`` travel over the agent channel; named volumes are PersistentVolumeClaims
  (``ENVCTL_KUBE_STORAGE_CLASS``); the fence is a NetworkPolicy per installation, which only a
  policy-enforcing network plugin applies (envctl says so at start).

This module holds the contract and a boot's and a stop's steps; the rest is by responsibility:
``kube_watches`` (the installation's watches, events into the runner log), ``kube_boot`` (the
agent ConfigMap and fence, the wait until the pod runs), ``kube_adopt`` (the runner's pods found
after a restart, the sweep of unowned Secrets), ``kube_nodes`` (nodes, cordon for a drain),
``kube_volumes`` (PersistentVolumeClaims), ``kube_attach`` (pods envctl did not start,
attached through pods/exec), ``kube_api`` (the API calls), ``kube_pods`` (the
manifests), ``kube_states`` (phases and events to envctl's states).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images import docker as engine
from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from registry import distribution, pull_grants, signing
from runner.backends import kube_adopt, kube_attach, kube_boot, kube_nodes, kube_pods, kube_states, kube_volumes
from runner.backends.base import (
    AGENT_SOCKET,
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_RUNTIME,
    BackendState,
    ContainerStatus,
    FoundContainer,
    ImageInfo,
    OtherContainer,
    RuntimeBackend,
    RuntimeSpec,
    Status,
    VolumeFound,
)
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watches import SYNC_WAIT, EventRouter, Watches
from runner.identity import RunnerIdentity
from runner.settings import Settings

log = logging.getLogger("envctl.kube")
# envctl's own deletion of a pod (its draft taken already, or none wanted: a delete, a reset, an
# orphan) gives the agent STOP_GRACE s, not the pod's terminationGracePeriodSeconds (which is for
# deletions outside envctl, whose agent waits for a draft): an agent that did not hear
# ``release`` (unreachable, or envctl restarted in between) is killed then, not 25 s later.
STOP_GRACE = 3
# Once the kubelet reports the container ended (or past FORCE_AFTER s, a kubelet that says
# nothing), the pod object is removed without waiting for the kubelet's confirmation (grace 0,
# the pod's uid as precondition): the API keeps a deleted pod until the kubelet has also
# reclaimed its volumes and cgroup, which Kubernetes 1.20 re-checks only on its 10 s status sync.
FORCE_AFTER = STOP_GRACE + 7.0
STOP_BOUND = FORCE_AFTER + 10.0  # seconds a stop waits for its pod to be gone


class KubernetesBackend(RuntimeBackend):
    name = "kubernetes"
    channels = ("tcp",)
    saves_in_runtime = True
    images_from_registry = True
    host_paths = False  # mounts streamed in, results fetched, over the agent channel
    attach_inside = True  # an attached pod's agent is placed through pods/exec (kube_attach)

    def __init__(
        self,
        api: KubeApi,
        *,
        registry: str,
        signing_key: signing.SigningKey | None,
        labels: dict[str, str] | None = None,
        grant_ttl: int = 600,
        pending_timeout: float = 20.0,
        pull_timeout: float = 600.0,
        pull_retries: int = 3,
        storage_class: str = "",
        volume_size: str = "10Gi",
    ) -> None:
        self.api = api
        self.registry = registry
        self.signing_key = signing_key
        self.labels = dict(labels or {})
        self.grant_ttl = grant_ttl
        self.pending_timeout = pending_timeout
        self.pull_timeout = pull_timeout
        self.pull_retries = pull_retries
        self.storage_class = storage_class
        self.volume_size = volume_size
        self._watches: dict[str, Watches] = {}
        self._prepared: dict[str, str] = {}  # installation -> its agent ConfigMap's name
        self._admitted: set[tuple[str, int]] = set()  # (installation, an app's port) let in (admit_app_port)
        self._lock = threading.Lock()
        self._sweeper = kube_adopt.SecretSweeper(api)
        self._calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kube-call")  # a boot's calls side by side
        self._local: docker.DockerClient | None = None
        self._events = EventRouter(lambda: self.report_event, lambda: list(self._watches.values()))

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesBackend:
        chosen = distribution.plan(settings)
        if chosen.mode != "managed":
            raise InvalidInputError(
                "the kubernetes backend pulls images from envctl's managed registry (ENVCTL_REGISTRY=managed)",
                field="kube_registry",
            )
        registry = settings.kube_registry.strip()
        if not registry:
            host = settings.registry_listen or "127.0.0.1"
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1"
            registry = f"{host}:{distribution.port_of(settings)}"
            log.info("the cluster's nodes pull from %s (set ENVCTL_KUBE_REGISTRY if they reach it elsewhere)", registry)
        api = KubeApi(settings.kube_config, settings.kube_context, settings.kube_namespace)
        return cls(
            api,
            registry=registry,
            signing_key=distribution.signing_key(settings),
            labels=settings.runner_labels,
            grant_ttl=max(settings.registry_token_ttl, int(settings.kube_pull_timeout)),
            pending_timeout=settings.kube_pending_timeout,
            pull_timeout=settings.kube_pull_timeout,
            pull_retries=settings.kube_pull_retries,
            storage_class=settings.kube_storage_class,
        )

    # --- the installation's watch and objects ------------------------------------------
    def watches(self, installation: str) -> Watches:
        with self._lock:
            found = self._watches.get(installation)
            if found is None:
                found = self._watches[installation] = Watches(
                    self.api, installation, self._events.on_event, self._events.on_pod
                )
            return found

    def prepare(self, installation: str) -> str:
        """The installation's agent ConfigMap and fence, made once; the ConfigMap's name."""
        with self._lock:
            if installation in self._prepared:
                return self._prepared[installation]
        name = kube_boot.prepare_installation(self.api, installation, self.labels, self.watches(installation))
        with self._lock:
            self._prepared[installation] = name
        return name

    def pull_grant(self, repository: str) -> str:
        if self.signing_key is None:
            raise BackendError("no registry signing key: the kubernetes backend needs envctl's managed registry")
        return pull_grants.make_grant(self.signing_key, repository, self.grant_ttl)

    # --- the contract ------------------------------------------------------------------
    def ping(self) -> None:
        self.api.version()

    def start(self, spec: RuntimeSpec) -> BackendState:
        if spec.channel != "tcp" or not spec.credential:
            raise InvalidInputError("the kubernetes backend needs ENVCTL_RUNNER_CHANNEL=tcp", field="runner_channel")
        repository, sep, digest = spec.image.partition("@")
        if not sep or not digest.startswith("sha256:"):
            raise BackendError(f"the kubernetes backend boots images by registry digest, not {spec.image!r}")
        installation = spec.labels.get(LABEL_INSTALLATION, "")
        labels = kube_pods.pod_labels(spec, self.labels)
        watches = self.watches(installation)
        config = self.prepare(installation)
        for port in spec.ports:
            if (installation, port) not in self._admitted:
                kube_boot.admit_app_port(self.api, installation, self.labels, port)
                self._admitted.add((installation, port))
        self._remove_leftover(spec, watches)
        claims = self._claims(spec)
        tag = uuid.uuid4().hex[:8]
        owned = {k: v for k, v in labels.items() if k != LABEL_MANAGED}
        cred_name = kube_pods.object_name(spec.runtime_id, f"cred-{tag}")
        pull_name = kube_pods.object_name(spec.runtime_id, f"pull-{tag}")
        state: BackendState = {
            "pod": kube_pods.object_name(spec.runtime_id),
            "container_name": spec.container_name,  # envctl-<id>: what names the runtime (release_agent)
            "namespace": self.api.namespace,
            "installation": installation,
            "secret": cred_name,
        }
        try:
            pull = kube_pods.pull_secret(pull_name, owned, self.registry, pull_grants.USER, self.pull_grant(repository))
            self._together(  # the pod's boot waits for both: side by side, one round trip
                lambda: self.api.create_secret(kube_pods.credential_secret(cred_name, owned, spec.credential)),
                lambda: self.api.create_secret(pull),
            )
            manifest = kube_pods.pod_manifest(
                spec,
                image=f"{self.registry}/{spec.image}",
                agent_config=config,
                credential_secret=cred_name,
                pull_secret=pull_name,
                labels=labels,
                claims=claims,
                memory_watch=self.memory_watch,
            )
            try:
                pod = self.api.create_pod(manifest)
            except ConflictError as exc:
                raise BackendError(f"a pod named {state['pod']} exists already; remove it by hand") from exc
            state["container_id"] = str(pod["metadata"]["uid"])
            owner = kube_pods.owner_reference(pod)
            self._together(*(functools.partial(self.api.own_secret, name, owner) for name in (cred_name, pull_name)))
            state.update(
                kube_boot.wait_running(
                    self.api,
                    spec,
                    state,
                    watches,
                    pending_timeout=self.pending_timeout,
                    pull_timeout=self.pull_timeout,
                    pull_retries=self.pull_retries,
                )
            )
            self._calls.submit(self._forget_pull_secret, pull_name)  # not on the boot's way
            return state
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop(state, timeout=0)
            for name in (cred_name, pull_name):
                with contextlib.suppress(Exception):
                    self.api.delete_secret(name)
            raise

    def poll(self, state: BackendState) -> ContainerStatus:
        name, uid = state.get("pod"), state.get("container_id")
        if not name:
            return ContainerStatus(Status.GONE)
        watches = self.watches(str(state.get("installation") or ""))
        try:
            pod = watches.pods.items(wait=SYNC_WAIT).get(str(name))
        except BackendError:
            pod = self.api.read_pod(str(name))  # the watch is relisting: ask the pod itself
        if pod is None or (uid and str(pod["metadata"].get("uid")) != uid):
            return ContainerStatus(Status.GONE)
        nodes, known = watches.node_map()
        return kube_states.status_of(pod, nodes, nodes_known=known)

    def stop(self, state: BackendState, timeout: float = 5.0) -> None:
        name, uid = state.get("pod"), str(state.get("container_id") or "")
        if name and state.get("agent") and self.release_agent is not None:
            self.release_agent(state)  # envctl stops it: the agent's SIGTERM waits for no draft
        if name:
            self.api.delete_pod(str(name), STOP_GRACE, uid)
            if not self._wait_gone(state, FORCE_AFTER, until_ended=True):
                log.info("pod %s: its container not ended %.0f s after its deletion", name, FORCE_AFTER)
            if uid:  # only the pod this state names; a no-op once it is gone
                self.api.delete_pod(str(name), 0, uid)
            if not self._wait_gone(state, STOP_BOUND - FORCE_AFTER):
                log.warning("pod %s was still there %.0f s after its deletion", name, STOP_BOUND)
        if state.get("secret"):  # owned by the pod (gone with it); at once, not when the collector runs
            self.api.delete_secret(str(state["secret"]))

    def _together(self, *calls: Callable[[], object]) -> None:
        """``calls`` side by side on the backend's threads; the first one's error, once all ended."""
        errors = [future.exception() for future in [self._calls.submit(c) for c in calls]]
        for error in errors:
            if error is not None:
                raise error

    def _forget_pull_secret(self, name: str) -> None:
        """The image is on the node: the grant has done its work (the pod owns the Secret, so
        it goes with the pod if this fails)."""
        try:
            self.api.delete_secret(name)
        except BackendError as exc:
            log.info("could not remove the pull secret %s now (it goes with its pod): %s", name, exc.message)

    def _wait_gone(self, state: BackendState, bound: float, until_ended: bool = False) -> bool:
        """Whether the pod of ``state`` is gone (``until_ended``: or its container ended) within
        ``bound`` seconds."""
        deadline = time.monotonic() + bound
        watches = self.watches(str(state.get("installation") or ""))
        generation = -1
        while time.monotonic() < deadline:
            pod = watches.pods.get(str(state["pod"])) if watches.pods.synced else self.api.read_pod(str(state["pod"]))
            gone = pod is None or str(pod["metadata"].get("uid")) != str(state.get("container_id") or "")
            if gone and (watches.pods.synced or self.api.read_pod(str(state["pod"])) is None):
                return True
            if until_ended and not gone and pod is not None and kube_states.ended(pod):
                return True
            generation = watches.pods.wait(generation, 0.5)
        return False

    def list_owned(self, identity: RunnerIdentity) -> list[FoundContainer]:
        self.prepare(identity.installation)  # at start-up's first reconciliation: the fence, and its warning
        found = kube_adopt.owned_pods(self.api, self.watches(identity.installation), identity)
        self._sweeper.sweep(identity)
        return found

    def socket_path(self, state: BackendState, state_dir: Path) -> Path:
        return state_dir / AGENT_SOCKET  # never made: a pod's agent is on the tcp channel

    def logs_tail(self, state: BackendState, lines: int = 20) -> str:
        return self.api.pod_log(str(state["pod"]), lines) if state.get("pod") else ""

    # images: built and pushed on this host's engine; the nodes pull them from the registry
    def engine_client(self) -> docker.DockerClient | None:
        if self._local is None:
            try:
                self._local = docker.from_env(timeout=30)
            except docker.errors.DockerException:
                return None
        return self._local

    def image_info(self, image: str) -> ImageInfo | None:
        client = self.engine_client()
        return None if client is None else engine.info(client, image)

    def close(self) -> None:
        self._calls.shutdown(wait=False)
        for w in self._watches.values():
            w.stop()
        self.api.close()
        if self._local is not None:
            self._local.close()

    # --- attached pods (kube_attach) ---------------------------------------------------------
    def inspect_other(self, container: str) -> OtherContainer | None:
        return kube_attach.inspect(self.api, container)

    def other_has_python(self, other: OtherContainer) -> bool:
        return kube_attach.has_python(self.api, other)

    def place_agent(self, other: OtherContainer, runtime_id: str, credential: bytes) -> BackendState:
        return kube_attach.place(self.api, other, runtime_id, credential)

    def remove_agent(self, state: BackendState) -> dict[str, Any]:
        return kube_attach.remove(self.api, state)

    bash_relay = True  # a pod without python3: its Bash cells through a relay on envctl's host

    def shell_relay(self, other: OtherContainer, pids: Path) -> tuple[list[str], BackendState]:
        return kube_attach.shell_relay(self.api, other, pids)

    def end_shells(self, state: BackendState) -> str:
        return kube_attach.end_shells(self.api, state)

    def other_alive(self, state: BackendState) -> bool:
        return kube_attach.pod_alive(self.api, state)

    # --- nodes ---------------------------------------------------------------------------
    def nodes(self, installation: str) -> list[dict[str, Any]]:
        return kube_nodes.nodes_view(self.watches(installation))

    def set_node_availability(self, name: str, availability: str) -> dict[str, Any]:
        return kube_nodes.set_availability(self.api, name, availability)

    # --- named volumes: PersistentVolumeClaims (kube_volumes) ------------------------------
    def _claims(self, spec: RuntimeSpec) -> dict[str, str]:
        return {b.source: kube_pods.claim_name(b.source) for b in spec.mounts if b.kind == "volume"}

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        kube_volumes.ensure_volume(self.api, name, labels, self.storage_class, self.volume_size)

    def list_volumes(self, installation: str) -> list[VolumeFound]:
        return kube_volumes.list_volumes(self.api, installation)

    def remove_volume(self, name: str, installation: str) -> None:
        kube_volumes.remove_volume(self.api, name, installation, self.watches(installation))

    def _remove_leftover(self, spec: RuntimeSpec, watches: Watches) -> None:
        name = kube_pods.object_name(spec.runtime_id)
        if watches.pods.synced and watches.pods.get(name) is None:
            return  # not among the installation's pods (another's of that name: the pod's creation says so)
        pod = self.api.read_pod(name)
        if pod is None:
            return
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_RUNTIME) != kube_pods.label_value(spec.runtime_id) or labels.get(
            LABEL_INSTALLATION
        ) != kube_pods.label_value(spec.labels.get(LABEL_INSTALLATION, "")):
            raise BackendError(f"a pod named {name} exists and is not this runtime's; remove it by hand")
        self.stop(
            {
                "pod": name,
                "container_id": str(pod["metadata"].get("uid")),
                "installation": spec.labels.get(LABEL_INSTALLATION, ""),
            }
        )
