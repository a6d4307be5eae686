"""Helper containers: what the engine commits to make a save's or a draft's image.

A helper is a container of an image (the layers the new image keeps), labelled
``envctl.managed=save-helper`` and the operator's labels, nothing of any runtime's (before
Docker 25 an image records the labels, variables and command of the container it was committed
from). A save lays its layer out in the helper's upper directory (``overlay.lay_out``), the
engine commits the helper, and the layer is taken away again.

**Held, not only created.** The engine mounts a container's filesystem to commit it and unmounts
it afterwards unless the container runs; unmounting an overlay syncs the filesystem under it
(overlayfs's ``sync_fs``), which writes out every dirty page of the engine's disk: the files the
runtime just wrote and the layer the commit just made, hundreds of milliseconds for 100 MB (a
``docker commit`` of a running container does not unmount, so does not pay it). So a helper is
started and paused at once (``HOLD``): its filesystem stays mounted and a commit costs what the
engine's own does. What runs is the image's ``python3`` (every image a runtime boots from has
it: the agent is run with it) blocking on ``signal.pause()``, frozen by the engine's pause a
moment later, with a read-only root filesystem (nothing it could do lands in the upper
directory), no network, no capability, ``no-new-privileges``, at most a few processes and a
little memory. Where it cannot be started (no ``python3``) or stops, the helper is used as
created: correct, only slower.

Creating a container costs the engine tens of milliseconds, hundreds on a busy host, which a
save of a few megabytes would feel. So a helper, once emptied, is kept for the next save on the
same image (:meth:`Helpers.give_back`: the next first save of any runtime booted from that
version), and after a save one is made ahead for the next save of the same runtime, whose
layers are the new version's (:meth:`Helpers.prepare`). At most ``MAX_IDLE`` wait; an image's
are removed before the image is (:meth:`Helpers.forget`), so that they never keep a removed
version's image alive, and all of them when the backend closes. One left by an envctl that died
carries the labels and the ``envctl-helper-`` name, and holds no file of any runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from envs.images import docker as engine
from envs.images.config import ImageInfo, blank_other_labels
from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, EnvctlError
from envs.kit.stopwatch import span
from runner.backends import overlay
from runner.backends.base import LABEL_MANAGED, LayerObserver

log = logging.getLogger("envctl.helpers")

HELPER = "save-helper"  # the envctl.managed label of a helper container
MAX_IDLE = 4  # helpers kept waiting for a next save, in all
ACTION = "make a helper container for a save"
#: what a held helper runs until it is paused: the image's python3, waiting for a signal. A
#: command, never an entrypoint: a commit merges the container's entrypoint into an image whose
#: configuration has none (its command only when the configuration has neither, and a helper is
#: used only when it has one)
HOLD = ["python3", "-I", "-S", "-c", "import signal; signal.pause()"]
_HOLD_LIMITS: dict[str, Any] = {
    "read_only": True,
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "pids_limit": 4,
    "mem_limit": "64m",
    "memswap_limit": "64m",
    "network_mode": "none",
    "log_config": {"Type": "none", "Config": {}},
}


@dataclass(frozen=True)
class Made:
    id: str
    image: str
    upper: str  # its upper directory: where the layer is laid out
    labels: dict[str, str]  # its labels as the engine has them (the image's merged in)
    held: bool = False  # started and paused: its filesystem stays mounted


class Helper:
    """One helper, being made or made; ``made()`` waits for it."""

    def __init__(self, image: str, future: Future[Made], owner: str | None = None) -> None:
        self.image = image
        self._future = future
        self.used = False
        self.owner = owner  # the container it was made ahead for (``Helpers.prepare``), if any

    def made(self) -> Made:
        return self._future.result()

    def commit(
        self,
        client: docker.DockerClient,
        layer: overlay.PlannedLayer,
        observer: LayerObserver,
        *,
        config: dict[str, Any],
        repository: str,
        tag: str,
        action: str,
        taken: Callable[[], None] | None = None,
    ) -> ImageInfo:
        """The layer laid out in the helper and committed with ``config`` (checked as every
        commit is), its files scanned meanwhile; the layer is taken away again whatever
        happens (:meth:`clear`). A refused layer's image is removed. ``taken()`` is called
        once the layer is committed, scanned and taken away, before the image is checked: the
        paused container may resume from then on."""
        with span("helper-wait"):
            made = self.made()
        self.used = True
        emptying: Future[None] | None = None
        made_id = ""
        try:
            with span("lay-out"):
                overlay.lay_out(layer, made.upper)
            info: ImageInfo | None = None
            try:
                with ThreadPoolExecutor(2, thread_name_prefix="envctl-scan") as pool:
                    scanning = pool.submit(overlay.scan_files, layer, observer, made.upper)
                    given = blank_other_labels(config, made.labels)
                    with engine.engine_call(action), span("commit"):
                        answer = client.api.commit(made.id, repository=repository, tag=tag, conf=given, pause=False)
                    made_id = str(answer["Id"])
                    # the layer is taken away once scanned (the scan reads the helper's names),
                    # while the engine is asked about the image (or, when the container may
                    # resume as soon as it is, before)
                    emptying = pool.submit(_after, scanning, lambda: overlay.empty(made.upper))
                    if taken is not None:
                        with span("scan-wait"):
                            emptying.result()
                        taken()
                    with span("verify"):
                        info = engine.verify_config(client, made_id, given, action=action)
                    with span("scan-wait"):
                        emptying.result()
                observer.verdict()
            except BaseException:
                if made_id:  # refused (verify_config removed it already: idempotent) or scanned out
                    with contextlib.suppress(EnvctlError):
                        engine.remove_image(client, made_id, force=True)
                raise
            return info
        finally:
            # still paused: a link made or removed changes the linked file's ctime, which must
            # come before the save's moment (runner/backends/base.py, what changed since)
            if emptying is None:
                with span("empty"):
                    overlay.empty(made.upper)


def _after(first: Future[None], then: Callable[[], None]) -> None:
    """``then()`` once ``first`` ended, whatever its end; then ``first``'s error, if any."""
    try:
        first.result()
    finally:
        then()


def installation_helpers(installation: str) -> str:
    """The start of the names of an installation's helpers (``envctl uninstall`` removes them)."""
    return f"envctl-helper-{hashlib.sha256(installation.encode()).hexdigest()[:12]}-"


def helper_prefix(installation: str, runner: str) -> str:
    """The start of the names of one runner's helpers: its installation's, then the runner's."""
    return f"{installation_helpers(installation)}{hashlib.sha256(runner.encode()).hexdigest()[:8]}-"


class Helpers:
    """The helpers of one backend: made on demand, kept for the next save of their image."""

    def __init__(self, client: Callable[[], docker.DockerClient], labels: dict[str, str]) -> None:
        self._client = client
        self.labels = {**labels, LABEL_MANAGED: HELPER}
        self._idle: list[Helper] = []  # oldest first
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="envctl-helpers")
        self._prefix = "envctl-helper-"  # helper_prefix(...) once a runner owns the backend (own)
        self._names: set[str] = set()  # every helper this process made (never swept as left behind)

    def own(self, installation: str, runner: str) -> int:
        """From now on helpers are named for this runner (``helper_prefix``: a name, since a
        label would be recorded in every image committed from them, before Docker 25, and the
        installation's id must reach no saved image); ``envctl uninstall`` removes them by that
        prefix. The first time, the helpers an earlier envctl of this runner left behind (it died
        holding them) are removed: only this runner's, never another installation's or runner's,
        nor one this process made. Returns how many were removed."""
        prefix = helper_prefix(installation, runner)
        with self._lock:
            if self._prefix == prefix:
                return 0
            self._prefix = prefix
            mine = set(self._names)
        try:
            left = self._client().api.containers(all=True, filters={"label": f"{LABEL_MANAGED}={HELPER}"})
        except Exception as exc:  # noqa: BLE001 - a sweep is best effort; the next start tries again
            log.warning("the save helpers left by an earlier envctl could not be listed: %s", str(exc)[:200])
            return 0
        removed = 0
        for c in left:
            names = {n.lstrip("/") for n in c.get("Names") or []}
            if names & mine or not any(n.startswith(prefix) for n in names):
                continue  # made by this process (in use or waiting), or not this runner's
            try:
                engine.remove_container(self._client(), c["Id"], "remove a save's helper container left behind")
                removed += 1
            except EnvctlError as exc:
                log.warning("a helper container left behind (%s) stays: %s", c["Id"][:12], exc.message)
        if removed:
            log.info("removed %d save helper container(s) an earlier envctl of this runner left behind", removed)
        return removed

    def take(self, image: str) -> Helper:
        """A helper of ``image``: one kept waiting (checked to be still there, in the
        background, while the caller goes on), else a new one being made."""
        with self._lock:
            found = next((h for h in self._idle if h.image == image), None)
            if found is not None:
                self._idle.remove(found)
        if found is None:
            return Helper(image, self._pool.submit(self._create, image))
        return Helper(image, self._pool.submit(self._kept_or_new, found), found.owner)

    def _kept_or_new(self, found: Helper) -> Made:
        if self._still_there(found):
            return found.made()
        self._remove(found)
        return self._create(found.image)

    def give_back(self, helper: Helper) -> None:
        """A helper whose layer was taken away, kept for the next save of its image; one made
        ahead for a container's next save is not kept once used (that container saved onto a
        new image, and a held helper would keep the old one from ``docker rmi -f``)."""
        if helper.used and helper.owner is not None:
            self.discard(helper)
            return
        with self._lock:
            self._idle.append(helper)
            evicted = self._idle[:-MAX_IDLE] if len(self._idle) > MAX_IDLE else []
            del self._idle[: len(evicted)]
        for old in evicted:
            self.discard(old)

    def prepare(self, image: str, owner: str) -> None:
        """One helper of ``image`` made ahead (in the background) for the next save of the
        container ``owner``, unless one waits already; it goes when that container stops
        (:meth:`release`)."""
        with self._lock:
            if any(h.image == image for h in self._idle):
                return
        self.give_back(Helper(image, self._pool.submit(self._create, image), owner))

    def release(self, owner: str) -> None:
        """The helpers made ahead for the container ``owner`` removed (in the background): it
        stopped. A held helper keeps its image from ``docker rmi -f``; the engine refuses to
        remove an image a running (or paused) container uses."""
        with self._lock:
            gone = [h for h in self._idle if h.owner == owner]
            self._idle = [h for h in self._idle if h.owner != owner]
        for helper in gone:
            self.discard(helper)

    def forget(self, image: str) -> None:
        """Every waiting helper of ``image`` removed (before the image is)."""
        with self._lock:
            gone = [h for h in self._idle if h.image == image]
            self._idle = [h for h in self._idle if h.image != image]
        for helper in gone:
            self._remove(helper)

    def discard(self, helper: Helper) -> None:
        """A helper not to be used again, removed in the background."""
        self._pool.submit(self._remove, helper)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for helper in idle:
            self._remove(helper)
        self._pool.shutdown(wait=True)

    # -------------------------------------------------------------------------- the engine
    def _create(self, image: str) -> Made:
        api = self._client().api
        name = f"{self._prefix}{uuid.uuid4().hex[:16]}"
        with self._lock:
            self._names.add(name)
        try:
            cid = str(
                api.create_container(
                    image,
                    name=name,
                    command=HOLD,  # as a runtime's agent: the image's entrypoint, if any, runs it
                    labels=self.labels,
                    network_disabled=True,
                    host_config=api.create_host_config(**_HOLD_LIMITS),
                )["Id"]
            )
            held = self._hold(cid)
            attrs = api.inspect_container(cid)
        except Exception as exc:
            raise daemon_error(ACTION, exc) from exc
        upper = ((attrs.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir")
        if not isinstance(upper, str) or not os.path.isdir(upper):
            with contextlib.suppress(EnvctlError):
                engine.remove_container(self._client(), cid, ACTION)
            raise BackendError("a helper container for a save has no upper directory this host can read")
        labels = dict((attrs.get("Config") or {}).get("Labels") or {})
        return Made(cid, image, upper, labels, held)

    def _hold(self, cid: str) -> bool:
        """The helper started and paused (its filesystem stays mounted); False when it cannot
        be started, or stopped before the pause: it is then used as created."""
        api = self._client().api
        try:
            api.start(cid)
            api.pause(cid)
        except docker.errors.APIError as exc:
            log.info("a save helper (%s) is used unstarted: %s", cid[:12], str(exc)[:200])
            return False
        return True

    def _still_there(self, helper: Helper) -> bool:
        """The helper is there, empty, and as it was made (a held one still paused)."""
        try:
            made = helper.made()
            state = self._client().api.inspect_container(made.id).get("State") or {}
        except Exception:
            return False
        if made.held and not state.get("Paused"):
            return False  # resumed or stopped by someone else: made anew
        return os.path.isdir(made.upper) and not os.listdir(made.upper)

    def _remove(self, helper: Helper) -> None:
        try:
            made = helper.made()
        except Exception:
            return  # never made
        try:
            engine.remove_container(self._client(), made.id, "remove a save's helper container")
        except EnvctlError as exc:
            log.warning("a helper container (%s) stays: %s", made.id[:12], exc.message)
