"""Where a runtime's things are: on the host, its private state directory (the agent's Unix
socket, ``/results``) under ``<data dir>/runtimes/<id>`` and the agent's code; and where its
agent answers (:meth:`RuntimePaths.agent`): that socket, or the address of a tcp channel
recorded on its row (``runner/channel.py``, ``runner/agentauth.py``)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from envs.kit.errors import EnvctlError
from runner.agentauth import AgentLinks
from runner.backends.base import BackendState, RuntimeBackend
from runner.channel import AgentTarget
from runner.models import Runtime
from runner.runtimes.store import Records

AGENT_DIR = Path(__file__).resolve().parent / "agent"


class RuntimePaths:
    def __init__(
        self,
        runtimes_dir: Path,
        backend: RuntimeBackend,
        *,
        records: Records | None = None,
        links: AgentLinks | None = None,
    ) -> None:
        self.runtimes_dir = runtimes_dir
        self.backend = backend
        self.agent_dir = AGENT_DIR
        self.records = records  # the rows that say where a tcp channel's agent is
        self.links = links

    def state_dir(self, runtime_id: str) -> Path:
        return self.runtimes_dir / runtime_id

    def socket(self, runtime_id: str) -> Path:
        """The host path of the runtime's agent socket."""
        return self.backend.socket_path({}, self.state_dir(runtime_id))

    def agent(self, runtime_id: str, state: BackendState | None = None) -> AgentTarget:
        """Where the runtime's agent answers: its tcp channel's address when ``state`` (else
        the row's backend state) records one, else its Unix socket."""
        if state is None and self.records is not None:
            with self.records.db.session() as s:
                row = s.get(Runtime, runtime_id)
                state = dict(row.backend_state or {}) if row is not None else {}
        agent = (state or {}).get("agent") or {}
        if agent.get("channel") == "tcp" and self.links is not None:
            return self.links.address(runtime_id, agent, self._report)
        return self.socket(runtime_id)

    def _report(self, runtime_id: str, message: str, details: dict[str, Any]) -> None:
        """A refused agent connection, in the runtime's runner log (never the credential)."""
        if self.records is None:
            return
        with contextlib.suppress(EnvctlError):
            self.records.log_now(
                runtime_id, event="agent-connection-refused", reason="channel", message=message, details=details
            )

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
