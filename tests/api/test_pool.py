"""The warm pool on the fake engine (the real agent as a local process): claims, hand-over of
variables and secrets, refills, what is not served from it and why, restarts, the budget.
The same rules against real Docker: tests/runner/runtimes/test_pool_docker.py."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from envs.kit.errors import InvalidInputError
from runner.models import PoolEntry, Runtime, RuntimeLogEntry
from runner.runtimes.pool import Pool
from tests.api.conftest import ApiHarness, AppFactory

POOL = (("python3", "small", 2),)
SMALL = 2 * 1024**3  # the default small machine type's memory (tests check it below)


def _pool(api: ApiHarness, waiting: int, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = api.get("/pool").json()
        if sum(t["waiting"] for t in body["targets"]) >= waiting and not any(t["booting"] for t in body["targets"]):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool did not fill to {waiting}: {body}")
        time.sleep(0.05)


def _run(api: ApiHarness, name: str, code: str, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    resp = api.post(
        "/runtimes?wait=20",
        json={"environment": "python3", "name": name, "cell": {"code": code}, **body},
        headers=headers or api.headers,
    )
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data


def _text(ex: dict[str, Any]) -> str:
    return "".join(o.get("text", "") for o in ex["outputs"])


def test_a_pooled_runtime_answers_its_first_cell_and_says_it_came_from_the_pool(make_api: AppFactory) -> None:
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    _pool(api, 2)
    rt = _run(api, "nb", "print('hello')")
    assert rt["origin"] == "pool" and rt["state"] == "running"
    assert rt["execution"]["status"] == "ok" and _text(rt["execution"]) == "hello\n"
    events = [e["event"] for e in api.log(rt["id"])]
    assert "claimed-from-pool" in events
    running = [e for e in api.log(rt["id"]) if e["state"] == "running"]
    assert running[-1]["reason"] == "pool"
    # the replacement boots in the background: the pool is full again
    body = _pool(api, 2)
    assert body["targets"][0]["version"] == "python3@1" and body["targets"][0]["count"] == 2
    assert all(e["state"] == "waiting" for e in body["entries"])
    assert rt["id"] not in {e["id"] for e in body["entries"]}


def test_two_users_never_share_a_pooled_container_and_see_only_their_own_variables(
    make_api: AppFactory, other_headers: dict[str, str]
) -> None:
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    _pool(api, 2)
    code = "import os; print(os.environ.get('WHO'), os.environ.get('OTHER'))"
    a = _run(api, "a", code, env={"WHO": "alice"})
    b = _run(api, "b", code, headers=other_headers, env={"WHO": "bob", "OTHER": "x"})
    assert a["origin"] == b["origin"] == "pool"
    assert _text(a["execution"]) == "alice None\n"
    assert _text(b["execution"]) == "bob x\n"
    with api.db.session() as s:
        rows = {r.id: dict(r.backend_state) for r in s.scalars(select(Runtime))}
        claimed = list(s.scalars(select(PoolEntry).where(PoolEntry.state == "claimed")))
    assert rows[a["id"]]["container_id"] != rows[b["id"]]["container_id"]
    assert {c.runtime_id for c in claimed} == {a["id"], b["id"]}
    assert len({c.id for c in claimed}) == 2
    # stopping a claimed runtime removes its container; it never goes back to the pool
    assert api.post(f"/runtimes/{a['id']}/stop?wait=10").json()["state"] == "stopped"
    assert not api.containers(rows[a["id"]]["container_id"])
    assert rows[a["id"]]["container_id"] not in api.engine
    body = _pool(api, 2)
    assert rows[a["id"]]["container_name"] not in {e["container"] for e in body["entries"]}


def test_a_secret_reaches_the_cell_at_claim_time(make_api: AppFactory) -> None:
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    assert api.post("/teams", json={"name": "acme"}).status_code == 201
    resp = api.client.put("/teams/acme/secrets/db-pass", json={"value": "s3cr3t-value"}, headers=api.headers)
    assert resp.status_code in (200, 201), resp.text
    _pool(api, 2)
    rt = _run(api, "sec", "import os; print(os.environ['PW'])", env={"PW": {"secret": "acme/db-pass"}})
    assert rt["origin"] == "pool"
    assert _text(rt["execution"]) == "s3cr3t-value\n"
    # nothing of it in what the engine was told when the container was made
    container = api.engine[rt_container(api, rt["id"])]
    assert "s3cr3t-value" not in repr(container.spec)


def rt_container(api: ApiHarness, runtime_id: str) -> str:
    with api.db.session() as s:
        row = s.get(Runtime, runtime_id)
        assert row is not None
        return str(row.backend_state["container_id"])


def test_runtimes_with_mounts_or_a_draft_boot_as_usual_and_say_why(make_api: AppFactory) -> None:
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    _pool(api, 2)
    assert api.post("/volumes", json={"name": "data"}).status_code == 201
    mounted = _run(api, "m", "print(1)", mounts=[{"type": "volume", "name": "data", "target": "/data"}])
    assert mounted["origin"] == "boot" and mounted["execution"]["status"] == "ok"
    why = [e["message"] for e in api.log(mounted["id"]) if e["event"] == "not-pooled"]
    assert why and "mounts are prepared on the host" in why[0]
    drafted = api.create_runtime("d")
    with api.db.session() as s:
        s.execute(update(Runtime).where(Runtime.id == drafted["id"]).values(draft_image_id="sha256:" + "c" * 64))
        s.commit()
    api.post(f"/runtimes/{drafted['id']}/start")
    api.wait_settled(drafted["id"])
    why = [e["message"] for e in api.log(drafted["id"]) if e["event"] == "not-pooled"]
    assert why and "draft" in why[0]
    assert api.get(f"/runtimes/{drafted['id']}").json()["origin"] == "boot"
    assert _pool(api, 2)["targets"][0]["waiting"] == 2  # nothing was taken from the pool


def test_an_app_runtime_whose_port_the_backend_publishes_is_not_pooled(make_api: AppFactory) -> None:
    """On Swarm an app's port is published when the runtime's service is made: a container made
    ahead without it cannot serve the app (its gateway would find no way in). The fake engine is
    told it publishes ports, and the runtime is one with an app port."""
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    _pool(api, 2)
    pool = api.runner.pool
    app_runtime = api.create_runtime("app-board-1-0")
    pool.backend.publishes_ports = True
    pool.ports_of = lambda rid: (8000,) if rid == app_runtime["id"] else ()
    try:
        api.post(f"/runtimes/{app_runtime['id']}/start")
        api.wait_settled(app_runtime["id"])
        why = [e["message"] for e in api.log(app_runtime["id"]) if e["event"] == "not-pooled"]
        assert why and "app's port is published" in why[0], api.log(app_runtime["id"])
        assert api.get(f"/runtimes/{app_runtime['id']}").json()["origin"] == "boot"
        plain = _run(api, "plain", "print(1)")  # any other runtime is still served from the pool
        assert plain["origin"] == "pool", plain
    finally:
        pool.backend.publishes_ports = False


def test_a_restarted_server_adopts_its_waiting_pool(make_api: AppFactory) -> None:
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    before = {e["container"] for e in _pool(api, 2)["entries"]}
    api.client.__exit__(None, None, None)  # the server stops; the pool's containers stay
    again = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    after = {e["container"] for e in _pool(again, 2)["entries"]}
    assert after == before
    rt = _run(again, "after", "print(2)")
    assert rt["origin"] == "pool" and _text(rt["execution"]) == "2\n"


def test_a_restarted_server_without_a_pool_removes_it(make_api: AppFactory) -> None:
    api = make_api(runner_pool=POOL, runner_idle_check_interval=0.2)
    entries = _pool(api, 2)["entries"]
    api.client.__exit__(None, None, None)
    again = make_api(runner_idle_check_interval=0.2)
    assert again.get("/pool").json()["entries"] == []
    names = {c.spec.container_name for c in again.engine.values()}
    assert not names & {e["container"] for e in entries}
    with again.db.session() as s:
        assert s.scalars(select(PoolEntry)).all() == []


def test_the_pool_stays_within_its_memory_budget(make_api: AppFactory) -> None:
    api = make_api(runner_pool=(("python3", "small", 3),), runner_pool_memory=2 * SMALL, runner_idle_check_interval=0.2)
    assert api.settings.machine_types["small"].memory == SMALL
    body = _pool(api, 2)
    time.sleep(1.0)  # a few more rounds: still two
    body = api.get("/pool").json()
    assert len(body["entries"]) == 2
    assert body["memory_reserved"] == 2 * SMALL <= body["memory_budget"]


def test_bad_pool_settings_are_refused_naming_the_entry(make_api: AppFactory) -> None:
    from api.settings import load

    for bad, words in [
        ("python3", "ENVIRONMENT:MACHINE_TYPE=COUNT"),
        ("python3:small", "ENVIRONMENT:MACHINE_TYPE=COUNT"),
        ("python3:small=x", "not a whole number"),
        ("python3:small=0", "from 1 to"),
    ]:
        try:
            load(env={"ENVCTL_RUNNER_POOL": bad})
        except InvalidInputError as exc:
            assert "ENVCTL_RUNNER_POOL" in exc.message and words in exc.message, exc.message
        else:
            raise AssertionError(f"{bad!r} was accepted")
    api = make_api()
    try:
        Pool(
            api.settings.with_overrides(runner_pool=(("python3", "huge", 1),)),
            api.runner.identity,
            api.runner.records,
            api.runner.concurrency,
            api.runner.backend,
            api.runner.paths,
        )
    except InvalidInputError as exc:
        assert "python3:huge=1" in exc.message and "no machine type 'huge'" in exc.message
    else:
        raise AssertionError("an unknown machine type was accepted")


def test_a_new_version_under_the_tag_refills_the_pool_for_it(make_api: AppFactory) -> None:
    """A save (or a publication) that moves the tag the pool names: the next rounds boot the
    new version and remove the waiting containers of the old one."""
    from envs.service import NewVersion, register_version

    api = make_api(runner_pool=(("python3", "small", 1),), runner_idle_check_interval=0.2)
    old = _pool(api, 1)["entries"][0]
    assert old["environment"] == "python3@1"
    with api.db.session() as s:
        register_version(
            s,
            NewVersion(
                environment="python3",
                image_id="sha256:" + "d" * 64,
                image_ref="envctl-base/python3:test2",
                message="a save",
                author="tests",
                size=1,
                size_added=1,
            ),
        )
        s.commit()
    deadline = time.monotonic() + 20
    while True:
        body = api.get("/pool").json()
        entries = body["entries"]
        if [e["environment"] for e in entries] == ["python3@2"] and entries[0]["state"] == "waiting":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert body["targets"][0]["version"] == "python3@2"
    assert old["container"] not in {c.spec.container_name for c in api.engine.values()}
    rt = _run(api, "new", "print(5)")
    assert rt["origin"] == "pool" and rt["environment"] == "python3@2"


HOT = SMALL + SMALL // 2  # room for one small container, not two


def _hot(api: ApiHarness, version: str, boots: int, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until a hot target for ``version`` says ``boots`` and its container waits."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = api.get("/pool").json()
        t = next((t for t in body["targets"] if t["version"] == version), None)
        if t is not None and t["why"] == f"hot: {boots} boots in the last hour" and t["waiting"] == t["count"]:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm container for {version} after {boots} boots: {body}")
        time.sleep(0.05)


def _boot_and_stop(api: ApiHarness, name: str, environment: str = "python3") -> dict[str, Any]:
    rt = _run(api, name, "print(1)", environment=environment)
    assert rt["execution"]["status"] == "ok", rt
    assert api.post(f"/runtimes/{rt['id']}/stop?wait=10").json()["state"] == "stopped"
    return rt


def test_hot_mode_keeps_warm_what_was_booted_most_within_its_budget_and_drops_what_goes_cold(
    make_api: AppFactory,
) -> None:
    api = make_api(runner_pool_hot=HOT, runner_idle_check_interval=0.2)
    body = api.get("/pool").json()
    assert body["targets"] == [] and body["hot_budget"] == HOT
    for i in range(2):
        assert _boot_and_stop(api, f"py{i}")["origin"] == "boot"
    _hot(api, "python3@1", 2)  # two boots in the hour: kept warm
    assert _boot_and_stop(api, "py2")["origin"] == "pool"
    for i in range(2):
        _boot_and_stop(api, f"sh{i}", environment="bash")
    body = _hot(api, "python3@1", 3)
    time.sleep(1.0)  # a few more rounds: bash (2 boots) never gets the room python3 (3) takes
    body = api.get("/pool").json()
    assert [(t["version"], t["why"], t["count"], t["waiting"]) for t in body["targets"]] == [
        ("python3@1", "hot: 3 boots in the last hour", 1, 1)
    ]
    assert [e["environment"] for e in body["entries"]] == ["python3@1"]
    assert body["memory_reserved"] == SMALL <= HOT
    # a claim is served from it; the claim is a boot too, and the replacement waits again
    rt = _run(api, "claim", "print('warm')")
    assert rt["origin"] == "pool" and _text(rt["execution"]) == "warm\n"
    body = _hot(api, "python3@1", 4)
    assert len(body["entries"]) == 1 and rt["id"] not in {e["id"] for e in body["entries"]}
    # an hour later nothing is hot: its waiting container is removed
    waiting = body["entries"][0]["container"]
    with api.db.session() as s:
        s.execute(update(RuntimeLogEntry).values(at=datetime.now(UTC) - timedelta(hours=2)))
        s.commit()
    deadline = time.monotonic() + 20
    while (body := api.get("/pool").json())["entries"] or body["targets"]:
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert waiting not in {c.spec.container_name for c in api.engine.values()}
    with api.db.session() as s:
        assert s.scalars(select(PoolEntry).where(PoolEntry.state != "claimed")).all() == []


def test_hot_mode_serves_configured_entries_first(make_api: AppFactory) -> None:
    """The budget holds the configured entries first: with python3 configured at one small
    container, a budget of one and a half leaves no room for the hot bash."""
    api = make_api(runner_pool=(("python3", "small", 1),), runner_pool_hot=HOT, runner_idle_check_interval=0.2)
    _pool(api, 1)
    for i in range(3):
        _boot_and_stop(api, f"sh{i}", environment="bash")
    for i in range(3):
        _boot_and_stop(api, f"py{i}")  # served from the pool: it stays configured, not hot too
    time.sleep(1.0)
    body = api.get("/pool").json()
    assert [(t["environment"], t["why"]) for t in body["targets"]] == [("python3", "configured")]
    assert [e["environment"] for e in body["entries"]] == ["python3@1"]
    # with room for both, bash is kept warm beside it
    api.client.__exit__(None, None, None)
    again = make_api(runner_pool=(("python3", "small", 1),), runner_pool_hot=2 * SMALL, runner_idle_check_interval=0.2)
    body = _hot(again, "bash@1", 3)
    assert [(t["version"], t["why"]) for t in body["targets"]] == [
        ("python3@1", "configured"),
        ("bash@1", "hot: 3 boots in the last hour"),
    ]


def test_a_hot_version_of_another_team_is_not_shown_to_outsiders(
    make_api: AppFactory, other_headers: dict[str, str]
) -> None:
    """R37: hot targets come from users' boots; an unpublished team version's name is shown
    only to those who may see it."""
    from envs.service import NewVersion, register_version
    from tests.api.conftest import PYTHON_IMAGE

    api = make_api(runner_pool_hot=HOT, runner_idle_check_interval=0.2)
    assert api.post("/teams", json={"name": "acme"}).status_code == 201
    with api.db.session() as s:
        register_version(
            s,
            NewVersion(
                environment="acme/ml",
                image_id=PYTHON_IMAGE,
                image_ref="envctl-base/python3:test",
                message="a team's own",
                author="tests",
                size=1,
                size_added=1,
            ),
        )
        s.commit()
    for i in range(2):
        _boot_and_stop(api, f"ml{i}", environment="acme/ml@1")
    assert [e["environment"] for e in _hot(api, "acme/ml@1", 2)["entries"]] == ["acme/ml@1"]
    theirs = api.client.get("/pool", headers=other_headers).json()
    assert theirs["targets"] == [] and theirs["entries"] == [] and theirs["hidden"] == 1
    assert "acme" not in repr(theirs)


def test_bad_hot_budgets_are_refused_naming_the_setting() -> None:
    from api.settings import load

    assert load(env={"ENVCTL_RUNNER_POOL_HOT": "2g"}).runner_pool_hot == 2 * 1024**3
    for bad in ("lots", "-1g"):
        try:
            load(env={"ENVCTL_RUNNER_POOL_HOT": bad})
        except InvalidInputError as exc:
            assert "ENVCTL_RUNNER_POOL_HOT" in exc.message, exc.message
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_boots_of_runtimes_deleted_within_the_hour_still_count(make_api: AppFactory) -> None:
    """Runtimes made, run and deleted (a script's, a lease's): their log goes with them, their
    boots are kept in the pool's memory and the version is kept warm all the same."""
    api = make_api(runner_pool_hot=HOT, runner_idle_check_interval=0.2)
    for i in range(2):
        rt = _run(api, f"once{i}", "print(1)")
        assert rt["origin"] == "boot"
        assert api.delete(f"/runtimes/{rt['id']}").status_code == 204
    with api.db.session() as s:
        assert s.scalars(select(RuntimeLogEntry)).all() == []
    _hot(api, "python3@1", 2)
    rt = _run(api, "served", "print('warm')")
    assert rt["origin"] == "pool" and _text(rt["execution"]) == "warm\n"
