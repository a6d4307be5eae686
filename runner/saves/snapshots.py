"""Saves: a running runtime's filesystem becoming the next version of an environment.

The container's filesystem is committed on top of the image it booted from, with the trusted
image configuration (``runner/saves/imageconfig.py``: the parent version's own config plus envctl's
labels and OCI annotations), never the container's. The new image becomes the next version of
an environment whose parent is the version the runtime booted from, and the runtime moves onto
it. Mounts, ``/results`` and envctl's own files are bind mounts, so no layer ever holds them.
Long chains of saves are compacted (squashed into one layer) before the storage driver's
layer limit; the lineage stays complete in the database.

The new layer is made entry by entry (``RuntimeBackend.save_layer``) through a
``runner.saves.scans.SaveFilter``: package caches are left out unless ``keep_caches`` (what was left
out, per directory, is in the operation's result and the version's ``envctl.save`` label), and
a layer holding the runtime's secret values or credential files is refused before the version
is recorded, its image removed (``save_has_secrets``), unless each path is in
``allow_secrets`` (recorded likewise). The secret values come from ``secret_values``
(``runner.saves.scans.runtime_secret_values``).

A save answers at once with an operation (``runner/operations.py``); while it runs the
runtime is ``saving`` and idle shutdown waits (R20).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from envs import service as envs_service
from envs.kit import stopwatch
from envs.kit.errors import BackendError, ConflictError, InvalidInputError
from envs.models import EnvironmentVersion
from envs.refs import check_name, check_tag
from registry.models import User
from registry.teams import team_names_of
from runner.backends.base import EarlyPause, RuntimeBackend
from runner.models import Operation, Runtime
from runner.operations import Operations
from runner.runtimes.attach import check_attached_save
from runner.runtimes.states import State
from runner.runtimes.store import Records, Who, viewer_of
from runner.saves.imageconfig import trusted_config
from runner.saves.insave import InRuntimeSaves, save_in_runtime
from runner.saves.scans import CacheRules, SaveFilter, check_allowed, runtime_secret_values
from runner.settings import Settings
from runner.transfers.pushpull import Transfers, push_after_save, pushed_text

log = logging.getLogger("envctl.snapshots")

MAX_MESSAGE = 2000
SAVE_ACTION = ("save into it", "save under a name of your own")


SAVE_LABEL = "envctl.save"  # the version's metadata of its save: caches left out, secrets allowed


@dataclass(frozen=True)
class SaveOptions:
    keep_caches: bool = False
    allow_secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class SaveStart:
    """What a save reads of its runtime before it begins (read by the request that asks for it)."""

    parent_id: int  # the version the runtime stands on
    parent_image: str
    parent_ref: str
    parent_digest: str
    state: dict[str, Any]  # the backend's state: its container
    since: int  # the moment of its last save from this container (``change_baseline``), or 0
    number: int  # the number the new version would get


def _left_out_text(report: dict[str, Any]) -> str:
    total = int(report.get("left_out_bytes") or 0)
    if not report.get("left_out"):
        return ""
    return f"; left out {total} bytes of caches ({', '.join(sorted(report['left_out']))})"


def _oci_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _undo(early: EarlyPause) -> None:
    try:
        early.undo()
    except Exception:  # the save's own error is what its operation reports
        log.exception("a save could not resume its runtime's container")


def writer_of(session: Session, user_id: str) -> envs_service.Writer:
    """The user ``user_id`` as a writer of environments: admins may write to any."""
    user = session.get(User, user_id)
    return envs_service.Writer(user_id, bool(user is not None and user.is_admin), team_names_of(session, user_id))


class Snapshots:
    in_runtime: InRuntimeSaves | None = None  # set by the runner when saves may be made inside runtimes

    def __init__(
        self,
        settings: Settings,
        records: Records,
        backend: RuntimeBackend,
        operations: Operations,
        *,
        submit: Callable[..., Any],
        secret_values: Callable[[str], Sequence[str]] = runtime_secret_values,
        transfers: Transfers | None = None,
    ) -> None:
        self.settings = settings
        self.secret_values = secret_values
        self.caches = CacheRules.of(settings.save_caches)
        self.records = records
        self.backend = backend
        self.operations = operations
        self.submit = submit
        self.transfers = transfers
        self._saving: set[str] = set()
        self._lock = threading.Lock()

    def is_saving(self, runtime_id: str) -> bool:
        """A save of the runtime runs in this process (only its owner runs saves)."""
        with self._lock:
            return runtime_id in self._saving

    # ------------------------------------------------------------------ the request
    def save(
        self,
        who: Who,
        author: str,
        runtime_id: str,
        *,
        environment: str,
        message: str = "",
        tag: str | None = None,
        keep_caches: bool = False,
        allow_secrets: Sequence[str] = (),
        attached_save: bool = False,
    ) -> Operation:
        owner_id = viewer_of(who).user_id  # the saver: writes the version, owns the operation
        full = environment  # not stripped: "tools\n" is refused, as everywhere else
        team, _, name = full.rpartition("/")
        if team:
            check_name(team, "environment", "team")
        check_name(name, "environment", "environment name")
        if len(message) > MAX_MESSAGE:
            raise InvalidInputError(f"message: at most {MAX_MESSAGE} characters", field="message")
        if tag is not None:
            check_tag(tag, "tag")
        allowed = check_allowed(list(allow_secrets))
        claimed = False
        try:
            # one transaction: the runtime (404 if the caller may not see it, 409 if another
            # runner's), the 403 (before any operation or commit), the state, the operation and
            # the log line
            with self.records.tx() as s:
                rt = self.records.get_mine(s, who, runtime_id)
                check_attached_save(rt, attached_save)  # an attached runtime only when asked for
                envs_service.check_write_to(s, full, writer_of(s, owner_id), *SAVE_ACTION)
                if rt.state != State.RUNNING:
                    raise ConflictError(
                        f"only a running runtime can be saved; it is {rt.state}"
                        + (" (start it: its unsaved changes come back with it)" if rt.draft_image_id else ""),
                        details={"state": rt.state},
                    )
                with self._lock:
                    if runtime_id in self._saving:
                        raise ConflictError("a save of this runtime is already in progress")
                    self._saving.add(runtime_id)
                    claimed = True
                # A save is activity, recorded only while the runtime still runs. An idle stop
                # decided a moment ago (before the flag above) then either finds this new
                # activity and does not happen, or has happened and this save is refused.
                if not self.records.touch_in(s, runtime_id, "save started", only_running=True):
                    raise ConflictError(
                        "the runtime stopped as the save was asked for; start it and save again "
                        "(its unsaved changes come back with it)"
                    )
                op = self.operations.create(
                    owner_id, "save", f"saving {rt.name} as {full}", runtime_id=runtime_id, session=s
                )
                self.records.log(
                    s, runtime_id, event="save-started", reason="user-request", message=f"saving as {full}"
                )
                start = self._start_of(s, rt, full) if rt.version is not None else None
            options = SaveOptions(keep_caches, tuple(allowed))
            self.submit(self._save, op.id, who, author, runtime_id, full, message, tag, options, start)
        except BaseException:
            if claimed:
                with self._lock:
                    self._saving.discard(runtime_id)
            raise
        return op

    def _save(
        self,
        op_id: str,
        who: Who,
        author: str,
        runtime_id: str,
        environment: str,
        message: str,
        tag: str | None,
        options: SaveOptions,
        start: SaveStart | None = None,
    ) -> None:
        version: EnvironmentVersion | None = None
        error: Exception | None = None
        timings: dict[str, float] = {}
        noted: list[str] = []  # the version whose log line went in the transaction that recorded it
        answered: list[Callable[[], None]] = []  # the backend's, once the save has answered

        def finished(s: Session, made: EnvironmentVersion) -> None:
            self._finished_in(s, runtime_id, made.ref)
            noted.append(made.ref)

        try:
            with stopwatch.measuring() as watch:
                try:
                    # The container's pause is asked for first: the engine takes tens of
                    # milliseconds to freeze it, while the save reads its secrets and notes
                    # its phase. The save's layer is planned only once it is frozen.
                    in_runtime = self.in_runtime is not None and self.in_runtime.enabled
                    early = None if start is None or in_runtime else self.backend.pause_for_save(start.state)
                    version = self.save_now(
                        op_id,
                        who,
                        author,
                        runtime_id,
                        environment,
                        message,
                        tag,
                        keep_caches=options.keep_caches,
                        allow_secrets=options.allow_secrets,
                        recorded=finished,
                        start=start,
                        early=early,
                        answered=answered,
                    )
                finally:
                    timings = watch.ms()
        except Exception as exc:
            error = exc
        finally:
            try:
                # activity first, then "no longer saving": idle shutdown never sees a runtime
                # that is neither saving nor freshly active (R20). Both before the operation
                # ends: whoever sees it end may save again at once. A save's log line goes in
                # the same transaction (the runtime's log line before the operation's end):
                # the one that recorded the version, when the save made it here.
                if not (error is None and version is not None and noted == [version.ref]):
                    with self.records.tx() as s:
                        self._finished_in(s, runtime_id, version.ref if error is None and version else None)
            finally:
                with self._lock:
                    self._saving.discard(runtime_id)
        if error is not None or version is None:
            self.operations.discard_pending(op_id)
            problem, text = self.operations.failure(op_id, error or BackendError("the save made no version"), "save")
            self.records.log_now(runtime_id, event="save-failed", reason="error", message=text)
            self.operations.finish(op_id, "failed", error=problem, message=text)
            for then in answered:
                then()
            return
        pushed = (
            {
                "pushed": True,
                "registry_digest": version.registry_digest,
            }  # made in the registry (runner/saves/insave.py)
            if version.registry_digest
            else push_after_save(self.transfers, self.operations, op_id, viewer_of(who).user_id, runtime_id, version)
        )
        log.info("saved %s as %s: %s", runtime_id, version.ref, " ".join(f"{k}={v}ms" for k, v in timings.items()))
        self.operations.finish(
            op_id,
            "succeeded",
            result={
                "version": version.ref,
                "digest": version.digest,
                "image_id": version.image_id,
                **(version.labels or {}).get(SAVE_LABEL, {}),
                **pushed,
                "timings_ms": timings,  # where the save spent its time (before any push)
            },
            message=f"saved as {version.ref}"
            + _left_out_text((version.labels or {}).get(SAVE_LABEL, {}))
            + pushed_text(pushed),
        )
        for then in answered:  # the answer is out: the engine work kept off its way goes on
            then()

    def _finished_in(self, s: Session, runtime_id: str, saved_as: str | None) -> None:
        """A save's end in transaction ``s``: the runtime's activity, and its log line when it
        made the version ``saved_as``."""
        self.records.touch_in(s, runtime_id, "save finished")
        if saved_as is not None:
            self.records.log(
                s,
                runtime_id,
                event="saved",
                reason="user-request",
                message=f"saved as {saved_as}",
                details={"version": saved_as},
            )

    # ------------------------------------------------------------------ the work
    def _start_of(self, s: Session, rt: Runtime, environment: str) -> SaveStart:
        """What a save of ``rt`` (loaded with its version in ``s``) reads before it begins."""
        parent = rt.version
        return SaveStart(
            parent_id=parent.id,
            parent_image=parent.image_id,
            parent_ref=parent.ref,
            parent_digest=parent.digest,
            state=dict(rt.backend_state or {}),
            since=int((rt.change_baseline or {}).get("saved_at_ns") or 0),  # a save from this container
            number=envs_service.next_number(s, environment),
        )

    def save_now(
        self,
        op_id: str,
        who: Who,
        author: str,
        runtime_id: str,
        environment: str,
        message: str,
        tag: str | None,
        *,
        extra_env: dict[str, str] | None = None,
        extra_labels: dict[str, str] | None = None,
        keep_caches: bool = False,
        allow_secrets: Sequence[str] = (),
        secret_values: Sequence[str] | None = None,
        recorded: Callable[[Session, EnvironmentVersion], None] | None = None,
        start: SaveStart | None = None,
        early: EarlyPause | None = None,
        answered: list[Callable[[], None]] | None = None,
    ) -> EnvironmentVersion:
        """Make the layer (caches left out, scanned), check, compact if needed, and record the
        version; the runtime moves onto it. ``secret_values`` stands for the runtime's own
        (``self.secret_values``) when given. ``recorded(session, version)`` is called in the
        transaction that records the version (made here, not inside the runtime). ``start``:
        what the request read of the runtime (else it is read here); ``early``: the
        container's pause, asked for already (``RuntimeBackend.pause_for_save``), which this
        hands to the backend's ``save_layer`` or undoes. ``answered`` gets the backend's
        ``SavedLayer.answered``, for the caller to call once it has answered (engine work for
        the next save waits for it, or goes on by itself a moment later)."""
        try:
            if start is None:
                with stopwatch.span("prepare"), self.records.db.session() as s:
                    start = self._start_of(s, self.records.get_mine(s, who, runtime_id), environment)
            parent_id, parent_image = start.parent_id, start.parent_image
            parent_ref, parent_digest = start.parent_ref, start.parent_digest
            state, since, number = start.state, start.since, start.number
            now = self.records.clock()
            labels = {
                "org.opencontainers.image.created": _oci_time(now),
                "org.opencontainers.image.base.digest": parent_digest,
                "org.opencontainers.image.base.name": parent_ref,
                "org.opencontainers.image.title": environment,
                "org.opencontainers.image.version": str(number),
                "envctl.environment": environment,
                "envctl.parent": parent_ref,
                "envctl.source-runtime": runtime_id,
                "envctl.author": author,
                **self.settings.runner_labels,  # the operator's own labels, e.g. a team
                **(extra_labels or {}),
            }
            if self.in_runtime is not None and self.in_runtime.enabled:  # no host storage: runner/saves/insave.py
                if early is not None:
                    _undo(early)
                values = self.secret_values(runtime_id) if secret_values is None else secret_values
                observer = SaveFilter(None if keep_caches else self.caches, values, allow_secrets)
                return save_in_runtime(
                    self.in_runtime, self.operations, op_id, runtime_id, environment, number, parent_id, labels,
                    writer=lambda s: writer_of(s, viewer_of(who).user_id), user_id=viewer_of(who).user_id,
                    message=message, author=author, tag=tag, keep_caches=keep_caches, observer=observer,
                    report_key=SAVE_LABEL,
                )  # fmt: skip
            with stopwatch.span("config"):
                config = trusted_config(self.backend, parent_image, parent_ref, labels)
            if extra_env:
                kept = [e for e in config.get("Env") or [] if e.split("=", 1)[0] not in extra_env]
                config["Env"] = kept + [f"{k}={v}" for k, v in extra_env.items()]
            repository = "envctl/" + environment
            image_tag = f"v{number}-{op_id[3:11]}"
            # What the save makes is noted before and after it is made: if envctl dies before the
            # version is recorded, the next start removes it (Operations.recover); a failed save
            # removes it at once (_save).
            pending = [f"{repository}:{image_tag}"]
            self.operations.phase(op_id, "committing", "snapshotting the filesystem", pending_images=pending)
            # before the save pauses the container, unless the backend says later
            saved_at_ns = early.asked_ns if early is not None else time.time_ns()
            with stopwatch.span("secrets"):
                values = self.secret_values(runtime_id) if secret_values is None else secret_values
            observer = SaveFilter(None if keep_caches else self.caches, values, allow_secrets)
            del values
            saved = self.backend.save_layer(
                state,
                config=config,
                repository=repository,
                tag=image_tag,
                version_image=parent_image,
                observer=observer,
                saved_at_ns=since,
                early=early,
            )
            # the container resumes meanwhile (the backend's ``resumed``): it is running again
            # before the save ends, whatever happens
            if saved.hold is not None and answered is not None:
                answered.append(saved.hold())
            try:
                image_id = saved.image.id
                baseline = {"saved_at_ns": saved.saved_at_ns or saved_at_ns}
                report = {
                    "caches_kept": keep_caches,
                    "left_out": saved.left_out,
                    "left_out_bytes": sum(c["bytes"] for c in saved.left_out.values()),
                    "allowed_secrets": observer.allowed(),
                }
                if not saved.lean:
                    report["note"] = "the engine's storage could not be read here: caches were not left out"
                pending.append(image_id)
                # noted before the version is recorded: a failed record (or envctl dying before it)
                # then removes the image by its id (a name alone would not go while a helper uses it)
                self.operations.phase(op_id, "recording", "recording the new version", pending_images=pending)
                with stopwatch.span("image-info"):
                    info = self.backend.image_info(image_id)
                    parent_info = self.backend.image_info(parent_image)
                if info is None:
                    raise BackendError("the saved image vanished before it was recorded")
                if info.layers > self.settings.save_compact_at_layers:  # well before overlay2's 128
                    self.operations.phase(op_id, "compacting", f"{info.layers} layers: squashing the chain into one")
                    squashed = self.backend.squash(image_id, config=config, repository=repository, tag=image_tag)
                    pending.append(squashed)
                    self.operations.phase(op_id, "recording", "recording the new version", pending_images=pending)
                    self.backend.remove_image(image_id)
                    image_id = squashed
                    info = self.backend.image_info(image_id) or info
                with stopwatch.span("record"), self.records.db.session() as s:
                    version, _created = envs_service.register_version(
                        s,
                        envs_service.NewVersion(
                            environment=environment,
                            image_id=image_id,
                            image_ref=f"{repository}:{image_tag}",
                            parent_id=parent_id,  # by its id: a parent gone meanwhile fails the record
                            message=message,
                            author=author,
                            size=info.size,
                            size_added=max(0, info.size - (parent_info.size if parent_info else 0)),
                            source_runtime_id=runtime_id,
                            labels={**labels, SAVE_LABEL: report},
                            tag="latest",
                        ),
                        # the one check that counts: in the transaction that records
                        writer_of(s, viewer_of(who).user_id),
                    )
                    if tag and tag != "latest":
                        envs_service.set_tag(s, version.environment, tag, version)
                    self.records.stand_on(s, runtime_id, version, baseline)
                    if recorded is not None:
                        recorded(s, version)
                    _ = version.ref  # load what the caller reads after the session
                    _ = version.environment.full_name
                return version
            finally:
                if saved.resumed is not None:
                    saved.resumed()
        except BaseException:
            if early is not None:
                _undo(early)  # the container resumed, unless save_layer took the pause over
            raise
