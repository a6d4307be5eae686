"""Runtimes as Docker containers, through the Docker SDK (one HTTP call per operation).

The hardening baseline (DESIGN.md, R1) is applied here, in one place: Docker's default
capabilities minus the risky ones, ``no-new-privileges``, pids/memory/CPU limits from the
machine type, a capped json-file log, and no host path but envctl's own two (the agent code,
read-only, and the runtime's private state directory).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig, Mount

from envs.images import docker as engine
from envs.images.docker import daemon_error as _daemon_error
from envs.kit.errors import BackendError
from runner.backends import agent_channel, kernelspec_files, netguard, others, overlay, pausing, subnets
from runner.backends import docker_volumes as volumes
from runner.backends.base import (
    AGENT_MOUNT,
    AGENT_SOCKET,
    CUDA_MOUNT,
    LABEL_GPU_KIND,
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_RUNNER,
    LABEL_RUNTIME,
    PRIVATE_PATHS,
    RESULTS_MOUNT,
    SECRETS_MOUNT,
    STATE_MOUNT,
    BackendState,
    Change,
    ContainerStatus,
    EarlyPause,
    FoundContainer,
    ImageInfo,
    LayerObserver,
    OtherContainer,
    RuntimeBackend,
    RuntimeSpec,
    SavedLayer,
    Status,
    VolumeFound,
    runtime_labels,
)
from runner.backends.docker_state import status_of
from runner.backends.helpers import Helpers
from runner.errors import GpuUnavailableError
from runner.identity import RunnerIdentity
from runner.settings import Settings

# Of Docker's default set, these are dropped: raw sockets (spoofing on the bridge), device
# nodes, audit log writes, file capabilities, chroot, and handing capabilities around.
DROPPED_CAPABILITIES = ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP", "SYS_CHROOT", "SETPCAP"]
SECURITY_OPT = ["no-new-privileges:true"]
# What a GPU runtime's device request asks the NVIDIA runtime for: the device, CUDA, nvidia-smi.
GPU_CAPABILITIES = [["gpu", "compute", "utility"]]
_IMAGE_ID_RE = re.compile(r"sha256:[0-9a-f]{64}")
_IMAGE_INFO_TTL = 60.0  # seconds an image id's inspection is reused (see image_info)
_FENCE_TTL = 60.0  # seconds an installation's network and rules are trusted to be in place


class DockerBackend(RuntimeBackend):
    name = "docker"
    channels = ("unix", "tcp")

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        labels: dict[str, str] | None = None,
        log_max_size: str = "10m",
        network: str = "bridge",
        subnet_pool: str = Settings.runner_subnet_pool,
        subnet_prefix: int = Settings.runner_subnet_prefix,
        base_url: str | None = None,
        timeout: int = 30,
    ) -> None:
        self._client = client
        self._base_url = base_url
        self._timeout = timeout
        self.labels = dict(labels or {})
        self.log_max_size = log_max_size
        self.network = network
        self.subnet_pool = subnet_pool
        self.subnet_prefix = subnet_prefix
        self._image_infos: dict[str, tuple[float, ImageInfo]] = {}  # image id -> (read at, info)
        self._layouts: dict[str, dict[str, Any]] = {}  # container id -> its image and directories (layout)
        self._image_infos_lock = threading.Lock()
        self._gpus_seen = False  # the engine was seen able to hand out GPUs
        self._fenced: dict[str, float] = {}  # installation -> when its network was last checked
        self.helpers = Helpers(lambda: self.client, self.labels)  # what saves and drafts commit

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerBackend:
        return cls(
            labels=settings.runner_labels,
            log_max_size=settings.runner_log_max_size,
            network=settings.runner_network,
            subnet_pool=settings.runner_subnet_pool,
            subnet_prefix=settings.runner_subnet_prefix,
        )

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                if self._base_url:
                    self._client = docker.DockerClient(base_url=self._base_url, timeout=self._timeout)
                else:
                    self._client = docker.from_env(timeout=self._timeout)
            except docker.errors.DockerException as exc:
                # from_env asks the daemon for its API version: failing here means no daemon.
                raise BackendError(
                    "the Docker engine does not answer; is dockerd running? `scripts/ensure-docker` starts one",
                    details={"action": "connect", "cause": str(exc)[:300]},
                ) from exc
        return self._client

    # --- the contract ------------------------------------------------------------------
    def ping(self) -> None:
        try:
            self.client.api.ping()
        except Exception as exc:
            raise _daemon_error("answer a ping", exc) from exc

    def container_options(self, spec: RuntimeSpec) -> dict[str, Any]:
        """The keyword arguments of ``containers.create``: every limit and label in one place."""
        m = spec.machine
        labels = runtime_labels(spec, self.labels, "container")
        options: dict[str, Any] = {
            "image": spec.image,
            "command": ["python3", "-u", "-I", f"{AGENT_MOUNT}/main.py", *agent_channel.arguments(spec.channel)],
            "name": spec.container_name,
            "hostname": spec.name[:63],
            "labels": labels,
            # Nothing of envctl's in the container's configuration: a save must not carry it.
            # The agent finds its socket at STATE_MOUNT/AGENT_SOCKET by default.
            "environment": dict(spec.env),
            "working_dir": "/root",
            "detach": True,
            "init": True,  # tini reaps the zombies of cells' background processes
            "privileged": False,
            "cap_drop": list(DROPPED_CAPABILITIES),
            "security_opt": list(SECURITY_OPT),
            "pids_limit": m.pids,
            "mem_limit": m.memory,
            "memswap_limit": m.memory,  # no swap beyond the limit
            "nano_cpus": int(m.cpus * 1e9),
            "log_config": LogConfig(type=LogConfig.types.JSON, config={"max-size": self.log_max_size, "max-file": "1"}),
            "mounts": [
                Mount(target=AGENT_MOUNT, source=str(spec.agent_dir), type="bind", read_only=True),
                Mount(target=STATE_MOUNT, source=str(spec.state_dir), type="bind", read_only=False),
                Mount(target=RESULTS_MOUNT, source=str(spec.state_dir / "results"), type="bind", read_only=False),
            ],
            # the runtime's secrets, written by its agent at boot: in memory, never in a layer
            "tmpfs": {SECRETS_MOUNT: "rw,noexec,nosuid,nodev,size=8m,mode=0700"},
            "network": self.network_of(spec),
            "stop_signal": "SIGTERM",
        }
        if m.gpus:
            options["device_requests"] = [
                DeviceRequest(driver="nvidia", count=m.gpus, capabilities=[list(c) for c in GPU_CAPABILITIES])
            ]
            labels[LABEL_GPU_KIND] = m.gpu_kind or "nvidia"
            if spec.cuda_dir is not None:  # the one host path beside envctl's own, read-only
                cuda = Mount(target=CUDA_MOUNT, source=str(spec.cuda_dir), type="bind", read_only=True)
                options["mounts"].append(cuda)
        for bind in spec.mounts:  # the runtime's own mounts (runner/mounts/), checked before
            options["mounts"].append(
                Mount(target=bind.target, source=bind.source, type=bind.kind, read_only=bind.read_only)
            )
        return options

    # named volumes of runtime mounts: runner/backends/docker_volumes.py
    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        volumes.ensure(self.client, name, {**self.labels, **labels, LABEL_MANAGED: "volume"})

    def list_volumes(self, installation: str) -> list[VolumeFound]:
        return volumes.listed(self.client, installation)

    def remove_volume(self, name: str, installation: str) -> None:
        volumes.remove(self.client, name, installation)

    def check_gpus(self) -> None:
        """``GpuUnavailableError`` unless the engine can hand out NVIDIA GPUs: the ``nvidia``
        runtime registered with it (``docker info``), or, for a local engine, NVIDIA's hook
        installed (Docker's built-in nvidia device driver uses it)."""
        if self._gpus_seen:
            return
        try:
            runtimes = self.client.info().get("Runtimes") or {}
        except Exception as exc:
            raise _daemon_error("ask the engine for its runtimes", exc) from exc
        if "nvidia" in runtimes or (not self._base_url and shutil.which("nvidia-container-runtime-hook")):
            self._gpus_seen = True
            return
        raise GpuUnavailableError(
            "this machine type has GPUs, but the Docker engine has no NVIDIA container runtime "
            f"(its runtimes: {', '.join(sorted(runtimes)) or 'none'}); install the NVIDIA Container Toolkit "
            "and register it (`nvidia-ctk runtime configure --runtime=docker`), or choose a machine type "
            "without GPUs (`envctl machine-types`)",
            details={"field": "machine_type", "runtimes": sorted(runtimes)},
        )

    def network_of(self, spec: RuntimeSpec) -> str:
        """The Docker network the runtime joins: its installation's own when isolated."""
        if self.network != netguard.ISOLATED:
            return self.network
        return netguard.fence_of(spec.labels[LABEL_INSTALLATION]).network

    def fence(self, installation: str) -> None:
        """The installation's isolated network and its firewall rules, in place (R4); the rules
        checked again at most once a minute (they outlive envctl's restarts; a host reboot drops
        them), the network at every boot (`envctl uninstall --orphaned-networks` may remove it
        with the rules while this installation has no container)."""
        if self._base_url and not self._base_url.startswith("unix://"):
            raise BackendError(
                "network isolation needs the Docker engine on this host (its firewall is set here); "
                "set ENVCTL_RUNNER_NETWORK to a network of the remote engine instead",
                details={"field": "runner_network"},
            )
        fence = netguard.fence_of(installation)
        fresh = time.monotonic() - self._fenced.get(installation, -_FENCE_TTL) < _FENCE_TTL
        if fresh and netguard.network_exists(self.client, fence):
            return
        labels = {**self.labels, LABEL_INSTALLATION: installation, LABEL_MANAGED: "network"}
        pool = subnets.Pool.of(self.subnet_pool, self.subnet_prefix)
        netguard.ensure(self.client, fence, labels, pool)
        self._fenced[installation] = time.monotonic()

    def start(self, spec: RuntimeSpec) -> BackendState:
        options = self.container_options(spec)
        if spec.machine.gpus:
            self.check_gpus()  # before anything is made: a clear reason, at once
        if self.network == netguard.ISOLATED:
            self.fence(spec.labels[LABEL_INSTALLATION])
        (spec.state_dir / "results").mkdir(parents=True, exist_ok=True)
        self._remove_leftover(spec.container_name, spec.runtime_id)
        try:
            container = self.client.containers.create(**options)
        except docker.errors.ImageNotFound as exc:
            raise BackendError(
                f"image {spec.image} of {spec.environment} is not in the Docker engine; "
                "`envctl base build` rebuilds base images",
                details={"image": spec.image},
            ) from exc
        except Exception as exc:
            raise _daemon_error("create the runtime's container", exc) from exc
        state: BackendState = {"container_id": container.id, "container_name": spec.container_name}
        self._keep_layout(container.attrs)  # the creation's own inspection: a save need not ask again
        try:
            container.start()
            if spec.channel == "tcp":
                state["agent"] = agent_channel.address(self.client, container.id)
        except Exception as exc:
            self._force_remove(container.id)
            if isinstance(exc, BackendError):
                raise
            raise _daemon_error("start the runtime's container", exc) from exc
        return state

    def inspect_other(self, container: str) -> OtherContainer | None:
        if self._base_url and not self._base_url.startswith("unix://"):
            raise BackendError("attaching needs the Docker engine on this host (its containers' processes run here)")
        return others.inspect(self.client, container)

    def poll(self, state: BackendState) -> ContainerStatus:
        cid = state.get("container_id")
        if not cid:
            return ContainerStatus(Status.GONE)
        try:
            info = self.client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return ContainerStatus(Status.GONE)
        except Exception as exc:
            raise _daemon_error("inspect the runtime's container", exc) from exc
        return status_of(info.get("State", {}))

    def stop(self, state: BackendState, timeout: float = 5.0) -> None:
        cid = state.get("container_id")
        if not cid:
            return
        self.helpers.release(cid)  # a helper made ahead for its next save: there is none
        try:
            self.client.api.stop(cid, timeout=max(0, int(timeout)))
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            pass  # already stopping or dead: removal below decides
        except Exception as exc:
            raise _daemon_error("stop the runtime's container", exc) from exc
        self._force_remove(cid)

    def list_owned(self, identity: RunnerIdentity) -> list[FoundContainer]:
        self.helpers.own(identity.installation, identity.name)  # the first time: leftovers swept
        # Docker's label filters are ANDed: the runner's name and a runtime id, then the
        # installation is checked here, so that containers made before installations had an
        # identity (no such label) are still found, as legacy ones.
        try:
            containers = self.client.api.containers(
                all=True, filters={"label": [f"{LABEL_RUNNER}={identity.name}", LABEL_RUNTIME]}
            )
        except Exception as exc:
            raise _daemon_error("list the runner's containers", exc) from exc
        found = []
        for c in containers:
            labels = c.get("Labels") or {}
            installation = labels.get(LABEL_INSTALLATION)
            if installation and installation != identity.installation:
                continue  # another installation's runner of the same name: not ours, never touched
            # A paused container (a save's commit pauses it) is alive, not exited.
            status = Status.RUNNING if c.get("State") in ("running", "paused", "restarting") else Status.EXITED
            exit_code = None
            oom = False
            if status is Status.EXITED:
                # The listing has no exit details; ask for them (a vanished one is just gone).
                try:
                    detail = status_of(self.client.api.inspect_container(c["Id"]).get("State", {}))
                    exit_code, oom = detail.exit_code, detail.oom_killed
                except docker.errors.NotFound:
                    continue
                except Exception as exc:
                    raise _daemon_error("inspect the runner's containers", exc) from exc
            found.append(
                FoundContainer(
                    runtime_id=labels[LABEL_RUNTIME],
                    state={
                        "container_id": c["Id"],
                        "container_name": (c.get("Names") or ["/"])[0][1:],
                    },
                    status=ContainerStatus(status, exit_code=exit_code, oom_killed=oom),
                    legacy=not installation,
                )
            )
        return found

    def socket_path(self, state: BackendState, state_dir: Path) -> Path:
        return state_dir / AGENT_SOCKET

    # --- snapshots -------------------------------------------------------------------------
    def changes(self, state: BackendState) -> list[Change]:
        cid = state.get("container_id")
        if not cid:
            return []
        layers = self._overlay_layers(cid)
        if layers is not None:
            try:  # the writable layer read directly: no engine call (see overlay.py)
                return [c for c in overlay.changes(layers) if not _is_private(c.path)]
            except OSError:
                self._layouts.pop(cid, None)  # gone or unreadable: the engine answers instead
        try:
            raw = self.client.api.diff(cid) or []
        except docker.errors.NotFound:
            return []
        except Exception as exc:
            raise _daemon_error("list the runtime's changes", exc) from exc
        kinds = {0: "changed", 1: "added", 2: "deleted"}
        out = []
        for entry in raw:
            path = str(entry.get("Path", ""))
            if _is_private(path):
                continue
            out.append(Change(kinds.get(int(entry.get("Kind", 0)), "changed"), path))
        return out

    def _overlay_layers(self, cid: str) -> overlay.OverlayLayers | None:
        """The container's overlay2 directories when this host can read them (``layout``); None
        to ask the engine."""
        try:
            return overlay.OverlayLayers.from_inspect(self.layout(cid)["GraphDriver"])
        except Exception:
            return None  # the diff below says what is wrong

    def layout(self, cid: str) -> dict[str, Any]:
        """What a save needs of the container's inspection: its ``Id``, its ``Image`` and its
        ``GraphDriver`` (the overlay2 directories), kept per container (taken from its creation
        at boot): none of them changes while it exists, and an inspection asked for during a
        save waits in the engine behind the save's pause of the same container."""
        found = self._layouts.get(cid)
        if found is None:
            found = self._keep_layout(self.client.api.inspect_container(cid))
        return found

    def _keep_layout(self, attrs: dict[str, Any]) -> dict[str, Any]:
        kept = {"Id": attrs.get("Id"), "Image": attrs.get("Image"), "GraphDriver": attrs.get("GraphDriver") or {}}
        if isinstance(kept["Id"], str) and kept["Image"] and kept["GraphDriver"]:
            self._layouts[kept["Id"]] = kept
            while len(self._layouts) > 256:
                self._layouts.pop(next(iter(self._layouts)), None)
        return kept

    # Image work is the shared image layer's (envs.images.docker), as for base-image builds.
    def commit(self, state: BackendState, *, config: dict[str, Any], repository: str, tag: str) -> str:
        """A draft: the container's changes on its image, configured ``config`` exactly. Made
        through a helper container (``saves.draft_from_directories``), never by committing the
        runtime's own, whose variables and command the engine would merge in."""
        from runner.backends import saves

        cid = state.get("container_id")
        if not cid:
            raise BackendError("the runtime has no container to save")
        options: dict[str, Any] = {"config": config, "repository": repository, "tag": tag}
        made = saves.draft_from_directories(self.client, cid, helpers=self.helpers, layout=self.layout, **options)
        if made is not None:
            return self._remember(made.info).id
        with pausing.paused(self.client, cid, "snapshot the runtime's filesystem"):
            info = saves.commit_reconfigured(self.client, cid, action="snapshot the runtime's filesystem", **options)
        return self._remember(info).id

    def save_layer(
        self,
        state: BackendState,
        *,
        config: dict[str, Any],
        repository: str,
        tag: str,
        version_image: str,
        observer: LayerObserver,
        saved_at_ns: int = 0,
        early: EarlyPause | None = None,
    ) -> SavedLayer:
        """The layer made from the container's overlay2 directories (``overlay.plan_layer``),
        the container paused meanwhile as ``docker commit`` pauses it; where they cannot be
        read, a commit whose layer is scanned afterwards (``saves.commit_and_scan``). After a
        save from this container (``saved_at_ns``), only what changed since. ``early``: the
        pause ``pause_for_save`` asked for."""
        from runner.backends import saves

        cid = state.get("container_id")
        if early is not None and not (isinstance(early, pausing.Pausing) and early.cid == cid):
            early.undo()  # not this backend's pause of this container: it pauses itself
            early = None
        if not cid:
            raise BackendError("the runtime has no container to save")
        options: dict[str, Any] = {"config": config, "repository": repository, "tag": tag, "observer": observer}
        made = saves.from_directories(
            self.client,
            cid,
            version_image=version_image,
            saved_at_ns=saved_at_ns,
            helpers=self.helpers,
            layout=self.layout,
            early=early,
            **options,
        )
        if made is None:  # the engine's storage cannot be read here: nothing can be left out
            info = saves.commit_and_scan(self.client, cid, lambda: self.changes(state), **options)
            return SavedLayer(self._remember(info), {}, lean=False)
        return SavedLayer(
            self._remember(made.info),
            made.left_out,
            saved_at_ns=made.saved_at_ns,
            resumed=made.resumed,
            hold=made.hold,
        )

    def pause_for_save(self, state: BackendState) -> EarlyPause | None:
        cid = state.get("container_id")
        return pausing.Pausing(self.client, cid) if cid else None

    def resume(self, state: BackendState) -> None:
        cid = state.get("container_id")
        if not cid:
            return
        try:
            if (self.client.api.inspect_container(cid).get("State") or {}).get("Paused"):
                self.client.api.unpause(cid)
        except docker.errors.NotFound:
            return
        except Exception as exc:
            raise _daemon_error("resume the runtime's container", exc) from exc

    def image_info(self, image: str) -> ImageInfo | None:
        # An image id names one immutable image: what was read of it a moment ago still holds
        # (a save asks about its parent and its new image several times). Names can move, so
        # they are always asked anew; removing an image forgets it.
        cached = self._image_infos.get(image) if _IMAGE_ID_RE.fullmatch(image) else None
        if cached is not None and time.monotonic() - cached[0] < _IMAGE_INFO_TTL:
            return cached[1]
        info = engine.info(self.client, image)
        return None if info is None else self._remember(info)

    def _remember(self, info: ImageInfo) -> ImageInfo:
        with self._image_infos_lock:
            self._image_infos[info.id] = (time.monotonic(), info)
            while len(self._image_infos) > 256:
                self._image_infos.pop(next(iter(self._image_infos)))
        return info

    def save_images(self, images: list[str], path: Path) -> None:
        engine.save_archive(images, path, host=self._base_url)

    def load_images(self, path: Path) -> None:
        engine.load_archive(path, host=self._base_url)

    def engine_client(self) -> docker.DockerClient:
        return self.client

    def remove_image(self, image: str) -> None:
        self._image_infos.pop(image, None)
        self.helpers.forget(image)  # a helper kept for its next save would keep it
        engine.remove_image(self.client, image)

    def squash(self, image: str, *, config: dict[str, Any], repository: str, tag: str) -> str:
        """Flatten through export/import, then give the result the trusted configuration."""
        info = engine.squash(
            self.client, image, config=config, repository=repository, tag=tag, holder_labels={LABEL_MANAGED: "squash"}
        )
        return self._remember(info).id

    def kernelspecs(self, image: str) -> list[dict[str, str]]:
        """The image's Jupyter kernelspecs, read without running anything (``kernelspec_files``)."""
        return kernelspec_files.read_from_image(
            lambda: self.client.api,
            image,
            labels={**self.labels, LABEL_MANAGED: "kernelspecs"},
            cacheable=_IMAGE_ID_RE.fullmatch(image) is not None,
            remove=self._force_remove,
        )

    def nodes(self, installation: str) -> list[dict[str, Any]]:
        from runner.backends import docker_nodes

        return docker_nodes.the_engine(self.client, installation)

    def address(self, state: BackendState) -> str | None:
        """The container's address on its network (the engine's host routes to it)."""
        cid = state.get("container_id")
        if not cid:
            return None
        try:
            return str(agent_channel.address(self.client, cid)["host"])
        except BackendError:
            return None

    def logs_tail(self, state: BackendState, lines: int = 20) -> str:
        cid = state.get("container_id")
        if not cid:
            return ""
        try:
            out: bytes = self.client.api.logs(cid, tail=lines)
        except Exception:
            return ""
        return out.decode(errors="replace")

    def close(self) -> None:
        if self._client is not None:
            self.helpers.close()
            self._client.close()

    # --- helpers -------------------------------------------------------------------------
    def _remove_leftover(self, name: str, runtime_id: str) -> None:
        try:
            info = self.client.api.inspect_container(name)
        except docker.errors.NotFound:
            return
        except Exception as exc:
            raise _daemon_error("look for a leftover container", exc) from exc
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_RUNTIME) != runtime_id:
            raise BackendError(
                f"a container named {name} exists and is not this runtime's; remove it by hand",
                details={"container": name},
            )
        self._force_remove(info["Id"])

    def _force_remove(self, cid: str) -> None:
        self._layouts.pop(cid, None)
        try:
            self.client.api.remove_container(cid, force=True, v=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "already in progress" in str(exc):
                return
            raise _daemon_error("remove the runtime's container", exc) from exc
        except Exception as exc:
            raise _daemon_error("remove the runtime's container", exc) from exc


# Docker's own init (tini), mounted into every runtime container because of init=True.
DOCKER_PRIVATE_PATHS = (*PRIVATE_PATHS, "/usr/sbin/docker-init", "/sbin/docker-init")


def _is_private(path: str) -> bool:
    """envctl's and Docker's own mount points, and the directories Docker made to hold them."""
    for private in DOCKER_PRIVATE_PATHS:
        if path == private or path.startswith(private + "/") or private.startswith(path.rstrip("/") + "/"):
            return True
    return False
