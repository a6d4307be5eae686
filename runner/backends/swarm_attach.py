"""Attach on the Swarm backend (runner/runtimes/attach.py): a container envctl did not start, on
any node of the swarm, named by its id or name (``NAME/NODE`` when two nodes have one of that
name), allowed by ``ENVCTL_RUNNER_ATTACH_ALLOW`` as on the other backends.

The manager's Docker API knows services and tasks, not a node's own containers, and cannot
exec into one on a worker. So attaching is opt-in: with ``ENVCTL_SWARM_ATTACH_ENGINE`` (the
nodes' Docker socket path; a node's label ``envctl.engine-socket`` overrides it, as for a
rootless engine) envctl runs short helper tasks on the node itself, Swarm services of its
installation pinned with ``node.id==<node>``, that hold the node's socket: which gives envctl
every node's Docker engine, and only an admin turns it on. The helper (``swarm_helper``) checks
that the socket is that node's engine before anything else.

- Finding (``find``): one job per ready node at once, each inspecting the name on its node
  (read only: no variables read, ``python3`` looked for by a stat through the archive API).
- Attaching (``place``): a secret of the installation holds the attach's fresh credential line;
  the relay helper (a service, its task on the container's node, the host network) reads it
  from its in-memory secret file and the agent's files from the configs the runtimes use, and
  runs the bootstrap of ``agent_bootstrap`` by ``docker exec`` with that line on standard
  input, as Kubernetes' ``pods/exec`` does. The agent listens in the container; the relay listens
  on the node's address and forwards to it (envctl dials the node as it dials its own tasks'
  published ports). The container's networks, mounts and configuration are not touched.
- Watching (``alive``): the relay ends when the container stops, is removed or restarts; envctl
  reads the relay's task state from the manager.
- Detaching (``remove``): a stop job runs the stopper by ``docker exec`` and answers what is
  left; then the relay service and the secret are removed. The container is never stopped,
  restarted, removed or committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, ConflictError, InvalidInputError, NotSupportedError
from runner.backends import agent_bootstrap, swarm_files, swarm_spec, swarm_tasks
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED, OtherContainer
from runner.backends.swarm_helper import CREDENTIAL, ENGINE, HELPER

log = logging.getLogger("envctl.swarm")
NODE_SOCKET_LABEL = "envctl.engine-socket"  # a node's own Docker socket path, when not the setting's
LABEL_ATTACHED = "envctl.attached-runtime"  # on a relay and its secret: the runtime attached
JOB_TIMEOUT = 120.0  # a helper job: placed, pulled (the bash base, once per node), done
RELAY_TIMEOUT = 120.0
WARM_TIMEOUT = 300.0
POLL = 0.1
ENDED = {"complete", "failed", "rejected", "shutdown", "orphaned", "remove"}


class SwarmAttach:
    """Attach through helper tasks; ``client`` the manager's, ``create_service`` posts a body with
    a registry auth header, ``registry_auth`` makes one for a repository."""

    def __init__(
        self,
        client: Callable[[], docker.DockerClient],
        *,
        socket: str,
        registry: str,
        labels: dict[str, str],
        create_service: Callable[[dict[str, Any], str], str],
        registry_auth: Callable[[str], str],
    ) -> None:
        if socket and not socket.startswith("/"):
            raise InvalidInputError(
                f"ENVCTL_SWARM_ATTACH_ENGINE: {socket!r} is no absolute path of the nodes' Docker socket "
                "(e.g. /var/run/docker.sock)",
                field="swarm_attach_engine",
            )
        self.client = client
        self.socket = socket
        self.registry = registry
        self.labels = labels
        self.create_service = create_service
        self.registry_auth = registry_auth
        #: the bash base in the registry (``repo@digest``), pushed first when needed; and the
        #: installation's labels (wired at start-up, runner/service.py)
        self.image: Callable[[], str] | None = None
        self.identity: dict[str, str] = {}
        self.warming: threading.Thread | None = None

    def wire(self, image: Callable[[], str], identity: dict[str, str]) -> None:
        self.image, self.identity = image, dict(identity)
        if self.socket and self.warming is None:
            self.warming = threading.Thread(target=self.warm, name="envctl-attach-warm", daemon=True)
            self.warming.start()

    def warm(self) -> None:
        """At start-up (a thread of its own): the helpers' image pushed and pulled on every ready
        node by a find of no container, so an attach waits for neither; said in the log."""
        if not self.socket or self.image is None:
            return
        begun = time.monotonic()
        while True:  # the server's registry may still be starting
            try:
                self.find(f"envctl-warm-{uuid.uuid4().hex[:8]}")
                break
            except Exception as exc:  # after a while: an attach then tries again and says what failed
                if time.monotonic() - begun > WARM_TIMEOUT:
                    log.warning("attach helpers: not ready: %s", getattr(exc, "message", exc))
                    return
                log.debug("attach helpers: not ready yet: %s", getattr(exc, "message", exc))
                time.sleep(2)
        log.info("attach helpers ready on the swarm's nodes in %.1f s", time.monotonic() - begun)

    # ------------------------------------------------------------------ finding
    def enabled(self) -> None:
        if not self.socket:
            raise NotSupportedError(
                "attach on the swarm backend is off: envctl would need each node's Docker engine to reach a "
                "container there; an admin turns it on with ENVCTL_SWARM_ATTACH_ENGINE=/var/run/docker.sock "
                "(the nodes' Docker socket path; a node label envctl.engine-socket overrides it per node)",
                details={"setting": "ENVCTL_SWARM_ATTACH_ENGINE"},
            )

    def find(self, ref: str) -> OtherContainer | None:
        """The container ``NAME`` or ``NAME/NODE`` (a node's hostname or id) on the swarm's ready
        nodes; None: no node has it."""
        self.enabled()
        name, _, wanted = ref.strip().partition("/")
        if not name or "/" in wanted:
            raise InvalidInputError("attach.container: give a container's id or name, or NAME/NODE", field="attach")
        nodes = [n for n in self._nodes() if swarm_tasks.node_down(n) is None]
        if wanted:
            nodes = [n for n in nodes if wanted in (str(n.get("ID")), swarm_tasks.node_name(n))]
        said = self.run_jobs({str(n["ID"]): ["find", str(n["ID"]), name] for n in nodes}, "find")
        hits = []
        for n in nodes:
            out = said.get(str(n["ID"])) or {}
            if out.get("error"):
                raise BackendError(str(out["error"]), details={"node": swarm_tasks.node_name(n)})
            if out.get("found"):
                hits.append((n, dict(out["found"])))
        if len(hits) > 1:
            where = ", ".join(f"{f['name']}/{swarm_tasks.node_name(n)}" for n, f in hits)
            raise InvalidInputError(
                f"attach.container: {name!r} names containers on more than one node ({where}); give NAME/NODE",
                field="attach",
            )
        if not hits:
            return None
        node, f = hits[0]
        return OtherContainer(
            id=str(f["id"]),
            name=str(f["name"]),
            labels={str(k): str(v) for k, v in (f.get("labels") or {}).items()},
            running=bool(f.get("running")),
            pid=0,
            env={},  # not read: a container's variables may hold its secrets
            working_dir=str(f.get("working_dir") or ""),
            user=str(f.get("user") or ""),
            member=swarm_tasks.node_name(node),
            address=swarm_spec.node_address(node),
            node_id=str(node["ID"]),
            python=bool(f.get("python")),
        )

    # ------------------------------------------------------------------ attaching
    def place(self, c: OtherContainer, runtime_id: str, credential: bytes) -> dict[str, Any]:
        """The agent in ``c`` and a relay to it on its node (see the module's doc)."""
        self.enabled()
        if not c.address or not c.node_id:
            raise ConflictError(f"container {c.name}: its node has no address", details={"container": c.name})
        self._remove_leftovers(runtime_id)
        for attempt in (1, 2):
            try:
                return self._place(c, runtime_id, credential)
            except BackendError as exc:
                # a directory an earlier attach left (its relay gone with its node's engine, say)
                # was removed by this try's clean-up: the one failure worth a second try
                if attempt == 2 or "cannot make" not in exc.message:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _place(self, c: OtherContainer, runtime_id: str, credential: bytes) -> dict[str, Any]:
        where = agent_bootstrap.directory(runtime_id)
        labels = {**self._labels(), LABEL_ATTACHED: runtime_id}
        try:
            secret_name = f"envctl-attach-{runtime_id}-{uuid.uuid4().hex[:8]}"
            secret_id = str(self.client().api.create_secret(secret_name, credential, labels=labels)["ID"])
        except Exception as exc:
            raise daemon_error("hand the attach its credential as a secret", exc) from exc
        state: dict[str, Any] = {
            "origin": "attached",
            "inside": "swarm",
            "node": c.member,
            "node_id": c.node_id,
            "container_id": c.id,
            "container_name": f"{c.name}/{c.member}",
            "dir": where,
            "secret_id": secret_id,
            "relay": "",
            "python": True,
        }
        try:
            secret = {
                "SecretID": secret_id,
                "SecretName": secret_name,
                "File": {"Name": CREDENTIAL, "UID": "0", "GID": "0", "Mode": 0o400},
            }
            configs = swarm_files.agent_configs(self.client(), self.identity.get(LABEL_INSTALLATION, ""), self.labels)
            body = self._body(
                f"envctl-attach-{runtime_id}-{uuid.uuid4().hex[:6]}",
                c.node_id,
                ["relay", c.node_id, c.id, where, c.address],
                labels,
                job=False,
                extra={"Secrets": [secret], "Configs": configs},
            )
            image = body["TaskTemplate"]["ContainerSpec"]["Image"]
            state["relay"] = self.create_service(body, self.registry_auth(image.split("/", 1)[1].split("@")[0]))
            said = self._first_line(state["relay"], RELAY_TIMEOUT)
            if "error" in said or "port" not in said:
                raise BackendError(
                    f"attaching to {c.name} on node {c.member} failed: {said.get('error') or said}",
                    details={"container": c.name, "node": c.member},
                )
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(state)
            raise
        state.update(reaper_pid=int(said["reaper"]), in_container_pid=int(said["agent"]))
        return {**state, "host": c.address, "port": int(said["port"])}

    def remove(self, state: dict[str, Any]) -> dict[str, Any]:
        """The agent ended and its directory gone (a stop job on the node), then the relay and its
        secret removed; what is still there (``left``, ``dir_left``)."""
        args = agent_bootstrap.stopper_args(state)
        node = str(state.get("node_id") or "")
        left: dict[str, Any] = {}
        if args is not None and node and state.get("container_id"):
            out = self.run_jobs({node: ["stop", node, str(state["container_id"]), *args]}, "stop").get(node) or {}
            if out.get("error"):
                raise BackendError(f"detaching on node {state.get('node')}: {out['error']}")
            left = {"left": out.get("left") or [], "dir_left": bool(out.get("dir_left"))}
        relay = str(state.get("relay") or "")
        if relay:
            self._remove_service(relay)
        if state.get("secret_id"):
            self._remove_secret(str(state["secret_id"]))
        return left

    def _remove_leftovers(self, runtime_id: str) -> None:
        """A relay and secret an envctl that died while attaching left for this runtime: removed
        (the relay ends its agent on SIGTERM), so the bootstrap finds no directory in its way."""
        mine = [f"{LABEL_ATTACHED}={runtime_id}", f"{LABEL_INSTALLATION}={self.identity.get(LABEL_INSTALLATION, '')}"]
        try:
            relays = self.client().api.services(filters={"label": mine})
            secrets = self.client().api.secrets(filters={"label": mine})
        except Exception as exc:
            raise daemon_error("look for a leftover attach relay", exc) from exc
        for svc in relays:
            self._remove_service(str(svc["ID"]))
        for secret in secrets:
            self._remove_secret(str(secret["ID"]))

    def sweep(self, keep: Callable[[], set[str]]) -> list[str]:
        """Relays of this runner whose runtime is not in ``keep()`` removed (they end their agent
        on SIGTERM), and their secrets once free (a later round when still in use); the ids."""
        if not self.socket or not self.identity:
            return []
        mine = {"label": [LABEL_ATTACHED, *(f"{k}={v}" for k, v in self.identity.items())]}
        try:
            relays = self.client().api.services(filters=mine)
            secrets = self.client().api.secrets(filters=mine)
        except Exception as exc:
            raise daemon_error("list the attach relays", exc) from exc
        if not relays and not secrets:
            return []
        kept = keep()
        gone: list[str] = []
        for svc in relays:
            rid = str(((svc.get("Spec") or {}).get("Labels") or {}).get(LABEL_ATTACHED, ""))
            if rid and rid not in kept:
                with contextlib.suppress(docker.errors.NotFound):
                    self.client().api.remove_service(svc["ID"])
                log.warning("removed the attach relay %s of runtime %s, which is not attached", svc["ID"], rid)
                gone.append(rid)
        for secret in secrets:
            rid = str(((secret.get("Spec") or {}).get("Labels") or {}).get(LABEL_ATTACHED, ""))
            if rid and rid not in kept:
                with contextlib.suppress(docker.errors.APIError):  # in use until its relay ended
                    self.client().api.remove_secret(secret["ID"])
        return gone

    def alive(self, state: dict[str, Any]) -> bool:
        """The relay's task runs: it ends when the container stops, goes or restarts."""
        relay = str(state.get("relay") or "")
        if not relay:
            return False
        tasks = [t for t in self._tasks() if t.get("ServiceID") == relay]
        return any((t.get("Status") or {}).get("State") == "running" for t in tasks)

    # ------------------------------------------------------------------ helper tasks
    def _labels(self) -> dict[str, str]:
        return {**self.labels, **self.identity, LABEL_MANAGED: "attach-helper"}

    def _socket_of(self, node_id: str) -> str:
        node = next((n for n in self._nodes() if str(n.get("ID")) == node_id), {})
        labels = ((node.get("Spec") or {}).get("Labels")) or {}
        path = str(labels.get(NODE_SOCKET_LABEL) or self.socket)
        if not path.startswith("/"):
            raise InvalidInputError(
                f"node {swarm_tasks.node_name(node)}: its label {NODE_SOCKET_LABEL}={path!r} is no absolute path",
                field=NODE_SOCKET_LABEL,
            )
        return path

    def _body(
        self,
        name: str,
        node_id: str,
        args: list[str],
        labels: dict[str, str],
        *,
        job: bool,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.image is None:
            raise BackendError("attach helpers have no image (the server did not wire one)")
        container = {
            "Image": f"{self.registry}/{self.image()}",
            "Command": ["python3", "-I", "-B", "-c", HELPER, *args],
            "Labels": labels,
            "Mounts": [{"Type": "bind", "Source": self._socket_of(node_id), "Target": ENGINE}],
            "StopGracePeriod": int(30e9),  # the relay ends the agent on SIGTERM
            **(extra or {}),
        }
        return {
            "Name": name,
            "Labels": labels,
            "TaskTemplate": {
                "ContainerSpec": container,
                "Placement": {"Constraints": [f"node.id=={node_id}"]},
                "Networks": [{"Target": self._host_network()}],
                "RestartPolicy": {"Condition": "none"},
                "Resources": {"Limits": {"NanoCPUs": int(0.25e9), "MemoryBytes": 96 << 20, "Pids": 64}},
                "LogDriver": {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "1"}},
            },
            "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
            if job
            else {"Replicated": {"Replicas": 1}},
        }

    def run_jobs(self, jobs: dict[str, list[str]], what: str) -> dict[str, dict[str, Any]]:
        """One helper job per node (``node id -> args``), all at once; each one's JSON line."""
        made: dict[str, str] = {}
        try:
            for node_id, args in jobs.items():
                body = self._body(f"envctl-{what}-{uuid.uuid4().hex[:10]}", node_id, args, self._labels(), job=True)
                image = body["TaskTemplate"]["ContainerSpec"]["Image"]
                made[node_id] = self.create_service(body, self.registry_auth(image.split("/", 1)[1].split("@")[0]))
            out: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + JOB_TIMEOUT
            while len(out) < len(made):
                tasks = self._tasks()
                for node_id, sid in made.items():
                    if node_id in out:
                        continue
                    mine = [t for t in tasks if t.get("ServiceID") == sid]
                    task = swarm_tasks.latest_task(mine)
                    if task is not None and task.state in ENDED:
                        out[node_id] = self._last_line(sid) or {
                            "error": f"the {what} helper was {task.state}: {task.err or task.message}"
                        }
                if time.monotonic() > deadline:
                    raise BackendError(f"envctl's {what} helper did not finish within {JOB_TIMEOUT:g} s")
                if len(out) < len(made):
                    time.sleep(POLL)
            return out
        finally:
            for sid in made.values():
                with contextlib.suppress(Exception):
                    self.client().api.remove_service(sid)

    def _first_line(self, service_id: str, bound: float) -> dict[str, Any]:
        """The relay's first line: its port, or its error; or why its task ended."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            said = self._last_line(service_id, first=True)
            if said:
                return said
            task = swarm_tasks.latest_task([t for t in self._tasks() if t.get("ServiceID") == service_id])
            if task is not None and task.state in ENDED:
                said = self._last_line(service_id, first=True)
                return said or {"error": f"the relay's task was {task.state}: {task.err or task.message}"}
            time.sleep(POLL)
        raise BackendError(f"envctl's attach relay did not start within {bound:g} s")

    def _last_line(self, service_id: str, first: bool = False) -> dict[str, Any]:
        try:
            got = self.client().api.service_logs(service_id, stdout=True, stderr=True)
            text = (got if isinstance(got, bytes) else b"".join(got)).decode(errors="replace")
        except Exception:
            return {}
        lines = [ln for ln in text.splitlines() if ln.strip().startswith("{")]
        if not lines:
            return {}
        try:
            return dict(json.loads(lines[0] if first else lines[-1]))
        except ValueError:
            return {}

    def _remove_service(self, service_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            try:
                self.client().api.remove_service(service_id)
            except docker.errors.NotFound:
                raise
            except Exception as exc:
                raise daemon_error("remove the attach relay", exc) from exc
        deadline = time.monotonic() + 40  # the relay ends the agent on SIGTERM (grace 30 s)
        while time.monotonic() < deadline:
            tasks = [t for t in self._tasks() if t.get("ServiceID") == service_id]
            if not any((t.get("Status") or {}).get("State") not in ENDED for t in tasks):
                return
            time.sleep(POLL * 2)

    def _remove_secret(self, secret_id: str) -> None:
        swarm_files.remove_secret(self.client(), secret_id, "the attach's credential secret", 15, POLL * 2)

    def _host_network(self) -> str:
        try:
            found = [n for n in self.client().api.networks(names=["host"]) if n.get("Name") == "host"]
        except Exception as exc:
            raise daemon_error("find the manager's host network", exc) from exc
        if not found:
            raise BackendError("the Swarm manager has no 'host' network for envctl's attach helpers")
        return str(found[0]["Id"])

    def _tasks(self) -> list[dict[str, Any]]:
        try:
            return list(self.client().api.tasks())
        except Exception as exc:
            raise daemon_error("list the swarm's tasks", exc) from exc

    def _nodes(self) -> list[dict[str, Any]]:
        try:
            return list(self.client().api.nodes())
        except Exception as exc:
            raise daemon_error("list the swarm's nodes", exc) from exc
