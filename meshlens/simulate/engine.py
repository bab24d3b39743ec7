"""The request engine: call trees through the mesh, with both sidecars' records for every hop.

One root request (a user at the ingress gateway, or a worker's job) gets one ``x-request-id`` that the
applications propagate. Every hop ``A -> B`` produces the client sidecar's outbound record in A's pod
(cluster ``outbound|<port>||<svc>.<ns>.svc.cluster.local``, authority ``<svc>:<port>``) and the server
sidecar's inbound record in the chosen B pod (cluster ``inbound|<port>||``, SNI
``outbound_.<port>_._.<svc>.<ns>.svc.cluster.local``, downstream remote = A's pod IP and the very port
A's sidecar connected from), as in the istio.io access-log task pair.

Timing composes: a server's duration is its own processing plus its children's client-side durations
(sequential or in parallel), the client's duration adds the network both ways, and
``x-envoy-upstream-service-time`` is the time to the upstream's response headers. All times are integer
microseconds, truncated to milliseconds when rendered (as Envoy does), so a parent is never shorter
than a child. A client timeout (504 UT) is the one place where a child may outlive its caller: the
server then logs ``0 DC downstream_remote_disconnect`` as the client hung up -- as real proxies do.

Errors propagate: a failed critical call makes the caller answer with its own 5xx ``via_upstream``.

gRPC (``Scenario.grpc``): in-mesh hops are ``POST /<namespace>.<Service>/<Method>`` over HTTP/2 and every
answer is HTTP 200 with a ``grpc-status`` (:meth:`Engine._grpc_wire`): the application's own code for its
answers, Envoy's HTTP-to-gRPC mapping for the proxies' local replies (which keep their flags and
details). Internally hops still carry the HTTP-like code, so failure propagation is unchanged.
"""

from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass

from meshlens.simulate.cluster import Cluster, Pod
from meshlens.simulate.plan import Incident, Noisy
from meshlens.simulate.render import AccessRecord, istio_json, istio_text, linkerd_json
from meshlens.simulate.topology import GATEWAY, Entry, Op, Topology

S = 1_000_000

# Envoy local-reply bodies (their lengths are what %BYTES_SENT% shows)
_RESET_PREFIX = "upstream connect error or disconnect/reset before headers. "
BODY_RBAC = 19  # "RBAC: access denied"
BODY_UH = 19  # "no healthy upstream"
BODY_RL = 18  # "local_rate_limited"
BODY_UT = 24  # "upstream request timeout"

_BROWSER_UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.113 Mobile Safari/537.36",
]
_APP_UAS = ["ShopApp/4.12.0 (iPhone; iOS 17.4.1)", "okhttp/4.12.0", "curl/8.5.0"]
_WORDS = ["lamp", "desk", "chair", "usb-c", "kettle", "tent", "jacket", "monitor", "book", "espresso",
          "headphones", "rain+boots", "caf%C3%A9", "socks%26gloves", "%3Cscript%3E"]


@dataclass(slots=True)
class Result:
    status: int
    end_us: int
    failed: bool


class Recorder:
    """Collects rendered lines per pod stream with their backend (Loki) timestamps."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"{seed}:collector")
        self.lines: dict[Pod, list[tuple[int, str]]] = {}
        self.access_count = 0
        self.other_count = 0
        self.keep_ns: tuple[int, int] | None = None  # only lines shipped in [lo, hi) are kept

    def add(self, pod: Pod, end_us: int, line: str, access: bool = True) -> None:
        # Envoy flushes its access log every second; the agent ships it a few ms later.
        ts_ns = end_us * 1000 + 2_000_000 + int(self.rng.random() * 998_000_000)
        if self.keep_ns is not None and not self.keep_ns[0] <= ts_ns < self.keep_ns[1]:
            return
        self.lines.setdefault(pod, []).append((ts_ns, line))
        if access:
            self.access_count += 1
        else:
            self.other_count += 1


class Engine:
    def __init__(self, topo: Topology, cluster: Cluster, incidents: list[Incident], noisy: Noisy | None,
                 *, seed: int, formats: dict[str, str], details_style: str, cluster_semicolon: bool,
                 background_error_rate: float, grpc: bool = False) -> None:
        self.topo = topo
        self.cluster = cluster
        self.incidents = incidents
        self.noisy = noisy
        self.rng = random.Random(f"{seed}:traffic")
        self.rec = Recorder(seed)
        self.formats = formats  # namespace -> "text" | "json"
        self.pipe = details_style == "pipe"
        self.semicolon = cluster_semicolon
        self.bg = background_error_rate
        self.grpc = grpc
        self.by_target: dict[str, list[Incident]] = {}
        self.by_client: dict[str, list[Incident]] = {}
        for inc in incidents:
            key = inc.target
            if inc.kind == "tls_failure" and inc.variant == "expired":
                self.by_client.setdefault(key, []).append(inc)
            else:
                self.by_target.setdefault(key, []).append(inc)
        self._placeholders: dict[str, list[str]] = {}
        self.meshes = {n: topo.mesh_of(n) for n in topo.services}
        self.meshes[GATEWAY] = "istio"
        self.ns_of = {n: s.namespace for n, s in topo.services.items()}
        self.ns_of[GATEWAY] = "istio-system"
        self.ext_ips = ["203.0.113", "198.51.100", "192.0.2"]  # documentation ranges (RFC 5737)

    # ------------------------------------------------------------------ helpers
    def _ri(self, lo: int, hi: int) -> int:
        """randint without ``random.randint``'s overhead (called millions of times)."""
        return lo + int(self.rng.random() * (hi - lo + 1))

    def _rid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _eph(self) -> int:
        return self._ri(32768, 60999)

    def _net(self) -> int:
        return self._ri(150, 650)

    def _fill(self, path: str, params: dict[str, str]) -> str:
        names = self._placeholders.get(path)
        if names is None:
            names = [f for _, f, _, _ in string.Formatter().parse(path) if f]
            self._placeholders[path] = names
        if not names:
            return path
        return path.format(**{n: params[n] for n in names})

    def _params(self) -> dict[str, str]:
        r = self.rng
        return {
            "pid": str(r.randint(1000, 99999)), "uid": f"u{r.randint(100000, 999999)}",
            "q": r.choice(_WORDS), "n": str(r.randint(1, 6)), "sku": f"SKU-{r.randint(10000, 99999)}",
            "acct": f"{r.randint(10**9, 10**10 - 1)}", "m": f"2024-{r.randint(1, 4):02d}",
            "cur": r.choice(["EUR", "USD", "GBP"]), "cur2": r.choice(["CHF", "JPY", "SEK"]),
            "tid": f"t{r.randint(10000, 99999)}", "r": r.choice(["eu-west-1", "us-east-1"]),
            "sid": f"{r.getrandbits(64):016x}", "aid": str(r.randint(1, 400)),
        }

    def _emit_istio(self, pod: Pod, rec: AccessRecord, end_us: int) -> None:
        if self.formats.get(pod.namespace) == "json":
            line = istio_json(rec, pod.json_keys, self.semicolon, grpc_key=self.grpc)
        else:
            line = istio_text(rec)
        self.rec.add(pod, end_us, line)

    def _reset_details(self, kind: str, tfr: str | None, retried: bool) -> tuple[str, str | None, int]:
        """(RESPONSE_CODE_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON, body length) for an upstream reset.

        ``kind``: ``refused``, ``tls_verify``, ``tls_expired`` or ``termination``. Two Envoy generations:
        comma style ``{connection_failure,TLS_error:_...}`` with a spaced reason (formats.md §1.5), pipe
        style ``{remote_connection_failure|TLS_error:|...:TLS_error_end}`` (istio PR #52886).
        """
        if kind == "termination":
            reason_text = "connection termination"
            return "upstream_reset_before_response_started{connection_termination}", None, len(
                _RESET_PREFIX + ("retried and the latest reset reason: " if retried else "reset reason: ")
                + reason_text)
        if kind == "refused":
            raw = "delayed connect error: Connection refused" if self.pipe else "delayed connect error: 111"
        elif kind == "tls_verify":
            raw = ("TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end"
                   if self.pipe else "TLS error: 268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED")
        else:
            raw = ("TLS_error:|268436501:SSL_routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED:TLS_error_end"
                   if self.pipe else "TLS error: 268436501:SSL routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED")
        underscored = raw.replace(" ", "_")
        if self.pipe:
            details = "upstream_reset_before_response_started{remote_connection_failure|" + underscored + "}"
            reason_text = "remote connection failure"
            logged_tfr = underscored
        else:
            details = "upstream_reset_before_response_started{connection_failure," + underscored + "}"
            reason_text = "connection failure"
            logged_tfr = raw
        body = _RESET_PREFIX + ("retried and the latest reset reason: " if retried else "reset reason: ") + \
            reason_text + ", transport failure reason: " + raw.replace("_", " ")
        return details, logged_tfr, len(body)

    # ------------------------------------------------------------------ gRPC
    # Envoy's Grpc::Utility::httpToGrpcStatus, used for its local replies to gRPC requests
    _ENVOY_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
    # what a gRPC application answers where an HTTP one would answer the code
    _APP_GRPC = {404: 5, 403: 7, 401: 16, 429: 8, 500: 13, 502: 2, 503: 14, 504: 4}

    @classmethod
    def _grpc_wire(cls, code: int, details: str | None) -> tuple[int, int | None]:
        """(HTTP status, grpc-status) as logged for a gRPC call that ended with the HTTP-like ``code``:
        HTTP 200 and OK for a success, 200 and the failing status otherwise (gRPC answers errors in the
        trailers; Envoy's local replies to gRPC requests are 200 too). No response (0): no status."""
        if code == 0:
            return 0, None
        if code < 400:
            return 200, 0
        table = cls._APP_GRPC if details == "via_upstream" else cls._ENVOY_GRPC
        return 200, table.get(code, 2)

    @staticmethod
    def _grpc_path(ns: str, target: str, op: Op) -> str:
        """``/<namespace>.<Service>/<Method>`` of an operation (``payments`` ``charge`` ->
        ``/bank.Payments/Charge``)."""
        camel = "".join(w.capitalize() for w in target.replace("_", "-").split("-"))
        method = "".join(w.capitalize() for w in op.name.replace("-", "_").split("_"))
        return f"/{ns}.{camel}/{method}"

    @staticmethod
    def _grpc_ua(ua: str) -> str:
        """The gRPC library's user agent for a service whose HTTP client says ``ua``."""
        low = ua.lower()
        if "java" in low or "okhttp" in low:
            return "grpc-java-netty/1.62.2"
        if "python" in low:
            return "grpc-python/1.62.1 grpc-c/39.0.0 (linux; chttp2)"
        if "axios" in low or "node" in low:
            return "grpc-node-js/1.10.6"
        return "grpc-go/1.62.1"

    # ------------------------------------------------------------------ effects
    def _client_failure(self, client: str, client_pod: Pod, target: str, t: int) -> tuple | None:
        """Failures decided by the client sidecar before any upstream answers:
        (code, flags, details, transport_failure, bytes_sent, duration_us, upstream_host?, cluster?, route)."""
        rng = self.rng
        for inc in self.by_target.get(target, ()):
            if not inc.active(t):
                continue
            if inc.kind == "route_broken" and rng.random() < inc.severity:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                if inc.variant == "no_route":
                    return 404, "NR", "route_not_found", None, 0, self._ri(80, 600), None, False, None
                return 503, "NC", "cluster_not_found", None, 0, self._ri(80, 600), None, False, inc.route_name
            if inc.kind == "tls_failure" and rng.random() < inc.severity:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                det, tfr, body = self._reset_details("tls_verify", None, True)
                return 503, "UF,URX", det, tfr, body, self._ri(3000, 14000), "pod", True, "default"
            if inc.kind == "bad_rollout" and inc.variant == "crashloop" and rng.random() < inc.severity * 0.5:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                return 503, "UH", "no_healthy_upstream", None, BODY_UH, self._ri(50, 400), None, True, "default"
        for inc in self.by_client.get(client, ()):
            if inc.active(t) and client_pod.name in inc.bad_pods and self.meshes.get(target) == "istio":
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                det, tfr, body = self._reset_details("tls_expired", None, True)
                return 503, "UF,URX", det, tfr, body, self._ri(3000, 12000), "pod", True, "default"
        nz = self.noisy
        if nz is not None and nz.service == target and nz.active(t) and rng.random() < nz.error_rate * 0.4:
            det, _, body = self._reset_details("termination", None, False)
            return 503, "UC", det, None, body, self._ri(1000, 30000), "pod", True, "default"
        r = rng.random()
        if r < self.bg * 0.25:
            det, _, body = self._reset_details("termination", None, False)
            return 503, "UC", det, None, body, self._ri(500, 20000), "pod", True, "default"
        if r < self.bg * 0.3:
            det, tfr, body = self._reset_details("refused", None, True)
            return 503, "UF,URX", det, tfr, body, self._ri(1000, 5000), "pod", True, "default"
        return None

    def _pod_failure(self, target: str, pod: Pod, t: int) -> tuple | None:
        rng = self.rng
        for inc in self.by_target.get(target, ()):
            if not inc.active(t):
                continue
            if inc.kind == "connection_failure" and pod.name in inc.bad_pods:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                det, tfr, body = self._reset_details("refused", None, True)
                return 503, "UF,URX", det, tfr, body, self._ri(1000, 6000)
            if inc.kind == "bad_rollout" and inc.variant == "crashloop" and pod.rs == inc.bad_rs \
                    and rng.random() < 0.6:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                det, _, body = self._reset_details("termination", None, False)
                return 503, "UC", det, None, body, self._ri(200, 3000)
        return None

    def _server_denial(self, client: str, target: str, t: int, load: float) -> tuple | None:
        """Inbound sidecar local replies: RBAC deny (403) or local rate limit (429)."""
        for inc in self.by_target.get(target, ()):
            if not inc.active(t):
                continue
            if inc.kind == "authz_deny" and client == inc.caller:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                ns = self.ns_of[target]
                return 403, None, f"rbac_access_denied_matched_policy[ns[{ns}]-policy[{inc.policy_name}]-rule[0]]", \
                    BODY_RBAC
            if inc.kind == "rate_limit":
                p = max(0.0, 1.0 - inc.limit / max(load, 1e-6))
                if self.rng.random() < p:
                    inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                    return 429, "RL", "local_rate_limited", BODY_RL
        return None

    def _starved(self, client: str, t: int) -> int:
        """Time (us) a CPU-starved client adds to its own client-side view of a call: it is slow to
        read the response, so its sidecar's outbound record grows while the callee's inbound one does
        not."""
        for inc in self.by_target.get(client, ()):
            if inc.active(t) and inc.kind == "latency" and inc.variant == "starved_caller":
                return int(inc.severity * 1000.0 * 0.5 * math.exp(self.rng.gauss(0.0, 0.5)))
        return 0

    def _app_effect(self, target: str, pod: Pod, t: int, op: Op | None = None
                    ) -> tuple[float, tuple[int, int] | None]:
        """(added processing time in us, (status, bytes) of an application error or None)."""
        rng = self.rng
        extra = 0.0
        err: tuple[int, int] | None = None
        for inc in self.by_target.get(target, ()):
            if not inc.active(t):
                continue
            if inc.kind == "latency":
                if (inc.variant == "slow_release" and pod.rs == inc.bad_rs) or inc.variant == "slow_config" or \
                        (inc.variant == "slow_node" and pod.name in inc.bad_pods) or inc.variant == "starved_caller":
                    extra += inc.severity * 1000.0 * math.exp(rng.gauss(0.0, 0.5))
                    inc.stats["slow_hops"] = inc.stats.get("slow_hops", 0) + 1
                elif inc.variant == "minority_route" and op is not None and op.name == inc.slow_op:
                    extra += op.self_ms * 1000.0 * (inc.severity - 1) * math.exp(rng.gauss(0.0, 0.3))
                    inc.stats["slow_hops"] = inc.stats.get("slow_hops", 0) + 1
            elif inc.kind == "bad_rollout" and inc.variant == "errors" and pod.rs == inc.bad_rs:
                if rng.random() < inc.severity:
                    inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                    err = (500, self._ri(60, 240))
            elif inc.kind == "app_errors" and rng.random() < inc.severity:
                inc.stats["failed_hops"] = inc.stats.get("failed_hops", 0) + 1
                err = (503, self._ri(40, 120))
        nz = self.noisy
        if err is None and nz is not None and nz.service == target and nz.active(t) and \
                rng.random() < nz.error_rate * 0.6:
            err = (500, self._ri(30, 200))
        if err is None and rng.random() < self.bg * 0.5:
            err = (rng.choice([500, 500, 503]), self._ri(30, 200))
        return extra, err

    # ------------------------------------------------------------------ a hop
    def call(self, client: str, client_pod: Pod, target: str, op_name: str, t0: int, rid: str,
             params: dict[str, str], xff: str | None, host: str | None, ua: str, timeout_ms: int,
             load: float) -> Result:
        """One hop client -> target starting at ``t0`` (when the client's sidecar gets the request)."""
        rng = self.rng
        svc = self.topo.services[target]
        op = svc.op(op_name)
        ns = svc.namespace
        path = self._fill(op.path, params)
        client_istio = self.meshes[client] == "istio"
        target_istio = self.meshes[target] == "istio"
        grpc = self.grpc and client != GATEWAY and client_istio and target_istio
        method = op.method
        if grpc:
            method, path, ua = "POST", self._grpc_path(ns, target, op), self._grpc_ua(ua)
        same_ns = self.ns_of[client] == ns
        authority = host or (f"{target}:{svc.port}" if same_ns else f"{target}.{ns}:{svc.port}")
        cluster_name = f"outbound|{svc.port}||{target}.{ns}.svc.cluster.local"
        protocol = "HTTP/1.1" if client_istio or svc.protocol != "HTTP/2.0" else svc.protocol
        if grpc:
            protocol = "HTTP/2"
        req_bytes = 0 if op.req_bytes == 0 else max(1, int(op.req_bytes * rng.uniform(0.7, 1.3)))
        if client == GATEWAY:
            cl_down_local = f"{client_pod.ip}:8443"
            cl_down_remote = f"{xff}:{self._eph()}"
            cl_sni = host
            cl_route = None
        else:
            cl_down_local = f"{self.cluster.cluster_ips[target]}:{svc.port}"
            cl_down_remote = f"{client_pod.ip}:{self._eph()}"
            cl_sni = None
            cl_route = "default"
        up_local_port = self._eph()

        def client_record(code: int, flags: str | None, details: str | None, tfr: str | None, tx: int,
                          dur_us: int, ust_us: int | None, up_host: str | None, cluster: str | None,
                          route: str | None, rx: int = req_bytes, connected: bool = True) -> None:
            if not client_istio:
                return
            code, gs = self._grpc_wire(code, details) if grpc else (code, None)
            rec = AccessRecord(
                start_us=t0, method=method, path=path, protocol=protocol, code=code, flags=flags,
                details=details, transport_failure=tfr, bytes_rx=rx, bytes_tx=tx, duration_ms=dur_us // 1000,
                ust_ms=None if ust_us is None else ust_us // 1000, xff=xff, ua=ua, request_id=rid,
                authority=authority, upstream_host=up_host, upstream_cluster=cluster,
                upstream_local=f"{client_pod.ip}:{up_local_port}" if up_host and connected else None,
                downstream_local=cl_down_local, downstream_remote=cl_down_remote, sni=cl_sni, route=route,
                grpc_status=gs)
            self._emit_istio(client_pod, rec, t0 + dur_us)

        # 1. failures the client sidecar decides without an upstream answer
        if client_istio:
            lf = self._client_failure(client, client_pod, target, t0)
            if lf is not None:
                code, flags, details, tfr, tx, dur, up, use_cluster, route = lf
                pods = self.cluster.pods_of(target, t0)
                up_host = f"{rng.choice(pods).ip}:{svc.container_port}" if up == "pod" and pods else None
                # NR: no route matched ("-"); NC: the VirtualService route that pointed nowhere
                route_out = route if flags == "NC" else (None if flags == "NR" else cl_route)
                client_record(code, flags, details, tfr, tx, dur, None, up_host,
                              cluster_name if use_cluster else None, route_out,
                              connected="delayed" not in (tfr or ""))
                return Result(code, t0 + dur, True)
        pods = self.cluster.pods_of(target, t0)
        if not pods:
            client_record(503, "UH", "no_healthy_upstream", None, BODY_UH, 200, None, None, cluster_name, cl_route)
            return Result(503, t0 + 200, True)
        pod = pods[rng.randrange(len(pods))]
        up_host = f"{pod.ip}:{svc.container_port}"
        if client_istio:
            pf = self._pod_failure(target, pod, t0)
            if pf is not None:
                code, flags, details, tfr, tx, dur = pf
                client_record(code, flags, details, tfr, tx, dur, None, up_host, cluster_name, cl_route,
                              connected="delayed" not in (tfr or ""))
                return Result(code, t0 + dur, True)
        net = self._net()
        t_srv = t0 + net
        srv_up_local = f"127.0.0.6:{self._eph()}"
        srv_down_remote = f"{client_pod.ip}:{up_local_port}"
        sni = f"outbound_.{svc.port}_._.{target}.{ns}.svc.cluster.local" if client_istio else None

        def server_record(code: int, flags: str | None, details: str | None, tx: int, dur_us: int,
                          ust_us: int | None, upstream: bool, route: str | None = "default") -> None:
            if target_istio:
                code, gs = self._grpc_wire(code, details) if grpc else (code, None)
                rec = AccessRecord(
                    start_us=t_srv, method=method, path=path, protocol=protocol, code=code, flags=flags,
                    details=details, transport_failure=None, bytes_rx=req_bytes, bytes_tx=tx,
                    duration_ms=dur_us // 1000, ust_ms=None if ust_us is None else ust_us // 1000, xff=xff,
                    ua=ua, request_id=rid, authority=authority, upstream_host=up_host if upstream else None,
                    upstream_cluster=f"inbound|{svc.container_port}||",
                    upstream_local=srv_up_local if upstream else None, downstream_local=up_host,
                    downstream_remote=srv_down_remote, sni=sni, route=route, grpc_status=gs)
                self._emit_istio(pod, rec, t_srv + dur_us)
            elif self.meshes[target] == "linkerd":
                client_id = (f"{client}.{self.ns_of[client]}.serviceaccount.identity.linkerd.cluster.local"
                             if self.meshes[client] == "linkerd" else None)
                version = "HTTP/2.0" if self.meshes[client] == "linkerd" else protocol
                uri = f"http://{authority}{path}" if version == "HTTP/2.0" else path
                line = linkerd_json(client_addr=srv_down_remote, client_id=client_id, host=authority,
                                    method=op.method, processing_ns=self._ri(28_000, 48_000),
                                    request_bytes=req_bytes, response_bytes=tx, status=code,
                                    ts_ns=t_srv * 1000 + self._ri(0, 999), total_ns=dur_us * 1000 +
                                    self._ri(0, 999), trace_id=rid, uri=uri, user_agent=ua,
                                    version=version)
                self.rec.add(pod, t_srv + dur_us, line)

        # 2. the server sidecar may answer locally (RBAC deny, local rate limit)
        if target_istio:
            deny = self._server_denial(client, target, t_srv, load)
            if deny is not None:
                code, flags, details, tx = deny
                srv_dur = self._ri(60, 400)
                server_record(code, flags, details, tx, srv_dur, None, False, route=None)
                cl_dur = srv_dur + 2 * net + self._ri(50, 200)
                client_record(code, None, "via_upstream", None, tx, cl_dur, srv_dur + 2 * net, up_host,
                              cluster_name, cl_route)
                return Result(code, t0 + cl_dur, True)

        # 3. the application
        in_overhead = self._ri(60, 250)
        app_start = t_srv + in_overhead
        status, tx, app_us, failed = self.serve(target, pod, op, app_start, rid, params, xff, load)
        srv_dur = app_us + in_overhead + self._ri(40, 200)
        ust_srv = app_us + self._ri(20, 120)
        cl_total = srv_dur + 2 * net + self._ri(60, 250) + self._starved(client, t0)
        if timeout_ms and cl_total > timeout_ms * 1000:
            to = timeout_ms * 1000
            server_record(0, "DC", "downstream_remote_disconnect", 0, max(0, to - net), None, True)
            client_record(504, "UT", "upstream_response_timeout", None, BODY_UT, to + self._ri(100, 900),
                          None, up_host, cluster_name, cl_route)
            return Result(504, t0 + to, True)
        server_record(status, None, "via_upstream", tx, srv_dur, ust_srv, True)
        client_record(status, None, "via_upstream", None, tx, cl_total, srv_dur + 2 * net, up_host, cluster_name,
                      cl_route)
        return Result(status, t0 + cl_total, failed)

    def serve(self, name: str, pod: Pod, op: Op, t: int, rid: str, params: dict[str, str],
              xff: str | None, load: float) -> tuple[int, int, int, bool]:
        """Run ``op`` in ``pod`` from ``t``: returns (status, response bytes, app time us, failed)."""
        rng = self.rng
        svc = self.topo.services[name]
        extra, err = self._app_effect(name, pod, t, op)
        self_us = op.self_ms * 1000.0 * math.exp(rng.gauss(0.0, 0.45)) + extra
        if rng.random() < 0.002:
            self_us *= rng.uniform(8, 30)  # the long tail: GC pause, cold cache
        self_us = max(200, int(self_us))
        if err is not None:
            return err[0], err[1], max(150, self_us // 3), True
        if op.not_found_rate and rng.random() < op.not_found_rate:
            return 404, self._ri(20, 90), max(150, self_us // 2), False
        pre = int(self_us * 0.4)
        cur = t + pre
        failed_dep = False
        if op.parallel:
            ends = [cur]
            for c in op.calls:
                if rng.random() < c.prob:
                    r = self.call(name, pod, c.service, c.op, cur + self._ri(20, 120), rid, params, None, None,
                                  svc.client_ua, c.timeout_ms, load)
                    ends.append(r.end_us)
                    if r.failed and c.critical:
                        failed_dep = True
            cur = max(ends)
        else:
            for c in op.calls:
                if rng.random() >= c.prob:
                    continue
                r = self.call(name, pod, c.service, c.op, cur + self._ri(20, 120), rid, params, None, None,
                              svc.client_ua, c.timeout_ms, load)
                cur = r.end_us
                if r.failed and c.critical:
                    failed_dep = True
                    break
        cur += self_us - pre
        app_us = cur - t
        if failed_dep:
            return svc.dep_error_status, self._ri(40, 160), app_us, True
        size = max(0, int(op.resp_bytes * math.exp(rng.gauss(0.0, 0.25)))) if op.resp_bytes else 0
        return 200, size, app_us, False

    # ------------------------------------------------------------------ roots
    def gateway_request(self, entry: Entry, t: int, load: float) -> Result:
        rng = self.rng
        gw_pods = self.cluster.pods_of(GATEWAY, t)
        gw = gw_pods[rng.randrange(len(gw_pods))]
        client_ip = f"{rng.choice(self.ext_ips)}.{self._ri(1, 254)}"
        ua = rng.choice(_BROWSER_UAS) if rng.random() < 0.8 else rng.choice(_APP_UAS)
        return self.call(GATEWAY, gw, entry.service, entry.op, t, self._rid(), self._params(), client_ip,
                         entry.host, ua, 15000, load)

    def worker_job(self, entry: Entry, t: int, load: float) -> None:
        rng = self.rng
        pods = self.cluster.pods_of(entry.service, t)
        if not pods:
            return
        pod = pods[rng.randrange(len(pods))]
        svc = self.topo.services[entry.service]
        op = svc.op(entry.op)
        rid = self._rid()
        params = self._params()
        cur = t
        for c in op.calls:
            if rng.random() >= c.prob:
                continue
            r = self.call(entry.service, pod, c.service, c.op, cur, rid, params, None, None, svc.client_ua,
                          c.timeout_ms, load)
            cur = r.end_us + self._ri(100, 2000)
            if r.failed and c.critical:
                break

    def health_check(self, pod: Pod, t: int) -> None:
        """A kubelet probe through the inbound sidecar (plaintext from the node, no client record)."""
        rng = self.rng
        svc = self.topo.services.get(pod.deployment)
        if svc is None:
            return
        port = svc.container_port
        dur = self._ri(300, 2500)
        if self.meshes[svc.name] == "istio":
            path = rng.choice(["/healthz", "/ready"])
            rec = AccessRecord(
                start_us=t, method="GET", path=path, protocol="HTTP/1.1", code=200, flags=None,
                details="via_upstream", transport_failure=None, bytes_rx=0, bytes_tx=2, duration_ms=dur // 1000,
                ust_ms=max(0, dur - 200) // 1000, xff=None, ua="kube-probe/1.29", request_id=self._rid(),
                authority=f"{pod.ip}:{port}", upstream_host=f"{pod.ip}:{port}", upstream_cluster=f"inbound|{port}||",
                upstream_local=f"127.0.0.6:{self._eph()}", downstream_local=f"{pod.ip}:{port}",
                downstream_remote=f"{pod.node_ip}:{self._eph()}", sni=None, route="default")
            self._emit_istio(pod, rec, t + dur)
        else:
            line = linkerd_json(client_addr=f"{pod.node_ip}:{self._eph()}", client_id=None,
                                host=f"{pod.ip}:{port}", method="GET", processing_ns=self._ri(30_000, 40_000),
                                request_bytes=None, response_bytes=4, status=200, ts_ns=t * 1000 + self._ri(0, 999),
                                total_ns=dur * 1000 + self._ri(0, 999), trace_id="", uri="/ping",
                                user_agent="kube-probe/1.29", version="HTTP/1.1")
            self.rec.add(pod, t + dur, line)
