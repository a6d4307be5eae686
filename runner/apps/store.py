"""The apps store: alone writes ``apps``, ``app_deployments`` and ``app_instances``.

Who may see and change a team's apps (its members), and who may open one (its members, or
anyone when it is public), is decided here (``may_open``) and asked by every path: routes, the
proxy, the CLI through them.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from envs.kit.clock import utcnow
from envs.kit.db import Database
from envs.kit.ids import new_id
from registry import events
from runner.apps.models import App, AppDeployment, AppInstance
from runner.errors import AppNotFoundError

ACCESS = ("team", "public")
LIVE = ("pending", "downloading", "starting", "running")  # a deployment still on its way or serving
ENDED = ("failed", "stopped")


def may_open(app: App, teams: frozenset[str] | set[str]) -> bool:
    """Whether someone in ``teams`` (none: a visitor who did not sign in) may open the app."""
    return app.access == "public" or app.team in teams


class AppStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self.db.session() as s:
            yield s

    # ------------------------------------------------------------------ reads
    @staticmethod
    def find(s: Session, team: str, name: str) -> App | None:
        return s.scalars(select(App).where(App.team == team, App.name == name)).one_or_none()

    def get(self, s: Session, team: str, name: str) -> App:
        app = self.find(s, team, name)
        if app is None:
            raise AppNotFoundError(
                f"team {team!r} has no app {name[:64]!r}; `envctl app ls --team {team}` lists them",
                details={"team": team, "app": name},
            )
        return app

    @staticmethod
    def list(s: Session, team: str) -> builtins.list[App]:
        return list(s.scalars(select(App).where(App.team == team).order_by(App.name)))

    @staticmethod
    def deployments(s: Session, app_id: str) -> builtins.list[AppDeployment]:
        return list(
            s.scalars(select(AppDeployment).where(AppDeployment.app_id == app_id).order_by(AppDeployment.number.desc()))
        )

    @staticmethod
    def deployment(s: Session, app_id: str, number: int) -> AppDeployment | None:
        return s.scalars(
            select(AppDeployment).where(AppDeployment.app_id == app_id, AppDeployment.number == number)
        ).one_or_none()

    @staticmethod
    def instances(s: Session, app_id: str) -> builtins.list[AppInstance]:
        return list(s.scalars(select(AppInstance).where(AppInstance.app_id == app_id).order_by(AppInstance.created_at)))

    def ports_of_runtime(self, runtime_id: str) -> tuple[int, ...]:
        """The port an app runtime's web server listens on (its deployment's), for the boot to
        ask the backend to make reachable (runner/runtimes/boot.py); () for any other runtime."""
        with self.tx() as s:
            spec = s.scalars(
                select(AppDeployment.spec)
                .join(AppInstance, AppInstance.deployment_id == AppDeployment.id)
                .where(AppInstance.runtime_id == runtime_id)
            ).first()
        return (int((spec or {}).get("port", 8000)),) if spec is not None else ()

    @staticmethod
    def instances_of_runner(s: Session, runner: str) -> builtins.list[AppInstance]:
        return list(s.scalars(select(AppInstance).where(AppInstance.runner == runner)))

    @staticmethod
    def pending(s: Session, teams: tuple[str, ...]) -> builtins.list[AppDeployment]:
        """Deployments of ``teams``' apps that no app server took yet, oldest first."""
        return list(
            s.scalars(
                select(AppDeployment)
                .join(App, App.id == AppDeployment.app_id)
                .where(App.team.in_(teams), AppDeployment.status == "pending")
                .order_by(AppDeployment.created_at)
            )
        )

    def serving(self, team: str, name: str) -> tuple[App, builtins.list[str]] | None:
        """The app and the addresses of its current deployment's running instances."""
        with self.db.session() as s:
            app = self.find(s, team, name)
            if app is None:
                return None
            rows = s.scalars(
                select(AppInstance.address)
                .join(AppDeployment, AppDeployment.id == AppInstance.deployment_id)
                .where(
                    AppInstance.app_id == app.id,
                    AppDeployment.number == app.current,
                    AppInstance.status == "running",
                    AppInstance.address.is_not(None),
                )
            )
            s.expunge(app)
            return app, [str(a) for a in rows]

    # ------------------------------------------------------------------ writes
    def add_deployment(
        self,
        s: Session,
        *,
        team: str,
        name: str,
        access: str,
        instances: int,
        author_id: str,
        **fields: Any,
    ) -> tuple[App, AppDeployment]:
        """The next numbered deployment of the app (made if new), and its ``deployment_started``
        event in the same transaction: the team's app servers take it from the event stream."""
        now = utcnow()
        app = self.find(s, team, name)
        if app is None:
            app = App(
                id=new_id("app"), team=team, name=name, access=access, instances=instances,
                next_number=0, current=0, stopped=False, created_by=author_id, created_at=now, updated_at=now,
            )  # fmt: skip
            s.add(app)
            s.flush()
        s.execute(
            update(App)
            .where(App.id == app.id)
            .values(next_number=App.next_number + 1, access=access, instances=instances, stopped=False, updated_at=now)
        )
        s.refresh(app)
        dep = AppDeployment(
            id=new_id("dep"), app_id=app.id, number=app.next_number, author_id=author_id, status="pending",
            message="waiting for an app server of the team", created_at=now, updated_at=now, **fields,
        )  # fmt: skip
        s.add(dep)
        s.flush()
        events.record(
            s, team, "deployment_started", f"{team}/{name}", f"{team}/{name}#{dep.number}",
            app=name, number=dep.number, deployment=dep.id, author=dep.author,
        )  # fmt: skip
        return app, dep

    def claim(self, deployment_id: str, runner: str) -> bool:
        """Take a pending deployment (one app server does: a compare-and-set)."""
        with self.db.session() as s:
            done = s.execute(
                update(AppDeployment)
                .where(AppDeployment.id == deployment_id, AppDeployment.status == "pending")
                .values(status="downloading", message="downloading the bundle", runner=runner, updated_at=utcnow())
            )
            return bool(getattr(done, "rowcount", 0))

    def interrupted(self, runner: str) -> builtins.list[tuple[str, builtins.list[AppInstance]]]:
        """Deployments ``runner`` had taken and not finished (it stopped meanwhile), with their
        instances: to deploy again."""
        with self.db.session() as s:
            deps = s.scalars(
                select(AppDeployment).where(
                    AppDeployment.runner == runner, AppDeployment.status.in_(("downloading", "starting"))
                )
            )
            out = [(d.id, list(s.scalars(select(AppInstance).where(AppInstance.deployment_id == d.id)))) for d in deps]
            s.expunge_all()
            return out

    @staticmethod
    def release(s: Session, deployment_id: str) -> None:
        s.execute(update(AppDeployment).where(AppDeployment.id == deployment_id).values(runner=None))

    def set_deployment(self, deployment_id: str, status: str, message: str = "") -> None:
        with self.db.session() as s:
            s.execute(
                update(AppDeployment)
                .where(AppDeployment.id == deployment_id)
                .values(status=status, message=message, updated_at=utcnow())
            )

    def take_over(self, deployment_id: str) -> builtins.list[str]:
        """The deployment serves its app now; every other live deployment of the app is
        ``stopped`` (their instances go: ``server.py``). Their ids."""
        with self.db.session() as s:
            dep = s.get(AppDeployment, deployment_id)
            if dep is None:
                return []
            app = s.get(App, dep.app_id)
            if app is None or app.stopped:
                return []
            now = utcnow()
            s.execute(update(App).where(App.id == app.id).values(current=dep.number, updated_at=now))
            others = list(
                s.scalars(
                    select(AppDeployment.id).where(
                        AppDeployment.app_id == app.id,
                        AppDeployment.id != dep.id,
                        AppDeployment.status.in_(LIVE),
                        AppDeployment.number < dep.number,
                    )
                )
            )
            if others:
                s.execute(
                    update(AppDeployment)
                    .where(AppDeployment.id.in_(others))
                    .values(status="stopped", message=f"deployment {dep.number} took over", updated_at=now)
                )
            return others

    def stop(self, s: Session, app: App, by: str) -> None:
        """Nothing of the app serves any more: every live deployment ``stopped``."""
        now = utcnow()
        s.execute(update(App).where(App.id == app.id).values(stopped=True, current=0, updated_at=now))
        s.execute(
            update(AppDeployment)
            .where(AppDeployment.app_id == app.id, AppDeployment.status.in_(LIVE))
            .values(status="stopped", message=f"stopped by {by}", updated_at=now)
        )
        events.record(s, app.team, "app_stopped", f"{app.team}/{app.name}", f"{app.team}/{app.name}", by=by)

    @staticmethod
    def remove(s: Session, app: App) -> None:
        s.execute(delete(AppInstance).where(AppInstance.app_id == app.id))
        s.execute(delete(AppDeployment).where(AppDeployment.app_id == app.id))
        s.execute(delete(App).where(App.id == app.id))

    def add_instance(self, deployment_id: str, app_id: str, runner: str = "") -> str:
        """An instance of the deployment; with no ``runner``, ``waiting`` for an app server of
        the team to take it (``claim_instance``)."""
        now = utcnow()
        with self.db.session() as s:
            row = AppInstance(
                id=new_id("ai"), deployment_id=deployment_id, app_id=app_id, runner=runner,
                status="starting" if runner else "waiting", message="" if runner else "waiting for an app server",
                restarts=0, created_at=now, updated_at=now,
            )  # fmt: skip
            s.add(row)
            return row.id

    @staticmethod
    def waiting(s: Session, teams: tuple[str, ...]) -> builtins.list[AppInstance]:
        """Instances no app server took yet, of ``teams``' deployments still starting, oldest first."""
        return list(
            s.scalars(
                select(AppInstance)
                .join(AppDeployment, AppDeployment.id == AppInstance.deployment_id)
                .join(App, App.id == AppInstance.app_id)
                .where(App.team.in_(teams), AppInstance.runner == "", AppDeployment.status == "starting")
                .order_by(AppInstance.created_at, AppInstance.id)
            )
        )

    @staticmethod
    def of_deployment(s: Session, deployment_id: str) -> builtins.list[AppInstance]:
        """The deployment's instances in the order they were made (the n of ``app-NAME-N-n-XXXX``)."""
        return list(
            s.scalars(
                select(AppInstance)
                .where(AppInstance.deployment_id == deployment_id)
                .order_by(AppInstance.created_at, AppInstance.id)
            )
        )

    def claim_instance(self, instance_id: str, runner: str) -> bool:
        """Take a waiting instance (one app server does: a compare-and-set)."""
        with self.db.session() as s:
            done = s.execute(
                update(AppInstance)
                .where(AppInstance.id == instance_id, AppInstance.runner == "")
                .values(runner=runner, status="starting", message="taken", updated_at=utcnow())
            )
            return bool(getattr(done, "rowcount", 0))

    def set_running(self, instance_id: str, address: str) -> bool:
        """The instance answers at ``address``, unless it was given up meanwhile (``abandoned``)."""
        with self.db.session() as s:
            done = s.execute(
                update(AppInstance)
                .where(AppInstance.id == instance_id, AppInstance.status == "starting")
                .values(status="running", message="", address=address, updated_at=utcnow())
            )
            return bool(getattr(done, "rowcount", 0))

    def set_instance(self, instance_id: str, **values: Any) -> bool:
        """Values of the instance, unless it was given up (``abandoned``: its server removes it)."""
        values["updated_at"] = utcnow()
        with self.db.session() as s:
            done = s.execute(
                update(AppInstance)
                .where(AppInstance.id == instance_id, AppInstance.status != "abandoned")
                .values(**values)
            )
            return bool(getattr(done, "rowcount", 0))

    def remove_instance(self, instance_id: str) -> None:
        with self.db.session() as s:
            s.execute(delete(AppInstance).where(AppInstance.id == instance_id))

    @staticmethod
    def deployment_status(s: Session, deployment_id: str) -> tuple[str, datetime] | None:
        """The deployment's status and when it was last set (None: it is gone)."""
        dep = s.get(AppDeployment, deployment_id)
        return (dep.status, dep.updated_at) if dep is not None else None
