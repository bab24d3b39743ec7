"""Elasticsearch/OpenSearch: circuit breakers and incomplete points in time (issue 18).

* ``_id`` as the sort tiebreaker (OpenSearch 2.4-3.2) loads field data and can trip the fielddata
  breaker (HTTP 429 ``circuit_breaking_exception``, durability PERMANENT): it is recognised at once
  (no retry storm), the read goes on with a sliced scroll from each slice's cursor, resumably, and the
  run record says so.
* A PIT that misses shards must be refused by the server (``allow_partial_pit_creation=false`` on
  OpenSearch, ``allow_partial_search_results=false`` on Elasticsearch 8.16+), a server that does not know
  the parameter still works, and ``_shards.failed`` in the answer is still checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from meshlens.errors import SourceError
from meshlens.ingest import ingest_batches
from meshlens.sources.elasticsearch import (
    BreakerTripped,
    EsQuery,
    EsSource,
    SliceCursor,
    Window,
    _breaker_of,
    ingest_es,
    plan_run,
)
from meshlens.sources.http import HttpConfig
from meshlens.store import open_store
from tests.servers.elasticsearch import EsTestServer, generate

START_MS = 1_717_200_000_000
WINDOW = Window(START_MS, START_MS + 86_400_000)
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"


def load(srv: EsTestServer, n: int, *, same_ts_every: int = 1) -> set[str]:
    for k in range(2):  # two daily indices behind one pattern
        name = f"logs-istio-2024.06.0{k + 1}"
        srv.create_index(name, mappings={"@timestamp": {"type": "date"}})
        srv.add_docs(name, generate(n, same_ts_every=same_ts_every, seed=k))
    return set(srv.all_docs())


def source(srv: EsTestServer, **kw: Any) -> EsSource:
    cfg = HttpConfig(url=srv.url, max_retries=kw.pop("max_retries", 6), backoff_base_s=0)
    return EsSource(cfg, EsQuery("logs-*"), sleep=lambda s: None, **kw)


def read_positions(src: EsSource) -> list[str]:
    out: list[str] = []
    for b in src.batches(WINDOW, [SliceCursor() for _ in range(src.parallel)]):
        out += b.positions
    return out


def pit_open_params(srv: EsTestServer) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(r.path).query) for r in srv.requests
            if r.method == "POST" and ("/_pit" in r.path or "/point_in_time" in r.path)]


# -- circuit breaker --------------------------------------------------------------------------------
# the fielddata body as the server renders it; the parent one verbatim from a public issue
# (openfoodfacts/openfoodfacts-infrastructure#130)
FIELDDATA = {"type": "circuit_breaking_exception",
             "reason": "[fielddata] Data too large, data for [_id] would be [3221225472/3gb], which is larger "
                       "than the limit of [3006477107/2.7gb]",
             "bytes_wanted": 3221225472, "bytes_limit": 3006477107, "durability": "PERMANENT"}
PARENT = {"type": "circuit_breaking_exception",
          "reason": "[parent] Data too large, data for [<http_request>] would be [1022127656/974.7mb], which is "
                    "larger than the limit of [1020054732/972.7mb], real usage: [1022127656/974.7mb], new bytes "
                    "reserved: [0/0b], usages [request=0/0b, fielddata=0/0b, in_flight_requests=0/0b, "
                    "model_inference=0/0b, eql_sequence=0/0b, accounting=76897616/73.3mb]",
          "bytes_wanted": 1022127656, "bytes_limit": 1020054732, "durability": "PERMANENT"}


@pytest.mark.parametrize("err, want", [
    ({"root_cause": [FIELDDATA], "type": "search_phase_execution_exception", "caused_by": FIELDDATA}, (True, True)),
    ({"root_cause": [PARENT], **PARENT}, (False, True)),
    ({"root_cause": [{**PARENT, "durability": "TRANSIENT"}], **PARENT, "durability": "TRANSIENT"}, (False, False)),
    ({"type": "search_phase_execution_exception", "failed_shards": [{"shard": 0, "reason": FIELDDATA}]},
     (True, True)),
])
def test_breaker_bodies_are_recognised(err: dict[str, Any], want: tuple[bool, bool]) -> None:
    trip = _breaker_of(err)
    assert trip is not None and trip[1:] == want
    assert _breaker_of({"type": "es_rejected_execution_exception", "reason": "rejected execution"}) is None


@pytest.mark.parametrize("mode", ["error", "partial"])
@pytest.mark.parametrize("parallel", [1, 3])
def test_id_sort_breaker_falls_back_to_sliced_scroll_without_loss(mode: str, parallel: int, tmp_path: Path) -> None:
    with EsTestServer("os2") as srv:  # OpenSearch 2.x: _index, _id is the tiebreaker
        want = load(srv, 300, same_ts_every=25)
        srv.faults.id_sort_breaker = mode
        db = tmp_path / "b.duckdb"
        counts = ingest_es(db, index="logs-*", url=srv.url, start=FROM, end=TO, page_size=40, parallel=parallel,
                           progress=False, backoff_base_s=0, max_retries=6)
        with open_store(db) as store:
            got = list(store.query("SELECT position FROM events")["position"])
            run = store.query("SELECT status, message FROM ingest_runs").iloc[-1]
        assert sorted(got) == sorted(want) and counts.duplicates == 0
        assert srv.engine.breaker_trips <= parallel, "a permanent breaker is not asked again"
        assert run["status"] == "ok" and "circuit breaker" in run["message"] and "scroll" in run["message"]
        assert any("/_search?scroll=" in r.path or "scroll=" in r.path for r in srv.requests)
        assert not srv.engine.pits and not srv.engine.scrolls


def test_breaker_fallback_is_kept_across_a_resume(tmp_path: Path) -> None:
    with EsTestServer("os2") as srv:
        want = load(srv, 200, same_ts_every=30)
        srv.faults.id_sort_breaker = "error"
        db = tmp_path / "r.duckdb"
        src = source(srv, page_size=30)
        window, cursors, base = plan_run(None, WINDOW, resume=False, slices=1)

        def killed_after(n: int) -> Iterator[Any]:
            for i, b in enumerate(src.batches(window, cursors, base)):
                if i == n:
                    raise KeyboardInterrupt
                yield b

        with open_store(db) as store, pytest.raises(KeyboardInterrupt):
            ingest_batches(store, killed_after(4), source=src.identity, watermark_key=src.identity, progress=False)
        with open_store(db) as store:
            assert store.get_watermark(src.identity)["run"]["fallback"] == "scroll"
        trips = srv.engine.breaker_trips
        counts = ingest_es(db, index="logs-*", url=srv.url, start=FROM, end=TO, page_size=30, resume=True,
                           progress=False, backoff_base_s=0)
        with open_store(db) as store:
            got = list(store.query("SELECT position FROM events")["position"])
            message = store.query("SELECT message FROM ingest_runs").iloc[-1]["message"]
        assert sorted(got) == sorted(want) and counts.duplicates == 0
        assert srv.engine.breaker_trips == trips, "the resumed run reads by scroll straight away"
        assert "fallen back to a sliced scroll" in message


def test_breaker_on_a_sort_that_has_no_fallback_stops_at_once_resumably() -> None:
    """A user-chosen _id tiebreaker under a read that cannot scroll differently: one clear resumable error."""
    with EsTestServer("es7.17") as srv:
        load(srv, 50)
        srv.faults.id_sort_breaker = "error"
        src = source(srv, page_size=20, force_scroll=False, tiebreaker="_id")
        src.make_plan()
        with pytest.raises(BreakerTripped) as exc:  # the probe sees it; validation uses no _id sort
            src._checked_search("/logs-*/_search", {"size": 1, "sort": [{"_id": "asc"}]})
        assert exc.value.resumable and "circuit breaker" in str(exc.value) and "--resume" in str(exc.value)
        assert srv.engine.breaker_trips == 1
        got = read_positions(src)  # in a PIT read the same trip falls back to scroll instead
        assert len(got) == 100


def test_transient_429_is_still_retried_with_backoff() -> None:
    with EsTestServer("es8") as srv:
        want = load(srv, 100)
        srv.faults.fail_count, srv.faults.fail_status, srv.faults.fail_path = 4, 429, "/_search"
        src = source(srv, page_size=50)
        assert sorted(read_positions(src)) == sorted(want)
        assert src.throttled == 4


# -- partial PITs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor, param", [("os2", "allow_partial_pit_creation"), ("os3", "allow_partial_pit_creation"),
                                           ("es9", "allow_partial_search_results"), ("es8", None),
                                           ("es7.17", None)])
def test_partial_pit_parameter_is_sent_where_the_server_has_it(flavor: str, param: str | None) -> None:
    with EsTestServer(flavor) as srv:
        want = load(srv, 60)
        assert sorted(read_positions(source(srv, page_size=25))) == sorted(want)
        opens = pit_open_params(srv)
        assert opens
        for q in opens:
            assert set(q) == {"keep_alive", *([param] if param else [])}
            if param:
                assert q[param] == ["false"]


@pytest.mark.parametrize("flavor", ["os2", "es9"])
def test_pit_missing_shards_is_refused_not_read(flavor: str) -> None:
    with EsTestServer(flavor) as srv:
        load(srv, 60)
        srv.faults.pit_failed_shards = 1
        with pytest.raises(SourceError) as exc:
            read_positions(source(srv, page_size=25, max_retries=1))
        assert exc.value.resumable and "would miss shards (logs-istio-2024.06.01[0]: " in str(exc.value)
        assert not [r for r in srv.requests if r.path == "/_search"], "no page of an incomplete PIT was read"


def test_server_that_rejects_the_parameter_still_works_and_failed_shards_are_checked() -> None:
    with EsTestServer("os2") as srv:
        want = load(srv, 60)
        srv.faults.unknown_params = ("allow_partial_pit_creation",)  # an older / compatible server
        src = source(srv, page_size=25)
        assert sorted(read_positions(src)) == sorted(want)
        opens = pit_open_params(srv)
        assert "allow_partial_pit_creation" in opens[0] and all("allow_partial_pit_creation" not in q
                                                                for q in opens[1:])
        # without the parameter this server hands out a PIT that misses a shard: _shards.failed catches it
        srv.faults.pit_failed_shards = 1
        with pytest.raises(SourceError, match="failed shard") as exc:
            read_positions(source(srv, page_size=25))
        assert exc.value.resumable and "no_shard_available" in str(exc.value) or "open_reader_context" in str(
            exc.value)
