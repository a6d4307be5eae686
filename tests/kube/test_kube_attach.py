"""Attach on the kubernetes backend (issue 17 item 3, R42) on the real single-node cluster: a pod
the test starts itself (not envctl), with python3, attached through ``pods/exec``; cells see its
processes, files, variables and working directory; its agent's credential is in no argument,
variable or file once read; a stop (detach) and the runtime's deletion leave no process or file
of envctl's in it (a listing of its processes and whole filesystem compared before and after),
nor does an idle shutdown; envctl killed and started again reaches the same agent; the pod
keeps running, never restarted; a pod outside the allow-list is a 403 naming the
rules; a pod without python3 runs Bash cells through a shell in it (its agent on envctl's
host), and is left as it was too. The server has only the token of the
Role that ``envctl kube rbac --attach`` prints (pods/exec added)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from envs.kit.db import Database
from registry.team_secrets import SecretBox
from runner.agentauth import AgentLinks
from runner.backends import kube_rbac
from runner.models import Runtime
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.kube import KubeCluster, wait_running
from tests.fixtures.server import Server
from tests.fixtures.services import base_image, docker_client
from tests.fixtures.swarm import REGISTRY_BINARY, serve_registry
from tests.kube.envctl_server import core_api, kube_server, remove_installation
from tests.kube.test_kube_rbac import apply, remove_cluster_objects, token_kubeconfig
from tests.runner.cells.test_docker_executions import text

pytestmark = [pytest.mark.kube, pytest.mark.slow]

ALLOW = "label:envctl.attach=yes,name:data-*"
ACCOUNT = "envctl-attach"

# What the container holds, seen from inside (through the test's own exec, not envctl's):
# every process but the lister (pid, parent, state, command line) and every path of its
# filesystem with its type and size (/proc and /sys left out: the kernel's views).
LISTER = r"""
import json, os
me = os.getpid()
procs = []
for e in sorted(os.listdir("/proc"), key=lambda x: (len(x), x)):
    if not e.isdigit() or int(e) == me:
        continue
    try:
        st = open("/proc/%s/stat" % e).read()
        cmd = open("/proc/%s/cmdline" % e, "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        continue
    rest = st[st.rindex(")") + 2:].split()
    procs.append([int(e), int(rest[1]), rest[0], cmd])
files = []
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
    for n in sorted(dirs + names):
        p = os.path.join(root, n)
        try:
            s = os.lstat(p)
        except OSError:
            continue
        files.append([p, oct(s.st_mode), s.st_size if not os.path.isdir(p) else 0])
print(json.dumps({"procs": procs, "files": sorted(files)}))
"""


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    """The python3 and bash base images in a plain-HTTP registry on loopback (the node's
    containerd pulls from it); their references."""
    if not REGISTRY_BINARY.is_file():
        pytest.skip(f"no registry program at {REGISTRY_BINARY}")
    client = docker_client()
    with (
        tempfile.TemporaryDirectory(prefix="envctl-kube-attach-") as tmp,
        serve_registry(Path(tmp), "127.0.0.1") as address,
    ):
        refs = {}
        for name in ("python3", "bash"):
            source = base_image(client, name)
            reference = refs[name] = f"{address}/envctl-kube-test/{name}:{TEST_SESSION}"
            client.images.get(source).tag(reference)
            try:
                pushed = subprocess.run(["docker", "push", reference], capture_output=True, text=True, timeout=300)
                assert pushed.returncode == 0, pushed.stderr
            finally:
                client.images.remove(reference)
        yield refs


@pytest.fixture(scope="module")
def account(kube: KubeCluster, kube_namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``envctl kube rbac --attach`` applied in the module's namespace; its ServiceAccount's
    kubeconfig (the server below has nothing more)."""
    docs = kube_rbac.documents(kube_namespace, ACCOUNT, attach=True)
    admin = kube.core()
    try:
        apply(admin.api_client, docs)
        yield token_kubeconfig(
            kube.kubeconfig, admin, kube_namespace, ACCOUNT, tmp_path_factory.mktemp("rbac") / "kubeconfig"
        )
    finally:
        remove_cluster_objects(admin.api_client, docs)
        admin.api_client.close()


@pytest.fixture(scope="module")
def server(
    kube: KubeCluster, kube_namespace: str, account: Path, docker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base_image(docker, "bash")
    srv = kube_server(
        account, kube_namespace, tmp_path_factory.mktemp("kattach") / "data", ENVCTL_RUNNER_ATTACH_ALLOW=ALLOW
    )
    srv.start()
    yield srv
    remove_installation(kube.kubeconfig, kube_namespace, srv)


@pytest.fixture(scope="module")
def core(kube: KubeCluster) -> Iterator[Any]:
    api = core_api(kube.kubeconfig)
    yield api
    api.api_client.close()


def start_pod(core: Any, namespace: str, name: str, image: str, command: str, labels: dict[str, str]) -> Any:
    """A pod of the test's own (not envctl's), running."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {TEST_LABEL: TEST_SESSION, **labels}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "dnsPolicy": "Default",
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "command": ["bash", "-c", command],
                    "env": [{"name": "SERVICE_MODE", "value": "prod"}],
                    "workingDir": "/opt",
                }
            ],
        },
    }
    core.create_namespaced_pod(namespace, body)
    wait_running(core, namespace, name, timeout=180)
    time.sleep(0.5)  # its command's own files made
    return core.read_namespaced_pod(name, namespace)


def inside(core: Any, namespace: str, pod: str, command: list[str]) -> str:
    from kubernetes.stream import stream

    return str(
        stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            command=command,
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
        )
    )


def looks(core: Any, namespace: str, pod: str) -> dict[str, Any]:
    said = inside(core, namespace, pod, ["python3", "-c", LISTER])
    return dict(json.loads(said))


def unchanged(before: dict[str, Any], now: dict[str, Any]) -> None:
    """The same processes and files, or an error naming what differs."""
    for what in ("procs", "files"):
        was, isnow = ({json.dumps(x) for x in d[what]} for d in (before, now))
        assert was == isnow, f"{what}: gone {sorted(was - isnow)}, new {sorted(isnow - was)}"


def attach(client: httpx.Client, name: str, container: str) -> httpx.Response:
    return client.post("/runtimes", json={"name": name, "attach": {"container": container}})


def run(client: httpx.Client, rid: str, code: str, language: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, **({"language": language} if language else {})}
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json=body)
    assert r.status_code == 202, r.text
    return dict(r.json())


def test_cells_run_in_a_pod_envctl_did_not_start_which_is_left_as_it_was(
    server: Server, core: Any, kube_namespace: str, images: dict[str, str]
) -> None:
    python_image = images["python3"]
    tag = uuid.uuid4().hex[:6]
    name = f"data-svc-{tag}"
    started = start_pod(
        core,
        kube_namespace,
        name,
        python_image,
        "mkdir -p /srv && echo service-data > /srv/data.txt && "
        "exec python3 -c 'import time; time.sleep(86400)' data-service",
        {"app": "data"},
    )
    uid = started.metadata.uid
    other = f"other-{tag}"
    start_pod(core, kube_namespace, other, python_image, "exec sleep 86400", {})
    before = looks(core, kube_namespace, name)
    assert any("data-service" in p[3] for p in before["procs"]), before["procs"]
    with server.client() as client:
        refused = attach(client, "nope", other)
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]["message"]
        assert "label:envctl.attach=yes" in message and "name:data-*" in message, message
        assert attach(client, "missing", f"data-none-{tag}").status_code == 404

        r = attach(client, "svc", name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["language"] == "python"
        # what an envctl that died while placing the agent would have left: removed, placed again
        planted = f"/dev/shm/.envctl-agent-{rid}"
        inside(core, kube_namespace, name, ["sh", "-c", f"mkdir {planted} && touch {planted}/main.py"])
        ex = run(
            client,
            rid,
            "import os; print(os.environ['SERVICE_MODE'], os.getcwd(), open('/srv/data.txt').read().strip())",
        )
        assert ex["status"] == "ok", ex
        assert text(ex) == "prod /opt service-data\n", ex
        # its processes: the service's own python3 is seen from the cell
        ex = run(
            client,
            rid,
            "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
            "        c = open(f'/proc/{p}/cmdline', 'rb').read()\n        if b'data-service' in c: print('seen', p)",
        )
        assert text(ex).startswith("seen "), ex
        ex = run(client, rid, "echo $SERVICE_MODE; pwd; hostname; cat /srv/data.txt", language="bash")
        assert text(ex) == f"prod\n/opt\n{name}\nservice-data\n", ex
        shown = client.get(f"/runtimes/{rid}").json()
        assert shown["origin"] == "attached" and shown["state"] == "running", shown
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any("attached to container" in e["message"] for e in log), log

        # while attached: the agent's credential file is gone once read; no process carries it
        during = looks(core, kube_namespace, name)
        placed = [f[0] for f in during["files"] if "/.envctl-agent-" in f[0]]
        assert placed and not [p for p in placed if p.endswith("agent.key")], placed
        assert all(p.startswith("/dev/shm/.envctl-agent-") for p in placed), placed
        key = _agent_key(server, rid)
        assert key and not any(key in p[3] for p in during["procs"])
        environ = inside(
            core, kube_namespace, name, ["sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"]
        )
        assert key not in environ
        agents = [p for p in during["procs"] if "/.envctl-agent-" in p[3]]
        assert agents, during["procs"]

        # a stop detaches: nothing of envctl's is left; the pod runs on, never restarted
        stopped = client.post(f"/runtimes/{rid}/stop", params={"wait": 30}).json()
        assert stopped["state"] == "stopped", stopped
        unchanged(before, looks(core, kube_namespace, name))
        pod = core.read_namespaced_pod(name, kube_namespace)
        assert pod.metadata.uid == uid and pod.status.phase == "Running"
        assert pod.status.container_statuses[0].restart_count == 0
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "detached" and "files removed" in e["message"] for e in log), log

        # a cell attaches again; envctl killed and started again reaches the same agent
        ex = run(client, rid, "x = 40; print(2 + 2)")
        assert text(ex) == "4\n", ex
        server.kill()
        server.start()
    with server.client() as client:
        ex = run(client, rid, "print(x + 2)")
        assert text(ex) == "42\n", ex  # the same agent: its interpreter state kept
        # idle shutdown detaches
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 1}).status_code == 200
        server.wait_state(client, rid, {"stopped"}, timeout=30)
        unchanged(before, looks(core, kube_namespace, name))
        # deleting the runtime (attached again by a cell) detaches and leaves the pod
        ex = run(client, rid, "print(2 + 2)")
        assert text(ex) == "4\n", ex
        assert client.delete(f"/runtimes/{rid}").status_code == 204
    unchanged(before, looks(core, kube_namespace, name))
    output = server.output().lower()  # the Role of `envctl kube rbac --attach` was enough
    assert "forbidden" not in output, server.output()[-3000:]
    pod = core.read_namespaced_pod(name, kube_namespace)
    assert pod.metadata.uid == uid and pod.status.phase == "Running"
    assert pod.status.container_statuses[0].restart_count == 0


# The same listing with a shell (a pod without python3): every process but the lister and what
# it starts, and every path with its type and mode, and a file's size.
LISTER_SH = r"""
me=$$
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$p" = "$me" ] && continue
  read -r s < $d/stat 2>/dev/null || continue
  r=${s##*) }; set -- $r
  [ "$2" = "$me" ] && continue
  c=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
  echo "P $p $2 $1 $c"
done
find / -path /proc -prune -o -path /sys -prune -o -type d -printf 'D %p %M\n' -o -printf 'F %p %M %s\n'
"""


def looks_sh(core: Any, namespace: str, pod: str) -> dict[str, Any]:
    lines = inside(core, namespace, pod, ["bash", "-c", LISTER_SH]).splitlines()
    return {
        "procs": [line.split(" ", 4)[1:] for line in lines if line.startswith("P ")],
        "files": sorted(line for line in lines if line[:2] in ("D ", "F ")),
    }


def test_a_pod_without_python3_runs_bash_cells_through_a_shell_in_it(
    server: Server, core: Any, kube_namespace: str, images: dict[str, str]
) -> None:
    """Its python3 removed (the base images carry one for envctl's agent): the agent runs on
    envctl's host and its Bash kernel is one pods/exec stream of the container's own bash.
    (It replaces the refusal this case had: a pod without python3 was a 409.) Cells see the
    container's processes, files, variables and working directory; a variable and ``cd`` stay
    from cell to cell; an interrupt ends a long cell at once; a Python cell is an error saying
    why; a stop, an idle shutdown and the runtime's deletion leave no process or file behind;
    envctl killed and started again serves the same shell; the pod is never restarted."""
    name = f"data-bash-{uuid.uuid4().hex[:6]}"
    started = start_pod(
        core,
        kube_namespace,
        name,
        images["bash"],
        "rm -f /usr/bin/python3* /usr/local/bin/python3*; mkdir -p /srv && echo 42 > /srv/answer; exec sleep 86400",
        {},
    )
    uid = started.metadata.uid
    assert "python3" not in inside(core, kube_namespace, name, ["bash", "-c", "command -v python3 || echo none"])
    before = looks_sh(core, kube_namespace, name)
    assert any(p[3].startswith("sleep 86400") for p in before["procs"]), before["procs"]
    with server.client() as client:
        r = attach(client, "bashonly", name)
        assert r.status_code == 201, r.text
        made = r.json()
        rid = made["id"]
        assert made["language"] == "bash" and "Bash cells only" in made["state_message"], made
        ex = run(client, rid, "echo $SERVICE_MODE; pwd; hostname; cat /srv/answer; tr '\\0' ' ' < /proc/1/cmdline")
        assert ex["status"] == "ok", ex
        assert text(ex) == f"prod\n/opt\n{name}\n42\nsleep 86400 ", ex
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any("Bash cells only: the container has no python3" in e["message"] for e in log), log
        # state from cell to cell: variables, functions, the working directory
        assert run(client, rid, "x=41; twice() { echo $(($1 * 2)); }; cd /srv")["status"] == "ok"
        ex = run(client, rid, "echo $((x + 1)) $(twice 21) $(pwd); printf 'no newline'")
        assert text(ex) == "42 42 /srv\nno newline", ex
        # both streams, and a failing status
        ex = run(client, rid, "echo out; echo err >&2; ls /nonexistent-dir")
        assert ex["status"] == "error" and text(ex) == "out\n", ex
        assert text(ex, "stderr").startswith("err\nls: ") and "status 2" in json.dumps(ex["outputs"]), ex
        # a cell reading stdin reads nothing (not the next cell), and quotes pass as written
        ex = run(client, rid, "cat; echo 'it'\\''s' \"$x\" '$x'")
        assert text(ex) == "it's 41 $x\n", ex
        # a long cell interrupted ends at once; the shell and its variables stay
        long = client.post(f"/runtimes/{rid}/executions", json={"code": "sleep 600; echo after"}).json()
        time.sleep(1.5)
        began = time.monotonic()
        assert client.post(f"/executions/{long['id']}/interrupt").status_code == 202
        done = client.get(f"/executions/{long['id']}", params={"wait": 15}).json()
        assert done["status"] == "interrupted" and time.monotonic() - began < 8, done
        assert "after" not in text(done), done
        assert text(run(client, rid, "echo $x")) == "41\n"
        # Python cells: an error saying why
        py = run(client, rid, "print(1)", language="python")
        assert py["status"] == "error" and "no python3" in json.dumps(py["outputs"]), py
        # the shell is the container's own: one bash, started by the exec (no file of envctl's)
        during = looks_sh(core, kube_namespace, name)
        assert [p for p in during["procs"] if p[3].startswith("bash --noprofile --norc")], during["procs"]
        assert during["files"] == before["files"]

        # a stop detaches: nothing of envctl's is left; the pod runs on, never restarted
        assert run(client, rid, "sleep 500 &")["status"] == "ok"  # a cell's own child goes too
        stopped = client.post(f"/runtimes/{rid}/stop", params={"wait": 30}).json()
        assert stopped["state"] == "stopped", stopped
        unchanged(before, looks_sh(core, kube_namespace, name))
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "detached" and "shells ended" in e["message"] for e in log), log

        # a cell attaches again; envctl killed and started again serves the same shell
        assert run(client, rid, "y=kept; cd /srv")["status"] == "ok"
        server.kill()
        server.start()
    with server.client() as client:
        ex = run(client, rid, "echo $y $(pwd)")
        assert text(ex) == "kept /srv\n", ex  # the same shell: its variables kept
        # idle shutdown detaches
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 1}).status_code == 200
        server.wait_state(client, rid, {"stopped"}, timeout=30)
        unchanged(before, looks_sh(core, kube_namespace, name))
        # deleting the runtime (attached again by a cell) detaches and leaves the pod
        assert text(run(client, rid, "echo again")) == "again\n"
        assert client.delete(f"/runtimes/{rid}").status_code == 204
    unchanged(before, looks_sh(core, kube_namespace, name))
    output = server.output().lower()  # the Role of `envctl kube rbac --attach` was enough
    assert "forbidden" not in output, server.output()[-3000:]
    pod = core.read_namespaced_pod(name, kube_namespace)
    assert pod.metadata.uid == uid and pod.status.phase == "Running"
    assert pod.status.container_statuses[0].restart_count == 0


def _agent_key(server: Server, rid: str) -> str:
    """The attach's agent key, opened from the runtime's row (it must appear in no process)."""
    db = Database(f"sqlite:///{server.data_dir / 'envctl.db'}")
    try:
        with db.session() as s:
            row = s.get(Runtime, rid)
            assert row is not None
            agent = dict((row.backend_state or {}).get("agent") or {})
    finally:
        db.dispose()
    return AgentLinks(SecretBox(server.data_dir / "secrets.key")).address(rid, agent).key.hex()


def test_an_attached_pod_deleted_behind_envctls_back_turns_its_runtime_to_error(
    server: Server, core: Any, kube_namespace: str, images: dict[str, str]
) -> None:
    name = f"data-gone-{uuid.uuid4().hex[:6]}"
    start_pod(core, kube_namespace, name, images["python3"], "exec sleep 86400", {})
    with server.client() as client:
        r = attach(client, "gone", name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        ex = run(client, rid, "print('here')")
        assert text(ex) == "here\n", ex
        core.delete_namespaced_pod(name, kube_namespace, grace_period_seconds=0)
        rt = server.wait_state(client, rid, {"error"}, timeout=60)
        assert rt["state_reason"] == "agent-unreachable", rt
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "detached" for e in log), log
        assert client.delete(f"/runtimes/{rid}").status_code == 204
