"""The runtimes API: the contract the CLI, the notebook client and the other parts rely on."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from api.settings import Settings
from envs.service import NewVersion, register_version
from runner.backends.fake import FakeBackend
from runner.models import Runtime
from runner.runtimes.states import State, can_transition
from tests.api.conftest import FINAL_STATES, ApiHarness, AppFactory


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _running(api: ApiHarness, name: str = "demo", **body: Any) -> dict[str, Any]:
    rt = api.create_runtime(name, **body)
    resp = api.post(f"/runtimes/{rt['id']}/start")
    assert resp.status_code == 202, resp.text
    api.wait_for(rt["id"], {"running"})
    data: dict[str, Any] = api.get(f"/runtimes/{rt['id']}").json()
    return data


def test_health(api: ApiHarness) -> None:
    resp = api.client.get("/health")  # no token needed
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["backend"] == "ok"
    assert body["runner"] == api.settings.runner_name


def test_create_pins_the_exact_version_and_starts_stopped(api: ApiHarness) -> None:
    """R24: a tag is resolved once, to a version and digest recorded on the runtime."""
    resp = api.post(
        "/runtimes",
        json={
            "environment": "python3",
            "name": "demo",
            "language": "python",
            "machine_type": "small",
            "idle_timeout": 1200,
        },
    )
    assert resp.status_code == 201, resp.text
    rt = resp.json()
    assert rt["id"].startswith("rt_")
    assert rt["name"] == "demo"
    assert rt["environment"] == "python3@1"
    assert rt["environment_ref"] == "python3:latest"
    assert rt["environment_digest"] == "sha256:" + "b" * 64
    assert rt["state"] == "stopped"
    assert rt["state_reason"] == "created"
    assert rt["busy"] is False
    assert rt["idle_shutdown_at"] is None
    assert rt["idle"] is None
    assert rt["machine_type"] == "small"
    assert rt["idle_timeout"] == 1200
    assert rt["language"] == "python"
    assert api.containers(rt["id"]) == []

    listed = api.get("/runtimes")
    assert listed.status_code == 200
    assert [r["id"] for r in listed.json()] == [rt["id"]]
    one = api.get(f"/runtimes/{rt['id']}")
    assert one.status_code == 200
    # GET of one runtime looks at its filesystem for unsaved changes; other answers may not.
    assert {k: v for k, v in one.json().items() if k != "unsaved_changes"} == {
        k: v for k, v in rt.items() if k != "unsaved_changes"
    }


def test_create_with_pinned_reference(api: ApiHarness) -> None:
    rt = api.create_runtime("pinned", environment="python3@1", language="bash")
    assert rt["environment"] == "python3@1"
    assert rt["environment_ref"] == "python3@1"
    assert rt["language"] == "bash"


def test_start_run_stop_and_the_log(api: ApiHarness) -> None:
    rt = api.create_runtime(idle_timeout=1200)
    rid = rt["id"]

    resp = api.post(f"/runtimes/{rid}/start")
    assert resp.status_code == 202, resp.text
    assert resp.json()["state"] in ("booting", "running")
    api.wait_for(rid, {"running"})

    running = api.get(f"/runtimes/{rid}").json()
    assert running["state"] == "running"
    assert running["booted_at"] is not None
    assert running["idle_shutdown_at"] is not None
    now = datetime.now(UTC)
    shutdown_at = _time(running["idle_shutdown_at"])
    assert shutdown_at > now
    assert (shutdown_at - now).total_seconds() <= 1200
    idle = running["idle"]
    assert idle["timeout"] == 1200
    assert _time(idle["shutdown_at"]) == shutdown_at
    assert "idle" in idle["reason"] and "last activity" in idle["reason"]
    assert idle["last_activity"] == "boot"
    assert len(api.containers(rid)) == 1

    # Starting a running runtime again is not an error and makes no second container.
    again = api.post(f"/runtimes/{rid}/start")
    assert again.status_code == 202
    assert again.json()["state"] == "running"
    assert len(api.containers(rid)) == 1

    resp = api.post(f"/runtimes/{rid}/stop")
    assert resp.status_code == 202, resp.text
    assert resp.json()["state"] in ("stopping", "stopped")
    api.wait_for(rid, {"stopped"})
    stopped = api.get(f"/runtimes/{rid}").json()
    assert stopped["state"] == "stopped"
    assert stopped["idle_shutdown_at"] is None
    assert api.containers(rid) == []

    entries = api.log(rid)
    for e in entries:
        assert e["at"]
        assert e["state"] or e["event"]
        assert isinstance(e["reason"], str) and e["reason"]
    states = [e["state"] for e in entries if e["state"]]
    assert states == ["stopped", "booting", "running", "stopping", "stopped"]
    reasons = [e["reason"] for e in entries if e["state"]]
    assert reasons[:3] == ["created", "user-request", "agent-answered"]
    assert reasons[3] == "user-request"
    times = [_time(e["at"]) for e in entries]
    assert times == sorted(times)

    # Stopping a stopped runtime is not an error either.
    assert api.post(f"/runtimes/{rid}/stop").status_code == 202


def test_patch_idle_timeout_while_running(api: ApiHarness) -> None:
    rt = _running(api, idle_timeout=1200)
    before = _time(rt["idle_shutdown_at"])
    resp = api.patch(f"/runtimes/{rt['id']}", json={"idle_timeout": 600})
    assert resp.status_code == 200, resp.text
    after = resp.json()
    assert after["idle_timeout"] == 600
    assert after["state"] == "running"
    assert after["idle"]["timeout"] == 600
    assert (before - _time(after["idle_shutdown_at"])).total_seconds() == pytest.approx(600, abs=1)
    assert any(e["event"] == "settings-changed" for e in api.log(rt["id"]))

    # null puts the default back
    resp = api.patch(f"/runtimes/{rt['id']}", json={"idle_timeout": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["idle_timeout"] is None
    assert resp.json()["idle"]["timeout"] == api.settings.runner_idle_timeout


@pytest.mark.parametrize("change", [{"machine_type": "medium"}, {"environment": "bash"}, {"environment": "python3@1"}])
def test_patch_container_fields_while_running_is_409(api: ApiHarness, change: dict[str, str]) -> None:
    rt = _running(api)
    log_before = api.log(rt["id"])
    resp = api.patch(f"/runtimes/{rt['id']}", json=change)
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "runtime_state_conflict"
    assert "stop" in err["message"].lower() and "first" in err["message"].lower()
    assert list(change) == err["details"]["fields"]
    now = api.get(f"/runtimes/{rt['id']}").json()
    assert now["machine_type"] == rt["machine_type"] == "small"
    assert now["environment"] == rt["environment"] == "python3@1"
    assert now["environment_ref"] == rt["environment_ref"]
    assert now["state"] == "running"
    assert api.log(rt["id"]) == log_before
    assert len(api.containers(rt["id"])) == 1


def test_patch_while_stopped_repins(api: ApiHarness) -> None:
    """R24: a moved tag changes nothing until the runtime is imported again."""
    rt = api.create_runtime()
    assert rt["environment"] == "python3@1"
    # A new python3 version appears; the runtime keeps its pin until it is changed.
    with api.db.session() as s:
        register_version(
            s,
            NewVersion(
                environment="python3", image_id="sha256:" + "c" * 64, image_ref="envctl-base/python3:v2", message="v2"
            ),
        )
    assert api.get(f"/runtimes/{rt['id']}").json()["environment"] == "python3@1"

    resp = api.patch(f"/runtimes/{rt['id']}", json={"environment": "python3", "machine_type": "medium"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["environment"] == "python3@2"
    assert out["environment_ref"] == "python3:latest"
    assert out["environment_digest"] == "sha256:" + "c" * 64
    assert out["machine_type"] == "medium"

    resp = api.patch(f"/runtimes/{rt['id']}", json={"environment": "bash", "name": "shell", "language": "bash"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["environment"] == "bash@1"
    assert out["name"] == "shell"
    assert out["language"] == "bash"

    resp = api.patch(f"/runtimes/{rt['id']}", json={"environment": "python3@1"})
    assert resp.status_code == 200
    assert resp.json()["environment"] == "python3@1"
    assert resp.json()["environment_ref"] == "python3@1"


def test_delete_running_runtime_removes_its_process(api: ApiHarness) -> None:
    rt = _running(api)
    [container] = api.containers(rt["id"])
    process = container.process
    assert process.poll() is None

    resp = api.delete(f"/runtimes/{rt['id']}")
    assert resp.status_code == 204, resp.text
    assert resp.content == b""
    assert process.poll() is not None, "the agent process still runs after DELETE"
    assert api.containers(rt["id"]) == []
    assert not (api.settings.runtimes_dir / rt["id"]).exists()

    gone = api.get(f"/runtimes/{rt['id']}")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "runtime_not_found"
    assert api.get("/runtimes").json() == []
    assert api.delete(f"/runtimes/{rt['id']}").status_code == 404


def test_duplicate_name_is_409(api: ApiHarness) -> None:
    api.create_runtime("demo")
    resp = api.post("/runtimes", json={"environment": "bash", "name": "demo"})
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["details"]["field"] == "name"
    assert "demo" in err["message"]
    assert len(api.get("/runtimes").json()) == 1

    other = api.create_runtime("other")
    resp = api.patch(f"/runtimes/{other['id']}", json={"name": "demo"})
    assert resp.status_code == 409
    assert api.get(f"/runtimes/{other['id']}").json()["name"] == "other"


def test_idle_shutdown_end_to_end(api: ApiHarness) -> None:
    rt = api.create_runtime(idle_timeout=1)
    api.post(f"/runtimes/{rt['id']}/start")
    api.wait_for(rt["id"], {"running"})
    planned = api.get(f"/runtimes/{rt['id']}").json()
    # Shown before it happens (unless the housekeeper was quicker than this request).
    if planned["state"] == "running":
        assert planned["idle_shutdown_at"] is not None

    stopped = api.wait_for(rt["id"], {"stopped"}, timeout=8)
    assert stopped.state == "stopped"
    assert api.containers(rt["id"]) == []
    entries = api.log(rt["id"])
    stopping = [e for e in entries if e["state"] == "stopping"]
    assert len(stopping) == 1
    assert stopping[0]["reason"] == "idle"
    assert stopping[0]["details"]["last_activity"] == "boot"
    assert stopping[0]["details"]["last_activity_at"]
    assert stopping[0]["details"]["shutdown_at"]
    assert "idle for" in stopping[0]["message"]
    last = [e for e in entries if e["state"]][-1]
    assert last["state"] == "stopped"
    assert last["reason"] == "idle"


def test_idle_timeout_zero_never_shuts_down(api: ApiHarness) -> None:
    rt = _running(api, idle_timeout=0)
    assert rt["idle_shutdown_at"] is None
    assert "off" in rt["idle"]["reason"]
    time.sleep(1.0)
    assert api.get(f"/runtimes/{rt['id']}").json()["state"] == "running"


def test_boot_timeout(make_api: AppFactory, prepared_settings: Settings) -> None:
    backend = FakeBackend(never_answers=True)
    api = make_api(backend, runner_boot_timeout=1)
    rt = api.create_runtime()
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"error"}, timeout=10)
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state"] == "error"
    assert out["state_reason"] == "boot-timeout"
    assert "did not answer" in out["state_message"]
    assert api.containers(rt["id"]) == [], "the container of a failed boot is left behind"
    assert [e["state"] for e in api.log(rt["id"]) if e["state"]] == ["stopped", "booting", "error"]


def test_backend_refuses_to_start(make_api: AppFactory, prepared_settings: Settings) -> None:
    api = make_api(FakeBackend(fail_start=True))
    rt = api.create_runtime()
    assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
    api.wait_for(rt["id"], {"error"}, timeout=10)
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state"] == "error"
    assert out["state_reason"] == "backend-error"
    assert "refused" in out["state_message"]
    # From error the runtime can be stopped and deleted.
    assert api.post(f"/runtimes/{rt['id']}/stop").status_code == 202
    api.wait_for(rt["id"], {"stopped"})
    assert api.delete(f"/runtimes/{rt['id']}").status_code == 204


def test_a_burst_of_200_starts_boots_at_most_max_boots_at_once_and_refuses_the_rest_cleanly(
    make_api: AppFactory, prepared_settings: Settings
) -> None:
    """R31: 200 start requests at once. At most ``max_boots`` runtimes are ever booting; every
    other request is a 429 with Retry-After, answered at once; none hangs; afterwards every
    container belongs to a running runtime and a refused runtime has none."""
    from sqlalchemy import func, select

    max_boots = 3
    api = make_api(FakeBackend(boot_delay=2.0), runner_max_boots=max_boots)
    ids = [api.create_runtime(f"burst-{i}")["id"] for i in range(200)]
    booting_seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # samples the booting rows all through the burst
        while not done.is_set():
            with api.db.session() as s:
                booting_seen.append(
                    int(s.scalar(select(func.count()).select_from(Runtime).where(Runtime.state == "booting")) or 0)
                )
            time.sleep(0.005)

    answers: dict[str, tuple[int, str | None, float]] = {}
    guard = threading.Lock()
    barrier = threading.Barrier(len(ids))

    def start(rid: str) -> None:
        barrier.wait(timeout=30)
        began = time.monotonic()
        resp = api.post(f"/runtimes/{rid}/start")
        with guard:
            answers[rid] = (resp.status_code, resp.headers.get("Retry-After"), time.monotonic() - began)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=start, args=(rid,)) for rid in ids]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not [th for th in threads if th.is_alive()], "a start request hung"
    accepted = [rid for rid, (code, _, _) in answers.items() if code == 202]
    refused = [rid for rid, (code, _, _) in answers.items() if code == 429]
    assert len(accepted) + len(refused) == 200, sorted({code for code, _, _ in answers.values()})
    assert len(accepted) >= 1 and len(refused) >= 150  # a few may start as the first boots finish
    assert all(answers[rid][1] and int(answers[rid][1]) >= 1 for rid in refused), "429 without Retry-After"
    assert max(took for _, _, took in answers.values()) < 10, "a refusal should not wait for a boot"
    for rid in accepted:
        assert api.wait_for(rid, {"running", "error"}, timeout=30).state == "running"
    done.set()
    watcher.join()
    assert booting_seen and 1 <= max(booting_seen) <= max_boots, max(booting_seen)
    # no orphans: containers belong exactly to the running runtimes
    assert sorted(c.runtime_id for c in list(api.engine.values())) == sorted(accepted)
    for rid in refused[:20]:
        out = api.get(f"/runtimes/{rid}").json()
        assert out["state"] == "stopped" and api.containers(rid) == []
    for rid in accepted:
        assert api.post(f"/runtimes/{rid}/stop").status_code == 202
    for rid in accepted:
        api.wait_for(rid, {"stopped"}, timeout=20)
    assert [c for c in list(api.engine.values()) if c.runtime_id in set(ids)] == []


def test_concurrent_start_stop_follow_the_state_machine(api: ApiHarness) -> None:
    """R17: interleaved start/stop calls on one runtime; one container at most, legal moves."""
    rt = api.create_runtime()
    rid = rt["id"]
    statuses: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()
    barrier = threading.Barrier(20)
    rng = random.Random(17)
    actions = ["start", "stop"] * 10
    rng.shuffle(actions)

    def call(action: str) -> None:
        try:
            barrier.wait(timeout=10)
            time.sleep(rng.random() * 0.05)
            resp = api.post(f"/runtimes/{rid}/{action}")
            with guard:
                statuses.append(resp.status_code)
        except BaseException as exc:  # noqa: BLE001 - reported below
            with guard:
                errors.append(exc)

    threads = [threading.Thread(target=call, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(statuses) == 20
    assert set(statuses) <= {202, 409, 429}, statuses
    assert 202 in statuses

    final = api.wait_settled(rid)
    assert final.state in FINAL_STATES
    containers = api.containers(rid)
    assert len(containers) <= 1
    if final.state == "running":
        assert len(containers) == 1
    elif final.state == "stopped":
        assert containers == []
    assert final.state != "error", f"ended in error: {final.state_reason}: {final.state_message}"

    states = [State(s) for s in api.state_log(rid)]
    assert states[0] == State.STOPPED
    for a, b in zip(states, states[1:], strict=False):
        assert can_transition(a, b), f"illegal transition {a} -> {b} in {states}"

    # The runtime still works afterwards.
    api.post(f"/runtimes/{rid}/stop")
    api.wait_for(rid, {"stopped"})
    assert api.post(f"/runtimes/{rid}/start").status_code == 202
    api.wait_for(rid, {"running"})
    assert len(api.containers(rid)) == 1


# --------------------------------------------------------------------------- reconciliation races
#
# Housekeeping reconciles every ``runner_idle_check_interval`` (0.2 s here) while the API works.
# Both tests below make the timing deterministic with a fake backend that can be held still.


class _PausableListing(FakeBackend):
    """``list_owned`` can be held after it took its listing, like a slow ``docker ps``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.listed = threading.Event()
        self.proceed = threading.Event()

    def list_owned(self, identity):  # type: ignore[no-untyped-def]
        found = super().list_owned(identity)
        if self.armed:
            self.armed = False
            self.listed.set()
            self.proceed.wait(10)
        return found


class _SlowStop(FakeBackend):
    """``stop`` blocks until released, like ``docker stop`` on a container that ignores SIGTERM."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def stop(self, state, timeout=5.0):  # type: ignore[no-untyped-def]
        self.release.wait(20)
        super().stop(state, timeout)


def test_reconcile_with_a_stale_listing_keeps_a_fresh_runtime(
    make_api: AppFactory, prepared_settings: Settings
) -> None:
    backend = _PausableListing()
    api = make_api(backend)
    rt = api.create_runtime()
    try:
        backend.armed = True
        assert backend.listed.wait(5), "no housekeeping round listed the backend"
        # The listing in hand has no container for rt; now it boots and runs.
        assert api.post(f"/runtimes/{rt['id']}/start").status_code == 202
        api.wait_for(rt["id"], {"running"})
    finally:
        backend.proceed.set()
    time.sleep(1.0)  # that round finishes, and a few more run
    out = api.get(f"/runtimes/{rt['id']}").json()
    assert out["state"] == "running", (out["state_reason"], api.state_log(rt["id"]))
    assert len(api.containers(rt["id"])) == 1


def test_queued_boot_is_not_marked_vanished(make_api: AppFactory, prepared_settings: Settings) -> None:
    backend = _SlowStop()
    api = make_api(backend, runner_max_boots=1)
    try:
        # Occupy every worker (runner/service.py sizes the pool max(4, max_boots + 4) = 5) with a
        # slow stop, so the next boot waits in the queue.
        for i in range(5):
            busy = api.create_runtime(f"busy{i}")
            api.post(f"/runtimes/{busy['id']}/start")
            api.wait_for(busy["id"], {"running"})
            assert api.post(f"/runtimes/{busy['id']}/stop").status_code == 202
        rt = api.create_runtime("late")
        resp = api.post(f"/runtimes/{rt['id']}/start")
        assert resp.status_code == 202
        assert resp.json()["state"] == "booting"
        time.sleep(1.0)  # several housekeeping rounds while the boot waits for a worker
    finally:
        backend.release.set()
    final = api.wait_settled(rt["id"])
    assert final.state == "running", (final.state_reason, api.state_log(rt["id"]))


# --------------------------------------------------------------------------- idle shutdown and saves


class _HeldCommit(FakeBackend):
    """``commit`` waits until released, like ``docker commit`` of a big layer."""

    def __init__(self) -> None:
        super().__init__()
        self.committing = threading.Event()
        self.release = threading.Event()

    def commit(self, state, *, config, repository, tag):  # type: ignore[no-untyped-def]
        self.committing.set()
        self.release.wait(20)
        return super().commit(state, config=config, repository=repository, tag=tag)


def test_a_save_in_progress_holds_off_idle_shutdown_until_it_ends(
    make_api: AppFactory, prepared_settings: Settings
) -> None:
    """R20: an otherwise idle runtime is not shut down while its save runs, however long; it
    is one idle timeout after the save ended."""
    backend = _HeldCommit()
    api = make_api(backend)
    rt = _running(api, idle_timeout=2)
    try:
        op = api.post(f"/runtimes/{rt['id']}/save", json={"environment": "held"})
        assert op.status_code == 202, op.text
        assert backend.committing.wait(5)
        held = time.monotonic()
        while time.monotonic() - held < 4:  # two idle timeouts, some twenty housekeeping rounds
            out = api.get(f"/runtimes/{rt['id']}").json()
            assert out["state"] == "running" and out["saving"] is True, out
            assert out["idle_shutdown_at"] is None and "save" in out["idle"]["reason"]
            time.sleep(0.1)
    finally:
        backend.release.set()
    done = api.get(f"/operations/{op.json()['id']}", params={"wait": 10}).json()
    assert done["status"] == "succeeded", done
    ended = time.monotonic()
    api.wait_for(rt["id"], {"stopped"}, timeout=20)
    assert 1.5 < time.monotonic() - ended < 15  # not before one idle timeout; late only on a loaded machine
    entries = api.log(rt["id"])
    saved = next(i for i, e in enumerate(entries) if e["event"] == "saved")
    stopping = next(i for i, e in enumerate(entries) if e["state"] == "stopping")
    assert saved < stopping and entries[stopping]["reason"] == "idle"


def test_a_save_may_follow_the_moment_the_last_one_is_seen_to_end(make_api: AppFactory) -> None:
    """Whoever sees a save's operation succeed may save again at once: the runtime is no
    longer "saving" by then (CI caught a 409 "already in progress" in that instant)."""
    api = make_api()
    rt = _running(api, "twice")
    runner = api.app.state.ctx.runner
    touch = runner.touch

    def slow_touch(runtime_id: str, what: str) -> None:  # widens the instant in which it mattered
        touch(runtime_id, what)
        if what == "save finished":
            time.sleep(0.3)

    runner.touch = slow_touch
    for n in (1, 2, 3):
        op = api.post(f"/runtimes/{rt['id']}/save", json={"environment": "again"})
        assert op.status_code == 202, (n, op.text)
        done = api.get(f"/operations/{op.json()['id']}", params={"wait": 10}).json()
        assert done["status"] == "succeeded" and done["result"]["version"] == f"again@{n}", done
        assert api.get(f"/runtimes/{rt['id']}").json()["saving"] is False


# --------------------------------------------------------------------------- pinning


class _RecordingStarts(FakeBackend):
    """The fake engine, remembering the image of every container it was asked to create."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def start(self, spec):  # type: ignore[no-untyped-def]
        self.images.append(spec.image)
        return super().start(spec)


def _boot_and_stop(api: ApiHarness, rid: str) -> None:
    assert api.post(f"/runtimes/{rid}/start").status_code == 202
    api.wait_for(rid, {"running"})
    assert api.post(f"/runtimes/{rid}/stop").status_code == 202
    api.wait_for(rid, {"stopped"})


def test_a_runtime_imported_by_tag_boots_its_recorded_digest_after_the_tag_moves(
    make_api: AppFactory, prepared_settings: Settings
) -> None:
    """R24: the container is created from the digest recorded when the tag was resolved,
    not from where the tag points now; a digest that does not match a version aborts."""
    backend = _RecordingStarts()
    api = make_api(backend)
    one, two, three = ("sha256:" + c * 64 for c in "bcd")
    rt = api.create_runtime(environment="python3")
    assert (rt["environment"], rt["environment_digest"]) == ("python3@1", one)

    def new_version(image_id: str) -> None:
        with api.db.session() as s:
            register_version(s, NewVersion(environment="python3", image_id=image_id, image_ref="moved"))

    new_version(two)  # python3:latest moves to python3@2
    _boot_and_stop(api, rt["id"])
    assert backend.images == [one]

    resp = api.patch(f"/runtimes/{rt['id']}", json={"environment": "python3"})  # import by tag
    assert resp.status_code == 200, resp.text
    assert (resp.json()["environment"], resp.json()["environment_digest"]) == ("python3@2", two)
    new_version(three)  # and on to python3@3
    _boot_and_stop(api, rt["id"])
    assert backend.images == [one, two]
    assert api.get(f"/runtimes/{rt['id']}").json()["environment"] == "python3@2"

    # A digest that is no version of the environment (here bash@1's) aborts: nothing changes.
    for ref in ("python3@sha256:" + "e" * 64, "python3@sha256:" + "a" * 64):
        resp = api.patch(f"/runtimes/{rt['id']}", json={"environment": ref})
        assert resp.status_code == 404, resp.text
        assert api.post("/runtimes", json={"environment": ref, "name": "other"}).status_code == 404
    assert api.get(f"/runtimes/{rt['id']}").json()["environment_digest"] == two
    assert [r["id"] for r in api.get("/runtimes").json()] == [rt["id"]]
    assert backend.images == [one, two]
