"""Environments, versions and tags (envs/service.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select

from envs import service
from envs.errors import EnvironmentNotFoundError, VersionNotFoundError
from envs.kit.db import Database
from envs.kit.errors import ForbiddenError, InvalidInputError
from envs.models import Environment, EnvironmentVersion, Tag
from envs.service import NewVersion, Writer


def image(seed: str) -> str:
    """A Docker-style image id (``sha256:`` and 64 hex digits) made from ``seed``."""
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def new(environment: str, seed: str, **kwargs: Any) -> NewVersion:
    return NewVersion(environment=environment, image_id=image(seed), image_ref=f"local/{seed}", **kwargs)


def register(db: Database, environment: str, seed: str, **kwargs: Any) -> tuple[int, bool]:
    with db.session() as s:
        version, created = service.register_version(s, new(environment, seed, **kwargs))
        return version.number, created


def resolved_number(db: Database, ref: str) -> int:
    with db.session() as s:
        return service.resolve(s, ref).number


def test_register_version_numbers_versions_one_two_three(db: Database) -> None:
    assert register(db, "python3", "a") == (1, True)
    assert register(db, "python3", "b") == (2, True)
    assert register(db, "python3", "c") == (3, True)


def test_register_version_moves_latest_to_the_new_version(db: Database) -> None:
    register(db, "python3", "a")
    assert resolved_number(db, "python3:latest") == 1
    register(db, "python3", "b")
    assert resolved_number(db, "python3:latest") == 2


def test_numbers_are_counted_per_environment(db: Database) -> None:
    assert register(db, "python3", "a") == (1, True)
    assert register(db, "bash", "b") == (1, True)
    assert register(db, "python3", "c") == (2, True)


def test_same_digest_twice_is_the_same_version_and_uses_no_number(db: Database) -> None:
    register(db, "python3", "a")
    register(db, "python3", "b")
    assert register(db, "python3", "a") == (1, False)
    assert register(db, "python3", "c") == (3, True)
    with db.session() as s:
        count = s.scalar(select(func.count()).select_from(EnvironmentVersion))
    assert count == 3


def test_registering_a_known_digest_moves_the_tag_back_to_it(db: Database) -> None:
    register(db, "python3", "a")
    register(db, "python3", "b")
    register(db, "python3", "a")
    assert resolved_number(db, "python3") == 1


def test_explicit_digest_is_used_instead_of_the_image_id(db: Database) -> None:
    digest = image("content")
    with db.session() as s:
        version, _ = service.register_version(s, new("python3", "a", digest=digest))
        assert version.digest == digest
        assert version.image_id == image("a")
    assert resolved_number(db, f"python3@{digest}") == 1


def test_register_version_with_a_tag_moves_only_that_tag(db: Database) -> None:
    register(db, "python3", "a")
    register(db, "python3", "b", tag="stable")
    assert resolved_number(db, "python3:stable") == 2
    assert resolved_number(db, "python3:latest") == 1


def test_resolve_by_number_digest_tag_and_bare_name(db: Database) -> None:
    register(db, "python3", "a")
    register(db, "python3", "b")
    assert resolved_number(db, "python3@1") == 1
    assert resolved_number(db, "python3@2") == 2
    assert resolved_number(db, f"python3@{image('a')}") == 1
    assert resolved_number(db, "python3:latest") == 2
    assert resolved_number(db, "python3") == 2


def test_resolve_accepts_a_parsed_reference(db: Database) -> None:
    from envs.refs import parse_ref

    register(db, "python3", "a")
    with db.session() as s:
        assert service.resolve(s, parse_ref("python3@1")).number == 1


def test_resolve_sees_a_moved_tag_within_one_session(db: Database) -> None:
    with db.session() as s:
        service.register_version(s, new("python3", "a"))
        assert service.resolve(s, "python3").number == 1
        service.register_version(s, new("python3", "b"))
        assert service.resolve(s, "python3").number == 2


def test_unknown_environment_is_environment_not_found_404(db: Database) -> None:
    with db.session() as s, pytest.raises(EnvironmentNotFoundError) as caught:
        service.resolve(s, "nosuch@1", field="env")
    assert caught.value.status == 404
    assert "'nosuch'" in caught.value.message
    assert caught.value.details == {"field": "env", "environment": "nosuch"}


@pytest.mark.parametrize(
    "ref",
    ["python3@2", "python3:stable", f"python3@{image('other')}"],
)
def test_unknown_version_of_a_known_environment_is_version_not_found(db: Database, ref: str) -> None:
    register(db, "python3", "a")
    with db.session() as s, pytest.raises(VersionNotFoundError) as caught:
        service.resolve(s, ref)
    assert caught.value.status == 404
    assert "does not exist" in caught.value.message


def test_invalid_reference_is_refused_before_the_database(db: Database) -> None:
    with db.session() as s, pytest.raises(InvalidInputError):
        service.resolve(s, "$(id)")


def test_team_environment_is_separate_from_the_same_name_without_team(db: Database) -> None:
    assert register(db, "python3", "a") == (1, True)
    assert register(db, "acme/python3", "b") == (1, True)
    assert register(db, "acme/python3", "c") == (2, True)
    assert resolved_number(db, "python3") == 1
    assert resolved_number(db, "acme/python3") == 2
    with db.session() as s:
        assert service.resolve(s, "acme/python3@1").image_id == image("b")
        assert service.resolve(s, "python3@1").image_id == image("a")
        names = [e.full_name for e in service.list_environments(s)]
    assert sorted(names) == ["acme/python3", "python3"]


def test_register_version_refuses_a_bad_environment_name(db: Database) -> None:
    with db.session() as s, pytest.raises(InvalidInputError):
        service.register_version(s, new("Bad Name", "a"))


def test_version_ref_names_environment_and_number(db: Database) -> None:
    register(db, "acme/ml", "a")
    register(db, "acme/ml", "b")
    with db.session() as s:
        assert service.resolve(s, "acme/ml").ref == "acme/ml@2"


def test_lineage_of_a_three_level_chain_runs_from_child_to_base(db: Database) -> None:
    with db.session() as s:
        base, _ = service.register_version(s, new("bash", "base"))
        middle, _ = service.register_version(s, new("python3", "mid", parent=base))
        child, _ = service.register_version(s, new("acme/ml", "child", parent=middle))
        ids = (base.id, middle.id, child.id)
    with db.session() as s:
        chain = service.lineage(s, service.resolve(s, "acme/ml@1"))
        assert [v.id for v in chain] == [ids[2], ids[1], ids[0]]
        assert [v.ref for v in chain] == ["acme/ml@1", "python3@1", "bash@1"]


def test_lineage_of_a_base_image_is_itself(db: Database) -> None:
    register(db, "bash", "base")
    with db.session() as s:
        version = service.resolve(s, "bash@1")
        assert service.lineage(s, version) == [version]


def test_get_version_of_an_unknown_id_is_version_not_found(db: Database) -> None:
    with db.session() as s, pytest.raises(VersionNotFoundError):
        service.get_version(s, 9999)


def built(name: str, parent: str | None, seed: str, size: int) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        parent=parent,
        image_id=image(seed),
        recipe_digest=image("recipe-" + seed),
        size=size,
    )


BASE_IMAGES = [
    built("bash", None, "bash-img", 100_000_000),
    built("python3", "bash", "python3-img", 160_000_000),
]


def test_register_base_images_registers_parents_first_with_sizes_added(db: Database) -> None:
    with db.session() as s:
        results = service.register_base_images(s, BASE_IMAGES)
        assert [(v.ref, created) for v, created in results] == [
            ("bash@1", True),
            ("python3@1", True),
        ]
    with db.session() as s:
        bash = service.resolve(s, "bash@1")
        python3 = service.resolve(s, "python3@1")
        assert bash.parent_id is None
        assert python3.parent_id == bash.id
        assert bash.size == 100_000_000 and bash.size_added == 100_000_000
        assert python3.size == 160_000_000 and python3.size_added == 60_000_000
        assert python3.recipe_digest == BASE_IMAGES[1].recipe_digest
        assert python3.image_id == BASE_IMAGES[1].image_id
        assert python3.labels == {"envctl.base-image": "python3"}
        assert service.resolve(s, "python3").id == python3.id


def test_register_base_images_twice_registers_nothing_new(db: Database) -> None:
    with db.session() as s:
        service.register_base_images(s, BASE_IMAGES)
    with db.session() as s:
        again = service.register_base_images(s, BASE_IMAGES)
        assert [(v.ref, created) for v, created in again] == [
            ("bash@1", False),
            ("python3@1", False),
        ]
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(EnvironmentVersion)) == 2
        assert s.scalar(select(func.count()).select_from(Environment)) == 2


def test_register_base_images_finds_a_parent_registered_earlier(db: Database) -> None:
    with db.session() as s:
        service.register_base_images(s, BASE_IMAGES[:1])
    with db.session() as s:
        [(python3, created)] = service.register_base_images(s, BASE_IMAGES[1:])
        assert created
        assert python3.parent_id == service.resolve(s, "bash@1").id
        assert python3.size_added == 60_000_000


def test_timestamps_come_back_timezone_aware(db: Database) -> None:
    register(db, "python3", "a")
    with db.session() as s:
        env = s.scalars(select(Environment)).one()
        version = s.scalars(select(EnvironmentVersion)).one()
        tag = s.scalars(select(Tag)).one()
        stamps = [env.created_at, version.created_at, tag.updated_at]
    for stamp in stamps:
        assert stamp.tzinfo is not None
        assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


# --------------------------------------------------------------------------- ownership


def writers(db: Database) -> tuple[Writer, Writer, Writer]:
    """Alice and Bob (ordinary users) and an admin, as writers of environments."""
    from registry.users import create_user

    with db.session() as s:
        ids = [create_user(s, name, is_admin=name == "root").id for name in ("alice", "bob", "root")]
    return Writer(ids[0]), Writer(ids[1]), Writer(ids[2], is_admin=True)


def test_whoever_makes_an_environment_owns_it_and_base_images_have_no_owner(db: Database) -> None:
    alice, _bob, _admin = writers(db)
    with db.session() as s:
        service.register_version(s, new("mine", "a"), alice)
        service.register_base_images(s, BASE_IMAGES)
    with db.session() as s:
        owners = {e.full_name: e.owner_id for e in service.list_environments(s)}
    assert owners == {"mine": alice.user_id, "bash": None, "python3": None}


def test_only_the_owner_or_an_admin_adds_versions_to_an_environment(db: Database) -> None:
    alice, bob, admin = writers(db)
    with db.session() as s:
        service.register_version(s, new("mine", "a"), alice)
    with db.session() as s, pytest.raises(ForbiddenError) as caught:
        service.register_version(s, new("mine", "b"), bob)
    assert caught.value.status == 403 and caught.value.code == "forbidden"
    assert "'mine' belongs to another user" in caught.value.message
    assert caught.value.details == {"environment": "mine"}
    assert resolved_number(db, "mine") == 1
    with db.session() as s:
        assert service.register_version(s, new("mine", "b"), alice)[0].number == 2
        assert service.register_version(s, new("mine", "c"), admin)[0].number == 3
        assert service.get_environment(s, "mine").owner_id == alice.user_id  # type: ignore[union-attr]


def test_naming_a_version_an_environment_has_writes_nothing_and_is_anyones(db: Database) -> None:
    """What lets anyone load an archive whose lineage holds the base images already here."""
    _alice, bob, _admin = writers(db)
    with db.session() as s:
        service.register_base_images(s, BASE_IMAGES)
    with db.session() as s:
        same = new("python3", "python3-img", tag=None)
        version, created = service.register_version(s, same, bob)
        assert (version.ref, created) == ("python3@1", False)
        with pytest.raises(ForbiddenError, match="'python3' has no owner"):
            service.register_version(s, new("python3", "python3-img", tag="stable"), bob)  # a tag would move
    with db.session() as s, pytest.raises(ForbiddenError, match="only an admin"):
        service.register_version(s, new("python3", "other"), bob)


def test_only_the_owner_or_an_admin_deletes_a_version(db: Database) -> None:
    alice, bob, admin = writers(db)
    with db.session() as s:
        service.register_version(s, new("mine", "a"), alice)
        service.register_version(s, new("mine", "b"), alice)
        service.register_base_images(s, BASE_IMAGES)
    with db.session() as s:
        with pytest.raises(ForbiddenError, match="'mine' belongs to another user: only its owner or an admin"):
            service.delete_version(s, service.resolve(s, "mine@2"), bob, service.pinned_by_nothing)
        with pytest.raises(ForbiddenError, match="'python3' has no owner"):
            service.delete_version(s, service.resolve(s, "python3@1"), alice, service.pinned_by_nothing)
    with db.session() as s:
        unpinned = service.pinned_by_nothing
        assert service.delete_version(s, service.resolve(s, "mine@2"), alice, unpinned) == image("b")
        assert service.delete_version(s, service.resolve(s, "python3@1"), admin, unpinned) == image("python3-img")
    with db.session() as s:
        assert [e.full_name for e in service.list_environments(s)] == ["bash", "mine"]
