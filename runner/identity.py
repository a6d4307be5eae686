"""Who this runner is, and whether the other runners of the installation are alive.

- **Installation**: one state store is one installation, with an id made once and kept in the
  database (``installation`` table). Every container a runner makes carries it as the label
  ``envctl.installation``, beside the runner's name (``envctl.runner``); reconciliation and
  housekeeping touch only containers that carry both. Two installations on one Docker engine,
  or the test suite beside ``make run``, never take each other's containers for their own.
- **Runner name**: ``ENVCTL_RUNNER_NAME``, or else a name kept in the data directory, made from
  the host name on first start (a host renamed later keeps its runtimes).
- **Lease and heartbeat**: a runner holds its name in the ``runners`` table while it lives and
  beats every ``runner_heartbeat_interval`` seconds from a thread of its own (a Docker call that
  hangs never stops the beat). A second process asking for a name that a live process holds is
  refused, naming that process; a holder that stopped beating for ``runner_stale_after``
  seconds, or whose process is gone from this host, is taken over (a restart after a crash).
  Other servers show a runner that stopped beating, and its runtimes, as unreachable.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from envs.kit.db import Database
from envs.kit.errors import EnvctlError
from envs.refs import check_name
from runner.errors import RunnerNameInUseError
from runner.models import Installation, RunnerRecord
from runner.settings import Settings

log = logging.getLogger("envctl.identity")

RUNNER_NAME_FILE = "runner-name"


@dataclass(frozen=True)
class RunnerIdentity:
    """What every container of this runner carries, and what reconciliation looks for."""

    installation: str
    name: str


@dataclass(frozen=True)
class RunnerLiveness:
    name: str
    alive: bool
    heartbeat_at: datetime | None
    reason: str  # for people: why it is (not) thought alive


def runner_name(settings: Settings) -> str:
    """The configured name, or the one kept in the data directory (made on first start)."""
    if settings.runner_name:
        check_name(settings.runner_name, "runner_name", "runner name")
        return settings.runner_name
    path = settings.data_dir / RUNNER_NAME_FILE
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept
    name = _name_from_host(socket.gethostname())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, path)
    return name


def _name_from_host(host: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in host.split(".")[0].lower())[:63].strip("-._")
    return cleaned or "runner"


def installation_id(db: Database) -> str:
    """The installation's id; made here if the database has none yet (a race is settled by
    the primary key: whoever inserts second reads the first one's)."""
    with db.session() as s:
        found = s.scalar(select(Installation.id).where(Installation.key == "this"))
    if found:
        return found
    try:
        with db.session() as s:
            s.add(Installation(key="this", id="in_" + uuid.uuid4().hex[:20]))
    except IntegrityError:
        pass
    with db.session() as s:
        made = s.scalar(select(Installation.id).where(Installation.key == "this"))
    assert made is not None
    return made


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This process's hold on its runner name, and the heartbeat that keeps it."""

    # Leases held by runners of this process, by database and name: a second runner built in
    # the same process under a name a live one holds is the same mistake as a second process
    # doing so (one would reconcile the other's runtimes away), and is refused the same way.
    _held_here: ClassVar[dict[tuple[str, str], Lease]] = {}
    _held_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        db: Database,
        name: str,
        *,
        backend: str,
        clock: Callable[[], datetime],
        interval: float,
        stale_after: float,
    ) -> None:
        self.db = db
        self.name = name
        self.backend = backend
        self.clock = clock
        self.interval = interval
        self.stale_after = stale_after
        self.instance = "ri_" + uuid.uuid4().hex[:16]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.lost = threading.Event()  # another process took the name over: act no more
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Hold the name, or raise ``RunnerNameInUseError`` naming the live process holding it."""
        key = (str(self.db.url), self.name)
        with self._held_lock:
            holder = self._held_here.get(key)
            if holder is not None and holder is not self and holder.active:
                raise RunnerNameInUseError(
                    f"the runner name {self.name!r} is in use by another runner of this process; "
                    "give each runner its own name (ENVCTL_RUNNER_NAME)",
                    details={"runner": self.name, "pid": self.pid},
                )
            self._held_here[key] = self
        try:
            self._acquire_in_store()
        except BaseException:
            self._forget_here()
            raise

    @property
    def active(self) -> bool:
        """Held by this process and neither released nor abandoned."""
        return not self._closing.is_set()

    def _forget_here(self) -> None:
        with self._held_lock:
            key = (str(self.db.url), self.name)
            if self._held_here.get(key) is self:
                del self._held_here[key]

    def _acquire_in_store(self) -> None:
        now = self.clock()
        with self.db.session() as s:
            row = s.get(RunnerRecord, self.name, with_for_update=True)
            if row is not None and row.instance != self.instance and self._holder_alive(row, now):
                raise RunnerNameInUseError(
                    f"the runner name {self.name!r} is in use by a live envctl (pid {row.pid} on {row.host}, "
                    f"last heartbeat {row.heartbeat_at.isoformat(timespec='seconds')}); give this one another "
                    "name with ENVCTL_RUNNER_NAME, or stop the other first",
                    details={"runner": self.name, "host": row.host, "pid": row.pid},
                )
            if row is None:
                s.add(
                    RunnerRecord(
                        name=self.name,
                        instance=self.instance,
                        host=self.host,
                        pid=self.pid,
                        backend=self.backend,
                        started_at=now,
                        heartbeat_at=now,
                        stopped_at=None,
                    )
                )
            else:
                row.instance, row.host, row.pid, row.backend = self.instance, self.host, self.pid, self.backend
                row.started_at, row.heartbeat_at, row.stopped_at = now, now, None

    def _holder_alive(self, row: RunnerRecord, now: datetime) -> bool:
        if row.stopped_at is not None:
            return False
        if now - row.heartbeat_at > timedelta(seconds=self.stale_after):
            return False
        if row.host == self.host:
            # Same host: the process tells. A runner of this very process that crashed (in tests,
            # an in-process restart) left its name behind; a live one was refused in acquire().
            return row.pid != self.pid and _process_alive(row.pid)
        return True

    def beat(self) -> bool:
        """One heartbeat; False (and ``lost`` set) when another process holds the name now."""
        with self.db.connection() as c:
            done = c.execute(
                update(RunnerRecord)
                .where(RunnerRecord.name == self.name, RunnerRecord.instance == self.instance)
                .values(heartbeat_at=self.clock())
            ).rowcount
        if done != 1 and not self.lost.is_set():
            log.error(
                "runner %s: another envctl took this runner's name over; this one stops looking after runtimes",
                self.name,
            )
            self.lost.set()
        return done == 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="envctl-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing.wait(self.interval):
            try:
                if not self.beat():
                    return
            except EnvctlError as exc:  # a database outage: beat again when it is back
                log.warning("heartbeat of runner %s failed: %s", self.name, exc.message)
            except Exception:
                log.exception("heartbeat of runner %s failed", self.name)

    def abandon(self) -> None:
        """Stop beating without a word, as a process that crashed would (tests of recovery)."""
        self._closing.set()
        self._forget_here()

    def release(self) -> None:
        """A clean stop: others see at once that this runner is gone."""
        self._closing.set()
        self._forget_here()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost.is_set():
            return
        try:
            with self.db.connection() as c:
                c.execute(
                    update(RunnerRecord)
                    .where(RunnerRecord.name == self.name, RunnerRecord.instance == self.instance)
                    .values(stopped_at=self.clock())
                )
        except Exception:  # closing: the beat goes stale on its own
            log.warning("could not record that runner %s stopped", self.name, exc_info=True)


class Liveness:
    """Whether runners are alive, as the store says; read for listings on any server."""

    def __init__(self, db: Database, clock: Callable[[], datetime], stale_after: float, me: str) -> None:
        self.db = db
        self.clock = clock
        self.stale_after = stale_after
        self.me = me

    def of(self, names: set[str]) -> dict[str, RunnerLiveness]:
        others = names - {self.me}
        out = {self.me: RunnerLiveness(self.me, True, None, "this server's runner")} if self.me in names else {}
        if not others:
            return out
        now = self.clock()
        with self.db.session() as s:
            rows = {r.name: r for r in s.scalars(select(RunnerRecord).where(RunnerRecord.name.in_(others)))}
        for name in others:
            out[name] = self._judge(name, rows.get(name), now)
        return out

    def _judge(self, name: str, row: RunnerRecord | None, now: datetime) -> RunnerLiveness:
        if row is None:
            return RunnerLiveness(name, False, None, f"runner {name} has never reported to this database")
        if row.stopped_at is not None:
            return RunnerLiveness(
                name,
                False,
                row.heartbeat_at,
                f"runner {name} stopped at {row.stopped_at.isoformat(timespec='seconds')}; start it again to reach "
                "its runtimes",
            )
        age = (now - row.heartbeat_at).total_seconds()
        if age > self.stale_after:
            return RunnerLiveness(
                name,
                False,
                row.heartbeat_at,
                f"runner {name} (pid {row.pid} on {row.host}) has not been heard from for {age:.0f} s "
                f"(last heartbeat {row.heartbeat_at.isoformat(timespec='seconds')})",
            )
        return RunnerLiveness(name, True, row.heartbeat_at, f"runner {name} beat {age:.0f} s ago")

    def list(self) -> list[RunnerLiveness]:
        with self.db.session() as s:
            names = set(s.scalars(select(RunnerRecord.name)))
        names.add(self.me)
        found = self.of(names)
        return [found[n] for n in sorted(found)]
