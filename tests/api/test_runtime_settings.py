"""Runtime settings through the API on the fake engine: environment variables (R9), the one
PATCH surface, and changes kept for the next boot. The fake runs the real agent as a local
process with the container's environment, so a cell sees what a container would."""

from __future__ import annotations

from typing import Any

import pytest

from runner.backends.base import Change, ImageInfo
from runner.backends.fake import FakeBackend
from tests.api.conftest import PYTHON_IMAGE, ApiHarness, AppFactory
from tests.api.test_errors_and_auth import RecordingBackend


def _cell(api: ApiHarness, rid: str, code: str) -> dict[str, Any]:
    ex: dict[str, Any] = api.post(f"/runtimes/{rid}/executions", params={"wait": 20}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    return ex


def _text(ex: dict[str, Any]) -> str:
    return "".join(o.get("text", "") for o in ex["outputs"] if o["output_type"] == "stream")


def _start(api: ApiHarness, rid: str) -> None:
    assert api.post(f"/runtimes/{rid}/start").status_code == 202
    api.wait_for(rid, {"running"})


def _stop(api: ApiHarness, rid: str) -> None:
    assert api.post(f"/runtimes/{rid}/stop").status_code == 202
    api.wait_settled(rid)


BAD = [
    ({"A=B": "1"}, "env.A=B"),
    ({"1X": "1"}, "env.1X"),
    ({"": "1"}, "env"),
    ({"MY-VAR": "1"}, "env.MY-VAR"),
    ({"LD_PRELOAD": "/tmp/x.so"}, "env.LD_PRELOAD"),
    ({"ld_library_path": "/tmp"}, "env.ld_library_path"),
    ({"ENVCTL_AGENT_SOCKET": "/tmp/s"}, "env.ENVCTL_AGENT_SOCKET"),
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, "env.NVIDIA_VISIBLE_DEVICES"),
    ({"NUL": "a\x00b"}, "env.NUL"),
    ({"BIG": "x" * (32 * 1024 + 1)}, "env.BIG"),
    ({"X" * 129: "1"}, "env." + "X" * 128),
]


def test_bad_or_reserved_variable_names_are_422_naming_the_field_and_nothing_reaches_the_engine(
    make_api: AppFactory,
) -> None:
    """R9, on create and on PATCH."""
    backend = RecordingBackend()
    api = make_api(backend)
    rt = api.create_runtime("good", env={"OK": "1"})
    for env, field in BAD:
        resp = api.post("/runtimes", json={"environment": "python3", "name": "bad", "env": env})
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_input" and err["details"]["field"] == field, err
        resp = api.patch(f"/runtimes/{rt['id']}", json={"env": env})
        assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == field, resp.text
    assert api.runtime_rows() == 1
    assert api.get(f"/runtimes/{rt['id']}").json()["env"] == {"OK": "1"}
    assert backend.started == []


def test_a_value_that_is_not_valid_unicode_text_is_422(api: ApiHarness) -> None:
    body = '{"environment": "python3", "name": "half", "env": {"HALF": "\\ud800"}}'  # a lone surrogate
    resp = api.post("/runtimes", content=body, headers={**api.headers, "Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == "env.HALF", resp.text


def test_too_many_variables_or_too_many_bytes_in_all_are_422(api: ApiHarness) -> None:
    many = {f"V{i}": "1" for i in range(201)}
    assert api.post("/runtimes", json={"environment": "python3", "name": "a", "env": many}).status_code == 422
    big = {f"V{i}": "x" * 30_000 for i in range(10)}
    resp = api.post("/runtimes", json={"environment": "python3", "name": "a", "env": big})
    assert resp.status_code == 422 and "more than" in resp.json()["error"]["message"]


def test_a_cell_sees_the_runtimes_variables_and_the_env_listing_marks_each_set_here_or_inherited(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = ImageInfo(PYTHON_IMAGE, 1, 1, {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "MODE=image"]})
    monkeypatch.setitem(FakeBackend._images, PYTHON_IMAGE, image)
    rt = api.create_runtime(env={"MODE": "runtime", "TOKENISH": "a b"})
    assert rt["env"] == {"MODE": "runtime", "TOKENISH": "a b"} and rt["pending"] == {}
    listing = api.get(f"/runtimes/{rt['id']}/env").json()
    assert listing["environment"] == "python3@1" and listing["pending"] is None
    by_name = {v["name"]: v for v in listing["variables"]}
    assert [v["name"] for v in listing["variables"]] == ["LANG", "MODE", "PATH", "TOKENISH"]
    assert by_name["MODE"] == {
        "name": "MODE",
        "value": "runtime",
        "source": "set here",
        "overrides": True,
        "image_value": "image",  # what "show inherited" shows beside it
    }
    assert by_name["LANG"] == {"name": "LANG", "value": "C.UTF-8", "source": "inherited", "overrides": False}
    assert by_name["TOKENISH"]["source"] == "set here" and not by_name["TOKENISH"]["overrides"]

    _start(api, rt["id"])
    ex = _cell(api, rt["id"], "import os\nprint(os.environ['MODE'], repr(os.environ['TOKENISH']))")
    assert _text(ex) == "runtime 'a b'\n"


def test_a_reboot_setting_changed_while_running_is_409_naming_it_or_pending_until_the_next_boot(
    api: ApiHarness,
) -> None:
    rt = api.create_runtime(env={"KEEP": "1", "DROP": "x"})
    rid = rt["id"]
    _start(api, rid)
    log_before = api.log(rid)

    change = {"env": {"NEW": "2", "DROP": None}, "machine_type": "medium", "idle_timeout": 99}
    resp = api.patch(f"/runtimes/{rid}", json=change)
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "runtime_state_conflict"
    assert err["details"]["needs_reboot"] == ["env", "machine_type"]
    assert "env, machine_type" in err["message"] and "next-boot" in err["message"]
    assert api.log(rid) == log_before
    assert api.get(f"/runtimes/{rid}").json()["idle_timeout"] is None  # nothing of a refused PATCH

    resp = api.patch(f"/runtimes/{rid}", params={"apply": "next-boot"}, json=change)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["state"] == "running" and out["idle_timeout"] == 99  # applied at once
    assert out["env"] == {"KEEP": "1", "DROP": "x"} and out["machine_type"] == "small"
    assert out["pending"] == {"env": {"KEEP": "1", "NEW": "2"}, "machine_type": "medium"}
    assert api.get(f"/runtimes/{rid}/env").json()["pending"] == {"KEEP": "1", "NEW": "2"}
    # a second change for the next boot builds on the first
    resp = api.patch(f"/runtimes/{rid}", json={"env": {"MORE": "3"}, "next_boot": True})
    assert resp.json()["pending"]["env"] == {"KEEP": "1", "NEW": "2", "MORE": "3"}
    ex = _cell(api, rid, "import os\nprint(sorted(k for k in os.environ if k in ('KEEP','DROP','NEW','MORE')))")
    assert _text(ex) == "['DROP', 'KEEP']\n"  # the running container is untouched

    _stop(api, rid)
    assert api.get(f"/runtimes/{rid}").json()["pending"] != {}  # a stop alone applies nothing
    _start(api, rid)
    now = api.get(f"/runtimes/{rid}").json()
    assert now["pending"] == {} and now["machine_type"] == "medium"
    assert now["env"] == {"KEEP": "1", "NEW": "2", "MORE": "3"}
    ex = _cell(api, rid, "import os\nprint(sorted(k for k in os.environ if k in ('KEEP','DROP','NEW','MORE')))")
    assert _text(ex) == "['KEEP', 'MORE', 'NEW']\n"
    applied = [e for e in api.log(rid) if e["event"] == "settings-applied"]
    assert len(applied) == 1 and "machine type -> medium" in applied[0]["message"]


def test_a_stopped_runtime_takes_every_setting_at_once(api: ApiHarness) -> None:
    rt = api.create_runtime()
    resp = api.patch(
        f"/runtimes/{rt['id']}",
        json={
            "name": "renamed",
            "type": "jupyter",
            "kernel": "python3",
            "environment": "bash",
            "env": {"A": "1"},
            "machine_type": "large",
            "idle_timeout": 60,
        },
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert (out["name"], out["type"], out["kernel"], out["environment"]) == ("renamed", "jupyter", "python3", "bash@1")
    assert (out["env"], out["machine_type"], out["idle_timeout"], out["pending"]) == ({"A": "1"}, "large", 60, {})
    resp = api.patch(f"/runtimes/{rt['id']}", json={"type": "native", "env": {"A": None}})
    assert resp.json()["type"] == "native" and resp.json()["kernel"] is None and resp.json()["env"] == {}
    assert api.patch(f"/runtimes/{rt['id']}", json={"kernel": "python3"}).status_code == 422


def test_a_pending_environment_waits_while_a_draft_exists_and_a_reset_applies_it(make_api: AppFactory) -> None:
    backend = FakeBackend()
    api = make_api(backend)
    rid = api.create_runtime()["id"]
    _start(api, rid)
    resp = api.patch(f"/runtimes/{rid}", params={"apply": "next-boot"}, json={"environment": "bash"})
    assert resp.status_code == 200 and resp.json()["pending"] == {"environment": "bash@1"}, resp.text
    backend.set_changes(rid, [Change("added", "/root/work.txt")])
    _stop(api, rid)  # the unsaved work becomes a draft on python3@1
    _start(api, rid)
    rt = api.get(f"/runtimes/{rid}").json()
    assert rt["environment"] == "python3@1" and rt["pending"] == {"environment": "bash@1"}
    assert any(e["event"] == "settings-pending" and "unsaved changes" in e["message"] for e in api.log(rid))
    assert api.post(f"/runtimes/{rid}/reset").status_code == 202  # the draft goes: the change applies
    api.wait_for(rid, {"running"})
    api.wait_settled(rid)
    rt = api.get(f"/runtimes/{rid}").json()
    assert rt["environment"] == "bash@1" and rt["pending"] == {}
