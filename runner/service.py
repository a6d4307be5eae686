"""The runner: the facade the API uses, and the one place that wires the runner's rooms.

Which file owns what (each receives what it needs through its constructor; none imports this
module):

=========================  ====================================================================
``identity.py``            the installation's id, this runner's name, its lease and heartbeat,
                           and whether other runners are alive
``concurrency.py``         locks, boot slots, the worker pool, in-flight claims, cancel events
``operations.py``          long work a 202 points at (saves, builds, transfers); recovery
``uninstall.py``           what an installation holds on its engine, and its removal
``channel.py``             the connection to a runtime's agent (``agentauth.py``: its
                           per-boot credential)
``runtimes/store.py``      the runtimes store, alone writing ``runtimes`` rows and their log:
                           compare-and-set transitions, activity, create and delete, ownership
                           checks, waiting for a state (``states.py``: the state machine)
``runtimes/settings.py``   create a runtime, change its settings (PATCH; ``reboot.py``: what
                           needs a reboot and waits for it; ``envvars.py``: variables;
                           ``machines.py``: machine types, CUDA; ``kernelspecs.py``)
``runtimes/secret_uses.py``  a runtime's team secrets: references in ``env``, handed to the
                           agent at boot, out of date, and the values its saves are searched for
``runtimes/lifecycle.py``  start, stop, reset, delete (in the order that leaves no writer
                           behind); the stop worker
``runtimes/boot.py``       the boot worker: container up, agent answering, ``running``
``runtimes/reconcile.py``  the database made to agree with the engine (pure plan, then actions)
``runtimes/housekeeping.py``  the loop: reconciliation, idle shutdown (``idle.py``: the
                           decision) and runtimes whose client lease ran out (``leases.py``)
``cells/store.py``         the cells store, alone writing executions, outputs, result files
``cells/executions.py``    cells: submit (numbered in the store), read, follow, interrupt,
                           recover
``cells/workers.py``       the per-runtime worker that runs cells in order and records their
                           ends
``cells/streams.py``       what is known of hot executions in memory, and who listens
``cells/results.py``       files cells write under /results, kept by content
                           (``result_files.py``: the scan; ``result_stores.py``: stores)
``saves/snapshots.py``     saves: a runtime's filesystem becoming a version
``saves/changes.py``       unsaved changes: the list, and the flag pages poll
``saves/drafts.py``        unsaved changes kept as an image across stops and crashes
``saves/scans.py``         what a save leaves out (caches) and refuses (secrets, credentials)
``saves/imageconfig.py``   the trusted image configuration of saves and drafts
``saves/insave.py``        saves made inside the runtime: the agent's layer stream, checked
                           and streamed to the registry
``saves/builds.py``        spec files built as cells on a temporary runtime
``saves/archives.py``      export and load of a version with its lineage
``transfers/pushpull.py``  versions to and from the registry: push after a save, pull before
                           a boot
``transfers/imports.py``   a version of another envctl server: pulled from its registry,
                           recorded here
``mounts/``                a runtime's mounts: validation, the git and S3 caches a boot fills,
                           named volumes (``named_volumes.py``: list, create, delete)
``backends/``              the container engines behind it all (docker, fake)
``runtimes/pool.py``       pooled runtimes, claimed once (``pool_overview.py``: what the pool holds)
``runtimes/attach.py``     containers envctl did not make, attached to and detached from
``runtimes/drain.py``      a node drained: its runtimes stopped with a draft first
``runtimes/checkpoints.py``
                           periodic drafts of running runtimes after cells (opt-in, Swarm)
``apps/``                  notebooks deployed as apps: ``deploy.py`` (bundles, deployments:
                           what the API asks), ``server.py`` (the app server: the team event
                           stream followed, runtimes booted, cells run, restarts),
                           ``store.py`` (alone writing the apps tables), ``bundles.py``
=========================  ====================================================================
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.errors import EnvctlError, InvalidInputError
from registry.team_secrets import SecretBox
from runner.agentauth import AgentLinks
from runner.apps.deploy import AppDeployments
from runner.apps.server import AppServer
from runner.apps.store import AppStore
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, FoundContainer, RuntimeBackend
from runner.cells.executions import ExecutionManager
from runner.cells.results import ResultCollector
from runner.cells.streams import Feeds
from runner.cells.workers import CellWorkers
from runner.concurrency import Concurrency
from runner.identity import Lease, Liveness, RunnerIdentity, RunnerLiveness, installation_id, runner_name
from runner.models import Operation, Runtime, RuntimeLogEntry
from runner.mounts.named_volumes import Volumes
from runner.mounts.prepare import MountPreparer
from runner.operations import Operations
from runner.paths import RuntimePaths
from runner.runtimes import envvars, idle, leases
from runner.runtimes.attach import NOMINAL_ENVIRONMENT as attach_nominal_environment
from runner.runtimes.attach import Attach, container_of
from runner.runtimes.boot import Booter
from runner.runtimes.checkpoints import Checkpoints
from runner.runtimes.drain import NodeDrain
from runner.runtimes.housekeeping import Housekeeping
from runner.runtimes.lifecycle import Lifecycle
from runner.runtimes.pool import Pool
from runner.runtimes.pressure import PressureDrafts
from runner.runtimes.reconcile import Action, Reconciler
from runner.runtimes.secret_uses import RuntimeSecrets
from runner.runtimes.settings import RuntimeChanges, Runtimes
from runner.runtimes.states import State
from runner.runtimes.store import Records, Who
from runner.saves.archives import Archives
from runner.saves.builds import Builds
from runner.saves.changes import ChangeInfo, Changes
from runner.saves.drafts import Drafts
from runner.saves.insave import InRuntimeSaves
from runner.saves.scans import CacheRules
from runner.saves.snapshots import Snapshots
from runner.settings import Settings
from runner.transfers.imports import Imports
from runner.transfers.pushpull import Transfers

log = logging.getLogger("envctl.runner")
CLOSE_WRITES_WAIT = 5.0  # seconds a closing runner waits for cells' outputs and ends to be stored

__all__ = ["RunnerService", "RuntimeChanges", "RuntimeStatus"]


@dataclass(frozen=True)
class RuntimeStatus:
    """What the API shows beside a runtime's row: facts from memory (this runner's own
    runtimes) or from the store (another runner's)."""

    busy: bool
    saving: bool
    runner_alive: bool
    unreachable: str | None  # why this server cannot act on the runtime, when it cannot
    idle: idle.IdleDecision | None
    idle_timeout: int
    unsaved_changes: bool | None
    secrets_outdated: builtins.list[str] = dataclasses.field(default_factory=builtins.list)
    lease: leases.LeaseStatus | None = None  # the client's lease, if the runtime has one


class RunnerService:
    """One runner: owns the runtimes whose ``runner`` is its name."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: RuntimeBackend,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend
        self.clock = clock
        self.identity = RunnerIdentity(installation_id(db), runner_name(settings))
        self.runner = self.identity.name
        self.lease = Lease(
            db,
            self.runner,
            backend=backend.name,
            clock=clock,
            interval=settings.runner_heartbeat_interval,
            stale_after=settings.runner_stale_after,
        )
        self.liveness = Liveness(db, clock, settings.runner_stale_after, self.runner)
        self.records = records = Records(db, clock, self.liveness)
        self.concurrency = concurrency = Concurrency(settings.runner_max_boots)
        self.secret_box = SecretBox.from_settings(settings)
        if settings.runner_channel not in backend.channels:
            raise InvalidInputError(
                f"the {backend.name} backend cannot start runtimes with the {settings.runner_channel!r} agent "
                f"channel (ENVCTL_RUNNER_CHANNEL); it can: {', '.join(backend.channels)}",
                field="runner_channel",
            )
        self.paths = paths = RuntimePaths(
            settings.runtimes_dir, backend, records=records, links=AgentLinks(self.secret_box)
        )
        self.changes = Changes(backend, paths, CacheRules.of(settings.save_caches))
        self.drafts = drafts = Drafts(settings, records, backend, self.changes)
        self.operations = operations = Operations(records, backend, delete_runtime=self.delete)
        self.secrets = secrets = RuntimeSecrets(db, self.secret_box)
        self.transfers = transfers = Transfers(settings, records, backend, operations, submit=concurrency.submit)
        self.imports = Imports(records, backend, operations, transfers, settings.import_allow_hosts)
        self.snapshots = snapshots = Snapshots(
            settings,
            records,
            backend,
            operations,
            submit=concurrency.submit,
            transfers=transfers,
            secret_values=secrets.values_of,
        )
        snapshots.in_runtime = InRuntimeSaves(
            settings,
            records,
            backend,
            paths.agent,
            ensure_pushed=lambda user, vid: transfers.push(user, vid, as_envctl=True)[0],
        )
        drafts.in_runtime = snapshots.in_runtime  # drafts go where saves go (runner/saves/drafts.py)
        backend.release_agent = drafts.release_agent  # Swarm: the agent's SIGTERM waits for a draft unless told
        backend.report_event = self._report_event  # Kubernetes: the pods' events in the runner log
        self.results = ResultCollector(settings, db, clock, paths)
        self.mounts = mounts = MountPreparer(settings, self.identity.installation, backend)
        self.feeds = Feeds()
        self.cells = CellWorkers(
            settings,
            db,
            records,
            self.feeds,
            paths,
            start=lambda owner_id, runtime_id: self.lifecycle.begin(owner_id, runtime_id),
            after_execution=self._after_execution,
            closing=concurrency.closing,
        )
        if backend.images_from_registry and settings.runner_memory_pressure > 0:  # where crashes keep nothing
            backend.memory_watch = settings.runner_memory_pressure / 100  # runner/agent/memwatch.py
            self.cells.on_pressure = PressureDrafts(records, concurrency, drafts, paths.agent).on_pressure
        app_store = AppStore(db)
        self.pool = pool = Pool(
            settings, self.identity, records, concurrency, backend, paths, secrets, ports_of=app_store.ports_of_runtime
        )
        self.attach = attach = Attach(settings, records, backend, paths, self.runner)

        def serve(rt: Runtime) -> bool:
            """An attached runtime's container, or a pooled one, for a stopped runtime (False:
            it boots the ordinary way)."""
            if container_of(rt) is not None:
                return attach.serve(rt.id)
            return pool.enabled and pool.serve(rt.id)

        def housekeep(found: builtins.list[FoundContainer]) -> builtins.list[FoundContainer]:
            attach.check_alive()
            return pool.reconcile(found)

        booter = Booter(
            settings,
            self.identity,
            records,
            concurrency,
            backend,
            paths,
            drafts,
            mounts,
            transfers=transfers,
            secrets=secrets,
            ports_of=app_store.ports_of_runtime,  # an app runtime's port, published where needed
        )
        identity = {LABEL_INSTALLATION: self.identity.installation, LABEL_RUNNER: self.identity.name}
        backend.wire_attach(booter.helper_image, identity)  # Swarm: helper tasks on a node (swarm_attach)
        self.lifecycle = lifecycle = Lifecycle(
            settings,
            records,
            concurrency,
            backend,
            paths,
            drafts,
            booter,
            mounts,
            self.cells,
            is_saving=snapshots.is_saving,
            on_deleted=self._deleted,
            serve_pooled=serve,
            detach=attach.detach,
            on_deleting=pool.gone.note if pool.hot_budget else None,
        )
        self.runtimes = runtimes = Runtimes(settings, records, backend.name)
        self.executions = executions = ExecutionManager(db, records, self.feeds, self.cells, clock)
        self.reconciler = Reconciler(
            self.identity,
            records,
            concurrency,
            backend,
            paths,
            drafts,
            is_saving=snapshots.is_saving,
            secrets=secrets,
            remap=housekeep,
        )
        self.housekeeping = Housekeeping(
            settings,
            records,
            concurrency,
            self.reconciler,
            stop_now=lifecycle.stop_now,
            is_busy=executions.is_busy,
            is_saving=snapshots.is_saving,
            acting=lambda: not self.lease.lost.is_set(),
            delete_runtime=lifecycle.delete,
            checkpoints=self._checkpoints(
                records, concurrency, backend, is_busy=executions.is_busy, is_saving=snapshots.is_saving
            ),
        )
        self.drain = NodeDrain(records, concurrency, backend, stop_now=lifecycle.stop_now)
        self.builds = Builds(
            settings, records, runtimes, lifecycle, executions, snapshots, operations, submit=concurrency.submit
        )
        self.archives = Archives(db, backend, settings.data_dir / "tmp")
        self.apps = apps = AppDeployments(settings, app_store, self.secret_box)
        self.app_server = AppServer(
            settings,
            apps.store,
            self.secret_box,
            apps.read_bundle,
            runner=self.runner,
            records=records,
            runtimes=runtimes,
            lifecycle=lifecycle,
            executions=executions,
            endpoint_of=backend.endpoint,
        )
        self.volumes = Volumes(db, backend, self.identity.installation)

    def _checkpoints(
        self,
        records: Records,
        concurrency: Concurrency,
        backend: RuntimeBackend,
        *,
        is_busy: Callable[[str], bool],
        is_saving: Callable[[str], bool],
    ) -> Callable[[], object] | None:
        """Periodic drafts, when asked for and where a crash keeps nothing (images_from_registry)."""
        interval = self.settings.runner_checkpoint_interval
        if interval <= 0 or not backend.images_from_registry:
            return None
        drafts = self.drafts
        return Checkpoints(
            records,
            concurrency,
            interval,
            make_draft=lambda rid: drafts.make_draft(rid, reason="checkpoint"),
            is_busy=is_busy,
            is_saving=is_saving,
        ).run

    # ------------------------------------------------------------------ lifecycle of the runner
    def claim(self) -> None:
        """Hold the runner's name (``RunnerNameInUseError`` naming a live holder); ``open``
        does it too, so calling this first only makes the refusal come early."""
        self.lease.acquire()

    def open(self, *, housekeeping: bool = True) -> None:
        """Hold the runner's name, reconcile with the backend, pick up interrupted work, then
        start the housekeeping loop (reconciliation, idle shutdown)."""
        self.settings.runtimes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lease.acquire()
        self.lease.start()
        try:
            self.reconciler.run()
        except EnvctlError as exc:
            log.warning("reconciliation at start failed: %s", exc.message)
        self.executions.recover()
        self.operations.recover()
        self.transfers.recover()
        if housekeeping:
            self.housekeeping.start()
            self.app_server.start()  # when the runner serves some team's apps

    def close(self) -> None:
        """Stop background work. Runtimes keep running: the next start adopts them."""
        self.app_server.stop()
        self.concurrency.shutdown()
        self.cells.writes.wait_idle(CLOSE_WRITES_WAIT)  # cells' ends handed over: stored, not re-attached
        self.housekeeping.join()
        self.lease.release()
        self.backend.close()

    # ------------------------------------------------------------------ runtimes
    def create(self, who: Who, **fields: Any) -> Runtime:
        """See ``Runtimes.create`` for the fields."""
        return self.runtimes.create(who, **fields)

    def create_attached(
        self, who: Who, *, name: str, container: str, team: str | None = None, lease: int | None = None
    ) -> Runtime:
        """A runtime attached to a container envctl did not start (runner/runtimes/attach.py): the
        allow-list is asked first (403 naming its rules), then the runtime is made, stopped."""
        found = self.attach.check(container)
        python = self.attach.has_python(found)
        rt = self.runtimes.create(
            who,
            name=name,
            environment=attach_nominal_environment,
            language="python" if python else "bash",
            team=team,
            lease=lease,
        )
        self.attach.record(rt.id, found, python)
        return self.runtimes.get(who, rt.id)

    def get(self, who: Who, runtime_id: str) -> Runtime:
        return self.runtimes.get(who, runtime_id)

    def list(self, who: Who) -> builtins.list[Runtime]:
        return self.records.list(who)

    def update(self, who: Who, runtime_id: str, changes: RuntimeChanges) -> Runtime:
        return self.runtimes.update(who, runtime_id, changes)

    def renew_lease(self, who: Who, runtime_id: str) -> Runtime:
        """The client's heartbeat (runner/runtimes/leases.py)."""
        return self.runtimes.renew_lease(who, runtime_id)

    def end_leases(self) -> builtins.list[str]:
        """Stop and delete this runner's runtimes whose lease ran out (housekeeping does it each round)."""
        return self.housekeeping.end_leases(wait=True)

    def log_entries(self, who: Who, runtime_id: str, after: int = 0) -> builtins.list[RuntimeLogEntry]:
        return self.records.log_entries(who, runtime_id, after)

    def env_of(self, who: Who, runtime_id: str) -> tuple[builtins.list[envvars.EnvVar], dict[str, Any] | None]:
        """What a cell of the runtime sees: its own variables over those its environment's image
        sets (read from the image's config), and its variables after the next boot if they wait
        for one (None otherwise)."""
        rt = self.get(who, runtime_id)
        info = self.backend.image_info(rt.version.image_id)
        inherited = envvars.image_env(info.config.get("Env") if info is not None else None)
        pending = (rt.pending or {}).get("env")
        return envvars.effective(inherited, rt.env or {}), (dict(pending) if pending is not None else None)

    def start(self, who: Who, runtime_id: str) -> Runtime:
        return self.lifecycle.start(who, runtime_id)

    def stop(self, who: Who, runtime_id: str) -> Runtime:
        return self.lifecycle.stop(who, runtime_id)

    def reset(self, who: Who, runtime_id: str) -> Runtime:
        return self.lifecycle.reset(who, runtime_id)

    def _deleted(self, runtime_id: str) -> None:
        self.results.forget(runtime_id)
        self.drafts.forget_all(runtime_id)  # its drafts in the registry (runner/saves/drafts.py)

    def delete(self, who: Who, runtime_id: str) -> None:
        self.lifecycle.delete(who, runtime_id)

    def wait_for(self, runtime_id: str, states: set[State] | set[str], timeout: float = 30.0) -> Runtime:
        """Block until the runtime is in one of ``states`` (CLI, tests, benchmarks)."""
        return self.records.wait_for(runtime_id, states, timeout)

    def await_state(self, who: Who, runtime_id: str, states: set[State], timeout: float) -> Runtime:
        """The caller's runtime once it is in one of ``states``, or as it is after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            self.records.wait_for(runtime_id, states, timeout)
        return self.get(who, runtime_id)

    def changes_of(self, who: Who, runtime_id: str) -> builtins.list[ChangeInfo]:
        """The runtime's unsaved changes (its owner runner's engine has them)."""
        with self.db.session() as s:
            rt = self.records.get_mine(s, who, runtime_id)
        return self.changes.listing(rt)

    def touch(self, runtime_id: str, what: str) -> None:
        self.records.touch(runtime_id, what)

    def state_dir(self, runtime_id: str) -> Path:
        return self.paths.state_dir(runtime_id)

    def is_busy(self, runtime_id: str) -> bool:
        return self.executions.is_busy(runtime_id)

    def nodes(self) -> builtins.list[dict[str, Any]]:
        """The machines runtimes run on (the backend's ``nodes``), with this installation's runtimes."""
        return self.backend.nodes(self.identity.installation)

    def drain_node(self, name: str, by: str) -> dict[str, Any]:
        """Stop this runner's runtimes on the node with a draft first, then drain it (runner/runtimes/drain.py)."""
        return self.drain.drain(name, by)

    def activate_node(self, name: str) -> dict[str, Any]:
        return self.drain.activate(name)

    def runners(self) -> builtins.list[RunnerLiveness]:
        """Every runner of the installation and whether it is alive."""
        return self.liveness.list()

    # ------------------------------------------------------------------ what the API shows
    def status_of(self, rts: builtins.list[Runtime], *, look: bool = False) -> builtins.list[RuntimeStatus]:
        """Busy, saving, idle shutdown, reachability and (with ``look``) unsaved changes of each
        runtime: this runner's from memory, other runners' from the store."""
        others = [rt.id for rt in rts if rt.runner != self.runner]
        busy_elsewhere = self.executions.busy_in_store(others)
        saving_elsewhere = self._saving_in_store(others)
        alive = self.liveness.of({rt.runner for rt in rts})
        outdated = self.secrets.outdated(rts)
        now = self.clock()
        out = []
        for rt in rts:
            mine = rt.runner == self.runner
            busy = self.executions.is_busy(rt.id) if mine else rt.id in busy_elsewhere
            saving = self.snapshots.is_saving(rt.id) if mine else rt.id in saving_elsewhere
            owner = alive[rt.runner]
            unreachable = None
            if not owner.alive:
                unreachable = owner.reason
            elif not mine:
                unreachable = f"runtime {rt.name!r} belongs to runner {rt.runner!r}; act on it through that runner"
            # a look costs a diff; lists report drafts only; other runners' engines are theirs
            unsaved = self.changes.has_changes(rt) if look and mine else (True if rt.draft_image_id else None)
            out.append(
                RuntimeStatus(
                    busy=busy,
                    saving=saving,
                    runner_alive=owner.alive,
                    unreachable=unreachable,
                    idle=self.housekeeping.idle_status(rt, busy=busy, saving=saving),
                    idle_timeout=self._idle_timeout(rt),
                    unsaved_changes=unsaved,
                    secrets_outdated=outdated.get(rt.id, []),
                    lease=leases.status(rt.lease_seconds, rt.lease_expires_at, rt.lease_renewed_at, now),
                )
            )
        return out

    def idle_status(self, rt: Runtime, **flags: bool) -> idle.IdleDecision | None:
        return self.housekeeping.idle_status(rt, **flags)

    def _idle_timeout(self, rt: Runtime) -> int:
        machine = self.settings.machine_types.get(rt.machine_type)
        return idle.effective_timeout(
            rt.idle_timeout, machine.idle_timeout if machine else None, self.settings.runner_idle_timeout
        )

    def _saving_in_store(self, runtime_ids: builtins.list[str]) -> set[str]:
        if not runtime_ids:
            return set()
        with self.db.connection() as c:
            rows = c.execute(
                select(Operation.runtime_id).where(
                    Operation.runtime_id.in_(runtime_ids), Operation.kind == "save", Operation.status == "running"
                )
            )
            return {str(r[0]) for r in rows}

    # ------------------------------------------------------------------ housekeeping
    def tick(self) -> None:
        """One housekeeping round now (tests, and the loop)."""
        self.housekeeping.tick()

    def shutdown_idle(self) -> builtins.list[str]:
        return self.housekeeping.shutdown_idle()

    def reconcile(self) -> builtins.list[Action]:
        return self.reconciler.run()

    def _report_event(self, runtime_id: str, event: str, message: str) -> None:
        try:
            self.records.log_now(runtime_id, event=event, reason="kubernetes", message=message[:1000])
        except EnvctlError as exc:
            log.info("could not log %s of %s: %s", event, runtime_id, exc.message)
        except Exception:  # a row deleted meanwhile: nothing to log it on
            log.debug("could not log %s of %s", event, runtime_id, exc_info=True)

    def _after_execution(self, runtime_id: str, owner_id: str, execution_id: str) -> None:
        """After each cell: collect the files it wrote under /results."""
        try:
            self.results.collect(runtime_id, owner_id, execution_id)
        except Exception:  # results must never cost the cell its status
            log.exception("collecting results of %s failed", execution_id)
