"""Elasticsearch/OpenSearch source: what a user gets wrong, named in one line within seconds, no retries.

The same standard as the Loki source: an address that cannot work (nothing listening, https on a plain
HTTP port and the reverse, a port where something else answers), refused credentials and an index
pattern that matches nothing each end the run at once with one actionable line -- the injected ``sleep``
records every backoff, so "no retry storm" is asserted, not timed; an empty range is a warning that
names the pattern, the range and the indices that do exist.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from meshlens.errors import AuthError, QueryError, SourceError
from meshlens.sources.elasticsearch import EsQuery, EsSource, Window, ingest_es
from meshlens.sources.http import HttpConfig
from tests.servers.elasticsearch import Auth, EsTestServer, generate

START_MS = 1_717_200_000_000
WINDOW = Window(START_MS, START_MS + 86_400_000)
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"


def loaded(flavor: str = "es8", **kw: Any) -> EsTestServer:
    srv = EsTestServer(flavor, **kw)
    srv.create_index("logs-istio-1", mappings={"@timestamp": {"type": "date"}})
    srv.add_docs("logs-istio-1", generate(30))
    return srv


def run(url: str, index: str = "logs-*", **cfg: Any) -> tuple[Exception, list[float]]:
    """One validate+read against ``url`` with 8 retries allowed; returns the error and the backoffs slept."""
    sleeps: list[float] = []
    src = EsSource(HttpConfig(url=url, max_retries=8, **cfg), EsQuery(index), sleep=sleeps.append)
    with pytest.raises(Exception) as ei:  # noqa: PT011 - the type is asserted by each test
        src.make_plan()
        src.validate(WINDOW)
    src.close()
    return ei.value, sleeps


def test_nothing_listening_is_one_line_and_not_retried() -> None:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    err, sleeps = run(f"http://127.0.0.1:{port}")
    assert isinstance(err, SourceError) and "\n" not in str(err)
    assert "connection refused" in str(err) and f"127.0.0.1:{port}" in str(err)
    assert sleeps == [] and not err.resumable


def test_https_on_a_plain_http_port_says_use_http() -> None:
    with loaded() as srv:
        err, sleeps = run(srv.url.replace("http://", "https://"))
        assert isinstance(err, SourceError) and "use http://" in str(err) and sleeps == []


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "k.pem"),
                    "-out", str(d / "c.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    return ctx


def test_http_on_an_https_port_says_use_https(tls_context: ssl.SSLContext) -> None:
    with loaded(ssl_context=tls_context) as srv:
        assert srv.url.startswith("https://")
        err, sleeps = run(srv.url.replace("https://", "http://"))
        assert isinstance(err, SourceError) and "use https://" in str(err) and sleeps == []


class _Other(BaseHTTPRequestHandler):
    """Something that is not the search API: Kibana-like HTML, or Loki's plain-text 404."""

    answers: dict[str, tuple[int, str, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802
        status, ctype, body = self.answers[self.server.server_address[1]]  # type: ignore[index]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *a: Any) -> None:
        return


@pytest.fixture
def other() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(status: int, ctype: str, body: bytes) -> str:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
        _Other.answers[httpd.server_address[1]] = (status, ctype, body)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for h in servers:
        h.shutdown()
        h.server_close()


@pytest.mark.parametrize("status, ctype, body", [
    (200, "text/html; charset=utf-8", b"<!DOCTYPE html><html><head><title>Elastic</title></head></html>"),  # Kibana
    (404, "text/plain; charset=utf-8", b"404 page not found\n"),  # Loki / Grafana's Go muxes
    (200, "application/json", b'{"status":"ok"}'),  # some other JSON API
])
def test_a_port_where_something_else_answers_is_named(other: Any, status: int, ctype: str, body: bytes) -> None:
    url = other(status, ctype, body)
    err, sleeps = run(url)
    assert isinstance(err, SourceError) and "is not Elasticsearch/OpenSearch" in str(err)
    assert f"HTTP {status}" in str(err) and "9200" in str(err) and "\n" not in str(err) and sleeps == []


@pytest.mark.parametrize("flavor", ["es8", "os2"])
def test_refused_credentials_are_one_line_without_retries(flavor: str) -> None:
    with loaded(flavor, auth=Auth(users={"reader": "right"})) as srv:
        err, sleeps = run(srv.url, username="reader", password="wrong")
        assert isinstance(err, AuthError) and err.status == 401 and sleeps == []
        assert "wrong" not in str(err) and "\n" not in str(err)


def test_forbidden_index_is_one_line_without_retries() -> None:
    with loaded() as srv:
        srv.faults.forbidden_paths = ("/logs-",)
        err, sleeps = run(srv.url)
        assert isinstance(err, AuthError) and err.status == 403 and "permissions" in str(err) and sleeps == []


@pytest.mark.parametrize("flavor", ["es8", "os3", "es7.10"])
def test_pattern_matching_no_index_names_what_exists(flavor: str) -> None:
    with loaded(flavor) as srv:
        err, sleeps = run(srv.url, index="logz-*")
        assert isinstance(err, QueryError) and sleeps == []
        assert "'logz-*' matches no index" in str(err) and "logs-istio-1" in str(err)


def test_pattern_matching_nothing_on_the_cli_is_one_line(tmp_path: Path) -> None:
    from meshlens.cli.es import register

    app, ingest, aggregate = typer.Typer(), typer.Typer(), typer.Typer()
    app.add_typer(ingest, name="ingest")
    app.add_typer(aggregate, name="aggregate")
    register(ingest, aggregate)
    with loaded() as srv:
        res = CliRunner().invoke(app, ["ingest", "es", "--url", srv.url, "--index", "logz-*", "--from", FROM,
                                       "--to", TO, "--db", str(tmp_path / "x.duckdb")])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "matches no index" in res.stderr


@pytest.mark.parametrize("flavor", ["es8", "os2"])
def test_empty_range_warns_with_pattern_range_and_indices(flavor: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with loaded(flavor) as srv, caplog.at_level(logging.WARNING, logger="meshlens.es"):
        counts = ingest_es(tmp_path / "e.duckdb", index="logs-*", url=srv.url, start="2024-07-01T00:00:00Z",
                           end="2024-07-02T00:00:00Z", progress=False)
    assert counts.read == 0
    (msg,) = [r.getMessage() for r in caplog.records if "no documents" in r.getMessage()]
    assert "'logs-*'" in msg and "2024-07-01T00:00:00.000Z" in msg and "2024-07-02T00:00:00.000Z" in msg
    assert "logs-istio-1 (30 docs)" in msg


def test_documents_read_but_none_stored_warn_why_on_the_cli(tmp_path: Path) -> None:
    """Every document rejected, or every one dropped by a filter rule: one warning line naming the index
    source, the count and the reason (a silent "events stored: 0" would let an SRE analyse nothing)."""
    from meshlens.cli.es import register

    app, ingest, aggregate = typer.Typer(), typer.Typer(), typer.Typer()
    app.add_typer(ingest, name="ingest")
    app.add_typer(aggregate, name="aggregate")
    register(ingest, aggregate)
    rules = tmp_path / "rules.yaml"
    rules.write_text("default_filters: false\nrules:\n  - name: drop-all-requests\n    event_type: [request]\n"
                     "    keep_failures: false\n")
    with loaded() as srv:
        srv.create_index("junk-1", mappings={"@timestamp": {"type": "date"}})
        srv.add_docs("junk-1", [(f"j{i}", {"@timestamp": "2024-06-01T01:00:00.000Z", "log": f"hello there {i}\n",
                                           "kubernetes": {"container_name": "app"}}) for i in range(4)])
        base = ["ingest", "es", "--url", srv.url, "--from", FROM, "--to", TO, "--no-progress"]
        res = CliRunner().invoke(app, [*base, "--index", "junk-*", "--db", str(tmp_path / "j.duckdb")])
        assert res.exit_code == 0, res.output
        (warn,) = [ln for ln in res.stderr.splitlines() if "0 events were stored" in ln]
        assert "junk-*" in warn and "4 documents read but 0 events were stored: all rejected (top reason, 4 of them" in warn
        assert "records read:       4" in res.stdout

        res = CliRunner().invoke(app, [*base, "--index", "logs-*", "--db", str(tmp_path / "f.duckdb"),
                                       "--filter-config", str(rules)])
        assert res.exit_code == 0, res.output
        (warn,) = [ln for ln in res.stderr.splitlines() if "0 events were stored" in ln]
        assert "30 documents read but 0 events were stored: all filtered by rule 'drop-all-requests' (30)" in warn

        res = CliRunner().invoke(app, [*base, "--index", "logs-*", "--db", str(tmp_path / "ok.duckdb")])
        assert res.exit_code == 0 and "0 events were stored" not in res.output, res.output
