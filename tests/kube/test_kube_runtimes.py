"""The Kubernetes backend (issue 18) on the real single-node cluster of ``scripts/kube-fixture``:
one ``envctl serve`` per module with ``ENVCTL_RUNNER_BACKEND=kubernetes`` in the module's
namespace, its managed registry on loopback (the node's containerd pulls from it with a pull
grant). Boot, cells, interrupt, the pod's spec, secrets (R6, R40), a save booted again, drafts
after a stop and an idle shutdown, a pod deleted behind envctl's back, an unschedulable pod,
envctl killed and adopting, nodes, and a second installation in the same namespace (R32).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from envs.kit.db import Database
from registry.team_secrets import SecretBox
from runner.agentauth import AgentLinks
from runner.models import Runtime
from tests.conftest import TEST_SESSION
from tests.fixtures.kube import KubeCluster
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.kube.envctl_server import core_api, kube_server, pods_of, remove_installation, wait_no_pod
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.runtimes.killed_client import notebook, run_and_kill, wait_deleted

pytestmark = [pytest.mark.kube, pytest.mark.slow]

STORAGE_CLASS = f"envctl-test-{TEST_SESSION}"  # the module's named volumes bind to a PV made with this class
LEASE = 6  # seconds of a lease-bound runtime's lease
STOP_BOUND = 15.0  # seconds a stop with a draft may take (the agent's SIGTERM wait is 20 s)
WORK = (
    "mkdir -p /opt/t/sub && head -c 300000 /dev/urandom > /opt/t/blob && echo hello > /opt/t/sub/x"
    " && chmod 640 /opt/t/blob && ln -s sub/x /opt/t/link && rm /etc/issue && "
)
CHECKSUMS = (
    "find /opt/t -type f | sort | xargs sha256sum; stat -c '%n %a %F' /opt/t /opt/t/*;"
    " test -e /etc/issue && echo issue-present || echo issue-gone"
)


@pytest.fixture(scope="module")
def namespace(kube_namespace: str) -> str:
    return kube_namespace


@pytest.fixture(scope="module")
def server(
    kube: KubeCluster, namespace: str, docker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = kube_server(
        kube.kubeconfig, namespace, tmp_path_factory.mktemp("kube") / "data", ENVCTL_KUBE_STORAGE_CLASS=STORAGE_CLASS
    )
    srv.start()
    with srv.client() as client:
        assert client.post("/teams", json={"name": "acme"}).status_code == 201
    yield srv
    remove_installation(kube.kubeconfig, namespace, srv)


@pytest.fixture(scope="module")
def core(kube: KubeCluster) -> Iterator[Any]:
    api = core_api(kube.kubeconfig)
    yield api
    api.api_client.close()


def boot(server: Server, client: httpx.Client, name: str, machine: str = "small", **body: Any) -> dict[str, Any]:
    rid = new_runtime(
        client, name, environment=body.pop("environment", "bash"), language="bash", machine_type=machine, **body
    )
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    return server.wait_state(client, rid, {"running", "error"}, timeout=240)


def log_of(client: httpx.Client, rid: str) -> list[dict[str, Any]]:
    body = client.get(f"/runtimes/{rid}/log").json()
    return list(body["entries"] if isinstance(body, dict) else body)


def recorded(srv: Server, rid: str) -> dict[str, Any]:
    db = Database(f"sqlite:///{srv.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            row = s.get(Runtime, rid)
            assert row is not None
            return dict(row.backend_state or {})
    finally:
        db.dispose()


def raw_pod(core: Any, namespace: str, rid: str) -> dict[str, Any]:
    (pod,) = pods_of(core, namespace, rid)
    return dict(core.api_client.sanitize_for_serialization(pod))


def test_a_pod_boots_runs_cells_is_interrupted_and_carries_the_baseline(
    server: Server, core: Any, namespace: str, kube: KubeCluster
) -> None:
    """Boot, cells keeping state, an interrupt; R1 as the pod spec says it and the container sees it."""
    with server.client() as client:
        rt = boot(server, client, "cells")
        assert rt["state"] == "running", (rt, server.output()[-4000:])
        assert rt["node"] == kube.node, rt
        ex = run(
            client, rt["id"], "export KEPT=7; echo $((6 * 7)); grep -E 'NoNewPrivs|CapEff|Seccomp:' /proc/self/status"
        )
        assert ex["status"] == "ok", ex
        out = text(ex)
        assert "42" in out and "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out, out
        assert "kept=7" in text(run(client, rt["id"], "echo kept=$KEPT"))
        r = client.post(f"/runtimes/{rt['id']}/executions", json={"code": "sleep 60; echo never"})
        assert r.status_code == 202, r.text
        eid = r.json()["id"]
        time.sleep(1)
        assert client.post(f"/executions/{eid}/interrupt").status_code in (200, 202)
        done = client.get(f"/executions/{eid}", params={"wait": 20}).json()
        assert done["status"] in ("interrupted", "error") and "never" not in text(done), done
        assert "after=ok" in text(run(client, rt["id"], "echo after=ok"))
        pod = raw_pod(core, namespace, rt["id"])
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
        (c,) = spec["containers"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"] == {"cpu": "250m", "memory": str(256 * 1024**2)}
        assert pod["metadata"]["labels"]["envctl.runner"] == server.env["ENVCTL_RUNNER_NAME"]
        assert not any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in c["volumeMounts"])
        assert not [v for v in spec["volumes"] if "hostPath" in v], spec["volumes"]  # no host path, no engine socket
        assert c["securityContext"]["privileged"] is False
        events = {e["event"] for e in log_of(client, rt["id"])}
        assert {"container-created", "pod-scheduled"} <= events, events
        assert "NetworkPolicy" in server.output() and "enforces NetworkPolicy" in server.output()
        nodes = client.get("/nodes").json()
        assert [n["name"] for n in nodes] == [kube.node], nodes
        assert rt["id"] in nodes[0]["runtimes"] and nodes[0]["health"]["state"] == "ready"
        assert client.delete(f"/runtimes/{rt['id']}").status_code in (200, 202, 204)
        wait_no_pod(core, namespace, rt["id"], STOP_BOUND)


def test_secrets_and_the_credential_are_in_no_pod_field_event_or_log(server: Server, core: Any, namespace: str) -> None:
    """R6 and R40: the runtime's secret reaches the cell from a memory file, and is in no pod
    field, Secret, event or log; the credential's Secret is owned by the pod; the pull secret is
    gone once the pod runs."""
    value = f"kube-S3cret-{uuid.uuid4().hex[:8]}"
    with server.client() as client:
        assert client.put("/teams/acme/secrets/kubepw", json={"value": value}).status_code in (200, 201)
        rid = new_runtime(
            client,
            "secretive",
            environment="bash",
            language="bash",
            machine_type="small",
            team="acme",
            env={"PLAIN": "visible", "PW": {"secret": "kubepw", "team": "acme"}},
        )
        client.post(f"/runtimes/{rid}/start")
        rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
        assert rt["state"] == "running", rt
        out = text(run(client, rid, 'echo "$PW" | rev; df -t tmpfs | grep -c -E "/run/secrets|/run/envctl"'))
        assert value[::-1] in out, out
        state = recorded(server, rid)
        key = AgentLinks(SecretBox(server.data_dir / "secrets.key")).address(rid, state["agent"]).key.hex()
        pod = raw_pod(core, namespace, rid)
        secrets = core.api_client.sanitize_for_serialization(
            core.list_namespaced_secret(namespace, label_selector=f"envctl.runtime-id={rid}")
        )["items"]
        events = core.api_client.sanitize_for_serialization(core.list_namespaced_event(namespace))
        logs = pod_log(core, namespace, pod)
        where = {"pod": pod, "events": events, "logs": logs, "secrets": secrets}
        for name, found in where.items():
            assert value not in json.dumps(found), f"the secret's value is in the {name}"
        for name in ("pod", "events", "logs"):
            blob = json.dumps(where[name])
            assert key not in blob and "PRIVATE KEY" not in blob, f"the agent's credential is in the {name}"
        (c,) = pod["spec"]["containers"]
        assert {"name": "PLAIN", "value": "visible"} in c["env"]
        assert all(e["name"] != "PW" for e in c["env"]) and not pod["metadata"].get("annotations", {}).get("PW")
        assert [s["metadata"]["labels"]["envctl.managed"] for s in secrets] == ["credential"], secrets
        (owner,) = secrets[0]["metadata"]["ownerReferences"]
        assert owner["kind"] == "Pod" and owner["uid"] == pod["metadata"]["uid"]
        client.delete(f"/runtimes/{rid}")
        wait_no_pod(core, namespace, rid, STOP_BOUND)
        assert not core.list_namespaced_secret(namespace, label_selector=f"envctl.runtime-id={rid}").items


def pod_log(core: Any, namespace: str, pod: dict[str, Any]) -> str:
    """The container's log: through the API server, else from the node's log files (this host
    is the node; the test cluster's API server may have no address to reach its kubelet at)."""
    try:
        return str(core.read_namespaced_pod_log(pod["metadata"]["name"], namespace))
    except Exception:
        meta = pod["metadata"]
        folder = Path("/var/log/pods") / f"{namespace}_{meta['name']}_{meta['uid']}"
        files = sorted(folder.glob("*/*.log"))
        assert files, f"no log of the pod in {folder}"
        return "".join(f.read_text(errors="replace") for f in files)


def with_work(server: Server, client: httpx.Client, name: str) -> tuple[str, str]:
    rt = boot(server, client, name)
    assert rt["state"] == "running", (rt, server.output()[-3000:])
    made = run(client, rt["id"], WORK + CHECKSUMS)
    assert made["status"] == "ok", made
    assert "/opt/t/blob" in text(made) and "issue-gone" in text(made)
    return rt["id"], text(made)


def boot_again(server: Server, client: httpx.Client, rid: str, work: str | None) -> str:
    """Boot the runtime again: it restores its draft; the files' checksums (``work``: as they must be)."""
    assert client.post(f"/runtimes/{rid}/start").status_code in (200, 202)
    rt = server.wait_state(client, rid, {"running", "error"}, timeout=240)
    assert rt["state"] == "running", (rt, server.output()[-3000:])
    assert any(e.get("event") == "restoring" for e in log_of(client, rid))
    read = run(client, rid, CHECKSUMS)
    assert read["status"] == "ok", read
    assert work is None or text(read) == work, read
    return text(read)


def saved_image(server: Server, repository: str, digest: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The saved version as the registry holds it: its config blob, and each layer's entries
    (name, content) read from its tar."""
    from api.settings import load
    from registry.uploads import own_token

    settings = load(env={**server.env, "ENVCTL_DATA_DIR": str(server.data_dir)})
    token = own_token(settings, {repository: ("pull",)})
    base = f"http://127.0.0.1:{server.env['ENVCTL_REGISTRY_PORT']}/v2/{repository}"
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60, follow_redirects=True) as reg:
        manifest = reg.get(f"{base}/manifests/{digest}", headers={"Accept": accept})
        assert manifest.status_code == 200, manifest.text
        body = manifest.json()
        config = reg.get(f"{base}/blobs/{body['config']['digest']}").content
        layers = []
        for layer in body["layers"]:
            blob = reg.get(f"{base}/blobs/{layer['digest']}").content
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
                for member in tar:
                    data = tar.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
                    layers.append((member.name, data))
    return config, layers


def test_a_save_boots_again_and_holds_no_secret_results_or_private_files(server: Server) -> None:
    """A save made in the pod, pushed through the registry, booted as a new pod. R7: the secret's
    value (plain, base64, URL-encoded) is in no layer and not in the config; R8: nothing of
    /results, /run/secrets or /run/envctl is in the new layer."""
    value = f"kube-save-S3cret/{uuid.uuid4().hex[:8]}+"
    with server.client() as client:
        assert client.put("/teams/acme/secrets/savepw", json={"value": value}).status_code in (200, 201)
        rt = boot(server, client, "writer", team="acme", env={"PW": {"secret": "savepw", "team": "acme"}})
        assert rt["state"] == "running", rt
        writer = rt["id"]
        made = run(client, writer, WORK + CHECKSUMS)
        assert made["status"] == "ok", made
        wrote = run(client, writer, 'echo "$PW" > /results/out.txt; ls /run/secrets /run/envctl | head -3')
        assert wrote["status"] == "ok", wrote
        r = client.post(f"/runtimes/{writer}/save", json={"environment": "acme/kubesave"})
        assert r.status_code in (200, 202), r.text
        op = r.json()
        deadline = time.monotonic() + 240
        while op["status"] == "running" and time.monotonic() < deadline:
            op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
        assert op["status"] == "succeeded", op
        (version,) = client.get("/environments/acme/kubesave").json()["versions"]
        config, entries = saved_image(server, "acme/kubesave", version["registry_digest"])
        forms = [value, base64.b64encode(value.encode()).decode(), urllib.parse.quote(value, safe="")]
        for form in forms:
            assert form.encode() not in config, "the secret is in the image config"
            assert not [n for n, data in entries if form.encode() in data or form in n], "the secret is in a layer"
        private = ("results/", "run/secrets/", "run/envctl/", "opt/envctl/agent/")
        assert not [n for n, _ in entries if n.lstrip("./").startswith(private)], [n for n, _ in entries][:50]
        assert any(n.lstrip("./") == "opt/t/blob" for n, _ in entries)
        reader = boot(server, client, "reader", environment="acme/kubesave")
        assert reader["state"] == "running", reader
        read = run(client, reader["id"], CHECKSUMS)
        assert text(read) == text(made), read
        for rid in (writer, reader["id"]):
            client.delete(f"/runtimes/{rid}")


def test_a_stop_and_an_idle_shutdown_keep_drafts_that_the_next_pods_restore(
    server: Server, core: Any, namespace: str
) -> None:
    with server.client() as client:
        rid, work = with_work(server, client, "drafter")
        began = time.monotonic()
        assert client.post(f"/runtimes/{rid}/stop").status_code in (200, 202)
        stopped = server.wait_state(client, rid, {"stopped", "error"}, timeout=120)
        took = time.monotonic() - began
        assert stopped["state"] == "stopped", stopped
        gone = wait_no_pod(core, namespace, rid, STOP_BOUND)
        print(f"\nkube stop with a draft: {took:.1f} s to stopped, pod gone {gone:.1f} s later")
        assert took < STOP_BOUND, f"the stop took {took:.1f} s"
        kept = [e for e in log_of(client, rid) if e.get("event") == "draft-kept"]
        assert kept and kept[-1]["details"]["repository"] == f"envctl-drafts/{rid}", kept
        boot_again(server, client, rid, work)
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 2}).status_code == 200
        run(client, rid, "echo more > /opt/t/more")
        stopped = server.wait_state(client, rid, {"stopped", "error"}, timeout=120)
        assert stopped["state"] == "stopped" and stopped["state_reason"] == "idle", stopped
        assert sum(e.get("event") == "draft-kept" for e in log_of(client, rid)) == 2
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 600}).status_code == 200
        again = boot_again(server, client, rid, None)
        blob = next(line for line in work.splitlines() if line.endswith("/opt/t/blob"))
        assert blob in again and "/opt/t/more" in again and "issue-gone" in again, again
        client.delete(f"/runtimes/{rid}")


def test_a_pod_deleted_behind_envctls_back_keeps_its_work_as_a_draft_and_says_why(
    server: Server, core: Any, namespace: str
) -> None:
    """``kubectl delete pod`` (grace period): the agent gets SIGTERM and waits; envctl sees the
    pod terminating at its next round, takes the draft, and the runtime is error (terminated)."""
    with server.client() as client:
        rid, work = with_work(server, client, "deleted")
        (pod,) = pods_of(core, namespace, rid)
        began = time.monotonic()
        core.delete_namespaced_pod(pod.metadata.name, namespace)
        rt = server.wait_state(client, rid, {"error", "stopped"}, timeout=60)
        print(f"\npod deleted: error and draft after {time.monotonic() - began:.1f} s")
        assert rt["state"] == "error" and rt["state_reason"] == "terminated", rt
        assert "unsaved changes were kept" in rt["state_message"], rt
        kept = [e for e in log_of(client, rid) if e.get("event") == "draft-kept"]
        assert kept and kept[-1]["reason"] == "terminated", kept
        wait_no_pod(core, namespace, rid, 40)
        boot_again(server, client, rid, work)
        client.delete(f"/runtimes/{rid}")


def test_an_unschedulable_pod_fails_naming_the_resource_and_leaves_nothing(
    server: Server, core: Any, namespace: str
) -> None:
    with server.client() as client:
        rt = boot(server, client, "toobig", "huge")
        assert rt["state"] == "error", rt
        message = rt["state_message"]
        assert "could not be placed" in message and "cpu (machine type huge asks 1000 CPUs)" in message, message
        assert "Insufficient cpu" in message, message  # the scheduler's own words
        assert any(e.get("event") == "pod-failedscheduling" for e in log_of(client, rt["id"]))
        wait_no_pod(core, namespace, rt["id"], STOP_BOUND)
        assert not core.list_namespaced_secret(namespace, label_selector=f"envctl.runtime-id={rt['id']}").items


def test_envctl_killed_and_started_again_adopts_its_pod_with_its_state(
    server: Server, core: Any, namespace: str
) -> None:
    with server.client() as client:
        rt = boot(server, client, "survivor")
        assert rt["state"] == "running", rt
        run(client, rt["id"], "export KEPT=4711")
        before = recorded(server, rt["id"])
        (agent,) = [
            v["configMap"]["name"] for v in raw_pod(core, namespace, rt["id"])["spec"]["volumes"] if "configMap" in v
        ]
        labels = core.read_namespaced_config_map(agent, namespace).metadata.labels
        ours, theirs = f"{agent[:40]}-oldversion", f"envctl-agent-elsewhere-{uuid.uuid4().hex[:6]}"
        core.create_namespaced_config_map(namespace, {"metadata": {"name": ours, "labels": labels}, "data": {}})
        foreign = {**labels, "envctl.installation": "inst-someone-else"}
        core.create_namespaced_config_map(namespace, {"metadata": {"name": theirs, "labels": foreign}, "data": {}})
        server.kill()
        server.start()
        after = server.wait_state(client, rt["id"], {"running", "error"}, timeout=60)
        assert after["state"] == "running", after
        assert "kept=4711" in text(run(client, rt["id"], "echo kept=$KEPT"))
        assert recorded(server, rt["id"])["container_id"] == before["container_id"]
        assert recorded(server, rt["id"])["pod"] == before["pod"]
        deadline = time.monotonic() + 30  # removed at the restarted server's first reconciliation
        while ours in (names := {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}):
            assert time.monotonic() < deadline, f"{ours} (another agent version's ConfigMap) stayed"
            time.sleep(0.3)
        assert agent in names and theirs in names, names  # its own version's, and another installation's: kept
        core.delete_namespaced_config_map(theirs, namespace)
        assert len(pods_of(core, namespace, rt["id"])) == 1
        began = time.monotonic()
        assert client.delete(f"/runtimes/{rt['id']}").status_code in (200, 202, 204)
        took = time.monotonic() - began
        gone = wait_no_pod(core, namespace, rt["id"], STOP_BOUND)
        print(f"\nadopted runtime deleted in {took:.1f} s, its pod gone {gone:.1f} s later")
        assert took < STOP_BOUND, f"deleting the adopted runtime took {took:.1f} s"


def test_draining_the_node_stops_its_runtimes_with_a_draft_and_cordons_it(
    server: Server, core: Any, namespace: str, kube: KubeCluster
) -> None:
    """``POST /nodes/{name}/drain`` on Kubernetes: the node cordoned (``spec.unschedulable``)
    first, this runner's runtime on it stopped with its draft; ``activate`` uncordons it and the
    next boot lands there and restores the draft. An unknown node is a 404 naming it."""
    with server.client() as client:
        rid, work = with_work(server, client, "drained")
        unknown = client.post("/nodes/kube-nowhere/drain")
        assert unknown.status_code == 404 and "kube-nowhere" in unknown.json()["error"]["message"], unknown.text
        try:
            r = client.post(f"/nodes/{kube.node}/drain")
            assert r.status_code == 200, r.text
            assert r.json()["availability"] == "drain" and r.json()["stopped"] == [rid], r.json()
            assert client.get(f"/runtimes/{rid}").json()["state"] == "stopped"
            why = [e for e in log_of(client, rid) if e.get("reason") == "node-drain"]
            assert why and f"{kube.node} is being drained" in why[0]["message"], why
            assert any(e.get("event") == "draft-kept" for e in log_of(client, rid))
            assert core.read_node(kube.node).spec.unschedulable is True
            (node,) = client.get("/nodes").json()
            assert node["health"]["availability"] == "drain", node
            wait_no_pod(core, namespace, rid, STOP_BOUND)
        finally:
            back = client.post(f"/nodes/{kube.node}/activate")
        assert back.status_code == 200 and back.json()["availability"] == "active", back.text
        assert not core.read_node(kube.node).spec.unschedulable
        (node,) = client.get("/nodes").json()
        assert node["health"]["availability"] == "active", node
        boot_again(server, client, rid, work)
        client.delete(f"/runtimes/{rid}")


def test_two_installations_in_one_namespace_leave_each_other_alone(
    server: Server, core: Any, kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    """R32: a second installation whose runner has the same name, in the same namespace; each
    adopts its own pods only, through reconcile rounds and a restart of each."""
    other = kube_server(kube.kubeconfig, namespace, tmp_path / "other", runner=server.env["ENVCTL_RUNNER_NAME"])
    other.start()
    try:
        with server.client() as mine, other.client() as theirs:
            a = boot(server, mine, "ours")
            b = boot(other, theirs, "theirs")
            assert a["state"] == b["state"] == "running", (a, b)
            for srv in (server, other):
                srv.kill()
                srv.start()
            time.sleep(3)  # several housekeeping rounds of each
            for srv, client, rid in ((server, mine, a["id"]), (other, theirs, b["id"])):
                assert srv.wait_state(client, rid, {"running", "error"})["state"] == "running"
                assert "ok" in text(run(client, rid, "echo ok"))
            assert theirs.get(f"/runtimes/{a['id']}").status_code == 404
            assert a["id"] not in json.dumps(theirs.get("/nodes").json())
            mine.delete(f"/runtimes/{a['id']}")
            wait_no_pod(core, namespace, a["id"], STOP_BOUND)
            assert len(pods_of(core, namespace, b["id"])) == 1
            theirs.delete(f"/runtimes/{b['id']}")
    finally:
        remove_installation(kube.kubeconfig, namespace, other)


def test_a_lease_bound_runtime_and_its_pod_are_gone_after_its_client_is_killed(
    server: Server, core: Any, namespace: str, tmp_path: Path
) -> None:
    nb = notebook(tmp_path / "long.ipynb", "sleep 600", language="bash")
    with server.client() as client:
        killed = run_and_kill(server, client, nb, LEASE, "--env", "bash", "--type", "native", "--machine-type", "small")
        rid = killed.runtime["id"]
        assert len(pods_of(core, namespace, rid)) == 1
        took = wait_deleted(client, rid, killed.killed_at, LEASE + 0.5 + STOP_BOUND)
        print(f"\nkube runtime deleted {took:.1f} s after its client was killed (lease {LEASE} s)")
        wait_no_pod(core, namespace, rid, STOP_BOUND)
        assert not core.list_namespaced_secret(namespace, label_selector=f"envctl.runtime-id={rid}").items


def test_a_named_volume_is_a_claim_that_keeps_its_files_across_pods(
    server: Server, core: Any, namespace: str, tmp_path: Path
) -> None:
    """A named volume becomes a PersistentVolumeClaim of ENVCTL_KUBE_STORAGE_CLASS (bound here to
    a hostPath PersistentVolume the test makes: the cluster has no provisioner); what a pod
    wrote there is in the next pod's."""
    folder = Path(tempfile.mkdtemp(prefix="envctl-kube-pv-"))
    pv = f"envctl-test-pv-{uuid.uuid4().hex[:8]}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv, "labels": {"envctl.test-session": TEST_SESSION}},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": STORAGE_CLASS,
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(folder)},
            },
        }
    )
    try:
        with server.client() as client:
            mounts = [{"type": "volume", "name": "kept-data", "target": "/home/data"}]
            rt = boot(server, client, "vol", mounts=mounts)
            assert rt["state"] == "running", (rt, server.output()[-3000:])
            claims = core.list_namespaced_persistent_volume_claim(namespace).items
            assert len(claims) == 1 and claims[0].spec.storage_class_name == STORAGE_CLASS, claims
            assert claims[0].spec.volume_name == pv
            assert run(client, rt["id"], "echo kept > /home/data/f")["status"] == "ok"
            assert client.post(f"/runtimes/{rt['id']}/stop").status_code in (200, 202)
            assert server.wait_state(client, rt["id"], {"stopped", "error"}, timeout=120)["state"] == "stopped"
            assert client.post(f"/runtimes/{rt['id']}/start").status_code in (200, 202)
            again = server.wait_state(client, rt["id"], {"running", "error"}, timeout=240)
            assert again["state"] == "running", again
            assert "kept" in text(run(client, rt["id"], "cat /home/data/f"))
            client.delete(f"/runtimes/{rt['id']}")
            wait_no_pod(core, namespace, rt["id"], STOP_BOUND)
    finally:
        for claim in core.list_namespaced_persistent_volume_claim(namespace).items:
            core.delete_namespaced_persistent_volume_claim(claim.metadata.name, namespace)
        core.delete_persistent_volume(pv)
        shutil.rmtree(folder, ignore_errors=True)
