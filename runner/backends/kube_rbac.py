"""The least privilege the kubernetes backend needs (``kube_rbac.yaml``, shipped in the
package, with a comment on each rule): a ServiceAccount, a Role with exactly the verbs envctl
uses in its namespace, and a ClusterRole to read and cordon nodes, each bound to the
ServiceAccount. ``envctl kube rbac --namespace NS`` prints it for another namespace or name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from envs.kit.errors import InvalidInputError

MANIFEST = Path(__file__).with_name("kube_rbac.yaml")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# Only with ``attach``: envctl places its agent in a pod it did not start through pods/exec
# (runner/backends/kube_attach.py), which gives a shell in every pod of the namespace; a
# server without ENVCTL_RUNNER_ATTACH_ALLOW never needs it.
ATTACH_RULE = {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]}


def documents(namespace: str = "envctl", account: str = "envctl", *, attach: bool = False) -> list[dict[str, Any]]:
    """The manifest's objects for ``namespace``, the ServiceAccount, Role and RoleBinding named
    ``account``, the ClusterRole ``<account>-nodes`` and its binding ``<account>-nodes-<namespace>``;
    ``attach``: the Role also grants pods/exec."""
    for field, value in (("namespace", namespace), ("name", account)):
        if not _DNS_LABEL.match(value):
            raise InvalidInputError(
                f"{field} {value!r} is not a Kubernetes name (lower-case letters, digits and '-', at most 63)",
                field=field,
            )
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    nodes = f"{account}-nodes"
    for d in docs:
        meta = d["metadata"]
        kind = d["kind"]
        meta["name"] = {"ClusterRole": nodes, "ClusterRoleBinding": f"{nodes}-{namespace}"}.get(kind, account)
        if kind not in ("ClusterRole", "ClusterRoleBinding"):
            meta["namespace"] = namespace
        if "roleRef" in d:
            d["roleRef"]["name"] = nodes if kind == "ClusterRoleBinding" else account
        for s in d.get("subjects") or []:
            s.update(name=account, namespace=namespace)
        if attach and kind == "Role":
            d["rules"].append(dict(ATTACH_RULE))
    return docs


def manifest(namespace: str = "envctl", account: str = "envctl", *, attach: bool = False) -> str:
    """:func:`documents` as YAML, for ``kubectl apply -f -`` (the comments are in the shipped file)."""
    head = f"# envctl's least privilege in namespace {namespace} (what each rule is for: {MANIFEST.name} in envctl)\n"
    return head + yaml.safe_dump_all(documents(namespace, account, attach=attach), sort_keys=False, explicit_start=True)
