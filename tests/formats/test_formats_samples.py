"""Every real sample record parses into the right event, or is rejected with a clear reason.

The samples are verbatim copies from public docs, tests and issues (../shared/samples/MANIFEST.tsv).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlens.filters import FilterConfig
from meshlens.ingest import ingest_files
from meshlens.store import open_store

# file -> (events, rejects) when ingested on its own
EXPECTED_COUNTS: dict[str, tuple[int, int]] = {
    "envoy/contour_docs_envoy_default_format.log": (1, 0),
    "envoy/envoy_docs_default_format_example_wrapped.log": (1, 0),  # one line wrapped in two: rejoined
    "istio/istio_io_access_log_task.log": (2, 0),
    "istio/istio_issue17139_json_istio13_strings.jsonl": (2, 0),
    "istio/istio_issue31555_mixed_proxy_stdout.log": (2, 2),
    "istio/istio_issue37124_json_kubectl_prefix.log": (1, 0),
    "istio/istio_issue40944_rbac_bad_custom_action.log": (1, 0),
    "istio/istio_issue45802_503_UC_no_timestamp.log": (1, 0),
    "istio/istio_issue48018_json_typed.jsonl": (1, 0),
    "istio/istio_issue51178_blackhole.log": (1, 0),
    "istio/istio_pr27903_response_code_details.log": (4, 0),
    "istio/istio_pr52886_hbone_transport_errors.log": (3, 0),
    "istio/istio_rbac_debug_security_issues_doc.log": (3, 0),
    "istio/ztunnel_pr1273_policy_rejection.log": (1, 0),
    "k8s-audit/elastic_integrations_aks_wrapped_kube_audit.log": (1, 0),
    "k8s-audit/falco_create_clusterrolebinding.json": (1, 0),
    "k8s-audit/falco_create_deployment.json": (1, 0),
    "k8s-audit/falco_create_secret.json": (1, 0),
    "k8s-audit/falco_delete_configmap.json": (1, 0),
    "k8s-audit/kcp_issue1768_forbid_pretty.json": (1, 0),
    "linkerd/linkerd_docs_2.12_access_log_apache.log": (5, 0),
    # 5 records; the 5th is a kubelet probe (kube-probe UA, /ready): dropped by the default health-check
    # filters (issue 8) and counted as filtered -- see test_sample_filtered_counts
    "linkerd/linkerd_docs_2.12_access_log_json.jsonl": (4, 0),
    "linkerd/linkerd_issue13013_http_request_denied.log": (1, 1),
    "linkerd/linkerd_pr9286_tcp_connection_denied.log": (2, 2),
    # Loki API bodies: the doc examples carry a literal `...` (invalid JSON) -> one reject per document;
    # valid responses are expanded into their log lines (which are not mesh records -> rejects).
    "loki/loki_docs_query_range_streams.json": (0, 1),
    "loki/loki_docs_query_range_matrix.json": (0, 1),
    "loki/loki_docs_query_vector.json": (0, 1),
    "loki/loki_issue5079_repeated_stream_labels.json": (0, 4),
    "loki/loki_3.6.3_query_range_streams_with_stats.json": (0, 1),
    "loki/grafana_issue56071_same_timestamp_FRAGMENT.txt": (0, 2),
}


def _manifest_files(shared: Path) -> list[str]:
    rows = (shared / "MANIFEST.tsv").read_text().splitlines()[1:]
    return [r.split("\t")[0] for r in rows if r.strip()]


def test_every_manifest_file_has_an_expectation(shared_samples: Path) -> None:
    assert sorted(_manifest_files(shared_samples)) == sorted(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_sample_counts_and_conservation(shared_samples: Path, tmp_path: Path, name: str) -> None:
    path = shared_samples / name
    counts = ingest_files(tmp_path / "s.duckdb", [path], progress=False)
    assert (counts.stored, counts.rejects) == EXPECTED_COUNTS[name]
    assert counts.read == counts.stored + counts.duplicates + counts.rejects + counts.filtered
    with open_store(tmp_path / "s.duckdb", read_only=True) as s:
        reasons = s.query("SELECT reason FROM rejects").reason.tolist()
    assert all(r and len(r) > 10 for r in reasons), reasons


def test_sample_filtered_counts(shared_samples: Path, tmp_path: Path) -> None:
    counts = ingest_files(tmp_path / "s.duckdb", [shared_samples / "linkerd/linkerd_docs_2.12_access_log_json.jsonl"],
                          progress=False)
    assert counts.filtered == 1 and counts.filtered_by_rule["health_probe_user_agent"] == 1


@pytest.fixture(scope="module")
def all_events(shared_samples: Path, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("all") / "all.duckdb"
    # every record, health checks included: these tests check how each one parses
    ingest_files(db, [shared_samples / n for n in sorted(EXPECTED_COUNTS)], progress=False, filters=FilterConfig())
    with open_store(db, read_only=True) as s:
        ev = s.query("SELECT * FROM events")
        rej = s.query("SELECT * FROM rejects")
    # NULLs as None (pandas shows them as NaN), so tests can say `is None`
    return ev.astype(object).where(ev.notna(), None), rej


def _one(ev, **where):
    m = ev
    for k, v in where.items():
        m = m[m[k] == v]
    assert len(m) == 1, f"expected one event with {where}, found {len(m)}"
    return m.iloc[0]


def test_istio_text_client_and_server_records_of_one_request(all_events) -> None:
    ev, _ = all_events
    rid = "84961386-6d84-929d-98bd-c5aee93b5c88"
    out = _one(ev, request_id=rid, direction="outbound")
    inn = _one(ev, request_id=rid, direction="inbound")
    assert (out.dst_service, out.dst_namespace, out.dst_port, out.status) == ("httpbin", "foo", 8000, 418)
    assert out.upstream_cluster == "outbound|8000||httpbin.foo.svc.cluster.local"
    assert (inn.dst_service, inn.dst_namespace, inn.mtls) == ("httpbin", "foo", True)
    assert out.format == "istio_text" and out.duration_ms == 4.0 and inn.upstream_service_time_ms == 1.0
    assert str(out.ts) == "2020-11-25 21:26:18.409000+00:00" and out.ts_ns == 1606339578409000000
    assert inn.src_ip == "10.44.1.23"


def test_rbac_denials_become_authz_events_with_policy(all_events) -> None:
    ev, _ = all_events
    bad_custom = _one(ev, request_id="176ba93b-d2a5-9c58-97aa-cf4a7d70f30a")
    assert (bad_custom.event_type, bad_custom.authz_decision, bad_custom.authz_policy) == (
        "authz", "deny", "default-deny-all-due-to-bad-CUSTOM-action")
    assert bad_custom.status == 403 and bad_custom.bytes_sent == 19
    none_policy = _one(ev, request_id="07541777-6ee2-908f-a78b-867fe257ac80")
    assert none_policy.authz_policy == "none" and none_policy.response_flags is None
    dbg = ev[ev.format == "envoy_rbac_debug"].sort_values("ts_ns")
    assert dbg.authz_decision.tolist() == ["deny", "shadow_deny", "allow"]
    assert dbg.authz_policy.iloc[0] == "ns[foo]-policy[deny-path-headers]-rule[0]"


def test_tls_failures_and_transport_reasons(all_events) -> None:
    ev, _ = all_events
    tls = ev[ev.event_type == "tls"]
    assert len(tls) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in tls.iloc[0].tls_failure_reason
    refused = ev[ev.transport_failure_reason == "delayed_connect_error:_Connection_refused"]
    assert len(refused) == 1 and refused.iloc[0].event_type == "request"
    assert refused.iloc[0].src_ip is None  # envoy://internal_client_address/ is not an IP


def test_tcp_records_and_special_clusters(all_events) -> None:
    ev, _ = all_events
    bh = _one(ev, upstream_cluster="BlackHoleCluster")
    assert (bh.status, bh.response_flags, bh.protocol, bh.dst_service) == (0, "UH", "tcp", "sqa.ory.sh")
    nr = ev[(ev.response_code_details == "filter_chain_not_found")]
    assert len(nr) == 1 and nr.iloc[0].response_flags == "NR" and nr.iloc[0].method is None


def test_json_typing_across_istio_versions(all_events) -> None:
    ev, _ = all_events
    old = ev[ev.upstream_cluster == "outbound|7600||keycloak-headless.our_ns.svc.cluster.local"].iloc[0]
    assert (old.status, old.response_flags, old.duration_ms, old.bytes_sent) == (0, "UF,URX", 10006.0, 0)
    typed = _one(ev, request_id="dfdafa8f-10c3-44dc-ad6c-7a49760f499e")
    assert (typed.status, typed.upstream_service_time_ms, typed.bytes_sent) == (200, 56.0, 1819807)
    assert typed.dst_service == "sapi-tenant-part" and typed.dst_namespace == "sopei-biz"
    prefixed = ev[ev.raw.str.startswith("[curl-deployment-54dd7cb66d-vsb2w istio-proxy] ")].iloc[0]
    assert prefixed.src_workload == "curl-deployment" and prefixed.format == "istio_json"
    assert prefixed.user_agent is None and prefixed.status == 0


def test_missing_timestamp_kept_with_null_ts(all_events) -> None:
    ev, _ = all_events
    nots = _one(ev, request_id="3a7cbcc1-af72-47fb-bbac-a7672951f50f")
    assert nots.ts_ns is None and nots.ts is None
    assert (nots.status, nots.response_flags, nots.dst_service) == (503, "UC", "health-api")


def test_linkerd_records(all_events) -> None:
    ev, rej = all_events
    js = ev[ev.format == "linkerd_json"].sort_values("ts_ns")
    assert js.iloc[0].ts_ns == 1661286822321746212  # nanoseconds kept
    assert js.iloc[0].duration_ms == pytest.approx(14.441135)
    assert js.iloc[0].src_principal == "traffic.booksapp.serviceaccount.identity.linkerd.cluster.local"
    assert js.iloc[-1].mtls is False or js.iloc[-1].mtls == False  # noqa: E712 - numpy bool
    denials = ev[ev.format == "linkerd_proxy"]
    assert set(denials.authz_policy) == {"server/ops-rapid-testing-onboarding-linkerd route/default",
                                         "server/prometheus-admin"}
    assert (denials.authz_decision == "deny").all()
    assert rej.reason.str.contains("follow-up").sum() == 3


def test_k8s_audit_events(all_events) -> None:
    ev, _ = all_events
    dep = _one(ev, resource_kind="Deployment")
    assert (dep.event_type, dep.verb, dep.actor, dep.resource_namespace) == (
        "config_change", "create", "minikube-user", "default")
    assert list(dep.change_targets) == ["nginx-deployment", "nginx"]
    assert '"replicas": 1' in dep.change_spec
    forbid = _one(ev, request_id="1d1118b4-8190-4629-ae73-a36a11390098")
    assert (forbid.event_type, forbid.authz_decision, forbid.status) == ("access", "deny", 403)
    aks = _one(ev, resource_kind="Lease")
    assert aks.actor == "aksService" and aks.verb == "update"
    cm = _one(ev, resource_kind="ConfigMap")
    assert cm.verb == "delete" and cm.change_spec is None


def test_secret_values_never_stored(all_events) -> None:
    ev, _ = all_events
    secret = _one(ev, resource_kind="Secret")
    assert "MzFiNGQ0YjctMDAyNi00YzI3LWJiMGItNDk5ZDZkZjg1ZGJi" not in secret.raw
    assert "<redacted>" in secret.raw and secret.change_spec is None


def test_ztunnel_policy_rejection(all_events) -> None:
    ev, _ = all_events
    z = _one(ev, format="ztunnel")
    assert (z.event_type, z.authz_decision, z.src_workload, z.dst_service) == (
        "authz", "deny", "reviews-v1", "productpage")
    assert z.src_principal == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def test_loki_documents_are_rejected_with_reasons(all_events) -> None:
    _, rej = all_events
    docs = rej[rej.reason.str.contains("multi-line JSON document")]
    assert len(docs) == 4  # three doc examples with `...` and the truncated fragment
    assert rej.reason.str.contains("unrecognised format").sum() >= 6


def test_wrapped_envoy_doc_line_is_rejoined(all_events) -> None:
    ev, _ = all_events
    e = _one(ev, request_id="cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2")
    assert (e.format, e.method, e.path, e.status, e.authority, e.upstream_host) == (
        "envoy_default", "POST", "/api/v1/locations", 204, "locations", "tcp://10.0.2.1:80")
    assert e.position == "1-2" and e.user_agent == "nsq2http"


def test_a_truncated_envoy_line_is_not_joined_with_an_unrelated_line(tmp_path: Path) -> None:
    head = '[2016-04-15T20:17:00.310Z] "POST /api/v1/locations HTTP/2" 204 - 154 0 226 100 "10.0.35.28"'
    f = tmp_path / "t.log"
    f.write_text(head + '\n"just a quoted line"\n')
    c = ingest_files(tmp_path / "t.duckdb", [f], progress=False)
    assert (c.read, c.stored, c.rejects) == (2, 0, 2)
