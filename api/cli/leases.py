"""The client side of a runtime's lease: a heartbeat thread that renews it.

A runtime made with a lease (``POST /runtimes`` with ``lease``) is stopped and deleted by the
server once nobody renews the lease for its length (runner/runtimes/leases.py). ``envctl run``
holds one for the runtime it creates, renewed here every third of the lease, so a killed CLI
(SIGKILL, a closed laptop) leaves nothing behind, while a live one keeps its runtime however
long its cells run.
"""

from __future__ import annotations

import sys
import threading

from api.cli.client import Api
from api.cli.errors import CliError

DEFAULT_LEASE = 30  # seconds: renewed every 10 s, so two lost renewals in a row are survived


class Heartbeat:
    """Renews ``runtime_id``'s lease of ``seconds`` every third of it until ``stop``."""

    def __init__(self, api: Api, runtime_id: str, name: str, seconds: int) -> None:
        self.api = api.fork()  # its own connections: the main thread's client is busy streaming
        self.runtime_id = runtime_id
        self.name = name
        self.every = seconds / 3
        self.lost: str | None = None  # why the lease is gone, once it is
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="envctl-lease", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.api.http.close()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.api.call("POST", f"/runtimes/{self.runtime_id}/lease")
            except CliError as exc:
                if exc.status in (404, 409):  # deleted, or the lease ran out or was dropped: it is over
                    self.lost = exc.server_message or exc.message
                    print(f"envctl: the lease of runtime {self.name} is lost: {self.lost}", file=sys.stderr)
                    return
                # the server did not answer this time: the next beat tries again within the lease
                print(f"envctl: could not renew the lease of runtime {self.name}: {exc.message}", file=sys.stderr)
