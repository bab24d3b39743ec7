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
from collections.abc import Iterator
from pathlib import Path

import duckdb

from meshlens.ingest import IngestCounts, ingest_batches
from meshlens.records import RawBatch
from meshlens.sources.files import read_file
from meshlens.store import open_store, snapshot_path

KILLS = int(os.environ.get("MESHLENS_CRASH_KILLS", "40" if os.environ.get("MESHLENS_SLOW") == "1" else "8"))
BATCH = 2000
ROOT = Path(__file__).resolve().parents[2]

_RUNNER = """
import sys
from meshlens.ingest import ingest_batches
from meshlens.store import open_store
from tests.store.test_crash import small_batches
store = open_store(sys.argv[1])
try:
    ingest_batches(store, small_batches(sys.argv[2], int(sys.argv[3])), source="file:log", progress=False,
                   snapshot_every_s=float(sys.argv[4]))
    store.publish_snapshot()
finally:
    store.close()
print("DONE", flush=True)
"""


def small_batches(path: str | Path, n: int) -> Iterator[RawBatch]:
    """The file source's batches cut into ``n``-record batches (it batches per 4 MiB read chunk), so a
    small test file still spans many transactions."""
    for b in read_file(path):
        for i in range(0, len(b), n):
            yield RawBatch(source=b.source, lines=b.lines[i:i + n], ts_ns=b.ts_ns[i:i + n],
                           labels=b.labels[i:i + n], positions=b.positions[i:i + n],
                           reject_reasons=b.reject_reasons[i:i + n] if b.reject_reasons else None)


def ingest_small(db: Path, log: Path, n: int = BATCH) -> IngestCounts:
    with open_store(db) as store:
        counts = ingest_batches(store, small_batches(log, n), source="file:log", progress=False)
        store.publish_snapshot()
    return counts


def istio_line(i: int) -> str:
    sec, ms = divmod(i, 1000)
    ts = f"2024-05-01T10:{(sec // 60) % 60:02d}:{sec % 60:02d}.{ms:03d}Z"
    return (f'[{ts}] "GET /api/items/{i % 97} HTTP/1.1" {200 if i % 13 else 503} - via_upstream - "-" 0 '
            f'{i % 5000} {i % 40} {i % 30} "-" "curl/8.0" "req-{i:08d}" "shop:8080" "10.0.{i % 250}.5:8080" '
            f"outbound|8080||shop.default.svc.cluster.local 10.0.0.4:{1024 + i % 60000} 10.0.0.5:8080 "
            "10.0.0.4:4000 - default")


def make_log(path: Path, n: int) -> Path:
    """n records: access lines, verbatim duplicates (kept, numbered) and unparseable lines (rejects)."""
    with path.open("w") as fh:
        for i in range(n):
            if i % 101 == 0:
                fh.write(f"garbage record {i} that no parser accepts\n")
            elif i % 173 == 0:
                fh.write(istio_line(i - 1) + "\n")  # identical to the previous line
            else:
                fh.write(istio_line(i) + "\n")
    return path


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
