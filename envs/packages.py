"""The packages installed in an environment version, and the difference between two versions.

Two kinds are known:

- **deb**: Debian packages, from ``/var/lib/dpkg/status`` (those whose ``Status`` is
  ``install ok installed``; removed and half-installed ones are left out).
- **python**: Python distributions, from ``*.dist-info/METADATA`` (and the older
  ``*.egg-info/PKG-INFO`` or ``*.egg-info`` file, which Debian's ``python3-*`` packages still
  ship) directly under the site-packages and dist-packages directories of ``PYTHON_DIRS``.

The files are read from the image without running it: a container is created from it, never
started, labelled with the caller's labels, read with ``get_archive`` (streamed: only the
metadata members are kept) and always removed. Image ids name immutable content, so what was
read is kept per image id in this process and, by :func:`version_packages`, in the version's
``labels`` under ``packages``: each version is read once.
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import docker
import docker.errors

from envs import service as envs_service
from envs.images.docker import daemon_error, engine_call, remove_container
from envs.images.rewrite import ChunkReader
from envs.kit.db import Database
from envs.kit.errors import BackendError, ConflictError
from envs.refs import parse_ref

KINDS = ("deb", "python")
LABELS_KEY = "packages"  # where a version's packages are kept in its labels

DPKG_STATUS = "/var/lib/dpkg/status"
DPKG_STATUS_MAX = 32 * 1024 * 1024  # bytes of dpkg's status file read
METADATA_MAX = 64 * 1024  # bytes of one METADATA file read (its headers come first)
PACKAGES_MAX = 20_000  # packages of one kind kept for a version; an image's text is not trusted
NAME_MAX, VERSION_MAX = 200, 100  # characters of a package's name and version kept
_MINORS = range(6, 16)
#: The directories Python distributions are looked for in: the system's, pip's (Debian puts
#: what ``pip install`` adds as root in /usr/local/lib/python3.X/dist-packages) and a venv at
#: a known place.
PYTHON_DIRS: tuple[str, ...] = (
    "/usr/lib/python3/dist-packages",
    *(f"/usr/lib/python3.{m}/site-packages" for m in _MINORS),
    *(f"/usr/local/lib/python3.{m}/{kind}" for m in _MINORS for kind in ("dist-packages", "site-packages")),
    *(f"{venv}/lib/python3.{m}/site-packages" for venv in ("/opt/venv", "/venv") for m in _MINORS),
)


def python_dirs(deb: Iterable[Package]) -> list[str]:
    """PYTHON_DIRS, narrowed to the Python versions Debian installed (``python3.11``) when it
    installed any: each directory looked for costs a request to the engine."""
    minors = {m.group(1) for p in deb if (m := re.fullmatch(r"python3\.(\d+)", p.name))}
    if not minors:
        return list(PYTHON_DIRS)
    return [d for d in PYTHON_DIRS if (m := re.search(r"python3\.(\d+)", d)) is None or m.group(1) in minors]


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str

    @classmethod
    def of(cls, name: str, version: str) -> Package:
        """A package named in an image's files: cut to NAME_MAX and VERSION_MAX characters."""
        return cls(name[:NAME_MAX], version[:VERSION_MAX])


@dataclass(frozen=True)
class Packages:
    deb: list[Package]
    python: list[Package]

    def to_json(self) -> dict[str, list[dict[str, str]]]:
        return {kind: [{"name": p.name, "version": p.version} for p in getattr(self, kind)] for kind in KINDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Packages:
        return cls(
            **{kind: [Package(str(p["name"]), str(p["version"])) for p in data.get(kind) or []] for kind in KINDS}
        )


# ------------------------------------------------------------------------------------ parsing


def _paragraphs(text: str) -> Iterator[dict[str, str]]:
    """The paragraphs of a deb822 text (dpkg's status) as field → value; a continuation line
    (starting with a space or a tab) belongs to the field above it."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t":
            if last:
                fields[last] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last = key.strip().lower()
            fields[last] = value.strip()
    if fields:
        yield fields


def parse_dpkg_status(text: str) -> list[Package]:
    """The installed packages in the text of ``/var/lib/dpkg/status``, sorted by name.

    Only ``install ok installed`` ones count; one without a name or a version is left out. A
    package installed for two architectures is named ``name:arch`` for each.
    """
    found: list[tuple[str, str, str]] = []
    for fields in _paragraphs(text):
        name, version = fields.get("package", ""), fields.get("version", "")
        if fields.get("status", "").split() != ["install", "ok", "installed"] or not name or not version:
            continue
        found.append((name, fields.get("architecture", ""), version))
    names = [name for name, _, _ in found]
    counts = Counter(names)
    return sorted(
        Package.of(f"{name}:{arch}" if counts[name] > 1 and arch else name, version)
        for name, arch, version in found[:PACKAGES_MAX]
    )


def parse_metadata(text: str) -> Package | None:
    """The name and version in a distribution's METADATA (or PKG-INFO) text; None without
    either. Only the headers are read (they end at the first blank line)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and line[0] not in " \t":
            fields.setdefault(key.strip().lower(), value.strip())
    name, version = fields.get("name", ""), fields.get("version", "")
    return Package.of(name, version) if name and version else None


def normalized(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): ``Jupyter_Core`` is ``jupyter-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata_member(name: str) -> bool:
    """Whether a member of a site-packages archive (``dist-packages/x/y``) holds a distribution's
    metadata: ``*.dist-info/METADATA``, ``*.egg-info/PKG-INFO``, or an ``*.egg-info`` file."""
    parts = name.split("/")[1:]  # the first part is the directory itself
    if len(parts) == 1:
        return parts[0].endswith(".egg-info")
    return len(parts) == 2 and (
        (parts[0].endswith(".dist-info") and parts[1] == "METADATA")
        or (parts[0].endswith(".egg-info") and parts[1] == "PKG-INFO")
    )


def python_packages_in(tar_stream: IO[bytes]) -> list[Package]:
    """The distributions in the tar stream of one site-packages directory (read once, in order;
    only metadata members are kept, at most METADATA_MAX bytes of each)."""
    found: list[Package] = []
    try:
        with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
            for member in tar:
                if not member.isreg() or not _metadata_member(member.name):
                    continue
                handle = tar.extractfile(member)
                package = parse_metadata(handle.read(METADATA_MAX).decode("utf-8", "replace") if handle else "")
                if package is not None:
                    found.append(package)
                if len(found) >= PACKAGES_MAX:
                    break
    except (tarfile.TarError, EOFError, OSError):
        pass  # a cut-off archive: what was read stands
    return found


def _first_file(tar_stream: IO[bytes], limit: int) -> bytes:
    with contextlib.suppress(tarfile.TarError, EOFError, OSError), tarfile.open(fileobj=tar_stream, mode="r|") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isreg() else None
            if handle is not None:
                return handle.read(limit)
    return b""


# ------------------------------------------------------------------------------------- reading


_cache: dict[str, Packages] = {}
_cache_lock = threading.Lock()
_reading: dict[str, threading.Lock] = {}  # image id -> held while one thread reads it
_CACHE_SIZE = 256


def _archive(client: docker.DockerClient, holder: str, path: str) -> tuple[Any, IO[bytes]] | None:
    """The tar stream of ``path`` in the container (a directory's path ends in ``/``, which
    follows it when it is a symlink), or None when there is no such path."""
    try:
        chunks, _stat = client.api.get_archive(holder, path)
    except docker.errors.NotFound:
        return None
    return chunks, io.BufferedReader(ChunkReader(chunks), 1024 * 1024)


def read_image(client: docker.DockerClient, image: str, labels: Mapping[str, str]) -> Packages:
    """The packages installed in ``image`` (an image id), read without running it, once per
    image in this process (a second caller for the same image waits for the first).

    The helper container carries ``labels`` and is removed however this ends. An image the
    engine does not have raises ``BackendError``, as does any engine failure.
    """
    with _cache_lock:
        cached = _cache.get(image)
        if cached is not None:
            return cached
        reading = _reading.setdefault(image, threading.Lock())
    with reading:
        with _cache_lock:
            cached = _cache.get(image)
        if cached is not None:
            return cached
        packages = _read(client, image, labels)
        with _cache_lock:
            while len(_cache) >= _CACHE_SIZE:
                _cache.pop(next(iter(_cache)))
            _cache[image] = packages
            _reading.pop(image, None)
    return packages


def _read(client: docker.DockerClient, image: str, labels: Mapping[str, str]) -> Packages:
    action = "read the image's packages"
    try:
        holder = str(
            client.api.create_container(image, command=["true"], labels=dict(labels), network_disabled=True)["Id"]
        )
    except docker.errors.ImageNotFound as exc:
        raise BackendError(f"image {image[:30]} is not in the Docker engine", details={"image": image}) from exc
    except Exception as exc:
        raise daemon_error(action, exc) from exc
    try:
        with engine_call(action):
            deb: list[Package] = []
            opened = _archive(client, holder, DPKG_STATUS)
            if opened is not None:
                with contextlib.closing(opened[0]):
                    deb = parse_dpkg_status(_first_file(opened[1], DPKG_STATUS_MAX).decode("utf-8", "replace"))
            python: dict[str, Package] = {}
            for directory in python_dirs(deb):
                opened = _archive(client, holder, directory + "/")
                if opened is None:
                    continue
                with contextlib.closing(opened[0]):
                    for package in python_packages_in(opened[1]):
                        python.setdefault(normalized(package.name), package)  # the first directory wins
    finally:
        with contextlib.suppress(BackendError):
            remove_container(client, holder, "remove the container that read an image's packages")
    return Packages(deb=deb, python=sorted(python.values(), key=lambda p: normalized(p.name))[:PACKAGES_MAX])


# A reader of an image's packages by image id, given by the caller (it knows the engine and the
# labels its helper containers carry); None: this server cannot look inside images.
ImageReader = Callable[[str], Packages]


@dataclass(frozen=True)
class VersionPackages:
    ref: str  # the exact version, e.g. python3@1
    packages: Packages


def kept_packages(labels: Mapping[str, Any] | None) -> Packages | None:
    """The packages kept in a version's labels, or None when they are not known yet (for a
    catalog that shows packages "when known" without reading any image)."""
    kept = (labels or {}).get(LABELS_KEY)
    return Packages.from_json(kept) if isinstance(kept, dict) else None


def version_packages(db: Database, ref: str, reader: ImageReader | None, field: str = "ref") -> VersionPackages:
    """The packages of the version ``ref`` means: kept in its labels once read, else read from
    its image with ``reader`` and kept. A bad reference is a 422, an unknown one a 404; a version
    whose packages are not known and cannot be read (no image, no engine) is a 409 saying why."""
    parsed = parse_ref(ref, field)
    with db.session() as s:
        version = envs_service.resolve(s, parsed, field)
        version_ref, image, kept = version.ref, version.image_id, kept_packages(version.labels)
    if kept is not None:
        return VersionPackages(version_ref, kept)
    if reader is None:
        raise ConflictError(
            f"{field}: the packages of {version_ref} are not known, and this server's runtime backend "
            "cannot look inside images",
            details={"field": field, "reference": version_ref},
        )
    try:
        packages = reader(image)
    except BackendError as exc:
        raise ConflictError(
            f"{field}: the packages of {version_ref} cannot be read: {exc.message}",
            details={"field": field, "reference": version_ref, "image": image},
        ) from exc
    with db.session() as s:
        version = envs_service.resolve(s, parsed, field)
        if version.image_id == image:
            envs_service.record_labels(s, version, {LABELS_KEY: packages.to_json()})
    return VersionPackages(version_ref, packages)


# ---------------------------------------------------------------------------------- difference


@dataclass(frozen=True)
class Change:
    name: str
    old: str
    new: str


@dataclass(frozen=True)
class KindDiff:
    added: list[Package]
    removed: list[Package]
    changed: list[Change]


def diff_kind(old: Iterable[Package], new: Iterable[Package], key: Callable[[str], str] = str) -> KindDiff:
    """What ``new`` adds, removes and changes (another version) against ``old``, by name."""
    before = {key(p.name): p for p in old}
    after = {key(p.name): p for p in new}
    return KindDiff(
        added=sorted(after[k] for k in after.keys() - before.keys()),
        removed=sorted(before[k] for k in before.keys() - after.keys()),
        changed=sorted(
            (
                Change(after[k].name, before[k].version, after[k].version)
                for k in after.keys() & before.keys()
                if before[k].version != after[k].version
            ),
            key=lambda c: c.name,
        ),
    )


def diff(old: Packages, new: Packages) -> dict[str, KindDiff]:
    """The difference from ``old`` to ``new`` for each kind (Python names compared as pip does)."""
    return {"deb": diff_kind(old.deb, new.deb), "python": diff_kind(old.python, new.python, normalized)}
