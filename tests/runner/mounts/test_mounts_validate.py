"""R28, R29: what a runtime's mounts may hold, checked before any network or git call."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from envs.kit.errors import InvalidInputError
from runner.mounts.validate import (
    GitMount,
    S3Mount,
    VolumeMount,
    check_mounts,
    describe,
    from_json,
    parse_option,
    to_json,
)

PUBLIC = "93.184.215.14"
HOSTS = {
    "git.example.org": [PUBLIC, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "loop.example.org": ["127.0.0.1"],
    "inside.example.org": ["10.1.2.3"],
    "mixed.example.org": [PUBLIC, "192.168.1.4"],
    "meta.example.org": ["169.254.169.254"],
    "v6loop.example.org": ["::1"],
    "mapped.example.org": ["::ffff:127.0.0.1"],
}
asked: list[str] = []


def resolve(host: str) -> Iterable[str]:
    asked.append(host)
    return HOSTS.get(host, [])


def check(mounts: object, allow: Iterable[str] = ()) -> list:
    return check_mounts(mounts, resolve=resolve, allow_hosts=allow)


def git(url: str, target: str = "/mnt/code", **extra: object) -> dict:
    return {"type": "git", "url": url, "target": target, **extra}


def refused(mounts: object, field: str, allow: Iterable[str] = ()) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as err:
        check(mounts, allow)
    assert err.value.status == 422
    assert err.value.details["field"] == field, err.value.message
    assert err.value.message.startswith(field + ":")
    return err.value


def test_a_valid_mount_of_each_kind_is_normalised_and_kept():
    mounts = check(
        [
            git("https://git.example.org/team/repo.git", "/mnt/code/", ref="v1.2"),
            {"type": "s3", "bucket": "my-data.bucket", "prefix": "raw/2024/", "target": "//data//raw"},
            {"type": "volume", "name": "home-data", "target": "/home/me/data", "read_only": True},
        ]
    )
    assert mounts == [
        GitMount(target="/mnt/code", url="https://git.example.org/team/repo.git", ref="v1.2"),
        S3Mount(target="/data/raw", bucket="my-data.bucket", prefix="raw/2024/"),
        VolumeMount(target="/home/me/data", name="home-data", read_only=True),
    ]
    assert from_json(to_json(mounts)) == mounts
    assert [describe(m) for m in mounts][0] == "git https://git.example.org/team/repo.git@v1.2 at /mnt/code"


@pytest.mark.parametrize(
    "target",
    ["/", "//", "/proc", "/proc/self", "/sys/x", "/dev", "/etc/ssl", "/usr", "/bin", "/lib64", "/opt/envctl",
     "/opt/envctl/agent", "/opt", "/results", "/results/x", "/run", "/run/envctl", "/var/run"],
)  # fmt: skip
def test_system_and_envctl_directories_are_refused_as_targets(target):
    refused([git("https://git.example.org/r.git", target)], "mounts[0].target")


@pytest.mark.parametrize(
    "target", ["../x", "x", "", "/data/../etc", "/data/./x", "/da\x00ta", "/data\n", "/" + "a" * 2000, None, 5]
)
def test_relative_dotted_nul_and_odd_targets_are_refused(target):
    refused([{"type": "volume", "name": "v", "target": target}], "mounts[0].target")


def test_overlapping_targets_name_the_later_mount():
    err = refused(
        [
            {"type": "volume", "name": "a", "target": "/data"},
            {"type": "volume", "name": "b", "target": "/home/x"},
            {"type": "volume", "name": "c", "target": "/data/inner"},
        ],
        "mounts[2].target",
    )
    assert "mounts[0]" in err.message
    refused([{"type": "volume", "name": "a", "target": "/data/x"}, {"type": "volume", "name": "b", "target": "/data"}],
            "mounts[1].target")  # fmt: skip
    refused([{"type": "volume", "name": "a", "target": "/d"}, {"type": "volume", "name": "b", "target": "/d/"}],
            "mounts[1].target")  # fmt: skip


def test_prefix_siblings_do_not_overlap():
    check([{"type": "volume", "name": "a", "target": "/data"}, {"type": "volume", "name": "b", "target": "/data2"}])


@pytest.mark.parametrize(
    "url",
    [
        "ext::sh -c id",
        "ext::sh",
        "fd::17",
        "file:///etc",
        "/etc/passwd",
        "--upload-pack=x",
        "-uhttps://git.example.org/r.git",
        "ssh://git.example.org/r.git",
        "git@git.example.org:r.git",
        "git://git.example.org/r.git",
        "http://git.example.org/r.git",
        "https://user:pw@git.example.org/r.git",
        "https://token@git.example.org/r.git",
        "https://git.example.org/r.git?x=1",
        "https://git.example.org/r .git",
        "https://git.example.org/r\n.git",
        "https:///r.git",
        "https://git.example.org:99999/r.git",
        "",
        None,
    ],
)
def test_unsafe_git_sources_are_refused_without_a_lookup(url):
    asked.clear()
    refused([git(url)], "mounts[0].url")
    assert asked == []  # nothing was even resolved


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/r.git",
        "https://127.1.2.3:8443/r.git",
        "https://[::1]/r.git",
        "https://169.254.169.254/latest",
        "https://10.0.0.1/r.git",
        "https://192.168.1.1/r.git",
        "https://172.16.0.1/r.git",
        "https://0.0.0.0/r.git",
        "https://loop.example.org/r.git",
        "https://inside.example.org/r.git",
        "https://mixed.example.org/r.git",
        "https://meta.example.org/r.git",
        "https://v6loop.example.org/r.git",
        "https://mapped.example.org/r.git",
        "https://nowhere.example.org/r.git",
    ],
)
def test_hosts_on_loopback_link_local_or_private_addresses_are_refused(url):
    refused([git(url)], "mounts[0].url")


def test_a_host_allowed_by_the_setting_may_be_loopback_and_plain_http():
    (m,) = check([git("http://127.0.0.1:8123/r.git")], allow=["127.0.0.1"])
    assert m.url == "http://127.0.0.1:8123/r.git"
    refused([git("http://127.0.0.2/r.git")], "mounts[0].url", allow=["127.0.0.1"])
    refused([git("ext::sh -c id")], "mounts[0].url", allow=["127.0.0.1"])


def test_a_host_allowed_by_the_setting_still_may_not_resolve_to_a_link_local_or_metadata_address():
    error = refused([git("http://meta.example.org/r.git")], "mounts[0].url", allow=["meta.example.org"])
    assert "169.254.169.254" in error.message
    refused([git("http://[fd00:ec2::254]/r.git")], "mounts[0].url", allow=["fd00:ec2::254"])


@pytest.mark.parametrize(
    "ref", ["-x", "--upload-pack=x", "a..b", "a//b", "/main", "main/", "x.lock", ".hidden", "a b", "a~1", "a^",
            "a:b", "@", "a\x00", 5, "x" * 300],
)  # fmt: skip
def test_bad_refs_are_refused(ref):
    refused([git("https://git.example.org/r.git", ref=ref)], "mounts[0].ref")


@pytest.mark.parametrize("ref", ["main", "release/2.0", "v1.2.3", "a" * 40, "0123456789abcdef0123456789abcdef01234567"])
def test_branches_tags_and_commits_are_accepted(ref):
    assert check([git("https://git.example.org/r.git", ref=ref)])[0].ref == ref


@pytest.mark.parametrize("bucket", ["ab", "Upper", "-x-", "a..b", "192.168.1.1", "a_b", "x" * 64, 7])
def test_bad_bucket_names_are_refused(bucket):
    refused([{"type": "s3", "bucket": bucket, "target": "/data"}], "mounts[0].bucket")


@pytest.mark.parametrize("prefix", ["/abs", "a/../b", "..", "a\x00"])
def test_bad_prefixes_are_refused(prefix):
    refused([{"type": "s3", "bucket": "data", "prefix": prefix, "target": "/data"}], "mounts[0].prefix")


@pytest.mark.parametrize("name", ["", "-v", "V", "a/b/c", "A/b", "/b", "a/", "a b", "x" * 64])
def test_bad_volume_names_are_refused(name):
    refused([{"type": "volume", "name": name, "target": "/data"}], "mounts[0].name")


def test_unknown_types_keys_and_shapes_are_refused():
    refused({"type": "git"}, "mounts")
    refused(["x"], "mounts[0]")
    refused([{"type": "nfs", "target": "/x"}], "mounts[0].type")
    refused([{"type": "volume", "name": "v", "target": "/x", "options": "o"}], "mounts[0]")
    refused([{"type": "s3", "bucket": "data", "target": "/x", "writeback": "yes"}], "mounts[0].writeback")
    refused([{"type": "volume", "name": f"v{i}", "target": f"/d{i}"} for i in range(17)], "mounts")


def test_the_command_line_form_parses_into_mounts():
    assert parse_option("git:https://git.example.org/r.git@release/2:/mnt/code") == git(
        "https://git.example.org/r.git", ref="release/2"
    )
    assert parse_option("git:https://git.example.org/r.git:/mnt/code") == git("https://git.example.org/r.git", ref="")
    assert parse_option("s3:data/raw/:/data:writeback") == {
        "type": "s3", "bucket": "data", "prefix": "raw/", "target": "/data", "writeback": True,
    }  # fmt: skip
    assert parse_option("volume:home:/home/me/data:ro") == {
        "type": "volume", "name": "home", "target": "/home/me/data", "read_only": True,
    }  # fmt: skip
    for bad in ("nfs:x:/y", "volume:home", "volume:home:/d:rx", "s3:b:/d:ro", "git:https://h/r.git:/d:ro"):
        with pytest.raises(InvalidInputError):
            parse_option(bad)
