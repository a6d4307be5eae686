"""The network fence (R4) on a Swarm: what ``netguard`` does beside the local engine, done on
every node of the swarm through the manager's API alone.

- **The network.** The installation's runtimes join one swarm-scoped *bridge* network,
  ``envctl-<installation>`` (``docker network create --scope swarm --driver bridge``): each node
  where a runtime lands makes a local bridge for it, named ``br-<the network's id, 12
  characters>``. Not an overlay: an overlay's traffic leaves through the node's
  ``docker_gwbridge``, which every swarm container of every installation shares, so no rule
  could tell this installation's runtimes from anyone's. Swarm 20.10 drops the options of a
  swarm-scoped bridge network (``enable_icc``, the bridge's name) and its IPAM settings: each node
  takes the subnet from its own default pools (a /16 of 172.17–31.0.0/16), and runtimes on one
  node are kept apart by a rule instead of ICC off. With the nodes' engines granted
  (``ENVCTL_SWARM_ATTACH_ENGINE``) the network is made ``--config-from`` a config-only network on
  every node instead, with a subnet of the pool and ICC off (``swarm_subnets``); the rules stay.
- **Network generations.** After a node's engine restarts (no live restore in swarm mode), Swarm
  20.10 refuses every new task there on the same swarm bridge network ("network <id> exists":
  its bridge driver keeps the network in a local store the restarted engine no longer lists).
  A boot rejected so makes a new generation, ``envctl-<installation>-<n>``, a network with a new
  id, and tries once more; new runtimes join the newest, the others stay on theirs, and the
  guard fences every generation's bridge.
- **The guard.** One *global* service per installation, ``envctl-guard-<installation>``, one task
  on every node, in the node's network namespace (``host`` network) with ``NET_ADMIN`` and
  ``NET_RAW`` and the node's root filesystem mounted read-only at ``/host`` (``/run`` writable): it runs the node's
  own ``iptables`` (``chroot /host iptables``; every Docker node has it, its engine uses it) to
  put the installation's rules in place (each checked with ``iptables -C``) and counts them
  every three seconds, putting them all back when one is missing. The rules are
  ``netguard.rules`` with the bridge ``br-…`` and the node's own resolvers (its
  ``/etc/resolv.conf``), and two more ahead of them in ``DOCKER-USER``: replies of connections
  opened *to* the runtime pass (envctl dials the agent's port, published on the node, from
  another machine: the replies cross the node's ``FORWARD``), and a runtime cannot reach
  another on the same bridge. The guard's task turns ``running`` only when its health check
  finds the rules in place, and a runtime's service is created only when every ready, active
  node has such a task; after the boot, the runtime's own node is checked once more.
- **Its image** is an envctl base image, never a user's: the root of the booting runtime's
  lineage when that is one (made by ``envctl base build``), else the ``bash`` base
  (``RuntimeSpec.trusted_image``, runner/runtimes/boot.py). The guard runs with ``NET_ADMIN`` in
  the node's namespace and the node's files mounted: a user's saved or imported image there
  would own the node. It is pulled with a pull token for that repository; a node with no
  running guard task (one that joined later, whose pull found the token expired) has the
  service updated with the current boot's base image and a fresh token.
- **Removal.** The guard never removes its rules itself: a guard stopped or killed leaves the
  node fenced (a restarted guard finds them in place). ``envctl uninstall`` removes the runtimes'
  services, the guard, then runs ``envctl-unfence-<installation>``, a one-shot global job
  (``Mode: GlobalJob``, API 1.41) that deletes the rules carrying the installation's comment on
  every node, then removes the job and the network (``swarm_removal``).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError
from runner.backends import netguard, swarm_tasks
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED

GUARD_ROLE = "network-guard"  # LABEL_MANAGED of the guard service
UNFENCE_ROLE = "network-unfence"
NETWORK_ROLE = "network"
FENCED_MARK = "/tmp/envctl-fenced"  # noqa: S108  (inside the guard's own container)
ROUND = 3  # seconds between two checks of the rules on a node
POLL = 0.3
NAMESERVERS = "@NAMESERVERS@"  # replaced on the node by its own resolvers


def network_name(installation: str) -> str:
    return netguard.fence_of(installation).network  # checks the id first


def guard_name(installation: str) -> str:
    netguard.fence_of(installation)
    return f"envctl-guard-{installation}"


def unfence_name(installation: str) -> str:
    netguard.fence_of(installation)
    return f"envctl-unfence-{installation}"


def bridge_of(network_id: str) -> str:
    """The Linux bridge a node makes for a swarm-scoped bridge network."""
    return f"br-{network_id[:12]}"


def rule_lines(installation: str, bridge: str) -> list[tuple[str, list[str]]]:
    """The rules in order, chain by chain; ``NAMESERVERS`` stands for each resolver of the node."""
    fence = netguard.Fence(installation, network_name(installation), bridge)
    base = netguard.rules(fence, [NAMESERVERS])
    tag = ["-m", "comment", "--comment", fence.comment]
    ahead = [
        ["-i", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "RETURN"],
        ["-i", bridge, "-o", bridge, *tag, "-j", "REJECT"],
    ]
    out = [("INPUT", spec) for spec in base["INPUT"]]
    out += [("DOCKER-USER", spec) for spec in ahead + base["DOCKER-USER"]]
    return out


BRIDGE = "@BRIDGE@"  # replaced in the script by each of the installation's bridges
_BRIDGE_RE = re.compile(r"br-[A-Za-z0-9]{1,12}")


def guard_script(installation: str, bridges: list[str]) -> str:
    """The guard's POSIX shell program (run by the image's ``sh``): the rules of each bridge
    (one per network generation, ``ensure``) in place; a bridge whose set is incomplete has its
    own rules taken out and put back in order, the others' are never touched, so that a guard
    made again with one more bridge leaves no moment without the rules already there."""
    comment = netguard.fence_of(installation).comment
    for bridge in bridges:
        if not _BRIDGE_RE.fullmatch(bridge):
            raise BackendError(f"{bridge!r} is not a bridge name the guard can use")
    lines = []
    for chain, spec in rule_lines(installation, BRIDGE):
        text = " ".join([chain, *spec]).replace(BRIDGE, "$B")  # no quoting needed: checked words only
        if NAMESERVERS in spec:
            lines.append(f'for ns in $NS; do echo "{text.replace(NAMESERVERS, "$ns")}"; done')
        else:
            lines.append(f'echo "{text}"')
    rules = "\n  ".join(lines)
    return f"""set -uf
C={shlex.quote(comment)}
BRIDGES={shlex.quote(" ".join(bridges))}
ipt() {{ chroot /host iptables -w "$@"; }}
NS=$(sed -n 's/^nameserver[[:space:]][[:space:]]*\\([0-9.]*\\)[[:space:]]*$/\\1/p' /host/etc/resolv.conf \\
  | grep -v '^127\\.' || true)
rules() {{  # $1: a bridge
  B=$1
  {rules}
}}
WANT=0
for b in $BRIDGES; do WANT=$((WANT + $(rules "$b" | wc -l))); done
present() {{  # cheap, each round: as many rules of ours as wanted (two iptables calls)
  [ "$({{ ipt -S INPUT; ipt -S DOCKER-USER; }} | sed 's/"//g' | grep -cE -- "--comment $C( |\\$)")" = "$WANT" ]
}}
checked() {{ rules "$1" | while read -r chain spec; do ipt -C "$chain" $spec 2>/dev/null || exit 1; done; }}
fence() {{  # $1: a bridge; its rules all in place, in order
  checked "$1" && return 0
  rules "$1" | while read -r chain spec; do while ipt -D "$chain" $spec 2>/dev/null; do :; done; done
  i=0; j=0
  rules "$1" | while read -r chain spec; do
    if [ "$chain" = INPUT ]; then i=$((i+1)); ipt -I INPUT "$i" $spec; else j=$((j+1)); ipt -I "$chain" "$j" $spec; fi
  done
  checked "$1"
}}
trap 'exit 0' TERM INT
while :; do
  if present; then touch {FENCED_MARK}; else
    ok=1
    for b in $BRIDGES; do fence "$b" || ok=0; done
    if [ "$ok" = 1 ]; then touch {FENCED_MARK}; else rm -f {FENCED_MARK}; fi
  fi
  sleep {ROUND} & wait $!
done
"""


def unfence_script(installation: str) -> str:
    comment = netguard.fence_of(installation).comment
    return f"""set -uf
C={shlex.quote(comment)}
# twice, a few seconds apart: a guard still stopping may put them back once
for round in 1 2; do
  for chain in INPUT DOCKER-USER; do
    chroot /host iptables -w -S "$chain" | sed 's/"//g' | grep -E -- "--comment $C( |\\$)" \\
      | while read -r add c spec; do
      chroot /host iptables -w -D "$c" $spec
    done
  done
  [ "$round" = 2 ] || sleep 3
done
"""


def _node_task_template(image: str, script: str, labels: dict[str, str], host_network: str) -> dict[str, Any]:
    return {
        "ContainerSpec": {
            "Image": image,
            "Command": ["sh", "-c", script],
            "Labels": labels,
            "CapabilityAdd": ["CAP_NET_ADMIN", "CAP_NET_RAW"],
            "Mounts": [  # the node's iptables, and /run writable for its lock (iptables-legacy)
                {"Type": "bind", "Source": "/", "Target": "/host", "ReadOnly": True},
                {"Type": "bind", "Source": "/run", "Target": "/host/run"},
            ],
            "StopGracePeriod": int(3e9),
        },
        "Networks": [{"Target": host_network}],
        "Resources": {"Limits": {"NanoCPUs": int(0.1e9), "MemoryBytes": 64 << 20, "Pids": 64}},
        "LogDriver": {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "1"}},
    }


def _host_network(client: docker.DockerClient) -> str:
    try:
        found = [n for n in client.api.networks(names=["host"]) if n.get("Name") == "host"]
    except Exception as exc:
        raise daemon_error("find the manager's host network", exc) from exc
    if not found:
        raise BackendError("the Swarm manager has no 'host' network for the network guard")
    return str(found[0]["Id"])


LABEL_GENERATION = "envctl.network-generation"
_STALE_RE = re.compile(r"network (\w+) exists")


# a network made --config-from a config-only network can carry no labels (Swarm refuses them):
# the Swarm config that claims its subnet (``swarm_subnets``) carries them, and names it
CLAIM_ROLE = "subnet-claim"  # LABEL_MANAGED of that config
LABEL_SUBNET = "envctl.subnet"
LABEL_NETWORK = "envctl.network"  # on a claim: the swarm network its subnet is for
LABEL_CONFIG = "envctl.network-config"  # on a claim: the config-only network on the nodes
LABEL_HELPER = "envctl.helper-image"  # on a claim: the image of the helper jobs that made them


def networks(client: docker.DockerClient, installation: str) -> list[dict[str, Any]]:
    """The installation's swarm networks, oldest generation first: those labelled so, and those
    made ``--config-from`` (``swarm_subnets``), each with its claim's labels as its own."""
    label = [f"{LABEL_INSTALLATION}={installation}", f"{LABEL_MANAGED}={NETWORK_ROLE}"]
    claim = [f"{LABEL_INSTALLATION}={installation}", f"{LABEL_MANAGED}={CLAIM_ROLE}"]
    try:
        found = [n for n in client.api.networks(filters={"label": label}) if n.get("Scope") == "swarm"]
        claims = [(c.get("Spec") or {}).get("Labels") or {} for c in client.api.configs(filters={"label": claim})]
        named = {str(n.get("Name")): n for n in client.api.networks() if n.get("Scope") == "swarm"} if claims else {}
    except Exception as exc:
        raise daemon_error("list the runtimes' swarm networks", exc) from exc
    for labels in claims:
        net = named.get(str(labels.get(LABEL_NETWORK)))
        if net is None or labels.get(LABEL_INSTALLATION) != installation:
            continue
        if (net.get("ConfigFrom") or {}).get("Network") != labels.get(LABEL_CONFIG):
            continue  # not the network the claim made (a name taken otherwise): not ours
        found.append({**net, "Labels": {**labels, LABEL_MANAGED: NETWORK_ROLE}})
    return sorted(found, key=lambda n: int((n.get("Labels") or {}).get(LABEL_GENERATION) or 0))


#: makes a swarm network (client, name, labels) another way than ``_create_network``'s own:
#: ``swarm_subnets.NodeSubnets.create_network``, a subnet of the pool through the nodes' engines
NetworkMaker = Callable[[docker.DockerClient, str, dict[str, str]], None]


def _create_network(
    client: docker.DockerClient,
    installation: str,
    labels: dict[str, str],
    generation: int,
    make: NetworkMaker | None = None,
) -> None:
    name = network_name(installation) + (f"-{generation}" if generation else "")
    made = {**labels, LABEL_INSTALLATION: installation, LABEL_MANAGED: NETWORK_ROLE, LABEL_GENERATION: str(generation)}
    if make is not None:
        make(client, name, made)
        return
    try:
        client.api.create_network(name, driver="bridge", scope="swarm", labels=made, check_duplicate=True)
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: made at the same moment by another boot of ours
            raise daemon_error("create the runtimes' swarm network", exc) from exc
    except Exception as exc:
        raise daemon_error("create the runtimes' swarm network", exc) from exc


def ensure_networks(
    client: docker.DockerClient, installation: str, labels: dict[str, str], make: NetworkMaker | None = None
) -> list[dict[str, Any]]:
    """The installation's swarm-scoped bridge networks, the first made when there is none; the
    newest is the one new runtimes join."""
    found = networks(client, installation)
    if not found:
        _create_network(client, installation, labels, 0, make)
        found = networks(client, installation)
    if not found:
        raise BackendError(f"the Swarm manager made network {network_name(installation)} but does not list it")
    return found


def stale_network(error: BackendError, installation_networks: list[dict[str, Any]]) -> bool:
    """Whether a task was rejected because its node's engine still holds the network from
    before it restarted: Swarm 20.10's bridge driver keeps a swarm bridge network in its local
    store across an engine restart while the engine forgets it, and then refuses it again with
    "network <id> exists" on every new task there (checked on the fixture). Only a network with
    a new id gets past it on that node: ``renew``."""
    found = _STALE_RE.search(str((error.details or {}).get("swarm_error") or ""))
    if found is None:
        return False
    return any(str(n.get("Id")) == found.group(1) for n in installation_networks)


def renew(
    client: docker.DockerClient, installation: str, labels: dict[str, str], make: NetworkMaker | None = None
) -> None:
    """A new generation of the installation's network (``envctl-<id>-<n>``), which new runtimes
    join from now on; the guard fences every generation (runtimes stay on theirs)."""
    found = networks(client, installation)
    newest = int((found[-1].get("Labels") or {}).get(LABEL_GENERATION) or 0) if found else -1
    _create_network(client, installation, labels, newest + 1, make)


def guard_spec(
    client: docker.DockerClient, installation: str, labels: dict[str, str], bridges: list[str], image: str
) -> dict[str, Any]:
    made = {**labels, LABEL_INSTALLATION: installation, LABEL_MANAGED: GUARD_ROLE}
    template = _node_task_template(image, guard_script(installation, bridges), made, _host_network(client))
    template["ContainerSpec"]["Healthcheck"] = {
        "Test": ["CMD", "test", "-e", FENCED_MARK],
        "Interval": int(1e9),
        "Timeout": int(5e9),
        "Retries": 3,
        "StartPeriod": int(60e9),
    }
    template["RestartPolicy"] = {"Condition": "any", "Delay": int(2e9)}
    return {"Name": guard_name(installation), "Labels": made, "TaskTemplate": template, "Mode": {"Global": {}}}


def unfence_spec(client: docker.DockerClient, installation: str, labels: dict[str, str], image: str) -> dict[str, Any]:
    """A one-shot task on every node deleting the installation's rules (``envctl uninstall``)."""
    template = _node_task_template(image, unfence_script(installation), labels, _host_network(client))
    template["RestartPolicy"] = {"Condition": "none"}
    return {"Name": unfence_name(installation), "Labels": labels, "TaskTemplate": template, "Mode": {"GlobalJob": {}}}


def _find_service(client: docker.DockerClient, name: str) -> dict[str, Any] | None:
    try:
        found = [s for s in client.api.services(filters={"name": name}) if (s.get("Spec") or {}).get("Name") == name]
    except Exception as exc:
        raise daemon_error("look for the network guard", exc) from exc
    return dict(found[0]) if found else None


def _guarded_nodes(client: docker.DockerClient, service_id: str, command: list[str]) -> tuple[set[str], dict[str, str]]:
    """Nodes whose guard task of the current spec (``command``: its rules) runs, healthy; for
    the others the newest task's error."""
    try:
        tasks = client.api.tasks(filters={"service": service_id})
    except Exception as exc:
        raise daemon_error("list the network guard's tasks", exc) from exc
    running: set[str] = set()
    errors: dict[str, str] = {}
    for node, node_tasks in _by_node(tasks).items():
        # any task running where it should: a node's older task, failed when its engine came back,
        # is the one last *changed* and so would look newest
        if any(
            (t.get("Status") or {}).get("State") == "running" and t.get("DesiredState") == "running" for t in node_tasks
        ):
            running.add(node)
            continue
        newest = max(node_tasks, key=lambda t: str(t.get("CreatedAt") or ""))
        status = newest.get("Status") or {}
        errors[node] = str(status.get("Err") or status.get("Message") or status.get("State") or "")
    return running, errors


def _by_node(tasks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        if t.get("NodeID"):
            out.setdefault(str(t["NodeID"]), []).append(t)
    return out


def eligible_nodes(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """Nodes that can take a runtime now (ready and active): id -> name."""
    return {
        str(n.get("ID")): swarm_tasks.node_name(n)
        for n in nodes
        if ((n.get("Status") or {}).get("State") == "ready") and (n.get("Spec") or {}).get("Availability") == "active"
    }


def ensure(
    client: docker.DockerClient,
    installation: str,
    labels: dict[str, str],
    image: str,
    registry_auth: str,
    *,
    timeout: float,
    make: NetworkMaker | None = None,
) -> str:
    """The installation's network and its guard on every ready, active node, waiting (up to
    ``timeout`` s) until each has the rules in place; the network's name for the runtime's
    service. ``image`` and ``registry_auth``: what the guard runs when it must be (re)made."""
    nets = ensure_networks(client, installation, labels, make)
    guard = _find_service(client, guard_name(installation))
    body = guard_spec(client, installation, labels, [bridge_of(str(n["Id"])) for n in nets], image)
    headers = {"X-Registry-Auth": registry_auth}
    if guard is None:
        post(client, "/services/create", body, headers, "create the runtimes' network guard", conflict_ok=True)
        guard = _find_service(client, guard_name(installation))
    elif _command(guard) != body["TaskTemplate"]["ContainerSpec"]["Command"]:  # a new network generation
        _refresh(client, guard, body, registry_auth)
    if guard is None:
        raise BackendError(f"the Swarm manager made {guard_name(installation)} but does not list it")
    _wait_guarded(client, guard, body, registry_auth, timeout)
    return str(nets[-1]["Name"])


def _command(service: dict[str, Any]) -> list[str]:
    spec = (service.get("Spec") or {}).get("TaskTemplate") or {}
    return list((spec.get("ContainerSpec") or {}).get("Command") or [])


def _wait_guarded(
    client: docker.DockerClient, guard: dict[str, Any], body: dict[str, Any], registry_auth: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    refreshed = False
    while True:
        try:
            nodes = eligible_nodes(list(client.api.nodes()))
        except Exception as exc:
            raise daemon_error("list the swarm's nodes", exc) from exc
        running, errors = _guarded_nodes(client, str(guard["ID"]), body["TaskTemplate"]["ContainerSpec"]["Command"])
        missing = {nid: name for nid, name in nodes.items() if nid not in running}
        if not missing:
            return
        failed = [nid for nid in missing if nid in errors and "No such image" in errors[nid]]
        if failed and not refreshed:  # a node that joined later, or an expired pull token
            _refresh(client, guard, body, registry_auth)
            refreshed = True
        if time.monotonic() > deadline:
            named = ", ".join(
                f"{name}" + (f" ({errors[nid]})" if nid in errors else "") for nid, name in missing.items()
            )
            raise BackendError(
                f"the runtimes' network guard did not fence node(s) {named} within {timeout:g} s; "
                "no runtime boots before every node is fenced in (R4)",
                details={"nodes": sorted(missing.values())},
            )
        time.sleep(POLL)


def _refresh(client: docker.DockerClient, guard: dict[str, Any], body: dict[str, Any], registry_auth: str) -> None:
    """The guard with the current boot's image and pull token, every task made again (the
    rules stay in place meanwhile: a guard never removes them)."""
    try:
        current = client.api.inspect_service(guard["ID"])
    except Exception as exc:
        raise daemon_error("update the runtimes' network guard", exc) from exc
    template = dict(body["TaskTemplate"])
    template["ForceUpdate"] = int((current["Spec"].get("TaskTemplate") or {}).get("ForceUpdate") or 0) + 1
    post(
        client,
        f"/services/{guard['ID']}/update?version={int(current['Version']['Index'])}",
        {**body, "TaskTemplate": template},
        {"X-Registry-Auth": registry_auth},
        "update the runtimes' network guard",
    )


def post(
    client: docker.DockerClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    action: str,
    *,
    conflict_ok: bool = False,
) -> None:
    """A POST to the manager's API with our own headers (the SDK takes X-Registry-Auth only from
    its stored credentials); ``BackendError`` naming ``action`` on a refusal."""
    api = client.api
    try:
        response = api.post(
            f"{api.base_url}/v{api.api_version}{path}",
            data=json.dumps(body),
            headers={"Content-Type": "application/json", **headers},
            timeout=30,
        )
    except Exception as exc:
        raise daemon_error(action, exc) from exc
    if response.status_code < 400 or (conflict_ok and response.status_code == 409):
        return
    raise BackendError(
        f"the Swarm manager refused to {action}: {response.text[:300]}", details={"status": response.status_code}
    )


def check_node(client: docker.DockerClient, installation: str, node_id: str, node: str) -> None:
    """``BackendError`` unless the guard's task on ``node_id`` runs (the runtime just landed
    there; a node that joined between the wait and the placement is caught here)."""
    guard = _find_service(client, guard_name(installation))
    if guard is None:
        raise BackendError(f"the runtimes' network guard {guard_name(installation)} is gone")
    running, errors = _guarded_nodes(client, str(guard["ID"]), _command(guard))
    if node_id not in running:
        why = errors.get(node_id, "no guard task there yet")
        raise BackendError(
            f"node {node} is not fenced in by the runtimes' network guard ({why}); the runtime was not started there",
            details={"node": node},
        )
