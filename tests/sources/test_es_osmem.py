"""The core paging tests again, against the third-party ``osmem-server`` (an in-memory OpenSearch).

Our own test server encodes our reading of the Elasticsearch/OpenSearch docs; osmem-server was written
by someone else from theirs, so passing both guards against a shared misreading. osmem answers as
OpenSearch 3.x (``version.distribution: opensearch``) -- and also sends ``X-Elastic-Product``, which
is why detection must prefer the distribution field.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import requests

from meshlens.errors import QueryError
from meshlens.sources.elasticsearch import EsQuery, EsSource, SliceCursor, Window, aggregate_es, ingest_es
from meshlens.sources.http import HttpConfig
from meshlens.store import open_store
from tests.servers.elasticsearch import fluentbit_doc
from tests.support.es_paging import raw_pit_paging

osmem_server = pytest.importorskip("osmem_server")

START_MS = 1_717_200_000_000
WINDOW = Window(START_MS, START_MS + 86_400_000)
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"
_names = count()


@pytest.fixture(scope="module")
def osmem() -> Iterator[str]:
    server = osmem_server.OsmemServer.start(japanese=False, addr="127.0.0.1:0")
    try:
        yield server.url
    finally:
        server.close()


def new_index(url: str, n: int, *, same_ts_every: int = 1) -> tuple[str, set[str]]:
    """A fresh index with ``n`` Fluent Bit documents loaded through ``_bulk``; returns its positions."""
    name = f"logs-osm-{next(_names)}"
    mapping = {"mappings": {"properties": {"@timestamp": {"type": "date"},
                                           "kubernetes": {"properties": {
                                               "namespace_name": {"type": "keyword"},
                                               "labels": {"properties": {"app": {"type": "keyword"}}}}},
                                           "duration": {"type": "long"}}}}
    assert requests.put(f"{url}/{name}", json=mapping, timeout=10).ok
    rng = random.Random(n)
    lines, ids = [], set()
    for i in range(n):
        doc = fluentbit_doc(i, START_MS + (i // same_ts_every), rng)
        doc["duration"] = i % 100
        lines += [json.dumps({"index": {"_index": name, "_id": f"d{i}"}}), json.dumps(doc)]
        ids.add(f"{name}/d{i}")
    r = requests.post(f"{url}/_bulk?refresh=true", data="\n".join(lines) + "\n",
                      headers={"Content-Type": "application/x-ndjson"}, timeout=60)
    assert r.ok and not r.json()["errors"]
    return name, ids


def source(url: str, index: str, **kw: Any) -> EsSource:
    cfg = HttpConfig(url=url, max_retries=3, backoff_base_s=0)
    return EsSource(cfg, EsQuery(index, query=kw.pop("query", None)), sleep=lambda s: None, **kw)


def read_positions(src: EsSource) -> list[str]:
    out: list[str] = []
    for b in src.batches(WINDOW, [SliceCursor() for _ in range(src.parallel)]):
        out += b.positions
    return out


def test_osmem_is_detected_as_opensearch_with_shard_doc(osmem: str) -> None:
    index, _ = new_index(osmem, 5)
    src = source(osmem, index)
    src.make_plan()
    assert src.info is not None and src.info.is_opensearch
    assert src.plan is not None and (src.plan.mode, src.plan.dialect, src.plan.tiebreaker) == \
        ("pit", "opensearch", "_shard_doc")


@pytest.mark.parametrize("tiebreaker", [None, "_id"])  # _id: the OpenSearch 2.x path
def test_identical_timestamps_across_pages(osmem: str, tiebreaker: str | None) -> None:
    index, ids = new_index(osmem, 400, same_ts_every=90)
    got = read_positions(source(osmem, index, page_size=35, tiebreaker=tiebreaker))
    assert len(got) == 400 and set(got) == ids


def test_parallel_sliced_pit(osmem: str) -> None:
    index, ids = new_index(osmem, 600, same_ts_every=5)
    got = read_positions(source(osmem, index, page_size=40, parallel=3))
    assert len(got) == 600 and set(got) == ids


@pytest.mark.parametrize("parallel", [1, 2])
def test_scroll_fallback(osmem: str, parallel: int) -> None:
    index, ids = new_index(osmem, 300, same_ts_every=20)
    src = source(osmem, index, page_size=25, parallel=parallel, force_scroll=True)
    got = read_positions(src)
    assert len(got) == 300 and set(got) == ids
    assert src.plan is not None and src.plan.mode == "scroll"


@pytest.mark.parametrize("force_scroll", [False, True])
def test_context_freed_mid_run_is_reopened_without_loss(osmem: str, force_scroll: bool) -> None:
    index, ids = new_index(osmem, 300, same_ts_every=40)
    src = source(osmem, index, page_size=20, force_scroll=force_scroll)
    real = src._checked_search
    calls = count(1)

    def freeing(path: str, body: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        if next(calls) % 4 == 0:  # free every PIT / scroll on the server every 4th page
            requests.delete(f"{osmem}/_search/point_in_time/_all", timeout=10)
            requests.delete(f"{osmem}/_search/scroll/_all", timeout=10)
        return real(path, body, params)

    src._checked_search = freeing  # type: ignore[method-assign]
    got = read_positions(src)
    assert len(got) == 300 and set(got) == ids
    assert src.pit_reopens + src.scroll_restarts >= 3


def test_query_errors_and_missing_index(osmem: str) -> None:
    index, _ = new_index(osmem, 5)
    with pytest.raises(QueryError, match="Cannot parse"):
        source(osmem, index, query="log:(GET AND").validate(WINDOW)
    with pytest.raises(QueryError, match="not found"):
        source(osmem, "no-such-index").validate(WINDOW)


def test_ingest_store_equals_index(osmem: str, tmp_path: Path) -> None:
    index, ids = new_index(osmem, 500, same_ts_every=33)
    db = tmp_path / "o.duckdb"
    counts = ingest_es(db, index=index, url=osmem, start=FROM, end=TO, page_size=60, parallel=2, progress=False)
    assert (counts.read, counts.stored, counts.duplicates, counts.rejects) == (500, 500, 0, 0)
    with open_store(db) as store:
        assert set(store.query("SELECT position FROM events")["position"]) == ids


def test_composite_aggregation_pagination(osmem: str, tmp_path: Path) -> None:
    index, _ = new_index(osmem, 350, same_ts_every=1)
    db = tmp_path / "a.duckdb"
    counts = aggregate_es(db, index=index, url=osmem, start=FROM, end=TO, interval="100ms",
                          group_by=["service=kubernetes.labels.app"], duration_field="duration", page_size=4)
    assert counts.queries > 5
    with open_store(db) as store:
        total = store.scalar("SELECT sum(value) FROM series WHERE metric = 'requests'")
        buckets = store.scalar("SELECT count(*) FROM series WHERE metric = 'requests'")
        p99_max = store.scalar("SELECT max(value) FROM series WHERE metric = 'p99_duration_ms'")
    assert total == 350
    assert buckets == 4 * 7  # 350 ms of documents in 100 ms buckets, 7 services
    assert p99_max <= 99


# -- one PIT over several indices (issue 18) --------------------------------------------------------
def twin_indices(url: str, n: int, *, distinct_ts: int = 1) -> tuple[str, set[str]]:
    """Two fresh one-shard indices with the same ids and timestamps: identical [time, _shard_doc] and
    [time, _id] sort values across them. Returns the pattern that matches both, and the positions."""
    stem = f"logs-twin{next(_names)}"
    want: set[str] = set()
    for suffix in ("a", "b"):
        name = f"{stem}-{suffix}"
        body = {"settings": {"number_of_shards": 1},
                "mappings": {"properties": {"@timestamp": {"type": "date"}}}}
        assert requests.put(f"{url}/{name}", json=body, timeout=10).ok
        lines = []
        for i in range(n):
            lines += [json.dumps({"index": {"_index": name, "_id": f"d{i}"}}),
                      json.dumps(fluentbit_doc(i, START_MS + i % distinct_ts, random.Random(i)))]
            want.add(f"{name}/d{i}")
        r = requests.post(f"{url}/_bulk?refresh=true", data="\n".join(lines) + "\n",
                          headers={"Content-Type": "application/x-ndjson"}, timeout=60)
        assert r.ok and not r.json()["errors"]
    return f"{stem}-*", want


@pytest.mark.parametrize("tiebreaker", ["_shard_doc", "_id"])
def test_osmem_guard_old_sort_loses_twins(osmem: str, tiebreaker: str) -> None:
    """osmem-server skips the twin of a page's last document exactly as our reading of OpenSearch says."""
    pattern, want = twin_indices(osmem, 10)
    ts = {"@timestamp": {"order": "asc", "unmapped_type": "date"}}
    assert len(raw_pit_paging(osmem, [ts, {tiebreaker: "asc"}], 3, dialect="os", pattern=pattern)) < len(want)
    fixed = raw_pit_paging(osmem, [ts, {"_index": "asc"}, {tiebreaker: "asc"}], 3, dialect="os", pattern=pattern)
    assert sorted(fixed) == sorted(want)


@pytest.mark.parametrize("tiebreaker", [None, "_id"])
@pytest.mark.parametrize("distinct_ts", [1, 3])
def test_osmem_twin_indices_every_document_once(osmem: str, tiebreaker: str | None, distinct_ts: int) -> None:
    pattern, want = twin_indices(osmem, 20, distinct_ts=distinct_ts)
    for page in (1, 3, 7):
        got = read_positions(source(osmem, pattern, page_size=page, tiebreaker=tiebreaker))
        assert len(got) == len(want) and set(got) == want, page


def test_osmem_twin_indices_resume_between_twins(osmem: str, tmp_path: Path) -> None:
    from meshlens.ingest import ingest_batches
    from meshlens.sources.elasticsearch import plan_run

    pattern, want = twin_indices(osmem, 12)
    db = tmp_path / "t.duckdb"
    src = source(osmem, pattern, page_size=3)
    window, cursors, base = plan_run(None, WINDOW, resume=False, slices=1)

    def killed_after(n: int) -> Iterator[Any]:
        for i, b in enumerate(src.batches(window, cursors, base)):
            if i == n:
                raise KeyboardInterrupt
            yield b

    with open_store(db) as store, pytest.raises(KeyboardInterrupt):
        ingest_batches(store, killed_after(3), source=src.identity, watermark_key=src.identity, progress=False)
    counts = ingest_es(db, index=pattern, url=osmem, start=FROM, end=TO, page_size=3, resume=True, progress=False)
    with open_store(db) as store:
        positions = list(store.query("SELECT position FROM events")["position"])
    assert sorted(positions) == sorted(want)
    assert (counts.read, counts.duplicates) == (len(want) - 9, 0)


def test_osmem_accepts_allow_partial_pit_creation_false(osmem: str) -> None:
    index, ids = new_index(osmem, 30)
    src = source(osmem, index, page_size=7)
    assert src.partial_pit_param() == "allow_partial_pit_creation"
    assert set(read_positions(src)) == ids and src._send_partial_param, "the parameter was not refused"


def test_osmem_pattern_matching_nothing_and_empty_range(osmem: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    index, _ = new_index(osmem, 5)
    with pytest.raises(QueryError, match=r"'nomatch-\*' matches no index; indices there: .*logs-osm-"):
        source(osmem, "nomatch-*").validate(WINDOW)
    later = Window(WINDOW.to_ms, WINDOW.to_ms + 3_600_000)
    with caplog.at_level(logging.WARNING, logger="meshlens.es"):
        source(osmem, index).validate(later)
    assert any("no documents in" in r.getMessage() and f"{index} (5 docs)" in r.getMessage() for r in caplog.records)
