"""The installation's watches (``kube_watch.Reflector`` each): its pods, their events, the
cluster's nodes; and the routing of its pods' events into their runtimes' runner logs.

Split out of ``kube.py``: the backend makes one :class:`Watches` per installation and one
:class:`EventRouter` for all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from envs.kit.errors import BackendError
from runner.backends import kube_pods, kube_states
from runner.backends.base import LABEL_INSTALLATION, LABEL_MANAGED, LABEL_RUNTIME
from runner.backends.kube_api import KubeApi
from runner.backends.kube_watch import Reflector

SYNC_WAIT = 10.0  # seconds a caller waits for the watch's first listing

Report = Callable[[str, str, str], None]
OnChange = Callable[[str, dict[str, Any]], None]


class Watches:
    """The installation's reflectors: its pods, their events, the cluster's nodes."""

    def __init__(self, api: KubeApi, installation: str, report: OnChange, on_pod: OnChange) -> None:
        sel = kube_pods.selector({LABEL_INSTALLATION: kube_pods.label_value(installation), LABEL_MANAGED: "1"})
        self.pods = Reflector("pods", api.core.list_namespaced_pod, api.namespace, label_selector=sel, on_change=on_pod)
        self.events = Reflector(
            "events",
            api.core.list_namespaced_event,
            api.namespace,
            field_selector="involvedObject.kind=Pod",
            keep=lambda e: str((e.get("involvedObject") or {}).get("name") or "").startswith("envctl-"),
            on_change=report,
        )
        self.nodes = Reflector("nodes", api.core.list_node)
        for r in (self.pods, self.events, self.nodes):
            r.start()

    def events_of(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        uid = (pod.get("metadata") or {}).get("uid")
        try:
            events = self.events.items()
        except BackendError:
            return []
        found = [e for e in events.values() if (e.get("involvedObject") or {}).get("uid") == uid]
        return sorted(found, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))

    def node_map(self) -> tuple[dict[str, dict[str, Any]], bool]:
        try:
            return self.nodes.items(), True
        except BackendError:
            return {}, False  # nodes not readable (RBAC): node loss shows only on the pods

    def stop(self) -> None:
        for r in (self.pods, self.events, self.nodes):
            r.stop()


class EventRouter:
    """Events of the installation's pods into their runtimes' runner logs (``report()``: the
    backend's ``report_event``, set after the backend is made). An event may come before its pod
    is in the cache (two watches): it waits there for the pod (:meth:`on_pod`)."""

    def __init__(self, report: Callable[[], Report | None], watches: Callable[[], list[Watches]]) -> None:
        self.report = report
        self.watches = watches
        self._lock = threading.Lock()
        self._unmatched: dict[str, list[tuple[str, str]]] = {}  # pod uid -> events seen before the pod

    def on_event(self, kind: str, event: dict[str, Any]) -> None:
        if kind != "ADDED" or self.report() is None:
            return
        line = kube_states.log_line(event)
        if line is None:
            return
        involved = event.get("involvedObject") or {}
        name, uid = str(involved.get("name") or ""), str(involved.get("uid") or "")
        for w in self.watches():
            pod = w.pods.get(name)
            if pod is not None and str((pod.get("metadata") or {}).get("uid")) == uid:
                self._send(pod, line)
                return
        with self._lock:
            waiting = self._unmatched.setdefault(uid, [])
            if len(self._unmatched) < 1000 and len(waiting) < 50:
                waiting.append(line)

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = str((pod.get("metadata") or {}).get("uid") or "")
        with self._lock:
            lines = self._unmatched.pop(uid, [])
            if kind == "DELETED" or len(self._unmatched) > 500:
                self._unmatched.clear()
        for line in lines:
            self._send(pod, line)

    def _send(self, pod: dict[str, Any], line: tuple[str, str]) -> None:
        rid = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_RUNTIME)
        report = self.report()
        if rid and report is not None:
            report(str(rid), line[0], line[1])
