"""The shared image layer: pure config template and check (plain dicts), engine operations (Docker).

The Docker tests import tiny one-file images (no base image needed) and commit containers that
are created but never started. Everything they make carries ``envctl.test-session`` and is
removed at the end; each test checks that nothing of its own is left.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from typing import Any

import docker.errors
import pytest
import requests.exceptions

from envs.images import config as cfg
from envs.images import docker as images
from envs.images.rewrite import replace_config
from envs.kit.errors import BackendError, InvalidInputError
from tests.conftest import TEST_LABEL, TEST_SESSION

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TEMPLATE: dict[str, Any] = {
    "Env": [PATH, "LANG=C.UTF-8"],
    "Cmd": ["/bin/bash"],
    "Entrypoint": None,
    "WorkingDir": "/root",
    "User": None,
    "Labels": {"envctl.environment": "demo", "team": "acme"},
}


# ------------------------------------------------------------------ the template (pure)


def test_a_child_keeps_its_parents_run_settings_and_labels_but_not_what_envctl_said_of_the_parent() -> None:
    parent = {
        **TEMPLATE,
        "Labels": {"envctl.base-image": "bash", "envctl.recipe-digest": "sha256:ab", "org.opencontainers.x": "y"},
    }
    child = cfg.child_config(parent, {"envctl.environment": "acme/ml", "envctl.base-image": "kept?"})
    assert {key: child[key] for key in cfg.CONFIG_KEYS} == {key: TEMPLATE[key] for key in cfg.CONFIG_KEYS}
    assert child["Labels"] == {
        "org.opencontainers.x": "y",  # a label outside envctl's namespace is inherited
        "envctl.recipe-digest": "",  # envctl's are emptied: they describe the parent
        "envctl.base-image": "kept?",  # the child's own labels go over both
        "envctl.environment": "acme/ml",
    }


def test_a_child_takes_none_of_its_parents_volumes_ports_triggers_health_check_or_shell() -> None:
    parent = {**TEMPLATE, "Volumes": {"/data": {}}, "ExposedPorts": {"80/tcp": {}}, "OnBuild": ["RUN x"]}
    parent |= {"Healthcheck": {"Test": ["CMD", "true"]}, "Shell": ["/bin/zsh", "-c"]}
    child = cfg.child_config(parent, {})
    assert set(child) == {*cfg.CONFIG_KEYS, "Labels"}


def test_making_a_child_config_changes_neither_input() -> None:
    parent = json.loads(json.dumps(TEMPLATE))
    labels = {"a": "b"}
    child = cfg.child_config(parent, labels)
    child["Env"].append("X=1")
    child["Labels"]["c"] = "d"
    assert parent == TEMPLATE and labels == {"a": "b"}


def test_labels_of_the_container_that_the_template_does_not_name_are_blanked() -> None:
    given = cfg.blank_other_labels(TEMPLATE, {"envctl.runtime-id": "rt_1", "team": "other", "x": "1"})
    assert given["Labels"] == {"envctl.runtime-id": "", "x": "", "envctl.environment": "demo", "team": "acme"}
    assert {k: v for k, v in given.items() if k != "Labels"} == {k: v for k, v in TEMPLATE.items() if k != "Labels"}
    assert TEMPLATE["Labels"] == {"envctl.environment": "demo", "team": "acme"}


# --------------------------------------------------------------------- the check (pure)


def test_a_config_equal_to_the_template_passes_empty_values_standing_for_absent_ones() -> None:
    actual = {**TEMPLATE, "Entrypoint": [], "User": "", "Volumes": None, "Hostname": "x", "StopSignal": "SIGTERM"}
    assert cfg.config_differences(actual, TEMPLATE) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"Env": [PATH, "LANG=C.UTF-8", "API_TOKEN=secret"]}, ["Env"]),
        ({"Env": ["LANG=C.UTF-8", PATH]}, ["Env"]),
        ({"Env": None}, ["Env"]),
        ({"Cmd": ["/bin/sh"]}, ["Cmd"]),
        ({"Entrypoint": ["/bin/sleep"]}, ["Entrypoint"]),
        ({"WorkingDir": "/tmp"}, ["WorkingDir"]),
        ({"User": "nobody"}, ["User"]),
        ({"Volumes": {"/data": {}}, "ExposedPorts": {"22/tcp": {}}}, ["Volumes", "ExposedPorts"]),
        (
            {"OnBuild": ["RUN x"], "Healthcheck": {"Test": ["NONE"]}, "Shell": ["/bin/zsh"]},
            ["OnBuild", "Healthcheck", "Shell"],
        ),
        ({"Labels": {"envctl.environment": "demo"}}, ["Labels[team]"]),
        ({"Labels": {**TEMPLATE["Labels"], "envctl.runtime-id": "rt_1"}}, ["Labels[envctl.runtime-id]"]),
        ({"Labels": {**TEMPLATE["Labels"], "envctl.runtime-id": ""}}, ["Labels[envctl.runtime-id]"]),
        ({"Labels": {**TEMPLATE["Labels"], "team": "other"}}, ["Labels[team]"]),
    ],
)
def test_every_field_that_differs_from_the_template_is_named(change: dict[str, Any], named: list[str]) -> None:
    assert cfg.config_differences({**TEMPLATE, **change}, TEMPLATE) == named


def test_what_an_image_records_of_its_container_is_found() -> None:
    assert cfg.recorded_container({"ContainerConfig": {"Labels": None, "Env": None, "Cmd": None}}) == {}
    assert cfg.recorded_container({}) == {}
    recorded = {"ContainerConfig": {"Labels": {"envctl.build": "1"}, "Env": [], "Cmd": ["sleep", "infinity"]}}
    assert cfg.recorded_container(recorded) == {"Labels": {"envctl.build": "1"}, "Cmd": ["sleep", "infinity"]}


def test_image_info_comes_from_an_inspect_answer() -> None:
    attrs = {"Id": "sha256:" + "a" * 64, "Size": 42, "RootFS": {"Layers": ["l1", "l2"]}, "Config": TEMPLATE}
    info = cfg.image_info(attrs)
    assert (info.id, info.size, info.layers) == (attrs["Id"], 42, 2)
    assert info.config["Labels"] == TEMPLATE["Labels"] and info.config["Volumes"] is None


# ---------------------------------------------------------- answers and errors (pure)


def test_the_image_an_import_made_is_the_last_id_the_engine_names() -> None:
    first, last = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    answer = f'{{"status":"{first}"}}\r\nnot json\n{{"status":"{last}"}}\r\n'
    assert images.imported_id(answer) == last
    assert images.imported_id(answer.encode()) == last
    assert images.imported_id([{"status": "Loading"}, {"status": first}]) == first


def test_an_import_answer_with_an_error_raises_it_in_the_engines_words() -> None:
    answer = b'{"status":"sha256:' + b"1" * 64 + b'"}\n{"errorDetail":{"message":"no space left on device"}}\n'
    with pytest.raises(BackendError, match="Docker failed to import x: no space left on device"):
        images.imported_id(answer, "import x")
    with pytest.raises(BackendError, match="did not say which image it made"):
        images.imported_id(b'{"status":"Importing"}\n', "import x")


def test_an_engine_that_does_not_answer_is_named_with_how_to_start_one() -> None:
    try:
        raise requests.exceptions.ConnectionError("connection refused")
    except requests.exceptions.ConnectionError as cause:
        try:
            raise docker.errors.DockerException("wrapped") from cause
        except docker.errors.DockerException as exc:
            error = images.daemon_error("list images", exc)
    assert isinstance(error, BackendError)
    assert "does not answer (list images)" in error.message and "scripts/ensure-docker" in error.message


def test_an_engine_error_keeps_the_engines_message() -> None:
    exc = docker.errors.APIError("500 Server Error", explanation="driver failed: disk full")
    error = images.daemon_error("commit the container", exc)
    assert error.message == "Docker failed to commit the container: driver failed: disk full"
    assert images.daemon_error("x", error) is error


# ------------------------------------------------------------------------ the engine


class Made:
    """Records what a test makes in Docker; removes it, and finds anything of it left."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.repository = f"envctl-test/images-{TEST_SESSION}-{uuid.uuid4().hex[:6]}"
        self.containers: list[str] = []

    def import_tiny(self, tag: str, files: dict[str, bytes] | None = None, changes: list[str] | None = None) -> str:
        return images.import_tar(
            self.client,
            tiny_tar(files or {"hello": b"hi"}),
            repository=self.repository,
            tag=tag,
            changes=[f"LABEL {TEST_LABEL}={TEST_SESSION}", *(changes or [])],
        )

    def container(self, image: str, **options: Any) -> str:
        labels = {TEST_LABEL: TEST_SESSION, **options.pop("labels", {})}
        cid = str(self.client.api.create_container(image, command=["/nothing"], labels=labels, **options)["Id"])
        self.containers.append(cid)
        return cid

    def left(self) -> list[str]:
        return [t for i in self.client.api.images(name=self.repository) for t in i.get("RepoTags") or []]

    def remove(self) -> None:
        for cid in self.containers:
            images.remove_container(self.client, cid, "remove a test container")
        for _ in range(5):  # children first: the engine keeps a parent while a child needs it
            found = [
                i["Id"] for r in (self.repository, self.repository + "-flat") for i in self.client.api.images(name=r)
            ]
            for image in found:
                images.remove_image(self.client, image, force=True)
            if not found:
                break


def tiny_tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def made(docker: Any) -> Iterator[Made]:
    record = Made(docker)
    yield record
    record.remove()
    assert record.left() == []


def template_for(made: Made, **overrides: Any) -> dict[str, Any]:
    """The imported tiny image's config with the test label, as a commit's template."""
    return {**TEMPLATE, "Labels": {TEST_LABEL: TEST_SESSION, **TEMPLATE["Labels"]}, **overrides}


@pytest.mark.docker
def test_the_id_an_import_returns_is_the_one_docker_inspect_reports(made: Made) -> None:
    image_id = made.import_tiny("one")
    assert image_id == made.client.api.inspect_image(f"{made.repository}:one")["Id"]
    info = images.info(made.client, image_id)
    assert info is not None and info.id == image_id and info.layers == 1
    assert info.config["Labels"] == {TEST_LABEL: TEST_SESSION}


@pytest.mark.docker
def test_an_import_of_something_not_a_tar_is_a_backend_error_in_the_engines_words(made: Made) -> None:
    with pytest.raises(BackendError) as err:
        images.import_tar(made.client, b"not a tar" * 200, repository=made.repository, tag="bad", action="import junk")
    assert err.value.message.startswith("Docker failed to import junk: ")
    assert "invalid tar header" in err.value.message
    assert isinstance(err.value.__cause__, docker.errors.APIError)
    assert made.left() == []


@pytest.mark.docker
@pytest.mark.parametrize(
    ("repository", "changes", "engine_says"),
    [
        (None, ["FOO bar"], "foo is not a valid change command"),
        ("envctl-test/Not-Lowercase", [], "repository name must be lowercase"),
    ],
)
def test_an_import_the_engine_refuses_as_bad_is_invalid_input_in_the_engines_words(
    made: Made, repository: str | None, changes: list[str], engine_says: str
) -> None:
    with pytest.raises(InvalidInputError) as err:
        images.import_tar(
            made.client, tiny_tar({"a": b"a"}), repository=repository or made.repository, tag="x", changes=changes
        )
    assert engine_says in err.value.message
    assert isinstance(err.value.__cause__, docker.errors.APIError)
    assert made.left() == []


@pytest.mark.docker
def test_a_commit_has_the_template_and_the_containers_own_labels_only_blank(made: Made) -> None:
    parent = made.import_tiny("parent")
    cid = made.container(parent, working_dir="/tmp", labels={"envctl.runtime-id": "rt_test"})
    template = template_for(made)
    info = images.commit(made.client, cid, config=template, repository=made.repository, tag="child", pause=False)
    config = made.client.api.inspect_image(f"{made.repository}:child")["Config"]
    assert info.id == made.client.api.inspect_image(f"{made.repository}:child")["Id"]
    assert config["Env"] == TEMPLATE["Env"] and config["Cmd"] == ["/bin/bash"] and config["WorkingDir"] == "/root"
    assert config["Labels"] == {**template["Labels"], "envctl.runtime-id": ""}
    assert info.layers == 2


@pytest.mark.docker
def test_a_commit_that_would_take_the_containers_entrypoint_user_workdir_or_variables_is_refused(made: Made) -> None:
    """R10: where ``docker commit`` merges the container's settings in, nothing is kept."""
    parent = made.import_tiny("parent")
    cid = made.container(
        parent, entrypoint=["/bin/sleep"], user="nobody", working_dir="/srv", environment={"API_TOKEN": "s3cr3t"}
    )
    # A template that sets none of them lets the engine fill each in from the container.
    template = template_for(made, Env=[], Cmd=None, WorkingDir=None)
    with pytest.raises(BackendError, match="differs from the trusted template") as err:
        images.commit(made.client, cid, config=template, repository=made.repository, tag="child", pause=False)
    assert {"Env", "Cmd", "Entrypoint", "WorkingDir", "User"} <= set(err.value.details["fields"])
    assert made.left() == [f"{made.repository}:parent"]


@pytest.mark.docker
@pytest.mark.parametrize(
    "field",
    [
        {"Env": [PATH, "EXTRA=1"]},
        {"Cmd": ["/bin/sh"]},
        {"Entrypoint": ["/bin/sleep"]},
        {"WorkingDir": "/srv"},
        {"User": "nobody"},
        {"Labels": {TEST_LABEL: TEST_SESSION, "unexpected": "1"}},
    ],
    ids=lambda field: next(iter(field)),
)
def test_an_image_whose_config_differs_from_the_template_is_refused_and_removed(
    made: Made, field: dict[str, Any]
) -> None:
    parent = made.import_tiny("parent")
    cid = made.container(parent)
    template = template_for(made)
    made.client.api.commit(cid, repository=made.repository, tag="odd", conf={**template, **field}, pause=False)
    odd = made.client.api.inspect_image(f"{made.repository}:odd")["Id"]
    with pytest.raises(BackendError, match="differs from the trusted template") as err:
        images.verify_config(made.client, odd, template, action="check a test image")
    assert len(err.value.details["fields"]) >= 1
    assert all(f.split("[")[0] in field for f in err.value.details["fields"])
    assert images.info(made.client, odd) is None


@pytest.mark.docker
def test_removing_an_image_twice_or_one_that_never_was_is_a_no_op(made: Made) -> None:
    image_id = made.import_tiny("gone")
    images.remove_image(made.client, image_id)
    images.remove_image(made.client, image_id)
    images.remove_image(made.client, f"{made.repository}:never")
    assert images.info(made.client, image_id) is None


@pytest.mark.docker
def test_an_image_still_needed_by_a_child_stays_when_removed(made: Made) -> None:
    parent = made.import_tiny("parent")
    cid = made.container(parent)
    images.commit(made.client, cid, config=template_for(made), repository=made.repository, tag="child", pause=False)
    made.client.api.remove_container(cid, force=True)
    images.remove_image(made.client, parent)
    assert images.info(made.client, parent) is not None
    assert images.info(made.client, f"{made.repository}:child") is not None


@pytest.mark.docker
def test_a_squash_is_one_layer_with_the_template_and_leaves_no_helpers(made: Made) -> None:
    parent = made.import_tiny("parent", {"a": b"a"})
    cid = made.container(parent)
    made.client.api.put_archive(cid, "/", tiny_tar({"b": b"b"}))
    template = template_for(made)
    two = images.commit(made.client, cid, config=template, repository=made.repository, tag="two", pause=False)
    assert two.layers == 2
    holder = {"envctl.managed": "squash", TEST_LABEL: TEST_SESSION}
    flat = images.squash(
        made.client, two.id, config=template, repository=made.repository, tag="flat", holder_labels=holder
    )
    assert flat.layers == 1
    assert flat.id == made.client.api.inspect_image(f"{made.repository}:flat")["Id"]
    assert (
        cfg.config_differences(flat.config, {**template, "Labels": {**template["Labels"], "envctl.managed": ""}}) == []
    )
    assert made.client.api.containers(all=True, filters={"label": "envctl.managed=squash"}) == []
    assert made.client.api.images(name=made.repository + "-flat") == []
    exported = b"".join(made.client.api.export(made.container(flat.id)))
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        assert {"a", "b"} <= set(tar.getnames())


@pytest.mark.docker
@pytest.mark.parametrize("with_changes", [True, False], ids=["a-new-layer", "no-new-layer"])
def test_a_rewritten_config_is_exactly_the_template_on_the_same_layers(made: Made, with_changes: bool) -> None:
    parent = made.import_tiny("parent")
    cid = made.container(parent, labels={"envctl.build": "1"})
    if with_changes:
        made.client.api.put_archive(cid, "/", tiny_tar({"built": b"by a step"}))
    template = template_for(made)
    committed = images.commit(made.client, cid, config=template, repository=made.repository, tag="c", pause=False)
    history = {"created_by": "a test", "comment": "sha256:recipe"}
    new_id = replace_config(
        made.client, committed.id, template, history=history, repository=made.repository, tag="clean", action="rewrite"
    )
    attrs = made.client.api.inspect_image(f"{made.repository}:clean")
    assert new_id == attrs["Id"] != committed.id
    assert cfg.config_differences(attrs["Config"], template) == []
    assert cfg.recorded_container(attrs) == {}
    assert attrs["RootFS"]["Layers"] == made.client.api.inspect_image(committed.id)["RootFS"]["Layers"]
    assert len(attrs["RootFS"]["Layers"]) == (2 if with_changes else 1)
    last = made.client.api.history(new_id)[0]
    assert last["CreatedBy"] == "a test" and last["Comment"] == "sha256:recipe"


@pytest.mark.docker
def test_an_archive_the_engine_refuses_is_a_backend_error_in_the_engines_words(made: Made, tmp_path: Any) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(tiny_tar({"manifest.json": b"not json"}))
    with pytest.raises(BackendError, match="Docker refused the images: .+"):
        images.load_archive(junk)


@pytest.mark.docker
def test_an_archive_saved_and_loaded_again_gives_the_same_image(made: Made, tmp_path: Any) -> None:
    image_id = made.import_tiny("kept")
    path = tmp_path / "kept.tar"
    images.save_archive([f"{made.repository}:kept"], path)
    images.remove_image(made.client, image_id)
    assert images.info(made.client, image_id) is None
    images.load_archive(path)
    assert images.info(made.client, f"{made.repository}:kept") == images.info(made.client, image_id) is not None
