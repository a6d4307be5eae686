"""The firewall rules that fence an installation's runtimes in (R4), on the real iptables:
added once however often they are asked for, in order, and removed only by their owner."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from envs.kit.errors import InvalidInputError
from runner.backends import netguard
from tests.fixtures.services import need


def _chain(chain: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "-S", chain], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.fixture
def iptables() -> None:
    if os.geteuid() != 0 or not shutil.which("iptables"):
        need("iptables as root")
    if subprocess.run(["iptables", "-w", "-S", "DOCKER-USER"], capture_output=True).returncode != 0:
        need("Docker's DOCKER-USER chain (dockerd manages iptables)")


def test_names_come_from_a_checked_installation_id_and_the_bridge_name_fits_linux() -> None:
    fence = netguard.fence_of("in_0123456789abcdef0123")
    assert fence.network == "envctl-in_0123456789abcdef0123" and len(fence.bridge) <= 15
    for bad in ("", "a b", "x;rm -rf /", "-j ACCEPT", "a" * 41):
        with pytest.raises(InvalidInputError):
            netguard.fence_of(bad)


def test_the_host_resolvers_are_the_non_loopback_ipv4_name_servers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# c\nnameserver 10.0.0.53\nnameserver 127.0.0.53\nnameserver ::1\nnameserver bogus\nsearch x\n")
    assert netguard.resolvers(conf) == ["10.0.0.53"]
    assert netguard.resolvers(tmp_path / "missing") == []


def test_rules_are_added_once_in_order_and_removed_only_for_their_installation(iptables: None) -> None:
    mine = netguard.fence_of(f"in_test{uuid.uuid4().hex[:12]}")
    other = netguard.fence_of(f"in_test{uuid.uuid4().hex[:12]}")
    try:
        for _ in range(3):
            netguard.ensure_rules(mine, ["10.9.8.7"])
        netguard.ensure_rules(other, [])
        forward = [line for line in _chain("DOCKER-USER") if mine.comment in line]
        assert len(forward) == 2 + len(netguard.REJECTED)
        assert "--dport 53" in forward[0] and "RETURN" in forward[0] and "169.254.0.0/16" in forward[2]
        assert all(f"-i {mine.bridge}" in line for line in forward)
        inputs = [line for line in _chain("INPUT") if mine.comment in line]
        assert len(inputs) == 2 and "ESTABLISHED" in inputs[0] and "-j ACCEPT" in inputs[0]
        assert inputs[1].endswith("-j REJECT --reject-with icmp-port-unreachable")
        # one of ours removed by hand: the next check puts the whole set back, in order
        third = netguard.rules(mine, ["10.9.8.7"])["DOCKER-USER"][2]
        subprocess.run(["iptables", "-w", "-D", "DOCKER-USER", *third], check=True)
        netguard.ensure_rules(mine, ["10.9.8.7"])
        assert [line for line in _chain("DOCKER-USER") if mine.comment in line] == forward
        assert _chain("DOCKER-USER")[-1] == "-A DOCKER-USER -j RETURN"  # Docker's own stays last

        netguard.remove_rules(mine)
        assert not any(mine.comment in line for line in _chain("DOCKER-USER") + _chain("INPUT"))
        assert len([line for line in _chain("DOCKER-USER") if other.comment in line]) == len(netguard.REJECTED)
    finally:
        netguard.remove_rules(mine)
        netguard.remove_rules(other)
