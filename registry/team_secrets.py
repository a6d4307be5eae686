"""Team secrets: named values a team's members set and their runtimes use, never shown again.

A secret belongs to a team (``acme``) and has a name (``db-pass``). Its value is encrypted
(Fernet: AES-128-CBC with an HMAC-SHA256) with the installation's secrets key before it reaches
the database; the key is a file apart from the database (``<data dir>/secrets.key``, or the
setting ``secrets_key_file``), made on first use with mode 0600. Someone with the database alone
reads no value.

Values are write-only: the API sets, lists (names and times) and deletes; nothing here returns a
value except :meth:`SecretBox.open`, which the runner calls to hand values to a runtime and to
search a save for them. No message, log line or error carries a value.

Only the team's members act on its secrets (an envctl admin outside the team may not).
"""

from __future__ import annotations

import os
import re
import secrets as _random
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.clock import utcnow
from envs.kit.errors import ForbiddenError, InvalidInputError
from envs.kit.ids import new_id
from registry.errors import SecretKeyError, SecretNotFoundError
from registry.models import Team, TeamSecret
from registry.settings import Settings
from registry.teams import Actor, get_team

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 64
MAX_VALUE = 32 * 1024  # bytes (UTF-8), as an environment variable's value
KEY_FILE = "secrets.key"


class SecretBox:
    """Encrypts and decrypts secret values with the installation's key file."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._fernet: Fernet | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        return cls(settings.secrets_key_file or settings.data_dir / KEY_FILE)

    def _key(self) -> Fernet:
        with self._lock:
            if self._fernet is None:
                self._fernet = Fernet(self._read_or_make())
            return self._fernet

    def _read_or_make(self) -> bytes:
        path = self.key_file
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = path.with_name(f".{path.name}.{_random.token_hex(6)}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, Fernet.generate_key() + b"\n")
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, path)  # atomic; another process's key wins a race
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink(missing_ok=True)
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise SecretKeyError(
                    f"the secrets key {path} may be read by others (mode {mode:o}); `chmod 600 {path}`",
                    details={"key_file": str(path)},
                )
            key = path.read_bytes().strip()
            Fernet(key)  # a malformed key is said here, once
            return key
        except OSError as exc:
            raise SecretKeyError(
                f"the secrets key {path} cannot be read or made: {exc.strerror or exc}",
                details={"key_file": str(path)},
            ) from exc
        except ValueError as exc:
            raise SecretKeyError(
                f"the secrets key {path} is not a Fernet key", details={"key_file": str(path)}
            ) from exc

    def derive(self, purpose: bytes, length: int = 32) -> bytes:
        """A key for ``purpose`` (e.g. one team's app bundles) made from the installation's key
        with HKDF-SHA256: as much apart from the database as the key file, and a different key
        for each purpose, so one purpose's key tells nothing of another's."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        self._key()  # made or checked once
        master = self.key_file.read_bytes().strip()
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"envctl derive v1", info=purpose).derive(master)

    def seal(self, value: str) -> bytes:
        return self._key().encrypt(value.encode("utf-8"))

    def open(self, token: bytes) -> str:
        try:
            return self._key().decrypt(token).decode("utf-8")
        except InvalidToken as exc:
            raise SecretKeyError(
                f"a stored secret does not open with the key {self.key_file}: the key was replaced; "
                "set the secret again (`envctl secret set`)",
                details={"key_file": str(self.key_file)},
            ) from exc


def check_secret_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{field}: a secret name may not be empty", field=field)
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"{field}: {name[:MAX_NAME]!r} is not a secret name: a letter or digit first, then letters, digits, "
            f". _ or -, at most {MAX_NAME} characters",
            field=field,
        )
    return name


def check_secret_value(value: object, field: str = "value") -> str:
    """A value to keep; errors say what is wrong, never what it is."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{field}: a secret's value must be non-empty text", field=field)
    if "\x00" in value:
        raise InvalidInputError(f"{field}: a secret's value may not contain a NUL character", field=field)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{field}: a secret's value must be valid Unicode text", field=field) from None
    if size > MAX_VALUE:
        raise InvalidInputError(f"{field}: a secret's value may be at most {MAX_VALUE} bytes", field=field)
    return value


def member_team(session: Session, team_name: str, actor: Actor) -> Team:
    """The team, if ``actor`` is one of its members: 404 when they cannot see it, 403 for an
    envctl admin outside it (secrets are the members' only)."""
    team = get_team(session, team_name, actor)
    if not any(m.user_id == actor.user_id for m in team.members):
        raise ForbiddenError(f"team: only members of team {team.name!r} use its secrets", details={"team": team.name})
    return team


def find_secret(session: Session, team_id: str, name: str) -> TeamSecret | None:
    return session.scalars(
        select(TeamSecret).where(TeamSecret.team_id == team_id, TeamSecret.name == name)
    ).one_or_none()


def put_secret(
    session: Session, box: SecretBox, team_name: str, name: str, value: str, actor: Actor
) -> tuple[TeamSecret, bool]:
    """Set ``name`` of the team to ``value`` (encrypted); whether it was created."""
    check_secret_name(name)
    check_secret_value(value)
    team = member_team(session, team_name, actor)
    sealed = box.seal(value)
    now = utcnow()
    secret = find_secret(session, team.id, name)
    created = secret is None
    if secret is None:
        secret = TeamSecret(
            id=new_id("sec"), team_id=team.id, name=name, ciphertext=sealed, version=1,
            created_by=actor.user_id, created_at=now, updated_at=now,
        )  # fmt: skip
        session.add(secret)
    else:
        secret.ciphertext = sealed
        secret.version += 1
        secret.updated_at = now
    session.flush()
    return secret, created


def list_secrets(session: Session, team_name: str, actor: Actor) -> list[TeamSecret]:
    team = member_team(session, team_name, actor)
    return list(session.scalars(select(TeamSecret).where(TeamSecret.team_id == team.id).order_by(TeamSecret.name)))


def delete_secret(session: Session, team_name: str, name: str, actor: Actor) -> None:
    check_secret_name(name)
    team = member_team(session, team_name, actor)
    secret = find_secret(session, team.id, name)
    if secret is None:
        raise SecretNotFoundError(
            f"name: team {team.name!r} has no secret {name!r}; `envctl secret list {team.name}` lists them",
            details={"team": team.name, "name": name},
        )
    session.delete(secret)
    session.flush()


def secrets_named(session: Session, refs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], TeamSecret]:
    """The secrets (team name, secret name) -> row among ``refs`` that exist."""
    out: dict[tuple[str, str], TeamSecret] = {}
    for team_name, name in set(refs):
        row = session.execute(
            select(TeamSecret)
            .join(Team, Team.id == TeamSecret.team_id)
            .where(Team.name == team_name, TeamSecret.name == name)
        ).scalar_one_or_none()
        if row is not None:
            out[(team_name, name)] = row
    return out
