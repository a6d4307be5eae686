"""GPU machine types and the host CUDA mount.

These machines have no GPU and no NVIDIA runtime: the container configuration a GPU type
produces is checked as Docker receives it (created, never started), and a boot of one fails at
once, saying why. Whether a real GPU then shows up in the container is not tested here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.backends.base import CUDA_MOUNT, LABEL_GPU_KIND, LABEL_INSTALLATION, LABEL_RUNNER, RuntimeSpec
from runner.backends.docker import DockerBackend
from runner.settings import MachineType
from tests.api.test_gpu_settings import cuda_root as cuda_root  # noqa: F401  (fixture)
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import base_image

GPU = MachineType("gpu-2", cpus=1.0, memory=256 * 1024**2, pids=64, gpus=2, gpu_kind="nvidia-tesla-t4")


def _spec(tmp_path: Path, image: str, cuda_dir: Path | None) -> RuntimeSpec:
    (tmp_path / "state" / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / "agent").mkdir(exist_ok=True)
    return RuntimeSpec(
        runtime_id="rt_gpuconfig" + TEST_SESSION[:8],
        name="gpu",
        image=image,
        environment="python3@1",
        machine=GPU,
        state_dir=tmp_path / "state",
        agent_dir=tmp_path / "agent",
        labels={LABEL_INSTALLATION: "in_test", LABEL_RUNNER: "gpu-test", TEST_LABEL: TEST_SESSION},
        cuda_dir=cuda_dir,
    )


@pytest.mark.docker
def test_a_gpu_machine_type_makes_a_container_asking_the_nvidia_driver_for_its_gpus_with_the_cuda_mount(
    docker: Any, tmp_path: Path, cuda_root: Path
) -> None:
    """Created through the engine and read back (never started: there is no GPU here)."""
    image = base_image(docker, "python3")
    spec = _spec(tmp_path, image, cuda_root / "cuda-12.2")
    options = DockerBackend(docker).container_options(spec)
    container = docker.containers.create(**options)
    try:
        host = docker.api.inspect_container(container.id)["HostConfig"]
        [request] = host["DeviceRequests"]
        assert request["Driver"] == "nvidia" and request["Count"] == 2
        assert request["Capabilities"] == [["gpu", "compute", "utility"]]
        cuda = [m for m in host["Mounts"] if m["Target"] == CUDA_MOUNT]
        assert cuda == [
            {"Type": "bind", "Source": str(cuda_root / "cuda-12.2"), "Target": CUDA_MOUNT, "ReadOnly": True}
        ]
        assert container.labels[LABEL_GPU_KIND] == "nvidia-tesla-t4"
        assert host["PidsLimit"] == 64 and host["Memory"] == 256 * 1024**2
    finally:
        container.remove(force=True)
    # without a CUDA version chosen, no host path but envctl's own
    plain = DockerBackend(docker).container_options(_spec(tmp_path, image, None))
    assert [m["Target"] for m in plain["mounts"]] == ["/opt/envctl/agent", "/run/envctl", "/results"]


@pytest.mark.docker
def test_a_save_and_a_draft_of_a_gpu_runtime_carry_nothing_of_its_gpus_or_cuda_mount(
    docker: Any, tmp_path: Path, cuda_root: Path
) -> None:
    """R38 for what a GPU machine type adds (created, never started: there is no GPU here):
    the device request, the CUDA mount and the GPU kind reach neither a saved image nor a draft."""
    import io
    import json
    import tarfile

    from runner.saves.imageconfig import trusted_config
    from runner.saves.scans import SaveFilter

    image = base_image(docker, "python3")
    backend = DockerBackend(docker, labels={TEST_LABEL: TEST_SESSION})  # its helpers' labels too
    spec = _spec(tmp_path, image, cuda_root / "cuda-12.2")
    container = docker.containers.create(**backend.container_options(spec))
    made: list[str] = []
    try:
        payload = io.BytesIO()
        with tarfile.open(fileobj=payload, mode="w") as tar:
            info = tarfile.TarInfo("root/gpu-work.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"work\n"))
        assert container.put_archive("/", payload.getvalue())
        state = {"container_id": container.id}
        config = trusted_config(backend, image, "python3@1", {TEST_LABEL: TEST_SESSION})
        saved = backend.save_layer(
            state, config=config, repository="envctl-test/gpu", tag="s", version_image=image, observer=SaveFilter(None)
        )
        made.append(saved.image.id)
        made.append(backend.commit(state, config=config, repository="envctl-test/gpu", tag="d"))
        for image_id in made:
            attrs = docker.api.inspect_image(image_id)
            blob = json.dumps(attrs)
            for value in ("nvidia", "tesla", "cuda", str(cuda_root), "gpu-2", "DeviceRequests"):
                assert value not in blob.lower(), (value, image_id)
            assert not attrs["Config"]["Labels"].get(LABEL_GPU_KIND)
            out = docker.containers.run(
                image_id, ["cat", "/root/gpu-work.txt"], remove=True, labels={TEST_LABEL: TEST_SESSION}
            )
            assert out == b"work\n"
    finally:
        backend.helpers.close()
        container.remove(force=True)
        for image_id in made:
            docker.api.remove_image(image_id, force=True)
