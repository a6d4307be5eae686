"""The catalog's and the events' rules in the store, on SQLite and PostgreSQL: an event is
written in the transaction of its change (and rolled back with it), ids only grow, publishing
and the search."""

from __future__ import annotations

from typing import Any

import pytest

from envs.kit.db import Database
from envs.service import NewVersion, Writer, register_version
from registry import catalog, events
from registry import users as registry_service
from registry.errors import RegistryUnavailableError
from registry.prepull import Prepuller
from registry.teams import Actor, create_team

ENVCTL = Writer("envctl", is_admin=True)


def _version(db: Database, name: str, image: str, **kw: Any) -> None:
    with db.session() as s:
        register_version(s, NewVersion(name, "sha256:" + image * 64, "test/x", **kw), ENVCTL)


@pytest.fixture
def acme(db: Database) -> Writer:
    with db.session() as s:
        alice = registry_service.create_user(s, "alice")
        create_team(s, "acme", Actor(alice.id))
        return Writer(alice.id, False, frozenset({"acme"}))


def test_an_event_is_written_with_its_change_and_rolled_back_with_it(db: Database, acme: Writer) -> None:
    with pytest.raises(RuntimeError), db.session() as s:
        register_version(s, NewVersion("acme/ml", "sha256:" + "1" * 64, "test/x"), acme)
        assert [e.kind for e in events.after(s, "acme", 0)] == ["saved", "tag_moved"]  # seen inside
        raise RuntimeError("the save fails after the row was written")
    with db.session() as s:
        assert events.after(s, "acme", 0) == []

    _version(db, "acme/ml", "2")
    _version(db, "python-like", "3")  # no team: no events

    with db.session() as s:
        found = events.after(s, "acme", 0)
        assert [(e.kind, e.ref) for e in found] == [("saved", "acme/ml@1"), ("tag_moved", "acme/ml:latest")]
        assert found[0].id < found[1].id
        assert events.after(s, "acme", found[0].id) == [found[1]]


def test_published_versions_are_found_by_name_message_and_package(db: Database, acme: Writer) -> None:
    labels = {"packages": {"deb": [{"name": "jq", "version": "1"}], "python": []}}
    _version(db, "acme/ml", "4", message="machine learning", labels=labels)
    _version(db, "acme/private", "5", message="machine learning too")
    with db.session() as s:
        catalog.publish(s, "acme/ml@1", acme, "alice")
        catalog.publish(s, "acme/ml@1", acme, "alice")  # twice: one publication
    with db.session() as s:
        assert [e.ref for e in catalog.search(s, "")] == ["acme/ml@1"]
        assert [e.ref for e in catalog.search(s, "LEARNING")] == ["acme/ml@1"]
        [entry] = catalog.search(s, "jq")
        assert entry.packages == {"deb": 1, "python": 0} and entry.matched_packages == ["jq"]
        assert catalog.published_repositories(s) == {"acme/ml"}
        assert catalog.may_read(s, "acme/ml@1", frozenset({"beta"}), False)
        assert not catalog.may_read(s, "acme/private@1", frozenset({"beta"}), False)
        assert not catalog.may_read(s, "acme/ml@7", frozenset({"beta"}), False)


def test_a_server_told_to_pulls_what_its_teams_publish_from_then_on(db: Database, acme: Writer) -> None:
    _version(db, "acme/old", "6")
    with db.session() as s:
        catalog.publish(s, "acme/old@1", acme, "alice")  # before the pre-puller started: not its business
    pulled: list[str] = []

    def pull(ref: str) -> None:
        if ref.startswith("acme/broken"):
            raise RegistryUnavailableError("the registry does not answer")
        pulled.append(ref)

    prepuller = Prepuller(db, ["acme"], pull)
    _version(db, "acme/ml", "7")
    _version(db, "acme/broken", "8")
    _version(db, "acme/ml", "9")
    with db.session() as s:
        catalog.publish(s, "acme/broken@1", acme, "alice")
        catalog.publish(s, "acme/ml:latest", acme, "alice")  # a tag: the version it points at now

    assert prepuller.run_once() == ["acme/ml@2"]
    assert pulled == ["acme/ml@2"]
    assert prepuller.run_once() == []  # each publication once
