"""The Nezha harness renders trace spans as the sidecar records meshlens ingests (benchmarks/nezha.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import nezha  # noqa: E402

from meshlens.ingest import ingest_files  # noqa: E402
from meshlens.store import open_store  # noqa: E402

T = 1_661_140_000_000_000_000


def _spans() -> pd.DataFrame:
    """One request: the load generator hits frontend (root span), frontend calls cart (client span,
    12 ms), cart serves it (server span, 4 ms) and runs an internal span (not sidecar traffic)."""
    rows = [
        ("t1", "s1", "root", "frontend-579b9bff58-t2dbm", "hipstershop.Frontend/Recv.", T, T + 30_000_000, 30_000),
        ("t1", "s2", "s1", "frontend-579b9bff58-t2dbm", "hipstershop.CartService/GetCart", T + 1_000_000,
         T + 13_000_000, 12_000),
        ("t1", "s3", "s2", "cartservice-579f59597d-wc2lz", "hipstershop.CartService/GetCart", T + 3_000_000,
         T + 7_000_000, 4_000),
        ("t1", "s4", "s3", "cartservice-579f59597d-wc2lz", "redis.get", T + 4_000_000, T + 5_000_000, 1_000),
    ]
    return pd.DataFrame(rows, columns=["TraceID", "SpanID", "ParentID", "PodName", "OperationName",
                                       "StartTimeUnixNano", "EndTimeUnixNano", "Duration"])


def test_spans_become_a_client_and_a_server_record_per_rpc(tmp_path: Path) -> None:
    recs = nezha.rpc_records(_spans())
    assert len(recs) == 3  # entry inbound, frontend outbound, cart inbound; the internal span is dropped
    files = nezha.render(recs, tmp_path / "logs")
    ingest_files(str(tmp_path / "s.duckdb"), [str(f) for f in files], progress=False)
    with open_store(str(tmp_path / "s.duckdb"), read_only=True) as store:
        ev = store.query("SELECT direction, src_workload, dst_service, path, duration_ms, status, request_id "
                         "FROM events ORDER BY ts_ns, direction")
    rows = {(r.direction, r.dst_service): r for r in ev.itertuples(index=False)}
    assert set(rows) == {("inbound", "frontend"), ("outbound", "cartservice"), ("inbound", "cartservice")}
    assert rows[("outbound", "cartservice")].src_workload == "frontend"
    assert rows[("outbound", "cartservice")].duration_ms == 12 and rows[("inbound", "cartservice")].duration_ms == 4
    assert rows[("inbound", "frontend")].duration_ms == 30
    assert set(ev["status"]) == {200} and set(ev["request_id"]) == {"t1"}
    assert rows[("inbound", "cartservice")].path == "/hipstershop.CartService/GetCart"


def test_service_names_and_coverage() -> None:
    assert nezha.service_of("productcatalogservice-668d5f85fb-wckp8") == "productcatalogservice"
    recs = nezha.rpc_records(_spans())
    assert not nezha.coverage(recs, T + 10_000_000)[0]  # 10 ms on each side is no case
