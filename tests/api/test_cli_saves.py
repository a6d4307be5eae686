"""`envctl save --keep-caches / --allow-secrets` and the caches in `envctl runtime changes`,
against a real HTTP server on the fake backend (its layer holds what ``set_files`` says)."""

# The server fixtures are imported by name and requested as parameters of the same name.
# ruff: noqa: F401, F811

from __future__ import annotations

import json

import pytest

from runner.backends.base import Change
from tests.api.cli_exec_fixtures import Server, _isolated_client_config, api_get, run, server
from tests.api.test_cli_envs import _backend, _running

Capsys = pytest.CaptureFixture[str]


def test_save_says_which_caches_it_left_out_and_keep_caches_keeps_them(server: Server, capsys: Capsys) -> None:
    rt = _running(server, capsys)
    _backend(server).set_files(rt["id"], {"/var/cache/apt/archives/x.deb": b"d" * 4096, "/root/a": b"a"})
    code, out, err = run(capsys, "save", "demo", "--as", "lean", *server.args())
    assert code == 0, err
    assert out.startswith("saved as lean@1")
    assert "left out caches: /var/cache/apt 4.0 KiB (1 files) (--keep-caches keeps them)" in err
    code, out, err = run(capsys, "save", "demo", "--as", "lean", "--keep-caches", "--json", *server.args())
    assert code == 0, err
    op = json.loads(out)
    assert op["result"]["left_out"] == {} and op["result"]["caches_kept"] is True


def test_a_refused_save_names_each_path_and_allow_secrets_accepts_them(server: Server, capsys: Capsys) -> None:
    rt = _running(server, capsys)
    files = {"/root/.netrc": b"machine h login a password b\n", "/root/.ssh/id_ed25519": b"x"}
    files["/root/.ssh/id_ed25519"] = b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    _backend(server).set_files(rt["id"], files)
    code, out, err = run(capsys, "save", "demo", "--as", "leaky", *server.args())
    assert code == 1 and out == ""
    assert "refused: its new layer holds secrets" in err
    assert "  /root/.netrc: netrc credentials file" in err and "  /root/.ssh/id_ed25519: private key" in err
    assert "password b" not in err and "AAAA" not in err
    assert api_get(server, f"/runtimes/{rt['id']}")["state"] == "running"
    code, out, err = run(
        capsys,
        "save",
        "demo",
        "--as",
        "leaky",
        "--allow-secrets",
        "/root/.netrc",
        "--allow-secrets",
        "/root/.ssh/id_ed25519",
        *server.args(),
    )
    assert code == 0, err
    assert "kept, as allowed: /root/.netrc: netrc credentials file" in err
    code, out, err = run(capsys, "save", "demo", "--as", "leaky", "--allow-secrets", "root/x", *server.args())
    assert code == 2 and "allow_secrets[0]" in err


def test_changes_show_which_paths_a_save_would_leave_out_as_caches(server: Server, capsys: Capsys) -> None:
    rt = _running(server, capsys)
    _backend(server).set_changes(
        rt["id"], [Change("added", "/var/lib/apt/lists/deb_Packages"), Change("added", "/root/notes")]
    )
    code, out, err = run(capsys, "runtime", "changes", "demo", *server.args())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "PATH", "SIZE", "CACHE", "(LEFT", "OUT)"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows["/var/lib/apt/lists/deb_Packages"][3] == "/var/lib/apt/lists" and len(rows["/root/notes"]) == 3
    assert "a save keeps 1 paths" in err and "it leaves out caches: /var/lib/apt/lists" in err
