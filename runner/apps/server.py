"""An app server: a runner that deploys and serves the apps of the teams it is told to
(``ENVCTL_RUNNER_APP_TEAMS``); no other team's deployment ever reaches it.

Each round (``tick``) it reads the teams' event streams for ``deployment_started`` (and, so that
nothing is missed while it was down, the teams' deployments still ``pending``), takes each one
in a compare-and-set (one app server deploys a deployment), and deploys it in a thread of its
own:

``downloading``  the bundle read from the object store and checked (``bundles.open_bundle``):
                 changed, truncated or another team's: ``failed``, nothing runs
``starting``     its instances made ``waiting``; the team's app servers take them (this one
                 too, ``_take_instances``): each server one per round while it holds none of
                 that deployment, any once one waited ``SPREAD_WAIT`` (no other server took it),
                 so that the instances spread over the team's servers and one server alone
                 takes them all. The server that took an instance reads and checks the bundle
                 itself, makes it an ordinary runtime of the team on its own backend (owned by
                 the author, pinned to the recorded version, with the spec's variables and
                 secret references, idle shutdown off: ``idle_timeout`` 0), boots it, writes
                 the bundle's files under ``~/app`` (the cells' working directory), runs the
                 notebook's code cells in order, then asks the port until it answers; the
                 deployment's server waits until every instance runs, or one failed
``running``      the deployment takes over (the proxy sends requests to it from then on); the
                 deployments it replaced stop after ``TAKEOVER_GRACE`` (requests in flight end)
``failed``       with the cell's error (``cell 2: NameError: ...``) or the reason; its runtimes go
                 (each server removes its own)

Each round also watches this runner's running instances: a runtime that is no longer running
(crashed, OOM, stopped by hand), or whose port stopped answering ``PROBES_TO_RESTART`` rounds
in a row, is restarted (booted again, cells run again) after a backoff that doubles per restart
(1 s, 2 s, 4 s, ... at most ``MAX_BACKOFF``); instances of ended deployments are removed.

The app's address is where the backend says this server reaches the runtime's port
(``RuntimeBackend.endpoint``): on the local engine the container's own address on its network,
which this host routes to (the tcp agent channel's reasoning, runner/backends/agent_channel.py);
on Swarm the task's node and the node's port the app's port is published on (the boot asks the
store for it: ``AppStore.ports_of_runtime``); on Kubernetes the pod's IP. The proxy in the API
connects there. A backend that gives no reachable address fails the deployment saying so.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from envs.kit.clock import utcnow
from envs.kit.errors import EnvctlError
from registry import events
from registry.models import Team
from registry.team_secrets import SecretBox
from runner.apps import bundles
from runner.apps.models import App, AppDeployment, AppInstance
from runner.apps.store import ENDED, AppStore
from runner.cells.executions import ExecutionManager
from runner.errors import AppBundleError, AppFailedError
from runner.models import Runtime
from runner.runtimes.lifecycle import Lifecycle
from runner.runtimes.settings import Runtimes
from runner.runtimes.states import State
from runner.runtimes.store import Records, Viewer
from runner.settings import Settings

log = logging.getLogger("envctl.apps")

TICK = 0.5  # seconds between rounds
WAIT_POLL = 0.1  # seconds between looks at a starting deployment's instances
SPREAD_WAIT = 2.0  # seconds a waiting instance is left to app servers that hold none of its deployment
TAKEOVER_GRACE = 2.0  # seconds the replaced deployment keeps serving requests already sent to it
PROBES_TO_RESTART = 3
MAX_BACKOFF = 60.0
APP_DIR = "~/app"


@dataclass(frozen=True)
class Loaded:
    cells: list[str]
    files: dict[str, bytes]


def files_cell(files: dict[str, bytes]) -> str:
    """The first cell of an app: the bundle's files under ``~/app``, made the working directory."""
    encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
    return (
        "import base64 as _b, os as _o, sys as _s\n"
        f"_d = _o.path.expanduser({APP_DIR!r})\n"
        f"for _n, _c in {encoded!r}.items():\n"
        "    _p = _o.path.join(_d, _n)\n"
        "    _o.makedirs(_o.path.dirname(_p), exist_ok=True)\n"
        "    open(_p, 'wb').write(_b.b64decode(_c))\n"
        "_o.chdir(_d); _s.path.insert(0, _d)\n"
        "del _b, _o, _s, _d\n"
    )


def port_answers(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


class AppServer:
    def __init__(
        self,
        settings: Settings,
        store: AppStore,
        box: SecretBox,
        read_bundle: Callable[[str], bytes],
        *,
        runner: str,
        records: Records,
        runtimes: Runtimes,
        lifecycle: Lifecycle,
        executions: ExecutionManager,
        endpoint_of: Callable[[dict[str, Any], int], str | None],
    ) -> None:
        self.settings = settings
        self.teams = settings.runner_app_teams
        self.store = store
        self.box = box
        self.read_bundle = read_bundle
        self.runner = runner
        self.records = records
        self.runtimes = runtimes
        self.lifecycle = lifecycle
        self.executions = executions
        self.endpoint_of = endpoint_of  # the backend's: where this server reaches a runtime's port
        self._last_event: dict[str, int] = {}
        self._loaded: dict[str, Loaded] = {}
        self._busy: set[str] = set()  # instance or deployment ids a thread works on
        self._failed_probes: dict[str, int] = {}
        self._next_try: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.teams)

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="envctl-app-server", daemon=True)
        self._thread.start()

    def recover(self) -> None:
        """Deployments this runner was making when it stopped: their runtimes go, and they are
        ``pending`` again (the next round deploys them from the start)."""
        for dep_id, instances in self.store.interrupted(self.runner):
            for inst in instances:
                if inst.runner in (self.runner, ""):
                    self._retire(inst.id, inst.runtime_id)
                else:  # another app server's: it removes it (``_watch``)
                    self.store.set_instance(inst.id, status="abandoned", message="its deployment is made again")
            self.store.set_deployment(dep_id, "pending", "the app server restarted while deploying; deploying again")
            with self.store.tx() as s:
                self.store.release(s, dep_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a round that failed is tried again; the loop never dies
                log.exception("app server round failed")
            self._stop.wait(TICK)

    # ------------------------------------------------------------------ one round
    def tick(self) -> None:
        for dep_id in self._wanted():
            if self.store.claim(dep_id, self.runner):
                self._spawn(dep_id, self._deploy, dep_id)
        self._take_instances()
        self._watch()

    def _take_instances(self) -> None:
        """Waiting instances of the teams' deployments: one of each deployment per round while
        this server holds none of it (so the team's app servers take one each, spreading the
        instances over them), any once one waited ``SPREAD_WAIT`` (no other server took it)."""
        now = utcnow()
        with self.store.tx() as s:
            waiting = self.store.waiting(s, self.teams)
            held = {
                i.deployment_id
                for i in self.store.instances_of_runner(s, self.runner)
                if i.deployment_id in {w.deployment_id for w in waiting}
            }
            s.expunge_all()
        for inst in waiting:
            if inst.deployment_id in held and (now - inst.created_at).total_seconds() < SPREAD_WAIT:
                continue
            if self.store.claim_instance(inst.id, self.runner):
                held.add(inst.deployment_id)
                self._spawn(inst.id, self._start_instance, inst.id)

    def _wanted(self) -> list[str]:
        """Deployments to take: those the event streams announce, and any still pending."""
        found: list[str] = []
        with self.store.tx() as s:
            for team in self.teams:
                for e in events.after(s, team, self._last_event.get(team, 0)):
                    self._last_event[team] = e.id
                    if e.kind == "deployment_started" and e.data.get("deployment"):
                        found.append(str(e.data["deployment"]))
            found += [d.id for d in self.store.pending(s, self.teams) if d.id not in found]
        return found

    def _spawn(self, key: str, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if key in self._busy:
                return
            self._busy.add(key)

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("app work %s failed", key)
            finally:
                with self._lock:
                    self._busy.discard(key)

        threading.Thread(target=run, name=f"envctl-app-{key}", daemon=True).start()

    # ------------------------------------------------------------------ a deployment
    def _rows(self, dep_id: str) -> tuple[AppDeployment, App, str] | None:
        with self.store.tx() as s:
            dep = s.get(AppDeployment, dep_id)
            app = s.get(App, dep.app_id) if dep is not None else None
            if dep is None or app is None:
                return None
            team_id = s.scalars(select(Team.id).where(Team.name == app.team)).one_or_none()
            s.expunge_all()
            return dep, app, str(team_id or "")

    def load(self, dep: AppDeployment, app: App, team_id: str) -> Loaded:
        """The deployment's bundle, checked and opened (``AppBundleError`` when refused)."""
        if dep.id in self._loaded:
            return self._loaded[dep.id]
        data = self.read_bundle(dep.bundle_sha256)
        plain = bundles.open_bundle(
            data,
            key=self.box.derive(bundles.key_purpose(team_id, dep.bundle_id)),
            team=app.team,
            team_id=team_id,
            bundle_id=dep.bundle_id,
            sha256=dep.bundle_sha256,
        )
        contents = bundles.unpack(plain)
        loaded = Loaded(bundles.code_cells(contents.files[contents.notebook]), contents.files)
        self._loaded[dep.id] = loaded
        return loaded

    def _deploy(self, dep_id: str) -> None:
        rows = self._rows(dep_id)
        if rows is None:
            return
        dep, app, team_id = rows
        try:
            self.load(dep, app, team_id)  # checked before any instance is made: a refused bundle runs nothing
        except (AppBundleError, EnvctlError) as exc:
            self.store.set_deployment(dep_id, "failed", exc.message)
            return
        except Exception as exc:  # the object store failing in a way not foreseen
            self.store.set_deployment(dep_id, "failed", f"the bundle could not be read: {type(exc).__name__}")
            return
        self.store.set_deployment(dep_id, "starting", f"starting {app.instances} instance(s) on {dep.version_ref}")
        for _ in range(app.instances):  # taken by the team's app servers, this one too (_take_instances)
            self.store.add_instance(dep.id, app.id)
        self._take_instances()  # its first one at once, not at the next round
        deadline = time.monotonic() + self.settings.runner_boot_timeout + self.settings.runner_app_start_timeout + 60
        while True:
            with self.store.tx() as s:
                now_status = self.store.deployment_status(s, dep_id)
                seen = [(i.status, i.message) for i in self.store.of_deployment(s, dep_id) if i.status != "abandoned"]
            if now_status is None or now_status[0] != "starting":  # stopped meanwhile
                return
            failed = [message for status, message in seen if status == "failed"]
            if failed:  # every app server removes its instances of a failed deployment (_watch)
                self.store.set_deployment(dep_id, "failed", failed[0])
                return
            if seen and all(status == "running" for status, _ in seen):
                break
            if time.monotonic() > deadline:
                said = "; ".join(f"{status} {message}".strip() for status, message in seen)
                self.store.set_deployment(dep_id, "failed", f"not every instance was running in time: {said}")
                return
            time.sleep(WAIT_POLL)
        self.store.set_deployment(dep_id, "running", f"serving at /apps/{app.team}/{app.name}/")
        self.store.take_over(dep_id)  # the replaced deployments' instances go after TAKEOVER_GRACE (_watch)

    def _start_instance(self, inst_id: str) -> None:
        """An instance this server took: the bundle read and checked here too, its runtime made
        and booted, the cells run, the port asked; ``running``, or ``failed`` saying why (its
        runtime removed first, so that nothing of it is left when the deployment says so)."""
        with self.store.tx() as s:
            row = s.get(AppInstance, inst_id)
            dep_id = row.deployment_id if row is not None else ""
            order = [i.id for i in self.store.of_deployment(s, dep_id) if i.status != "abandoned"] if row else []
        rows = self._rows(dep_id) if dep_id else None
        if rows is None or inst_id not in order:
            return
        dep, app, team_id = rows
        rid: str | None = None
        try:
            loaded = self.load(dep, app, team_id)  # each app server reads and checks the bundle itself
            rid = self._create_runtime(dep, app, order.index(inst_id), inst_id)
            self.store.set_instance(inst_id, runtime_id=rid)
            self._run(inst_id, rid, dep, loaded, app.team)
        except Exception as exc:
            why = exc.message if isinstance(exc, EnvctlError) else f"the instance could not start: {type(exc).__name__}"
            if not isinstance(exc, EnvctlError):
                log.exception("app instance %s failed", inst_id)
            if rid is not None:
                self._remove_runtime(rid)
            self.store.set_instance(inst_id, status="failed", message=why, address=None)

    def _viewer(self, dep: AppDeployment, team: str) -> Viewer:
        return Viewer(dep.author_id, frozenset({team}))

    def _create_runtime(self, dep: AppDeployment, app: App, n: int, inst_id: str) -> str:
        """The instance's runtime, ``app-NAME-N-n-XXXX`` (the end of the instance's id: a
        deployment made again may meet its first attempt's runtimes, not yet removed by the
        servers that hold them)."""
        spec = dep.spec or {}
        rt = self.runtimes.create(
            self._viewer(dep, app.team),
            name=f"app-{app.name[:40]}-{dep.number}-{n}-{inst_id[-4:]}",
            environment=dep.version_ref,
            machine_type=str(spec.get("machine_type", "small")),
            idle_timeout=0,  # an app's runtime is never idle-stopped
            env=spec.get("env") or {},
            team=app.team,
        )
        return rt.id

    def _run(self, inst: str, rid: str, dep: AppDeployment, loaded: Loaded, team: str) -> None:
        """Boot the instance's runtime, run the cells, wait for the port: ``running``, or
        ``AppFailedError`` saying what failed."""
        who = self._viewer(dep, team)
        port = int((dep.spec or {}).get("port", 8000))
        if not self.store.set_instance(inst, status="starting", message="booting", address=None):
            raise AppFailedError("the instance was given up: its deployment is made again")
        if self.records.state_of(rid) != State.RUNNING:
            self.lifecycle.start(who, rid)
        rt = self.records.wait_for(rid, {State.RUNNING, State.ERROR}, self.settings.runner_boot_timeout + 15)
        if rt.state != State.RUNNING:
            raise AppFailedError(f"the app's runtime did not boot: {rt.state_message}")
        deadline = time.monotonic() + self.settings.runner_app_start_timeout
        for n, code in enumerate([files_cell(loaded.files), *loaded.cells]):
            self.store.set_instance(inst, message=f"running cell {n}/{len(loaded.cells)}")
            ex = self.executions.submit(who, rid, code=code, language="python")
            while True:
                self.executions.wait(ex.id, 2)
                view = self.executions.get(who, ex.id)
                if view.status in ("ok", "error", "interrupted"):
                    break
                if time.monotonic() > deadline:
                    raise AppFailedError(f"cell {n} ran past {self.settings.runner_app_start_timeout:.0f} s")
            if view.status != "ok":
                what = f"{view.error_name}: {view.error_value}" if view.error_name else view.status
                raise AppFailedError(f"cell {n}: {what}" if n else f"writing the app's files failed: {what}")
        endpoint = self.endpoint_of(rt.backend_state or {}, port)
        if endpoint is None:
            raise AppFailedError(f"the runtime's port {port} has no address this server can reach; apps need one")
        host, _, reached = endpoint.rpartition(":")
        while not port_answers(host, int(reached)):
            if time.monotonic() > deadline:
                raise AppFailedError(
                    f"nothing answered on port {port} within {self.settings.runner_app_start_timeout:.0f} s"
                )
            time.sleep(0.1)
        self.store.set_running(inst, endpoint)  # unless it was given up meanwhile (``abandoned``)

    # ------------------------------------------------------------------ this runner's instances
    def _watch(self) -> None:
        with self.store.tx() as s:
            mine = self.store.instances_of_runner(s, self.runner)
            status = {i.id: self.store.deployment_status(s, i.deployment_id) for i in mine}
            s.expunge_all()
        now = time.time()
        for inst in mine:
            with self._lock:
                if inst.id in self._busy:  # (a deployment being made touches no instance: _deploy)
                    continue
            ended = status[inst.id]
            if inst.status == "abandoned":  # its deployment is made again by the server that took it
                self._spawn(inst.id, self._retire, inst.id, inst.runtime_id)
            elif ended is None or ended[0] in ENDED:
                # a replaced deployment keeps answering what was sent to it for TAKEOVER_GRACE
                if ended is None or ended[0] == "failed" or now - ended[1].timestamp() >= TAKEOVER_GRACE:
                    self._spawn(inst.id, self._retire, inst.id, inst.runtime_id)
            elif inst.status in ("running", "restarting") and ended[0] == "running":
                self._check(inst)

    def _check(self, inst: AppInstance) -> None:
        state = self.records.state_of(inst.runtime_id) if inst.runtime_id else None
        healthy = False
        if state == State.RUNNING and inst.status == "running" and inst.address:
            host, _, port = inst.address.rpartition(":")
            healthy = port_answers(host, int(port), timeout=0.3)
        if healthy:
            self._failed_probes.pop(inst.id, None)
            return
        if state == State.RUNNING and inst.status == "running":
            self._failed_probes[inst.id] = self._failed_probes.get(inst.id, 0) + 1
            if self._failed_probes[inst.id] < PROBES_TO_RESTART:
                return
        if time.monotonic() < self._next_try.get(inst.id, 0.0):
            return
        self._failed_probes.pop(inst.id, None)
        self._next_try[inst.id] = time.monotonic() + min(MAX_BACKOFF, 2.0**inst.restarts)
        self._spawn(inst.id, self._restart, inst)

    def _restart(self, inst: AppInstance) -> None:
        rows = self._rows(inst.deployment_id)
        if rows is None or inst.runtime_id is None:
            return
        dep, app, team_id = rows
        why = (
            "its runtime stopped"
            if self.records.state_of(inst.runtime_id) != State.RUNNING
            else "its port stopped answering"
        )
        log.warning(
            "app %s/%s deployment %d: %s; restarting (restart %d)",
            app.team,
            app.name,
            dep.number,
            why,
            inst.restarts + 1,
        )
        self.store.set_instance(inst.id, status="restarting", message=f"{why}; restarting", restarts=inst.restarts + 1)
        try:
            if self.records.state_of(inst.runtime_id) == State.RUNNING:
                self.lifecycle.stop(self._viewer(dep, app.team), inst.runtime_id, reason="app-restart", message=why)
                self.records.wait_for(inst.runtime_id, {State.STOPPED, State.ERROR}, 30)
            self._run(inst.id, inst.runtime_id, dep, self.load(dep, app, team_id), app.team)
        except EnvctlError as exc:
            self.store.set_instance(inst.id, status="restarting", message=f"restart failed: {exc.message}")

    def _retire(self, inst_id: str, runtime_id: str | None = None) -> None:
        """The instance's runtime deleted, then its row."""
        if runtime_id is None:
            with self.store.tx() as s:
                row = s.get(AppInstance, inst_id)
                runtime_id = row.runtime_id if row is not None else None
        if runtime_id is not None and not self._remove_runtime(runtime_id):
            return
        self.store.remove_instance(inst_id)

    def _remove_runtime(self, runtime_id: str) -> bool:
        """The runtime deleted (or already gone); False when it could not be."""
        try:
            self.lifecycle.delete(self.runner_viewer(runtime_id), runtime_id)
        except EnvctlError as exc:
            if exc.status != 404:
                log.warning("could not remove app runtime %s: %s", runtime_id, exc.message)
                return False
        return True

    def logs(self, viewer: Viewer, runtime_ids: list[str], limit: int = 256 * 1024) -> str:
        """The app's own output: each instance's runner log and its cells' outputs (the files
        cell left out: it holds the bundle's files), the newest ``limit`` characters."""
        parts: list[str] = []
        for rid in runtime_ids:
            parts.append(f"==> runtime {rid}\n")
            try:
                for e in self.records.log_entries(viewer, rid):
                    what = e.state or e.event or ""
                    parts.append(f"{e.at.isoformat(timespec='seconds')} {what} {e.reason} {e.message}\n")
                for ex in reversed(self.executions.list_for_runtime(viewer, rid)):
                    if ex.code.startswith("import base64 as _b"):
                        continue
                    for _, out in self.executions.outputs(ex.id):
                        if out.get("output_type") == "stream":
                            parts.append(str(out.get("text", "")))
                        elif out.get("output_type") == "error":
                            parts.append(f"{out.get('ename')}: {out.get('evalue')}\n")
            except EnvctlError as exc:
                parts.append(f"({exc.message})\n")
        text = "".join(parts)
        return text if len(text) <= limit else "[...]\n" + text[-limit:]

    def runner_viewer(self, runtime_id: str) -> Viewer:
        """The runtime's owner, with its team, as who deletes it."""
        with self.records.tx() as s:
            rt = s.get(Runtime, runtime_id)
            if rt is None:
                return Viewer("")
            return Viewer(rt.owner_id, frozenset({rt.team} if rt.team else ()))
