"""Retention: thin raw text, roll old request events up into ``series``, archive to Parquet, delete.

Why: audit logs must be kept for compliance but the store must stay small and fast. A policy (YAML or
TOML file) says how long each thing lives::

    raw_days: 7                 # after 7 days events.raw is set to NULL (the parsed columns stay)
    events_days: 30             # after 30 days events are deleted (after archive + rollup)
    rollup: true                # roll deleted access-log events up into per-minute series (default true)
    rollup_minutes_days: 90     # per-minute rollups older than 90 days become per-hour
    archive_dir: /data/archive  # optional: Parquet archive (dt=YYYY-MM-DD/event_type=X); s3://... works
                                # with DuckDB's httpfs extension and a DuckDB secret

Order and safety (:func:`apply_retention`):

1. events older than ``events_days`` not yet in the archive are written to it (``COPY ... PARTITION_BY``),
   then the archive is *read back*: the rows of this run's files must equal what was written, and every
   event about to be deleted must be found in the archive by ``event_id``. If not, nothing is deleted
   and :class:`~meshlens.errors.StoreError` is raised. Without ``archive_dir`` deletion is allowed (the
   policy said so); with it, nothing unarchived is ever deleted.
2. in one transaction: the access-log events to be deleted are rolled up into per-minute series (sums,
   so they are exact and merge with earlier rollups of the same minute), they are deleted, old
   ``raw`` text is NULLed, and per-minute rollups past ``rollup_minutes_days`` become per-hour ones.

Rollup series (``origin = 'rollup'``, labels ``service``, ``namespace``, ``direction``, ``mesh``):
``requests``, ``errors_4xx``, ``errors_5xx``, ``authz_denials``, ``authn_failures``, ``tls_failures``
(all ``sum(sample_weight)``), ``duration_ms_sum`` and ``duration_ms_count`` (mean = sum / count),
``duration_ms_max``, ``bytes_sent``, ``bytes_received``. A zero-valued sum is not stored (missing
means 0; ``requests`` is always stored). Percentiles cannot be rolled up exactly and are not stored.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from meshlens import archive as arch_mod
from meshlens.errors import ConfigError, StoreError
from meshlens.filters import read_config_file
from meshlens.store import Store

_POLICY_KEYS = ("raw_days", "events_days", "rollup", "rollup_minutes_days", "archive_dir")
MINUTE_S = 60
HOUR_S = 3600
NS = 1_000_000_000

# metric -> (aggregate over events `e` with weight `w`, how two partial values of a bucket combine)
ROLLUP_METRICS: dict[str, tuple[str, str]] = {
    "requests": ("sum(w)", "sum"),
    "errors_4xx": ("coalesce(sum(w) FILTER (WHERE status BETWEEN 400 AND 499), 0)", "sum"),
    "errors_5xx": ("coalesce(sum(w) FILTER (WHERE status >= 500), 0)", "sum"),
    "authz_denials": ("coalesce(sum(w) FILTER (WHERE event_type = 'authz'), 0)", "sum"),
    "authn_failures": ("coalesce(sum(w) FILTER (WHERE event_type = 'authn'), 0)", "sum"),
    "tls_failures": ("coalesce(sum(w) FILTER (WHERE event_type = 'tls'), 0)", "sum"),
    "duration_ms_sum": ("coalesce(sum(w * duration_ms), 0)", "sum"),
    "duration_ms_count": ("coalesce(sum(w) FILTER (WHERE duration_ms IS NOT NULL), 0)", "sum"),
    "duration_ms_max": ("max(duration_ms)", "max"),
    "bytes_sent": ("coalesce(sum(w * bytes_sent), 0)", "sum"),
    "bytes_received": ("coalesce(sum(w * bytes_received), 0)", "sum"),
}
# Zero-valued sums are not stored (a missing sample of these metrics means 0); `requests` always is,
# so every bucket that had traffic has a row.
_ZERO_DROPPABLE = ", ".join(f"'{m}'" for m, (_, how) in ROLLUP_METRICS.items() if how == "sum" and m != "requests")
LABELS_SQL = ("MAP {'service': coalesce(dst_service, ''), 'namespace': coalesce(dst_namespace, ''), "
              "'direction': coalesce(direction, ''), 'mesh': coalesce(mesh, '')}")
SERIES_KEY_SQL = "md5(concat_ws(chr(31), 'rollup', CAST(step_s AS VARCHAR), metric, CAST(labels AS VARCHAR)))"


@dataclass(frozen=True)
class RetentionPolicy:
    raw_days: float | None = None
    events_days: float | None = None
    rollup: bool = True
    rollup_minutes_days: float | None = None
    archive_dir: str | None = None


@dataclass
class RetentionReport:
    """What one retention run did (or, with ``dry_run``, would do)."""

    dry_run: bool
    now: str
    events_cutoff: str | None = None
    raw_cutoff: str | None = None
    hour_rollup_cutoff: str | None = None
    raw_nulled: int = 0
    events_deleted: int = 0
    events_rolled_up: int = 0
    minute_series_rows: int = 0
    hour_series_rows: int = 0
    minute_rows_rolled_to_hours: int = 0
    archived_rows: int = 0
    already_archived: int = 0
    archive_files: list[str] = field(default_factory=list)
    archived_by_partition: dict[str, int] = field(default_factory=dict)
    archive_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        verb = "would" if self.dry_run else "did"
        lines = [f"retention ({'dry run' if self.dry_run else 'applied'}, now {self.now}):"]
        if self.archive_dir:
            lines.append(f"  archive {self.archive_dir}: {self.archived_rows} events {verb} archive in "
                         f"{len(self.archived_by_partition)} partitions ({self.already_archived} already archived)")
        lines.append(f"  rollup: {self.events_rolled_up} access-log events -> {self.minute_series_rows} per-minute "
                     f"series rows; {self.minute_rows_rolled_to_hours} per-minute rows -> "
                     f"{self.hour_series_rows} per-hour rows")
        lines.append(f"  deleted: {self.events_deleted} events older than {self.events_cutoff or '(never)'}")
        lines.append(f"  raw text NULLed: {self.raw_nulled} events older than {self.raw_cutoff or '(never)'}")
        return "\n".join(lines)


def _days(data: dict[str, Any], key: str, where: str) -> float | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ConfigError(f"{where}: {key} must be a number of days >= 0, got {v!r}")
    return float(v)


def policy_from_dict(data: dict[str, Any], where: str = "retention policy") -> RetentionPolicy:
    unknown = set(data) - set(_POLICY_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(_POLICY_KEYS)}")
    rollup = data.get("rollup", True)
    if not isinstance(rollup, bool):
        raise ConfigError(f"{where}: rollup must be true or false, got {rollup!r}")
    arch = data.get("archive_dir")
    if arch is not None and (not isinstance(arch, str) or not arch.strip()):
        raise ConfigError(f"{where}: archive_dir must be a directory path or URL, got {arch!r}")
    policy = RetentionPolicy(raw_days=_days(data, "raw_days", where), events_days=_days(data, "events_days", where),
                             rollup=rollup, rollup_minutes_days=_days(data, "rollup_minutes_days", where),
                             archive_dir=arch)
    if arch is not None and policy.events_days is None:
        raise ConfigError(f"{where}: archive_dir is set but events_days is not; events are archived when they "
                          "expire, so set events_days (e.g. 30)")
    if policy == RetentionPolicy(rollup=rollup):
        raise ConfigError(f"{where}: the policy does nothing; set at least one of raw_days, events_days, "
                          "rollup_minutes_days")
    return policy


def load_policy(path: str | Path) -> RetentionPolicy:
    return policy_from_dict(read_config_file(path), where=str(path))


def _cutoff_ns(now: datetime, days: float | None, align_s: int) -> int | None:
    """``now - days`` in ns, floored to ``align_s`` so a bucket is never split between two runs."""
    if days is None:
        return None
    t = int((now - timedelta(days=days)).timestamp())
    return (t // align_s) * align_s * NS


def _iso(ns: int | None) -> str | None:
    return None if ns is None else datetime.fromtimestamp(ns / NS, UTC).isoformat()


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    return con.execute(sql, params or []).fetchall()[0][0]


# -- archive --------------------------------------------------------------------------------------
def _archive(con: duckdb.DuckDBPyConnection, arch: str, cutoff: int, report: RetentionReport,
             dry_run: bool) -> None:
    """Write events older than ``cutoff`` that are not yet archived, then verify the archive holds them all."""
    exists = arch_mod.has_files(con, arch)
    archived_ids = (f"SELECT event_id FROM {arch_mod.read_sql(arch_mod.archive_glob(arch))}" if exists
                    else "SELECT NULL::VARCHAR AS event_id WHERE false")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _ml_to_archive AS
        SELECT e.*, CAST(make_timestamp(e.ts_ns // 1000) AS DATE) AS dt FROM events e
        WHERE e.ts_ns < $cutoff AND NOT EXISTS (SELECT 1 FROM ({archived_ids}) a WHERE a.event_id = e.event_id)""",
                {"cutoff": cutoff})
    try:
        n = int(_scalar(con, "SELECT count(*) FROM _ml_to_archive"))
        report.archived_rows = n
        report.already_archived = int(_scalar(con, "SELECT count(*) FROM events WHERE ts_ns < ?", [cutoff])) - n
        report.archived_by_partition = {
            f"dt={d}/event_type={t}": int(c) for d, t, c in con.execute(
                "SELECT dt, event_type, count(*) FROM _ml_to_archive GROUP BY ALL ORDER BY ALL").fetchall()}
        if dry_run or n == 0:
            return
        if not arch_mod.is_remote(arch):
            Path(arch).mkdir(parents=True, exist_ok=True)
        run = uuid.uuid4().hex[:12]
        target = arch.rstrip("/")
        con.execute(f"COPY (SELECT * FROM _ml_to_archive ORDER BY dt, event_type, ts_ns) TO {arch_mod._lit(target)} "
                    f"(FORMAT PARQUET, PARTITION_BY (dt, event_type), FILENAME_PATTERN 'meshlens_{run}_{{uuid}}', "
                    "APPEND)")
        written = f"{target}/**/meshlens_{run}_*.parquet"
        report.archive_files = sorted(r[0] for r in con.execute("SELECT file FROM glob(?)", [written]).fetchall())
        back = con.execute(f"""SELECT count(*), count(DISTINCT event_id),
                count(*) FILTER (WHERE event_id NOT IN (SELECT event_id FROM _ml_to_archive))
            FROM {arch_mod.read_sql(written)}""").fetchall()[0]
        if back[0] != n or back[1] != n or back[2] != 0:
            raise StoreError(f"archive verification failed in {arch}: wrote {n} events but read back {back[0]} rows "
                             f"({back[1]} distinct ids, {back[2]} unexpected); nothing was deleted. Check the "
                             f"archive files {written} and disk space, then re-run.")
    finally:
        con.execute("DROP TABLE IF EXISTS _ml_to_archive")
    _verify_all_archived(con, arch, cutoff)


def _verify_all_archived(con: duckdb.DuckDBPyConnection, arch: str, cutoff: int) -> None:
    """Every event older than ``cutoff`` must be in the archive (read back by id) before anything is deleted."""
    if not arch_mod.has_files(con, arch):
        missing = _scalar(con, "SELECT count(*) FROM events WHERE ts_ns < ?", [cutoff])
    else:
        missing = _scalar(con, f"""SELECT count(*) FROM events e WHERE e.ts_ns < $cutoff AND NOT EXISTS (
            SELECT 1 FROM {arch_mod.read_sql(arch_mod.archive_glob(arch))} a WHERE a.event_id = e.event_id)""",
                          {"cutoff": cutoff})  # type: ignore[arg-type]
    if missing:
        raise StoreError(f"{missing} events older than the cutoff are not in the archive {arch}; refusing to "
                         "delete unarchived events. Nothing was deleted; check the archive and re-run.")


# -- rollups --------------------------------------------------------------------------------------
def _rollup_sql(metric_rows: str, step_s: int) -> str:
    """Merge new rollup rows (series_key, ts, metric, labels, value) with stored ones of the same key+ts."""
    sums = [m for m, (_, how) in ROLLUP_METRICS.items() if how == "sum"]
    sum_list = ", ".join(f"'{m}'" for m in sums)
    return f"""INSERT OR REPLACE INTO series (series_key, ts, metric, labels, value, step_s, origin)
        SELECT n.series_key, n.ts, n.metric, n.labels,
          CASE WHEN o.value IS NULL THEN n.value
               WHEN n.metric IN ({sum_list}) THEN n.value + o.value
               ELSE greatest(n.value, o.value) END,
          {float(step_s)}, 'rollup'
        FROM ({metric_rows}) n LEFT JOIN series o ON o.series_key = n.series_key AND o.ts = n.ts"""


def _unpivot(agg: str, step_s: int) -> str:
    cols = ", ".join(ROLLUP_METRICS)
    return f"""SELECT {SERIES_KEY_SQL} AS series_key, ts, metric, labels, value FROM (
        SELECT *, {float(step_s)} AS step_s FROM (UNPIVOT ({agg}) ON {cols} INTO NAME metric VALUE value))
        WHERE value IS NOT NULL AND NOT (value = 0 AND metric IN ({_ZERO_DROPPABLE}))"""


def _rollup_minutes(con: duckdb.DuckDBPyConnection, cutoff: int) -> tuple[int, int]:
    """Per-minute series from access-log events older than ``cutoff``; returns (events, series rows)."""
    aggs = ", ".join(f"CAST({expr} AS DOUBLE) AS {m}" for m, (expr, _) in ROLLUP_METRICS.items())
    agg = f"""SELECT to_timestamp((ts_ns // {60 * NS}) * 60) AS ts, {LABELS_SQL} AS labels, {aggs}
        FROM (SELECT *, coalesce(sample_weight, 1.0) AS w FROM events
              WHERE ts_ns < {int(cutoff)} AND record_kind = 'access_log')
        GROUP BY ALL"""
    n_events = int(_scalar(con, "SELECT count(*) FROM events WHERE ts_ns < ? AND record_kind = 'access_log'",
                           [cutoff]))
    if n_events == 0:
        return 0, 0
    con.execute(f"CREATE OR REPLACE TEMP TABLE _ml_rollup AS {_unpivot(agg, MINUTE_S)}")
    rows = int(_scalar(con, "SELECT count(*) FROM _ml_rollup"))
    con.execute(_rollup_sql("SELECT * FROM _ml_rollup", MINUTE_S))
    con.execute("DROP TABLE _ml_rollup")
    return n_events, rows


def _rollup_hours(con: duckdb.DuckDBPyConnection, cutoff: int) -> tuple[int, int]:
    """Per-minute rollups older than ``cutoff`` -> per-hour rollups; returns (minute rows, hour rows)."""
    where = f"origin = 'rollup' AND step_s = {float(MINUTE_S)} AND ts < to_timestamp({cutoff // NS})"
    n_min = int(_scalar(con, f"SELECT count(*) FROM series WHERE {where}"))
    if n_min == 0:
        return 0, 0
    sums = [m for m, (_, how) in ROLLUP_METRICS.items() if how == "sum"]
    sum_list = ", ".join(f"'{m}'" for m in sums)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _ml_rollup AS
        SELECT md5(concat_ws(chr(31), 'rollup', CAST({float(HOUR_S)} AS VARCHAR), metric, CAST(labels AS VARCHAR)))
                 AS series_key, ts, metric, labels, value FROM (
          SELECT to_timestamp((CAST(epoch(ts) AS BIGINT) // {HOUR_S}) * {HOUR_S}) AS ts, metric,
                 any_value(labels) AS labels,
                 CASE WHEN metric IN ({sum_list}) THEN sum(value) ELSE max(value) END AS value
          FROM series WHERE {where} GROUP BY 1, 2, series_key)""")
    rows = int(_scalar(con, "SELECT count(*) FROM _ml_rollup"))
    con.execute(f"DELETE FROM series WHERE {where}")
    con.execute(_rollup_sql("SELECT * FROM _ml_rollup", HOUR_S))
    con.execute("DROP TABLE _ml_rollup")
    return n_min, rows


# -- main -----------------------------------------------------------------------------------------
def apply_retention(store: Store, policy: RetentionPolicy, *, now: datetime | None = None,
                    dry_run: bool = False) -> RetentionReport:
    """Apply ``policy`` to ``store`` (open read-write); see the module docstring for order and safety."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ConfigError("retention 'now' must be timezone-aware (UTC)")
    if not dry_run:
        store._require_rw()
    con = store.con
    ev_cut = _cutoff_ns(now, policy.events_days, MINUTE_S)
    raw_cut = _cutoff_ns(now, policy.raw_days, 1)
    hour_cut = _cutoff_ns(now, policy.rollup_minutes_days, HOUR_S)
    report = RetentionReport(dry_run=dry_run, now=now.isoformat(), events_cutoff=_iso(ev_cut),
                             raw_cutoff=_iso(raw_cut), hour_rollup_cutoff=_iso(hour_cut),
                             archive_dir=policy.archive_dir)
    if ev_cut is not None and policy.archive_dir:
        _archive(con, policy.archive_dir, ev_cut, report, dry_run)
    if dry_run:
        _dry_counts(con, policy, report, ev_cut, raw_cut, hour_cut)
        return report
    con.execute("BEGIN TRANSACTION")
    try:
        if ev_cut is not None:
            if policy.archive_dir:
                _verify_all_archived(con, policy.archive_dir, ev_cut)
            if policy.rollup:
                report.events_rolled_up, report.minute_series_rows = _rollup_minutes(con, ev_cut)
            report.events_deleted = int(con.execute("DELETE FROM events WHERE ts_ns < ?", [ev_cut]).fetchall()[0][0])
        if raw_cut is not None:
            report.raw_nulled = int(con.execute(
                "UPDATE events SET raw = NULL WHERE ts_ns < ? AND raw IS NOT NULL", [raw_cut]).fetchall()[0][0])
        if hour_cut is not None:
            report.minute_rows_rolled_to_hours, report.hour_series_rows = _rollup_hours(con, hour_cut)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return report


def _dry_counts(con: duckdb.DuckDBPyConnection, policy: RetentionPolicy, report: RetentionReport,
                ev_cut: int | None, raw_cut: int | None, hour_cut: int | None) -> None:
    if ev_cut is not None:
        report.events_deleted = int(_scalar(con, "SELECT count(*) FROM events WHERE ts_ns < ?", [ev_cut]))
        if policy.rollup:
            report.events_rolled_up = int(_scalar(
                con, "SELECT count(*) FROM events WHERE ts_ns < ? AND record_kind = 'access_log'", [ev_cut]))
    if raw_cut is not None:
        # events deleted by this run are not counted as NULLed
        report.raw_nulled = int(_scalar(con, "SELECT count(*) FROM events WHERE ts_ns < ? AND raw IS NOT NULL "
                                        "AND ts_ns >= ?", [raw_cut, ev_cut if ev_cut is not None else -(2**62)]))
    if hour_cut is not None:
        report.minute_rows_rolled_to_hours = int(_scalar(
            con, f"SELECT count(*) FROM series WHERE origin = 'rollup' AND step_s = {float(MINUTE_S)} "
            "AND ts < to_timestamp(?)", [hour_cut // NS]))
