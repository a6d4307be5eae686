"""The runner's settings (runner/settings.py): its fields, their variables and parsers, the
machine type catalog, read through the generic loader of envs/kit/config.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.kit.config import load_settings
from envs.kit.errors import InvalidInputError
from runner.settings import DEFAULT_MACHINE_TYPES, MachineType, Settings

GIB = 1024**3
MIB = 1024**2


def load(config_file: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    return load_settings(Settings, config_file, env)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "envctl.yaml"
    path.write_text(text)
    return path


def test_no_file_and_no_variables_gives_the_defaults() -> None:
    settings = load(env={})
    assert settings.api_host == "127.0.0.1"
    assert settings.api_port == 8700
    assert settings.runner_backend == "docker"
    assert settings.runner_idle_timeout == 1200
    assert settings.runner_labels == {}
    assert settings.machine_types == DEFAULT_MACHINE_TYPES


def test_variables_set_each_setting_with_its_type(tmp_path: Path) -> None:
    settings = load(
        env={
            "ENVCTL_DATA_DIR": str(tmp_path / "data"),
            "ENVCTL_DATABASE_URL": "postgresql://u@db/envctl",
            "ENVCTL_API_HOST": "0.0.0.0",
            "ENVCTL_API_PORT": "9000",
            "ENVCTL_RUNNER_NAME": "runner-7",
            "ENVCTL_RUNNER_BACKEND": "fake",
            "ENVCTL_RUNNER_IDLE_TIMEOUT": "60",
            "ENVCTL_RUNNER_IDLE_CHECK_INTERVAL": "0.5",
            "ENVCTL_RUNNER_BOOT_TIMEOUT": "30",
            "ENVCTL_RUNNER_MAX_BOOTS": "2",
            "ENVCTL_RUNNER_LOG_MAX_SIZE": "1m",
            "ENVCTL_RUNNER_NETWORK": "envctl-net",
            "ENVCTL_BASE_MIRROR": "http://mirror.example/debian",
        }
    )
    assert settings.data_dir == tmp_path / "data"
    assert settings.database_url == "postgresql://u@db/envctl"
    assert settings.api_host == "0.0.0.0"
    assert settings.api_port == 9000
    assert settings.runner_name == "runner-7"
    assert settings.runner_backend == "fake"
    assert settings.runner_idle_timeout == 60
    assert settings.runner_idle_check_interval == 0.5
    assert settings.runner_boot_timeout == 30.0
    assert settings.runner_max_boots == 2
    assert settings.runner_log_max_size == "1m"
    assert settings.runner_network == "envctl-net"
    assert settings.base_mirror == "http://mirror.example/debian"


def test_file_with_nested_sections_and_machine_types_is_read(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        f"""
data_dir: {tmp_path / "d"}
api:
  port: 9100
runner:
  idle_timeout: 300
  backend: fake
  labels:
    team: ml
machine_types:
  tiny:
    cpus: 0.5
    memory: 512m
  big:
    cpus: 4
    memory: 2g
    pids: 4096
    gpus: 1
    idle_timeout: 600
    description: four CPUs
  exact:
    cpus: 1
    memory: 1073741824
  binary:
    cpus: 1
    memory: 3GiB
""",
    )
    settings = load(path, env={})
    assert settings.data_dir == tmp_path / "d"
    assert settings.api_port == 9100
    assert settings.runner_idle_timeout == 300
    assert settings.runner_backend == "fake"
    assert settings.runner_labels == {"team": "ml"}
    assert settings.machine_types == {
        "tiny": MachineType("tiny", cpus=0.5, memory=512 * MIB),
        "big": MachineType(
            "big",
            cpus=4.0,
            memory=2 * GIB,
            pids=4096,
            gpus=1,
            idle_timeout=600,
            description="four CPUs",
        ),
        "exact": MachineType("exact", cpus=1.0, memory=GIB),
        "binary": MachineType("binary", cpus=1.0, memory=3 * GIB),
    }


def test_config_file_is_found_through_envctl_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "runner:\n  idle_timeout: 77\n")
    assert load(env={"ENVCTL_CONFIG": str(path)}).runner_idle_timeout == 77


def test_variables_override_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "api:\n  port: 9100\nrunner:\n  idle_timeout: 300\n")
    settings = load(path, env={"ENVCTL_RUNNER_IDLE_TIMEOUT": "90"})
    assert settings.runner_idle_timeout == 90
    assert settings.api_port == 9100


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load(write_config(tmp_path, ""), env={}) == load(env={})


def test_unknown_key_in_file_is_refused_listing_the_known_ones(tmp_path: Path) -> None:
    path = write_config(tmp_path, "api_prot: 9000\n")
    with pytest.raises(InvalidInputError) as caught:
        load(path, env={})
    message = caught.value.message
    assert "'api_prot'" in message
    assert str(path) in message
    for known in ("api_port", "data_dir", "database_url", "machine_types", "runner_idle_timeout"):
        assert known in message
    assert caught.value.field == "api_prot"


def test_unknown_key_inside_a_section_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "runner:\n  idle_timeuot: 5\n")
    with pytest.raises(InvalidInputError, match="runner_idle_timeuot"):
        load(path, env={})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENVCTL_API_PORT", "eighty"),
        ("ENVCTL_RUNNER_IDLE_TIMEOUT", "20m"),
        ("ENVCTL_RUNNER_MAX_BOOTS", "1.5"),
        ("ENVCTL_RUNNER_BOOT_TIMEOUT", "soon"),
    ],
)
def test_bad_number_in_a_variable_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        load(env={variable: value})
    assert variable in caught.value.message
    assert repr(value) in caught.value.message


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        pytest.param("{cpus: 2}", "machine_types.big: missing memory", id="no-memory"),
        pytest.param("{memory: 2g}", "machine_types.big: missing cpus", id="no-cpus"),
        pytest.param("{cpus: 2, memory: lots}", "machine_types.big.memory", id="bad-memory"),
        pytest.param("{cpus: many, memory: 2g}", "machine_types.big", id="bad-cpus"),
        pytest.param("{cpus: 2, memory: 2g, ram: 4g}", "machine_types.big: unknown keys", id="extra"),
        pytest.param("small", "machine_types.big: must be a map", id="not-a-map"),
    ],
)
def test_bad_machine_type_is_refused_naming_it(tmp_path: Path, spec: str, names: str) -> None:
    path = write_config(tmp_path, f"machine_types:\n  big: {spec}\n")
    with pytest.raises(InvalidInputError) as caught:
        load(path, env={})
    assert names in caught.value.message
    assert caught.value.field is not None
    assert caught.value.field.endswith(names.split(":")[0])


def test_empty_machine_types_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "machine_types: {}\n")
    with pytest.raises(InvalidInputError, match="machine_types must be a non-empty map"):
        load(path, env={})


def test_runner_labels_variable_is_read_as_comma_separated_pairs() -> None:
    settings = load(env={"ENVCTL_RUNNER_LABELS": "a=b, c=d ,,e="})
    assert settings.runner_labels == {"a": "b", "c": "d", "e": ""}


@pytest.mark.parametrize("value", ["novalue", "a=b,novalue", "=x"])
def test_runner_label_without_a_key_and_value_is_refused(value: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        load(env={"ENVCTL_RUNNER_LABELS": value})
    assert "ENVCTL_RUNNER_LABELS" in caught.value.message
    assert "key=value" in caught.value.message


def test_the_compaction_threshold_stays_below_overlay2s_layer_limit() -> None:
    assert load(env={}).save_compact_at_layers == 100
    assert load(env={"ENVCTL_SAVE_COMPACT_AT_LAYERS": "12"}).save_compact_at_layers == 12
    with pytest.raises(InvalidInputError, match="ENVCTL_SAVE_COMPACT_AT_LAYERS") as caught:
        load(env={"ENVCTL_SAVE_COMPACT_AT_LAYERS": "200"})
    assert "128" in caught.value.message


def test_import_allow_hosts_is_read_as_comma_separated_lower_case_names() -> None:
    settings = load(env={"ENVCTL_IMPORT_ALLOW_HOSTS": "Envctl-B.internal, 10.0.0.5,"})
    assert settings.import_allow_hosts == ("envctl-b.internal", "10.0.0.5")
    assert load(env={}).import_allow_hosts == ()


def test_the_memory_watch_is_a_percentage_below_100_and_a_bad_one_names_its_variable() -> None:
    assert load(env={}).runner_memory_pressure == 90.0
    assert load(env={"ENVCTL_RUNNER_MEMORY_PRESSURE": "0"}).runner_memory_pressure == 0.0  # off
    assert load(env={"ENVCTL_RUNNER_MEMORY_PRESSURE": "85%"}).runner_memory_pressure == 85.0
    for bad in ("100", "-5", "ninety"):
        with pytest.raises(InvalidInputError, match="ENVCTL_RUNNER_MEMORY_PRESSURE") as caught:
            load(env={"ENVCTL_RUNNER_MEMORY_PRESSURE": bad})
        assert bad in caught.value.message
