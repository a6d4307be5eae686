"""``envctl publish|unpublish``, ``envctl catalog``, ``envctl team events`` and ``envctl registry
gc`` against a real HTTP server (the fake engine; no registry runs here)."""

from __future__ import annotations

import json

import pytest

from api.settings import Settings
from envs.kit.db import Database
from envs.service import NewVersion, register_version
from tests.api.conftest import prepared_settings  # noqa: F401
from tests.api.test_cli import Server, _isolated_client_config, run, server  # noqa: F401


def test_a_team_publishes_finds_follows_and_unpublishes_from_the_command_line(
    server: Server,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    prepared_settings: Settings,  # noqa: F811
) -> None:
    assert run(capsys, "team", "create", "acme", *server.args())[0] == 0
    db = Database(prepared_settings.effective_database_url)
    with db.session() as s:
        register_version(s, NewVersion("acme/ml", "sha256:" + "c" * 64, "test/x", message="numbers and plots"))
    db.dispose()

    code, out, err = run(capsys, "publish", "acme/ml@1", *server.args())
    assert code == 0, err
    assert "acme/ml@1 is published" in out

    code, out, err = run(capsys, "catalog", "plots", *server.args())
    assert code == 0, err
    assert out.splitlines()[0].split()[:2] == ["PUBLISHED", "VERSION"] and "acme/ml@1" in out
    code, out, err = run(capsys, "catalog", "nothing-like-it", "--json", *server.args())
    assert code == 0 and json.loads(out) == []

    code, out, err = run(capsys, "unpublish", "acme/ml@1", "--json", *server.args())
    assert code == 0 and json.loads(out) == {"ref": "acme/ml@1", "published": False}
    code, out, err = run(capsys, "unpublish", "acme/ml@1", *server.args())
    assert code == 1 and "is not published" in err
    assert run(capsys, "publish", "python3@1", *server.args())[0] == 2  # not a team's: bad input

    code, out, err = run(capsys, "team", "events", "acme", "--count", "4", "--json", *server.args())
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(e["kind"], e["ref"]) for e in got] == [
        ("saved", "acme/ml@1"),
        ("tag_moved", "acme/ml:latest"),
        ("published", "acme/ml@1"),
        ("unpublished", "acme/ml@1"),
    ]
    code, out, err = run(capsys, "team", "events", "acme", "--after", str(got[2]["id"]), "--count", "1", *server.args())
    assert code == 0 and "unpublished" in out and "acme/ml@1" in out and "saved" not in out
    assert run(capsys, "team", "events", "nobodys", "--count", "1", *server.args())[0] == 1

    code, out, err = run(capsys, "registry", "gc", *server.args())
    assert code == 1 and "runs no registry" in err
