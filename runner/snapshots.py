"""Saves, drafts and unsaved changes: a runtime's filesystem becoming images.

- **Save**: the running container's filesystem is committed on top of the image it booted from,
  with an image configuration made from a trusted template (the parent version's own config
  plus envctl's labels and OCI annotations), never the container's. The new image becomes the
  next version of an environment whose parent is the version the runtime booted from.
  Mounts, ``/results`` and envctl's own files are bind mounts, so no layer ever holds them.
- **Draft**: when a runtime with unsaved changes stops (by hand or when idle), its filesystem is
  committed the same way to a draft image; the next boot starts from the draft (shown as the
  ``restoring`` phase), so nothing installed in a cell is lost. ``reset`` discards it.
- **Changes**: what differs from the booted version: the draft's changes, then the running
  container's, with sizes, without envctl's private paths.
- Long chains of saves are compacted (squashed into one layer) before the storage driver's
  layer limit; the lineage stays complete in the database.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from envs import service as envs_service
from envs.kit.errors import BackendError, ConflictError, EnvctlError, InvalidInputError
from envs.kit.ids import new_id
from envs.models import EnvironmentVersion
from envs.refs import _TAG_RE, check_name
from registry.models import User
from runner.backends.base import Change
from runner.channel import AgentChannel, AgentUnavailableError
from runner.models import Operation, Runtime
from runner.states import State

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from runner.service import RunnerService

log = logging.getLogger("envctl.snapshots")

# overlay2 refuses images of more than 128 layers; compact well before that.
COMPACT_AT_LAYERS = 100
MAX_MESSAGE = 2000
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")


@dataclass(frozen=True)
class ChangeInfo:
    kind: str
    path: str
    size: int | None  # bytes of a regular file; None for directories, links, deleted paths


def _oci_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


DIFF_CACHE_SECONDS = 3.0
# A runtime found to have unsaved changes keeps them until it is saved or reset (both change
# what the answer is keyed on), short of someone deleting by hand what they made; so a "yes",
# whose check is the slow one (a long list to diff and stat), is trusted this long.
HAS_CHANGES_SECONDS = 60.0


def _parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] or "/"


def _is_file(mark: list[int]) -> bool:
    return len(mark) >= 3 and stat.S_ISREG(mark[2])


def writer_of(session: Session, user_id: str) -> envs_service.Writer:
    """The user ``user_id`` as a writer of environments: admins may write to any."""
    user = session.get(User, user_id)
    return envs_service.Writer(user_id, bool(user is not None and user.is_admin))


SAVE_ACTION = ("save into it", "save under a name of your own")


class Snapshots:
    def __init__(self, runner: RunnerService) -> None:
        self.runner = runner
        self.backend = runner.backend
        self._saving: set[str] = set()
        self._lock = threading.Lock()
        self._diff_cache: dict[str, tuple[float, list[Change]]] = {}
        self._flags: dict[str, tuple[tuple[str, int], float, bool]] = {}  # runtime id -> (key, at, answer)

    # ------------------------------------------------------------------ status
    def is_saving(self, runtime_id: str) -> bool:
        with self._lock:
            return runtime_id in self._saving

    # ------------------------------------------------------------------ templates
    def template(self, parent_image: str, parent_ref: str, labels: dict[str, str]) -> dict[str, Any]:
        """The trusted image configuration for a child of the version ``parent_ref``."""
        info = self.backend.image_info(parent_image)
        if info is None:
            raise BackendError(
                f"the image of {parent_ref} ({parent_image[:19]}) is not in the container engine",
                details={"version": parent_ref},
            )
        base = info.config
        config: dict[str, Any] = {key: base.get(key) for key in CONFIG_KEYS}
        # The parent's own labels carry over (a base image's OCI labels, a team's labels), but
        # not envctl's: those say what an image *is* (a base image of a recipe, a draft, a
        # version) and belong to the parent alone.
        # The engine merges the container's labels (its image's) back into a commit, so those of
        # envctl's are given empty values here rather than just left out.
        parent_labels = base.get("Labels") or {}
        inherited = {k: v for k, v in parent_labels.items() if not k.startswith("envctl.")}
        neutral = {k: "" for k in parent_labels if k.startswith("envctl.")}
        config["Labels"] = {**inherited, **neutral, **labels}
        return config

    # ------------------------------------------------------------------ changes
    def changes(self, owner_id: str, runtime_id: str) -> list[ChangeInfo]:
        rt = self.runner.get(owner_id, runtime_id)
        merged: dict[str, ChangeInfo] = {}
        for entry in rt.draft_changes or []:
            merged[entry["path"]] = ChangeInfo(entry["kind"], entry["path"], entry.get("size"))
        if rt.state == State.RUNNING:
            current, stats = self._current(runtime_id, dict(rt.backend_state or {}), rt.change_baseline or {})
            sizes = {p: s[0] for p, s in stats.items() if s is not None}
            for c in current:
                kind = c.kind
                earlier = merged.get(c.path)
                if earlier is not None and earlier.kind == "added" and kind != "deleted":
                    kind = "added"  # added before the draft, changed since: still new to the version
                mark = stats.get(c.path)
                size = sizes.get(c.path) if mark and _is_file(mark) else None
                merged[c.path] = ChangeInfo(kind, c.path, size)
        return sorted(merged.values(), key=lambda c: c.path)

    def _current(
        self, runtime_id: str, state: dict[str, Any], baseline: dict[str, Any], *, fresh: bool = True
    ) -> tuple[list[Change], dict[str, list[int] | None]]:
        """The container's changes, less those already in the version it was saved as.

        A save records when its snapshot was taken (``saved_at_ns``). A path whose inode
        changed after that (its ctime, which no program can set back) is new since the save;
        a deletion is new when its directory changed after it. A change made in the instant
        before the snapshot may be counted again: shown twice, never lost.
        """
        raw = self._raw_changes(state, fresh=fresh)
        saved_at = int(baseline.get("saved_at_ns") or 0)
        wanted = [c.path for c in raw if c.kind != "deleted"]
        if saved_at:
            wanted += [_parent(c.path) for c in raw if c.kind == "deleted"]
        stats = self._stat(runtime_id, wanted) if wanted else {}
        if not saved_at:
            return raw, stats
        kept = []
        for c in raw:
            mark = stats.get(_parent(c.path) if c.kind == "deleted" else c.path)
            if mark is not None and len(mark) >= 4 and mark[3] <= saved_at:
                continue  # untouched since the save: part of the version now
            kept.append(c)
        return kept, stats

    def _raw_changes(self, state: dict[str, Any], *, fresh: bool = True) -> list[Change]:
        """The engine's list of changes. Slow to make (Docker walks the container's layer),
        so the "unsaved changes" flag that pages poll for may use one a few seconds old;
        drafts, saves and the changes list always ask anew."""
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

    def forget_changes(self, state: dict[str, Any]) -> None:
        self._diff_cache.pop(str(state.get("container_id") or ""), None)

    def has_changes(self, rt: Runtime) -> bool | None:
        """Whether the runtime differs from its version; None when that cannot be known now."""
        if rt.draft_image_id:
            return True
        if rt.state != State.RUNNING:
            return False
        state = dict(rt.backend_state or {})
        key = (str(state.get("container_id") or ""), int((rt.change_baseline or {}).get("saved_at_ns") or 0))
        now = time.monotonic()
        known = self._flags.get(rt.id)
        if known is not None and known[0] == key and now - known[1] < (HAS_CHANGES_SECONDS if known[2] else 0):
            return True
        try:
            if not rt.change_baseline:
                answer = bool(self._raw_changes(state, fresh=False))
            else:
                current, _ = self._current(rt.id, state, rt.change_baseline, fresh=False)
                answer = bool(current)
        except (EnvctlError, NotImplementedError):
            return None
        self._flags[rt.id] = (key, now, answer)
        if len(self._flags) > 1024:
            self._flags.pop(next(iter(self._flags)))
        return answer

    def _stat(self, runtime_id: str, paths: list[str]) -> dict[str, list[int] | None]:
        """[size, mtime_ns, mode] of each path, as the runtime sees it (None: gone)."""
        if not paths:
            return {}
        try:
            with AgentChannel(self.runner.executions._socket(runtime_id), timeout=10) as channel:
                reply = channel.request("stat", paths=paths[:20000])
        except (AgentUnavailableError, EnvctlError):
            return {}
        return dict(reply.get("marks") or {})

    # ------------------------------------------------------------------ save
    def save(
        self,
        owner_id: str,
        author: str,
        runtime_id: str,
        *,
        environment: str,
        message: str = "",
        tag: str | None = None,
    ) -> Operation:
        full = environment  # not stripped: "tools\n" is refused, as everywhere else
        team, _, name = full.rpartition("/")
        if team:
            check_name(team, "environment", "team")
        check_name(name, "environment", "environment name")
        if len(message) > MAX_MESSAGE:
            raise InvalidInputError(f"message: at most {MAX_MESSAGE} characters", field="message")
        if tag is not None and not _TAG_RE.match(tag):
            raise InvalidInputError(f"tag: {tag[:80]!r} is not a valid tag", field="tag")
        claimed = False
        try:
            # one transaction: the runtime (404 if not the caller's), the 403 (before any
            # operation or commit), the state, the operation and the log line
            with self.runner._tx() as s:
                rt = self.runner._get(s, owner_id, runtime_id, with_version=False)
                envs_service.check_write(envs_service.get_environment(s, full), writer_of(s, owner_id), *SAVE_ACTION)
                if rt.state != State.RUNNING:
                    raise ConflictError(
                        f"only a running runtime can be saved; it is {rt.state}"
                        + (" (start it: its unsaved changes come back with it)" if rt.draft_image_id else ""),
                        details={"state": rt.state},
                    )
                with self._lock:
                    if runtime_id in self._saving:
                        raise ConflictError("a save of this runtime is already in progress")
                    self._saving.add(runtime_id)
                    claimed = True
                # A save is activity, recorded only while the runtime still runs. An idle stop
                # decided a moment ago (before the flag above) then either finds this new
                # activity and does not happen, or has happened and this save is refused.
                touched = s.execute(
                    update(Runtime)
                    .where(Runtime.id == runtime_id, Runtime.state == State.RUNNING)
                    .values(last_activity_at=self.runner.clock(), last_activity="save started")
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                if touched != 1:
                    raise ConflictError(
                        "the runtime stopped as the save was asked for; start it and save again "
                        "(its unsaved changes come back with it)"
                    )
                op = self.runner.operations.create(
                    owner_id, "save", f"saving {rt.name} as {full}", runtime_id=runtime_id, session=s
                )
                self.runner._log(
                    s, runtime_id, event="save-started", reason="user-request", message=f"saving as {full}"
                )
            self.runner._submit_plain(self._save, op.id, owner_id, author, runtime_id, full, message, tag)
        except BaseException:
            if claimed:
                with self._lock:
                    self._saving.discard(runtime_id)
            raise
        return op

    def _save(
        self, op_id: str, owner_id: str, author: str, runtime_id: str, environment: str, message: str, tag: str | None
    ) -> None:
        version: EnvironmentVersion | None = None
        error: Exception | None = None
        try:
            version = self.save_now(op_id, owner_id, author, runtime_id, environment, message, tag)
        except Exception as exc:
            error = exc
        finally:
            try:
                # activity first, then "no longer saving": idle shutdown never sees a runtime
                # that is neither saving nor freshly active (R20). Both before the operation
                # ends: whoever sees it end may save again at once.
                self.runner.touch(runtime_id, "save finished")
            finally:
                with self._lock:
                    self._saving.discard(runtime_id)
        # the runtime's log line first, then the operation's end (which wakes its waiters)
        if error is not None or version is None:
            self.runner.operations.discard_pending(op_id)
            problem, text = self.runner.operations.failure(
                op_id, error or BackendError("the save made no version"), "save"
            )
            with self.runner._tx() as s:
                self.runner._log(s, runtime_id, event="save-failed", reason="error", message=text)
            self.runner.operations.finish(op_id, "failed", error=problem, message=text)
        else:
            with self.runner._tx() as s:
                self.runner._log(
                    s,
                    runtime_id,
                    event="saved",
                    reason="user-request",
                    message=f"saved as {version.ref}",
                    details={"version": version.ref},
                )
            self.runner.operations.finish(
                op_id,
                "succeeded",
                result={"version": version.ref, "digest": version.digest, "image_id": version.image_id},
                message=f"saved as {version.ref}",
            )

    def save_now(
        self,
        op_id: str,
        owner_id: str,
        author: str,
        runtime_id: str,
        environment: str,
        message: str,
        tag: str | None,
        *,
        extra_env: dict[str, str] | None = None,
        extra_labels: dict[str, str] | None = None,
    ) -> EnvironmentVersion:
        with self.runner.db.session() as s:
            rt = self.runner._get(s, owner_id, runtime_id)
            parent = rt.version
            parent_id, parent_image = parent.id, parent.image_id
            parent_ref, parent_digest = parent.ref, parent.digest
            state = dict(rt.backend_state or {})
            number = envs_service.next_number(s, environment)
        now = self.runner.clock()
        labels = {
            "org.opencontainers.image.created": _oci_time(now),
            "org.opencontainers.image.base.digest": parent_digest,
            "org.opencontainers.image.base.name": parent_ref,
            "org.opencontainers.image.title": environment,
            "org.opencontainers.image.version": str(number),
            "envctl.environment": environment,
            "envctl.parent": parent_ref,
            "envctl.source-runtime": runtime_id,
            "envctl.author": author,
            # the container's own envctl labels, neutralised: a saved image is no runtime
            "envctl.runtime-id": "",
            "envctl.runner": "",
            "envctl.managed": "",
            "envctl.machine-type": "",
        }
        labels.update(self.runner.settings.runner_labels)  # the operator's own labels, e.g. a team
        labels.update(extra_labels or {})
        config = self.template(parent_image, parent_ref, labels)
        if extra_env:
            kept = [e for e in config.get("Env") or [] if e.split("=", 1)[0] not in extra_env]
            config["Env"] = kept + [f"{k}={v}" for k, v in extra_env.items()]
        repository = "envctl/" + environment
        image_tag = f"v{number}-{op_id[3:11]}"
        # What the save makes is noted before and after it is made: if envctl dies before the
        # version is recorded, the next start removes it (Operations.recover); a failed save
        # removes it at once (_save).
        pending = [f"{repository}:{image_tag}"]
        self.runner.operations.phase(op_id, "committing", "snapshotting the filesystem", pending_images=pending)
        baseline = {"saved_at_ns": time.time_ns()}  # taken before the commit pauses the container
        image_id = self.backend.commit(state, config=config, repository=repository, tag=image_tag)
        pending.append(image_id)
        self.runner.operations.phase(op_id, "recording", "recording the new version", pending_images=pending)
        info = self.backend.image_info(image_id)
        parent_info = self.backend.image_info(parent_image)
        if info is None:
            raise BackendError("the saved image vanished before it was recorded")
        if info.layers > COMPACT_AT_LAYERS:
            self.runner.operations.phase(op_id, "compacting", f"{info.layers} layers: squashing the chain into one")
            squashed = self.backend.squash(image_id, config=config, repository=repository, tag=image_tag)
            pending.append(squashed)
            self.runner.operations.phase(op_id, "recording", "recording the new version", pending_images=pending)
            self.backend.remove_image(image_id)
            image_id = squashed
            info = self.backend.image_info(image_id) or info
        with self.runner.db.session() as s:
            parent_row = s.get(EnvironmentVersion, parent_id)
            version, _created = envs_service.register_version(
                s,
                envs_service.NewVersion(
                    environment=environment,
                    image_id=image_id,
                    image_ref=f"{repository}:{image_tag}",
                    parent=parent_row,
                    message=message,
                    author=author,
                    size=info.size,
                    size_added=max(0, info.size - (parent_info.size if parent_info else 0)),
                    source_runtime_id=runtime_id,
                    labels=labels,
                    tag="latest",
                ),
                writer_of(s, owner_id),  # the one check that counts: in the transaction that records
            )
            if tag and tag != "latest":
                envs_service.set_tag(s, version.environment, tag, version)
            # The runtime now stands on what it saved: it is pinned to the new version, and what
            # its container differs by so far is part of that version, not unsaved changes.
            s.execute(
                update(Runtime)
                .where(Runtime.id == runtime_id)
                .values(
                    version_id=version.id,
                    environment_ref=version.ref,
                    draft_image_id=None,
                    draft_changes=[],
                    change_baseline=baseline,
                )
            )
            s.flush()
            _ = version.ref  # load what the caller reads after the session
            _ = version.environment.full_name
        return version

    # ------------------------------------------------------------------ drafts
    def make_draft(self, runtime_id: str) -> str | None:
        """Commit a stopping runtime's changes to a draft image; None when nothing changed."""
        with self.runner.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            if rt is None:
                return None
            state = dict(rt.backend_state or {})
            version_ref, version_digest, version_image = rt.version.ref, rt.version.digest, rt.version.image_id
            old_draft = rt.draft_image_id
            old_changes = list(rt.draft_changes or [])
            baseline = dict(rt.change_baseline or {})
        try:
            current, stats = self._current(runtime_id, state, baseline)
        except NotImplementedError:
            return None
        if not current:
            return None  # nothing since the version (or since the last save): it boots from the version
        sizes = {p: (m[0] if m and _is_file(m) else None) for p, m in stats.items()}
        labels = {
            "envctl.draft-of": runtime_id,
            "envctl.parent": version_ref,
            "org.opencontainers.image.base.digest": version_digest,
            "envctl.runtime-id": "",
            "envctl.runner": "",
            "envctl.managed": "",
            "envctl.machine-type": "",
        }
        labels.update(self.runner.settings.runner_labels)  # the operator's own labels, e.g. a team
        config = self.template(version_image, version_ref, labels)
        image_id = self.backend.commit(
            state, config=config, repository="envctl-draft/" + runtime_id, tag=new_id("d")[2:]
        )
        merged = {c["path"]: c for c in old_changes}
        for c in current:
            merged[c.path] = {"kind": c.kind, "path": c.path, "size": sizes.get(c.path)}
        with self.runner._tx() as s:
            s.execute(
                update(Runtime)
                .where(Runtime.id == runtime_id)
                .values(draft_image_id=image_id, draft_changes=sorted(merged.values(), key=lambda c: c["path"]))
            )
            self.runner._log(
                s,
                runtime_id,
                event="draft-kept",
                reason="stop",
                message=f"kept {len(current)} changed paths as a draft for the next boot",
                details={"image_id": image_id, "changes": len(merged)},
            )
        if old_draft and old_draft != image_id:
            self.backend.remove_image(old_draft)  # the engine keeps it while the new draft needs it
        return image_id

    def discard_draft(self, runtime_id: str) -> None:
        with self.runner.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            draft = rt.draft_image_id if rt is not None else None
        with self.runner._tx() as s:
            s.execute(update(Runtime).where(Runtime.id == runtime_id).values(draft_image_id=None, draft_changes=[]))
            if draft:
                self.runner._log(
                    s, runtime_id, event="draft-discarded", reason="reset", message="unsaved changes thrown away"
                )
        if draft:
            self.backend.remove_image(draft)
