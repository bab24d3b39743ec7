"""Records carried by envelopes, and the shapes of issue 13: what a user relies on is that the carried
record comes out as if it had been read directly, with the envelope's identity and time.

The inputs are built from real shapes (OTLP/JSON of Istio's envoyOtelAls provider, Elastic/ECS documents,
Fluent Bit records, GKE/EKS audit exports, Linkerd proxy logs); tests/test_real_records.py covers the
verbatim public records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshlens.filters import FilterConfig
from meshlens.formats.detect import Parser
from meshlens.ingest import ingest_files
from meshlens.records import RawBatch
from meshlens.store import open_store

ISTIO_OUT = ('[2022-08-22T13:08:23.188Z] "GET /reviews/0 HTTP/1.1" 200 - via_upstream - "-" 0 442 12 12 "-" '
             '"curl/7.79.1" "00bcf1d7-12c4-93b9-b36a-bc0faac8e428" "reviews:9080" "10.124.1.5:9080" '
             'outbound|9080||reviews.default.svc.cluster.local 10.124.2.6:50960 10.0.18.132:9080 '
             '10.124.2.6:52930 - default')


def parse(lines: list[str], labels: dict[str, str] | None = None, fmt: str | None = None,
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    batch = RawBatch(source="test")
    for i, line in enumerate(lines, 1):
        batch.append(line, None, labels, str(i))
    events, rejects = Parser(fmt).parse(batch)
    return events.to_pylist(), rejects.to_pylist()


def one(lines: list[str], **kw: Any) -> dict[str, Any]:
    events, rejects = parse(lines, **kw)
    assert not rejects, rejects
    assert len(events) == 1
    return events[0]


def otlp(records: list[dict[str, Any]], resource: dict[str, str]) -> dict[str, Any]:
    attrs = [{"key": k, "value": {"stringValue": v}} for k, v in resource.items()]
    return {"resourceLogs": [{"resource": {"attributes": attrs}, "scopeLogs": [{"scope": {}, "logRecords": records}]}]}


def test_docker_log_wrapping_an_istio_line_is_parsed_by_the_istio_parser() -> None:
    ev = one([json.dumps({"log": ISTIO_OUT + "\n", "stream": "stdout", "time": "2022-08-22T13:08:23.19Z"})])
    assert (ev["format"], ev["direction"], ev["status"], ev["dst_service"], ev["bytes_sent"]) == \
        ("istio_text", "outbound", 200, "reviews", 442)
    assert ev["ts_ns"] == 1661173703188_000_000  # the line's own START_TIME, not the shipper's time
    assert json.loads(ev["raw"])["log"].startswith("[2022-08-22")  # the stored record is the envelope


def test_fluent_bit_record_gives_the_pod_identity_to_the_line() -> None:
    rec = {"log": ISTIO_OUT, "stream": "stdout", "time": "2022-08-22T13:08:24Z",
           "kubernetes": {"pod_name": "productpage-v1-6b746f74dc-9stvs", "namespace_name": "bookinfo",
                          "container_name": "istio-proxy", "labels": {"app": "productpage"}}}
    ev = one([json.dumps(rec)])
    assert (ev["src_workload"], ev["src_namespace"], ev["dst_service"]) == ("productpage", "bookinfo", "reviews")


def test_ecs_event_original_is_authoritative_over_swapped_body_bytes() -> None:
    doc = {"@timestamp": "2022-08-22T13:08:23.188Z", "ecs": {"version": "8.3.0"},
           "event": {"module": "istio", "original": ISTIO_OUT},
           "http": {"request": {"method": "GET", "body": {"bytes": 442}}, "response": {"status_code": 200,
                                                                                    "body": {"bytes": 0}}},
           "source": {"ip": "10.124.2.6"}, "destination": {"ip": "10.124.1.5", "port": 9080}}
    ev = one([json.dumps(doc)])
    assert (ev["bytes_received"], ev["bytes_sent"], ev["upstream_cluster"]) == \
        (0, 442, "outbound|9080||reviews.default.svc.cluster.local")


def test_ecs_istio_access_fields_without_the_original() -> None:
    doc = {"@timestamp": "2022-07-20T09:52:24.955Z", "http": {"request": {"method": "GET"},
           "response": {"status_code": 503}, "version": "1.1"}, "url": {"original": "/details/0"},
           "istio": {"access": {"authority": "details:9080", "bytes": {"received": 0, "sent": 91},
                                "response": {"flags": "UF,URX", "code_details": "upstream_reset_before_response_started"},
                                "upstream": {"cluster": "outbound|9080||details.default.svc.cluster.local"},
                                "duration": 5}},
           "source": {"ip": "10.68.1.7"}}
    ev = one([json.dumps(doc)])
    assert (ev["status"], ev["response_flags"], ev["direction"], ev["dst_service"], ev["protocol"], ev["path"]) == \
        (503, "UF,URX", "outbound", "details", "HTTP/1.1", "/details/0")


def test_ecs_original_that_is_no_record_falls_back_to_the_ecs_fields() -> None:
    doc = {"@timestamp": "2024-01-01T00:00:00Z", "ecs": {}, "event": {"original": "GET / 200 nginx said hi"},
           "http": {"request": {"method": "GET"}, "response": {"status_code": 200}}, "url": {"path": "/"}}
    ev = one([json.dumps(doc)])
    assert (ev["format"], ev["method"], ev["status"]) == ("ecs", "GET", 200)


def test_otlp_request_with_two_records_body_and_attributes(tmp_path: Path) -> None:
    """Istio envoyOtelAls: one record with the text body, one body-less with access-log attributes; the
    file container splits the request, the resource names the writing pod."""
    body = ('[2022-11-30T06:23:57.284Z] "GET /ip HTTP/1.1" 200 - via_upstream - "-" 0 28 1 1 "-" "fortio" '
            '"2ef3fbae-b13b-4bf0-9bdb-88c91ef85c9c" "httpbin:8000" "10.244.0.8:80" inbound|80|| 127.0.0.6:43139 '
            '10.244.0.8:80 10.244.0.12:40278 outbound_.8000_._.httpbin.default.svc.cluster.local default\n')
    attrs = [{"key": "response_code", "value": {"intValue": "503"}},
             {"key": "upstream_cluster", "value": {"stringValue": "outbound|8000||httpbin.default.svc.cluster.local"}},
             {"key": "http.request.method", "value": {"stringValue": "GET"}},
             {"key": "traceparent", "value": {"stringValue": "00-7ffa505b8e9a17e6e48a222bf9a2b527-dad83bd909d0c495-01"}}]
    req = otlp([{"timeUnixNano": "1669789437284677000", "body": {"stringValue": body}},
                {"timeUnixNano": "1669789437810641000", "attributes": attrs}],
               {"k8s.namespace.name": "default", "k8s.pod.name": "httpbin-847f64cc8d-rsfmj"})
    f = tmp_path / "otlp.jsonl"
    f.write_text(json.dumps(req) + "\n")
    store = open_store(":memory:")
    counts = ingest_files(store, [f], progress=False, filters=FilterConfig())
    assert (counts.stored, counts.rejects) == (2, 0)
    rows = store.con.execute("SELECT position, format, direction, status, ts_ns, dst_workload, src_workload, "
                             "trace_id, method FROM events ORDER BY position").fetchall()
    store.close()
    assert rows[0] == ("1#0", "istio_text", "inbound", 200, 1669789437284677000, "httpbin", None, None, "GET")
    # the record's own time (ns) refines START_TIME's milliseconds; the outbound writer is the httpbin pod
    assert rows[1] == ("1#1", "istio_json", "outbound", 503, 1669789437810641000, None, "httpbin",
                       "7ffa505b8e9a17e6e48a222bf9a2b527", "GET")


def test_otel_grpc_status_attribute(tmp_path: Path) -> None:
    """The semantic-convention attribute ``rpc.grpc.status_code`` and Envoy's ``%GRPC_STATUS%`` name both
    become the event's grpc_status (a gRPC failure is HTTP 200 with a failing code)."""
    def rec(ts: str, status: dict[str, Any], key: str) -> dict[str, Any]:
        return {"timeUnixNano": ts, "attributes": [
            {"key": "response_code", "value": {"intValue": "200"}}, {"key": key, "value": status},
            {"key": "upstream_cluster", "value": {"stringValue": "outbound|7070||cart.shop.svc.cluster.local"}},
            {"key": "http.request.method", "value": {"stringValue": "POST"}}]}
    req = otlp([rec("1669789437284677000", {"intValue": "14"}, "rpc.grpc.status_code"),
                rec("1669789437810641000", {"stringValue": "DeadlineExceeded"}, "grpc_status")],
               {"k8s.namespace.name": "shop", "k8s.pod.name": "frontend-847f64cc8d-rsfmj"})
    f = tmp_path / "otlp.jsonl"
    f.write_text(json.dumps(req) + "\n")
    store = open_store(":memory:")
    counts = ingest_files(store, [f], progress=False, filters=FilterConfig())
    rows = store.con.execute("SELECT status, grpc_status FROM events ORDER BY position").fetchall()
    store.close()
    assert counts.rejects == 0 and rows == [(200, 14), (200, 4)]


def test_otel_application_log_is_rejected_naming_the_shape() -> None:
    doc = {"@timestamp": "2024-03-12T20:00:41.123456789Z", "Body": "User authentication failed",
           "Resource.service.name": "my-service", "SeverityText": "ERROR"}
    events, rejects = parse([json.dumps(doc)])
    assert not events and "OpenTelemetry" in rejects[0]["reason"]


def test_loki_empty_line_with_structured_metadata_attributes() -> None:
    labels = {"k8s_namespace_name": "demo", "k8s_pod_name": "web-7d9c-abcde", "response_code": "403",
              "upstream_cluster": "outbound|80||api.demo.svc.cluster.local", "method": "POST", "path": "/v1/x",
              "response_code_details": "rbac_access_denied_matched_policy[ns[demo]-policy[deny]-rule[0]]"}
    ev = one([""], labels=labels)
    assert (ev["event_type"], ev["status"], ev["dst_service"], ev["authz_decision"]) == ("authz", 403, "api", "deny")


def test_saved_search_hit_and_response(tmp_path: Path) -> None:
    hit = {"_index": "logs-istio", "_id": "a1", "_source": {"log": ISTIO_OUT, "stream": "stdout"}}
    ev = one([json.dumps(hit)])
    assert (ev["format"], ev["dst_service"]) == ("istio_text", "reviews")
    resp = {"took": 3, "hits": {"total": {"value": 2}, "hits": [hit, {**hit, "_id": "a2"}]}}
    f = tmp_path / "search.json"
    f.write_text(json.dumps(resp, indent=2))
    store = open_store(":memory:")
    counts = ingest_files(store, [f], progress=False, filters=FilterConfig())
    store.close()
    assert (counts.read, counts.stored, counts.rejects) == (2, 2, 0)


def _audit(**kw: Any) -> dict[str, Any]:
    ev = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": "x1",
          "stage": "ResponseComplete", "verb": "delete", "user": {"username": "kubernetes-admin"},
          "sourceIPs": ["12.34.56.78", "10.0.0.1"], "responseStatus": {"code": 200},
          "stageTimestamp": "2021-08-11T09:29:13.100Z"}
    ev.update(kw)
    return ev


@pytest.mark.parametrize(("resource", "group", "kind"), [
    ("priorityclasses", "scheduling.k8s.io", "PriorityClass"), ("endpoints", "", "Endpoints"),
    ("ingresses", "networking.k8s.io", "Ingress"), ("authorizationpolicies", "policy.linkerd.io",
                                                    "AuthorizationPolicy"),
    ("widgets", "example.com", None),  # an unknown CRD: NULL, never a capitalised plural
])
def test_kind_comes_from_the_table_never_from_the_plural(resource: str, group: str, kind: str | None) -> None:
    ev = one([json.dumps(_audit(objectRef={"resource": resource, "name": "n", "apiGroup": group}))])
    assert ev["resource_kind"] == kind
    assert ev["src_ip"] == "12.34.56.78"  # the first sourceIP is the client


def test_eks_cloudwatch_export_is_read_event_by_event(tmp_path: Path) -> None:
    export = {"events": [{"logStreamName": "kube-apiserver-audit-71976ca1", "timestamp": 1628674153095,
                          "message": json.dumps(_audit(objectRef={"resource": "pods", "name": "p", "namespace": "d"})),
                          "ingestionTime": 1628674155000, "eventId": str(i)} for i in range(3)]}
    f = tmp_path / "cw.json"
    f.write_text(json.dumps(export))
    store = open_store(":memory:")
    counts = ingest_files(store, [f], progress=False, filters=FilterConfig())
    kinds = store.con.execute("SELECT DISTINCT resource_kind, actor, event_type FROM events").fetchall()
    store.close()
    assert (counts.stored, counts.rejects) == (3, 0)
    assert kinds == [("Pod", "kubernetes-admin", "config_change")]


def test_gke_cloud_audit_log_entry() -> None:
    entry = {"protoPayload": {"@type": "type.googleapis.com/google.cloud.audit.AuditLog",
                              "authenticationInfo": {"principalEmail": "dev@example.com"},
                              "methodName": "io.k8s.networking.istio.io.v1beta1.virtualservices.create",
                              "resourceName": "networking.istio.io/v1beta1/namespaces/shop/virtualservices/reviews",
                              "request": {"kind": "VirtualService", "spec": {"hosts": ["reviews"]}},
                              "requestMetadata": {"callerIp": "34.1.2.3", "callerSuppliedUserAgent": "kubectl/v1.28"},
                              "response": {"kind": "Status", "code": 403, "status": "Failure"},
                              "serviceName": "k8s.io", "status": {"code": 7}},
             "timestamp": "2024-05-12T05:13:08.760303Z", "labels": {"authorization.k8s.io/decision": "forbid"}}
    ev = one([json.dumps(entry)])
    assert (ev["event_type"], ev["verb"], ev["resource_kind"], ev["resource_namespace"], ev["resource_name"],
            ev["resource_api_group"], ev["actor"], ev["status"], ev["authz_decision"], ev["src_ip"]) == \
        ("config_change", "create", "VirtualService", "shop", "reviews", "networking.istio.io", "dev@example.com",
         403, "deny", "34.1.2.3")
    assert ev["change_targets"] == ["reviews"]


@pytest.mark.parametrize(("server_field", "policy"), [
    ("server=metrics-api", "server/metrics-api"),
    ("server=default:deny", "default/deny"),
    ("server.group=policy.linkerd.io server.kind=server server.name=web-http", "server/web-http"),
])
def test_linkerd_denial_forms_keep_the_policy(server_field: str, policy: str) -> None:
    line = (f"[ 623.878567s] INFO ThreadId(01) inbound:server{{port=8085}}: linkerd_app_inbound::policy::"
            f"authorize::http: Request denied {server_field} tls=None(NoClientHello) client=192.168.1.253:39024")
    ev = one([line])
    assert (ev["authz_decision"], ev["authz_policy"], ev["dst_port"], ev["src_ip"], ev["protocol"]) == \
        ("deny", policy, 8085, "192.168.1.253", "http")


def test_linkerd_json_proxy_log_denial() -> None:
    rec = {"timestamp": "[  1289.245238s]", "level": "INFO",
           "fields": {"message": "Request denied", "server.group": "policy.linkerd.io", "server.kind": "server",
                      "server.name": "web", "route.group": "", "route.kind": "default", "route.name": "default",
                      "client.tls": "None(NoClientHello)", "client.ip": "10.0.3.252"},
           "target": "linkerd_app_inbound::policy::http", "spans": [{"name": "inbound"}, {"port": 8080, "name": "server"}],
           "threadId": "ThreadId(1)"}
    ev = one([json.dumps(rec)], labels={"namespace": "shop", "pod": "web-5d8f7c9b6d-x2x9q"})
    assert (ev["format"], ev["authz_policy"], ev["src_ip"], ev["dst_port"], ev["dst_workload"], ev["mtls"]) == \
        ("linkerd_proxy_json", "server/web route/default", "10.0.3.252", 8080, "web", False)


def test_forced_format_still_detects_the_carried_record() -> None:
    doc = {"@timestamp": "2022-08-22T13:08:23.188Z", "ecs": {}, "event": {"original": ISTIO_OUT}}
    ev = one([json.dumps(doc)], fmt="ecs")
    assert (ev["format"], ev["status"]) == ("istio_text", 200)


def test_envelopes_nested_too_deep_are_rejected_not_looped() -> None:
    inner: Any = ISTIO_OUT
    for i in range(8):
        inner = json.dumps({"_index": "i", "_id": str(i), "_source": {"log": inner}})
    events, rejects = parse([inner])
    assert not events and "nested more than" in rejects[0]["reason"]
