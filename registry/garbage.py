"""Garbage in the registry: the manifest of a deleted version, and the blobs nothing names.

- Deleting a version that was pushed deletes its manifest (distribution's
  ``DELETE /v2/<name>/manifests/<digest>``, which needs ``storage.delete.enabled``; the managed
  registry's configuration has it). envctl signs itself a token with ``delete`` on that one
  repository: no user ever gets ``delete`` from the token server.
- ``collect`` (``envctl registry gc``) runs ``docker-registry garbage-collect`` on the managed
  registry's configuration with the registry restarted read-only meanwhile
  (``storage.maintenance.readonly``: pulls are served, pushes refused), then restarts it as
  it was. Blobs that no remaining manifest names are removed; everything a manifest still
  names (every version still in the catalog) stays intact and pullable. Untagged manifests are
  kept (no ``--delete-untagged``): a version pushed by digest alone is still a version.

A version's manifest digest is the one its push recorded (``EnvironmentVersion.registry_digest``,
``registry/image_transfer.py``).
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from registry import distribution
from registry.errors import RegistryBusyError, RegistryNotManagedError, RegistryUnavailableError
from registry.settings import Settings

log = logging.getLogger("envctl.registry")

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
GC_TIMEOUT = 3600.0
_COLLECTING = threading.Lock()
_ELIGIBLE = re.compile(r"(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible for deletion")


def _own_token(settings: Settings, repository: str, actions: list[str]) -> str:
    now = int(time.time())
    claims = {
        "iss": distribution.ISSUER,
        "sub": "envctl",
        "aud": distribution.SERVICE,
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": secrets.token_hex(16),
        "access": [{"type": "repository", "name": repository, "actions": actions}],
    }
    return distribution.signing_key(settings).sign(claims)


def delete_manifest(settings: Settings, url: str, repository: str, digest: str) -> bool:
    """Delete ``repository``'s manifest ``digest`` from the registry at ``url``; ``False`` when
    it has none such (never pushed, or deleted already). Tags on it go with it."""
    if not DIGEST.match(digest):
        raise ValueError(f"not a manifest digest: {digest!r}")
    token = _own_token(settings, repository, ["delete"])
    try:
        resp = httpx.delete(
            f"{url}/v2/{repository}/manifests/{digest}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    except httpx.HTTPError as exc:
        raise RegistryUnavailableError(
            f"the registry at {url} did not answer the delete of {repository}@{digest}: {exc}"
        ) from exc
    if resp.status_code == 404:
        return False
    if resp.status_code != 202:
        raise RegistryUnavailableError(
            f"the registry refused to delete {repository}@{digest}: {resp.status_code} {resp.text[:200]}",
            details={"repository": repository, "digest": digest, "status": resp.status_code},
        )
    return True


def forget_manifest(settings: Settings, repository: str, digest: str | None) -> bool:
    """After a version was deleted: delete its manifest if it was pushed and a registry is
    configured. A registry that fails is logged, not raised: the version is gone already, and
    its blobs are then only kept until the manifest is deleted by hand."""
    plan = distribution.plan(settings)
    if digest is None or not DIGEST.match(digest) or plan.url is None:
        return False
    try:
        return delete_manifest(settings, plan.url, repository, digest)
    except RegistryUnavailableError as exc:
        log.warning("%s; its blobs stay until it is deleted", exc.message)
        return False


@dataclass(frozen=True)
class Collected:
    """What a garbage collection did."""

    blobs_deleted: int
    manifests_deleted: int
    blobs_kept: int
    bytes_before: int
    bytes_after: int
    seconds: float


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def collect(registry: distribution.ManagedRegistry) -> Collected:
    """Collect the managed registry's garbage, read-only meanwhile, and start it as it was."""
    if not _COLLECTING.acquire(blocking=False):
        raise RegistryBusyError("the registry's garbage is being collected already; try again when it is done")
    try:
        return _collect(registry)
    finally:
        _COLLECTING.release()


def _collect(registry: distribution.ManagedRegistry) -> Collected:
    binary = registry.settings.registry_binary
    if shutil.which(str(binary)) is None:
        raise RegistryNotManagedError(f"no registry program at {binary}: nothing to collect with")
    storage = registry.dir / "storage"
    started = time.monotonic()
    before = _size(storage)
    registry.stop()
    registry.start(readonly=True)
    try:
        done = subprocess.run(  # noqa: S603  (our program, our configuration file, no user text)
            [str(binary), "garbage-collect", str(registry.config_path)],
            capture_output=True,
            text=True,
            timeout=GC_TIMEOUT,
            check=False,
        )
    finally:
        registry.stop()
        registry.start(readonly=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RegistryUnavailableError(
            f"docker-registry garbage-collect failed ({done.returncode}): {output.strip()[-500:]}",
            details={"exit_code": done.returncode},
        )
    counts = _ELIGIBLE.search(output)
    marked, blobs, manifests = (int(g) for g in counts.groups()) if counts else (0, 0, 0)
    log.info("registry gc: %s blobs and %s manifests deleted, %s blobs kept", blobs, manifests, marked)
    return Collected(blobs, manifests, marked, before, _size(storage), time.monotonic() - started)
