"""What a runtime's ``mounts`` setting may hold (R28, R29). Checked before anything is stored,
and again at boot, before any network or git call.

A mount is a map with a ``type`` and a ``target`` (an absolute directory of the container):

- ``{"type": "git", "url": "https://host/repo.git", "ref": "main", "target": "/mnt/code"}``:
  https only, no credentials in the URL, a host that resolves to public addresses only (no
  loopback, link-local, private, reserved or multicast address); ``ref`` a branch, a tag or a
  40-hex commit (the default branch when left out);
- ``{"type": "s3", "bucket": "data", "prefix": "raw/", "target": "/data", "writeback": false}``;
- ``{"type": "volume", "name": "acme/home-data", "target": "/home/data", "read_only": false}``:
  a named volume, the team's (``TEAM/NAME``) or the runtime owner's own (``NAME``)
  (runner/mounts/named_volumes.py).

Targets are normalised (``//`` and a trailing ``/`` dropped); ``..``, ``.``, NUL and control
characters are refused, as are ``/``, the system's directories (``/proc``, ``/etc``, ``/usr``…),
envctl's own (``/opt/envctl``, ``/run/envctl``, ``/results``) and a target inside or above
another mount's. Every error is a 422 naming the field (``mounts[1].target``).

Hosts named in the ``mounts_allow_hosts`` setting may resolve to loopback or private addresses
and may use plain http: the tests serve git on loopback. It is empty by default. The address
rules are ``envs/kit/hosts.py``'s, shared with imports from another envctl server.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from envs.kit.errors import InvalidInputError
from envs.kit.hosts import Resolver, check_host, system_resolver

MAX_MOUNTS = 16
MAX_TARGET = 1024
MAX_URL = 2048
MAX_REF = 255
MAX_PREFIX = 1024

# Directories a mount may not cover or sit inside: the system's, and envctl's own.
FORBIDDEN_TARGETS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/run",
    "/var/lib/dpkg",
    "/opt/envctl",
    "/results",
)

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_REF_RE = re.compile(r"[A-Za-z0-9._/+-]+")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_VOLUME_RE = re.compile(r"(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)?[a-z0-9][a-z0-9_.-]{0,62}")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class GitMount:
    target: str
    url: str
    ref: str = ""  # "" is the repository's default branch
    type: str = "git"


@dataclass(frozen=True)
class S3Mount:
    target: str
    bucket: str
    prefix: str = ""
    writeback: bool = False
    type: str = "s3"


@dataclass(frozen=True)
class VolumeMount:
    target: str
    name: str
    read_only: bool = False
    type: str = "volume"


Mount = GitMount | S3Mount | VolumeMount

_KEYS = {
    "git": {"type", "target", "url", "ref"},
    "s3": {"type", "target", "bucket", "prefix", "writeback"},
    "volume": {"type", "target", "name", "read_only"},
}


def _bad(field: str, problem: str, **details: Any) -> InvalidInputError:
    return InvalidInputError(f"{field}: {problem}", field=field, details=details or None)


def check_target(target: object, field: str) -> str:
    """An absolute, normalised directory a mount may take (R29)."""
    if not isinstance(target, str) or not target:
        raise _bad(field, "give the absolute directory of the container to mount at")
    if "\x00" in target or _CONTROL_RE.search(target):
        raise _bad(field, "a target may not contain NUL or control characters")
    if len(target) > MAX_TARGET:
        raise _bad(field, f"a target is at most {MAX_TARGET} characters")
    if not target.startswith("/"):
        raise _bad(field, f"{target[:80]!r} is not absolute: start it with /")
    parts = [p for p in target.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise _bad(field, f"{target[:80]!r} may not contain . or .. components")
    normal = "/" + "/".join(parts)
    if normal == "/":
        raise _bad(field, "a mount may not cover the whole filesystem (/)")
    for forbidden in FORBIDDEN_TARGETS:
        if normal == forbidden or normal.startswith(forbidden + "/") or forbidden.startswith(normal + "/"):
            raise _bad(
                field,
                f"{normal} is or holds a directory the system or envctl needs ({forbidden}); choose another, "
                "such as /mnt/NAME, /data or a directory under /home or /root",
                forbidden=forbidden,
            )
    return normal


def check_overlaps(mounts: Sequence[Mount], field: str = "mounts") -> None:
    """No target equal to, inside or above another's."""
    for i, a in enumerate(mounts):
        for j in range(i):
            b = mounts[j].target
            if a.target == b or a.target.startswith(b + "/") or b.startswith(a.target + "/"):
                raise _bad(
                    f"{field}[{i}].target",
                    f"{a.target} overlaps the target of {field}[{j}] ({b}); mounts may not nest",
                    overlaps=f"{field}[{j}].target",
                )


def check_git_url(url: object, field: str, resolve: Resolver, allow_hosts: frozenset[str]) -> str:
    """An https URL of a public git host, without credentials (R28)."""
    if not isinstance(url, str) or not url:
        raise _bad(field, "give the https URL of the repository")
    if len(url) > MAX_URL or _CONTROL_RE.search(url) or any(c.isspace() for c in url):
        raise _bad(field, "a URL may not hold spaces or control characters, and is at most 2048 characters")
    if url.startswith("-"):
        raise _bad(field, "a URL may not start with - (it would be read as an option of git)")
    if "::" in url.split("/", 1)[0] or url.lower().startswith("ext:"):
        raise _bad(field, "remote helpers (transport::address, such as ext::) are not allowed; use https://")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(field, f"not a valid URL ({exc})") from None
    host = parts.hostname or ""
    allowed = host.lower() in allow_hosts
    if parts.scheme != "https" and not (parts.scheme == "http" and allowed):
        raise _bad(field, f"only https:// URLs may be mounted, not {parts.scheme or 'a scp-like path'}:")
    if parts.username is not None or parts.password is not None:
        raise _bad(field, "credentials may not be part of the URL")
    if not host or not _HOST_RE.fullmatch(parts.netloc.rsplit(":", 1)[0] if port else parts.netloc):
        raise _bad(field, "the URL has no valid host")
    if parts.query or parts.fragment:
        raise _bad(field, "a repository URL takes no query or fragment")
    check_host(host, field, resolve, allow_hosts, "only public hosts may be mounted")
    return url


def check_ref(ref: object, field: str) -> str:
    """A branch, a tag or a 40-hex commit, as git's check-ref-format would take it; "" is the
    default branch."""
    if ref is None or ref == "":
        return ""
    if not isinstance(ref, str):
        raise _bad(field, "a ref is text: a branch, a tag or a 40-hex commit")
    if _COMMIT_RE.fullmatch(ref):
        return ref
    bad = (
        len(ref) > MAX_REF
        or not _REF_RE.fullmatch(ref)
        or ref.startswith(("-", "/", "."))
        or ref.endswith(("/", ".", ".lock"))
        or ".." in ref
        or "//" in ref
        or "/." in ref
        or ref == "@"
    )
    if bad:
        raise _bad(field, f"{ref[:80]!r} is not a branch, tag or 40-hex commit (letters, digits, . _ / + -)")
    return ref


def check_bucket(bucket: object, field: str) -> str:
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise _bad(field, "not an S3 bucket name: 3 to 63 lower-case letters, digits, . and -")
    try:
        ipaddress.ip_address(bucket)
    except ValueError:
        return bucket
    raise _bad(field, "an S3 bucket name may not look like an IP address")


def check_prefix(prefix: object, field: str) -> str:
    if prefix is None:
        return ""
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX or _CONTROL_RE.search(prefix):
        raise _bad(field, f"a prefix is text of at most {MAX_PREFIX} characters without control characters")
    if prefix.startswith("/") or any(p in (".", "..") for p in prefix.split("/")):
        raise _bad(field, "a prefix may not start with / or contain . or .. components")
    return prefix


def check_volume_name(name: object, field: str = "name") -> str:
    """``NAME`` (yours) or ``TEAM/NAME`` (a team's): 1 to 63 lower-case letters, digits, _ . -."""
    if not isinstance(name, str) or len(name) > 128 or not _VOLUME_RE.fullmatch(name):
        raise _bad(
            field,
            "a volume name is NAME (yours) or TEAM/NAME (a team's), NAME being 1 to 63 lower-case letters, "
            "digits, _ . -, starting with a letter or digit",
        )
    return name


def _flag(value: object, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(field, "must be true or false")
    return value


def check_mount(
    raw: object, field: str, resolve: Resolver = system_resolver, allow_hosts: frozenset[str] = frozenset()
) -> Mount:
    """One mount, checked."""
    if not isinstance(raw, Mapping):
        raise _bad(field, "a mount is a map with a type (git, s3 or volume) and a target")
    kind = raw.get("type")
    if kind not in _KEYS:
        raise _bad(f"{field}.type", f"{str(kind)[:40]!r} is not a mount type; known: git, s3, volume")
    unknown = sorted(str(k)[:40] for k in raw if k not in _KEYS[kind])
    if unknown:
        raise _bad(field, f"unknown keys for a {kind} mount: {', '.join(unknown)}")
    target = check_target(raw.get("target"), f"{field}.target")
    if kind == "git":
        url = check_git_url(raw.get("url"), f"{field}.url", resolve, allow_hosts)
        return GitMount(target=target, url=url, ref=check_ref(raw.get("ref"), f"{field}.ref"))
    if kind == "s3":
        return S3Mount(
            target=target,
            bucket=check_bucket(raw.get("bucket"), f"{field}.bucket"),
            prefix=check_prefix(raw.get("prefix"), f"{field}.prefix"),
            writeback=_flag(raw.get("writeback"), f"{field}.writeback"),
        )
    return VolumeMount(
        target=target,
        name=check_volume_name(raw.get("name"), f"{field}.name"),
        read_only=_flag(raw.get("read_only"), f"{field}.read_only"),
    )


def check_mounts(
    raw: object,
    field: str = "mounts",
    *,
    resolve: Resolver = system_resolver,
    allow_hosts: Iterable[str] = (),
) -> list[Mount]:
    """A complete ``mounts`` setting, checked: each mount, then that no two overlap."""
    if raw is None:
        return []
    if not isinstance(raw, list | tuple):
        raise _bad(field, "must be a list of mounts")
    if len(raw) > MAX_MOUNTS:
        raise _bad(field, f"at most {MAX_MOUNTS} mounts per runtime")
    allowed = frozenset(h.lower() for h in allow_hosts)
    mounts = [check_mount(m, f"{field}[{i}]", resolve, allowed) for i, m in enumerate(raw)]
    check_overlaps(mounts, field)
    return mounts


def to_json(mounts: Iterable[Mount]) -> list[dict[str, Any]]:
    """Mounts as stored on the runtime's row and shown by the API."""
    return [asdict(m) for m in mounts]


def from_json(rows: Iterable[Mapping[str, Any]] | None) -> list[Mount]:
    """Stored mounts back as objects (they were checked when stored)."""
    out: list[Mount] = []
    for row in rows or ():
        data = {k: v for k, v in row.items() if k != "type"}
        kind = row.get("type")
        out.append(GitMount(**data) if kind == "git" else S3Mount(**data) if kind == "s3" else VolumeMount(**data))
    return out


def describe(mount: Mount) -> str:
    """A mount in one line, as the runner log and the CLI show it."""
    if isinstance(mount, GitMount):
        return f"git {mount.url}{'@' + mount.ref if mount.ref else ''} at {mount.target}"
    if isinstance(mount, S3Mount):
        rw = ", written back on stop" if mount.writeback else ""
        return f"s3://{mount.bucket}/{mount.prefix} at {mount.target}{rw}"
    return f"volume {mount.name} at {mount.target}{' (read-only)' if mount.read_only else ''}"


def parse_option(text: str, field: str = "--mount") -> dict[str, Any]:
    """A mount as the command line writes it, as a map for ``check_mount``:
    ``git:URL[@REF]:/target``, ``s3:BUCKET[/PREFIX]:/target[:writeback]``,
    ``volume:NAME:/target[:ro]``."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in _KEYS:
        raise _bad(
            field, f"{text[:80]!r}: write git:URL[@REF]:/target, s3:BUCKET[/PREFIX]:/target or volume:NAME:/target"
        )
    flag = ""
    source, sep, target = rest.rpartition(":")
    if sep and not target.startswith("/"):
        flag = target
        source, sep, target = source.rpartition(":")
    if not sep or not source:
        raise _bad(field, f"{text[:80]!r}: the target directory comes last, after a colon (:/data)")
    if kind == "git":
        after = source.partition("://")[2]
        path_start = after.find("/")
        ref = ""
        if path_start >= 0 and "@" in after[path_start:]:
            head, _, ref = source.rpartition("@")
            source = head
        if flag:
            raise _bad(field, f"a git mount takes no flag ({flag[:20]!r})")
        return {"type": "git", "url": source, "ref": ref, "target": target}
    if kind == "s3":
        bucket, _, prefix = source.partition("/")
        if flag not in ("", "writeback"):
            raise _bad(field, f"an s3 mount takes the flag writeback, not {flag[:20]!r}")
        return {"type": "s3", "bucket": bucket, "prefix": prefix, "target": target, "writeback": flag == "writeback"}
    if flag not in ("", "ro", "rw"):
        raise _bad(field, f"a volume mount takes the flag ro or rw, not {flag[:20]!r}")
    return {"type": "volume", "name": source, "target": target, "read_only": flag == "ro"}
