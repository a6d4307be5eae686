"""Progress of a push or pull, read from the Docker engine's stream events (the shapes dockerd
sends): bytes are summed over the layers that travel; layers already there count for nothing;
an error event ends the transfer with the engine's reason."""

from __future__ import annotations

import pytest

from envs.kit.config import Settings
from registry.errors import TransferError
from registry.transfer import Progress, target_of
from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401

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
