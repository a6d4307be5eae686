"""Git mounts' shared cache against a real git server on loopback (git http-backend): one
mirror per URL, one tree per commit, the ref resolved to the commit recorded, and the host
checked again before git runs (R28)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from envs.kit.errors import InvalidInputError
from runner.mounts.errors import MountFetchError
from runner.mounts.git import GitCache
from runner.mounts.validate import GitMount
from tests.fixtures.git_http import GitServer, commit, start_git_server


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    yield from start_git_server(tmp_path_factory.mktemp("git-server"))


def test_a_ref_is_fetched_once_into_the_cache_and_each_commit_gets_its_own_tree(
    git_server: GitServer, tmp_path: Path
) -> None:
    first = git_server.make_repo("code", {"README.md": "one\n", "pkg/mod.py": "X = 1\n"})
    url = f"{git_server.url}/code.git"
    cache = GitCache(tmp_path / "cache", allow_hosts=["127.0.0.1"])
    tree, sha = cache.prepare(GitMount(target="/mnt/code", url=url, ref="main"))
    assert sha == first
    assert (tree / "pkg" / "mod.py").read_text() == "X = 1\n" and not (tree / ".git").exists()
    second = commit(git_server.root / "code.git", {"README.md": "two\n"}, "second", tag="v2")
    tree2, sha2 = cache.prepare(GitMount(target="/mnt/code", url=url, ref="main"))
    assert sha2 == second and tree2 != tree
    assert (tree2 / "README.md").read_text() == "two\n" and (tree / "README.md").read_text() == "one\n"
    assert cache.prepare(GitMount(target="/m", url=url, ref="v2"))[1] == second
    assert cache.prepare(GitMount(target="/m", url=url, ref=first)) == (tree, first)
    assert cache.prepare(GitMount(target="/m", url=url))[1] == second  # the default branch
    assert len(list((tmp_path / "cache" / "repos").glob("*.git"))) == 1
    with pytest.raises(MountFetchError, match="no branch, tag or commit 'nope'"):
        cache.prepare(GitMount(target="/m", url=url, ref="nope"))
    with pytest.raises(MountFetchError, match="could not clone"):
        cache.prepare(GitMount(target="/m", url=f"{git_server.url}/missing.git"))


def test_a_loopback_host_not_allowed_is_refused_before_git_runs(git_server: GitServer, tmp_path: Path) -> None:
    git_server.make_repo("private", {"a": "1"})
    cache = GitCache(tmp_path / "cache", git="/nonexistent/git-must-not-run")
    for url in (f"{git_server.url}/private.git", "https://localhost/private.git", "https://[::1]/r.git"):
        with pytest.raises(InvalidInputError, match="loopback"):
            cache.prepare(GitMount(target="/m", url=url))
    assert not (tmp_path / "cache" / "repos").exists() or not any((tmp_path / "cache" / "repos").iterdir())


def test_git_runs_https_only_without_redirects_hooks_or_prompts_pinned_to_the_checked_addresses(
    tmp_path: Path,
) -> None:
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])  # a second lookup would be rebound to loopback
    cache = GitCache(tmp_path, resolve=lambda host: next(answers))
    options = cache.config_args("https://git.example.org/r.git")
    pairs = [options[i + 1] for i in range(0, len(options), 2)]
    assert options[::2] == ["-c"] * len(pairs)
    assert pairs[:2] == ["protocol.allow=never", "protocol.https.allow=always"]
    assert "protocol.http.allow=always" not in pairs
    assert {"http.followRedirects=false", "core.hooksPath=/dev/null", "credential.helper="} <= set(pairs)
    assert pairs[-1] == "http.curloptResolve=git.example.org:443:93.184.215.14"
    env = cache.environment()
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_CONFIG_GLOBAL"] == "/dev/null"


def test_a_commit_whose_links_point_outside_its_tree_is_not_mounted(git_server: GitServer, tmp_path: Path) -> None:
    url = f"{git_server.url}/links.git"
    commit(git_server.root / "links.git", {"ok.txt": "ok"}, "fine", links={"inside": "ok.txt"})
    cache = GitCache(tmp_path / "cache", allow_hosts=["127.0.0.1"])
    tree, _ = cache.prepare(GitMount(target="/m", url=url))
    assert (tree / "inside").read_text() == "ok"
    for target in ("/etc/passwd", "../../../../etc/passwd"):
        commit(git_server.root / "links.git", {}, "evil", links={f"evil{len(target)}": target})
        with pytest.raises(MountFetchError, match="cannot be mounted"):
            cache.prepare(GitMount(target="/m", url=url))
    assert not any(p.name.startswith("evil") for p in (tmp_path / "cache").rglob("*"))
