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


def _listing(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


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
    # while a pod runs, what `down` must remove is there (so the checks below can fail) ...
    namespaces = kube_cluster.netns_of(layout)
    assert namespaces and all(ns.startswith("/run/netns/cni-") for ns in namespaces), namespaces
    assert kube_cluster.cgroups(layout), "no cgroup root of the cluster's own"
    assert kube_cluster._cni_cache(layout)
    assert layout.bridge in _interfaces()
    programs = sorted(kube_cluster._program(p) for p in kube_cluster.processes(kube.directory))
    assert {"etcd", "containerd", "containerd-shim-runc-v2", *kube_build.COMMANDS} <= set(programs), programs
    assert kube_cluster._mounts_under([str(kube.directory)])
    # ... and nothing of it is under the kubelet's usual host paths (it is patched to keep them in DIR;
    # another cluster on the machine, of an older fixture, may use those paths meanwhile)
    uid = core.read_namespaced_pod(name, "default").metadata.uid
    assert (kube.directory / "var-log" / "pods" / f"default_{name}_{uid}").is_dir()
    assert (kube.directory / "kubelet" / "device-plugins" / "kubelet.sock").exists()
    for host_path in ("/var/log/pods", "/var/log/containers"):
        assert not any(uid in entry or name in entry for entry in _listing(host_path))
    during = HostState.now()
    assert during.sysctls == kube.before.sysctls

    kube.down()

    assert kube_cluster.leftovers(layout) == []
    assert not any(os.path.lexists(ns) for ns in namespaces)
    for host_path in ("/var/log/pods", "/var/log/containers"):
        assert not any(uid in entry or name in entry for entry in _listing(host_path))
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
