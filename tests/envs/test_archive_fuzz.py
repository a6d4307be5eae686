"""Damaged archives: cut short anywhere, with bytes flipped, with headers or JSON that lie (R34).

``envs.archive.check`` on its own, on a two-version archive as export writes it. Every damaged
copy is either refused with ``ArchiveError`` (422 ``bad_archive``, naming the problem) or, when
the damage touched only bytes nothing reads (padding, a manifest's name annotation), checks
out exactly as the intact archive does. Nothing else may escape: no ``KeyError``, no
``JSONDecodeError``, no ``tarfile.ReadError``. The offsets are chosen (every header field, the
edges of every member) and drawn from a seeded generator, so every run tries the same cases.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from envs import archive
from envs.archive_contents import MEDIA_CONFIG, META_DIGEST
from envs.errors import ArchiveError
from tests.envs import archive_samples as samples

SEED = 34  # R34
HEADER_FIELDS = {  # offset inside a header block: what is there
    0: "name",
    99: "name end",
    100: "mode",
    108: "uid",
    124: "size",
    130: "size",
    135: "size end",
    136: "mtime",
    156: "type",
    157: "link name",
    257: "magic",
    263: "version",
    265: "user name",
    345: "prefix",
    511: "padding",
}
CHECKSUM = range(148, 156)
NAMES_THE_DAMAGE = ("cut short", "damaged", "not a readable tar file", "does not match its digest")


class Sample:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = samples.make_archive(tmp)
        self.members = samples.members(self.data)
        self.end = samples.end_of_members(self.data)
        checked = self.check(self.data)
        assert isinstance(checked, archive.Checked), checked
        self.checked = checked

    def check(self, data: bytes) -> archive.Checked | ArchiveError:
        path = self.tmp / "damaged.tar"
        path.write_bytes(data)
        try:
            return archive.check(path)
        except ArchiveError as exc:
            assert exc.status == 422 and exc.code == "bad_archive", exc
            assert exc.message.startswith("archive: ") and exc.details == {"field": "archive"}, exc.message
            return exc

    def refused(self, data: bytes, what: str) -> ArchiveError:
        result = self.check(data)
        assert isinstance(result, ArchiveError), f"{what}: accepted"
        return result

    def refused_or_unchanged(self, data: bytes, what: str) -> ArchiveError | None:
        result = self.check(data)
        if isinstance(result, ArchiveError):
            return result
        assert result == self.checked, f"{what}: accepted, and reads differently"
        return None

    def member(self, name: str) -> samples.Member:
        return next(m for m in self.members if m.name == name)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return Sample(tmp_path_factory.mktemp("archive"))


def test_the_intact_sample_checks_out_and_turns_into_a_docker_load_archive(sample: Sample) -> None:
    assert [v["ref"] for v in sample.checked.meta["versions"]] == ["travelled@1", "base@1"]
    assert sorted(len(layers) for _config, layers in sample.checked.images.values()) == [1, 2]
    path = sample.tmp / "intact.tar"
    path.write_bytes(sample.data)
    out = io.BytesIO()
    archive.docker_archive(path, sample.checked, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert {m["Config"].removesuffix(".json") for m in manifest} == {c for c, _ in sample.checked.images.values()}


# --------------------------------------------------------------------------- cut short


def cut_offsets(sample: Sample) -> Iterator[int]:
    for m in sample.members:
        yield from (m.header + k for k in (0, 1, *HEADER_FIELDS, 511))
        yield from (m.data, m.data + 1, m.data + m.size // 2, m.data + m.size - 1, m.data + m.size)
    yield from (sample.end + k for k in (0, 1, 511, 512, 513, 1023))
    rng = random.Random(SEED)
    yield from (rng.randrange(len(sample.data)) for _ in range(300))


def test_an_archive_cut_short_anywhere_before_its_end_marker_is_refused_saying_so(sample: Sample) -> None:
    offsets = sorted(set(cut_offsets(sample)))
    assert len(offsets) > 400
    for at in offsets:
        data = samples.cut(sample.data, at)
        if at >= sample.end + 1024:  # only the zero padding after the end marker is gone
            sample.refused_or_unchanged(data, f"cut at {at}")
            continue
        err = sample.refused(data, f"cut at {at}")
        assert any(words in err.message for words in (*NAMES_THE_DAMAGE, "missing")), (at, err.message)


def test_a_cut_inside_a_member_names_that_member(sample: Sample) -> None:
    for m in sample.members:
        if m.size < 2:
            continue
        err = sample.refused(samples.cut(sample.data, m.data + m.size // 2), m.name)
        assert repr(m.name[:120]) in err.message and "cut short" in err.message, err.message


def test_a_cut_between_members_says_the_end_marker_is_missing(sample: Sample) -> None:
    second = sample.members[1]
    err = sample.refused(samples.cut(sample.data, second.header), "between members")
    assert f"cut short at byte {second.header}" in err.message and "end-of-archive marker" in err.message


# --------------------------------------------------------------------------- flipped bytes


def test_a_flipped_byte_in_any_member_header_is_refused(sample: Sample) -> None:
    """Every byte of a header counts in its checksum; the checksum field's last bytes (after
    the number's terminating NUL) are the only ones a reader does not look at."""
    rng = random.Random(SEED)
    for m in sample.members:
        for k in range(tarfile.BLOCKSIZE):
            at = m.header + k
            data = samples.flip(sample.data, at, rng.randrange(1, 256))
            if k in CHECKSUM:
                sample.refused_or_unchanged(data, f"{m.name} header byte {k}")
                continue
            err = sample.refused(data, f"{m.name} header byte {k} ({HEADER_FIELDS.get(k, '')})")
            assert any(words in err.message for words in NAMES_THE_DAMAGE), (m.name, k, err.message)


def test_a_flipped_byte_in_a_blob_or_the_metadata_is_refused(sample: Sample) -> None:
    rng = random.Random(SEED)
    for m in sample.members:
        if m.name in ("oci-layout", "index.json"):
            continue
        offsets = {0, m.size - 1, *(rng.randrange(m.size) for _ in range(40))}
        for k in sorted(offsets):
            err = sample.refused(samples.flip(sample.data, m.data + k, rng.randrange(1, 256)), f"{m.name} byte {k}")
            if m.name == archive.META:
                assert "envctl-export.json" in err.message, err.message
            else:
                assert "does not match its digest" in err.message and m.name[:40] in err.message, err.message


def test_a_flipped_byte_in_the_index_or_the_layout_is_refused_or_changes_nothing(sample: Sample) -> None:
    """index.json has no digest of its own; what it says is checked against the blobs, and a
    byte that changes nothing a load reads (a manifest's name annotation, white space turned
    into other white space) is let through."""
    rng = random.Random(SEED)
    refused = 0
    for name in ("index.json", "oci-layout"):
        m = sample.member(name)
        for k in range(m.size):
            for mask in (0xFF, rng.randrange(1, 256)):
                refused += (
                    sample.refused_or_unchanged(samples.flip(sample.data, m.data + k, mask), f"{name} {k}") is not None
                )
    assert refused > 0.5 * 2 * (sample.member("index.json").size + sample.member("oci-layout").size)


def test_a_flipped_byte_anywhere_is_refused_or_changes_nothing(sample: Sample) -> None:
    rng = random.Random(SEED)
    for _ in range(600):
        at = rng.randrange(len(sample.data))
        sample.refused_or_unchanged(samples.flip(sample.data, at, rng.randrange(1, 256)), f"byte {at}")


def test_bytes_after_the_end_marker_are_refused_and_padding_between_members_is_not_read(sample: Sample) -> None:
    err = sample.refused(samples.flip(sample.data, sample.end + 1024 + 7), "after the end marker")
    assert "data after its end" in err.message
    first = sample.members[0]  # oci-layout: 31 bytes, then zero padding to the next block
    assert sample.check(samples.flip(sample.data, first.data + first.size + 3)) == sample.checked


# --------------------------------------------------------------------------- headers that lie


def lies(size: int) -> list[int]:
    sizes = {size + 1, size - 1, size + 511, size + 512, size + 513, 0, 2 * size + 7, 8**11 - 1, 2**40}
    if size >= 512:
        sizes.add(size - 512)
    return sorted(s for s in sizes if s >= 0 and s != size)


def test_a_header_that_lies_about_its_members_size_is_refused(sample: Sample) -> None:
    for m in sample.members:
        for size in lies(m.size):
            err = sample.refused(samples.with_size(sample.data, m, size), f"{m.name} says {size}")
            assert any(words in err.message for words in (*NAMES_THE_DAMAGE, "not valid JSON", "at most")), (
                m.name,
                size,
                err.message,
            )


def test_a_last_member_that_claims_more_than_the_file_holds_names_it(sample: Sample) -> None:
    last = sample.members[-1]
    err = sample.refused(samples.with_size(sample.data, last, 2**40), "huge last member")
    assert "index.json" in err.message and ("cut short" in err.message or "at most" in err.message)
    beyond = len(sample.data) - last.data + 1
    err = sample.refused(samples.with_size(sample.data, last, beyond), "longer last member")
    assert "'index.json' is cut short" in err.message, err.message
    err = sample.refused(samples.with_size(sample.data, last, last.size + 100), "into the end marker")
    assert "index.json is not valid JSON" in err.message, err.message


# --------------------------------------------------------------------------- JSON that lies


def index_of(sample: Sample) -> dict[str, Any]:
    index: dict[str, Any] = samples.read_json(sample.data, "index.json")
    return index


def meta_of(sample: Sample) -> dict[str, Any]:
    meta: dict[str, Any] = samples.read_json(sample.data, archive.META)
    return meta


def with_meta(sample: Sample, change: Callable[[dict[str, Any]], Any]) -> bytes:
    return samples.with_meta(sample.data, change)


def first_manifest(sample: Sample) -> tuple[dict[str, Any], dict[str, Any]]:
    """The index's first entry and the manifest it points at."""
    entry = index_of(sample)["manifests"][0]
    return entry, samples.read_json(sample.data, samples.blob_name(entry["digest"]))


def with_manifest(sample: Sample, change: Callable[[dict[str, Any]], Any]) -> bytes:
    """The first manifest changed, stored as a new blob, and the index pointing at it truthfully."""
    _entry, manifest = first_manifest(sample)
    change(manifest)
    extra: dict[str, bytes] = {}
    body = json.dumps(manifest).encode()
    digest = samples.put_blob(extra, body)
    return samples.with_index(sample.data, lambda i: i["manifests"][0].update(digest=digest, size=len(body)), extra)


def set_in(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set a value by a dotted path with list indexes, e.g. ``versions.0.size``."""

    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        del target[last]

    return change


UNKNOWN = "sha256:" + "e" * 64


def index_lies(sample: Sample) -> Iterator[tuple[str, bytes, str]]:
    def index(change: Callable[[dict[str, Any]], Any]) -> bytes:
        return samples.with_index(sample.data, change)

    entry, manifest = first_manifest(sample)
    layer_digest = manifest["layers"][0]["digest"]
    layer_size = manifest["layers"][0]["size"]
    yield "manifest size", index(set_in("manifests.0.size", entry["size"] + 1)), "says"
    yield "manifest size as text", index(set_in("manifests.0.size", str(entry["size"]))), "whole number of bytes"
    yield "manifest digest of no blob", index(set_in("manifests.0.digest", UNKNOWN)), "is missing"
    yield "manifest digest malformed", index(set_in("manifests.0.digest", "md5:abc")), "is not 'sha256:'"
    yield "manifest media type", index(set_in("manifests.0.mediaType", "text/plain")), "mediaType"
    yield (
        "a layer as the manifest",
        index(set_in("manifests.0", {**entry, "digest": layer_digest, "size": layer_size})),
        "is not valid JSON",
    )
    yield "no manifests", index(set_in("manifests", [])), "is empty"
    yield "manifests not a list", index(set_in("manifests", {"a": 1})), "not a list"
    yield "schema version", index(set_in("schemaVersion", 1)), "schemaVersion"
    yield "metadata digest", index(lambda i: i["annotations"].update({META_DIGEST: UNKNOWN})), "does not match its"
    yield "metadata digest malformed", index(lambda i: i["annotations"].update({META_DIGEST: 42})), "is not 'sha256:'"
    yield "annotations not an object", index(set_in("annotations", "x")), "annotations is not a JSON object"
    as_list = samples.rebuild(sample.data, {"index.json": json.dumps([index_of(sample)]).encode()})
    yield "index is a list", as_list, "index.json is not a JSON object"
    yield "index is not JSON", samples.rebuild(sample.data, {"index.json": b'{"manifests": ['}), "not valid JSON"
    yield "index is not text", samples.rebuild(sample.data, {"index.json": b'{"a": "\xff"}'}), "not UTF-8 text"
    yield "deeply nested", samples.rebuild(sample.data, {"index.json": b"[" * 100_000}), "not valid JSON"
    yield "layout version", samples.rebuild(sample.data, {"oci-layout": b'{"imageLayoutVersion": "9"}'}), "oci-layout"


def manifest_lies(sample: Sample) -> Iterator[tuple[str, bytes, str]]:
    _entry, manifest = first_manifest(sample)
    layer = manifest["layers"][0]
    yield "layer size", with_manifest(sample, set_in("layers.0.size", layer["size"] - 1)), "says"
    yield "layer of no blob", with_manifest(sample, set_in("layers.0.digest", UNKNOWN)), "is missing"
    yield "layer media type", with_manifest(sample, set_in("layers.0.mediaType", "x")), "mediaType"
    yield "layers not a list", with_manifest(sample, set_in("layers", "all of them")), "not a list"
    yield "config size", with_manifest(sample, set_in("config.size", 0)), "says 0 bytes"
    yield "config missing", with_manifest(sample, drop("config")), "config is not a JSON object"
    yield (
        "a layer as the config",
        with_manifest(sample, set_in("config", {**layer, "mediaType": MEDIA_CONFIG})),
        "image configuration",
    )
    yield "not a manifest", with_manifest(sample, set_in("schemaVersion", 3)), "is not an OCI image manifest"


def meta_lies(sample: Sample) -> Iterator[tuple[str, bytes, str]]:
    v0 = meta_of(sample)["versions"][0]
    yield "format", with_meta(sample, set_in("format", 2)), "is not of format 1"
    yield "no versions", with_meta(sample, set_in("versions", [])), "versions is empty"
    yield "version not an object", with_meta(sample, set_in("versions.0", "travelled@1")), "version 1 is not"
    yield "image not there", with_meta(sample, set_in("versions.0.image_id", UNKNOWN)), "image of travelled@1"
    yield "no ref", with_meta(sample, drop("versions.0.ref")), "ref is missing"
    yield "digest", with_meta(sample, set_in("versions.0.digest", "latest")), "digest 'latest'"
    yield "size as text", with_meta(sample, set_in("versions.0.size", "1000")), "size is not a whole number"
    yield "negative size", with_meta(sample, set_in("versions.0.size_added", -1)), "size_added is not"
    yield "size past 64 bits", with_meta(sample, set_in("versions.0.size", 2**63)), "size is not"
    yield "size as true", with_meta(sample, set_in("versions.0.size", True)), "size is not"
    yield "author too long", with_meta(sample, set_in("versions.0.author", "a" * 65)), "author is 65 characters"
    yield "message not text", with_meta(sample, set_in("versions.0.message", ["x"])), "message is missing or not"
    yield (
        "runtime id too long",
        with_meta(sample, set_in("versions.0.source_runtime_id", "r" * 41)),
        "source_runtime_id",
    )
    yield "environment name", with_meta(sample, set_in("versions.0.environment", "Bad Name")), "environment name"
    yield "environment with a pin", with_meta(sample, set_in("versions.0.environment", "x@1")), "plain [team/]name"
    yield "environment missing", with_meta(sample, drop("versions.0.environment")), "environment is missing"
    yield "labels", with_meta(sample, set_in("versions.0.labels", ["a"])), "labels is not a JSON object"
    yield "parent not there", with_meta(sample, set_in("versions.0.parent_image_id", UNKNOWN)), "parent image"
    yield (
        "parent listed first",
        with_meta(sample, lambda m: m["versions"].reverse()),
        "not among the versions after it",
    )
    yield "metadata not JSON", samples.rebuild(sample.data, {archive.META: b"format: 1"}), "does not match its digest"
    assert v0["ref"] == "travelled@1"


@pytest.mark.parametrize("lies", [index_lies, manifest_lies, meta_lies])
def test_json_that_lies_is_refused_naming_the_problem(
    sample: Sample, lies: Callable[[Sample], Iterator[tuple[str, bytes, str]]]
) -> None:
    for what, data, words in lies(sample):
        err = sample.refused(data, what)
        assert words in err.message, (what, err.message)


def test_an_archive_made_before_the_metadata_digest_still_loads(sample: Sample) -> None:
    assert sample.check(samples.with_index(sample.data, lambda i: i.pop("annotations"))) == sample.checked


# --------------------------------------------------------------------------- compressed


def test_a_compressed_archive_checks_out_and_one_cut_short_or_flipped_is_refused(sample: Sample) -> None:
    packed = gzip.compress(sample.data, mtime=0)
    assert sample.check(packed) == sample.checked
    rng = random.Random(SEED)
    for at in sorted(
        {1, 10, len(packed) // 2, len(packed) - 9, len(packed) - 1, *(rng.randrange(len(packed)) for _ in range(60))}
    ):
        sample.refused(samples.cut(packed, at), f"gzip cut at {at}")
    for _ in range(150):
        at = rng.randrange(len(packed))
        sample.refused_or_unchanged(samples.flip(packed, at, rng.randrange(1, 256)), f"gzip byte {at}")
