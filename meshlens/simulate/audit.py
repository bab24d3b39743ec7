"""Kubernetes API-server audit events for the simulated config changes and read-only calls.

Events follow ``audit.k8s.io/v1`` ``Event`` (kubernetes ``staging/src/k8s.io/apiserver/pkg/apis/audit/v1/
types.go``), key order as the API server writes them (see the falco sample ``falco_create_secret.json``),
``stage: ResponseComplete`` (watches also get their ``ResponseStarted`` event, like a real server).

Each tool writes the way it really does:

* ``kubectl apply`` (alice): a ``get`` first, then ``create`` (new object) or ``patch`` with the
  ``last-applied-configuration`` annotation and the new ``spec``; ``kubectl delete`` / ``rollout undo``.
* ``kubectl edit`` / ``set image`` / ``scale`` (bob): merge/strategic-merge ``patch``; ``scale`` goes to
  the ``deployments/scale`` subresource.
* Argo CD (``system:serviceaccount:argocd:argocd-application-controller``): server-side apply ``patch``
  whose body is the full applied object (``fieldManager=argocd-controller``).
* Helm 3 (CI service account, user agent ``Helm/3.14.4``): ``list`` release secrets, ``create``
  ``sh.helm.release.v1.<release>.v<N>``, ``patch`` the Deployment, ``update`` the previous release secret
  (superseded) and the new one (deployed). Secrets are logged at ``Metadata`` level (no bodies).
* The HPA (``kube-system:horizontal-pod-autoscaler``): ``update`` of ``deployments/scale``.

``RequestResponse`` events carry ``requestObject`` (the body as sent: with the new ``spec``) and
``responseObject`` (the stored object, full ``spec``).
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from meshlens.simulate.render import rfc3339_micro

KIND_API: dict[str, tuple[str, str, str]] = {
    "VirtualService": ("networking.istio.io", "v1", "virtualservices"),
    "DestinationRule": ("networking.istio.io", "v1", "destinationrules"),
    "AuthorizationPolicy": ("security.istio.io", "v1", "authorizationpolicies"),
    "PeerAuthentication": ("security.istio.io", "v1", "peerauthentications"),
    "EnvoyFilter": ("networking.istio.io", "v1alpha3", "envoyfilters"),
    "Deployment": ("apps", "v1", "deployments"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Secret": ("", "v1", "secrets"),
    "Pod": ("", "v1", "pods"),
}

ACTOR_INFO: dict[str, dict[str, Any]] = {
    "alice": {
        "user": {"username": "alice@example.com", "groups": ["oidc:sre", "system:authenticated"]},
        "ua": "kubectl/v1.29.3 (darwin/arm64) kubernetes/6813625", "ip": "10.20.4.17",
        "rbac": 'RBAC: allowed by ClusterRoleBinding "sre-admin" of ClusterRole "cluster-admin" to Group "oidc:sre"',
    },
    "bob": {
        "user": {"username": "bob@example.com", "groups": ["oidc:platform", "system:authenticated"]},
        "ua": "kubectl/v1.30.1 (linux/amd64) kubernetes/6911225", "ip": "10.20.7.102",
        "rbac_ns": 'RBAC: allowed by RoleBinding "platform-edit/{ns}" of ClusterRole "edit" to Group "oidc:platform"',
    },
    "argocd": {
        "user": {"username": "system:serviceaccount:argocd:argocd-application-controller",
                 "uid": "4f1c2d0e-7b7a-4d59-9a0a-3a8f0c1b6e21",
                 "groups": ["system:serviceaccounts", "system:serviceaccounts:argocd", "system:authenticated"],
                 "extra": {"authentication.kubernetes.io/pod-name": ["argocd-application-controller-0"],
                           "authentication.kubernetes.io/pod-uid": ["b2f0a9a4-60c1-4f0f-8c43-9d1c7e3f55a2"]}},
        "ua": "argocd-application-controller/v2.11.3+3f344d5 (linux/amd64)", "ip": "10.244.3.27",
        "rbac": 'RBAC: allowed by ClusterRoleBinding "argocd-application-controller" of ClusterRole '
                '"argocd-application-controller" to ServiceAccount "argocd-application-controller/argocd"',
    },
    "helm": {
        "user": {"username": "system:serviceaccount:ci:helm-deployer",
                 "uid": "9d3c1b7e-2a4f-4c8e-b1d6-5e7f8a9b0c12",
                 "groups": ["system:serviceaccounts", "system:serviceaccounts:ci", "system:authenticated"],
                 "extra": {"authentication.kubernetes.io/pod-name": ["deploy-runner-7c9f6-x2k4p"],
                           "authentication.kubernetes.io/pod-uid": ["0a6b4e2c-5d1f-4b3a-9c8e-7f6d5e4c3b2a"]}},
        "ua": "Helm/3.14.4", "ip": "10.244.5.61",
        "rbac": 'RBAC: allowed by ClusterRoleBinding "ci-helm-deployer" of ClusterRole "cluster-admin" to '
                'ServiceAccount "helm-deployer/ci"',
    },
    "hpa": {
        "user": {"username": "system:serviceaccount:kube-system:horizontal-pod-autoscaler",
                 "uid": "6e8f1d2c-3b4a-4c5d-8e9f-0a1b2c3d4e5f",
                 "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system",
                            "system:authenticated"]},
        "ua": "kube-controller-manager/v1.29.3 (linux/amd64) kubernetes/6813625/system:serviceaccount:"
              "kube-system:horizontal-pod-autoscaler", "ip": "10.0.1.10",
        "rbac": 'RBAC: allowed by ClusterRoleBinding "system:controller:horizontal-pod-autoscaler" of '
                'ClusterRole "system:controller:horizontal-pod-autoscaler" to ServiceAccount '
                '"horizontal-pod-autoscaler/kube-system"',
    },
    "istiod": {
        "user": {"username": "system:serviceaccount:istio-system:istiod",
                 "uid": "1c2d3e4f-5a6b-4c7d-8e9f-a0b1c2d3e4f5",
                 "groups": ["system:serviceaccounts", "system:serviceaccounts:istio-system",
                            "system:authenticated"]},
        "ua": "pilot-discovery/v0.0.0 (linux/amd64) kubernetes/$Format", "ip": "10.244.1.9",
        "rbac": 'RBAC: allowed by ClusterRoleBinding "istiod-clusterrole-istio-system" of ClusterRole '
                '"istiod-clusterrole-istio-system" to ServiceAccount "istiod/istio-system"',
    },
    "dave": {
        "user": {"username": "dave@example.com", "groups": ["oidc:developers", "system:authenticated"]},
        "ua": "kubectl/v1.28.9 (windows/amd64) kubernetes/587f5fe", "ip": "10.20.9.44",
        "rbac_ns": 'RBAC: allowed by RoleBinding "dev-view/{ns}" of ClusterRole "view" to Group "oidc:developers"',
    },
}

ACTOR_USERNAMES = {k: v["user"]["username"] for k, v in ACTOR_INFO.items()}


@dataclass
class Change:
    """A config change the simulator applies (and the ground truth reports)."""

    ts_us: int
    actor: str
    kind: str
    namespace: str
    name: str
    verb: str  # create | patch | update | delete
    role: str  # cause | decoy | benign | rollback
    service: str | None
    obj: dict[str, Any] | None  # the stored object after the change (None for delete)
    body: dict[str, Any] | None = None  # request body when it differs from obj (patches)
    subresource: str | None = None
    incident: str | None = None
    description: str = ""
    helm_release: tuple[str, int] | None = None  # (release, new revision)
    audit_id: str = ""
    extra_targets: list[str] = field(default_factory=list)
    created: bool = False  # the object did not exist before (201)

    @property
    def target(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def accepted_targets(self) -> list[str]:
        out = [self.target]
        if self.helm_release:
            out.append(f"HelmRelease/{self.namespace}/{self.helm_release[0]}")
        return out + self.extra_targets

    def truth(self) -> dict[str, Any]:
        return {
            "target": self.target, "kind": self.kind, "namespace": self.namespace, "name": self.name,
            "verb": self.verb, "actor": ACTOR_USERNAMES[self.actor], "ts": None, "role": self.role,
            "incident": self.incident, "service": self.service, "description": self.description,
            "audit_id": self.audit_id, "accepted_targets": self.accepted_targets,
            "helm_release": (f"{self.helm_release[0]}.v{self.helm_release[1]}" if self.helm_release else None),
        }


class AuditLog:
    """Builds audit events; deterministic ids and resource versions from its own RNG."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"{seed}:audit")
        self.rv = 48_213_377
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.uids: dict[str, str] = {}

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _uid_of(self, key: str) -> str:
        if key not in self.uids:
            self.uids[key] = self._uuid()
        return self.uids[key]

    def _next_rv(self) -> str:
        self.rv += self.rng.randint(3, 900)
        return str(self.rv)

    @staticmethod
    def uri(kind: str, ns: str | None, name: str | None = None, sub: str | None = None,
            query: str = "") -> str:
        group, version, res = KIND_API[kind]
        base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
        if ns:
            base += f"/namespaces/{ns}"
        base += f"/{res}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base + (f"?{query}" if query else "")

    def _event(self, *, ts_us: int, actor: str, verb: str, kind: str, ns: str | None, name: str | None,
               level: str, code: int, uri: str, sub: str | None = None, req: Any = None, resp: Any = None,
               latency_us: int | None = None, stage: str = "ResponseComplete", audit_id: str | None = None,
               status: dict[str, Any] | None = None, decision: str = "allow") -> tuple[int, dict[str, Any]]:
        info = ACTOR_INFO[actor]
        group, version, res = KIND_API[kind]
        lat = latency_us if latency_us is not None else self.rng.randint(1500, 14000)
        received = ts_us - lat
        obj_ref: dict[str, Any] = {"resource": res}
        if ns:
            obj_ref["namespace"] = ns
        if name:
            obj_ref["name"] = name
            if verb not in ("create",):
                obj_ref["uid"] = self._uid_of(f"{kind}/{ns}/{name}")
        if group:
            obj_ref["apiGroup"] = group
        obj_ref["apiVersion"] = version
        if name and verb in ("patch", "update", "delete"):
            obj_ref["resourceVersion"] = str(self.rv)
        if sub:
            obj_ref["subresource"] = sub
        ev: dict[str, Any] = {
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": level,
            "auditID": audit_id or self._uuid(), "stage": stage, "requestURI": uri, "verb": verb,
            "user": copy.deepcopy(info["user"]), "sourceIPs": [info["ip"]], "userAgent": info["ua"],
            "objectRef": obj_ref,
            "responseStatus": status or {"metadata": {}, "code": code},
        }
        if req is not None and level in ("Request", "RequestResponse"):
            ev["requestObject"] = req
        if resp is not None and level == "RequestResponse":
            ev["responseObject"] = resp
        ev["requestReceivedTimestamp"] = rfc3339_micro(received)
        ev["stageTimestamp"] = rfc3339_micro(ts_us)
        reason = info.get("rbac") or info.get("rbac_ns", "").format(ns=ns or "default")
        ev["annotations"] = {"authorization.k8s.io/decision": decision,
                             "authorization.k8s.io/reason": reason if decision == "allow" else ""}
        self.events.append((ts_us, ev))
        return ts_us, ev

    def _stored(self, obj: dict[str, Any], kind: str, created_us: int | None) -> dict[str, Any]:
        """The object as the API server returns it: uid, resourceVersion, generation, timestamps."""
        out = copy.deepcopy(obj)
        md = out.setdefault("metadata", {})
        ns, name = md.get("namespace"), md.get("name")
        md["uid"] = self._uid_of(f"{kind}/{ns}/{name}")
        md["resourceVersion"] = self._next_rv()
        if "spec" in out:
            md["generation"] = md.get("generation", 1)
        if created_us is not None:
            md["creationTimestamp"] = rfc3339_micro(created_us)[:19] + "Z"
        return out

    # ---- mutating calls ----
    def record_change(self, ch: Change, created_us: int) -> None:
        """Emit the audit events of one change, in the way its actor's tool makes them."""
        if ch.helm_release:
            self._helm_upgrade(ch, created_us)
            return
        if ch.actor == "argocd":
            self._argocd_apply(ch, created_us)
        elif ch.actor == "hpa":
            self._scale(ch, created_us, verb="update")
        elif ch.verb == "delete":
            self._delete(ch)
        elif ch.subresource == "scale":
            self._scale(ch, created_us, verb="patch")
        else:
            self._kubectl(ch, created_us)

    def _kubectl(self, ch: Change, created_us: int) -> None:
        assert ch.obj is not None
        if ch.actor == "alice":  # kubectl apply: GET first (404 for a new object)
            self._event(ts_us=ch.ts_us - self.rng.randint(30_000, 120_000), actor=ch.actor, verb="get",
                        kind=ch.kind, ns=ch.namespace, name=ch.name, level="Metadata",
                        code=404 if ch.verb == "create" else 200, uri=self.uri(ch.kind, ch.namespace, ch.name),
                        status=({"metadata": {}, "status": "Failure",
                                 "message": f'{KIND_API[ch.kind][2]}.{KIND_API[ch.kind][0] or "core"} "{ch.name}" not found',
                                 "reason": "NotFound", "details": {"name": ch.name,
                                                                   "group": KIND_API[ch.kind][0],
                                                                   "kind": KIND_API[ch.kind][2]},
                                 "code": 404} if ch.verb == "create" else None))
        stored = self._stored(ch.obj, ch.kind, created_us if ch.verb != "create" else ch.ts_us)
        if ch.verb == "create":
            req = copy.deepcopy(ch.obj)
            if ch.actor == "alice":
                req.setdefault("metadata", {}).setdefault("annotations", {})[
                    "kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(
                        ch.obj, separators=(",", ":"), sort_keys=True) + "\n"
                stored["metadata"].setdefault("annotations", {})[
                    "kubectl.kubernetes.io/last-applied-configuration"] = req["metadata"]["annotations"][
                        "kubectl.kubernetes.io/last-applied-configuration"]
            query = "fieldManager=kubectl-client-side-apply&fieldValidation=Strict"
            _, ev = self._event(ts_us=ch.ts_us, actor=ch.actor, verb="create", kind=ch.kind, ns=ch.namespace,
                                name=ch.name, level="RequestResponse", code=201,
                                uri=self.uri(ch.kind, ch.namespace, query=query), req=req, resp=stored)
        else:
            if ch.body is not None:
                req = ch.body
            else:
                req = {"spec": copy.deepcopy(ch.obj.get("spec"))} if "spec" in ch.obj else \
                    {"data": copy.deepcopy(ch.obj.get("data"))}
            if ch.actor == "alice":
                req = copy.deepcopy(req)
                req.setdefault("metadata", {}).setdefault("annotations", {})[
                    "kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(
                        ch.obj, separators=(",", ":"), sort_keys=True) + "\n"
                query = "fieldManager=kubectl-client-side-apply&fieldValidation=Strict"
            elif ch.body is not None and ch.kind == "Deployment":
                query = "fieldManager=kubectl-set"
            else:
                query = "fieldManager=kubectl-edit&fieldValidation=Strict"
            _, ev = self._event(ts_us=ch.ts_us, actor=ch.actor, verb="patch", kind=ch.kind, ns=ch.namespace,
                                name=ch.name, level="RequestResponse", code=200,
                                uri=self.uri(ch.kind, ch.namespace, ch.name, query=query), req=req, resp=stored)
        ch.audit_id = ev["auditID"]

    def _argocd_apply(self, ch: Change, created_us: int) -> None:
        if ch.verb == "delete":
            self._delete(ch)
            return
        assert ch.obj is not None
        applied = copy.deepcopy(ch.obj)
        applied.setdefault("metadata", {}).setdefault("labels", {})["app.kubernetes.io/instance"] = ch.namespace
        stored = self._stored(applied, ch.kind, created_us if not ch.created else ch.ts_us)
        _, ev = self._event(ts_us=ch.ts_us, actor="argocd", verb="patch", kind=ch.kind, ns=ch.namespace,
                            name=ch.name, level="RequestResponse", code=201 if ch.created else 200,
                            uri=self.uri(ch.kind, ch.namespace, ch.name,
                                         query="fieldManager=argocd-controller&force=true"),
                            req=applied, resp=stored)
        ch.audit_id = ev["auditID"]

    def _scale(self, ch: Change, created_us: int, verb: str) -> None:
        assert ch.obj is not None
        replicas = ch.obj["spec"]["replicas"]
        scale_obj = {"kind": "Scale", "apiVersion": "autoscaling/v1",
                     "metadata": {"name": ch.name, "namespace": ch.namespace},
                     "spec": {"replicas": replicas}}
        req = scale_obj if verb == "update" else {"spec": {"replicas": replicas}}
        resp = self._stored(scale_obj, "Deployment", created_us)
        resp["status"] = {"replicas": replicas, "selector": f"app={ch.name}"}
        _, ev = self._event(ts_us=ch.ts_us, actor=ch.actor, verb=verb, kind="Deployment", ns=ch.namespace,
                            name=ch.name, sub="scale", level="RequestResponse", code=200,
                            uri=self.uri("Deployment", ch.namespace, ch.name, "scale"), req=req, resp=resp)
        ch.audit_id = ev["auditID"]

    def _delete(self, ch: Change) -> None:
        group, version, res = KIND_API[ch.kind]
        req = {"kind": "DeleteOptions", "apiVersion": "meta.k8s.io/v1", "propagationPolicy": "Background"}
        resp = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": ch.name, "group": group, "kind": res,
                            "uid": self._uid_of(f"{ch.kind}/{ch.namespace}/{ch.name}")}}
        _, ev = self._event(ts_us=ch.ts_us, actor=ch.actor, verb="delete", kind=ch.kind, ns=ch.namespace,
                            name=ch.name, level="RequestResponse", code=200,
                            uri=self.uri(ch.kind, ch.namespace, ch.name), req=req, resp=resp)
        ch.audit_id = ev["auditID"]

    def _helm_upgrade(self, ch: Change, created_us: int) -> None:
        assert ch.helm_release is not None and ch.obj is not None
        release, rev = ch.helm_release
        t = ch.ts_us
        ns = ch.namespace
        self._event(ts_us=t - 900_000, actor="helm", verb="list", kind="Secret", ns=ns, name=None,
                    level="Metadata", code=200,
                    uri=self.uri("Secret", ns, query=f"labelSelector=name%3D{release}%2Cowner%3Dhelm"))
        self._event(ts_us=t - 400_000, actor="helm", verb="create", kind="Secret", ns=ns,
                    name=f"sh.helm.release.v1.{release}.v{rev}", level="Metadata", code=201,
                    uri=self.uri("Secret", ns))
        if ch.created:  # a new object in the chart: Helm creates it whole
            stored = self._stored(ch.obj, ch.kind, t)
            _, ev = self._event(ts_us=t, actor="helm", verb="create", kind=ch.kind, ns=ns, name=ch.name,
                                level="RequestResponse", code=201, uri=self.uri(ch.kind, ns), req=ch.obj,
                                resp=stored)
        else:  # three-way strategic merge patch with what changed
            body = ch.body if ch.body is not None else (
                {"spec": copy.deepcopy(ch.obj["spec"])} if "spec" in ch.obj else {"data": copy.deepcopy(ch.obj["data"])})
            stored = self._stored(ch.obj, ch.kind, created_us)
            _, ev = self._event(ts_us=t, actor="helm", verb="patch", kind=ch.kind, ns=ns, name=ch.name,
                                level="RequestResponse", code=200, uri=self.uri(ch.kind, ns, ch.name), req=body,
                                resp=stored)
        ch.audit_id = ev["auditID"]
        self._event(ts_us=t + 300_000, actor="helm", verb="update", kind="Secret", ns=ns,
                    name=f"sh.helm.release.v1.{release}.v{rev - 1}", level="Metadata", code=200,
                    uri=self.uri("Secret", ns, f"sh.helm.release.v1.{release}.v{rev - 1}"))
        self._event(ts_us=t + 650_000, actor="helm", verb="update", kind="Secret", ns=ns,
                    name=f"sh.helm.release.v1.{release}.v{rev}", level="Metadata", code=200,
                    uri=self.uri("Secret", ns, f"sh.helm.release.v1.{release}.v{rev}"))

    # ---- read-only calls ----
    def read_only(self, ts_us: int, actor: str, verb: str, kind: str, ns: str | None, name: str | None) -> None:
        if verb == "watch":
            rv = self._next_rv()
            timeout = self.rng.randint(300, 599)
            uri = self.uri(kind, ns, query=f"allowWatchBookmarks=true&resourceVersion={rv}"
                                            f"&timeoutSeconds={timeout}&watch=true")
            aid = self._uuid()
            self._event(ts_us=ts_us, actor=actor, verb="watch", kind=kind, ns=ns, name=None, level="Metadata",
                        code=200, uri=uri, stage="ResponseStarted", audit_id=aid, latency_us=600)
            self._event(ts_us=ts_us + timeout * 1_000_000, actor=actor, verb="watch", kind=kind, ns=ns,
                        name=None, level="Metadata", code=200, uri=uri, audit_id=aid,
                        latency_us=timeout * 1_000_000 + 600)
        elif verb == "list":
            self._event(ts_us=ts_us, actor=actor, verb="list", kind=kind, ns=ns, name=None, level="Metadata",
                        code=200, uri=self.uri(kind, ns, query="limit=500"))
        else:
            self._event(ts_us=ts_us, actor=actor, verb="get", kind=kind, ns=ns, name=name, level="Metadata",
                        code=200, uri=self.uri(kind, ns, name))

    def forbidden_get(self, ts_us: int, actor: str, kind: str, ns: str, name: str) -> None:
        group, _, res = KIND_API[kind]
        user = ACTOR_USERNAMES[actor]
        status = {"metadata": {}, "status": "Failure",
                  "message": f'{res} "{name}" is forbidden: User "{user}" cannot get resource "{res}" in API '
                             f'group "{group}" in the namespace "{ns}"',
                  "reason": "Forbidden", "details": {"name": name, "kind": res}, "code": 403}
        self._event(ts_us=ts_us, actor=actor, verb="get", kind=kind, ns=ns, name=name, level="Metadata",
                    code=403, uri=self.uri(kind, ns, name), status=status, decision="forbid")
