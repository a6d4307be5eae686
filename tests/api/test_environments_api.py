"""Environments and machine types, as the API shows them."""

from __future__ import annotations

import pytest

from tests.api.conftest import BASH_IMAGE, PYTHON_IMAGE, ApiHarness


def _assert_envelope(body: dict[str, object], code: str | None = None) -> dict[str, object]:
    assert set(body) == {"error"}
    err = body["error"]
    assert isinstance(err, dict)
    assert set(err) == {"code", "message", "details"}
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    if code is not None:
        assert err["code"] == code
    return err


def test_list_environments(api: ApiHarness) -> None:
    resp = api.get("/environments")
    assert resp.status_code == 200, resp.text
    envs = {e["name"]: e for e in resp.json()}
    assert set(envs) == {"bash", "python3"}

    bash, python3 = envs["bash"], envs["python3"]
    assert bash["team"] is None
    assert bash["latest"] == "bash@1"
    assert bash["tags"] == {"latest": "bash@1"}
    [bash1] = bash["versions"]
    assert bash1["ref"] == "bash@1"
    assert bash1["number"] == 1
    assert bash1["parent"] is None
    assert bash1["image_id"] == BASH_IMAGE
    assert bash1["digest"] == BASH_IMAGE
    assert bash1["tags"] == ["latest"]

    assert python3["latest"] == "python3@1"
    assert python3["tags"] == {"latest": "python3@1"}
    [py1] = python3["versions"]
    assert py1["ref"] == "python3@1"
    assert py1["parent"] == "bash@1"
    assert py1["image_id"] == PYTHON_IMAGE
    assert py1["message"] == "base image python3"
    assert py1["author"] == "tests"
    assert py1["size"] == 150_000_000
    assert py1["size_added"] == 50_000_000
    assert py1["tags"] == ["latest"]
    assert py1["created_at"]


@pytest.mark.parametrize("ref", ["python3", "python3@1", "python3:latest", "python3@sha256:" + "b" * 64])
def test_get_environment(api: ApiHarness, ref: str) -> None:
    resp = api.get(f"/environments/{ref}")
    assert resp.status_code == 200, resp.text
    env = resp.json()
    assert env["name"] == "python3"
    assert env["latest"] == "python3@1"
    assert [v["ref"] for v in env["versions"]] == ["python3@1"]


def test_missing_version_is_404(api: ApiHarness) -> None:
    resp = api.get("/environments/python3@9")
    assert resp.status_code == 404
    err = _assert_envelope(resp.json(), "version_not_found")
    assert "python3@9" in str(err["message"])
    assert err["details"] == {"field": "ref", "reference": "python3@9"}


def test_missing_digest_is_404(api: ApiHarness) -> None:
    resp = api.get("/environments/python3@sha256:" + "0" * 64)
    assert resp.status_code == 404
    _assert_envelope(resp.json(), "version_not_found")


def test_missing_environment_is_404(api: ApiHarness) -> None:
    resp = api.get("/environments/nope")
    assert resp.status_code == 404
    err = _assert_envelope(resp.json(), "environment_not_found")
    assert "nope" in str(err["message"])


@pytest.mark.parametrize("ref", ["Python3", "python3@0", "python3@sha256:abc", "a" * 65, "x;y"])
def test_bad_environment_reference_is_422(api: ApiHarness, ref: str) -> None:
    """R30."""
    resp = api.get(f"/environments/{ref}")
    assert resp.status_code == 422, resp.text
    err = _assert_envelope(resp.json(), "invalid_input")
    assert err["details"]["field"] == "ref"  # type: ignore[index]


def test_environments_need_a_token(api: ApiHarness) -> None:
    assert api.client.get("/environments").status_code == 401
    assert api.client.get("/environments/python3").status_code == 401


def test_machine_types(api: ApiHarness) -> None:
    resp = api.get("/machine-types")
    assert resp.status_code == 200, resp.text
    types = {m["name"]: m for m in resp.json()}
    assert set(types) == {"small", "medium", "large", "gpu-small"}
    assert types["gpu-small"]["gpus"] == 1
    for name in ("small", "medium", "large"):
        assert types[name]["gpus"] == 0
    assert types["small"]["cpus"] == 1.0
    assert types["small"]["memory"] == 2 * 1024**3
    assert types["small"]["pids"] == 512
    for m in types.values():
        assert m["description"]
        assert "idle_timeout" in m
    assert api.client.get("/machine-types").status_code == 401


def test_an_export_the_backend_cannot_make_is_a_409_naming_the_backend(api: ApiHarness) -> None:
    """A backend without image export (the fake one here, Kubernetes in a cluster) answers with a
    clear refusal, not a 500 (the schemathesis walk found the 500)."""
    resp = api.get("/environments/bash/export")
    assert resp.status_code == 409, resp.text
    err = _assert_envelope(resp.json(), "not_supported")
    assert "cannot export images" in str(err["message"]) and err["details"] == {"backend": "fake"}
