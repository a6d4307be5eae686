"""Progress of a push or pull, read from the Docker engine's stream events (the shapes dockerd
sends): bytes are summed over the layers that travel; layers already there count for nothing;
an error event ends the transfer with the engine's reason."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import pytest

from api.settings import Settings
from envs import service as envs_service
from envs.models import EnvironmentVersion
from registry import users as registry_service
from registry.errors import TransferError
from registry.image_transfer import Progress, target_of
from runner.backends.docker import DockerBackend
from runner.transfers.pushpull import push_after_save, pushed_text
from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.services import _free_port

PUSH = [
    {"status": "The push refers to repository [127.0.0.1:5001/acme/ml]"},
    {"status": "Preparing", "progressDetail": {}, "id": "aaa"},
    {"status": "Preparing", "progressDetail": {}, "id": "bbb"},
    {"status": "Layer already exists", "progressDetail": {}, "id": "bbb"},
    {"status": "Pushing", "progressDetail": {"current": 512, "total": 2048}, "id": "aaa"},
    {"status": "Pushing", "progressDetail": {"current": 2048, "total": 2048}, "id": "aaa"},
    {"status": "Pushed", "progressDetail": {}, "id": "aaa"},
    {"status": "3: digest: sha256:" + "c" * 64 + " size: 735"},
    {"progressDetail": {}, "aux": {"Tag": "3", "Digest": "sha256:" + "c" * 64, "Size": 735}},
]

PULL = [
    {"status": "Pulling from acme/ml", "id": "sha256:" + "c" * 64},
    {"status": "Already exists", "progressDetail": {}, "id": "bbb"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "aaa"},
    {"status": "Downloading", "progressDetail": {"current": 100, "total": 1000}, "id": "aaa"},
    {"status": "Download complete", "progressDetail": {}, "id": "aaa"},
    {"status": "Extracting", "progressDetail": {"current": 5000, "total": 9000}, "id": "aaa"},
    {"status": "Pull complete", "progressDetail": {}, "id": "aaa"},
    {"status": "Digest: sha256:" + "c" * 64},
]


def test_a_push_counts_the_bytes_of_the_layers_that_travel_and_not_those_already_there() -> None:
    seen: list[tuple[int, int]] = []
    progress = Progress(lambda done, total: seen.append((done, total)), every=0)

    for event in PUSH:
        progress.feed(event)

    assert (progress.done, progress.total) == (2048, 2048)
    assert progress.skipped == {"bbb"}
    assert seen[0] == (0, 0) and (512, 2048) in seen and seen[-1] == (2048, 2048)


def test_a_pull_counts_downloaded_bytes_not_extracted_ones() -> None:
    progress = Progress(every=0)

    for event in PULL:
        progress.feed(event)

    assert (progress.done, progress.total) == (1000, 1000)
    assert progress.skipped == {"bbb"}


def test_an_error_event_ends_the_transfer_with_the_engines_reason() -> None:
    progress = Progress()
    progress.feed(PUSH[1])

    with pytest.raises(TransferError) as caught:
        progress.feed({"errorDetail": {"message": "denied: requested access to the resource is denied"}, "error": "x"})

    assert caught.value.code == "transfer_failed"
    assert "denied: requested access" in caught.value.message


def test_a_version_goes_to_the_repository_named_after_its_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    managed = Settings(data_dir=tmp_path, api_port=8700, registry="managed", registry_binary=tmp_path / "none")
    external = Settings(data_dir=tmp_path, registry="https://registry.example.org:5000/")

    assert target_of(Settings(data_dir=tmp_path, registry="off"), "acme/ml") is None
    assert target_of(managed, "acme/ml") is None  # no program: no registry
    target = target_of(external, "acme/ml")
    assert target is not None and target.name == "registry.example.org:5000/acme/ml"
    assert target.at("sha256:" + "d" * 64) == "registry.example.org:5000/acme/ml@sha256:" + "d" * 64


def test_push_and_pull_without_a_registry_are_refused_naming_the_setting(api: ApiHarness) -> None:  # noqa: F811
    for kind in ("push", "pull"):
        resp = api.post(f"/environments/bash@1/{kind}")

        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert error["code"] == "no_registry" and "ENVCTL_REGISTRY" in error["message"]
    assert api.post("/environments/nope@1/push").status_code == 404


def test_a_runtime_shows_its_transfer_bytes_and_a_restart_clears_a_transfer_that_died(api: ApiHarness) -> None:  # noqa: F811
    created = api.post("/runtimes", json={"environment": "bash", "name": "mover", "language": "bash"})
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    api.runner.records.set(rid, phase="downloading", progress={"done": 5, "total": 10})  # as a pull in flight

    shown = api.get(f"/runtimes/{rid}").json()
    assert (shown["phase"], shown["progress"]) == ("downloading", {"done": 5, "total": 10})

    api.runner.transfers.recover()  # what `open` does at the next start
    shown = api.get(f"/runtimes/{rid}").json()
    assert (shown["phase"], shown["progress"]) == (None, None)


@pytest.mark.docker
def test_a_push_that_fails_keeps_the_version_and_says_how_to_send_it_later(make_api: Any, docker: Any) -> None:  # noqa: F811
    """The registry does not answer (nothing listens on its port): the push fails with the
    engine's reason, the version and its image stay, and the save's message says what to do."""
    harness = make_api(backend=DockerBackend(docker), registry=f"http://127.0.0.1:{_free_port()}")
    tiny = io.BytesIO()
    with tarfile.open(fileobj=tiny, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    repository = f"envctl-test/push-fails-{TEST_SESSION}"
    docker.api.import_image_from_data(
        tiny.getvalue(), repository=repository, tag="1", changes=[f"LABEL {TEST_LABEL}={TEST_SESSION}"]
    )
    image_id = docker.images.get(f"{repository}:1").id
    try:
        with harness.runner.db.session() as s:
            admin = registry_service.get_user_by_name(s, "admin")
            assert admin is not None
            version, _ = envs_service.register_version(
                s, envs_service.NewVersion(environment="acme/failing", image_id=image_id, image_ref=f"{repository}:1")
            )
            admin_id, version_id, ref = admin.id, version.id, version.ref
        op = harness.runner.operations.create(admin_id, "save", "a save whose push fails")
        with harness.runner.db.session() as s:
            version = s.get(EnvironmentVersion, version_id)
            assert version is not None
            _ = version.environment.namespace
            pushed = push_after_save(
                harness.runner.transfers, harness.runner.operations, op.id, admin_id, "rt_x", version
            )

        assert pushed["pushed"] is False and pushed["push_error"]["code"] == "transfer_failed"  # type: ignore[index]
        assert "envctl push REF" in pushed_text(pushed) and "not pushed" in pushed_text(pushed)
        shown = harness.get(f"/environments/{ref}").json()["versions"][0]
        assert shown["ref"] == ref and shown["registry_digest"] is None
        assert docker.images.get(image_id).attrs["RepoTags"] == [f"{repository}:1"]  # kept, no registry name left
    finally:
        docker.images.remove(image_id, force=True)
