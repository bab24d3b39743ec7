"""Connection errors against the REAL Grafana Loki (../shared/tools/loki): one line, no retries.

The in-process twins of these tests live in test_loki_http.py; here the answers are the real server's
(its gRPC port's HTTP/2 preface, its plain-HTTP listener's reply to a TLS ClientHello).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from meshlens.errors import SourceError
from meshlens.sources.http import HttpClient, HttpConfig
from tests.servers import real_loki

READY = "/loki/api/v1/labels"


@pytest.fixture(scope="session")
def loki(request: pytest.FixtureRequest) -> Iterator[real_loki.RealLoki]:
    reason = real_loki.available()
    if reason:
        pytest.skip(reason)
    request.addfinalizer(real_loki.stop_all)
    yield real_loki.get(auth=False)


def _fail(url: str) -> tuple[SourceError, list[float]]:
    sleeps: list[float] = []
    client = HttpClient(HttpConfig(url=url, max_retries=8), "Loki", sleep=sleeps.append)
    with pytest.raises(SourceError) as ei:
        client.request("GET", READY)
    return ei.value, sleeps


def test_real_loki_answers_http(loki: real_loki.RealLoki) -> None:
    client = HttpClient(HttpConfig(url=loki.url), "Loki")
    assert client.request("GET", READY).status_code == 200


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_real_grpc_port_is_named(loki: real_loki.RealLoki, scheme: str) -> None:
    err, sleeps = _fail(f"{scheme}://127.0.0.1:{loki.grpc_port}")
    assert str(err).startswith(f"127.0.0.1:{loki.grpc_port} is not Loki's HTTP API (it answered gRPC/HTTP2)")
    assert sleeps == []


def test_real_https_on_http_port_says_use_http(loki: real_loki.RealLoki) -> None:
    hostport = loki.url.split("://", 1)[1]
    err, sleeps = _fail(f"https://{hostport}")
    assert str(err) == f"{hostport} speaks plain HTTP, not HTTPS: use http://{hostport}"
    assert sleeps == []


def test_refused_next_to_real_loki_is_one_line() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    err, sleeps = _fail(f"http://127.0.0.1:{port}")
    assert str(err) == f"cannot connect to http://127.0.0.1:{port} (connection refused): is Loki running there?"
    assert sleeps == [] and not err.resumable
