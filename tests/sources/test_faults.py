"""Sources under network faults: every run finishes with the exact record set, or fails loudly with a
resumable watermark from which a re-run completes exactly -- never a silent gap.

Faults come from tests/support/faults.py (a reverse proxy: truncated JSON with a consistent Content-Length,
an HTML login page answered 200, a TCP reset mid-body, responses slower than the client timeout,
429/5xx storms) and from the test servers' own knobs (ties shuffled between requests, data that changes
between pages).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from meshlens.errors import SourceError
from meshlens.sources.elasticsearch import ingest_es
from meshlens.sources.loki import ingest_loki
from meshlens.store import open_store
from tests.servers.elasticsearch import EsTestServer, generate
from tests.servers.loki import NS, LokiServer, istio_line
from tests.servers.loki import generate as loki_generate
from tests.support.faults import FaultProxy
from tests.support.loki_events import T0, Q, server_as_events, stored_events

END = T0 + 600 * NS
QR = "/loki/api/v1/query_range"
FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("truncate_json", {"times": 3}),
    ("html", {"times": 3}),
    ("reset", {"times": 3}),
    ("slow", {"times": 2, "delay_s": 1.5}),
    ("status", {"times": 6, "status": 429, "retry_after": "0"}),
    ("status", {"times": 6, "status": 503}),
]


def _loki_kw(url: str, **kw: Any) -> dict[str, Any]:
    return {"url": url, "query": Q, "start": T0, "end": END, "batch_size": 150, "write_batch": 150,
            "progress": False, "max_retries": 8, "backoff_base_s": 0.001, "backoff_max_s": 0.01,
            "timeout_s": 0.5, **kw}


@pytest.mark.parametrize(("kind", "kw"), FAULTS, ids=[f"{k}-{kw.get('status', '')}" for k, kw in FAULTS])
def test_loki_rides_out_transient_faults_exactly(tmp_path: Path, kind: str, kw: dict[str, Any]) -> None:
    with LokiServer() as srv, FaultProxy(srv.url) as proxy:
        loki_generate(srv, lines=900, streams=3, start_ns=T0, span_ns=600 * NS)
        proxy.inject(kind, path=QR, after=2, **kw)
        db = tmp_path / "s.duckdb"
        counts = ingest_loki(db, **_loki_kw(proxy.url))
        assert proxy.fired, "the fault never fired; the test proved nothing"
        with open_store(db) as store:
            assert stored_events(store) == server_as_events(srv)
        assert counts.stored == 900


@pytest.mark.parametrize("kind", ["truncate_json", "html", "reset", "status"])
def test_loki_persistent_fault_fails_resumably_then_resume_is_exact(tmp_path: Path, kind: str) -> None:
    with LokiServer() as srv, FaultProxy(srv.url) as proxy:
        loki_generate(srv, lines=900, streams=3, start_ns=T0, span_ns=600 * NS)
        proxy.inject(kind, path=QR, after=3, times=10_000, status=503)
        db = tmp_path / "s.duckdb"
        kw = _loki_kw(proxy.url, max_retries=2)
        with pytest.raises(SourceError) as ei:
            ingest_loki(db, **kw)
        assert ei.value.resumable, f"{kind}: failed without a resumable watermark: {ei.value}"
        with open_store(db) as store:
            partial = store.scalar("SELECT count(*) FROM events")
            assert store.get_watermark(next(iter(_watermark_keys(store)))) is not None
        assert 0 < partial < 900, "the first pages were not committed before the failure"
        proxy.clear()
        ingest_loki(db, resume=True, **kw)
        with open_store(db) as store:
            assert stored_events(store) == server_as_events(srv)


def _watermark_keys(store: Any) -> list[str]:
    return [r[0] for r in store.con.execute("SELECT key FROM watermarks").fetchall()]


def test_loki_answer_changing_between_pages(tmp_path: Path) -> None:
    """Ties come back in a different order on every request, and lines arrive in the part of the range
    not yet read while the run pages: the store holds exactly what the server holds at the end."""
    with LokiServer(shuffle_ties=True, seed=3) as srv, FaultProxy(srv.url) as proxy:
        loki_generate(srv, lines=900, streams=3, start_ns=T0, span_ns=600 * NS)
        late = {"pushed": 0}

        def arrive(method: str, path: str, n: int) -> None:
            if path == QR and n in (3, 5):  # between pages: new lines at the end of the range
                labels = {"namespace": "shop", "app": "late", "pod": f"late-{n}", "container": "istio-proxy"}
                rng = random.Random(n)
                late["pushed"] += srv.push(labels, [(END - (k + 1) * NS, istio_line(rng, END - (k + 1) * NS, "late", "shop"))
                                                    for k in range(40)])

        proxy.before_forward = arrive
        db = tmp_path / "s.duckdb"
        ingest_loki(db, **_loki_kw(proxy.url, batch_size=100, write_batch=100))
        assert late["pushed"] == 80
        with open_store(db) as store:
            assert stored_events(store) == server_as_events(srv)
            assert store.scalar("SELECT count(*) FROM events WHERE labels['app'] = 'late'") == 80


# -- Elasticsearch ------------------------------------------------------------------------------------
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"


def _es_loaded(srv: EsTestServer, n: int = 400) -> None:
    srv.create_index("logs-istio-1", mappings={"@timestamp": {"type": "date"}})
    srv.add_docs("logs-istio-1", generate(n, same_ts_every=20, layout="fluentbit", seed=5))


def _es_positions(db: Path) -> set[str]:
    with open_store(db) as store:
        return set(store.query("SELECT position FROM events UNION ALL SELECT position FROM rejects")["position"])


@pytest.mark.parametrize(("kind", "kw"), FAULTS[:3] + FAULTS[4:5], ids=["truncate", "html", "reset", "429"])
def test_es_rides_out_transient_faults_exactly(tmp_path: Path, kind: str, kw: dict[str, Any]) -> None:
    with EsTestServer("es8") as srv, FaultProxy(srv.url) as proxy:
        _es_loaded(srv)
        proxy.inject(kind, path="/", after=3, **kw)
        db = tmp_path / "es.duckdb"
        ingest_es(db, index="logs-*", url=proxy.url, start=FROM, end=TO, page_size=40, progress=False,
                  max_retries=8, backoff_base_s=0, backoff_max_s=0)
        assert proxy.fired
        assert _es_positions(db) == set(srv.all_docs())


def test_es_persistent_html_fails_resumably_then_resume_is_exact(tmp_path: Path) -> None:
    with EsTestServer("es8") as srv, FaultProxy(srv.url) as proxy:
        _es_loaded(srv)
        common: dict[str, Any] = {"index": "logs-*", "url": proxy.url, "start": FROM, "end": TO, "page_size": 40,
                                  "progress": False, "max_retries": 2, "backoff_base_s": 0, "backoff_max_s": 0}
        proxy.inject("html", path="/", after=6, times=10_000)
        db = tmp_path / "es.duckdb"
        with pytest.raises(SourceError) as ei:
            ingest_es(db, **common)
        assert ei.value.resumable, str(ei.value)
        proxy.clear()
        ingest_es(db, resume=True, **common)
        assert _es_positions(db) == set(srv.all_docs())
