"""A tcp channel's credential: made at each boot, handed to the runtime, kept sealed on its row.

At each boot (``runner/runtimes/boot.py``) :func:`make_credential` makes a fresh one: a random boot id, a
random 256-bit key and a self-signed TLS certificate (ECDSA P-256, valid for the boot only in
practice: nothing trusts it but envctl's pin of its SHA-256). The runtime gets it as a file it
reads once at start (``runner/agent/handshake.py``):

- local Docker (:func:`hand_over`): a FIFO made in the runtime's private state directory, which
  the agent finds at ``/run/envctl/agent.key``. envctl writes the credential into the pipe
  before the container starts and keeps its end open until the agent answered; the agent reads
  it and removes the FIFO. A pipe's bytes live in kernel memory only: nothing reaches a disk,
  the container's configuration (its command names only the path), an image or a log. A
  tmpfs mount filled by ``docker exec`` would cost a call per boot and a process in the
  container; a host file would touch the disk.
- Swarm: a Docker secret (an in-memory file in the task); Kubernetes: a Secret volume on
  ``medium: Memory``. The agent reads the same line from there.

envctl keeps what it needs to dial in on the runtime's row (``backend_state["agent"]``): the
address, the boot id, the certificate's pin, and the key sealed with the installation's secrets
key (``registry/team_secrets.py``), so any server of the installation can reach the runtime and a
restarted one reconnects; the database alone opens nothing. The TLS private key is not kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from envs.kit.errors import BackendError
from registry.errors import SecretKeyError
from registry.team_secrets import SecretBox
from runner.agent import handshake
from runner.backends.base import AGENT_CREDENTIAL
from runner.channel import AgentAddress

CREDENTIAL_FILE = AGENT_CREDENTIAL  # in the state directory: /run/envctl/agent.key in the container


@dataclass(frozen=True)
class Credential:
    runtime_id: str
    boot: str
    key: bytes = field(repr=False)
    tls_pem: str = field(repr=False)  # private key, then certificate
    pin: str = ""

    def line(self) -> bytes:
        body = {"v": handshake.VERSION, "runtime": self.runtime_id, "boot": self.boot}
        return (json.dumps({**body, "key": self.key.hex(), "tls": self.tls_pem}) + "\n").encode()


def make_credential(runtime_id: str) -> Credential:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"envctl-agent-{runtime_id}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))  # a runtime may run for years; the pin is what counts
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    pin = handshake.fingerprint(cert.public_bytes(serialization.Encoding.DER))
    return Credential(runtime_id, secrets.token_hex(12), secrets.token_bytes(32), key_pem + cert_pem, pin)


@contextlib.contextmanager
def hand_over(state_dir: Path, credential: Credential) -> Iterator[Path]:
    """The credential in a FIFO of the state directory while the block runs (the boot, up to
    the agent's first answer); the FIFO is gone afterwards, read or not."""
    path = state_dir / CREDENTIAL_FILE
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)
    try:
        # read-write: opening does not wait for a reader, and the pipe keeps what is written
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        path.unlink(missing_ok=True)
        raise
    try:
        data = credential.line()
        if len(data) > handshake.CREDENTIAL_MAX or os.write(fd, data) != len(data):
            raise BackendError("could not hand the runtime its credential (the pipe took less than all of it)")
        yield path
    finally:
        os.close(fd)  # an unread pipe's content goes with its last open end
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(path.lstat().st_mode):
                path.unlink()


class AgentLinks:
    """Seals a boot's credential onto the row and opens it again into an ``AgentAddress``."""

    def __init__(self, box: SecretBox) -> None:
        self.box = box

    def record(self, credential: Credential, host: str, port: int) -> dict[str, Any]:
        """What ``backend_state["agent"]`` keeps of a tcp channel."""
        return {
            "channel": "tcp",
            "host": host,
            "port": port,
            "boot": credential.boot,
            "pin": credential.pin,
            "key": self.box.seal(credential.key.hex()).decode(),
        }

    def address(self, runtime_id: str, agent: dict[str, Any], report: Any = None) -> AgentAddress:
        try:
            key = bytes.fromhex(self.box.open(str(agent["key"]).encode()))
        except SecretKeyError as exc:
            raise BackendError(
                f"the runtime's agent credential does not open with the secrets key {self.box.key_file} (another "
                "server's key, or a replaced one); servers of one installation share ENVCTL_SECRETS_KEY_FILE; "
                "stopping and starting the runtime makes a new credential",
                details={"runtime_id": runtime_id},
            ) from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise BackendError(f"the runtime's channel record is damaged ({type(exc).__name__})") from exc
        try:
            return AgentAddress(
                str(agent["host"]), int(agent["port"]), runtime_id, str(agent["boot"]), key, str(agent["pin"]), report
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise BackendError(f"the runtime's channel record is damaged ({type(exc).__name__})") from exc
