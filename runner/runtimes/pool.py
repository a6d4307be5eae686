"""The warm pool: containers booted ahead so that a new runtime answers its first cell at once.

``ENVCTL_RUNNER_POOL`` names what to keep waiting (``python3:small=2,acme/ml:medium=1``: an
environment reference, a machine type, a count). Each housekeeping round resolves the
references again (a tag that moved, a new version after a save: the pool follows it, and
containers of what is no longer named are removed) and boots what is missing, within the boot
slots (at most half of them, so that users' boots are never starved) and the memory budget
(``ENVCTL_RUNNER_POOL_MEMORY``: the machine types' limits of waiting and booting containers).
With ``ENVCTL_RUNNER_POOL_HOT`` the pool also keeps warm what this runner booted most in the
last hour, within that budget (runner/runtimes/pool_hot.py).

A pool container is pristine: the environment's image, envctl's agent, the machine type's
limits, the installation's identity in its labels, nothing of any user. Starting a runtime that
fits (same version and machine type, native type, no mounts, no draft to restore, no CUDA or
GPU, no container or state directory of its own from before) claims one in a single
transaction: a compare-and-set on the entry (``waiting`` -> ``claimed``) and the runtime's
``stopped`` -> ``booting`` with the container recorded, so two requests or two servers never
claim the same container (R41). Its variables and secrets are then handed to the agent over
its socket (never in the container's configuration), and it is ``running``. A claimed
container is the runtime's for its whole life: stopping the runtime removes it as any other;
it never goes back to the pool. The runtime's log says it came from the pool, or why it was not
served from it.

Entries live in ``pool_entries`` (``runner/models.py``). After a restart, reconciliation hands
the pool its containers (``remap``): a waiting one whose agent answers is adopted, anything
else of the pool is removed; a claimed one is reported under its runtime's id.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import delete, select, update

from envs import service as envs_service
from envs.kit.errors import EnvctlError, InvalidInputError
from envs.kit.ids import new_id
from envs.refs import parse_ref
from runner.backends.base import (
    LABEL_INSTALLATION,
    LABEL_POOL,
    LABEL_RUNNER,
    FoundContainer,
    RuntimeBackend,
    RuntimeSpec,
    Status,
)
from runner.channel import AgentChannel, AgentUnavailableError, ping, wait_for_agent
from runner.concurrency import Concurrency
from runner.identity import RunnerIdentity
from runner.models import PoolEntry, Runtime
from runner.paths import RuntimePaths
from runner.runtimes import envvars, pool_hot
from runner.runtimes.machines import get_machine_type
from runner.runtimes.secret_uses import RuntimeSecrets, refs_of
from runner.runtimes.states import State
from runner.runtimes.store import Records, activity
from runner.settings import Settings

log = logging.getLogger("envctl.pool")

BOOTING, WAITING, CLAIMED = "booting", "waiting", "claimed"
REFILL_DELAY = 0.5  # seconds after a claim before its replacement boots
RETRY_AFTER_FAILURE = 30.0  # seconds before a target whose boot failed is tried again


@dataclass(frozen=True)
class Target:
    ref: str
    machine_type: str
    count: int
    boots: int | None = None  # hot mode's (boots in the last hour); None: configured


@dataclass(frozen=True)
class Wanted:
    """A target resolved: the exact version it means now."""

    target: Target
    version_id: int
    version: str  # e.g. python3@3
    image: str


class _NotClaimedError(Exception):
    pass


class Pool:
    def __init__(
        self,
        settings: Settings,
        identity: RunnerIdentity,
        records: Records,
        concurrency: Concurrency,
        backend: RuntimeBackend,
        paths: RuntimePaths,
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
        self.secrets = secrets
        self.targets = tuple(Target(*t) for t in settings.runner_pool)
        self.hot_budget = settings.runner_pool_hot
        self.gone = pool_hot.Gone(records.clock)  # boots of deleted runtimes (their log went with them)
        for t in self.targets:
            where = f"ENVCTL_RUNNER_POOL: {t.ref}:{t.machine_type}={t.count}"
            parse_ref(t.ref, "runner_pool")
            if t.machine_type not in settings.machine_types:
                raise InvalidInputError(
                    f"{where}: no machine type {t.machine_type!r}; known: {', '.join(sorted(settings.machine_types))}",
                    field="runner_pool",
                )
            if get_machine_type(settings, t.machine_type).gpus:
                raise InvalidInputError(f"{where}: machine types with GPUs are not pooled", field="runner_pool")
        self.max_boots = max(1, settings.runner_max_boots // 2)
        self._guard = threading.Lock()
        self._booting: set[str] = set()  # entries this process is booting now
        self._failed: dict[tuple[int, str], float] = {}  # (version, machine) -> monotonic time
        self._warned: set[str] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.targets) or self.hot_budget > 0

    def _poolable(self) -> dict[str, int]:
        """The machine types a container may be pooled on (no GPUs), with their memory."""
        return {n: m.memory for n, m in self.settings.machine_types.items() if not m.gpus}

    # ------------------------------------------------------------------ what is wanted
    def wanted(self, warm: frozenset[tuple[int, str]] = frozenset()) -> list[Wanted]:
        """The targets, resolved now (a reference that names nothing is skipped, logged once),
        then, in hot mode, what was booted most in the last hour (one query; ``warm``: the
        (version, machine type) pairs with a container in the pool now, which win a tie)."""
        out: list[Wanted] = []
        with self.records.db.session() as s:
            for t in self.targets:
                try:
                    v = envs_service.resolve(s, parse_ref(t.ref, "runner_pool"), "runner_pool")
                except EnvctlError as exc:
                    self._warn_once(f"ref:{t.ref}", "pool target %s: %s", t.ref, exc.message)
                    continue
                out.append(Wanted(t, v.id, v.ref, v.image_id))
            if self.hot_budget > 0:
                memory = self._poolable()
                configured = sum(memory.get(t.machine_type, 0) * t.count for t in self.targets)
                since = self.records.clock() - pool_hot.WINDOW
                boots = pool_hot.merged(pool_hot.boots_since(s, self.identity.name, since), self.gone.since(since))
                taken = frozenset((w.version_id, w.target.machine_type) for w in out)
                for hot in pool_hot.choose(boots, memory, self.hot_budget - configured, taken, warm):
                    v = envs_service.get_version(s, hot.version_id)
                    out.append(Wanted(Target(v.ref, hot.machine_type, hot.count, hot.boots), v.id, v.ref, v.image_id))
        return out

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def memory_reserved(self) -> int:
        """The machine types' memory of this runner's waiting and booting containers."""
        with self.records.db.session() as s:
            rows = s.scalars(
                select(PoolEntry.machine_type).where(
                    PoolEntry.runner == self.identity.name, PoolEntry.state.in_([BOOTING, WAITING])
                )
            ).all()
        return sum(get_machine_type(self.settings, m).memory for m in rows if m in self.settings.machine_types)

    # ------------------------------------------------------------------ filling
    def fill(self) -> list[str]:
        """Boot what the targets miss (in the background); remove waiting containers of what
        they no longer name. Returns the ids of the entries it began to boot."""
        with self.records.db.session() as s:
            entries = list(
                s.scalars(
                    select(PoolEntry).where(
                        PoolEntry.runner == self.identity.name, PoolEntry.state.in_([BOOTING, WAITING])
                    )
                )
            )
        # none when no pool is configured: what waits from before goes
        wanted = self.wanted(frozenset((e.version_id, e.machine_type) for e in entries))
        keys = {(w.version_id, w.target.machine_type) for w in wanted}
        for e in entries:
            if e.state == WAITING and (e.version_id, e.machine_type) not in keys:
                self._retire(e.id, dict(e.backend_state or {}), "no longer named by the pool's targets")
        if not self.enabled:
            return []
        have: dict[tuple[int, str], int] = {}
        for e in entries:
            have[(e.version_id, e.machine_type)] = have.get((e.version_id, e.machine_type), 0) + 1
        budget, hot_budget = self.settings.runner_pool_memory, self.hot_budget
        reserved = self.memory_reserved()
        started: list[str] = []
        for w in wanted:
            key = (w.version_id, w.target.machine_type)
            if time.monotonic() - self._failed.get(key, -RETRY_AFTER_FAILURE) < RETRY_AFTER_FAILURE:
                continue
            memory = get_machine_type(self.settings, w.target.machine_type).memory
            for _ in range(w.target.count - have.get(key, 0)):
                # a hot one also waits for the containers still booting of what went cold
                caps = (budget, hot_budget if w.target.boots is not None else 0)
                cap = min((c for c in caps if c), default=0)
                if cap and reserved + memory > cap:
                    self._warn_once(
                        f"budget:{key}",
                        "pool: %s on %s not kept waiting: the pool's memory budget (%d bytes) would be exceeded",
                        w.version,
                        w.target.machine_type,
                        cap,
                    )
                    break
                with self._guard:
                    if len(self._booting) >= self.max_boots:
                        return started
                if self.backend.image_info(w.image) is None:
                    self._warn_once(f"image:{w.image}", "pool: %s is not in the engine; not pooled", w.version)
                    break
                if not self.concurrency.take_boot_slot():
                    return started
                entry_id = self._insert(w)
                reserved += memory
                have[key] = have.get(key, 0) + 1
                started.append(entry_id)
                try:
                    self.concurrency.submit(self._boot, entry_id, w)
                except BaseException:
                    self._release(entry_id)
                    raise
        return started

    def _insert(self, w: Wanted) -> str:
        entry_id = new_id("pl")
        with self._guard:
            self._booting.add(entry_id)
        with self.records.tx() as s:
            s.add(
                PoolEntry(
                    id=entry_id,
                    runner=self.identity.name,
                    version_id=w.version_id,
                    machine_type=w.target.machine_type,
                    state=BOOTING,
                    backend_state={},
                    created_at=self.records.clock(),
                )
            )
        return entry_id

    def _release(self, entry_id: str) -> None:
        with self._guard:
            self._booting.discard(entry_id)
        self.concurrency.release_boot_slot()

    def _spec(self, entry_id: str, w: Wanted) -> RuntimeSpec:
        return RuntimeSpec(
            runtime_id=entry_id,
            name=entry_id,
            image=w.image,
            environment=w.version,
            machine=get_machine_type(self.settings, w.target.machine_type),
            state_dir=self.paths.state_dir(entry_id),
            agent_dir=self.paths.agent_dir,
            labels={
                LABEL_INSTALLATION: self.identity.installation,
                LABEL_RUNNER: self.identity.name,
                LABEL_POOL: "1",
            },
        )

    def _boot(self, entry_id: str, w: Wanted) -> None:
        """A pool boot (a worker thread): the container up, its agent answering, ``waiting``."""
        begun = time.monotonic()
        state: dict[str, Any] = {}
        try:
            spec = self._spec(entry_id, w)
            spec.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            state = self.backend.start(spec)
            with self.records.tx() as s:
                s.execute(update(PoolEntry).where(PoolEntry.id == entry_id).values(backend_state=state))

            def alive() -> None:
                if self.backend.poll(state).status is not Status.RUNNING:
                    raise AgentUnavailableError("the pool container exited before its agent answered")

            sock = self.paths.socket(entry_id)
            wait_for_agent(sock, begun + self.settings.runner_boot_timeout, alive=alive)
            # the Python kernel started too: a claimed runtime's first cell runs at once
            with AgentChannel(sock, timeout=60) as channel:
                channel.request("warm")
            took = (time.monotonic() - begun) * 1000
            with self.records.tx() as s:
                done = s.execute(
                    update(PoolEntry)
                    .where(PoolEntry.id == entry_id, PoolEntry.state == BOOTING)
                    .values(state=WAITING, ready_at=self.records.clock(), boot_ms=round(took, 1))
                )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                self._retire(entry_id, state, "its entry went away while it booted")
            else:
                log.info(
                    "pool: %s on %s waiting (%s, booted in %.0f ms)", w.version, w.target.machine_type, entry_id, took
                )
        except (EnvctlError, OSError) as exc:
            message = exc.message if isinstance(exc, EnvctlError) else str(exc)
            log.warning("pool: booting %s on %s failed: %s", w.version, w.target.machine_type, message)
            self._failed[(w.version_id, w.target.machine_type)] = time.monotonic()
            self._retire(entry_id, state, "its boot failed")
        finally:
            self._release(entry_id)

    def _retire(self, entry_id: str, state: dict[str, Any], why: str) -> None:
        """Remove a container of the pool that nobody claimed, and its entry."""
        log.info("pool: removing %s: %s", entry_id, why)
        with self.records.tx() as s:
            gone = s.execute(delete(PoolEntry).where(PoolEntry.id == entry_id, PoolEntry.state.in_([BOOTING, WAITING])))
        if gone.rowcount != 1:  # type: ignore[attr-defined]
            return  # claimed meanwhile: the runtime's now
        try:
            self.backend.stop(state, timeout=1)
        except EnvctlError as exc:
            log.warning("pool: could not remove %s: %s (reconciliation removes it)", entry_id, exc.message)
        self.paths.remove_state_dir(entry_id)

    # ------------------------------------------------------------------ claiming
    def may_pool(self, machine_type: str) -> bool:
        """Whether anything on this machine type is ever pooled."""
        if self.hot_budget > 0 and machine_type in self._poolable():
            return True
        return any(t.machine_type == machine_type for t in self.targets)

    def why_not(self, rt: Runtime) -> str | None:
        """Why this runtime cannot take a pooled container (None: it can)."""
        if rt.type != "native":
            return f"a runtime of type {rt.type} is booted for its kernel"
        if rt.mounts:
            return "its mounts are prepared on the host and bound when the container is made"
        if rt.draft_image_id:
            return "it has unsaved changes (a draft) to restore"
        if rt.cuda:
            return "it mounts the host's CUDA libraries"
        if rt.pending:
            return "settings changed for its next boot apply at a boot"
        if rt.backend_state:
            return "a container of its own from before is still recorded"
        if self.backend.publishes_ports and self.ports_of(rt.id):
            return "its app's port is published when its container is made"
        state_dir = self.paths.state_dir(rt.id)
        if state_dir.exists() and not state_dir.is_symlink():
            return "its private state directory is from an earlier boot of its own"
        return None

    def serve(self, runtime_id: str) -> bool:
        """Claim a waiting container for a ``stopped`` runtime that fits, and make it
        ``running`` on it. False (the runtime untouched, the log saying why when the pool had
        something of its kind) when it boots the ordinary way instead."""
        if not self.enabled:
            return False
        begun = time.monotonic()
        try:
            with self.records.tx() as s:
                rt = s.get(Runtime, runtime_id)
                if rt is None or rt.state != State.STOPPED:
                    return False
                if not self.may_pool(rt.machine_type):
                    return False  # nothing of its kind is ever pooled: nothing to say
                why = self.why_not(rt)
                entry = None if why is not None else self._claim(s, rt)
                if entry is None:
                    why = why or f"no pooled container of its version on {rt.machine_type} was waiting"
                    self.records.log(s, runtime_id, event="not-pooled", reason="pool", message=f"booted: {why}")
                    return False
                container = dict(entry.backend_state or {})
                entry_id, env = entry.id, envvars.plain(rt.env or {})
                quick = not env and not refs_of(rt.env)
                boot_ms = entry.boot_ms or 0
                ok = self.records.transition(
                    s,
                    runtime_id,
                    State.BOOTING,
                    "pool",
                    "claimed a container of the warm pool",
                    expect={State.STOPPED},
                    values={"backend_state": {**container, "origin": "pool", "pool_entry": entry_id}},
                )
                if not ok:
                    raise _NotClaimedError()  # rolls the claim back
                self.records.log(
                    s,
                    runtime_id,
                    event="claimed-from-pool",
                    reason="pool",
                    message=f"served from the warm pool: container {container.get('container_name', '')}, "
                    f"booted ahead in {boot_ms:.0f} ms",
                    details={"container_id": container.get("container_id"), "pool_entry": entry_id},
                )
                if quick:  # nothing to hand over: running at once, in the same transaction
                    self._running(s, runtime_id, begun)
        except _NotClaimedError:
            return False
        self._link_state_dir(runtime_id, entry_id)
        if quick:
            self.refill_soon()
            return True
        try:
            self._hand_over(runtime_id, env)
        except (EnvctlError, OSError) as exc:
            message = exc.message if isinstance(exc, EnvctlError) else str(exc)
            try:
                self.backend.stop(container, timeout=1)
                container = {}
            except EnvctlError:
                pass
            self.records.fail(
                runtime_id,
                "pool-handover-failed",
                f"could not hand the pooled container the runtime's variables and secrets: {message}",
                {State.BOOTING},
                values={"backend_state": container},
            )
            return True
        with self.records.tx() as s:
            self._running(s, runtime_id, begun)
        self.refill_soon()
        return True

    def _running(self, s: Any, runtime_id: str, begun: float) -> None:
        took = (time.monotonic() - begun) * 1000
        when = self.records.clock()
        self.records.transition(
            s,
            runtime_id,
            State.RUNNING,
            "pool",
            f"running on a pooled container after {took:.0f} ms",
            expect={State.BOOTING},
            details={"boot_ms": round(took, 1), "pooled": True},
            values={"booted_at": when, **activity("boot", when), "phase": None},
        )

    def _claim(self, s: Any, rt: Runtime) -> PoolEntry | None:
        """The compare-and-set: the first waiting entry of the runtime's version and machine
        type that is still waiting when this transaction writes it."""
        candidates = s.scalars(
            select(PoolEntry)
            .where(
                PoolEntry.runner == self.identity.name,
                PoolEntry.state == WAITING,
                PoolEntry.version_id == rt.version_id,
                PoolEntry.machine_type == rt.machine_type,
            )
            .order_by(PoolEntry.ready_at)
            .limit(4)
        ).all()
        for entry in candidates:
            won = s.execute(
                update(PoolEntry)
                .where(PoolEntry.id == entry.id, PoolEntry.state == WAITING)
                .values(state=CLAIMED, runtime_id=rt.id, claimed_at=self.records.clock())
                .execution_options(synchronize_session=False)
            )
            if won.rowcount == 1:
                found: PoolEntry = entry
                return found
        return None

    def _link_state_dir(self, runtime_id: str, entry_id: str) -> None:
        """The runtime's state directory (socket, /results) is the pooled container's."""
        link = self.paths.state_dir(runtime_id)
        if link.is_symlink():
            link.unlink()
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.paths.state_dir(entry_id), target_is_directory=True)

    def _hand_over(self, runtime_id: str, env: dict[str, str]) -> None:
        """The runtime's variables and secrets, through the agent (never Docker's config)."""
        delivery = self.secrets.prepare(runtime_id) if self.secrets is not None else None
        values = {**env, **(delivery.env if delivery is not None else {})}
        files = delivery.files if delivery is not None else {}
        if values or files:
            with AgentChannel(self.paths.socket(runtime_id)) as channel:
                channel.request("secrets", env=values, files=files)
        if delivery is not None and self.secrets is not None:
            self.secrets.record(runtime_id, delivery.delivered, delivery.env.values())

    def refill_soon(self) -> None:
        """Boot the replacement in the background, shortly (the next round would anyway): a
        moment after the claim, so that the claimed runtime's first cell, which its client
        waits for, does not share the CPU with a container's start."""

        def refill(_: str) -> None:
            try:
                self.fill()
            except EnvctlError as exc:
                log.warning("pool: refill failed: %s", exc.message)

        def later() -> None:
            with contextlib.suppress(RuntimeError):  # shutting down
                self.concurrency.submit(refill, "pool")

        timer = threading.Timer(REFILL_DELAY, later)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------ reconciliation
    def remap(self, found: list[FoundContainer]) -> list[FoundContainer]:
        """Given the runner's complete listing: the pool's own containers taken care of (a
        waiting one adopted when its agent answers, the rest removed), a claimed one reported
        under its runtime's id; everything else passed on as it came."""
        with self.records.db.session() as s:
            entries = {e.id: e for e in s.scalars(select(PoolEntry).where(PoolEntry.runner == self.identity.name))}
            claimed_by = {
                e.id: e.runtime_id for e in entries.values() if e.state == CLAIMED and e.runtime_id is not None
            }
            live_runtimes = set(
                s.scalars(select(Runtime.id).where(Runtime.id.in_([r for r in claimed_by.values() if r])))
            )
        out: list[FoundContainer] = []
        listed: set[str] = set()
        for c in found:
            e = entries.get(c.runtime_id)
            if e is None:
                out.append(c)  # a runtime's own, or a pool container without an entry (an orphan)
                continue
            listed.add(e.id)
            runtime_id = claimed_by.get(e.id)
            if runtime_id is not None:
                out.append(replace(c, runtime_id=runtime_id))
                continue
            with self._guard:
                busy = e.id in self._booting
            if busy:
                continue
            if e.state == WAITING and c.status.status is Status.RUNNING and self._answers(e.id):
                continue  # adopted as it is
            if e.state == BOOTING and c.status.status is Status.RUNNING and self._answers(e.id):
                with self.records.tx() as s:
                    s.execute(
                        update(PoolEntry)
                        .where(PoolEntry.id == e.id, PoolEntry.state == BOOTING)
                        .values(state=WAITING, ready_at=self.records.clock())
                    )
                continue
            self._retire(e.id, c.state, "found after a restart without an answering agent")
        for entry_id, e in entries.items():
            if entry_id in listed:
                continue
            with self._guard:
                busy = entry_id in self._booting
            if busy:
                continue
            with self.records.tx() as s:  # its container is gone: so is the entry
                s.execute(delete(PoolEntry).where(PoolEntry.id == entry_id, PoolEntry.state == e.state))
            if e.runtime_id is None or e.runtime_id not in live_runtimes:
                self.paths.remove_state_dir(entry_id)
        return out

    def reconcile(self, found: list[FoundContainer]) -> list[FoundContainer]:
        """One housekeeping round of the pool: ``remap``, then ``fill``."""
        out = self.remap(found)
        try:
            self.fill()
        except EnvctlError as exc:
            log.warning("pool: filling failed: %s", exc.message)
        return out

    def _answers(self, entry_id: str) -> bool:
        try:
            ping(self.paths.socket(entry_id), timeout=2.0)
            return True
        except (AgentUnavailableError, OSError):
            return False
