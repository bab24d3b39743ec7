"""Shared plumbing of the analyses (windows, buckets, the failed-request rule, the LLR), plus the
hand-built store helpers the other ``test_analysis_*`` files import.

The hand-built stores are real ingests: Istio default-format access-log lines (client sidecar
``outbound|...`` and server sidecar ``inbound|...`` records, as in the istio.io access-log task) and
Kubernetes audit events, wrapped as logcli ``--output jsonl`` with the proxy's stream labels, written
to a file and ingested with :func:`meshlens.ingest.ingest_files`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshlens.analysis.common import (
    FAILED_SQL,
    Window,
    binom_llr,
    bucket_seconds,
    check_service,
    records,
    resolve_window,
)
from meshlens.errors import ConfigError
from tests.support.mesh import (
    NS,
    T0,
    cached_store,
    incident_mesh,
    open_ro,
)

# ------------------------------------------------------------------------------------------------
# Hand-built stores

# ------------------------------------------------------------------------------------------------
# Tests of meshlens.analysis.common
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_store(tmp_path_factory, "incident", lambda d: incident_mesh().ingest(d))


def test_window_defaults_to_the_traffic_span(small_db: Path) -> None:
    with open_ro(small_db) as store:
        w = resolve_window(store)
        lo, hi = store.con.execute("SELECT min(ts_ns), max(ts_ns) FROM events "
                                   "WHERE record_kind = 'access_log'").fetchone()
        assert (w.lo_ns, w.hi_ns) == (lo, hi + 1)
        assert resolve_window(store, "2024-05-01T08:10:00Z", T0 + 1200).lo_ns == (T0 + 600) * NS
        with pytest.raises(ConfigError, match="empty time range"):
            resolve_window(store, "2024-05-01T09:00:00Z", "2024-05-01T08:00:00Z")
        with pytest.raises(ConfigError, match="start: invalid time"):
            resolve_window(store, "yesterday-ish", None)


def test_unknown_service_is_refused_with_the_known_ones(small_db: Path) -> None:
    with open_ro(small_db) as store:
        w = resolve_window(store)
        assert check_service(store, "ratings", w) == "ratings"
        with pytest.raises(ConfigError, match="received no requests.*frontend"):
            check_service(store, "nosuch", w)
        with pytest.raises(ConfigError, match="not a service name"):
            check_service(store, "x'; drop table events; --", w)


def test_bucket_width_is_nice_and_bounded() -> None:
    assert bucket_seconds(Window(0, 3600 * NS)) == 15
    assert bucket_seconds(Window(0, 12 * 3600 * NS)) == 180
    assert bucket_seconds(Window(0, 60 * NS)) == 10
    assert bucket_seconds(Window(0, 30 * 86400 * NS)) == 21600


@pytest.mark.parametrize("status,flags,decision,failed,grpc", [
    (200, None, None, False, None), (404, None, None, False, None), (503, "UF,URX", None, True, None),
    (404, "NR", None, True, None), (403, None, "deny", True, None), (429, "RL", None, True, None),
    (0, "DC", None, False, None), (0, "UF", None, True, None), (500, None, None, True, None),
    (None, None, None, False, None), (200, "UT", None, True, None),
    (200, None, None, False, 0), (200, None, None, True, 14), (200, None, None, False, 5),  # gRPC under 200
])
def test_failed_request_rule(status, flags, decision, failed, grpc) -> None:
    import duckdb

    con = duckdb.connect()
    got = con.execute(f"SELECT {FAILED_SQL} FROM (SELECT ?::INT AS status, ?::VARCHAR AS response_flags, "
                      "?::VARCHAR AS authz_decision, ?::INT AS grpc_status)",
                      [status, flags, decision, grpc]).fetchall()[0][0]
    assert got is failed


def test_binomial_llr_is_zero_for_equal_rates_and_grows_with_the_difference() -> None:
    assert binom_llr(5, 100, 50, 1000) == pytest.approx(0.0, abs=1e-9)
    weak, strong = binom_llr(10, 100, 50, 1000), binom_llr(40, 100, 50, 1000)
    assert 0 < weak < strong
    assert binom_llr(0, 0, 5, 10) == pytest.approx(0.0)  # empty side: no evidence


def test_records_are_json_friendly() -> None:
    import pandas as pd

    df = pd.DataFrame({"a": [1, None], "t": pd.to_datetime([T0 * NS, T0 * NS], utc=True), "l": [["x"], []]})
    out = records(df)
    assert out[0] == {"a": 1.0, "t": "2024-05-01T08:00:00Z", "l": ["x"]}
    assert out[1]["a"] is None
    json.dumps(out)
