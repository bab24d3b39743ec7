"""Compliance views over the store, and the data access behind the interactive explorer.

What an auditor asks of a mesh, each answered by one pure function ``fn(store, start=None, end=None,
...) -> pd.DataFrame`` running DuckDB SQL with bind parameters (no value is ever formatted into SQL):

* :func:`denied_requests` -- which callers were denied, by which policy, on which service;
* :func:`plaintext_traffic` -- edges carrying non-mTLS traffic (``mtls = false``);
* :func:`sensitive_access` -- who reached sensitive endpoints (path patterns such as ``/admin``);
* :func:`policy_changes` -- who changed which mesh policy when (``config_change`` on mesh CRDs);
* :func:`tls_failures` -- TLS / mTLS handshake and transport failures by edge and reason;
* :func:`summary` -- one row per check with its count, for the top of the audit report.

Counting: one hop is often logged twice (the client's outbound and the server's inbound record, or an
access-log denial plus an RBAC debug line), so the views first collapse records into hops (same
``request_id`` and called service, see :func:`_hops_cte`) and count hops -- one request, one count.
Records without a request id count alone (an RBAC debug line without one adds to its access-log twin).

Common filters: ``start``/``end`` (anything :func:`meshlens.timeutil.parse_time_ns` accepts, or a
datetime; half-open ``[start, end)``), ``namespace`` (source, destination or changed object's
namespace), ``service`` (destination service/workload, calling workload, or a change target).

The explorer helpers (:func:`filter_options`, :func:`events`, :func:`event_timeline`, :func:`top_edges`)
serve :mod:`meshlens.widgets`, which must not hold SQL itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from meshlens.errors import ConfigError
from meshlens.schema import EVENT_COLUMN_NAMES, EVENT_TYPES
from meshlens.store import Store
from meshlens.timeutil import parse_time_ns

DEFAULT_SENSITIVE_PATHS: tuple[str, ...] = (
    "/admin", "/debug", "/actuator", "/metrics", "/config_dump", "/internal", "/.env", "/secrets",
)
"""Path patterns treated as sensitive by default. A pattern without ``* ? [`` is a prefix of whole path
segments (``/admin`` matches ``/admin``, ``/admin/users``, ``/admin?x=1`` but not ``/administrator``);
with them it is a glob over the whole path (``*/debug/*``)."""

MESH_POLICY_KINDS: tuple[str, ...] = (
    # Istio
    "AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication", "DestinationRule",
    "VirtualService", "Gateway", "ServiceEntry", "Sidecar", "EnvoyFilter", "WorkloadEntry", "Telemetry",
    "WasmPlugin", "ProxyConfig",
    # Linkerd policy
    "Server", "ServerAuthorization", "MeshTLSAuthentication", "NetworkAuthentication", "HTTPRoute",
    "GRPCRoute",
    # Consul config entries
    "ServiceIntentions", "ServiceDefaults", "ProxyDefaults", "ServiceRouter", "ServiceSplitter",
    "ServiceResolver", "Mesh",
    # Kubernetes
    "NetworkPolicy",
)
MESH_API_GROUP_SUFFIXES: tuple[str, ...] = ("istio.io", "linkerd.io", "consul.hashicorp.com",
                                            "gateway.networking.k8s.io")

HOP_KEY = "coalesce(request_id, event_id) || '|' || coalesce(dst_service, dst_workload, '')"
"""One proxied hop: x-request-id is propagated along the whole call chain, so the called service is part
of the key; records without a request id count alone."""

CALLER_SQL = (
    "coalesce(src_principal, CASE WHEN src_workload IS NOT NULL "
    "THEN coalesce(src_namespace || '/', '') || src_workload END, src_ip, 'unknown')"
)
SRC_SQL = "coalesce(src_namespace || '/', '') || coalesce(src_workload, src_principal, src_ip, 'unknown')"
DST_SQL = "coalesce(dst_namespace || '/', '') || coalesce(dst_service, dst_workload, 'unknown')"


PROBE_SQL = "coalesce(user_agent, '') LIKE 'kube-probe/%'"
"""Kubelet health probes: plaintext by design (they come from the node, not a workload), so the
plaintext and traffic views leave them out unless asked."""


def _n(cond: str | None = None) -> str:
    """SQL: the estimated number of hops (matching ``cond``) -- ``sum(w)``, so on a store ingested with
    success sampling each sampled-in request stands for 1/rate requests (both records of a request carry
    the same weight); on an unsampled store it is the plain count."""
    return f"CAST(round(coalesce(sum(w){f' FILTER (WHERE {cond})' if cond else ''}, 0)) AS BIGINT)"


def _hops_cte(where_sql: str, hop_filter: str | None = None) -> str:
    """``WITH hops AS (...)``: the filtered records collapsed to one row per hop (see :data:`HOP_KEY`).

    The client's and the server's record of a hop each know half of it (the caller's workload vs its
    principal), so the collapse merges them: any known identity wins, a denial anywhere makes the hop
    denied, and plaintext on either side makes it plaintext. ``hop_filter`` selects hops by any of
    their records (e.g. the server's denial) while still merging in the twin that lacks the mark.
    ``w`` is the hop's sample weight (count hops with :func:`_n`).
    """
    twins = (f"AND {HOP_KEY} IN (SELECT {HOP_KEY} FROM events WHERE ({where_sql}) AND ({hop_filter}))"
             if hop_filter else "")
    return f"""
    WITH hops AS (
        SELECT {HOP_KEY} AS hop,
               min(ts) AS ts,
               max(src_principal) AS src_principal, max(src_workload) AS src_workload,
               max(src_namespace) AS src_namespace, max(src_ip) AS src_ip,
               max(dst_service) AS dst_service, max(dst_namespace) AS dst_namespace,
               max(dst_workload) AS dst_workload, max(dst_port) AS dst_port,
               max(method) AS method, max(path) AS path, max(status) AS status, max(mesh) AS mesh,
               bool_and(mtls) AS mtls,
               CASE WHEN bool_or(authz_decision = 'deny') THEN 'deny'
                    WHEN bool_or(authz_decision = 'shadow_deny') THEN 'shadow_deny'
                    ELSE max(authz_decision) END AS authz_decision,
               max(authz_policy) AS authz_policy,
               bool_or(record_kind = 'access_log') AS is_traffic,
               bool_or(event_type = 'tls' OR tls_failure_reason IS NOT NULL) AS tls_failed,
               coalesce(max(tls_failure_reason), max(response_code_details), max(response_flags))
                   AS failure_reason,
               max(response_flags) AS response_flags,
               string_agg(DISTINCT direction, ', ' ORDER BY direction) AS reported_by,
               bool_or({PROBE_SQL}) AS is_probe,
               max(coalesce(sample_weight, 1.0)) AS w
        FROM events WHERE ({where_sql}) {twins}
        GROUP BY hop
    )
    """


EXPLORE_COLUMNS: tuple[str, ...] = (
    "ts", "event_type", "mesh", "direction", "src_namespace", "src_workload", "src_principal",
    "dst_namespace", "dst_service", "method", "path", "status", "response_flags", "authz_decision",
    "authz_policy", "mtls", "tls_failure_reason", "actor", "verb", "resource_kind", "resource_namespace",
    "resource_name", "request_id", "source", "position", "raw",
)


@dataclass
class _Where:
    """A WHERE clause assembled from fixed SQL fragments plus named bind parameters."""

    clauses: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, clause: str, **params: Any) -> None:
        self.clauses.append(clause)
        self.params.update(params)

    @property
    def sql(self) -> str:
        return " AND ".join(f"({c})" for c in self.clauses) if self.clauses else "TRUE"


def _bound_ns(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, pd.Timestamp):
        return int(value.tz_convert("UTC").value if value.tzinfo else value.tz_localize("UTC").value)
    try:
        return parse_time_ns(value)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _filters(
    start: Any = None, end: Any = None, namespace: str | None = None, service: str | None = None,
) -> _Where:
    w = _Where()
    lo, hi = _bound_ns(start, "start"), _bound_ns(end, "end")
    if lo is not None:
        w.add("ts_ns >= $lo", lo=lo)
    if hi is not None:
        w.add("ts_ns < $hi", hi=hi)
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"empty time range: start {start!r} is not before end {end!r}")
    if namespace:
        w.add("src_namespace = $ns OR dst_namespace = $ns OR resource_namespace = $ns", ns=namespace)
    if service:
        w.add(
            "dst_service = $svc OR dst_workload = $svc OR src_workload = $svc "
            "OR coalesce(list_contains(change_targets, $svc), false)",
            svc=service,
        )
    return w


def _examples(expr: str, n: int = 3) -> str:
    """SQL for up to ``n`` distinct example values as one readable string."""
    return f"array_to_string(list_slice(list_sort(list(DISTINCT {expr}) FILTER (WHERE {expr} IS NOT NULL)), 1, {n}), ', ')"


# ------------------------------------------------------------------------------------------------
# Path patterns
# ------------------------------------------------------------------------------------------------


def _globs(pattern: str) -> list[str]:
    if not pattern or not pattern.startswith(("/", "*")):
        raise ConfigError(f"sensitive path pattern {pattern!r} must start with '/' (prefix) or '*' (glob)")
    if any(ch in pattern for ch in "*?["):
        return [pattern]
    base = pattern.rstrip("/") or "/"
    return [base, base.rstrip("/") + "/*", base + "[?]*"]


@dataclass(frozen=True)
class PathMatch:
    """SQL for sensitive path patterns: ``condition`` (boolean, bind ``params``) and ``label`` (a CASE
    naming the first pattern that matched; bind ``params`` and ``label_params``)."""

    condition: str
    label: str
    params: dict[str, str]
    label_params: dict[str, str]


def sensitive_path_sql(patterns: Sequence[str], column: str = "path", prefix: str = "sp") -> PathMatch:
    """SQL matching ``column`` against sensitive path patterns (see :data:`DEFAULT_SENSITIVE_PATHS`).

    Shared with any analysis that needs "sensitive endpoint" semantics (e.g. new principals reaching
    one), so the pattern rules live in one place.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ConfigError("no sensitive path patterns given")
    params: dict[str, str] = {}
    label_params: dict[str, str] = {}
    conds, cases = [], []
    for i, pattern in enumerate(patterns):
        ors = []
        for j, g in enumerate(_globs(pattern)):
            params[f"{prefix}{i}_{j}"] = g
            ors.append(f"{column} GLOB ${prefix}{i}_{j}")
        label_params[f"{prefix}{i}"] = pattern
        cond = " OR ".join(ors)
        conds.append(f"({cond})")
        cases.append(f"WHEN {cond} THEN ${prefix}{i}")
    return PathMatch(" OR ".join(conds), "CASE " + " ".join(cases) + " END", params, label_params)


# ------------------------------------------------------------------------------------------------
# Compliance views
# ------------------------------------------------------------------------------------------------


def denied_requests(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, include_dry_run: bool = True,
) -> pd.DataFrame:
    """Denied requests by policy, caller and destination (enforced denials and dry-run/shadow denials).

    Columns: ``policy, caller, dst_namespace, dst_service, denied, dry_run_denied, first_seen,
    last_seen, example_paths, meshes``, most denied first.
    """
    w = _filters(start, end, namespace, service)
    decisions = ["deny", "shadow_deny"] if include_dry_run else ["deny"]
    w.params["decisions"] = decisions
    denied = "authz_decision IN (SELECT unnest($decisions::VARCHAR[]))"
    sql = f"""{_hops_cte(w.sql, denied)}
        SELECT coalesce(authz_policy, '(not logged)') AS policy,
               {CALLER_SQL} AS caller,
               dst_namespace, dst_service,
               {_n("authz_decision = 'deny'")} AS denied,
               {_n("authz_decision = 'shadow_deny'")} AS dry_run_denied,
               min(ts) AS first_seen, max(ts) AS last_seen,
               {_examples("path")} AS example_paths,
               {_examples("mesh")} AS meshes
        FROM hops WHERE {denied}
        GROUP BY ALL
        ORDER BY denied DESC, dry_run_denied DESC, policy, caller
    """
    return store.query(sql, w.params)


def plaintext_traffic(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, include_probes: bool = False,
) -> pd.DataFrame:
    """Edges that carried plaintext (``mtls = false``) requests, with the share of the edge's traffic.

    Only proxied requests/connections (``record_kind = 'access_log'``) count, and kubelet health probes
    (``kube-probe/*`` user agent, plaintext by design) only with ``include_probes``. Columns: ``src, dst,
    requests, plaintext, mtls, unknown, plaintext_ratio, ports, first_plaintext, last_plaintext,
    reported_by`` (which proxy sides logged the plaintext hops), most plaintext first.
    """
    w = _filters(start, end, namespace, service)
    w.add("record_kind = 'access_log'")
    probes = "TRUE" if include_probes else "NOT is_probe"
    sql = f"""{_hops_cte(w.sql)}
        SELECT {SRC_SQL} AS src, {DST_SQL} AS dst,
               {_n()} AS requests,
               {_n("mtls = false")} AS plaintext,
               {_n("mtls")} AS mtls,
               {_n("mtls IS NULL")} AS unknown,
               plaintext / requests AS plaintext_ratio,
               {_examples("CAST(dst_port AS VARCHAR)", 5)} AS ports,
               min(ts) FILTER (WHERE mtls = false) AS first_plaintext,
               max(ts) FILTER (WHERE mtls = false) AS last_plaintext,
               string_agg(DISTINCT reported_by, '; ') FILTER (WHERE mtls = false) AS reported_by
        FROM hops WHERE {probes}
        GROUP BY ALL
        HAVING plaintext > 0
        ORDER BY plaintext DESC, src, dst
    """
    return store.query(sql, w.params)


def sensitive_access(
    store: Store, start: Any = None, end: Any = None, *, patterns: Sequence[str] = DEFAULT_SENSITIVE_PATHS,
    namespace: str | None = None, service: str | None = None,
) -> pd.DataFrame:
    """Who reached sensitive endpoints: by pattern, caller and destination, allowed vs denied.

    ``allowed`` = answered below 400 and not denied by policy; ``denied`` = a policy denial or 401/403.
    Columns: ``pattern, caller, dst_namespace, dst_service, requests, allowed, denied, methods,
    statuses, example_paths, first_seen, last_seen``, most allowed first (allowed access is the finding).
    """
    pm = sensitive_path_sql(patterns)
    w = _filters(start, end, namespace, service)
    w.params.update(pm.params)
    sql = f"""{_hops_cte(w.sql, f"path IS NOT NULL AND ({pm.condition})")}
        SELECT {pm.label} AS pattern, {CALLER_SQL} AS caller, dst_namespace, dst_service,
               {_n()} AS requests,
               {_n("coalesce(authz_decision, 'allow') <> 'deny' AND status BETWEEN 1 AND 399")} AS allowed,
               {_n("authz_decision = 'deny' OR status IN (401, 403)")} AS denied,
               {_examples("method", 5)} AS methods,
               {_examples("CAST(status AS VARCHAR)", 5)} AS statuses,
               {_examples("path")} AS example_paths,
               min(ts) AS first_seen, max(ts) AS last_seen
        FROM hops WHERE path IS NOT NULL AND ({pm.condition})
        GROUP BY ALL
        ORDER BY allowed DESC, requests DESC, pattern, caller
    """
    return store.query(sql, {**w.params, **pm.label_params})


def policy_changes(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, kinds: Sequence[str] | None = None, spec_chars: int = 300,
) -> pd.DataFrame:
    """Who changed which mesh policy when: ``config_change`` events on mesh policy/routing resources.

    A resource counts when its kind is in ``kinds`` (default :data:`MESH_POLICY_KINDS`) or its API
    group belongs to a mesh (:data:`MESH_API_GROUP_SUFFIXES`). Columns: ``ts, actor, verb, kind,
    namespace, name, api_group, targets, spec`` (the new spec, cut to ``spec_chars``), oldest first.
    """
    w = _filters(start, end, namespace, service)
    w.add("event_type = 'config_change'")
    kind_sql, kind_params = _policy_kind_sql()
    w.add(kind_sql, kinds=list(kinds or MESH_POLICY_KINDS), **kind_params)
    w.add("coalesce(resource_kind, '') <> 'Secret'")
    sql = f"""
        SELECT ts, actor, verb, resource_kind AS kind, resource_namespace AS namespace,
               resource_name AS name, resource_api_group AS api_group,
               array_to_string(change_targets, ', ') AS targets,
               left(CAST(change_spec AS VARCHAR), $spec_chars) AS spec
        FROM events WHERE {w.sql}
        ORDER BY ts, kind, name
    """
    return store.query(sql, {**w.params, "spec_chars": int(spec_chars)})


def tls_failures(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None,
) -> pd.DataFrame:
    """TLS / mTLS failures by edge and reason (``tls`` events and any record with a TLS failure reason).

    Columns: ``src, dst, reason, failures, response_flags, first_seen, last_seen``, most failures first.
    """
    w = _filters(start, end, namespace, service)
    sql = f"""{_hops_cte(w.sql, "event_type = 'tls' OR tls_failure_reason IS NOT NULL")}
        SELECT {SRC_SQL} AS src, {DST_SQL} AS dst,
               coalesce(failure_reason, '(no reason logged)') AS reason,
               {_n()} AS failures,
               {_examples("response_flags")} AS response_flags,
               min(ts) AS first_seen, max(ts) AS last_seen
        FROM hops WHERE tls_failed
        GROUP BY ALL
        ORDER BY failures DESC, src, dst
    """
    return store.query(sql, w.params)


def authn_failures(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None,
) -> pd.DataFrame:
    """Authentication failures (``authn`` events: JWT / RequestAuthentication denials, server-side mTLS
    handshake failures, Linkerd/Consul identity failures) by caller, destination and reason.

    Columns: ``caller, dst, reason, failures, statuses, first_seen, last_seen``, most failures first.
    """
    w = _filters(start, end, namespace, service)
    sql = f"""
        SELECT coalesce(src_principal, src_namespace || '/' || src_workload, src_workload, src_ip,
                        '(unknown)') AS caller,
               coalesce(dst_namespace || '/' || dst_service, dst_service, dst_workload, '(unknown)') AS dst,
               coalesce(authn_reason, response_code_details, tls_failure_reason, '(no reason logged)') AS reason,
               count(*) AS failures,
               {_examples("CAST(status AS VARCHAR)")} AS statuses,
               min(ts) AS first_seen, max(ts) AS last_seen
        FROM events WHERE event_type = 'authn' AND ({w.sql})
        GROUP BY ALL
        ORDER BY failures DESC, caller, dst
    """
    return store.query(sql, w.params)


def _policy_kind_sql() -> tuple[str, dict[str, Any]]:
    """SQL: the record is a change to a mesh policy/routing resource (never a Secret)."""
    groups = " OR ".join(f"resource_api_group LIKE $g{i}" for i in range(len(MESH_API_GROUP_SUFFIXES)))
    params: dict[str, Any] = {f"g{i}": f"%{g}" for i, g in enumerate(MESH_API_GROUP_SUFFIXES)}
    return f"(resource_kind IN (SELECT unnest($kinds::VARCHAR[])) OR {groups})", params


def summary(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, patterns: Sequence[str] = DEFAULT_SENSITIVE_PATHS,
) -> pd.DataFrame:
    """One row per audit check: ``check, count, what`` -- the headline numbers of the audit report."""
    pm = sensitive_path_sql(patterns)
    kind_sql, kind_params = _policy_kind_sql()
    w = _filters(start, end, namespace, service)
    sql = f"""{_hops_cte(w.sql)}
        SELECT {_n("is_traffic")} AS requests,
               {_n("authz_decision = 'deny'")} AS denied,
               count(DISTINCT {CALLER_SQL}) FILTER (WHERE authz_decision = 'deny') AS denied_callers,
               {_n("is_traffic AND mtls = false AND NOT is_probe")} AS plaintext,
               {_n(f"path IS NOT NULL AND ({pm.condition})")} AS sensitive,
               {_n("tls_failed")} AS tls_failures,
               (SELECT count(*) FROM events WHERE {w.sql}) AS events,
               (SELECT count(*) FROM events WHERE {w.sql} AND event_type = 'authn') AS authn_failures,
               (SELECT count(*) FROM events WHERE {w.sql} AND event_type = 'config_change'
                   AND coalesce(resource_kind, '') <> 'Secret' AND {kind_sql}) AS policy_changes
        FROM hops
    """
    all_params = {**w.params, **pm.params, **kind_params, "kinds": list(MESH_POLICY_KINDS)}
    row = store.query(sql, all_params).iloc[0]
    checks = [
        ("events", "events in the window (all types)"),
        ("requests", "distinct proxied requests/connections (hops)"),
        ("denied", "requests denied by an authorization policy"),
        ("denied_callers", "distinct callers that were denied"),
        ("plaintext", "requests without mTLS (kubelet probes excluded)"),
        ("sensitive", "requests to sensitive endpoints (" + ", ".join(patterns) + ")"),
        ("policy_changes", "changes to mesh policy/routing resources"),
        ("tls_failures", "TLS/mTLS failures"),
        ("authn_failures", "authentication failures (JWT, server-side mTLS handshake, mesh identity)"),
    ]
    return pd.DataFrame(
        [{"check": name, "count": int(row[name] or 0), "what": what} for name, what in checks],
        columns=["check", "count", "what"],
    )


# ------------------------------------------------------------------------------------------------
# Explorer data access (used by meshlens.widgets)
# ------------------------------------------------------------------------------------------------


def filter_options(store: Store, namespace: str | None = None) -> dict[str, Any]:
    """Values for the explorer's dropdowns: namespaces, services (of ``namespace`` if given), event
    types, and the time span of the store."""
    ns = store.query(
        "SELECT DISTINCT n FROM (SELECT src_namespace AS n FROM events UNION ALL SELECT dst_namespace FROM events "
        "UNION ALL SELECT resource_namespace FROM events) WHERE n IS NOT NULL ORDER BY n"
    )["n"].tolist()
    svc = store.query(
        "SELECT DISTINCT s FROM (SELECT dst_service AS s, dst_namespace AS n FROM events "
        "UNION ALL SELECT src_workload, src_namespace FROM events) "
        "WHERE s IS NOT NULL AND ($ns IS NULL OR n = $ns) ORDER BY s",
        {"ns": namespace or None},
    )["s"].tolist()
    types = store.query("SELECT DISTINCT event_type FROM events WHERE event_type IS NOT NULL")["event_type"]
    order = {t: i for i, t in enumerate(EVENT_TYPES)}
    lo, hi = store.con.execute("SELECT min(ts_ns), max(ts_ns) FROM events").fetchone() or (None, None)
    return {
        "namespaces": ns,
        "services": svc,
        "event_types": sorted(types.tolist(), key=lambda t: (order.get(t, 99), t)),
        "start": None if lo is None else pd.Timestamp(lo, unit="ns", tz="UTC"),
        "end": None if hi is None else pd.Timestamp(hi, unit="ns", tz="UTC"),
    }


def _explore_where(start: Any, end: Any, namespace: str | None, service: str | None,
                   event_types: Sequence[str] | str | None) -> _Where:
    w = _filters(start, end, namespace, service)
    if isinstance(event_types, str):
        event_types = [event_types] if event_types else None
    if event_types:
        w.add("event_type IN (SELECT unnest($types::VARCHAR[]))", types=list(event_types))
    return w


def events(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, event_types: Sequence[str] | str | None = None, limit: int = 200,
    columns: Sequence[str] = EXPLORE_COLUMNS,
) -> pd.DataFrame:
    """Raw events matching the filters, newest first, at most ``limit`` rows (the drill-down table)."""
    unknown = [c for c in columns if c not in EVENT_COLUMN_NAMES]
    if unknown:
        raise ConfigError(f"unknown event columns {unknown}; see meshlens.schema.EVENT_COLUMNS")
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}")
    w = _explore_where(start, end, namespace, service, event_types)
    cols = ", ".join(f'"{c}"' for c in columns)
    return store.query(
        f"SELECT {cols} FROM events WHERE {w.sql} ORDER BY ts_ns DESC NULLS LAST, event_id LIMIT $limit",
        {**w.params, "limit": int(limit)},
    )


def count_events(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, event_types: Sequence[str] | str | None = None,
) -> int:
    """How many events match the filters (shown next to the drill-down's row limit)."""
    w = _explore_where(start, end, namespace, service, event_types)
    return int(store.scalar(f"SELECT count(*) FROM events WHERE {w.sql}", w.params))


def event_timeline(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, event_types: Sequence[str] | str | None = None, buckets: int = 60,
) -> pd.DataFrame:
    """Event counts per time bucket and event type: ``ts, event_type, events`` (~``buckets`` buckets)."""
    w = _explore_where(start, end, namespace, service, event_types)
    w.add("ts_ns IS NOT NULL")
    lo, hi = store.con.execute(f"SELECT min(ts_ns), max(ts_ns) FROM events WHERE {w.sql}", w.params).fetchone()
    if lo is None:
        return pd.DataFrame({"ts": pd.Series([], dtype="datetime64[ns, UTC]"), "event_type": [], "events": []})
    width = max(1_000_000_000, -(-(hi - lo + 1) // max(1, buckets)))  # at least 1 s
    df = store.query(
        f"SELECT (ts_ns // $width) * $width AS bucket_ns, event_type, count(*) AS events "
        f"FROM events WHERE {w.sql} GROUP BY ALL ORDER BY bucket_ns, event_type",
        {**w.params, "width": int(width)},
    )
    df.insert(0, "ts", pd.to_datetime(df.pop("bucket_ns"), unit="ns", utc=True))
    return df


def top_edges(
    store: Store, start: Any = None, end: Any = None, *, namespace: str | None = None,
    service: str | None = None, limit: int = 20, include_probes: bool = False,
) -> pd.DataFrame:
    """Busiest edges with their 5xx, denial and plaintext counts: ``src, dst, requests, errors_5xx,
    denied, plaintext, error_ratio`` (5xx and denials over requests); kubelet probes left out unless
    ``include_probes``."""
    w = _filters(start, end, namespace, service)
    w.add("record_kind = 'access_log' OR authz_decision IS NOT NULL")
    probes = "TRUE" if include_probes else "NOT is_probe"
    sql = f"""{_hops_cte(w.sql)}
        SELECT {SRC_SQL} AS src, {DST_SQL} AS dst,
               {_n()} AS requests,
               {_n("status >= 500")} AS errors_5xx,
               {_n("authz_decision = 'deny'")} AS denied,
               {_n("mtls = false")} AS plaintext,
               (errors_5xx + denied) / requests AS error_ratio
        FROM hops WHERE {probes}
        GROUP BY ALL
        ORDER BY requests DESC, src, dst
        LIMIT $limit
    """
    return store.query(sql, {**w.params, "limit": int(limit)})
