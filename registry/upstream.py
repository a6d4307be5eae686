"""Another envctl server, read through its public API: what a version it holds is, and where
its registry is, so that this server can import the version (``runner/imports.py``).

``describe(url, token, ref)`` asks the upstream, as the token's user there:

- ``GET /users/me``: the user's name (the engine signs in to its registry with it and the token)
- ``GET /registry``: its registry's URL (the engine pulls from ``host:port`` of it)
- ``GET /environments/{ref}/lineage``: which version ``ref`` means (first step), and its
  ancestors' digests (the lineage this server can link to)
- ``GET /environments/{ref}``: the version's image id and registry digest

Nothing the upstream says reaches the engine or the store unchecked: names and digests are
matched against their forms before they are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from envs.kit.errors import InvalidInputError
from envs.refs import parse_ref
from registry.errors import NotPushedError, UpstreamError, UpstreamRefusedError

TIMEOUT = 30.0
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HOST = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,255}\Z")


@dataclass(frozen=True)
class Offer:
    """A version as the upstream describes it."""

    url: str  # the upstream envctl
    ref: str  # acme/ml@3 there
    environment: str  # acme/ml
    digest: str
    image_id: str
    registry_digest: str
    registry_host: str  # 127.0.0.1:5001: what the engine pulls from
    user: str  # the token's user there
    message: str
    author: str
    size: int
    size_added: int
    ancestors: tuple[str, ...]  # digests of its lineage below it, nearest first


def check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidInputError(
            f"from: {url[:200]!r} is not the http(s) URL of an envctl server", field="from", details={"from": url[:200]}
        )
    return url.strip().rstrip("/")


def describe(url: str, token: str, ref: str) -> Offer:
    """What the upstream at ``url`` holds as ``ref``, read with ``token``; UpstreamError when it
    does not answer or refuses (its error passed on), NotPushedError when the version never
    reached its registry."""
    base = check_url(url)
    parse_ref(ref, "ref")
    path = quote(ref, safe="/@:")
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT) as http:
        me = _get(http, "/users/me")
        registry = _get(http, "/registry")
        steps = _get(http, f"/environments/{path}/lineage")
        env = _get(http, f"/environments/{path}")
    try:
        first = steps[0]
        version = next(v for v in env["versions"] if v["ref"] == first["ref"])
        registry_url = str(registry.get("url") or "")
        offer = Offer(
            url=base,
            ref=str(version["ref"]),
            environment=str(env["name"]),
            digest=str(version["digest"]),
            image_id=str(version["image_id"]),
            registry_digest=str(version.get("registry_digest") or ""),
            registry_host=urlsplit(registry_url).netloc,
            user=str(me["name"]),
            message=str(version.get("message") or ""),
            author=str(version.get("author") or ""),
            size=int(version.get("size") or 0),
            size_added=int(version.get("size_added") or 0),
            ancestors=tuple(str(s["digest"]) for s in steps[1:]),
        )
    except (KeyError, IndexError, StopIteration, TypeError, ValueError) as exc:
        raise UpstreamError(
            f"{base} answered about {ref} in a form this envctl does not read ({exc!r})", details={"from": base}
        ) from exc
    return _checked(offer, registry.get("mode"))


def _checked(offer: Offer, mode: object) -> Offer:
    if not offer.registry_host or mode == "off":
        raise UpstreamError(
            f"{offer.url} runs no registry: {offer.ref} cannot be pulled from it (export it as an archive instead)",
            details={"from": offer.url},
        )
    if not offer.registry_digest:
        raise NotPushedError(
            f"{offer.ref} was never pushed to {offer.url}'s registry; push it there first (`envctl push REF`)",
            details={"version": offer.ref, "from": offer.url},
        )
    parse_ref(offer.environment, "environment")
    for name, value in (("digest", offer.registry_digest), ("image_id", offer.image_id)):
        if not _DIGEST.match(value):
            raise UpstreamError(f"{offer.url} gave a malformed {name} for {offer.ref}", details={name: value[:100]})
    if not _HOST.match(offer.registry_host):
        raise UpstreamError(f"{offer.url} gave a malformed registry address", details={"registry": offer.registry_host})
    return offer


def _get(http: httpx.Client, path: str) -> Any:
    where = f"{http.base_url}{path.lstrip('/')}"
    try:
        answer = http.get(path)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{http.base_url} did not answer ({exc})", details={"from": str(http.base_url)}) from exc
    if answer.status_code == 200:
        return answer.json()
    try:
        error = answer.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    failure = UpstreamError(
        f"{where} answered {answer.status_code}: {message or answer.text[:200]}",
        details={"from": str(http.base_url), "status": answer.status_code, "upstream_code": error.get("code")},
    )
    if answer.status_code in (401, 403, 404, 422):  # the caller's to fix (a token, a name): a 409 here
        raise UpstreamRefusedError(failure.message, details=failure.details)
    raise failure
