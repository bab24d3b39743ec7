"""Crash safety: ``kill -9`` an ingest at random moments, many times, then let a run finish.

Promise under test (meshlens/ingest.py, meshlens/store.py): each batch is one transaction, so a killed
ingest leaves whole batches or nothing; the DuckDB file (and its published snapshot) always opens; a
re-run converges to exactly the store an uninterrupted run builds -- same event ids, same rejects, no
duplicate, nothing missing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from meshlens.ingest import IngestCounts, ingest_batches
from meshlens.store import open_store, snapshot_path
from tests.support.crash import _RUNNER, ROOT, make_log, small_batches

KILLS = int(os.environ.get("MESHLENS_CRASH_KILLS", "40" if os.environ.get("MESHLENS_SLOW") == "1" else "8"))
BATCH = 2000


def ingest_small(db: Path, log: Path, n: int = BATCH) -> IngestCounts:
    with open_store(db) as store:
        counts = ingest_batches(store, small_batches(log, n), source="file:log", progress=False)
        store.publish_snapshot()
    return counts


def state(db: Path) -> tuple[dict[str, int], set[str], set[str]]:
    """Counts, event id set and reject id set; opening read-only proves the file is readable."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        counts = dict(zip(["events", "distinct_events", "rejects", "distinct_rejects"], con.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT count(DISTINCT event_id) FROM events), "
            "(SELECT count(*) FROM rejects), (SELECT count(DISTINCT reject_id) FROM rejects)").fetchone(),
            strict=True))
        events = {r[0] for r in con.execute("SELECT event_id FROM events").fetchall()}
        rejects = {r[0] for r in con.execute("SELECT reject_id FROM rejects").fetchall()}
    finally:
        con.close()
    return counts, events, rejects


def _run(db: Path, log: Path, snapshot_every_s: float = 1.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _RUNNER, str(db), str(log), str(BATCH), str(snapshot_every_s)],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill9_anywhere_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    log = make_log(tmp_path / "access.log", 20_000)
    ref_db = tmp_path / "ref.duckdb"
    ref_counts = ingest_small(ref_db, log)
    assert ref_counts.rejects > 0 and ref_counts.stored > 0
    ref = state(ref_db)
    assert ref[0]["events"] == ref[0]["distinct_events"] == ref_counts.stored

    # how long a full run takes here (imports included), to spread the kills over all of it
    db = tmp_path / "crash.duckdb"
    t0 = time.monotonic()
    full = _run(tmp_path / "timing.duckdb", log)
    assert full.wait(timeout=300) == 0, full.stderr.read() if full.stderr else ""
    span = time.monotonic() - t0

    rng = random.Random(7)
    killed_mid_run = partial = 0
    for k in range(KILLS):
        proc = _run(db, log)
        time.sleep(rng.uniform(0.05, span * 1.1))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_run += 1
        proc.wait(timeout=60)
        # never unreadable: the store (after WAL replay) and the published snapshot both open
        counts, events, rejects = state(db) if db.exists() else ({}, set(), set())
        assert events <= ref[1] and rejects <= ref[2], f"kill {k}: rows that an uninterrupted run never stores"
        if counts:
            assert counts["events"] == counts["distinct_events"], f"kill {k}: duplicated events"
            partial += 0 < len(events) < len(ref[1])
        if snapshot_path(db).exists():
            state(snapshot_path(db))
    assert killed_mid_run >= KILLS // 2, "the kills mostly missed the run; the test proved little"
    assert partial >= 1, "no kill landed between batches of a run; the test proved little"
    print(f"kills: {KILLS}, mid-run: {killed_mid_run}, partial stores seen: {partial}, run span {span:.1f}s")

    final = _run(db, log)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0 and "DONE" in out, err[-3000:]
    got = state(db)
    assert got == ref
    assert state(snapshot_path(db)) == ref  # readers see the same final state
