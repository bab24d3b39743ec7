"""The Loki test server answers like Loki (shapes, limits, status codes, bodies) -- the tests of the
Loki source are only as good as this fidelity. Expected texts are Loki's (see tests/servers/loki.py)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import pytest
import requests

from meshlens.sources.loki import parse_streams
from tests.conftest import SHARED_SAMPLES
from tests.servers.loki import NS, LokiServer

SAMPLES = SHARED_SAMPLES / "loki"
QR = "/loki/api/v1/query_range"


@pytest.fixture(scope="module")
def srv() -> Iterator[LokiServer]:
    with LokiServer(max_query_series=3) as s:
        s.push({"app": "a", "namespace": "n1"}, [(10 * NS, "a-10"), (20 * NS, "a-20"), (30 * NS, "a-30")])
        s.push({"app": "b", "namespace": "n1"}, [(20 * NS, "b-20"), (40 * NS, "b-40")])
        s.push({"app": "j", "namespace": "n2"}, [
            (61 * NS, '{"response_code":200,"duration":10,"authority":"x"}'),
            (62 * NS, '{"response_code":503,"duration":30,"authority":"x"}'),
            (63 * NS, '{"response_code":"503","duration":"50","authority":"y"}'),
            (64 * NS, "not json"),
        ])
        s.push({"app": "c", "namespace": "n3"}, [(50 * NS, "c-50")])
        yield s


def get(s: LokiServer, path: str, **params: object) -> requests.Response:
    return requests.get(s.url + path, params={k: str(v) for k, v in params.items()}, timeout=10)


def entries(resp: requests.Response) -> list[tuple[str, int, str]]:
    doc = resp.json()
    assert doc["status"] == "success" and doc["data"]["resultType"] == "streams"
    return [(r["stream"]["app"], int(ts), line) for r in doc["data"]["result"] for ts, line in r["values"]]


def test_start_inclusive_end_exclusive_forward(srv: LokiServer) -> None:
    r = get(srv, QR, query='{namespace="n1"}', start=20 * NS, end=40 * NS, direction="forward", limit=10)
    assert sorted(entries(r)) == [("a", 20 * NS, "a-20"), ("a", 30 * NS, "a-30"), ("b", 20 * NS, "b-20")]


def test_default_direction_is_backward_and_limit_applies_across_streams(srv: LokiServer) -> None:
    r = get(srv, QR, query='{namespace="n1"}', start=0, end=100 * NS, limit=2)
    assert sorted(entries(r)) == [("a", 30 * NS, "a-30"), ("b", 40 * NS, "b-40")]
    r = get(srv, QR, query='{namespace="n1"}', start=0, end=100 * NS, limit=2, direction="forward")
    assert sorted(entries(r)) == [("a", 10 * NS, "a-10"), ("a", 20 * NS, "a-20")] or \
        sorted(entries(r)) == [("a", 10 * NS, "a-10"), ("b", 20 * NS, "b-20")]


def test_timestamp_formats_like_loghttp(srv: LokiServer) -> None:
    # <= 10 digits = seconds; float = seconds; RFC3339
    a = entries(get(srv, QR, query='{app="a"}', start="10", end="20", direction="forward"))
    b = entries(get(srv, QR, query='{app="a"}', start="10.0", end="1970-01-01T00:00:20Z", direction="forward"))
    assert a == b == [("a", 10 * NS, "a-10")]


def test_limit_default_100_and_max_entries_message(srv: LokiServer) -> None:
    r = get(srv, QR, query='{app="a"}', start=0, end=100 * NS, limit=5001)
    assert r.status_code == 400 and r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.text == "max entries limit per query exceeded, limit > max_entries_limit_per_query (5001 > 5000)"
    assert get(srv, QR, query='{app="a"}', start=0, end=100 * NS, limit=0).text == "limit must be a positive value"


def test_parse_error_is_plain_text_400(srv: LokiServer) -> None:
    r = get(srv, QR, query='{app="a"', start=0, end=10)
    assert r.status_code == 400
    assert r.text.startswith("parse error at line 1, col 9: syntax error: unexpected $end")
    r = get(srv, QR, query='{app=~".*"}', start=0, end=10)
    assert r.text.startswith("parse error : queries require at least one regexp or equality matcher")
    r = get(srv, QR, query='{app="a"} | logfmt', start=0, end=10)  # unsupported here -> parse error like Loki
    assert r.status_code == 400 and r.text.startswith("parse error at line 1")


def test_range_and_resolution_limits(srv: LokiServer) -> None:
    r = get(srv, QR, query='{app="a"}', start=0, end=800 * 3600 * NS)
    assert r.status_code == 400
    assert r.text == "the query time range exceeds the limit (query length: 800h0m0s, limit: 30d1h)"
    r = get(srv, QR, query='count_over_time({app="a"}[1m])', start=0, end=20000 * NS, step=1)
    assert r.status_code == 400 and r.text.startswith("exceeded maximum resolution of 11,000 points")
    r = get(srv, QR, query='{app="a"}', start=20 * NS, end=10 * NS)
    assert r.text == "end timestamp must not be before or equal to start time"


def test_instant_log_query_rejected(srv: LokiServer) -> None:
    r = get(srv, "/loki/api/v1/query", query='{app="a"}', time=50)
    assert r.status_code == 400 and r.text.startswith("log queries are not supported as an instant query type")
    r = get(srv, "/loki/api/v1/query", query='sum(count_over_time({namespace="n1"}[1m]))', time=60)
    doc = r.json()["data"]
    assert doc["resultType"] == "vector" and doc["result"] == [{"metric": {}, "value": [60, "5"]}]


def test_matrix_count_rate_quantile(srv: LokiServer) -> None:
    r = get(srv, QR, query='sum by (app) (count_over_time({namespace="n1"}[20s]))', start=20 * NS,
            end=40 * NS, step=20)
    res = r.json()["data"]
    assert res["resultType"] == "matrix"
    assert res["result"] == [
        {"metric": {"app": "a"}, "values": [[20, "2"], [40, "1"]]},  # (0,20] and (20,40]
        {"metric": {"app": "b"}, "values": [[20, "1"], [40, "1"]]},
    ]
    r = get(srv, QR, query='rate({app="a"}[20s])', start=40 * NS, end=40 * NS, step=20)
    assert r.json()["data"]["result"][0]["values"] == [[40, "0.05"]]
    q = 'quantile_over_time(0.5, {app="j"} | json | __error__="" | unwrap duration | __error__="" [1m]) by (app)'
    r = get(srv, QR, query=q, start=70 * NS, end=70 * NS, step=60)
    assert r.json()["data"]["result"] == [{"metric": {"app": "j"}, "values": [[70, "30"]]}]


def test_json_pipeline_error_and_label_filters(srv: LokiServer) -> None:
    r = get(srv, QR, query='sum by (response_code) (count_over_time({app="j"} | json [1m]))', start=70 * NS,
            end=70 * NS, step=60)
    assert r.status_code == 400 and r.text.startswith("pipeline error: 'JSONParserErr' for series:")
    q = 'sum by (response_code) (count_over_time({app="j"} | json | __error__="" | response_code=~"5.." [1m]))'
    r = get(srv, QR, query=q, start=70 * NS, end=70 * NS, step=60)
    assert r.json()["data"]["result"] == [{"metric": {"response_code": "503"}, "values": [[70, "2"]]}]
    r = get(srv, QR, query='{app="j"} | json | duration > 20', start=0, end=100 * NS, direction="forward")
    got = {v[1]: s["stream"] for s in r.json()["data"]["result"] for v in s["values"]}
    # a failed parse is not filtered out by a label filter: it stays, marked with __error__ (Loki docs)
    assert sorted(got) == ['not json', '{"response_code":"503","duration":"50","authority":"y"}',
                           '{"response_code":503,"duration":30,"authority":"x"}']
    assert got["not json"]["__error__"] == "JSONParserErr" and got['{"response_code":503,"duration":30,'
                                                                   '"authority":"x"}']["authority"] == "x"


def test_series_limit_message(srv: LokiServer) -> None:
    r = get(srv, QR, query='sum by (app, namespace, x) (count_over_time({namespace=~"n[12]"}[1h]))', start=0,
            end=3600 * NS, step=3600)
    assert r.json()["status"] == "success"  # 3 series == limit
    r = get(srv, QR, query='count_over_time({namespace=~"n.*"}[1s])', start=10 * NS, end=64 * NS, step=1)
    assert r.status_code == 400
    assert r.text.startswith("maximum number of series (3) reached for a single query; consider reducing")


def test_metadata_endpoints(srv: LokiServer) -> None:
    labels = get(srv, "/loki/api/v1/labels", start=0, end=100 * NS).json()
    assert labels == {"status": "success", "data": ["app", "namespace"]}
    vals = get(srv, "/loki/api/v1/label/app/values", start=0, end=100 * NS, query='{namespace="n1"}').json()
    assert vals["data"] == ["a", "b"]
    series = requests.get(srv.url + "/loki/api/v1/series", timeout=10,
                          params=[("match[]", '{app="a"}'), ("match[]", '{app="b"}'), ("start", "0"),
                                  ("end", str(100 * NS))]).json()
    assert sorted(series["data"], key=lambda d: d["app"]) == [{"app": "a", "namespace": "n1"},
                                                              {"app": "b", "namespace": "n1"}]
    assert requests.get(srv.url + "/ready", timeout=5).text == "ready\n"
    assert requests.get(srv.url + "/nope", timeout=5).status_code == 404


def test_push_json_gzip_dedup_and_bad_timestamp() -> None:
    with LokiServer() as s:
        body = {"streams": [{"stream": {"app": "p"}, "values": [
            ["1000", "x"], ["1000", "y"], ["1000", "x"], ["999", "x"], ["1000", "y", {"trace_id": "t"}]]}]}
        r = requests.post(s.url + "/loki/api/v1/push", data=gzip.compress(json.dumps(body).encode()), timeout=5,
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 204
        # identical (ts, line) in one stream is dropped even when not adjacent (unorderedHeadBlock.Append)
        assert s.holdings() == {((("app", "p"),), 1000, "x"), ((("app", "p"),), 1000, "y"),
                                ((("app", "p"),), 999, "x")}
        r = requests.post(s.url + "/loki/api/v1/push", json={"streams": [{"stream": {"app": "p"},
                                                                           "values": [[1000, "z"]]}]}, timeout=5)
        assert r.status_code == 400


def test_tenants_no_org_id_and_multi_tenant() -> None:
    with LokiServer(auth_enabled=True) as s:
        s.push({"app": "a"}, [(1, "one")], tenant="t1")
        s.push({"app": "a"}, [(2, "two")], tenant="t2")
        r = get(s, QR, query='{app="a"}', start=0, end=10)
        assert r.status_code == 401 and r.text == "no org id\n"

        def q(org: str) -> list[dict[str, object]]:
            return requests.get(s.url + QR, params={"query": '{app="a"}', "start": "0", "end": "10"}, timeout=5,
                                headers={"X-Scope-OrgID": org}).json()["data"]["result"]

        assert [v[1] for r_ in q("t1") for v in r_["values"]] == ["one"]
        both = q("t1|t2")
        assert sorted(r_["stream"]["__tenant_id__"] for r_ in both) == ["t1", "t2"]


# -- the real Loki samples parse with the source's parser ----------------------------------------------
def _load(name: str) -> dict[str, object]:
    text = (SAMPLES / name).read_text()
    text = text.replace('"stats": {\n      ...\n    }', '"stats": {}')  # doc samples elide stats
    return json.loads(text)


def test_real_samples_flatten() -> None:
    e = parse_streams(_load("loki_3.6.3_query_range_streams_with_stats.json")["data"])  # type: ignore[arg-type]
    assert e.lines == ["fizzbuzz"] and e.ts == [1767764442000000000]
    assert e.labels[0] == {"detected_level": "unknown", "job": "test", "service_name": "test"}
    e = parse_streams(_load("loki_issue5079_repeated_stream_labels.json")["data"])  # type: ignore[arg-type]
    assert sorted(e.lines) == ["alpha", "bar", "charlie", "foo"] and len(set(e.lkeys)) == 1
    e = parse_streams(_load("loki_docs_query_range_streams.json")["data"])  # type: ignore[arg-type]
    assert e.ts == [1569266497240578000, 1569266492548155000]
