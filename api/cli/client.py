"""The CLI's way to the API: where the server and the token come from, one HTTP client that
turns the API's error envelope into ``CliError``, and the reader of an execution's event
stream (server-sent events, resumed with ``Last-Event-ID`` after a dropped connection).

Nothing here prints to stdout; the event-stream reader says on stderr that it reconnects.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

from api.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, CliError
from api.settings import load
from envs.kit.errors import EnvctlError

DEFAULT_URL = "http://127.0.0.1:8700"
# Keep-alives come every 15 s; a read that waits much longer means the connection is dead.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=45.0)
# Exporting answers once the whole archive is written, loading once it is loaded: both can take
# minutes for big images, so their reads wait much longer than other calls.
ARCHIVE_TIMEOUT = httpx.Timeout(30.0, read=3600.0)
RECONNECT_FOR = 60.0  # seconds of failed reconnects before giving up on following
CHUNK = 1024 * 1024

OutputHandler = Callable[[int, dict[str, Any]], None]


def config_file() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "envctl" / "config.yaml"


def _client_config() -> dict[str, Any]:
    path = config_file()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {exc}", EXIT_BAD_INPUT) from exc
    return data if isinstance(data, dict) else {}


def _find_token(token: str | None, conf: dict[str, Any]) -> str | None:
    if token:
        return token
    if os.environ.get("ENVCTL_TOKEN"):
        return os.environ["ENVCTL_TOKEN"]
    if conf.get("token"):
        return str(conf["token"])
    try:
        token_file = load().admin_token_file
    except EnvctlError:
        return None
    if token_file.is_file():
        return token_file.read_text().strip() or None
    return None


def ref_path(ref: str) -> str:
    """A reference as a URL path segment: ``/`` ``@`` ``:`` stay, anything else is quoted."""
    return quote(ref, safe="/@:")


class Api:
    """A thin HTTP client that turns error envelopes into ``CliError``."""

    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def fork(self) -> Api:
        """Another client of the same server with the same token, with connections of its own
        (for a thread beside the main one, such as a lease's heartbeat)."""
        other = Api(self.url, None)
        other.http.headers.update(self.http.headers)
        return other

    @classmethod
    def connect(cls, url: str | None, token: str | None) -> Api:
        """The server and token from the flags, else ``ENVCTL_URL``/``ENVCTL_TOKEN``, else the
        config file, else the default URL and the admin token ``envctl serve`` wrote."""
        conf = _client_config()
        return cls(str(url or os.environ.get("ENVCTL_URL") or conf.get("url") or DEFAULT_URL), _find_token(token, conf))

    def unreachable(self, exc: Exception) -> CliError:
        return CliError(
            f"cannot reach envctl at {self.url} ({exc.__class__.__name__}); is `envctl serve` "
            "(or `make run`) running? Set --url or ENVCTL_URL to another server."
        )

    @staticmethod
    def raise_for(resp: httpx.Response) -> None:
        """Turn an error answer (a read response) into a ``CliError``: 400/422 exit 2, else 1."""
        if resp.status_code < 400:
            return
        try:
            err = resp.json()["error"]
            message = err["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:500] or resp.reason_phrase
        code = EXIT_BAD_INPUT if resp.status_code in (400, 422) else EXIT_FAILURE
        raise CliError(f"{message} (HTTP {resp.status_code})", code, resp.status_code, server_message=message)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        self.raise_for(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def runtime(self, ident: str) -> dict[str, Any]:
        """A runtime by id or by name: ``TEAM/NAME`` is the team's runtime; ``NAME`` your own
        of that name, else the one team runtime of that name you see (several: an error naming
        them as ``TEAM/NAME``)."""
        if ident.startswith("rt_"):
            result: dict[str, Any] = self.call("GET", f"/runtimes/{ident}")
            return result
        team, _, name = ident.rpartition("/")
        named = [dict(rt) for rt in self.call("GET", "/runtimes") if rt["name"] == name]
        found = [rt for rt in named if rt.get("team") == (team or None)] or ([] if team else named)
        if len(found) == 1:
            return found[0]
        if found:
            which = ", ".join(f"{rt['team']}/{rt['name']}" for rt in found)
            raise CliError(f"{len(found)} team runtimes are named {name!r}: say which, {which}", EXIT_BAD_INPUT)
        raise CliError(f"no runtime named or with id {ident!r}; `envctl runtime ls` lists yours")

    def close(self) -> None:
        self.http.close()


# ---------------------------------------------------------------------------- event stream


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Server-sent events from the lines of a stream (``event:``, ``data:``, ``id:``; ``:``
    starts a comment; a blank line ends an event)."""
    event, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


class _StreamEnded(Exception):
    """The event stream closed before the execution's final status came."""


class ExecutionFollower:
    """Follows one execution's ``/events`` to its final status. A dropped connection is
    opened again with ``Last-Event-ID``, so every output is handled once and in order."""

    def __init__(self, api: Api, execution_id: str, on_output: OutputHandler | None = None) -> None:
        self.api = api
        self.execution_id = execution_id
        self.on_output = on_output
        self.last_id: str | None = None
        self.final: dict[str, Any] | None = None
        self.reconnects = 0
        self._lost_at: float | None = None

    def run(self) -> dict[str, Any]:
        """The final ``status`` event's data: ``status``, ``execution_count``, ``truncated``."""
        delay = 0.1
        while self.final is None:
            try:
                self._stream()
                if self.final is None:
                    raise _StreamEnded("the event stream ended before the execution did")
            except (httpx.TransportError, _StreamEnded) as exc:
                now = time.monotonic()
                if self._lost_at is None:
                    self._lost_at, delay = now, 0.1
                    print(
                        f"envctl: lost the event stream of {self.execution_id} ({exc.__class__.__name__}); "
                        "reconnecting ...",
                        file=sys.stderr,
                    )
                elif now - self._lost_at > RECONNECT_FOR:
                    raise CliError(
                        f"lost the connection to envctl at {self.api.url} while following execution "
                        f"{self.execution_id} and could not reconnect for {RECONNECT_FOR:.0f} s; the cell keeps "
                        f"running in its runtime (GET /executions/{self.execution_id} shows it)"
                    ) from exc
                self.reconnects += 1
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return self.final

    def _stream(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id is not None else {}
        path = f"/executions/{self.execution_id}/events"
        with self.api.http.stream("GET", path, headers=headers, timeout=STREAM_TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                self.api.raise_for(resp)
            self._lost_at = None
            for ev in parse_sse(resp.iter_lines()):
                if ev.event == "output":
                    index = int(ev.id) if ev.id and ev.id.isdigit() else -1
                    if self.on_output is not None:
                        self.on_output(index, json.loads(ev.data))
                    if ev.id is not None:
                        self.last_id = ev.id
                elif ev.event == "status":
                    self.final = dict(json.loads(ev.data))
                    return
