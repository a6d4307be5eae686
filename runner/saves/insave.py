"""Saves made inside the runtime: the agent streams the layer, envctl writes the image into the registry.

The host path (``runner/backends/saves.py``) reads the engine's storage on the server's host; a
runtime on another node has no such host. Here instead (``ENVCTL_SAVE_PATH=runtime``, or a
backend whose ``saves_in_runtime`` is true):

1. The agent walks the runtime's filesystem against what the version held and streams the
   layer as tar frames (``runner/agent/layer.py``, the ``layer`` request on the agent channel).
2. envctl reads the stream once: every entry is checked (a relative name without ``..``, a
   known type, nothing under envctl's own paths or a mount, nothing in a cache the save leaves
   out), written again by envctl's own tar writer (the agent's headers are never passed on as
   bytes), run through the save's ``SaveFilter`` (secret values plain, base64 and URL-encoded,
   credential files; names and link targets), hashed (the sha256 of the tar is the layer's
   ``diff_id``) and streamed into the registry as it comes (``registry/uploads.py``), in chunks
   of a megabyte: memory stays bounded whatever the layer's size.
3. A finding the request did not allow cancels the upload before any manifest is written:
   nothing is made (R15), and the error names each path, never the value (R35).
4. Otherwise the configuration is the parent's (read from the registry) with the trusted
   template (``envs.images.config.child_config``), one more ``diff_id`` and ``history`` entry;
   the parent's layers are linked by a cross-repository mount (or found there), and the
   manifest goes last. The version's image id is the configuration's digest, what the engine
   that pulls it calls it, so a boot anywhere pulls it by the recorded manifest digest (R24).

The layer is sent uncompressed (``application/vnd.oci.image.layer.v1.tar``, its blob digest is
its ``diff_id``): envctl and the registry are on one network, where gzip in Python costs more
time than the bytes it saves (the benchmark in ``tests/bench/bench_insave.py`` prints both).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import posixpath
import struct
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from envs import service as envs_service
from envs.images import oci
from envs.images.config import child_config
from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from envs.models import EnvironmentVersion
from registry import drafts as registry_drafts
from registry import uploads
from registry.errors import TransferError
from runner.backends.base import PRIVATE_PATHS, RuntimeBackend
from runner.channel import AgentChannel, AgentUnavailableError
from runner.errors import LayerStreamError
from runner.models import Runtime
from runner.runtimes.store import Records
from runner.saves.imageconfig import CONTAINER_LABELS_CLEARED
from runner.saves.scans import CacheRules, SaveFilter
from runner.settings import Settings

log = logging.getLogger("envctl.insave")

FRAME = struct.Struct(">I")
CHUNK = 1 << 20
BLOCK = 512
MAX_FRAME = 64 << 20
_TYPES = {
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.DIRTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
}
PATHS = ("host", "runtime")


def chosen(settings: Settings, backend: RuntimeBackend) -> bool:
    """Whether saves of this installation are made inside the runtime."""
    return bool(getattr(backend, "saves_in_runtime", False)) or settings.save_path == "runtime"


# ------------------------------------------------------------------------------ the stream
class FrameReader(io.RawIOBase):
    """The bytes of the agent's frames (a length, then that many bytes; 0 ends them)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.left = 0
        self.done = False
        self.received = 0

    def readable(self) -> bool:
        return True

    def _exact(self, n: int) -> bytes:
        data = self.reader.read(n)
        if len(data) != n:
            raise AgentUnavailableError("the agent's layer stream broke off")
        return bytes(data)

    def readinto(self, buffer: Any) -> int:
        if self.done:
            return 0
        if self.left == 0:
            (n,) = FRAME.unpack(self._exact(4))
            if n == 0:
                self.done = True
                return 0
            if n > MAX_FRAME:
                raise LayerStreamError(f"the agent sent a frame of {n} bytes (at most {MAX_FRAME})")
            self.left = n
        view = memoryview(buffer)[: min(len(buffer), self.left)]
        got = self.reader.readinto(view)
        if not got:
            raise AgentUnavailableError("the agent's layer stream broke off")
        self.left -= got
        self.received += got
        return int(got)

    def drain(self) -> None:
        while self.readinto(bytearray(CHUNK)):
            pass


@dataclass
class Checked:
    """What the layer held, as envctl wrote it."""

    diff_id: str = ""
    blob_digest: str = ""
    tar_bytes: int = 0
    blob_bytes: int = 0
    entries: int = 0
    whiteouts: int = 0
    paths: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)  # a draft's record: path, kind, size


def _private(path: str, private: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in private)


def _checked_name(name: str) -> str:
    raw = name.rstrip("/")
    if not raw or raw.startswith("/") or "\0" in raw:
        raise LayerStreamError(f"the layer names an entry {name[:200]!r}: not a relative path")
    if any(part in ("..", ".", "") for part in raw.split("/")):
        raise LayerStreamError(f"the layer names an entry {name[:200]!r}: '..', '.' or '//' in it")
    return raw


def rewrite(
    source: Any, observer: SaveFilter, checked: Checked, *, private: Sequence[str], gzip_level: int | None = None
) -> Iterator[bytes]:
    """The layer as envctl writes it, from the agent's tar ``source``: checked entry by entry,
    every entry and file through ``observer``, hashed into ``checked`` as it goes."""
    tar_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
    squeeze = zlib.compressobj(gzip_level, zlib.DEFLATED, 31) if gzip_level is not None else None

    def out(data: bytes) -> bytes:
        tar_hash.update(data)
        checked.tar_bytes += len(data)
        if squeeze is not None:
            data = squeeze.compress(data)
        blob_hash.update(data)
        checked.blob_bytes += len(data)
        return data

    with tarfile.open(fileobj=io.BufferedReader(source, CHUNK), mode="r|", errorlevel=2) as tar:
        for member in tar:
            name = _checked_name(member.name)
            if member.type not in _TYPES:
                raise LayerStreamError(f"the layer's entry {name[:200]!r} is of a type layers never hold")
            path = "/" + name
            base = posixpath.basename(name)
            if _private(path, private):
                raise LayerStreamError(f"the layer holds {path[:200]!r}, one of envctl's own paths or a mount")
            if member.islnk():
                _checked_name(member.linkname)
            whiteout = base.startswith(".wh.")
            if whiteout:
                checked.whiteouts += 1
            elif not member.isdir() and observer.cache_of(path) is not None:
                raise LayerStreamError(f"the layer holds {path[:200]!r}, in a cache the save leaves out")
            if not whiteout:
                observer.entry(path, member.linkname or None)
            member.name = name + ("/" if member.isdir() else "")
            if member.type == tarfile.AREGTYPE:
                member.type = tarfile.REGTYPE
            member.uname = member.gname = ""
            data = member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            checked.entries += 1
            if len(checked.paths) < 100000:
                checked.paths.append(path)
                if whiteout and base != ".wh..wh..opq":
                    gone = posixpath.join(posixpath.dirname(path), base[4:])
                    checked.changes.append({"kind": "deleted", "path": gone, "size": None})
                elif not whiteout:
                    kind = "directory" if member.isdir() else "changed"
                    size = member.size if member.isreg() else None
                    checked.changes.append({"kind": kind, "path": path, "size": size})
            if not member.isreg():
                yield out(data)
                continue
            handle = tar.extractfile(member)
            sink = observer.content(path, member.size) if handle is not None else None
            yield out(data)
            left = member.size
            while left > 0 and handle is not None:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    raise AgentUnavailableError("the agent's layer stream broke off inside a file")
                left -= len(chunk)
                if sink is not None:
                    sink(chunk)
                yield out(chunk)
            if sink is not None:
                sink(b"")
            if member.size % BLOCK:
                yield out(b"\0" * (BLOCK - member.size % BLOCK))
    source.drain()
    tail = out(b"\0" * (2 * BLOCK))
    if squeeze is not None:
        rest = squeeze.flush()
        blob_hash.update(rest)
        checked.blob_bytes += len(rest)
        tail += rest
    yield tail
    checked.diff_id = "sha256:" + tar_hash.hexdigest()
    checked.blob_digest = "sha256:" + blob_hash.hexdigest()


# ------------------------------------------------------------------------------ the save
@dataclass(frozen=True)
class Parent:
    id: int
    ref: str
    environment: str
    registry_digest: str | None
    size: int


@dataclass(frozen=True)
class MadeImage:
    repository: str  # in the registry
    tag: str
    manifest_digest: str
    config_digest: str
    layer: Checked
    left_out: dict[str, dict[str, int]]
    walk: dict[str, Any]
    layers: int


class InRuntimeSaves:
    """Makes a save's image from the runtime's own stream, straight into the registry."""

    def __init__(
        self,
        settings: Settings,
        records: Records,
        backend: RuntimeBackend,
        agent: Callable[[str], Any],
        *,
        ensure_pushed: Callable[[str, int], str] | None = None,
    ) -> None:
        self.settings = settings
        self.records = records
        self.backend = backend
        self.agent = agent  # runtime id -> the agent channel's target
        self.caches = CacheRules.of(settings.save_caches)
        self.ensure_pushed = ensure_pushed  # (user id, version id) -> manifest digest, for a parent not pushed yet

    @property
    def enabled(self) -> bool:
        return chosen(self.settings, self.backend)

    def parent_digest(self, user_id: str, parent: Parent) -> str:
        if parent.registry_digest:
            return parent.registry_digest
        if self.ensure_pushed is None:
            raise ConflictError(
                f"the version {parent.ref} is not in the registry: a save made inside the runtime builds on it "
                f"there (push it first: `envctl push {parent.ref}`)",
                details={"version": parent.ref},
            )
        return self.ensure_pushed(user_id, parent.id)

    def make(
        self,
        runtime_id: str,
        user_id: str,
        *,
        repository: str,
        tag: str | None,
        parent: Parent,
        labels: dict[str, str],
        observer: SaveFilter,
        keep_caches: bool,
        forced: Sequence[str] = (),
        save_token: str,
        gzip_level: int | None = None,
        annotations: dict[str, str] | None = None,
    ) -> MadeImage:
        """Stream the runtime's layer into ``repository`` and write its image; nothing is left
        in the registry when the stream fails or the scan refuses it (no manifest). ``tag``
        None: the hex of the configuration's digest (a draft's, ``registry/drafts.py``)."""
        parent_digest = self.parent_digest(user_id, parent)
        url = uploads.registry_url(self.settings)
        access: dict[str, tuple[str, ...]] = {repository: ("pull", "push", "delete")}  # delete: cancel an upload
        if parent.environment != repository:
            access[parent.environment] = ("pull",)
        token = uploads.own_token(self.settings, access, subject=f"envctl save of {runtime_id}")
        private = [*PRIVATE_PATHS, *self._mount_targets(runtime_id)]
        with uploads.RegistryWriter(url, token) as registry:
            parent_manifest, _kind = registry.manifest(parent.environment, parent_digest)
            parent_layers = oci.layers_of(parent_manifest)
            check_depth(parent.ref, len(parent_layers), self.settings.save_compact_at_layers)
            parent_config = _json(registry.blob(parent.environment, str(parent_manifest["config"]["digest"])))
            for layer in parent_layers:
                there = parent.environment == repository or registry.has_blob(repository, layer.digest)
                if not there and not registry.mount(repository, layer.digest, parent.environment):
                    raise TransferError(
                        f"the registry would not link the layer {layer.digest[:19]} of {parent.ref} into {repository}",
                        details={"layer": layer.digest},
                    )
            checked = Checked()
            request = {
                "save": save_token,
                "exclude": private,
                "caches": [] if keep_caches else [list(p) for p in self.caches.patterns],
                "forced": list(forced),
            }
            upload = registry.start(repository)
            kept = False
            try:
                with AgentChannel(self.agent(runtime_id), timeout=30) as channel:
                    _header, reader = channel.open_stream("layer", **request)
                    frames = FrameReader(reader)
                    registry.send(upload, rewrite(frames, observer, checked, private=private, gzip_level=gzip_level))
                    trailer = _json(reader.readline() or b"{}")
                if not trailer.get("ok"):
                    raise LayerStreamError(
                        f"the agent could not make the layer: {trailer.get('error') or 'no end to its stream'}",
                        details={"agent": {k: v for k, v in trailer.items() if k != "id"}},
                    )
                observer.verdict()  # a secret: raises, the upload is cancelled below
                registry.finish(upload, checked.blob_digest)
                kept = True
            finally:
                if not kept:
                    registry.cancel(upload)
            created = labels.get("org.opencontainers.image.created") or time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()
            )
            trusted = child_config(parent_config.get("config") or {}, {**CONTAINER_LABELS_CLEARED, **labels})
            config = oci.child_config(
                parent_config,
                trusted,
                checked.diff_id,
                created=created,
                created_by=f"envctl save inside the runtime ({checked.entries} entries)",
            )
            config_digest = oci.digest_of(config)
            registry.put_blob(repository, config_digest, config)
            kind = oci.LAYER_GZIP if gzip_level is not None else oci.LAYER_TAR
            layers = [*parent_layers, oci.Descriptor(kind, checked.blob_digest, checked.blob_bytes)]
            manifest = oci.manifest(
                config,
                layers,
                {
                    "org.opencontainers.image.base.digest": parent_digest,
                    "org.opencontainers.image.base.name": parent.ref,
                    "org.opencontainers.image.created": created,
                    **(annotations or {}),
                },
            )
            if tag is None:
                tag = config_digest.split(":", 1)[1]
            digest = registry.put_manifest(repository, tag, manifest, oci.MANIFEST)
            if digest and digest != oci.digest_of(manifest):
                raise TransferError(f"the registry recorded the manifest as {digest}, not {oci.digest_of(manifest)}")
        walk = {k: trailer.get(k) for k in ("walk_seconds", "index_seconds", "index_dirs", "whiteouts", "tar_bytes")}
        return MadeImage(
            repository,
            tag,
            oci.digest_of(manifest),
            config_digest,
            checked,
            dict(trailer.get("left_out") or {}),
            walk,
            len(layers),
        )

    def keep(self, runtime_id: str, save_token: str) -> None:
        """The version was recorded: the agent's next saves judge against it."""
        with (
            contextlib.suppress(AgentUnavailableError, BackendError),
            AgentChannel(self.agent(runtime_id), timeout=10) as channel,
        ):
            channel.request("layer", action="keep", save=save_token)

    def _mount_targets(self, runtime_id: str) -> list[str]:
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            mounts = list(getattr(rt, "mounts", None) or []) if rt is not None else []
        out = []
        for m in mounts:
            target = m.get("target") if isinstance(m, dict) else None
            if isinstance(target, str) and target.startswith("/"):
                out.append(target)
        return out


def _json(data: bytes) -> dict[str, Any]:
    import json

    try:
        value = json.loads(data)
    except ValueError as exc:
        raise LayerStreamError(f"not JSON: {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise LayerStreamError("not a JSON object")
    return value


def register(
    records: Records,
    writer: envs_service.Writer,
    *,
    runtime_id: str,
    environment: str,
    made: MadeImage,
    parent: Parent,
    message: str,
    author: str,
    labels: dict[str, Any],
    tag: str | None,
    baseline: dict[str, Any],
) -> EnvironmentVersion:
    """Record the version the registry now holds; the runtime moves onto it."""
    with records.db.session() as s:
        version, _created = envs_service.register_version(
            s,
            envs_service.NewVersion(
                environment=environment,
                image_id=made.config_digest,
                image_ref=f"envctl/{environment}:{made.tag}",
                parent=s.get(EnvironmentVersion, parent.id),
                message=message,
                author=author,
                size=parent.size + made.layer.tar_bytes,
                size_added=made.layer.tar_bytes,
                source_runtime_id=runtime_id,
                labels=labels,
                tag="latest",
            ),
            writer,
        )
        envs_service.record_pushed(s, version, made.manifest_digest)
        if tag and tag != "latest":
            envs_service.set_tag(s, version.environment, tag, version)
        records.stand_on(s, runtime_id, version, baseline)
        _ = version.ref
        _ = version.environment.full_name
    return version


def check_depth(ref: str, layers: int, compact_at: int) -> None:
    """A save made inside the runtime adds one layer and never squashes: past the point where
    the host path compacts (``ENVCTL_SAVE_COMPACT_AT_LAYERS``) it is refused, clearly, before
    anything is sent (the engine's storage stops at 128 layers)."""
    if layers + 1 > compact_at:
        raise ConflictError(
            f"the version {ref} has {layers} layers, and a save made inside the runtime adds one without "
            f"compacting (at most {compact_at}, ENVCTL_SAVE_COMPACT_AT_LAYERS): save it once on the host path "
            "(ENVCTL_SAVE_PATH=host), which squashes the chain, then save here again",
            details={"version": ref, "layers": layers, "compact_at_layers": compact_at},
        )


def check_path(value: str) -> str:
    if value not in PATHS:
        raise InvalidInputError(f"ENVCTL_SAVE_PATH: {value!r} is not one of {', '.join(PATHS)}")
    return value


def save_in_runtime(
    saves: InRuntimeSaves,
    operations: Any,
    op_id: str,
    runtime_id: str,
    environment: str,
    number: int,
    parent_id: int,
    labels: dict[str, str],
    *,
    writer: Callable[[Any], envs_service.Writer],
    user_id: str,
    message: str,
    author: str,
    tag: str | None,
    keep_caches: bool,
    observer: SaveFilter,
    report_key: str,
) -> EnvironmentVersion:
    """A save (``Snapshots.save_now``) made inside the runtime: the layer streamed into the
    registry, the version recorded, the runtime moved onto it."""
    with saves.records.db.session() as s:
        v = s.get(EnvironmentVersion, parent_id)
        rt = s.get(Runtime, runtime_id)
        if v is None or rt is None:
            raise ConflictError("the runtime or its version is gone")
        parent = Parent(v.id, v.ref, v.environment.full_name, v.registry_digest, int(v.size or 0))
        forced = [str(c.get("path")) for c in (rt.draft_changes or []) if isinstance(c, dict) and c.get("path")]
        old_draft = rt.draft_image_id
    operations.phase(op_id, "uploading", "streaming the runtime's changes into the registry")
    baseline = {"saved_at_ns": time.time_ns()}
    token = f"{op_id}-{number}"
    made = saves.make(
        runtime_id,
        user_id,
        repository=environment,
        tag=str(number),
        parent=parent,
        labels=labels,
        observer=observer,
        keep_caches=keep_caches,
        forced=forced,
        save_token=token,
    )
    left = made.left_out
    report = {
        "caches_kept": keep_caches,
        "left_out": left,
        "left_out_bytes": sum(int(c.get("bytes") or 0) for c in left.values()),
        "allowed_secrets": observer.allowed(),
        "path": "runtime",
        "layer": {
            "diff_id": made.layer.diff_id,
            "bytes": made.layer.tar_bytes,
            "entries": made.layer.entries,
            "whiteouts": made.layer.whiteouts,
            **made.walk,
        },
    }
    operations.phase(op_id, "recording", "recording the new version")
    with saves.records.db.session() as s:
        who = writer(s)
    version = register(
        saves.records,
        who,
        runtime_id=runtime_id,
        environment=environment,
        made=made,
        parent=parent,
        message=message,
        author=author,
        labels={**labels, report_key: report},
        tag=tag,
        baseline=baseline,
    )
    saves.keep(runtime_id, token)
    if old_draft:  # its changes are in the version now: the draft's manifest goes
        registry_drafts.forget(saves.settings, runtime_id, old_draft)
    return version
