"""envctl writing to the registry itself, over distribution's HTTP API, with no Docker engine.

A save made inside a runtime (``runner/saves/insave.py``) streams its layer straight into the
registry: ``POST /v2/<repo>/blobs/uploads/`` opens an upload, one ``PATCH`` streams the bytes as
they come (chunked, never held whole), ``PUT ...?digest=`` closes it once the digest is known;
``DELETE`` throws an unfinished upload away (a refused save leaves nothing). The parent's layers
are not sent again: a ``HEAD`` finds those the repository has, a cross-repository mount
(``POST ...?mount=<digest>&from=<repo>``) links the others. The manifest goes last, so a save
that dies before it leaves no image in the registry (R15), only unreferenced blobs that the
registry's garbage collection removes.

The bearer token is one envctl signs for itself with the registry's signing key
(``own_token``), scoped to exactly the repositories and actions of the one transfer, living
minutes: the user's rights were checked by the save before any of this.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin

import httpx

from registry import distribution
from registry.errors import NoRegistryError, TransferError
from registry.settings import Settings

OWN_TOKEN_LIFE = 900  # seconds
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def registry_url(settings: Settings) -> str:
    chosen = distribution.plan(settings)
    if chosen.mode == "off" or not chosen.url:
        raise NoRegistryError(
            "a save made inside the runtime goes to the registry, and there is none: "
            f"{chosen.reason} (ENVCTL_REGISTRY)",
            details={"registry": settings.registry or "managed"},
        )
    return chosen.url.rstrip("/")


def own_token(settings: Settings, access: dict[str, tuple[str, ...]], subject: str = "envctl") -> str:
    """A registry token envctl signs for its own transfer: ``access`` maps repository -> actions."""
    now = int(time.time())
    claims = {
        "iss": distribution.ISSUER,
        "sub": subject,
        "aud": distribution.SERVICE,
        "iat": now,
        "nbf": now,
        "exp": now + OWN_TOKEN_LIFE,
        "jti": secrets.token_hex(16),
        "access": [{"type": "repository", "name": name, "actions": list(actions)} for name, actions in access.items()],
    }
    return distribution.signing_key(settings).sign(claims)


def _failure(action: str, resp: httpx.Response) -> TransferError:
    text = resp.text[:400]
    return TransferError(
        f"the registry refused to {action}: HTTP {resp.status_code} {text}",
        details={"status": resp.status_code, "cause": text},
    )


@dataclass
class Upload:
    """An open blob upload: its location, moved on by each request."""

    repository: str
    location: str


class RegistryWriter:
    """One transfer's connection to the registry."""

    def __init__(self, url: str, token: str, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _abs(self, location: str) -> str:
        return urljoin(self.url + "/", location)

    def _call(self, method: str, url: str, action: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise TransferError(f"could not {action}: {exc}", details={"cause": str(exc)[:400]}) from exc

    # ------------------------------------------------------------------ reading
    def manifest(self, repository: str, reference: str) -> tuple[dict[str, Any], str]:
        """The manifest (parsed) and its media type."""
        resp = self._call(
            "GET",
            f"{self.url}/v2/{repository}/manifests/{reference}",
            f"read {repository}@{reference}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        if resp.status_code != 200:
            raise _failure(f"give the manifest {repository}@{reference}", resp)
        data: dict[str, Any] = resp.json()
        return data, str(resp.headers.get("content-type") or data.get("mediaType") or "")

    def blob(self, repository: str, digest: str, limit: int = 16 << 20) -> bytes:
        resp = self._call("GET", f"{self.url}/v2/{repository}/blobs/{digest}", f"read blob {digest[:19]}")
        if resp.status_code != 200:
            raise _failure(f"give the blob {digest[:19]} of {repository}", resp)
        if len(resp.content) > limit:
            raise TransferError(f"the blob {digest[:19]} is larger than {limit} bytes")
        return resp.content

    def has_blob(self, repository: str, digest: str) -> bool:
        resp = self._call("HEAD", f"{self.url}/v2/{repository}/blobs/{digest}", f"look for blob {digest[:19]}")
        return resp.status_code == 200

    # ------------------------------------------------------------------ writing
    def mount(self, repository: str, digest: str, source: str) -> bool:
        """Link ``digest`` of ``source`` into ``repository`` (True), or False when the registry
        would not (an upload was opened instead: it is cancelled)."""
        resp = self._call(
            "POST",
            f"{self.url}/v2/{repository}/blobs/uploads/",
            f"mount blob {digest[:19]}",
            params={"mount": digest, "from": source},
        )
        if resp.status_code == 201:
            return True
        if resp.status_code == 202 and resp.headers.get("location"):
            self.cancel(Upload(repository, self._abs(resp.headers["location"])))
            return False
        raise _failure(f"mount blob {digest[:19]} from {source} into {repository}", resp)

    def start(self, repository: str) -> Upload:
        resp = self._call("POST", f"{self.url}/v2/{repository}/blobs/uploads/", f"start an upload to {repository}")
        if resp.status_code != 202 or not resp.headers.get("location"):
            raise _failure(f"start an upload to {repository}", resp)
        return Upload(repository, self._abs(resp.headers["location"]))

    def send(self, upload: Upload, chunks: Iterable[bytes]) -> None:
        """Stream ``chunks`` into the upload in one request (chunked transfer encoding)."""
        resp = self._call(
            "PATCH",
            upload.location,
            f"upload to {upload.repository}",
            content=iter(chunks) if not isinstance(chunks, Iterator) else chunks,
            headers={"Content-Type": "application/octet-stream"},
        )
        if resp.status_code != 202 or not resp.headers.get("location"):
            raise _failure(f"take the upload to {upload.repository}", resp)
        upload.location = self._abs(resp.headers["location"])

    def finish(self, upload: Upload, digest: str, data: bytes = b"") -> None:
        resp = self._call(
            "PUT",
            upload.location + ("&" if "?" in upload.location else "?") + urlencode({"digest": digest}),
            f"finish the upload to {upload.repository}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if resp.status_code != 201:
            raise _failure(f"finish the upload of {digest[:19]} to {upload.repository}", resp)

    def cancel(self, upload: Upload) -> None:
        """Throw an unfinished upload away (idempotent, never raises)."""
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(upload.location)

    def put_blob(self, repository: str, digest: str, data: bytes) -> None:
        """A small blob (a configuration) in one go, unless it is there."""
        if self.has_blob(repository, digest):
            return
        upload = self.start(repository)
        self.finish(upload, digest, data)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        resp = self._call(
            "PUT",
            f"{self.url}/v2/{repository}/manifests/{reference}",
            f"write the manifest {repository}:{reference}",
            content=data,
            headers={"Content-Type": media_type},
        )
        if resp.status_code != 201:
            raise _failure(f"take the manifest {repository}:{reference}", resp)
        return str(resp.headers.get("docker-content-digest") or "")
