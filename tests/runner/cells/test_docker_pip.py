"""pip in a runtime trusts what the build machine trusts (real Docker, real PyPI).

Behind a TLS-intercepting proxy, images that trust only Debian's CA bundle cannot reach PyPI.
The root base image therefore carries the build machine's extra CA certificates
(``base.extra_ca_certs``, by default ``/usr/local/share/ca-certificates/*.crt``), and every
image built on it trusts them too. The PyPI test needs the network: when PyPI does not answer
from this machine it is skipped with the reason, also under CI (the network is not a service
the suite can provide).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from typing import Any

import httpx
import pytest

from envs.base import host as bi
from tests.fixtures.server import Server
from tests.runner.cells.test_docker_executions import new_runtime, text

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PYPI = "https://pypi.org/simple/six/"
CA_DIR = "/usr/local/share/ca-certificates/envctl"


def pypi_unreachable() -> str | None:
    """Why PyPI cannot be used from this machine (its own trust store), or None."""
    try:
        with urllib.request.urlopen(PYPI, timeout=5, context=ssl.create_default_context()) as answer:
            answer.read(1)
    except (OSError, ValueError) as exc:  # URLError, SSL errors and timeouts are OSErrors
        return f"{PYPI} is not reachable from this machine: {exc}"
    return None


def run_long(client: httpx.Client, rid: str, code: str, timeout: float = 180, **body: Any) -> dict[str, Any]:
    """Run a cell and wait for it to finish (longer than one request's wait)."""
    r = client.post(f"/runtimes/{rid}/executions", params={"wait": 20}, json={"code": code, **body})
    assert r.status_code == 202, r.text
    ex: dict[str, Any] = r.json()
    deadline = time.monotonic() + timeout
    while ex["status"] in ("queued", "running") and time.monotonic() < deadline:
        ex = client.get(f"/executions/{ex['id']}", params={"wait": 20}).json()
    assert ex["status"] in ("ok", "error", "interrupted"), ex
    return ex


def test_the_build_machines_extra_cas_are_trusted_in_a_runtime(server: Server) -> None:
    certs = bi.read_extra_ca_certs(bi.default_extra_ca_certs())
    if not certs:
        pytest.skip("this machine has no extra CA certificates (base.extra_ca_certs)")
    with server.client() as client:
        rid = new_runtime(client, "cas")
        code = (
            "import json, os\n"
            f"names = sorted(os.listdir({CA_DIR!r}))\n"
            "bundle = open('/etc/ssl/certs/ca-certificates.crt').read()\n"
            f"files = [open(os.path.join({CA_DIR!r}, n)).read() for n in names]\n"
            "print(json.dumps({'names': names, 'files': files, 'in_bundle': [f.strip() in bundle for f in files]}))\n"
        )
        ex = run_long(client, rid, code)
        assert ex["status"] == "ok", text(ex, "stderr")[-3000:]
        found = json.loads(text(ex))
        assert found["names"] == [c.name for c in certs]
        assert found["files"] == [c.pem.decode() for c in certs]
        assert all(found["in_bundle"])


def test_pip_in_a_runtime_downloads_from_pypi(server: Server) -> None:
    reason = pypi_unreachable()
    if reason is not None:
        pytest.skip(reason)
    with server.client() as client:
        rid = new_runtime(client, "pip", language="bash")
        ex = run_long(client, rid, "pip download --no-deps --dest /tmp/x six==1.16.0 && ls /tmp/x")
        assert ex["status"] == "ok", text(ex, "stdout")[-3000:] + text(ex, "stderr")[-3000:]
        assert "six-1.16.0-py2.py3-none-any.whl" in text(ex)
