"""The Kubernetes fixture's own tests. ``test_lifecycle.py`` takes the session's cluster down to
check what ``down`` leaves, so it runs after every other test of the session."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [i for i in items if i.nodeid.startswith("tests/kube/test_lifecycle.py")]
    if last:
        items[:] = [i for i in items if i not in last] + last
