"""`envctl runtime set` and `envctl runtime env` against a real HTTP server on the fake engine."""

from __future__ import annotations

import json

import pytest

from tests.api.test_cli import Server, run
from tests.api.test_cli import _isolated_client_config as _isolated_client_config  # noqa: F401  (autouse)
from tests.api.test_cli import server as server  # noqa: F401  (fixture)

Capsys = pytest.CaptureFixture[str]


def test_runtime_set_changes_variables_and_settings_and_runtime_env_lists_them(server: Server, capsys: Capsys) -> None:
    args = server.args()
    code, out, err = run(capsys, "runtime", "create", "demo", "--env", "python3", "--env-var", "A=1", *args)
    assert code == 0, err
    code, out, err = run(
        capsys,
        "runtime", "set", "demo", "--env", "B=two words", "--env", "C=x=y", "--unset-env", "A",
        "--machine-type", "medium", "--idle-timeout", "600", "--name", "renamed", "--json", *args,
    )  # fmt: skip
    assert code == 0, err
    rt = json.loads(out)
    assert rt["name"] == "renamed" and rt["env"] == {"B": "two words", "C": "x=y"}
    assert rt["machine_type"] == "medium" and rt["idle_timeout"] == 600

    code, out, err = run(capsys, "runtime", "env", "renamed", *args)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VALUE", "SOURCE"]
    assert [line.split()[0] for line in lines[1:]] == ["B", "C"] and "set here" in lines[1]
    code, out, err = run(capsys, "runtime", "env", "renamed", "--inherited", "--json", *args)
    assert code == 0, err
    assert {v["name"]: v["source"] for v in json.loads(out)["variables"]} == {"B": "set here", "C": "set here"}

    code, out, err = run(capsys, "runtime", "set", "renamed", "--env", "1X=bad", *args)
    assert code == 2 and "env.1X" in err
    code, out, err = run(capsys, "runtime", "set", "renamed", "--env", "novalue", *args)
    assert code == 2 and "NAME=VALUE" in err


def test_runtime_set_on_a_running_runtime_is_refused_or_kept_for_the_next_boot(server: Server, capsys: Capsys) -> None:
    args = server.args()
    code, _, err = run(capsys, "runtime", "create", "demo", "--env", "python3", "--start", *args)
    assert code == 0, err
    code, out, err = run(capsys, "runtime", "set", "demo", "--env", "A=1", *args)
    assert code == 1 and "env can only change while the runtime is stopped" in err and "--next-boot" in err
    later = ["--env", "A=1", "--machine-type", "large", "--next-boot"]
    code, out, err = run(capsys, "runtime", "set", "demo", *later, *args)
    assert code == 0, err
    assert "at next boot" in out and "variables A" in out and "machine type large" in out
    code, out, err = run(capsys, "runtime", "env", "demo", *args)
    assert "at the next boot: A set here" in out


def test_machine_types_show_the_gpu_kind_and_runtime_set_refuses_a_cuda_version_the_host_lacks(
    server: Server, capsys: Capsys
) -> None:
    code, out, err = run(capsys, "machine-types", *server.args())
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["gpu-small"][5:7] == ["1", "nvidia"]
    run(capsys, "runtime", "create", "gpu", "--env", "python3", "--machine-type", "gpu-small", *server.args())
    code, out, err = run(capsys, "runtime", "set", "gpu", "--cuda", "12.2", *server.args())
    assert code == 2 and "cuda: CUDA '12.2' is not on this host" in err
    code, out, err = run(capsys, "runtime", "set", "gpu", "--cuda", "none", "--json", *server.args())
    assert code == 0 and json.loads(out)["cuda"] is None


def test_runtime_set_lease_gives_shows_and_drops_a_lease(server: Server, capsys: Capsys) -> None:
    args = server.args()
    assert run(capsys, "runtime", "create", "held", "--env", "python3", *args)[0] == 0
    code, out, err = run(capsys, "runtime", "set", "held", "--lease", "600", "--json", *args)
    assert code == 0, err
    assert json.loads(out)["lease"]["seconds"] == 600
    code, out, err = run(capsys, "runtime", "show", "held", *args)
    assert code == 0 and "600 s, last renewed" in out and "unless its client renews it" in out, out
    code, out, err = run(capsys, "runtime", "set", "held", "--lease", "2", *args)
    assert code == 2 and "lease" in err, err
    code, out, err = run(capsys, "runtime", "set", "held", "--lease", "soon", *args)
    assert code == 2 and "--lease" in err, err
    code, out, err = run(capsys, "runtime", "set", "held", "--lease", "none", "--json", *args)
    assert code == 0 and json.loads(out)["lease"] is None, err
    code, out, err = run(capsys, "runtime", "show", "held", *args)
    assert "lease" not in out, out
