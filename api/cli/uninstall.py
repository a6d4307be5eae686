"""``envctl uninstall``: remove this installation (its data directory's) from the Docker engine;
``envctl uninstall --orphaned-networks``: remove the networks of installations with no container
left. Both work on this machine, like ``serve``, not through the API (runner/uninstall.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from api.cli.errors import EXIT_BAD_INPUT, EXIT_OK, CliError
from api.cli.options import Command, local_options
from api.cli.output import print_json
from api.settings import Settings, load


@click.command("uninstall", cls=Command)
@click.option("--volumes", "with_volumes", is_flag=True, help="also remove the installation's volumes (mounts' data)")
@click.option(
    "--orphaned-networks",
    is_flag=True,
    help="instead: remove the envctl networks, of any installation on this engine, whose installation has no "
    "container left (what a full ENVCTL_RUNNER_SUBNET_POOL asks for)",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    help="with --orphaned-networks: only networks that also carry this label (repeatable)",
)
@click.option("--dry-run", is_flag=True, help="show what would be removed; remove nothing")
@click.option("--yes", "-y", is_flag=True, help="remove without asking")
@local_options
def uninstall(
    config: str | None,
    as_json: bool,
    with_volumes: bool,
    orphaned_networks: bool,
    labels: tuple[str, ...],
    dry_run: bool,
    yes: bool,
) -> int:
    """Remove this installation from the Docker engine: its containers, its network and
    firewall rules, the images it alone holds (its saves and drafts; never base images or an
    image anything else uses), and with --volumes its volumes. The data directory stays."""
    from runner.backends.docker import DockerBackend

    settings = load(config)
    if labels and not orphaned_networks:
        raise CliError("--label goes with --orphaned-networks", EXIT_BAD_INPUT)
    if orphaned_networks and with_volumes:
        raise CliError("--volumes goes with an installation's own uninstall, not --orphaned-networks", EXIT_BAD_INPUT)
    client = DockerBackend.from_settings(settings).client
    try:
        if orphaned_networks:
            return _orphans(client, _label_filter(labels), as_json=as_json, dry_run=dry_run, yes=yes)
        return _installation(settings, client, with_volumes=with_volumes, as_json=as_json, dry_run=dry_run, yes=yes)
    finally:
        client.close()


def _label_filter(labels: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(c in item for c in "\0\n"):
            raise CliError(f"--label {item!r} is not KEY=VALUE", EXIT_BAD_INPUT)
        out[key.strip()] = value.strip()
    return out


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError("nothing removed: confirm with --yes (there is no terminal to ask on)", EXIT_BAD_INPUT)
    if not click.confirm(question, default=False, err=True):
        raise CliError("nothing removed", EXIT_BAD_INPUT)


def _installation(
    settings: Settings, client: Any, *, with_volumes: bool, as_json: bool, dry_run: bool, yes: bool
) -> int:
    from api.dbschema import check_current
    from envs.kit.db import Database
    from runner import uninstall as removal

    url = settings.effective_database_url
    if not settings.database_url and not (Path(settings.data_dir) / "envctl.db").exists():
        raise CliError(
            f"no envctl installation in {settings.data_dir} (no database there); nothing removed", EXIT_BAD_INPUT
        )
    db = Database(url)
    try:
        check_current(db.engine)
        installation = removal.recorded_installation(db)
        if installation is None:
            done: dict[str, Any] = {"installation": None, "data_dir": str(settings.data_dir), "dry_run": dry_run}
            if as_json:
                print_json(done)
            else:
                print(f"the installation in {settings.data_dir} never started: nothing of it is on the engine")
            return EXIT_OK
        removal.refuse_if_serving(settings, db)
        swarm = _swarm_manager(settings)
        plan = removal.plan(settings, db, client, installation, with_volumes=with_volumes, swarm=swarm)
    finally:
        db.dispose()
    if dry_run:
        if as_json:
            print_json({**plan.to_dict(), "dry_run": True})
        else:
            _show_plan(plan)
        return EXIT_OK
    if not as_json:
        _show_plan(plan)
    _confirm(f"remove these from the Docker engine (installation {plan.installation})?", yes)
    done = removal.carry_out(
        client, plan, swarm[0] if swarm else None, settings.runner_labels, settings.swarm_attach_engine
    )
    if as_json:
        print_json(done)
    else:
        _show_done(done)
    return EXIT_OK


def _swarm_manager(settings: Settings) -> tuple[Any, str] | None:
    """The Swarm manager's client and address when this installation's runtimes run on a swarm."""
    if settings.runner_backend != "swarm":
        return None
    from runner.backends.swarm import SwarmBackend

    backend = SwarmBackend.from_settings(settings)
    return backend.client, backend.manager


def _names(items: list[str], empty: str = "none") -> str:
    return ", ".join(items) if items else empty


def _show_plan(plan: Any) -> None:
    print(f"installation {plan.installation} (data: {plan.data_dir}) holds on the Docker engine:")
    containers = [f"{c['name']} ({c['state']})" for c in plan.containers]
    print(f"  containers: {_names(containers)}")
    network = f"{plan.network.network} ({', '.join(plan.network.subnets)})" if plan.network else "none"
    print(f"  network:    {network}, and its firewall rules")
    print(f"  images:     {_names([i.tags[0] if i.tags else i.image_id[:19] for i in plan.images])}")
    for image in plan.kept_images:
        print(f"  kept:       {image.what} ({image.image_id[:19]}): {image.reason}")
    if plan.swarm is not None:
        sw = plan.swarm
        print(f"  on the swarm ({sw.manager}):")
        for kind in ("services", "secrets", "configs", "networks"):
            print(f"    {kind + ':':10s}{_names([x['name'] for x in getattr(sw, kind)])}")
        if sw.volumes:
            shown = [f"{v['volume']} (on {v['node'] or v['node_id']})" for v in sw.volumes]
            print(f"    volumes:  {_names(shown)}: kept, even with --volumes (Swarm's manager cannot remove a")
            print("              node's volume; the report says how to on each node)")
    if plan.volumes:
        print(f"  volumes:    {_names(plan.volumes)}")
    elif plan.kept_volumes:
        print(f"  volumes:    {len(plan.kept_volumes)} kept (--volumes removes them): {_names(plan.kept_volumes)}")


def _show_done(done: dict[str, Any]) -> None:
    if "swarm" in done:
        sw = done["swarm"]
        for kind in ("services", "secrets", "configs", "networks"):
            for name in sw[kind]:
                print(f"removed swarm {kind[:-1]} {name}")
        print(f"network guard rules on the nodes: {sw['rules']}")
        print(f"network configurations on the nodes: {sw.get('node_networks', 'none')}")
        for note in sw.get("volumes_kept", []):
            print(f"kept volume {note}")
    for c in done["containers"]:
        print(f"removed container {c['name']}" + (f" (runtime {c['runtime']})" if c["runtime"] else ""))
    if done["network"]:
        net = done["network"]
        print(f"removed network {net['network']} ({', '.join(net['subnets'])})")
    elif done["network_kept"]:
        print(f"kept the network: {done['network_kept']}")
    print(f"firewall rules: {done['rules']}")
    for image in done["images"]:
        print(f"removed image {image['tags'][0] if image['tags'] else image['image_id'][:19]} ({image['what']})")
    for image in done["kept_images"]:
        print(f"kept image {image['image_id'][:19]} ({image['what']}): {image.get('reason', '')}")
    for name in done["volumes"]:
        print(f"removed volume {name}")
    if done["kept_volumes"]:
        print(f"kept volumes (--volumes removes them): {_names(done['kept_volumes'])}")
    print(f"the data directory {done['data_dir']} stays (database, results); remove it yourself when done with it")


def _orphans(client: Any, labels: dict[str, str], *, as_json: bool, dry_run: bool, yes: bool) -> int:
    from runner.backends import netguard

    orphans = [n for n in netguard.envctl_networks(client, labels) if not n.containers]
    if as_json and (dry_run or not orphans):
        print_json({"networks": [n.to_dict() for n in orphans], "removed": [], "dry_run": dry_run})
        return EXIT_OK
    if not as_json:
        if not orphans:
            print("no envctl network on this engine is without a container of its installation")
            return EXIT_OK
        print("envctl networks whose installation has no container left on this engine:")
        for n in orphans:
            print(f"  {n.describe()}")
    if dry_run:
        return EXIT_OK
    _confirm(f"remove these {len(orphans)} networks and their firewall rules?", yes)
    removed = netguard.remove_orphaned(client, orphans)
    if as_json:
        print_json({"networks": [n.to_dict() for n in orphans], "removed": [n.to_dict() for n in removed]})
    else:
        for n in removed:
            print(f"removed network {n.network} and its firewall rules")
        left = len(orphans) - len(removed)
        if left:
            print(f"kept {left}: their installation made a container meanwhile")
    return EXIT_OK
