"""A container's status as Docker's inspection states it (``State`` of ``docker inspect``)."""

from __future__ import annotations

from typing import Any

from runner.backends.base import ContainerStatus, Status


def status_of(state: dict[str, Any]) -> ContainerStatus:
    """Running, or exited with its code, OOM flag, error and start time."""
    if state.get("Running"):
        return ContainerStatus(Status.RUNNING, started_at=state.get("StartedAt"))
    return ContainerStatus(
        Status.EXITED,
        exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        error=state.get("Error") or "",
        started_at=state.get("StartedAt"),
    )
