"""Istio ambient ztunnel records: access logs (text and JSON) and authorization-policy decisions.

ztunnel logs with Rust ``tracing``: target ``access`` carries one record per connection, emitted on
completion (``connection complete``, INFO, or ERROR with ``error=``), plus ``connection failed`` (WARN,
an early deny before the peers are known) and ``connection opened`` (DEBUG, no outcome yet). Target
``ztunnel::state`` carries the authorization decisions (``deny policy match``, ``no allow policies
matched``, their ``dry-run:`` forms, and the allow forms) with ``policy=ns/name``.

Shapes (istio/ztunnel ``src/proxy/metrics.rs``, ``src/state.rs``, README "Logging"):

* text, Istio's log layout: ``2024-07-26T17:18:00.953004Z\\terror\\taccess\\tconnection complete\\tsrc.addr=...``;
* text, ztunnel's own layout: ``2024-04-11T15:38:42.182974Z  INFO access: connection complete src.addr=...``;
* JSON (``LOG_FORMAT=json``): ``{"level","time","scope":"access","message":"connection complete",
  "src.addr",...}``; decisions as ``{"scope":"ztunnel::state","message":"deny policy match",
  "policy":...,"proxy":{"wl":"ns/pod"},"inbound":{"peer":"ip:port"}}``.

Derived fields: ``direction`` is logged (``outbound`` = the source's ztunnel); src/dst workload from the
pod names (``workload_from_pod``); ``dst_port`` from ``dst.hbone_addr`` (the application port inside the
HBONE tunnel) else ``dst.addr``; ``mtls`` TRUE when an identity is logged (ztunnel only logs identities of
mTLS connections); an ``error`` containing ``policy rejection`` is an ``authz`` deny whose policy is the
``explicitly denied by: ns/name`` part, TLS errors are ``tls`` events.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from meshlens.formats.base import Event, Labels, Reject
from meshlens.formats.identity import principal_identity, workload_from_pod

_KV = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|\S+)')
_LEVELS = "error|warn|info|debug|trace|ERROR|WARN|INFO|DEBUG|TRACE"
# "<ts> <level> access <message> k=v..." (Istio layout) or "<ts> <LEVEL> access: <message> k=v..."
_HEAD = re.compile(rf"^(?:(?P<ts>\d{{4}}-\d\d-\d\dT\S+)\s+)?(?P<level>{_LEVELS})\s+(?P<scope>access|"
                   r"ztunnel::state|state|rbac)(?::\s*|\s+)(?P<msg>[a-z][a-z :,-]*?)(?=\s+[A-Za-z_.]+=|\s*$)")
_TEXT_HINT = re.compile(rf"^(?:\d{{4}}-\d\d-\d\dT\S+\s+)?(?:{_LEVELS})\s+(?:access:?\s|ztunnel::state:?\s.*policy)")

_COMPLETE = ("connection complete", "connection failed")
_DECISIONS: dict[str, tuple[str, bool]] = {
    # message -> (decision, names a policy)
    "deny policy match": ("deny", True),
    "no allow policies matched": ("deny", False),
    "dry-run: deny policy match": ("shadow_deny", True),
    "dry-run: no allow policies match": ("shadow_deny", False),
    "allow policy match": ("allow", True),
    "dry-run: allow policy match": ("shadow_allow", True),
    "no allow policies, allow": ("allow", False),
    "dry-run: no allow policies, allow": ("shadow_allow", False),
}
_DENIED_BY = re.compile(r"explicitly denied by: (\S+)")


def looks_like_text(text: str) -> bool:
    """A ztunnel ``access`` (or policy-decision) text line."""
    return bool(_TEXT_HINT.match(text)) and ("src.addr=" in text or "dst.addr=" in text or "policy" in text)


def looks_like_json(obj: dict[str, Any]) -> bool:
    """A ztunnel JSON record: ``scope`` ``access`` with addresses, or a ``ztunnel::state`` policy decision."""
    scope = obj.get("scope")
    if scope == "access":
        return "src.addr" in obj or "dst.addr" in obj
    return scope in ("ztunnel::state", "state") and obj.get("message") in _DECISIONS


def parse_text(text: str, obj: object, labels: Labels) -> Event:
    """A text line: its ``key=value`` pairs become the same dict the JSON form has."""
    head = _HEAD.match(text)
    if not head:
        raise Reject("ztunnel access log: no '<time> <level> access <message>' head")
    kv: dict[str, Any] = {k: (v[1:-1].replace('\\"', '"') if v.startswith('"') else v)
                          for k, v in _KV.findall(text[head.end():])}
    kv["level"], kv["message"] = head.group("level").lower(), head.group("msg").strip()
    kv["scope"] = "ztunnel::state" if head.group("scope") != "access" else "access"
    if head.group("ts"):
        kv["time"] = head.group("ts")
    return _event(kv, "ztunnel")


def parse_json(text: str, obj: Any, labels: Labels) -> Event:
    if not isinstance(obj, dict):
        raise Reject("ztunnel JSON: not an object")
    return _event(obj, "ztunnel")


def _str(v: Any) -> str | None:
    if v is None or v == "" or isinstance(v, dict | list):
        return None
    return str(v)


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    s = _str(v)
    return int(s) if s and s.isdigit() else None


def _ip(addr: str | None) -> str | None:
    """``10.0.0.1:80`` / ``[fd00::1]:80`` -> the IP; pod-name addresses (early ztunnel) -> None."""
    if not addr:
        return None
    host = addr[1:addr.index("]")] if addr.startswith("[") and "]" in addr else addr.rsplit(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _port(addr: str | None) -> int | None:
    if not addr or ":" not in addr:
        return None
    return _int(addr.rsplit(":", 1)[1])


def _duration_ms(v: Any) -> float | None:
    s = _str(v)
    if s is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|us|µs|ns)?", s)
    if not m:
        raise Reject(f"ztunnel access log: duration {s!r} is not a duration")
    n = float(m.group(1))
    return n * {"ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3, "ns": 1e-6, None: 1.0}[m.group(2)]


def _event(kv: dict[str, Any], fmt: str) -> Event:
    msg = _str(kv.get("message")) or ""
    if kv.get("scope") != "access":
        return _decision(kv, msg, fmt)
    if msg == "connection opened":
        raise Reject("ztunnel access log 'connection opened' (debug): no outcome yet -- the 'connection "
                     "complete' record of the same connection carries it")
    if msg not in _COMPLETE:
        raise Reject(f"ztunnel access log: message {msg!r} is not 'connection complete'")
    src_addr, dst_addr = _str(kv.get("src.addr")), _str(kv.get("dst.addr"))
    if not src_addr and not dst_addr:
        raise Reject("ztunnel access log: no src.addr/dst.addr")
    err = _str(kv.get("error"))
    src_id, dst_id = _str(kv.get("src.identity")), _str(kv.get("dst.identity"))
    src_ns_p, _ = principal_identity(src_id)
    dst_ns_p, _ = principal_identity(dst_id)
    svc = _str(kv.get("dst.service"))
    dst_service = dst_ns = None
    if svc:
        parts = svc.split(".")
        dst_service = parts[0]
        dst_ns = parts[1] if len(parts) > 1 and not _ip(svc) else None
        if _ip(svc):
            dst_service = None
    hbone = _str(kv.get("dst.hbone_addr"))
    denied = bool(err) and "policy rejection" in err
    tls = bool(err) and _is_tls(err)
    ev: Event = {
        "ts_text": _str(kv.get("time")) or _str(kv.get("timestamp")),
        "event_type": "authz" if denied else ("tls" if tls else "request"),
        "record_kind": "access_log",
        "mesh": "istio",
        "format": fmt,
        "direction": _str(kv.get("direction")),
        "src_workload": workload_from_pod(_str(kv.get("src.workload"))),
        "src_namespace": _str(kv.get("src.namespace")) or src_ns_p,
        "src_principal": src_id,
        "src_ip": _ip(src_addr),
        "dst_service": dst_service,
        "dst_namespace": _str(kv.get("dst.namespace")) or dst_ns or dst_ns_p,
        "dst_workload": workload_from_pod(_str(kv.get("dst.workload"))),
        "dst_principal": dst_id,
        "dst_port": _port(hbone) if hbone else _port(dst_addr),
        "protocol": "tcp",
        "status": 0,
        "duration_ms": _duration_ms(kv.get("duration")),
        "bytes_sent": _int(kv.get("bytes_sent")),
        "bytes_received": _int(kv.get("bytes_recv")),
        "mtls": True if (src_id or dst_id) else None,
        "response_code_details": err,
    }
    if denied:
        ev["authz_decision"] = "deny"
        m = _DENIED_BY.search(err or "")
        ev["authz_policy"] = m.group(1) if m else None
    if tls:
        ev["tls_failure_reason"] = err
    return ev


def _is_tls(err: str) -> bool:
    from meshlens.formats.envoy import is_tls_failure

    return is_tls_failure(err) or "tls handshake" in err.lower() or "certificate" in err.lower()


def _decision(kv: dict[str, Any], msg: str, fmt: str) -> Event:
    """A ``ztunnel::state`` authorization decision (``authpol_log``): the destination is the proxied
    workload (``proxy.wl`` = ``ns/pod``), the source its inbound peer."""
    if msg not in _DECISIONS:
        raise Reject(f"ztunnel state log: message {msg!r} is not an authorization decision")
    decision, named = _DECISIONS[msg]
    proxy = kv.get("proxy") if isinstance(kv.get("proxy"), dict) else {}
    inbound = kv.get("inbound") if isinstance(kv.get("inbound"), dict) else {}
    wl = _str(proxy.get("wl")) or _str(kv.get("proxy.wl")) or ""
    ns, _, pod = wl.rpartition("/")
    peer = _str(inbound.get("peer")) or _str(kv.get("inbound.peer"))
    return {
        "ts_text": _str(kv.get("time")),
        "event_type": "authz",
        "record_kind": "proxy_log",
        "mesh": "istio",
        "format": fmt,
        "direction": "inbound",
        "src_ip": _ip(peer),
        "dst_namespace": ns or None,
        "dst_workload": workload_from_pod(pod) if pod else None,
        "authz_decision": decision,
        "authz_policy": _str(kv.get("policy")) if named else None,
    }
