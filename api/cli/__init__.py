"""The ``envctl`` command line.

Everything but ``serve``, ``db``, ``base build`` and ``uninstall`` is a client of the REST API: the URL comes
from ``--url``, ``ENVCTL_URL`` or the config file (``~/.config/envctl/config.yaml``: ``url``,
``token``), the token from ``--token``, ``ENVCTL_TOKEN``, the config file, or the file
``envctl serve`` wrote in its data directory.

Tables for people, ``--json`` for scripts. Exit codes: 0 success, 1 failure, 2 bad input
(a usage error, or the API answering 400 or 422), 130 after Ctrl-C, 141 when the reader of
stdout went away (``envctl runtime changes demo | head``), quietly.

Where each command lives (``api/cli/``):

==========================================================  =================
command                                                     module
==========================================================  =================
``runtime create|ls|show|start|stop|rm|log|reset|changes``  ``runtimes.py``
``runtime set|env``                                          ``runtimes.py``
``machine-types``                                           ``runtimes.py``
``nodes``                                                   ``nodes.py``
``exec``                                                    ``cells.py``
``run`` (a notebook)                                        ``notebooks.py``
``save``, ``import``                                        ``saves.py``
``env ls|show|lineage|rm|export|load``                      ``environments.py``
``env build``                                               ``builds.py``
``env packages|diff``                                       ``packages.py``
``results [ls]|get``                                        ``results.py``
``serve``, ``db upgrade|current``, ``base build``           ``local.py``
``uninstall [--orphaned-networks]``                         ``uninstall.py``
``login``, ``user create``, ``team …``, ``token …``         ``teams.py``
``publish``, ``unpublish``, ``catalog``, ``registry gc``    ``catalog.py``
``team events``                                             ``catalog.py``
``volume ls|create|rm``                                     ``volumes.py``
``secret set|list|rm``                                       ``secrets.py``
``app deploy|ls|show|logs|stop|rm|rollback``                 ``apps.py``
``kube rbac``                                               ``kube.py``
==========================================================  =================

What they share:

- ``client.py``: the server and token, ``Api`` (HTTP; the API's errors become ``CliError``
  with the exit code), the event-stream reader ``ExecutionFollower``.
- ``output.py``: ``--json``, tables, live progress (rich on a terminal, plain lines in a pipe),
  ``download`` for every command that writes a file from the API.
- ``operations.py``: following a 202 operation (save, build). ``errors.py``: ``CliError`` and the
  exit codes. ``options.py``: the click classes and the ``--url/--token/--json`` options.
- This file: the command tree and ``main``, which turns every error into its exit code.

Commands are click commands (``@group.command``) that take an ``Api`` and return an exit code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from api.cli import (
    apps,
    catalog,
    cells,
    environments,
    kube,
    local,
    nodes,
    notebooks,
    results,
    runtimes,
    saves,
    secrets,
    teams,
    transfers,
    uninstall,
    volumes,
)
from api.cli.client import parse_sse
from api.cli.environments import lineage_lines
from api.cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    CliError,
    OutputClosedError,
)
from api.cli.notebooks import runtime_name_for
from api.cli.options import RootGroup
from api.settings import help_lines
from envs.kit.errors import EnvctlError, InvalidInputError

# main and cli are the entry points; the other three were importable from api/cli.py before it
# became this package, and tests still take them from here.
__all__ = ["cli", "lineage_lines", "main", "parse_sse", "runtime_name_for"]

_SETTINGS = "\n".join(f"  {k:<34} {v}" for k, v in help_lines())


@click.group(
    "envctl",
    cls=RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    epilog=f"\b\nsettings (environment variables):\n{_SETTINGS}",
)
def cli() -> None:
    """Container environments for notebooks."""


for _command in (
    local.serve,
    local.db,
    local.base,
    uninstall.uninstall,
    runtimes.runtime,
    saves.save,
    saves.import_,
    transfers.push,
    transfers.pull,
    environments.env,
    runtimes.machine_types,
    nodes.nodes,
    cells.exec_,
    notebooks.run,
    results.results,
    teams.login,
    teams.user,
    teams.team,
    teams.token,
    catalog.publish,
    catalog.unpublish,
    catalog.catalog,
    catalog.registry,
    volumes.volume,
    secrets.secret,
    apps.app,
    kube.kube,
):
    cli.add_command(_command)
teams.team.add_command(catalog.team_events)


def _usage_error(exc: click.UsageError) -> None:
    """As click shows it, with ``envctl:`` before the message like every other error."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()
        return
    if exc.ctx is not None:
        print(exc.ctx.get_usage(), file=sys.stderr)
        print(f"Try '{exc.ctx.command_path} --help' for help.", file=sys.stderr)
    print(f"envctl: {exc.format_message()}", file=sys.stderr)


def _quiet_after_broken_pipe() -> int:
    """The reader of stdout went away: leave without a word. Python flushes stdout once more
    as it exits, which would fail again and print a traceback; point it at /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout): nothing to do
        pass
    return EXIT_BROKEN_PIPE


def _run(args: list[str]) -> int:
    """The command's exit code; every error it raises becomes its message and exit code."""
    try:
        code = cli.main(args=args, prog_name="envctl", standalone_mode=False)
    except click.UsageError as exc:
        _usage_error(exc)
        raise SystemExit(EXIT_BAD_INPUT) from exc
    except click.ClickException as exc:
        print(f"envctl: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except click.Abort:  # click's form of KeyboardInterrupt
        print("envctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CliError as exc:
        print(f"envctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except InvalidInputError as exc:
        print(f"envctl: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EnvctlError as exc:
        print(f"envctl: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code. A usage error raises ``SystemExit(2)``
    (after printing the usage), as it always did."""
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a broken pipe shows here when the output fitted in the buffer
    except (OutputClosedError, BrokenPipeError):
        return _quiet_after_broken_pipe()
    return code
