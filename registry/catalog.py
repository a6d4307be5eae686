"""The catalog of published versions: publish and unpublish, search, and who may read what.

A team publishes a version (``acme/ml@3``) or a tag (``acme/ml:stable``, which publishes
whichever version the tag points at, as it moves) to make it readable and importable by every
team; the rest of the team's environment stays its own. Publishing and unpublishing are for the
environment's writers (its team's members, envctl admins).

What others built on it is protected: unpublishing a version that another team's versions (a
child built on it) or other users' runtimes depend on is refused (409), and so is deleting a
version anything depends on. The refusal names the dependents the caller may see and only
counts the others, so that it does not tell one team another team's names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from envs import service as envs_service
from envs.errors import VersionInUseError
from envs.kit.clock import utcnow
from envs.kit.errors import InvalidInputError, NotFoundError
from envs.models import Environment, EnvironmentVersion, Tag
from envs.packages import kept_packages
from envs.refs import EnvRef, parse_ref
from envs.service import PinnedBy, Writer
from registry import events, visibility
from registry.drafts import is_draft_repository
from registry.errors import PublicationNotFoundError
from registry.models import Membership, Publication, Team
from registry.visibility import published_version_ids


def _namespace(full_name: str) -> str:
    return full_name.rpartition("/")[0]


def published_repositories(session: Session) -> set[str]:
    """The full names of environments with something published (the registry's repositories
    that every signed-in user may pull)."""
    rows = session.execute(
        select(Environment.namespace, Environment.name).join(Publication, Publication.environment_id == Environment.id)
    )
    names = {f"{ns}/{name}" if ns else name for ns, name in rows}
    return {n for n in names if not is_draft_repository(n)}  # runtimes' drafts: never anyone's to pull


def may_read(session: Session, ref_text: str, teams: frozenset[str], is_admin: bool) -> bool:
    """Whether a reader in ``teams`` may read what ``ref_text`` names (``registry/visibility.py``
    decides: anything outside a team, their own teams', another team's published versions; a
    bare name: an environment with something published)."""
    try:
        visibility.environment(session, ref_text, visibility.Reader("", teams, is_admin), "ref")
    except (InvalidInputError, NotFoundError):
        return False
    return True


def _target(session: Session, ref_text: str, writer: Writer) -> tuple[Environment, EnvRef]:
    """The environment and the reference ``ref_text`` names, as ``writer`` sees them: another
    team's version that is not published is a 404, as if it did not exist."""
    ref = parse_ref(ref_text, "ref")
    env, _ = visibility.environment(session, ref_text, _reader(writer), "ref")
    if not env.namespace:
        raise InvalidInputError(
            f"ref: {ref.full_name!r} is not in a team's namespace: every user may read it already",
            field="ref",
        )
    envs_service.resolve(session, ref, "ref")  # 404 for a tag that does not exist
    return env, ref


def _reader(writer: Writer) -> visibility.Reader:
    return visibility.Reader(writer.user_id, writer.teams, writer.is_admin)


def _find(session: Session, env: Environment, ref: EnvRef) -> Publication | None:
    query = select(Publication).where(Publication.environment_id == env.id)
    if ref.is_pinned:
        version = envs_service.resolve(session, ref, "ref")
        query = query.where(Publication.version_id == version.id)
    else:
        query = query.where(Publication.tag == ref.tag)
    return session.scalars(query).first()


def publish(session: Session, ref_text: str, writer: Writer, by: str) -> Publication:
    """Publish the version or the tag ``ref_text`` names; publishing it again changes nothing."""
    env, ref = _target(session, ref_text, writer)
    envs_service.check_write(env, writer, "publish it", "ask a member of its team")
    existing = _find(session, env, ref)
    if existing is not None:
        return existing
    version = envs_service.resolve(session, ref, "ref") if ref.is_pinned else None
    pub = Publication(
        environment_id=env.id,
        version_id=version.id if version is not None else None,
        tag=None if ref.is_pinned else ref.tag,
        published_by=by,
        published_at=utcnow(),
    )
    session.add(pub)
    session.flush()
    events.record(session, env.namespace, "published", env.full_name, _published_ref(env, pub), by=by)
    return pub


def unpublish(session: Session, ref_text: str, writer: Writer, by: str, pinned_by: PinnedBy) -> None:
    """Unpublish the version or tag ``ref_text``: refused (409) while another team's versions or
    other users' runtimes (``pinned_by``: the runtimes store's answer) depend on a version it
    alone published; 404 if it is not published."""
    env, ref = _target(session, ref_text, writer)
    envs_service.check_write(env, writer, "unpublish it", "ask a member of its team")
    pub = _find(session, env, ref)
    if pub is None:
        raise PublicationNotFoundError(
            f"ref: {ref} is not published; `envctl catalog` lists what is", details={"ref": str(ref)}
        )
    before = published_version_ids(session, env)
    session.delete(pub)
    session.flush()
    lost = before - published_version_ids(session, env)
    for version_id in sorted(lost):
        version = envs_service.get_version(session, version_id)
        needs = _dependents(session, version, pinned_by, outside=env.namespace)
        if needs.any:
            raise VersionInUseError(
                f"{ref} cannot be unpublished: {needs.describe(writer)} of other teams depend on {version.ref}",
                details=needs.details(writer),
            )
    events.record(session, env.namespace, "unpublished", env.full_name, str(ref), by=by)


def _published_ref(env: Environment, pub: Publication) -> str:
    if pub.tag is not None:
        return f"{env.full_name}:{pub.tag}"
    version = next((v for v in env.versions if v.id == pub.version_id), None)
    return version.ref if version is not None else env.full_name


@dataclass
class Dependents:
    """What depends on a version: child versions (ref, namespace) and runtimes ("name (id)", owner)."""

    versions: list[tuple[str, str]] = field(default_factory=list)
    runtimes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.versions or self.runtimes)

    def _split(self, writer: Writer) -> tuple[list[str], int, list[str], int]:
        seen_v = [r for r, ns in self.versions if writer.is_admin or not ns or ns in writer.teams]
        seen_r = [n for n, owner in self.runtimes if writer.is_admin or owner == writer.user_id]
        return sorted(seen_v), len(self.versions) - len(seen_v), sorted(seen_r), len(self.runtimes) - len(seen_r)

    def details(self, writer: Writer) -> dict[str, Any]:
        versions, hidden_v, runtimes, hidden_r = self._split(writer)
        return {"versions": versions, "runtimes": runtimes, "hidden": {"versions": hidden_v, "runtimes": hidden_r}}

    def describe(self, writer: Writer) -> str:
        versions, hidden_v, runtimes, hidden_r = self._split(writer)
        parts = [f"versions {', '.join(versions)}"] if versions else []
        parts += [f"runtimes {', '.join(runtimes)}"] if runtimes else []
        parts += [f"{hidden_v} version(s) you cannot see"] if hidden_v else []
        parts += [f"{hidden_r} runtime(s) of other users"] if hidden_r else []
        return " and ".join(parts)


def _members(session: Session, namespace: str) -> set[str]:
    rows = session.scalars(
        select(Membership.user_id).join(Team, Team.id == Membership.team_id).where(Team.name == namespace)
    )
    return set(rows)


def _dependents(
    session: Session, version: EnvironmentVersion, pinned_by: PinnedBy, outside: str | None = None
) -> Dependents:
    """Children and pinned runtimes of ``version``; with ``outside``, only those of other teams
    than ``outside`` (children in another namespace, runtimes of users not in that team)."""
    children = session.scalars(
        select(EnvironmentVersion)
        .where(EnvironmentVersion.parent_id == version.id)
        .options(selectinload(EnvironmentVersion.environment))
    )
    found = Dependents(versions=[(c.ref, c.environment.namespace) for c in children])
    found.runtimes = [(f"{name} ({rid})", str(owner)) for name, rid, owner in pinned_by(session, version)]
    if outside is not None:
        members = _members(session, outside)
        found.versions = [(r, ns) for r, ns in found.versions if ns != outside]
        found.runtimes = [(n, o) for n, o in found.runtimes if o not in members]
    return found


def delete_version(session: Session, version: EnvironmentVersion, writer: Writer, pinned_by: PinnedBy) -> str:
    """Delete a version nothing depends on (``envs.service.delete_version``), refusing (409) with
    the dependents the writer may see named and the others counted; its publications go with it.
    Returns its image id."""
    envs_service.check_write(version.environment, writer, "delete its versions")
    needs = _dependents(session, version, pinned_by)
    if needs.any:
        raise VersionInUseError(
            f"{version.ref} cannot be deleted: {needs.describe(writer)} depend on it", details=needs.details(writer)
        )
    session.execute(delete(Publication).where(Publication.version_id == version.id))
    return envs_service.delete_version(session, version, writer, pinned_by)


@dataclass(frozen=True)
class Entry:
    """One published version or tag as the catalog lists it."""

    ref: str  # what was published: acme/ml@3 or acme/ml:stable
    version: EnvironmentVersion
    description: str
    published_by: str
    published_at: datetime
    packages: dict[str, int] | None  # count per kind; None: not read yet
    matched_packages: list[str]


def _package_names(version: EnvironmentVersion) -> tuple[dict[str, int] | None, list[str]]:
    kept = kept_packages(version.labels)
    if kept is None:
        return None, []
    data = kept.to_json()
    return {kind: len(items) for kind, items in data.items()}, [p["name"] for items in data.values() for p in items]


def search(session: Session, query: str = "") -> list[Entry]:
    """What is published, across teams, whose name, description, message or one of whose
    packages (when they were read) holds ``query`` (any case); everything for ``''``."""
    needle = query.strip().lower()
    pubs = session.scalars(select(Publication).order_by(Publication.id))
    out: list[Entry] = []
    for pub in pubs:
        env = session.get(Environment, pub.environment_id)
        if env is None or is_draft_repository(env.full_name):
            continue  # runtimes' drafts are never listed
        version = _version_of(session, env, pub)
        if version is None:
            continue
        counts, names = _package_names(version)
        text = " ".join([env.full_name, env.description, version.message]).lower()
        matched = sorted({n for n in names if needle and needle in n.lower()})
        if needle and needle not in text and not matched:
            continue
        ref = _published_ref(env, pub)
        out.append(Entry(ref, version, env.description, pub.published_by, pub.published_at, counts, matched[:20]))
    return sorted(out, key=lambda e: e.ref)


def _version_of(session: Session, env: Environment, pub: Publication) -> EnvironmentVersion | None:
    if pub.version_id is not None:
        return session.get(EnvironmentVersion, pub.version_id)
    tag = session.scalars(select(Tag).where(Tag.environment_id == env.id, Tag.name == pub.tag)).one_or_none()
    return tag.version if tag is not None else None


def describe(session: Session, pub: Publication) -> tuple[str, str]:
    """What ``pub`` published (``acme/ml:stable``) and the version it means now (``acme/ml@3``)."""
    env = session.get(Environment, pub.environment_id)
    if env is None:
        return "", ""
    version = _version_of(session, env, pub)
    return _published_ref(env, pub), version.ref if version is not None else ""
