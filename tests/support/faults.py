"""A fault-injecting HTTP reverse proxy for source tests (Loki, Elasticsearch, anything over HTTP).

The test servers (tests/servers/) inject status storms, dropped connections and latency themselves;
this proxy adds what sits *between* meshlens and a backend in real deployments and that a server
cannot fake from inside: a gateway cutting a 200 response short with a consistent ``Content-Length``
(truncated JSON), an SSO/login page answered as ``200 text/html``, a TCP reset in the middle of a body,
a response slower than the client's timeout, and storms of 429/5xx. It forwards everything else
unchanged, so the backend's own behaviour (pagination, PIT, tenants) is what the client sees.

Usage::

    with FaultProxy(server.url) as proxy:
        proxy.inject("truncate_json", times=3, path="/loki/api/v1/query_range")
        ingest_loki(db, url=proxy.url, ...)
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("truncate_json", "html", "reset", "slow", "status")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade",
        "content-encoding"}


@dataclass
class ProxyFault:
    """One scripted fault: fires on the next ``times`` requests whose path starts with ``path``, after
    letting ``after`` matching requests through."""

    kind: str
    times: int = 1
    path: str = "/"
    after: int = 0
    delay_s: float = 0.0
    status: int = 503
    retry_after: str | None = None


class FaultProxy:
    """Threaded reverse proxy on 127.0.0.1; ``url`` replaces the backend URL in the client config."""

    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self.faults: list[ProxyFault] = []
        self.fired: list[tuple[str, str]] = []  # (kind, path)
        self.requests = 0
        self.before_forward: Callable[[str, str, int], None] | None = None  # (method, path, n) hook
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        handler = type("ProxyHandler", (_Handler,), {"proxy": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- faults ----------------------------------------------------------------------------------
    def inject(self, kind: str, **kw: object) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        with self._lock:
            self.faults.append(ProxyFault(kind, **kw))  # type: ignore[arg-type]

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take(self, path: str) -> tuple[ProxyFault | None, int]:
        with self._lock:
            self.requests += 1
            n = self.requests
            for f in self.faults:
                if path.startswith(f.path):
                    if f.after > 0:
                        f.after -= 1
                        return None, n
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    self.fired.append((f.kind, path))
                    return f, n
        return None, n


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _forward(self, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
            headers["Accept-Encoding"] = "identity"
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], resp.read()
        finally:
            conn.close()

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, *, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        path = urllib.parse.urlsplit(self.path).path
        fault, count = self.proxy._take(path)
        if self.proxy.before_forward is not None:
            self.proxy.before_forward(self.command, path, count)
        if fault is None:
            self._send(*self._forward(body))
            return
        if fault.kind == "status":
            hdrs = [("Content-Type", "text/plain")] + ([("Retry-After", fault.retry_after)] if fault.retry_after else [])
            self._send(fault.status, hdrs, b"upstream overloaded\n")
        elif fault.kind == "html":
            self._send(200, [("Content-Type", "text/html; charset=utf-8")],
                       b"<!doctype html><html><head><title>Sign in</title></head><body>SSO login</body></html>")
        elif fault.kind == "slow":
            time.sleep(fault.delay_s)
            self._send(*self._forward(body))
        elif fault.kind == "truncate_json":
            status, hdrs, data = self._forward(body)
            cut = data[: max(1, len(data) // 2)]
            self._send(status, hdrs, cut)  # consistent Content-Length: only the JSON is broken
        elif fault.kind == "reset":
            status, hdrs, data = self._forward(body)
            self.send_response(status)
            for k, v in hdrs:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            # SO_LINGER 0: close() sends a TCP RST instead of a FIN -- "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle
