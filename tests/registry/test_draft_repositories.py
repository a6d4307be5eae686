"""Runtimes' drafts in the registry are envctl's alone (registry/drafts.py): the token server
grants no action on them to anyone, an admin or a team called like the namespace neither, and
the catalog never counts them as published. The end-to-end refusal by a real registry is in
tests/runner/saves/test_docker_registry_drafts.py."""

from __future__ import annotations

import pytest

from envs.kit.errors import ConflictError
from registry import drafts
from registry.tokenserver import Requester, allowed_actions, parse_scope
from runner.saves.insave import check_depth


@pytest.mark.parametrize(
    "who",
    [
        Requester("root", True, frozenset()),
        Requester("member", False, frozenset({"envctl-drafts"})),
        Requester("other", False, frozenset({"acme"})),
    ],
)
@pytest.mark.parametrize("name", ["envctl-drafts/rt_abc", "ENVCTL-DRAFTS/rt_abc", "envctl-drafts/x/y"])
def test_no_one_is_granted_a_draft_repository(who: Requester, name: str) -> None:
    scope = parse_scope(f"repository:{name}:pull,push,delete")
    assert allowed_actions(scope, who, is_published=lambda _n: True) == []


def test_a_teams_repository_is_still_granted_to_its_members() -> None:
    member = Requester("m", False, frozenset({"acme"}))
    assert allowed_actions(parse_scope("repository:acme/ml:pull,push"), member) == ["pull", "push"]


def test_draft_names() -> None:
    assert drafts.repository("rt_abc123") == "envctl-drafts/rt_abc123"
    assert drafts.tag_of("sha256:" + "a" * 64) == "a" * 64
    for bad in ("../x", "rt/x", "", "RT"):
        with pytest.raises(ValueError):
            drafts.repository(bad)
    with pytest.raises(ValueError):
        drafts.tag_of("latest")


def test_a_save_inside_the_runtime_past_the_compaction_point_is_refused_clearly() -> None:
    check_depth("acme/ml@3", 99, 100)
    with pytest.raises(ConflictError) as err:
        check_depth("acme/ml@4", 100, 100)
    assert "acme/ml@4 has 100 layers" in err.value.message and "ENVCTL_SAVE_PATH=host" in err.value.message
