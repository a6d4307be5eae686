"""`envctl runtime set --mount`: the command-line form of mounts, checked before sending."""

from __future__ import annotations

import json

import pytest

from tests.api.test_cli import Server, run
from tests.api.test_cli import _isolated_client_config as _isolated_client_config  # noqa: F401  (autouse)
from tests.api.test_cli import server as server  # noqa: F401  (fixture)

Capsys = pytest.CaptureFixture[str]


def test_runtime_set_mount_sets_the_list_shows_it_and_refuses_bad_ones(server: Server, capsys: Capsys) -> None:
    args = server.args()
    assert run(capsys, "runtime", "create", "m", "--env", "python3", *args)[0] == 0
    code, out, err = run(
        capsys, "runtime", "set", "m", "--mount", "volume:home-data:/home/data:ro",
        "--mount", "s3:raw-data/2024/:/data/raw:writeback", "--json", *args,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["mounts"] == [
        {"type": "volume", "name": "home-data", "target": "/home/data", "read_only": True},
        {"type": "s3", "bucket": "raw-data", "prefix": "2024/", "target": "/data/raw", "writeback": True},
    ]
    code, out, err = run(capsys, "runtime", "show", "m", *args)
    assert code == 0 and "volume home-data at /home/data (read-only)" in out, out
    code, out, err = run(capsys, "runtime", "set", "m", "--mount", "volume:v:/proc", *args)
    assert code == 2 and "mounts[0].target" in err, err
    code, out, err = run(capsys, "runtime", "set", "m", "--mount", "git:ext::sh -c id:/mnt/x", *args)
    assert code == 2 and "mounts[0].url" in err, err
    code, out, err = run(capsys, "runtime", "set", "m", "--mount", "volume:v", *args)
    assert code == 2 and "--mount" in err, err
    code, out, err = run(capsys, "runtime", "set", "m", "--no-mounts", "--json", *args)
    assert code == 0 and json.loads(out)["mounts"] == [], err


def test_volume_create_ls_and_rm(server: Server, capsys: Capsys) -> None:
    args = server.args()
    code, out, err = run(capsys, "volume", "create", "cli-data", *args)
    assert code == 0 and "volume cli-data created (you)" in out, err
    code, out, err = run(capsys, "volume", "ls", "--json", *args)
    assert code == 0 and [v["name"] for v in json.loads(out)] == ["cli-data"], err
    code, out, err = run(capsys, "volume", "create", "Bad Name", *args)
    assert code == 2, err
    code, out, err = run(capsys, "volume", "rm", "cli-data", *args)
    assert code == 0 and "deleted" in out, err
    code, out, err = run(capsys, "volume", *args)
    assert code == 0 and "cli-data" not in out, out
