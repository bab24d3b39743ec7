"""Elasticsearch/OpenSearch source against the in-process test server (tests/servers/elasticsearch.py).

Each test pins one behaviour: exact paging across identical timestamps, both PIT dialects, scroll
fallback, PIT/scroll expiry, 429 storms, partial shard failures, dropped connections, auth, resume,
document mapping, push-down aggregation -- and a property test that the store equals the index.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from meshlens.errors import AuthError, ConfigError, QueryError, SourceError
from meshlens.ingest import ingest_batches
from meshlens.sources.elasticsearch import (
    EsQuery,
    EsSource,
    ServerInfo,
    SliceCursor,
    Window,
    aggregate_es,
    choose_plan,
    hit_to_record,
    http_config,
    ingest_es,
    parse_cloud_id,
    parse_server_info,
    plan_run,
)
from meshlens.sources.http import HttpConfig
from meshlens.store import open_store
from tests.servers.elasticsearch import Auth, EsTestServer, fluentbit_doc, generate
from tests.support.interrupt import Killed, killed_after

START_MS = 1_717_200_000_000
WINDOW = Window(START_MS, START_MS + 86_400_000)
FROM, TO = "2024-06-01T00:00:00Z", "2024-06-02T00:00:00Z"


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def es8() -> Iterator[EsTestServer]:
    with EsTestServer("es8") as srv:
        yield srv


def load(srv: EsTestServer, n: int, *, index: str = "logs-istio-1", same_ts_every: int = 1,
         layout: str = "fluentbit", seed: int = 7) -> None:
    if index not in srv.engine.indices:
        srv.create_index(index, mappings={"@timestamp": {"type": "date"}})
    srv.add_docs(index, generate(n, same_ts_every=same_ts_every, layout=layout, seed=seed))


def source(srv: EsTestServer, *, index: str = "logs-*", cfg: HttpConfig | None = None, **kw: Any) -> EsSource:
    cfg = cfg or HttpConfig(url=srv.url, max_retries=kw.pop("max_retries", 6), backoff_base_s=0)
    return EsSource(cfg, EsQuery(index, query=kw.pop("query", None)), sleep=lambda s: None, **kw)


def read_positions(src: EsSource, window: Window = WINDOW, cursors: list[SliceCursor] | None = None
                   ) -> list[str]:
    cursors = cursors or [SliceCursor() for _ in range(src.parallel)]
    out: list[str] = []
    for b in src.batches(window, cursors):
        out += b.positions
    return out


def search_bodies(srv: EsTestServer) -> list[dict[str, Any]]:
    return [r.body for r in srv.requests if "_search" in r.path and isinstance(r.body, dict)]


def all_positions(srv: EsTestServer) -> set[str]:
    return set(srv.all_docs())


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
def test_cloud_id_decodes_to_the_elasticsearch_endpoint() -> None:
    plain = "prod:" + base64.b64encode(b"us-east-1.aws.found.io$abc123$kib456").decode()
    with_port = "prod:" + base64.b64encode(b"westeurope.azure.elastic-cloud.com:9243$es1$kb1").decode()
    assert parse_cloud_id(plain) == "https://abc123.us-east-1.aws.found.io:443"
    assert parse_cloud_id(with_port) == "https://es1.westeurope.azure.elastic-cloud.com:9243"
    with pytest.raises(ConfigError, match="name>:<base64"):
        parse_cloud_id("no-colon-here")
    with pytest.raises(ConfigError, match="host\\$es_uuid"):
        parse_cloud_id("x:" + base64.b64encode(b"onlyhost").decode())


def test_credentials_come_from_env_and_never_reach_the_identity(tmp_path: Path) -> None:
    env = {"ES_URL": "https://es.example:9200", "ES_USERNAME": "reader", "ES_PASSWORD": "s3cret",
           "ES_CA_CERT": "/etc/ca.pem"}
    cfg = http_config(env=env)
    assert (cfg.url, cfg.username, cfg.password, cfg.ca_cert) == ("https://es.example:9200", "reader", "s3cret",
                                                                   "/etc/ca.pem")
    src = EsSource(cfg, EsQuery("logs-*", query="status:500"))
    assert "s3cret" not in src.identity and "reader" not in src.identity
    assert src.identity == "es:https://es.example:9200|logs-*|status:500|@timestamp"
    key = http_config(env={"ES_URL": "https://x:9200", "ES_API_KEY": "VuaCfGcBCdbkQm-e5aOx:ui2lp2axTNmsyakw9tvNnw"})
    assert key.api_key == base64.b64encode(b"VuaCfGcBCdbkQm-e5aOx:ui2lp2axTNmsyakw9tvNnw").decode()
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    assert http_config(env={"ES_URL": "https://x:9200", "ES_BEARER_TOKEN_FILE": str(token_file)}).bearer_token \
        == "tok-123"
    cloud = "c:" + base64.b64encode(b"found.io$uuid$k").decode()
    assert http_config(env={"ES_CLOUD_ID": cloud}).url == "https://uuid.found.io:443"
    assert http_config(cloud_id=cloud, env={"ES_URL": "https://other:9200"}).url == "https://uuid.found.io:443"


def test_config_file_is_read_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "es.yaml"
    good.write_text("url: https://es.internal:9200\napi_key: abc\nverify: false\n")
    cfg = http_config(config_file=good, env={})
    assert (cfg.url, cfg.api_key, cfg.verify) == ("https://es.internal:9200", "abc", False)
    assert http_config(url="https://override:9200", config_file=good, env={}).url == "https://override:9200"
    bad = tmp_path / "bad.yaml"
    bad.write_text("url: https://x\npasword: typo\n")
    with pytest.raises(ConfigError, match="unknown key"):
        http_config(config_file=bad, env={})
    with pytest.raises(ConfigError, match="no Elasticsearch/OpenSearch URL"):
        http_config(env={})


def test_server_detection_prefers_the_opensearch_distribution_over_the_product_header() -> None:
    es = parse_server_info({"version": {"number": "8.15.3", "build_flavor": "default"},
                            "tagline": "You Know, for Search"}, {"X-Elastic-Product": "Elasticsearch"})
    # an OpenSearch-compatible server that also sends the Elastic header (as osmem-server does)
    os_ = parse_server_info({"version": {"distribution": "opensearch", "number": "2.17.1"}},
                            {"X-Elastic-Product": "Elasticsearch"})
    assert (es.distribution, es.version) == ("elasticsearch", (8, 15, 3))
    assert (os_.distribution, os_.version) == ("opensearch", (2, 17, 1))


@pytest.mark.parametrize("dist, number, parallel, expect", [
    ("elasticsearch", "7.9.3", 1, ("scroll", None)),
    ("elasticsearch", "7.10.2", 1, ("scroll", None)),  # PIT exists but no _shard_doc before 7.12
    ("elasticsearch", "7.13.4", 1, ("pit", "_shard_doc")),
    ("elasticsearch", "7.13.4", 4, ("scroll", None)),  # sliced PIT needs 7.15
    ("elasticsearch", "8.15.3", 4, ("pit", "_shard_doc")),
    ("elasticsearch", "9.1.2", 1, ("pit", "_shard_doc")),
    ("opensearch", "1.3.19", 1, ("scroll", None)),
    ("opensearch", "2.3.0", 1, ("scroll", None)),
    ("opensearch", "2.17.1", 4, ("pit", "_id")),  # _shard_doc only from OpenSearch 3.3
    ("opensearch", "3.3.0", 1, ("pit", "_shard_doc")),
])
def test_reading_plan_by_server_version(dist: str, number: str, parallel: int, expect: tuple) -> None:
    plan = choose_plan(ServerInfo(dist, number), parallel)
    assert (plan.mode, plan.tiebreaker) == expect
    assert plan.slices == parallel


# ---------------------------------------------------------------------------------------------------
# paging
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["es7.10", "es7.17", "es8", "es9", "os1", "os2", "os3"])
def test_identical_timestamps_across_pages_lose_and_repeat_nothing(flavor: str) -> None:
    with EsTestServer(flavor) as srv:
        load(srv, 600, same_ts_every=150)  # 150 documents per millisecond, pages of 40
        src = source(srv, page_size=40)
        got = read_positions(src)
        assert len(got) == 600 and set(got) == all_positions(srv)
        bodies = search_bodies(srv)
        assert all(b.get("from", 0) == 0 for b in bodies), "never pages with from/size"
        if src.plan and src.plan.mode == "pit":
            assert sum(1 for b in bodies if "search_after" in b) >= 600 // 40, "pages follow search_after"
            assert not srv.engine.pits, "the PIT is closed at the end"
        else:
            assert not srv.engine.scrolls, "scroll contexts are cleared at the end"


def test_the_server_really_loses_ties_without_a_unique_tiebreaker(es8: EsTestServer) -> None:
    """Guard for the test above: paging on the timestamp alone must lose documents on this server."""
    import requests

    load(es8, 100, same_ts_every=50)
    body: dict[str, Any] = {"size": 30, "sort": [{"@timestamp": "asc"}]}
    seen: list[str] = []
    while True:
        hits = requests.post(f"{es8.url}/logs-*/_search", json=body, timeout=10).json()["hits"]["hits"]
        if not hits:
            break
        seen += [h["_id"] for h in hits]
        body["search_after"] = hits[-1]["sort"]
    assert len(seen) == 60  # 30 of each 50-document millisecond, the rest skipped


def test_elasticsearch_pit_dialect_is_used_with_shard_doc(es8: EsTestServer) -> None:
    load(es8, 50)
    got = read_positions(source(es8, page_size=20))
    assert len(got) == 50
    paths = [(r.method, r.path.split("?")[0]) for r in es8.requests]
    assert ("POST", "/logs-*/_pit") in paths and ("DELETE", "/_pit") in paths
    pit_searches = [r for r in es8.requests if r.path == "/_search"]
    assert pit_searches and all(r.body["sort"][-1] == {"_shard_doc": "asc"} for r in pit_searches)


def test_opensearch_pit_dialect_is_used_with_id_tiebreaker_before_3_3() -> None:
    with EsTestServer("os2") as srv:
        load(srv, 50)
        got = read_positions(source(srv, page_size=20))
        assert len(got) == 50
        paths = [(r.method, r.path.split("?")[0]) for r in srv.requests]
        assert ("POST", "/logs-*/_search/point_in_time") in paths
        assert ("DELETE", "/_search/point_in_time") in paths
        assert all(r.body["sort"][-1] == {"_id": "asc"} for r in srv.requests if r.path == "/_search")


@pytest.mark.parametrize("flavor", ["es8", "os2", "es7.13"])
def test_parallel_slices_cover_every_document_once(flavor: str) -> None:
    with EsTestServer(flavor) as srv:
        load(srv, 900, same_ts_every=7)
        src = source(srv, page_size=50, parallel=3)
        got = read_positions(src)
        assert len(got) == 900 and set(got) == all_positions(srv)
        slices = {json.dumps(b["slice"], sort_keys=True) for b in search_bodies(srv) if "slice" in b}
        assert len(slices) == 3
        assert all(json.loads(s)["field"] == "@timestamp" for s in slices), "slices are stable across contexts"


@pytest.mark.parametrize("flavor, parallel", [("es8", 1), ("es8", 3), ("os2", 2), ("es7.10", 1), ("es7.10", 2)])
def test_context_expiry_mid_run_reopens_and_continues_without_loss(flavor: str, parallel: int) -> None:
    with EsTestServer(flavor) as srv:
        load(srv, 700, same_ts_every=60)
        srv.faults.expire_after_pages = 4  # every 4th page kills every PIT and scroll
        src = source(srv, page_size=30, parallel=parallel)
        got = read_positions(src)
        assert len(got) == 700 and set(got) == all_positions(srv)
        assert src.pit_reopens + src.scroll_restarts >= 2


def test_search_after_values_are_not_reused_in_a_reopened_pit(es8: EsTestServer) -> None:
    load(es8, 200, same_ts_every=200)  # one millisecond: only the tiebreaker orders the documents
    es8.faults.expire_after_pages = 2
    src = source(es8, page_size=25)
    got = read_positions(src)
    assert sorted(got) == sorted(all_positions(es8))
    # after each reopen the first request restarts at the boundary instead of sending old search_after
    assert src.pit_reopens >= 3


def test_sort_values_are_not_carried_into_a_pit_another_slice_reopened(es8: EsTestServer) -> None:
    load(es8, 300, same_ts_every=300)  # one millisecond: the order is the tiebreaker's alone
    src = source(es8, page_size=50)
    real_emit, calls = src._emit, iter(range(1000))

    def emit(hits: list[dict[str, Any]], cursor: SliceCursor) -> Any:
        out = real_emit(hits, cursor)
        if next(calls) == 1:  # as if another slice found the PIT dead and reopened it just now
            es8.engine.expire_all_contexts()
            assert src._pit is not None
            src._pit.reopen(src._pit.generation)
        return out

    src._emit = emit  # type: ignore[method-assign]
    got = read_positions(src)
    assert sorted(got) == sorted(all_positions(es8))


def test_page_size_above_max_result_window_is_reduced(es8: EsTestServer) -> None:
    es8.create_index("logs-small", mappings={"@timestamp": {"type": "date"}}, max_result_window=100)
    load(es8, 350, index="logs-small")
    src = source(es8, page_size=1000)
    assert len(read_positions(src)) == 350
    assert src.page_size == 100


def test_429_storm_is_retried_with_backoff(es8: EsTestServer) -> None:
    load(es8, 300)
    es8.faults.fail_count, es8.faults.fail_status = 5, 429
    es8.faults.fail_path = "/_search"
    got = read_positions(source(es8, page_size=50))
    assert len(got) == 300
    assert es8.faults.fail_count == 0


def test_exhausted_retries_stop_resumably_and_resume_finishes_exactly(es8: EsTestServer, tmp_path: Path) -> None:
    load(es8, 400, same_ts_every=30)
    db = tmp_path / "es.duckdb"
    common = dict(index="logs-*", url=es8.url, start=FROM, end=TO, page_size=40, progress=False,
                  max_retries=2, backoff_base_s=0, backoff_max_s=0)
    calls = {"n": 0}
    real = es8.engine.search

    def flaky(*a: Any, **k: Any) -> Any:  # healthy for 4 pages, then a 503 storm longer than the retries
        calls["n"] += 1
        if calls["n"] == 6:
            es8.faults.fail_count, es8.faults.fail_status = 50, 503
        return real(*a, **k)

    es8.engine.search = flaky  # type: ignore[method-assign]
    with pytest.raises(SourceError) as exc:
        ingest_es(db, **common)
    assert exc.value.resumable
    es8.faults.fail_count = 0
    counts = ingest_es(db, resume=True, **common)
    with open_store(db) as store:
        stored = set(store.query("SELECT position FROM events")["position"])
        assert store.scalar("SELECT count(*) FROM events") == 400
    assert stored == all_positions(es8)
    assert counts.duplicates == 0, "the checkpoint is exact: nothing is read twice"


def test_partial_shard_failure_is_asked_again_never_accepted(es8: EsTestServer) -> None:
    load(es8, 200)
    es8.faults.partial_count = 2
    src = source(es8, page_size=50)
    assert sorted(read_positions(src)) == sorted(all_positions(es8))
    assert src.partial_retries == 2


def test_persistent_partial_results_fail_resumably(es8: EsTestServer) -> None:
    load(es8, 200)
    es8.faults.partial_count = 100
    with pytest.raises(SourceError, match="shard") as exc:
        read_positions(source(es8, page_size=50))
    assert exc.value.resumable and "Node not connected" in str(exc.value)


def test_timed_out_answer_is_not_accepted(es8: EsTestServer) -> None:
    load(es8, 120)
    es8.faults.timed_out_count = 1
    src = source(es8, page_size=50)
    assert sorted(read_positions(src)) == sorted(all_positions(es8))
    assert src.partial_retries == 1


@pytest.mark.parametrize("mode", ["close", "truncate"])
def test_dropped_connections_are_retried(es8: EsTestServer, mode: str) -> None:
    load(es8, 150)
    es8.faults.drop_count, es8.faults.drop_mode, es8.faults.drop_path = 2, mode, "/_search"
    got = read_positions(source(es8, page_size=40))
    assert sorted(got) == sorted(all_positions(es8))
    assert es8.faults.drop_count == 0


# ---------------------------------------------------------------------------------------------------
# auth and errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["es8", "os2"])
def test_auth_failure_is_reported_at_once_without_retries(flavor: str) -> None:
    auth = Auth(users={"reader": "right"})
    with EsTestServer(flavor, auth=auth) as srv:
        cfg = HttpConfig(url=srv.url, username="reader", password="wrong", max_retries=5)
        with pytest.raises(AuthError) as exc:
            read_positions(source(srv, cfg=cfg))
        assert exc.value.status == 401
        assert len(srv.requests) == 1
        assert "right" not in str(exc.value) and "wrong" not in str(exc.value)
        if flavor == "es8":
            assert "unable to authenticate user [reader]" in str(exc.value)


@pytest.mark.parametrize("kind", ["basic", "api_key", "bearer"])
def test_each_auth_method_is_accepted(kind: str) -> None:
    auth = Auth(users={"elastic": "pw"}, api_keys={"a2V5aWQ6c2VjcmV0"}, bearer_tokens={"tok"})
    creds = {"basic": {"username": "elastic", "password": "pw"}, "api_key": {"api_key": "a2V5aWQ6c2VjcmV0"},
             "bearer": {"bearer_token": "tok"}}[kind]
    with EsTestServer("es8", auth=auth) as srv:
        load(srv, 30)
        assert len(read_positions(source(srv, cfg=HttpConfig(url=srv.url, **creds)))) == 30


def test_no_permission_for_root_still_reads_by_probing_the_pit_api() -> None:
    with EsTestServer("os2") as srv:
        load(srv, 80)
        real = srv.dispatch

        def deny_root(method: str, path: str, *a: Any) -> Any:
            if path == "/":
                return srv._forbidden(method, path)
            return real(method, path, *a)

        srv.dispatch = deny_root  # type: ignore[method-assign]
        src = source(srv, page_size=30)
        assert len(read_positions(src)) == 80
        assert src.plan is not None and (src.plan.mode, src.plan.dialect) == ("pit", "opensearch")


def test_query_syntax_error_is_reported_at_once(es8: EsTestServer) -> None:
    load(es8, 10)
    src = source(es8, query="log:(GET AND")
    with pytest.raises(QueryError, match=r"Cannot parse 'log:\(GET AND'.*Fix --query"):
        src.validate(WINDOW)
    assert sum(1 for r in es8.requests if "_search" in r.path) == 1, "no retries for a syntax error"


def test_missing_index_is_reported_at_once(es8: EsTestServer, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=r"index 'nope' not found .*no such index \[nope\]"):
        ingest_es(tmp_path / "x.duckdb", index="nope", url=es8.url, start=FROM, end=TO, progress=False)


def test_lucene_query_filters_documents(es8: EsTestServer) -> None:
    load(es8, 140)
    src = source(es8, query="kubernetes.labels.app:reviews AND NOT log:500")
    got = read_positions(src)
    docs = es8.all_docs()
    want = {p for p, d in docs.items() if d["kubernetes"]["labels"]["app"] == "reviews" and '" 500 ' not in d["log"]}
    assert set(got) == want and want


# ---------------------------------------------------------------------------------------------------
# documents -> records
# ---------------------------------------------------------------------------------------------------
def test_fluent_bit_record_keeps_the_raw_line_and_kubernetes_labels() -> None:
    import random

    doc = fluentbit_doc(3, START_MS, random.Random(1))
    rec = hit_to_record({"_index": "logs-1", "_id": "a1", "_source": doc, "sort": [START_MS, 4]}, "@timestamp")
    assert rec.line == doc["log"].rstrip("\n") and rec.line.startswith("[2024-06-01T00:00:00.000Z]")
    assert rec.labels == {"namespace": "bookinfo", "pod": doc["kubernetes"]["pod_name"], "container": "istio-proxy",
                          "node": "node-0", "app": "details", "version": "v1"}
    assert (rec.ts_ns, rec.position, rec.reject_reason) == (START_MS * 1_000_000, "logs-1/a1", None)


def test_filebeat_record_uses_message_and_dotted_ecs_kubernetes_fields() -> None:
    src = {"@timestamp": "2024-06-01T00:00:00.5Z", "message": "line",
           "kubernetes.namespace": "shop", "kubernetes": {"pod": {"name": "cart-5c9b7-x2x9z"},
                                                          "container": {"name": "istio-proxy"},
                                                          "labels": {"app_kubernetes_io/name": "cart"},
                                                          "deployment": {"name": "cart"}},
           "log": {"offset": 10, "file": {"path": "/var/log/containers/x.log"}}}
    rec = hit_to_record({"_index": "i", "_id": "b", "_source": src}, "@timestamp")
    assert rec.line == "line"
    assert rec.labels == {"namespace": "shop", "pod": "cart-5c9b7-x2x9z", "container": "istio-proxy",
                          "workload": "cart", "app": "cart"}
    assert rec.ts_ns == 1717200000500000000


def test_structured_documents_become_canonical_json() -> None:
    ecs = {"@timestamp": "2024-06-01T00:00:00Z", "http": {"request": {"method": "GET"}}, "message": "GET /"}
    rec = hit_to_record({"_index": "i", "_id": "c", "_source": ecs}, "@timestamp")
    assert rec.line == json.dumps(ecs, sort_keys=True)
    merged = {"@timestamp": "2024-06-01T00:00:00Z", "start_time": "2024-06-01T00:00:00.000Z", "method": "GET",
              "path": "/x", "response_code": 200, "duration": 3, "upstream_cluster": "outbound|80||x",
              "kubernetes": {"namespace_name": "shop"}}
    rec = hit_to_record({"_index": "i", "_id": "d", "_source": merged}, "@timestamp")
    assert json.loads(rec.line) == {k: merged[k] for k in ("start_time", "method", "path", "response_code",
                                                           "duration", "upstream_cluster")}
    assert rec.labels == {"namespace": "shop"}


@pytest.mark.parametrize("value, ns", [
    ("2024-06-01T00:00:00.123Z", 1717200000123000000),
    ("2024-06-01T00:00:00.123456789Z", 1717200000123456789),  # date_nanos keeps every digit
    ("2024-06-01T02:00:00.5+02:00", 1717200000500000000),
    (1717200000123, 1717200000123000000),  # epoch_millis, Elasticsearch's default numeric date
    ("1717200000123", 1717200000123000000),
    ("1717200000123.5", 1717200000123500000),  # exact, not via float
    ("yesterday", None),
])
def test_document_time_values(value: Any, ns: int | None) -> None:
    from meshlens.sources.elasticsearch import time_value_ns

    assert time_value_ns(value) == ns


def test_query_dsl_file_filters_documents(es8: EsTestServer, tmp_path: Path) -> None:
    load(es8, 70)
    dsl = tmp_path / "q.json"
    dsl.write_text(json.dumps({"query": {"term": {"kubernetes.namespace_name.keyword": "shop"}}}))
    counts = ingest_es(tmp_path / "q.duckdb", index="logs-*", url=es8.url, start=FROM, end=TO, query_dsl=dsl,
                       progress=False)
    want = sum(1 for d in es8.all_docs().values() if d["kubernetes"]["namespace_name"] == "shop")
    assert counts.read == want and 0 < want < 70
    with pytest.raises(ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{nope")
        ingest_es(tmp_path / "q.duckdb", index="logs-*", url=es8.url, start=FROM, end=TO,
                  query_dsl=tmp_path / "bad.json", progress=False)


@pytest.mark.parametrize("hit, reason", [
    ({"_index": "i", "_id": "e"}, "no _source"),
    ({"_index": "i", "_id": "f", "_source": ["a"]}, "not an object"),
    ({"_index": "i", "_id": "g", "_source": {"log": "  \n"}}, "'log' field is empty"),
])
def test_documents_without_content_carry_a_reject_reason(hit: dict, reason: str) -> None:
    assert reason in (hit_to_record(hit, "@timestamp").reject_reason or "")


def test_malformed_and_unmappable_documents_become_rejects_with_reasons(es8: EsTestServer, tmp_path: Path) -> None:
    load(es8, 20)
    t = "2024-06-01T00:00:01.000Z"
    bad = [
        ("trunc", {"@timestamp": t, "log": '[2024-06-01T00:00:01.000Z] "GET /x HTTP/1.1" 200 - via'}),
        ("badjson", {"@timestamp": t, "log": '{"start_time": "2024-06-01T00:00:01Z", "response_code": 2'}),
        ("unknown", {"@timestamp": t, "foo": {"bar": 1}}),
        ("nolabels", {"@timestamp": t, "message": "hello world"}),
        ("empty", {"@timestamp": t, "log": ""}),
        ("ecsbad", {"@timestamp": t, "http": {"request": {"method": "GET"}, "response": {"status_code": "x"}}}),
    ]
    es8.add_docs("logs-istio-1", bad)
    db = tmp_path / "r.duckdb"
    counts = ingest_es(db, index="logs-*", url=es8.url, start=FROM, end=TO, progress=False)
    assert (counts.read, counts.stored, counts.rejects) == (26, 20, 6)
    with open_store(db) as store:
        rej = dict(store.query("SELECT position, reason FROM rejects").itertuples(index=False))
    assert set(rej) == {f"logs-istio-1/{d}" for d, _ in bad}
    assert "'log' field is empty" in rej["logs-istio-1/empty"]
    assert "JSON" in rej["logs-istio-1/badjson"]
    assert "unknown shape" in rej["logs-istio-1/unknown"]
    assert "not an integer" in rej["logs-istio-1/ecsbad"]
    assert all(r for r in rej.values())


def test_missing_metadata_fields_still_ingest(es8: EsTestServer, tmp_path: Path) -> None:
    import random

    docs = []
    for i in range(10):
        d = fluentbit_doc(i, START_MS + i, random.Random(i))
        d["kubernetes"].pop("labels")  # no app label: the workload comes from the pod name
        if i % 2:
            d.pop("kubernetes")  # no metadata at all
        docs.append((f"m{i}", d))
    es8.add_docs("logs-istio-1", docs)
    db = tmp_path / "m.duckdb"
    counts = ingest_es(db, index="logs-*", url=es8.url, start=FROM, end=TO, progress=False)
    assert (counts.read, counts.stored, counts.rejects) == (10, 10, 0)
    with open_store(db) as store:
        df = store.query("SELECT position, labels, src_workload FROM events ORDER BY position")
    with_meta = df[df["position"].str.endswith(("m0", "m2", "m4", "m6", "m8"))]
    assert all(wl for wl in with_meta["src_workload"])


def test_ecs_documents_are_parsed_by_the_ecs_parser(es8: EsTestServer, tmp_path: Path) -> None:
    docs = [(f"e{i}", {"@timestamp": f"2024-06-01T00:00:0{i}.000Z", "event": {"duration": 5_000_000},
                       "http": {"request": {"method": "GET"}, "response": {"status_code": 200 + i}},
                       "url": {"path": f"/p{i}"}, "kubernetes": {"namespace": "shop",
                                                                 "container": {"name": "istio-proxy"}}})
            for i in range(5)]
    es8.add_docs("logs-ecs", docs)
    db = tmp_path / "e.duckdb"
    counts = ingest_es(db, index="logs-ecs", url=es8.url, start=FROM, end=TO, progress=False)
    assert (counts.stored, counts.rejects) == (5, 0)
    with open_store(db) as store:
        df = store.query("SELECT format, status, path, duration_ms, mesh FROM events ORDER BY status")
    assert list(df["format"]) == ["ecs"] * 5 and list(df["status"]) == [200, 201, 202, 203, 204]
    assert list(df["duration_ms"]) == [5.0] * 5 and set(df["mesh"]) == {"istio"}


# ---------------------------------------------------------------------------------------------------
# watermark and resume
# ---------------------------------------------------------------------------------------------------
def test_a_run_killed_between_batches_resumes_exactly(es8: EsTestServer, tmp_path: Path) -> None:
    load(es8, 500, same_ts_every=45)
    db = tmp_path / "k.duckdb"
    src = source(es8, page_size=35, parallel=2)
    window, cursors, base = plan_run(None, WINDOW, resume=False, slices=2)


    with open_store(db) as store, pytest.raises(Killed):
        ingest_batches(store, killed_after(src.batches(window, cursors, base), 6), source=src.identity, watermark_key=src.identity, progress=False)
    counts = ingest_es(db, index="logs-*", url=es8.url, start=FROM, end=TO, page_size=35, parallel=2,
                       resume=True, progress=False)
    with open_store(db) as store:
        positions = list(store.query("SELECT position FROM events")["position"])
        state = store.get_watermark(src.identity)
    assert sorted(positions) == sorted(all_positions(es8))
    assert counts.duplicates == 0 and counts.read == 500 - (len(positions) - counts.stored)
    assert state["run"] is None and state["complete_to_ms"] == WINDOW.to_ms


def test_incremental_resume_reads_only_new_documents(es8: EsTestServer, tmp_path: Path) -> None:
    load(es8, 100)
    db = tmp_path / "inc.duckdb"
    first = ingest_es(db, index="logs-*", url=es8.url, start=FROM, end="2024-06-01T12:00:00Z", progress=False)
    later = START_MS + 13 * 3_600_000
    es8.add_docs("logs-istio-1", [(f"late{i}", fluentbit_doc(i, later + i, __import__("random").Random(i)))
                                  for i in range(30)])
    second = ingest_es(db, index="logs-*", url=es8.url, start=FROM, end=TO, resume=True, resume_overlap="0s",
                       progress=False)
    assert (first.read, second.read, second.stored, second.duplicates) == (100, 30, 30, 0)
    third = ingest_es(db, index="logs-*", url=es8.url, start=FROM, end=TO, resume=True, progress=False)
    assert third.read == 0


def test_plan_run_keeps_coverage_contiguous() -> None:
    w1, c1, base = plan_run(None, Window(0, 100), resume=True, slices=1)
    assert w1 == Window(0, 100) and len(c1) == 1
    from meshlens.sources.elasticsearch import state_completed, state_with_run

    done = state_completed(base, Window(0, 100))
    assert done["complete_to_ms"] == 100
    gap = state_completed(done, Window(500, 600))  # an unrelated later range does not skip the gap
    assert gap["complete_to_ms"] == 100
    w2, _, _ = plan_run(done, Window(0, 300), resume=True, slices=4)
    assert w2 == Window(100, 300)
    running = state_with_run(done, Window(100, 300), [SliceCursor(boundary=150, boundary_value=150, seen=["i/a"])])
    w3, c3, _ = plan_run(running, Window(0, 999), resume=True, slices=4)
    assert w3 == Window(100, 300) and len(c3) == 1 and c3[0].seen == ["i/a"]


# ---------------------------------------------------------------------------------------------------
# push-down aggregation
# ---------------------------------------------------------------------------------------------------
def test_composite_aggregation_pages_through_after_key_into_series(es8: EsTestServer, tmp_path: Path) -> None:
    docs = []
    for i in range(240):
        docs.append((f"a{i}", {"@timestamp": START_MS + (i % 6) * 60_000, "start_time": "x", "response_code":
                               [200, 503, 200, 404][i % 4], "duration": i % 50, "method": "GET", "path": "/",
                               "upstream_cluster": "c", "bytes_sent": 1, "bytes_received": 1,
                               "kubernetes": {"namespace_name": ["shop", "pay"][i % 2],
                                              "labels": {"app": f"svc{i % 5}"}}}))
    es8.add_docs("logs-agg", docs)
    db = tmp_path / "agg.duckdb"
    counts = aggregate_es(db, index="logs-agg", url=es8.url, start=FROM, end=TO, interval="1m", page_size=7)
    assert counts.group_by == {"namespace": "kubernetes.namespace_name.keyword",
                               "service": "kubernetes.labels.app.keyword"}  # text fields retried as .keyword
    assert counts.queries >= 240 // (6 * 2 * 5) and counts.queries > 5
    with open_store(db) as store:
        req = store.query("SELECT sum(value) AS n FROM series WHERE metric = 'requests'")["n"][0]
        err = store.query("SELECT sum(value) AS n FROM series WHERE metric = 'errors_5xx'")["n"][0]
        p99 = store.query("SELECT labels, ts, value FROM series WHERE metric = 'p99_duration_ms'")
        n_series = store.scalar("SELECT count(DISTINCT series_key) FROM series WHERE metric = 'requests'")
    assert req == 240 and err == 60
    assert n_series == 10  # 2 namespaces x 5 services (i%2 and i%5 combine into 10 pairs)
    assert len(p99) == 6 * 5 and (p99["value"] <= 49).all()  # per minute: one namespace (i%6 fixes i%2)
    again = aggregate_es(db, index="logs-agg", url=es8.url, start=FROM, end=TO, interval="1m", page_size=7)
    with open_store(db) as store:
        assert store.scalar("SELECT count(*) FROM series") == again.samples, "re-running upserts"


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _cli() -> typer.Typer:
    from meshlens.cli.es import register

    app, ingest, aggregate = typer.Typer(), typer.Typer(), typer.Typer()
    app.add_typer(ingest, name="ingest")
    app.add_typer(aggregate, name="aggregate")
    register(ingest, aggregate)
    return app


def test_cli_prints_the_four_counts_as_json(es8: EsTestServer, tmp_path: Path) -> None:
    load(es8, 60)
    res = CliRunner().invoke(_cli(), ["ingest", "es", "--url", es8.url, "--index", "logs-*", "--from", FROM,
                                      "--to", TO, "--db", str(tmp_path / "c.duckdb"), "--parallel", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["records_read"], out["events_stored"], out["duplicates_skipped"], out["rejects"]) == (60, 60, 0, 0)


def test_cli_failure_is_one_actionable_line_and_nonzero_exit(es8: EsTestServer, tmp_path: Path) -> None:
    args = ["ingest", "es", "--url", es8.url, "--index", "missing-*,nope", "--since", "1h",
            "--db", str(tmp_path / "f.duckdb")]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "error: " in res.stderr and "nope" in res.stderr
    res = CliRunner().invoke(_cli(), [*args[:-2], "--db", str(tmp_path / "g.duckdb"), "--parallel", "0"])
    assert res.exit_code == 2 and "--parallel" in res.stderr


# ---------------------------------------------------------------------------------------------------
# property: the store equals the index
# ---------------------------------------------------------------------------------------------------
_PROP_SERVERS: dict[str, EsTestServer] = {}
_PROP_LOCK = threading.Lock()


def _prop_server(flavor: str) -> EsTestServer:
    with _PROP_LOCK:
        if flavor not in _PROP_SERVERS:
            srv = EsTestServer(flavor).start()
            srv.log_requests = False
            _PROP_SERVERS[flavor] = srv
        return _PROP_SERVERS[flavor]


@pytest.fixture(scope="module", autouse=True)
def _stop_prop_servers() -> Iterator[None]:
    yield
    for srv in _PROP_SERVERS.values():
        srv.stop()
    _PROP_SERVERS.clear()


_doc = st.tuples(st.integers(0, 40), st.integers(0, 6), st.sampled_from([200, 404, 503]),
                 st.sampled_from(["fluentbit", "filebeat"]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(_doc, min_size=0, max_size=120), page=st.integers(1, 17), parallel=st.integers(1, 3),
       flavor=st.sampled_from(["es8", "os2", "es7.10"]), expire=st.sampled_from([None, 3, 7]),
       seq=st.integers(0, 10**9))
def test_property_store_equals_index(docs: list[tuple[int, int, int, str]], page: int, parallel: int,
                                     flavor: str, expire: int | None, seq: int) -> None:
    import random

    from tests.servers.elasticsearch import filebeat_doc

    srv = _prop_server(flavor)
    index = f"prop-{seq}-{len(srv.engine.indices)}"
    srv.create_index(index, mappings={"@timestamp": {"type": "date"}})
    rows = []
    for i, (ms, _svc, status, layout) in enumerate(docs):
        make = fluentbit_doc if layout == "fluentbit" else filebeat_doc
        d = make(i, START_MS + ms, random.Random(i))
        key = "log" if layout == "fluentbit" else "message"
        d[key] = d[key].replace('" 200 ', f'" {status} ', 1)
        rows.append((f"d{i}", d, d[key]))
    srv.add_docs(index, [(i, d) for i, d, _ in rows])
    srv.faults.expire_after_pages = expire
    srv.engine.context_pages = 0
    try:
        store = open_store(":memory:")
        counts = ingest_es(store, index=index, url=srv.url, start=FROM, end=TO, page_size=page,
                           parallel=parallel, progress=False, backoff_base_s=0)
        got = dict(store.query("SELECT position, raw FROM events").itertuples(index=False))
        store.close()
    finally:
        srv.faults.expire_after_pages = None
    want = {f"{index}/{i}": line.rstrip("\n") for i, _, line in rows}
    assert got == want
    assert (counts.read, counts.stored, counts.duplicates, counts.rejects) == (len(rows), len(rows), 0, 0)
