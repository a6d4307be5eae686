"""Attached runtimes against real Docker and a real `envctl serve` (issue 17, R42): cells run in
containers the test starts itself with `docker run` (with and without python3), see their
processes, files, variables and working directory; a container outside the allow-list is a 403
naming the rule; detaching (a stop, idle shutdown, deletion) leaves the container as it was
(`docker diff` and its processes compared before and after), and it keeps running through all
of that and through envctl's restart; a save is refused unless asked for."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.cli import main
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import text
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ALLOW = "label:envctl.attach=yes,name:data-*"


@pytest.fixture
def attach_server(docker: Any, tmp_path: Any) -> Iterator[Server]:
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data", ENVCTL_RUNNER_ATTACH_ALLOW=ALLOW)
    yield srv
    remove_runner_containers(docker, srv)


@pytest.fixture
def own_containers(docker: Any) -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for c in made:
        c.remove(force=True)


def docker_run(docker: Any, made: list[Any], image: str, name: str, command: str, **kw: Any) -> Any:
    c = docker.containers.run(
        image,
        ["bash", "-c", command],
        name=name,
        detach=True,
        labels={TEST_LABEL: TEST_SESSION, **kw.pop("labels", {})},
        **kw,
    )
    made.append(c)
    deadline = time.monotonic() + 20
    while docker.api.inspect_container(c.id)["State"]["Status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # its command's own changes made
    return c


def looks(docker: Any, c: Any) -> tuple[list[Any], list[str]]:
    """What `docker diff` says and which processes run (commands), for a before/after check."""
    diff = sorted((d["Kind"], d["Path"]) for d in docker.api.diff(c.id) or [])
    top = sorted(" ".join(p[-1:]) for p in docker.api.top(c.id)["Processes"])
    return diff, top


def attach(client: httpx.Client, name: str, container: str) -> httpx.Response:
    return client.post("/runtimes", json={"name": name, "attach": {"container": container}})


def run(client: httpx.Client, rid: str, code: str, language: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, **({"language": language} if language else {})}
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json=body)
    assert r.status_code == 202, r.text
    ex: dict[str, Any] = r.json()
    return ex


def test_cells_run_inside_an_allowed_container_which_is_left_as_it_was(
    attach_server: Server, docker: Any, own_containers: list[Any]
) -> None:
    tag = uuid.uuid4().hex[:6]
    image = base_image(docker, "python3")
    svc = docker_run(
        docker,
        own_containers,
        image,
        f"svc-{tag}",
        "echo hello > /srv-marker; exec sleep infinity",
        labels={"envctl.attach": "yes"},
        environment={"SERVICE_MODE": "prod"},
        working_dir="/opt",
    )
    other = docker_run(docker, own_containers, image, f"other-{tag}", "exec sleep infinity")
    before = looks(docker, svc)
    with attach_server.client() as client:
        refused = attach(client, "nope", other.name)
        assert refused.status_code == 403, refused.text
        err = refused.json()["error"]
        assert "label:envctl.attach=yes" in err["message"] and "name:data-*" in err["message"]
        assert attach(client, "missing", f"no-such-{tag}").status_code == 404
        r = attach(client, "svc", svc.name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert r.json()["language"] == "python"
        ex = run(
            client, rid, "import os; print(os.environ['SERVICE_MODE'], os.getcwd(), open('/srv-marker').read().strip())"
        )
        assert ex["status"] == "ok", ex
        assert text(ex) == "prod /opt hello\n"
        ex = run(client, rid, "print(open('/proc/1/cmdline').read().replace(chr(0), ' ').strip())")
        assert "sleep infinity" in text(ex), ex  # its processes
        ex = run(client, rid, "echo $SERVICE_MODE; pwd; x=1; echo $((x + 1))", language="bash")
        assert text(ex) == "prod\n/opt\n2\n", ex
        shown = client.get(f"/runtimes/{rid}").json()
        assert shown["origin"] == "attached" and shown["state"] == "running"
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any("attached to container" in e["message"] for e in log)
        save = client.post(f"/runtimes/{rid}/save", json={"environment": "from-svc"})
        assert save.status_code == 409 and "attached_save" in save.text
        # envctl killed and started again: the container and the attachment stay
        attach_server.kill()
        attach_server.start()
    with attach_server.client() as client:
        assert svc.reload() or docker.api.inspect_container(svc.id)["State"]["Running"]
        ex = run(client, rid, "print('again')")
        assert text(ex) == "again\n", ex
        # idle shutdown detaches
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 1}).status_code == 200
        attach_server.wait_state(client, rid, {"stopped"}, timeout=30)
        assert docker.api.inspect_container(svc.id)["State"]["Running"]
        assert looks(docker, svc) == before
        # a cell starts it again (attached again); deleting the runtime detaches
        ex = run(client, rid, "print(2 + 2)")
        assert text(ex) == "4\n", ex
        assert client.delete(f"/runtimes/{rid}").status_code == 204
    assert docker.api.inspect_container(svc.id)["State"]["Running"]
    assert looks(docker, svc) == before


def test_a_container_without_python_runs_bash_cells_only_and_says_so(
    attach_server: Server, docker: Any, own_containers: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Attached with `envctl runtime attach NAME CONTAINER`."""
    tag = uuid.uuid4().hex[:6]
    image = base_image(docker, "bash")
    data = docker_run(
        docker,
        own_containers,
        image,
        f"data-{tag}",
        "rm -f /usr/bin/python3 /usr/local/bin/python3; echo 42 > /answer; exec sleep infinity",
    )
    before = looks(docker, data)
    token = (attach_server.data_dir / "admin-token").read_text().strip()
    capsys.readouterr()
    code = main(["runtime", "attach", "data", data.name, "--url", attach_server.url, "--token", token, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    made = json.loads(out)
    assert made["origin"] == "attached" and made["language"] == "bash"
    assert "Bash cells only" in made["state_message"]
    with attach_server.client() as client:
        rid = made["id"]
        ex = run(client, rid, "cat /answer; ps -o comm= -p 1 2>/dev/null || cat /proc/1/comm")
        assert ex["status"] == "ok", ex
        assert text(ex).split() == ["42", "sleep"]
        py = run(client, rid, "print(1)", language="python")
        assert py["status"] == "error" and "has no python3" in json.dumps(py["outputs"]), py
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any("Bash cells only" in e["message"] for e in log)
        assert client.post(f"/runtimes/{rid}/stop", params={"wait": 20}).json()["state"] == "stopped"
    assert docker.api.inspect_container(data.id)["State"]["Running"]
    assert looks(docker, data) == before


def _status(text_: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text_.splitlines()) if v}


def test_attached_cells_get_the_containers_confinement_cgroup_capabilities_no_new_privs(
    attach_server: Server, docker: Any, own_containers: list[Any]
) -> None:
    """Cells of an attached container run in its cgroups, with its bounding set and
    capabilities and no_new_privs, and its memory limit kills the cell, not envctl's agent."""
    tag = uuid.uuid4().hex[:6]
    box = docker_run(
        docker,
        own_containers,
        base_image(docker, "python3"),
        f"data-tight-{tag}",
        "exec sleep infinity",
        cap_drop=["ALL"],
        mem_limit="64m",
        memswap_limit="64m",
        pids_limit=64,
        security_opt=["no-new-privileges"],
    )
    init_pid = docker.api.inspect_container(box.id)["State"]["Pid"]
    with open(f"/proc/{init_pid}/status") as f:
        init = _status(f.read())
    with open(f"/proc/{init_pid}/cgroup") as f:
        init_cgroup = f.read()
    assert int(init["CapBnd"], 16) == 0 and init["NoNewPrivs"] == "1"  # what the container was given
    with attach_server.client() as client:
        r = attach(client, "tight", box.name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        ex = run(
            client, rid, "print(open('/proc/self/status').read()); print('@@'); print(open('/proc/self/cgroup').read())"
        )
        assert ex["status"] == "ok", ex
        status, cgroup = text(ex).split("@@\n")
        cell = _status(status)
        for key in ("CapBnd", "CapEff", "CapPrm", "CapInh", "NoNewPrivs", "Uid", "Gid"):
            assert cell[key] == init[key], (key, cell[key], init[key])
        assert cell["NoNewPrivs"] == "1" and int(cell["CapEff"], 16) == 0
        assert cgroup.strip() == init_cgroup.strip()
        assert any(":memory:" in line and box.id in line for line in cgroup.splitlines()), cgroup
        ex = run(client, rid, "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; cat /proc/self/cgroup", "bash")
        assert ex["status"] == "ok", ex
        shown = _status(text(ex).split("\n0::")[0])
        assert shown["CapEff"] == init["CapEff"] and shown["CapBnd"] == init["CapBnd"] and shown["NoNewPrivs"] == "1"
        assert init_cgroup.splitlines()[0] in text(ex)
        # a cell past the 64 MB limit is killed; the agent beside the container is not
        ex = run(client, rid, "blob = b'x' * (300 << 20); print(len(blob))")
        assert ex["status"] == "error", ex
        assert docker.api.inspect_container(box.id)["State"]["Running"]
        ex = run(client, rid, "print('still here')")
        assert ex["status"] == "ok" and text(ex) == "still here\n", ex
        assert client.get(f"/runtimes/{rid}").json()["state"] == "running"
        assert client.delete(f"/runtimes/{rid}").status_code == 204


def test_attached_cells_run_as_the_containers_user(
    attach_server: Server, docker: Any, own_containers: list[Any]
) -> None:
    tag = uuid.uuid4().hex[:6]
    box = docker_run(
        docker,
        own_containers,
        base_image(docker, "python3"),
        f"data-user-{tag}",
        "exec sleep infinity",
        user="1234:2345",
        group_add=["3456"],
        working_dir="/tmp",
    )
    with attach_server.client() as client:
        r = attach(client, "user", box.name)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        ex = run(client, rid, "id -u; id -g; id -G; touch /tmp/made; stat -c %u:%g /tmp/made; pwd", "bash")
        assert ex["status"] == "ok", ex
        uid, gid, groups, owner, cwd = text(ex).split("\n")[:5]
        assert (uid, gid, owner, cwd) == ("1234", "2345", "1234:2345", "/tmp"), ex
        assert "3456" in groups.split(), ex
        ex = run(client, rid, "import os; print(os.getuid(), os.getgid(), os.getcwd())")
        assert text(ex) == "1234 2345 /tmp\n", ex
        # interrupts still reach the confined kernels (the launcher's own child)
        for code, language in (("x = 'kept'\nimport time\ntime.sleep(60)", "python"), ("sleep 60", "bash")):
            long = client.post(f"/runtimes/{rid}/executions", json={"code": code, "language": language}).json()
            time.sleep(1.5)
            began = time.monotonic()
            assert client.post(f"/executions/{long['id']}/interrupt").status_code == 202
            done = client.get(f"/executions/{long['id']}", params={"wait": 10}).json()
            assert done["status"] == "interrupted" and time.monotonic() - began < 8, done
        assert text(run(client, rid, "print(x)")) == "kept\n"
        assert client.delete(f"/runtimes/{rid}").status_code == 204


def test_the_launcher_refuses_to_start_a_kernel_it_cannot_confine(tmp_path: Any) -> None:
    """No container process of that id: nothing runs, exit 126 and the step named."""
    import subprocess
    import sys

    from runner.paths import AGENT_DIR

    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-I", str(AGENT_DIR / "confine.py"), "999999999", "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 126, done
    assert "could not confine the cell" in done.stderr and "999999999" in done.stderr
    assert not marker.exists()
