"""Cells on real runtimes, through a real `envctl serve`: state, live output, interrupts,
restarts, output caps, idle rules, results and Jupyter kernels."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def server(shared_server: Server) -> Server:
    """This module's tests share one `envctl serve` (one that is killed is started again);
    the runtimes each test makes are deleted after it."""
    return shared_server


@pytest.fixture(scope="module")
def tcp_module_server(docker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `envctl serve` whose runtimes' agents are reached over the network (the tcp channel)."""
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path_factory.mktemp("tcp") / "data", ENVCTL_RUNNER_CHANNEL="tcp")
    yield srv
    remove_runner_containers(docker, srv)


@pytest.fixture(params=["unix", "tcp"])
def channel_server(request: pytest.FixtureRequest, shared_server: Server) -> Iterator[Server]:
    """The test on both agent channels: the Unix socket (the shared server) and tcp."""
    if request.param == "unix":
        yield shared_server
        return
    srv: Server = request.getfixturevalue("tcp_module_server")
    if srv.proc is None or srv.proc.poll() is not None:
        srv.start()  # a test before killed it
    with srv.client() as client:
        before = {rt["id"] for rt in client.get("/runtimes").json()}
    yield srv
    with srv.client() as client:
        for rt in client.get("/runtimes").json():
            if rt["id"] not in before:
                client.delete(f"/runtimes/{rt['id']}")


def new_runtime(client: httpx.Client, name: str = "cells", **body: Any) -> str:
    r = client.post("/runtimes", json={"environment": "python3", "name": name, **body})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def run(client: httpx.Client, rid: str, code: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 30}, json={"code": code, **body})
    assert r.status_code == 202, r.text
    ex: dict[str, Any] = r.json()
    assert ex["status"] in ("ok", "error", "interrupted"), ex
    return ex


def text(ex: dict[str, Any], name: str = "stdout") -> str:
    return "".join(o["text"] for o in ex["outputs"] if o["output_type"] == "stream" and o["name"] == name)


def sse(
    client: httpx.Client, execution_id: str, headers: dict[str, str] | None = None
) -> Iterator[tuple[float, str, str, str | None]]:
    """(arrival time, event, data, id) for each server-sent event."""
    event, data, eid = "message", "", None
    with client.stream("GET", f"/executions/{execution_id}/events", headers=headers or {}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif line.startswith("id:"):
                eid = line[3:].strip()
            elif line == "" and data:
                yield time.monotonic(), event, data, eid
                event, data, eid = "message", "", None


def test_python_state_survives_between_cells_and_the_last_expression_is_the_result(channel_server: Server) -> None:
    server = channel_server
    with server.client() as client:
        rid = new_runtime(client)  # stopped: the first cell boots it
        first = run(client, rid, "import math\nx = 21\ndef double(v):\n    return 2 * v\nprint('ready')")
        assert first["status"] == "ok" and text(first) == "ready\n"
        assert client.get(f"/runtimes/{rid}").json()["state"] == "running"
        second = run(client, rid, "double(x)")
        [result] = [o for o in second["outputs"] if o["output_type"] == "execute_result"]
        assert result["data"]["text/plain"] == "42"
        assert second["execution_count"] == first["execution_count"] + 1


def test_bash_keeps_its_working_directory_variables_and_functions(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client, language="bash")
        assert (
            run(client, rid, 'mkdir -p /tmp/w && cd /tmp/w\nGREETING=hello\nsay() { echo "$GREETING $1"; }')["status"]
            == "ok"
        )
        ex = run(client, rid, "pwd; say world")
        assert text(ex) == "/tmp/w\nhello world\n"


def test_an_error_carries_its_name_value_and_traceback(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client)
        ex = run(client, rid, "def f():\n    return 1 / 0\nf()")
        assert ex["status"] == "error"
        [err] = [o for o in ex["outputs"] if o["output_type"] == "error"]
        assert err["ename"] == "ZeroDivisionError" and err["evalue"] == "division by zero"
        assert any("return 1 / 0" in line for line in err["traceback"])
        assert ex["error_name"] == "ZeroDivisionError"
        bash = run(client, rid, "echo oops >&2; exit_code() { return 3; }; exit_code", language="bash")
        assert bash["status"] == "error" and text(bash, "stderr") == "oops\n"


def test_outputs_stream_live_in_order_a_line_when_it_is_printed(channel_server: Server) -> None:
    server = channel_server
    with server.client() as client:
        rid = new_runtime(client)
        run(client, rid, "import time")
        ex = client.post(
            f"/runtimes/{rid}/executions",
            json={"code": "for i in range(5):\n    print(i, flush=True)\n    time.sleep(0.4)"},
        ).json()
        events = list(sse(client, ex["id"]))
        lines = [(t, json.loads(d)["text"]) for t, e, d, _ in events if e == "output"]
        assert "".join(txt for _, txt in lines) == "0\n1\n2\n3\n4\n"
        assert events[-1][1] == "status" and json.loads(events[-1][2])["status"] == "ok"
        # a line a little under every 0.4 s, not all at the end
        first_line_at = lines[0][0]
        assert events[-1][0] - first_line_at > 1.2


def test_a_client_that_reconnects_resumes_after_the_last_event_it_saw(channel_server: Server) -> None:
    server = channel_server
    with server.client() as client:
        rid = new_runtime(client)
        ex = run(client, rid, "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.05)")
        every = [(eid, json.loads(d)) for _, e, d, eid in sse(client, ex["id"]) if e == "output"]
        assert len(every) >= 2
        resumed = [
            (eid, json.loads(d))
            for _, e, d, eid in sse(client, ex["id"], {"Last-Event-ID": every[0][0] or ""})
            if e == "output"
        ]
        assert resumed == every[1:]


def test_interrupt_stops_the_cell_and_keeps_the_interpreter_state(channel_server: Server) -> None:
    server = channel_server
    with server.client() as client:
        rid = new_runtime(client)
        run(client, rid, "x = 'kept'")
        ex = client.post(f"/runtimes/{rid}/executions", json={"code": "import time\ntime.sleep(60)"}).json()
        time.sleep(1.5)
        began = time.monotonic()
        assert client.post(f"/executions/{ex['id']}/interrupt").status_code == 202
        done = client.get(f"/executions/{ex['id']}", params={"wait": 10}).json()
        assert done["status"] == "interrupted" and time.monotonic() - began < 8
        assert run(client, rid, "x")["outputs"][0]["data"]["text/plain"] == "'kept'"
        # bash too
        sh = client.post(f"/runtimes/{rid}/executions", json={"code": "V=1; sleep 60", "language": "bash"}).json()
        time.sleep(1)
        client.post(f"/executions/{sh['id']}/interrupt")
        assert client.get(f"/executions/{sh['id']}", params={"wait": 10}).json()["status"] == "interrupted"
        assert text(run(client, rid, "echo $V", language="bash")) == "1\n"


def test_a_cell_past_its_timeout_is_stopped_with_a_timeout_error(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client)
        ex = run(client, rid, "import time\ntime.sleep(60)", timeout=1)
        assert ex["status"] == "error"
        assert any(o.get("ename") == "TimeoutError" for o in ex["outputs"])


def test_a_long_cell_runs_to_the_end_with_no_client_and_its_outputs_are_kept(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client)
        run(client, rid, "1")
        ex = client.post(
            f"/runtimes/{rid}/executions",
            json={"code": "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.5)"},
        ).json()
    time.sleep(3)
    with server.client() as client:
        done = client.get(f"/executions/{ex['id']}").json()
        assert done["status"] == "ok" and text(done) == "0\n1\n2\n"
        assert [e["id"] for e in client.get(f"/runtimes/{rid}/executions").json()][0] == ex["id"]


def test_a_sigkilled_server_keeps_interpreter_state_and_the_cell_that_was_running(channel_server: Server) -> None:
    """R11: interpreter state and the running cell survive a SIGKILL of the server (on the tcp
    channel: the restarted server reconnects to the address and credential on the row)."""
    server = channel_server
    with server.client() as client:
        rid = new_runtime(client)
        run(client, rid, "state = {'n': 42}")
        ex = client.post(
            f"/runtimes/{rid}/executions",
            json={"code": "import time\nprint('before', flush=True)\ntime.sleep(3)\nprint('after')\nstate['n'] += 1"},
        ).json()
        time.sleep(1)
    server.kill()
    server.start()
    with server.client() as client:
        done = client.get(f"/executions/{ex['id']}", params={"wait": 20}).json()
        assert done["status"] == "ok", done
        assert text(done) == "before\nafter\n"  # nothing lost, nothing repeated
        assert run(client, rid, "state['n']")["outputs"][0]["data"]["text/plain"] == "43"


def test_a_gigabyte_of_output_is_capped_and_the_server_stays_small(docker: Any, tmp_path: Path) -> None:
    """R5: 1 GB printed; stored output under the cap with a truncation marker, server memory bounded."""
    base_image(docker, "python3")
    srv = start_server(docker, tmp_path / "data", ENVCTL_RUNNER_OUTPUT_CAP=str(2 * 1024 * 1024))
    try:
        with srv.client() as client:
            rid = new_runtime(client)
            run(client, rid, "1")
            before = _rss_kb(srv)
            ex = client.post(
                f"/runtimes/{rid}/executions",
                json={
                    "code": (
                        "import sys\nline = 'y' * 1048575 + '\\n'\nfor _ in range(1024):\n    sys.stdout.write(line)"
                    )
                },
            ).json()
            done = client.get(f"/executions/{ex['id']}", params={"wait": 30}).json()
            while done["status"] not in ("ok", "error"):
                done = client.get(f"/executions/{ex['id']}", params={"wait": 30}).json()
            assert done["status"] == "ok" and done["truncated"] is True
            assert done["output_bytes"] <= 2 * 1024 * 1024 + 4096
            assert "output truncated" in text(done, "stderr")
            assert _rss_kb(srv) - before < 150 * 1024  # well under the gigabyte that went by
            assert client.get("/health").status_code == 200
            assert run(client, rid, "2")["status"] == "ok"
    finally:
        remove_runner_containers(docker, srv)


def _rss_kb(srv: Server) -> int:
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_busy_runtime_is_not_shut_down_and_an_idle_one_is_even_with_a_client_watching(server: Server) -> None:
    """R18, R19: a cell sleeping past twice the idle timeout keeps the runtime; a polling client does not."""
    with server.client() as client:
        rid = new_runtime(client, idle_timeout=2)
        ex = client.post(f"/runtimes/{rid}/executions", json={"code": "import time\ntime.sleep(5)"}).json()
        time.sleep(1)
        busy = client.get(f"/runtimes/{rid}").json()
        assert busy["busy"] is True and busy["idle_shutdown_at"] is None
        time.sleep(3)  # past the idle timeout while the cell sleeps
        assert client.get(f"/runtimes/{rid}").json()["state"] == "running"
        assert client.get(f"/executions/{ex['id']}", params={"wait": 10}).json()["status"] == "ok"
        # idle now: a client polling the runtime is not activity
        finished = time.monotonic()
        while time.monotonic() - finished < 15:
            rt = client.get(f"/runtimes/{rid}").json()
            if rt["state"] != "running":
                break
            time.sleep(0.2)
        assert rt["state"] in ("stopping", "stopped"), json.dumps(rt)
        assert time.monotonic() - finished < 15  # late only on a loaded machine
        log = client.get(f"/runtimes/{rid}/log").json()
        stop = next(e for e in log if e["state"] == "stopping")
        assert stop["reason"] == "idle" and stop["details"]["last_activity"] == "execution finished"
        _stopped_one_timeout_after_the_cell(client, ex["id"], stop, timeout=2)


def test_a_client_that_stays_connected_to_an_idle_runtime_does_not_keep_it_running(server: Server) -> None:
    """R19: a page connected from the cell's start (its event stream, then reading everything
    about the runtime on one keep-alive connection) is not activity: shut down one idle
    timeout after the cell ended."""
    with server.client() as client:
        rid = new_runtime(client, idle_timeout=2)
        ex = client.post(f"/runtimes/{rid}/executions", json={"code": "print('hi')"}).json()
        events = list(sse(client, ex["id"]))
        finished = time.monotonic()
        assert events[-1][1] == "status" and json.loads(events[-1][2])["status"] == "ok"
        last_id = [eid for _, e, _, eid in events if e == "output"][-1]
        while time.monotonic() - finished < 20:
            assert [e for _, e, _, _ in sse(client, ex["id"], {"Last-Event-ID": last_id or ""})] == ["status"]
            assert client.get(f"/executions/{ex['id']}", params={"wait": 1}).status_code == 200
            for path in ("/log", "/executions", "/changes", "/results"):
                assert client.get(f"/runtimes/{rid}{path}").status_code == 200
            rt = client.get(f"/runtimes/{rid}").json()
            if rt["state"] != "running":
                break
            time.sleep(0.1)
        assert rt["state"] in ("stopping", "stopped"), json.dumps(rt)
        assert time.monotonic() - finished < 15  # late only on a loaded machine
        stop = next(e for e in client.get(f"/runtimes/{rid}/log").json() if e["state"] == "stopping")
        assert stop["reason"] == "idle" and stop["details"]["last_activity"] == "execution finished"
        _stopped_one_timeout_after_the_cell(client, ex["id"], stop, timeout=2)


def _stopped_one_timeout_after_the_cell(
    client: httpx.Client, execution_id: str, stop: dict[str, Any], timeout: float
) -> None:
    """The idle stop came one idle timeout after the cell ended, not before, and not much
    later (by the server's clock: the client's measure includes its own delays)."""
    ended = datetime.fromisoformat(client.get(f"/executions/{execution_id}").json()["finished_at"])
    assert abs(datetime.fromisoformat(stop["details"]["last_activity_at"]) - ended) < timedelta(seconds=1)
    after = datetime.fromisoformat(stop["at"]) - ended
    assert timedelta(seconds=timeout - 0.05) <= after < timedelta(seconds=timeout + 10), after


def test_result_files_are_versioned_by_content_and_outlive_the_runtime(channel_server: Server) -> None:
    server = channel_server
    with server.client() as client:
        rid = new_runtime(client)
        first = run(
            client,
            rid,
            "import os\nos.makedirs('/results/plots', exist_ok=True)\n"
            "open('/results/a.txt','w').write('one')\n"
            "open('/results/plots/b.bin','wb').write(bytes(range(256)))",
        )
        listed = client.get(f"/executions/{first['id']}/results").json()
        assert sorted(r["path"] for r in listed) == ["a.txt", "plots/b.bin"]
        a = next(r for r in listed if r["path"] == "a.txt")
        assert a["sha256"] == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed" and a["size"] == 3
        assert client.get(a["content_url"]).content == b"one"
        unchanged = run(client, rid, "open('/results/a.txt','w').write('one')")
        assert client.get(f"/executions/{unchanged['id']}/results").json() == []
        second = run(client, rid, "open('/results/a.txt','w').write('two')")
        [changed] = client.get(f"/executions/{second['id']}/results").json()
        assert changed["path"] == "a.txt" and changed["sha256"] != a["sha256"]
        assert client.delete(f"/runtimes/{rid}").status_code == 204
        kept = client.get(f"/runtimes/{rid}/results").json()
        assert [r["path"] for r in kept].count("a.txt") == 2
        assert client.get(f"/results/{changed['id']}/content").content == b"two"


@pytest.mark.s3
def test_results_go_to_an_s3_bucket_when_configured(docker: Any, tmp_path: Path) -> None:
    import boto3

    from tests.fixtures.s3 import start_s3

    base_image(docker, "python3")
    endpoint_gen = start_s3()
    endpoint = next(endpoint_gen)
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint.url,
            region_name=endpoint.region,
            aws_access_key_id=endpoint.access_key,
            aws_secret_access_key=endpoint.secret_key,
        )
        s3.create_bucket(Bucket="envctl-results")
        srv = start_server(
            docker,
            tmp_path / "data",
            ENVCTL_RESULTS_STORE="s3",
            ENVCTL_RESULTS_S3_BUCKET="envctl-results",
            ENVCTL_RESULTS_S3_ENDPOINT_URL=endpoint.url,
            ENVCTL_RESULTS_S3_PREFIX="team/",
            AWS_ACCESS_KEY_ID=endpoint.access_key,
            AWS_SECRET_ACCESS_KEY=endpoint.secret_key,
        )
        try:
            with srv.client() as client:
                rid = new_runtime(client)
                ex = run(client, rid, "open('/results/r.csv','w').write('a,b\\n1,2\\n')")
                [res] = client.get(f"/executions/{ex['id']}/results").json()
                key = f"team/sha256/{res['sha256']}"
                assert s3.get_object(Bucket="envctl-results", Key=key)["Body"].read() == b"a,b\n1,2\n"
                assert client.get(res["content_url"]).content == b"a,b\n1,2\n"
        finally:
            remove_runner_containers(docker, srv)
    finally:
        endpoint_gen.close()


def test_rich_display_gives_mime_bundles(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client)
        ex = run(
            client,
            rid,
            "display(HTML('<b>hi</b>'), JSON({'a': 1}))\n"
            "class P:\n    def _repr_html_(self):\n        return '<i>p</i>'\nP()",
        )
        kinds = [(o["output_type"], sorted(o["data"])) for o in ex["outputs"]]
        assert ("display_data", ["text/html", "text/plain"]) in kinds
        assert ("display_data", ["application/json", "text/plain"]) in kinds
        assert kinds[-1] == ("execute_result", ["text/html", "text/plain"])


def test_a_jupyter_runtime_runs_the_ipykernel_of_its_environment(docker: Any, tmp_path: Path) -> None:
    base_image(docker, "python3-jupyter")
    srv = start_server(docker, tmp_path / "data", ["python3-jupyter"])
    try:
        with srv.client() as client:
            r = client.post("/runtimes", json={"environment": "python3-jupyter", "name": "jup", "type": "jupyter"})
            assert r.status_code == 201, r.text
            assert r.json()["kernel"] == "python3"
            rid = r.json()["id"]
            run(client, rid, "x = 21")
            ex = run(client, rid, "print('from ipykernel'); x * 2")
            assert text(ex) == "from ipykernel\n"
            assert [o for o in ex["outputs"] if o["output_type"] == "execute_result"][0]["data"]["text/plain"] == "42"
            err = run(client, rid, "1/0")
            assert err["status"] == "error" and err["error_name"] == "ZeroDivisionError"
            slow = client.post(f"/runtimes/{rid}/executions", json={"code": "import time; time.sleep(60)"}).json()
            time.sleep(2)
            client.post(f"/executions/{slow['id']}/interrupt")
            assert client.get(f"/executions/{slow['id']}", params={"wait": 15}).json()["status"] == "interrupted"
            assert run(client, rid, "x")["status"] == "ok"
    finally:
        remove_runner_containers(docker, srv)


def test_executions_of_another_user_are_invisible(server: Server) -> None:
    """R27: another user's executions answer 404."""
    with server.client() as client:
        rid = new_runtime(client)
        ex = run(client, rid, "1")
    other = os.environ.get("ENVCTL_TEST_OTHER_TOKEN")
    if other is None:
        from envs.kit.db import Database
        from registry.users import create_user, issue_token

        db = Database(f"sqlite:///{server.data_dir / 'envctl.db'}")
        with db.session() as s:
            other = issue_token(s, create_user(s, "mallory"))
        db.dispose()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}) as client:
        assert client.get(f"/executions/{ex['id']}").status_code == 404
        assert client.post(f"/executions/{ex['id']}/interrupt").status_code == 404
        assert client.get(f"/executions/{ex['id']}/events").status_code == 404
        assert client.post(f"/runtimes/{rid}/executions", json={"code": "1"}).status_code == 404
        assert client.get(f"/executions/{ex['id']}/results").json() == []
