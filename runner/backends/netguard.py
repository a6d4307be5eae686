"""The network of an installation's runtimes, fenced in (R4).

Every runtime of an installation joins one Docker bridge network of its own,
``envctl-<installation id>``, made with inter-container communication off (runtimes cannot
reach each other) and a bridge interface named from the installation id. Firewall rules,
each carrying the comment ``envctl:<installation id>`` and nothing else of anyone's, then
reject what a cell could otherwise reach:

- ``INPUT -i <bridge> -j REJECT``: the host itself on any of its addresses, so envctl's API,
  a Docker API on TCP, a database or a registry listening on the host (replies to what the
  host opened itself pass, ahead of it);
- ``DOCKER-USER -i <bridge> -d <range> -j REJECT`` for link-local (169.254.0.0/16: the cloud
  metadata service) and the private ranges (other containers, other bridges, the LAN), after
  ``RETURN`` rules that let DNS through to the host's resolvers (Docker's embedded DNS asks
  them from inside the container's namespace).

Everything else, the package registries included, stays reachable. Rules are added only when
missing (the whole set, in order, at the top of its chain), found again by their comment, and
removed only by ``teardown`` of the same installation. ``iptables`` is run with argument lists,
never through a shell; the names in them are checked first. The rules need root and a local
engine; the runtime's boot fails saying so when they cannot be put in place.

The network takes a small subnet (a /24 by default) from ``ENVCTL_RUNNER_SUBNET_POOL``, not a
/16 of Docker's default pools, and goes with its installation (``envctl uninstall``). When the
pool is full, the boot fails naming the envctl networks that hold it; those whose installation
has no container left on the engine go with ``envctl uninstall --orphaned-networks``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shlex
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import IPAMConfig, IPAMPool

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, InvalidInputError
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED
from runner.backends.subnets import Pool, first_free, host_routes, subnets_of
from runner.errors import NetworkPoolExhaustedError

ISOLATED = "isolated"  # the value of ENVCTL_RUNNER_NETWORK that asks for all this
ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_OPTION = "com.docker.network.bridge.name"
REJECTED = ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
_INSTALLATION_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_TIMEOUT = 20  # seconds one iptables call may take (it waits for the xtables lock)
_CREATE_ATTEMPTS = 50  # subnets tried when others keep taking the one found free
_NAMED = 10  # holders of a full pool named in the error's message (details has them all)
LABEL_SUBNET_POOL = "envctl.subnet-pool"  # the pool a network's subnet was taken from


@dataclass(frozen=True)
class Fence:
    installation: str
    network: str  # the Docker network's name
    bridge: str  # its Linux bridge interface (at most 15 characters)

    @property
    def comment(self) -> str:
        return f"envctl:{self.installation}"


def fence_of(installation: str) -> Fence:
    if not _INSTALLATION_RE.fullmatch(installation):
        raise InvalidInputError(f"installation id {installation[:48]!r} is not usable in a network name")
    digest = hashlib.sha256(installation.encode()).hexdigest()[:8]
    return Fence(installation, f"envctl-{installation}", f"envctl-{digest}")


def resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's IPv4 name servers other than loopback ones (Docker asks loopback ones from
    the host's own namespace, which these rules do not touch)."""
    found = []
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                address = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                found.append(str(address))
    return found


def rules(fence: Fence, name_servers: list[str]) -> dict[str, list[list[str]]]:
    """The rules of one installation, chain -> rule specs, in the order they must stand."""
    tag = ["-m", "comment", "--comment", fence.comment]
    reject = ["-j", "REJECT"]
    forward = [
        ["-i", fence.bridge, "-d", server, "-p", proto, "--dport", "53", *tag, "-j", "RETURN"]
        for server in name_servers
        for proto in ("udp", "tcp")
    ]
    forward += [["-i", fence.bridge, "-d", cidr, *tag, *reject] for cidr in REJECTED]
    # replies to connections the host opened itself go through; nothing a cell opens does
    replies = ["-i", fence.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", *tag, "-j", "ACCEPT"]
    return {"INPUT": [replies, ["-i", fence.bridge, *tag, *reject]], "DOCKER-USER": forward}


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(
            f"cannot run iptables to fence the runtimes' network in ({exc}); envctl needs root for it, "
            "or set ENVCTL_RUNNER_NETWORK=bridge to run runtimes without network isolation",
            details={"action": "iptables"},
        ) from exc
    if check and done.returncode != 0:
        raise BackendError(
            f"iptables {' '.join(args[:2])} failed: {done.stderr.strip()[:300]}; envctl needs root and Docker's "
            "DOCKER-USER chain to fence the runtimes' network in, or set ENVCTL_RUNNER_NETWORK=bridge to run "
            "runtimes without network isolation",
            details={"action": "iptables", "exit_code": done.returncode},
        )
    return done


def _ours(chain: str, fence: Fence) -> list[list[str]]:
    """The rule specs of ``chain`` that carry this installation's comment, as listed."""
    listed = _iptables("-S", chain).stdout.splitlines()
    out = []
    for line in listed:
        words = shlex.split(line)  # iptables' own output, quoted by it
        if words[:2] == ["-A", chain] and f"envctl:{fence.installation}" in words:
            out.append(words[2:])
    return out


def ensure_rules(fence: Fence, name_servers: list[str]) -> None:
    """Put the installation's rules in place unless they all are; idempotent. A chain whose
    set is incomplete or has extra ones of ours is rebuilt: ours out, then all in, in order."""
    for chain, wanted in rules(fence, name_servers).items():
        present = _ours(chain, fence)
        if len(present) == len(wanted) and all(
            _iptables("-C", chain, *spec, check=False).returncode == 0 for spec in wanted
        ):
            continue
        for spec in present:
            _iptables("-D", chain, *spec)
        for position, spec in enumerate(wanted, start=1):
            _iptables("-I", chain, str(position), *spec)


def network_exists(client: docker.DockerClient, fence: Fence) -> bool:
    try:
        client.api.inspect_network(fence.network)
    except docker.errors.NotFound:
        return False
    except Exception as exc:
        raise daemon_error("look for the runtimes' network", exc) from exc
    return True


def ensure_network(client: docker.DockerClient, fence: Fence, labels: dict[str, str], pool: Pool) -> None:
    """The installation's network, made when missing (ICC off, its own bridge name), on the
    first free subnet of ``pool`` (runner/backends/subnets.py).

    Two installations booting at once may pick the same subnet: the engine refuses the second
    ("Pool overlaps"), which then takes the next free one. ``NetworkPoolExhaustedError`` when
    none is left, naming the envctl networks that hold the pool."""
    if network_exists(client, fence):
        return
    refused: list[IPv4Network] = []  # taken by someone between our look and our ask
    for _ in range(_CREATE_ATTEMPTS):
        try:
            listed = client.api.networks()
        except Exception as exc:
            raise daemon_error("list the engine's networks", exc) from exc
        routes = host_routes()
        subnet = first_free(pool, [net for n in listed for net in subnets_of(n)] + routes + refused)
        if subnet is None:
            raise exhausted(client, pool, listed, routes)
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(subnet.network_address + 1))])
        try:
            client.api.create_network(
                fence.network,
                driver="bridge",
                options={ICC_OPTION: "false", BRIDGE_OPTION: fence.bridge},
                ipam=ipam,
                labels={**labels, LABEL_SUBNET_POOL: str(pool.network)},
                check_duplicate=True,
            )
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # made at the same moment by another boot of ours
                return
            if "overlap" in str(exc.explanation or exc).lower():
                refused.append(subnet)
                continue
            raise daemon_error("create the runtimes' network", exc) from exc
        except Exception as exc:
            raise daemon_error("create the runtimes' network", exc) from exc
    raise BackendError(
        f"the engine refused {_CREATE_ATTEMPTS} subnets of {pool.network} in a row as overlapping; "
        "another program is taking them as fast as envctl finds them",
        details={"action": "create the runtimes' network", "pool": str(pool.network)},
    )


def ensure(client: docker.DockerClient, fence: Fence, labels: dict[str, str], pool: Pool) -> None:
    ensure_network(client, fence, labels, pool)
    ensure_rules(fence, resolvers())


# --- who holds what: the pool's holders, and networks whose installation is gone --------------
ORPHANS_COMMAND = "envctl uninstall --orphaned-networks"


@dataclass(frozen=True)
class HeldNetwork:
    """An envctl network as the engine has it, with what its installation still has there."""

    network: str
    installation: str
    subnets: tuple[str, ...]
    containers: int  # containers of its installation on this engine, running or not

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "installation": self.installation,
            "subnets": list(self.subnets),
            "containers": self.containers,
        }

    def describe(self) -> str:
        held = ", ".join(self.subnets) or "no subnet"
        has = {0: "no container left", 1: "1 container"}.get(self.containers, f"{self.containers} containers")
        return f"{self.network} ({held}; installation {self.installation}, {has})"


def envctl_networks(client: docker.DockerClient, labels: dict[str, str] | None = None) -> list[HeldNetwork]:
    """Every network an envctl installation made on this engine (``labels``: only those that
    also carry these), with the number of containers its installation has, oldest first."""
    wanted = [f"{LABEL_MANAGED}=network", LABEL_INSTALLATION, *(f"{k}={v}" for k, v in (labels or {}).items())]
    try:
        listed = client.api.networks(filters={"label": wanted})
        containers = client.api.containers(all=True, filters={"label": LABEL_INSTALLATION})
    except Exception as exc:
        raise daemon_error("list envctl's networks", exc) from exc
    per_installation: dict[str, int] = {}
    for c in containers:
        owner = (c.get("Labels") or {}).get(LABEL_INSTALLATION, "")
        per_installation[owner] = per_installation.get(owner, 0) + 1
    out = []
    for n in sorted(listed, key=lambda n: str(n.get("Created") or "")):
        installation = (n.get("Labels") or {}).get(LABEL_INSTALLATION, "")
        if not installation:
            continue
        out.append(
            HeldNetwork(
                network=str(n.get("Name") or ""),
                installation=installation,
                subnets=tuple(str(s) for s in subnets_of(n)),
                containers=per_installation.get(installation, 0),
            )
        )
    return out


def exhausted(
    client: docker.DockerClient, pool: Pool, listed: list[dict[str, Any]], routes: list[IPv4Network]
) -> NetworkPoolExhaustedError:
    """The error for a pool with no free subnet, naming who holds it and how to free it
    (``listed``: the engine's networks, ``routes``: the host's, as the search saw them)."""
    holders = [h for h in envctl_networks(client) if any(IPv4Network(s).overlaps(pool.network) for s in h.subnets)]
    orphans = [h for h in holders if not h.containers]
    named = "; ".join(h.describe() for h in holders[:_NAMED]) or "none"
    if len(holders) > _NAMED:
        named += f"; and {len(holders) - _NAMED} more (`{ORPHANS_COMMAND} --dry-run` lists them all)"
    ours = {h.network for h in holders}
    others = [
        f"network {n.get('Name')} ({', '.join(str(s) for s in subnets_of(n))})"
        for n in listed
        if n.get("Name") not in ours and any(s.overlaps(pool.network) for s in subnets_of(n))
    ] + [f"host route {r}" for r in routes if r.overlaps(pool.network)]
    if others:
        named += f". Also in the pool: {', '.join(others[:_NAMED])}"
    if not holders:
        free = "no envctl network holds any of it, so `envctl uninstall` frees none"
    elif orphans:
        free = f"`{ORPHANS_COMMAND}` removes the {len(orphans)} whose installation has no container left"
    else:
        free = (
            f"every one's installation still has containers, so `{ORPHANS_COMMAND}` frees none now; "
            "`envctl uninstall` in an installation's data directory removes it with its network"
        )
    every = f"the one /{pool.prefix} subnet" if pool.size == 1 else f"all {pool.size} /{pool.prefix} subnets"
    return NetworkPoolExhaustedError(
        f"no subnet is left for this installation's runtime network: {every} of ENVCTL_RUNNER_SUBNET_POOL "
        f"{pool.network} {'is' if pool.size == 1 else 'are'} taken. envctl networks holding them: {named}. "
        f"{free}; or set ENVCTL_RUNNER_SUBNET_POOL to a larger or another free range",
        details={
            "pool": str(pool.network),
            "prefix": pool.prefix,
            "networks": [h.to_dict() for h in holders],
            "command": ORPHANS_COMMAND,
        },
    )


def remove_rules(fence: Fence) -> None:
    """Remove every rule that carries the installation's comment, and only those."""
    for chain in ("INPUT", "DOCKER-USER"):
        for spec in _ours(chain, fence):
            _iptables("-D", chain, *spec, check=False)


def teardown(client: docker.DockerClient, installation: str) -> bool:
    """Remove the installation's rules, and its network when no container is on it.
    Returns whether the network went (rules go in any case). Only the owner calls it, or
    ``remove_orphaned`` for an installation with no container left."""
    remove_rules(fence_of(installation))
    return remove_network(client, installation)


def remove_network(client: docker.DockerClient, installation: str) -> bool:
    """Remove the installation's network unless a container is on it; whether it is gone."""
    fence = fence_of(installation)
    try:
        info: dict[str, Any] = client.api.inspect_network(fence.network)
    except docker.errors.NotFound:
        return True
    except Exception as exc:
        raise daemon_error("look for the runtimes' network", exc) from exc
    if info.get("Containers"):
        return False
    try:
        client.api.remove_network(fence.network)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code in (403, 409):  # a container joined it meanwhile ("active endpoints")
            return False
        raise daemon_error("remove the runtimes' network", exc) from exc
    return True


def remove_orphaned(client: docker.DockerClient, orphans: list[HeldNetwork]) -> list[HeldNetwork]:
    """Remove the networks (and firewall rules) of installations that have no container left
    on the engine; returns those removed. Each is looked at again just before: a network whose
    installation made a container meanwhile, or that has one attached, stays."""
    now = {h.network: h for h in envctl_networks(client)}
    removed = []
    for h in orphans:
        again = now.get(h.network)
        if again is None or again.containers or again.installation != h.installation:
            continue
        if teardown(client, h.installation):
            removed.append(h)
    return removed
