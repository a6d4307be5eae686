"""Apps: a notebook deployed as a web application, the way Livebook Teams does it.

How a deployment goes:

1. The author's client asks for a bundle (``new_bundle``): an id, and the key of that one bundle
   (``bundles.py``: derived from the installation's secrets key, for the team and the bundle).
   It zips the notebook and the files beside it that it names, encrypts the zip with the key,
   and asks for an upload URL (``upload_url``): presigned for the object store results use
   (an S3 presigned PUT, or a URL of this server signed with a key of the installation when the
   store is the local directory; ``receive`` takes that upload and stores it by sha256).
2. ``deploy`` records deployment N (author, time, notebook digest, the bundle's id and sha256,
   the spec: the environment version pinned now, machine type, variables, secret references
   (never values), port, who may open it, instances) and its ``deployment_started`` team event
   in one transaction.
3. The team's app servers (``server.py``) follow the event stream, take the deployment, check
   and decrypt the bundle, boot the app's runtimes, run the cells, wait for the port, and say
   each step in the deployment's status.

Who acts: the team's members (others: 404, as for an app that does not exist).
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.errors import ForbiddenError, InvalidInputError
from envs.kit.ids import new_id
from envs.refs import check_name, parse_ref
from registry import visibility
from registry.errors import TeamNotFoundError
from registry.models import Team
from registry.team_secrets import SecretBox
from runner.apps import bundles
from runner.apps.models import App, AppDeployment, AppInstance
from runner.apps.store import ACCESS, AppStore
from runner.cells.result_stores import ResultStore, check_sha256
from runner.errors import AppBundleError, AppStateError, ResultNotFoundError
from runner.runtimes import envvars
from runner.runtimes import secret_uses as secrets
from runner.runtimes.machines import get_machine_type
from runner.runtimes.store import Viewer, reader_for
from runner.settings import Settings

UPLOAD_URL_SECONDS = 600
DOWNLOAD_URL_SECONDS = 120
MAX_INSTANCES = 8


@dataclass(frozen=True)
class AppView:
    app: App
    deployments: list[AppDeployment]
    instances: list[AppInstance]


def check_port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535 or port == 7600:
        raise InvalidInputError("port: a number from 1 to 65535 (not 7600, the agent's)", field="port")
    return port


def download(url: str, sha256: str, limit: int = bundles.MAX_BUNDLE) -> bytes:
    """A bundle fetched from its presigned URL, at most ``limit`` bytes (a bigger object is
    refused: no bundle is that big). Errors name the bundle and what went wrong, never the URL
    (its signature is a credential for as long as it holds)."""
    short = sha256[:12]
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - a presigned https/http URL of the store
            data: bytes = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        missing = exc.code == 404
        raise AppBundleError(
            f"the app bundle {short} is not in the object store; nothing was run"
            if missing
            else f"the object store refused the app bundle {short}'s download (HTTP {exc.code}); nothing was run",
            reason="missing" if missing else "unreadable",
        ) from None
    except (OSError, TimeoutError) as exc:
        raise AppBundleError(
            f"the app bundle {short} could not be downloaded from the object store "
            f"({type(exc).__name__}); nothing was run",
            reason="unreadable",
        ) from None
    if len(data) > limit:
        raise AppBundleError(
            f"the app bundle {short} in the object store is over {limit} bytes: it was changed; nothing was run",
            reason="changed",
        )
    return data


class AppDeployments:
    """What the API asks of apps (routes stay thin)."""

    def __init__(self, settings: Settings, store: AppStore, box: SecretBox, objects: ResultStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.box = box
        self._objects = objects

    @property
    def objects(self) -> ResultStore:
        if self._objects is None:
            from runner.cells.result_stores import store_from_settings

            self._objects = store_from_settings(self.settings)
        return self._objects

    # ------------------------------------------------------------------ who
    def _team(self, s: Session, viewer: Viewer, team: str) -> Team:
        check_name(team, "team", "team name")
        row = s.scalars(select(Team).where(Team.name == team)).one_or_none()
        if row is None or team not in viewer.teams:
            raise TeamNotFoundError(
                f"team: no team {team!r} of yours; `envctl team list` shows your teams", details={"team": team}
            )
        return row

    # ------------------------------------------------------------------ bundles
    def new_bundle(self, viewer: Viewer, team: str, name: str) -> dict[str, Any]:
        """A bundle id and that bundle's key, for the author's client to encrypt with."""
        with self.store.tx() as s:
            row = self._team(s, viewer, team)
            team_id = row.id
        check_name(name, "name", "app name")
        bundle_id = new_id("bdl")
        key = self.box.derive(bundles.key_purpose(team_id, bundle_id))
        return {
            "bundle_id": bundle_id,
            "key": base64.b64encode(key).decode(),
            "header": bundles.header(team, team_id, name, bundle_id),
            "max_size": bundles.MAX_BUNDLE,
        }

    def _url_key(self) -> bytes:
        return self.box.derive(b"app-bundle-upload-url")

    def _signature(self, fields: Mapping[str, str]) -> str:
        text = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
        return hmac.new(self._url_key(), text.encode(), hashlib.sha256).hexdigest()

    def upload_url(self, viewer: Viewer, team: str, sha256: str, size: int, base_url: str) -> dict[str, Any]:
        """Where the client PUTs an encrypted bundle of ``sha256`` and ``size``: presigned. The
        team is asked first: an outsider learns nothing from a check of the body (R27)."""
        with self.store.tx() as s:
            self._team(s, viewer, team)
        check_sha256(sha256)
        if not isinstance(size, int) or not 0 < size <= bundles.MAX_BUNDLE:
            raise InvalidInputError(f"size: a bundle is 1 byte to {bundles.MAX_BUNDLE} bytes", field="size")
        presign = getattr(self.objects, "presign_put", None)
        if presign is not None:
            url, headers = presign(sha256, UPLOAD_URL_SECONDS)
            return {"url": url, "method": "PUT", "headers": headers, "expires_in": UPLOAD_URL_SECONDS}
        fields = {"sha256": sha256, "size": str(size), "expires": str(int(time.time()) + UPLOAD_URL_SECONDS)}
        query = urlencode({**fields, "signature": self._signature(fields)})
        return {
            "url": f"{base_url.rstrip('/')}/app-bundles?{query}",
            "method": "PUT",
            "headers": {"Content-Type": "application/octet-stream"},
            "expires_in": UPLOAD_URL_SECONDS,
        }

    def receive(self, query: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """An upload through a URL of ``upload_url`` (local store): refused unless its signature
        holds, it has not expired, and the body is the ``sha256`` and ``size`` it was signed for."""
        fields = {k: str(query.get(k, "")) for k in ("sha256", "size", "expires")}
        given = str(query.get("signature", ""))
        if not hmac.compare_digest(given, self._signature(fields)):
            raise ForbiddenError("the upload URL's signature does not hold; ask for a new upload URL")
        if not fields["expires"].isdigit() or int(fields["expires"]) < time.time():
            raise ForbiddenError("the upload URL has expired; ask for a new one")
        if len(body) != int(fields["size"]) or hashlib.sha256(body).hexdigest() != fields["sha256"]:
            raise InvalidInputError(
                "body: the upload is not the bundle the URL was made for (its size or sha256 differ)", field="body"
            )
        tmp = self.settings.data_dir / "tmp" / f"bundle-{uuid.uuid4().hex}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_bytes(body)
            self.objects.put(fields["sha256"], tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return {"sha256": fields["sha256"], "size": len(body)}

    def read_bundle(self, sha256: str) -> bytes:
        """The bundle's bytes from the object store (checked by the app server, not here):
        through a presigned URL when the store makes them (S3), else read from its directory."""
        presign = getattr(self.objects, "presign_get", None)
        if presign is None:
            return b"".join(self.objects.open(sha256))
        return download(presign(sha256, DOWNLOAD_URL_SECONDS), sha256)

    # ------------------------------------------------------------------ deployments
    def deploy(
        self,
        viewer: Viewer,
        author: str,
        team: str,
        name: str,
        *,
        notebook: str,
        notebook_sha256: str,
        bundle_id: str,
        bundle_sha256: str,
        environment: str = "python3",
        machine_type: str = "small",
        port: int = 8000,
        env: Mapping[str, object] | None = None,
        access: str = "team",
        instances: int = 1,
        rollback_of: int | None = None,
    ) -> AppDeployment:
        with self.store.tx() as s:  # the team first: an outsider learns nothing from the body (R27)
            self._team(s, viewer, team)
        check_name(name, "name", "app name")
        check_sha256(notebook_sha256)
        check_sha256(bundle_sha256)
        bundles.check_member(notebook)
        check_port(port)
        if access not in ACCESS:
            raise InvalidInputError(f"access: one of {', '.join(ACCESS)}", field="access")
        if not isinstance(instances, int) or not 1 <= instances <= MAX_INSTANCES:
            raise InvalidInputError(f"instances: from 1 to {MAX_INSTANCES}", field="instances")
        if not isinstance(bundle_id, str) or not bundle_id.startswith("bdl_") or len(bundle_id) > 40:
            raise InvalidInputError("bundle_id: not a bundle id (ask POST .../bundles for one)", field="bundle_id")
        get_machine_type(self.settings, machine_type)
        own_env = envvars.check_env(env or {})
        ref = parse_ref(environment, "environment")
        try:
            size = self.objects.size(bundle_sha256)
        except ResultNotFoundError:
            raise InvalidInputError(
                f"bundle_sha256: no bundle {bundle_sha256} was uploaded; PUT it to its upload URL first",
                field="bundle_sha256",
            ) from None
        with self.store.tx() as s:
            self._team(s, viewer, team)
            version = visibility.resolve(s, ref, reader_for(s, viewer), "environment")
            own_env = secrets.resolve(s, viewer.user_id, own_env, team_only=team)
            _, dep = self.store.add_deployment(
                s,
                team=team,
                name=name,
                access=access,
                instances=instances,
                author_id=viewer.user_id,
                author=author,
                notebook=notebook,
                notebook_sha256=notebook_sha256,
                bundle_id=bundle_id,
                bundle_sha256=bundle_sha256,
                bundle_size=size,
                environment_ref=str(ref),
                version_id=version.id,
                version_ref=version.ref,
                spec={"machine_type": machine_type, "port": port, "env": own_env},
                rollback_of=rollback_of,
            )
            s.expunge(dep)
            return dep

    def rollback(self, viewer: Viewer, author: str, team: str, name: str, number: int) -> AppDeployment:
        """Deployment ``number`` deployed again, as a new deployment (its bundle, spec and pinned version)."""
        with self.store.tx() as s:
            self._team(s, viewer, team)
            app = self.store.get(s, team, name)
            old = self.store.deployment(s, app.id, number)
            if old is None:
                raise AppStateError(
                    f"app {team}/{name} has no deployment {number}; `envctl app show {name}` lists them",
                    details={"number": number},
                )
            spec = dict(old.spec)
            fields = {
                "notebook": old.notebook, "notebook_sha256": old.notebook_sha256, "bundle_id": old.bundle_id,
                "bundle_sha256": old.bundle_sha256, "environment": old.version_ref,
                "machine_type": spec.get("machine_type", "small"), "port": int(spec.get("port", 8000)),
                "env": spec.get("env") or {}, "access": app.access, "instances": app.instances,
            }  # fmt: skip
        return self.deploy(viewer, author, team, name, rollback_of=number, **fields)

    def list(self, viewer: Viewer, team: str) -> list[AppView]:
        with self.store.tx() as s:
            self._team(s, viewer, team)
            out = [
                AppView(app, self.store.deployments(s, app.id)[:5], self.store.instances(s, app.id))
                for app in self.store.list(s, team)
            ]
            s.expunge_all()
            return out

    def show(self, viewer: Viewer, team: str, name: str) -> AppView:
        with self.store.tx() as s:
            self._team(s, viewer, team)
            app = self.store.get(s, team, name)
            view = AppView(app, self.store.deployments(s, app.id), self.store.instances(s, app.id))
            s.expunge_all()
            return view

    def stop(self, viewer: Viewer, by: str, team: str, name: str) -> builtins.list[str]:
        """The app stopped: its runtimes' ids (the caller deletes them; the app server too)."""
        with self.store.tx() as s:
            self._team(s, viewer, team)
            app = self.store.get(s, team, name)
            self.store.stop(s, app, by)
            return [i.runtime_id for i in self.store.instances(s, app.id) if i.runtime_id]

    def remove(self, viewer: Viewer, by: str, team: str, name: str) -> builtins.list[str]:
        """The app and its deployments gone (stopped first): its runtimes' ids, to delete."""
        with self.store.tx() as s:
            self._team(s, viewer, team)
            app = self.store.get(s, team, name)
            self.store.stop(s, app, by)
            runtimes = [i.runtime_id for i in self.store.instances(s, app.id) if i.runtime_id]
            self.store.remove(s, app)
            return runtimes
