"""Unsaved changes: what a runtime's filesystem differs by from the version it booted from.

- The list (``GET /runtimes/{id}/changes``): the draft's changes, then the running container's,
  with sizes, without envctl's private paths.
- The flag (``unsaved_changes`` on ``GET /runtimes/{id}``): pages poll it, so a "yes" is
  trusted for a minute (the slow answer to get), and the engine's diff may be a few seconds old.
- After a save the container keeps its layer, but what was in it at the snapshot belongs to the
  new version: a path whose inode changed after the snapshot (its ctime, which no program can
  set back) is a change again; older ones are not (``change_baseline.saved_at_ns``).
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass
from typing import Any

from envs.kit.errors import EnvctlError
from runner.backends.base import Change, RuntimeBackend, changed_since_save
from runner.channel import AgentChannel, AgentUnavailableError
from runner.models import Runtime
from runner.paths import RuntimePaths
from runner.runtimes.states import State
from runner.saves.scans import CacheRules

DIFF_CACHE_SECONDS = 3.0
# The flag's answer is keyed on the container, the last save and the last activity: a cell or
# a save that ends changes the key, so the next look asks the engine again. Between those,
# only a process a cell left running in the background changes files; so a "yes" (which stays
# true until a save or reset changes the key anyway) is trusted for a minute and a "no" for
# a few seconds. The check is the slow part of GET /runtimes/{id}: a docker diff walks the
# container's layer (half a second on a fresh container).
HAS_CHANGES_SECONDS = 60.0
NO_CHANGES_SECONDS = 5.0

Marks = dict[str, list[int] | None]  # path -> [size, mtime_ns, mode, ctime_ns] as the runtime sees it


@dataclass(frozen=True)
class ChangeInfo:
    kind: str
    path: str
    size: int | None  # bytes of a regular file; None for directories, links, deleted paths
    cache: str | None = None  # the cache directory it lies in: a save leaves it out


def _parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] or "/"


def is_file(mark: list[int] | None) -> bool:
    return mark is not None and len(mark) >= 3 and stat.S_ISREG(mark[2])


class Changes:
    def __init__(self, backend: RuntimeBackend, paths: RuntimePaths, caches: CacheRules | None = None) -> None:
        self.backend = backend
        self.paths = paths
        self.caches = caches
        self._diff_cache: dict[str, tuple[float, list[Change]]] = {}
        self._flags: dict[str, tuple[tuple[str, int, str], float, bool]] = {}  # runtime id -> (key, at, answer)

    def listing(self, rt: Runtime) -> list[ChangeInfo]:
        """Every unsaved change of the runtime: its draft's, then its running container's."""
        merged: dict[str, ChangeInfo] = {}
        for entry in rt.draft_changes or []:
            merged[entry["path"]] = ChangeInfo(entry["kind"], entry["path"], entry.get("size"))
        if rt.state == State.RUNNING:
            current, stats = self.current(rt.id, dict(rt.backend_state or {}), rt.change_baseline or {})
            for c in current:
                kind = c.kind
                earlier = merged.get(c.path)
                if earlier is not None and earlier.kind == "added" and kind != "deleted":
                    kind = "added"  # added before the draft, changed since: still new to the version
                mark = stats.get(c.path)
                merged[c.path] = ChangeInfo(kind, c.path, mark[0] if mark is not None and is_file(mark) else None)
        caches = self.caches
        if caches is not None:
            for path, info in merged.items():
                if info.kind != "deleted" and (cache := caches.cache_of(path)) is not None:
                    merged[path] = ChangeInfo(info.kind, info.path, info.size, cache)
        return sorted(merged.values(), key=lambda c: c.path)

    def current(
        self, runtime_id: str, state: dict[str, Any], baseline: dict[str, Any], *, fresh: bool = True
    ) -> tuple[list[Change], Marks]:
        """The container's changes, less those already in the version it was saved as.

        The rule is ``changed_since_save`` (shared with a save's layer): a path whose inode
        changed after the save's ``saved_at_ns`` is new since the save; a deletion is new when
        its directory changed after it. With no agent to ask (a container that exited), every
        change counts.
        """
        raw = self._raw(state, fresh=fresh)
        saved_at = int(baseline.get("saved_at_ns") or 0)
        wanted = [c.path for c in raw if c.kind != "deleted"]
        if saved_at:
            wanted += [_parent(c.path) for c in raw if c.kind == "deleted"]
        stats = self.stat(runtime_id, wanted) if wanted else {}
        if not saved_at:
            return raw, stats
        kept = []
        for c in raw:
            mark = stats.get(_parent(c.path) if c.kind == "deleted" else c.path)
            if mark is not None and len(mark) >= 4 and not changed_since_save(mark[3], saved_at):
                continue  # untouched since the save: part of the version now
            kept.append(c)
        return kept, stats

    def _raw(self, state: dict[str, Any], *, fresh: bool = True) -> list[Change]:
        """The engine's list of changes. Slow to make (Docker walks the container's layer),
        so the flag may use one a few seconds old; drafts, saves and the list ask anew."""
        key = str(state.get("container_id") or "")
        now = time.monotonic()
        hit = self._diff_cache.get(key)
        if not fresh and hit is not None and now - hit[0] < DIFF_CACHE_SECONDS:
            return hit[1]
        raw = self.backend.changes(state)
        self._diff_cache[key] = (now, raw)
        if len(self._diff_cache) > 256:
            self._diff_cache.pop(next(iter(self._diff_cache)))
        return raw

    def has_changes(self, rt: Runtime) -> bool | None:
        """Whether the runtime differs from its version; None when that cannot be known now."""
        if rt.draft_image_id:
            return True
        if rt.state != State.RUNNING:
            return False
        if rt.last_activity == "boot" and not rt.change_baseline:
            return False  # booted from its version and nothing has run in it since: no change
        state = dict(rt.backend_state or {})
        key = (
            str(state.get("container_id") or ""),
            int((rt.change_baseline or {}).get("saved_at_ns") or 0),
            rt.last_activity_at.isoformat() if rt.last_activity_at else "",
        )
        now = time.monotonic()
        known = self._flags.get(rt.id)
        fresh_for = HAS_CHANGES_SECONDS if known is not None and known[2] else NO_CHANGES_SECONDS
        if known is not None and known[0] == key and now - known[1] < fresh_for:
            return known[2]
        try:
            if not rt.change_baseline:
                answer = bool(self._raw(state, fresh=False))
            else:
                current, _ = self.current(rt.id, state, rt.change_baseline, fresh=False)
                answer = bool(current)
        except (EnvctlError, NotImplementedError):
            return None
        self._flags[rt.id] = (key, now, answer)
        if len(self._flags) > 1024:
            self._flags.pop(next(iter(self._flags)))
        return answer

    def stat(self, runtime_id: str, paths: list[str]) -> Marks:
        """[size, mtime_ns, mode, ctime_ns] of each path as the runtime sees it (None: gone);
        empty when the agent does not answer."""
        if not paths:
            return {}
        try:
            with AgentChannel(self.paths.agent(runtime_id), timeout=10) as channel:
                reply = channel.request("stat", paths=paths[:20000])
        except (AgentUnavailableError, EnvctlError):
            return {}
        return dict(reply.get("marks") or {})
