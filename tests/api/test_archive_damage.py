"""``POST /environments/load`` of damaged archives: a 422 naming the problem, never a 5xx, and
nothing left behind: no image in the engine, no version, no file in the data directory's tmp/
(R34). The engine is the fake one with an image store of its own for the archive's images, so
that what reached it, and what was removed again, can be seen.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api.settings import Settings
from envs import archive
from envs.kit.errors import BackendError
from runner.backends.base import ImageInfo
from runner.backends.fake import FakeBackend
from tests.api.conftest import ApiHarness, AppFactory
from tests.envs import archive_samples as samples


class ArchiveEngine(FakeBackend):
    """The fake engine; it knows the archive's images only once they were loaded.

    ``refuse``: load_images raises BackendError with this message (as Docker does for an image
    it cannot take); ``down``: ping fails too (the engine does not answer); ``lose``: an image
    that load_images leaves out.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.watched: set[str] = set()
        self.loaded: dict[str, ImageInfo] = {}
        self.loads = 0
        self.removed: list[str] = []
        self.refuse: str | None = None
        self.down = False
        self.lose: str | None = None

    def image_info(self, image: str) -> ImageInfo | None:
        if image in self.watched:
            return self.loaded.get(image)
        return super().image_info(image)

    def load_images(self, path: Path) -> None:
        self.loads += 1
        with tarfile.open(path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        for entry in manifest:
            image_id = "sha256:" + entry["Config"].removesuffix(".json")
            if image_id != self.lose:
                self.loaded[image_id] = ImageInfo(image_id, 1000, len(entry["Layers"]), {})
        if self.refuse is not None:
            raise BackendError(f"Docker refused the images: {self.refuse}")

    def remove_image(self, image: str) -> None:
        self.removed.append(image)
        self.loaded.pop(image, None)
        super().remove_image(image)

    def ping(self) -> None:
        if self.down:
            raise BackendError("the Docker engine does not answer")


class World:
    def __init__(self, api: ApiHarness, engine: ArchiveEngine, data: bytes) -> None:
        self.api, self.engine, self.data = api, engine, data
        self.before = api.get("/environments").json()

    def load(self, body: bytes) -> Any:
        return self.api.post(
            "/environments/load", content=body, headers={**self.api.headers, "Content-Type": "application/x-tar"}
        )

    def assert_nothing_left(self) -> None:
        assert self.engine.loaded == {}, "an image of the archive stayed in the engine"
        assert self.api.get("/environments").json() == self.before, "a version was recorded"
        tmp = self.api.settings.data_dir / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == [], "a file stayed in the data directory's tmp/"


@pytest.fixture
def world(make_api: AppFactory, prepared_settings: Settings, tmp_path: Path) -> World:
    engine = ArchiveEngine()
    data = samples.make_archive(tmp_path, tmp_path.name)
    path = tmp_path / "sample.tar"
    path.write_bytes(data)
    engine.watched = set(archive.check(path).images)
    return World(make_api(engine), engine, data)


def test_an_intact_archive_loads_and_leaves_no_file_behind(world: World) -> None:
    resp = world.load(world.data)
    assert resp.status_code == 201, resp.text
    assert [(v["ref"], v["new"]) for v in resp.json()] == [("travelled@1", True), ("base@1", True)]
    assert set(world.engine.loaded) == world.engine.watched
    assert list((world.api.settings.data_dir / "tmp").iterdir()) == []


def member(world: World, name: str) -> samples.Member:
    return next(m for m in samples.members(world.data) if m.name.startswith(name))


def layer(world: World) -> samples.Member:
    """The largest blob: a layer."""
    return max(samples.members(world.data), key=lambda m: m.size)


def meta_says(world: World, key: str, value: Any) -> bytes:
    """The metadata's first version says ``value`` for ``key`` (its digest in index.json made to match)."""
    return samples.with_meta(world.data, lambda meta: meta["versions"][0].update({key: value}))


def index_says_manifest_size(world: World, delta: int) -> bytes:
    return samples.with_index(
        world.data, lambda index: index["manifests"][0].update(size=index["manifests"][0]["size"] + delta)
    )


Damage = Callable[[World], bytes]
CASES: list[tuple[str, Damage, str]] = [
    ("empty", lambda w: b"", "not a readable tar file"),
    ("cut inside the first header", lambda w: w.data[:300], "not a readable tar file"),
    ("cut inside a layer", lambda w: samples.cut(w.data, layer(w).data + layer(w).size // 2), "is cut short"),
    ("cut inside a later header", lambda w: samples.cut(w.data, layer(w).header + 200), "cut short"),
    ("cut between members", lambda w: samples.cut(w.data, member(w, "index.json").header), "end-of-archive marker"),
    ("cut before the end marker", lambda w: samples.cut(w.data, samples.end_of_members(w.data)), "cut short"),
    ("flipped byte in a layer", lambda w: samples.flip(w.data, layer(w).data + 77), "does not match its digest"),
    ("flipped byte in a header", lambda w: samples.flip(w.data, layer(w).header + 5), "damaged member header"),
    (
        "flipped byte in the metadata",
        lambda w: samples.flip(w.data, member(w, archive.META).data + 40),
        "envctl-export.json",
    ),
    (
        "header says more",
        lambda w: samples.with_size(w.data, layer(w), layer(w).size + 700),
        "does not match its digest",
    ),
    (
        "header says fewer",
        lambda w: samples.with_size(w.data, layer(w), layer(w).size - 1),
        "does not match its digest",
    ),
    ("header says a terabyte", lambda w: samples.with_size(w.data, member(w, "index.json"), 2**40), "index.json"),
    ("index lies about a size", lambda w: index_says_manifest_size(w, 3), "says"),
    ("metadata lies about a size", lambda w: meta_says(w, "size", "a lot"), "size is not a whole number"),
    ("metadata names no image", lambda w: meta_says(w, "image_id", "sha256:" + "0" * 64), "image of travelled@1"),
    ("metadata author too long", lambda w: meta_says(w, "author", "x" * 500), "author is 500 characters"),
]


@pytest.mark.parametrize(("damage", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_damaged_archive_is_a_422_naming_the_problem_and_leaves_nothing_behind(
    world: World, damage: Damage, words: str
) -> None:
    resp = world.load(damage(world))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "bad_archive" and words in error["message"], error
    assert error["details"] == {"field": "archive"}
    assert world.engine.loads == 0  # refused before the engine saw it
    world.assert_nothing_left()


def test_images_the_engine_refuses_are_a_422_in_its_words_and_nothing_stays(world: World) -> None:
    """An archive can be whole and still hold something the engine will not take (Docker:
    "invalid image JSON, no RootFS key"); an engine that answers and refuses is about the input."""
    world.engine.refuse = "invalid image JSON, no RootFS key"
    resp = world.load(world.data)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "bad_archive" and "container engine refused its images" in error["message"]
    assert "no RootFS key" in error["message"]
    assert set(world.engine.removed) == world.engine.watched  # what it took before refusing went again
    world.assert_nothing_left()


def test_an_engine_that_does_not_answer_is_a_503_and_nothing_stays(world: World) -> None:
    world.engine.refuse = "Cannot connect to the Docker daemon"
    world.engine.down = True
    resp = world.load(world.data)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "backend_error"
    world.assert_nothing_left()


def test_an_image_missing_after_the_load_removes_the_others_and_records_nothing(world: World) -> None:
    lost = sorted(world.engine.watched)[0]
    world.engine.lose = lost
    resp = world.load(world.data)
    assert resp.status_code == 503, resp.text
    assert "is not in the engine" in resp.json()["error"]["message"]
    assert set(world.engine.removed) == world.engine.watched
    world.assert_nothing_left()
