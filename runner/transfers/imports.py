"""A version of another envctl server, imported here: recorded in this catalog and pulled from
the other server's registry into this engine (issue 8 item 7, "two machines").

``request`` reads the version from the upstream's public API (``registry/upstream.py``) as the
user whose upstream token the caller gives, refuses at once what cannot work (no right to
write the local environment, a version never pushed there, an upstream that refuses), and
answers with an operation. The operation pulls the upstream's manifest by the digest its
catalog recorded (phase ``downloading``, bytes done and total), checks the digest and the
image id (R24), and only then records the version here: nothing is recorded for a pull that
failed. The engine signs in to the upstream's registry with the user's name there and the
token, so the upstream's token server grants exactly what that user may pull (their teams'
repositories, and published versions).

The version keeps its message, author and sizes; its parent is the nearest version of its
upstream lineage this server already has (by digest), and its label ``envctl.imported`` says
where it came from (``imported`` in ``GET /environments/{name}``: the server, its ref there, the
digest). Importing a version this server already has records nothing new.

Outbound requests are fenced (R28): the ``from`` URL and the registry the upstream names must
resolve to public addresses only, or be named in the ``import_allow_hosts`` setting
(``registry/upstream.py``, ``envs/kit/hosts.py``); otherwise a 422 naming ``from`` or
``registry`` before any request leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs import service as envs_service
from envs.kit.errors import InvalidInputError
from envs.models import EnvironmentVersion
from envs.refs import parse_ref
from registry import image_transfer as transfer
from registry import upstream, visibility
from registry.errors import NoRegistryError
from runner.backends.base import RuntimeBackend
from runner.models import Operation
from runner.operations import Operations
from runner.runtimes.store import Records, Who, reader_for, viewer_of
from runner.saves.snapshots import writer_of
from runner.transfers.pushpull import Report, Transfers

LABEL_IMPORTED = "envctl.imported"  # {"from", "ref", "registry_digest"}: where the version came from


class Imports:
    def __init__(
        self,
        records: Records,
        backend: RuntimeBackend,
        operations: Operations,
        transfers: Transfers,
        allow_hosts: Sequence[str] = (),
    ) -> None:
        self.records = records
        self.allow_hosts = tuple(allow_hosts)  # the import_allow_hosts setting (envs/kit/hosts.py)
        self.backend = backend
        self.operations = operations
        self.transfers = transfers

    def request(self, who: Who, url: str, token: str, ref: str, name: str | None = None) -> Operation:
        """``POST /environments/import-remote``: an operation that pulls the version ``ref``
        names at ``url`` and records it here as a version of ``name`` (default: its own name).
        The upstream decides what its user may read there; here its parent is the nearest
        version of its lineage that ``who`` may see (``registry/visibility.py``)."""
        user_id = viewer_of(who).user_id
        upstream.check_url(url, self.allow_hosts)  # R28: a 422 before anything leaves
        parse_ref(ref, "ref")
        if name is not None and parse_ref(name, "name").full_name != name:
            raise InvalidInputError("name: an environment name (acme/ml), without a version or tag", field="name")
        client = self.backend.engine_client()
        if client is None:
            raise NoRegistryError(
                f"the {self.backend.name} backend's images cannot travel through a registry: nothing can be imported",
                details={"backend": self.backend.name},
            )
        offer = upstream.describe(url, token, ref, allow_hosts=self.allow_hosts)
        local = name or offer.environment
        with self.records.db.session() as s:
            envs_service.check_write_to(
                s, local, writer_of(s, user_id), "import versions into it", "import under a name of your own"
            )
        op = self.operations.create(user_id, "import", f"importing {offer.ref} from {offer.url}")
        self.transfers.submit(
            self.transfers.run_operation,
            op.id,
            "import",
            offer.ref,
            lambda report: self._import(who, offer, token, local, client, report),
        )
        return op

    def _import(
        self, who: Who, offer: upstream.Offer, token: str, local: str, client: Any, report: Report
    ) -> dict[str, Any]:
        progress = transfer.Progress(report)
        report(0, 0)
        target = transfer.Target(offer.registry_host, offer.environment)
        auth = {"username": offer.user, "password": token, "serveraddress": offer.registry_host}
        pulled = False
        with self.transfers.lock(offer.image_id):
            if not transfer.has_image(client, offer.image_id):
                upstream.check_registry(offer, self.allow_hosts)  # again: its DNS answer may have changed
                transfer.pull(client, target, offer.registry_digest, auth, progress, image_id=offer.image_id)
                pulled = True
        ref, created = self._record(who, offer, local)
        return {
            "version": ref,
            "from": offer.url,
            "upstream_ref": offer.ref,
            "new": created,
            "pulled": pulled,
            "image_id": offer.image_id,
            "registry_digest": offer.registry_digest,
            "bytes": progress.done,
            "total": progress.total,
        }

    def _record(self, who: Who, offer: upstream.Offer, local: str) -> tuple[str, bool]:
        user_id = viewer_of(who).user_id
        with self.records.db.session() as s:
            env = envs_service.get_environment(s, local)
            version, created = envs_service.register_version(
                s,
                envs_service.NewVersion(
                    environment=local,
                    image_id=offer.image_id,
                    digest=offer.digest,
                    image_ref=offer.image_id,
                    parent=_nearest(s, offer.ancestors, reader_for(s, who)),
                    message=offer.message,
                    author=offer.author,
                    size=offer.size,
                    size_added=offer.size_added,
                    labels={
                        LABEL_IMPORTED: {"from": offer.url, "ref": offer.ref, "registry_digest": offer.registry_digest}
                    },
                    tag="latest" if env is None or not env.tags else None,
                ),
                writer_of(s, user_id),
            )
            return version.ref, created


def _nearest(s: Session, ancestors: tuple[str, ...], reader: visibility.Reader) -> EnvironmentVersion | None:
    """The nearest ancestor (by digest) this server has and ``reader`` may see, if any: a
    version of another team that they may not see is never made its parent."""
    for digest in ancestors:
        for found in s.scalars(select(EnvironmentVersion).where(EnvironmentVersion.digest == digest)):
            if visibility.sees(s, found, reader):
                return found
    return None
