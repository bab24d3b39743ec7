"""The Envoy/Istio family's real-world shapes (issue 13), each a registry format: ztunnel JSON/text and
policy decisions, Envoy's native log prefix, historical Istio TEXT defaults, waypoint clusters, and
JSON key sets named after Envoy command operators. Lines are shaped like the public records under
tests/data/real/envoy (which the real-records harness scores field by field); these tests pin the
derivations and the reject reasons."""

from __future__ import annotations

from typing import Any

import pytest

from meshlens.formats import bulk
from meshlens.formats.detect import Parser
from meshlens.records import RawBatch


def _parse(lines: list[str], fmt: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ev, rej = Parser(fmt=fmt).parse(RawBatch(lines=lines, source="t"))
    return ev.to_pylist(), rej.to_pylist()


def _one(line: str, fmt: str | None = None) -> dict[str, Any]:
    ev, rej = _parse([line], fmt)
    assert not rej, rej
    return ev[0]


ZT_JSON = ('{"level":"error","time":"2024-08-22T10:00:00.5Z","scope":"access","message":"connection complete",'
           '"src.addr":"10.244.1.6:42020","src.workload":"reviews-v1-6584ddcf65-k78wz","src.namespace":"default",'
           '"src.identity":"spiffe://cluster.local/ns/default/sa/bookinfo-reviews","dst.addr":"10.244.1.9:15008",'
           '"dst.hbone_addr":"10.244.1.9:9080","dst.service":"productpage.default.svc.cluster.local",'
           '"dst.workload":"productpage-v1-d5789fdfb-c5w2c","dst.namespace":"default","direction":"inbound",'
           '"bytes_sent":0,"bytes_recv":0,"duration":"0ms",'
           '"error":"connection closed due to policy rejection: explicitly denied by: default/deny-reviews"}')


def test_ztunnel_json_policy_rejection_names_the_policy() -> None:
    e = _one(ZT_JSON)
    assert (e["format"], e["event_type"], e["direction"], e["authz_decision"], e["authz_policy"]) == (
        "ztunnel", "authz", "inbound", "deny", "default/deny-reviews")
    assert (e["src_workload"], e["src_ip"], e["dst_service"], e["dst_workload"], e["dst_port"]) == (
        "reviews-v1", "10.244.1.6", "productpage", "productpage-v1", 9080)
    assert e["mtls"] is True and e["duration_ms"] == 0.0


@pytest.mark.parametrize("line", [
    '2024-04-11T15:38:42.182974Z  INFO access: connection complete src.addr=10.244.0.24:46238 '
    'src.workload="shell-6d8bcd654d-t88gp" dst.addr=10.244.0.42:15008 dst.hbone_addr=10.96.108.116:80 '
    'dst.service="echo.default.svc.cluster.local" direction="outbound" bytes_sent=67 bytes_recv=490 duration="13ms"',
    '2024-04-11T15:38:42.182974Z\tinfo\taccess\tconnection complete\tsrc.addr=10.244.0.24:46238 '
    'src.workload="shell-6d8bcd654d-t88gp" dst.addr=10.244.0.42:15008 dst.hbone_addr=10.96.108.116:80 '
    'dst.service="echo.default.svc.cluster.local" direction="outbound" bytes_sent=67 bytes_recv=490 duration="13ms"',
])
def test_ztunnel_text_in_both_layouts(line: str) -> None:
    e = _one(line)
    assert (e["format"], e["event_type"], e["direction"], e["src_workload"], e["dst_service"], e["dst_namespace"],
            e["dst_port"], e["bytes_sent"], e["bytes_received"], e["duration_ms"]) == (
        "ztunnel", "request", "outbound", "shell", "echo", "default", 80, 67, 490, 13.0)
    # no identity logged: mTLS unknown, not FALSE
    assert e["mtls"] is None
    # forcing the format reads the text shape too
    assert _one(line, fmt="ztunnel")["dst_port"] == 80


def test_ztunnel_decisions_and_non_records() -> None:
    ev, rej = _parse([
        '{"level":"info","time":"2026-08-03T15:39:07.5Z","scope":"ztunnel::state","message":"no allow policies matched",'
        '"proxy":{"wl":"shop/cart-6cbcc86f5d-lhq82"},"inbound":{"peer":"10.244.0.5:52814"}}',
        '{"level":"info","time":"2026-08-03T15:39:07.5Z","scope":"ztunnel::state","message":"allow policy match",'
        '"policy":"shop/allow-web","proxy":{"wl":"shop/cart-6cbcc86f5d-lhq82"}}',
        '2024-04-11T00:26:42.295630Z DEBUG access: connection opened src.addr=10.0.0.1:1 direction="outbound"',
        '{"level":"info","scope":"access","message":"connection complete","src.addr":"1.2.3.4:5","duration":"soon"}',
    ])
    assert [(e["authz_decision"], e["authz_policy"], e["dst_namespace"], e["dst_workload"]) for e in ev] == [
        ("deny", None, "shop", "cart"), ("allow", "shop/allow-web", "shop", "cart")]
    assert "connection opened" in rej[0]["reason"]
    assert rej[1]["format"] == "ztunnel" and "duration 'soon'" in rej[1]["reason"]


def test_envoy_native_prefix_outcomes() -> None:
    ev, rej = _parse([
        "[2024-09-26 11:41:28.955][3492043][debug][rbac] [source/extensions/filters/http/rbac/rbac_filter.cc:194] "
        "enforced denied, matched policy none",
        "[2024-09-26 11:41:28.955][1][debug][rbac] [source/extensions/filters/network/rbac/rbac_filter.cc:97] "
        "shadow denied, matched policy deny-all",
        "[Envoy (Epoch 0)] [2020-04-07 11:47:24.787][31][debug][jwt] [external/envoy/source/extensions/filters/http/"
        "jwt_authn/filter.cc:61] Called Filter : check complete Jwt is expired",
        "envoy-1  | [2025-03-05 07:22:38.631][15][debug][connection] [source/common/tls/ssl_socket.cc:251] "
        '[Tags: "ConnectionId":"1"] remote address:172.20.0.4:443,TLS_error:|268436504:SSL routines:'
        "OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA:TLS_error_end",
        "2024-03-15 07:00:59.294\t[2024-03-15 07:00:59.294][22][trace][ext_authz] [source/extensions/filters/http/"
        "ext_authz/ext_authz.cc:468] ext_authz filter rejected the request. Response status code: '403'",
        "[2024-09-26 11:41:28.955][3492043][debug][http] [source/common/http/conn_manager_impl.cc:1316] request end",
    ])
    got = [(e["event_type"], e["authz_decision"], e["authz_policy"], e["authn_reason"], e["status"]) for e in ev]
    assert got == [("authz", "deny", "none", None, None), ("authz", "shadow_deny", "deny-all", None, None),
                   ("authn", None, None, "Jwt is expired", None), ("tls", None, None, None, None),
                   ("authz", "deny", "ext_authz", None, 403)]
    assert ev[0]["ts_ns"] == 1727350888955000000 and ev[0]["mesh"] == "envoy" and ev[2]["mesh"] == "istio"
    assert ev[3]["tls_failure_reason"].startswith("TLS_error:|268436504")
    assert len(rej) == 1 and "component without an authz/authn outcome" in rej[0]["reason"]


ISTIO_17 = ('[2020-05-23T08:07:48.824Z] "GET /favicon.ico HTTP/1.1" 503 UF "-" "TLS error: 268435581" 0 91 3 - '
            '"10.10.210.84" "curl/7.58.0" "259635c4-58be-9126-ba11-d353a26b043f" "web:8080" "10.0.0.7:8080" '
            "outbound|8080||web.shop.svc.cluster.local - 10.10.202.119:8080 10.10.210.84:39368 - default")
ISTIO_11 = ('[2019-09-03T05:37:41.341Z] "GET /index HTTP/1.1" 200 - "UNAVAILABLE:mixer" 148 171 4 3 "-" "-" '
            '"c0ce81db-4f5a-9134-8a5c-f8c076c91652" "hello-world" "192.168.89.50:9001" '
            "outbound|80||hello-world.default.svc.cluster.local - 10.97.86.53:80 192.168.167.113:39953 -")


def test_istio_1_2_to_1_7_text_with_mixer_status() -> None:
    e = _one(ISTIO_17)
    assert (e["format"], e["status"], e["response_flags"], e["transport_failure_reason"], e["bytes_received"],
            e["bytes_sent"], e["duration_ms"], e["user_agent"], e["upstream_host"], e["route_name"], e["src_ip"]) == (
        "istio_text", 503, "UF", "TLS error: 268435581", 0, 91, 3.0, "curl/7.58.0", "10.0.0.7:8080", "default",
        "10.10.210.84")
    assert (e["direction"], e["dst_service"], e["dst_namespace"], e["dst_port"]) == ("outbound", "web", "shop", 8080)


def test_istio_1_1_text_mixer_status_is_not_a_transport_failure() -> None:
    e = _one(ISTIO_11)
    assert (e["status"], e["bytes_received"], e["bytes_sent"], e["duration_ms"], e["upstream_service_time_ms"]) == (
        200, 148, 171, 4.0, 3.0)
    assert e["transport_failure_reason"] is None and e["event_type"] == "request"
    assert (e["dst_service"], e["src_ip"], e["route_name"]) == ("hello-world", "192.168.167.113", None)


def test_truncated_mixer_era_line_is_rejected_naming_the_layout() -> None:
    ev, rej = _parse(['[2020-05-23T08:07:48.824Z] "GET / HTTP/1.1" 404 NR route_not_found "-" "-" 0 0 0 - "1" "2" '
                      '"3" "4" "5" - - 1.2.3.4:80 5.6.7.8:9 - -'])
    assert not ev and "Istio 1.2-1.7" in rej[0]["reason"]


def test_waypoint_record_is_server_side() -> None:
    e = _one('[2025-01-09T12:57:24.551Z] "GET /reviews/0 HTTP/1.1" 200 - via_upstream - "-" 0 442 5 5 "-" '
             '"Go-http-client/1.1" "9c1ea9ee-cb88-9434-8c40-9011dd817000" "reviews:9080" '
             '"envoy://connect_originate/10.217.0.82:9080" inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local; '
             "envoy://internal_client_address/ 10.217.5.70:9080 10.217.0.84:53560 - default")
    assert (e["direction"], e["dst_service"], e["dst_namespace"], e["dst_port"], e["src_ip"], e["upstream_cluster"]) == (
        "inbound", "reviews", "bookinfo", 9080, "10.217.0.84", "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local")
    # the waypoint is not the destination workload, and the record says nothing about mTLS
    assert e["dst_workload"] is None and e["mtls"] is None


def test_envoy_gateway_and_operator_named_json_keys() -> None:
    eg = _one('{":authority":"www.example.com","bytes_received":0,"bytes_sent":466,"duration":7,"method":"GET",'
              '"protocol":"HTTP/1.1","response_code":200,"response_code_details":"via_upstream",'
              '"start_time":"2025-12-24T10:30:50.941Z","upstream_cluster":"httproute/default/backend/rule/0",'
              '"user-agent":"curl/7.87.0","x-envoy-origin-path":"/get","x-envoy-upstream-service-time":"5",'
              '"x-forwarded-for":"10.244.0.8","x-request-id":"2ab6ffcd","downstream_remote_address":"127.0.0.1:5"}')
    assert (eg["path"], eg["authority"], eg["user_agent"], eg["request_id"], eg["upstream_service_time_ms"],
            eg["mesh"], eg["src_ip"]) == ("/get", "www.example.com", "curl/7.87.0", "2ab6ffcd", 5.0, "envoy", "127.0.0.1")
    gloo = _one('{"httpMethod":"GET","responseCode":"503","upstreamCluster":"default-petstore-8080_gloo-system",'
                '"upstreamHost":"10.52.0.54:8080","duration":"4","startTime":"2020-03-17T18:39:54.919Z",'
                '"requestId":"r1","userAgent":"curl"}')
    assert (gloo["method"], gloo["status"], gloo["upstream_cluster"], gloo["duration_ms"], gloo["request_id"],
            gloo["user_agent"], gloo["ts_ns"]) == (
        "GET", 503, "default-petstore-8080_gloo-system", 4.0, "r1", "curl", 1584470394919000000)
    contour = _one('{"@timestamp":"2021-04-14T16:36:00.361Z","authority":"localhost:8080","method":"GET",'
                   '"path":"/foo","response_code":200,"upstream_cluster":"default/s1/80/da39a3ee5e",'
                   '"grpc_status":"OK","grpc_status_number":0}')
    assert (contour["ts_ns"], contour["grpc_status"], contour["mesh"]) == (1618418160361000000, 0, "envoy")
    # "grpc_status": "%GRPC_STATUS%" (Envoy's default CAMEL_STRING names), SNAKE_STRING and NUMBER renderings
    for value, code in (("Unavailable", 14), ("DEADLINE_EXCEEDED", 4), ("CANCELLED", 1), ("Canceled", 1),
                        ("13", 13), ("OK", 0), ("-", None)):
        grpc = _one('{"start_time":"2024-05-01T10:00:00.000Z","response_code":200,"method":"POST",'
                    '"path":"/hipstershop.CartService/GetCart","protocol":"HTTP/2",'
                    '"upstream_cluster":"outbound|7070||cartservice.shop.svc.cluster.local",'
                    f'"grpc_status":"{value}"}}')
        assert (grpc["status"], grpc["grpc_status"]) == (200, code), value
    # plain Istio JSON stays Istio
    assert _one('{"response_code":200,"upstream_cluster":"outbound|80||a.b.svc.cluster.local","method":"GET"}'
                )["mesh"] == "istio"


def test_operator_key_spellings() -> None:
    assert {"user-agent", "user_agent", "userAgent"} <= set(bulk.json_aliases("user_agent"))
    assert {":authority", "authority"} <= set(bulk.json_aliases("authority"))
    assert "x-envoy-origin-path" in bulk.json_aliases("path")
    # ECS documents nest http.response.status_code: that must not route them to the Envoy JSON extractor
    assert not any("status" in k for k in bulk.JSON_MARKER_KEYS)


def test_json_without_a_response_code_needs_a_request_signal() -> None:
    ev, rej = _parse(['{"upstreamCluster":"x","upstreamHost":"1.2.3.4:80"}', '{"upstream_cluster":"x","response_code":"abc"}'])
    assert not ev and all("RESPONSE_CODE" in r["reason"] for r in rej)
