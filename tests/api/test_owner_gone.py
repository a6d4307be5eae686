"""A user who goes leaves their environments to the admins.

``environments.owner_id`` is a plain user id (users are the registry's table, above envs), so
nothing clears it when a user row goes. User ids are random and never reused: an owner id that
names no user matches no writer, and the API lists such an environment with no owner.
"""

from __future__ import annotations

from sqlalchemy import delete

from envs.service import NewVersion, Writer, register_version
from registry import users as registry_service
from registry.models import User
from tests.api.conftest import ApiHarness


def test_an_environment_whose_owner_is_gone_shows_no_owner_and_only_admins_may_change_it(
    api: ApiHarness, other_headers: dict[str, str]
) -> None:
    with api.db.session() as s:
        alice = registry_service.create_user(s, "alice")
        for n in (1, 2):
            new = NewVersion(environment="mine", image_id="sha256:" + f"{n}" * 64, image_ref=f"mine:{n}")
            register_version(s, new, Writer(alice.id))
        alice_id = alice.id
    assert api.get("/environments/mine").json()["owner"] == "alice"

    with api.db.session() as s:
        s.execute(delete(User).where(User.id == alice_id))  # her tokens go with her (ON DELETE CASCADE)

    listed = {e["name"]: e for e in api.get("/environments").json()}
    assert listed["mine"]["owner"] is None
    assert api.get("/environments/mine").json()["owner"] is None
    refused = api.delete("/environments/mine@2", headers=other_headers)
    assert refused.status_code == 403, refused.text
    assert api.delete("/environments/mine@2").status_code == 204  # the admin may
    assert [v["ref"] for v in api.get("/environments/mine").json()["versions"]] == ["mine@1"]
