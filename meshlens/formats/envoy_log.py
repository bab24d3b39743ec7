"""Envoy's own diagnostic log lines where they carry an authorization or authentication outcome.

Two layouts of the same spdlog record (component = the logger name, e.g. ``rbac``, ``jwt``):

* Envoy's native prefix (plain Envoy, Envoy Gateway, Contour, older Istio through pilot-agent's
  ``[Envoy (Epoch 0)] `` prefix): ``[2024-09-26 11:40:13.329][3492045][debug][rbac]
  [source/extensions/filters/http/rbac/rbac_filter.cc:194] enforced denied, matched policy none``
  (``[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v``; the time has no zone -- Envoy logs UTC in containers);
* Istio's layout: ``2024-09-24T07:15:24.215038Z debug envoy jwt external/envoy/source/...cc:NN msg thread=34``
  (RBAC lines in this layout are :func:`meshlens.formats.envoy.parse_rbac_debug`'s ``envoy_rbac_debug``).

Outcomes read (everything else from these components is a reject naming the component):

* ``rbac`` (HTTP and network filter): ``enforced denied`` -> ``deny``, ``shadow denied`` ->
  ``shadow_deny``, ``enforced allowed`` -> ``allow``, ``shadow allowed`` -> ``shadow_allow``, with
  ``matched policy <id>`` as the policy (older Envoy logs no policy);
* ``ext_authz``: ``ext_authz filter rejected the request`` -> deny (policy ``ext_authz``), ``... allowed
  the request`` / ``accepted`` -> allow;
* ``jwt``: the filter's final ``Jwt authentication completed with: <status>`` / ``Called Filter : check
  complete <status>`` and the per-provider ``JWT token verification completed with: <status>`` -> an
  ``authn`` event when the status is not ``OK`` (``authn_reason`` = the status): each line states the
  failure on its own (a full debug log of one request holds both);
* ``connection``: ``TLS_error:|...:TLS_error_end`` / ``TLS error: ...`` handshake failures and
  ``verify cert failed: ...`` -> ``tls`` events with the error as ``tls_failure_reason``.

Direction: RBAC/ext_authz/JWT filters run on the server side (``inbound``); TLS lines name no side.
"""

from __future__ import annotations

import re

from meshlens.formats.base import Event, Labels, Reject

# what shippers put in front of the line: `docker compose logs` ("envoy-1  | "), Grafana's copied log
# panel ("2024-03-15 07:00:59.294<TAB>"), pilot-agent ("[Envoy (Epoch 0)] ")
WRAPPER = r"(?:[\w.-]+\s+\|\s|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\t)?(?:\[Envoy \(Epoch \d+\)\] )?"
_NATIVE = re.compile(
    r"^" + WRAPPER + r"\[(?P<date>\d{4}-\d\d-\d\d)[ T](?P<time>\d\d:\d\d:\d\d(?:\.\d+)?)\]"
    r"\[(?P<thread>[^\]]*)\]\[(?P<level>[a-z]+)\]\[(?P<comp>[a-z_]+)\] (?:\[?(?P<src>[^\]\s]+:\d+)\] )?(?P<msg>.*)$")
_ISTIO = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\S+)\s+(?P<level>trace|debug|info|warning|warn|error|critical)\s+envoy\s+"
    r"(?P<comp>jwt|ext_authz|connection|rbac)\s+(?:\[?(?P<src>[^\s\]]+\.(?:cc|h):\d+)\]?\s+)?(?P<msg>.*?)(?:\s+thread=\d+)?$")
_TAGS = re.compile(r"^(?:\[Tags: [^\]]*\]\s*|\[C\d+\](?:\[S\d+\])?\s*)+")
_COMPONENTS = ("rbac", "jwt", "ext_authz", "connection")

_RBAC = re.compile(r"^(?P<msg>enforced denied|shadow denied|enforced allowed|shadow allowed)"
                   r"(?:,? matched policy (?P<policy>\S+)| (?P<bare>\S+))?\s*$")
_RBAC_DECISION = {"enforced denied": "deny", "shadow denied": "shadow_deny", "enforced allowed": "allow",
                  "shadow allowed": "shadow_allow"}
_JWT_FINAL = re.compile(r"(?:Jwt authentication completed with: |Called Filter : check complete )(?P<status>.+)$")
_JWT_TOKEN = re.compile(r"JWT token verification completed with: (?P<status>.+)$")
_TLS = re.compile(r"(?P<reason>TLS_error:\|.*?TLS_error_end|TLS error: .+|verify cert failed: .+)$")


def looks_like(text: str) -> bool:
    """An Envoy log line (either layout) from a component that can carry an authz/authn outcome."""
    if "][" in text[:80]:
        m = _NATIVE.match(text)
        return bool(m) and m.group("comp") in _COMPONENTS
    return bool(_ISTIO.match(text)) and " envoy rbac " not in text[:60]


def parse(text: str, obj: object, labels: Labels) -> Event:
    m = _NATIVE.match(text)
    mesh = "envoy"
    if m:
        ts = f"{m.group('date')}T{m.group('time')}Z"
        if "[Envoy (Epoch" in text[:40] or (labels or {}).get("container") == "istio-proxy":
            mesh = "istio"  # pilot-agent's prefix / an Istio sidecar
    else:
        mesh = "istio"
        m = _ISTIO.match(text)
        if not m:
            raise Reject("Envoy log line: no '[date time][thread][level][component]' or Istio prefix")
        ts = m.group("ts")
    comp = m.group("comp")
    msg = _TAGS.sub("", m.group("msg").strip())
    base: Event = {"ts_text": ts, "record_kind": "proxy_log", "mesh": mesh, "format": "envoy_log"}
    if comp == "rbac":
        r = _RBAC.match(msg)
        if not r:
            raise Reject(f"Envoy rbac log line without a decision ({_short(msg)})")
        policy = r.group("policy") or r.group("bare")
        return {**base, "event_type": "authz", "direction": "inbound",
                "authz_decision": _RBAC_DECISION[r.group("msg")], "authz_policy": policy}
    if comp == "ext_authz":
        if "filter rejected the request" in msg or "is disabled. Deny the request" in msg:
            code = re.search(r"status code: '?(\d{3})", msg)
            return {**base, "event_type": "authz", "direction": "inbound", "authz_decision": "deny",
                    "authz_policy": "ext_authz", "status": int(code.group(1)) if code else None}
        if "filter accepted the request" in msg or "filter allowed the request" in msg:
            return {**base, "event_type": "authz", "direction": "inbound", "authz_decision": "allow",
                    "authz_policy": "ext_authz"}
        raise Reject(f"Envoy ext_authz log line without a decision ({_short(msg)})")
    if comp == "jwt":
        f = _JWT_FINAL.search(msg)
        if f:
            status = f.group("status").strip()
            if status in ("OK", "Ok"):
                raise Reject("Envoy jwt log line: authentication succeeded (no failure to record)")
            return {**base, "event_type": "authn", "direction": "inbound", "authn_reason": status}
        t = _JWT_TOKEN.search(msg)
        if t:
            status = t.group("status").strip()
            if status in ("OK", "Ok"):
                raise Reject("Envoy jwt log line: token verification succeeded (no failure to record)")
            return {**base, "event_type": "authn", "direction": "inbound", "authn_reason": status}
        raise Reject(f"Envoy jwt log line without an authentication outcome ({_short(msg)})")
    t = _TLS.search(msg)
    if t:
        return {**base, "event_type": "tls", "tls_failure_reason": t.group("reason").strip()}
    raise Reject(f"Envoy connection log line without a TLS failure ({_short(msg)})")


def _short(msg: str, n: int = 60) -> str:
    return msg[:n] + ("..." if len(msg) > n else "")
