"""Push-down aggregation: LogQL metric queries -> the ``series`` table, checked against counts computed
here from the raw lines the server holds; splitting on Loki's series and range limits changes nothing."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest

from meshlens.errors import ConfigError, QueryError
from meshlens.sources.loki import ISTIO_TEXT_REGEXP, aggregate_loki
from meshlens.store import Store, open_store
from tests.servers.loki import NS, LokiServer, generate

STEP = 60 * NS
S = (1_700_000_000 * NS // STEP) * STEP  # minute-aligned
E = S + 10 * STEP
SEL = '{container="istio-proxy"}'
TEXT = re.compile(ISTIO_TEXT_REGEXP)


@pytest.fixture
def store() -> Iterator[Store]:
    s = open_store(":memory:")
    yield s
    s.close()


def bucket(ts: int) -> int:
    """Start of the Loki step window (t - step, t] holding ts."""
    return math.ceil(ts / STEP) * STEP - STEP


def expected_requests(srv: LokiServer, fmt: str) -> dict[tuple[tuple[tuple[str, str], ...], int], float]:
    out: Counter[tuple[tuple[tuple[str, str], ...], int]] = Counter()
    for labels, ts, line in srv.holdings("fake", S, E):
        lb = dict(labels)
        if fmt == "text":
            m = TEXT.search(line)
            code, flags = m.group("response_code"), m.group("response_flags")
        else:
            doc = json.loads(line)
            code, flags = str(doc["response_code"]), doc["response_flags"]
        key = {"namespace": lb["namespace"], "service": lb["app"], "status": code, "flags": flags}
        out[(tuple(sorted(key.items())), bucket(ts))] += 1
    return dict(out)


def stored(store: Store, metric: str) -> dict[tuple[tuple[tuple[str, str], ...], int], float]:
    rows = store.con.execute("SELECT labels, epoch_us(ts), value, step_s FROM series WHERE metric = ?",
                             [metric]).fetchall()
    assert all(r[3] == 60.0 for r in rows)
    return {(tuple(sorted(lb.items())), us * 1000): v for lb, us, v, _ in rows}


def test_text_presets_equal_counts_from_the_raw_lines(store: Store) -> None:
    with LokiServer() as srv:
        generate(srv, lines=3000, streams=6, start_ns=S + 1, span_ns=10 * STEP - 1, seed=5)
        counts = aggregate_loki(store, url=srv.url, selector=SEL, start=S, end=E, step="1m",
                                metrics=["requests", "errors_5xx", "authz_denials", "p99_duration_ms"])
        assert counts.log_format == "text"
        want = expected_requests(srv, "text")
        assert stored(store, "requests") == want
        assert stored(store, "errors_5xx") == {k: v for k, v in want.items() if dict(k[0])["status"].startswith("5")}
        denials: Counter[tuple[tuple[tuple[str, str], ...], int]] = Counter()
        for (lb, b), v in want.items():
            d = dict(lb)
            if d["status"] == "403":
                denials[(tuple(sorted({"namespace": d["namespace"], "service": d["service"]}.items())), b)] += v
        assert stored(store, "authz_denials") == dict(denials)
        # p99 per service and bucket, recomputed with Prometheus' quantile on the raw durations
        durs: dict[tuple[tuple[tuple[str, str], ...], int], list[float]] = defaultdict(list)
        for labels, ts, line in srv.holdings("fake", S, E):
            lb = dict(labels)
            key = tuple(sorted({"namespace": lb["namespace"], "service": lb["app"]}.items()))
            durs[(key, bucket(ts))].append(float(TEXT.search(line).group("duration")))
        p99 = stored(store, "p99_duration_ms")
        assert p99.keys() == durs.keys()
        for k, xs in durs.items():
            xs.sort()
            r = 0.99 * (len(xs) - 1)
            lo = math.floor(r)
            assert p99[k] == pytest.approx(xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (r - lo))
        assert counts.samples == sum(len(stored(store, m)) for m in counts.metrics)


def test_json_format_is_detected_and_counted(store: Store) -> None:
    rng = random.Random(2)
    with LokiServer() as srv:
        for app in ("cart", "payments"):
            entries = []
            for i in range(400):
                code = rng.choice([200, 200, 503, 403])
                doc = {"start_time": "2023-11-14T22:13:20.000Z", "method": "GET", "path": f"/p/{i}",
                       "response_code": code if i % 2 else str(code), "response_flags": "UF" if code == 503 else "-",
                       "duration": rng.randrange(1, 500), "authority": f"{app}:80",
                       "upstream_cluster": f"outbound|80||{app}.shop.svc.cluster.local"}
                entries.append((S + 1 + rng.randrange(10 * STEP - 1), json.dumps(doc)))
            srv.push({"namespace": "shop", "app": app, "container": "istio-proxy"}, entries)
        counts = aggregate_loki(store, url=srv.url, selector=SEL, start=S, end=E, metrics=["requests"])
        assert counts.log_format == "json"
        assert stored(store, "requests") == expected_requests(srv, "json")


@pytest.mark.parametrize("limit", ["series", "length"])
def test_splitting_on_loki_limits_gives_the_same_series(store: Store, limit: str) -> None:
    with LokiServer() as ref_srv, LokiServer(**({"max_query_series": 6} if limit == "series"
                                                else {"max_query_length_ns": 3 * STEP})) as srv:
        for s_ in (ref_srv, srv):
            generate(s_, lines=2000, streams=8, start_ns=S + 1, span_ns=10 * STEP - 1, seed=9)
        ref = open_store(":memory:")
        aggregate_loki(ref, url=ref_srv.url, selector=SEL, start=S, end=E, metrics=["requests"], log_format="text")
        counts = aggregate_loki(store, url=srv.url, selector=SEL, start=S, end=E, metrics=["requests"],
                                log_format="text")
        assert stored(store, "requests") == stored(ref, "requests") == expected_requests(srv, "text")
        assert counts.queries > 1
        codes = Counter(r.status for r in srv.query_requests())
        assert codes[400] >= 1 and codes[200] >= 2
        ref.close()


def test_custom_query_is_stored_under_its_name_and_reruns_are_idempotent(store: Store) -> None:
    with LokiServer() as srv:
        generate(srv, lines=500, streams=3, start_ns=S + 1, span_ns=10 * STEP - 1)
        q = 'sum by (app) (count_over_time({container="istio-proxy"} |= "503" [1m]))'
        a = aggregate_loki(store, url=srv.url, query=q, metric_name="lines_with_503", start=S, end=E)
        b = aggregate_loki(store, url=srv.url, query=q, metric_name="lines_with_503", start=S, end=E)
        assert a.samples == b.samples > 0
        assert store.scalar("SELECT count(*) FROM series") == a.samples
        keys = store.con.execute("SELECT DISTINCT map_keys(labels) FROM series").fetchall()
        assert keys == [(["app"],)]
        origin = store.scalar("SELECT DISTINCT origin FROM series")
        assert origin == f"loki:{srv.url}||{q}"


def test_bad_aggregations_fail_clearly(store: Store) -> None:
    with LokiServer() as srv:
        with pytest.raises(QueryError, match="parse error"):
            aggregate_loki(store, url=srv.url, query="sum(count_over_time({a=\"b\"}[1m])", metric_name="x",
                           start=S, end=E)
        with pytest.raises(QueryError, match="metric query"):
            aggregate_loki(store, url=srv.url, query='{a="b"}', metric_name="x", start=S, end=E)
        with pytest.raises(ConfigError, match="unknown metric preset"):
            aggregate_loki(store, url=srv.url, selector=SEL, metrics=["nope"], start=S, end=E, log_format="text")
        with pytest.raises(ConfigError, match="--metric"):
            aggregate_loki(store, url=srv.url, query="sum(x)", start=S, end=E)
