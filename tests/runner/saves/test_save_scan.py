"""What a save leaves out and refuses (issue 8 item 5, issue 9 item 3, R35), without Docker:
the scanner on its own, then the save path on the fake backend."""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from envs.kit.db import Database
from envs.kit.errors import InvalidInputError
from envs.models import EnvironmentVersion
from runner.runtimes.states import State
from runner.saves.scans import CacheRules, SaveFilter, SecretScan, check_allowed
from runner.service import RunnerService
from tests.runner.conftest import seed

Make = Callable[..., RunnerService]
SECRET = "hunter2-Sup3r/Secret+Value"
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def scanned(files: dict[str, bytes], values: tuple[str, ...] = (), chunk: int = 5) -> dict[str, list[str]]:
    scan = SecretScan(values)
    for path, data in files.items():
        scan.entry(path)
        sink = scan.content(path, len(data))
        assert sink is not None
        for at in range(0, len(data), chunk):
            sink.feed(data[at : at + chunk])
        sink.close()
    return {p: f.found for p, f in scan.findings.items()}


def test_a_secret_value_is_found_plain_base64_at_every_offset_and_url_encoded() -> None:
    for prefix in ("", "a", "ab", "abc", "xyzw"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            blob = encode(f"{prefix}{SECRET} and more".encode())
            assert scanned({"/f": blob}, (SECRET,)) == {"/f": ["secret value (base64)"]}, (prefix, encode)
    assert scanned({"/q": f"token={urllib.parse.quote(SECRET, safe='')}".encode()}, (SECRET,)) == {
        "/q": ["secret value (URL-encoded)"]
    }
    assert scanned({"/p": b"x" * 3 + SECRET.encode()}, (SECRET,), chunk=2) == {"/p": ["secret value"]}
    assert scanned({f"/root/{SECRET}": b"nothing"}, (SECRET,)) == {f"/root/{SECRET}": ["secret value in the name"]}
    assert scanned({"/clean": b"ordinary text " * 100}, (SECRET,)) == {}


def test_credential_files_are_found_by_path_and_private_keys_and_docker_auths_by_content() -> None:
    found = scanned(
        {
            "/root/.aws/credentials": b"[default]\naws_secret_access_key = x\n",
            "/home/ann/.netrc": b"machine h login a password b\n",
            "/root/.git-credentials": b"https://a:b@example.com\n",
            "/root/.pypirc": b"[pypi]\npassword = x\n",
            "/opt/deploy/id_rsa.bak": b"junk\n" + KEY,
            "/root/.docker/config.json": json.dumps({"auths": {"r.example": {"auth": "YTpi"}}}).encode(),
            "/home/ann/.docker/config.json": json.dumps({"auths": {"r.example": {}}, "credsStore": "pass"}).encode(),
            "/usr/share/doc/pem.txt": b"-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n",
            "/root/.netrc.d/empty": b"",
        },
        chunk=7,  # the key's marker straddles chunk edges
    )
    assert found == {
        "/root/.aws/credentials": ["AWS credentials file"],
        "/home/ann/.netrc": ["netrc credentials file"],
        "/root/.git-credentials": ["git credentials file"],
        "/root/.pypirc": ["PyPI credentials file"],
        "/opt/deploy/id_rsa.bak": ["private key"],
        "/root/.docker/config.json": ["registry credentials in .docker/config.json"],
    }


def test_cache_rules_cover_every_home_and_only_what_lies_inside_a_cache() -> None:
    rules = CacheRules.of(["/var/lib/apt/lists", "~/.cache/pip", "~/.npm"])
    assert rules.cache_of("/var/lib/apt/lists/deb.debian.org_Packages") == "/var/lib/apt/lists"
    assert rules.cache_of("/var/lib/apt/lists") is None  # the directory itself stays
    assert rules.cache_of("/root/.cache/pip/http/a/b") == "/root/.cache/pip"
    assert rules.cache_of("/home/ann/.npm/_cacache/x") == "/home/ann/.npm"
    assert rules.cache_of("/home/ann/work/.npm/x") is None
    assert rules.cache_of("/var/lib/apt/listsX/y") is None


def test_allow_secrets_paths_must_be_plain_absolute_paths() -> None:
    assert check_allowed(["/root/.netrc"]) == ["/root/.netrc"]
    for bad in ("root/.netrc", "/root/../etc/x", "/root/", "/a\0b", "/a//b"):
        with pytest.raises(InvalidInputError, match=r"allow_secrets\[0\]"):
            check_allowed([bad])


def test_a_refusal_names_paths_and_kinds_never_the_value() -> None:
    observer = SaveFilter(None, (SECRET,), allow=["/root/ok-to-keep"])
    for path in ("/root/leak.txt", "/root/ok-to-keep"):
        sink = observer.content(path, 100)
        assert sink is not None
        sink(base64.b64encode(SECRET.encode()))
        sink(b"")
    with pytest.raises(Exception) as refused:
        observer.verdict()
    error = refused.value
    assert getattr(error, "code", None) == "save_has_secrets" and getattr(error, "status", None) == 409
    assert error.details["findings"] == [{"path": "/root/leak.txt", "found": ["secret value (base64)"]}]  # type: ignore[attr-defined]
    text = json.dumps(error.to_dict())  # type: ignore[attr-defined]
    assert "/root/leak.txt" in text and SECRET not in text and base64.b64encode(SECRET.encode()).decode() not in text
    assert observer.allowed() == [{"path": "/root/ok-to-keep", "found": ["secret value (base64)"]}]


# ------------------------------------------------------------------ the save path, fake backend
def _running(svc: RunnerService, owner: str, files: dict[str, bytes]) -> str:
    rt = svc.create(owner, name="saver", environment="python3")
    svc.start(owner, rt.id)
    assert svc.wait_for(rt.id, {State.RUNNING, State.ERROR}, 20).state == State.RUNNING
    svc.backend.set_files(rt.id, files)  # type: ignore[attr-defined]
    return rt.id


def _save(svc: RunnerService, owner: str, rid: str, **options: object):  # type: ignore[no-untyped-def]
    op = svc.snapshots.save(owner, "alice", rid, environment="tools", **options)  # type: ignore[arg-type]
    return svc.operations.wait(owner, op.id, 20)


def test_a_save_leaves_caches_out_says_how_much_and_keeps_them_when_asked(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    files = {
        "/var/cache/apt/archives/jq.deb": b"d" * 3000,
        "/var/lib/apt/lists/deb_Packages": b"p" * 5000,
        "/root/.cache/pip/http/x": b"w" * 700,
        "/root/work.txt": b"kept",
    }
    rid = _running(svc, owner, files)
    lean = _save(svc, owner, rid)
    assert lean.status == "succeeded", lean.error
    assert lean.result["left_out"] == {
        "/var/cache/apt": {"bytes": 3000, "files": 1},
        "/var/lib/apt/lists": {"bytes": 5000, "files": 1},
        "/root/.cache/pip": {"bytes": 700, "files": 1},
    }
    assert lean.result["left_out_bytes"] == 8700 and lean.result["caches_kept"] is False
    assert "left out 8700 bytes of caches" in lean.message
    kept = _save(svc, owner, rid, keep_caches=True)
    assert kept.status == "succeeded" and kept.result["left_out"] == {} and kept.result["caches_kept"] is True
    with runner_db.session() as s:
        v1 = s.query(EnvironmentVersion).filter_by(image_id=lean.result["image_id"]).one()
        assert v1.labels["envctl.save"]["left_out_bytes"] == 8700


def test_a_save_holding_a_credential_file_is_refused_and_nothing_is_lost_until_allowed(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    rid = _running(svc, owner, {"/root/.git-credentials": b"https://me:tok@example.com\n", "/root/a.txt": b"a"})
    refused = _save(svc, owner, rid)
    assert refused.status == "failed" and refused.error is not None
    assert refused.error["code"] == "save_has_secrets"
    found = [{"path": "/root/.git-credentials", "found": ["git credentials file"]}]
    assert refused.error["details"]["findings"] == found
    assert "tok@" not in json.dumps(refused.error)
    assert svc.get(owner, rid).state == State.RUNNING  # the runtime and its changes stay
    assert [e.event for e in svc.log_entries(owner, rid)][-1] == "save-failed"
    with runner_db.session() as s:
        assert s.query(EnvironmentVersion).filter(EnvironmentVersion.image_ref.like("envctl/tools%")).count() == 0
    allowed = _save(svc, owner, rid, allow_secrets=["/root/.git-credentials"])
    assert allowed.status == "succeeded", allowed.error
    record = [{"path": "/root/.git-credentials", "found": ["git credentials file"]}]
    assert allowed.result["allowed_secrets"] == record
    with runner_db.session() as s:
        assert (
            s.query(EnvironmentVersion)
            .filter_by(image_id=allowed.result["image_id"])
            .one()
            .labels["envctl.save"]["allowed_secrets"]
            == record
        )


def test_the_runtimes_secret_values_come_through_one_function_and_refuse_the_save(
    make_runner: Make, runner_db: Database
) -> None:
    owner = seed(runner_db)
    svc = make_runner()
    svc.snapshots.secret_values = lambda runtime_id: [SECRET]
    rid = _running(svc, owner, {"/root/notes": b"key: " + base64.b64encode(SECRET.encode()) + b"\n"})
    refused = _save(svc, owner, rid)
    assert refused.status == "failed" and refused.error is not None
    assert refused.error["details"]["findings"] == [{"path": "/root/notes", "found": ["secret value (base64)"]}]
    logged = json.dumps([e.message for e in svc.log_entries(owner, rid)] + [refused.message])
    assert SECRET not in logged and base64.b64encode(SECRET.encode()).decode() not in logged


def test_the_grep_prefilter_finds_what_reading_every_file_finds(tmp_path: Path) -> None:
    """A layer's files scanned where they lie: with GNU grep naming the files that hold a
    needle first (the helper's tree), the findings are those of reading every file in Python."""
    import os
    import shutil

    from runner.backends import overlay

    if shutil.which("grep") is None:
        pytest.skip("GNU grep is not installed")
    tree = tmp_path / "tree"
    secret_b64 = base64.b64encode(b"ab" + SECRET.encode() + b"cd")
    files = {
        "root/clean.bin": os.urandom(3 << 20),
        "root/plain.txt": b"x" * ((1 << 20) - 5) + SECRET.encode() + b"\n",  # across a chunk's edge
        "root/b64.bin": os.urandom(1 << 20) + secret_b64 + os.urandom(100),
        "root/.ssh/id_ed25519": KEY,
        "root/.docker/config.json": json.dumps({"auths": {"r.example": {"auth": "dTpw"}}}).encode(),
        "root/.netrc": b"machine h login u password p\n",
        "etc/quoted": f"t={urllib.parse.quote(SECRET, safe='')}".encode(),
        f"root/{SECRET}-named": b"nothing",
    }
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    plan = overlay.plan_layer([str(tree)], SaveFilter(None), private=lambda _p: False)
    findings = []
    for tree_given in (str(tree), None):
        observer = SaveFilter(None, [SECRET])
        for info, _source in plan.entries:
            observer.entry("/" + info.name.rstrip("/"))
        overlay.scan_files(plan, observer, tree_given)
        findings.append({p: f.found for p, f in observer.scan.findings.items()})
    assert findings[0] == findings[1]
    assert set(findings[0]) == {
        "/root/plain.txt",
        "/root/b64.bin",
        "/root/.ssh/id_ed25519",
        "/root/.docker/config.json",
        "/root/.netrc",
        "/etc/quoted",
        f"/root/{SECRET}-named",
    }
    assert overlay.grep_files(str(tree), [b"no such needle anywhere"]) == set()
    values_with_a_line_break = SaveFilter(None, ["line\nbreak"])
    assert values_with_a_line_break.needles() is None  # every file is then read in Python
