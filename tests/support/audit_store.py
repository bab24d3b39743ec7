"""A hand-built audit store (events written as Arrow rows) for the audit views and the report tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from meshlens import schema
from meshlens.store import writing

T0 = pd.Timestamp("2024-05-01T10:00:00Z")
NS = "bookinfo"


LEGACY = "spiffe://cluster.local/ns/shop/sa/legacy"


DENY_POLICY = "ns[bookinfo]-policy[deny-legacy]-rule[0]"


_ARROW = {
    "VARCHAR": pa.string(), "TIMESTAMPTZ": pa.timestamp("ns", tz="UTC"), "BIGINT": pa.int64(),
    "INTEGER": pa.int32(), "DOUBLE": pa.float64(), "BOOLEAN": pa.bool_(), "JSON": pa.string(),
    "VARCHAR[]": pa.list_(pa.string()), "MAP(VARCHAR, VARCHAR)": pa.map_(pa.string(), pa.string()),
}


EVENT_SCHEMA = pa.schema([pa.field(c.name, _ARROW[c.type]) for c in schema.EVENT_COLUMNS])


def events_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the event columns) -> an Arrow table of the full events schema."""
    out = []
    for i, r in enumerate(rows):
        ts = pd.Timestamp(r["ts"])
        full = {c: None for c in schema.EVENT_COLUMN_NAMES}
        full.update(r)
        full["ts"] = ts.to_pydatetime()
        full["ts_ns"] = int(ts.value)
        full["event_id"] = r.get("event_id") or f"ev{i:06d}"
        full["ingested_at"] = T0.to_pydatetime()
        full["source"] = r.get("source", "test:audit")
        full["raw"] = r.get("raw") or json.dumps({k: str(v) for k, v in r.items()})
        if isinstance(full.get("change_spec"), dict):
            full["change_spec"] = json.dumps(full["change_spec"])
        if full.get("labels") is not None:
            full["labels"] = list(full["labels"].items())
        out.append(full)
    return pa.Table.from_pylist(out, schema=EVENT_SCHEMA)


def _hop(ts: pd.Timestamp, rid: str, src: str, dst: str, *, status: int = 200, mtls: bool | None = True,
         path: str = "/", flags: str | None = None, tls_reason: str | None = None,
         principal: str | None = None, src_ns: str = NS, method: str = "GET") -> list[dict[str, Any]]:
    """Both proxy records of one hop: the client's outbound and the server's inbound record."""
    common = {"ts": ts, "event_type": "request", "record_kind": "access_log", "mesh": "istio",
              "format": "istio_json", "status": status, "mtls": mtls, "path": path, "method": method,
              "response_flags": flags, "request_id": rid, "dst_service": dst, "dst_namespace": NS,
              "dst_port": 9080, "protocol": "HTTP/1.1", "duration_ms": 12.0, "tls_failure_reason": tls_reason}
    if tls_reason:
        common["event_type"] = "tls"
    outbound = {**common, "direction": "outbound", "src_workload": src, "src_namespace": src_ns}
    inbound = {**common, "direction": "inbound", "dst_workload": dst,
               "src_principal": principal or (f"spiffe://cluster.local/ns/{src_ns}/sa/{src}" if mtls else None),
               "src_ip": "10.0.0.9"}
    return [outbound, inbound]


def audit_rows() -> list[dict[str, Any]]:
    """Two hours of bookinfo traffic with every audit finding planted at a known place."""
    rows: list[dict[str, Any]] = []
    for minute in range(0, 120, 2):
        ts = T0 + pd.Timedelta(minutes=minute)
        rows += _hop(ts, f"r{minute}-a", "productpage", "reviews")
        late = minute >= 90
        rows += _hop(ts + pd.Timedelta(seconds=1), f"r{minute}-b", "reviews", "ratings",
                     status=503 if late else 200, flags="UF,URX" if late else None)
        # productpage -> details: plaintext for the first 10 requests only
        rows += _hop(ts + pd.Timedelta(seconds=2), f"r{minute}-c", "productpage", "details",
                     mtls=minute >= 20)
    # A denied legacy caller: 3 enforced denials (each logged by the access log AND an RBAC debug line),
    # and one dry-run denial.
    for i in range(3):
        ts = T0 + pd.Timedelta(minutes=30 + i)
        base = {"ts": ts, "event_type": "authz", "mesh": "istio", "authz_decision": "deny",
                "authz_policy": DENY_POLICY, "src_principal": LEGACY, "dst_service": "ratings",
                "dst_namespace": NS, "path": f"/ratings/{i}", "request_id": f"deny-{i}", "status": 403,
                "direction": "inbound"}
        rows.append({**base, "record_kind": "access_log", "format": "istio_json"})
        rows.append({**base, "record_kind": "proxy_log", "format": "envoy_rbac_debug", "status": None})
    rows.append({"ts": T0 + pd.Timedelta(minutes=40), "event_type": "authz", "record_kind": "proxy_log",
                 "mesh": "istio", "authz_decision": "shadow_deny", "authz_policy": DENY_POLICY,
                 "src_principal": LEGACY, "dst_service": "reviews", "dst_namespace": NS, "request_id": "shadow-1"})
    # Sensitive endpoints: 2 allowed /admin requests by debug-tool, one denied, one /administrator
    # (must NOT match the /admin prefix), one /actuator/health.
    rows += _hop(T0 + pd.Timedelta(minutes=50), "adm-1", "debug-tool", "reviews", path="/admin/users")
    rows += _hop(T0 + pd.Timedelta(minutes=51), "adm-2", "debug-tool", "reviews", path="/admin?verbose=1",
                 method="POST")
    rows += _hop(T0 + pd.Timedelta(minutes=52), "adm-3", "productpage", "reviews", path="/admin", status=403)
    rows += _hop(T0 + pd.Timedelta(minutes=53), "adm-4", "productpage", "reviews", path="/administrator")
    rows += _hop(T0 + pd.Timedelta(minutes=54), "act-1", "productpage", "details", path="/actuator/health")
    # TLS failures on reviews -> ratings at the incident.
    for i in range(4):
        rows += _hop(T0 + pd.Timedelta(minutes=91 + i, seconds=30), f"tls-{i}", "reviews", "ratings",
                     status=503, flags="UF", mtls=None,
                     tls_reason="TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED")
    # Config changes: two mesh policies, one Deployment (not a mesh policy) and one Secret (never shown).
    change = {"event_type": "config_change", "record_kind": "audit", "mesh": "kubernetes", "format": "k8s_audit",
              "resource_namespace": NS}
    rows.append({**change, "ts": T0 + pd.Timedelta(minutes=29), "actor": "alice@example.com", "verb": "create",
                 "resource_kind": "AuthorizationPolicy", "resource_name": "deny-legacy",
                 "resource_api_group": "security.istio.io", "change_targets": ["ratings"],
                 "change_spec": {"action": "DENY", "selector": {"matchLabels": {"app": "ratings"}}}})
    rows.append({**change, "ts": T0 + pd.Timedelta(minutes=88), "actor": "ci-bot", "verb": "patch",
                 "resource_kind": "DestinationRule", "resource_name": "ratings",
                 "resource_api_group": "networking.istio.io", "change_targets": ["ratings"],
                 "change_spec": {"host": "ratings", "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}})
    rows.append({**change, "ts": T0 + pd.Timedelta(minutes=60), "actor": "bob", "verb": "patch",
                 "resource_kind": "Deployment", "resource_name": "details", "resource_api_group": "apps",
                 "change_targets": ["details"]})
    rows.append({**change, "ts": T0 + pd.Timedelta(minutes=61), "actor": "bob", "verb": "create",
                 "resource_kind": "Secret", "resource_name": "db-creds", "resource_api_group": ""})
    # A denial logged by the server with only the caller's IP; the client's twin record names the workload.
    twin = {"ts": T0 + pd.Timedelta(minutes=45), "mesh": "istio", "record_kind": "access_log", "status": 403,
            "dst_service": "ratings", "dst_namespace": NS, "request_id": "twin-1", "path": "/ratings/9"}
    rows.append({**twin, "event_type": "authz", "direction": "inbound", "src_ip": "10.0.7.7",
                 "authz_decision": "deny", "authz_policy": DENY_POLICY})
    rows.append({**twin, "event_type": "request", "direction": "outbound", "src_workload": "batch",
                 "src_namespace": "jobs"})
    # Kubelet probes: plaintext by design, left out of the plaintext findings by default.
    for i in range(3):
        rows.append({"ts": T0 + pd.Timedelta(minutes=10 * i), "event_type": "request", "record_kind": "access_log",
                     "mesh": "istio", "direction": "inbound", "src_ip": "10.0.0.1", "dst_service": "details",
                     "dst_namespace": NS, "path": "/healthz", "status": 200, "mtls": False,
                     "user_agent": "kube-probe/1.29", "request_id": f"probe-{i}"})
    # Another namespace, to test the namespace filter.
    rows.append({"ts": T0 + pd.Timedelta(minutes=5), "event_type": "authz", "record_kind": "access_log",
                 "mesh": "linkerd", "authz_decision": "deny", "authz_policy": "shop/server-auth",
                 "src_workload": "scanner", "src_namespace": "tools", "dst_service": "cart",
                 "dst_namespace": "shop", "path": "/cart", "request_id": "shop-deny", "status": 403})
    return rows


def build_audit_store(path: str | Path) -> Path:
    """Write the planted audit data to ``path`` and publish its read-only snapshot."""
    with writing(path) as store:
        store.insert_batch(events_table(audit_rows()))
    return Path(path)
