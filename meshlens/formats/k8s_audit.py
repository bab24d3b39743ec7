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

from meshlens.formats.base import Embedded, Event, Labels, Reject
from meshlens.formats.identity import service_from_host

MUTATING_VERBS = {"create", "update", "patch", "delete", "deletecollection", "apply"}
KEPT_STAGES = {"ResponseComplete", "Panic", None}

# resource (plural, as in objectRef.resource) -> Kind, for every built-in API group of Kubernetes 1.30 and
# the CRDs of the meshes meshlens reads. Keyed "resource.group" where a plural is ambiguous across groups.
# Used only when neither requestObject nor responseObject names the kind (Metadata level, deletes, patches):
# a kind is never guessed by capitalising the plural (`priorityclasses` is `PriorityClass`, `endpoints` is
# `Endpoints`), an unknown resource stays NULL.
_BUILTIN = {
    # core
    "pods": "Pod", "services": "Service", "endpoints": "Endpoints", "configmaps": "ConfigMap",
    "secrets": "Secret", "namespaces": "Namespace", "serviceaccounts": "ServiceAccount", "nodes": "Node",
    "persistentvolumes": "PersistentVolume", "persistentvolumeclaims": "PersistentVolumeClaim",
    "events": "Event", "limitranges": "LimitRange", "resourcequotas": "ResourceQuota",
    "replicationcontrollers": "ReplicationController", "podtemplates": "PodTemplate",
    "componentstatuses": "ComponentStatus", "bindings": "Binding",
    # apps, batch, autoscaling, policy
    "deployments": "Deployment", "statefulsets": "StatefulSet", "daemonsets": "DaemonSet",
    "replicasets": "ReplicaSet", "controllerrevisions": "ControllerRevision", "jobs": "Job",
    "cronjobs": "CronJob", "horizontalpodautoscalers": "HorizontalPodAutoscaler",
    "poddisruptionbudgets": "PodDisruptionBudget", "podsecuritypolicies": "PodSecurityPolicy",
    # networking, discovery, coordination, node, scheduling, storage
    "networkpolicies": "NetworkPolicy", "ingresses": "Ingress", "ingressclasses": "IngressClass",
    "ipaddresses": "IPAddress", "servicecidrs": "ServiceCIDR", "endpointslices": "EndpointSlice",
    "leases": "Lease", "runtimeclasses": "RuntimeClass", "priorityclasses": "PriorityClass",
    "storageclasses": "StorageClass", "volumeattachments": "VolumeAttachment", "csidrivers": "CSIDriver",
    "csinodes": "CSINode", "csistoragecapacities": "CSIStorageCapacity",
    "volumeattributesclasses": "VolumeAttributesClass",
    # rbac, certificates, authn/authz reviews, admission, apiextensions, apiregistration, flowcontrol
    "roles": "Role", "rolebindings": "RoleBinding", "clusterroles": "ClusterRole",
    "clusterrolebindings": "ClusterRoleBinding", "certificatesigningrequests": "CertificateSigningRequest",
    "clustertrustbundles": "ClusterTrustBundle", "tokenreviews": "TokenReview",
    "selfsubjectreviews": "SelfSubjectReview", "subjectaccessreviews": "SubjectAccessReview",
    "selfsubjectaccessreviews": "SelfSubjectAccessReview", "selfsubjectrulesreviews": "SelfSubjectRulesReview",
    "localsubjectaccessreviews": "LocalSubjectAccessReview",
    "mutatingwebhookconfigurations": "MutatingWebhookConfiguration",
    "validatingwebhookconfigurations": "ValidatingWebhookConfiguration",
    "validatingadmissionpolicies": "ValidatingAdmissionPolicy",
    "validatingadmissionpolicybindings": "ValidatingAdmissionPolicyBinding",
    "customresourcedefinitions": "CustomResourceDefinition", "apiservices": "APIService",
    "flowschemas": "FlowSchema", "prioritylevelconfigurations": "PriorityLevelConfiguration",
    "storageversions": "StorageVersion", "resourceclaims": "ResourceClaim",
    "resourceclaimtemplates": "ResourceClaimTemplate", "deviceclasses": "DeviceClass",
    "resourceslices": "ResourceSlice", "podschedulingcontexts": "PodSchedulingContext",
    # Gateway API
    "gateways.gateway.networking.k8s.io": "Gateway", "gatewayclasses": "GatewayClass", "httproutes": "HTTPRoute",
    "grpcroutes": "GRPCRoute", "tcproutes": "TCPRoute", "tlsroutes": "TLSRoute", "udproutes": "UDPRoute",
    "referencegrants": "ReferenceGrant", "backendtlspolicies": "BackendTLSPolicy",
    # Istio
    "virtualservices": "VirtualService", "destinationrules": "DestinationRule", "gateways": "Gateway",
    "serviceentries": "ServiceEntry", "sidecars": "Sidecar", "envoyfilters": "EnvoyFilter",
    "workloadentries": "WorkloadEntry", "workloadgroups": "WorkloadGroup", "proxyconfigs": "ProxyConfig",
    "authorizationpolicies": "AuthorizationPolicy", "peerauthentications": "PeerAuthentication",
    "requestauthentications": "RequestAuthentication", "telemetries": "Telemetry", "wasmplugins": "WasmPlugin",
    "istiooperators": "IstioOperator",
    # Linkerd
    "servers": "Server", "serverauthorizations": "ServerAuthorization",
    "authorizationpolicies.policy.linkerd.io": "AuthorizationPolicy",
    "meshtlsauthentications": "MeshTLSAuthentication", "networkauthentications": "NetworkAuthentication",
    "httplocalratelimitpolicies": "HTTPLocalRateLimitPolicy", "egressnetworks": "EgressNetwork",
    "serviceprofiles": "ServiceProfile", "links": "Link",
    # Consul
    "serviceintentions": "ServiceIntentions", "proxydefaults": "ProxyDefaults",
    "servicedefaults": "ServiceDefaults", "servicerouters": "ServiceRouter", "servicesplitters": "ServiceSplitter",
    "serviceresolvers": "ServiceResolver", "meshes": "Mesh", "exportedservices": "ExportedServices",
    "ingressgateways": "IngressGateway", "terminatinggateways": "TerminatingGateway",
    # cert-manager, Helm controller
    "certificates": "Certificate", "certificaterequests": "CertificateRequest", "issuers": "Issuer",
    "clusterissuers": "ClusterIssuer", "helmreleases": "HelmRelease",
}
KINDS: dict[str, str] = dict(_BUILTIN)
# response/request kinds that are not the object's own kind
_NOT_OBJECT_KINDS = {"DeleteOptions", "Status", "Scale", "Eviction", "Binding", "TokenRequest", "WatchEvent"}
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
    if looks_like_gke(obj):
        return True
    if obj.get("category") == "kube-audit" or (isinstance(obj.get("properties"), dict)
                                               and "log" in obj["properties"]):
        return True
    return obj.get("kind") == "Event" and ("auditID" in obj or "stage" in obj)


def _kind(resource: str, obj_ref: dict[str, Any], req: Any, resp: Any) -> str | None:
    """The object's Kind: stated by the request/response object, else from :data:`KINDS`, else None.

    A subresource request (``pods/exec``, ``deployments/scale``) carries another object (PodExecOptions,
    Scale): the Kind is then the parent resource's, from the table.
    """
    sub = obj_ref.get("subresource")
    for o in (() if sub else (req, resp)):
        if isinstance(o, dict) and isinstance(o.get("kind"), str) and o["kind"] not in _NOT_OBJECT_KINDS \
                and not o["kind"].endswith("List"):
            return o["kind"]
    group = obj_ref.get("apiGroup")
    if group and f"{resource}.{group}" in KINDS:
        return KINDS[f"{resource}.{group}"]
    return KINDS.get(resource)


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
    if looks_like_gke(obj):
        return parse_gke(text, obj, labels)
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
        # sourceIPs lists the X-Forwarded-For chain first, then X-Real-Ip, then the remote address: the
        # first entry is the originating client
        "src_ip": source_ips[0] if source_ips else None,
        "user_agent": obj.get("userAgent"),
        "request_id": obj.get("auditID"),
        "path": obj.get("requestURI"),
    }
    if redacted_raw is not None:
        ev["raw"] = redacted_raw
    return ev


# -- GKE: Kubernetes audit events as Cloud Audit Logs entries -------------------------------------------
def looks_like_gke(obj: Any) -> bool:
    """A Cloud Logging entry whose ``protoPayload`` is a Kubernetes API call (``methodName: io.k8s.*``)."""
    pp = obj.get("protoPayload") if isinstance(obj, dict) else None
    return isinstance(pp, dict) and (pp.get("serviceName") == "k8s.io"
                                     or str(pp.get("methodName") or "").startswith("io.k8s."))


# google.rpc.Code -> HTTP status (google/rpc/code.proto's documented mapping)
_RPC_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
             11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def _gke_resource(resource_name: str) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """``core/v1/namespaces/default/pods/nginx[/exec]`` -> (group, resource, namespace, name, subresource).

    A non-resource request (``readyz``, ``/version``) has no group/version prefix: all None.
    """
    parts = [p for p in resource_name.split("/") if p]
    if len(parts) < 3 or not parts[1].startswith("v"):
        return None, None, None, None, None
    group = "" if parts[0] == "core" else parts[0]
    rest = parts[2:]
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    elif rest and rest[0] == "namespaces" and len(rest) == 2:
        return group, "namespaces", None, rest[1], None
    resource = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return group, resource, ns, name, sub


def parse_gke(text: str, obj: Any, labels: Labels) -> Event:
    """A GKE Cloud Audit Logs entry (``protoPayload`` AuditLog of service ``k8s.io``) -> the same event
    as the Kubernetes audit Event it records.

    ``methodName`` is ``io.k8s.<group>.<version>.<resource>[.<subresource>].<verb>`` (the verb is its last
    part); ``resourceName`` is ``<group>/<version>/namespaces/<ns>/<resource>/<name>``; the caller is
    ``authenticationInfo.principalEmail`` (the Kubernetes username), ``requestMetadata`` holds caller IP
    and user agent, ``labels`` the authorization annotations, ``request``/``response`` the objects.
    GKE logs no HTTP status: a ``response`` Status carries it, else ``status`` (a google.rpc.Status) is
    mapped to HTTP by code.proto's table.
    """
    pp = obj["protoPayload"]
    method = str(pp.get("methodName") or "")
    verb = method.rsplit(".", 1)[-1] if method.startswith("io.k8s.") else None
    if not verb:
        raise Reject(f"GKE Cloud Audit Log entry: methodName {method!r} is not an io.k8s.* Kubernetes call")
    ts_text = obj.get("timestamp") or obj.get("receiveTimestamp")
    if not isinstance(ts_text, str):
        raise Reject("GKE Cloud Audit Log entry without timestamp")
    group, resource, ns, name, sub = _gke_resource(str(pp.get("resourceName") or ""))
    req = pp.get("request") if isinstance(pp.get("request"), dict) else None
    resp = pp.get("response") if isinstance(pp.get("response"), dict) else None
    kind = None
    if resource:
        kind = _kind(resource, {"apiGroup": group, "subresource": sub}, req, resp)
        if kind is None:
            for o in (req, resp):  # "@type": "core.k8s.io/v1.Pod"
                t = o.get("@type") if isinstance(o, dict) else None
                if isinstance(t, str) and "." in t.rsplit("/", 1)[-1] and not sub:
                    cand = t.rsplit(".", 1)[-1]
                    if cand not in _NOT_OBJECT_KINDS:
                        kind = cand
                        break
    if name is None:
        for o in (resp, req):
            if isinstance(o, dict) and isinstance(o.get("metadata"), dict) and o.get("kind") not in _NOT_OBJECT_KINDS:
                name = o["metadata"].get("name") or name
                ns = ns or o["metadata"].get("namespace")
    lbl = obj.get("labels") if isinstance(obj.get("labels"), dict) else {}
    decision = lbl.get("authorization.k8s.io/decision")
    if decision is None:
        granted = [a.get("granted") for a in pp.get("authorizationInfo") or [] if isinstance(a, dict)]
        if granted and all(g is True for g in granted):
            decision = "allow"
        elif any(g is False for g in granted):
            decision = "forbid"
    status: int | None = None
    if isinstance(resp, dict) and resp.get("kind") == "Status" and isinstance(resp.get("code"), int):
        status = resp["code"]
    elif isinstance(pp.get("status"), dict):
        code = pp["status"].get("code", 0)
        status = _RPC_HTTP.get(code) if isinstance(code, int) else None
    meta = pp.get("requestMetadata") if isinstance(pp.get("requestMetadata"), dict) else {}
    auth = pp.get("authenticationInfo") if isinstance(pp.get("authenticationInfo"), dict) else {}
    spec = None
    if verb in MUTATING_VERBS:
        for o in (resp, req):
            if isinstance(o, dict) and o.get("kind") not in _NOT_OBJECT_KINDS and isinstance(o.get("spec"), dict):
                spec = o["spec"]
                break
    raw = None
    if resource == "secrets":
        spec = None
        red = copy.deepcopy(obj)
        if _redact_secret({"requestObject": red["protoPayload"].get("request"),
                           "responseObject": red["protoPayload"].get("response")}):
            raw = json.dumps(red, separators=(",", ":"))
    op = obj.get("operation") if isinstance(obj.get("operation"), dict) else {}
    ev: Event = {
        "ts_text": ts_text,
        "event_type": "config_change" if verb in MUTATING_VERBS else "access",
        "record_kind": "audit",
        "mesh": "kubernetes",
        "format": "k8s_audit",
        "actor": auth.get("principalEmail"),
        "verb": verb,
        "resource_kind": kind,
        "resource_namespace": ns,
        "resource_name": name,
        "resource_api_group": group,
        "change_spec": json.dumps(spec, sort_keys=True) if spec is not None else None,
        "change_targets": targets_of(kind, name, spec) if kind and verb in MUTATING_VERBS else [],
        "status": status,
        "authz_decision": {"allow": "allow", "forbid": "deny"}.get(decision) if decision else None,
        "authz_policy": lbl.get("authorization.k8s.io/reason") or None,
        "src_ip": meta.get("callerIp") or meta.get("callerIP"),
        "user_agent": meta.get("callerSuppliedUserAgent"),
        "request_id": op.get("id") or obj.get("insertId"),
    }
    if raw is not None:
        ev["raw"] = raw
    return ev


# -- EKS: audit events exported from CloudWatch Logs ------------------------------------------------------
_CW_KEYS = ("logStreamName", "logStream", "ingestionTime", "eventId", "logGroup")


def looks_like_cloudwatch_event(obj: Any) -> bool:
    """One CloudWatch Logs event (``aws logs filter-log-events``/``get-log-events`` items, S3 exports):
    ``{"timestamp": ms, "message": "<the audit Event as JSON>", "logStreamName": "kube-apiserver-audit-..."}``."""
    return isinstance(obj, dict) and isinstance(obj.get("message"), str) and any(k in obj for k in _CW_KEYS) \
        and isinstance(obj.get("timestamp", 0), int | float)


def parse_cloudwatch_event(text: str, obj: Any, labels: Labels) -> Event:
    """The record a CloudWatch Logs event carries (EKS control-plane audit: an audit Event in ``message``);
    the event's ``timestamp`` (ms) is the time when the record has none of its own."""
    ts = obj.get("timestamp")
    stream = obj.get("logStreamName") or obj.get("logStream") or "?"
    raise Embedded(obj["message"].rstrip("\r\n"), name=f"CloudWatch Logs event (stream {stream})",
                   ts_ns=int(ts * 1_000_000) if isinstance(ts, int | float) and not isinstance(ts, bool) else None)


def expand_cloudwatch(obj: Any) -> list[str] | None:
    """A CloudWatch Logs export holding several events -> one event (JSON) per record: the CLI's
    ``{"events": [...]}`` and a subscription/Firehose ``{"messageType": "DATA_MESSAGE", "logEvents": [...]}``
    (whose stream and group are copied into each event). None when ``obj`` is not such an export."""
    if not isinstance(obj, dict):
        return None
    items = obj.get("logEvents") if isinstance(obj.get("logEvents"), list) else obj.get("events")
    if not isinstance(items, list) or not items or not all(isinstance(e, dict) and "message" in e for e in items):
        return None
    extra = {k: obj[k] for k in ("logGroup", "logStream") if isinstance(obj.get(k), str)}
    return [json.dumps({**extra, **e}, separators=(",", ":"), ensure_ascii=False) for e in items]
