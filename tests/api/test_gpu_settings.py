"""The host CUDA versions a GPU runtime may have mounted, and GPU kinds, through the API (fake
engine). tests/runner/backends/test_gpu_machine_types.py checks the container such a runtime gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import Settings
from runner.backends.base import CUDA_MOUNT
from runner.runtimes.machines import cuda_versions
from tests.api.conftest import ApiHarness, AppFactory


@pytest.fixture
def cuda_root(tmp_path: Path) -> Path:
    root = tmp_path / "local"
    for name in ("cuda-12.2", "cuda-11.8", "cuda-9", "cuda-notes", "bin"):
        (root / name).mkdir(parents=True)
    (root / "cuda-12").symlink_to(root / "cuda-12.2")
    (root / "cuda-7.5").write_text("a file, not an installation")
    return root


def test_the_cuda_versions_are_the_real_cuda_folders_of_the_cuda_root(cuda_root: Path) -> None:
    settings = Settings(runner_cuda_root=cuda_root)
    assert cuda_versions(settings) == ["9", "11.8", "12.2"]
    assert cuda_versions(Settings(runner_cuda_root=cuda_root / "missing")) == []


def test_the_api_lists_gpu_kinds_and_cuda_versions_and_refuses_a_cuda_version_the_host_lacks(
    make_api: AppFactory, cuda_root: Path
) -> None:
    api: ApiHarness = make_api(runner_cuda_root=cuda_root)
    kinds = {m["name"]: m["gpu_kind"] for m in api.get("/machine-types").json()}
    assert kinds["gpu-small"] == "nvidia" and kinds["small"] == ""
    listing = api.get("/machine-types/cuda").json()
    assert listing == {"root": str(cuda_root), "versions": ["9", "11.8", "12.2"], "mount": CUDA_MOUNT}

    rt = api.create_runtime("gpu", machine_type="gpu-small", cuda="11.8")
    assert rt["cuda"] == "11.8"
    resp = api.post("/runtimes", json={"environment": "python3", "name": "bad", "cuda": "12"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["details"] == {"field": "cuda", "available": ["9", "11.8", "12.2"]}
    assert "11.8" in err["message"]
    resp = api.patch(f"/runtimes/{rt['id']}", json={"cuda": "../../etc"})
    assert resp.status_code == 422 and api.get(f"/runtimes/{rt['id']}").json()["cuda"] == "11.8"
    assert api.patch(f"/runtimes/{rt['id']}", json={"cuda": None}).json()["cuda"] is None


def test_with_no_cuda_folder_on_the_host_the_api_lists_none_and_says_so(make_api: AppFactory, tmp_path: Path) -> None:
    api: ApiHarness = make_api(runner_cuda_root=tmp_path / "nothing")
    assert api.get("/machine-types/cuda").json()["versions"] == []
    resp = api.post("/runtimes", json={"environment": "python3", "name": "bad", "cuda": "12.2"})
    assert resp.status_code == 422 and "none (no cuda-<version> folder" in resp.json()["error"]["message"]
