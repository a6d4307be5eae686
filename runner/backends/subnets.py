"""Where an installation's runtime network gets its addresses: the first free subnet of a pool.

Left to itself, Docker gives every new bridge network a whole /16 from its default pools
(172.17-31.0.0/16, then /20s of 192.168.0.0/16): about 30 networks, and then every new one fails
with "could not find an available, non-overlapping IPv4 address pool". envctl asks for a
subnet itself instead, from ``ENVCTL_RUNNER_SUBNET_POOL`` (default ``10.213.0.0/16``, which
Docker's defaults never hand out), ``ENVCTL_RUNNER_SUBNET_PREFIX`` bits long (default /24).

Why a /24: a runtime takes one address, so a /24 holds 253 runtimes of one installation (the
network, gateway and broadcast addresses aside) — more than one host's memory runs at once
(253 of the smallest machine type are 500 GiB) — and the default pool holds 256 installations.
A /26 (61 runtimes) would be tight for a team server; anything larger only wastes the pool.

A subnet is free when it overlaps no network of the engine and no route of the host (a LAN,
a VPN, another tool's bridge: Docker itself checks explicit subnets only against its own
networks). The walk below is the first fit over the pool, skipping past each taken block, so
a large pool with a small prefix costs no more than the number of taken blocks.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from envs.kit.errors import InvalidInputError


@dataclass(frozen=True)
class Pool:
    """The range subnets are taken from, and the prefix length of each."""

    network: IPv4Network
    prefix: int

    @classmethod
    def of(cls, pool: str, prefix: int) -> Pool:
        try:
            network = IPv4Network(pool, strict=True)
        except ValueError as exc:
            raise InvalidInputError(
                f"ENVCTL_RUNNER_SUBNET_POOL {pool!r} is not an IPv4 network such as 10.213.0.0/16 ({exc})",
                field="runner_subnet_pool",
            ) from exc
        if not network.prefixlen <= prefix <= 29:
            raise InvalidInputError(
                f"ENVCTL_RUNNER_SUBNET_PREFIX /{prefix} does not fit the pool {network}: it must be from "
                f"/{network.prefixlen} to /29",
                field="runner_subnet_prefix",
            )
        return cls(network, prefix)

    @property
    def size(self) -> int:
        """How many subnets the pool holds."""
        return int(2 ** (self.prefix - self.network.prefixlen))

    def __str__(self) -> str:
        return f"{self.network} (/{self.prefix} subnets)"


def first_free(pool: Pool, taken: Iterable[IPv4Network]) -> IPv4Network | None:
    """The lowest /prefix subnet of the pool that overlaps none of ``taken``; None when full."""
    step = 2 ** (32 - pool.prefix)
    start, end = int(pool.network.network_address), int(pool.network.broadcast_address)
    blocks = sorted(
        (int(t.network_address), int(t.broadcast_address)) for t in taken if t.version == 4 and t.overlaps(pool.network)
    )
    cursor = start  # always aligned to step: the pool's start is, and so is every jump
    for low, high in blocks:
        if high < cursor:
            continue
        if low > cursor + step - 1:
            break  # a gap before this block fits one subnet
        cursor = (high // step + 1) * step  # past the block, aligned
        if cursor > end:
            return None
    if cursor + step - 1 > end:
        return None
    return IPv4Network((cursor, pool.prefix))


def host_routes(route_table: Path = Path("/proc/net/route")) -> list[IPv4Network]:
    """The destinations of the host's IPv4 routes (the default route aside): what a runtime
    network must not shadow."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:  # little-endian hex, as the kernel writes them
            dest = socket.inet_ntoa(struct.pack("<I", int(fields[1], 16)))
            mask = socket.inet_ntoa(struct.pack("<I", int(fields[7], 16)))
            route = IPv4Network(f"{dest}/{mask}", strict=False)
        except (ValueError, struct.error):
            continue
        if route.prefixlen:
            out.append(route)
    return out


def subnets_of(network: dict[str, Any]) -> list[IPv4Network]:
    """The IPv4 subnets of one network as the engine lists it."""
    out = []
    for config in (network.get("IPAM") or {}).get("Config") or []:
        try:
            subnet = ipaddress.ip_network(str(config.get("Subnet") or ""), strict=False)
        except ValueError:
            continue
        if isinstance(subnet, IPv4Network):
            out.append(subnet)
    return out
