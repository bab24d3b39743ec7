"""Store: schema versioning, read-only snapshot opens, watermarks, series upserts."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from meshlens import schema
from meshlens.errors import SchemaVersionError, StoreError
from meshlens.store import open_store, snapshot_path


def test_new_store_has_current_schema(db: Path) -> None:
    with open_store(db) as s:
        assert s.schema_version() == schema.SCHEMA_VERSION
        cols = [r[0] for r in s.con.execute("DESCRIBE events").fetchall()]
    assert cols == list(schema.EVENT_COLUMN_NAMES)


def test_newer_store_is_refused(db: Path) -> None:
    with open_store(db) as s:
        s.con.execute("UPDATE meshlens_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="newer than this meshlens"):
        open_store(db)


def test_foreign_duckdb_file_is_refused(db: Path) -> None:
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE something (x INT)")
    con.close()
    with pytest.raises(SchemaVersionError, match="not created by meshlens"):
        open_store(db)


def test_older_store_is_migrated_on_rw_open_and_explained_on_ro_open(db: Path) -> None:
    with open_store(db) as s:
        s.con.execute("UPDATE meshlens_meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="meshlens migrate"):
        open_store(db, read_only=True)
    with open_store(db) as s:  # migrating again is safe: CREATE IF NOT EXISTS
        assert s.schema_version() == schema.SCHEMA_VERSION


def test_readers_use_the_snapshot_while_a_writer_holds_the_file(db: Path) -> None:
    writer = open_store(db)
    writer.set_watermark("k", {"v": 1})
    writer.publish_snapshot()
    writer.set_watermark("k", {"v": 2})  # not yet published
    reader = open_store(db, read_only=True)  # would fail on the locked file; uses the snapshot
    assert reader.get_watermark("k") == {"v": 1}
    reader.close()
    writer.publish_snapshot()
    with open_store(db, read_only=True) as r2:
        assert r2.get_watermark("k") == {"v": 2}
    writer.close()
    assert snapshot_path(db).exists()


def test_read_only_store_refuses_writes_and_missing_store_is_clear(db: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.duckdb", read_only=True)
    open_store(db).close()
    with open_store(db, read_only=True) as r, pytest.raises(StoreError, match="read-only"):
        r.set_watermark("x", {})


def test_series_upsert_replaces_same_key_and_ts(db: Path) -> None:
    row = {"series_key": "k1", "ts": pd.Timestamp("2024-05-01T10:00:00Z"), "metric": "requests",
           "labels": [("service", "reviews")], "value": 1.0, "step_s": 60.0, "origin": "test"}
    with open_store(db) as s:
        s.upsert_series(pd.DataFrame([row]))
        s.upsert_series(pd.DataFrame([{**row, "value": 5.0}]))
        assert s.query("SELECT value, labels['service'] AS svc FROM series").values.tolist() == [[5.0, "reviews"]]


def test_schema_doc_is_in_sync() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "schema.md"
    assert doc.read_text() == schema.markdown() + "\n", "regenerate: meshlens schema --markdown > docs/schema.md"
