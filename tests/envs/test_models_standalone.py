"""The environment models work in a process that imports nothing else of envctl (as
`envctl base build` does): every table they refer to is known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from api.dbschema import upgrade

SCRIPT = """
import sys
from envs.kit.db import Database
from envs.service import NewVersion, register_version
db = Database(sys.argv[1])
with db.session() as s:
    v, created = register_version(s, NewVersion(environment="solo", image_id="sha256:" + "c" * 64, image_ref="x"))
    print(v.ref, created)
"""


def test_registering_a_version_needs_only_the_envs_package(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'envctl.db'}"
    upgrade(url)
    out = subprocess.run([sys.executable, "-c", SCRIPT, url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "solo@1 True"
