"""The ``investigate es`` scan against the third-party ``osmem-server`` (an in-memory OpenSearch).

Our test server encodes our reading of the composite aggregation docs (``after_key`` paging,
``missing_bucket``, ``date_histogram`` keys); osmem-server was written by someone else from theirs. The
same documents scanned in both must store the same request counts, bucket for bucket.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests

from meshlens.analysis.common import Window
from meshlens.investigate_es import scan_es
from meshlens.sources.elasticsearch import EsQuery, EsSource
from meshlens.sources.http import HttpConfig
from meshlens.store import open_store
from tests.servers.elasticsearch import EsTestServer
from tests.support.es_sim import ACCESS_INDEX, simulation_docs

osmem_server = pytest.importorskip("osmem_server")

KEYWORDS = ("upstream_cluster", "response_flags", "response_code_details", "upstream_transport_failure_reason")


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[str, dict]], Window]:
    from meshlens.simulate import simulate
    from meshlens.simulate.windows import incident_windows

    scenario = incident_windows(2, duration_s=4 * 3600.0, entry_rate=0.5)[1]
    out = tmp_path_factory.mktemp("osm") / "sim"
    simulate(scenario, out)
    lo = pd.Timestamp(scenario.start) + pd.Timedelta(minutes=30)
    hi = lo + pd.Timedelta(hours=1)  # an hour with an incident in it (onset 01:40)
    sel = [(i, d) for idx, i, d in simulation_docs(out)
           if idx == ACCESS_INDEX and lo.value <= pd.Timestamp(d["@timestamp"]).value < hi.value]
    return sel, Window(lo.value, hi.value)


@pytest.fixture(scope="module")
def osmem() -> Iterator[str]:
    server = osmem_server.OsmemServer.start(japanese=False, addr="127.0.0.1:0")
    try:
        yield server.url
    finally:
        server.close()


def _stored(db: Path) -> pd.DataFrame:
    with open_store(db, read_only=True) as st:
        return st.query("SELECT metric, ts, map_entries(labels)::VARCHAR AS labels, value FROM series "
                        "WHERE metric = 'investigate_requests' ORDER BY ALL")


def test_scan_stores_the_same_counts_as_osmem(docs: tuple[list[tuple[str, dict]], Window], osmem: str,
                                              tmp_path: Path) -> None:
    sel, window = docs
    props = {"@timestamp": {"type": "date"}, "response_code": {"type": "long"}, "duration": {"type": "long"},
             "kubernetes": {"properties": {"namespace_name": {"type": "keyword"},
                                           "labels": {"properties": {"app": {"type": "keyword"}}}}},
             **{k: {"type": "keyword"} for k in KEYWORDS}}
    assert requests.put(f"{osmem}/inv", json={"mappings": {"properties": props}}, timeout=10).ok
    for i in range(0, len(sel), 5000):
        lines = [x for doc_id, d in sel[i:i + 5000]
                 for x in (json.dumps({"index": {"_index": "inv", "_id": doc_id}}), json.dumps(d))]
        r = requests.post(f"{osmem}/_bulk?refresh=true", data="\n".join(lines) + "\n",
                          headers={"Content-Type": "application/x-ndjson"}, timeout=120)
        assert r.ok and not r.json()["errors"]
    with EsTestServer("os3") as srv:
        srv.create_index("inv", mappings=props)
        srv.add_docs("inv", sel)
        for url, name in ((osmem, "osm"), (srv.url, "ours")):
            src = EsSource(HttpConfig(url=url, max_retries=2, backoff_base_s=0), EsQuery("inv"))
            with open_store(tmp_path / f"{name}.duckdb") as st:
                scan, fields = scan_es(st, src, window, page_size=700)  # several after_key pages
            assert scan.lines_in_range == len(sel)
            assert fields.service == "kubernetes.labels.app"
    a, b = _stored(tmp_path / "osm.duckdb"), _stored(tmp_path / "ours.duckdb")
    assert len(a) > 700 and len(a) == len(b)
    assert (a == b).all().all()
