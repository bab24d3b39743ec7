"""Service graphs the simulator can run: three hand-written meshes and a seeded random one.

A topology is a set of services, each with *operations* (an HTTP method + path and the downstream calls
that operation makes). Call trees therefore depend on the request -- `GET /product/1` at the frontend
goes through productpage -> reviews -> ratings while `POST /checkout` goes through checkout -> payments
-> fraud -- which is what real meshes look like and what makes root-cause analysis non-trivial.

A call is *critical* when the caller fails if the callee fails (it returns its own 5xx); a non-critical
call degrades gracefully (bookinfo's reviews still answers 200 when ratings is down). Latency always
propagates; errors only along critical calls.

Entry points are reached either through the Istio ingress gateway (an external host) or by an
in-mesh *worker* (a queue consumer / load generator) that originates requests itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from meshlens.errors import ConfigError

GATEWAY = "istio-ingressgateway"
GATEWAY_NS = "istio-system"


@dataclass(frozen=True)
class Call:
    """One downstream call an operation makes (with probability ``prob``)."""

    service: str
    op: str
    prob: float = 1.0
    critical: bool = True
    timeout_ms: int = 3000


@dataclass(frozen=True)
class Op:
    """An operation a service serves: request shape, own processing time and downstream calls."""

    name: str
    method: str
    path: str
    self_ms: float
    resp_bytes: int
    req_bytes: int = 0
    calls: tuple[Call, ...] = ()
    parallel: bool = False
    not_found_rate: float = 0.0


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service + Deployment of the same name (``app`` label = name, SA = name)."""

    name: str
    namespace: str
    port: int
    ops: tuple[Op, ...]
    target_port: int | None = None
    replicas: int = 2
    client_ua: str = "Go-http-client/1.1"
    image_repo: str = ""
    version: str = "1.0.0"
    protocol: str = "HTTP/1.1"
    dep_error_status: int = 500
    worker: bool = False  # originates requests, serves none (queue consumer, load generator)

    @property
    def container_port(self) -> int:
        return self.target_port or self.port

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise ConfigError(f"service {self.name!r} has no operation {name!r}; it has "
                          f"{[o.name for o in self.ops]}")


@dataclass(frozen=True)
class Entry:
    """A root of request trees: a gateway route (``host`` set) or a worker's own operation."""

    service: str
    op: str
    weight: float
    host: str | None = None  # external host at the ingress gateway; None for in-mesh workers


@dataclass(frozen=True)
class Namespace:
    name: str
    mesh: str = "istio"  # "istio" or "linkerd"


@dataclass
class Topology:
    """A named service graph. ``services`` is keyed by short name (unique across namespaces)."""

    name: str
    namespaces: tuple[Namespace, ...]
    services: dict[str, Service]
    entries: tuple[Entry, ...]
    description: str = ""
    _edges: list[tuple[str, str, bool]] | None = field(default=None, repr=False)

    def mesh_of(self, service: str) -> str:
        ns = self.services[service].namespace
        return next(n.mesh for n in self.namespaces if n.name == ns)

    def edges(self) -> list[tuple[str, str, bool]]:
        """(client, server, critical) for every service pair that calls each other, gateway included."""
        if self._edges is None:
            seen: dict[tuple[str, str], bool] = {}
            for entry in self.entries:
                if entry.host is not None:
                    seen[(GATEWAY, entry.service)] = True
            for svc in self.services.values():
                for op in svc.ops:
                    for c in op.calls:
                        key = (svc.name, c.service)
                        seen[key] = seen.get(key, False) or c.critical
            self._edges = [(a, b, crit) for (a, b), crit in sorted(seen.items())]
        return self._edges

    def callers(self, service: str) -> list[str]:
        return sorted({a for a, b, _ in self.edges() if b == service})

    def validate(self) -> None:
        """Fail loudly on a dangling call or an unknown namespace: a typo must not silently drop traffic."""
        ns_names = {n.name for n in self.namespaces}
        for svc in self.services.values():
            if svc.namespace not in ns_names:
                raise ConfigError(f"topology {self.name}: service {svc.name} is in unknown namespace "
                                  f"{svc.namespace}")
            for op in svc.ops:
                for c in op.calls:
                    if c.service not in self.services:
                        raise ConfigError(f"topology {self.name}: {svc.name}.{op.name} calls unknown "
                                          f"service {c.service}")
                    self.services[c.service].op(c.op)
        for e in self.entries:
            if e.service not in self.services:
                raise ConfigError(f"topology {self.name}: entry to unknown service {e.service}")
            self.services[e.service].op(e.op)

    # --- reachability, used to pick incident targets, symptoms, decoys and the noisy service ---

    def op_reach(self, service: str, op_name: str, critical_only: bool) -> dict[str, float]:
        """Expected number of times each service is called per request to ``service.op_name``.

        With ``critical_only`` only chains of critical calls count: that is the share of requests whose
        success depends on the service, i.e. how much of an error there reaches the caller.
        """
        out: dict[str, float] = {}

        def walk(svc: str, opn: str, weight: float, depth: int) -> None:
            if depth > 12:
                return
            for c in self.services[svc].op(opn).calls:
                if critical_only and not c.critical:
                    continue
                w = weight * c.prob
                out[c.service] = out.get(c.service, 0.0) + w
                walk(c.service, c.op, w, depth + 1)

        walk(service, op_name, 1.0, 0)
        return out

    def edge_reach(self, entry_service: str, critical_only: bool) -> dict[tuple[str, str], float]:
        """Expected calls per request to the entry service on each edge (client, server)."""
        out: dict[tuple[str, str], float] = {}
        entries = [e for e in self.entries if e.service == entry_service]
        total = sum(e.weight for e in entries)

        def walk(svc: str, opn: str, weight: float, depth: int) -> None:
            if depth > 12:
                return
            for c in self.services[svc].op(opn).calls:
                if critical_only and not c.critical:
                    continue
                w = weight * c.prob
                out[(svc, c.service)] = out.get((svc, c.service), 0.0) + w
                walk(c.service, c.op, w, depth + 1)

        for e in entries:
            walk(e.service, e.op, e.weight / total, 0)
        return out

    def entry_reach(self, entry_service: str, critical_only: bool) -> dict[str, float]:
        """Share of the entry service's requests that (critically) reach each service."""
        entries = [e for e in self.entries if e.service == entry_service]
        total = sum(e.weight for e in entries)
        out: dict[str, float] = {}
        for e in entries:
            for svc, w in self.op_reach(e.service, e.op, critical_only).items():
                out[svc] = out.get(svc, 0.0) + w * e.weight / total
        return out

    def entry_services(self, gateway_only: bool = False) -> list[str]:
        return sorted({e.service for e in self.entries if not gateway_only or e.host is not None})

    def critical_path(self, entry_service: str, target: str) -> list[str] | None:
        """A chain of critical calls from the entry service to ``target`` (inclusive), or None."""
        best: list[str] | None = None

        def walk(svc: str, opn: str, path: list[str]) -> None:
            nonlocal best
            for c in self.services[svc].op(opn).calls:
                if not c.critical or c.service in path:
                    continue
                p = path + [c.service]
                if c.service == target:
                    if best is None or len(p) < len(best):
                        best = p
                    continue
                walk(c.service, c.op, p)

        for e in self.entries:
            if e.service == entry_service:
                walk(e.service, e.op, [e.service])
        return best

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "namespaces": [{"name": n.name, "mesh": n.mesh} for n in self.namespaces],
            "services": [
                {"name": s.name, "namespace": s.namespace, "port": s.port,
                 "target_port": s.container_port, "workload": s.name, "replicas": s.replicas,
                 "mesh": self.mesh_of(s.name), "worker": s.worker,
                 "entry": s.name in self.entry_services()}
                for s in sorted(self.services.values(), key=lambda s: (s.namespace, s.name))
            ],
            "gateway": {"name": GATEWAY, "namespace": GATEWAY_NS},
            "entries": [{"service": e.service, "op": e.op, "weight": e.weight, "host": e.host}
                        for e in self.entries],
            "edges": [
                {"client": a, "server": b, "edge": f"{a}->{b}", "critical": crit,
                 "client_namespace": GATEWAY_NS if a == GATEWAY else self.services[a].namespace,
                 "server_namespace": self.services[b].namespace}
                for a, b, crit in self.edges()
            ],
        }


def _svc(name: str, ns: str, port: int, ops: list[Op], **kw: object) -> Service:
    return Service(name=name, namespace=ns, port=port, ops=tuple(ops), **kw)  # type: ignore[arg-type]


def _op(name: str, method: str, path: str, self_ms: float, resp: int, calls: list[Call] | None = None,
        **kw: object) -> Op:
    return Op(name=name, method=method, path=path, self_ms=self_ms, resp_bytes=resp,
              calls=tuple(calls or ()), **kw)  # type: ignore[arg-type]


C = Call

_PY_UA = "python-requests/2.31.0"
_GO_UA = "Go-http-client/1.1"
_JAVA_UA = "Java-http-client/17.0.10"
_OKHTTP = "okhttp/4.12.0"
_NODE_UA = "axios/1.6.8"


def shop(linkerd: bool = False) -> Topology:
    """An online shop: bookinfo's productpage->reviews->ratings chain inside a bigger storefront,
    a checkout chain (checkout -> payments -> fraud), identity, catalog, and a queue worker.
    With ``linkerd`` the Linkerd demo app *booksapp* runs in a Linkerd-meshed namespace beside it."""
    reg = "registry.example.com/shop/"
    s = [
        _svc("frontend", "storefront", 8080, [
            _op("home", "GET", "/", 6, 5200, [C("auth", "verify", 0.6), C("catalog", "list"),
                                              C("recommendation", "recommend", 0.9, False, 800)]),
            _op("product", "GET", "/product/{pid}", 5, 7400, [C("auth", "verify", 0.6),
                                                             C("productpage", "product", timeout_ms=5000)]),
            _op("search", "GET", "/search?q={q}&page={n}", 4, 6100, [C("search", "query")]),
            _op("cart", "POST", "/cart", 4, 900, [C("auth", "verify"), C("cart", "add")], req_bytes=180),
            _op("checkout", "POST", "/checkout", 6, 1300, [C("auth", "verify"),
                                                          C("checkout", "place", timeout_ms=8000)],
                req_bytes=420),
        ], replicas=3, client_ua=_NODE_UA, dep_error_status=500),
        _svc("productpage", "storefront", 9080, [
            _op("product", "GET", "/api/v1/products/{pid}", 9, 4100,
                [C("catalog", "get"), C("reviews", "list"), C("inventory", "stock", 0.8, False, 500)]),
        ], replicas=2, client_ua=_PY_UA),
        _svc("reviews", "storefront", 9080, [
            _op("list", "GET", "/reviews/{pid}", 12, 2900, [C("ratings", "get", 0.9, False, 1000)]),
        ], replicas=3, client_ua=_JAVA_UA, dep_error_status=503),
        _svc("ratings", "storefront", 9080, [
            _op("get", "GET", "/ratings/{pid}", 3, 180),
        ], replicas=2, client_ua=_NODE_UA),
        _svc("catalog", "catalog", 8080, [
            _op("list", "GET", "/v1/products?page={n}", 7, 8800, [C("inventory", "stock", 0.5)]),
            _op("get", "GET", "/v1/products/{pid}", 3, 1600),
        ], replicas=3, client_ua=_GO_UA),
        _svc("search", "catalog", 8080, [
            _op("query", "GET", "/v1/search?q={q}", 14, 5200, [C("catalog", "get")]),
        ], replicas=2, client_ua=_GO_UA),
        _svc("inventory", "catalog", 8080, [
            _op("stock", "GET", "/v1/stock/{sku}", 2, 120, not_found_rate=0.01),
        ], replicas=2, client_ua=_JAVA_UA),
        _svc("recommendation", "catalog", 8080, [
            _op("recommend", "GET", "/v1/recommendations?user={uid}", 18, 2400, [C("catalog", "get")]),
        ], replicas=2, client_ua=_PY_UA),
        _svc("checkout", "checkout", 8080, [
            _op("place", "POST", "/v1/orders", 10, 640,
                [C("cart", "get"), C("payments", "charge", timeout_ms=5000), C("shipping", "quote")],
                req_bytes=520),
        ], replicas=2, client_ua=_GO_UA),
        _svc("cart", "checkout", 8080, [
            _op("add", "POST", "/v1/cart/items", 3, 310, [C("inventory", "stock")], req_bytes=140),
            _op("get", "GET", "/v1/cart/{uid}", 2, 720),
        ], replicas=2, client_ua=_GO_UA),
        _svc("payments", "checkout", 8443, [
            _op("charge", "POST", "/v1/charges", 22, 410, [C("fraud", "score", timeout_ms=2000)],
                req_bytes=380),
        ], target_port=8080, replicas=2, client_ua=_JAVA_UA, dep_error_status=502),
        _svc("fraud", "checkout", 8080, [
            _op("score", "POST", "/v1/score", 15, 95, [C("users", "get", 0.5, False, 500)], req_bytes=610),
        ], replicas=2, client_ua=_PY_UA),
        _svc("shipping", "checkout", 8080, [
            _op("quote", "POST", "/v1/quotes", 6, 230, req_bytes=210),
            _op("ship", "POST", "/v1/shipments", 9, 260, req_bytes=330),
        ], replicas=2, client_ua=_GO_UA),
        _svc("notifications", "checkout", 8080, [
            _op("send", "POST", "/v1/notifications", 5, 60, req_bytes=450),
        ], replicas=2, client_ua=_PY_UA),
        _svc("order-worker", "checkout", 8080, [
            _op("process", "POST", "/jobs/order", 3, 0,
                [C("shipping", "ship"), C("notifications", "send", 1.0, False)]),
        ], replicas=1, client_ua=_GO_UA, worker=True),
        _svc("auth", "identity", 8080, [
            _op("verify", "POST", "/v1/token/verify", 2, 210, [C("users", "get", 0.3)], req_bytes=900),
        ], replicas=3, client_ua=_GO_UA),
        _svc("users", "identity", 8080, [
            _op("get", "GET", "/v1/users/{uid}", 3, 520),
        ], replicas=2, client_ua=_JAVA_UA),
    ]
    namespaces = [Namespace("storefront"), Namespace("catalog"), Namespace("checkout"),
                  Namespace("identity")]
    entries = [
        Entry("frontend", "home", 0.20, "shop.example.com"),
        Entry("frontend", "product", 0.33, "shop.example.com"),
        Entry("frontend", "search", 0.14, "shop.example.com"),
        Entry("frontend", "cart", 0.15, "shop.example.com"),
        Entry("frontend", "checkout", 0.18, "shop.example.com"),
        Entry("order-worker", "process", 0.06),
    ]
    if linkerd:
        s += [
            _svc("webapp", "booksapp", 7000, [
                _op("index", "GET", "/", 8, 19600, [C("books", "list"), C("authors", "list")]),
                _op("author", "GET", "/authors/{aid}", 5, 2300, [C("authors", "get"), C("books", "list")]),
                _op("add_book", "POST", "/books", 6, 0, [C("books", "create")], req_bytes=46),
            ], replicas=3, client_ua=_GO_UA, protocol="HTTP/2.0"),
            _svc("authors", "booksapp", 7001, [
                _op("list", "GET", "/authors.json", 4, 3100),
                _op("get", "GET", "/authors/{aid}.json", 2, 240),
            ], replicas=1, client_ua="Ruby", protocol="HTTP/2.0"),
            _svc("books", "booksapp", 7002, [
                _op("list", "GET", "/books.json", 5, 9400),
                _op("create", "POST", "/books.json", 7, 310, [C("authors", "get")], req_bytes=52),
            ], replicas=1, client_ua="Ruby", protocol="HTTP/2.0"),
            _svc("traffic", "booksapp", 7000, [
                _op("load", "GET", "/", 0, 0, [C("webapp", "index", 0.5), C("webapp", "author", 0.35)]),
                _op("post", "POST", "/", 0, 0, [C("webapp", "add_book")]),
            ], replicas=1, client_ua=_GO_UA, worker=True),
        ]
        namespaces.append(Namespace("booksapp", mesh="linkerd"))
        entries += [Entry("traffic", "load", 0.10), Entry("traffic", "post", 0.02)]
    services = {x.name: _with_image(x, reg) for x in s}
    return Topology("shop", tuple(namespaces), services, tuple(entries),
                    "online shop: storefront (bookinfo chain), catalog, checkout, identity"
                    + (", booksapp (Linkerd)" if linkerd else ""))


def bank(linkerd: bool = False) -> Topology:
    """A retail bank: two BFFs (web and mobile) in front of accounts, transfers, risk and notifications."""
    reg = "registry.example.com/bank/"
    s = [
        _svc("web-bff", "edge", 8080, [
            _op("accounts", "GET", "/api/accounts", 5, 3100, [C("accounts", "list")]),
            _op("statements", "GET", "/api/accounts/{acct}/statements?month={m}", 4, 12000,
                [C("statements", "get", timeout_ms=6000)]),
            _op("transfer", "POST", "/api/transfers", 6, 420, [C("transfers", "create", timeout_ms=8000)],
                req_bytes=350),
        ], replicas=3, client_ua=_NODE_UA),
        _svc("mobile-bff", "edge", 8080, [
            _op("balance", "GET", "/m/v2/balance", 3, 260, [C("accounts", "balance")]),
            _op("transfer", "POST", "/m/v2/transfers", 5, 380, [C("transfers", "create", timeout_ms=8000)],
                req_bytes=300),
        ], replicas=3, client_ua=_OKHTTP),
        _svc("accounts", "accounts", 8080, [
            _op("list", "GET", "/v1/customers/{uid}/accounts", 6, 2600,
                [C("customers", "get"), C("ledger", "balance")]),
            _op("balance", "GET", "/v1/accounts/{acct}/balance", 2, 140, [C("ledger", "balance")]),
        ], replicas=3, client_ua=_JAVA_UA),
        _svc("customers", "accounts", 8080, [
            _op("get", "GET", "/v1/customers/{uid}", 3, 880),
        ], replicas=2, client_ua=_JAVA_UA),
        _svc("ledger", "accounts", 8080, [
            _op("balance", "GET", "/v1/ledger/{acct}/balance", 4, 120),
            _op("entries", "GET", "/v1/ledger/{acct}/entries?month={m}", 25, 9800),
            _op("post", "POST", "/v1/ledger/postings", 9, 160, req_bytes=410),
        ], replicas=3, client_ua=_JAVA_UA),
        _svc("statements", "accounts", 8080, [
            _op("get", "GET", "/v1/statements/{acct}?month={m}", 12, 11000,
                [C("ledger", "entries", timeout_ms=5000)]),
        ], replicas=2, client_ua=_PY_UA),
        _svc("transfers", "payments", 8080, [
            _op("create", "POST", "/v1/transfers", 8, 330,
                [C("limits", "check"), C("risk", "assess", timeout_ms=4000), C("fx", "quote", 0.3),
                 C("ledger", "post"), C("notifier", "send", 1.0, False, 500)], req_bytes=360),
        ], replicas=2, client_ua=_GO_UA, dep_error_status=502),
        _svc("limits", "payments", 8080, [
            _op("check", "POST", "/v1/limits/check", 2, 70, req_bytes=150),
        ], replicas=2, client_ua=_GO_UA),
        _svc("fx", "payments", 8080, [
            _op("quote", "GET", "/v1/rates?base={cur}&quote={cur2}", 3, 90),
        ], replicas=2, client_ua=_GO_UA),
        _svc("risk", "risk", 8080, [
            _op("assess", "POST", "/v1/assessments", 6, 140,
                [C("fraud-model", "predict", timeout_ms=2500), C("aml", "screen", 0.5)], parallel=True,
                req_bytes=520),
        ], replicas=2, client_ua=_PY_UA, dep_error_status=503),
        _svc("fraud-model", "risk", 8501, [
            _op("predict", "POST", "/v1/models/fraud:predict", 28, 60, req_bytes=1400),
        ], replicas=2, client_ua=_PY_UA),
        _svc("aml", "risk", 8080, [
            _op("screen", "POST", "/v1/screen", 11, 80, req_bytes=300),
        ], replicas=2, client_ua=_JAVA_UA),
        _svc("notifier", "notify", 8080, [
            _op("send", "POST", "/v1/push", 7, 40, req_bytes=260),
        ], replicas=2, client_ua=_PY_UA),
        _svc("statement-batch", "notify", 8080, [
            _op("run", "POST", "/jobs/statements", 0, 0, [C("statements", "get"), C("notifier", "send")]),
        ], replicas=1, client_ua=_PY_UA, worker=True),
    ]
    namespaces = [Namespace("edge"), Namespace("accounts"), Namespace("payments"), Namespace("risk"),
                  Namespace("notify")]
    entries = [
        Entry("web-bff", "accounts", 0.22, "bank.example.com"),
        Entry("web-bff", "statements", 0.08, "bank.example.com"),
        Entry("web-bff", "transfer", 0.12, "bank.example.com"),
        Entry("mobile-bff", "balance", 0.36, "m.bank.example.com"),
        Entry("mobile-bff", "transfer", 0.16, "m.bank.example.com"),
        Entry("statement-batch", "run", 0.06),
    ]
    topo = Topology("bank", tuple(namespaces), {x.name: _with_image(x, reg) for x in s}, tuple(entries),
                    "retail bank: web/mobile BFFs, accounts+ledger, transfers with risk scoring")
    return _maybe_add_linkerd(topo, linkerd)


def streaming(linkerd: bool = False) -> Topology:
    """A video-streaming service: browse (catalog, metadata, artwork, recs) and play (sessions,
    playback -> license -> entitlements, cdn-router)."""
    reg = "registry.example.com/media/"
    s = [
        _svc("web", "edge", 3000, [
            _op("browse", "GET", "/browse?row={n}", 7, 24000,
                [C("profile", "get"), C("catalog", "rows"), C("artwork", "batch"),
                 C("recs", "for_user", 0.9, False, 700)]),
            _op("title", "GET", "/title/{tid}", 5, 9000, [C("metadata", "get"), C("artwork", "batch")]),
            _op("search", "GET", "/search?q={q}", 4, 6000, [C("search", "query")]),
        ], replicas=3, client_ua=_NODE_UA),
        _svc("api", "edge", 8080, [
            _op("play", "POST", "/v3/play/{tid}", 4, 1800,
                [C("sessions", "create"), C("playback", "start", timeout_ms=6000)], req_bytes=240),
            _op("heartbeat", "POST", "/v3/heartbeat", 1, 40, [C("sessions", "touch")], req_bytes=120),
        ], replicas=3, client_ua=_OKHTTP),
        _svc("catalog", "content", 8080, [
            _op("rows", "GET", "/v1/rows?profile={uid}", 9, 14000, [C("metadata", "get")]),
        ], replicas=3, client_ua=_GO_UA),
        _svc("metadata", "content", 8080, [
            _op("get", "GET", "/v1/titles/{tid}", 3, 3200, not_found_rate=0.004),
        ], replicas=3, client_ua=_GO_UA),
        _svc("artwork", "content", 8080, [
            _op("batch", "POST", "/v1/artwork:batch", 6, 5200, req_bytes=700),
        ], replicas=2, client_ua=_GO_UA),
        _svc("search", "content", 8080, [
            _op("query", "GET", "/v1/search?q={q}", 16, 5000, [C("metadata", "get")]),
        ], replicas=2, client_ua=_JAVA_UA),
        _svc("sessions", "playback", 8080, [
            _op("create", "POST", "/v1/sessions", 3, 230, req_bytes=200),
            _op("touch", "PUT", "/v1/sessions/{sid}", 1, 0, req_bytes=90),
        ], replicas=2, client_ua=_GO_UA),
        _svc("playback", "playback", 8080, [
            _op("start", "POST", "/v1/playback/{tid}/start", 6, 1500,
                [C("license", "issue", timeout_ms=3000), C("cdn-router", "route"),
                 C("history", "append", 1.0, False, 500)], req_bytes=260),
        ], replicas=3, client_ua=_GO_UA, dep_error_status=503),
        _svc("license", "playback", 8443, [
            _op("issue", "POST", "/v1/licenses", 14, 2100, [C("profile", "entitlements")], req_bytes=1900),
        ], target_port=8080, replicas=2, client_ua=_JAVA_UA),
        _svc("cdn-router", "playback", 8080, [
            _op("route", "GET", "/v1/route?tid={tid}&region={r}", 2, 310),
        ], replicas=2, client_ua=_GO_UA),
        _svc("profile", "user", 8080, [
            _op("get", "GET", "/v1/profiles/{uid}", 2, 640),
            _op("entitlements", "GET", "/v1/profiles/{uid}/entitlements", 4, 380),
        ], replicas=3, client_ua=_JAVA_UA),
        _svc("history", "user", 8080, [
            _op("append", "POST", "/v1/history", 3, 0, req_bytes=140),
            _op("list", "GET", "/v1/history/{uid}", 5, 2200),
        ], replicas=2, client_ua=_PY_UA),
        _svc("recs", "user", 8080, [
            _op("for_user", "GET", "/v1/recs/{uid}", 20, 3600, [C("history", "list")]),
        ], replicas=2, client_ua=_PY_UA),
    ]
    namespaces = [Namespace("edge"), Namespace("content"), Namespace("playback"), Namespace("user")]
    entries = [
        Entry("web", "browse", 0.30, "watch.example.com"),
        Entry("web", "title", 0.16, "watch.example.com"),
        Entry("web", "search", 0.08, "watch.example.com"),
        Entry("api", "play", 0.22, "api.watch.example.com"),
        Entry("api", "heartbeat", 0.24, "api.watch.example.com"),
    ]
    topo = Topology("streaming", tuple(namespaces), {x.name: _with_image(x, reg) for x in s},
                    tuple(entries), "video streaming: browse + play paths, DRM license chain")
    return _maybe_add_linkerd(topo, linkerd)


_RANDOM_NAMES = [
    "accounts", "billing", "ledger", "catalog", "pricing", "search", "inventory", "orders", "quotes",
    "profile", "sessions", "geo", "tax", "fx", "media", "thumbnails", "audit-trail", "risk", "scoring",
    "routing", "dispatch", "tracking", "invoices", "coupons", "loyalty", "reports", "exporter", "mailer",
    "webhooks", "rules",
]
_RANDOM_NS = ["core", "commerce", "platform", "data", "ops", "growth"]


def random_topology(seed: int, n_services: int | None = None) -> Topology:
    """A layered random DAG of 10-18 services in 2-4 namespaces, at least 4 layers deep.

    Every service has 1-2 operations; every non-leaf operation calls 1-3 services in deeper layers,
    about three quarters of them critical. One or two gateway-facing entry services plus one worker.
    """
    rng = random.Random(f"topology:{seed}")
    n = n_services or rng.randint(10, 18)
    names = rng.sample(_RANDOM_NAMES, n)
    namespaces = rng.sample(_RANDOM_NS, rng.randint(2, 4))
    n_layers = rng.randint(4, 5)
    entries_n = 2 if n >= 13 else 1
    # layer 0 = entries; remaining services spread over deeper layers (worker is layer 0 too)
    layers: list[list[str]] = [[] for _ in range(n_layers)]
    entry_names = [f"{names[i]}-bff" if i == 0 else f"{names[i]}-api" for i in range(entries_n)]
    layers[0] = entry_names
    worker_name = f"{names[entries_n]}-worker"
    rest = names[entries_n + 1:]
    for i, name in enumerate(rest):
        layers[1 + (i % (n_layers - 1)) if i < n_layers - 1 else rng.randint(1, n_layers - 1)].append(name)
    all_names = entry_names + [worker_name] + rest
    ns_of = {name: namespaces[0] if name in entry_names else rng.choice(namespaces) for name in all_names}
    ns_of[worker_name] = namespaces[-1]
    layer_of = {name: li for li, layer in enumerate(layers) for name in layer}
    ops_count = {name: (1 if rng.random() < 0.6 else 2) for name in all_names}

    def deeper(li: int) -> list[str]:
        return [x for layer in layers[li + 1:] for x in layer]

    uas = [_GO_UA, _JAVA_UA, _PY_UA, _NODE_UA]
    resources = ["items", "records", "entries", "jobs", "objects", "events"]
    services: list[Service] = []
    called: set[str] = set()
    op_names: dict[str, list[str]] = {name: [f"op{k}" for k in range(ops_count[name])] for name in all_names}
    for name in all_names:
        li = layer_of.get(name, 0)
        candidates = deeper(li)
        ops = []
        for k, opn in enumerate(op_names[name]):
            calls: list[Call] = []
            if candidates:
                # prefer the next layer so chains get deep
                nxt = [x for x in candidates if layer_of[x] == li + 1] or candidates
                k_calls = min(len(candidates), rng.choice([1, 1, 2, 2, 3]))
                chosen = [rng.choice(nxt)] + rng.sample(candidates, k_calls - 1)
                for tgt in dict.fromkeys(chosen):
                    called.add(tgt)
                    calls.append(Call(tgt, rng.choice(op_names[tgt]), prob=rng.choice([1.0, 1.0, 0.7, 0.5]),
                                      critical=rng.random() < 0.75,
                                      timeout_ms=rng.choice([1000, 2000, 3000, 5000])))
            res = rng.choice(resources)
            method = "GET" if k == 0 or rng.random() < 0.6 else "POST"
            path = f"/v1/{res}/{{pid}}" if method == "GET" else f"/v1/{res}"
            ops.append(Op(opn, method, path, self_ms=round(rng.uniform(1.5, 20), 1),
                          resp_bytes=rng.randint(60, 9000), req_bytes=0 if method == "GET" else
                          rng.randint(80, 900), calls=tuple(calls)))
        services.append(Service(name, ns_of[name], rng.choice([8080, 8080, 9080, 3000]), tuple(ops),
                                replicas=rng.randint(1, 3), client_ua=rng.choice(uas),
                                worker=name == worker_name,
                                dep_error_status=rng.choice([500, 500, 502, 503])))
    # make sure every non-entry service is called by someone: attach orphans under a shallower service
    by_name = {s.name: s for s in services}
    for name in rest:
        if name in called:
            continue
        li = layer_of[name]
        parent = rng.choice([x for layer in layers[:li] for x in layer])
        ps = by_name[parent]
        op0 = ps.ops[0]
        op0 = Op(op0.name, op0.method, op0.path, op0.self_ms, op0.resp_bytes, op0.req_bytes,
                 op0.calls + (Call(name, op_names[name][0], 1.0, rng.random() < 0.75),))
        by_name[parent] = Service(ps.name, ps.namespace, ps.port, (op0,) + ps.ops[1:], replicas=ps.replicas,
                                  client_ua=ps.client_ua, worker=ps.worker,
                                  dep_error_status=ps.dep_error_status)
    reg = "registry.example.com/gen/"
    svc_map = {n: _with_image(s, reg) for n, s in by_name.items()}
    entries: list[Entry] = []
    host = f"app{seed}.example.com"
    for en in entry_names:
        for opn in op_names[en]:
            entries.append(Entry(en, opn, round(0.9 / (len(entry_names) * len(op_names[en])), 4), host))
    entries.append(Entry(worker_name, op_names[worker_name][0], 0.1))
    topo = Topology(f"random-{seed}", tuple(Namespace(x) for x in namespaces), svc_map, tuple(entries),
                    f"random layered DAG from seed {seed}")
    topo.validate()
    return _thin(topo)


def _thin(topo: Topology, max_hops: float = 11.0) -> Topology:
    """Lower optional-call probabilities until a root request makes at most ``max_hops`` calls on average,
    so random graphs cost about as much to simulate as the hand-written ones."""
    from dataclasses import replace

    def mean_hops() -> float:
        total = sum(e.weight for e in topo.entries)
        return sum(e.weight / total * (1 + sum(topo.op_reach(e.service, e.op, False).values()))
                   for e in topo.entries)

    for _ in range(30):
        if mean_hops() <= max_hops:
            break
        for name, svc in list(topo.services.items()):
            ops = []
            for op in svc.ops:
                calls = tuple(replace(c, prob=round(max(0.15, c.prob * 0.8), 3)) if i > 0 else c
                              for i, c in enumerate(op.calls))
                ops.append(replace(op, calls=calls))
            topo.services[name] = replace(svc, ops=tuple(ops))
        topo._edges = None
    return topo


def _maybe_add_linkerd(topo: Topology, linkerd: bool) -> Topology:
    if not linkerd:
        return topo
    books = shop(linkerd=True)
    for name in ("webapp", "authors", "books", "traffic"):
        topo.services[name] = books.services[name]
    topo.namespaces = topo.namespaces + (Namespace("booksapp", mesh="linkerd"),)
    topo.entries = topo.entries + tuple(e for e in books.entries if e.service == "traffic")
    topo.description += ", booksapp (Linkerd)"
    return topo


def _with_image(s: Service, registry: str) -> Service:
    from dataclasses import replace

    if s.name in ("webapp", "authors", "books", "traffic"):
        return replace(s, image_repo="buoyantio/booksapp", version="v0.0.5")
    h = sum(ord(c) for c in s.name)
    return replace(s, image_repo=f"{registry}{s.name}", version=f"{1 + h % 3}.{h % 17}.{h % 5}")


NAMED_TOPOLOGIES = ("shop", "bank", "streaming")


def get_topology(name: str, *, linkerd: bool = False, seed: int = 0) -> Topology:
    """Look a topology up by name (``shop``, ``bank``, ``streaming``, ``random`` or ``random-<seed>``)."""
    if name == "shop":
        topo = shop(linkerd)
    elif name == "bank":
        topo = bank(linkerd)
    elif name == "streaming":
        topo = streaming(linkerd)
    elif name == "random" or name.startswith("random-"):
        rseed = int(name.split("-", 1)[1]) if "-" in name else seed
        topo = _maybe_add_linkerd(random_topology(rseed), linkerd)
    else:
        raise ConfigError(f"unknown topology {name!r}: use one of {', '.join(NAMED_TOPOLOGIES)}, "
                          f"'random' or 'random-<seed>'")
    topo.validate()
    return topo
