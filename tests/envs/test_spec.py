"""Spec files: what they mean, and bad ones reported as file:line: field: problem."""

from __future__ import annotations

import pytest

from envs.kit.errors import InvalidInputError
from envs.spec import parse

GOOD = """\
name: acme/ml
extends: python3@1
message: tools
steps:
  - apt: [jq, graphviz]
  - pip: numpy==2.1.0 pandas
  - env: {MPLBACKEND: Agg, THREADS: 4}
  - run: |
      mkdir -p /opt/data
  - files:
      /opt/data/README: hello
"""


def test_a_good_spec_gives_its_name_parent_steps_and_environment() -> None:
    spec = parse(GOOD, "acme.yaml")
    assert spec.name == "acme/ml" and str(spec.extends) == "python3@1" and spec.message == "tools"
    assert [s.kind for s in spec.steps] == ["apt", "pip", "env", "run", "files"]
    assert spec.steps[1].value == ("numpy==2.1.0", "pandas")
    assert spec.env == {"MPLBACKEND": "Agg", "THREADS": "4"}
    assert spec.steps[0].line == 5
    language, code = spec.steps[0].cell()  # type: ignore[misc]
    assert language == "bash" and "apt-get install -y -qq --no-install-recommends jq graphviz" in code


def test_the_cache_key_changes_with_the_steps_and_the_parent_digest() -> None:
    a = parse(GOOD)
    b = parse(GOOD.replace("hello", "hello!"))
    assert a.digest("sha256:1") == parse(GOOD).digest("sha256:1")
    assert a.digest("sha256:1") != b.digest("sha256:1")
    assert a.digest("sha256:1") != a.digest("sha256:2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nextends: python3\nsteps: [{run: ls}]\nbogus: 1\n", "spec.yaml:4: bogus: unknown field"),
        ("name: x\nsteps: [{run: ls}]\n", "spec.yaml: extends: missing"),
        ("name: Bad Name\nextends: python3\nsteps: [{run: ls}]\n", "spec.yaml:1: name:"),
        ("name: x\nextends: 'py;rm -rf /'\nsteps: [{run: ls}]\n", "spec.yaml:2: extends:"),
        ("name: x\nextends: python3\nsteps: []\n", "spec.yaml:3: steps: must be a non-empty list"),
        (
            "name: x\nextends: python3\nsteps:\n  - apt: ['jq; rm -rf /']\n",
            "spec.yaml:4: steps[1].apt: 'jq; rm -rf /' is not a package name",
        ),
        (
            "name: x\nextends: python3\nsteps:\n  - env: {LD_PRELOAD: /x.so}\n",
            "spec.yaml:4: steps[1].env: LD_PRELOAD is reserved",
        ),
        (
            "name: x\nextends: python3\nsteps:\n  - env: {1X: a}\n",
            "spec.yaml:4: steps[1].env: '1X' is not a variable name",
        ),
        (
            "name: x\nextends: python3\nsteps:\n  - files: {../etc/passwd: x}\n",
            "steps[1].files: '../etc/passwd' must be an absolute path",
        ),
        (
            "name: x\nextends: python3\nsteps:\n  - files: {/results/a: x}\n",
            "steps[1].files: /results/a is not a place",
        ),
        ("name: x\nextends: python3\nsteps:\n  - copy: a\n", "spec.yaml:4: steps[1]: must have exactly one of"),
        (
            "name: x\nextends: python3\nsteps:\n  - run: a\n    apt: [jq]\n",
            "spec.yaml:4: steps[1]: must have exactly one of",
        ),
        ("name: x\nname: y\nextends: python3\nsteps: [{run: ls}]\n", "spec.yaml:2: yaml: duplicate key 'name'"),
        ("name: [unclosed\n", "spec.yaml:2: yaml:"),
        ("- a list\n", "spec.yaml:1: spec: must be a YAML map"),
        ("name: x@2\nextends: python3\nsteps: [{run: ls}]\n", "spec.yaml:1: name: an environment name"),
    ],
)
def test_a_bad_spec_names_file_line_field_and_problem(text: str, expected: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse(text, "spec.yaml")
    assert expected in info.value.message, info.value.message
    assert info.value.status == 422
