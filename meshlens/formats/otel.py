"""OpenTelemetry log records that carry mesh access logs -> the records they carry.

Who writes them: Istio's Telemetry API ``envoyOtelAls`` provider and Envoy's OpenTelemetry access logger
(``envoy.access_loggers.open_telemetry``) send each access-log entry as an OTLP log record. The *body* is
the formatted line (Istio's default TEXT format unless ``logFormat.text`` changes it) and may be empty
when only ``logFormat.labels``/``attributes`` are configured; the *attributes* hold those labels (keys
chosen by the operator: Envoy command-operator names such as ``upstream_cluster``, or semantic-convention
names such as ``http.response.status_code``); the *resource* names the proxy (``k8s.pod.name``,
``k8s.namespace.name``, ``k8s.deployment.name``, Istio's ``node_name`` ``sidecar~IP~pod.ns~...``).

The shapes in which such records reach meshlens (all normalised by :func:`normalize`):

* OTLP/JSON (the collector's file exporter, saved requests): ``{"resourceLogs": [{"resource":
  {"attributes": [KeyValue]}, "scopeLogs": [{"logRecords": [{"timeUnixNano", "body": AnyValue,
  "attributes": [KeyValue], "traceId"}]}]}]}``; a request with several records is cut into one record
  per log record by the file container (:func:`expand_request`);
* the collector's Elasticsearch exporter: mapping mode ``otel`` (``@timestamp``, ``body.text``,
  ``attributes.*``, ``resource.attributes.*``, ``trace_id``) and ``raw``/``none`` (``Body``,
  ``Resource.*``, attributes at the top level, ``TraceId``);
* OpenSearch Data Prepper documents (``time``, ``body``, ``log.attributes.*``, ``resource.attributes.*``
  with the attribute names' dots written as ``@``);
* Loki 3's native OTLP ingestion stores the body as the line and attributes as structured metadata: the
  line then arrives as any other line, and the metadata as stream labels (nothing here).

The body (or, without one, an Istio-JSON line built from the access-log attributes) is handed back to the
detector as an :class:`~meshlens.formats.base.Embedded` record, so Envoy/Istio lines are parsed by the
same SQL as everywhere else; the log record's own time (Envoy sets it to the request's start, with more
precision than ``START_TIME``'s milliseconds), trace id and the resource's identity complete the event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from meshlens.formats.base import Embedded, Labels, Reject
from meshlens.formats.bulk import ENVOY_FIELDS, EXTRA_FIELDS
from meshlens.timeutil import parse_rfc3339_ns

FORMAT = "otel"

# keys that mark a flattened OTel document (ES exporter otel/raw modes, Data Prepper)
_MARKERS = ("observed_timestamp", "observedTimestamp", "observedTime", "severity_number", "severityNumber",
            "SeverityNumber", "severity_text", "severityText", "SeverityText", "trace_id", "traceId", "TraceId",
            "scope", "resource", "Scope.name", "droppedAttributesCount", "instrumentationScope")
_PREFIXES = ("log.attributes.", "resource.attributes.", "Resource.", "Attributes.", "attributes.")

# access-log attribute names -> Istio JSON keys (the bulk JSON parser's names); Envoy operator names and
# Istio keys map to themselves
_ATTR_KEYS: dict[str, str] = {
    **{k: k for k in ENVOY_FIELDS}, **{k: f for f, keys in EXTRA_FIELDS.items() for k in keys},
    "http.request.method": "method", "http.method": "method", "url.path": "path", "http.target": "path",
    "network.protocol.name": "protocol", "http.flavor": "protocol",
    "http.response.status_code": "response_code", "http.status_code": "response_code",
    "server.address": "upstream_host", "user_agent.original": "user_agent", "http.user_agent": "user_agent",
    "x_request_id": "request_id", "x-request-id": "request_id", "response_code_detail": "response_code_details",
    "upstream_peer": "upstream_host", "downstream_remote_address_without_port": "downstream_remote_address",
    "duration_ms": "duration", "rpc.grpc.status_code": "grpc_status",
}
# Loki (OTLP ingestion) and Prometheus-style label names write the dots as underscores
_ATTR_KEYS.update({k.replace(".", "_"): v for k, v in list(_ATTR_KEYS.items()) if "." in k})
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_SIDECAR_NODE = re.compile(r"^(?:sidecar|router)~[^~]*~([^.~]+)\.([^~]+)~")


def looks_like_otel(obj: Any) -> bool:
    """An OTLP/JSON request, or a document a collector exporter wrote from a log record."""
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("resourceLogs"), list):
        return True
    if "body" not in obj and "Body" not in obj:
        return False
    return any(k in obj for k in _MARKERS) or any(k.startswith(_PREFIXES) for k in obj)


def any_value(v: Any) -> Any:
    """OTLP/JSON AnyValue -> Python (``{"stringValue": "x"}`` -> ``"x"``; int64 arrive as strings)."""
    if not isinstance(v, dict):
        return v
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        try:
            return int(v["intValue"])
        except (TypeError, ValueError):
            return v["intValue"]
    if "doubleValue" in v:
        return v["doubleValue"]
    if "boolValue" in v:
        return v["boolValue"]
    if "bytesValue" in v:
        return v["bytesValue"]
    if "arrayValue" in v:
        return [any_value(x) for x in (v["arrayValue"] or {}).get("values") or []]
    if "kvlistValue" in v:
        return key_values((v["kvlistValue"] or {}).get("values"))
    return v if v else None


def key_values(kvs: Any) -> dict[str, Any]:
    """OTLP/JSON ``[{"key": k, "value": AnyValue}]`` -> ``{k: value}``."""
    out: dict[str, Any] = {}
    for kv in kvs if isinstance(kvs, list) else []:
        if isinstance(kv, dict) and isinstance(kv.get("key"), str):
            out[kv["key"]] = any_value(kv.get("value"))
    return out


def _log_records(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(resource, scope, logRecord) for every record of an OTLP/JSON logs request."""
    for rl in obj.get("resourceLogs") or []:
        if not isinstance(rl, dict):
            continue
        resource = rl.get("resource") if isinstance(rl.get("resource"), dict) else {}
        for sl in rl.get("scopeLogs") or rl.get("instrumentationLibraryLogs") or []:
            if not isinstance(sl, dict):
                continue
            scope = sl.get("scope") or sl.get("instrumentationLibrary") or {}
            for rec in sl.get("logRecords") or []:
                if isinstance(rec, dict):
                    yield resource, scope if isinstance(scope, dict) else {}, rec


def expand_request(obj: Any) -> list[str] | None:
    """An OTLP/JSON request with several log records -> one single-record request (JSON) per record,
    for the file container; None when ``obj`` is not such a request."""
    if not (isinstance(obj, dict) and isinstance(obj.get("resourceLogs"), list)):
        return None
    out = []
    for resource, scope, rec in _log_records(obj):
        one = {"resourceLogs": [{"resource": resource, "scopeLogs": [{"scope": scope, "logRecords": [rec]}]}]}
        out.append(json.dumps(one, separators=(",", ":"), ensure_ascii=False))
    return out if len(out) > 1 else None


def _ns_of(value: Any) -> int | None:
    """A time as OTel exporters write it: ns integer (string), epoch ms (``"1710273641123.456789"``),
    or RFC 3339."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        n = int(value) if isinstance(value, int) else None
        if n is not None and n > 10**17:
            return n or None
        return int(float(value) * 1_000_000) or None
    text = str(value).strip()
    if re.fullmatch(r"\d{16,19}", text):
        return int(text) or None
    if re.fullmatch(r"\d{10,13}(\.\d+)?", text):
        whole, _, frac = text.partition(".")
        return int(whole) * 1_000_000 + int((frac + "000000")[:6]) or None
    ns = parse_rfc3339_ns(text)
    if ns is None:
        raise Reject(f"OpenTelemetry log record: time {text!r} is neither Unix nanoseconds nor RFC 3339")
    return ns or None


def normalize(obj: dict[str, Any]) -> dict[str, Any]:
    """Any supported shape -> ``{body, attributes, resource, time_ns, trace_id}``."""
    if isinstance(obj.get("resourceLogs"), list):
        recs = list(_log_records(obj))
        if len(recs) != 1:
            raise Reject(f"OTLP/JSON logs request with {len(recs)} log records in one record; save one "
                         "request per line or per file (the file reader splits requests into records)")
        resource, _scope, rec = recs[0]
        time_ns = _ns_of(rec.get("timeUnixNano")) or _ns_of(rec.get("observedTimeUnixNano"))
        return {"body": any_value(rec.get("body")), "attributes": key_values(rec.get("attributes")),
                "resource": key_values(resource.get("attributes")), "time_ns": time_ns,
                "trace_id": rec.get("traceId")}
    attrs: dict[str, Any] = {}
    resource: dict[str, Any] = {}
    for k, v in obj.items():
        if k.startswith("log.attributes."):
            attrs[k[len("log.attributes."):].replace("@", ".")] = v
        elif k.startswith("attributes."):
            attrs[k[len("attributes."):]] = v
        elif k.startswith("Attributes."):
            attrs[k[len("Attributes."):]] = v
        elif k.startswith("resource.attributes."):
            resource[k[len("resource.attributes."):].replace("@", ".")] = v
        elif k.startswith("Resource."):
            resource[k[len("Resource."):]] = v
    if isinstance(obj.get("attributes"), dict):
        attrs.update(obj["attributes"])
    res = obj.get("resource")
    if isinstance(res, dict) and isinstance(res.get("attributes"), dict):
        resource.update(res["attributes"])
    if "Body" in obj and "body" not in obj:  # raw mode: the record's attributes are top-level keys
        skip = {"@timestamp", "Body", "SeverityNumber", "SeverityText", "SpanId", "TraceFlags", "TraceId"}
        attrs.update({k: v for k, v in obj.items()
                      if k not in skip and not k.startswith(("Resource.", "Scope.", "Attributes."))})
    body = obj.get("body", obj.get("Body"))
    if isinstance(body, dict):  # ES otel mode: {"text": ...} or {"structured": {...}}
        body = body.get("text", body.get("structured", body))
    when = obj.get("@timestamp", obj.get("time", obj.get("timestamp")))
    return {"body": body, "attributes": attrs, "resource": resource, "time_ns": _ns_of(when),
            "trace_id": obj.get("trace_id") or obj.get("traceId") or obj.get("TraceId")}


def resource_labels(resource: dict[str, Any]) -> Labels:
    """The writing proxy's identity as stream labels (what :func:`~meshlens.formats.identity.self_identity`
    reads): namespace, pod, container and workload from the resource attributes."""
    out: Labels = {}

    def put(label: str, *keys: str) -> None:
        for k in keys:
            v = resource.get(k)
            if isinstance(v, str) and v:
                out[label] = v
                return

    put("namespace", "k8s.namespace.name", "k8s.pod.namespace", "service.namespace")
    put("pod", "k8s.pod.name")
    put("container", "k8s.container.name")
    put("workload", "k8s.deployment.name", "k8s.statefulset.name", "k8s.daemonset.name",
        "service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
    node = resource.get("node_name")
    if isinstance(node, str):
        m = _SIDECAR_NODE.match(node)
        if m:
            out.setdefault("pod", m.group(1))
            out.setdefault("namespace", m.group(2))
    return out


def _trace(record: dict[str, Any]) -> str | None:
    tid = record.get("trace_id")
    if isinstance(tid, str) and re.fullmatch(r"[0-9a-fA-F]{32}", tid) and set(tid) != {"0"}:
        return tid.lower()
    tp = record["attributes"].get("traceparent")
    m = _TRACEPARENT.match(tp) if isinstance(tp, str) else None
    return m.group(1) if m else None


def _access_line(attrs: dict[str, Any]) -> str | None:
    """Access-log attributes -> an Istio JSON line (None when fewer than three access-log keys)."""
    line: dict[str, Any] = {}
    for k, v in attrs.items():
        key = _ATTR_KEYS.get(k)
        if key == "trace_id" and isinstance(v, str) and _TRACEPARENT.match(v):
            v = _TRACEPARENT.match(v).group(1)  # type: ignore[union-attr]  # W3C traceparent: the trace id
        if key and key not in line and v is not None:
            line[key] = v
    return json.dumps(line, separators=(",", ":")) if len(line) >= 3 and (
        "response_code" in line or "upstream_cluster" in line) else None


def attributes_record(labels: Labels) -> str | None:
    """An empty line whose stream labels hold access-log attributes (Loki 3's OTLP ingestion keeps the
    attributes of a body-less record as structured metadata, returned as labels) -> an Istio JSON line."""
    return _access_line(labels) if labels else None


def parse_otel(text: str, obj: Any, labels: Labels) -> Any:
    """An OTel log record -> the access-log record it carries (raised as ``Embedded``), or a reject."""
    if not looks_like_otel(obj):
        raise Reject("not an OpenTelemetry log record (no resourceLogs, body or attributes)")
    rec = normalize(obj)
    ident = {**labels, **resource_labels(rec["resource"])}
    fill = {"trace_id": _trace(rec)}
    body = rec["body"]
    if isinstance(body, str) and body.strip():
        raise Embedded(body.rstrip("\r\n"), name="OpenTelemetry log body", labels=ident,
                       ts_ns=rec["time_ns"], ts_refine=True, fill=fill)
    line = _access_line(body if isinstance(body, dict) else rec["attributes"])
    if line is not None:
        raise Embedded(line, name="OpenTelemetry access-log attributes", labels=ident, ts_ns=rec["time_ns"],
                       ts_refine=True, fill=fill)
    service = rec["resource"].get("service.name")
    shown = body if isinstance(body, str) else json.dumps(body)[:60] if body is not None else "empty"
    raise Reject(f"OpenTelemetry log record{f' of service {service!r}' if service else ''} carries no proxy "
                 f"access log: its body ({str(shown)[:60]!r}) is no mesh record and its attributes "
                 f"({', '.join(sorted(rec['attributes'])[:5]) or 'none'}) hold no response_code/upstream_cluster")
