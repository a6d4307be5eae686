"""``envctl serve`` placing runtimes on the test cluster (the session's ``kube`` fixture of
``tests/fixtures/kube.py``): the kubernetes backend in the module's namespace, the managed
registry on loopback (the node's containerd runs on this host and pulls from it), and the
removal of everything such a server made in the namespace."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server, prepare_data_dir
from tests.fixtures.services import _free_port
from tests.fixtures.transfer import need_registry_program


def machine_types(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    small = {"cpus": 0.25, "memory": "256m", "pids": 256}
    return {
        "small": small,
        "huge": {"cpus": 1000, "memory": "256m"},
        "tiny-mem": {"cpus": 0.25, "memory": "48m"},
        **(extra or {}),
    }


def kube_server(kubeconfig: Path, namespace: str, data: Path, runner: str | None = None, **env: str) -> Server:
    """An ``envctl serve`` placing runtimes in ``namespace`` (not started)."""
    need_registry_program()
    data.mkdir(parents=True, exist_ok=True)
    prepare_data_dir(data, ["bash"])
    config = data / "config.yaml"
    config.write_text(json.dumps({"machine_types": machine_types()}))  # YAML reads JSON
    return Server(
        data,
        env={
            "ENVCTL_CONFIG": str(config),
            "ENVCTL_RUNNER_NAME": runner or f"test-{TEST_SESSION}-{uuid.uuid4().hex[:6]}",
            "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION}",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
            "ENVCTL_RUNNER_BACKEND": "kubernetes",
            "ENVCTL_RUNNER_CHANNEL": "tcp",
            "ENVCTL_KUBE_CONFIG": str(kubeconfig),
            "ENVCTL_KUBE_NAMESPACE": namespace,
            "ENVCTL_KUBE_PENDING_TIMEOUT": "3",
            "ENVCTL_REGISTRY": "managed",
            "ENVCTL_REGISTRY_PORT": str(_free_port()),
            **env,
        },
    )


def core_api(kubeconfig: Path) -> Any:
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))


def remove_installation(kubeconfig: Path, namespace: str, srv: Server) -> None:
    """Every pod and secret the server's runner made in the namespace (the namespace itself goes
    with the module)."""
    srv.stop()
    core = core_api(kubeconfig)
    try:
        label = f"envctl.runner={srv.env['ENVCTL_RUNNER_NAME']}"
        for pod in core.list_namespaced_pod(namespace, label_selector=label).items:
            with contextlib.suppress(Exception):
                core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
        for secret in core.list_namespaced_secret(namespace, label_selector=label).items:
            with contextlib.suppress(Exception):
                core.delete_namespaced_secret(secret.metadata.name, namespace)
    finally:
        core.api_client.close()


def pods_of(core: Any, namespace: str, rid: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"envctl.runtime-id={rid}").items)


def wait_no_pod(core: Any, namespace: str, rid: str, bound: float) -> float:
    """Seconds until the runtime has no pod (fails past ``bound``)."""
    began = time.monotonic()
    while pods_of(core, namespace, rid):
        assert time.monotonic() - began < bound, f"the pod of {rid} stayed {bound:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - began
