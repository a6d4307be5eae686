"""What a save leaves out (package caches) and what makes it refuse (secrets in the new layer).

A save's new layer is made entry by entry from the container's writable layer
(``runner/backends/overlay.py``); every entry passes through a :class:`SaveFilter` first:

- **Caches.** Files under the cache directories of the setting ``save_caches`` (apt's lists and
  archives, pip's and npm's caches; ``~/`` means ``/root`` and every ``/home/<user>``) are left
  out, so their bytes never enter the image; the directories themselves stay (empty), and so do
  deletions. What was left out is counted per cache directory. ``keep_caches`` keeps them.
- **Secrets.** Every file's content is streamed through :class:`SecretScan` (never read whole):
  the values of the secrets the runtime used, in plain, base64 (at each of the three alignments,
  standard and URL-safe alphabets) and URL-encoded form, and private keys by content
  (``-----BEGIN ... PRIVATE KEY-----``); well-known credential files are found by path
  (``.aws/credentials``, ``.netrc``, ``.git-credentials``, ``.pypirc``) or by content
  (``.docker/config.json`` whose ``auths`` hold credentials). Names and link targets are searched
  for the values too. A finding names the path and what was found, never the value.

The values come from the runner's ``RuntimeSecrets.values_of`` (runner/runtimes/secret_uses.py): every
value a runtime was given at its boots, and those of the secrets it refers to now, opened in
memory only; :func:`runtime_secret_values` is the default of a ``Snapshots`` made without one.
"""

from __future__ import annotations

import base64
import json
import posixpath
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envs.kit.errors import InvalidInputError
from runner.errors import SaveHasSecretsError

#: secret values shorter than this are not searched for: they would be found everywhere
MIN_SECRET_LENGTH = 4
#: a .docker/config.json larger than this is not parsed (it is reported as unreadable credentials)
DOCKER_CONFIG_MAX = 1 << 20
MAX_ALLOW = 1000

CREDENTIAL_FILES = {
    ".aws/credentials": "AWS credentials file",
    ".netrc": "netrc credentials file",
    ".git-credentials": "git credentials file",
    ".pypirc": "PyPI credentials file",
}
DOCKER_CONFIG = ".docker/config.json"
_KEY_END = b"PRIVATE KEY-----"
_KEY_BEGIN = b"-----BEGIN "


def runtime_secret_values(runtime_id: str) -> list[str]:
    """The values of the secrets runtime ``runtime_id`` was given, for the save scan, when no
    secret store is at hand (a ``Snapshots`` made alone): none. The runner passes
    ``RuntimeSecrets.values_of`` instead (runner/runtimes/secret_uses.py)."""
    return []


# ------------------------------------------------------------------------------------ caches
@dataclass(frozen=True)
class CacheRules:
    """Cache directories a save leaves out; each a path whose ``*`` components match one name."""

    patterns: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, paths: Iterable[str]) -> CacheRules:
        found: list[tuple[str, ...]] = []
        for raw in paths:
            path = raw.strip()
            if not path:
                continue
            homes = ["root", "home/*"] if path.startswith("~/") else [""]
            rest = path[2:] if path.startswith("~/") else path
            for home in homes:
                full = posixpath.normpath("/" + home + "/" + rest.lstrip("/"))
                found.append(tuple(p for p in full.split("/") if p))
        return cls(tuple(found))

    def cache_of(self, path: str) -> str | None:
        """The cache directory that ``path`` lies strictly inside, or None."""
        parts = [p for p in path.split("/") if p]
        for pattern in self.patterns:
            if len(parts) > len(pattern) and all(w == "*" or w == p for w, p in zip(pattern, parts, strict=False)):
                return "/" + "/".join(parts[: len(pattern)])
        return None


# ----------------------------------------------------------------------------------- secrets
def secret_forms(values: Sequence[str]) -> list[tuple[bytes, str]]:
    """Every byte string to look for, with the form it is (never the value itself)."""
    forms: dict[bytes, str] = {}
    for value in values:
        raw = value.encode()
        if len(raw) < MIN_SECRET_LENGTH:
            continue
        forms.setdefault(raw, "secret value")
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            for offset in range(3):
                encoded = encode(b"\0" * offset + raw)
                start = -(-offset * 8 // 6)  # characters that hold bits of the prefix
                core = encoded[start : (offset + len(raw)) * 8 // 6]  # those no later byte changes
                if len(core) >= MIN_SECRET_LENGTH + 2:
                    forms.setdefault(core, "secret value (base64)")
        for quoted in (urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe="")):
            for form in {quoted, _lower_escapes(quoted)}:
                forms.setdefault(form.encode(), "secret value (URL-encoded)")
    return list(forms.items())


def _lower_escapes(text: str) -> str:
    parts = text.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


@dataclass
class Finding:
    path: str
    found: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        if what not in self.found:
            self.found.append(what)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "found": list(self.found)}


class _FileScan:
    """One file's content, fed in chunks; matches across chunk boundaries are found."""

    def __init__(self, scan: SecretScan, path: str, size: int) -> None:
        self.scan, self.path = scan, path
        self.tail = b""
        self.done: set[str] = set()
        self.keep = scan.overlap
        self.docker: bytearray | None = None
        if path.endswith("/" + DOCKER_CONFIG) and size <= DOCKER_CONFIG_MAX:
            self.docker = bytearray()

    def feed(self, chunk: bytes) -> None:
        window = self.tail + chunk
        for needle, what in self.scan.forms:
            if what not in self.done and needle in window:
                self.done.add(what)
                self.scan.found(self.path, what)
        if "private key" not in self.done:
            at = window.find(_KEY_END)
            while at >= 0:
                line = window[max(0, at - 64) : at]
                if _KEY_BEGIN in line[line.rfind(b"\n") + 1 :]:
                    self.done.add("private key")
                    self.scan.found(self.path, "private key")
                    break
                at = window.find(_KEY_END, at + 1)
        if self.docker is not None:
            self.docker += chunk
        self.tail = window[-self.keep :] if self.keep else b""

    def close(self) -> None:
        if self.docker is not None and _docker_auths(bytes(self.docker)):
            self.scan.found(self.path, "registry credentials in .docker/config.json")


def _docker_auths(data: bytes) -> bool:
    try:
        config = json.loads(data or b"{}")
    except ValueError:
        return False
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return False
    keys = ("auth", "identitytoken", "password", "registrytoken")
    return any(isinstance(entry, dict) and any(entry.get(k) for k in keys) for entry in auths.values())


class SecretScan:
    """The findings of one layer: secret values and credential files, by path."""

    def __init__(self, values: Sequence[str] = ()) -> None:
        self.forms = secret_forms(values)
        self.overlap = max([len(n) for n, _ in self.forms] + [len(_KEY_BEGIN) + 64 + len(_KEY_END)]) - 1
        self.findings: dict[str, Finding] = {}

    def found(self, path: str, what: str) -> None:
        self.findings.setdefault(path, Finding(path)).add(what)

    def entry(self, path: str, link: str | None = None) -> None:
        """A path in the layer (and where a link points): its name and credential-file kind."""
        for text in (path, link or ""):
            data = text.encode(errors="surrogateescape")
            for needle, what in self.forms:
                if needle in data:
                    self.found(path, what + " in the name" if text == path else what + " in the link target")

    def content(self, path: str, size: int) -> _FileScan | None:
        """The scanner of a regular file's content (None: nothing to look at in it)."""
        for suffix, what in CREDENTIAL_FILES.items():
            if (path.endswith("/" + suffix) or path == "/" + suffix) and size > 0:
                self.found(path, what)
        return _FileScan(self, path, size)


# ------------------------------------------------------------------------ what a save passes
def check_allowed(paths: Sequence[str]) -> list[str]:
    """The ``allow_secrets`` paths of a save request, checked: absolute, plain, no NUL."""
    if len(paths) > MAX_ALLOW:
        raise InvalidInputError(f"allow_secrets: at most {MAX_ALLOW} paths", field="allow_secrets")
    out = []
    for i, path in enumerate(paths):
        bad = (
            not isinstance(path, str)
            or not path.startswith("/")
            or "\0" in path
            or len(path) > 4096
            or posixpath.normpath(path) != path
        )
        if bad:
            raise InvalidInputError(
                f"allow_secrets[{i}]: must be an absolute path without '..', '.', '//' or a trailing '/'",
                field=f"allow_secrets[{i}]",
            )
        out.append(path)
    return out


class SaveFilter:
    """What one save leaves out and what it refuses (the observer the backend's layer maker calls)."""

    def __init__(self, caches: CacheRules | None, secret_values: Sequence[str] = (), allow: Sequence[str] = ()) -> None:
        self.caches = caches
        self.scan = SecretScan(secret_values)
        self.allow = set(allow)

    def cache_of(self, path: str) -> str | None:
        return self.caches.cache_of(path) if self.caches is not None else None

    def entry(self, path: str, link: str | None = None) -> None:
        self.scan.entry(path, link)

    def content(self, path: str, size: int) -> Callable[[bytes], None] | None:
        scanner = self.scan.content(path, size)
        return None if scanner is None else _Feeder(scanner)

    def needles(self) -> list[bytes] | None:
        """Byte strings such that a file holding none of them has no finding by its content,
        beyond what :meth:`content` finds by its path and in the files whose sink
        ``reads_whole`` (a ``.docker/config.json``): the layer maker may then search for them
        with a faster tool and feed only the files that hold one. None when they cannot be
        searched for line by line (a value with a line break or a NUL)."""
        found = [needle for needle, _what in self.scan.forms] + [_KEY_END]
        return None if any(b"\n" in n or b"\0" in n or b"\r" in n for n in found) else found

    def allowed(self) -> list[dict[str, Any]]:
        """Findings the request allowed (recorded in the version's metadata)."""
        return [f.to_dict() for p, f in sorted(self.scan.findings.items()) if p in self.allow]

    def verdict(self) -> None:
        """Raise SaveHasSecretsError naming each path with a finding the request did not allow."""
        refused = [f.to_dict() for p, f in sorted(self.scan.findings.items()) if p not in self.allow]
        if refused:
            raise SaveHasSecretsError(refused)


class _Feeder:
    """A file's scanner as the layer maker uses it: called with each chunk, then with b"" once."""

    def __init__(self, scanner: _FileScan) -> None:
        self.scanner = scanner
        self.reads_whole = scanner.docker is not None  # its whole content is parsed, needles or not

    def __call__(self, chunk: bytes) -> None:
        if chunk:
            self.scanner.feed(chunk)
        else:
            self.scanner.close()
