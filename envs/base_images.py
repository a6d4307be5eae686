"""Base images: the roots of every environment's lineage, built from scratch and described as data.

``base-images/hierarchy.yaml`` maps each image name to its parent (``null`` for a root). Each
image has a folder ``base-images/<name>/`` holding:

- ``recipe.yaml``: for a root, a ``debootstrap`` section (suite, variant, components, include)
  and optional ``cleanup`` globs removed from the root filesystem before import; for a child, a
  list of shell ``steps`` run in a container started from the parent. Either may carry
  ``config`` (``env`` mapping, ``cmd`` list) merged over :data:`BASE_CONFIG` and inherited by
  children.
- ``verify`` (optional): a script run inside the built image, and inside every image built on
  it (jupyter/docker-stacks style); a non-zero exit fails the build and removes the image.
- ``README.md``: for people; it is not part of the recipe digest.

A root is made with ``debootstrap`` into a temporary directory and streamed as a tar into
``docker import`` (one layer). A child runs its steps with ``docker exec`` in a build container
and is committed as one more layer on top of its parent's, with an image configuration taken
from the template, never from the build container. Every image is labelled
``envctl.base-image``, ``envctl.recipe-digest`` and ``envctl.parent-image`` and tagged
``envctl-base/<name>:<12 hex of the digest>``; an image already carrying the same recipe digest
is reused instead of rebuilt. The digest covers the recipe files, the parent's digest, the
mirror and the suite, so a rebuilt parent rebuilds its children.

A root image also trusts the build machine's extra CA certificates (setting
``base.extra_ca_certs``, by default ``/usr/local/share/ca-certificates/*.crt``, e.g. a
TLS-intercepting proxy's): they are copied to ``/usr/local/share/ca-certificates/envctl/`` in
the root filesystem and ``update-ca-certificates`` runs there before import, so pip, curl and
apt in every image trust them. Their names and contents are part of the root's digest; with no
extra certificates the digest is what it was before the setting existed.

Nothing here pulls an image. Builds of one recipe digest are serialized between processes on
this machine by a lock file in the temp directory (a second builder waits, then reuses).
Among several images with one digest, reuse picks the newest; a child is reused only when its
layers continue its parent's current image.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import yaml

from envs.kit.config import DEFAULT_EXTRA_CA_CERTS, load_settings
from envs.kit.errors import BackendError, InvalidInputError

LABEL_IMAGE = "envctl.base-image"
LABEL_DIGEST = "envctl.recipe-digest"
LABEL_PARENT = "envctl.parent-image"
LABEL_BUILD = "envctl.build"
REPOSITORY_PREFIX = "envctl-base/"
HIERARCHY_FILE = "hierarchy.yaml"
RECIPE_FILE = "recipe.yaml"
VERIFY_FILE = "verify"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
RECIPES_DIR_ENV = "ENVCTL_BASE_IMAGES_DIR"
#: Where a root image keeps the build machine's extra CA certificates (relative to its root).
CA_CERTS_DIR = "usr/local/share/ca-certificates/envctl"

#: The trusted image configuration every base image starts from; recipes add to ``env`` and
#: may replace ``cmd``. Nothing else of a build container's configuration reaches an image.
BASE_CONFIG: Mapping[str, Any] = {
    "env": {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    },
    "cmd": ["/bin/bash"],
    "workdir": "/root",
}

_DIGEST_VERSION = b"envctl-base-image/1"
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_SUITE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUE_RE = re.compile(r'^[^"\\$`\x00-\x1f\x7f]*$')
_ROOT_KEYS = {"debootstrap", "cleanup", "config"}
_CHILD_KEYS = {"steps", "config"}
_DEBOOTSTRAP_KEYS = {"suite", "variant", "components", "include"}
_STEP_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}
_TAIL_LINES = 30
_EMIT_INTERVAL = 0.5  # seconds between streamed output events
_VERIFY_TIMEOUT = 600  # seconds
_CA_TIMEOUT = 300  # seconds for update-ca-certificates
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----([^-]*)-----END CERTIFICATE-----")
_CA_NAME_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ExtraCACert:
    """A CA certificate of the build machine, added to the root image."""

    name: str  # file name in the image, under /usr/local/share/ca-certificates/envctl/
    source: Path
    pem: bytes  # its certificate blocks only, re-encoded as plain PEM


@dataclass(frozen=True)
class Recipe:
    name: str
    parent: str | None
    directory: Path
    digest: str  # "sha256:..." over recipe files, parent digest, mirror, suite (and a root's CAs)
    extra_ca_certs: tuple[ExtraCACert, ...] = field(default=(), repr=False)  # roots only


@dataclass(frozen=True)
class BuildEvent:
    image: str
    # "reuse" | "debootstrap" | "certificates" | "import" | "step" | "commit" | "verify" | "done"
    phase: str
    message: str


@dataclass(frozen=True)
class BuiltImage:
    name: str
    parent: str | None
    image_id: str
    recipe_digest: str
    size: int
    reused: bool


@dataclass(frozen=True)
class _Spec:
    """A parsed, validated recipe.yaml."""

    suite: str | None = None
    variant: str | None = None
    components: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    cleanup: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] | None = None


Progress = Callable[[BuildEvent], None]


# --------------------------------------------------------------------------------- locations


def default_recipes_dir() -> Path:
    """``$ENVCTL_BASE_IMAGES_DIR`` if set, else ``base-images/`` at the repository root."""
    override = os.environ.get(RECIPES_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "base-images"


def default_mirror() -> str:
    """The machine's Debian mirror from its apt configuration, else deb.debian.org.

    Only a Debian machine's configuration counts (``/etc/os-release`` ``ID=debian``). Among the
    enabled ``deb`` sources with an http(s) URI and a release suite (no ``-updates``,
    ``-security``, ...), one whose suite is the machine's codename wins, then one whose URI
    ends in ``/debian``, then the first.
    """
    return _mirror_from_apt_config(Path("/etc"))


def _mirror_from_apt_config(etc: Path) -> str:
    release = _os_release(etc / "os-release")
    if release.get("ID") != "debian":
        return FALLBACK_MIRROR
    candidates: list[tuple[str, list[str]]] = []
    apt = etc / "apt"
    files = [apt / "sources.list"]
    with contextlib.suppress(OSError):
        files += sorted(p for p in (apt / "sources.list.d").iterdir() if p.suffix in {".list", ".sources"})
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parse = _deb822_sources if path.suffix == ".sources" else _one_line_sources
        candidates += parse(text)
    usable = [
        (uri.rstrip("/"), [s for s in suites if "-" not in s and "/" not in s])
        for uri, suites in candidates
        if urllib.parse.urlsplit(uri).scheme in {"http", "https"}
    ]
    usable = [(uri, suites) for uri, suites in usable if suites]
    codename = release.get("VERSION_CODENAME")
    for uri, suites in usable:
        if codename and codename in suites:
            return uri
    for uri, _ in usable:
        if uri.endswith("/debian"):
            return uri
    return usable[0][0] if usable else FALLBACK_MIRROR


def _os_release(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    return values


def _deb822_sources(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in {" ", "\t"} and last:
                fields[last] += " " + line.strip()
                continue
            key, sep, value = line.partition(":")
            if sep:
                last = key.strip().lower()
                fields[last] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        found += [(uri, suites) for uri in fields.get("uris", "").split()]
    return found


def _one_line_sources(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            found.append((words[1], [words[2]]))
    return found


def _check_mirror(mirror: str) -> str:
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme not in {"http", "https"} or not parts.netloc or re.search(r"[\s\x00-\x1f\x7f\"'\\]", mirror):
        raise InvalidInputError(
            f"mirror: {mirror!r} is not an http(s) URL of a Debian mirror (e.g. http://deb.debian.org/debian)",
            field="mirror",
        )
    return mirror.rstrip("/")


# ------------------------------------------------------------------------- certificates


def default_extra_ca_certs() -> tuple[Path, ...]:
    """The ``base.extra_ca_certs`` setting (``ENVCTL_BASE_EXTRA_CA_CERTS``, ``ENVCTL_CONFIG``)."""
    return load_settings().base_extra_ca_certs


def read_extra_ca_certs(paths: Sequence[str | Path]) -> tuple[ExtraCACert, ...]:
    """The CA certificates ``paths`` name, sorted by their name in the image.

    A file counts as named; a folder gives its ``*.crt`` files (subfolders too, hidden ones
    skipped), named by their path inside it (``corp/a.crt`` -> ``corp-a.crt``). The default
    folder (``/usr/local/share/ca-certificates``) may be missing: no certificates. Any other
    path that is missing, unreadable or not a PEM certificate raises InvalidInputError naming
    it, as do two different certificates with one name.
    """
    found: dict[str, ExtraCACert] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            try:
                files = [
                    (file, file.relative_to(path).as_posix())
                    for file in sorted(path.rglob("*.crt"))
                    if file.is_file() and not any(p.startswith(".") for p in file.relative_to(path).parts)
                ]
            except OSError as exc:
                raise _bad_ca(path, f"cannot list: {exc.strerror or exc}") from exc
        elif path.exists():
            files = [(path, path.name)]
        elif path == DEFAULT_EXTRA_CA_CERTS:
            continue
        else:
            raise _bad_ca(path, "no such file or directory")
        for file, relative in files:
            cert = _read_ca(file, relative)
            other = found.setdefault(cert.name, cert)
            if other.pem != cert.pem:
                raise _bad_ca(file, f"another certificate, {other.source}, has the same name {cert.name}")
    return tuple(found[name] for name in sorted(found))


def _read_ca(path: Path, relative: str) -> ExtraCACert:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _bad_ca(path, f"cannot read: {exc.strerror or exc}") from exc
    blocks = []
    for match in _PEM_CERT_RE.finditer(data):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if not der.startswith(b"\x30"):  # an X.509 certificate is a DER SEQUENCE
            raise _bad_ca(path, "damaged PEM certificate block (bad base64, or not DER)")
        body = base64.b64encode(der)
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        blocks.append(b"\n".join([b"-----BEGIN CERTIFICATE-----", *lines, b"-----END CERTIFICATE-----\n"]))
    if not blocks:
        raise _bad_ca(path, "not a PEM certificate (no -----BEGIN CERTIFICATE----- block)")
    stem = _CA_NAME_UNSAFE_RE.sub("_", relative.removesuffix(".crt").replace("/", "-")).strip("._-") or "ca"
    return ExtraCACert(name=stem + ".crt", source=path, pem=b"".join(blocks))


def _bad_ca(path: Path, problem: str) -> InvalidInputError:
    return InvalidInputError(
        f"base.extra_ca_certs (ENVCTL_BASE_EXTRA_CA_CERTS): {path}: {problem}",
        field="base_extra_ca_certs",
        details={"path": str(path)},
    )


# ------------------------------------------------------------------------------ recipes


def load_hierarchy(root: Path, mirror: str, extra_ca_certs: Sequence[ExtraCACert] = ()) -> dict[str, Recipe]:
    """Read ``hierarchy.yaml`` and every recipe under ``root``; parents come first.

    ``extra_ca_certs`` (from :func:`read_extra_ca_certs`) go into every root image, and into
    its digest. Raises InvalidInputError (``file:line: field: problem``) for a missing or
    malformed file, an unknown parent, a cycle, or a missing or invalid recipe.
    """
    mirror = _check_mirror(mirror)
    path = root / HIERARCHY_FILE
    data, lines = _load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad(path, None, "hierarchy", "must map image names to their parent (or null)")
    parents: dict[str, str | None] = {}
    for name, parent in data.items():
        line = lines.get(str(name))
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 64:
            raise _bad(path, line, str(name), "image names are lowercase letters, digits, '.', '_', '-'")
        if parent is not None and not isinstance(parent, str):
            raise _bad(path, line, name, "the parent must be an image name or null")
        parents[name] = parent
    for name, parent in parents.items():
        if parent is not None and parent not in parents:
            known = ", ".join(sorted(parents))
            raise _bad(path, lines.get(name), name, f"unknown parent {parent!r} (known: {known})")

    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise _bad(path, lines.get(name), name, f"parent cycle: {cycle}")
        state[name] = "visiting"
        parent = parents[name]
        if parent is not None:
            visit(parent, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in parents:
        visit(name, [])

    recipes: dict[str, Recipe] = {}
    suites: dict[str, str] = {}
    for name in order:
        parent = parents[name]
        directory = root / name
        spec = _read_spec(directory, is_root=parent is None, hierarchy=path, line=lines.get(name))
        suite = spec.suite if parent is None else suites[parent]
        assert suite is not None
        suites[name] = suite
        parent_digest = recipes[parent].digest if parent is not None else ""
        certs = tuple(sorted(extra_ca_certs, key=lambda c: c.name)) if parent is None else ()
        digest = _recipe_digest(name, directory, parent_digest, mirror, suite, certs)
        recipes[name] = Recipe(name=name, parent=parent, directory=directory, digest=digest, extra_ca_certs=certs)
    return recipes


def build_order(recipes: dict[str, Recipe], names: list[str] | None) -> list[Recipe]:
    """The named recipes (all when ``names`` is None) plus their ancestors, parents first."""
    if names is None:
        wanted = set(recipes)
    else:
        unknown = [n for n in names if n not in recipes]
        if unknown:
            raise InvalidInputError(
                f"unknown base image {', '.join(map(repr, unknown))}; known: {', '.join(sorted(recipes)) or '(none)'}",
                field="names",
                details={"unknown": unknown, "known": sorted(recipes)},
            )
        wanted = set()
        for name in names:
            current: str | None = name
            while current is not None and current not in wanted:
                wanted.add(current)
                current = recipes[current].parent
    ordered: list[Recipe] = []
    placed: set[str] = set()

    def place(name: str) -> None:
        if name in placed:
            return
        parent = recipes[name].parent
        if parent is not None:
            place(parent)
        placed.add(name)
        ordered.append(recipes[name])

    for name in recipes:
        if name in wanted:
            place(name)
    return ordered


def _load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file; also return the 1-based line of each top-level key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: file missing", field=path.name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc}", field=path.name) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInputError(f"{where}: not valid YAML: {problem}", field=path.name) from exc
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in lines:
                    raise _bad(path, key.start_mark.line + 1, key.value, "appears twice")
                lines[key.value] = key.start_mark.line + 1
    return data, lines


def _bad(path: Path, line: int | None, field: str, problem: str) -> InvalidInputError:
    where = f"{path}:{line}" if line else str(path)
    return InvalidInputError(
        f"{where}: {field}: {problem}",
        field=field,
        details={"file": str(path), "line": line},
    )


def _read_spec(directory: Path, *, is_root: bool, hierarchy: Path, line: int | None) -> _Spec:
    name = directory.name
    if not directory.is_dir():
        raise _bad(hierarchy, line, name, f"missing recipe: no folder {directory}")
    path = directory / RECIPE_FILE
    if not path.is_file():
        raise _bad(hierarchy, line, name, f"missing recipe: no {path}")
    data, lines = _load_yaml(path)
    if not isinstance(data, dict):
        raise _bad(path, None, "recipe", "must be a mapping")
    allowed = _ROOT_KEYS if is_root else _CHILD_KEYS
    for key in data:
        if key not in allowed:
            kind = "a root image (parent: null)" if is_root else f"a child image of {name}'s parent"
            raise _bad(path, lines.get(str(key)), str(key), f"not a field of {kind}; use {sorted(allowed)}")

    def strings(key: str, value: Any, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _bad(path, lines.get(key), key, "must be a list of non-empty strings")
        if pattern is not None:
            for v in value:
                if not pattern.match(v):
                    raise _bad(path, lines.get(key), key, f"invalid entry {v!r}")
        return tuple(value)

    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] | None = None
    config = data.get("config")
    if config is not None:
        if not isinstance(config, dict) or set(config) - {"env", "cmd"}:
            raise _bad(path, lines.get("config"), "config", "may hold only 'env' and 'cmd'")
        raw_env = config.get("env") or {}
        if not isinstance(raw_env, dict):
            raise _bad(path, lines.get("config"), "config.env", "must be a mapping")
        for key, value in raw_env.items():
            if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
                raise _bad(path, lines.get("config"), "config.env", f"invalid variable {key!r}")
            if not isinstance(value, str) or not _ENV_VALUE_RE.match(value):
                raise _bad(
                    path,
                    lines.get("config"),
                    f"config.env.{key}",
                    "must be a string without quotes, backslashes, '$', '`' or control characters",
                )
        env = tuple(raw_env.items())
        if "cmd" in config:
            cmd = strings("cmd", config["cmd"])

    if not is_root:
        steps = strings("steps", data.get("steps"))
        if not steps:
            raise _bad(path, lines.get("steps"), "steps", "a child image needs at least one step")
        return _Spec(steps=steps, env=env, cmd=cmd)

    boot = data.get("debootstrap")
    if not isinstance(boot, dict):
        raise _bad(path, lines.get("debootstrap"), "debootstrap", "a root image needs this mapping")
    if set(boot) - _DEBOOTSTRAP_KEYS:
        extra = sorted(set(boot) - _DEBOOTSTRAP_KEYS)
        raise _bad(path, lines.get("debootstrap"), "debootstrap", f"unknown fields {extra}")
    suite = boot.get("suite")
    if not isinstance(suite, str) or not _SUITE_RE.match(suite):
        raise _bad(
            path,
            lines.get("debootstrap"),
            "debootstrap.suite",
            "must be a suite name such as bookworm",
        )
    variant = boot.get("variant")
    if variant is not None and (not isinstance(variant, str) or not _SUITE_RE.match(variant)):
        raise _bad(path, lines.get("debootstrap"), "debootstrap.variant", "must be a name such as minbase")
    components = strings("debootstrap.components", boot.get("components", ["main"]), _PACKAGE_RE)
    include = strings("debootstrap.include", boot.get("include", []), _PACKAGE_RE) if "include" in boot else ()
    cleanup = strings("cleanup", data.get("cleanup", []))
    for pattern in cleanup:
        if pattern.startswith("/") or ".." in Path(pattern).parts or pattern in {".", "*"}:
            raise _bad(
                path,
                lines.get("cleanup"),
                "cleanup",
                f"{pattern!r} must be a relative path inside the image",
            )
    return _Spec(
        suite=suite,
        variant=variant,
        components=components,
        include=include,
        cleanup=cleanup,
        env=env,
        cmd=cmd,
    )


def _recipe_files(directory: Path) -> list[Path]:
    """Files that make up a recipe: everything in its folder but README.md and hidden files."""
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.is_file() and relative.as_posix() != "README.md":
            files.append(path)
    return files


def _recipe_digest(
    name: str,
    directory: Path,
    parent_digest: str,
    mirror: str,
    suite: str,
    extra_ca_certs: Sequence[ExtraCACert] = (),
) -> str:
    sha = hashlib.sha256()

    def put(value: bytes) -> None:
        sha.update(len(value).to_bytes(8, "big"))
        sha.update(value)

    for value in (
        _DIGEST_VERSION,
        name.encode(),
        parent_digest.encode(),
        mirror.encode(),
        suite.encode(),
    ):
        put(value)
    for path in _recipe_files(directory):
        put(path.relative_to(directory).as_posix().encode())
        put(path.read_bytes())
    # Only when there are any: without extra CAs the digest stays what it was before them.
    if extra_ca_certs:
        put(b"/extra-ca-certs")  # never a recipe file's (relative) path
        for cert in sorted(extra_ca_certs, key=lambda c: c.name):
            put(cert.name.encode())
            put(cert.pem)
    return "sha256:" + sha.hexdigest()


def _lineage(recipes: Mapping[str, Recipe], name: str) -> list[Recipe]:
    """The recipe and its ancestors, root first."""
    chain = []
    current: str | None = name
    while current is not None:
        chain.append(recipes[current])
        current = recipes[current].parent
    return chain[::-1]


def _spec_of(recipe: Recipe) -> _Spec:
    return _read_spec(
        recipe.directory,
        is_root=recipe.parent is None,
        hierarchy=recipe.directory.parent / HIERARCHY_FILE,
        line=None,
    )


def _image_config(recipes: Mapping[str, Recipe], recipe: Recipe) -> dict[str, Any]:
    """The trusted configuration of ``recipe``'s image: template, then each ancestor's config."""
    env: dict[str, str] = dict(BASE_CONFIG["env"])
    cmd: list[str] = list(BASE_CONFIG["cmd"])
    for link in _lineage(recipes, recipe.name):
        spec = _spec_of(link)
        env.update(spec.env)
        if spec.cmd is not None:
            cmd = list(spec.cmd)
    return {
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Cmd": cmd,
        "WorkingDir": BASE_CONFIG["workdir"],
        "Labels": {
            LABEL_IMAGE: recipe.name,
            LABEL_DIGEST: recipe.digest,
            LABEL_PARENT: recipe.parent or "",
        },
    }


def _repository_tag(recipe: Recipe) -> tuple[str, str]:
    return REPOSITORY_PREFIX + recipe.name, recipe.digest.removeprefix("sha256:")[:12]


# ------------------------------------------------------------------------------ building


def build(
    names: list[str] | None,
    *,
    mirror: str | None = None,
    client: docker.DockerClient | None = None,
    recipes_dir: Path | None = None,
    progress: Progress | None = None,
    verify: bool = True,
    extra_ca_certs: Sequence[str | Path] | None = None,
) -> list[BuiltImage]:
    """Build (or reuse) the named base images and their ancestors, parents first.

    ``extra_ca_certs`` are the CA files and folders a root image trusts besides Debian's
    (default: the ``base.extra_ca_certs`` setting). Returns one BuiltImage per image in build
    order, ancestors included. Invalid input (unknown name, bad mirror, broken recipe, bad
    certificate) raises InvalidInputError before Docker is called; a failed debootstrap,
    update-ca-certificates, apt step, import, commit or verify raises BackendError.
    """
    mirror = _check_mirror(mirror) if mirror else default_mirror()
    certs = read_extra_ca_certs(default_extra_ca_certs() if extra_ca_certs is None else extra_ca_certs)
    recipes = load_hierarchy(recipes_dir or default_recipes_dir(), mirror, certs)
    order = build_order(recipes, names)
    client = client or _connect()
    emit = progress or (lambda event: None)
    built: dict[str, BuiltImage] = {}
    for recipe in order:
        parent_id = built[recipe.parent].image_id if recipe.parent else None
        built[recipe.name] = _build_one(client, recipes, recipe, parent_id, mirror, emit, verify)
    return [built[recipe.name] for recipe in order]


def verify_image(
    recipes: Mapping[str, Recipe],
    name: str,
    image: str,
    *,
    client: docker.DockerClient | None = None,
    progress: Progress | None = None,
) -> None:
    """Run the ``verify`` script of ``name`` and of each of its ancestors inside ``image``.

    Each runs as the main process of a fresh container (no network, label envctl.build=1,
    always removed). Raises BackendError with the script's last output lines on failure.
    """
    client = client or _connect()
    emit = progress or (lambda event: None)
    for link in _lineage(recipes, name):
        script = link.directory / VERIFY_FILE
        if not script.is_file():
            emit(BuildEvent(name, "verify", f"{link.name} has no verify script; skipped"))
            continue
        _run_verify(client, name, link.name, script, image, emit)


def _connect() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise BackendError(f"Docker engine not reachable: {exc}") from exc
    return client


def _docker_call(what: str) -> contextlib.AbstractContextManager[None]:
    """Translate Docker SDK errors into BackendError naming what was being done."""

    @contextlib.contextmanager
    def translate() -> Iterator[None]:
        try:
            yield
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BackendError(f"{what}: {exc}") from exc

    return translate()


def _build_one(
    client: docker.DockerClient,
    recipes: Mapping[str, Recipe],
    recipe: Recipe,
    parent_id: str | None,
    mirror: str,
    emit: Progress,
    verify: bool,
) -> BuiltImage:
    reused = _reuse(client, recipe, parent_id, emit)
    if reused is not None:
        return reused
    first_phase = "debootstrap" if recipe.parent is None else "step"
    with _build_lock(recipe, first_phase, emit):
        # Another process may have built it while we waited for the lock.
        reused = _reuse(client, recipe, parent_id, emit)
        if reused is not None:
            return reused
        return _build_new(client, recipes, recipe, parent_id, mirror, emit, verify)


def _reuse(client: docker.DockerClient, recipe: Recipe, parent_id: str | None, emit: Progress) -> BuiltImage | None:
    existing = _find_image(client, recipe, parent_id)
    if existing is None:
        return None
    image_id, size = existing
    emit(BuildEvent(recipe.name, "reuse", f"{image_id[:19]} has recipe digest {recipe.digest[:19]}"))
    return BuiltImage(recipe.name, recipe.parent, image_id, recipe.digest, size, reused=True)


@contextlib.contextmanager
def _build_lock(recipe: Recipe, phase: str, emit: Progress) -> Iterator[None]:
    """Serialize builds of one recipe digest between processes on this machine."""
    locks = Path(tempfile.gettempdir()) / "envctl-base-locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    path = locks / f"{recipe.digest[7:23]}.lock"
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit(BuildEvent(recipe.name, phase, "waiting for another build of this recipe"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_new(
    client: docker.DockerClient,
    recipes: Mapping[str, Recipe],
    recipe: Recipe,
    parent_id: str | None,
    mirror: str,
    emit: Progress,
    verify: bool,
) -> BuiltImage:
    started = time.monotonic()
    config = _image_config(recipes, recipe)
    spec = _spec_of(recipe)
    if recipe.parent is None:
        image_id = _build_root(client, recipe, spec, config, mirror, emit)
    else:
        assert parent_id is not None
        image_id = _build_child(client, recipe, spec, config, parent_id, emit)
    try:
        with _docker_call(f"inspect image {image_id}"):
            attrs = client.api.inspect_image(image_id)
        _check_config(recipe, attrs, config)
        if verify:
            verify_image(recipes, recipe.name, image_id, client=client, progress=emit)
    except BaseException:
        _remove_image(client, image_id)
        raise
    size = int(attrs.get("Size") or 0)
    emit(
        BuildEvent(
            recipe.name,
            "done",
            f"{image_id[:19]} {size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s",
        )
    )
    return BuiltImage(recipe.name, recipe.parent, image_id, recipe.digest, size, reused=False)


def _find_image(client: docker.DockerClient, recipe: Recipe, parent_id: str | None) -> tuple[str, int] | None:
    """The newest image with ``recipe``'s digest, and for a child built on ``parent_id``.

    A child image built on an earlier image of the same parent recipe (the parent was removed
    and rebuilt: debootstrap output is not byte-reproducible) is not reused: its layers
    would not continue the parent's.
    """
    with _docker_call("list images"):
        found = client.api.images(filters={"label": f"{LABEL_DIGEST}={recipe.digest}"})
        # Only a base image itself: never an image made on top of one that kept its labels
        # (a save or a draft of an older envctl), which would be "the newest with this digest".
        found = [
            i
            for i in found
            if (i.get("Labels") or {}).get(LABEL_IMAGE) == recipe.name
            and not {"envctl.environment", "envctl.draft-of"} & set(i.get("Labels") or {})
        ]
        if found and parent_id is not None:
            parent_layers = _layers(client, parent_id)
            found = [i for i in found if _layers(client, i["Id"])[: len(parent_layers)] == parent_layers]
    if not found:
        return None
    newest = max(found, key=lambda i: i.get("Created") or 0)
    repository, tag = _repository_tag(recipe)
    if f"{repository}:{tag}" not in (newest.get("RepoTags") or []):
        with _docker_call(f"tag {newest['Id']}"):
            client.api.tag(newest["Id"], repository, tag)
    return newest["Id"], int(newest.get("Size") or 0)


def _layers(client: docker.DockerClient, image_id: str) -> list[str]:
    return list(client.api.inspect_image(image_id)["RootFS"]["Layers"])


def _remove_image(client: docker.DockerClient, image_id: str) -> None:
    with contextlib.suppress(docker.errors.DockerException):
        client.api.remove_image(image_id, force=True)


def _check_config(recipe: Recipe, attrs: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse an image whose configuration is not exactly the template's."""
    config = attrs.get("Config") or {}
    leftover = attrs.get("ContainerConfig") or {}
    if leftover.get("Labels") or leftover.get("Env") or leftover.get("Cmd"):
        raise BackendError(
            f"{recipe.name}: the built image records a build container's configuration",
            details={"container_config": leftover},
        )
    actual = {
        "Env": sorted(config.get("Env") or []),
        "Cmd": config.get("Cmd"),
        "WorkingDir": config.get("WorkingDir"),
        "Labels": config.get("Labels") or {},
    }
    wanted = {**expected, "Env": sorted(expected["Env"])}
    extra = {
        key: config.get(key)
        for key in (
            "Entrypoint",
            "User",
            "Volumes",
            "ExposedPorts",
            "OnBuild",
            "Healthcheck",
            "Shell",
        )
        if config.get(key)
    }
    if actual != wanted or extra:
        raise BackendError(
            f"{recipe.name}: the built image's configuration differs from the template",
            details={"expected": wanted, "actual": actual, "unexpected": extra},
        )


class _OutputStream:
    """Turns process output into throttled progress events and keeps the last lines."""

    def __init__(self, image: str, phase: str, emit: Progress, prefix: str = "") -> None:
        self.image, self.phase, self.emit, self.prefix = image, phase, emit, prefix
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self._last_emit = 0.0
        self._pending: str | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = re.split(rb"\r?\n|\r", data)
        for raw in lines:
            self._line(raw)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if self._pending is not None:
            self.emit(BuildEvent(self.image, self.phase, self.prefix + self._pending))
            self._pending = None

    def text(self) -> str:
        return "\n".join(self.tail)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line:
            return
        self.tail.append(line)
        now = time.monotonic()
        if now - self._last_emit >= _EMIT_INTERVAL:
            self._last_emit = now
            self._pending = None
            self.emit(BuildEvent(self.image, self.phase, self.prefix + line))
        else:
            self._pending = line


def _build_root(
    client: docker.DockerClient,
    recipe: Recipe,
    spec: _Spec,
    config: Mapping[str, Any],
    mirror: str,
    emit: Progress,
) -> str:
    if shutil.which("debootstrap") is None:
        raise BackendError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise BackendError("building a root base image with debootstrap needs root")
    assert spec.suite is not None
    workdir = Path(tempfile.mkdtemp(prefix=f"envctl-base-{recipe.name}-"))
    rootfs = workdir / "rootfs"
    try:
        argv = ["debootstrap"]
        if spec.variant:
            argv.append(f"--variant={spec.variant}")
        argv.append(f"--components={','.join(spec.components)}")
        if spec.include:
            argv.append(f"--include={','.join(spec.include)}")
        argv += [spec.suite, str(rootfs), mirror]
        emit(BuildEvent(recipe.name, "debootstrap", " ".join(argv)))
        _run_streaming(argv, recipe.name, "debootstrap", emit)
        _unmount_under(rootfs)
        _add_ca_certs(rootfs, recipe, emit)
        for pattern in spec.cleanup:
            _remove_matching(rootfs, pattern)
        emit(BuildEvent(recipe.name, "debootstrap", f"removed {len(spec.cleanup)} cleanup patterns"))
        return _import_rootfs(client, recipe, rootfs, config, emit)
    finally:
        _remove_tree(workdir)


def _add_ca_certs(rootfs: Path, recipe: Recipe, emit: Progress) -> None:
    """Copy the extra CA certificates into the tree and run update-ca-certificates there.

    Nothing at all happens to the tree without any, so it stays as debootstrap made it.
    """
    certs = recipe.extra_ca_certs
    if certs:
        target = rootfs / CA_CERTS_DIR
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o755)
        for cert in certs:
            path = target / cert.name
            path.write_bytes(cert.pem)
            path.chmod(0o644)
        argv = ["chroot", str(rootfs), "/usr/sbin/update-ca-certificates"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                env={**os.environ, **_STEP_ENV, "LC_ALL": "C"},
                timeout=_CA_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{recipe.name}: update-ca-certificates in the root filesystem: {exc}") from exc
        output = (done.stdout + done.stderr).decode("utf-8", errors="replace").strip()
        if done.returncode != 0:
            raise BackendError(
                f"{recipe.name}: update-ca-certificates failed (exit {done.returncode}): {output[-2000:]}",
                details={"argv": argv, "exit_code": done.returncode},
            )
        bundle = (rootfs / "etc/ssl/certs/ca-certificates.crt").read_bytes()
        missing = [cert.name for cert in certs if cert.pem.strip() not in bundle]
        if missing:
            raise BackendError(
                f"{recipe.name}: update-ca-certificates left {', '.join(missing)} out of the bundle: {output[-2000:]}"
            )
    where = f" to /{CA_CERTS_DIR}: {', '.join(c.name for c in certs)}" if certs else ""
    plural = "" if len(certs) == 1 else "s"
    emit(BuildEvent(recipe.name, "certificates", f"added {len(certs)} extra CA certificate{plural}{where}"))


def _run_streaming(argv: list[str], image: str, phase: str, emit: Progress) -> None:
    env = {**os.environ, **_STEP_ENV, "LC_ALL": "C"}
    stream = _OutputStream(image, phase, emit)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            stream.feed(chunk)
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stream.close()
    if code != 0:
        raise BackendError(
            f"{image}: {argv[0]} failed (exit {code}); last output:\n{stream.text()}",
            details={"argv": argv, "exit_code": code},
        )


def _remove_matching(rootfs: Path, pattern: str) -> None:
    for path in sorted(rootfs.glob(pattern), reverse=True):
        # glob does not follow a symlink at the last component; never leave the tree.
        if not os.path.abspath(path).startswith(str(rootfs) + os.sep):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _import_rootfs(
    client: docker.DockerClient,
    recipe: Recipe,
    rootfs: Path,
    config: Mapping[str, Any],
    emit: Progress,
) -> str:
    repository, tag = _repository_tag(recipe)
    changes = [f'ENV {key}="{value}"' for key, _, value in (e.partition("=") for e in config["Env"])]
    changes += [
        f"CMD {json.dumps(config['Cmd'])}",
        f"WORKDIR {config['WorkingDir']}",
        *(f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in config["Labels"].items()),
    ]
    argv = [
        "tar", "--create", "--file=-", "--numeric-owner", "--xattrs", "--xattrs-include=*",
        "--sort=name", f"--directory={rootfs}", ".",
    ]  # fmt: skip
    emit(BuildEvent(recipe.name, "import", f"docker import -> {repository}:{tag}"))
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
        sent = 0

        def chunks() -> Iterator[bytes]:
            nonlocal sent
            assert proc.stdout is not None
            last = time.monotonic()
            while chunk := proc.stdout.read(1 << 20):
                sent += len(chunk)
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    emit(BuildEvent(recipe.name, "import", f"sent {sent / 1e6:.0f} MB"))
                yield chunk

        try:
            with _docker_call(f"{recipe.name}: docker import"):
                answer = client.api.import_image(src=chunks(), repository=repository, tag=tag, changes=changes)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            code = proc.wait()
        errors.seek(0)
        tar_errors = errors.read().decode("utf-8", errors="replace").strip()
    image_id = _import_result(recipe, answer)
    if code != 0:
        _remove_image(client, image_id)
        raise BackendError(f"{recipe.name}: tar of the root filesystem failed (exit {code}): {tar_errors[-2000:]}")
    emit(BuildEvent(recipe.name, "import", f"imported {sent / 1e6:.0f} MB as {image_id[:19]}"))
    return image_id


def _import_result(recipe: Recipe, answer: Any) -> str:
    """Docker answers an import with JSON messages; the last ``status`` is the image id."""
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    image_id = None
    for line in text.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("error") or message.get("errorDetail"):
            raise BackendError(f"{recipe.name}: docker import failed: {message.get('error') or message}")
        status = message.get("status")
        if isinstance(status, str) and status.startswith("sha256:"):
            image_id = status
    if image_id is None:
        raise BackendError(f"{recipe.name}: docker import gave no image id: {text[-500:]!r}")
    return image_id


def _build_child(
    client: docker.DockerClient,
    recipe: Recipe,
    spec: _Spec,
    config: Mapping[str, Any],
    parent_id: str,
    emit: Progress,
) -> str:
    repository, tag = _repository_tag(recipe)
    container_id = None
    try:
        with _docker_call(f"{recipe.name}: start build container"):
            # No environment, entrypoint or other settings of our own: the container's config
            # is the parent's (itself a template); step variables go to each exec only.
            container_id = client.api.create_container(
                parent_id,
                command=["sleep", "infinity"],
                labels={LABEL_BUILD: "1", LABEL_IMAGE: recipe.name},
                name=f"envctl-build-{recipe.name}-{uuid.uuid4().hex[:8]}",
            )["Id"]
            client.api.start(container_id)
        for number, step in enumerate(spec.steps, 1):
            _run_step(client, recipe, container_id, number, len(spec.steps), step, emit)
        with _docker_call(f"{recipe.name}: stop build container"):
            client.api.kill(container_id)
        emit(BuildEvent(recipe.name, "commit", f"committing the layer on {parent_id[:19]}"))
        with _docker_call(f"{recipe.name}: commit"):
            committed: str = client.api.commit(container_id, conf=dict(config))["Id"]
    finally:
        if container_id is not None:
            _remove_container(client, container_id)
    try:
        return _replace_config(client, recipe, committed, config, repository, tag, emit)
    finally:
        _remove_image(client, committed)


def _replace_config(
    client: docker.DockerClient,
    recipe: Recipe,
    committed: str,
    config: Mapping[str, Any],
    repository: str,
    tag: str,
    emit: Progress,
) -> str:
    """Give a committed image exactly the template's configuration; return the new image id.

    ``docker commit`` merges the build container's labels (``envctl.build``), any variables
    missing from the given config, and records the whole container config as
    ``container_config``. So the image is saved, its config JSON rewritten from the template
    (layers untouched, so lineage is unchanged), and loaded back; Docker skips layers it has.
    """
    emit(BuildEvent(recipe.name, "commit", f"writing the image config for {repository}:{tag}"))
    with tempfile.TemporaryFile() as out:
        with _docker_call(f"{recipe.name}: save {committed[:19]}"):
            source = io.BufferedReader(_ChunkReader(client.api.get_image(committed)), 1 << 20)
            config_name = None
            configs: dict[str, bytes] = {}
            manifest: list[dict[str, Any]] = []
            with (
                tarfile.open(fileobj=source, mode="r|") as tin,
                tarfile.open(fileobj=out, mode="w|") as tout,
            ):
                for member in tin:
                    name = member.name
                    if name == "manifest.json" or (name.endswith(".json") and "/" not in name):
                        data = tin.extractfile(member).read()  # type: ignore[union-attr]
                        if name == "manifest.json":
                            manifest = json.loads(data)
                        else:
                            configs[name] = data
                    elif name.endswith("/layer.tar") or member.isdir():
                        fileobj = tin.extractfile(member) if member.isfile() else None
                        tout.addfile(member, fileobj)
                    # legacy per-layer json/VERSION and "repositories" are dropped
                if len(manifest) != 1 or manifest[0].get("Config") not in configs:
                    raise BackendError(f"{recipe.name}: unexpected docker save archive: {manifest}")
                config_name = manifest[0]["Config"]
                image = json.loads(configs[config_name])
                image["config"] = dict(config)
                image.pop("container_config", None)
                image.pop("container", None)
                image.pop("comment", None)
                history = image.get("history") or [{}]
                history[-1] = {
                    "created": history[-1].get("created", image.get("created")),
                    "created_by": f"envctl base image {recipe.name}: "
                    f"{RECIPE_FILE} steps ({len(_spec_of(recipe).steps)})",
                    "comment": recipe.digest,
                }
                image["history"] = history
                data = json.dumps(image, separators=(",", ":"), sort_keys=True).encode()
                new_id = "sha256:" + hashlib.sha256(data).hexdigest()
                manifest[0]["Config"] = new_id.removeprefix("sha256:") + ".json"
                manifest[0]["RepoTags"] = [f"{repository}:{tag}"]
                for name, payload in (
                    (manifest[0]["Config"], data),
                    ("manifest.json", json.dumps(manifest).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(payload), 0o644
                    tout.addfile(info, io.BytesIO(payload))
        out.seek(0)
        with _docker_call(f"{recipe.name}: load {new_id[:19]}"):
            for message in client.api.load_image(out, quiet=True):
                if message.get("error") or message.get("errorDetail"):
                    raise BackendError(f"{recipe.name}: docker load failed: {message}")
    emit(BuildEvent(recipe.name, "commit", f"committed {new_id[:19]} as {repository}:{tag}"))
    return new_id


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (a docker save stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = memoryview(chunk)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def _run_step(
    client: docker.DockerClient,
    recipe: Recipe,
    container_id: str,
    number: int,
    total: int,
    step: str,
    emit: Progress,
) -> None:
    emit(BuildEvent(recipe.name, "step", f"[{number}/{total}] {step}"))
    stream = _OutputStream(recipe.name, "step", emit, prefix=f"[{number}/{total}] ")
    with _docker_call(f"{recipe.name}: step {number}"):
        # The step is recipe data from base-images/, run as one argv word.
        exec_id = client.api.exec_create(
            container_id, ["/bin/sh", "-ec", step], environment=dict(_STEP_ENV), workdir="/"
        )["Id"]
        for chunk in client.api.exec_start(exec_id, stream=True):
            stream.feed(chunk)
        stream.close()
        code = client.api.exec_inspect(exec_id)["ExitCode"]
    if code != 0:
        raise BackendError(
            f"{recipe.name}: step {number} failed (exit {code}): {step}\nlast output:\n{stream.text()}",
            details={"step": step, "exit_code": code},
        )


def _run_verify(
    client: docker.DockerClient,
    image_name: str,
    owner: str,
    script: Path,
    image: str,
    emit: Progress,
) -> None:
    target = f"/tmp/envctl-verify-{owner}"
    emit(BuildEvent(image_name, "verify", f"running {owner}/verify"))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        data = script.read_bytes()
        info = tarfile.TarInfo(Path(target).name)
        info.size, info.mode, info.mtime = len(data), 0o755, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    container_id = None
    stream = _OutputStream(image_name, "verify", emit, prefix=f"{owner}/verify: ")
    try:
        with _docker_call(f"{image_name}: verify"):
            container_id = client.api.create_container(
                image,
                command=[target],
                labels={LABEL_BUILD: "1", LABEL_IMAGE: image_name},
                name=f"envctl-verify-{image_name}-{uuid.uuid4().hex[:8]}",
                host_config=client.api.create_host_config(network_mode="none"),
            )["Id"]
            client.api.put_archive(container_id, "/tmp", archive.getvalue())
            client.api.start(container_id)
            code = client.api.wait(container_id, timeout=_VERIFY_TIMEOUT)["StatusCode"]
            stream.feed(client.api.logs(container_id, stdout=True, stderr=True))
            stream.close()
    finally:
        if container_id is not None:
            _remove_container(client, container_id)
    if code != 0:
        raise BackendError(
            f"{image_name}: {owner}/verify failed in image {image[:19]} (exit {code}):\n{stream.text()}",
            details={"script": str(script), "exit_code": code},
        )


def _remove_container(client: docker.DockerClient, container_id: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        try:
            client.api.remove_container(container_id, force=True)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise BackendError(f"could not remove build container {container_id[:12]}: {exc}") from exc


# ------------------------------------------------------------------------------ temp trees


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            if len(fields) > 4:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == prefix or point.startswith(prefix + os.sep):
                    found.append(point)
    return found


def _unmount_under(path: Path) -> None:
    """Undo mounts a failed debootstrap left in its target (proc, sys), deepest first."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    remaining = _mounts_under(path)
    if remaining:
        raise BackendError(f"cannot unmount {remaining} under {path}; remove it by hand")


def _remove_tree(path: Path) -> None:
    """Remove a build tree, never descending into a mount left inside it."""
    if not path.exists():
        return
    _unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "BASE_CONFIG",
    "BuildEvent",
    "BuiltImage",
    "ExtraCACert",
    "Recipe",
    "build",
    "build_order",
    "default_extra_ca_certs",
    "default_mirror",
    "default_recipes_dir",
    "load_hierarchy",
    "read_extra_ca_certs",
    "verify_image",
]
