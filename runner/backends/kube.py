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
  and a crash in between leaves Secrets that reconciliation sweeps (``_sweep``).
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
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images import docker as engine
from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from registry import distribution, pull_grants, signing
from runner.backends import kube_pods, kube_states
from runner.backends.base import (
    AGENT_PORT,
    AGENT_SOCKET,
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_RUNNER,
    LABEL_RUNTIME,
    BackendState,
    ContainerStatus,
    FoundContainer,
    ImageInfo,
    RuntimeBackend,
    RuntimeSpec,
    Status,
    VolumeFound,
)
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watch import Reflector
from runner.errors import NodeNotFoundError
from runner.identity import RunnerIdentity
from runner.settings import Settings

log = logging.getLogger("envctl.kube")
AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
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
SYNC_WAIT = 10.0  # seconds a caller waits for the watch's first listing
BOOT_POLL = 0.05  # seconds a boot waits for a change of its pod before it looks at its events again
SWEEP_EVERY = 60.0
SWEEP_AGE = 120.0  # seconds an unowned Secret of ours may live (a boot between its steps)


class _Watches:
    """The installation's reflectors: its pods, their events, the cluster's nodes."""

    def __init__(self, api: KubeApi, installation: str, report: Any, on_pod: Any) -> None:
        sel = kube_pods.selector({LABEL_INSTALLATION: kube_pods.label_value(installation), LABEL_MANAGED: "1"})
        self.pods = Reflector("pods", api.core.list_namespaced_pod, api.namespace, label_selector=sel, on_change=on_pod)
        self.events = Reflector(
            "events",
            api.core.list_namespaced_event,
            api.namespace,
            field_selector="involvedObject.kind=Pod",
            keep=lambda e: str((e.get("involvedObject") or {}).get("name") or "").startswith("envctl-"),
            on_change=report,
        )
        self.nodes = Reflector("nodes", api.core.list_node)
        for r in (self.pods, self.events, self.nodes):
            r.start()

    def events_of(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        uid = (pod.get("metadata") or {}).get("uid")
        try:
            events = self.events.items()
        except BackendError:
            return []
        found = [e for e in events.values() if (e.get("involvedObject") or {}).get("uid") == uid]
        return sorted(found, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))

    def node_map(self) -> tuple[dict[str, dict[str, Any]], bool]:
        try:
            return self.nodes.items(), True
        except BackendError:
            return {}, False  # nodes not readable (RBAC): node loss shows only on the pods

    def stop(self) -> None:
        for r in (self.pods, self.events, self.nodes):
            r.stop()


class KubernetesBackend(RuntimeBackend):
    name = "kubernetes"
    channels = ("tcp",)
    saves_in_runtime = True
    images_from_registry = True
    host_paths = False  # mounts streamed in, results fetched, over the agent channel

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
        self._watches: dict[str, _Watches] = {}
        self._prepared: dict[str, str] = {}  # installation -> its agent ConfigMap's name
        self._lock = threading.Lock()
        self._swept = 0.0
        self._local: docker.DockerClient | None = None
        self._unmatched: dict[str, list[tuple[str, str]]] = {}  # pod uid -> events seen before the pod

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
    def watches(self, installation: str) -> _Watches:
        with self._lock:
            found = self._watches.get(installation)
            if found is None:
                found = self._watches[installation] = _Watches(self.api, installation, self._on_event, self._on_pod)
            return found

    def _on_event(self, kind: str, event: dict[str, Any]) -> None:
        """An event of a pod: into its runtime's runner log. The event may come before its pod
        is in the cache (two watches): it waits there for the pod (``_on_pod``)."""
        if kind != "ADDED" or self.report_event is None:
            return
        line = kube_states.log_line(event)
        if line is None:
            return
        involved = event.get("involvedObject") or {}
        name, uid = str(involved.get("name") or ""), str(involved.get("uid") or "")
        for w in list(self._watches.values()):
            pod = w.pods.get(name)
            if pod is not None and str((pod.get("metadata") or {}).get("uid")) == uid:
                self._report(pod, line)
                return
        with self._lock:
            waiting = self._unmatched.setdefault(uid, [])
            if len(self._unmatched) < 1000 and len(waiting) < 50:
                waiting.append(line)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = str((pod.get("metadata") or {}).get("uid") or "")
        with self._lock:
            lines = self._unmatched.pop(uid, [])
            if kind == "DELETED" or len(self._unmatched) > 500:
                self._unmatched.clear()
        for line in lines:
            self._report(pod, line)

    def _report(self, pod: dict[str, Any], line: tuple[str, str]) -> None:
        rid = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_RUNTIME)
        if rid and self.report_event is not None:
            self.report_event(str(rid), line[0], line[1])

    def prepare(self, installation: str) -> str:
        """The installation's agent ConfigMap and fence, made once; the ConfigMap's name."""
        with self._lock:
            if installation in self._prepared:
                return self._prepared[installation]
        files = {p.name: p.read_text() for p in sorted(AGENT_DIR.glob("*.py"))}
        digest = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in files.items()).encode()).hexdigest()[:16]
        inst = kube_pods.label_value(installation)
        owned = {**self.labels, LABEL_INSTALLATION: inst}
        name = f"envctl-agent-{inst.lower().replace('_', '-')[:30]}-{digest}"
        self.api.ensure_config_map(kube_pods.agent_config(name, owned, files))
        self._remove_old_agents(installation, name)
        fence = f"envctl-fence-{inst.lower().replace('_', '-')[:40]}"
        self.api.ensure_policy(kube_pods.fence_policy(fence, installation, owned))
        log.warning(
            "runtime fence: NetworkPolicy %s/%s limits the runtimes' traffic only where the cluster's network plugin "
            "enforces NetworkPolicy (Calico, Cilium, ...); the plain bridge and flannel plugins do not, and envctl "
            "cannot tell from the API which one this cluster runs",
            self.api.namespace,
            fence,
        )
        with self._lock:
            self._prepared[installation] = name
        return name

    def _remove_old_agents(self, installation: str, keep: str) -> None:
        """The installation's agent ConfigMaps of other agent versions (only its own, by label)."""
        inst = kube_pods.label_value(installation)
        sel = kube_pods.selector({LABEL_INSTALLATION: inst, LABEL_MANAGED: kube_pods.KIND_AGENT})
        try:
            pods = list(self.watches(installation).pods.items(wait=SYNC_WAIT).values())
            for old in kube_pods.stale_agent_configs(self.api.list_config_maps(sel), keep, pods):
                log.info("removing ConfigMap %s: the agent of another envctl version", old)
                self.api.delete_config_map(old)
        except BackendError as exc:
            log.info("could not remove the old agent ConfigMaps: %s", exc.message)

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
            self.api.create_secret(kube_pods.credential_secret(cred_name, owned, spec.credential))
            self.api.create_secret(
                kube_pods.pull_secret(pull_name, owned, self.registry, pull_grants.USER, self.pull_grant(repository))
            )
            manifest = kube_pods.pod_manifest(
                spec,
                image=f"{self.registry}/{spec.image}",
                agent_config=config,
                credential_secret=cred_name,
                pull_secret=pull_name,
                labels=labels,
                claims=claims,
            )
            try:
                pod = self.api.create_pod(manifest)
            except ConflictError as exc:
                raise BackendError(f"a pod named {state['pod']} exists already; remove it by hand") from exc
            state["container_id"] = str(pod["metadata"]["uid"])
            owner = kube_pods.owner_reference(pod)
            for name in (cred_name, pull_name):
                self.api.own_secret(name, owner)
            state.update(self._wait_running(spec, state, watches))
            with contextlib.suppress(BackendError):
                self.api.delete_secret(pull_name)  # the image is on the node: the grant has done its work
            return state
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop(state, timeout=0)
            for name in (cred_name, pull_name):
                with contextlib.suppress(Exception):
                    self.api.delete_secret(name)
            raise

    def _wait_running(self, spec: RuntimeSpec, state: BackendState, watches: _Watches) -> BackendState:
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
                if now - began > 10 and self.api.read_pod(state["pod"]) is None:
                    raise BackendError("the runtime's pod was deleted while it booted (not by envctl)")
                continue
            nodes, known = watches.node_map()
            status = kube_states.status_of(pod, nodes, nodes_known=known)
            if status.status is Status.EXITED:
                why = "ran out of memory (OOMKilled)" if status.oom_killed else status.error
                raise BackendError(f"the runtime's pod ended while it booted: {why}", details={"reason": status.reason})
            events = watches.events_of(pod)
            seen = kube_states.progress(pod, events, self.pull_retries)
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
                if now - pulling_since > self.pull_timeout:
                    raise BackendError(
                        f"node {pod['spec'].get('nodeName')} was still pulling the runtime's image after "
                        f"{self.pull_timeout:g} s (ENVCTL_KUBE_PULL_TIMEOUT)"
                    )
            refused = kube_states.unschedulable(pod)
            if refused is not None and now - began > self.pending_timeout:
                raise BackendError(
                    f"the runtime could not be placed within {self.pending_timeout:g} s: "
                    + kube_states.missing_resource(spec.machine, refused),
                    details={"reason": "unschedulable", "scheduler": refused},
                )

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
        watches = self.watches(identity.installation)
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
                "namespace": self.api.namespace,
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
        self._sweep(identity, set(pods))
        return found

    def _sweep(self, identity: RunnerIdentity, pods: set[str]) -> None:
        """Remove this runner's Secrets that no pod owns and that are older than a boot takes
        (a crash between making them and the pod); never another installation's or runner's."""
        now = time.time()
        if now - self._swept < SWEEP_EVERY:
            return
        self._swept = now
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
        for w in self._watches.values():
            w.stop()
        self.api.close()
        if self._local is not None:
            self._local.close()

    # --- nodes ---------------------------------------------------------------------------
    def nodes(self, installation: str) -> list[dict[str, Any]]:
        watches = self.watches(installation)
        nodes = watches.nodes.items(wait=SYNC_WAIT)
        pods = watches.pods.items(wait=SYNC_WAIT)
        return kube_states.nodes_view(list(nodes.values()), list(pods.values()))

    def set_node_availability(self, name: str, availability: str) -> dict[str, Any]:
        """Cordon (``pause``, ``drain``: ``spec.unschedulable``) or uncordon (``active``) the
        node; the node as it was, in the shape ``runner/runtimes/drain.py`` reads. What a drain
        then stops is this runner's runtimes only (with their drafts); unlike Swarm's ``drain``
        nothing else is evicted: other workloads on the node are the cluster's (``kubectl
        drain``) and other installations' business."""
        if availability not in kube_states.AVAILABILITIES:
            raise InvalidInputError(
                f"availability must be one of {', '.join(kube_states.AVAILABILITIES)}, not {availability!r}",
                field="availability",
            )
        node = self.api.read_node(name)
        if node is None:
            raise NodeNotFoundError(f"the cluster has no node {name!r}", details={"node": name})
        self.api.patch_node(name, kube_states.availability_patch(availability))
        meta = node.get("metadata") or {}
        return {**node, "ID": str(meta.get("uid") or name), "Description": {"Hostname": str(meta.get("name") or name)}}

    # --- named volumes: PersistentVolumeClaims --------------------------------------------
    def _claims(self, spec: RuntimeSpec) -> dict[str, str]:
        return {b.source: kube_pods.claim_name(b.source) for b in spec.mounts if b.kind == "volume"}

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        claim = kube_pods.claim_name(name)
        found = self.api.read_claim(claim)
        inst = kube_pods.label_value(labels.get(LABEL_INSTALLATION, ""))
        if found is not None:
            if ((found.get("metadata") or {}).get("labels") or {}).get(LABEL_INSTALLATION) != inst:
                raise InvalidInputError(
                    f"a PersistentVolumeClaim {claim} exists and is not this installation's", field="mounts"
                )
            return
        with contextlib.suppress(ConflictError):
            self.api.create_claim(kube_pods.volume_claim(name, labels, self.storage_class, self.volume_size))

    def list_volumes(self, installation: str) -> list[VolumeFound]:
        sel = kube_pods.selector({LABEL_INSTALLATION: kube_pods.label_value(installation), LABEL_MANAGED: "volume"})
        out = []
        for c in self.api.list_claims(sel):
            meta = c.get("metadata") or {}
            source = str((meta.get("annotations") or {}).get(kube_pods.ANNOTATION_SOURCE) or meta.get("name"))
            out.append(VolumeFound(source, dict(meta.get("labels") or {}), str(meta.get("creationTimestamp") or "")))
        return out

    def remove_volume(self, name: str, installation: str) -> None:
        claim = kube_pods.claim_name(name)
        found = self.api.read_claim(claim)
        if found is None:
            return
        labels = (found.get("metadata") or {}).get("labels") or {}
        if labels.get(LABEL_INSTALLATION) != kube_pods.label_value(installation):
            return
        try:
            pods = self.watches(installation).pods.items(wait=SYNC_WAIT)
        except BackendError:
            pods = {}
        for pod in pods.values():
            for vol in (pod.get("spec") or {}).get("volumes") or []:
                if (vol.get("persistentVolumeClaim") or {}).get("claimName") == claim:
                    raise ConflictError(f"the volume {name} is in use by pod {pod['metadata']['name']}")
        self.api.delete_claim(claim)

    def _remove_leftover(self, spec: RuntimeSpec, watches: _Watches) -> None:
        name = kube_pods.object_name(spec.runtime_id)
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
