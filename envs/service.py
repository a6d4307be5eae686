"""Rules for environments, versions and tags. Functions take the caller's session.

Ownership: anyone may read any environment outside a team's namespace (list, show, lineage,
export, boot from it, import it, extend it under another name); a team's are its members' to
read, and everyone's once published: ``registry/visibility.py`` decides, since publications are
the registry's (functions here resolve references for envctl itself). Writing to one (a new
version, a tag moved) and deleting its versions is for its owner, the members of its team (its
namespace: ``acme/ml`` is team ``acme``'s) and admins only; an environment with no owner (a
base image, or one older than owners) is for admins only, and only members create one in a
team's namespace. The writer is a ``Writer``; ``None`` in its place is envctl itself
(``envctl base build``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from envs.errors import EnvironmentNotFoundError, VersionInUseError, VersionNotFoundError
from envs.kit.clock import utcnow
from envs.kit.errors import ForbiddenError
from envs.models import Environment, EnvironmentVersion, Tag
from envs.refs import DEFAULT_TAG, EnvRef, check_name, parse_ref


def get_environment(session: Session, full_name: str) -> Environment | None:
    namespace, _, name = full_name.rpartition("/")
    return session.scalars(
        select(Environment)
        .where(Environment.namespace == namespace, Environment.name == name)
        .options(selectinload(Environment.tags))
    ).one_or_none()


def next_number(session: Session, full_name: str) -> int:
    """The number the next version of ``full_name`` would get (1 for a new environment)."""
    namespace, _, name = full_name.rpartition("/")
    latest = session.scalar(
        select(func.max(EnvironmentVersion.number))
        .join(Environment, Environment.id == EnvironmentVersion.environment_id)
        .where(Environment.namespace == namespace, Environment.name == name)
    )
    return (latest or 0) + 1


@dataclass(frozen=True)
class Writer:
    """A user about to change environments (admins may change any)."""

    user_id: str
    is_admin: bool = False
    teams: frozenset[str] = frozenset()  # the teams (namespaces) the user is a member of


def may_write(env: Environment, writer: Writer | None) -> bool:
    """Whether ``writer`` may add versions to ``env``, move its tags or delete its versions:
    its owner, a member of the team whose namespace it is in, or an admin."""
    if writer is None or writer.is_admin:
        return True
    if env.namespace and env.namespace in writer.teams:
        return True
    return env.owner_id is not None and env.owner_id == writer.user_id


def check_create(full_name: str, writer: Writer | None) -> None:
    """Refuse (403) making an environment in a team's namespace (``acme/ml``) to a writer who
    is not a member of that team; names without a namespace are anyone's to make."""
    namespace = full_name.rpartition("/")[0]
    if not namespace or writer is None or writer.is_admin or namespace in writer.teams:
        return
    raise ForbiddenError(
        f"environment {full_name!r} is in the namespace of team {namespace!r}: only its members may create it; "
        "ask a team admin to add you (`envctl team add-member`) or use a name of your own",
        details={"environment": full_name, "team": namespace},
    )


def check_write(env: Environment | None, writer: Writer | None, action: str, advice: str = "") -> None:
    """Refuse (403 ``forbidden``) a change to ``env`` by someone who may not make it.

    ``None`` for ``env`` is one that does not exist yet: whoever creates it will own it.
    ``action`` names the change ("save into it"); ``advice`` says what to do instead.
    """
    if env is None or may_write(env, writer):
        return
    if env.namespace:  # another team's: the same answer whether it exists or not (no telling its names)
        check_create(env.full_name, writer)
    if env.owner_id is None:
        who = "has no owner (a base image, or older than owners): only an admin"
    else:
        who = "belongs to another user: only its owner or an admin"
    raise ForbiddenError(
        f"environment {env.full_name!r} {who} may {action}" + (f"; {advice}" if advice else ""),
        details={"environment": env.full_name},
    )


def check_write_to(session: Session, full_name: str, writer: Writer | None, action: str, advice: str = "") -> None:
    """``check_write`` on the environment ``full_name``, or ``check_create`` when it does not exist."""
    env = get_environment(session, full_name)
    if env is None:
        check_create(full_name, writer)
    else:
        check_write(env, writer, action, advice)


def get_or_create_environment(session: Session, full_name: str, owner_id: str | None = None) -> Environment:
    """The environment ``full_name``; made, owned by ``owner_id``, if there is none."""
    env = get_environment(session, full_name)
    if env is not None:
        return env
    namespace, _, name = full_name.rpartition("/")
    if namespace:
        check_name(namespace, "environment", "team")
    check_name(name, "environment", "environment name")
    env = Environment(namespace=namespace, name=name, owner_id=owner_id, created_at=utcnow())
    session.add(env)
    session.flush()
    return env


def environment_of(session: Session, ref: EnvRef | str, field: str = "ref") -> Environment:
    """The environment a reference names, read afresh: a name (``python3``, ``acme/ml``) or any
    reference to one of its versions, which must exist (404 otherwise)."""
    if isinstance(ref, str):
        ref = parse_ref(ref, field)
    env = get_environment(session, ref.full_name)
    if env is None:
        raise no_environment(ref, field)
    if ref.is_pinned:
        resolve(session, ref, field)  # 404 for a version that does not exist
    session.refresh(env)
    return env


def list_environments(session: Session) -> list[Environment]:
    return list(
        session.scalars(
            select(Environment)
            .options(selectinload(Environment.versions), selectinload(Environment.tags))
            .order_by(Environment.namespace, Environment.name)
        )
    )


def resolve(
    session: Session, ref: EnvRef | str, field: str = "environment", *, env: Environment | None = None
) -> EnvironmentVersion:
    """The one version a reference means now. Tags are resolved to the version they point at.
    ``env``: the environment the reference names, when the caller has loaded it already."""
    if isinstance(ref, str):
        ref = parse_ref(ref, field)
    if env is None:
        env = get_environment(session, ref.full_name)
    if env is None:
        raise no_environment(ref, field)
    q = select(EnvironmentVersion).where(EnvironmentVersion.environment_id == env.id)
    if ref.version is not None:
        version = session.scalars(q.where(EnvironmentVersion.number == ref.version)).one_or_none()
    elif ref.digest is not None:
        version = session.scalars(q.where(EnvironmentVersion.digest == ref.digest)).one_or_none()
    else:
        tag = next((t for t in env.tags if t.name == ref.tag), None)
        version = tag.version if tag is not None else None
    if version is None:
        raise VersionNotFoundError(f"{field}: {ref} does not exist", details={"field": field, "reference": str(ref)})
    return version


def no_environment(ref: EnvRef, field: str) -> EnvironmentNotFoundError:
    """The 404 of an environment that does not exist (or that its reader may not see)."""
    return EnvironmentNotFoundError(
        f"{field}: no environment named {ref.full_name!r}; `envctl env ls` lists them",
        details={"field": field, "environment": ref.full_name},
    )


@dataclass(frozen=True)
class NewVersion:
    """What a new version is made of; the number is given by ``register_version``."""

    environment: str  # full name
    image_id: str
    image_ref: str
    digest: str | None = None  # defaults to image_id
    parent: EnvironmentVersion | None = None
    parent_id: int | None = None  # the parent by its id alone, when ``parent`` is not given
    message: str = ""
    author: str = ""
    size: int = 0
    size_added: int = 0
    recipe_digest: str | None = None
    source_runtime_id: str | None = None
    notebook: str | None = None
    labels: dict[str, Any] | None = None
    tag: str | None = DEFAULT_TAG  # None: leave the tags as they are


def register_version(
    session: Session, new: NewVersion, writer: Writer | None = None
) -> tuple[EnvironmentVersion, bool]:
    """Record a version; returns ``(version, created)``.

    A version with the same digest in the same environment is the same version: it is
    returned with ``created=False`` and no number is used up. The tag is moved either way.

    ``writer`` owns the environment if this makes it; if it exists, a new version or a moved
    tag is refused (403) unless ``writer`` may write to it (``None``: envctl itself). Naming a
    version the environment already has, with no tag to move, writes nothing and is allowed
    to anyone: a loaded archive carries the base images its lineage stands on.
    """
    env = get_environment(session, new.environment)
    if env is None:
        check_create(new.environment, writer)
        env = get_or_create_environment(session, new.environment, writer.user_id if writer is not None else None)
    digest = new.digest or new.image_id
    existing = session.scalars(
        select(EnvironmentVersion).where(
            EnvironmentVersion.environment_id == env.id, EnvironmentVersion.digest == digest
        )
    ).one_or_none()
    moves_tag = bool(new.tag) and not any(
        t.name == new.tag and existing is not None and t.version_id == existing.id for t in env.tags
    )
    if existing is None or moves_tag:
        check_write(env, writer, "add versions to it", "use a name of your own")
    created = existing is None
    if existing is None:
        number = (
            session.scalar(
                select(func.max(EnvironmentVersion.number)).where(EnvironmentVersion.environment_id == env.id)
            )
            or 0
        ) + 1
        existing = EnvironmentVersion(
            environment_id=env.id,
            number=number,
            digest=digest,
            image_id=new.image_id,
            image_ref=new.image_ref,
            parent_id=new.parent.id if new.parent is not None else new.parent_id,
            message=new.message,
            author=new.author,
            size=new.size,
            size_added=new.size_added,
            recipe_digest=new.recipe_digest,
            source_runtime_id=new.source_runtime_id,
            notebook=new.notebook,
            labels=dict(new.labels or {}),
            created_at=utcnow(),
        )
        session.add(existing)
        session.flush()
    if new.tag:
        set_tag(session, env, new.tag, existing)
    session.expire(env, ["tags", "versions"])  # read again if asked for, not now
    return existing, created


def set_tag(session: Session, env: Environment, name: str, version: EnvironmentVersion) -> Tag:
    tag = next((t for t in env.tags if t.name == name), None)  # read with env in this transaction
    if tag is None:
        tag = Tag(environment_id=env.id, name=name, version_id=version.id, updated_at=utcnow())
        session.add(tag)
    else:
        tag.version_id = version.id
        tag.updated_at = utcnow()
    session.flush()
    return tag


def record_pushed(session: Session, version: EnvironmentVersion, manifest_digest: str) -> None:
    """The registry holds ``version`` under this manifest digest (a push, or a save made there)."""
    version.registry_digest = manifest_digest


def record_labels(session: Session, version: EnvironmentVersion, labels: dict[str, Any]) -> None:
    """Add to what envctl knows of a version's image (its packages, for one): merged into its labels."""
    version.labels = {**(version.labels or {}), **labels}


def lineage(session: Session, version: EnvironmentVersion) -> list[EnvironmentVersion]:
    """The chain from ``version`` down to its base image, ``version`` first."""
    chain = [version]
    seen = {version.id}
    current = version
    while current.parent_id is not None:
        parent = session.get(EnvironmentVersion, current.parent_id)
        if parent is None or parent.id in seen:  # a cycle cannot be made through the API
            break
        chain.append(parent)
        seen.add(parent.id)
        current = parent
    return chain


def get_version(session: Session, version_id: int) -> EnvironmentVersion:
    version = session.get(EnvironmentVersion, version_id)
    if version is None:
        raise VersionNotFoundError(f"version {version_id} does not exist")
    return version


def register_base_images(session: Session, built: list[Any]) -> list[tuple[EnvironmentVersion, bool]]:
    """Record built base images (``envs.base.build.BuiltImage``, parents first) as versions.

    The parent of each is the version registered for its parent image in the same call (or
    already present). Registering the same image twice makes no new version.
    """
    out: list[tuple[EnvironmentVersion, bool]] = []
    by_name: dict[str, EnvironmentVersion] = {}
    for image in built:
        parent: EnvironmentVersion | None = None
        if image.parent:
            parent = by_name.get(image.parent) or resolve(session, image.parent, "parent")
        tag = f"envctl-base/{image.name}:{image.recipe_digest.split(':')[-1][:12]}"
        version, created = register_version(
            session,
            NewVersion(
                environment=image.name,
                image_id=image.image_id,
                image_ref=tag,
                parent=parent,
                message=f"base image {image.name} built from its recipe",
                author="envctl",
                size=image.size,
                size_added=max(0, image.size - (parent.size if parent else 0)),
                recipe_digest=image.recipe_digest,
                labels={"envctl.base-image": image.name},
            ),
        )
        by_name[image.name] = version
        out.append((version, created))
    return out


# What pins a version from above envs (the runner's runtimes): ``(name, id, owner id)`` of each.
# The callable is handed in by whoever starts envctl (``api/startup.py`` passes the runtimes
# store's ``pinned_to``), so envs imports nothing above it and holds no registry of callbacks.
Pin = tuple[str, str, str]
PinnedBy = Callable[[Session, EnvironmentVersion], list[Pin]]


def pinned_by_nothing(session: Session, version: EnvironmentVersion) -> list[Pin]:
    """For a process with no runtimes (``envctl base build``, tests of envs alone)."""
    return []


def dependents(session: Session, version: EnvironmentVersion, pinned_by: PinnedBy) -> dict[str, list[str]]:
    """What needs a version: child versions, and runtimes pinned to it (by id)."""
    children = session.scalars(select(EnvironmentVersion).where(EnvironmentVersion.parent_id == version.id)).all()
    return {
        "versions": sorted(c.ref for c in children),
        "runtimes": sorted(rid for _, rid, _ in pinned_by(session, version)),
    }


def delete_version(session: Session, version: EnvironmentVersion, writer: Writer | None, pinned_by: PinnedBy) -> str:
    """Forget a version nothing depends on; returns its image id. Tags on it move back to the
    newest remaining version of the environment (or go away with the last one).

    Only the environment's owner or an admin may (403 otherwise, before anything else)."""
    check_write(version.environment, writer, "delete its versions")
    needs = dependents(session, version, pinned_by)
    if any(needs.values()):
        parts = []
        if needs["versions"]:
            parts.append("versions " + ", ".join(needs["versions"]))
        if needs.get("runtimes"):
            parts.append("runtimes " + ", ".join(needs["runtimes"]))
        raise VersionInUseError(f"{version.ref} cannot be deleted: {' and '.join(parts)} depend on it", details=needs)
    env = version.environment
    image_id = version.image_id
    others = [v for v in env.versions if v.id != version.id]
    for tag in list(env.tags):
        if tag.version_id == version.id:
            if others:
                tag.version_id = max(others, key=lambda v: v.number).id
            else:
                session.delete(tag)
    session.flush()
    session.delete(version)
    session.flush()
    if not others:  # the last version: the environment goes with it
        session.delete(env)
        session.flush()
    return image_id
