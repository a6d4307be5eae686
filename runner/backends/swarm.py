"""Runtimes as Docker Swarm services (``ENVCTL_RUNNER_BACKEND=swarm``), placed by Swarm's own
scheduler through the manager's Docker API (``ENVCTL_SWARM_MANAGER``, else ``DOCKER_HOST``).

Each runtime is one service with one task and restart condition ``none`` (Swarm would otherwise
make a new task after every failed pull, forever):

- its machine type becomes resource limits (CPU, memory, pids) and the same reservations (what
  the scheduler places by), generic resources for GPUs (``gpu`` as the nodes advertise them with
  ``dockerd --node-generic-resource``), and its ``constraints`` (node labels);
- the node pulls ``<registry>/<repository>@<digest>`` from envctl's registry with a pull-only
  token for exactly that repository, signed here and handed in the create call's
  ``X-Registry-Auth`` (it is in neither the service nor its task);
- the agent's code comes as Swarm configs (one per file, named by content, shared by the
  installation's runtimes), its per-boot credential as a Swarm secret made for the boot at
  ``/run/envctl/agent.key`` (an in-memory file; removed with the service); envctl dials the
  agent (``runner/channel.py``) at its port published in host mode on the task's node;
- states: ``preparing`` is the ``downloading`` phase (Swarm reports no bytes), ``starting`` is
  booting; ``rejected``/``failed`` fail the boot with the node's message; a task still
  ``pending`` after ``ENVCTL_SWARM_PENDING_TIMEOUT`` fails it naming the resource no node has
  (``swarm_tasks.missing_resource``); a node that is down turns its runtimes to ``node-lost``;
- mounts (``swarm_mounts``): git and S3 ones streamed in by envctl, a named volume pinning the
  runtime to its node, ``/results`` fetched over the channel.

Attach (containers envctl did not start, opt-in) is ``swarm_attach``. The service's spec and the
pull token are made in ``swarm_spec``; the agent's files in
``swarm_files``; task and node readings in ``swarm_tasks``. What Swarm 20.10 cannot enforce of R1
is in the README ("Docker Swarm").
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images import docker as engine
from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, InvalidInputError
from registry import distribution, signing
from runner.backends import (
    netguard,
    subnets,
    swarm_attach,
    swarm_fence,
    swarm_files,
    swarm_mounts,
    swarm_pools,
    swarm_spec,
    swarm_subnets,
    swarm_tasks,
)
from runner.backends.base import (
    AGENT_SOCKET,
    LABEL_INSTALLATION,
    LABEL_RUNNER,
    LABEL_RUNTIME,
    BackendState,
    ContainerStatus,
    FoundContainer,
    ImageInfo,
    OtherContainer,
    RuntimeBackend,
    RuntimeSpec,
    Status,
)
from runner.identity import RunnerIdentity
from runner.settings import Settings

log = logging.getLogger("envctl.swarm")
GPU_RESOURCE = swarm_spec.GPU_RESOURCE
POLL = 0.2
BOOT_POLL = 0.05  # while a boot waits for its task: each state change seen this much later at most


class SwarmBackend(RuntimeBackend):
    name = "swarm"
    channels = ("tcp",)
    saves_in_runtime = True
    images_from_registry = True
    host_paths = False  # mounts streamed in, results fetched, over the agent channel (swarm_mounts)

    def __init__(
        self,
        manager: str,
        *,
        registry: str,
        signing_key: signing.SigningKey | None,
        labels: dict[str, str] | None = None,
        log_max_size: str = "10m",
        token_ttl: int = 300,
        pending_timeout: float = 20.0,
        pull_timeout: float = 600.0,
        network: str = netguard.ISOLATED,
        attach_engine: str = "",
        subnet_pool: subnets.Pool | None = None,
        timeout: int = 30,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.signing_key = signing_key
        self.labels = dict(labels or {})
        self.log_max_size = log_max_size
        self.token_ttl = token_ttl
        self.pending_timeout = pending_timeout
        self.pull_timeout = pull_timeout
        self.network = network  # "isolated": the installation's fenced network (swarm_fence); "bridge": none
        self._timeout = timeout
        self._client: docker.DockerClient | None = None
        self._local: docker.DockerClient | None = None
        self._configs: dict[str, list[dict[str, Any]]] = {}  # installation -> the agent's config references
        self.attaching = swarm_attach.SwarmAttach(
            lambda: self.client,
            socket=attach_engine,
            registry=registry,
            labels=self.labels,
            create_service=self._create_service,
            registry_auth=self._registry_auth,
        )
        # subnets of the pool through the nodes' engines, when the attach grant gives them (opt-in)
        self.subnets = (
            swarm_subnets.NodeSubnets(self.attaching, subnet_pool, registry)
            if attach_engine and subnet_pool is not None and network == netguard.ISOLATED
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> SwarmBackend:
        manager = settings.swarm_manager or os.environ.get("DOCKER_HOST", "")
        if not manager:
            raise InvalidInputError(
                "the swarm backend needs the manager's Docker API: set ENVCTL_SWARM_MANAGER or DOCKER_HOST "
                "(e.g. unix:///var/run/docker.sock on a manager, or tcp://manager:2376)",
                field="swarm_manager",
            )
        chosen = distribution.plan(settings)
        registry = settings.swarm_registry.strip()
        key = None
        if chosen.mode == "managed":
            key = distribution.signing_key(settings)
            if not registry:
                host = settings.registry_listen or "127.0.0.1"
                if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):  # noqa: S104  (a comparison)
                    raise InvalidInputError(
                        "the swarm's nodes cannot reach a registry on this host's loopback: set "
                        "ENVCTL_SWARM_REGISTRY to the registry's host[:port] as the nodes reach it "
                        "(and ENVCTL_REGISTRY_LISTEN so that the managed registry listens there)",
                        field="swarm_registry",
                    )
                registry = host
            if ":" not in registry.rsplit("]", 1)[-1]:
                registry = f"{registry}:{distribution.port_of(settings)}"
        elif not registry:
            raise InvalidInputError(
                "the swarm backend pulls images from envctl's managed registry (ENVCTL_REGISTRY=managed); "
                "with another registry set ENVCTL_SWARM_REGISTRY and give the nodes its credentials",
                field="swarm_registry",
            )
        return cls(
            manager,
            registry=registry,
            signing_key=key,
            labels=settings.runner_labels,
            log_max_size=settings.runner_log_max_size,
            token_ttl=settings.registry_token_ttl,
            pending_timeout=settings.swarm_pending_timeout,
            pull_timeout=settings.swarm_pull_timeout,
            network=settings.runner_network,
            attach_engine=settings.swarm_attach_engine,
            subnet_pool=subnets.Pool.of(settings.runner_subnet_pool, settings.runner_subnet_prefix),
        )

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.DockerClient(base_url=self.manager, timeout=self._timeout)
            except docker.errors.DockerException as exc:
                raise BackendError(
                    f"the Swarm manager's Docker API at {self.manager} does not answer",
                    details={"action": "connect", "cause": str(exc)[:300]},
                ) from exc
        return self._client

    # --- the contract ------------------------------------------------------------------
    def ping(self) -> None:
        try:
            info = self.client.info()
        except Exception as exc:
            raise daemon_error("answer a ping", exc) from exc
        swarm = info.get("Swarm") or {}
        if not swarm.get("ControlAvailable"):
            raise BackendError(
                f"the engine at {self.manager} is not a Swarm manager (its swarm state: "
                f"{swarm.get('LocalNodeState') or 'inactive'}); point ENVCTL_SWARM_MANAGER at a manager",
                details={"field": "swarm_manager"},
            )

    def service_spec(
        self,
        spec: RuntimeSpec,
        secret: dict[str, Any],
        configs: list[dict[str, Any]],
        pinned: list[str] | None = None,
        network: str | None = None,
    ) -> dict[str, Any]:
        return swarm_spec.service_spec(
            spec,
            secret,
            configs,
            registry=self.registry,
            labels=self.labels,
            log_max_size=self.log_max_size,
            pinned=pinned,
            network=network,
            memory_watch=self.memory_watch,
        )

    def pull_token(self, repository: str) -> str:
        return swarm_spec.pull_token(self.signing_key, repository, self.token_ttl)

    def start(self, spec: RuntimeSpec) -> BackendState:
        if spec.channel != "tcp" or not spec.credential:
            raise InvalidInputError("the swarm backend needs ENVCTL_RUNNER_CHANNEL=tcp", field="runner_channel")
        repository, sep, digest = spec.image.partition("@")
        if not sep or not digest.startswith("sha256:"):
            raise BackendError(f"the swarm backend boots images by registry digest, not {spec.image!r}")
        installation = spec.labels.get(LABEL_INSTALLATION, "")
        self._remove_leftover(spec)
        configs = self.agent_configs(installation)
        pinned = swarm_mounts.pins(self.client, spec)  # named volumes: the node that holds them
        if pinned and (why := swarm_mounts.unavailable(pinned, self._list_nodes())):
            raise BackendError(f"the runtime cannot boot: {why}", details={"volume_nodes": pinned})
        for attempt in (1, 2):
            network = self.fence(installation, spec, repository)
            secret = self._make_secret(spec)
            state: BackendState = {
                "service_id": "",
                "container_name": spec.container_name,
                "secret_id": secret["SecretID"],
            }
            try:
                body = self.service_spec(spec, secret, configs, swarm_mounts.constraints(pinned), network)
                state["service_id"] = self._create_service(body, self._registry_auth(repository))
                state.update(self._wait_running(spec, state, pinned))
                if self.network == netguard.ISOLATED:
                    swarm_fence.check_node(self.client, installation, state["node_id"], state["node"])
                nodes = swarm_mounts.record(self.client, spec, pinned, state["node_id"], state["node"], self.labels)
                return {**state, **({"volume_nodes": nodes} if nodes else {})}
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    self.stop(state, timeout=0)
                if attempt == 1 and isinstance(exc, BackendError) and _transient(exc):
                    log.warning("runtime %s: %s; trying once more with a new service", spec.runtime_id, exc.message)
                    continue
                if attempt == 1 and isinstance(exc, BackendError) and self._stale_network(exc, installation):
                    log.warning("runtime %s: %s; a new network generation for it", spec.runtime_id, exc.message)
                    swarm_fence.renew(self.client, installation, self.labels, self._make_network)
                    continue
                if attempt == 1 and isinstance(exc, BackendError) and self._repaired(exc, installation):
                    log.warning("runtime %s: %s; its network configuration made there", spec.runtime_id, exc.message)
                    continue
                if isinstance(exc, BackendError) and (full := swarm_pools.exhausted(self.client, exc, installation)):
                    raise full from exc  # R44: the node's address pools are all taken
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _stale_network(self, exc: BackendError, installation: str) -> bool:
        if self.network != netguard.ISOLATED:
            return False
        return swarm_fence.stale_network(exc, swarm_fence.networks(self.client, installation))

    @property
    def _make_network(self) -> swarm_fence.NetworkMaker | None:
        return self.subnets.create_network if self.subnets is not None else None

    def _repaired(self, exc: BackendError, installation: str) -> bool:
        """A node lacked the config-only network (``swarm_subnets``): made there."""
        return self.subnets is not None and self.subnets.repair(self.client, exc, installation)

    def _registry_auth(self, repository: str) -> str:
        """``X-Registry-Auth`` with a fresh pull token for ``repository``."""
        token = self.pull_token(repository)
        return base64.urlsafe_b64encode(json.dumps({"registrytoken": token}).encode()).decode()

    def fence(self, installation: str, spec: RuntimeSpec, repository: str) -> str | None:
        """The network the runtime joins: with ``isolated`` the installation's own, fenced in on
        every node (``swarm_fence``, R4); ``bridge`` none (each node's default bridge); any
        other value a swarm-scoped network of that name."""
        if self.network == "bridge":
            return None
        if self.network != netguard.ISOLATED:
            return self.network
        # the guard runs with NET_ADMIN in the node's namespace: never a user's image, only an
        # envctl base image (the root of the runtime's lineage, runner/runtimes/boot.py)
        trusted, sep, digest = spec.trusted_image.partition("@")
        if not sep or not digest.startswith("sha256:"):
            raise BackendError("the network guard needs an envctl base image by registry digest (none was given)")
        return swarm_fence.ensure(
            self.client,
            installation,
            self.labels,
            f"{self.registry}/{spec.trusted_image}",
            self._registry_auth(trusted),
            timeout=self.pull_timeout,
            make=self._make_network,
        )

    def _wait_running(self, spec: RuntimeSpec, state: BackendState, pinned: dict[str, Any]) -> BackendState:
        """Until the task runs: its node and the agent's address; ``BackendError`` naming the node's
        message when it fails, or the resource no node has when it stays pending."""
        began = time.monotonic()
        pulling_since: float | None = None
        phase: str | None = None
        while True:
            tasks = self._tasks(state["service_id"])
            task = swarm_tasks.latest_task(tasks)
            now = time.monotonic()
            if task is not None:
                want = "downloading" if task.state == swarm_tasks.PULLING else swarm_tasks.WAITING.get(task.state)
                if want != phase and spec.on_phase is not None:
                    phase = want
                    spec.on_phase(want)
                if task.state == "running":
                    node = self._node(task.node_id)
                    return {
                        "node": swarm_tasks.node_name(node),
                        "node_id": task.node_id,
                        "agent": {
                            "channel": "tcp",
                            "host": swarm_spec.node_address(node),
                            "port": swarm_spec.published(task),
                        },
                        # an app's port, published on the node too (``endpoint``)
                        "ports": {str(p): swarm_spec.published(task, p) for p in spec.ports},
                    }
                if task.state in swarm_tasks.ENDED:
                    where = swarm_tasks.node_name(self._node(task.node_id)) if task.node_id else ""
                    text = task.err or task.message or task.state
                    pull = f" (the node could not pull {self.registry}/{spec.image})" if "No such image" in text else ""
                    raise BackendError(
                        f"the runtime's task was {task.state}"
                        + (f" on node {where}" if where else "")
                        + f": {text}{pull}",
                        details={"task_state": task.state, "node": where, "node_id": task.node_id, "swarm_error": text},
                    )
                if task.state == swarm_tasks.PULLING:
                    pulling_since = pulling_since or now
                    if now - pulling_since > self.pull_timeout:
                        raise BackendError(
                            f"node {swarm_tasks.node_name(self._node(task.node_id))} was still pulling the runtime's "
                            f"image after {self.pull_timeout:g} s (ENVCTL_SWARM_PULL_TIMEOUT)",
                            details={"task_state": task.state},
                        )
                elif task.state == "pending" and now - began > self.pending_timeout:
                    nodes = self._list_nodes()
                    why = swarm_tasks.missing_resource(
                        spec.machine, GPU_RESOURCE, nodes, self._all_tasks(), task.err or task.message
                    )
                    raise BackendError(
                        f"the runtime could not be placed within {self.pending_timeout:g} s: {why}"
                        + swarm_mounts.pinned_note(pinned),
                        details={"task_state": "pending", "swarm_error": task.err},
                    )
            time.sleep(BOOT_POLL)

    def poll(self, state: BackendState) -> ContainerStatus:
        sid = state.get("service_id")
        if not sid:
            return ContainerStatus(Status.GONE)
        try:
            self.client.api.inspect_service(sid)
        except docker.errors.NotFound:
            return ContainerStatus(Status.GONE)
        except Exception as exc:
            raise daemon_error("inspect the runtime's service", exc) from exc
        task = swarm_tasks.latest_task(self._tasks(sid))
        nodes = {str(n.get("ID")): n for n in self._list_nodes()}
        return swarm_tasks.status_of(task, nodes)

    def stop(self, state: BackendState, timeout: float = 5.0) -> None:
        sid = state.get("service_id")
        if sid and state.get("agent") and self.release_agent is not None:
            self.release_agent(state)  # envctl stops it: the agent's SIGTERM waits for no draft
        if sid:
            try:
                self.client.api.remove_service(sid)
            except docker.errors.NotFound:
                pass
            except Exception as exc:
                raise daemon_error("remove the runtime's service", exc) from exc
        if sid:
            swarm_tasks.wait_removed(self._tasks, self._list_nodes, str(sid), swarm_spec.STOP_GRACE_NS / 1e9 + 10)
        secret = state.get("secret_id")
        if secret:
            swarm_files.remove_secret(self.client, secret, "the runtime's credential secret", 10, POLL)

    def list_owned(self, identity: RunnerIdentity) -> list[FoundContainer]:
        try:
            services = self.client.api.services(
                filters={"label": [f"{LABEL_INSTALLATION}={identity.installation}", f"{LABEL_RUNNER}={identity.name}"]}
            )
            tasks = self._all_tasks()
            nodes = {str(n.get("ID")): n for n in self._list_nodes()}
        except Exception as exc:
            raise daemon_error("list the runner's services", exc) from exc
        by_service: dict[str, list[dict[str, Any]]] = {}
        for t in tasks:
            by_service.setdefault(str(t.get("ServiceID")), []).append(t)
        found = []
        for svc in services:
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            if not labels.get(LABEL_RUNTIME):
                continue
            sid = str(svc["ID"])
            task = swarm_tasks.latest_task(by_service.get(sid, []))
            status = swarm_tasks.status_of(task, nodes)
            state: BackendState = {"service_id": sid, "container_name": (svc.get("Spec") or {}).get("Name", "")}
            secret_refs = (((svc.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}).get(
                "Secrets"
            ) or []
            if secret_refs:
                state["secret_id"] = secret_refs[0].get("SecretID")
            if task is not None and task.node_id:
                state["node_id"] = task.node_id
                state["node"] = swarm_tasks.node_name(nodes.get(task.node_id))
            found.append(FoundContainer(runtime_id=labels[LABEL_RUNTIME], state=state, status=status))
        return found

    def socket_path(self, state: BackendState, state_dir: Path) -> Path:
        return state_dir / AGENT_SOCKET  # never made: a Swarm runtime's agent is on the tcp channel

    publishes_ports = True

    def endpoint(self, state: BackendState, port: int) -> str | None:
        """The task's node and the node's port ``port`` is published on (in host mode, as the
        agent's): the runtime's own address is on a bridge of that node, out of envctl's reach."""
        host = (state.get("agent") or {}).get("host")
        published = (state.get("ports") or {}).get(str(port))
        return f"{host}:{published}" if host and published else None

    def logs_tail(self, state: BackendState, lines: int = 20) -> str:
        sid = state.get("service_id")
        if not sid:
            return ""
        try:
            out = self.client.api.service_logs(sid, stdout=True, stderr=True, tail=lines)
            return b"".join(out).decode(errors="replace") if not isinstance(out, bytes) else out.decode()
        except Exception:
            return ""

    # images: built and pushed on this host's engine; the nodes pull them from the registry
    def engine_client(self) -> docker.DockerClient | None:
        if self._local is None:
            try:
                self._local = docker.from_env(timeout=self._timeout)
            except docker.errors.DockerException:
                return None
        return self._local

    def image_info(self, image: str) -> ImageInfo | None:
        client = self.engine_client()
        return None if client is None else engine.info(client, image)

    def close(self) -> None:
        for c in (self._client, self._local):
            if c is not None:
                c.close()

    # --- attach (swarm_attach: helper tasks on the node, opt-in) --------------------------
    attach_inside = True

    def wire_attach(self, image: Callable[[], str], identity: dict[str, str]) -> None:
        self.attaching.wire(image, identity)

    def inspect_other(self, container: str) -> OtherContainer | None:
        return self.attaching.find(container)

    def place_agent(self, other: OtherContainer, runtime_id: str, credential: bytes) -> BackendState:
        return self.attaching.place(other, runtime_id, credential)

    def remove_agent(self, state: BackendState) -> dict[str, Any]:
        return self.attaching.remove(state)

    def other_alive(self, state: BackendState) -> bool:
        return self.attaching.alive(state)

    def sweep_placed(self, keep: Callable[[], set[str]]) -> list[str]:
        return self.attaching.sweep(keep)

    # --- nodes ---------------------------------------------------------------------------
    def nodes(self, installation: str) -> list[dict[str, Any]]:
        try:
            nodes = self._list_nodes()
            tasks = self._all_tasks()
            services = self.client.api.services(filters={"label": [f"{LABEL_INSTALLATION}={installation}"]})
        except Exception as exc:
            raise daemon_error("list the swarm's nodes", exc) from exc
        return swarm_tasks.nodes_view(nodes, tasks, services)

    def set_node_availability(self, name: str, availability: str) -> dict[str, Any]:
        return swarm_tasks.set_availability(self.client, name, availability)

    # --- helpers -------------------------------------------------------------------------
    def agent_configs(self, installation: str) -> list[dict[str, Any]]:
        if installation not in self._configs:
            self._configs[installation] = swarm_files.agent_configs(self.client, installation, self.labels)
        return self._configs[installation]

    def _make_secret(self, spec: RuntimeSpec) -> dict[str, Any]:
        return swarm_files.credential_secret(self.client, spec, self.labels)

    def _remove_leftover(self, spec: RuntimeSpec) -> None:
        try:
            found = self.client.api.services(filters={"name": spec.container_name})
        except Exception as exc:
            raise daemon_error("look for a leftover service", exc) from exc
        for svc in found:
            if (svc.get("Spec") or {}).get("Name") != spec.container_name:
                continue
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            if labels.get(LABEL_RUNTIME) != spec.runtime_id or labels.get(LABEL_INSTALLATION) != spec.labels.get(
                LABEL_INSTALLATION
            ):
                raise BackendError(
                    f"a service named {spec.container_name} exists and is not this runtime's; remove it by hand",
                    details={"service": spec.container_name},
                )
            secrets = ((svc["Spec"].get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Secrets") or []
            self.stop({"service_id": svc["ID"], "secret_id": secrets[0]["SecretID"] if secrets else None})

    def _create_service(self, body: dict[str, Any], registry_auth: str) -> str:
        """``POST /services/create`` with the pull token in ``X-Registry-Auth``: the Docker SDK's
        ``create_service`` takes that header only from the client's stored credentials."""
        api = self.client.api
        try:
            response = api.post(
                f"{api.base_url}/v{api.api_version}/services/create",
                data=json.dumps(body),
                headers={"Content-Type": "application/json", "X-Registry-Auth": registry_auth},
                timeout=self._timeout,
            )
        except Exception as exc:
            raise daemon_error("create the runtime's service", exc) from exc
        if response.status_code >= 400:
            try:
                why = str(response.json().get("message") or response.text)
            except ValueError:
                why = response.text
            raise BackendError(
                f"the Swarm manager refused the runtime's service: {why[:500]}",
                details={"status": response.status_code},
            )
        return str(response.json()["ID"])

    def _tasks(self, service_id: str) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.tasks(filters={"service": service_id}))
        except Exception as exc:
            raise daemon_error("list the runtime's task", exc) from exc

    def _all_tasks(self) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.tasks())
        except Exception as exc:
            raise daemon_error("list the swarm's tasks", exc) from exc

    def _list_nodes(self) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.nodes())
        except Exception as exc:
            raise daemon_error("list the swarm's nodes", exc) from exc

    def _node(self, node_id: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.api.inspect_node(node_id))
        except docker.errors.NotFound:
            return None
        except Exception as exc:
            raise daemon_error("inspect the task's node", exc) from exc


_transient = swarm_spec.transient
_status = swarm_tasks.status_of  # where it lives now (runner/backends/swarm_tasks.py)
