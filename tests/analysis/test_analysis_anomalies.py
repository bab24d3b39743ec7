"""Anomalies: robust scores for sparse counts, change points, seasonality, and the categorical checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meshlens.analysis import anomalies
from meshlens.analysis.common import Window
from tests.support.mesh import NS, T0, Mesh, cached_store, incident_mesh, open_ro, request

ONSET = T0 + 25 * 60


@pytest.fixture(scope="module")
def errors_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "incident", lambda d: incident_mesh().ingest(d))


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quiet first quarter, then: a new edge, a newcomer on /admin, plaintext calls to a service that
    always used mTLS, and a caller newly denied by a policy."""
    def build(d: Path) -> Path:
        m = Mesh()
        for i in range(400):
            request(m, T0 + i * 6, f"q-{i:04d}")
        for i in range(30):
            ts = T0 + 1500 + i * 20
            m.hop(ts, "frontend", "legacy", f"n-{i}", path="/v0/old")
            m.hop(ts + 1, "admin", "ratings", f"a-{i}", path="/admin/flush", method="POST")
            m.hop(ts + 2, "reviews", "ratings", f"p-{i}", path="/ratings/1", mtls=False)
            m.hop(ts + 3, "legacy", "ratings", f"d-{i}", path="/ratings/2", code=403, details="via_upstream",
                  server_code=403, server_details="rbac_access_denied_matched_policy[ns[shop]-policy[deny-legacy]-rule[0]]")
        return m.ingest(d)

    return cached_store(tmp_path_factory, "anomalies-audit", build)


# -- scoring building blocks --------------------------------------------------------------------------


def test_best_segment_finds_the_sustained_excursion() -> None:
    z = np.zeros((2, 50))
    z[0, 20:31] = 5.0
    z[0, 40] = 3.0  # a lone blip after it must not extend the segment
    start, end, best = anomalies._best_segment(z)
    assert (start[0], end[0]) == (20, 30) and best[0] == pytest.approx(11 * (5 - anomalies.K))
    assert best[1] <= 0  # nothing in the flat row


def test_anscombe_scores_sparse_counts_sensibly() -> None:
    assert anomalies._anscombe(np.array(3.0), np.array(3.0)) == pytest.approx(0.0)
    one_in_sparse = float(anomalies._anscombe(np.array(1.0), np.array(0.06)))
    ten_in_sparse = float(anomalies._anscombe(np.array(10.0), np.array(0.3)))
    assert one_in_sparse < 2.0 < 4.0 < ten_in_sparse  # a single stray error is not an anomaly, ten are


def test_count_change_point_on_sparse_buckets() -> None:
    """Five requests per bucket: no single bucket is conclusive, the interval is."""
    rng = np.random.default_rng(3)
    n = np.full((3, 240), 5.0)
    k = np.zeros((3, 240))
    k[0] = rng.binomial(5, np.where(np.arange(240) >= 150, 0.5, 0.002))  # errors from bucket 150 on
    k[1] = rng.binomial(5, 0.33, 240)  # a service that always fails a third of its calls
    k[2] = rng.binomial(5, np.where((np.arange(240) >= 40) & (np.arange(240) < 60), 0.6, 0.0))
    a, b, llr, p_in, p_out = anomalies._epidemic_rows(k, n)
    assert abs(a[0] - 150) <= 2 and b[0] == 239 and llr[0] > 100 and p_in[0] > 0.4 and p_out[0] < 0.01
    assert llr[1] < anomalies.MIN_LLR  # its normal, however loud
    assert (a[2], b[2]) == (40, 59) or (abs(a[2] - 40) <= 1 and abs(b[2] - 59) <= 1)


def test_percentiles_from_the_latency_histogram() -> None:
    ms = np.array([10.0] * 50 + [20.0] * 49 + [500.0])
    bins = np.round(np.log1p(ms) * anomalies.LAT_BINS_PER_E).astype(int)
    h = pd.DataFrame({"k": "a", "bin": bins, "requests": 1})
    p = anomalies._percentiles(h, ["k"]).iloc[0]
    assert p["p50_ms"] == pytest.approx(10, rel=0.08)
    assert p["p99_ms"] == pytest.approx(20, rel=0.08)


def test_daily_pattern_is_not_an_anomaly_but_a_drop_is() -> None:
    """Three days of traffic following the same daily curve: with seasonal baselines nothing but the
    planted drop (an outage in the afternoon of day three) is flagged."""
    width = 600
    buckets = T0 * NS + np.arange(3 * 144, dtype=np.int64) * width * NS
    hour = (np.arange(len(buckets)) * width / 3600) % 24
    rng = np.random.default_rng(5)
    lam = 60 * (1 + 0.8 * np.sin(2 * np.pi * hour / 24))
    req = rng.poisson(lam).astype(float)
    req[2 * 144 + 90:2 * 144 + 96] = 2  # one hour almost empty
    df = pd.DataFrame({"bucket_ns": buckets, "scope": "mesh", "target": "mesh", "namespace": None,
                       "requests": req, "errors_5xx": 0.0, "errors_4xx": 0.0, "denials": 0.0, "tls_failures": 0.0,
                       "p50_ms": 20.0, "p99_ms": 80.0})
    w = Window(int(buckets[0]), int(buckets[-1]) + width * NS)
    found = anomalies._score_series(df, w, width, 1800)
    assert len(found) == 1
    hit = found.iloc[0]
    assert (hit["metric"], hit["direction"]) == ("requests", "down")
    assert abs(hit["onset_ns"] - buckets[2 * 144 + 90]) <= width * NS


# -- on stores ----------------------------------------------------------------------------------------


def test_error_incident_shows_at_the_failing_service_and_not_at_the_noisy_one(errors_db: Path) -> None:
    with open_ro(errors_db) as store:
        df = anomalies.detect_anomalies(store, T0, T0 + 40 * 60)
    errs = df[(df["metric"] == "errors_5xx") & (df["kind"] == "metric")]
    ratings = errs[(errs["scope"] == "service") & (errs["target"] == "ratings")]
    assert len(ratings) == 1
    r = ratings.iloc[0]
    assert abs(r["onset"].value / NS - ONSET) <= 60 and r["observed"] > 0.4 and r["baseline"] < 0.01
    assert "rose from" in r["evidence"][0]
    assert set(errs["target"]) >= {"ratings", "reviews", "frontend", "mesh"}  # and where it propagates
    # ads fails a third of its calls all along: that is its normal, not an anomaly
    assert "ads" not in set(errs["target"]) and "frontend->ads" not in set(errs["target"])
    # an edge with the same anomaly as its callee is one finding, reported once (as the service)
    assert "reviews->ratings" not in set(errs["target"])
    assert list(df["rank"]) == list(range(1, len(df) + 1))
    assert (df["score"].diff().dropna() <= 0).all()


def test_categorical_anomalies(audit_db: Path) -> None:
    with open_ro(audit_db) as store:
        df = anomalies.detect_anomalies(store)
    cat = df[df["kind"] == "categorical"].set_index(["metric", "target"])
    assert ("new_edge", "frontend->legacy") in cat.index
    assert ("new_edge", "frontend->ads") not in cat.index  # seen in the reference quarter
    sens = cat.loc[("new_sensitive_caller", "ratings")]
    assert "shop/admin reached /admin on ratings (30 requests" in sens["evidence"][0]
    plain = cat.loc[("plaintext", "ratings")]
    assert plain["observed"] == 30 and "100.0% of its traffic used mTLS" in plain["evidence"][0]
    den = cat.loc[("new_denied_caller", "legacy->ratings")]
    assert den["observed"] == 30 and "ns[shop]-policy[deny-legacy]-rule[0]" in den["evidence"][0]
    assert "first quarter of the window" in den["evidence"][0]


def test_custom_sensitive_paths_and_json(audit_db: Path) -> None:
    with open_ro(audit_db) as store:
        df = anomalies.detect_anomalies(store, sensitive_paths=["/v0"], categorical=True)
        items = anomalies.anomalies_json(df)
        none = anomalies.detect_anomalies(store, categorical=False, min_score=1e9)
    targets = {(i["metric"], i["target"]) for i in items}
    assert ("new_sensitive_caller", "legacy") in targets and ("new_sensitive_caller", "ratings") not in targets
    json.dumps(items)
    assert {"rank", "kind", "scope", "target", "namespace", "metric", "onset", "score", "evidence"} <= set(items[0])
    assert none.empty and list(none.columns) == anomalies.ANOMALY_COLUMNS


def test_metric_series_for_charts(errors_db: Path) -> None:
    with open_ro(errors_db) as store:
        s = anomalies.metric_series(store, T0, T0 + 40 * 60, bucket_s=60)
    ratings = s[(s["scope"] == "service") & (s["target"] == "ratings")]
    assert ratings["requests"].sum() == 40 * 30
    assert ratings["ts"].dt.tz is not None and len(ratings) == 40
    late = ratings[ratings["bucket_ns"] >= ONSET * NS]["errors_5xx"].sum()
    assert late == 15 * 15


def test_authn_failures_are_an_anomaly_metric(tmp_path: Path) -> None:
    """JWT denials starting mid-window at one service show up as an authn anomaly there (issue 8)."""
    import json

    from meshlens.analysis.anomalies import detect_anomalies
    from meshlens.ingest import ingest_files
    from meshlens.store import open_store

    out = ('[{ts}] "GET /api/orders HTTP/1.1" {code} - via_upstream - "-" 0 120 3 2 "-" "curl/8" "r{i}" '
           '"orders:8080" "10.0.0.5:8080" outbound|8080||orders.shop.svc.cluster.local 10.0.0.9:4{i:04d} '
           '10.96.0.5:8080 10.0.0.9:5{i:04d} - default')
    inn_ok = ('[{ts}] "GET /api/orders HTTP/1.1" 200 - via_upstream - "-" 0 120 2 1 "-" "curl/8" "r{i}" '
              '"orders:8080" "127.0.0.1:8080" inbound|8080|| 127.0.0.1:4000 10.0.0.5:8080 10.0.0.9:4{i:04d} '
              'outbound_.8080_._.orders.shop.svc.cluster.local default')
    inn_bad = ('[{ts}] "GET /api/orders HTTP/1.1" 401 - jwt_authn_access_denied{{Jwt_is_expired}} - "-" 0 14 1 - '
               '"-" "curl/8" "r{i}" "orders:8080" "-" inbound|8080|| - 10.0.0.5:8080 10.0.0.9:4{i:04d} '
               'outbound_.8080_._.orders.shop.svc.cluster.local -')
    web = {"namespace": "shop", "app": "web", "pod": "web-5d8f7b9c4d-abcde", "container": "istio-proxy"}
    orders = {"namespace": "shop", "app": "orders", "pod": "orders-6c9d8b7f5e-fghij", "container": "istio-proxy"}
    recs = []
    for i in range(3600):  # one request per second for an hour; a third JWT-denied after 40 minutes
        ts = f"2024-05-01T10:{i // 60:02d}:{i % 60:02d}.000Z"
        denied = i >= 2400 and i % 3 == 0
        recs.append({"labels": web, "line": out.format(ts=ts, i=i, code=401 if denied else 200), "timestamp": ts})
        recs.append({"labels": orders, "line": (inn_bad if denied else inn_ok).format(ts=ts, i=i), "timestamp": ts})
    f = tmp_path / "export.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ingest_files(tmp_path / "s.duckdb", [f], progress=False)
    with open_store(tmp_path / "s.duckdb", read_only=True) as store:
        found = detect_anomalies(store)
    hits = found[(found.metric == "authn_failures") & (found.target == "orders")]
    assert len(hits) >= 1, found[["metric", "scope", "target"]].to_string()
    import pandas as pd

    onset = pd.Timestamp(hits.iloc[0].onset)
    assert pd.Timestamp("2024-05-01T10:35:00Z") <= onset <= pd.Timestamp("2024-05-01T10:45:00Z"), onset
