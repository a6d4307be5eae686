"""Drafts: the unsaved changes of a runtime, kept as an image across every stop but a reset.

- A stop (by hand or when idle) commits the container's changes to a draft image before the
  container goes; the next boot starts from the draft (phase ``restoring``).
- An unplanned exit (a crash, an OOM kill, an engine restart without live restore) is the
  same: reconciliation finds the exited container and keeps its changes as a draft before
  removing it (``rescue``). An exited container's filesystem is still in the engine.
- A reset throws the draft away (``discard_draft``).
- A draft is an image on top of the version with the trusted configuration (never the
  container's), labelled ``envctl.draft-of``. Each new draft replaces the previous one.
"""

from __future__ import annotations

import logging
from typing import Any

from envs.kit.config import Settings
from envs.kit.ids import new_id
from runner.backends.base import RuntimeBackend
from runner.changes import Changes, is_file
from runner.imageconfig import trusted_config
from runner.models import Runtime
from runner.records import Records

log = logging.getLogger("envctl.drafts")


class Drafts:
    def __init__(self, settings: Settings, records: Records, backend: RuntimeBackend, changes: Changes) -> None:
        self.settings = settings
        self.records = records
        self.backend = backend
        self.changes = changes

    def make_draft(self, runtime_id: str, *, reason: str = "stop", state: dict[str, Any] | None = None) -> str | None:
        """Commit the runtime's container changes to a draft image; None when nothing changed.

        ``state`` names the container when it is not (or no longer) the one on the row."""
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            if rt is None:
                return None
            state = dict(state if state is not None else rt.backend_state or {})
            version_ref, version_digest, version_image = rt.version.ref, rt.version.digest, rt.version.image_id
            old_draft = rt.draft_image_id
            old_changes = list(rt.draft_changes or [])
            baseline = dict(rt.change_baseline or {})
        try:
            current, stats = self.changes.current(runtime_id, state, baseline)
        except NotImplementedError:
            return None
        if not current:
            return None  # nothing since the version (or since the last save): it boots from the version
        labels = {
            "envctl.draft-of": runtime_id,
            "envctl.parent": version_ref,
            "org.opencontainers.image.base.digest": version_digest,
            **self.settings.runner_labels,  # the operator's own labels, e.g. a team
        }
        config = trusted_config(self.backend, version_image, version_ref, labels)
        image_id = self.backend.commit(
            state, config=config, repository="envctl-draft/" + runtime_id, tag=new_id("d")[2:]
        )
        merged = {c["path"]: c for c in old_changes}
        for c in current:
            mark = stats.get(c.path)
            merged[c.path] = {"kind": c.kind, "path": c.path, "size": mark[0] if mark and is_file(mark) else None}
        message = f"kept {len(current)} changed paths as a draft for the next boot"
        if reason != "stop":
            message = f"the container exited without being asked ({reason}); {message}"
        with self.records.tx() as s:
            self.records.set_in(
                s, runtime_id, draft_image_id=image_id, draft_changes=sorted(merged.values(), key=lambda c: c["path"])
            )
            self.records.log(
                s,
                runtime_id,
                event="draft-kept",
                reason=reason,
                message=message,
                details={"image_id": image_id, "changes": len(merged)},
            )
        if old_draft and old_draft != image_id:
            self.backend.remove_image(old_draft)  # the engine keeps it while the new draft needs it
        return image_id

    def discard_draft(self, runtime_id: str) -> None:
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            draft = rt.draft_image_id if rt is not None else None
        with self.records.tx() as s:
            self.records.set_in(s, runtime_id, draft_image_id=None, draft_changes=[])
            if draft:
                self.records.log(
                    s, runtime_id, event="draft-discarded", reason="reset", message="unsaved changes thrown away"
                )
        if draft:
            self.backend.remove_image(draft)
