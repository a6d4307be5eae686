"""The Kubernetes API as the backend uses it: the official client, configured from a kubeconfig
or a pod's in-cluster credentials, each call taking and giving the API's JSON (dicts), and its
failures translated into ``BackendError`` that keeps the API's own message."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any

from envs.kit.errors import BackendError, ConflictError, InvalidInputError

Obj = dict[str, Any]


def kube_error(action: str, exc: BaseException) -> BackendError:
    """``exc`` from the client while trying to ``action``, with the API's message."""
    if isinstance(exc, BackendError):
        return exc
    status = getattr(exc, "status", None)
    message = str(exc)[:300]
    body = getattr(exc, "body", None)
    if body:
        try:
            message = str(json.loads(body).get("message") or message)
        except (ValueError, AttributeError):
            message = str(body)[:300]
    where = f" (HTTP {status})" if status else " (the API server does not answer)"
    return BackendError(
        f"Kubernetes could not {action}{where}: {message}",
        details={"action": action, "status": status, "cause": message[:500]},
    )


class KubeApi:
    """The calls the backend makes, in one namespace (nodes are cluster-wide)."""

    def __init__(self, config: str, context: str, namespace: str, timeout: float = 30.0) -> None:
        from kubernetes import client  # noqa: PLC0415  (only a kubernetes backend needs the client)
        from kubernetes import config as kconfig  # noqa: PLC0415

        cfg = client.Configuration()
        try:
            path = config
            if config == "in-cluster":
                kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                path = config or os.environ.get("KUBECONFIG", "") or os.path.expanduser("~/.kube/config")
                kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=path, context=context or None, client_configuration=cfg
                )
        except Exception as exc:
            raise InvalidInputError(
                f"the kubernetes backend cannot load its cluster credentials ({config or 'KUBECONFIG'}): {exc}; set "
                "ENVCTL_KUBE_CONFIG to a kubeconfig file, or to in-cluster inside a pod",
                field="kube_config",
            ) from exc
        self.namespace = namespace
        # what was loaded: a Bash-only attach's shell relay loads the same again (kube_shell)
        self.config = config if config == "in-cluster" else path
        self.context = context
        self.timeout = timeout
        self.client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.client)
        self.net = client.NetworkingV1Api(self.client)
        self.host = str(cfg.host)
        self._cfg = cfg
        self._exec_lock = threading.Lock()
        self._exec_core: Any = None  # a client of its own: the stream helper swaps its request method

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]
        if self._exec_core is not None:
            self._exec_core.api_client.close()

    def _raw(self, fn: Any, *args: Any, **kwargs: Any) -> Obj:
        resp = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        data = resp.data
        return dict(json.loads(data)) if data else {}

    def call(self, action: str, fn: Any, *args: Any, missing_ok: bool = False, **kwargs: Any) -> Obj:
        """``fn`` (a client method) with the namespace first where it takes one."""
        try:
            return self._raw(fn, *args, **kwargs)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status == 404 and missing_ok:
                return {}
            if status == 409:
                raise ConflictError(f"Kubernetes could not {action}: it exists already") from exc
            raise kube_error(action, exc) from exc

    # pods
    def create_pod(self, body: Obj) -> Obj:
        return self.call("create the runtime's pod", self.core.create_namespaced_pod, self.namespace, body)

    def read_pod(self, name: str) -> Obj | None:
        found = self.call(
            "read the runtime's pod", self.core.read_namespaced_pod, name, self.namespace, missing_ok=True
        )
        return found or None

    def delete_pod(self, name: str, grace: int, uid: str = "") -> None:
        body: Obj = {"gracePeriodSeconds": grace, "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        with contextlib.suppress(ConflictError):  # another pod of that name by now (preconditions)
            self.call(
                "delete the runtime's pod",
                self.core.delete_namespaced_pod,
                name,
                self.namespace,
                body=body,
                missing_ok=True,
            )

    def pod_log(self, name: str, lines: int) -> str:
        try:
            resp = self.core.read_namespaced_pod_log(
                name, self.namespace, tail_lines=lines, _preload_content=False, _request_timeout=self.timeout
            )
            return bytes(resp.data).decode(errors="replace")  # type: ignore[attr-defined]
        except Exception:
            return ""

    # exec (pods/exec): attaching to a pod envctl did not start (kube_attach.py)
    def _exec(self, pod: str, container: str, command: list[str], stdin: bool, binary: bool = False) -> Any:
        from kubernetes import client  # noqa: PLC0415
        from kubernetes.stream import stream  # noqa: PLC0415

        with self._exec_lock:  # ``stream`` swaps the client's request method while it opens
            if self._exec_core is None:
                self._exec_core = client.CoreV1Api(client.ApiClient(self._cfg))
            try:
                return stream(
                    self._exec_core.connect_get_namespaced_pod_exec,
                    pod,
                    self.namespace,
                    container=container or None,
                    command=command,
                    stdin=stdin,
                    stdout=True,
                    stderr=True,
                    tty=False,
                    _preload_content=False,
                    _request_timeout=self.timeout,
                    **({"binary": True} if binary else {}),
                )
            except Exception as exc:
                raise kube_error(f"exec in pod {pod}", exc) from exc

    def exec_stream(self, pod: str, container: str, command: list[str]) -> Any:
        """``command`` started in the pod's container with its stdin open; the open stream
        (the client's ``WSClient``, bytes in and out), for the caller to relay and close."""
        return self._exec(pod, container, command, stdin=True, binary=True)

    def exec(self, pod: str, container: str, command: list[str], timeout: float) -> str:
        """Run ``command`` in the pod's container to its end; its output (stdout, then stderr)."""
        ws = self._exec(pod, container, command, stdin=False)
        out: list[str] = []
        err: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while ws.is_open() and time.monotonic() < deadline:
                ws.update(timeout=0.2)
                if ws.peek_stdout():
                    out.append(ws.read_stdout())
                if ws.peek_stderr():
                    err.append(ws.read_stderr())
            if ws.is_open():
                raise BackendError(f"exec in pod {pod} did not end within {timeout:.0f} s")
        except BackendError:
            raise
        except Exception as exc:
            raise kube_error(f"exec in pod {pod}", exc) from exc
        finally:
            ws.close()
        return "".join(out) + "".join(err)

    def exec_first_line(self, pod: str, container: str, command: list[str], data: bytes, timeout: float) -> str:
        """Start ``command`` in the pod's container, write ``data`` on its stdin, and return the
        first line it prints; the stream is closed then (the process goes on)."""
        ws = self._exec(pod, container, command, stdin=True)
        out = ""
        err = ""
        deadline = time.monotonic() + timeout
        try:
            ws.write_stdin(data.decode())
            while "\n" not in out and time.monotonic() < deadline:
                if not ws.is_open():
                    break
                ws.update(timeout=0.2)
                if ws.peek_stdout():
                    out += ws.read_stdout()
                if ws.peek_stderr():
                    err += ws.read_stderr()
        except Exception as exc:
            raise kube_error(f"exec in pod {pod}", exc) from exc
        finally:
            ws.close()
        if "\n" not in out:
            said = (out + err).strip()[-500:]
            raise BackendError(
                f"exec in pod {pod} gave no answer"
                + (f" within {timeout:.0f} s" if time.monotonic() >= deadline else "")
                + (f": {said}" if said else ""),
                details={"pod": pod},
            )
        return out.split("\n", 1)[0]

    # secrets
    def create_secret(self, body: Obj) -> Obj:
        return self.call("make the runtime's secret", self.core.create_namespaced_secret, self.namespace, body)

    def own_secret(self, name: str, owner: Obj) -> None:
        patch = {"metadata": {"ownerReferences": [owner]}}
        self.call(
            "give the runtime's secret to its pod", self.core.patch_namespaced_secret, name, self.namespace, patch
        )

    def delete_secret(self, name: str) -> None:
        self.call(
            "remove the runtime's secret", self.core.delete_namespaced_secret, name, self.namespace, missing_ok=True
        )

    def list_secrets(self, selector: str) -> list[Obj]:
        body = self.call(
            "list the runtime's secrets", self.core.list_namespaced_secret, self.namespace, label_selector=selector
        )
        return list(body.get("items") or [])

    # config maps, policies, claims
    def ensure_config_map(self, body: Obj) -> None:
        with contextlib.suppress(ConflictError):  # made by another server or an earlier start: named by content
            self.call(
                "ship the agent's code as a ConfigMap", self.core.create_namespaced_config_map, self.namespace, body
            )

    def list_config_maps(self, selector: str) -> list[Obj]:
        body = self.call(
            "list the agent's ConfigMaps", self.core.list_namespaced_config_map, self.namespace, label_selector=selector
        )
        return list(body.get("items") or [])

    def delete_config_map(self, name: str) -> None:
        self.call(
            "remove an old agent ConfigMap",
            self.core.delete_namespaced_config_map,
            name,
            self.namespace,
            missing_ok=True,
        )

    def ensure_policy(self, body: Obj) -> None:
        try:
            self.call(
                "make the runtimes' NetworkPolicy", self.net.create_namespaced_network_policy, self.namespace, body
            )
        except ConflictError:
            name = body["metadata"]["name"]
            self.call(
                "update the runtimes' NetworkPolicy",
                self.net.replace_namespaced_network_policy,
                name,
                self.namespace,
                body,
            )

    def read_policy(self, name: str) -> Obj | None:
        found = self.call(
            "read the runtimes' NetworkPolicy",
            self.net.read_namespaced_network_policy,
            name,
            self.namespace,
            missing_ok=True,
        )
        return found or None

    def create_claim(self, body: Obj) -> None:
        self.call(
            "make a named volume's PersistentVolumeClaim",
            self.core.create_namespaced_persistent_volume_claim,
            self.namespace,
            body,
        )

    def read_claim(self, name: str) -> Obj | None:
        found = self.call(
            "read a named volume's PersistentVolumeClaim",
            self.core.read_namespaced_persistent_volume_claim,
            name,
            self.namespace,
            missing_ok=True,
        )
        return found or None

    def list_claims(self, selector: str) -> list[Obj]:
        body = self.call(
            "list named volumes' PersistentVolumeClaims",
            self.core.list_namespaced_persistent_volume_claim,
            self.namespace,
            label_selector=selector,
        )
        return list(body.get("items") or [])

    def delete_claim(self, name: str) -> None:
        self.call(
            "remove a named volume's PersistentVolumeClaim",
            self.core.delete_namespaced_persistent_volume_claim,
            name,
            self.namespace,
            missing_ok=True,
        )

    # nodes (cluster-wide)
    def read_node(self, name: str) -> Obj | None:
        found = self.call("read the node", self.core.read_node, name, missing_ok=True)
        return found or None

    def patch_node(self, name: str, patch: Obj) -> Obj:
        return self.call(f"change node {name}", self.core.patch_node, name, patch)

    def version(self) -> str:
        from kubernetes import client  # noqa: PLC0415

        try:
            return str(client.VersionApi(self.client).get_code(_request_timeout=self.timeout).git_version)
        except Exception as exc:
            raise kube_error("answer (its version)", exc) from exc
