"""Leases: a runtime tied to its client (``envctl run``, an editor), gone when the client is.

A runtime made with a lease of N seconds lives while its client renews the lease
(``POST /runtimes/{id}/lease``) at least every N seconds. When a lease runs out, the owning
runner's housekeeping (``runner/runtimes/housekeeping.py``) stops the runtime and deletes it:
its container goes from whatever node it ran on, its unsaved changes and draft go with it (no
draft is kept: nobody is there to come back to it), its results stay, as after a delete.

The rules, decided here and called by every path:

- A lease is about the client being there, not about work: a cell that runs for hours does
  not keep a lease runtime alive once its client stops renewing. A client that wants its cell
  to outlive it drops the lease first (``PATCH lease: null``; ``envctl run --keep`` does at the
  end).
- A lease that ran out is over: renewing or changing it is a 409 (the runtime is being
  deleted), so a client never believes it holds a runtime that housekeeping is removing.
- A team runtime takes no lease: it is shared with the team's members, and one member's client
  going away must not delete it from under the others (422 naming ``lease``).
- A runtime served from the warm pool holds its lease like any other (the pool's unclaimed
  containers have no client, so no lease). An attached runtime may hold one: at its end the
  runtime is detached and forgotten, its container left as it is (runner/runtimes/attach.py).
- A renewal is a write to the runtime's row, so any server on the same database takes it; only
  the owning runner deletes (other runners' runtimes are never touched, a gone runner's stay
  until it returns).
- A renewal is not activity: idle shutdown goes on as before (a connected client is not
  activity, DESIGN.md).

Nothing here touches the database or the backend: the pure parts, tested with plain datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from envs.kit.errors import InvalidInputError

MIN_LEASE = 5  # seconds: a shorter one is lost to one slow request
MAX_LEASE = 24 * 3600  # a client that beats less than daily wants no lease


@dataclass(frozen=True)
class LeaseStatus:
    seconds: int
    expires_at: datetime
    renewed_at: datetime | None  # the client's last heartbeat (or the lease's start)
    expired: bool


def check_lease(value: object, field: str = "lease") -> int:
    """A lease length: whole seconds from MIN_LEASE to MAX_LEASE (422 naming ``field``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_LEASE <= value <= MAX_LEASE:
        raise InvalidInputError(
            f"{field}: whole seconds from {MIN_LEASE} to {MAX_LEASE}; the client renews it (POST "
            "/runtimes/{id}/lease) at least that often, else the runtime is stopped and deleted",
            field=field,
        )
    return value


def check_lease_allowed(team: str | None) -> None:
    """A team runtime takes no lease (see the module's rules)."""
    if team is not None:
        raise InvalidInputError(
            f"lease: runtime of team {team!r} is shared with its members, so one client's lease cannot decide "
            "when it goes; make a personal runtime for a lease, or leave the lease out",
            field="lease",
        )


def status(
    seconds: int | None, expires_at: datetime | None, renewed_at: datetime | None, now: datetime
) -> LeaseStatus | None:
    """The runtime's lease as it stands at ``now``; None when it has none."""
    if seconds is None or expires_at is None:
        return None
    return LeaseStatus(seconds, expires_at, renewed_at, now >= expires_at)


def ends_at(seconds: int, now: datetime) -> datetime:
    return now + timedelta(seconds=seconds)


def expiry_message(st: LeaseStatus, *, busy: bool) -> str:
    """What the runner log says when housekeeping ends a runtime for its lease."""
    beat = st.renewed_at.isoformat(timespec="seconds") if st.renewed_at else "never"
    text = (
        f"lease expired at {st.expires_at.isoformat(timespec='seconds')} (lease {st.seconds} s); "
        f"last heartbeat at {beat}: the client is gone, so the runtime is stopped and deleted"
    )
    if busy:
        text += " (a cell was running: a lease is about the client, and a cell does not keep it)"
    return text


def expired_error_message(name: str, expires_at: datetime) -> str:
    """The 409 of a renewal or change that came after the lease ran out."""
    return (
        f"runtime {name!r}: its lease expired at {expires_at.isoformat(timespec='seconds')}, so it is being "
        "stopped and deleted; a lease cannot be renewed once it ran out (renew it more often than its length, "
        "or drop the lease with PATCH lease: null while it is still held)"
    )
