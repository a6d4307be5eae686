"""The warm pool's hot mode: keep warm what this runner booted most in the last hour.

``ENVCTL_RUNNER_POOL_HOT=4g`` turns it on with a memory budget (the machine types' limits, as
``ENVCTL_RUNNER_POOL_MEMORY`` counts them). Each refill round the pool (runner/runtimes/pool.py)
asks ``boots_since`` how often each (version, machine type) booted in the last hour and
``choose`` which of them to keep warm: the entries of ``ENVCTL_RUNNER_POOL`` take their share of
the budget first (at their full counts), then the most booted versions get one waiting container
each, in order, as long as the budget holds (a machine type too big for what is left is passed
over for a smaller one further down); a busy one gets one more per ``BOOTS_PER_EXTRA`` boots, in
a second round, up to ``MAX_HOT_PER_ENTRY``. Something booted fewer than ``MIN_BOOTS`` times in
the hour is not a pattern yet. A version that goes cold (its boots fall under that, or others
take its place in the budget) is no longer wanted, and the pool removes its waiting containers
as it removes those of a target that changed.

Where the counts come from: the runtimes' records, not a window in this process's memory.
Every boot already writes a ``booting`` line to the runner log (a pooled claim too: a claim is
demand that should keep its version warm, or the pool would go cold by serving well), so the
count costs no new writes, and it survives a restart: a restarted server adopts its waiting
containers (``Pool.remap``) and still wants the hot ones, where an empty in-memory window would
have it remove them and boot them again an hour later. It is one query per refill round, on
this runner's runtimes that changed within the hour (``updated_at``, which every transition
sets, narrows it before the log is read through its ``runtime_id`` index).

A deleted runtime's log goes with it; so that the boots of runtimes made and deleted within
the hour (lease-bound ones, a script's create-run-delete) still count, the runner hands each
runtime it deletes to ``Gone.note`` first, which keeps its boots of the window in memory. Those
do not survive a restart (the boots of runtimes that still exist do).

Counted: native runtimes (a jupyter runtime or an attached one is never served from the pool),
without CUDA, on a machine type without GPUs that is still configured. A runtime's boots count
for the version it is pinned to now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from runner.models import Runtime, RuntimeLogEntry
from runner.runtimes.attach import PREFIX as ATTACHED
from runner.runtimes.states import State

WINDOW = timedelta(hours=1)
MIN_BOOTS = 2  # boots in the window before a version is kept warm
BOOTS_PER_EXTRA = 20  # one more waiting container per this many boots in the window
MAX_HOT_PER_ENTRY = 4

Key = tuple[int, str]  # (version id, machine type)


@dataclass(frozen=True)
class Hot:
    version_id: int
    machine_type: str
    boots: int  # in the window
    count: int  # containers to keep waiting


def _counted(since: datetime) -> tuple[Any, ...]:
    return (
        Runtime.type == "native",
        Runtime.cuda.is_(None),
        Runtime.environment_ref.not_like(f"{ATTACHED}%"),
        RuntimeLogEntry.at >= since,
        RuntimeLogEntry.state == str(State.BOOTING),
    )


def boots_since(s: Session, runner: str, since: datetime) -> dict[Key, int]:
    """Boots of this runner's runtimes since ``since``, per (version, machine type)."""
    rows = s.execute(
        select(Runtime.version_id, Runtime.machine_type, func.count(RuntimeLogEntry.id))
        .join(RuntimeLogEntry, RuntimeLogEntry.runtime_id == Runtime.id)
        .where(Runtime.runner == runner, Runtime.updated_at >= since, *_counted(since))
        .group_by(Runtime.version_id, Runtime.machine_type)
    ).all()
    return {(int(v), str(m)): int(n) for v, m, n in rows}


class Gone:
    """The boots of the window of runtimes this process deleted (their log is gone)."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self._boots: list[tuple[datetime, Key]] = []
        self._lock = threading.Lock()

    def note(self, s: Session, runtime_id: str) -> None:
        """Before ``runtime_id``'s row is deleted: its boots of the window, kept."""
        since = self.clock() - WINDOW
        rows = s.execute(
            select(RuntimeLogEntry.at, Runtime.version_id, Runtime.machine_type)
            .join(RuntimeLogEntry, RuntimeLogEntry.runtime_id == Runtime.id)
            .where(Runtime.id == runtime_id, *_counted(since))
        ).all()
        with self._lock:
            self._boots += [(at, (int(v), str(m))) for at, v, m in rows]

    def since(self, since: datetime) -> dict[Key, int]:
        with self._lock:
            self._boots = [(at, k) for at, k in self._boots if at >= since]
            counts: dict[Key, int] = {}
            for _, k in self._boots:
                counts[k] = counts.get(k, 0) + 1
            return counts


def merged(a: Mapping[Key, int], b: Mapping[Key, int]) -> dict[Key, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def choose(
    boots: Mapping[Key, int],
    memory: Mapping[str, int],
    budget: int,
    taken: frozenset[Key],
    warm: frozenset[Key] = frozenset(),
) -> list[Hot]:
    """What to keep warm: the most booted keys first, within ``budget`` bytes. ``memory``: the
    machine types that may be pooled, with their memory; ``taken``: keys a configured entry keeps
    warm already (their memory is out of ``budget`` before it comes here); ``warm``: keys with a
    container in the pool now, which win a tie (so that equal counts do not swap containers
    back and forth). A pure function."""
    ranked = sorted(
        ((k, n) for k, n in boots.items() if n >= MIN_BOOTS and k not in taken and k[1] in memory),
        key=lambda kn: (-kn[1], kn[0] not in warm, kn[0]),
    )
    want = {k: min(MAX_HOT_PER_ENTRY, 1 + n // BOOTS_PER_EXTRA) for k, n in ranked}
    given: dict[Key, int] = {}
    left = budget
    for round_ in range(1, MAX_HOT_PER_ENTRY + 1):
        for k, _ in ranked:
            if want[k] >= round_ and given.get(k, 0) == round_ - 1 and memory[k[1]] <= left:
                given[k] = round_
                left -= memory[k[1]]
    return [Hot(k[0], k[1], n, given[k]) for k, n in ranked if given.get(k)]


def why(boots: int | None) -> str:
    """What ``GET /pool`` says of a target: ``configured``, or ``hot: N boots in the last hour``."""
    return "configured" if boots is None else f"hot: {boots} boots in the last hour"
