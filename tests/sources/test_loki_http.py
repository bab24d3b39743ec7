"""The shared HTTP helper (meshlens.sources.http): retries, backoff, auth errors, TLS, secrets."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from email.utils import formatdate
from pathlib import Path

import pytest
import requests

from meshlens.errors import AuthError, ConfigError, SourceError
from meshlens.sources.http import HttpClient, HttpConfig, parse_retry_after
from tests.servers.loki import Fault, LokiServer

READY = "/loki/api/v1/labels"


def _client(url: str, sleeps: list[float] | None = None, **kw: object) -> HttpClient:
    cfg = HttpConfig(url=url, max_retries=kw.pop("max_retries", 3), backoff_base_s=0.01, **kw)  # type: ignore[arg-type]
    return HttpClient(cfg, "Loki", sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


# -- config ------------------------------------------------------------------------------------------
def test_userinfo_moves_out_of_url_and_secrets_never_show() -> None:
    cfg = HttpConfig(url="https://al%40ice:s3cr%3At@loki.example:3100/base/", bearer_token=None,
                     headers={"X-Scope-OrgID": "team-a", "X-Api-Token": "tok-123"})
    assert cfg.url == "https://loki.example:3100/base"
    assert (cfg.username, cfg.password) == ("al@ice", "s3cr:t")
    assert cfg.identity() == "https://loki.example:3100/base"
    red = cfg.redacted()
    text = repr(cfg) + str(red)
    for secret in ("s3cr:t", "s3cr%3At", "tok-123"):
        assert secret not in text
    assert red["password"] == "***" and red["headers"] == {"X-Scope-OrgID": "team-a", "X-Api-Token": "***"}


def test_bearer_token_and_api_key_not_in_repr() -> None:
    assert "abc" not in repr(HttpConfig(url="http://h", bearer_token="abc"))
    assert "xyz" not in repr(HttpConfig(url="http://h", api_key="xyz"))


def test_conflicting_auth_methods_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="more than one authentication method"):
        HttpConfig(url="http://h", username="u", password="p", bearer_token="t")
    with pytest.raises(ConfigError, match="no scheme"):
        HttpConfig(url="loki:3100")


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    cfg = HttpConfig(url="http://h", backoff_base_s=0.5, backoff_max_s=4)
    top = HttpClient(cfg, "X", rng=lambda: 0.999999)
    assert [round(top.backoff_delay(a), 2) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert HttpClient(cfg, "X", rng=lambda: 0.0).backoff_delay(5) == 0.0


# -- behaviour against the Loki test server -----------------------------------------------------------
def test_503_storm_is_retried_honouring_retry_after() -> None:
    with LokiServer() as srv:
        srv.inject(status=503, times=3, retry_after="2")
        sleeps: list[float] = []
        resp = _client(srv.url, sleeps, max_retries=5).request("GET", READY)
        assert resp.status_code == 200
        assert sleeps == [2.0, 2.0, 2.0]
        assert len(srv.query_requests(READY)) == 4


def test_429_without_retry_after_uses_jittered_backoff() -> None:
    with LokiServer() as srv:
        srv.inject(status=429, times=2, body="too many outstanding requests")
        sleeps: list[float] = []
        assert _client(srv.url, sleeps).request("GET", READY).status_code == 200
        assert len(sleeps) == 2 and all(0 <= s <= 0.02 for s in sleeps)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_raises_at_once_with_server_message(status: int) -> None:
    with LokiServer() as srv:
        srv.inject(status=status, body="invalid token for tenant team-a", times=5)
        with pytest.raises(AuthError) as ei:
            _client(srv.url, bearer_token="t0ps3cret").request("GET", READY)
        msg = str(ei.value)
        assert f"HTTP {status}" in msg and "invalid token for tenant team-a" in msg and srv.url in msg
        assert "t0ps3cret" not in msg
        assert ei.value.status == status
        assert len(srv.query_requests(READY)) == 1  # no retries


def test_other_4xx_is_returned_for_the_caller() -> None:
    with LokiServer() as srv:
        srv.inject(status=400, body="query too large to execute on a single querier")
        resp = _client(srv.url).request("GET", READY)
        assert resp.status_code == 400 and "too large" in resp.text
        assert len(srv.query_requests(READY)) == 1


def test_exhausted_retries_raise_resumable_source_error() -> None:
    with LokiServer() as srv:
        srv.inject(status=502, times=100, retry_after="0")
        with pytest.raises(SourceError) as ei:
            _client(srv.url, max_retries=2).request("GET", READY)
        assert ei.value.resumable and ei.value.status == 502
        assert "3 attempt" in str(ei.value) and "--resume" in str(ei.value)
        assert len(srv.query_requests(READY)) == 3


def test_connection_dropped_mid_body_is_retried() -> None:
    with LokiServer() as srv:
        srv.push({"app": "a"}, [(i, "x" * 200) for i in range(1, 200)])
        srv.inject(Fault(drop_mid_body=True, times=2))
        retries: list[str] = []
        cfg = HttpConfig(url=srv.url, max_retries=3, backoff_base_s=0.001)
        client = HttpClient(cfg, "Loki", sleep=lambda s: None, on_retry=lambda a, why, d: retries.append(why))
        resp, doc = client.request_json("GET", "/loki/api/v1/query_range",
                                        params={"query": '{app="a"}', "start": "0", "end": "1000", "limit": "500"})
        assert resp.status_code == 200 and len(doc["data"]["result"][0]["values"]) == 199
        assert len(retries) == 2 and all("ChunkedEncodingError" in r or "JSON" in r for r in retries)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connection_refused_is_one_line_and_never_retried() -> None:
    port = _free_port()
    sleeps: list[float] = []
    with pytest.raises(SourceError) as ei:
        _client(f"http://127.0.0.1:{port}", sleeps, max_retries=2).request("GET", READY)
    assert str(ei.value) == (f"cannot connect to http://127.0.0.1:{port} (connection refused): "
                             "is Loki running there?")
    assert not ei.value.resumable and sleeps == []


class _Http2Port:
    """A port that behaves like a gRPC server: HTTP/2 SETTINGS frame first, then a reset."""

    SETTINGS = bytes.fromhex("00000c0400000000000005000040000003000003e8")

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import struct

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(1)
            try:
                conn.sendall(self.SETTINGS)
                conn.recv(24)  # a client preface is 24 bytes; anything else is a "bogus greeting"
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_grpc_port_is_named_not_retried(scheme: str) -> None:
    srv = _Http2Port()
    try:
        sleeps: list[float] = []
        with pytest.raises(SourceError) as ei:
            _client(f"{scheme}://127.0.0.1:{srv.port}", sleeps).request("GET", READY)
        assert str(ei.value).startswith(f"127.0.0.1:{srv.port} is not Loki's HTTP API (it answered gRPC/HTTP2)")
        assert sleeps == [] and "\n" not in str(ei.value)
    finally:
        srv.close()


def test_https_on_a_plain_http_port_says_use_http() -> None:
    with LokiServer() as srv:
        url = srv.url.replace("http://", "https://")
        sleeps: list[float] = []
        with pytest.raises(SourceError) as ei:
            _client(url, sleeps).request("GET", READY)
        port = srv.url.rsplit(":", 1)[1]
        assert str(ei.value) == f"127.0.0.1:{port} speaks plain HTTP, not HTTPS: use http://127.0.0.1:{port}"
        assert sleeps == [] and "--ca-cert" not in str(ei.value)


def test_transient_reset_after_the_server_answered_is_retried() -> None:
    with LokiServer() as srv:
        client = _client(srv.url, [], max_retries=3)
        assert client.request("GET", READY).status_code == 200
        srv.inject(Fault(drop_mid_body=True, times=1))
        resp, doc = client.request_json("GET", READY)
        assert resp.status_code == 200 and doc is not None


def test_permanent_answers_are_not_retried() -> None:
    with LokiServer() as srv:
        srv.inject(status=500, body="multiple org IDs present", times=5)
        sleeps: list[float] = []
        resp = _client(srv.url, sleeps).request("GET", READY, permanent=lambda st, body: "org IDs" in body)
        assert resp.status_code == 500 and sleeps == [] and len(srv.query_requests(READY)) == 1


def test_credentials_are_sent_basic_bearer_apikey() -> None:
    with LokiServer(basic_auth=("bob", "pw")) as srv:
        assert _client(srv.url, username="bob", password="pw").request("GET", READY).status_code == 200
        with pytest.raises(AuthError):
            _client(srv.url, username="bob", password="nope").request("GET", READY)
    with LokiServer(bearer_token="tkn") as srv:
        assert _client(srv.url, bearer_token="tkn").request("GET", READY).status_code == 200
    with LokiServer() as srv:
        _client(srv.url, api_key="k1", headers={"X-Scope-OrgID": "t1"}).request("GET", READY)
        (req,) = srv.query_requests(READY)
        assert req.headers["Authorization"] == "ApiKey k1" and req.tenant == "t1"
        assert req.headers["User-Agent"].startswith("meshlens")


def test_one_session_per_thread() -> None:
    client = _client("http://127.0.0.1:1")
    sessions: list[requests.Session] = []
    ts = [threading.Thread(target=lambda: sessions.append(client.session)) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len({id(s) for s in sessions}) == 3 and client.session is client.session
    client.close()


# -- TLS -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available")
    d = tmp_path_factory.mktemp("tls")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
        "-days", "2", "-subj", "/CN=meshlens-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "srv.key"), "-out", str(d / "srv.csr"),
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-out", str(d / "srv.pem"), "-days", "2", "-extfile", str(d / "ext.cnf"))
    return {"ca": d / "ca.pem", "cert": d / "srv.pem", "key": d / "srv.key"}


def _tls_server(files: dict[str, Path]) -> LokiServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files["cert"], files["key"])
    return LokiServer(ssl_context=ctx)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_with_ca_bundle_works_and_unknown_ca_fails_at_once(tls_files: dict[str, Path]) -> None:
    with _tls_server(tls_files) as srv:
        assert srv.url.startswith("https://")
        assert _client(srv.url, ca_cert=str(tls_files["ca"])).request("GET", READY).status_code == 200
        sleeps: list[float] = []
        with pytest.raises(SourceError, match="TLS error.*--ca-cert") as ei:
            _client(srv.url, sleeps).request("GET", READY)
        assert not ei.value.resumable and sleeps == []
        assert _client(srv.url, verify=False).request("GET", READY).status_code == 200


def test_http_on_an_https_port_says_use_https(tls_files: dict[str, Path]) -> None:
    with _tls_server(tls_files) as srv:
        url = srv.url.replace("https://", "http://")
        sleeps: list[float] = []
        with pytest.raises(SourceError) as ei:
            _client(url, sleeps).request("GET", READY)
        port = srv.url.rsplit(":", 1)[1]
        assert str(ei.value) == f"127.0.0.1:{port} speaks HTTPS, not plain HTTP: use https://127.0.0.1:{port}"
        assert sleeps == []


def test_slow_response_times_out_and_is_retried() -> None:
    with LokiServer() as srv:
        srv.inject(delay_s=1.0, times=1)
        retries: list[str] = []
        cfg = HttpConfig(url=srv.url, max_retries=2, timeout_s=0.2, backoff_base_s=0.001)
        client = HttpClient(cfg, "Loki", sleep=lambda s: None, on_retry=lambda a, why, d: retries.append(why))
        assert client.request("GET", READY).status_code == 200
        assert len(retries) == 1 and "Timeout" in retries[0]


# -- speed settings that must not change answers -------------------------------------------------------
def test_json_bodies_decode_like_the_standard_library() -> None:
    from meshlens.sources.http import loads_json

    body = b'{"a": [1, 2.5, "x\\u00e9"], "big": 18446744073709551616, "nan": NaN, "n": null}'
    got = loads_json(body)  # orjson refuses the 2**64 integer and NaN: the standard library decodes them
    assert got["a"] == [1, 2.5, "x\u00e9"] and got["big"] == 2**64 and got["n"] is None
    assert got["nan"] != got["nan"]
    assert loads_json('{"streams": []}') == {"streams": []}
    with pytest.raises(ValueError):
        loads_json(b'{"cut": [1, 2')


@pytest.mark.parametrize(("url", "loop"), [
    ("http://127.0.0.1:3100", True), ("http://127.8.0.1", True), ("http://localhost:3100", True),
    ("http://[::1]:3100", True), ("http://loki.monitoring:3100", False), ("https://10.0.0.1", False),
    ("http://loki.localhost.example.com", False)])
def test_loopback_addresses_are_told_apart(url: str, loop: bool) -> None:
    from meshlens.sources.http import is_loopback

    assert is_loopback(url) is loop


def test_loopback_answers_are_asked_uncompressed_others_gzip() -> None:
    """On a port-forward gzip costs CPU on both ends and saves nothing; over a network it saves bytes."""
    with LokiServer() as srv:
        _client(srv.url).request("GET", READY)
        _client(srv.url, compress=True).request("GET", READY)
        _client(srv.url, headers={"Accept-Encoding": "br"}).request("GET", READY)  # the user's header wins
        enc = [r.headers.get("Accept-Encoding") for r in srv.query_requests(READY)]
    assert enc[0] == "identity" and "gzip" in enc[1] and enc[2] == "br"
    remote = HttpClient(HttpConfig(url="http://loki.example:3100"), "Loki")
    assert "gzip" in remote.session.headers["Accept-Encoding"]
