"""The contract every runtime backend implements.

A backend runs runtime containers. The runner calls it from worker threads (never from the
event loop), and keeps only ``BackendState`` (a small JSON dict) in the database, so:

- Every method works after a process restart with only the persisted ``state`` in hand.
- ``poll()`` never raises for a missing container: it returns ``Status.GONE``.
- ``stop()`` is idempotent: stopping a stopped or missing runtime is a no-op. It also removes
  the container; the next boot makes a new one (one container per runtime, ever).
- ``list_owned(identity)`` returns every container of this installation's runner (labelled
  ``envctl.installation`` and ``envctl.runner``), or raises ``BackendError``; it never returns a
  partial listing, so reconciliation can trust an absence. Containers made before
  installations had an identity (runner label only) come back flagged ``legacy``: they are
  adopted when a row knows them, and never removed.
- Caller mistakes raise ``InvalidInputError``; daemon faults raise ``BackendError`` and keep
  the original exception as ``__cause__``.

The agent inside the container listens on a Unix socket in the runtime's private state
directory (mounted at ``/run/envctl``), so the runner can reach it again after a restart
without Docker being involved in the hot path. A backend listing ``"tcp"`` in ``channels``
can instead start it listening on ``AGENT_PORT`` of the runtime's own address (``spec.channel``)
and reading its per-boot credential once from ``AGENT_CREDENTIAL`` (runner/agentauth.py); its
``start`` then returns ``{"agent": {"channel": "tcp", "host": ..., "port": ...}}`` within the
state: an address every server of the installation can route to.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from envs.images.config import ImageInfo as ImageInfo  # re-exported; it lives with the image layer
from envs.kit.errors import InvalidInputError, NotSupportedError
from runner.identity import RunnerIdentity
from runner.settings import MachineType, Settings

BackendState = dict[str, Any]

# Labels every runtime container carries.
LABEL_RUNTIME = "envctl.runtime-id"
LABEL_INSTALLATION = "envctl.installation"
LABEL_RUNNER = "envctl.runner"
LABEL_MANAGED = "envctl.managed"
LABEL_ENVIRONMENT = "envctl.environment"
LABEL_MACHINE = "envctl.machine-type"
LABEL_GPU_KIND = "envctl.gpu-kind"
LABEL_POOL = "envctl.pool"  # a container of the warm pool (runner/runtimes/pool.py), claimed or not

# Where things are inside a runtime container.
AGENT_MOUNT = "/opt/envctl/agent"
STATE_MOUNT = "/run/envctl"
RESULTS_MOUNT = "/results"  # <state dir>/results on the host
SECRETS_MOUNT = "/run/secrets"  # a tmpfs the agent writes the runtime's secrets into (runner/runtimes/secret_uses.py)
AGENT_SOCKET = "agent.sock"
AGENT_CREDENTIAL = "agent.key"  # a tcp channel's credential, read once by the agent at start
AGENT_PORT = 7600  # a tcp channel's port on the runtime's address (runner/agent/handshake.py PORT)
CUDA_MOUNT = "/usr/local/cuda"  # the host's CUDA libraries, in GPU runtimes that ask for them


class Status(StrEnum):
    RUNNING = "running"  # the container runs (the agent may not answer yet)
    EXITED = "exited"  # the container exists and has stopped
    GONE = "gone"  # there is no such container


@dataclass(frozen=True)
class ContainerStatus:
    status: Status
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    started_at: str | None = None
    reason: str = ""  # a machine-readable cause the backend knows better than an exit code (``node-lost``)
    node: str = ""  # the cluster node it runs on, where there is one


@dataclass(frozen=True)
class MountBind:
    """A runtime mount as the engine makes it: a host directory bound at ``target``
    (``kind`` bind), or an engine volume of that name (``kind`` volume)."""

    target: str
    source: str
    kind: str = "bind"
    read_only: bool = True
    # a volume's labels (installation, owner, name), for an engine that makes it where the runtime
    # lands (Swarm: the node creates it with them at the task's start)
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VolumeFound:
    """A named volume in the engine, with its labels."""

    name: str
    labels: dict[str, str]
    created_at: str = ""


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything a backend needs to create a runtime's container."""

    runtime_id: str
    name: str
    image: str  # image id or local reference of the environment version
    environment: str  # exact version reference, e.g. python3@1 (a label, for people)
    machine: MachineType
    state_dir: Path  # host directory mounted read-write at STATE_MOUNT
    agent_dir: Path  # host directory with the agent code, mounted read-only at AGENT_MOUNT
    language: str = "python"
    labels: dict[str, str] = field(default_factory=dict)  # the runner's identity, among others
    env: dict[str, str] = field(default_factory=dict)
    cuda_dir: Path | None = None  # host CUDA folder mounted read-only at CUDA_MOUNT (GPU machine types only)
    mounts: tuple[MountBind, ...] = ()  # the runtime's mounts (runner/mounts/), checked
    channel: str = "unix"  # how envctl reaches the agent: its Unix socket, or "tcp" (runner/channel.py)
    # a tcp channel's credential line (runner/agentauth.py), for a backend that hands it over
    # itself (a Swarm secret); the local engine's goes through a FIFO and leaves this empty
    credential: bytes = field(default=b"", repr=False, compare=False)
    # the boot's housekeeping phase as the backend sees it (``downloading`` while a node pulls)
    on_phase: Callable[[str | None], None] | None = field(default=None, repr=False, compare=False)
    # a backend whose nodes pull images (Swarm): ``<repository>@<digest>`` of an envctl base image
    # (built by envctl, never a user's save or import), for what runs beside runtimes with more
    # rights than they have (the Swarm network guard, runner/backends/swarm_fence.py)
    trusted_image: str = ""
    # ports inside the runtime that envctl dials from outside it (an app's web server port,
    # runner/apps/server.py): a backend whose runtimes are not routed to from envctl's host
    # publishes them (Swarm: in host mode on the task's node) and says where (``endpoint``)
    ports: tuple[int, ...] = ()

    @property
    def container_name(self) -> str:
        return f"envctl-{self.runtime_id}"


@dataclass(frozen=True)
class Change:
    """One path that differs from the image the container started from."""

    kind: str  # "added" | "changed" | "deleted"
    path: str


def runtime_labels(spec: RuntimeSpec, labels: dict[str, str], what: str) -> dict[str, str]:
    """The labels of a runtime's container or service (``what``, for the error): the runner's
    own ``labels``, the spec's (the installation and runner that own it, required), and the
    runtime's id, environment and machine type; a machine type with a non-positive limit or a
    spec without its owners is refused. Shared by the Docker and Swarm backends."""
    m = spec.machine
    if m.cpus <= 0 or m.memory <= 0 or m.pids <= 0:
        raise InvalidInputError(f"machine type {m.name!r} has a non-positive limit", field="machine_type")
    if not spec.labels.get(LABEL_INSTALLATION) or not spec.labels.get(LABEL_RUNNER):
        raise InvalidInputError(f"a runtime {what} needs its installation and runner labels", field="labels")
    return {
        **labels,
        **spec.labels,
        LABEL_MANAGED: "1",
        LABEL_RUNTIME: spec.runtime_id,
        LABEL_ENVIRONMENT: spec.environment,
        LABEL_MACHINE: m.name,
    }


def changed_since_save(ctime_ns: int, saved_at_ns: int) -> bool:
    """Whether a path counts as changed after a save taken at ``saved_at_ns`` (the runtime's
    ``change_baseline``; 0: no save since boot, everything counts), the rule the list of
    changes (``runner/saves/changes.py``) and a save's layer (``overlay.plan_layer``) share.

    A save records a moment at which the container was paused and nothing of the save touched
    its files any more (the backend's ``SavedLayer.saved_at_ns``, else the time just before the
    pause); what the container held then is in the saved version. A path counts again only
    when its inode changed after that: its ctime, which no program can set back, is newer. A
    deletion is judged by its record: the whiteout's own ctime where the layer can be read,
    else its directory's (removing an entry changes the directory). A directory whose own
    ctime is older is not a change, though it may hold newer ones. A change in the instant
    before the pause may count twice, never none.
    """
    return not saved_at_ns or ctime_ns > saved_at_ns


class EarlyPause(Protocol):
    """A container's pause for a save, asked for before the save reaches ``save_layer``
    (``RuntimeBackend.pause_for_save``): under way while the save is prepared."""

    asked_ns: int  # time.time_ns() when it was asked for: the container changed nothing after

    def undo(self) -> None:
        """The container resumed if this paused it, unless ``save_layer`` took the pause over
        (then it resumes the container itself); at most once."""


class LayerObserver(Protocol):
    """What a save's layer maker asks about each entry (``runner.saves.scans.SaveFilter``)."""

    def cache_of(self, path: str) -> str | None:
        """The cache directory ``path`` lies inside when the save leaves it out, else None."""

    def entry(self, path: str, link: str | None = None) -> None:
        """An entry of the layer (and its link target): its name is looked at."""

    def content(self, path: str, size: int) -> Callable[[bytes], None] | None:
        """A sink for a regular file's content (chunks, then ``b""`` once at its end), or None."""

    def verdict(self) -> None:
        """Raise to refuse the layer; called after the last entry, before anything is kept."""

    def allowed(self) -> list[dict[str, Any]]:
        """Findings the save was told to accept (recorded with the version)."""


@dataclass(frozen=True)
class SavedLayer:
    """The image a save made and what its layer left out."""

    image: ImageInfo
    left_out: dict[str, dict[str, int]]  # cache directory -> {"bytes": n, "files": n}
    lean: bool = True  # False when the engine's storage could not be read: nothing was left out
    saved_at_ns: int = 0  # the save's moment for "changed since", when the backend took it (0: not)
    # the container's resume, when it goes on in the background: called before the save ends,
    # it waits for it and raises what went wrong (None: resumed already)
    resumed: Callable[[], None] | None = None
    # keeps engine work that follows the resume (a helper for the next save) off the save's
    # way: returns the function to call once the save has answered its caller (else it goes
    # on by itself a moment later)
    hold: Callable[[], Callable[[], None]] | None = None


# Paths of a runtime container that belong to envctl, not to the environment: never part of a
# save, a draft or the list of changes.
PRIVATE_PATHS = (AGENT_MOUNT, STATE_MOUNT, RESULTS_MOUNT, SECRETS_MOUNT)


@dataclass(frozen=True)
class FoundContainer:
    """A container found by ``list_owned``: what reconciliation needs to decide."""

    runtime_id: str
    state: BackendState
    status: ContainerStatus
    legacy: bool = False  # no installation label: made before installations had an identity


@dataclass(frozen=True)
class OtherContainer:
    """A container envctl did not start, as ``inspect_other`` finds it (runner/runtimes/attach.py)."""

    id: str
    name: str
    labels: dict[str, str]
    running: bool
    pid: int  # its main process on the engine's host (0 when it does not run)
    env: dict[str, str]
    working_dir: str
    user: str
    member: str = ""  # the container within a pod (kubernetes: POD/CONTAINER)
    address: str = ""  # where an agent placed inside it is dialled (kubernetes: the pod's IP)
    node_id: str = ""  # the swarm node it runs on (swarm: ``member`` is that node's hostname)
    python: bool | None = None  # python3 on its PATH, when the finding already knows (swarm)


class RuntimeBackend(abc.ABC):
    """Runs runtime containers. Implement start, poll, stop, list_owned, socket_path."""

    name: ClassVar[str]
    #: saves and drafts are made inside the runtime and written into the registry
    #: (``runner/saves/insave.py``): a backend whose runtimes have no filesystem on this host
    saves_in_runtime: ClassVar[bool] = False
    channels: ClassVar[tuple[str, ...]] = ("unix",)  # the agent channels it can start runtimes with
    #: runtimes' images are pulled by the nodes from envctl's registry: ``RuntimeSpec.image`` is
    #: ``<repository>@<manifest digest>`` there (the boot pushes a version that is not there yet)
    images_from_registry: ClassVar[bool] = False
    #: the container can bind directories of envctl's host (prepared git/S3 mounts, the results
    #: directory); False: they travel over the agent channel (runner/mounts/streamed.py,
    #: runner/cells/result_remote.py)
    host_paths: ClassVar[bool] = True
    #: tells a runtime's agent that envctl itself stops it (set at start-up: runner/saves/drafts.py),
    #: for a backend whose agent otherwise waits for a draft on SIGTERM (Swarm); None: not told
    release_agent: Callable[[BackendState], None] | None = None
    #: writes what the engine reports of a runtime (a Kubernetes event: scheduled, pulling, failed)
    #: into its runner log: ``(runtime_id, event, message)``; set at start-up (runner/service.py)
    report_event: Callable[[str, str, str], None] | None = None
    #: the agent's memory watch (runner/agent/memwatch.py): the fraction of the memory limit at
    #: which a cell is paused for a draft, 0: off; set at start-up where crashes keep nothing
    memory_watch: float = 0.0

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: Settings) -> RuntimeBackend:
        """Build the backend from settings (connection, runner name, labels, limits)."""

    @abc.abstractmethod
    def start(self, spec: RuntimeSpec) -> BackendState:
        """Create and start the runtime's container; return what is needed to find it again.

        A leftover container of the same runtime is removed first.
        """

    @abc.abstractmethod
    def poll(self, state: BackendState) -> ContainerStatus:
        """The container's status. ``GONE`` for a missing one; ``BackendError`` if unsure."""

    @abc.abstractmethod
    def stop(self, state: BackendState, timeout: float = 5.0) -> None:
        """Stop and remove the container. Idempotent."""

    @abc.abstractmethod
    def list_owned(self, identity: RunnerIdentity) -> list[FoundContainer]:
        """Every container of ``identity`` (installation and runner), complete, or ``BackendError``."""

    @abc.abstractmethod
    def socket_path(self, state: BackendState, state_dir: Path) -> Path:
        """Host path of the agent's Unix socket for this runtime."""

    # --- snapshots: saves and drafts -------------------------------------------------------
    def changes(self, state: BackendState) -> list[Change]:
        """Paths changed in the container since its image, without PRIVATE_PATHS."""
        raise NotSupportedError(f"the {self.name} backend cannot list changes", details={"backend": self.name})

    def commit(self, state: BackendState, *, config: dict[str, Any], repository: str, tag: str) -> str:
        """Snapshot the container's filesystem as a new image on top of its image.

        The image's configuration is ``config`` (a trusted template: Env, Cmd, Entrypoint,
        WorkingDir, User, Labels), never the container's. Returns the image id.
        """
        raise NotSupportedError(f"the {self.name} backend cannot commit", details={"backend": self.name})

    def pause_for_save(self, state: BackendState) -> EarlyPause | None:
        """The container's pause for a save about to be made, asked for now and under way in the
        background while the save is prepared; ``save_layer(early=...)`` takes it over, and the
        save ``undo()``es it when it does not get there. None: ``save_layer`` pauses itself."""
        return None

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
        """A save: the container's changes as one new layer on the layers of ``version_image``.

        Every entry passes ``observer`` first: files in the caches it names are left out (their
        bytes never reach the engine), every file's content is streamed through it, and its
        ``verdict()`` may refuse the layer, in which case no image is kept and the container is
        untouched. The image's configuration is ``config``, checked as for ``commit``.

        ``saved_at_ns``: the runtime's last save from this container (``change_baseline``), or
        0. A backend may then make the layer of only what changed since
        (``changed_since_save``), on ``version_image`` being that save's image.
        """
        raise NotSupportedError(f"the {self.name} backend cannot save", details={"backend": self.name})

    def resume(self, state: BackendState) -> None:  # noqa: B027  (optional hook)
        """Resume a container a save paused and did not resume (envctl died mid-save); idempotent."""

    def image_info(self, image: str) -> ImageInfo | None:
        """What a local image is, or None when the engine does not have it."""
        raise NotSupportedError(f"the {self.name} backend has no images", details={"backend": self.name})

    def kernelspecs(self, image: str) -> list[dict[str, str]]:
        """The Jupyter kernelspecs installed in a local image, found without running it.

        One dict per kernelspec: ``name`` (its directory's name, lower case, as Jupyter names
        it), ``display_name``, ``language`` and ``path`` (its directory in the image), from the
        ``kernel.json`` files under Jupyter's standard data paths; sorted by name, the first
        directory in Jupyter's order of precedence winning for a name. An image without any
        gives ``[]``; an image the engine does not have raises ``BackendError``. There is no
        default: a backend that cannot look inside images raises ``NotImplementedError``
        rather than claim that an image has no kernelspecs.
        """
        raise NotSupportedError(f"the {self.name} backend cannot look for kernelspecs", details={"backend": self.name})

    def engine_client(self) -> Any | None:
        """The Docker SDK client registry transfers go through (push, pull); None: this
        backend's images cannot travel through a registry."""
        return None

    def remove_image(self, image: str) -> None:  # noqa: B027  (optional hook)
        """Remove a local image (idempotent); images other images need are kept by the engine."""

    def squash(self, image: str, *, config: dict[str, Any], repository: str, tag: str) -> str:
        """A one-layer copy of ``image`` with ``config``: keeps long chains under the layer limit."""
        raise NotSupportedError(f"the {self.name} backend cannot squash", details={"backend": self.name})

    def save_images(self, images: list[str], path: Path) -> None:
        """Write ``images`` (and every layer they need) to ``path`` in ``docker save`` form."""
        raise NotSupportedError(f"the {self.name} backend cannot export images", details={"backend": self.name})

    def load_images(self, path: Path) -> None:
        """Load a ``docker save``-form archive into the engine."""
        raise NotSupportedError(f"the {self.name} backend cannot import images", details={"backend": self.name})

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:  # noqa: B027  (optional hook)
        """Make the named volume for a runtime's volume mount, carrying ``labels``, unless it
        exists with the same installation label; ``InvalidInputError`` when it exists without
        it. Engines without volumes ignore it."""

    def list_volumes(self, installation: str) -> list[VolumeFound]:
        """The volumes made by ``ensure_volume`` that carry the installation's label."""
        return []

    def remove_volume(self, name: str, installation: str) -> None:  # noqa: B027  (optional hook)
        """Remove a volume that carries the installation's label (never another's); a missing
        one is no error. ``ConflictError`` while a container uses it."""

    def inspect_other(self, container: str) -> OtherContainer | None:
        """A container by id or name, whoever made it (None: no such container); read only.
        The local engine (its processes on this host), Kubernetes (``POD[/CONTAINER]``, the
        agent placed inside through the API) and Swarm (``NAME[/NODE]``, through helper tasks on
        the node, when an admin allows it) attach."""
        raise InvalidInputError(
            f"attach: this server's {self.name} backend cannot attach to containers (the local "
            "Docker engine's, Kubernetes pods and Swarm nodes' containers can be)",
            field="attach",
        )

    #: an attached container's agent runs inside it, placed through the engine's API
    #: (``place_agent``), not beside it on this host (runner/runtimes/attach.py)
    attach_inside: ClassVar[bool] = False

    def other_has_python(self, other: OtherContainer) -> bool:
        """Whether an attached container has ``python3`` (``attach_inside`` backends)."""
        raise NotSupportedError(f"the {self.name} backend does not place agents in containers")

    def place_agent(self, other: OtherContainer, runtime_id: str, credential: bytes) -> BackendState:
        """Put envctl's agent into ``other``, listening on tcp with ``credential`` (a line of
        ``runner/agentauth.py``); what ``remove_agent`` needs, with ``host`` and ``port``."""
        raise NotSupportedError(f"the {self.name} backend does not place agents in containers")

    def remove_agent(self, state: BackendState) -> dict[str, Any]:
        """End a placed agent and remove its files; the container stays. What is still there
        (``left``: pids, ``dir_left``)."""
        raise NotSupportedError(f"the {self.name} backend does not place agents in containers")

    # A container without python3 on an ``attach_inside`` backend: the agent runs on envctl's
    # host instead, its Bash kernel a relay to a shell in the container (``bash_relay``).
    bash_relay: ClassVar[bool] = False

    def shell_relay(self, other: OtherContainer, pids: Path) -> tuple[list[str], BackendState]:
        """The command of a relay to a shell in ``other`` (it records the shells it starts in
        ``pids``), and what detaching and ``other_alive`` need."""
        raise NotSupportedError(f"the {self.name} backend has no shell relay")

    def end_shells(self, state: BackendState) -> str:
        """The relays' shells (``state["shells"]``) and their descendants killed in the container."""
        raise NotSupportedError(f"the {self.name} backend has no shell relay")

    def other_alive(self, state: BackendState) -> bool:
        """Whether the container an agent was placed in is still that one, running."""
        return True

    def sweep_placed(self, keep: Callable[[], set[str]]) -> list[str]:
        """Agents this runner placed (kept running by something of the backend's, e.g. Swarm's
        relays) for runtimes not in ``keep()`` (asked after listing them) removed: an envctl
        that died while attaching, a runtime deleted while it was down. The runtime ids."""
        return []

    def wire_attach(self, image: Callable[[], str], identity: dict[str, str]) -> None:  # noqa: B027
        """Optional hook: the image (``repo@digest`` in the registry, an envctl base) that helper
        tasks placing agents run, and the installation's labels they carry (swarm)."""

    def logs_tail(self, state: BackendState, lines: int = 20) -> str:
        """The container's last output lines, for error messages. Empty if unknown."""
        return ""

    def address(self, state: BackendState) -> str | None:
        """The runtime's address that this server routes to (an app's port is reached there:
        runner/apps/server.py); None when the backend cannot tell."""
        agent = state.get("agent") or {}
        return str(agent["host"]) if agent.get("host") else None

    # whether the spec's ``ports`` are published when the container is made (so a container made
    # ahead without them, a pooled one, cannot serve a runtime that has some)
    publishes_ports = False

    def endpoint(self, state: BackendState, port: int) -> str | None:
        """``host:port`` where this server reaches the runtime's ``port`` (one of the spec's
        ``ports``, an app's): by default its ``address`` and the port itself; None when the
        backend cannot tell."""
        address = self.address(state)
        return f"{address}:{port}" if address else None

    def nodes(self, installation: str) -> list[dict[str, Any]]:
        """The machines runtimes run on (``GET /nodes``): each with ``id``, ``name``, ``role``,
        ``labels``, ``capacity`` (``nano_cpus``, ``memory``, ``generic_resources``), ``health``
        (``state``, ``availability``, ``message``) and ``runtimes`` (ids of this installation's
        runtimes on it). The default: none known."""
        return []

    def set_node_availability(self, name: str, availability: str) -> dict[str, Any]:
        """Set a node's availability (``active``, ``pause``, ``drain``); the node as it was
        (``id``/``ID``, its name). A backend without nodes to schedule on has none to drain."""
        raise InvalidInputError(
            f"the {self.name} backend runs runtimes on one engine: it has no node to drain or activate", field="node"
        )

    def ping(self) -> None:  # noqa: B027  (optional hook)
        """Raise ``BackendError`` when the backend cannot be reached."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections."""
