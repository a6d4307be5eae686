"""Which hosts envctl's server may reach on a caller's behalf (R28): git mounts
(``runner/mounts/``) and imports from another envctl server (``registry/upstream.py``).

``check_host`` resolves a host once and checks every address it resolves to, before any
request leaves; callers connect to the addresses it returns (a DNS answer that changes in
between cannot point them elsewhere). Refused:

- always: link-local addresses (169.254.0.0/16, fe80::/10: cloud metadata services live
  there), the metadata address ``fd00:ec2::254``, unspecified (``0.0.0.0``, ``::``),
  multicast and reserved addresses, and a host that does not resolve;
- by default: loopback and private addresses (10/8, 172.16/12, 192.168/16, fc00::/7, …),
  unless the host is named in the caller's allow-list (a setting such as
  ``mounts_allow_hosts`` or ``import_allow_hosts``: the tests serve on loopback).

IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from envs.kit.errors import InvalidInputError

Resolver = Callable[[str], Iterable[str]]

# Cloud metadata services outside link-local space (AWS's IPv6 endpoint).
METADATA = frozenset({ipaddress.ip_address("fd00:ec2::254")})


def system_resolver(host: str) -> list[str]:
    """The addresses ``host`` resolves to (every family), in the system's order of preference;
    [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def never_allowed(text: str) -> bool:
    """An address no allow-list opens: link-local, metadata, unspecified, multicast, reserved
    (or not an address at all)."""
    ip = _address(text)
    if ip is None:
        return True
    reserved = ip.is_reserved and not ip.is_loopback  # ::1 lies in IPv6's reserved ::/8
    return ip in METADATA or ip.is_link_local or ip.is_unspecified or ip.is_multicast or reserved


def public(text: str) -> bool:
    """A globally routable unicast address."""
    ip = _address(text)
    return ip is not None and ip.is_global and not never_allowed(text)


def literal(host: str) -> str | None:
    """The address ``host`` is written as (``[::1]`` too), or None for a name."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def check_host(host: str, field: str, resolve: Resolver, allow_hosts: Iterable[str] = (), what: str = "") -> list[str]:
    """The addresses ``host`` resolves to (in the resolver's order), each checked: a 422 naming
    ``field`` for a host that does not resolve, or resolves to an address the rules above
    refuse. ``what`` ends the message (``only public hosts may be mounted``)."""
    allowed = host.lower().strip("[]") in {h.lower().strip("[]") for h in allow_hosts}
    written = literal(host)
    addresses = [written] if written else list(dict.fromkeys(resolve(host)))
    shown = host[:100]
    if not addresses:
        raise InvalidInputError(f"{field}: the host {shown!r} does not resolve", field=field)
    never = [a for a in addresses if never_allowed(a)]
    if never:
        raise InvalidInputError(
            f"{field}: the host {shown!r} resolves to a link-local, metadata, unspecified, multicast or reserved "
            f"address ({', '.join(never[:3])}), which envctl never connects to",
            field=field,
            details={"addresses": never[:8]},
        )
    private = [] if allowed else [a for a in addresses if not public(a)]
    if private:
        raise InvalidInputError(
            f"{field}: the host {shown!r} resolves to a loopback, link-local, private or reserved address "
            f"({', '.join(private[:3])}){'; ' + what if what else ''}",
            field=field,
            details={"addresses": private[:8]},
        )
    return addresses
