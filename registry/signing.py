"""The key envctl signs registry tokens with, its certificate, and JSON Web Signatures.

The distribution registry trusts the certificate (``auth.token.rootcertbundle``); a token's
header names the key by its libtrust key id (``kid``), which the registry computes from the
bundle's public keys: the SHA-256 of the DER public key, its first 30 bytes in base32 without
padding, in groups of four joined by ``:``. Key and certificate are made once, under the data
directory, and kept (a new key would void every token in flight).

Tokens are ES256 (ECDSA P-256 with SHA-256); the signature is ``r || s``, 32 bytes each, as JWS
wants, not the DER that ``cryptography`` returns.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from envs.kit.clock import utcnow

KEY_FILE = "token-signing-key.pem"
CERT_FILE = "token-signing-cert.pem"
CERT_LIFE = timedelta(days=3650)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_kid(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key id libtrust (and so the registry) gives ``public_key``."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(text[i : i + 4] for i in range(0, len(text), 4))


@dataclass(frozen=True)
class SigningKey:
    private_key: ec.EllipticCurvePrivateKey
    cert_path: Path

    @property
    def kid(self) -> str:
        return libtrust_kid(self.private_key.public_key())

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """A compact JWS of ``claims``, ES256, with this key's ``kid`` (``header`` adds or overrides)."""
        head = {"typ": "JWT", "alg": "ES256", "kid": self.kid, **(header or {})}
        signing_input = f"{b64url(_json(head))}.{b64url(_json(claims))}"
        der = self.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def self_signed_cert(key: ec.EllipticCurvePrivateKey, common_name: str = "envctl registry token signer") -> bytes:
    """A PEM certificate of ``key``'s public half, signed by ``key`` itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CERT_LIFE)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def load_or_create(directory: Path) -> SigningKey:
    """The signing key kept in ``directory``; made (with its certificate) the first time."""
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if key_path.is_file() and cert_path.is_file():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key; remove it and its certificate to make new ones")
        return SigningKey(loaded, cert_path)
    directory.mkdir(parents=True, exist_ok=True)
    key = new_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_new(key_path, pem, 0o600)
    _write_new(cert_path, self_signed_cert(key), 0o644)
    return SigningKey(key, cert_path)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
