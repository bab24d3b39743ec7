"""Kubernetes API-server audit events (``audit.k8s.io/v1`` Event) -> config_change / access events.

Facts (../shared/formats.md section 4): one request emits one event per stage sharing ``auditID``; only
``ResponseComplete`` (and ``Panic``) are kept, other stages are rejected with that reason so a change is
counted once. Old v1beta1-era events carry a top-level ``timestamp`` and may lack ``apiVersion``. AKS
wraps the Event as a JSON string in ``properties.log`` (unwrapped by the detector). The new object's
spec is only present at Request/RequestResponse level; for ``patch`` the request body is the patch.

Secret payloads never reach the store: ``data``/``stringData`` values of Secrets are replaced by
``<redacted>`` in the stored raw record and never copied into ``change_spec``. Helm 3 release secrets
(``sh.helm.release.v1.<release>.v<revision>``) become ``HelmRelease`` changes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from meshlens.formats.base import Event, Labels, Reject
from meshlens.formats.identity import service_from_host

MUTATING_VERBS = {"create", "update", "patch", "delete", "deletecollection", "apply"}
KEPT_STAGES = {"ResponseComplete", "Panic", None}

KINDS: dict[str, str] = {
    "virtualservices": "VirtualService", "destinationrules": "DestinationRule", "gateways": "Gateway",
    "serviceentries": "ServiceEntry", "sidecars": "Sidecar", "envoyfilters": "EnvoyFilter",
    "workloadentries": "WorkloadEntry", "authorizationpolicies": "AuthorizationPolicy",
    "peerauthentications": "PeerAuthentication", "requestauthentications": "RequestAuthentication",
    "telemetries": "Telemetry", "deployments": "Deployment", "statefulsets": "StatefulSet",
    "daemonsets": "DaemonSet", "replicasets": "ReplicaSet", "pods": "Pod", "services": "Service",
    "configmaps": "ConfigMap", "secrets": "Secret", "namespaces": "Namespace", "serviceaccounts": "ServiceAccount",
    "roles": "Role", "rolebindings": "RoleBinding", "clusterroles": "ClusterRole",
    "clusterrolebindings": "ClusterRoleBinding", "networkpolicies": "NetworkPolicy", "ingresses": "Ingress",
    "leases": "Lease", "events": "Event", "endpoints": "Endpoints", "endpointslices": "EndpointSlice",
    "httproutes": "HTTPRoute", "grpcroutes": "GRPCRoute", "servers": "Server",
    "serverauthorizations": "ServerAuthorization", "authorizationpolicies.policy.linkerd.io": "AuthorizationPolicy",
    "serviceintentions": "ServiceIntentions", "proxydefaults": "ProxyDefaults",
    "servicedefaults": "ServiceDefaults", "servicerouters": "ServiceRouter", "servicesplitters": "ServiceSplitter",
}
HELM_PREFIX = "sh.helm.release.v1."
SELECTOR_KINDS = {"AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication", "Telemetry"}
WORKLOAD_SELECTOR_KINDS = {"EnvoyFilter", "Sidecar"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Service", "Pod"}


def unwrap(obj: Any) -> Any:
    """AKS diagnostic wrapper: the Event is a JSON string in ``properties.log``."""
    if isinstance(obj, dict) and isinstance(obj.get("properties"), dict) and "log" in obj["properties"]:
        inner = obj["properties"]["log"]
        if isinstance(inner, str):
            try:
                return json.loads(inner)
            except json.JSONDecodeError as exc:
                raise Reject(f"AKS-wrapped audit event: properties.log is not valid JSON ({exc})") from None
        return inner
    return obj


def looks_like_audit(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    if obj.get("category") == "kube-audit" or (isinstance(obj.get("properties"), dict)
                                               and "log" in obj["properties"]):
        return True
    return obj.get("kind") == "Event" and ("auditID" in obj or "stage" in obj)


def _kind(resource: str, obj_ref: dict[str, Any], req: Any, resp: Any) -> str:
    for o in (req, resp):
        if isinstance(o, dict) and isinstance(o.get("kind"), str) and o["kind"] not in (
                "DeleteOptions", "Status", "Scale") and not o["kind"].endswith("List"):
            return o["kind"]
    group = obj_ref.get("apiGroup")
    if group and f"{resource}.{group}" in KINDS:
        return KINDS[f"{resource}.{group}"]
    if resource in KINDS:
        return KINDS[resource]
    singular = resource[:-3] + "y" if resource.endswith("ies") else resource.rstrip("s")
    return singular[:1].upper() + singular[1:]


def _short_hosts(hosts: Any) -> list[str]:
    out = []
    for h in hosts if isinstance(hosts, list) else [hosts]:
        if isinstance(h, str) and h and h != "*":
            svc, _ = service_from_host(h)
            if svc:
                out.append(svc)
    return out


def targets_of(kind: str, name: str | None, spec: Any) -> list[str]:
    """Short names of the workloads/hosts a change targets (``*`` = every workload in the namespace)."""
    t: list[str] = []
    if not isinstance(spec, dict):
        # no spec logged (delete, Metadata level): only the object's own name can be a target
        return [name] if name and kind in WORKLOAD_KINDS else []
    if kind == "VirtualService":
        t += _short_hosts(spec.get("hosts"))
        for section in ("http", "tcp", "tls"):
            for route in spec.get(section) or []:
                for dest in (route or {}).get("route") or []:
                    t += _short_hosts(((dest or {}).get("destination") or {}).get("host"))
    elif kind == "DestinationRule":
        t += _short_hosts(spec.get("host"))
    elif kind in SELECTOR_KINDS:
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        t += [v for k, v in labels.items() if k in ("app", "app.kubernetes.io/name")] or ["*"]
        for rule in spec.get("rules") or []:
            for to in (rule or {}).get("to") or []:
                t += _short_hosts(((to or {}).get("operation") or {}).get("hosts"))
    elif kind in WORKLOAD_SELECTOR_KINDS:
        labels = (spec.get("workloadSelector") or {}).get("labels") or {}
        t += [v for k, v in labels.items() if k in ("app", "app.kubernetes.io/name")] or ["*"]
    elif kind in WORKLOAD_KINDS:
        if name:
            t.append(name)
        app = (((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}).get("app")
        if app:
            t.append(app)
    elif name and kind not in ("Secret",):
        t.append(name)
    seen: dict[str, None] = {}
    for x in t:
        seen.setdefault(x, None)
    return list(seen)


def _redact_secret(ev: dict[str, Any]) -> bool:
    changed = False
    for key in ("requestObject", "responseObject"):
        o = ev.get(key)
        if isinstance(o, dict):
            for field in ("data", "stringData"):
                if isinstance(o.get(field), dict):
                    o[field] = {k: "<redacted>" for k in o[field]}
                    changed = True
    return changed


def parse(text: str, obj: Any, labels: Labels) -> Event:
    """One audit Event (already JSON-decoded in ``obj``) -> event dict; raw is replaced if redacted."""
    wrapped = obj
    obj = unwrap(obj)
    if not isinstance(obj, dict) or not (obj.get("kind") == "Event" or "auditID" in obj):
        raise Reject("not a Kubernetes audit Event (kind != Event and no auditID)")
    api = obj.get("apiVersion")
    if api is not None and not str(api).startswith("audit.k8s.io/"):
        raise Reject(f"not a Kubernetes audit Event (apiVersion {api!r})")
    stage = obj.get("stage")
    if stage not in KEPT_STAGES:
        raise Reject(f"audit stage {stage}: only ResponseComplete/Panic are stored, so each request "
                     "counts once (same auditID)")
    verb = obj.get("verb")
    if not isinstance(verb, str) or not verb:
        raise Reject("audit Event without a verb")
    ts_text = obj.get("stageTimestamp") or obj.get("requestReceivedTimestamp") or obj.get("timestamp")
    if not isinstance(ts_text, str):
        raise Reject("audit Event without stageTimestamp/requestReceivedTimestamp/timestamp")
    obj_ref = obj.get("objectRef") if isinstance(obj.get("objectRef"), dict) else {}
    user = obj.get("user") if isinstance(obj.get("user"), dict) else {}
    imp = obj.get("impersonatedUser") if isinstance(obj.get("impersonatedUser"), dict) else None
    actor = user.get("username")
    if imp and imp.get("username"):
        actor = f"{imp['username']} (impersonated by {actor})"
    req, resp = obj.get("requestObject"), obj.get("responseObject")
    resource = obj_ref.get("resource")
    name = obj_ref.get("name")
    ns = obj_ref.get("namespace")
    for o in (resp, req):
        if not name and isinstance(o, dict) and isinstance(o.get("metadata"), dict):
            name = o["metadata"].get("name") or name
            ns = ns or o["metadata"].get("namespace")
    status_obj = obj.get("responseStatus") if isinstance(obj.get("responseStatus"), dict) else {}
    annotations = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
    decision = annotations.get("authorization.k8s.io/decision")
    source_ips = obj.get("sourceIPs") if isinstance(obj.get("sourceIPs"), list) else []
    redacted_raw = None
    if resource == "secrets":
        red = copy.deepcopy(obj)
        if _redact_secret(red):
            if wrapped is obj:
                redacted_raw = json.dumps(red, separators=(",", ":"))
            else:
                outer = copy.deepcopy(wrapped)
                outer["properties"]["log"] = json.dumps(red, separators=(",", ":"))
                redacted_raw = json.dumps(outer, separators=(",", ":"))

    kind = _kind(resource, obj_ref, req, resp) if resource else None
    spec: Any = None
    change_spec: Any = None
    if resource == "secrets" and isinstance(name, str) and name.startswith(HELM_PREFIX):
        kind = "HelmRelease"
        rel, _, rev = name[len(HELM_PREFIX):].rpartition(".v")
        name = rel or name
        change_spec = {"revision": int(rev) if rev.isdigit() else rev}
    elif verb in MUTATING_VERBS and resource and resource != "secrets":
        body = req if isinstance(req, dict) and req.get("kind") not in ("DeleteOptions",) else None
        after = resp if isinstance(resp, dict) and resp.get("kind") not in ("Status",) else None
        # The new object's spec: the response (RequestResponse level) is the object after the change;
        # else the request body -- the whole object for create/update/server-side apply, but only the
        # changed fields for a merge/JSON patch.
        for src in (after, body):
            if isinstance(src, dict) and (isinstance(src.get("spec"), dict) or "data" in src):
                spec = src.get("spec") if isinstance(src.get("spec"), dict) else {"data": src.get("data")}
                break
        change_spec = {"patch": body} if verb == "patch" and body is not None and after is None else spec
    targets = targets_of(kind, name, spec) if kind and verb in MUTATING_VERBS else []
    if kind == "HelmRelease" and name:
        targets = [name]
    ev: Event = {
        "ts_text": ts_text,
        "event_type": "config_change" if verb in MUTATING_VERBS else "access",
        "record_kind": "audit",
        "mesh": "kubernetes",
        "format": "k8s_audit",
        "actor": actor,
        "verb": verb,
        "resource_kind": kind,
        "resource_namespace": ns,
        "resource_name": name,
        "resource_api_group": obj_ref.get("apiGroup") or ("" if resource else None),
        "change_spec": json.dumps(change_spec, sort_keys=True) if change_spec is not None else None,
        "change_targets": targets,
        "status": status_obj.get("code") if isinstance(status_obj.get("code"), int) else None,
        "authz_decision": {"allow": "allow", "forbid": "deny"}.get(decision) if decision else None,
        "authz_policy": annotations.get("authorization.k8s.io/reason") or None,
        "src_ip": source_ips[-1] if source_ips else None,
        "user_agent": obj.get("userAgent"),
        "request_id": obj.get("auditID"),
        "path": obj.get("requestURI"),
    }
    if redacted_raw is not None:
        ev["raw"] = redacted_raw
    return ev
