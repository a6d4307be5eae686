"""What an environment archive says about itself, checked against the blobs it holds.

``envs.archive`` walks the tar file and hashes every blob; this module reads what the archive
claims (``index.json``, the manifests and image configurations it points at, and the lineage
in ``envctl-export.json``) and refuses, naming the document and the field, anything that is not
valid JSON, has the wrong shape, or disagrees with the blobs: a digest that names no blob, a
size that is not the blob's, a version whose image or parent is not there, a value that would
not fit its column. What passes is safe to hand to ``docker load`` and to the state store.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs.errors import ArchiveError
from envs.kit.errors import InvalidInputError
from envs.refs import NAME_MAX, parse_ref

FORMAT = 1
META = "envctl-export.json"
# index.json annotation: the sha256 of envctl-export.json, so that damage to it is seen too
META_DIGEST = "io.envctl.export.digest"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MAX_DOCUMENT = 16 * 1024 * 1024  # bytes of one JSON document (index, manifest, configuration, metadata)
MAX_ENTRIES = 1000  # manifests in the index, versions in the metadata
MAX_TEXT = 64 * 1024  # characters of a version's message
MAX_SIZE = 2**63 - 1  # the largest size a BigInteger column holds
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})\Z")


@dataclass
class Checked:
    """A checked archive: its metadata and, per image id, its config and layer blob digests."""

    meta: dict[str, Any]
    images: dict[str, tuple[str, list[str]]]


def _refuse(message: str) -> ArchiveError:
    return ArchiveError(f"archive: {message}", field="archive")


def parse_json(what: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise _refuse(f"{what} is not valid JSON (not UTF-8 text at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise _refuse(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        raise _refuse(f"{what} is not valid JSON ({type(exc).__name__})") from exc


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(f"{where} is not a JSON object")
    return value


def _list(value: Any, where: str, *, empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        raise _refuse(f"{where} is missing or not a list")
    if not value and not empty:
        raise _refuse(f"{where} is empty")
    if len(value) > MAX_ENTRIES:
        raise _refuse(f"{where} has {len(value)} entries; at most {MAX_ENTRIES} are allowed")
    return value


def _text(obj: dict[str, Any], key: str, where: str, limit: int, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _refuse(f"{where}: {key} is missing or not a string")
    if len(value) > limit:
        raise _refuse(f"{where}: {key} is {len(value)} characters long; at most {limit} are allowed")
    return value


def _size(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
        raise _refuse(f"{where}: {key} is not a whole number of bytes ({str(value)[:40]!r})")
    return value


def _digest(value: Any, where: str) -> str:
    """The hex part of a ``sha256:<64 hex>`` digest."""
    match = _DIGEST.match(value) if isinstance(value, str) else None
    if match is None:
        raise _refuse(f"{where}: digest {str(value)[:80]!r} is not 'sha256:' and 64 hex digits")
    return match.group(1)


def _descriptor(value: Any, where: str, media_type: str, blobs: dict[str, int]) -> str:
    """Check an OCI descriptor against the blobs; returns the blob's hex digest."""
    d = _object(value, where)
    if d.get("mediaType") != media_type:
        raise _refuse(f"{where}: mediaType is {str(d.get('mediaType'))[:80]!r}, not {media_type!r}")
    blob = _digest(d.get("digest"), where)
    if blob not in blobs:
        raise _refuse(f"{where}: blob {blob[:12]} is missing")
    size = _size(d, "size", where)
    if size != blobs[blob]:
        raise _refuse(f"{where}: says {size} bytes, but blob {blob[:12]} holds {blobs[blob]}")
    return blob


def _json_blob(blob: str, what: str, blobs: dict[str, int], read_blob: Callable[[str], bytes]) -> dict[str, Any]:
    if blobs[blob] > MAX_DOCUMENT:
        raise _refuse(f"{what} {blob[:12]} is {blobs[blob]} bytes; at most {MAX_DOCUMENT} are read as JSON")
    return _object(parse_json(f"{what} {blob[:12]}", read_blob(blob)), f"{what} {blob[:12]}")


def read_contents(documents: dict[str, bytes], blobs: dict[str, int], read_blob: Callable[[str], bytes]) -> Checked:
    """Check what ``documents`` (oci-layout, index.json, envctl-export.json, as bytes) say
    against ``blobs`` (hex digest → size, every one already hashed); ``read_blob`` gives a
    blob's bytes."""
    layout = _object(parse_json("oci-layout", documents["oci-layout"]), "oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise _refuse(f"oci-layout: imageLayoutVersion is {str(layout.get('imageLayoutVersion'))[:40]!r}, not '1.0.0'")
    index = _object(parse_json("index.json", documents["index.json"]), "index.json")
    if index.get("schemaVersion") != 2:
        raise _refuse("index.json: schemaVersion is not 2")
    annotations = _object(index.get("annotations", {}), "index.json: annotations")
    if META_DIGEST in annotations:  # archives made before it was written have none
        wanted = _digest(annotations[META_DIGEST], f"index.json: annotation {META_DIGEST}")
        if hashlib.sha256(documents[META]).hexdigest() != wanted:
            raise _refuse(f"{META} does not match its digest in index.json; the archive is damaged")
    images: dict[str, tuple[str, list[str]]] = {}
    for i, entry in enumerate(_list(index.get("manifests"), "index.json: manifests"), 1):
        config, layers = _manifest(entry, f"index.json: manifest {i}", blobs, read_blob)
        images[f"sha256:{config}"] = (config, layers)
    meta = _object(parse_json(META, documents[META]), META)
    if meta.get("format") != FORMAT:
        raise _refuse(f"{META} is not of format {FORMAT}")
    _versions(_list(meta.get("versions"), f"{META}: versions"), images)
    return Checked(meta=meta, images=images)


def _manifest(
    entry: Any, where: str, blobs: dict[str, int], read_blob: Callable[[str], bytes]
) -> tuple[str, list[str]]:
    blob = _descriptor(entry, where, MEDIA_MANIFEST, blobs)
    manifest = _json_blob(blob, "manifest", blobs, read_blob)
    inside = f"manifest {blob[:12]}"
    if manifest.get("schemaVersion") != 2 or manifest.get("mediaType", MEDIA_MANIFEST) != MEDIA_MANIFEST:
        raise _refuse(f"{inside} is not an OCI image manifest (schemaVersion 2, mediaType {MEDIA_MANIFEST})")
    config = _descriptor(manifest.get("config"), f"{inside}: config", MEDIA_CONFIG, blobs)
    layers = [
        _descriptor(layer, f"{inside}: layer {j}", MEDIA_LAYER, blobs)
        for j, layer in enumerate(_list(manifest.get("layers"), f"{inside}: layers", empty=True), 1)
    ]
    _json_blob(config, "image configuration", blobs, read_blob)
    return config, layers


def _versions(versions: list[Any], images: dict[str, tuple[str, list[str]]]) -> None:
    """Each version, child first: the fields a load records, each of a kind and size its column
    holds; its image is in the archive, and its parent (if any) comes after it."""
    later: set[str] = set()
    checked = []
    for i, value in enumerate(versions, 1):
        v = _object(value, f"{META}: version {i}")
        ref = _text(v, "ref", f"{META}: version {i}", 300)
        where = f"{META}: version {i} ({ref!r})"
        environment = _text(v, "environment", where, 2 * NAME_MAX + 1)
        assert environment is not None
        try:
            parsed = parse_ref(environment, "environment")
        except InvalidInputError as exc:
            raise _refuse(f"{where}: {exc.message}") from exc
        if parsed.full_name != environment:
            raise _refuse(f"{where}: environment {environment!r} is not a plain [team/]name")
        if v.get("image_id") not in images:
            raise _refuse(f"the image of {ref} is missing")
        _digest(v.get("digest"), where)
        _text(v, "message", where, MAX_TEXT, optional=True)
        _text(v, "author", where, NAME_MAX, optional=True)
        _text(v, "source_runtime_id", where, 40, optional=True)
        _text(v, "parent_image_id", where, 80, optional=True)
        _size(v, "size", where)
        _size(v, "size_added", where)
        if v.get("labels") is not None:
            _object(v["labels"], f"{where}: labels")
        checked.append((where, v))
    for where, v in reversed(checked):  # base first: a parent must already be known
        parent = v.get("parent_image_id")
        if parent and parent not in later:
            raise _refuse(f"{where}: its parent image {parent[:19]} is not among the versions after it")
        later.add(v["image_id"])
