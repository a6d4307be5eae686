"""Draining a node (``POST /nodes/{name}/drain``, ``envctl nodes drain NAME``; issue 15 item 5).

In this order, so that no user's work is lost and nothing new lands on the node meanwhile:

1. the node's availability becomes ``pause``: Swarm places no new task there, and what runs
   keeps running;
2. this runner's runtimes on the node are stopped as any stop is, their unsaved changes kept
   as a draft first (the runner log's ``stopping`` entry, reason ``node-drain``, names the node
   and who drained it); the next boot lands on another node and restores the draft;
3. once every one of them is ``stopped``, the availability becomes ``drain``: Swarm then stops
   whatever else runs there (other installations' services, runtimes of this installation's
   other runners) by itself; envctl touches none of them. Their agents, sent SIGTERM, wait for
   their own envctl to take a draft (``runner/agent/main.py``, ``terminate``).

If a runtime could not be stopped (its draft failed: the runtime is then in ``error`` with its
container kept), the node stays paused, nothing is drained, and the answer names it.
``activate`` sets the availability back to ``active``.

On Kubernetes (``KubernetesBackend.set_node_availability``) ``pause`` and ``drain`` cordon the
node (``spec.unschedulable``) and ``active`` uncordons it; the drain stops this runner's
runtimes there the same way, and evicts nothing else (that is ``kubectl drain``'s, and other
installations' runtimes their envctl's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from runner.backends.base import RuntimeBackend
from runner.backends.swarm_tasks import node_name
from runner.concurrency import Concurrency
from runner.errors import RuntimeStateError
from runner.models import Runtime
from runner.runtimes.states import State
from runner.runtimes.store import Records

REASON = "node-drain"


class NodeDrain:
    def __init__(
        self,
        records: Records,
        concurrency: Concurrency,
        backend: RuntimeBackend,
        *,
        stop_now: Callable[[str, str], None],
        wait: float = 300.0,
    ) -> None:
        self.records = records
        self.concurrency = concurrency
        self.backend = backend
        self.stop_now = stop_now  # the stop worker (draft first): (runtime id, reason)
        self.wait = wait  # seconds the drain waits for its stops

    def drain(self, name: str, by: str) -> dict[str, Any]:
        node = self.backend.set_node_availability(name, "pause")  # NodeNotFoundError: a 404 naming it
        ids = {str(node.get("ID")), node_name(node)}
        with self.records.db.session() as s:
            q = self.records.query().where(
                Runtime.runner == self.records.runner, Runtime.state.in_([State.RUNNING, State.BOOTING])
            )
            on_node = [
                rt.id
                for rt in s.scalars(q)
                if {str((rt.backend_state or {}).get("node_id")), str((rt.backend_state or {}).get("node"))} & ids
            ]
        message = (
            f"node {name} is being drained (by {by}): stopping the runtime with its unsaved changes kept as a "
            "draft; the next boot lands on another node and restores them"
        )
        for rid in on_node:
            with self.concurrency.claim(rid) as submit:
                with self.records.tx() as s:
                    ok = self.records.transition(
                        s,
                        rid,
                        State.STOPPING,
                        REASON,
                        message,
                        expect={State.RUNNING, State.BOOTING},
                        details={"node": name, "by": by},
                    )
                if ok:
                    self.concurrency.cancel(rid)
                    submit(self.stop_now, REASON)
        left = self._wait_stopped(on_node)
        if left:
            raise RuntimeStateError(
                f"node {name} is paused (no new runtimes land there) but not drained: "
                + "; ".join(f"{rid} is {state}" for rid, state in left.items())
                + ". Its unsaved changes could not be kept, so it was not stopped; see its log, then drain again "
                f"(or `envctl nodes activate {name}`)",
                details={"node": name, "availability": "pause", "not_stopped": left},
            )
        self.backend.set_node_availability(name, "drain")
        return {"node": name, "availability": "drain", "stopped": on_node}

    def activate(self, name: str) -> dict[str, Any]:
        self.backend.set_node_availability(name, "active")
        return {"node": name, "availability": "active", "stopped": []}

    def _wait_stopped(self, ids: list[str]) -> dict[str, str]:
        """Until each runtime is stopped (or in error): those not stopped, with their state."""
        deadline = time.monotonic() + self.wait
        while True:
            with self.records.db.session() as s:
                states = {rid: (rt.state if (rt := s.get(Runtime, rid)) is not None else "deleted") for rid in ids}
            busy = [rid for rid, st in states.items() if st in (State.STOPPING, State.RUNNING, State.BOOTING)]
            if not busy or time.monotonic() > deadline:
                return {rid: str(st) for rid, st in states.items() if st not in (State.STOPPED, "deleted")}
            time.sleep(0.2)
