"""Mounts as a runtime setting through the API on the fake engine: checked before anything is
stored or reaches the engine (R28, R29, 422 naming the field), and a change needs a reboot
(409 while running, or pending for the next boot)."""

from __future__ import annotations

from tests.api.conftest import ApiHarness, AppFactory
from tests.api.test_errors_and_auth import RecordingBackend

DATA = {"type": "volume", "name": "home-data", "target": "/home/data"}
RAW = {"type": "s3", "bucket": "raw-data", "prefix": "2024/", "target": "/data/raw"}

BAD = [
    ([{"type": "git", "url": "ext::sh -c id", "target": "/mnt/code"}], "mounts[0].url"),
    ([{"type": "git", "url": "file:///etc", "target": "/mnt/code"}], "mounts[0].url"),
    ([{"type": "git", "url": "--upload-pack=x", "target": "/mnt/code"}], "mounts[0].url"),
    ([{"type": "git", "url": "https://127.0.0.1/r.git", "target": "/mnt/code"}], "mounts[0].url"),
    ([{"type": "git", "url": "https://169.254.169.254/r.git", "target": "/mnt/code"}], "mounts[0].url"),
    ([{"type": "git", "url": "https://10.0.0.8/r.git", "target": "/mnt/code"}], "mounts[0].url"),
    ([DATA, {**RAW, "target": "/"}], "mounts[1].target"),
    ([DATA, {**RAW, "target": "/proc"}], "mounts[1].target"),
    ([DATA, {**RAW, "target": "../x"}], "mounts[1].target"),
    ([DATA, {**RAW, "target": "/data/\x00x"}], "mounts[1].target"),
    ([DATA, {**RAW, "target": "/home/data/raw"}], "mounts[1].target"),
    ([{**RAW, "bucket": "Bad_Bucket"}], "mounts[0].bucket"),
    ("not a list", "mounts"),
]


def test_unsafe_sources_and_targets_are_422_naming_the_field_and_nothing_reaches_the_engine(
    make_api: AppFactory,
) -> None:
    """R28 and R29, on create and on PATCH."""
    backend = RecordingBackend()
    api = make_api(backend)
    rt = api.create_runtime("good", mounts=[DATA])
    assert rt["mounts"] == [{**DATA, "read_only": False}]
    for mounts, field in BAD:
        resp = api.post("/runtimes", json={"environment": "python3", "name": "bad", "mounts": mounts})
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_input" and err["details"]["field"] == field, err
        assert err["message"].startswith(field + ":"), err
        resp = api.patch(f"/runtimes/{rt['id']}", json={"mounts": mounts})
        assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == field, resp.text
    assert api.runtime_rows() == 1
    assert api.get(f"/runtimes/{rt['id']}").json()["mounts"] == [{**DATA, "read_only": False}]
    assert backend.started == []


def test_changing_mounts_needs_a_reboot_409_while_running_or_pending_for_the_next_boot(api: ApiHarness) -> None:
    rt = api.create_runtime("m")
    rid = rt["id"]
    resp = api.patch(f"/runtimes/{rid}", json={"mounts": [DATA]})  # stopped: at once
    assert resp.status_code == 200 and resp.json()["mounts"] == [{**DATA, "read_only": False}]
    assert api.post(f"/runtimes/{rid}/start").status_code == 202
    api.wait_for(rid, {"running"})
    resp = api.patch(f"/runtimes/{rid}", json={"mounts": [DATA, RAW]})
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["details"]["needs_reboot"] == ["mounts"]
    resp = api.patch(f"/runtimes/{rid}", params={"apply": "next-boot"}, json={"mounts": [RAW]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["mounts"] == [{**DATA, "read_only": False}]
    assert body["pending"]["mounts"] == [{**RAW, "writeback": False}]
    assert api.post(f"/runtimes/{rid}/stop").status_code == 202
    api.wait_settled(rid)
    # the fake engine cannot fetch an S3 mount: the next boot applies the setting all the same
    api.post(f"/runtimes/{rid}/start")
    api.wait_settled(rid)
    after = api.get(f"/runtimes/{rid}").json()
    assert after["mounts"] == [{**RAW, "writeback": False}] and "mounts" not in after["pending"]
    log = [e["message"] for e in api.get(f"/runtimes/{rid}/log").json()]
    assert any("mounts -> s3://raw-data/2024/ at /data/raw" in m for m in log), log
