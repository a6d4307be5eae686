"""The runner's settings: how runtimes are booted, kept and sized (``runner_*``, the machine
type catalog), the Swarm backend (``swarm_*``), saves (``save_*``), mounts (``mounts_*``),
result files (``results_*``) and imports from other servers. Extends the registry's settings
(registry/settings.py), as the runner builds on the registry."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.kit.config import parse_labels, parse_memory, parse_names, parse_path, parse_percent_below_100, setting
from envs.kit.errors import InvalidInputError
from registry import settings as registry_settings


@dataclass(frozen=True)
class MachineType:
    """A size a runtime can be given: applied as Docker limits when its container is created."""

    name: str
    cpus: float
    memory: int  # bytes
    pids: int = 512
    gpus: int = 0  # requested through Docker device requests (driver "nvidia")
    idle_timeout: int | None = None  # seconds; None means the runtime's own or the default
    description: str = ""
    gpu_kind: str = ""  # what the GPUs are, e.g. nvidia-tesla-t4 (shown, and labelled); "" is plain "nvidia"
    # Swarm placement constraints (``node.labels.zone==eu``): where a cluster may place it
    constraints: tuple[str, ...] = ()
    # Kubernetes taints the runtime's pod tolerates (``key=value:NoSchedule``, ``key:NoSchedule``)
    tolerations: tuple[str, ...] = ()


def _gib(n: float) -> int:
    return int(n * 1024**3)


DEFAULT_MACHINE_TYPES: dict[str, MachineType] = {
    m.name: m
    for m in (
        MachineType("small", cpus=1.0, memory=_gib(2), pids=512, description="1 CPU, 2 GiB"),
        MachineType("medium", cpus=2.0, memory=_gib(4), pids=1024, description="2 CPUs, 4 GiB"),
        MachineType("large", cpus=2.0, memory=_gib(8), pids=2048, description="2 CPUs, 8 GiB"),
        MachineType(
            "gpu-small",
            cpus=2.0,
            memory=_gib(8),
            pids=2048,
            gpus=1,
            gpu_kind="nvidia",
            description="2 CPUs, 8 GiB, 1 GPU (needs the NVIDIA container runtime)",
        ),
    )
}

#: package-manager caches a save leaves out unless asked to keep them
DEFAULT_SAVE_CACHES = ("/var/lib/apt/lists", "/var/cache/apt", "~/.cache/pip", "~/.npm")

CHANNELS = ("unix", "tcp")
MAX_POOL_PER_ENTRY = 32


# ------------------------------------------------------------------------------ parsers


def parse_channel(v: Any) -> str:
    value = str(v).strip().lower()
    if value not in CHANNELS:
        raise ValueError(f"the agent channel is one of {', '.join(CHANNELS)}")
    return value


def parse_subnet_pool(v: Any) -> str:
    """An IPv4 network in CIDR form with no host bits set, e.g. 10.213.0.0/16."""
    text = str(v).strip()
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IPv4 network in CIDR form such as 10.213.0.0/16 ({exc})") from exc
    if net.prefixlen > 29:
        raise ValueError(f"{net} is too small: a runtime network needs at least a /29")
    return str(net)


def parse_subnet_prefix(v: Any) -> int:
    prefix = int(v)
    if not 8 <= prefix <= 29:
        raise ValueError(f"{prefix} is not a prefix length from 8 to 29")
    return prefix


def parse_pool(v: Any) -> tuple[tuple[str, str, int], ...]:
    """``REF:MACHINE=N`` entries separated by ``,``: the reference may hold a ``:`` of its own
    (a tag), the machine type is what follows the last one. Checked for shape here; the
    reference and the machine type are checked when the runner starts (runner/runtimes/pool.py)."""
    items = v if isinstance(v, list | tuple) else str(v or "").split(",")
    out: list[tuple[str, str, int]] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        target, eq, count = item.rpartition("=")
        ref, colon, machine = target.rpartition(":")
        if not eq or not colon or not ref.strip() or not machine.strip():
            raise ValueError(f"pool entry {item!r} is not ENVIRONMENT:MACHINE_TYPE=COUNT, e.g. python3:small=2")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"pool entry {item!r}: the count {count!r} is not a whole number") from None
        if not 1 <= n <= MAX_POOL_PER_ENTRY:
            raise ValueError(f"pool entry {item!r}: the count must be from 1 to {MAX_POOL_PER_ENTRY}")
        out.append((ref.strip(), machine.strip(), n))
    return tuple(out)


def parse_pool_memory(v: Any) -> int:
    n = parse_memory(v, "runner_pool_memory")
    if n < 0:
        raise ValueError("the pool's memory budget cannot be negative")
    return n


def parse_pool_hot(v: Any) -> int:
    n = parse_memory(v, "ENVCTL_RUNNER_POOL_HOT")
    if n < 0:
        raise ValueError("the hot pool's memory budget cannot be negative")
    return n


def parse_attach_rules(v: Any) -> tuple[tuple[str, str], ...]:
    """``label:KEY=VALUE`` (a label the container carries, with that value) and ``name:GLOB``
    (its name matches the shell pattern) rules, separated by ``,``."""
    items = v if isinstance(v, list | tuple) else str(v or "").split(",")
    out: list[tuple[str, str]] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        kind, colon, rule = item.partition(":")
        if not colon or kind not in ("label", "name") or not rule.strip():
            raise ValueError(f"attach rule {item!r} is not label:KEY=VALUE or name:PATTERN")
        if kind == "label" and ("=" not in rule or not rule.partition("=")[0].strip()):
            raise ValueError(f"attach rule {item!r}: a label rule is label:KEY=VALUE")
        out.append((kind, rule.strip()))
    return tuple(out)


def parse_compact_at(v: Any) -> int:
    layers = int(v)
    if not 2 <= layers <= 120:
        raise ValueError(f"{layers} is not between 2 and 120 (overlay2 refuses images of more than 128 layers)")
    return layers


def parse_save_path(v: Any) -> str:
    value = str(v).strip()
    if value not in ("host", "runtime"):
        raise ValueError(f"{value!r} is not host or runtime")
    return value


def parse_cache_paths(v: Any) -> tuple[str, ...]:
    """A YAML list of absolute or ``~/`` paths, or one string of them separated by ``,``."""
    if v is None:
        return ()
    if isinstance(v, dict):
        raise ValueError("expected a list of paths")
    items = [str(i).strip() for i in (v if isinstance(v, list | tuple) else str(v).split(","))]
    for item in items:
        if item and (not item.startswith(("/", "~/")) or "\0" in item or ".." in item.split("/")):
            raise ValueError(f"{item!r} is not an absolute or ~/ path")
    return tuple(i for i in items if i)


def parse_constraints(raw: Any, where: str) -> tuple[str, ...]:
    """Placement constraints as Swarm writes them: ``node.<attribute> == value`` or ``!=``."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise InvalidInputError(f"{where}: must be a list of constraints like node.labels.zone==eu", field=where)
    out = []
    for item in items:
        text = str(item).strip()
        if not re.fullmatch(r"(node|engine)\.[A-Za-z0-9_.\-]+\s*(==|!=)\s*[A-Za-z0-9_.:/\-]+", text):
            raise InvalidInputError(
                f"{where}: {text!r} is not a constraint like node.labels.zone==eu (== or !=)", field=where
            )
        out.append(text)
    return tuple(out)


def parse_tolerations(raw: Any, where: str) -> tuple[str, ...]:
    """Kubernetes tolerations as ``key[=value]:Effect`` (Effect NoSchedule, PreferNoSchedule or NoExecute)."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise InvalidInputError(f"{where}: must be a list of tolerations like gpu=true:NoSchedule", field=where)
    out = []
    for item in items:
        text = str(item).strip()
        if not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_./\-]{0,252}(=[A-Za-z0-9_.\-]{0,63})?:(NoSchedule|PreferNoSchedule|NoExecute)", text
        ):
            raise InvalidInputError(
                f"{where}: {text!r} is not a toleration like gpu=true:NoSchedule (key[=value]:Effect)", field=where
            )
        out.append(text)
    return tuple(out)


def parse_machine_types(raw: Any, source: str) -> dict[str, MachineType]:
    """The ``machine_types`` map of the config file (``source``), refused naming the entry."""
    if not isinstance(raw, dict) or not raw:
        raise InvalidInputError(f"{source}: machine_types must be a non-empty map", field="machine_types")
    out: dict[str, MachineType] = {}
    for name, spec in raw.items():
        where = f"{source}: machine_types.{name}"
        if not isinstance(spec, dict):
            raise InvalidInputError(f"{where}: must be a map with cpus and memory", field=where)
        known = {
            "cpus",
            "memory",
            "pids",
            "gpus",
            "gpu_kind",
            "idle_timeout",
            "description",
            "constraints",
            "tolerations",
        }
        unknown = set(spec) - known
        if unknown:
            raise InvalidInputError(f"{where}: unknown keys {sorted(unknown)}", field=where)
        try:
            out[str(name)] = MachineType(
                name=str(name),
                cpus=float(spec["cpus"]),
                memory=parse_memory(spec["memory"], where + ".memory"),
                pids=int(spec.get("pids", 512)),
                gpus=int(spec.get("gpus", 0)),
                gpu_kind=str(spec.get("gpu_kind") or ""),
                idle_timeout=int(spec["idle_timeout"]) if spec.get("idle_timeout") is not None else None,
                description=str(spec.get("description", "")),
                constraints=parse_constraints(spec.get("constraints") or [], where + ".constraints"),
                tolerations=parse_tolerations(spec.get("tolerations") or [], where + ".tolerations"),
            )
        except KeyError as exc:
            raise InvalidInputError(f"{where}: missing {exc.args[0]}", field=where) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{where}: {exc}", field=where) from exc
    return out


# ------------------------------------------------------------------------------ the settings


@dataclass(frozen=True)
class Settings(registry_settings.Settings):
    # "" means the name kept in the data directory, made from the host name on first start
    # (runner/identity.py), so that a host renamed later keeps its runtimes
    runner_name: str = setting(
        "",
        env="ENVCTL_RUNNER_NAME",
        help="name of this runner, recorded on each runtime and container it owns"
        " (default: the host name, kept in the data dir on first start)",
    )
    runner_backend: str = setting(
        "docker",
        env="ENVCTL_RUNNER_BACKEND",
        help="runtime backend: docker (default), swarm, kubernetes, or fake (in-memory, for tests)",
    )
    runner_idle_timeout: int = setting(
        1200,
        env="ENVCTL_RUNNER_IDLE_TIMEOUT",
        parse=int,
        help="default idle timeout of a runtime in seconds (default 1200)",
    )
    # periodic drafts of running runtimes (runner/runtimes/checkpoints.py), on backends whose
    # crashes keep nothing (Swarm): 0 is off
    runner_checkpoint_interval: float = setting(
        0.0,
        env="ENVCTL_RUNNER_CHECKPOINT_INTERVAL",
        parse=float,
        help="seconds between drafts of a running runtime's changes after cells (0: off, the default);"
        " for Swarm, where a task killed without warning keeps nothing since its last draft",
    )
    # the agent's memory watch, on the same backends (runner/agent/memwatch.py, runtimes/pressure.py)
    runner_memory_pressure: float = setting(
        90.0,
        env="ENVCTL_RUNNER_MEMORY_PRESSURE",
        parse=parse_percent_below_100,
        help="percent of a runtime's memory limit at which a running cell is paused while a draft is taken,"
        " before the memory killer (Kubernetes, Swarm; 0: off; default 90)",
    )
    runner_idle_check_interval: float = setting(
        5.0,
        env="ENVCTL_RUNNER_IDLE_CHECK_INTERVAL",
        parse=float,
        help="how often idle runtimes are looked for, seconds (default 5)",
    )
    # seconds between a runner's heartbeats in the store, and how old the last may be before
    # other servers show its runtimes as unreachable
    runner_heartbeat_interval: float = setting(
        2.0,
        env="ENVCTL_RUNNER_HEARTBEAT_INTERVAL",
        parse=float,
        help="seconds between this runner's heartbeats in the database (default 2)",
    )
    runner_stale_after: float = setting(
        30.0,
        env="ENVCTL_RUNNER_STALE_AFTER",
        parse=float,
        help="seconds without a heartbeat after which a runner's runtimes show as unreachable (default 30)",
    )
    runner_boot_timeout: float = setting(
        120.0,
        env="ENVCTL_RUNNER_BOOT_TIMEOUT",
        parse=float,
        help="seconds a boot may take before the runtime goes to error (default 120)",
    )
    runner_max_boots: int = setting(
        4,
        env="ENVCTL_RUNNER_MAX_BOOTS",
        parse=int,
        help="runtimes booting at once; more start requests get 429 (default 4)",
    )
    runner_log_max_size: str = setting(
        "10m",
        env="ENVCTL_RUNNER_LOG_MAX_SIZE",
        help="container log cap handed to Docker's json-file driver (default 10m)",
    )
    runner_output_cap: int = setting(
        10 * 1024 * 1024,
        env="ENVCTL_RUNNER_OUTPUT_CAP",
        parse=int,
        help="bytes of output kept per execution; the rest is cut with a marker (10 MB)",
    )
    # "isolated": the installation's own network, fenced in (runner/backends/netguard.py)
    runner_network: str = setting(
        "isolated",
        env="ENVCTL_RUNNER_NETWORK",
        help="Docker network runtimes join: isolated (default: the installation's own, fenced in"
        " by firewall rules, needs root) or a network's name, e.g. bridge (no isolation)",
    )
    # how envctl reaches a runtime's agent: "unix" (its socket in a host bind mount: the local
    # engine only) or "tcp" (envctl dials the runtime's address over TLS, authenticated per
    # boot: runner/channel.py)
    runner_channel: str = setting(
        "unix",
        env="ENVCTL_RUNNER_CHANNEL",
        parse=parse_channel,
        help="how envctl reaches a runtime's agent: unix (default: its socket in a host bind mount)"
        " or tcp (the runtime's address, TLS and a per-boot credential)",
    )
    # where an isolated network's subnet comes from: the first free /<prefix> of the pool
    # (runner/backends/subnets.py). Docker's own default pools (172.17-31.0.0/16, 192.168.0.0/16)
    # are left alone: a /16 per network, about 30 in all, was what ran out.
    runner_subnet_pool: str = setting(
        "10.213.0.0/16",
        env="ENVCTL_RUNNER_SUBNET_POOL",
        parse=parse_subnet_pool,
        help="IPv4 range the isolated networks' subnets are taken from, one per installation"
        " (default 10.213.0.0/16, outside Docker's own default pools)",
    )
    runner_subnet_prefix: int = setting(
        24,
        env="ENVCTL_RUNNER_SUBNET_PREFIX",
        parse=parse_subnet_prefix,
        help="size of each installation's subnet in that range, as a prefix length from the"
        " pool's to 29 (default 24: 253 runtimes per installation, 256 installations in the default pool)",
    )
    runner_labels: dict[str, str] = setting(
        env="ENVCTL_RUNNER_LABELS",
        parse=parse_labels,
        default_factory=dict,
        help="extra labels put on every runtime container, as k=v,k2=v2",
    )
    # the warm pool (runner/runtimes/pool.py): ``REF:MACHINE=N`` entries, e.g. ``python3:small=2,acme/ml:medium=1``;
    # and the memory its waiting containers may take at most (their machine types' limits; 0: no cap)
    runner_pool: tuple[tuple[str, str, int], ...] = setting(
        (),
        env="ENVCTL_RUNNER_POOL",
        parse=parse_pool,
        help="the warm pool: ENVIRONMENT:MACHINE_TYPE=COUNT entries, comma separated, e.g."
        " python3:small=2 (default none)",
    )
    runner_pool_memory: int = setting(
        0,
        env="ENVCTL_RUNNER_POOL_MEMORY",
        parse=parse_pool_memory,
        help="the memory (machine types' limits) the pool's containers may reserve, e.g. 8g (default 0: no cap)",
    )
    # the pool's hot mode (runner/runtimes/pool_hot.py): also keep warm what this runner booted most
    # in the last hour, as long as the pool's machine-type memory (ENVCTL_RUNNER_POOL's entries
    # counted first) stays within this budget; 0: off
    runner_pool_hot: int = setting(
        0,
        env="ENVCTL_RUNNER_POOL_HOT",
        parse=parse_pool_hot,
        help="turn on the pool's hot mode with a memory budget, e.g. 4g: the versions and machine types"
        " booted most in the last hour are kept warm too, ENVCTL_RUNNER_POOL's entries counted first"
        " (default 0: off)",
    )
    # containers a runtime may attach to (runner/runtimes/attach.py): ``label:KEY=VALUE`` and ``name:GLOB``
    # rules, e.g. ``label:envctl.attach=yes,name:data-*``; empty: none
    runner_attach_allow: tuple[tuple[str, str], ...] = setting(
        (),
        env="ENVCTL_RUNNER_ATTACH_ALLOW",
        parse=parse_attach_rules,
        help="containers a runtime may attach to: label:KEY=VALUE and name:GLOB rules, comma separated (default none)",
    )
    # the host's CUDA installations (``cuda-<version>`` folders) a GPU runtime may have mounted
    runner_cuda_root: Path = setting(
        Path("/usr/local"),
        env="ENVCTL_RUNNER_CUDA_ROOT",
        parse=parse_path,
        help="where the host's CUDA installations are (cuda-<version> folders) for a runtime's"
        " cuda setting (default /usr/local)",
    )
    machine_types: dict[str, MachineType] = setting(
        env=None,
        parse=parse_machine_types,
        located=True,
        default_factory=lambda: dict(DEFAULT_MACHINE_TYPES),
        help="the machine type catalog (config file only)",
    )
    results_store: str = setting(
        "local",
        env="ENVCTL_RESULTS_STORE",
        help="where result files are kept: local (default, under the data dir) or s3",
    )
    results_s3_bucket: str | None = setting(
        None, env="ENVCTL_RESULTS_S3_BUCKET", help="S3 bucket for results (needed when the results store is s3)"
    )
    results_s3_prefix: str = setting(
        "", env="ENVCTL_RESULTS_S3_PREFIX", help="key prefix inside the results bucket, e.g. envctl/ (default none)"
    )
    results_s3_endpoint_url: str | None = setting(
        None,
        env="ENVCTL_RESULTS_S3_ENDPOINT_URL",
        help="S3 API endpoint for results, e.g. a MinIO URL (default: AWS)",
    )
    results_s3_region: str = setting(
        "us-east-1",
        env="ENVCTL_RESULTS_S3_REGION",
        help="S3 region for results (default us-east-1); credentials: boto3's usual chain",
    )
    # Cache directories a save leaves out (``~/`` means /root and every /home/<user>).
    save_caches: tuple[str, ...] = setting(
        DEFAULT_SAVE_CACHES,
        env="ENVCTL_SAVE_CACHES",
        parse=parse_cache_paths,
        help="cache directories a save leaves out, comma separated (~/ means /root and every /home/<user>;"
        " default /var/lib/apt/lists,/var/cache/apt,~/.cache/pip,~/.npm; empty keeps everything)",
    )
    # A save whose image has more layers than this squashes the chain into one layer (overlay2
    # refuses images of more than 128 layers): 2 to 120.
    save_compact_at_layers: int = setting(
        100,
        env="ENVCTL_SAVE_COMPACT_AT_LAYERS",
        parse=parse_compact_at,
        help="a save whose image has more layers squashes the chain into one, 2 to 120 (default 100)",
    )
    # where a save's layer is made: ``host`` (the engine's storage on this host) or ``runtime``
    # (the agent streams it, envctl writes it into the registry: runner/saves/insave.py)
    save_path: str = setting(
        "host",
        env="ENVCTL_SAVE_PATH",
        parse=parse_save_path,
        help="where a save's layer is made: host (default: the engine's storage) or runtime"
        " (the agent streams it into the registry)",
    )
    # runtime mounts (runner/mounts/): git hosts exempt from the public-address rule, S3 endpoint
    mounts_allow_hosts: tuple[str, ...] = setting(
        (),
        env="ENVCTL_MOUNTS_ALLOW_HOSTS",
        parse=parse_names,
        help="git hosts a mount may use although they resolve to loopback or private"
        " addresses, with plain http too, comma separated (default none; for tests and in-house servers)",
    )
    mounts_s3_endpoint_url: str | None = setting(
        None, env="ENVCTL_MOUNTS_S3_ENDPOINT_URL", help="S3 API endpoint of S3 mounts (default: AWS)"
    )
    mounts_s3_region: str = setting(
        "us-east-1",
        env="ENVCTL_MOUNTS_S3_REGION",
        help="S3 region of S3 mounts (default us-east-1); credentials: boto3's usual chain",
    )
    # imports from another envctl server (runner/transfers/imports.py): its hosts, and its registry's,
    # exempt from the public-address rule (envs/kit/hosts.py)
    import_allow_hosts: tuple[str, ...] = setting(
        (),
        env="ENVCTL_IMPORT_ALLOW_HOSTS",
        parse=parse_names,
        help="envctl servers, and registries they name, that envctl pull --from may reach although they"
        " resolve to loopback or private addresses, comma separated (default none)",
    )
    # app servers (runner/apps/server.py): the teams whose apps this runner serves, and how long
    # a deployment may take from its first cell to its port answering
    runner_app_teams: tuple[str, ...] = setting(
        (),
        env="ENVCTL_RUNNER_APP_TEAMS",
        parse=parse_names,
        help="teams whose apps this runner deploys and serves, comma separated (default none: it serves no app)",
    )
    runner_app_start_timeout: float = setting(
        120.0,
        env="ENVCTL_RUNNER_APP_START_TIMEOUT",
        parse=float,
        help="seconds an app's cells may take until its port answers before the deployment fails (default 120)",
    )
    # the Swarm backend (runner/backends/swarm.py): the manager's Docker API ("": DOCKER_HOST), the
    # registry's host[:port] as the nodes reach it ("": the managed registry's listen address),
    # and how long a task may stay pending (no node fits) or preparing (pulling) before its error
    swarm_manager: str = setting(
        "",
        env="ENVCTL_SWARM_MANAGER",
        help="the Swarm manager's Docker API for ENVCTL_RUNNER_BACKEND=swarm (default DOCKER_HOST)",
    )
    swarm_registry: str = setting(
        "",
        env="ENVCTL_SWARM_REGISTRY",
        help="the registry as Swarm nodes reach it, host[:port] (default: the managed registry's"
        " listen address and port)",
    )
    swarm_pending_timeout: float = setting(
        20.0,
        env="ENVCTL_SWARM_PENDING_TIMEOUT",
        parse=float,
        help="seconds a Swarm task may wait for a node that fits before the boot fails"
        " naming the missing resource (default 20)",
    )
    swarm_pull_timeout: float = setting(
        600.0,
        env="ENVCTL_SWARM_PULL_TIMEOUT",
        parse=float,
        help="seconds a Swarm node may spend pulling a runtime's image (default 600)",
    )
    # attach on Swarm (runner/backends/swarm_attach.py): "" off; else the nodes' Docker socket
    # path, bind-mounted into envctl's helper tasks (node label envctl.engine-socket overrides it)
    swarm_attach_engine: str = setting(
        "",
        env="ENVCTL_SWARM_ATTACH_ENGINE",
        help="attach on Swarm: the nodes' Docker socket (e.g. /var/run/docker.sock), which gives envctl"
        " every node's engine (default off)",
    )

    # the Kubernetes backend (runner/backends/kube.py): where the API server is (a kubeconfig file,
    # or "in-cluster" for a pod's service account), the namespace of runtimes' pods, the storage
    # class of named volumes, the registry as nodes reach it, and how long a pod may stay
    # unschedulable or pulling before its boot fails
    kube_config: str = setting(
        "",
        env="ENVCTL_KUBE_CONFIG",
        help="kubeconfig file for ENVCTL_RUNNER_BACKEND=kubernetes, or in-cluster (default: KUBECONFIG,"
        " else ~/.kube/config)",
    )
    kube_context: str = setting("", env="ENVCTL_KUBE_CONTEXT", help="the kubeconfig's context (default: its current)")
    kube_namespace: str = setting(
        "default", env="ENVCTL_KUBE_NAMESPACE", help="namespace runtimes' pods are made in (default: default)"
    )
    kube_storage_class: str = setting(
        "",
        env="ENVCTL_KUBE_STORAGE_CLASS",
        help="storage class of named volumes' PersistentVolumeClaims (default: the cluster's default class)",
    )
    kube_registry: str = setting(
        "",
        env="ENVCTL_KUBE_REGISTRY",
        help="the registry as the cluster's nodes reach it, host[:port] (default: the managed registry's"
        " listen address and port)",
    )
    kube_pending_timeout: float = setting(
        20.0,
        env="ENVCTL_KUBE_PENDING_TIMEOUT",
        parse=float,
        help="seconds a pod may stay unschedulable before its boot fails with the scheduler's reason (default 20)",
    )
    kube_pull_timeout: float = setting(
        600.0,
        env="ENVCTL_KUBE_PULL_TIMEOUT",
        parse=float,
        help="seconds a node may spend pulling a runtime's image (default 600)",
    )
    kube_pull_retries: int = setting(
        3,
        env="ENVCTL_KUBE_PULL_RETRIES",
        parse=int,
        help="failed pulls of a runtime's image before its boot fails (default 3)",
    )

    @property
    def runtimes_dir(self) -> Path:
        """Per-runtime private state directories (agent socket, drafts) live here."""
        return self.data_dir / "runtimes"
