"""Drafts on Swarm and draining a node (issue 15 items 2 and 5) on the real three-engine swarm of
``scripts/swarm-fixture``: a draft made on one worker restored on the other with every file the
same; a drain done by the operator behind envctl's back (SIGTERM to the agent, which waits for
envctl to take its draft); ``envctl nodes drain`` stopping its runtimes with a draft first.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest

from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm, set_availability
from tests.fixtures.swarm_envctl import machine_types, remove_installation, swarm_server
from tests.fixtures.transfer import cli_json
from tests.runner.cells.test_docker_executions import new_runtime, run, text

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
STOP_BOUND = 15.0  # seconds a stop with a draft may take (the agent's SIGTERM wait is 20 s)

# the work: files of every kind, and a file of the version deleted
WORK = (
    "mkdir -p /opt/t/sub && head -c 300000 /dev/urandom > /opt/t/blob && echo hello > /opt/t/sub/x"
    " && chmod 640 /opt/t/blob && ln -s sub/x /opt/t/link && rm /etc/issue && "
)
CHECKSUMS = (
    "find /opt/t -type f | sort | xargs sha256sum; stat -c '%n %a %F' /opt/t /opt/t/*;"
    " test -e /etc/issue && echo issue-present || echo issue-gone"
)


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(swarm, tmp_path_factory.mktemp("swdrafts") / "data")
    types = machine_types(
        {"workers": {"cpus": 0.25, "memory": "256m", "pids": 256, "constraints": ["node.role==worker"]}}
    )
    (srv.data_dir / "config.yaml").write_text(json.dumps({"machine_types": types}))
    srv.start()
    yield srv
    remove_installation(swarm, srv)
    for node in swarm.nodes:  # the named volume of the pinned runtime, on its node
        for name in swarm.docker(node, "volume", "ls", "-q", "--filter", "name=envctl-vol-", check=False).split():
            swarm.docker(node, "volume", "rm", "-f", name, check=False)


def availability(manager: Any, node: str, value: str) -> None:
    set_availability(manager, f"swarm-{node}", value)


def boot(server: Server, client: httpx.Client, rid: str) -> dict[str, Any]:
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    return server.wait_state(client, rid, {"running", "error"}, timeout=240)


def with_work(server: Server, client: httpx.Client, name: str, machine: str) -> tuple[str, str]:
    """A runtime on ``machine`` holding unsaved work: its id and the work's checksums."""
    rid = new_runtime(client, name, environment="bash", language="bash", machine_type=machine)
    rt = boot(server, client, rid)
    assert rt["state"] == "running", (rt, server.output()[-3000:])
    made = run(client, rid, WORK + CHECKSUMS)
    assert made["status"] == "ok", made
    assert "/opt/t/blob" in text(made) and "issue-gone" in text(made)
    return rid, text(made)


def log_of(client: httpx.Client, rid: str) -> list[dict[str, Any]]:
    body = client.get(f"/runtimes/{rid}/log").json()
    return list(body["entries"] if isinstance(body, dict) else body)


def boot_elsewhere(server: Server, client: httpx.Client, rid: str, machine: str, node: str, work: str) -> None:
    """Boot again on ``machine``: it lands on ``node`` and its files are the work's, every one."""
    r = client.patch(f"/runtimes/{rid}", json={"machine_type": machine})
    assert r.status_code == 200, r.text
    rt = boot(server, client, rid)
    assert rt["state"] == "running", (rt, server.output()[-3000:])
    assert rt["node"] == f"swarm-{node}", rt
    assert any(e.get("event") == "restoring" for e in log_of(client, rid))
    read = run(client, rid, CHECKSUMS)
    assert read["status"] == "ok", read
    assert text(read) == work


def gone_from(swarm: Swarm, node: str, rid: str) -> float:
    """Seconds until the runtime's container is gone from the node's engine (bounded by 40 s)."""
    began = time.monotonic()
    worker = docker.DockerClient(base_url=swarm.host(node), timeout=30)
    try:
        while worker.api.containers(all=True, filters={"label": f"envctl.runtime-id={rid}"}):
            if time.monotonic() - began > 40:
                break
            time.sleep(0.2)
    finally:
        worker.close()
    return time.monotonic() - began


def test_a_draft_made_on_worker1_is_restored_on_worker2_with_every_file_the_same(server: Server, swarm: Swarm) -> None:
    with server.client() as client:
        rid, work = with_work(server, client, "drafter", "w1")
        assert client.get(f"/runtimes/{rid}").json()["node"] == "swarm-worker1"
        began = time.monotonic()
        assert client.post(f"/runtimes/{rid}/stop").status_code in (200, 202)
        stopped = server.wait_state(client, rid, {"stopped", "error"}, timeout=120)
        took = time.monotonic() - began
        after = gone_from(swarm, "worker1", rid)
        print(f"\nstop with a draft: {took:.1f} s to stopped, container gone {after:.1f} s later")
        assert after < STOP_BOUND, f"the container stayed {after:.1f} s after the stop"
        assert stopped["state"] == "stopped", stopped
        # envctl tells the agent it stops it: its SIGTERM does not wait out the 20 s for a draft
        assert took < STOP_BOUND, f"the stop took {took:.1f} s"
        kept = [e for e in log_of(client, rid) if e.get("event") == "draft-kept"]
        assert kept and kept[-1]["details"]["repository"] == f"envctl-drafts/{rid}", kept
        boot_elsewhere(server, client, rid, "w2", "worker2", work)  # a cell ran since: no draft taken
        began = time.monotonic()
        assert client.delete(f"/runtimes/{rid}").status_code in (200, 202, 204)
        took = gone_from(swarm, "worker2", rid)
        print(f"container gone {took:.1f} s after a delete that followed a cell")
        assert took < STOP_BOUND, f"the container stayed {took:.1f} s: the agent was not told envctl stops it"


def test_an_idle_shutdown_on_worker2_keeps_a_draft_that_boots_on_worker1(server: Server, swarm: Swarm) -> None:
    with server.client() as client:
        rid, work = with_work(server, client, "idler", "w2")
        r = client.patch(f"/runtimes/{rid}", json={"idle_timeout": 2})
        assert r.status_code == 200, r.text
        stopped = server.wait_state(client, rid, {"stopped", "error"}, timeout=120)
        assert stopped["state"] == "stopped" and stopped["state_reason"] == "idle", stopped
        assert any(e.get("event") == "draft-kept" for e in log_of(client, rid))
        r = client.patch(f"/runtimes/{rid}", json={"idle_timeout": 600})
        assert r.status_code == 200, r.text
        boot_elsewhere(server, client, rid, "w1", "worker1", work)
        client.delete(f"/runtimes/{rid}")
        assert (took := gone_from(swarm, "worker1", rid)) < STOP_BOUND, f"its container stayed {took:.1f} s"


def test_a_drain_behind_envctls_back_keeps_the_work_through_the_agents_sigterm(server: Server, manager: Any) -> None:
    """The operator drains worker1 on the manager: Swarm sends the agent SIGTERM; the agent waits,
    envctl sees the task stopping, takes the draft, and the runtime says why it went."""
    with server.client() as client:
        rid, work = with_work(server, client, "sigtermed", "w1")
        began = time.monotonic()
        availability(manager, "worker1", "drain")
        try:
            rt = server.wait_state(client, rid, {"error", "stopped"}, timeout=60)
            print(f"\nterminated and draft kept after {time.monotonic() - began:.1f} s")
            assert rt["state_reason"] == "terminated", rt
            assert "draining" in rt["state_message"] and "unsaved changes were kept" in rt["state_message"], rt
            kept = [e for e in log_of(client, rid) if e.get("event") == "draft-kept"]
            assert kept and kept[-1]["reason"] == "terminated", kept
        finally:
            availability(manager, "worker1", "active")
        boot_elsewhere(server, client, rid, "w2", "worker2", work)
        client.delete(f"/runtimes/{rid}")


def test_draining_a_node_stops_its_runtimes_with_a_draft_and_the_next_boot_lands_elsewhere(
    server: Server, manager: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with server.client() as client:
        rid, work = with_work(server, client, "drained", "w1")
        other, _ = with_work(server, client, "bystander", "w2")
        r = client.post("/users", json={"name": f"plain-{rid[-6:]}"})
        assert r.status_code == 201, r.text
        plain = {"Authorization": f"Bearer {r.json()['token']}"}
        refused = client.post("/nodes/swarm-worker1/drain", headers=plain)
        assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"], refused.text
        unknown = client.post("/nodes/swarm-nowhere/drain")
        assert unknown.status_code == 404 and "swarm-nowhere" in unknown.json()["error"]["message"], unknown.text
        try:
            done = cli_json(server, capsys, "nodes", "drain", "swarm-worker1")
            assert done["availability"] == "drain" and done["stopped"] == [rid], done
            rt = client.get(f"/runtimes/{rid}").json()
            assert rt["state"] == "stopped", rt
            why = [e for e in log_of(client, rid) if e.get("reason") == "node-drain"]
            assert why and "swarm-worker1 is being drained" in why[0]["message"], why
            assert any(e.get("event") == "draft-kept" for e in log_of(client, rid))
            nodes = {n["name"]: n for n in client.get("/nodes").json()}
            assert nodes["swarm-worker1"]["health"]["availability"] == "drain"
            assert client.get(f"/runtimes/{other}").json()["state"] == "running"  # another node's: untouched
            boot_elsewhere(server, client, rid, "workers", "worker2", work)  # worker1 takes nothing now
        finally:
            back = cli_json(server, capsys, "nodes", "activate", "swarm-worker1")
        assert back["availability"] == "active"
        assert {n["name"]: n for n in client.get("/nodes").json()}["swarm-worker1"]["health"][
            "availability"
        ] == "active"
        for r_id in (rid, other):
            client.delete(f"/runtimes/{r_id}")


def test_draining_the_node_of_a_volume_pinned_runtime_keeps_its_draft_and_its_boot_says_it_cannot_move(
    server: Server, manager: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A runtime pinned to worker1 by its named volume cannot move when worker1 is drained: the
    drain stops it with its draft like any other; its next boot fails at once (not after the
    pending timeout) saying the volume's node is drained and how to bring it back; once the
    node is active again it boots there with its draft and its volume's data."""
    volume = [{"type": "volume", "name": f"pinned-{uuid.uuid4().hex[:6]}", "target": "/home/data"}]
    with server.client() as client:
        rid = new_runtime(client, "pinned", environment="bash", language="bash", machine_type="w1", mounts=volume)
        rt = boot(server, client, rid)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker1", rt
        assert run(client, rid, "echo in-volume > /home/data/v; echo in-draft > /root/d")["status"] == "ok"
        try:
            done = cli_json(server, capsys, "nodes", "drain", "swarm-worker1")
            assert done["stopped"] == [rid], done
            assert any(e.get("event") == "draft-kept" for e in log_of(client, rid))
            assert client.patch(f"/runtimes/{rid}", json={"machine_type": "small"}).status_code == 200
            began = time.monotonic()
            rt = boot(server, client, rid)
            assert rt["state"] == "error", rt
            assert time.monotonic() - began < 15  # at once, not after ENVCTL_SWARM_PENDING_TIMEOUT and more
            message = rt["state_message"]
            assert "named volumes are on node swarm-worker1, which is drained" in message, message
            assert "envctl nodes activate swarm-worker1" in message, message
            assert manager.api.services(filters={"label": f"envctl.runtime-id={rid}"}) == []
        finally:
            cli_json(server, capsys, "nodes", "activate", "swarm-worker1")
        rt = boot(server, client, rid)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker1", rt
        assert text(run(client, rid, "cat /home/data/v /root/d")).split() == ["in-volume", "in-draft"]
        client.delete(f"/runtimes/{rid}")


def test_a_save_asked_to_wait_answers_when_it_ended_on_a_worker(server: Server) -> None:
    """``POST /runtimes/{id}/save?wait=S`` on Swarm: the in-runtime save answers once it ended,
    with its spans; without ``wait`` it answers at once; past 30 s it is a 422."""
    with server.client() as client:
        rid = new_runtime(client, "timed", environment="bash", language="bash", machine_type="w2")
        assert boot(server, client, rid)["state"] == "running"
        assert run(client, rid, "head -c 2000000 /dev/urandom > /root/blob")["status"] == "ok"
        t = time.monotonic()
        r = client.post(f"/runtimes/{rid}/save", params={"wait": 30}, json={"environment": "timed"})
        took_ms = (time.monotonic() - t) * 1000
        assert r.status_code == 202, r.text
        op = r.json()
        assert op["status"] == "succeeded" and op["result"]["version"] == "timed@1", op
        spans = op["result"]["timings_ms"]
        assert "total" in spans and all(0 <= ms <= spans["total"] for ms in spans.values()), spans
        assert spans["total"] <= took_ms, (spans, took_ms)
        saved = [e for e in log_of(client, rid) if e.get("event") == "saved"]
        assert [e["message"] for e in saved] == ["saved as timed@1"], saved
        assert run(client, rid, "echo more > /root/more")["status"] == "ok"
        r = client.post(f"/runtimes/{rid}/save", json={"environment": "timed"})
        assert r.status_code == 202 and r.json()["status"] in ("running", "succeeded"), r.text
        later = client.get(f"/operations/{r.json()['id']}", params={"wait": 30}).json()
        assert later["status"] == "succeeded" and later["result"]["version"] == "timed@2", later
        bad = client.post(f"/runtimes/{rid}/save", params={"wait": 31}, json={"environment": "timed"})
        assert bad.status_code == 422 and "wait" in bad.text, bad.text
        client.delete(f"/runtimes/{rid}")
