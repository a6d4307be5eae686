"""The runtime records: the runtimes store, the one module that writes ``runtimes`` rows and
their runner log (``tests/test_layering.py`` checks that no other module does).

- Every state change is a compare-and-set (``UPDATE ... WHERE state IN (...)``) plus one
  runner-log line, in one transaction (``transition``), so concurrent calls, and several runners
  on one database, follow the state machine (``runner/runtimes/states.py``).
- Whoever waits for a change (``wait_for``, the API's event streams) waits on
  ``Database.committed``, which every transaction that wrote notifies as it ends: no writer
  has to remember to announce its change.
- Activity (what postpones idle shutdown, ``runner/runtimes/idle.py``) is recorded here and nowhere
  else: ``touch`` (and ``touch_in``, ``touch_hot`` inside a caller's transaction),
  ``activity()`` for a transition that is activity (a boot, an adoption), and ``claim_seq``
  (a cell submitted). What each records is its ``what``: the runner log and the page show it.
- A runtime is deleted by ``delete`` once nothing writes for it any more: ``Lifecycle.delete``
  stops its container and retires its cell worker first, so no cell's outputs are written for
  rows the delete's cascade removed.
- Ownership: a runtime belongs to the runner that created it (``runtimes.runner``). Anyone may
  read any runtime; ``mine()`` refuses an action on another runner's runtime with a 409 that
  names the owner and whether it is alive.
- Who may see and act (the one place that decides, through ``Viewer``): a runtime belongs to
  the user who made it (``owner_id``) and, when made in a team, to that team (``team``, the
  team's name). Its owner and every member of its team see it and act on it: read it, its log,
  executions and results, start, stop, run cells, interrupt, save, reset. Changing its settings
  and deleting it take its owner or an admin of its team (403 otherwise, ``get_to_manage``).
  To anyone else it does not exist: a 404 with the same body as a missing id (R27). Executions
  and results carry their runtime's owner and team, so they follow the same rule (and outlive
  the runtime). envctl admins get no more than their memberships give them here. Membership is
  read when the caller is looked up: the API remembers callers for 5 seconds (``CALLER_TTL`` in
  api/deps.py; a server's own team routes forget them at once), so a member who is removed
  loses access within that time on every server.

Nothing here talks to Docker or to an agent; nothing here holds state a restart would lose.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ARRAY, CTE, ColumnElement, Select, String, and_, any_, bindparam, false, or_, select, update
from sqlalchemy.orm import Session, joinedload, selectinload

from envs.kit.db import Database, HotStatement, HotWriter
from envs.kit.errors import ForbiddenError
from envs.models import EnvironmentVersion
from registry.visibility import Reader, reader_of
from runner.errors import RuntimeNotFoundError, RuntimeOwnedElsewhereError
from runner.identity import Liveness
from runner.models import Runtime, RuntimeLogEntry
from runner.runtimes.states import State, can_transition, sources_of


@dataclass(frozen=True)
class Viewer:
    """Who asks: a user, the teams they are a member of, and those of which they are an admin.

    A plain user id (``str``) where a ``Viewer`` is taken means that user with no teams: what
    envctl's own work (builds, recovery) acts as, on runtimes it made itself."""

    user_id: str
    teams: frozenset[str] = frozenset()
    admin_of: frozenset[str] = frozenset()
    is_admin: bool = False  # an envctl admin: sees every environment, no more runtimes than this says

    @property
    def reader(self) -> Reader:
        """They as a reader of environments (``registry/visibility.py`` decides what they see)."""
        return Reader(self.user_id, self.teams, self.is_admin)

    def sees(self, owner_id: str, team: str | None) -> bool:
        """Whether a runtime (or its execution, result) of ``owner_id`` in ``team`` exists for them."""
        return owner_id == self.user_id or (team is not None and team in self.teams)

    def may_manage(self, owner_id: str, team: str | None) -> bool:
        """Whether they may change the runtime's settings or delete it: its owner, or an admin
        of its team."""
        return owner_id == self.user_id or (team is not None and team in self.admin_of)

    def where(self, owner_id: Any, team: Any) -> ColumnElement[bool]:
        """``sees`` as a condition on the columns ``owner_id`` and ``team`` of a query."""
        in_team = team.in_(sorted(self.teams)) if self.teams else false()
        return or_(owner_id == self.user_id, in_team)


Who = Viewer | str


def viewer_of(who: Who) -> Viewer:
    return who if isinstance(who, Viewer) else Viewer(who)


def activity(what: str, at: datetime) -> dict[str, Any]:
    """The columns that record activity, for a write that is activity (``transition(values=)``)."""
    return {"last_activity_at": at, "last_activity": what}


# The statements of a cell's way in and out, built once and run through ``Database.hot()``: a
# statement built per call costs about 1 ms of CPU to build and look up, three times what
# running it does. A cell's number is counted in the database (UPDATE ... RETURNING), so
# processes sharing the store never hand out one twice (R36).
CLAIMED = (  # what a cell's number comes with
    Runtime.next_seq,
    Runtime.owner_id,
    Runtime.team,
    Runtime.language,
    Runtime.type,
    Runtime.kernel,
    Runtime.runner,
    Runtime.state,
    Runtime.mounts_used,
)
CLAIM_SEQ = HotStatement(
    update(Runtime)
    .where(Runtime.id == bindparam("b_id"))
    .values(next_seq=Runtime.next_seq + 1, last_activity_at=bindparam("b_at"), last_activity=bindparam("b_what"))
    .returning(*CLAIMED)
)


def claimable() -> ColumnElement[bool]:
    """The runtime ``b_id``, run by runner ``b_runner``, seen by user ``b_user`` or a member of
    one of the teams ``b_teams`` (``Viewer.sees`` in SQL; a PostgreSQL array): what decides a
    cell's way in when it is one statement (``claimed_cte``)."""
    return and_(
        Runtime.id == bindparam("b_id"),
        Runtime.runner == bindparam("b_runner"),
        or_(Runtime.owner_id == bindparam("b_user"), Runtime.team == any_(bindparam("b_teams", type_=ARRAY(String)))),
    )


def claimed_cte() -> CTE:
    """``CLAIM_SEQ`` taken only if the runtime is this runner's and the caller sees it
    (``claimable``, decided in SQL), as a common table expression named ``claimed`` with the
    runtime's id beside ``CLAIMED``: for one statement that numbers a cell and writes its row
    from what the number came with (PostgreSQL: ``runner/cells/store.py``, ``CLAIM_AND_QUEUE``)."""
    return (
        update(Runtime)
        .where(claimable())
        .values(next_seq=Runtime.next_seq + 1, last_activity_at=bindparam("b_at"), last_activity=bindparam("b_what"))
        .returning(Runtime.id, *CLAIMED)
        .cte("claimed")
    )


TOUCH = HotStatement(
    update(Runtime)
    .where(Runtime.id == bindparam("b_id"))
    .values(last_activity_at=bindparam("b_at"), last_activity=bindparam("b_what"))
)


def claim_seq(c: HotWriter, runtime_id: str, at: datetime) -> tuple[Any, ...] | None:
    """Number a cell of the runtime (activity: "execution submitted"), in the caller's hot
    transaction. The runtime's owner, team, language, type, kernel, runner, state and mounts
    used come with the number; None when there is no such runtime."""
    return c.fetch(CLAIM_SEQ, {"b_id": runtime_id, "b_at": at, "b_what": "execution submitted"})


def claimer(viewer: Viewer, runner: str) -> dict[str, Any]:
    """The parameters of ``claimable`` but the runtime's id."""
    return {"b_runner": runner, "b_user": viewer.user_id, "b_teams": sorted(viewer.teams)}


def touch_hot(c: HotWriter, runtime_id: str, what: str, at: datetime) -> None:
    """Record activity with the caller's hot transaction (a cell started, a cell finished):
    on PostgreSQL just after it, without waiting for the disk (``HotWriter.execute_after``),
    so that the next cell's ``claim_seq`` does not wait for this commit's flush."""
    c.execute_after(TOUCH, {"b_id": runtime_id, "b_at": at, "b_what": what})


def reader_for(s: Session, who: Who) -> Reader:
    """``who`` as a reader of environments: a ``Viewer`` says it; a plain user id (envctl's own
    work for that user) is read from the store."""
    return who.reader if isinstance(who, Viewer) else reader_of(s, who)


class Records:
    def __init__(self, db: Database, clock: Callable[[], datetime], liveness: Liveness) -> None:
        self.db = db
        self.clock = clock
        self.liveness = liveness
        self.runner = liveness.me
        self.changed = db.committed  # notified by every transaction that wrote, once it ends

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def tx(self) -> Iterator[Session]:
        """A transaction (its end wakes ``wait_for`` callers, as every write does)."""
        with self.db.session() as s:
            yield s

    # ------------------------------------------------------------------ reads
    @staticmethod
    def query(*, joined: bool = True) -> Select[Runtime]:
        """Runtimes with their version and environment loaded (what the API shows): joined in
        the same statement (both are many-to-one); ``joined=False`` loads them in statements of
        their own, for a query that locks its rows (PostgreSQL refuses FOR UPDATE on the
        nullable side of an outer join, and would lock the joined rows too)."""
        if joined:
            return select(Runtime).options(joinedload(Runtime.version).joinedload(EnvironmentVersion.environment))
        return select(Runtime).options(selectinload(Runtime.version).selectinload(EnvironmentVersion.environment))

    def get(
        self,
        s: Session,
        who: Who,
        runtime_id: str,
        *,
        for_update: bool = False,
        with_version: bool = True,
    ) -> Runtime:
        """A runtime ``who`` sees (404 otherwise: one they may not see is as invisible as a
        missing one, R27); ``with_version=False`` when only the runtime's own columns are read."""
        base: Any = self.query(joined=not for_update) if with_version else select(Runtime)
        q = base.where(Runtime.id == runtime_id, visible_to(who))
        if for_update:
            q = q.with_for_update()
        rt: Runtime | None = s.scalars(q).one_or_none()
        if rt is None:
            raise RuntimeNotFoundError(f"runtime {runtime_id[:64]!r} does not exist")
        return rt

    def get_mine(self, s: Session, who: Who, runtime_id: str, **kwargs: Any) -> Runtime:
        """``get``, for an action: refused (409) when another runner owns the runtime."""
        rt = self.get(s, who, runtime_id, **kwargs)
        self.mine(rt.runner, rt.name)
        return rt

    def get_to_manage(self, s: Session, who: Who, runtime_id: str, action: str, **kwargs: Any) -> Runtime:
        """``get_mine``, for changing settings or deleting: a member of the runtime's team who is
        neither its owner nor a team admin is refused (403, naming the role it takes)."""
        rt = self.get_mine(s, who, runtime_id, **kwargs)
        if not viewer_of(who).may_manage(rt.owner_id, rt.team):
            raise ForbiddenError(
                f"{action} runtime {rt.name!r} takes its owner or an admin of team {rt.team!r}; ask one of them",
                details={"team": rt.team, "needs": "owner or team admin"},
            )
        return rt

    def mine(self, runner: str, name: str = "") -> None:
        """Raise ``RuntimeOwnedElsewhereError`` unless this runner owns the runtime."""
        if runner == self.runner:
            return
        owner = self.liveness.of({runner})[runner]
        what = f"runtime {name!r}" if name else "this runtime"
        raise RuntimeOwnedElsewhereError(
            f"{what} belongs to runner {runner!r}, not to this server's runner {self.runner!r}; "
            f"ask the server of runner {runner!r}" + ("" if owner.alive else f" ({owner.reason})"),
            details={"runner": runner, "runner_alive": owner.alive, "this_runner": self.runner},
        )

    def state_of(self, runtime_id: str) -> State | None:
        with self.db.connection() as c:
            value = c.scalar(select(Runtime.state).where(Runtime.id == runtime_id))
        return State(value) if value is not None else None

    @staticmethod
    def pinned_to(s: Session, version: EnvironmentVersion) -> builtins.list[tuple[str, str, str]]:
        """The runtimes pinned to a version, as ``(name, id, owner id)``: what envs and the
        catalog are handed at start-up (``envs.service.PinnedBy``), so a version in use is
        never deleted or unpublished from under them."""
        rows = s.execute(select(Runtime.name, Runtime.id, Runtime.owner_id).where(Runtime.version_id == version.id))
        return [(str(n), str(i), str(o)) for n, i, o in rows]

    def list(self, who: Who) -> builtins.list[Runtime]:
        """The runtimes ``who`` sees: their own and their teams'."""
        with self.db.session() as s:
            q = self.query().where(visible_to(who)).order_by(Runtime.created_at)
            return list(s.scalars(q))

    def log_entries(self, who: Who, runtime_id: str, after: int = 0) -> builtins.list[RuntimeLogEntry]:
        """The runtime's log, oldest first; ``after``: only lines with a greater id (a follower)."""
        with self.db.session() as s:
            self.get(s, who, runtime_id, with_version=False)
            q = (
                select(RuntimeLogEntry)
                .where(RuntimeLogEntry.runtime_id == runtime_id, RuntimeLogEntry.id > after)
                .order_by(RuntimeLogEntry.id)
            )
            return list(s.scalars(q))

    def wait_for(self, runtime_id: str, states: set[State] | set[str], timeout: float = 30.0) -> Runtime:
        """Block until the runtime is in one of ``states`` (woken by each committed change)."""
        deadline = time.monotonic() + timeout
        wanted = {State(s) for s in states}
        with self.changed:
            while True:
                with self.db.session() as s:
                    rt = s.get(Runtime, runtime_id)
                    if rt is None:
                        raise RuntimeNotFoundError(f"runtime {runtime_id} does not exist")
                    if State(rt.state) in wanted:
                        return rt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"runtime {runtime_id} is {rt.state}, not {sorted(wanted)}")
                self.changed.wait(min(remaining, 0.5))

    # ------------------------------------------------------------------ writes
    def transition(
        self,
        s: Session,
        runtime_id: str,
        to: State,
        reason: str,
        message: str,
        *,
        expect: set[State] | frozenset[State] | None = None,
        details: dict[str, Any] | None = None,
        values: dict[str, Any] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> bool:
        """Compare-and-set the state and log it. False when the runtime was not in ``expect``
        (or did not meet the further conditions ``where``)."""
        allowed = sources_of(to) if expect is None else {e for e in expect if can_transition(e, to)}
        result = s.execute(
            update(Runtime)
            .where(Runtime.id == runtime_id, Runtime.state.in_([str(a) for a in allowed]), *where)
            .values(
                state=str(to), state_reason=reason, state_message=message, updated_at=self.clock(), **(values or {})
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        self.log(s, runtime_id, state=to, reason=reason, message=message, details=details)
        s.expire_all()
        return True

    def fail(
        self,
        runtime_id: str,
        reason: str,
        message: str,
        expect: set[State] | frozenset[State],
        *,
        values: dict[str, Any] | None = None,
    ) -> bool:
        """Move the runtime to ``error`` with a reason, in a transaction of its own."""
        with self.tx() as s:
            return self.transition(
                s, runtime_id, State.ERROR, reason, message, expect=expect, values={"phase": None, **(values or {})}
            )

    def log(
        self,
        s: Session,
        runtime_id: str,
        *,
        state: State | None = None,
        event: str | None = None,
        reason: str = "",
        message: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        """One line of the runtime's runner log."""
        s.add(
            RuntimeLogEntry(
                runtime_id=runtime_id,
                at=self.clock(),
                state=str(state) if state else None,
                event=event,
                reason=reason,
                message=message,
                details=details or {},
            )
        )

    def log_now(self, runtime_id: str, **kwargs: Any) -> None:
        """``log`` in a transaction of its own."""
        with self.tx() as s:
            self.log(s, runtime_id, **kwargs)

    def set(self, runtime_id: str, **values: Any) -> None:
        """Write columns of the runtime that are not its state (phase, draft, backend state)."""
        with self.db.connection() as c:
            c.execute(update(Runtime).where(Runtime.id == runtime_id).values(**values))

    @staticmethod
    def set_in(s: Session, runtime_id: str, **values: Any) -> None:
        """``set``, in the caller's transaction."""
        s.execute(
            update(Runtime)
            .where(Runtime.id == runtime_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    @classmethod
    def stand_on(cls, s: Session, runtime_id: str, version: Any, baseline: Any) -> None:
        """The runtime now stands on what it saved: pinned to ``version``, and what its container
        differs by so far is part of that version, not unsaved changes (in the caller's transaction)."""
        cls.set_in(
            s,
            runtime_id,
            version_id=version.id,
            environment_ref=version.ref,
            draft_image_id=None,
            draft_changes=[],
            change_baseline=baseline,
        )
        s.flush()

    @staticmethod
    def change(rt: Runtime, **values: Any) -> None:
        """Set columns of a row the caller holds (loaded in its transaction, often locked):
        the session writes them at its flush, and the caller reads the new values meanwhile."""
        for column, value in values.items():
            if column not in Runtime.__table__.columns:
                raise AttributeError(f"runtimes has no column {column}")
            setattr(rt, column, value)

    def create(self, s: Session, note: str, **fields: Any) -> Runtime:
        """A new runtime row of this runner, in the caller's transaction, with its first
        runner-log line (``note``)."""
        rt = Runtime(runner=self.runner, **fields)
        s.add(rt)
        s.flush()
        self.log(s, rt.id, state=State(rt.state), reason=rt.state_reason, message=note)
        return rt

    def delete(self, s: Session, who: Who, runtime_id: str) -> None:
        """Forget a runtime: its row, and with it (the schema's cascade) its runner log and its
        executions. Called once nothing writes for it any more (see ``Lifecycle.delete``)."""
        s.delete(self.get(s, who, runtime_id, with_version=False))

    @staticmethod
    def renew_lease(s: Session, runtime_id: str, seconds: int, now: datetime) -> datetime | None:
        """Move the runtime's lease to end ``seconds`` after ``now``, while it is still held
        (its end is after ``now``; a compare-and-set, so a renewal never revives a lease that
        ran out: runner/runtimes/leases.py). The new end, or None when there was none to renew."""
        until = now + timedelta(seconds=seconds)
        done = s.execute(
            update(Runtime)
            .where(Runtime.id == runtime_id, Runtime.lease_expires_at > now)
            .values(lease_seconds=seconds, lease_expires_at=until, lease_renewed_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        return until if done == 1 else None

    def expired_leases(self, now: datetime) -> builtins.list[str]:
        """This runner's runtimes whose lease ended at or before ``now``, the oldest end first."""
        with self.db.connection() as c:
            rows = c.execute(
                select(Runtime.id)
                .where(Runtime.runner == self.runner, Runtime.lease_expires_at <= now)
                .order_by(Runtime.lease_expires_at)
            )
            return [str(r[0]) for r in rows]

    def clear_phase(self, runtime_id: str, phase: str) -> None:
        """End the runtime's ``phase`` (and its progress) if it is still that one."""
        with self.db.connection() as c:
            c.execute(
                update(Runtime)
                .where(Runtime.id == runtime_id, Runtime.phase == phase)
                .values(phase=None, progress=None)
            )

    def clear_phases(self, phases: builtins.list[str]) -> None:
        """At start: this runner's runtimes no longer show ``phases`` (work that ended with
        the process that did it)."""
        with self.db.connection() as c:
            c.execute(
                update(Runtime)
                .where(Runtime.runner == self.runner, Runtime.phase.in_(phases))
                .values(phase=None, progress=None)
            )

    def touch_in(self, s: Session, runtime_id: str, what: str, *, only_running: bool = False) -> bool:
        """``touch`` in the caller's transaction."""
        q = update(Runtime).where(Runtime.id == runtime_id)
        if only_running:
            q = q.where(Runtime.state == State.RUNNING)
        q = q.values(**activity(what, self.clock())).execution_options(synchronize_session=False)
        return bool(s.execute(q).rowcount == 1)  # type: ignore[attr-defined]

    def touch(self, runtime_id: str, what: str, *, only_running: bool = False) -> bool:
        """Record activity (it postpones idle shutdown). With ``only_running``, only while the
        runtime runs; returns whether it was recorded."""
        q = update(Runtime).where(Runtime.id == runtime_id)
        if only_running:
            q = q.where(Runtime.state == State.RUNNING)
        with self.db.connection() as c:
            done = c.execute(q.values(**activity(what, self.clock()))).rowcount
        return done == 1


def visible_to(who: Who) -> ColumnElement[bool]:
    """The runtimes ``who`` sees, as a condition of a query on ``runtimes``."""
    return viewer_of(who).where(Runtime.owner_id, Runtime.team)
