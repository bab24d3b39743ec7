"""Elastic Common Schema (ECS) documents -> normalized events.

Who produces them: Filebeat/Elastic Agent integrations and ingest pipelines that parse proxy access
logs into ECS fields (``http.request.method``, ``http.response.status_code``, ``url.path``,
``source.*``, ``destination.*``, ``event.*``, ``tls.*``, ``trace.id``, ``user_agent.original``...), and
Fluent Bit/Logstash pipelines that rename fields to ECS. Field names and types follow elastic/ecs
``generated/csv/fields.csv`` (see ``shared/formats.md`` section 7); notably ``event.duration`` is in
**nanoseconds**, ``event.type`` may contain ``allowed``/``denied`` for access decisions and
``network.direction`` uses ``inbound``/``outbound`` (older ECS: ``ingress``/``egress``).

Documents arrive as JSON text (``json.dumps(_source, sort_keys=True)`` from the Elasticsearch source);
both nested objects and literal dotted keys (``{"http.request.method": "GET"}``) are accepted, since
``_source`` keeps whatever the shipper sent.

What is *not* here: Istio's own JSON keys merged into a document (Fluent Bit ``Merge_Log``) are turned
back into the Istio JSON line by the source and parsed by the Istio parser, which knows response flags
and cluster names that ECS has no field for.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from meshlens.formats.base import Embedded, Event, Labels, Reject
from meshlens.formats.identity import (
    CONTAINER_LABELS,
    first_label,
    principal_identity,
    self_identity,
    service_from_host,
)
from meshlens.timeutil import parse_rfc3339_ns

FORMAT = "ecs"

# A document is an ECS *event* (not just a shipper envelope such as Filebeat's agent/host/log.file
# metadata around a raw ``message``) when it carries request or connection content in ECS names.
_REQUEST_FIELDS = ("http.request.method", "http.response.status_code", "url.original", "url.path", "url.full")
_SOURCE_FIELDS = ("source.ip", "source.address", "client.ip", "client.address")
_DEST_FIELDS = ("destination.ip", "destination.address", "destination.port", "server.ip", "server.address")

_ECS_ROOTS = ("http", "url", "source", "client", "destination", "server")
_MESH_BY_CONTAINER = {"istio-proxy": "istio", "linkerd-proxy": "linkerd", "consul-dataplane": "consul",
                      "envoy-sidecar": "consul", "ztunnel": "istio"}
_DIRECTIONS = {"inbound": "inbound", "ingress": "inbound", "outbound": "outbound", "egress": "outbound"}


@lru_cache(maxsize=512)
def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def get(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"``, also through literal dotted keys at any level.

    The nested walk is tried first (what Filebeat and Fluent Bit send); only when it fails are dotted
    keys searched, so the common case costs a few dict lookups.
    """
    cur = obj
    for part in _split(path):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            break
    else:
        return cur
    return _get_dotted(obj, path)


def _get_dotted(obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        return None
    if path in obj:
        return obj[path]
    parts = _split(path)
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in obj:
            found = _get_dotted(obj[head], ".".join(parts[i:]))
            if found is not None:
                return found
    return None


def _first(obj: Any, *paths: str) -> Any:
    for p in paths:
        v = get(obj, p)
        if v is not None and v != "" and v != []:
            return v
    return None


def looks_like_ecs(obj: dict[str, Any]) -> bool:
    """True for a document that carries an HTTP request or a network connection in ECS fields.

    Called by the format detector on JSON records that are none of the mesh formats, and by the
    Elasticsearch source to decide between a document's raw line and its structured fields.
    """
    if not isinstance(obj, dict):
        return False
    if _carried(obj) is not None:
        return True
    if not any(k.startswith(_ECS_ROOTS) for k in obj):  # cheap exit for shipper envelopes and mesh JSON
        return False
    if _first(obj, *_REQUEST_FIELDS) is not None:
        return True
    return _first(obj, *_SOURCE_FIELDS) is not None and _first(obj, *_DEST_FIELDS) is not None


def _text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None if not value else ",".join(map(str, value))
        if value is None:
            return None
    if isinstance(value, dict):
        raise Reject(f"ECS field {field} is an object, expected a value")
    text = str(value)
    return text or None


def _int(value: Any, field: str) -> int | None:
    if value is None or value == "" or value == "-":
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        raise Reject(f"ECS field {field} is a boolean, expected a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise Reject(f"ECS field {field} = {value!r} is not an integer")


def _float(value: Any, field: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise Reject(f"ECS field {field} is a boolean, expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Reject(f"ECS field {field} = {value!r} is not a number") from None


def _time_ns(obj: dict[str, Any]) -> int | None:
    value = _first(obj, "@timestamp", "event.start", "timestamp")
    if value is None:
        return None
    if isinstance(value, bool):
        raise Reject("ECS @timestamp is a boolean")
    if isinstance(value, int | float):
        return int(value * 1_000_000)  # epoch_millis, Elasticsearch's default numeric date
    ns = parse_rfc3339_ns(str(value))
    if ns is None:
        raise Reject(f"ECS @timestamp {value!r} is not an RFC 3339 time")
    return ns


def _path(obj: dict[str, Any]) -> str | None:
    path = _text(get(obj, "url.path"), "url.path")
    if path:
        query = _text(get(obj, "url.query"), "url.query")
        return f"{path}?{query}" if query else path
    original = _text(_first(obj, "url.original", "url.full"), "url.original")
    if not original:
        return None
    if "://" in original:
        rest = original.split("://", 1)[1]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return original


def _protocol(obj: dict[str, Any], has_http: bool) -> str | None:
    version = _text(get(obj, "http.version"), "http.version")
    if version:
        return version if version.upper().startswith("HTTP") else f"HTTP/{version}"
    transport = _text(get(obj, "network.transport"), "network.transport")
    if not has_http and transport and transport.lower() in ("tcp", "udp"):
        return transport.lower()
    proto = _text(get(obj, "network.protocol"), "network.protocol")
    if proto and proto.lower() in ("http", "grpc", "http2", "h2"):
        return None
    return proto.lower() if proto else None


def _spiffe(values: Any) -> str | None:
    if isinstance(values, str):
        values = [values]
    if isinstance(values, list):
        for v in values:
            if isinstance(v, str) and v.startswith("spiffe://"):
                return v
    return None


def _mesh(obj: dict[str, Any], labels: Labels) -> str | None:
    container = first_label(labels, CONTAINER_LABELS) or _text(
        _first(obj, "kubernetes.container.name", "kubernetes.container_name", "container.name"), "container")
    if container in _MESH_BY_CONTAINER:
        return _MESH_BY_CONTAINER[container]
    hint = " ".join(str(_first(obj, p) or "") for p in ("event.module", "event.dataset", "service.type",
                                                          "observer.product")).lower()
    for word, mesh in (("istio", "istio"), ("linkerd", "linkerd"), ("consul", "consul"), ("envoy", "envoy")):
        if word in hint:
            return mesh
    return None


def _decision(obj: dict[str, Any]) -> str | None:
    types = get(obj, "event.type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    lowered = {str(t).lower() for t in types}
    if "denied" in lowered:
        return "deny"
    if "allowed" in lowered:
        return "allow"
    return None


def parse_ecs(text: str, obj: Any, labels: Labels) -> Event:
    """One ECS document -> event columns (record-parser contract of :mod:`meshlens.formats.base`).

    A document that carries the proxy's own record -- ``event.original`` (Elastic Agent integrations
    with ``preserve_original_event``), ``kubernetes.audit.*`` (the Kubernetes audit integration) or
    ``istio.access.*`` (the Istio integration without the original) -- is parsed from that record, which
    states more than the ECS fields (response flags, clusters, SNI) and states it as the proxy wrote it
    (the Istio pipeline swaps BYTES_RECEIVED and BYTES_SENT into ``http.request/response.body.bytes``).
    The ECS fields are the fallback when the carried record cannot be parsed.
    """
    if not isinstance(obj, dict):
        raise Reject(f"ECS record must be a JSON object, got {type(obj).__name__}")
    carried = _carried(obj)
    if carried is not None:
        name, inner = carried
        fallback = None
        if _looks_structured(obj):
            try:
                fallback = _parse_structured(obj, labels)
            except Reject:
                fallback = None
        raise Embedded(inner, name=name, labels={**labels, **k8s_labels(obj)}, ts_text=_time_text(obj),
                       fill={"trace_id": _text(get(obj, "trace.id"), "trace.id")}, fallback=fallback)
    return _parse_structured(obj, labels)


def _looks_structured(obj: dict[str, Any]) -> bool:
    if not any(k.startswith(_ECS_ROOTS) for k in obj):
        return False
    if _first(obj, *_REQUEST_FIELDS) is not None:
        return True
    return _first(obj, *_SOURCE_FIELDS) is not None and _first(obj, *_DEST_FIELDS) is not None


def _time_text(obj: dict[str, Any]) -> str | None:
    v = _first(obj, "@timestamp", "event.start", "timestamp")
    return v if isinstance(v, str) else None


def _carried(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(envelope name, the record text) when an ECS document carries the proxy's own record."""
    original = get(obj, "event.original")
    if isinstance(original, str) and original.strip() and ("ecs" in obj or "event" in obj or "data_stream" in obj):
        return "ECS event.original", original.rstrip("\r\n")
    audit = get(obj, "kubernetes.audit")
    if isinstance(audit, dict) and ("verb" in audit or "protoPayload" in audit):
        event = dict(audit)
        if isinstance(event.get("annotations"), dict):  # Elastic de-dots keys: authorization_k8s_io/decision
            event["annotations"] = {k.replace("_k8s_io/", ".k8s.io/"): v for k, v in event["annotations"].items()}
        if "protoPayload" not in event:
            event.setdefault("kind", "Event")
        return "ECS kubernetes.audit", json.dumps(event, separators=(",", ":"))
    access = get(obj, "istio.access")
    if isinstance(access, dict):
        line = _istio_line(obj, access)
        if line is not None:
            return "ECS istio.access", line
    message = obj.get("message")
    if isinstance(message, str) and message.strip() and any(
            k in obj or k in (obj.get("event") or {}) or f"event.{k}" in obj for k in ("module", "dataset")) \
            and ("fileset.name" in obj or isinstance(obj.get("fileset"), dict) or "input.type" in obj
                 or isinstance(obj.get("input"), dict) or "ecs" in obj or "data_stream" in obj):
        # a Filebeat module / Elastic Agent document: `message` is the line the module parsed (Ambassador /
        # Emissary's Envoy format starts with an `ACCESS ` tag before `[START_TIME]`)
        line = message.rstrip("\r\n")
        return "ECS message", line[7:] if line.startswith("ACCESS [") else line
    return None


def _istio_line(obj: dict[str, Any], access: dict[str, Any]) -> str | None:
    """The Elastic Istio integration's fields -> the Istio JSON access-log line they were parsed from."""
    version = _text(get(obj, "http.version"), "http.version")
    fields = {
        "start_time": get(obj, "@timestamp"),
        "method": get(obj, "http.request.method"),
        "path": _first(obj, "url.original", "url.path"),
        "protocol": (version if version.upper().startswith("HTTP") else f"HTTP/{version}") if version else None,
        "response_code": get(obj, "http.response.status_code"),
        "response_flags": get(access, "response.flags"),
        "response_code_details": get(access, "response.code_details"),
        "connection_termination_details": get(access, "connection_termination_details"),
        "upstream_transport_failure_reason": get(access, "upstream.transport_failure_reason"),
        "bytes_received": get(access, "bytes.received"),
        "bytes_sent": get(access, "bytes.sent"),
        "duration": get(access, "duration"),
        "upstream_service_time": get(access, "upstream.service_time"),
        "x_forwarded_for": access.get("x-forwarded-for") or access.get("x_forwarded_for"),
        "user_agent": get(obj, "user_agent.original"),
        "request_id": get(obj, "http.request.id"),
        "authority": get(access, "authority"),
        "upstream_host": get(access, "upstream.host"),
        "upstream_cluster": get(access, "upstream.cluster"),
        "upstream_local_address": get(access, "upstream.local_address"),
        "downstream_local_address": get(access, "downstream.local_address"),
        "downstream_remote_address": get(access, "downstream.remote_address"),
        "requested_server_name": get(access, "requested_server_name"),
        "route_name": get(access, "route_name"),
    }
    line = {k: v for k, v in fields.items() if v is not None}
    if "upstream_cluster" not in line and "response_code" not in line:
        return None
    return json.dumps(line, separators=(",", ":"))


# Kubernetes metadata added by shippers: Filebeat/Elastic Agent (ECS-style, dotted) and Fluent Bit (_name)
_K8S_KEYS = {
    "namespace": ("kubernetes.namespace", "kubernetes.namespace_name", "kubernetes.namespace.name"),
    "pod": ("kubernetes.pod.name", "kubernetes.pod_name"),
    "container": ("kubernetes.container.name", "kubernetes.container_name"),
    "workload": ("kubernetes.labels.app", "kubernetes.labels.app_kubernetes_io/name",
                 "kubernetes.labels.app.kubernetes.io/name", "kubernetes.deployment.name",
                 "kubernetes.statefulset.name", "kubernetes.daemonset.name"),
}


def k8s_labels(obj: dict[str, Any]) -> Labels:
    """The writing pod's identity from a shipper's ``kubernetes.*`` metadata, as stream labels."""
    if "kubernetes" not in obj and not any(k.startswith("kubernetes.") for k in obj):
        return {}
    out: Labels = {}
    for label, paths in _K8S_KEYS.items():
        v = _first(obj, *paths)
        if isinstance(v, str) and v:
            out[label] = v
    return out


def looks_like_shipper(obj: Any) -> bool:
    """A log shipper's record around the proxy's line with Kubernetes metadata (Fluent Bit ``log`` +
    ``kubernetes{pod_name,...}``, Filebeat ``message`` + ``kubernetes.pod.name``...), not an ECS event."""
    if not isinstance(obj, dict):
        return False
    line = obj.get("log") if isinstance(obj.get("log"), str) else obj.get("message")
    if not isinstance(line, str):
        return False
    return (isinstance(obj.get("kubernetes"), dict) or any(k.startswith("kubernetes.") for k in obj)) \
        and _carried(obj) is None and not _looks_structured(obj)


def parse_shipper(text: str, obj: Any, labels: Labels) -> Event:
    """The proxy's line inside a shipper record, parsed with the pod's identity from the metadata."""
    line = obj.get("log") if isinstance(obj.get("log"), str) else obj.get("message")
    if not isinstance(line, str) or not line.strip():
        raise Reject("log shipper record with an empty log/message field")
    when = _first(obj, "@timestamp", "time", "timestamp", "date")
    raise Embedded(line.rstrip("\r\n"), name="shipper record (log/message + kubernetes metadata)",
                   labels={**labels, **k8s_labels(obj)}, ts_text=when if isinstance(when, str) else None)


def looks_like_search_hit(obj: Any) -> bool:
    """A saved Elasticsearch/OpenSearch search hit: ``{"_index", "_id", "_source": {...}, ...}``."""
    return isinstance(obj, dict) and isinstance(obj.get("_source"), dict) and ("_index" in obj or "_id" in obj)


def parse_search_hit(text: str, obj: Any, labels: Labels) -> Event:
    """The record a hit's ``_source`` carries, as the Elasticsearch source would read it."""
    from meshlens.formats.documents import document_record  # documents imports this module

    inner, reason = document_record(obj["_source"])
    where = f"search hit {obj.get('_index', '?')}/{obj.get('_id', '?')}"
    if reason:
        raise Reject(f"{where}: {reason}")
    raise Embedded(inner, name=where)


def _parse_structured(obj: dict[str, Any], labels: Labels) -> Event:
    """An ECS document from its structured fields (no carried record)."""
    if not looks_like_ecs(obj) or not _looks_structured(obj):
        raise Reject("ECS document without request fields (http.*, url.*) or a source/destination pair: "
                     "nothing to map to an event")
    method = _text(get(obj, "http.request.method"), "http.request.method")
    status = _int(get(obj, "http.response.status_code"), "http.response.status_code")
    if status is not None and not 0 <= status <= 999:
        raise Reject(f"ECS http.response.status_code {status} is not an HTTP status")
    has_http = method is not None or status is not None or _first(obj, *_REQUEST_FIELDS[2:]) is not None
    protocol = _protocol(obj, has_http)
    if status is None and protocol in ("tcp", "udp"):
        status = 0
    duration_ns = _float(get(obj, "event.duration"), "event.duration")
    direction = _DIRECTIONS.get(str(get(obj, "network.direction") or "").lower())
    self_wl, self_ns = self_identity(labels)
    service = _text(get(obj, "service.name"), "service.name")
    host = _text(_first(obj, "url.domain", "destination.domain", "http.request.headers.host",
                        "envoyproxy.authority"), "url.domain")
    dst_service, dst_ns = service_from_host(host)
    dst_port = _int(_first(obj, "destination.port", "url.port", "server.port"), "destination.port")
    dst_ip = _text(_first(obj, "destination.ip", "server.ip"), "destination.ip")
    src_principal = _spiffe(_first(obj, "tls.client.x509.alternative_names", "tls.client.x509.subject.common_name"))
    dst_principal = _spiffe(_first(obj, "tls.server.x509.alternative_names", "tls.server.x509.subject.common_name"))
    decision = _decision(obj)
    established = get(obj, "tls.established")
    error = _text(get(obj, "error.message"), "error.message")
    client_cert = _first(obj, "tls.client.x509.subject.common_name", "tls.client.x509.alternative_names",
                         "tls.client.subject", "tls.client.hash.sha256", "tls.client.certificate")
    mtls: bool | None = None
    if established is True and client_cert is not None:
        mtls = True
    tls_failure = error if established is False and error else None
    flags = get(obj, "envoyproxy.response_flags")
    if isinstance(flags, list):
        flags = ",".join(str(f) for f in flags) or None
    ev: Event = {
        "ts_ns": _time_ns(obj),
        "event_type": "authz" if decision == "deny" else ("tls" if tls_failure else "request"),
        "record_kind": "access_log",
        "mesh": _mesh(obj, labels),
        "format": FORMAT,
        "direction": direction,
        "src_ip": _text(_first(obj, "source.ip", "client.ip"), "source.ip"),
        "src_principal": src_principal,
        "dst_service": dst_service,
        "dst_namespace": dst_ns,
        "dst_principal": dst_principal,
        "dst_port": dst_port,
        "method": method.upper() if method else None,
        "path": _path(obj),
        "authority": host,
        "protocol": protocol,
        "status": status,
        "response_flags": _text(flags, "envoyproxy.response_flags") if flags and flags != "-" else None,
        "duration_ms": duration_ns / 1e6 if duration_ns is not None else None,
        "bytes_sent": _int(_first(obj, "http.response.body.bytes", "http.response.bytes", "destination.bytes"),
                           "http.response.body.bytes"),
        "bytes_received": _int(_first(obj, "http.request.body.bytes", "http.request.bytes", "source.bytes"),
                               "http.request.body.bytes"),
        "authz_decision": decision,
        "authz_policy": _text(_first(obj, "rule.name", "rule.id"), "rule.name") if decision else None,
        "mtls": mtls,
        "tls_failure_reason": tls_failure,
        "request_id": _text(_first(obj, "http.request.id", "envoyproxy.request_id"), "http.request.id"),
        "trace_id": _text(get(obj, "trace.id"), "trace.id"),
        "user_agent": _text(get(obj, "user_agent.original"), "user_agent.original"),
        "upstream_host": f"{dst_ip}:{dst_port}" if dst_ip and dst_port is not None else dst_ip,
    }
    # Which side wrote the record decides whose identity the stream labels are.
    if direction == "inbound":
        ev["dst_workload"] = self_wl or service
        ev["dst_namespace"] = ev["dst_namespace"] or self_ns
        if not ev["dst_service"]:
            ev["dst_service"] = service or self_wl
    elif direction == "outbound":
        ev["src_workload"] = self_wl or service
        ev["src_namespace"] = self_ns
    if src_principal and not ev.get("src_namespace"):
        ev["src_namespace"] = principal_identity(src_principal)[0]
    return ev
