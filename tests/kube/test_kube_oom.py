"""A runtime's pod past its memory limit on the real cluster (issue 18: ``OOMKilled`` →
``error (oom)`` with a draft). The kernel's memory killer, in the pod's memory cgroup that the
kubelet made from the machine type's limit, kills the agent (the container's main process); the
kubelet reports the container ``terminated`` with reason ``OOMKilled``; envctl's watch sees it
and the runtime goes to ``error`` with reason ``oom``.

What can be kept: nothing at the moment of the kill. The agent was the process that would
stream the draft, and it is dead; a pod (``restartPolicy: Never``) cannot run its container
again, and no engine on envctl's host commits a node's container. So the draft that comes back
is the runtime's last one:

- with the memory watch (``ENVCTL_RUNNER_MEMORY_PRESSURE``, on by default at 90 %): a cell whose
  memory grows past the line is paused while envctl takes a draft (``runner/agent/memwatch.py``,
  ``runner/runtimes/pressure.py``), then goes on; the memory killer ends it later, and the next
  boot restores that draft, with what the cell wrote before the pause (``pressured``);
- without it (off here: ``server``), or for an allocation faster than the watch's interval: a
  checkpoint (``ENVCTL_RUNNER_CHECKPOINT_INTERVAL``, taken by the housekeeping round after
  cells; ``server`` takes one every 2 s), or an earlier stop's. What changed after it is gone,
  and the runtime's message says exactly that.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.kube import KubeCluster
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.kube.envctl_server import core_api, kube_server, pods_of, remove_installation, wait_no_pod
from tests.runner.cells.test_docker_executions import new_runtime, run, text

pytestmark = [pytest.mark.kube, pytest.mark.slow]

HOG = "x = bytearray(1024**3)\nx[::4096] = b'y' * (1024**3 // 4096)"  # touches every page of 1 GB
# the memory killer takes the process with the highest badness in the cgroup: the agent, once
# its oom_score_adj is raised to 1000 (raising it needs no privilege), and not the cell's hog
AGENT_FIRST = (
    'for p in /proc/[0-9]*; do grep -q main.py "$p/cmdline" 2>/dev/null && echo 1000 > "$p/oom_score_adj"; done'
)


@pytest.fixture(scope="module")
def server(
    kube: KubeCluster, kube_namespace: str, docker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = kube_server(
        kube.kubeconfig,
        kube_namespace,
        tmp_path_factory.mktemp("kube-oom") / "data",
        ENVCTL_RUNNER_CHECKPOINT_INTERVAL="2",
        ENVCTL_RUNNER_MEMORY_PRESSURE="0",  # no memory watch: what a spike faster than the watch gets
    )
    srv.start()
    yield srv
    remove_installation(kube.kubeconfig, kube_namespace, srv)


@pytest.fixture(scope="module")
def pressured(
    kube: KubeCluster, kube_namespace: str, docker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The default memory watch (90 %), and no checkpoints: a draft that comes back is the
    memory-pressure one."""
    base_image(docker, "bash")
    srv = kube_server(kube.kubeconfig, kube_namespace, tmp_path_factory.mktemp("kube-oom-watch") / "data")
    srv.start()
    yield srv
    remove_installation(kube.kubeconfig, kube_namespace, srv)


def log_of(client: httpx.Client, rid: str) -> list[dict[str, Any]]:
    body = client.get(f"/runtimes/{rid}/log").json()
    return list(body["entries"] if isinstance(body, dict) else body)


def terminated_reason(core: Any, namespace: str, name: str, bound: float) -> dict[str, Any]:
    """How the pod's container ended, as the kubelet reports it (read before envctl removes the pod)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, namespace)
        for c in pod.status.container_statuses or []:
            if c.state.terminated is not None:
                return {"reason": c.state.terminated.reason, "exit_code": c.state.terminated.exit_code}
        time.sleep(0.1)
    raise AssertionError(f"the pod {name}'s container did not end within {bound:.0f} s")


def test_a_pod_past_its_memory_limit_is_oom_killed_and_the_runtime_is_an_oom_error_with_its_last_checkpoint(
    server: Server, kube: KubeCluster, kube_namespace: str
) -> None:
    core = core_api(kube.kubeconfig)
    try:
        with server.client() as client:
            rid = new_runtime(client, "hog", environment="bash", language="bash", machine_type="small")  # 256 MiB
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
            assert rt["state"] == "running", (rt, server.output()[-3000:])
            assert run(client, rid, "echo before > /root/before.txt")["status"] == "ok"
            deadline = time.monotonic() + 30
            while not any(e.get("reason") == "checkpoint" for e in log_of(client, rid)):
                assert time.monotonic() < deadline, log_of(client, rid)
                time.sleep(0.5)
            (pod,) = pods_of(core, kube_namespace, rid)
            # one cell: no checkpoint runs beside a cell, so /root/after.txt is in none
            hog = f"echo after > /root/after.txt; {AGENT_FIRST}; python3 -c {shlex.quote(HOG)}"
            r = client.post(f"/runtimes/{rid}/executions", json={"code": hog, "timeout": 60})
            assert r.status_code == 202, r.text
            killed = terminated_reason(core, kube_namespace, pod.metadata.name, 60)
            assert killed == {"reason": "OOMKilled", "exit_code": 137}, killed  # the kubelet's own word
            dead = server.wait_state(client, rid, {"error", "stopped"}, timeout=60)
            assert dead["state"] == "error" and dead["state_reason"] == "oom", dead
            message = dead["state_message"]
            assert "ran out of memory" in message, message
            assert "could not be kept, but its last draft comes back at the next boot" in message, message
            entries = log_of(client, rid)
            assert any(e.get("state") == "error" and e.get("reason") == "oom" for e in entries), entries
            wait_no_pod(core, kube_namespace, rid, 40)
            print(f"\nkubelet: {pod.metadata.name} OOM-killed; runner log: {message}")
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            again = server.wait_state(client, rid, {"running", "error"}, timeout=240)
            assert again["state"] == "running", again
            got = text(
                run(client, rid, "cat /root/before.txt; test -e /root/after.txt && echo after-kept || echo after-lost")
            )
            assert got.split() == ["before", "after-lost"], got
            client.delete(f"/runtimes/{rid}")
    finally:
        core.api_client.close()


# grows by 4 MiB every 50 ms (80 MiB/s: a loop that loads data, not one huge allocation), every page touched
GROW = (
    "import time\nx = []\nwhile True:\n"
    "    b = bytearray(4 << 20)\n    b[::4096] = b'y' * ((4 << 20) // 4096)\n    x.append(b)\n    time.sleep(0.05)"
)


def test_a_cell_growing_past_the_memory_line_gets_a_draft_before_the_memory_killer_ends_the_runtime(
    pressured: Server, kube: KubeCluster, kube_namespace: str
) -> None:
    core = core_api(kube.kubeconfig)
    server = pressured
    try:
        with server.client() as client:
            rid = new_runtime(client, "grow", environment="bash", language="bash", machine_type="small")  # 256 MiB
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
            assert rt["state"] == "running", (rt, server.output()[-3000:])
            assert run(client, rid, "echo before > /root/before.txt")["status"] == "ok"
            (pod,) = pods_of(core, kube_namespace, rid)
            grow = f"echo after > /root/after.txt; {AGENT_FIRST}; python3 -c {shlex.quote(GROW)}"
            r = client.post(f"/runtimes/{rid}/executions", json={"code": grow, "timeout": 120})
            assert r.status_code == 202, r.text
            execution = r.json()["id"]
            killed = terminated_reason(core, kube_namespace, pod.metadata.name, 120)
            assert killed == {"reason": "OOMKilled", "exit_code": 137}, killed  # the kubelet's own word
            dead = server.wait_state(client, rid, {"error", "stopped"}, timeout=60)
            assert dead["state"] == "error" and dead["state_reason"] == "oom", dead
            message = dead["state_message"]
            assert "ran out of memory" in message, message
            assert "could not be kept, but its last draft comes back at the next boot" in message, message
            named = f"the memory-pressure draft, taken while cell {execution} was paused near the memory limit"
            assert named in message, message
            entries = log_of(client, rid)
            drafts = [e for e in entries if e.get("event") == "draft-kept"]
            assert [d["reason"] for d in drafts] == ["memory-pressure"], entries  # the only draft: no checkpoints here
            assert f"taken while cell {execution} was paused near the memory limit" in drafts[0]["message"], drafts
            assert any(e.get("state") == "error" and e.get("reason") == "oom" for e in entries), entries
            wait_no_pod(core, kube_namespace, rid, 40)
            print(f"\nkubelet: {pod.metadata.name} OOM-killed; draft: {drafts[0]['message']}; runner log: {message}")
            assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
            again = server.wait_state(client, rid, {"running", "error"}, timeout=240)
            assert again["state"] == "running", again
            got = text(
                run(client, rid, "cat /root/before.txt; test -e /root/after.txt && echo after-kept || echo after-lost")
            )
            assert got.split() == ["before", "after-kept"], got  # written in the cell that ran out of memory
            client.delete(f"/runtimes/{rid}")
    finally:
        core.api_client.close()
