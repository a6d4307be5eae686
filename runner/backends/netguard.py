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
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from envs.images.docker import daemon_error
from envs.kit.errors import BackendError, InvalidInputError

ISOLATED = "isolated"  # the value of ENVCTL_RUNNER_NETWORK that asks for all this
ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_OPTION = "com.docker.network.bridge.name"
REJECTED = ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
_INSTALLATION_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_TIMEOUT = 20  # seconds one iptables call may take (it waits for the xtables lock)


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


def ensure_network(client: docker.DockerClient, fence: Fence, labels: dict[str, str]) -> None:
    """The installation's network, made when missing (ICC off, its own bridge name)."""
    try:
        client.api.inspect_network(fence.network)
        return
    except docker.errors.NotFound:
        pass
    except Exception as exc:
        raise daemon_error("look for the runtimes' network", exc) from exc
    try:
        client.api.create_network(
            fence.network,
            driver="bridge",
            options={ICC_OPTION: "false", BRIDGE_OPTION: fence.bridge},
            labels=labels,
            check_duplicate=True,
        )
    except docker.errors.APIError as exc:
        if exc.status_code == 409:  # made at the same moment by another boot
            return
        raise daemon_error("create the runtimes' network", exc) from exc
    except Exception as exc:
        raise daemon_error("create the runtimes' network", exc) from exc


def ensure(client: docker.DockerClient, fence: Fence, labels: dict[str, str]) -> None:
    ensure_network(client, fence, labels)
    ensure_rules(fence, resolvers())


def remove_rules(fence: Fence) -> None:
    """Remove every rule that carries the installation's comment, and only those."""
    for chain in ("INPUT", "DOCKER-USER"):
        for spec in _ours(chain, fence):
            _iptables("-D", chain, *spec, check=False)


def teardown(client: docker.DockerClient, installation: str) -> bool:
    """Remove the installation's rules, and its network when no container is on it.
    Returns whether the network went (rules go in any case). Only the owner calls it."""
    fence = fence_of(installation)
    remove_rules(fence)
    try:
        info: dict[str, Any] = client.api.inspect_network(fence.network)
    except docker.errors.NotFound:
        return True
    if info.get("Containers"):
        return False
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_network(fence.network)
    return True
