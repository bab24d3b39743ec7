"""ingest_runs bookkeeping: a run killed with kill -9 does not stay ``running`` forever (issue 15).

Each batch advances its run's row in the batch's own transaction, so the row of a killed run says
exactly what it stored; the next run (any source) marks it ``interrupted``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb

from meshlens.ingest import ingest_batches
from meshlens.store import open_store
from tests.support.crash import ROOT, make_log, small_batches

_SLOW_RUNNER = """
import sys, time
from meshlens.ingest import ingest_batches
from meshlens.store import open_store
from tests.support.crash import small_batches

def slow(path):
    for i, b in enumerate(small_batches(path, 500)):
        if i:
            print("ASKED", i, flush=True)  # the reader thread runs ahead: batch i-3 is committed
        time.sleep(0.05)
        yield b

store = open_store(sys.argv[1])
ingest_batches(store, slow(sys.argv[2]), source="file:slow", progress=False)
"""


def _runs(db: Path) -> list[tuple[str, str, int, int, int, int, object, object]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT source, status, records_read, events_stored, duplicates, rejects, message, "
                           "finished_at FROM ingest_runs ORDER BY started_at").fetchall()
    finally:
        con.close()


def test_kill9_leaves_a_row_the_next_run_marks_interrupted_with_what_it_stored(tmp_path: Path) -> None:
    log = make_log(tmp_path / "access.log", 6000)
    db = tmp_path / "m.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUNNER, str(db), str(log)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ASKED 4"):
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ((source, status, read, stored, dups, rejects, _msg, finished),) = _runs(db)
    assert status == "running" and finished is None
    con = duckdb.connect(str(db), read_only=True)
    n_events, n_rejects = con.execute("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM rejects)").fetchone()
    con.close()
    assert read >= 500 and read % 500 == 0  # whole batches only
    assert (stored, rejects) == (n_events, n_rejects) and read == stored + dups + rejects

    with open_store(db) as store:
        counts = ingest_batches(store, small_batches(log, 2000), source="file:again", progress=False)
    first, second = _runs(db)
    assert first[:6] == (source, "interrupted", read, stored, dups, rejects)
    assert "interrupted" in str(first[6]) and first[7] is None
    assert second[1] == "ok" and second[2] == counts.read == 6000


def test_runs_of_the_same_store_are_not_marked_interrupted(tmp_path: Path) -> None:
    log = make_log(tmp_path / "access.log", 1000)
    db = tmp_path / "m.duckdb"
    with open_store(db) as store:
        outer = store.start_run("file:outer")  # a run still going in this process
        ingest_batches(store, small_batches(log, 500), source="file:inner", progress=False)
        statuses = dict(store.con.execute("SELECT source, status FROM ingest_runs").fetchall())
        assert statuses == {"file:outer": "running", "file:inner": "ok"}
        store.finish_run(outer, read=0, stored=0, duplicates=0, rejects=0, status="ok")

