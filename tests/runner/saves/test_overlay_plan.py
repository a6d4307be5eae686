"""A save's layer after an earlier save from the same container (``overlay.plan_layer`` with
``saved_at_ns``), planned from directories laid out as overlay2 lays them out: only what changed
since (and what that save left out), the directories above it, whiteouts for what went since,
and a directory replaced since in full. (The whole save on Docker: ``test_docker_saves.py``.)"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from runner.backends import overlay
from runner.saves.scans import SaveFilter


def _write(root: Path, rel: str, text: str = "x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _whiteout(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    os.mknod(root / rel, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _opaque(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "user.overlay.opaque", b"y")


def _names(upper: Path, saved: Path, saved_at_ns: int) -> set[str]:
    plan = overlay.plan_layer(
        [str(upper)], SaveFilter(None), private=lambda _p: False, saved_at_ns=saved_at_ns, saved=[str(saved)]
    )
    return {info.name for info, _source in plan.entries}


def test_a_layer_after_a_save_holds_only_what_changed_since(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("whiteouts are character devices: making them needs root")
    upper, saved = tmp_path / "upper", tmp_path / "saved"
    # what the container held at the first save, and that save's layer
    for root in (upper, saved):
        for rel in ("root/big", "root/gone", "opt/keep/a", "opt/tree/deep/x/y", "var/rep/old"):
            _write(root, rel)
        _whiteout(root, "etc/motd")
        _opaque(root / "var/rep")
    _write(upper, "root/.cache/pip/w")  # the first save left it out (a cache): not in its layer
    time.sleep(0.05)
    saved_at = time.time_ns()
    time.sleep(0.05)
    # what the container did since
    _write(upper, "root/small")
    (upper / "root/gone").unlink()  # only the saved layer had it: no whiteout in the upper directory
    _write(upper, "opt/keep/b")
    (upper / "opt/tree/deep/x/y").unlink()
    _whiteout(upper, "etc/issue")  # a path of the image below
    _write(upper, "var/rep/new")  # a directory replaced before the save, changed since

    assert _names(upper, saved, saved_at) == {
        "root/",
        "root/small",
        "root/.wh.gone",
        "root/.cache/",
        "root/.cache/pip/",
        "root/.cache/pip/w",  # this save does not leave it out: it goes in
        "opt/",  # older directories, above newer entries
        "opt/keep/",
        "opt/keep/b",
        "opt/tree/",
        "opt/tree/deep/",
        "opt/tree/deep/x/",
        "opt/tree/deep/x/.wh.y",
        "etc/",
        "etc/.wh.issue",
        "var/",
        "var/rep/",
        "var/rep/.wh..wh..opq",
        "var/rep/new",
        "var/rep/old",  # all of an opaque directory, or the layer would hide it
    }
    everything = _names(upper, saved, 0)  # no save since the boot: the whole upper directory
    assert {"root/big", "opt/keep/a", "etc/.wh.motd", "root/small"} <= everything
    assert "root/.wh.gone" not in everything
