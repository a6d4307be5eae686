"""Ordering for the tests on the real Kubernetes cluster (the ``kube`` fixture, for any test of
the session): they run after all the others, so that the cluster's build, which ``make test``
starts in the background (about 7 minutes on a machine that never built it), overlaps the rest
of the suite instead of holding it; ``test_lifecycle.py`` takes the session's cluster down to
check what ``down`` leaves, so it runs last of all."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if item.nodeid.startswith("tests/kube/test_lifecycle.py"):
            return 2
        return 1 if "kube" in getattr(item, "fixturenames", ()) else 0

    items.sort(key=rank)  # stable: the order within each rank stays
