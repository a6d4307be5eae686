"""Git mounts: one mirror clone per URL in a shared cache, and one read-only tree per commit.

``<data dir>/mounts/git/repos/<hash of URL>.git`` is a ``git clone --mirror``, fetched again
at each boot that uses it; ``<data dir>/mounts/git/trees/<commit>`` holds that commit's files
(``git archive``, unpacked in Python with tarfile's ``data`` filter), bind-mounted read-only.

git always runs with a fixed argv (never a shell), ``--`` before the URL, an empty global and
system configuration, no terminal prompt, no hooks, redirects refused, and only https allowed
(plain http only for a host that the ``mounts_allow_hosts`` setting names). The host is
checked again here (R28) and, unless allowed by name, curl is pinned to the addresses that
were checked (``http.curloptResolve``), so a DNS answer that changes in between cannot point
git at a private address.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from envs.kit.hosts import Resolver, check_host, system_resolver
from runner.mounts.cache import locked
from runner.mounts.errors import MountFetchError
from runner.mounts.validate import GitMount

GIT_TIMEOUT = 600.0  # seconds one git command may take
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class GitCache:
    def __init__(
        self, root: Path, allow_hosts: Sequence[str] = (), resolve: Resolver = system_resolver, git: str = "git"
    ) -> None:
        self.root = root
        self.allow_hosts = frozenset(h.lower() for h in allow_hosts)
        self.resolve = resolve
        self.git = git

    def repo_dir(self, url: str) -> Path:
        return self.root / "repos" / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".git")

    def tree_dir(self, commit: str) -> Path:
        return self.root / "trees" / commit

    def config_args(self, url: str) -> list[str]:
        """git's ``-c`` options for one fetch of ``url``."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        allowed = host.lower() in self.allow_hosts
        options = [
            "protocol.allow=never",
            "protocol.https.allow=always",
            *(["protocol.http.allow=always"] if allowed and parts.scheme == "http" else []),
            "http.followRedirects=false",
            "core.hooksPath=/dev/null",
            "credential.helper=",
            "core.askPass=",
            "transfer.fsckObjects=true",
        ]
        if not allowed:
            # resolved once: the addresses checked are the ones curl is pinned to
            addresses = sorted(self.resolve(host))
            check_host(host, "url", lambda _host: addresses, self.allow_hosts)
            if addresses:  # none for an IP literal: curl connects to it as checked
                pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
                options.append(f"http.curloptResolve={host}:{parts.port or 443}:{pinned}")
        return [arg for opt in options for arg in ("-c", opt)]

    def environment(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ASKPASS": "",
            "SSH_ASKPASS": "",
            "GIT_PROTOCOL_FROM_USER": "0",
            "LC_ALL": "C",
        }

    def _run(
        self, argv: list[str], what: str, url: str, stdout: BinaryIO | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            done = subprocess.run(  # noqa: S603 - a fixed argv, the URL after --
                [self.git, *argv],
                env=self.environment(),
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=GIT_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MountFetchError(f"git could not {what} {url}: {exc}", details={"url": url}) from exc
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip()[-500:]
            raise MountFetchError(f"git could not {what} {url}: {err}", details={"url": url, "stderr": err})
        return done

    def fetch(self, url: str) -> Path:
        """The URL's mirror clone, brought up to date."""
        repo = self.repo_dir(url)
        config = self.config_args(url)
        with locked(repo.with_suffix(".lock")):
            if (repo / "HEAD").exists():
                self._run([*config, "-C", str(repo), "fetch", "--prune", "--quiet", "origin"], "fetch", url)
            else:
                tmp = Path(tempfile.mkdtemp(prefix=".clone-", dir=repo.parent))
                try:
                    self._run([*config, "clone", "--mirror", "--quiet", "--", url, str(tmp / "r")], "clone", url)
                    (tmp / "r").rename(repo)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        return repo

    def resolve_ref(self, repo: Path, ref: str, url: str) -> str:
        """The commit ``ref`` names (the default branch for "")."""
        name = f"{ref or 'HEAD'}^{{commit}}"
        argv = ["-C", str(repo), "rev-parse", "--verify", "--quiet", "--end-of-options", name]
        try:
            commit = self._run(argv, f"find {ref or 'the default branch'} in", url).stdout.decode().strip()
        except MountFetchError as exc:
            raise MountFetchError(
                f"{url} has no branch, tag or commit {ref or 'HEAD'!r}", details={"url": url, "ref": ref}
            ) from exc
        if not _COMMIT_RE.fullmatch(commit):
            raise MountFetchError(f"git named no commit for {ref!r} in {url}", details={"url": url, "ref": ref})
        return commit

    def tree(self, repo: Path, commit: str, url: str) -> Path:
        """The commit's files, unpacked once into the shared cache."""
        out = self.tree_dir(commit)
        if out.is_dir():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tree-", dir=out.parent))
        try:
            archive = tmp / "a.tar"
            with open(archive, "wb") as fh:
                self._run(["-C", str(repo), "archive", "--format=tar", commit], "unpack", url, stdout=fh)
            files = tmp / "files"
            files.mkdir()
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(files, filter="data")  # no links out, no devices, no absolute paths
            except (tarfile.TarError, OSError) as exc:
                raise MountFetchError(
                    f"the files of {url} at {commit[:12]} cannot be mounted: {exc}", details={"url": url}
                ) from exc
            with contextlib.suppress(OSError):  # another boot unpacked it meanwhile: keep theirs
                files.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def prepare(self, mount: GitMount) -> tuple[Path, str]:
        """The host directory to bind at the mount's target, and the commit it holds."""
        repo = self.fetch(mount.url)
        commit = self.resolve_ref(repo, mount.ref, mount.url)
        return self.tree(repo, commit, mount.url), commit
