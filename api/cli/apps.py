"""``envctl app deploy|ls|show|logs|stop|rm|rollback``: notebooks deployed as apps.

A notebook is a Jupyter notebook (``.ipynb``, nbformat 4): its code cells run in order in the
app's runtime, and one of them starts the web server on the app's port (``--port``, default
8000), e.g. ``subprocess.Popen(["python3", "-m", "http.server", "8000"])`` or a server thread.
The files beside it that it names travel with it: the notebook's metadata
``{"envctl": {"files": ["data.csv", "static/"]}}`` (paths relative to the notebook's folder; a
folder takes what is under it) and each ``--file PATH``. In the app they are under ``~/app``,
the cells' working directory.

``deploy`` zips them, encrypts the zip here with the key the server hands out for this one
bundle, uploads it to the presigned URL (without envctl's token), posts the deployment and
follows its status until it runs or fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import click
import httpx

from api.cli.client import Api
from api.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, CliError
from api.cli.options import client_options
from api.cli.output import listing, print_json, when
from envs.kit.errors import InvalidInputError
from runner.apps import bundles

FINAL = {"running", "failed", "stopped"}
TEAM = click.option("--team", required=True, help="the team the app belongs to")


@click.group("app")
def app() -> None:
    """Notebooks deployed as web apps, served at /apps/TEAM/NAME/."""


def notebook_files(path: Path, extra: tuple[str, ...]) -> dict[str, bytes]:
    """The notebook and the files it names (metadata ``envctl.files``) or ``--file`` adds, by
    their path relative to the notebook's folder; none may lie outside it."""
    try:
        raw = path.read_bytes()
        nb = json.loads(raw)
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc
    except ValueError as exc:
        raise CliError(f"{path}: not a Jupyter notebook (not JSON: {exc})", EXIT_BAD_INPUT) from exc
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise CliError(f"{path}: not a Jupyter notebook (no cells)", EXIT_BAD_INPUT)
    named = (nb.get("metadata") or {}).get("envctl", {}).get("files", [])
    if not isinstance(named, list):
        raise CliError(f"{path}: metadata envctl.files must be a list of paths", EXIT_BAD_INPUT)
    root = path.parent.resolve()
    files = {path.name: raw}
    for item in [*map(str, named), *extra]:
        target = (root / item).resolve()
        if not target.is_relative_to(root):
            raise CliError(f"{item}: outside the notebook's folder {root}", EXIT_BAD_INPUT)
        found = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        if not found:
            raise CliError(f"{item}: no such file beside the notebook", EXIT_BAD_INPUT)
        for f in found:
            files[f.relative_to(root).as_posix()] = f.read_bytes()
    try:
        for name in files:
            bundles.check_member(name)
    except InvalidInputError as exc:
        raise CliError(exc.message, EXIT_BAD_INPUT) from exc
    return files


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, eq, val = v.partition("=")
        if not eq or not k:
            raise CliError(f"{what} {v!r} is not NAME=VALUE", EXIT_BAD_INPUT)
        out[k] = val
    return out


@app.command("deploy")
@click.argument("notebook", type=click.Path(dir_okay=False, path_type=Path))
@TEAM
@click.option("--name", required=True, help="the app's name: /apps/TEAM/NAME/")
@click.option("--env", "environment", default="python3", show_default=True, help="environment reference, pinned now")
@click.option("--port", default=8000, show_default=True, type=int, help="the port the notebook's web server listens on")
@click.option("--public", is_flag=True, help="anyone may open it (default: the team's members, signed in)")
@click.option("--machine-type", default="small", show_default=True, help="the runtime's machine type")
@click.option("--instances", default=1, show_default=True, type=int, help="runtimes serving it, requests spread")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="a variable of the app")
@click.option("--secret", "secret_refs", multiple=True, metavar="VAR=SECRET", help="a team secret as VAR")
@click.option("--file", "extra", multiple=True, metavar="PATH", help="a file beside the notebook to include")
@click.option("--wait", default=180.0, show_default=True, help="seconds to follow the deployment (0: do not)")
@client_options
def app_deploy(
    api: Api, as_json: bool, notebook: Path, team: str, name: str, environment: str, port: int, public: bool,
    machine_type: str, instances: int, variables: tuple[str, ...], secret_refs: tuple[str, ...],
    extra: tuple[str, ...], wait: float,
) -> int:  # fmt: skip
    """Deploy NOTEBOOK as app NAME of the team (a new numbered deployment)."""
    files = notebook_files(notebook, extra)
    env: dict[str, Any] = _pairs(variables, "--var")
    env.update({var: {"secret": s} for var, s in _pairs(secret_refs, "--secret").items()})
    made = api.call("POST", f"/teams/{team}/apps/{name}/bundles")
    sealed = bundles.seal(base64.b64decode(made["key"]), made["header"], bundles.pack(notebook.name, files))
    if len(sealed) > made["max_size"]:
        raise CliError(f"the bundle is {len(sealed)} bytes; at most {made['max_size']} are taken", EXIT_BAD_INPUT)
    sha = hashlib.sha256(sealed).hexdigest()
    target = api.call(
        "POST", f"/teams/{team}/apps/{name}/bundles/upload-url", json={"sha256": sha, "size": len(sealed)}
    )
    upload(target, sealed)
    body = {
        "notebook": notebook.name, "notebook_sha256": hashlib.sha256(files[notebook.name]).hexdigest(),
        "bundle_id": made["bundle_id"], "bundle_sha256": sha, "environment": environment,
        "machine_type": machine_type, "port": port, "env": env, "public": public, "instances": instances,
    }  # fmt: skip
    dep = api.call("POST", f"/teams/{team}/apps/{name}/deployments", json=body)
    return follow(api, as_json, team, name, dep, wait)


def upload(target: dict[str, Any], data: bytes) -> None:
    """PUT to the presigned URL: a client of its own, so envctl's token never goes there."""
    try:
        resp = httpx.request(target["method"], target["url"], content=data, headers=target["headers"], timeout=120)
    except httpx.TransportError as exc:
        raise CliError(f"the bundle's upload failed: {exc}", EXIT_FAILURE) from exc
    if resp.status_code >= 300:
        raise CliError(f"the bundle's upload was refused (HTTP {resp.status_code}): {resp.text[:300]}", EXIT_FAILURE)


def follow(api: Api, as_json: bool, team: str, name: str, dep: dict[str, Any], wait: float) -> int:
    number = dep["number"]
    if not as_json:
        print(f"deployment {number} of {team}/{name}: {dep['status']}")
    deadline = time.monotonic() + wait
    last = dep["status"]
    while wait > 0 and dep["status"] not in FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        shown = api.call("GET", f"/teams/{team}/apps/{name}")
        dep = next(d for d in shown["deployments"] if d["number"] == number)
        if dep["status"] != last and not as_json:
            print(f"deployment {number}: {dep['status']}" + (f" ({dep['message']})" if dep["message"] else ""))
        last = dep["status"]
    if as_json:
        print_json(dep)
    elif dep["status"] == "running":
        print(f"app {team}/{name} serves deployment {number} at {api.url}/apps/{team}/{name}/")
    return EXIT_FAILURE if dep["status"] == "failed" else EXIT_OK


@app.command("ls")
@TEAM
@client_options
def app_ls(api: Api, as_json: bool, team: str) -> int:
    """The team's apps: who may open them, the deployment serving, its status."""
    rows = api.call("GET", f"/teams/{team}/apps")

    def row(a: dict[str, Any]) -> dict[str, Any]:
        latest = a["deployments"][0] if a["deployments"] else {}
        return {
            **a,
            "latest": f"{latest.get('number', '-')} {latest.get('status', '')}",
            "by": latest.get("author", "-"),
            "at": when(latest.get("created_at")),
            "up": f"{sum(i['status'] == 'running' for i in a['running'])}/{a['instances']}",
        }

    columns = [("name", "name"), ("access", "access"), ("current", "serving"), ("latest", "latest"),
               ("up", "instances"), ("by", "by"), ("at", "at (UTC)")]  # fmt: skip
    return listing(rows, as_json, columns, row)


@app.command("show")
@click.argument("name")
@TEAM
@client_options
def app_show(api: Api, as_json: bool, name: str, team: str) -> int:
    """An app: its deployments (who deployed what, when, status) and its instances."""
    a = api.call("GET", f"/teams/{team}/apps/{name}")
    if as_json:
        print_json(a)
        return EXIT_OK
    print(f"app {a['team']}/{a['name']} ({a['access']}) at {a['url']}: serving deployment {a['current'] or 'none'}")
    for d in a["deployments"]:
        extra = f" (rollback of {d['rollback_of']})" if d["rollback_of"] else ""
        print(f"  {d['number']:>3} {d['status']:<11} {when(d['created_at'])} by {d['author']} on {d['version']}{extra}")
        if d["message"]:
            print(f"      {d['message']}")
    for i in a["running"]:
        print(f"  instance of {i['deployment']}: {i['status']} runtime {i['runtime_id']} restarts {i['restarts']}")
        if i.get("secrets_outdated"):
            print(f"      out of date: secrets changed since it booted ({', '.join(map(str, i['secrets_outdated']))})")
    return EXIT_OK


@app.command("logs")
@click.argument("name")
@TEAM
@click.option("--follow", "-f", is_flag=True, help="keep printing what comes (every 2 s) until Ctrl-C")
@client_options
def app_logs(api: Api, as_json: bool, name: str, team: str, follow: bool) -> int:
    """The app's output: its runtimes' logs and its cells' outputs."""
    shown = ""
    while True:
        resp = api.http.get(f"/teams/{team}/apps/{name}/logs")
        api.raise_for(resp)
        text = resp.text
        print(text[len(shown) :] if text.startswith(shown) else text, end="", flush=True)
        shown = text
        if not follow:
            return EXIT_OK
        time.sleep(2)


@app.command("stop")
@click.argument("name")
@TEAM
@client_options
def app_stop(api: Api, as_json: bool, name: str, team: str) -> int:
    """Stop serving the app (deploy or roll back to serve it again)."""
    a = api.call("POST", f"/teams/{team}/apps/{name}/stop")
    print_json(a) if as_json else print(f"app {team}/{name} stopped")
    return EXIT_OK


@app.command("rm")
@click.argument("name")
@TEAM
@client_options
def app_rm(api: Api, as_json: bool, name: str, team: str) -> int:
    """Stop the app and forget it and its deployments."""
    api.call("DELETE", f"/teams/{team}/apps/{name}")
    print_json({"removed": f"{team}/{name}"}) if as_json else print(f"app {team}/{name} removed")
    return EXIT_OK


@app.command("rollback")
@click.argument("name")
@click.argument("number", type=int)
@TEAM
@click.option("--wait", default=180.0, show_default=True, help="seconds to follow the deployment (0: do not)")
@client_options
def app_rollback(api: Api, as_json: bool, name: str, number: int, team: str, wait: float) -> int:
    """Deploy deployment NUMBER of the app again (as a new deployment)."""
    dep = api.call("POST", f"/teams/{team}/apps/{name}/rollback", json={"number": number})
    return follow(api, as_json, team, name, dep, wait)
