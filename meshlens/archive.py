"""The Parquet archive of old events, and reading it together with the live store.

Layout (written by :mod:`meshlens.retention`): Hive partitions ``<archive>/dt=YYYY-MM-DD/event_type=X/``
with files ``meshlens_<run>_<uuid>.parquet`` holding every ``events`` column except ``event_type``
(it is the partition value). ``dt`` is the event's UTC date. DuckDB, Spark and Trino read it as a
partitioned table; ``<archive>`` may be a local directory or, with DuckDB's ``httpfs`` extension and
credentials configured through DuckDB secrets, an ``s3://``/``gs://``/``az://`` URL.

:func:`attach` gives a notebook one view over live and archived events, read-only (only TEMP views are
created on the connection, so it works on a read-only store/snapshot too).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from meshlens.errors import StoreError
from meshlens.store import Store

ARCHIVED_VIEW = "archived_events"
ALL_VIEW = "all_events"
HIVE_TYPES = "{'dt': DATE, 'event_type': VARCHAR}"


def is_remote(archive: str | os.PathLike[str]) -> bool:
    return "://" in str(archive)


def archive_glob(archive: str | os.PathLike[str]) -> str:
    """The glob matching every archive file under ``archive``."""
    return str(archive).rstrip("/") + "/**/*.parquet"


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def read_sql(files: str) -> str:
    """SQL reading archive files (a glob or a path), partition columns typed, schemas unioned by name."""
    return (f"read_parquet({_lit(files)}, hive_partitioning = true, union_by_name = true, "
            f"hive_types = {HIVE_TYPES})")


def has_files(con: duckdb.DuckDBPyConnection, archive: str | os.PathLike[str]) -> bool:
    return bool(con.execute("SELECT count(*) FROM glob(?)", [archive_glob(archive)]).fetchall()[0][0])


def attach(store: Store | duckdb.DuckDBPyConnection, archive: str | os.PathLike[str],
           view: str = ALL_VIEW) -> str:
    """Create TEMP views ``archived_events`` and ``all_events`` (live + archived, each event once).

    An event both live and archived (archived, then not yet deleted) is taken from the live table.
    ``dt`` (the partition date) is left out so ``all_events`` has the columns of ``events``.
    Returns the view name. A local ``archive`` that does not exist is an error (a typo would otherwise
    silently show only live data); an existing archive without files gives live events only.
    """
    con = store.con if isinstance(store, Store) else store
    if not is_remote(archive) and not Path(archive).is_dir():
        raise StoreError(f"archive {str(archive)!r} is not a directory; pass the directory that "
                         "`meshlens retention apply` archived to (policy key archive_dir)")
    if has_files(con, archive):
        con.execute(f"CREATE OR REPLACE TEMP VIEW {ARCHIVED_VIEW} AS "
                    f"SELECT * EXCLUDE (dt) FROM {read_sql(archive_glob(archive))}")
    else:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {ARCHIVED_VIEW} AS SELECT * FROM events LIMIT 0")
    con.execute(f"""CREATE OR REPLACE TEMP VIEW {view} AS
        SELECT * FROM events
        UNION ALL BY NAME
        SELECT * FROM {ARCHIVED_VIEW} a WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.event_id)""")
    return view
