"""What a base-image build takes from the machine it runs on: its Debian mirror and CA certificates.

**Mirror.** The machine's Debian mirror from its apt configuration, else deb.debian.org; the
``base.mirror`` setting overrides it. Containers must reach it too: children run ``apt-get``
against the mirror debootstrap wrote into the root image.

**Extra CA certificates.** A root image also trusts the build machine's extra CA certificates
(setting ``base.extra_ca_certs``, by default ``/usr/local/share/ca-certificates/*.crt``, e.g. a
TLS-intercepting proxy's): they are copied to ``/usr/local/share/ca-certificates/envctl/`` in
the root filesystem and ``update-ca-certificates`` runs there before import (``envs.base.rootfs``),
so pip, curl and apt in every image trust them. Their names and contents are part of the root's
digest; with no extra certificates the digest is what it was before the setting existed.

Both are read here and checked before anything is built; nothing here calls Docker.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from envs.kit.config import DEFAULT_EXTRA_CA_CERTS, Settings, load_settings
from envs.kit.errors import InvalidInputError

FALLBACK_MIRROR = "http://deb.debian.org/debian"
#: Where a root image keeps the build machine's extra CA certificates (relative to its root).
CA_CERTS_DIR = "usr/local/share/ca-certificates/envctl"

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----([^-]*)-----END CERTIFICATE-----")
_CA_NAME_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ExtraCACert:
    """A CA certificate of the build machine, added to the root image."""

    name: str  # file name in the image, under /usr/local/share/ca-certificates/envctl/
    source: Path
    pem: bytes  # its certificate blocks only, re-encoded as plain PEM


# ------------------------------------------------------------------------------------ mirror


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


def check_mirror(mirror: str) -> str:
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme not in {"http", "https"} or not parts.netloc or re.search(r"[\s\x00-\x1f\x7f\"'\\]", mirror):
        raise InvalidInputError(
            f"mirror: {mirror!r} is not an http(s) URL of a Debian mirror (e.g. http://deb.debian.org/debian)",
            field="mirror",
        )
    return mirror.rstrip("/")


# ------------------------------------------------------------------------------ certificates


def default_extra_ca_certs() -> tuple[Path, ...]:
    """The ``base.extra_ca_certs`` setting (``ENVCTL_BASE_EXTRA_CA_CERTS``, ``ENVCTL_CONFIG``)."""
    return load_settings(Settings, partial=True).base_extra_ca_certs


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
