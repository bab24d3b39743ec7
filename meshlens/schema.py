"""The one definition of meshlens's DuckDB tables.

Every other module (parsers, store, analyses, docs) takes column names and types from here, so a column
is declared once. ``docs/schema.md`` is generated from these tuples (``meshlens schema --markdown``) and
a test keeps it in sync.

Bump :data:`SCHEMA_VERSION` and add a step to :data:`MIGRATIONS` whenever a table changes.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    doc: str
    default: str | None = None  # SQL default (also what a migration fills existing rows with)
    # Physical compression for new stores. Raw record text is long, repetitive and rarely read: zstd
    # stores it 3.4x smaller than DuckDB's default choice on the bundled samples and writes it faster.
    compression: str | None = None


EVENT_TYPES = ("request", "authz", "authn", "tls", "config_change", "access")
MESHES = ("istio", "linkerd", "consul", "envoy", "kubernetes")

EVENT_COLUMNS: tuple[Column, ...] = (
    Column("event_id", "VARCHAR", "Deterministic md5 of the record's identity (stream labels, backend timestamp, "
           "line, occurrence). Re-ingesting the same record yields the same id and is skipped."),
    Column("ts", "TIMESTAMPTZ", "When it happened, UTC: the record's own time (Envoy START_TIME, audit "
           "stageTimestamp...), else the backend's timestamp. NULL only if neither exists."),
    Column("ts_ns", "BIGINT", "`ts` as Unix nanoseconds: full precision (Linkerd and Loki carry ns)."),
    Column("event_type", "VARCHAR", "`request` (proxied request/connection), `authz` (an authorization "
           "decision: RBAC/ext_authz/Linkerd policy), `authn` (authentication failure: JWT/RequestAuthentication "
           "401, Linkerd/Consul identity failure, server-side mTLS handshake failure; see `authn_reason`), "
           "`tls` (TLS/mTLS failure of an upstream connection), `config_change` (mutating Kubernetes API call), "
           "`access` (read-only Kubernetes API call)."),
    Column("record_kind", "VARCHAR", "`access_log` (one proxied request/connection: counts as traffic), "
           "`proxy_log` (policy debug/denial lines), `audit` (Kubernetes audit)."),
    Column("mesh", "VARCHAR", "`istio`, `linkerd`, `consul`, `envoy` (plain Envoy) or `kubernetes`."),
    Column("format", "VARCHAR", "The parser that produced the event (e.g. `istio_text`, `istio_json`, "
           "`envoy_default`, `linkerd_json`, `k8s_audit`)."),
    Column("direction", "VARCHAR", "`inbound` (server-side proxy), `outbound` (client-side proxy) or NULL."),
    Column("src_workload", "VARCHAR", "Calling workload (Deployment-like name), when known."),
    Column("src_namespace", "VARCHAR", "Calling workload's namespace."),
    Column("src_principal", "VARCHAR", "Caller identity (SPIFFE `spiffe://td/ns/x/sa/y`, Linkerd identity)."),
    Column("src_ip", "VARCHAR", "Caller IP (downstream remote address without port)."),
    Column("dst_service", "VARCHAR", "Called service, short name (`reviews`)."),
    Column("dst_namespace", "VARCHAR", "Called service's namespace."),
    Column("dst_workload", "VARCHAR", "Called workload, when known (server-side records, labels)."),
    Column("dst_principal", "VARCHAR", "Server identity when logged."),
    Column("dst_port", "INTEGER", "Destination port (from the cluster name or address)."),
    Column("method", "VARCHAR", "HTTP method (NULL for TCP)."),
    Column("path", "VARCHAR", "Request path (original path if rewritten)."),
    Column("authority", "VARCHAR", "HTTP :authority / Host."),
    Column("protocol", "VARCHAR", "`HTTP/1.1`, `HTTP/2`, ... or `tcp`."),
    Column("status", "INTEGER", "HTTP status; 0 for TCP connections / no response."),
    Column("response_flags", "VARCHAR", "Envoy response flags as logged (`UF,URX`), NULL when `-`."),
    Column("response_code_details", "VARCHAR", "Envoy RESPONSE_CODE_DETAILS (or connection termination "
           "details for TCP)."),
    Column("grpc_status", "INTEGER", "gRPC status code (0 OK .. 16) when the format logs it (Istio's defaults do "
           "not: add `%GRPC_STATUS%`); Envoy's names (`Unavailable`), SNAKE_STRING and numbers all become the "
           "code. gRPC failures are HTTP 200 with a non-zero code."),
    Column("duration_ms", "DOUBLE", "Total request/connection duration in ms."),
    Column("upstream_service_time_ms", "DOUBLE", "Envoy x-envoy-upstream-service-time in ms."),
    Column("bytes_sent", "BIGINT", "Bytes sent to the downstream (response body)."),
    Column("bytes_received", "BIGINT", "Bytes received from the downstream (request body)."),
    Column("authz_decision", "VARCHAR", "`allow` / `deny` / `shadow_deny` (dry-run) or NULL."),
    Column("authz_policy", "VARCHAR", "Policy that decided (`ns[foo]-policy[deny-all]-rule[0]`, "
           "`none`, `ext_authz`, Linkerd server/route)."),
    Column("mtls", "BOOLEAN", "TRUE if the hop was mutual-TLS, FALSE if known plaintext, NULL unknown."),
    Column("tls_failure_reason", "VARCHAR", "Upstream transport failure reason / TLS error text."),
    Column("transport_failure_reason", "VARCHAR", "Envoy UPSTREAM_TRANSPORT_FAILURE_REASON as logged "
           "(TLS or not, e.g. `delayed_connect_error:_Connection_refused`)."),
    Column("request_id", "VARCHAR", "x-request-id (correlates client and server records of a hop)."),
    Column("trace_id", "VARCHAR", "Trace id when logged (traceparent / b3 / Linkerd trace_id)."),
    Column("user_agent", "VARCHAR", "User-Agent (for audit events: the API client's)."),
    Column("upstream_cluster", "VARCHAR", "Envoy upstream cluster as logged (trailing `;` stripped)."),
    Column("upstream_host", "VARCHAR", "Envoy upstream host address."),
    Column("route_name", "VARCHAR", "Envoy route name."),
    Column("actor", "VARCHAR", "config_change/access: the user (or impersonated user) who made the call."),
    Column("verb", "VARCHAR", "config_change/access: Kubernetes verb (`create`, `patch`, `delete`, `get`...)."),
    Column("resource_kind", "VARCHAR", "config_change/access: Kind (`VirtualService`, `Deployment`, "
           "`HelmRelease` for Helm release secrets...)."),
    Column("resource_namespace", "VARCHAR", "config_change/access: object namespace."),
    Column("resource_name", "VARCHAR", "config_change/access: object name (Helm: release name)."),
    Column("resource_api_group", "VARCHAR", "config_change/access: API group (`networking.istio.io`...)."),
    Column("change_spec", "JSON", "config_change: the new object's `spec` when the audit level logged it."),
    Column("change_targets", "VARCHAR[]", "config_change: workloads/hosts the change targets, short names "
           "(VirtualService hosts, DestinationRule host, policy selector app labels, Deployment name)."),
    Column("labels", "MAP(VARCHAR, VARCHAR)", "The source's stream labels / metadata (namespace, pod, "
           "container, app...)."),
    Column("source", "VARCHAR", "Which ingest produced it (`file:...`, `loki:...`, `es:...`)."),
    Column("position", "VARCHAR", "Where in the source (file:line, query@ts, index/_id)."),
    Column("raw", "VARCHAR", "The original record text.", compression="zstd"),
    Column("ingested_at", "TIMESTAMPTZ", "When meshlens stored it."),
    # -- schema version 2 --
    Column("sample_weight", "DOUBLE", "How many records this stored event stands for: 1 normally, 1/rate "
           "for a successful request kept by `--sample-success RATE`. Counts and rates must be "
           "`sum(sample_weight)`, not `count(*)`, to stay unbiased on sampled data.", default="1.0"),
    Column("authn_reason", "VARCHAR", "authn: why authentication failed (`Jwt is expired`, the TLS "
           "handshake error, the Linkerd identity error)."),
)

REJECT_COLUMNS: tuple[Column, ...] = (
    Column("reject_id", "VARCHAR", "md5 of source, position and raw text: re-ingesting does not duplicate."),
    Column("source", "VARCHAR", "Which ingest read it."),
    Column("position", "VARCHAR", "Where (file:line, query@ts...)."),
    Column("ts_ns", "BIGINT", "The backend's timestamp for the record, if any."),
    Column("format", "VARCHAR", "Format that was tried (NULL when none matched)."),
    Column("reason", "VARCHAR", "Why it could not be parsed."),
    Column("raw", "VARCHAR", "The record text (over 64 KiB: truncated, with the size noted in `reason`).",
           compression="zstd"),
    Column("ingested_at", "TIMESTAMPTZ", "When meshlens stored it."),
)

SERIES_COLUMNS: tuple[Column, ...] = (
    Column("series_key", "VARCHAR", "md5 of (origin, metric, labels): one time series."),
    Column("ts", "TIMESTAMPTZ", "Sample time (bucket start)."),
    Column("metric", "VARCHAR", "What is measured (`requests`, `errors_5xx`, `p99_duration_ms`...)."),
    Column("labels", "MAP(VARCHAR, VARCHAR)", "Series labels (service, namespace, status, flags...)."),
    Column("value", "DOUBLE", "Sample value."),
    Column("step_s", "DOUBLE", "Bucket width in seconds."),
    Column("origin", "VARCHAR", "Where it came from (`loki:<url>|<query>`, `es:...`, `rollup`)."),
)

INGEST_RUN_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "VARCHAR", "Unique id of the ingest run."),
    Column("source", "VARCHAR", "Source identity (never credentials)."),
    Column("started_at", "TIMESTAMPTZ", "Start."),
    Column("finished_at", "TIMESTAMPTZ", "End (NULL while running or if killed)."),
    Column("status", "VARCHAR", "`running`, `ok`, `failed`."),
    Column("records_read", "BIGINT", "Records read."),
    Column("events_stored", "BIGINT", "New events stored."),
    Column("duplicates", "BIGINT", "Records skipped because already stored."),
    Column("rejects", "BIGINT", "Records that could not be parsed (kept in `rejects`)."),
    Column("message", "VARCHAR", "Error message when failed."),
    # -- schema version 2 --
    Column("filtered", "BIGINT", "Records dropped by ingest filters or not kept by success sampling "
           "(records read = events stored + duplicates + rejects + filtered).", default="0"),
    Column("filtered_by_rule", "JSON", "`filtered` per rule name (`health_probe_user_agent`, "
           "`health_check_path`, `sample_success`, your rules)."),
)

WATERMARK_COLUMNS: tuple[Column, ...] = (
    Column("key", "VARCHAR", "Identity of an incremental source (kind, url, tenant, query)."),
    Column("state", "JSON", "Source-specific resume state (e.g. complete-up-to timestamp)."),
    Column("updated_at", "TIMESTAMPTZ", "Last update."),
)

TABLES: dict[str, tuple[Column, ...]] = {
    "events": EVENT_COLUMNS,
    "rejects": REJECT_COLUMNS,
    "series": SERIES_COLUMNS,
    "ingest_runs": INGEST_RUN_COLUMNS,
    "watermarks": WATERMARK_COLUMNS,
}

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "series": ("series_key", "ts"),
    "ingest_runs": ("run_id",),
    "watermarks": ("key",),
}

EVENT_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in EVENT_COLUMNS)


def column_sql(c: Column) -> str:
    """``"name" TYPE [DEFAULT x]`` for DDL (CREATE TABLE and migrations' ADD COLUMN)."""
    return (f'"{c.name}" {c.type}' + (f" DEFAULT {c.default}" if c.default is not None else "")
            + (f" USING COMPRESSION {c.compression}" if c.compression else ""))


# Columns added by each schema version (a migration step adds them to an existing store).
ADDED_IN: dict[int, dict[str, tuple[str, ...]]] = {
    2: {"events": ("sample_weight", "authn_reason"), "ingest_runs": ("filtered", "filtered_by_rule")},
}


def column(table: str, name: str) -> Column:
    """The declared column ``name`` of ``table``."""
    for c in TABLES[table]:
        if c.name == name:
            return c
    raise KeyError(f"{table}.{name}")


def create_table_sql(table: str) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one of :data:`TABLES`."""
    cols = ",\n  ".join(column_sql(c) for c in TABLES[table])
    pk = PRIMARY_KEYS.get(table)
    if pk:
        cols += f",\n  PRIMARY KEY ({', '.join(pk)})"
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  {cols}\n)"


def markdown() -> str:
    """The schema as Markdown (``docs/schema.md``)."""
    out = [
        "# meshlens store schema",
        "",
        f"Schema version {SCHEMA_VERSION}. Generated from `meshlens/schema.py` by "
        "`meshlens schema --markdown`; do not edit by hand.",
        "",
    ]
    for table, cols in TABLES.items():
        out += [f"## `{table}`", "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{c.name}` | {c.type}{f' (default {c.default})' if c.default else ''} | {c.doc} |"
                for c in cols]
        out.append("")
    return "\n".join(out)
