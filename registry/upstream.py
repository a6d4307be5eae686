"""Another envctl server, read through its public API: what a version it holds is, and where
its registry is, so that this server can import the version (``runner/transfers/imports.py``).

``describe(url, token, ref)`` asks the upstream, as the token's user there:

- ``GET /users/me``: the user's name (the engine signs in to its registry with it and the token)
- ``GET /registry``: its registry's URL (the engine pulls from ``host:port`` of it)
- ``GET /environments/{ref}/lineage``: which version ``ref`` means (first step), and its
  ancestors' digests (the lineage this server can link to)
- ``GET /environments/{ref}``: the version's image id and registry digest

Nothing the upstream says reaches the engine or the store unchecked: names and digests are
matched against their forms before they are used. Before any request leaves, the ``from`` URL's
host is resolved and every address checked (R28, ``envs/kit/hosts.py``: never link-local or
metadata addresses, loopback and private ones only for hosts named in the
``import_allow_hosts`` setting), and the requests go to the checked addresses; the registry
host the upstream names passes the same check before the engine is told to pull from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from envs.kit.errors import InvalidInputError
from envs.kit.hosts import Resolver, check_host, system_resolver
from envs.refs import parse_ref
from registry.errors import NotPushedError, UpstreamError, UpstreamRefusedError

TIMEOUT = 30.0
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HOST = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,255}\Z")
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")
_ALLOW_HINT = "only public servers may be imported from, unless the server names the host in ENVCTL_IMPORT_ALLOW_HOSTS"


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


@dataclass(frozen=True)
class Endpoint:
    """An upstream's URL, checked, and the addresses of its host that were checked: requests
    go to these addresses (the first that answers), never to a fresh DNS answer."""

    url: str  # as given, without a trailing /
    host: str
    addresses: tuple[str, ...]

    def base_at(self, address: str) -> str:
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        at = f"[{address}]" if ":" in address else address
        return f"{parts.scheme}://{at}:{port}{parts.path}"


def check_url(url: str, allow_hosts: Iterable[str] = (), resolve: Resolver = system_resolver) -> Endpoint:
    """The ``from`` URL of an import: http(s), no credentials, query or fragment, and a host
    whose every address may be reached (``envs/kit/hosts.py``: loopback and private only when
    named in ``allow_hosts``, the ``import_allow_hosts`` setting). A 422 naming ``from``."""
    text = url.strip()

    def bad(problem: str, shown: str | None = None) -> InvalidInputError:
        return InvalidInputError(
            f"from: {problem}", field="from", details={"from": text[:200] if shown is None else shown}
        )

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - a port that is no number raises here
    except ValueError as exc:
        raise bad(f"{text[:200]!r} is not a valid URL ({exc})") from None
    if parts.username is not None or parts.password is not None:
        raise bad("credentials may not be part of the URL; give your token there as the token", shown="")
    host = parts.hostname or ""
    if (
        parts.scheme not in ("http", "https")
        or not host
        or not _HOST.match(host)
        or parts.query
        or parts.fragment
        or _SPACE.search(text)
    ):
        raise bad(f"{text[:200]!r} is not the http(s) URL of an envctl server")
    addresses = check_host(host, "from", resolve, allow_hosts, _ALLOW_HINT)
    return Endpoint(url=text.rstrip("/"), host=host, addresses=tuple(addresses))


def describe(
    url: str, token: str, ref: str, *, allow_hosts: Iterable[str] = (), resolve: Resolver = system_resolver
) -> Offer:
    """What the upstream at ``url`` holds as ``ref``, read with ``token``; UpstreamError when it
    does not answer or refuses (its error passed on), NotPushedError when the version never
    reached its registry. ``url`` and the registry the upstream names are checked first
    (``check_url``, ``check_registry``)."""
    endpoint = check_url(url, allow_hosts, resolve)
    base = endpoint.url
    parse_ref(ref, "ref")
    path = quote(ref, safe="/@:")
    with _Pinned(endpoint, token) as http:
        me = http.get("/users/me")
        registry = http.get("/registry")
        steps = http.get(f"/environments/{path}/lineage")
        env = http.get(f"/environments/{path}")
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
    offer = _checked(offer, registry.get("mode"))
    check_registry(offer, allow_hosts, resolve)
    return offer


def check_registry(offer: Offer, allow_hosts: Iterable[str] = (), resolve: Resolver = system_resolver) -> None:
    """The registry the upstream named (the engine pulls from it) passes the same host rules
    as ``from``: a 422 naming ``registry``."""
    host = urlsplit(f"//{offer.registry_host}").hostname or ""
    if not host:
        raise UpstreamError(f"{offer.url} gave a malformed registry address", details={"registry": offer.registry_host})
    check_host(host, "registry", resolve, allow_hosts, f"{offer.url} names it as its registry; {_ALLOW_HINT}")


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


class _Pinned:
    """GETs to an upstream at the addresses its check resolved (the first that connects), with
    its host name in ``Host`` and, for https, in the TLS handshake (the certificate is checked
    against it). Redirects are not followed."""

    def __init__(self, endpoint: Endpoint, token: str) -> None:
        self.endpoint = endpoint
        self.token = token
        self.http: httpx.Client | None = None
        self.extensions = {"sni_hostname": endpoint.host} if endpoint.url.startswith("https:") else {}

    def __enter__(self) -> _Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.http is not None:
            self.http.close()

    def _client(self, address: str) -> httpx.Client:
        netloc = urlsplit(self.endpoint.url).netloc
        headers = {"Authorization": f"Bearer {self.token}", "Host": netloc}
        return httpx.Client(base_url=self.endpoint.base_at(address), headers=headers, timeout=TIMEOUT)

    def get(self, path: str) -> Any:
        base = self.endpoint.url
        try:
            answer = self._send(path)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{base} did not answer ({exc})", details={"from": base}) from exc
        return _answer(f"{base}/{path.lstrip('/')}", base, answer)

    def _send(self, path: str) -> httpx.Response:
        if self.http is not None:
            return self.http.get(path, extensions=self.extensions)
        *others, last = self.endpoint.addresses  # check_host never returns none
        for address in others:
            self.http = self._client(address)
            try:
                return self.http.get(path, extensions=self.extensions)
            except httpx.ConnectError:
                self.http.close()
        self.http = self._client(last)
        return self.http.get(path, extensions=self.extensions)


def _answer(where: str, base: str, answer: httpx.Response) -> Any:
    if answer.status_code == 200:
        return answer.json()
    try:
        error = answer.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    failure = UpstreamError(
        f"{where} answered {answer.status_code}: {message or answer.text[:200]}",
        details={"from": base, "status": answer.status_code, "upstream_code": error.get("code")},
    )
    if answer.status_code in (401, 403, 404, 422):  # the caller's to fix (a token, a name): a 409 here
        raise UpstreamRefusedError(failure.message, details=failure.details)
    raise failure
