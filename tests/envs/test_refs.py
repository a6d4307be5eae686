"""The environment reference grammar of envs/refs.py: what parses, and what is refused and why."""

from __future__ import annotations

import pytest

from envs.kit.errors import InvalidInputError
from envs.refs import NAME_MAX, EnvRef, parse_ref

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python3", EnvRef(name="python3", tag="latest")),
        ("a", EnvRef(name="a", tag="latest")),
        ("my-env_2.x", EnvRef(name="my-env_2.x", tag="latest")),
        ("n" * NAME_MAX, EnvRef(name="n" * NAME_MAX, tag="latest")),
        ("acme/ml", EnvRef(name="ml", team="acme", tag="latest")),
        ("python3@1", EnvRef(name="python3", version=1)),
        ("python3@42", EnvRef(name="python3", version=42)),
        ("python3@999999999", EnvRef(name="python3", version=999999999)),
        ("acme/ml@3", EnvRef(name="ml", team="acme", version=3)),
        (f"python3@{DIGEST}", EnvRef(name="python3", digest=DIGEST)),
        (f"acme/ml@{DIGEST}", EnvRef(name="ml", team="acme", digest=DIGEST)),
        ("python3:latest", EnvRef(name="python3", tag="latest")),
        ("python3:3.12", EnvRef(name="python3", tag="3.12")),
        ("python3:Stable_v1-rc.2", EnvRef(name="python3", tag="Stable_v1-rc.2")),
        ("python3:_x", EnvRef(name="python3", tag="_x")),
        ("acme/ml:gpu", EnvRef(name="ml", team="acme", tag="gpu")),
    ],
)
def test_valid_reference_parses_into_its_parts(text: str, expected: EnvRef) -> None:
    assert parse_ref(text) == expected


def test_bare_name_means_the_latest_tag() -> None:
    ref = parse_ref("python3")
    assert ref.tag == "latest"
    assert ref.version is None and ref.digest is None
    assert not ref.is_pinned
    assert str(ref) == "python3:latest"


def test_version_and_digest_references_are_pinned_and_tags_are_not() -> None:
    assert parse_ref("python3@1").is_pinned
    assert parse_ref(f"python3@{DIGEST}").is_pinned
    assert not parse_ref("python3:latest").is_pinned


def test_full_name_joins_team_and_name() -> None:
    assert parse_ref("acme/ml@2").full_name == "acme/ml"
    assert parse_ref("ml@2").full_name == "ml"


@pytest.mark.parametrize(
    "text",
    [
        "python3",
        "acme/ml",
        "python3@7",
        "acme/ml@7",
        f"python3@{DIGEST}",
        f"acme/ml@{DIGEST}",
        "python3:3.12",
        "acme/ml:gpu-v1",
    ],
)
def test_str_of_a_parsed_reference_parses_back_to_the_same_reference(text: str) -> None:
    ref = parse_ref(text)
    assert parse_ref(str(ref)) == ref


# (reference, words the message must contain to name the bad part)
INVALID = [
    pytest.param("", "must not be empty", id="empty"),
    pytest.param("   ", "must not be empty", id="blank"),
    pytest.param("py;rm -rf /", "team", id="semicolon-command"),
    pytest.param("py;id", "environment name", id="semicolon"),
    pytest.param("$(id)", "environment name", id="command-substitution"),
    pytest.param("`id`", "environment name", id="backticks"),
    pytest.param("py thon", "environment name", id="space"),
    pytest.param("py\nthon", "environment name", id="newline-inside"),
    pytest.param("py|cat", "environment name", id="pipe"),
    pytest.param("py&&id", "environment name", id="ampersand"),
    pytest.param("py>out", "environment name", id="redirect"),
    pytest.param("Python3", "environment name", id="upper-case"),
    pytest.param("acme/ML", "environment name", id="upper-case-name-with-team"),
    pytest.param("ACME/ml", "team", id="upper-case-team"),
    pytest.param("n" * (NAME_MAX + 1), "65 characters long", id="name-over-64"),
    pytest.param("t" * (NAME_MAX + 1) + "/ml", "team", id="team-over-64"),
    pytest.param("-python", "environment name", id="leading-dash"),
    pytest.param("python.", "environment name", id="trailing-dot"),
    pytest.param("python3@0", "version", id="version-zero"),
    pytest.param("python3@-1", "version", id="version-negative"),
    pytest.param("python3@abc", "version", id="version-letters"),
    pytest.param("python3@", "version", id="version-missing"),
    pytest.param("python3@1234567890", "version", id="version-too-big"),
    pytest.param("python3@sha256:abc123", "digest", id="digest-short"),
    pytest.param("python3@sha256:" + "0123456789ABCDEF" * 4, "digest", id="digest-upper-hex"),
    pytest.param("python3@md5:" + "0" * 32, "digest", id="digest-other-algorithm"),
    pytest.param("python3:.x", "tag", id="tag-leading-dot"),
    pytest.param("python3:-x", "tag", id="tag-leading-dash"),
    pytest.param("python3:", "tag", id="tag-empty"),
    pytest.param("python3:a;b", "tag", id="tag-semicolon"),
    pytest.param("python3:" + "t" * 129, "tag", id="tag-over-128"),
    pytest.param("p" * 301, "too long", id="over-300-characters"),
    pytest.param("acme/" + "x" * 300, "too long", id="long-with-team"),
    pytest.param("a//b", "environment name", id="double-slash"),
    pytest.param("a/b/c", "environment name", id="two-slashes"),
    pytest.param("team/", "environment name must not be empty", id="team-without-name"),
    pytest.param("/name", "team must not be empty", id="name-without-team"),
]


@pytest.mark.parametrize(("text", "names"), INVALID)
def test_invalid_reference_is_refused_naming_the_bad_part_and_field(text: str, names: str) -> None:
    """R30: shell metacharacters, over-long names, bad digests."""
    with pytest.raises(InvalidInputError) as caught:
        parse_ref(text, field="runtime.environment")
    err = caught.value
    assert err.field == "runtime.environment"
    assert err.details["field"] == "runtime.environment"
    assert err.message.startswith("runtime.environment: ")
    assert names in err.message
    assert err.status == 422


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("python3\n", id="name"),
        pytest.param("python3:latest\n", id="tag"),
        pytest.param("acme\n/ml", id="team"),
        pytest.param(f"python3@{DIGEST}\n", id="digest"),
    ],
)
def test_trailing_newline_is_refused(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_ref(text)


def test_field_defaults_to_environment() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_ref("Bad")
    assert caught.value.field == "environment"


def test_invalid_digest_and_version_say_which_part_in_details() -> None:
    with pytest.raises(InvalidInputError) as digest:
        parse_ref("python3@sha256:short")
    with pytest.raises(InvalidInputError) as version:
        parse_ref("python3@x")
    with pytest.raises(InvalidInputError) as tag:
        parse_ref("python3:.x")
    assert digest.value.details["part"] == "digest"
    assert version.value.details["part"] == "version"
    assert tag.value.details["part"] == "tag"


def test_message_quotes_at_most_80_characters_of_a_long_bad_pin() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_ref("python3@" + "9" * 250)
    assert "9" * 81 not in caught.value.message
