"""`envctl secret set|list|rm` and `envctl runtime set --secret` against a real HTTP server on
the fake engine: the value goes in on stdin and is never printed."""

from __future__ import annotations

import io
import json

import pytest

from tests.api.test_cli import Server, run
from tests.api.test_cli import _isolated_client_config as _isolated_client_config  # noqa: F401  (autouse)
from tests.api.test_cli import server as server  # noqa: F401  (fixture)

Capsys = pytest.CaptureFixture[str]
VALUE = "cli-S3cret=value"


def test_secret_set_reads_stdin_list_shows_names_and_runtime_set_uses_one_by_name(
    server: Server, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = server.args()
    assert run(capsys, "team", "create", "acme", *args)[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(VALUE + "\n"))
    code, out, err = run(capsys, "secret", "set", "acme", "db-pass", *args)
    assert code == 0 and "acme/db-pass set (version 1)" in out and VALUE not in out + err, err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = run(capsys, "secret", "set", "acme", "empty", *args)
    assert code == 2 and "no value" in err

    code, out, err = run(capsys, "secret", "list", "acme", "--json", *args)
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["db-pass"] and VALUE not in out
    code, out, err = run(capsys, "secret", "acme", *args)
    assert code == 0 and out.splitlines()[1].split()[:2] == ["db-pass", "1"]

    code, out, err = run(
        capsys, "runtime", "create", "early", "--env", "python3", "--secret", "P=acme/db-pass", "--json", *args
    )
    assert code == 0 and json.loads(out)["env"] == {"P": {"secret": "db-pass", "team": "acme"}}, err
    assert run(capsys, "runtime", "create", "demo", "--env", "python3", *args)[0] == 0
    code, out, err = run(capsys, "runtime", "set", "demo", "--secret", "DB_PASSWORD=db-pass", "--json", *args)
    assert code == 0, err
    assert json.loads(out)["env"] == {"DB_PASSWORD": {"secret": "db-pass", "team": "acme"}}
    code, out, err = run(capsys, "runtime", "env", "demo", *args)
    assert code == 0 and "secret acme/db-pass (hidden)" in out and VALUE not in out
    code, out, err = run(capsys, "runtime", "set", "demo", "--secret", "X=missing", *args)
    assert code == 2 and "env.X" in err and "missing" in err

    code, out, err = run(capsys, "secret", "rm", "acme", "db-pass", *args)
    assert code == 0 and "deleted" in out
    code, out, err = run(capsys, "secret", "rm", "acme", "db-pass", *args)
    assert code == 1 and "no secret 'db-pass'" in err
