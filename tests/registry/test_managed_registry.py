"""The registry ``envctl serve`` runs: its configuration, the watcher that starts it again, the
signing key made once, and ``envctl serve`` with and without the program."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509

from api import startup
from api.dbschema import upgrade
from api.settings import Settings
from envs.kit.errors import InvalidInputError
from registry import distribution, signing
from registry.distribution import ManagedRegistry
from tests.fixtures.registry import start_registry
from tests.fixtures.server import Server
from tests.fixtures.services import _free_port, need


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _until(check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def managed(tmp_path: Path) -> Iterator[ManagedRegistry]:
    settings = Settings(data_dir=tmp_path / "data", api_port=_free_port(), registry_port=_free_port())
    yield from start_registry(settings)


def test_the_managed_registry_keeps_its_storage_under_the_data_dir_and_trusts_only_envctls_tokens(
    managed: ManagedRegistry,
) -> None:
    config = yaml.safe_load(managed.config_path.read_text())
    data = managed.settings.data_dir

    assert config["http"]["addr"] == f"127.0.0.1:{managed.settings.registry_port}"
    assert config["storage"]["filesystem"]["rootdirectory"] == str(data / "registry" / "storage")
    assert config["auth"]["token"] == {
        "realm": f"http://127.0.0.1:{managed.settings.api_port}/registry/token",
        "service": distribution.SERVICE,
        "issuer": distribution.ISSUER,
        "rootcertbundle": str(data / "registry" / signing.CERT_FILE),
    }
    challenge = httpx.get(managed.url + "/v2/").headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="http://127.0.0.1:') and 'service="envctl-registry"' in challenge
    assert managed.log_path.stat().st_size > 0


def test_a_registry_that_dies_is_started_again_and_stop_ends_it(managed: ManagedRegistry) -> None:
    first = managed.pid
    assert first is not None

    os.kill(first, signal.SIGKILL)

    _until(lambda: managed.restarts == 1 and managed.pid not in (None, first) and managed.answers())
    second = managed.pid
    assert second is not None
    managed.stop()
    assert not _alive(second) and not managed.pid_path.exists()


def test_the_signing_key_and_its_certificate_are_made_once_and_kept(tmp_path: Path) -> None:
    made = signing.load_or_create(tmp_path)
    again = signing.load_or_create(tmp_path)

    assert again.kid == made.kid and len(made.kid) == 59 and made.kid.count(":") == 11
    cert = x509.load_pem_x509_certificate(made.cert_path.read_bytes())
    assert cert.public_key() == made.private_key.public_key()
    assert oct((tmp_path / signing.KEY_FILE).stat().st_mode & 0o777) == "0o600"


def _server(tmp_path: Path, env: dict[str, str]) -> Server:
    data = tmp_path / "data"
    upgrade(f"sqlite:///{data / 'envctl.db'}")
    return Server(data, env)


def test_serve_without_the_registry_program_says_the_registry_is_off_and_serves_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `envctl serve` does about the registry before it serves (``api/startup.py``)."""
    settings = Settings(data_dir=tmp_path / "data", registry="managed", registry_binary=tmp_path / "none")

    assert startup.start_registry(settings) is None

    err = capsys.readouterr().err
    assert f"registry: off (no registry program at {tmp_path / 'none'}" in err
    assert "apt-get install docker-registry" in err
    assert distribution.plan(settings.with_overrides(registry="")).mode == "off"
    assert distribution.plan(settings.with_overrides(registry="https://registry.example")).mode == "external"
    with pytest.raises(InvalidInputError, match="registry: 'ftp://x' is not managed, off"):
        distribution.plan(settings.with_overrides(registry="ftp://x"))


def test_serve_runs_the_managed_registry_and_it_ends_with_serve_even_when_killed(tmp_path: Path) -> None:
    if not Settings().registry_binary.is_file():
        need(f"no registry program at {Settings().registry_binary} (apt-get install docker-registry)")
    port = _free_port()
    server = _server(tmp_path, {"ENVCTL_REGISTRY": "managed", "ENVCTL_REGISTRY_PORT": str(port)})
    server.start()
    try:
        with server.client() as api:
            status = api.get("/registry").json()
        pid = int((server.data_dir / "registry" / "registry.pid").read_text())
        assert status == {
            "mode": "managed",
            "url": f"http://127.0.0.1:{port}",
            "running": True,
            "service": distribution.SERVICE,
            "realm": f"{server.url}/registry/token",
        }
        assert f"registry: managed at http://127.0.0.1:{port}" in server.output()
    finally:
        server.kill()  # SIGKILL: no shutdown code runs

    _until(lambda: not _alive(pid), timeout=10)
