"""Envoy / Istio / Consul facts: response flags, authz and TLS signatures, RBAC debug lines.

Sources: envoyproxy/envoy ``source/common/stream_info/utility.h`` and access-log ``usage.rst`` (flags),
``rbac/utility.cc`` (``rbac_access_denied_matched_policy[<id>]``), ``ext_authz.cc`` (``ext_authz_denied``),
istio/istio ``pilot/pkg/model/telemetry_logging.go`` (default TEXT/JSON formats); see
``../shared/formats.md`` sections 1 and 3. The meanings below are declared once and used by parsers,
analyses (evidence text) and docs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshlens.formats.base import Event, Labels, Reject
from meshlens.formats.identity import principal_identity


@dataclass(frozen=True)
class ResponseFlag:
    """One Envoy response flag, as the parser and every analysis read it.

    ``failure``: the proxy failed the request (DC -- the downstream hung up -- is not one: it is logged by a
    server whose client gave up, and the client's own record carries the failure). ``owner``: where a
    client-side record with this flag places the fault -- ``callee`` (the callee did not answer: timeout,
    no healthy host, reset, overflow), ``connect`` (upstream connection failure: the callee, unless the
    TLS handshake failed, then the edge), ``edge`` (either side: route, cluster, protocol, limits) or
    ``downstream`` (the client side). ``klass``: the failure class the root-cause signature uses.
    """

    code: str
    name: str
    meaning: str
    failure: bool = False
    owner: str = "edge"
    klass: str | None = None


_FLAGS: tuple[ResponseFlag, ...] = (
    ResponseFlag("UH", "NoHealthyUpstream", "no healthy upstream hosts (503)", True, "callee", "unavailable"),
    ResponseFlag("UF", "UpstreamConnectionFailure", "upstream connection failure (503)", True, "connect",
                 "unavailable"),
    ResponseFlag("UO", "UpstreamOverflow", "upstream overflow / circuit breaking (503)", True, "callee",
                 "unavailable"),
    ResponseFlag("NR", "NoRouteFound", "no route configured (404) or no matching filter chain", True, "edge",
                 "route"),
    ResponseFlag("URX", "UpstreamRetryLimitExceeded", "upstream retry limit / max connect attempts exceeded",
                 True, "edge", "unavailable"),
    ResponseFlag("NC", "NoClusterFound", "upstream cluster not found", True, "edge", "route"),
    ResponseFlag("DT", "DurationTimeout", "max connection duration reached"),
    ResponseFlag("DC", "DownstreamConnectionTermination", "downstream connection terminated", False,
                 "downstream"),
    ResponseFlag("LH", "FailedLocalHealthCheck", "local service failed health check (503)", False, "callee"),
    ResponseFlag("UT", "UpstreamRequestTimeout", "upstream request timeout (504)", True, "callee", "timeout"),
    ResponseFlag("LR", "LocalReset", "connection local reset (503)", True),
    ResponseFlag("UR", "UpstreamRemoteReset", "upstream remote reset (503)"),
    ResponseFlag("UC", "UpstreamConnectionTermination", "upstream connection termination (503)", True, "callee",
                 "unavailable"),
    ResponseFlag("DI", "DelayInjected", "fault injection delay"),
    ResponseFlag("FI", "FaultInjected", "fault injection abort"),
    ResponseFlag("RL", "RateLimited", "rate limited locally (429)", True, "edge", "ratelimit"),
    ResponseFlag("UAEX", "UnauthorizedExternalService", "denied by external authorization (ext_authz)", True),
    ResponseFlag("RLSE", "RateLimitServiceError", "rate limit service error"),
    ResponseFlag("IH", "InvalidEnvoyRequestHeaders", "invalid strictly-checked request header (400)", True),
    ResponseFlag("SI", "StreamIdleTimeout", "stream idle timeout (408)", True),
    ResponseFlag("DPE", "DownstreamProtocolError", "downstream HTTP protocol error", True),
    ResponseFlag("UPE", "UpstreamProtocolError", "upstream HTTP protocol error", True),
    ResponseFlag("UMSDR", "UpstreamMaxStreamDurationReached", "upstream max stream duration reached", True),
    ResponseFlag("OM", "OverloadManagerTerminated", "terminated by the overload manager", True),
    ResponseFlag("DF", "DnsResolutionFailed", "DNS resolution failed"),
    ResponseFlag("DO", "DropOverload", "dropped by drop-overload"),
    ResponseFlag("RFCF", "ResponseFromCacheFilter", "response served from cache filter"),
    ResponseFlag("NFCF", "NoFilterConfigFound", "no filter config found", True),
)
FLAGS: dict[str, ResponseFlag] = {f.code: f for f in _FLAGS}
"""Envoy response flags (``%RESPONSE_FLAGS%``), declared once: parser, analyses' SQL and docs derive from it."""

# flag -> (long name, meaning): the older view of the table, kept for callers
RESPONSE_FLAGS: dict[str, tuple[str, str]] = {f.code: (f.name, f.meaning) for f in _FLAGS}

FAILURE_FLAGS: tuple[str, ...] = tuple(f.code for f in _FLAGS if f.failure)
"""Flags that mean the proxy failed the request (see :class:`ResponseFlag`)."""


def flags_where(*, owner: str | None = None, klass: str | None = None) -> tuple[str, ...]:
    """Codes of the flags with this owner and/or failure class, in table order."""
    return tuple(f.code for f in _FLAGS
                 if (owner is None or f.owner == owner) and (klass is None or f.klass == klass))


def flags_regex(codes: tuple[str, ...] | list[str]) -> str:
    """A regex matching a comma-separated ``response_flags`` value that holds any of ``codes``
    (``(^|,)(UT|UH)(,|$)``); valid in DuckDB ``regexp_matches`` and Python/pandas ``str.contains``."""
    return "(?:^|,)(?:" + "|".join(codes) + ")(?:,|$)"


def flags_match_sql(column: str, codes: tuple[str, ...] | list[str]) -> str:
    """SQL: ``column`` (comma-separated flags, may be NULL) holds any of ``codes``."""
    return f"regexp_matches(coalesce({column}, ''), '{flags_regex(codes)}')"


def flags_list_sql(codes: tuple[str, ...] | list[str]) -> str:
    """SQL list literal of flag codes (``['NR', 'NC']``)."""
    return "['" + "', '".join(codes) + "']"


GRPC_STATUS_NAMES: tuple[str, ...] = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
    "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)
"""gRPC status names by code (0-16), as Envoy's ``%GRPC_STATUS%`` writes them by default (``CAMEL_STRING``,
``Grpc::Utility::grpcStatusToString``); ``%GRPC_STATUS(SNAKE_STRING)%`` writes ``DEADLINE_EXCEEDED``
(absl's names, ``CANCELLED`` with two l), ``%GRPC_STATUS(NUMBER)%`` / ``%GRPC_STATUS_NUMBER%`` the code.
Real custom formats use all three (``"grpc_status": "%GRPC_STATUS%"`` is the common Istio recipe)."""


def grpc_status_key(name: str) -> str:
    """The spelling-free key of a gRPC status name: ``DeadlineExceeded`` / ``DEADLINE_EXCEEDED`` ->
    ``DEADLINEEXCEEDED``; ``Canceled`` / ``CANCELLED`` -> ``CANCELED``."""
    key = name.strip().upper().replace("_", "")
    return "CANCELED" if key == "CANCELLED" else key


def grpc_status_sql(column: str) -> str:
    """SQL: the gRPC status code of a logged value in any of Envoy's three renderings (NULL otherwise)."""
    key = f"replace(replace(upper(trim({column})), '_', ''), 'CANCELLED', 'CANCELED')"
    cases = " ".join(f"WHEN '{grpc_status_key(n)}' THEN {i}" for i, n in enumerate(GRPC_STATUS_NAMES))
    return f"coalesce(try_cast({column} AS INTEGER), CASE {key} {cases} END)"


RBAC_DENIED_PREFIX = "rbac_access_denied_matched_policy["
EXT_AUTHZ_DETAILS = ("ext_authz_denied", "ext_authz_error")
# Substrings that mark a transport failure as a TLS/mTLS problem (old "TLS error: ..." text, new
# "TLS_error:|...:TLS_error_end", OpenSSL reason names).
TLS_MARKERS = ("TLS_error", "TLS error", "SSL_routines", "SSL routines", "CERTIFICATE", "handshake",
               "WRONG_VERSION_NUMBER", "tls:")


def flag_meanings(flags: str | None) -> list[str]:
    """``"UF,URX"`` -> ``["UF: upstream connection failure (503)", ...]``; unknown flags kept as data."""
    if not flags or flags == "-":
        return []
    out = []
    for f in flags.split(","):
        meaning = RESPONSE_FLAGS.get(f)
        out.append(f"{f}: {meaning[1]}" if meaning else f"{f}: (custom flag)")
    return out


def is_tls_failure(text: str | None) -> bool:
    return bool(text) and any(m in text for m in TLS_MARKERS)


_RBAC_DEBUG = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\S+)\s+debug\s+envoy\s+rbac\s+(?:\[?\S+\.cc:\d+\]?\s+)?"
    # connection/stream tags of newer ([Tags: "ConnectionId":"5"]) and older ([C5][S123]) Envoy
    r"(?:(?:\[Tags: [^\]]*\]|\[C\d+\](?:\[S\d+\])?)\s*)?"
    r"(?P<msg>enforced denied|shadow denied|enforced allowed|shadow allowed|no engine, allowed by default)"
    r"(?:, matched policy (?P<policy>\S+))?"
)
_RBAC_DEBUG_CHECKING = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+debug\s+envoy\s+rbac\s+.*checking (request|connection)")


def parse_rbac_debug(text: str, obj: object, labels: Labels) -> Event:
    """Envoy RBAC filter debug line (``istioctl proxy-config log --level rbac:debug``)."""
    m = _RBAC_DEBUG.match(text)
    if not m:
        if _RBAC_DEBUG_CHECKING.match(text):
            raise Reject("envoy rbac debug 'checking request' context line: no decision on this line")
        raise Reject("envoy rbac debug line without a recognised decision")
    msg = m.group("msg")
    decision = {"enforced denied": "deny", "shadow denied": "shadow_deny", "enforced allowed": "allow",
                "shadow allowed": "shadow_allow"}.get(msg, "allow")
    policy = m.group("policy")
    if msg.startswith("no engine"):
        policy = "no engine (allowed by default)"
    ev: Event = {
        "ts_text": m.group("ts"),
        "event_type": "authz",
        "record_kind": "proxy_log",
        "mesh": "istio",
        "format": "envoy_rbac_debug",
        "direction": "inbound",
        "authz_decision": decision,
        "authz_policy": policy,
    }
    return ev


_ZTUNNEL_KV = re.compile(r'([a-z_.]+)=("(?:[^"\\]|\\.)*"|\S+)')
_ZTUNNEL_HEAD = re.compile(r"^(?:(?P<ts>\d{4}-\d\d-\d\dT\S+)\s+)?(?P<level>error|warn|info|debug)\s+access\s+")


def parse_ztunnel(text: str, obj: object, labels: Labels) -> Event:
    """Istio ambient ztunnel access log (logfmt-like), e.g. istio/ztunnel#1273."""
    head = _ZTUNNEL_HEAD.match(text)
    if not head:
        raise Reject("not a ztunnel access line")
    kv = {k: (v[1:-1].replace('\\"', '"') if v.startswith('"') else v)
          for k, v in _ZTUNNEL_KV.findall(text[head.end():])}
    if "src.addr" not in kv and "dst.addr" not in kv:
        raise Reject("ztunnel access line without src.addr/dst.addr")
    err = kv.get("error")
    dur = kv.get("duration", "")
    dur_ms = None
    if dur.endswith("ms") and dur[:-2].replace(".", "", 1).isdigit():
        dur_ms = float(dur[:-2])
    elif dur.endswith("s") and dur[:-1].replace(".", "", 1).isdigit():
        dur_ms = float(dur[:-1]) * 1000
    src_ns_p, _ = principal_identity(kv.get("src.identity"))
    dst_svc = kv.get("dst.service")
    dst_service, dst_ns = (None, None)
    if dst_svc:
        parts = dst_svc.split(".")
        dst_service, dst_ns = parts[0], (parts[1] if len(parts) > 1 else None)
    denied = bool(err) and "policy rejection" in err
    ev: Event = {
        "ts_text": head.group("ts"),
        "event_type": "authz" if denied else ("tls" if is_tls_failure(err) else "request"),
        "record_kind": "access_log",
        "mesh": "istio",
        "format": "ztunnel",
        "direction": kv.get("direction"),
        "src_workload": _workload(kv.get("src.workload")),
        "src_namespace": kv.get("src.namespace") or src_ns_p,
        "src_principal": kv.get("src.identity"),
        "src_ip": (kv.get("src.addr") or "").rsplit(":", 1)[0] or None,
        "dst_service": dst_service,
        "dst_namespace": kv.get("dst.namespace") or dst_ns,
        "dst_workload": _workload(kv.get("dst.workload")),
        "dst_principal": kv.get("dst.identity"),
        "dst_port": _int((kv.get("dst.hbone_addr") or kv.get("dst.addr") or "").rsplit(":", 1)[-1]),
        "protocol": "tcp",
        "status": 0,
        "duration_ms": dur_ms,
        "bytes_sent": _int(kv.get("bytes_sent")),
        "bytes_received": _int(kv.get("bytes_recv")),
        "mtls": True if kv.get("src.identity") else None,
        "response_code_details": err,
    }
    if denied:
        ev["authz_decision"] = "deny"
        ev["authz_policy"] = err.split(": ", 1)[1] if err and ": " in err else err
    if ev["event_type"] == "tls":
        ev["tls_failure_reason"] = err
    return ev


def _workload(pod: str | None) -> str | None:
    from meshlens.formats.identity import workload_from_pod

    return workload_from_pod(pod)


def _int(s: str | None) -> int | None:
    return int(s) if s and s.isdigit() else None
