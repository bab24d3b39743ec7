"""One point in time over several indices: every document exactly once, also across a resume.

Daily indices (``logs-istio-2024.06.01``, ``...02``) read through one pattern are the normal case. Ids
are unique per index only, and OpenSearch numbers ``_shard_doc`` by the shard's number inside its own
index, so two indices with equal timestamps, equal shard numbers and equal ids give documents whose
``[time, tiebreaker]`` sort values are identical; ``search_after`` skips everything equal to the cursor.
These tests build exactly that and end pages between the twins. The guard tests show that the
in-process server really loses documents with the old sort, so the main tests can fail.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.ingest import ingest_batches
from meshlens.sources.elasticsearch import EsQuery, EsSource, SliceCursor, Window, ingest_es, plan_run
from meshlens.sources.http import HttpConfig
from meshlens.store import open_store
from tests.servers.elasticsearch import EsTestServer, fluentbit_doc
from tests.support.es_paging import raw_pit_paging
from tests.support.interrupt import Killed, killed_after

START_MS = 1_717_200_000_000
WINDOW = Window(START_MS, START_MS + 86_400_000)
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"
INDICES = ("logs-twin-a", "logs-twin-b")


def twins(srv: EsTestServer, n: int, *, shards: int = 1, distinct_ts: int = 1) -> set[str]:
    """``n`` documents in each of two indices: same ids, same timestamps, same shard count."""
    for name in INDICES:
        srv.create_index(name, mappings={"@timestamp": {"type": "date"}}, shards=shards)
        srv.add_docs(name, [(f"d{i}", fluentbit_doc(i, START_MS + i % distinct_ts, random.Random(i)))
                            for i in range(n)])
    return {f"{name}/d{i}" for name in INDICES for i in range(n)}


def source(srv: EsTestServer, **kw: Any) -> EsSource:
    cfg = HttpConfig(url=srv.url, max_retries=2, backoff_base_s=0)
    return EsSource(cfg, EsQuery("logs-twin-*"), sleep=lambda s: None, **kw)


def read_positions(src: EsSource) -> list[str]:
    out: list[str] = []
    for b in src.batches(WINDOW, [SliceCursor() for _ in range(src.parallel)]):
        out += b.positions
    return out


TS = {"@timestamp": {"order": "asc", "unmapped_type": "date"}}


@pytest.mark.parametrize("flavor, tiebreaker, dialect", [("os3", "_shard_doc", "os"), ("os2", "_id", "os")])
def test_guard_the_old_sort_loses_documents_across_indices(flavor: str, tiebreaker: str, dialect: str) -> None:
    with EsTestServer(flavor) as srv:
        want = twins(srv, 10)
        got = raw_pit_paging(srv.url, [TS, {tiebreaker: "asc"}], 3, dialect=dialect)
        assert len(got) < len(want), "the server must skip the twin of a page's last document"
        fixed = raw_pit_paging(srv.url, [TS, {"_index": "asc"}, {tiebreaker: "asc"}], 3, dialect=dialect)
        assert sorted(fixed) == sorted(want)


def test_elasticsearch_shard_doc_is_already_unique_across_indices() -> None:
    with EsTestServer("es8") as srv:
        want = twins(srv, 10)
        assert sorted(raw_pit_paging(srv.url, [TS, {"_shard_doc": "asc"}], 3, dialect="es")) == sorted(want)


@pytest.mark.parametrize("flavor, sort", [
    ("es8", ["_shard_doc"]),  # Elasticsearch numbers shards across the PIT: no _index needed
    ("es9", ["_shard_doc"]),
    ("os2", ["_index", "_id"]),
    ("os3", ["_index", "_shard_doc"]),
])
@pytest.mark.parametrize("shards, distinct_ts", [(1, 1), (2, 1), (1, 4)])
def test_twin_indices_every_document_exactly_once(flavor: str, sort: list[str], shards: int,
                                                  distinct_ts: int) -> None:
    with EsTestServer(flavor) as srv:
        want = twins(srv, 24, shards=shards, distinct_ts=distinct_ts)
        for page in (1, 3, 5, 7):  # odd pages end between twins
            srv.requests.clear()
            src = source(srv, page_size=page)
            got = read_positions(src)
            assert len(got) == len(want) and set(got) == want, (page, len(got))
            pit_pages = [r.body for r in srv.requests if r.path == "/_search"]
            assert pit_pages and all([next(iter(k)) for k in b["sort"][1:]] == sort for b in pit_pages)


@pytest.mark.parametrize("flavor", ["os2", "os3", "es8"])
def test_twin_indices_parallel_slices(flavor: str) -> None:
    with EsTestServer(flavor) as srv:
        want = twins(srv, 40, shards=2, distinct_ts=3)
        got = read_positions(source(srv, page_size=3, parallel=3))
        assert len(got) == len(want) and set(got) == want


@pytest.mark.parametrize("flavor", ["os2", "os3", "es8"])
def test_resume_from_a_watermark_between_twins(flavor: str, tmp_path: Path) -> None:
    """A run killed right after a page that ends between two twins resumes with neither lost nor repeated."""
    with EsTestServer(flavor) as srv:
        want = twins(srv, 12)  # one timestamp: the whole range is one boundary
        db = tmp_path / "t.duckdb"
        src = source(srv, page_size=3)
        window, cursors, base = plan_run(None, WINDOW, resume=False, slices=1)


        with open_store(db) as store, pytest.raises(Killed):
            ingest_batches(store, killed_after(src.batches(window, cursors, base), 3), source=src.identity, watermark_key=src.identity, progress=False)
        with open_store(db) as store:
            first = list(store.query("SELECT position FROM events")["position"])
            state = store.get_watermark(src.identity)
        assert len(first) == 9 and state["run"]["cursors"][0]["seen"], "stopped mid-boundary, twins half read"
        counts = ingest_es(db, index="logs-twin-*", url=srv.url, start=FROM, end=TO, page_size=3, resume=True,
                           progress=False)
        with open_store(db) as store:
            positions = list(store.query("SELECT position FROM events")["position"])
        assert sorted(positions) == sorted(want)
        assert (counts.read, counts.duplicates) == (len(want) - 9, 0)


# -- property: any mix of indices, ids, timestamps and page sizes ------------------------------------
_SERVERS: dict[str, EsTestServer] = {}


@pytest.fixture(scope="module", autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    for srv in _SERVERS.values():
        srv.stop()
    _SERVERS.clear()


def _server(flavor: str) -> EsTestServer:
    if flavor not in _SERVERS:
        srv = EsTestServer(flavor).start()
        srv.log_requests = False
        _SERVERS[flavor] = srv
    return _SERVERS[flavor]


_seq = iter(range(10**9))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(0, 2)), min_size=4, max_size=60),
       shards=st.integers(1, 3), page=st.integers(1, 9), parallel=st.integers(1, 3),
       flavor=st.sampled_from(["os2", "os3", "es8"]), expire=st.sampled_from([None, 3]))
def test_property_every_document_once_over_several_indices(docs: list[tuple[int, int, int]], shards: int,
                                                           page: int, parallel: int, flavor: str,
                                                           expire: int | None) -> None:
    """(index, id, ms) drawn from small pools: ids and timestamps repeat across indices all the time."""
    srv = _server(flavor)
    stem = f"prop{next(_seq)}"
    want: set[str] = set()
    for k in range(3):
        srv.create_index(f"{stem}-{k}", mappings={"@timestamp": {"type": "date"}}, shards=shards)
    for k, doc_id, ms in docs:
        srv.add_docs(f"{stem}-{k}", [(f"d{doc_id}", fluentbit_doc(doc_id, START_MS + ms, random.Random(doc_id)))])
        want.add(f"{stem}-{k}/d{doc_id}")
    srv.faults.expire_after_pages = expire
    srv.engine.context_pages = 0
    try:
        cfg = HttpConfig(url=srv.url, max_retries=2, backoff_base_s=0)
        src = EsSource(cfg, EsQuery(f"{stem}-*"), sleep=lambda s: None, page_size=page, parallel=parallel)
        got = read_positions(src)
    finally:
        srv.faults.expire_after_pages = None
    assert sorted(got) == sorted(want)
