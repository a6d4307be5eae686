"""Versions to and from the registry, for the runner: push after a save, pull before a boot.

``push`` sends a version's image to the registry (``registry/image_transfer.py``) as the user who
asks and records the manifest digest on the version; ``ensure_local`` pulls a version the
engine lacks by that digest and checks it (R24) before anything boots from it. While either
runs for a runtime, the runtime shows the phase ``uploading`` or ``downloading`` with bytes done
and total (``Runtime.progress``); an operation, when there is one, shows the same.

Transfers happen only when a registry is configured (the setting ``registry`` is not ``off``)
and the backend's images can travel (the Docker backend).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs import service as envs_service
from envs.kit.errors import EnvctlError
from envs.models import EnvironmentVersion
from registry import image_transfer as transfer
from registry import visibility
from registry.errors import NoRegistryError, NotPushedError, TransferError
from runner.backends.base import RuntimeBackend
from runner.models import Operation
from runner.operations import Operations
from runner.runtimes.states import Phase
from runner.runtimes.store import Records, Who, reader_for, viewer_of
from runner.settings import Settings

log = logging.getLogger("envctl.transfers")

Report = Callable[[int, int], None]


@dataclass(frozen=True)
class _Version:
    id: int
    ref: str
    environment: str
    number: int
    image_id: str
    image_ref: str
    registry_digest: str | None


class Transfers:
    def __init__(
        self,
        settings: Settings,
        records: Records,
        backend: RuntimeBackend,
        operations: Operations,
        *,
        submit: Callable[..., Any],
    ) -> None:
        self.settings = settings
        self.records = records
        self.backend = backend
        self.operations = operations
        self.submit = submit
        self._locks = transfer.Locks()

    # ------------------------------------------------------------------ the requests (operations)
    def request_push(self, who: Who, ref: str) -> Operation:
        """``POST /environments/{ref}/push``: an operation that pushes the version ``ref``
        names for ``who`` (phase ``uploading``, bytes in its result while it runs)."""
        user_id = viewer_of(who).user_id
        version = self._resolve(who, ref)
        self._target(version.environment)  # no registry: refused at once
        op = self.operations.create(user_id, "push", f"pushing {version.ref}")
        self.submit(
            self.run_operation, op.id, "push", version.ref, lambda report: self._push_result(user_id, version, report)
        )
        return op

    def request_pull(self, who: Who, ref: str) -> Operation:
        """``POST /environments/{ref}/pull``: an operation that pulls the version ``ref``
        names for ``who`` by its recorded digest (already here: finished at once)."""
        user_id = viewer_of(who).user_id
        version = self._resolve(who, ref)
        client, _target = self._target(version.environment)
        if transfer.has_image(client, version.image_id):
            return self.operations.create(
                user_id,
                "pull",
                f"{version.ref} is already here",
                result={"version": version.ref, "pulled": False, "image_id": version.image_id},
                finished=True,
            )
        if not version.registry_digest:
            raise self._not_pushed(version)
        op = self.operations.create(user_id, "pull", f"pulling {version.ref}")
        self.submit(
            self.run_operation, op.id, "pull", version.ref, lambda report: self._pull_result(user_id, version, report)
        )
        return op

    def _push_result(self, user_id: str, version: _Version, report: Report) -> dict[str, Any]:
        digest, progress = self.push(user_id, version.id, report=report)
        return {"version": version.ref, "registry_digest": digest, "bytes": progress.done, "total": progress.total}

    def _pull_result(self, user_id: str, version: _Version, report: Report) -> dict[str, Any]:
        progress = self.pull(user_id, version.id, report=report)
        return {
            "version": version.ref,
            "pulled": True,
            "image_id": version.image_id,
            "registry_digest": version.registry_digest,
            "bytes": progress.done,
            "total": progress.total,
        }

    def run_operation(self, op_id: str, kind: str, ref: str, work: Callable[[Report], dict[str, Any]]) -> None:
        """Run ``work`` for the operation ``op_id`` (a push, or a pull or import of the version
        ``ref``): its phase and bytes while it runs, its result or error at the end."""
        phase = Phase.UPLOADING if kind == "push" else Phase.DOWNLOADING

        def report(done: int, total: int) -> None:
            self.operations.phase(op_id, phase.value, f"{phase.value} {ref}", result={"done": done, "total": total})

        try:
            result = work(report)
        except Exception as exc:  # noqa: BLE001  (recorded on the operation, logged when unexpected)
            self.operations.fail(op_id, exc, kind)
            return
        verb = {"push": "pushed", "pull": "pulled"}.get(kind, kind + "ed")
        self.operations.finish(
            op_id, "succeeded", result=result, message=f"{verb} {ref} ({result['bytes']} bytes travelled)"
        )

    def lock(self, image_id: str) -> threading.Lock:
        """The lock one image's pulls take, so that a boot and an import pull it once."""
        return self._locks.of(image_id)

    def _resolve(self, who: Who, ref: str) -> _Version:
        """The version ``ref`` means for ``who`` (``registry/visibility.py``)."""
        with self.records.db.session() as s:
            version_id = visibility.resolve(s, ref, reader_for(s, who), "ref").id
        return self._version(version_id)

    @staticmethod
    def _not_pushed(v: _Version) -> NotPushedError:
        return NotPushedError(
            f"{v.ref} is not on this machine and was never pushed to the registry; push it from "
            "where it was saved (`envctl push REF`)",
            details={"version": v.ref},
        )

    @property
    def enabled(self) -> bool:
        return transfer.registry_host(self.settings) is not None and self.backend.engine_client() is not None

    def _version(self, version_id: int) -> _Version:
        with self.records.db.session() as s:
            v = s.get(EnvironmentVersion, version_id)
            if v is None:
                raise TransferError("the version is gone", details={"version_id": version_id})
            return _Version(v.id, v.ref, v.environment.full_name, v.number, v.image_id, v.image_ref, v.registry_digest)

    def _target(self, environment: str) -> tuple[object, transfer.Target]:
        client = self.backend.engine_client()
        target = transfer.target_of(self.settings, environment)
        if client is None or target is None:
            raise NoRegistryError(
                "no registry to transfer through: the setting registry is off (ENVCTL_REGISTRY), "
                f"or the {self.backend.name} backend's images cannot travel",
                details={"registry": self.settings.registry or "managed"},
            )
        return client, target

    def _reporter(self, runtime_id: str | None, phase: Phase, report: Report | None) -> Report:
        def tell(done: int, total: int) -> None:
            if runtime_id is not None:
                self.records.set(runtime_id, phase=phase.value, progress={"done": done, "total": total})
            if report is not None:
                report(done, total)

        return tell

    def recover(self) -> None:
        """At start: a transfer this runner was doing when it stopped ended with it; its
        runtimes no longer show ``uploading`` or ``downloading`` (their operations end
        ``interrupted`` through ``Operations.recover``)."""
        self.records.clear_phases([Phase.UPLOADING.value, Phase.DOWNLOADING.value])

    def _clear(self, runtime_id: str | None, phase: Phase) -> None:
        if runtime_id is None:
            return
        self.records.clear_phase(runtime_id, phase.value)

    def _log(self, runtime_id: str | None, event: str, text: str, progress: transfer.Progress, digest: str) -> None:
        """The runner log's line of a transfer: bytes that travelled, layers that did not."""
        if runtime_id is None:
            return
        with contextlib.suppress(Exception):  # the runtime may be gone (deleted meanwhile): the transfer stands
            self._log_line(runtime_id, event, text, progress, digest)

    def _log_line(self, runtime_id: str, event: str, text: str, progress: transfer.Progress, digest: str) -> None:
        self.records.log_now(
            runtime_id,
            event=event,
            reason="registry",
            message=f"{text}: {progress.done} of {progress.total} bytes, {len(progress.skipped)} layers already there",
            details={
                "bytes": progress.done,
                "total": progress.total,
                "skipped_layers": len(progress.skipped),
                "digest": digest,
            },
        )

    # ------------------------------------------------------------------ push
    def push(
        self,
        user_id: str,
        version_id: int,
        *,
        runtime_id: str | None = None,
        report: Report | None = None,
        as_envctl: bool = False,
    ) -> tuple[str, transfer.Progress]:
        """Push the version as ``user_id``; the manifest digest (recorded on the version) and
        what travelled. ``as_envctl``: the push a boot (or a save inside the runtime) needs of a
        version ``user_id`` may run, made by envctl itself with a push grant for exactly that
        repository (``registry/pull_grants.py``), not with the user's registry rights, which
        may hold no push on it (a base image's repository is its admins' to push); with a
        registry that is not envctl's managed one, the user's rights as before."""
        v = self._version(version_id)
        client, target = self._target(v.environment)
        tell = self._reporter(runtime_id, Phase.UPLOADING, report)
        tell(0, 0)
        progress = transfer.Progress(tell)
        grant = transfer.grant_auth(self.settings, target) if as_envctl else None
        signed_in = contextlib.nullcontext(grant) if grant else transfer.engine_auth(self.records.db, user_id, target)
        try:
            with signed_in as auth:
                digest = transfer.push(client, v.image_id, target, str(v.number), auth, progress)
        finally:
            self._clear(runtime_id, Phase.UPLOADING)
        self._log(runtime_id, "uploaded", f"uploaded {v.ref} to {target.name}", progress, digest)
        with self.records.db.session() as s:
            row = s.get(EnvironmentVersion, version_id)
            if row is not None:
                envs_service.record_pushed(s, row, digest)
        log.info("pushed %s to %s@%s", v.ref, target.name, digest)
        return digest, progress

    # ------------------------------------------------------------------ pull
    def ensure_local(self, user_id: str, version_id: int, *, runtime_id: str | None = None) -> bool:
        """Before a boot: pull the version when the engine lacks it (by its recorded digest,
        checked); True when it pulled. Without a registry or a recorded digest nothing is pulled
        (the boot then says the image is missing)."""
        v = self._version(version_id)
        client = self.backend.engine_client()
        if client is None or transfer.registry_host(self.settings) is None or not v.registry_digest:
            return False  # nothing to pull it from: the boot says the image is missing, as before
        if transfer.has_image(client, v.image_id):
            return False
        self.pull(user_id, version_id, runtime_id=runtime_id)
        return True

    def pull_ref(self, user_id: str, ref: str) -> transfer.Progress:
        """Pull the version ``ref`` names (``acme/ml@3``) as ``user_id`` (pulling ahead)."""
        return self.pull(user_id, self._resolve(user_id, ref).id)

    def pull(
        self, user_id: str, version_id: int, *, runtime_id: str | None = None, report: Report | None = None
    ) -> transfer.Progress:
        """Pull the version by its recorded digest and check it (R24); what travelled (nothing
        when the engine has it already)."""
        v = self._version(version_id)
        if not v.registry_digest:
            raise self._not_pushed(v)
        client, target = self._target(v.environment)
        progress = transfer.Progress()
        with self._locks.of(v.image_id):
            if transfer.has_image(client, v.image_id):
                return progress
            tell = self._reporter(runtime_id, Phase.DOWNLOADING, report)
            tell(0, 0)
            progress.report = tell
            repository, _, tag = v.image_ref.rpartition(":")
            try:
                with transfer.engine_auth(self.records.db, user_id, target) as auth:
                    transfer.pull(
                        client,
                        target,
                        v.registry_digest,
                        auth,
                        progress,
                        image_id=v.image_id,
                        tag_as=(repository, tag) if repository and tag else None,
                    )
            finally:
                self._clear(runtime_id, Phase.DOWNLOADING)
            self._log(runtime_id, "downloaded", f"downloaded {v.ref} from {target.name}", progress, v.registry_digest)
        log.info("pulled %s from %s", v.ref, target.at(v.registry_digest))
        return progress


def push_after_save(
    transfers: Transfers | None,
    operations: Operations,
    op_id: str,
    user_id: str,
    runtime_id: str,
    version: EnvironmentVersion,
) -> dict[str, object]:
    """A save into a team's environment pushes the new version when a registry is configured
    (the runtime and the save's operation show ``uploading`` with bytes). What the save's result
    gets: ``pushed`` and the ``registry_digest``, or the reason the push failed; a failed push
    keeps the local version (``envctl push REF`` sends it later)."""
    team = version.environment.namespace
    if transfers is None or not team or not transfers.enabled:
        return {}

    def report(done: int, total: int) -> None:
        operations.phase(
            op_id, Phase.UPLOADING.value, f"uploading {version.ref}", result={"done": done, "total": total}
        )

    try:
        digest, _progress = transfers.push(user_id, version.id, runtime_id=runtime_id, report=report)
    except EnvctlError as exc:
        log.warning("the push of %s failed: %s", version.ref, exc.message)
        return {"pushed": False, "push_error": exc.to_dict()}
    except Exception as exc:  # the save stands whatever the push met; the operation must end
        log.exception("the push of %s failed unexpectedly", version.ref, exc_info=exc)
        return {"pushed": False, "push_error": {"code": "internal", "message": "see envctl's log", "details": {}}}
    return {"pushed": True, "registry_digest": digest}


def pushed_text(pushed: dict[str, object]) -> str:
    if not pushed:
        return ""
    if pushed.get("pushed"):
        return f"; pushed to the registry ({pushed['registry_digest']})"
    error = pushed.get("push_error") or {}
    message = error.get("message", "") if isinstance(error, dict) else ""
    return f"; not pushed to the registry ({message}): the version is kept here, `envctl push REF` sends it later"
