"""Authentication failures become ``authn`` events with the reason.

Real samples: ../shared/samples has no JWT/RequestAuthentication, Linkerd identity or server-side
handshake failure record (checked: MANIFEST.tsv and grep for jwt/401/certify/handshake), so the
positive cases below are built from documented facts, each cited:

* ``jwt_authn_access_denied{<message>}``: Envoy's jwt_authn filter sets this RESPONSE_CODE_DETAILS
  (envoyproxy/envoy ``test/extensions/filters/http/jwt_authn/filter_test.cc`` expects
  ``jwt_authn_access_denied{Jwt is not in the form of ...}``); access logs render spaces as ``_``
  (``jwt_authn_access_denied{Jwt_is_missing}``, ``{Jwks_doesn't_have_key_to_match_kid_or_alg_from_Jwt}``
  quoted from gateway logs in public repositories). The surrounding line is Istio's default TEXT layout
  of the real sample istio/istio_pr27903_response_code_details.log.
* ``%DOWNSTREAM_TRANSPORT_FAILURE_REASON%`` in a custom JSON format (istio#54672, formats.md section 1)
  with the new-style ``TLS_error:|...:TLS_error_end`` text of the real sample
  istio/istio_pr52886_hbone_transport_errors.log.
* Linkerd proxy lines quoted from linkerd2 issues #3937 (``Failed to certify identity``) and #5662
  (``Connection closed error=unexpected error: no server certificate chain resolved``).

And the real samples are checked not to produce false ``authn`` events.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from meshlens.filters import DEFAULT_RULES, FilterConfig
from meshlens.formats.detect import Parser
from meshlens.ingest import ingest_batches, ingest_files
from meshlens.records import RawBatch
from meshlens.store import open_store

LABELS = {"namespace": "foo", "pod": "httpbin-74fb669cc6-xkq2h", "container": "istio-proxy"}
TS = 1604000000 * 10**9

JWT_TEXT = ('[2020-10-29T03:26:01.002Z] "GET /headers HTTP/1.1" 401 - jwt_authn_access_denied{Jwt_is_expired} - '
            '"-" 0 14 0 - "-" "curl/7.73.0-DEV" "4e6b3a52-6c1a-9a83-a1c3-0c2f0f1d8a11" "httpbin:8000" "-" '
            'inbound|8000|| - 172.17.0.7:80 172.17.0.6:60900 outbound_.8000_._.httpbin.foo.svc.cluster.local -')
JWT_KID_TEXT = JWT_TEXT.replace("Jwt_is_expired", "Jwks_doesn't_have_key_to_match_kid_or_alg_from_Jwt")
JWT_AUDIENCE_JSON = json.dumps({
    "start_time": "2020-10-29T03:26:02.000Z", "method": "GET", "path": "/headers", "protocol": "HTTP/1.1",
    "response_code": 403, "response_flags": "-", "response_code_details": "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}",
    "connection_termination_details": None, "upstream_transport_failure_reason": None, "bytes_received": 0,
    "bytes_sent": 33, "duration": 0, "upstream_service_time": None, "x_forwarded_for": None,
    "user_agent": "curl/7.73.0-DEV", "request_id": "9a3c", "authority": "httpbin:8000", "upstream_host": None,
    "upstream_cluster": "inbound|8000||", "upstream_local_address": None,
    "downstream_local_address": "172.17.0.7:80", "downstream_remote_address": "172.17.0.6:60910",
    "requested_server_name": "outbound_.8000_._.httpbin.foo.svc.cluster.local", "route_name": "default"})
DOWNSTREAM_TLS_JSON = json.dumps({
    "start_time": "2020-10-29T03:27:00.000Z", "method": None, "path": None, "protocol": None, "response_code": 0,
    "response_flags": "-", "response_code_details": None, "connection_termination_details": None,
    "upstream_transport_failure_reason": None,
    "downstream_transport_failure_reason":
        "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end",
    "bytes_received": 0, "bytes_sent": 0, "duration": 1, "upstream_service_time": None, "x_forwarded_for": None,
    "user_agent": None, "request_id": None, "authority": None, "upstream_host": None,
    "upstream_cluster": "inbound|8000||", "upstream_local_address": None,
    "downstream_local_address": "172.17.0.7:80", "downstream_remote_address": "172.17.0.9:51234",
    "requested_server_name": None, "route_name": None})
LINKERD_CERTIFY = ('ERR! [   601.108122s] linkerd2_proxy_identity::certify Failed to certify identity: '
                   'grpc-status: Unknown, grpc-message: "the request could not be dispatched in a timely fashion"')
LINKERD_NO_CERT = ('[     4.391229s]  INFO ThreadId(02) daemon:admin{listen.addr=0.0.0.0:4191}:accept{peer.addr='
                   '10.44.2.101:38814 target.addr=10.44.5.98:4191}: linkerd2_app_core::serve: Connection closed '
                   'error=unexpected error: no server certificate chain resolved')
# Not authentication failures: protocol detection timeout, and a denial's follow-up line (linkerd2#9286)
LINKERD_DETECT = ('[   101.1s]  INFO ThreadId(01) inbound:accept{client.addr=10.0.0.1:1234}: linkerd_app_core::serve: '
                  'Connection closed error=TLS detection timed out')
LINKERD_FOLLOWUP = ('[1892678.776962s]  INFO ThreadId(01) inbound: linkerd_app_core::serve: Connection closed '
                    'error=unauthorized connection on server/prometheus-admin client.addr=10.2.76.70:52118')


def _parse(lines: list[str]):
    b = RawBatch(source="test:authn")
    for i, line in enumerate(lines):
        b.append(line, TS + i, LABELS, str(i))
    ev, rej = Parser().parse(b)
    return ev.to_pandas(), rej.to_pandas()


def test_jwt_failures_are_authn_with_the_reason() -> None:
    ev, rej = _parse([JWT_TEXT, JWT_KID_TEXT, JWT_AUDIENCE_JSON])
    assert rej.empty
    assert ev.event_type.tolist() == ["authn"] * 3
    assert ev.authn_reason.tolist() == ["Jwt is expired", "Jwks doesn't have key to match kid or alg from Jwt",
                                       "Audiences in Jwt are not allowed"]
    assert ev.status.tolist() == [401, 401, 403]
    first = ev.iloc[0]
    assert (first.direction, first.dst_service, first.dst_namespace, first.src_ip) == (
        "inbound", "httpbin", "foo", "172.17.0.6")
    assert first.response_code_details == "jwt_authn_access_denied{Jwt_is_expired}"
    assert pd.isna(first.authz_decision)  # authentication, not an authorization decision


def test_server_side_handshake_failure_is_authn() -> None:
    ev, rej = _parse([DOWNSTREAM_TLS_JSON])
    assert rej.empty
    e = ev.iloc[0]
    assert (e.event_type, e.direction, e.dst_service, e.src_ip) == ("authn", "inbound", "httpbin", "172.17.0.9")
    assert "CERTIFICATE_VERIFY_FAILED" in e.authn_reason and e.tls_failure_reason == e.authn_reason


def test_linkerd_identity_failures() -> None:
    ev, rej = _parse([LINKERD_CERTIFY, LINKERD_NO_CERT, LINKERD_DETECT, LINKERD_FOLLOWUP])
    assert ev.event_type.tolist() == ["authn", "authn"]
    certify, no_cert = ev.iloc[0], ev.iloc[1]
    assert certify.authn_reason.startswith("Failed to certify identity: grpc-status: Unknown")
    assert (certify.mesh, certify.format, certify.src_workload) == ("linkerd", "linkerd_proxy", "httpbin")
    assert no_cert.authn_reason == "unexpected error: no server certificate chain resolved"
    assert (no_cert.direction, no_cert.src_ip, no_cert.dst_workload) == ("inbound", "10.44.2.101", "httpbin")
    assert len(rej) == 2  # detection timeout: a diagnostics line; the denial follow-up: already counted


def test_authn_events_are_stored_and_never_filtered_or_sampled(db: Path) -> None:
    probe_401 = JWT_TEXT.replace('"curl/7.73.0-DEV"', '"kube-probe/1.29"').replace("/headers", "/healthz")
    b = RawBatch(source="test:authn")
    for i, line in enumerate([JWT_TEXT, probe_401, DOWNSTREAM_TLS_JSON, LINKERD_NO_CERT]):
        b.append(line, TS + i, LABELS, str(i))
    with open_store(db) as store:
        c = ingest_batches(store, [b], source="test:authn", progress=False,
                           filters=FilterConfig(rules=DEFAULT_RULES, sample_success=0.01))
        assert (c.stored, c.filtered) == (4, 0)
        rows = store.con.execute("SELECT event_type, authn_reason, sample_weight FROM events").fetchall()
    assert {r[0] for r in rows} == {"authn"} and all(r[1] and r[2] == 1.0 for r in rows)


def test_real_samples_have_no_false_authn(shared_samples: Path, tmp_path: Path) -> None:
    files = sorted(p for p in shared_samples.rglob("*") if p.is_file() and p.name != "MANIFEST.tsv")
    ingest_files(tmp_path / "s.duckdb", files, progress=False, filters=FilterConfig())
    with open_store(tmp_path / "s.duckdb", read_only=True) as s:
        types = dict(s.con.execute("SELECT event_type, count(*) FROM events GROUP BY 1").fetchall())
        tls = s.scalar("SELECT count(*) FROM events WHERE tls_failure_reason IS NOT NULL")
    assert "authn" not in types
    assert types["tls"] == 1 and tls >= 1 and types["authz"] >= 5  # upstream TLS stays tls, RBAC stays authz


@pytest.mark.parametrize("line", [JWT_TEXT, DOWNSTREAM_TLS_JSON])
def test_authn_rolls_up_as_authn_failures(line: str, db: Path) -> None:
    from datetime import UTC, datetime

    from meshlens.retention import RetentionPolicy, apply_retention

    b = RawBatch(source="test:authn")
    b.append(line, TS, LABELS, "0")
    with open_store(db) as store:
        ingest_batches(store, [b], source="test:authn", progress=False)
        apply_retention(store, RetentionPolicy(events_days=0), now=datetime(2021, 1, 1, tzinfo=UTC))
        got = dict(store.con.execute("SELECT metric, value FROM series").fetchall())
    assert got["authn_failures"] == 1.0 and got["requests"] == 1.0
