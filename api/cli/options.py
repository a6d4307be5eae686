"""How commands are declared: the click classes every envctl command is made of, and the
options every client command and every local command takes.

A command module writes ``@group.command(...)`` and ``@client_options`` and gets an ``Api``
and ``as_json`` handed in; it returns its exit code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from api.cli.client import DEFAULT_URL, Api
from api.cli.errors import OutputClosedError

F = TypeVar("F", bound=Callable[..., Any])


class Formatter(click.HelpFormatter):
    """Help and usage as envctl always printed them: ``usage:`` in lower case."""

    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        super().write_usage(prog, args, "usage: " if prefix is None else prefix)


class Context(click.Context):
    formatter_class = Formatter


class Command(click.Command):
    context_class = Context


class Group(click.Group):
    context_class = Context
    command_class = Command
    group_class = type  # subgroups are of the same class

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they were declared, most used first


class RootGroup(Group):
    """``envctl`` itself: a broken pipe anywhere below (help included) leaves as ``OutputClosedError``."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError as exc:
            raise OutputClosedError from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise OutputClosedError from exc


class DefaultGroup(Group):
    """A group whose first command is also what it does without one:
    ``envctl results [RUNTIME]`` is ``envctl results ls [RUNTIME]``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        help_names = set(self.get_help_option_names(ctx))
        if not args or (args[0] not in self.commands and args[0] not in help_names):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


def client_options(func: F) -> F:
    """``--url``, ``--token`` and ``--json``; the command gets ``api`` and ``as_json``."""

    @click.option("--url", metavar="URL", help=f"envctl API (default: ENVCTL_URL, the config file, {DEFAULT_URL})")
    @click.option(
        "--token", metavar="TOKEN", help="API token (default: ENVCTL_TOKEN, the config file, the admin token)"
    )
    @click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
    @functools.wraps(func)
    def wrapper(*args: Any, url: str | None, token: str | None, **kwargs: Any) -> Any:
        api = Api.connect(url, token)
        try:
            return func(*args, api=api, **kwargs)
        finally:
            api.close()

    return wrapper  # type: ignore[return-value]


def local_options(func: F) -> F:
    """``--config`` and ``--json`` of the commands that work on this machine, not through the API."""
    func = click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")(func)
    return click.option("--config", metavar="FILE", help="YAML config file (default: ENVCTL_CONFIG)")(func)
