"""Retention, rollups, Parquet archive and the v1 -> v2 store migration."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.dataset as pads
import pytest
import typer
from typer.testing import CliRunner

from meshlens import archive, retention, schema
from meshlens.cli.retention import register
from meshlens.errors import ConfigError, SchemaVersionError, StoreError
from meshlens.filters import DEFAULT_RULES, FilterConfig
from meshlens.ingest import ingest_files
from meshlens.retention import RetentionPolicy, apply_retention, load_policy, policy_from_dict
from meshlens.store import open_store

ROOT = Path(__file__).resolve().parents[2]
# The bundled simulated data covers 2024-05-01 00:00..12:00 UTC. "now" one day later puts the
# events_days=1 cutoff at 06:00, in the middle of the data.
NOW = datetime(2024, 5, 2, 6, 0, tzinfo=UTC)
CUT_NS = int(datetime(2024, 5, 1, 6, 0, tzinfo=UTC).timestamp()) * 10**9


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkout (Istio text) + the API-server audit log, successes sampled at 50% (weights 2.0)."""
    db = tmp_path_factory.mktemp("tpl") / "t.duckdb"
    ingest_files(db, [ROOT / "data/samples/checkout.jsonl.gz", ROOT / "data/samples/kube-apiserver-audit.jsonl.gz"],
                 progress=False, filters=FilterConfig(rules=DEFAULT_RULES, sample_success=0.5))
    return db


@pytest.fixture
def store_path(template: Path, tmp_path: Path) -> Path:
    db = tmp_path / "s.duckdb"
    shutil.copyfile(template, db)
    return db


def _all_rows(con: duckdb.DuckDBPyConnection, table: str) -> pd.DataFrame:
    cols = ", ".join(f'"{c}"' for c in schema.EVENT_COLUMN_NAMES)
    return con.execute(f"SELECT {cols} FROM {table} ORDER BY event_id").df()


# -- migration ------------------------------------------------------------------------------------
def test_v1_store_is_migrated_with_data_intact(store_path: Path) -> None:
    with open_store(store_path) as s:  # turn the store into what meshlens v1 wrote
        s.con.execute("ALTER TABLE events DROP COLUMN sample_weight")
        s.con.execute("ALTER TABLE events DROP COLUMN authn_reason")
        s.con.execute("ALTER TABLE ingest_runs DROP COLUMN filtered")
        s.con.execute("ALTER TABLE ingest_runs DROP COLUMN filtered_by_rule")
        s.con.execute("UPDATE meshlens_meta SET value = '1' WHERE key = 'schema_version'")
        before = s.con.execute("SELECT * FROM events ORDER BY event_id").df()
        runs = s.con.execute("SELECT * FROM ingest_runs").df()
    with pytest.raises(SchemaVersionError, match="meshlens migrate"):
        open_store(store_path, read_only=True)
    with open_store(store_path) as s:
        assert s.schema_version() == 2
        assert [r[0] for r in s.con.execute("DESCRIBE events").fetchall()] == list(schema.EVENT_COLUMN_NAMES)
        after = s.con.execute("SELECT * FROM events ORDER BY event_id").df()
        pd.testing.assert_frame_equal(after[before.columns], before)
        assert set(after.sample_weight) == {1.0} and after.authn_reason.isna().all()
        new_runs = s.con.execute("SELECT * FROM ingest_runs").df()
        pd.testing.assert_frame_equal(new_runs[runs.columns], runs)
        assert new_runs.filtered.tolist() == [0]
        # and it is a working v2 store
        n = ingest_files(s, [ROOT / "data/samples/booksapp.jsonl.gz"], progress=False)
        assert n.stored > 0 and s.scalar("SELECT count(*) FROM events WHERE sample_weight IS NULL") == 0


# -- rollups --------------------------------------------------------------------------------------
def _raw_aggregates(df: pd.DataFrame, step_s: int) -> dict[tuple[Any, ...], float]:
    """The rollup metrics computed independently with pandas from raw events."""
    df = df[df.record_kind == "access_log"].copy()
    df["bucket"] = (df.ts_ns // (step_s * 10**9)) * step_s
    df["w"] = df.sample_weight
    for c in ("dst_service", "dst_namespace", "direction", "mesh"):
        df[c] = df[c].fillna("")
    df["e5"] = df.w * (df.status >= 500)
    df["e4"] = df.w * df.status.between(400, 499)
    df["dz"] = df.w * df.event_type.eq("authz")
    df["ds"] = df.w * df.duration_ms.fillna(0)
    df["dc"] = df.w * df.duration_ms.notna()
    g = df.groupby(["bucket", "dst_service", "dst_namespace", "direction", "mesh"])
    agg = g.agg(requests=("w", "sum"), errors_5xx=("e5", "sum"), errors_4xx=("e4", "sum"),
                authz_denials=("dz", "sum"), duration_ms_sum=("ds", "sum"), duration_ms_count=("dc", "sum"),
                duration_ms_max=("duration_ms", "max"))
    out = {}
    for key, row in agg.iterrows():
        for metric, value in row.items():
            if not pd.isna(value):
                out[(*key, metric)] = float(value)
    return out


def _rollups(con: duckdb.DuckDBPyConnection, step_s: int) -> dict[tuple[Any, ...], float]:
    rows = con.execute("""SELECT CAST(epoch(ts) AS BIGINT), labels['service'], labels['namespace'],
        labels['direction'], labels['mesh'], metric, value FROM series WHERE origin = 'rollup' AND step_s = ?""",
                       [float(step_s)]).fetchall()
    return {tuple(r[:6]): r[6] for r in rows}


def _same(expected: dict[tuple[Any, ...], float], got: dict[tuple[Any, ...], float]) -> None:
    metrics = {k[-1] for k in expected}
    got = {k: v for k, v in got.items() if k[-1] in metrics}
    # zero-valued sums are not stored (missing means 0)
    exp = {k: v for k, v in expected.items() if v != 0 or k[-1] in ("requests", "duration_ms_max")}
    assert len(exp) > 100 and exp == got


def test_rollups_equal_raw_aggregates_exactly(store_path: Path) -> None:
    with open_store(store_path) as s:
        raw = s.con.execute("SELECT * FROM events WHERE ts_ns < ?", [CUT_NS]).df()
        assert len(raw) > 1000 and raw.sample_weight.max() == 2.0  # sampled data: weights matter
        assert (raw.status >= 500).sum() > 0
        rep = apply_retention(s, RetentionPolicy(events_days=1), now=NOW)
        assert rep.events_deleted == len(raw) and rep.events_rolled_up == int((raw.record_kind == "access_log").sum())
        assert s.scalar("SELECT count(*) FROM events WHERE ts_ns < ?", [CUT_NS]) == 0
        minute = _rollups(s.con, 60)
        _same(_raw_aggregates(raw, 60), minute)
        assert rep.minute_series_rows == len(minute)
        # a day later the minute rollups of the morning become hourly ones
        rep2 = apply_retention(s, RetentionPolicy(rollup_minutes_days=1), now=datetime(2024, 5, 2, 7, tzinfo=UTC))
        assert rep2.minute_rows_rolled_to_hours == len(minute) and _rollups(s.con, 60) == {}
        _same(_raw_aggregates(raw, 3600), _rollups(s.con, 3600))
        # rollups merge: rolling the rest (same hours would add up, later hours are new) stays exact
        rest = s.con.execute("SELECT * FROM events").df()
        assert (rest.event_type == "authz").sum() > 0  # the inc-2 denials (09:20-09:55)
        apply_retention(s, RetentionPolicy(events_days=0, rollup_minutes_days=0), now=datetime(2024, 5, 3, tzinfo=UTC))
        _same(_raw_aggregates(pd.concat([raw, rest]), 3600), _rollups(s.con, 3600))


# -- archive --------------------------------------------------------------------------------------
def test_archive_round_trip_attach_gives_the_same_results(store_path: Path, tmp_path: Path) -> None:
    arch = tmp_path / "archive"
    query = """SELECT event_type, dst_service, count(*) n, sum(sample_weight) w, sum(duration_ms) d,
                      count(change_spec) cs, count(labels) l FROM {} GROUP BY ALL ORDER BY ALL"""
    with open_store(store_path) as s:
        full = _all_rows(s.con, "events")
        agg = s.query(query.format("events"))
        rep = apply_retention(s, RetentionPolicy(events_days=1, archive_dir=str(arch)), now=NOW)
        live = s.scalar("SELECT count(*) FROM events")
        assert rep.archived_rows == rep.events_deleted == len(full) - live > 0
        assert sum(rep.archived_by_partition.values()) == rep.archived_rows
        archive.attach(s, arch)
        pd.testing.assert_frame_equal(_all_rows(s.con, "all_events"), full)
        pd.testing.assert_frame_equal(s.query(query.format("all_events")), agg)
        s.publish_snapshot()
    # layout: Hive partitions, readable by any Parquet reader (pyarrow here, like Spark/Trino would)
    parts = {p.relative_to(arch).parent.as_posix() for p in arch.rglob("*.parquet")}
    assert parts == set(rep.archived_by_partition)
    assert all(p.startswith("dt=2024-05-01/event_type=") for p in parts)
    ds = pads.dataset(arch, format="parquet", partitioning="hive")
    assert ds.count_rows() == rep.archived_rows
    assert "event_type" in ds.schema.names and "dt" in ds.schema.names
    # a notebook on the read-only snapshot sees live + archived as one view
    with open_store(store_path, read_only=True) as ro:
        archive.attach(ro, arch)
        pd.testing.assert_frame_equal(ro.query(query.format("all_events")), agg)
    # archive the rest too: no duplicates in the archive, live table empty, same results
    with open_store(store_path) as s:
        rep2 = apply_retention(s, RetentionPolicy(events_days=0, archive_dir=str(arch)),
                               now=datetime(2024, 5, 3, tzinfo=UTC))
        assert rep2.archived_rows == live and rep2.already_archived == 0
        assert s.scalar("SELECT count(*) FROM events") == 0
        archive.attach(s, arch)
        pd.testing.assert_frame_equal(_all_rows(s.con, "all_events"), full)
        assert s.scalar(f"SELECT count(*) - count(DISTINCT event_id) FROM {archive.read_sql(archive.archive_glob(arch))}") == 0


def test_attach_errors_and_empty_archive(store_path: Path, tmp_path: Path) -> None:
    with open_store(store_path) as s:
        with pytest.raises(StoreError, match="not a directory"):
            archive.attach(s, tmp_path / "nope")
        (tmp_path / "empty").mkdir()
        archive.attach(s, tmp_path / "empty")
        assert s.scalar("SELECT count(*) FROM all_events") == s.scalar("SELECT count(*) FROM events")


def test_never_deletes_what_was_not_archived(store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(store_path) as s:
        before = s.scalar("SELECT count(*) FROM events")
        # 1. the archive cannot be written (a file where the directory should be)
        blocker = tmp_path / "archive-is-a-file"
        blocker.write_text("x")
        with pytest.raises((StoreError, duckdb.Error, OSError)):
            apply_retention(s, RetentionPolicy(events_days=1, archive_dir=str(blocker)), now=NOW)
        assert s.scalar("SELECT count(*) FROM events") == before
        # 2. the archive writer "succeeded" but wrote nothing: the read-back check refuses to delete
        monkeypatch.setattr(retention, "_archive", lambda *a, **k: None)
        with pytest.raises(StoreError, match="refusing to delete unarchived events"):
            apply_retention(s, RetentionPolicy(events_days=1, raw_days=1, archive_dir=str(tmp_path / "a")), now=NOW)
        assert s.scalar("SELECT count(*) FROM events") == before
        assert s.scalar("SELECT count(*) FROM series") == 0  # the rollup was rolled back with the rest
        assert s.scalar("SELECT count(*) FROM events WHERE raw IS NULL") == 0
        monkeypatch.undo()
        # 3. an archive file lost after archiving: the events it held are not deleted
        arch = tmp_path / "b"
        rep = apply_retention(s, RetentionPolicy(events_days=1, archive_dir=str(arch)), now=NOW, dry_run=True)
        assert rep.archived_rows > 0 and not arch.exists()  # a dry run writes nothing
        orig_copy = retention._archive

        def archive_then_lose_a_file(con: Any, a: str, *args: Any, **kw: Any) -> None:
            try:
                orig_copy(con, a, *args, **kw)
            finally:
                next(Path(a).rglob("*.parquet")).unlink()

        monkeypatch.setattr(retention, "_archive", archive_then_lose_a_file)
        with pytest.raises(StoreError):
            apply_retention(s, RetentionPolicy(events_days=1, archive_dir=str(arch)), now=NOW)
        assert s.scalar("SELECT count(*) FROM events") == before


def test_raw_nulling_dry_run_and_idempotence(store_path: Path, tmp_path: Path) -> None:
    policy = RetentionPolicy(raw_days=1.25, events_days=1.5, archive_dir=str(tmp_path / "a"))
    now = datetime(2024, 5, 2, 12, tzinfo=UTC)  # events before 00:00 deleted (none), raw NULLed before 06:00
    with open_store(store_path) as s:
        snapshot = _all_rows(s.con, "events")
        dry = apply_retention(s, policy, now=now, dry_run=True)
        pd.testing.assert_frame_equal(_all_rows(s.con, "events"), snapshot)
        real = apply_retention(s, policy, now=now)
        assert dry.raw_nulled == real.raw_nulled == int((snapshot.ts_ns < CUT_NS).sum()) > 0
        assert dry.events_deleted == real.events_deleted == 0
        after = _all_rows(s.con, "events")
        assert after[after.ts_ns < CUT_NS].raw.isna().all() and after[after.ts_ns >= CUT_NS].raw.notna().all()
        pd.testing.assert_frame_equal(after.drop(columns="raw"), snapshot.drop(columns="raw"))
        again = apply_retention(s, policy, now=now)
        assert (again.raw_nulled, again.events_deleted, again.archived_rows) == (0, 0, 0)


def test_policy_files_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('raw_days = 7\nevents_days = 30\narchive_dir = "/data/archive"\n')
    assert load_policy(p) == RetentionPolicy(raw_days=7, events_days=30, archive_dir="/data/archive")
    for data, msg in [({"events_day": 3}, "unknown key"), ({"events_days": -1}, "days >= 0"),
                      ({"rollup": "yes", "events_days": 1}, "rollup"), ({}, "does nothing"),
                      ({"events_days": 1, "archive_dir": ""}, "archive_dir"),
                      ({"raw_days": 1, "archive_dir": "/a"}, "events_days is not")]:
        with pytest.raises(ConfigError, match=msg):
            policy_from_dict(data)


def test_cli_retention_apply_and_archive_query(store_path: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    arch = tmp_path / "arch"
    pol = tmp_path / "policy.yaml"
    pol.write_text(f"events_days: 30\nraw_days: 7\narchive_dir: {arch}\n")  # everything (2024) is older
    runner = CliRunner()
    with open_store(store_path) as s:
        total = s.scalar("SELECT count(*) FROM events")
    res = runner.invoke(app, ["retention", "apply", "--db", str(store_path), "--policy", str(pol), "--json",
                              "--dry-run"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["archived_rows"] == total and not arch.exists()
    res = runner.invoke(app, ["retention", "apply", "--db", str(store_path), "--policy", str(pol)])
    assert res.exit_code == 0, res.output
    assert f"{total} events did archive" in res.output and f"deleted: {total} events" in res.output
    res = runner.invoke(app, ["archive", "query", "--db", str(store_path), "--archive", str(arch), "--json",
                              "SELECT count(*) AS n, count(*) FILTER (WHERE raw IS NOT NULL) AS r FROM all_events"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == [{"n": total, "r": total}]  # archived before raw was NULLed
