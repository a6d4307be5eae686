"""The installation's watch on the cluster (what KubeSpawner's reflector does): one thread per
kind that lists, then watches from the listing's ``resourceVersion``, resumes from the last one
it saw when a watch ends, and lists afresh when the API says that version is too old (410).

Its objects are kept as the API's JSON, by name. A reader asks :meth:`Reflector.items`, which
raises ``BackendError`` while the cache is not a complete picture (before the first listing,
after a failed watch until the next listing succeeds), so reconciliation never trusts an
absence it did not see; :meth:`Reflector.wait` sleeps until a change (a boot waiting for its
pod reacts to the change itself, never to a polling interval).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from envs.kit.errors import BackendError

log = logging.getLogger("envctl.kube.watch")
WATCH_SECONDS = 60  # the server ends each watch after this long; it is resumed from its last version
BACKOFF_MAX = 10.0

Obj = dict[str, Any]


class _ExpiredError(Exception):
    """The version the watch resumes from is too old (410 Gone): list afresh."""


class Reflector:
    """One list+watch of one kind (``list_fn``: the client's ``list_namespaced_pod`` and alike)."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        *args: Any,
        on_change: Callable[[str, Obj], None] | None = None,
        keep: Callable[[Obj], bool] | None = None,
        **selectors: str,
    ) -> None:
        self.kind = kind
        self.list_fn = list_fn
        self.args = args
        self.selectors = {k: v for k, v in selectors.items() if v}
        self.on_change = on_change
        self.keep = keep
        self._items: dict[str, Obj] = {}
        self._cond = threading.Condition()
        self._synced = False
        self._error = "not listed yet"
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self.version = ""
        self.generation = 0  # bumped on every change (waiters compare it)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kube-watch-{self.kind}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
        with self._cond:
            self._cond.notify_all()

    # --- readers ---------------------------------------------------------------------------
    def items(self, wait: float = 0.0) -> dict[str, Obj]:
        """Every object by name, complete; ``BackendError`` when the cache is not (waits up to
        ``wait`` seconds for the first listing)."""
        deadline = time.monotonic() + wait
        with self._cond:
            while not self._synced and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendError(
                        f"the cluster's {self.kind} are not known right now: {self._error}",
                        details={"action": f"watch {self.kind}"},
                    )
                self._cond.wait(left)
            return dict(self._items)

    def get(self, name: str) -> Obj | None:
        with self._cond:
            return self._items.get(name)

    @property
    def synced(self) -> bool:
        return self._synced

    def wait(self, generation: int, timeout: float) -> int:
        """Until the cache changed after ``generation`` or ``timeout`` passed; the generation now."""
        with self._cond:
            if self.generation == generation:
                self._cond.wait(timeout)
            return self.generation

    # --- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        from kubernetes import watch  # noqa: PLC0415  (the client is imported by the backend that needs it)

        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._relist()
                backoff = 0.5
                while not self._stop.is_set():
                    self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                    for event in self._watch.stream(
                        self.list_fn,
                        *self.args,
                        resource_version=self.version,
                        timeout_seconds=WATCH_SECONDS,
                        allow_watch_bookmarks=True,
                        **self.selectors,
                    ):
                        self._apply(str(event.get("type")), event.get("raw_object") or {})
                        if self._stop.is_set():
                            break
            except _ExpiredError:
                log.info("watch of %s: version %s expired; listing again", self.kind, self.version)
            except Exception as exc:
                if self._stop.is_set():
                    break
                status = getattr(exc, "status", None)
                if status == 410:
                    continue
                text = f"{type(exc).__name__}: {str(exc)[:300]}"
                with self._cond:
                    self._synced = False
                    self._error = text
                    self.generation += 1
                    self._cond.notify_all()
                log.warning("watch of %s failed (%s); listing again in %.1f s", self.kind, text, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _relist(self) -> None:
        resp = self.list_fn(*self.args, _preload_content=False, **self.selectors)
        body = json.loads(resp.data)
        items = {str(o["metadata"]["name"]): o for o in body.get("items") or [] if self.keep is None or self.keep(o)}
        with self._cond:
            old, listed_before = self._items, bool(self.version)
            self._items = items
            self.version = str((body.get("metadata") or {}).get("resourceVersion") or "")
            self._synced = True
            self._error = ""
            self.generation += 1
            self._cond.notify_all()
        if self.on_change is not None and listed_before:  # the first listing is the past, not news
            for name, obj in items.items():
                if old.get(name, {}).get("metadata", {}).get("resourceVersion") != obj["metadata"].get(
                    "resourceVersion"
                ):
                    self._notify("MODIFIED" if name in old else "ADDED", obj)

    def _apply(self, kind: str, obj: Obj) -> None:
        if kind == "ERROR":
            if int(obj.get("code") or 0) == 410:
                raise _ExpiredError()
            raise BackendError(f"the watch of {self.kind} failed: {obj.get('message') or obj}")
        meta = obj.get("metadata") or {}
        version = str(meta.get("resourceVersion") or "")
        if kind == "BOOKMARK":
            self.version = version or self.version
            return
        name = str(meta.get("name") or "")
        with self._cond:
            if kind == "DELETED":
                self._items.pop(name, None)
            elif self.keep is None or self.keep(obj):
                self._items[name] = obj
            self.version = version or self.version
            self.generation += 1
            self._cond.notify_all()
        self._notify(kind, obj)

    def _notify(self, kind: str, obj: Obj) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(kind, obj)
        except Exception:  # a listener's fault never stops the watch
            log.exception("a listener of the %s watch failed", self.kind)
