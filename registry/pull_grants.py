"""Grants: short-lived Basic credentials, signed by envctl, for one repository of its registry.

A Kubernetes node pulls a runtime's image with the credentials of the pod's pull secret
(``kubernetes.io/dockerconfigjson``), and the kubelet hands its runtime only a user name and a
password: no registry token (as Swarm's ``X-Registry-Auth`` can carry). So the Kubernetes backend
(``runner/backends/kube.py``) writes a *grant* as the password, under the user name
:data:`USER`: a JWT envctl signs with its registry key, for one repository and ``pull`` only,
living the registry token's lifetime. The node's runtime meets the registry's challenge by
asking the token endpoint with those Basic credentials (``api/routes/registry_auth.py``), which
answers only ``pull`` on the grant's repository, and nothing once the grant expired.

A *push grant* (:data:`PUSH`, user name ``envctl-push-grant``) is the same for envctl's own
push of a version that a boot needs in the registry and that was never pushed
(``runner/transfers/pushpull.py``): the runner hands it to its local engine as the push's
``auth_config`` and nobody else ever sees it; the token endpoint answers ``pull`` and ``push`` on
the grant's repository and nothing else. So a user who may boot a version (the runtime's create
checked that they can see it) gets it into the registry without any push right of their own.

A grant's audience (``envctl-pull-grant``, ``envctl-push-grant``) is not the registry's service,
so the registry itself never takes a grant as a token; a pull grant is no push grant (another
audience); and the token server takes nothing but a grant under their user names, which no envctl
user may have (``registry/users.py``).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from envs.kit.errors import UnauthorizedError
from registry.distribution import ISSUER, SERVICE
from registry.signing import SigningKey
from registry.tokenserver import MAX_SCOPES, parse_scope
from registry.users import PULL_GRANT_USER, PUSH_GRANT_USER


@dataclass(frozen=True)
class Kind:
    """A kind of grant: the Basic user name it comes under, its audience, what it lets do."""

    name: str  # "pull grant"
    user: str
    audience: str
    actions: tuple[str, ...]


PULL = Kind("pull grant", PULL_GRANT_USER, "envctl-pull-grant", ("pull",))
PUSH = Kind("push grant", PUSH_GRANT_USER, "envctl-push-grant", ("pull", "push"))
KINDS = {k.user: k for k in (PULL, PUSH)}  # the token endpoint's Basic user name -> kind

USER = PULL.user  # reserved: no envctl user is called so (registry/users.py)
AUDIENCE = PULL.audience
LEEWAY = 30  # seconds of clock difference tolerated on nbf/exp


def make_grant(key: SigningKey, repository: str, ttl: int, *, now: float | None = None, kind: Kind = PULL) -> str:
    """A grant of ``kind`` (to pull, by default) on ``repository`` for ``ttl`` seconds."""
    stamp = int(time.time() if now is None else now)
    return key.sign(
        {
            "iss": ISSUER,
            "sub": kind.user,
            "aud": kind.audience,
            "iat": stamp,
            "nbf": stamp,
            "exp": stamp + ttl,
            "jti": secrets.token_hex(12),
            "repository": repository,
        }
    )


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def open_grant(key: SigningKey, grant: str, *, now: float | None = None, kind: Kind = PULL) -> str:
    """The repository a valid grant of ``kind`` names; ``UnauthorizedError`` for anything else
    (a bad signature, another audience (a pull grant is no push grant), expired)."""
    what = kind.name
    try:
        head_b64, body_b64, sig_b64 = grant.split(".")
        head: dict[str, Any] = json.loads(_b64(head_b64))
        body: dict[str, Any] = json.loads(_b64(body_b64))
        sig = _b64(sig_b64)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise UnauthorizedError(f"the {what} is not a signed token") from exc
    if head.get("alg") != "ES256" or len(sig) != 64:
        raise UnauthorizedError(f"the {what} is not signed with ES256")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.private_key.public_key().verify(der, f"{head_b64}.{body_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise UnauthorizedError(f"the {what}'s signature is not envctl's") from exc
    stamp = time.time() if now is None else now
    if body.get("aud") != kind.audience or body.get("iss") != ISSUER or not isinstance(body.get("repository"), str):
        raise UnauthorizedError(f"the token is not a {what}")
    if not (int(body.get("nbf", 0)) - LEEWAY <= stamp <= int(body.get("exp", 0)) + LEEWAY):
        raise UnauthorizedError(f"the {what} expired")
    return str(body["repository"])


def issue(key: SigningKey, scope_texts: list[str], repository: str, ttl: int, *, kind: Kind = PULL) -> dict[str, Any]:
    """The token endpoint's answer to a grant's holder: every scope answered, the grant's actions
    (``pull``; ``pull`` and ``push`` for a push grant) that it asks for granted on the grant's
    repository, and nothing else."""
    if len(scope_texts) > MAX_SCOPES:
        raise UnauthorizedError(f"at most {MAX_SCOPES} scopes per request")
    stamp = int(time.time())
    access = []
    for text in scope_texts:
        scope = parse_scope(text)
        ours = scope.type == "repository" and scope.name == repository
        access.append(scope.as_claim([a for a in scope.actions if a in kind.actions] if ours else []))
    token = key.sign(
        {
            "iss": ISSUER,
            "sub": kind.user,
            "aud": SERVICE,
            "iat": stamp,
            "nbf": stamp,
            "exp": stamp + ttl,
            "jti": secrets.token_hex(16),
            "access": access,
        }
    )
    return {
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
    }
