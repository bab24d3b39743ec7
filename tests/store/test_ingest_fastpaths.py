"""The ingest speed paths keep every guarantee: exact batch sizes, identity of repeated records with and
without source positions, zstd-compressed raw text, filters that never copy rows."""

from __future__ import annotations

from pathlib import Path

from meshlens.filters import FilterConfig, Rule
from meshlens.ingest import ingest_batches, ingest_files
from meshlens.records import RawBatch
from meshlens.sources.files import read_file
from meshlens.store import open_store

LINE = ('[2020-11-25T21:26:18.409Z] "GET /status/418 HTTP/1.1" 418 - via_upstream - "-" 0 135 4 4 "-" '
        '"curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000" "10.44.1.27:80" '
        'outbound|8000||httpbin.foo.svc.cluster.local 10.44.1.23:37652 10.0.45.184:8000 10.44.1.23:46520 - default')


def _line(i: int) -> str:
    return LINE.replace("84961386", f"{i:08d}")


def test_plain_file_batches_have_exactly_batch_size_records(tmp_path: Path) -> None:
    f = tmp_path / "a.log"
    lines = [_line(i) for i in range(1000)]
    f.write_text("\n".join(lines) + "\n")
    batches = list(read_file(f, batch_size=64))
    assert [len(b) for b in batches] == [64] * 15 + [40]
    assert [t for b in batches for t in b.texts()] == lines
    assert [p for b in batches for p in b.position_list()] == [str(i) for i in range(1, 1001)]


def test_records_repeated_without_positions_are_numbered_not_collapsed(tmp_path: Path) -> None:
    """A logcli export can hold one (labels, timestamp, line) twice: both are events, and re-ingesting
    the same batch adds nothing (the occurrence number is part of the id)."""
    labels = {"namespace": "foo", "pod": "httpbin-1", "container": "istio-proxy"}

    def batch() -> RawBatch:
        return RawBatch(source="logcli:x", lines=[LINE, LINE, _line(2)], ts_ns=[1, 1, 1],
                        labels=[labels, labels, labels], positions=["", "", ""])

    with open_store(tmp_path / "s.duckdb") as store:
        first = ingest_batches(store, [batch()], source="t", progress=False)
        again = ingest_batches(store, [batch()], source="t", progress=False)
        ids = store.con.execute("SELECT count(DISTINCT event_id) FROM events").fetchall()[0][0]
    assert (first.stored, first.duplicates) == (3, 0)
    assert (again.stored, again.duplicates) == (0, 3)
    assert ids == 3


def test_repeated_positions_from_a_faulty_source_still_keep_both_records(tmp_path: Path) -> None:
    """A source promising unique positions but repeating one: identity falls back to the full key
    (stream, time, line, position) plus the occurrence, so nothing is collapsed."""
    b = RawBatch(source="x", lines=[LINE, LINE], ts_ns=[None, None], labels=[None, None],
                 positions=["7", "7"], identity_positions=True)
    with open_store(tmp_path / "s.duckdb") as store:
        c = ingest_batches(store, [b], source="t", progress=False)
    assert (c.stored, c.duplicates) == (2, 0)


def test_raw_text_is_stored_zstd_compressed(tmp_path: Path) -> None:
    f = tmp_path / "a.log"
    f.write_text("\n".join(_line(i) for i in range(3000)) + "\n")
    db = tmp_path / "s.duckdb"
    ingest_files(db, [f], progress=False)
    with open_store(db) as store:
        store.con.execute("CHECKPOINT")
        comp = {r[0] for r in store.con.execute(
            "SELECT DISTINCT compression FROM pragma_storage_info('events') WHERE column_name = 'raw' "
            "AND segment_type = 'VARCHAR'").fetchall()}
        raw = store.con.execute("SELECT raw FROM events ORDER BY position::INT LIMIT 1").fetchall()[0][0]
    assert comp == {"ZSTD"}
    assert raw == _line(0)


def test_filters_drop_exactly_the_matching_rows_and_keep_every_column(tmp_path: Path) -> None:
    f = tmp_path / "a.log"
    lines = [_line(i) if i % 3 else _line(i).replace("/status/418", "/healthz") for i in range(300)]
    f.write_text("\n".join(lines) + "\n")
    db = tmp_path / "s.duckdb"
    cfg = FilterConfig(rules=(Rule("health", path=("/healthz",), keep_failures=False),))
    c = ingest_files(db, [f], progress=False, filters=cfg)
    assert (c.read, c.stored, c.filtered, c.filtered_by_rule) == (300, 200, 100, {"health": 100})
    with open_store(db, read_only=True) as store:
        rows = store.con.execute("SELECT count(*), count(DISTINCT position), min(path), max(path), "
                                 "count(raw), count(event_id), min(sample_weight) FROM events").fetchall()[0]
    assert rows == (200, 200, "/status/418", "/status/418", 200, 200, 1.0)
