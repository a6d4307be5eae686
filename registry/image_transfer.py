"""Versions travelling through the registry: push a version's image, pull it back by digest.

A version of ``acme/ml`` is the registry repository ``acme/ml`` (the environment's full name:
the team is the first path component, as the token server reads it), tagged with the version's
number: ``127.0.0.1:5001/acme/ml:3``. The Docker engine does the transfer; it signs in with the
user's name and a short-lived envctl API token made for the transfer and revoked after it
(``engine_auth``), so the engine asks envctl's realm for registry tokens like any ``docker
push`` would, and gets what the user may do (members push and pull their team's repositories).
envctl's own push of a version a boot needs signs in with a push grant for that one repository
instead (``grant_auth``, ``registry/pull_grants.py``), made for the push and seen by nobody else.

A push returns the digest of the manifest the registry now holds; the catalog records it
(``EnvironmentVersion.registry_digest``). A pull asks for exactly that digest, never a tag, so a
tag moved in the registry changes nothing (R24); after it, the engine's image must carry that
digest among its RepoDigests and have the version's image id, or the pull fails with
``digest_mismatch`` and only the reference it pulled is removed.

Progress (bytes done and total) is summed over the layers that travel, from the engine's
stream (``progressDetail`` of ``Pushing``/``Downloading``); layers the other side already has
count for nothing: only missing layers travel.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import docker.errors
from sqlalchemy.orm import Session

from envs.kit.db import Database
from registry import distribution, pull_grants
from registry.errors import DigestMismatchError, TransferError
from registry.models import User
from registry.settings import Settings
from registry.users import create_token, revoke_token

#: the envctl API token a transfer signs the engine in with lives at most this long
TRANSFER_TOKEN_LIFE = timedelta(hours=6)
PROGRESS_EVERY = 0.25  # seconds between two progress reports (the last one is always sent)

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Target:
    """Where a version goes in the registry: ``host`` (``127.0.0.1:5001``) and ``repository``
    (``acme/ml``)."""

    host: str
    repository: str

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def at(self, digest: str) -> str:
        return f"{self.name}@{digest}"


def registry_host(settings: Settings) -> str | None:
    """The registry's ``host:port`` as the engine names it, or None when there is no registry."""
    chosen = distribution.plan(settings)
    if chosen.mode == "off" or not chosen.url:
        return None
    return urlsplit(chosen.url).netloc


def target_of(settings: Settings, environment: str) -> Target | None:
    host = registry_host(settings)
    return None if host is None else Target(host, environment)


# ------------------------------------------------------------------------------ progress


@dataclass
class Progress:
    """Bytes done and total over the layers that travel, from the engine's stream events."""

    report: ProgressCallback | None = None
    every: float = PROGRESS_EVERY
    layers: dict[str, list[int]] = field(default_factory=dict)  # layer id -> [done, total]
    skipped: set[str] = field(default_factory=set)  # layers the other side had already
    _last: float = 0.0

    WORKING = ("Pushing", "Downloading")
    DONE = ("Pushed", "Download complete", "Pull complete")
    THERE = ("Layer already exists", "Already exists")

    @property
    def done(self) -> int:
        return sum(d for d, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.layers.values())

    def feed(self, event: dict[str, Any]) -> None:
        """One event of the push or pull stream; an error event raises TransferError."""
        if event.get("error") or event.get("errorDetail"):
            detail = event.get("errorDetail") or {}
            raise TransferError(
                f"the registry transfer failed: {detail.get('message') or event.get('error')}",
                details={"cause": str(detail.get("message") or event.get("error"))[:500]},
            )
        layer, status = str(event.get("id") or ""), str(event.get("status") or "")
        if not layer:
            return
        detail = event.get("progressDetail") or {}
        if status in self.WORKING and detail.get("total"):
            total = int(detail["total"])
            self.layers[layer] = [min(int(detail.get("current") or 0), total), total]
        elif status in self.DONE and layer in self.layers:
            self.layers[layer][0] = self.layers[layer][1]
        elif status in self.THERE:
            self.skipped.add(layer)
        else:
            return
        self.tell()

    def tell(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.report is not None and (force or now - self._last >= self.every):
            self._last = now
            self.report(self.done, self.total)


# ------------------------------------------------------------------------------ the engine's sign-in

#: envctl's own push (``grant_auth``) runs on a grant living at least this long: a push that
#: takes longer fails (the engine asks for a new registry token every ``registry_token_ttl``)
PUSH_GRANT_LIFE = timedelta(hours=1)


def grant_auth(settings: Settings, target: Target) -> dict[str, str] | None:
    """The ``auth_config`` of envctl's own push to ``target``: a push grant for exactly its
    repository, signed with the managed registry's key, living ``PUSH_GRANT_LIFE``. None when
    the registry is not envctl's managed one (its token server is not envctl: a grant means
    nothing to it)."""
    if distribution.plan(settings).mode != "managed":
        return None
    ttl = max(settings.registry_token_ttl, int(PUSH_GRANT_LIFE.total_seconds()))
    key = distribution.signing_key(settings)
    grant = pull_grants.make_grant(key, target.repository, ttl, kind=pull_grants.PUSH)
    return {"username": pull_grants.PUSH.user, "password": grant, "serveraddress": target.host}


@contextlib.contextmanager
def engine_auth(db: Database, user_id: str, target: Target) -> Iterator[dict[str, str]]:
    """The ``auth_config`` that signs the engine in as ``user_id``: their name and a new envctl
    API token, revoked when the block ends (the engine only keeps registry tokens it got with it)."""
    with db.session() as s:
        user = _user(s, user_id)
        token, info = create_token(
            s, user, f"registry transfer to {target.host} (revoked after it)", TRANSFER_TOKEN_LIFE
        )
        name = user.name
    try:
        yield {"username": name, "password": token, "serveraddress": target.host}
    finally:
        with db.session() as s:
            revoke_token(s, user_id, info.id)


def _user(s: Session, user_id: str) -> User:
    user = s.get(User, user_id)
    if user is None:
        raise TransferError("the user the transfer is for is gone", details={"user_id": user_id})
    return user


# ------------------------------------------------------------------------------ push and pull


def _engine_failure(action: str, exc: Exception) -> TransferError:
    explanation = getattr(exc, "explanation", None) or str(exc)
    return TransferError(f"Docker could not {action}: {explanation}", details={"cause": str(explanation)[:500]})


def _stream(events: Iterable[dict[str, Any]], progress: Progress, action: str) -> str | None:
    """Feed the events to ``progress``; the digest the push reported (its ``aux``), if any."""
    digest = None
    try:
        for event in events:
            aux = event.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            progress.feed(event)
    except TransferError:
        raise
    except Exception as exc:
        raise _engine_failure(action, exc) from exc
    progress.tell(force=True)
    return digest


def push(client: Any, image: str, target: Target, tag: str, auth: dict[str, str], progress: Progress) -> str:
    """Push ``image`` (an id or a local name) as ``target:tag``; the manifest digest."""
    action = f"push to {target.name}:{tag}"
    try:
        client.api.tag(image, target.name, tag)
        events = client.api.push(target.name, tag=tag, stream=True, decode=True, auth_config=auth)
    except Exception as exc:
        raise _engine_failure(action, exc) from exc
    try:
        digest = _stream(events, progress, action)
    finally:
        with contextlib.suppress(Exception):  # only the registry's name for it goes; the image stays
            client.api.remove_image(f"{target.name}:{tag}", noprune=True)
    if not digest:
        raise TransferError(f"the push to {target.name}:{tag} reported no digest", details={"target": target.name})
    return digest


def pull(
    client: Any,
    target: Target,
    digest: str,
    auth: dict[str, str],
    progress: Progress,
    *,
    image_id: str,
    tag_as: tuple[str, str] | None = None,
) -> str:
    """Pull ``target@digest`` and check it is the version: its RepoDigests hold exactly that
    reference and its id is ``image_id``; else DigestMismatchError, with only the pulled
    reference removed. ``tag_as`` (repository, tag): the local name it gets. Returns the id."""
    ref = target.at(digest)
    action = f"pull {ref}"
    try:
        events = client.api.pull(target.name, tag=digest, stream=True, decode=True, auth_config=auth)
    except Exception as exc:
        raise _engine_failure(action, exc) from exc
    _stream(events, progress, action)
    try:
        attrs = client.api.inspect_image(ref)
    except Exception as exc:
        raise _engine_failure(f"find what it pulled as {ref}", exc) from exc
    got = str(attrs.get("Id") or "")
    if ref not in (attrs.get("RepoDigests") or []) or got != image_id:
        with contextlib.suppress(Exception):
            client.api.remove_image(ref, noprune=True)  # the reference this pull made, nothing else
        raise DigestMismatchError(
            f"the registry's {ref} is not the version the catalog recorded (image {got[:19] or 'none'}, "
            f"expected {image_id[:19]}); nothing was booted from it",
            details={"reference": ref, "expected_image": image_id, "got_image": got},
        )
    if tag_as is not None:
        try:
            client.api.tag(got, tag_as[0], tag_as[1])
        except Exception as exc:
            raise _engine_failure(f"name the pulled image {tag_as[0]}:{tag_as[1]}", exc) from exc
    return got


def has_image(client: Any, image: str) -> bool:
    """Whether the engine has ``image`` now (asked anew: an image may go behind envctl's back)."""
    try:
        client.api.inspect_image(image)
    except docker.errors.NotFound:
        return False
    except Exception as exc:
        raise _engine_failure(f"look for image {image[:19]}", exc) from exc
    return True


class Locks:
    """One lock per key (a version's image), so two boots of one version pull it once."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def of(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())
