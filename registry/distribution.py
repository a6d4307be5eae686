"""The image registry envctl uses: CNCF distribution (Debian's ``docker-registry``) run and
watched by ``envctl serve``, an external one by URL, or none.

The setting ``registry`` picks: ``managed`` (the default when the program exists) runs
``docker-registry serve`` on a loopback port with its storage, configuration and log under
``<data dir>/registry``, trusting only tokens envctl signs (``auth.token``; envctl's
``/registry/token`` is the realm). A registry that dies is started again after 1, 2, 4 ... 30
seconds. ``off`` runs none; a URL names a registry run elsewhere. A managed registry whose
program is missing leaves envctl serving without one, and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from envs.kit.errors import InvalidInputError
from registry import signing
from registry.errors import RegistryUnavailableError
from registry.settings import Settings

log = logging.getLogger("envctl.registry")

SERVICE = "envctl-registry"  # the token's ``aud`` and the registry's ``auth.token.service``
ISSUER = "envctl"  # the token's ``iss`` and ``auth.token.issuer``
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0  # a registry that ran this long starts its backoff afresh when it dies


def registry_dir(settings: Settings) -> Path:
    return settings.data_dir / "registry"


def signing_key(settings: Settings) -> signing.SigningKey:
    """The key tokens are signed with, made once under the data directory."""
    return _signing_key(registry_dir(settings))


@functools.lru_cache(maxsize=8)
def _signing_key(directory: Path) -> signing.SigningKey:
    return signing.load_or_create(directory)


@dataclass(frozen=True)
class Plan:
    """What ``envctl serve`` does about a registry: ``mode`` is managed, external or off."""

    mode: str
    url: str | None
    reason: str


def plan(settings: Settings) -> Plan:
    choice = settings.registry.strip()
    binary = settings.registry_binary
    if choice == "off":
        return Plan("off", None, "the setting registry is off")
    if choice in ("", "managed"):
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            return Plan(
                "off",
                None,
                f"no registry program at {binary} (apt-get install docker-registry, or set ENVCTL_REGISTRY "
                "to an external registry's URL)",
            )
        return Plan("managed", f"http://127.0.0.1:{port_of(settings)}", f"envctl runs {binary}")
    parts = urlsplit(choice)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(
            f"registry: {choice!r} is not managed, off, or an http(s) URL of a registry", field="registry"
        )
    return Plan("external", choice.rstrip("/"), "an external registry")


def port_of(settings: Settings) -> int:
    return settings.registry_port or settings.api_port + 1


def realm_of(settings: Settings) -> str:
    """The URL of envctl's token endpoint as clients on this machine reach it."""
    host = settings.api_host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104  (a comparison, not a bind)
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}/registry/token"


def registry_config(settings: Settings, secret: str, readonly: bool = False) -> dict[str, Any]:
    """The configuration file of the managed registry; ``readonly`` while garbage is collected
    (pulls are served, pushes and deletes refused)."""
    base = registry_dir(settings)
    key = signing_key(settings)
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(base / "storage")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {"readonly": {"enabled": readonly}},
        },
        "http": {
            "addr": f"{_bracketed(settings.registry_listen or '127.0.0.1')}:{port_of(settings)}",
            "secret": secret,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "auth": {
            "token": {
                "realm": realm_of(settings),
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(key.cert_path),
            }
        },
    }


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # loaded here, not in the forked child
    except (OSError, AttributeError):  # pragma: no cover  (not Linux)
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:  # pragma: no cover  (runs in the child before exec)
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the registry ends when envctl does, even on SIGKILL


class ManagedRegistry:
    """One ``docker-registry serve`` process: started, watched (restarted with backoff when it
    dies; its output goes to ``<data dir>/registry/registry.log``) and stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = registry_dir(settings)
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.pid_path = self.dir / "registry.pid"
        self.url = f"http://127.0.0.1:{port_of(settings)}"
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait: float = 15.0, readonly: bool = False) -> None:
        """Write the configuration, start the registry and wait until it answers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "storage").mkdir(exist_ok=True)
        self._stop_leftover()
        secret_path = self.dir / "http-secret"
        if not secret_path.is_file():
            secret_path.write_text(secrets.token_hex(32))
            secret_path.chmod(0o600)
        config = registry_config(self.settings, secret_path.read_text().strip(), readonly)
        text = yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)
        self.config_path.chmod(0o600)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._watch, name="registry-watcher", daemon=True)
        self._thread.start()
        self.wait_ready(wait)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers():
                return
            time.sleep(0.05)
        raise RegistryUnavailableError(
            f"the registry at {self.url} did not answer within {timeout:.0f} s; see {self.log_path}",
            details={"log": str(self.log_path)},
        )

    def answers(self) -> bool:
        """Whether the registry answers ``/v2/`` by asking for a token (401), as configured."""
        try:
            return httpx.get(self.url + "/v2/", timeout=1.0).status_code == 401
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int | None:
        with self._lock:
            proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout)
        self.pid_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the watcher
    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as out:
            proc = subprocess.Popen(
                [str(self.settings.registry_binary), "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,  # noqa: PLW1509
            )
        self.pid_path.write_text(str(proc.pid))
        return proc

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as exc:
                log.error("cannot start the registry %s: %s", self.settings.registry_binary, exc)
                proc = None
            with self._lock:
                self._proc = proc
            code = proc.wait() if proc is not None else None
            if self._stopping.is_set():
                return
            if time.monotonic() - started > HEALTHY_AFTER:
                delay = 1.0
            self.restarts += 1
            log.warning(
                "the registry exited (code %s); starting it again in %.0f s (its log: %s)", code, delay, self.log_path
            )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_BACKOFF)

    def _stop_leftover(self) -> None:
        """A registry left by an envctl that was killed (its pid file names it) is stopped."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)
