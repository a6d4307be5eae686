"""Nodes: the machines this installation's runtimes run on (issue 15 item 5).

The local Docker backend has one, its engine; the Swarm backend lists the swarm's nodes with
their labels, capacity, health and this installation's runtimes on each. A runtime's id is
shown only to those who may see the runtime (the same rule as ``GET /runtimes``); the others
see how many there are.

An admin drains a node (``POST /nodes/{name}/drain``): this installation's runtimes on it are
stopped with their drafts first, then Swarm takes no new task there, or the Kubernetes node stays
cordoned (``runner/runtimes/drain.py``);
``POST /nodes/{name}/activate`` undoes it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import Caller, CallerDep, CtxDep
from envs.kit.errors import ForbiddenError

router = APIRouter(tags=["nodes"])


class NodeHealth(BaseModel):
    state: str = Field(description="ready, down, unknown, disconnected (Swarm's node state); ready for one engine")
    availability: str = Field(
        description="active, pause or drain (Swarm; on Kubernetes pause or drain when cordoned); active for one engine"
    )
    message: str = ""


class NodeCapacity(BaseModel):
    nano_cpus: int = Field(description="CPUs of the node, in billionths")
    memory: int = Field(description="bytes of memory")
    generic_resources: dict[str, int] = Field(default_factory=dict, description="e.g. {'gpu': 2}")


class NodeOut(BaseModel):
    id: str
    name: str
    role: str = Field(description="manager or worker (Swarm); engine for the local Docker backend")
    address: str
    labels: dict[str, str]
    capacity: NodeCapacity
    reserved: NodeCapacity | None = Field(default=None, description="what the tasks on it reserve (Swarm)")
    health: NodeHealth
    engine: str = Field(description="the Docker engine's version")
    runtimes: list[str] = Field(description="ids of this installation's runtimes on the node that the caller sees")
    runtimes_total: int = Field(description="how many of this installation's runtimes it runs, seen or not")


@router.get("/nodes", response_model=list[NodeOut])
def list_nodes(ctx: CtxDep, caller: CallerDep) -> list[NodeOut]:
    """Each node runtimes may run on: labels, capacity, health, and what it runs."""
    seen = {rt.id for rt in ctx.runner.list(caller.viewer)}
    nodes: list[dict[str, Any]] = ctx.runner.nodes()
    return [
        NodeOut(
            **{k: v for k, v in n.items() if k != "runtimes"},
            runtimes=[r for r in n["runtimes"] if r in seen],
            runtimes_total=len(n["runtimes"]),
        )
        for n in nodes
    ]


class NodeAvailabilityOut(BaseModel):
    node: str
    availability: str = Field(description="the node's availability now: drain or active")
    stopped: list[str] = Field(description="runtimes of this installation stopped (with their drafts) first")


def _admin(caller: Caller, what: str) -> None:
    if not caller.is_admin:
        raise ForbiddenError(f"only an envctl admin may {what} a node")


@router.post("/nodes/{name}/drain", response_model=NodeAvailabilityOut)
def drain_node(name: str, ctx: CtxDep, caller: CallerDep) -> NodeAvailabilityOut:
    """Stop this installation's runtimes on the node, each with a draft first, then drain it:
    their next boot lands on another node and restores the draft. Admins only; 404 for an
    unknown node; 409 (the node left paused) when a runtime could not be stopped."""
    _admin(caller, "drain")
    return NodeAvailabilityOut(**ctx.runner.drain_node(name, by=caller.name))


@router.post("/nodes/{name}/activate", response_model=NodeAvailabilityOut)
def activate_node(name: str, ctx: CtxDep, caller: CallerDep) -> NodeAvailabilityOut:
    """Let Swarm place runtimes on the node again (availability ``active``). Admins only."""
    _admin(caller, "activate")
    return NodeAvailabilityOut(**ctx.runner.activate_node(name))
