"""``analyze incidents`` over a 5M-event store (target: < 15 s), and the answer it gives there.

    .venv/bin/python benchmarks/bench_incidents.py [--events 5000000] [--keep DIR] [--window N]

1. Simulates one multi-incident window of :func:`meshlens.simulate.windows.incident_windows` (default
   window 1: three incidents of different kinds hours apart, decoy changes, a loud unrelated service) and
   ingests it with the real ingest.
2. Grows the store to ``--events`` by duplicating its proxy records in DuckDB SQL: each copy gets new
   event ids and request ids (so copies are separate requests) and its times shifted by a few
   milliseconds, i.e. the same hours with N times the traffic; audit events are kept once.
3. Times :func:`meshlens.analysis.incidents.find_incidents` over the whole window on a read-only open (as
   the CLI does), and scores its answer against the ground truth (a fast wrong answer is not a result).
4. Baseline in the same run: one full scan of the events table (``GROUP BY dst_service`` with a latency
   quantile), so the cost can also be read as a multiple of "reading the data once" on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb

TARGET_S = 15.0


def build_store(workdir: Path, events: int, window: int) -> tuple[Path, dict]:
    """Simulate + ingest one window, then duplicate its traffic up to ``events`` rows (a store kept from an
    earlier run with ``--keep`` and at least that size is reused)."""
    from meshlens.ingest import ingest_files
    from meshlens.simulate import simulate
    from meshlens.simulate.windows import incident_windows

    db, truth = workdir / "bench.duckdb", workdir / "truth.json"
    if db.exists() and truth.exists() and Path(str(db) + ".snapshot").exists():
        con = duckdb.connect(str(db), read_only=True)
        total = con.execute("SELECT count(*) FROM events").fetchone()[0]
        con.close()
        if total >= events:
            print(f"store: reusing {db} ({total:,} events)")
            return db, json.loads(truth.read_text())
        db.unlink()
    scenario = incident_windows(window + 1)[window]
    gt = simulate(scenario, workdir / "sim").to_dict()
    truth.write_text(json.dumps(gt))
    ingest_files(str(db), sorted(str(p) for p in (workdir / "sim").glob("*.jsonl.gz")), progress=False)
    con = duckdb.connect(str(db))
    base = con.execute("SELECT count(*) FROM events WHERE record_kind = 'access_log'").fetchone()[0]
    other = con.execute("SELECT count(*) FROM events WHERE record_kind <> 'access_log'").fetchone()[0]
    copies = max(0, -(-(events - other) // base) - 1)
    t = time.perf_counter()
    con.execute(
        """INSERT INTO events
           SELECT e.* REPLACE (
               md5(event_id || '#' || k) AS event_id,
               request_id || '#' || k AS request_id,
               trace_id || '#' || k AS trace_id,
               ts_ns + k * 3000000 AS ts_ns,
               ts + to_microseconds(k * 3000) AS ts)
           FROM events e, range(1, $copies + 1) r(k)
           WHERE record_kind = 'access_log'""", {"copies": copies})
    con.execute("CHECKPOINT")
    total = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    shutil.copyfile(db, str(db) + ".snapshot")
    print(f"store: {total:,} events ({base:,} proxy records x {copies + 1} + {other:,} others) "
          f"built in {time.perf_counter() - t:.1f} s")
    return db, gt


def scan_baseline(db: Path) -> float:
    con = duckdb.connect(str(db), read_only=True)
    t = time.perf_counter()
    con.execute("SELECT dst_service, count(*), approx_quantile(duration_ms, 0.99) FROM events "
                "GROUP BY dst_service").fetchall()
    dt = time.perf_counter() - t
    con.close()
    return dt


def run(db: Path, gt: dict) -> tuple[float, dict]:
    from meshlens.analysis.incidents import find_incidents
    from meshlens.simulate.windows import score_window
    from meshlens.store import open_store

    with open_store(db, read_only=True) as store:
        t = time.perf_counter()
        report = find_incidents(store, gt["window_start"], gt["window_end"])
        dt = time.perf_counter() - t
    score = score_window(report.items, gt)
    for item in report.items:
        print(f"  #{item['rank']} {item['summary']}")
    return dt, score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="Build/keep the store in this directory.")
    ap.add_argument("--window", type=int, default=1, help="Which window of incident_windows() to grow.")
    args = ap.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="meshlens-bench-incidents-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        db, gt = build_store(workdir, args.events, args.window)
        scan = scan_baseline(db)
        dt, score = run(db, gt)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = score["found"] == score["incidents"] and score["change_ok"] == score["incidents"] and not score["spurious"]
    print(f"\nincidents found {score['found']}/{score['incidents']}, change right {score['change_ok']}, "
          f"spurious {score['spurious']} ({'correct' if ok else 'WRONG'})")
    for m in score["misses"]:
        print(f"  MISS {m}")
    print(f"analyze incidents: {dt:.2f} s = {dt / scan:.1f} x full scan ({scan:.2f} s)")
    verdict = "OK" if dt < TARGET_S else "OVER TARGET"
    print(f"target: analyze incidents over {args.events:,} events in < {TARGET_S:.0f} s -> {dt:.2f} s {verdict}")
    return 0 if dt < TARGET_S and ok else 1


if __name__ == "__main__":
    sys.exit(main())
