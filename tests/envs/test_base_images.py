"""Base images: recipes as data (pure, fast) and real builds in Docker (marked ``docker``).

The Docker tests build the shipped ``bash`` and ``python3`` images when they are missing (a few
minutes: debootstrap plus apt) and reuse them otherwise. The images are the product, not test
debris, so they stay; everything else a test makes (build containers, failed images) is gone
at the end.
"""

from __future__ import annotations

import base64
import shutil
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from envs.base import build as builder
from envs.base import hierarchy, host
from envs.base.progress import BuildEvent
from envs.kit.errors import BackendError, InvalidInputError
from tests.conftest import TEST_LABEL, TEST_SESSION

MIRROR = "http://deb.debian.org/debian"
ROOT = """\
debootstrap:
  suite: bookworm
  variant: minbase
  include: [bash]
"""
CHILD = """\
steps:
  - echo hello
"""


def tree(root: Path, hierarchy: str, recipes: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "hierarchy.yaml").write_text(textwrap.dedent(hierarchy))
    for name, text in recipes.items():
        (root / name).mkdir()
        (root / name / "recipe.yaml").write_text(textwrap.dedent(text))
    return root


def family(root: Path) -> Path:
    return tree(
        root,
        "base: null\nmiddle: base\nleaf: middle\nother: base\n",
        {"base": ROOT, "middle": CHILD, "leaf": CHILD, "other": CHILD},
    )


# ------------------------------------------------------------------------- recipes (pure)


def test_load_hierarchy_lists_parents_before_children(tmp_path: Path) -> None:
    root = tree(tmp_path, "child: base\nbase: null\n", {"base": ROOT, "child": CHILD})
    recipes = hierarchy.load_hierarchy(root, MIRROR)
    assert list(recipes) == ["base", "child"]
    assert recipes["base"].parent is None
    assert recipes["child"].parent == "base"
    assert recipes["child"].directory == root / "child"
    assert all(r.digest.startswith("sha256:") and len(r.digest) == 71 for r in recipes.values())


def test_same_inputs_give_the_same_digest(tmp_path: Path) -> None:
    one = hierarchy.load_hierarchy(family(tmp_path / "one"), MIRROR)
    two = hierarchy.load_hierarchy(family(tmp_path / "two"), MIRROR + "/")
    assert {n: r.digest for n, r in one.items()} == {n: r.digest for n, r in two.items()}


def test_digest_covers_recipe_files_mirror_and_suite(tmp_path: Path) -> None:
    root = family(tmp_path)
    before = hierarchy.load_hierarchy(root, MIRROR)["base"].digest
    assert hierarchy.load_hierarchy(root, "http://mirror.example/debian")["base"].digest != before

    (root / "base" / "verify").write_text("#!/bin/sh\ntrue\n")
    with_verify = hierarchy.load_hierarchy(root, MIRROR)["base"].digest
    assert with_verify != before

    (root / "base" / "recipe.yaml").write_text(ROOT.replace("bookworm", "trixie"))
    assert hierarchy.load_hierarchy(root, MIRROR)["base"].digest not in {before, with_verify}


def test_readme_is_not_part_of_the_digest(tmp_path: Path) -> None:
    root = family(tmp_path)
    before = hierarchy.load_hierarchy(root, MIRROR)
    (root / "middle" / "README.md").write_text("# middle\n")
    assert hierarchy.load_hierarchy(root, MIRROR) == before


def test_changing_a_parent_changes_every_descendant(tmp_path: Path) -> None:
    root = family(tmp_path)
    before = hierarchy.load_hierarchy(root, MIRROR)
    (root / "middle" / "recipe.yaml").write_text(CHILD + "  - echo more\n")
    after = hierarchy.load_hierarchy(root, MIRROR)
    assert after["base"].digest == before["base"].digest
    assert after["other"].digest == before["other"].digest
    assert after["middle"].digest != before["middle"].digest
    assert after["leaf"].digest != before["leaf"].digest


def test_unknown_parent_is_rejected_naming_file_line_and_known_images(tmp_path: Path) -> None:
    root = tree(tmp_path, "base: null\nchild: bsae\n", {"base": ROOT, "child": CHILD})
    with pytest.raises(InvalidInputError) as err:
        hierarchy.load_hierarchy(root, MIRROR)
    assert f"{root / 'hierarchy.yaml'}:2: child: unknown parent 'bsae'" in str(err.value)
    assert "known: base, child" in str(err.value)


def test_parent_cycle_is_rejected(tmp_path: Path) -> None:
    root = tree(tmp_path, "a: b\nb: c\nc: a\n", {"a": CHILD, "b": CHILD, "c": CHILD})
    with pytest.raises(InvalidInputError, match=r"parent cycle: a -> b -> c -> a"):
        hierarchy.load_hierarchy(root, MIRROR)


def test_image_that_is_its_own_parent_is_a_cycle(tmp_path: Path) -> None:
    root = tree(tmp_path, "a: a\n", {"a": CHILD})
    with pytest.raises(InvalidInputError, match="parent cycle: a -> a"):
        hierarchy.load_hierarchy(root, MIRROR)


def test_missing_recipe_is_rejected(tmp_path: Path) -> None:
    root = tree(tmp_path, "base: null\nchild: base\n", {"base": ROOT})
    with pytest.raises(InvalidInputError, match=r"hierarchy.yaml:2: child: missing recipe"):
        hierarchy.load_hierarchy(root, MIRROR)
    (root / "child").mkdir()
    with pytest.raises(InvalidInputError, match=r"missing recipe: no .*child/recipe.yaml"):
        hierarchy.load_hierarchy(root, MIRROR)


def test_missing_hierarchy_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="hierarchy.yaml: file missing"):
        hierarchy.load_hierarchy(tmp_path, MIRROR)


def test_invalid_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    root = tree(tmp_path, "base: null\n", {"base": "debootstrap:\n  suite: [bookworm\n"})
    with pytest.raises(InvalidInputError, match=r"base/recipe.yaml:\d+: not valid YAML"):
        hierarchy.load_hierarchy(root, MIRROR)


def test_duplicate_image_in_hierarchy_is_rejected(tmp_path: Path) -> None:
    root = tree(tmp_path, "base: null\nbase: null\n", {"base": ROOT})
    with pytest.raises(InvalidInputError, match=r"hierarchy.yaml:2: base: appears twice"):
        hierarchy.load_hierarchy(root, MIRROR)


@pytest.mark.parametrize("name", ["Bash", "my image", "../up", "-x"])
def test_image_names_must_be_docker_repository_names(tmp_path: Path, name: str) -> None:
    """R30."""
    (tmp_path / "hierarchy.yaml").write_text(f"'{name}': null\n")
    with pytest.raises(InvalidInputError, match="image names are lowercase"):
        hierarchy.load_hierarchy(tmp_path, MIRROR)


@pytest.mark.parametrize(
    ("recipe", "problem"),
    [
        (CHILD, "steps: not a field of a root image"),
        ("debootstrap: {variant: minbase}\n", "debootstrap.suite: must be a suite name"),
        ("debootstrap: {suite: bookworm, include: ['bash; rm -rf /']}\n", "invalid entry"),
        ("debootstrap: {suite: bookworm}\ncleanup: [../../etc]\n", "must be a relative path"),
        (ROOT + "config: {env: {PATH: '$HOME'}}\n", "config.env.PATH: must be a string"),
        (ROOT + "config: {user: root}\n", "config: may hold only 'env' and 'cmd'"),
    ],
)
def test_invalid_root_recipes_are_rejected(tmp_path: Path, recipe: str, problem: str) -> None:
    root = tree(tmp_path, "base: null\n", {"base": recipe})
    with pytest.raises(InvalidInputError, match=problem.replace("(", r"\(").replace("$", r"\$")):
        hierarchy.load_hierarchy(root, MIRROR)


@pytest.mark.parametrize(
    ("recipe", "problem"),
    [
        (ROOT, "debootstrap: not a field of a child image"),
        ("steps: []\n", "needs at least one step"),
        ("steps: apt-get update\n", "steps: must be a list of non-empty strings"),
    ],
)
def test_invalid_child_recipes_are_rejected(tmp_path: Path, recipe: str, problem: str) -> None:
    root = tree(tmp_path, "base: null\nchild: base\n", {"base": ROOT, "child": recipe})
    with pytest.raises(InvalidInputError, match=problem):
        hierarchy.load_hierarchy(root, MIRROR)


@pytest.mark.parametrize("mirror", ["ftp://x/debian", "deb.debian.org", "http://a b/", "http://"])
def test_invalid_mirror_is_rejected_naming_the_field(tmp_path: Path, mirror: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        hierarchy.load_hierarchy(family(tmp_path), mirror)
    assert err.value.field == "mirror"


def test_build_order_adds_ancestors_parents_first(tmp_path: Path) -> None:
    recipes = hierarchy.load_hierarchy(family(tmp_path), MIRROR)
    assert [r.name for r in hierarchy.build_order(recipes, ["leaf"])] == ["base", "middle", "leaf"]
    assert [r.name for r in hierarchy.build_order(recipes, ["other", "base"])] == ["base", "other"]
    assert [r.name for r in hierarchy.build_order(recipes, ["leaf", "middle"])] == [
        "base",
        "middle",
        "leaf",
    ]


def test_build_order_of_none_is_every_image(tmp_path: Path) -> None:
    recipes = hierarchy.load_hierarchy(family(tmp_path), MIRROR)
    assert [r.name for r in hierarchy.build_order(recipes, None)] == ["base", "middle", "leaf", "other"]


def test_build_order_rejects_an_unknown_name_listing_the_known_ones(tmp_path: Path) -> None:
    recipes = hierarchy.load_hierarchy(family(tmp_path), MIRROR)
    with pytest.raises(InvalidInputError) as err:
        hierarchy.build_order(recipes, ["leaf", "nope"])
    assert "unknown base image 'nope'; known: base, leaf, middle, other" in str(err.value)
    assert err.value.field == "names"


def test_build_rejects_bad_input_before_calling_docker(tmp_path: Path) -> None:
    no_docker: Any = object()  # any use would raise AttributeError
    root = family(tmp_path)
    with pytest.raises(InvalidInputError, match="unknown base image"):
        builder.build(["nope"], client=no_docker, recipes_dir=root, mirror=MIRROR)
    with pytest.raises(InvalidInputError, match="mirror"):
        builder.build(None, client=no_docker, recipes_dir=root, mirror="file:///srv")


def test_default_recipes_dir_is_the_repository_folder_unless_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(hierarchy.RECIPES_DIR_ENV, raising=False)
    assert hierarchy.default_recipes_dir() == Path(__file__).resolve().parents[2] / "base-images"
    monkeypatch.setenv(hierarchy.RECIPES_DIR_ENV, str(tmp_path))
    assert hierarchy.default_recipes_dir() == tmp_path


def test_shipped_recipes_load_and_each_has_a_verify_script_and_readme() -> None:
    root = Path(__file__).resolve().parents[2] / "base-images"
    recipes = hierarchy.load_hierarchy(root, MIRROR)
    assert recipes["bash"].parent is None
    assert recipes["python3"].parent == "bash"
    for recipe in recipes.values():
        assert (recipe.directory / "verify").stat().st_mode & 0o111, recipe.name
        assert (recipe.directory / "README.md").is_file(), recipe.name


def test_a_second_builder_of_the_same_recipe_waits_for_the_first(tmp_path: Path) -> None:
    recipe = hierarchy.load_hierarchy(family(tmp_path), MIRROR)["base"]
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with builder._build_lock(recipe, "debootstrap", lambda e: None):
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    events: list[BuildEvent] = []
    with builder._build_lock(recipe, "debootstrap", events.append):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert [e.message for e in events] == ["waiting for another build of this recipe"]


# ------------------------------------------------------------------------- mirror (pure)


def apt_config(etc: Path, files: dict[str, str], *, os_id: str = "debian") -> Path:
    """An /etc with os-release and the given files under apt/."""
    (etc / "apt" / "sources.list.d").mkdir(parents=True)
    (etc / "os-release").write_text(f"ID={os_id}\nVERSION_CODENAME=bookworm\n")
    for name, text in files.items():
        (etc / "apt" / name).write_text(textwrap.dedent(text))
    return etc


def test_mirror_comes_from_deb822_sources(tmp_path: Path) -> None:
    etc = apt_config(
        tmp_path,
        {
            "sources.list.d/debian.sources": """\
            Types: deb
            URIs: http://mirror.example/debian-security
            Suites: bookworm-security
            Components: main

            Types: deb deb-src
            # a comment
            URIs: https://mirror.example/debian/
            Suites: bookworm bookworm-updates
            Components: main
            """
        },
    )
    assert host._mirror_from_apt_config(etc) == "https://mirror.example/debian"


def test_mirror_comes_from_a_one_line_sources_list(tmp_path: Path) -> None:
    etc = apt_config(
        tmp_path,
        {
            "sources.list": """\
            # deb http://commented.example/debian bookworm main
            deb [signed-by=/usr/share/keyrings/x.gpg] http://ftp.example/debian bookworm main
            deb http://ftp.example/debian bookworm-updates main
            """
        },
    )
    assert host._mirror_from_apt_config(etc) == "http://ftp.example/debian"


def test_mirror_prefers_the_release_suite_over_third_party_sources(tmp_path: Path) -> None:
    etc = apt_config(
        tmp_path,
        {
            "sources.list.d/a.list": "deb https://deb.nodesource.com/node_20.x nodistro main\n",
            "sources.list.d/b.sources": """\
            Types: deb
            URIs: http://local.example/debian
            Suites: bookworm
            Enabled: no

            Types: deb
            URIs: http://deb.debian.org/debian
            Suites: bookworm
            """,
        },
    )
    assert host._mirror_from_apt_config(etc) == "http://deb.debian.org/debian"


def test_mirror_falls_back_off_debian_or_without_sources(tmp_path: Path) -> None:
    ubuntu = apt_config(
        tmp_path / "u",
        {"sources.list": "deb http://archive.ubuntu.com/ubuntu jammy main\n"},
        os_id="ubuntu",
    )
    assert host._mirror_from_apt_config(ubuntu) == host.FALLBACK_MIRROR
    assert host._mirror_from_apt_config(apt_config(tmp_path / "e", {})) == host.FALLBACK_MIRROR


def test_default_mirror_is_an_http_url() -> None:
    assert host.default_mirror().startswith(("http://", "https://"))


# ------------------------------------------------------------- extra CA certificates (pure)


def pem(seed: str) -> str:
    """A PEM block around a DER-shaped body (a SEQUENCE): what the checks look at."""
    der = b"\x30\x82" + len(seed).to_bytes(2, "big") + seed.encode()
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----"]) + "\n"


def ca_dir(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


#: The digest of family()'s root as envctl computed it before extra CA certificates existed.
DIGEST_BEFORE_EXTRA_CAS = "sha256:3b6116e1a46de95a99f07c037fc6db0fd8ce64927548f779d91a30d022a72d6a"


def test_no_extra_ca_certificates_leave_every_digest_as_it_was(tmp_path: Path) -> None:
    root = family(tmp_path / "recipes")
    plain = hierarchy.load_hierarchy(root, MIRROR)
    assert plain["base"].digest == DIGEST_BEFORE_EXTRA_CAS
    assert hierarchy.load_hierarchy(root, MIRROR, []) == plain
    empty = host.read_extra_ca_certs([ca_dir(tmp_path / "cas", {"README": "no certificates here"})])
    assert empty == ()
    assert hierarchy.load_hierarchy(root, MIRROR, empty) == plain
    assert hierarchy._recipe_digest("base", root / "base", "", MIRROR, "bookworm", []) == DIGEST_BEFORE_EXTRA_CAS


def test_an_extra_ca_certificate_changes_the_root_and_every_descendant(tmp_path: Path) -> None:
    root = family(tmp_path / "recipes")
    plain = hierarchy.load_hierarchy(root, MIRROR)
    certs = host.read_extra_ca_certs([ca_dir(tmp_path / "cas", {"proxy.crt": pem("proxy")})])
    with_ca = hierarchy.load_hierarchy(root, MIRROR, certs)
    for name in plain:
        assert with_ca[name].digest != plain[name].digest, name
    assert [c.name for c in with_ca["base"].extra_ca_certs] == ["proxy.crt"]
    assert with_ca["middle"].extra_ca_certs == ()  # children get them through their parent's layer


def test_a_changed_or_renamed_extra_ca_certificate_changes_the_digest(tmp_path: Path) -> None:
    root = family(tmp_path / "recipes")
    cas = ca_dir(tmp_path / "cas", {"proxy.crt": pem("proxy")})

    def digest() -> str:
        return hierarchy.load_hierarchy(root, MIRROR, host.read_extra_ca_certs([cas]))["base"].digest

    first = digest()
    assert digest() == first
    (cas / "proxy.crt").write_text(pem("another proxy"))
    second = digest()
    assert second != first
    (cas / "proxy.crt").rename(cas / "corp.crt")
    assert digest() not in {first, second}


def test_extra_ca_certificates_are_sorted_by_name_whatever_the_path_order(tmp_path: Path) -> None:
    one = ca_dir(tmp_path / "one", {"b.crt": pem("b")})
    two = ca_dir(tmp_path / "two", {"a.crt": pem("a")})
    forward = host.read_extra_ca_certs([one, two])
    assert [c.name for c in forward] == ["a.crt", "b.crt"]
    assert host.read_extra_ca_certs([two, one]) == forward
    root = family(tmp_path / "recipes")
    assert hierarchy.load_hierarchy(root, MIRROR, forward) == hierarchy.load_hierarchy(root, MIRROR, forward[::-1])


def test_folders_give_only_their_crt_files_and_named_files_count_as_named(tmp_path: Path) -> None:
    cas = ca_dir(
        tmp_path / "cas",
        {
            "proxy.crt": pem("proxy"),
            "bundle.pem": pem("pem"),
            "README": "not a certificate",
            ".hidden.crt": "not looked at",
            "corp/root ca.crt": pem("corp"),
        },
    )
    named = ca_dir(tmp_path / "named", {"extra.pem": "comment line\n" + pem("x") + pem("y")})
    certs = host.read_extra_ca_certs([cas, named / "extra.pem"])
    assert [(c.name, c.source) for c in certs] == [
        ("corp-root_ca.crt", cas / "corp" / "root ca.crt"),
        ("extra.pem.crt", named / "extra.pem"),
        ("proxy.crt", cas / "proxy.crt"),
    ]
    # only the certificate blocks are kept, as plain PEM
    assert certs[1].pem == (pem("x") + pem("y")).encode()


def test_the_same_certificate_named_twice_counts_once(tmp_path: Path) -> None:
    cas = ca_dir(tmp_path / "cas", {"proxy.crt": pem("proxy")})
    assert host.read_extra_ca_certs([cas, cas / "proxy.crt"]) == host.read_extra_ca_certs([cas])


def test_two_certificates_with_one_name_are_refused_naming_both(tmp_path: Path) -> None:
    one = ca_dir(tmp_path / "one", {"proxy.crt": pem("one")})
    two = ca_dir(tmp_path / "two", {"proxy.crt": pem("two")})
    with pytest.raises(InvalidInputError) as err:
        host.read_extra_ca_certs([one, two])
    assert str(two / "proxy.crt") in str(err.value) and str(one / "proxy.crt") in str(err.value)


def test_a_missing_named_path_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "proxy.crt"
    with pytest.raises(InvalidInputError) as err:
        host.read_extra_ca_certs([missing])
    assert f"{missing}: no such file or directory" in str(err.value)
    assert "ENVCTL_BASE_EXTRA_CA_CERTS" in str(err.value)
    assert err.value.field == "base_extra_ca_certs"
    assert err.value.details["path"] == str(missing)


def test_a_missing_default_folder_means_no_extra_certificates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "DEFAULT_EXTRA_CA_CERTS", tmp_path / "ca-certificates")
    assert host.read_extra_ca_certs([tmp_path / "ca-certificates"]) == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("just text\n", "not a PEM certificate"),
        ("-----BEGIN PRIVATE KEY-----\nMAo=\n-----END PRIVATE KEY-----\n", "not a PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nnot*base64\n-----END CERTIFICATE-----\n", "damaged PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n", "damaged PEM certificate"),
    ],
)
def test_a_file_that_is_not_a_pem_certificate_is_refused_naming_it(tmp_path: Path, text: str, problem: str) -> None:
    cas = ca_dir(tmp_path / "cas", {"good.crt": pem("good"), "bad.crt": text})
    with pytest.raises(InvalidInputError) as err:
        host.read_extra_ca_certs([cas])
    assert f"{cas / 'bad.crt'}: {problem}" in str(err.value)


def test_build_rejects_a_bad_extra_ca_certificate_before_calling_docker(tmp_path: Path) -> None:
    no_docker: Any = object()
    root = family(tmp_path / "recipes")
    with pytest.raises(InvalidInputError, match="no such file or directory"):
        builder.build(None, client=no_docker, recipes_dir=root, mirror=MIRROR, extra_ca_certs=[tmp_path / "gone.crt"])


def test_build_takes_the_extra_ca_certificates_from_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cas = ca_dir(tmp_path / "cas", {"proxy.crt": pem("proxy")})
    monkeypatch.delenv("ENVCTL_CONFIG", raising=False)
    monkeypatch.setenv("ENVCTL_BASE_EXTRA_CA_CERTS", f"{cas}:{tmp_path / 'gone.crt'}")
    assert host.default_extra_ca_certs() == (cas, tmp_path / "gone.crt")
    with pytest.raises(InvalidInputError, match="gone.crt: no such file"):
        builder.build(None, client=object(), recipes_dir=family(tmp_path / "recipes"), mirror=MIRROR)


# ------------------------------------------------------------------------- real builds


def shipped_recipes() -> dict[str, hierarchy.Recipe]:
    """The shipped recipes as ``build`` sees them: this machine's mirror and extra CAs."""
    certs = host.read_extra_ca_certs(host.default_extra_ca_certs())
    return hierarchy.load_hierarchy(hierarchy.default_recipes_dir(), host.default_mirror(), certs)


@pytest.fixture(scope="module")
def built(docker: Any) -> dict[str, Any]:
    """Build (or reuse) the shipped bash and python3 images once for this module."""
    events: list[BuildEvent] = []
    images = builder.build(["python3"], client=docker, progress=events.append)
    return {"images": {i.name: i for i in images}, "events": events}


@pytest.mark.docker
def test_build_returns_bash_then_python3_with_events(built: dict[str, Any]) -> None:
    images = built["images"]
    assert list(images) == ["bash", "python3"]
    for name in images:
        phases = [e.phase for e in built["events"] if e.image == name]
        assert phases[-1] in {"reuse", "done"}, phases
        if phases[-1] == "done":
            assert "verify" in phases


@pytest.mark.docker
def test_built_images_carry_labels_and_digest_tag(docker: Any, built: dict[str, Any]) -> None:
    recipes = shipped_recipes()
    for name, image in built["images"].items():
        attrs = docker.api.inspect_image(image.image_id)
        digest = recipes[name].digest
        assert image.recipe_digest == digest
        assert attrs["Config"]["Labels"] == {
            "envctl.base-image": name,
            "envctl.recipe-digest": digest,
            "envctl.parent-image": recipes[name].parent or "",
        }
        assert f"envctl-base/{name}:{digest[7:19]}" in attrs["RepoTags"]
        assert image.size == attrs["Size"] > 10_000_000


@pytest.mark.docker
def test_image_config_is_the_template_not_the_build_container(docker: Any, built: dict[str, Any]) -> None:
    """R10: the image configuration is the trusted template."""
    recipes = shipped_recipes()
    for name, image in built["images"].items():
        attrs = docker.api.inspect_image(image.image_id)
        config = attrs["Config"]
        assert sorted(config["Env"]) == sorted(hierarchy.image_config(recipes, recipes[name])["Env"])
        assert {"LANG=C.UTF-8", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"} <= set(
            config["Env"]
        )
        assert config["Cmd"] == ["/bin/bash"]
        assert config["WorkingDir"] == "/root"
        assert not config.get("Entrypoint")
        assert "envctl.build" not in config["Labels"]
        assert not (attrs.get("ContainerConfig") or {}).get("Labels")
        assert not (attrs.get("ContainerConfig") or {}).get("Cmd")


@pytest.mark.docker
def test_python3_is_one_layer_on_top_of_bash(docker: Any, built: dict[str, Any]) -> None:
    bash = docker.api.inspect_image(built["images"]["bash"].image_id)["RootFS"]["Layers"]
    python3 = docker.api.inspect_image(built["images"]["python3"].image_id)["RootFS"]["Layers"]
    assert len(bash) == 1
    assert python3[0] == bash[0]
    assert len(python3) == 2


@pytest.mark.docker
@pytest.mark.parametrize("name", ["bash", "python3"])
def test_verify_scripts_pass_inside_the_built_image(docker: Any, built: dict[str, Any], name: str) -> None:
    recipes = shipped_recipes()
    events: list[BuildEvent] = []
    builder.verify_image(recipes, name, built["images"][name].image_id, client=docker, progress=events.append)
    ran = [e.message for e in events if e.message.startswith("running ")]
    expected = ["running bash/verify"] + (["running python3/verify"] if name == "python3" else [])
    assert ran == expected
    assert any(f"{name} image ok" in e.message for e in events)


@pytest.mark.docker
def test_second_build_reuses_the_same_images(docker: Any, built: dict[str, Any]) -> None:
    events: list[BuildEvent] = []
    again = builder.build(list(built["images"]), client=docker, progress=events.append)
    assert [(i.name, i.image_id, i.reused) for i in again] == [
        (name, image.image_id, True) for name, image in built["images"].items()
    ]
    assert {e.phase for e in events} == {"reuse"}


@pytest.mark.docker
def test_a_commit_of_a_base_image_container_is_never_reused_as_the_base_image(
    docker: Any, built: dict[str, Any]
) -> None:
    """Someone's ``docker commit`` of a python3 container keeps python3's labels and is newer
    than the base image: a build still reuses the base image, and its tag stays where it was."""
    python3 = built["images"]["python3"]
    container = docker.containers.create(python3.image_id, ["true"], labels={TEST_LABEL: TEST_SESSION})
    try:
        commit = docker.api.commit(container.id, repository="envctl-test/commit", tag=TEST_SESSION)["Id"]
    finally:
        container.remove(force=True)
    try:
        again = builder.build(["python3"], client=docker, progress=lambda e: None)
        assert [(i.name, i.image_id) for i in again] == [(n, i.image_id) for n, i in built["images"].items()]
        tags = docker.api.inspect_image(commit)["RepoTags"]
        assert tags == [f"envctl-test/commit:{TEST_SESSION}"]
    finally:
        docker.api.remove_image(commit, force=True)


@pytest.mark.docker
def test_builds_leave_no_build_containers(docker: Any, built: dict[str, Any]) -> None:
    assert own_build_containers(docker) == []


def broken_child(root: Path, name: str, steps: list[str], verify: str | None = None) -> Path:
    """A recipe folder whose root is a copy of the shipped bash (same digest: reused)."""
    shutil.copytree(hierarchy.default_recipes_dir() / "bash", root / "bash")
    (root / "hierarchy.yaml").write_text(f"bash: null\n{name}: bash\n")
    (root / name).mkdir()
    (root / name / "recipe.yaml").write_text("steps:\n" + "".join(f"  - {s!r}\n" for s in steps))
    if verify is not None:
        (root / name / "verify").write_text(verify)
    return root


def remove_images_of(docker: Any, name: str) -> list[str]:
    found = docker.api.images(filters={"label": f"envctl.base-image={name}"})
    for image in found:
        docker.api.remove_image(image["Id"], force=True)
    return [i["Id"] for i in found]


@pytest.mark.docker
def test_failed_step_raises_with_its_output_and_leaves_nothing(
    docker: Any, built: dict[str, Any], tmp_path: Path
) -> None:
    name = "test-failing-step"
    root = broken_child(tmp_path, name, ["echo first-step", "echo marker-output >&2; exit 3"])
    try:
        with pytest.raises(BackendError) as err:
            builder.build([name], client=docker, recipes_dir=root)
        assert "step 2 failed (exit 3)" in str(err.value)
        assert "marker-output" in str(err.value)
        assert own_build_containers(docker) == []
    finally:
        assert remove_images_of(docker, name) == []


@pytest.mark.docker
def test_failed_verify_raises_and_removes_the_image(docker: Any, built: dict[str, Any], tmp_path: Path) -> None:
    name = "test-failing-verify"
    script = "#!/bin/sh\necho wrong-image-marker\nexit 4\n"
    root = broken_child(tmp_path, name, ["touch /etc/marker"], verify=script)
    try:
        with pytest.raises(BackendError) as err:
            builder.build([name], client=docker, recipes_dir=root)
        assert f"{name}/verify failed" in str(err.value)
        assert "(exit 4)" in str(err.value) and "wrong-image-marker" in str(err.value)
        assert own_build_containers(docker) == []
    finally:
        assert remove_images_of(docker, name) == []


def own_build_containers(docker: Any) -> list[Any]:
    """Build and verify containers this test process made (another build may run beside it)."""
    import os
    import socket

    mine = f"envctl.builder={socket.gethostname()}:{os.getpid()}"
    return list(docker.api.containers(all=True, filters={"label": ["envctl.build=1", mine]}))
