"""Identifiers: short, URL-safe, prefixed by what they name (``rt_`` runtime, ``ex_`` execution)."""

from __future__ import annotations

import re
import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_ID_RE = re.compile(r"^[a-z]{2,4}_[0-9a-z]{16}\Z")


def new_id(prefix: str) -> str:
    """A new random id such as ``rt_5k2m9x7c1q4w8e3r`` (80 bits of randomness)."""
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(16))


def looks_like_id(value: str, prefix: str | None = None) -> bool:
    if not _ID_RE.match(value):
        return False
    return prefix is None or value.startswith(prefix + "_")
