"""Drafts: the unsaved changes of a runtime, kept as an image across every stop but a reset.

- A stop (by hand or when idle) commits the container's changes to a draft image before the
  container goes; the next boot starts from the draft (phase ``restoring``).
- An unplanned exit (a crash, an OOM kill, an engine restart without live restore) is the
  same: reconciliation finds the exited container and keeps its changes as a draft before
  removing it (``rescue``). An exited container's filesystem is still in the engine.
- A reset throws the draft away (``discard_draft``).
- A draft is an image on top of the version with the trusted configuration (never the
  container's), labelled ``envctl.draft-of``. Each new draft replaces the previous one.
- On the in-runtime save path (``runner/saves/insave.py``: the runtime may be on another node) a
  stop's draft is streamed by the agent and pushed to ``envctl-drafts/<runtime id>`` in the
  registry (``registry/drafts.py``), one layer on the version holding every change since it
  (the previous draft's paths are forced into the walk); the next boot, on whichever node,
  pulls it by digest (``ensure_local``; on Swarm the node itself, ``registry_image``). A replaced,
  reset, saved or deleted runtime's draft manifest is deleted. An exited container's agent is
  gone: its rescue stays an engine commit (none on Swarm). A Swarm task that the manager stops on
  its own (a drain) has an agent that waits after SIGTERM: reconciliation takes its draft then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from envs.kit.errors import BackendError, EnvctlError
from envs.kit.ids import new_id
from registry import drafts as registry_drafts
from registry import image_transfer as transfer
from runner.backends.base import RuntimeBackend
from runner.channel import AgentChannel, AgentUnavailableError
from runner.models import Runtime, RuntimeLogEntry
from runner.runtimes.store import Records
from runner.saves.changes import Changes, is_file
from runner.saves.imageconfig import trusted_config
from runner.saves.insave import InRuntimeSaves, Parent
from runner.saves.scans import SaveFilter
from runner.settings import Settings

log = logging.getLogger("envctl.drafts")


class KeepAll(SaveFilter):
    """A draft's observer: a draft is envctl's own, private, and keeps everything (caches, and
    what a save would refuse; the save made from it later is scanned as every save is)."""

    def __init__(self) -> None:
        super().__init__(None)

    def cache_of(self, path: str) -> str | None:
        return None

    def entry(self, path: str, link: str | None = None) -> None:
        return None

    def content(self, path: str, size: int) -> Callable[[bytes], None] | None:
        return None

    def verdict(self) -> None:
        return None


def draft_message(reason: str, kept: str, note: str = "") -> str:
    """A draft's runner log line: what was kept, and why then."""
    if reason == "checkpoint":
        return f"checkpoint: {kept} (a crash from now on loses only what changes after it)"
    if reason == "memory-pressure":
        return (
            f"memory pressure: {kept}, {note or 'taken near the memory limit'} "
            "(if the memory killer ends the runtime, this draft comes back at its next boot)"
        )
    if reason != "stop":
        return f"the container exited without being asked ({reason}); {kept}"
    return kept


def last_kept(s: Session, runtime_id: str) -> RuntimeLogEntry | None:
    """The runner log line of the runtime's latest draft."""
    q = select(RuntimeLogEntry).where(RuntimeLogEntry.runtime_id == runtime_id, RuntimeLogEntry.event == "draft-kept")
    return s.scalars(q.order_by(RuntimeLogEntry.id.desc()).limit(1)).first()


class Drafts:
    def __init__(self, settings: Settings, records: Records, backend: RuntimeBackend, changes: Changes) -> None:
        self.settings = settings
        self.records = records
        self.backend = backend
        self.changes = changes
        self.in_runtime: InRuntimeSaves | None = None  # set by the runner: drafts go to the registry

    @property
    def in_registry(self) -> bool:
        return self.in_runtime is not None and self.in_runtime.enabled

    def make_draft(
        self,
        runtime_id: str,
        *,
        reason: str = "stop",
        state: dict[str, Any] | None = None,
        note: str = "",
        execution: str | None = None,
    ) -> str | None:
        """Commit the runtime's container changes to a draft image; None when nothing changed.
        ``note`` and ``execution``: a memory-pressure draft's (``runner/runtimes/pressure.py``).

        ``state`` names the container when it is not (or no longer) the one on the row. A backend
        without an engine commit (Swarm) asks the agent even then: one that was sent SIGTERM
        (a drain, a service removed) waits for envctl to take its draft (``runner/agent/main.py``)."""
        if self.in_registry and (state is None or self.backend.images_from_registry):
            try:
                return self._registry_draft(runtime_id, reason, note, execution)
            except AgentUnavailableError as exc:  # the agent is gone: what the engine still has
                if self.backend.images_from_registry and state is not None:
                    log.warning("the agent of %s is gone (%s): its unsaved changes cannot be kept", runtime_id, exc)
                    return None  # no engine on this host holds the container
                log.warning("the agent of %s could not stream its draft (%s); committing it instead", runtime_id, exc)
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
        message = draft_message(reason, f"kept {len(current)} changed paths as a draft for the next boot", note)
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
                details={
                    "image_id": image_id,
                    "changes": len(merged),
                    **({"execution": execution} if execution else {}),
                },
            )
        if old_draft and old_draft != image_id:
            self.backend.remove_image(old_draft)  # the engine keeps it while the new draft needs it
        return image_id

    def _registry_draft(self, runtime_id: str, reason: str, note: str, execution: str | None) -> str | None:
        """The agent streams every change since the version into ``envctl-drafts/<id>``."""
        saves = self.in_runtime
        assert saves is not None
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            if rt is None:
                return None
            v = rt.version
            parent = Parent(v.id, v.ref, v.environment.full_name, v.registry_digest, int(v.size or 0))
            owner_id, old_draft = rt.owner_id, rt.draft_image_id
            forced = [str(c.get("path")) for c in (rt.draft_changes or []) if isinstance(c, dict) and c.get("path")]
        labels = {
            "envctl.draft-of": runtime_id,
            "envctl.parent": parent.ref,
            **self.settings.runner_labels,
        }
        made = saves.make(
            runtime_id,
            owner_id,
            repository=registry_drafts.repository(runtime_id),
            tag=None,
            parent=parent,
            labels=labels,
            observer=KeepAll(),
            keep_caches=True,
            forced=forced,
            save_token="",  # a draft is no version: the agent keeps judging against what it booted
            annotations={"envctl.draft-of": runtime_id},
        )
        image_id = made.config_digest
        changes = sorted(made.layer.changes, key=lambda c: str(c["path"]))
        files = sum(1 for c in changes if c["kind"] != "directory")
        if not made.layer.changes:
            registry_drafts.forget(self.settings, runtime_id, image_id)  # nothing changed: boot from the version
            if old_draft:
                self._forget(runtime_id, old_draft)
            with self.records.tx() as s:
                self.records.set_in(s, runtime_id, draft_image_id=None, draft_changes=[])
            return None
        message = draft_message(
            reason, f"kept {files} changed paths as a draft in the registry for the next boot", note
        )
        with self.records.tx() as s:
            self.records.set_in(s, runtime_id, draft_image_id=image_id, draft_changes=changes)
            self.records.log(
                s,
                runtime_id,
                event="draft-kept",
                reason=reason,
                message=message,
                details={
                    "image_id": image_id,
                    "repository": made.repository,
                    "manifest": made.manifest_digest,
                    "changes": len(changes),
                    "bytes": made.layer.tar_bytes,
                    **({"execution": execution} if execution else {}),
                },
            )
        if old_draft and old_draft != image_id:
            self._forget(runtime_id, old_draft)
        return image_id

    def _forget(self, runtime_id: str, image_id: str) -> None:
        """A draft that is no longer needed: its manifest in the registry, its image here."""
        if self.in_registry:
            registry_drafts.forget(self.settings, runtime_id, image_id)
        try:
            self.backend.remove_image(image_id)
        except BackendError as exc:  # still in use, or never here
            log.info("kept the draft image %s of %s: %s", image_id[:19], runtime_id, exc.message)

    def registry_image(self, runtime_id: str) -> str | None:
        """For a backend whose nodes pull images (Swarm): ``envctl-drafts/<id>@<manifest digest>``
        of the runtime's draft, which the node pulls with a pull-only token for that repository;
        None when it has no draft. A draft the registry lacks is a ``BackendError`` (the boot
        fails ``draft-unavailable``; a reset boots from the version)."""
        draft = self._draft_of(runtime_id)
        if not draft or not self.in_registry:
            return None
        digest = registry_drafts.manifest_digest(self.settings, runtime_id, draft)
        if digest is None:
            raise BackendError(
                f"the draft {draft[:19]} of {runtime_id} is not in the registry; "
                "reset the runtime to boot from its version (its unsaved changes are lost)",
                details={"draft": draft},
            )
        return f"{registry_drafts.repository(runtime_id)}@{digest}"

    def pressure_draft(self, runtime_id: str) -> tuple[str, bool] | None:
        """When the runtime's draft is a memory-pressure one (``runner/runtimes/pressure.py``):
        the cell that was paused for it, and whether it was taken in the runtime's current boot."""
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            entry = last_kept(s, runtime_id) if rt is not None and rt.draft_image_id else None
            if entry is None or entry.reason != "memory-pressure":
                return None
            this_boot = rt is not None and rt.booted_at is not None and entry.at >= rt.booted_at
            return str(entry.details.get("execution") or "?"), this_boot

    def has_draft(self, runtime_id: str) -> bool:
        """Whether the runtime's row names a draft (its next boot restores it)."""
        return bool(self._draft_of(runtime_id))

    def _draft_of(self, runtime_id: str) -> str | None:
        """The runtime's draft image id, if it has one."""
        with self.records.db.session() as s:
            rt = s.get(Runtime, runtime_id)
            return rt.draft_image_id if rt is not None else None

    def ensure_local(self, runtime_id: str) -> bool:
        """Before a boot that restores a draft: pull it from the registry by digest when the
        engine lacks it (a draft made on another node, or never on this one); True when it did."""
        if self.backend.images_from_registry:
            return False  # the node pulls it (``registry_image``), not this host's engine
        draft = self._draft_of(runtime_id)
        client = self.backend.engine_client()
        host = transfer.registry_host(self.settings)
        if not draft or not self.in_registry or client is None or host is None:
            return False
        if transfer.has_image(client, draft):
            return False
        digest = registry_drafts.manifest_digest(self.settings, runtime_id, draft)
        if digest is None:
            raise BackendError(
                f"the draft {draft[:19]} of {runtime_id} is in neither the engine nor the registry; "
                "reset the runtime to boot from its version (its unsaved changes are lost)",
                details={"draft": draft},
            )
        target = transfer.Target(host, registry_drafts.repository(runtime_id))
        auth = registry_drafts.pull_auth(self.settings, host, runtime_id)
        transfer.pull(client, target, digest, auth, transfer.Progress(), image_id=draft)
        with self.records.tx() as s:
            self.records.log(
                s,
                runtime_id,
                event="draft-downloaded",
                reason="draft",
                message=f"pulled the draft from {target.name}",
                details={"manifest": digest, "image_id": draft},
            )
        return True

    def release_agent(self, state: dict[str, Any]) -> None:
        """envctl is about to stop the runtime of ``state`` itself (its draft taken, or a reset
        or delete): tell its agent, whose SIGTERM then ends it at once instead of waiting for a
        draft (``runner/agent/main.py``, ``terminate``). An agent that does not answer is left be."""
        runtime_id = str(state.get("container_name") or "").removeprefix("envctl-")
        if not runtime_id or self.in_runtime is None:
            return
        try:
            with AgentChannel(self.in_runtime.agent(runtime_id), timeout=3) as channel:
                channel.request("release")
        except (EnvctlError, OSError) as exc:
            log.info("could not tell the agent of %s that envctl stops it: %s", runtime_id, exc)

    def wait_index(self, target: Any, deadline: float) -> float:
        """At a boot on the in-runtime path, before ``running``: wait until the agent has indexed
        what the runtime booted from (``runner/agent/layer.py``), else a deletion made before it
        finished would be missed by the next save or draft. The seconds waited."""
        began = time.monotonic()
        wait = max(1.0, deadline - began)
        with AgentChannel(target, timeout=wait + 5) as channel:
            answer = channel.request("layer", action="ready", wait=wait)
        if not answer.get("ready"):
            raise AgentUnavailableError(
                f"the agent had not indexed the runtime's filesystem after {wait:.0f} s: "
                f"{answer.get('error') or 'still walking'}"
            )
        return time.monotonic() - began

    def forget_all(self, runtime_id: str) -> None:
        """The runtime was deleted: its drafts in the registry go too."""
        if self.in_registry:
            registry_drafts.forget_all(self.settings, runtime_id)

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
            if self.in_registry:
                registry_drafts.forget(self.settings, runtime_id, draft)
            self.backend.remove_image(draft)
