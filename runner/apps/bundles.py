"""An app's bundle: the notebook and the files beside it that it names, zipped, then encrypted
for one team, and the checks that refuse a bundle that was changed, truncated or made for
another team before anything of it runs.

The bytes: ``MAGIC``, the header's length (4 bytes, big-endian), the header (JSON: the team's
name and id, the app, the bundle's id, the algorithm), a 12-byte nonce, then the zip encrypted
with AES-256-GCM under the header as associated data. The key is made for the one bundle from
the installation's secrets key (``SecretBox.derive``: HKDF over ``app-bundle|<team id>|<bundle
id>``), so it is as much apart from the database as secret values are; the author's client is
handed that one bundle's key to encrypt with, never the installation's.

A bundle holds the notebook and its files only: variables and secret references travel in the
deployment's spec, and no secret value is ever in a bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envs.kit.errors import InvalidInputError
from runner.errors import AppBundleError

MAGIC = b"ENVCTL-APP-BUNDLE\x01"
ALGORITHM = "AES-256-GCM"
MAX_BUNDLE = 32 * 1024 * 1024  # bytes of an encrypted bundle
MAX_HEADER = 4096
NONCE = 12


def key_purpose(team_id: str, bundle_id: str) -> bytes:
    """What a bundle's key is derived for (``SecretBox.derive``)."""
    return f"app-bundle|{team_id}|{bundle_id}".encode()


def header(team: str, team_id: str, app: str, bundle_id: str) -> dict[str, str]:
    return {"team": team, "team_id": team_id, "app": app, "bundle": bundle_id, "alg": ALGORITHM}


def seal(key: bytes, head: dict[str, Any], plain: bytes) -> bytes:
    """The encrypted bundle of ``plain`` (a zip) under ``head``."""
    raw = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    prefix = MAGIC + struct.pack(">I", len(raw)) + raw
    nonce = os.urandom(NONCE)
    return prefix + nonce + AESGCM(key).encrypt(nonce, plain, prefix)


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The header and where the nonce starts; ``AppBundleError`` for what is no bundle."""
    try:
        return _read_header(data)
    except AppBundleError as exc:
        raise AppBundleError(exc.message + "; nothing was run", reason=exc.reason) from None


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    if not data.startswith(MAGIC):
        raise AppBundleError("the app bundle is not an envctl app bundle (its first bytes are wrong)", reason="format")
    at = len(MAGIC)
    if len(data) < at + 4:
        raise AppBundleError("the app bundle is truncated (it ends inside its header)", reason="truncated")
    (size,) = struct.unpack(">I", data[at : at + 4])
    if size > MAX_HEADER or len(data) < at + 4 + size + NONCE + 16:
        raise AppBundleError("the app bundle is truncated (it ends inside its header)", reason="truncated")
    try:
        head = json.loads(data[at + 4 : at + 4 + size])
    except ValueError:
        raise AppBundleError("the app bundle's header is not JSON: it was changed", reason="changed") from None
    if not isinstance(head, dict):
        raise AppBundleError("the app bundle's header is not a JSON object: it was changed", reason="changed")
    return head, at + 4 + size


def open_bundle(data: bytes, *, key: bytes, team: str, team_id: str, bundle_id: str, sha256: str) -> bytes:
    """The zip inside ``data``, once every check passed: the bytes are those the deployment
    recorded (``sha256``), the header names this team and bundle, and AES-GCM's tag holds (any
    change or cut of the bytes fails it). Each refusal is an ``AppBundleError`` saying which."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise AppBundleError(
            f"the app bundle was changed or truncated in the object store: its sha256 is {actual}, "
            f"the deployment recorded {sha256}; nothing was run",
            reason="changed",
            details={"expected_sha256": sha256, "actual_sha256": actual},
        )
    head, at = read_header(data)
    if head.get("team_id") != team_id:
        raise AppBundleError(
            f"the app bundle was encrypted for team {str(head.get('team'))[:64]!r}, not {team!r}; nothing was run",
            reason="other_team",
            details={"bundle_team": str(head.get("team"))[:64], "team": team},
        )
    if head.get("bundle") != bundle_id or head.get("alg") != ALGORITHM:
        raise AppBundleError(
            "the app bundle is not the one the deployment recorded (its id or algorithm differ); nothing was run",
            reason="changed",
        )
    nonce = data[at : at + NONCE]
    try:
        return AESGCM(key).decrypt(nonce, data[at + NONCE :], data[:at])
    except InvalidTag:
        raise AppBundleError(
            "the app bundle does not decrypt: it was changed, truncated, or encrypted with another key; "
            "nothing was run",
            reason="changed",
        ) from None


# ---------------------------------------------------------------------------- the zip inside


@dataclass(frozen=True)
class Contents:
    notebook: str  # the notebook's path in the bundle
    files: dict[str, bytes]  # every file, the notebook included, by its path


def check_member(name: str) -> str:
    """A relative path of plain parts: no absolute path, no ``..``, no NUL."""
    path = PurePosixPath(name)
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or path.is_absolute()
        or any(p in ("..", ".", "") for p in name.split("/"))
        or len(name) > 255
    ):
        raise InvalidInputError(
            f"files: {name[:80]!r} is not a relative path inside the notebook's folder (no .., no absolute path)",
            field="files",
        )
    return name


def pack(notebook: str, files: dict[str, bytes]) -> bytes:
    """The zip of a notebook (its path in ``files``) and its files; a manifest names the notebook."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("envctl-app.json", json.dumps({"notebook": check_member(notebook)}))
        for name in sorted(files):
            z.writestr("files/" + check_member(name), files[name])
    return out.getvalue()


def unpack(plain: bytes) -> Contents:
    try:
        with zipfile.ZipFile(io.BytesIO(plain)) as z:
            manifest = json.loads(z.read("envctl-app.json"))
            files: dict[str, bytes] = {}
            total = 0
            for info in z.infolist():
                if not info.filename.startswith("files/"):
                    continue
                name = check_member(info.filename[len("files/") :])
                total += info.file_size
                if total > 4 * MAX_BUNDLE:
                    raise AppBundleError("the app bundle unpacks to more than 128 MiB", reason="too_large")
                files[name] = z.read(info)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise AppBundleError(f"the app bundle's zip cannot be read ({exc})", reason="format") from exc
    notebook = str(manifest.get("notebook", ""))
    if notebook not in files:
        raise AppBundleError(f"the app bundle has no notebook {notebook[:80]!r}", reason="format")
    return Contents(notebook, files)


def code_cells(notebook: bytes) -> list[str]:
    """The code cells of a Jupyter notebook (nbformat 4 JSON), in order."""
    try:
        nb = json.loads(notebook)
        cells = nb["cells"]
        out = []
        for cell in cells:
            if cell.get("cell_type") != "code":
                continue
            source = cell.get("source", "")
            out.append("".join(source) if isinstance(source, list) else str(source))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AppBundleError(f"the app's notebook is not a Jupyter notebook ({exc})", reason="format") from exc
    return out
