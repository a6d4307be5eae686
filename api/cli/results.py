"""``envctl results [ls] [RUNTIME]`` and ``envctl results get ID``: files cells wrote under /results."""

from __future__ import annotations

from pathlib import Path

import click

from api.cli.client import Api
from api.cli.errors import EXIT_OK, CliError
from api.cli.options import DefaultGroup, client_options
from api.cli.output import Downloaded, download, human_bytes, listing, print_json, when


@click.group("results", cls=DefaultGroup)
def results() -> None:
    """Result files cells wrote under /results. `envctl results [RUNTIME]` is short for
    `envctl results ls [RUNTIME]`."""


@results.command("ls")
@click.argument("runtime", required=False, help="runtime id or name (an id also after it was deleted); default: all")
@client_options
def ls(api: Api, as_json: bool, runtime: str | None) -> int:
    """List result files, newest first."""
    if runtime:
        # Results outlive their runtime: an rt_ id is listed even after the runtime is gone.
        rid = runtime if runtime.startswith("rt_") else api.runtime(runtime)["id"]
        rows = api.call("GET", f"/runtimes/{rid}/results")
    else:
        rows = api.call("GET", "/results")
    return listing(
        rows,
        as_json,
        [
            ("id", "id"),
            ("path", "path"),
            ("size_text", "size"),
            ("sha", "sha256"),
            ("execution_id", "execution"),
            ("created", "created (UTC)"),
        ],
        lambda r: {**r, "size_text": human_bytes(r["size"]), "sha": r["sha256"][:12], "created": when(r["created_at"])},
    )


@results.command("get")
@click.argument("result_id", type=int, help="result id (the ID column of `envctl results ls`)")
@click.option("-o", "--output", metavar="FILE", help="where to write it (default: its file name here; - stdout)")
@client_options
def get(api: Api, as_json: bool, result_id: int, output: str | None) -> int:
    """Download a result file; its sha256 is checked before it is written."""
    meta = api.call("GET", f"/results/{result_id}")
    dest = None if output == "-" else Path(output) if output else Path(meta["path"].rsplit("/", 1)[-1])
    if not output and dest is not None and dest.exists():
        raise CliError(f"{dest} exists; choose where to write with -o FILE (-o - for stdout)")

    def intact(got: Downloaded) -> None:
        if got.sha256 != meta["sha256"]:
            raise CliError(
                f"result {meta['id']} arrived damaged (sha256 {got.sha256[:12]}, expected "
                f"{meta['sha256'][:12]}); nothing was written"
            )

    download(api, f"/results/{result_id}/content", dest, what=f"result {result_id}", quiet=as_json, check=intact)
    if dest is None:
        return EXIT_OK
    if as_json:
        print_json({**meta, "saved_to": str(dest)})
    else:
        print(f"wrote {dest} ({human_bytes(meta['size'])}, sha256 {meta['sha256'][:12]}) from {meta['path']}")
    return EXIT_OK
