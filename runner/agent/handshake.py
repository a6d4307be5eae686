"""The agent's network channel: its credential, TLS and the handshake (both sides use it).

Python standard library only: the agent imports it, and so does envctl (``runner/channel.py``),
so that both compute the same proofs.

The credential is one JSON line made by envctl at each boot (``runner/agentauth.py``)::

    {"v": 1, "runtime": "rt_…", "boot": "<random>", "key": "<64 hex>", "tls": "<PEM: key, then cert>"}

handed to the runtime as a file it reads once at start (locally a FIFO in the runtime's private
state directory, so its bytes live in a kernel pipe, never on a disk; in Swarm a Docker secret,
in Kubernetes a Secret volume on ``medium: Memory``), never as a variable, label, argument or
image. ``tls`` is a per-boot self-signed certificate and its private key: the agent serves TLS
1.3 with it; envctl pins its SHA-256 (``pin``) instead of trusting any authority, so frames are
encrypted and their integrity is protected against anyone on the network.

Inside TLS, envctl (client) and the agent (server) prove to each other that they hold ``key``
for this runtime's current boot, without sending it, by HMAC-SHA256 over both sides' nonces:

    -> {"op": "hello", "v": 1, "runtime": R, "boot": B, "nonce": Nc}
    <- {"ok": true, "op": "challenge", "nonce": Ns, "proof": HMAC(key, agent|R|B|Nc|Ns)}
    -> {"op": "auth", "proof": HMAC(key, envctl|R|B|Nc|Ns)}
    <- {"ok": true, "op": "welcome", "refused": [...]}            then the ordinary framing

A hello for another runtime or another boot, or a proof that does not match, is answered
``{"ok": false, "error": "refused: …"}`` and the connection closed. ``refused`` lists the
connections the agent refused since it last told envctl, so that envctl writes them into the
runtime's runner log; the agent also prints each to its own output (the container's log).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import ssl
import stat
import time

# Annotations only: typing is not imported at run time (4 ms of the agent's start, four times
# that in a pod limited to 0.25 CPU; python3-minimal images may lack it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
PORT = 7600  # the agent's port inside its container (a tcp channel)
NONCE_BYTES = 16
MAX_HANDSHAKE_LINE = 4096
CREDENTIAL_MAX = 64 * 1024
_LABEL = "envctl-agent-auth-v1"


class RefusedError(Exception):
    """The other side is not who it says, or does not hold this boot's credential."""


def nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def proof(key: bytes, role: str, runtime: str, boot: str, client_nonce: str, server_nonce: str) -> str:
    """HMAC-SHA256 binding the role (``agent`` or ``envctl``), runtime, boot and both nonces."""
    message = "\n".join((_LABEL, role, runtime, boot, client_nonce, server_nonce)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def same(a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and hmac.compare_digest(a.encode(), b.encode())


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def parse_credential(data: bytes) -> dict[str, Any]:
    try:
        cred = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise ValueError("the credential is not one JSON line") from exc
    if not isinstance(cred, dict) or cred.get("v") != VERSION:
        raise ValueError("the credential is not of a known version")
    for name in ("runtime", "boot", "key", "tls"):
        if not isinstance(cred.get(name), str) or not cred[name]:
            raise ValueError(f"the credential lacks {name}")
    cred["key"] = bytes.fromhex(cred["key"])
    return cred


def read_credential(path: str, wait: float = 30.0) -> dict[str, Any]:
    """Read the credential once, then remove the file where that is possible (a FIFO in the
    state directory; a Docker or Kubernetes secret is read-only and stays on its tmpfs).

    Opened without blocking: a FIFO whose writer has not written yet gives nothing, and is
    read again until ``wait`` seconds passed."""
    deadline = time.monotonic() + wait
    data = b""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                while len(data) < CREDENTIAL_MAX and not data.endswith(b"\n"):
                    try:
                        chunk = os.read(fd, CREDENTIAL_MAX)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    data += chunk
            finally:
                os.close(fd)
        if data.endswith(b"\n") or (data and fd >= 0 and not _is_fifo(path)):
            break
        if time.monotonic() >= deadline:
            raise ValueError(f"no credential at {path} after {wait:g} s")
        time.sleep(0.005)
    with contextlib.suppress(OSError):
        if _is_fifo(path):
            os.unlink(path)
    return parse_credential(data.strip())


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def server_context(pem: str) -> ssl.SSLContext:
    """TLS 1.3 serving the per-boot certificate. The PEM is loaded from an anonymous memory
    file (``memfd``): the private key never reaches a file system."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    fd = os.memfd_create("envctl-agent-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem.encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


def client_context() -> ssl.SSLContext:
    """TLS 1.3 that checks no authority: the caller pins the agent's certificate instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def read_line(reader: Any) -> dict[str, Any]:
    line = reader.readline(MAX_HANDSHAKE_LINE)
    if not line:
        raise RefusedError("the connection closed during the handshake")
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise RefusedError("a handshake message is not JSON") from exc
    if not isinstance(message, dict):
        raise RefusedError("a handshake message is not a JSON object")
    return message


def accept(conn: Any, reader: Any, cred: dict[str, Any], refused: list[dict[str, Any]]) -> None:
    """The agent's side: returns once the client proved it holds this boot's credential;
    ``RefusedError`` (its message safe to log: no credential in it) otherwise."""
    hello = read_line(reader)
    if hello.get("op") != "hello":
        raise RefusedError("no hello")
    runtime, boot, theirs = hello.get("runtime"), hello.get("boot"), hello.get("nonce")
    if not isinstance(theirs, str) or not 16 <= len(theirs) <= 128:
        raise RefusedError("the hello has no usable nonce")
    if runtime != cred["runtime"]:
        raise RefusedError(f"the connection is for runtime {str(runtime)[:48]!r}, this is {cred['runtime']}")
    if boot != cred["boot"]:
        raise RefusedError("the connection is for another boot of this runtime (an earlier boot's credential?)")
    ours = nonce()
    mine = proof(cred["key"], "agent", cred["runtime"], cred["boot"], theirs, ours)
    conn.sendall(encode({"ok": True, "op": "challenge", "nonce": ours, "proof": mine}))
    auth = read_line(reader)
    expected = proof(cred["key"], "envctl", cred["runtime"], cred["boot"], theirs, ours)
    if auth.get("op") != "auth" or not same(auth.get("proof"), expected):
        raise RefusedError("its proof does not match this boot's credential")
    conn.sendall(encode({"ok": True, "op": "welcome", "refused": refused}))


def dial(conn: Any, reader: Any, runtime: str, boot: str, key: bytes) -> list[dict[str, Any]]:
    """envctl's side: returns the refusals the agent reports; ``RefusedError`` when the agent
    refused us, or could not prove that it holds the credential itself."""
    theirs_expected = nonce()
    conn.sendall(encode({"op": "hello", "v": VERSION, "runtime": runtime, "boot": boot, "nonce": theirs_expected}))
    challenge = read_line(reader)
    if challenge.get("ok") is not True:
        raise RefusedError(f"the agent refused the connection: {str(challenge.get('error'))[:300]}")
    ours = challenge.get("nonce")
    if not isinstance(ours, str) or not 16 <= len(ours) <= 128:
        raise RefusedError("the agent's challenge has no usable nonce")
    if not same(challenge.get("proof"), proof(key, "agent", runtime, boot, theirs_expected, ours)):
        raise RefusedError("the agent could not prove that it holds this boot's credential")
    conn.sendall(encode({"op": "auth", "proof": proof(key, "envctl", runtime, boot, theirs_expected, ours)}))
    welcome = read_line(reader)
    if welcome.get("ok") is not True:
        raise RefusedError(f"the agent refused the connection: {str(welcome.get('error'))[:300]}")
    reported = welcome.get("refused")
    return [r for r in reported if isinstance(r, dict)] if isinstance(reported, list) else []
