"""The compliance views and explorer data access of meshlens.analysis.audit, on a store with known content.

``build_audit_store`` (also used by the report, schedule and browser tests) writes a small mesh whose
every finding is planted by hand, so each view's expected rows are known exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from meshlens.analysis import audit
from meshlens.errors import ConfigError
from meshlens.store import open_store, writing
from tests.support.audit_store import (
    DENY_POLICY,
    LEGACY,
    NS,
    T0,
    _hop,
    audit_rows,
    build_audit_store,
    events_table,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    db = build_audit_store(tmp_path_factory.mktemp("audit") / "audit.duckdb")
    s = open_store(db, read_only=True)
    yield s
    s.close()


def test_denied_requests_counts_each_request_once_by_policy_and_caller(store) -> None:
    df = audit.denied_requests(store)
    row = df[(df.policy == DENY_POLICY) & (df.caller == LEGACY) & (df.dst_service == "ratings")].iloc[0]
    assert row.denied == 3  # 6 records (access log + RBAC debug line per request) = 3 requests
    assert row.example_paths == "/ratings/0, /ratings/1, /ratings/2"
    twin = df[df.caller == "jobs/batch"].iloc[0]  # the workload came from the client's twin record
    assert (twin.policy, twin.denied, twin.example_paths) == (DENY_POLICY, 1, "/ratings/9")
    assert "10.0.7.7" not in df.caller.tolist()
    shadow = df[(df.caller == LEGACY) & (df.dst_service == "reviews")].iloc[0]
    assert (shadow.denied, shadow.dry_run_denied) == (0, 1)
    assert df.iloc[0].policy == DENY_POLICY  # most denied first
    assert set(audit.denied_requests(store, include_dry_run=False).dry_run_denied) == {0}


def test_filters_by_namespace_service_and_half_open_window(store) -> None:
    assert audit.denied_requests(store, namespace="shop").caller.tolist() == ["tools/scanner"]
    assert DENY_POLICY not in audit.denied_requests(store, namespace="shop").policy.tolist()
    assert audit.denied_requests(store, service="cart").dst_service.tolist() == ["cart"]
    # The denials are at minutes 30, 31, 32: [T0+31m, T0+32m) holds exactly one.
    df = audit.denied_requests(store, T0 + pd.Timedelta(minutes=31), "2024-05-01T10:32:00Z")
    assert df[df.policy == DENY_POLICY].denied.sum() == 1
    with pytest.raises(ConfigError, match="empty time range"):
        audit.denied_requests(store, "2024-05-01T11:00:00Z", "2024-05-01T10:00:00Z")
    with pytest.raises(ConfigError, match="start: invalid time"):
        audit.denied_requests(store, "yesterday-ish")


def test_plaintext_traffic_only_edges_with_plaintext_and_share(store) -> None:
    df = audit.plaintext_traffic(store)
    assert set(df.dst) == {f"{NS}/details"}
    client = df[df.src == f"{NS}/productpage"].iloc[0]  # the outbound side names the caller workload
    assert client.plaintext == 10
    assert client.requests == 61  # 60 hops + the /actuator request
    assert client.plaintext_ratio == pytest.approx(10 / 61)
    assert client.ports == "9080"
    assert client.first_plaintext == T0 + pd.Timedelta(seconds=2)
    assert "10.0.0.1" not in df.src.tolist()  # kubelet probes are plaintext by design
    probes = audit.plaintext_traffic(store, include_probes=True)
    assert probes[probes.src == "10.0.0.1"].plaintext.tolist() == [3]


def test_sensitive_access_prefix_semantics_and_allowed_vs_denied(store) -> None:
    df = audit.sensitive_access(store)
    admin = df[df.pattern == "/admin"]
    by_caller = {r.caller: r for r in admin.itertuples()}
    debug = by_caller[f"spiffe://cluster.local/ns/{NS}/sa/debug-tool"]
    assert (debug.requests, debug.allowed, debug.denied) == (2, 2, 0)
    assert debug.methods == "GET, POST"
    pp = by_caller[f"spiffe://cluster.local/ns/{NS}/sa/productpage"]
    assert (pp.requests, pp.allowed, pp.denied) == (1, 0, 1)  # /admin 403; /administrator is not /admin
    assert "/administrator" not in " ".join(df.example_paths)
    assert set(df.pattern) == {"/admin", "/actuator"}
    glob = audit.sensitive_access(store, patterns=["*/users"])
    assert glob.requests.sum() == 1
    with pytest.raises(ConfigError, match="must start with '/'"):
        audit.sensitive_access(store, patterns=["admin"])


def test_policy_changes_lists_mesh_policies_only_never_secrets(store) -> None:
    df = audit.policy_changes(store)
    assert df[["actor", "kind", "name"]].values.tolist() == [
        ["alice@example.com", "AuthorizationPolicy", "deny-legacy"],
        ["ci-bot", "DestinationRule", "ratings"],
    ]
    assert df.iloc[0].targets == "ratings"
    assert '"DENY"' in df.iloc[0].spec
    assert len(audit.policy_changes(store, spec_chars=10).iloc[0].spec) == 10
    every = audit.policy_changes(store, kinds=["Deployment", "Secret"])
    assert "Secret" not in every.kind.tolist()
    assert "Deployment" in every.kind.tolist()


def test_tls_failures_by_edge_and_reason(store) -> None:
    df = audit.tls_failures(store)
    assert df.failures.sum() == 4
    assert df.iloc[0].reason.startswith("TLS_error")
    assert set(df.dst) == {f"{NS}/ratings"}
    assert df.iloc[0].response_flags == "UF"


def test_summary_headline_counts(store) -> None:
    s = audit.summary(store).set_index("check")["count"]
    assert s["denied"] == 5  # 3 legacy + 1 twin + 1 shop
    assert s["denied_callers"] == 3
    assert s["plaintext"] == 10
    assert s["sensitive"] == 4  # adm-1, adm-2, adm-3, act-1 (not /administrator)
    assert s["policy_changes"] == 2
    assert s["tls_failures"] == 4
    assert s["events"] == len(audit_rows())


def test_explorer_data_access(store) -> None:
    opts = audit.filter_options(store)
    assert opts["namespaces"] == ["bookinfo", "jobs", "shop", "tools"]
    assert {"reviews", "ratings", "productpage", "scanner"} <= set(opts["services"])
    assert opts["event_types"][:2] == ["request", "authz"]
    assert opts["start"] == T0
    rows = audit.events(store, event_types=["config_change"], limit=2)
    assert len(rows) == 2 and rows.ts.is_monotonic_decreasing
    assert audit.count_events(store, event_types="config_change") == 4
    assert audit.count_events(store, namespace="shop") == 1
    tl = audit.event_timeline(store, buckets=12)
    assert tl.events.sum() == len(audit_rows())
    assert tl.ts.nunique() <= 13
    edges = audit.top_edges(store, limit=3)
    assert len(edges) == 3 and edges.requests.is_monotonic_decreasing
    ratings = audit.top_edges(store, service="ratings")
    rr = ratings[(ratings.src == f"{NS}/reviews") & (ratings.dst == f"{NS}/ratings")].iloc[0]
    assert rr.errors_5xx == 15 + 4  # minutes 90..118 step 2, plus the TLS failures
    with pytest.raises(ConfigError, match="unknown event columns"):
        audit.events(store, columns=["ts", "password"])
    assert audit.event_timeline(store, namespace="nowhere").empty


def test_views_on_an_empty_store(tmp_path: Path) -> None:
    with writing(tmp_path / "empty.duckdb"):
        pass
    with open_store(tmp_path / "empty.duckdb", read_only=True) as s:
        for fn in (audit.denied_requests, audit.plaintext_traffic, audit.sensitive_access,
                   audit.policy_changes, audit.tls_failures):
            assert fn(s).empty
        assert audit.summary(s)["count"].sum() == 0


def test_explorer_widget_controls_drive_the_views(store) -> None:
    from meshlens.widgets import Explorer

    ex = Explorer(store, limit=5)
    assert ex.error is None and ex.total == len(audit_rows()) and len(ex.events) == 5
    assert ex.row.value == 0 and len(ex.row.options) == 5
    ex.namespace.value = "shop"
    assert [v for _, v in ex.service.options] == ["", "cart"]  # the service list follows the namespace
    assert ex.total == 1 and ex.events.dst_service.tolist() == ["cart"]
    ex.namespace.value = ""
    ex.event_types.value = ("config_change",)
    assert ex.total == 4 and set(ex.events.event_type) == {"config_change"}
    ex.start.value = "latest-30m"  # relative to the newest event: only the last half hour
    assert ex.total == 0 and ex.row.value is None
    ex.event_types.value = ()
    assert 0 < ex.total < len(audit_rows()) and ex.timeline.events.sum() == ex.total
    ex.start.value = "not a time"
    assert "invalid time" in ex.error and "invalid time" in ex.status.value
    ex.start.value = ""
    assert ex.error is None and ex.total == len(audit_rows())
    assert {"src", "dst", "requests", "errors_5xx"} <= set(ex.edges.columns)


def test_authn_failures_are_listed_and_counted(tmp_path) -> None:
    """JWT denials ingested from an Istio line appear in the audit view and the summary (issue 8)."""
    from meshlens.analysis import audit as audit_mod
    from meshlens.ingest import ingest_files
    from meshlens.store import open_store

    line = ('[2024-05-01T10:00:00.000Z] "GET /api/orders HTTP/1.1" 401 - jwt_authn_access_denied{Jwt_is_expired} '
            '- "-" 0 14 1 - "-" "curl/8" "req-1" "orders:8080" "-" inbound|8080|| - 10.0.0.5:8080 '
            '10.0.0.9:51234 outbound_.8080_._.orders.shop.svc.cluster.local -')
    f = tmp_path / "a.log"
    f.write_text(line + "\n")
    db = tmp_path / "s.duckdb"
    ingest_files(db, [f], progress=False)
    with open_store(db, read_only=True) as store:
        df = audit_mod.authn_failures(store)
        summary = audit_mod.summary(store).set_index("check")["count"]
    assert len(df) == 1 and df.iloc[0].failures == 1 and "expired" in df.iloc[0].reason.lower()
    assert df.iloc[0].dst == "shop/orders"
    assert summary["authn_failures"] == 1


def test_sampled_store_counts_estimate_the_traffic(tmp_path: Path) -> None:
    """On a store ingested with success sampling (rate 1/4: one hop in four kept, weight 4), hop counts
    are estimates of the traffic, not counts of kept records; protected hops (denials) stay exact."""
    rows: list[dict[str, Any]] = []
    for i in range(400):  # 400 plaintext successes; a sampler at rate 0.25 keeps 100 of them, weighted 4
        if i % 4 == 0:
            rows += [{**r, "sample_weight": 4.0}
                     for r in _hop(T0 + pd.Timedelta(seconds=i), f"ok-{i}", "legacy", "reviews", mtls=False)]
    for i in range(7):  # denials are never sampled
        rows += [{**r, "sample_weight": 1.0, "event_type": "authz", "authz_decision": "deny", "authz_policy": "p"}
                 for r in _hop(T0 + pd.Timedelta(seconds=i), f"deny-{i}", "legacy", "reviews", status=403)]
    with writing(tmp_path / "s.duckdb") as w:
        w.insert_batch(events_table(rows))
    with open_store(tmp_path / "s.duckdb", read_only=True) as s:
        summ = audit.summary(s).set_index("check")["count"]
        plain = audit.plaintext_traffic(s)
        edges = audit.top_edges(s)
    assert summ["requests"] == 407 and summ["plaintext"] == 400 and summ["denied"] == 7
    assert summ["events"] == len(rows)  # stored records stay a plain count
    assert plain[["requests", "plaintext"]].values.tolist() == [[407, 400]]
    assert edges[["requests", "denied", "plaintext"]].values.tolist() == [[407, 7, 400]]
