"""GET /environments/{ref}/kernelspecs on the fake backend: references, errors, the answer's shape.

The fake engine's images have the kernelspecs a test gives them; the Docker backend's reading
of real kernel.json files is tested in tests/runner/cells/test_docker_notebooks.py.
"""

from __future__ import annotations

import pytest

from envs.kit.errors import BackendError
from envs.service import NewVersion, register_version
from runner.backends.fake import FakeBackend
from tests.api.conftest import BASH_IMAGE, PYTHON_IMAGE, ApiHarness

PYTHON3 = {
    "name": "python3",
    "display_name": "Python 3 (ipykernel)",
    "language": "python",
    "path": "/usr/share/jupyter/kernels/python3",
}


@pytest.mark.parametrize("ref", ["python3", "python3@1", "python3:latest", "python3@sha256:" + "b" * 64])
def test_an_environment_lists_the_kernelspecs_of_the_version_a_reference_means(api: ApiHarness, ref: str) -> None:
    FakeBackend.set_kernelspecs(PYTHON_IMAGE, [PYTHON3])
    resp = api.get(f"/environments/{ref}/kernelspecs")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ref": "python3@1", "kernelspecs": [PYTHON3]}


def test_an_environment_without_kernelspecs_lists_none(api: ApiHarness) -> None:
    FakeBackend.set_kernelspecs(PYTHON_IMAGE, [PYTHON3])
    resp = api.get("/environments/bash/kernelspecs")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ref": "bash@1", "kernelspecs": []}


def test_a_team_environment_is_one_reference_despite_its_slash(api: ApiHarness) -> None:
    image = "sha256:" + "c" * 64
    with api.db.session() as s:
        register_version(s, NewVersion(environment="acme/kernels", image_id=image, image_ref="acme/kernels:1"))
    FakeBackend.set_kernelspecs(image, [{**PYTHON3, "name": "ir", "language": "R", "display_name": "R"}])
    resp = api.get("/environments/acme/kernels@1/kernelspecs")
    assert resp.status_code == 200, resp.text
    assert resp.json()["ref"] == "acme/kernels@1"
    assert [k["name"] for k in resp.json()["kernelspecs"]] == ["ir"]


@pytest.mark.parametrize(
    ("ref", "code"),
    [
        ("nosuch", "environment_not_found"),
        ("python3@7", "version_not_found"),
        ("python3:nosuchtag", "version_not_found"),
        ("python3@sha256:" + "f" * 64, "version_not_found"),
    ],
)
def test_an_unknown_environment_or_version_is_a_404_naming_it(api: ApiHarness, ref: str, code: str) -> None:
    resp = api.get(f"/environments/{ref}/kernelspecs")
    assert resp.status_code == 404, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["details"]["field"] == "ref"


@pytest.mark.parametrize("ref", ["python3@x", "python3@sha256:abc", "Bad Name!", "python3@0"])
def test_a_bad_reference_is_a_422_naming_it(api: ApiHarness, ref: str) -> None:
    resp = api.get(f"/environments/{ref}/kernelspecs")
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_input" and err["details"]["field"] == "ref"
    assert err["message"].startswith("ref: ")


def test_a_version_whose_image_is_gone_from_the_engine_is_a_409_saying_so(api: ApiHarness) -> None:
    backend = api.runner.backend
    gone = backend.squash(BASH_IMAGE, config={}, repository="envctl-test/gone", tag="1")
    backend.remove_image(gone)
    with api.db.session() as s:
        register_version(s, NewVersion(environment="gone", image_id=gone, image_ref="envctl-test/gone:1"))
    resp = api.get("/environments/gone/kernelspecs")
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert "gone@1" in err["message"] and "not in the container engine" in err["message"]
    assert err["details"]["image"] == gone
    with pytest.raises(BackendError):  # the backend itself, asked directly
        backend.kernelspecs(gone)


def test_kernelspecs_need_a_token(api: ApiHarness) -> None:
    assert api.client.get("/environments/python3/kernelspecs").status_code == 401
