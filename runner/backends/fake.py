"""An in-memory backend: each "container" is the real agent run as a local process.

It keeps its bookkeeping in one process-wide table, the fake "engine" that every instance
shares, as runners on one host share a Docker engine: a runner service that is torn down and
built again in the same process finds its runtimes again, as it would find Docker containers
after a restart, and ``list_owned`` returns only the containers labelled with the asking
runner's installation and name. Faults are built in, JupyterHub style:

- ``boot_delay``: seconds the agent waits before it listens (a slow boot);
- ``never_answers``: the "container" runs but no agent ever listens;
- ``fail_start``: ``start`` raises ``BackendError``;
- ``unreachable``: every call raises ``BackendError``, as when the Docker engine is down.

Never use it for real work: cells would run on the host, unconfined.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from envs.kit.errors import BackendError, InvalidInputError
from runner.backends.base import (
    AGENT_SOCKET,
    LABEL_INSTALLATION,
    LABEL_RUNNER,
    BackendState,
    Change,
    ContainerStatus,
    EarlyPause,
    FoundContainer,
    ImageInfo,
    LayerObserver,
    RuntimeBackend,
    RuntimeSpec,
    SavedLayer,
    Status,
    VolumeFound,
)
from runner.identity import RunnerIdentity
from runner.settings import Settings


@dataclass
class _FakeContainer:
    id: str
    runtime_id: str
    spec: RuntimeSpec
    process: subprocess.Popen[bytes]
    changes: list[Change] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # what a save's layer holds
    paused: bool = False  # a save's pause that was never undone (a test sets it)

    @property
    def labels(self) -> dict[str, str]:
        return self.spec.labels


class FakeBackend(RuntimeBackend):
    name = "fake"
    _containers: ClassVar[dict[str, _FakeContainer]] = {}  # the one engine: container id -> container
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _ids: ClassVar[itertools.count[int]] = itertools.count(1)
    _images: ClassVar[dict[str, ImageInfo]] = {}
    _removed: ClassVar[set[str]] = set()
    _kernelspecs: ClassVar[dict[str, list[dict[str, str]]]] = {}

    def __init__(
        self,
        *,
        boot_delay: float = 0.0,
        never_answers: bool = False,
        fail_start: bool = False,
        unreachable: bool = False,
    ) -> None:
        self.boot_delay = boot_delay
        self.never_answers = never_answers
        self.fail_start = fail_start
        self.unreachable = unreachable

    @classmethod
    def from_settings(cls, settings: Settings) -> FakeBackend:
        return cls()

    def _check(self, action: str) -> None:
        if self.unreachable:
            raise BackendError(f"the fake engine does not answer ({action})", details={"action": action})

    # volumes: names and labels, in memory (shared like the containers: one engine)
    _volumes: ClassVar[dict[str, dict[str, str]]] = {}

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        with self._lock:
            found = self._volumes.setdefault(name, dict(labels))
        if found.get(LABEL_INSTALLATION) != labels.get(LABEL_INSTALLATION):
            raise InvalidInputError(f"mounts: the volume {name} is not this installation's", field="mounts")

    def list_volumes(self, installation: str) -> list[VolumeFound]:
        with self._lock:
            return [
                VolumeFound(n, dict(v)) for n, v in self._volumes.items() if v.get(LABEL_INSTALLATION) == installation
            ]

    def remove_volume(self, name: str, installation: str) -> None:
        with self._lock:
            if self._volumes.get(name, {}).get(LABEL_INSTALLATION) == installation:
                del self._volumes[name]

    def ping(self) -> None:
        self._check("answer a ping")

    def start(self, spec: RuntimeSpec) -> BackendState:
        self._check("create the runtime's container")
        if spec.machine.cpus <= 0 or spec.machine.memory <= 0:
            raise InvalidInputError("machine type has a non-positive limit", field="machine_type")
        if not spec.labels.get(LABEL_INSTALLATION) or not spec.labels.get(LABEL_RUNNER):
            raise InvalidInputError("a runtime container needs its installation and runner labels", field="labels")
        if self.fail_start:
            raise BackendError("the fake engine refused to start the container (fault injected)")
        self.vanish(spec.runtime_id)  # a leftover of the same runtime goes first
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        sock = spec.state_dir / AGENT_SOCKET
        if self.never_answers:
            cmd = [sys.executable, "-c", "import time; time.sleep(3600)"]
        else:
            # A relative socket path (the process runs in the state dir) stays under the
            # 108-byte limit of Unix socket addresses however deep the data dir is.
            cmd = [
                sys.executable,
                "-u",
                "-I",
                str(spec.agent_dir / "main.py"),
                "--socket",
                sock.name,
            ]
            if self.boot_delay:
                prelude = f"import time,runpy,sys; time.sleep({self.boot_delay!r}); sys.argv={cmd[3:]!r};"
                cmd = [
                    sys.executable,
                    "-u",
                    "-I",
                    "-c",
                    prelude + "runpy.run_path(sys.argv[0], run_name='__main__')",
                ]
        env = {**spec.env, "PATH": os.environ.get("PATH", ""), "ENVCTL_RUNTIME_ID": spec.runtime_id}
        env["ENVCTL_SECRETS_DIR"] = str(spec.state_dir / "secrets")  # a local process: no tmpfs of its own
        proc = subprocess.Popen(cmd, env=env, cwd=spec.state_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cid = f"fake-{next(self._ids)}"
        self._containers[cid] = _FakeContainer(cid, spec.runtime_id, spec, proc)
        return {"container_id": cid, "container_name": spec.container_name}

    def poll(self, state: BackendState) -> ContainerStatus:
        self._check("inspect the runtime's container")
        c = self._containers.get(state.get("container_id", ""))
        if c is None:
            return ContainerStatus(Status.GONE)
        code = c.process.poll()
        if code is None:
            return ContainerStatus(Status.RUNNING)
        return ContainerStatus(Status.EXITED, exit_code=code, oom_killed=code == -9)

    def stop(self, state: BackendState, timeout: float = 5.0) -> None:
        self._check("stop the runtime's container")
        c = self._containers.pop(state.get("container_id", ""), None)
        if c is not None:
            self._kill(c, timeout)

    def list_owned(self, identity: RunnerIdentity) -> list[FoundContainer]:
        self._check("list the runner's containers")
        return [
            FoundContainer(
                c.runtime_id,
                {"container_id": c.id, "container_name": c.spec.container_name},
                self.poll({"container_id": c.id}),
                legacy=LABEL_INSTALLATION not in c.labels,
            )
            for c in list(self._containers.values())
            if c.labels.get(LABEL_RUNNER) == identity.name
            and c.labels.get(LABEL_INSTALLATION, identity.installation) == identity.installation
        ]

    def socket_path(self, state: BackendState, state_dir: Path) -> Path:
        return state_dir / AGENT_SOCKET

    # --- snapshots: images are names in a table; "changes" are what a test says they are ---
    def changes(self, state: BackendState) -> list[Change]:
        self._check("list the runtime's changes")
        c = self._containers.get(state.get("container_id", ""))
        return list(c.changes) if c is not None else []

    def commit(self, state: BackendState, *, config: dict[str, Any], repository: str, tag: str) -> str:
        self._check("snapshot the runtime's filesystem")
        c = self._containers.get(state.get("container_id", ""))
        if c is None:
            raise BackendError("the runtime has no container to save")
        parent = self.image_info(c.spec.image)
        image_id = "sha256:" + hashlib.sha256(f"{c.id}:{next(self._ids)}".encode()).hexdigest()
        layers = (parent.layers if parent else 1) + 1
        size = (parent.size if parent else 0) + 1000 * len(c.changes)
        self._images[image_id] = ImageInfo(image_id, size, layers, dict(config))
        return image_id

    def save_layer(
        self,
        state: BackendState,
        *,
        config: dict[str, Any],
        repository: str,
        tag: str,
        version_image: str,
        observer: LayerObserver,
        saved_at_ns: int = 0,
        early: EarlyPause | None = None,
    ) -> SavedLayer:
        """The files ``set_files`` gave the runtime, through the observer as a real layer's are."""
        if early is not None:  # never made here (no pause_for_save): nothing to take over
            early.undo()
        self._check("save the runtime's filesystem")
        c = self._containers.get(state.get("container_id", ""))
        if c is None:
            raise BackendError("the runtime has no container to save")
        left_out: dict[str, dict[str, int]] = {}
        for path, data in sorted(c.files.items()):
            cache = observer.cache_of(path)
            if cache is not None:
                counted = left_out.setdefault(cache, {"bytes": 0, "files": 0})
                counted["bytes"] += len(data)
                counted["files"] += 1
                continue
            observer.entry(path)
            sink = observer.content(path, len(data))
            if sink is not None:
                for at in range(0, len(data), 7):  # small chunks: matches across their edges count
                    sink(data[at : at + 7])
                sink(b"")
        observer.verdict()
        image_id = self.commit(state, config=config, repository=repository, tag=tag)
        return SavedLayer(self._images[image_id], left_out)

    def resume(self, state: BackendState) -> None:
        c = self._containers.get(state.get("container_id", ""))
        if c is not None:
            c.paused = False

    def image_info(self, image: str) -> ImageInfo | None:
        if image in self._images:
            return self._images[image]
        if image in self._removed:
            return None
        return ImageInfo(image, 100_000, 1, {})  # images the fake never made stand for base images

    def remove_image(self, image: str) -> None:
        if self._images.pop(image, None) is not None:
            self._removed.add(image)

    def squash(self, image: str, *, config: dict[str, Any], repository: str, tag: str) -> str:
        info = self.image_info(image)
        image_id = "sha256:" + hashlib.sha256(f"squash:{image}:{next(self._ids)}".encode()).hexdigest()
        self._images[image_id] = ImageInfo(image_id, info.size if info else 0, 1, dict(config))
        return image_id

    def kernelspecs(self, image: str) -> list[dict[str, str]]:
        """What ``set_kernelspecs`` said the image has; none for any other image."""
        self._check("look for the image's kernelspecs")
        if self.image_info(image) is None:
            raise BackendError(f"image {image[:30]} is not in the fake engine", details={"image": image})
        return [dict(k) for k in self._kernelspecs.get(image, [])]

    @classmethod
    def set_kernelspecs(cls, image: str, specs: list[dict[str, str]]) -> None:
        """The kernelspecs an image has (a test's stand-in for kernel.json files in it)."""
        cls._kernelspecs[image] = [dict(k) for k in specs]

    def set_changes(self, runtime_id: str, changes: list[Change]) -> None:
        """What the fake reports as changed in a runtime's filesystem (a test's stand-in for writes)."""
        for c in self._containers.values():
            if c.runtime_id == runtime_id:
                c.changes = list(changes)

    def set_files(self, runtime_id: str, files: dict[str, bytes]) -> None:
        """The files a runtime's next save finds in its layer (a test's stand-in for writes)."""
        for c in self._containers.values():
            if c.runtime_id == runtime_id:
                c.files = dict(files)

    # --- faults a test can cause from outside --------------------------------------------
    def vanish(self, runtime_id: str) -> None:
        """Remove a runtime's container behind the runner's back (``docker rm -f``)."""
        for c in [c for c in self._containers.values() if c.runtime_id == runtime_id]:
            self._containers.pop(c.id, None)
            self._kill(c)

    def crash(self, runtime_id: str) -> None:
        """Kill a runtime's process, leaving the container behind as exited (like an OOM kill)."""
        for c in self._containers.values():
            if c.runtime_id == runtime_id:
                c.process.kill()
                c.process.wait()

    @classmethod
    def containers(cls, identity: RunnerIdentity) -> dict[str, _FakeContainer]:
        """The engine's containers of ``identity``, by container id (for tests to look into)."""
        return {
            cid: c
            for cid, c in list(cls._containers.items())
            if c.labels.get(LABEL_RUNNER) == identity.name and c.labels.get(LABEL_INSTALLATION) == identity.installation
        }

    @classmethod
    def reset_all(cls) -> None:
        cls._kernelspecs.clear()
        with cls._lock:
            for c in cls._containers.values():
                cls._kill(c)
            cls._containers.clear()

    @staticmethod
    def _kill(c: _FakeContainer, timeout: float = 2.0) -> None:
        if c.process.poll() is None:
            c.process.terminate()
            try:
                c.process.wait(timeout)
            except subprocess.TimeoutExpired:
                c.process.kill()
                c.process.wait()
