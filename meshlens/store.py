"""The DuckDB store: open, migrate, insert batches transactionally, watermarks, read-only snapshots.

Concurrency model (why there is a snapshot file): DuckDB lets one process hold a database file
read-write, and a read-only open from another process fails while a writer holds it. An SRE's notebook
kernel, a scheduled report and an ingest must be able to overlap, so:

* writers (ingest, retention) open ``<db>`` read-write; each batch is one transaction, so a crash leaves
  either the whole batch or none of it;
* after each run (and every ``snapshot_every_s`` seconds during long runs) the writer checkpoints and
  publishes an atomic copy, ``<db>.snapshot`` (copy to a temp file, then ``os.replace``);
* readers (:func:`open_store` with ``read_only=True``: reports, notebooks, analyses) open the snapshot
  when it exists, so they never block the writer and never see a half-written batch. They see the state
  of the last completed publish.

The store knows nothing of log formats: it receives Arrow tables whose columns are named as in
:mod:`meshlens.schema`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from meshlens import schema
from meshlens.errors import SchemaVersionError, StoreError

if TYPE_CHECKING:  # pandas costs ~0.25 s to import: an ingest (a CLI start-up) never needs it
    import pandas as pd

log = logging.getLogger("meshlens.store")

SNAPSHOT_SUFFIX = ".snapshot"
INTERRUPTED_MESSAGE = ("interrupted: the process died before finishing this run (killed, out of memory, power "
                       "loss); the counts are what it had stored. Re-run with --resume to continue.")
LOCK_RETRY_S = 30.0
# Readers (reports, notebook kernels, analyses) cap DuckDB's cache (default 80% of RAM) so several can
# run beside an ingest; DuckDB spills to disk beyond it. Override with MESHLENS_READ_MEMORY_LIMIT.
READ_MEMORY_LIMIT = os.environ.get("MESHLENS_READ_MEMORY_LIMIT", "2GB")
_MEM_RE = r"\d+(\.\d+)?\s*[KMGT]i?B"


def snapshot_path(path: str | os.PathLike[str]) -> Path:
    """Where the read-only snapshot of ``path`` lives."""
    return Path(str(path) + SNAPSHOT_SUFFIX)


@dataclass
class InsertResult:
    """What one transactional batch insert did."""

    stored: int
    duplicates: int
    rejects: int
    rejects_new: int = -1  # rows added to ``rejects`` (a re-read reject is counted in ``rejects`` only)

    def __post_init__(self) -> None:
        if self.rejects_new < 0:
            self.rejects_new = self.rejects


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _open_ro(path: str) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory connection with the file ATTACHed read-only, its tables visible as views.

    Why not ``duckdb.connect(path, read_only=True)``: DuckDB shares one database instance per path
    within a process, so a notebook kernel that keeps a store open would never see a newer snapshot
    through a second open. ATTACH on a new in-memory connection always reads the file as it is now.
    """
    con = duckdb.connect(":memory:")
    if READ_MEMORY_LIMIT and re.fullmatch(_MEM_RE, READ_MEMORY_LIMIT):
        con.execute(f"SET memory_limit = '{READ_MEMORY_LIMIT}'")
    try:
        con.execute(f"ATTACH {_sql_str(path)} AS meshlens_store (READ_ONLY)")
        # Views in the in-memory catalog (not `USE`, which is per connection): cursors made from this
        # connection -- JupySQL's, pandas' -- see the tables by their plain names too.
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'meshlens_store'").fetchall()]
        for name in names:
            quoted = '"' + name.replace('"', '""') + '"'
            con.execute(f"CREATE VIEW memory.main.{quoted} AS SELECT * FROM meshlens_store.main.{quoted}")
    except BaseException:
        con.close()
        raise
    return con


def _connect(path: str, read_only: bool, timeout_s: float = LOCK_RETRY_S) -> duckdb.DuckDBPyConnection:
    """Connect, retrying while another process holds the file lock (a writer finishing a batch)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return _open_ro(path) if read_only else duckdb.connect(path)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "not a valid duckdb database file" in msg.lower():
                raise StoreError(
                    f"{path!r} is not a DuckDB file (a log file or another kind of database?): pass a meshlens "
                    "store as --db; load logs with `meshlens ingest file LOGS... --db STORE.duckdb`"
                ) from exc
            if "lock" not in msg.lower():
                raise StoreError(f"cannot open store {path!r}{' read-only' if read_only else ''}: {msg}") from exc
            if time.monotonic() > deadline:
                raise StoreError(
                    f"cannot open store {path!r}{' read-only' if read_only else ''}: {msg}. "
                    "Another process holds it read-write; readers should use the published snapshot "
                    "(open with read_only=True) and only one ingest may run at a time."
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open store {path!r}: {exc}") from exc


class Store:
    """A meshlens DuckDB store. Use :func:`open_store` to get one."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: str, read_only: bool) -> None:
        self.con = con
        self.path = path
        self.read_only = read_only
        self._last_publish = time.monotonic()
        self._active_runs: set[str] = set()  # runs this Store started and has not finished

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        with suppress(duckdb.Error):
            self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> pd.DataFrame:
        """Run SQL with bind parameters and return a DataFrame (never build SQL from user input)."""
        return self.con.execute(sql, params or []).df()

    def scalar(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> Any:
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0][0] if rows else None

    def schema_version(self) -> int:
        return _read_version(self.con)

    # -- writing ---------------------------------------------------------------------------------
    def _require_rw(self) -> None:
        if self.read_only:
            raise StoreError(f"store {self.path!r} is open read-only; open it with read_only=False to write")

    def insert_batch(
        self,
        events: pa.Table | str,
        rejects: pa.Table | str | None = None,
        checkpoint: tuple[str, dict[str, Any]] | None = None,
        run: tuple[str, int, int] | None = None,
        *,
        n_events: int | None = None,
        n_rejects: int | None = None,
    ) -> InsertResult:
        """Insert parsed events and rejects, and advance a watermark, in ONE transaction.

        Events whose ``event_id`` is already stored are skipped (counted as duplicates), so re-ingesting
        is idempotent. If anything fails the transaction rolls back and nothing of the batch is kept.
        ``events``/``rejects`` are Arrow tables, or names of (temp) tables on this store's connection
        (what :meth:`meshlens.formats.detect.Parser.parse_into` leaves), which avoids copying.
        ``run`` = ``(run_id, records read, records filtered)`` of this batch: the ``ingest_runs`` row is
        advanced in the same transaction, so a run killed with ``kill -9`` leaves a row whose counts
        are exactly what it stored (:meth:`start_run` of the next run marks it ``interrupted``).
        ``n_events`` / ``n_rejects``: the row counts of named ``events`` / ``rejects`` when the caller
        knows them (the parser counted them), which saves a pass over each view.
        """
        self._require_rw()
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            stored = 0
            ev_name = events if isinstance(events, str) else "_ml_staged_events"
            if isinstance(events, str):
                if n_events is None:
                    n_events = int(con.execute(f"SELECT count(*) FROM {events}").fetchall()[0][0])
            else:
                n_events = events.num_rows
                if n_events:
                    con.register("_ml_staged_events", events)
            if n_events:
                cols = ", ".join(f'"{c}"' for c in schema.EVENT_COLUMN_NAMES)
                select = _event_select(con, ev_name)
                lo, hi, nulls = con.execute(
                    f"SELECT min(ts_ns), max(ts_ns), count(*) FILTER (WHERE ts_ns IS NULL) FROM {ev_name}"
                ).fetchall()[0]
                if nulls == 0 and lo is not None:
                    # Prune the anti-join with the batch's time range: an event's id includes its time,
                    # so a duplicate can only be among stored events of the same time range.
                    existing = "SELECT event_id FROM events WHERE ts_ns BETWEEN $lo AND $hi"
                    params: dict[str, Any] = {"lo": lo, "hi": hi}
                else:
                    existing = "SELECT event_id FROM events"
                    params = {}
                row = con.execute(
                    f"INSERT INTO events ({cols}) SELECT {select} FROM {ev_name} s "
                    f"WHERE s.event_id NOT IN ({existing})",
                    params,
                ).fetchall()
                stored = int(row[0][0]) if row else 0
                if not isinstance(events, str):
                    con.unregister("_ml_staged_events")
            rejects_new = 0
            if rejects is None:
                n_rejects = 0
            else:
                rej_name = rejects if isinstance(rejects, str) else "_ml_staged_rejects"
                if isinstance(rejects, str):
                    if n_rejects is None:
                        n_rejects = int(con.execute(f"SELECT count(*) FROM {rejects}").fetchall()[0][0])
                else:
                    n_rejects = rejects.num_rows
                    if n_rejects:
                        con.register("_ml_staged_rejects", rejects)
                if n_rejects:
                    cols = ", ".join(f'"{c.name}"' for c in schema.REJECT_COLUMNS)
                    row = con.execute(
                        f"INSERT INTO rejects ({cols}) SELECT {cols} FROM {rej_name} s "
                        "WHERE s.reject_id NOT IN (SELECT reject_id FROM rejects)"
                    ).fetchall()
                    rejects_new = int(row[0][0]) if row else 0
                    if not isinstance(rejects, str):
                        con.unregister("_ml_staged_rejects")
            if checkpoint is not None:
                self._set_watermark(*checkpoint)
            if run is not None:
                run_id, n_read, n_filtered = run
                con.execute(
                    "UPDATE ingest_runs SET records_read = records_read + ?, events_stored = events_stored + ?, "
                    "duplicates = duplicates + ?, rejects = rejects + ?, filtered = filtered + ? WHERE run_id = ?",
                    [n_read, stored, n_events - stored, n_rejects, n_filtered, run_id],
                )
            con.execute("COMMIT")
        except BaseException:
            with suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        return InsertResult(stored=stored, duplicates=n_events - stored, rejects=n_rejects, rejects_new=rejects_new)

    def _set_watermark(self, key: str, state: dict[str, Any]) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO watermarks VALUES (?, ?, now())", [key, json.dumps(state, sort_keys=True)]
        )

    def set_watermark(self, key: str, state: dict[str, Any]) -> None:
        """Store resume state for an incremental source (outside a batch)."""
        self._require_rw()
        self._set_watermark(key, state)

    def get_watermark(self, key: str) -> dict[str, Any] | None:
        rows = self.con.execute("SELECT state FROM watermarks WHERE key = ?", [key]).fetchall()
        return json.loads(rows[0][0]) if rows else None

    def delete_watermark(self, key: str) -> None:
        self._require_rw()
        self.con.execute("DELETE FROM watermarks WHERE key = ?", [key])

    def upsert_series(self, table: pa.Table | pd.DataFrame) -> int:
        """Insert or replace time-series samples (columns of ``series``; key = series_key + ts)."""
        self._require_rw()
        if not isinstance(table, pa.Table):  # a pandas DataFrame
            import pandas as pd

            df = table
            cols: dict[str, pa.Array] = {}
            for c in schema.SERIES_COLUMNS:
                if c.name == "labels":
                    cols[c.name] = pa.array(
                        [list(v.items()) if isinstance(v, dict) else v for v in df[c.name]],
                        pa.map_(pa.string(), pa.string()))
                elif c.name == "ts":
                    cols[c.name] = pa.array(pd.to_datetime(df[c.name], utc=True))
                else:
                    cols[c.name] = pa.array(df[c.name])
            table = pa.table(cols)
        if table.num_rows == 0:
            return 0
        names = ", ".join(f'"{c.name}"' for c in schema.SERIES_COLUMNS)
        self.con.register("_ml_staged_series", table)
        try:
            self.con.execute(f"INSERT OR REPLACE INTO series ({names}) SELECT {names} FROM _ml_staged_series")
        finally:
            self.con.unregister("_ml_staged_series")
        return table.num_rows

    def start_run(self, source: str) -> str:
        """Record a new ``running`` run; first mark runs left ``running`` by a dead process ``interrupted``.

        Only one process can have the store open read-write (DuckDB's file lock), so a ``running`` row
        that this :class:`Store` did not start belongs to a process that died without finishing it
        (``kill -9``, OOM, power loss). Its counts are what it stored (see ``run`` of
        :meth:`insert_batch`); ``finished_at`` stays NULL because nobody knows when it died.
        """
        self._require_rw()
        active = sorted(self._active_runs)
        placeholders = ", ".join("?" for _ in active)
        interrupted = self.con.execute(
            "UPDATE ingest_runs SET status = 'interrupted', message = ? WHERE status = 'running'"
            + (f" AND run_id NOT IN ({placeholders})" if active else ""),
            [INTERRUPTED_MESSAGE, *active],
        ).fetchall()
        if interrupted and int(interrupted[0][0]):
            log.warning("%d earlier ingest run(s) were interrupted (the process died); marked 'interrupted' "
                        "with the counts they had stored", int(interrupted[0][0]))
        run_id = uuid.uuid4().hex
        self._active_runs.add(run_id)
        self.con.execute(
            "INSERT INTO ingest_runs (run_id, source, started_at, finished_at, status, records_read, "
            "events_stored, duplicates, rejects, message, filtered) "
            "VALUES (?, ?, now(), NULL, 'running', 0, 0, 0, 0, NULL, 0)", [run_id, source]
        )
        return run_id

    def finish_run(
        self, run_id: str, *, read: int, stored: int, duplicates: int, rejects: int, status: str,
        message: str | None = None, filtered: int = 0, filtered_by_rule: dict[str, int] | None = None,
    ) -> None:
        self._require_rw()
        self._active_runs.discard(run_id)
        self.con.execute(
            "UPDATE ingest_runs SET finished_at = now(), status = ?, records_read = ?, events_stored = ?, "
            "duplicates = ?, rejects = ?, message = ?, filtered = ?, filtered_by_rule = ? WHERE run_id = ?",
            [status, read, stored, duplicates, rejects, message, filtered,
             json.dumps(filtered_by_rule or {}, sort_keys=True), run_id],
        )

    # -- snapshots -------------------------------------------------------------------------------
    def publish_snapshot(self) -> Path | None:
        """Checkpoint and atomically publish ``<db>.snapshot`` for readers (see module docstring)."""
        self._require_rw()
        if self.path == ":memory:":
            return None
        self.con.execute("CHECKPOINT")
        dst = snapshot_path(self.path)
        tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
        shutil.copyfile(self.path, tmp)
        os.replace(tmp, dst)
        self._last_publish = time.monotonic()
        return dst

    def maybe_publish_snapshot(self, every_s: float) -> None:
        """Publish if more than ``every_s`` seconds passed since the last publish (long ingests)."""
        if time.monotonic() - self._last_publish >= every_s:
            self.publish_snapshot()


_ADDED_EVENT_COLUMNS = {n for added in schema.ADDED_IN.values() for n in added.get("events", ())}


def _event_select(con: duckdb.DuckDBPyConnection, source: str) -> str:
    """Select list inserting ``source`` into ``events``: columns added by a later schema version that a
    caller written for an older one does not have are NULL (any other missing column is an error), and ``sample_weight`` is never NULL (1.0 = not sampled), so ``sum(sample_weight)``
    is always the unbiased count."""
    have = {d[0] for d in con.execute(f"SELECT * FROM {source} LIMIT 0").description}
    out = []
    for c in schema.EVENT_COLUMNS:
        expr = f's."{c.name}"' if c.name in have or c.name not in _ADDED_EVENT_COLUMNS else f"NULL::{c.type}"
        if c.name == "sample_weight":
            expr = f"coalesce({expr}, 1.0)"
        out.append(f'{expr} AS "{c.name}"')
    return ", ".join(out)


def _read_version(con: duckdb.DuckDBPyConnection) -> int:
    try:
        rows = con.execute("SELECT value FROM meshlens_meta WHERE key = 'schema_version'").fetchall()
    except duckdb.CatalogException:
        return 0
    return int(rows[0][0]) if rows else 0


# Each entry upgrades the store from version N-1 to N; index 0 creates version 1.
def _create_v1(con: duckdb.DuckDBPyConnection) -> None:
    for table in schema.TABLES:
        con.execute(schema.create_table_sql(table))


def _v2_volume_and_authn(con: duckdb.DuckDBPyConnection) -> None:
    """v1 -> v2: ``events.sample_weight`` (1.0 for every stored event: none was sampled),
    ``events.authn_reason``, ``ingest_runs.filtered`` (0: nothing was filtered) and ``filtered_by_rule``.

    ``IF NOT EXISTS`` because a new store is created by :func:`_create_v1` from the current column lists.
    """
    for table, names in schema.ADDED_IN[2].items():
        for name in names:
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {schema.column_sql(schema.column(table, name))}")


MIGRATIONS = [_create_v1, _v2_volume_and_authn]
assert len(MIGRATIONS) == schema.SCHEMA_VERSION


def migrate(con: duckdb.DuckDBPyConnection, path: str) -> int:
    """Bring the store to :data:`schema.SCHEMA_VERSION`; returns the version found before."""
    found = _read_version(con)
    if found > schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"store {path!r} has schema version {found}, newer than this meshlens understands "
            f"({schema.SCHEMA_VERSION}); upgrade meshlens (pip install -U meshlens)"
        )
    if found == 0:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if tables - {"meshlens_meta"} and "meshlens_meta" not in tables:
            raise SchemaVersionError(
                f"{path!r} is a DuckDB file with tables {sorted(tables)} but no meshlens schema version; "
                "it was not created by meshlens. Use a new --db path."
            )
    if found == schema.SCHEMA_VERSION:
        return found
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("CREATE TABLE IF NOT EXISTS meshlens_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        for step in MIGRATIONS[found:]:
            step(con)
        con.execute(
            "INSERT OR REPLACE INTO meshlens_meta VALUES ('schema_version', ?)", [str(schema.SCHEMA_VERSION)]
        )
        con.execute("COMMIT")
    except BaseException:
        with suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    return found


def open_store(path: str | os.PathLike[str], read_only: bool = False) -> Store:
    """Open (and for writers create/migrate) a store.

    ``read_only=True`` opens the published snapshot when there is one (so it never conflicts with a
    running ingest), else the file itself read-only. A read-only open of a store with an older schema
    fails with a message telling how to migrate.
    """
    path = str(path)
    if read_only:
        snap = snapshot_path(path)
        target = str(snap) if snap.exists() else path
        if target != ":memory:" and not Path(target).exists():
            raise StoreError(f"store {path!r} does not exist; ingest something first (meshlens ingest ...)")
        con = _connect(target, read_only=True)
        found = _read_version(con)
        if found != schema.SCHEMA_VERSION:
            con.close()
            if found > schema.SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"store {path!r} has schema version {found}, newer than this meshlens "
                    f"({schema.SCHEMA_VERSION}); upgrade meshlens"
                )
            raise SchemaVersionError(
                f"store {path!r} has schema version {found}, this meshlens needs {schema.SCHEMA_VERSION}; "
                f"run `meshlens migrate --db {path}` once (read-write) to migrate it"
            )
        return Store(con, path, read_only=True)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, read_only=False)
    try:
        migrate(con, path)
    except BaseException:
        con.close()
        raise
    return Store(con, path, read_only=False)


@contextmanager
def writing(path: str | os.PathLike[str] | Store, publish: bool = True) -> Iterator[Store]:
    """Open read-write for the duration of a block; publish the snapshot at the end if it succeeded.

    Given an open :class:`Store` (the caller's, e.g. a notebook's), use it as it is: its owner decides
    when to publish and close."""
    if isinstance(path, Store):
        yield path
        return
    store = open_store(path, read_only=False)
    try:
        yield store
        if publish:
            store.publish_snapshot()
    finally:
        store.close()
