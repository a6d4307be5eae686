"""Runtime networks that do not run out (issue 14 item 6, R44): a small subnet per installation
from ENVCTL_RUNNER_SUBNET_POOL, the clear error of a full pool, and `envctl uninstall`, which
takes an installation's containers, network, images and (when asked) volumes with it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from docker.types import IPAMConfig, IPAMPool

from api.cli import main
from api.dbschema import upgrade
from api.settings import Settings, load
from envs.kit.db import Database
from envs.kit.errors import InvalidInputError
from runner.backends import netguard
from runner.backends.docker import DockerBackend
from runner.backends.subnets import Pool, first_free, host_routes
from runner.errors import NetworkPoolExhaustedError
from runner.identity import installation_id
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import Server
from tests.fixtures.services import base_image
from tests.runner.backends.test_netguard import iptables  # noqa: F401  (a fixture)
from tests.runner.cells.test_docker_executions import new_runtime, run, text
from tests.runner.conftest import remove_runner_containers, start_server
from tests.runner.saves.test_docker_saves import save

Capsys = pytest.CaptureFixture[str]
# pools no other default hands out, one per test session (a crashed earlier run may hold another)
_OCTET = int(TEST_SESSION[:2], 16)


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


# --- the pool: pure rules --------------------------------------------------------------------
def test_the_first_free_subnet_skips_every_taken_block_and_none_is_left_when_full() -> None:
    pool = Pool.of("10.213.0.0/16", 24)
    assert pool.size == 256
    assert first_free(pool, []) == net("10.213.0.0/24")
    assert first_free(pool, [net("10.213.0.0/24"), net("10.213.1.0/24")]) == net("10.213.2.0/24")
    # a larger block (a LAN route, a /16 network of Docker's) is skipped whole, overlaps either way
    assert first_free(pool, [net("10.213.0.0/20")]) == net("10.213.16.0/24")
    assert first_free(pool, [net("10.213.0.128/25"), net("10.213.1.5/32")]) == net("10.213.2.0/24")
    assert first_free(pool, [net("10.0.0.0/8")]) is None
    assert first_free(pool, [net("10.213.0.0/24"), net("192.168.0.0/16"), net("10.213.3.0/24")]) == net("10.213.1.0/24")
    assert first_free(pool, [net(f"10.213.{i}.0/24") for i in range(255)]) == net("10.213.255.0/24")
    assert first_free(pool, [net(f"10.213.{i}.0/24") for i in range(256)]) is None
    tiny = Pool.of("10.214.7.0/24", 24)
    assert tiny.size == 1 and first_free(tiny, [net("10.214.7.0/24")]) is None
    # a huge pool of small subnets costs only the taken blocks
    big = Pool.of("10.0.0.0/8", 29)
    began = time.perf_counter()
    assert first_free(big, [net("10.0.0.0/9"), net("10.128.0.0/10")]) == net("10.192.0.0/29")
    assert time.perf_counter() - began < 0.1


def test_a_pool_or_prefix_that_cannot_work_is_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidInputError, match="ENVCTL_RUNNER_SUBNET_PREFIX /16 does not fit"):
        Pool.of("10.213.0.0/24", 16)
    with pytest.raises(InvalidInputError, match="ENVCTL_RUNNER_SUBNET_POOL"):
        Pool.of("10.213.0.1/16", 24)
    with pytest.raises(InvalidInputError, match="ENVCTL_RUNNER_SUBNET_POOL"):
        load(env={"ENVCTL_RUNNER_SUBNET_POOL": "10.213.0.1/16"})
    with pytest.raises(InvalidInputError, match="ENVCTL_RUNNER_SUBNET_PREFIX"):
        load(env={"ENVCTL_RUNNER_SUBNET_PREFIX": "31"})
    s = load(env={"ENVCTL_RUNNER_SUBNET_POOL": "10.50.0.0/20", "ENVCTL_RUNNER_SUBNET_PREFIX": "26"})
    assert (s.runner_subnet_pool, s.runner_subnet_prefix) == ("10.50.0.0/20", 26)
    default = Settings()
    # Docker's own default pools are left alone
    for docker_pool in [*(f"172.{i}.0.0/16" for i in range(17, 32)), "192.168.0.0/16"]:
        assert not net(default.runner_subnet_pool).overlaps(net(docker_pool))


def test_the_host_routes_are_read_from_the_kernel_table_without_the_default_route(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "tun0\t0000D50A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    )
    assert host_routes(table) == [net("192.0.2.0/24"), net("10.213.0.0/16")]
    assert host_routes(tmp_path / "missing") == []
    # on this host: the routes it has are never handed out
    pool = Pool.of("10.0.0.0/8", 24)
    assert all(not r.overlaps(first_free(pool, host_routes()) or net("0.0.0.0/32")) for r in host_routes())


# --- on the engine ---------------------------------------------------------------------------
def _backend(pool: str, prefix: int) -> DockerBackend:
    return DockerBackend(labels={TEST_LABEL: TEST_SESSION}, network="isolated", subnet_pool=pool, subnet_prefix=prefix)


def _subnet(docker: Any, installation: str) -> IPv4Network:
    config = docker.api.inspect_network(netguard.fence_of(installation).network)["IPAM"]["Config"]
    return net(config[0]["Subnet"])


@pytest.mark.docker
def test_installations_fencing_at_once_get_distinct_subnets_and_the_full_pool_names_its_holders(
    docker: Any,
    iptables: None,  # noqa: F811
) -> None:
    pool = f"10.215.{_OCTET}.0/24"  # eight /27s
    ids = [f"in_nettest{uuid.uuid4().hex[:10]}" for _ in range(9)]
    errors: list[BaseException] = []

    def fence(installation: str) -> None:
        try:
            _backend(pool, 27).fence(installation)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=fence, args=(i,)) for i in ids[:8]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        subnets = {_subnet(docker, i) for i in ids[:8]}
        assert subnets == set(net(pool).subnets(new_prefix=27))  # eight, none shared, all of the pool
        with pytest.raises(NetworkPoolExhaustedError) as caught:
            _backend(pool, 27).fence(ids[8])
        err = caught.value
        assert err.code == "network_pool_exhausted" and err.status == 503
        assert "all 8 /27 subnets of ENVCTL_RUNNER_SUBNET_POOL" in err.message
        assert f"envctl-{ids[0]} (" in err.message and "no container left" in err.message
        assert "`envctl uninstall --orphaned-networks` removes the 8 whose installation" in err.message
        assert {n["installation"] for n in err.details["networks"]} == set(ids[:8])
        assert err.details["command"] == "envctl uninstall --orphaned-networks"
    finally:
        for i in ids:
            netguard.teardown(docker, i)
    assert not docker.api.networks(filters={"name": "envctl-in_nettest"}) or all(
        n["Name"] not in {f"envctl-{i}" for i in ids} for n in docker.api.networks()
    )


@pytest.mark.docker
def test_a_pool_held_by_something_else_says_so_and_no_uninstall_is_offered(
    docker: Any,
    iptables: None,  # noqa: F811
) -> None:
    pool = f"10.216.{_OCTET}.0/24"
    plain = f"nettest-plain-{uuid.uuid4().hex[:8]}"
    docker.api.create_network(
        plain,
        driver="bridge",
        ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=pool)]),
        labels={TEST_LABEL: TEST_SESSION},
    )
    installation = f"in_nettest{uuid.uuid4().hex[:10]}"
    try:
        with pytest.raises(NetworkPoolExhaustedError) as caught:
            _backend(pool, 26).fence(installation)
        message = caught.value.message
        assert "envctl networks holding them: none" in message
        assert f"Also in the pool: network {plain} ({pool})" in message
        assert "no envctl network holds any of it" in message and caught.value.details["networks"] == []
        assert not docker.api.networks(filters={"name": f"envctl-{installation}"})
    finally:
        docker.api.remove_network(plain)
        netguard.teardown(docker, installation)


def _uninstall(monkeypatch: pytest.MonkeyPatch, capsys: Capsys, data: Path, *args: str) -> tuple[int, Any]:
    """`envctl uninstall ARGS --json` for the installation in ``data``: (exit code, its JSON)."""
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(data))
    monkeypatch.delenv("ENVCTL_DATABASE_URL", raising=False)
    capsys.readouterr()
    code = main(["uninstall", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def _ours(docker: Any, installations: set[str]) -> dict[str, list[str]]:
    """What of these installations the engine still has."""
    networks = [n["Name"] for n in docker.api.networks() if n["Name"] in {f"envctl-{i}" for i in installations}]
    containers = [
        c["Id"]
        for c in docker.api.containers(all=True, filters={"label": "envctl.installation"})
        if c["Labels"].get("envctl.installation") in installations
    ]
    found = (docker.api.volumes(filters={"label": "envctl.installation"}) or {}).get("Volumes") or []
    volumes = [v["Name"] for v in found if (v.get("Labels") or {}).get("envctl.installation") in installations]
    return {"networks": networks, "containers": containers, "volumes": volumes}


@pytest.mark.docker
@pytest.mark.slow
def test_r44_sixty_installations_made_and_removed_leave_the_engine_as_it_was(
    docker: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Capsys,
    iptables: None,  # noqa: F811
) -> None:
    """Sixty installations on one engine at once (twice what Docker's default pools held), each
    with its own data directory, migrated database and network made as a boot makes it;
    runtimes boot, save and mount a volume in the last; then each is removed with
    `envctl uninstall` and nothing of any is left."""
    base = base_image(docker, "python3")
    made: list[tuple[Path, str]] = []
    srv: Server | None = None
    try:
        for i in range(59):
            data = tmp_path / f"i{i:02d}" / "data"
            data.mkdir(parents=True)
            upgrade(f"sqlite:///{data / 'envctl.db'}")  # its own id comes with the migrations
            db = Database(f"sqlite:///{data / 'envctl.db'}")
            try:
                installation = installation_id(db)  # made as a first start makes it
            finally:
                db.dispose()
            DockerBackend.from_settings(Settings(data_dir=data, runner_labels={TEST_LABEL: TEST_SESSION})).fence(
                installation
            )  # the network and rules, as the first boot makes them
            made.append((data, installation))
        # the sixtieth: a real `envctl serve` boots runtimes, saves one, makes a volume
        last = tmp_path / "i59" / "data"
        srv = start_server(docker, last)
        with srv.client() as client:
            rid = new_runtime(client, "first")
            other = new_runtime(client, "second")
            for r in (rid, other):
                rt = client.post(f"/runtimes/{r}/start", params={"wait": 60}).json()
                assert rt["state"] == "running", rt
            ex = run(client, rid, "open('/root/kept.txt', 'w').write('x'); print('ran')")
            assert text(ex) == "ran\n", ex
            saved = save(client, rid, "net-r44")["result"]
            assert client.post("/volumes", json={"name": "keep"}).status_code == 201
            run(client, other, "open('/root/draft.txt', 'w').write('d')")
            stopped = client.post(f"/runtimes/{other}/stop", params={"wait": 60}).json()
            assert stopped["state"] == "stopped", stopped
        srv.stop()
        db = Database(f"sqlite:///{last / 'envctl.db'}")
        try:
            made.append((last, installation_id(db)))
        finally:
            db.dispose()
        installations = {i for _, i in made}
        subnets = [_subnet(docker, i) for i in installations]
        assert len(set(subnets)) == 60 and all(s.prefixlen == 24 and s.subnet_of(net("10.213.0.0/16")) for s in subnets)
        assert saved["version"] == "net-r44@1"
        assert len(_ours(docker, installations)["containers"]) == 1  # the running one; the stopped one's went

        for data, installation in made:
            args = ["--yes", "--volumes"] if data == last else ["--yes"]
            code, done = _uninstall(monkeypatch, capsys, data, *args)
            assert code == 0 and done["installation"] == installation, done
            assert done["network"]["network"] == f"envctl-{installation}"
            if data != last:  # the others' uninstalls left the last one's images and network alone
                assert docker.api.inspect_network(f"envctl-{made[-1][1]}")
        assert len(done["images"]) == 2, done  # the save and the stopped runtime's draft
        assert {i["what"].split(" ")[0] for i in done["images"]} == {"version", "draft"}
        assert any(i["what"] == "version python3@1" and i["reason"] == "a base image" for i in done["kept_images"])
        assert done["volumes"] and done["kept_volumes"] == []
        assert len(done["containers"]) == 1
        assert _ours(docker, installations) == {"networks": [], "containers": [], "volumes": []}
        for image in done["images"]:
            assert not docker.api.images(filters={"reference": image["tags"][0]}) if image["tags"] else True
            with pytest.raises(Exception, match="No such image"):
                docker.api.inspect_image(image["image_id"])
        assert docker.api.inspect_image(base)["Id"] == base  # the base image stays
    finally:
        if srv is not None:
            remove_runner_containers(docker, srv)
        for _, installation in made:
            netguard.teardown(docker, installation)


@pytest.mark.docker
@pytest.mark.slow
def test_a_full_pool_fails_the_boot_naming_the_holder_and_its_uninstall_frees_it(
    docker: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Capsys,
    iptables: None,  # noqa: F811
) -> None:
    base_image(docker, "python3")
    pool = f"10.214.{_OCTET}.0/24"  # room for one installation
    case = uuid.uuid4().hex[:8]
    env = {
        "ENVCTL_RUNNER_SUBNET_POOL": pool,
        "ENVCTL_RUNNER_LABELS": f"{TEST_LABEL}={TEST_SESSION},envctl.test-case={case}",
    }
    first, second = tmp_path / "a" / "data", tmp_path / "b" / "data"
    a = start_server(docker, first, **env)
    b: Server | None = None
    try:
        with a.client() as client:
            ra = new_runtime(client, "first")
            assert client.post(f"/runtimes/{ra}/start", params={"wait": 60}).json()["state"] == "running"
        held = Database(f"sqlite:///{first / 'envctl.db'}")
        try:
            holder = installation_id(held)
        finally:
            held.dispose()
        b = start_server(docker, second, **env)
        with b.client() as client:
            rb = new_runtime(client, "second")
            rt = client.post(f"/runtimes/{rb}/start", params={"wait": 60}).json()
            assert rt["state"] == "error" and rt["state_reason"] == "network-pool-exhausted", rt
            message = rt["state_message"]
            assert f"ENVCTL_RUNNER_SUBNET_POOL {pool} is taken" in message
            assert f"envctl-{holder} ({pool}; installation {holder}, 1 container)" in message
            assert "envctl uninstall --orphaned-networks" in message and "frees none now" in message
            logged = client.get(f"/runtimes/{rb}/log").json()[-1]
            assert logged["reason"] == "network-pool-exhausted"
        assert "Traceback" not in b.output()
        # the holder still has its container: no orphan to remove
        code, orphans = _uninstall(
            monkeypatch, capsys, second, "--orphaned-networks", "--label", f"envctl.test-case={case}", "--dry-run"
        )
        assert code == 0 and orphans["networks"] == []
        # a serving installation is not uninstalled under its server
        monkeypatch.setenv("ENVCTL_DATA_DIR", str(first))
        assert main(["uninstall", "--yes"]) == 1
        assert "stop it first" in capsys.readouterr().err
        a.stop()
        code, done = _uninstall(monkeypatch, capsys, first, "--yes")
        assert code == 0 and done["network"]["subnets"] == [pool] and len(done["containers"]) == 1
        with b.client() as client:
            rt = client.post(f"/runtimes/{rb}/start", params={"wait": 60}).json()
            assert rt["state"] == "running", rt
            assert text(run(client, rb, "print(6 * 7)")) == "42\n"
            # stopped, the second has no container: its network is an orphan, removed on request
            assert client.post(f"/runtimes/{rb}/stop", params={"wait": 60}).json()["state"] == "stopped"
            code, orphans = _uninstall(
                monkeypatch, capsys, second, "--orphaned-networks", "--label", f"envctl.test-case={case}", "--yes"
            )
            taken = Database(f"sqlite:///{second / 'envctl.db'}")
            try:
                booted = installation_id(taken)
            finally:
                taken.dispose()
            assert code == 0 and [n["network"] for n in orphans["removed"]] == [f"envctl-{booted}"]
            assert not docker.api.networks(filters={"name": f"envctl-{booted}"})
            # and its next boot makes it again (within the minute the rules were trusted)
            rt = client.post(f"/runtimes/{rb}/start", params={"wait": 60}).json()
            assert rt["state"] == "running", rt
        b.stop()
        code, done = _uninstall(monkeypatch, capsys, second, "--yes")
        assert code == 0 and done["network"]["network"] == f"envctl-{booted}"
        assert _ours(docker, {holder, booted}) == {"networks": [], "containers": [], "volumes": []}
    finally:
        for srv in (a, b):
            if srv is not None:
                remove_runner_containers(docker, srv)


@pytest.mark.docker
def test_uninstall_asks_first_and_refuses_where_there_is_no_installation(
    docker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    monkeypatch.delenv("ENVCTL_DATABASE_URL", raising=False)
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(tmp_path / "none"))
    assert main(["uninstall", "--yes"]) == 2
    assert "no envctl installation in" in capsys.readouterr().err
    assert main(["uninstall", "--label", "a=b"]) == 2
    assert "--label goes with --orphaned-networks" in capsys.readouterr().err
    data = tmp_path / "data"
    data.mkdir()
    upgrade(f"sqlite:///{data / 'envctl.db'}")
    monkeypatch.setenv("ENVCTL_DATA_DIR", str(data))
    db = Database(f"sqlite:///{data / 'envctl.db'}")
    try:
        installation = installation_id(db)
    finally:
        db.dispose()
    assert main(["uninstall"]) == 2  # no terminal to ask on, no --yes: nothing removed
    captured = capsys.readouterr()
    assert f"installation {installation} (data: {data}) holds on the Docker engine" in captured.out
    assert "confirm with --yes" in captured.err
    assert main(["uninstall", "--dry-run"]) == 0
    assert "network:    none" in capsys.readouterr().out
