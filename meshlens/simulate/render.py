"""Byte-exact renderers for the log formats the simulator writes.

Every layout here is copied from a real record in ``/work/shared/samples`` (see ``formats.md``):

* Istio default TEXT format (Istio >= 1.9, ``%UPSTREAM_CLUSTER_RAW%`` slot): the istio.io access-log task
  pair (``istio_io_access_log_task.log``) -- 20 tokens after ``[ts] "METHOD PATH PROTO"``.
* Istio JSON encoding with typed values (numbers for codes/bytes/duration, ``null`` for empty,
  ``upstream_service_time`` as a string, ``response_flags`` ``"-"`` when none): istio#48018.
  Envoy emits it with ``SortProperties: false`` so the key order is not alphabetical; we use one fixed
  shuffled order per proxy, like a real proxy does.
* Linkerd JSON access log (keys sorted, durations as nanosecond strings): linkerd 2.12 docs.
* Kubernetes audit ``Event`` (``audit.k8s.io/v1``) -- see :mod:`meshlens.simulate.audit`.
* logcli ``--output jsonl``: Go's ``json.Marshal`` of ``map[string]interface{}{"labels","line",
  "timestamp"}`` -- keys sorted, HTML characters escaped (``\\u003c \\u003e \\u0026``), ``time.Time`` as
  RFC3339Nano with trailing zeros trimmed (grafana/loki ``pkg/logcli/output/jsonl.go``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

ISTIO_JSON_KEYS: tuple[str, ...] = (
    "start_time", "route_name", "method", "path", "protocol", "response_code", "response_flags",
    "response_code_details", "connection_termination_details", "upstream_transport_failure_reason",
    "bytes_received", "bytes_sent", "duration", "upstream_service_time", "x_forwarded_for", "user_agent",
    "request_id", "authority", "upstream_host", "upstream_cluster", "upstream_local_address",
    "downstream_local_address", "downstream_remote_address", "requested_server_name",
)

LINKERD_JSON_KEYS: tuple[str, ...] = (
    "client.addr", "client.id", "host", "method", "processing_ns", "request_bytes", "response_bytes",
    "status", "timestamp", "total_ns", "trace_id", "uri", "user_agent", "version",
)


@dataclass(slots=True)
class AccessRecord:
    """One Envoy access-log record, values as Envoy knows them (None = not set / ``-``)."""

    start_us: int
    method: str | None
    path: str | None
    protocol: str | None
    code: int
    flags: str | None
    details: str | None
    transport_failure: str | None
    bytes_rx: int
    bytes_tx: int
    duration_ms: int
    ust_ms: int | None
    xff: str | None
    ua: str | None
    request_id: str | None
    authority: str | None
    upstream_host: str | None
    upstream_cluster: str | None
    upstream_local: str | None
    downstream_local: str | None
    downstream_remote: str | None
    sni: str | None
    route: str | None
    conn_term: str | None = None
    grpc_status: int | None = None  # %GRPC_STATUS% (rendered only by formats that log it)


@lru_cache(maxsize=1 << 16)
def _second(secs: int) -> str:
    """``YYYY-mm-ddTHH:MM:SS`` of a Unix second (cached: the same seconds recur thousands of times)."""
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def envoy_start_time(us: int) -> str:
    """Envoy's default %START_TIME%: ISO-8601 UTC with milliseconds, e.g. 2020-11-25T21:26:18.409Z."""
    secs, rem = divmod(us, 1_000_000)
    return _second(secs) + f".{rem // 1000:03d}Z"


def rfc3339_micro(us: int) -> str:
    """Kubernetes MicroTime / Istio agent log time: 2024-05-01T10:00:00.123456Z."""
    secs, rem = divmod(us, 1_000_000)
    return _second(secs) + f".{rem:06d}Z"


def rfc3339_nano_fixed(ns: int) -> str:
    """Nanosecond RFC 3339 with all nine digits (Linkerd's access-log ``timestamp``)."""
    secs, rem = divmod(ns, 1_000_000_000)
    return _second(secs) + f".{rem:09d}Z"


def go_rfc3339_nano(ns: int) -> str:
    """Go's ``time.RFC3339Nano`` in UTC: fraction with trailing zeros trimmed, no dot if zero."""
    secs, rem = divmod(ns, 1_000_000_000)
    base = _second(secs)
    if rem == 0:
        return base + "Z"
    return base + "." + f"{rem:09d}".rstrip("0") + "Z"


def go_json_string(s: str) -> str:
    """Quote a string exactly like Go's encoding/json (HTML-safe escaping, U+2028/9 escaped)."""
    out = json.dumps(s, ensure_ascii=False)
    if "<" in out or ">" in out or "&" in out:
        out = out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    if "\u2028" in out or "\u2029" in out:
        out = out.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    # Go writes \b and \f as \u0008 / \u000c
    if "\\b" in out or "\\f" in out:
        out = _fix_go_controls(out)
    return out


def _fix_go_controls(quoted: str) -> str:
    res = []
    i = 0
    while i < len(quoted):
        ch = quoted[i]
        if ch == "\\" and i + 1 < len(quoted):
            nxt = quoted[i + 1]
            if nxt == "b":
                res.append("\\u0008")
            elif nxt == "f":
                res.append("\\u000c")
            else:
                res.append(ch + nxt)
            i += 2
            continue
        res.append(ch)
        i += 1
    return "".join(res)


def logcli_labels_prefix(labels: dict[str, str]) -> str:
    """The constant head of a logcli jsonl line for one stream: ``{"labels":{...},"line":``."""
    inner = ",".join(f"{go_json_string(k)}:{go_json_string(v)}" for k, v in sorted(labels.items()))
    return '{"labels":{' + inner + '},"line":'


def logcli_jsonl(prefix: str, line: str, ts_ns: int) -> str:
    """One logcli ``--output jsonl`` line (without newline)."""
    return prefix + go_json_string(line) + ',"timestamp":"' + go_rfc3339_nano(ts_ns) + '"}'


def _q(v: str | None) -> str:
    return '"' + (v if v else "-") + '"'


def _d(v: object) -> str:
    return "-" if v is None or v == "" else str(v)


def istio_text(r: AccessRecord) -> str:
    """Istio's default TEXT access-log line (``EnvoyTextLogFormat``, UPSTREAM_CLUSTER_RAW era)."""
    return (
        f'[{envoy_start_time(r.start_us)}] "{_d(r.method)} {_d(r.path)} {_d(r.protocol)}" {r.code} '
        f"{_d(r.flags)} {_d(r.details)} {_d(r.conn_term)} {_q(r.transport_failure)} {r.bytes_rx} "
        f"{r.bytes_tx} {r.duration_ms} {_d(r.ust_ms)} {_q(r.xff)} {_q(r.ua)} {_q(r.request_id)} "
        f"{_q(r.authority)} {_q(r.upstream_host)} {_d(r.upstream_cluster)} {_d(r.upstream_local)} "
        f"{_d(r.downstream_local)} {_d(r.downstream_remote)} {_d(r.sni)} {_d(r.route)}"
    )


def istio_json_values(r: AccessRecord, cluster_semicolon: bool = False) -> dict[str, object]:
    """Typed values of Istio's JSON encoding (Istio >= 1.12 style)."""
    cluster = r.upstream_cluster
    if cluster and cluster_semicolon and "|" in cluster:
        cluster += ";"  # istio#54219: %UPSTREAM_CLUSTER% alt_stat_name with a trailing ';'
    return {
        "start_time": envoy_start_time(r.start_us),
        "route_name": r.route,
        "method": r.method,
        "path": r.path,
        "protocol": r.protocol,
        "response_code": r.code,
        "response_flags": r.flags or "-",
        "response_code_details": r.details,
        "connection_termination_details": r.conn_term,
        "upstream_transport_failure_reason": r.transport_failure,
        "bytes_received": r.bytes_rx,
        "bytes_sent": r.bytes_tx,
        "duration": r.duration_ms,
        "upstream_service_time": None if r.ust_ms is None else str(r.ust_ms),
        "x_forwarded_for": r.xff,
        "user_agent": r.ua,
        "request_id": r.request_id,
        "authority": r.authority,
        "upstream_host": r.upstream_host,
        "upstream_cluster": cluster,
        "upstream_local_address": r.upstream_local,
        "downstream_local_address": r.downstream_local,
        "downstream_remote_address": r.downstream_remote,
        "requested_server_name": r.sni,
    }


GRPC_STATUS_NAMES: tuple[str, ...] = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
    "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)
"""What Envoy's ``%GRPC_STATUS%`` writes per code (its default ``CAMEL_STRING``: grpcStatusToString)."""


def istio_json(r: AccessRecord, key_order: tuple[str, ...] = ISTIO_JSON_KEYS,
               cluster_semicolon: bool = False, grpc_key: bool = False) -> str:
    """Istio's JSON access-log line with the proxy's key order. ``grpc_key``: the format adds
    ``"grpc_status": "%GRPC_STATUS%"`` (null for a request that is not gRPC, as Envoy writes it)."""
    vals = istio_json_values(r, cluster_semicolon)
    out = {k: vals[k] for k in key_order}
    if grpc_key:
        out["grpc_status"] = None if r.grpc_status is None else (
            GRPC_STATUS_NAMES[r.grpc_status] if 0 <= r.grpc_status < len(GRPC_STATUS_NAMES) else str(r.grpc_status))
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def linkerd_json(*, client_addr: str, client_id: str | None, host: str, method: str, processing_ns: int,
                 request_bytes: int | None, response_bytes: int, status: int, ts_ns: int, total_ns: int,
                 trace_id: str, uri: str, user_agent: str, version: str) -> str:
    """Linkerd proxy JSON access log (``config.linkerd.io/access-log: json``)."""
    rec = {
        "client.addr": client_addr,
        "client.id": client_id or "-",
        "host": host,
        "method": method,
        "processing_ns": str(processing_ns),
        "request_bytes": "" if not request_bytes else str(request_bytes),
        "response_bytes": str(response_bytes),
        "status": status,
        "timestamp": rfc3339_nano_fixed(ts_ns),
        "total_ns": str(total_ns),
        "trace_id": trace_id,
        "uri": uri,
        "user_agent": user_agent,
        "version": version,
    }
    return json.dumps(rec, separators=(",", ":"), ensure_ascii=False)


# ---- non-access proxy lines (pilot-agent / Envoy / linkerd2-proxy), from real logs ----

def istio_agent_startup(start_us: int, init_s: float, sync_ms: float) -> list[tuple[int, str]]:
    """The pilot-agent lines a new istio-proxy prints before traffic (istio#51160, #52370, #31555)."""
    steps = [
        (0, "info\tWorkload SDS socket not found. Starting Istio SDS Server"),
        (8, "info\tCA Endpoint istiod.istio-system.svc:15012, provider Citadel"),
        (9, "info\tOpening status port 15020"),
        (int(sync_ms * 1000), f"info\tads\tAll caches have been synced up in {sync_ms:.6f}ms, marking server ready"),
        (int(sync_ms * 1000) + 150, 'info\txdsproxy\tInitializing with upstream address '
                                    '"istiod.istio-system.svc:15012" and cluster "Kubernetes"'),
        (int(sync_ms * 1000) + 820, "info\tStarting proxy agent"),
        (int(sync_ms * 1000) + 1100, "info\tsds\tStarting SDS grpc server"),
        (int(init_s * 1e6), f"info\tInitialization took {init_s:.9f}s"),
        (int(init_s * 1e6) + 410, "info\tEnvoy proxy is ready"),
    ]
    return [(start_us + off, f"{rfc3339_micro(start_us + off)}\t{msg}") for off, msg in steps]


def istio_xds_reconnect(us: int) -> str:
    """Periodic line when istiod closes the XDS stream (max connection age, ~30 min)."""
    return f"{rfc3339_micro(us)}\tinfo\txdsproxy\tconnected to upstream XDS server: istiod.istio-system.svc:15012"


def linkerd_startup(identity: str) -> list[tuple[float, str]]:
    """linkerd2-proxy start-up lines (linkerd2#9406); the prefix is seconds since proxy start."""
    lines = [
        (0.005680, "INFO ThreadId(01) linkerd2_proxy::rt: Using single-threaded proxy runtime"),
        (0.009519, "INFO ThreadId(01) linkerd2_proxy: Admin interface on 0.0.0.0:4191"),
        (0.009651, "INFO ThreadId(01) linkerd2_proxy: Inbound interface on 0.0.0.0:4143"),
        (0.009656, "INFO ThreadId(01) linkerd2_proxy: Outbound interface on 127.0.0.1:4140"),
        (0.009659, "INFO ThreadId(01) linkerd2_proxy: Tap interface on 0.0.0.0:4190"),
        (0.009690, f"INFO ThreadId(01) linkerd2_proxy: Local identity is {identity}"),
        (0.009710, "INFO ThreadId(01) linkerd2_proxy: Identity verified via "
                   "linkerd-identity-headless.linkerd.svc.cluster.local:8080 "
                   "(linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local)"),
        (0.009735, "INFO ThreadId(01) linkerd2_proxy: Destinations resolved via "
                   "linkerd-dst-headless.linkerd.svc.cluster.local:8086 "
                   "(linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local)"),
    ]
    return [(off, f"[{off:13.6f}s]  {msg}") for off, msg in lines]
