"""Idle shutdown: the decision is a pure function of (activity, now, policy).

Idle means: no execution running, no save or push in progress, and no activity for the idle
timeout. A connected client is not activity. The loop that fetches runtimes and acts on the
decision lives in ``runner/service.py``; nothing here touches the database or Docker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class IdleDecision:
    shutdown_at: datetime | None  # None while something keeps the runtime alive
    stop: bool
    reason: str  # why it will (or will not) shut down, for people


def effective_timeout(runtime_timeout: int | None, machine_timeout: int | None, default: int) -> int:
    """The runtime's own timeout, else its machine type's, else the runner's default."""
    for value in (runtime_timeout, machine_timeout):
        if value is not None:
            return value
    return default


def decide(
    *,
    last_activity_at: datetime,
    last_activity: str,
    now: datetime,
    timeout: int,
    busy: bool = False,
    saving: bool = False,
) -> IdleDecision:
    """Whether a running runtime should shut down now, and when it will otherwise."""
    if busy:
        return IdleDecision(None, False, "busy: an execution is running")
    if saving:
        return IdleDecision(None, False, "a save or push is in progress")
    if timeout <= 0:
        return IdleDecision(None, False, "idle shutdown is off for this runtime")
    shutdown_at = last_activity_at + timedelta(seconds=timeout)
    what = last_activity or "activity"
    if now >= shutdown_at:
        return IdleDecision(
            shutdown_at,
            True,
            f"idle for {_human(now - last_activity_at)} (timeout {_human(timedelta(seconds=timeout))}); "
            f"last activity: {what} at {last_activity_at.isoformat(timespec='seconds')}",
        )
    return IdleDecision(
        shutdown_at,
        False,
        f"shuts down when idle for {_human(timedelta(seconds=timeout))}; "
        f"last activity: {what} at {last_activity_at.isoformat(timespec='seconds')}",
    )


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
