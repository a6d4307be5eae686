"""Settings: one typed object, read from an optional YAML file and ``ENVCTL_*`` variables.

Precedence, highest first: environment variables, the config file (``--config FILE`` or
``ENVCTL_CONFIG``), built-in defaults. Every setting has a variable named
``ENVCTL_<SECTION>_<NAME>`` (top-level ones drop the section: ``ENVCTL_DATA_DIR``).

The README's "Configuration" table lists them; keep it in step with ``SETTINGS_HELP`` below.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from envs.kit.errors import InvalidInputError


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

#: Debian's folder for locally added CAs on the build machine (update-ca-certificates reads it).
DEFAULT_EXTRA_CA_CERTS = Path("/usr/local/share/ca-certificates")

SETTINGS_HELP: dict[str, str] = {
    "ENVCTL_CONFIG": "YAML config file (same keys as the settings, sections as nested maps)",
    "ENVCTL_DATA_DIR": "where envctl keeps its database, runtime state and results",
    "ENVCTL_DATABASE_URL": "SQLAlchemy URL; default sqlite:///<data dir>/envctl.db",
    "ENVCTL_API_HOST": "address `envctl serve` listens on (default 127.0.0.1)",
    "ENVCTL_API_PORT": "port `envctl serve` listens on (default 8700)",
    "ENVCTL_URL": "the API the CLI talks to (default http://127.0.0.1:8700)",
    "ENVCTL_TOKEN": "bearer token the CLI sends (default: the one `envctl serve` wrote)",
    "ENVCTL_RUNNER_NAME": "name of this runner, recorded on each runtime and container it owns"
    " (default: the host name, kept in the data dir on first start)",
    "ENVCTL_RUNNER_BACKEND": "runtime backend: docker (default) or fake (in-memory, for tests)",
    "ENVCTL_RUNNER_IDLE_TIMEOUT": "default idle timeout of a runtime in seconds (default 1200)",
    "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "how often idle runtimes are looked for, seconds (default 5)",
    "ENVCTL_RUNNER_HEARTBEAT_INTERVAL": "seconds between this runner's heartbeats in the database (default 2)",
    "ENVCTL_RUNNER_STALE_AFTER": "seconds without a heartbeat after which a runner's runtimes show as unreachable"
    " (default 30)",
    "ENVCTL_RUNNER_BOOT_TIMEOUT": "seconds a boot may take before the runtime goes to error (default 120)",
    "ENVCTL_RUNNER_MAX_BOOTS": "runtimes booting at once; more start requests get 429 (default 4)",
    "ENVCTL_RUNNER_OUTPUT_CAP": "bytes of output kept per execution; the rest is cut with a marker (10 MB)",
    "ENVCTL_RUNNER_LOG_MAX_SIZE": "container log cap handed to Docker's json-file driver (default 10m)",
    "ENVCTL_RUNNER_NETWORK": "Docker network runtimes join: isolated (default: the installation's own, fenced in"
    " by firewall rules, needs root) or a network's name, e.g. bridge (no isolation)",
    "ENVCTL_RUNNER_SUBNET_POOL": "IPv4 range the isolated networks' subnets are taken from, one per installation"
    " (default 10.213.0.0/16, outside Docker's own default pools)",
    "ENVCTL_RUNNER_SUBNET_PREFIX": "size of each installation's subnet in that range, as a prefix length from the"
    " pool's to 29 (default 24: 253 runtimes per installation, 256 installations in the default pool)",
    "ENVCTL_RUNNER_LABELS": "extra labels put on every runtime container, as k=v,k2=v2",
    "ENVCTL_RUNNER_CUDA_ROOT": "where the host's CUDA installations are (cuda-<version> folders) for a runtime's"
    " cuda setting (default /usr/local)",
    "ENVCTL_BASE_MIRROR": "Debian mirror for base images (default: the machine's apt mirror)",
    "ENVCTL_BASE_EXTRA_CA_CERTS": "CA files or folders of *.crt trusted inside base images, : or , separated"
    " (default /usr/local/share/ca-certificates)",
    "ENVCTL_REGISTRY": "the image registry: managed (envctl runs Debian's docker-registry; the default when"
    " /usr/bin/docker-registry exists), off, or an external registry's URL",
    "ENVCTL_REGISTRY_PORT": "loopback port of the managed registry (default: the API port + 1)",
    "ENVCTL_REGISTRY_BINARY": "the distribution registry program (default /usr/bin/docker-registry)",
    "ENVCTL_REGISTRY_TOKEN_TTL": "seconds a registry token lives (default 300); clients ask again when it ends",
    "ENVCTL_REGISTRY_LISTEN": "address the managed registry listens on (default 127.0.0.1); a cluster's nodes"
    " need one they reach, e.g. the Swarm bridge's host address",
    "ENVCTL_SWARM_MANAGER": "the Swarm manager's Docker API for ENVCTL_RUNNER_BACKEND=swarm (default DOCKER_HOST)",
    "ENVCTL_SWARM_REGISTRY": "the registry as Swarm nodes reach it, host[:port] (default: the managed registry's"
    " listen address and port)",
    "ENVCTL_SWARM_PENDING_TIMEOUT": "seconds a Swarm task may wait for a node that fits before the boot fails"
    " naming the missing resource (default 20)",
    "ENVCTL_SWARM_PULL_TIMEOUT": "seconds a Swarm node may spend pulling a runtime's image (default 600)",
    "ENVCTL_REGISTRY_PREPULL": "teams (comma-separated) whose published versions this server pulls as they are"
    " published, before any boot asks (default none)",
    "ENVCTL_RESULTS_STORE": "where result files are kept: local (default, under the data dir) or s3",
    "ENVCTL_RESULTS_S3_BUCKET": "S3 bucket for results (needed when the results store is s3)",
    "ENVCTL_RESULTS_S3_PREFIX": "key prefix inside the results bucket, e.g. envctl/ (default none)",
    "ENVCTL_RESULTS_S3_ENDPOINT_URL": "S3 API endpoint for results, e.g. a MinIO URL (default: AWS)",
    "ENVCTL_RESULTS_S3_REGION": "S3 region for results (default us-east-1); credentials: boto3's usual chain",
    "ENVCTL_MOUNTS_ALLOW_HOSTS": "git hosts a mount may use although they resolve to loopback or private"
    " addresses, with plain http too, comma separated (default none; for tests and in-house servers)",
    "ENVCTL_MOUNTS_S3_ENDPOINT_URL": "S3 API endpoint of S3 mounts (default: AWS)",
    "ENVCTL_MOUNTS_S3_REGION": "S3 region of S3 mounts (default us-east-1); credentials: boto3's usual chain",
}


#: package-manager caches a save leaves out unless asked to keep them
DEFAULT_SAVE_CACHES = ("/var/lib/apt/lists", "/var/cache/apt", "~/.cache/pip", "~/.npm")


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "envctl"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    database_url: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8700
    # FastAPI's OpenTelemetry spans, metrics and logs (sent to the OTLP endpoint that the
    # OTEL_* variables name). Off by default: they cost about a millisecond per request.
    api_telemetry: bool = False
    # "" means the name kept in the data directory, made from the host name on first start
    # (runner/identity.py), so that a host renamed later keeps its runtimes
    runner_name: str = ""
    runner_backend: str = "docker"
    runner_idle_timeout: int = 1200
    runner_idle_check_interval: float = 5.0
    # seconds between a runner's heartbeats in the store, and how old the last may be before
    # other servers show its runtimes as unreachable
    runner_heartbeat_interval: float = 2.0
    runner_stale_after: float = 30.0
    runner_boot_timeout: float = 120.0
    runner_max_boots: int = 4
    runner_log_max_size: str = "10m"
    runner_output_cap: int = 10 * 1024 * 1024
    # "isolated": the installation's own network, fenced in (runner/backends/netguard.py)
    runner_network: str = "isolated"
    # how envctl reaches a runtime's agent: "unix" (its socket in a host bind mount: the local
    # engine only) or "tcp" (envctl dials the runtime's address over TLS, authenticated per
    # boot: runner/channel.py)
    runner_channel: str = "unix"
    # where an isolated network's subnet comes from: the first free /<prefix> of the pool
    # (runner/backends/subnets.py). Docker's own default pools (172.17-31.0.0/16, 192.168.0.0/16)
    # are left alone: a /16 per network, about 30 in all, was what ran out.
    runner_subnet_pool: str = "10.213.0.0/16"
    runner_subnet_prefix: int = 24
    runner_labels: dict[str, str] = field(default_factory=dict)
    # the warm pool (runner/runtimes/pool.py): ``REF:MACHINE=N`` entries, e.g. ``python3:small=2,acme/ml:medium=1``;
    # and the memory its waiting containers may take at most (their machine types' limits; 0: no cap)
    runner_pool: tuple[tuple[str, str, int], ...] = ()
    runner_pool_memory: int = 0
    # containers a runtime may attach to (runner/runtimes/attach.py): ``label:KEY=VALUE`` and ``name:GLOB``
    # rules, e.g. ``label:envctl.attach=yes,name:data-*``; empty: none
    runner_attach_allow: tuple[tuple[str, str], ...] = ()
    # the host's CUDA installations (``cuda-<version>`` folders) a GPU runtime may have mounted
    runner_cuda_root: Path = Path("/usr/local")
    base_mirror: str | None = None
    # PEM CA certificates (files, or folders of *.crt) added to the root base image, e.g. a
    # TLS-intercepting proxy's. The default folder may be missing; a named path may not.
    base_extra_ca_certs: tuple[Path, ...] = (DEFAULT_EXTRA_CA_CERTS,)
    # "" picks managed when registry_binary exists, off otherwise; or an external registry's URL
    registry: str = ""
    registry_port: int = 0  # 0: the API port + 1
    registry_binary: Path = Path("/usr/bin/docker-registry")
    registry_token_ttl: int = 300
    # the address the managed registry listens on: loopback, or e.g. 0.0.0.0 / a bridge's address
    # when a cluster's nodes pull from it (the Swarm backend); this host still reaches it on loopback
    registry_listen: str = "127.0.0.1"
    registry_prepull: tuple[str, ...] = ()  # teams whose publications are pulled ahead (registry/prepull.py)
    results_store: str = "local"
    results_s3_bucket: str | None = None
    results_s3_prefix: str = ""
    results_s3_endpoint_url: str | None = None
    results_s3_region: str = "us-east-1"
    machine_types: dict[str, MachineType] = field(default_factory=lambda: dict(DEFAULT_MACHINE_TYPES))
    # Cache directories a save leaves out (``~/`` means /root and every /home/<user>).
    save_caches: tuple[str, ...] = DEFAULT_SAVE_CACHES
    # A save whose image has more layers than this squashes the chain into one layer (overlay2
    # refuses images of more than 128 layers): 2 to 120.
    save_compact_at_layers: int = 100
    # where a save's layer is made: ``host`` (the engine's storage on this host) or ``runtime``
    # (the agent streams it, envctl writes it into the registry: runner/saves/insave.py)
    save_path: str = "host"
    # runtime mounts (runner/mounts/): git hosts exempt from the public-address rule, S3 endpoint
    mounts_allow_hosts: tuple[str, ...] = ()
    mounts_s3_endpoint_url: str | None = None
    mounts_s3_region: str = "us-east-1"
    # imports from another envctl server (runner/transfers/imports.py): its hosts, and its registry's,
    # exempt from the public-address rule (envs/kit/hosts.py)
    import_allow_hosts: tuple[str, ...] = ()
    # the Swarm backend (runner/backends/swarm.py): the manager's Docker API ("": DOCKER_HOST), the
    # registry's host[:port] as the nodes reach it ("": the managed registry's listen address),
    # and how long a task may stay pending (no node fits) or preparing (pulling) before its error
    swarm_manager: str = ""
    swarm_registry: str = ""
    swarm_pending_timeout: float = 20.0
    swarm_pull_timeout: float = 600.0
    # the key that encrypts team secrets (made on first use, mode 0600); None: <data dir>/secrets.key
    secrets_key_file: Path | None = None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'envctl.db'}"

    @property
    def runtimes_dir(self) -> Path:
        """Per-runtime private state directories (agent socket, drafts) live here."""
        return self.data_dir / "runtimes"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


# name in Settings -> (env var, parser)
_INT = int
_FLOAT = float


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{v!r} is not true or false")


def _compact_at(v: Any) -> int:
    layers = int(v)
    if not 2 <= layers <= 120:
        raise ValueError(f"{layers} is not between 2 and 120 (overlay2 refuses images of more than 128 layers)")
    return layers


def _save_path(v: Any) -> str:
    value = str(v).strip()
    if value not in ("host", "runtime"):
        raise ValueError(f"{value!r} is not host or runtime")
    return value


def _subnet_pool(v: Any) -> str:
    """An IPv4 network in CIDR form with no host bits set, e.g. 10.213.0.0/16."""
    text = str(v).strip()
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IPv4 network in CIDR form such as 10.213.0.0/16 ({exc})") from exc
    if net.prefixlen > 29:
        raise ValueError(f"{net} is too small: a runtime network needs at least a /29")
    return str(net)


def _subnet_prefix(v: Any) -> int:
    prefix = int(v)
    if not 8 <= prefix <= 29:
        raise ValueError(f"{prefix} is not a prefix length from 8 to 29")
    return prefix


def _path(v: Any) -> Path:
    return Path(str(v)).expanduser()


def _paths(v: Any) -> tuple[Path, ...]:
    """A YAML list of paths, or one string of paths separated by ``:`` or ``,``."""
    if v is None:
        return ()
    if isinstance(v, dict):
        raise ValueError("expected a list of paths")
    items = v if isinstance(v, list | tuple) else re.split(r"[:,]", str(v))
    return tuple(_path(str(item).strip()) for item in items if str(item).strip())


def _team_names(v: Any) -> tuple[str, ...]:
    """A YAML list of team names, or one string of them separated by ``,``."""
    items = [str(i).strip() for i in (v if isinstance(v, list | tuple) else str(v or "").split(","))]
    for item in items:
        if item and (len(item) > 64 or not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", item)):
            raise ValueError(f"{item!r} is not a team name")
    return tuple(i for i in items if i)


def _cache_paths(v: Any) -> tuple[str, ...]:
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


def _names(v: Any) -> tuple[str, ...]:
    """A YAML list of names, or one string of them separated by ``,``."""
    items = v if isinstance(v, list | tuple) else str(v or "").split(",")
    return tuple(str(i).strip().lower() for i in items if str(i).strip())


CHANNELS = ("unix", "tcp")


def _channel(v: Any) -> str:
    value = str(v).strip().lower()
    if value not in CHANNELS:
        raise ValueError(f"the agent channel is one of {', '.join(CHANNELS)}")
    return value


def _labels(v: Any) -> dict[str, str]:
    if isinstance(v, dict):
        return {str(k): str(val) for k, val in v.items()}
    out: dict[str, str] = {}
    for item in str(v).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


MAX_POOL_PER_ENTRY = 32


def _pool(v: Any) -> tuple[tuple[str, str, int], ...]:
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


def _pool_memory(v: Any) -> int:
    n = _parse_memory(v, "runner_pool_memory")
    if n < 0:
        raise ValueError("the pool's memory budget cannot be negative")
    return n


def _attach_rules(v: Any) -> tuple[tuple[str, str], ...]:
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


_FIELDS: dict[str, tuple[str, Any]] = {
    "data_dir": ("ENVCTL_DATA_DIR", _path),
    "database_url": ("ENVCTL_DATABASE_URL", str),
    "api_host": ("ENVCTL_API_HOST", str),
    "api_port": ("ENVCTL_API_PORT", _INT),
    "api_telemetry": ("ENVCTL_API_TELEMETRY", _bool),
    "runner_name": ("ENVCTL_RUNNER_NAME", str),
    "runner_backend": ("ENVCTL_RUNNER_BACKEND", str),
    "runner_idle_timeout": ("ENVCTL_RUNNER_IDLE_TIMEOUT", _INT),
    "runner_idle_check_interval": ("ENVCTL_RUNNER_IDLE_CHECK_INTERVAL", _FLOAT),
    "runner_heartbeat_interval": ("ENVCTL_RUNNER_HEARTBEAT_INTERVAL", _FLOAT),
    "runner_stale_after": ("ENVCTL_RUNNER_STALE_AFTER", _FLOAT),
    "runner_boot_timeout": ("ENVCTL_RUNNER_BOOT_TIMEOUT", _FLOAT),
    "runner_max_boots": ("ENVCTL_RUNNER_MAX_BOOTS", _INT),
    "runner_log_max_size": ("ENVCTL_RUNNER_LOG_MAX_SIZE", str),
    "runner_output_cap": ("ENVCTL_RUNNER_OUTPUT_CAP", _INT),
    "runner_network": ("ENVCTL_RUNNER_NETWORK", str),
    "runner_channel": ("ENVCTL_RUNNER_CHANNEL", _channel),
    "runner_subnet_pool": ("ENVCTL_RUNNER_SUBNET_POOL", _subnet_pool),
    "runner_subnet_prefix": ("ENVCTL_RUNNER_SUBNET_PREFIX", _subnet_prefix),
    "runner_labels": ("ENVCTL_RUNNER_LABELS", _labels),
    "runner_pool": ("ENVCTL_RUNNER_POOL", _pool),
    "runner_pool_memory": ("ENVCTL_RUNNER_POOL_MEMORY", _pool_memory),
    "runner_attach_allow": ("ENVCTL_RUNNER_ATTACH_ALLOW", _attach_rules),
    "runner_cuda_root": ("ENVCTL_RUNNER_CUDA_ROOT", _path),
    "base_mirror": ("ENVCTL_BASE_MIRROR", str),
    "base_extra_ca_certs": ("ENVCTL_BASE_EXTRA_CA_CERTS", _paths),
    "registry": ("ENVCTL_REGISTRY", str),
    "registry_port": ("ENVCTL_REGISTRY_PORT", _INT),
    "registry_binary": ("ENVCTL_REGISTRY_BINARY", _path),
    "registry_token_ttl": ("ENVCTL_REGISTRY_TOKEN_TTL", _INT),
    "registry_prepull": ("ENVCTL_REGISTRY_PREPULL", _team_names),
    "registry_listen": ("ENVCTL_REGISTRY_LISTEN", str),
    "swarm_manager": ("ENVCTL_SWARM_MANAGER", str),
    "swarm_registry": ("ENVCTL_SWARM_REGISTRY", str),
    "swarm_pending_timeout": ("ENVCTL_SWARM_PENDING_TIMEOUT", _FLOAT),
    "swarm_pull_timeout": ("ENVCTL_SWARM_PULL_TIMEOUT", _FLOAT),
    "results_store": ("ENVCTL_RESULTS_STORE", str),
    "results_s3_bucket": ("ENVCTL_RESULTS_S3_BUCKET", str),
    "results_s3_prefix": ("ENVCTL_RESULTS_S3_PREFIX", str),
    "results_s3_endpoint_url": ("ENVCTL_RESULTS_S3_ENDPOINT_URL", str),
    "results_s3_region": ("ENVCTL_RESULTS_S3_REGION", str),
    "save_caches": ("ENVCTL_SAVE_CACHES", _cache_paths),
    "save_compact_at_layers": ("ENVCTL_SAVE_COMPACT_AT_LAYERS", _compact_at),
    "save_path": ("ENVCTL_SAVE_PATH", _save_path),
    "mounts_allow_hosts": ("ENVCTL_MOUNTS_ALLOW_HOSTS", _names),
    "mounts_s3_endpoint_url": ("ENVCTL_MOUNTS_S3_ENDPOINT_URL", str),
    "mounts_s3_region": ("ENVCTL_MOUNTS_S3_REGION", str),
    "import_allow_hosts": ("ENVCTL_IMPORT_ALLOW_HOSTS", _names),
    "secrets_key_file": ("ENVCTL_SECRETS_KEY_FILE", _path),
}


def _parse_memory(value: Any, where: str) -> int:
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    try:
        if text[-1:] == "b":
            text = text[:-1]
        if text[-1:] == "i":
            text = text[:-1]
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError as exc:
        raise InvalidInputError(
            f"{where}: memory must be bytes or a size like 2g or 512m, not {value!r}", field=where
        ) from exc


def _constraints(raw: Any, where: str) -> tuple[str, ...]:
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


def _machine_types(raw: Any, source: str) -> dict[str, MachineType]:
    if not isinstance(raw, dict) or not raw:
        raise InvalidInputError(f"{source}: machine_types must be a non-empty map", field="machine_types")
    out: dict[str, MachineType] = {}
    for name, spec in raw.items():
        where = f"{source}: machine_types.{name}"
        if not isinstance(spec, dict):
            raise InvalidInputError(f"{where}: must be a map with cpus and memory", field=where)
        known = {"cpus", "memory", "pids", "gpus", "gpu_kind", "idle_timeout", "description", "constraints"}
        unknown = set(spec) - known
        if unknown:
            raise InvalidInputError(f"{where}: unknown keys {sorted(unknown)}", field=where)
        try:
            out[str(name)] = MachineType(
                name=str(name),
                cpus=float(spec["cpus"]),
                memory=_parse_memory(spec["memory"], where + ".memory"),
                pids=int(spec.get("pids", 512)),
                gpus=int(spec.get("gpus", 0)),
                gpu_kind=str(spec.get("gpu_kind") or ""),
                idle_timeout=int(spec["idle_timeout"]) if spec.get("idle_timeout") is not None else None,
                description=str(spec.get("description", "")),
                constraints=_constraints(spec.get("constraints") or [], where + ".constraints"),
            )
        except KeyError as exc:
            raise InvalidInputError(f"{where}: missing {exc.args[0]}", field=where) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{where}: {exc}", field=where) from exc
    return out


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"runner": {"idle_timeout": 5}}`` -> ``{"runner_idle_timeout": 5}``."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in {"api", "runner", "base", "results", "registry"}:
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[key] = value
    return flat


def load_settings(config_file: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build the settings from defaults, a YAML file and the environment."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    path = config_file or env.get("ENVCTL_CONFIG")
    if path:
        p = Path(path).expanduser()
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise InvalidInputError(f"{p}: cannot read config file: {exc.strerror}", field="config") from exc
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{p}: not valid YAML: {exc}", field="config") from exc
        if not isinstance(raw, dict):
            raise InvalidInputError(f"{p}: the config file must be a YAML map", field="config")
        flat = _flatten(raw)
        for key, value in flat.items():
            if key == "machine_types":
                values["machine_types"] = _machine_types(value, str(p))
            elif key in _FIELDS:
                values[key] = _convert(key, value, f"{p}: {key}")
            else:
                known = sorted([*_FIELDS, "machine_types"])
                raise InvalidInputError(f"{p}: unknown setting {key!r}; known settings: {', '.join(known)}", field=key)
    for key, (var, _parser) in _FIELDS.items():
        if env.get(var):
            values[key] = _convert(key, env[var], var)
    return Settings(**values)


def _convert(key: str, value: Any, where: str) -> Any:
    parser = _FIELDS[key][1]
    try:
        return parser(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: {value!r} is not a valid value ({exc})", field=key) from exc
