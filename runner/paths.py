"""Where a runtime's things are on the host: its private state directory (the agent's Unix
socket, ``/results``) under ``<data dir>/runtimes/<id>``, and the agent's code."""

from __future__ import annotations

import shutil
from pathlib import Path

from runner.backends.base import RuntimeBackend

AGENT_DIR = Path(__file__).resolve().parent / "agent"


class RuntimePaths:
    def __init__(self, runtimes_dir: Path, backend: RuntimeBackend) -> None:
        self.runtimes_dir = runtimes_dir
        self.backend = backend
        self.agent_dir = AGENT_DIR

    def state_dir(self, runtime_id: str) -> Path:
        return self.runtimes_dir / runtime_id

    def socket(self, runtime_id: str) -> Path:
        """The host path of the runtime's agent socket."""
        return self.backend.socket_path({}, self.state_dir(runtime_id))

    def results_dir(self, runtime_id: str) -> Path:
        return self.state_dir(runtime_id) / "results"

    def remove_socket(self, runtime_id: str) -> None:
        self.socket(runtime_id).unlink(missing_ok=True)

    def remove_state_dir(self, runtime_id: str) -> None:
        """The directory, or (a runtime served from the warm pool) the link and the pooled
        container's directory it points to."""
        directory = self.state_dir(runtime_id)
        if directory.is_symlink():
            target = directory.resolve()
            directory.unlink()
            if target.parent == self.runtimes_dir.resolve():
                shutil.rmtree(target, ignore_errors=True)
        elif directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
