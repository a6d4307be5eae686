"""GET /environments/{ref}/packages and /packages/diff: references and errors on the fake
backend (packages kept in a version's labels), and real reading on the base images in Docker."""

# The server fixtures are imported by name and requested as parameters of the same name.
# ruff: noqa: F401, F811
from __future__ import annotations

from typing import Any

import pytest

from api.settings import Settings
from envs.kit.db import Database
from envs.service import NewVersion, register_version, resolve
from runner.backends.docker import DockerBackend
from tests.api.conftest import ApiHarness, AppFactory
from tests.api.test_cli import Server, _isolated_client_config, run, server
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import base_image

KEPT_OLD = {"deb": [{"name": "bash", "version": "5.2"}, {"name": "nano", "version": "7.2"}], "python": []}
KEPT_NEW = {
    "deb": [{"name": "bash", "version": "5.3"}, {"name": "vim", "version": "9.0"}],
    "python": [{"name": "ipykernel", "version": "6.17.0"}],
}


def _register(api: ApiHarness, name: str, image: str, labels: dict[str, Any] | None = None) -> None:
    with api.db.session() as s:
        register_version(s, NewVersion(environment=name, image_id=image, image_ref=f"{name}:1", labels=labels))


@pytest.fixture
def kept(api: ApiHarness) -> ApiHarness:
    """``old@1`` and ``new@1`` with their packages already known (kept in their labels)."""
    _register(api, "old", "sha256:" + "1" * 64, {"packages": KEPT_OLD})
    _register(api, "acme/new", "sha256:" + "2" * 64, {"packages": KEPT_NEW})
    return api


@pytest.mark.parametrize("ref", ["old", "old@1", "old:latest"])
def test_the_packages_kept_for_a_version_are_listed_for_any_reference_to_it(kept: ApiHarness, ref: str) -> None:
    resp = kept.get(f"/environments/{ref}/packages")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ref": "old@1", **KEPT_OLD}


def test_the_difference_between_two_versions_has_added_removed_and_changed_packages(kept: ApiHarness) -> None:
    resp = kept.get("/environments/acme/new@1/packages/diff", params={"against": "old@1"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "ref": "acme/new@1",
        "against": "old@1",
        "deb": {
            "added": [{"name": "vim", "version": "9.0"}],
            "removed": [{"name": "nano", "version": "7.2"}],
            "changed": [{"name": "bash", "old": "5.2", "new": "5.3"}],
        },
        "python": {"added": [{"name": "ipykernel", "version": "6.17.0"}], "removed": [], "changed": []},
    }


def test_packages_not_known_on_a_backend_that_cannot_look_inside_images_are_a_409(api: ApiHarness) -> None:
    resp = api.get("/environments/python3@1/packages")
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["details"] == {"field": "ref", "reference": "python3@1"}


@pytest.mark.parametrize(
    ("path", "params", "status", "field"),
    [
        ("/environments/nosuch/packages", {}, 404, "ref"),
        ("/environments/old@7/packages", {}, 404, "ref"),
        ("/environments/old@x/packages", {}, 422, "ref"),
        ("/environments/Bad Name!/packages", {}, 422, "ref"),
        ("/environments/old@1/packages/diff", {"against": "nosuch@1"}, 404, "against"),
        ("/environments/old@1/packages/diff", {"against": "old@0"}, 422, "against"),
        ("/environments/nosuch/packages/diff", {"against": "old@1"}, 404, "ref"),
    ],
)
def test_a_bad_or_unknown_reference_is_the_same_error_as_elsewhere_naming_its_field(
    kept: ApiHarness, path: str, params: dict[str, str], status: int, field: str
) -> None:
    resp = kept.get(path, params=params)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["details"]["field"] == field


def test_a_diff_without_a_version_to_compare_against_is_a_422(kept: ApiHarness) -> None:
    assert kept.get("/environments/old@1/packages/diff").status_code == 422


def test_packages_need_a_token(kept: ApiHarness) -> None:
    assert kept.client.get("/environments/old@1/packages").status_code == 401


@pytest.mark.docker
@pytest.mark.slow
def test_the_packages_of_base_images_are_read_from_docker_once_and_jupyter_adds_python_packages(
    docker: Any, make_api: AppFactory
) -> None:
    api = make_api(backend=DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION}))
    _register(api, "real-python3", base_image(docker, "python3"))
    _register(api, "real-jupyter", base_image(docker, "python3-jupyter"))

    resp = api.get("/environments/real-python3@1/packages")
    assert resp.status_code == 200, resp.text
    found = resp.json()
    assert "python3" in {p["name"] for p in found["deb"]}
    assert "pip" in {p["name"] for p in found["python"]}

    resp = api.get("/environments/real-jupyter@1/packages/diff", params={"against": "real-python3@1"})
    assert resp.status_code == 200, resp.text
    added = {p["name"].lower() for p in resp.json()["python"]["added"]}
    assert {"ipykernel", "jupyter-client"} <= {n.replace("_", "-") for n in added}
    assert "python3-ipykernel" in {p["name"] for p in resp.json()["deb"]["added"]}
    assert resp.json()["python"]["removed"] == []

    with api.db.session() as s:  # kept in the versions' labels: read once per version
        assert resolve(s, "real-jupyter@1").labels["packages"]["python"]
    helpers = docker.containers.list(all=True, filters={"label": ["envctl.managed=packages", TEST_LABEL]})
    assert helpers == []


def test_the_cli_lists_a_versions_packages_and_the_difference_between_two(
    prepared_settings: Settings, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(prepared_settings.effective_database_url)
    try:
        with db.session() as s:
            register_version(s, NewVersion("old", "sha256:" + "1" * 64, "old:1", labels={"packages": KEPT_OLD}))
            register_version(s, NewVersion("new", "sha256:" + "2" * 64, "new:1", labels={"packages": KEPT_NEW}))
    finally:
        db.dispose()
    code, out, err = run(capsys, "env", "packages", "old@1", *server.args())
    assert code == 0, err
    assert [line.split() for line in out.splitlines()[1:]] == [["deb", "bash", "5.2"], ["deb", "nano", "7.2"]]

    code, out, err = run(capsys, "env", "diff", "old", "new@1", *server.args())
    assert code == 0, err
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["old@1", "->", "new@1"]
    assert ["+", "deb", "vim", "9.0"] in lines and ["-", "deb", "nano", "7.2"] in lines
    assert ["~", "deb", "bash", "5.2", "->", "5.3"] in lines and ["+", "python", "ipykernel", "6.17.0"] in lines

    code, out, err = run(capsys, "env", "diff", "old@1", "nosuch@1", "--json", *server.args())
    assert code == 1 and "nosuch" in err
