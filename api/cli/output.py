"""What the CLI shows: ``--json`` for scripts, tables and key/value blocks for people, live
progress on stderr, and the one download helper every downloading command uses.

Two audiences, told apart by whether the stream is a terminal:

- stdout a terminal: tables and blocks are drawn by rich (bold headers, coloured states, cells
  wrapped to the window). Piped or redirected: plain columns of text separated by two spaces,
  headers in capitals, no escape codes and no trailing blanks, so ``awk``, ``cut`` and tests
  can read them. A table longer than ``RICH_TABLE_ROWS`` rows is written plainly everywhere
  (rich lays out a few thousand rows a second; ``runtime changes`` can list tens of thousands).
- stderr a terminal: progress is one live line (rich) with a spinner, what is happening, bytes
  with a bar and the rate while data moves, and the time so far. Otherwise each new phase is
  one plain line and byte counts are not shown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, AnyStr

import httpx

from api.cli.client import CHUNK, STREAM_TIMEOUT, Api
from api.cli.errors import EXIT_OK, CliError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

RICH_TABLE_ROWS = 1000

#: A runtime's ``state_color`` as a terminal colour.
STATE_STYLES = {"gray": "bright_black", "yellow": "yellow", "green": "green", "red": "red"}


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def write_out(data: AnyStr, stream: IO[AnyStr]) -> None:
    """Write ``data`` in pieces of at most 8 KiB. Python's buffered writer takes a pipe that
    closes in the middle of one large write for a short write, not an error, so the output
    would end without the broken pipe ever being noticed."""
    for start in range(0, len(data), 8192):
        stream.write(data[start : start + 8192])


def print_json(data: Any) -> None:
    write_out(json.dumps(data, indent=2, default=str) + "\n", sys.stdout)


def when(value: str | None) -> str:
    if not value:
        return "-"
    return value.replace("T", " ")[:19]


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def first_line(text: str | None, width: int = 60) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def short_digest(digest: str | None) -> str:
    return (digest or "-")[:19]


@dataclass(frozen=True)
class Styled:
    """A cell's text with a rich style for terminals (plain text elsewhere)."""

    text: str
    style: str

    def __str__(self) -> str:
        return self.text


def _console(*, stderr: bool = False) -> Console:
    """A rich console on the current sys.stdout/sys.stderr, taking no markup or emoji from the text."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False, emoji=False)


def _cell(value: Any) -> str | Styled:
    if isinstance(value, Styled):
        return value
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """``rows`` as a table of ``columns`` (key, title); ``(none)`` when there are no rows. A
    value that is None shows as ``-``; a ``Styled`` value is coloured on a terminal."""
    if not rows:
        print("(none)")
        return
    titles = [title.upper() for _, title in columns]
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    if not is_terminal(sys.stdout) or len(rows) > RICH_TABLE_ROWS:
        _plain_table(titles, cells)
        return
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=None, show_edge=False, pad_edge=False, header_style="bold", highlight=False)
    for title in titles:
        grid.add_column(title)
    for row in cells:
        grid.add_row(*(Text(c.text, style=c.style) if isinstance(c, Styled) else Text(c) for c in row))
    _console().print(grid)


def listing(
    items: list[dict[str, Any]],
    as_json: bool,
    columns: Sequence[tuple[str, str]],
    row: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> int:
    """What a listing command prints: ``items`` as they came for ``--json``, else a table of
    ``columns`` with ``row`` making each item a row (adding the cells it shows formatted)."""
    if as_json:
        print_json(items)
    else:
        table([row(item) for item in items], columns)
    return EXIT_OK


def _plain_table(titles: list[str], cells: list[list[str | Styled]]) -> None:
    text = [[str(c) for c in row] for row in cells]
    widths = [max(len(title), *(len(row[i]) for row in text)) for i, title in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in text]
    write_out("\n".join(lines) + "\n", sys.stdout)


def fields(pairs: Sequence[tuple[str, str | Styled]]) -> None:
    """A block of ``key  value`` lines, keys aligned."""
    if not is_terminal(sys.stdout):
        width = max(len(k) for k, _ in pairs)
        for key, value in pairs:
            print(f"{key.ljust(width)}  {value}".rstrip())
        return
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in pairs:
        grid.add_row(Text(key), Text(value.text, style=value.style) if isinstance(value, Styled) else Text(value))
    _console().print(grid)


# ---------------------------------------------------------------------------- progress


class Progress:
    """What long work is doing, on stderr; see the module's docstring for the two ways it looks.

    ``update(text)`` says what happens now (on a terminal the live line; elsewhere a line when
    the text changed, unless ``echo_updates`` is off); ``transfer(text, done, total)`` adds
    bytes to it (terminal only); ``line(text)`` prints a line that stays (above the live line);
    ``clear()`` takes the live line away before other output. Quiet (``--json``): nothing.
    """

    def __init__(self, quiet: bool, *, echo_updates: bool = True) -> None:
        self.quiet = quiet
        self.live = not quiet and is_terminal(sys.stderr)
        self.echo_updates = echo_updates
        self.started = time.monotonic()
        self.last: str | None = None
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.live:
            self._show(description=text, bytes=False)
        elif self.echo_updates and text != self.last:
            print(f"  {text}", file=sys.stderr, flush=True)
        self.last = text

    def transfer(self, text: str, done: int, total: int | None) -> None:
        if self.live:
            self._show(description=text, completed=done, total=total, bytes=True)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            from rich.text import Text

            self._bar.console.print(Text(text))
        else:
            print(text, file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.clear()

    def _show(self, **task: Any) -> None:
        if self._bar is None:
            self._bar = _rich_progress(self.started)
            self._bar.start()
            self._task = self._bar.add_task("", total=None)
        assert self._task is not None
        if task["bytes"]:
            self._bar.update(self._task, **task)
        else:  # a transfer that ended left the task finished, its spinner stopped: start it again
            self._bar.reset(self._task, **task)


def _rich_progress(started: float) -> RichProgress:
    """A transient rich progress line: spinner, text, [bar, bytes, rate while bytes move], time."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class WhileBytesMove(ProgressColumn):
        def __init__(self, inner: ProgressColumn) -> None:
            super().__init__()
            self.inner = inner

        def render(self, task: Task) -> Any:
            return self.inner.render(task) if task.fields.get("bytes") else Text("")

    class Elapsed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{time.monotonic() - started:5.1f} s", style="dim")

    return RichProgress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        WhileBytesMove(BarColumn()),
        WhileBytesMove(DownloadColumn(binary_units=True)),
        WhileBytesMove(TransferSpeedColumn()),
        Elapsed(),
        console=_console(stderr=True),
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )


# ---------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class Downloaded:
    size: int
    sha256: str


def download(
    api: Api,
    path: str,
    dest: Path | None,
    *,
    what: str,
    quiet: bool,
    preparing: str | None = None,
    check: Callable[[Downloaded], None] | None = None,
    timeout: httpx.Timeout = STREAM_TIMEOUT,
) -> Downloaded:
    """GET ``path`` into the file ``dest``, or to stdout when ``dest`` is None.

    The bytes go to a hidden file beside ``dest`` that becomes ``dest`` only once all of them
    arrived (as many as the server's Content-Length said) and ``check`` passed; after any
    failure it is removed and nothing was written. A terminal shows ``preparing`` until the
    server answers, then bytes, a bar and the rate; ``what`` names the download in errors.
    """
    part = None if dest is None else dest.with_name(f".{dest.name}.envctl-{os.getpid()}.part")
    digest = hashlib.sha256()
    done = 0
    with Progress(quiet or dest is None) as progress:
        if preparing:
            progress.update(preparing)
        try:
            with api.http.stream("GET", path, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    api.raise_for(resp)
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with contextlib.ExitStack() as stack:
                    sink: IO[bytes] = sys.stdout.buffer if part is None else stack.enter_context(open(part, "wb"))
                    for chunk in resp.iter_bytes(CHUNK):
                        write_out(chunk, sink)
                        digest.update(chunk)
                        done += len(chunk)
                        progress.transfer(f"downloading {what}", done, total)
                    sink.flush()
            if total is not None and done != total:
                raise CliError(f"{what} ended after {done} of {total} bytes; nothing was written")
            got = Downloaded(done, digest.hexdigest())
            if check is not None:
                check(got)
        except httpx.TransportError as exc:
            if part is not None:
                part.unlink(missing_ok=True)
            raise api.unreachable(exc) from exc
        except BaseException:
            if part is not None:
                part.unlink(missing_ok=True)
            raise
    if part is not None and dest is not None:
        os.replace(part, dest)
    return got
