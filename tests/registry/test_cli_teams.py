"""``envctl login``, ``envctl team …`` and ``envctl token …`` against a real HTTP server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from tests.api.conftest import prepared_settings  # noqa: F401
from tests.api.test_cli import Server, _isolated_client_config, run, server  # noqa: F401


def test_login_keeps_the_url_and_token_where_team_commands_find_them(
    server: Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    config = tmp_path / "config" / "envctl" / "config.yaml"
    code, _out, err = run(capsys, "login", "--url", server.url, "--token", "envctl_wrong")
    assert code == 1 and "not known" in err
    assert not config.exists()  # a bad token is not kept

    code, out, err = run(capsys, "login", "--url", server.url, "--token", server.token, "--json")

    assert code == 0, err
    assert json.loads(out)["user"] == "admin"
    assert yaml.safe_load(config.read_text()) == {"url": server.url, "token": server.token}
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    # from here on no --url and no --token: the config file
    code, out, err = run(capsys, "user", "create", "bob")
    assert code == 0 and out.strip().startswith("envctl_") and "shown once" in err
    code, out, err = run(capsys, "team", "create", "acme")
    assert code == 0 and "acme" in out, err
    code, out, err = run(capsys, "team", "add-member", "acme", "bob", "--role", "admin", "--json")
    assert code == 0, err
    assert json.loads(out)["role"] == "admin"
    code, out, err = run(capsys, "team", "list", "--json")
    assert [(m["user"], m["role"]) for m in json.loads(out)[0]["members"]] == [("admin", "admin"), ("bob", "admin")]
    code, out, err = run(capsys, "team")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["TEAM", "YOUR", "ROLE"]
    assert "bob (admin)" in out
    assert run(capsys, "team", "remove-member", "acme", "bob")[0] == 0
    code, out, err = run(capsys, "team", "add-member", "acme", "nobody")
    assert code == 1 and "no user named 'nobody'" in err
    code, out, err = run(capsys, "team", "create", "Bad Name")
    assert code == 2


def test_a_token_made_on_the_command_line_is_printed_once_and_refused_once_revoked(
    server: Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "token", "create", "-d", "ci", "--expires-in", "3", *server.args())
    assert code == 0, err
    new = out.strip()
    assert new.startswith("envctl_") and "only time" in err
    mine = ["--url", server.url, "--token", new]

    code, out, err = run(capsys, "token", "list", "--json", *mine)
    listed = json.loads(out)
    assert [t["description"] for t in listed][-1] == "ci" and new not in out
    code, out, err = run(capsys, "token", "list", *mine)
    assert "ci" in out and "active" in out

    code, out, err = run(capsys, "token", "revoke", listed[-1]["id"], *server.args())
    assert code == 0, err
    code, out, err = run(capsys, "token", "list", *mine)
    assert code == 1 and "revoked" in err
    code, out, err = run(capsys, "token", "list", *server.args())
    assert "revoked" in out


def test_a_team_runtime_is_made_with_team_and_addressed_as_team_slash_name(
    server: Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    bob = ["--url", server.url, "--token", run(capsys, "user", "create", "bob", *server.args())[1].strip()]
    for team in ("acme", "beta"):
        assert run(capsys, "team", "create", team, *server.args())[0] == 0
        assert run(capsys, "team", "add-member", team, "bob", *server.args())[0] == 0
        code, out, err = run(capsys, "runtime", "create", "shared", "--env", "python3", "--team", team, *server.args())
        assert code == 0 and "team" in out and team in out, err
    code, out, err = run(capsys, "runtime", "ls", *bob)
    assert code == 0 and "acme/shared" in out and "beta/shared" in out, err
    code, out, err = run(capsys, "runtime", "show", "shared", "--json", *bob)
    assert code == 2 and "acme/shared, beta/shared" in err  # two teams' runtimes: say which
    code, out, err = run(capsys, "runtime", "show", "beta/shared", "--json", *bob)
    assert code == 0 and json.loads(out)["team"] == "beta", err
    assert run(capsys, "runtime", "create", "shared", "--env", "python3", *bob)[0] == 0
    code, out, err = run(capsys, "runtime", "show", "shared", "--json", *bob)
    assert code == 0 and json.loads(out)["team"] is None, err  # a bare name: your own first
    code, out, err = run(capsys, "runtime", "create", "x", "--env", "python3", "--team", "gamma", *bob)
    assert code == 1 and "no team 'gamma' of yours" in err


def test_runtime_executions_names_who_ran_each_cell_of_a_team_runtime_when_it_was_not_you(
    server: Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "user", "create", "bob", *server.args())
    assert code == 0, err
    bob = ["--url", server.url, "--token", out.strip()]
    assert run(capsys, "team", "create", "acme", *server.args())[0] == 0
    assert run(capsys, "team", "add-member", "acme", "bob", *server.args())[0] == 0
    code, out, err = run(capsys, "runtime", "create", "shared", "--env", "python3", "--team", "acme", *server.args())
    assert code == 0, err
    assert run(capsys, "exec", "acme/shared", "print('mine')", *server.args())[0] == 0
    code, out, err = run(capsys, "exec", "acme/shared", "print('bobs')  # \x1b[2J", *bob)  # an escape: stays text
    assert code == 0 and out == "bobs\n", err

    code, out, err = run(capsys, "runtime", "executions", "acme/shared", *server.args())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "STATUS", "LANGUAGE", "CREATED", "(UTC)", "BY", "CODE"]
    assert "bob" in lines[1] and "print('bobs')  # ?[2J" in lines[1] and "\x1b" not in out
    assert "print('mine')" in lines[2] and "admin" not in lines[2]
    code, out, err = run(capsys, "runtime", "executions", "acme/shared", "--json", *bob)
    assert code == 0, err
    assert [e["submitted_by"] for e in json.loads(out)] == ["bob", "admin"]
