"""The Kubernetes backend's objects and its reading of the API's answers (runner/backends/kube_pods.py,
kube_states.py) and pull grants (registry/pull_grants.py), with plain dicts shaped as Kubernetes
1.20 gives them: no cluster needed. GPUs are tested here as the pod spec they produce (the test
cluster has none)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from envs.kit.errors import InvalidInputError, UnauthorizedError
from registry import pull_grants, signing
from runner.backends import kube_pods, kube_states
from runner.backends.base import LABEL_INSTALLATION, LABEL_RUNNER, MountBind, RuntimeSpec, Status
from runner.runtimes import pressure
from runner.settings import MachineType, parse_machine_types

GIB = 1024**3
SECRET = "s3cr3t-value-do-not-leak"


def spec(machine: MachineType | None = None, **kw: Any) -> RuntimeSpec:
    return RuntimeSpec(
        runtime_id="rt_abc123",
        name="my runtime",
        image="acme/ml@sha256:" + "0" * 64,
        environment="acme/ml@3",
        machine=machine or MachineType("small", cpus=0.5, memory=GIB, pids=256),
        state_dir=Path("/nonexistent"),
        agent_dir=Path("/nonexistent"),
        labels={LABEL_INSTALLATION: "in_x", LABEL_RUNNER: "r1", "envctl.test-session": "t"},
        env={"GREETING": "hello"},
        channel="tcp",
        credential=json.dumps({"key": SECRET}).encode() + b"\n",
        **kw,
    )


def manifest(s: RuntimeSpec) -> dict[str, Any]:
    return kube_pods.pod_manifest(
        s,
        image="127.0.0.1:5000/" + s.image,
        agent_config="envctl-agent-x",
        credential_secret="envctl-rt-abc123-cred-1",
        pull_secret="envctl-rt-abc123-pull-1",
        labels=kube_pods.pod_labels(s, {}),
    )


def test_the_pod_carries_identity_limits_and_the_security_baseline() -> None:
    pod = manifest(spec())
    meta, pspec = pod["metadata"], pod["spec"]
    assert meta["name"] == "envctl-rt-abc123"
    assert meta["labels"]["envctl.runtime-id"] == "rt_abc123"
    assert meta["labels"][LABEL_INSTALLATION] == "in_x" and meta["labels"][LABEL_RUNNER] == "r1"
    assert meta["annotations"]["envctl.environment"] == "acme/ml@3"
    assert pspec["restartPolicy"] == "Never"
    assert pspec["automountServiceAccountToken"] is False and pspec["enableServiceLinks"] is False
    assert pspec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pspec["containers"]
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": str(GIB)},
        "limits": {"cpu": "500m", "memory": str(GIB)},
    }
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not {"NET_RAW", "MKNOD", "SYS_ADMIN", "SETFCAP", "SYS_CHROOT"} & set(sc["capabilities"]["add"])
    assert pspec["imagePullSecrets"] == [{"name": "envctl-rt-abc123-pull-1"}]
    assert c["image"].endswith("@sha256:" + "0" * 64)


def test_the_agent_watches_memory_only_when_told() -> None:
    (c,) = manifest(spec())["spec"]["containers"]
    assert "--memory-watch" not in c["command"]
    s = spec()
    pod = kube_pods.pod_manifest(
        s,
        image="127.0.0.1:5000/" + s.image,
        agent_config="envctl-agent-x",
        credential_secret="c",
        pull_secret="p",
        labels=kube_pods.pod_labels(s, {}),
        memory_watch=0.9,
    )
    (c,) = pod["spec"]["containers"]
    command = c["command"]
    assert command[command.index("--memory-watch") + 1] == "0.9"
    assert float(command[command.index("--memory-pause") + 1]) > pressure.WAIT  # longer than envctl waits


def test_credential_and_secrets_are_memory_files_never_env_labels_or_annotations() -> None:
    s = spec()
    pod = manifest(s)
    text = json.dumps(pod)
    assert SECRET not in text
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["credential"]["secret"]["secretName"] == "envctl-rt-abc123-cred-1"
    assert vols["state"]["emptyDir"]["medium"] == "Memory"
    assert vols["secrets"]["emptyDir"]["medium"] == "Memory"
    (c,) = pod["spec"]["containers"]
    assert c["env"] == [{"name": "GREETING", "value": "hello"}]
    assert "--credential" in c["command"] and kube_pods.CREDENTIAL_PATH in c["command"]
    secret = kube_pods.credential_secret("envctl-rt-abc123-cred-1", {"a": "b"}, s.credential)
    assert SECRET not in json.dumps(secret["metadata"])
    assert base64.b64decode(secret["data"]["agent.key"]) == s.credential


def test_gpu_machine_types_ask_for_nvidia_gpus_and_tolerate_their_taint() -> None:
    gpu = MachineType("gpu", cpus=2, memory=8 * GIB, gpus=2, gpu_kind="nvidia-t4")
    pod = manifest(spec(gpu))
    (c,) = pod["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    assert pod["metadata"]["annotations"]["envctl.gpu-kind"] == "nvidia-t4"


def test_constraints_become_node_selector_and_affinity_and_tolerations_pass_through(tmp_path: Path) -> None:
    types = parse_machine_types(
        {
            "eu": {
                "cpus": 1,
                "memory": "1g",
                "constraints": ["node.labels.zone==eu", "node.hostname!=n1"],
                "tolerations": ["dedicated=envctl:NoSchedule", "spot:NoExecute"],
            }
        },
        "config.yaml",
    )
    placed = kube_pods.placement(types["eu"])
    assert placed["nodeSelector"] == {"zone": "eu"}
    terms = placed["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]}]}]
    assert placed["tolerations"] == [
        {"key": "dedicated", "effect": "NoSchedule", "operator": "Equal", "value": "envctl"},
        {"key": "spot", "effect": "NoExecute", "operator": "Exists"},
    ]
    with pytest.raises(InvalidInputError, match="tolerations"):
        parse_machine_types({"x": {"cpus": 1, "memory": "1g", "tolerations": ["bad toleration"]}}, "config.yaml")


def test_streamed_mounts_are_empty_dirs_named_volumes_claims_and_writeback_is_refused() -> None:
    s = spec(
        mounts=(MountBind("/data", "/host/x"), MountBind("/vol", "envctl-vol-abc", kind="volume", read_only=False))
    )
    pod = manifest(s)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["mount-0"] == {"name": "mount-0", "emptyDir": {}}
    assert vols["mount-1"]["persistentVolumeClaim"]["claimName"] == "envctl-vol-abc"
    with pytest.raises(InvalidInputError, match="writeback"):
        manifest(spec(mounts=(MountBind("/data", "/host/x", read_only=False),)))
    claim = kube_pods.volume_claim("envctl-vol-abc", {LABEL_INSTALLATION: "in_x"}, "fast", "1Gi")
    assert claim["spec"]["storageClassName"] == "fast"


def test_the_fence_is_a_network_policy_over_the_installations_runtimes() -> None:
    policy = kube_pods.fence_policy("envctl-fence-in-x", "in_x", {})
    assert policy["spec"]["podSelector"]["matchLabels"] == {LABEL_INSTALLATION: "in_x", "envctl.managed": "1"}
    (out, dns) = policy["spec"]["egress"]
    assert "169.254.0.0/16" in out["to"][0]["ipBlock"]["except"]
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 7600}]}]


def test_an_app_runtimes_port_is_declared_labelled_and_let_in_beside_the_agents() -> None:
    s = spec(ports=(8000,))
    m = manifest(s)
    [container] = m["spec"]["containers"]
    assert {"name": "app-8000", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    assert m["metadata"]["labels"]["envctl.app-port-8000"] == "1"
    assert "envctl.app-port-8000" not in manifest(spec())["metadata"]["labels"]  # other runtimes: the fence alone
    policy = kube_pods.app_port_policy("envctl-app-in-x-8000", "in_x", 8000, {})
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        LABEL_INSTALLATION: "in_x", "envctl.managed": "1", "envctl.app-port-8000": "1",
    }  # fmt: skip
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # what goes out stays the fence's
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]


def pod(phase: str = "Running", *, node: str = "n1", state: dict[str, Any] | None = None, **status: Any) -> dict:  # type: ignore[type-arg]
    cs = {"name": "runtime", "state": state or {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
    return {
        "metadata": {"name": "envctl-rt-x", "uid": "u1", "labels": {"envctl.runtime-id": "rt_x"}},
        "spec": {"nodeName": node, "containers": [{"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]},
        "status": {"phase": phase, "containerStatuses": [cs], **status},
    }


def ready_node(name: str = "n1", ready: str = "True") -> dict:  # type: ignore[type-arg]
    return {
        "metadata": {"name": name, "uid": "nu", "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": ready, "reason": "NodeStatusUnknown"}],
            "allocatable": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
            "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
        },
    }


def test_pod_states_map_to_envctl_states() -> None:
    nodes = {"n1": ready_node()}
    assert kube_states.status_of(None, nodes, nodes_known=True).status is Status.GONE
    assert kube_states.status_of(pod(), nodes, nodes_known=True).status is Status.RUNNING
    oom = pod("Failed", state={"terminated": {"reason": "OOMKilled", "exitCode": 137}})
    got = kube_states.status_of(oom, nodes, nodes_known=True)
    assert got.status is Status.EXITED and got.oom_killed and got.exit_code == 137
    evicted = pod("Failed", reason="Evicted", message="The node was low on resource: memory.")
    got = kube_states.status_of(evicted, nodes, nodes_known=True)
    assert got.reason == "evicted" and "low on resource" in got.error
    lost = kube_states.status_of(pod(), {"n1": ready_node(ready="Unknown")}, nodes_known=True)
    assert lost.status is Status.EXITED and lost.reason == "node-lost"
    gone_node = kube_states.status_of(pod(), {}, nodes_known=True)
    assert gone_node.reason == "node-lost"
    assert kube_states.status_of(pod(), {}, nodes_known=False).status is Status.RUNNING
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert kube_states.status_of(deleting, nodes, nodes_known=True).reason == "terminated"


def test_an_unschedulable_pod_names_the_resource_the_machine_type_asks_for() -> None:
    p = pod("Pending", node="")
    p["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient cpu.",
        }
    ]
    why = kube_states.unschedulable(p)
    assert why == "0/1 nodes are available: 1 Insufficient cpu."
    text = kube_states.missing_resource(MachineType("huge", cpus=1000, memory=GIB), why)
    assert "cpu (machine type huge asks 1000 CPUs)" in text and "Insufficient cpu" in text


def test_pulls_are_downloading_and_fail_after_the_retries() -> None:
    waiting = pod("Pending", state={"waiting": {"reason": "ContainerCreating"}})
    pulling = [{"reason": "Pulling", "message": 'Pulling image "r/x"'}]
    assert kube_states.progress(waiting, pulling, 3).phase == "downloading"
    backoff = pod("Pending", state={"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}})
    failed = [*pulling, {"reason": "Failed", "message": "Failed to pull image: 401 Unauthorized", "count": 2}]
    seen = kube_states.progress(backoff, failed, 3)
    assert seen.failure is None and seen.phase == "downloading"
    failed[-1]["count"] = 4
    seen = kube_states.progress(backoff, failed, 3)
    assert seen.failure is not None and "after 4 tries" in seen.failure


def test_nodes_view_shows_capacity_health_and_the_installations_runtimes() -> None:
    (n,) = kube_states.nodes_view([ready_node()], [pod()])
    assert n["name"] == "n1" and n["address"] == "10.0.0.5"
    assert n["capacity"] == {"nano_cpus": 2 * 10**9, "memory": 4 * GIB, "generic_resources": {"nvidia.com/gpu": 1}}
    assert n["reserved"]["nano_cpus"] == 5 * 10**8
    assert n["health"]["state"] == "ready" and n["runtimes"] == ["rt_x"]


def test_old_agent_config_maps_go_unless_a_pod_mounts_them() -> None:
    def cm(name: str) -> dict[str, Any]:
        return {"metadata": {"name": name}}

    pod = {"spec": {"volumes": [{"name": "agent", "configMap": {"name": "envctl-agent-x-old2"}}]}}
    found = [cm("envctl-agent-x-new"), cm("envctl-agent-x-old1"), cm("envctl-agent-x-old2")]
    assert kube_pods.stale_agent_configs(found, "envctl-agent-x-new", [pod]) == ["envctl-agent-x-old1"]
    assert kube_pods.stale_agent_configs([cm("envctl-agent-x-new")], "envctl-agent-x-new", []) == []


def test_availability_cordons_and_uncordons_a_node() -> None:
    patch = kube_states.availability_patch("drain")
    assert patch["spec"] == {"unschedulable": True}
    node = {"metadata": {"annotations": patch["metadata"]["annotations"]}, "spec": patch["spec"]}
    assert kube_states.availability(node) == "drain"
    assert kube_states.availability({"metadata": {}, "spec": {"unschedulable": True}}) == "pause"  # kubectl cordon
    back = kube_states.availability_patch("active")
    assert back == {
        "metadata": {"annotations": {kube_states.ANNOTATION_AVAILABILITY: None}},
        "spec": {"unschedulable": False},
    }
    assert kube_states.availability({"metadata": {}, "spec": back["spec"]}) == "active"


def test_a_pod_has_ended_once_its_container_terminated_or_its_phase_is_final() -> None:
    def with_state(state: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
        return {"status": {"phase": phase, "containerStatuses": [{"name": kube_pods.CONTAINER, "state": state}]}}

    assert not kube_states.ended(with_state({"running": {}}))
    assert kube_states.ended(with_state({"terminated": {"exitCode": 0}}))
    assert kube_states.ended(with_state({}, phase="Failed"))
    assert not kube_states.ended({"status": {"phase": "Pending"}})


def test_a_pull_grant_opens_only_its_repository_and_only_for_pull(tmp_path: Path) -> None:
    key = signing.load_or_create(tmp_path)
    grant = pull_grants.make_grant(key, "envctl-drafts/rt_x", 60)
    assert pull_grants.open_grant(key, grant) == "envctl-drafts/rt_x"
    answer = pull_grants.issue(
        key, ["repository:envctl-drafts/rt_x:pull,push", "repository:acme/other:pull"], "envctl-drafts/rt_x", 60
    )
    body = json.loads(base64.urlsafe_b64decode(answer["token"].split(".")[1] + "=="))
    assert body["access"] == [
        {"type": "repository", "name": "envctl-drafts/rt_x", "actions": ["pull"]},
        {"type": "repository", "name": "acme/other", "actions": []},
    ]
    with pytest.raises(UnauthorizedError, match="expired"):
        pull_grants.open_grant(key, pull_grants.make_grant(key, "a/b", 10, now=1000.0))
    other = signing.load_or_create(tmp_path / "other")
    with pytest.raises(UnauthorizedError, match="signature"):
        pull_grants.open_grant(key, pull_grants.make_grant(other, "a/b", 60))
    token = key.sign({"aud": "registry", "iss": "envctl", "repository": "a/b", "nbf": 0, "exp": 2**40})
    with pytest.raises(UnauthorizedError, match="not a pull grant"):
        pull_grants.open_grant(key, token)
