"""ECS documents -> events (meshlens.formats.ecs): one behaviour per test."""

from __future__ import annotations

import json

import pytest

from meshlens.formats.base import Reject
from meshlens.formats.ecs import looks_like_ecs, parse_ecs

# Shaped like a Filebeat/Elastic Agent access-log document after an ingest pipeline (ECS 8.x names).
ECS_DOC = {
    "@timestamp": "2024-06-01T10:00:00.123456789Z",
    "event": {"duration": 12_500_000, "outcome": "success", "category": ["web"], "type": ["access"],
              "dataset": "envoyproxy.log"},
    "http": {"request": {"method": "get", "id": "abc-123", "body": {"bytes": 0}},
             "response": {"status_code": 503, "body": {"bytes": 91}}, "version": "1.1"},
    "url": {"path": "/api/v1/cart", "query": "id=7", "domain": "cart.shop.svc.cluster.local"},
    "source": {"ip": "10.244.1.7", "port": 51234},
    "destination": {"ip": "10.244.2.9", "port": 8080},
    "network": {"direction": "outbound", "transport": "tcp"},
    "user_agent": {"original": "curl/8.5.0"},
    "trace": {"id": "4bf92f3577b34da6a3ce929d0e0e4736"},
    "envoyproxy": {"response_flags": ["UF", "URX"]},
}
LABELS = {"namespace": "shop", "pod": "frontend-7d4b9c8f6-abcde", "container": "istio-proxy"}


def parse(doc: dict, labels: dict | None = None) -> dict:
    return parse_ecs(json.dumps(doc), doc, labels or {})


def test_maps_request_fields_and_units() -> None:
    ev = parse(ECS_DOC, LABELS)
    assert ev["method"] == "GET"
    assert ev["status"] == 503
    assert ev["path"] == "/api/v1/cart?id=7"
    assert ev["duration_ms"] == 12.5  # event.duration is nanoseconds
    assert ev["protocol"] == "HTTP/1.1"
    assert (ev["bytes_sent"], ev["bytes_received"]) == (91, 0)
    assert ev["request_id"] == "abc-123"
    assert ev["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ev["user_agent"] == "curl/8.5.0"
    assert ev["response_flags"] == "UF,URX"
    assert ev["ts_ns"] == 1717236000123456789
    assert ev["format"] == "ecs" and ev["event_type"] == "request" and ev["record_kind"] == "access_log"


def test_outbound_record_names_the_writer_as_source_and_the_host_as_destination() -> None:
    ev = parse(ECS_DOC, LABELS)
    assert (ev["src_workload"], ev["src_namespace"]) == ("frontend", "shop")
    assert (ev["dst_service"], ev["dst_namespace"], ev["dst_port"]) == ("cart", "shop", 8080)
    assert ev["src_ip"] == "10.244.1.7"
    assert ev["upstream_host"] == "10.244.2.9:8080"
    assert ev["mesh"] == "istio"  # from the istio-proxy container label


def test_inbound_record_names_the_writer_as_destination() -> None:
    doc = {**ECS_DOC, "network": {"direction": "ingress"}}
    ev = parse(doc, {"namespace": "shop", "app": "cart"})
    assert ev["direction"] == "inbound"
    assert (ev["dst_workload"], ev["dst_namespace"]) == ("cart", "shop")
    assert ev.get("src_workload") is None


def test_dotted_keys_are_read_like_nested_objects() -> None:
    doc = {"@timestamp": "2024-06-01T10:00:00Z", "http.request.method": "POST",
           "http.response.status_code": "201", "url.original": "https://api.example.com/v1/orders?x=1"}
    ev = parse(doc)
    assert (ev["method"], ev["status"], ev["path"]) == ("POST", 201, "/v1/orders?x=1")


def test_denied_event_type_is_an_authz_denial_with_the_rule() -> None:
    doc = {**ECS_DOC, "event": {"type": ["denied"]}, "rule": {"name": "deny-all"}}
    ev = parse(doc, LABELS)
    assert ev["event_type"] == "authz"
    assert (ev["authz_decision"], ev["authz_policy"]) == ("deny", "deny-all")


def test_tcp_connection_without_http_has_status_zero() -> None:
    doc = {"@timestamp": "2024-06-01T10:00:00Z", "source": {"ip": "10.0.0.1", "bytes": 120},
           "destination": {"ip": "10.0.0.2", "port": 5432, "bytes": 3400}, "network": {"transport": "tcp"},
           "event": {"duration": 2_000_000_000}}
    ev = parse(doc)
    assert (ev["protocol"], ev["status"], ev["duration_ms"]) == ("tcp", 0, 2000.0)
    assert (ev["bytes_received"], ev["bytes_sent"]) == (120, 3400)


def test_mutual_tls_and_spiffe_identities() -> None:
    doc = {**ECS_DOC, "tls": {"established": True,
                              "client": {"x509": {"alternative_names": ["spiffe://cluster.local/ns/shop/sa/frontend"]}},
                              "server": {"x509": {"alternative_names": ["spiffe://cluster.local/ns/shop/sa/cart"]}}}}
    ev = parse(doc, LABELS)
    assert ev["mtls"] is True
    assert ev["src_principal"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert ev["dst_principal"] == "spiffe://cluster.local/ns/shop/sa/cart"


def test_failed_tls_handshake_is_a_tls_event_with_the_error() -> None:
    doc = {**ECS_DOC, "tls": {"established": False}, "error": {"message": "TLS error: CERTIFICATE_VERIFY_FAILED"}}
    ev = parse(doc, LABELS)
    assert ev["event_type"] == "tls"
    assert ev["tls_failure_reason"] == "TLS error: CERTIFICATE_VERIFY_FAILED"


@pytest.mark.parametrize("doc, reason", [
    ({"message": "hello", "agent": {"type": "filebeat"}, "ecs": {"version": "8.0.0"}}, "without request fields"),
    ({**ECS_DOC, "http": {"response": {"status_code": "abc"}}}, "not an integer"),
    ({**ECS_DOC, "http": {"response": {"status_code": 7000}}}, "not an HTTP status"),
    ({**ECS_DOC, "@timestamp": "yesterday"}, "not an RFC 3339 time"),
    ({**ECS_DOC, "event": {"duration": "fast"}}, "not a number"),
])
def test_unmappable_documents_are_rejected_with_a_reason(doc: dict, reason: str) -> None:
    with pytest.raises(Reject) as exc:
        parse(doc)
    assert reason in exc.value.reason


def test_looks_like_ecs_ignores_shipper_envelopes_and_mesh_json() -> None:
    filebeat_envelope = {"message": "[2024-...] \"GET / HTTP/1.1\" 200", "log": {"file": {"path": "/x"}},
                         "ecs": {"version": "8.0.0"}, "kubernetes": {"namespace": "shop"}}
    istio_json = {"start_time": "2024-06-01T10:00:00.000Z", "method": "GET", "response_code": 200}
    linkerd_json = {"client.addr": "10.0.0.1:5000", "method": "GET", "status": 200}
    assert not looks_like_ecs(filebeat_envelope)
    assert not looks_like_ecs(istio_json)
    assert not looks_like_ecs(linkerd_json)
    assert looks_like_ecs(ECS_DOC)
    assert looks_like_ecs({"source": {"ip": "10.0.0.1"}, "destination": {"port": 80}})
