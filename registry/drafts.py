"""Drafts in the registry: a runtime's unsaved changes, kept where any node can boot from them.

On the in-runtime save path (``runner/saves/insave.py``) a stop keeps the runtime's changes as an image
in ``envctl-drafts/<runtime id>``: one layer on the version, pushed by envctl itself. The
repository is envctl's alone:

- the token server never grants it to anyone (an admin neither): only tokens envctl signs
  for itself reach it (``own_token``), and the engine that boots a draft is handed such a
  token for that one repository, pull only (``pull_auth``);
- nothing lists it: the catalog lists publications, and a draft is never one.

A draft's tag is the hex of its configuration's digest, the image id the engine gives it, which
is what the runtime records (``draft_image_id``): the manifest digest is read from the tag when
the boot pulls it by digest, or when the draft is replaced or thrown away (its manifest deleted).
"""

from __future__ import annotations

import logging
import re

import httpx

from registry import uploads
from registry.errors import NoRegistryError, RegistryUnavailableError
from registry.garbage import DIGEST, delete_manifest
from registry.settings import Settings

log = logging.getLogger("envctl.registry.drafts")

NAMESPACE = "envctl-drafts"
_RUNTIME_ID = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")


def is_draft_repository(name: str) -> bool:
    """Whether ``name`` is (or is under) the drafts' namespace, whatever its case."""
    first = name.split("/", 1)[0].lower()
    return first == NAMESPACE


def repository(runtime_id: str) -> str:
    if not _RUNTIME_ID.match(runtime_id) or len(runtime_id) > 100:
        raise ValueError(f"not a runtime id a repository can be named after: {runtime_id!r}")
    return f"{NAMESPACE}/{runtime_id}"


def tag_of(image_id: str) -> str:
    """The tag of the draft whose image id (configuration digest) is ``image_id``."""
    if not DIGEST.match(image_id):
        raise ValueError(f"not an image id: {image_id!r}")
    return image_id.split(":", 1)[1]


def _token(settings: Settings, runtime_id: str, actions: tuple[str, ...]) -> str:
    return uploads.own_token(settings, {repository(runtime_id): actions}, subject=f"envctl draft of {runtime_id}")


def pull_auth(settings: Settings, host: str, runtime_id: str) -> dict[str, str]:
    """The engine's ``auth_config`` for pulling this runtime's draft: a registry token envctl
    signed, good for that repository and pull only (the engine passes it on as it is)."""
    return {"registrytoken": _token(settings, runtime_id, ("pull",)), "serveraddress": host}


def manifest_digest(settings: Settings, runtime_id: str, image_id: str) -> str | None:
    """The manifest digest of the draft ``image_id`` of ``runtime_id``; None when the registry has none."""
    url = uploads.registry_url(settings)
    token = _token(settings, runtime_id, ("pull",))
    target = f"{url}/v2/{repository(runtime_id)}/manifests/{tag_of(image_id)}"
    try:
        resp = httpx.head(
            target,
            headers={"Authorization": f"Bearer {token}", "Accept": ", ".join(uploads.MANIFEST_TYPES)},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        msg = f"the registry at {url} did not answer for the draft of {runtime_id}: {exc}"
        raise RegistryUnavailableError(msg) from exc
    if resp.status_code == 404:
        return None
    digest = str(resp.headers.get("docker-content-digest") or "")
    if resp.status_code != 200 or not DIGEST.match(digest):
        raise RegistryUnavailableError(
            f"the registry did not name the draft of {runtime_id}: {resp.status_code}",
            details={"runtime_id": runtime_id, "status": resp.status_code},
        )
    return digest


def forget(settings: Settings, runtime_id: str, image_id: str | None) -> bool:
    """Delete the draft ``image_id``'s manifest; False when the registry has none such. A registry
    that fails is logged, not raised (the blobs then stay until the next collection finds them
    unreferenced once the manifest is gone)."""
    if not image_id or not DIGEST.match(image_id):
        return False
    try:
        digest = manifest_digest(settings, runtime_id, image_id)
        if digest is None:
            return False
        return delete_manifest(settings, uploads.registry_url(settings), repository(runtime_id), digest)
    except (RegistryUnavailableError, NoRegistryError) as exc:
        log.warning("could not delete the draft %s of %s: %s", image_id[:19], runtime_id, exc.message)
        return False


def forget_all(settings: Settings, runtime_id: str) -> int:
    """Delete every draft manifest of ``runtime_id`` (the runtime was deleted); how many went."""
    try:
        url = uploads.registry_url(settings)
    except NoRegistryError:
        return 0
    token = _token(settings, runtime_id, ("pull",))
    try:
        resp = httpx.get(
            f"{url}/v2/{repository(runtime_id)}/tags/list", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    except httpx.HTTPError as exc:
        log.warning("could not list the drafts of %s: %s", runtime_id, exc)
        return 0
    if resp.status_code != 200:
        return 0  # none ever made (the registry knows no such repository)
    gone = 0
    for tag in resp.json().get("tags") or []:
        if isinstance(tag, str) and re.fullmatch(r"[0-9a-f]{64}", tag):
            gone += forget(settings, runtime_id, "sha256:" + tag)
    return gone
