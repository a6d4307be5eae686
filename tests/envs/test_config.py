"""The settings machinery and the core settings every package shares (envs/kit/config.py):
ENVCTL_* variables and a YAML file read into a frozen dataclass, generic over its fields. The
runner's own settings are tested in tests/runner/test_settings.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from envs.kit.config import Settings, load_settings, parse_names, setting, settings_help
from envs.kit.errors import InvalidInputError


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "envctl.yaml"
    path.write_text(text)
    return path


def test_empty_variable_is_ignored() -> None:
    assert load_settings(Settings, env={"ENVCTL_API_PORT": ""}).api_port == 8700


def test_file_that_is_not_a_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="must be a YAML map"):
        load_settings(Settings, write_config(tmp_path, "- a\n- b\n"), env={})


def test_file_that_is_not_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_settings(Settings, write_config(tmp_path, "api: [unclosed\n"), env={})


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InvalidInputError, match="cannot read config file") as caught:
        load_settings(Settings, missing, env={})
    assert str(missing) in caught.value.message
    assert caught.value.field == "config"


def test_bad_number_in_the_file_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "api:\n  port: lots\n")
    with pytest.raises(InvalidInputError) as caught:
        load_settings(Settings, path, env={})
    assert str(path) in caught.value.message
    assert "api_port" in caught.value.message


def test_database_url_defaults_to_a_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(Settings, env={"ENVCTL_DATA_DIR": str(tmp_path)})
    assert settings.database_url is None
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'envctl.db'}"


def test_database_url_setting_wins_over_the_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://u@h/d")
    assert settings.effective_database_url == "postgresql://u@h/d"


def test_data_dir_expands_the_home_directory() -> None:
    assert load_settings(Settings, env={"ENVCTL_DATA_DIR": "~/envctl-data"}).data_dir == (Path.home() / "envctl-data")


def test_extra_ca_certs_default_to_debians_local_ca_folder() -> None:
    assert load_settings(Settings, env={}).base_extra_ca_certs == (Path("/usr/local/share/ca-certificates"),)


@pytest.mark.parametrize("separated", ["/a/proxy.crt:/b/cas", "/a/proxy.crt,/b/cas", " /a/proxy.crt , /b/cas: "])
def test_extra_ca_certs_variable_is_paths_separated_by_colons_or_commas(separated: str) -> None:
    settings = load_settings(Settings, env={"ENVCTL_BASE_EXTRA_CA_CERTS": separated})
    assert settings.base_extra_ca_certs == (Path("/a/proxy.crt"), Path("/b/cas"))


def test_extra_ca_certs_in_the_file_are_a_list_and_null_or_empty_means_none(tmp_path: Path) -> None:
    listed = write_config(tmp_path, "base:\n  extra_ca_certs: [/a/proxy.crt, ~/cas]\n")
    assert load_settings(Settings, listed, env={}).base_extra_ca_certs == (Path("/a/proxy.crt"), Path.home() / "cas")
    for text in ("base:\n  extra_ca_certs: []\n", "base:\n  extra_ca_certs:\n"):
        assert load_settings(Settings, write_config(tmp_path, text), env={}).base_extra_ca_certs == ()


def test_extra_ca_certs_that_are_a_map_are_refused_naming_the_setting(tmp_path: Path) -> None:
    path = write_config(tmp_path, "base:\n  extra_ca_certs: {a: b}\n")
    with pytest.raises(InvalidInputError, match="base_extra_ca_certs"):
        load_settings(Settings, path, env={})


@dataclass(frozen=True)
class _Extended(Settings):
    """A package's settings as the packages above envs write them: the core's plus its own."""

    registry_things: tuple[str, ...] = setting((), env="ENVCTL_REGISTRY_THINGS", parse=parse_names, help="things")
    registry_count: int = setting(3, env="ENVCTL_REGISTRY_COUNT", parse=int, help="how many")


def test_core_defaults_and_variables(tmp_path: Path) -> None:
    assert load_settings(Settings, env={}) == Settings()
    settings = load_settings(
        Settings,
        env={
            "ENVCTL_DATA_DIR": str(tmp_path / "data"),
            "ENVCTL_DATABASE_URL": "postgresql://u@db/envctl",
            "ENVCTL_API_HOST": "0.0.0.0",
            "ENVCTL_API_PORT": "9000",
            "ENVCTL_BASE_MIRROR": "http://mirror.example/debian",
        },
    )
    assert settings.data_dir == tmp_path / "data"
    assert settings.database_url == "postgresql://u@db/envctl"
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 9000)
    assert settings.base_mirror == "http://mirror.example/debian"


def test_a_subclass_is_loaded_from_its_own_fields_and_the_cores(tmp_path: Path) -> None:
    path = write_config(tmp_path, "api:\n  port: 9100\nregistry:\n  things: [A, b]\n")
    settings = load_settings(_Extended, path, env={"ENVCTL_REGISTRY_COUNT": "7"})
    assert isinstance(settings, _Extended)
    assert (settings.api_port, settings.registry_things, settings.registry_count) == (9100, ("a", "b"), 7)
    assert settings.with_overrides(registry_count=1).registry_count == 1
    with pytest.raises(InvalidInputError, match="ENVCTL_REGISTRY_COUNT") as caught:
        load_settings(_Extended, env={"ENVCTL_REGISTRY_COUNT": "many"})
    assert caught.value.field == "registry_count"


def test_the_core_alone_refuses_a_key_it_does_not_own_naming_its_own(tmp_path: Path) -> None:
    path = write_config(tmp_path, "runner:\n  idle_timeout: 5\n")
    with pytest.raises(InvalidInputError) as caught:
        load_settings(Settings, path, env={})
    assert "'runner_idle_timeout'" in caught.value.message
    for known in ("api_port", "base_extra_ca_certs", "data_dir", "database_url"):
        assert known in caught.value.message


def test_partial_reads_its_own_keys_and_leaves_the_others_to_the_packages_above(tmp_path: Path) -> None:
    path = write_config(tmp_path, "runner:\n  idle_timeout: 5\nbase:\n  mirror: http://m.example/debian\n")
    settings = load_settings(Settings, path, env={}, partial=True)
    assert settings.base_mirror == "http://m.example/debian"
    with pytest.raises(InvalidInputError, match="base_extra_ca_certs"):
        load_settings(Settings, write_config(tmp_path, "base:\n  extra_ca_certs: {a: b}\n"), env={}, partial=True)


def test_settings_help_names_every_variable_of_the_class_once() -> None:
    lines = settings_help(_Extended)
    variables = [v for v, _ in lines]
    assert len(variables) == len(set(variables)) == len(dataclasses.fields(_Extended))
    assert variables[:2] == ["ENVCTL_DATA_DIR", "ENVCTL_DATABASE_URL"]
    assert ("ENVCTL_REGISTRY_COUNT", "how many") in lines
    assert all(text for _, text in lines)
