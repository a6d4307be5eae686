"""The runtime state machine.

    stopped ──> booting ──> running ──> stopping ──> stopped
                   │           │            │
                   └───────────┴────────────┴──> error ──> booting | stopping | stopped
                                                              (| running: re-adopted)

``error`` carries a machine-readable reason (``oom``, ``boot-timeout``, ``container-exited``,
``container-vanished``, ``backend-unreachable``, ...) and a message. Housekeeping phases
(``preparing-download``, ``downloading``, ``restoring``, ``uploading``) are shown beside the
state while they happen; they are not states of their own.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STOPPED = "stopped"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    ERROR = "error"

    @property
    def color(self) -> str:
        return _COLORS[self]


class Phase(StrEnum):
    PREPARING_DOWNLOAD = "preparing-download"
    DOWNLOADING = "downloading"
    RESTORING = "restoring"
    UPLOADING = "uploading"


_COLORS = {
    State.STOPPED: "gray",
    State.BOOTING: "yellow",
    State.RUNNING: "green",
    State.STOPPING: "yellow",
    State.ERROR: "red",
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.BOOTING, State.ERROR}),
    State.BOOTING: frozenset({State.RUNNING, State.STOPPING, State.ERROR}),
    State.RUNNING: frozenset({State.STOPPING, State.ERROR}),
    State.STOPPING: frozenset({State.STOPPED, State.ERROR}),
    # error -> running only when reconciliation finds the container alive again after the
    # Docker engine stopped answering for a while.
    State.ERROR: frozenset({State.BOOTING, State.RUNNING, State.STOPPING, State.STOPPED, State.ERROR}),
}

# States in which a container may exist and must be looked after.
ACTIVE = frozenset({State.BOOTING, State.RUNNING, State.STOPPING})


def can_transition(src: State, dst: State) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: State) -> frozenset[State]:
    """Every state from which ``dst`` may be entered."""
    return frozenset(s for s, targets in TRANSITIONS.items() if dst in targets)
