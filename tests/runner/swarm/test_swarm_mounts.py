"""Mounts and results on the Swarm backend (issue 15 item 4), on the real three-engine swarm of
``scripts/swarm-fixture``: git and S3 mounts prepared on envctl's host (the git server and the
S3 endpoint on loopback, allowed for this server only) and streamed into a runtime on a worker;
a result written on a worker downloaded through the API; a named volume pinning its runtime to
the worker that holds it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.mounts.s3 import S3Cache
from tests.fixtures.git_http import GitServer, start_git_server
from tests.fixtures.s3 import S3Endpoint, start_s3
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.fixtures.swarm import Swarm
from tests.fixtures.swarm_envctl import remove_installation, swarm_server
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.swarm.test_swarm_backend import log_of, service_of

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    yield from start_git_server(tmp_path_factory.mktemp("git-server"))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    yield from start_s3()  # the fake AWS credentials reach the server through its environment


@pytest.fixture(scope="module")
def server(swarm: Swarm, docker: Any, s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = swarm_server(
        swarm,
        tmp_path_factory.mktemp("swarm-mounts") / "data",
        ENVCTL_MOUNTS_ALLOW_HOSTS="127.0.0.1",
        ENVCTL_MOUNTS_S3_ENDPOINT_URL=s3.url,
    )
    srv.start()
    yield srv
    remove_installation(swarm, srv)
    for node in ("manager", "worker1", "worker2"):  # the named volumes the runtimes made on the nodes
        for name in swarm.docker(node, "volume", "ls", "-q", "--filter", "name=envctl-vol-", check=False).split():
            swarm.docker(node, "volume", "rm", "-f", name, check=False)


def start(server: Server, client: httpx.Client, rid: str) -> dict[str, Any]:
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    return server.wait_state(client, rid, {"running", "error"}, timeout=240)


def node_of(manager: Any, rid: str) -> str:
    tasks = manager.api.tasks(filters={"service": service_of(manager, rid)["ID"]})
    running = [t for t in tasks if (t.get("Status") or {}).get("State") == "running"]
    assert running, tasks
    return str(manager.api.inspect_node(running[0]["NodeID"])["Description"]["Hostname"])


def anonymous_volumes(swarm: Swarm, node: str) -> list[str]:
    """Volumes on the node whose names are the engine's (64 hex): the ones a task's mount
    without a source made."""
    out = swarm.docker(node, "volume", "ls", "-q", check=False).split()
    return [v for v in out if len(v) == 64 and all(c in "0123456789abcdef" for c in v)]


def test_git_and_s3_mounts_are_streamed_into_a_runtime_on_a_worker_and_recorded(
    server: Server, git_server: GitServer, s3: S3Endpoint, manager: Any, swarm: Swarm, tmp_path: Path
) -> None:
    commit = git_server.make_repo("code", {"lib/answer.sh": "ANSWER=42\n", "README": "hello\n"})
    bucket: Any = S3Cache(tmp_path, s3.url).client
    bucket.create_bucket(Bucket="swarm-mounts")
    bucket.put_object(Bucket="swarm-mounts", Key="in/table.csv", Body=b"x,y\n1,2\n")
    bucket.put_object(Bucket="swarm-mounts", Key="in/deep/more.txt", Body=b"more")
    mounts = [
        {"type": "git", "url": f"{git_server.url}/code.git", "ref": "main", "target": "/mnt/code"},
        {"type": "s3", "bucket": "swarm-mounts", "prefix": "in/", "target": "/data/in"},
    ]
    with server.client() as client:
        rid = new_runtime(client, "mounted", environment="bash", language="bash", machine_type="w1", mounts=mounts)
        rt = start(server, client, rid)
        assert rt["state"] == "running", (rt, server.output()[-3000:])
        assert rt["node"] == "swarm-worker1" == node_of(manager, rid)
        assert rt["mounts_used"][0]["commit"] == commit
        assert rt["mounts_used"][1]["objects"] == 2 and rt["progress"] is None
        log = [e["message"] for e in log_of(client, rid)]
        assert any(m.startswith("mounted /mnt/code: git") for m in log), log
        ex = run(
            client,
            rid,
            ". /mnt/code/lib/answer.sh; echo $ANSWER; cat /mnt/code/README; sed -n 2p /data/in/table.csv; "
            "cat /data/in/deep/more.txt; echo; stat -c %a /mnt/code/lib/answer.sh; hostname",
        )
        assert ex["status"] == "ok", ex
        assert text(ex).split() == ["42", "hello", "1,2", "more", "444", rt["name"]], ex
        assert ex["mounts"][0]["commit"] == commit and ex["mounts"][1]["etags"] == rt["mounts_used"][1]["etags"]
        # the mounts reached the node as files over the channel: the task names no host path
        spec = service_of(manager, rid)["Spec"]["TaskTemplate"]["ContainerSpec"]
        kinds = {m["Target"]: (m["Type"], m.get("Source")) for m in spec["Mounts"]}
        assert kinds["/mnt/code"] == ("volume", None) and kinds["/data/in"] == ("volume", None), kinds
        assert all(m["Type"] != "bind" for m in spec["Mounts"]), spec["Mounts"]
        made = set(anonymous_volumes(swarm, "worker1"))
        assert len(made) >= 3  # /mnt/code, /data/in, /results
        assert client.delete(f"/runtimes/{rid}").status_code == 204
        # the volumes the mounts and /results were unpacked into went with the container
        deadline = time.monotonic() + 20
        while made & set(anonymous_volumes(swarm, "worker1")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert made & set(anonymous_volumes(swarm, "worker1")) == set()


def test_mounts_are_validated_before_any_network_call_and_writeback_is_refused_on_swarm(
    server: Server, manager: Any
) -> None:
    """The same checks as on the local engine (R28: link-local, metadata and private addresses,
    ``file://``, option injection) answer 422 before anything is fetched; a written-back S3 mount
    is refused at boot, before any download, naming the mount; no service is made."""
    with server.client() as client:
        for url in ("https://169.254.169.254/x.git", "https://10.1.2.3/x.git", "file:///etc", "--upload-pack=x"):
            bad = [{"type": "git", "url": url, "target": "/mnt/code"}]
            r = client.post("/runtimes", json={"environment": "bash", "name": "bad", "mounts": bad})
            assert r.status_code == 422 and "mounts[0]" in r.text, (url, r.text)
        mounts = [{"type": "s3", "bucket": "swarm-mounts", "prefix": "out/", "target": "/data/out", "writeback": True}]
        rid = new_runtime(client, "writeback", environment="bash", language="bash", machine_type="w1", mounts=mounts)
        rt = start(server, client, rid)
        assert rt["state"] == "error" and rt["state_reason"] == "mount-failed", rt
        assert "mounts[0]" in rt["state_message"] and "writeback" in rt["state_message"], rt
        assert manager.api.services(filters={"label": f"envctl.runtime-id={rid}"}) == []
        client.delete(f"/runtimes/{rid}")


def test_a_result_written_on_a_worker_is_downloadable_through_the_api(server: Server, manager: Any) -> None:
    with server.client() as client:
        rid = new_runtime(client, "results", environment="bash", language="bash", machine_type="w2")
        rt = start(server, client, rid)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker2", rt
        ex = run(client, rid, "mkdir -p /results/plots; printf 'a,b\\n1,2\\n' > /results/plots/t.csv; echo done")
        assert ex["status"] == "ok", ex
        found = client.get(f"/runtimes/{rid}/results").json()
        assert [(r["path"], r["size"], r["execution_id"]) for r in found] == [("plots/t.csv", 8, ex["id"])], found
        body = client.get(f"/results/{found[0]['id']}/content")
        assert body.status_code == 200 and body.content == b"a,b\n1,2\n"
        # unchanged: no new version; changed: a new version from the next cell
        ex2 = run(client, rid, "true")
        assert client.get(f"/executions/{ex2['id']}/results").json() == []
        ex3 = run(client, rid, "echo more >> /results/plots/t.csv; head -c 300000 /dev/urandom > /results/big.bin")
        versions = {(r["path"], r["size"]) for r in client.get(f"/executions/{ex3['id']}/results").json()}
        assert versions == {("plots/t.csv", 13), ("big.bin", 300000)}, versions
        # booted again (on any node), the runtime finds what its cells wrote, as a bound directory keeps it
        assert client.post(f"/runtimes/{rid}/stop").status_code == 202
        assert server.wait_state(client, rid, {"stopped", "error"}, timeout=60)["state"] == "stopped"
        assert client.patch(f"/runtimes/{rid}", json={"machine_type": "w1"}).status_code == 200
        rt = start(server, client, rid)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker1", rt
        ex4 = run(client, rid, "cat /results/plots/t.csv; stat -c %s /results/big.bin; echo x > /results/new.txt")
        assert text(ex4).split() == ["a,b", "1,2", "more", "300000"], ex4
        assert [r["path"] for r in client.get(f"/executions/{ex4['id']}/results").json()] == ["new.txt"]
        assert client.delete(f"/runtimes/{rid}").status_code == 204
        # results outlive the runtime
        assert len(client.get(f"/runtimes/{rid}/results").json()) == 4


def test_a_named_volume_pins_its_runtime_to_the_worker_that_holds_it(server: Server, manager: Any) -> None:
    volume = [{"type": "volume", "name": "pinned-data", "target": "/home/data"}]
    with server.client() as client:
        rid = new_runtime(client, "vol-b", environment="bash", language="bash", machine_type="w2", mounts=volume)
        rt = start(server, client, rid)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker2", rt
        assert rt["mounts_used"][0]["node"] == "swarm-worker2", rt["mounts_used"]
        assert run(client, rid, "echo kept-on-b > /home/data/kept.txt")["status"] == "ok"
        assert client.post(f"/runtimes/{rid}/stop").status_code == 202
        assert server.wait_state(client, rid, {"stopped", "error"}, timeout=60)["state"] == "stopped"
        # a machine type any node fits: the pin alone brings it back to worker2, with its data
        assert client.patch(f"/runtimes/{rid}", json={"machine_type": "small"}).status_code == 200
        for _ in range(2):
            rt = start(server, client, rid)
            assert rt["state"] == "running", (rt, server.output()[-3000:])
            assert rt["node"] == "swarm-worker2" == node_of(manager, rid), rt
            constraints = service_of(manager, rid)["Spec"]["TaskTemplate"]["Placement"]["Constraints"]
            assert f"node.id=={manager.api.inspect_node('swarm-worker2')['ID']}" in constraints, constraints
            assert text(run(client, rid, "cat /home/data/kept.txt")).strip() == "kept-on-b"
            created = [e for e in log_of(client, rid) if e.get("event") == "container-created"][-1]
            assert "pinned to the node of its named volumes (/home/data)" in created["message"], created
            assert created["details"]["volume_nodes"] == {"/home/data": "swarm-worker2"}
            assert client.post(f"/runtimes/{rid}/stop").status_code == 202
            server.wait_state(client, rid, {"stopped", "error"}, timeout=60)
        # a machine type that names another worker cannot be placed: the boot says why
        assert client.patch(f"/runtimes/{rid}", json={"machine_type": "w1"}).status_code == 200
        rt = start(server, client, rid)
        assert rt["state"] == "error", rt
        assert "named volumes are on node swarm-worker2" in rt["state_message"], rt
        assert manager.api.services(filters={"label": f"envctl.runtime-id={rid}"}) == []
        client.delete(f"/runtimes/{rid}")


def test_a_leased_runtime_with_git_and_s3_mounts_goes_with_its_mounts_when_its_client_stops_beating(
    server: Server, git_server: GitServer, s3: S3Endpoint, manager: Any, swarm: Swarm, tmp_path: Path
) -> None:
    """A lease and streamed mounts together on a worker: the mounts arrive and are recorded, the
    heartbeat keeps the runtime past its lease, and once the client stops renewing, the runtime
    is deleted and its service and the volumes its mounts were unpacked into leave the worker."""
    lease = 8
    git_server.make_repo("leased", {"x.sh": "X=leased\n"})
    bucket: Any = S3Cache(tmp_path, s3.url).client
    bucket.create_bucket(Bucket="swarm-leased")
    bucket.put_object(Bucket="swarm-leased", Key="in/a.txt", Body=b"from-s3")
    mounts = [
        {"type": "git", "url": f"{git_server.url}/leased.git", "ref": "main", "target": "/mnt/leased"},
        {"type": "s3", "bucket": "swarm-leased", "prefix": "in/", "target": "/data/leased"},
    ]
    with server.client() as client:
        rid = new_runtime(
            client, "leased-mounts", environment="bash", language="bash", machine_type="w1", mounts=mounts, lease=lease
        )
        before = set(anonymous_volumes(swarm, "worker1"))
        rt = start(server, client, rid)
        assert rt["state"] == "running" and rt["node"] == "swarm-worker1", rt
        ex = run(client, rid, ". /mnt/leased/x.sh; echo $X; cat /data/leased/a.txt")
        assert text(ex).split() == ["leased", "from-s3"], ex
        made = set(anonymous_volumes(swarm, "worker1")) - before  # this runtime's
        assert len(made) >= 3  # /mnt/leased, /data/leased, /results
        for _ in range(3):  # past the lease, kept by the heartbeat
            time.sleep(lease / 2)
            assert client.post(f"/runtimes/{rid}/lease").status_code == 200
        assert client.get(f"/runtimes/{rid}").json()["state"] == "running"
        stopped_beating = time.monotonic()
        while client.get(f"/runtimes/{rid}").status_code != 404:
            assert time.monotonic() - stopped_beating < lease + 30, "the runtime outlived its lease"
            time.sleep(0.3)
        assert manager.api.services(filters={"label": f"envctl.runtime-id={rid}"}) == []
        deadline = time.monotonic() + 20
        while made & set(anonymous_volumes(swarm, "worker1")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert made & set(anonymous_volumes(swarm, "worker1")) == set()
