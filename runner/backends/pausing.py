"""A running container's pause for a save, as ``docker commit`` pauses it, and its resume.

``Pausing`` asks the engine for the pause in a thread of its own before the save knows it needs
it (the engine takes tens of milliseconds to freeze a container), ``paused`` holds it for the
block that takes the layer away, and ``Resumption`` resumes the container in the background
while the save records its version: the save waits for it before it ends. Engine work for the
next save (``Resumption.then``) can be held until the save has answered its caller.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import EnvctlError
from envs.kit.stopwatch import span

log = logging.getLogger("envctl.runner")


AFTER_ANSWER_WAIT = 2.0  # seconds a resumed save's engine work waits for its answer at most


class Resumption:
    """A paused container's resume, under way in a thread of its own: the caller goes on (records
    the version) meanwhile and :meth:`wait`s before its work ends, which raises what went wrong.

    Engine work given to :meth:`then` (a helper for the next save) waits for the resume and,
    when the caller asked so (:meth:`hold`), for :meth:`answered`: the save has answered its
    caller. On a machine of two cores, starting a container beside the save's last steps delays
    its answer by milliseconds that nobody gains from. It goes on :data:`AFTER_ANSWER_WAIT`
    later at most."""

    def __init__(self, client: docker.DockerClient, cid: str) -> None:
        self._client, self._cid = client, cid
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._after: list[Callable[[], None]] | None = []  # None once resumed and answered
        self._resumed = threading.Event()
        self._held = False
        self._answered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="envctl-unpause", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            _unpause(self._client, self._cid)
        except BaseException as exc:
            self._error = exc
        finally:
            self._resumed.set()
            if self._held:
                self._answered.wait(AFTER_ANSWER_WAIT)
            with self._lock:
                after, self._after = self._after or [], None
            for work in after:
                _quietly(work)

    def then(self, work: Callable[[], None]) -> None:
        """``work()`` once the container resumed and the save answered (at once if both have):
        engine work that would otherwise hold the resume or the answer up."""
        with self._lock:
            if self._after is not None:
                self._after.append(work)
                return
        _quietly(work)

    def hold(self) -> Callable[[], None]:
        """Keep the work given to :meth:`then` until the function returned is called (the save
        has answered; at most :data:`AFTER_ANSWER_WAIT`): when asked before the resume ends."""
        self._held = True
        return self.answered

    def answered(self) -> None:
        """The save has answered: the work given to :meth:`then` may go on."""
        self._answered.set()

    def wait(self) -> None:
        with span("unpause-wait"):
            self._resumed.wait()
        if self._error is not None:
            raise self._error


class Pause:
    """What :func:`paused` yields. :meth:`resume_later` asks for the resume to go on in the
    background when the block ends without an error (:attr:`resumption` then holds it);
    :meth:`resume_now`, for it to start at once, before the block ends (the layer is taken
    away; what the block still does, such as checking the image made, needs no pause)."""

    def __init__(self, client: docker.DockerClient | None = None, cid: str = "") -> None:
        self.later = False
        self.resumption: Resumption | None = None
        self.taken_ns = 0  # time.time_ns() when resume_now was called, still paused
        self._client, self._cid = client, cid

    def resume_later(self) -> None:
        self.later = True

    def resume_now(self) -> None:
        """The container may resume from now on, in the background (once; nothing when the
        block did not pause it)."""
        if self.taken_ns:
            return
        self.taken_ns = time.time_ns()
        if self._client is not None:
            self.resumption = Resumption(self._client, self._cid)

    def wait(self) -> None:
        """The resume asked for by :meth:`resume_later` done (nothing when there was none)."""
        if self.resumption is not None:
            self.resumption.wait()

    def hold(self) -> Callable[[], None]:
        """:meth:`Resumption.hold` of the resume under way; a no-op without one."""
        return self.resumption.hold() if self.resumption is not None else _nothing

    def then(self, work: Callable[[], None]) -> None:
        """``work()`` once the container resumed in the background, or at once."""
        if self.resumption is not None:
            self.resumption.then(work)
        else:
            work()


def _nothing() -> None:
    return None


def _quietly(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        log.exception("after a save's resume")


def _unpause(client: docker.DockerClient, cid: str) -> None:
    try:
        client.api.unpause(cid)
    except docker.errors.NotFound:
        pass  # removed meanwhile: nothing to resume
    except Exception as exc:
        raise daemon_error("resume the runtime after its save", exc) from exc


class Pausing:
    """A container's pause asked for in a thread of its own, before the caller knows it needs
    it (a save's runtime runs): :func:`paused` takes it, or :meth:`undo` resumes the container
    when it was not needed after all."""

    def __init__(self, client: docker.DockerClient, cid: str) -> None:
        self._client, self.cid = client, cid
        self.asked_ns = time.time_ns()
        self._error: BaseException | None = None
        self._settled = False  # taken over by paused(), or undone
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="envctl-pause", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._client.api.pause(self.cid)
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        """Whether the engine paused it (False: it said no: not running, paused already, gone)."""
        self._thread.join()
        return self._error is None

    def _settle(self) -> bool:
        with self._lock:
            settled, self._settled = self._settled, True
        return not settled

    def take(self) -> bool:
        """The pause taken over by :func:`paused` (which resumes the container): whether the
        engine paused it. ``undo`` does nothing from now on."""
        return self._settle() and self.done()

    def undo(self) -> None:
        """The container resumed if this paused it, unless :meth:`take` took it over; once."""
        if self._settle() and self.done():
            _unpause(self._client, self.cid)


@contextlib.contextmanager
def paused(
    client: docker.DockerClient,
    cid: str,
    action: str,
    container: dict[str, Any] | None = None,
    early: Pausing | None = None,
) -> Iterator[Pause]:
    """The container frozen for the block, as ``docker commit`` freezes it (an exited one is
    still already). ``container``: its inspection, when just made; ``early``: its pause, asked
    for already. It is resumed as the block ends, or, when the block asked so and ended well,
    in the background (``Pause.wait``)."""
    try:
        with span("pause"):
            pause = early is not None and early.take()
        if not pause:  # none asked for, or the engine said no: as the inspection says
            state = (container if container is not None else client.api.inspect_container(cid)).get("State") or {}
            pause = bool(state.get("Running")) and not state.get("Paused")
            if pause:
                with span("pause"):
                    client.api.pause(cid)
    except Exception as exc:
        raise daemon_error(action, exc) from exc
    held = Pause(client, cid) if pause else Pause()
    try:
        yield held
    except BaseException:
        if held.resumption is not None:  # resuming already (resume_now)
            with contextlib.suppress(EnvctlError):
                held.resumption.wait()
            held.resumption.answered()
        elif pause:
            with span("unpause"):
                _unpause(client, cid)
        raise
    if pause:
        if held.resumption is None and held.later:
            held.resumption = Resumption(client, cid)
        elif held.resumption is None:
            with span("unpause"):
                _unpause(client, cid)
        elif not held.later:
            held.resumption.answered()
            held.resumption.wait()
