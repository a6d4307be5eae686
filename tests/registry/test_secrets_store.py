"""The secret store on SQLite and PostgreSQL: values encrypted with a key file apart from the
database, members only, and a key that is missing, replaced or readable by others said plainly."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from api import dbschema
from envs.kit.db import Database
from envs.kit.errors import ForbiddenError
from registry import users as registry_service
from registry.errors import SecretKeyError, SecretNotFoundError, TeamNotFoundError
from registry.team_secrets import SecretBox, delete_secret, list_secrets, put_secret
from registry.teams import Actor, create_team

VALUE = "store-S3cret-value"


def test_a_secret_is_kept_encrypted_changed_listed_and_deleted_by_members_only(db_url: str, tmp_path: Path) -> None:
    dbschema.upgrade(db_url)
    db = Database(db_url)
    box = SecretBox(tmp_path / "keys" / "secrets.key")
    try:
        with db.session() as s:
            alice = registry_service.create_user(s, "alice")
            bob = registry_service.create_user(s, "bob")
            root = registry_service.create_user(s, "root", is_admin=True)
            create_team(s, "acme", Actor(alice.id))
            ids = alice.id, bob.id, root.id
        a, b, admin = Actor(ids[0]), Actor(ids[1]), Actor(ids[2], is_admin=True)
        with db.session() as s:
            secret, created = put_secret(s, box, "acme", "db-pass", VALUE, a)
            assert created and secret.version == 1 and VALUE.encode() not in secret.ciphertext
        with db.session() as s:
            secret, created = put_secret(s, box, "acme", "db-pass", VALUE + "2", a)
            assert not created and secret.version == 2
            assert box.open(secret.ciphertext) == VALUE + "2"
        with db.session() as s:
            assert [x.name for x in list_secrets(s, "acme", a)] == ["db-pass"]
            with pytest.raises(TeamNotFoundError):
                list_secrets(s, "acme", b)
            with pytest.raises(ForbiddenError):
                put_secret(s, box, "acme", "other", VALUE, admin)  # an envctl admin outside the team
        with db.session() as s:
            delete_secret(s, "acme", "db-pass", a)
        with db.session() as s:
            assert list_secrets(s, "acme", a) == []
            with pytest.raises(SecretNotFoundError):
                delete_secret(s, "acme", "db-pass", a)
    finally:
        db.dispose()
    assert stat.S_IMODE(box.key_file.stat().st_mode) == 0o600


def test_a_replaced_or_exposed_key_is_refused_with_what_to_do_and_never_the_value(tmp_path: Path) -> None:
    sealed = SecretBox(tmp_path / "a.key").seal(VALUE)
    with pytest.raises(SecretKeyError) as replaced:
        SecretBox(tmp_path / "b.key").open(sealed)
    assert "envctl secret set" in replaced.value.message and VALUE not in replaced.value.message
    assert SecretBox(tmp_path / "a.key").open(sealed) == VALUE  # the same file opens it again
    (tmp_path / "a.key").chmod(0o644)
    with pytest.raises(SecretKeyError) as exposed:
        SecretBox(tmp_path / "a.key").open(sealed)
    assert "chmod 600" in exposed.value.message
