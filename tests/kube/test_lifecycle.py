"""``scripts/kube-fixture down`` removes everything ``up`` made and the cluster changed no kernel
setting and no firewall rule of the host's (the machine and its Docker engine are shared).

Runs last in the session (tests/kube/conftest.py): it takes the session's cluster down.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests.conftest import TEST_SESSION
from tests.fixtures import kube_build, kube_cluster
from tests.fixtures.kube import HostState, KubeCluster, wait_running
from tests.fixtures.kube_daemons import Layout
from tests.fixtures.services import docker_client

pytestmark = [pytest.mark.kube, pytest.mark.slow]


def _interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def test_down_leaves_nothing_behind_and_the_host_as_it_was(kube: KubeCluster) -> None:
    from kubernetes import client

    layout = Layout.load(kube.directory)
    assert layout is not None
    core = kube.core()
    name = f"pause-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_pod(
        "default",
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels={"envctl.test-session": TEST_SESSION}),
            spec=client.V1PodSpec(
                restart_policy="Never",
                automount_service_account_token=False,
                containers=[client.V1Container(name="main", image=kube_build.PAUSE_IMAGE, image_pull_policy="Never")],
            ),
        ),
    )
    wait_running(core, "default", name, timeout=60)
    # while a pod runs, what `down` must remove is there (so the checks below can fail)
    existed = set(layout.existed)
    made = [p for p in (*kube_cluster.OUTSIDE, *kube_cluster._cgroups(), *kube_cluster._netns()) if p not in existed]
    assert "/var/log/pods" in made and any(p.startswith("/run/netns/cni-") for p in made), made
    assert any(p.endswith("/kubepods") for p in made), made
    assert layout.bridge in _interfaces()
    assert len(kube_cluster._processes(kube.directory)) >= 7  # six daemons and a shim at least
    assert f" {kube.directory}/" in Path("/proc/self/mountinfo").read_text()
    during = HostState.now()
    assert during.sysctls == kube.before.sysctls

    kube.down()

    assert kube_cluster.leftovers(layout) == []
    assert not kube.directory.exists()
    assert layout.bridge not in _interfaces()
    after = HostState.now()
    assert after.sysctls == kube.before.sysctls
    ours = re.compile(
        "|".join(map(re.escape, [layout.bridge, layout.pod_subnet, layout.service_range, "KUBE-", "CNI-"]))
    )
    assert [r for r in after.rules | during.rules if ours.search(r)] == []
    present = _interfaces()
    lost = [r for r in kube.before.rules - after.rules if all(i in present for i in re.findall(r"-[io] (\S+)", r))]
    assert lost == [], "rules of the host's firewall went away while the cluster ran"
    # the Docker engine and its containerd are untouched
    assert docker_client().ping()
    assert Path("/var/run/docker/containerd/containerd.sock").exists()
