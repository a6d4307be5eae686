"""The isolated networks (and their firewall rules) that a benchmark's installations made,
removed at its end: found by the benchmark's own label (``envctl.bench=<session>``, which
every installation it starts puts on what it makes), so nothing of anyone else's is touched."""

from __future__ import annotations

import docker

from runner.backends import netguard

LABEL = "envctl.bench"


def remove_networks(session: str) -> list[str]:
    """Tear down the networks of this benchmark run's installations; returns their names.
    Call it after the containers are gone (a network with a container attached stays)."""
    client = docker.from_env()
    try:
        gone = []
        for held in netguard.envctl_networks(client, {LABEL: session}):
            if netguard.teardown(client, held.installation):
                gone.append(held.network)
        return gone
    finally:
        client.close()
