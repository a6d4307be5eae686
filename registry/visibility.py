"""Who may see which environment versions: the one rule, for every path that takes a reference.

A reader (``Reader``: a user, their teams, whether they are an envctl admin) sees

- every environment outside a team's namespace (base images, personal names such as ``mine``);
- every version of their own teams' environments (``acme/ml`` is team ``acme``'s);
- of another team's environments, only the versions that team published (directly, or through
  a published tag that points at them now: ``registry/catalog.py``);
- everything, when they are an envctl admin.

What a reader may not see does not exist for them. ``resolve`` is the one function every path
that takes a reference calls, whatever the reference came from (a route's ``{ref}``, a request
body's ``environment``, a query's ``against``, a spec's ``extends``, an import, a pre-pull, a
package listing or diff, an export): it answers the version, or the same 404 a missing name
gets (``environment_not_found``, or ``version_not_found`` when the reader sees other versions
of the environment), naming the field the reference came from. So no answer tells one team
another team's names, and nothing is built, booted, read or exported from what is hidden.

Lineage shows a hidden parent as hidden (``sees``): a child version may stand on a version its
reader cannot see (it was published when the child was made, or the child was imported), and
the chain then says only that something is there, never its name, message or author.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from envs import service as envs_service
from envs.errors import VersionNotFoundError
from envs.kit.errors import NotFoundError
from envs.models import Environment, EnvironmentVersion
from envs.refs import EnvRef, parse_ref
from registry.models import Publication, User
from registry.teams import team_names_of


@dataclass(frozen=True)
class Reader:
    """Who reads environments: a user, the teams they are a member of, whether an envctl admin."""

    user_id: str
    teams: frozenset[str] = frozenset()
    is_admin: bool = False

    def reads_all_of(self, namespace: str | None) -> bool:
        """Whether every version in ``namespace`` is theirs to see (no namespace: everyone's)."""
        return not namespace or self.is_admin or namespace in self.teams


ANYONE = Reader("")  # a reader in no team: sees what is outside teams and what teams published


def _publications(session: Session, env_id: int) -> list[Publication]:
    return list(session.scalars(select(Publication).where(Publication.environment_id == env_id)))


def published_version_ids(session: Session, env: Environment) -> set[int]:
    """The ids of ``env``'s versions that are published, directly or through a tag."""
    tags = {t.name: t.version_id for t in env.tags}
    found: set[int] = set()
    for pub in _publications(session, env.id):
        if pub.version_id is not None:
            found.add(pub.version_id)
        elif pub.tag in tags:
            found.add(tags[pub.tag])
    return found


def reader_of(session: Session, user_id: str) -> Reader:
    """The user ``user_id`` as a reader, their teams and admin flag read now (for work that
    acts for a user without a request in hand)."""
    user = session.get(User, user_id)
    return Reader(user_id, team_names_of(session, user_id), bool(user is not None and user.is_admin))


def readable_versions(session: Session, env: Environment, reader: Reader) -> set[int] | None:
    """The ids of ``env``'s versions ``reader`` sees: ``None`` for all of them."""
    if reader.reads_all_of(env.namespace):
        return None
    return published_version_ids(session, env)


def sees(session: Session, version: EnvironmentVersion, reader: Reader) -> bool:
    """Whether ``reader`` sees ``version`` (for what is reached from another version, as a
    lineage's parents)."""
    only = readable_versions(session, version.environment, reader)
    return only is None or version.id in only


def hidden_parents(session: Session, versions: Iterable[EnvironmentVersion], reader: Reader) -> set[int]:
    """The ids of ``versions`` whose parent ``reader`` may not see (shown as hidden): the
    parents are read in one query, and each environment's publications once."""
    children = [v for v in versions if v.parent_id is not None]
    parent_ids = {v.parent_id for v in children}
    if not parent_ids:
        return set()
    parents = {
        p.id: p
        for p in session.scalars(
            select(EnvironmentVersion)
            .where(EnvironmentVersion.id.in_(parent_ids))
            .options(selectinload(EnvironmentVersion.environment).selectinload(Environment.tags))
        )
    }
    readable: dict[int, set[int] | None] = {}
    hidden = set()
    for v in children:
        parent = parents.get(v.parent_id or 0)
        if parent is None:
            continue
        env = parent.environment
        if env.id not in readable:
            readable[env.id] = readable_versions(session, env, reader)
        only = readable[env.id]
        if only is not None and parent.id not in only:
            hidden.add(v.id)
    return hidden


def resolve(session: Session, ref: EnvRef | str, reader: Reader, field: str) -> EnvironmentVersion:
    """The one version ``ref`` means now, for ``reader``: a 422 naming ``field`` for a bad
    reference, and the 404 of a missing one, naming ``field``, for what does not exist or what
    the reader may not see."""
    parsed = parse_ref(ref, field) if isinstance(ref, str) else ref
    env = envs_service.get_environment(session, parsed.full_name)
    if env is None or reader.reads_all_of(env.namespace):
        return envs_service.resolve(session, parsed, field, env=env)
    only = published_version_ids(session, env)
    try:
        version = envs_service.resolve(session, parsed, field, env=env)
    except NotFoundError:
        version = None
    if version is not None and version.id in only:
        return version
    if only:  # the environment exists for them, this version does not
        raise VersionNotFoundError(
            f"{field}: {parsed} does not exist", details={"field": field, "reference": str(parsed)}
        )
    raise envs_service.no_environment(parsed, field)


def environment(session: Session, ref: str, reader: Reader, field: str) -> tuple[Environment, set[int] | None]:
    """The environment ``ref`` names (a name, or any reference to one of its versions or tags,
    which is ``resolve``d) and the ids of its versions ``reader`` sees (``None``: all). Another
    team's environment with nothing published is a 404, as if it did not exist."""
    parsed = parse_ref(ref, field)
    if "@" in ref or ":" in ref:
        resolve(session, parsed, reader, field)
    env = envs_service.environment_of(session, parsed, field)
    only = readable_versions(session, env, reader)
    if only is not None and not only:
        raise envs_service.no_environment(parsed, field)
    return env, only
