"""Building a spec file: the path a person takes by hand, automated.

A temporary runtime boots from the parent, runs each step as a cell (outputs stored like any
execution, so the build log can be followed live), and is saved; then it is deleted. The same
spec on the same parent digest reuses the version it made before (a cache hit), recorded on
the version as the label ``envctl.spec-digest``.

Building into an environment is writing to it: only its owner or an admin may (403 before the
build runtime boots); a new name becomes the builder's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from envs import service as envs_service
from envs.kit.errors import EnvctlError
from envs.models import EnvironmentVersion
from envs.spec import Spec, parse
from registry import visibility
from runner.cells.executions import ExecutionManager
from runner.errors import BuildStepFailedError
from runner.models import Operation
from runner.operations import Operations
from runner.runtimes.lifecycle import Lifecycle
from runner.runtimes.settings import Runtimes
from runner.runtimes.states import State
from runner.runtimes.store import Records, Viewer, Who, viewer_of
from runner.saves.snapshots import Snapshots, writer_of
from runner.settings import Settings

log = logging.getLogger("envctl.builds")


class Builds:
    def __init__(
        self,
        settings: Settings,
        records: Records,
        runtimes: Runtimes,
        lifecycle: Lifecycle,
        executions: ExecutionManager,
        snapshots: Snapshots,
        operations: Operations,
        *,
        submit: Callable[..., Any],
    ) -> None:
        self.settings = settings
        self.records = records
        self.runtimes = runtimes
        self.lifecycle = lifecycle
        self.executions = executions
        self.snapshots = snapshots
        self.operations = operations
        self.submit = submit

    def build(self, who: Who, author: str, text: str, source: str = "<spec>") -> Operation:
        """Check the spec now (422 on any problem), then build it in the background (202).

        ``extends`` is resolved for ``who`` (``registry/visibility.py``): another team's version
        that is not published is a 404 naming ``extends``, before anything boots or is saved."""
        spec = parse(text, source)
        viewer = viewer_of(who)
        owner_id = viewer.user_id
        with self.records.db.session() as s:
            envs_service.check_write_to(
                s,
                spec.name,
                writer_of(s, owner_id),
                "build into it",
                "give the spec a name of your own",
            )
            parent = visibility.resolve(s, spec.extends, viewer.reader, "extends")
            parent_ref, parent_digest = parent.ref, parent.digest
            digest = spec.digest(parent_digest)
            cached = self._cached(s, spec.name, digest)
        operations = self.operations
        if cached is not None:
            return operations.create(
                owner_id,
                "build",
                f"reused {cached}: the same spec was built on {parent_ref} before",
                result={"spec_digest": digest, "version": cached, "cached": True, "steps": []},
                finished=True,
            )
        op = operations.create(
            owner_id, "build", f"building {spec.name} on {parent_ref}", result={"spec_digest": digest, "steps": []}
        )
        self.submit(self._build, op.id, viewer, author, spec, parent_ref, digest)
        return op

    @staticmethod
    def _cached(s: Any, name: str, digest: str) -> str | None:
        env = envs_service.get_environment(s, name)
        if env is None:
            return None
        for v in env.versions:
            if (v.labels or {}).get("envctl.spec-digest") == digest:
                return v.ref
        return None

    def _build(self, op_id: str, viewer: Viewer, author: str, spec: Spec, parent_ref: str, digest: str) -> None:
        owner_id = viewer.user_id
        rid = None
        steps: list[dict[str, Any]] = []
        try:
            rt = self.runtimes.create(
                viewer, name=f"build-{op_id[3:15]}", environment=parent_ref, language="bash", idle_timeout=0
            )
            rid = rt.id
            self._update(op_id, phase="booting", message=f"booting {parent_ref}", runtime_id=rid)
            self.lifecycle.start(owner_id, rid)
            booted = self.records.wait_for(rid, {State.RUNNING, State.ERROR}, self.settings.runner_boot_timeout + 15)
            if booted.state != State.RUNNING:
                raise BuildStepFailedError(f"the build runtime did not boot: {booted.state_message}")
            for n, step in enumerate(spec.steps, 1):
                cell = step.cell()
                label = f"step {n}/{len(spec.steps)}: {step.kind}"
                if cell is None:
                    steps.append({"step": n, "kind": step.kind, "line": step.line, "status": "ok"})
                    self._update(op_id, phase="running", message=label, steps=steps)
                    continue
                language, code = cell
                ex = self.executions.submit(owner_id, rid, code=code, language=language)
                steps.append(
                    {"step": n, "kind": step.kind, "line": step.line, "execution_id": ex.id, "status": "running"}
                )
                self._update(op_id, phase="running", message=label, steps=steps)
                while True:
                    self.executions.wait(ex.id, 5)
                    view = self.executions.get(owner_id, ex.id)
                    if view.status in ("ok", "error", "interrupted"):
                        break
                steps[-1]["status"] = view.status
                steps[-1]["log"] = _log_text(self.executions.outputs(ex.id))
                if view.status != "ok":
                    self._update(op_id, steps=steps)
                    raise BuildStepFailedError(
                        f"{spec.source}:{step.line}: steps[{n}].{step.kind}: the step failed"
                        + (f" ({view.error_name}: {view.error_value})" if view.error_name else ""),
                        details={"step": n, "line": step.line, "execution_id": ex.id},
                    )
            self._update(op_id, phase="saving", message="saving the new version", steps=steps)
            version: EnvironmentVersion = self.snapshots.save_now(
                op_id,
                owner_id,
                author,
                rid,
                spec.name,
                spec.message or f"built from {spec.source}",
                None,
                extra_env=spec.env,
                extra_labels={"envctl.spec-digest": digest},
            )
            built: tuple[str, str] | Exception = (version.ref, version.digest)
        except Exception as exc:
            self.operations.discard_pending(op_id)  # a snapshot made but not recorded
            built = exc
        finally:
            # The build runtime goes before the operation ends: whoever sees the build end may
            # at once delete the version, which that runtime would still be pinned to.
            if rid is not None:
                try:
                    self.lifecycle.delete(owner_id, rid)
                except EnvctlError as exc:
                    log.warning("could not remove build runtime %s: %s", rid, exc.message)
        if isinstance(built, Exception):
            self.operations.fail(op_id, built, "build", result={"spec_digest": digest, "steps": steps})
            return
        ref, version_digest = built
        self.operations.finish(
            op_id,
            "succeeded",
            result={"spec_digest": digest, "version": ref, "cached": False, "steps": steps, "digest": version_digest},
            message=f"built {ref}",
        )

    def _update(self, op_id: str, **values: Any) -> None:
        steps = values.pop("steps", None)
        self.operations.update(op_id, steps=[dict(s) for s in steps] if steps is not None else None, **values)


def _log_text(outputs: list[tuple[int, dict[str, Any]]], limit: int = 64 * 1024) -> str:
    """A step's output as text for the build log (the build runtime and its cells go away)."""
    parts = []
    for _, out in outputs:
        if out.get("output_type") == "stream":
            parts.append(str(out.get("text", "")))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}\n")
    text = "".join(parts)
    return text if len(text) <= limit else "[...]\n" + text[-limit:]
