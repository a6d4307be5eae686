"""``envctl kube rbac``: the least-privilege RBAC manifest for the kubernetes backend
(``runner/backends/kube_rbac.yaml``) for a namespace, to pipe into ``kubectl apply -f -``."""

from __future__ import annotations

import click

from api.cli.errors import EXIT_OK
from api.cli.options import Command, Group
from runner.backends import kube_rbac


@click.group("kube", cls=Group)
def kube() -> None:
    """The kubernetes backend's cluster side."""


@kube.command("rbac", cls=Command)
@click.option("--namespace", default="envctl", show_default=True, help="the namespace of ENVCTL_KUBE_NAMESPACE")
@click.option("--name", default="envctl", show_default=True, help="the ServiceAccount (and Role) name")
@click.option(
    "--attach",
    is_flag=True,
    help="also grant pods/exec (create): needed only to attach runtimes to pods envctl did not start "
    "(ENVCTL_RUNNER_ATTACH_ALLOW)",
)
def rbac(namespace: str, name: str, attach: bool) -> int:
    """Print the ServiceAccount, Role, ClusterRole and bindings envctl needs, nothing more."""
    click.echo(kube_rbac.manifest(namespace, name, attach=attach), nl=False)
    return EXIT_OK
