"""The service call graph, built from proxy access logs: hops, edges, and request chains.

A *hop* is one call ``caller -> callee`` inside one request. In a sidecar mesh it is usually logged
twice: by the client's sidecar (``direction = outbound``: knows the calling workload, sees failures the
client proxy decides itself -- no route, no healthy upstream, connect/TLS failure, timeout) and by the
server's sidecar (``inbound``: knows the server, sees what the server answered and local replies such
as RBAC denials and rate limits). :func:`hops_sql` turns records into one row per hop without a
costly pairing of every record:

* a client record *is* a hop: caller, status the caller saw, flags, duration;
* the server's view is only needed where something went wrong, so failed or denied server records are
  aggregated per (request id, called service) -- a few percent of the traffic -- and joined onto the
  client records (``srv_*``: did the server itself fail, was it an authorization denial, which policy);
* a server record that names its client's workload (Linkerd logs the client identity; Linkerd proxies
  log only the server side), and a record whose side is unknown (an Envoy local reply such as a 404
  ``NR`` has no upstream cluster to tell), is a hop of its own -- unless a client record of the same
  request and service exists (then it is the same call, seen twice). When the record does not name the
  caller, the workload owning its client IP (learnt from client records) does.

The request id is ``x-request-id`` (Linkerd logs it as the trace id); ``rid`` is its 64-bit hash, which
makes joins cheap. Because the id is propagated along the whole call tree, the hops of one request form
its call tree, which lets the root-cause analysis follow a failing request at the edge down to the
deepest hop that failed first (see :func:`deepest_failures_sql`).

Limits: a call whose only record is a server record without the client's identity (an Istio server
called by an un-meshed client, or whose client's logs were not collected) is not a hop: it is invisible
to the call graph (it still counts in the per-service views built from records). Records without any
request id are hops of their own and cannot be followed through the tree. Kubelet health checks are
excluded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import duckdb
import pandas as pd

from meshlens.analysis.common import FAILED_SQL, PROBE_SQL, Window, resolve_window, temp_name
from meshlens.formats import envoy
from meshlens.store import Store

HOP_COLUMNS = (
    "rid", "request_id", "ts_ns", "caller", "caller_ns", "callee", "callee_ns", "method", "path", "status",
    "flags", "details", "failed", "dur_ms", "tls_reason", "has_client", "srv_failed", "srv_status",
    "srv_details", "denied", "policy", "w",
)
"""Columns of a hop row (see the module docstring). ``w`` is the record's ``sample_weight`` (1, or 1/rate for
a success kept by ingest-time success sampling): counts are ``sum(w)`` so they stay unbiased on sampled
stores; failures are never sampled, so failing request chains are always complete."""

TLS_SQL = ("coalesce(tls_failure_reason, CASE WHEN transport_failure_reason ILIKE '%tls%' "
           "OR transport_failure_reason ILIKE '%certificate%' OR transport_failure_reason ILIKE '%ssl%' "
           "THEN transport_failure_reason END)")
"""SQL: the TLS failure reason of a record, if its transport failure was a TLS one."""

RID_SQL = "hash(coalesce(request_id, trace_id, event_id))"
"""SQL: the request key of a record (records without any id are requests of their own)."""

TRAFFIC_SQL = (f"record_kind = 'access_log' AND ts_ns >= $lo AND ts_ns < $hi AND dst_service IS NOT NULL "
               f"AND NOT {PROBE_SQL}")
"""SQL: proxied requests in ``[$lo, $hi)``, health checks excluded."""


def hops_sql(*, where: str = "TRUE", rids: str | None = None) -> str:
    """SQL for the hop rows of ``[$lo, $hi)`` (see the module docstring).

    ``where``: an extra condition on ``events`` columns (a fixed SQL fragment; values go in bind
    parameters). ``rids``: name of a table with a ``rid`` column, to keep only those requests.
    """
    keep = f"{TRAFFIC_SQL} AND ({where})"
    if rids:
        keep += f" AND {RID_SQL} IN (SELECT rid FROM {rids})"
    return f"""
    WITH rec AS (
        SELECT ts_ns, {RID_SQL} AS rid, coalesce(request_id, trace_id) AS request_id,
               direction = 'outbound' AS is_client, direction IS NULL AS no_dir, src_workload, src_namespace,
               src_ip, dst_service, dst_namespace,
               method, path, status, response_flags, response_code_details, duration_ms,
               authz_decision = 'deny' AS denied, authz_policy, {TLS_SQL} AS tls_reason, {FAILED_SQL} AS failed,
               coalesce(sample_weight, 1.0) AS w
        FROM events WHERE {keep}
    ),
    cli AS (SELECT * FROM rec WHERE is_client),
    own AS (SELECT * FROM rec WHERE NOT coalesce(is_client, FALSE) AND (src_workload IS NOT NULL OR no_dir)),
    ipmap AS (
        SELECT src_ip, arg_max(src_workload, n) AS workload, arg_max(src_namespace, n) AS namespace
        FROM (SELECT src_ip, src_workload, src_namespace, count(*) AS n FROM cli
              WHERE src_ip IN (SELECT src_ip FROM own WHERE src_workload IS NULL) GROUP BY ALL)
        GROUP BY src_ip
    ),
    -- a semi-join probed by the client records (a hash table of the few server records that name their
    -- client, not of every client record): the same pairs, a fraction of the cost on a sidecar mesh
    seen_twice AS (SELECT DISTINCT rid, dst_service FROM cli WHERE (rid, dst_service) IN (SELECT rid, dst_service FROM own)),
    srv AS (
        SELECT rid, dst_service, max(status) AS srv_status,
               max(response_code_details) FILTER (WHERE failed) AS srv_details, bool_or(failed) AS srv_failed,
               bool_or(denied) AS denied, max(authz_policy) FILTER (WHERE denied) AS policy
        FROM rec WHERE NOT coalesce(is_client, FALSE) AND (failed OR denied)
        GROUP BY rid, dst_service
    )
    SELECT c.rid, c.request_id, c.ts_ns, c.src_workload AS caller, c.src_namespace AS caller_ns,
           c.dst_service AS callee, c.dst_namespace AS callee_ns, c.method, c.path, c.status,
           c.response_flags AS flags, c.response_code_details AS details, c.failed,
           coalesce(c.duration_ms, 0) AS dur_ms, c.tls_reason, TRUE AS has_client,
           coalesce(s.srv_failed, FALSE) AS srv_failed, s.srv_status, s.srv_details,
           coalesce(s.denied, FALSE) AS denied, s.policy, c.w
    FROM cli c LEFT JOIN srv s USING (rid, dst_service)
    UNION ALL
    SELECT o.rid, o.request_id, o.ts_ns, coalesce(o.src_workload, ip.workload, 'unknown'),
           coalesce(o.src_namespace, ip.namespace), o.dst_service, o.dst_namespace,
           o.method, o.path, o.status, o.response_flags, o.response_code_details, o.failed,
           coalesce(o.duration_ms, 0), o.tls_reason, FALSE, o.failed AND NOT o.no_dir, o.status,
           CASE WHEN o.failed AND NOT o.no_dir THEN o.response_code_details END, coalesce(o.denied, FALSE),
           CASE WHEN o.denied THEN o.authz_policy END, o.w
    FROM own o ANTI JOIN seen_twice t USING (rid, dst_service)
    LEFT JOIN ipmap ip ON o.src_workload IS NULL AND ip.src_ip = o.src_ip
    """


@contextmanager
def hop_table(store: Store, window: Window, *, rids: str | None = None, where: str = "TRUE",
              params: dict[str, Any] | None = None) -> Iterator[str]:
    """Materialize hops as a connection-local temp table; yields its name and drops it afterwards.

    Temp tables work on read-only stores (they live in the connection's memory), so the analyses run
    against the published snapshot while an ingest writes.
    """
    name = temp_name("hops")
    try:
        store.con.execute(f"CREATE TEMP TABLE {name} AS {hops_sql(where=where, rids=rids)}",
                          {"lo": window.lo_ns, "hi": window.hi_ns, **(params or {})})
        yield name
    finally:
        with suppress(duckdb.Error):
            store.con.execute(f"DROP TABLE IF EXISTS {name}")


EDGE_STATS_SQL = """
    SELECT caller AS src, any_value(caller_ns) AS src_namespace, callee AS dst,
           any_value(callee_ns) AS dst_namespace, CAST(round(sum(w)) AS BIGINT) AS requests,
           CAST(round(coalesce(sum(w) FILTER (WHERE failed), 0)) AS BIGINT) AS failed,
           CAST(round(coalesce(sum(w) FILTER (WHERE coalesce(status, 0) >= 500), 0)) AS BIGINT) AS errors_5xx,
           CAST(round(coalesce(sum(w) FILTER (WHERE status BETWEEN 400 AND 499), 0)) AS BIGINT) AS errors_4xx,
           CAST(round(coalesce(sum(w) FILTER (WHERE denied), 0)) AS BIGINT) AS denied,
           CAST(round(coalesce(sum(w) FILTER (WHERE tls_reason IS NOT NULL), 0)) AS BIGINT) AS tls_failures,
           round(coalesce(sum(w) FILTER (WHERE failed), 0) / sum(w), 4) AS error_ratio,
           round(approx_quantile(dur_ms, 0.5), 1) AS p50_ms, round(approx_quantile(dur_ms, 0.99), 1) AS p99_ms,
           to_timestamp(min(ts_ns) / 1e9) AS first_seen, to_timestamp(max(ts_ns) / 1e9) AS last_seen
    FROM ({hops}) h {where}
    GROUP BY caller, callee
"""


def service_graph(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None,
) -> pd.DataFrame:
    """The call graph over ``[start, end)``: one row per edge ``src -> dst``.

    Columns: ``src, src_namespace, dst, dst_namespace, requests, failed, errors_5xx, errors_4xx, denied,
    tls_failures, error_ratio, p50_ms, p99_ms, first_seen, last_seen``. ``namespace`` / ``service`` keep
    edges touching them. Requests are hops (a call logged by both sidecars counts once); latency is what
    the caller saw when its sidecar logged the call, else the server's.
    """
    window = resolve_window(store, start, end)
    conds, params = [], {"lo": window.lo_ns, "hi": window.hi_ns}
    if namespace:
        conds.append("(caller_ns = $ns OR callee_ns = $ns)")
        params["ns"] = namespace
    if service:
        conds.append("(caller = $svc OR callee = $svc)")
        params["svc"] = service
    where = ("WHERE " + " AND ".join(conds)) if conds else ""
    return store.query(EDGE_STATS_SQL.format(hops=hops_sql(), where=where) + " ORDER BY requests DESC", params)


def call_path(edges: pd.DataFrame, src: str, dst: str | None, *, src_col: str = "src",
              dst_col: str = "dst") -> list[str]:
    """A shortest call path ``src -> ... -> dst`` in an edge table (e.g. :func:`service_graph`), for
    highlighting the failing path in a drawing; ``[]`` when there is none. (Breadth-first search over the
    edge list: graphs of services are small, this is not over events.)"""
    if dst is None or src not in set(edges[src_col]) and src not in set(edges[dst_col]):
        return []
    succ: dict[str, list[str]] = {}
    for a, b in zip(edges[src_col], edges[dst_col], strict=True):
        succ.setdefault(str(a), []).append(str(b))
    prev: dict[str, str | None] = {src: None}
    frontier = [src]
    while frontier and dst not in prev:
        nxt = []
        for node in frontier:
            for m in sorted(succ.get(node, [])):
                if m not in prev:
                    prev[m] = node
                    nxt.append(m)
        frontier = nxt
    if dst not in prev:
        return []
    path = [dst]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])  # type: ignore[arg-type]
    return path[::-1]


def request_hops(store: Store, request_id: str, start: Any = None, end: Any = None) -> pd.DataFrame:
    """Every hop of one request (by ``x-request-id`` / trace id), in time order: a drill-down for an
    example request id quoted in root-cause evidence."""
    window = resolve_window(store, start, end)
    return store.query(
        f"SELECT to_timestamp(ts_ns / 1e9) AS ts, caller, callee, method, path, status, flags, details, failed, "
        f"dur_ms, srv_status, srv_details, denied, policy, tls_reason FROM ({hops_sql(where='coalesce(request_id, trace_id) = $rid')}) "
        f"ORDER BY ts_ns", {"lo": window.lo_ns, "hi": window.hi_ns, "rid": request_id})


def deepest_failures_sql(hops: str, req: str) -> str:
    """SQL for the deepest failing hops of the failing requests listed in ``req`` (``rid, period,
    sym_failed``); ``hops`` holds (at least) the hops of those requests.

    A failing hop ``C -> T`` is *deepest* when ``T`` made no failing call of its own in that request
    (so the failure started at ``T`` or on the way to it), and it is *connected* to the symptom when
    ``C`` itself failed in that request (or ``C`` is the root: the gateway or a job). A failed call
    whose caller recovered -- an optional dependency, a retried call -- does not explain the symptom
    and is left out, which is what keeps a loud but unrelated service from being blamed.

    ``side`` says where the evidence places the fault: ``server`` (the callee's own sidecar reported the
    failure: application 5xx, RBAC denial, local rate limit), ``callee`` (client-side flags that mean the
    callee did not answer: timeout, no healthy upstream, connection reset/refused; or a failing
    ``grpc-status`` under HTTP 200 that it answered with, seen only by the client), or ``edge`` (the
    client could not even reach it for a reason that may lie on either side: no route, no cluster, TLS
    handshake failure).
    """
    return f"""
    WITH fh AS (
        SELECT h.*, r.period
        FROM {hops} h JOIN {req} r ON h.rid = r.rid
        WHERE h.failed AND r.sym_failed
    ),
    roots AS (
        SELECT DISTINCT fh.rid, fh.caller FROM fh
        WHERE NOT EXISTS (SELECT 1 FROM {hops} q WHERE q.rid = fh.rid AND q.callee = fh.caller)
    )
    SELECT a.*,
           CASE WHEN a.srv_failed THEN 'server'
                WHEN {envoy.flags_match_sql('a.flags', envoy.flags_where(owner='callee'))} THEN 'callee'
                WHEN {envoy.flags_match_sql('a.flags', envoy.flags_where(owner='connect'))} AND a.tls_reason IS NULL
                  THEN 'callee'
                WHEN a.flags IS NULL AND coalesce(a.status, 0) >= 500 THEN 'callee'
                WHEN a.flags IS NULL AND a.status IN (401, 403, 429) THEN 'callee'
                -- failed under a 2xx: a failing grpc-status the callee answered with
                WHEN a.flags IS NULL AND coalesce(a.status, 0) BETWEEN 200 AND 299 THEN 'callee'
                ELSE 'edge' END AS side
    FROM fh a
    WHERE NOT EXISTS (SELECT 1 FROM fh b WHERE b.rid = a.rid AND b.caller = a.callee AND b.callee <> a.callee)
      AND (EXISTS (SELECT 1 FROM fh p WHERE p.rid = a.rid AND p.callee = a.caller)
           OR EXISTS (SELECT 1 FROM roots x WHERE x.rid = a.rid AND x.caller = a.caller))
    """
