"""``POST /nodes/{name}/drain`` and ``/activate`` on a backend with one engine (the fake one):
admins only (403 for others, before anything is asked of the backend), and a 422 saying there
is no node to drain. Draining on a swarm is tested in ``tests/runner/swarm/test_swarm_drafts.py``."""

from __future__ import annotations

import pytest

from tests.api.conftest import ApiHarness
from tests.api.test_errors_and_auth import assert_envelope


@pytest.mark.parametrize("action", ["drain", "activate"])
def test_only_an_admin_may_drain_or_activate_a_node(
    api: ApiHarness, other_headers: dict[str, str], action: str
) -> None:
    err = assert_envelope(api.client.post(f"/nodes/engine/{action}", headers=other_headers), 403, "forbidden")
    assert "admin" in err["message"]


@pytest.mark.parametrize("action", ["drain", "activate"])
def test_a_backend_with_one_engine_has_no_node_to_drain(api: ApiHarness, action: str) -> None:
    err = assert_envelope(api.post(f"/nodes/engine/{action}"), 422, "invalid_input")
    assert "no node to drain" in err["message"]
