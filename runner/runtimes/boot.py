"""Booting a runtime: from a ``booting`` row to a container whose agent answers.

The boot worker (``Booter.boot``) runs on a pool thread under the runtime's lock:

1. keep the changes of a container left from before as a draft (a runtime started again from
   ``error``), apply the settings changed for the next boot (runner/runtimes/reboot.py), then read
   the row (still ``booting``?) and make the container's spec: the
   version's image, or the draft image when the runtime has unsaved changes from an earlier
   run (phase ``restoring``, logged); a version the engine lacks is pulled from the registry
   by its recorded digest and checked first (phase ``downloading``, runner/transfers/pushpull.py);
2. create and start the container (``backend.start``), labelled with this installation and
   runner so that nothing else ever takes it for its own;
   (first the runtime's mounts are made ready: runner/mounts/prepare.py)
3. wait for the agent to answer a ping on its channel (its Unix socket, or with
   ``ENVCTL_RUNNER_CHANNEL=tcp`` its address, authenticated with a credential made for this
   boot and handed over as a FIFO: runner/agentauth.py), checking now and then that the
   container still lives and that no stop asked to cancel the boot;
4. ``running``, with the boot time in the runner log.

The boot slot taken by ``Lifecycle.start`` is held until the row leaves ``booting``, so no more
than ``max_boots`` rows are ever ``booting`` at once (R31).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from envs.kit.errors import BackendError, EnvctlError
from envs.models import EnvironmentVersion
from runner.agentauth import Credential, hand_over, make_credential
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, RuntimeBackend, RuntimeSpec, Status
from runner.cells import store as cellstore
from runner.channel import AgentUnavailableError, wait_for_agent
from runner.concurrency import Concurrency
from runner.errors import GpuUnavailableError, NetworkPoolExhaustedError
from runner.identity import RunnerIdentity
from runner.models import Runtime
from runner.mounts.prepare import MountPreparer, mounted_note
from runner.mounts.streamed import restore_results, send_mounts, with_nodes
from runner.paths import RuntimePaths
from runner.runtimes import envvars
from runner.runtimes.machines import cuda_dir, get_machine_type
from runner.runtimes.reboot import apply_pending
from runner.runtimes.secret_uses import Delivery, RuntimeSecrets
from runner.runtimes.states import State
from runner.runtimes.store import Records, activity
from runner.saves.drafts import Drafts
from runner.settings import Settings
from runner.transfers.pushpull import Transfers

log = logging.getLogger("envctl.runner")


class _BootCancelledError(Exception):
    pass


class _ContainerDiedError(Exception):
    def __init__(self, exit_code: int | None, oom_killed: bool) -> None:
        super().__init__(f"exit code {exit_code}")
        self.exit_code = exit_code
        self.oom_killed = oom_killed


class Booter:
    def __init__(
        self,
        settings: Settings,
        identity: RunnerIdentity,
        records: Records,
        concurrency: Concurrency,
        backend: RuntimeBackend,
        paths: RuntimePaths,
        drafts: Drafts,
        mounts: MountPreparer,
        transfers: Transfers | None = None,
        secrets: RuntimeSecrets | None = None,
        ports_of: Callable[[str], tuple[int, ...]] | None = None,
    ) -> None:
        self.settings = settings
        self.ports_of = ports_of or (lambda _rid: ())  # an app runtime's port (runner/apps/store.py)
        self.identity = identity
        self.records = records
        self.concurrency = concurrency
        self.backend = backend
        self.paths = paths
        self.drafts = drafts
        self.mounts = mounts
        self.transfers = transfers
        self.secrets = secrets

    def spec(self, rt: Runtime) -> RuntimeSpec:
        """What the backend needs to make the runtime's container."""
        machine = get_machine_type(self.settings, rt.machine_type)
        return RuntimeSpec(
            runtime_id=rt.id,
            name=rt.name,
            image=rt.draft_image_id or rt.version.image_id,
            environment=rt.version.ref,
            machine=machine,
            state_dir=self.paths.state_dir(rt.id),
            agent_dir=self.paths.agent_dir,
            language=rt.language,
            env=envvars.plain(rt.env or {}),  # secrets never: they reach the agent (runner/runtimes/secret_uses.py)
            cuda_dir=cuda_dir(self.settings, rt.cuda) if rt.cuda and machine.gpus else None,
            labels={LABEL_INSTALLATION: self.identity.installation, LABEL_RUNNER: self.identity.name},
            channel=self.settings.runner_channel,
            ports=self.ports_of(rt.id),
        )

    def boot(self, runtime_id: str) -> None:
        """The boot worker; gives the boot slot back however it ends."""
        mine = self.concurrency.cancel_event(runtime_id)
        released = False

        def release() -> None:
            # before the runtime's lock is let go: a boot that follows (after a reset) may
            # register its own cancel event and need a slot as soon as it has the lock
            nonlocal released
            if not released:
                released = True
                self.concurrency.release_boot_slot()
                self.concurrency.drop_cancel(runtime_id, mine)

        try:
            with self.concurrency.runtime_lock(runtime_id):
                try:
                    self._boot_locked(runtime_id, mine or threading.Event())
                finally:
                    release()
        finally:
            release()

    def _boot_locked(self, runtime_id: str, cancel: threading.Event) -> None:
        begun = time.monotonic()
        records = self.records
        if not self._keep_what_is_left(runtime_id):
            return
        self._apply_pending(runtime_id)
        try:
            with records.db.session() as s:
                rt = s.get(
                    Runtime,
                    runtime_id,
                    options=[selectinload(Runtime.version).selectinload(EnvironmentVersion.environment)],
                )
                if rt is None or rt.state != State.BOOTING:
                    return
                spec = self.spec(rt)
                restoring = len(rt.draft_changes or []) if rt.draft_image_id else None
                owner_id, version_id, stored_mounts = rt.owner_id, rt.version_id, list(rt.mounts or [])
            # the runtime's secrets, opened before any container is made: a missing one fails at once
            secrets = self.secrets.prepare(runtime_id) if self.secrets is not None else None
        except EnvctlError as exc:
            reason = (
                "secret-unavailable" if exc.code in ("secret_unavailable", "secret_key_unavailable") else "boot-failed"
            )
            records.fail(runtime_id, reason, exc.message, {State.BOOTING})
            return
        if restoring is not None:
            try:  # a draft in the registry (made on any node) is pulled by its digest
                if self.drafts.ensure_local(runtime_id):
                    begun = time.monotonic()
            except EnvctlError as exc:
                records.fail(runtime_id, "draft-unavailable", exc.message, {State.BOOTING})
                return
        if self.backend.images_from_registry:  # the node pulls it: it must be in the registry
            try:  # a draft: the node pulls it from the draft repository (runner/saves/drafts.py)
                draft = self.drafts.registry_image(runtime_id) if restoring is not None else None
            except EnvctlError as exc:
                records.fail(runtime_id, "draft-unavailable", exc.message, {State.BOOTING})
                return
            try:
                spec = replace(
                    spec,
                    image=draft or self._registry_image(owner_id, version_id, runtime_id),
                    trusted_image=self._registry_image(owner_id, self._base_of(version_id), runtime_id),
                )
            except EnvctlError as exc:
                records.fail(runtime_id, exc.code.replace("_", "-"), exc.message, {State.BOOTING})
                return
        elif self.transfers is not None and restoring is None:
            try:  # a version the engine lacks is pulled first, by its recorded digest (R24)
                if self.transfers.ensure_local(owner_id, version_id, runtime_id=runtime_id):
                    begun = time.monotonic()  # the boot timeout counts from here, not from the download
            except EnvctlError as exc:
                records.fail(runtime_id, exc.code.replace("_", "-"), exc.message, {State.BOOTING})
                return
        mounted = self._mount(runtime_id, owner_id, stored_mounts, spec)
        if mounted is None:
            return
        spec = mounted
        values: dict[str, object] = {"change_baseline": {}}  # a new container: nothing of it is saved yet
        if restoring is not None:
            values["phase"] = "restoring"
        with records.tx() as s:
            records.set_in(s, runtime_id, **values)
            if restoring is not None:
                records.log(
                    s,
                    runtime_id,
                    event="restoring",
                    reason="draft",
                    message=f"restoring {restoring} unsaved changes from the draft",
                )
        if spec.state_dir.is_symlink():  # a pooled container's, from an earlier boot (runner/runtimes/pool.py)
            spec.state_dir.unlink()
        spec.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (spec.state_dir / "results").mkdir(exist_ok=True)
        self.paths.remove_socket(runtime_id)
        credential = make_credential(runtime_id) if spec.channel == "tcp" else None
        if credential is not None:  # for a backend that hands it over itself (a Swarm secret)
            spec = replace(spec, credential=credential.line(), on_phase=self._phase_of(runtime_id))
        try:
            with hand_over(spec.state_dir, credential) if credential is not None else contextlib.nullcontext():
                pong = self._start_and_wait(runtime_id, spec, credential, secrets, begun, cancel)
        except OSError as exc:  # the FIFO could not be made in the state directory
            records.fail(
                runtime_id, "backend-error", f"could not hand the runtime its credential: {exc}", {State.BOOTING}
            )
            return
        if pong is None:
            return
        took_ms = (time.monotonic() - begun) * 1000
        now = records.clock()
        with records.tx() as s:
            ok = records.transition(
                s,
                runtime_id,
                State.RUNNING,
                "agent-answered",
                f"agent answered after {took_ms:.0f} ms",
                expect={State.BOOTING},
                details={
                    "boot_ms": round(took_ms, 1),
                    "agent_pid": pong.get("pid"),
                    **({"index_wait_s": pong["index_wait_seconds"]} if "index_wait_seconds" in pong else {}),
                },
                values={"booted_at": now, **activity("boot", now), "phase": None},
            )
        if not ok:
            log.info("runtime %s left booting while it booted; the stop in flight removes it", runtime_id)

    def _start_and_wait(
        self,
        runtime_id: str,
        spec: RuntimeSpec,
        credential: Credential | None,
        secrets: Delivery | None,
        begun: float,
        cancel: threading.Event,
    ) -> dict[str, Any] | None:
        """Create and start the container, wait for its agent's first answer and hand it the
        secrets; the pong, or None when the boot ended otherwise (the row says why)."""
        records = self.records
        try:
            backend_state = self.backend.start(spec)
        except (GpuUnavailableError, NetworkPoolExhaustedError) as exc:  # reasons of their own
            records.fail(runtime_id, exc.code.replace("_", "-"), exc.message, {State.BOOTING})
            return None
        except EnvctlError as exc:
            records.fail(runtime_id, "backend-error", exc.message, {State.BOOTING})
            return None
        agent = backend_state.get("agent") or {}
        if credential is not None and self.paths.links is not None:
            # the address and the sealed credential on the row: any server reaches the agent
            backend_state["agent"] = self.paths.links.record(credential, str(agent["host"]), int(agent["port"]))
        pinned = dict(backend_state.get("volume_nodes") or {})  # target -> node (swarm_mounts)
        with records.tx() as s:
            records.set_in(s, runtime_id, backend_state=backend_state)
            if pinned and (row := s.get(Runtime, runtime_id)) is not None:
                records.set_in(s, runtime_id, mounts_used=with_nodes(row.mounts_used or [], pinned))
            records.log(
                s,
                runtime_id,
                event="container-created",
                reason="boot",
                message=f"container {backend_state.get('container_name', '')} started"
                + (f" on node {backend_state['node']}" if backend_state.get("node") else "")
                + (f", its agent on tcp {agent['host']}:{agent['port']}" if credential is not None else "")
                + (f"; pinned to the node of its named volumes ({', '.join(sorted(pinned))})" if pinned else ""),
                details={
                    "container_id": backend_state.get("container_id") or backend_state.get("service_id"),
                    "channel": spec.channel,
                    **({"node": backend_state["node"]} if backend_state.get("node") else {}),
                    **({"volume_nodes": pinned} if pinned else {}),
                },
            )

        def alive() -> None:
            if cancel.is_set():
                raise _BootCancelledError()
            status = self.backend.poll(backend_state)
            if status.status is not Status.RUNNING:
                raise _ContainerDiedError(status.exit_code, status.oom_killed)

        deadline = begun + self.settings.runner_boot_timeout
        if self.backend.images_from_registry:  # start() waited for the node's pull, bounded on its own
            deadline = max(deadline, time.monotonic() + self.settings.runner_boot_timeout / 2)
        target = self.paths.agent(runtime_id, backend_state)
        try:
            pong = wait_for_agent(target, deadline, alive=alive)
        except _BootCancelledError:
            return None  # a stop was requested; the stop worker removes the container
        except (_ContainerDiedError, AgentUnavailableError, BackendError) as exc:
            self._boot_failed(runtime_id, backend_state, exc)
            return None
        try:
            if secrets is not None:  # over the agent's channel, never through Docker (R6)
                secrets.send(target)
            if not self.backend.host_paths:  # git/S3 mounts prepared here, streamed in (runner/mounts/streamed.py)
                send_mounts(target, spec.mounts, self._progress(runtime_id))
                restore_results(target, spec.state_dir / "results")
            if self.drafts.in_registry:  # saves judge deletions against the boot's index (runner/saves/drafts.py)
                pong["index_wait_seconds"] = round(self.drafts.wait_index(target, deadline), 4)
        except EnvctlError as exc:
            self._boot_failed(runtime_id, backend_state, exc)
            return None
        return pong

    def _mount(
        self, runtime_id: str, owner_id: str, stored: list[dict[str, object]], spec: RuntimeSpec
    ) -> RuntimeSpec | None:
        """The runtime's mounts made ready (runner/mounts/prepare.py) and added to the spec,
        what they hold kept on the row; None (the runtime in ``error``) when one cannot be."""
        try:
            binds, used = self.mounts.prepare(stored, owner_id, runtime_id, self._progress(runtime_id))
        except EnvctlError as exc:
            self.records.set(runtime_id, progress=None)
            self.records.fail(runtime_id, "mount-failed", exc.message, {State.BOOTING})
            return None
        self.records.set(runtime_id, mounts_used=used, phase=None, progress=None)
        if used:
            with self.records.tx() as s:
                self.records.log(s, runtime_id, event="mounted", reason="boot", message=mounted_note(used))
        if used:  # cells queued before the boot ran on what it mounted
            cellstore.set_queued_mounts(self.records.db, runtime_id, used)
        return replace(spec, mounts=tuple(binds))

    def _base_of(self, version_id: int) -> int:
        """The envctl base image at the root of the version's lineage: made by ``envctl base
        build`` (author ``envctl``, labelled ``envctl.base-image``), never a user's save or import.
        A lineage that does not start at one (an imported environment) gets the ``bash`` base."""
        with self.records.db.session() as s:
            v = s.get(EnvironmentVersion, version_id)
            seen = 0
            while v is not None and v.parent is not None and seen < 1000:
                v, seen = v.parent, seen + 1
            if v is not None and _is_base(v):
                return v.id
            authored = s.scalars(select(EnvironmentVersion).where(EnvironmentVersion.author == "envctl"))
            found = [b for b in authored if _is_base(b)]
            found.sort(key=lambda b: (b.environment.full_name != "bash", -b.id))
            if not found:
                raise BackendError(
                    "no envctl base image is registered to run the network guard with; run `envctl base build`"
                )
            return found[0].id

    def helper_image(self) -> str:
        """The ``bash`` base in the registry (``repo@digest``, pushed by envctl first when needed):
        what envctl's own helper tasks on a cluster's nodes run (runner/backends/swarm_attach.py)."""
        return self._registry_image("", self._base_of(0), None)

    def _registry_image(self, owner_id: str, version_id: int, runtime_id: str | None) -> str:
        """``<repository>@<manifest digest>`` of the version in the registry, pushed first by
        envctl when it is not there yet (a backend whose nodes pull it, ``images_from_registry``)."""
        with self.records.db.session() as s:
            v = s.get(EnvironmentVersion, version_id)
            if v is None:
                raise BackendError("the runtime's version is gone")
            repository, digest = v.environment.full_name, v.registry_digest
        if not digest:
            if self.transfers is None:
                raise BackendError(f"the {self.backend.name} backend needs a registry to pull versions from")
            # envctl's own push (a push grant for that repository): the owner may run the version
            # (its create checked that they see it) without any push right on its repository
            digest = self.transfers.push(owner_id, version_id, runtime_id=runtime_id, as_envctl=True)[0]
        return f"{repository}@{digest}"

    def _phase_of(self, runtime_id: str) -> Callable[[str | None], None]:
        def tell(phase: str | None) -> None:
            with contextlib.suppress(EnvctlError):
                self.records.set(runtime_id, phase=phase if phase in ("downloading",) else None)

        return tell

    def _progress(self, runtime_id: str) -> Callable[[str, tuple[int, int] | None], None]:
        def report(phase: str, done_total: tuple[int, int] | None) -> None:
            progress = {"done": done_total[0], "total": done_total[1]} if done_total else None
            self.records.set(runtime_id, phase=phase, progress=progress)

        return report

    def _apply_pending(self, runtime_id: str) -> None:
        """Settings changed for the next boot become the runtime's own, logged."""
        with self.records.tx() as s:
            rt = s.get(Runtime, runtime_id, with_for_update=True)
            if rt is None or rt.state != State.BOOTING or not rt.pending:
                return
            values, applied, kept = apply_pending(rt)
            self.records.change(rt, **values)
            if applied:
                self.records.log(s, runtime_id, event="settings-applied", reason="boot", message="; ".join(applied))
            for note in kept:
                self.records.log(s, runtime_id, event="settings-pending", reason="draft", message=note)

    def _keep_what_is_left(self, runtime_id: str) -> bool:
        """A container still on the row (a runtime started again from ``error``: its container
        exited, or its agent stopped answering) holds the user's work until it is replaced:
        keep its changes as a draft first (the boot then restores them), and remove it. False
        (and the runtime in ``error``, the container kept) when the draft cannot be made."""
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            left = dict(rt.backend_state or {}) if rt is not None and rt.state == State.BOOTING else {}
        if not left:
            return True
        try:
            self.drafts.make_draft(runtime_id, reason="boot", state=left)
            self.backend.stop(left, timeout=1)
        except EnvctlError as exc:
            self.records.fail(
                runtime_id,
                "draft-failed",
                f"the container left from before holds unsaved changes that could not be kept ({exc.message}); "
                "it was not replaced: start the runtime again to retry",
                {State.BOOTING},
            )
            return False
        self.records.set(runtime_id, backend_state={})
        return True

    def _boot_failed(self, runtime_id: str, backend_state: dict[str, object], exc: Exception) -> None:
        """The container died or its agent never answered: say why, with its last output.
        The container goes: it holds nothing of the user's since the boot began."""
        tail = self.backend.logs_tail(backend_state)
        if isinstance(exc, _ContainerDiedError):
            reason = "oom" if exc.oom_killed else "container-exited"
            message = f"the container exited with code {exc.exit_code} before its agent answered"
        elif isinstance(exc, AgentUnavailableError):
            reason = "boot-timeout"
            message = f"the agent did not answer within {self.settings.runner_boot_timeout:g} s"
        else:
            assert isinstance(exc, EnvctlError)
            reason, message = "backend-error", exc.message
        if tail.strip():
            message += "; last output: " + tail.strip()[-800:]
        try:
            self.backend.stop(backend_state, timeout=1)
            backend_state = {}
        except EnvctlError:
            pass
        self.records.fail(runtime_id, reason, message, {State.BOOTING}, values={"backend_state": backend_state})


def _is_base(v: EnvironmentVersion) -> bool:
    return v.author == "envctl" and bool((v.labels or {}).get("envctl.base-image")) and v.parent_id is None
