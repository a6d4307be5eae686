"""Saves, drafts, changes, pinning and lineage on the real Docker engine (issue 4)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from envs.images import docker as engine
from envs.kit.errors import BackendError
from runner.backends.docker import DockerBackend
from runner.saves.imageconfig import CONFIG_KEYS
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers, start_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def server(shared_server: Server) -> Server:
    """This module's tests share one `envctl serve` (one that is killed is started again);
    the runtimes each test makes are deleted after it."""
    return shared_server


SECRET = "s3cr3t-Value-9f8e7d"


def save(client: httpx.Client, rid: str, environment: str, message: str = "", **body: Any) -> dict[str, Any]:
    r = client.post(f"/runtimes/{rid}/save", json={"environment": environment, "message": message, **body})
    assert r.status_code == 202, r.text
    op = r.json()
    deadline = time.monotonic() + 120
    while op["status"] == "running" and time.monotonic() < deadline:
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    assert op["status"] == "succeeded", op
    return op


def started(server: Server, client: httpx.Client, rid: str) -> None:
    client.post(f"/runtimes/{rid}/start")
    assert server.wait_state(client, rid, {"running", "error"})["state"] == "running"


def test_a_save_asked_to_wait_answers_when_it_ended_with_where_its_time_went(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client, "timed", language="bash")
        assert run(client, rid, "head -c 2000000 /dev/urandom > /root/blob")["status"] == "ok"
        t = time.monotonic()
        r = client.post(f"/runtimes/{rid}/save", params={"wait": 30}, json={"environment": "timed"})
        took_ms = (time.monotonic() - t) * 1000
        assert r.status_code == 202, r.text
        op = r.json()
        assert op["status"] == "succeeded" and op["result"]["version"] == "timed@1", op
        spans = op["result"]["timings_ms"]
        # the engine's commit and the version's record are among the spans; none is longer than the save
        assert {"pause", "plan", "commit", "record", "total"} <= spans.keys(), spans
        assert all(0 <= ms <= spans["total"] for ms in spans.values()), spans
        assert spans["total"] <= took_ms, (spans, took_ms)
        # the runtime's log says it before the operation ended, and the saved line is there once
        saved = [e for e in client.get(f"/runtimes/{rid}/log").json() if e.get("event") == "saved"]
        assert [e["message"] for e in saved] == ["saved as timed@1"], saved
        # asked not to wait, it answers at once (the save goes on: its operation is followed)
        assert run(client, rid, "echo more > /root/more")["status"] == "ok"
        r = client.post(f"/runtimes/{rid}/save", json={"environment": "timed"})
        assert r.status_code == 202 and r.json()["status"] in ("running", "succeeded"), r.text
        later = client.get(f"/operations/{r.json()['id']}", params={"wait": 30}).json()
        assert later["status"] == "succeeded" and later["result"]["version"] == "timed@2", later
        bad = client.post(f"/runtimes/{rid}/save", params={"wait": 31}, json={"environment": "timed"})
        assert bad.status_code == 422 and "wait" in bad.text, bad.text


def test_a_package_installed_in_a_cell_is_in_the_saved_version(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client, "builder", language="bash")
        install = run(
            client,
            rid,
            "apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends jq >/dev/null",
        )
        assert install["status"] == "ok", text(install, "stderr")[-2000:]
        op = save(client, rid, "tools", "jq for JSON")
        assert op["result"]["version"] == "tools@1"
        env = client.get("/environments/tools").json()
        v = env["versions"][0]
        assert v["parent"] == "python3@1" and v["message"] == "jq for JSON" and v["author"] == "admin"
        assert v["size_added"] > 0 and env["latest"] == "tools@1"
        # the runtime now stands on what it saved: pinned to tools@1, nothing unsaved
        after = client.get(f"/runtimes/{rid}").json()
        assert after["environment"] == "tools@1" and after["unsaved_changes"] is False
        assert client.get(f"/runtimes/{rid}/changes").json() == []
        run(client, rid, "echo later > /root/later.txt")
        later = {c["path"] for c in client.get(f"/runtimes/{rid}/changes").json()}
        assert later == {"/root", "/root/later.txt"}  # the file, and the directory it changed
        second = save(client, rid, "tools", "and a note")
        assert second["result"]["version"] == "tools@2"
        assert client.get("/environments/tools@2/lineage").json()[1]["ref"] == "tools@1"
        client.post(f"/runtimes/{rid}/stop")
        stopped = server.wait_state(client, rid, {"stopped"})
        assert stopped["unsaved_changes"] is False  # everything was saved: no draft
        assert not any(e["event"] == "draft-kept" for e in client.get(f"/runtimes/{rid}/log").json())
        assert text(run(client, rid, "cat /root/later.txt; which jq")) == "later\n/usr/bin/jq\n"
        user = new_runtime(client, "user", environment="tools@1", language="bash")
        ex = run(client, user, "echo '{\"a\": 7}' | jq .a")
        assert ex["status"] == "ok" and text(ex) == "7\n"
        assert client.get(f"/runtimes/{user}").json()["environment"] == "tools@1"
        assert "later" not in text(run(client, user, "ls /root"))


def _layers(docker: Any, image_id: str) -> list[bytes]:
    """Every layer of an image, as the raw tar bytes `docker save` gives."""
    raw = b"".join(docker.api.get_image(image_id))
    with tarfile.open(fileobj=io.BytesIO(raw)) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        return [outer.extractfile(layer).read() for layer in manifest[0]["Layers"]]  # type: ignore[union-attr]


def test_a_saved_image_holds_no_secret_mount_results_or_agent_files(server: Server, docker: Any) -> None:
    """R7, R8, R10: no secret in config or layers, nothing under mounts or /results, config from the template."""
    with server.client() as client:
        rid = new_runtime(client, "leaky")
        code = (
            "import os, subprocess\n"
            f"os.environ['API_TOKEN'] = '{SECRET}'\n"
            f"open('/results/token.txt', 'w').write('{SECRET}')\n"
            f"open('/run/envctl/note', 'w').write('{SECRET}')\n"
            "open('/root/kept.txt', 'w').write('ordinary work')\n"
        )
        assert run(client, rid, code)["status"] == "ok"
        assert run(client, rid, f"export SHELL_SECRET={SECRET}; echo ok", language="bash")["status"] == "ok"
        op = save(client, rid, "leaky-env")
        image_id = op["result"]["image_id"]
        attrs = docker.api.inspect_image(image_id)
        blob = json.dumps(attrs)
        for form in (SECRET, base64.b64encode(SECRET.encode()).decode(), urllib.parse.quote(SECRET)):
            assert form not in blob
        assert not any(e.startswith("ENVCTL_") for e in attrs["Config"]["Env"] or [])
        assert attrs["Config"]["Cmd"] == ["/bin/bash"] and attrs["Config"]["WorkingDir"] == "/root"
        labels = attrs["Config"]["Labels"]
        assert labels["org.opencontainers.image.base.name"] == "python3@1"
        assert labels["envctl.source-runtime"] == rid and labels["envctl.runtime-id"] == ""
        # what the base image's labels say (a recipe, its digest) is not said of a saved version
        for key in ("envctl.base-image", "envctl.recipe-digest", "envctl.parent-image"):
            assert not labels.get(key), (key, labels.get(key))
        layers = _layers(docker, image_id)
        with tarfile.open(fileobj=io.BytesIO(layers[-1])) as top:
            names = top.getnames()
        assert "root/kept.txt" in names
        for name in names:
            for private in ("results/", "run/envctl/", "opt/envctl/agent/"):
                assert not name.startswith(private), name
        for layer in layers:
            for form in (SECRET.encode(), base64.b64encode(SECRET.encode()), urllib.parse.quote(SECRET).encode()):
                assert form not in layer


def test_changes_list_what_differs_from_the_version_and_reset_throws_it_away(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client, "changer", language="bash")
        run(client, rid, "printf hello > /root/hello.txt; rm /etc/issue; echo x >> /etc/motd; echo r > /results/r.txt")
        changes = {c["path"]: c for c in client.get(f"/runtimes/{rid}/changes").json()}
        assert changes["/root/hello.txt"] == {"kind": "added", "path": "/root/hello.txt", "size": 5}
        assert changes["/etc/issue"]["kind"] == "deleted"
        assert changes["/etc/motd"]["kind"] == "changed"
        assert not any(p.startswith(("/results", "/run/envctl", "/opt/envctl")) for p in changes)
        assert client.get(f"/runtimes/{rid}").json()["unsaved_changes"] is True
        assert client.post(f"/runtimes/{rid}/reset").status_code == 202
        time.sleep(0.5)
        rt = server.wait_state(client, rid, {"running", "error"})
        assert rt["state"] == "running"
        assert client.get(f"/runtimes/{rid}/changes").json() == []
        assert client.get(f"/runtimes/{rid}").json()["unsaved_changes"] is False
        assert text(run(client, rid, "ls /root/hello.txt 2>&1; test -e /etc/issue && echo back")).endswith("back\n")


def test_unsaved_changes_survive_an_idle_shutdown_as_a_draft(server: Server) -> None:
    with server.client() as client:
        rid = new_runtime(client, "drafty", language="bash", idle_timeout=2)
        run(client, rid, "mkdir -p /opt/tool && echo v1 > /opt/tool/VERSION")
        rt = server.wait_state(client, rid, {"stopped"}, timeout=30)
        assert rt["state_reason"] == "idle" and rt["unsaved_changes"] is True
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "draft-kept" for e in log)
        ex = run(client, rid, "cat /opt/tool/VERSION")  # boots it again
        assert text(ex) == "v1\n"
        log = client.get(f"/runtimes/{rid}/log").json()
        assert any(e["event"] == "restoring" for e in log)
        changes = {c["path"]: c["kind"] for c in client.get(f"/runtimes/{rid}/changes").json()}
        assert changes.get("/opt/tool/VERSION") == "added"
        # the draft blocks a change of environment until it is saved or thrown away
        client.post(f"/runtimes/{rid}/stop")
        server.wait_state(client, rid, {"stopped"})
        r = client.patch(f"/runtimes/{rid}", json={"environment": "bash"})
        assert r.status_code == 409 and "unsaved changes" in r.json()["error"]["message"]


def test_a_runtime_stays_pinned_to_its_version_when_the_tag_moves(server: Server) -> None:
    """R24: booted after the tag moved, the runtime still uses its recorded version."""
    with server.client() as client:
        author = new_runtime(client, "author", language="bash")
        run(client, author, "echo one > /root/v")
        save(client, author, "pinned")
        reader = new_runtime(client, "reader", environment="pinned", language="bash")
        assert client.get(f"/runtimes/{reader}").json()["environment"] == "pinned@1"
        run(client, author, "echo two > /root/v")
        save(client, author, "pinned", "second")
        assert client.get("/environments/pinned").json()["latest"] == "pinned@2"
        assert text(run(client, reader, "cat /root/v")) == "one\n"
        assert client.get(f"/runtimes/{reader}").json()["environment"] == "pinned@1"
        r = client.patch(f"/runtimes/{reader}", json={"environment": "pinned"})
        assert r.status_code == 409 and "stopped" in r.json()["error"]["message"]
        client.post(f"/runtimes/{reader}/reset")
        time.sleep(0.3)
        server.wait_state(client, reader, {"running"})
        client.post(f"/runtimes/{reader}/stop")
        server.wait_state(client, reader, {"stopped"})
        r = client.patch(f"/runtimes/{reader}", json={"environment": "pinned"})
        assert r.status_code == 200 and r.json()["environment"] == "pinned@2"
        assert text(run(client, reader, "cat /root/v")) == "two\n"


def test_lineage_goes_three_levels_down_to_the_base_and_deleting_a_needed_version_is_refused(server: Server) -> None:
    with server.client() as client:
        env = "python3"
        for i, name in enumerate(("level-a", "level-b", "level-c")):
            rid = new_runtime(client, f"l{i}", environment=env, language="bash")
            run(client, rid, f"echo {name} > /root/{name}")
            save(client, rid, name, f"made {name}")
            client.delete(f"/runtimes/{rid}")
            env = name
        chain = client.get("/environments/level-c/lineage").json()
        assert [s["ref"] for s in chain] == ["level-c@1", "level-b@1", "level-a@1", "python3@1", "bash@1"]
        assert chain[0]["message"] == "made level-c" and chain[0]["author"] == "admin"
        assert all(s["size_added"] >= 0 for s in chain)
        r = client.delete("/environments/level-a@1")
        assert r.status_code == 409 and "level-b@1" in r.json()["error"]["message"]
        keeper = new_runtime(client, "keeper", environment="level-c")
        r = client.delete("/environments/level-c@1")
        assert r.status_code == 409 and keeper in r.json()["error"]["message"]
        client.delete(f"/runtimes/{keeper}")
        assert client.delete("/environments/level-c@1").status_code == 204
        assert client.get("/environments/level-c@1").status_code == 404
        assert client.delete("/environments/level-b").status_code == 422  # name one version


def test_idle_shutdown_waits_for_a_save_in_progress(server: Server) -> None:
    """R20: no idle shutdown while a save runs, even one that outlasts the idle timeout."""
    with server.client() as client:
        rid = new_runtime(client, "slowsave", language="bash", idle_timeout=60)
        run(client, rid, "head -c 150000000 /dev/urandom > /root/big.bin")
        r = client.post(f"/runtimes/{rid}/save", json={"environment": "big"})
        assert r.status_code == 202, r.text
        op = r.json()
        # now a timeout that the save outlasts (set after the save began: a loaded machine may
        # take longer than a second between the cell's end and the save's start)
        assert client.patch(f"/runtimes/{rid}", json={"idle_timeout": 1}).status_code == 200
        saw_saving = False
        while op["status"] == "running":
            rt = client.get(f"/runtimes/{rid}").json()
            if rt["saving"]:
                saw_saving = True
                assert rt["state"] == "running" and rt["idle_shutdown_at"] is None
            op = client.get(f"/operations/{op['id']}").json()
            time.sleep(0.1)
        assert op["status"] == "succeeded" and saw_saving


def test_a_long_chain_of_saves_is_compacted_keeps_its_lineage_and_boots(docker: Any, tmp_path: Path) -> None:
    """Past the compaction threshold (here 4 layers over the base's, by the setting; 100 by
    default, below overlay2's 128-layer limit): the lineage stays complete, the image does not
    grow a layer per save forever, and every save's file is there."""
    base = docker.api.inspect_image(base_image(docker, "python3"))["RootFS"]["Layers"]
    limit = len(base) + 4
    depth = 10
    srv = start_server(docker, tmp_path / "data", ENVCTL_SAVE_COMPACT_AT_LAYERS=str(limit))
    try:
        with srv.client() as client:
            env = "python3"
            for i in range(1, depth + 1):
                rid = new_runtime(client, f"chain{i}", environment=env, language="bash")
                assert run(client, rid, f"echo {i} >> /root/chain")["status"] == "ok"
                save(client, rid, "chain", f"link {i}")
                assert client.delete(f"/runtimes/{rid}").status_code == 204
                env = "chain"
            lineage = client.get(f"/environments/chain@{depth}/lineage").json()
            assert len(lineage) == depth + 2  # every save, then python3@1 and bash@1
            assert lineage[0]["message"] == f"link {depth}" and lineage[depth - 1]["message"] == "link 1"
            layers = [
                len(docker.api.inspect_image(v["image_id"])["RootFS"]["Layers"])
                for v in client.get("/environments/chain").json()["versions"]
            ]
            assert max(layers) <= limit and layers[-1] < len(base) + depth, layers  # compacted, at least once
            last = new_runtime(client, "last", environment=f"chain@{depth}", language="bash")
            ex = run(client, last, "wc -l < /root/chain; tail -1 /root/chain")
            assert text(ex) == f"{depth}\n{depth}\n"
    finally:
        remove_runner_containers(docker, srv)


SPEC = """\
name: acme/tools
extends: python3
message: team tools
steps:
  - run: |
      mkdir -p /opt/acme && echo built > /opt/acme/stamp
      echo step-one-output
  - env: {ACME_MODE: fast}
  - files:
      /opt/acme/README: made by a spec
"""


def _build(client: httpx.Client, text_: str, source: str = "acme.yaml") -> dict[str, Any]:
    r = client.post("/environments/build", json={"spec": text_, "source": source})
    assert r.status_code == 202, r.text
    op = r.json()
    while op["status"] == "running":
        op = client.get(f"/operations/{op['id']}", params={"wait": 10}).json()
    return op


def test_a_spec_builds_a_version_and_the_same_spec_on_the_same_parent_is_reused(server: Server, docker: Any) -> None:
    with server.client() as client:
        op = _build(client, SPEC)
        assert op["status"] == "succeeded", op
        assert op["result"]["version"] == "acme/tools@1" and op["result"]["cached"] is False
        assert [s["status"] for s in op["result"]["steps"]] == ["ok", "ok", "ok"]
        assert "step-one-output" in op["result"]["steps"][0]["log"]
        env = client.get("/environments/acme/tools").json()
        assert env["versions"][0]["parent"] == "python3@1" and env["versions"][0]["message"] == "team tools"
        image = docker.api.inspect_image(env["versions"][0]["image_id"])
        assert "ACME_MODE=fast" in image["Config"]["Env"]
        rid = new_runtime(client, "spec-user", environment="acme/tools", language="bash")
        assert text(run(client, rid, "cat /opt/acme/stamp /opt/acme/README; echo; echo $ACME_MODE")) == (
            "built\nmade by a spec\nfast\n"
        )
        again = _build(client, SPEC)
        assert again["status"] == "succeeded" and again["result"] == {
            "spec_digest": op["result"]["spec_digest"],
            "version": "acme/tools@1",
            "cached": True,
            "steps": [],
        }
        assert len(client.get("/environments/acme/tools").json()["versions"]) == 1
        assert [r["name"] for r in client.get("/runtimes").json()] == ["spec-user"]  # build runtimes are gone


def test_a_failing_step_fails_the_build_naming_file_line_and_step(server: Server) -> None:
    with server.client() as client:
        bad = SPEC.replace("echo step-one-output", "false").replace("name: acme/tools", "name: acme/broken")
        op = _build(client, bad)
        assert op["status"] == "failed"
        assert op["error"]["message"].startswith("acme.yaml:5: steps[1].run: the step failed")
        assert client.get("/environments/acme/broken").status_code == 404  # nothing of a failed build is kept
        r = client.post("/environments/build", json={"spec": "name: x\nextends: nope\nsteps: [{run: ls}]\n"})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        r = client.post("/environments/build", json={"spec": "name: x\nsteps: []\n", "source": "f.yaml"})
        assert r.status_code == 422 and r.json()["error"]["message"] == "f.yaml: extends: missing"


def test_a_commit_takes_the_trusted_template_and_refuses_config_the_container_would_add(docker: Any) -> None:
    """R10: whatever the container's own entrypoint, user, workdir or environment, the image
    config is the template's: a draft (``backend.commit``) never commits the container itself,
    and where the engine's commit of a container would merge the container's in, nothing is
    saved."""
    image = base_image(docker, "bash")
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})  # its helpers' labels too
    parent = docker.api.inspect_image(image)["Config"]
    template = {key: parent.get(key) for key in CONFIG_KEYS}
    template["Labels"] = {TEST_LABEL: TEST_SESSION, "envctl.environment": "r10"}
    labels = {TEST_LABEL: TEST_SESSION}
    made: list[Any] = []
    try:
        # Own command and working directory: the template sets both, so the image has its.
        plain = docker.containers.create(image, ["sleep", "600"], working_dir="/tmp", labels=labels)
        made.append(plain)
        plain.start()
        image_id = backend.commit({"container_id": plain.id}, config=template, repository="envctl-test/r10", tag="ok")
        config = docker.api.inspect_image(image_id)["Config"]
        assert {key: config.get(key) or None for key in CONFIG_KEYS} == {
            key: template[key] or None for key in CONFIG_KEYS
        }
        assert config["Cmd"] == ["/bin/bash"] and config["WorkingDir"] == "/root"
        docker.api.remove_image(image_id)

        # Own entrypoint, user and a secret in its environment: a draft of it is the template
        # exactly, nothing of the container's in its configuration (nor in what the engine
        # records of the container the image was committed from).
        hostile = docker.containers.create(
            image,
            ["600"],
            entrypoint=["/bin/sleep"],
            user="nobody",
            working_dir="/tmp",
            environment={"API_TOKEN": SECRET},
            labels=labels,
        )
        made.append(hostile)
        hostile.start()
        assert hostile.exec_run(["sh", "-c", "echo kept > /tmp/kept.txt"]).exit_code == 0
        image_id = backend.commit({"container_id": hostile.id}, config=template, repository="envctl-test/r10", tag="d")
        attrs = docker.api.inspect_image(image_id)
        assert {key: attrs["Config"].get(key) or None for key in CONFIG_KEYS} == {
            key: template[key] or None for key in CONFIG_KEYS
        }
        assert SECRET not in json.dumps(attrs) and "nobody" not in json.dumps(attrs)
        out = docker.containers.run(image_id, ["cat", "/tmp/kept.txt"], remove=True, labels=labels)
        assert out == b"kept\n"
        docker.api.remove_image(image_id)

        # The engine's own commit of that container merges its configuration in: refused, and
        # no image is left.
        with pytest.raises(BackendError, match="differs from the trusted template") as refused:
            engine.commit(docker, hostile.id, config=template, repository="envctl-test/r10", tag="no")
        assert {"Env", "Entrypoint", "User"} <= set(refused.value.details["fields"])
        assert docker.images.list(name="envctl-test/r10") == []
    finally:
        backend.helpers.close()
        for container in made:
            container.remove(force=True)


def _user_client(server: Server, name: str) -> httpx.Client:
    """A client of ``server`` for a new ordinary user ``name``."""
    from envs.kit.db import Database
    from registry.users import create_user, issue_token

    db = Database(f"sqlite:///{server.data_dir / 'envctl.db'}")
    with db.session() as s:
        token = issue_token(s, create_user(s, name), "tests")
    db.dispose()
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_a_save_into_another_users_environment_is_refused_before_any_image_is_made(server: Server, docker: Any) -> None:
    """Alice's environment stays hers: Bob's save into it is 403 and commits nothing; his save
    of her version under his own name works and is his."""
    with _user_client(server, "alice") as alice, _user_client(server, "bob") as bob:
        mine = new_runtime(alice, "workbench", language="bash")
        run(alice, mine, "echo alice > /root/owner")
        save(alice, mine, "mine", "alice's")
        theirs = new_runtime(bob, "borrowed", environment="mine", language="bash")
        assert text(run(bob, theirs, "cat /root/owner")) == "alice\n"  # booting from it is open
        run(bob, theirs, "echo bob > /root/owner")
        images = {i.id for i in docker.images.list(filters={"label": f"{TEST_LABEL}={TEST_SESSION}"})}

        r = bob.post(f"/runtimes/{theirs}/save", json={"environment": "mine"})

        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden" and "'mine'" in r.json()["error"]["message"]
        assert {i.id for i in docker.images.list(filters={"label": f"{TEST_LABEL}={TEST_SESSION}"})} == images
        assert alice.get("/environments/mine").json()["latest"] == "mine@1"
        assert bob.delete("/environments/mine@1").status_code == 403
        assert save(bob, theirs, "bobs")["result"]["version"] == "bobs@1"
        assert bob.get("/environments/bobs").json()["owner"] == "bob"
        assert [s["ref"] for s in bob.get("/environments/bobs/lineage").json()][:2] == ["bobs@1", "mine@1"]


def test_a_second_save_sends_only_what_changed_since_the_first_and_the_version_is_whole(
    server: Server, docker: Any
) -> None:
    """After a save the container keeps its layer; the next save's layer goes on the saved
    version's and holds only what changed since (added, changed, and deleted: a file only the
    first save had, and one of the base image)."""
    sums = "sha256sum /root/big.bin /root/small.bin; cat /root/note; ls /root/gone.txt /etc/debian_version 2>&1"
    with server.client() as client:
        rid = new_runtime(client, "twice", environment="bash", language="bash")
        first = "head -c 5000000 /dev/urandom > /root/big.bin && echo one > /root/note && echo x > /root/gone.txt"
        assert run(client, rid, first)["status"] == "ok"
        save(client, rid, "twice", "5 MB")
        second = "head -c 10000 /dev/urandom > /root/small.bin && echo two >> /root/note && rm /root/gone.txt"
        assert run(client, rid, f"{second} && rm /etc/debian_version")["status"] == "ok"
        save(client, rid, "twice", "10 KB more")
        versions = {v["ref"]: v for v in client.get("/environments/twice").json()["versions"]}
        v1, v2 = versions["twice@1"], versions["twice@2"]
        assert v1["size_added"] > 5_000_000 and v2["size_added"] < 1_000_000, (v1["size_added"], v2["size_added"])
        # the second image is the first one's layers and one small layer (the 5 MB are not in it again)
        layers = [docker.api.inspect_image(v["image_id"])["RootFS"]["Layers"] for v in (v1, v2)]
        assert layers[1][:-1] == layers[0], layers
        assert docker.api.history(v2["image_id"])[0]["Size"] < 1_000_000
        expected = text(run(client, rid, sums))
        reader = new_runtime(client, "reader", environment="twice@2", language="bash")
        seen = text(run(client, reader, sums))
        assert seen == expected and "one\ntwo\n" in seen and seen.count("No such file") == 2, seen


R38_VALUE = "r38-variable-value-5d1c"
R38_SECRET = "r38-team-secret-value-77ab"


def _carries_nothing_of_the_runtime(attrs: dict[str, Any], parent: dict[str, Any], forbidden: list[str]) -> None:
    """The image's configuration is its parent's (Env, Cmd, Entrypoint, User, WorkingDir; no
    volumes or ports), none of ``forbidden`` anywhere in what the engine says of it (its
    ``ContainerConfig`` included), and no label outside what a save or draft names."""
    config = attrs["Config"]
    for key in ("Env", "Cmd", "Entrypoint", "User", "WorkingDir"):
        assert (config.get(key) or None) == (parent.get(key) or None), key
    for key in ("Volumes", "ExposedPorts", "Healthcheck", "OnBuild"):
        assert not config.get(key), key
    blob = json.dumps(attrs)
    for value in forbidden:
        assert value not in blob, value
    for key, value in (config.get("Labels") or {}).items():
        # the engine keeps a key of the container's labels (with an empty value) only when the
        # template names it: envctl's own; a save's own labels and the operator's are the rest
        assert value == "" or not key.startswith("envctl.") or key in _SAVE_LABELS, (key, value)


_SAVE_LABELS = {
    "envctl.environment",
    "envctl.parent",
    "envctl.source-runtime",
    "envctl.author",
    "envctl.save",
    "envctl.draft-of",
    TEST_LABEL,
}


def test_a_runtime_with_variables_a_secret_a_mount_and_a_machine_type_saves_and_none_of_them_reaches_the_image(
    server: Server, docker: Any
) -> None:
    """R38 (issue 14 item 3): the save and the draft of a runtime that has all of them at once
    work; the images' configuration carries none of them; the saved version booted without
    them has the file written and none of the variables."""
    volume = f"r38-{TEST_SESSION}"
    with server.client() as client:
        assert client.post("/teams", json={"name": "r38"}).status_code in (201, 409)
        assert client.put("/teams/r38/secrets/db-pass", json={"value": R38_SECRET}).status_code in (200, 201, 204)
        rid = new_runtime(
            client,
            "r38",
            language="bash",
            machine_type="medium",
            env={"FOO": "bar", "R38_VAR": R38_VALUE, "DB_PASSWORD": {"secret": "db-pass"}},
            mounts=[{"type": "volume", "name": volume, "target": "/home/data"}],
        )
        started(server, client, rid)
        cid = docker.containers.list(filters={"label": f"envctl.runtime-id={rid}"})[0].id
        container = docker.api.inspect_container(cid)
        assert "R38_VAR=" + R38_VALUE in container["Config"]["Env"]  # it is in the runtime's container
        installation = container["Config"]["Labels"]["envctl.installation"]
        runner = container["Config"]["Labels"]["envctl.runner"]
        write = (
            'test "$FOO" = bar && test "$DB_PASSWORD" = ' + R38_SECRET + " && "
            "echo work > /root/work.txt && echo in-volume > /home/data/v.txt"
        )
        assert run(client, rid, write)["status"] == "ok"
        op = save(client, rid, "r38-env", "with everything")
        attrs = docker.api.inspect_image(op["result"]["image_id"])
        parent = docker.api.inspect_image(base_image(docker, "python3"))["Config"]
        forbidden = [R38_VALUE, "FOO=bar", R38_SECRET, volume, "/home/data", installation, runner, "medium"]
        _carries_nothing_of_the_runtime(attrs, parent, forbidden)
        assert attrs["Config"]["Labels"]["envctl.machine-type"] == ""

        # unsaved work, then a stop: the draft carries none of it either
        assert run(client, rid, "echo later > /root/later.txt")["status"] == "ok"
        client.post(f"/runtimes/{rid}/stop")
        assert server.wait_state(client, rid, {"stopped", "error"})["state"] == "stopped"
        [draft] = docker.images.list(filters={"label": f"envctl.draft-of={rid}"})
        _carries_nothing_of_the_runtime(docker.api.inspect_image(draft.id), parent, forbidden)
        started(server, client, rid)
        assert text(run(client, rid, "cat /root/later.txt; echo $FOO")) == "later\nbar\n"

        # the saved version, booted without any of it
        plain = new_runtime(client, "r38-plain", environment="r38-env@1", language="bash")
        check = (
            "cat /root/work.txt; echo ${FOO-unset} ${R38_VAR-unset} ${DB_PASSWORD-unset}; "
            "cat /home/data/v.txt 2>/dev/null || echo no-volume-file; "
            f"env | grep -c -e {R38_VALUE} -e {R38_SECRET} || true"
        )
        assert text(run(client, plain, check)) == "work\nunset unset unset\nno-volume-file\n0\n"
        for runtime in (rid, plain):
            assert client.delete(f"/runtimes/{runtime}").status_code == 204
    for v in docker.volumes.list(filters={"name": volume}):
        v.remove(force=True)
