"""Request and response models of the API. Responses are built from services, never ORM rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[a-z0-9]+([._-][a-z0-9]+)*$"


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorOut(BaseModel):
    error: ErrorBody


MOUNTS_HELP = (
    "mounts, each a map with a type and an absolute target: "
    '{"type": "git", "url": "https://...", "ref": "main", "target": "/mnt/code"}, '
    '{"type": "s3", "bucket": "b", "prefix": "p/", "target": "/data", "writeback": false} or '
    '{"type": "volume", "name": "v", "target": "/home/data", "read_only": false}'
)


LEASE_HELP = (
    "seconds the runtime lives without its client: the client renews it with POST /runtimes/{id}/lease at "
    "least that often, else the runtime is stopped and deleted (a running cell does not keep it); "
    "5 to 86400; not for team runtimes"
)


class AttachSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    container: str = Field(
        min_length=1,
        max_length=200,
        description="the container's id or name; on the kubernetes backend POD or POD/CONTAINER of envctl's namespace",
    )


class RuntimeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN, examples=["demo"])
    environment: str | None = Field(
        default=None,
        min_length=1,
        max_length=300,
        examples=["python3", "python3@1", "acme/ml:stable"],
        description="required, unless the runtime is attached to a container (`attach`)",
    )
    language: Literal["python", "bash"] = "python"
    type: Literal["native", "jupyter"] = Field(
        default="native", description="native: envctl's agent kernels; jupyter: a Jupyter kernelspec in the image"
    )
    kernel: str | None = Field(
        default=None, max_length=64, description="kernelspec name for type jupyter (default python3)"
    )
    machine_type: str = Field(default="small", min_length=1, max_length=64)
    idle_timeout: int | None = Field(default=None, ge=0, le=7 * 24 * 3600, description="seconds; 0 never")
    lease: int | None = Field(default=None, ge=5, le=24 * 3600, description=LEASE_HELP)
    env: dict[str, str | SecretRef] = Field(
        default_factory=dict,
        max_length=200,
        description="environment variables of the runtime's processes (names: letter or _, then letters, digits, _; "
        'LD_*, ENVCTL_*, NVIDIA_* and HOSTNAME are reserved); {"secret": NAME} for a team secret',
    )
    cuda: str | None = Field(
        default=None, max_length=32, description="host CUDA version for a GPU machine type (GET /machine-types/cuda)"
    )
    mounts: list[Any] | None = Field(default=None, description=MOUNTS_HELP)
    team: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=NAME_PATTERN,
        examples=["acme"],
        description="a team of yours: its members see and use the runtime too (null: only you)",
    )
    attach: AttachSpec | None = Field(
        default=None,
        description="run the cells in a container envctl did not start, which the admins' allow-list "
        "(ENVCTL_RUNNER_ATTACH_ALLOW) names; envctl never stops, removes or commits it",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _environment_unless_attached(cls, data: Any, handler: Any) -> Any:
        """``environment`` is required unless ``attach`` is given: named as missing beside the
        body's other problems, as a required field would be."""
        problems: list[Any] = []
        model = None
        try:
            model = handler(data)
        except ValidationError as exc:
            problems = [
                {"type": e["type"], "loc": e["loc"], "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})}
                for e in exc.errors()
            ]
        if isinstance(data, dict) and data.get("attach") is None and data.get("environment") is None:
            problems.insert(0, {"type": "missing", "loc": ("environment",), "input": data})
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return model

    cell: ExecutionCreate | None = Field(
        default=None,
        description="a first cell to run at once (create-and-run): the runtime boots (from the warm pool "
        "when one fits) and the answer carries the cell as `execution`, finished when `?wait=` allows",
    )


class RuntimePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)
    environment: str | None = Field(default=None, min_length=1, max_length=300, description="needs a reboot")
    language: Literal["python", "bash"] | None = None
    type: Literal["native", "jupyter"] | None = Field(default=None, description="needs a reboot")
    kernel: str | None = Field(default=None, max_length=64, description="kernelspec name, with type jupyter")
    machine_type: str | None = Field(default=None, min_length=1, max_length=64, description="needs a reboot")
    idle_timeout: int | None = Field(
        default=None, ge=0, le=7 * 24 * 3600, description="seconds; 0 never; null for the default"
    )
    env: dict[str, str | SecretRef | None] | None = Field(
        default=None,
        max_length=200,
        description="environment variables as a merge patch: a value sets one, null removes it; needs a reboot",
    )
    cuda: str | None = Field(
        default=None,
        max_length=32,
        description="host CUDA version mounted at /usr/local/cuda in GPU runtimes (GET /machine-types/cuda lists "
        "them); null for none; needs a reboot",
    )
    mounts: list[Any] | None = Field(default=None, description=MOUNTS_HELP + "; the complete new list, needs a reboot")
    lease: int | None = Field(
        default=None,
        ge=5,
        le=24 * 3600,
        description="a new lease length, starting now; null drops the lease (the runtime then stays when its "
        "client goes). A lease that ran out cannot be changed (409)",
    )
    next_boot: bool = Field(
        default=False,
        description="while the runtime runs, keep changes that need a reboot for its next boot instead of a 409 "
        "(same as ?apply=next-boot)",
    )


class IdleOut(BaseModel):
    timeout: int | None
    shutdown_at: datetime | None
    reason: str
    last_activity_at: datetime | None
    last_activity: str


class LeaseOut(BaseModel):
    seconds: int = Field(description="the lease's length: how long the runtime lives without a renewal")
    expires_at: datetime = Field(description="when the runtime is stopped and deleted unless renewed before")
    renewed_at: datetime | None = Field(description="the client's last heartbeat (or when the lease began)")
    expired: bool = Field(description="whether it ran out (housekeeping is deleting the runtime)")


class RuntimeOut(BaseModel):
    id: str
    name: str
    team: str | None = Field(default=None, description="the team the runtime is shared with; null: personal")
    type: str
    kernel: str | None
    language: str
    environment: str = Field(description="the exact version the runtime is pinned to, e.g. python3@1")
    environment_ref: str = Field(description="the reference as it was asked for, e.g. python3:latest")
    environment_digest: str
    state: Literal["stopped", "booting", "running", "stopping", "error"]
    state_color: str
    state_reason: str
    state_message: str
    phase: str | None
    progress: dict[str, int] | None = Field(
        default=None,
        description="bytes done and total of the download or upload the phase names (mounts or an image "
        "being fetched, a save being pushed); null otherwise",
    )
    busy: bool
    saving: bool
    unsaved_changes: bool | None = Field(
        description="whether the filesystem differs from the version; null when not known without a look "
        "(lists report drafts only; GET /runtimes/{id} looks)"
    )
    idle_shutdown_at: datetime | None
    idle: IdleOut | None
    machine_type: str
    idle_timeout: int | None
    env: dict[str, str | SecretRef] = Field(
        default_factory=dict, description="the runtime's own environment variables (secrets as references)"
    )
    secrets_outdated: list[str] = Field(
        default_factory=list,
        description="secrets (TEAM/NAME) changed or deleted since the running container got them; a reboot applies",
    )
    cuda: str | None = Field(default=None, description="the host CUDA version mounted in a GPU runtime")
    mounts: list[dict[str, Any]] = Field(default_factory=list, description="the runtime's mounts")
    mounts_used: list[dict[str, Any]] = Field(
        default_factory=list,
        description="what the current (or last) boot mounted: the git commit, the S3 objects' ETags, the volume",
    )
    pending: dict[str, Any] = Field(
        default_factory=dict,
        description="settings changed while it ran, applied by its next boot (field -> new value); empty if none",
    )
    runner: str = Field(description="the runner that owns the runtime; only it acts on it")
    origin: Literal["boot", "pool", "attached"] = Field(
        default="boot",
        description="where its container came from: booted for it, claimed from the warm pool, or a container "
        "envctl did not start that it is attached to",
    )
    runner_alive: bool = Field(description="whether that runner beats its heartbeat in the store")
    unreachable: str | None = Field(
        description="why this server cannot act on the runtime (another runner owns it, or its runner is gone); "
        "null when it can"
    )
    node: str | None = Field(
        default=None, description="the cluster node its container runs on (the Swarm backend); null otherwise"
    )
    lease: LeaseOut | None = Field(
        default=None, description="the client's lease (the runtime goes when it runs out); null: none"
    )
    booted_at: datetime | None
    created_at: datetime
    updated_at: datetime


class RuntimeCreatedOut(RuntimeOut):
    execution: ExecutionOut | None = Field(
        default=None, description="the first cell of a create-and-run (`cell`), as `GET /executions/{id}` shows it"
    )


class PoolTargetOut(BaseModel):
    environment: str = Field(description="the reference the setting names, e.g. python3:latest")
    version: str | None = Field(description="the version it means now; null when it names none")
    machine_type: str
    count: int
    why: str = Field(
        description='why it is pooled: "configured" (ENVCTL_RUNNER_POOL) or "hot: N boots in the last hour"'
    )
    boots: int | None = Field(description="a hot target's boots in the last hour; null for a configured one")
    waiting: int
    booting: int


class PoolEntryOut(BaseModel):
    id: str
    state: Literal["booting", "waiting"]
    environment: str
    machine_type: str
    container: str | None
    boot_ms: float | None
    ready_at: datetime | None


class PoolOut(BaseModel):
    runner: str
    targets: list[PoolTargetOut]
    entries: list[PoolEntryOut]
    hidden: int = Field(description="waiting or booting containers of hot versions the caller may not see (not listed)")
    memory_budget: int = Field(description="bytes the pool may reserve (ENVCTL_RUNNER_POOL_MEMORY); 0: no cap")
    hot_budget: int = Field(
        description="bytes of the hot mode (ENVCTL_RUNNER_POOL_HOT): configured targets first, then the versions"
        " booted most in the last hour; 0: off"
    )
    memory_reserved: int = Field(description="the machine types' memory of the waiting and booting containers")


class SecretRef(BaseModel):
    """A variable whose value is a team secret, given to the runtime's processes at boot."""

    model_config = ConfigDict(extra="forbid")

    secret: str = Field(max_length=130, description="the secret's name, or TEAM/NAME", examples=["db-pass"])
    team: str | None = Field(default=None, max_length=64, description="its team, when not in secret")


class EnvVarOut(BaseModel):
    name: str
    value: str | None = Field(description="the value; null for a secret, never shown")
    secret: str | None = Field(default=None, description="the secret (TEAM/NAME) the value comes from")
    source: Literal["set here", "inherited"] = Field(description="set on the runtime, or by its environment's image")
    overrides: bool = Field(description="set here over a value the image sets")
    image_value: str | None = Field(
        default=None, description="with overrides: the value the image sets, which this one hides (else left out)"
    )


class RuntimeEnvOut(BaseModel):
    runtime_id: str
    environment: str = Field(description="the version whose image the inherited variables come from")
    variables: list[EnvVarOut] = Field(description="what a cell sees, by name; the runtime's own win")
    pending: dict[str, str | SecretRef] | None = Field(
        description="the runtime's own variables after its next boot, when a change waits for it; null otherwise"
    )


class LogEntryOut(BaseModel):
    at: datetime
    state: str | None
    event: str | None
    reason: str
    message: str
    details: dict[str, Any]


class VersionOut(BaseModel):
    ref: str
    number: int
    digest: str
    image_id: str
    parent: str | None
    parent_hidden: bool = Field(
        default=False, description="its parent is a version you may not see (parent is then null)"
    )
    message: str
    author: str
    size: int
    size_added: int
    created_at: datetime
    tags: list[str]
    save: dict[str, Any] | None = Field(
        default=None, description="what its save left out (caches, bytes per directory) and the secrets it allowed"
    )
    registry_digest: str | None = Field(
        default=None, description="the manifest digest the registry holds for it (null: never pushed)"
    )
    imported: dict[str, Any] | None = Field(
        default=None,
        description="where it was imported from: the envctl server (from), its ref there, the registry digest pulled",
    )


class EnvironmentOut(BaseModel):
    name: str
    team: str | None
    owner: str | None = Field(
        default=None,
        description="the user name of its owner, who (with admins) may add and delete versions; "
        "null: no owner (a base image), only admins may",
    )
    latest: str | None = Field(description="the version the latest tag points at")
    tags: dict[str, str]
    versions: list[VersionOut]


class MachineTypeOut(BaseModel):
    name: str
    cpus: float
    memory: int
    pids: int
    gpus: int
    gpu_kind: str = Field(description="what the GPUs are, e.g. nvidia-tesla-t4; empty without GPUs")
    idle_timeout: int | None
    description: str


class CudaOut(BaseModel):
    root: str = Field(description="the host folder searched for cuda-<version> folders")
    versions: list[str] = Field(description="the valid values of a runtime's cuda setting; empty: none here")
    mount: str = Field(description="where a GPU runtime sees the chosen version")


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    backend: str
    runner: str


class ExecutionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=1024 * 1024, description="the cell's source")
    language: Literal["python", "bash"] | None = Field(default=None, description="default: the runtime's language")
    timeout: float | None = Field(default=None, gt=0, le=7 * 24 * 3600, description="seconds; null for none")


class ExecutionOut(BaseModel):
    id: str
    runtime_id: str
    submitted_by: str | None = Field(
        default=None,
        description="the user name of who ran the cell: in a team runtime, any member of its team "
        "(a cell envctl runs itself, such as a build's: the user it runs for); "
        "null: that user no longer exists",
    )
    seq: int
    language: str
    code: str
    status: Literal["queued", "running", "ok", "error", "interrupted"]
    execution_count: int | None
    outputs: list[dict[str, Any]] = Field(description="Jupyter-shaped outputs; consecutive streams joined")
    output_bytes: int
    truncated: bool
    error_name: str | None
    error_value: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    mounts: list[dict[str, Any]] | None = Field(
        default=None, description="what the runtime's mounts held for this cell: the git commit, the volume"
    )


class ResultOut(BaseModel):
    id: int
    path: str = Field(description="relative to /results")
    sha256: str
    size: int
    runtime_id: str
    execution_id: str | None
    created_at: datetime
    content_url: str


class SaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: str = Field(min_length=1, max_length=130, description="[team/]name of the environment to save into")
    message: str = Field(default="", max_length=2000)
    tag: str | None = Field(default=None, max_length=128, description="a tag to point at the new version")
    keep_caches: bool = Field(
        default=False, description="keep package caches (apt lists and archives, pip, npm) in the new layer"
    )
    attached_save: bool = Field(
        default=False,
        description="a save of an attached runtime (a container envctl did not start) is refused unless asked for",
    )
    allow_secrets: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="absolute paths whose secret findings are accepted (recorded in the version)",
    )


class OperationOut(BaseModel):
    id: str
    kind: str
    runtime_id: str | None
    status: Literal["running", "succeeded", "failed"]
    phase: str
    message: str
    result: dict[str, Any]
    error: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None


class ChangeOut(BaseModel):
    kind: Literal["added", "changed", "deleted"]
    path: str
    size: int | None = Field(description="bytes, for regular files")
    cache: str | None = Field(
        default=None, description="the cache directory it lies in: a save leaves it out unless keep_caches"
    )


class LineageStep(BaseModel):
    """One version of a lineage; one the caller may not see is only ``{"hidden": true}`` (one
    step for several hidden ones in a row), its name, message and author left out."""

    hidden: bool = Field(default=False, description="a version the caller may not see: nothing else of it is shown")
    ref: str | None = None
    digest: str | None = None
    message: str | None = None
    author: str | None = None
    created_at: datetime | None = None
    size: int | None = None
    size_added: int | None = None
    source_runtime_id: str | None = None


class BuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: str = Field(max_length=1024 * 1024, description="the spec file's YAML text")
    source: str = Field(default="<spec>", max_length=255, description="its file name, for error messages")


class LoadedVersion(BaseModel):
    ref: str = Field(description="the version's reference here")
    exported_as: str = Field(description="its reference where it was exported")
    digest: str
    new: bool = Field(description="false when this envctl had it already")


class RunnerOut(BaseModel):
    name: str
    alive: bool
    heartbeat_at: datetime | None
    reason: str
    this_server: bool = Field(description="whether it is the runner of the server that answered")


class KernelspecOut(BaseModel):
    name: str = Field(description="what a notebook's metadata.kernelspec.name calls it, e.g. python3")
    display_name: str
    language: str
    path: str = Field(description="its directory inside the image")


class KernelspecsOut(BaseModel):
    ref: str = Field(description="the version the reference means")
    kernelspecs: list[KernelspecOut] = Field(description="by name; empty when the image has none")


# --- packages of an environment version (api/routes/packages.py) ---------------------------


class PackageOut(BaseModel):
    name: str
    version: str


class PackagesOut(BaseModel):
    ref: str = Field(description="the version the reference means")
    deb: list[PackageOut] = Field(description="installed Debian packages, by name")
    python: list[PackageOut] = Field(description="Python distributions in the image's site-packages, by name")


class PackageChangeOut(BaseModel):
    name: str
    old: str = Field(description="its version in the version compared against")
    new: str = Field(description="its version in the version asked about")


class PackagesKindDiffOut(BaseModel):
    added: list[PackageOut]
    removed: list[PackageOut]
    changed: list[PackageChangeOut]


class PackagesDiffOut(BaseModel):
    ref: str = Field(description="the version asked about (the new side)")
    against: str = Field(description="the version it is compared against (the old side)")
    deb: PackagesKindDiffOut
    python: PackagesKindDiffOut


RuntimeCreate.model_rebuild()
RuntimeCreatedOut.model_rebuild()
