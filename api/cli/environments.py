"""``envctl env ls|show|lineage|rm|build|export|load|packages|diff``: environments and their versions.
(``env build`` lives in ``builds.py``, ``env packages|diff`` in ``packages.py``.)"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
import httpx

from api.cli import packages
from api.cli.builds import build
from api.cli.client import ARCHIVE_TIMEOUT, CHUNK, Api, ref_path
from api.cli.errors import EXIT_BAD_INPUT, EXIT_OK, CliError
from api.cli.options import Group, client_options
from api.cli.output import Progress, download, first_line, human_bytes, listing, print_json, short_digest, table, when


@click.group("env", cls=Group)
def env() -> None:
    """Environments: versions, tags, lineage, packages, builds and archives."""


@env.command("ls")
@client_options
def ls(api: Api, as_json: bool) -> int:
    """List environments. Each with its latest version, parent, size and tags."""

    def row(e: dict[str, Any]) -> dict[str, Any]:
        latest = next((v for v in e["versions"] if v["ref"] == e["latest"]), None)
        return {
            "name": e["name"],
            "owner": e.get("owner") or "(admins)",
            "latest": e["latest"] or "-",
            "versions": len(e["versions"]),
            "parent": (latest or {}).get("parent") or "-",
            "size": human_bytes(latest["size"]) if latest else "-",
            "tags": ", ".join(sorted(e["tags"])),
        }

    return listing(
        api.call("GET", "/environments"),
        as_json,
        [
            ("name", "environment"),
            ("owner", "owner"),
            ("latest", "latest"),
            ("versions", "versions"),
            ("parent", "parent"),
            ("size", "size"),
            ("tags", "tags"),
        ],
        row,
    )


@env.command("show")
@click.argument("ref", help="environment name or any reference to one of its versions")
@client_options
def show(api: Api, as_json: bool, ref: str) -> int:
    """An environment's versions and tags."""
    found = api.call("GET", f"/environments/{ref_path(ref)}")
    if as_json:
        print_json(found)
        return EXIT_OK
    print(f"{found['name']}" + (f"  (team {found['team']})" if found.get("team") else ""))
    owner = found.get("owner")
    print(f"owner: {owner}" if owner else "owner: none (a base image: only admins add or delete versions)")
    tags = ", ".join(f"{t} -> {v}" for t, v in sorted(found["tags"].items()))
    print(f"tags: {tags or '(none)'}")
    print()
    rows = [
        {
            **v,
            "tags_text": ", ".join(v["tags"]),
            "size_text": human_bytes(v["size"]),
            "added": "+" + human_bytes(v["size_added"]),
            "created": when(v["created_at"])[:16],
            "digest_text": short_digest(v["digest"]),
            "message_text": first_line(v["message"], 50),
            "parent": "(hidden)" if v.get("parent_hidden") else v.get("parent"),
        }
        for v in found["versions"]
    ]
    table(
        rows,
        [
            ("ref", "version"),
            ("tags_text", "tags"),
            ("parent", "parent"),
            ("size_text", "size"),
            ("added", "added"),
            ("created", "created (UTC)"),
            ("author", "author"),
            ("digest_text", "digest"),
            ("message_text", "message"),
        ],
    )
    return EXIT_OK


def _tree_glyphs() -> tuple[str, str]:
    """The branch and the indent of a tree; ASCII where stdout cannot take box drawing."""
    try:
        "└─".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "`- ", "   "
    return "└─ ", "   "


def lineage_lines(chain: list[dict[str, Any]]) -> list[str]:
    """The lineage as a tree, newest at the top: each version under the one it made."""
    branch, indent = _tree_glyphs()
    lines = []
    for depth, v in enumerate(chain):
        prefix = "" if depth == 0 else indent * (depth - 1) + branch
        if v.get("hidden"):  # a version you may not see: nothing of it is shown
            lines.append(f"{prefix}(hidden)")
            continue
        parts = [f"{prefix}{v['ref']}"]
        if v.get("message"):
            parts.append(json.dumps(first_line(v["message"]), ensure_ascii=False))
        if v.get("author"):
            parts.append(str(v["author"]))
        parts.append(when(v.get("created_at"))[:16])
        parts.append("+" + human_bytes(int(v.get("size_added") or 0)))
        lines.append("  ".join(parts))
    return lines


@env.command("lineage")
@click.argument("ref", help="environment reference, e.g. acme/ml or acme/ml@3")
@client_options
def lineage(api: Api, as_json: bool, ref: str) -> int:
    """The chain of parents of a version, as a tree."""
    chain = api.call("GET", f"/environments/{ref_path(ref)}/lineage")
    if as_json:
        print_json(chain)
        return EXIT_OK
    for line in lineage_lines(chain):
        print(line)
    return EXIT_OK


@env.command("rm", short_help="Delete one version.")
@click.argument("ref", help="one version: name@N or name@sha256:...")
@client_options
def rm(api: Api, as_json: bool, ref: str) -> int:
    """Delete the version REF (name@N or name@sha256:...). Refused, naming them, while
    other versions or runtimes depend on it."""
    api.call("DELETE", f"/environments/{ref_path(ref)}")
    if as_json:
        print_json({"deleted": ref})
    else:
        print(f"deleted {ref}")
    return EXIT_OK


env.add_command(build)
env.add_command(packages.packages)
env.add_command(packages.diff)


@env.command("export")
@click.argument("ref", help="environment reference, e.g. acme/ml@3")
@click.option(
    "-o", "--output", metavar="FILE", help="where to write it (default: REF.tar here, never overwritten; - stdout)"
)
@client_options
def export(api: Api, as_json: bool, ref: str, output: str | None) -> int:
    """Write a version and its lineage to an OCI archive. `envctl env load` takes it in."""
    dest = None if output == "-" else Path(output) if output else Path(re.sub(r"[^A-Za-z0-9._-]", "_", ref) + ".tar")
    if dest is not None:
        if not output and dest.exists():
            raise CliError(f"{dest} exists; choose where to write with -o FILE (-o - for stdout)", EXIT_BAD_INPUT)
        if not dest.parent.is_dir():
            raise CliError(f"{dest}: the folder {dest.parent} does not exist", EXIT_BAD_INPUT)
        if dest.is_dir():
            raise CliError(f"{dest} is a folder; give a file name with -o FILE", EXIT_BAD_INPUT)
    got = download(
        api,
        f"/environments/{ref_path(ref)}/export",
        dest,
        what=f"the export of {ref}",
        quiet=as_json,
        preparing=f"preparing {ref} and its lineage",
        timeout=ARCHIVE_TIMEOUT,
    )
    if dest is None:
        return EXIT_OK
    if as_json:
        print_json({"ref": ref, "file": str(dest), "bytes": got.size})
    else:
        print(f"wrote {dest} ({human_bytes(got.size)}): {ref} with its lineage")
    return EXIT_OK


def _open_archive(file: str) -> tuple[IO[bytes], int | None]:
    """The archive to send and its size (None for stdin)."""
    if file == "-":
        return sys.stdin.buffer, None
    path = Path(file)
    if path.is_dir():
        raise CliError(f"{path} is a folder, not an archive made by `envctl env export`", EXIT_BAD_INPUT)
    try:
        source = open(path, "rb")  # noqa: SIM115  (closed by the caller)
    except FileNotFoundError as exc:
        raise CliError(f"{path}: no such file", EXIT_BAD_INPUT) from exc
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc
    return source, os.fstat(source.fileno()).st_size


@env.command("load")
@click.argument("file", help="the archive (- for stdin)")
@client_options
def load(api: Api, as_json: bool, file: str) -> int:
    """Load an archive made by `envctl env export`. Images keep their digests."""
    source, size = _open_archive(file)
    with Progress(as_json) as progress:

        def body() -> Iterator[bytes]:
            sent = 0
            while chunk := source.read(CHUNK):
                sent += len(chunk)
                progress.transfer(f"uploading {file}", sent, size)
                yield chunk
            progress.update("loading the images and their versions")

        headers = {"Content-Type": "application/x-tar"}
        if size is not None:
            headers["Content-Length"] = str(size)
        try:
            resp = api.http.post("/environments/load", content=body(), headers=headers, timeout=ARCHIVE_TIMEOUT)
        except httpx.TransportError as exc:
            raise api.unreachable(exc) from exc
        finally:
            if source is not sys.stdin.buffer:
                source.close()
    api.raise_for(resp)
    return listing(
        resp.json(),
        as_json,
        [("ref", "ref"), ("exported_as", "exported as"), ("new_text", "new"), ("digest_text", "digest")],
        lambda v: {**v, "new_text": "yes" if v["new"] else "no (had it)", "digest_text": short_digest(v["digest"])},
    )
