"""Linkerd proxy records: access logs (apache and JSON) and authorization decisions in proxy logs.

Facts (../shared/formats.md section 2): access logs are written by the *server-side* (inbound) proxy,
so the proxy's own labels name the destination and ``client.addr``/``client.id`` the caller; durations
are nanosecond strings; ``client.id`` is ``<sa>.<ns>.serviceaccount.identity.linkerd.<td>`` or ``-``.
Denials are INFO proxy log lines ("Request denied" / "Connection denied"); each is followed by an error
line for the same denial, which is rejected with that reason so a denial is counted once. Proxy log
prefixes like ``[  1289.245238s]`` are seconds since proxy start, not wall-clock time, so the
collector's timestamp is used. Identity failures (the proxy cannot certify its identity; an inbound
connection closed by a TLS/certificate error) become ``authn`` events with ``authn_reason``.
"""

from __future__ import annotations

import re
from typing import Any

from meshlens.formats.base import Event, Labels, Reject
from meshlens.formats.identity import ip_of, port_of, principal_identity, self_identity, service_from_host

_APACHE = re.compile(
    r"^(?P<addr>\S+) (?P<id>\S+) - \[(?P<ts>[^\]]+)\] \"(?P<method>\S+) (?P<uri>\S+) (?P<version>[^\"]+)\" "
    r"(?P<status>\d{3})\s*$"
)


def _uri_parts(uri: str | None) -> tuple[str | None, str | None]:
    """``http://webapp:7000/authors`` -> (``webapp:7000``, ``/authors``); ``/ping`` -> (None, ``/ping``)."""
    if not uri:
        return None, None
    m = re.match(r"^[a-z][a-z0-9+.-]*://([^/]*)(/.*)?$", uri)
    if m:
        return m.group(1), m.group(2) or "/"
    return None, uri


def _access_event(labels: Labels, *, fmt: str, addr: str | None, client_id: str | None, method: str | None,
                  uri: str | None, version: str | None, status: int | None, host: str | None) -> Event:
    self_wl, self_ns = self_identity(labels)
    uri_host, path = _uri_parts(uri)
    authority = host or uri_host
    svc, svc_ns = service_from_host(authority)
    cid = None if client_id in (None, "", "-") else client_id
    src_ns, src_sa = principal_identity(cid)
    return {
        "event_type": "request",
        "record_kind": "access_log",
        "mesh": "linkerd",
        "format": fmt,
        "direction": "inbound",
        "src_workload": src_sa,
        "src_namespace": src_ns,
        "src_principal": cid,
        "src_ip": ip_of(addr),
        "dst_service": (self_wl if svc is None or svc[0].isdigit() else svc) or self_wl,
        "dst_namespace": self_ns or svc_ns,
        "dst_workload": self_wl,
        "dst_port": port_of(authority) if authority else None,
        "method": method,
        "path": path,
        "authority": authority,
        "protocol": version,
        "status": status,
        "mtls": cid is not None,
    }


def parse_apache(text: str, obj: Any, labels: Labels) -> Event:
    m = _APACHE.match(text)
    if not m:
        raise Reject("not a Linkerd apache access log line")
    ev = _access_event(labels, fmt="linkerd_apache", addr=m["addr"], client_id=m["id"], method=m["method"],
                       uri=m["uri"], version=m["version"], status=int(m["status"]), host=None)
    ev["ts_text"] = m["ts"]
    return ev


def _num(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v in (None, "", "-"):
        return None
    if isinstance(v, bool):
        raise Reject(f"Linkerd JSON field {key!r}: expected a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise Reject(f"Linkerd JSON field {key!r}: expected a number, got {v!r}") from None


def parse_json(text: str, obj: Any, labels: Labels) -> Event:
    if not isinstance(obj, dict) or "client.addr" not in obj:
        raise Reject("not a Linkerd JSON access log record (no client.addr)")
    status = _num(obj, "status")
    ev = _access_event(labels, fmt="linkerd_json", addr=_str(obj.get("client.addr")),
                       client_id=_str(obj.get("client.id")), method=_str(obj.get("method")),
                       uri=_str(obj.get("uri")), version=_str(obj.get("version")),
                       status=int(status) if status is not None else None, host=_str(obj.get("host")))
    total, req_b, resp_b = _num(obj, "total_ns"), _num(obj, "request_bytes"), _num(obj, "response_bytes")
    ev.update(
        ts_text=_str(obj.get("timestamp")),
        duration_ms=total / 1e6 if total is not None else None,
        bytes_received=int(req_b) if req_b is not None else None,
        bytes_sent=int(resp_b) if resp_b is not None else None,
        trace_id=_str(obj.get("trace_id")) or None,
        user_agent=_str(obj.get("user_agent")) or None,
    )
    return ev


def _str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict | list):
        raise Reject(f"Linkerd JSON: expected a string, got {type(v).__name__}")
    return str(v)


_KV = re.compile(r"(\S+?)=(\S*)")
_CLIENT_ID = re.compile(r'ClientId\(Name\("([^"]+)"\)\)')
_SERVER_PORT = re.compile(r"server\{port=(\d+)\}")


def parse_proxy(text: str, obj: Any, labels: Labels) -> Event:
    """Linkerd policy decisions in proxy logs (linkerd2#13013, linkerd2 PR #9286)."""
    if "linkerd_app_inbound::policy" in text:
        if " denied " in text or text.rstrip().endswith(" denied"):
            decision = "deny"
        elif " allowed " in text:
            decision = "allow"
        else:
            raise Reject("Linkerd policy log line without a decision")
        module, _, body = text.split("::policy::", 1)[1].partition(": ")
        kv = dict(_KV.findall(body))
        tcp = module.endswith("tcp")
        server = kv.get("server.name")
        route = kv.get("route.name")
        policy = f"{kv.get('server.kind') or 'server'}/{server}" if server else None
        if policy is None and kv.get("server"):
            # 2.11 and early 2.12: `server=NAME` (a Server resource) or `server=KIND:NAME` (a default policy)
            kind, _, name = kv["server"].rpartition(":")
            policy = f"{kind or 'server'}/{name}"
        if route and not tcp:
            policy = f"{policy} route/{route}" if policy else f"route/{route}"
        if kv.get("authz.name"):
            policy = f"{kv.get('authz.kind', 'authz')}/{kv['authz.name']}"
        cid = _CLIENT_ID.search(body)
        client_ip = kv.get("client.ip") or ip_of(kv.get("client"))
        tls_text = kv.get("client.tls") or kv.get("tls") or ""
        self_wl, self_ns = self_identity(labels)
        src_ns, src_sa = principal_identity(cid.group(1) if cid else None)
        port = _SERVER_PORT.search(text)
        return {
            "event_type": "authz",
            "record_kind": "proxy_log",
            "mesh": "linkerd",
            "format": "linkerd_proxy",
            "direction": "inbound",
            "src_principal": cid.group(1) if cid else None,
            "src_namespace": src_ns,
            "src_workload": src_sa,
            "src_ip": client_ip,
            "dst_service": self_wl,
            "dst_workload": self_wl,
            "dst_namespace": self_ns,
            "dst_port": int(port.group(1)) if port else None,
            "protocol": "tcp" if tcp else "http",
            "status": 0 if tcp else (403 if decision == "deny" else None),
            "authz_decision": decision,
            "authz_policy": policy,
            "mtls": bool(cid) or (tls_text.startswith("Some(Established") if tls_text else None),
        }
    if "error=unauthorized " in text or (" error=" in text and (
            "unauthorized request on route" in text or "unauthorized connection on server" in text)):
        raise Reject("Linkerd follow-up error line of a denial already recorded by its "
                     "'Request denied'/'Connection denied' line")
    authn = _authn_event(text, labels)
    if authn is not None:
        return authn
    raise Reject("Linkerd proxy log line that is not an access or policy record")


_CERTIFY = re.compile(r"Failed to certify identity: ?(?P<reason>.*)$")
_CONN_ERROR = re.compile(r"(?:Connection closed|Unexpected error|Request failed|error)\S* error=(?P<reason>.+)$")
# Identity/TLS words that make a server-side connection error an authentication failure. Not
# "TLS detection timed out": that is protocol detection of a slow or non-meshed client, not a failed
# authentication.
_AUTHN_ERROR = re.compile(r"certificate|handshake|identity|\btls: |AccessDenied|\balert\b|UnknownIssuer|"
                          r"BadCertificate|CertificateRequired|peer is not authenticated", re.IGNORECASE)
_TRAILING_KV = re.compile(r"\s+[a-z_]+(?:\.[a-z_]+)+=")  # " client.addr=..." after the error text
_PEER = re.compile(r"\b(?:peer|client)\.addr=([^\s}]+)")


def _authn_event(text: str, labels: Labels) -> Event | None:
    """Linkerd identity failures (``authn``) in proxy logs, or None.

    Two kinds (linkerd2 issues #3937 and #5662): the proxy cannot obtain its own certificate from the
    identity service (``linkerd2_proxy_identity::certify Failed to certify identity: ...``), and an inbound
    or admin connection closed by a TLS/identity error (``accept{peer.addr=...}: ...serve: Connection
    closed error=... no server certificate chain resolved``).
    """
    self_wl, self_ns = self_identity(labels)
    m = _CERTIFY.search(text)
    if m:
        return {"event_type": "authn", "record_kind": "proxy_log", "mesh": "linkerd", "format": "linkerd_proxy",
                "src_workload": self_wl, "src_namespace": self_ns, "dst_service": "linkerd-identity",
                "authn_reason": ("Failed to certify identity: " + m["reason"]).strip()[:500]}
    m = _CONN_ERROR.search(text)
    if not m:
        return None
    reason = _TRAILING_KV.split(m["reason"], maxsplit=1)[0].strip()[:500]
    if not _AUTHN_ERROR.search(reason) or "TLS detection timed out" in reason:
        return None
    inbound = "inbound" in text or "admin{" in text or "accept{" in text
    peer = _PEER.search(text)
    port = _SERVER_PORT.search(text)
    return {"event_type": "authn", "record_kind": "proxy_log", "mesh": "linkerd", "format": "linkerd_proxy",
            "direction": "inbound" if inbound else "outbound",
            "src_ip": ip_of(peer.group(1)) if peer and inbound else None,
            "dst_service": self_wl if inbound else None, "dst_workload": self_wl if inbound else None,
            "dst_namespace": self_ns if inbound else None,
            "src_workload": None if inbound else self_wl, "src_namespace": None if inbound else self_ns,
            "dst_port": int(port.group(1)) if port else None,
            "mtls": False, "tls_failure_reason": reason, "authn_reason": reason}


def looks_like_proxy(text: str) -> bool:
    return "linkerd_app_" in text or "linkerd2_proxy" in text or "linkerd2_app_" in text


def looks_like_proxy_json(obj: Any) -> bool:
    """Linkerd proxy logs in JSON (``config.linkerd.io/proxy-log-format: json``): tracing's JSON layout."""
    return (isinstance(obj, dict) and isinstance(obj.get("fields"), dict) and isinstance(obj.get("target"), str)
            and obj["target"].startswith(("linkerd", "linkerd2")))


def _span_text(span: Any) -> str:
    if not isinstance(span, dict):
        return str(span)
    attrs = " ".join(f"{k}={v}" for k, v in span.items() if k != "name")
    return f"{span.get('name', '')}{{{attrs}}}" if attrs else str(span.get("name", ""))


def parse_proxy_json(text: str, obj: Any, labels: Labels) -> Event:
    """A JSON-format proxy log record: the same events (and rejects) as its text form.

    tracing's JSON layout carries the text form's parts as fields -- ``timestamp`` (the proxy's uptime,
    like ``[  48.37s]``), ``level``, ``spans`` (the ``inbound:server{port=80}:...`` context), ``target``
    (the module) and ``fields`` (``message`` plus key/values) -- so the line is rebuilt from them and
    read by :func:`parse_proxy`, which keeps one definition of what a denial looks like.
    """
    if not looks_like_proxy_json(obj):
        raise Reject("not a Linkerd JSON proxy log record (no fields/target)")
    fields = dict(obj["fields"])
    message = str(fields.pop("message", ""))
    spans = obj.get("spans") if isinstance(obj.get("spans"), list) else []
    context = ":".join(_span_text(s) for s in spans)
    kvs = " ".join(f"{k}={v}" for k, v in fields.items())
    line = f"{obj.get('timestamp', '')} {obj.get('level', '')} {context}: {obj['target']}: {message} {kvs}".rstrip()
    ev = parse_proxy(line, None, labels)
    ev["format"] = "linkerd_proxy_json"
    return ev
