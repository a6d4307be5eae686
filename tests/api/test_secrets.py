"""Team secrets through the API on the fake engine: write-only, encrypted at rest with a key
file apart from the database, members only, used by runtimes by name (issue 9 item 2). The
fake runs the real agent as a local process, so a cell sees what a container's would."""

from __future__ import annotations

import stat
from typing import Any

from sqlalchemy import select

from registry.models import TeamSecret
from tests.api.conftest import ApiHarness

VALUE = "s3cr3t-Value/with+chars"
NEW_VALUE = "an0ther-Value=42"


def _secret(api: ApiHarness, name: str, value: str, team: str = "acme", **kw: Any) -> Any:
    return api.client.put(
        f"/teams/{team}/secrets/{name}", json={"value": value}, headers=kw.get("headers", api.headers)
    )


def _team(api: ApiHarness, name: str = "acme") -> None:
    assert api.post("/teams", json={"name": name}).status_code == 201


def _cell(api: ApiHarness, rid: str, code: str) -> str:
    ex = api.post(f"/runtimes/{rid}/executions", params={"wait": 20}, json={"code": code}).json()
    assert ex["status"] == "ok", ex
    return "".join(o.get("text", "") for o in ex["outputs"] if o["output_type"] == "stream")


def test_secrets_are_write_only_encrypted_at_rest_and_the_key_file_is_private(api: ApiHarness) -> None:
    _team(api)
    made = _secret(api, "db-pass", VALUE)
    assert made.status_code == 201 and made.json()["version"] == 1, made.text
    changed = _secret(api, "db-pass", NEW_VALUE)
    assert changed.status_code == 200 and changed.json()["version"] == 2
    listed = api.get("/teams/acme/secrets")
    assert [s["name"] for s in listed.json()] == ["db-pass"]
    for resp in (made, changed, listed):
        assert VALUE not in resp.text and NEW_VALUE not in resp.text
    key = api.settings.data_dir / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with api.db.session() as s:
        stored = s.scalars(select(TeamSecret)).one().ciphertext
    assert NEW_VALUE.encode() not in stored and VALUE.encode() not in stored
    assert api.runner.secret_box.open(stored) == NEW_VALUE
    assert api.delete("/teams/acme/secrets/db-pass").status_code == 204
    gone = api.delete("/teams/acme/secrets/db-pass")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "secret_not_found"


def test_bad_names_and_values_are_422_naming_the_field_and_never_echo_the_value(api: ApiHarness) -> None:
    _team(api)
    bad_name = _secret(api, ".hidden", VALUE)
    assert bad_name.status_code == 422 and bad_name.json()["error"]["details"]["field"] == "name"
    for value in ("", "a\x00" + VALUE, VALUE * 2000):
        resp = _secret(api, "ok", value)
        assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == "value", resp.text
        assert VALUE not in resp.text


def test_only_members_of_the_team_see_or_touch_its_secrets(api: ApiHarness, other_headers: dict[str, str]) -> None:
    _team(api)
    assert _secret(api, "db-pass", VALUE).status_code == 201
    assert api.get("/teams/acme/secrets", headers=other_headers).status_code == 404
    assert _secret(api, "db-pass", "x" * 10, headers=other_headers).status_code == 404
    assert api.delete("/teams/acme/secrets/db-pass", headers=other_headers).status_code == 404
    rt = api.post("/runtimes", json={"environment": "python3", "name": "b", "env": {"P": {"secret": "acme/db-pass"}}},
                  headers=other_headers)  # fmt: skip
    assert rt.status_code == 422 and rt.json()["error"]["details"]["field"] == "env.P", rt.text


def test_a_runtime_gets_its_secrets_as_variables_and_files_and_shows_only_references(api: ApiHarness) -> None:
    _team(api)
    assert _secret(api, "db-pass", VALUE).status_code == 201
    missing = api.post("/runtimes", json={"environment": "python3", "name": "m", "env": {"X": {"secret": "nope"}}})
    assert missing.status_code == 422 and "nope" in missing.json()["error"]["message"]
    assert missing.json()["error"]["details"]["field"] == "env.X"

    rt = api.create_runtime("sec", env={"DB_PASSWORD": {"secret": "db-pass"}, "MODE": "fast"})
    assert rt["env"] == {"DB_PASSWORD": {"secret": "db-pass", "team": "acme"}, "MODE": "fast"}
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"running"})
    code = "import os; print(os.environ['DB_PASSWORD'])"
    assert _cell(api, rt["id"], code).splitlines()[0] == VALUE
    secrets_dir = api.runner.paths.state_dir(rt["id"]) / "secrets"
    assert (secrets_dir / "db-pass").read_text() == VALUE
    assert stat.S_IMODE((secrets_dir / "db-pass").stat().st_mode) == 0o400

    env = api.get(f"/runtimes/{rt['id']}/env").json()
    shown = {v["name"]: v for v in env["variables"]}
    assert shown["DB_PASSWORD"]["value"] is None and shown["DB_PASSWORD"]["secret"] == "acme/db-pass"
    view = api.get(f"/runtimes/{rt['id']}")
    assert VALUE not in view.text and VALUE not in api.get(f"/runtimes/{rt['id']}/log").text
    assert view.json()["secrets_outdated"] == []
    assert VALUE in api.runner.secrets.values_of(rt["id"])  # what its saves are searched for

    assert _secret(api, "db-pass", NEW_VALUE).status_code == 200
    assert api.get(f"/runtimes/{rt['id']}").json()["secrets_outdated"] == ["acme/db-pass"]
    assert {VALUE, NEW_VALUE} <= set(api.runner.secrets.values_of(rt["id"]))

    assert api.post(f"/runtimes/{rt['id']}/stop").status_code == 202
    api.wait_settled(rt["id"])
    api.post(f"/runtimes/{rt['id']}/start")
    api.wait_for(rt["id"], {"running"})
    assert _cell(api, rt["id"], "import os; print(os.environ['DB_PASSWORD'])") == NEW_VALUE + "\n"
    assert api.get(f"/runtimes/{rt['id']}").json()["secrets_outdated"] == []

    assert api.delete("/teams/acme/secrets/db-pass").status_code == 204
    assert api.get(f"/runtimes/{rt['id']}").json()["secrets_outdated"] == ["acme/db-pass"]
    api.post(f"/runtimes/{rt['id']}/stop")
    api.wait_settled(rt["id"])
    api.post(f"/runtimes/{rt['id']}/start")
    failed = api.wait_settled(rt["id"])
    assert failed.state == "error" and failed.state_reason == "secret-unavailable"
    assert "acme/db-pass" in failed.state_message and "DB_PASSWORD" in failed.state_message


def test_a_running_runtime_takes_a_secret_reference_for_its_next_boot(api: ApiHarness) -> None:
    _team(api)
    assert _secret(api, "token", VALUE).status_code == 201
    rt = api.create_runtime("later")
    api.post(f"/runtimes/{rt['id']}/start")
    api.wait_for(rt["id"], {"running"})
    refused = api.patch(f"/runtimes/{rt['id']}", json={"env": {"TOKEN": {"secret": "token"}}})
    assert refused.status_code == 409
    pending = api.patch(
        f"/runtimes/{rt['id']}", params={"apply": "next-boot"}, json={"env": {"TOKEN": {"secret": "token"}}}
    )
    assert pending.status_code == 200 and pending.json()["pending"]["env"] == {
        "TOKEN": {"secret": "token", "team": "acme"}
    }
    assert api.get(f"/runtimes/{rt['id']}/env").json()["pending"] == {"TOKEN": {"secret": "token", "team": "acme"}}


def test_a_runtime_whose_boot_was_cut_short_gets_its_secrets_when_it_is_adopted(api: ApiHarness) -> None:
    """A server that dies between starting the container and handing over the secrets: the
    next reconciliation gives the agent the secrets before it calls the runtime running."""
    _team(api)
    assert _secret(api, "db-pass", VALUE).status_code == 201
    rt = api.create_runtime("cut", env={"DB_PASSWORD": {"secret": "db-pass"}})
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"running"})
    secret_file = api.runner.paths.state_dir(rt["id"]) / "secrets" / "db-pass"
    assert _secret(api, "db-pass", NEW_VALUE).status_code == 200  # not yet in the container
    with api.runner.records.tx() as s:  # as a boot left it: container up, secrets not handed over
        api.runner.records.set_in(s, rt["id"], state="booting")
    api.runner.reconciler.run()
    assert api.get(f"/runtimes/{rt['id']}").json()["state"] == "running"
    assert secret_file.read_text() == NEW_VALUE
    assert _cell(api, rt["id"], "import os; print(os.environ['DB_PASSWORD'])") == NEW_VALUE + "\n"
    assert api.get(f"/runtimes/{rt['id']}").json()["secrets_outdated"] == []
