"""The registry's settings: the image registry it runs or talks to, team secrets' key, and
which teams' publications are pulled ahead. Extends the core settings (envs/kit/config.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.kit import config
from envs.kit.config import parse_path, setting


def parse_team_names(v: Any) -> tuple[str, ...]:
    """A YAML list of team names, or one string of them separated by ``,``."""
    items = [str(i).strip() for i in (v if isinstance(v, list | tuple) else str(v or "").split(","))]
    for item in items:
        if item and (len(item) > 64 or not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", item)):
            raise ValueError(f"{item!r} is not a team name")
    return tuple(i for i in items if i)


@dataclass(frozen=True)
class Settings(config.Settings):
    # "" picks managed when registry_binary exists, off otherwise; or an external registry's URL
    registry: str = setting(
        "",
        env="ENVCTL_REGISTRY",
        help="the image registry: managed (envctl runs Debian's docker-registry; the default when"
        " /usr/bin/docker-registry exists), off, or an external registry's URL",
    )
    registry_port: int = setting(
        0,
        env="ENVCTL_REGISTRY_PORT",
        parse=int,
        help="loopback port of the managed registry (default: the API port + 1)",
    )
    registry_binary: Path = setting(
        Path("/usr/bin/docker-registry"),
        env="ENVCTL_REGISTRY_BINARY",
        parse=parse_path,
        help="the distribution registry program (default /usr/bin/docker-registry)",
    )
    registry_token_ttl: int = setting(
        300,
        env="ENVCTL_REGISTRY_TOKEN_TTL",
        parse=int,
        help="seconds a registry token lives (default 300); clients ask again when it ends",
    )
    # the address the managed registry listens on: loopback, or e.g. 0.0.0.0 / a bridge's address
    # when a cluster's nodes pull from it (the Swarm backend); this host still reaches it on loopback
    registry_listen: str = setting(
        "127.0.0.1",
        env="ENVCTL_REGISTRY_LISTEN",
        help="address the managed registry listens on (default 127.0.0.1); a cluster's nodes"
        " need one they reach, e.g. the Swarm bridge's host address",
    )
    # teams whose publications are pulled ahead (registry/prepull.py)
    registry_prepull: tuple[str, ...] = setting(
        (),
        env="ENVCTL_REGISTRY_PREPULL",
        parse=parse_team_names,
        help="teams (comma-separated) whose published versions this server pulls as they are"
        " published, before any boot asks (default none)",
    )
    # the key that encrypts team secrets (made on first use, mode 0600); None: <data dir>/secrets.key
    secrets_key_file: Path | None = setting(
        None,
        env="ENVCTL_SECRETS_KEY_FILE",
        parse=parse_path,
        help="the key that encrypts team secrets, made on first use (mode 0600; default"
        " <data dir>/secrets.key); keep it apart from the database and back it up",
    )
