"""Runtimes as Kubernetes pods (issue 18): boot and a cell's round trip, through the API.

The single-node cluster of ``scripts/kube-fixture`` (root only) and one ``envctl serve`` with
``ENVCTL_RUNNER_BACKEND=kubernetes``. Figures, each beside its baseline in the same run:

- boot, image on the node: ``POST /runtimes`` + ``/start`` until a first cell (``true``)
  answered, beside creating the same pod (the same image by digest, pulled with the same kind of
  pull secret) with the Kubernetes client and waiting until an ``exec`` of ``true`` in it answers;
- a cell's round trip (``true``, ``POST /runtimes/{id}/executions?wait``) on the pod, beside the
  same on a runtime of the local Docker backend (another ``envctl serve``, the default backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.bench.stats import report

BOOTS = int(os.environ.get("ENVCTL_BENCH_KUBE_BOOTS") or 5)  # boots of each kind (more: a steadier median)
REPO = Path(__file__).resolve().parents[2]


def _envctl_boot(client: httpx.Client, machine: str = "small") -> tuple[float, str]:
    t = time.perf_counter()
    body = {"environment": "bash", "name": f"b-{uuid.uuid4().hex[:6]}", "language": "bash", "machine_type": machine}
    rid = str(client.post("/runtimes", json=body).json()["id"])
    client.post(f"/runtimes/{rid}/start")
    while (rt := client.get(f"/runtimes/{rid}").json())["state"] == "booting":
        time.sleep(0.02)
    assert rt["state"] == "running", rt
    ex = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": "true"}).json()
    assert ex.get("status") == "ok", ex
    return (time.perf_counter() - t) * 1000, rid


def _raw_boot(core: Any, namespace: str, image: str, pull_secret: str) -> float:
    """The pod made with the client, until an ``exec`` of ``true`` in it answered."""
    from kubernetes.stream import stream

    name = f"envctl-bench-{uuid.uuid4().hex[:8]}"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"envctl.bench": "kube"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "imagePullSecrets": [{"name": pull_secret}],
            "containers": [{"name": "c", "image": image, "command": ["sleep", "infinity"]}],
        },
    }
    t = time.perf_counter()
    core.create_namespaced_pod(namespace, body)
    try:
        while True:
            try:
                stream(
                    core.connect_get_namespaced_pod_exec,
                    name,
                    namespace,
                    command=["true"],
                    stderr=True,
                    stdin=False,
                    stdout=True,
                    tty=False,
                )
                return (time.perf_counter() - t) * 1000
            except Exception:
                time.sleep(0.02)
    finally:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def run(runs: int = 200) -> dict[str, float]:
    from kubernetes import client as kclient
    from kubernetes import config as kconfig

    from api.settings import load
    from registry import pull_grants
    from registry.distribution import signing_key
    from runner.backends import kube_pods
    from tests.fixtures import kube_cluster
    from tests.fixtures.kube import make_namespace
    from tests.fixtures.server import Server, prepare_data_dir
    from tests.kube.envctl_server import kube_server, remove_installation

    if (why := kube_cluster.missing()) is not None:
        print(f"kube benchmark skipped: {why}")
        return {}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="envctl-bench-kube-") as tmp:
        directory = Path(tmp) / "cluster"
        subprocess.run([str(REPO / "scripts" / "kube-fixture"), "up", str(directory)], check=True)
        kubeconfig = directory / "kubeconfig"
        api = kconfig.new_client_from_config(config_file=str(kubeconfig))
        core = kclient.CoreV1Api(api)
        local: Server | None = None
        srv: Server | None = None
        namespace = make_namespace(core, "envctl-bench")
        try:
            srv = kube_server(kubeconfig, namespace, Path(tmp) / "data")
            srv.start()
            with srv.client() as client:
                _ms, first = _envctl_boot(client)  # the version pushed and on the node before anything is timed
                (pod,) = core.list_namespaced_pod(namespace, label_selector=f"envctl.runtime-id={first}").items
                image = pod.spec.containers[0].image
                registry, _, ref = image.partition("/")
                settings = load(env={**srv.env, "ENVCTL_DATA_DIR": str(srv.data_dir)})
                grant = pull_grants.make_grant(signing_key(settings), ref.split("@")[0], 600)
                secret = kube_pods.pull_secret("envctl-bench-pull", {}, registry, pull_grants.USER, grant)
                core.create_namespaced_secret(namespace, secret)
                client.delete(f"/runtimes/{first}")
                ours, raw = [], []
                for _ in range(BOOTS):
                    ms, rid = _envctl_boot(client)
                    ours.append(ms)
                    client.delete(f"/runtimes/{rid}")
                    raw.append(_raw_boot(core, namespace, image, "envctl-bench-pull"))
                figures["boot"] = report(
                    f"boot as a Kubernetes pod, image on the node, until a first cell answered ({BOOTS} runs)",
                    ours,
                    raw,
                    "create pod + first exec (client)",
                )["ratio"]

                local = Server(Path(tmp) / "local", env={"ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "5"})
                local.data_dir.mkdir()
                prepare_data_dir(local.data_dir, ["bash"])
                local.start()
                with local.client() as lclient:
                    _ms, krid = _envctl_boot(client)
                    _ms, lrid = _envctl_boot(lclient)
                    kurl, lurl = f"/runtimes/{krid}/executions", f"/runtimes/{lrid}/executions"
                    for _ in range(20):
                        client.post(kurl, params={"wait": 30}, json={"code": "true"})
                        lclient.post(lurl, params={"wait": 30}, json={"code": "true"})
                    kube_ms, local_ms = [], []
                    for i in range(runs):
                        c, url, into = (client, kurl, kube_ms) if i % 2 == 0 else (lclient, lurl, local_ms)
                        t = time.perf_counter()
                        ex = c.post(url, params={"wait": 30}, json={"code": "true"}).json()
                        into.append((time.perf_counter() - t) * 1000)
                        assert ex["status"] == "ok", ex
                    figures["cell"] = report(
                        f"cell round trip `true` on a pod, REST API ({runs // 2} runs each, alternating)",
                        kube_ms,
                        local_ms,
                        "the local Docker backend",
                    )["ratio"]
                    lclient.delete(f"/runtimes/{lrid}")
                client.delete(f"/runtimes/{krid}")
        finally:
            if local is not None:
                local.stop()
            if srv is not None:
                remove_installation(kubeconfig, namespace, srv)
            core.delete_namespace(namespace, grace_period_seconds=0)
            api.close()
            subprocess.run([str(REPO / "scripts" / "kube-fixture"), "down", str(directory)], check=False)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    run()
