"""Importing from another envctl server, without Docker: what the upstream's API says about a
version (``registry/upstream.py``, read from a real envctl app served on loopback), and what the
import route and CLI refuse before anything travels. The whole import, with a second Docker
engine, is ``test_two_machines.py``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from api.app import create_app
from api.cli import main
from api.cli.errors import EXIT_BAD_INPUT
from api.dbschema import upgrade
from api.settings import Settings
from api.startup import Services
from envs.kit.db import Database
from envs.kit.errors import InvalidInputError
from envs.service import NewVersion, register_version
from registry import upstream
from registry import users as registry_service
from registry.errors import NotPushedError, UpstreamError, UpstreamRefusedError
from registry.teams import Actor, create_team
from tests.api.conftest import ApiHarness, api, make_api, prepared_settings  # noqa: F401
from tests.conftest import TEST_LABEL, TEST_SESSION
from tests.fixtures.server import served
from tests.fixtures.services import _free_port

BASE = "sha256:" + "c" * 64
IMAGE = "sha256:" + "d" * 64
PUBLIC = "93.184.215.14"  # a public address (the tests below never connect to it)
MANIFEST = "sha256:" + "e" * 64


@dataclass
class Upstream:
    url: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def upstream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A real envctl app (fake backend) naming an external registry; acme/ml@1 was pushed
    there (its digest recorded), acme/raw@1 never was."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("upstream") / "data",
        api_port=_free_port(),
        registry="http://127.0.0.1:9",
        runner_backend="fake",
        runner_name=f"test-{TEST_SESSION}-{uuid.uuid4().hex[:8]}",
        runner_labels={TEST_LABEL: TEST_SESSION},
    )
    upgrade(settings.effective_database_url)
    db = Database(settings.effective_database_url)
    with db.session() as s:
        users = {name: registry_service.create_user(s, name) for name in ("alice", "bob")}
        tokens = {name: registry_service.issue_token(s, user, "tests") for name, user in users.items()}
        create_team(s, "acme", Actor(users["alice"].id))
        base, _ = register_version(s, NewVersion(environment="tiny", image_id=BASE, image_ref="tiny:1"))
        ml, _ = register_version(
            s, NewVersion(environment="acme/ml", image_id=IMAGE, image_ref="x:1", parent=base, message="numpy")
        )
        ml.registry_digest = MANIFEST
        register_version(s, NewVersion(environment="acme/raw", image_id=IMAGE, image_ref="x:1", parent=base))
    db.dispose()
    with served(create_app(Services.build(settings)), settings.api_port) as url:
        yield Upstream(url, tokens)


LOOPBACK = ("127.0.0.1",)  # the upstream and its registry are on loopback: allowed by name (import_allow_hosts)


def test_the_upstream_says_what_a_version_is_and_where_its_registry_is(upstream_server: Upstream) -> None:
    offer = upstream.describe(upstream_server.url, upstream_server.tokens["alice"], "acme/ml", allow_hosts=LOOPBACK)
    assert (offer.ref, offer.environment, offer.user) == ("acme/ml@1", "acme/ml", "alice")
    assert (offer.image_id, offer.registry_digest, offer.registry_host) == (IMAGE, MANIFEST, "127.0.0.1:9")
    assert offer.message == "numpy" and offer.ancestors == (BASE,)


def test_what_the_upstream_refuses_or_never_pushed_is_refused_with_its_reason(upstream_server: Upstream) -> None:
    url, tokens = upstream_server.url, upstream_server.tokens
    with pytest.raises(UpstreamRefusedError, match="404"):  # bob is not in acme, and nothing is published
        upstream.describe(url, tokens["bob"], "acme/ml@1", allow_hosts=LOOPBACK)
    with pytest.raises(UpstreamRefusedError, match="401"):
        upstream.describe(url, "not-a-token", "acme/ml@1", allow_hosts=LOOPBACK)
    with pytest.raises(NotPushedError, match="never pushed"):
        upstream.describe(url, tokens["alice"], "acme/raw@1", allow_hosts=LOOPBACK)


def test_an_upstream_that_does_not_answer_or_is_no_url_is_refused() -> None:
    with pytest.raises(UpstreamError, match="did not answer"):
        upstream.describe(f"http://127.0.0.1:{_free_port()}", "t", "acme/ml@1", allow_hosts=LOOPBACK)
    with pytest.raises(InvalidInputError) as bad:
        upstream.describe("file:///etc/passwd", "t", "acme/ml@1")
    assert bad.value.details["field"] == "from"


def test_the_import_route_refuses_bad_input_and_a_backend_whose_images_cannot_travel(api: ApiHarness) -> None:  # noqa: F811
    body = {"from": f"http://{PUBLIC}:9", "ref": "acme/ml@1", "token": "t"}  # never asked: the backend refuses first
    bad_url = api.post("/environments/import-remote", json={**body, "from": "ftp://x"})
    assert bad_url.status_code == 422 and bad_url.json()["error"]["details"]["field"] == "from"
    bad_name = api.post("/environments/import-remote", json={**body, "name": "acme/ml@2"})
    assert bad_name.status_code == 422 and bad_name.json()["error"]["details"]["field"] == "name"
    fake = api.post("/environments/import-remote", json=body)  # the fake backend has no engine
    assert fake.status_code == 409 and fake.json()["error"]["code"] == "no_registry", fake.text


def test_envctl_pull_from_needs_a_token_there_and_as_needs_from(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", "http://127.0.0.1:9", "--token", "t"]
    assert main(["pull", "acme/ml@1", "--from", "http://127.0.0.1:9", *common]) == EXIT_BAD_INPUT
    assert "--from-token" in capsys.readouterr().err
    assert main(["pull", "acme/ml@1", "--as", "ml", *common]) == EXIT_BAD_INPUT


# R28: where an import may reach. No request leaves for any of these (nothing listens there).
NEVER = [
    "http://169.254.169.254/latest/meta-data",  # the cloud metadata service
    "http://169.254.1.1:8700",
    "http://[fe80::1]:8700",  # IPv6 link-local
    "http://[fd00:ec2::254]",  # AWS's IPv6 metadata address
    "http://0.0.0.0:8700",
    "http://[::]:8700",
    "http://224.0.0.1:8700",
    "http://[::ffff:169.254.169.254]",
]


@pytest.mark.parametrize("url", NEVER)
def test_an_import_from_a_link_local_metadata_unspecified_or_multicast_address_is_refused_even_if_allowed(
    url: str,
) -> None:
    with pytest.raises(InvalidInputError) as bad:
        upstream.describe(url, "t", "acme/ml@1", allow_hosts=(urlsplit(url).hostname or "", "169.254.169.254"))
    assert bad.value.status == 422 and bad.value.details["field"] == "from", bad.value.message
    assert "never connects" in bad.value.message


def test_a_name_resolving_to_loopback_is_refused_unless_allowed_and_so_is_the_registry_it_names(
    upstream_server: Upstream,
) -> None:
    by_name = upstream_server.url.replace("127.0.0.1", "localhost")  # localhost resolves to loopback
    with pytest.raises(InvalidInputError) as bad:
        upstream.describe(by_name, upstream_server.tokens["alice"], "acme/ml")
    assert bad.value.details["field"] == "from" and "loopback" in bad.value.message
    assert "ENVCTL_IMPORT_ALLOW_HOSTS" in bad.value.message
    # allowed by name, the upstream is read, but the registry it names (127.0.0.1:9) is not allowed
    with pytest.raises(InvalidInputError) as bad:
        upstream.describe(by_name, upstream_server.tokens["alice"], "acme/ml", allow_hosts=("localhost",))
    assert bad.value.details["field"] == "registry" and "127.0.0.1" in bad.value.message


def test_every_address_a_name_resolves_to_is_checked_and_the_request_goes_to_a_checked_one(
    upstream_server: Upstream,
) -> None:
    port = upstream_server.url.rsplit(":", 1)[1]
    asked: list[str] = []

    def rebinding(host: str) -> list[str]:  # the first answer is checked; a second one would be the attack
        asked.append(host)
        return ["127.0.0.1"] if len(asked) == 1 else ["169.254.169.254"]

    offer = upstream.describe(
        f"http://envctl.example.org:{port}",
        upstream_server.tokens["alice"],
        "acme/ml",
        allow_hosts=("envctl.example.org", "127.0.0.1"),
        resolve=rebinding,
    )
    assert offer.ref == "acme/ml@1" and offer.url == f"http://envctl.example.org:{port}"
    assert asked == ["envctl.example.org"]  # resolved once, connected to what was checked
    with pytest.raises(InvalidInputError) as bad:  # one private address among public ones is enough
        upstream.check_url("https://mixed.example.org", resolve=lambda _h: [PUBLIC, "10.0.0.7"])
    assert bad.value.details["field"] == "from" and "10.0.0.7" in bad.value.message


def test_a_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidInputError) as bad:
        upstream.check_url(f"http://alice:s3cret@{PUBLIC}:8700")
    assert bad.value.details["field"] == "from"
    assert "s3cret" not in bad.value.message and "s3cret" not in str(bad.value.details)


def test_the_import_route_refuses_private_and_metadata_hosts_with_422_naming_from(api: ApiHarness) -> None:  # noqa: F811
    body = {"ref": "acme/ml@1", "token": "t"}
    for url in ("http://169.254.169.254/latest", "http://localhost:8700", "http://10.1.2.3", "http://u:p@x.org"):
        answer = api.post("/environments/import-remote", json={**body, "from": url})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["details"]["field"] == "from", answer.text
